//! One Ollama instance as the request path sees it: where it is, whether it may take traffic,
//! how busy it is, and the process facts the supervisor records for `/status` and metrics.

use super::target::{Addresses, HostRule};
use crate::config::{InstanceConfig, PassiveConfig, UpstreamAddress};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// Lifecycle state. Only `Ready` instances take traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum InstanceState {
    /// Process spawned, waiting for `/api/version` to answer.
    Starting = 0,
    /// Answering, loading the configured warm-up models.
    Warming = 1,
    /// Takes traffic.
    Ready = 2,
    /// Running but failing health checks.
    Unhealthy = 3,
    /// Exited; waiting out the restart backoff.
    Backoff = 4,
    /// Restarting again and again without a stable run; still retried at the backoff ceiling.
    Crashloop = 5,
    /// Stopped (shutdown) or never started.
    Stopped = 6,
}

impl InstanceState {
    pub const ALL: [InstanceState; 7] = [
        InstanceState::Starting,
        InstanceState::Warming,
        InstanceState::Ready,
        InstanceState::Unhealthy,
        InstanceState::Backoff,
        InstanceState::Crashloop,
        InstanceState::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Warming => "warming",
            InstanceState::Ready => "ready",
            InstanceState::Unhealthy => "unhealthy",
            InstanceState::Backoff => "backoff",
            InstanceState::Crashloop => "crashloop",
            InstanceState::Stopped => "stopped",
        }
    }

    fn from_u8(v: u8) -> InstanceState {
        match v {
            0 => InstanceState::Starting,
            1 => InstanceState::Warming,
            2 => InstanceState::Ready,
            3 => InstanceState::Unhealthy,
            4 => InstanceState::Backoff,
            5 => InstanceState::Crashloop,
            _ => InstanceState::Stopped,
        }
    }
}

/// What the supervisor knows about an instance's process (empty for external instances).
#[derive(Debug, Clone, Default)]
pub struct ProcessInfo {
    pub pid: Option<u32>,
    pub started_at: Option<SystemTime>,
    pub restarts: u64,
    /// `exit code 1`, `signal 9 (SIGKILL)`, ...
    pub last_exit: Option<String>,
    /// CPU use of the whole process tree, in percent of one core, at the last sample.
    pub cpu_percent: f32,
    /// Total CPU time of the process tree, in seconds, at the last sample.
    pub cpu_seconds: f64,
    /// Resident memory of the process tree, in bytes, at the last sample.
    pub memory_bytes: u64,
}

