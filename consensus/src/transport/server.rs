//! The serving side of the endpoint: accepts connections (within the limits of [`super::admission`]),
//! tells members from joiners by their certificate, reads each stream's request (size-limited, a
//! joiner's to a few KiB) and hands it to the handler of its kind; a member's kept stream
//! (`kept`) is read frame after frame by one task. Nothing here panics on its input: garbage gets
//! a `BadRequest` answer or a closed stream.

use std::net::IpAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use hubmesh_proto::{pb, Message};

use super::admission::{Peer, Pending};
use super::bulk::BulkBody;
use super::kept::{read_frame, write_frame, FrameError, KEEP_MARK, MAX_KEPT_REQUEST};
use super::{lock, quic, Caller, Refusal, StreamKind, Transport, BULK_MARK, CLOSE_REFUSED, MAX_BULK_HEADER, MAX_FRAME};

/// Largest request a joiner may send (a `JoinRequest` is a few hundred bytes).
pub const MAX_JOIN_REQUEST: usize = 16 << 10;
/// How long a connection without a certificate may wait for and send its requests.
const JOINER_LIFETIME: Duration = Duration::from_secs(10);
/// How long a joiner may take to receive its answer (one that never reads would hold its slot).
const JOINER_ANSWER_TIME: Duration = Duration::from_secs(5);
/// How long an admitted joiner may take to receive its certificate.
const ADMITTED_ANSWER_TIME: Duration = Duration::from_secs(60);
/// How long a handshake may take (a peer that keeps one going forever holds a slot).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

pub(super) async fn accept_loop(transport: Weak<Transport>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let Some(t) = transport.upgrade() else { return };
        // A stateless retry first: only a peer that receives at its source address gets a slot,
        // so spoofed packets cannot fill the slots of a member's address.
        if !incoming.remote_address_validated() {
            let _ = incoming.retry();
            continue;
        }
        let from = incoming.remote_address();
        // A known member's own endpoint (its mesh address) does not queue behind strangers.
        // When its own few are taken (a burst of its calls, each opening a connection), it queues
        // with strangers rather than being refused.
        let slot = if t.is_peer_address(from) {
            t.admission.member_connection(from).or_else(|| t.admission.connection(from.ip()))
        } else {
            t.admission.connection(from.ip())
        };
        let Some(pending) = slot else {
            tracing::debug!(peer = %from, "too many unauthenticated connections; refused");
            incoming.refuse();
            continue;
        };
        drop(t);
        tokio::spawn(serve_connection(transport.clone(), incoming, pending));
    }
}

async fn serve_connection(t: Weak<Transport>, incoming: quinn::Incoming, pending: Pending) {
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "mesh handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("mesh handshake timed out");
            return;
        }
    };
    let leaf = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().map(|c| c.to_vec()));
    let Some(cert) = leaf else {
        if pending.is_member_address() {
            // A joiner has no mesh address of its own yet: this one only poses as a member.
            conn.close(CLOSE_REFUSED.into(), b"a certificate is required from a member's address");
            return;
        }
        return serve_joiner(t, conn, pending).await;
    };
    // A member: it no longer counts against the unauthenticated limits.
    drop(pending);
    let peer = Arc::new(Peer::new(cert));
    // No stream has been accepted yet: closing with CLOSE_REFUSED tells the peer none ran.
    let Some(live) = t.upgrade().and_then(|t| t.track(&conn, peer.fingerprint)) else {
        conn.close(CLOSE_REFUSED.into(), b"this hub was removed from the mesh");
        return;
    };
    quic::raise_to_member(&conn);
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(serve_stream(t.clone(), Who::Member(peer.clone()), send, recv, None));
    }
    drop(live);
}

/// A connection without a certificate: one JOIN at a time (its transport limits). It may wait for
/// and send its requests for a bounded time; a join it sent in time is answered, however long the
/// proposal takes (cutting it off could admit a hub that never gets its certificate), but a
/// joiner that does not take a refusal within `JOINER_ANSWER_TIME` (an admission: within
/// `ADMITTED_ANSWER_TIME`) loses it and its connection.
async fn serve_joiner(t: Weak<Transport>, conn: quinn::Connection, pending: Pending) {
    let addr = conn.remote_address().ip();
    let deadline = tokio::time::Instant::now() + JOINER_LIFETIME;
    while let Ok(Ok((send, recv))) = tokio::time::timeout_at(deadline, conn.accept_bi()).await {
        serve_stream(t.clone(), Who::Joiner(addr), send, recv, Some(deadline)).await;
    }
    conn.close(0u32.into(), b"a joiner's time is up");
    drop(pending);
}

