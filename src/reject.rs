//! Every answer the sidecar gives on its own instead of relaying Ollama's: refusals (the request
//! broke a rule or a limit) and failures (no instance could answer it). One value carries the
//! status, the message, `Retry-After`, the metric/log label and whether the connection closes;
//! `proxy/respond.rs` is the one writer that renders it in the route's shape.

use crate::config::ByteSize;
use std::net::IpAddr;
use std::time::Duration;

/// Ollama's own queue-overflow text (two spaces after the full stop), which clients already handle.
pub const SERVER_BUSY: &str = "server busy, please try again.  maximum pending requests exceeded";

/// Which route class a refusal is about (its name, as configured).
pub type ClassName = &'static str;

/// An answer of the sidecar's own.
#[derive(Debug, Clone, PartialEq)]
pub enum Reject {
    /// The request target cannot be read as Ollama would (canonical path), or has bytes outside
    /// printable ASCII.
    InvalidTarget(String),
    /// The target is over `limits.max_uri_bytes`.
    UriTooLong {
        bytes: u64,
        limit: ByteSize,
    },
    /// More header fields than `limits.max_headers`.
    TooManyHeaders {
        count: usize,
        limit: usize,
    },
    /// A request head over `limits.max_header_bytes`.
    HeaderTooLarge {
        bytes: u64,
        limit: ByteSize,
    },
    /// An inference body over `limits.max_body`.
    BodyTooLarge {
        limit: ByteSize,
    },
    /// A body read to check its models, over what can be checked (Pingora's retry buffer).
    CheckedBodyTooLarge,
    /// A body that cannot be read as Ollama would bind it (the message says why).
    InvalidBody(String),
    /// JSON nested deeper than `depth` levels.
    BodyTooDeep {
        depth: usize,
    },
    /// The body stopped arriving for `limits.body_read_timeout`.
    BodyTimeout {
        after: Duration,
    },
    KeyMissing,
    KeyInvalid,
    /// `policy.deny_classes` refuses the route class.
    ClassDenied {
        class: ClassName,
    },
    /// The key's `routes` do not include the class.
    KeyClassDenied {
        key: String,
        class: ClassName,
    },
    /// The key's `models` refuse the model.
    KeyModelDenied {
        key: String,
        model: String,
    },
    /// `policy.models` refuses the model.
    PolicyModelDenied {
        model: String,
    },
    /// A model restriction applies and the body cannot be read for its model.
    ModelUnreadable,
    KeyRequests {
        key: String,
        per_minute: u64,
        wait: Duration,
    },
    KeyTokens {
        key: String,
        per_minute: u64,
        wait: Duration,
    },
    KeyConcurrency {
        key: String,
        max: u32,
    },
    ClientRequests {
        client: IpAddr,
        per_minute: u64,
        wait: Duration,
    },
    /// Redis does not answer and `shared_state.on_error` is `closed`.
    LimitsUnavailable,
    QueueFull,
    QueueBytesFull,
    WaitExpired {
        waited: Duration,
        max_wait: Duration,
    },
    ShuttingDown,
    /// No model-management slot within `admission.max_wait`.
    ManagementBusy,
    /// Failures: no instance could answer.
    NoInstance,
    /// Instances are ready, but none answered its model list (`/api/tags`, `/api/ps`).
    NoModelList,
    /// Instances are ready, but none of those that have the model installed is.
    ModelUnavailable {
        model: String,
    },
    ConnectTimeout {
        instance: String,
        after: Duration,
    },
    ResponseTimeout {
        instance: String,
        after: Duration,
    },
    /// Silence between streamed chunks past `timeouts.idle`.
    IdleTimeout {
        instance: String,
        after: Duration,
    },
    Unreachable {
        instance: String,
        cause: &'static str,
    },
    InstanceFailed {
        instance: String,
        cause: &'static str,
    },
    EndedEarly {
        instance: String,
    },
    /// A client request Pingora could not read.
    BadRequest,
    /// A status Pingora raised as an error.
    HttpStatus(u16),
    Internal,
    /// Request bodies held before admission, all connections together, would pass
    /// `limits.max_pending_body_bytes`.
    PendingBodiesFull {
        limit: ByteSize,
    },
    /// The body did not arrive whole within `limits.body_deadline`.
    BodyDeadline {
        after: Duration,
    },
    /// Instances are ready, but none of those the model's `models:` rule allows and that have
    /// it installed.
    ModelRestricted {
        model: String,
    },
    /// No instance can become ready within the request's wait: the earliest is `wait` away
    /// (`cause`: a restart backoff, a crash loop, failing health checks).
    NotReadySoon {
        wait: Duration,
        cause: &'static str,
        max_wait: Duration,
    },
}

