//! The `ProxyHttp` conductor. Each Pingora hook hands its work to a stage module (route, headers,
//! errors, upstream selection) and keeps what the request learns in `RequestCtx`.

pub mod body;
pub mod canonical;
pub mod errors;
pub mod headers;
pub mod inference;
pub mod retry;
pub mod route;
pub mod tap;

use crate::app::{ActiveGuard, App};
use crate::upstream::{select, target, InFlightGuard};
use async_trait::async_trait;
use errors::SidecarError;
use inference::{Dispatch, Outcome};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use route::{ApiShape, Route, RouteClass};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// No instance is ready to take the request.
const NO_INSTANCE: ErrorType = ErrorType::new("NoInstanceReady");

pub struct SidecarProxy {
    app: Arc<App>,
}

impl SidecarProxy {
    pub fn new(app: Arc<App>) -> Self {
        SidecarProxy { app }
    }
}

/// What one request has learned so far.
pub struct RequestCtx {
    pub route: Route,
    /// The canonical path (`canonical::path_view`): the decoded path gin routes on, or why the
    /// target was refused.
    pub path: Result<canonical::PathView, canonical::PathRefusal>,
    pub request_id: String,
    pub started: Instant,
    /// Set in a subrequest: the instance its parent was admitted to.
    dispatch: Option<Dispatch>,
    /// Keeps the request counted for the shutdown drain.
    active: Option<ActiveGuard>,
    /// The instance currently serving the request, counted as in flight there.
    upstream: Option<InFlightGuard>,
    /// A model-management slot, held until the request ends.
    management_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Instances tried so far (by registry index).
    tried: Vec<usize>,
    /// The upstream response's content type, for an in-band error if the stream breaks.
    response_content_type: Option<String>,
    // What the inference path learns, for the access log and metrics.
    pub model: Option<String>,
    pub stream: Option<bool>,
    pub client: Option<Arc<str>>,
    pub instance: Option<String>,
    /// Why admission chose the instance (`admission::Reason`).
    pub placement: Option<&'static str>,
    pub queue_wait: Option<Duration>,
    pub first_byte: Option<Duration>,
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub outcome: Outcome,
    pub refusal: Option<&'static str>,
    /// Reads the relayed response for tokens and in-band errors.
    pub tap: tap::StreamTap,
    /// Retries made, and why.
    pub retries: u32,
    pub retry_reasons: Vec<retry::RetryReason>,
    /// What access control learned (the API key, its in-flight count).
    pub policy: crate::policy::RequestPolicy,
}

impl RequestCtx {
    pub fn instance_name(&self) -> Option<&str> {
        self.upstream
            .as_ref()
            .map(|g| g.instance().name.as_str())
            .or(self.instance.as_deref())
    }

    fn is_subrequest(&self) -> bool {
        self.dispatch.is_some()
    }
}

/// Writes a complete error response of the sidecar's own, in the route's shape.
pub async fn respond_error(
    session: &mut Session,
    shape: ApiShape,
    err: &SidecarError,
    request_id: &str,
) -> Result<()> {
    let body = errors::error_body(shape, err.status, &err.message);
    let header = errors::error_header(err, body.len(), request_id)?;
    write_whole_response(session, header, body).await
}

/// Writes a response the sidecar answers itself: the header and its whole body, or the header
/// alone for a HEAD request.
pub async fn write_whole_response(
    session: &mut Session,
    header: ResponseHeader,
    body: bytes::Bytes,
) -> Result<()> {
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(header), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// Maps a proxying failure to the status and message the client gets (status 0: no response,
/// the client is gone).
pub(crate) fn describe_failure(e: &Error, instance: Option<&str>, app: &App) -> (u16, String) {
    let instance = instance.unwrap_or("?");
    let timeouts = &app.config.timeouts;
    match e.etype() {
        ErrorType::HTTPStatus(code) => (*code, format!("ollama-sidecar: request failed with status {code}")),
        t if *t == NO_INSTANCE => (
            503,
            "ollama-sidecar: no Ollama instance is ready to serve this request".to_string(),
        ),
        ErrorType::ConnectTimedout => (
            504,
            format!(
                "ollama-sidecar: connecting to instance `{instance}` timed out after {} (timeouts.connect)",
                humantime::format_duration(timeouts.connect)
            ),
        ),
        ErrorType::ReadTimedout if e.esource() == &ErrorSource::Downstream => (
            408,
            format!(
                "ollama-sidecar: the request body stopped arriving for {} (limits.body_read_timeout)",
                humantime::format_duration(app.config.limits.body_read_timeout)
            ),
        ),
        ErrorType::ReadTimedout => (
            504,
            format!(
                "ollama-sidecar: instance `{instance}` did not answer within {} (timeouts.response_header)",
                humantime::format_duration(timeouts.response_header)
            ),
        ),
        ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError => (
            502,
            format!("ollama-sidecar: instance `{instance}` is unreachable: {}", e.etype().as_str()),
        ),
        _ => match e.esource() {
            ErrorSource::Upstream => (
                502,
                format!(
                    "ollama-sidecar: instance `{instance}` failed: {}",
                    e.etype().as_str()
                ),
            ),
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                    (0, String::new())
                }
                _ => (400, "ollama-sidecar: bad request".to_string()),
            },
            ErrorSource::Internal | ErrorSource::Unset => {
                (500, "ollama-sidecar: internal error".to_string())
            }
        },
    }
}

