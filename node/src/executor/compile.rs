//! Preparing a module (WAT parsing, instrumentation) and compiling it: in this process, or in a
//! child process of the same binary.
//!
//! A serving hub does both in a child (`hubmesh compile-module`, hidden): the code of the WAT
//! parser, the validator, the re-encoder and cranelift (together a quarter of the binary) and
//! their heap never become the hub's resident memory; a module that makes the compiler slow is
//! killed at a deadline instead of holding a thread; a compiler crash costs one deploy, not the
//! hub. The child is `/proc/self/exe`, so it is the very build that runs (also after a package
//! upgrade replaced the file), and it builds the engine from the same [`EngineLimits`]: its
//! artefact is what this engine would have produced, which is what makes handing it to
//! `Module::deserialize` sound.
//!
//! Protocol: the parent writes the input to the child's stdin and closes it.
//! - `compile-module`: input = instrumented wasm; output = wasmtime's serialized artefact.
//! - `compile-module --instrument`: input = the uploaded module (wasm or WAT); output =
//!   [`FRAME_MAGIC`], flags (1: has `hm_tick`, 2: has `_initialize`), the mutable-global count
//!   (u32 LE), the instrumented wasm's length (u64 LE), the wasm, then the artefact.
//!
//! Exit status 0: the output is complete. 1: the compiler refused the module, 3: it is not
//! WebAssembly, 4: hubmesh cannot run it (instrumentation's refusal); the reason is on stderr.
//! Any other end (a signal, another status) is the child's own failure.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use wasmtime::{Engine, Module};

use super::engine::{self, EngineLimits};
use super::instrument::{self, ModuleFacts, PrepareError};

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

/// Why a module did not compile.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The compiler refused the module.
    #[error("{0}")]
    Refused(String),
    /// The compiler process failed (died, timed out, could not be talked to).
    #[error("the compiler process failed: {0}")]
    Child(String),
}

impl From<CompileError> for PrepareError {
    fn from(e: CompileError) -> Self {
        match e {
            CompileError::Refused(reason) => Self::Unsupported(reason),
            CompileError::Child(_) => Self::Compiler(e.to_string()),
        }
    }
}

/// Where modules are prepared and compiled.
#[derive(Debug, Clone)]
pub enum Compiler {
    /// In this process (tests, benches, embedders).
    InProcess,
    /// In a child process of this binary (see the module doc); made by
    /// [`Compiler::child_of_this_binary`] only, since its output goes to `Module::deserialize`.
    Child(ChildCompiler),
}

/// `program compile-module` with the engine limits of this hub.
#[derive(Debug, Clone)]
pub struct ChildCompiler {
    program: PathBuf,
    limits: EngineLimits,
}

/// A compiled module, with its serialized artefact when a child produced it.
pub(crate) struct Compiled {
    pub(crate) module: Module,
    pub(crate) artefact: Option<Vec<u8>>,
}

impl Compiler {
    /// A child running this very binary, for a hub whose engine was built with `limits` — if
    /// such a child answers here: it is tried once with an empty module, and where it fails (no
    /// /proc, exec forbidden, the hub started through a loader such as `ld.so` or qemu-user, so
    /// that /proc/self/exe is not hubmesh) the hub compiles in its own process, with a warning.
    pub fn child_of_this_binary(limits: EngineLimits) -> Self {
        let child = ChildCompiler { program: PathBuf::from("/proc/self/exe"), limits };
        match run_child(&child, false, EMPTY_MODULE) {
            Ok(artefact) if Engine::detect_precompiled(&artefact).is_some() => Self::Child(child),
            Ok(_) => {
                tracing::warn!("the compiler process answers with something else; compiling in the hub");
                Self::InProcess
            }
            Err(e) => {
                tracing::warn!(error = %e, "no compiler process can run here; compiling in the hub");
                Self::InProcess
            }
        }
    }

