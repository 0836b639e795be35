//! Request dispatch: counting, the request log, Go's request-target handling (`gourl`),
//! gin's routing (`router`), Ollama's CORS and Host checks, and response helpers.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};

use crate::cli::split_host_port;
use crate::gourl::GoUrl;
use crate::router::{self, Resolution, Route};
use crate::state::{LogEntry, State};
use crate::stream::Body;
use crate::{control, gourl, infer, native, openai, util};

pub const JSON: &str = "application/json; charset=utf-8";
pub const BUSY: &str = "server busy, please try again.  maximum pending requests exceeded";

/// Per-request context handed to route handlers.
pub struct Ctx {
    pub state: Arc<State>,
    pub method: Method,
    /// The route's param (`:digest`, `:model`), decoded.
    pub param: Option<String>,
    pub user_agent: Option<HeaderValue>,
    pub t0: Instant,
    outcome: &'static str,
    log: Option<LogEntry>,
}

impl Ctx {
    /// The handler bound its body (or needs none): record the request with the model it
    /// acts on. Only the first call records.
    pub fn commit_log(&mut self, model: Option<&str>) {
        self.bound(model, None);
    }

    /// Like `commit_log`, with /api/copy's destination too.
    pub fn bound(&mut self, model: Option<&str>, destination: Option<&str>) {
        if let Some(mut e) = self.log.take() {
            e.model = model.map(str::to_string);
            e.destination = destination.map(str::to_string);
            e.outcome = self.outcome;
            self.state.record(e);
        }
    }

    /// The handler rejected its body with 400; `model` is what the struct held by then.
    pub fn bind_failed(&mut self, model: Option<&str>) {
        self.outcome = "bind_error";
        self.bound(model, None);
    }

    /// Record the request (if no handler did) with how it ended; the route is kept only
    /// when its handler ran.
    fn finish(&mut self, outcome: &'static str) {
        self.outcome = outcome;
        if outcome != "handled" {
            if let Some(e) = self.log.as_mut() {
                e.route = None;
            }
        }
        self.bound(None, None);
    }

    pub fn set_body_digest(&mut self, len: u64, sha256: String) {
        if let Some(e) = self.log.as_mut() {
            e.body_len = Some(len);
            e.body_sha256 = Some(sha256);
        }
    }

    pub fn logging(&self) -> bool {
        self.log.is_some()
    }
}

impl Drop for Ctx {
    /// A request whose handler never finished (the client left, the connection broke) is
    /// still logged once, with what was known when it ended.
    fn drop(&mut self) {
        self.bound(None, None);
    }
}

pub async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    if path == "/mock" || path.starts_with("/mock/") {
        return Ok(control::handle(state, req).await);
    }
    if let Some(n) = state.cfg.crash_after {
        if state.arrivals.fetch_add(1, Relaxed) + 1 >= n {
            eprintln!(
                "mock-ollama: simulated crash at request #{n} ({} {})",
                req.method(),
                req.uri()
            );
            std::process::exit(2);
        }
    }
    let (raw_path, origin) = raw_target(req.uri());
    let url = gourl::parse(raw_path, req.uri().query(), &origin);
    let user_agent = req
        .headers()
        .get(hyper::header::USER_AGENT)
        .map(|v| v.as_bytes());
    // Counted under Go's decoded path when it has one.
    let counted = url.as_ref().map_or(raw_path, |u| u.path.as_str());
    state.stats.count(req.method(), counted, user_agent);
    let t0 = Instant::now();
    let (parts, body) = req.into_parts();
    let line = state
        .cfg
        .log
        .then(|| format!("{} {}", parts.method, parts.uri));
    let resp = dispatch(&state, parts, url, body, t0).await;
    if let Some(line) = line {
        eprintln!(
            "mock-ollama: {line} -> {} in {:?}",
            resp.status().as_u16(),
            t0.elapsed()
        );
    }
    Ok(resp)
}

/// The request target as Go's `url.ParseRequestURI` sees it: (path, `scheme://host` of an
/// absolute-form target).
fn raw_target(uri: &hyper::Uri) -> (&str, String) {
    match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(auth)) => {
            // `http://h` has an empty path for Go; hyper reports "/".
            let path = if uri.path_and_query().is_none() {
                ""
            } else {
                uri.path()
            };
            (path, format!("{}://{auth}", scheme.to_ascii_lowercase()))
        }
        _ => (uri.path(), String::new()),
    }
}

