//! The invocation router: finds where a task's instance runs and dispatches to it.
//!
//! ```text
//!  api::invoke --> Hub::invoke: task in state? input within its limit?
//!      placed here, running at the placement's epoch --> executor.invoke
//!      placed on hub B --> dataplane::forward --> B: Hub::invoke_here (never forwards again)
//!      (a stateless task with replicas: a local one first, else the next host that answers)
//!      not placed / starting / B unreachable --> wait for the state to change, bounded
//!      B silent (no answer to this hub's pings for max(lease, ping timeout + heartbeat))
//!        --> not sent there; a call waiting on B stops waiting; if this hub lost the mesh too:
//!        refused at once (503 no_quorum), else it waits for a new placement, bounded by node_down
//!      placed here, but this hub lost the mesh (no lease, two elections past it) --> refused
//!        at once (503 no_quorum): it cannot run without a lease, and holding it helps no one
//!      forwarded call timed out --> retried only with an idempotency key, else "outcome unknown"
//!      the task was live-migrated while the call waited here --> relayed once to the new host
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hubmesh_consensus::state::{HistoryEvent, NodeStatus, Placement, TaskRecord};
use hubmesh_consensus::{ClusterState, Epoch, NodeId};
use tokio::time::Instant;

use crate::dataplane::{self, Forwarded};
use crate::executor::{Answer, InvokeError};
use crate::hub::Hub;
use crate::scheduler;

/// Rotates forwarded calls over a stateless task's replicas.
static NEXT_REPLICA: AtomicUsize = AtomicUsize::new(0);

/// Extra time an invocation may wait for its task to be placed, started or re-placed.
const SETTLE: Duration = Duration::from_secs(10);

/// Why an invocation was not answered, or what the executor said.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RouteError {
    /// No such task in the mesh.
    #[error("no task named {0:?}")]
    NotFound(String),
    /// The task is not placed (or not started) and did not become so within the deadline.
    #[error("the task is not available: {0}")]
    NotReady(String),
    /// This hub cannot reach the mesh, and the call was not run anywhere (a call that may have run
    /// on a host that then went silent ends `Unknown` instead).
    #[error("the invocation did not run: {0}")]
    NoQuorum(String),
    /// A forwarded call got no answer in time; it may or may not have run.
    #[error("no answer from hub {node} in time; the invocation may or may not have run")]
    Unknown { node: u64 },
    /// The executor's answer.
    #[error(transparent)]
    Invoke(#[from] InvokeError),
}

enum Step {
    Done(Result<(Answer, Placement), RouteError>),
    Wait(String),
}

/// What one call's tries so far have done.
#[derive(Default)]
struct Tried {
    /// A hub the call was sent to with its key and that did not answer: the call may have run
    /// there, so it never ends with a definite refusal.
    may_have_run: Option<NodeId>,
    /// The last try found every host silent to this hub (and this hub had not lost the mesh).
    all_silent: bool,
}

impl RouteError {
    /// Whether this says that the call did not run (as opposed to an answer of a run under the
    /// call's key, or an unknown outcome).
    fn is_refusal(&self) -> bool {
        match self {
            Self::NotFound(_) | Self::NotReady(_) | Self::NoQuorum(_) => true,
            Self::Invoke(e) => matches!(
                e,
                InvokeError::NotFound(_)
                    | InvokeError::InputTooLarge { .. }
                    | InvokeError::QueueFull { .. }
                    | InvokeError::Unavailable(_)
                    | InvokeError::Moved { .. }
            ),
            Self::Unknown { .. } => false,
        }
    }
}

impl Hub {
    /// The input limit of a task, if it exists.
    pub(crate) fn input_limit(&self, name: &str) -> Option<u64> {
        self.consensus().state().tasks.get(name).map(|t| t.spec.limits.max_input_bytes)
    }

    /// Invokes `name` wherever it runs.
    pub(crate) async fn invoke(
        &self,
        name: &str,
        input: Vec<u8>,
        key: Option<String>,
    ) -> Result<(Answer, Placement), RouteError> {
        self.route(name, input, key, true).await
    }

    /// Invokes `name` only if it runs here (a forwarded call).
    pub(crate) async fn invoke_here(
        &self,
        name: &str,
        input: Vec<u8>,
        key: Option<String>,
    ) -> Result<(Answer, Placement), InvokeError> {
        match self.route(name, input, key, false).await {
            Ok(a) => Ok(a),
            Err(RouteError::Invoke(e)) => Err(e),
            // A relay from a migration's source that got no answer: it may have run.
            Err(e @ RouteError::Unknown { .. }) => Err(InvokeError::OutcomeUnknown(e.to_string())),
            Err(e) => Err(InvokeError::Unavailable(e.to_string())),
        }
    }

