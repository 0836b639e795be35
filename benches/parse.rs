//! Reading a request before it is admitted: `cargo bench --bench parse`.
//!
//! - `classify/*`: the route of a request path (`proxy::route::classify`), for a native, an
//!   OpenAI and an unknown path.
//! - `inspect/*`: `model` and `stream` from a JSON body (`proxy::body::inspect`), which skips every
//!   other field without copying it.
//! - `depth/*`: the nesting check every inference body passes (`policy::limits::json_too_deep`).
//!
//! Bodies: `chat_small` (one short message, 90 B), `chat_history` (40 turns, about 20 KB) and
//! `chat_image` (a message with a 1 MiB base64 image, as a vision model gets it).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ollama_sidecar::policy::limits::{json_too_deep, MAX_JSON_DEPTH};
use ollama_sidecar::proxy::{body, route};
use std::hint::black_box;

fn bodies() -> Vec<(&'static str, Vec<u8>)> {
    let small =
        br#"{"model":"llama3.2","messages":[{"role":"user","content":"why is the sky blue?"}]}"#;
    let turns: Vec<String> = (0..40)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            format!(
                r#"{{"role":"{role}","content":"turn {i}: {} \"quoted\" and escaped \\n text"}}"#,
                "lorem ipsum dolor sit amet ".repeat(16)
            )
        })
        .collect();
    let history = format!(
        r#"{{"model":"llama3.2","messages":[{}],"stream":true,"options":{{"temperature":0.7}}}}"#,
        turns.join(",")
    );
    let image: String = (0..(1 << 20))
        .map(|i| {
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[i % 64] as char
        })
        .collect();
    let vision = format!(
        r#"{{"model":"llava","messages":[{{"role":"user","content":"what is in this picture?","images":["{image}"]}}],"stream":false}}"#
    );
    vec![
        ("chat_small", small.to_vec()),
        ("chat_history", history.into_bytes()),
        ("chat_image", vision.into_bytes()),
    ]
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("classify");
    let method = http::Method::POST;
    for path in ["/api/chat", "/v1/chat/completions", "/some/unknown/path"] {
        g.bench_function(path.trim_start_matches('/').replace('/', "_"), |b| {
            b.iter(|| route::classify(&method, black_box(path)))
        });
    }
    g.finish();

    let bodies = bodies();
    for (group, run) in [
        (
            "inspect",
            (|b: &[u8]| body::inspect(b).is_ok()) as fn(&[u8]) -> bool,
        ),
        ("depth", |b: &[u8]| !json_too_deep(b, MAX_JSON_DEPTH)),
    ] {
        let mut g = c.benchmark_group(group);
        for (name, body) in &bodies {
            g.throughput(Throughput::Bytes(body.len() as u64));
            g.bench_function(*name, |b| {
                b.iter(|| assert!(run(black_box(body))));
            });
        }
        g.finish();
    }
}

criterion_group!(benches, parse);
criterion_main!(benches);
