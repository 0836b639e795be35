//! The one writer of the sidecar's own answers: a [`Reject`] rendered in the route's error shape
//! with `Retry-After`, `WWW-Authenticate`, `X-Request-Id` and, for an allowed origin, the CORS
//! headers; and what a Pingora error means for the client ([`classify`]).

use super::ctx::RequestCtx;
use super::{errors, headers};
use crate::app::App;
use crate::config::Config;
use crate::metrics::Outcome;
use crate::policy::cors;
use crate::reject::Reject;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

/// No instance is ready to take the request (raised by `upstream_peer`).
pub const NO_INSTANCE: ErrorType = ErrorType::new("NoInstanceReady");

/// Answers the request with `reject`, and records it in the context for the log and metrics.
pub async fn reject(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    reject: Reject,
) -> Result<()> {
    let status = reject.status();
    // An unread body cannot be skipped: the connection cannot carry another request.
    if reject.closes() || (!ctx.body_read && headers::body_may_follow(session.req_header())) {
        session.set_keepalive(None);
    }
    let body = errors::error_body(ctx.route.shape, status, &reject.message());
    let mut header = json_header(app, session, ctx, status, body.len())?;
    if let Some(secs) = reject.retry_after() {
        header.insert_header(http::header::RETRY_AFTER, secs.to_string())?;
    }
    if status == 401 {
        header.insert_header(
            http::header::WWW_AUTHENTICATE,
            "Bearer realm=\"ollama-sidecar\"",
        )?;
    }
    ctx.status = status;
    ctx.outcome = if reject.is_refusal() {
        Outcome::Refused
    } else {
        Outcome::Failed
    };
    ctx.reject = Some(reject);
    write_whole_response(session, header, body).await
}

/// Answers the request with a JSON document of the sidecar's own (200).
pub async fn json(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    body: bytes::Bytes,
) -> Result<()> {
    let header = json_header(app, session, ctx, 200, body.len())?;
    ctx.status = 200;
    ctx.outcome = Outcome::Served;
    write_whole_response(session, header, body).await
}

/// The head of every JSON answer of the sidecar's own: type, length, the request id, and CORS
/// for an allowed origin (so a browser can read it, errors and their `Retry-After` included).
fn json_header(
    app: &App,
    session: &Session,
    ctx: &RequestCtx,
    status: u16,
    body_len: usize,
) -> Result<ResponseHeader> {
    let mut header = ResponseHeader::build(status, Some(8))?;
    header.insert_header(
        http::header::CONTENT_TYPE,
        "application/json; charset=utf-8",
    )?;
    header.insert_header(http::header::CONTENT_LENGTH, body_len.to_string())?;
    if !ctx.request_id.is_empty() {
        header.insert_header(headers::REQUEST_ID, &ctx.request_id)?;
    }
    if let Some(origin) = cors::allowed_origin(&app.config.access.cors, session.req_header()) {
        cors::decorate(&mut header, origin)?;
    }
    Ok(header)
}

/// Writes a response the sidecar answers itself: the header and its whole body, or the header
/// alone for a HEAD request.
pub async fn write_whole_response(
    session: &mut Session,
    header: ResponseHeader,
    body: bytes::Bytes,
) -> Result<()> {
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(header), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// What a proxying failure means for the client; `None` when the client is gone (no answer).
pub fn classify(e: &Error, instance: Option<&str>, config: &Config) -> Option<Reject> {
    let instance = || instance.unwrap_or("?").to_string();
    let timeouts = &config.timeouts;
    Some(match e.etype() {
        ErrorType::HTTPStatus(code) => Reject::HttpStatus(*code),
        t if *t == NO_INSTANCE => Reject::NoInstance,
        ErrorType::ConnectTimedout => Reject::ConnectTimeout {
            instance: instance(),
            after: timeouts.connect,
        },
        ErrorType::ReadTimedout if e.esource() == &ErrorSource::Downstream => Reject::BodyTimeout {
            after: config.limits.body_read_timeout,
        },
        ErrorType::ReadTimedout => Reject::ResponseTimeout {
            instance: instance(),
            after: timeouts.response_header,
        },
        ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError => {
            Reject::Unreachable {
                instance: instance(),
                cause: e.etype().as_str(),
            }
        }
        _ => match e.esource() {
            ErrorSource::Upstream => Reject::InstanceFailed {
                instance: instance(),
                cause: e.etype().as_str(),
            },
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                    return None
                }
                _ => Reject::BadRequest,
            },
            ErrorSource::Internal | ErrorSource::Unset => Reject::Internal,
        },
    })
}
