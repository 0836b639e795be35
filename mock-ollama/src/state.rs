//! Shared state: behaviour knobs, counters, the installed models and what is loaded,
//! the per-model slots (OLLAMA_NUM_PARALLEL) and the bounded wait queue, the request log.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

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
    load_lock: tokio::sync::Mutex<()>,
    load: Mutex<LoadState>,
}

struct LoadState {
    loaded: bool,
    refs: usize,
    expires_at: Option<SystemTime>,
    session: KeepAlive,
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
            size: f.size,
            digest,
            modified_at,
            embedding_only: f.embedding_only,
            embedding_length: f.embedding_length,
            context_length: f.context_length,
            block_count: f.block_count,
            parameter_count: f.parameter_count,
            rt: ModelRuntime {
                sem: Arc::new(Semaphore::new(num_parallel.max(1))),
                in_flight: AtomicUsize::new(0),
                load_lock: tokio::sync::Mutex::new(()),
                load: Mutex::new(LoadState {
                    loaded: false,
                    refs: 0,
                    expires_at: None,
                    session: KeepAlive::For(Duration::from_secs(300)),
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
            st.loaded = false;
            st.expires_at = None;
        }
    }

    fn begin_use(&self) -> bool {
        let mut st = self.rt.load.lock().unwrap();
        expire(&mut st);
        st.refs += 1;
        st.loaded
    }

    fn end_use(&self, ka: KeepAlive) {
        let mut st = self.rt.load.lock().unwrap();
        st.refs = st.refs.saturating_sub(1);
        st.session = ka;
        if st.refs == 0 {
            if ka == KeepAlive::For(Duration::ZERO) {
                st.loaded = false;
                st.expires_at = None;
            } else {
                st.expires_at = Some(expiry(SystemTime::now(), ka));
            }
        }
    }

    fn mark_loaded(&self) {
        self.rt.load.lock().unwrap().loaded = true;
    }

    fn is_loaded_flag(&self) -> bool {
        self.rt.load.lock().unwrap().loaded
    }
}

fn expire(st: &mut LoadState) {
    if st.loaded && st.refs == 0 {
        if let Some(at) = st.expires_at {
            if at <= SystemTime::now() {
                st.loaded = false;
                st.expires_at = None;
            }
        }
    }
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
            .map(|(i, m)| {
                Arc::new(Model::new(
                    m,
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

    /// Wait for one of the model's slots (bounded queue), then load it if needed.
    pub async fn schedule(
        self: &Arc<Self>,
        model: &Arc<Model>,
        keep_alive: KeepAlive,
    ) -> Result<Slot, Busy> {
        let permit = match model.rt.sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let before = self.stats.queued.fetch_add(1, Relaxed);
                if before >= self.cfg.max_queue {
                    self.stats.queued.fetch_sub(1, Relaxed);
                    self.stats.queue_rejections.fetch_add(1, Relaxed);
                    return Err(Busy);
                }
                self.stats.peak_queued.fetch_max(before + 1, Relaxed);
                let mut guard = QueueGuard {
                    state: self,
                    done: false,
                };
                let p = model
                    .rt
                    .sem
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("slots are never closed");
                guard.done = true;
                p
            }
        };
        let n = self.stats.in_flight.fetch_add(1, Relaxed) + 1;
        self.stats.peak_in_flight.fetch_max(n, Relaxed);
        let m = model.rt.in_flight.fetch_add(1, Relaxed) + 1;
        self.stats.note_model_peak(&model.name, m);
        let was_loaded = model.begin_use();
        let mut slot = Slot {
            state: self.clone(),
            model: model.clone(),
            _permit: permit,
            keep_alive,
            load_duration: Duration::ZERO,
            finished: false,
            aborted: false,
        };
        let t0 = Instant::now();
        if !was_loaded {
            let _l = model.rt.load_lock.lock().await;
            if !model.is_loaded_flag() {
                let d = self.knobs.load_delay();
                if !d.is_zero() {
                    tokio::time::sleep(d).await;
                }
                model.mark_loaded();
            }
        }
        slot.load_duration = t0.elapsed();
        Ok(slot)
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
    keep_alive: KeepAlive,
    pub load_duration: Duration,
    finished: bool,
    aborted: bool,
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
        self.model.end_use(self.keep_alive);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