/// The labels of refusals (`rejections_total{reason}`, the access log's `rejection`), so that
/// every series exists from the start.
pub const REFUSAL_LABELS: &[&str] = &[
    "invalid_target",
    "head_too_large",
    "body_too_large",
    "invalid_body",
    "body_timeout",
    "unauthorized",
    "forbidden_route",
    "forbidden_model",
    "rate_limited_requests",
    "rate_limited_tokens",
    "rate_limited_concurrency",
    "rate_limited_client",
    "limits_unavailable",
    "queue_full",
    "queue_bytes_full",
    "wait_expired",
    "shutting_down",
    "management_busy",
    "pending_bodies_full",
    "body_deadline",
];

fn human(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

/// `Retry-After` seconds for a wait: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs_f64().ceil() as u64).max(1)
}

impl Reject {
    pub fn status(&self) -> u16 {
        use Reject::*;
        match self {
            InvalidTarget(_) | InvalidBody(_) | BodyTooDeep { .. } | BadRequest => 400,
            KeyMissing | KeyInvalid => 401,
            ClassDenied { .. }
            | KeyClassDenied { .. }
            | KeyModelDenied { .. }
            | PolicyModelDenied { .. }
            | ModelUnreadable => 403,
            BodyTimeout { .. } | BodyDeadline { .. } => 408,
            BodyTooLarge { .. } | CheckedBodyTooLarge => 413,
            UriTooLong { .. } => 414,
            KeyRequests { .. }
            | KeyTokens { .. }
            | KeyConcurrency { .. }
            | ClientRequests { .. } => 429,
            TooManyHeaders { .. } | HeaderTooLarge { .. } => 431,
            Internal => 500,
            HttpStatus(code) => *code,
            Unreachable { .. } | InstanceFailed { .. } | EndedEarly { .. } | NoModelList => 502,
            LimitsUnavailable
            | QueueFull
            | QueueBytesFull
            | WaitExpired { .. }
            | ShuttingDown
            | ManagementBusy
            | NoInstance
            | ModelUnavailable { .. }
            | PendingBodiesFull { .. }
            | ModelRestricted { .. }
            | NotReadySoon { .. } => 503,
            ConnectTimeout { .. } | ResponseTimeout { .. } | IdleTimeout { .. } => 504,
        }
    }

    /// Seconds for `Retry-After`, on answers a client may retry.
    pub fn retry_after(&self) -> Option<u64> {
        use Reject::*;
        match self {
            KeyRequests { wait, .. } | KeyTokens { wait, .. } | ClientRequests { wait, .. } => {
                Some(retry_after_secs(*wait))
            }
            KeyConcurrency { .. }
            | LimitsUnavailable
            | QueueFull
            | QueueBytesFull
            | ShuttingDown
            | PendingBodiesFull { .. } => Some(1),
            WaitExpired { .. }
            | ManagementBusy
            | ModelUnavailable { .. }
            | ModelRestricted { .. } => Some(5),
            NotReadySoon { wait, .. } => Some(retry_after_secs(*wait)),
            _ => None,
        }
    }

