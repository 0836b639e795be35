//! Configuration: the YAML file's shape (`FileConfig`, which is also what `check` prints), the
//! environment overrides, and validation into the typed `Config` the services are built from.
//! Nothing else reads the file; every error names the file, the key path and what was expected.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The configuration used without `--config` or `OLLAMA_SIDECAR_CONFIG`: the working
/// directory's `conf/sidecar.yaml` when it exists (a checkout), else [`SYSTEM_CONFIG_PATH`].
pub const DEFAULT_CONFIG_PATH: &str = "conf/sidecar.yaml";
pub const SYSTEM_CONFIG_PATH: &str = "/etc/ollama-sidecar/sidecar.yaml";

/// The configuration file to read when none is named (see [`DEFAULT_CONFIG_PATH`]).
pub fn default_config_path() -> PathBuf {
    let local = Path::new(DEFAULT_CONFIG_PATH);
    if local.is_file() {
        local.to_path_buf()
    } else {
        PathBuf::from(SYSTEM_CONFIG_PATH)
    }
}
pub const DEFAULT_LISTEN: &str = "127.0.0.1:11434";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:11435";
/// Ollama's own default port, used for an instance URL given as bare `host` without a scheme.
pub const OLLAMA_DEFAULT_PORT: u16 = 11434;

pub const ENV_CONFIG: &str = "OLLAMA_SIDECAR_CONFIG";
pub const ENV_LISTEN: &str = "OLLAMA_SIDECAR_LISTEN";
pub const ENV_ADMIN_LISTEN: &str = "OLLAMA_SIDECAR_ADMIN_LISTEN";

/// A configuration error: which file, which key, what was wrong.
#[derive(Debug)]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() || self.key == "." {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// The file's shape. Defaults are filled in by serde so that serialising a parsed file prints the
// effective configuration.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The proxy's listening address (`host:port`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Pingora worker threads; 0 means one per CPU core.
    #[serde(default)]
    pub threads: usize,
    #[serde(default)]
    pub admin: AdminFile,
    #[serde(default)]
    pub log: LogFile,
    #[serde(default)]
    pub timeouts: TimeoutsFile,
    #[serde(default)]
    pub shutdown: ShutdownFile,
    #[serde(default)]
    pub admission: AdmissionFile,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub health: HealthFile,
    #[serde(default)]
    pub retries: RetriesFile,
    /// API keys (off when empty).
    #[serde(default)]
    pub auth: AuthFile,
    /// Model allow-list, route policy and per-client rate limits, keys or not.
    #[serde(default)]
    pub policy: PolicyFile,
    /// CORS answered by the sidecar (off when `origins` is empty).
    #[serde(default)]
    pub cors: CorsFile,
    /// Limits counted in Redis, shared by every sidecar that points at it (off without `redis`).
    #[serde(default)]
    pub shared_state: SharedStateFile,
    #[serde(default)]
    pub instances: Vec<InstanceFile>,
}

/// How the sidecar watches its instances.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    /// Active check (`GET /api/version`, never inference) of external instances; supervised
    /// instances are checked by the supervisor's liveness probe.
    #[serde(default = "default_health_interval", with = "duration_text")]
    pub interval: Duration,
    #[serde(default = "default_health_timeout", with = "duration_text")]
    pub timeout: Duration,
    /// Consecutive successful checks that bring an unhealthy instance back.
    #[serde(default = "default_rise")]
    pub rise: usize,
    /// Consecutive failed checks that take an instance out of rotation.
    #[serde(default = "default_fall")]
    pub fall: usize,
    /// How often each ready instance's `/api/ps` is read to learn its loaded models.
    #[serde(default = "default_models_interval", with = "duration_text")]
    pub models_interval: Duration,
    #[serde(default)]
    pub passive: PassiveFile,
}

impl Default for HealthFile {
    fn default() -> Self {
        HealthFile {
            interval: default_health_interval(),
            timeout: default_health_timeout(),
            rise: default_rise(),
            fall: default_fall(),
            models_interval: default_models_interval(),
            passive: PassiveFile::default(),
        }
    }
}

/// Ejection of an instance on errors seen in real traffic.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveFile {
    /// Consecutive failures (connect errors, resets, 5xx, timeouts) that eject an instance.
    #[serde(default = "default_passive_failures")]
    pub failures: u32,
    /// First cool-down; it doubles each time the half-open trial request fails.
    #[serde(default = "default_cooldown", with = "duration_text")]
    pub cooldown: Duration,
    #[serde(default = "default_max_cooldown", with = "duration_text")]
    pub max_cooldown: Duration,
}

impl Default for PassiveFile {
    fn default() -> Self {
        PassiveFile {
            failures: default_passive_failures(),
            cooldown: default_cooldown(),
            max_cooldown: default_max_cooldown(),
        }
    }
}

/// Retries of requests that failed before the client saw a byte.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetriesFile {
    /// Attempts in all, the first included; 1 disables retries.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First backoff before a retry; doubles per attempt, with jitter.
    #[serde(default = "default_retry_backoff", with = "duration_text")]
    pub backoff: Duration,
    #[serde(default = "default_retry_max_backoff", with = "duration_text")]
    pub max_backoff: Duration,
    /// Retries may be at most this share of requests over `budget_window` ...
    #[serde(default = "default_budget_ratio")]
    pub budget_ratio: f64,
    #[serde(default = "default_budget_window", with = "duration_text")]
    pub budget_window: Duration,
    /// ... but this many retries per window are always allowed.
    #[serde(default = "default_budget_min")]
    pub budget_min: u32,
}

impl Default for RetriesFile {
    fn default() -> Self {
        RetriesFile {
            max_attempts: default_max_attempts(),
            backoff: default_retry_backoff(),
            max_backoff: default_retry_max_backoff(),
            budget_ratio: default_budget_ratio(),
            budget_window: default_budget_window(),
            budget_min: default_budget_min(),
        }
    }
}

/// The inference queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionFile {
    /// Requests waiting for a slot, at most; beyond it: 503 with `Retry-After`.
    #[serde(default = "default_max_queued")]
    pub max_queued: usize,
    /// Request bodies held by waiting requests, at most (`1GiB`, `512MiB`, or bytes).
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: ByteSize,
    /// Longest wait for a slot; beyond it: 503 with `Retry-After`.
    #[serde(default = "default_max_wait", with = "duration_text")]
    pub max_wait: Duration,
    /// Each `aging` waited raises a request's priority by one level, so nothing starves.
    #[serde(default = "default_aging", with = "duration_text")]
    pub aging: Duration,
    /// A header that names the client for fairness (e.g. `X-Client-Id`); unset: the client address.
    #[serde(default)]
    pub client_id_header: Option<String>,
    /// A header carrying an integer priority (higher first), e.g. `X-Priority`; unset: ignored.
    #[serde(default)]
    pub priority_header: Option<String>,
    /// Priority by client identity (an address, an `X-Client-Id` value, or a key name).
    #[serde(default)]
    pub priorities: BTreeMap<String, i32>,
    /// Model-management requests (pull, push, create, copy, delete, blobs) running at once.
    #[serde(default = "default_management_concurrency")]
    pub management_concurrency: usize,
}

impl Default for AdmissionFile {
    fn default() -> Self {
        AdmissionFile {
            max_queued: default_max_queued(),
            max_queued_bytes: default_max_queued_bytes(),
            max_wait: default_max_wait(),
            aging: default_aging(),
            client_id_header: None,
            priority_header: None,
            priorities: BTreeMap::new(),
            management_concurrency: default_management_concurrency(),
        }
    }
}

/// Limits on what clients send.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Largest JSON request body read to route it (inference routes); beyond it: 413.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// The request line and header fields together, at most; beyond it: 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: ByteSize,
    /// Header fields, at most; beyond it: 431.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// The request target (path and query), at most; beyond it: 414.
    #[serde(default = "default_max_uri_bytes")]
    pub max_uri_bytes: ByteSize,
    /// Longest silence while a request body is read; then 408 and the connection closes.
    #[serde(default = "default_body_read_timeout", with = "duration_text")]
    pub body_read_timeout: Duration,
}

