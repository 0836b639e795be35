//! Reading the file: YAML text into the file's shape ([`super::file::Config`]), with errors an
//! operator reads: one line, the key path, plain words.

use super::{file, ConfigError};

/// Parses the whole file. An empty file is refused here: it would be a configuration of
/// defaults with no instance, which validation rejects in less helpful words.
pub(super) fn parse_file(text: &str, source: &str) -> Result<file::Config, ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError {
            file: source.to_string(),
            key: String::new(),
            message: "the file is empty; expected a mapping with at least `instances`".to_string(),
        });
    }
    deserialize_yaml(text, source)
}

/// Deserializes YAML text, rendering errors for an operator: one line, the key path, plain words.
pub(super) fn deserialize_yaml<T: serde::de::DeserializeOwned>(
    text: &str,
    source: &str,
) -> Result<T, ConfigError> {
    let de = yaml_serde::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let tab_line = inner
            .location()
            .filter(|at| {
                text.lines()
                    .nth(at.line().saturating_sub(1))
                    .is_some_and(|l| l.contains('\t'))
            })
            .map(|at| at.line());
        let mut message = inner.to_string();
        // The YAML error repeats (part of) the key path as a prefix: keep it once.
        if let Some((prefix, rest)) = message.split_once(": ") {
            if !prefix.contains(char::is_whitespace) && key.starts_with(prefix) {
                message = rest.to_string();
            }
        }
        if let Some(line) = tab_line {
            if message.contains("cannot start any token") {
                message =
                    format!("line {line} holds a tab character; YAML indents with spaces only");
            }
        }
        ConfigError {
            file: source.to_string(),
            key,
            message: plain_type_words(&message),
        }
    })
}

/// Rewrites serde's type names (`expected u16`, `invalid type: string "abc"`) in an operator's
/// words: "expected a whole number from 0 to 65535, got `abc`".
fn plain_type_words(message: &str) -> String {
    let Some(rest) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
    else {
        return message.to_string();
    };
    let Some((got, expected)) = rest.split_once(", expected ") else {
        return message.to_string();
    };
    // yaml_serde appends the position: keep it after the rewritten words.
    let (expected, at) = match expected.find(" at line ") {
        Some(i) => expected.split_at(i),
        None => (expected, ""),
    };
    format!(
        "expected {}, got {}{at}",
        expected_words(expected),
        got_words(got)
    )
}

/// serde's name of the expected type, in words.
fn expected_words(expected: &str) -> &str {
    match expected {
        "u8" => "a whole number from 0 to 255",
        "u16" => "a whole number from 0 to 65535",
        "u32" | "u64" | "usize" => "a whole number (0 or more)",
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number",
        "f32" | "f64" => "a number such as `0.2`",
        "a boolean" => "`true` or `false`",
        "a string" => "text",
        "a sequence" => "a list (`- item` lines or `[a, b]`)",
        other => other,
    }
}

/// serde's description of the value found, in words.
fn got_words(got: &str) -> String {
    if let Some(s) = got.strip_prefix("string ") {
        format!("`{}`", s.trim_matches('"'))
    } else if let Some(n) = got
        .strip_prefix("integer ")
        .or_else(|| got.strip_prefix("floating point "))
    {
        format!("the number {}", n.trim_matches('`'))
    } else if got == "unit value" {
        "nothing (`null` or an empty value)".to_string()
    } else if let Some(b) = got.strip_prefix("boolean ") {
        b.trim_matches('`').to_string()
    } else {
        got.to_string()
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::parse_err;

    #[test]
    fn unknown_key_names_its_path() {
        let e = parse_err("instances:\n  - name: a\n    url: http://x:1\n    colour: red\n");
        assert!(
            e.starts_with("test.yaml: instances[0].colour: unknown field `colour`"),
            "{e}"
        );
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn wrong_type_names_its_path() {
        let e = parse_err("instances:\n  - name: a\n    port: abc\n");
        assert!(e.contains("instances[0].port"), "{e}");
        assert!(
            e.contains("expected a whole number from 0 to 65535, got `abc`"),
            "{e}"
        );
    }
}