/// Records a finished client request: its metrics, and its access-log line (target `access`,
/// unless `log.access` is off).
fn record_request(app: &App, session: &Session, e: Option<&Error>, ctx: &mut RequestCtx) {
    let status = session
        .response_written()
        .map(|r| r.status.as_u16())
        .unwrap_or(ctx.status);
    let duration = ctx.started.elapsed();
    ctx.tap.finish(duration);
    let tap = ctx.tap.summary();
    let downstream = session.as_downstream();
    let bytes_in = ctx.request_bytes.max(downstream.body_bytes_read() as u64);
    let bytes_out = ctx.response_bytes.max(downstream.body_bytes_sent() as u64);
    let record = crate::metrics::RequestRecord {
        class: ctx.route.class.as_str(),
        route: ctx.route.name,
        model: ctx.model.as_deref(),
        status,
        duration,
        queue_wait: ctx.queue_wait,
        first_byte: ctx.first_byte,
        tap,
        outcome: ctx.outcome,
        refusal: ctx.refusal,
        bytes_in,
        bytes_out,
    };
    crate::metrics::global().record(&record);
    if !app.config.log.access {
        return;
    }
    // Milliseconds, to the microsecond.
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    let req = session.req_header();
    let client = match (&ctx.client, session.client_addr()) {
        (Some(c), _) => c.to_string(),
        (None, Some(pingora_core::protocols::l4::socket::SocketAddr::Inet(a))) => {
            a.ip().to_string()
        }
        (None, Some(other)) => other.to_string(),
        (None, None) => "-".to_string(),
    };
    let rejection = crate::metrics::rejection_reason(ctx.outcome, ctx.refusal, status);
    // The path as the client sent it (what was forwarded); `route` names what it meant.
    let raw_path = String::from_utf8_lossy(req.raw_path());
    let raw_path = raw_path.split('?').next().unwrap_or_default();
    tracing::info!(
        target: "access",
        request_id = %ctx.request_id,
        client = %client,
        method = %req.method,
        path = %raw_path,
        route = ctx.route.name,
        class = ctx.route.class.as_str(),
        model = ctx.model.as_deref().unwrap_or("-"),
        instance = ctx.instance_name().unwrap_or("-"),
        placement = ctx.placement.unwrap_or("-"),
        status,
        outcome = ctx.outcome.as_str(),
        rejection,
        queue_ms = ctx.queue_wait.map(ms),
        ttfb_ms = ctx.first_byte.map(ms),
        ttft_ms = tap.first_token.map(ms),
        duration_ms = ms(duration),
        prompt_tokens = tap.prompt_tokens,
        completion_tokens = tap.completion_tokens,
        bytes_in,
        bytes_out,
        retries = ctx.retries,
        error = e.map(|e| e.etype().as_str()),
        stream_error = tap.error.as_deref(),
        "{} {} {} {}",
        req.method,
        raw_path,
        status,
        ctx.outcome.as_str()
    );
}

