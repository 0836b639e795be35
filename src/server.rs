//! Assembles the Pingora server from the validated configuration and runs it until a signal:
//! SIGTERM/SIGINT stop admitting, drain in-flight requests (up to `shutdown.drain_timeout`),
//! stop the supervised instances, then exit 0. SIGQUIT hands the listening sockets to a new
//! process started with `--upgrade` (see `upgrade`), then drains the same way and exits 0.

use crate::app::App;
use crate::config::Config;
use crate::memory;
use crate::metrics;
use crate::proxy::SidecarProxy;
use crate::supervisor::Supervisor;
use crate::upgrade::{ListenTable, UpgradeOpts};
use crate::upstream::{health, models};
use async_trait::async_trait;
use pingora_core::listeners::ListenerConfig;
use pingora_core::protocols::l4::stream::{L4BufferSettings, DEFAULT_L4_WRITE_BUFFER_SIZE};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{
    ExecutionPhase, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch,
};
use pingora_core::services::background::{background_service, BackgroundService};
use std::sync::Arc;
use std::time::Duration;

/// Checks the listening addresses can be bound, so a port in use is one clear line, not a panic
/// deep inside a worker thread.
fn check_bindable(what: &str, addr: std::net::SocketAddr) -> Result<(), String> {
    std::net::TcpListener::bind(addr)
        .map(drop)
        .map_err(|e| format!("cannot listen on {addr} ({what}): {e}"))
}

pub fn run(config: Config, upgrade: UpgradeOpts) -> Result<(), String> {
    // Taking over, the ports are the old process's until the hand-over, as are the supervised
    // instances' ports until it has drained.
    if !upgrade.take_over {
        check_bindable("listen", config.listen)?;
        check_bindable("admin.listen", config.admin_listen)?;
    }

    let app = App::new(config);
    let supervisor = Supervisor::new(&app);
    if upgrade.take_over {
        crate::upgrade::preflight_without_ports(&app)?;
    } else {
        supervisor.preflight()?;
    }
    // External instances get their first health check before any request arrives. (A runtime
    // of its own, dropped before Pingora starts its own.)
    let startup = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the startup runtime: {e}"))?;
    startup.block_on(health::initial_check(&app.registry, &app.config.health));
    // A host-name lookup still waiting on a slow DNS server must not hold up the start (a
    // dropped runtime would wait for it).
    startup.shutdown_background();

    let mut conf = server_conf(app.config.threads);
    conf.upgrade_sock = upgrade.sock.to_string_lossy().into_owned();
    // After a hand-over our drain runs in Pingora's grace period and ends the process itself;
    // this bounds it should that fail (a plain SIGTERM shuts down without a grace period).
    conf.grace_period_seconds = Some(crate::upgrade::grace_period(&app).as_secs());
    let opt = Opt {
        upgrade: upgrade.take_over,
        ..Opt::default()
    };
    if upgrade.take_over {
        tracing::info!(upgrade_sock = %upgrade.sock.display(), "waiting for the running sidecar's sockets (send it SIGQUIT)");
    }
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    // Taking over, this waits for the old process's sockets (Pingora gives up after 5 s).
    server.bootstrap();
    if upgrade.take_over {
        tracing::info!("listening sockets taken over");
        crate::upgrade::notify_systemd_main_pid();
    }
    let listen_table = ListenTable::default();
    server.add_service(listen_table.clone());

    let mut proxy = pingora_proxy::http_proxy_service_with_name(
        &server.configuration,
        SidecarProxy::new(app.clone()),
        "ollama-sidecar proxy",
    );
    proxy.add_listener(proxy_listener(app.config.listen.to_string()));
    server.add_service(proxy);
    // Build the metrics before the first request records anything.
    let _ = metrics::global();
    // The policy's counters, and with `shared_state` its Redis connection, before the first request.
    let _ = crate::policy::Policy::global(&app);
    server.add_service(crate::admin::service(app.clone()));
    server.add_service(background_service(
        "supervisor",
        SupervisorService {
            supervisor: supervisor.clone(),
            after_upgrade: upgrade.take_over.then(|| app.clone()),
        },
    ));
    server.add_service(background_service(
        "instance watch",
        InstanceWatch(app.clone()),
    ));
    server.add_service(background_service(
        "reload",
        crate::reload::ReloadService::new(app.clone(), supervisor.clone()),
    ));

    tracing::info!(
        listen = %app.config.listen,
        admin = %app.config.admin_listen,
        instances = app.config.instances.len(),
        threads = app.config.threads,
        config = %app.config.source,
        "ollama-sidecar starting"
    );
    let phases = std::sync::Mutex::new(Some(server.watch_execution_phase()));
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainingShutdown {
            app,
            supervisor,
            listen_table,
            upgrade_sock: upgrade.sock,
            phases,
        }),
    });
    tracing::info!("ollama-sidecar stopped");
    Ok(())
}

