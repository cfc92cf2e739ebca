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

use std::collections::BTreeSet;

use walrus::ir::{
    BinaryOp, Binop, Call, Const, Instr, InstrSeq, LocalGet, LocalSet, MemArg, MemoryCopy, MemoryFill, MemoryInit,
    Store, StoreKind, Value, VisitorMut,
};
use walrus::{ExportItem, FunctionBuilder, FunctionId, FunctionKind, GlobalKind, LocalId, MemoryId, Module, ValType};

use super::abi;

/// Size of a checkpoint page: one wasm page.
/// Export name of the task's memory after instrumentation.
pub(crate) const MEMORY_EXPORT: &str = "hm:memory";
/// Export name of the dirty-page map.
pub(crate) const DIRTY_EXPORT: &str = "hm:dirty";
/// Prefix of the exported mutable globals.
pub(crate) const GLOBAL_PREFIX: &str = "hm:g";
/// Pages of the dirty map: one byte for each of the 65,536 pages of a 4 GiB memory, plus one
/// page so that a store that straddles the last page's end still lands in bounds.
const DIRTY_PAGES: u64 = 2;

/// Why a module was refused.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// Not WebAssembly (or WAT) at all.
    #[error("not a WebAssembly module: {0}")]
    Malformed(String),
    /// Valid WebAssembly that hubmesh cannot run or checkpoint.
    #[error("unsupported module: {0}")]
    Unsupported(String),
}

/// What the rewriting learned about a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModuleFacts {
    pub(crate) has_tick: bool,
    pub(crate) has_initialize: bool,
    pub(crate) mutable_globals: u32,
}

/// Parses `source` (binary or text), checks it against the task ABI and returns the
/// instrumented binary.
pub(crate) fn instrument(source: &[u8]) -> Result<(Vec<u8>, ModuleFacts), PrepareError> {
    let binary = wat::parse_bytes(source).map_err(|e| PrepareError::Malformed(e.to_string()))?;
    let mut config = walrus::ModuleConfig::new();
    config.generate_producers_section(false).generate_name_section(true);
    let mut module = config.parse(&binary).map_err(|e| PrepareError::Malformed(format!("{e:#}")))?;

    check_imports(&module)?;
    let memory = task_memory(&module)?;
    let exports: BTreeSet<String> = module.exports.iter().map(|e| e.name.clone()).collect();
    if !exports.contains(abi::INVOKE_EXPORT) {
        return Err(PrepareError::Unsupported(format!(
            "the module does not export `{}` (see docs/task-abi.md)",
            abi::INVOKE_EXPORT
        )));
    }
    check_export_type(&module, abi::INVOKE_EXPORT, &[ValType::I32], &[ValType::I32])?;
    let has_tick = exports.contains(abi::TICK_EXPORT);
    if has_tick {
        check_export_type(&module, abi::TICK_EXPORT, &[], &[])?;
    }
    let has_initialize = exports.contains(abi::INITIALIZE_EXPORT);

    let dirty = module.memories.add_local(false, false, DIRTY_PAGES, Some(DIRTY_PAGES), None);
    module.exports.add(DIRTY_EXPORT, dirty);
    module.exports.add(MEMORY_EXPORT, memory);
    let mutable_globals = export_mutable_globals(&mut module)?;
    let mark_range = add_mark_range(&mut module, dirty);

    let ids: Vec<FunctionId> = module.funcs.iter_local().map(|(id, _)| id).collect();
    for id in ids {
        if id == mark_range {
            continue;
        }
        let temps = Temps::new(&mut module);
        let FunctionKind::Local(func) = &mut module.funcs.get_mut(id).kind else { continue };
        let mut rewriter = Rewriter { memory, dirty, mark_range, temps, refused: None };
        let entry = func.entry_block();
        walrus::ir::dfs_pre_order_mut(&mut rewriter, func, entry);
        if let Some(reason) = rewriter.refused {
            return Err(PrepareError::Unsupported(reason));
        }
    }
    let out = module.emit_wasm();
    Ok((out, ModuleFacts { has_tick, has_initialize, mutable_globals }))
}

fn check_imports(module: &Module) -> Result<(), PrepareError> {
    let mut unsupported = Vec::new();
    for import in module.imports.iter() {
        let known = match import.kind {
            walrus::ImportKind::Function(_) => abi::is_provided(&import.module, &import.name),
            _ => false,
        };
        if !known {
            unsupported.push(format!("{}::{}", import.module, import.name));
        }
    }
    if unsupported.is_empty() {
        Ok(())
    } else {
        Err(PrepareError::Unsupported(format!(
            "imports that hubmesh does not provide: {} (see docs/task-abi.md for the host functions)",
            unsupported.join(", ")
        )))
    }
}

