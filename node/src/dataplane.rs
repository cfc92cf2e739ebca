//! The node's data-plane endpoints on the mesh: module blobs and forwarded invocations. The
//! checkpoint endpoints are `replication`'s. Typed endpoints check the caller and decode; these
//! handlers only serve.
//!
//! ```text
//!  reconcile: blob missing --MODULE_FETCH(hash)--> any other hub --> verify blake3 --> BlobStore
//!  invoke on hub A, instance on hub B --INVOKE_FORWARD--> B: Hub::invoke_here (never forwards)
//!       B's InvokeError --> Refusal{code, hint} --> the same InvokeError on A (`wire`)
//! ```

use std::sync::{Arc, Weak};
use std::time::Duration;

use hubmesh_consensus::state::Placement;
use hubmesh_consensus::transport::{Refusal, RpcError, INVOKE_FORWARD, MODULE_FETCH};
use hubmesh_consensus::{Epoch, NodeId};
use hubmesh_proto::pb;
use hubmesh_storage::Hash;

use crate::executor::{Answer, InvokeError};
use crate::hub::Hub;

/// The hub, if it still runs.
pub(crate) fn alive(hub: &Weak<Hub>) -> Result<Arc<Hub>, Refusal> {
    hub.upgrade().ok_or_else(|| Refusal::new(pb::ErrorCode::Unavailable, "shutting down"))
}

/// Serves the endpoints; called once at boot.
pub(crate) fn register(hub: &Arc<Hub>) {
    let transport = hub.consensus().transport();
    let h = Arc::downgrade(hub);
    MODULE_FETCH.serve(&transport, move |_from, req: pb::ModuleFetchRequest| {
        let h = h.clone();
        async move {
            let hub = alive(&h)?;
            let hash = Hash::from_slice(&req.hash).ok_or_else(|| Refusal::bad_request("a hash is 32 bytes"))?;
            let module = hub.blobs().get(&hash).map_err(|e| Refusal::new(pb::ErrorCode::NotFound, e.to_string()))?;
            Ok(pb::ModuleFetchResponse { module })
        }
    });
    let h = Arc::downgrade(hub);
    INVOKE_FORWARD.serve(&transport, move |_from, req: pb::InvokeForwardRequest| {
        let h = h.clone();
        async move {
            let hub = alive(&h)?;
            let key = (!req.key.is_empty()).then_some(req.key);
            let (answer, placement) = hub.invoke_here(&req.task, req.input, key).await.map_err(Refusal::from)?;
            Ok(pb::InvokeForwardResponse {
                status: answer.status,
                output: answer.output,
                epoch: placement.epoch.0,
                node: placement.node.0,
            })
        }
    });
}

/// Why no hub gave a module.
#[derive(Debug, thiserror::Error)]
#[error("module {hash} is on no reachable hub ({last})")]
pub(crate) struct FetchModuleError {
    hash: Hash,
    last: String,
}

/// Fetches a module from any other hub that has it, verifying its hash.
pub(crate) async fn fetch_module(hub: &Hub, hash: &Hash) -> Result<Vec<u8>, FetchModuleError> {
    let state = hub.consensus().state();
    let me = hub.consensus().node_id();
    let transport = hub.consensus().transport();
    let mut last = "no other hub".to_owned();
    // Hubs the state says are up first: a dead one only answers with a timeout.
    let mut nodes: Vec<&NodeId> = state.nodes.keys().filter(|n| **n != me).collect();
    nodes.sort_by_key(|n| !state.is_up(**n));
    let req = pb::ModuleFetchRequest { hash: hash.0.to_vec() };
    for node in nodes {
        match MODULE_FETCH.call(&transport, node.0, &req, Duration::from_secs(30)).await {
            Ok(r) if Hash::of(&r.module) == *hash => return Ok(r.module),
            Ok(_) => last = format!("hub {node} sent a module that does not match its hash"),
            Err(e) => last = e.to_string(),
        }
    }
    Err(FetchModuleError { hash: *hash, last })
}

/// What a forwarded invocation returned.
pub(crate) enum Forwarded {
    /// The answer and the instance that gave it (its hub and epoch, which may be newer than the
    /// placement the caller aimed at).
    Answer(Answer, Option<Placement>),
    Failed(InvokeError),
    /// The hub could not be reached: the instance may be moving.
    Unreachable(String),
    /// No answer in time: the outcome is unknown.
    Timeout,
}

impl Forwarded {
    /// A word for logs.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Answer(..) => "answer",
            Self::Failed(_) => "failed",
            Self::Unreachable(_) => "unreachable",
            Self::Timeout => "timeout",
        }
    }
}

/// Forwards an invocation to `node`, waiting for its answer until `timeout` or until `give_up`
/// completes (then: `Unreachable` if the request's end was never sent, or `node` refused the
/// connection before taking streams — it cannot have run the call — else `Timeout`).
pub(crate) async fn forward(
    hub: &Hub,
    node: NodeId,
    task: &str,
    input: Vec<u8>,
    key: Option<String>,
    timeout: Duration,
    give_up: impl std::future::Future<Output = ()>,
) -> Forwarded {
    if let Some(d) = crate::faults::delay("delay-forward") {
        tokio::time::sleep(d).await;
    }
    if crate::faults::armed("drop-forward") {
        return Forwarded::Unreachable("dropped by the drop-forward fault".into());
    }
    let req = pb::InvokeForwardRequest { task: task.to_owned(), input, key: key.unwrap_or_default() };
    match INVOKE_FORWARD.call_unless(&hub.consensus().transport(), node.0, &req, timeout, give_up).await {
        Ok(r) => {
            let ran = (r.epoch != 0).then_some(Placement { node: NodeId(r.node), epoch: Epoch(r.epoch) });
            Forwarded::Answer(Answer { status: r.status, output: r.output }, ran)
        }
        Err(RpcError::Remote(refusal)) => Forwarded::Failed(refusal.into()),
        Err(RpcError::Unreachable(_, m)) => Forwarded::Unreachable(m),
        Err(e @ RpcError::NotDelivered(_)) => Forwarded::Unreachable(e.to_string()),
        Err(RpcError::Timeout) => Forwarded::Timeout,
        // An answer that cannot be read came after the request was sent: the call may have run.
        Err(RpcError::Protocol(m)) => {
            tracing::warn!(node = node.0, task, error = %m, "a forwarded call's answer could not be read");
            Forwarded::Timeout
        }
    }
}