/// Go's net/http answer to a request it cannot parse (server.go `serve`): plain text,
/// and the connection is closed.
fn go_bad_request(detail: Option<&str>) -> Response<Body> {
    let msg = match detail {
        Some(d) => format!("400 Bad Request: {d}"),
        None => "400 Bad Request".to_string(),
    };
    let mut r = text(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", msg);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// server.go `Redirect` to `location` (already a full target) with `status`.
fn go_redirect(method: &Method, status: u16, location: &str) -> Response<Body> {
    let location = gourl::redirect_location(location);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    let mut r = if *method == Method::GET {
        let body = format!(
            "<a href=\"{}\">{}</a>.\n\n",
            gourl::html_escape(&location),
            status.canonical_reason().unwrap_or("")
        );
        text(status, "text/html; charset=utf-8", body)
    } else if *method == Method::HEAD {
        text(status, "text/html; charset=utf-8", Bytes::new())
    } else {
        empty(status)
    };
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

async fn dispatch(
    state: &Arc<State>,
    parts: Parts,
    url: Option<GoUrl>,
    body: Incoming,
    t0: Instant,
) -> Response<Body> {
    let (raw_path, _) = raw_target(&parts.uri);
    let star = raw_path == "*";
    let resolution = url
        .as_ref()
        .filter(|_| !star)
        .map(|u| router::resolve(&parts.method, &u.path));
    let (route_name, pattern, param) = match &resolution {
        Some(Resolution::Handler {
            route,
            pattern,
            param,
        }) => (Some(*route), Some(*pattern), param.clone()),
        _ => (None, None, None),
    };
    let mux_redirect = url.as_ref().filter(|_| !star).and_then(gourl::mux_redirect);
    let gate = gate(state, &parts);
    let forwarded_prefix = parts
        .headers
        .get("x-forwarded-prefix")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let missing_host = parts.version == hyper::Version::HTTP_11
        && !parts.headers.contains_key(header::HOST)
        && parts.method != Method::CONNECT;
    let method = parts.method.clone();
    let logged_route = pattern.filter(|_| mux_redirect.is_none() && !missing_host);
    let mut ctx = request_ctx(state, parts, param, t0, url.as_ref(), logged_route);

    if let Some((outcome, resp)) =
        refuse_before_routing(&method, url.is_none(), missing_host, star, mux_redirect)
    {
        drain(&mut ctx, body).await;
        ctx.finish(outcome);
        return resp;
    }
    // Unreachable with a `url` (only `*` resolves to nothing, and it was answered above).
    let (Some(url), Some(resolution)) = (url, resolution) else {
        ctx.finish("not_found");
        return text(StatusCode::NOT_FOUND, "text/plain", "404 page not found");
    };
    // gin redirects before running any middleware (CORS and Host checks included).
    if let Resolution::Redirect { status, .. } = resolution {
        drain(&mut ctx, body).await;
        ctx.finish("redirect");
        return gin_redirect(&method, status, &url, forwarded_prefix.as_deref());
    }
    let cors = match gate {
        Ok(c) => c,
        Err(resp) => {
            drain(&mut ctx, body).await;
            let outcome = if resp.status() == StatusCode::FORBIDDEN {
                "forbidden"
            } else {
                "preflight"
            };
            ctx.finish(outcome);
            return resp;
        }
    };
    let mut resp = run_route(&mut ctx, resolution, route_name, body).await;
    ctx.finish("handled");
    allow_origin(&mut resp, cors);
    resp
}

/// The handler's context, with a request-log entry when the log is on.
fn request_ctx(
    state: &Arc<State>,
    parts: Parts,
    param: Option<String>,
    t0: Instant,
    url: Option<&GoUrl>,
    route: Option<&'static str>,
) -> Ctx {
    let Parts {
        method,
        uri,
        version,
        headers,
        ..
    } = parts;
    let user_agent = headers.get(header::USER_AGENT).cloned();
    let log = state.cfg.request_log.then(|| LogEntry {
        seq: 0,
        at: SystemTime::now(),
        method: method.clone(),
        uri,
        version,
        headers,
        body_len: None,
        body_sha256: None,
        decoded_path: url.map(|u| u.path.clone()),
        route,
        outcome: "handled",
        model: None,
        destination: None,
    });
    Ctx {
        state: state.clone(),
        method,
        param,
        user_agent,
        t0,
        outcome: "handled",
        log,
    }
}

/// net/http, before any handler: requests Go refuses to serve, `*` targets, and
/// DefaultServeMux's sanitising redirect. The outcome to log and the answer.
fn refuse_before_routing(
    method: &Method,
    unparsed: bool,
    missing_host: bool,
    star: bool,
    mux_redirect: Option<String>,
) -> Option<(&'static str, Response<Body>)> {
    // readRequest parses the target first (url.ParseRequestURI), then insists on Host for
    // HTTP/1.1.
    if unparsed {
        return Some(("bad_request", go_bad_request(None)));
    }
    if missing_host {
        let resp = go_bad_request(Some("missing required Host header"));
        return Some(("bad_request", resp));
    }
    if star {
        if method == Method::OPTIONS {
            // server.go serverHandler: `OPTIONS *` gets globalOptionsHandler's empty 200.
            let mut r = empty(StatusCode::OK);
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
            return Some(("handled", r));
        }
        // ServeMux.ServeHTTP: any other `*` request is a 400 that closes the connection.
        let mut r = empty(StatusCode::BAD_REQUEST);
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Some(("bad_request", r));
    }
    // DefaultServeMux sanitising: 301 to the cleaned path, for every method.
    mux_redirect.map(|location| ("redirect", go_redirect(method, 301, &location)))
}

/// gin's trailing-slash redirect.
fn gin_redirect(
    method: &Method,
    status: u16,
    url: &GoUrl,
    forwarded_prefix: Option<&str>,
) -> Response<Body> {
    let new_path = router::trailing_slash_target(forwarded_prefix, &url.path);
    // gin.go redirectRequest: URL.String(), whose path is re-escaped from the new Path.
    let mut location = format!("{}{}", url.origin, gourl::escape_path(new_path.as_bytes()));
    if url.force_query || !url.raw_query.is_empty() {
        location.push('?');
        location.push_str(&url.raw_query);
    }
    go_redirect(method, status, &location)
}

/// The routed request past the CORS and Host checks: gin's 405, a handler, or its 404.
async fn run_route(
    ctx: &mut Ctx,
    resolution: Resolution,
    route_name: Option<Route>,
    body: Incoming,
) -> Response<Body> {
    match (resolution, route_name) {
        (Resolution::MethodNotAllowed { allow }, _) => {
            drain(ctx, body).await;
            ctx.finish("method_not_allowed");
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "405 method not allowed",
            );
            if let Ok(v) = HeaderValue::from_str(&allow) {
                r.headers_mut().insert(header::ALLOW, v);
            }
            r
        }
        (Resolution::Handler { .. }, Some(Route::Blob)) => native::blob(ctx, body).await,
        (Resolution::Handler { .. }, Some(route)) => match collect(ctx, body).await {
            Some(bytes) => route_to(route, ctx, bytes).await,
            None => empty(StatusCode::BAD_REQUEST),
        },
        _ => {
            drain(ctx, body).await;
            ctx.finish("not_found");
            text(StatusCode::NOT_FOUND, "text/plain", "404 page not found")
        }
    }
}

/// The CORS middleware's headers on an allowed cross-origin request.
fn allow_origin(resp: &mut Response<Body>, cors: CorsAllow) {
    if let Some((origin, all)) = cors {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if !all {
            h.append(header::VARY, HeaderValue::from_static("Origin"));
        }
    }
}

async fn route_to(route: Route, ctx: &mut Ctx, body: Bytes) -> Response<Body> {
    use crate::stream::Kind;
    match route {
        Route::Root => text(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "Ollama is running",
        ),
        Route::Version => json_bytes(
            StatusCode::OK,
            format!("{{\"version\":\"{}\"}}", crate::cli::VERSION).into_bytes(),
        ),
        Route::Status => json_bytes(
            StatusCode::OK,
            b"{\"cloud\":{\"disabled\":false,\"source\":\"none\"}}".to_vec(),
        ),
        Route::Tags => native::tags(ctx),
        Route::Ps => native::ps(ctx),
        Route::Show => native::show(ctx, &body),
        Route::Generate => infer::generate(ctx, &body, Kind::Generate).await,
        Route::Chat => infer::generate(ctx, &body, Kind::Chat).await,
        Route::OaChat => infer::generate(ctx, &body, Kind::OaChat).await,
        Route::OaCompletions => infer::generate(ctx, &body, Kind::OaCompletion).await,
        Route::Messages => infer::generate(ctx, &body, Kind::Anthropic).await,
        Route::Embed => infer::embed(ctx, &body, infer::EmbedApi::Embed).await,
        Route::Embeddings => infer::embed(ctx, &body, infer::EmbedApi::Legacy).await,
        Route::OaEmbeddings => infer::embed(ctx, &body, infer::EmbedApi::OpenAi).await,
        Route::Pull => native::pull(ctx, &body).await,
        Route::Push => native::push(ctx, &body).await,
        Route::Create => native::create(ctx, &body).await,
        Route::Delete => native::delete(ctx, &body),
        Route::Copy => native::copy(ctx, &body),
        Route::OaModels => openai::models(ctx),
        Route::OaModel => openai::model(ctx),
        Route::OaResponses => openai::responses(ctx, &body),
        Route::Me
        | Route::Signout
        | Route::UserKeys
        | Route::WebSearch
        | Route::WebFetch
        | Route::ModelRecommendations
        | Route::OaTranscriptions => not_implemented(route),
        Route::Blob => unreachable!("blobs stream their body"),
    }
}

/// Routes Ollama registers whose behaviour needs ollama.com (sign-in, web search) or real
/// models (recommendations, audio): routed like Ollama, answered with a plain 501.
fn not_implemented(route: Route) -> Response<Body> {
    error(
        Flavor::Native,
        StatusCode::NOT_IMPLEMENTED,
        &format!("mock-ollama does not implement {route:?}"),
    )
}

/// Read the whole request body (hashing it for the log).
async fn collect(ctx: &mut Ctx, body: Incoming) -> Option<Bytes> {
    let bytes = body.collect().await.ok()?.to_bytes();
    if ctx.logging() {
        ctx.set_body_digest(bytes.len() as u64, util::sha256_hex(&bytes));
    }
    Some(bytes)
}

/// Read and discard a body without buffering it (still hashed for the log).
pub async fn drain(ctx: &mut Ctx, mut body: Incoming) -> Option<(u64, [u8; 32])> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        if let Some(d) = frame.data_ref() {
            len += d.len() as u64;
            h.update(d);
        }
    }
    let digest: [u8; 32] = h.finalize().into();
    ctx.set_body_digest(len, util::hex(&digest));
    Some((len, digest))
}

