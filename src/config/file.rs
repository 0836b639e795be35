//! The file's shape: what the YAML may say, and what `check` prints back. Each section takes
//! its missing keys from its one `Default` impl (the struct-level `#[serde(default)]`), so
//! every default is written once, here. Nothing outside `config` reads these types: validation
//! (the section modules beside this one) turns them into the run-time configuration.

use super::log::LogFormat;
use super::shared_state::{redact_url, OnSharedError};
use super::units::{duration_text, ByteSize};
use super::{DEFAULT_ADMIN_LISTEN, DEFAULT_LISTEN};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The proxy's listening address (`host:port`).
    pub listen: String,
    /// Pingora worker threads; 0 means one per CPU core.
    pub threads: usize,
    pub admin: Admin,
    pub log: Log,
    pub timeouts: Timeouts,
    pub shutdown: Shutdown,
    pub admission: Admission,
    pub limits: Limits,
    pub health: Health,
    pub retries: Retries,
    /// API keys (off when empty).
    pub auth: Auth,
    /// Model allow-list, route policy and per-client rate limits, keys or not.
    pub policy: Policy,
    /// CORS answered by the sidecar (off when `origins` is empty).
    pub cors: Cors,
    /// Limits counted in Redis, shared by every sidecar that points at it (off without `redis`).
    pub shared_state: SharedState,
    pub instances: Vec<Instance>,
    /// Per-model rules by glob, the first that matches a model wins (`src/config/models.rs`).
    pub models: Vec<ModelRule>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.to_string(),
            threads: 0,
            admin: Admin::default(),
            log: Log::default(),
            timeouts: Timeouts::default(),
            shutdown: Shutdown::default(),
            admission: Admission::default(),
            limits: Limits::default(),
            health: Health::default(),
            retries: Retries::default(),
            auth: Auth::default(),
            policy: Policy::default(),
            cors: Cors::default(),
            shared_state: SharedState::default(),
            instances: Vec::new(),
            models: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Admin {
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`, `/status`).
    pub listen: String,
    /// SHA-256 (hex) of a token `/metrics` and `/status` require (`Authorization: Bearer`).
    pub token_sha256: Option<String>,
    /// Or: an environment variable holding that token.
    pub token_env: Option<String>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: DEFAULT_ADMIN_LISTEN.to_string(),
            token_sha256: None,
            token_env: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    /// A tracing filter (`info`, `debug`, `ollama_sidecar=debug,pingora=warn`). `RUST_LOG` wins.
    pub level: String,
    pub format: LogFormat,
    /// One access-log line per request (target `access`, at info level).
    pub access: bool,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".to_string(),
            format: LogFormat::Text,
            access: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// TCP connect to an instance.
    #[serde(with = "duration_text")]
    pub connect: Duration,
    /// From the request sent to the response header: long, because a cold model load takes minutes.
    #[serde(with = "duration_text")]
    pub response_header: Duration,
    /// Longest silence between two streamed chunks; off by default (a pull can be silent for long).
    #[serde(with = "duration_text::option")]
    pub idle: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            response_header: Duration::from_secs(600),
            idle: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Shutdown {
    /// On SIGTERM/SIGINT: how long in-flight requests may finish before they are cut.
    #[serde(with = "duration_text")]
    pub drain_timeout: Duration,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// The inference queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Admission {
    /// Requests waiting for a slot, at most; beyond it: 503 with `Retry-After`.
    pub max_queued: usize,
    /// Request bodies held by waiting requests, at most (`1GiB`, `512MiB`, or bytes).
    pub max_queued_bytes: ByteSize,
    /// Longest wait for a slot; beyond it: 503 with `Retry-After`.
    #[serde(with = "duration_text")]
    pub max_wait: Duration,
    /// Each `aging` waited raises a request's priority by one level, so nothing starves.
    #[serde(with = "duration_text")]
    pub aging: Duration,
    /// A header that names the client for fairness (e.g. `X-Client-Id`); unset: the client address.
    pub client_id_header: Option<String>,
    /// A header carrying an integer priority (higher first), e.g. `X-Priority`; unset: ignored.
    pub priority_header: Option<String>,
    /// Priority by client identity (an address, an `X-Client-Id` value, or a key name).
    pub priorities: BTreeMap<String, i32>,
    /// Model-management requests (pull, push, create, copy, delete, blobs) running at once.
    pub management_concurrency: usize,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            max_queued: 1024,
            max_queued_bytes: ByteSize(1 << 30),
            max_wait: Duration::from_secs(600),
            aging: Duration::from_secs(30),
            client_id_header: None,
            priority_header: None,
            priorities: BTreeMap::new(),
            management_concurrency: 2,
        }
    }
}

/// Limits on what clients send.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest JSON request body read to route it (inference routes); beyond it: 413.
    pub max_body: ByteSize,
    /// The request line and header fields together, at most; beyond it: 431.
    pub max_header_bytes: ByteSize,
    /// Header fields, at most; beyond it: 431.
    pub max_headers: usize,
    /// The request target (path and query), at most; beyond it: 414.
    pub max_uri_bytes: ByteSize,
    /// Longest silence while a request body is read; then 408 and the connection closes.
    #[serde(with = "duration_text")]
    pub body_read_timeout: Duration,
    /// Longest a write to a client may take (a client that reads nothing for it loses its
    /// stream; the instance's request is cancelled and the slot freed).
    #[serde(with = "duration_text")]
    pub write_timeout: Duration,
    /// Request-body bytes held before admission, across all connections; beyond it: 503.
    pub max_pending_body_bytes: ByteSize,
    /// Longest a request body may take to arrive in all; then 408 and the connection closes.
    #[serde(with = "duration_text")]
    pub body_deadline: Duration,
    /// Longest `keep_alive` a client may give a model (longer, or for good, is sent as this);
    /// off by default.
    #[serde(with = "duration_text::option")]
    pub max_keep_alive: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: ByteSize(64 << 20),
            max_header_bytes: ByteSize(64 << 10),
            max_headers: 100,
            max_uri_bytes: ByteSize(8 << 10),
            body_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_pending_body_bytes: ByteSize(256 << 20),
            body_deadline: Duration::from_secs(120),
            max_keep_alive: None,
        }
    }
}

/// How the sidecar watches its instances.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Health {
    /// Active check (`GET /api/version`, never inference) of external instances; supervised
    /// instances are checked by the supervisor's liveness probe.
    #[serde(with = "duration_text")]
    pub interval: Duration,
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    /// Consecutive successful checks that bring an unhealthy instance back.
    pub rise: usize,
    /// Consecutive failed checks that take an instance out of rotation.
    pub fall: usize,
    /// How often each ready instance's `/api/ps` is read to learn its loaded models.
    #[serde(with = "duration_text")]
    pub models_interval: Duration,
    pub passive: Passive,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            models_interval: Duration::from_secs(5),
            passive: Passive::default(),
        }
    }
}

/// Ejection of an instance on errors seen in real traffic.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Passive {
    /// Consecutive failures (connect errors, resets, 5xx, timeouts) that eject an instance.
    pub failures: u32,
    /// First cool-down; it doubles each time the half-open trial request fails.
    #[serde(with = "duration_text")]
    pub cooldown: Duration,
    #[serde(with = "duration_text")]
    pub max_cooldown: Duration,
}

impl Default for Passive {
    fn default() -> Self {
        Passive {
            failures: 3,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(60),
        }
    }
}

/// Retries of requests that failed before the client saw a byte.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retries {
    /// Attempts in all, the first included; 1 disables retries.
    pub max_attempts: u32,
    /// First backoff before a retry; doubles per attempt, with jitter.
    #[serde(with = "duration_text")]
    pub backoff: Duration,
    #[serde(with = "duration_text")]
    pub max_backoff: Duration,
    /// Retries may be at most this share of requests over `budget_window` ...
    pub budget_ratio: f64,
    #[serde(with = "duration_text")]
    pub budget_window: Duration,
    /// ... but this many retries per window are always allowed.
    pub budget_min: u32,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            max_attempts: 3,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            budget_ratio: 0.2,
            budget_window: Duration::from_secs(10),
            budget_min: 3,
        }
    }
}

/// One Ollama instance: external (`url`) or supervised (`port`, `command`, ...). `name` is
/// required, so this shape has no `Default`: its other keys default one by one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub name: String,
    /// An Ollama the sidecar does not manage: `http://host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Concurrent inference requests this instance is given (its `OLLAMA_NUM_PARALLEL`).
    #[serde(default = "one_slot")]
    pub num_parallel: usize,

    // Supervised-only keys: absent on an external instance, so their defaults are applied by
    // validation (`instances.rs`), not here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warmup: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<usize>,
    #[serde(
        default,
        with = "duration_text::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub start_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<Restart>,
    #[serde(
        default,
        with = "duration_text::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub stop_grace: Option<Duration>,
}

