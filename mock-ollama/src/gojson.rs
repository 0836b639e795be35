//! JSON read the way Go's `encoding/json` `Decoder.Decode` reads it, which is what gin's
//! `ShouldBindJSON` runs (gin v1.10.0 binding/json.go `decodeJSON`: `json.NewDecoder(r).Decode`).
//!
//! - One value is read; whatever follows it is never looked at (Decoder.readValue stops at the
//!   end of the first value). Only whitespace, or nothing, is `io.EOF` (Ollama's "missing
//!   request body"); a value cut short is `io.ErrUnexpectedEOF` ("unexpected EOF").
//! - Syntax errors carry Go's scanner wording (scanner.go `stateBeginValue` and friends):
//!   `invalid character 'x' looking for beginning of value`, `... after object key`, ...
//! - Objects keep every key in order, duplicates included: the binder applies Go's
//!   last-match-wins rule (decode.go `object`).
//! - Strings are unquoted like decode.go `unquoteBytes`: invalid UTF-8 becomes U+FFFD one
//!   byte at a time (utf8.DecodeRune), an unpaired `\uD800`-style surrogate becomes U+FFFD.
//! - Numbers keep their literal text; the binder converts them per target type.
//!
//! The nesting limit is Go's (scanner.go `maxNestingDepth` = 10000, "exceeded max depth");
//! parsing is iterative so deep input cannot exhaust the stack.

#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    /// The literal as written (Go converts per target type: int, float64, ...).
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// Go's name for the JSON kind in `UnmarshalTypeError.Value`.
    pub fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "bool",
            Json::Num(_) => "number",
            Json::Str(_) => "string",
            Json::Arr(_) => "array",
            Json::Obj(_) => "object",
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum DecodeError {
    /// Nothing but whitespace: Go's `io.EOF`.
    Eof,
    /// The value ended early: `io.ErrUnexpectedEOF`.
    UnexpectedEof,
    /// A `*json.SyntaxError` message.
    Syntax(String),
}

impl DecodeError {
    pub fn message(&self) -> String {
        match self {
            DecodeError::Eof => "EOF".into(),
            DecodeError::UnexpectedEof => "unexpected EOF".into(),
            DecodeError::Syntax(m) => m.clone(),
        }
    }
}

const MAX_DEPTH: usize = 10_000;

/// scanner.go `quoteChar`: how Go prints the offending byte.
fn quote_char(c: u8) -> String {
    match c {
        b'\'' => "'\\''".into(),
        b'"' => "'\"'".into(),
        0x07 => "'\\a'".into(),
        0x08 => "'\\b'".into(),
        0x0c => "'\\f'".into(),
        b'\n' => "'\\n'".into(),
        b'\r' => "'\\r'".into(),
        b'\t' => "'\\t'".into(),
        0x0b => "'\\v'".into(),
        b'\\' => "'\\\\'".into(),
        c if c < 0x20 || c == 0x7f => format!("'\\x{c:02x}'"),
        c if c < 0x80 => format!("'{}'", c as char),
        // string(byte) is the rune U+00xx; strconv.Quote escapes the unprintable ones.
        c if c < 0xa1 || c == 0xad => format!("'\\u{:04x}'", c as u32),
        c => format!("'{}'", char::from(c)),
    }
}

fn invalid(c: u8, context: &str) -> DecodeError {
    DecodeError::Syntax(format!("invalid character {} {context}", quote_char(c)))
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
}

