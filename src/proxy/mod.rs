//! The `ProxyHttp` conductor. Each Pingora hook hands its work to a stage module (route, policy,
//! the inference path, upstream selection) and writes the decision it gets back: a relayed
//! response, or the sidecar's own answer through `respond`.

pub mod body;
pub mod canonical;
pub mod ctx;
pub mod errors;
pub mod headers;
pub mod inference;
pub mod keep_alive_policy;
pub mod request_body;
pub mod respond;
pub mod retry;
pub mod route;
pub mod tap;
pub mod usage;

use crate::app::App;
use crate::metrics::Outcome;
use crate::models_view::{self, ModelList, ViewError};
use crate::policy::{self, Verdict};
use crate::reject::Reject;
use crate::upstream::{select, target};
use async_trait::async_trait;
use bytes::Bytes;
pub use ctx::{Dispatch, RequestCtx};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use respond::NO_INSTANCE;
use route::RouteClass;
use std::sync::Arc;
use std::time::Duration;

/// Largest body of a non-inference request read to check its model against the allow-lists
/// (Pingora replays a body read this early only up to its 64 KiB retry buffer).
pub const MAX_CHECKED_BODY: u64 = 64 << 10;

pub struct SidecarProxy {
    app: Arc<App>,
}

impl SidecarProxy {
    pub fn new(app: Arc<App>) -> Self {
        SidecarProxy { app }
    }

    /// The policy stage of a client request; `Ok(true)` when the request was answered here.
    async fn apply_policy(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let app = &ctx.app.clone();
        let decoded = ctx.path.as_ref().map(|p| p.decoded()).unwrap_or_default();
        let verdict = policy::on_request(app, session, &ctx.route, decoded, &mut ctx.policy).await;
        if let Some(name) = ctx.policy.key_name() {
            // The key's name is the client's identity for fairness and in the logs.
            ctx.client = Some(Arc::from(name));
        }
        let refused = match verdict {
            Ok(Verdict::Continue) => return Ok(false),
            Ok(Verdict::Preflight) => return answer_preflight(app, session, ctx).await,
            Ok(Verdict::CheckBodyModels) => match self.read_models(session, ctx).await? {
                Ok(models) => match policy::check_body_models(app, &ctx.policy, &models) {
                    Ok(()) => return Ok(false),
                    Err(refused) => refused,
                },
                Err(refused) => refused,
            },
            Err(refused) => refused,
        };
        respond::reject(app, session, ctx, refused).await?;
        Ok(true)
    }

    /// Reads a small JSON body (kept by Pingora's retry buffer, which sends it upstream) and
    /// returns the model names it binds as Ollama reads them.
    async fn read_models(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<std::result::Result<Vec<String>, Reject>> {
        let app = ctx.app.clone();
        session.as_downstream_mut().enable_retry_buffering();
        let limits = &app.config.limits;
        let bounds =
            request_body::Bounds::new(limits, MAX_CHECKED_BODY, Reject::CheckedBodyTooLarge);
        // The body goes on in Pingora's retry buffer: it leaves the pending budget here.
        let body = match request_body::read(session, ctx, bounds).await? {
            Ok((body, _pending)) => body,
            Err(refused) => return Ok(Err(refused)),
        };
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Ok(Vec::new()));
        }
        Ok(body::inspect_fields(&body, ctx.route.fields)
            .map(|facts| facts.models)
            .map_err(Reject::InvalidBody))
    }

    /// Answers `/api/tags`, `/api/ps` and `/v1/models` with the fleet's merged list when there
    /// is more than one instance (`models_view`); `Ok(false)` forwards the request as it is.
    async fn answer_model_list(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let app = &ctx.app.clone();
        let method = &session.req_header().method;
        let Some(list) = ModelList::for_request(method, ctx.route.name, app.registry.all().len())
        else {
            return Ok(false);
        };
        match models_view::fetch(&app.registry, list, app.config.health.timeout).await {
            Ok(body) => respond::json(app, session, ctx, body).await?,
            Err(ViewError::NoInstanceReady) => {
                respond::reject(app, session, ctx, Reject::NoInstance).await?
            }
            Err(ViewError::NoAnswer) => {
                respond::reject(app, session, ctx, Reject::NoModelList).await?
            }
        }
        Ok(true)
    }

    /// Waits for a model-management slot; `Ok(true)` when refused.
    async fn take_management_slot(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        let app = ctx.app.clone();
        let wait = app.config.admission.max_wait;
        let semaphore = app.management.clone();
        match tokio::time::timeout(wait, semaphore.acquire_owned()).await {
            Ok(Ok(permit)) => {
                ctx.management_permit = Some(permit);
                Ok(false)
            }
            _ => {
                respond::reject(&app, session, ctx, Reject::ManagementBusy).await?;
                Ok(true)
            }
        }
    }
}

