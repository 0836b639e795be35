//! Access control and abuse resistance, between classification and admission: request-head
//! limits, CORS, API keys, route and model policy, rate and concurrency limits, token budgets.
//! Everything but the head limits and the body read timeout is off until configured.
//!
//! Policy decides and never writes: each check returns `Ok` or the [`Reject`] the conductor
//! (`proxy/mod.rs`) answers with. It is called at six points:
//! - [`on_request`] at the top of `request_filter` (client requests only): the head limits
//!   (414, 431, 400), an allowed preflight ([`Verdict::Preflight`]), the key (401), route
//!   classes (403), rate and concurrency limits (429, 503); the key is kept in [`RequestPolicy`];
//! - [`check_body_models`] for a non-inference body the conductor read: 403;
//! - [`check_inference_body`] in the inference path once the body is parsed: 400, 403;
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
use crate::proxy::headers::body_may_follow;
use crate::proxy::route::{self, Route, RouteClass};
use crate::proxy::tap::TapSummary;
use crate::reject::Reject;
use crate::upstream::model_key;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use ratelimit::{lock, Bucket, ClientLimiter, InFlight, InFlightCounter, Limited};
use shared_limits::{KeyLimits, KeyNames, Lease, SharedLimits};
use std::sync::{Arc, Mutex};
use std::time::Instant;

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
        self.key.routes.contains(&class)
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
    per_client: Option<Arc<ClientLimiter>>,
    /// Limits counted in Redis (`shared_state`), and what to do while it cannot answer.
    shared: Option<Arc<SharedLimits>>,
    on_shared_error: OnSharedError,
}

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
                .map(|n| Arc::new(ClientLimiter::new(n.into()))),
            shared,
            on_shared_error: access
                .shared_state
                .as_ref()
                .map(|s| s.on_error)
                .unwrap_or_default(),
        }
    }

    /// The policy of the configuration generation `app` (built on first use; a reload builds
    /// the next one with [`Policy::next`]).
    pub fn global(app: &App) -> &Policy {
        app.policy
            .get_or_init(|| Arc::new(Policy::new(&app.config.access)))
    }

    /// What `shared_state.on_error` makes of a call Redis did not answer: `Ok` for a decision
    /// by the local counters, else the 503.
    fn without_redis(&self, e: &crate::shared_state::CallError) -> Result<(), Reject> {
        tracing::debug!(error = %e, "shared limits: no answer from Redis");
        match self.on_shared_error {
            OnSharedError::Open => {
                crate::metrics::global().shared_state_fallback("open");
                Ok(())
            }
            OnSharedError::Closed => {
                crate::metrics::global().shared_state_fallback("closed");
                Err(Reject::LimitsUnavailable)
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

    /// The key's admission priority, when the request carried a key (it overrides any priority
    /// header).
    pub fn priority(&self) -> Option<i32> {
        self.key.as_ref().map(|k| k.0.key.priority)
    }

    fn api_key(&self) -> Option<&ApiKey> {
        self.key.as_ref().map(|k| &k.0.key)
    }
}

/// Which list refuses a model, if one does.
fn model_refusal(access: &AccessConfig, key: Option<&ApiKey>, model: &str) -> Option<Reject> {
    let raw = model.trim();
    let canonical = model_key(raw);
    let fits = |patterns: &[String]| {
        patterns
            .iter()
            .any(|p| glob::matches(p, raw) || glob::matches(p, &canonical))
    };
    if !access.policy.models.is_empty() && !fits(&access.policy.models) {
        return Some(Reject::PolicyModelDenied {
            model: model.to_string(),
        });
    }
    match key {
        Some(k) if !fits(&k.models) => Some(Reject::KeyModelDenied {
            key: k.name.clone(),
            model: model.to_string(),
        }),
        _ => None,
    }
}

/// Whether a `model` named by a request is allowed by the policy and the key.
pub fn model_allowed(access: &AccessConfig, key: Option<&ApiKey>, model: &str) -> bool {
    model_refusal(access, key, model).is_none()
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

/// What the conductor does with a request the policy lets through.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go on.
    Continue,
    /// An allowed origin's CORS preflight: answer it (204), never forward it.
    Preflight,
    /// Read the (small) body and pass its model names to [`check_body_models`].
    CheckBodyModels,
}

/// The policy's checks for a client request, at the top of `request_filter`: the head limits,
/// a preflight, the key, route classes, rate limits, and a model named in the path. The key
/// and its in-flight count are kept in `state` until the request ends.
pub async fn on_request(
    app: &App,
    session: &Session,
    route: &Route,
    decoded_path: &[u8],
    state: &mut RequestPolicy,
) -> Result<Verdict, Reject> {
    let config = &app.config;
    let access = &config.access;
    let req = session.req_header();
    if let Some(refused) = limits::check(&config.limits, req) {
        return Err(refused);
    }
    // Answered before authentication: browsers send preflights without credentials.
    if cors::is_preflight(req) && cors::allowed_origin(&access.cors, req).is_some() {
        return Ok(Verdict::Preflight);
    }
    let policy = Policy::global(app);
    let class = route.class;
    let key = if policy.keys.is_empty() {
        None
    } else {
        match authenticate(policy, req) {
            Auth::Key(k) => Some(k),
            Auth::Missing if access.allow_anonymous_metadata && class == RouteClass::Metadata => {
                None
            }
            Auth::Missing => return Err(Reject::KeyMissing),
            Auth::Invalid => return Err(Reject::KeyInvalid),
        }
    };
    if access.policy.deny_classes.contains(&class) {
        return Err(Reject::ClassDenied {
            class: class.as_str(),
        });
    }
    if let Some(k) = key.as_ref().filter(|k| !k.allows_class(class)) {
        return Err(Reject::KeyClassDenied {
            key: k.key.name.clone(),
            class: class.as_str(),
        });
    }
    check_limits(policy, session, state, key.as_ref(), class).await?;
    state.key = key.clone().map(KeyStateRef);

    // Non-inference routes that name a model (show, pull, push, create, copy, delete, and
    // `/v1/models/:model`) are checked here; inference routes once their body is read.
    if !Policy::models_restricted(access, key.as_deref()) || class == RouteClass::Inference {
        return Ok(Verdict::Continue);
    }
    if route.name == "/v1/models/:model" {
        // The model as gin binds the `:model` parameter: from the decoded path.
        let model = String::from_utf8_lossy(route::param(route, decoded_path).unwrap_or_default());
        return match model_refusal(access, state.api_key(), &model) {
            Some(refused) => Err(refused),
            None => Ok(Verdict::Continue),
        };
    }
    if !route.has_model_body() || !body_may_follow(req) {
        return Ok(Verdict::Continue);
    }
    Ok(Verdict::CheckBodyModels)
}

/// The models a non-inference body names (as Ollama binds them), against the allow-lists.
pub fn check_body_models(
    app: &App,
    state: &RequestPolicy,
    models: &[String],
) -> Result<(), Reject> {
    let access = &app.config.access;
    match models
        .iter()
        .find_map(|m| model_refusal(access, state.api_key(), m))
    {
        Some(refused) => Err(refused),
        None => Ok(()),
    }
}

/// The rate and concurrency limits of a request (the key's in-flight count, and its lease in
/// Redis, are kept in `state` until the request ends).
async fn check_limits(
    policy: &Policy,
    session: &Session,
    state: &mut RequestPolicy,
    key: Option<&Arc<KeyState>>,
    class: RouteClass,
) -> Result<(), Reject> {
    let now = Instant::now();
    let Some(k) = key else {
        let (Some(limiter), Some(ip)) = (policy.per_client.as_ref(), client_ip(session)) else {
            return Ok(());
        };
        let taken = match &policy.shared {
            Some(shared) => match shared.admit_client(ip, limiter.per_minute()).await {
                Ok(decided) => {
                    if decided.is_ok() {
                        limiter.charge(ip);
                    }
                    decided
                }
                Err(e) => {
                    policy.without_redis(&e)?;
                    limiter.take(ip)
                }
            },
            None => limiter.take(ip),
        };
        return taken.map_err(|wait| Reject::ClientRequests {
            client: ip,
            per_minute: limiter.per_minute(),
            wait,
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
                state.in_flight = max.map(|_| k.in_flight.enter());
                state.lease = lease;
                return Ok(());
            }
            Ok(Err(limited)) => Err(limited),
            Err(e) => {
                policy.without_redis(&e)?;
                local_key_limits(k, max, now)
            }
        },
        _ => local_key_limits(k, max, now),
    };
    state.in_flight = decided.map_err(|limited| limited_reject(&k.key, limited))?;
    Ok(())
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
fn limited_reject(key: &ApiKey, limited: Limited) -> Reject {
    let name = key.name.clone();
    match limited {
        Limited::Tokens(wait) => Reject::KeyTokens {
            key: name,
            per_minute: key.tokens_per_minute.unwrap_or_default(),
            wait,
        },
        Limited::Requests(wait) => Reject::KeyRequests {
            key: name,
            per_minute: key.requests_per_minute.map_or(0, u64::from),
            wait,
        },
        Limited::Concurrency => Reject::KeyConcurrency {
            key: name,
            max: key.max_concurrent.unwrap_or_default(),
        },
    }
}

/// The inference path's checks once the body is read: its JSON depth, and its model (`model`,
/// from the parsed body) against the allow-lists. A model the body does not name cannot be
/// checked: refused when a restriction applies and the body could not be read (compressed, or
/// not JSON); let through when a JSON body names none (Ollama answers `model is required`).
pub fn check_inference_body(
    app: &App,
    state: &RequestPolicy,
    route: &Route,
    compressed: bool,
    model: Option<&str>,
    body: &[u8],
) -> Result<(), Reject> {
    let readable = route.has_model_body() && !compressed;
    if readable && limits::json_too_deep(body, limits::MAX_JSON_DEPTH) {
        return Err(Reject::BodyTooDeep {
            depth: limits::MAX_JSON_DEPTH,
        });
    }
    let access = &app.config.access;
    let key = state.key.as_ref().map(|k| &*k.0);
    if !Policy::models_restricted(access, key) {
        return Ok(());
    }
    match model {
        Some(model) => model_refusal(access, state.api_key(), model).map_or(Ok(()), Err),
        None if !readable => Err(Reject::ModelUnreadable),
        None => Ok(()),
    }
}

/// The upstream request: without the sidecar's own key (a header that carries a configured key
/// is removed; other `Authorization` values pass) and, for an allowed origin, without `Origin`.
pub fn on_upstream_request(app: &App, upstream: &mut RequestHeader) -> pingora_error::Result<()> {
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
    Ok(())
}

/// CORS headers on a relayed response for an allowed origin.
pub fn on_response(
    app: &App,
    session: &Session,
    response: &mut ResponseHeader,
) -> pingora_error::Result<()> {
    if let Some(origin) = cors::allowed_origin(&app.config.access.cors, session.req_header()) {
        cors::decorate(response, origin)?;
    }
    Ok(())
}

/// The request is over: charge its tokens (`TapSummary::tokens_to_charge`: Ollama's counts, or
/// the output a stream cut short had carried) to the key's budget and end its in-flight count.
pub fn on_finish(app: &App, mut state: RequestPolicy, tap: &TapSummary) {
    let Some(key) = state.key.as_ref().map(|k| &k.0) else {
        return;
    };
    let used = tap.tokens_to_charge();
    if let (Some(tokens), true) = (&key.tokens, used > 0) {
        lock(tokens).charge(used as f64, Instant::now());
    }
    let shared = Policy::global(app).shared.as_ref();
    if let (Some(shared), Some(names)) = (shared, &key.shared) {
        let tokens_per_minute = key.key.tokens_per_minute.unwrap_or(0);
        shared.finish(names, tokens_per_minute, used, state.lease.take());
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

// ---- Reload (src/reload.rs): the next generation's policy, keeping what did not change. ----
impl Policy {
    /// The policy for `access`, after `self`: a key whose settings are all unchanged keeps its
    /// counters (request and token buckets, requests in flight); a new or changed key starts
    /// afresh, and a removed key's requests in flight end under the old policy. The per-address
    /// limiter keeps its buckets while its rate is unchanged. The Redis connection is kept
    /// (a change of `shared_state` is refused by the reload).
    pub fn next(&self, access: &AccessConfig) -> Policy {
        let mut fresh = Policy::without_shared(access);
        fresh.shared = self.shared.clone();
        fresh.on_shared_error = self.on_shared_error;
        for key in fresh.keys.iter_mut() {
            let kept = self.keys.iter().find(|old| same_key(&old.key, &key.key));
            match kept {
                Some(old) => *key = old.clone(),
                None => {
                    if let Some(k) = Arc::get_mut(key) {
                        k.shared = fresh.shared.as_ref().map(|s| s.key_names(&k.key.name));
                    }
                }
            }
        }
        let rate = access.policy.requests_per_minute_per_client;
        let old_rate = self.per_client.as_ref().map(|l| l.per_minute());
        if rate.map(u64::from) == old_rate {
            fresh.per_client = self.per_client.clone();
        }
        fresh
    }

    /// [`Policy::new`] without starting a Redis connection.
    fn without_shared(access: &AccessConfig) -> Policy {
        let mut bare = access.clone();
        bare.shared_state = None;
        Policy::new(&bare)
    }
}

/// Every setting of two keys is the same (the counters of one fit the other).
fn same_key(a: &ApiKey, b: &ApiKey) -> bool {
    a.name == b.name
        && a.sha256 == b.sha256
        && a.priority == b.priority
        && a.max_concurrent == b.max_concurrent
        && a.requests_per_minute == b.requests_per_minute
        && a.tokens_per_minute == b.tokens_per_minute
        && a.models == b.models
        && a.routes == b.routes
        && a.admin == b.admin
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
            routes: vec![RouteClass::Inference],
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
