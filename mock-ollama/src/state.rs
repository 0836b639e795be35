//! Shared state: behaviour knobs, counters, the installed models and what is loaded,
//! the per-model slots (OLLAMA_NUM_PARALLEL) and the bounded wait queue, the request log.
//!
//! Placement follows Ollama's scheduler (server/sched.go): one request is scheduled at a time
//! (`processPending`); a model that is loaded (or loading) is used as it is (`useLoadedRunner`);
//! otherwise it is loaded when fewer than OLLAMA_MAX_LOADED_MODELS are loaded and it fits the
//! memory left (`load` with `requireFull`), or an idle model is evicted first
//! (`findRunnerToUnload`); a busy one is only marked and unloads when its last request ends
//! (`processCompleted`), while the scheduler waits.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use hyper::{HeaderMap, Method, Uri, Version};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::cli::{Config, KeepAlive};
use crate::util;

pub const LOG_CAPACITY: usize = 64;
const NONE: u64 = u64::MAX;

/// Behaviour that can change at run time (`POST /mock/faults`).
pub struct Knobs {
    tokens: AtomicU64,
    token_delay_ms: AtomicU64,
    load_delay_ms: AtomicU64,
    first_token_delay_ms: AtomicU64,
    fail_next: AtomicU64,
    fail_status: AtomicU64,
    close_after_chunks: AtomicU64,
    error_after_chunks: AtomicU64,
    hang: AtomicBool,
}

/// A consistent-enough copy of the knobs for one request.
#[derive(Clone, Copy, Debug)]
pub struct GenParams {
    pub tokens: u64,
    pub token_delay: Duration,
    pub first_token_delay: Duration,
    pub close_after_chunks: Option<u64>,
    pub error_after_chunks: Option<u64>,
}

fn ms(v: f64) -> Duration {
    if v > 0.0 {
        Duration::from_secs_f64(v / 1000.0)
    } else {
        Duration::ZERO
    }
}

fn opt(v: u64) -> Option<u64> {
    (v != NONE).then_some(v)
}

impl Knobs {
    fn new(c: &Config) -> Self {
        let k = Knobs {
            tokens: AtomicU64::new(0),
            token_delay_ms: AtomicU64::new(0),
            load_delay_ms: AtomicU64::new(0),
            first_token_delay_ms: AtomicU64::new(0),
            fail_next: AtomicU64::new(0),
            fail_status: AtomicU64::new(503),
            close_after_chunks: AtomicU64::new(NONE),
            error_after_chunks: AtomicU64::new(NONE),
            hang: AtomicBool::new(false),
        };
        k.reset_to(c);
        k
    }

    pub fn reset_to(&self, c: &Config) {
        self.tokens.store(c.tokens, Relaxed);
        self.set_token_delay_ms(c.token_delay_ms);
        self.set_load_delay_ms(c.load_delay_ms);
        self.set_first_token_delay_ms(c.first_token_delay_ms);
        let (n, st) = c.fail_first.unwrap_or((0, 503));
        self.fail_next.store(n, Relaxed);
        self.fail_status.store(st as u64, Relaxed);
        self.close_after_chunks
            .store(c.close_after_chunks.unwrap_or(NONE), Relaxed);
        self.error_after_chunks
            .store(c.error_after_chunks.unwrap_or(NONE), Relaxed);
        self.hang.store(c.hang, Relaxed);
    }

    pub fn gen_params(&self) -> GenParams {
        GenParams {
            tokens: self.tokens.load(Relaxed),
            token_delay: ms(f64::from_bits(self.token_delay_ms.load(Relaxed))),
            first_token_delay: ms(f64::from_bits(self.first_token_delay_ms.load(Relaxed))),
            close_after_chunks: opt(self.close_after_chunks.load(Relaxed)),
            error_after_chunks: opt(self.error_after_chunks.load(Relaxed)),
        }
    }

    pub fn load_delay(&self) -> Duration {
        ms(f64::from_bits(self.load_delay_ms.load(Relaxed)))
    }

    pub fn token_delay(&self) -> Duration {
        ms(f64::from_bits(self.token_delay_ms.load(Relaxed)))
    }

    pub fn hang(&self) -> bool {
        self.hang.load(Relaxed)
    }

    /// Consume one injected failure, if any: the status to answer with.
    pub fn take_failure(&self) -> Option<u16> {
        self.fail_next
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .ok()
            .map(|_| self.fail_status.load(Relaxed) as u16)
    }