fn one_slot() -> usize {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Restart {
    #[serde(with = "duration_text")]
    pub initial_backoff: Duration,
    #[serde(with = "duration_text")]
    pub max_backoff: Duration,
    /// A run this long resets the backoff.
    #[serde(with = "duration_text")]
    pub stable_after: Duration,
    /// Restarts in a row without a stable run before the state is shown as `crashloop`.
    pub crashloop_after: u32,
    /// Failed liveness checks in a row that restart a running instance.
    pub liveness_failures: u32,
}

impl Default for Restart {
    fn default() -> Self {
        Restart {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            stable_after: Duration::from_secs(60),
            crashloop_after: 5,
            liveness_failures: 3,
        }
    }
}

/// API keys. Empty `keys`: no authentication (Ollama's own behaviour).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    pub keys: Vec<ApiKey>,
    /// With keys configured: let requests without a key use metadata routes (`/`, version,
    /// tags, ps, show, `/v1/models`). A wrong key is refused everywhere.
    pub allow_anonymous_metadata: bool,
}

/// One API key: where its secret comes from (a hash, an environment variable or a file; never
/// the key itself in the file) and what it may do. `name` is required, so this shape has no
/// `Default`: its other keys default one by one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// The client's identity for fairness, priorities and logs.
    pub name: String,
    /// Hex SHA-256 of the key (`printf %s "$KEY" | sha256sum`).
    #[serde(default)]
    pub sha256: Option<String>,
    /// Or: the environment variable that holds the key.
    #[serde(default)]
    pub key_env: Option<String>,
    /// Or: a file that holds the key (one line).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Admission priority of this key's requests (-100..100); a priority header is ignored.
    #[serde(default)]
    pub priority: i32,
    /// Inference and management requests of this key in flight at once; beyond it: 429.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// Requests per minute (a bucket of that size, refilled continuously); beyond it: 429.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Prompt + completion tokens per minute, charged after each response; over it: 429.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Models this key may use: glob patterns (`*`, `?`), matched case-insensitively on the
    /// name as sent and on its `name:tag` form.
    #[serde(default = "every_model")]
    pub models: Vec<String>,
    /// Route classes this key may use: inference, metadata, management, other.
    #[serde(default = "unprivileged_routes")]
    pub routes: Vec<String>,
    /// May use model management (pull, push, create, copy, delete, blobs).
    #[serde(default)]
    pub admin: bool,
}

