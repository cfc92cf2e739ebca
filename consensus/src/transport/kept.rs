//! Streams kept open between calls to a peer: a call takes an idle stream to the peer (or opens
//! one), writes its request as a frame, reads its answer's frame, and gives the stream back. No
//! stream is opened or accepted, and no task spawned on the serving side, per call.
//!
//! ```text
//!  first call on a connection: a stream of its own (FIN-delimited) --> answer says keeps_streams
//!  later calls (request <= MAX_KEPT_REQUEST): idle stream, or open_bi + KEEP_MARK
//!      --> [u32 len][MeshRequest] --> [u32 len][MeshResponse] --> back to the idle list
//!  server: KEEP_MARK from a member --> one task reads frames and answers them in turn until the
//!      caller ends or resets the stream
//! ```
//!
//! A peer is sent kept streams only once one of its answers on this connection said it serves
//! them, so a hub of an older version never sees one. A stream goes back to the idle list only
//! after a whole answer was read from it: one whose call was given up, broke or got garbage is
//! reset, never reused, so an answer can never be read by the wrong call. What a broken call
//! means for its request's outcome is decided as on a stream of its own: the request may have
//! been acted on once its last byte was written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use hubmesh_proto::{pb, Message};

use super::exchange::{broken, Exchange, Outgoing};
use super::{lock, Refusal, BULK_BYTES, MAX_FRAME};

/// First byte of a kept stream (a protobuf message never starts with it: field number 0).
pub(super) const KEEP_MARK: u8 = 1;
/// Largest request sent on a kept stream: larger ones take a stream of their own, at a lower
/// priority, so that a checkpoint's pages never sit in front of a heartbeat.
pub(super) const MAX_KEPT_REQUEST: usize = BULK_BYTES;
/// Idle streams kept per peer: enough for the calls a hub has in flight to one peer at once in
/// steady use; a burst beyond it opens streams that are dropped afterwards.
pub(super) const MAX_IDLE: usize = 16;

/// A stream kept for calls to one peer.
pub(super) struct KeptStream {
    send: Outgoing,
    recv: quinn::RecvStream,
    /// Its mark is not written yet: the stream is new.
    fresh: bool,
    /// Its last answer was whole and said the peer goes on serving the stream.
    reusable: bool,
}

/// The kept streams of every peer, and which connections serve them.
#[derive(Default)]
pub(super) struct Kept {
    peers: Mutex<HashMap<u64, PeerStreams>>,
    /// Kept streams opened so far (a stream reused is not counted again).
    opened: AtomicU64,
    /// Calls that took an idle kept stream.
    reused: AtomicU64,
}

/// What the kept streams did so far (for `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeptStreamStats {
    /// Kept streams opened.
    pub opened: u64,
    /// Calls that took an idle kept stream: no stream opened for them.
    pub reused: u64,
    /// Kept streams idle now, over every peer.
    pub idle: u64,
}

/// What is kept for one peer: for its current connection only.
struct PeerStreams {
    /// Held, so that its id cannot be taken by a later connection while this entry names it.
    conn: quinn::Connection,
    idle: Vec<KeptStream>,
}

impl Kept {
    /// A stream for a call to `target` on `conn`: an idle one or a new one; `None` while no
    /// answer on `conn` has said that the peer serves kept streams.
    pub(super) async fn take(&self, target: u64, conn: &quinn::Connection) -> Option<Result<KeptStream, Exchange>> {
        {
            let mut peers = lock(&self.peers);
            let entry = peers.get_mut(&target).filter(|p| p.conn.stable_id() == conn.stable_id())?;
            if let Some(s) = entry.idle.pop() {
                self.reused.fetch_add(1, Ordering::Relaxed);
                return Some(Ok(s));
            }
        }
        Some(match conn.open_bi().await {
            Ok((send, recv)) => {
                self.opened.fetch_add(1, Ordering::Relaxed);
                Ok(KeptStream { send: Outgoing::new(send), recv, fresh: true, reusable: false })
            }
            Err(e) => Err(broken(conn, e)),
        })
    }

    /// `target` answered on `conn` that it serves kept streams. A previous connection's entry,
    /// and its idle streams, go. The caller checks that `conn` is still the cached connection
    /// (an evicted one must not be kept alive here).
    pub(super) fn learned(&self, target: u64, conn: &quinn::Connection) {
        let mut peers = lock(&self.peers);
        if peers.get(&target).is_none_or(|p| p.conn.stable_id() != conn.stable_id()) {
            peers.insert(target, PeerStreams { conn: conn.clone(), idle: Vec::new() });
        }
    }