    pub fn set_tokens(&self, n: u64) {
        self.tokens.store(n, Relaxed);
    }
    pub fn set_token_delay_ms(&self, v: f64) {
        self.token_delay_ms.store(v.max(0.0).to_bits(), Relaxed);
    }
    pub fn set_load_delay_ms(&self, v: f64) {
        self.load_delay_ms.store(v.max(0.0).to_bits(), Relaxed);
    }
    pub fn set_first_token_delay_ms(&self, v: f64) {
        self.first_token_delay_ms
            .store(v.max(0.0).to_bits(), Relaxed);
    }
    pub fn set_fail(&self, n: Option<u64>, status: Option<u16>) {
        if let Some(s) = status {
            self.fail_status.store(s as u64, Relaxed);
        }
        if let Some(n) = n {
            self.fail_next.store(n, Relaxed);
        }
    }
    pub fn set_close_after_chunks(&self, v: Option<u64>) {
        self.close_after_chunks.store(v.unwrap_or(NONE), Relaxed);
    }
    pub fn set_error_after_chunks(&self, v: Option<u64>) {
        self.error_after_chunks.store(v.unwrap_or(NONE), Relaxed);
    }
    pub fn set_hang(&self, v: bool) {
        self.hang.store(v, Relaxed);
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "tokens": self.tokens.load(Relaxed),
            "token_delay_ms": f64::from_bits(self.token_delay_ms.load(Relaxed)),
            "first_token_delay_ms": f64::from_bits(self.first_token_delay_ms.load(Relaxed)),
            "load_delay_ms": f64::from_bits(self.load_delay_ms.load(Relaxed)),
            "fail_next": self.fail_next.load(Relaxed),
            "status": self.fail_status.load(Relaxed),
            "close_after_chunks": opt(self.close_after_chunks.load(Relaxed)),
            "error_after_chunks": opt(self.error_after_chunks.load(Relaxed)),
            "hang": self.hang.load(Relaxed),
        })
    }
}

/// Counters exposed at `/mock/stats`.
#[derive(Default)]
pub struct Stats {
    pub total_requests: AtomicU64,
    /// Requests not made by the sidecar itself (its health checks and polls send a
    /// `User-Agent` starting with `ollama-sidecar`), so tests can count what clients sent.
    pub client_requests: AtomicU64,
    by_path: Mutex<HashMap<String, PathCount>>,
    pub in_flight: AtomicUsize,
    pub peak_in_flight: AtomicUsize,
    peak_by_model: Mutex<HashMap<String, usize>>,
    pub queued: AtomicUsize,
    pub peak_queued: AtomicUsize,
    pub queue_rejections: AtomicU64,
    pub queue_cancels: AtomicU64,
    pub disconnects: AtomicU64,
    pub aborted_streams: AtomicU64,
    pub error_streams: AtomicU64,
    pub completed_streams: AtomicU64,
    pub completed_inference: AtomicU64,
    pub injected_failures: AtomicU64,
    pub hanging: AtomicUsize,
    /// Models loaded because a request needed them and they were not loaded.
    pub cold_loads: AtomicU64,
    /// Loaded models unloaded to make room for another.
    pub evictions: AtomicU64,
}

#[derive(Default)]
struct PathCount {
    total: u64,
    by_method: Vec<(Method, u64)>,
}

impl Stats {
    /// Count one arriving request (allocates only the first time a path is seen).
    pub fn count(&self, method: &Method, path: &str, user_agent: Option<&[u8]>) {
        self.total_requests.fetch_add(1, Relaxed);
        if !user_agent.is_some_and(|ua| ua.starts_with(b"ollama-sidecar")) {
            self.client_requests.fetch_add(1, Relaxed);
        }
        let mut map = self.by_path.lock().unwrap();
        let entry = match map.get_mut(path) {
            Some(e) => e,
            None => map.entry(path.to_string()).or_default(),
        };
        entry.total += 1;
        match entry.by_method.iter_mut().find(|(m, _)| m == method) {
            Some((_, n)) => *n += 1,
            None => entry.by_method.push((method.clone(), 1)),
        }
    }

    fn note_model_peak(&self, model: &str, n: usize) {
        let mut map = self.peak_by_model.lock().unwrap();
        match map.get_mut(model) {
            Some(v) => *v = (*v).max(n),
            None => {
                map.insert(model.to_string(), n);
            }
        }
    }

    pub fn reset(&self) {
        self.total_requests.store(0, Relaxed);
        self.client_requests.store(0, Relaxed);
        self.by_path.lock().unwrap().clear();
        self.peak_in_flight
            .store(self.in_flight.load(Relaxed), Relaxed);
        self.peak_by_model.lock().unwrap().clear();
        self.peak_queued.store(self.queued.load(Relaxed), Relaxed);
        for c in [
            &self.queue_rejections,
            &self.queue_cancels,
            &self.disconnects,
            &self.aborted_streams,
            &self.error_streams,
            &self.completed_streams,
            &self.completed_inference,
            &self.injected_failures,
            &self.cold_loads,
            &self.evictions,
        ] {
            c.store(0, Relaxed);
        }
    }

    pub fn requests_json(&self) -> (serde_json::Value, serde_json::Value) {
        let map = self.by_path.lock().unwrap();
        let mut by_path = serde_json::Map::new();
        let mut by_mp = serde_json::Map::new();
        let mut keys: Vec<&String> = map.keys().collect();
        keys.sort();
        for k in keys {
            let e = &map[k];
            by_path.insert(k.clone(), e.total.into());
            for (m, n) in &e.by_method {
                by_mp.insert(format!("{m} {k}"), (*n).into());
            }
        }
        (by_path.into(), by_mp.into())
    }