type CorsAllow = Option<(HeaderValue, bool)>;

/// gin-contrib/cors with Ollama's configuration, then Ollama's allowed-hosts middleware.
fn gate(state: &State, parts: &Parts) -> Result<CorsAllow, Response<Body>> {
    // request.go readRequest: `req.Host` is the absolute-form target's host, else the header.
    let host = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let mut allow = None;
    if let Some(origin) = parts.headers.get(header::ORIGIN) {
        let o = origin.to_str().unwrap_or("\u{0}");
        let same_host = o
            .strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))
            == Some(host.as_str());
        if !o.is_empty() && !same_host {
            let all = state.cfg.origins.iter().any(|x| x == "*");
            if !all && !origin_allowed(&state.cfg.origins, o) {
                return Err(empty(StatusCode::FORBIDDEN));
            }
            let value = if all {
                HeaderValue::from_static("*")
            } else {
                origin.clone()
            };
            if parts.method == Method::OPTIONS {
                return Err(preflight(value, all));
            }
            allow = Some((value, all));
        }
    }
    if !state.addr.ip().is_loopback() {
        return Ok(allow);
    }
    let h = split_host_port(&host).map_or(host.as_str(), |(h, _)| h);
    if let Ok(ip) = h.parse::<IpAddr>() {
        if ip.is_loopback() || is_private(ip) || ip.is_unspecified() {
            return Ok(allow);
        }
    }
    if allowed_host_name(state, h) {
        if parts.method == Method::OPTIONS {
            return Err(empty(StatusCode::NO_CONTENT));
        }
        return Ok(allow);
    }
    Err(empty(StatusCode::FORBIDDEN))
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

