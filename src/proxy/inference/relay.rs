//! The relay stage: one attempt on one instance. A Pingora subrequest carries the buffered body
//! to the instance; its response goes downstream task by task, read by the tap on the way.
//! Before the status line reaches the client a failure can still be retried or answered with a
//! status of the sidecar's own; after it, a failure ends the stream in band.

use super::super::ctx::{Dispatch, RequestCtx};
use super::super::retry::{self, RetryReason};
use super::super::{errors, respond};
use super::admit::ClientWatch;
use crate::app::App;
use crate::metrics::Outcome;
use crate::reject::Reject;
use crate::upstream::Instance;
use bytes::Bytes;
use futures_util::future::{BoxFuture, Fuse, FusedFuture, FutureExt};
use pingora_core::protocols::http::HttpTask;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::subrequest::{BodyMode, Ctx as SubrequestCtx};
use pingora_proxy::Session;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long a finished response's subrequest may take to wind down (return its connection to
/// the pool, log) before it is dropped.
const SUBREQUEST_WIND_DOWN: Duration = Duration::from_secs(5);

/// A failure that may be tried again elsewhere: nothing reached the client.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub reason: RetryReason,
    /// The instance's `Retry-After`, when it sent one.
    pub after: Option<Duration>,
}

/// How one attempt ended.
pub enum Attempt {
    /// The client has the whole answer (or its in-band end); `instance_ok` feeds passive health.
    Finished {
        instance_ok: bool,
    },
    ClientGone,
    Retry(Retry),
}

/// Where the relay is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing reached the client: a failure may be retried, or answered with a status.
    AwaitingHeader,
    /// The client has the status line: a failure ends the stream in band.
    Streaming,
}

/// Why the relay stopped.
enum Stop {
    /// The client has the whole response.
    Complete,
    ClientGone,
    /// A write to the client did not finish within `limits.write_timeout`.
    WriteTimeout,
    /// The instance was silent past the phase's timeout.
    Silent,
    /// The subrequest ended without finishing the response.
    Broken,
    /// A retryable status, before anything reached the client.
    Retry(Retry),
}

/// What the subrequest produced next.
enum Event {
    Task(HttpTask),
    Closed,
    Silent,
}

/// One subrequest, polled inside this task beside the relay: no task hop (and no cross-thread
/// wake-up) per chunk, and dropping it drops its upstream connection at once.
struct Subrequest {
    run: Fuse<BoxFuture<'static, ()>>,
    /// Alive until the relay ends: dropping it is how the subrequest learns the client left.
    tx: mpsc::Sender<HttpTask>,
    rx: mpsc::Receiver<HttpTask>,
    error: oneshot::Receiver<Box<Error>>,
}

impl Subrequest {
    /// A subrequest to `instance` with the whole body queued: the body and its end fit in the
    /// channel (it holds 4 tasks), so they are there before the subrequest first runs.
    fn start(
        session: &Session,
        ctx: &RequestCtx,
        instance: &Arc<Instance>,
        body: Bytes,
    ) -> Result<Subrequest> {
        let Some(spawner) = session.subrequest_spawner.as_ref() else {
            return Error::e_explain(ErrorType::InternalError, "subrequests are not enabled");
        };
        let dispatch = Dispatch {
            instance: instance.clone(),
            app: ctx.app.clone(),
            request_id: ctx.request_id.clone(),
            body_length: body.len(),
        };
        let sub_ctx = SubrequestCtx::builder()
            .body_mode(BodyMode::ExpectBody)
            .user_ctx(Box::new(dispatch))
            .build();
        let (prepared, handle) = spawner.create_subrequest(session.as_downstream(), sub_ctx);
        let queued = (body.is_empty()
            || handle
                .tx
                .try_send(HttpTask::Body(Some(body), false))
                .is_ok())
            && handle.tx.try_send(HttpTask::Body(None, true)).is_ok();
        if !queued {
            return Error::e_explain(
                ErrorType::InternalError,
                "could not hand the request body to the subrequest",
            );
        }
        Ok(Subrequest {
            run: prepared.run().boxed().fuse(),
            tx: handle.tx,
            rx: handle.rx,
            error: handle.subreq_proxy_error,
        })
    }

