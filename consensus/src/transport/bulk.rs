//! Bulk streams: a marked header, then a body that the handler reads in frames as it arrives
//! (checkpoint pages), so neither side holds the body whole.
//!
//! ```text
//!  0x00 | u32 LE length | pb::MeshRequest{kind, from, header} | body ... | finish
//!  <-- pb::MeshResponse (the handler's answer; an early refusal stops the body)
//! ```

use hubmesh_proto::{pb, Message};

use super::{Outgoing, Refusal, RpcError, StreamKind, Transport, BULK_MARK, MAX_BULK_HEADER, MAX_FRAME};

/// The body of a bulk stream, as its handler reads it.
pub struct BulkBody {
    recv: quinn::RecvStream,
}

impl BulkBody {
    pub(super) fn new(recv: quinn::RecvStream) -> Self {
        Self { recv }
    }

    /// Fills `buf`. `Ok(false)` when the sender finished the stream before its first byte; a
    /// stream that ends inside `buf` is refused.
    pub async fn read_exact_or_end(&mut self, buf: &mut [u8]) -> Result<bool, Refusal> {
        match self.recv.read_exact(buf).await {
            Ok(()) => Ok(true),
            Err(quinn::ReadExactError::FinishedEarly(0)) => Ok(false),
            Err(quinn::ReadExactError::FinishedEarly(n)) => {
                Err(Refusal::bad_request(format!("the body ended after {n} of {} bytes", buf.len())))
            }
            Err(quinn::ReadExactError::ReadError(e)) => Err(Refusal::bad_request(format!("reading the body: {e}"))),
        }
    }

    /// The next `len` bytes, in a buffer filled as they arrive (never zeroed first: a holder
    /// reads every page of a push this way). `Ok(None)` when the sender finished the stream
    /// before their first byte; a stream that ends inside them is refused.
    pub async fn read_vec(&mut self, len: usize) -> Result<Option<Vec<u8>>, Refusal> {
        use bytes::BufMut;
        use tokio::io::AsyncReadExt;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            // As much as has arrived, up to what is left, in one go (not a packet's chunk at a time).
            let limit = len - out.len();
            let n = self
                .recv
                .read_buf(&mut (&mut out).limit(limit))
                .await
                .map_err(|e| Refusal::bad_request(format!("reading the body: {e}")))?;
            match n {
                0 if out.is_empty() => return Ok(None),
                0 => return Err(Refusal::bad_request(format!("the body ended after {} of {len} bytes", out.len()))),
                _ => {}
            }
        }
        Ok(Some(out))
    }
}

/// A bulk stream being sent: write the body with [`send`](Self::send), then
/// [`finish`](Self::finish) for the answer. Dropped unfinished, the stream is reset: the peer
/// sees an abandoned body, never a shorter one.
pub struct BulkCall {
    target: u64,
    send: Outgoing,
    recv: quinn::RecvStream,
}

impl BulkCall {
    /// Queues `chunk` (no copy); waits while the peer's flow-control window is full. If the peer
    /// stopped reading (it refused the stream), its answer is the error.
    pub async fn send(&mut self, chunk: bytes::Bytes) -> Result<(), RpcError> {
        let Some(stream) = self.send.stream() else {
            return Err(RpcError::Protocol("the body is already finished".into()));
        };
        match stream.write_chunk(chunk).await {
            Ok(()) => Ok(()),
            Err(quinn::WriteError::Stopped(_)) => Err(match self.answer().await {
                Err(e) => e,
                Ok(_) => RpcError::Protocol("the peer answered before the body ended".into()),
            }),
            Err(e) => Err(RpcError::Unreachable(self.target, e.to_string())),
        }
    }

    /// Ends the body and waits for the answer.
    pub async fn finish(mut self) -> Result<Vec<u8>, RpcError> {
        // A peer that already stopped reading has answered; the answer says why.
        let _ = self.send.finish();
        self.answer().await
    }

    async fn answer(&mut self) -> Result<Vec<u8>, RpcError> {
        let raw =
            self.recv.read_to_end(MAX_FRAME).await.map_err(|e| RpcError::Unreachable(self.target, e.to_string()))?;
        let mut resp = pb::MeshResponse::decode(raw.as_slice()).map_err(|e| RpcError::Protocol(e.to_string()))?;
        match Refusal::from_response(&mut resp) {
            Some(refusal) => Err(RpcError::Remote(refusal)),
            None => Ok(resp.payload),
        }
    }
}

impl Transport {
    /// Opens a bulk stream of `kind` to `target` and sends `header`; the caller streams the body
    /// and bounds the whole exchange in time itself. Bulk streams yield to other requests on the
    /// same connection (Raft heartbeats must not queue behind checkpoint pages).
    pub async fn call_bulk(&self, target: u64, kind: StreamKind, header: Vec<u8>) -> Result<BulkCall, RpcError> {
        let req = pb::MeshRequest { kind: kind as u32, from: self.node_id, payload: header }.encode_to_vec();
        if req.len() > MAX_BULK_HEADER {
            return Err(RpcError::Protocol(format!("a bulk header of {} bytes is too large", req.len())));
        }
        let conn = self.connection(target).await?;
        let lost = |e: String| RpcError::Unreachable(target, e);
        let (send, recv) = conn.open_bi().await.map_err(|e| lost(e.to_string()))?;
        let _ = send.set_priority(-1);
        let mut head = Vec::with_capacity(5 + req.len());
        head.push(BULK_MARK);
        head.extend_from_slice(&(req.len() as u32).to_le_bytes());
        head.extend_from_slice(&req);
        let mut send = Outgoing::new(send);
        if let Some(stream) = send.stream() {
            stream.write_all(&head).await.map_err(|e| lost(e.to_string()))?;
        }
        Ok(BulkCall { target, send, recv })
    }
}
