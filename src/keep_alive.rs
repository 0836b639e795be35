//! What a request's `keep_alive` does to its model in Ollama, read as Ollama reads it.
//!
//! The field is an `*api.Duration` (api/types.go): absent or `null` leaves it nil, and a nil
//! keep-alive leaves a loaded model's session as it was (server/sched.go `useLoadedRunner`;
//! a load takes `OLLAMA_KEEP_ALIVE`). `Duration.UnmarshalJSON` takes a number as seconds and a
//! string as a Go duration (`time.ParseDuration`); a negative value means for good, anything
//! else is a 400 and the request never reaches the scheduler. A zero session unloads the model
//! as soon as no request uses it (sched.go `processCompleted`), and it stays zero for the
//! requests that follow without a `keep_alive` of their own.

use serde_json::Value;
use std::time::Duration;

/// The session a request that names a `keep_alive` gives its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Zero: unloaded as soon as no request uses it.
    UnloadWhenIdle,
    /// Unloaded this long after its last request ends.
    For(Duration),
    /// Never unloaded for idleness (a negative duration).
    Forever,
}

impl KeepAlive {
    /// The session `value` sets; `None` for `null` and for what Ollama refuses (the request
    /// then changes nothing).
    pub fn from_json(value: &Value) -> Option<KeepAlive> {
        let nanos = match value {
            // Go: `time.Duration(t * float64(time.Second))`, truncated; negative is for good.
            Value::Number(n) => n.as_f64()? * 1e9,
            Value::String(s) => go_duration_nanos(s)?,
            _ => return None,
        };
        Some(if nanos < 0.0 || nanos >= i64::MAX as f64 {
            KeepAlive::Forever
        } else if nanos < 1.0 {
            KeepAlive::UnloadWhenIdle
        } else {
            KeepAlive::For(Duration::from_nanos(nanos as u64))
        })
    }

    /// Whether the model stays longer than `limit` after its last request.
    pub fn exceeds(self, limit: Duration) -> bool {
        match self {
            KeepAlive::UnloadWhenIdle => false,
            KeepAlive::For(d) => d > limit,
            KeepAlive::Forever => true,
        }
    }
}

/// What Go's `time.ParseDuration` reads `s` as, in nanoseconds (each term truncated to whole
/// nanoseconds; negative for a leading `-`); `None` where it fails.
fn go_duration_nanos(s: &str) -> Option<f64> {
    let (sign, s) = match s.strip_prefix('-') {
        Some(rest) => (-1.0, rest),
        None => (1.0, s.strip_prefix('+').unwrap_or(s)),
    };
    if s == "0" {
        return Some(0.0);
    }
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut total_ns = 0.0f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..digits];
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit_ns = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total_ns += (value * unit_ns).trunc();
    }
    // Go refuses a duration past the int64 range of nanoseconds.
    (total_ns <= i64::MAX as f64).then_some(sign * total_ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use KeepAlive::*;

    #[test]
    fn read_as_ollama_reads_it() {
        for (v, want) in [
            (json!(0), Some(UnloadWhenIdle)),
            (json!(0.0), Some(UnloadWhenIdle)),
            (json!("0"), Some(UnloadWhenIdle)),
            (json!("0s"), Some(UnloadWhenIdle)),
            (json!("-0m"), Some(UnloadWhenIdle)),
            (json!("0h0m0.0000000001s"), Some(UnloadWhenIdle)),
            (json!(-1), Some(Forever)),
            (json!("-1m"), Some(Forever)),
            (json!(300), Some(For(Duration::from_secs(300)))),
            (json!(0.5), Some(For(Duration::from_millis(500)))),
            (json!("5m"), Some(For(Duration::from_secs(300)))),
            (json!("1h30m"), Some(For(Duration::from_secs(5400)))),
            (json!("1.5\u{b5}s"), Some(For(Duration::from_nanos(1500)))),
            (json!("3000000h"), None),
            (json!(null), None),
            (json!(true), None),
            (json!("soon"), None),
            (json!("5"), None),
            (json!(""), None),
            (json!("1d"), None),
            (json!("1..5s"), None),
        ] {
            assert_eq!(KeepAlive::from_json(&v), want, "{v}");
        }
    }
}