/// Answers an allowed origin's CORS preflight: 204 with the CORS headers.
async fn answer_preflight(app: &App, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
    let cors = &app.config.access.cors;
    let req = session.req_header();
    let origin = policy::cors::allowed_origin(cors, req).unwrap_or_default();
    let header = policy::cors::preflight_response(cors, origin, req, &ctx.request_id)?;
    ctx.outcome = Outcome::Served;
    ctx.status = 204;
    if headers::body_may_follow(req) {
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(header), true)
        .await?;
    Ok(true)
}

/// Who the access log says the client is: the key's name or client id, else its address.
fn client_label(ctx: &RequestCtx, session: &Session) -> Option<String> {
    match (&ctx.client, session.client_addr()) {
        (Some(c), _) => Some(c.to_string()),
        (None, Some(pingora_core::protocols::l4::socket::SocketAddr::Inet(a))) => {
            Some(a.ip().to_string())
        }
        (None, Some(other)) => Some(other.to_string()),
        (None, None) => None,
    }
}

/// Records a finished client request: its metrics, the status page's recent requests, and its
/// access-log line (target `access`, unless `log.access` is off).
fn record_request(app: &App, session: &Session, e: Option<&Error>, ctx: &mut RequestCtx) {
    let status = session
        .response_written()
        .map(|r| r.status.as_u16())
        .unwrap_or(ctx.status);
    let duration = ctx.started.elapsed();
    ctx.tap.finish(duration);
    let ctx = &*ctx;
    let downstream = session.as_downstream();
    // The sidecar's own answer, or what a failure without one would have been.
    let own = ctx
        .reject
        .clone()
        .or_else(|| e.and_then(|e| respond::classify(e, ctx.instance_name(), &app.config)));
    let record = crate::metrics::RequestRecord {
        class: ctx.route.class.as_str(),
        route: ctx.route.name,
        model: ctx.model.as_deref(),
        status,
        duration,
        queue_wait: ctx.queue_wait,
        first_byte: ctx.first_byte,
        tap: ctx.tap.summary(),
        outcome: ctx.outcome,
        rejection: own.as_ref().filter(|r| r.is_refusal()).map(Reject::label),
        bytes_in: ctx.request_bytes.max(downstream.body_bytes_read() as u64),
        bytes_out: ctx.response_bytes.max(downstream.body_bytes_sent() as u64),
    };
    crate::metrics::global().record(&record);
    let client = client_label(ctx, session);
    crate::admin::recent::global().record(
        &crate::admin::recent::Seen {
            request_id: &ctx.request_id,
            client: client.as_deref().unwrap_or("-"),
            key: ctx.policy.key_name(),
            method: session.req_header().method.as_str(),
            reason: own.as_ref().map(Reject::label),
            message: own.as_ref().map(Reject::message),
        },
        &record,
    );
    if app.config.log.access {
        log_access(app, session, ctx, &record, own.as_ref(), client.as_deref());
    }
}

