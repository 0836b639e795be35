//! The admin listener (`admin.listen`, default 127.0.0.1:11435), separate from the proxy port:
//!
//! - `GET /metrics`: Prometheus text format ([`crate::metrics`]);
//! - `GET /metrics/gateway`: only the queue, running and slot-utilization gauges an inference
//!   gateway's endpoint picker scrapes; open like the probes (the picker sends no token);
//! - `GET /healthz`: the process is alive: 200 `ok`;
//! - `GET /readyz`: 200 when at least one instance can serve inference, else 503 with a JSON
//!   reason (also 503 while shutting down);
//! - `GET /status`: JSON for operators: version, uptime, every instance (state, process,
//!   health and its last check's cause, installed and loaded models, load), the queue with every
//!   waiting request (client, key, model, position, wait) and its counters, each key's use
//!   against its limits, the last refusals, the model allow-list;
//! - `GET /status/history`: the last 15 minutes of the charts ([`history`]);
//! - `GET /`: the status page, a static shell (HTML, `status.js`, `status.css` compiled into the
//!   binary, no other assets) that polls `/status` and `/status/history`. The shell holds no
//!   data, so it is open; with an admin token the page reads it from the address's fragment
//!   (`/#token=...`, which the browser never sends) and sends it as a bearer token.
//!
//! Anything else: 404 (or 405 for another method), as JSON. It is a Pingora `ServeHttp` app in a
//! listening service, so its sockets get `TCP_NODELAY` like the proxy's.

pub mod history;
pub mod recent;

use crate::admission::{AdmissionSnapshot, WaiterView};
use crate::app::App;
use crate::config::ApiKey;
use crate::metrics::{self, Metrics};
use crate::upstream::{client, Gate, Instance, InstanceState};
use async_trait::async_trait;
use http::{header, Method, Response, StatusCode};
use pingora_core::apps::http_app::{HttpServer, ServeHttp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::services::listening::Service;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The paths the admin listener answers.
pub const PATHS: &[&str] = &[
    "/metrics",
    metrics::GATEWAY_PATH,
    "/healthz",
    "/readyz",
    "/status",
    HISTORY_PATH,
    "/",
    "/status.js",
    "/status.css",
    crate::reload::PATH,
];

/// The charts' samples.
pub const HISTORY_PATH: &str = "/status/history";

/// The status page: its static files, served as they are (they hold no data).
const PAGE: &[(&str, &str, &str)] = &[
    ("/", "text/html; charset=utf-8", include_str!("page.html")),
    (
        "/status.js",
        "text/javascript; charset=utf-8",
        include_str!("page.js"),
    ),
    (
        "/status.css",
        "text/css; charset=utf-8",
        include_str!("page.css"),
    ),
];

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long `/status` waits for an instance's `/api/ps` (it falls back to the model names the
/// sidecar last learned).
const PS_TIMEOUT: Duration = Duration::from_millis(500);

pub struct AdminApp {
    app: Arc<App>,
    metrics: &'static Metrics,
}

impl AdminApp {
    pub fn new(app: Arc<App>) -> AdminApp {
        AdminApp {
            app,
            metrics: metrics::global(),
        }
    }
}

/// The admin service, listening on `admin.listen` with one worker thread.
pub fn service(app: Arc<App>) -> Service<HttpServer<AdminApp>> {
    let listen = app.config.admin_listen.to_string();
    if let (Some(header), false) = (
        &app.config.admission.client_id_header,
        app.config.access.keys.is_empty(),
    ) {
        // A key is the unit of fairness: a header its holder sets must not buy more turns.
        tracing::warn!(
            header = %header,
            "admission.client_id_header names only requests without an API key: with keys configured, each key is one client (fairness, /status, the access log)"
        );
    }
    let mut service = Service::new(
        "ollama-sidecar admin".to_string(),
        HttpServer::new_app(AdminApp::new(app)),
    );
    service.threads = Some(1);
    service.add_tcp(&listen);
    service
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let len = resp.body().len();
    let headers = resp.headers_mut();
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

fn json_response(status: StatusCode, value: &Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    respond(status, "application/json", body)
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // The configuration generation this request is answered under.
        let app = &self.app.current();
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
        if !PATHS.contains(&path.as_str()) {
            return json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": format!("no such admin path: {path}"), "paths": PATHS}),
            );
        }
        // The one path that changes something: behind the token like /status, POST only.
        let reload = path == crate::reload::PATH;
        let allowed = if reload {
            method == Method::POST
        } else {
            method == Method::GET || method == Method::HEAD
        };
        if !allowed {
            let allow = if reload { "POST" } else { "GET, HEAD" };
            let mut resp = json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": format!("{method} is not allowed on {path}; use {allow}")}),
            );
            resp.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static(allow));
            return resp;
        }
        // The endpoint picker's scraper can present no bearer token (llm-d/llm-d-router
        // `pkg/epp/framework/plugins/datalayer/source/metrics/datasource.go`: TLS options only),
        // and these three load gauges say no more than /readyz.
        if let Some((_, content_type, text)) = PAGE.iter().find(|(p, _, _)| *p == path) {
            let mut resp = respond(StatusCode::OK, content_type, text.as_bytes().to_vec());
            // The page runs only its own script and loads only from this listener.
            resp.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                header::HeaderValue::from_static(
                    "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                ),
            );
            return resp;
        }
        if path != metrics::GATEWAY_PATH {
            let access = &app.config.access;
            if let Some(denied) = crate::policy::admin_gate(access, session.req_header(), &path) {
                return denied;
            }
        }
        match path.as_str() {
            "/metrics" => respond(
                StatusCode::OK,
                PROMETHEUS_TEXT,
                self.metrics.render(app).into_bytes(),
            ),
            metrics::GATEWAY_PATH => respond(
                StatusCode::OK,
                PROMETHEUS_TEXT,
                self.metrics.render_gateway(app).into_bytes(),
            ),
            "/healthz" => respond(
                StatusCode::OK,
                "text/plain; charset=utf-8",
                b"ok\n".to_vec(),
            ),
            "/readyz" => {
                let (ready, body) = readiness(app);
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json_response(status, &body)
            }
            HISTORY_PATH => json_response(
                StatusCode::OK,
                &json!({
                    "sample_every_seconds": history::SAMPLE_EVERY.as_secs(),
                    "max_samples": history::MAX_SAMPLES,
                    "samples": history::global().samples(),
                }),
            ),
            crate::reload::PATH => {
                let (code, body) = crate::reload::answer(crate::reload::reload(app, "http").await);
                json_response(code, &body)
            }
            _ => json_response(StatusCode::OK, &status(app, self.metrics).await),
        }
    }
}

