//! When a cached connection whose calls fail is dropped: only once nothing at all (no answer, no
//! ack, no keep-alive) has come from the peer on it for [`EVICT_AFTER`], across failed calls.
//!
//! Dropping it after the first call that timed out with nothing received cost most under loss:
//! a Raft call waits 30 ms, so with 30 % loss on a link many calls saw nothing in time, each
//! dropped a connection that was fine, and the next call dialled again — a handshake through the
//! same loss pays QUIC's Initial resends (90, 270, 630 ms …), during which no call reached that
//! peer: a lossy leader starved both followers at once and was deposed. A dead or cut-off peer
//! still loses its connection within [`EVICT_AFTER`] of silence (a restarted one sooner: its
//! stateless reset closes the old connection at the next packet).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Silence on a connection after which a failed call drops it: a dozen Raft heartbeats on `lan`
/// (30 ms), so loss alone never reaches it on a busy connection. What a redial can fix that the
/// old connection cannot (a peer restarted on its address whose stateless reset did not reach
/// this hub; a path that changed under the connection) waits this much longer than before; a
/// peer that is gone fails either way.
pub(super) const EVICT_AFTER: Duration = Duration::from_millis(400);

/// What a failed call saw of its connection.
#[derive(Clone, Copy, Debug)]
pub(super) struct FailedCall {
    /// quinn's id of the connection.
    pub(super) conn: usize,
    /// Datagrams received on it when the call began, and when it failed.
    pub(super) received_then: u64,
    pub(super) received_now: u64,
    pub(super) started: Instant,
}

/// Per peer, since when its connection has been silent (as far as failed calls saw).
#[derive(Default)]
pub(super) struct Silence {
    marks: Mutex<HashMap<u64, Mark>>,
}

#[derive(Clone, Copy, Debug)]
struct Mark {
    conn: usize,
    received: u64,
    since: Instant,
}

impl Silence {
    /// Forgets what was seen of `target`'s connection: a new one is in place (quinn's ids are
    /// addresses, which a later connection may reuse).
    pub(super) fn forget(&self, target: u64) {
        self.marks.lock().unwrap_or_else(|p| p.into_inner()).remove(&target);
    }

    /// Records `call` to `target`, failed at `now`; true when its connection should be dropped.
    pub(super) fn failed(&self, target: u64, call: FailedCall, now: Instant) -> bool {
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        // Silent since an earlier failed call saw this same count on this same connection.
        let earlier =
            marks.get(&target).filter(|m| m.conn == call.conn && m.received == call.received_now).map(|m| m.since);
        let during = (call.received_now == call.received_then).then_some(call.started);
        let since = match (earlier, during) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            // Something came during the call: alive, merely slow.
            (None, None) => now,
        };
        if now.saturating_duration_since(since) >= EVICT_AFTER {
            marks.remove(&target);
            return true;
        }
        marks.insert(target, Mark { conn: call.conn, received: call.received_now, since });
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(conn: usize, then: u64, now: u64, started: Instant) -> FailedCall {
        FailedCall { conn, received_then: then, received_now: now, started }
    }

    #[test]
    fn a_connection_is_dropped_only_after_it_was_silent_long_enough() {
        let s = Silence::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Calls of 30 ms, each timing out with nothing received: kept until the silence is long.
        assert!(!s.failed(2, call(7, 10, 10, t0), t0 + ms(30)));
        assert!(!s.failed(2, call(7, 10, 10, t0 + ms(100)), t0 + ms(130)));
        assert!(!s.failed(2, call(7, 10, 10, t0 + ms(300)), t0 + ms(330)));
        assert!(s.failed(2, call(7, 10, 10, t0 + ms(380)), t0 + ms(410)), "400 ms of silence");
        // The mark went with the connection: a new silence starts from scratch.
        assert!(!s.failed(2, call(7, 10, 10, t0 + ms(500)), t0 + ms(530)));
    }

    #[test]
    fn anything_received_restarts_the_silence() {
        let s = Silence::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert!(!s.failed(2, call(7, 10, 10, t0), t0 + ms(30)));
        // A datagram came between the calls (an earlier answer, a keep-alive).
        assert!(!s.failed(2, call(7, 11, 11, t0 + ms(390)), t0 + ms(420)));
        assert!(!s.failed(2, call(7, 11, 11, t0 + ms(600)), t0 + ms(630)), "silent since 390 ms only");
        // One came during a call: alive, however long the call waited.
        assert!(!s.failed(2, call(7, 11, 12, t0 + ms(700)), t0 + ms(1_500)));
        assert!(s.failed(2, call(7, 12, 12, t0 + ms(1_600)), t0 + ms(2_000)), "silent since 1.5 s");
    }

    #[test]
    fn one_long_silent_call_is_enough_and_peers_and_connections_are_apart() {
        let s = Silence::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // A forwarded call that waited 2 s with nothing back: its peer is gone.
        assert!(s.failed(3, call(1, 5, 5, t0), t0 + ms(2_000)));
        // Another peer's mark, and a new connection to the same peer, start their own silences
        // (each call below ends more than 400 ms after the first began).
        assert!(!s.failed(2, call(7, 10, 10, t0), t0 + ms(30)));
        assert!(!s.failed(2, call(8, 10, 10, t0 + ms(500)), t0 + ms(530)), "another connection");
        assert!(!s.failed(4, call(8, 10, 10, t0 + ms(600)), t0 + ms(630)), "another peer");
        assert!(!s.failed(2, call(8, 10, 10, t0 + ms(700)), t0 + ms(730)), "silent since 500 ms");
        assert!(s.failed(2, call(8, 10, 10, t0 + ms(900)), t0 + ms(930)), "silent since 500 ms");
    }
}