/// Who opened a stream.
enum Who {
    Member(Arc<Peer>),
    Joiner(IpAddr),
}

impl Who {
    fn is_member(&self) -> bool {
        matches!(self, Self::Member(_))
    }
}

/// Reads one request (by `read_by`, if given), dispatches it and writes the answer.
async fn serve_stream(
    t: Weak<Transport>,
    who: Who,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    read_by: Option<tokio::time::Instant>,
) {
    let member = who.is_member();
    let limit = if member { MAX_FRAME } else { MAX_JOIN_REQUEST };
    let request = async {
        let mut first = [0u8; 1];
        let first = recv.read_exact(&mut first).await.map(|()| first[0]);
        let rest = match first {
            Ok(b) if b != BULK_MARK && b != KEEP_MARK => Some(recv.read_to_end(limit - 1).await),
            _ => None,
        };
        (first, rest)
    };
    let read = match read_by {
        None => request.await,
        Some(at) => match tokio::time::timeout_at(at, request).await {
            Ok(r) => r,
            Err(_) => return,
        },
    };
    let mut resp = match read {
        (Ok(KEEP_MARK), None) => match who {
            Who::Member(peer) => return serve_kept(t, peer, send, recv).await,
            Who::Joiner(_) => members_only().into_response(),
        },
        (Ok(_), None) => serve_bulk(t, who, recv).await,
        (Ok(b), Some(rest)) => match rest {
            Err(e) => Refusal::bad_request(format!("unreadable request: {e}")).into_response(),
            Ok(rest) => {
                let mut raw = Vec::with_capacity(1 + rest.len());
                raw.push(b);
                raw.extend_from_slice(&rest);
                match pb::MeshRequest::decode(raw.as_slice()) {
                    Err(e) => Refusal::bad_request(format!("garbage request: {e}")).into_response(),
                    Ok(req) => dispatch(t, who, req).await,
                }
            }
        },
        // An empty request decodes as kind 0, which no handler serves.
        (Err(quinn::ReadExactError::FinishedEarly(0)), _) => dispatch(t, who, pb::MeshRequest::default()).await,
        (Err(e), _) => {
            tracing::debug!(error = %e, "unreadable mesh request");
            Refusal::bad_request(format!("unreadable request: {e}")).into_response()
        }
    };
    // Only members learn that this hub keeps streams (a joiner is never sent one).
    resp.keeps_streams = member;
    let write = async {
        if send.write_all(&resp.encode_to_vec()).await.is_ok() {
            let _ = send.finish();
            let _ = send.stopped().await;
        }
    };
    // A joiner gets a short time to take a refusal, a long one to take its admission (only a
    // valid token gets one; losing it would leave a member without its certificate).
    let answer_time = if resp.code() == pb::ErrorCode::Unspecified { ADMITTED_ANSWER_TIME } else { JOINER_ANSWER_TIME };
    if member {
        write.await;
    } else if tokio::time::timeout(answer_time, write).await.is_err() {
        tracing::debug!("a joiner did not take its answer in time");
    }
}

/// A kept stream after its mark (`kept`): a member's requests, one frame at a time, each answered
/// before the next is read, until the caller ends or resets the stream. A frame larger than a
/// kept stream carries is refused and the stream ended.
async fn serve_kept(t: Weak<Transport>, peer: Arc<Peer>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    loop {
        let mut resp = match read_frame(&mut recv, MAX_KEPT_REQUEST).await {
            Ok(raw) => match pb::MeshRequest::decode(raw.as_slice()) {
                Err(e) => Refusal::bad_request(format!("garbage request: {e}")).into_response(),
                Ok(req) => dispatch(t.clone(), Who::Member(peer.clone()), req).await,
            },
            Err(e @ FrameError::TooLarge(_)) => {
                let refusal = Refusal::bad_request(format!("{e} on a kept stream")).into_response();
                let _ = write_frame(&mut send, &refusal).await;
                let _ = send.finish();
                let _ = recv.stop(0u32.into());
                return;
            }
            // The caller is done with the stream, or gave it up.
            Err(FrameError::Ended | FrameError::Read(_)) => return,
        };
        resp.keeps_streams = true;
        if write_frame(&mut send, &resp).await.is_err() {
            return;
        }
    }
}