/// An open container while parsing.
enum Frame {
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>, String),
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn skip_space(&mut self) {
        while self.i < self.b.len() && is_space(self.b[self.i]) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn literal(&mut self, word: &'static str) -> Result<(), DecodeError> {
        // The first byte was already matched by the caller.
        for (k, want) in word.bytes().enumerate().skip(1) {
            match self.b.get(self.i + k) {
                None => return Err(DecodeError::UnexpectedEof),
                Some(&c) if c == want => {}
                Some(&c) => {
                    return Err(invalid(
                        c,
                        &format!("in literal {word} (expecting '{}')", want as char),
                    ))
                }
            }
        }
        self.i += word.len();
        Ok(())
    }

    /// scanner.go state0/state1/stateDot/stateE...: the number grammar and its errors.
    fn number(&mut self) -> Result<Json, DecodeError> {
        let start = self.i;
        let digits = |p: &mut Self| {
            while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                p.i += 1;
            }
        };
        if self.peek() == Some(b'-') {
            self.i += 1;
            match self.peek() {
                None => return Err(DecodeError::UnexpectedEof),
                Some(c) if !c.is_ascii_digit() => return Err(invalid(c, "in numeric literal")),
                _ => {}
            }
        }
        if self.peek() == Some(b'0') {
            self.i += 1;
        } else {
            digits(self);
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            match self.peek() {
                None => return Err(DecodeError::UnexpectedEof),
                Some(c) if !c.is_ascii_digit() => {
                    return Err(invalid(c, "after decimal point in numeric literal"))
                }
                _ => digits(self),
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            match self.peek() {
                None => return Err(DecodeError::UnexpectedEof),
                Some(c) if !c.is_ascii_digit() => {
                    return Err(invalid(c, "in exponent of numeric literal"))
                }
                _ => digits(self),
            }
        }
        let text = String::from_utf8_lossy(&self.b[start..self.i]).into_owned();
        Ok(Json::Num(text))
    }

    /// Scan a string (the opening quote is at `self.i`) and unquote it like Go.
    fn string(&mut self) -> Result<String, DecodeError> {
        self.i += 1;
        let start = self.i;
        let mut escaped = false;
        loop {
            // Jump to the next quote or backslash; control bytes before it are errors.
            let rest = &self.b[self.i..];
            let Some(k) = memchr::memchr2(b'"', b'\\', rest) else {
                if let Some(c) = first_control(rest) {
                    return Err(invalid(c, "in string literal"));
                }
                return Err(DecodeError::UnexpectedEof);
            };
            if let Some(c) = first_control(&rest[..k]) {
                return Err(invalid(c, "in string literal"));
            }
            self.i += k;
            if self.b[self.i] == b'"' {
                break;
            }
            escaped = true;
            self.i += 1;
            let Some(e) = self.peek() else {
                return Err(DecodeError::UnexpectedEof);
            };
            match e {
                b'b' | b'f' | b'n' | b'r' | b't' | b'\\' | b'/' | b'"' => self.i += 1,
                b'u' => {
                    self.i += 1;
                    for _ in 0..4 {
                        match self.peek() {
                            None => return Err(DecodeError::UnexpectedEof),
                            Some(h) if h.is_ascii_hexdigit() => self.i += 1,
                            Some(h) => {
                                return Err(invalid(h, "in \\u hexadecimal character escape"))
                            }
                        }
                    }
                }
                e => return Err(invalid(e, "in string escape code")),
            }
        }
        let raw = &self.b[start..self.i];
        self.i += 1;
        // Fast path: nothing to unescape and already valid UTF-8.
        if !escaped {
            if let Ok(s) = std::str::from_utf8(raw) {
                return Ok(s.to_owned());
            }
        }
        Ok(unquote(raw))
    }
}

/// The first byte below 0x20, which a JSON string may not hold raw. Chunks are tested
/// without an early exit so the check vectorises; only a hit is searched byte by byte.
fn first_control(s: &[u8]) -> Option<u8> {
    s.chunks(32)
        .find(|chunk| chunk.iter().fold(false, |hit, c| hit | (*c < 0x20)))
        .and_then(|chunk| chunk.iter().copied().find(|c| *c < 0x20))
}

fn hex4(b: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(b.get(..4)?).ok()?;
    u32::from_str_radix(s, 16).ok()
}

