//! The `retries` section: attempts, backoff, and the budget that caps retries to a share of
//! requests.

use super::{err, file, ConfigError};
use std::time::Duration;

/// The validated `retries` section.
#[derive(Debug, Clone)]
pub struct RetriesConfig {
    /// Attempts in all, the first included (1 or more; 1 disables retries).
    pub max_attempts: u32,
    /// First backoff before a retry; doubles per attempt, with jitter, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Retries may be at most this share (0 to 1) of requests over `budget_window` ...
    pub budget_ratio: f64,
    pub budget_window: Duration,
    /// ... but this many retries per window are always allowed.
    pub budget_min: u32,
}

impl From<&file::Retries> for RetriesConfig {
    fn from(file: &file::Retries) -> Self {
        RetriesConfig {
            max_attempts: file.max_attempts,
            backoff: file.backoff,
            max_backoff: file.max_backoff,
            budget_ratio: file.budget_ratio,
            budget_window: file.budget_window,
            budget_min: file.budget_min,
        }
    }
}

/// The file's defaults.
impl Default for RetriesConfig {
    fn default() -> Self {
        (&file::Retries::default()).into()
    }
}

pub(super) fn validate(
    retries: &file::Retries,
    source: &str,
) -> Result<RetriesConfig, ConfigError> {
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
    Ok(retries.into())
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{parse_err, parse_ok};

    #[test]
    fn defaults_and_bounds() {
        let one = "instances:\n  - name: a\n    url: x:1\n";
        let r = parse_ok(one).retries;
        assert_eq!((r.max_attempts, r.budget_ratio, r.budget_min), (3, 0.2, 3));
        assert_eq!(
            parse_err(&format!("retries:\n  budget_ratio: 1.5\n{one}")),
            "test.yaml: retries.budget_ratio: expected a number from 0 to 1"
        );
        assert_eq!(
            parse_err(&format!("retries:\n  backoff: 5s\n{one}")),
            "test.yaml: retries: expected backoff <= max_backoff"
        );
    }
}
