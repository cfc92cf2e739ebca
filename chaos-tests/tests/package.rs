//! The Debian package, installed as a user installs it, in a Debian root of its own (root with
//! `debootstrap`; under `CI` their absence is a failure, never a silent pass): `deploy/build-deb`
//! packages this build's `hubmesh`; `dpkg -i` in a chroot creates the `hubmesh` user, its data dir
//! and the conffile; `systemd-analyze verify` accepts the hardened unit; the man pages and
//! completions are in place; `hubmesh join` writes the token where the unit reads it; a reinstall
//! (an upgrade) keeps the settings; purge removes the user and the token and keeps the hub's data
//! unless asked (`HUBMESH_PURGE_DATA=yes`).
//!
//! The Debian root is built once by `debootstrap --variant=minbase --include=systemd` (a few
//! minutes) and kept as a tarball in the target dir; each run unpacks a fresh copy.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const SUITE: &str = "bookworm";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// The stdout of `out`, failing the test with all it printed if `what` did not succeed.
fn succeeded(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    succeeded(&format!("{cmd:?}"), out)
}

/// A Debian root with systemd in `dir`, from the cached tarball or debootstrap.
fn debian_root(dir: &Path) {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("debian-{SUITE}-systemd.tar"));
    if !cache.exists() {
        let fresh = dir.with_extension("bootstrap");
        let _ = std::fs::remove_dir_all(&fresh);
        eprintln!("building a Debian root with debootstrap (once; cached in {})", cache.display());
        run(Command::new("debootstrap").args(["--variant=minbase", "--include=systemd", SUITE]).arg(&fresh));
        let partial = cache.with_extension("partial");
        run(Command::new("tar").arg("-C").arg(&fresh).arg("-cf").arg(&partial).arg("."));
        std::fs::rename(&partial, &cache).unwrap();
        std::fs::remove_dir_all(&fresh).unwrap();
    }
    std::fs::create_dir_all(dir).unwrap();
    run(Command::new("tar").arg("-C").arg(dir).arg("-xf").arg(&cache));
}

/// Runs `script` (sh) inside the chroot, with its own /proc, in a mount namespace of its own (the
/// mount goes away with it).
fn in_root(root: &Path, script: &str) -> Output {
    let wrapped = format!("mount -t proc proc {0}/proc && chroot {0} /bin/sh -ec '{1}'", root.display(), script);
    output(Command::new("unshare").args(["--mount", "--fork", "sh", "-ec", &wrapped]))
}

fn ok_in_root(root: &Path, script: &str) -> String {
    succeeded(&format!("in the chroot: {script}"), in_root(root, script))
}

