//! The `timeouts` section: how long the sidecar waits on instances. (`shutdown.drain_timeout`
//! takes any value, zero included: it goes straight to `Config::drain_timeout`.)

use super::{err, file, ConfigError};
use std::time::Duration;

/// The validated `timeouts` section.
#[derive(Debug, Clone)]
pub struct TimeoutsConfig {
    /// TCP connect to an instance (above zero).
    pub connect: Duration,
    /// From the request sent to the response header (above zero).
    pub response_header: Duration,
    /// Longest silence between two streamed chunks; `None`: no limit.
    pub idle: Option<Duration>,
}

pub(super) fn validate(file: &file::Timeouts, source: &str) -> Result<TimeoutsConfig, ConfigError> {
    if file.connect.is_zero() {
        return Err(err(source, "timeouts.connect", "must be greater than 0"));
    }
    if file.response_header.is_zero() {
        return Err(err(
            source,
            "timeouts.response_header",
            "must be greater than 0",
        ));
    }
    Ok(TimeoutsConfig {
        connect: file.connect,
        response_header: file.response_header,
        idle: file.idle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{parse_err, parse_ok};

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
    fn zero_timeouts_are_refused() {
        let e =
            parse_err("timeouts:\n  response_header: 0s\ninstances:\n  - name: a\n    url: x:1\n");
        assert_eq!(
            e,
            "test.yaml: timeouts.response_header: must be greater than 0"
        );
    }
}
