//! Prometheus metrics: one registry per process, served by the admin listener's `/metrics`.
//!
//! - **Request metrics** are recorded once per client request, in the proxy's `logging()` hook,
//!   from what the request learned ([`RequestRecord`]): counts by route class, route, model and
//!   status class; latency histograms (duration, queue wait, first byte, first token); tokens
//!   from the stream tap; rejections and cancellations.
//! - **State metrics** (queue, slots, instances) mirror state that lives elsewhere; they are
//!   refreshed from the admission snapshot and the registry on each scrape ([`Metrics::render`]).
//! - **Events recorded elsewhere**: [`Metrics::retry`] (the retry path) and
//!   [`Metrics::health_check`] (active health checks).
//! - **The inference gateway's gauges** ([`GATEWAY_PATH`]): the three gauges the Gateway API
//!   Inference Extension's endpoint picker scrapes from each model server (queued, running, cache
//!   utilization), also served alone so that a 50 ms scrape costs little ([`Metrics::render_gateway`]).
//!
//! Labels are bounded: route names come from the route table (`other` for the rest), status is a
//! class (`2xx`), instance names come from the configuration, and a `model` label takes only names
//! some instance lists in `/api/tags` (polled by [`poll_known_models`]), anything else is `other`,
//! so a flood of made-up model names adds no series.
//!
//! The registry is process-wide ([`global`]), like the `prometheus` crate's default registry: any
//! module can record an event without plumbing, and a process has one `/metrics`.

use crate::admission::{AdmissionSnapshot, SlotUse, WaiterView};
use crate::app::App;
use crate::proxy::tap::TapSummary;
use crate::upstream::{model_key, InstanceState, Registry};
use prometheus::{
    Counter, CounterVec, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, TextEncoder,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// Every metric name starts with this.
pub const PREFIX: &str = "ollama_sidecar";

/// The `phase` label of `ollama_sidecar_cancellations_total`: where the client left.
pub const CANCEL_PHASES: &[&str] = &["queued", "waiting", "streaming"];

/// The `model` label of a request whose model is not one an instance lists.
pub const OTHER_MODEL: &str = "other";
/// The `model` label of a request that names no model.
pub const NO_MODEL: &str = "none";

/// Most model names kept in the allow-list (a bound on the `model` label's values).
pub const MAX_KNOWN_MODELS: usize = 500;

/// How often `/api/tags` is read for the model allow-list; sooner while no instance answered.
pub const MODELS_INTERVAL: Duration = Duration::from_secs(30);
const MODELS_RETRY: Duration = Duration::from_secs(1);

/// Latency buckets for LLM work: 1 ms to 10 min.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];
/// Generation speed buckets, in tokens per second.
pub const TOKENS_PER_SECOND_BUCKETS: &[f64] = &[
    1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0,
    1000.0, 2500.0,
];

/// The admin path that serves only the gateway gauges.
pub const GATEWAY_PATH: &str = "/metrics/gateway";

/// The Model Server Protocol's gauges (kubernetes-sigs/gateway-api-inference-extension,
/// `docs/proposals/003-model-server-protocol/README.md`) under the names this sidecar gives them;
/// the endpoint picker is told these names in its `engineConfigs`
/// (`docker/kubernetes/inference-pool/endpoint-picker.yaml`).
///
/// TotalQueuedRequests: inference requests waiting in the admission queue for a slot.
pub const GATEWAY_QUEUED: &str = "ollama_sidecar_queue_requests";
/// TotalRunningRequests: inference requests holding a slot (sent to an instance, being served).
pub const GATEWAY_RUNNING: &str = "ollama_sidecar_running_requests";
/// KVCacheUtilization, a fraction 0..1 as the picker reads vLLM's `vllm:kv_cache_usage_perc`
/// (its kv-cache-utilization scorer scores `1 - value`). Ollama reports no cache use; what it
/// does is split each loaded model's KV cache into `num_parallel` equal slots and give each
/// running sequence one whole slot (ollama/ollama `runner/ollamarunner/cache.go`, `NewInputCache` and
/// `LoadCacheSlot`), so the share of slots held is the share of the cache held by running
/// requests: the closest honest signal, an upper bound of the tokens actually stored.
pub const GATEWAY_UTILIZATION: &str = "ollama_sidecar_busy_slots_ratio";

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics. The first call builds them (`server::run` makes it at startup).
pub fn global() -> &'static Metrics {
    &GLOBAL
}

/// How a client request ended, for the access log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Outcome {
    #[default]
    Pending,
    Served,
    /// The sidecar refused it (a `Reject` that is a refusal).
    Refused,
    /// The client left while queued.
    CancelledQueued,
    /// The client left before the first response byte.
    CancelledWaiting,
    /// The client left while the response streamed.
    CancelledStreaming,
    /// No instance could answer it.
    Failed,
    /// The client read nothing for `limits.write_timeout`: its stream was cut.
    WriteTimeout,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Served => "served",
            Outcome::Refused => "refused",
            Outcome::CancelledQueued => "cancelled_queued",
            Outcome::CancelledWaiting => "cancelled_waiting",
            Outcome::CancelledStreaming => "cancelled_streaming",
            Outcome::Failed => "failed",
            Outcome::WriteTimeout => "write_timeout",
        }
    }
}

/// What one finished client request contributes to the metrics.
#[derive(Debug, Clone, Copy)]
pub struct RequestRecord<'a> {
    pub class: &'static str,
    pub route: &'static str,
    pub model: Option<&'a str>,
    /// The status the client got; 0 when it got none.
    pub status: u16,
    pub duration: Duration,
    pub queue_wait: Option<Duration>,
    pub first_byte: Option<Duration>,
    pub tap: &'a TapSummary,
    pub outcome: Outcome,
    /// The refusal's label (`Reject::label`), when the sidecar refused the request.
    pub rejection: Option<&'static str>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// The `status_class` label: `2xx`..., or `none` when no response was sent.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

