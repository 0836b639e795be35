//! The inference path (generate, chat, embeddings, OpenAI and Anthropic routes): read the body,
//! admit the request into a slot, send it to the chosen instance through a Pingora subrequest,
//! relay the response chunk by chunk, and release the slot when the client has it all or is gone.
//!
//! Why a subrequest: routing by `model` needs the whole body before an instance is chosen, and
//! Pingora only replays a consumed body through its 64 KiB retry buffer. The subrequest gets the
//! buffered body through its channel instead (docs/adr/0001-inference-body-and-subrequests.md).

use super::errors::{self, SidecarError, SERVER_BUSY};
use super::{body, respond_error, RequestCtx, SidecarProxy};
use crate::admission::{AdmitRequest, Permit, Refusal};
use crate::upstream::{model_key, Instance};
use bytes::{Bytes, BytesMut};
use pingora_core::protocols::http::HttpTask;
use pingora_error::{Error, ErrorType, Result};
use pingora_proxy::subrequest::{BodyMode, Ctx as SubrequestCtx};
use pingora_proxy::Session;
use std::sync::Arc;
use std::time::Instant;

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
    while let Some(chunk) = session.read_request_body().await? {
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

/// Waits for a slot while watching the client: one that disconnects leaves the queue at once.
async fn admit(proxy: &SidecarProxy, session: &mut Session, req: AdmitRequest) -> Admitted {
    let acquire = proxy.app.admission.acquire(req);
    tokio::pin!(acquire);
    let mut watch_client = true;
    loop {
        tokio::select! {
            result = &mut acquire => {
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

fn refusal_error(refusal: &Refusal, proxy: &SidecarProxy) -> SidecarError {
    let wait = proxy.app.config.admission.max_wait;
    match refusal {
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
    let is_json = !encoded && ctx.route.has_model_body;
    if is_json {
        match body::inspect(&body) {
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

    let client = client_identity(proxy, session);
    let request = AdmitRequest {
        priority: priority(proxy, session, &client),
        client: client.clone(),
        model: ctx.model.as_deref().map(model_key),
        body_bytes: body.len() as u64,
    };
    ctx.client = Some(client);
    let queued_at = Instant::now();
    let permit = match admit(proxy, session, request).await {
        Admitted::Granted(p) => p,
        Admitted::Refused(refusal) => {
            ctx.outcome = Outcome::Refused;
            ctx.refusal = Some(refusal.as_str());
            let err = refusal_error(&refusal, proxy);
            respond_error(session, shape, &err, &ctx.request_id).await?;
            return Ok(true);
        }
        Admitted::ClientGone => {
            ctx.outcome = Outcome::CancelledQueued;
            session.set_keepalive(None);
            return Ok(true);
        }
    };
    ctx.queue_wait = Some(queued_at.elapsed());
    ctx.instance = Some(permit.instance().name.clone());
    relay(proxy, session, ctx, permit, body).await
}

/// Runs the subrequest against the permit's instance and relays its response downstream.
async fn relay(
    proxy: &SidecarProxy,
    session: &mut Session,
    ctx: &mut RequestCtx,
    permit: Permit,
    body: Bytes,
) -> Result<bool> {
    let shape = ctx.route.shape;
    let Some(spawner) = session.subrequest_spawner.as_ref() else {
        return Error::e_explain(ErrorType::InternalError, "subrequests are not enabled");
    };
    let dispatch = Dispatch {
        instance: permit.instance().clone(),
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
    let subrequest = tokio::spawn(prepared.run());

    // Feed the buffered body; `tx` stays alive until the relay ends, because dropping it is how
    // the subrequest learns that the client left.
    let feeder = tokio::spawn(async move {
        if !body.is_empty() && tx.send(HttpTask::Body(Some(body), false)).await.is_err() {
            return Some(tx);
        }
        let _ = tx.send(HttpTask::Body(None, true)).await;
        Some(tx)
    });

    let idle = proxy.app.config.timeouts.idle;
    let mut header_sent = false;
    let mut complete = false;
    let mut watch_client = true;
    let mut client_gone = false;
    let mut idle_expired = false;
    loop {
        let next = async {
            match idle.filter(|_| header_sent) {
                Some(limit) => tokio::time::timeout(limit, rx.recv()).await.map_err(|_| ()),
                None => Ok(rx.recv().await),
            }
        };
        tokio::select! {
            biased;
            task = next => {
                let task = match task {
                    Ok(Some(task)) => task,
                    Ok(None) => break,
                    Err(()) => { idle_expired = true; break; }
                };
                let end = task.is_end();
                match &task {
                    HttpTask::Header(header, _) => {
                        header_sent = true;
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
        // Dropping both ends makes the subrequest drop its upstream connection, which is what
        // makes Ollama stop generating; the slot is released below.
        drop(rx);
        feeder.abort();
        subrequest.abort();
        ctx.outcome = if header_sent {
            Outcome::CancelledStreaming
        } else {
            Outcome::CancelledWaiting
        };
        session.set_keepalive(None);
        drop(permit);
        return Ok(true);
    }

    // Let the subrequest finish its own bookkeeping before the slot is released.
    drop(rx);
    let _ = subrequest.await;
    drop(feeder);
    drop(permit);

    if complete {
        ctx.outcome = Outcome::Served;
        return Ok(true);
    }

    // The subrequest ended without finishing the response.
    let cause = proxy_error.try_recv().ok();
    let message = match (&cause, idle_expired) {
        (_, true) => format!(
            "ollama-sidecar: instance `{}` sent nothing for {} (timeouts.idle)",
            ctx.instance.as_deref().unwrap_or("?"),
            humantime::format_duration(idle.unwrap_or_default())
        ),
        (Some(e), _) => super::describe_failure(e, ctx.instance.as_deref(), &proxy.app).1,
        (None, _) => "ollama-sidecar: the upstream response ended early".to_string(),
    };
    ctx.outcome = Outcome::Failed;
    if header_sent {
        // The client has a status line: end the stream in its own framing, then close.
        if let Some(line) = errors::in_band_error(ctx.response_content_type.as_deref(), &message) {
            let _ = session.write_response_body(Some(line), true).await;
        }
        session.set_keepalive(None);
        return Ok(true);
    }
    let status = match (&cause, idle_expired) {
        (_, true) => 504,
        (Some(e), _) => super::describe_failure(e, ctx.instance.as_deref(), &proxy.app).0,
        (None, _) => 502,
    };
    let status = if status == 0 { 502 } else { status };
    ctx.status = status;
    let err = SidecarError::new(status, message);
    respond_error(session, shape, &err, &ctx.request_id).await?;
    Ok(true)
}
