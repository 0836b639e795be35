//! Model-name patterns: `*` matches any run of characters, `?` one character; everything else
//! matches itself, ASCII case-insensitively. No classes, no escapes: model names need none. The
//! matching is the `wildmatch` crate's (one backtracking point, linear in practice).

use wildmatch::WildMatch;

/// Whether `text` matches `pattern`.
pub fn matches(pattern: &str, text: &str) -> bool {
    // ASCII folding on both sides, as the configuration's patterns have always been read
    // (wildmatch's own case-insensitive mode would also fold non-ASCII letters).
    WildMatch::new(&pattern.to_ascii_lowercase()).matches(&text.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn patterns() {
        assert!(matches("*", ""));
        assert!(matches("*", "llama3.2:latest"));
        assert!(matches("llama3.2", "LLaMA3.2"));
        assert!(!matches("llama3.2", "llama3.2:latest"));
        assert!(matches("llama3.2:*", "llama3.2:1b"));
        assert!(matches("llama*:latest", "llama3.2:latest"));
        assert!(!matches("llama*:latest", "llama3.2:1b"));
        assert!(matches("qwen?:*", "qwen3:8b"));
        assert!(!matches("qwen?:*", "qwen:8b"));
        assert!(matches("*embed*", "nomic-embed-text:latest"));
        assert!(!matches("", "x"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("a*b*c", "aXXbYY"));
        // Pathological input stays fast.
        let long = "a".repeat(10_000);
        assert!(!matches("*a*a*a*a*b", &long));
    }
}
