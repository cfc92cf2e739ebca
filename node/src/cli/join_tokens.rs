//! Join tokens passed through a file, so that hubs started together (a compose file, a
//! provisioning script) form a mesh with nobody copying a token by hand: the first hub publishes
//! one (`up --publish-join-token PATH`), the others wait for it (`up --join-file PATH`). The file
//! holds a secret: it is written with mode 0600, atomically (a reader never sees half a token).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::time::Instant;

use crate::client::Client;
use crate::server::{API_ADDR_FILE, TLS_DIR, TOKEN_FILE};

/// How long a published token is valid, and how often a new one replaces it: the file always
/// holds a token valid for at least half an hour.
const VALID: &str = "1h";
const RENEW: Duration = Duration::from_secs(30 * 60);
/// How soon a token that could not be published is tried again.
const RETRY: Duration = Duration::from_secs(60);
/// How long the hub may take to answer its own first request for a token (boot, election).
const READY_WAIT: Duration = Duration::from_secs(300);
/// How often a missing file, or a hub that cannot make a token yet, is tried again.
const POLL: Duration = Duration::from_millis(500);

/// The token to join with for a hub whose data dir is `data_dir`: none when the hub is already a
/// member (it has its certificates; a restart must not wait for a file it no longer needs), else
/// the content of `path`, waited for up to `wait`.
pub(super) async fn read(data_dir: &Path, path: &Path, wait: Duration) -> anyhow::Result<Option<String>> {
    if data_dir.join(TLS_DIR).exists() {
        return Ok(None);
    }
    let deadline = Instant::now() + wait;
    let mut told = false;
    loop {
        match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => return Ok(Some(t.trim().to_owned())),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading the join token file {}", path.display())),
        }
        if Instant::now() >= deadline {
            bail!("no join token appeared in {} within {}s", path.display(), wait.as_secs());
        }
        if !told {
            tracing::info!(path = %path.display(), "waiting for a join token");
            told = true;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Writes a fresh join token from this hub to `path`, then again every [`RENEW`], for as long as
/// the hub runs. A failure (the hub has no quorum at that moment, the disk is full) is logged and
/// tried again a minute later: the token in the file is valid for half an hour more.
pub(super) async fn publish(data_dir: &Path, path: &Path) {
    loop {
        let written = async {
            let token = create(data_dir).await?;
            hubmesh_storage::write_atomic(path, format!("{token}\n").as_bytes(), 0o600)
                .with_context(|| format!("writing {}", path.display()))
        };
        let next = match written.await {
            Ok(()) => {
                tracing::info!(path = %path.display(), valid = VALID, "published a join token");
                RENEW
            }
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "no join token published; trying again in a minute");
                RETRY
            }
        };
        tokio::time::sleep(next).await;
    }
}

/// A join token from this hub's own API, asked for as any client would (the address and admin
/// token it wrote into its data dir), once it can make one: after its boot, with a quorum.
async fn create(data_dir: &Path) -> anyhow::Result<String> {
    let deadline = Instant::now() + READY_WAIT;
    loop {
        let attempt = async {
            let addr: std::net::SocketAddr = std::fs::read_to_string(data_dir.join(API_ADDR_FILE))?.trim().parse()?;
            // A wildcard bind is reached on loopback.
            let addr = match addr.ip().is_unspecified() {
                true => std::net::SocketAddr::from(([127, 0, 0, 1], addr.port())),
                false => addr,
            };
            let admin = std::fs::read_to_string(data_dir.join(TOKEN_FILE))?.trim().to_owned();
            let client = Client::with_timeout(&format!("http://{addr}"), Some(admin), Duration::from_secs(10));
            anyhow::Ok(client.create_token(Some(VALID)).await?.token)
        };
        match attempt.await {
            Ok(token) => return Ok(token),
            Err(e) if Instant::now() >= deadline => return Err(e.context("asking this hub for a join token")),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// `hubmesh join`: checks `token` and that the hub at `data_dir` is not a member yet, writes
/// `HUBMESH_JOIN=token` to `env_file` (mode 0600: systemd reads it as root), then restarts
/// `service` (unless empty) so that the hub starts and joins.
pub(super) fn install(token: &str, data_dir: &Path, env_file: &Path, service: &str) -> anyhow::Result<()> {
    let token = token.trim();
    // `-`: from stdin, so that the secret is in neither the process list nor the shell history.
    let mut read = String::new();
    let token = match token {
        "-" => {
            std::io::stdin().read_line(&mut read).context("reading the token from stdin")?;
            read.trim()
        }
        t => t,
    };
    hubmesh_consensus::join::JoinToken::parse(token).context("the join token")?;
    if data_dir.join(TLS_DIR).exists() {
        bail!(
            "the hub at {} is already a member of a mesh; to move it to another, remove it from its mesh \
             (`hubmesh node rm`), stop it and empty its data dir first",
            data_dir.display()
        );
    }
    hubmesh_storage::write_atomic(env_file, format!("HUBMESH_JOIN={token}\n").as_bytes(), 0o600)
        .with_context(|| format!("writing {}", env_file.display()))?;
    println!("wrote the token to {}", env_file.display());
    if service.is_empty() {
        return Ok(());
    }
    for args in [&["enable", service][..], &["restart", service]] {
        let status = std::process::Command::new("systemctl")
            .args(args)
            .status()
            .with_context(|| format!("running systemctl {}", args.join(" ")))?;
        if !status.success() {
            bail!("systemctl {} failed ({status})", args.join(" "));
        }
    }
    println!("{service} restarted: it joins the mesh (`journalctl -u {service}` shows how it went)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_member_does_not_wait_and_a_new_hub_reads_the_token_once_it_appears() {
        let dir = tempfile::tempdir().unwrap();
        let (data, file) = (dir.path().join("data"), dir.path().join("shared/join.token"));
        let writer = {
            let file = file.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(700)).await;
                hubmesh_storage::write_atomic(&file, b"HM1.abc\n", 0o600).unwrap();
            })
        };
        let token = read(&data, &file, Duration::from_secs(10)).await.unwrap();
        assert_eq!(token.as_deref(), Some("HM1.abc"));
        writer.await.unwrap();
        std::fs::create_dir_all(data.join(TLS_DIR)).unwrap();
        assert_eq!(read(&data, &dir.path().join("never"), Duration::from_secs(10)).await.unwrap(), None);
    }

    #[test]
    fn join_refuses_a_bad_token_and_a_member_and_writes_a_private_env_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (data, env) = (dir.path().join("data"), dir.path().join("etc/join.env"));
        assert!(install("not-a-token", &data, &env, "").is_err());
        assert!(!env.exists(), "a refused token writes nothing");
        let token = hubmesh_consensus::join::JoinToken::fresh([7; 32], "10.0.0.1:7071".parse().unwrap()).to_string();
        install(&format!("{token}\n"), &data, &env, "").unwrap();
        assert_eq!(std::fs::read_to_string(&env).unwrap(), format!("HUBMESH_JOIN={token}\n"));
        assert_eq!(std::fs::metadata(&env).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::remove_file(&env).unwrap();
        std::fs::create_dir_all(data.join(TLS_DIR)).unwrap();
        assert!(install(&token, &data, &env, "").is_err(), "a member does not join again");
        assert!(!env.exists());
    }

    #[tokio::test]
    async fn a_token_that_never_comes_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = read(dir.path(), &dir.path().join("join.token"), Duration::from_millis(600)).await.unwrap_err();
        assert!(format!("{err:#}").contains("join.token"), "{err:#}");
    }
}