    async fn route(
        &self,
        name: &str,
        input: Vec<u8>,
        key: Option<String>,
        may_forward: bool,
    ) -> Result<(Answer, Placement), RouteError> {
        let deadline = Instant::now() + SETTLE;
        let t = self.config().timeouts.resolve();
        let mut tried = Tried::default();
        // Since when every host has been silent to this hub, try after try.
        let mut all_silent_since: Option<Instant> = None;
        loop {
            // Watched from before the try: what changes during it wakes the wait below.
            let (mut state, mut starts) = (self.consensus().changes(), self.executor().starts());
            tried.all_silent = false;
            let reason = match self.try_once(name, &input, &key, may_forward, &mut tried).await {
                // Sent with its key and unanswered, the call may have run (or wait in that host's
                // queue): whatever a later try is refused, its outcome stays unknown.
                Step::Done(Err(e)) if e.is_refusal() && tried.may_have_run.is_some() => {
                    return Err(RouteError::Unknown { node: tried.may_have_run.map_or(0, |n| n.0) })
                }
                Step::Done(r) => return r,
                Step::Wait(reason) => reason,
            };
            all_silent_since = if tried.all_silent { all_silent_since.or_else(|| Some(Instant::now())) } else { None };
            // Hosts silent to this hub but not to the leader (the far end of a bridge) are not
            // re-placed: the wait ends once the leader would have re-placed a host it lost.
            let silent_too_long = all_silent_since.is_some_and(|at| at.elapsed() >= t.node_down + t.heartbeat);
            if Instant::now() >= deadline || silent_too_long {
                return Err(match tried.may_have_run {
                    Some(node) => RouteError::Unknown { node: node.0 },
                    None => RouteError::NotReady(reason),
                });
            }
            // A new state or a task started here (what a call held for a starting task waits
            // for: a migration's target starts it a few milliseconds after the switch).
            let _ = tokio::time::timeout(Duration::from_millis(20), async {
                tokio::select! {
                    _ = state.changed() => {}
                    _ = starts.changed() => {}
                }
            })
            .await;
        }
    }

    async fn try_once(
        &self,
        name: &str,
        input: &[u8],
        key: &Option<String>,
        may_forward: bool,
        tried: &mut Tried,
    ) -> Step {
        let me = self.consensus().node_id();
        let state = self.consensus().state();
        let Some(task) = state.tasks.get(name) else { return Step::Done(Err(RouteError::NotFound(name.to_owned()))) };
        let limit = task.spec.limits.max_input_bytes;
        if input.len() as u64 > limit {
            return Step::Done(Err(InvokeError::InputTooLarge { size: input.len() as u64, limit }.into()));
        }
        let placements: Vec<Placement> = task.placements().map(|(_, p)| p).collect();
        if placements.is_empty() {
            return Step::Wait(
                scheduler::pending_reason(&state, &self.devices().near(), name)
                    .map_or_else(|| "not placed".into(), |p| p.to_string()),
            );
        }
        let Some(p) = placements.iter().find(|p| p.node == me).copied() else {
            // Relayed by a migration's source that saw the switch commit before this hub did (the
            // final state is here: the commit may come any moment). Any other forwarded call
            // fails fast, as before.
            if !may_forward && task.migration.is_some_and(|m| m.to == me && self.migrations().handed_over(name, m.id)) {
                return Step::Wait("the migration's switch is not applied here yet".into());
            }
            if !may_forward {
                return Step::Done(Err(InvokeError::Unavailable("the task has no instance on this hub".into()).into()));
            }
            return self.forward_to_any(name, task, &state, input, key, tried).await;
        };
        if !self.has_quorum() {
            // Without a lease this hub may already have been declared down and the instance
            // re-placed: answering from here could fork the task's history. Waiting helps only
            // while an election may renew the lease; after that the caller is better told at once.
            if self.lost_mesh() {
                let reason = "this hub has lost contact with the mesh (no lease)";
                return Step::Done(Err(RouteError::NoQuorum(reason.into())));
            }
            return Step::Wait("this hub has no lease (an election may be under way)".into());
        }
        if !self.executor().runs_at(name, task.version, p.epoch.0) {
            return match self.start_failure(name).filter(|f| f.is_of(task.version, p.epoch.0)) {
                Some(f) => Step::Done(Err(RouteError::NotReady(f.to_string()))),
                None => Step::Wait("the task is starting".into()),
            };
        }
        let started = std::time::Instant::now();
        let res = self.executor().invoke(name, input.to_vec(), key.clone()).await;
        invoke_seconds().record(started.elapsed().as_secs_f64());
        match res {
            // The task was live-migrated while the call waited here: relayed once to its new host
            // (also for a forwarded call: the one exception to "never forwarded again").
            Err(InvokeError::Moved { node, epoch, key }) => {
                let to = Placement { node: NodeId(node), epoch: Epoch(epoch) };
                Step::Done(self.relay(name, input, key, to).await)
            }
            res => Step::Done(res.map(|a| (a, p)).map_err(RouteError::from)),
        }
    }

