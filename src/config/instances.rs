//! The `instances` section: external Ollamas (`url`) and supervised `ollama serve` processes
//! (`port`, `command`, ...), each named once and reached at one address.

use super::address::{parse_instance_url, UpstreamAddress};
use super::listen::Listeners;
use super::{err, file, ConfigError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// Ollama's own queue is kept small: queueing belongs to the sidecar.
pub const DEFAULT_OLLAMA_MAX_QUEUE: usize = 4;

#[derive(Debug, Clone)]
pub struct InstanceConfig {
    pub name: String,
    pub upstream: UpstreamAddress,
    pub num_parallel: usize,
    pub supervised: Option<SupervisedSpec>,
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
    pub restart: RestartConfig,
}

/// The validated `restart` of a supervised instance.
#[derive(Debug, Clone)]
pub struct RestartConfig {
    /// First wait before a restart, doubled per crash up to `max_backoff` (0 < initial <= max).
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// A run this long resets the backoff.
    pub stable_after: Duration,
    /// Restarts in a row without a stable run before the state is shown as `crashloop`.
    pub crashloop_after: u32,
    /// Failed liveness checks in a row that restart a running instance.
    pub liveness_failures: u32,
}

impl From<&file::Restart> for RestartConfig {
    fn from(file: &file::Restart) -> Self {
        RestartConfig {
            initial_backoff: file.initial_backoff,
            max_backoff: file.max_backoff,
            stable_after: file.stable_after,
            crashloop_after: file.crashloop_after,
            liveness_failures: file.liveness_failures,
        }
    }
}

/// The file's defaults.
impl Default for RestartConfig {
    fn default() -> Self {
        (&file::Restart::default()).into()
    }
}

pub(super) fn validate(
    instances: &[file::Instance],
    source: &str,
    listeners: &Listeners,
) -> Result<Vec<InstanceConfig>, ConfigError> {
    if instances.is_empty() {
        return Err(err(
            source,
            "instances",
            "expected at least one instance (an external `url`, or a supervised `port`)",
        ));
    }
    let mut valid: Vec<InstanceConfig> = Vec::with_capacity(instances.len());
    for (i, inst) in instances.iter().enumerate() {
        let at = At { source, i };
        check_name(&at, inst, &instances[..i])?;
        if inst.num_parallel == 0 {
            return Err(at.err("num_parallel", "must be at least 1"));
        }
        let (upstream, supervised) = match &inst.url {
            Some(url) => (external(&at, inst, url)?, None),
            None => {
                let spec = supervised(&at, inst, &valid, listeners)?;
                let upstream = UpstreamAddress {
                    host: "127.0.0.1".to_string(),
                    port: spec.port,
                    tls: false,
                };
                (upstream, Some(spec))
            }
        };
        check_address(&at, inst, &upstream, &valid)?;
        valid.push(InstanceConfig {
            name: inst.name.clone(),
            upstream,
            num_parallel: inst.num_parallel,
            supervised,
        });
    }
    Ok(valid)
}

/// Which instance an error is about: `instances[i].field` of `source`.
struct At<'a> {
    source: &'a str,
    i: usize,
}

impl At<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> ConfigError {
        err(
            self.source,
            format!("instances[{}].{field}", self.i),
            message,
        )
    }
}

/// A name that is non-empty, usable as a metric label, and not taken by an earlier instance.
fn check_name(
    at: &At,
    inst: &file::Instance,
    earlier: &[file::Instance],
) -> Result<(), ConfigError> {
    if inst.name.trim().is_empty() {
        return Err(at.err("name", "expected a non-empty name"));
    }
    if !inst
        .name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(at.err(
            "name",
            format!(
                "`{}`: use letters, digits, `-`, `_` and `.` only (it becomes a metric label)",
                inst.name
            ),
        ));
    }
    if let Some(j) = earlier.iter().position(|o| o.name == inst.name) {
        return Err(at.err(
            "name",
            format!("`{}` is already the name of instances[{j}]", inst.name),
        ));
    }
    Ok(())
}

/// The supervised-only keys this instance sets, in the file's order.
fn supervised_keys(inst: &file::Instance) -> Vec<&'static str> {
    [
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
    .collect()
}

