//! What the sidecar makes of a request's `keep_alive` before Ollama sees it. In Ollama a
//! request's `keep_alive` becomes its model's session from then on (server/sched.go
//! `useLoadedRunner`): `0` unloads the model as soon as it is idle, `"1m"` lets it expire a
//! minute later, `-1` keeps it for good, and a request without one leaves the session as it was.
//! Two of the operator's settings act on it, each by appending `"keep_alive":…` as the body's
//! last key, which Go's binding lets win over any key the client wrote (`Keep_Alive` included):
//!
//! - **A pinned model** (`models:` rule with `pinned: true`) is sent with `-1`, so no client
//!   unloads it or shortens its session; `ollama stop` of a pinned model loads it for good
//!   instead of unloading it.
//! - **`limits.max_keep_alive`**: a longer `keep_alive` (or `-1`) is sent as the limit, so no
//!   client keeps a model in memory longer than that after its last request. A request without
//!   one is left alone: the instance's `OLLAMA_KEEP_ALIVE` applies (the operator's own).
//!
//! Only the native routes bind `keep_alive`; the OpenAI and Anthropic routes never change a
//! session (Ollama's middleware leaves it nil). A compressed body is sent as it is (it is not
//! read); if it unpins a model, the pin keeper (`upstream/pinned.rs`) loads it again once
//! `/api/ps` shows it gone.

use super::body::{append_member, Field};
use super::ctx::RequestCtx;
use crate::app::App;
use crate::keep_alive::KeepAlive;
use crate::upstream::model_key;
use bytes::Bytes;

/// The body to send: `body`, or `body` with the operator's `keep_alive`. Only called with a
/// body the inference path has read and checked (one JSON object, not compressed).
pub(super) fn apply(app: &App, ctx: &mut RequestCtx, body: Bytes) -> Bytes {
    let Some(model) = ctx.model.as_deref() else {
        return body;
    };
    // The routes whose request structs have a `keep_alive` (proxy/route.rs).
    if !ctx.route.fields.contains(&Field::KeepAlive) {
        return body;
    }
    let (session, member) = if app.config.models.pinned(&model_key(model)) {
        (KeepAlive::Forever, r#""keep_alive":-1"#.to_string())
    } else {
        let (Some(limit), Some(asked)) = (app.config.limits.max_keep_alive, ctx.keep_alive) else {
            return body;
        };
        if !asked.exceeds(limit) {
            return body;
        }
        // A number of seconds, as Ollama's `Duration.UnmarshalJSON` reads it.
        let seconds = limit.as_secs_f64();
        (KeepAlive::For(limit), format!(r#""keep_alive":{seconds}"#))
    };
    match append_member(&body, member.as_bytes()) {
        Some(sent) => {
            ctx.keep_alive = Some(session);
            sent
        }
        None => body,
    }
}