    pub fn peak_by_model_json(&self) -> serde_json::Value {
        let map = self.peak_by_model.lock().unwrap();
        map.iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(*v)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

/// Static description of an installed model.
pub struct Model {
    /// Display name, e.g. `llama3.2:latest` (library namespace omitted).
    pub name: String,
    base: String,
    tag: String,
    pub family: String,
    pub parameter_size: String,
    pub quantization: String,
    pub size: u64,
    pub digest: String,
    pub modified_at: SystemTime,
    pub embedding_only: bool,
    pub embedding_length: usize,
    pub context_length: u64,
    pub block_count: u64,
    pub parameter_count: u64,
    pub rt: ModelRuntime,
}

/// Runtime state of a model: slots, load state.
pub struct ModelRuntime {
    sem: Arc<Semaphore>,
    in_flight: AtomicUsize,
    load: Mutex<LoadState>,
}

/// A model's runner as sched.go's `runnerRef` tracks it.
struct LoadState {
    /// In the scheduler's `loaded` map: loading or running.
    loaded: bool,
    /// When the load finishes (requests wait until then, like `WaitUntilRunning`).
    ready_at: Option<tokio::time::Instant>,
    /// Requests holding the runner (`refCount`): scheduled and not finished.
    refs: usize,
    expires_at: Option<SystemTime>,
    session: KeepAlive,
    /// Chosen to make room (`sessionDuration = 0`): unloads as soon as it is idle.
    evicting: bool,
}

/// Split a model reference into (base, tag), dropping the default registry and namespace.
fn split_name(s: &str) -> (&str, &str) {
    let mut s = s.trim();
    // `get` rather than slicing: a name decoded from a path may hold multi-byte characters.
    if s.len() > 19
        && s.get(..19)
            .is_some_and(|p| p.eq_ignore_ascii_case("registry.ollama.ai/"))
    {
        s = &s[19..];
    }
    if s.len() > 8
        && s.get(..8)
            .is_some_and(|p| p.eq_ignore_ascii_case("library/"))
    {
        s = &s[8..];
    }
    let last_slash = s.rfind('/').map_or(0, |i| i + 1);
    match s[last_slash..].rfind(':') {
        Some(i) => (&s[..last_slash + i], &s[last_slash + i + 1..]),
        None => (s, "latest"),
    }
}

/// Ollama's rule of thumb for a valid model name.
pub fn valid_name(s: &str) -> bool {
    let (base, tag) = split_name(s);
    let ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            && p.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
    };
    !base.is_empty() && base.split('/').all(ok) && ok(tag)
}

pub fn canonical_name(s: &str) -> String {
    let (base, tag) = split_name(s);
    format!("{base}:{tag}")
}

struct Family {
    family: &'static str,
    parameter_size: &'static str,
    quantization: &'static str,
    size: u64,
    embedding_only: bool,
    embedding_length: usize,
    context_length: u64,
    block_count: u64,
    parameter_count: u64,
}

fn family_for(base: &str) -> Family {
    let b = base.to_ascii_lowercase();
    if b.contains("embed") || b.contains("minilm") || b.contains("bge") {
        Family {
            family: "nomic-bert",
            parameter_size: "137M",
            quantization: "F16",
            size: 274_302_450,
            embedding_only: true,
            embedding_length: 768,
            context_length: 2048,
            block_count: 12,
            parameter_count: 136_727_040,
        }
    } else if b.starts_with("qwen") {
        Family {
            family: "qwen2",
            parameter_size: "494.03M",
            quantization: "Q4_K_M",
            size: 397_821_319,
            embedding_only: false,
            embedding_length: 896,
            context_length: 32_768,
            block_count: 24,
            parameter_count: 494_032_768,
        }
    } else {
        Family {
            family: "llama",
            parameter_size: "3.2B",
            quantization: "Q4_K_M",
            size: 2_019_393_189,
            embedding_only: false,
            embedding_length: 3072,
            context_length: 131_072,
            block_count: 28,
            parameter_count: 3_212_749_888,
        }
    }
}

impl Model {
    pub fn new(name: &str, modified_at: SystemTime, num_parallel: usize) -> Model {
        Model::sized(name, None, modified_at, num_parallel)
    }

    /// A model whose size is given (`MOCK_MODELS=name=SIZE`) instead of its family's.
    pub fn sized(
        name: &str,
        size: Option<u64>,
        modified_at: SystemTime,
        num_parallel: usize,
    ) -> Model {
        let (base, tag) = split_name(name);
        let f = family_for(base);
        let display = format!("{base}:{tag}");
        let digest = util::sha256_hex(display.as_bytes());
        Model {
            base: base.to_string(),
            tag: tag.to_string(),
            name: display,
            family: f.family.to_string(),
            parameter_size: f.parameter_size.to_string(),
            quantization: f.quantization.to_string(),
            size: size.unwrap_or(f.size),
            digest,
            modified_at,
            embedding_only: f.embedding_only,
            embedding_length: f.embedding_length,
            context_length: f.context_length,
            block_count: f.block_count,
            parameter_count: f.parameter_count,
            rt: ModelRuntime {
                // sched.go `load`: a model without the completion capability (an embedding
                // model) is loaded with one parallel slot, whatever OLLAMA_NUM_PARALLEL says.
                sem: Arc::new(Semaphore::new(if f.embedding_only {
                    1
                } else {
                    num_parallel.max(1)
                })),
                in_flight: AtomicUsize::new(0),
                load: Mutex::new(LoadState {
                    loaded: false,
                    ready_at: None,
                    refs: 0,
                    expires_at: None,
                    session: KeepAlive::For(Duration::from_secs(300)),
                    evicting: false,
                }),
            },
        }
    }

