//! The stream tap's cost: `cargo bench --bench tap`.
//!
//! Each benchmark pushes one whole response (4,096 tokens and the final chunk) through
//! `StreamTap::observe`, chunk by chunk, and reports bytes per second. `copy` is the baseline: a
//! loop that copies every chunk into a buffer, which is less than what relaying a chunk costs.
//!
//! - `ndjson_lines/*`: a native `/api/chat` stream, one line per chunk (as Ollama flushes it);
//! - `sse_events/*`: an OpenAI `/v1/chat/completions` stream with usage, one event per chunk;
//! - `ndjson_16k/*`: the native stream in 16 KiB chunks (lines split across chunks);
//! - `embed_json/*`: a non-streamed `/api/embed` answer (4 × 768 floats, about 40 KiB, in 16 KiB
//!   chunks): the tap keeps its last 4 KiB and scans them for `prompt_eval_count`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ollama_sidecar::proxy::tap::StreamTap;
use std::hint::black_box;
use std::time::Duration;

const TOKENS: usize = 4096;

fn native_stream() -> Vec<Vec<u8>> {
    let mut chunks = Vec::with_capacity(TOKENS + 1);
    for i in 0..TOKENS {
        chunks.push(
            format!(
                "{{\"model\":\"llama3.2\",\"created_at\":\"2025-01-01T00:00:00.{i:09}Z\",\"message\":{{\"role\":\"assistant\",\"content\":\"tok{i} \"}},\"done\":false}}\n"
            )
            .into_bytes(),
        );
    }
    chunks.push(b"{\"model\":\"llama3.2\",\"created_at\":\"2025-01-01T00:00:01Z\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done_reason\":\"stop\",\"done\":true,\"total_duration\":1,\"load_duration\":1,\"prompt_eval_count\":26,\"prompt_eval_duration\":1,\"eval_count\":4096,\"eval_duration\":1}\n".to_vec());
    chunks
}

fn openai_stream() -> Vec<Vec<u8>> {
    let head = "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"llama3.2\",\"system_fingerprint\":\"fp_ollama\",\"choices\":[";
    let mut chunks = Vec::with_capacity(TOKENS + 3);
    for i in 0..TOKENS {
        chunks.push(format!("data: {head}{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"tok{i} \"}},\"finish_reason\":null}}]}}\n\n").into_bytes());
    }
    chunks.push(format!("data: {head}{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":\"stop\"}}]}}\n\n").into_bytes());
    chunks.push(format!("data: {head}],\"usage\":{{\"prompt_tokens\":26,\"completion_tokens\":4096,\"total_tokens\":4122}}}}\n\n").into_bytes());
    chunks.push(b"data: [DONE]\n\n".to_vec());
    chunks
}

fn embed_answer() -> Vec<u8> {
    let vector: Vec<String> = (0..768)
        .map(|i| format!("{:.9}", (i as f64 * 0.37).sin()))
        .collect();
    let vector = format!("[{}]", vector.join(","));
    let vectors = vec![vector; 4].join(",");
    format!("{{\"model\":\"nomic-embed-text\",\"embeddings\":[{vectors}],\"total_duration\":14143917,\"load_duration\":1019500,\"prompt_eval_count\":{TOKENS}}}").into_bytes()
}

fn rechunk(chunks: &[Vec<u8>], size: usize) -> Vec<Vec<u8>> {
    let all: Vec<u8> = chunks.concat();
    all.chunks(size).map(<[u8]>::to_vec).collect()
}

fn bench(c: &mut Criterion, name: &str, content_type: &str, chunks: &[Vec<u8>]) {
    let total: usize = chunks.iter().map(Vec::len).sum();
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(total as u64));
    group.bench_function("tap", |b| {
        b.iter(|| {
            let mut tap = StreamTap::default();
            tap.start(Some(content_type));
            for (i, chunk) in chunks.iter().enumerate() {
                tap.observe(black_box(chunk), Duration::from_micros(i as u64));
            }
            tap.finish(Duration::from_secs(1));
            let s = tap.summary();
            assert_eq!(s.completion_tokens.or(s.prompt_tokens), Some(TOKENS as u64));
            black_box(s.first_token)
        })
    });
    group.bench_function("copy", |b| {
        let mut buf = Vec::with_capacity(64 * 1024);
        b.iter(|| {
            let mut n = 0;
            for chunk in chunks {
                buf.clear();
                buf.extend_from_slice(black_box(chunk));
                n += black_box(&buf).len();
            }
            n
        })
    });
    group.finish();
}

fn tap(c: &mut Criterion) {
    let native = native_stream();
    bench(c, "ndjson_lines", "application/x-ndjson", &native);
    bench(c, "sse_events", "text/event-stream", &openai_stream());
    bench(
        c,
        "ndjson_16k",
        "application/x-ndjson",
        &rechunk(&native, 16 * 1024),
    );
    bench(
        c,
        "embed_json",
        "application/json",
        &rechunk(&[embed_answer()], 16 * 1024),
    );
}

criterion_group!(benches, tap);
criterion_main!(benches);
