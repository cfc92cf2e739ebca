//! Starts real hubs (the `hubmesh` binary) in their own temp dirs on loopback ports chosen by the
//! OS (`--api 127.0.0.1:0`; the hub writes the bound address to `DATA_DIR/api.addr`), waits on
//! conditions rather than sleeping, and kills every child on drop, printing its log tail if the
//! test failed.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hubmesh::client::Client;

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_hubmesh")
}

/// An example task's file.
pub fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tasks").join(name)
}

/// An example task's bytes.
pub fn example_bytes(name: &str) -> Vec<u8> {
    std::fs::read(example(name)).expect("example tasks are in the repo")
}

/// Marks a step in the test's output.
pub fn step(what: &str) {
    eprintln!("--- step: {what}");
}

/// Polls `cond` until it returns true, failing the test with `why` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, why: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting until {why}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `change` until it is not refused with a "nothing changed" answer, for up to 10 s: right
/// after an election (a leader's restart, or one set off by a membership change on a busy
/// machine), a hub may not hold its lease yet (`no_quorum`) or know no leader (`not_leader`) for
/// a heartbeat or two, as a user retrying would see. Any other answer is returned.
pub async fn retrying_nothing_changed<T, F, Fut>(mut change: F) -> Result<T, hubmesh::client::ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, hubmesh::client::ClientError>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match change().await {
            Err(e)
                if matches!(e.code(), Some("no_quorum" | "not_leader")) && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => return other,
        }
    }
}

/// A free port below the kernel's ephemeral range (32768 and up), in `first..first + span`, that
/// `free` can bind: a restarted hub binds its old port again, and a port the kernel handed out as
/// ephemeral could meanwhile be taken by any other socket of the test run. Spread over the range
/// by process id so that parallel test binaries rarely meet.
fn free_port(next: &std::sync::atomic::AtomicU32, first: u32, span: u32, free: fn(u16) -> bool) -> u16 {
    let offset = (std::process::id() % 600) * 20;
    loop {
        let port = (first + (offset + next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) % span) as u16;
        if free(port) {
            return port;
        }
    }
}

/// For a hub's mesh endpoint (UDP).
fn mesh_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    free_port(&NEXT, 20_000, 12_000, |p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok())
}

