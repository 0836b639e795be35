//! Configuration, in three layers (as River's `config/` does):
//! 1. the file's shape ([`file`], read by [`yaml`]): serde types that also print `check`'s
//!    effective configuration, each default written once in its section's `Default`;
//! 2. the overrides ([`overrides`]): `--listen`, `OLLAMA_SIDECAR_LISTEN`, ... written over the
//!    file, each remembering which flag or variable to blame;
//! 3. validation, one module per section (`listen`, `log`, `timeouts`, `admission`, `limits`,
//!    `health`, `retries`, `instances`, `access`, `shared_state`), into the run-time [`Config`]
//!    the services are built from. Run-time types are never deserialized.
//!
//! Nothing else reads the file; every error names the file (or the flag), the key path and
//! what was expected.

mod access;
mod address;
mod admission;
mod cli;
pub mod file;
mod health;
mod instances;
mod limits;
mod listen;
mod log;
mod models;
mod overrides;
mod retries;
mod secrets;
mod shared_state;
mod timeouts;
mod units;
mod yaml;

pub use access::{AccessConfig, ApiKey, CorsConfig, PolicyConfig};
pub use address::{parse_instance_url, UpstreamAddress};
pub use admission::QueueConfig;
pub use cli::ConfigArgs;
pub use file::Config as FileConfig;
pub use health::{HealthConfig, PassiveConfig};
pub use instances::{
    InstanceConfig, RestartConfig, SupervisedSpec, DEFAULT_OLLAMA_MAX_QUEUE, DEFAULT_START_TIMEOUT,
    DEFAULT_STOP_GRACE,
};
pub use limits::LimitsConfig;
pub use listen::parse_listen_addr;
pub use log::{LogConfig, LogFormat};
pub use models::{ModelRuleConfig, ModelRulesConfig};
pub use overrides::{Overrides, FLAG_ADMIN_LISTEN, FLAG_LISTEN};
pub use retries::RetriesConfig;
pub use secrets::{sha256, Secrets, MIN_KEY_LEN};
pub use shared_state::{redact_url, OnSharedError, SharedStateConfig};
pub use timeouts::TimeoutsConfig;
pub use units::{duration_text, parse_duration, ByteSize, DURATION_UNITS};

// Transitional names: src/proxy and src/policy, being rewritten on other branches, still import
// the run-time sections by their old names. Rename at those call sites after the merge and
// delete these lines.
pub type RetriesFile = RetriesConfig;
pub type LimitsFile = LimitsConfig;
pub type CorsFile = CorsConfig;
pub type PolicyFile = PolicyConfig;
pub type SharedStateFile = SharedStateConfig;

use serde::Deserialize;
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