fn allowed_host_name(state: &State, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    host.is_empty()
        || host == "localhost"
        || (!state.hostname.is_empty() && host == state.hostname)
        || [".localhost", ".local", ".internal"]
            .iter()
            .any(|tld| host.ends_with(tld))
}

/// Ollama's default origins (localhost, 127.0.0.1, 0.0.0.0 on any port; app, file, tauri,
/// vscode schemes) plus OLLAMA_ORIGINS, with gin-contrib/cors wildcard matching.
fn origin_allowed(extra: &[String], origin: &str) -> bool {
    const DEFAULTS: &[&str] = &[
        "http://localhost",
        "https://localhost",
        "http://localhost:*",
        "https://localhost:*",
        "http://127.0.0.1",
        "https://127.0.0.1",
        "http://127.0.0.1:*",
        "https://127.0.0.1:*",
        "http://0.0.0.0",
        "https://0.0.0.0",
        "http://0.0.0.0:*",
        "https://0.0.0.0:*",
        "app://*",
        "file://*",
        "tauri://*",
        "vscode-webview://*",
        "vscode-file://*",
    ];
    let matches = |pattern: &str| {
        let pattern = pattern.to_ascii_lowercase();
        match pattern.split_once('*') {
            None => pattern == origin,
            Some((pre, suf)) => {
                origin.len() >= pre.len() + suf.len()
                    && origin.starts_with(pre)
                    && origin.ends_with(suf)
            }
        }
    };
    DEFAULTS.iter().any(|p| matches(p)) || extra.iter().any(|p| matches(p))
}

