//! Where a request for a model goes, knowing what a cold load costs: learned per (instance,
//! model) from the slots admission grants, and the decision for one waiter.
//!
//! - **Service time**: how long a slot on a warm instance is held, less the `load_duration`
//!   Ollama reports (EWMA).
//! - **Cold-load time**: Ollama's `load_duration` when it shows a load; without it, how much
//!   longer a slot that caused a load is held than a warm one. Before any load was seen,
//!   dispatch is work-conserving.
//! - **What fits**: the most models an instance was seen holding at once (`Instance`); each
//!   gets `num_parallel` slots, as Ollama gives each runner.
//!
//! A request whose model is warm only on busy instances waits for a warm slot while that is
//! expected sooner than a cold load elsewhere would cost, and never longer than that cost past
//! the end of the model's last load (so it cannot starve for affinity); then it cold-loads,
//! preferring an instance where the load evicts nothing, else the one whose evicted model was
//! asked for longest ago. A load costs its load time, twice that when it evicts a model asked
//! for within the last ten load times (that model will need loading again).

use super::model_rules::ModelRules;
use super::Refusal;
use crate::upstream::Instance;
use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A model asked for within this many cold-load times is "asked for lately": evicting it to
/// load another costs its reload as well.
const RECENT_LOADS: u32 = 10;

/// A `load_duration` at least this long means the instance loaded the model for the request
/// (or waited for room to): a warm request's is its scheduling, a few milliseconds.
const LOAD_SEEN: Duration = Duration::from_millis(50);

/// Weight of a new sample in the moving averages.
const EWMA_WEIGHT: f64 = 0.3;

/// Why an instance was chosen (or the request waits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// An ejected instance's cool-down is over: one trial request decides whether it is back.
    HalfOpenTrial,
    /// The model is loaded there (an affinity hit).
    ModelLoaded,
    /// No model named; an instance with nothing loaded.
    IdleInstance,
    /// No model named, or nothing better: the most free slots.
    MostFreeSlots,
    /// The model is loaded nowhere that may take it: a cold load, where it evicts least.
    ColdLoad,
    /// The model is warm on busy instances, but a warm slot is far off (or the request already
    /// waited as long as a load takes): a cold load elsewhere.
    ColdLoadWarmBusy,
}

impl Reason {
    pub const ALL: [Reason; 6] = [
        Reason::HalfOpenTrial,
        Reason::ModelLoaded,
        Reason::IdleInstance,
        Reason::MostFreeSlots,
        Reason::ColdLoad,
        Reason::ColdLoadWarmBusy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::HalfOpenTrial => "half_open_trial",
            Reason::ModelLoaded => "model_loaded",
            Reason::IdleInstance => "idle_instance",
            Reason::MostFreeSlots => "most_free_slots",
            Reason::ColdLoad => "cold_load",
            Reason::ColdLoadWarmBusy => "cold_load_warm_busy",
        }
    }

    /// Whether a grant for this reason makes the instance load the model.
    pub fn is_cold(self) -> bool {
        matches!(self, Reason::ColdLoad | Reason::ColdLoadWarmBusy)
    }
}

/// What dispatch does with one waiter.
pub enum Choice {
    Grant(usize, Arc<Instance>, Reason),
    /// A warm slot is expected before a cold load would finish: wait, at most until then.
    Wait(Instant),
    /// No instance can take it now.
    NoSlot,
}

#[derive(Debug, Default, Clone, Copy)]
struct Learned {
    service: Option<Duration>,
    cold_load: Option<Duration>,
}

/// How a released slot was used.
pub struct Used<'a> {
    pub model: &'a str,
    /// Its grant was expected to make the instance load the model.
    pub cold: bool,
    /// How long the slot was held; `None`: the permit never reached its request.
    pub held: Option<Duration>,
    /// The instance's `load_duration` for the request, when its answer said.
    pub load: Option<Duration>,
}

impl<'a> Used<'a> {
    /// A permit that never reached its request: nothing to learn.
    pub fn never(model: &'a str) -> Used<'a> {
        Used {
            model,
            cold: false,
            held: None,
            load: None,
        }
    }
}

/// Per-instance placement counts, for `/status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PlacementCounts {
    /// Grants by reason, in [`Reason::ALL`] order.
    pub by_reason: [u64; 6],
    /// Models this sidecar expects the instance evicted for a load it caused.
    pub evictions: u64,
    /// Grants that waited for a warm slot first.
    pub warm_waits: u64,
}

