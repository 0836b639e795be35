//! Every response the sidecar itself writes (as opposed to relaying Ollama's) is made here, in the
//! shape the route's clients parse: Ollama's `{"error":"..."}`, OpenAI's nested object, or
//! Anthropic's typed error.

use super::route::ApiShape;
use bytes::Bytes;
use pingora_http::ResponseHeader;
use serde_json::json;

/// Ollama's own queue-overflow text (two spaces after the full stop), which clients already handle.
pub const SERVER_BUSY: &str = "server busy, please try again.  maximum pending requests exceeded";

/// A response the sidecar answers on its own.
#[derive(Debug, Clone)]
pub struct SidecarError {
    pub status: u16,
    pub message: String,
    /// Seconds for `Retry-After`, on refusals a client may retry.
    pub retry_after: Option<u64>,
}

impl SidecarError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        SidecarError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

fn openai_type(status: u16) -> &'static str {
    match status {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        _ => "api_error",
    }
}

fn anthropic_type(status: u16) -> &'static str {
    match status {
        503 | 529 => "overloaded_error",
        other => openai_type(other),
    }
}

/// The JSON body for an error in the given shape.
pub fn error_body(shape: ApiShape, status: u16, message: &str) -> Bytes {
    let value = match shape {
        ApiShape::Ollama => json!({ "error": message }),
        ApiShape::OpenAi => json!({
            "error": { "message": message, "type": openai_type(status), "param": null, "code": null }
        }),
        ApiShape::Anthropic => json!({
            "type": "error",
            "error": { "type": anthropic_type(status), "message": message }
        }),
    };
    Bytes::from(value.to_string())
}

/// A complete response header for an error body of `len` bytes.
pub fn error_header(
    err: &SidecarError,
    len: usize,
    request_id: &str,
) -> pingora_error::Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(err.status, Some(5))?;
    resp.insert_header(
        http::header::CONTENT_TYPE,
        "application/json; charset=utf-8",
    )?;
    resp.insert_header(http::header::CONTENT_LENGTH, len.to_string())?;
    if let Some(secs) = err.retry_after {
        resp.insert_header(http::header::RETRY_AFTER, secs.to_string())?;
    }
    if !request_id.is_empty() {
        resp.insert_header(super::headers::REQUEST_ID, request_id)?;
    }
    Ok(resp)
}

/// The line that ends a stream the upstream broke after the client saw its first bytes: an
/// in-band error in the stream's own framing, so clients report it instead of hanging.
pub fn in_band_error(content_type: Option<&str>, message: &str) -> Option<Bytes> {
    let ct = content_type.unwrap_or_default();
    if ct.starts_with("application/x-ndjson") {
        Some(Bytes::from(format!("{}\n", json!({ "error": message }))))
    } else if ct.starts_with("text/event-stream") {
        let body = json!({
            "error": { "message": message, "type": "api_error", "param": null, "code": null }
        });
        Some(Bytes::from(format!("data: {body}\n\n")))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(error_body(ApiShape::Ollama, 502, "x"), r#"{"error":"x"}"#);
        let v: serde_json::Value =
            serde_json::from_slice(&error_body(ApiShape::OpenAi, 503, "busy")).unwrap();
        assert_eq!(v["error"]["message"], "busy");
        assert_eq!(v["error"]["type"], "api_error");
        assert!(v["error"]["param"].is_null());
        let v: serde_json::Value =
            serde_json::from_slice(&error_body(ApiShape::Anthropic, 503, "busy")).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "overloaded_error");
    }

    #[test]
    fn in_band() {
        assert_eq!(
            in_band_error(Some("application/x-ndjson"), "gone").unwrap(),
            "{\"error\":\"gone\"}\n"
        );
        assert!(in_band_error(Some("text/event-stream"), "gone")
            .unwrap()
            .starts_with(b"data: {"));
        assert!(in_band_error(Some("application/json"), "gone").is_none());
    }
}