pub struct Instance {
    /// Position in the registry (stable for the life of the process).
    pub index: usize,
    pub name: String,
    pub upstream: UpstreamAddress,
    /// The `Host` header sent upstream, by address (Ollama's loopback host check).
    host_rule: HostRule,
    pub num_parallel: usize,
    pub supervised: bool,
    state: AtomicU8,
    /// When the state last changed.
    state_since: Mutex<Instant>,
    in_flight: AtomicUsize,
    /// What the name resolved to last and the address in use; empty until it resolves.
    addresses: RwLock<Addresses>,
    /// Set by a connect failure: the instance watch resolves the name again soon.
    resolve_wanted: AtomicBool,
    /// Why the last resolution failed, while it keeps failing.
    resolve_error: Mutex<Option<String>>,
    /// Why the last active health check failed, until one succeeds.
    problem: Mutex<Option<String>>,
    pub process: Mutex<ProcessInfo>,
    /// Models the instance listed loaded at its last answered `/api/ps`, in `model_key` form.
    /// Its view (`loaded_models`) adds the models in use here and those just noted.
    loaded_models: RwLock<Vec<String>>,
    /// Models the instance has installed (from `/api/tags`), in `model_key` form; `None` until
    /// it first answers, when it may hold anything.
    installed_models: RwLock<Option<Vec<String>>>,
    /// The most models `/api/ps` showed loaded at once: what fits, as far as seen.
    model_capacity: AtomicUsize,
    /// Set when the sidecar made the instance load a model: read `/api/ps` again soon.
    loaded_stale: AtomicBool,
    /// Admitted requests running here, per model (`model_key`): those models are loaded (or
    /// loading) whatever an `/api/ps` read a moment ago says.
    models_in_use: Mutex<std::collections::HashMap<String, usize>>,
    /// Loaded models whose session a request set to zero (`keep_alive: 0`): Ollama unloads each
    /// as soon as no request uses it (see `keep_alive.rs`).
    unload_when_idle: Mutex<std::collections::HashSet<String>>,
    /// Per installed model asked about (`upstream/parallel.rs`): whether Ollama runs it one
    /// request at a time rather than `num_parallel`.
    one_at_a_time: RwLock<std::collections::HashMap<String, bool>>,
    passive_config: PassiveConfig,
    passive: Mutex<Passive>,
    /// Models the sidecar made the instance load, not yet confirmed by `/api/ps`, with when
    /// they were last sent or used: dropped by the next `/api/ps` that does not list them, or
    /// after [`NOTED_MODEL_TTL`] while `/api/ps` does not answer.
    noted_models: Mutex<std::collections::HashMap<String, Instant>>,
    /// Per-request 5xx answers (not instance faults), for `/status`.
    request_errors: std::sync::atomic::AtomicU64,
    /// While not ready: the earliest it can be, and why (see `ready_not_before`).
    ready_not_before: Mutex<Option<(Instant, &'static str)>>,
    /// Removed by a reload: takes no new requests, ever (`retire`).
    retired: AtomicBool,
}

/// How long a model the sidecar sent to an instance counts as loaded there without `/api/ps`
/// saying so (its polls failing), once no request uses it.
pub const NOTED_MODEL_TTL: Duration = Duration::from_secs(30);

/// An `/api/ps` answer may have been written before a load the sidecar just caused began: a
/// model noted this recently is not dropped for its absence.
const NOTED_MODEL_GRACE: Duration = Duration::from_secs(2);

/// Passive health: what real traffic says about the instance.
#[derive(Debug, Default)]
struct Passive {
    consecutive_failures: u32,
    /// Out of rotation until then; after it, one trial request (half-open).
    ejected_until: Option<Instant>,
    /// The cool-down of the last ejection (it doubles while trials keep failing).
    cooldown: Duration,
    ejections: u64,
}

/// Whether traffic may go to an instance, as far as passive health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Full traffic.
    Open,
    /// Ejected: no traffic until the cool-down ends.
    Ejected,
    /// Cool-down over: one trial request decides.
    HalfOpen,
}

