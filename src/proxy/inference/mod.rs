//! The inference path (generate, chat, embeddings, OpenAI and Anthropic routes), in stages:
//! read and check the body (`read`), name the client (`identity`), wait for a slot while the
//! client is watched (`admit`), send the request to the chosen instance through a Pingora
//! subrequest and relay the response (`relay`); a failure before the client saw a byte is
//! retried on another instance after a pause (`proxy/retry.rs`). Each stage returns a decision;
//! `serve` acts on it, and the slot is released when the client has it all or is gone.
//!
//! Why a subrequest: routing by `model` needs the whole body before an instance is chosen, and
//! Pingora only replays a consumed body through its 64 KiB retry buffer. The subrequest gets the
//! buffered body through its channel instead (docs/adr/0001-inference-body-and-subrequests.md).

mod admit;
mod identity;
mod read;
mod relay;

use super::ctx::RequestCtx;
use super::{respond, retry};
use crate::app::App;
use crate::metrics::Outcome;
use crate::upstream::{Instance, Verdict};
use admit::{Admission, ClientWatch};
use pingora_error::Result;
use pingora_proxy::Session;
use relay::{Attempt, Retry};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Serves one inference request from `request_filter`; always returns `Ok(true)` (answered).
pub(super) async fn serve(app: &App, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
    let (body, pending) = match read::read_checked(app, session, ctx).await? {
        Ok((body, pending)) => {
            let body = super::usage::prepare(session, ctx, body);
            (super::keep_alive_policy::apply(app, ctx, body), pending)
        }
        Err(refused) => {
            respond::reject(app, session, ctx, refused).await?;
            return Ok(true);
        }
    };
    let mut request = identity::admit_request(app, session, ctx, body.len() as u64);
    app.retry_budget.record_request();
    let mut watch = ClientWatch::new();
    // Admission counts the body from here on (queued bytes, or a slot): it is no longer pending.
    drop(pending);
    for attempt in 1u32.. {
        let queued_at = Instant::now();
        let mut permit = match admit::admit(
            app,
            session,
            &mut watch,
            request.clone(),
            ctx.model.as_deref(),
        )
        .await
        {
            Admission::Granted(permit) => permit,
            Admission::Refused(refused) => {
                respond::reject(app, session, ctx, refused).await?;
                return Ok(true);
            }
            Admission::ClientGone => {
                ctx.outcome = if attempt == 1 {
                    Outcome::CancelledQueued
                } else {
                    Outcome::CancelledWaiting
                };
                session.set_keepalive(None);
                return Ok(true);
            }
        };
        *ctx.queue_wait.get_or_insert(Duration::ZERO) += queued_at.elapsed();
        // The response headers follow the slot (binary upgrade: keep-alive or close).
        super::keep_alive_or_close(session, ctx);
        let instance = permit.instance().clone();
        ctx.instance = Some(instance.name.clone());
        ctx.placement = Some(permit.reason().as_str());
        let may_retry = attempt < app.config.retries.max_attempts;
        let body = body.clone();
        let result =
            relay::attempt(app, session, ctx, &mut watch, &instance, body, may_retry).await;
        let trial = permit.is_trial();
        permit.observed_load(ctx.tap.summary().load_duration);
        // A request Ollama answered set its model's session there (before the slot goes back:
        // a zero session unloads the model with its last request).
        let answered = !matches!(result, Ok(Attempt::Retry(_))) && (200..300).contains(&ctx.status);
        let keep_alive = ctx.keep_alive.filter(|_| answered);
        if let (Some(model), Some(keep_alive)) = (request.model.as_deref(), keep_alive) {
            instance.set_session(model, keep_alive);
        }
        // The slot is held until the response is complete or the client is gone.
        drop(permit);
        let retry = match result? {
            Attempt::Finished { instance_ok } => {
                let verdict = if ctx.outcome == Outcome::Served {
                    // A complete answer: its status says whose fault a 5xx is.
                    Verdict::of_status(ctx.status)
                } else if instance_ok {
                    Verdict::Answered
                } else {
                    Verdict::Fault
                };
                app.registry.report_admitted(&instance, verdict, trial);
                return Ok(true);
            }
            Attempt::ClientGone => return Ok(true),
            Attempt::Retry(retry) => retry,
        };
        let pause = Pause {
            attempt,
            retry,
            trial,
        };
        if !pause_before_retry(app, session, ctx, &mut watch, &instance, pause).await {
            return Ok(true);
        }
        request.avoid = Some(instance.index);
    }
    Ok(true)
}

/// A retry about to be made: the attempt that failed and why.
struct Pause {
    attempt: u32,
    retry: Retry,
    /// The failed attempt was its instance's half-open trial.
    trial: bool,
}

/// Counts a retry and waits before it (no wait when another ready instance can take it);
/// false when the client left meanwhile.
async fn pause_before_retry(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    watch: &mut ClientWatch,
    instance: &Arc<Instance>,
    pause: Pause,
) -> bool {
    let Pause {
        attempt,
        retry,
        trial,
    } = pause;
    app.registry
        .report_admitted(instance, Verdict::Fault, trial);
    crate::metrics::global().retry(retry.reason.as_str());
    ctx.retries += 1;
    ctx.retry_reasons.push(retry.reason);
    let others_ready = app
        .registry
        .all()
        .iter()
        .any(|i| i.index != instance.index && i.is_ready());
    let delay = retry::delay(&app.config.retries, attempt, others_ready, retry.after);
    tracing::info!(request_id = %ctx.request_id, instance = %instance.name,
        reason = retry.reason.as_str(), attempt, delay_ms = delay.as_millis() as u64,
        "retrying on another instance");
    if delay.is_zero()
        || watch
            .until(session, tokio::time::sleep(delay))
            .await
            .is_some()
    {
        return true;
    }
    ctx.outcome = Outcome::CancelledWaiting;
    session.set_keepalive(None);
    false
}