    /// The bounded label of the metric (`rejections_total{reason}`) and of the access log's
    /// `rejection` and `error` fields.
    pub fn label(&self) -> &'static str {
        use Reject::*;
        match self {
            InvalidTarget(_) => "invalid_target",
            UriTooLong { .. } | TooManyHeaders { .. } | HeaderTooLarge { .. } => "head_too_large",
            BodyTooLarge { .. } | CheckedBodyTooLarge => "body_too_large",
            InvalidBody(_) | BodyTooDeep { .. } => "invalid_body",
            BodyTimeout { .. } => "body_timeout",
            KeyMissing | KeyInvalid => "unauthorized",
            ClassDenied { .. } | KeyClassDenied { .. } => "forbidden_route",
            KeyModelDenied { .. } | PolicyModelDenied { .. } | ModelUnreadable => "forbidden_model",
            KeyRequests { .. } => "rate_limited_requests",
            KeyTokens { .. } => "rate_limited_tokens",
            KeyConcurrency { .. } => "rate_limited_concurrency",
            ClientRequests { .. } => "rate_limited_client",
            LimitsUnavailable => "limits_unavailable",
            QueueFull => "queue_full",
            QueueBytesFull => "queue_bytes_full",
            WaitExpired { .. } => "wait_expired",
            ShuttingDown => "shutting_down",
            ManagementBusy => "management_busy",
            NoInstance => "no_instance",
            ModelUnavailable { .. } | ModelRestricted { .. } => "model_unavailable",
            ConnectTimeout { .. } => "connect_timeout",
            ResponseTimeout { .. } => "response_timeout",
            IdleTimeout { .. } => "idle_timeout",
            Unreachable { .. } => "unreachable",
            InstanceFailed { .. } | NoModelList => "instance_failed",
            EndedEarly { .. } => "ended_early",
            BadRequest => "bad_request",
            HttpStatus(_) => "http_status",
            Internal => "internal",
            PendingBodiesFull { .. } => "pending_bodies_full",
            BodyDeadline { .. } => "body_deadline",
            NotReadySoon { .. } => "not_ready_soon",
        }
    }

    /// A refusal (the request broke a rule or a limit, counted in `rejections_total`), as
    /// opposed to a failure to get an answer from an instance.
    pub fn is_refusal(&self) -> bool {
        REFUSAL_LABELS.contains(&self.label())
    }

    /// Whether the connection closes after this answer whatever the body's state (the answer
    /// comes before the body is read, or the sidecar is going away).
    pub fn closes(&self) -> bool {
        matches!(
            self,
            Reject::BodyTooLarge { .. }
                | Reject::CheckedBodyTooLarge
                | Reject::BodyTimeout { .. }
                | Reject::ShuttingDown
                | Reject::ManagementBusy
                | Reject::PendingBodiesFull { .. }
                | Reject::BodyDeadline { .. }
        )
    }

    /// What the client reads.
    pub fn message(&self) -> String {
        use Reject::*;
        let p = "ollama-sidecar";
        match self {
            InvalidTarget(m) | InvalidBody(m) => m.clone(),
            UriTooLong { bytes, limit } => format!(
                "{p}: request target of {bytes} bytes is longer than {limit} (limits.max_uri_bytes)"
            ),
            TooManyHeaders { count, limit } => format!(
                "{p}: {count} header fields are more than {limit} (limits.max_headers)"
            ),
            HeaderTooLarge { bytes, limit } => format!(
                "{p}: request header of {bytes} bytes is larger than {limit} (limits.max_header_bytes)"
            ),
            BodyTooLarge { limit } => {
                format!("request body is larger than {limit} (limits.max_body)")
            }
            CheckedBodyTooLarge => format!(
                "{p}: a body over 64 KiB cannot be checked against the model allow-list"
            ),
            BodyTooDeep { depth } => {
                format!("invalid request body: JSON nested deeper than {depth} levels")
            }
            BodyTimeout { after } => format!(
                "{p}: the request body stopped arriving for {} (limits.body_read_timeout)",
                human(*after)
            ),
            KeyMissing => format!(
                "{p}: an API key is required (`Authorization: Bearer <key>` or `x-api-key: <key>`)"
            ),
            KeyInvalid => format!("{p}: invalid API key"),
            ClassDenied { class } => {
                format!("{p}: {class} routes are disabled here (policy.deny_classes)")
            }
            KeyClassDenied { key, class } => {
                let hint = if *class == "management" {
                    " (model management needs `admin: true`)"
                } else {
                    ""
                };
                format!("{p}: key `{key}` may not use {class} routes{hint}")
            }
            KeyModelDenied { key, model } => format!(
                "{p}: model `{}` is not allowed for key `{key}` (auth.keys[].models)",
                shown(model)
            ),
            PolicyModelDenied { model } => format!(
                "{p}: model `{}` is not allowed here (policy.models)",
                shown(model)
            ),
            ModelUnreadable => format!(
                "{p}: the model allow-list needs an uncompressed JSON body naming the model"
            ),
            KeyRequests { key, per_minute, .. } => format!(
                "{p}: rate limit: key `{key}` may send {per_minute} requests per minute (requests_per_minute)"
            ),
            KeyTokens { key, per_minute, .. } => format!(
                "{p}: rate limit: key `{key}` used its {per_minute} tokens per minute (tokens_per_minute)"
            ),
            KeyConcurrency { key, max } => format!(
                "{p}: key `{key}` already has {max} requests in flight (max_concurrent)"
            ),
            ClientRequests {
                client, per_minute, ..
            } => format!(
                "{p}: rate limit: client {client} may send {per_minute} requests per minute (policy.requests_per_minute_per_client)"
            ),
            LimitsUnavailable => format!(
                "{p}: the shared limits cannot be checked: Redis (shared_state.redis) does not answer, and shared_state.on_error is `closed`"
            ),
            QueueFull | QueueBytesFull => SERVER_BUSY.to_string(),
            WaitExpired { waited, max_wait } => format!(
                "{SERVER_BUSY} ({p}: waited {} for a slot; admission.max_wait is {})",
                human(Duration::from_secs(waited.as_secs())),
                human(*max_wait)
            ),
            ShuttingDown => format!("{p} is shutting down"),
            ManagementBusy => format!(
                "{p}: too many model-management requests (admission.management_concurrency)"
            ),
            NoInstance => format!("{p}: no Ollama instance is ready to serve this request"),
            NoModelList => format!("{p}: no ready instance answered with its model list"),
            ModelUnavailable { model } => format!(
                "{p}: no ready instance has model {} installed",
                serde_json::to_string(&shown(model)).unwrap_or_default()
            ),
            ConnectTimeout { instance, after } => format!(
                "{p}: connecting to instance `{instance}` timed out after {} (timeouts.connect)",
                human(*after)
            ),
            ResponseTimeout { instance, after } => format!(
                "{p}: instance `{instance}` did not answer within {} (timeouts.response_header)",
                human(*after)
            ),
            IdleTimeout { instance, after } => format!(
                "{p}: instance `{instance}` sent nothing for {} (timeouts.idle)",
                human(*after)
            ),
            Unreachable { instance, cause } => {
                format!("{p}: instance `{instance}` is unreachable: {cause}")
            }
            InstanceFailed { instance, cause } => {
                format!("{p}: instance `{instance}` failed: {cause}")
            }
            EndedEarly { instance } => {
                format!("{p}: instance `{instance}` ended the response early")
            }
            BadRequest => format!("{p}: bad request"),
            HttpStatus(code) => format!("{p}: request failed with status {code}"),
            Internal => format!("{p}: internal error"),
            PendingBodiesFull { limit } => format!(
                "{p}: too many request bodies are arriving at once (more than {limit} in all, limits.max_pending_body_bytes)"
            ),
            BodyDeadline { after } => format!(
                "{p}: the request body did not arrive whole within {} (limits.body_deadline)",
                human(*after)
            ),
            ModelRestricted { model } => format!(
                "{p}: none of the instances the `models` rule for {} allows is ready with it installed",
                serde_json::to_string(&shown(model)).unwrap_or_default()
            ),
            NotReadySoon {
                wait,
                cause,
                max_wait,
            } => format!(
                "{p}: no Ollama instance can be ready within admission.max_wait ({}): the earliest is {} away ({cause})",
                human(*max_wait),
                human(Duration::from_secs(wait.as_secs().max(1)))
            ),
        }
    }
}