/// Generation speed: from Ollama's `eval_count`/`eval_duration`, else from the time between the
/// first and the last streamed token.
pub fn tokens_per_second(tap: &TapSummary) -> Option<f64> {
    let n = tap.completion_tokens.filter(|n| *n > 0)?;
    if let Some(d) = tap.eval_duration.filter(|d| !d.is_zero()) {
        return Some(n as f64 / d.as_secs_f64());
    }
    let span = tap.last_token?.checked_sub(tap.first_token?)?;
    if n < 2 || span < Duration::from_millis(1) {
        return None;
    }
    Some((n - 1) as f64 / span.as_secs_f64())
}

/// Last result of an instance's active health check, for `/status`.
#[derive(Debug, Clone)]
pub struct HealthRecord {
    pub result: &'static str,
    pub at: Instant,
}

pub struct Metrics {
    registry: prometheus::Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    queue_wait: HistogramVec,
    first_byte: HistogramVec,
    first_token: HistogramVec,
    prompt_tokens: IntCounterVec,
    completion_tokens: IntCounterVec,
    tokens_per_second: HistogramVec,
    model_load: HistogramVec,
    request_bytes: IntCounterVec,
    response_bytes: IntCounterVec,
    stream_errors: IntCounterVec,
    rejections: IntCounterVec,
    retries: IntCounterVec,
    cancellations: IntCounterVec,
    health_checks: IntCounterVec,
    resolve_failures: IntCounterVec,
    shared: SharedStateMetrics,
    // Mirrored on each scrape.
    in_flight: IntGauge,
    queue_requests: IntGauge,
    queue_bytes: IntGauge,
    pending_body_bytes: IntGauge,
    queue_clients: IntGauge,
    /// Waiters per configured API key (bounded: key names come from the configuration).
    key_queued: IntGaugeVec,
    queue_oldest_wait: Gauge,
    running_requests: IntGauge,
    busy_slots_ratio: Gauge,
    /// The gateway gauges alone (the same collectors as in `registry`).
    gateway: prometheus::Registry,
    admitted: IntCounter,
    instance_up: IntGaugeVec,
    instance_state: IntGaugeVec,
    instance_state_age: GaugeVec,
    instance_in_flight: IntGaugeVec,
    instance_busy_slots: IntGaugeVec,
    instance_slots: IntGaugeVec,
    instance_loaded_models: IntGaugeVec,
    instance_restarts: IntCounterVec,
    instance_ejections: IntCounterVec,
    instance_cpu_seconds: CounterVec,
    instance_memory: IntGaugeVec,
    known_models_count: IntGauge,
    uptime: Gauge,
    /// One scrape at a time (the mirrored counters are brought up to date by difference).
    scrape: Mutex<()>,
    known_models: RwLock<KnownModels>,
    last_health: Mutex<BTreeMap<String, HealthRecord>>,
    started: Instant,
    placement: PlacementMetrics,
    /// Configuration reloads (`src/reload.rs`).
    reload: ReloadMetrics,
}

/// The model allow-list, per instance (an instance that stops answering keeps its entries).
#[derive(Default)]
struct KnownModels {
    by_instance: BTreeMap<String, Vec<String>>,
    all: BTreeSet<String>,
}

impl KnownModels {
    /// `all` again from `by_instance`; its new size.
    fn recount(&mut self) -> usize {
        self.all = self
            .by_instance
            .values()
            .flatten()
            .take(MAX_KNOWN_MODELS)
            .cloned()
            .collect();
        self.all.len()
    }
}

fn name(suffix: &str) -> String {
    format!("{PREFIX}_{suffix}")
}

/// Builds and registers one collector. Metric definitions are constants of this file: an error
/// here is a programming error, caught by the unit tests, and happens at startup (`server::run`
/// builds the metrics before serving).
macro_rules! metric {
    ($registry:expr, $ty:ty, $opts:expr) => {{
        let m = <$ty>::with_opts($opts).expect("valid metric definition");
        $registry
            .register(Box::new(m.clone()))
            .expect("unique metric name");
        m
    }};
    ($registry:expr, $ty:ty, $opts:expr, $labels:expr) => {{
        let m = <$ty>::new($opts, $labels).expect("valid metric definition");
        $registry
            .register(Box::new(m.clone()))
            .expect("unique metric name");
        m
    }};
}

fn opts(suffix: &str, help: &str) -> Opts {
    Opts::new(name(suffix), help)
}