/// An external instance: its URL, and none of the supervised-only keys.
fn external(at: &At, inst: &file::Instance, url: &str) -> Result<UpstreamAddress, ConfigError> {
    if let Some(first) = supervised_keys(inst).first() {
        return Err(at.err(
            first,
            "is a supervised-instance key, but this instance has a `url` (external instances are not started by the sidecar); remove one of them",
        ));
    }
    parse_instance_url(url).map_err(|m| at.err("url", format!("`{url}`: {m}")))
}

/// A supervised instance: a port of its own, a command, an environment, restart bounds; the
/// keys left out take their defaults here.
fn supervised(
    at: &At,
    inst: &file::Instance,
    earlier: &[InstanceConfig],
    listeners: &Listeners,
) -> Result<SupervisedSpec, ConfigError> {
    let port = check_port(at, inst, earlier, listeners)?;
    let command = inst.command.clone().unwrap_or_else(|| "ollama".to_string());
    if command.trim().is_empty() {
        return Err(at.err("command", "expected a program name or path"));
    }
    for name in inst.env.keys() {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(at.err(
                &format!("env.{name}"),
                "not a valid environment variable name",
            ));
        }
    }
    let restart = inst.restart.clone().unwrap_or_default();
    if restart.initial_backoff.is_zero() || restart.max_backoff < restart.initial_backoff {
        return Err(at.err("restart", "expected 0 < initial_backoff <= max_backoff"));
    }
    Ok(SupervisedSpec {
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
        restart: (&restart).into(),
    })
}

/// A supervised instance's port: given, non-zero, its own, and not a listener's.
fn check_port(
    at: &At,
    inst: &file::Instance,
    earlier: &[InstanceConfig],
    listeners: &Listeners,
) -> Result<u16, ConfigError> {
    let Some(port) = inst.port else {
        return Err(err(
            at.source,
            format!("instances[{}]", at.i),
            "expected either `url` (an external Ollama) or `port` (a supervised `ollama serve`)",
        ));
    };
    if port == 0 {
        return Err(at.err("port", "must be between 1 and 65535"));
    }
    if let Some(j) = earlier
        .iter()
        .position(|o| o.supervised.as_ref().map(|s| s.port) == Some(port))
    {
        return Err(at.err(
            "port",
            format!("port {port} is already used by supervised instances[{j}]"),
        ));
    }
    if port == listeners.proxy.port() || port == listeners.admin.port() {
        return Err(at.err(
            "port",
            format!("port {port} is the sidecar's own listening port"),
        ));
    }
    Ok(port)
}

/// An address listed once, reachable by this build (TLS needs the `rustls` feature).
fn check_address(
    at: &At,
    inst: &file::Instance,
    upstream: &UpstreamAddress,
    earlier: &[InstanceConfig],
) -> Result<(), ConfigError> {
    if let Some(j) = earlier.iter().position(|o| o.upstream.same_as(upstream)) {
        let field = if inst.url.is_some() { "url" } else { "port" };
        return Err(at.err(
            field,
            format!(
                "{upstream} is already instances[{j}] (`{}`): listed twice, its slots would count twice; list it once",
                earlier[j].name
            ),
        ));
    }
    if upstream.tls && !cfg!(feature = "rustls") {
        return Err(at.err(
            "url",
            "https:// upstreams need a build with `--features rustls`",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{parse_err, parse_ok};

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
    fn the_same_ollama_twice_and_the_sidecars_own_port() {
        assert_eq!(
            parse_err("instances:\n  - name: a\n    url: http://X:1\n  - name: b\n    url: x:1\n"),
            "test.yaml: instances[1].url: http://x:1 is already instances[0] (`a`): listed twice, its slots would count twice; list it once"
        );
        assert_eq!(
            parse_err("instances:\n  - name: a\n    port: 11435\n"),
            "test.yaml: instances[0].port: port 11435 is the sidecar's own listening port"
        );
        let restart =
            "instances:\n  - name: a\n    port: 9\n    restart:\n      initial_backoff: 0s\n";
        assert_eq!(
            parse_err(restart),
            "test.yaml: instances[0].restart: expected 0 < initial_backoff <= max_backoff"
        );
    }
}
