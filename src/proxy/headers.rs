//! Header rules: the request id, and what must not cross the proxy in either direction.

use http::HeaderName;
use pingora_http::{RequestHeader, ResponseHeader};
use std::sync::atomic::{AtomicU64, Ordering};

pub const REQUEST_ID: &str = "x-request-id";

/// Longest client-supplied request id we keep; a longer or non-printable one is replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Response headers that describe the upstream connection, not the response. Pingora frames the
/// downstream response itself (Content-Length / Transfer-Encoding stay: they are its input).
const HOP_BY_HOP_RESPONSE: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "upgrade",
    "trailer",
];

/// The client's `X-Request-Id` when it is sane, else a fresh one.
pub fn request_id(req: &RequestHeader) -> String {
    if let Some(v) = req.headers.get(REQUEST_ID) {
        if let Ok(s) = v.to_str() {
            if !s.is_empty()
                && s.len() <= MAX_REQUEST_ID_LEN
                && s.bytes().all(|b| b.is_ascii_graphic())
            {
                return s.to_string();
            }
        }
    }
    new_request_id()
}

/// 16 hex digits: a per-process random prefix and a counter, unique without a syscall.
pub fn new_request_id() -> String {
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(rand::random::<u32>);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix:08x}{:08x}", n as u32)
}

/// Whether the client may still be sending a body the sidecar has not read.
pub fn body_may_follow(req: &RequestHeader) -> bool {
    req.headers.contains_key(http::header::TRANSFER_ENCODING)
        || req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// Removes hop-by-hop fields (and those the upstream's `Connection` nominates) from a response.
pub fn strip_response_hop_by_hop(resp: &mut ResponseHeader) {
    let nominated: Vec<HeaderName> = resp
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| {
            n != http::header::CONTENT_LENGTH
                && n != http::header::TRANSFER_ENCODING
                && n != http::header::CONTENT_TYPE
        })
        .collect();
    for name in nominated {
        resp.remove_header(&name);
    }
    for name in HOP_BY_HOP_RESPONSE {
        resp.remove_header(*name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        let generated = request_id(&req);
        assert_eq!(generated.len(), 16);
        assert_ne!(generated, request_id(&req));
        req.insert_header(REQUEST_ID, "abc-123").unwrap();
        assert_eq!(request_id(&req), "abc-123");
        req.insert_header(REQUEST_ID, "has space").unwrap();
        assert_ne!(request_id(&req), "has space");
    }

    #[test]
    fn strips_hop_by_hop() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("connection", "keep-alive, x-secret")
            .unwrap();
        resp.insert_header("keep-alive", "timeout=5").unwrap();
        resp.insert_header("x-secret", "1").unwrap();
        resp.insert_header("content-type", "application/json")
            .unwrap();
        strip_response_hop_by_hop(&mut resp);
        assert!(resp.headers.get("connection").is_none());
        assert!(resp.headers.get("keep-alive").is_none());
        assert!(resp.headers.get("x-secret").is_none());
        assert!(resp.headers.get("content-type").is_some());
    }
}