    /// Compiles the instrumented module `wasm` for `engine`.
    pub(crate) fn compile(&self, engine: &Engine, wasm: &[u8]) -> Result<Compiled, CompileError> {
        let started = std::time::Instant::now();
        let compiled = match self {
            Self::InProcess => in_process(engine, wasm),
            Self::Child(child) => match run_child(child, false, wasm) {
                Ok(artefact) => load(engine, artefact),
                Err(ChildError::NotStarted(e)) => {
                    not_started(&e);
                    in_process(engine, wasm)
                }
                Err(ChildError::Exit { code: EXIT_REFUSED, reason }) => Err(CompileError::Refused(reason)),
                Err(e) => Err(CompileError::Child(e.to_string())),
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
        let Self::Child(child) = self else {
            let (wasm, facts) = instrument::instrument(source)?;
            let compiled = self.compile(engine, &wasm)?;
            return Ok((wasm, facts, compiled));
        };
        let started = std::time::Instant::now();
        let answer = match run_child(child, true, source) {
            Ok(answer) => answer,
            Err(ChildError::NotStarted(e)) => {
                not_started(&e);
                return Self::InProcess.prepare(engine, source);
            }
            Err(ChildError::Exit { code, reason }) => {
                return Err(match code {
                    EXIT_MALFORMED => PrepareError::Malformed(reason),
                    EXIT_UNSUPPORTED => PrepareError::Unsupported(reason),
                    EXIT_REFUSED => CompileError::Refused(reason).into(),
                    _ => CompileError::Child(ChildError::Exit { code, reason }.to_string()).into(),
                })
            }
            Err(e) => return Err(CompileError::Child(e.to_string()).into()),
        };
        let (wasm, facts, artefact) =
            decode_frame(answer).ok_or_else(|| CompileError::Child("its answer is not a prepared module".into()))?;
        let compiled = load(engine, artefact);
        count(&compiled, started);
        Ok((wasm, facts, compiled?))
    }
}

fn in_process(engine: &Engine, wasm: &[u8]) -> Result<Compiled, CompileError> {
    Module::new(engine, wasm)
        .map(|module| Compiled { module, artefact: None })
        .map_err(|e| CompileError::Refused(format!("{e:?}")))
}

fn load(engine: &Engine, artefact: Vec<u8>) -> Result<Compiled, CompileError> {
    if Engine::detect_precompiled(&artefact).is_none() {
        return Err(CompileError::Child("its output is not a compiled module".into()));
    }
    // SAFETY: the artefact comes from this same binary (`/proc/self/exe`) with an engine built
    // from the same limits, through a pipe only we hold; `deserialize` still refuses one whose
    // engine settings differ.
    let module = unsafe { Module::deserialize(engine, &artefact) }
        .map_err(|e| CompileError::Child(format!("its artefact does not load: {e}")))?;
    Ok(Compiled { module, artefact: Some(artefact) })
}

fn not_started(e: &std::io::Error) {
    // No child can be started here (no /proc, a sandbox without exec): the hub still works, with
    // the compiler's pages in its own memory.
    tracing::warn!(error = %e, "cannot start a compiler process; compiling in the hub");
}

fn count(compiled: &Result<Compiled, CompileError>, started: std::time::Instant) {
    if let Ok(c) = compiled {
        let place = if c.artefact.is_some() { "child" } else { "hub" };
        metrics::counter!("hubmesh_module_compiles_total", "in" => place).increment(1);
        metrics::histogram!("hubmesh_module_compile_seconds").record(started.elapsed().as_secs_f64());
    }
}

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
    let ChildCompiler { program, limits } = child;
    let mut command = Command::new(program);
    command
        .arg0("hubmesh")
        .arg("compile-module")
        .arg("--max-instances")
        .arg(limits.max_instances.to_string())
        .arg("--max-task-memory")
        .arg(limits.max_task_memory.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
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
    // The deadline: past it the child is killed, which ends the reads below.
    let (done, watch) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watch.recv_timeout(CHILD_BUDGET) {
            // SAFETY: kill(2) of our own child, which is reaped only after this thread ended.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return true;
        }
        false
    });
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let errors = std::thread::spawn(move || {
        // Read to the end (a child must never block on a full stderr), keep the start.
        let mut text = Vec::new();
        let _ = stderr.by_ref().take(STDERR_KEPT).read_to_end(&mut text);
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        String::from_utf8_lossy(&text).into_owned()
    });
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

/// The child's side (`hubmesh compile-module`): the input on stdin, the answer on stdout, the
/// exit status and stderr as the module doc says. Returns the exit status.
pub fn serve_child(limits: EngineLimits, instrument: bool) -> u8 {
    let fail = |code: u8, reason: &dyn std::fmt::Display| {
        // Not eprintln!: a parent that stopped reading must not turn a refusal into a panic.
        let _ = writeln!(std::io::stderr(), "{reason}");
        code
    };
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        return fail(u8::MAX, &format!("reading the module: {e}"));
    }
    let engine = match engine::build(limits) {
        Ok(engine) => engine,
        Err(e) => return fail(u8::MAX, &format!("building the engine: {e:?}")),
    };
    let prepared = if instrument {
        match instrument::instrument(&input) {
            Ok(prepared) => Some(prepared),
            Err(PrepareError::Malformed(m)) => return fail(EXIT_MALFORMED, &m),
            Err(PrepareError::Unsupported(m)) => return fail(EXIT_UNSUPPORTED, &m),
            Err(PrepareError::Compiler(m)) => return fail(u8::MAX, &m),
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

#[cfg(test)]
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
    fn without_a_child_the_hub_compiles_itself() {
        let engine = engine::build(EngineLimits { max_instances: 4, max_task_memory: 16 << 20 }).unwrap();
        let limits = EngineLimits { max_instances: 4, max_task_memory: 16 << 20 };
        let compiler = Compiler::Child(ChildCompiler { program: PathBuf::from("/nonexistent/hubmesh"), limits });
        let source = br#"(module (memory 1) (func (export "hm_invoke") (param i32) (result i32) local.get 0))"#;
        let (_, facts, compiled) = compiler.prepare(&engine, source).unwrap();
        assert!(compiled.artefact.is_none(), "compiled in this process");
        assert_eq!(facts.mutable_globals, 0);
        assert!(matches!(compiler.prepare(&engine, b"nonsense"), Err(PrepareError::Malformed(_))));
        // The start-up check: this test binary is no compiler process, so the hub compiles.
        assert!(matches!(Compiler::child_of_this_binary(limits), Compiler::InProcess));
    }
}