    /// Gives back a stream after its call (dropped, and so reset, unless its answer was whole and
    /// the peer goes on serving it, the connection is still the peer's and few are idle).
    pub(super) fn put_back(&self, target: u64, conn: &quinn::Connection, stream: KeptStream) {
        if !stream.reusable {
            return;
        }
        let mut peers = lock(&self.peers);
        if let Some(p) = peers.get_mut(&target).filter(|p| p.conn.stable_id() == conn.stable_id()) {
            if p.idle.len() < MAX_IDLE {
                p.idle.push(stream);
            }
        }
    }

    /// Forgets `target`'s streams (its connection was dropped from the cache).
    pub(super) fn forget(&self, target: u64) {
        lock(&self.peers).remove(&target);
    }

    /// Forgets the streams of every peer whose connection is no longer `conns`' (the cache of
    /// connections).
    pub(super) fn keep_only(&self, conns: &HashMap<u64, quinn::Connection>) {
        lock(&self.peers).retain(|target, p| conns.get(target).is_some_and(|c| c.stable_id() == p.conn.stable_id()));
    }

    /// Forgets every peer's streams.
    pub(super) fn clear(&self) {
        lock(&self.peers).clear();
    }

    pub(super) fn stats(&self) -> KeptStreamStats {
        let idle = lock(&self.peers).values().map(|p| p.idle.len() as u64).sum();
        KeptStreamStats {
            opened: self.opened.load(Ordering::Relaxed),
            reused: self.reused.load(Ordering::Relaxed),
            idle,
        }
    }

    /// Idle streams kept for `target`.
    #[cfg(test)]
    pub(super) fn idle(&self, target: u64) -> usize {
        lock(&self.peers).get(&target).map_or(0, |p| p.idle.len())
    }
}

/// One call on a kept stream: `request` (an encoded `MeshRequest`) as a frame, then the answer's
/// frame. `sent` is set once the request's last byte is written (from then on the peer may act
/// on it). The stream is marked reusable when its answer was whole and said the peer serves the
/// stream further (a peer that ends a stream after its answer says not).
pub(super) async fn exchange_kept(
    conn: &quinn::Connection,
    stream: &mut KeptStream,
    request: &[u8],
    sent: &AtomicBool,
) -> Result<Vec<u8>, Exchange> {
    let len = u32::try_from(request.len()).map_err(|_| Exchange::Bad("a request too large for a frame".into()))?;
    let mut frame = Vec::with_capacity(1 + 4 + request.len());
    if stream.fresh {
        frame.push(KEEP_MARK);
    }
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(request);
    let send = stream.send.stream().ok_or_else(|| Exchange::Bad("the stream is already finished".into()))?;
    // Nothing is awaited between the last byte's write and the flag: a caller that gives up
    // sees it set whenever the peer could have the whole request.
    send.write_all(&frame).await.map_err(|e| broken(conn, e))?;
    sent.store(true, Ordering::Release);
    stream.fresh = false;
    stream.reusable = false;
    let raw = read_frame(&mut stream.recv, MAX_FRAME).await.map_err(|e| match e {
        FrameError::Ended | FrameError::Read(_) => broken(conn, e),
        FrameError::TooLarge(_) => Exchange::Bad(e.to_string()),
    })?;
    let mut resp = pb::MeshResponse::decode(raw.as_slice()).map_err(|e| Exchange::Bad(e.to_string()))?;
    stream.reusable = resp.keeps_streams;
    match Refusal::from_response(&mut resp) {
        Some(refusal) => Err(Exchange::Remote(super::RpcError::Remote(refusal))),
        None => Ok(resp.payload),
    }
}

/// What a frame's buffer starts with: most requests and answers fit; a larger one grows as its
/// bytes arrive.
const FIRST_BUFFER: usize = 16 << 10;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum FrameError {
    #[error("the stream ended between frames")]
    Ended,
    #[error("a frame of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("reading a frame: {0}")]
    Read(String),
}

/// Reads one frame (a u32 little-endian length, then that many bytes) of at most `limit` bytes.
/// Memory grows with what arrives, not with the length a peer claims (past a small first
/// buffer).
pub(super) async fn read_frame(recv: &mut quinn::RecvStream, limit: usize) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Err(FrameError::Ended),
        Err(e) => return Err(FrameError::Read(e.to_string())),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > limit {
        return Err(FrameError::TooLarge(len));
    }
    let mut out = Vec::with_capacity(len.min(FIRST_BUFFER));
    while out.len() < len {
        match recv.read_chunk(len - out.len(), true).await {
            Ok(Some(chunk)) => out.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(FrameError::Read("the stream ended inside a frame".into())),
            Err(e) => return Err(FrameError::Read(e.to_string())),
        }
    }
    Ok(out)
}

/// Writes `resp` as a frame.
pub(super) async fn write_frame(
    send: &mut quinn::SendStream,
    resp: &pb::MeshResponse,
) -> Result<(), quinn::WriteError> {
    let body = resp.encode_to_vec();
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    send.write_all(&frame).await
}
