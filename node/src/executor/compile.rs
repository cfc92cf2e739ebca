//! Preparing a module (WAT parsing, instrumentation) and compiling it: in `hubmesh-compile`, a
//! separate program the hub starts for each module, or (with the `compiler` feature) in this
//! process.
//!
//! A serving hub compiles in `hubmesh-compile`: the code of the WAT parser, the validator, the
//! re-encoder and cranelift (a quarter of a hub that links them) and their heap never become the
//! hub's resident memory; a module that makes the compiler slow is killed at a deadline instead of
//! holding a thread; a compiler crash costs one deploy, not the hub. A hub built without the
//! `compiler` feature (the small-board build) has none of that code at all, and so cannot start
//! without the program; a hub built with it compiles in its own process when the program is
//! missing. The program is looked for once, at start: `$HUBMESH_COMPILER` if set, else beside
//! the hub's binary, else in `../libexec/hubmesh/` from it (the package's layout). It must be of
//! the same build (`HUBMESH_BUILD_ID`, node/build.rs: the version and a hash of the files that
//! decide what a compiled module looks like; checked by the program on every run) and produce
//! artefacts this hub's engine loads (checked at start with an empty module, and by
//! `Module::deserialize` on every load); its engine has the hub's settings without the instance
//! pool (`engine::build_for_compiling`). A program of another build (say, upgraded under a running hub)
//! refuses; a hub with the `compiler` feature then compiles in its own process, one without
//! answers that a restart is needed.
//!
//! Protocol: the parent writes the input to the child's stdin and closes it.
//! - `hubmesh-compile`: input = instrumented wasm; output = wasmtime's serialized artefact.
//! - `hubmesh-compile --instrument`: input = the uploaded module (wasm or WAT); output =
//!   [`FRAME_MAGIC`], flags (1: has `hm_tick`, 2: has `_initialize`), the mutable-global count
//!   (u32 LE), the instrumented wasm's length (u64 LE), the wasm, then the artefact.
//!
//! Exit status 0: the output is complete. 1: the compiler refused the module, 3: it is not
//! WebAssembly, 4: hubmesh cannot run it (instrumentation's refusal), 5: the program is of another
//! build than the hub; the reason is on stderr. Any other end (a signal, another status) is
//! the child's own failure.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use wasmtime::{Engine, Module};

#[cfg(feature = "compiler")]
use super::engine;
#[cfg(all(test, feature = "compiler"))]
use super::engine::EngineLimits;
#[cfg(feature = "compiler")]
use super::instrument;
use super::prepared::{ModuleFacts, PrepareError};

/// The compiler program's file name.
pub(crate) const PROGRAM: &str = "hubmesh-compile";
/// Where the compiler program is looked for instead, if set.
pub(crate) const PROGRAM_ENV: &str = "HUBMESH_COMPILER";
/// What the hub and the program must agree on (see the module doc).
pub const BUILD_ID: &str = env!("HUBMESH_BUILD_ID");
/// How long a child may take for one module.
const CHILD_BUDGET: Duration = Duration::from_secs(120);
/// The most of a child's stderr kept for the error message.
const STDERR_KEPT: u64 = 16 * 1024;
/// The smallest module: what the start-up check compiles.
const EMPTY_MODULE: &[u8] = b"\0asm\x01\0\0\0";
/// First bytes of an `--instrument` answer.
const FRAME_MAGIC: &[u8; 4] = b"HMC1";
/// Exit statuses of the child (see the module doc).
const EXIT_REFUSED: u8 = 1;
const EXIT_MALFORMED: u8 = 3;
const EXIT_UNSUPPORTED: u8 = 4;
const EXIT_OTHER_BUILD: u8 = 5;

/// Why a module did not compile.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The compiler refused the module.
    #[error("{0}")]
    Refused(String),
    /// The compiler process failed (died, timed out, could not be talked to).
    #[error("the compiler process failed: {0}")]
    Child(String),
    /// The compiler program is of another build than this hub.
    #[error("{0}")]
    OtherBuild(String),
}

impl From<CompileError> for PrepareError {
    fn from(e: CompileError) -> Self {
        match e {
            CompileError::Refused(reason) => Self::Unsupported(reason),
            CompileError::Child(_) => Self::Compiler(e.to_string()),
            CompileError::OtherBuild(reason) => Self::CompilerBuild(reason),
        }
    }
}

/// No usable compiler program was found at start.
#[derive(Debug, thiserror::Error)]
#[error("no module compiler: {reason} (install {PROGRAM} with the hub, or set {PROGRAM_ENV})")]
pub struct NoCompiler {
    reason: String,
}

