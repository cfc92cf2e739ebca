//! Deploy-time rewriting of a task module, so that the host can checkpoint it exactly and cheaply.
//!
//! ```text
//!  uploaded .wasm/.wat --parse--> validate (ABI, imports, features) --rewrite--> instrumented .wasm
//!     * every store / memory.fill / memory.copy / memory.init into the task's memory first marks
//!       the 64 KiB page(s) it touches in a second memory, `hm:dirty` (one byte per page)
//!     * every mutable global is exported as `hm:g<N>`, the memory as `hm:memory`
//! ```
//!
//! The dirty map is what makes an incremental checkpoint cost its dirty pages only (no scan or
//! hash of the whole memory). The task cannot reach `hm:dirty`: its code only names memory 0.
//! Modules that the checkpoint could not capture are refused here with a clear reason: shared or
//! 64-bit memories, several memories, table mutation, imported mutable globals, imports outside
//! the ABI.

use wasm_encoder::reencode::{self, Reencode};
use wasm_encoder::{BlockType, CodeSection, ExportKind, Function, MemArg, MemoryType, ValType};
use wasmparser::{
    CompositeInnerType, Encoding, ExternalKind, FuncType, Operator, Parser, Payload, TypeRef, Validator, WasmFeatures,
};

use super::abi;
use super::prepared::{ModuleFacts, PrepareError, DIRTY_EXPORT, GLOBAL_PREFIX, MEMORY_EXPORT};

/// Pages of the dirty map: one byte for each of the 65,536 pages of a 4 GiB memory, plus one
/// page so that a store that straddles the last page's end still lands in bounds.
const DIRTY_PAGES: u64 = 2;
/// The task's memory is memory 0 (a task has exactly one); the dirty map is added as memory 1.
const TASK_MEMORY: u32 = 0;
const DIRTY_MEMORY: u32 = 1;

/// Parses `source` (binary or text), checks it against the task ABI and returns the
/// instrumented binary.
///
/// Two passes over the binary, both with the parser wasmtime itself uses (one copy of it in the
/// hub): the first validates and surveys (types, imports, memories, globals, exports), the second
/// re-encodes the module with the additions. Nothing is renumbered: the dirty map is the last
/// memory, `hm_mark_range` the last function and its type the last type, so every index in the
/// module (calls, elements, names) stays as it was.
pub(crate) fn instrument(source: &[u8]) -> Result<(Vec<u8>, ModuleFacts), PrepareError> {
    let binary = wat::parse_bytes(source).map_err(|e| PrepareError::Malformed(e.to_string()))?;
    Validator::new_with_features(WasmFeatures::default())
        .validate_all(&binary)
        .map_err(|e| PrepareError::Malformed(e.to_string()))?;
    let survey = Survey::of(&binary)?;
    survey.check()?;
    // Atomics (and shared memories) need the threads proposal: a module that validates only
    // with it uses them, and a checkpoint cannot capture another thread's view of memory.
    if Validator::new_with_features(WasmFeatures::default() - WasmFeatures::THREADS).validate_all(&binary).is_err() {
        return Err(PrepareError::Unsupported("atomic instructions (threads) are not supported".into()));
    }
    let facts = ModuleFacts {
        has_tick: survey.exports.iter().any(|e| e.0 == abi::TICK_EXPORT),
        has_initialize: survey.exports.iter().any(|e| e.0 == abi::INITIALIZE_EXPORT),
        mutable_globals: survey.mutable_globals.len() as u32,
    };
    let mut rewrite = Rewrite {
        mark_type: survey.types.len() as u32,
        mark_func: survey.funcs.len() as u32,
        survey: &survey,
        next_body: 0,
    };
    let mut module = wasm_encoder::Module::new();
    rewrite.parse_core_module(&mut module, Parser::new(0), &binary).map_err(|e| match e {
        reencode::Error::UserError(Refusal(reason)) => PrepareError::Unsupported(reason),
        other => PrepareError::Malformed(other.to_string()),
    })?;
    Ok((module.finish(), facts))
}

