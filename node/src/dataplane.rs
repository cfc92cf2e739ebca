//! The node's data-plane handlers on the mesh endpoint: module blobs and forwarded invocations.
//!
//! ```text
//!  reconcile: blob missing --MODULE_FETCH(hash)--> any other hub --> verify blake3 --> BlobStore
//!  invoke on hub A, instance on hub B --INVOKE_FORWARD--> B: Hub::invoke_here (never forwards)
//! ```

use std::sync::Arc;
use std::time::Duration;

use hubmesh_consensus::state::Placement;
use hubmesh_consensus::transport::{handler, kind, Caller, RpcError};
use hubmesh_consensus::{Epoch, NodeId};
use hubmesh_proto::{pb, Message};
use hubmesh_storage::Hash;

use crate::executor::{Answer, InvokeError};
use crate::hub::Hub;

/// Stream kind: fetch a module blob.
pub(crate) const MODULE_FETCH: u32 = kind::FIRST_NODE_KIND;
/// Stream kind: a forwarded invocation.
pub(crate) const INVOKE_FORWARD: u32 = kind::FIRST_NODE_KIND + 1;

pub(crate) fn refuse(code: pb::ErrorCode, message: impl Into<String>) -> RpcError {
    RpcError::Remote { code: code as i32, message: message.into() }
}

/// Checks that a member calls and that the hub still runs.
pub(crate) fn member(caller: Caller, hub: &std::sync::Weak<Hub>) -> Result<Arc<Hub>, RpcError> {
    if caller == Caller::Joiner {
        return Err(refuse(pb::ErrorCode::Unauthorized, "members only"));
    }
    hub.upgrade().ok_or_else(|| refuse(pb::ErrorCode::Unavailable, "shutting down"))
}

/// [`member`], then decodes the request.
pub(crate) fn member_request<M: Message + Default>(
    caller: Caller,
    hub: &std::sync::Weak<Hub>,
    payload: &[u8],
) -> Result<(Arc<Hub>, M), RpcError> {
    let hub = member(caller, hub)?;
    let req = M::decode(payload).map_err(|e| refuse(pb::ErrorCode::BadRequest, e.to_string()))?;
    Ok((hub, req))
}

/// Registers the handlers; called once at boot.
pub(crate) fn register(hub: &Arc<Hub>) {
    let transport = hub.consensus.transport();
    let h = Arc::downgrade(hub);
    transport.register(
        MODULE_FETCH,
        handler(move |caller, payload| {
            let h = h.clone();
            async move {
                let (hub, req) = member_request::<pb::ModuleFetchRequest>(caller, &h, &payload)?;
                let hash = Hash::from_slice(&req.hash)
                    .ok_or_else(|| refuse(pb::ErrorCode::BadRequest, "a hash is 32 bytes"))?;
                hub.blobs.get(&hash).map_err(|e| refuse(pb::ErrorCode::NotFound, e.to_string()))
            }
        }),
    );
    let h = Arc::downgrade(hub);
    transport.register(
        INVOKE_FORWARD,
        handler(move |caller, payload| {
            let h = h.clone();
            async move {
                let (hub, req) = member_request::<pb::InvokeForwardRequest>(caller, &h, &payload)?;
                let key = (!req.key.is_empty()).then_some(req.key);
                match hub.invoke_here(&req.task, req.input, key).await {
                    Ok((answer, placement)) => Ok(pb::InvokeForwardResponse {
                        status: answer.status,
                        output: answer.output,
                        epoch: placement.epoch.0,
                        node: placement.node.0,
                    }
                    .encode_to_vec()),
                    Err(e) => Err(RpcError::Remote {
                        code: pb::ErrorCode::TaskError as i32,
                        message: serde_json::to_string(&e).unwrap_or_else(|_| e.to_string()),
                    }),
                }
            }
        }),
    );
}

/// Fetches a module from any other hub that has it, verifying its hash.
pub(crate) async fn fetch_module(hub: &Hub, hash: &Hash) -> Result<Vec<u8>, String> {
    let state = hub.consensus.state();
    let me = hub.consensus.node_id();
    let transport = hub.consensus.transport();
    let mut last = "no other hub".to_owned();
    // Hubs the state says are up first: a dead one only answers with a timeout.
    let mut nodes: Vec<&NodeId> = state.nodes.keys().filter(|n| **n != me).collect();
    nodes.sort_by_key(|n| state.nodes.get(n).is_none_or(|r| r.status != hubmesh_consensus::state::NodeStatus::Up));
    for node in nodes {
        let req = pb::ModuleFetchRequest { hash: hash.0.to_vec() }.encode_to_vec();
        match transport.call(node.0, MODULE_FETCH, req, Duration::from_secs(30)).await {
            Ok(bytes) if Hash::of(&bytes) == *hash => return Ok(bytes),
            Ok(_) => last = format!("hub {node} sent a module that does not match its hash"),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!("module {hash} is on no reachable hub ({last})"))
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
/// completes (then: `Unreachable` if `node` never received the call, else `Timeout`).
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
    let req = pb::InvokeForwardRequest { task: task.to_owned(), input, key: key.unwrap_or_default() }.encode_to_vec();
    match hub.consensus.transport().call_unless(node.0, INVOKE_FORWARD, req, timeout, give_up).await {
        Ok(raw) => match pb::InvokeForwardResponse::decode(raw.as_slice()) {
            Ok(r) => {
                let ran = (r.epoch != 0).then_some(Placement { node: NodeId(r.node), epoch: Epoch(r.epoch) });
                Forwarded::Answer(Answer { status: r.status, output: r.output }, ran)
            }
            Err(e) => Forwarded::Failed(InvokeError::Unavailable(format!("bad answer from hub {node}: {e}"))),
        },
        Err(RpcError::Remote { message, .. }) => {
            Forwarded::Failed(serde_json::from_str(&message).unwrap_or(InvokeError::Unavailable(message)))
        }
        Err(RpcError::Unreachable(_, m)) => Forwarded::Unreachable(m),
        Err(e @ RpcError::NotDelivered(_)) => Forwarded::Unreachable(e.to_string()),
        Err(RpcError::Timeout) => Forwarded::Timeout,
        Err(RpcError::Protocol(m)) => Forwarded::Failed(InvokeError::Unavailable(m)),
    }
}
