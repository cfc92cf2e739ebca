//! The mesh's congestion controller: quinn's Cubic with a floor under its window.
//!
//! Cubic takes every lost packet for congestion and shrinks its window towards two packets. A
//! link between hubs loses packets for other reasons — a weak Wi-Fi hop, a flaky cable — and at
//! 30 % loss Cubic sat at its two-packet minimum, so a checkpoint page (64 KiB, about 45 packets
//! on a 1,500-byte link) crawled over it one round trip per two packets, each loss costing a probe
//! timeout: a durable call on such a hub took 1.5–2 s (`mixed.toml`'s `flaky` fault). With a floor
//! of one page the window still shrinks under real congestion, down to a page in flight, which a
//! home or edge LAN carries without noticing; above the floor Cubic decides as before. The floor
//! is also the first window (RFC 9002 suggests about ten packets, 14 KiB). Only links of the
//! local profiles get it (`quic::Link`); `wan` keeps plain Cubic.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics, CubicConfig};
use quinn_proto::RttEstimator;

/// The smallest window: a checkpoint page (64 KiB) and its framing.
pub(super) const WINDOW_FLOOR: u64 = 72 << 10;

/// Builds [`Floored`] Cubic controllers.
#[derive(Debug, Default)]
pub(super) struct FlooredCubic;

impl ControllerFactory for FlooredCubic {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Floored { inner: Arc::new(CubicConfig::default()).build(now, current_mtu) })
    }
}

/// A controller whose window is never below [`WINDOW_FLOOR`].
struct Floored {
    inner: Box<dyn Controller>,
}

impl Controller for Floored {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest_acked: Option<u64>) {
        self.inner.on_end_acks(now, in_flight, app_limited, largest_acked);
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, is_persistent_congestion: bool, lost_bytes: u64) {
        self.inner.on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.inner.window().max(WINDOW_FLOOR)
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Self { inner: self.inner.clone_box() })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window().max(WINDOW_FLOOR)
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_shrink_the_window_down_to_the_floor_only() {
        let now = Instant::now();
        let mut cubic = Arc::new(FlooredCubic).build(now, 1_452);
        assert_eq!(cubic.window(), WINDOW_FLOOR, "Cubic starts at ten packets, below the floor");
        // A loss per round, many rounds: Cubic alone ends at two packets.
        let mut plain = Arc::new(CubicConfig::default()).build(now, 1_452);
        for i in 1..=50u32 {
            let at = now + std::time::Duration::from_millis(u64::from(i));
            cubic.on_congestion_event(at, at, i % 10 == 0, 1_452);
            plain.on_congestion_event(at, at, i % 10 == 0, 1_452);
        }
        assert_eq!(plain.window(), 2 * 1_452);
        assert_eq!(cubic.window(), WINDOW_FLOOR);
        assert_eq!(cubic.metrics().congestion_window, WINDOW_FLOOR);
        assert_eq!(cubic.clone_box().window(), WINDOW_FLOOR);
    }

    #[test]
    fn above_the_floor_cubic_decides() {
        // A link whose MTU discovery reached 64 KiB datagrams (loopback): Cubic's own minimum,
        // two of them, is above the floor.
        let mut cubic = Arc::new(FlooredCubic).build(Instant::now(), 1_200);
        let mut plain = Arc::new(CubicConfig::default()).build(Instant::now(), 1_200);
        cubic.on_mtu_update(65_507);
        plain.on_mtu_update(65_507);
        assert_eq!(plain.window(), 2 * 65_507);
        assert_eq!(cubic.window(), plain.window());
    }
}
