//! CORS answered by the sidecar for configured origins. Ollama checks `Origin` itself against its
//! own list, which stops working once the sidecar rewrites `Host`; for an origin allowed here the
//! sidecar answers preflights itself, removes `Origin` upstream (so Ollama's check passes) and
//! adds `Access-Control-Allow-Origin` to the response. Other origins pass through untouched.

use crate::config::CorsFile;
use pingora_http::{RequestHeader, ResponseHeader};

pub const ALLOW_METHODS: &str = "GET, POST, PUT, DELETE, HEAD, OPTIONS";
/// Allowed when a preflight names no headers (or names some that are not valid tokens).
pub const DEFAULT_ALLOW_HEADERS: &str =
    "Authorization, Content-Type, Accept, User-Agent, X-Api-Key, X-Request-Id, X-Requested-With";
pub const EXPOSE_HEADERS: &str = "X-Request-Id, Retry-After";

/// The request's `Origin` when CORS is configured and the origin is allowed.
pub fn allowed_origin<'a>(cors: &CorsFile, req: &'a RequestHeader) -> Option<&'a str> {
    if cors.origins.is_empty() {
        return None;
    }
    let origin = req.headers.get(http::header::ORIGIN)?.to_str().ok()?;
    if origin.is_empty() || origin == "null" {
        return None;
    }
    cors.origins
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
        .then_some(origin)
}

/// A CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`.
pub fn is_preflight(req: &RequestHeader) -> bool {
    req.method == http::Method::OPTIONS
        && req.headers.contains_key(http::header::ORIGIN)
        && req
            .headers
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The headers a preflight asked for, when they are a plain list of header names.
fn requested_headers(req: &RequestHeader) -> Option<String> {
    let v = req
        .headers
        .get(http::header::ACCESS_CONTROL_REQUEST_HEADERS)?
        .to_str()
        .ok()?;
    let names: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let ok = !names.is_empty()
        && names.len() <= 64
        && names
            .iter()
            .all(|n| http::HeaderName::from_bytes(n.as_bytes()).is_ok());
    ok.then(|| names.join(", "))
}

/// The sidecar's answer to an allowed preflight: 204 with the CORS headers.
pub fn preflight_response(
    cors: &CorsFile,
    origin: &str,
    req: &RequestHeader,
    request_id: &str,
) -> pingora_error::Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(204, Some(8))?;
    resp.insert_header(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin)?;
    resp.insert_header(http::header::ACCESS_CONTROL_ALLOW_METHODS, ALLOW_METHODS)?;
    let headers = requested_headers(req).unwrap_or_else(|| DEFAULT_ALLOW_HEADERS.to_string());
    resp.insert_header(http::header::ACCESS_CONTROL_ALLOW_HEADERS, headers)?;
    resp.insert_header(
        http::header::ACCESS_CONTROL_MAX_AGE,
        cors.max_age.as_secs().to_string(),
    )?;
    resp.insert_header(http::header::VARY, "Origin")?;
    resp.insert_header(http::header::CONTENT_LENGTH, "0")?;
    if !request_id.is_empty() {
        resp.insert_header(crate::proxy::headers::REQUEST_ID, request_id)?;
    }
    Ok(resp)
}

/// Adds the CORS headers of an allowed origin to an actual response.
pub fn decorate(resp: &mut ResponseHeader, origin: &str) -> pingora_error::Result<()> {
    resp.insert_header(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin)?;
    resp.insert_header(http::header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSE_HEADERS)?;
    let varies_by_origin = resp
        .headers
        .get_all(http::header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("origin") || t.trim() == "*");
    if !varies_by_origin {
        resp.append_header(http::header::VARY, "Origin")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str]) -> CorsFile {
        CorsFile {
            origins: origins.iter().map(|s| s.to_string()).collect(),
            ..CorsFile::default()
        }
    }

    #[test]
    fn origins() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        assert_eq!(allowed_origin(&cors(&["*"]), &req), None);
        req.insert_header("origin", "https://a.example").unwrap();
        assert_eq!(allowed_origin(&cors(&[]), &req), None);
        assert_eq!(
            allowed_origin(&cors(&["*"]), &req),
            Some("https://a.example")
        );
        assert_eq!(
            allowed_origin(&cors(&["https://a.example"]), &req),
            Some("https://a.example")
        );
        assert_eq!(allowed_origin(&cors(&["https://b.example"]), &req), None);
        assert!(!is_preflight(&req));
    }

    #[test]
    fn vary_is_appended_once() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("vary", "Accept-Encoding").unwrap();
        decorate(&mut resp, "https://a.example").unwrap();
        decorate(&mut resp, "https://a.example").unwrap();
        let vary: Vec<_> = resp.headers.get_all("vary").iter().collect();
        assert_eq!(vary.len(), 2);
    }
}