/// Where modules are prepared and compiled.
#[derive(Debug, Clone)]
pub enum Compiler {
    /// In this process (tests, benches, embedders; a hub whose compiler program is missing).
    #[cfg(feature = "compiler")]
    InProcess,
    /// In the compiler program (see the module doc); made by [`Compiler::for_hub`] only, since
    /// its output goes to `Module::deserialize`.
    Child(ChildCompiler),
}

/// The compiler program.
#[derive(Debug, Clone)]
pub struct ChildCompiler {
    program: PathBuf,
}

/// A compiled module, with its serialized artefact when a child produced it.
pub(crate) struct Compiled {
    pub(crate) module: Module,
    pub(crate) artefact: Option<Vec<u8>>,
}

impl Compiler {
    /// The compiler of a hub whose engine is `engine`: the compiler program, found as the module
    /// doc says, if it compiles an empty module into an artefact `engine` loads. Without one, a
    /// hub with the `compiler` feature compiles in its own process (with a warning); one without
    /// it cannot compile, and this says why.
    pub fn for_hub(engine: &Engine) -> Result<Self, NoCompiler> {
        match ChildCompiler::find(engine) {
            Ok(child) => {
                tracing::info!(program = %child.program.display(), "module compiler");
                Ok(Self::Child(child))
            }
            #[cfg(feature = "compiler")]
            Err(e) => {
                tracing::warn!(error = %e, "compiling modules in the hub's own process");
                Ok(Self::InProcess)
            }
            #[cfg(not(feature = "compiler"))]
            Err(e) => Err(e),
        }
    }

    /// Compiles the instrumented module `wasm` for `engine`.
    pub(crate) fn compile(&self, engine: &Engine, wasm: &[u8]) -> Result<Compiled, CompileError> {
        let started = std::time::Instant::now();
        let compiled = match self {
            #[cfg(feature = "compiler")]
            Self::InProcess => in_process(engine, wasm),
            Self::Child(child) => match run_child(child, false, wasm) {
                Ok(artefact) => load(engine, artefact),
                Err(e) => match compile_failure(e) {
                    #[cfg(feature = "compiler")]
                    CompileError::OtherBuild(reason) => {
                        other_build(&reason);
                        return Self::InProcess.compile(engine, wasm);
                    }
                    e => Err(e),
                },
            },
        };
        count(&compiled, started);
        compiled
    }

    /// Instruments the uploaded `source` (wasm or WAT) and compiles the result for `engine`.
    pub(crate) fn prepare(
        &self,
        engine: &Engine,
        source: &[u8],
    ) -> Result<(Vec<u8>, ModuleFacts, Compiled), PrepareError> {
        let child = match self {
            #[cfg(feature = "compiler")]
            Self::InProcess => {
                let (wasm, facts) = instrument::instrument(source)?;
                let compiled = self.compile(engine, &wasm)?;
                return Ok((wasm, facts, compiled));
            }
            Self::Child(child) => child,
        };
        let started = std::time::Instant::now();
        let answer = match run_child(child, true, source) {
            Ok(answer) => answer,
            Err(e) => match prepare_failure(e) {
                #[cfg(feature = "compiler")]
                PrepareError::CompilerBuild(reason) => {
                    other_build(&reason);
                    return Self::InProcess.prepare(engine, source);
                }
                e => return Err(e),
            },
        };
        let (wasm, facts, artefact) =
            decode_frame(answer).ok_or_else(|| CompileError::Child("its answer is not a prepared module".into()))?;
        let compiled = load(engine, artefact);
        count(&compiled, started);
        Ok((wasm, facts, compiled?))
    }
}

impl ChildCompiler {
    /// The program where the module doc says, if it passes the start-up check.
    fn find(engine: &Engine) -> Result<Self, NoCompiler> {
        let candidates = match std::env::var_os(PROGRAM_ENV) {
            Some(path) => vec![PathBuf::from(path)],
            None => {
                let exe = std::env::current_exe()
                    .map_err(|e| NoCompiler { reason: format!("cannot tell where this binary is: {e}") })?;
                let dir = exe.parent().unwrap_or(Path::new("/"));
                vec![dir.join(PROGRAM), dir.join("../libexec/hubmesh").join(PROGRAM)]
            }
        };
        Self::find_in(candidates, engine)
    }

