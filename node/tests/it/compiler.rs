//! The compiler program a serving hub starts for each module (`hubmesh-compile`).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use hubmesh_proto::api::DeployParams;

use crate::harness::{example, example_bytes, step, wait_until, Hub};

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

/// A compiler program that fails for a while (killed, out of memory, half-upgraded) is the hub's
/// failure, not the task's: the task is shown starting with the reason, and starts with its state
/// once the program works again, without a restart of the hub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_module_the_compiler_program_fails_to_compile_starts_once_it_works_again() {
    let dir = tempfile::tempdir().unwrap();
    let (wrapper, broken, checked) =
        (dir.path().join("hubmesh-compile"), dir.path().join("broken"), dir.path().join("checked"));
    // Passes the hub's start-up check (the first run), then fails while `broken` exists.
    let script = format!(
        "#!/bin/sh\nif [ -e '{b}' ] && [ -e '{c}' ]; then echo 'the compiler is broken (test)' >&2; exit 2; fi\n\
         touch '{c}'\nexec '{real}' \"$@\"\n",
        b = broken.display(),
        c = checked.display(),
        real = env!("CARGO_BIN_EXE_hubmesh-compile"),
    );
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let env = [("HUBMESH_COMPILER", wrapper.to_str().unwrap())];
    let mut hub = Hub::start_with_env("compiler-retry", &[], &env).await;
    let params = DeployParams { durable: true, ..Default::default() };
    hub.client.deploy("counter", example_bytes("counter.wat"), &params, false).await.unwrap();
    for i in 1..=3 {
        let out = hub.client.invoke("counter", b"1".to_vec(), None).await.unwrap();
        assert_eq!(out, i.to_string().into_bytes());
    }

    step("restart with an empty compiled-module cache and a compiler program that fails after its check");
    hub.terminate();
    let cache = hub.data_dir().join("cache");
    let cached: Vec<_> = std::fs::read_dir(&cache).unwrap().flatten().map(|e| e.path()).collect();
    assert!(!cached.is_empty(), "the deploy left a compiled module in {}", cache.display());
    for f in cached {
        std::fs::remove_file(f).unwrap();
    }
    std::fs::remove_file(&checked).unwrap();
    std::fs::write(&broken, b"").unwrap();
    hub.restart().await;

    step("the task is starting, with the compiler's failure as the reason; a call is refused with it");
    let client = hub.client.clone();
    wait_until(Duration::from_secs(30), "the task shows the compiler's failure", || {
        let c = client.clone();
        async move {
            c.task("counter").await.is_ok_and(|t| {
                t.state == "starting"
                    && t.reason.is_some_and(|r| r.contains("compiler is broken") && r.contains("retrying"))
            })
        }
    })
    .await;
    let err = hub.client.invoke("counter", b"1".to_vec(), None).await.unwrap_err();
    assert!(err.to_string().contains("compiler is broken"), "{err}");

    step("the program works again: the task starts by itself, with its state");
    std::fs::remove_file(&broken).unwrap();
    let client = hub.client.clone();
    wait_until(Duration::from_secs(30), "the task runs again", || {
        let c = client.clone();
        async move { c.task("counter").await.is_ok_and(|t| t.state == "running" && t.reason.is_none()) }
    })
    .await;
    let out = hub.client.invoke("counter", b"1".to_vec(), None).await.unwrap();
    assert_eq!(out, b"4".to_vec(), "the three acknowledged increments survived");
}
