//! The compiler program a serving hub starts for each module (`hubmesh-compile`).

use std::io::Write;
use std::process::{Command, Stdio};

use crate::harness::{example, step};

/// The build of this tree: the hub's and the compiler program's (node/build.rs).
const BUILD: &str = env!("HUBMESH_BUILD_ID");

fn compile(input: &[u8], extra: &[&str]) -> std::process::Output {
    compile_for(BUILD, input, extra)
}

fn compile_for(hub_build: &str, input: &[u8], extra: &[&str]) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hubmesh-compile"))
        .args(["--hub-build", hub_build])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the compiler process");
    // A refusal may come before the input is read (another build): the pipe may be closed.
    let _ = child.stdin.take().unwrap().write_all(input);
    child.wait_with_output().unwrap()
}

#[test]
fn the_compiler_process_compiles_a_module_and_refuses_garbage() {
    step("a module: the artefact on stdout (an ELF image, as wasmtime serializes)");
    let wasm = wat::parse_file(example("echo.wat")).unwrap();
    let out = compile(&wasm, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(&out.stdout[..4], b"\x7fELF");

    step("garbage: exit status 1, the reason on stderr, nothing on stdout");
    let out = compile(b"\0asm\x01\0\0\0garbage", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(!out.stderr.is_empty());
}

#[test]
fn the_compiler_process_instruments_an_upload_and_says_why_it_refuses_one() {
    step("WAT source: the frame (magic, facts, instrumented wasm, artefact)");
    let out = compile(&std::fs::read(example("counter.wat")).unwrap(), &["--instrument"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(&out.stdout[..4], b"HMC1");
    let wasm_len = u64::from_le_bytes(out.stdout[9..17].try_into().unwrap()) as usize;
    assert_eq!(&out.stdout[17..21], b"\0asm", "the instrumented module follows the header");
    assert_eq!(&out.stdout[17 + wasm_len..17 + wasm_len + 4], b"\x7fELF", "then the artefact");

    step("not WebAssembly: status 3; valid but not a task (no hm_invoke): status 4");
    let out = compile(b"(module", &["--instrument"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let out = compile(b"(module (memory 1))", &["--instrument"]);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("hm_invoke"));
}

#[test]
fn the_compiler_program_of_another_build_refuses_to_compile_and_says_which_it_is() {
    step("a hub of another build: status 5, the two builds on stderr, nothing on stdout");
    let wasm = wat::parse_file(example("echo.wat")).unwrap();
    let out = compile_for("0.0.0+other", &wasm, &[]);
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty());
    let reason = String::from_utf8_lossy(&out.stderr);
    assert!(reason.contains(BUILD) && reason.contains("0.0.0+other"), "{reason}");

    step("--version prints the build, the same as the hub's");
    let version = |program: &str| {
        let out = Command::new(program).arg("--version").output().unwrap();
        String::from_utf8(out.stdout).unwrap().split_whitespace().last().unwrap_or_default().to_owned()
    };
    assert_eq!(version(env!("CARGO_BIN_EXE_hubmesh-compile")), BUILD);
    assert_eq!(version(env!("CARGO_BIN_EXE_hubmesh")), BUILD);
}
