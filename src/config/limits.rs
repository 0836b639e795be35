//! The `limits` section: what clients may send, checked against Pingora's own hard limits.

use super::units::ByteSize;
use super::{err, file, ConfigError};
use std::time::Duration;

/// The validated `limits` section.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Largest JSON request body read to route it (above zero).
    pub max_body: ByteSize,
    /// The request line and header fields together, at most (1KiB to 1MiB).
    pub max_header_bytes: ByteSize,
    /// Header fields, at most (1 to 256).
    pub max_headers: usize,
    /// The request target, at most (256 bytes up to `max_header_bytes`).
    pub max_uri_bytes: ByteSize,
    /// Longest silence while a request body is read (100ms or more).
    pub body_read_timeout: Duration,
    /// Longest a write to a client may take (100ms or more).
    pub write_timeout: Duration,
    /// Request-body bytes held before admission, all connections together (`max_body` or more).
    pub max_pending_body_bytes: ByteSize,
    /// Longest a request body may take to arrive in all (100ms or more).
    pub body_deadline: Duration,
    /// Longest `keep_alive` a request may give its model (1s or more); `None`: as sent.
    pub max_keep_alive: Option<Duration>,
}

impl From<&file::Limits> for LimitsConfig {
    fn from(file: &file::Limits) -> Self {
        LimitsConfig {
            max_body: file.max_body,
            max_header_bytes: file.max_header_bytes,
            max_headers: file.max_headers,
            max_uri_bytes: file.max_uri_bytes,
            body_read_timeout: file.body_read_timeout,
            write_timeout: file.write_timeout,
            max_pending_body_bytes: file.max_pending_body_bytes,
            body_deadline: file.body_deadline,
            max_keep_alive: file.max_keep_alive,
        }
    }
}

/// The file's defaults.
impl Default for LimitsConfig {
    fn default() -> Self {
        (&file::Limits::default()).into()
    }
}

pub(super) fn validate(file: &file::Limits, source: &str) -> Result<LimitsConfig, ConfigError> {
    if file.max_body.0 == 0 {
        return Err(err(source, "limits.max_body", "must be greater than 0"));
    }
    if file.max_header_bytes.0 < 1024 || file.max_header_bytes.0 > 1 << 20 {
        return Err(err(
            source,
            "limits.max_header_bytes",
            "expected 1KiB to 1MiB (Pingora's own limit)",
        ));
    }
    if file.max_headers == 0 || file.max_headers > 256 {
        return Err(err(
            source,
            "limits.max_headers",
            "expected 1 to 256 (Pingora's own limit)",
        ));
    }
    if file.max_uri_bytes.0 < 256 || file.max_uri_bytes.0 > file.max_header_bytes.0 {
        return Err(err(
            source,
            "limits.max_uri_bytes",
            "expected 256 bytes up to limits.max_header_bytes",
        ));
    }
    if file.body_read_timeout < Duration::from_millis(100) {
        return Err(err(
            source,
            "limits.body_read_timeout",
            "must be at least 100ms",
        ));
    }
    for (key, value) in [
        ("limits.write_timeout", file.write_timeout),
        ("limits.body_deadline", file.body_deadline),
    ] {
        if value < Duration::from_millis(100) {
            return Err(err(source, key, "must be at least 100ms"));
        }
    }
    if file
        .max_keep_alive
        .is_some_and(|d| d < Duration::from_secs(1))
    {
        return Err(err(
            source,
            "limits.max_keep_alive",
            "must be at least 1s (0 would unload every model a client names a keep_alive for)",
        ));
    }
    if file.max_pending_body_bytes.0 < file.max_body.0 {
        return Err(err(
            source,
            "limits.max_pending_body_bytes",
            "must be at least limits.max_body (one whole body must fit)",
        ));
    }
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::parse_err;

    #[test]
    fn pingora_bounds() {
        let one = "instances:\n  - name: a\n    url: x:1\n";
        for (limits, message) in [
            (
                "max_headers: 300",
                "limits.max_headers: expected 1 to 256 (Pingora's own limit)",
            ),
            (
                "max_uri_bytes: 100",
                "limits.max_uri_bytes: expected 256 bytes up to limits.max_header_bytes",
            ),
            (
                "max_header_bytes: 2MiB",
                "limits.max_header_bytes: expected 1KiB to 1MiB (Pingora's own limit)",
            ),
            ("max_body: 0", "limits.max_body: must be greater than 0"),
            (
                "write_timeout: 10ms",
                "limits.write_timeout: must be at least 100ms",
            ),
            (
                "max_keep_alive: 500ms",
                "limits.max_keep_alive: must be at least 1s (0 would unload every model a client names a keep_alive for)",
            ),
            (
                "body_deadline: 0s",
                "limits.body_deadline: must be at least 100ms",
            ),
            (
                "max_pending_body_bytes: 1MiB",
                "limits.max_pending_body_bytes: must be at least limits.max_body (one whole body must fit)",
            ),
        ] {
            let e = parse_err(&format!("limits:\n  {limits}\n{one}"));
            assert_eq!(e, format!("test.yaml: {message}"));
        }
    }
}
