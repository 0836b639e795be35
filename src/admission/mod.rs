//! Admission: every inference request gets a slot on an instance that can serve it, waits its turn
//! in a queue that is bounded, fair and observable, or is refused at once with a reason.
//!
//! - **Slots.** As in Ollama, each model loaded on instance `i` serves at most `num_parallel`
//!   admitted requests at once, and the instance as many models' worth as it was seen holding
//!   (`Instance::slots`); a [`Permit`] holds one slot until dropped. Only ready instances get
//!   new permits; with none ready, requests wait (up to `max_wait`) and are dispatched by
//!   [`Admission::poke`].
//! - **Fairness.** Round robin between clients, FIFO within a client, higher priority first with
//!   aging (`queue.rs` has the exact order); a client whose turn has waited past the starvation
//!   bound (`max_wait / 4`) goes first, longest first, so no priority gap outlasts it. A retry kept out only by the
//!   instance it avoids lets its client's later waiters take that instance's slot. All decisions are O(log n) in the
//!   number of waiters and clients, O(instances) in the instance choice.
//! - **Instance choice** for the waiter picked by fairness (`placement.rs`): an instance with its
//!   model loaded; if it is warm only on busy instances, wait for a warm slot while one is expected
//!   before a cold load elsewhere would finish (at most one load's time), else a cold load where
//!   it evicts nothing or the model asked for longest ago. A waiter that waits lets the next
//!   client's waiter take the free slot. Without a model: an instance with nothing loaded, then
//!   the most free slots. Ties rotate.
//! - **Accounting.** One mutex guards the queue, the slot counts and the counters, so at every
//!   moment `admitted == released + held` (held = sum of busy slots). Every `acquire` ends in exactly
//!   one outcome: the sum `admitted - undelivered + refused_full + refused_bytes + refused_model +
//!   refused_unready + expired + cancelled + closed` equals the number of requests.
//! - **Hopeless waits.** With no instance ready and each on a known schedule (restart backoff,
//!   failing health checks), a request whose `max_wait` ends before the first can be ready is
//!   refused at once, queued or not ([`Refusal::NotReadySoon`]).
//!
//! The engine knows no Pingora types: the proxy calls [`Admission::acquire`] (or
//! [`Admission::admit`] and then races [`Waiting::wait`] against the client leaving).

mod model_rules;
mod placement;
mod queue;
mod snapshot;
#[cfg(test)]
mod tests;

pub use model_rules::pinned_models;
pub use placement::{PlacementCounts, Reason};

use crate::config::QueueConfig;
use crate::upstream::Instance;
use placement::{Choice, Placement, Used};
use queue::{Entry, FairQueue};
pub use snapshot::WaiterView;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// One request asking for a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmitRequest {
    /// Who is asking (API key name, `X-Client-Id`, or IP): the unit of fairness.
    pub client: Arc<str>,
    /// Higher is served first; default 0.
    pub priority: i32,
    /// The model, in `model_key` form, when the request names one.
    pub model: Option<String>,
    /// Size of the request body the waiter holds while queued.
    pub body_bytes: u64,
    /// An instance (registry index) to avoid while another is ready: a retry after it failed.
    pub avoid: Option<usize>,
}

impl AdmitRequest {
    pub fn new(client: impl Into<Arc<str>>) -> AdmitRequest {
        AdmitRequest {
            client: client.into(),
            priority: 0,
            model: None,
            body_bytes: 0,
            avoid: None,
        }
    }

    pub fn priority(mut self, priority: i32) -> AdmitRequest {
        self.priority = priority;
        self
    }

    pub fn model(mut self, model: impl Into<String>) -> AdmitRequest {
        self.model = Some(model.into());
        self
    }

    pub fn body_bytes(mut self, bytes: u64) -> AdmitRequest {
        self.body_bytes = bytes;
        self
    }

    pub fn avoid(mut self, index: usize) -> AdmitRequest {
        self.avoid = Some(index);
        self
    }
}

/// Why a request got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_queued` requests are already waiting.
    QueueFull,
    /// Queuing this body would exceed `max_queued_bytes`.
    QueueBytesFull,
    /// Waited `max_wait` without a slot.
    WaitExpired { waited: Duration },
    /// Shutting down.
    Closed,
    /// Instances are ready, but none of those that may have the model.
    ModelUnavailable,
    /// Instances are ready, but none of those the model's `models:` rule allows and that may
    /// have it.
    ModelRestricted,
    /// No instance is ready, and none can be before the request's wait ends: the earliest is
    /// `wait` away (`cause`: what it waits for).
    NotReadySoon { wait: Duration, cause: &'static str },
}