    /// Relays a call the source of a live migration held to the task's new host, under the key
    /// the migration gave it (a call the migrated state carried is answered from the target's
    /// cache: it runs once). A call with a key may have run there already, so it is never
    /// reported as not run: it is retried under its key, following the task if it moves on
    /// (a failover restores the carried calls too), and ends `outcome_unknown` if no answer
    /// comes in time. A keyless call (one that arrived after the freeze) is retried only while
    /// it cannot have run.
    async fn relay(
        &self,
        name: &str,
        input: &[u8],
        key: Option<String>,
        first: Placement,
    ) -> Result<(Answer, Placement), RouteError> {
        let deadline = Instant::now() + SETTLE;
        let budget = self.consensus().state().tasks.get(name).map_or(Duration::from_secs(5), |t| {
            Duration::from_millis(t.spec.limits.timeout_ms) + Duration::from_secs(5)
        });
        let mut to = first;
        let mut pause = Duration::from_millis(5);
        loop {
            let gone = self.host_replaced(name, to, true);
            let res = dataplane::forward(self, to.node, name, input.to_vec(), key.clone(), budget, gone).await;
            let reason = match res {
                Forwarded::Answer(a, ran) => return Ok((a, ran.unwrap_or(to))),
                // Not run there, or (with its key) answered from the cache on a retry.
                Forwarded::Failed(e @ (InvokeError::Unavailable(_) | InvokeError::QueueFull { .. })) => e.to_string(),
                Forwarded::Failed(InvokeError::NotFound(_)) if key.is_some() => "not started there yet".into(),
                Forwarded::Failed(InvokeError::OutcomeUnknown(m)) if key.is_some() => m,
                Forwarded::Failed(e) => return Err(e.into()),
                Forwarded::Unreachable(m) => m,
                Forwarded::Timeout if key.is_some() => "no answer in time; retrying under the key".into(),
                Forwarded::Timeout => return Err(RouteError::Unknown { node: to.node.0 }),
            };
            if Instant::now() >= deadline {
                return Err(match key {
                    Some(_) => RouteError::Unknown { node: to.node.0 },
                    None => RouteError::NotReady(format!("the task moved to hub {}: {reason}", to.node)),
                });
            }
            // Backing off (5 ms, doubling to 200 ms): many held calls may wait on one target.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
            // Where the task runs now: the target, or wherever a failover put it.
            if let Some(p) = self.consensus().state().placement(name, 0).filter(|p| p.epoch >= first.epoch) {
                to = p;
            }
        }
    }

    /// Completes once the state no longer trusts `p`: its hub is not serving any more or the instance
    /// was re-placed (a new epoch). A call still waiting on that hub then stops waiting.
    /// With `trusted` false (the hub was already not up when the call was made) only a new
    /// placement counts: the call was made knowing the hub was suspect. A live migration away
    /// from `p` does not count while `p`'s hub serves: it relays the calls it held; nor does a
    /// `p` newer than every placement the state shows (not applied here yet: see [`trusts`]).
    fn host_replaced(&self, name: &str, p: Placement, trusted: bool) -> impl std::future::Future<Output = ()> + use<> {
        let mut rx = self.consensus().watch();
        let name = name.to_owned();
        async move {
            let _ = rx.wait_for(|s| !trusts(s, &name, p, trusted)).await;
        }
    }