impl Default for LimitsFile {
    fn default() -> Self {
        LimitsFile {
            max_body: default_max_body(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            max_uri_bytes: default_max_uri_bytes(),
            body_read_timeout: default_body_read_timeout(),
        }
    }
}

/// A byte count written as a number or with a unit: `64MiB`, `1GiB`, `512KiB`, `10MB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("expected a size like `64MiB` or `1048576`, got `{text}`"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown size unit `{other}`; use B, KiB, MiB, GiB, KB, MB or GB"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{text}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= size && n.is_multiple_of(size) {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// The units a duration may be written in, for every duration error.
pub const DURATION_UNITS: &str =
    "units: ms, s, m (minutes), h, d; e.g. `500ms`, `30s`, `2m`, `1h 30m`";

/// Parses a duration such as `30s` or `1h 30m`. Month and year units are refused: humantime
/// reads `10M` as ten months, which in a timeout is always a typo for `10m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|_| format!("expected a duration, got `{text}` ({DURATION_UNITS})"))?;
    let calendar = text.split(|c: char| !c.is_alphabetic()).find(|unit| {
        matches!(
            *unit,
            "M" | "month" | "months" | "y" | "yr" | "yrs" | "year" | "years"
        )
    });
    match calendar {
        Some(unit) => Err(format!(
            "`{text}`: `{unit}` is a month or year unit, refused here (minutes are `m`; {DURATION_UNITS})"
        )),
        None => Ok(duration),
    }
}

/// Serde for duration keys: humantime's text, with [`parse_duration`]'s checks and messages.
pub mod duration_text {
    use serde::de::{self, Visitor};
    use std::fmt;
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(d, s)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a duration like `30s` ({})", super::DURATION_UNITS)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            super::parse_duration(v).map_err(E::custom)
        }
    }

    /// The same for an optional duration (`null` or absent: none).
    pub mod option {
        use std::time::Duration;

        pub fn serialize<S: serde::Serializer>(
            d: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            humantime_serde::serialize(d, s)
        }

        pub fn deserialize<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            #[derive(serde::Deserialize)]
            struct Text(#[serde(with = "super")] Duration);
            let text: Option<Text> = serde::Deserialize::deserialize(d)?;
            Ok(text.map(|t| t.0))
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`, `/status`).
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// SHA-256 (hex) of a token `/metrics` and `/status` require (`Authorization: Bearer`).
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// Or: an environment variable holding that token.
    #[serde(default)]
    pub token_env: Option<String>,
}

impl Default for AdminFile {
    fn default() -> Self {
        AdminFile {
            listen: default_admin_listen(),
            token_sha256: None,
            token_env: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    /// A tracing filter (`info`, `debug`, `ollama_sidecar=debug,pingora=warn`). `RUST_LOG` wins.
    #[serde(default = "default_log_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
    /// One access-log line per request (target `access`, at info level).
    #[serde(default = "default_true")]
    pub access: bool,
}

impl Default for LogFile {
    fn default() -> Self {
        LogFile {
            level: default_log_level(),
            format: LogFormat::Text,
            access: true,
        }
    }
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsFile {
    /// TCP connect to an instance.
    #[serde(default = "default_connect_timeout", with = "duration_text")]
    pub connect: Duration,
    /// From the request sent to the response header: long, because a cold model load takes minutes.
    #[serde(default = "default_response_header_timeout", with = "duration_text")]
    pub response_header: Duration,
    /// Longest silence between two streamed chunks; off by default (a pull can be silent for long).
    #[serde(default, with = "duration_text::option")]
    pub idle: Option<Duration>,
}

impl Default for TimeoutsFile {
    fn default() -> Self {
        TimeoutsFile {
            connect: default_connect_timeout(),
            response_header: default_response_header_timeout(),
            idle: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownFile {
    /// On SIGTERM/SIGINT: how long in-flight requests may finish before they are cut.
    #[serde(default = "default_drain_timeout", with = "duration_text")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownFile {
    fn default() -> Self {
        ShutdownFile {
            drain_timeout: default_drain_timeout(),
        }
    }
}

/// One Ollama instance: external (`url`) or supervised (`port`, `command`, ...).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceFile {
    pub name: String,
    /// An Ollama the sidecar does not manage: `http://host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Concurrent inference requests this instance is given (its `OLLAMA_NUM_PARALLEL`).
    #[serde(default = "default_num_parallel")]
    pub num_parallel: usize,

    // Supervised-only keys.
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
    pub restart: Option<RestartFile>,
    #[serde(
        default,
        with = "duration_text::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub stop_grace: Option<Duration>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartFile {
    #[serde(default = "default_backoff_initial", with = "duration_text")]
    pub initial_backoff: Duration,
    #[serde(default = "default_backoff_max", with = "duration_text")]
    pub max_backoff: Duration,
    /// A run this long resets the backoff.
    #[serde(default = "default_stable_after", with = "duration_text")]
    pub stable_after: Duration,
    /// Restarts in a row without a stable run before the state is shown as `crashloop`.
    #[serde(default = "default_crashloop_after")]
    pub crashloop_after: u32,
    /// Failed liveness checks in a row that restart a running instance.
    #[serde(default = "default_liveness_failures")]
    pub liveness_failures: u32,
}

impl Default for RestartFile {
    fn default() -> Self {
        RestartFile {
            initial_backoff: default_backoff_initial(),
            max_backoff: default_backoff_max(),
            stable_after: default_stable_after(),
            crashloop_after: default_crashloop_after(),
            liveness_failures: default_liveness_failures(),
        }
    }
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_string()
}
fn default_admin_listen() -> String {
    DEFAULT_ADMIN_LISTEN.to_string()
}
fn default_log_level() -> String {
    "info".to_string()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_response_header_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_health_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_rise() -> usize {
    2
}
fn default_fall() -> usize {
    3
}
fn default_passive_failures() -> u32 {
    3
}
fn default_cooldown() -> Duration {
    Duration::from_secs(5)
}
fn default_max_cooldown() -> Duration {
    Duration::from_secs(60)
}
fn default_max_attempts() -> u32 {
    3
}
fn default_retry_backoff() -> Duration {
    Duration::from_millis(100)
}
fn default_retry_max_backoff() -> Duration {
    Duration::from_secs(2)
}
fn default_budget_ratio() -> f64 {
    0.2
}
fn default_budget_window() -> Duration {
    Duration::from_secs(10)
}
fn default_budget_min() -> u32 {
    3
}
fn default_models_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_max_queued() -> usize {
    1024
}
fn default_max_queued_bytes() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_max_wait() -> Duration {
    Duration::from_secs(600)
}
fn default_aging() -> Duration {
    Duration::from_secs(30)
}
fn default_management_concurrency() -> usize {
    2
}
fn default_max_body() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_num_parallel() -> usize {
    1
}
fn default_backoff_initial() -> Duration {
    Duration::from_millis(500)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(60)
}
fn default_stable_after() -> Duration {
    Duration::from_secs(60)
}
fn default_crashloop_after() -> u32 {
    5
}
fn default_liveness_failures() -> u32 {
    3
}

// ---------------------------------------------------------------------------------------------
// Access control (src/policy/): API keys, model and route policy, CORS. All off by default.
// ---------------------------------------------------------------------------------------------

/// API keys. Empty `keys`: no authentication (Ollama's own behaviour).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    #[serde(default)]
    pub keys: Vec<ApiKeyFile>,
    /// With keys configured: let requests without a key use metadata routes (`/`, version,
    /// tags, ps, show, `/v1/models`). A wrong key is refused everywhere.
    #[serde(default)]
    pub allow_anonymous_metadata: bool,
}

/// One API key: where its secret comes from (a hash, an environment variable or a file; never
/// the key itself in the file) and what it may do.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyFile {
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
    #[serde(default = "default_key_models")]
    pub models: Vec<String>,
    /// Route classes this key may use: inference, metadata, management, other.
    #[serde(default = "default_key_routes")]
    pub routes: Vec<String>,
    /// May use model management (pull, push, create, copy, delete, blobs).
    #[serde(default)]
    pub admin: bool,
}

/// Policy for every request, with or without keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Models anyone may use (glob patterns); empty: every model.
    #[serde(default)]
    pub models: Vec<String>,
    /// Route classes refused to everyone (403): inference, metadata, management, other.
    #[serde(default)]
    pub deny_classes: Vec<String>,
    /// Requests per minute per client address, for requests without an API key.
    #[serde(default)]
    pub requests_per_minute_per_client: Option<u32>,
}

