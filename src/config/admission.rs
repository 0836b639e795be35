//! The `admission` section: the inference queue's bounds, fairness and priorities.

use super::units::ByteSize;
use super::{err, file, ConfigError};
use std::collections::BTreeMap;
use std::time::Duration;

/// The validated `admission` section.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Requests waiting for a slot, at most (1 or more).
    pub max_queued: usize,
    /// Request bodies held by waiting requests, at most.
    pub max_queued_bytes: ByteSize,
    /// Longest wait for a slot (above zero).
    pub max_wait: Duration,
    /// Each `aging` waited raises a request's priority by one level (above zero).
    pub aging: Duration,
    /// A valid header name that names the client for fairness; `None`: the client address.
    pub client_id_header: Option<String>,
    /// A valid header name carrying an integer priority; `None`: ignored.
    pub priority_header: Option<String>,
    /// Priority by client identity (an address, an `X-Client-Id` value, or a key name).
    pub priorities: BTreeMap<String, i32>,
    /// Model-management requests running at once (1 or more).
    pub management_concurrency: usize,
}

/// The file's defaults.
impl Default for QueueConfig {
    fn default() -> Self {
        let file = file::Admission::default();
        QueueConfig {
            max_queued: file.max_queued,
            max_queued_bytes: file.max_queued_bytes,
            max_wait: file.max_wait,
            aging: file.aging,
            client_id_header: file.client_id_header,
            priority_header: file.priority_header,
            priorities: file.priorities,
            management_concurrency: file.management_concurrency,
        }
    }
}

pub(super) fn validate(file: &file::Admission, source: &str) -> Result<QueueConfig, ConfigError> {
    if file.max_queued == 0 {
        return Err(err(source, "admission.max_queued", "must be at least 1"));
    }
    if file.max_wait.is_zero() {
        return Err(err(source, "admission.max_wait", "must be greater than 0"));
    }
    if file.aging.is_zero() {
        return Err(err(source, "admission.aging", "must be greater than 0"));
    }
    if file.management_concurrency == 0 {
        return Err(err(
            source,
            "admission.management_concurrency",
            "must be at least 1",
        ));
    }
    for (field, header) in [
        ("client_id_header", &file.client_id_header),
        ("priority_header", &file.priority_header),
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
    Ok(QueueConfig {
        max_queued: file.max_queued,
        max_queued_bytes: file.max_queued_bytes,
        max_wait: file.max_wait,
        aging: file.aging,
        client_id_header: file.client_id_header.clone(),
        priority_header: file.priority_header.clone(),
        priorities: file.priorities.clone(),
        management_concurrency: file.management_concurrency,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{parse_err, parse_ok};

    #[test]
    fn defaults_and_bad_headers() {
        let one = "instances:\n  - name: a\n    url: x:1\n";
        let c = parse_ok(one);
        assert_eq!(c.admission.max_queued, 1024);
        assert_eq!(c.admission.max_queued_bytes.0, 1 << 30);
        assert_eq!(c.admission.management_concurrency, 2);
        assert_eq!(
            parse_err(&format!("admission:\n  client_id_header: 'a b'\n{one}")),
            "test.yaml: admission.client_id_header: `a b` is not a valid header name"
        );
    }
}