impl PlacementCounts {
    /// The `/status` form: grants by reason, evictions caused, warm waits.
    pub fn to_json(&self) -> serde_json::Value {
        let by_reason: serde_json::Map<String, serde_json::Value> = Reason::ALL
            .iter()
            .zip(self.by_reason)
            .map(|(r, n)| (r.as_str().to_string(), n.into()))
            .collect();
        serde_json::json!({
            "grants": by_reason,
            "evictions": self.evictions,
            "warm_waits": self.warm_waits,
        })
    }
}

/// What placement knows; lives under the admission lock.
#[derive(Default)]
pub struct Placement {
    learned: HashMap<(usize, String), Learned>,
    /// When each model was last asked for.
    last_asked: HashMap<String, Instant>,
    /// When the load this sidecar last made an instance start of each model is expected to end.
    load_ends: HashMap<String, Instant>,
    pub counts: Vec<PlacementCounts>,
    /// The `models:` rules and the requests running under their limits.
    pub rules: ModelRules,
}

fn ewma(old: Option<Duration>, sample: Duration) -> Duration {
    match old {
        None => sample,
        Some(old) => old.mul_f64(1.0 - EWMA_WEIGHT) + sample.mul_f64(EWMA_WEIGHT),
    }
}

impl Placement {
    pub fn new(instances: usize) -> Placement {
        Placement {
            counts: vec![PlacementCounts::default(); instances],
            ..Placement::default()
        }
    }

    pub fn asked(&mut self, model: &str, now: Instant) {
        self.last_asked.insert(model.to_string(), now);
    }