impl Refusal {
    /// A stable label for metrics and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Refusal::QueueFull => "queue_full",
            Refusal::QueueBytesFull => "queue_bytes_full",
            Refusal::WaitExpired { .. } => "wait_expired",
            Refusal::Closed => "closed",
            Refusal::ModelUnavailable => "model_unavailable",
            Refusal::ModelRestricted => "model_restricted",
            Refusal::NotReadySoon { .. } => "not_ready_soon",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::QueueFull => f.write_str("the admission queue is full"),
            Refusal::QueueBytesFull => {
                f.write_str("the admission queue holds too many request bytes")
            }
            Refusal::WaitExpired { waited } => {
                write!(
                    f,
                    "no slot became free within {:.1} s",
                    waited.as_secs_f64()
                )
            }
            Refusal::Closed => f.write_str("shutting down"),
            Refusal::ModelUnavailable => f.write_str("no ready instance has the model installed"),
            Refusal::ModelRestricted => {
                f.write_str("no ready instance that the model's rule allows has it installed")
            }
            Refusal::NotReadySoon { wait, cause } => write!(
                f,
                "no instance can be ready within the wait: the earliest in {:.1} s ({cause})",
                wait.as_secs_f64()
            ),
        }
    }
}

impl std::error::Error for Refusal {}

/// Cumulative counts since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionCounters {
    /// Slots granted (fast path and from the queue).
    pub admitted: u64,
    pub refused_full: u64,
    pub refused_bytes: u64,
    pub expired: u64,
    /// Requests abandoned by their caller before they got their permit (including `undelivered`).
    pub cancelled: u64,
    /// Requests refused because of shutdown (queued at `close()`, or arriving after it).
    pub closed: u64,
    /// Requests refused because no ready instance has their model installed.
    pub refused_model: u64,
    /// Slots given back.
    pub released: u64,
    /// Grants that lost a race with their waiter's cancellation: counted in `admitted`,
    /// `released` and `cancelled`.
    pub undelivered: u64,
    /// Requests refused because no instance could be ready before their wait ended.
    pub refused_unready: u64,
}

/// Slot use of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotUse {
    /// `Instance::index`.
    pub index: usize,
    pub name: String,
    /// Slots held by permits.
    pub busy: usize,
    /// `num_parallel` for each model the instance holds at once ([`Instance::slots`]).
    pub slots: usize,
}

/// A consistent view of the scheduler (taken under its lock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionSnapshot {
    pub queued: usize,
    pub queued_bytes: u64,
    /// Distinct clients with at least one waiter.
    pub clients_queued: usize,
    /// How long the longest waiter has waited.
    pub oldest_wait: Option<Duration>,
    /// Per instance, in the order given to [`Admission::new`].
    pub slots: Vec<SlotUse>,
    /// Placement decisions per instance, in the same order.
    pub placement: Vec<PlacementCounts>,
    pub counters: AdmissionCounters,
    pub closed: bool,
}

impl AdmissionSnapshot {
    /// Slots currently held by permits.
    pub fn held(&self) -> usize {
        self.slots.iter().map(|s| s.busy).sum()
    }
}

/// What a queued request receives: its permit, or a refusal decided while it waited.
type Outcome = Result<Permit, Refusal>;

struct Waiter {
    tx: oneshot::Sender<Outcome>,
    model: Option<String>,
    avoid: Option<usize>,
}

/// A permit on its way to a queued waiter (sent after the lock is released).
struct Grant {
    tx: oneshot::Sender<Outcome>,
    permit: Permit,
    client: Arc<str>,
    model: Option<String>,
    reason: Reason,
}

struct State {
    queue: FairQueue<Waiter>,
    /// Slots held, per instance position.
    busy: Vec<usize>,
    /// Start of the instance scan, so ties rotate.
    rotation: usize,
    closed: bool,
    counters: AdmissionCounters,
    placement: Placement,
    /// When a waiter that chose to wait for a warm slot stops waiting (a dispatch is due then).
    wake_at: Option<Instant>,
}

struct Shared {
    /// Swapped whole on reload ([`Admission::set_config`]).
    config: arc_swap::ArcSwap<QueueConfig>,
    /// Every instance ever configured, by index (a reload appends; retired ones stay, never
    /// ready, so positions never move: [`Admission::add_instance`]).
    instances: arc_swap::ArcSwap<Vec<Arc<Instance>>>,
    /// Origin of the aging epochs.
    base: Instant,
    state: Mutex<State>,
}

