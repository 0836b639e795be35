//! Checks made once, synchronously, before anything starts: every command resolves to an
//! executable, every port is free, the environment can be passed to `execve`, every log file can
//! be appended to. Each failure is one line that names the instance and the key to fix.

use crate::config::SupervisedSpec;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Where to look for a bare command name: `PATH`, then the sidecar's own directory.
#[derive(Debug, Clone)]
pub struct SearchPath {
    pub path: Option<OsString>,
    pub exe_dir: Option<PathBuf>,
}

impl SearchPath {
    /// The sidecar's own `PATH` and executable directory.
    pub fn current() -> SearchPath {
        SearchPath {
            path: std::env::var_os("PATH"),
            exe_dir: std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf)),
        }
    }
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Resolves `command`: a path containing `/` is used as is (relative to the working directory);
/// a bare name is searched on `PATH`, then beside the sidecar's own executable (which lets the
/// demo configuration say `command: mock-ollama`).
pub fn resolve_command(command: &str, search: &SearchPath) -> Result<PathBuf, String> {
    if command.contains('/') {
        let path = PathBuf::from(command);
        return match std::fs::metadata(&path) {
            Err(e) => Err(format!("command `{command}` cannot be used: {e}")),
            Ok(m) if !m.is_file() => Err(format!("command `{command}` is not a file")),
            Ok(_) if !is_executable_file(&path) => {
                Err(format!("command `{command}` is not executable"))
            }
            Ok(_) => Ok(path),
        };
    }
    let on_path = search
        .path
        .iter()
        .flat_map(std::env::split_paths)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(command))
        .find(|p| is_executable_file(p));
    if let Some(p) = on_path {
        return Ok(p);
    }
    if let Some(p) = search
        .exe_dir
        .as_ref()
        .map(|d| d.join(command))
        .filter(|p| is_executable_file(p))
    {
        return Ok(p);
    }
    Err(format!(
        "command `{command}` not found on PATH or beside ollama-sidecar"
    ))
}

/// True when nothing listens on `127.0.0.1:port` (a bind succeeds; the listener is closed at
/// once). `std` sets `SO_REUSEADDR`, so connections in TIME_WAIT do not count.
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).is_ok()
}

/// Opens (creating it and its parent directories) a log file for appending.
pub fn open_log_file(path: &Path) -> std::io::Result<File> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// Every check for one instance; `index` is its position in `instances` (for the key to fix).
pub fn check_instance(
    index: usize,
    name: &str,
    spec: &SupervisedSpec,
    search: &SearchPath,
) -> Result<(), String> {
    check_instance_setup(index, name, spec, search)?;
    if !port_is_free(spec.port) {
        return Err(format!(
            "instance `{name}`: port {} is already in use by another process; the sidecar never kills processes it did not start",
            spec.port
        ));
    }
    Ok(())
}

/// Every check but the free port (during a binary upgrade the old process still holds it).
pub fn check_instance_setup(
    index: usize,
    name: &str,
    spec: &SupervisedSpec,
    search: &SearchPath,
) -> Result<(), String> {
    let key = |k: &str| format!("instances[{index}].{k}");
    resolve_command(&spec.command, search).map_err(|e| {
        let hint = if spec.command.contains('/') {
            format!("fix {}", key("command"))
        } else {
            format!("install Ollama or set {}", key("command"))
        };
        format!("instance `{name}`: {e}; {hint}")
    })?;
    for arg in &spec.args {
        if arg.contains('\0') {
            return Err(format!(
                "instance `{name}`: {} contains a NUL byte",
                key("args")
            ));
        }
    }
    for (k, v) in &spec.env {
        if v.contains('\0') {
            return Err(format!(
                "instance `{name}`: {}.{k} contains a NUL byte",
                key("env")
            ));
        }
    }
    for (what, value) in [
        ("gpus", spec.gpus.as_deref()),
        ("keep_alive", spec.keep_alive.as_deref()),
    ] {
        if value.is_some_and(|v| v.contains('\0')) {
            return Err(format!(
                "instance `{name}`: {} contains a NUL byte",
                key(what)
            ));
        }
    }
    if let Some(path) = &spec.log_file {
        open_log_file(path).map_err(|e| {
            format!(
                "instance `{name}`: cannot write {} `{}`: {e}",
                key("log_file"),
                path.display()
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn exe(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn resolves_path_then_beside_the_sidecar() {
        let on_path = tempfile::tempdir().unwrap();
        let beside = tempfile::tempdir().unwrap();
        let a = exe(on_path.path(), "tool");
        let b = exe(beside.path(), "tool");
        exe(beside.path(), "only-beside");
        let search = SearchPath {
            path: Some(std::env::join_paths([on_path.path()]).unwrap()),
            exe_dir: Some(beside.path().to_path_buf()),
        };
        assert_eq!(resolve_command("tool", &search).unwrap(), a);
        assert_eq!(
            resolve_command("only-beside", &search).unwrap(),
            beside.path().join("only-beside")
        );
        assert_eq!(resolve_command(b.to_str().unwrap(), &search).unwrap(), b);
        let e = resolve_command("nope", &search).unwrap_err();
        assert_eq!(
            e,
            "command `nope` not found on PATH or beside ollama-sidecar"
        );
    }

    #[test]
    fn rejects_non_executables() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data");
        std::fs::write(&p, "x").unwrap();
        let search = SearchPath {
            path: Some(dir.path().as_os_str().to_owned()),
            exe_dir: None,
        };
        assert!(resolve_command("data", &search).is_err());
        assert!(resolve_command(p.to_str().unwrap(), &search)
            .unwrap_err()
            .contains("is not executable"));
        assert!(resolve_command(dir.path().to_str().unwrap(), &search)
            .unwrap_err()
            .contains("is not a file"));
    }

    #[test]
    fn port_in_use_is_seen() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(!port_is_free(port));
        drop(l);
        assert!(port_is_free(port));
    }

    #[test]
    fn log_file_parents_are_created() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/gpu0.log");
        open_log_file(&p).unwrap();
        assert!(p.exists());
    }
}