    /// Forwards to one of the task's hosts: hubs the state says are up first, rotating among
    /// replicas. A host that cannot have run the call (unreachable before the request was sent,
    /// or refusing it: it does not run the task yet) makes the call try the next one; a host that
    /// may have run it does so only for a call with an idempotency key — a keyless call answers
    /// `outcome_unknown`.
    async fn forward_to_any(
        &self,
        name: &str,
        task: &TaskRecord,
        state: &ClusterState,
        input: &[u8],
        key: &Option<String>,
        tried: &mut Tried,
    ) -> Step {
        let mut order: Vec<Placement> = task.placements().map(|(_, p)| p).collect();
        let n = order.len();
        order.rotate_left(NEXT_REPLICA.fetch_add(1, Ordering::Relaxed) % n);
        order.sort_by_key(|p| state.nodes.get(&p.node).is_none_or(|n| n.status != NodeStatus::Up));
        // A host that has not answered this hub's pings for a while (`Hub::is_silent`) gets no
        // call: it would only hang there (paused, cut off, the far end of a bridge) until the
        // budget ends.
        let (silent, order): (Vec<Placement>, Vec<Placement>) = order.into_iter().partition(|p| self.is_silent(p.node));
        if order.is_empty() {
            let hubs: Vec<String> = silent.iter().map(|p| p.node.to_string()).collect();
            let reason = format!("hub {} does not answer this hub", hubs.join(", "));
            // Cut off from the mesh, this hub cannot know when the task is re-placed, nor reach
            // anyone who does. Otherwise (or while an election may renew its lease) it waits: the
            // leader re-places the task if it lost the host too.
            if self.lost_mesh() {
                return Step::Done(Err(RouteError::NoQuorum(format!("{reason}, and this hub has no lease"))));
            }
            tried.all_silent = true;
            return Step::Wait(reason);
        }
        let budget = Duration::from_millis(task.spec.limits.timeout_ms) + Duration::from_secs(5);
        let mut reason = String::from("no host answered");
        for p in order {
            let started = std::time::Instant::now();
            // Stop waiting if the state stops trusting this host. A call to a hub already down or
            // draining stops waiting only when the instance is placed elsewhere: the leader marks
            // a hub down a moment before it re-places its instances, and a call made in between
            // must not sit out its whole budget on a dead hub (the chaos suite measured 5 s).
            let trusted = serves(state, p.node);
            let moved = self.host_replaced(name, p, trusted);
            // Or if the host stops answering this hub's pings: a keyless call sent there then
            // answers `outcome_unknown` at once, a keyed one tries the next host or waits for a
            // new placement.
            let give_up = async {
                tokio::select! {
                    () = moved => {}
                    () = self.until_silent(p.node) => {}
                }
            };
            let res = dataplane::forward(self, p.node, name, input.to_vec(), key.clone(), budget, give_up).await;
            forwarded_seconds().record(started.elapsed().as_secs_f64());
            tracing::debug!(task = name, node = p.node.0, epoch = p.epoch.0, trusted, outcome = res.kind(), took = ?started.elapsed(), "forwarded");
            match res {
                Forwarded::Answer(a, ran) => return Step::Done(Ok((a, ran.unwrap_or(p)))),
                Forwarded::Failed(InvokeError::Unavailable(m)) => reason = m,
                // The host's durable commit may yet apply: under its key the call may be retried
                // (a run that did commit answers from the key's cache).
                Forwarded::Failed(InvokeError::OutcomeUnknown(m)) if key.is_some() => {
                    tried.may_have_run = Some(p.node);
                    reason = m;
                }
                Forwarded::Failed(e) => return Step::Done(Err(e.into())),
                Forwarded::Unreachable(m) => reason = format!("hub {} is unreachable: {m}", p.node),
                Forwarded::Timeout if key.is_some() => {
                    tried.may_have_run = Some(p.node);
                    reason = "retrying with the idempotency key".into();
                }
                Forwarded::Timeout => return Step::Done(Err(RouteError::Unknown { node: p.node.0 })),
            }
        }
        Step::Wait(reason)
    }
}

/// Whether `node` serves its instances: up, or draining (its tasks leave by live migration, and
/// it relays the calls it held; a call waiting on it must not give up when the drain begins).
fn serves(state: &ClusterState, node: NodeId) -> bool {
    state.nodes.get(&node).is_some_and(|n| matches!(n.status, NodeStatus::Up | NodeStatus::Draining))
}

