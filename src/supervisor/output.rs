//! An instance's stdout and stderr, line by line, into the sidecar's log (`target: "instance"`,
//! field `instance`) and, when configured, appended to the instance's `log_file`.

use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// Longest line kept; the rest of a longer line is dropped (a runaway line must not grow memory).
pub const MAX_LINE: usize = 16 * 1024;

/// Where an instance's lines go besides the log: its `log_file`, shared by stdout and stderr.
pub type LogSink = Arc<Mutex<tokio::fs::File>>;

/// Opens the instance's log file for appending (its directory was created by preflight).
pub async fn open_sink(path: &std::path::Path, instance: &str) -> Option<LogSink> {
    match tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
    {
        Ok(f) => Some(Arc::new(Mutex::new(f))),
        Err(e) => {
            tracing::warn!(instance, path = %path.display(), error = %e, "cannot open the instance log file; logging to the sidecar log only");
            None
        }
    }
}

/// Copies `reader` line by line until it closes; the task ends when the process (and every
/// process that inherited the pipe) has exited.
pub fn capture<R>(
    reader: R,
    instance: Arc<str>,
    stream: &'static str,
    sink: Option<LogSink>,
) -> JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut reader = BufReader::new(reader);
        let mut line = Vec::with_capacity(256);
        loop {
            line.clear();
            match read_line_capped(&mut reader, &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if let Some(sink) = &sink {
                let mut f = sink.lock().await;
                let mut out = line.clone();
                if out.last() != Some(&b'\n') {
                    out.push(b'\n');
                }
                // A full disk must not stop the instance; the lines still reach the log.
                let _ = f.write_all(&out).await;
                let _ = f.flush().await;
            }
            while matches!(line.last(), Some(b'\n' | b'\r')) {
                line.pop();
            }
            emit(&instance, stream, &String::from_utf8_lossy(&line));
        }
    })
}

/// Reads one line (with its `\n`) into `buf`, keeping at most `MAX_LINE` bytes of it; returns
/// the bytes consumed (0 at the end of the stream).
async fn read_line_capped<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut consumed = 0;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(consumed);
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let room = MAX_LINE.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let n = chunk.len();
        reader.consume(n);
        consumed += n;
        if done {
            return Ok(consumed);
        }
    }
}

/// Logs one line at the level Ollama gave it (`level=WARN` ...), info otherwise. Ollama's own
/// per-request lines (`[GIN] ... | 200 | ... | GET "/api/version"`) are debug: the sidecar
/// writes its own access log, and the liveness checks would add one every 2 s. The log file
/// keeps every line as written.
fn emit(instance: &str, stream: &'static str, line: &str) {
    if line.starts_with("[GIN]") {
        tracing::debug!(target: "instance", instance, stream, "{line}");
    } else if line.contains("level=ERROR") {
        tracing::error!(target: "instance", instance, stream, "{line}");
    } else if line.contains("level=WARN") {
        tracing::warn!(target: "instance", instance, stream, "{line}");
    } else if line.contains("level=DEBUG") || line.contains("level=TRACE") {
        tracing::debug!(target: "instance", instance, stream, "{line}");
    } else {
        tracing::info!(target: "instance", instance, stream, "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_are_capped_and_reading_continues() {
        let mut data = vec![b'a'; MAX_LINE + 100];
        data.extend_from_slice(b"\nshort\nlast");
        let mut r = BufReader::with_capacity(1000, &data[..]);
        let mut line = Vec::new();
        assert_eq!(
            read_line_capped(&mut r, &mut line).await.unwrap(),
            MAX_LINE + 101
        );
        assert_eq!(line.len(), MAX_LINE);
        line.clear();
        read_line_capped(&mut r, &mut line).await.unwrap();
        assert_eq!(line, b"short\n");
        line.clear();
        read_line_capped(&mut r, &mut line).await.unwrap();
        assert_eq!(line, b"last");
        line.clear();
        assert_eq!(read_line_capped(&mut r, &mut line).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn lines_are_appended_to_the_log_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.log");
        let sink = open_sink(&path, "i").await.unwrap();
        let (mut w, r) = tokio::io::duplex(64);
        let task = capture(r, Arc::from("i"), "stderr", Some(sink));
        w.write_all(b"one\ntwo").await.unwrap();
        drop(w);
        task.await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
    }
}