    /// The next task, within `limit` when there is one, while the subrequest runs.
    async fn next(&mut self, limit: Option<Duration>) -> Event {
        let Subrequest { run, rx, .. } = self;
        let recv = async {
            match limit {
                Some(limit) => tokio::time::timeout(limit, rx.recv()).await.ok(),
                None => Some(rx.recv().await),
            }
        };
        tokio::pin!(recv);
        loop {
            tokio::select! {
                biased;
                () = &mut *run, if !run.is_terminated() => {}
                received = &mut recv => return match received {
                    Some(Some(task)) => Event::Task(task),
                    Some(None) => Event::Closed,
                    None => Event::Silent,
                },
            }
        }
    }

    /// Lets a subrequest that was not cut finish its own bookkeeping (the upstream connection
    /// goes back to the pool) before the slot is released; a hung instance's is dropped. Returns
    /// the error the subrequest ended with, if any.
    async fn wind_down(self, cut: bool) -> Option<Box<Error>> {
        let Subrequest {
            run,
            tx,
            rx,
            mut error,
        } = self;
        drop(rx);
        if !cut && !run.is_terminated() {
            let _ = tokio::time::timeout(SUBREQUEST_WIND_DOWN, run).await;
        }
        drop(tx);
        error.try_recv().ok()
    }
}

/// Whether a failure may be retried: attempts left, and the retry budget spent on it.
fn retry_allowed(app: &App, may_retry: bool) -> bool {
    may_retry && app.retry_budget.try_spend()
}

/// A retryable status (502, 503, 504) with an acceptable `Retry-After`, when a retry is allowed.
fn retryable(app: &App, header: &ResponseHeader, may_retry: bool) -> Option<Retry> {
    let reason = RetryReason::from_status(header.status.as_u16())?;
    let after = retry::retry_after(header.headers.get(http::header::RETRY_AFTER));
    let acceptable = after.is_none_or(|d| d <= retry::MAX_RETRY_AFTER);
    (acceptable && retry_allowed(app, may_retry)).then_some(Retry { reason, after })
}

/// What the context learns from a task on its way to the client.
fn observe(ctx: &mut RequestCtx, task: &HttpTask) {
    match task {
        HttpTask::Header(header, _) => {
            ctx.status = header.status.as_u16();
            ctx.response_content_type = header
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            ctx.tap.start(ctx.response_content_type.as_deref());
        }
        HttpTask::Body(Some(bytes), _) => {
            let at = ctx.started.elapsed();
            if ctx.first_byte.is_none() && !bytes.is_empty() {
                ctx.first_byte = Some(at);
            }
            ctx.response_bytes += bytes.len() as u64;
            ctx.tap.observe(bytes, at);
        }
        _ => {}
    }
}

/// Runs one subrequest against `instance` and relays its response downstream. Before the
/// response header goes to the client, a retryable failure is returned instead (when
/// `may_retry` and the retry budget allow it).
pub async fn attempt(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    watch: &mut ClientWatch,
    instance: &Arc<Instance>,
    body: Bytes,
    may_retry: bool,
) -> Result<Attempt> {
    let mut sub = Subrequest::start(session, ctx, instance, body)?;
    let timeouts = &app.config.timeouts;
    let write_timeout = app.config.limits.write_timeout;
    let mut phase = Phase::AwaitingHeader;
    let stop = loop {
        let limit = match phase {
            Phase::AwaitingHeader => Some(timeouts.response_header),
            Phase::Streaming => timeouts.idle,
        };
        let task = match watch.until(session, sub.next(limit)).await {
            None => break Stop::ClientGone,
            Some(Event::Silent) => break Stop::Silent,
            Some(Event::Closed) => break Stop::Broken,
            Some(Event::Task(task)) => task,
        };
        if let HttpTask::Header(header, _) = &task {
            if let Some(retry) = retryable(app, header, may_retry) {
                break Stop::Retry(retry);
            }
            phase = Phase::Streaming;
        }
        observe(ctx, &task);
        let task = ctx.usage_strip.relay_task(task);
        let end = task.is_end() || matches!(task, HttpTask::Done);
        // Bounded as a whole (header, body, flush): a client that stops reading fills the
        // socket's buffers and would hold the slot and the instance's request for ever.
        let write = session.write_response_tasks(vec![task]);
        match tokio::time::timeout(write_timeout, write).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if *e.etype() == ErrorType::WriteTimedout => break Stop::WriteTimeout,
            Ok(Err(_)) => break Stop::ClientGone,
            Err(_) => break Stop::WriteTimeout,
        }
        if end {
            break Stop::Complete;
        }
    };
    let ended = Ended { sub, phase, stop };
    conclude(app, session, ctx, instance, ended, may_retry).await
}

