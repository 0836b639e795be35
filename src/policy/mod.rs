//! Access control and abuse resistance, between classification and admission: request-head
//! limits, CORS, API keys, route and model policy, rate and concurrency limits, token budgets.
//! Everything but the head limits and the body read timeout is off until configured.
//!
//! The conductor (`proxy/mod.rs`) calls in at five points:
//! - [`on_request`] at the top of `request_filter` (client requests only): may answer on its own
//!   (204 preflight, 401, 403, 413, 414, 429, 431, 400) and remembers the key in the context;
//! - [`on_inference_body`] in the inference path once the body's model is known: 403 for a
//!   model outside the allow-lists;
//! - [`on_upstream_request`]: strips the sidecar's own key and an allowed `Origin`;
//! - [`on_response`]: CORS headers for an allowed origin;
//! - [`on_finish`] from `logging`: charges the response's tokens to the key, ends its in-flight
//!   count.
//!
//! With `shared_state.redis` the rate and concurrency limits are counted in Redis
//! (`shared_limits.rs`) and the local counters only mirror this sidecar's share, for the
//! decisions `shared_state.on_error: open` takes alone while Redis cannot answer.

pub mod cors;
pub mod glob;
pub mod keys;
pub mod limits;
pub mod ratelimit;
pub mod shared_limits;

use crate::app::App;
use crate::config::{AccessConfig, ApiKey, OnSharedError};
use crate::proxy::errors::{self, SidecarError};
use crate::proxy::inference::Outcome;
use crate::proxy::route::RouteClass;
use crate::proxy::RequestCtx;
use crate::upstream::model_key;
use bytes::BytesMut;
use pingora_error::{ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use ratelimit::{
    lock, retry_after_secs, Bucket, ClientLimiter, InFlight, InFlightCounter, Limited,
};
use shared_limits::{KeyLimits, KeyNames, Lease, SharedLimits};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// Largest body of a non-inference request read to check its model against the allow-lists
/// (Pingora replays a body read this early only up to its 64 KiB retry buffer).
pub const MAX_CHECKED_BODY: usize = 64 << 10;

/// A configured key and its live counters.
pub struct KeyState {
    pub key: ApiKey,
    /// `models` is just `*`: no model check for this key.
    any_model: bool,
    requests: Option<Mutex<Bucket>>,
    tokens: Option<Mutex<Bucket>>,
    in_flight: Arc<InFlightCounter>,
    /// Its Redis keys, with `shared_state`.
    shared: Option<KeyNames>,
}

impl KeyState {
    fn allows_class(&self, class: RouteClass) -> bool {
        self.key.routes.iter().any(|r| r == class.as_str())
    }

    /// Its limits for one request (`max_concurrent` only where it counts), or `None` without
    /// any.
    fn limits(&self, max_concurrent: Option<u32>) -> Option<KeyLimits> {
        let limits = KeyLimits {
            tokens_per_minute: self.key.tokens_per_minute.unwrap_or(0),
            requests_per_minute: self.key.requests_per_minute.map_or(0, u64::from),
            max_concurrent: max_concurrent.unwrap_or(0),
        };
        let any = limits.tokens_per_minute > 0
            || limits.requests_per_minute > 0
            || limits.max_concurrent > 0;
        any.then_some(limits)
    }
}

/// The policy built once from the configuration, with its counters.
pub struct Policy {
    keys: Vec<Arc<KeyState>>,
    digests: Vec<[u8; 32]>,
    per_client: Option<ClientLimiter>,
    /// Limits counted in Redis (`shared_state`), and what to do while it cannot answer.
    shared: Option<Arc<SharedLimits>>,
    on_shared_error: OnSharedError,
}

static POLICY: OnceLock<Policy> = OnceLock::new();

impl Policy {
    pub fn new(access: &AccessConfig) -> Policy {
        let now = Instant::now();
        let shared = access.shared_state.as_ref().and_then(|config| {
            SharedLimits::start(config)
                .inspect_err(|e| tracing::error!("shared limits off, limits stay local: {e}"))
                .ok()
        });
        let keys: Vec<Arc<KeyState>> = access
            .keys
            .iter()
            .map(|k| {
                Arc::new(KeyState {
                    any_model: k.models.iter().any(|m| m == "*"),
                    requests: k
                        .requests_per_minute
                        .map(|n| Mutex::new(Bucket::per_minute(n.into(), now))),
                    tokens: k
                        .tokens_per_minute
                        .map(|n| Mutex::new(Bucket::per_minute(n, now))),
                    in_flight: Arc::default(),
                    shared: shared.as_ref().map(|s| s.key_names(&k.name)),
                    key: k.clone(),
                })
            })
            .collect();
        Policy {
            digests: keys.iter().map(|k| k.key.sha256).collect(),
            keys,
            per_client: access
                .policy
                .requests_per_minute_per_client
                .map(|n| ClientLimiter::new(n.into())),
            shared,
            on_shared_error: access
                .shared_state
                .as_ref()
                .map(|s| s.on_error)
                .unwrap_or_default(),
        }
    }

    /// The process's policy (one configuration per process, like the metrics).
    pub fn global(app: &App) -> &'static Policy {
        POLICY.get_or_init(|| Policy::new(&app.config.access))
    }

    /// What `shared_state.on_error` makes of a call Redis did not answer: `None` for a
    /// decision by the local counters, else the 503.
    fn without_redis(&self, e: &crate::shared_state::CallError) -> Option<SidecarError> {
        tracing::debug!(error = %e, "shared limits: no answer from Redis");
        match self.on_shared_error {
            OnSharedError::Open => {
                crate::metrics::global().shared_state_fallback("open");
                None
            }
            OnSharedError::Closed => {
                crate::metrics::global().shared_state_fallback("closed");
                Some(
                    SidecarError::new(
                        503,
                        "ollama-sidecar: the shared limits cannot be checked: Redis (shared_state.redis) does not answer, and shared_state.on_error is `closed`",
                    )
                    .retry_after(1),
                )
            }
        }
    }

    /// Whether any model restriction applies to this key (or to requests without one).
    fn models_restricted(access: &AccessConfig, key: Option<&KeyState>) -> bool {
        !access.policy.models.is_empty() || key.is_some_and(|k| !k.any_model)
    }
}