    /// A copy under another name (copy, create FROM), with fresh runtime state.
    pub fn renamed(&self, name: &str, modified_at: SystemTime, num_parallel: usize) -> Model {
        let mut m = Model::new(name, modified_at, num_parallel);
        m.family = self.family.clone();
        m.parameter_size = self.parameter_size.clone();
        m.quantization = self.quantization.clone();
        m.size = self.size;
        m.embedding_only = self.embedding_only;
        m.embedding_length = self.embedding_length;
        m.context_length = self.context_length;
        m.block_count = self.block_count;
        m.parameter_count = self.parameter_count;
        m
    }

    pub fn matches(&self, req: &str) -> bool {
        let (b, t) = split_name(req);
        b.eq_ignore_ascii_case(&self.base) && t.eq_ignore_ascii_case(&self.tag)
    }

    pub fn capabilities(&self) -> &'static [&'static str] {
        if self.embedding_only {
            &["embedding"]
        } else {
            &["completion", "tools"]
        }
    }

    /// Loaded right now (expiring an idle model whose keep-alive has passed).
    pub fn loaded_until(&self) -> Option<SystemTime> {
        let mut st = self.rt.load.lock().unwrap();
        expire(&mut st);
        if !st.loaded {
            return None;
        }
        Some(if st.refs > 0 {
            expiry(SystemTime::now(), st.session)
        } else {
            st.expires_at
                .unwrap_or_else(|| expiry(SystemTime::now(), st.session))
        })
    }

    /// `keep_alive: 0` with an empty prompt: unload now, or when the last user is done.
    pub fn unload(&self) {
        let mut st = self.rt.load.lock().unwrap();
        st.session = KeepAlive::For(Duration::ZERO);
        if st.refs == 0 {
            unload_now(&mut st);
        }
    }

    /// Memory the loaded model takes (what `/api/ps` reports as `size`: weights plus cache).
    pub fn footprint(&self) -> u64 {
        self.size + self.size / 5
    }

    fn is_loaded(&self) -> bool {
        let mut st = self.rt.load.lock().unwrap();
        expire(&mut st);
        st.loaded
    }

    /// sched.go `useLoadedRunner`: take a reference on the loaded (or loading) runner, which
    /// also cancels an eviction mark; `None` when the model is not loaded. Returns when the
    /// load finishes.
    fn use_loaded(&self, ka: Option<KeepAlive>) -> Option<Option<tokio::time::Instant>> {
        let mut st = self.rt.load.lock().unwrap();
        expire(&mut st);
        if !st.loaded {
            return None;
        }
        st.refs += 1;
        // Only a request that names a keep-alive changes the runner's session.
        if let Some(ka) = ka {
            st.session = ka;
        }
        st.evicting = false;
        st.expires_at = None;
        Some(st.ready_at)
    }

    /// sched.go `load`: the runner is in the loaded set from now on and ready at `ready_at`;
    /// the request that caused the load holds it.
    fn start_load(&self, ka: KeepAlive, ready_at: tokio::time::Instant) {
        let mut st = self.rt.load.lock().unwrap();
        st.loaded = true;
        st.ready_at = Some(ready_at);
        st.refs += 1;
        st.session = ka;
        st.evicting = false;
        st.expires_at = None;
    }

    /// Idle and loaded, for `findRunnerToUnload`: (idle, session duration in Go's uint64 order).
    fn unload_rank(&self) -> (bool, u64) {
        let st = self.rt.load.lock().unwrap();
        let duration = match st.session {
            KeepAlive::For(d) => u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            // A negative Go duration converted to uint64 sorts last.
            KeepAlive::Forever => u64::MAX,
        };
        (st.refs == 0, duration)
    }

    /// Marks the model for eviction (`sessionDuration = 0`); true when it was idle and is
    /// unloaded now, false when it unloads at the end of its last request.
    fn evict(&self) -> bool {
        let mut st = self.rt.load.lock().unwrap();
        if !st.loaded {
            return false;
        }
        if st.refs == 0 {
            unload_now(&mut st);
            return true;
        }
        st.evicting = true;
        false
    }

