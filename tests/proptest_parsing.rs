//! Property tests of what the sidecar parses from untrusted input: request classification
//! (`route::classify`), the body's routing fields (`body::inspect`), the JSON depth check, model
//! patterns, bearer tokens and head limits. None may panic on any input; model extraction must
//! round-trip through arbitrary JSON objects.
//!
//! Cases per property: `PROPTEST_CASES` (default 10,000). cargo-fuzz needs a nightly toolchain,
//! which this project's machines cannot install; these run on stable in the ordinary test suite.

use ollama_sidecar::config::LimitsConfig;
use ollama_sidecar::policy::{glob, keys, limits};
use ollama_sidecar::proxy::body::{inspect, inspect_fields, key_binds, Field};
use ollama_sidecar::proxy::canonical::{path_view, PathView};
use ollama_sidecar::proxy::route::{classify, ApiShape, RouteClass};
use proptest::prelude::*;
use serde_json::{Map, Value};

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Arbitrary JSON, nested up to a few levels, with arbitrary strings.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Extra fields: any names but the three the sidecar reads.
fn extra_fields() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(
        any::<String>().prop_filter("not a routing field", |k| {
            !["model", "name", "stream"].iter().any(|f| key_binds(k, f))
        }),
        json_value(),
        0..8,
    )
    .prop_map(|m| m.into_iter().collect())
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Reference glob: plain recursion, exponential but fine on short strings.
fn glob_reference(p: &[char], t: &[char]) -> bool {
    match (p.first(), t.first()) {
        (None, None) => true,
        (None, Some(_)) => false,
        (Some('*'), _) => {
            glob_reference(&p[1..], t) || (!t.is_empty() && glob_reference(p, &t[1..]))
        }
        (Some(_), None) => false,
        (Some('?'), Some(_)) => glob_reference(&p[1..], &t[1..]),
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b) && glob_reference(&p[1..], &t[1..]),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn classify_never_panics_and_is_consistent(method in "[A-Z]{1,10}", path in any::<String>()) {
        let m = http::Method::from_bytes(method.as_bytes()).unwrap_or(http::Method::GET);
        let r = classify(&m, &path);
        let expected_shape = if path == "/v1/messages" || path.starts_with("/v1/messages/") {
            ApiShape::Anthropic
        } else if path.starts_with("/v1/") {
            ApiShape::OpenAi
        } else {
            ApiShape::Ollama
        };
        prop_assert_eq!(r.shape, expected_shape);
        if r.name == "other" {
            prop_assert_eq!(r.class, RouteClass::Other);
            prop_assert!(!r.has_model_body());
        } else {
            prop_assert!(r.name == path || r.name.ends_with(":digest") || r.name.ends_with(":model") || r.name.ends_with(":encodedKey"));
        }
    }

    #[test]
    fn classify_known_prefixes(suffix in "[a-zA-Z0-9:._/-]{0,40}") {
        // gin's `:param`: one non-empty segment, no `/`.
        let one_segment = !suffix.is_empty() && !suffix.contains('/');
        let blob = classify(&http::Method::POST, format!("/api/blobs/{suffix}"));
        prop_assert_eq!(blob.class == RouteClass::Management, one_segment);
        let model = classify(&http::Method::GET, format!("/v1/models/{suffix}"));
        prop_assert_eq!(model.class == RouteClass::Metadata, one_segment);
        prop_assert_eq!(model.shape, ApiShape::OpenAi);
    }

    #[test]
    fn inspect_never_panics(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = inspect(&body);
        let _ = limits::json_too_deep(&body, limits::MAX_JSON_DEPTH);
    }

    #[test]
    fn inspect_never_panics_on_json_like_bytes(body in r#"[\[\]{}",:0-9a-z\\ ]{0,256}"#) {
        let _ = inspect(body.as_bytes());
    }

    #[test]
    fn model_round_trips(
        model in any::<String>().prop_filter("non-empty", |m| !m.is_empty()),
        stream in prop::option::of(any::<bool>()),
        legacy in any::<bool>(),
        extra in extra_fields(),
    ) {
        let mut obj = extra;
        obj.insert(if legacy { "name" } else { "model" }.to_string(), Value::String(model.clone()));
        if let Some(s) = stream {
            obj.insert("stream".to_string(), Value::Bool(s));
        }
        let text = serde_json::to_vec(&Value::Object(obj)).expect("serialise");
        let facts = inspect_fields(&text, &[Field::Model, Field::Name, Field::Stream]).expect("a valid body");
        prop_assert_eq!(facts.model.as_deref(), Some(model.as_str()));
        prop_assert_eq!(facts.stream, stream);
    }

    #[test]
    fn model_wins_over_name(model in "[a-z0-9.:]{1,20}", name in "[a-z0-9.:]{1,20}", extra in extra_fields()) {
        let mut obj = extra;
        obj.insert("model".into(), Value::String(model.clone()));
        obj.insert("name".into(), Value::String(name));
        let text = serde_json::to_vec(&Value::Object(obj)).expect("serialise");
        prop_assert_eq!(inspect(&text).expect("valid").model, Some(model));
    }

    #[test]
    fn depth_check_agrees_with_the_structure(v in json_value(), max in 0usize..8) {
        let text = serde_json::to_vec(&v).expect("serialise");
        prop_assert_eq!(limits::json_too_deep(&text, max), depth(&v) > max);
    }

    #[test]
    fn glob_agrees_with_reference(pattern in "[a-c*?]{0,8}", text in "[a-cA-C]{0,10}") {
        let p: Vec<char> = pattern.chars().collect();
        let t: Vec<char> = text.chars().collect();
        prop_assert_eq!(glob::matches(&pattern, &text), glob_reference(&p, &t));
    }

    #[test]
    fn bearer_never_panics(value in prop::collection::vec(any::<u8>(), 0..64)) {
        if let Some(secret) = keys::bearer(&value) {
            prop_assert!(!secret.is_empty());
            prop_assert!(secret.len() + 7 <= value.len());
        }
    }

    #[test]
    fn head_limits_never_panic(
        path in "/[ -~]{0,300}",
        headers in prop::collection::vec(("[a-z][a-z0-9-]{0,20}", "[ -~]{0,100}"), 0..40),
    ) {
        let Ok(mut req) = pingora_http::RequestHeader::build("GET", path.as_bytes(), None) else {
            return Ok(());
        };
        for (k, v) in headers {
            let _ = req.append_header(k, v);
        }
        let limits = LimitsConfig::default();
        if let Some(err) = limits::check(&limits, &req) {
            prop_assert!(matches!(err.status(), 400 | 414 | 431));
        }
    }

    #[test]
    fn path_view_never_panics(method in "[A-Z]{1,8}", target in prop::collection::vec(any::<u8>(), 0..128)) {
        let m = http::Method::from_bytes(method.as_bytes()).unwrap_or(http::Method::GET);
        let _ = path_view(&m, &target);
    }

    #[test]
    fn percent_encoding_never_changes_the_route(
        path in "(/[a-z:._-]{1,12}){1,4}",
        mask in prop::collection::vec(any::<bool>(), 64),
    ) {
        // gin routes on Go's decoded path: encoding any byte (the slashes included) names the
        // same path, and a clean path never redirects.
        let encoded: String = path
            .bytes()
            .enumerate()
            .map(|(i, b)| if mask[i % mask.len()] && i > 0 { format!("%{b:02X}") } else { (b as char).to_string() })
            .collect();
        let plain = path_view(&http::Method::POST, path.as_bytes());
        let clean = !path.split('/').any(|s| s == "." || s == "..");
        if clean {
            prop_assert_eq!(plain, Ok(PathView::Routed(path.as_bytes().to_vec())));
            let view = path_view(&http::Method::POST, encoded.as_bytes());
            prop_assert_eq!(view.map(|v| v.decoded().to_vec()), Ok(path.as_bytes().to_vec()));
        } else {
            prop_assert!(matches!(plain, Ok(PathView::Redirect(_))));
        }
    }
}