/// What policy learned about one request.
#[derive(Debug, Default)]
pub struct RequestPolicy {
    /// The key the request authenticated with.
    key: Option<KeyStateRef>,
    /// Counts the request against the key's `max_concurrent` until it ends.
    in_flight: Option<InFlight>,
    /// The same, in Redis (`shared_state`).
    lease: Option<Lease>,
    /// The body was read here (to check its model): `Expect` must not go upstream.
    body_consumed: bool,
}

/// A key, as the request context holds it (its name without the secret's digest in `Debug`).
pub struct KeyStateRef(Arc<KeyState>);

impl std::fmt::Debug for KeyStateRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key `{}`", self.0.key.name)
    }
}

impl RequestPolicy {
    /// The key's name, when the request carried a key.
    pub fn key_name(&self) -> Option<&str> {
        self.key.as_ref().map(|k| k.0.key.name.as_str())
    }

    /// The key's admission priority, when the request carried a key.
    pub fn priority(&self) -> Option<i32> {
        self.key.as_ref().map(|k| k.0.key.priority)
    }
}

/// The admission priority of a request that carried a key (it overrides any priority header).
pub fn key_priority(ctx: &RequestCtx) -> Option<i32> {
    ctx.policy.priority()
}

/// Whether a `model` named by a request is allowed by the policy and the key.
pub fn model_allowed(access: &AccessConfig, key: Option<&ApiKey>, model: &str) -> bool {
    let raw = model.trim();
    let canonical = model_key(raw);
    let fits = |patterns: &[String]| {
        patterns
            .iter()
            .any(|p| glob::matches(p, raw) || glob::matches(p, &canonical))
    };
    (access.policy.models.is_empty() || fits(&access.policy.models))
        && key.is_none_or(|k| fits(&k.models))
}

/// Why a request is refused, for the access log and metrics.
fn refusal_reason(status: u16) -> Option<&'static str> {
    match status {
        401 | 403 => Some("unauthorized"),
        429 => Some("rate_limited"),
        413 => Some("body_too_large"),
        400 => Some("invalid_body"),
        _ => None,
    }
}

