//! Command line, environment and the small parsers Ollama itself uses for them
//! (`OLLAMA_HOST`, Go durations for `keep_alive`).

use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::Parser;

pub const VERSION: &str = "0.33.0";

const ABOUT: &str = "A fast, faithful stand-in for `ollama serve` (Ollama 0.33 API), for tests, demos and benchmarks.";

const AFTER_HELP: &str = "\
Ollama environment (read like Ollama does):
  OLLAMA_HOST           [scheme://]host[:port] to listen on (default 127.0.0.1:11434)
  OLLAMA_NUM_PARALLEL   concurrent inference requests per model (default 1)
  OLLAMA_MAX_QUEUE      requests allowed to wait for a slot (default 512), then 503
  OLLAMA_KEEP_ALIVE     how long a model stays loaded after use (default 5m; negative = forever)
  OLLAMA_ORIGINS        extra allowed CORS origins, comma separated
  OLLAMA_MAX_LOADED_MODELS  models loaded at once (default 0 = automatic: 3, Ollama's per-GPU
                        default with one GPU); one more evicts an idle model, as server/sched.go does

Mock memory model (not Ollama variables):
  MOCK_MODELS           installed models, comma separated; `name=SIZE` sets a model's size
                        (bytes, or with a unit: 500MB, 2GiB), else a size by family
  MOCK_MEMORY           memory budget (same units) the loaded models share (default: unlimited);
                        a model that does not fit evicts idle models first; one larger than
                        the whole budget gets Ollama's 500 (unable to load full model on GPU)
  MOCK_LOAD_MS_PER_GB   load time per GB of model size, added to MOCK_LOAD_DELAY_MS (default 0)

Routes: Ollama's route table, routed like Ollama (Go net/http decodes the path, gin v1.10 routes it:
  trailing-slash redirects, 404, 405 with Allow) and bodies bound like Go's encoding/json (field names
  case-insensitive, the last match wins): /, /api/{version,status,tags,ps,show,generate,chat,embed,
  embeddings,pull,push,create,delete,copy,blobs/:digest}, /v1/{chat/completions,completions,embeddings,
  models,models/:model,messages}. /v1/responses, /api/me, /api/signout, /api/experimental/* are routed
  but answered 501, as are /v1/audio/transcriptions and DELETE /api/user/keys/:encodedKey.
  Models named like *embed* are embedding-only. Pulling a name that starts with `missing` fails
  in-band (`{\"error\":...}` after `pulling manifest`). Streams stop as soon as the client leaves.

Control endpoints (never counted as inference, never host-checked):
  GET  /mock/stats      counters, in-flight and peak concurrency, loaded models, cold_loads
                        (loads a request caused) and evictions (unloads to make room)
  POST /mock/reset      zero counters and peaks, clear the request log
  GET  /mock/faults     current behaviour knobs
  POST /mock/faults     change knobs: {\"fail_next\":N,\"status\":503,\"close_after_chunks\":K|null,
                        \"error_after_chunks\":K|null,\"hang\":bool,\"tokens\":n,\"token_delay_ms\":x,
                        \"first_token_delay_ms\":x,\"load_delay_ms\":x,\"clear\":true}
                        (all optional; \"clear\" first restores the start-up knobs)
  GET  /mock/requests   the last 64 requests: method, path, query, headers, body length and sha256;
                        decoded_path (Go's URL.Path), route (the gin pattern that ran), outcome
                        (handled, bind_error, not_found, method_not_allowed, redirect, bad_request,
                        forbidden, preflight), model and destination as the handler bound them";

/// `mock-ollama [serve]`: flags win over environment variables.
#[derive(Parser, Debug, Clone)]
#[command(name = "mock-ollama", version = VERSION, about = ABOUT, after_help = AFTER_HELP)]
pub struct Args {
    /// Accepted for compatibility with `ollama serve`; serving is the only mode.
    #[arg(value_parser = ["serve"])]
    pub command: Option<String>,

    /// Listen address, `[scheme://]host[:port]`.
    #[arg(long, env = "OLLAMA_HOST")]
    pub host: Option<String>,

    /// Concurrent inference requests per model (Ollama's OLLAMA_NUM_PARALLEL).
    #[arg(long, env = "OLLAMA_NUM_PARALLEL")]
    pub num_parallel: Option<String>,

    /// Requests that may wait for a slot before answering 503 (OLLAMA_MAX_QUEUE).
    #[arg(long, env = "OLLAMA_MAX_QUEUE")]
    pub max_queue: Option<String>,

    /// Default keep-alive of a loaded model (OLLAMA_KEEP_ALIVE): Go duration or seconds.
    #[arg(long, env = "OLLAMA_KEEP_ALIVE")]
    pub keep_alive: Option<String>,

    /// Extra allowed CORS origins (OLLAMA_ORIGINS), comma separated.
    #[arg(long, env = "OLLAMA_ORIGINS")]
    pub origins: Option<String>,

    /// Models loaded at once (Ollama's OLLAMA_MAX_LOADED_MODELS; 0 = automatic, i.e. 3).
    #[arg(long, env = "OLLAMA_MAX_LOADED_MODELS")]
    pub max_loaded_models: Option<String>,

    /// Memory the loaded models share (bytes, or 500MB, 2GiB ...); unlimited when unset.
    #[arg(long, env = "MOCK_MEMORY", value_parser = parse_size)]
    pub memory: Option<u64>,

    /// Load time per GB of model size in ms, added to the load delay.
    #[arg(long, env = "MOCK_LOAD_MS_PER_GB", default_value_t = 0.0)]
    pub load_ms_per_gb: f64,

    /// Installed models, comma separated; a name without a tag means `:latest`; `name=SIZE`
    /// gives the model a size (bytes or with a unit: 500MB, 2GiB).
    #[arg(
        long,
        env = "MOCK_MODELS",
        default_value = "llama3.2:latest,qwen2.5:0.5b,nomic-embed-text:latest"
    )]
    pub models: String,

    /// Tokens (content chunks) per generated response.
    #[arg(long, env = "MOCK_TOKENS", default_value_t = 8)]
    pub tokens: u64,

    /// Delay between tokens in milliseconds (fractional allowed).
    #[arg(long, env = "MOCK_TOKEN_DELAY_MS", default_value_t = 0.0)]
    pub token_delay_ms: f64,

    /// Model load delay in ms, the first time a model is used or after it was unloaded.
    #[arg(long, env = "MOCK_LOAD_DELAY_MS", default_value_t = 0.0)]
    pub load_delay_ms: f64,

    /// Delay before the first token in ms (prompt evaluation).
    #[arg(long, env = "MOCK_FIRST_TOKEN_DELAY_MS", default_value_t = 0.0)]
    pub first_token_delay_ms: f64,

    /// Answer the first N inference requests with STATUS (`N:STATUS`, STATUS defaults to 503).
    #[arg(long, env = "MOCK_FAIL_FIRST", value_parser = parse_fail_first, value_name = "N:STATUS")]
    pub fail_first: Option<(u64, u16)>,

    /// Abort the connection after K streamed chunks, without the final chunk.
    #[arg(long, env = "MOCK_CLOSE_AFTER_CHUNKS", value_name = "K")]
    pub close_after_chunks: Option<u64>,

    /// After K streamed chunks, end the stream with an in-band `{"error":...}` line (status stays 200).
    #[arg(long, env = "MOCK_ERROR_AFTER_CHUNKS", value_name = "K")]
    pub error_after_chunks: Option<u64>,

    /// Exit with code 2 when the Nth (non-/mock) request arrives, simulating a crash.
    #[arg(long, env = "MOCK_CRASH_AFTER", value_name = "N")]
    pub crash_after: Option<u64>,

    /// Accept inference requests but never answer them.
    #[arg(long = "hang-before-headers", env = "MOCK_HANG", value_parser = BoolishValueParser::new())]
    pub hang: bool,

    /// Exit with code 1 this many ms after start (crash-loop tests).
    #[arg(long, env = "MOCK_EXIT_AFTER_MS", value_name = "MS")]
    pub exit_after_ms: Option<u64>,

    /// Sleep this long before binding the port (readiness tests).
    #[arg(
        long = "no-listen-delay-ms",
        visible_alias = "start-delay-ms",
        env = "MOCK_START_DELAY_MS",
        value_name = "MS"
    )]
    pub start_delay_ms: Option<u64>,

    /// Log one line per request to stderr.
    #[arg(long, env = "MOCK_LOG", value_parser = BoolishValueParser::new())]
    pub log: bool,

    /// Do not keep the /mock/requests log (saves a header copy and a sha256 per request).
    #[arg(long, env = "MOCK_NO_REQUEST_LOG", value_parser = BoolishValueParser::new())]
    pub no_request_log: bool,

    /// Runtime worker threads (default: number of CPUs).
    #[arg(long, env = "MOCK_THREADS")]
    pub threads: Option<usize>,
}

fn parse_fail_first(s: &str) -> Result<(u64, u16), String> {
    let (n, status) = match s.split_once(':') {
        Some((n, st)) => (n, st),
        None => (s, "503"),
    };
    let n: u64 = n
        .trim()
        .parse()
        .map_err(|_| format!("bad count in {s:?}, want N:STATUS"))?;
    let status: u16 = status
        .trim()
        .parse()
        .map_err(|_| format!("bad status in {s:?}, want N:STATUS"))?;
    if !(100..=999).contains(&status) {
        return Err(format!("status {status} out of range"));
    }
    Ok((n, status))
}

/// How long a model stays loaded once idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepAlive {
    For(Duration),
    Forever,
}

impl KeepAlive {
    fn from_nanos(n: i128) -> Self {
        if n < 0 {
            KeepAlive::Forever
        } else {
            KeepAlive::For(Duration::from_nanos(n.min(i64::MAX as i128) as u64))
        }
    }

    /// Ollama's `OLLAMA_KEEP_ALIVE`: a Go duration, else whole seconds; invalid means the default.
    pub fn from_env(s: &str) -> Self {
        let s = s.trim().trim_matches(|c| c == '"' || c == '\'');
        if s.is_empty() {
            return KeepAlive::For(Duration::from_secs(300));
        }
        if let Ok(n) = parse_go_duration(s) {
            return Self::from_nanos(n);
        }
        if let Ok(n) = s.parse::<i64>() {
            return Self::from_nanos(n as i128 * 1_000_000_000);
        }
        KeepAlive::For(Duration::from_secs(300))
    }

    /// The request field `keep_alive`: a number of seconds or a Go duration string.
    pub fn from_json(v: &serde_json::Value) -> Result<Option<Self>, String> {
        match v {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::Number(n) => {
                let f = n.as_f64().unwrap_or(0.0);
                if f < 0.0 {
                    Ok(Some(KeepAlive::Forever))
                } else {
                    Ok(Some(Self::from_nanos((f * 1e9) as i128)))
                }
            }
            serde_json::Value::String(s) => parse_go_duration(s).map(|n| Some(Self::from_nanos(n))),
            _ => Err("unsupported type".to_string()),
        }
    }
}

/// Go's `time.ParseDuration`, returning nanoseconds.
pub fn parse_go_duration(orig: &str) -> Result<i128, String> {
    let invalid = || format!("time: invalid duration \"{orig}\"");
    let mut s = orig;
    let mut neg = false;
    if let Some(r) = s.strip_prefix('-') {
        neg = true;
        s = r;
    } else if let Some(r) = s.strip_prefix('+') {
        s = r;
    }
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: f64 = 0.0;
    while !s.is_empty() {
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
            i += 1;
        }
        let num = &s[..i];
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return Err(invalid());
        }
        let v: f64 = num.parse().map_err(|_| invalid())?;
        s = &s[i..];
        let mut j = 0;
        let b = s.as_bytes();
        while j < b.len() && !(b[j].is_ascii_digit() || b[j] == b'.') {
            j += 1;
        }
        let unit = &s[..j];
        if unit.is_empty() {
            return Err(format!("time: missing unit in duration \"{orig}\""));
        }
        let mult = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => {
                return Err(format!(
                    "time: unknown unit \"{unit}\" in duration \"{orig}\""
                ))
            }
        };
        total += v * mult;
        s = &s[j..];
    }
    if total > i64::MAX as f64 {
        return Err(invalid());
    }
    let n = total.round() as i128;
    Ok(if neg { -n } else { n })
}

/// `OLLAMA_HOST` as Ollama parses it: returns (host, port) to bind.
pub fn parse_ollama_host(raw: Option<&str>) -> (String, u16) {
    let s = raw
        .unwrap_or("")
        .trim()
        .trim_matches(|c| c == '"' || c == '\'');
    let (default_port, hostport) = match s.split_once("://") {
        None => (11434u16, s),
        Some(("http", rest)) => (80, rest),
        Some(("https", rest)) => (443, rest),
        Some((_, rest)) => (11434, rest),
    };
    let hostport = hostport.split('/').next().unwrap_or("");
    let (host, port_str) = match split_host_port(hostport) {
        Some((h, p)) => (h.to_string(), Some(p)),
        None => {
            let trimmed = hostport.trim_matches(|c| c == '[' || c == ']');
            let host = if let Ok(ip) = trimmed.parse::<std::net::IpAddr>() {
                ip.to_string()
            } else if !hostport.is_empty() {
                hostport.to_string()
            } else {
                "127.0.0.1".to_string()
            };
            (host, None)
        }
    };
    let port = match port_str {
        Some(p) => p.parse::<u16>().unwrap_or(default_port),
        None => default_port,
    };
    let host = if host.is_empty() {
        // Go listens on all addresses for ":port".
        "0.0.0.0".to_string()
    } else {
        host
    };
    (host, port)
}

/// Go's `net.SplitHostPort`: `host:port` or `[v6]:port`; None when there is no port.
pub fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        let host = &rest[..end];
        let after = &rest[end + 1..];
        let port = after.strip_prefix(':')?;
        return Some((host, port));
    }
    let idx = s.rfind(':')?;
    let host = &s[..idx];
    if host.contains(':') {
        return None; // bare IPv6 without brackets: "too many colons"
    }
    Some((host, &s[idx + 1..]))
}

/// Everything the server needs, validated.
#[derive(Clone, Debug)]
pub struct Config {
    pub bind_host: String,
    pub bind_port: u16,
    pub num_parallel: usize,
    pub max_queue: usize,
    pub keep_alive: KeepAlive,
    pub origins: Vec<String>,
    /// Installed models and the sizes given for them.
    pub models: Vec<(String, Option<u64>)>,
    pub max_loaded_models: usize,
    pub memory: Option<u64>,
    pub load_ms_per_gb: f64,
    pub tokens: u64,
    pub token_delay_ms: f64,
    pub load_delay_ms: f64,
    pub first_token_delay_ms: f64,
    pub fail_first: Option<(u64, u16)>,
    pub close_after_chunks: Option<u64>,
    pub error_after_chunks: Option<u64>,
    pub crash_after: Option<u64>,
    pub hang: bool,
    pub exit_after_ms: Option<u64>,
    pub start_delay_ms: Option<u64>,
    pub log: bool,
    pub request_log: bool,
    pub threads: usize,
}

/// server/sched.go `defaultModelsPerGPU`; the mock has one GPU.
const DEFAULT_MODELS_PER_GPU: usize = 3;

/// A byte size: a plain number, or with a decimal (KB, MB, GB) or binary (KiB, MiB, GiB) unit.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("bad size {s:?}, want e.g. 2GB or 500MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "bad size unit in {s:?}, want B, KB, MB, GB, KiB, MiB or GiB"
            ))
        }
    };
    let bytes = v * mult;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("size {s:?} out of range"));
    }
    Ok(bytes as u64)
}

fn env_uint(v: Option<&str>, default: usize) -> usize {
    match v.map(|s| s.trim().trim_matches('"')) {
        Some(s) if !s.is_empty() => match s.parse::<usize>() {
            Ok(0) | Err(_) => default,
            Ok(n) => n,
        },
        _ => default,
    }
}

impl Config {
    pub fn from_args(a: Args) -> Result<Self, String> {
        let (bind_host, bind_port) = parse_ollama_host(a.host.as_deref());
        for (name, v) in [
            ("--token-delay-ms", a.token_delay_ms),
            ("--load-delay-ms", a.load_delay_ms),
            ("--first-token-delay-ms", a.first_token_delay_ms),
            ("--load-ms-per-gb", a.load_ms_per_gb),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{name} must be a non-negative number"));
            }
        }
        let mut models = Vec::new();
        for item in a.models.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            models.push(match item.split_once('=') {
                Some((name, size)) => (
                    name.trim().to_string(),
                    Some(parse_size(size).map_err(|e| format!("MOCK_MODELS: {e} (in {item:?})"))?),
                ),
                None => (item.to_string(), None),
            });
        }
        let max_queue = match a.max_queue.as_deref().map(str::trim) {
            Some(s) if !s.is_empty() => s.trim_matches('"').parse::<usize>().unwrap_or(512),
            _ => 512,
        };
        Ok(Config {
            bind_host,
            bind_port,
            num_parallel: env_uint(a.num_parallel.as_deref(), 1),
            // envconfig.MaxRunners; processPending turns 0 into defaultModelsPerGPU (3) x GPUs.
            max_loaded_models: env_uint(a.max_loaded_models.as_deref(), DEFAULT_MODELS_PER_GPU),
            memory: a.memory,
            load_ms_per_gb: a.load_ms_per_gb,
            max_queue,
            keep_alive: KeepAlive::from_env(a.keep_alive.as_deref().unwrap_or("")),
            origins: a
                .origins
                .as_deref()
                .unwrap_or("")
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            models,
            tokens: a.tokens,
            token_delay_ms: a.token_delay_ms,
            load_delay_ms: a.load_delay_ms,
            first_token_delay_ms: a.first_token_delay_ms,
            fail_first: a.fail_first,
            close_after_chunks: a.close_after_chunks,
            error_after_chunks: a.error_after_chunks,
            crash_after: a.crash_after.filter(|n| *n > 0),
            hang: a.hang,
            exit_after_ms: a.exit_after_ms,
            start_delay_ms: a.start_delay_ms,
            log: a.log,
            request_log: !a.no_request_log,
            threads: a
                .threads
                .filter(|n| *n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_parsing_matches_ollama() {
        assert_eq!(parse_ollama_host(None), ("127.0.0.1".into(), 11434));
        assert_eq!(
            parse_ollama_host(Some("127.0.0.1:11501")),
            ("127.0.0.1".into(), 11501)
        );
        assert_eq!(
            parse_ollama_host(Some("http://127.0.0.1")),
            ("127.0.0.1".into(), 80)
        );
        assert_eq!(
            parse_ollama_host(Some("localhost")),
            ("localhost".into(), 11434)
        );
        assert_eq!(
            parse_ollama_host(Some("http://[::1]:9000/x")),
            ("::1".into(), 9000)
        );
        assert_eq!(parse_ollama_host(Some(":7000")), ("0.0.0.0".into(), 7000));
        assert_eq!(
            parse_ollama_host(Some("0.0.0.0")),
            ("0.0.0.0".into(), 11434)
        );
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("5m").unwrap(), 300_000_000_000);
        assert_eq!(parse_go_duration("1h30m").unwrap(), 5_400_000_000_000);
        assert_eq!(parse_go_duration("1.5s").unwrap(), 1_500_000_000);
        assert_eq!(parse_go_duration("0").unwrap(), 0);
        assert_eq!(parse_go_duration("-1m").unwrap(), -60_000_000_000);
        assert!(parse_go_duration("5").unwrap_err().contains("missing unit"));
        assert!(parse_go_duration("abc").is_err());
        assert_eq!(KeepAlive::from_env("-1"), KeepAlive::Forever);
        assert_eq!(
            KeepAlive::from_env("30"),
            KeepAlive::For(Duration::from_secs(30))
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1.5 GiB").unwrap(), 1_610_612_736);
        assert_eq!(parse_size("500mb").unwrap(), 500_000_000);
        assert_eq!(parse_size("1234").unwrap(), 1234);
        assert!(parse_size("2TB").is_err());
        assert!(parse_size("GB").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn fail_first() {
        assert_eq!(parse_fail_first("3:500").unwrap(), (3, 500));
        assert_eq!(parse_fail_first("2").unwrap(), (2, 503));
        assert!(parse_fail_first("x:1").is_err());
    }
}
