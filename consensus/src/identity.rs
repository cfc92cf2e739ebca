//! A hub's identity on disk: its node id (in the Raft store) and its certificates
//! (`DATA_DIR/tls`: the CA certificate, the hub's certificate and its private key, mode 0600).

use std::path::Path;

use crate::consensus::{ConsensusConfig, StartError};
use crate::tls::{Identity, NodeKey};

const IDENTITY_TREE: &str = "identity";
const NODE_ID_KEY: &[u8] = b"node_id";
const CA_FILE: &str = "ca.der";
const CERT_FILE: &str = "node.der";
const KEY_FILE: &str = "node.key";

pub(crate) fn open_err(path: &Path) -> impl FnOnce(sled::Error) -> StartError + '_ {
    move |source| StartError::Open { path: path.to_owned(), source }
}

/// The certificates in `dir`: all three, none (a new hub), or an error for a partial set.
pub(crate) fn load(dir: &Path) -> Result<Option<Identity>, StartError> {
    let tls_err = |e: String| StartError::Tls { path: dir.to_owned(), message: e };
    let read = |name: &str| std::fs::read(dir.join(name));
    match (read(CA_FILE), read(CERT_FILE), read(KEY_FILE)) {
        (Ok(ca_der), Ok(cert_der), Ok(key)) => {
            let key = NodeKey::from_pkcs8(&key).map_err(|e| tls_err(e.to_string()))?;
            Ok(Some(Identity { ca_der, cert_der, key }))
        }
        (Err(_), Err(_), Err(_)) => Ok(None),
        _ => Err(tls_err("some certificate files are missing; restore them or start with an empty data dir".into())),
    }
}

/// Stores the certificates in `dir`, each file atomically and private.
pub(crate) fn save(dir: &Path, id: &Identity) -> Result<(), StartError> {
    let tls_err = |e: std::io::Error| StartError::Tls { path: dir.to_owned(), message: e.to_string() };
    for (name, bytes) in [(KEY_FILE, id.key.pkcs8()), (CA_FILE, &id.ca_der[..]), (CERT_FILE, &id.cert_der[..])] {
        hubmesh_storage::write_atomic(&dir.join(name), bytes, 0o600).map_err(tls_err)?;
    }
    Ok(())
}

/// Whether the Raft store holds any state (log, vote or snapshot).
pub(crate) fn has_raft_state(db: &sled::Db, dir: &Path) -> Result<bool, StartError> {
    let logs = db.open_tree("logs").map_err(open_err(dir))?;
    let meta = db.open_tree("meta").map_err(open_err(dir))?;
    let snap = db.open_tree("snapshot").map_err(open_err(dir))?;
    Ok(!logs.is_empty() || !meta.is_empty() || !snap.is_empty())
}

/// The node id stored in the Raft store, or a fresh one stored there now (only without state).
pub(crate) fn load_node_id(db: &sled::Db, cfg: &ConsensusConfig, has_state: bool) -> Result<u64, StartError> {
    let tree = db.open_tree(IDENTITY_TREE).map_err(open_err(&cfg.dir))?;
    if let Some(raw) = tree.get(NODE_ID_KEY).map_err(open_err(&cfg.dir))? {
        let bytes: [u8; 8] =
            raw.as_ref().try_into().map_err(|_| StartError::Inconsistent("the stored node id is malformed".into()))?;
        return Ok(u64::from_be_bytes(bytes));
    }
    if has_state {
        return Err(StartError::Inconsistent(format!(
            "the Raft store at {} has a log but no node id; refusing to start as a new voter",
            cfg.dir.display()
        )));
    }
    tree.insert(NODE_ID_KEY, &cfg.fresh_node_id.to_be_bytes()).map_err(open_err(&cfg.dir))?;
    db.flush().map_err(open_err(&cfg.dir))?;
    Ok(cfg.fresh_node_id)
}