fn every_model() -> Vec<String> {
    vec!["*".to_string()]
}

fn unprivileged_routes() -> Vec<String> {
    ["inference", "metadata", "other"]
        .map(String::from)
        .to_vec()
}

/// Policy for every request, with or without keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Models anyone may use (glob patterns); empty: every model.
    pub models: Vec<String>,
    /// Route classes refused to everyone (403): inference, metadata, management, other.
    pub deny_classes: Vec<String>,
    /// Requests per minute per client address, for requests without an API key.
    pub requests_per_minute_per_client: Option<u32>,
}

/// CORS answered by the sidecar for these origins.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cors {
    /// Exact origins (`https://app.example.com`) or `*`; empty: CORS passes through to Ollama.
    pub origins: Vec<String>,
    /// `Access-Control-Max-Age` of preflight answers.
    #[serde(with = "duration_text")]
    pub max_age: Duration,
}

impl Default for Cors {
    fn default() -> Self {
        Cors {
            origins: Vec::new(),
            max_age: Duration::from_secs(600),
        }
    }
}

/// Where the API keys' and the per-address limits are counted when several sidecars enforce them
/// together (`src/shared_state.rs`, `src/policy/shared_limits.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SharedState {
    /// `redis://[user:password@]host:port[/db]` or `unix:///path`; unset: limits are this
    /// process's own. `check` prints the password as `***`.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub redis: Option<String>,
    /// Prepended to every Redis key the sidecar writes.
    pub prefix: String,
    /// Longest wait for one Redis call on the request path; then `on_error` decides.
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    /// Longest wait to (re)connect.
    #[serde(with = "duration_text")]
    pub connect_timeout: Duration,
    /// While Redis is down or slow: `open` (each sidecar applies the limits alone) or `closed`
    /// (limited requests get 503).
    pub on_error: OnSharedError,
    /// A concurrency slot not renewed for this long (its sidecar died) is given back.
    #[serde(with = "duration_text")]
    pub lease_ttl: Duration,
}

