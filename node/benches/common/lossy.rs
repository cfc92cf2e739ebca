//! A lossy holder on loopback: nftables drops a share of the UDP packets to and from one hub's
//! mesh port (`tc netem` does not work here). Needs root; the table is removed on drop.

use std::io::Write;
use std::process::{Command, Stdio};

/// The nftables table this bench owns.
const TABLE: &str = "hubmesh_bench_lossy";

/// An armed packet loss; dropping it removes the table.
pub(crate) struct Loss;

impl Loss {
    /// Drops `percent` % of the UDP packets to and from `port` on this host.
    pub(crate) fn on_port(port: u16, percent: u8) -> Result<Self, String> {
        let script = format!(
            "table inet {TABLE} {{\n  chain input {{\n    type filter hook input priority -10;\n    \
             udp dport {port} numgen random mod 100 < {percent} counter drop\n    \
             udp sport {port} numgen random mod 100 < {percent} counter drop\n  }}\n}}\n"
        );
        let _ = Command::new("nft").args(["delete", "table", "inet", TABLE]).stderr(Stdio::null()).status();
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .map_err(|e| format!("nft (Debian: nftables) could not start: {e}"))?;
        child.stdin.take().expect("piped").write_all(script.as_bytes()).map_err(|e| e.to_string())?;
        let status = child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("nft refused the loss rules ({status}); this mode needs root"));
        }
        Ok(Self)
    }

    /// Packets dropped so far (the rules' counters).
    pub(crate) fn dropped(&self) -> u64 {
        let out = Command::new("nft").args(["list", "table", "inet", TABLE]).output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        text.split("packets ").skip(1).filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok()).sum()
    }
}

impl Drop for Loss {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", TABLE]).status();
    }
}
