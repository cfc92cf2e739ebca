//! Devices in the lab (device discovery tests): namespaces `hm-d<k>` that run `hubmesh-devsim`,
//! on the lab's bridge (LAN A, 10.77.0.0/24) or on a second LAN B (`hmbr1`, 10.78.0.0/24) that
//! only the hubs given a second interface (`eth1`) reach. mDNS does not cross from one LAN to the
//! other: what the hubs on A know of B's devices they learn by gossip.

use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use anyhow::Context;

use super::net::{allow_forwarding, ip, BRIDGE, BRIDGE_B};
use super::{netns, Lab};

/// The address of device host `k` on LAN A or B.
pub fn device_ip(k: usize, lan_b: bool) -> String {
    format!("10.{}.0.{}", if lan_b { 78 } else { 77 }, 100 + k)
}

/// A hub's address on LAN B.
fn hub_ip_b(i: usize) -> String {
    format!("10.78.0.{}", 11 + i)
}

fn device_ns(k: usize) -> String {
    format!("hm-d{k}")
}

/// Makes device host `k` on LAN A or B: its namespace and veth pair; returns the namespace and
/// its address.
fn device_host(k: usize, lan_b: bool) -> anyhow::Result<(String, String)> {
    let (ns, veth, addr) = (device_ns(k), format!("hmd{k}"), device_ip(k, lan_b));
    ip(&["netns", "add", &ns])?;
    ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
    ip(&["link", "set", &veth, "master", if lan_b { BRIDGE_B } else { BRIDGE }, "up"])?;
    ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    Ok((ns, addr))
}

impl Lab {
    /// Builds LAN B and gives hubs `hubs` (0-based) an interface on it.
    pub fn add_lan_b(&self, hubs: &[usize]) -> anyhow::Result<()> {
        ip(&["link", "add", BRIDGE_B, "type", "bridge"])?;
        let _ = ip(&["link", "set", BRIDGE_B, "type", "bridge", "mcast_snooping", "0"]);
        ip(&["link", "set", BRIDGE_B, "up"])?;
        allow_forwarding(BRIDGE_B)?;
        for &i in hubs {
            let (ns, veth) = (netns(i), format!("hmb{}", i + 1));
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth1", "netns", &ns])?;
            ip(&["link", "set", &veth, "master", BRIDGE_B, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", hub_ip_b(i)), "dev", "eth1"])?;
            ip(&["-n", &ns, "link", "set", "eth1", "up"])?;
        }
        Ok(())
    }

    /// Takes hub `i` off LAN B (its `eth1` goes with the veth pair).
    pub fn detach_lan_b(&self, i: usize) -> anyhow::Result<()> {
        ip(&["link", "del", &format!("hmb{}", i + 1)])
    }

    /// Runs `hubmesh-devsim --stranger` (a libp2p node of no mesh) in a new host `k` on LAN A
    /// for `secs` against the hubs' gossip ports, in the name of hub `as_node`; returns what it
    /// printed (JSON: connections established, publishes that went out, longest connection).
    pub fn run_stranger(&self, devsim: &Path, k: usize, as_node: u64, secs: u64) -> anyhow::Result<String> {
        let (ns, addr) = device_host(k, false)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns]).arg(devsim).args(["--ip", &addr, "--prefix", "stranger"]);
        cmd.args(["--as-node", &as_node.to_string(), "--for", &secs.to_string()]);
        for i in 0..self.hubs.len() {
            cmd.args(["--stranger", &format!("{}:7072", super::hub_ip(i))]);
        }
        let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {}", devsim.display()));
        let _ = ip(&["netns", "del", &ns]);
        let out = out?;
        anyhow::ensure!(out.status.success(), "the stranger failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Starts `count` simulated devices named `prefix-0..`, advertised `via` mDNS or SSDP, in a
    /// new device host `k` on LAN A or B.
    pub fn spawn_devsim(
        &self,
        devsim: &Path,
        k: usize,
        lan_b: bool,
        via: &str,
        prefix: &str,
        count: usize,
    ) -> anyhow::Result<Devsim> {
        let (ns, addr) = device_host(k, lan_b)?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(devsim)
            .args(["--ip", &addr, "--via", via, "--prefix", prefix, "--count", &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", devsim.display()))?;
        let stdin = child.stdin.take().context("the simulator's stdin")?;
        Ok(Devsim { child, stdin, ns })
    }
}

/// A running `hubmesh-devsim`; dropping it kills it and removes its device host.
pub struct Devsim {
    child: Child,
    stdin: ChildStdin,
    ns: String,
}

impl Devsim {
    /// Device `i` says goodbye.
    pub fn leave(&mut self, i: usize) -> anyhow::Result<()> {
        use std::io::Write;
        writeln!(self.stdin, "leave {i}").context("telling the simulator")?;
        self.stdin.flush().context("telling the simulator")
    }

    /// Every device says goodbye (`leave all`); waits (at most 3 s) for the simulator to exit.
    pub fn leave_all(&mut self) {
        use std::io::Write;
        let _ = writeln!(self.stdin, "leave all").and_then(|()| self.stdin.flush());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Every device vanishes without a word (SIGKILL).
    pub fn vanish(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Devsim {
    fn drop(&mut self) {
        self.vanish();
        let _ = ip(&["netns", "del", &self.ns]);
    }
}
