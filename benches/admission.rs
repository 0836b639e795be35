//! Admission decisions with a deep queue: `cargo bench --bench admission`.
//!
//! - `release_grant/*`: one slot, 10,000 waiters. Each iteration drops the held permit (release →
//!   fairness pick → instance choice → permit sent to the next waiter), queues one replacement
//!   waiter (so the depth stays 10,000) and takes the granted permit: two decisions per iteration.
//! - `refuse_full`: the queue is at `max_queued` (10,000); a new request is refused.
//! - `fast_path`: a free slot and an empty queue: admit, then release.
//! - `enqueue_cancel`: 10,000 waiters; queue one more and drop it (cancel).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ollama_sidecar::admission::{Admission, AdmitRequest, Admitted, Permit, Waiting};
use ollama_sidecar::config::{ByteSize, InstanceConfig, QueueConfig, UpstreamAddress};
use ollama_sidecar::upstream::{Instance, InstanceState};
use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

const DEPTH: usize = 10_000;

fn instances(n: usize, slots: usize) -> Vec<Arc<Instance>> {
    (0..n)
        .map(|i| {
            let config = InstanceConfig {
                name: format!("i{i}"),
                upstream: UpstreamAddress {
                    host: "127.0.0.1".to_string(),
                    port: 11434 + i as u16,
                    tls: false,
                },
                num_parallel: slots,
                supervised: None,
            };
            let instance = Instance::new(i, &config, &Default::default());
            // External instances start unready until their first health check.
            instance.set_state(InstanceState::Ready);
            Arc::new(instance)
        })
        .collect()
}

fn admission(n_instances: usize, slots: usize) -> Arc<Admission> {
    let config = QueueConfig {
        max_queued: DEPTH,
        max_queued_bytes: ByteSize(u64::MAX),
        max_wait: Duration::from_secs(3600),
        aging: Duration::from_secs(3600),
        ..QueueConfig::default()
    };
    Admission::new(config, instances(n_instances, slots))
}

fn request(client: &Arc<str>) -> AdmitRequest {
    AdmitRequest {
        client: client.clone(),
        priority: 0,
        model: Some("llama3.2:latest".to_string()),
        body_bytes: 2_048,
        avoid: None,
    }
}

fn permit(adm: &Admission, client: &Arc<str>) -> Permit {
    match adm.admit(request(client)) {
        Ok(Admitted::Now(p)) => p,
        _ => panic!("expected a free slot"),
    }
}

fn waiter(adm: &Admission, client: &Arc<str>) -> Waiting {
    match adm.admit(request(client)) {
        Ok(Admitted::Queued(w)) => w,
        _ => panic!("expected to queue"),
    }
}

/// One busy slot and `DEPTH` waiters spread over `clients` clients, queued in the order the
/// round robin serves them, so the next grant always goes to the front of `queue`.
struct Steady {
    adm: Arc<Admission>,
    held: Option<Permit>,
    queue: VecDeque<(usize, Waiting)>,
    names: Vec<Arc<str>>,
    next_name: usize,
    distinct: bool,
}

impl Steady {
    fn new(clients: usize, distinct: bool) -> Steady {
        let adm = admission(1, 1);
        let names: Vec<Arc<str>> = (0..clients.max(2 * DEPTH))
            .map(|i| Arc::from(format!("client-{i}")))
            .collect();
        let held = Some(permit(&adm, &names[0]));
        let queue = (0..DEPTH)
            .map(|i| {
                let c = if distinct { i } else { i % clients };
                (c, waiter(&adm, &names[c]))
            })
            .collect();
        Steady {
            adm,
            held,
            queue,
            names,
            next_name: DEPTH,
            distinct,
        }
    }

    fn cycle(&mut self) {
        // Decision 1: release → dispatch to the next waiter.
        drop(self.held.take());
        let (client, mut granted) = self.queue.pop_front().expect("queue never empties");
        let p = match granted.try_take() {
            Some(Ok(p)) => p,
            _ => panic!("the front waiter was not the one granted"),
        };
        self.held = Some(black_box(p));
        // Decision 2: queue a replacement (a new client, or the served one again).
        let c = if self.distinct {
            let c = self.next_name;
            self.next_name = (self.next_name + 1) % self.names.len();
            c
        } else {
            client
        };
        let w = waiter(&self.adm, &self.names[c]);
        self.queue.push_back((c, w));
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("admission");
    g.throughput(Throughput::Elements(1));

    for (label, clients, distinct) in [
        ("release_grant_enqueue/10k_waiters_100_clients", 100, false),
        ("release_grant_enqueue/10k_waiters_10k_clients", DEPTH, true),
    ] {
        let mut s = Steady::new(clients, distinct);
        g.bench_function(label, |b| b.iter(|| s.cycle()));
        let snap = s.adm.snapshot();
        assert_eq!(snap.queued, DEPTH);
        assert_eq!(snap.counters.admitted, snap.counters.released + 1);
    }

    {
        let adm = admission(1, 1);
        let name: Arc<str> = Arc::from("flood");
        let _held = permit(&adm, &name);
        let _queue: Vec<Waiting> = (0..DEPTH).map(|_| waiter(&adm, &name)).collect();
        let other: Arc<str> = Arc::from("other");
        g.bench_function("refuse_full/10k_waiters", |b| {
            b.iter(|| black_box(adm.admit(request(&other)).is_err()))
        });
    }

    {
        let adm = admission(4, 4);
        let name: Arc<str> = Arc::from("solo");
        g.bench_function("fast_path_admit_release/empty_queue_4_instances", |b| {
            b.iter(|| drop(black_box(permit(&adm, &name))))
        });
    }

    {
        let adm = admission(1, 1);
        let names: Vec<Arc<str>> = (0..100).map(|i| Arc::from(format!("c{i}"))).collect();
        let _held = permit(&adm, &names[0]);
        let _queue: Vec<Waiting> = (0..DEPTH - 1)
            .map(|i| waiter(&adm, &names[i % 100]))
            .collect();
        let mut i = 0;
        g.bench_function("enqueue_cancel/10k_waiters_100_clients", |b| {
            b.iter_batched(
                || {
                    i += 1;
                    names[i % 100].clone()
                },
                |n| drop(black_box(waiter(&adm, &n))),
                BatchSize::SmallInput,
            )
        });
    }

    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
