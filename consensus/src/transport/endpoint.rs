//! Typed endpoints (Garage's `Endpoint<M, H>`): a stream kind paired with its request and answer
//! types, so that encoding, decoding and the member check are written once, here, and a caller
//! cannot send one kind's request to another kind's handler.
//!
//! ```text
//!  ENDPOINT.call(&transport, target, &req, timeout)
//!     target is this hub --> the registered handler, in process (no QUIC)
//!     else               --> Transport::call_unless(kind, req.encode) --> decode the answer
//!  ENDPOINT.serve(&transport, |from: NodeId, req| async { Ok(resp) | Err(Refusal) })
//!     decode (BadRequest if it does not) --> handler --> encode; joiners never reach it
//! ```

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use hubmesh_proto::{pb, Message};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::bulk::{BulkBody, BulkCall};
use super::{Caller, Refusal, RpcError, StreamKind, Transport};
use crate::ids::NodeId;
use crate::type_config::TypeConfig;

/// A value that travels as the payload of a request or an answer.
pub trait Wire: Sized + Send + 'static {
    /// Its bytes.
    fn to_wire(&self) -> Result<Vec<u8>, String>;
    /// Reads it back; a peer's garbage is an error, never a panic.
    fn from_wire(raw: &[u8]) -> Result<Self, String>;
}

impl<M: Message + Default + 'static> Wire for M {
    fn to_wire(&self) -> Result<Vec<u8>, String> {
        Ok(self.encode_to_vec())
    }

    fn from_wire(raw: &[u8]) -> Result<Self, String> {
        Self::decode(raw).map_err(|e| e.to_string())
    }
}

/// A serde value on the wire: openraft's own messages, which come with serde and not protobuf.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T: Serialize + DeserializeOwned + Send + 'static> Wire for Json<T> {
    fn to_wire(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec(&self.0).map_err(|e| e.to_string())
    }

    fn from_wire(raw: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(raw).map(Json).map_err(|e| e.to_string())
    }
}

/// A unary call kind with its request and answer types.
pub struct Endpoint<Req, Resp> {
    kind: StreamKind,
    types: PhantomData<fn(Req) -> Resp>,
}

impl<Req: Wire, Resp: Wire> Endpoint<Req, Resp> {
    const fn new(kind: StreamKind) -> Self {
        Self { kind, types: PhantomData }
    }

    /// Its stream kind.
    pub fn kind(&self) -> StreamKind {
        self.kind
    }

    /// Decodes a request as the serving side does (for the fuzz targets).
    pub fn decode_request(&self, raw: &[u8]) -> Result<Req, String> {
        Req::from_wire(raw)
    }

    /// Decodes an answer as the calling side does (for the fuzz targets).
    pub fn decode_answer(&self, raw: &[u8]) -> Result<Resp, String> {
        Resp::from_wire(raw)
    }

    /// Calls `target` (this hub itself in process).
    pub async fn call(&self, t: &Transport, target: u64, req: &Req, timeout: Duration) -> Result<Resp, RpcError> {
        self.call_unless(t, target, req, timeout, std::future::pending()).await
    }

    /// Like [`call`](Self::call), but stops waiting when `give_up` completes (see
    /// [`Transport::call_unless`]).
    pub async fn call_unless(
        &self,
        t: &Transport,
        target: u64,
        req: &Req,
        timeout: Duration,
        give_up: impl Future<Output = ()>,
    ) -> Result<Resp, RpcError> {
        let payload = req.to_wire().map_err(RpcError::Protocol)?;
        let raw = if target == t.node_id() {
            t.call_local(self.kind, payload, timeout, give_up).await?
        } else {
            t.call_unless(target, self.kind, payload, timeout, give_up).await?
        };
        Resp::from_wire(&raw).map_err(|e| RpcError::Protocol(format!("{}: an undecodable answer: {e}", self.kind)))
    }