    /// sched.go `processCompleted`: a finished request drops its reference; the last one starts
    /// the timer of the runner's session (the keep-alive the latest request that named one set,
    /// else the load's), or unloads at once (a zero session, or marked for eviction). True when
    /// this was an eviction.
    fn end_use(&self) -> bool {
        let mut st = self.rt.load.lock().unwrap();
        st.refs = st.refs.saturating_sub(1);
        if st.refs > 0 {
            return false;
        }
        if st.evicting {
            unload_now(&mut st);
            return true;
        }
        if st.session == KeepAlive::For(Duration::ZERO) {
            unload_now(&mut st);
        } else {
            st.expires_at = Some(expiry(SystemTime::now(), st.session));
        }
        false
    }
}

fn unload_now(st: &mut LoadState) {
    st.loaded = false;
    st.ready_at = None;
    st.expires_at = None;
    st.evicting = false;
}

fn expire(st: &mut LoadState) {
    if st.loaded && st.refs == 0 {
        if let Some(at) = st.expires_at {
            if at <= SystemTime::now() {
                unload_now(st);
            }
        }
    }
}

/// sched.go `findRunnerToUnload`: sorted by session duration, then name (`ByDurationAndName`),
/// the first idle model, else the first (the scheduler then waits for it to go idle).
fn runner_to_unload(loaded: &[Arc<Model>]) -> Option<&Arc<Model>> {
    let mut ranked: Vec<(bool, u64, &Arc<Model>)> = loaded
        .iter()
        .map(|m| {
            let (idle, duration) = m.unload_rank();
            (idle, duration, m)
        })
        .collect();
    ranked.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.2.name.cmp(&b.2.name)));
    ranked
        .iter()
        .find(|(idle, _, _)| *idle)
        .or(ranked.first())
        .map(|(_, _, m)| *m)
}

fn expiry(now: SystemTime, ka: KeepAlive) -> SystemTime {
    match ka {
        KeepAlive::For(d) => now + d,
        // Go: now + MaxInt64 nanoseconds (about 292 years).
        KeepAlive::Forever => now + Duration::from_nanos(i64::MAX as u64),
    }
}

/// One request as seen by the mock, for `/mock/requests`.
pub struct LogEntry {
    pub seq: u64,
    pub at: SystemTime,
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body_len: Option<u64>,
    pub body_sha256: Option<String>,
    /// `URL.Path` as Go decoded it; None when Go rejects the target.
    pub decoded_path: Option<String>,
    /// The gin pattern whose handler ran.
    pub route: Option<&'static str>,
    /// handled, bind_error, not_found, method_not_allowed, redirect, bad_request,
    /// forbidden (CORS or Host check), preflight (CORS preflight answered).
    pub outcome: &'static str,
    /// The model the handler acts on, as bound (/api/copy: the source).
    pub model: Option<String>,
    /// /api/copy's destination, as bound.
    pub destination: Option<String>,
}

pub struct State {
    pub cfg: Config,
    pub addr: SocketAddr,
    pub started: SystemTime,
    pub hostname: String,
    pub knobs: Knobs,
    pub stats: Stats,
    pub models: RwLock<Vec<Arc<Model>>>,
    pub blobs: Mutex<HashSet<String>>,
    pub log: Mutex<VecDeque<LogEntry>>,
    pub log_seq: AtomicU64,
    pub arrivals: AtomicU64,
    /// sched.go `processPending` takes one pending request at a time; this is its turn.
    sched: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
pub struct Busy;

impl State {
    pub fn new(cfg: Config, addr: SocketAddr) -> State {
        let started = SystemTime::now();
        let n = cfg.models.len() as u64;
        let models = cfg
            .models
            .iter()
            .enumerate()
            // The first listed is the most recently modified, as /api/tags sorts.
            .map(|(i, (name, size))| {
                Arc::new(Model::sized(
                    name,
                    *size,
                    started - Duration::from_secs(3600 * (i as u64 + 1) + n),
                    cfg.num_parallel,
                ))
            })
            .collect();
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_ascii_lowercase())
            .unwrap_or_default();
        State {
            knobs: Knobs::new(&cfg),
            cfg,
            addr,
            started,
            hostname,
            stats: Stats::default(),
            models: RwLock::new(models),
            blobs: Mutex::new(HashSet::new()),
            log: Mutex::new(VecDeque::with_capacity(LOG_CAPACITY)),
            log_seq: AtomicU64::new(0),
            arrivals: AtomicU64::new(0),
            sched: tokio::sync::Mutex::new(()),
        }
    }

    pub fn find_model(&self, name: &str) -> Option<Arc<Model>> {
        self.models
            .read()
            .unwrap()
            .iter()
            .find(|m| m.matches(name))
            .cloned()
    }

    /// Install (or replace) a model under `name`; `from` copies its details.
    pub fn install(&self, name: &str, from: Option<&Model>) {
        let now = SystemTime::now();
        let m = match from {
            Some(src) => src.renamed(name, now, self.cfg.num_parallel),
            None => Model::new(name, now, self.cfg.num_parallel),
        };
        let mut models = self.models.write().unwrap();
        if let Some(i) = models.iter().position(|x| x.matches(name)) {
            models.remove(i);
        }
        models.insert(0, Arc::new(m));
    }