/// Whether the sidecar can serve inference now, and the body that says so (with the reason when
/// it cannot).
pub fn readiness(app: &App) -> (bool, Value) {
    let states: serde_json::Map<String, Value> = app
        .registry
        .all()
        .iter()
        .map(|i| (i.name.clone(), json!(health(i))))
        .collect();
    // Why each instance that is not healthy is not, as far as the health checker knows.
    let detail: serde_json::Map<String, Value> = app
        .registry
        .all()
        .iter()
        .filter(|i| health(i) != "healthy")
        .filter_map(|i| Some((i.name.clone(), json!(problem(i)?))))
        .collect();
    let mut body = if app.lifecycle.is_draining() {
        json!({"ready": false, "reason": "shutting down", "instances": states})
    } else {
        let ready = app.registry.all().iter().filter(|i| i.is_ready()).count();
        if ready == 0 {
            let each: Vec<String> = app.registry.all().iter().map(|i| why(i)).collect();
            json!({
                "ready": false,
                "reason": format!("no instance can serve inference ({})", each.join(", ")),
                "instances": states,
            })
        } else {
            json!({"ready": true, "instances_ready": ready, "instances": states})
        }
    };
    if let (Value::Object(map), false) = (&mut body, detail.is_empty()) {
        map.insert("detail".into(), Value::Object(detail));
    }
    let ready = body["ready"].as_bool().unwrap_or(false);
    (ready, body)
}

/// Why an instance cannot serve, when known: its name does not resolve, or its last health
/// check failed.
/// Why the instances that are not healthy are not, one `name: health (problem)` each, or
/// `None` when all are healthy: the access log's `instances` field for a request none could serve.
pub fn unready_instances(app: &App) -> Option<String> {
    let each: Vec<String> = app
        .registry
        .all()
        .iter()
        .filter(|i| health(i) != "healthy")
        .map(|i| why(i))
        .collect();
    (!each.is_empty()).then(|| each.join(", "))
}

/// One instance's health and, when the health checker knows it, the cause.
fn why(inst: &Instance) -> String {
    match problem(inst) {
        Some(p) => format!("{}: {} ({p})", inst.name, health(inst)),
        None => format!("{}: {}", inst.name, health(inst)),
    }
}

fn problem(inst: &Instance) -> Option<String> {
    inst.resolve_error().or_else(|| inst.problem())
}