/// CORS answered by the sidecar for these origins.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsFile {
    /// Exact origins (`https://app.example.com`) or `*`; empty: CORS passes through to Ollama.
    #[serde(default)]
    pub origins: Vec<String>,
    /// `Access-Control-Max-Age` of preflight answers.
    #[serde(default = "default_cors_max_age", with = "duration_text")]
    pub max_age: Duration,
}

impl Default for CorsFile {
    fn default() -> Self {
        CorsFile {
            origins: Vec::new(),
            max_age: default_cors_max_age(),
        }
    }
}

/// Where the API keys' and the per-address limits are counted when several sidecars enforce them
/// together (`src/shared_state.rs`, `src/policy/shared_limits.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedStateFile {
    /// `redis://[user:password@]host:port[/db]` or `unix:///path`; unset: limits are this
    /// process's own. `check` prints the password as `***`.
    #[serde(default, serialize_with = "serialize_redacted_url")]
    pub redis: Option<String>,
    /// Prepended to every Redis key the sidecar writes.
    #[serde(default = "default_shared_prefix")]
    pub prefix: String,
    /// Longest wait for one Redis call on the request path; then `on_error` decides.
    #[serde(default = "default_shared_timeout", with = "duration_text")]
    pub timeout: Duration,
    /// Longest wait to (re)connect.
    #[serde(default = "default_shared_connect_timeout", with = "duration_text")]
    pub connect_timeout: Duration,
    /// While Redis is down or slow: `open` (each sidecar applies the limits alone) or `closed`
    /// (limited requests get 503).
    #[serde(default)]
    pub on_error: OnSharedError,
    /// A concurrency slot not renewed for this long (its sidecar died) is given back.
    #[serde(default = "default_lease_ttl", with = "duration_text")]
    pub lease_ttl: Duration,
}

impl Default for SharedStateFile {
    fn default() -> Self {
        SharedStateFile {
            redis: None,
            prefix: default_shared_prefix(),
            timeout: default_shared_timeout(),
            connect_timeout: default_shared_connect_timeout(),
            on_error: OnSharedError::default(),
            lease_ttl: default_lease_ttl(),
        }
    }
}

/// What limited requests get while the shared state cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnSharedError {
    /// Decided by this sidecar's own counters (logged, counted in metrics).
    #[default]
    Open,
    /// Refused with 503.
    Closed,
}

fn default_shared_prefix() -> String {
    "ollama-sidecar:".to_string()
}
fn default_shared_timeout() -> Duration {
    Duration::from_millis(50)
}
fn default_shared_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(30)
}