fn err(source: &str, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        file: source.to_string(),
        key: key.into(),
        message: message.into(),
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration came from (for messages).
    pub source: String,
    pub listen: SocketAddr,
    /// Pingora worker threads (the file's 0 resolved to the CPU count).
    pub threads: usize,
    pub admin_listen: SocketAddr,
    pub log: LogConfig,
    pub timeouts: TimeoutsConfig,
    pub drain_timeout: Duration,
    pub admission: QueueConfig,
    pub limits: LimitsConfig,
    pub health: HealthConfig,
    pub retries: RetriesConfig,
    pub instances: Vec<InstanceConfig>,
    /// API keys, model and route policy, CORS, the admin token (`src/policy/`).
    pub access: AccessConfig,
    /// Per-model rules (`models:`), the first match wins.
    pub models: ModelRulesConfig,
    /// The file as read, overrides applied: only for `check` to print ([`effective_yaml`]).
    effective: file::Config,
    /// The flags and variables written over the file: a reload applies them again.
    pub overrides: Overrides,
    /// `--watch`: reload when the file changes (`src/reload.rs`).
    pub watch: bool,
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

/// [`parse`], choosing whether secrets are read: the three layers in order.
pub fn parse_with(
    text: &str,
    source: &str,
    overrides: &Overrides,
    secrets: Secrets,
) -> Result<Config, ConfigError> {
    let mut file = yaml::parse_file(text, source)?;
    overrides.apply(&mut file);
    validate(file, source, overrides, secrets)
}

/// The admin listener's address as `run` would bind it, reading nothing else: what `health`
/// needs. The override wins; the file (when read) must be YAML, but its other keys are ignored.
pub fn load_admin_listen(path: &Path, overrides: &Overrides) -> Result<SocketAddr, ConfigError> {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct AdminOnly {
        admin: AdminListenOnly,
    }
    #[derive(Deserialize)]
    #[serde(default)]
    struct AdminListenOnly {
        listen: String,
    }
    impl Default for AdminListenOnly {
        fn default() -> Self {
            AdminListenOnly {
                listen: file::Admin::default().listen,
            }
        }
    }
    let source = path.display().to_string();
    let value = match &overrides.admin_listen {
        Some(listen) => listen.clone(),
        None => {
            let text = read_file(path)?;
            if text.trim().is_empty() {
                file::Admin::default().listen
            } else {
                yaml::deserialize_yaml::<AdminOnly>(&text, &source)?
                    .admin
                    .listen
            }
        }
    };
    listen::listen_addr(&source, "admin.listen", overrides.admin_listen_from, &value)
}

/// Validates each section, in the order an operator reads the file; the first error wins.
fn validate(
    file: file::Config,
    source: &str,
    overrides: &Overrides,
    secrets: Secrets,
) -> Result<Config, ConfigError> {
    let listeners = listen::validate(&file, source, overrides)?;
    let log = log::validate(&file.log, source)?;
    let timeouts = timeouts::validate(&file.timeouts, source)?;
    let admission = admission::validate(&file.admission, source)?;
    let health = health::validate(&file.health, source)?;
    let retries = retries::validate(&file.retries, source)?;
    let limits = limits::validate(&file.limits, source)?;
    let instances = instances::validate(&file.instances, source, &listeners)?;
    let access = access::validate(&file, source, secrets)?;
    let models = models::validate(&file.models, &file.instances, source)?;
    let threads = match file.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    Ok(Config {
        source: source.to_string(),
        listen: listeners.proxy,
        threads,
        admin_listen: listeners.admin,
        log,
        timeouts,
        drain_timeout: file.shutdown.drain_timeout,
        admission,
        limits,
        health,
        retries,
        instances,
        access,
        models,
        effective: file,
        overrides: overrides.clone(),
        watch: false,
    })
}

/// The effective configuration as YAML, as `check` prints it.
pub fn effective_yaml(config: &Config) -> String {
    yaml_serde::to_string(&config.effective).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
}

/// What the section modules' tests parse with.
#[cfg(test)]
mod test_support {
    use super::*;

    pub fn parse_ok(text: &str) -> Config {
        parse(text, "test.yaml", &Overrides::default()).unwrap()
    }

    pub fn parse_err(text: &str) -> String {
        parse(text, "test.yaml", &Overrides::default())
            .unwrap_err()
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::parse_ok;
    use super::*;

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
    fn run_time_defaults_are_the_files() {
        // The run-time sections built without a file (tests elsewhere do) match the file's.
        let c = parse_ok("instances:\n  - name: a\n    url: x:1\n");
        assert_eq!(
            format!("{:?}", c.limits),
            format!("{:?}", LimitsConfig::default())
        );
        assert_eq!(
            format!("{:?}", c.retries),
            format!("{:?}", RetriesConfig::default())
        );
        assert_eq!(
            format!("{:?}", c.access.cors),
            format!("{:?}", CorsConfig::default())
        );
        let restart = parse_ok("instances:\n  - name: a\n    port: 9\n").instances[0]
            .supervised
            .clone()
            .unwrap()
            .restart;
        assert_eq!(
            format!("{restart:?}"),
            format!("{:?}", RestartConfig::default())
        );
    }

    #[test]
    fn check_prints_every_default() {
        let printed = effective_yaml(&parse_ok("instances:\n  - name: a\n    url: x:1\n"));
        for line in [
            "max_queued: 1024",
            "level: info",
            "num_parallel: 1",
            "prefix: 'ollama-sidecar:'",
        ] {
            assert!(printed.contains(line), "{line}: {printed}");
        }
    }
}