    /// A slot for `model` on instance `pos` was granted for `reason`: count it, and update the
    /// instance's view at once (the model is loaded now; with the instance full, the model it
    /// evicts is gone) instead of at the next `/api/ps` poll.
    pub fn granted(
        &mut self,
        pos: usize,
        instance: &Instance,
        model: &str,
        reason: Reason,
        waited: Duration,
    ) {
        // Whether the model was loaded before this request counted as using it: an `/api/ps`
        // read in between notes every model in use as loaded, which would make this grant
        // look warm.
        let cold = !instance.has_model(model);
        instance.model_in_use(model, true);
        self.rules.started(pos, model);
        let victim = cold.then(|| self.victim(instance, false)).flatten();
        // Only a cold grant needs it (and `load_cost` scans what was learned).
        let load_ends = cold.then(|| Instant::now() + self.load_cost(pos, model));
        crate::metrics::global().placement(
            &instance.name,
            model,
            reason.as_str(),
            cold,
            victim.as_ref().and_then(|v| v.as_deref()),
            waited,
        );
        let Some(counts) = self.counts.get_mut(pos) else {
            return;
        };
        if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
            counts.by_reason[i] += 1;
        }
        if !waited.is_zero() && reason == Reason::ModelLoaded {
            counts.warm_waits += 1;
        }
        if !cold {
            return;
        }
        instance.mark_loaded_stale();
        if let Some(ends) = load_ends {
            self.load_ends.insert(model.to_string(), ends);
        }
        if let Some(Some(victim)) = victim {
            instance.forget_model(&victim);
            counts.evictions += 1;
        }
        instance.note_model(model);
    }

    /// A slot for `used.model` on instance `pos` was given back: learn from how it was used.
    pub fn released(&mut self, pos: usize, instance: &Instance, used: Used<'_>) {
        let model = used.model;
        instance.model_in_use(model, false);
        self.rules.finished(pos, model);
        let Some(held) = used.held else {
            return;
        };
        let learned = self.learned.entry((pos, model.to_string())).or_default();
        match used.load {
            // Ollama said what loading took: the rest of the slot's time was service, and a
            // load it reports is a load, whatever this sidecar expected.
            Some(load) => {
                learned.service = Some(ewma(learned.service, held.saturating_sub(load)));
                if load >= LOAD_SEEN {
                    learned.cold_load = Some(ewma(learned.cold_load, load));
                    if !used.cold {
                        // The view said loaded; it was not: read `/api/ps` now.
                        instance.mark_loaded_stale();
                    }
                }
            }
            // No `load_duration` (OpenAI routes, a stream cut short): the load is what the
            // cold slot took beyond a warm one.
            None if used.cold => {
                let load = held.saturating_sub(learned.service.unwrap_or_default());
                learned.cold_load = Some(ewma(learned.cold_load, load));
            }
            None => learned.service = Some(ewma(learned.service, held)),
        }
    }

    /// Whether a load on `instance` evicts a model, and which: as Ollama's `findRunnerToUnload`
    /// picks it (server/sched.go), the first idle model by session duration, then name: pinned
    /// models (`keep_alive: -1`, the longest) last, the others' keep-alives assumed equal;
    /// `Some(None)` when every loaded model is busy (the load waits for one). `None` while the
    /// instance holds fewer models than it was seen holding; with that not seen yet, `guess`
    /// takes the instance as full.
    fn victim(&self, instance: &Instance, guess: bool) -> Option<Option<String>> {
        let mut loaded = instance.loaded_models();
        let capacity = match instance.model_capacity() {
            0 if guess => loaded.len().max(1),
            0 => return None,
            n => n,
        };
        if loaded.len() < capacity {
            return None;
        }
        loaded.sort_by_key(|m| (self.rules.pinned(m), m.clone()));
        Some(
            loaded
                .iter()
                .find(|m| !instance.is_model_in_use(m))
                .cloned(),
        )
    }

    /// How long ago the model a load on `instance` would evict was asked for: `None` when it evicts
    /// nothing, `Duration::MAX` for a model never asked for, zero when only busy models could go.
    fn eviction_cost(&self, instance: &Instance, now: Instant) -> Option<Duration> {
        let victim = self.victim(instance, true)?;
        Some(victim.map_or(Duration::ZERO, |v| {
            self.last_asked
                .get(&v)
                .map_or(Duration::MAX, |t| now.saturating_duration_since(*t))
        }))
    }

    /// Whether a load on `instance` would evict a pinned model (every idle model there is one).
    fn evicts_pinned(&self, instance: &Instance) -> bool {
        matches!(self.victim(instance, true), Some(Some(v)) if self.rules.pinned(&v))
    }

    /// Why no instance can take a request for `model` now: some instance is ready, but none of
    /// those that may have it installed (and that its rule allows). With no instance ready at
    /// all the request waits, as every request does then; a model no allowed instance has goes
    /// to an allowed one, so that Ollama answers its own 404.
    pub fn unservable(&self, instances: &[Arc<Instance>], model: &str) -> Option<Refusal> {
        let may = |pos: usize, i: &Instance| self.rules.allowed(pos, model) && i.may_serve(model);
        if !instances.iter().enumerate().any(|(pos, i)| may(pos, i)) {
            return None;
        }
        let any_ready = instances.iter().any(|i| i.is_ready());
        let ready_may = instances
            .iter()
            .enumerate()
            .any(|(pos, i)| i.is_ready() && may(pos, i));
        if !any_ready || ready_may {
            return None;
        }
        Some(if self.rules.restricted(model) {
            Refusal::ModelRestricted
        } else {
            Refusal::ModelUnavailable
        })
    }

    fn service(&self, model: &str) -> Option<Duration> {
        let samples: Vec<Duration> = self
            .learned
            .iter()
            .filter(|((_, m), _)| m == model)
            .filter_map(|(_, l)| l.service)
            .collect();
        let n = u32::try_from(samples.len()).ok().filter(|n| *n > 0)?;
        Some(samples.iter().sum::<Duration>() / n)
    }

    /// The cold-load time of `model` on `pos`, else of the model anywhere, else of anything.
    fn cold_load(&self, pos: usize, model: &str) -> Option<Duration> {
        if let Some(d) = self
            .learned
            .get(&(pos, model.to_string()))
            .and_then(|l| l.cold_load)
        {
            return Some(d);
        }
        let mean = |it: &mut dyn Iterator<Item = Duration>| {
            let v: Vec<Duration> = it.collect();
            let n = u32::try_from(v.len()).ok().filter(|n| *n > 0)?;
            Some(v.iter().sum::<Duration>() / n)
        };
        mean(
            &mut self
                .learned
                .iter()
                .filter(|((_, m), _)| m == model)
                .filter_map(|(_, l)| l.cold_load),
        )
        .or_else(|| mean(&mut self.learned.values().filter_map(|l| l.cold_load)))
    }

    /// Whether a request for `model` on `instance` must wait because the instance holds no
    /// place for it: every model it can hold (as seen) has requests running and `model` is not
    /// one of them. Ollama would hold its whole scheduler, every later request to that
    /// instance included, until one of them goes idle (sched.go `processPending` waits for the
    /// runner it picked to unload). Such a request waits here instead, but no longer than a
    /// load of the model takes, so a busy instance cannot keep a model out. When more models
    /// run than fit (that escape, or a capacity learned late), only those `/api/ps` lists take
    /// more requests: the others would each evict another, in turn.
    fn no_place_for(&self, pos: usize, instance: &Instance, model: &str, waited: Duration) -> bool {
        let capacity = instance.model_capacity();
        if capacity == 0 {
            // Not seen holding any model yet: one load shows what fits.
            return false;
        }
        let running = instance.models_running();
        if instance.is_model_in_use(model) {
            return running > capacity && !instance.listed_loaded(model);
        }
        running >= capacity && waited < self.load_cost(pos, model)
    }

    /// What a load of `model` on `pos` is taken to cost: as learned, else nothing (before any
    /// load was seen, dispatch is work-conserving).
    fn load_cost(&self, pos: usize, model: &str) -> Duration {
        self.cold_load(pos, model).unwrap_or_default()
    }

    /// The choice for a waiter asking for `model` that has waited since `enqueued`; `ahead`
    /// waiters for the same model were considered before it in this round.
    #[allow(clippy::too_many_arguments)]
    pub fn choose_for_model(
        &self,
        instances: &[Arc<Instance>],
        busy: &[usize],
        rotation: usize,
        model: &str,
        avoid: Option<usize>,
        enqueued: Instant,
        ahead: usize,
        now: Instant,
    ) -> Choice {
        let n = instances.len();
        if self.rules.fleet_full(model) {
            // `max_concurrent`: it waits for one of its model's requests to end.
            return Choice::NoSlot;
        }
        let avoid = usable_avoid(instances, avoid);
        let allowed = |pos: usize| self.rules.allowed(pos, model);
        let model_somewhere = instances
            .iter()
            .enumerate()
            .any(|(pos, i)| allowed(pos) && i.may_serve(model));
        // Patience for a warm slot counts from when the model's last load is expected to end,
        // if that is after the request came: waiting for a slot the model did not have yet is
        // not waiting for its warm one.
        let since = self
            .load_ends
            .get(model)
            .map_or(enqueued, |at| enqueued.max(*at));
        let waited = now.saturating_duration_since(since);
        let mut free: Vec<(usize, &Arc<Instance>, usize)> = Vec::new();
        let mut warm_busy_slots = 0usize;
        for offset in 0..n {
            let pos = (rotation + offset) % n;
            let (Some(inst), Some(b)) = (instances.get(pos), busy.get(pos)) else {
                continue;
            };
            if avoid == Some(pos) || !allowed(pos) || (model_somewhere && !inst.may_serve(model)) {
                continue;
            }
            let limit = if self.rules.instance_full(pos, model) {
                // `max_concurrent_per_instance`: no slot here for this model now.
                0
            } else {
                inst.model_slot_limit(model)
            };
            // The model's own slots (Ollama gives each loaded model `num_parallel`), within
            // what the instance serves over all its models.
            let mut f = limit
                .saturating_sub(inst.requests_for(model))
                .min(inst.request_limit().saturating_sub(*b));
            if f > 0 && self.no_place_for(pos, inst, model, waited) {
                f = 0;
            }
            if f > 0 {
                free.push((pos, inst, f));
            } else if limit > 0 && inst.has_model(model) {
                warm_busy_slots += limit;
            }
        }
        if let Some((pos, inst, _)) = free
            .iter()
            .find(|(_, i, _)| i.gate() == crate::upstream::Gate::HalfOpen)
        {
            return Choice::Grant(*pos, (*inst).clone(), Reason::HalfOpenTrial);
        }
        // Warm with a free slot: the most free slots among them (ties: rotation order).
        // Ties go to the first in rotation order: `min_by_key` keeps the first minimum.
        let warm = free
            .iter()
            .filter(|(_, i, _)| i.has_model(model))
            .min_by_key(|(_, _, f)| Reverse(*f));
        if let Some((pos, inst, _)) = warm {
            return Choice::Grant(*pos, (*inst).clone(), Reason::ModelLoaded);
        }
        // A cold load: never one that evicts a pinned model while another is possible; where
        // it evicts nothing, else where the evicted model was asked for longest ago; then the
        // most free slots.
        let cold = free.iter().min_by_key(|(_, inst, f)| {
            let cost = self.eviction_cost(inst, now);
            let spares_pins = !self.evicts_pinned(inst);
            Reverse((
                spares_pins,
                cost.is_none(),
                cost.unwrap_or(Duration::MAX),
                *f,
            ))
        });
        let Some((pos, inst, _)) = cold else {
            return Choice::NoSlot;
        };
        if warm_busy_slots == 0 {
            return Choice::Grant(*pos, (*inst).clone(), Reason::ColdLoad);
        }
        let Some(load) = self.cold_load(*pos, model) else {
            // Nothing learned about loads yet: work-conserving.
            return Choice::Grant(*pos, (*inst).clone(), Reason::ColdLoadWarmBusy);
        };
        // A load that evicts a model asked for lately costs that model's reload too.
        let cost = match self.eviction_cost(inst, now) {
            Some(asked_ago) if asked_ago < load.saturating_mul(RECENT_LOADS) => {
                load.saturating_mul(2)
            }
            _ => load,
        };
        // Slots free up at about one service time each, shared by those ahead.
        let per_slot = self.service(model).unwrap_or_default();
        let warm_eta = per_slot.mul_f64((ahead + 1) as f64 / warm_busy_slots as f64);
        if waited < cost && warm_eta <= cost {
            return Choice::Wait(since + cost);
        }
        Choice::Grant(*pos, (*inst).clone(), Reason::ColdLoadWarmBusy)
    }
}

