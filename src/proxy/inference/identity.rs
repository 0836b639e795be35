//! Who the request is for fairness, and its priority: a key's name and priority (set by the
//! policy), else `admission.client_id_header` or the client's address, and
//! `admission.priority_header` or `admission.priorities`.

use super::super::ctx::RequestCtx;
use crate::admission::AdmitRequest;
use crate::app::App;
use crate::upstream::model_key;
use pingora_proxy::Session;
use std::sync::Arc;

/// What admission needs to know of the request, its identity recorded in the context.
pub fn admit_request(
    app: &App,
    session: &Session,
    ctx: &mut RequestCtx,
    body_bytes: u64,
) -> AdmitRequest {
    let client = ctx
        .client
        .clone()
        .unwrap_or_else(|| client_identity(app, session));
    let priority = ctx
        .policy
        .priority()
        .unwrap_or_else(|| priority(app, session, &client));
    ctx.client = Some(client.clone());
    AdmitRequest {
        priority,
        client,
        model: ctx
            .model
            .as_deref()
            .and_then(super::read::routable_model)
            .map(model_key),
        body_bytes,
        avoid: None,
    }
}

/// Who the client is, for fairness: the configured header, else the client's address.
fn client_identity(app: &App, session: &Session) -> Arc<str> {
    let admission = &app.config.admission;
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

fn priority(app: &App, session: &Session, client: &str) -> i32 {
    let admission = &app.config.admission;
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