/// A Redis URL with its password (if any) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((user_info, host)) if !user_info.contains('/') => {
            let user = user_info.split_once(':').map_or(user_info, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_string(),
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

fn validate_shared_state(
    file: &SharedStateFile,
    source: &str,
) -> Result<Option<SharedStateFile>, ConfigError> {
    let Some(url) = &file.redis else {
        return Ok(None);
    };
    let supported = ["redis://", "unix://", "redis+unix://"];
    if !supported.iter().any(|s| url.starts_with(s)) {
        return Err(err(
            source,
            "shared_state.redis",
            format!(
                "`{}`: expected redis://host:port[/db] or unix:///path",
                redact_url(url)
            ),
        ));
    }
    if let Err(e) = redis::Client::open(url.as_str()) {
        return Err(err(source, "shared_state.redis", format!("{e}")));
    }
    if file.timeout.is_zero() || file.connect_timeout.is_zero() {
        return Err(err(
            source,
            "shared_state",
            "`timeout` and `connect_timeout` must be above zero",
        ));
    }
    if file.lease_ttl < Duration::from_secs(1) {
        return Err(err(
            source,
            "shared_state.lease_ttl",
            "expected at least 1s (leases are renewed every third of it)",
        ));
    }
    Ok(Some(file.clone()))
}

fn default_key_models() -> Vec<String> {
    vec!["*".to_string()]
}
fn default_key_routes() -> Vec<String> {
    vec![
        "inference".to_string(),
        "metadata".to_string(),
        "other".to_string(),
    ]
}
fn default_cors_max_age() -> Duration {
    Duration::from_secs(600)
}
fn default_max_header_bytes() -> ByteSize {
    ByteSize(64 << 10)
}
fn default_max_headers() -> usize {
    100
}
fn default_max_uri_bytes() -> ByteSize {
    ByteSize(8 << 10)
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The route classes a key or policy may name.
pub const ROUTE_CLASSES: &[&str] = &["inference", "metadata", "management", "other"];

/// A validated API key: its secret only as a SHA-256.
#[derive(Clone)]
pub struct ApiKey {
    pub name: String,
    pub sha256: [u8; 32],
    pub priority: i32,
    pub max_concurrent: Option<u32>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub models: Vec<String>,
    /// Route classes allowed (names from [`ROUTE_CLASSES`]); `management` only with `admin`.
    pub routes: Vec<String>,
    pub admin: bool,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

/// The validated access-control configuration.
#[derive(Debug, Clone, Default)]
pub struct AccessConfig {
    pub keys: Vec<ApiKey>,
    pub allow_anonymous_metadata: bool,
    pub policy: PolicyFile,
    pub cors: CorsFile,
    /// SHA-256 of the admin token, when `/metrics` and `/status` need one.
    pub admin_token: Option<[u8; 32]>,
    /// Where limits are counted together with other sidecars; `None`: in this process.
    pub shared_state: Option<SharedStateFile>,
}

/// SHA-256 of a secret.
pub fn sha256(secret: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(secret).into()
}

fn parse_sha256_hex(text: &str) -> Option<[u8; 32]> {
    let t = text.trim();
    if t.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in t.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Shortest key accepted from an environment variable or a file.
pub const MIN_KEY_LEN: usize = 16;

fn key_from_env(source: &str, key: &str, var: &str) -> Result<[u8; 32], ConfigError> {
    match std::env::var(var) {
        Ok(v) if v.trim().len() >= MIN_KEY_LEN => Ok(sha256(v.trim().as_bytes())),
        Ok(v) if v.trim().is_empty() => Err(err(
            source,
            key,
            format!("environment variable `{var}` is empty; expected the key"),
        )),
        Ok(_) => Err(err(
            source,
            key,
            format!("the key in `{var}` is too short; expected at least {MIN_KEY_LEN} characters"),
        )),
        Err(_) => Err(err(
            source,
            key,
            format!("environment variable `{var}` is not set; expected the key"),
        )),
    }
}

/// Stands in for a secret not read (`Secrets::Skip`): checks the variable name or path is usable
/// and returns a digest no real key has (it hashes the key path), so keys stay distinct.
fn unread_secret(source: &str, key: &str, name: &str) -> Result<[u8; 32], ConfigError> {
    if name.trim().is_empty()
        || name.contains('\0')
        || (key.ends_with("_env") && name.contains('='))
    {
        return Err(err(
            source,
            key,
            format!("`{name}` is not a valid environment variable name or path"),
        ));
    }
    Ok(sha256(format!("\0unread secret of {key}").as_bytes()))
}

fn check_globs(source: &str, key: &str, patterns: &[String]) -> Result<(), ConfigError> {
    for (i, p) in patterns.iter().enumerate() {
        if p.trim().is_empty() || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err(
                source,
                format!("{key}[{i}]"),
                format!("`{p}`: expected a model name pattern such as `llama3.2:*` (no spaces)"),
            ));
        }
    }
    Ok(())
}

fn check_classes(source: &str, key: &str, classes: &[String]) -> Result<(), ConfigError> {
    for (i, c) in classes.iter().enumerate() {
        if !ROUTE_CLASSES.contains(&c.as_str()) {
            return Err(err(
                source,
                format!("{key}[{i}]"),
                format!("`{c}`: expected one of {}", ROUTE_CLASSES.join(", ")),
            ));
        }
    }
    Ok(())
}

/// Validates `auth`, `policy`, `cors`, the new `limits` keys and the admin token.
fn validate_access(
    file: &FileConfig,
    source: &str,
    secrets: Secrets,
) -> Result<AccessConfig, ConfigError> {
    let limits = &file.limits;
    if limits.max_header_bytes.0 < 1024 || limits.max_header_bytes.0 > 1 << 20 {
        return Err(err(
            source,
            "limits.max_header_bytes",
            "expected 1KiB to 1MiB (Pingora's own limit)",
        ));
    }
    if limits.max_headers == 0 || limits.max_headers > 256 {
        return Err(err(
            source,
            "limits.max_headers",
            "expected 1 to 256 (Pingora's own limit)",
        ));
    }
    if limits.max_uri_bytes.0 < 256 || limits.max_uri_bytes.0 > limits.max_header_bytes.0 {
        return Err(err(
            source,
            "limits.max_uri_bytes",
            "expected 256 bytes up to limits.max_header_bytes",
        ));
    }
    if limits.body_read_timeout < Duration::from_millis(100) {
        return Err(err(
            source,
            "limits.body_read_timeout",
            "must be at least 100ms",
        ));
    }

    let mut keys: Vec<ApiKey> = Vec::with_capacity(file.auth.keys.len());
    for (i, k) in file.auth.keys.iter().enumerate() {
        let key = |field: &str| format!("auth.keys[{i}].{field}");
        if k.name.is_empty()
            || k.name.len() > 64
            || !k
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            return Err(err(
                source,
                key("name"),
                format!(
                    "`{}`: expected 1 to 64 letters, digits, `-`, `_`, `.` or `@` (it is logged)",
                    k.name
                ),
            ));
        }
        if let Some(j) = keys.iter().position(|o| o.name == k.name) {
            return Err(err(
                source,
                key("name"),
                format!("`{}` is already the name of auth.keys[{j}]", k.name),
            ));
        }
        let sha = match (&k.sha256, &k.key_env, &k.key_file) {
            (Some(hex), None, None) => parse_sha256_hex(hex).ok_or_else(|| {
                err(
                    source,
                    key("sha256"),
                    "expected 64 hex digits: the SHA-256 of the key (`printf %s \"$KEY\" | sha256sum`)",
                )
            })?,
            (None, Some(var), None) if secrets == Secrets::Skip => {
                unread_secret(source, &key("key_env"), var)?
            }
            (None, Some(var), None) => key_from_env(source, &key("key_env"), var)?,
            (None, None, Some(path)) if secrets == Secrets::Skip => {
                unread_secret(source, &key("key_file"), &path.display().to_string())?
            }
            (None, None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    err(
                        source,
                        key("key_file"),
                        format!("cannot read `{}`: {e}", path.display()),
                    )
                })?;
                let secret = text.trim();
                if secret.len() < MIN_KEY_LEN {
                    return Err(err(
                        source,
                        key("key_file"),
                        format!(
                            "`{}`: expected a key of at least {MIN_KEY_LEN} characters",
                            path.display()
                        ),
                    ));
                }
                sha256(secret.as_bytes())
            }
            _ => {
                return Err(err(
                    source,
                    format!("auth.keys[{i}]"),
                    "expected exactly one of `sha256`, `key_env` or `key_file`",
                ))
            }
        };
        if let Some(j) = keys.iter().position(|o| o.sha256 == sha) {
            return Err(err(
                source,
                format!("auth.keys[{i}]"),
                format!("the same key as auth.keys[{j}]"),
            ));
        }
        if !(-100..=100).contains(&k.priority) {
            return Err(err(source, key("priority"), "expected -100 to 100"));
        }
        for (field, zero) in [
            ("max_concurrent", k.max_concurrent == Some(0)),
            ("requests_per_minute", k.requests_per_minute == Some(0)),
            ("tokens_per_minute", k.tokens_per_minute == Some(0)),
        ] {
            if zero {
                return Err(err(
                    source,
                    key(field),
                    "must be at least 1 (leave it out for no limit)",
                ));
            }
        }
        if k.models.is_empty() {
            return Err(err(
                source,
                key("models"),
                "expected at least one pattern (`*` for every model)",
            ));
        }
        check_globs(source, &key("models"), &k.models)?;
        check_classes(source, &key("routes"), &k.routes)?;
        let mut routes = k.routes.clone();
        if routes.iter().any(|r| r == "management") && !k.admin {
            return Err(err(
                source,
                key("routes"),
                "`management` needs `admin: true` on this key",
            ));
        }
        if k.admin && !routes.iter().any(|r| r == "management") {
            routes.push("management".to_string());
        }
        keys.push(ApiKey {
            name: k.name.clone(),
            sha256: sha,
            priority: k.priority,
            max_concurrent: k.max_concurrent,
            requests_per_minute: k.requests_per_minute,
            tokens_per_minute: k.tokens_per_minute,
            models: k.models.clone(),
            routes,
            admin: k.admin,
        });
    }
    if file.auth.allow_anonymous_metadata && keys.is_empty() {
        return Err(err(
            source,
            "auth.allow_anonymous_metadata",
            "only means something with `auth.keys`",
        ));
    }

    let policy = &file.policy;
    check_globs(source, "policy.models", &policy.models)?;
    check_classes(source, "policy.deny_classes", &policy.deny_classes)?;
    if policy.requests_per_minute_per_client == Some(0) {
        return Err(err(
            source,
            "policy.requests_per_minute_per_client",
            "must be at least 1 (leave it out for no limit)",
        ));
    }

    for (i, o) in file.cors.origins.iter().enumerate() {
        let ok = o == "*"
            || ((o.starts_with("http://") || o.starts_with("https://"))
                && !o.ends_with('/')
                && o.bytes().all(|b| b.is_ascii_graphic()));
        if !ok {
            return Err(err(
                source,
                format!("cors.origins[{i}]"),
                format!("`{o}`: expected `*` or an origin like `https://app.example.com` (scheme and host, no path)"),
            ));
        }
    }

    let admin_token = match (&file.admin.token_sha256, &file.admin.token_env) {
        (None, None) => None,
        (Some(hex), None) => Some(parse_sha256_hex(hex).ok_or_else(|| {
            err(
                source,
                "admin.token_sha256",
                "expected 64 hex digits: the SHA-256 of the token",
            )
        })?),
        (None, Some(var)) if secrets == Secrets::Skip => {
            Some(unread_secret(source, "admin.token_env", var)?)
        }
        (None, Some(var)) => Some(key_from_env(source, "admin.token_env", var)?),
        (Some(_), Some(_)) => {
            return Err(err(
                source,
                "admin",
                "expected one of `token_sha256` or `token_env`, not both",
            ))
        }
    };

    Ok(AccessConfig {
        keys,
        allow_anonymous_metadata: file.auth.allow_anonymous_metadata,
        policy: policy.clone(),
        cors: file.cors.clone(),
        admin_token,
        shared_state: validate_shared_state(&file.shared_state, source)?,
    })
}

pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// Ollama's own queue is kept small: queueing belongs to the sidecar.
pub const DEFAULT_OLLAMA_MAX_QUEUE: usize = 4;

// ---------------------------------------------------------------------------------------------
// The validated configuration.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration came from (for messages).
    pub source: String,
    pub listen: SocketAddr,
    pub threads: usize,
    pub admin_listen: SocketAddr,
    pub log: LogFile,
    pub timeouts: TimeoutsFile,
    pub drain_timeout: Duration,
    pub admission: AdmissionFile,
    pub limits: LimitsFile,
    pub health: HealthFile,
    pub retries: RetriesFile,
    pub instances: Vec<InstanceConfig>,
    /// API keys, model and route policy, CORS, the admin token (`src/policy/`).
    pub access: AccessConfig,
    /// The effective file configuration (defaults and overrides applied), for `check`.
    pub effective: FileConfig,
}

#[derive(Debug, Clone)]
pub struct InstanceConfig {
    pub name: String,
    pub upstream: UpstreamAddress,
    pub num_parallel: usize,
    pub supervised: Option<SupervisedSpec>,
}

/// Where to reach an instance, as the operator wrote it: an IP address or a host name (resolved
/// by the instance watch, `src/upstream/resolve.rs`), a port, and whether it speaks TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAddress {
    /// An IP literal (IPv6 without brackets) or a DNS name.
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl UpstreamAddress {
    /// The `host:port` authority as written (`[v6]:port` for IPv6), the default `Host` header.
    pub fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The address itself when the host is an IP literal (nothing to resolve).
    pub fn literal(&self) -> Option<std::net::SocketAddr> {
        self.host
            .parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| std::net::SocketAddr::new(ip, self.port))
    }
}