    pub fn remove_model(&self, name: &str) -> bool {
        let mut models = self.models.write().unwrap();
        match models.iter().position(|x| x.matches(name)) {
            Some(i) => {
                models.remove(i);
                true
            }
            None => false,
        }
    }

    pub fn record(&self, mut e: LogEntry) {
        e.seq = self.log_seq.fetch_add(1, Relaxed) + 1;
        let mut log = self.log.lock().unwrap();
        if log.len() >= LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(e);
    }

    /// Ollama's answer to a model that could not fit even with nothing else loaded: the runner's
    /// load fails with `llm.ErrLoadRequiredFull` ("unable to load full model on GPU",
    /// llm/server.go), which server/sched.go `load` passes back on the request's `errCh` when no
    /// other model is loaded (`requireFull` false), and server/routes.go `handleScheduleError`
    /// answers any such scheduling error with a 500. A per-request error: the server itself is
    /// healthy and serves other models.
    pub fn too_large(&self, model: &Model) -> Option<String> {
        let budget = self.cfg.memory?;
        (model.footprint() > budget).then(|| "unable to load full model on GPU".to_string())
    }

    /// Schedule the request on the model's runner (loading it, evicting others if needed),
    /// wait for the load, then for one of the model's slots. Waiting for the scheduler or a
    /// slot counts against OLLAMA_MAX_QUEUE.
    pub async fn schedule(
        self: &Arc<Self>,
        model: &Arc<Model>,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Slot, Busy> {
        // Tokio's clock, so tests can run the scheduler on paused time.
        let t0 = tokio::time::Instant::now();
        let mut queued = None;
        let turn = match self.sched.try_lock() {
            Ok(turn) => turn,
            Err(_) => {
                queued = Some(self.enqueue()?);
                self.sched.lock().await
            }
        };
        let ready_at = self.place(model, keep_alive).await;
        drop(turn);
        // From here the request holds a reference on the runner, released by `ModelUse`.
        let user = ModelUse {
            state: self.clone(),
            model: model.clone(),
        };
        if let Some(at) = ready_at {
            tokio::time::sleep_until(at).await;
        }
        // routes.go measures load_duration around scheduleRunner: scheduling plus loading.
        let load_duration = t0.elapsed();
        let permit = match model.rt.sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if queued.is_none() {
                    queued = Some(self.enqueue()?);
                }
                model
                    .rt
                    .sem
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("slots are never closed")
            }
        };
        if let Some(mut q) = queued {
            q.done = true;
        }
        let n = self.stats.in_flight.fetch_add(1, Relaxed) + 1;
        self.stats.peak_in_flight.fetch_max(n, Relaxed);
        let m = model.rt.in_flight.fetch_add(1, Relaxed) + 1;
        self.stats.note_model_peak(&model.name, m);
        Ok(Slot {
            state: self.clone(),
            model: model.clone(),
            _permit: permit,
            load_duration,
            finished: false,
            aborted: false,
            _user: user,
        })
    }

    fn enqueue(&self) -> Result<QueueGuard<'_>, Busy> {
        let before = self.stats.queued.fetch_add(1, Relaxed);
        if before >= self.cfg.max_queue {
            self.stats.queued.fetch_sub(1, Relaxed);
            self.stats.queue_rejections.fetch_add(1, Relaxed);
            return Err(Busy);
        }
        self.stats.peak_queued.fetch_max(before + 1, Relaxed);
        Ok(QueueGuard {
            state: self,
            done: false,
        })
    }

    /// How long loading the model takes: a fixed delay plus a time per GB of its size.
    fn load_time(&self, model: &Model) -> Duration {
        let per_gb = self.cfg.load_ms_per_gb * model.size as f64 / 1e9;
        self.knobs.load_delay() + ms(per_gb)
    }

    /// sched.go `processPending` for one request (the caller holds the scheduler's turn): use
    /// the loaded runner, or load the model when fewer than OLLAMA_MAX_LOADED_MODELS are loaded
    /// and it fits the memory left (the first model always loads), else evict one and retry.
    /// Takes a reference on the model's runner before returning, with no await in between, and
    /// returns when its load finishes.
    async fn place(
        &self,
        model: &Arc<Model>,
        ka: Option<KeepAlive>,
    ) -> Option<tokio::time::Instant> {
        loop {
            if let Some(ready_at) = model.use_loaded(ka) {
                return ready_at;
            }
            let others: Vec<Arc<Model>> = self
                .models
                .read()
                .unwrap()
                .iter()
                .filter(|m| !Arc::ptr_eq(m, model) && m.is_loaded())
                .cloned()
                .collect();
            let full = others.len() >= self.cfg.max_loaded_models;
            let used: u64 = others.iter().map(|m| m.footprint()).sum();
            let fits = others.is_empty()
                || self
                    .cfg
                    .memory
                    .is_none_or(|budget| used.saturating_add(model.footprint()) <= budget);
            if !full && fits {
                let ready_at = tokio::time::Instant::now() + self.load_time(model);
                // sched.go `load`: a request without a keep-alive loads for OLLAMA_KEEP_ALIVE.
                model.start_load(ka.unwrap_or(self.cfg.keep_alive), ready_at);
                self.stats.cold_loads.fetch_add(1, Relaxed);
                return Some(ready_at);
            }
            let Some(victim) = runner_to_unload(&others) else {
                continue;
            };
            if victim.evict() {
                self.stats.evictions.fetch_add(1, Relaxed);
            }
            // Wait for the unload (sched.go waits on unloadedCh; expired runners that are still
            // busy are retried every 10 ms in processCompleted).
            while victim.is_loaded() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// A request's reference on its model's runner: dropping it is sched.go's finished event.
struct ModelUse {
    state: Arc<State>,
    model: Arc<Model>,
}

impl Drop for ModelUse {
    fn drop(&mut self) {
        if self.model.end_use() {
            self.state.stats.evictions.fetch_add(1, Relaxed);
        }
    }
}

struct QueueGuard<'a> {
    state: &'a State,
    done: bool,
}

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        self.state.stats.queued.fetch_sub(1, Relaxed);
        if !self.done {
            self.state.stats.queue_cancels.fetch_add(1, Relaxed);
        }
    }
}

