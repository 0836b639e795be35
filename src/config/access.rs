//! Access control (`src/policy/`): the `auth`, `policy` and `cors` sections and the admin token.
//! All off by default.

use super::secrets::{self, parse_sha256_hex, Secrets};
use super::shared_state::{self, SharedStateConfig};
use super::{err, file, ConfigError};
use crate::route_class::RouteClass;
use std::fmt;
use std::time::Duration;

/// The validated access-control configuration.
#[derive(Debug, Clone, Default)]
pub struct AccessConfig {
    pub keys: Vec<ApiKey>,
    pub allow_anonymous_metadata: bool,
    pub policy: PolicyConfig,
    pub cors: CorsConfig,
    /// SHA-256 of the admin token, when `/metrics` and `/status` need one.
    pub admin_token: Option<[u8; 32]>,
    /// Where limits are counted together with other sidecars; `None`: in this process.
    pub shared_state: Option<SharedStateConfig>,
}

/// A validated API key: its secret only as a SHA-256.
#[derive(Clone)]
pub struct ApiKey {
    pub name: String,
    pub sha256: [u8; 32],
    pub priority: i32,
    pub max_concurrent: Option<u32>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub models: Vec<String>,
    /// Route classes allowed; `management` only with `admin`.
    pub routes: Vec<RouteClass>,
    pub admin: bool,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

/// The validated `policy` section: for every request, with or without keys.
#[derive(Debug, Clone, Default)]
pub struct PolicyConfig {
    /// Models anyone may use (glob patterns); empty: every model.
    pub models: Vec<String>,
    /// Route classes refused to everyone.
    pub deny_classes: Vec<RouteClass>,
    /// Requests per minute per client address, for requests without an API key (1 or more).
    pub requests_per_minute_per_client: Option<u32>,
}

/// The validated `cors` section.
#[derive(Debug, Clone)]
pub struct CorsConfig {
    /// Exact origins (scheme and host) or `*`; empty: CORS passes through to Ollama.
    pub origins: Vec<String>,
    /// `Access-Control-Max-Age` of preflight answers.
    pub max_age: Duration,
}

/// The file's defaults.
impl Default for CorsConfig {
    fn default() -> Self {
        let file = file::Cors::default();
        CorsConfig {
            origins: file.origins,
            max_age: file.max_age,
        }
    }
}

/// Validates `auth`, `policy`, `cors`, the admin token and `shared_state`.
pub(super) fn validate(
    file: &file::Config,
    source: &str,
    secrets: Secrets,
) -> Result<AccessConfig, ConfigError> {
    let mut keys: Vec<ApiKey> = Vec::with_capacity(file.auth.keys.len());
    for (i, k) in file.auth.keys.iter().enumerate() {
        let key = validate_key(&KeyAt { source, i }, k, &keys, secrets)?;
        keys.push(key);
    }
    if file.auth.allow_anonymous_metadata && keys.is_empty() {
        return Err(err(
            source,
            "auth.allow_anonymous_metadata",
            "only means something with `auth.keys`",
        ));
    }
    Ok(AccessConfig {
        keys,
        allow_anonymous_metadata: file.auth.allow_anonymous_metadata,
        policy: validate_policy(&file.policy, source)?,
        cors: validate_cors(&file.cors, source)?,
        admin_token: admin_token(&file.admin, source, secrets)?,
        shared_state: shared_state::validate(&file.shared_state, source)?,
    })
}

/// Which key an error is about: `auth.keys[i].field` of `source`.
struct KeyAt<'a> {
    source: &'a str,
    i: usize,
}

impl KeyAt<'_> {
    fn key(&self, field: &str) -> String {
        format!("auth.keys[{}].{field}", self.i)
    }
    fn err(&self, field: &str, message: impl Into<String>) -> ConfigError {
        err(self.source, self.key(field), message)
    }
    fn whole(&self, message: impl Into<String>) -> ConfigError {
        err(self.source, format!("auth.keys[{}]", self.i), message)
    }
}

