//! The lab: hubs in their own network namespaces on one bridge, started from the real `hubmesh`
//! binary with their own data dirs and logs, and the firewall tables the network faults rewrite.
//!
//! Layout (chaos guide): bridge `hmbr0` at 10.77.0.1 in the root namespace (the controller, never
//! cut off); hub *i* (1-based) in namespace `hm-n<i>` at 10.77.0.(10+i), API on port 7070, mesh on
//! 7071. Each hub namespace has one nftables table `inet hubmesh_chaos`; a fault replaces it in one
//! `nft -f` transaction. `up` first removes what a previous run left; teardown (also on drop,
//! panic and Ctrl-C) kills the hubs and removes namespaces, bridge and the forward rule.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hubmesh::client::Client;

use crate::scenario::{LanHub, LanSpec};

mod devices;
mod net;

pub use devices::{device_ip, Devsim};
use net::{allow_forwarding, ip, run, CONTROLLER};
pub use net::{clean_leftovers, hub_ip, hub_name, netns, require_root, skip_without_root, Rules, BRIDGE, BRIDGE_B};

/// One hub of the lab.
pub struct LabHub {
    pub index: usize,
    pub dir: PathBuf,
    child: Option<Child>,
    /// Whether the hub's process runs (as far as the lab knows: it started or healed it).
    running: bool,
    /// Its API.
    pub url: String,
    /// A fixed token (LAN runs); lab hubs read theirs from `admin.token`.
    token: Option<String>,
    pub client: Client,
    pub node_id: u64,
    pub paused: bool,
}

impl LabHub {
    pub fn name(&self) -> String {
        hub_name(self.index)
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("hub.log")
    }
}

/// Where the hubs run.
enum Backend {
    /// The lab's own hubs, in network namespaces.
    Netns { bin: PathBuf, profile: String, env: Vec<(String, String)>, witness: Option<usize> },
    /// Hubs that already run; faults are the user's commands.
    Lan { hubs: Vec<LanHub> },
}

/// The running lab.
pub struct Lab {
    pub hubs: Vec<LabHub>,
    backend: Backend,
    timeout: Duration,
    torn_down: bool,
    /// Voters when the run began (a LAN mesh may have more members than the run drives).
    pub voters: usize,
    /// Hubs that may run tasks (all but a witness).
    pub task_hubs: usize,
}

impl Lab {
    /// Builds the network for `n` hubs (plus a witness) and starts them: the first creates the
    /// mesh, the others join with a token; returns once every hub is a member and the autopilot
    /// has its voters (3, or 5 from 5 hubs).
    pub async fn up(
        dir: &Path,
        n: usize,
        witness: bool,
        bin: &Path,
        profile: &str,
        env: &[(String, String)],
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        require_root()?;
        clean_leftovers();
        let tasks = n;
        let n = n + usize::from(witness);
        let mut lab = Self {
            hubs: Vec::new(),
            backend: Backend::Netns {
                bin: bin.to_owned(),
                profile: profile.to_owned(),
                env: env.to_vec(),
                witness: witness.then_some(n - 1),
            },
            timeout,
            torn_down: false,
            voters: if n >= 5 { 5 } else { n.min(3) },
            task_hubs: tasks,
        };
        lab.build_network(n).context("building the lab network")?;
        for i in 0..n {
            let hub_dir = dir.join("hubs").join(hub_name(i));
            std::fs::create_dir_all(&hub_dir).with_context(|| format!("creating {}", hub_dir.display()))?;
            lab.hubs.push(LabHub {
                index: i,
                dir: hub_dir,
                child: None,
                running: false,
                url: format!("http://{}:7070", hub_ip(i)),
                token: None,
                client: Client::new("http://127.0.0.1:1", None),
                node_id: 0,
                paused: false,
            });
        }
        lab.spawn(0, None)?;
        lab.wait_ready(0).await?;
        let token = lab.hubs[0].client.create_token(Some("1h")).await.context("creating a join token")?.token;
        for i in 1..n {
            lab.spawn(i, Some(&token))?;
            lab.wait_ready(i).await?;
        }
        let want_voters = lab.voters;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let s = lab.hubs[0].client.status().await;
            if s.as_ref().is_ok_and(|s| s.nodes.len() == n && s.voters.len() == want_voters) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the lab's mesh did not form ({n} members, {want_voters} voters) in 90 s: {s:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(lab)
    }