/// The admission scheduler. Share it as `Arc<Admission>`.
pub struct Admission {
    shared: Arc<Shared>,
}

/// The outcome of [`Admission::admit`] when the request is not refused.
pub enum Admitted {
    /// A slot was free and nobody was waiting: here is the permit.
    Now(Permit),
    /// Queued: await [`Waiting::wait`]. Dropping the `Waiting` leaves the queue.
    Queued(Waiting),
}

impl Admission {
    pub fn new(config: QueueConfig, instances: Vec<Arc<Instance>>) -> Arc<Admission> {
        let busy = vec![0; instances.len()];
        let placement = Placement::new(instances.len());
        Arc::new(Admission {
            shared: Arc::new(Shared {
                config: arc_swap::ArcSwap::from_pointee(config),
                instances: arc_swap::ArcSwap::from_pointee(instances),
                base: Instant::now(),
                state: Mutex::new(State {
                    queue: FairQueue::default(),
                    busy,
                    rotation: 0,
                    closed: false,
                    counters: AdmissionCounters::default(),
                    placement,
                    wake_at: None,
                }),
            }),
        })
    }

    pub fn config(&self) -> Arc<QueueConfig> {
        self.shared.config.load_full()
    }

    /// Sets the `models:` rules dispatch enforces (at start, before any request).
    pub fn set_model_rules(&self, rules: crate::config::ModelRulesConfig) {
        let mut st = self.shared.lock();
        st.placement
            .rules
            .reconfigure(rules, &self.shared.instances.load());
    }

    /// Waits for a slot. Cancellation-safe: dropping the future while queued removes the waiter
    /// at once (counted as cancelled) and never leaks a slot, even if a permit was granted
    /// concurrently.
    pub async fn acquire(self: &Arc<Self>, req: AdmitRequest) -> Result<Permit, Refusal> {
        match self.admit(req)? {
            Admitted::Now(permit) => Ok(permit),
            Admitted::Queued(waiting) => waiting.wait().await,
        }
    }

    /// The synchronous half of [`acquire`](Self::acquire): a permit now, a place in the queue, or
    /// a refusal. Needs no runtime; waiting (with its `max_wait` timer) happens in
    /// [`Waiting::wait`].
    pub fn admit(&self, req: AdmitRequest) -> Result<Admitted, Refusal> {
        self.shared.admit(req)
    }

    /// Re-runs dispatch: call it when an instance became ready or unready or its loaded models
    /// changed.
    pub fn poke(&self) {
        let mut grants = Vec::new();
        {
            let mut st = self.shared.lock();
            self.shared.dispatch(&mut st, Instant::now(), &mut grants);
        }
        self.shared.deliver(grants);
    }

    /// Refuses everything queued, and every later request, with [`Refusal::Closed`]. Permits
    /// already granted stay valid until dropped.
    pub fn close(&self) {
        let drained = {
            let mut st = self.shared.lock();
            st.closed = true;
            let drained = st.queue.drain();
            st.counters.closed += drained.len() as u64;
            drained
        };
        // Dropping the senders wakes the waiters with `Closed`, outside the lock.
        drop(drained);
    }

    pub fn snapshot(&self) -> AdmissionSnapshot {
        let now = Instant::now();
        let st = self.shared.lock();
        AdmissionSnapshot {
            queued: st.queue.len(),
            queued_bytes: st.queue.bytes(),
            clients_queued: st.queue.clients(),
            oldest_wait: st
                .queue
                .oldest()
                .map(|e| now.saturating_duration_since(e.enqueued)),
            slots: self
                .shared
                .instances
                .load()
                .iter()
                .zip(st.busy.iter())
                .map(|(inst, busy)| SlotUse {
                    index: inst.index,
                    name: inst.name.clone(),
                    busy: *busy,
                    slots: inst.slots(),
                })
                .collect(),
            counters: st.counters,
            closed: st.closed,
            placement: st.placement.counts.clone(),
        }
    }
}

/// What [`Shared::decide`] did with a request it did not refuse.
enum Decision {
    Now(Permit, Reason),
    Queued(u64, oneshot::Receiver<Outcome>),
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something ever did, the state is still
        // consistent between operations, so keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whole `aging` periods since start.
    fn epoch(&self, now: Instant) -> i64 {
        let aging = self.config.load().aging.as_nanos();
        if aging == 0 {
            return 0;
        }
        let elapsed = now.saturating_duration_since(self.base).as_nanos();
        i64::try_from(elapsed / aging).unwrap_or(i64::MAX)
    }