fn task_memory(module: &Module) -> Result<MemoryId, PrepareError> {
    let mems: Vec<_> = module.memories.iter().collect();
    let [mem] = mems.as_slice() else {
        return Err(PrepareError::Unsupported(format!(
            "a task needs exactly one memory, this module has {}",
            mems.len()
        )));
    };
    if mem.shared || mem.memory64 {
        return Err(PrepareError::Unsupported("shared and 64-bit memories cannot be checkpointed".into()));
    }
    Ok(mem.id())
}

fn check_export_type(module: &Module, name: &str, params: &[ValType], results: &[ValType]) -> Result<(), PrepareError> {
    let export = module.exports.iter().find(|e| e.name == name).expect("checked: the export exists");
    let ExportItem::Function(f) = export.item else {
        return Err(PrepareError::Unsupported(format!("`{name}` must be a function")));
    };
    let ty = module.types.get(module.funcs.get(f).ty());
    if ty.params() != params || ty.results() != results {
        return Err(PrepareError::Unsupported(format!(
            "`{name}` must have type {params:?} -> {results:?}, found {:?} -> {:?}",
            ty.params(),
            ty.results()
        )));
    }
    Ok(())
}

fn export_mutable_globals(module: &mut Module) -> Result<u32, PrepareError> {
    let mut found = Vec::new();
    for (n, g) in module.globals.iter().enumerate() {
        if !g.mutable {
            continue;
        }
        if matches!(g.kind, GlobalKind::Import(_)) {
            return Err(PrepareError::Unsupported("imported mutable globals cannot be checkpointed".into()));
        }
        if !matches!(g.ty, ValType::I32 | ValType::I64 | ValType::F32 | ValType::F64) {
            return Err(PrepareError::Unsupported(format!(
                "mutable globals of type {:?} cannot be checkpointed",
                g.ty
            )));
        }
        found.push((n, g.id()));
    }
    for (n, id) in &found {
        module.exports.add(&format!("{GLOBAL_PREFIX}{n}"), *id);
    }
    Ok(found.len() as u32)
}

/// Adds `hm_mark_range(dst: i32, len: i32)`: marks every page of `[dst, dst+len)` dirty.
fn add_mark_range(module: &mut Module, dirty: MemoryId) -> FunctionId {
    let dst = module.locals.add(ValType::I32);
    let len = module.locals.add(ValType::I32);
    let page = module.locals.add(ValType::I32);
    let last = module.locals.add(ValType::I32);
    let mut b = FunctionBuilder::new(&mut module.types, &[ValType::I32, ValType::I32], &[]);
    let byte = MemArg { align: 1, offset: 0 };
    b.func_body()
        .local_get(len)
        .unop(walrus::ir::UnaryOp::I32Eqz)
        .if_else(
            None,
            |then| {
                then.return_();
            },
            |_| {},
        )
        .local_get(dst)
        .i32_const(16)
        .binop(BinaryOp::I32ShrU)
        .local_set(page)
        .local_get(dst)
        .local_get(len)
        .binop(BinaryOp::I32Add)
        .i32_const(1)
        .binop(BinaryOp::I32Sub)
        .i32_const(16)
        .binop(BinaryOp::I32ShrU)
        .local_set(last)
        .loop_(None, |body| {
            let top = body.id();
            body.local_get(page)
                .i32_const(1)
                .store(dirty, StoreKind::I32_8 { atomic: false }, byte)
                .local_get(page)
                .i32_const(1)
                .binop(BinaryOp::I32Add)
                .local_tee(page)
                .local_get(last)
                .binop(BinaryOp::I32LeU)
                .br_if(top);
        });
    b.finish(vec![dst, len], &mut module.funcs)
}

/// Scratch locals of one function, one per value type a store can take.
struct Temps {
    addr: LocalId,
    a: LocalId,
    b: LocalId,
    i32v: LocalId,
    i64v: LocalId,
    f32v: LocalId,
    f64v: LocalId,
    v128v: LocalId,
}

impl Temps {
    fn new(module: &mut Module) -> Self {
        let mut add = |t| module.locals.add(t);
        Self {
            addr: add(ValType::I32),
            a: add(ValType::I32),
            b: add(ValType::I32),
            i32v: add(ValType::I32),
            i64v: add(ValType::I64),
            f32v: add(ValType::F32),
            f64v: add(ValType::F64),
            v128v: add(ValType::V128),
        }
    }

