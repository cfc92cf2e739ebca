//! The container image and `deploy/compose.yaml`, as a user runs them (root with Docker, like the
//! chaos lab; under `CI` a missing Docker is a failure, never a silent pass): the image is built
//! from this build's `hubmesh` by `deploy/build-image` (no base image), the compose mesh of three
//! hubs and a witness comes up and forms one mesh with nobody copying a token, a durable task
//! keeps its state when its host container is `docker kill`ed and answers from another hub, and
//! `docker compose down -v` leaves no container, network or volume behind.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hubmesh_proto::api::{NodeInfo, TaskInfo};

const PROJECT: &str = "hubmesh-compose-test";
const IMAGE: &str = "hubmesh:compose-test";
/// The hubs' API addresses on the compose network (deploy/compose.yaml).
const HUBS: [(&str, &str); 4] =
    [("hub1", "10.213.7.11"), ("hub2", "10.213.7.12"), ("hub3", "10.213.7.13"), ("witness", "10.213.7.14")];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

/// Docker and a compose tool (`docker compose`, else `docker-compose`), or why not.
fn compose_tool() -> Result<Vec<String>, String> {
    let ok = |cmd: &mut Command| cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok(Command::new("docker").arg("info")) {
        return Err("Docker is not running (docker info failed)".into());
    }
    if ok(Command::new("docker").args(["compose", "version"])) {
        return Ok(vec!["docker".into(), "compose".into()]);
    }
    if ok(Command::new("docker-compose").arg("version")) {
        return Ok(vec!["docker-compose".into()]);
    }
    Err("no compose tool (docker compose or docker-compose)".into())
}

fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs `cmd`, failing the test with its stderr if it fails; its stdout.
fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The compose project; `down -v` when dropped, so a failed test leaves nothing either.
struct Mesh {
    tool: Vec<String>,
    api_port: u16,
    tokens: tempfile::TempDir,
}

impl Mesh {
    fn compose(&self) -> Command {
        let mut cmd = Command::new(&self.tool[0]);
        cmd.args(&self.tool[1..])
            .args(["-p", PROJECT, "-f"])
            .arg(repo().join("deploy/compose.yaml"))
            .env("HUBMESH_IMAGE", IMAGE)
            .env("HUBMESH_API_PORT", self.api_port.to_string());
        cmd
    }

    fn down(&self) {
        output(self.compose().args(["down", "-v", "--remove-orphans", "--timeout", "5"]));
    }

    fn container(&self, service: &str) -> String {
        run(self.compose().args(["ps", "-q", service])).trim().to_owned()
    }

    /// The admin token of `service`'s hub, copied out of its data volume (an error until the hub
    /// wrote it).
    fn admin_token(&self, service: &str) -> Result<PathBuf, String> {
        let path = self.tokens.path().join(service);
        if !path.exists() {
            let from = format!("{}:/var/lib/hubmesh/admin.token", self.container(service));
            stdout_of(&output(Command::new("docker").arg("cp").arg(from).arg(&path)))?;
        }
        Ok(path)
    }

    /// Runs the host's `hubmesh` CLI against `service`'s hub, with its admin token: its stdout,
    /// or why not.
    fn cli(&self, bin: &Path, service: &str, args: &[&str]) -> Result<String, String> {
        let ip = HUBS.iter().find(|(s, _)| *s == service).expect("a compose service").1;
        let token = self.admin_token(service)?;
        stdout_of(&output(
            Command::new(bin)
                .args(["--hub", &format!("http://{ip}:7070"), "--token-file"])
                .arg(token)
                .args(args)
                .env_remove("HUBMESH_TOKEN"),
        ))
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.down();
    }
}

/// Polls `f` every 250 ms until it gives a value, or fails after `limit` saying `what`.
fn until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if start.elapsed() > limit => panic!("{what}: not within {limit:?}; last: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

fn stdout_of(out: &Output) -> Result<String, String> {
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
    }
}

/// What is left of the project: containers, volumes, networks.
fn leftovers() -> Vec<String> {
    let label = format!("label=com.docker.compose.project={PROJECT}");
    let mut left = Vec::new();
    for kind in [&["ps", "-a", "-q"][..], &["volume", "ls", "-q"], &["network", "ls", "-q"]] {
        let out = run(Command::new("docker").args(kind).args(["--filter", &label]));
        left.extend(out.lines().map(|l| format!("{}: {l}", kind[0])));
    }
    left
}