/// Whether `state` still trusts `p` to run `name` (see [`Hub::host_replaced`]). A placement newer
/// than every one the state shows counts as placed: a migration's source relays its held calls to
/// the target's new epoch as soon as the switch commits, and its own state may apply the switch a
/// moment later (cutting the relay short there cost a 5 ms back-off).
fn trusts(state: &ClusterState, name: &str, p: Placement, trusted: bool) -> bool {
    let hub_up = serves(state, p.node);
    let still_placed = state.tasks.get(name).is_some_and(|t| {
        let mut placements = t.placements().map(|(_, q)| q).peekable();
        let not_applied_yet = placements.peek().is_some() && placements.all(|q| q.epoch < p.epoch);
        t.placements().any(|(_, q)| q == p)
            || not_applied_yet
            || hub_up && t.history.iter().any(|h| migrated_from(h, p))
    });
    (hub_up || !trusted) && still_placed
}

/// Whether `h` records a committed live migration away from `p`.
fn migrated_from(h: &HistoryEvent, p: Placement) -> bool {
    h.migration.as_ref().is_some_and(|m| m.aborted.is_none() && m.from == p.node && m.from_epoch == p.epoch)
}

/// The `hubmesh_invoke_forwarded_seconds` histogram, registered once.
fn forwarded_seconds() -> &'static metrics::Histogram {
    static H: std::sync::OnceLock<metrics::Histogram> = std::sync::OnceLock::new();
    H.get_or_init(|| metrics::histogram!("hubmesh_invoke_forwarded_seconds"))
}

/// The `hubmesh_invoke_seconds` histogram, registered once (not looked up on every call).
fn invoke_seconds() -> &'static metrics::Histogram {
    static H: std::sync::OnceLock<metrics::Histogram> = std::sync::OnceLock::new();
    H.get_or_init(|| metrics::histogram!("hubmesh_invoke_seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_say_the_call_did_not_run_answers_of_a_run_do_not() {
        let refused = [
            RouteError::NotFound("t".into()),
            RouteError::NotReady("starting".into()),
            RouteError::NoQuorum("cut off".into()),
            InvokeError::QueueFull { limit: 8 }.into(),
            InvokeError::Unavailable("not here".into()).into(),
            InvokeError::NotFound("t".into()).into(),
        ];
        assert!(refused.iter().all(RouteError::is_refusal));
        let ran = [
            RouteError::Unknown { node: 2 },
            InvokeError::Trapped("unreachable".into()).into(),
            InvokeError::DeadlineExceeded { timeout_ms: 5 }.into(),
            InvokeError::OutcomeUnknown("cut short".into()).into(),
        ];
        assert!(!ran.iter().any(RouteError::is_refusal));
    }

    #[test]
    fn a_placement_the_state_has_not_applied_yet_is_trusted_until_a_newer_one() {
        use crate::scheduler::tests::{constrained_deploy, labelled_node};
        use hubmesh_consensus::state::TaskKind;
        use hubmesh_consensus::Command;
        let mut s = ClusterState::default();
        for id in 1..=3 {
            s.apply(&labelled_node(id, 10, NodeStatus::Up, &[])).unwrap();
        }
        s.apply(&constrained_deploy("t", TaskKind::Stateful, &[])).unwrap();
        let at =
            |node: u64, s: &ClusterState| Placement { node: NodeId(node), epoch: s.tasks["t"].instances[&0].epoch };
        let place = |node: u64, expected: Option<Epoch>| Command::PlaceInstance {
            task: "t".into(),
            instance: 0,
            node: NodeId(node),
            expected,
        };
        assert!(!trusts(&s, "t", Placement { node: NodeId(2), epoch: Epoch(1) }, true), "not placed at all");
        s.apply(&place(1, None)).unwrap();
        let on_1 = at(1, &s);
        assert!(trusts(&s, "t", on_1, true), "placed there");
        // Hub 2 at the next epoch: a switch this state has not applied yet.
        let on_2 = Placement { node: NodeId(2), epoch: Epoch(on_1.epoch.0 + 1) };
        assert!(trusts(&s, "t", on_2, true), "ahead of this state");
        assert!(!trusts(&s, "t", Placement { node: NodeId(2), epoch: on_1.epoch }, true), "not placed there");
        s.apply(&place(3, Some(on_1.epoch))).unwrap();
        assert!(!trusts(&s, "t", on_1, true), "re-placed: the old host is not trusted");
        assert!(!trusts(&s, "t", on_2, true), "re-placed at that epoch or later, elsewhere");
        s.apply(&Command::SetNodeStatus { node: NodeId(3), status: NodeStatus::Down }).unwrap();
        let on_3 = at(3, &s);
        assert!(!trusts(&s, "t", on_3, true) && trusts(&s, "t", on_3, false), "a hub known down");
    }
}