/// Checks a host written in an instance URL: an IPv4 address or a DNS name (letters, digits, `-`,
/// `_`; labels of 1 to 63 characters, 253 in all, an optional final dot). IPv6 goes in brackets.
fn check_host_name(host: &str) -> Result<(), String> {
    if host.contains(':') {
        return Err(format!("an IPv6 address goes in brackets: `[{host}]:port`"));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "`{host}` is not a host name (letters, digits, `-` and `_` in dot-separated labels) or an IP address"
        ));
    }
    Ok(())
}

impl fmt::Display for UpstreamAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.host_header())
    }
}

/// How to run one supervised `ollama serve`.
#[derive(Debug, Clone)]
pub struct SupervisedSpec {
    pub command: String,
    pub args: Vec<String>,
    pub port: u16,
    /// Merged over the sidecar's own environment; the sidecar's `OLLAMA_*` settings are applied last.
    pub env: BTreeMap<String, String>,
    pub num_parallel: usize,
    pub max_queue: usize,
    pub models_dir: Option<PathBuf>,
    pub gpus: Option<String>,
    pub keep_alive: Option<String>,
    pub warmup: Vec<String>,
    pub log_file: Option<PathBuf>,
    pub start_timeout: Duration,
    pub stop_grace: Duration,
    pub restart: RestartFile,
}

/// Overrides from the environment and the command line, applied over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    /// Where `listen` came from (`--listen`, `OLLAMA_SIDECAR_LISTEN`), so errors blame it.
    pub listen_from: Option<&'static str>,
    pub admin_listen_from: Option<&'static str>,
}

impl Overrides {
    /// Reads `OLLAMA_SIDECAR_LISTEN` and `OLLAMA_SIDECAR_ADMIN_LISTEN`.
    pub fn from_env() -> Self {
        let listen = std::env::var(ENV_LISTEN).ok().filter(|v| !v.is_empty());
        let admin_listen = std::env::var(ENV_ADMIN_LISTEN)
            .ok()
            .filter(|v| !v.is_empty());
        Overrides {
            listen_from: listen.as_ref().map(|_| ENV_LISTEN),
            admin_listen_from: admin_listen.as_ref().map(|_| ENV_ADMIN_LISTEN),
            listen,
            admin_listen,
        }
    }

    /// Later values win.
    pub fn merge(mut self, other: Overrides) -> Self {
        if other.listen.is_some() {
            self.listen = other.listen;
            self.listen_from = other.listen_from;
        }
        if other.admin_listen.is_some() {
            self.admin_listen = other.admin_listen;
            self.admin_listen_from = other.admin_listen_from;
        }
        self
    }
}

/// Whether validation reads the secrets the file points at (`key_env`, `key_file`,
/// `admin.token_env`). `Skip` checks only their form: for `check --no-secrets` in CI, never to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    Read,
    Skip,
}

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
    load_with(path, overrides, Secrets::Read)
}

/// [`load`], choosing whether secrets are read.
pub fn load_with(
    path: &Path,
    overrides: &Overrides,
    secrets: Secrets,
) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = read_file(path)?;
    parse_with(&text, &file, overrides, secrets)
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        key: String::new(),
        message: format!("cannot read the configuration file: {e}"),
    })
}

/// Parses and validates configuration text; `source` names it in errors.
pub fn parse(text: &str, source: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
    parse_with(text, source, overrides, Secrets::Read)
}

/// [`parse`], choosing whether secrets are read.
pub fn parse_with(
    text: &str,
    source: &str,
    overrides: &Overrides,
    secrets: Secrets,
) -> Result<Config, ConfigError> {
    let mut file = parse_file(text, source)?;
    if let Some(listen) = &overrides.listen {
        file.listen = listen.clone();
    }
    if let Some(listen) = &overrides.admin_listen {
        file.admin.listen = listen.clone();
    }
    validate(file, source, overrides, secrets)
}

/// The admin listener's address as `run` would bind it, reading nothing else: what `health`
/// needs. The override wins; the file (when read) must be YAML, but its other keys are ignored.
pub fn load_admin_listen(path: &Path, overrides: &Overrides) -> Result<SocketAddr, ConfigError> {
    #[derive(Deserialize)]
    struct AdminOnly {
        #[serde(default)]
        admin: AdminListenOnly,
    }
    #[derive(Deserialize)]
    struct AdminListenOnly {
        #[serde(default = "default_admin_listen")]
        listen: String,
    }
    impl Default for AdminListenOnly {
        fn default() -> Self {
            AdminListenOnly {
                listen: default_admin_listen(),
            }
        }
    }
    let source = path.display().to_string();
    let value = match &overrides.admin_listen {
        Some(listen) => listen.clone(),
        None => {
            let text = read_file(path)?;
            if text.trim().is_empty() {
                default_admin_listen()
            } else {
                deserialize_yaml::<AdminOnly>(&text, &source)?.admin.listen
            }
        }
    };
    listen_addr(&source, "admin.listen", overrides.admin_listen_from, &value)
}

fn parse_file(text: &str, source: &str) -> Result<FileConfig, ConfigError> {
    // An empty file is a valid configuration of defaults (and no instances, which validation rejects).
    if text.trim().is_empty() {
        return Err(ConfigError {
            file: source.to_string(),
            key: String::new(),
            message: "the file is empty; expected a mapping with at least `instances`".to_string(),
        });
    }
    deserialize_yaml(text, source)
}

/// Deserializes YAML text, rendering errors for an operator: one line, the key path, plain words.
fn deserialize_yaml<T: serde::de::DeserializeOwned>(
    text: &str,
    source: &str,
) -> Result<T, ConfigError> {
    let de = yaml_serde::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let tab_line = inner
            .location()
            .filter(|at| {
                text.lines()
                    .nth(at.line().saturating_sub(1))
                    .is_some_and(|l| l.contains('\t'))
            })
            .map(|at| at.line());
        let mut message = inner.to_string();
        // The YAML error repeats (part of) the key path as a prefix: keep it once.
        if let Some((prefix, rest)) = message.split_once(": ") {
            if !prefix.contains(char::is_whitespace) && key.starts_with(prefix) {
                message = rest.to_string();
            }
        }
        if let Some(line) = tab_line {
            if message.contains("cannot start any token") {
                message =
                    format!("line {line} holds a tab character; YAML indents with spaces only");
            }
        }
        ConfigError {
            file: source.to_string(),
            key,
            message: plain_type_words(&message),
        }
    })
}

/// Rewrites serde's type names (`expected u16`, `invalid type: string "abc"`) in an operator's
/// words: "expected a whole number from 0 to 65535, got `abc`".
fn plain_type_words(message: &str) -> String {
    let Some(rest) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
    else {
        return message.to_string();
    };
    let Some((got, expected)) = rest.split_once(", expected ") else {
        return message.to_string();
    };
    // yaml_serde appends the position: keep it after the rewritten words.
    let (expected, at) = match expected.find(" at line ") {
        Some(i) => expected.split_at(i),
        None => (expected, ""),
    };
    let expected = match expected {
        "u8" => "a whole number from 0 to 255",
        "u16" => "a whole number from 0 to 65535",
        "u32" | "u64" | "usize" => "a whole number (0 or more)",
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number",
        "f32" | "f64" => "a number such as `0.2`",
        "a boolean" => "`true` or `false`",
        "a string" => "text",
        "a sequence" => "a list (`- item` lines or `[a, b]`)",
        other => other,
    };
    let got = if let Some(s) = got.strip_prefix("string ") {
        format!("`{}`", s.trim_matches('"'))
    } else if let Some(n) = got
        .strip_prefix("integer ")
        .or_else(|| got.strip_prefix("floating point "))
    {
        format!("the number {}", n.trim_matches('`'))
    } else if got == "unit value" {
        "nothing (`null` or an empty value)".to_string()
    } else if let Some(b) = got.strip_prefix("boolean ") {
        b.trim_matches('`').to_string()
    } else {
        got.to_string()
    };
    format!("expected {expected}, got {got}{at}")
}

fn err(source: &str, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        file: source.to_string(),
        key: key.into(),
        message: message.into(),
    }
}