/// decode.go `unquoteBytes` over an already-validated string body.
fn unquote(s: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut r = 0;
    while r < s.len() {
        let c = s[r];
        if c == b'\\' {
            let e = s.get(r + 1).copied().unwrap_or(b'\\');
            match e {
                b'b' => out.push('\u{8}'),
                b'f' => out.push('\u{c}'),
                b'n' => out.push('\n'),
                b'r' => out.push('\r'),
                b't' => out.push('\t'),
                b'u' => {
                    let first = hex4(&s[r + 2..]).unwrap_or(0xfffd);
                    r += 6;
                    if (0xd800..0xe000).contains(&first) {
                        // A valid pair consumes the next escape; anything else is U+FFFD
                        // and the next escape is read on its own (utf16.DecodeRune).
                        if s.get(r) == Some(&b'\\') && s.get(r + 1) == Some(&b'u') {
                            if let Some(second) = hex4(&s[r + 2..]) {
                                if (0xd800..0xdc00).contains(&first)
                                    && (0xdc00..0xe000).contains(&second)
                                {
                                    let cp = 0x10000 + ((first - 0xd800) << 10) + (second - 0xdc00);
                                    out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                                    r += 6;
                                    continue;
                                }
                            }
                        }
                        out.push('\u{fffd}');
                    } else {
                        out.push(char::from_u32(first).unwrap_or('\u{fffd}'));
                    }
                    continue;
                }
                other => out.push(other as char),
            }
            r += 2;
        } else {
            // Up to the next escape: valid UTF-8 is copied; each byte of an invalid
            // sequence is one U+FFFD (utf8.DecodeRune returns RuneError with size 1).
            let end = r + memchr::memchr(b'\\', &s[r..]).unwrap_or(s.len() - r);
            let mut seg = &s[r..end];
            while !seg.is_empty() {
                match std::str::from_utf8(seg) {
                    Ok(valid) => {
                        out.push_str(valid);
                        seg = &[];
                    }
                    Err(e) => {
                        let (valid, rest) = seg.split_at(e.valid_up_to());
                        out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                        let bad = e.error_len().unwrap_or(rest.len());
                        for _ in 0..bad {
                            out.push('\u{fffd}');
                        }
                        seg = &rest[bad..];
                    }
                }
            }
            r = end;
        }
    }
    out
}

/// Read the first JSON value of `body` like `json.NewDecoder(body).Decode(&v)`.
pub fn decode(body: &[u8]) -> Result<Json, DecodeError> {
    let mut p = Parser { b: body, i: 0 };
    p.skip_space();
    if p.i >= body.len() {
        return Err(DecodeError::Eof);
    }
    let mut stack: Vec<Frame> = Vec::new();
    loop {
        let Some(value) = begin_value(&mut p, &mut stack)? else {
            continue;
        };
        if let Some(done) = end_value(&mut p, &mut stack, value)? {
            return Ok(done);
        }
    }
}

/// Expecting a value: a scalar or an empty container is returned whole; a container with
/// contents is opened on `stack` (None), its first key read.
fn begin_value(p: &mut Parser, stack: &mut Vec<Frame>) -> Result<Option<Json>, DecodeError> {
    p.skip_space();
    let Some(c) = p.peek() else {
        return Err(DecodeError::UnexpectedEof);
    };
    let value = match c {
        b'{' | b'[' => {
            if stack.len() >= MAX_DEPTH {
                return Err(DecodeError::Syntax("exceeded max depth".into()));
            }
            p.i += 1;
            p.skip_space();
            let close = if c == b'{' { b'}' } else { b']' };
            if p.peek() == Some(close) {
                p.i += 1;
                if c == b'{' {
                    Json::Obj(Vec::new())
                } else {
                    Json::Arr(Vec::new())
                }
            } else if c == b'[' {
                stack.push(Frame::Arr(Vec::new()));
                return Ok(None);
            } else {
                let key = object_key(p)?;
                stack.push(Frame::Obj(Vec::new(), key));
                return Ok(None);
            }
        }
        b'"' => Json::Str(p.string()?),
        b'-' | b'0'..=b'9' => p.number()?,
        b't' => {
            p.literal("true")?;
            Json::Bool(true)
        }
        b'f' => {
            p.literal("false")?;
            Json::Bool(false)
        }
        b'n' => {
            p.literal("null")?;
            Json::Null
        }
        c => return Err(invalid(c, "looking for beginning of value")),
    };
    Ok(Some(value))
}