/// The access-log line of a finished request. Absent values are left out of the line.
fn log_access(
    app: &App,
    session: &Session,
    ctx: &RequestCtx,
    record: &crate::metrics::RequestRecord,
    own: Option<&Reject>,
    client: Option<&str>,
) {
    let req = session.req_header();
    let tap = record.tap;
    // An error status Ollama answered is its own message, not a stream's end.
    let success = (200..300).contains(&record.status);
    let error = own
        .map(Reject::label)
        .or(tap.error.as_deref().filter(|_| !success));
    let stream_error = tap.error.as_deref().filter(|_| success);
    // A request no instance could serve: why they are not ready, for the operator only.
    let instances = match own {
        Some(
            Reject::NoInstance
            | Reject::WaitExpired { .. }
            | Reject::ModelUnavailable { .. }
            | Reject::NotReadySoon { .. },
        ) => crate::admin::unready_instances(app),
        _ => None,
    };
    // Milliseconds, to the microsecond.
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    // The path as the client sent it (what was forwarded); `route` names what it meant.
    let raw_path = String::from_utf8_lossy(req.raw_path());
    let raw_path = raw_path.split('?').next().unwrap_or_default();
    tracing::info!(
        target: "access",
        request_id = %ctx.request_id,
        client,
        method = %req.method,
        path = %raw_path,
        route = record.route,
        class = record.class,
        model = record.model,
        instance = ctx.instance_name(),
        placement = ctx.placement,
        status = record.status,
        outcome = record.outcome.as_str(),
        rejection = record.rejection,
        queue_ms = record.queue_wait.map(ms),
        ttfb_ms = record.first_byte.map(ms),
        ttft_ms = tap.first_token.map(ms),
        duration_ms = ms(record.duration),
        prompt_tokens = tap.prompt_tokens,
        completion_tokens = tap.completion_tokens,
        bytes_in = record.bytes_in,
        bytes_out = record.bytes_out,
        retries = ctx.retries,
        error,
        stream_error,
        instances,
        "{} {} {} {}",
        req.method,
        raw_path,
        record.status,
        record.outcome.as_str()
    );
}

