//! The one reader of request bodies the sidecar itself reads: inference bodies (routed by their
//! model, replayed to each attempt) and the small bodies policy checks for their models.
//!
//! Bodies are held in memory before admission, where no queue bound applies yet, so every byte
//! read here is counted against one process-wide budget (`limits.max_pending_body_bytes`) until
//! the body leaves that state ([`PendingBody`] dropped), and a body must arrive whole within
//! `limits.body_deadline`: a client that sends most of a body and then trickles can hold neither
//! memory nor a connection for long.

use super::ctx::RequestCtx;
use crate::config::{ByteSize, LimitsConfig};
use crate::reject::Reject;
use bytes::{Bytes, BytesMut};
use pingora_error::{ErrorType, Result};
use pingora_proxy::Session;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Request-body bytes read and not yet handed on, across all connections.
static PENDING: AtomicU64 = AtomicU64::new(0);

/// Request-body bytes currently held before admission, all connections together.
pub fn pending_bytes() -> u64 {
    PENDING.load(Ordering::Relaxed)
}

/// Bytes of the process-wide budget that one body holds; given back when dropped.
#[derive(Debug, Default)]
pub struct PendingBody {
    bytes: u64,
}

impl PendingBody {
    /// Counts `n` more bytes, unless the budget `limit` would be passed.
    fn grow(&mut self, n: u64, limit: u64) -> bool {
        let fits = PENDING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|total| *total <= limit)
            })
            .is_ok();
        if fits {
            self.bytes += n;
        }
        fits
    }
}

impl Drop for PendingBody {
    fn drop(&mut self) {
        PENDING.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// How one body may be read.
pub struct Bounds {
    /// Largest body, and the answer beyond it.
    pub limit: u64,
    pub too_large: Reject,
    /// Longest silence (408, `limits.body_read_timeout`).
    pub silence: Duration,
    /// Longest time for the whole body (408, `limits.body_deadline`).
    pub deadline: Duration,
    /// The process-wide budget of bodies held before admission.
    pub pending_limit: ByteSize,
}

impl Bounds {
    /// The configured bounds, with `limit` and `too_large` for this kind of body.
    pub fn new(limits: &LimitsConfig, limit: u64, too_large: Reject) -> Bounds {
        Bounds {
            limit,
            too_large,
            silence: limits.body_read_timeout,
            deadline: limits.body_deadline,
            pending_limit: limits.max_pending_body_bytes,
        }
    }
}

/// Reads the whole body within `bounds`. `100 Continue` is answered only once the announced
/// length fits, so a client told 413 never sends the body. The body comes with its share of the
/// pending budget, to be dropped when the body leaves the state before admission.
pub async fn read(
    session: &mut Session,
    ctx: &mut RequestCtx,
    bounds: Bounds,
) -> Result<std::result::Result<(Bytes, PendingBody), Reject>> {
    ctx.body_read = true;
    let deadline = bounds.deadline;
    match tokio::time::timeout(deadline, read_within(session, ctx, &bounds)).await {
        Ok(read) => read,
        Err(_) => Ok(Err(Reject::BodyDeadline { after: deadline })),
    }
}

async fn read_within(
    session: &mut Session,
    ctx: &mut RequestCtx,
    bounds: &Bounds,
) -> Result<std::result::Result<(Bytes, PendingBody), Reject>> {
    let limit = bounds.limit;
    let req = session.req_header();
    let announced = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit) {
        return Ok(Err(bounds.too_large.clone()));
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
    let mut held = PendingBody::default();
    let mut buf = BytesMut::with_capacity(announced.unwrap_or(0).min(limit) as usize);
    while let Some(chunk) = match session.read_request_body().await {
        Err(e) if *e.etype() == ErrorType::ReadTimedout => {
            return Ok(Err(Reject::BodyTimeout {
                after: bounds.silence,
            }))
        }
        // A malformed or broken body is the client's doing: 400, or no answer when it left.
        read => read.map_err(|e| e.into_down())?,
    } {
        if (buf.len() + chunk.len()) as u64 > limit {
            return Ok(Err(bounds.too_large.clone()));
        }
        if !held.grow(chunk.len() as u64, bounds.pending_limit.0) {
            return Ok(Err(Reject::PendingBodiesFull {
                limit: bounds.pending_limit,
            }));
        }
        buf.extend_from_slice(&chunk);
    }
    ctx.request_bytes = buf.len() as u64;
    Ok(Ok((buf.freeze(), held)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_shared_and_given_back() {
        // Other tests in this process may hold bytes too: measure from what is held now.
        let base = pending_bytes();
        let limit = base + 100;
        let mut a = PendingBody::default();
        let mut b = PendingBody::default();
        assert!(a.grow(60, limit));
        assert!(!b.grow(50, limit), "60 + 50 passes a budget of 100");
        assert!(b.grow(40, limit));
        drop(a);
        assert!(b.grow(50, limit), "the first body's bytes were given back");
        drop(b);
        assert_eq!(pending_bytes(), base);
    }
}