    /// The first of `candidates` that exists, if it passes the start-up check.
    fn find_in(candidates: Vec<PathBuf>, engine: &Engine) -> Result<Self, NoCompiler> {
        let Some(program) = candidates.iter().find(|p| p.is_file()) else {
            let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            return Err(NoCompiler { reason: format!("{PROGRAM} is not at {}", looked.join(" or ")) });
        };
        let child = Self { program: program.clone() };
        child.check(engine).map_err(|reason| NoCompiler { reason: format!("{}: {reason}", program.display()) })?;
        Ok(child)
    }

    /// Compiles the empty module and loads the artefact into the hub's `engine`.
    fn check(&self, engine: &Engine) -> Result<(), String> {
        let artefact = run_child(self, false, EMPTY_MODULE).map_err(|e| e.to_string())?;
        load(engine, artefact).map(drop).map_err(|e| format!("the empty module it compiled: {e}"))
    }
}

/// What a failed run of the program without `--instrument` means (see the module doc).
fn compile_failure(e: ChildError) -> CompileError {
    match e {
        ChildError::Exit { code: EXIT_REFUSED, reason } => CompileError::Refused(reason),
        ChildError::Exit { code: EXIT_OTHER_BUILD, reason } => CompileError::OtherBuild(reason),
        e => CompileError::Child(e.to_string()),
    }
}

/// What a failed run of the program with `--instrument` means: the two refusals of
/// instrumentation, else what [`compile_failure`] says.
fn prepare_failure(e: ChildError) -> PrepareError {
    match e {
        ChildError::Exit { code: EXIT_MALFORMED, reason } => PrepareError::Malformed(reason),
        ChildError::Exit { code: EXIT_UNSUPPORTED, reason } => PrepareError::Unsupported(reason),
        e => compile_failure(e).into(),
    }
}

/// A program of another build answered (see the module doc): this hub compiles by itself.
#[cfg(feature = "compiler")]
fn other_build(reason: &str) {
    tracing::warn!(reason, "the compiler program is of another build; compiling in the hub");
}

#[cfg(feature = "compiler")]
fn in_process(engine: &Engine, wasm: &[u8]) -> Result<Compiled, CompileError> {
    Module::new(engine, wasm)
        .map(|module| Compiled { module, artefact: None })
        .map_err(|e| CompileError::Refused(format!("{e:?}")))
}

fn load(engine: &Engine, artefact: Vec<u8>) -> Result<Compiled, CompileError> {
    if Engine::detect_precompiled(&artefact).is_none() {
        return Err(CompileError::Child("its output is not a compiled module".into()));
    }
    // SAFETY: the artefact comes from the compiler program of this build (it checks), which
    // passed the start-up check (one of its artefacts loaded into this engine), built its engine
    // with the same `engine::settings`, and wrote it to a pipe only we hold; `deserialize` still
    // refuses one whose wasmtime version, target, flags, tunables or features differ. So what
    // it refuses now is taken to be this module's (memory or tables larger than this hub's pool
    // reserves, as compiling in process would refuse it), not the program's. Not told apart: an
    // mmap that fails for want of memory here, or a program swapped since the check for one of
    // the same build id with other wasmtime features; both leave the task failed until a new
    // version or a restart.
    let module = unsafe { Module::deserialize(engine, &artefact) }
        .map_err(|e| CompileError::Refused(format!("the compiled module does not load on this hub: {e}")))?;
    Ok(Compiled { module, artefact: Some(artefact) })
}

fn count(compiled: &Result<Compiled, CompileError>, started: std::time::Instant) {
    if let Ok(c) = compiled {
        let place = if c.artefact.is_some() { "child" } else { "hub" };
        metrics::counter!("hubmesh_module_compiles_total", "in" => place).increment(1);
        metrics::histogram!("hubmesh_module_compile_seconds").record(started.elapsed().as_secs_f64());
    }
}

#[cfg(feature = "compiler")]
fn encode_frame(wasm: &[u8], facts: &ModuleFacts, artefact: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(17 + wasm.len() + artefact.len());
    out.extend_from_slice(FRAME_MAGIC);
    out.push(u8::from(facts.has_tick) | (u8::from(facts.has_initialize) << 1));
    out.extend_from_slice(&facts.mutable_globals.to_le_bytes());
    out.extend_from_slice(&(wasm.len() as u64).to_le_bytes());
    out.extend_from_slice(wasm);
    out.extend_from_slice(artefact);
    out
}

