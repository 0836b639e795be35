//! Binary upgrade without dropped connections: the running sidecar hands its listening sockets
//! (proxy and admin) to a new one started with `--upgrade`, then finishes its requests and exits.
//!
//! The transfer is Pingora's own (`pingora_core::server::Fds`, one Unix socket, `SCM_RIGHTS`):
//! the new process waits on `upgrade_sock` during its bootstrap; the old one, on SIGQUIT, sends
//! every listening socket there. We send them ourselves rather than through Pingora's SIGQUIT
//! path so that a failed transfer leaves the old process serving (Pingora would shut it down
//! anyway), and so that the drain afterwards follows `shutdown.drain_timeout` (Pingora's would
//! be a fixed sleep). Supervised instances are restarted, not adopted: see
//! docs/adr/0003-binary-upgrade.md.

use crate::app::App;
use crate::config::SupervisedSpec;
use crate::supervisor::preflight::{self, SearchPath};
use crate::supervisor::Supervisor;
use async_trait::async_trait;
use pingora_core::server::{ExecutionPhase, ListenFds};
use pingora_core::services::Service;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::broadcast;

/// The environment variable that names the upgrade socket (the flag `--upgrade-sock` wins).
pub const ENV_UPGRADE_SOCK: &str = "OLLAMA_SIDECAR_UPGRADE_SOCK";

/// The socket's file name in its directory.
const SOCK_NAME: &str = "ollama-sidecar-upgrade.sock";

/// How long both processes accept on the handed-over sockets at least before the old one stops
/// (it also waits for its keep-alive responses to end, see [`await_keepalive_promises`]).
pub const OVERLAP: Duration = Duration::from_secs(1);

/// How long the old process waits for the new one's socket to appear when SIGQUIT comes first.
const WAIT_FOR_NEW: Duration = Duration::from_secs(5);

/// The default upgrade socket: `$RUNTIME_DIRECTORY/ollama-sidecar-upgrade.sock` under systemd
/// (`RuntimeDirectory=`), else in the temporary directory (`$TMPDIR`, else /tmp).
pub fn default_sock() -> PathBuf {
    let dir = std::env::var_os("RUNTIME_DIRECTORY")
        .filter(|d| !d.is_empty())
        // systemd may list several directories separated by colons: the first is ours.
        .and_then(|d| {
            d.to_str()
                .and_then(|s| s.split(':').next())
                .map(PathBuf::from)
        })
        .unwrap_or_else(std::env::temp_dir);
    dir.join(SOCK_NAME)
}

/// How this process starts and where the hand-over happens.
#[derive(Debug, Clone)]
pub struct UpgradeOpts {
    /// Take the listening sockets over from a running sidecar instead of binding them.
    pub take_over: bool,
    /// The Unix socket the sockets travel through (both directions use the same path).
    pub sock: PathBuf,
}

/// Set in the old process once its sockets are handed over: its responses then say
/// `Connection: close`, so keep-alive clients reconnect, to the new process.
static HANDED_OVER: AtomicBool = AtomicBool::new(false);

pub fn handed_over() -> bool {
    HANDED_OVER.load(Ordering::SeqCst)
}

/// Responses that went out without `Connection: close` and have not ended: their clients may
/// send the next request on the same connection, which the old process must still read.
static KEEPALIVE_PROMISED: AtomicUsize = AtomicUsize::new(0);

/// Held by a request whose response headers go out promising keep-alive; counted until the
/// request ends.
pub struct KeepAlivePromise(());

