//! One request and its answer on a stream of a member connection, and what a broken exchange
//! tells about whether the peer may have acted on the request.

use hubmesh_proto::{pb, Message};

use super::{Refusal, RpcError, BULK_BYTES, MAX_FRAME};

pub(super) enum Exchange {
    /// The connection or stream broke: if the request's end was sent, its outcome is unknown.
    Lost(String),
    /// The peer closed the connection in a way that proves it handled none of its streams.
    Refused(String),
    Bad(String),
    Remote(RpcError),
}

/// A request's send stream, reset rather than finished if dropped before [`finish`](Self::finish):
/// quinn finishes a dropped stream, so a caller that gives up (or a push that is abandoned) would
/// otherwise send the peer a prefix of its request as if it were whole.
pub(super) struct Outgoing(Option<quinn::SendStream>);

impl Outgoing {
    pub(super) fn new(send: quinn::SendStream) -> Self {
        Self(Some(send))
    }

    /// The stream; `None` once finished.
    pub(super) fn stream(&mut self) -> Option<&mut quinn::SendStream> {
        self.0.as_mut()
    }

    /// Ends the request (its FIN); afterwards dropping changes nothing.
    pub(super) fn finish(&mut self) -> Result<(), quinn::ClosedStream> {
        self.0.take().map_or(Ok(()), |mut s| s.finish())
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if let Some(mut s) = self.0.take() {
            let _ = s.reset(quinn::VarInt::from_u32(0));
        }
    }
}

/// The application close code of a connection refused before any of its streams is accepted
/// (a removed hub's certificate). Only for that: [`broken`] takes it as proof that no stream on
/// the connection was handled, so closing a connection that served streams needs another code.
pub(super) const CLOSE_REFUSED: u32 = 1;
/// The application close code of a connection closed because its peer's certificate was revoked
/// while it was open: its streams may have been handled, so it proves nothing.
pub(super) const CLOSE_REVOKED: u32 = 2;

/// What a broken exchange on `conn` means: [`Exchange::Refused`] if the connection was closed
/// before the peer could handle any stream — it refused our certificate in the TLS handshake (a
/// TLS alert, QUIC's crypto error codes 0x100–0x1ff), or closed it as a removed hub's with
/// [`CLOSE_REFUSED`] before accepting a stream — else [`Exchange::Lost`].
pub(super) fn broken(conn: &quinn::Connection, e: impl std::fmt::Display) -> Exchange {
    let refused = match conn.close_reason() {
        Some(quinn::ConnectionError::ConnectionClosed(c)) => (0x100..0x200).contains(&u64::from(c.error_code)),
        Some(quinn::ConnectionError::ApplicationClosed(c)) => c.error_code == quinn::VarInt::from_u32(CLOSE_REFUSED),
        Some(quinn::ConnectionError::VersionMismatch) => true,
        _ => false,
    };
    if refused {
        Exchange::Refused(e.to_string())
    } else {
        Exchange::Lost(e.to_string())
    }
}

/// An answer's payload, and whether the peer serves kept streams (`kept`).
pub(super) struct Answered {
    pub(super) payload: Vec<u8>,
    pub(super) keeps_streams: bool,
}

/// One request and its answer on a new stream. `sent` is set just before the request's end
/// (its FIN) goes out: from then on the peer may have all of it and act on it. Only an answer, a
/// refusal, or a connection the peer refused before it accepted streams proves otherwise — not a
/// missing acknowledgement: QUIC acknowledges what arrived,
/// not what was done, and a peer may run a request and crash before its acknowledgement leaves
/// (the chaos suite saw an unkeyed call run twice that way).
pub(super) async fn exchange(
    conn: &quinn::Connection,
    request: &[u8],
    sent: Option<&std::sync::atomic::AtomicBool>,
) -> Result<Answered, Exchange> {
    let (send, mut recv) = conn.open_bi().await.map_err(|e| broken(conn, e))?;
    let mut send = Outgoing::new(send);
    let stream = send.stream().ok_or_else(|| Exchange::Bad("the stream is already finished".into()))?;
    if request.len() > BULK_BYTES {
        // Checkpoint pages must not hold up Raft heartbeats on the same connection.
        let _ = stream.set_priority(-1);
    }
    // The handler reads to the end, so without the FIN the peer cannot act on the request.
    stream.write_all(request).await.map_err(|e| broken(conn, e))?;
    if let Some(flag) = sent {
        flag.store(true, std::sync::atomic::Ordering::Release);
    }
    send.finish().map_err(|e| broken(conn, e))?;
    let raw = recv.read_to_end(MAX_FRAME).await.map_err(|e| broken(conn, e))?;
    let mut resp = pb::MeshResponse::decode(raw.as_slice()).map_err(|e| Exchange::Bad(e.to_string()))?;
    match Refusal::from_response(&mut resp) {
        Some(refusal) => Err(Exchange::Remote(RpcError::Remote(refusal))),
        None => Ok(Answered { payload: resp.payload, keeps_streams: resp.keeps_streams }),
    }
}
