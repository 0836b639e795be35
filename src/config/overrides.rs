//! The second layer: values from the command line and the environment, applied over the file.
//! Each remembers where it came from, so an error about it blames the flag or the variable,
//! not the file.

use super::{err, file, ConfigError, ENV_ADMIN_LISTEN, ENV_LISTEN};

/// The flags that override the file, as `ollama-sidecar run --help` spells them.
pub const FLAG_LISTEN: &str = "--listen";
pub const FLAG_ADMIN_LISTEN: &str = "--admin-listen";

/// Overrides from the environment and the command line, applied over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    /// Where `listen` came from (`--listen`, `OLLAMA_SIDECAR_LISTEN`), so errors blame it.
    pub listen_from: Option<&'static str>,
    pub admin_listen_from: Option<&'static str>,
}

impl Overrides {
    /// Reads `OLLAMA_SIDECAR_LISTEN` and `OLLAMA_SIDECAR_ADMIN_LISTEN`.
    pub fn from_env() -> Self {
        let listen = std::env::var(ENV_LISTEN).ok().filter(|v| !v.is_empty());
        let admin_listen = std::env::var(ENV_ADMIN_LISTEN)
            .ok()
            .filter(|v| !v.is_empty());
        Overrides {
            listen_from: listen.as_ref().map(|_| ENV_LISTEN),
            admin_listen_from: admin_listen.as_ref().map(|_| ENV_ADMIN_LISTEN),
            listen,
            admin_listen,
        }
    }

    /// The values of `--listen` and `--admin-listen`, when given.
    pub fn from_flags(listen: Option<String>, admin_listen: Option<String>) -> Self {
        Overrides {
            listen_from: listen.as_ref().map(|_| FLAG_LISTEN),
            admin_listen_from: admin_listen.as_ref().map(|_| FLAG_ADMIN_LISTEN),
            listen,
            admin_listen,
        }
    }

    /// Later values win.
    pub fn merge(mut self, other: Overrides) -> Self {
        if other.listen.is_some() {
            self.listen = other.listen;
            self.listen_from = other.listen_from;
        }
        if other.admin_listen.is_some() {
            self.admin_listen = other.admin_listen;
            self.admin_listen_from = other.admin_listen_from;
        }
        self
    }

    /// Writes the overrides into the file's values, so `check` prints what will run.
    pub(super) fn apply(&self, file: &mut file::Config) {
        if let Some(listen) = &self.listen {
            file.listen = listen.clone();
        }
        if let Some(listen) = &self.admin_listen {
            file.admin.listen = listen.clone();
        }
    }
}

/// An error about a value that may have been overridden, blamed on the flag or variable it came
/// from (`from`), else on the file's `key`.
pub(super) fn blame(source: &str, key: &str, from: Option<&str>, message: String) -> ConfigError {
    match from {
        Some(from) => err(
            from,
            "",
            format!("{message} (it overrides `{key}` of {source})"),
        ),
        None => err(source, key, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_environment_and_are_blamed() {
        let env = Overrides {
            listen: Some("0.0.0.0:1".into()),
            listen_from: Some(ENV_LISTEN),
            admin_listen: Some("0.0.0.0:2".into()),
            admin_listen_from: Some(ENV_ADMIN_LISTEN),
        };
        let merged = env.merge(Overrides::from_flags(Some("127.0.0.1:3".into()), None));
        assert_eq!(merged.listen.as_deref(), Some("127.0.0.1:3"));
        assert_eq!(merged.listen_from, Some(FLAG_LISTEN));
        assert_eq!(merged.admin_listen_from, Some(ENV_ADMIN_LISTEN));
        let e = blame("f.yaml", "listen", merged.listen_from, "bad".into());
        assert_eq!(
            e.to_string(),
            "--listen: bad (it overrides `listen` of f.yaml)"
        );
        let e = blame("f.yaml", "listen", None, "bad".into());
        assert_eq!(e.to_string(), "f.yaml: listen: bad");
    }
}