/// An instance's health in one word: `healthy` (ready, in rotation), `ejected` or `half_open`
/// (passive health took it out), `unresolved` (out of rotation, and its host name does not
/// resolve or has not yet), `unhealthy` (failing checks), `starting` (starting or warming),
/// `down` (exited, backing off, crash-looping or stopped).
pub fn health(inst: &Instance) -> &'static str {
    let state = inst.state();
    if state != InstanceState::Ready
        && inst.is_named()
        && (inst.resolve_error().is_some() || inst.addr().is_none())
    {
        return "unresolved";
    }
    match state {
        InstanceState::Ready => {
            if inst.addr().is_none() {
                return "unresolved";
            }
            match inst.gate() {
                Gate::Open => "healthy",
                Gate::Ejected => "ejected",
                Gate::HalfOpen => "half_open",
            }
        }
        InstanceState::Unhealthy => "unhealthy",
        InstanceState::Starting | InstanceState::Warming => "starting",
        InstanceState::Backoff | InstanceState::Crashloop | InstanceState::Stopped => "down",
    }
}

fn unix_seconds(t: SystemTime) -> Option<f64> {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs_f64())
}

/// `/api/ps` of a ready instance: each loaded model with its sizes, or `None` when it did not
/// answer in time.
async fn loaded_models(inst: &Instance) -> Option<Vec<Value>> {
    let (addr, host) = inst.target().filter(|_| inst.is_ready())?;
    let answer = client::request(addr, host, Method::GET, "/api/ps", None, PS_TIMEOUT)
        .await
        .ok()
        .filter(|a| a.status == 200)?;
    let v: Value = serde_json::from_slice(&answer.body).ok()?;
    let models = v.get("models")?.as_array()?;
    Some(
        models
            .iter()
            .map(|m| {
                json!({
                    "name": m.get("model").or_else(|| m.get("name")).cloned().unwrap_or(Value::Null),
                    "size_bytes": m.get("size").cloned().unwrap_or(Value::Null),
                    "vram_bytes": m.get("size_vram").cloned().unwrap_or(Value::Null),
                    "expires_at": m.get("expires_at").cloned().unwrap_or(Value::Null),
                })
            })
            .collect(),
    )
}

/// The `/status` document.
pub async fn status(app: &App, metrics: &Metrics) -> Value {
    let snap = app.admission.snapshot();
    let instances = app.registry.all();
    let ps = futures_util::future::join_all(instances.iter().map(|i| loaded_models(i))).await;
    let list: Vec<Value> = instances
        .iter()
        .zip(ps)
        .map(|(inst, ps)| instance_status(inst, ps, &snap, metrics))
        .collect();
    let (ready, _) = readiness(app);
    let waiters = app.admission.waiters();
    let keys = &app.config.access.keys;
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": app.started.elapsed().as_secs_f64(),
        "ready": ready,
        "draining": app.lifecycle.is_draining(),
        "in_flight": app.lifecycle.active(),
        "instances": list,
        "queue": queue_status(app, &snap, &waiters),
        "keys": key_usage(keys, &waiters),
        "recent_refusals": recent_refusals(),
        "known_models": metrics.known_models(),
        "config": crate::reload::status(app),
    })
}

/// One instance in `/status`: its state and why, its slots, models and last health check.
fn instance_status(
    inst: &Instance,
    ps: Option<Vec<Value>>,
    snap: &AdmissionSnapshot,
    metrics: &Metrics,
) -> Value {
    let slot = snap.slots.iter().find(|s| s.index == inst.index);
    // An instance out of rotation has nothing loaded as far as traffic is concerned.
    let models = ps.unwrap_or_else(|| {
        inst.loaded_models()
            .into_iter()
            .filter(|_| inst.is_ready())
            .map(|m| json!({"name": m}))
            .collect()
    });
    let health_check = metrics.last_health_check(&inst.name);
    let last_check_legacy = health_check
        .as_ref()
        .map(|h| json!({"result": h.result, "seconds_ago": h.at.elapsed().as_secs_f64()}));
    let last_check = health_check.map(|h| {
        json!({
            "result": h.result,
            "error": if h.result == "success" { None } else { inst.problem() },
            "at": SystemTime::now().checked_sub(h.at.elapsed()).and_then(unix_seconds),
            "seconds_ago": h.at.elapsed().as_secs_f64(),
        })
    });
    // While it cannot be ready before then, inference requests that cannot wait are refused.
    let ready_not_before = inst.ready_not_before();
    let mut v = json!({
        "name": inst.name,
        "url": inst.upstream.to_string(),
        "kind": if inst.supervised { "supervised" } else { "external" },
        "state": inst.state().as_str(),
        "state_age_seconds": inst.state_age().as_secs_f64(),
        "ready": inst.is_ready(),
        "health": health(inst),
        "reason": problem(inst),
        "address": inst.addr().map(|a| a.to_string()),
        "addresses": inst.addresses().all().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "host_header": inst.addr().map(|a| inst.host_header_for(a)),
        "last_health_check": last_check_legacy,
        "last_check": last_check,
        "ejections": inst.ejections(),
        "loaded_models": models,
        "installed_models": metrics.installed_models(&inst.name),
        "one_at_a_time_models": inst.one_at_a_time_models(),
        "in_flight": inst.in_flight(),
        "busy_slots": slot.map(|s| s.busy),
        "placement": snap.placement.get(inst.index).map(|p| p.to_json()),
        "slots": slot.map(|s| s.slots).unwrap_or_else(|| inst.slots()),
        "request_errors": inst.request_errors(),
        "ready_in_seconds": ready_not_before.map(|(at, _)| at.saturating_duration_since(std::time::Instant::now()).as_secs_f64()),
        "not_ready_because": ready_not_before.map(|(_, cause)| cause),
    });
    if inst.supervised {
        if let Value::Object(map) = &mut v {
            add_process_status(map, inst);
        }
    }
    v
}