fn decode_frame(mut frame: Vec<u8>) -> Option<(Vec<u8>, ModuleFacts, Vec<u8>)> {
    let rest = frame.strip_prefix(FRAME_MAGIC)?;
    let (&flags, rest) = rest.split_first()?;
    let (globals, rest) = rest.split_first_chunk::<4>()?;
    let (len, rest) = rest.split_first_chunk::<8>()?;
    let len = usize::try_from(u64::from_le_bytes(*len)).ok()?;
    let wasm = rest.get(..len)?.to_vec();
    let facts = ModuleFacts {
        has_tick: flags & 1 != 0,
        has_initialize: flags & 2 != 0,
        mutable_globals: u32::from_le_bytes(*globals),
    };
    let header = frame.len() - rest.len() + len;
    let artefact = frame.split_off(header);
    Some((wasm, facts, artefact))
}

#[derive(Debug, thiserror::Error)]
enum ChildError {
    #[error("it could not be started: {0}")]
    NotStarted(std::io::Error),
    #[error("it ended with status {code}: {reason}")]
    Exit { code: u8, reason: String },
    #[error("{0}")]
    Other(String),
}

fn run_child(child: &ChildCompiler, instrument: bool, input: &[u8]) -> Result<Vec<u8>, ChildError> {
    let mut command = Command::new(&child.program);
    command.arg("--hub-build").arg(BUILD_ID).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    if instrument {
        command.arg("--instrument");
    }
    let mut child = command.spawn().map_err(ChildError::NotStarted)?;
    let pid = child.id() as libc::pid_t;
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        unreachable!("all three were piped");
    };
    // No thread (a hub at its limit): the child goes, and the threads already started end with
    // it (the writer when its stdin closes, the reader at the end of its stderr). The watchdog
    // starts last, so it never outlives a child reaped here.
    let no_thread = |child: &mut std::process::Child, e: std::io::Error| {
        let _ = child.kill();
        let _ = child.wait();
        ChildError::Other(format!("no thread to talk to it: {e}"))
    };
    let input = input.to_vec();
    let writer = std::thread::Builder::new().spawn(move || stdin.write_all(&input));
    let writer = writer.map_err(|e| no_thread(&mut child, e))?;
    let errors = std::thread::Builder::new().spawn(move || {
        // Read to the end (a child must never block on a full stderr), keep the start.
        let mut text = Vec::new();
        let _ = stderr.by_ref().take(STDERR_KEPT).read_to_end(&mut text);
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        String::from_utf8_lossy(&text).into_owned()
    });
    let errors = errors.map_err(|e| no_thread(&mut child, e))?;
    // The deadline: past it the child is killed, which ends the reads below.
    let (done, watch) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::Builder::new().spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watch.recv_timeout(CHILD_BUDGET) {
            // SAFETY: kill(2) of our own child, which is reaped only after this thread ended.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return true;
        }
        false
    });
    let watchdog = watchdog.map_err(|e| no_thread(&mut child, e))?;
    let mut output = Vec::new();
    let read = stdout.read_to_end(&mut output);
    let _ = done.send(());
    let timed_out = watchdog.join().unwrap_or(false);
    let written = writer.join();
    let reason = errors.join().unwrap_or_default().trim().to_owned();
    let status = child.wait().map_err(|e| ChildError::Other(format!("waiting for it: {e}")))?;
    if timed_out {
        return Err(ChildError::Other(format!("it took longer than {} s and was stopped", CHILD_BUDGET.as_secs())));
    }
    match status.code() {
        Some(0) => {
            read.map_err(|e| ChildError::Other(format!("reading its output: {e}")))?;
            if let Ok(Err(e)) = written {
                return Err(ChildError::Other(format!("sending it the module: {e}")));
            }
            Ok(output)
        }
        Some(code) => Err(ChildError::Exit { code: u8::try_from(code).unwrap_or(u8::MAX), reason }),
        None => Err(ChildError::Other(format!("it ended with {status}: {reason}"))),
    }
}