/// What the first pass learns: everything the checks and the rewrite need ahead of the code.
#[derive(Default)]
struct Survey {
    /// Every type by index; `None` for a type that is not a function's.
    types: Vec<Option<FuncType>>,
    /// The type index of every function, imported ones first.
    funcs: Vec<u32>,
    imported_funcs: u32,
    /// Imports that are not host functions of the ABI, as `module::name`.
    unsupported_imports: Vec<String>,
    memories: Vec<wasmparser::MemoryType>,
    /// Index and type of each mutable global.
    mutable_globals: Vec<(u32, wasmparser::ValType)>,
    exports: Vec<(String, ExternalKind, u32)>,
}

impl Survey {
    fn of(binary: &[u8]) -> Result<Self, PrepareError> {
        let malformed = |e: wasmparser::BinaryReaderError| PrepareError::Malformed(e.to_string());
        let mut survey = Self::default();
        for payload in Parser::new(0).parse_all(binary) {
            match payload.map_err(malformed)? {
                Payload::Version { encoding: Encoding::Component, .. } => {
                    return Err(PrepareError::Unsupported("a task is a core module, not a component".into()));
                }
                Payload::TypeSection(reader) => {
                    for group in reader {
                        for ty in group.map_err(malformed)?.into_types() {
                            survey.types.push(match ty.composite_type.inner {
                                CompositeInnerType::Func(f) => Some(f),
                                _ => None,
                            });
                        }
                    }
                }
                Payload::ImportSection(reader) => {
                    for import in reader.into_imports() {
                        let import = import.map_err(malformed)?;
                        match import.ty {
                            TypeRef::Func(ty) | TypeRef::FuncExact(ty)
                                if abi::is_provided(import.module, import.name) =>
                            {
                                survey.funcs.push(ty);
                                survey.imported_funcs += 1;
                            }
                            _ => survey.unsupported_imports.push(format!("{}::{}", import.module, import.name)),
                        }
                    }
                }
                Payload::FunctionSection(reader) => {
                    for ty in reader {
                        survey.funcs.push(ty.map_err(malformed)?);
                    }
                }
                Payload::MemorySection(reader) => {
                    for memory in reader {
                        survey.memories.push(memory.map_err(malformed)?);
                    }
                }
                Payload::GlobalSection(reader) => {
                    // Imported globals are refused with the imports, so local index = global index.
                    for (index, global) in reader.into_iter().enumerate() {
                        let ty = global.map_err(malformed)?.ty;
                        if ty.mutable {
                            survey.mutable_globals.push((index as u32, ty.content_type));
                        }
                    }
                }
                Payload::ExportSection(reader) => {
                    for export in reader {
                        let export = export.map_err(malformed)?;
                        survey.exports.push((export.name.to_owned(), export.kind, export.index));
                    }
                }
                _ => {}
            }
        }
        Ok(survey)
    }

    /// The task ABI and what a checkpoint can capture.
    fn check(&self) -> Result<(), PrepareError> {
        if !self.unsupported_imports.is_empty() {
            return Err(PrepareError::Unsupported(format!(
                "imports that hubmesh does not provide: {} (see docs/task-abi.md for the host functions)",
                self.unsupported_imports.join(", ")
            )));
        }
        let [memory] = self.memories.as_slice() else {
            return Err(PrepareError::Unsupported(format!(
                "a task needs exactly one memory, this module has {}",
                self.memories.len()
            )));
        };
        if memory.shared || memory.memory64 {
            return Err(PrepareError::Unsupported("shared and 64-bit memories cannot be checkpointed".into()));
        }
        if memory.page_size_log2.is_some_and(|log2| log2 != 16) {
            return Err(PrepareError::Unsupported("memories with custom page sizes cannot be checkpointed".into()));
        }
        if !self.exports.iter().any(|e| e.0 == abi::INVOKE_EXPORT) {
            return Err(PrepareError::Unsupported(format!(
                "the module does not export `{}` (see docs/task-abi.md)",
                abi::INVOKE_EXPORT
            )));
        }
        use wasmparser::ValType::{F32, F64, I32, I64};
        self.check_export_type(abi::INVOKE_EXPORT, &[I32], &[I32])?;
        if self.exports.iter().any(|e| e.0 == abi::TICK_EXPORT) {
            self.check_export_type(abi::TICK_EXPORT, &[], &[])?;
        }
        if let Some((_, ty)) = self.mutable_globals.iter().find(|(_, ty)| !matches!(ty, I32 | I64 | F32 | F64)) {
            return Err(PrepareError::Unsupported(format!("mutable globals of type {ty:?} cannot be checkpointed")));
        }
        Ok(())
    }

