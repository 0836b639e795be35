//! A pinned model (`models:` rule with `pinned: true`) stays loaded whatever a client's
//! `keep_alive` says. In Ollama a request's `keep_alive` becomes its model's session from then
//! on (server/sched.go `useLoadedRunner`): `0` unloads the model as soon as it is idle, `"1m"`
//! lets it expire a minute later, and a request without one leaves the session as it was. So a
//! request for a pinned model on a route that binds `keep_alive` is sent with
//! `"keep_alive":-1` appended as the body's last key, which Go's binding lets win over any key
//! the client wrote (`Keep_Alive` included): the pin holds through every request, and a client's
//! `ollama stop` of a pinned model loads it for good instead of unloading it.
//!
//! The OpenAI and Anthropic routes bind no `keep_alive` (Ollama's middleware leaves it nil), so
//! their requests never change a pin. A compressed body is sent as it is (it is not read); if it
//! unpins the model, the pin keeper (`upstream/pinned.rs`) loads it again once `/api/ps` shows it
//! gone.

use super::body::{append_member, Field};
use super::ctx::RequestCtx;
use crate::app::App;
use crate::keep_alive::KeepAlive;
use crate::upstream::model_key;
use bytes::Bytes;

/// What keeps the model loaded for good (a negative Go duration never expires).
const FOREVER: &[u8] = br#""keep_alive":-1"#;

/// The body to send: `body`, or, for a pinned model, `body` keeping it pinned. Only called with
/// a body the inference path has read and checked (one JSON object, not compressed).
pub(super) fn hold_pin(app: &App, ctx: &mut RequestCtx, body: Bytes) -> Bytes {
    let Some(model) = ctx.model.as_deref() else {
        return body;
    };
    // The routes whose request structs have a `keep_alive` (proxy/route.rs).
    if !ctx.route.fields.contains(&Field::KeepAlive) {
        return body;
    }
    let pinned = app
        .config
        .models
        .rule_for(&model_key(model))
        .is_some_and(|(_, rule)| rule.pinned);
    if !pinned {
        return body;
    }
    match append_member(&body, FOREVER) {
        Some(held) => {
            ctx.keep_alive = Some(KeepAlive::Stays);
            held
        }
        None => body,
    }
}