/// Ollama treats `llama3.2` and `llama3.2:latest` as one model: compare names in this form.
pub fn model_key(name: &str) -> String {
    let name = name.trim();
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

impl Instance {
    pub fn new(index: usize, config: &InstanceConfig, passive: &PassiveConfig) -> Instance {
        let supervised = config.supervised.is_some();
        // A supervised instance earns `Ready` from the supervisor, an external one from its
        // first health check (run before the proxy starts).
        let initial = if supervised {
            InstanceState::Stopped
        } else {
            InstanceState::Starting
        };
        // A name has no address until the instance watch resolves it.
        let addresses = config
            .upstream
            .literal()
            .map(Addresses::fixed)
            .unwrap_or_default();
        Instance {
            index,
            name: config.name.clone(),
            host_rule: HostRule::new(&config.upstream, &super::target::machine_hostname()),
            upstream: config.upstream.clone(),
            num_parallel: config.num_parallel,
            supervised,
            state: AtomicU8::new(initial as u8),
            state_since: Mutex::new(Instant::now()),
            in_flight: AtomicUsize::new(0),
            addresses: RwLock::new(addresses),
            resolve_wanted: AtomicBool::new(false),
            resolve_error: Mutex::new(None),
            problem: Mutex::new(None),
            process: Mutex::new(ProcessInfo::default()),
            loaded_models: RwLock::new(Vec::new()),
            installed_models: RwLock::new(None),
            model_capacity: AtomicUsize::new(0),
            loaded_stale: AtomicBool::new(false),
            models_in_use: Mutex::new(std::collections::HashMap::new()),
            unload_when_idle: Mutex::new(std::collections::HashSet::new()),
            one_at_a_time: RwLock::new(std::collections::HashMap::new()),
            passive_config: passive.clone(),
            passive: Mutex::new(Passive::default()),
            noted_models: Mutex::new(std::collections::HashMap::new()),
            request_errors: std::sync::atomic::AtomicU64::new(0),
            ready_not_before: Mutex::new(None),
            retired: AtomicBool::new(false),
        }
    }

    pub fn state(&self) -> InstanceState {
        InstanceState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Sets the state; returns the previous one.
    pub fn set_state(&self, state: InstanceState) -> InstanceState {
        let prev = InstanceState::from_u8(self.state.swap(state as u8, Ordering::AcqRel));
        if prev != state {
            if let Ok(mut since) = self.state_since.lock() {
                *since = Instant::now();
            }
            tracing::info!(instance = %self.name, from = prev.as_str(), to = state.as_str(), "instance state");
        }
        prev
    }

    /// How long the instance has been in its current state.
    pub fn state_age(&self) -> std::time::Duration {
        self.state_since
            .lock()
            .map(|s| s.elapsed())
            .unwrap_or_default()
    }

    /// Whether the instance takes traffic: ready, resolved, and not ejected.
    pub fn is_ready(&self) -> bool {
        self.slot_limit() > 0
    }

    /// How many admitted requests for one model the instance may serve at once right now:
    /// `num_parallel` (Ollama's `OLLAMA_NUM_PARALLEL`, which each loaded model's runner gets on
    /// its own: server/sched.go sets `runner.numParallel` per runner), one during a half-open
    /// trial, none when it is not ready or is ejected.
    pub fn slot_limit(&self) -> usize {
        if self.state() != InstanceState::Ready || self.addr().is_none() || self.is_retired() {
            return 0;
        }
        match self.gate() {
            Gate::Open => self.num_parallel,
            Gate::HalfOpen => 1,
            Gate::Ejected => 0,
        }
    }

    /// How many admitted requests for `model` the instance may serve at once right now:
    /// [`slot_limit`](Self::slot_limit), or at most one for a model Ollama runs one request at
    /// a time (`upstream/parallel.rs`).
    pub fn model_slot_limit(&self, model: &str) -> usize {
        let limit = self.slot_limit();
        let one = self
            .one_at_a_time
            .read()
            .is_ok_and(|m| m.get(model).copied().unwrap_or(false));
        if one {
            limit.min(1)
        } else {
            limit
        }
    }

    /// Installed models not asked about yet, at most `limit`.
    pub fn parallel_unknown(&self, limit: usize) -> Vec<String> {
        let installed = self.installed_models().unwrap_or_default();
        let Ok(known) = self.one_at_a_time.read() else {
            return Vec::new();
        };
        installed
            .into_iter()
            .filter(|m| !known.contains_key(m))
            .take(limit)
            .collect()
    }

    /// The installed models Ollama runs one request at a time, sorted.
    pub fn one_at_a_time_models(&self) -> Vec<String> {
        let mut models: Vec<String> = self
            .one_at_a_time
            .read()
            .map(|m| {
                m.iter()
                    .filter(|(_, one)| **one)
                    .map(|(m, _)| m.clone())
                    .collect()
            })
            .unwrap_or_default();
        models.sort();
        models
    }

    /// What `/api/show` said of `model`: Ollama runs it one request at a time, or not.
    pub fn set_one_at_a_time(&self, model: &str, one: bool) {
        if let Ok(mut known) = self.one_at_a_time.write() {
            known.insert(model.to_string(), one);
        }
    }

    /// The instance's slots: `num_parallel` for each model it can hold at once (as seen on
    /// `/api/ps`; one until it was seen holding more).
    pub fn slots(&self) -> usize {
        self.num_parallel
            .saturating_mul(self.model_capacity().max(1))
    }

    /// How many admitted requests, over all models, the instance may serve at once right now:
    /// [`slots`](Self::slots), one during a half-open trial, none when not ready or ejected.
    pub fn request_limit(&self) -> usize {
        match self.slot_limit() {
            0 => 0,
            _ if self.gate() == Gate::HalfOpen => 1,
            _ => self.slots(),
        }
    }

    pub fn gate(&self) -> Gate {
        let Ok(p) = self.passive.lock() else {
            return Gate::Open;
        };
        match p.ejected_until {
            None => Gate::Open,
            Some(until) if Instant::now() < until => Gate::Ejected,
            Some(_) => Gate::HalfOpen,
        }
    }

    /// Times this instance was ejected by passive health.
    pub fn ejections(&self) -> u64 {
        self.passive.lock().map(|p| p.ejections).unwrap_or(0)
    }

    /// A request the instance answered (no instance fault); true when this ends an ejection.
    /// Only the half-open trial (`trial`: the admitted request granted while half-open) ends
    /// one: any other success, a `GET /api/tags` say, says nothing about the inference that
    /// failed.
    pub fn record_success(&self, trial: bool) -> bool {
        let Ok(mut p) = self.passive.lock() else {
            return false;
        };
        match p.ejected_until {
            None => {
                p.consecutive_failures = 0;
                false
            }
            Some(until) if trial && Instant::now() >= until => {
                p.ejected_until = None;
                p.consecutive_failures = 0;
                p.cooldown = Duration::ZERO;
                true
            }
            Some(_) => false,
        }
    }

    /// An instance fault (connect refused or reset, a timeout, 502/503/504 from the instance);
    /// returns the cool-down when this ejects the instance: the threshold was reached, or the
    /// half-open trial (`trial`) failed, which doubles the last cool-down up to `max_cooldown`.
    pub fn record_failure(&self, trial: bool) -> Option<Duration> {
        let cfg = &self.passive_config;
        let Ok(mut p) = self.passive.lock() else {
            return None;
        };
        let now = Instant::now();
        let cooldown = match p.ejected_until {
            // Still ejected (a request that started before the ejection), or half-open and
            // not the trial: the trial decides.
            Some(until) if now < until || !trial => return None,
            Some(_) => (p.cooldown * 2).clamp(cfg.cooldown, cfg.max_cooldown),
            None => {
                p.consecutive_failures = p.consecutive_failures.saturating_add(1);
                if p.consecutive_failures < cfg.failures {
                    return None;
                }
                cfg.cooldown
            }
        };
        p.cooldown = cooldown;
        p.ejected_until = Some(now + cooldown);
        p.ejections += 1;
        Some(cooldown)
    }

    /// A request the instance answered with a 5xx of its own (500 for a model that needs more
    /// memory than is free, say): a fault of that request, counted but never ejected on.
    pub fn record_request_error(&self) {
        self.request_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Per-request 5xx answers seen (see [`record_request_error`](Self::record_request_error)).
    pub fn request_errors(&self) -> u64 {
        self.request_errors.load(Ordering::Relaxed)
    }

    /// Records the earliest moment the instance can take traffic again, from its schedule: the
    /// supervisor's restart backoff, or the health checks still needed. `None`: unknown.
    pub fn set_ready_not_before(&self, at: Option<(Instant, &'static str)>) {
        if let Ok(mut r) = self.ready_not_before.lock() {
            *r = at;
        }
    }

    /// The earliest the instance can take traffic, and why not before, while that is still
    /// ahead and it is not ready; `None` when it is ready or may be at any moment.
    pub fn ready_not_before(&self) -> Option<(Instant, &'static str)> {
        if self.state() == InstanceState::Ready {
            return None;
        }
        let at = self.ready_not_before.lock().ok().and_then(|r| *r)?;
        (at.0 > Instant::now()).then_some(at)
    }

    /// The address requests go to now; `None` while the name has not resolved.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addresses.read().ok().and_then(|a| a.current())
    }

    /// Whether the host is a name (resolved by the instance watch) rather than an IP literal.
    pub fn is_named(&self) -> bool {
        self.upstream.literal().is_none()
    }

    pub fn addresses(&self) -> Addresses {
        self.addresses.read().map(|a| a.clone()).unwrap_or_default()
    }

    /// Takes a new resolution; returns the address in use before and after when it changed.
    pub fn set_addresses(
        &self,
        list: Vec<SocketAddr>,
    ) -> Option<(Option<SocketAddr>, Option<SocketAddr>)> {
        let mut a = self.addresses.write().ok()?;
        let before = a.current();
        a.replace(list).then(|| (before, a.current()))
    }

    /// `addr` answered a health check: requests go there from now on.
    pub fn prefer_addr(&self, addr: SocketAddr) -> bool {
        let Ok(mut a) = self.addresses.write() else {
            return false;
        };
        let before = a.current();
        a.prefer(addr) && before != Some(addr)
    }

    /// A connection to `addr` failed: requests move to the next address, if any, and the name is
    /// resolved again soon. Returns the new address in use when it changed.
    pub fn connect_failed(&self, addr: SocketAddr) -> Option<SocketAddr> {
        self.resolve_wanted.store(true, Ordering::Release);
        self.addresses.write().ok()?.failed(addr)
    }

    /// Whether a connect failure asked for a new resolution since the last call.
    pub fn take_resolve_wanted(&self) -> bool {
        self.resolve_wanted.swap(false, Ordering::AcqRel)
    }

    /// The `Host` header for a request sent to `addr` (Ollama's loopback host check).
    pub fn host_header_for(&self, addr: SocketAddr) -> &str {
        self.host_rule.for_addr(addr)
    }

    /// Where a request to this instance goes now, with its `Host` header.
    pub fn target(&self) -> Option<(SocketAddr, &str)> {
        self.addr().map(|a| (a, self.host_header_for(a)))
    }

    /// Why the name does not resolve, while it does not.
    pub fn resolve_error(&self) -> Option<String> {
        self.resolve_error.lock().ok().and_then(|e| e.clone())
    }

    /// Records the outcome of a resolution; returns the previous error.
    pub fn set_resolve_error(&self, error: Option<String>) -> Option<String> {
        self.resolve_error
            .lock()
            .ok()
            .and_then(|mut e| std::mem::replace(&mut *e, error))
    }

    /// Why the last active health check failed, until one succeeds.
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().ok().and_then(|p| p.clone())
    }

    pub fn set_problem(&self, problem: Option<String>) {
        if let Ok(mut p) = self.problem.lock() {
            *p = problem;
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Counts a request sent to `addr` in flight until the guard drops (exactly once, on every
    /// path).
    pub fn track(self: &std::sync::Arc<Self>, addr: SocketAddr) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlightGuard {
            instance: self.clone(),
            addr,
        }
    }

    /// Whether the instance has `model` loaded (a name in `model_key` form).
    pub fn has_model(&self, model: &str) -> bool {
        self.loaded_models().iter().any(|x| x == model)
    }

    /// The models the instance has loaded as far as the sidecar knows: what `/api/ps` said,
    /// and those noted since (a load the sidecar caused, a model in use when `/api/ps` did
    /// not list it yet) while in use or younger than [`NOTED_MODEL_TTL`].
    pub fn loaded_models(&self) -> Vec<String> {
        let mut models = self
            .loaded_models
            .read()
            .map(|m| m.clone())
            .unwrap_or_default();
        if let Ok(noted) = self.noted_models.lock() {
            for (model, at) in noted.iter() {
                let current = at.elapsed() < NOTED_MODEL_TTL || self.is_model_in_use(model);
                if current && !models.contains(model) {
                    models.push(model.clone());
                }
            }
        }
        models
    }

    /// Replaces the loaded-model list with an `/api/ps` answer. A model the sidecar noted is
    /// confirmed by it, or dropped when it is not there (unless noted just now, or in use: a
    /// request may not have reached the instance yet, and stays noted).
    pub fn set_loaded_models(&self, models: Vec<String>) {
        self.model_capacity
            .fetch_max(models.len(), Ordering::Relaxed);
        if let Ok(mut noted) = self.noted_models.lock() {
            noted.retain(|model, at| {
                !models.contains(model)
                    && (at.elapsed() < NOTED_MODEL_GRACE || self.is_model_in_use(model))
            });
            if let Ok(in_use) = self.models_in_use.lock() {
                for model in in_use.keys().filter(|m| !models.contains(m)) {
                    noted.entry(model.clone()).or_insert_with(Instant::now);
                }
            }
        }
        if let Ok(mut zero) = self.unload_when_idle.lock() {
            // A runner that is gone takes its session with it.
            zero.retain(|m| models.contains(m) || self.is_model_in_use(m));
        }
        if let Ok(mut m) = self.loaded_models.write() {
            *m = models;
        }
    }

    /// The most models the instance was seen holding at once (0: not seen yet).
    pub fn model_capacity(&self) -> usize {
        self.model_capacity.load(Ordering::Relaxed)
    }

    /// A request for `model` got a slot here (`true`) or gave it back (`false`).
    pub fn model_in_use(&self, model: &str, started: bool) {
        let mut idle = false;
        if let Ok(mut in_use) = self.models_in_use.lock() {
            if started {
                *in_use.entry(model.to_string()).or_default() += 1;
            } else if let Some(n) = in_use.get_mut(model) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    in_use.remove(model);
                    idle = true;
                }
            }
        }
        let unloads = idle
            && self
                .unload_when_idle
                .lock()
                .is_ok_and(|mut zero| zero.remove(model));
        if unloads {
            // sched.go `processCompleted`: a zero session expires the runner the moment its
            // last request ends.
            self.forget_model(model);
            return;
        }
        if !started {
            // A noted model's time counts from its last use.
            if let Ok(mut noted) = self.noted_models.lock() {
                if let Some(at) = noted.get_mut(model) {
                    *at = Instant::now();
                }
            }
        }
    }

    /// Whether a request admitted here is using `model` now.
    pub fn is_model_in_use(&self, model: &str) -> bool {
        self.requests_for(model) > 0
    }

    /// Whether the instance's last `/api/ps` answer listed `model` (not counting what the
    /// sidecar noted since).
    pub fn listed_loaded(&self, model: &str) -> bool {
        self.loaded_models
            .read()
            .map(|m| m.iter().any(|x| x == model))
            .unwrap_or(false)
    }

    /// How many models have requests admitted here running now.
    pub fn models_running(&self) -> usize {
        self.models_in_use.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// How many requests admitted here are using `model` now.
    pub fn requests_for(&self, model: &str) -> usize {
        self.models_in_use
            .lock()
            .map(|m| m.get(model).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// The sidecar just made the instance load a model: its `/api/ps` is worth reading now.
    pub fn mark_loaded_stale(&self) {
        self.loaded_stale.store(true, Ordering::Release);
    }

    pub fn take_loaded_stale(&self) -> bool {
        self.loaded_stale.swap(false, Ordering::AcqRel)
    }

    /// A request sent here for `model` named a `keep_alive`: from now on that is the model's
    /// session in Ollama (sched.go `useLoadedRunner`), until another request names one or the
    /// model unloads.
    pub fn set_session(&self, model: &str, keep_alive: crate::keep_alive::KeepAlive) {
        if let Ok(mut zero) = self.unload_when_idle.lock() {
            if keep_alive == crate::keep_alive::KeepAlive::UnloadWhenIdle {
                zero.insert(model.to_string());
            } else {
                zero.remove(model);
            }
        }
    }

    /// Records that `model` is no longer loaded here (a load the sidecar caused evicted it, or
    /// its zero session ended with its last request).
    pub fn forget_model(&self, model: &str) {
        if let Ok(mut m) = self.loaded_models.write() {
            m.retain(|x| x != model);
        }
        if let Ok(mut noted) = self.noted_models.lock() {
            noted.remove(model);
        }
    }

    /// Replaces the installed-model list (from a `/api/tags` answer); true when it changed.
    pub fn set_installed_models(&self, mut models: Vec<String>) -> bool {
        models.sort();
        if let Ok(mut known) = self.one_at_a_time.write() {
            // A model deleted and pulled again is asked about again.
            known.retain(|m, _| models.contains(m));
        }
        match self.installed_models.write() {
            Ok(mut m) if m.as_ref() != Some(&models) => {
                *m = Some(models);
                true
            }
            _ => false,
        }
    }

    /// Whether `model` (in `model_key` form) may be sent here: it is installed, or the instance
    /// has not listed its models yet.
    pub fn may_serve(&self, model: &str) -> bool {
        !self.is_retired()
            && self
                .installed_models
                .read()
                .map(|m| {
                    m.as_ref()
                        .is_none_or(|list| list.iter().any(|x| x == model))
                })
                .unwrap_or(true)
    }

    /// Removed from the configuration by a reload: no new request is sent here; those in
    /// flight finish.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Records that a request for `model` was just sent here: Ollama loads it on arrival (if
    /// it has it). Counted as loaded until `/api/ps` confirms or denies it, or for
    /// [`NOTED_MODEL_TTL`] after its last use while `/api/ps` does not answer.
    pub fn note_model(&self, model: &str) {
        if let Ok(mut noted) = self.noted_models.lock() {
            noted.retain(|_, at| at.elapsed() < NOTED_MODEL_TTL);
            noted.insert(model.to_string(), Instant::now());
        }
    }

    pub fn process_info(&self) -> ProcessInfo {
        self.process.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// The installed models (from `/api/tags`, `model_key` form); `None` until listed.
    pub fn installed_models(&self) -> Option<Vec<String>> {
        self.installed_models.read().ok().and_then(|m| m.clone())
    }
}

/// Decrements the instance's in-flight count when dropped.
pub struct InFlightGuard {
    instance: std::sync::Arc<Instance>,
    addr: SocketAddr,
}

impl InFlightGuard {
    pub fn instance(&self) -> &std::sync::Arc<Instance> {
        &self.instance
    }

    /// The address the request was sent to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `Host` header for that address.
    pub fn host_header(&self) -> &str {
        self.instance.host_header_for(self.addr)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.instance.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{InstanceConfig, PassiveConfig, UpstreamAddress};

    fn instance() -> Instance {
        let cfg = InstanceConfig {
            name: "a".into(),
            upstream: UpstreamAddress {
                host: "127.0.0.1".into(),
                port: 1,
                tls: false,
            },
            num_parallel: 4,
            supervised: None,
        };
        let passive = PassiveConfig {
            failures: 2,
            cooldown: Duration::from_millis(50),
            max_cooldown: Duration::from_millis(120),
        };
        Instance::new(0, &cfg, &passive)
    }

    #[test]
    fn passive_ejection_half_open_and_recovery() {
        let i = instance();
        assert_eq!(i.slot_limit(), 0, "not ready before its first health check");
        i.set_state(InstanceState::Ready);
        assert_eq!(i.slot_limit(), 4);
        assert_eq!(i.record_failure(false), None);
        assert_eq!(i.record_failure(false), Some(Duration::from_millis(50)));
        assert_eq!(i.gate(), Gate::Ejected);
        assert_eq!(i.slot_limit(), 0);
        assert!(!i.is_ready());
        // A straggler's failure during the cool-down changes nothing.
        assert_eq!(i.record_failure(false), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(i.gate(), Gate::HalfOpen);
        assert_eq!(i.slot_limit(), 1, "one trial request");
        // Requests that are not the trial decide nothing, either way.
        assert!(!i.record_success(false), "a metadata success is no trial");
        assert_eq!(i.record_failure(false), None);
        assert_eq!(i.gate(), Gate::HalfOpen);
        // The trial fails: twice the cool-down, capped.
        assert_eq!(i.record_failure(true), Some(Duration::from_millis(100)));
        std::thread::sleep(Duration::from_millis(110));
        assert_eq!(i.record_failure(true), Some(Duration::from_millis(120)));
        std::thread::sleep(Duration::from_millis(130));
        assert!(i.record_success(true), "the trial succeeded: back");
        assert_eq!(i.gate(), Gate::Open);
        assert_eq!(i.slot_limit(), 4);
        assert_eq!(i.ejections(), 3);
    }

    /// Ages a noted model by `by`, as if it had been noted that long ago.
    fn age_note(i: &Instance, model: &str, by: Duration) {
        let mut noted = i.noted_models.lock().unwrap();
        let at = noted.get_mut(model).unwrap();
        *at = at.checked_sub(by).unwrap();
    }

    #[test]
    fn a_noted_model_is_confirmed_or_dropped_by_api_ps() {
        let i = instance();
        i.note_model("m:latest");
        assert!(i.has_model("m:latest"), "the sidecar just sent it there");
        // An /api/ps answer written before the load began does not drop it at once...
        i.set_loaded_models(vec![]);
        assert!(i.has_model("m:latest"));
        // ...but one a little later does.
        age_note(&i, "m:latest", NOTED_MODEL_GRACE);
        i.set_loaded_models(vec![]);
        assert!(!i.has_model("m:latest"), "/api/ps does not list it");
        // Confirmed by /api/ps: loaded for as long as /api/ps says so.
        i.note_model("n:latest");
        i.set_loaded_models(vec!["n:latest".into()]);
        age_note_absent(&i, "n:latest");
        assert!(i.has_model("n:latest"));
        i.set_loaded_models(vec![]);
        assert!(!i.has_model("n:latest"));
    }

    /// A zero session unloads the model when its last request ends, not before; a later
    /// request naming another keep-alive keeps it loaded.
    #[test]
    fn a_zero_session_unloads_the_model_with_its_last_request() {
        use crate::keep_alive::KeepAlive::*;
        let i = instance();
        i.set_loaded_models(vec!["m:latest".into()]);
        i.model_in_use("m:latest", true);
        i.model_in_use("m:latest", true);
        i.set_session("m:latest", UnloadWhenIdle);
        i.model_in_use("m:latest", false);
        assert!(i.has_model("m:latest"), "one request still uses it");
        i.model_in_use("m:latest", false);
        assert!(!i.has_model("m:latest"), "Ollama unloads it now");
        i.set_loaded_models(vec!["m:latest".into()]);
        i.model_in_use("m:latest", true);
        i.set_session("m:latest", UnloadWhenIdle);
        i.set_session("m:latest", Forever);
        i.model_in_use("m:latest", false);
        assert!(i.has_model("m:latest"));
    }

    /// A confirmed model is no longer noted.
    fn age_note_absent(i: &Instance, model: &str) {
        assert!(!i.noted_models.lock().unwrap().contains_key(model));
    }

    #[test]
    fn a_noted_model_expires_while_api_ps_does_not_answer() {
        let i = instance();
        i.model_in_use("m:latest", true);
        i.note_model("m:latest");
        age_note(&i, "m:latest", NOTED_MODEL_TTL);
        assert!(i.has_model("m:latest"), "in use: loaded or loading");
        i.model_in_use("m:latest", false);
        assert!(i.has_model("m:latest"), "its time counts from its last use");
        age_note(&i, "m:latest", NOTED_MODEL_TTL);
        assert!(
            !i.has_model("m:latest"),
            "no /api/ps answer for a while: not assumed loaded for ever"
        );
        assert!(i.loaded_models().is_empty());
    }

    #[test]
    fn model_keys() {
        assert_eq!(model_key("llama3.2"), "llama3.2:latest");
        assert_eq!(model_key("llama3.2:1b"), "llama3.2:1b");
        assert_eq!(
            model_key("registry.local:5000/ns/m"),
            "registry.local:5000/ns/m:latest"
        );
        assert_eq!(model_key("hf.co/ns/m:Q4"), "hf.co/ns/m:Q4");
    }
}