    fn check_export_type(
        &self,
        name: &str,
        params: &[wasmparser::ValType],
        results: &[wasmparser::ValType],
    ) -> Result<(), PrepareError> {
        let export = self.exports.iter().find(|e| e.0 == name).expect("checked: the export exists");
        if export.1 != ExternalKind::Func {
            return Err(PrepareError::Unsupported(format!("`{name}` must be a function")));
        }
        if export.2 < self.imported_funcs {
            return Err(PrepareError::Unsupported(format!("`{name}` must be defined by the module, not imported")));
        }
        let ty = self.func_type(export.2);
        if ty.params() != params || ty.results() != results {
            return Err(PrepareError::Unsupported(format!(
                "`{name}` must have type {params:?} -> {results:?}, found {:?} -> {:?}",
                ty.params(),
                ty.results()
            )));
        }
        Ok(())
    }

    /// The type of function `index` (the module validated, so it exists and is a function type).
    fn func_type(&self, index: u32) -> &FuncType {
        self.types[self.funcs[index as usize] as usize].as_ref().expect("validated: a function has a function type")
    }
}

/// Why the rewrite refused a module.
#[derive(Debug)]
struct Refusal(String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The second pass: re-encodes the module with the dirty map, `hm_mark_range`, the exports and
/// every store into the task's memory marked.
struct Rewrite<'s> {
    survey: &'s Survey,
    /// Index of `hm_mark_range`'s type (appended to the types).
    mark_type: u32,
    /// Index of `hm_mark_range` (appended to the functions).
    mark_func: u32,
    /// How many function bodies were rewritten so far.
    next_body: u32,
}

type ReencodeResult = Result<(), reencode::Error<Refusal>>;

impl Reencode for Rewrite<'_> {
    type Error = Refusal;

    fn parse_type_section(
        &mut self,
        types: &mut wasm_encoder::TypeSection,
        section: wasmparser::TypeSectionReader<'_>,
    ) -> ReencodeResult {
        reencode::utils::parse_type_section(self, types, section)?;
        types.ty().function([ValType::I32, ValType::I32], []);
        Ok(())
    }

    fn parse_function_section(
        &mut self,
        functions: &mut wasm_encoder::FunctionSection,
        section: wasmparser::FunctionSectionReader<'_>,
    ) -> ReencodeResult {
        reencode::utils::parse_function_section(self, functions, section)?;
        functions.function(self.mark_type);
        Ok(())
    }

    fn parse_memory_section(
        &mut self,
        memories: &mut wasm_encoder::MemorySection,
        section: wasmparser::MemorySectionReader<'_>,
    ) -> ReencodeResult {
        reencode::utils::parse_memory_section(self, memories, section)?;
        memories.memory(MemoryType {
            minimum: DIRTY_PAGES,
            maximum: Some(DIRTY_PAGES),
            memory64: false,
            shared: false,
            page_size_log2: None,
        });
        Ok(())
    }

    fn parse_export_section(
        &mut self,
        exports: &mut wasm_encoder::ExportSection,
        section: wasmparser::ExportSectionReader<'_>,
    ) -> ReencodeResult {
        reencode::utils::parse_export_section(self, exports, section)?;
        exports.export(DIRTY_EXPORT, ExportKind::Memory, DIRTY_MEMORY);
        exports.export(MEMORY_EXPORT, ExportKind::Memory, TASK_MEMORY);
        for (index, _) in &self.survey.mutable_globals {
            exports.export(&format!("{GLOBAL_PREFIX}{index}"), ExportKind::Global, *index);
        }
        Ok(())
    }

    fn parse_code_section(
        &mut self,
        code: &mut CodeSection,
        section: wasmparser::CodeSectionReader<'_>,
    ) -> ReencodeResult {
        reencode::utils::parse_code_section(self, code, section)?;
        code.function(&mark_range_body());
        Ok(())
    }

    fn parse_function_body(&mut self, code: &mut CodeSection, body: wasmparser::FunctionBody<'_>) -> ReencodeResult {
        let index = self.survey.imported_funcs + self.next_body;
        self.next_body += 1;
        let mut locals = Vec::new();
        let mut declared = self.survey.func_type(index).params().len() as u32;
        for pair in body.get_locals_reader()? {
            let (count, ty) = pair?;
            declared += count;
            locals.push((count, self.val_type(ty)?));
        }
        let temps = Temps::after(declared);
        locals.extend(Temps::DECLARED);
        let mut function = Function::new(locals);
        let mut reader = body.get_operators_reader()?;
        while !reader.eof() {
            let op = reader.read()?;
            self.mark_before(&mut function, &temps, &op)?;
            function.instruction(&self.instruction(op)?);
        }
        code.function(&function);
        Ok(())
    }
}