#[test]
fn the_package_installs_a_hardened_service_joins_upgrades_and_purges() {
    let missing = [("debootstrap", "--version"), ("dpkg-deb", "--version"), ("unshare", "--version")].into_iter().find(
        |(tool, arg)| {
            !Command::new(tool).arg(arg).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
        },
    );
    let why = match (hubmesh_chaos::lab::require_root(), missing) {
        (Err(e), _) => Some(e.to_string()),
        (_, Some((tool, _))) => Some(format!("{tool} is not installed (apt-get install debootstrap dpkg util-linux)")),
        _ => None,
    };
    if let Some(why) = why {
        assert!(std::env::var_os("CI").is_none(), "CI must run the package test: {why}");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let bin = hubmesh_chaos::installable_hubmesh().expect("the hubmesh binary");
    let built =
        run(Command::new(repo().join("deploy/build-deb")).arg("--binary").arg(&bin).arg("--out").arg(work.path()));
    eprintln!("{}", built.trim());
    let deb = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");
    let root = work.path().join("root");
    debian_root(&root);
    std::fs::copy(&deb, root.join("tmp/hubmesh.deb")).unwrap();

    // Install: user, data dir, conffile, unit, man pages, completions.
    ok_in_root(&root, "dpkg -i /tmp/hubmesh.deb");
    let user = ok_in_root(&root, "getent passwd hubmesh");
    assert!(user.contains("/var/lib/hubmesh") && user.contains("nologin"), "{user}");
    let owners = ok_in_root(&root, "stat -c \"%U:%G %a %n\" /var/lib/hubmesh /etc/hubmesh/config.toml");
    assert_eq!(owners, "hubmesh:hubmesh 750 /var/lib/hubmesh\nroot:hubmesh 640 /etc/hubmesh/config.toml\n");
    assert_eq!(
        ok_in_root(&root, "dpkg-query -W -f=\"\\${Conffiles}\" hubmesh").split_whitespace().next(),
        Some("/etc/hubmesh/config.toml")
    );
    // The module compiler, where the hub looks for it, of the hub's own version.
    let versions = ok_in_root(&root, "hubmesh --version && /usr/libexec/hubmesh/hubmesh-compile --version");
    let versions: Vec<&str> = versions.lines().map(|l| l.split_whitespace().last().unwrap_or("")).collect();
    assert!(versions.len() == 2 && versions[0] == versions[1], "{versions:?}");
    ok_in_root(&root, "test -s /usr/share/man/man1/hubmesh.1.gz && test -s /usr/share/man/man1/hubmesh-up.1.gz");
    ok_in_root(&root, "grep -q hubmesh /usr/share/bash-completion/completions/hubmesh && test -s /usr/share/zsh/vendor-completions/_hubmesh");
    // The conffile's commented defaults are the hub's own: uncommented, they parse as its config.
    let config = ok_in_root(
        &root,
        "sed \"s/^# //\" /etc/hubmesh/config.toml > /tmp/c.toml && hubmesh config show --config /tmp/c.toml",
    );
    assert!(config.contains("data_dir = \"/var/lib/hubmesh\""), "{config}");

    // The unit passes systemd's own checks (its syntax, the user, the binary, the filters).
    let verify = in_root(&root, "systemd-analyze verify --man=no /lib/systemd/system/hubmesh.service");
    let said = format!("{}{}", String::from_utf8_lossy(&verify.stdout), String::from_utf8_lossy(&verify.stderr));
    assert!(verify.status.success() && !said.contains("hubmesh.service"), "systemd-analyze verify: {said}");
    let security =
        ok_in_root(&root, "systemd-analyze security --offline=true --no-pager /lib/systemd/system/hubmesh.service");
    let exposure = security.lines().rev().find(|l| l.contains("Overall exposure level")).expect("an exposure level");
    eprintln!("{}", exposure.trim());
    assert!(!exposure.contains("UNSAFE") && !exposure.contains("EXPOSED"), "{security}");

    // `hubmesh join`: a bad token changes nothing; a good one lands where the unit reads it.
    let bad = in_root(&root, "hubmesh join not-a-token --service \"\"");
    assert!(!bad.status.success());
    ok_in_root(&root, "test ! -e /etc/hubmesh/join.env");
    let token = format!("HM1.{}.0123456789abcdef.{}.10.0.0.1:7071", "ab".repeat(32), "cd".repeat(16));
    ok_in_root(&root, &format!("hubmesh join {token} --service \"\""));
    let env = ok_in_root(&root, "stat -c \"%U %a\" /etc/hubmesh/join.env && cat /etc/hubmesh/join.env");
    assert_eq!(env, format!("root 600\nHUBMESH_JOIN={token}\n"));

    // An upgrade (the same package again) keeps a changed setting and the data.
    ok_in_root(
        &root,
        "echo \"slots = 3\" >> /etc/hubmesh/config.toml && touch /var/lib/hubmesh/keep && dpkg -i /tmp/hubmesh.deb",
    );
    ok_in_root(&root, "grep -q \"^slots = 3\" /etc/hubmesh/config.toml && test -e /var/lib/hubmesh/keep");

    // Purge: the user, the settings and the token go; the data stays unless asked.
    ok_in_root(&root, "dpkg --purge hubmesh");
    ok_in_root(&root, "! getent passwd hubmesh && test ! -e /etc/hubmesh && test ! -e /usr/bin/hubmesh && test ! -e /usr/libexec/hubmesh && test -e /var/lib/hubmesh/keep");
    ok_in_root(&root, "dpkg -i /tmp/hubmesh.deb && HUBMESH_PURGE_DATA=yes dpkg --purge hubmesh");
    ok_in_root(&root, "test ! -e /var/lib/hubmesh && ! getent group hubmesh");
}
