//! Assembles the Pingora server from the validated configuration and runs it until a signal:
//! SIGTERM/SIGINT stop admitting, drain in-flight requests (up to `shutdown.drain_timeout`),
//! stop the supervised instances, then exit 0.

use crate::app::App;
use crate::config::Config;
use crate::memory;
use crate::metrics;
use crate::proxy::SidecarProxy;
use crate::supervisor::Supervisor;
use crate::upstream::{health, models};
use async_trait::async_trait;
use pingora_core::listeners::ListenerConfig;
use pingora_core::protocols::l4::stream::{L4BufferSettings, DEFAULT_L4_WRITE_BUFFER_SIZE};
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora_core::services::background::{background_service, BackgroundService};
use std::sync::Arc;

/// Checks the listening addresses can be bound, so a port in use is one clear line, not a panic
/// deep inside a worker thread.
fn check_bindable(what: &str, addr: std::net::SocketAddr) -> Result<(), String> {
    std::net::TcpListener::bind(addr)
        .map(drop)
        .map_err(|e| format!("cannot listen on {addr} ({what}): {e}"))
}

pub fn run(config: Config) -> Result<(), String> {
    check_bindable("listen", config.listen)?;
    check_bindable("admin.listen", config.admin_listen)?;

    let app = App::new(config);
    let supervisor = Supervisor::new(&app);
    supervisor.preflight()?;
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

    let mut server = Server::new_with_opt_and_conf(None, server_conf(app.config.threads));
    server.bootstrap();

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
        SupervisorService(supervisor.clone()),
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
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainingShutdown { app, supervisor }),
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

struct SupervisorService(Arc<Supervisor>);

#[async_trait]
impl BackgroundService for SupervisorService {
    async fn start(&self, _shutdown: ShutdownWatch) {
        self.0.clone().run().await;
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
        );
    }
}

/// Waits for SIGTERM or SIGINT, then drains and stops the instances before letting Pingora
/// tear down its runtimes (a quick shutdown: the waiting was done here).
struct DrainingShutdown {
    app: Arc<App>,
    supervisor: Arc<Supervisor>,
}

#[async_trait]
impl ShutdownSignalWatch for DrainingShutdown {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            _ => {
                tracing::error!("cannot install signal handlers; shutting down");
                self.supervisor.stop().await;
                return ShutdownSignal::FastShutdown;
            }
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
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