impl Rewrite<'_> {
    /// Emits what must run before `op`: marking the pages a write into the task's memory
    /// touches. Refuses what a checkpoint could not capture.
    fn mark_before(&self, out: &mut Function, t: &Temps, op: &Operator<'_>) -> ReencodeResult {
        use Operator as O;
        let store = |out: &mut Function, memarg: &wasmparser::MemArg, width: u64, value: u32| {
            let mut sink = out.instructions();
            sink.local_set(value).local_set(t.addr);
            mark(&mut sink, t.addr, memarg.offset);
            // A store can straddle two pages; mark the page of its last byte too.
            mark(&mut sink, t.addr, memarg.offset + width - 1);
            sink.local_get(t.addr).local_get(value);
        };
        match op {
            O::I32Store { memarg } => store(out, memarg, 4, t.i32v),
            O::I32Store8 { memarg } => store(out, memarg, 1, t.i32v),
            O::I32Store16 { memarg } => store(out, memarg, 2, t.i32v),
            O::I64Store { memarg } => store(out, memarg, 8, t.i64v),
            O::I64Store8 { memarg } => store(out, memarg, 1, t.i64v),
            O::I64Store16 { memarg } => store(out, memarg, 2, t.i64v),
            O::I64Store32 { memarg } => store(out, memarg, 4, t.i64v),
            O::F32Store { memarg } => store(out, memarg, 4, t.f32v),
            O::F64Store { memarg } => store(out, memarg, 8, t.f64v),
            O::V128Store { memarg } => store(out, memarg, 16, t.v128v),
            O::V128Store8Lane { memarg, .. } => store(out, memarg, 1, t.v128v),
            O::V128Store16Lane { memarg, .. } => store(out, memarg, 2, t.v128v),
            O::V128Store32Lane { memarg, .. } => store(out, memarg, 4, t.v128v),
            O::V128Store64Lane { memarg, .. } => store(out, memarg, 8, t.v128v),
            // The bulk operations take `(dst, x, len)`: mark `[dst, dst+len)` first.
            O::MemoryFill { .. } | O::MemoryCopy { .. } | O::MemoryInit { .. } => {
                out.instructions()
                    .local_set(t.b)
                    .local_set(t.a)
                    .local_set(t.addr)
                    .local_get(t.addr)
                    .local_get(t.b)
                    .call(self.mark_func)
                    .local_get(t.addr)
                    .local_get(t.a)
                    .local_get(t.b);
            }
            O::TableSet { .. }
            | O::TableGrow { .. }
            | O::TableFill { .. }
            | O::TableCopy { .. }
            | O::TableInit { .. } => {
                return Err(reencode::Error::UserError(Refusal(
                    "modules that change their tables at run time cannot be checkpointed".into(),
                )));
            }
            _ => {}
        }
        Ok(())
    }
}

