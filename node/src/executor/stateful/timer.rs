//! The actor's own wake-ups between calls: `hm_tick` on the task's interval, and the periodic
//! checkpoint once the state changed and a period passed since the last one.

use std::time::{Duration, Instant};

use hubmesh_consensus::state::CheckpointPolicy;

use super::Actor;

impl Actor {
    pub(super) fn periodic_every(&self) -> Option<Duration> {
        match self.cfg.checkpoint {
            CheckpointPolicy::Periodic { every_ms } => Some(Duration::from_millis(every_ms)),
            _ => None,
        }
    }

    pub(super) fn next_wakeup(&self) -> Option<Instant> {
        if !self.mode.running() || self.refused().is_some() {
            // Frozen, moved or refusing: no ticks, no checkpoints; only messages wake the actor.
            return None;
        }
        let ckpt = self.periodic_every().filter(|_| self.image.changed()).map(|every| self.last_checkpoint + every);
        match (ckpt, self.next_tick) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(super) fn on_timer(&mut self) {
        let now = Instant::now();
        if let (Some(at), Some(ms)) = (self.next_tick, self.cfg.tick_ms) {
            if now >= at {
                self.next_tick = Some(now + Duration::from_millis(ms));
                match self.inst.tick() {
                    Ok(_) => {
                        self.image.sync(&mut self.inst);
                        self.meter.set_memory(self.inst.memory_len() as u64);
                    }
                    Err(e) => {
                        tracing::warn!(task = %self.cfg.name, error = %e, "tick failed; state rolled back");
                        metrics::counter!("hubmesh_tick_failures_total").increment(1);
                        self.rollback();
                    }
                }
            }
        }
        if let Some(every) = self.periodic_every() {
            if self.image.changed() && now >= self.last_checkpoint + every {
                if let Err(e) = self.checkpoint() {
                    tracing::error!(task = %self.cfg.name, error = %e, "periodic checkpoint failed");
                    self.last_checkpoint = now;
                    if !self.break_if_replaced(&e) && self.catch_up_committed_key() && !self.descends_from_committed() {
                        self.revert_or_break();
                    }
                }
            }
        }
    }
}