    fn admit(self: &Arc<Self>, req: AdmitRequest) -> Result<Admitted, Refusal> {
        let now = Instant::now();
        let mut grants = Vec::new();
        let outcome = {
            let mut st = self.lock();
            self.decide(&mut st, &req, now, &mut grants)
        };
        self.deliver(grants);
        match outcome {
            Err(refusal) => {
                tracing::debug!(client = %req.client, model = req.model.as_deref().unwrap_or("-"),
                    reason = refusal.as_str(), "admission: refused");
                Err(refusal)
            }
            Ok(Decision::Now(permit, reason)) => {
                tracing::debug!(client = %req.client, model = req.model.as_deref().unwrap_or("-"),
                    instance = %permit.instance.name, reason = reason.as_str(), waited_ms = 0u64,
                    "admission: granted at once");
                Ok(Admitted::Now(permit))
            }
            Ok(Decision::Queued(seq, rx)) => {
                tracing::debug!(client = %req.client, model = req.model.as_deref().unwrap_or("-"),
                    priority = req.priority, "admission: queued");
                Ok(Admitted::Queued(Waiting {
                    shared: self.clone(),
                    seq,
                    rx,
                    enqueued: now,
                    deadline: now
                        .checked_add(self.config.load().max_wait)
                        .or_else(|| now.checked_add(Duration::from_secs(10 * 365 * 86_400)))
                        .unwrap_or(now),
                    done: false,
                }))
            }
        }
    }

    /// Under the lock: refuse the request, grant it a slot at once, or queue it.
    fn decide(
        self: &Arc<Self>,
        st: &mut State,
        req: &AdmitRequest,
        now: Instant,
        grants: &mut Vec<Grant>,
    ) -> Result<Decision, Refusal> {
        if st.closed {
            st.counters.closed += 1;
            return Err(Refusal::Closed);
        }
        if let Some(refusal) = req
            .model
            .as_deref()
            .and_then(|m| st.placement.unservable(&self.instances.load(), m))
        {
            st.counters.refused_model += 1;
            return Err(refusal);
        }
        if let Some(refusal) =
            not_ready_soon(&self.instances.load(), now, self.config.load().max_wait)
        {
            st.counters.refused_unready += 1;
            return Err(refusal);
        }
        if !st.queue.is_empty() {
            // Waiters and a free slot can only coexist after a readiness change nobody
            // poked about: serve them first, they are ahead of this request.
            self.dispatch(st, now, grants);
        }
        if let Some(model) = req.model.as_deref() {
            st.placement.asked(model, now);
        }
        if st.queue.is_empty() {
            match self.choose(st, req.model.as_deref(), req.avoid, now, 0, now) {
                Choice::Grant(pos, instance, reason) => {
                    let model = req.model.as_deref();
                    let permit = self.grant(st, pos, instance, model, reason, Duration::ZERO);
                    return Ok(Decision::Now(permit, reason));
                }
                Choice::Wait(until) => self.wake(st, until),
                Choice::NoSlot => {}
            }
        }
        self.enqueue(st, req, now, grants)
    }

    /// Under the lock: a place in the queue, unless it is full (by count or by bytes).
    fn enqueue(
        self: &Arc<Self>,
        st: &mut State,
        req: &AdmitRequest,
        now: Instant,
        grants: &mut Vec<Grant>,
    ) -> Result<Decision, Refusal> {
        if st.queue.len() >= self.config.load().max_queued {
            st.counters.refused_full += 1;
            return Err(Refusal::QueueFull);
        }
        if st.queue.bytes().saturating_add(req.body_bytes) > self.config.load().max_queued_bytes.0 {
            st.counters.refused_bytes += 1;
            return Err(Refusal::QueueBytesFull);
        }
        let (tx, rx) = oneshot::channel();
        let epoch = self.epoch(now);
        let seq = st.queue.push(
            Entry {
                client: req.client.clone(),
                priority: req.priority,
                bytes: req.body_bytes,
                enqueued: now,
                item: Waiter {
                    tx,
                    model: req.model.clone(),
                    avoid: req.avoid,
                },
            },
            epoch,
        );
        // Free slots may sit beside waiters that wait for a warm one: this request may take one.
        self.dispatch(st, now, grants);
        Ok(Decision::Queued(seq, rx))
    }

