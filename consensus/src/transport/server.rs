//! The serving side of the endpoint: accepts connections, tells members from joiners by their
//! certificate, reads each stream's request (size-limited) and hands it to the handler of its
//! kind. Nothing here panics on its input: garbage gets a `BadRequest` answer or a closed stream.

use std::sync::Weak;
use std::time::Instant;

use hubmesh_proto::{pb, Message};

use super::bulk::BulkBody;
use super::{lock, Caller, Refusal, StreamKind, Transport, BULK_MARK, CLOSE_REFUSED, MAX_BULK_HEADER, MAX_FRAME};
use crate::tls;

pub(super) async fn accept_loop(transport: Weak<Transport>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let t = transport.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "mesh handshake failed");
                    return;
                }
            };
            let leaf = conn
                .peer_identity()
                .and_then(|id| id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
                .and_then(|certs| certs.first().map(|c| tls::fingerprint(c)));
            let revoked = match (&leaf, t.upgrade()) {
                (Some(fp), Some(t)) => t.revoked.read().unwrap_or_else(|p| p.into_inner()).contains(fp),
                _ => false,
            };
            if revoked {
                conn.close(CLOSE_REFUSED.into(), b"this hub was removed from the mesh");
                return;
            }
            let member = leaf.is_some();
            while let Ok((send, recv)) = conn.accept_bi().await {
                let t = t.clone();
                tokio::spawn(serve_stream(t, member, send, recv));
            }
        });
    }
}

async fn serve_stream(t: Weak<Transport>, member: bool, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut first = [0u8; 1];
    let resp = match recv.read_exact(&mut first).await {
        Ok(()) if first[0] == BULK_MARK => serve_bulk(t, member, recv).await,
        Ok(()) => match recv.read_to_end(MAX_FRAME - 1).await {
            Err(e) => Refusal::bad_request(format!("unreadable request: {e}")).into_response(),
            Ok(rest) => {
                let mut raw = Vec::with_capacity(1 + rest.len());
                raw.push(first[0]);
                raw.extend_from_slice(&rest);
                match pb::MeshRequest::decode(raw.as_slice()) {
                    Err(e) => Refusal::bad_request(format!("garbage request: {e}")).into_response(),
                    Ok(req) => dispatch(t, member, req).await,
                }
            }
        },
        // An empty request decodes as kind 0, which no handler serves.
        Err(quinn::ReadExactError::FinishedEarly(0)) => dispatch(t, member, pb::MeshRequest::default()).await,
        Err(e) => {
            tracing::debug!(error = %e, "unreadable mesh request");
            Refusal::bad_request(format!("unreadable request: {e}")).into_response()
        }
    };
    if send.write_all(&resp.encode_to_vec()).await.is_ok() {
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}

/// A bulk stream after its mark: the header, then the handler reads the body.
async fn serve_bulk(t: Weak<Transport>, member: bool, mut recv: quinn::RecvStream) -> pb::MeshResponse {
    // No bulk kind serves joiners: refused before their header is read.
    if !member {
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
    let (caller, kind) = match caller_of(&t, member, req.kind, req.from) {
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

/// Who sent a request of `kind` claiming to be `from`, and the kind, or the refusal.
fn caller_of(t: &Weak<Transport>, member: bool, kind: u32, from: u64) -> Result<(Caller, StreamKind), Refusal> {
    let Some(kind) = StreamKind::from_wire(kind) else {
        // Joiners learn nothing about which kinds exist.
        return Err(if member { Refusal::bad_request(format!("unknown stream kind {kind}")) } else { members_only() });
    };
    let caller = match (member, kind.open_to_joiners()) {
        (true, _) => Caller::Member(from),
        (false, true) => Caller::Joiner,
        (false, false) => return Err(members_only()),
    };
    let t = t.upgrade().ok_or_else(|| Refusal::new(pb::ErrorCode::Unavailable, "shutting down"))?;
    // A ping says only that the process is alive, not that it still leads: it must not keep a
    // follower's lease about a deposed leader alive.
    if let (Caller::Member(id), false) = (caller, kind == StreamKind::Ping) {
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

async fn dispatch(t: Weak<Transport>, member: bool, req: pb::MeshRequest) -> pb::MeshResponse {
    let (caller, kind) = match caller_of(&t, member, req.kind, req.from) {
        Ok(c) => c,
        Err(refusal) => return refusal.into_response(),
    };
    let h = t.upgrade().and_then(|t| t.handlers.read().unwrap_or_else(|p| p.into_inner()).get(&kind).cloned());
    let Some(h) = h else {
        return Refusal::bad_request(format!("stream kind {kind} is not served here")).into_response();
    };
    answer(h(caller, req.payload).await)
}