    /// Serves this kind for members: `f` gets the calling hub's id and the decoded request.
    pub fn serve<F, Fut>(&self, t: &Transport, f: F)
    where
        F: Fn(NodeId, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, Refusal>> + Send + 'static,
    {
        let f = Arc::new(f);
        self.serve_any(t, move |caller, req| {
            let f = f.clone();
            async move {
                match caller {
                    Caller::Member(id) => f(NodeId(id), req).await,
                    Caller::Joiner => Err(Refusal::new(pb::ErrorCode::Unauthorized, "members only")),
                }
            }
        });
    }

    /// Serves this kind for any caller the endpoint lets through (joiners only reach `JOIN`).
    pub fn serve_any<F, Fut>(&self, t: &Transport, f: F)
    where
        F: Fn(Caller, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, Refusal>> + Send + 'static,
    {
        let f = Arc::new(f);
        let kind = self.kind;
        t.register(
            kind,
            Arc::new(move |caller, payload: Vec<u8>| {
                let f = f.clone();
                Box::pin(async move {
                    let req = Req::from_wire(&payload)
                        .map_err(|e| Refusal::bad_request(format!("{kind}: an undecodable request: {e}")))?;
                    f(caller, req).await?.to_wire().map_err(Refusal::internal)
                })
            }),
        );
    }
}

/// A bulk stream kind with its header and answer types.
pub struct BulkEndpoint<Header, Resp> {
    kind: StreamKind,
    types: PhantomData<fn(Header) -> Resp>,
}

/// A typed bulk stream being sent.
pub struct TypedBulkCall<Resp> {
    call: BulkCall,
    kind: StreamKind,
    types: PhantomData<fn() -> Resp>,
}

impl<Resp: Wire> TypedBulkCall<Resp> {
    /// Queues a piece of the body (see [`BulkCall::send`]).
    pub async fn send(&mut self, chunk: bytes::Bytes) -> Result<(), RpcError> {
        self.call.send(chunk).await
    }

    /// Ends the body and waits for the answer.
    pub async fn finish(self) -> Result<Resp, RpcError> {
        let raw = self.call.finish().await?;
        Resp::from_wire(&raw).map_err(|e| RpcError::Protocol(format!("{}: an undecodable answer: {e}", self.kind)))
    }
}

impl<Header: Wire, Resp: Wire> BulkEndpoint<Header, Resp> {
    const fn new(kind: StreamKind) -> Self {
        Self { kind, types: PhantomData }
    }

    /// Its stream kind.
    pub fn kind(&self) -> StreamKind {
        self.kind
    }

    /// Decodes a bulk stream's header as the serving side does (for the fuzz targets).
    pub fn decode_header(&self, raw: &[u8]) -> Result<Header, String> {
        Header::from_wire(raw)
    }

    /// Opens a stream to `target` and sends the header; the caller sends the body.
    pub async fn open(&self, t: &Transport, target: u64, header: &Header) -> Result<TypedBulkCall<Resp>, RpcError> {
        let raw = header.to_wire().map_err(RpcError::Protocol)?;
        let call = t.call_bulk(target, self.kind, raw).await?;
        Ok(TypedBulkCall { call, kind: self.kind, types: PhantomData })
    }

    /// Serves this kind (members only: joiners are refused before their header is read).
    pub fn serve<F, Fut>(&self, t: &Transport, f: F)
    where
        F: Fn(NodeId, Header, BulkBody) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, Refusal>> + Send + 'static,
    {
        let f = Arc::new(f);
        let kind = self.kind;
        t.register_bulk(
            kind,
            Arc::new(move |caller, raw: Vec<u8>, body| {
                let f = f.clone();
                Box::pin(async move {
                    let Caller::Member(from) = caller else {
                        return Err(Refusal::new(pb::ErrorCode::Unauthorized, "members only"));
                    };
                    let header = Header::from_wire(&raw)
                        .map_err(|e| Refusal::bad_request(format!("{kind}: an undecodable header: {e}")))?;
                    f(NodeId(from), header, body).await?.to_wire().map_err(Refusal::internal)
                })
            }),
        );
    }
}

/// The answer of a Raft RPC as openraft produces it.
type RaftAnswer<T, E = openraft::error::Infallible> = Json<Result<T, RaftError<u64, E>>>;

/// openraft AppendEntries, with what the leader's lease lends its followers.
pub const RAFT_APPEND: Endpoint<Json<LeaderAppend>, RaftAnswer<AppendEntriesResponse<u64>>> =
    Endpoint::new(StreamKind::RaftAppend);
/// openraft Vote.
pub const RAFT_VOTE: Endpoint<Json<VoteRequest<u64>>, RaftAnswer<VoteResponse<u64>>> =
    Endpoint::new(StreamKind::RaftVote);
/// openraft InstallSnapshot.
pub const RAFT_SNAPSHOT: Endpoint<
    Json<InstallSnapshotRequest<TypeConfig>>,
    RaftAnswer<InstallSnapshotResponse<u64>, InstallSnapshotError>,
> = Endpoint::new(StreamKind::RaftSnapshot);
/// A joiner's request for a certificate.
pub const JOIN: Endpoint<pb::JoinRequest, pb::JoinResponse> = Endpoint::new(StreamKind::Join);
/// Are you there, and do you hear a leader? (The election gate's probe between voters.)
pub const PING: Endpoint<Json<()>, Json<PingAnswer>> = Endpoint::new(StreamKind::Ping);

/// An append as a leader sends it: openraft's request, and how old the leader's last quorum
/// acknowledgement was when it sent it — all that a follower's lease may borrow (`lease`).
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct LeaderAppend {
    pub entries: AppendEntriesRequest<TypeConfig>,
    /// In microseconds; `None`: the sender has none to lend (it has not led long enough for a
    /// quorum to acknowledge it).
    #[serde(default)]
    pub quorum_ack_age_us: Option<u64>,
}

/// A voter's answer to the election gate's ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PingAnswer {
    /// The answering voter hears a leader: it leads with a recent quorum, or it took Raft
    /// entries from the leader it follows recently.
    pub hears_leader: bool,
    /// The index of the last entry in its log (none from a hub of an older version): a voter
    /// whose log is shorter than another leaderless voter's lets that one campaign first.
    #[serde(default)]
    pub last_log_index: Option<u64>,
    /// The leader it knows of, itself included (none from a hub of an older version).
    #[serde(default)]
    pub leader: Option<u64>,
}
/// The log index a read on this hub must have applied to see everything the leader committed.
pub const READ_INDEX: Endpoint<Json<()>, Json<u64>> = Endpoint::new(StreamKind::ReadIndex);
/// A follower's proposal, forwarded to the leader.
pub const PROPOSE: Endpoint<pb::ProposeRequest, pb::ProposeResponse> = Endpoint::new(StreamKind::Propose);
/// A module blob by hash.
pub const MODULE_FETCH: Endpoint<pb::ModuleFetchRequest, pb::ModuleFetchResponse> =
    Endpoint::new(StreamKind::ModuleFetch);
/// An invocation forwarded to the instance's host.
pub const INVOKE_FORWARD: Endpoint<pb::InvokeForwardRequest, pb::InvokeForwardResponse> =
    Endpoint::new(StreamKind::InvokeForward);
/// A checkpoint's pages and manifest, host to holder.
pub const CHECKPOINT_PUSH: BulkEndpoint<pb::CheckpointPush, pb::CheckpointPushResponse> =
    BulkEndpoint::new(StreamKind::CheckpointPush);
/// A checkpoint's manifest and pages, to a new host.
pub const CHECKPOINT_FETCH: Endpoint<pb::CheckpointFetch, pb::CheckpointFetchResponse> =
    Endpoint::new(StreamKind::CheckpointFetch);
/// Ask a task's host to live-migrate it.
pub const MIGRATE_REQUEST: Endpoint<pb::MigrateRequest, pb::MigrateReport> = Endpoint::new(StreamKind::MigrateRequest);
/// A live migration's source asks the target to get ready.
pub const MIGRATE_PREPARE: Endpoint<pb::MigratePrepare, pb::MigratePrepareResponse> =
    Endpoint::new(StreamKind::MigratePrepare);
/// A live migration's pages (and, last, its manifest), source to target.
pub const MIGRATE_PAGES: Endpoint<pb::MigratePages, pb::MigratePagesResponse> = Endpoint::new(StreamKind::MigratePages);
/// A live migration ended.
pub const MIGRATE_END: Endpoint<pb::MigrateEnd, pb::MigrateEndResponse> = Endpoint::new(StreamKind::MigrateEnd);
/// A live migration's switch is being committed: answer once the target serves.
pub const MIGRATE_WATCH: Endpoint<pb::MigrateWatch, pb::MigrateEndResponse> = Endpoint::new(StreamKind::MigrateWatch);