    /// Takes a slot on instance `pos` (under the lock).
    fn grant(
        self: &Arc<Self>,
        st: &mut State,
        pos: usize,
        instance: Arc<Instance>,
        model: Option<&str>,
        reason: Reason,
        waited: Duration,
    ) -> Permit {
        if let Some(busy) = st.busy.get_mut(pos) {
            *busy += 1;
        }
        st.counters.admitted += 1;
        st.rotation = st.rotation.wrapping_add(1);
        if let Some(model) = model {
            st.placement.granted(pos, &instance, model, reason, waited);
        }
        // While half-open the instance admits one request: this grant is its trial.
        let trial = instance.gate() == crate::upstream::Gate::HalfOpen;
        Permit {
            shared: self.clone(),
            instance,
            pos,
            trial,
            waited,
            model: model.map(str::to_string),
            reason,
            granted_at: Instant::now(),
            armed: true,
            load: None,
        }
    }

    /// The choice for one request (under the lock).
    fn choose(
        &self,
        st: &State,
        model: Option<&str>,
        avoid: Option<usize>,
        enqueued: Instant,
        ahead: usize,
        now: Instant,
    ) -> Choice {
        match model {
            Some(model) => st.placement.choose_for_model(
                &self.instances.load(),
                &st.busy,
                st.rotation,
                model,
                avoid,
                enqueued,
                ahead,
                now,
            ),
            None => match choose(&self.instances.load(), &st.busy, st.rotation, avoid) {
                Some((pos, instance, reason)) => Choice::Grant(pos, instance, reason),
                None => Choice::NoSlot,
            },
        }
    }

    /// Makes sure dispatch runs again at `until`, when a waiter stops waiting for a warm slot.
    fn wake(self: &Arc<Self>, st: &mut State, until: Instant) {
        if st
            .wake_at
            .is_some_and(|at| at <= until && at > Instant::now())
        {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        st.wake_at = Some(until);
        let shared = Arc::downgrade(self);
        rt.spawn(async move {
            tokio::time::sleep_until(until).await;
            if let Some(shared) = shared.upgrade() {
                let mut grants = Vec::new();
                {
                    let mut st = shared.lock();
                    if st.wake_at == Some(until) {
                        st.wake_at = None;
                    }
                    shared.dispatch(&mut st, Instant::now(), &mut grants);
                }
                shared.deliver(grants);
            }
        });
    }

    /// Hands free slots to waiters while both exist (under the lock). First the clients whose
    /// turn has waited past the starvation bound, longest first (so no priority gap outlasts
    /// it, while a client being served keeps starting new turns and cannot crowd others out);
    /// then each client's next waiter in fairness order. A client whose next waiter waits for a warm slot, or
    /// cannot be placed, lets the next client's waiter take the slot; one kept out only by the
    /// instance it avoids (a retry) also lets its own client's later waiters try.
    fn dispatch(self: &Arc<Self>, st: &mut State, now: Instant, grants: &mut Vec<Grant>) {
        self.refuse_unready(st, now);
        loop {
            let mut scan = Scan::default();
            // Clients whose turn has waited past the starvation bound first, longest first;
            // then every client in fairness order.
            let overdue = now
                .checked_sub(self.starvation_bound())
                .map(|cutoff| st.queue.turns_begun_before(cutoff));
            let clients = overdue
                .into_iter()
                .flatten()
                .take(DISPATCH_SCAN)
                .chain(st.queue.clients_in_turn().take(DISPATCH_SCAN));
            'clients: for client in clients {
                for (seq, entry) in st.queue.client_entries(client).take(DISPATCH_SCAN) {
                    match scan.consider(self, st, seq, entry, now) {
                        Considered::Placed => break 'clients,
                        Considered::Avoiding => continue,
                        Considered::Waits => continue 'clients,
                    }
                }
            }
            let Scan { pick, wake, .. } = scan;
            if let Some(until) = wake {
                self.wake(st, until);
            }
            let Some((seq, pos, instance, reason)) = pick else {
                break;
            };
            let epoch = self.epoch(now);
            let Some(entry) = st.queue.take(seq, epoch, now) else {
                break;
            };
            let waited = now.saturating_duration_since(entry.enqueued);
            let permit = self.grant(
                st,
                pos,
                instance,
                entry.item.model.as_deref(),
                reason,
                waited,
            );
            grants.push(Grant {
                tx: entry.item.tx,
                permit,
                client: entry.client,
                model: entry.item.model,
                reason,
            });
        }
    }