impl Drop for KeepAlivePromise {
    fn drop(&mut self) {
        KEEPALIVE_PROMISED.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Called where a response's headers are decided: a promise when keep-alive may be offered,
/// `None` when the sockets are handed over and the response must say `Connection: close`.
pub fn keepalive_promise() -> Option<KeepAlivePromise> {
    // Counted before the flag is read: a hand-over that sets the flag then reads the count
    // cannot miss this response.
    KEEPALIVE_PROMISED.fetch_add(1, Ordering::SeqCst);
    let promise = KeepAlivePromise(());
    (!handed_over()).then_some(promise)
}

/// How long the old process keeps reading from its connections after the last keep-alive
/// response ended, for the clients' next requests to arrive (they are then answered with
/// `Connection: close`).
const SETTLE: Duration = Duration::from_millis(500);

/// Waits (up to `limit`) until every response that promised keep-alive has ended, then
/// [`SETTLE`]: Pingora closes idle connections when it stops accepting, and a client that
/// sends its next request on one just then would see a reset.
pub async fn await_keepalive_promises(limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while KEEPALIVE_PROMISED.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(SETTLE).await;
}

/// Pingora's table of listening sockets, which it gives to every service when it starts it. The
/// listening services add the sockets they bind to it; this service only keeps a handle on it.
#[derive(Clone, Default)]
pub struct ListenTable(Arc<OnceLock<ListenFds>>);

#[async_trait]
impl Service for ListenTable {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        _shutdown: pingora_core::server::ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        if let Some(fds) = fds {
            let _ = self.0.set(fds);
        }
    }

    fn name(&self) -> &str {
        "listen table"
    }

    fn threads(&self) -> Option<usize> {
        Some(1)
    }
}

impl ListenTable {
    /// Sends every listening socket to the new process waiting on `sock`; the number sent.
    pub async fn hand_over(&self, sock: &Path) -> Result<usize, String> {
        let fds = self
            .0
            .get()
            .cloned()
            .ok_or("the listening sockets are not open yet")?;
        let count = fds.lock().serialize().0.len();
        if count == 0 {
            return Err("no listening socket to hand over".into());
        }
        if !wait_for_socket(sock, WAIT_FOR_NEW).await {
            return Err(format!(
                "no new process waits on {} (start `ollama-sidecar --upgrade` first)",
                sock.display()
            ));
        }
        let path = sock.to_path_buf();
        // Pingora's transfer blocks (connect retries sleep): off the runtime's worker.
        tokio::task::spawn_blocking(move || {
            let path = path.to_string_lossy().into_owned();
            fds.lock().send_to_sock(path.as_str())
        })
        .await
        .map_err(|e| format!("the hand-over task failed: {e}"))?
        .map_err(|e| format!("cannot send the sockets to {}: {e}", sock.display()))?;
        HANDED_OVER.store(true, Ordering::SeqCst);
        Ok(count)
    }
}

/// Whether a Unix socket exists at `path` within `limit` (the new process creates it when it
/// starts to wait).
async fn wait_for_socket(path: &Path, limit: Duration) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every port is free (the old process has stopped its instances), up to `limit`;
/// the ports still held when it gives up.
pub async fn await_free_ports(ports: &[u16], limit: Duration) -> Vec<u16> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let held: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|&p| !crate::supervisor::preflight::port_is_free(p))
            .collect();
        if held.is_empty() || tokio::time::Instant::now() >= deadline {
            return held;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The supervised instances' (index, spec), as the configuration lists them.
fn supervised(app: &App) -> impl Iterator<Item = (usize, &str, &SupervisedSpec)> {
    app.config
        .instances
        .iter()
        .enumerate()
        .filter_map(|(i, c)| Some((i, c.name.as_str(), c.supervised.as_ref()?)))
}

/// The supervisor's checks before a take-over, but for the ports: the old process's instances
/// hold them until it has drained.
pub fn preflight_without_ports(app: &App) -> Result<(), String> {
    let search = SearchPath::current();
    supervised(app)
        .try_for_each(|(i, name, spec)| preflight::check_instance_setup(i, name, spec, &search))
}

/// The longest the old process can take from the hand-over to its exit: its drain, then its
/// instances' stop (SIGTERM, `stop_grace`, SIGKILL), plus a margin.
pub fn grace_period(app: &App) -> Duration {
    let stop = supervised(app)
        .map(|(_, _, s)| s.stop_grace)
        .max()
        .unwrap_or_default();
    app.config.drain_timeout + stop + Duration::from_secs(5)
}

/// In a process that took over: waits until the old process has stopped its supervised
/// instances (their ports are free), so that no second Ollama starts on a port. Requests queue
/// for a slot meanwhile (admission `max_wait`).
pub async fn await_old_instances(app: &App) {
    let ports: Vec<u16> = supervised(app).map(|(_, _, s)| s.port).collect();
    if ports.is_empty() {
        return;
    }
    let started = std::time::Instant::now();
    tracing::info!(?ports, "waiting for the old process to stop its instances");
    let held = await_free_ports(&ports, grace_period(app) + OVERLAP).await;
    if held.is_empty() {
        tracing::info!(
            waited_ms = started.elapsed().as_millis() as u64,
            "the old process's instances are gone; starting ours"
        );
    } else {
        // The supervisor reports each port still in use and retries with its backoff.
        tracing::warn!(?held, "ports still in use after the old process's drain");
    }
}

/// In the old process after the hand-over: once Pingora has stopped accepting, waits for the
/// requests in flight (up to `timeout`: `shutdown.drain_timeout`, zero after a SIGTERM), stops
/// the supervised instances, exits 0.
pub async fn drain_then_exit(
    app: Arc<App>,
    supervisor: Arc<Supervisor>,
    phases: Option<broadcast::Receiver<ExecutionPhase>>,
    timeout: Duration,
) {
    if let Some(mut phases) = phases {
        // Pingora sends this phase once its listeners stop accepting; a closed channel (or a
        // lagging receiver that missed it) proceeds too.
        loop {
            match phases.recv().await {
                Ok(ExecutionPhase::GracefulTerminate)
                | Err(broadcast::error::RecvError::Closed) => break,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            }
        }
    }
    let lifecycle = &app.lifecycle;
    tracing::info!(in_flight = lifecycle.active(), drain_timeout = %humantime::format_duration(timeout), "no longer accepting; draining before the exit");
    // Tokio keeps our handler installed, so SIGTERM/SIGINT would otherwise be ignored: either
    // skips the rest of the drain, as in a plain shutdown.
    let drained = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            d = lifecycle.drained(timeout) => d,
            _ = term.recv() => false,
            _ = int.recv() => false,
        },
        _ => lifecycle.drained(timeout).await,
    };
    if !drained {
        tracing::warn!(
            in_flight = lifecycle.active(),
            "drain ended with requests still in flight; they are cut"
        );
    }
    supervisor.stop().await;
    tracing::info!("ollama-sidecar handed over and stopped");
    std::process::exit(0);
}