/// A value is complete: attach it to its container, closing containers as they end. The
/// whole document once the stack is empty; None when a `,` asks for the next value.
fn end_value(
    p: &mut Parser,
    stack: &mut Vec<Frame>,
    mut value: Json,
) -> Result<Option<Json>, DecodeError> {
    loop {
        let Some(top) = stack.last_mut() else {
            return Ok(Some(value));
        };
        p.skip_space();
        let Some(c) = p.peek() else {
            return Err(DecodeError::UnexpectedEof);
        };
        match top {
            Frame::Arr(items) => {
                items.push(value);
                match c {
                    b',' => {
                        p.i += 1;
                        return Ok(None);
                    }
                    b']' => {
                        p.i += 1;
                        let Some(Frame::Arr(items)) = stack.pop() else {
                            unreachable!("top is an array");
                        };
                        value = Json::Arr(items);
                    }
                    c => return Err(invalid(c, "after array element")),
                }
            }
            Frame::Obj(entries, key) => {
                entries.push((std::mem::take(key), value));
                match c {
                    b',' => {
                        p.i += 1;
                        *key = object_key(p)?;
                        return Ok(None);
                    }
                    b'}' => {
                        p.i += 1;
                        let Some(Frame::Obj(entries, _)) = stack.pop() else {
                            unreachable!("top is an object");
                        };
                        value = Json::Obj(entries);
                    }
                    c => return Err(invalid(c, "after object key:value pair")),
                }
            }
        }
    }
}

/// A key and its colon (scanner.go `stateBeginString`, `stateEndValue` for keys).
fn object_key(p: &mut Parser) -> Result<String, DecodeError> {
    p.skip_space();
    match p.peek() {
        None => return Err(DecodeError::UnexpectedEof),
        Some(b'"') => {}
        Some(c) => return Err(invalid(c, "looking for beginning of object key string")),
    }
    let key = p.string()?;
    p.skip_space();
    match p.peek() {
        None => Err(DecodeError::UnexpectedEof),
        Some(b':') => {
            p.i += 1;
            Ok(key)
        }
        Some(c) => Err(invalid(c, "after object key")),
    }
}

/// fold.go `foldRune` (Go >= 1.21): the smallest rune of the rune's simple case-folding
/// orbit (unicode.SimpleFold). The orbit comes from Unicode's CaseFolding.txt C+S
/// mappings, as regex-syntax's simple case folder provides them; Go's tables are built
/// from the same data (unicode/tables.go `caseOrbit` keeps U+0130 and U+0131 alone, since
/// their only folds are Turkic (T) or full (F) ones).
pub fn fold_rune(c: char) -> char {
    use regex_syntax::hir::{ClassUnicode, ClassUnicodeRange};
    let mut class = ClassUnicode::new([ClassUnicodeRange::new(c, c)]);
    class.case_fold_simple();
    class.ranges().iter().map(|r| r.start()).min().unwrap_or(c)
}