    /// Refuses the waiters whose wait ends before any instance can be ready (the instances'
    /// schedules changed while they waited: a crash, a longer backoff); the rest wait on.
    fn refuse_unready(&self, st: &mut State, now: Instant) {
        let Some((ready_at, cause)) = earliest_ready(&self.instances.load()) else {
            return;
        };
        // Queued before this, a waiter's `max_wait` ends before `ready_at`.
        let Some(cutoff) = ready_at.checked_sub(self.config.load().max_wait) else {
            return;
        };
        let hopeless: Vec<u64> = st.queue.queued_before(cutoff).map(|(seq, _)| seq).collect();
        for seq in hopeless {
            if let Some(entry) = st.queue.remove(seq) {
                st.counters.refused_unready += 1;
                let wait = ready_at.saturating_duration_since(now);
                // A waiter that left meanwhile gets nothing, and holds nothing.
                let _ = entry
                    .item
                    .tx
                    .send(Err(Refusal::NotReadySoon { wait, cause }));
            }
        }
    }

    /// How long a client's turn may be passed over by higher priorities: after it, the client
    /// goes ahead of every client whose turn began later. A quarter of `max_wait`, so a request of any
    /// priority reaches a slot well before it would expire (README, "Priorities and aging").
    fn starvation_bound(&self) -> Duration {
        self.config.load().max_wait / 4
    }

    /// Sends permits to their waiters (outside the lock). A waiter that left meanwhile gets
    /// nothing: its slot goes straight back and on to the next waiter, iteratively.
    fn deliver(self: &Arc<Self>, mut grants: Vec<Grant>) {
        while !grants.is_empty() {
            for g in std::mem::take(&mut grants) {
                tracing::debug!(client = %g.client, model = g.model.as_deref().unwrap_or("-"),
                    instance = %g.permit.instance.name, reason = g.reason.as_str(),
                    waited_ms = g.permit.waited.as_millis() as u64, "admission: granted");
                if let Err(Ok(mut permit)) = g.tx.send(Ok(g.permit)) {
                    permit.armed = false;
                    let used = permit.model.as_deref().map(Used::never);
                    // Never used: the model's in-flight count goes back, nothing is learned.
                    self.release_into(permit.pos, true, used, &mut grants);
                }
            }
        }
    }

    /// Gives a slot back and dispatches (under the lock); grants to deliver go to `grants`.
    /// `used`: the model and what its slot's use showed (see [`Used`]).
    fn release_into(
        self: &Arc<Self>,
        pos: usize,
        undelivered: bool,
        used: Option<Used<'_>>,
        grants: &mut Vec<Grant>,
    ) {
        let mut st = self.lock();
        let instances = self.instances.load();
        if let (Some(used), Some(instance)) = (used, instances.get(pos)) {
            st.placement.released(pos, instance, used);
        }
        if let Some(busy) = st.busy.get_mut(pos) {
            *busy = busy.saturating_sub(1);
        }
        st.counters.released += 1;
        if undelivered {
            st.counters.undelivered += 1;
            st.counters.cancelled += 1;
        }
        self.dispatch(&mut st, Instant::now(), grants);
    }

    fn release(self: &Arc<Self>, pos: usize, undelivered: bool, used: Option<Used<'_>>) {
        let mut grants = Vec::new();
        self.release_into(pos, undelivered, used, &mut grants);
        self.deliver(grants);
    }

    /// Removes a waiter still queued; false if it was granted or closed meanwhile.
    fn remove(&self, seq: u64, expired: bool) -> bool {
        let entry = {
            let mut st = self.lock();
            let entry = st.queue.remove(seq);
            if entry.is_some() {
                if expired {
                    st.counters.expired += 1;
                } else {
                    st.counters.cancelled += 1;
                }
            }
            entry
        };
        entry.is_some()
    }
}

/// When the first instance can be ready, and why not sooner, while none is ready and every one
/// is known not to be before then (a supervised instance waiting out its restart backoff, an
/// external one whose health checks fail: `Instance::ready_not_before`). `None` when one is
/// ready, or may be at any moment (starting, stopped: no schedule known).
fn earliest_ready(instances: &[Arc<Instance>]) -> Option<(Instant, &'static str)> {
    if instances.is_empty() || instances.iter().any(|i| i.is_ready()) {
        return None;
    }
    let mut earliest: Option<(Instant, &'static str)> = None;
    for inst in instances {
        let (at, cause) = inst.ready_not_before()?;
        let at = Instant::from_std(at);
        if earliest.is_none_or(|(e, _)| at < e) {
            earliest = Some((at, cause));
        }
    }
    earliest
}

/// Why a new request can be refused at once rather than wait `max_wait` for nothing: no
/// instance can be ready before its wait would end.
fn not_ready_soon(
    instances: &[Arc<Instance>],
    now: Instant,
    max_wait: Duration,
) -> Option<Refusal> {
    let (at, cause) = earliest_ready(instances)?;
    let wait = at.saturating_duration_since(now);
    (wait > max_wait).then_some(Refusal::NotReadySoon { wait, cause })
}

/// How many clients' next waiters one dispatch round considers (bounds the work under the lock).
const DISPATCH_SCAN: usize = 64;

/// What one dispatch round found: the waiter to serve, and when a waiter stops waiting for a
/// warm slot.
#[derive(Default)]
struct Scan<'a> {
    pick: Option<(u64, usize, Arc<Instance>, Reason)>,
    wake: Option<Instant>,
    /// Models of waiters that wait for a warm slot this round (placement's waiters ahead).
    waiting_for: Vec<&'a str>,
}