/// A bulk stream after its mark: the header, then the handler reads the body.
async fn serve_bulk(t: Weak<Transport>, who: Who, mut recv: quinn::RecvStream) -> pb::MeshResponse {
    // No bulk kind serves joiners: refused before their header is read.
    if !who.is_member() {
        return members_only().into_response();
    }
    let mut len = [0u8; 4];
    if let Err(e) = recv.read_exact(&mut len).await {
        return Refusal::bad_request(format!("truncated bulk header: {e}")).into_response();
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_BULK_HEADER {
        return Refusal::bad_request(format!("a bulk header of {len} bytes is larger than {MAX_BULK_HEADER}"))
            .into_response();
    }
    let mut head = vec![0u8; len];
    if let Err(e) = recv.read_exact(&mut head).await {
        return Refusal::bad_request(format!("truncated bulk header: {e}")).into_response();
    }
    let req = match pb::MeshRequest::decode(head.as_slice()) {
        Ok(r) => r,
        Err(e) => return Refusal::bad_request(format!("garbage bulk header: {e}")).into_response(),
    };
    let (caller, kind) = match caller_of(&t, &who, req.kind, req.from) {
        Ok(c) => c,
        Err(refusal) => return refusal.into_response(),
    };
    let h = t.upgrade().and_then(|t| t.bulk_handlers.read().unwrap_or_else(|p| p.into_inner()).get(&kind).cloned());
    let Some(h) = h else {
        return Refusal::bad_request(format!("unknown bulk stream kind {}", req.kind)).into_response();
    };
    // Dropping the body unread (an early refusal) tells the sender to stop sending.
    answer(h(caller, req.payload, BulkBody::new(recv)).await)
}

fn members_only() -> Refusal {
    Refusal::new(pb::ErrorCode::Unauthorized, "a certificate signed by the cluster CA is required")
}

/// Who sent a request of `kind` that says it comes from `from`, and the kind, or the refusal. A
/// member's id is the one its certificate names; `from` must be that id.
fn caller_of(t: &Weak<Transport>, who: &Who, kind: u32, from: u64) -> Result<(Caller, StreamKind), Refusal> {
    let Some(kind) = StreamKind::from_wire(kind) else {
        // Joiners learn nothing about which kinds exist.
        return Err(if who.is_member() {
            Refusal::bad_request(format!("unknown stream kind {kind}"))
        } else {
            members_only()
        });
    };
    let t = t.upgrade().ok_or_else(|| Refusal::new(pb::ErrorCode::Unavailable, "shutting down"))?;
    let caller = match (who, kind.open_to_joiners()) {
        (Who::Member(peer), _) => Caller::Member(peer.id(from)?),
        (Who::Joiner(addr), true) => {
            t.admission.join(*addr)?;
            Caller::Joiner
        }
        (Who::Joiner(_), false) => return Err(members_only()),
    };
    // A ping says only that the process is alive, not that it still leads: it must not keep a
    // follower's lease about a deposed leader alive.
    if let (Caller::Member(id), false) = (caller, matches!(kind, StreamKind::Ping)) {
        lock(&t.last_heard).insert(id, Instant::now());
    }
    Ok((caller, kind))
}

pub(super) fn answer(r: Result<Vec<u8>, Refusal>) -> pb::MeshResponse {
    match r {
        Ok(payload) => pb::MeshResponse { payload, ..Default::default() },
        Err(refusal) => refusal.into_response(),
    }
}

async fn dispatch(t: Weak<Transport>, who: Who, req: pb::MeshRequest) -> pb::MeshResponse {
    let (caller, kind) = match caller_of(&t, &who, req.kind, req.from) {
        Ok(c) => c,
        Err(refusal) => return refusal.into_response(),
    };
    let h = t.upgrade().and_then(|t| t.handlers.read().unwrap_or_else(|p| p.into_inner()).get(&kind).cloned());
    let Some(h) = h else {
        return Refusal::bad_request(format!("stream kind {kind} is not served here")).into_response();
    };
    answer(h(caller, req.payload).await)
}
