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
    let identity = match &ctx.client {
        Some(client) => Identity::Proven(client.clone()),
        None => client_identity(app, session),
    };
    let priority = ctx
        .policy
        .priority()
        .unwrap_or_else(|| priority(app, session, &identity));
    let client = identity.name().clone();
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

/// Who the client is, for fairness: the configured header (a claim), else the client's address.
fn client_identity(app: &App, session: &Session) -> Identity {
    let admission = &app.config.admission;
    if let Some(name) = &admission.client_id_header {
        if let Some(v) = session
            .req_header()
            .headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
        {
            return Identity::Claimed(Arc::from(v));
        }
    }
    Identity::Proven(match session.client_addr() {
        Some(pingora_core::protocols::l4::socket::SocketAddr::Inet(a)) => {
            Arc::from(a.ip().to_string())
        }
        Some(other) => Arc::from(other.to_string()),
        None => Arc::from("unknown"),
    })
}

/// Where a request's client name came from: what the client says of itself proves nothing.
enum Identity {
    /// The connection's address (or a key name, set by the policy): earned.
    Proven(Arc<str>),
    /// `admission.client_id_header`, as the client sent it.
    Claimed(Arc<str>),
}

impl Identity {
    fn name(&self) -> &Arc<str> {
        match self {
            Identity::Proven(name) | Identity::Claimed(name) => name,
        }
    }
}

/// The priority of a request without an API key. A priority above 0 needs proof: the client's
/// address in `admission.priorities`. What a client claims (a name from `client_id_header`
/// listed in `admission.priorities`; the `priority_header` while API keys are configured) can
/// only lower it: raising priority takes a key (`auth.keys[].priority`). With no keys
/// configured at all, the operator who set `priority_header` trusts its clients, and it is
/// taken as sent (-100..100).
fn priority(app: &App, session: &Session, identity: &Identity) -> i32 {
    let admission = &app.config.admission;
    let keys_configured = !app.config.access.keys.is_empty();
    if let Some(name) = &admission.priority_header {
        if let Some(p) = session
            .req_header()
            .headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i32>().ok())
        {
            let p = p.clamp(-100, 100);
            return if keys_configured { p.min(0) } else { p };
        }
    }
    let listed = admission
        .priorities
        .get(identity.name().as_ref())
        .copied()
        .unwrap_or(0);
    match identity {
        Identity::Proven(_) => listed,
        Identity::Claimed(_) => listed.min(0),
    }
}