/// What became of one waiter in a scan.
#[derive(Debug, PartialEq, Eq)]
enum Considered {
    /// It gets a slot.
    Placed,
    /// No slot for it only because it avoids the instance with one (a retry): a waiter
    /// behind it may take that slot.
    Avoiding,
    /// It waits (for a warm slot, or for any slot).
    Waits,
}

impl<'a> Scan<'a> {
    fn consider(
        &mut self,
        shared: &Shared,
        st: &State,
        seq: u64,
        entry: &'a Entry<Waiter>,
        now: Instant,
    ) -> Considered {
        let model = entry.item.model.as_deref();
        let ahead = model.map_or(0, |m| self.waiting_for.iter().filter(|w| **w == m).count());
        match shared.choose(st, model, entry.item.avoid, entry.enqueued, ahead, now) {
            Choice::Grant(pos, instance, reason) => {
                self.pick = Some((seq, pos, instance, reason));
                Considered::Placed
            }
            Choice::Wait(until) => {
                self.wake = Some(self.wake.map_or(until, |w| w.min(until)));
                self.waiting_for.extend(model);
                Considered::Waits
            }
            Choice::NoSlot if entry.item.avoid.is_some() => Considered::Avoiding,
            Choice::NoSlot => Considered::Waits,
        }
    }
}

/// The instance for the next grant of a request that names no model: ready, with a free slot;
/// by preference one with no model loaded, then the most free slots. Ties rotate. `avoid` (the
/// instance a retry failed on) is skipped while any other instance is ready, even a busy one.
fn choose(
    instances: &[Arc<Instance>],
    busy: &[usize],
    rotation: usize,
    avoid: Option<usize>,
) -> Option<(usize, Arc<Instance>, Reason)> {
    let n = instances.len();
    if n == 0 {
        return None;
    }
    let avoid = placement::usable_avoid(instances, avoid);
    let start = rotation % n;
    let mut best: Option<(usize, &Arc<Instance>, Reason, usize)> = None;
    for offset in 0..n {
        let pos = (start + offset) % n;
        let (Some(inst), Some(busy)) = (instances.get(pos), busy.get(pos)) else {
            continue;
        };
        if avoid == Some(pos) {
            continue;
        }
        // `request_limit` is 0 for an instance that is not ready or is ejected, 1 during its
        // half-open trial.
        let free = inst.request_limit().saturating_sub(*busy);
        if free == 0 {
            continue;
        }
        // A half-open instance gets its trial first: otherwise a quiet fleet would never try
        // it, and a failed trial is retried elsewhere.
        let reason = if inst.gate() == crate::upstream::Gate::HalfOpen {
            Reason::HalfOpenTrial
        } else if inst.loaded_models().is_empty() {
            Reason::IdleInstance
        } else {
            Reason::MostFreeSlots
        };
        let rank = |r: Reason| match r {
            Reason::HalfOpenTrial => 2u8,
            Reason::IdleInstance => 1,
            _ => 0,
        };
        if best.is_none_or(|(_, _, r, f)| (rank(reason), free) > (rank(r), f)) {
            best = Some((pos, inst, reason, free));
        }
    }
    let (pos, inst, reason, _) = best?;
    Some((pos, inst.clone(), reason))
}

/// A queued request. [`wait`](Self::wait) for its permit; dropping it (or the `wait` future)
/// leaves the queue at once.
pub struct Waiting {
    shared: Arc<Shared>,
    seq: u64,
    rx: oneshot::Receiver<Outcome>,
    enqueued: Instant,
    deadline: Instant,
    /// The outcome has been handed out (or the waiter removed): nothing left to cancel.
    done: bool,
}

impl Waiting {
    /// How long this request has been waiting.
    pub fn waited(&self) -> Duration {
        Instant::now().saturating_duration_since(self.enqueued)
    }