fn validate_key(
    at: &KeyAt,
    k: &file::ApiKey,
    earlier: &[ApiKey],
    secrets: Secrets,
) -> Result<ApiKey, ConfigError> {
    check_key_name(at, &k.name, earlier)?;
    let sha = key_digest(at, k, secrets)?;
    if let Some(j) = earlier.iter().position(|o| o.sha256 == sha) {
        return Err(at.whole(format!("the same key as auth.keys[{j}]")));
    }
    if !(-100..=100).contains(&k.priority) {
        return Err(at.err("priority", "expected -100 to 100"));
    }
    for (field, zero) in [
        ("max_concurrent", k.max_concurrent == Some(0)),
        ("requests_per_minute", k.requests_per_minute == Some(0)),
        ("tokens_per_minute", k.tokens_per_minute == Some(0)),
    ] {
        if zero {
            return Err(at.err(field, "must be at least 1 (leave it out for no limit)"));
        }
    }
    if k.models.is_empty() {
        return Err(at.err(
            "models",
            "expected at least one pattern (`*` for every model)",
        ));
    }
    check_globs(at.source, &at.key("models"), &k.models)?;
    let mut routes = route_classes(at.source, &at.key("routes"), &k.routes)?;
    if routes.contains(&RouteClass::Management) && !k.admin {
        return Err(at.err("routes", "`management` needs `admin: true` on this key"));
    }
    if k.admin && !routes.contains(&RouteClass::Management) {
        routes.push(RouteClass::Management);
    }
    Ok(ApiKey {
        name: k.name.clone(),
        sha256: sha,
        priority: k.priority,
        max_concurrent: k.max_concurrent,
        requests_per_minute: k.requests_per_minute,
        tokens_per_minute: k.tokens_per_minute,
        models: k.models.clone(),
        routes,
        admin: k.admin,
    })
}

/// A key's name: logged, so short and plain; and not another key's.
fn check_key_name(at: &KeyAt, name: &str, earlier: &[ApiKey]) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(at.err(
            "name",
            format!(
                "`{name}`: expected 1 to 64 letters, digits, `-`, `_`, `.` or `@` (it is logged)"
            ),
        ));
    }
    if let Some(j) = earlier.iter().position(|o| o.name == name) {
        return Err(at.err(
            "name",
            format!("`{name}` is already the name of auth.keys[{j}]"),
        ));
    }
    Ok(())
}

/// The key's SHA-256, from exactly one of `sha256`, `key_env` or `key_file`.
fn key_digest(at: &KeyAt, k: &file::ApiKey, secrets: Secrets) -> Result<[u8; 32], ConfigError> {
    match (&k.sha256, &k.key_env, &k.key_file) {
        (Some(hex), None, None) => parse_sha256_hex(hex).ok_or_else(|| {
            at.err(
                "sha256",
                "expected 64 hex digits: the SHA-256 of the key (`printf %s \"$KEY\" | sha256sum`)",
            )
        }),
        (None, Some(var), None) => secrets::from_env(at.source, &at.key("key_env"), var, secrets),
        (None, None, Some(path)) => {
            secrets::from_file(at.source, &at.key("key_file"), path, secrets)
        }
        _ => Err(at.whole("expected exactly one of `sha256`, `key_env` or `key_file`")),
    }
}

fn validate_policy(policy: &file::Policy, source: &str) -> Result<PolicyConfig, ConfigError> {
    check_globs(source, "policy.models", &policy.models)?;
    let deny_classes = route_classes(source, "policy.deny_classes", &policy.deny_classes)?;
    if policy.requests_per_minute_per_client == Some(0) {
        return Err(err(
            source,
            "policy.requests_per_minute_per_client",
            "must be at least 1 (leave it out for no limit)",
        ));
    }
    Ok(PolicyConfig {
        models: policy.models.clone(),
        deny_classes,
        requests_per_minute_per_client: policy.requests_per_minute_per_client,
    })
}

fn validate_cors(cors: &file::Cors, source: &str) -> Result<CorsConfig, ConfigError> {
    for (i, o) in cors.origins.iter().enumerate() {
        let ok = o == "*"
            || ((o.starts_with("http://") || o.starts_with("https://"))
                && !o.ends_with('/')
                && o.bytes().all(|b| b.is_ascii_graphic()));
        if !ok {
            return Err(err(
                source,
                format!("cors.origins[{i}]"),
                format!("`{o}`: expected `*` or an origin like `https://app.example.com` (scheme and host, no path)"),
            ));
        }
    }
    Ok(CorsConfig {
        origins: cors.origins.clone(),
        max_age: cors.max_age,
    })
}