/// A held inference slot. Dropping it before `finish` counts a client disconnect.
pub struct Slot {
    state: Arc<State>,
    pub model: Arc<Model>,
    _permit: OwnedSemaphorePermit,
    pub load_duration: Duration,
    finished: bool,
    aborted: bool,
    /// Dropped after the slot's own bookkeeping: the runner's reference goes last.
    _user: ModelUse,
}

impl Slot {
    /// The response was produced in full.
    pub fn finish(mut self, streamed: bool) {
        self.finished = true;
        self.state.stats.completed_inference.fetch_add(1, Relaxed);
        if streamed {
            self.state.stats.completed_streams.fetch_add(1, Relaxed);
        }
    }

    /// The mock itself cut the stream (fault injection): not a client disconnect.
    pub fn abort(mut self, in_band_error: bool) {
        self.finished = true;
        self.aborted = true;
        let c = if in_band_error {
            &self.state.stats.error_streams
        } else {
            &self.state.stats.aborted_streams
        };
        c.fetch_add(1, Relaxed);
    }

    /// Finish without counting anything (load/unload answers).
    pub fn release(mut self) {
        self.finished = true;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.state.stats.in_flight.fetch_sub(1, Relaxed);
        self.model.rt.in_flight.fetch_sub(1, Relaxed);
        if !self.finished {
            self.state.stats.disconnects.fetch_add(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn state(args: &[&str]) -> Arc<State> {
        let mut argv = vec!["mock-ollama"];
        argv.extend_from_slice(args);
        let cfg = Config::from_args(crate::cli::Args::parse_from(argv)).unwrap();
        Arc::new(State::new(cfg, "127.0.0.1:0".parse().unwrap()))
    }

    fn loaded(state: &State) -> Vec<String> {
        let mut names: Vec<String> = state
            .models
            .read()
            .unwrap()
            .iter()
            .filter(|m| m.is_loaded())
            .map(|m| m.name.clone())
            .collect();
        names.sort();
        names
    }

    fn model(state: &State, name: &str) -> Arc<Model> {
        state.find_model(name).unwrap()
    }

    const KA: Option<KeepAlive> = Some(KeepAlive::For(Duration::from_secs(300)));

    #[tokio::test]
    async fn memory_budget_evicts_an_idle_model_and_two_small_fit_where_one_large_does() {
        let st = state(&[
            "--models",
            "big=2GB,small-a=1GB,small-b=1GB",
            "--memory",
            "2.4GB",
        ]);
        // The big model (2.4 GB footprint) fills the budget; both small ones (1.2 GB each) fit
        // together, and loading the first of them evicts the idle big one.
        drop(st.schedule(&model(&st, "big"), KA).await.unwrap());
        assert_eq!(loaded(&st), ["big:latest"]);
        drop(st.schedule(&model(&st, "small-a"), KA).await.unwrap());
        drop(st.schedule(&model(&st, "small-b"), KA).await.unwrap());
        assert_eq!(loaded(&st), ["small-a:latest", "small-b:latest"]);
        assert_eq!(st.stats.cold_loads.load(Relaxed), 3);
        assert_eq!(st.stats.evictions.load(Relaxed), 1);
        // Warm: no load, no eviction.
        drop(st.schedule(&model(&st, "small-a"), KA).await.unwrap());
        assert_eq!(st.stats.cold_loads.load(Relaxed), 3);
    }

    #[tokio::test]
    async fn max_loaded_models_evicts_in_sched_go_order() {
        let st = state(&["--models", "a,b,c", "--max-loaded-models", "2"]);
        drop(st.schedule(&model(&st, "b"), KA).await.unwrap());
        drop(st.schedule(&model(&st, "a"), KA).await.unwrap());
        // Equal keep-alive: ByDurationAndName picks `a` although `b` was used longer ago.
        drop(st.schedule(&model(&st, "c"), KA).await.unwrap());
        assert_eq!(loaded(&st), ["b:latest", "c:latest"]);
        // A shorter keep-alive sorts first.
        drop(
            st.schedule(
                &model(&st, "c"),
                Some(KeepAlive::For(Duration::from_secs(1))),
            )
            .await
            .unwrap(),
        );
        drop(st.schedule(&model(&st, "a"), KA).await.unwrap());
        assert_eq!(loaded(&st), ["a:latest", "b:latest"]);
        assert_eq!(st.stats.evictions.load(Relaxed), 2);
    }

    /// sched.go `load` gives a model without completion (an embedding model) one slot.
    #[tokio::test]
    async fn an_embedding_model_runs_one_request_at_a_time() {
        let st = state(&["--models", "nomic-embed-text,x", "--num-parallel", "2"]);
        let x = model(&st, "x");
        let (_a, _b) = (
            st.schedule(&x, KA).await.unwrap(),
            st.schedule(&x, KA).await.unwrap(),
        );
        let e = model(&st, "nomic-embed-text");
        let _first = st.schedule(&e, KA).await.unwrap();
        let second = tokio::time::timeout(Duration::from_millis(50), st.schedule(&e, KA)).await;
        assert!(second.is_err(), "a second slot for the embedding model");
    }

    /// sched.go `useLoadedRunner` replaces the runner's session only with a request's non-nil
    /// keep-alive, and `processCompleted` times the runner's session, not the request's: a
    /// request without `keep_alive` leaves a pin (`-1`) in place, one with `keep_alive: 0`
    /// unloads the model when it ends.
    #[tokio::test]
    async fn only_a_request_naming_a_keep_alive_changes_the_session() {
        let st = state(&["--models", "a,b", "--keep-alive", "1s"]);
        let a = model(&st, "a");
        drop(st.schedule(&a, Some(KeepAlive::Forever)).await.unwrap());
        drop(st.schedule(&a, None).await.unwrap());
        let far = SystemTime::now() + Duration::from_secs(86_400 * 365);
        assert!(a.loaded_until().is_some_and(|t| t > far), "still pinned");
        // A load without a keep-alive takes the server's default (here 1 s).
        let b = model(&st, "b");
        drop(st.schedule(&b, None).await.unwrap());
        let soon = SystemTime::now() + Duration::from_secs(2);
        assert!(b.loaded_until().is_some_and(|t| t < soon));
        drop(
            st.schedule(&a, Some(KeepAlive::For(Duration::ZERO)))
                .await
                .unwrap(),
        );
        assert_eq!(loaded(&st), ["b:latest"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_model_is_not_evicted_the_request_waits_for_it() {
        let st = state(&[
            "--models",
            "a=1GB,b=1GB",
            "--max-loaded-models",
            "1",
            "--load-ms-per-gb",
            "1000",
        ]);
        let busy = st.schedule(&model(&st, "a"), KA).await.unwrap();
        assert_eq!(busy.load_duration, Duration::from_secs(1));
        let waiter = tokio::spawn({
            let st = st.clone();
            let b = model(&st, "b");
            async move { st.schedule(&b, KA).await.map(|slot| slot.load_duration) }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished(), "b must wait while a is busy");
        assert_eq!(loaded(&st), ["a:latest"]);
        assert_eq!(
            st.stats.queued.load(Relaxed),
            0,
            "b holds the scheduler's turn"
        );
        drop(busy);
        let waited = waiter.await.unwrap().unwrap();
        // Scheduling (the wait for a to go idle) plus b's own 1 s load.
        assert!(waited >= Duration::from_secs(6), "{waited:?}");
        assert_eq!(loaded(&st), ["b:latest"]);
        assert_eq!(st.stats.evictions.load(Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_for_a_loading_model_wait_for_the_same_load() {
        let st = state(&[
            "--models",
            "a=2GB",
            "--load-ms-per-gb",
            "500",
            "--num-parallel",
            "2",
        ]);
        let a = model(&st, "a");
        let (x, y) = tokio::join!(st.schedule(&a, KA), st.schedule(&a, KA));
        let (x, y) = (x.unwrap(), y.unwrap());
        assert_eq!(x.load_duration, Duration::from_secs(1));
        assert!(y.load_duration >= Duration::from_millis(999));
        assert_eq!(st.stats.cold_loads.load(Relaxed), 1);
    }

    #[test]
    fn names() {
        assert_eq!(split_name("llama3.2"), ("llama3.2", "latest"));
        assert_eq!(split_name("library/llama3.2:1b"), ("llama3.2", "1b"));
        assert_eq!(
            split_name("registry.ollama.ai/library/qwen2.5:0.5b"),
            ("qwen2.5", "0.5b")
        );
        assert_eq!(split_name("host:5000/ns/m"), ("host:5000/ns/m", "latest"));
        assert!(valid_name("llama3.2:latest"));
        assert!(valid_name("me/model"));
        assert!(!valid_name(""));
        assert!(!valid_name("bad name"));
        let m = Model::new("llama3.2", SystemTime::now(), 1);
        assert!(m.matches("LLAMA3.2:latest"));
        assert!(m.matches("llama3.2"));
        assert!(!m.matches("llama3.2:1b"));
    }
}