    /// Waits for the permit, up to `max_wait` from when the request was queued.
    pub async fn wait(mut self) -> Result<Permit, Refusal> {
        if self.done {
            return Err(Refusal::Closed);
        }
        let outcome = match tokio::time::timeout_at(self.deadline, &mut self.rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(Refusal::Closed),
            Err(_) => {
                if self.shared.remove(self.seq, true) {
                    Err(Refusal::WaitExpired {
                        waited: self.waited(),
                    })
                } else {
                    // Granted (or closed) while the timer fired: the outcome is on its way,
                    // sent right after the granting side releases the lock.
                    (&mut self.rx).await.unwrap_or(Err(Refusal::Closed))
                }
            }
        };
        self.done = true;
        outcome
    }

    /// Takes the outcome if there is one yet, without waiting: `None` while still queued.
    /// After it returns `Some`, the `Waiting` is spent.
    pub fn try_take(&mut self) -> Option<Result<Permit, Refusal>> {
        if self.done {
            return None;
        }
        let outcome = match self.rx.try_recv() {
            Ok(outcome) => outcome,
            Err(oneshot::error::TryRecvError::Closed) => Err(Refusal::Closed),
            Err(oneshot::error::TryRecvError::Empty) => {
                if Instant::now() >= self.deadline && self.shared.remove(self.seq, true) {
                    Err(Refusal::WaitExpired {
                        waited: self.waited(),
                    })
                } else {
                    return None;
                }
            }
        };
        self.done = true;
        Some(outcome)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.done || self.shared.remove(self.seq, false) {
            return;
        }
        // No longer queued: granted or closed. Stop any send still to come (the granting side
        // then takes the slot back itself), and give back a permit already sent.
        self.rx.close();
        if let Ok(Ok(mut permit)) = self.rx.try_recv() {
            permit.armed = false;
            let used = permit.model.as_deref().map(Used::never);
            self.shared.release(permit.pos, true, used);
        }
    }
}

/// One slot on one instance, held until dropped.
pub struct Permit {
    shared: Arc<Shared>,
    instance: Arc<Instance>,
    /// Position in the scheduler's instance list.
    pos: usize,
    waited: Duration,
    model: Option<String>,
    reason: Reason,
    granted_at: Instant,
    /// Whether dropping releases the slot (false once the slot was released another way).
    armed: bool,
    /// Granted while the instance was half-open: the trial whose outcome decides it.
    trial: bool,
    /// What the instance said loading the model took for this request (Ollama's
    /// `load_duration`), once the answer is read.
    load: Option<Duration>,
}

impl Permit {
    pub fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    /// Time spent queued (zero on the fast path).
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Why this instance was chosen.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// Whether this is the half-open trial of its instance (passive health).
    pub fn is_trial(&self) -> bool {
        self.trial
    }

    /// Records the `load_duration` the instance reported for this request: placement learns
    /// from it what a load costs and whether its view of the loaded models was right.
    pub fn observed_load(&mut self, load: Option<Duration>) {
        self.load = load;
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("instance", &self.instance.name)
            .field("waited", &self.waited)
            .finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.armed {
            self.armed = false;
            let held = self.granted_at.elapsed();
            let used = self.model.as_deref().map(|model| Used {
                model,
                cold: self.reason.is_cold(),
                held: Some(held),
                load: self.load,
            });
            self.shared.release(self.pos, false, used);
        }
    }
}

// ---- Reload (src/reload.rs): the instance set and the queue's limits follow a new
// configuration. ----
impl Admission {
    /// Takes `instance` (whose `index` is the next position) into dispatch. Waiters are
    /// dispatched again at once.
    pub fn add_instance(&self, instance: Arc<Instance>) {
        {
            let mut st = self.shared.lock();
            self.shared.instances.rcu(|list| {
                let mut list = Vec::clone(list);
                list.push(instance.clone());
                list
            });
            let n = self.shared.instances.load().len();
            st.busy.resize(n, 0);
            st.placement.counts.resize_with(n, Default::default);
            st.placement
                .rules
                .set_instances(&self.shared.instances.load());
        }
        self.poke();
    }
}

// ---- Reload (src/reload.rs): the queue's limits follow a new configuration. ----
impl Admission {
    /// New limits for requests admitted from now on; waiters keep their place (a smaller
    /// `max_queued` refuses newcomers until the queue is below it, it evicts nobody).
    pub fn set_config(&self, config: QueueConfig) {
        self.shared.config.store(Arc::new(config));
        self.poke();
    }
}
