//! The `health` section: active checks of external instances, the loaded-models poll, and
//! passive ejection on errors seen in real traffic.

use super::{err, file, ConfigError};
use std::time::Duration;

/// The validated `health` section.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// Between two active checks of an external instance (100ms or more).
    pub interval: Duration,
    /// One check's deadline (above zero).
    pub timeout: Duration,
    /// Consecutive successes that bring an unhealthy instance back (1 or more).
    pub rise: usize,
    /// Consecutive failures that take an instance out of rotation (1 or more).
    pub fall: usize,
    /// Between two reads of an instance's `/api/ps` (100ms or more).
    pub models_interval: Duration,
    pub passive: PassiveConfig,
}

/// The validated `health.passive` section.
#[derive(Debug, Clone)]
pub struct PassiveConfig {
    /// Consecutive failures that eject an instance (1 or more).
    pub failures: u32,
    /// First cool-down, doubled per failed trial up to `max_cooldown` (0 < cooldown <= max).
    pub cooldown: Duration,
    pub max_cooldown: Duration,
}

impl From<&file::Passive> for PassiveConfig {
    fn from(file: &file::Passive) -> Self {
        PassiveConfig {
            failures: file.failures,
            cooldown: file.cooldown,
            max_cooldown: file.max_cooldown,
        }
    }
}

/// The file's defaults.
impl Default for PassiveConfig {
    fn default() -> Self {
        (&file::Passive::default()).into()
    }
}

pub(super) fn validate(health: &file::Health, source: &str) -> Result<HealthConfig, ConfigError> {
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
    let passive = validate_passive(&health.passive, source)?;
    if health.models_interval < Duration::from_millis(100) {
        return Err(err(
            source,
            "health.models_interval",
            "must be at least 100ms",
        ));
    }
    Ok(HealthConfig {
        interval: health.interval,
        timeout: health.timeout,
        rise: health.rise,
        fall: health.fall,
        models_interval: health.models_interval,
        passive,
    })
}

fn validate_passive(passive: &file::Passive, source: &str) -> Result<PassiveConfig, ConfigError> {
    if passive.failures == 0 {
        return Err(err(source, "health.passive.failures", "must be at least 1"));
    }
    if passive.cooldown.is_zero() || passive.max_cooldown < passive.cooldown {
        return Err(err(
            source,
            "health.passive",
            "expected 0 < cooldown <= max_cooldown",
        ));
    }
    Ok(passive.into())
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{parse_err, parse_ok};
    use std::time::Duration;

    #[test]
    fn defaults_and_bounds() {
        let one = "instances:\n  - name: a\n    url: x:1\n";
        let h = parse_ok(one).health;
        assert_eq!((h.interval, h.rise, h.fall), (Duration::from_secs(2), 2, 3));
        assert_eq!(h.passive.max_cooldown, Duration::from_secs(60));
        for (health, message) in [
            ("interval: 10ms", "health.interval: must be at least 100ms"),
            ("fall: 0", "health: `rise` and `fall` must be at least 1"),
            (
                "passive:\n    cooldown: 2m",
                "health.passive: expected 0 < cooldown <= max_cooldown",
            ),
        ] {
            let e = parse_err(&format!("health:\n  {health}\n{one}"));
            assert_eq!(e, format!("test.yaml: {message}"));
        }
    }
}