/// The admin token's SHA-256, from `token_sha256` or `token_env` (not both); `None`: no token.
fn admin_token(
    admin: &file::Admin,
    source: &str,
    secrets: Secrets,
) -> Result<Option<[u8; 32]>, ConfigError> {
    match (&admin.token_sha256, &admin.token_env) {
        (None, None) => Ok(None),
        (Some(hex), None) => parse_sha256_hex(hex).map(Some).ok_or_else(|| {
            err(
                source,
                "admin.token_sha256",
                "expected 64 hex digits: the SHA-256 of the token",
            )
        }),
        (None, Some(var)) => secrets::from_env(source, "admin.token_env", var, secrets).map(Some),
        (Some(_), Some(_)) => Err(err(
            source,
            "admin",
            "expected one of `token_sha256` or `token_env`, not both",
        )),
    }
}

fn check_globs(source: &str, key: &str, patterns: &[String]) -> Result<(), ConfigError> {
    for (i, p) in patterns.iter().enumerate() {
        if p.trim().is_empty() || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err(
                source,
                format!("{key}[{i}]"),
                format!("`{p}`: expected a model name pattern such as `llama3.2:*` (no spaces)"),
            ));
        }
    }
    Ok(())
}

/// The classes a list names, or an error at the first name that is not one.
fn route_classes(
    source: &str,
    key: &str,
    names: &[String],
) -> Result<Vec<RouteClass>, ConfigError> {
    names
        .iter()
        .enumerate()
        .map(|(i, c)| {
            RouteClass::from_name(c).ok_or_else(|| {
                let all: Vec<&str> = RouteClass::ALL.iter().map(|c| c.as_str()).collect();
                err(
                    source,
                    format!("{key}[{i}]"),
                    format!("`{c}`: expected one of {}", all.join(", ")),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{parse_err, parse_ok};
    use std::time::Duration;

    #[test]
    fn access_defaults_and_keys() {
        let c = parse_ok("instances:\n  - name: a\n    url: x:1\n");
        assert!(c.access.keys.is_empty() && c.access.cors.origins.is_empty());
        assert!(c.access.admin_token.is_none());
        assert_eq!(c.limits.max_header_bytes.0, 64 << 10);
        assert_eq!(c.limits.max_headers, 100);
        assert_eq!(c.limits.max_uri_bytes.0, 8 << 10);
        assert_eq!(c.limits.body_read_timeout, Duration::from_secs(30));
        let hex = "ab".repeat(32);
        let c = parse_ok(&format!(
            "auth:\n  keys:\n    - name: ops\n      sha256: {hex}\n      admin: true\n      priority: 5\ninstances:\n  - name: a\n    url: x:1\n"
        ));
        let k = &c.access.keys[0];
        assert_eq!((k.name.as_str(), k.priority, k.admin), ("ops", 5, true));
        assert_eq!(k.sha256, [0xab; 32]);
        assert!(k
            .routes
            .contains(&crate::route_class::RouteClass::Management));
        assert_eq!(k.models, vec!["*"]);
        // `check` prints the hash, never a key.
        assert!(!format!("{:?}", c.access).contains(&hex));
        assert!(parse_err(&format!(
            "auth:\n  keys:\n    - name: a\n      sha256: {hex}\n    - name: b\n      sha256: {hex}\ninstances:\n  - name: a\n    url: x:1\n"
        ))
        .contains("auth.keys[1]: the same key as auth.keys[0]"));
    }

    #[test]
    fn key_and_policy_mistakes() {
        let one = "instances:\n  - name: a\n    url: x:1\n";
        let hex = "ab".repeat(32);
        for (yaml, message) in [
            (
                format!("auth:\n  keys:\n    - name: k\n      sha256: {hex}\n      routes: [management]\n"),
                "auth.keys[0].routes: `management` needs `admin: true` on this key",
            ),
            (
                "auth:\n  keys:\n    - name: k\n".to_string(),
                "auth.keys[0]: expected exactly one of `sha256`, `key_env` or `key_file`",
            ),
            (
                "policy:\n  deny_classes: [chat]\n".to_string(),
                "policy.deny_classes[0]: `chat`: expected one of inference, metadata, management, other",
            ),
            (
                "cors:\n  origins: ['https://a.example/']\n".to_string(),
                "cors.origins[0]: `https://a.example/`: expected `*` or an origin like `https://app.example.com` (scheme and host, no path)",
            ),
        ] {
            assert_eq!(parse_err(&format!("{yaml}{one}")), format!("test.yaml: {message}"));
        }
    }
}