impl Default for SharedState {
    fn default() -> Self {
        SharedState {
            redis: None,
            prefix: "ollama-sidecar:".to_string(),
            timeout: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(1),
            on_error: OnSharedError::default(),
            lease_ttl: Duration::from_secs(30),
        }
    }
}

fn serialize_redacted_url<S: serde::Serializer>(
    url: &Option<String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_str(&redact_url(u)),
        None => s.serialize_none(),
    }
}

/// One `models:` item: what the sidecar enforces for the models its pattern matches. Every
/// key but `match` is optional; an absent limit is no limit.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRule {
    /// A model-name glob (`*`, `?`), matched against the name with its tag (`llama3.2:latest`).
    #[serde(rename = "match")]
    pub pattern: String,
    /// Requests for one matching model running at once across the fleet; more wait in the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<usize>,
    /// The same, on each instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_per_instance: Option<usize>,
    /// The instances (by name) that may serve a matching model; empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<String>,
    /// Keep matching models loaded on every instance that may serve them and has them installed.
    #[serde(default)]
    pub pinned: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_defaults_read_back_the_same() {
        // What `check` prints can be used as a configuration file as it is.
        let text = yaml_serde::to_string(&Config::default()).unwrap();
        let back: Config = yaml_serde::from_str(&text).unwrap();
        assert_eq!(yaml_serde::to_string(&back).unwrap(), text);
    }

    #[test]
    fn a_missing_or_empty_section_is_its_default() {
        let c: Config = yaml_serde::from_str("health: {}\nlimits:\n  max_headers: 7\n").unwrap();
        assert_eq!(
            format!("{:?}", c.health),
            format!("{:?}", Health::default())
        );
        assert_eq!(
            format!("{:?}", c.retries),
            format!("{:?}", Retries::default())
        );
        assert_eq!(c.limits.max_headers, 7);
        assert_eq!(c.limits.max_body, Limits::default().max_body);
    }

    #[test]
    fn list_items_require_a_name_and_default_the_rest() {
        let c: Config = yaml_serde::from_str("instances:\n  - name: a\n").unwrap();
        assert_eq!(c.instances[0].num_parallel, 1);
        let c: Config = yaml_serde::from_str("auth:\n  keys:\n    - name: k\n").unwrap();
        assert_eq!(c.auth.keys[0].models, ["*"]);
        assert_eq!(c.auth.keys[0].routes, ["inference", "metadata", "other"]);
        let e = yaml_serde::from_str::<Config>("instances:\n  - url: x:1\n").unwrap_err();
        assert!(e.to_string().contains("missing field `name`"), "{e}");
    }
}