fn hopts(suffix: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name(suffix), help).buckets(buckets.to_vec())
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh set of metrics in its own registry (the process uses [`global`]; tests make their
    /// own).
    pub fn new() -> Metrics {
        let r = prometheus::Registry::new();
        let build_info = metric!(
            r,
            IntGaugeVec,
            opts(
                "build_info",
                "Always 1; the labels say which build of ollama-sidecar runs."
            ),
            &["version"]
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let start_time = metric!(
            r,
            Gauge,
            opts(
                "start_time_seconds",
                "When the sidecar started, in seconds since the Unix epoch."
            )
        );
        start_time.set(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        let placement = PlacementMetrics::new(&r);
        let m = Metrics {
            requests: metric!(
                r,
                IntCounterVec,
                opts(
                    "requests_total",
                    "Client requests answered (or abandoned), by route class, route, model and status class."
                ),
                &["class", "route", "model", "status_class"]
            ),
            request_duration: metric!(
                r,
                HistogramVec,
                hopts(
                    "request_duration_seconds",
                    "Time from the request's arrival to the end of its response, queue wait included.",
                    LATENCY_BUCKETS
                ),
                &["class", "route", "model"]
            ),
            queue_wait: metric!(
                r,
                HistogramVec,
                hopts(
                    "queue_wait_seconds",
                    "Time an admitted inference request waited in the admission queue for a slot.",
                    LATENCY_BUCKETS
                ),
                &["model"]
            ),
            first_byte: metric!(
                r,
                HistogramVec,
                hopts(
                    "time_to_first_byte_seconds",
                    "Time from the request's arrival to the first response byte from the instance (response header on the plain proxy path, first body chunk on the inference path).",
                    LATENCY_BUCKETS
                ),
                &["class", "route", "model"]
            ),
            first_token: metric!(
                r,
                HistogramVec,
                hopts(
                    "time_to_first_token_seconds",
                    "Time from the request's arrival to the first streamed chunk carrying a token (content, thinking or a tool call).",
                    LATENCY_BUCKETS
                ),
                &["route", "model"]
            ),
            prompt_tokens: metric!(
                r,
                IntCounterVec,
                opts(
                    "prompt_tokens_total",
                    "Prompt tokens evaluated, as the instance reported them (prompt_eval_count, usage.prompt_tokens, usage.input_tokens)."
                ),
                &["route", "model"]
            ),
            completion_tokens: metric!(
                r,
                IntCounterVec,
                opts(
                    "completion_tokens_total",
                    "Tokens generated, as the instance reported them (eval_count, usage.completion_tokens, usage.output_tokens)."
                ),
                &["route", "model"]
            ),
            tokens_per_second: metric!(
                r,
                HistogramVec,
                hopts(
                    "generation_tokens_per_second",
                    "Generation speed of one response: eval_count / eval_duration when Ollama reports them, else tokens over the streamed span.",
                    TOKENS_PER_SECOND_BUCKETS
                ),
                &["model"]
            ),
            model_load: metric!(
                r,
                HistogramVec,
                hopts(
                    "model_load_duration_seconds",
                    "Time the instance spent loading the model for a request (Ollama's load_duration).",
                    LATENCY_BUCKETS
                ),
                &["model"]
            ),
            request_bytes: metric!(
                r,
                IntCounterVec,
                opts("request_body_bytes_total", "Request body bytes read from clients."),
                &["class"]
            ),
            response_bytes: metric!(
                r,
                IntCounterVec,
                opts("response_body_bytes_total", "Response body bytes sent to clients."),
                &["class"]
            ),
            stream_errors: metric!(
                r,
                IntCounterVec,
                opts(
                    "stream_errors_total",
                    "Responses that began with a success status and then carried an in-band error."
                ),
                &["route"]
            ),
            rejections: metric!(
                r,
                IntCounterVec,
                opts(
                    "rejections_total",
                    "Requests the sidecar refused itself, by reason."
                ),
                &["reason"]
            ),
            retries: metric!(
                r,
                IntCounterVec,
                opts(
                    "retries_total",
                    "Requests sent again to an instance after a failure, by reason."
                ),
                &["reason"]
            ),
            cancellations: metric!(
                r,
                IntCounterVec,
                opts(
                    "cancellations_total",
                    "Inference requests whose client left, by phase: queued (waiting for a slot), waiting (for the response to start), streaming."
                ),
                &["phase"]
            ),
            shared: SharedStateMetrics::new(&r),
            reload: ReloadMetrics::new(&r),
            health_checks: metric!(
                r,
                IntCounterVec,
                opts(
                    "health_checks_total",
                    "Active health checks of instances, by result."
                ),
                &["instance", "result"]
            ),
            resolve_failures: metric!(
                r,
                IntCounterVec,
                opts(
                    "instance_resolve_failures_total",
                    "Lookups of an instance's host name that failed (the instance watch resolves it before each health check)."
                ),
                &["instance"]
            ),
            in_flight: metric!(
                r,
                IntGauge,
                opts(
                    "in_flight_requests",
                    "Client requests in progress (queued ones included)."
                )
            ),
            queue_requests: metric!(
                r,
                IntGauge,
                opts("queue_requests", "Inference requests waiting for a slot.")
            ),
            running_requests: metric!(
                r,
                IntGauge,
                opts(
                    "running_requests",
                    "Inference requests holding a slot: sent to an instance and being served."
                )
            ),
            busy_slots_ratio: metric!(
                r,
                Gauge,
                opts(
                    "busy_slots_ratio",
                    "Share (0 to 1) of the inference slots of the instances in rotation that requests hold; Ollama gives each running request one num_parallel share of its KV cache, so this is the share of KV cache in use. 1 when no instance can take a request."
                )
            ),
            queue_bytes: metric!(
                r,
                IntGauge,
                opts(
                    "queue_bytes",
                    "Request body bytes held by requests waiting for a slot."
                )
            ),
            pending_body_bytes: metric!(
                r,
                IntGauge,
                opts(
                    "pending_body_bytes",
                    "Request body bytes being read before admission, all connections together (limited by limits.max_pending_body_bytes)."
                )
            ),
            key_queued: metric!(
                r,
                IntGaugeVec,
                opts(
                    "key_queue_requests",
                    "Inference requests waiting in the admission queue, by API key (every configured key; requests without a key are not counted here)."
                ),
                &["key"]
            ),
            queue_clients: metric!(
                r,
                IntGauge,
                opts(
                    "queue_clients",
                    "Distinct clients with at least one request waiting."
                )
            ),
            queue_oldest_wait: metric!(
                r,
                Gauge,
                opts(
                    "queue_oldest_wait_seconds",
                    "How long the longest-waiting queued request has waited (0 when none waits)."
                )
            ),
            admitted: metric!(
                r,
                IntCounter,
                opts(
                    "admitted_total",
                    "Inference requests granted a slot."
                )
            ),
            instance_up: metric!(
                r,
                IntGaugeVec,
                opts(
                    "instance_up",
                    "1 when the instance is ready to take traffic, else 0."
                ),
                &["instance"]
            ),
            instance_state: metric!(
                r,
                IntGaugeVec,
                opts(
                    "instance_state",
                    "The instance's lifecycle state: 1 for the current state, 0 for the others."
                ),
                &["instance", "state"]
            ),
            instance_state_age: metric!(
                r,
                GaugeVec,
                opts(
                    "instance_state_age_seconds",
                    "How long the instance has been in its current state."
                ),
                &["instance"]
            ),
            instance_in_flight: metric!(
                r,
                IntGaugeVec,
                opts(
                    "instance_in_flight_requests",
                    "Requests being served by the instance (all routes)."
                ),
                &["instance"]
            ),
            instance_busy_slots: metric!(
                r,
                IntGaugeVec,
                opts(
                    "instance_busy_slots",
                    "Inference slots of the instance held by admitted requests."
                ),
                &["instance"]
            ),
            instance_slots: metric!(
                r,
                IntGaugeVec,
                opts(
                    "instance_slots",
                    "Inference slots of the instance: num_parallel for each model it was seen holding at once (Ollama gives every loaded model its own num_parallel)."
                ),
                &["instance"]
            ),
            instance_loaded_models: metric!(
                r,
                IntGaugeVec,
                opts(
                    "instance_loaded_models",
                    "Models the instance has loaded (from /api/ps)."
                ),
                &["instance"]
            ),
            instance_restarts: metric!(
                r,
                IntCounterVec,
                opts(
                    "instance_restarts_total",
                    "Restarts of a supervised instance's process."
                ),
                &["instance"]
            ),
            instance_ejections: metric!(
                r,
                IntCounterVec,
                opts(
                    "instance_ejections_total",
                    "Times the instance was taken out of rotation by errors in real traffic."
                ),
                &["instance"]
            ),
            instance_cpu_seconds: metric!(
                r,
                CounterVec,
                opts(
                    "instance_cpu_seconds_total",
                    "CPU time used by a supervised instance's process tree (resets when it restarts)."
                ),
                &["instance"]
            ),
            instance_memory: metric!(
                r,
                IntGaugeVec,
                opts(
                    "instance_resident_memory_bytes",
                    "Resident memory of a supervised instance's process tree."
                ),
                &["instance"]
            ),
            known_models_count: metric!(
                r,
                IntGauge,
                opts(
                    "known_models",
                    "Model names the instances list in /api/tags: the values a model label may take besides other and none."
                )
            ),
            uptime: metric!(
                r,
                Gauge,
                opts("uptime_seconds", "Seconds since the sidecar started.")
            ),
            gateway: prometheus::Registry::new(),
            registry: r,
            scrape: Mutex::new(()),
            known_models: RwLock::new(KnownModels::default()),
            last_health: Mutex::new(BTreeMap::new()),
            started: Instant::now(),
            placement,
        };
        for gauge in [
            Box::new(m.queue_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.running_requests.clone()),
            Box::new(m.busy_slots_ratio.clone()),
        ] {
            m.gateway.register(gauge).expect("unique metric name");
        }
        for reason in crate::reject::REFUSAL_LABELS {
            let _ = m.rejections.get_metric_with_label_values(&[reason]);
        }
        for phase in CANCEL_PHASES {
            let _ = m.cancellations.get_metric_with_label_values(&[phase]);
        }
        for reason in crate::proxy::retry::RetryReason::ALL {
            let _ = m.retries.get_metric_with_label_values(&[reason.as_str()]);
        }
        m
    }

    /// The `model` label for a request's model: its `model_key` when an instance lists it,
    /// `other` when not, `none` without a model.
    pub fn model_label(&self, model: Option<&str>) -> String {
        let Some(model) = model.filter(|m| !m.trim().is_empty()) else {
            return NO_MODEL.to_string();
        };
        let key = model_key(model);
        match self.known_models.read() {
            Ok(k) if k.all.contains(&key) => key,
            _ => OTHER_MODEL.to_string(),
        }
    }

    /// Replaces what `instance` lists in `/api/tags` (names in `model_key` form).
    pub fn set_instance_models(&self, instance: &str, models: Vec<String>) {
        let Ok(mut k) = self.known_models.write() else {
            return;
        };
        k.by_instance.insert(instance.to_string(), models);
        self.known_models_count.set(k.recount() as i64);
    }

    /// The model allow-list (names in `model_key` form).
    pub fn known_models(&self) -> Vec<String> {
        self.known_models
            .read()
            .map(|k| k.all.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Records one finished client request.
    pub fn record(&self, r: &RequestRecord<'_>) {
        let model = self.model_label(r.model);
        let model = model.as_str();
        let status_class = status_class(r.status);
        inc(&self.requests, &[r.class, r.route, model, status_class], 1);
        observe(
            &self.request_duration,
            &[r.class, r.route, model],
            r.duration,
        );
        if let Some(d) = r.queue_wait {
            observe(&self.queue_wait, &[model], d);
        }
        if let Some(d) = r.first_byte {
            observe(&self.first_byte, &[r.class, r.route, model], d);
        }
        let tap = r.tap;
        if let Some(d) = tap.first_token {
            observe(&self.first_token, &[r.route, model], d);
        }
        if let Some(n) = tap.prompt_tokens {
            inc(&self.prompt_tokens, &[r.route, model], n);
        }
        if let Some(n) = tap.completion_tokens {
            inc(&self.completion_tokens, &[r.route, model], n);
        }
        if let Some(tps) = tokens_per_second(tap) {
            if let Ok(h) = self
                .tokens_per_second
                .get_metric_with_label_values(&[model])
            {
                h.observe(tps);
            }
        }
        if let Some(d) = tap.load_duration.filter(|d| !d.is_zero()) {
            observe(&self.model_load, &[model], d);
        }
        if tap.error.is_some() && (200..300).contains(&r.status) {
            inc(&self.stream_errors, &[r.route], 1);
        }
        if r.bytes_in > 0 {
            inc(&self.request_bytes, &[r.class], r.bytes_in);
        }
        if r.bytes_out > 0 {
            inc(&self.response_bytes, &[r.class], r.bytes_out);
        }
        if let Some(reason) = r.rejection {
            inc(&self.rejections, &[reason], 1);
        }
        let phase = match r.outcome {
            Outcome::CancelledQueued => Some("queued"),
            Outcome::CancelledWaiting => Some("waiting"),
            Outcome::CancelledStreaming => Some("streaming"),
            Outcome::WriteTimeout => Some("write_timeout"),
            _ => None,
        };
        if let Some(phase) = phase {
            inc(&self.cancellations, &[phase], 1);
        }
    }

    /// Counts one retry. `reason` should come from a small fixed set (e.g. `connect_error`,
    /// `connect_timeout`, `reset`, `status_503`): it is a label.
    pub fn retry(&self, reason: &'static str) {
        inc(&self.retries, &[reason], 1);
    }

    /// Counts one active health check of `instance`; `result` should come from a small fixed set
    /// (`success`, `failure`, `timeout`): it is a label.
    pub fn health_check(&self, instance: &str, result: &'static str) {
        inc(&self.health_checks, &[instance, result], 1);
        if let Ok(mut last) = self.last_health.lock() {
            match last.get_mut(instance) {
                Some(rec) => {
                    rec.result = result;
                    rec.at = Instant::now();
                }
                None => {
                    last.insert(
                        instance.to_string(),
                        HealthRecord {
                            result,
                            at: Instant::now(),
                        },
                    );
                }
            }
        }
    }

    /// Counts one failed lookup of `instance`'s host name.
    pub fn resolve_failure(&self, instance: &str) {
        inc(&self.resolve_failures, &[instance], 1);
    }

    /// The last active health check of `instance`, if any.
    pub fn last_health_check(&self, instance: &str) -> Option<HealthRecord> {
        self.last_health
            .lock()
            .ok()
            .and_then(|l| l.get(instance).cloned())
    }

    /// Brings the mirrored metrics up to date and encodes everything in the text format.
    pub fn render(&self, app: &App) -> String {
        let _one_at_a_time = self.scrape.lock();
        self.refresh(
            app.admission.snapshot(),
            &app.registry,
            app.lifecycle.active(),
        );
        self.refresh_keys(&app.config.access.keys, &app.admission.waiters());
        self.encode()
    }

    /// Only the gateway gauges ([`GATEWAY_PATH`]), brought up to date.
    pub fn render_gateway(&self, app: &App) -> String {
        let _one_at_a_time = self.scrape.lock();
        self.refresh_gateway(&app.admission.snapshot(), &app.registry);
        encode(&self.gateway, 1024)
    }

    /// The text format of the registry as it is.
    pub fn encode(&self) -> String {
        encode(&self.registry, 64 * 1024)
    }

    /// Mirrors the queue and the slots into the gateway gauges.
    pub fn refresh_gateway(&self, snap: &AdmissionSnapshot, registry: &Registry) {
        self.queue_requests.set(snap.queued as i64);
        self.running_requests.set(snap.held() as i64);
        self.busy_slots_ratio
            .set(busy_slots_ratio(&snap.slots, |i| {
                registry
                    .all()
                    .iter()
                    .find(|inst| inst.index == i)
                    .map_or(0, |inst| inst.request_limit())
            }));
    }

    /// Mirrors the queue per configured key (a key with nothing waiting reads 0).
    pub fn refresh_keys(&self, keys: &[crate::config::ApiKey], waiters: &[WaiterView]) {
        for key in keys {
            let waiting = waiters.iter().filter(|w| *w.client == *key.name).count();
            set(&self.key_queued, &[&key.name], waiting as i64);
        }
    }

    /// The models `instance` last listed in `/api/tags` (kept while it does not answer).
    pub fn installed_models(&self, instance: &str) -> Vec<String> {
        self.known_models
            .read()
            .ok()
            .and_then(|k| k.by_instance.get(instance).cloned())
            .unwrap_or_default()
    }

    /// Mirrors the queue, slot and instance state into their gauges and counters.
    pub fn refresh(&self, snap: AdmissionSnapshot, registry: &Registry, in_flight: usize) {
        self.uptime.set(self.started.elapsed().as_secs_f64());
        self.in_flight.set(in_flight as i64);
        self.refresh_gateway(&snap, registry);
        self.queue_bytes.set(snap.queued_bytes as i64);
        self.pending_body_bytes
            .set(crate::proxy::request_body::pending_bytes() as i64);
        self.queue_clients.set(snap.clients_queued as i64);
        self.queue_oldest_wait
            .set(snap.oldest_wait.map(|d| d.as_secs_f64()).unwrap_or(0.0));
        advance(&self.admitted, snap.counters.admitted);
        for slot in &snap.slots {
            set(&self.instance_busy_slots, &[&slot.name], slot.busy as i64);
            set(&self.instance_slots, &[&slot.name], slot.slots as i64);
        }
        for inst in registry.all().iter() {
            let name = inst.name.as_str();
            let state = inst.state();
            set(&self.instance_up, &[name], i64::from(inst.is_ready()));
            for s in InstanceState::ALL {
                set(
                    &self.instance_state,
                    &[name, s.as_str()],
                    i64::from(s == state),
                );
            }
            if let Ok(g) = self
                .instance_state_age
                .get_metric_with_label_values(&[name])
            {
                g.set(inst.state_age().as_secs_f64());
            }
            set(&self.instance_in_flight, &[name], inst.in_flight() as i64);
            if inst.is_named() {
                // The series exists (at 0) before the first failure.
                inc(&self.resolve_failures, &[name], 0);
            }
            set(
                &self.instance_loaded_models,
                &[name],
                inst.loaded_models().len() as i64,
            );
            if let Ok(c) = self
                .instance_ejections
                .get_metric_with_label_values(&[name])
            {
                advance(&c, inst.ejections());
            }
            if inst.supervised {
                let p = inst.process_info();
                if let Ok(c) = self.instance_restarts.get_metric_with_label_values(&[name]) {
                    advance(&c, p.restarts);
                }
                if let Ok(c) = self
                    .instance_cpu_seconds
                    .get_metric_with_label_values(&[name])
                {
                    advance_float(&c, p.cpu_seconds);
                }
                set(&self.instance_memory, &[name], p.memory_bytes as i64);
            }
        }
    }
}

fn encode(registry: &prometheus::Registry, capacity: usize) -> String {
    let mut out = Vec::with_capacity(capacity);
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Held slots over the slots instances can serve now (`capacity` of an instance index: its
/// `request_limit`, 0 out of rotation), at most 1; 1 when no instance can serve (nothing more
/// fits). A request still finishing on an instance that left rotation keeps counting as held.
pub fn busy_slots_ratio(slots: &[SlotUse], capacity: impl Fn(usize) -> usize) -> f64 {
    let busy: usize = slots.iter().map(|s| s.busy).sum();
    let open: usize = slots.iter().map(|s| capacity(s.index)).sum();
    if open == 0 {
        return 1.0;
    }
    (busy as f64 / open as f64).min(1.0)
}

/// Redis calls of the shared limits (`src/shared_state.rs`): their latency, their failures, and
/// the decisions taken without Redis.
struct SharedStateMetrics {
    up: IntGauge,
    call_duration: prometheus::Histogram,
    errors: IntCounterVec,
    fallbacks: IntCounterVec,
}

/// Redis round trips on loopback take tens of microseconds; the timeout is tens of milliseconds.
const SHARED_STATE_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];

impl SharedStateMetrics {
    fn new(r: &prometheus::Registry) -> SharedStateMetrics {
        SharedStateMetrics {
            up: metric!(
                r,
                IntGauge,
                opts(
                    "shared_state_up",
                    "1 while the Redis of shared_state is connected and answering, else 0."
                )
            ),
            call_duration: metric!(
                r,
                prometheus::Histogram,
                hopts(
                    "shared_state_call_duration_seconds",
                    "Redis calls of the shared limits, from send to answer (or timeout).",
                    SHARED_STATE_BUCKETS
                )
            ),
            errors: metric!(
                r,
                IntCounterVec,
                opts(
                    "shared_state_errors_total",
                    "Redis calls of the shared limits that failed, by kind: timeout, error."
                ),
                &["kind"]
            ),
            fallbacks: metric!(
                r,
                IntCounterVec,
                opts(
                    "shared_state_fallbacks_total",
                    "Limit decisions taken without Redis, by shared_state.on_error: open (local limits), closed (503)."
                ),
                &["on_error"]
            ),
        }
    }
}

impl Metrics {
    /// Whether the shared state is reachable now.
    pub fn shared_state_up(&self, up: bool) {
        self.shared.up.set(i64::from(up));
    }

    /// One Redis call of the shared limits, and how long it took.
    pub fn shared_state_call(&self, took: Duration) {
        self.shared.call_duration.observe(took.as_secs_f64());
    }

    /// A failed Redis call; `kind` is `timeout` or `error`.
    pub fn shared_state_error(&self, kind: &'static str) {
        inc(&self.shared.errors, &[kind], 1);
    }

    /// A limit decision taken without Redis; `on_error` is `open` or `closed`.
    pub fn shared_state_fallback(&self, on_error: &'static str) {
        inc(&self.shared.fallbacks, &[on_error], 1);
    }
}

fn inc(v: &IntCounterVec, labels: &[&str], n: u64) {
    if let Ok(c) = v.get_metric_with_label_values(labels) {
        c.inc_by(n);
    }
}

fn observe(v: &HistogramVec, labels: &[&str], d: Duration) {
    if let Ok(h) = v.get_metric_with_label_values(labels) {
        h.observe(d.as_secs_f64());
    }
}

fn set(v: &IntGaugeVec, labels: &[&str], value: i64) {
    if let Ok(g) = v.get_metric_with_label_values(labels) {
        g.set(value);
    }
}

/// Moves a mirrored counter to `value` (a smaller value is a reset, as Prometheus reads it).
fn advance<P: prometheus::core::Atomic>(c: &prometheus::core::GenericCounter<P>, value: P::T) {
    let now = c.get();
    if value < now {
        c.reset();
        c.inc_by(value);
    } else if value > now {
        let mut delta = value;
        delta -= now;
        c.inc_by(delta);
    }
}

/// [`advance`] for a float, which may be NaN or negative: such a sample is skipped.
fn advance_float(c: &Counter, value: f64) {
    if value.is_finite() && value >= 0.0 {
        advance(c, value);
    }
}

/// Reads `/api/tags` of every ready instance into the model allow-list: at once, every
/// [`MODELS_INTERVAL`] after that, and every second while no instance has answered yet.
pub async fn poll_known_models(registry: Arc<Registry>, metrics: &'static Metrics) {
    let timeout = Duration::from_secs(5);
    loop {
        let mut answered = false;
        for instance in registry.all().iter() {
            if let Some(models) =
                crate::upstream::models::model_list(instance, "/api/tags", timeout).await
            {
                answered = true;
                metrics.set_instance_models(&instance.name, models);
            }
        }
        let wait = if answered || !metrics.known_models().is_empty() {
            MODELS_INTERVAL
        } else {
            MODELS_RETRY
        };
        tokio::time::sleep(wait).await;
    }
}

/// Where dispatch sent requests for a model and what that cost (`src/admission/placement.rs`):
/// decisions by reason, affinity hits, the loads and evictions the sidecar caused, and how long
/// requests waited for a warm slot (a load's duration is `model_load_duration_seconds`, from
/// Ollama's `load_duration`). Model labels go through [`Metrics::model_label`].
struct PlacementMetrics {
    decisions: IntCounterVec,
    affinity: IntCounterVec,
    cold_loads: IntCounterVec,
    evictions: IntCounterVec,
    warm_wait: HistogramVec,
}

impl PlacementMetrics {
    fn new(r: &prometheus::Registry) -> PlacementMetrics {
        PlacementMetrics {
            decisions: metric!(
                r,
                IntCounterVec,
                opts(
                    "placement_decisions_total",
                    "Slots granted to requests for a model, by instance and reason (model_loaded, cold_load, cold_load_warm_busy, half_open_trial)."
                ),
                &["instance", "reason"]
            ),
            affinity: metric!(
                r,
                IntCounterVec,
                opts(
                    "placement_affinity_total",
                    "Requests for a model by whether their instance had it loaded: hit or miss. Hit ratio: hit / (hit + miss)."
                ),
                &["result"]
            ),
            cold_loads: metric!(
                r,
                IntCounterVec,
                opts(
                    "model_cold_loads_total",
                    "Requests the sidecar sent to an instance that did not have their model loaded (the instance loads it)."
                ),
                &["instance", "model"]
            ),
            evictions: metric!(
                r,
                IntCounterVec,
                opts(
                    "model_evictions_total",
                    "Models the sidecar expects a load it caused to have evicted, by instance and evicted model."
                ),
                &["instance", "model"]
            ),
            warm_wait: metric!(
                r,
                HistogramVec,
                hopts(
                    "placement_warm_wait_seconds",
                    "Time queued by requests that waited while their model was warm on a busy instance, by how they ended: warm (got a warm slot) or cold_load (waited out a load's time).",
                    LATENCY_BUCKETS
                ),
                &["outcome"]
            ),
        }
    }
}

// ---- Reload (src/reload.rs): the configuration's generation and the reloads tried. ----

/// Which configuration runs, since when, and how reloads went.
struct ReloadMetrics {
    generation: IntGauge,
    loaded: Gauge,
    reloads: IntCounterVec,
}

/// The `result` label of `config_reloads_total`.
pub const RELOAD_RESULTS: [&str; 3] = ["ok", "invalid", "refused"];

impl ReloadMetrics {
    fn new(r: &prometheus::Registry) -> ReloadMetrics {
        let metrics = ReloadMetrics {
            generation: metric!(
                r,
                IntGauge,
                opts(
                    "config_generation",
                    "The running configuration's generation: 1 at startup, one more per accepted reload."
                )
            ),
            loaded: metric!(
                r,
                Gauge,
                opts(
                    "config_loaded_timestamp_seconds",
                    "When the running configuration was loaded (Unix time)."
                )
            ),
            reloads: metric!(
                r,
                IntCounterVec,
                opts(
                    "config_reloads_total",
                    "Configuration reloads tried, by result: ok, invalid (the file has an error), refused (a change needs a restart)."
                ),
                &["result"]
            ),
        };
        for result in RELOAD_RESULTS {
            metrics.reloads.with_label_values(&[result]);
        }
        metrics
    }
}

impl Metrics {
    /// A slot for `model` on `instance` granted for `reason` after `waited` queued; `cold`: the
    /// instance loads the model for it, evicting `evicted`.
    pub fn placement(
        &self,
        instance: &str,
        model: &str,
        reason: &'static str,
        cold: bool,
        evicted: Option<&str>,
        waited: Duration,
    ) {
        let p = &self.placement;
        inc(&p.decisions, &[instance, reason], 1);
        inc(&p.affinity, &[if cold { "miss" } else { "hit" }], 1);
        if cold {
            inc(
                &p.cold_loads,
                &[instance, &self.model_label(Some(model))],
                1,
            );
        }
        if let Some(evicted) = evicted {
            inc(
                &p.evictions,
                &[instance, &self.model_label(Some(evicted))],
                1,
            );
        }
        if !waited.is_zero() && matches!(reason, "model_loaded" | "cold_load_warm_busy") {
            let outcome = if cold { "cold_load" } else { "warm" };
            observe(&p.warm_wait, &[outcome], waited);
        }
    }

    /// The configuration now running: its generation and when it was loaded.
    pub fn config_loaded(&self, generation: u64, loaded_at: std::time::SystemTime) {
        self.reload
            .generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        let unix = loaded_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.reload.loaded.set(unix);
    }

    /// A reload removed `instance`: its models leave the model allow-list (unless another
    /// instance lists them).
    pub fn forget_instance_models(&self, instance: &str) {
        let Ok(mut k) = self.known_models.write() else {
            return;
        };
        if k.by_instance.remove(instance).is_none() {
            return;
        }
        self.known_models_count.set(k.recount() as i64);
    }

    /// A reload ended with `result` (one of [`RELOAD_RESULTS`]).
    pub fn config_reload(&self, result: &'static str) {
        self.reload.reloads.with_label_values(&[result]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(text: &str, name: &str) -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn builds_and_encodes() {
        let m = Metrics::new();
        let text = m.encode();
        assert!(
            text.contains("ollama_sidecar_build_info{version=\""),
            "{text}"
        );
        assert!(text.contains("ollama_sidecar_rejections_total{reason=\"queue_full\"} 0"));
        assert!(text.contains("ollama_sidecar_cancellations_total{phase=\"streaming\"} 0"));
    }

    #[test]
    fn model_labels_are_bounded() {
        let m = Metrics::new();
        assert_eq!(m.model_label(None), "none");
        assert_eq!(m.model_label(Some("llama3.2")), "other");
        m.set_instance_models("a", vec!["llama3.2:latest".into()]);
        assert_eq!(m.model_label(Some("llama3.2")), "llama3.2:latest");
        assert_eq!(m.model_label(Some("llama3.2:latest")), "llama3.2:latest");
        assert_eq!(m.model_label(Some("made-up")), "other");
        m.set_instance_models("b", vec!["qwen:1b".into()]);
        m.set_instance_models("a", vec![]);
        assert_eq!(m.known_models(), vec!["qwen:1b".to_string()]);
    }

    #[test]
    fn records_a_request() {
        let m = Metrics::new();
        m.set_instance_models("a", vec!["llama3.2:latest".into()]);
        let tap = TapSummary {
            first_token: Some(Duration::from_millis(40)),
            last_token: Some(Duration::from_millis(90)),
            prompt_tokens: Some(12),
            completion_tokens: Some(5),
            eval_duration: Some(Duration::from_millis(500)),
            load_duration: Some(Duration::from_millis(3)),
            ..Default::default()
        };
        let rec = RequestRecord {
            class: "inference",
            route: "/api/chat",
            model: Some("llama3.2"),
            status: 200,
            duration: Duration::from_millis(100),
            queue_wait: Some(Duration::from_millis(2)),
            first_byte: Some(Duration::from_millis(10)),
            tap: &tap,
            outcome: Outcome::Served,
            rejection: None,
            bytes_in: 50,
            bytes_out: 500,
        };
        m.record(&rec);
        m.record(&rec);
        let text = m.encode();
        assert_eq!(
            series(&text, "ollama_sidecar_requests_total"),
            vec!["ollama_sidecar_requests_total{class=\"inference\",model=\"llama3.2:latest\",route=\"/api/chat\",status_class=\"2xx\"} 2"]
        );
        assert_eq!(
            series(&text, "ollama_sidecar_completion_tokens_total"),
            vec!["ollama_sidecar_completion_tokens_total{model=\"llama3.2:latest\",route=\"/api/chat\"} 10"]
        );
        assert!(text.contains(
            "ollama_sidecar_generation_tokens_per_second_sum{model=\"llama3.2:latest\"} 20"
        ));
        assert!(text.contains(
            "ollama_sidecar_time_to_first_token_seconds_count{model=\"llama3.2:latest\",route=\"/api/chat\"} 2"
        ));
    }

    #[test]
    fn tokens_per_second_sources() {
        let mut t = TapSummary {
            completion_tokens: Some(10),
            eval_duration: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        assert_eq!(tokens_per_second(&t), Some(5.0));
        t.eval_duration = None;
        assert_eq!(tokens_per_second(&t), None);
        t.first_token = Some(Duration::from_secs(1));
        t.last_token = Some(Duration::from_secs(4));
        assert_eq!(tokens_per_second(&t), Some(3.0));
    }

    #[test]
    fn busy_slots_ratio_counts_instances_in_rotation() {
        let slot = |index, busy, slots| SlotUse {
            index,
            name: format!("i{index}"),
            busy,
            slots,
        };
        let two = [slot(0, 1, 2), slot(1, 2, 2)];
        assert_eq!(busy_slots_ratio(&two, |_| 2), 0.75);
        assert_eq!(busy_slots_ratio(&[slot(0, 0, 2)], |_| 2), 0.0);
        // The second instance left rotation: its requests still finish, capacity is 2.
        assert_eq!(busy_slots_ratio(&two, |i| if i == 0 { 2 } else { 0 }), 1.0);
        assert_eq!(busy_slots_ratio(&[slot(0, 0, 2)], |_| 0), 1.0);
        // A half-open instance takes one trial request.
        assert_eq!(busy_slots_ratio(&[slot(0, 0, 4)], |_| 1), 0.0);
    }

    #[test]
    fn gateway_registry_holds_the_three_gauges() {
        let m = Metrics::new();
        let names: Vec<String> = m
            .gateway
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        assert_eq!(
            names,
            vec![GATEWAY_UTILIZATION, GATEWAY_QUEUED, GATEWAY_RUNNING]
        );
        let all = m.encode();
        for name in [GATEWAY_QUEUED, GATEWAY_RUNNING, GATEWAY_UTILIZATION] {
            assert!(all.contains(&format!("# TYPE {name} gauge")), "{name}");
        }
    }

    #[test]
    fn mirrored_counters_follow_resets() {
        let c = IntCounter::new("x_total", "x").unwrap();
        advance(&c, 5);
        advance(&c, 7);
        assert_eq!(c.get(), 7);
        advance(&c, 2);
        assert_eq!(c.get(), 2);
    }
}
