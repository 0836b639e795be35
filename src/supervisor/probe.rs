//! The supervisor's calls to its own instances on loopback: the readiness and liveness probe
//! (`GET /api/version`) and the warm-up (`POST /api/generate`).

use crate::upstream::client;
pub use crate::upstream::client::Answer;
use bytes::Bytes;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// `GET /api/version`; true on a 200 within `timeout`.
pub async fn version_ok(port: u16, timeout: Duration) -> bool {
    matches!(
        request(port, http::Method::GET, "/api/version", None, timeout).await,
        Ok(Answer { status: 200, .. })
    )
}

/// `POST <path>` with a JSON body, reading the whole response within `timeout`.
pub async fn post_json(
    port: u16,
    path: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<Answer, String> {
    let bytes = serde_json::to_vec(body).map_err(|e| e.to_string())?;
    request(
        port,
        http::Method::POST,
        path,
        Some(Bytes::from(bytes)),
        timeout,
    )
    .await
}

/// One request to `127.0.0.1:<port>`, all within `timeout`.
pub async fn request(
    port: u16,
    method: http::Method,
    path: &str,
    body: Option<Bytes>,
    timeout: Duration,
) -> Result<Answer, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    client::request(
        addr,
        &format!("127.0.0.1:{port}"),
        method,
        path,
        body,
        timeout,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Answers one request with `reply` once the request read so far ends with `end`.
    async fn one_shot_server(
        end: &'static str,
        reply: &'static [u8],
    ) -> (u16, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 4096];
            while !seen.ends_with(end.as_bytes()) {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "client closed early");
                seen.extend_from_slice(&buf[..n]);
            }
            s.write_all(reply).await.unwrap();
            String::from_utf8_lossy(&seen).to_string()
        });
        (port, task)
    }

    #[tokio::test]
    async fn version_probe_sends_loopback_host() {
        let (port, task) = one_shot_server(
            "\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n{\"version\":\"0.0.0\"}\n",
        )
        .await;
        assert!(version_ok(port, Duration::from_secs(2)).await);
        let req = task.await.unwrap();
        assert!(req.starts_with("GET /api/version HTTP/1.1\r\n"), "{req}");
        assert!(
            req.to_ascii_lowercase()
                .contains(&format!("host: 127.0.0.1:{port}\r\n")),
            "{req}"
        );
    }

    #[tokio::test]
    async fn non_200_and_refused_are_failures() {
        let (port, _task) = one_shot_server(
            "\r\n\r\n",
            b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        assert!(!version_ok(port, Duration::from_secs(2)).await);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = listener.local_addr().unwrap().port();
        drop(listener);
        assert!(!version_ok(closed, Duration::from_secs(2)).await);
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let started = std::time::Instant::now();
        assert!(!version_ok(port, Duration::from_millis(200)).await);
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(listener);
    }

    #[tokio::test]
    async fn post_reads_the_whole_body() {
        let (port, task) = one_shot_server(
            "{\"model\":\"m\"}",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        .await;
        let a = post_json(
            port,
            "/api/generate",
            &serde_json::json!({"model": "m"}),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        assert_eq!((a.status, &a.body[..]), (200, &b"hello"[..]));
        let req = task.await.unwrap();
        assert!(req.starts_with("POST /api/generate HTTP/1.1\r\n"), "{req}");
        assert!(req.ends_with("{\"model\":\"m\"}"), "{req}");
    }
}
