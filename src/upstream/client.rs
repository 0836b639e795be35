//! A tiny HTTP/1.1 client for the sidecar's own calls to its instances (readiness and liveness
//! probes, warm-up, `/api/ps` polls): one connection per call, a bounded time for the whole
//! exchange, and the `Host` header Ollama's loopback host check accepts.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

/// One answer: the status and the whole body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// POSTs `body` as JSON to `path` (see [`request`]).
pub async fn post_json(
    addr: SocketAddr,
    host: &str,
    path: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<Answer, String> {
    let body = Bytes::from(body.to_string());
    request(addr, host, http::Method::POST, path, Some(body), timeout).await
}

/// Sends one request to `addr` with `Host: host` and reads the whole response, all within
/// `timeout`.
pub async fn request(
    addr: SocketAddr,
    host: &str,
    method: http::Method,
    path: &str,
    body: Option<Bytes>,
    timeout: Duration,
) -> Result<Answer, String> {
    match tokio::time::timeout(timeout, exchange(addr, host, method, path, body)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}

async fn exchange(
    addr: SocketAddr,
    host: &str,
    method: http::Method,
    path: &str,
    body: Option<Bytes>,
) -> Result<Answer, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    // Best effort: a probe is one small write, Nagle would only add latency.
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // The connection task ends with the exchange (the sender is dropped) or with the timeout
    // that drops this future's caller; either way it cannot outlive the socket.
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let result = async {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, host)
            .header(http::header::USER_AGENT, "ollama-sidecar");
        if body.is_some() {
            builder = builder.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| format!("request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("response body: {e}"))?
            .to_bytes();
        Ok(Answer { status, body })
    }
    .await;
    driver.abort();
    result
}