/// The Pingora server options (also used by `examples/pingora_floor.rs`, which must match).
pub fn server_conf(threads: usize) -> ServerConf {
    ServerConf {
        threads,
        // Our own shutdown watch drains; Pingora must not sleep a further grace period.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    }
}

/// The proxy's listener (also used by `examples/pingora_floor.rs`). No TLS on it, and HTTP/1
/// reads headers and bodies into buffers of its own: a 64 KiB read buffer per connection
/// (Pingora's default) would only add a copy and memory.
pub fn proxy_listener(addr: String) -> ListenerConfig {
    ListenerConfig::tcp(addr).l4_buffer(L4BufferSettings::new(0, DEFAULT_L4_WRITE_BUFFER_SIZE))
}

struct SupervisorService {
    supervisor: Arc<Supervisor>,
    /// Set in a process that took over: its instances start once the old process's are gone.
    after_upgrade: Option<Arc<App>>,
}

#[async_trait]
impl BackgroundService for SupervisorService {
    async fn start(&self, _shutdown: ShutdownWatch) {
        if let Some(app) = &self.after_upgrade {
            crate::upgrade::await_old_instances(app).await;
        }
        self.supervisor.clone().run().await;
    }
}

/// Health-checks external instances, learns which models each instance has loaded, and re-runs
/// dispatch when an instance changes; reads the models each instance lists for the metrics'
/// model allow-list; returns freed memory to the system once load falls.
struct InstanceWatch(Arc<App>);

#[async_trait]
impl BackgroundService for InstanceWatch {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let app = &self.0;
        tokio::join!(
            health::check_external_instances(app.registry.clone(), app.config.health.clone()),
            models::poll_loaded_models(app.registry.clone(), app.config.health.models_interval),
            models::poke_on_change(app.registry.clone(), app.admission.clone()),
            metrics::poll_known_models(app.registry.clone(), metrics::global()),
            memory::release_after_load(app.lifecycle.clone()),
            crate::admin::history::sample(app.clone()),
            crate::upstream::pinned::keep_pinned(app.registry.clone(), app.config.models.clone()),
        );
    }
}

/// Waits for SIGTERM or SIGINT, then drains and stops the instances before letting Pingora
/// tear down its runtimes (a quick shutdown: the waiting was done here). SIGQUIT hands the
/// listening sockets over first; then Pingora stops accepting and our drain ends the process.
struct DrainingShutdown {
    app: Arc<App>,
    supervisor: Arc<Supervisor>,
    listen_table: ListenTable,
    upgrade_sock: std::path::PathBuf,
    phases: std::sync::Mutex<Option<tokio::sync::broadcast::Receiver<ExecutionPhase>>>,
}

#[async_trait]
impl ShutdownSignalWatch for DrainingShutdown {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int, mut quit, mut usr2) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
            signal(SignalKind::user_defined2()),
        ) {
            (Ok(t), Ok(i), Ok(q), Ok(u)) => (t, i, q, u),
            _ => {
                tracing::error!("cannot install signal handlers; shutting down");
                self.supervisor.stop().await;
                return ShutdownSignal::FastShutdown;
            }
        };
        let name = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = quit.recv() => {
                    if self.hand_over(&mut term, &mut int).await {
                        // Pingora now stops accepting (and closes idle keep-alive connections);
                        // the drain runs after that, in its grace period.
                        return ShutdownSignal::GracefulTerminate;
                    }
                }
                // SIGUSR2: start the successor ourselves (the executable now at our path), so
                // that it runs where we run (a systemd unit's cgroup), then hand over to it.
                _ = usr2.recv() => {
                    if crate::upgrade::spawn_successor().is_ok()
                        && self.hand_over(&mut term, &mut int).await
                    {
                        return ShutdownSignal::GracefulTerminate;
                    }
                }
            }
        };
        let lifecycle = &self.app.lifecycle;
        lifecycle.start_draining();
        // Queued requests are refused now; admitted ones finish within the drain.
        self.app.admission.close();
        let timeout = self.app.config.drain_timeout;
        tracing::info!(signal = name, in_flight = lifecycle.active(), drain_timeout = %humantime::format_duration(timeout), "draining");
        // A second signal skips the rest of the drain.
        let drained = tokio::select! {
            d = lifecycle.drained(timeout) => d,
            _ = term.recv() => false,
            _ = int.recv() => false,
        };
        if !drained {
            tracing::warn!(
                in_flight = lifecycle.active(),
                "drain ended with requests still in flight; they are cut"
            );
        }
        self.supervisor.stop().await;
        ShutdownSignal::FastShutdown
    }
}

impl DrainingShutdown {
    /// Sends the listening sockets to the new process and starts the drain that ends this one;
    /// false (and this process keeps serving) when the hand-over failed.
    async fn hand_over(
        &self,
        term: &mut tokio::signal::unix::Signal,
        int: &mut tokio::signal::unix::Signal,
    ) -> bool {
        let in_flight = self.app.lifecycle.active();
        tracing::info!(
            upgrade_sock = %self.upgrade_sock.display(),
            in_flight,
            "SIGQUIT: handing the listening sockets to the new process"
        );
        match self.listen_table.hand_over(&self.upgrade_sock).await {
            Ok(count) => tracing::info!(sockets = count, "listening sockets handed over"),
            Err(e) => {
                tracing::error!(error = %e, "upgrade failed; this process keeps serving");
                return false;
            }
        }
        // Both processes accept for a moment; ours answer with `Connection: close` meanwhile,
        // until no client may still reuse a connection to us. SIGTERM/SIGINT cut all waiting
        // short, as in a plain shutdown.
        let wind_down = async {
            tokio::time::sleep(crate::upgrade::OVERLAP).await;
            crate::upgrade::await_keepalive_promises(self.app.config.drain_timeout).await;
        };
        let drain_timeout = tokio::select! {
            _ = wind_down => self.app.config.drain_timeout,
            _ = term.recv() => Duration::ZERO,
            _ = int.recv() => Duration::ZERO,
        };
        let phases = self.phases.lock().ok().and_then(|mut p| p.take());
        tokio::spawn(crate::upgrade::drain_then_exit(
            self.app.clone(),
            self.supervisor.clone(),
            phases,
            drain_timeout,
        ));
        true
    }
}
