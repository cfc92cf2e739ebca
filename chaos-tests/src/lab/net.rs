//! The lab's network: addresses and names of the hubs, the firewall rules a fault writes (one
//! nftables table per hub namespace, replaced in one transaction), and the root checks and
//! clean-up of what a previous run left.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

pub const BRIDGE: &str = "hmbr0";
pub(super) const CONTROLLER: &str = "10.77.0.1";
pub(super) const TABLE: &str = "inet hubmesh_chaos";
/// The second LAN's bridge (device tests: devices only some hubs reach).
pub const BRIDGE_B: &str = "hmbr1";

/// Docker and other hosts set the FORWARD policy to DROP, which also drops bridged traffic when
/// br_netfilter is loaded; this rule (tagged, so teardown finds it) lets a lab bridge through.
pub(super) fn forward_rule(bridge: &str) -> [&str; 10] {
    ["FORWARD", "-i", bridge, "-o", bridge, "-m", "comment", "--comment", "hubmesh-chaos", "-j"]
}

/// Lets `bridge` forward (see [`forward_rule`]), where iptables exists.
pub(super) fn allow_forwarding(bridge: &str) -> anyhow::Result<()> {
    if Command::new("iptables").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok() {
        run(Command::new("iptables").arg("-I").args(forward_rule(bridge)).arg("ACCEPT"))
            .with_context(|| format!("letting {bridge} forward"))?;
    }
    Ok(())
}

/// The address of hub `i` (0-based).
pub fn hub_ip(i: usize) -> String {
    format!("10.77.0.{}", 11 + i)
}

/// The namespace of hub `i` (0-based).
pub fn netns(i: usize) -> String {
    format!("hm-n{}", i + 1)
}

/// The name of hub `i` (0-based).
pub fn hub_name(i: usize) -> String {
    format!("n{}", i + 1)
}

/// Which packets hub `i` drops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Hubs whose packets are dropped on the way in.
    pub drop_from: BTreeSet<usize>,
    /// Hubs to which packets are dropped on the way out.
    pub drop_to: BTreeSet<usize>,
    /// Hubs with which a share of the packets (both ways) is dropped.
    pub flaky: BTreeSet<usize>,
    pub flaky_percent: u8,
}

impl Rules {
    pub(super) fn is_empty(&self) -> bool {
        self.drop_from.is_empty() && self.drop_to.is_empty() && self.flaky.is_empty()
    }

    /// The nft script that replaces the table atomically.
    pub(super) fn script(&self) -> String {
        let set = |s: &BTreeSet<usize>| s.iter().map(|&j| hub_ip(j)).collect::<Vec<_>>().join(", ");
        let mut input = String::new();
        let mut output = String::new();
        if !self.drop_from.is_empty() {
            input += &format!("    ip saddr {{ {} }} counter drop\n", set(&self.drop_from));
        }
        if !self.drop_to.is_empty() {
            output += &format!("    ip daddr {{ {} }} counter drop\n", set(&self.drop_to));
        }
        if !self.flaky.is_empty() {
            let p = self.flaky_percent;
            input += &format!("    ip saddr {{ {} }} numgen random mod 100 < {p} counter drop\n", set(&self.flaky));
            output += &format!("    ip daddr {{ {} }} numgen random mod 100 < {p} counter drop\n", set(&self.flaky));
        }
        format!(
            "table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{\n  chain input {{\n    type filter hook input priority -10; policy accept;\n{input}  }}\n  chain output {{\n    type filter hook output priority -10; policy accept;\n{output}  }}\n}}\n"
        )
    }
}

/// Whether this process may build the lab (namespaces and firewall rules need root).
pub fn require_root() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().nth(1));
    if uid != Some("0") {
        bail!("the chaos lab needs root (network namespaces, veth pairs and nftables); run it as root, e.g. with sudo");
    }
    for tool in ["ip", "nft"] {
        if !Command::new(tool).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
        {
            bail!("the chaos lab needs `{tool}` (Debian: apt-get install iproute2 nftables)");
        }
    }
    Ok(())
}

/// For the suite's own tests: without root the lab cannot run, and outside CI the test says it
/// was skipped (true); under `CI` (which runs as root) that is a failure, never a silent pass.
pub fn skip_without_root() -> bool {
    if let Err(e) = require_root() {
        assert!(std::env::var_os("CI").is_none(), "CI must run the lab as root: {e}");
        eprintln!("SKIPPED: {e}");
        return true;
    }
    false
}

pub(super) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub(super) fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args))
}

/// Removes whatever a previous lab left: its hubs, namespaces, bridge and forward rule.
pub fn clean_leftovers() {
    let list = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
    for line in String::from_utf8_lossy(&list).lines() {
        let Some(ns) = line.split_whitespace().next() else { continue };
        if !(ns.starts_with("hm-n") || ns.starts_with("hm-d")) {
            continue;
        }
        let pids = Command::new("ip").args(["netns", "pids", ns]).output().map(|o| o.stdout).unwrap_or_default();
        for pid in String::from_utf8_lossy(&pids).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    // The kernel destroys a deleted namespace (and the veth ends in it) in the background: wait
    // for the lab's veth ends in this namespace to go, and delete any that stay.
    for attempt in 0..50 {
        let links = Command::new("ip").args(["-o", "link", "show"]).output().map(|o| o.stdout).unwrap_or_default();
        let stale: Vec<String> = String::from_utf8_lossy(&links)
            .lines()
            .filter_map(|l| l.split(": ").nth(1)?.split('@').next().map(str::to_owned))
            // Veth ends: hmvN (LAN A), hmbN (LAN B), hmdN (device hosts); not the bridges (hmbrN).
            .filter(|name| ["hmv", "hmb", "hmd"].iter().any(|p| name.starts_with(p)) && !name.starts_with("hmbr"))
            .collect();
        if stale.is_empty() {
            break;
        }
        if attempt >= 20 {
            for name in &stale {
                let _ = Command::new("ip").args(["link", "del", name]).stderr(Stdio::null()).status();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for bridge in [BRIDGE, BRIDGE_B] {
        let _ = Command::new("ip").args(["link", "del", bridge]).stderr(Stdio::null()).status();
        // One delete per copy of the rule a crashed run may have left.
        for _ in 0..16 {
            let deleted = Command::new("iptables")
                .arg("-D")
                .args(forward_rule(bridge))
                .arg("ACCEPT")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !deleted {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_render_to_one_transaction() {
        let healed = Rules::default().script();
        assert!(healed.starts_with("table inet hubmesh_chaos\ndelete table inet hubmesh_chaos\n"), "{healed}");
        assert!(!healed.contains("drop"), "{healed}");
        let r = Rules { drop_from: [1, 2].into(), drop_to: [2].into(), flaky: [0].into(), flaky_percent: 30 };
        let s = r.script();
        assert!(s.contains("ip saddr { 10.77.0.12, 10.77.0.13 } counter drop"), "{s}");
        assert!(s.contains("ip daddr { 10.77.0.13 } counter drop"), "{s}");
        assert!(s.contains("ip saddr { 10.77.0.11 } numgen random mod 100 < 30 counter drop"), "{s}");
        for sep in [" ", ",", "\n"] {
            assert!(!s.contains(&format!("{CONTROLLER}{sep}")), "the controller is never cut off: {s}");
        }
    }
}
