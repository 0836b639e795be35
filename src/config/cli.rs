//! The command line's share of the configuration: which file to read (`--config`,
//! `OLLAMA_SIDECAR_CONFIG`, else the default) and the flags that override it. `main.rs` flattens
//! [`ConfigArgs`] into `run` and `check`.

use super::overrides::Overrides;
use super::{default_config_path, load_with, Config, ConfigError, Secrets, ENV_CONFIG};
use std::path::PathBuf;

#[derive(clap::Args, Clone, Debug)]
pub struct ConfigArgs {
    /// The configuration file [default: conf/sidecar.yaml when it exists in the working
    /// directory, else /etc/ollama-sidecar/sidecar.yaml].
    // The variable's value is hidden: `--help` would print it, or an empty `=` when unset.
    #[arg(long, short, env = ENV_CONFIG, hide_env_values = true)]
    pub config: Option<PathBuf>,
    /// Override `listen` (also OLLAMA_SIDECAR_LISTEN).
    #[arg(long)]
    pub listen: Option<String>,
    /// Override `admin.listen` (also OLLAMA_SIDECAR_ADMIN_LISTEN).
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// Reload the configuration when the file changes (it is also reloaded on SIGHUP and on
    /// `POST /reload` at the admin listener).
    #[arg(long)]
    pub watch: bool,
}

impl ConfigArgs {
    /// The environment's overrides, then the flags' (a flag wins).
    pub fn overrides(&self) -> Overrides {
        Overrides::from_env().merge(Overrides::from_flags(
            self.listen.clone(),
            self.admin_listen.clone(),
        ))
    }

    /// The file named by `--config` or `OLLAMA_SIDECAR_CONFIG`, else the default.
    pub fn path(&self) -> PathBuf {
        self.config.clone().unwrap_or_else(default_config_path)
    }

    /// Reads, overrides and validates the configuration. An error about a default file that
    /// does not exist says it was the default, and how to name another.
    pub fn load(&self, secrets: Secrets) -> Result<Config, String> {
        let path = self.path();
        let loaded = load_with(&path, &self.overrides(), secrets).map(|mut config| {
            config.watch = self.watch;
            config
        });
        loaded.map_err(|e: ConfigError| {
            let hint = if self.config.is_none() && !path.is_file() {
                " (the default; name a file with --config or OLLAMA_SIDECAR_CONFIG)"
            } else {
                ""
            };
            format!("{e}{hint}")
        })
    }
}