/// `page(addr + offset) := 1` in the dirty map.
fn mark(sink: &mut wasm_encoder::InstructionSink<'_>, addr: u32, offset: u64) {
    sink.local_get(addr)
        .i32_const(offset as u32 as i32)
        .i32_add()
        .i32_const(16)
        .i32_shr_u()
        .i32_const(1)
        .i32_store8(MemArg { offset: 0, align: 0, memory_index: DIRTY_MEMORY });
}

/// `hm_mark_range(dst: i32, len: i32)`: marks every page of `[dst, dst+len)` dirty.
fn mark_range_body() -> Function {
    let (dst, len, page, last) = (0, 1, 2, 3);
    let byte = MemArg { offset: 0, align: 0, memory_index: DIRTY_MEMORY };
    let mut f = Function::new([(2, ValType::I32)]);
    f.instructions()
        .local_get(len)
        .i32_eqz()
        .if_(BlockType::Empty)
        .return_()
        .end()
        .local_get(dst)
        .i32_const(16)
        .i32_shr_u()
        .local_set(page)
        .local_get(dst)
        .local_get(len)
        .i32_add()
        .i32_const(1)
        .i32_sub()
        .i32_const(16)
        .i32_shr_u()
        .local_set(last)
        .loop_(BlockType::Empty)
        .local_get(page)
        .i32_const(1)
        .i32_store8(byte)
        .local_get(page)
        .i32_const(1)
        .i32_add()
        .local_tee(page)
        .local_get(last)
        .i32_le_u()
        .br_if(0)
        .end()
        .end();
    f
}

/// Scratch locals of one function, declared after its own: one per value type a store takes.
struct Temps {
    addr: u32,
    a: u32,
    b: u32,
    i32v: u32,
    i64v: u32,
    f32v: u32,
    f64v: u32,
    v128v: u32,
}

impl Temps {
    /// Their declaration, in the order of [`Temps::after`]'s indices.
    const DECLARED: [(u32, ValType); 5] =
        [(4, ValType::I32), (1, ValType::I64), (1, ValType::F32), (1, ValType::F64), (1, ValType::V128)];

    /// The temps of a function whose parameters and locals number `declared`.
    fn after(declared: u32) -> Self {
        let n = declared;
        Self { addr: n, a: n + 1, b: n + 2, i32v: n + 3, i64v: n + 4, f32v: n + 5, f64v: n + 6, v128v: n + 7 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_garbage_and_missing_entry() {
        assert!(matches!(instrument(b"\0asm garbage"), Err(PrepareError::Malformed(_))));
        assert!(matches!(instrument(b"(module"), Err(PrepareError::Malformed(_))));
        let no_entry = b"(module (memory 1))";
        assert!(matches!(instrument(no_entry), Err(PrepareError::Unsupported(m)) if m.contains("hm_invoke")));
    }

    #[test]
    fn refuses_unknown_imports_and_table_mutation() {
        let import = br#"(module (import "env" "open" (func)) (memory 1)
            (func (export "hm_invoke") (param i32) (result i32) i32.const 0))"#;
        assert!(matches!(instrument(import), Err(PrepareError::Unsupported(m)) if m.contains("env::open")));
        let table = br#"(module (memory 1) (table 1 funcref)
            (func (export "hm_invoke") (param i32) (result i32) (table.set 0 (i32.const 0) (ref.null func)) i32.const 0))"#;
        assert!(matches!(instrument(table), Err(PrepareError::Unsupported(m)) if m.contains("tables")));
    }

