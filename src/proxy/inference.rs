//! The inference path (generate, chat, embeddings, OpenAI and Anthropic routes): read the body,
//! admit the request into a slot, send it to the chosen instance through a Pingora subrequest,
//! relay the response chunk by chunk, and release the slot when the client has it all or is gone.
//!
//! Why a subrequest: routing by `model` needs the whole body before an instance is chosen, and
//! Pingora only replays a consumed body through its 64 KiB retry buffer. The subrequest gets the
//! buffered body through its channel instead (docs/adr/0001-inference-body-and-subrequests.md).

use super::errors::{self, SidecarError, SERVER_BUSY};
use super::retry::{self, RetryReason};
use super::{body, respond_error, RequestCtx, SidecarProxy};
use crate::admission::{AdmitRequest, Admitted as AdmissionOutcome, Permit, Refusal};
use crate::upstream::{model_key, Instance};
use bytes::{Bytes, BytesMut};
use pingora_core::protocols::http::HttpTask;
use pingora_error::{Error, ErrorType, Result};
use pingora_proxy::subrequest::{BodyMode, Ctx as SubrequestCtx};
use pingora_proxy::Session;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the parent request hands its subrequest: the instance chosen and the request id.
#[derive(Clone)]
pub struct Dispatch {
    pub instance: Arc<Instance>,
    pub request_id: String,
}

/// How an inference request ended, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Outcome {
    #[default]
    Pending,
    Served,
    Refused,
    /// The client left while queued.
    CancelledQueued,
    /// The client left before the first response byte.
    CancelledWaiting,
    /// The client left while the response streamed.
    CancelledStreaming,
    /// The upstream failed.
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Served => "served",
            Outcome::Refused => "refused",
            Outcome::CancelledQueued => "cancelled_queued",
            Outcome::CancelledWaiting => "cancelled_waiting",
            Outcome::CancelledStreaming => "cancelled_streaming",
            Outcome::Failed => "failed",
        }
    }
}

enum BodyRead {
    Complete(Bytes),
    TooLarge,
    /// The client went silent for `limits.body_read_timeout`.
    TimedOut,
}