/// Parses a listening address: an IP address and port, or `localhost:port` (bound as
/// 127.0.0.1). Other host names are refused: a listener binds one address, and a name may
/// resolve to several or change.
pub fn parse_listen_addr(value: &str) -> Result<SocketAddr, String> {
    let value = value.trim();
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    let example = "expected an address like `127.0.0.1:11434` or `[::1]:11434`";
    match value.rsplit_once(':') {
        Some((host, port)) if host.eq_ignore_ascii_case("localhost") => port
            .parse::<u16>()
            .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
            .map_err(|_| format!("{example}, got `{value}` (bad port `{port}`)")),
        Some((host, port))
            if port.parse::<u16>().is_ok()
                && !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') =>
        {
            Err(format!(
                "`{value}`: `{host}` is a host name; a listener takes an IP address (`127.0.0.1:{port}` for this host only, `0.0.0.0:{port}` for every interface; `localhost` means 127.0.0.1)"
            ))
        }
        _ => Err(format!("{example}, got `{value}`")),
    }
}

/// An error about a listen address, blamed on the flag or variable it came from, if any.
fn listen_error(source: &str, key: &str, from: Option<&str>, message: String) -> ConfigError {
    match from {
        Some(from) => err(
            from,
            "",
            format!("{message} (it overrides `{key}` of {source})"),
        ),
        None => err(source, key, message),
    }
}

fn listen_addr(
    source: &str,
    key: &str,
    from: Option<&str>,
    value: &str,
) -> Result<SocketAddr, ConfigError> {
    parse_listen_addr(value).map_err(|m| listen_error(source, key, from, m))
}

/// Whether two listeners would fight over one port: the same address, or a wildcard
/// (`0.0.0.0`, `[::]`) that takes the port on the other's address too. Linux's `[::]` is
/// dual-stack by default, so it covers IPv4 addresses as well.
fn listeners_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |w: SocketAddr, o: SocketAddr| {
        w.ip().is_unspecified() && (w.is_ipv6() || w.is_ipv4() == o.is_ipv4())
    };
    a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// The level names a `log.level` directive may use.
const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// Checks a tracing filter. A bare word that is not a level is taken by tracing as a target
/// name with every level enabled for it and nothing else, so `infoo` would silence every log
/// line: bare words must be levels, targets are written `target=level`.
fn check_log_filter(filter: &str) -> Result<(), String> {
    let levels = LOG_LEVELS.join(", ");
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = match directive.rsplit_once('=') {
            Some((_, level)) => level,
            None if directive.contains("::") || directive.contains('[') => continue,
            None => directive,
        };
        if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "`{level}` in `{filter}` is not a level; expected one of {levels}, or `target=level` such as `ollama_sidecar=debug`"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(|_| ())
        .map_err(|e| {
            format!("expected a tracing filter such as `info` or `ollama_sidecar=debug`: {e}")
        })
}

/// The same Ollama listed twice (scheme, host and port compared without case): its slots
/// would count twice. A name and an address that resolve alike are not caught here.
fn same_upstream(a: &UpstreamAddress, b: &UpstreamAddress) -> bool {
    let host = |u: &UpstreamAddress| u.host.trim_end_matches('.').to_ascii_lowercase();
    a.tls == b.tls && a.port == b.port && host(a) == host(b)
}

fn validate(
    file: FileConfig,
    source: &str,
    overrides: &Overrides,
    secrets: Secrets,
) -> Result<Config, ConfigError> {
    let listen = listen_addr(source, "listen", overrides.listen_from, &file.listen)?;
    let admin_listen = listen_addr(
        source,
        "admin.listen",
        overrides.admin_listen_from,
        &file.admin.listen,
    )?;
    if listeners_overlap(listen, admin_listen) {
        let listen_named = match overrides.listen_from {
            Some(from) => format!("`listen` ({listen}, from {from})"),
            None => format!("`listen` ({listen})"),
        };
        let message = if listen == admin_listen {
            format!("must differ from {listen_named}")
        } else {
            format!(
                "{admin_listen} overlaps {listen_named}: a wildcard address takes port {} on every address; give the two listeners different ports",
                listen.port()
            )
        };
        return Err(listen_error(
            source,
            "admin.listen",
            overrides.admin_listen_from,
            message,
        ));
    }
    check_log_filter(&file.log.level).map_err(|m| err(source, "log.level", m))?;
    if file.timeouts.connect.is_zero() {
        return Err(err(source, "timeouts.connect", "must be greater than 0"));
    }
    if file.timeouts.response_header.is_zero() {
        return Err(err(
            source,
            "timeouts.response_header",
            "must be greater than 0",
        ));
    }
    if file.admission.max_queued == 0 {
        return Err(err(source, "admission.max_queued", "must be at least 1"));
    }
    if file.admission.max_wait.is_zero() {
        return Err(err(source, "admission.max_wait", "must be greater than 0"));
    }
    if file.admission.aging.is_zero() {
        return Err(err(source, "admission.aging", "must be greater than 0"));
    }
    if file.admission.management_concurrency == 0 {
        return Err(err(
            source,
            "admission.management_concurrency",
            "must be at least 1",
        ));
    }
    for (field, header) in [
        ("client_id_header", &file.admission.client_id_header),
        ("priority_header", &file.admission.priority_header),
    ] {
        if let Some(h) = header {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(err(
                    source,
                    format!("admission.{field}"),
                    format!("`{h}` is not a valid header name"),
                ));
            }
        }
    }
    let health = &file.health;
    if health.interval < Duration::from_millis(100) {
        return Err(err(source, "health.interval", "must be at least 100ms"));
    }
    if health.timeout.is_zero() {
        return Err(err(source, "health.timeout", "must be greater than 0"));
    }
    if health.rise == 0 || health.fall == 0 {
        return Err(err(
            source,
            "health",
            "`rise` and `fall` must be at least 1",
        ));
    }
    if health.passive.failures == 0 {
        return Err(err(source, "health.passive.failures", "must be at least 1"));
    }
    if health.passive.cooldown.is_zero() || health.passive.max_cooldown < health.passive.cooldown {
        return Err(err(
            source,
            "health.passive",
            "expected 0 < cooldown <= max_cooldown",
        ));
    }
    let retries = &file.retries;
    if retries.max_attempts == 0 {
        return Err(err(
            source,
            "retries.max_attempts",
            "must be at least 1 (1 disables retries)",
        ));
    }
    if retries.max_backoff < retries.backoff {
        return Err(err(source, "retries", "expected backoff <= max_backoff"));
    }
    if !(0.0..=1.0).contains(&retries.budget_ratio) {
        return Err(err(
            source,
            "retries.budget_ratio",
            "expected a number from 0 to 1",
        ));
    }
    if retries.budget_window.is_zero() {
        return Err(err(
            source,
            "retries.budget_window",
            "must be greater than 0",
        ));
    }
    if file.health.models_interval < Duration::from_millis(100) {
        return Err(err(
            source,
            "health.models_interval",
            "must be at least 100ms",
        ));
    }
    if file.limits.max_body.0 == 0 {
        return Err(err(source, "limits.max_body", "must be greater than 0"));
    }
    if file.instances.is_empty() {
        return Err(err(
            source,
            "instances",
            "expected at least one instance (an external `url`, or a supervised `port`)",
        ));
    }

    let mut instances = Vec::with_capacity(file.instances.len());
    for (i, inst) in file.instances.iter().enumerate() {
        let key = |field: &str| format!("instances[{i}].{field}");
        if inst.name.trim().is_empty() {
            return Err(err(source, key("name"), "expected a non-empty name"));
        }
        if !inst
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(err(
                source,
                key("name"),
                format!(
                    "`{}`: use letters, digits, `-`, `_` and `.` only (it becomes a metric label)",
                    inst.name
                ),
            ));
        }
        if let Some(j) = file.instances[..i].iter().position(|o| o.name == inst.name) {
            return Err(err(
                source,
                key("name"),
                format!("`{}` is already the name of instances[{j}]", inst.name),
            ));
        }
        if inst.num_parallel == 0 {
            return Err(err(source, key("num_parallel"), "must be at least 1"));
        }
        let supervised_keys: Vec<&str> = [
            ("command", inst.command.is_some()),
            ("args", inst.args.is_some()),
            ("port", inst.port.is_some()),
            ("env", !inst.env.is_empty()),
            ("models_dir", inst.models_dir.is_some()),
            ("gpus", inst.gpus.is_some()),
            ("keep_alive", inst.keep_alive.is_some()),
            ("warmup", !inst.warmup.is_empty()),
            ("log_file", inst.log_file.is_some()),
            ("max_queue", inst.max_queue.is_some()),
            ("start_timeout", inst.start_timeout.is_some()),
            ("restart", inst.restart.is_some()),
            ("stop_grace", inst.stop_grace.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();

        let (upstream, supervised) = match &inst.url {
            Some(url) => {
                if let Some(first) = supervised_keys.first() {
                    return Err(err(
                        source,
                        key(first),
                        "is a supervised-instance key, but this instance has a `url` (external instances are not started by the sidecar); remove one of them",
                    ));
                }
                let upstream = parse_instance_url(url)
                    .map_err(|m| err(source, key("url"), format!("`{url}`: {m}")))?;
                (upstream, None)
            }
            None => {
                let Some(port) = inst.port else {
                    return Err(err(
                        source,
                        format!("instances[{i}]"),
                        "expected either `url` (an external Ollama) or `port` (a supervised `ollama serve`)",
                    ));
                };
                if port == 0 {
                    return Err(err(source, key("port"), "must be between 1 and 65535"));
                }
                if let Some(j) = instances.iter().position(|o: &InstanceConfig| {
                    o.supervised.as_ref().map(|s| s.port) == Some(port)
                }) {
                    return Err(err(
                        source,
                        key("port"),
                        format!("port {port} is already used by supervised instances[{j}]"),
                    ));
                }
                if port == listen.port() || port == admin_listen.port() {
                    return Err(err(
                        source,
                        key("port"),
                        format!("port {port} is the sidecar's own listening port"),
                    ));
                }
                let command = inst.command.clone().unwrap_or_else(|| "ollama".to_string());
                if command.trim().is_empty() {
                    return Err(err(
                        source,
                        key("command"),
                        "expected a program name or path",
                    ));
                }
                for name in inst.env.keys() {
                    if name.is_empty() || name.contains('=') || name.contains('\0') {
                        return Err(err(
                            source,
                            format!("instances[{i}].env.{name}"),
                            "not a valid environment variable name",
                        ));
                    }
                }
                let restart = inst.restart.clone().unwrap_or_default();
                if restart.initial_backoff.is_zero()
                    || restart.max_backoff < restart.initial_backoff
                {
                    return Err(err(
                        source,
                        key("restart"),
                        "expected 0 < initial_backoff <= max_backoff",
                    ));
                }
                let spec = SupervisedSpec {
                    command,
                    args: inst
                        .args
                        .clone()
                        .unwrap_or_else(|| vec!["serve".to_string()]),
                    port,
                    env: inst.env.clone(),
                    num_parallel: inst.num_parallel,
                    max_queue: inst.max_queue.unwrap_or(DEFAULT_OLLAMA_MAX_QUEUE),
                    models_dir: inst.models_dir.clone(),
                    gpus: inst.gpus.clone(),
                    keep_alive: inst.keep_alive.clone(),
                    warmup: inst.warmup.clone(),
                    log_file: inst.log_file.clone(),
                    start_timeout: inst.start_timeout.unwrap_or(DEFAULT_START_TIMEOUT),
                    stop_grace: inst.stop_grace.unwrap_or(DEFAULT_STOP_GRACE),
                    restart,
                };
                let upstream = UpstreamAddress {
                    host: "127.0.0.1".to_string(),
                    port,
                    tls: false,
                };
                (upstream, Some(spec))
            }
        };
        if let Some(j) = instances
            .iter()
            .position(|o: &InstanceConfig| same_upstream(&o.upstream, &upstream))
        {
            let field = if inst.url.is_some() { "url" } else { "port" };
            return Err(err(
                source,
                key(field),
                format!(
                    "{upstream} is already instances[{j}] (`{}`): listed twice, its slots would count twice; list it once",
                    instances[j].name
                ),
            ));
        }
        if upstream.tls && !cfg!(feature = "rustls") {
            return Err(err(
                source,
                key("url"),
                "https:// upstreams need a build with `--features rustls`",
            ));
        }
        instances.push(InstanceConfig {
            name: inst.name.clone(),
            upstream,
            num_parallel: inst.num_parallel,
            supervised,
        });
    }

    let access = validate_access(&file, source, secrets)?;

    let threads = if file.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        file.threads
    };

    Ok(Config {
        source: source.to_string(),
        listen,
        threads,
        admin_listen,
        log: file.log.clone(),
        timeouts: file.timeouts.clone(),
        drain_timeout: file.shutdown.drain_timeout,
        admission: file.admission.clone(),
        limits: file.limits.clone(),
        health: file.health.clone(),
        retries: file.retries.clone(),
        instances,
        access,
        effective: file,
    })
}