    #[test]
    fn exports_globals_memory_and_dirty_map() {
        let m = br#"(module (memory 1) (global $g (mut i32) (i32.const 7)) (global i32 (i32.const 1))
            (func (export "hm_invoke") (param i32) (result i32)
              (i32.store (i32.const 70000) (i32.const 1)) (global.set $g (i32.const 2)) i32.const 0))"#;
        let (out, facts) = instrument(m).unwrap();
        assert_eq!(facts.mutable_globals, 1);
        let names = export_names(&out);
        for want in ["hm_invoke", MEMORY_EXPORT, DIRTY_EXPORT, "hm:g0"] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
    }

    #[test]
    fn refuses_atomics_and_extra_memories() {
        let atomic = br#"(module (memory 1)
            (func (export "hm_invoke") (param i32) (result i32) (i32.atomic.store (i32.const 0) (i32.const 1)) i32.const 0))"#;
        assert!(matches!(instrument(atomic), Err(PrepareError::Unsupported(m)) if m.contains("atomic")));
        let two = br#"(module (memory 1) (memory 1) (func (export "hm_invoke") (param i32) (result i32) i32.const 0))"#;
        assert!(matches!(instrument(two), Err(PrepareError::Unsupported(m)) if m.contains("exactly one memory")));
        let imported = br#"(module (import "hubmesh" "input" (func $input (param i32) (result i32))) (memory 1)
            (export "hm_invoke" (func $input)))"#;
        assert!(
            matches!(instrument(imported), Err(PrepareError::Unsupported(m)) if m.contains("defined by the module"))
        );
    }

    /// Runs the instrumented module in wasmtime and reads the dirty map back: every kind of
    /// write into the task's memory must mark the page(s) it touched, and nothing else.
    #[test]
    fn every_kind_of_write_marks_its_pages() {
        let m = br#"(module (memory 16) (data $d "abc")
            (func $f (param i32) (result i32)
              (i32.store (i32.const 65534) (i32.const -1))
              (i64.store8 (i32.const 0x20000) (i64.const 1))
              (f64.store offset=0x30000 (i32.const 0) (f64.const 1))
              (v128.store (i32.const 0x40000) (v128.const i64x2 1 2))
              (v128.store64_lane 1 (i32.const 0x50000) (v128.const i64x2 1 2))
              (memory.fill (i32.const 0x6fff0) (i32.const 7) (i32.const 0x20))
              (memory.copy (i32.const 0x90000) (i32.const 0) (i32.const 4))
              (memory.init $d (i32.const 0xa0000) (i32.const 0) (i32.const 3))
              (memory.fill (i32.const 0xc0000) (i32.const 7) (i32.const 0))
              local.get 0)
            (export "hm_invoke" (func $f)))"#;
        let (out, _) = instrument(m).unwrap();
        let mut config = wasmtime::Config::new();
        config.wasm_multi_memory(true);
        let engine = wasmtime::Engine::new(&config).unwrap();
        let module = wasmtime::Module::new(&engine, &out).unwrap();
        let mut store = wasmtime::Store::new(&engine, ());
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        let invoke = instance.get_typed_func::<i32, i32>(&mut store, "hm_invoke").unwrap();
        assert_eq!(invoke.call(&mut store, 5).unwrap(), 5);
        let dirty = instance.get_memory(&mut store, DIRTY_EXPORT).unwrap();
        let marked: Vec<usize> =
            dirty.data(&store)[..16].iter().enumerate().filter(|(_, b)| **b != 0).map(|(p, _)| p).collect();
        // 0 and 1: the straddling i32 store; 6 and 7: the fill across a page boundary; the empty
        // fill at page 12 marks nothing.
        assert_eq!(marked, vec![0, 1, 2, 3, 4, 5, 6, 7, 9, 10]);
    }

    fn export_names(binary: &[u8]) -> Vec<String> {
        let mut names = Vec::new();
        for payload in Parser::new(0).parse_all(binary) {
            if let Payload::ExportSection(reader) = payload.unwrap() {
                names.extend(reader.into_iter().map(|e| e.unwrap().name.to_owned()));
            }
        }
        names
    }
}