/// Reads the whole request body, refusing it once it passes `limit` bytes.
async fn read_body(session: &mut Session, limit: u64) -> Result<BodyRead> {
    let hint = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if hint.is_some_and(|n| n > limit) {
        return Ok(BodyRead::TooLarge);
    }
    let capacity = hint.unwrap_or(0).min(limit) as usize;
    let mut buf = BytesMut::with_capacity(capacity);
    while let Some(chunk) = match session.read_request_body().await {
        Err(e) if *e.etype() == ErrorType::ReadTimedout => return Ok(BodyRead::TimedOut),
        // A malformed or broken body is the client's doing: 400, or no answer when it left.
        read => read.map_err(|e| e.into_down())?,
    } {
        if (buf.len() + chunk.len()) as u64 > limit {
            return Ok(BodyRead::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(BodyRead::Complete(buf.freeze()))
}

/// Who the client is, for fairness: the configured header, else the client's address.
fn client_identity(proxy: &SidecarProxy, session: &Session) -> Arc<str> {
    let admission = &proxy.app.config.admission;
    if let Some(name) = &admission.client_id_header {
        if let Some(v) = session
            .req_header()
            .headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
        {
            return Arc::from(v);
        }
    }
    match session.client_addr() {
        Some(pingora_core::protocols::l4::socket::SocketAddr::Inet(a)) => {
            Arc::from(a.ip().to_string())
        }
        Some(other) => Arc::from(other.to_string()),
        None => Arc::from("unknown"),
    }
}

fn priority(proxy: &SidecarProxy, session: &Session, client: &str) -> i32 {
    let admission = &proxy.app.config.admission;
    if let Some(name) = &admission.priority_header {
        if let Some(p) = session
            .req_header()
            .headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i32>().ok())
        {
            return p.clamp(-100, 100);
        }
    }
    admission.priorities.get(client).copied().unwrap_or(0)
}

enum Admitted {
    Granted(Permit),
    Refused(Refusal),
    ClientGone,
}

/// Asks admission for a slot (so every request is counted there, even one whose client is
/// already gone), then waits for it while watching the client: one that disconnects leaves the
/// queue at once.
async fn admit(proxy: &SidecarProxy, session: &mut Session, req: AdmitRequest) -> Admitted {
    let waiting = match proxy.app.admission.admit(req) {
        Ok(AdmissionOutcome::Now(permit)) => return Admitted::Granted(permit),
        Ok(AdmissionOutcome::Queued(waiting)) => waiting,
        Err(refusal) => return Admitted::Refused(refusal),
    };
    let wait = waiting.wait();
    tokio::pin!(wait);
    let mut watch_client = true;
    loop {
        tokio::select! {
            biased;
            result = &mut wait => {
                return match result {
                    Ok(permit) => Admitted::Granted(permit),
                    Err(refusal) => Admitted::Refused(refusal),
                };
            }
            read = session.as_downstream_mut().read_body_or_idle(true), if watch_client => {
                match read {
                    Err(_) => return Admitted::ClientGone,
                    // Pipelined bytes: stop watching, keep waiting.
                    Ok(_) => watch_client = false,
                }
            }
        }
    }
}

fn refusal_error(refusal: &Refusal, proxy: &SidecarProxy, model: Option<&str>) -> SidecarError {
    let wait = proxy.app.config.admission.max_wait;
    let model = serde_json::to_string(model.unwrap_or_default()).unwrap_or_default();
    match refusal {
        Refusal::ModelUnavailable => SidecarError::new(
            503,
            format!("ollama-sidecar: no ready instance has model {model} installed"),
        )
        .retry_after(5),
        Refusal::QueueFull | Refusal::QueueBytesFull => {
            SidecarError::new(503, SERVER_BUSY).retry_after(1)
        }
        Refusal::WaitExpired { waited } => SidecarError::new(
            503,
            format!(
                "{SERVER_BUSY} (ollama-sidecar: waited {} for a slot; admission.max_wait is {})",
                humantime::format_duration(std::time::Duration::from_secs(waited.as_secs())),
                humantime::format_duration(wait)
            ),
        )
        .retry_after(5),
        Refusal::Closed => SidecarError::new(503, "ollama-sidecar is shutting down").retry_after(1),
    }
}

/// Serves one inference request from `request_filter`; always returns `Ok(true)` (answered).
pub(super) async fn serve(
    proxy: &SidecarProxy,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<bool> {
    let shape = ctx.route.shape;
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects_continue {
        session
            .as_downstream_mut()
            .write_continue_response()
            .await?;
    }

    let limit = proxy.app.config.limits.max_body.0;
    let body = match read_body(session, limit).await? {
        BodyRead::Complete(b) => b,
        BodyRead::TimedOut => {
            return crate::policy::on_body_timeout(&proxy.app, session, ctx).await
        }
        BodyRead::TooLarge => {
            // The rest of the body is unread: the connection cannot be reused.
            session.set_keepalive(None);
            ctx.outcome = Outcome::Refused;
            let err = SidecarError::new(
                413,
                format!(
                    "request body is larger than {} (limits.max_body)",
                    proxy.app.config.limits.max_body
                ),
            );
            respond_error(session, shape, &err, &ctx.request_id).await?;
            return Ok(true);
        }
    };
    ctx.request_bytes = body.len() as u64;

    // A compressed body is forwarded untouched; it just cannot be routed by model.
    let encoded = session
        .req_header()
        .headers
        .contains_key(http::header::CONTENT_ENCODING);
    let is_json = !encoded && ctx.route.has_model_body();
    if is_json {
        match body::inspect_fields(&body, ctx.route.fields) {
            Ok(facts) => {
                ctx.model = facts.model;
                ctx.stream = facts.stream;
            }
            Err(message) => {
                ctx.outcome = Outcome::Refused;
                let err = SidecarError::new(400, message);
                respond_error(session, shape, &err, &ctx.request_id).await?;
                return Ok(true);
            }
        }
    }
    if crate::policy::on_inference_body(&proxy.app, session, ctx, &body).await? {
        return Ok(true);
    }

    // A key's name (set by the policy) is the client's identity.
    let client = ctx
        .client
        .clone()
        .unwrap_or_else(|| client_identity(proxy, session));
    let request = AdmitRequest {
        priority: crate::policy::key_priority(ctx)
            .unwrap_or_else(|| priority(proxy, session, &client)),
        client: client.clone(),
        model: ctx.model.as_deref().map(model_key),
        body_bytes: body.len() as u64,
        avoid: None,
    };
    ctx.client = Some(client);
    proxy.app.retry_budget.record_request();
    let mut request = request;
    let mut attempt = 1u32;
    loop {
        let queued_at = Instant::now();
        let permit = match admit(proxy, session, request.clone()).await {
            Admitted::Granted(p) => p,
            Admitted::Refused(refusal) => {
                ctx.outcome = Outcome::Refused;
                ctx.refusal = Some(refusal.as_str());
                let err = refusal_error(&refusal, proxy, ctx.model.as_deref());
                ctx.status = err.status;
                respond_error(session, shape, &err, &ctx.request_id).await?;
                return Ok(true);
            }
            Admitted::ClientGone => {
                ctx.outcome = if attempt == 1 {
                    Outcome::CancelledQueued
                } else {
                    Outcome::CancelledWaiting
                };
                session.set_keepalive(None);
                return Ok(true);
            }
        };
        *ctx.queue_wait.get_or_insert(Duration::ZERO) += queued_at.elapsed();
        let instance = permit.instance().clone();
        ctx.placement = Some(permit.reason().as_str());
        ctx.instance = Some(instance.name.clone());
        let may_retry = attempt < proxy.app.config.retries.max_attempts;
        let result = attempt_once(proxy, session, ctx, &instance, body.clone(), may_retry).await;
        // The slot is held until the response is complete or the client is gone.
        drop(permit);
        match result? {
            Attempt::Finished { instance_ok } => {
                proxy.app.registry.report(&instance, instance_ok);
                return Ok(true);
            }
            Attempt::ClientGone => return Ok(true),
            Attempt::Retry {
                reason,
                retry_after,
            } => {
                proxy.app.registry.report(&instance, false);
                crate::metrics::global().retry(reason.as_str());
                ctx.retries += 1;
                ctx.retry_reasons.push(reason);
                let others_ready = proxy
                    .app
                    .registry
                    .all()
                    .iter()
                    .any(|i| i.index != instance.index && i.is_ready());
                let delay = if others_ready {
                    Duration::ZERO
                } else {
                    retry::backoff(&proxy.app.config.retries, attempt)
                }
                .max(retry_after.unwrap_or_default());
                tracing::info!(request_id = %ctx.request_id, instance = %instance.name,
                    reason = reason.as_str(), attempt, delay_ms = delay.as_millis() as u64,
                    "retrying on another instance");
                if !delay.is_zero() && !sleep_unless_client_leaves(session, delay).await {
                    ctx.outcome = Outcome::CancelledWaiting;
                    session.set_keepalive(None);
                    return Ok(true);
                }
                request.avoid = Some(instance.index);
                attempt += 1;
            }
        }
    }
}

/// Sleeps `delay`, watching the client; false when it left.
async fn sleep_unless_client_leaves(session: &mut Session, delay: Duration) -> bool {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    let mut watch_client = true;
    loop {
        tokio::select! {
            _ = &mut sleep => return true,
            read = session.as_downstream_mut().read_body_or_idle(true), if watch_client => {
                match read {
                    Err(_) => return false,
                    Ok(_) => watch_client = false,
                }
            }
        }
    }
}

/// How long a finished response's subrequest may take to wind down (return its connection to
/// the pool, log) before it is dropped.
const SUBREQUEST_WIND_DOWN: Duration = Duration::from_secs(5);

/// How one attempt on one instance ended.
enum Attempt {
    /// The client has the whole answer (or its in-band end); `instance_ok` feeds passive health.
    Finished { instance_ok: bool },
    /// The client left.
    ClientGone,
    /// Nothing reached the client and the failure may be retried elsewhere.
    Retry {
        reason: RetryReason,
        retry_after: Option<Duration>,
    },
}

/// Runs one subrequest against `instance` and relays its response downstream. Before the
/// response header goes to the client, a retryable failure is returned instead (when
/// `may_retry` and the retry budget allow it).
async fn attempt_once(
    proxy: &SidecarProxy,
    session: &mut Session,
    ctx: &mut RequestCtx,
    instance: &Arc<Instance>,
    body: Bytes,
    may_retry: bool,
) -> Result<Attempt> {
    let shape = ctx.route.shape;
    let Some(spawner) = session.subrequest_spawner.as_ref() else {
        return Error::e_explain(ErrorType::InternalError, "subrequests are not enabled");
    };
    let dispatch = Dispatch {
        instance: instance.clone(),
        request_id: ctx.request_id.clone(),
    };
    let sub_ctx = SubrequestCtx::builder()
        .body_mode(BodyMode::ExpectBody)
        .user_ctx(Box::new(dispatch))
        .build();
    let (prepared, handle) = spawner.create_subrequest(session.as_downstream(), sub_ctx);
    let tx = handle.tx;
    let mut rx = handle.rx;
    let mut proxy_error = handle.subreq_proxy_error;
    // The subrequest runs inside this task, polled beside the relay: no task hop (and no
    // cross-thread wake-up) per chunk, and dropping it drops its upstream connection at once.
    let subrequest = prepared.run();
    tokio::pin!(subrequest);
    let mut subrequest_done = false;

    // The buffered body and its end fit in the channel (it holds 4 tasks), so they are queued
    // before the subrequest first runs. `tx` stays alive until the relay ends, because dropping
    // it is how the subrequest learns that the client left.
    let mut queued_body = true;
    if !body.is_empty() {
        queued_body = tx.try_send(HttpTask::Body(Some(body), false)).is_ok();
    }
    queued_body = queued_body && tx.try_send(HttpTask::Body(None, true)).is_ok();
    if !queued_body {
        return Error::e_explain(
            ErrorType::InternalError,
            "could not hand the request body to the subrequest",
        );
    }

    let timeouts = &proxy.app.config.timeouts;
    let retry_allowed = || may_retry && proxy.app.retry_budget.try_spend();
    let mut header_sent = false;
    let mut complete = false;
    let mut watch_client = true;
    let mut client_gone = false;
    let mut timed_out = false;
    loop {
        // Before the header: the response-header timeout; after it: the idle timeout, if any.
        let limit = if header_sent {
            timeouts.idle
        } else {
            Some(timeouts.response_header)
        };
        let next = async {
            match limit {
                Some(limit) => tokio::time::timeout(limit, rx.recv()).await.map_err(|_| ()),
                None => Ok(rx.recv().await),
            }
        };
        tokio::select! {
            biased;
            () = &mut subrequest, if !subrequest_done => {
                subrequest_done = true;
            }
            task = next => {
                let task = match task {
                    Ok(Some(task)) => task,
                    Ok(None) => break,
                    Err(()) => { timed_out = true; break; }
                };
                let end = task.is_end();
                match &task {
                    HttpTask::Header(header, _) => {
                        let status = header.status.as_u16();
                        if let Some(reason) = RetryReason::from_status(status) {
                            let after = retry::retry_after(header.headers.get(http::header::RETRY_AFTER));
                            if after.is_none_or(|d| d <= retry::MAX_RETRY_AFTER) && retry_allowed() {
                                // Returning drops the subrequest and its upstream connection.
                                return Ok(Attempt::Retry { reason, retry_after: after });
                            }
                        }
                        header_sent = true;
                        ctx.status = status;
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
                    HttpTask::Done => complete = true,
                    _ => {}
                }
                if end {
                    complete = true;
                }
                if session.write_response_tasks(vec![task]).await.is_err() {
                    client_gone = true;
                    break;
                }
                if complete {
                    break;
                }
            }
            read = session.as_downstream_mut().read_body_or_idle(true), if watch_client => {
                match read {
                    Err(_) => { client_gone = true; break; }
                    Ok(_) => watch_client = false,
                }
            }
        }
    }

    if client_gone {
        // Returning drops the subrequest and with it the upstream connection, which is what
        // makes Ollama stop generating; the caller releases the slot.
        ctx.outcome = if header_sent {
            Outcome::CancelledStreaming
        } else {
            Outcome::CancelledWaiting
        };
        session.set_keepalive(None);
        return Ok(Attempt::ClientGone);
    }

    drop(rx);
    if !timed_out && !subrequest_done {
        // Let the subrequest finish its own bookkeeping (the upstream connection goes back to
        // the pool) before the slot is released. A hung instance's is cut instead (dropped).
        let _ = tokio::time::timeout(SUBREQUEST_WIND_DOWN, &mut subrequest).await;
    }
    drop(tx);

    if complete {
        ctx.outcome = Outcome::Served;
        return Ok(Attempt::Finished {
            instance_ok: ctx.status < 500,
        });
    }

    // The subrequest ended without finishing the response.
    let cause = proxy_error.try_recv().ok();
    let instance_name = instance.name.as_str();
    if !header_sent {
        let reason = match (&cause, timed_out) {
            (_, true) => Some(RetryReason::ResponseTimeout),
            (Some(e), _) => RetryReason::from_error(e),
            (None, _) => Some(RetryReason::Reset),
        };
        if let Some(reason) = reason {
            if retry_allowed() {
                return Ok(Attempt::Retry {
                    reason,
                    retry_after: None,
                });
            }
        }
    }
    let (status, message) = match (&cause, timed_out) {
        (_, true) if header_sent => (
            504,
            format!(
                "ollama-sidecar: instance `{instance_name}` sent nothing for {} (timeouts.idle)",
                humantime::format_duration(timeouts.idle.unwrap_or_default())
            ),
        ),
        (_, true) => (
            504,
            format!(
                "ollama-sidecar: instance `{instance_name}` did not answer within {} (timeouts.response_header)",
                humantime::format_duration(timeouts.response_header)
            ),
        ),
        (Some(e), _) => super::describe_failure(e, Some(instance_name), &proxy.app),
        (None, _) => (
            502,
            format!("ollama-sidecar: instance `{instance_name}` ended the response early"),
        ),
    };
    ctx.outcome = Outcome::Failed;
    if header_sent {
        // The client has a status line: end the stream in its own framing, then close.
        if let Some(line) = errors::in_band_error(ctx.response_content_type.as_deref(), &message) {
            let _ = session.write_response_body(Some(line), true).await;
        }
        session.set_keepalive(None);
        return Ok(Attempt::Finished { instance_ok: false });
    }
    let status = if status == 0 { 502 } else { status };
    ctx.status = status;
    let err = SidecarError::new(status, message);
    respond_error(session, shape, &err, &ctx.request_id).await?;
    Ok(Attempt::Finished { instance_ok: false })
}