/// The executable this process was started from, by path: after `install` replaced the file,
/// that path is the new binary.
static EXECUTABLE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Records the executable's path; call at startup, before the file can be replaced.
pub fn remember_executable() {
    EXECUTABLE.get_or_init(|| std::env::current_exe().ok());
}

/// Starts the executable at our path with our own arguments plus `--upgrade` (SIGUSR2). It
/// inherits our environment, output and cgroup; it waits for the sockets, which the caller
/// then hands over.
pub fn spawn_successor() -> Result<(), String> {
    let result = EXECUTABLE
        .get()
        .cloned()
        .flatten()
        .ok_or_else(|| "the executable's path is unknown".to_string())
        .and_then(|exe| {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(std::env::args_os().skip(1));
            if !std::env::args_os().any(|a| a == "--upgrade") {
                cmd.arg("--upgrade");
            }
            cmd.spawn()
                .map(|child| tracing::info!(pid = child.id(), executable = %exe.display(), "SIGUSR2: started the new process"))
                .map_err(|e| format!("cannot start {}: {e}", exe.display()))
        });
    if let Err(e) = &result {
        tracing::error!(error = %e, "upgrade failed; this process keeps serving");
    }
    result
}

/// Under systemd (`NOTIFY_SOCKET`, with `NotifyAccess=all` in the unit), tells it that this
/// process is now the service's main process, so that the old one's exit ends nothing.
pub fn notify_systemd_main_pid() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message = format!("MAINPID={}\nREADY=1\n", std::process::id());
    let sent = match path.to_str() {
        // An abstract socket (`@name`): its name starts with a NUL byte.
        Some(name) if name.starts_with('@') => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(&name.as_bytes()[1..]).and_then(
                |addr| {
                    std::os::unix::net::UnixDatagram::unbound()
                        .and_then(|s| s.send_to_addr(message.as_bytes(), &addr))
                },
            )
        }
        _ => std::os::unix::net::UnixDatagram::unbound()
            .and_then(|s| s.send_to(message.as_bytes(), &path)),
    };
    match sent {
        Ok(_) => tracing::info!(
            pid = std::process::id(),
            "told systemd this is the main process now"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot notify systemd of the new main process"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_socket_is_not_waited_for_beyond_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let start = std::time::Instant::now();
        assert!(!wait_for_socket(&dir.path().join("none.sock"), Duration::from_millis(200)).await);
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_listening_unix_socket_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(wait_for_socket(&path, Duration::from_millis(200)).await);
        // A regular file at the path is not a waiting process.
        let file = dir.path().join("plain");
        std::fs::write(&file, b"").unwrap();
        assert!(!wait_for_socket(&file, Duration::from_millis(100)).await);
    }

    #[tokio::test]
    async fn a_table_without_sockets_refuses_to_hand_over() {
        let table = ListenTable::default();
        let err = table
            .hand_over(Path::new("/nonexistent"))
            .await
            .unwrap_err();
        assert!(err.contains("not open yet"), "{err}");
    }
}
