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

/// The session a request that names a `keep_alive` gives its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Zero: unloaded as soon as no request uses it.
    UnloadWhenIdle,
    /// Any other duration (negative: for good).
    Stays,
}

impl KeepAlive {
    /// The session `value` sets; `None` for `null` and for what Ollama refuses (the request
    /// then changes nothing).
    pub fn from_json(value: &Value) -> Option<KeepAlive> {
        let zero = match value {
            // Go: `time.Duration(t * float64(time.Second))`, truncated; negative is for good.
            Value::Number(n) => {
                let seconds = n.as_f64()?;
                seconds >= 0.0 && seconds * 1e9 < 1.0
            }
            Value::String(s) => go_duration_is_zero(s)?,
            _ => return None,
        };
        Some(if zero {
            KeepAlive::UnloadWhenIdle
        } else {
            KeepAlive::Stays
        })
    }
}

/// Whether Go's `time.ParseDuration` reads `s` as zero (each term truncated to whole
/// nanoseconds); `None` where it fails.
fn go_duration_is_zero(s: &str) -> Option<bool> {
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    if s == "0" {
        return Some(true);
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
    Some(total_ns < 1.0)
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
            (json!(-1), Some(Stays)),
            (json!("-1m"), Some(Stays)),
            (json!(300), Some(Stays)),
            (json!("5m"), Some(Stays)),
            (json!("1h30m"), Some(Stays)),
            (json!("1.5\u{b5}s"), Some(Stays)),
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