/// The compiler program's side (`hubmesh-compile`): the input on stdin, the answer on stdout,
/// the exit status and stderr as the module doc says. Returns the exit status.
#[cfg(feature = "compiler")]
pub fn serve_child(instrument: bool, hub_build: &str) -> u8 {
    let fail = |code: u8, reason: &dyn std::fmt::Display| {
        // Not eprintln!: a parent that stopped reading must not turn a refusal into a panic.
        let _ = writeln!(std::io::stderr(), "{reason}");
        code
    };
    if hub_build != BUILD_ID {
        return fail(
            EXIT_OTHER_BUILD,
            &format!(
                "this {PROGRAM} is of build {BUILD_ID}, the hub of build {hub_build}: \
                 restart the hub if it was upgraded, else install the {PROGRAM} built with it"
            ),
        );
    }
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        return fail(u8::MAX, &format!("reading the module: {e}"));
    }
    let engine = match engine::build_for_compiling() {
        Ok(engine) => engine,
        Err(e) => return fail(u8::MAX, &format!("building the engine: {e:?}")),
    };
    let prepared = if instrument {
        match instrument::instrument(&input) {
            Ok(prepared) => Some(prepared),
            Err(PrepareError::Malformed(m)) => return fail(EXIT_MALFORMED, &m),
            Err(PrepareError::Unsupported(m)) => return fail(EXIT_UNSUPPORTED, &m),
            Err(e @ (PrepareError::Compiler(_) | PrepareError::CompilerBuild(_))) => return fail(u8::MAX, &e),
        }
    } else {
        None
    };
    let wasm = prepared.as_ref().map_or(&input, |(wasm, _)| wasm);
    let artefact = match engine.precompile_module(wasm) {
        Ok(artefact) => artefact,
        Err(e) => return fail(EXIT_REFUSED, &format!("{e:?}")),
    };
    let answer = match &prepared {
        Some((wasm, facts)) => encode_frame(wasm, facts, &artefact),
        None => artefact,
    };
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(&answer).and_then(|()| out.flush()) {
        return fail(u8::MAX, &format!("writing the answer: {e}"));
    }
    0
}

#[cfg(all(test, feature = "compiler"))]
mod tests {
    use super::*;

    #[test]
    fn a_frame_decodes_to_what_was_encoded_and_a_cut_one_not_at_all() {
        let facts = ModuleFacts { has_tick: true, has_initialize: false, mutable_globals: 3 };
        let frame = encode_frame(b"wasm!", &facts, b"artefact");
        let (wasm, got, artefact) = decode_frame(frame.clone()).unwrap();
        assert_eq!((wasm.as_slice(), got, artefact.as_slice()), (&b"wasm!"[..], facts, &b"artefact"[..]));
        assert!(decode_frame(frame[..20].to_vec()).is_none());
        assert!(decode_frame(b"HMC2rest".to_vec()).is_none());
    }

    #[test]
    fn a_compiler_program_of_another_build_is_passed_over_for_this_process() {
        use std::os::unix::fs::PermissionsExt;
        let limits = EngineLimits { max_instances: 4, max_task_memory: 16 << 20 };
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join(PROGRAM);
        std::fs::write(&program, "#!/bin/sh\necho 'this hubmesh-compile is of build x' >&2\nexit 5\n").unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let engine = engine::build(limits).unwrap();
        let compiler = Compiler::Child(ChildCompiler { program });
        let source = br#"(module (memory 1) (func (export "hm_invoke") (param i32) (result i32) local.get 0))"#;
        let (wasm, _, compiled) = compiler.prepare(&engine, source).unwrap();
        assert!(compiled.artefact.is_none(), "compiled in this process");
        assert!(compiler.compile(&engine, &wasm).unwrap().artefact.is_none());
    }

    #[test]
    fn a_missing_or_foreign_compiler_program_is_refused_at_start_and_a_vanished_one_at_deploy() {
        let limits = EngineLimits { max_instances: 4, max_task_memory: 16 << 20 };
        let missing = PathBuf::from("/nonexistent/hubmesh-compile");
        let engine = engine::build(limits).unwrap();
        let e = ChildCompiler::find_in(vec![missing.clone()], &engine).unwrap_err();
        assert!(e.reason.contains("/nonexistent/hubmesh-compile"), "{e}");
        // A program that answers, but not with an artefact.
        let e = ChildCompiler::find_in(vec![PathBuf::from("/bin/true")], &engine).unwrap_err();
        assert!(e.reason.starts_with("/bin/true"), "{e}");
        let e = ChildCompiler::find_in(vec![PathBuf::from("/bin/false")], &engine).unwrap_err();
        assert!(e.reason.contains("status 1"), "{e}");

        // Found at start, gone since: the deploy fails as the compiler's fault, not the module's.
        let compiler = Compiler::Child(ChildCompiler { program: missing });
        let source = br#"(module (memory 1) (func (export "hm_invoke") (param i32) (result i32) local.get 0))"#;
        assert!(matches!(compiler.prepare(&engine, source), Err(PrepareError::Compiler(_))));
        assert!(matches!(compiler.compile(&engine, EMPTY_MODULE), Err(CompileError::Child(_))));
        // In this process instead.
        let (_, facts, compiled) = Compiler::InProcess.prepare(&engine, source).unwrap();
        assert!(compiled.artefact.is_none(), "compiled in this process");
        assert_eq!(facts.mutable_globals, 0);
        assert!(matches!(Compiler::InProcess.prepare(&engine, b"nonsense"), Err(PrepareError::Malformed(_))));
    }
}