/// Whether the client may still be sending a body the sidecar has not read.
fn body_may_follow(req: &RequestHeader) -> bool {
    req.headers.contains_key(http::header::TRANSFER_ENCODING)
        || req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// Answers a request the policy refuses, in the route's error shape (with `WWW-Authenticate` on
/// 401, CORS headers for an allowed origin); always `Ok(true)`: answered.
pub async fn refuse(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    err: SidecarError,
) -> Result<bool> {
    let body = errors::error_body(ctx.route.shape, err.status, &err.message);
    let mut header = errors::error_header(&err, body.len(), &ctx.request_id)?;
    if err.status == 401 {
        header.insert_header(
            http::header::WWW_AUTHENTICATE,
            "Bearer realm=\"ollama-sidecar\"",
        )?;
    }
    if let Some(origin) = cors::allowed_origin(&app.config.access.cors, session.req_header()) {
        let origin = origin.to_string();
        cors::decorate(&mut header, &origin)?;
    }
    if !ctx.policy.body_consumed && body_may_follow(session.req_header()) {
        // The body is unread: the connection cannot carry another request.
        session.set_keepalive(None);
    }
    ctx.outcome = Outcome::Refused;
    ctx.refusal = refusal_reason(err.status);
    ctx.status = err.status;
    crate::proxy::write_whole_response(session, header, body).await?;
    Ok(true)
}

fn too_many(message: String, wait: std::time::Duration) -> SidecarError {
    SidecarError::new(429, message).retry_after(retry_after_secs(wait))
}

/// The client's address, for per-client limits.
fn client_ip(session: &Session) -> Option<std::net::IpAddr> {
    match session.client_addr() {
        Some(pingora_core::protocols::l4::socket::SocketAddr::Inet(a)) => Some(a.ip()),
        _ => None,
    }
}

/// How a request authenticated.
enum Auth {
    Key(Arc<KeyState>),
    Missing,
    Invalid,
}

fn authenticate(policy: &Policy, req: &RequestHeader) -> Auth {
    let presented = keys::presented(req);
    if presented.is_empty() {
        return Auth::Missing;
    }
    for (_, secret) in &presented {
        if let Some(i) = keys::find(&policy.digests, secret) {
            return Auth::Key(policy.keys[i].clone());
        }
    }
    Auth::Invalid
}

/// The policy's checks for a client request, at the top of `request_filter`. `Ok(true)` when
/// the request was answered here.
pub async fn on_request(app: &App, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
    let config = &app.config;
    let access = &config.access;
    // A silent client is cut off while its body is read (Pingora's own default is 60 s).
    session.set_read_timeout(Some(config.limits.body_read_timeout));
    if let Some(err) = limits::check(&config.limits, session.req_header()) {
        return refuse(app, session, ctx, err).await;
    }

    // An allowed origin's preflight is answered here, before authentication: browsers send
    // preflights without credentials.
    if cors::is_preflight(session.req_header()) {
        if let Some(origin) = cors::allowed_origin(&access.cors, session.req_header()) {
            let header = cors::preflight_response(
                &access.cors,
                origin,
                session.req_header(),
                &ctx.request_id,
            )?;
            ctx.outcome = Outcome::Served;
            ctx.status = 204;
            if body_may_follow(session.req_header()) {
                session.set_keepalive(None);
            }
            session
                .write_response_header(Box::new(header), true)
                .await?;
            return Ok(true);
        }
    }

    let policy = Policy::global(app);
    let class = ctx.route.class;
    let key = if policy.keys.is_empty() {
        None
    } else {
        match authenticate(policy, session.req_header()) {
            Auth::Key(k) => Some(k),
            Auth::Missing if access.allow_anonymous_metadata && class == RouteClass::Metadata => {
                None
            }
            Auth::Missing => {
                let err = SidecarError::new(
                    401,
                    "ollama-sidecar: an API key is required (`Authorization: Bearer <key>` or `x-api-key: <key>`)",
                );
                return refuse(app, session, ctx, err).await;
            }
            Auth::Invalid => {
                let err = SidecarError::new(401, "ollama-sidecar: invalid API key");
                return refuse(app, session, ctx, err).await;
            }
        }
    };
    if let Some(k) = &key {
        // The key's name is the client's identity for fairness and in the logs.
        ctx.client = Some(Arc::from(k.key.name.as_str()));
    }

    if access
        .policy
        .deny_classes
        .iter()
        .any(|c| c == class.as_str())
    {
        let err = SidecarError::new(
            403,
            format!(
                "ollama-sidecar: {} routes are disabled here (policy.deny_classes)",
                class.as_str()
            ),
        );
        return refuse(app, session, ctx, err).await;
    }
    if let Some(k) = key.as_ref().filter(|k| !k.allows_class(class)) {
        let hint = if class == RouteClass::Management {
            " (model management needs `admin: true`)"
        } else {
            ""
        };
        let err = SidecarError::new(
            403,
            format!(
                "ollama-sidecar: key `{}` may not use {} routes{hint}",
                k.key.name,
                class.as_str()
            ),
        );
        return refuse(app, session, ctx, err).await;
    }

    if let Some(err) = check_limits(policy, session, ctx, key.as_ref(), class).await {
        let unavailable = err.status == 503;
        let answered = refuse(app, session, ctx, err).await;
        if unavailable {
            ctx.refusal = Some("limits_unavailable");
        }
        return answered;
    }
    ctx.policy.key = key.clone().map(KeyStateRef);

    // Non-inference routes that name a model (show, pull, push, create, copy, delete, and
    // `/v1/models/:model`) are checked here; inference routes once their body is read.
    if !Policy::models_restricted(access, key.as_deref()) || class == RouteClass::Inference {
        return Ok(false);
    }
    let api_key = key.as_ref().map(|k| &k.key);
    if ctx.route.name == "/v1/models/:model" {
        // The model as gin binds the `:model` parameter: from the decoded path.
        let decoded = ctx.path.as_ref().map(|p| p.decoded()).unwrap_or_default();
        let model = String::from_utf8_lossy(
            crate::proxy::route::param(&ctx.route, decoded).unwrap_or_default(),
        )
        .into_owned();
        if !model_allowed(access, api_key, &model) {
            return refuse(app, session, ctx, forbidden_model(&model, api_key)).await;
        }
        return Ok(false);
    }
    if !ctx.route.has_model_body() || !body_may_follow(session.req_header()) {
        return Ok(false);
    }
    let names = match read_small_json_body(session, ctx).await? {
        SmallBody::Models(names) => names,
        SmallBody::Refused(err) => return refuse(app, session, ctx, err).await,
    };
    if let Some(bad) = names.iter().find(|m| !model_allowed(access, api_key, m)) {
        let err = forbidden_model(bad, api_key);
        return refuse(app, session, ctx, err).await;
    }
    Ok(false)
}

/// The rate and concurrency limits of a request: a refusal, or `None` (with the key's
/// in-flight count, and its lease in Redis, held in `ctx.policy` until the request ends).
async fn check_limits(
    policy: &Policy,
    session: &Session,
    ctx: &mut RequestCtx,
    key: Option<&Arc<KeyState>>,
    class: RouteClass,
) -> Option<SidecarError> {
    let now = Instant::now();
    let Some(k) = key else {
        let (limiter, ip) = (policy.per_client.as_ref()?, client_ip(session)?);
        let taken = match &policy.shared {
            Some(shared) => match shared.admit_client(ip, limiter.per_minute()).await {
                Ok(decided) => {
                    if decided.is_ok() {
                        limiter.charge(ip, now);
                    }
                    decided
                }
                Err(e) => match policy.without_redis(&e) {
                    Some(refusal) => return Some(refusal),
                    None => limiter.take(ip, now),
                },
            },
            None => limiter.take(ip, now),
        };
        return taken.err().map(|wait| {
            too_many(
                format!(
                    "ollama-sidecar: rate limit: client {ip} may send {} requests per minute (policy.requests_per_minute_per_client)",
                    limiter.per_minute()
                ),
                wait,
            )
        });
    };
    let counted = matches!(class, RouteClass::Inference | RouteClass::Management);
    let max = k.key.max_concurrent.filter(|_| counted);
    let shared = policy.shared.as_ref().zip(k.shared.as_ref());
    let decided = match (shared, k.limits(max)) {
        (Some((shared, names)), Some(limits)) => match shared.admit_key(names, limits).await {
            Ok(Ok(lease)) => {
                // The local counters mirror what Redis admitted, for decisions without it.
                if let Some(requests) = &k.requests {
                    lock(requests).charge(1.0, now);
                }
                ctx.policy.in_flight = max.map(|_| k.in_flight.enter());
                ctx.policy.lease = lease;
                return None;
            }
            Ok(Err(limited)) => Err(limited),
            Err(e) => match policy.without_redis(&e) {
                Some(refusal) => return Some(refusal),
                None => local_key_limits(k, max, now),
            },
        },
        _ => local_key_limits(k, max, now),
    };
    match decided {
        Ok(in_flight) => {
            ctx.policy.in_flight = in_flight;
            None
        }
        Err(limited) => Some(limited_error(&k.key, limited)),
    }
}

/// A key's limits counted in this process: the tokens budget above zero, a request taken from
/// its bucket, a slot among `max` (when the route counts).
fn local_key_limits(
    k: &KeyState,
    max: Option<u32>,
    now: Instant,
) -> std::result::Result<Option<InFlight>, Limited> {
    if let Some(tokens) = &k.tokens {
        lock(tokens).check_positive(now).map_err(Limited::Tokens)?;
    }
    if let Some(requests) = &k.requests {
        lock(requests).take(1.0, now).map_err(Limited::Requests)?;
    }
    match max {
        Some(max) => k
            .in_flight
            .try_enter(max)
            .map(Some)
            .ok_or(Limited::Concurrency),
        None => Ok(None),
    }
}

/// The 429 for a key over one of its limits.
fn limited_error(key: &ApiKey, limited: Limited) -> SidecarError {
    match limited {
        Limited::Tokens(wait) => too_many(
            format!(
                "ollama-sidecar: rate limit: key `{}` used its {} tokens per minute (tokens_per_minute)",
                key.name,
                key.tokens_per_minute.unwrap_or_default()
            ),
            wait,
        ),
        Limited::Requests(wait) => too_many(
            format!(
                "ollama-sidecar: rate limit: key `{}` may send {} requests per minute (requests_per_minute)",
                key.name,
                key.requests_per_minute.unwrap_or_default()
            ),
            wait,
        ),
        Limited::Concurrency => SidecarError::new(
            429,
            format!(
                "ollama-sidecar: key `{}` already has {} requests in flight (max_concurrent)",
                key.name,
                key.max_concurrent.unwrap_or_default()
            ),
        )
        .retry_after(1),
    }
}

fn forbidden_model(model: &str, key: Option<&ApiKey>) -> SidecarError {
    let shown: String = model.chars().take(200).collect();
    let message = match key {
        Some(k) => format!(
            "ollama-sidecar: model `{shown}` is not allowed for key `{}` (auth.keys[].models, policy.models)",
            k.name
        ),
        None => format!("ollama-sidecar: model `{shown}` is not allowed here (policy.models)"),
    };
    SidecarError::new(403, message)
}

enum SmallBody {
    Models(Vec<String>),
    Refused(SidecarError),
}

/// Reads a small JSON body (kept by Pingora's retry buffer, which sends it upstream) and
/// returns the model names it mentions.
async fn read_small_json_body(session: &mut Session, ctx: &mut RequestCtx) -> Result<SmallBody> {
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        session
            .as_downstream_mut()
            .write_continue_response()
            .await?;
    }
    session.as_downstream_mut().enable_retry_buffering();
    ctx.policy.body_consumed = true;
    let mut buf = BytesMut::new();
    loop {
        let chunk = match session.read_request_body().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) if *e.etype() == ErrorType::ReadTimedout => {
                session.set_keepalive(None);
                return Ok(SmallBody::Refused(body_timeout_error(
                    ctx.route.class,
                    session.get_read_timeout(),
                )));
            }
            Err(e) => return Err(e),
        };
        if buf.len() + chunk.len() > MAX_CHECKED_BODY {
            session.set_keepalive(None);
            return Ok(SmallBody::Refused(SidecarError::new(
                413,
                "ollama-sidecar: a body over 64 KiB cannot be checked against the model allow-list",
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    ctx.request_bytes = buf.len() as u64;
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Ok(SmallBody::Models(Vec::new()));
    }
    // The names as Ollama binds them (Go's case-insensitive keys; conflicting duplicates refused).
    match crate::proxy::body::inspect_fields(&buf, ctx.route.fields) {
        Ok(facts) => Ok(SmallBody::Models(facts.models)),
        Err(message) => Ok(SmallBody::Refused(SidecarError::new(400, message))),
    }
}

/// The 408 for a client that went silent while sending its body.
pub fn body_timeout_error(
    _class: RouteClass,
    timeout: Option<std::time::Duration>,
) -> SidecarError {
    SidecarError::new(
        408,
        format!(
            "ollama-sidecar: the request body stopped arriving for {} (limits.body_read_timeout)",
            humantime::format_duration(timeout.unwrap_or_default())
        ),
    )
}

/// Answers an inference request whose body went silent: 408, connection closed.
pub async fn on_body_timeout(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<bool> {
    session.set_keepalive(None);
    ctx.policy.body_consumed = true;
    let err = body_timeout_error(ctx.route.class, Some(app.config.limits.body_read_timeout));
    refuse(app, session, ctx, err).await
}

/// The inference path's model check, once the body is parsed (`ctx.model`). A model the body
/// does not name cannot be checked: refused when a restriction applies and the body could not
/// be read (compressed, or not JSON); let through when a JSON body names none (Ollama answers
/// `model is required`).
pub async fn on_inference_body(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    body: &[u8],
) -> Result<bool> {
    ctx.policy.body_consumed = true;
    let compressed = session
        .req_header()
        .headers
        .contains_key(http::header::CONTENT_ENCODING);
    if ctx.route.has_model_body()
        && !compressed
        && limits::json_too_deep(body, limits::MAX_JSON_DEPTH)
    {
        let err = SidecarError::new(
            400,
            format!(
                "invalid request body: JSON nested deeper than {} levels",
                limits::MAX_JSON_DEPTH
            ),
        );
        return refuse(app, session, ctx, err).await;
    }
    let access = &app.config.access;
    let key = ctx.policy.key.as_ref().map(|k| k.0.clone());
    if !Policy::models_restricted(access, key.as_deref()) {
        return Ok(false);
    }
    let api_key = key.as_ref().map(|k| &k.key);
    match ctx.model.clone() {
        Some(model) if model_allowed(access, api_key, &model) => Ok(false),
        Some(model) => refuse(app, session, ctx, forbidden_model(&model, api_key)).await,
        None => {
            let unreadable = !ctx.route.has_model_body() || compressed;
            if unreadable {
                let err = SidecarError::new(
                    403,
                    "ollama-sidecar: the model allow-list needs an uncompressed JSON body naming the model",
                );
                refuse(app, session, ctx, err).await
            } else {
                Ok(false)
            }
        }
    }
}

/// The upstream request: without the sidecar's own key (a header that carries a configured key
/// is removed; other `Authorization` values pass) and, for an allowed origin, without `Origin`.
pub fn on_upstream_request(
    app: &App,
    upstream: &mut RequestHeader,
    ctx: &RequestCtx,
) -> Result<()> {
    let access = &app.config.access;
    if !access.keys.is_empty() {
        let digests = &Policy::global(app).digests;
        for name in [
            http::header::AUTHORIZATION,
            http::HeaderName::from_static(keys::X_API_KEY),
        ] {
            let carries = upstream
                .headers
                .get_all(&name)
                .iter()
                .any(|v| keys::carries_key(digests, &name, v.as_bytes()));
            if carries {
                let others: Vec<http::HeaderValue> = upstream
                    .headers
                    .get_all(&name)
                    .iter()
                    .filter(|v| !keys::carries_key(digests, &name, v.as_bytes()))
                    .cloned()
                    .collect();
                upstream.remove_header(&name);
                for v in others {
                    upstream.append_header(name.clone(), v)?;
                }
            }
        }
    }
    if cors::allowed_origin(&access.cors, upstream).is_some() {
        upstream.remove_header(&http::header::ORIGIN);
    }
    if ctx.policy.body_consumed {
        // The body was read (and `100 Continue` answered) here.
        upstream.remove_header(&http::header::EXPECT);
    }
    Ok(())
}

/// CORS headers on a relayed response for an allowed origin.
pub fn on_response(app: &App, session: &Session, response: &mut ResponseHeader) -> Result<()> {
    if let Some(origin) = cors::allowed_origin(&app.config.access.cors, session.req_header()) {
        cors::decorate(response, origin)?;
    }
    Ok(())
}

/// The request is over: charge its tokens (prompt + completion, as the tap read them) to the
/// key's budget and end its in-flight count.
pub fn on_finish(ctx: &mut RequestCtx) {
    let mut policy = std::mem::take(&mut ctx.policy);
    let Some(key) = policy.key.as_ref().map(|k| &k.0) else {
        return;
    };
    let tap = ctx.tap.summary();
    let used = tap.prompt_tokens.unwrap_or(0) + tap.completion_tokens.unwrap_or(0);
    if let (Some(tokens), true) = (&key.tokens, used > 0) {
        lock(tokens).charge(used as f64, Instant::now());
    }
    let shared = POLICY.get().and_then(|p| p.shared.as_ref());
    if let (Some(shared), Some(names)) = (shared, &key.shared) {
        let tokens_per_minute = key.key.tokens_per_minute.unwrap_or(0);
        shared.finish(names, tokens_per_minute, used, policy.lease.take());
    }
}

/// The admin listener's gate: with an admin token configured, `/metrics` and `/status` need
/// `Authorization: Bearer <token>`; `/healthz` and `/readyz` stay open for probes. `None`: go on.
pub fn admin_gate(
    access: &AccessConfig,
    req: &RequestHeader,
    path: &str,
) -> Option<http::Response<Vec<u8>>> {
    let token = access.admin_token?;
    if matches!(path, "/healthz" | "/readyz") {
        return None;
    }
    let ok = req
        .headers
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .filter_map(|v| keys::bearer(v.as_bytes()))
        .any(|secret| keys::find(&[token], secret).is_some());
    if ok {
        return None;
    }
    let body = b"{\"error\":\"ollama-sidecar: this admin path needs `Authorization: Bearer <admin token>`\"}\n".to_vec();
    http::Response::builder()
        .status(401)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .header(
            http::header::WWW_AUTHENTICATE,
            "Bearer realm=\"ollama-sidecar admin\"",
        )
        .body(body)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicyFile;

    fn key(models: &[&str]) -> ApiKey {
        ApiKey {
            name: "k".into(),
            sha256: [0; 32],
            priority: 0,
            max_concurrent: None,
            requests_per_minute: None,
            tokens_per_minute: None,
            models: models.iter().map(|s| s.to_string()).collect(),
            routes: vec!["inference".into()],
            admin: false,
        }
    }

    #[test]
    fn models() {
        let open = AccessConfig::default();
        assert!(model_allowed(&open, None, "anything"));
        let k = key(&["llama3.2"]);
        assert!(model_allowed(&open, Some(&k), "llama3.2"));
        assert!(model_allowed(&open, Some(&k), "LLAMA3.2"));
        assert!(!model_allowed(&open, Some(&k), "llama3.2:1b"));
        let k = key(&["llama3.2:latest"]);
        assert!(model_allowed(&open, Some(&k), "llama3.2"));
        let global = AccessConfig {
            policy: PolicyFile {
                models: vec!["qwen*".into()],
                ..PolicyFile::default()
            },
            ..AccessConfig::default()
        };
        assert!(model_allowed(&global, None, "qwen3:8b"));
        assert!(!model_allowed(&global, None, "llama3.2"));
        // Both lists apply.
        assert!(!model_allowed(&global, Some(&key(&["*"])), "llama3.2"));
        assert!(!model_allowed(&global, Some(&key(&["llama*"])), "qwen3"));
    }

    #[test]
    fn admin_gate_paths() {
        let access = AccessConfig {
            admin_token: Some(crate::config::sha256(b"admin-token-0123456789")),
            ..AccessConfig::default()
        };
        let mut req = RequestHeader::build("GET", b"/metrics", None).unwrap();
        assert!(admin_gate(&access, &req, "/healthz").is_none());
        assert!(admin_gate(&access, &req, "/readyz").is_none());
        assert_eq!(admin_gate(&access, &req, "/metrics").unwrap().status(), 401);
        req.insert_header("authorization", "Bearer admin-token-0123456789")
            .unwrap();
        assert!(admin_gate(&access, &req, "/status").is_none());
        assert!(admin_gate(&AccessConfig::default(), &req, "/status").is_none());
    }
}