/// `avoid` (the instance a retry failed on) holds only while another instance is ready, even a
/// busy one: with none, the retry goes back to it.
pub fn usable_avoid(instances: &[Arc<Instance>], avoid: Option<usize>) -> Option<usize> {
    avoid.filter(|&a| {
        instances
            .iter()
            .enumerate()
            .any(|(pos, i)| pos != a && i.is_ready())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelRuleConfig, ModelRulesConfig};

    fn ready(index: usize, loaded: &str) -> Arc<Instance> {
        let inst = super::super::tests::instance(index, 1);
        // Seen holding one model: a load there evicts it.
        inst.set_loaded_models(vec![loaded.to_string()]);
        inst
    }

    fn granted_on(p: &Placement, instances: &[Arc<Instance>], model: &str) -> Option<usize> {
        let now = Instant::now();
        match p.choose_for_model(instances, &[0, 0], 0, model, None, now, 0, now) {
            Choice::Grant(pos, _, _) => Some(pos),
            _ => None,
        }
    }

    /// A cold load goes where it evicts an unpinned model, though the scan order and every
    /// other measure prefer the instance whose only model is pinned.
    #[test]
    fn a_cold_load_spares_a_pinned_model() {
        let instances = [ready(0, "pin:latest"), ready(1, "other:latest")];
        let mut p = Placement::new(2);
        assert_eq!(granted_on(&p, &instances, "new:latest"), Some(0));
        let rule = ModelRuleConfig {
            pattern: "pin:*".into(),
            max_concurrent: None,
            max_concurrent_per_instance: None,
            instances: vec![],
            pinned: true,
        };
        let rules = ModelRulesConfig { rules: vec![rule] };
        p.rules = ModelRules::new(rules, &instances);
        assert_eq!(granted_on(&p, &instances, "new:latest"), Some(1));
        // With no other choice, the load still happens (nothing starves).
        assert_eq!(granted_on(&p, &instances[..1], "new:latest"), Some(0));
    }
}