#[async_trait]
impl ProxyHttp for SidecarProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.app.current())
    }

    fn allow_spawning_subrequest(&self, session: &Session, _ctx: &RequestCtx) -> bool {
        session.subrequest_ctx.is_none()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let app = ctx.app.clone();
        let req = session.req_header();
        // One canonical view of the target, from the bytes Pingora forwards: every decision
        // below reads it, never `uri.path()`.
        ctx.path = canonical::path_view(&req.method, req.raw_path());
        ctx.route = match &ctx.path {
            Ok(canonical::PathView::Routed(path)) => route::classify(&req.method, path),
            Ok(canonical::PathView::Redirect(path)) => route::unrouted(path),
            Err(_) => route::unrouted(req.raw_path()),
        };
        // A subrequest carries its parent's admission: straight on to its instance.
        if let Some(dispatch) = session
            .subrequest_ctx
            .as_ref()
            .and_then(|c| c.user_ctx())
            .and_then(|u| u.downcast_ref::<Dispatch>())
        {
            ctx.request_id = dispatch.request_id.clone();
            ctx.app = dispatch.app.clone();
            ctx.dispatch = Some(dispatch.clone());
            // Before anything reads the body: Pingora frames it by this header.
            let body_length = dispatch.body_length;
            let header = session.req_header_mut();
            if header.headers.contains_key(http::header::CONTENT_LENGTH) {
                header.insert_header(http::header::CONTENT_LENGTH, body_length)?;
            }
            return Ok(false);
        }
        let limits = &app.config.limits;
        // A silent client is cut off while its body is read (Pingora's own default is 60 s).
        session.set_read_timeout(Some(limits.body_read_timeout));
        // A client that stops reading is cut off too (Pingora's default: no bound). This
        // bounds each body write of Pingora's proxy path and of the sidecar's own answers.
        session.set_write_timeout(Some(limits.write_timeout));
        // Requests sent back to back on one connection are answered in order: Pingora keeps
        // the bytes after this request's body for the next one (off, it closes the connection
        // after this answer and the pipelined request is lost without a word).
        session.as_downstream_mut().set_pipelining_enabled(true);
        let req = session.req_header();
        ctx.request_id = headers::request_id(req);
        let is_post = req.method == http::Method::POST;
        if app.lifecycle.is_draining() {
            respond::reject(&app, session, ctx, Reject::ShuttingDown).await?;
            return Ok(true);
        }
        ctx.active = Some(app.lifecycle.enter());
        if let Err(refusal) = &ctx.path {
            let refused = Reject::InvalidTarget(refusal.message().to_string());
            respond::reject(&app, session, ctx, refused).await?;
            return Ok(true);
        }
        if self.apply_policy(session, ctx).await? {
            return Ok(true);
        }
        match ctx.route.class {
            RouteClass::Inference if is_post => inference::serve(&app, session, ctx).await,
            RouteClass::Metadata => self.answer_model_list(session, ctx).await,
            RouteClass::Management => self.take_management_slot(session, ctx).await,
            _ => Ok(false),
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let app = ctx.app.clone();
        let chosen = match &ctx.dispatch {
            Some(d) => Some(d.instance.clone()),
            None => select::least_loaded(&app.registry, &ctx.tried),
        };
        let Some(instance) = chosen else {
            return Err(Error::explain(NO_INSTANCE, "no instance is ready"));
        };
        let Some(addr) = instance.addr() else {
            return Err(Error::explain(
                NO_INSTANCE,
                "instance address is not resolved",
            ));
        };
        ctx.tried.push(instance.index);
        let mut peer = target::http_peer(&instance.upstream, addr);
        let timeouts = &app.config.timeouts;
        peer.options.connection_timeout = Some(timeouts.connect);
        // Pingora's read timeout bounds each read, the response header's included; it must be
        // as long as a cold model load. `timeouts.idle` tightens it when configured.
        peer.options.read_timeout = if ctx.is_subrequest() {
            // The parent times the response header and the silences between chunks itself.
            None
        } else {
            Some(match timeouts.idle {
                Some(idle) => idle.max(timeouts.response_header),
                None => timeouts.response_header,
            })
        };
        ctx.upstream = Some(instance.track(addr));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let app = ctx.app.clone();
        if let Some(guard) = &ctx.upstream {
            upstream_request.insert_header(http::header::HOST, guard.host_header())?;
        }
        upstream_request.insert_header(headers::REQUEST_ID, &ctx.request_id)?;
        if ctx.is_subrequest() || ctx.body_read {
            // The sidecar already answered `100 Continue` and read the body.
            upstream_request.remove_header(&http::header::EXPECT);
        }
        policy::on_upstream_request(&app, upstream_request)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let app = ctx.app.clone();
        if upstream_response.status.is_informational() {
            return Ok(());
        }
        ctx.first_byte.get_or_insert_with(|| ctx.started.elapsed());
        keep_alive_or_close(session, ctx);
        headers::strip_response_hop_by_hop(upstream_response);
        upstream_response.insert_header(headers::REQUEST_ID, &ctx.request_id)?;
        policy::on_response(&app, session, upstream_response)?;
        ctx.response_content_type = upstream_response
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // The ordinary proxy path's responses are read too, so any counts they carry are charged
        // (the inference path's relay reads its own; a subrequest's parent does).
        if !ctx.is_subrequest() {
            ctx.tap.start(ctx.response_content_type.as_deref());
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let (Some(bytes), false) = (body.as_ref(), ctx.is_subrequest()) {
            ctx.tap.observe(bytes, ctx.started.elapsed());
        }
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let app = ctx.app.clone();
        // The next attempt goes to the name's next address, if it has one; the name is resolved
        // again in the background.
        let moved = ctx
            .upstream
            .as_ref()
            .is_some_and(|guard| app.registry.connect_failed(guard.instance(), guard.addr()));
        if ctx.is_subrequest() {
            // The parent owns retries (and health reports) for admitted requests.
            return e;
        }
        if let Some(guard) = &ctx.upstream {
            app.registry.report(guard.instance(), false);
        }
        // Nothing reached the instance: another ready instance, or its next address, may serve
        // the request.
        let untried = self
            .app
            .registry
            .all()
            .iter()
            .any(|i| i.is_ready() && !ctx.tried.contains(&i.index));
        if untried || moved {
            e.set_retry(true);
            ctx.retries += 1;
            crate::metrics::global().retry(retry::RetryReason::ConnectError.as_str());
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let app = ctx.app.clone();
        let failure = respond::classify(e, ctx.instance_name(), &app.config);
        let code = failure.as_ref().map_or(0, Reject::status);
        if ctx.is_subrequest() {
            // The parent reads the error from the subrequest handle and answers the client.
            return FailToProxy {
                error_code: code,
                can_reuse_downstream: false,
            };
        }
        let Some(failure) = failure else {
            // The client is gone: nothing to answer.
            return FailToProxy {
                error_code: session.response_written().map_or(0, |r| r.status.as_u16()),
                can_reuse_downstream: false,
            };
        };
        if let Some(written) = session.response_written() {
            // The client already has a status line: end the stream in its own framing.
            let status = written.status.as_u16();
            let content_type = ctx.response_content_type.as_deref();
            if let Some(line) = errors::in_band_error(content_type, &failure.message()) {
                let _ = session.write_response_body(Some(line), true).await;
            }
            ctx.outcome = Outcome::Failed;
            ctx.reject = Some(failure);
            return FailToProxy {
                error_code: status,
                can_reuse_downstream: false,
            };
        }
        // The request body may be unread: say the connection closes, then close it.
        session.set_keepalive(None);
        if let Err(write_err) = respond::reject(&app, session, ctx, failure).await {
            tracing::debug!(error = %write_err, "could not send the error response");
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        // Failures are reported once, by our own access log line.
        true
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let app = ctx.app.clone();
        if ctx.is_subrequest() {
            // The parent logs the request once.
            ctx.upstream = None;
            return;
        }
        // What the ordinary proxy path saw of its instance (the inference path reports itself).
        if let Some(guard) = &ctx.upstream {
            let status = session.response_written().map(|r| r.status.as_u16());
            let upstream_fault = e.is_some_and(|e| e.esource() == &ErrorSource::Upstream);
            // Connect failures were reported by `fail_to_connect` already.
            let connect_failure = e.is_some_and(|e| {
                matches!(
                    e.etype(),
                    ErrorType::ConnectRefused
                        | ErrorType::ConnectNoRoute
                        | ErrorType::ConnectError
                        | ErrorType::ConnectTimedout
                )
            });
            // A 500 is the request's own failure (Ollama's scheduling errors), not the instance's.
            let ok = !upstream_fault
                && status.is_some_and(|s| {
                    crate::upstream::Verdict::of_status(s) != crate::upstream::Verdict::Fault
                });
            if !connect_failure && (ok || upstream_fault || status.is_some()) {
                app.registry.report(guard.instance(), ok);
            }
        }
        // A pull, create, copy or delete changes what the instances have installed.
        if ctx.route.class == RouteClass::Management {
            app.registry.models_changed();
        }
        if ctx.outcome == Outcome::Pending {
            // The ordinary proxy path: what became of the request.
            let answered = session.response_written().is_some();
            ctx.outcome = match e {
                Some(e) if *e.etype() == ErrorType::WriteTimedout => Outcome::WriteTimeout,
                Some(e) if e.esource() == &ErrorSource::Downstream && answered => {
                    Outcome::CancelledStreaming
                }
                Some(e) if e.esource() == &ErrorSource::Downstream => Outcome::CancelledWaiting,
                Some(_) => Outcome::Failed,
                None => Outcome::Served,
            };
        }
        record_request(&app, session, e, ctx);
        let state = std::mem::take(&mut ctx.policy);
        policy::on_finish(&app, state, ctx.tap.summary());
        ctx.upstream = None;
        ctx.management_permit = None;
        ctx.active = None;
    }
}

/// Binary upgrade: once this process has handed its sockets over, a response says
/// `Connection: close` so that the client reconnects, to the new process; before, the response
/// is counted until it ends (see `upgrade::await_keepalive_promises`).
pub(crate) fn keep_alive_or_close(session: &mut Session, ctx: &mut RequestCtx) {
    // A connection that closes after this response anyway (the client asked, or HTTP/1.0)
    // promises nothing.
    if session.get_keepalive().is_none() {
        return;
    }
    match crate::upgrade::keepalive_promise() {
        Some(promise) => ctx.keepalive_promise = Some(promise),
        None => session.set_keepalive(None),
    }
}
