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

/// The longest model name an instance can have: Ollama's `ParseName` (types/model/name.go,
/// `parts`) refuses a name longer than `MaxNamePartLen` (128 bytes) once an `http://` or
/// `https://` prefix is removed.
pub const MAX_MODEL_NAME: usize = 128 + "https://".len();

/// What the sidecar keeps of a client's model name (for the logs, the status page and
/// messages): a longer name is cut to [`MAX_MODEL_NAME`] bytes and marked with `…`, which
/// makes it longer than any real name, so it is never routed by ([`routable_model`]).
fn bounded_model(name: String) -> String {
    if name.len() <= MAX_MODEL_NAME {
        return name;
    }
    let mut end = MAX_MODEL_NAME;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &name[..end])
}

/// The model to route by: none for a name no instance can have (Ollama answers it itself).
pub fn routable_model(name: &str) -> Option<&str> {
    (name.len() <= MAX_MODEL_NAME).then_some(name)
}

/// The parsed body's model and the policy's checks on it (on the name as sent); the context
/// keeps the name bounded.
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
        ctx.keep_alive = facts.keep_alive;
    }
    let model = ctx.model.as_deref();
    let checked =
        crate::policy::check_inference_body(app, &ctx.policy, &ctx.route, compressed, model, body);
    ctx.model = ctx.model.take().map(bounded_model);
    checked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_are_bounded() {
        let longest = "m".repeat(MAX_MODEL_NAME);
        assert_eq!(bounded_model(longest.clone()), longest);
        assert_eq!(routable_model(&longest), Some(longest.as_str()));
        let long = "é".repeat(MAX_MODEL_NAME);
        let kept = bounded_model(long);
        assert!(
            kept.len() <= MAX_MODEL_NAME + '…'.len_utf8(),
            "{}",
            kept.len()
        );
        assert!(kept.ends_with('…'));
        assert_eq!(routable_model(&kept), None);
    }
}
