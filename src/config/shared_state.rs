//! The `shared_state` section: limits counted in Redis with other sidecars (off without
//! `redis`). Its URL may hold a password: it is printed and logged only through [`redact_url`].

use super::{err, file, ConfigError};
use serde::{Deserialize, Serialize};
use std::time::Duration;

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

/// The validated `shared_state` section, present only when `redis` is set.
#[derive(Debug, Clone)]
pub struct SharedStateConfig {
    /// A URL the Redis client accepts (`redis://`, `unix://`, `redis+unix://`).
    pub redis: String,
    /// Prepended to every Redis key the sidecar writes.
    pub prefix: String,
    /// Longest wait for one Redis call on the request path (above zero).
    pub timeout: Duration,
    /// Longest wait to (re)connect (above zero).
    pub connect_timeout: Duration,
    pub on_error: OnSharedError,
    /// A concurrency slot not renewed for this long is given back (1s or more).
    pub lease_ttl: Duration,
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

pub(super) fn validate(
    file: &file::SharedState,
    source: &str,
) -> Result<Option<SharedStateConfig>, ConfigError> {
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
    Ok(Some(SharedStateConfig {
        redis: url.clone(),
        prefix: file.prefix.clone(),
        timeout: file.timeout,
        connect_timeout: file.connect_timeout,
        on_error: file.on_error,
        lease_ttl: file.lease_ttl,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::effective_yaml;
    use crate::config::test_support::{parse_err, parse_ok};

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
}