/// A supervised instance's process: pid, restarts, last exit and resource use.
fn add_process_status(map: &mut serde_json::Map<String, Value>, inst: &Instance) {
    let p = inst.process_info();
    map.insert("pid".into(), json!(p.pid));
    map.insert(
        "started_at_unix".into(),
        json!(p.started_at.and_then(unix_seconds)),
    );
    map.insert("restarts".into(), json!(p.restarts));
    map.insert("last_exit".into(), json!(p.last_exit));
    map.insert("cpu_percent".into(), json!(p.cpu_percent));
    map.insert("cpu_seconds".into(), json!(p.cpu_seconds));
    map.insert("memory_bytes".into(), json!(p.memory_bytes));
}

/// The admission queue in `/status`: who waits, its limits and its counters.
fn queue_status(app: &App, snap: &AdmissionSnapshot, waiters: &[WaiterView]) -> Value {
    let c = &snap.counters;
    let keys = &app.config.access.keys;
    json!({
        "queued": snap.queued,
        "queued_bytes": snap.queued_bytes,
        "pending_body_bytes": crate::proxy::request_body::pending_bytes(),
        "clients_queued": snap.clients_queued,
        "oldest_wait_seconds": snap.oldest_wait.map(|d| d.as_secs_f64()),
        "held_slots": snap.held(),
        "waiting": waiting(keys, waiters),
        "client_id_header": app.config.admission.client_id_header,
        "client_is": if keys.is_empty() { "client_id_header, else address" } else { "key" },
        "closed": snap.closed,
        "limits": {
            "max_queued": app.config.admission.max_queued,
            "max_queued_bytes": app.config.admission.max_queued_bytes.0,
            "max_pending_body_bytes": app.config.limits.max_pending_body_bytes.0,
            "max_wait_seconds": app.config.admission.max_wait.as_secs_f64(),
        },
        "counters": {
            "admitted": c.admitted,
            "released": c.released,
            "refused_full": c.refused_full,
            "refused_bytes": c.refused_bytes,
            "expired": c.expired,
            "cancelled": c.cancelled,
            "closed": c.closed,
            "undelivered": c.undelivered,
            "refused_unready": c.refused_unready,
        },
    })
}

/// The waiting requests, in queue order.
fn waiting(keys: &[ApiKey], waiters: &[WaiterView]) -> Vec<Value> {
    // With keys configured every inference request carries one, and its name is the client.
    let key_of = |client: &str| {
        keys.iter()
            .find(|k| k.name == client)
            .map(|k| k.name.clone())
    };
    let now = SystemTime::now();
    waiters
        .iter()
        .map(|w| {
            json!({
                "position": w.position,
                "client": &*w.client,
                "key": key_of(&w.client),
                "model": w.model,
                "priority": w.priority,
                "body_bytes": w.body_bytes,
                "waited_seconds": w.waited.as_secs_f64(),
                "since": now.checked_sub(w.waited).and_then(unix_seconds),
            })
        })
        .collect()
}

/// Each key's use in the last minute against its limits.
fn key_usage(keys: &[ApiKey], waiters: &[WaiterView]) -> Vec<Value> {
    let recent = recent::global();
    keys.iter()
        .map(|k| {
            let used = recent.key_usage(&k.name);
            json!({
                "name": k.name,
                "priority": k.priority,
                "queued": waiters.iter().filter(|w| *w.client == *k.name).count(),
                "requests_last_minute": used.requests,
                "tokens_last_minute": used.tokens,
                "limits": {
                    "max_concurrent": k.max_concurrent,
                    "requests_per_minute": k.requests_per_minute,
                    "tokens_per_minute": k.tokens_per_minute,
                },
            })
        })
        .collect()
}

/// The last refusals, with their reasons.
fn recent_refusals() -> Vec<Value> {
    recent::global()
        .refusals()
        .into_iter()
        .map(|r| {
            json!({
                "at": r.at,
                "request_id": r.request_id,
                "client": r.client,
                "key": r.key,
                "method": r.method,
                "route": r.route,
                "model": r.model,
                "status": r.status,
                "reason": r.reason,
                "error": r.error,
            })
        })
        .collect()
}
