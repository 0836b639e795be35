//! Model-name patterns: `*` matches any run of characters, `?` one character; everything else
//! matches itself, ASCII case-insensitively. No classes, no escapes: model names need none.

/// Whether `text` matches `pattern`. Linear in practice: one backtracking point (the last `*`).
pub fn matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c.eq_ignore_ascii_case(&t[ti]) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
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