/// A relay that stopped: its subrequest, how far it got, and why.
struct Ended {
    sub: Subrequest,
    phase: Phase,
    stop: Stop,
}

/// What the attempt comes to once the relay stopped.
async fn conclude(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    instance: &Instance,
    ended: Ended,
    may_retry: bool,
) -> Result<Attempt> {
    let Ended { sub, phase, stop } = ended;
    let silent = match stop {
        // Returning drops the subrequest and its upstream connection.
        Stop::Retry(retry) => return Ok(Attempt::Retry(retry)),
        Stop::ClientGone | Stop::WriteTimeout => {
            // Dropping the subrequest drops the upstream connection, which is what makes
            // Ollama stop generating; the caller releases the slot.
            ctx.outcome = match (&stop, phase) {
                (Stop::WriteTimeout, _) => Outcome::WriteTimeout,
                (_, Phase::AwaitingHeader) => Outcome::CancelledWaiting,
                (_, Phase::Streaming) => Outcome::CancelledStreaming,
            };
            session.set_keepalive(None);
            return Ok(Attempt::ClientGone);
        }
        Stop::Complete => false,
        Stop::Silent => true,
        Stop::Broken => false,
    };
    let cause = sub.wind_down(silent).await;
    if matches!(stop, Stop::Complete) {
        ctx.outcome = Outcome::Served;
        return Ok(Attempt::Finished {
            instance_ok: ctx.status < 500,
        });
    }
    if phase == Phase::AwaitingHeader {
        let reason = match (&cause, silent) {
            (_, true) => Some(RetryReason::ResponseTimeout),
            (Some(e), _) => RetryReason::from_error(e),
            (None, _) => Some(RetryReason::Reset),
        };
        if let Some(reason) = reason.filter(|_| retry_allowed(app, may_retry)) {
            return Ok(Attempt::Retry(Retry {
                reason,
                after: None,
            }));
        }
    }
    let failure = failure(app, instance, phase, silent, cause.as_deref());
    if phase == Phase::Streaming {
        // The client has a status line: end the stream in its own framing, then close.
        let content_type = ctx.response_content_type.as_deref();
        if let Some(line) = errors::in_band_error(content_type, &failure.message()) {
            let write = session.write_response_body(Some(line), true);
            let _ = tokio::time::timeout(app.config.limits.write_timeout, write).await;
        }
        ctx.outcome = Outcome::Failed;
        ctx.reject = Some(failure);
        session.set_keepalive(None);
    } else {
        respond::reject(app, session, ctx, failure).await?;
    }
    Ok(Attempt::Finished { instance_ok: false })
}

/// The failure the client is told about when the subrequest ended without a whole response.
fn failure(
    app: &App,
    instance: &Instance,
    phase: Phase,
    silent: bool,
    cause: Option<&Error>,
) -> Reject {
    let name = || instance.name.clone();
    let timeouts = &app.config.timeouts;
    match (cause, silent, phase) {
        (_, true, Phase::Streaming) => Reject::IdleTimeout {
            instance: name(),
            after: timeouts.idle.unwrap_or_default(),
        },
        (_, true, Phase::AwaitingHeader) => Reject::ResponseTimeout {
            instance: name(),
            after: timeouts.response_header,
        },
        (Some(e), false, _) => respond::classify(e, Some(&instance.name), &app.config)
            .unwrap_or(Reject::EndedEarly { instance: name() }),
        (None, false, _) => Reject::EndedEarly { instance: name() },
    }
}