#[test]
fn the_compose_mesh_forms_by_itself_fails_a_killed_hub_over_and_leaves_nothing_behind() {
    let tool = match compose_tool() {
        Ok(t) if hubmesh_chaos::lab::require_root().is_ok() => t,
        Ok(_) | Err(_) => {
            let why = compose_tool().err().unwrap_or_else(|| "not root".into());
            assert!(std::env::var_os("CI").is_none(), "CI must run the compose test: {why}");
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let bin = hubmesh_chaos::installable_hubmesh().expect("the hubmesh binary");
    let built = run(Command::new(repo().join("deploy/build-image")).arg("--binary").arg(&bin).args(["--tag", IMAGE]));
    eprintln!("{}", built.trim());
    let api_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mesh = Mesh { tool, api_port, tokens: tempfile::tempdir().unwrap() };
    // A previous run that died before its own `down`.
    mesh.down();
    run(mesh.compose().args(["up", "-d"]));

    // One mesh of four, every hub up, formed by the published token alone.
    let nodes: Vec<NodeInfo> = until(Duration::from_secs(120), "the compose mesh formed", || {
        let out = mesh.cli(&bin, "hub1", &["node", "list", "--json"])?;
        let nodes: Vec<NodeInfo> = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        let up: BTreeSet<&str> = nodes.iter().filter(|n| !n.down).map(|n| n.name.as_str()).collect();
        match up == HUBS.iter().map(|(s, _)| *s).collect() {
            true => Ok(nodes),
            false => Err(out),
        }
    });
    assert_eq!(nodes.len(), 4, "{nodes:?}");
    // Docker's own health check (`hubmesh health` inside the image) agrees.
    until(Duration::from_secs(60), "every container healthy", || {
        let id = mesh.container("hub2");
        let status = run(Command::new("docker").args(["inspect", "--format", "{{.State.Health.Status}}", &id]));
        match status.trim() {
            "healthy" => Ok(()),
            other => Err(other.to_owned()),
        }
    });
    // The CLI inside a container finds its hub and token by itself, as a user runs it.
    let inside = run(mesh.compose().args(["exec", "-T", "hub3", "hubmesh", "status"]));
    assert!(inside.contains("hub3") && inside.contains("4 up, 0 down"), "{inside}");

    // A durable counter: every acknowledged update is on other hubs before it answers.
    let counter = repo().join("examples/tasks/counter.wat");
    mesh.cli(&bin, "hub1", &["task", "deploy", counter.to_str().unwrap(), "--durable"]).expect("deploying the counter");
    let mut total = 0;
    for add in [5, 7, 9] {
        total += add;
        let out = until(Duration::from_secs(30), "the counter answered", || {
            mesh.cli(&bin, "hub2", &["task", "invoke", "counter", "--data", &add.to_string()])
        });
        assert_eq!(out, total.to_string());
    }
    let show = mesh.cli(&bin, "hub1", &["task", "show", "counter", "--json"]).expect("task show");
    let tasks: Vec<TaskInfo> = serde_json::from_str(&show).expect("task show --json");
    let host = tasks[0].placement.as_ref().expect("placed").node_name.clone();
    assert!(["hub1", "hub2", "hub3"].contains(&host.as_str()), "the witness runs no task: {host}");

    // The host's container dies at once (SIGKILL): no final checkpoint, no goodbye.
    run(mesh.compose().args(["kill", "-s", "SIGKILL", &host]));
    let other = ["hub1", "hub2", "hub3"].into_iter().find(|h| *h != host).unwrap();
    let after = until(Duration::from_secs(60), "the counter answered from another hub", || {
        mesh.cli(&bin, other, &["task", "invoke", "counter", "--data", "1"])
    });
    assert_eq!(after, (total + 1).to_string(), "the state acknowledged before the kill is kept");
    let show = mesh.cli(&bin, other, &["task", "show", "counter", "--json"]).expect("task show");
    let tasks: Vec<TaskInfo> = serde_json::from_str(&show).expect("task show --json");
    let now = tasks[0].placement.as_ref().expect("placed").node_name.clone();
    assert_ne!(now, host, "the task moved off the killed hub");

    mesh.down();
    assert_eq!(leftovers(), Vec::<String>::new(), "docker compose down -v leaves nothing behind");
    drop(mesh);
    output(Command::new("docker").args(["rmi", IMAGE]));
}
