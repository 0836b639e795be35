//! The client of the state several sidecars share: one multiplexed Redis connection, kept up by
//! a thread of its own. Every call is bounded by `shared_state.timeout` and never waits for a
//! connection: while Redis is down a call fails at once, and the keeper reconnects in the
//! background (0.1 s, doubling up to 2 s), so limits recover without a restart.
//!
//! The connection's I/O task runs on the keeper's runtime, not on a Pingora worker's, so calls
//! from any worker thread share one socket (requests pipelined on it) and nothing depends on
//! which runtime made the connection.

use crate::config::{redact_url, SharedStateConfig};
use crate::metrics;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, FromRedisValue, ScriptInvocation};
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// First wait between reconnection attempts; it doubles up to [`MAX_RECONNECT_BACKOFF`].
pub const MIN_RECONNECT_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(2);
/// How often the keeper checks the connection with `PING`.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);
/// A `PING` unanswered for `timeout`, and at least this long, drops the connection: one slow
/// call is not reason enough.
pub const MIN_PING_TIMEOUT: Duration = Duration::from_millis(200);

/// Why a call got no answer.
#[derive(Debug)]
pub enum CallError {
    /// Not connected: nothing was sent.
    Unavailable,
    /// No answer within `shared_state.timeout`.
    Timeout,
    /// Redis answered with an error, or the connection broke.
    Failed(redis::RedisError),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unavailable => write!(f, "not connected"),
            CallError::Timeout => write!(f, "no answer within the timeout"),
            CallError::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// A Redis connection kept up in the background.
pub struct SharedState {
    timeout: Duration,
    connection: RwLock<Option<MultiplexedConnection>>,
    /// A failed call asks the keeper to check the connection at once.
    suspect: Notify,
    runtime: tokio::runtime::Handle,
}

impl SharedState {
    /// Starts the keeper thread and waits (up to `connect_timeout`) for the first connection,
    /// so the first requests find it; an unreachable Redis is retried in the background.
    pub fn start(config: &SharedStateConfig) -> Result<Arc<SharedState>, String> {
        let url = config.redis.clone();
        let client = redis::Client::open(url.as_str())
            .map_err(|e| format!("shared_state.redis `{}`: {e}", redact_url(&url)))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the shared-state runtime: {e}"))?;
        let state = Arc::new(SharedState {
            timeout: config.timeout,
            connection: RwLock::new(None),
            suspect: Notify::new(),
            runtime: runtime.handle().clone(),
        });
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let keeper = Keeper {
            state: state.clone(),
            client,
            url: redact_url(&url),
            connect_timeout: config.connect_timeout,
        };
        std::thread::Builder::new()
            .name("shared-state".into())
            .spawn(move || runtime.block_on(keeper.run(first_tx)))
            .map_err(|e| format!("cannot start the shared-state thread: {e}"))?;
        let _ = first_rx.recv_timeout(config.connect_timeout + Duration::from_millis(100));
        Ok(state)
    }

    /// Whether a connection is up now.
    pub fn is_up(&self) -> bool {
        self.current().is_some()
    }

    fn current(&self) -> Option<MultiplexedConnection> {
        self.connection
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, connection: Option<MultiplexedConnection>) {
        metrics::global().shared_state_up(connection.is_some());
        *self.connection.write().unwrap_or_else(|p| p.into_inner()) = connection;
    }

    /// Runs a script (EVALSHA, loading it after a Redis restart), bounded by the timeout.
    pub async fn invoke<T: FromRedisValue>(
        &self,
        script: &ScriptInvocation<'_>,
    ) -> Result<T, CallError> {
        let Some(mut connection) = self.current() else {
            return Err(CallError::Unavailable);
        };
        let started = Instant::now();
        let answer = tokio::time::timeout(self.timeout, script.invoke_async(&mut connection)).await;
        metrics::global().shared_state_call(started.elapsed());
        match answer {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                metrics::global().shared_state_error("error");
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.suspect.notify_one();
                }
                Err(CallError::Failed(e))
            }
            Err(_) => {
                metrics::global().shared_state_error("timeout");
                self.suspect.notify_one();
                Err(CallError::Timeout)
            }
        }
    }

    /// Runs work off the request path (releases, renewals) on the keeper's runtime.
    pub fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.runtime.spawn(work);
    }
}

/// Connects, checks the connection, and reconnects after failures.
struct Keeper {
    state: Arc<SharedState>,
    client: redis::Client,
    /// For messages: without the password.
    url: String,
    connect_timeout: Duration,
}

impl Keeper {
    async fn run(self, first: std::sync::mpsc::Sender<()>) {
        let mut backoff = MIN_RECONNECT_BACKOFF;
        let mut first = Some(first);
        let mut was_up = true;
        loop {
            if !self.state.is_up() {
                match self.connect().await {
                    Ok(connection) => {
                        self.state.set(Some(connection));
                        tracing::info!(redis = %self.url, "shared limits: connected to Redis");
                        backoff = MIN_RECONNECT_BACKOFF;
                        was_up = true;
                    }
                    Err(e) => {
                        self.state.set(None);
                        if was_up {
                            tracing::warn!(redis = %self.url, error = %e, "shared limits: Redis unreachable; limits follow shared_state.on_error until it answers");
                            was_up = false;
                        }
                        first.take().map(|tx| tx.send(()));
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_RECONNECT_BACKOFF);
                        continue;
                    }
                }
            }
            first.take().map(|tx| tx.send(()));
            tokio::select! {
                _ = self.state.suspect.notified() => {}
                _ = tokio::time::sleep(PING_INTERVAL) => {}
            }
            if let Err(e) = self.ping().await {
                self.state.set(None);
                tracing::warn!(redis = %self.url, error = %e, "shared limits: Redis stopped answering; limits follow shared_state.on_error until it answers");
                was_up = false;
            }
        }
    }

    async fn connect(&self) -> Result<MultiplexedConnection, CallError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.connect_timeout));
        let attempt = async {
            let mut connection = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(CallError::Failed)?;
            redis::cmd("PING")
                .query_async::<()>(&mut connection)
                .await
                .map_err(CallError::Failed)?;
            Ok(connection)
        };
        tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .unwrap_or(Err(CallError::Timeout))
    }

    /// A `PING` within the call timeout (a stopped Redis accepts bytes but never answers).
    async fn ping(&self) -> Result<(), CallError> {
        let Some(mut connection) = self.state.current() else {
            return Err(CallError::Unavailable);
        };
        let ping = redis::cmd("PING");
        let answer = ping.query_async::<()>(&mut connection);
        match tokio::time::timeout(self.state.timeout.max(MIN_PING_TIMEOUT), answer).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CallError::Failed(e)),
            Err(_) => Err(CallError::Timeout),
        }
    }
}