/// For a hub's gossip endpoint (TCP), from another part of the range.
fn gossip_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    free_port(&NEXT, 10_000, 10_000, |p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// One hub process.
pub struct Hub {
    pub name: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub url: String,
    pub client: Client,
    extra: Vec<String>,
    /// Environment variables of the hub process.
    env: Vec<(String, String)>,
    /// The binary it runs (the one under test unless [`Hub::set_program`] says otherwise).
    program: PathBuf,
}

impl Hub {
    /// Starts a hub with a fresh data dir.
    pub async fn start(name: &str) -> Self {
        Self::start_with(name, &[]).await
    }

    /// Starts a hub with extra `up` flags.
    pub async fn start_with(name: &str, extra: &[&str]) -> Self {
        Self::start_with_env(name, extra, &[]).await
    }

    /// Starts a hub with extra `up` flags and environment variables.
    pub async fn start_with_env(name: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(Path::new(bin()), name, extra, env).await
    }

    /// Starts a hub that runs `program`, not the binary under test (say, an older release).
    pub async fn start_from(program: &Path, name: &str, extra: &[&str]) -> Self {
        Self::launch(program, name, extra, &[]).await
    }

    async fn launch(program: &Path, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::Builder::new().prefix(&format!("hubmesh-it-{name}-")).tempdir().expect("temp dir");
        let mut hub = Self {
            name: name.to_owned(),
            dir,
            child: None,
            url: String::new(),
            client: Client::new("http://127.0.0.1:1", None),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            program: program.to_path_buf(),
        };
        hub.spawn().await;
        hub
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("hub.log")
    }

    async fn spawn(&mut self) {
        let addr_file = self.dir.path().join("api.addr");
        let _ = std::fs::remove_file(&addr_file);
        // A restarted hub keeps its mesh address, as a real one on a LAN does; its peers know it.
        let mesh = std::fs::read_to_string(self.dir.path().join("mesh.addr"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| format!("127.0.0.1:{}", mesh_port()));
        // And its gossip address (TCP): the default, the mesh's host with port 7072, would be
        // the same for every hub on loopback.
        let gossip = std::fs::read_to_string(self.dir.path().join("gossip.addr"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| format!("127.0.0.1:{}", gossip_port()));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("log file");
        let child = Command::new(&self.program)
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(["up", "--api", "127.0.0.1:0", "--mesh", &mesh, "--gossip", &gossip, "--name", &self.name])
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("HUBMESH_LOG", "info,openraft=warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::from(log.try_clone().expect("log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawning hubmesh");
        self.child = Some(child);
        let path = addr_file.clone();
        wait_until(Duration::from_secs(60), &format!("hub {} writes api.addr", self.name), || {
            let exists = path.exists();
            async move { exists }
        })
        .await;
        let addr = std::fs::read_to_string(&addr_file).expect("api.addr").trim().to_owned();
        self.url = format!("http://{addr}");
        self.client = Client::new(&self.url, Some(self.token()));
        let client = self.client.clone();
        wait_until(Duration::from_secs(60), "the hub answers /health", || {
            let c = client.clone();
            async move { c.health().await.is_ok() }
        })
        .await;
        let client = self.client.clone();
        wait_until(Duration::from_secs(60), "the hub knows a leader and has registered", || {
            let c = client.clone();
            async move { c.status().await.is_ok_and(|s| s.leader.is_some() && !s.nodes.is_empty()) }
        })
        .await;
    }

    /// The API token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin.token")).expect("admin.token").trim().to_owned()
    }

    /// SIGKILL, as a power cut would (no final checkpoint, no flush).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The hub's resident memory, from `/proc`.
    pub fn rss_bytes(&self) -> u64 {
        let pid = self.child.as_ref().expect("the hub runs").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS in /proc/PID/status");
        kib << 10
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): a hub that hangs, then wakes up.
    pub fn pause(&self, stop: bool) {
        let pid = self.child.as_ref().expect("the hub runs").id().to_string();
        let sig = if stop { "-STOP" } else { "-CONT" };
        assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let status = c.wait().expect("waiting for the hub");
            assert!(status.success(), "hub {} exited with {status} after SIGTERM", self.name);
        }
    }

    /// Sets (`Some`) or removes (`None`) an environment variable of the hub's process, from its
    /// next start on.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_owned(), v.to_owned()));
        }
    }

    /// Waits up to `timeout` for the hub's process to exit by itself (a crash point fired);
    /// whether it did.
    pub async fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("the hub runs");
            if child.try_wait().expect("waiting for the hub").is_some() {
                self.child = None;
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the hub again on the same data dir (same mesh address, new API port).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the hub before restarting it");
        self.spawn().await;
    }

    /// The last lines of the hub's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A client with another token.
    pub fn client_with_token(&self, token: Option<&str>) -> Client {
        Client::new(&self.url, token.map(str::to_owned))
    }

    /// Runs the CLI against this hub.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .args(["--hub", &self.url, "--data-dir"])
            .arg(self.dir.path())
            .args(args)
            .env_remove("HUBMESH_TOKEN")
            .output()
            .expect("running the CLI")
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("===== log tail of hub {} =====\n{}\n=====", self.name, self.log_tail(60));
            // The whole log, for a failure that the tail does not explain (a flaky one, say).
            if let Some(dir) = std::env::var_os("HUBMESH_IT_LOG_DIR") {
                // Tests of one binary share a process and may reuse hub names: the thread names the test.
                let test = std::thread::current().name().unwrap_or("test").replace("::", "-");
                let to = Path::new(&dir).join(format!("{test}-{}-{}.log", self.name, std::process::id()));
                let _ = std::fs::create_dir_all(&dir);
                if let Err(e) = std::fs::copy(self.log_path(), &to) {
                    eprintln!("could not keep the log of hub {}: {e}", self.name);
                }
            }
        }
    }
}