    /// Connects to hubs that already form a mesh (a LAN run): checks that each answers and that
    /// they agree on a leader. Nothing is started, and teardown never stops them.
    pub async fn connect_lan(lan: &LanSpec, timeout: Duration) -> anyhow::Result<Self> {
        let read = |t: &Option<String>, f: &Option<PathBuf>| -> anyhow::Result<Option<String>> {
            Ok(match (t, f) {
                (Some(t), _) => Some(t.clone()),
                (None, Some(f)) => Some(
                    std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?.trim().to_owned(),
                ),
                (None, None) => None,
            })
        };
        let token = read(&lan.token, &lan.token_file)?.or_else(|| std::env::var("HUBMESH_TOKEN").ok());
        let mut lab = Self {
            hubs: Vec::new(),
            backend: Backend::Lan { hubs: lan.hubs.clone() },
            timeout,
            torn_down: false,
            voters: 0,
            task_hubs: lan.hubs.len(),
        };
        for (i, h) in lan.hubs.iter().enumerate() {
            lab.hubs.push(LabHub {
                index: i,
                dir: PathBuf::new(),
                child: None,
                running: true,
                url: h.url.trim_end_matches('/').to_owned(),
                token: read(&h.token, &h.token_file)?.or_else(|| token.clone()),
                client: Client::new("http://127.0.0.1:1", None),
                node_id: 0,
                paused: false,
            });
            lab.wait_ready(i).await?;
        }
        let s = lab.hubs[0].client.status().await?;
        lab.voters = s.voters.len();
        for h in &lab.hubs[1..] {
            let other = h.client.status().await?;
            if other.leader != s.leader {
                bail!("{} and {} name different leaders; is this one mesh?", lab.hubs[0].url, h.url);
            }
        }
        Ok(lab)
    }

    /// Whether the hubs are the user's (a LAN run).
    pub fn is_lan(&self) -> bool {
        matches!(self.backend, Backend::Lan { .. })
    }

    /// Runs the user's command `pick` of LAN hub `i`.
    fn lan_command(&self, i: usize, what: &str, pick: fn(&LanHub) -> &Option<String>) -> anyhow::Result<()> {
        let Backend::Lan { hubs } = &self.backend else { bail!("not a LAN run") };
        let cmd = pick(&hubs[i]).as_deref().with_context(|| format!("no `{what}` command for {}", hubs[i].url))?;
        run(Command::new("sh").arg("-c").arg(cmd)).with_context(|| format!("the `{what}` command of {}", hubs[i].url))
    }