#[async_trait]
impl ProxyHttp for SidecarProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            route: route::classify(&http::Method::GET, "/"),
            path: Ok(canonical::PathView::Routed(b"/".to_vec())),
            request_id: String::new(),
            started: Instant::now(),
            dispatch: None,
            active: None,
            upstream: None,
            management_permit: None,
            tried: Vec::new(),
            response_content_type: None,
            model: None,
            stream: None,
            client: None,
            instance: None,
            placement: None,
            queue_wait: None,
            first_byte: None,
            status: 0,
            request_bytes: 0,
            response_bytes: 0,
            outcome: Outcome::Pending,
            refusal: None,
            tap: tap::StreamTap::default(),
            retries: 0,
            retry_reasons: Vec::new(),
            policy: Default::default(),
        }
    }

    fn allow_spawning_subrequest(&self, session: &Session, _ctx: &RequestCtx) -> bool {
        session.subrequest_ctx.is_none()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
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
            ctx.dispatch = Some(dispatch.clone());
            return Ok(false);
        }
        ctx.request_id = headers::request_id(req);
        let is_post = req.method == http::Method::POST;
        if self.app.lifecycle.is_draining() {
            ctx.refusal = Some("shutting_down");
            ctx.outcome = Outcome::Refused;
            session.set_keepalive(None);
            let err = SidecarError::new(503, "ollama-sidecar is shutting down").retry_after(1);
            respond_error(session, ctx.route.shape, &err, &ctx.request_id).await?;
            return Ok(true);
        }
        ctx.active = Some(self.app.lifecycle.enter());
        if let Err(refusal) = ctx.path {
            let err = SidecarError::new(400, refusal.message());
            return crate::policy::refuse(&self.app, session, ctx, err).await;
        }
        if crate::policy::on_request(&self.app, session, ctx).await? {
            return Ok(true);
        }
        match ctx.route.class {
            RouteClass::Inference if is_post => inference::serve(self, session, ctx).await,
            // The fleet's model lists are merged here rather than taken from one instance.
            RouteClass::Metadata => match crate::models_view::ModelList::for_request(
                &session.req_header().method,
                ctx.route.name,
                self.app.registry.all().len(),
            ) {
                Some(list) => crate::models_view::serve(&self.app, session, ctx, list).await,
                None => Ok(false),
            },
            RouteClass::Management => {
                let wait = self.app.config.admission.max_wait;
                let semaphore = self.app.management.clone();
                match tokio::time::timeout(wait, semaphore.acquire_owned()).await {
                    Ok(Ok(permit)) => {
                        ctx.management_permit = Some(permit);
                        Ok(false)
                    }
                    _ => {
                        let err = SidecarError::new(
                            503,
                            "ollama-sidecar: too many model-management requests (admission.management_concurrency)",
                        )
                        .retry_after(5);
                        ctx.refusal = Some("management_busy");
                        ctx.outcome = Outcome::Refused;
                        session.set_keepalive(None);
                        respond_error(session, ctx.route.shape, &err, &ctx.request_id).await?;
                        Ok(true)
                    }
                }
            }
            _ => Ok(false),
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let chosen = match &ctx.dispatch {
            Some(d) => Some(d.instance.clone()),
            None => select::least_loaded(&self.app.registry, &ctx.tried),
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
        let timeouts = &self.app.config.timeouts;
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
        if let Some(guard) = &ctx.upstream {
            upstream_request.insert_header(http::header::HOST, guard.host_header())?;
        }
        upstream_request.insert_header(headers::REQUEST_ID, &ctx.request_id)?;
        if ctx.is_subrequest() {
            // The parent already answered `100 Continue` and holds the whole body.
            upstream_request.remove_header(&http::header::EXPECT);
        }
        crate::policy::on_upstream_request(&self.app, upstream_request, ctx)?;
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if upstream_response.status.is_informational() {
            return Ok(());
        }
        ctx.first_byte.get_or_insert_with(|| ctx.started.elapsed());
        headers::strip_response_hop_by_hop(upstream_response);
        upstream_response.insert_header(headers::REQUEST_ID, &ctx.request_id)?;
        crate::policy::on_response(&self.app, session, upstream_response)?;
        ctx.response_content_type = upstream_response
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // The next attempt goes to the name's next address, if it has one; the name is resolved
        // again in the background.
        let moved = ctx.upstream.as_ref().is_some_and(|guard| {
            self.app
                .registry
                .connect_failed(guard.instance(), guard.addr())
        });
        if ctx.is_subrequest() {
            // The parent owns retries (and health reports) for admitted requests.
            return e;
        }
        if let Some(guard) = &ctx.upstream {
            self.app.registry.report(guard.instance(), false);
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
        let (code, message) = describe_failure(e, ctx.instance_name(), &self.app);
        if ctx.is_subrequest() {
            // The parent reads the error from the subrequest handle and answers the client.
            return FailToProxy {
                error_code: code,
                can_reuse_downstream: false,
            };
        }
        if let Some(written) = session.response_written() {
            // The client already has a status line: end the stream in its own framing.
            let status = written.status.as_u16();
            if code != 0 {
                if let Some(line) =
                    errors::in_band_error(ctx.response_content_type.as_deref(), &message)
                {
                    let _ = session.write_response_body(Some(line), true).await;
                }
            }
            return FailToProxy {
                error_code: status,
                can_reuse_downstream: false,
            };
        }
        if code != 0 {
            // The request body may be unread: say the connection closes, then close it.
            session.set_keepalive(None);
            let err = SidecarError::new(code, message);
            if let Err(write_err) =
                respond_error(session, ctx.route.shape, &err, &ctx.request_id).await
            {
                tracing::debug!(error = %write_err, "could not send the error response");
            }
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
            let ok = !upstream_fault && status.is_some_and(|s| s < 500);
            if !connect_failure && (ok || upstream_fault || status.is_some()) {
                self.app.registry.report(guard.instance(), ok);
            }
        }
        // A pull, create, copy or delete changes what the instances have installed.
        if ctx.route.class == RouteClass::Management {
            self.app.registry.models_changed();
        }
        if ctx.outcome == Outcome::Pending {
            // The ordinary proxy path: what became of the request.
            let answered = session.response_written().is_some();
            ctx.outcome = match e {
                Some(e) if e.esource() == &ErrorSource::Downstream && answered => {
                    Outcome::CancelledStreaming
                }
                Some(e) if e.esource() == &ErrorSource::Downstream => Outcome::CancelledWaiting,
                Some(_) => Outcome::Failed,
                None => Outcome::Served,
            };
        }
        record_request(&self.app, session, e, ctx);
        crate::policy::on_finish(ctx);
        ctx.upstream = None;
        ctx.management_permit = None;
        ctx.active = None;
    }
}
