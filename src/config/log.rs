//! The `log` section: a tracing filter checked for typos, the line format, the access log.

use super::{err, file, ConfigError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The validated `log` section.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A tracing filter whose bare words are all levels (see [`check_log_filter`]).
    pub level: String,
    pub format: LogFormat,
    /// One access-log line per request (target `access`, at info level).
    pub access: bool,
}

pub(super) fn validate(file: &file::Log, source: &str) -> Result<LogConfig, ConfigError> {
    check_log_filter(&file.level).map_err(|m| err(source, "log.level", m))?;
    Ok(LogConfig {
        level: file.level.clone(),
        format: file.format,
        access: file.access,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filters() {
        assert!(check_log_filter("info").is_ok());
        assert!(check_log_filter("WARN,ollama_sidecar=debug").is_ok());
        assert!(check_log_filter("pingora_core::server").is_ok());
        assert!(check_log_filter("infoo").is_err());
        assert!(check_log_filter("ollama_sidecar").is_err());
        assert!(check_log_filter("a=loud").is_err());
    }
}
