//! The one reader of request bodies the sidecar itself reads: inference bodies (routed by their
//! model, replayed to each attempt) and the small bodies policy checks for their models.

use super::ctx::RequestCtx;
use crate::reject::Reject;
use bytes::{Bytes, BytesMut};
use pingora_error::{ErrorType, Result};
use pingora_proxy::Session;
use std::time::Duration;

/// Reads the whole body, at most `limit` bytes. `100 Continue` is answered only once the
/// announced length fits, so a client told 413 never sends the body. `too_large` is the answer
/// for a body over the limit; a client silent for `timeout` gets 408.
pub async fn read(
    session: &mut Session,
    ctx: &mut RequestCtx,
    limit: u64,
    too_large: Reject,
    timeout: Duration,
) -> Result<std::result::Result<Bytes, Reject>> {
    ctx.body_read = true;
    let req = session.req_header();
    let announced = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit) {
        return Ok(Err(too_large));
    }
    let expects_continue = req
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        session
            .as_downstream_mut()
            .write_continue_response()
            .await?;
    }
    let mut buf = BytesMut::with_capacity(announced.unwrap_or(0).min(limit) as usize);
    while let Some(chunk) = match session.read_request_body().await {
        Err(e) if *e.etype() == ErrorType::ReadTimedout => {
            return Ok(Err(Reject::BodyTimeout { after: timeout }))
        }
        // A malformed or broken body is the client's doing: 400, or no answer when it left.
        read => read.map_err(|e| e.into_down())?,
    } {
        if (buf.len() + chunk.len()) as u64 > limit {
            return Ok(Err(too_large));
        }
        buf.extend_from_slice(&chunk);
    }
    ctx.request_bytes = buf.len() as u64;
    Ok(Ok(buf.freeze()))
}