    fn build_network(&self, n: usize) -> anyhow::Result<()> {
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        // mDNS (device discovery) must reach every port.
        let _ = ip(&["link", "set", BRIDGE, "type", "bridge", "mcast_snooping", "0"]);
        ip(&["addr", "add", &format!("{CONTROLLER}/24"), "dev", BRIDGE])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        allow_forwarding(BRIDGE)?;
        for i in 0..n {
            let ns = netns(i);
            let veth = format!("hmv{}", i + 1);
            ip(&["netns", "add", &ns])?;
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["link", "set", &veth, "master", BRIDGE, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", hub_ip(i)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            self.set_rules(i, &Rules::default())?;
        }
        Ok(())
    }

    /// Starts hub `i` on its data dir (a restart keeps its addresses, as a real hub does).
    fn spawn(&mut self, i: usize, join: Option<&str>) -> anyhow::Result<()> {
        let Backend::Netns { bin, profile, env, witness } = &self.backend else {
            self.lan_command(i, "start", |h| &h.start)?;
            self.hubs[i].running = true;
            self.hubs[i].paused = false;
            return Ok(());
        };
        let hub = &self.hubs[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(hub.log_path())?;
        let ip = hub_ip(i);
        let mut cmd = Command::new("ip");
        // `ip netns exec` execs the program in place: the PID we signal is hubmesh itself.
        cmd.args(["netns", "exec", &netns(i)])
            .arg(bin)
            .arg("--data-dir")
            .arg(&hub.dir)
            .args(["up", "--api", &format!("{ip}:7070"), "--mesh", &format!("{ip}:7071")])
            .args(["--name", &hub_name(i), "--profile", profile])
            .env("HUBMESH_LOG", "info,openraft=warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        if let Some(t) = join {
            cmd.args(["--join", t]);
        }
        if *witness == Some(i) {
            cmd.arg("--witness");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        self.hubs[i].child = Some(child);
        self.hubs[i].running = true;
        self.hubs[i].paused = false;
        Ok(())
    }

    /// Waits until hub `i` answers its API and knows a leader.
    pub async fn wait_ready(&mut self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = self.hubs[i].url.clone();
        let token_path = self.hubs[i].dir.join("admin.token");
        loop {
            if let Some(c) = self.hubs[i].child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    self.hubs[i].child = None;
                    self.hubs[i].running = false;
                    bail!("hub {} exited with {status}; see {}", hub_name(i), self.hubs[i].log_path().display());
                }
            }
            let token = match &self.hubs[i].token {
                Some(t) => Some(t.clone()),
                None if self.is_lan() => None,
                None => std::fs::read_to_string(&token_path).ok().map(|t| t.trim().to_owned()),
            };
            if token.is_some() || self.is_lan() {
                let client = Client::with_timeout(&url, token, self.timeout);
                if let Ok(s) = client.status().await {
                    if s.leader.is_some() && !s.nodes.is_empty() {
                        self.hubs[i].client = client;
                        self.hubs[i].node_id = s.node_id;
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "hub {} ({url}) did not become ready in 60 s; see {}",
                    hub_name(i),
                    self.hubs[i].log_path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The lab index of the hub with `node_id`.
    pub fn index_of(&self, node_id: u64) -> Option<usize> {
        self.hubs.iter().position(|h| h.node_id == node_id)
    }

    fn signal(&self, i: usize, sig: &str) -> anyhow::Result<()> {
        let pid = self.hubs[i].pid().with_context(|| format!("hub {} is not running", hub_name(i)))?;
        run(Command::new("kill").args([sig, &pid.to_string()]))
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if self.is_lan() {
            self.lan_command(i, "kill", |h| &h.kill)?;
            self.hubs[i].running = false;
            self.hubs[i].paused = false;
            return Ok(());
        }
        let mut child = self.hubs[i].child.take().with_context(|| format!("hub {} is not running", hub_name(i)))?;
        child.kill().context("SIGKILL")?;
        child.wait().context("reaping the hub")?;
        self.hubs[i].running = false;
        self.hubs[i].paused = false;
        Ok(())
    }

    /// SIGTERM and wait for the graceful exit.
    pub fn terminate(&mut self, i: usize) -> anyhow::Result<()> {
        if self.is_lan() {
            self.lan_command(i, "stop", |h| &h.stop)?;
            self.hubs[i].running = false;
            return Ok(());
        }
        self.signal(i, "-TERM")?;
        let mut child = self.hubs[i].child.take().expect("signal checked it runs");
        self.hubs[i].running = false;
        let status = child.wait().context("waiting for the hub")?;
        if !status.success() {
            bail!("hub {} exited with {status} after SIGTERM", hub_name(i));
        }
        Ok(())
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`).
    pub fn pause(&mut self, i: usize, stop: bool) -> anyhow::Result<()> {
        if self.is_lan() {
            if stop {
                self.lan_command(i, "pause", |h| &h.pause)?;
            } else {
                self.lan_command(i, "resume", |h| &h.resume)?;
            }
        } else {
            self.signal(i, if stop { "-STOP" } else { "-CONT" })?;
        }
        self.hubs[i].paused = stop;
        Ok(())
    }

    /// Starts a stopped hub again on its data dir and waits until it is ready.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        if self.hubs[i].is_running() {
            bail!("hub {} still runs", hub_name(i));
        }
        self.spawn(i, None)?;
        self.wait_ready(i).await
    }

    /// Replaces hub `i`'s firewall rules in one transaction.
    pub fn set_rules(&self, i: usize, rules: &Rules) -> anyhow::Result<()> {
        if self.is_lan() {
            if rules.is_empty() {
                return Ok(());
            }
            bail!("a LAN run has no firewall faults");
        }
        let mut child = Command::new("ip")
            .args(["netns", "exec", &netns(i), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft")?;
        child.stdin.take().expect("piped").write_all(rules.script().as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft in {} refused the rules: {}", netns(i), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Packets hub `i`'s rules dropped since they were last set.
    pub fn dropped_packets(&self, i: usize) -> u64 {
        if self.is_lan() {
            return 0;
        }
        let out = Command::new("ip")
            .args(["netns", "exec", &netns(i), "nft", "list", "table", "inet", "hubmesh_chaos"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let words: Vec<&str> = out.split_whitespace().collect();
        words.windows(2).filter(|w| w[0] == "packets").filter_map(|w| w[1].parse::<u64>().ok()).sum()
    }

    /// Hubs whose process ended on its own (a crash point, a panic) while the lab counted them
    /// as running; they are marked stopped.
    pub fn reap_crashed(&mut self) -> Vec<usize> {
        let mut out = Vec::new();
        for h in &mut self.hubs {
            if let Some(c) = h.child.as_mut() {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    h.child = None;
                    h.running = false;
                    h.paused = false;
                    out.push(h.index);
                }
            }
        }
        out
    }

    /// Clears every hub's rules, wakes paused hubs and restarts stopped (or crashed) ones.
    pub async fn heal_all(&mut self) -> anyhow::Result<()> {
        self.reap_crashed();
        for i in 0..self.hubs.len() {
            self.set_rules(i, &Rules::default())?;
            if self.hubs[i].paused {
                self.pause(i, false)?;
            }
        }
        for i in 0..self.hubs.len() {
            if !self.hubs[i].is_running() {
                self.restart(i).await?;
            }
        }
        Ok(())
    }

    /// Kills the hubs and removes the network; safe to call twice.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        if self.is_lan() {
            // The user's hubs: leave them running, whatever the run did to them.
            for i in 0..self.hubs.len() {
                if self.hubs[i].paused {
                    let _ = self.lan_command(i, "resume", |h| &h.resume);
                }
                if !self.hubs[i].running {
                    let _ = self.lan_command(i, "start", |h| &h.start);
                }
            }
            return;
        }
        for h in &mut self.hubs {
            if let Some(mut c) = h.child.take() {
                let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        clean_leftovers();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}
