//! Secrets the file points at (API keys, the admin token): read from a variable or a file, or
//! given as a SHA-256, and kept only as a SHA-256.

use super::{err, ConfigError};
use std::path::Path;

/// Whether validation reads the secrets the file points at (`key_env`, `key_file`,
/// `admin.token_env`). `Skip` checks only their form: for `check --no-secrets` in CI, never to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    Read,
    Skip,
}

/// Shortest key accepted from an environment variable or a file.
pub const MIN_KEY_LEN: usize = 16;

/// SHA-256 of a secret.
pub fn sha256(secret: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(secret).into()
}

pub(super) fn parse_sha256_hex(text: &str) -> Option<[u8; 32]> {
    let t = text.trim();
    if t.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in t.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// The digest of the secret in environment variable `var`, named `key` in errors.
pub(super) fn from_env(
    source: &str,
    key: &str,
    var: &str,
    secrets: Secrets,
) -> Result<[u8; 32], ConfigError> {
    if secrets == Secrets::Skip {
        return unread(source, key, var);
    }
    match std::env::var(var) {
        Ok(v) if v.trim().len() >= MIN_KEY_LEN => Ok(sha256(v.trim().as_bytes())),
        Ok(v) if v.trim().is_empty() => Err(err(
            source,
            key,
            format!("environment variable `{var}` is empty; expected the key"),
        )),
        Ok(_) => Err(err(
            source,
            key,
            format!("the key in `{var}` is too short; expected at least {MIN_KEY_LEN} characters"),
        )),
        Err(_) => Err(err(
            source,
            key,
            format!("environment variable `{var}` is not set; expected the key"),
        )),
    }
}

/// The digest of the key in file `path` (one line), named `key` in errors.
pub(super) fn from_file(
    source: &str,
    key: &str,
    path: &Path,
    secrets: Secrets,
) -> Result<[u8; 32], ConfigError> {
    if secrets == Secrets::Skip {
        return unread(source, key, &path.display().to_string());
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        err(
            source,
            key,
            format!("cannot read `{}`: {e}", path.display()),
        )
    })?;
    let secret = text.trim();
    if secret.len() < MIN_KEY_LEN {
        return Err(err(
            source,
            key,
            format!(
                "`{}`: expected a key of at least {MIN_KEY_LEN} characters",
                path.display()
            ),
        ));
    }
    Ok(sha256(secret.as_bytes()))
}

/// Stands in for a secret not read (`Secrets::Skip`): checks the variable name or path is usable
/// and returns a digest no real key has (it hashes the key path), so keys stay distinct.
fn unread(source: &str, key: &str, name: &str) -> Result<[u8; 32], ConfigError> {
    if name.trim().is_empty()
        || name.contains('\0')
        || (key.ends_with("_env") && name.contains('='))
    {
        return Err(err(
            source,
            key,
            format!("`{name}` is not a valid environment variable name or path"),
        ));
    }
    Ok(sha256(format!("\0unread secret of {key}").as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digests() {
        assert_eq!(parse_sha256_hex(&"ab".repeat(32)), Some([0xab; 32]));
        assert_eq!(parse_sha256_hex(&"ab".repeat(31)), None);
        assert_eq!(parse_sha256_hex(&"zz".repeat(32)), None);
    }

    #[test]
    fn unread_secrets_are_distinct_and_checked() {
        let a = from_env("f", "auth.keys[0].key_env", "A", Secrets::Skip).unwrap();
        let b = from_env("f", "auth.keys[1].key_env", "A", Secrets::Skip).unwrap();
        assert_ne!(a, b);
        let e = from_env("f", "auth.keys[0].key_env", "A=B", Secrets::Skip).unwrap_err();
        assert_eq!(
            e.to_string(),
            "f: auth.keys[0].key_env: `A=B` is not a valid environment variable name or path"
        );
    }
}
