//! `/mock/*`: run-time control and introspection. Not Ollama routes: never counted,
//! never logged, never host-checked.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::http;
use crate::state::State;
use crate::stream::Body;
use crate::util;

pub async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    match (method, path.as_str()) {
        (Method::GET, "/mock/stats") => http::json(StatusCode::OK, &stats(&state)),
        (Method::POST, "/mock/reset") => {
            state.stats.reset();
            state.log.lock().unwrap().clear();
            http::json(StatusCode::OK, &json!({"ok": true}))
        }
        (Method::GET, "/mock/faults") => http::json(StatusCode::OK, &state.knobs.to_json()),
        (Method::POST, "/mock/faults") => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return http::empty(StatusCode::BAD_REQUEST),
            };
            match faults(&state, &body) {
                Ok(()) => http::json(StatusCode::OK, &state.knobs.to_json()),
                Err(e) => http::json(StatusCode::BAD_REQUEST, &json!({ "error": e })),
            }
        }
        (Method::GET, "/mock/requests") => http::json(StatusCode::OK, &requests(&state)),
        (_, "/mock/stats" | "/mock/reset" | "/mock/faults" | "/mock/requests") => http::text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "405 method not allowed",
        ),
        _ => http::text(StatusCode::NOT_FOUND, "text/plain", "404 page not found"),
    }
}

fn stats(state: &State) -> Value {
    let s = &state.stats;
    let (by_path, by_mp) = s.requests_json();
    let loaded: Vec<String> = state
        .models
        .read()
        .unwrap()
        .iter()
        .filter(|m| m.loaded_until().is_some())
        .map(|m| m.name.clone())
        .collect();
    json!({
        "pid": std::process::id(),
        "version": crate::cli::VERSION,
        "total_requests": s.total_requests.load(Relaxed),
        "client_requests": s.client_requests.load(Relaxed),
        "requests": by_path,
        "requests_by_method_path": by_mp,
        "inference_in_flight": s.in_flight.load(Relaxed),
        "peak_inference_in_flight": s.peak_in_flight.load(Relaxed),
        "peak_by_model": s.peak_by_model_json(),
        "queued": s.queued.load(Relaxed),
        "peak_queued": s.peak_queued.load(Relaxed),
        "queue_rejections": s.queue_rejections.load(Relaxed),
        "queue_cancels": s.queue_cancels.load(Relaxed),
        "disconnects": s.disconnects.load(Relaxed),
        "aborted_streams": s.aborted_streams.load(Relaxed),
        "error_streams": s.error_streams.load(Relaxed),
        "completed_streams": s.completed_streams.load(Relaxed),
        "completed_inference": s.completed_inference.load(Relaxed),
        "injected_failures": s.injected_failures.load(Relaxed),
        "hanging": s.hanging.load(Relaxed),
        "loaded": loaded,
        "cold_loads": s.cold_loads.load(Relaxed),
        "evictions": s.evictions.load(Relaxed),
        "max_loaded_models": state.cfg.max_loaded_models,
        "memory": state.cfg.memory,
        "num_parallel": state.cfg.num_parallel,
        "max_queue": state.cfg.max_queue,
    })
}

fn num(v: &Value, key: &str) -> Result<Option<f64>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|f| *f >= 0.0)
            .map(Some)
            .ok_or_else(|| format!("{key} must be a non-negative number")),
        Some(_) => Err(format!("{key} must be a number")),
    }
}

/// Like `num`, but an explicit `null` means "off" (`Some(None)`).
fn nullable(v: &Value, key: &str) -> Result<Option<Option<u64>>, String> {
    match v.get(key) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(_) => Ok(Some(num(v, key)?.map(|f| f as u64))),
    }
}

fn faults(state: &State, body: &[u8]) -> Result<(), String> {
    let v: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| e.to_string())?
    };
    if !v.is_object() {
        return Err("expected a JSON object".into());
    }
    const KNOWN: &[&str] = &[
        "clear",
        "fail_next",
        "status",
        "close_after_chunks",
        "error_after_chunks",
        "hang",
        "tokens",
        "token_delay_ms",
        "first_token_delay_ms",
        "load_delay_ms",
    ];
    if let Some(k) = v
        .as_object()
        .unwrap()
        .keys()
        .find(|k| !KNOWN.contains(&k.as_str()))
    {
        return Err(format!("unknown field {k:?}"));
    }
    // Validate everything before changing anything.
    let fail_next = num(&v, "fail_next")?.map(|f| f as u64);
    let status = match num(&v, "status")? {
        Some(s) if (100.0..=999.0).contains(&s) => Some(s as u16),
        Some(_) => return Err("status must be 100..999".into()),
        None => None,
    };
    let close = nullable(&v, "close_after_chunks")?;
    let error = nullable(&v, "error_after_chunks")?;
    let hang = match v.get("hang") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err("hang must be a boolean".into()),
    };
    let tokens = num(&v, "tokens")?.map(|f| f as u64);
    let token_delay = num(&v, "token_delay_ms")?;
    let first = num(&v, "first_token_delay_ms")?;
    let load = num(&v, "load_delay_ms")?;
    let k = &state.knobs;
    if v.get("clear").and_then(Value::as_bool) == Some(true) {
        k.reset_to(&state.cfg);
        k.set_fail(Some(0), None);
    }
    k.set_fail(fail_next, status);
    if let Some(c) = close {
        k.set_close_after_chunks(c);
    }
    if let Some(e) = error {
        k.set_error_after_chunks(e);
    }
    if let Some(h) = hang {
        k.set_hang(h);
    }
    if let Some(t) = tokens {
        k.set_tokens(t);
    }
    if let Some(d) = token_delay {
        k.set_token_delay_ms(d);
    }
    if let Some(d) = first {
        k.set_first_token_delay_ms(d);
    }
    if let Some(d) = load {
        k.set_load_delay_ms(d);
    }
    Ok(())
}

fn requests(state: &State) -> Value {
    let log = state.log.lock().unwrap();
    let list: Vec<Value> = log
        .iter()
        .map(|e| {
            let headers: Vec<Value> = e
                .headers
                .iter()
                .map(|(k, v)| json!([k.as_str(), String::from_utf8_lossy(v.as_bytes())]))
                .collect();
            json!({
                "seq": e.seq,
                "at": util::rfc3339(e.at),
                "method": e.method.as_str(),
                "path": e.uri.path(),
                "query": e.uri.query(),
                "version": format!("{:?}", e.version),
                "headers": headers,
                "body_len": e.body_len,
                "body_sha256": e.body_sha256,
                "decoded_path": e.decoded_path,
                "route": e.route,
                "outcome": e.outcome,
                "model": e.model,
                "destination": e.destination,
            })
        })
        .collect();
    Value::Array(list)
}