/// Parses an external instance's URL: `http://host:port`, `https://host`, or a bare `host:port`
/// (Ollama's own `OLLAMA_HOST` convention: no scheme means http on port 11434).
pub fn parse_instance_url(url: &str) -> Result<UpstreamAddress, String> {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r),
        None => (String::new(), url),
    };
    let tls = match scheme.as_str() {
        "" | "http" => false,
        "https" => true,
        other => {
            return Err(format!(
                "unsupported scheme `{other}`; expected http or https"
            ))
        }
    };
    let authority = rest.trim_end_matches('/');
    if authority.contains('/') || authority.contains('?') || authority.contains('#') {
        return Err("expected scheme://host:port with no path".to_string());
    }
    if authority.contains('@') {
        return Err("credentials in the URL are not supported".to_string());
    }
    let default_port = match scheme.as_str() {
        "" => OLLAMA_DEFAULT_PORT,
        "https" => 443,
        _ => 80,
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| "unterminated IPv6 address".to_string())?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse::<u16>().map_err(|_| format!("bad port `{p}`"))?,
            None if after.is_empty() => default_port,
            None => return Err("expected `]:port` after an IPv6 address".to_string()),
        };
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("`[{h}]` is not an IPv6 address"));
        }
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse::<u16>().map_err(|_| format!("bad port `{p}`"))?,
            ),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err("expected a host name or address".to_string());
    }
    if !authority.starts_with('[') {
        check_host_name(&host)?;
    }
    if port == 0 {
        return Err("port must be between 1 and 65535".to_string());
    }
    Ok(UpstreamAddress { host, port, tls })
}