/// fold.go `foldName`: ASCII letters upper-cased, every other rune folded to the smallest
/// of its orbit. Two keys match case-insensitively when their folded names are equal.
pub fn fold_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii() {
                c.to_ascii_uppercase()
            } else {
                fold_rune(c)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syntax(body: &str) -> String {
        match decode(body.as_bytes()) {
            Err(DecodeError::Syntax(m)) => m,
            other => panic!("{body:?}: {other:?}"),
        }
    }

    #[test]
    fn one_value_then_stop() {
        // Decoder.Decode reads one value; the rest is never scanned.
        assert_eq!(
            decode(br#"{"a":1} {"b": garbage"#).unwrap(),
            Json::Obj(vec![("a".into(), Json::Num("1".into()))])
        );
        assert_eq!(decode(b"123abc").unwrap(), Json::Num("123".into()));
        assert_eq!(decode(b"  \n\t").unwrap_err(), DecodeError::Eof);
        assert_eq!(decode(b"").unwrap_err(), DecodeError::Eof);
        assert_eq!(decode(br#"{"a":"#).unwrap_err(), DecodeError::UnexpectedEof);
        assert_eq!(decode(b"tru").unwrap_err(), DecodeError::UnexpectedEof);
    }

    #[test]
    fn syntax_errors_in_go_words() {
        assert_eq!(
            syntax("x"),
            "invalid character 'x' looking for beginning of value"
        );
        assert_eq!(
            syntax("{x"),
            "invalid character 'x' looking for beginning of object key string"
        );
        assert_eq!(
            syntax(r#"{"a" 1}"#),
            "invalid character '1' after object key"
        );
        assert_eq!(
            syntax(r#"{"a":1 "b"}"#),
            "invalid character '\"' after object key:value pair"
        );
        assert_eq!(syntax("[1 2]"), "invalid character '2' after array element");
        assert_eq!(
            syntax("\"a\nb\""),
            "invalid character '\\n' in string literal"
        );
        assert_eq!(
            syntax(r#""\x""#),
            "invalid character 'x' in string escape code"
        );
        assert_eq!(syntax("-x"), "invalid character 'x' in numeric literal");
        assert_eq!(
            syntax("1.x"),
            "invalid character 'x' after decimal point in numeric literal"
        );
        assert_eq!(
            syntax("nul1"),
            "invalid character '1' in literal null (expecting 'l')"
        );
        assert_eq!(
            syntax("{'a':1}"),
            "invalid character '\\'' looking for beginning of object key string"
        );
    }

    #[test]
    fn duplicate_keys_are_kept_in_order() {
        let v = decode(br#"{"model":"a","MODEL":"b","model":null}"#).unwrap();
        let Json::Obj(e) = v else { panic!() };
        let keys: Vec<_> = e.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["model", "MODEL", "model"]);
    }

    #[test]
    fn unquote_like_go() {
        // Escapes, a surrogate pair, a lone surrogate (U+FFFD), and invalid UTF-8 bytes
        // replaced one by one (utf8.DecodeRune returns size 1 for each).
        let v = decode(b"\"a\\u0041\\ud83d\\ude00\\ud800x\xe2\x82y\xff\"").unwrap();
        assert_eq!(
            v,
            Json::Str("aA\u{1f600}\u{fffd}x\u{fffd}\u{fffd}y\u{fffd}".into())
        );
        // An escaped key is still the key.
        let v = decode(br#"{"mod\u0065l":"x"}"#).unwrap();
        assert_eq!(v, Json::Obj(vec![("model".into(), Json::Str("x".into()))]));
    }

    #[test]
    fn long_invalid_strings_decode_in_linear_time() {
        // 1 MiB of bytes that never start a rune, then an escape: one U+FFFD each.
        let mut body = vec![b'"'];
        body.extend(std::iter::repeat_n(0xffu8, 1 << 20));
        body.extend_from_slice(b"\\n\"");
        let t0 = std::time::Instant::now();
        let Json::Str(s) = decode(&body).unwrap() else {
            panic!("not a string")
        };
        assert_eq!(s.chars().count(), (1 << 20) + 1);
        assert!(s.ends_with("\u{fffd}\n"));
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn deep_nesting_is_bounded_not_a_crash() {
        let deep = "[".repeat(20_000);
        assert_eq!(syntax(&deep), "exceeded max depth");
        let ok = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        assert!(decode(ok.as_bytes()).is_ok());
    }

    #[test]
    fn folding_matches_go_fold_name() {
        // ASCII: case-insensitive.
        assert_eq!(fold_name("Model"), fold_name("mODEL"));
        // U+017F LATIN SMALL LETTER LONG S folds with s/S (caseOrbit S -> s -> ſ).
        assert_eq!(fold_name("\u{17f}tream"), fold_name("stream"));
        // U+212A KELVIN SIGN folds with k/K.
        assert_eq!(fold_name("\u{212a}eep_alive"), fold_name("keep_alive"));
        // U+0130 and U+0131 are alone in their orbits: they do not match i/I.
        assert_ne!(fold_name("\u{130}nput"), fold_name("input"));
        assert_ne!(fold_name("\u{131}nput"), fold_name("input"));
        assert_eq!(fold_rune('\u{130}'), '\u{130}');
        assert_eq!(fold_rune('\u{131}'), '\u{131}');
        // Other orbits fold to their smallest member: Greek sigma forms, the Angstrom sign.
        assert_eq!(fold_rune('\u{3c2}'), '\u{3a3}');
        assert_eq!(fold_rune('\u{212b}'), '\u{c5}');
    }
}
