//! The body stage: the whole body read (`proxy/request_body.rs`, bounded by `limits.max_body`),
//! its decision fields parsed as Ollama binds them (`proxy/body.rs`), and the policy's checks on
//! them (JSON depth, model allow-lists). Nothing here waits in the queue.

use super::super::body;
use super::super::ctx::RequestCtx;
use super::super::request_body::{self, Bounds, PendingBody};
use crate::app::App;
use crate::reject::Reject;
use bytes::Bytes;
use pingora_error::Result;
use pingora_proxy::Session;

/// The body and its share of the pending-body budget (held until admission), or why the
/// request is refused before admission.
pub async fn read_checked(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<std::result::Result<(Bytes, PendingBody), Reject>> {
    let limits = &app.config.limits;
    let too_large = Reject::BodyTooLarge {
        limit: limits.max_body,
    };
    let bounds = Bounds::new(limits, limits.max_body.0, too_large);
    let read = request_body::read(session, ctx, bounds).await?;
    Ok(read.and_then(|body| check(app, session, ctx, &body.0).map(|()| body)))
}

/// The parsed body's model and the policy's checks on it.
fn check(
    app: &App,
    session: &Session,
    ctx: &mut RequestCtx,
    body: &[u8],
) -> std::result::Result<(), Reject> {
    // A compressed body is forwarded untouched; it just cannot be routed by model.
    let compressed = session
        .req_header()
        .headers
        .contains_key(http::header::CONTENT_ENCODING);
    if !compressed && ctx.route.has_model_body() {
        let facts = body::inspect_fields(body, ctx.route.fields).map_err(Reject::InvalidBody)?;
        ctx.model = facts.model;
    }
    let model = ctx.model.as_deref();
    crate::policy::check_inference_body(app, &ctx.policy, &ctx.route, compressed, model, body)
}