fn preflight(origin: HeaderValue, all: bool) -> Response<Body> {
    const HEADERS: &str = "authorization,content-type,user-agent,accept,x-requested-with,openai-beta,x-stainless-arch,x-stainless-async,x-stainless-custom-poll-interval,x-stainless-helper-method,x-stainless-lang,x-stainless-os,x-stainless-package-version,x-stainless-poll-helper,x-stainless-retry-count,x-stainless-runtime,x-stainless-runtime-version,x-stainless-timeout";
    let mut r = empty(StatusCode::NO_CONTENT);
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(HEADERS),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("43200"),
    );
    if !all {
        for v in [
            "Origin",
            "Access-Control-Request-Method",
            "Access-Control-Request-Headers",
        ] {
            h.append(header::VARY, HeaderValue::from_static(v));
        }
    }
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    r
}

// ---- response helpers ----

pub fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::Empty);
    *r.status_mut() = status;
    r
}

pub fn text(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

pub fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    text(status, JSON, body)
}

pub fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    json_bytes(status, serde_json::to_vec(v).unwrap_or_default())
}

pub fn stream(ctype: &'static str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// Which error shape a route uses.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Flavor {
    Native,
    OpenAi,
    Anthropic,
}

pub fn error(flavor: Flavor, status: StatusCode, msg: &str) -> Response<Body> {
    match flavor {
        Flavor::Native => json(status, &serde_json::json!({ "error": msg })),
        Flavor::OpenAi => {
            let kind = match status.as_u16() {
                400 => "invalid_request_error",
                404 => "not_found_error",
                _ => "api_error",
            };
            #[derive(serde::Serialize)]
            struct Inner<'a> {
                message: &'a str,
                r#type: &'a str,
                param: Option<()>,
                code: Option<()>,
            }
            #[derive(serde::Serialize)]
            struct Outer<'a> {
                error: Inner<'a>,
            }
            let body = Outer {
                error: Inner {
                    message: msg,
                    r#type: kind,
                    param: None,
                    code: None,
                },
            };
            json_bytes(status, serde_json::to_vec(&body).unwrap_or_default())
        }
        Flavor::Anthropic => {
            let kind = match status.as_u16() {
                400 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                503 | 529 => "overloaded_error",
                _ => "api_error",
            };
            #[derive(serde::Serialize)]
            struct Inner<'a> {
                r#type: &'a str,
                message: &'a str,
            }
            #[derive(serde::Serialize)]
            struct Outer<'a> {
                r#type: &'a str,
                error: Inner<'a>,
            }
            let body = Outer {
                r#type: "error",
                error: Inner {
                    r#type: kind,
                    message: msg,
                },
            };
            json_bytes(status, serde_json::to_vec(&body).unwrap_or_default())
        }
    }
}

/// The Ollama-shaped error for an injected failure status.
pub fn injected(flavor: Flavor, status: u16) -> Response<Body> {
    let msg = match status {
        503 => BUSY,
        500 => "llama runner process has terminated: exit status 2",
        499 => "request canceled",
        429 => "too many requests",
        404 => "model not found",
        400 => "invalid request",
        502 => "bad gateway",
        504 => "gateway timeout",
        _ => "injected failure",
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error(flavor, status, msg)
}