/// The effective configuration as YAML, as `check` prints it.
pub fn effective_yaml(config: &Config) -> String {
    yaml_serde::to_string(&config.effective).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Config {
        parse(text, "test.yaml", &Overrides::default()).unwrap()
    }

    fn parse_err(text: &str) -> String {
        parse(text, "test.yaml", &Overrides::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn minimal_external_config_gets_defaults() {
        let c = parse_ok("instances:\n  - name: a\n    url: http://127.0.0.1:11500\n");
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
        assert_eq!(c.instances[0].upstream.port, 11500);
        assert!(c.instances[0].supervised.is_none());
        assert_eq!(c.timeouts.connect, Duration::from_secs(2));
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert!(c.threads >= 1);
    }

    #[test]
    fn unknown_key_names_its_path() {
        let e = parse_err("instances:\n  - name: a\n    url: http://x:1\n    colour: red\n");
        assert!(
            e.starts_with("test.yaml: instances[0].colour: unknown field `colour`"),
            "{e}"
        );
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn wrong_type_names_its_path() {
        let e = parse_err("instances:\n  - name: a\n    port: abc\n");
        assert!(e.contains("instances[0].port"), "{e}");
        assert!(
            e.contains("expected a whole number from 0 to 65535, got `abc`"),
            "{e}"
        );
    }

    #[test]
    fn supervised_defaults() {
        let c = parse_ok("instances:\n  - name: gpu0\n    port: 11501\n    num_parallel: 2\n");
        let s = c.instances[0].supervised.as_ref().unwrap();
        assert_eq!(s.command, "ollama");
        assert_eq!(s.args, vec!["serve"]);
        assert_eq!(s.num_parallel, 2);
        assert_eq!(c.instances[0].upstream.host_header(), "127.0.0.1:11501");
    }

    #[test]
    fn rejects_mixed_and_duplicate_instances() {
        assert!(
            parse_err("instances:\n  - name: a\n    url: http://x:1\n    port: 5\n")
                .contains("instances[0].port: is a supervised-instance key")
        );
        assert!(parse_err(
            "instances:\n  - name: a\n    port: 11600\n  - name: b\n    port: 11600\n"
        )
        .contains("instances[1].port: port 11600 is already used"));
        assert!(
            parse_err("instances:\n  - name: a\n    port: 1\n  - name: a\n    port: 2\n")
                .contains("instances[1].name")
        );
        assert!(parse_err("instances: []\n").contains("instances: expected at least one"));
        assert!(parse_err("instances:\n  - name: a\n").contains("expected either `url`"));
    }

    #[test]
    fn bad_listen_and_overrides() {
        assert!(
            parse_err("listen: nowhere\ninstances:\n  - name: a\n    url: x:1\n")
                .contains("test.yaml: listen: expected an address")
        );
        let c = parse(
            "instances:\n  - name: a\n    url: x:1\n",
            "t",
            &Overrides {
                listen: Some("127.0.0.1:9999".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert!(effective_yaml(&c).contains("listen: 127.0.0.1:9999"));
    }

    #[test]
    fn instance_urls() {
        let a = parse_instance_url("http://ollama:11434").unwrap();
        assert_eq!((a.host.as_str(), a.port, a.tls), ("ollama", 11434, false));
        assert_eq!(parse_instance_url("http://h").unwrap().port, 80);
        assert_eq!(parse_instance_url("h").unwrap().port, 11434);
        assert_eq!(parse_instance_url("https://h").unwrap().port, 443);
        let v6 = parse_instance_url("http://[::1]:5").unwrap();
        assert_eq!(v6.host_header(), "[::1]:5");
        assert!(parse_instance_url("ftp://h").is_err());
        assert!(parse_instance_url("http://h:1/api").is_err());
        assert!(parse_instance_url("http://h:99999").is_err());
        let named = parse_instance_url("https://gpu-3.internal:11434").unwrap();
        assert_eq!((named.host.as_str(), named.tls), ("gpu-3.internal", true));
        assert_eq!(named.literal(), None);
        assert_eq!(v6.literal(), Some("[::1]:5".parse().unwrap()));
        assert_eq!(
            parse_instance_url("10.0.0.5:7").unwrap().literal(),
            Some("10.0.0.5:7".parse().unwrap())
        );
        assert!(parse_instance_url("http://ollama.:1").is_ok());
        for bad in [
            "http://::1:5",
            "http://[nope]:5",
            "http://a b:1",
            "http://a..b:1",
            "http://ollama%:1",
        ] {
            assert!(parse_instance_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("64MiB").unwrap().0, 64 << 20);
        assert_eq!(ByteSize::parse("10MB").unwrap().0, 10_000_000);
        assert_eq!(ByteSize::parse("123").unwrap().0, 123);
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert_eq!(ByteSize(1 << 30).to_string(), "1GiB");
        let c = parse_ok("limits:\n  max_body: 1MiB\nadmission:\n  max_queued_bytes: 4096\ninstances:\n  - name: a\n    url: x:1\n");
        assert_eq!(c.limits.max_body.0, 1 << 20);
        assert_eq!(c.admission.max_queued_bytes.0, 4096);
        assert!(
            parse_err("limits:\n  max_body: lots\ninstances:\n  - name: a\n    url: x:1\n")
                .contains("limits.max_body")
        );
    }

    #[test]
    fn access_defaults_and_keys() {
        let c = parse_ok("instances:\n  - name: a\n    url: x:1\n");
        assert!(c.access.keys.is_empty() && c.access.cors.origins.is_empty());
        assert!(c.access.admin_token.is_none());
        assert_eq!(c.limits.max_header_bytes.0, 64 << 10);
        assert_eq!(c.limits.max_headers, 100);
        assert_eq!(c.limits.max_uri_bytes.0, 8 << 10);
        assert_eq!(c.limits.body_read_timeout, Duration::from_secs(30));
        let hex = "ab".repeat(32);
        let c = parse_ok(&format!(
            "auth:\n  keys:\n    - name: ops\n      sha256: {hex}\n      admin: true\n      priority: 5\ninstances:\n  - name: a\n    url: x:1\n"
        ));
        let k = &c.access.keys[0];
        assert_eq!((k.name.as_str(), k.priority, k.admin), ("ops", 5, true));
        assert_eq!(k.sha256, [0xab; 32]);
        assert!(k.routes.iter().any(|r| r == "management"));
        assert_eq!(k.models, vec!["*"]);
        // `check` prints the hash, never a key.
        assert!(!format!("{:?}", c.access).contains(&hex));
        assert!(parse_err(&format!(
            "auth:\n  keys:\n    - name: a\n      sha256: {hex}\n    - name: b\n      sha256: {hex}\ninstances:\n  - name: a\n    url: x:1\n"
        ))
        .contains("auth.keys[1]: the same key as auth.keys[0]"));
    }

    #[test]
    fn durations_are_human() {
        let c = parse_ok(
            "timeouts:\n  connect: 500ms\n  idle: 2m\nshutdown:\n  drain_timeout: 5s\ninstances:\n  - name: a\n    url: x:1\n",
        );
        assert_eq!(c.timeouts.connect, Duration::from_millis(500));
        assert_eq!(c.timeouts.idle, Some(Duration::from_secs(120)));
        assert_eq!(c.drain_timeout, Duration::from_secs(5));
        assert!(
            parse_err("timeouts:\n  connect: fast\ninstances:\n  - name: a\n    url: x:1\n")
                .contains("timeouts.connect")
        );
    }

    #[test]
    fn shared_state_is_off_by_default_and_validated() {
        let one = "instances:\n  - name: a\n    url: http://127.0.0.1:11500\n";
        assert!(parse_ok(one).access.shared_state.is_none());
        let c = parse_ok(&format!(
            "shared_state:\n  redis: redis://user:s3cret@10.0.0.5:6379/2\n  on_error: closed\n{one}"
        ));
        let shared = c.access.shared_state.clone().expect("shared_state");
        assert_eq!(shared.on_error, OnSharedError::Closed);
        assert_eq!(shared.timeout, Duration::from_millis(50));
        assert_eq!(shared.lease_ttl, Duration::from_secs(30));
        assert_eq!(shared.prefix, "ollama-sidecar:");
        // `check` never prints the password.
        let printed = effective_yaml(&c);
        assert!(
            printed.contains("redis://user:***@10.0.0.5:6379/2"),
            "{printed}"
        );
        assert!(!printed.contains("s3cret"), "{printed}");
        for (bad, key) in [
            ("redis: http://x:6379", "shared_state.redis"),
            ("redis: 'redis://[::1'", "shared_state.redis"),
            (
                "redis: redis://x\n  lease_ttl: 100ms",
                "shared_state.lease_ttl",
            ),
            ("redis: redis://x\n  timeout: 0s", "shared_state"),
            (
                "redis: redis://x\n  on_error: maybe",
                "shared_state.on_error",
            ),
        ] {
            let e = parse_err(&format!("shared_state:\n  {bad}\n{one}"));
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn redacted_urls() {
        assert_eq!(redact_url("redis://:pw@h:1"), "redis://:***@h:1");
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(
            redact_url("unix:///run/redis.sock"),
            "unix:///run/redis.sock"
        );
    }

    #[test]
    fn overlapping_listeners() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(listeners_overlap(a("0.0.0.0:5"), a("127.0.0.1:5")));
        assert!(listeners_overlap(a("127.0.0.1:5"), a("0.0.0.0:5")));
        assert!(
            listeners_overlap(a("[::]:5"), a("127.0.0.1:5")),
            "dual-stack"
        );
        assert!(
            !listeners_overlap(a("0.0.0.0:5"), a("[::1]:5")),
            "another family"
        );
        assert!(!listeners_overlap(a("127.0.0.1:5"), a("127.0.0.2:5")));
        assert!(!listeners_overlap(a("0.0.0.0:5"), a("0.0.0.0:6")));
    }

    #[test]
    fn log_filters() {
        assert!(check_log_filter("info").is_ok());
        assert!(check_log_filter("WARN,ollama_sidecar=debug").is_ok());
        assert!(check_log_filter("pingora_core::server").is_ok());
        assert!(check_log_filter("infoo").is_err());
        assert!(check_log_filter("ollama_sidecar").is_err());
        assert!(check_log_filter("a=loud").is_err());
    }

    #[test]
    fn durations_refuse_calendar_units() {
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        for text in ["10M", "1y", "2 months", "1year"] {
            assert!(
                parse_duration(text).unwrap_err().contains(DURATION_UNITS),
                "{text}"
            );
        }
    }
}
