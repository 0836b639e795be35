//! The bodies of the sidecar's own errors, in the shape the route's clients parse: Ollama's
//! `{"error":"..."}`, OpenAI's nested object, or Anthropic's typed error; and the in-band line
//! that ends a broken stream. `respond.rs` writes them.

use super::route::ApiShape;
use bytes::Bytes;
use serde_json::json;

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