/// A client-supplied model name, cut to a length fit for a message.
fn shown(model: &str) -> String {
    model.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_and_failures_are_told_apart() {
        let key = || "a".to_string();
        let wait = Duration::from_millis(1500);
        for (reject, status, label, retry) in [
            (Reject::KeyMissing, 401, "unauthorized", None),
            (
                Reject::KeyClassDenied {
                    key: key(),
                    class: "management",
                },
                403,
                "forbidden_route",
                None,
            ),
            (
                Reject::PolicyModelDenied { model: "m".into() },
                403,
                "forbidden_model",
                None,
            ),
            (
                Reject::KeyTokens {
                    key: key(),
                    per_minute: 10,
                    wait,
                },
                429,
                "rate_limited_tokens",
                Some(2),
            ),
            (
                Reject::KeyConcurrency { key: key(), max: 2 },
                429,
                "rate_limited_concurrency",
                Some(1),
            ),
            (Reject::QueueFull, 503, "queue_full", Some(1)),
            (Reject::NoInstance, 503, "no_instance", None),
            (
                Reject::NotReadySoon {
                    wait: Duration::from_millis(29_200),
                    cause: "restart backoff",
                    max_wait: Duration::from_secs(5),
                },
                503,
                "not_ready_soon",
                Some(30),
            ),
            (
                Reject::ModelUnavailable {
                    model: "qwen2.5:0.5b".into(),
                },
                503,
                "model_unavailable",
                Some(5),
            ),
        ] {
            assert_eq!(reject.status(), status, "{reject:?}");
            assert_eq!(reject.label(), label, "{reject:?}");
            assert_eq!(reject.retry_after(), retry, "{reject:?}");
        }
        assert!(Reject::KeyInvalid.is_refusal());
        assert!(!Reject::NoInstance.is_refusal());
        assert_eq!(Reject::QueueFull.message(), SERVER_BUSY);
    }

    #[test]
    fn a_key_refusal_names_only_the_key_list() {
        let m = Reject::KeyModelDenied {
            key: "bob".into(),
            model: "qwen3".into(),
        }
        .message();
        assert!(m.contains("not allowed for key `bob`"), "{m}");
        assert!(!m.contains("policy.models"), "{m}");
    }
}