    fn for_store(&self, kind: StoreKind) -> LocalId {
        match kind {
            StoreKind::I32 { .. } | StoreKind::I32_8 { .. } | StoreKind::I32_16 { .. } => self.i32v,
            StoreKind::I64 { .. } | StoreKind::I64_8 { .. } | StoreKind::I64_16 { .. } | StoreKind::I64_32 { .. } => {
                self.i64v
            }
            StoreKind::F32 => self.f32v,
            StoreKind::F64 => self.f64v,
            StoreKind::V128 => self.v128v,
        }
    }
}

struct Rewriter {
    memory: MemoryId,
    dirty: MemoryId,
    mark_range: FunctionId,
    temps: Temps,
    refused: Option<String>,
}

fn get(local: LocalId) -> Instr {
    Instr::LocalGet(LocalGet { local })
}

fn set(local: LocalId) -> Instr {
    Instr::LocalSet(LocalSet { local })
}

fn i32c(v: i32) -> Instr {
    Instr::Const(Const { value: Value::I32(v) })
}

fn binop(op: BinaryOp) -> Instr {
    Instr::Binop(Binop { op })
}

impl Rewriter {
    /// `page(addr + offset) := 1` in the dirty map.
    fn mark(&self, out: &mut Vec<Instr>, offset: u64) {
        out.push(get(self.temps.addr));
        out.push(i32c(offset as u32 as i32));
        out.push(binop(BinaryOp::I32Add));
        out.push(i32c(16));
        out.push(binop(BinaryOp::I32ShrU));
        out.push(i32c(1));
        out.push(Instr::Store(Store {
            memory: self.dirty,
            kind: StoreKind::I32_8 { atomic: false },
            arg: MemArg { align: 1, offset: 0 },
        }));
    }

    fn rewrite(&mut self, instr: Instr) -> Vec<Instr> {
        match instr {
            Instr::Store(s) if s.memory == self.memory => {
                if s.kind.atomic() {
                    self.refused = Some("atomic stores (threads) are not supported".into());
                }
                let value = self.temps.for_store(s.kind);
                let mut out = vec![set(value), set(self.temps.addr)];
                self.mark(&mut out, s.arg.offset);
                // A store can straddle two pages; mark the page of its last byte too.
                self.mark(&mut out, s.arg.offset + u64::from(s.kind.width()) - 1);
                out.extend([get(self.temps.addr), get(value), Instr::Store(s)]);
                out
            }
            Instr::MemoryFill(f) if f.memory == self.memory => {
                self.ranged(Instr::MemoryFill(MemoryFill { memory: f.memory }))
            }
            Instr::MemoryCopy(c) if c.dst == self.memory => {
                self.ranged(Instr::MemoryCopy(MemoryCopy { src: c.src, dst: c.dst }))
            }
            Instr::MemoryInit(i) if i.memory == self.memory => {
                self.ranged(Instr::MemoryInit(MemoryInit { memory: i.memory, data: i.data }))
            }
            Instr::AtomicRmw(_) | Instr::Cmpxchg(_) | Instr::AtomicWait(_) | Instr::AtomicNotify(_) => {
                self.refused = Some("atomic instructions (threads) are not supported".into());
                vec![instr]
            }
            Instr::TableSet(_)
            | Instr::TableGrow(_)
            | Instr::TableFill(_)
            | Instr::TableCopy(_)
            | Instr::TableInit(_) => {
                self.refused = Some("modules that change their tables at run time cannot be checkpointed".into());
                vec![instr]
            }
            other => vec![other],
        }
    }

    /// For the three-operand bulk ops `(dst, x, len)`: mark `[dst, dst+len)` first.
    fn ranged(&self, op: Instr) -> Vec<Instr> {
        let t = &self.temps;
        vec![
            set(t.b),
            set(t.a),
            set(t.addr),
            get(t.addr),
            get(t.b),
            Instr::Call(Call { func: self.mark_range }),
            get(t.addr),
            get(t.a),
            get(t.b),
            op,
        ]
    }
}

impl VisitorMut for Rewriter {
    fn start_instr_seq_mut(&mut self, seq: &mut InstrSeq) {
        let old = std::mem::take(&mut seq.instrs);
        let mut new = Vec::with_capacity(old.len());
        for (instr, loc) in old {
            for i in self.rewrite(instr) {
                new.push((i, loc));
            }
        }
        seq.instrs = new;
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
        let parsed = Module::from_buffer(&out).unwrap();
        let names: Vec<_> = parsed.exports.iter().map(|e| e.name.as_str()).collect();
        for want in ["hm_invoke", MEMORY_EXPORT, DIRTY_EXPORT, "hm:g0"] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
    }
}
