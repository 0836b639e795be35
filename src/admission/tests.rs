use super::*;
use crate::config::{ByteSize, InstanceConfig, UpstreamAddress};
use crate::upstream::InstanceState;
use rand::Rng;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A ready instance `i<index>` with `slots` slots (also used by `placement`'s tests).
pub(super) fn instance(index: usize, slots: usize) -> Arc<Instance> {
    let config = InstanceConfig {
        name: format!("i{index}"),
        upstream: UpstreamAddress {
            host: "127.0.0.1".to_string(),
            port: 11434 + index as u16,
            tls: false,
        },
        num_parallel: slots,
        supervised: None,
    };
    let inst = Arc::new(Instance::new(index, &config, &Default::default()));
    inst.set_state(InstanceState::Ready);
    inst
}

fn config(max_queued: usize) -> QueueConfig {
    QueueConfig {
        max_queued,
        ..QueueConfig::default()
    }
}

fn req(client: &str) -> AdmitRequest {
    AdmitRequest::new(client)
}

fn now(adm: &Arc<Admission>, r: AdmitRequest) -> Permit {
    match adm.admit(r) {
        Ok(Admitted::Now(p)) => p,
        Ok(Admitted::Queued(_)) => panic!("expected a permit at once, got queued"),
        Err(e) => panic!("expected a permit at once, got {e}"),
    }
}

fn queued(adm: &Arc<Admission>, r: AdmitRequest) -> Waiting {
    match adm.admit(r) {
        Ok(Admitted::Queued(w)) => w,
        Ok(Admitted::Now(p)) => panic!("expected to queue, got a permit on {}", p.instance().name),
        Err(e) => panic!("expected to queue, got {e}"),
    }
}

/// Finds the waiter that holds a permit (exactly one must), removing it from `waiting`.
fn take_granted<L: Copy>(waiting: &mut Vec<(L, Waiting)>) -> (L, Permit) {
    let mut found = None;
    for (i, (_, w)) in waiting.iter_mut().enumerate() {
        match w.try_take() {
            Some(Ok(p)) => {
                assert!(found.is_none(), "two waiters granted for one free slot");
                found = Some((i, p));
            }
            Some(Err(e)) => panic!("unexpected refusal {e}"),
            None => {}
        }
    }
    let (i, p) = found.expect("no waiter was granted");
    let (label, _) = waiting.remove(i);
    (label, p)
}

/// Every request ended in exactly one outcome.
fn assert_accounted(s: &AdmissionSnapshot, requests: u64) {
    let c = s.counters;
    assert_eq!(c.admitted, c.released + s.held() as u64, "{s:?}");
    assert_eq!(
        c.admitted - c.undelivered
            + c.refused_full
            + c.refused_bytes
            + c.expired
            + c.cancelled
            + c.closed,
        requests,
        "{s:?}"
    );
}

async fn until_queued(adm: &Arc<Admission>, n: usize) {
    // Yield first (enough on a current-thread runtime, and keeps paused clocks still), then
    // sleep: other test binaries may hold the CPUs.
    for i in 0..6_000 {
        if adm.snapshot().queued == n {
            return;
        }
        if i < 1_000 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    panic!("never saw {n} queued: {:?}", adm.snapshot());
}

/// On paused time: one instance with one slot, held by the returned permit.
fn one_held_slot(max_wait: Duration, aging: Duration) -> (Arc<Admission>, Permit) {
    tokio::time::pause();
    let cfg = QueueConfig {
        max_wait,
        aging,
        ..config(100)
    };
    let adm = Admission::new(cfg, vec![instance(0, 1)]);
    let held = now(&adm, req("h"));
    (adm, held)
}

/// Holds the slot for `service`, gives it back, and returns who got it next.
async fn serve_next<L: Copy>(
    held: Permit,
    waiting: &mut Vec<(L, Waiting)>,
    service: Duration,
) -> (L, Permit) {
    tokio::time::advance(service).await;
    drop(held);
    take_granted(waiting)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_never_exceed_num_parallel() {
    let instances = vec![instance(0, 2), instance(1, 3)];
    let adm = Admission::new(config(1000), instances.clone());
    let current: Arc<Vec<AtomicUsize>> = Arc::new((0..2).map(|_| AtomicUsize::new(0)).collect());
    let peak: Arc<Vec<AtomicUsize>> = Arc::new((0..2).map(|_| AtomicUsize::new(0)).collect());
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let adm = adm.clone();
        let (current, peak) = (current.clone(), peak.clone());
        let hold = rand::rng().random_range(0..2000u64);
        tasks.push(tokio::spawn(async move {
            let permit = adm
                .acquire(req(&format!("c{}", i % 7)).priority((i % 3) as i32))
                .await
                .expect("admitted");
            let idx = permit.instance().index;
            let now = current[idx].fetch_add(1, Ordering::SeqCst) + 1;
            peak[idx].fetch_max(now, Ordering::SeqCst);
            let snap = adm.snapshot();
            assert!(snap.slots.iter().all(|s| s.busy <= s.slots), "{snap:?}");
            tokio::time::sleep(Duration::from_micros(hold)).await;
            current[idx].fetch_sub(1, Ordering::SeqCst);
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert!(peak[0].load(Ordering::SeqCst) <= 2);
    assert!(peak[1].load(Ordering::SeqCst) <= 3);
    assert!(peak[0].load(Ordering::SeqCst) + peak[1].load(Ordering::SeqCst) >= 2);
    let s = adm.snapshot();
    assert_eq!(s.queued, 0);
    assert_eq!(s.queued_bytes, 0);
    assert_eq!(s.clients_queued, 0);
    assert_eq!(s.held(), 0);
    assert_eq!(s.counters.admitted, 200);
    assert_eq!(s.counters.released, 200);
    assert_accounted(&s, 200);
}

#[tokio::test]
async fn fast_path_grants_at_once() {
    let adm = Admission::new(config(10), vec![instance(0, 2)]);
    let a = now(&adm, req("a"));
    let b = now(&adm, req("b"));
    assert_eq!(a.waited(), Duration::ZERO);
    assert_eq!(adm.snapshot().held(), 2);
    let w = queued(&adm, req("c"));
    drop(a);
    drop(b);
    drop(w);
    let s = adm.snapshot();
    assert_eq!(s.held(), 0);
    assert_accounted(&s, 3);
}

#[tokio::test]
async fn fairness_newcomer_within_two_grants() {
    let adm = Admission::new(config(1000), vec![instance(0, 1)]);
    let mut held = now(&adm, req("x"));
    let mut waiting: Vec<(&str, Waiting)> =
        (0..100).map(|_| ("a", queued(&adm, req("a")))).collect();
    waiting.push(("b", queued(&adm, req("b"))));
    assert_eq!(adm.snapshot().clients_queued, 2);
    let mut order = Vec::new();
    for _ in 0..3 {
        drop(held);
        let (who, p) = take_granted(&mut waiting);
        order.push(who);
        held = p;
    }
    let b_at = order.iter().position(|w| *w == "b").expect("b granted");
    assert!(b_at < 2, "b granted as #{}: {order:?}", b_at + 1);
    drop(held);
    drop(waiting);
    let s = adm.snapshot();
    assert_eq!(s.queued, 0);
    assert_eq!(s.held(), 0);
    assert_eq!(s.counters.cancelled, 98);
    assert_accounted(&s, 102);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fairness_with_acquire_futures() {
    let adm = Admission::new(config(1000), vec![instance(0, 1)]);
    let held = now(&adm, req("x"));
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..101 {
        let client = if i < 100 { "a" } else { "b" };
        let (adm2, order) = (adm.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let p = adm2.acquire(req(client)).await.expect("admitted");
            if let Ok(mut o) = order.lock() {
                o.push(client);
            }
            drop(p);
        }));
        until_queued(&adm, i + 1).await;
    }
    drop(held);
    for t in tasks {
        t.await.expect("task");
    }
    let order = order.lock().map(|o| o.clone()).unwrap_or_default();
    let b_at = order.iter().position(|w| *w == "b").expect("b ran");
    assert!(b_at < 2, "b granted as #{}", b_at + 1);
    assert_accounted(&adm.snapshot(), 102);
}

#[tokio::test]
async fn fifo_within_a_client() {
    let adm = Admission::new(config(100), vec![instance(0, 1)]);
    let mut held = now(&adm, req("a"));
    let mut waiting: Vec<(usize, Waiting)> = (0..20).map(|i| (i, queued(&adm, req("a")))).collect();
    // Another client interleaved must not disturb a's order.
    waiting.push((100, queued(&adm, req("b"))));
    let mut a_order = Vec::new();
    for _ in 0..21 {
        drop(held);
        let (i, p) = take_granted(&mut waiting);
        if i < 100 {
            a_order.push(i);
        }
        held = p;
    }
    assert_eq!(a_order, (0..20).collect::<Vec<_>>());
    drop(held);
    assert_accounted(&adm.snapshot(), 22);
}

#[tokio::test]
async fn priority_first_and_aging_prevents_starvation() {
    let (adm, mut held) = one_held_slot(Duration::from_secs(600), Duration::from_secs(30));
    let mut waiting = vec![("low", queued(&adm, req("low")))];
    let mut low_at = None;
    let mut requests = 2;
    // A steady high-priority stream: two high waiters always queued, 10 s of service each.
    for round in 0..50 {
        while waiting.iter().filter(|(w, _)| *w == "high").count() < 2 {
            waiting.push(("high", queued(&adm, req("high").priority(3))));
            requests += 1;
        }
        let (who, p) = serve_next(held, &mut waiting, Duration::from_secs(10)).await;
        held = p;
        if who == "low" {
            low_at = Some(round);
            break;
        }
    }
    let low_at = low_at.expect("low-priority waiter starved");
    // Priority 3 outranks it for about three aging periods (30 s each, 10 s per grant).
    assert!((6..=12).contains(&low_at), "low served in round {low_at}");
    assert!(
        held.waited() >= Duration::from_secs(60),
        "{:?}",
        held.waited()
    );
    drop(held);
    drop(waiting);
    assert_accounted(&adm.snapshot(), requests);
}

#[tokio::test]
async fn queue_full_and_bytes_full_refuse_at_once() {
    let cfg = QueueConfig {
        max_queued: 2,
        max_queued_bytes: ByteSize(100),
        ..QueueConfig::default()
    };
    let adm = Admission::new(cfg, vec![instance(0, 1)]);
    let held = now(&adm, req("a").body_bytes(1_000)); // the fast path holds no queue bytes
    let w1 = queued(&adm, req("a").body_bytes(60));
    assert_eq!(
        adm.admit(req("b").body_bytes(50)).err(),
        Some(Refusal::QueueBytesFull)
    );
    let w2 = queued(&adm, req("b").body_bytes(40));
    assert_eq!(adm.admit(req("c")).err(), Some(Refusal::QueueFull));
    assert_eq!(adm.acquire(req("c")).await.err(), Some(Refusal::QueueFull));
    let s = adm.snapshot();
    assert_eq!((s.queued, s.queued_bytes, s.clients_queued), (2, 100, 2));
    assert_eq!(s.counters.refused_full, 2);
    assert_eq!(s.counters.refused_bytes, 1);
    drop((held, w1, w2));
    assert_accounted(&adm.snapshot(), 6);
}

#[tokio::test]
async fn wait_expires_and_removes_the_waiter() {
    tokio::time::pause();
    let cfg = QueueConfig {
        max_wait: Duration::from_secs(5),
        ..config(10)
    };
    let adm = Admission::new(cfg, vec![instance(0, 1)]);
    let held = now(&adm, req("a"));
    let adm2 = adm.clone();
    let task = tokio::spawn(async move { adm2.acquire(req("b").body_bytes(7)).await });
    until_queued(&adm, 1).await;
    tokio::time::advance(Duration::from_secs(6)).await;
    match task.await.expect("task") {
        Err(Refusal::WaitExpired { waited }) => assert!(waited >= Duration::from_secs(5)),
        other => panic!("expected WaitExpired, got {other:?}"),
    }
    let s = adm.snapshot();
    assert_eq!((s.queued, s.queued_bytes), (0, 0));
    assert_eq!(s.counters.expired, 1);
    drop(held);
    let s = adm.snapshot();
    assert_eq!(s.held(), 0);
    assert_accounted(&s, 2);
}

#[tokio::test]
async fn dropping_a_queued_acquire_cancels_it() {
    let adm = Admission::new(config(10), vec![instance(0, 1)]);
    let held = now(&adm, req("a"));
    let adm2 = adm.clone();
    let task = tokio::spawn(async move { adm2.acquire(req("b").body_bytes(9)).await });
    until_queued(&adm, 1).await;
    task.abort();
    assert!(task.await.is_err());
    let s = adm.snapshot();
    assert_eq!((s.queued, s.queued_bytes, s.clients_queued), (0, 0, 0));
    assert_eq!(s.counters.cancelled, 1);
    drop(held);
    // The slot was not leaked: it is free for the next request.
    let p = now(&adm, req("c"));
    drop(p);
    let s = adm.snapshot();
    assert_eq!(s.held(), 0);
    assert_accounted(&s, 3);
}

#[tokio::test]
async fn permit_sent_to_a_departed_waiter_comes_back() {
    let adm = Admission::new(config(10), vec![instance(0, 1)]);
    let held = now(&adm, req("a"));
    let w = queued(&adm, req("b"));
    let w2 = queued(&adm, req("c"));
    drop(held); // the permit now sits in w's channel
    drop(w); // ... and must go on to w2
    let mut w2 = vec![("c", w2)];
    let (_, p) = take_granted(&mut w2);
    let s = adm.snapshot();
    assert_eq!(s.counters.undelivered, 1);
    assert_eq!(s.counters.cancelled, 1);
    drop(p);
    let s = adm.snapshot();
    assert_eq!(s.held(), 0);
    assert_accounted(&s, 3);
}

#[test]
fn grant_racing_a_drop_never_leaks() {
    let adm = Admission::new(config(10), vec![instance(0, 1)]);
    let rounds = 2_000u64;
    for _ in 0..rounds {
        let held = now(&adm, req("a"));
        let w = queued(&adm, req("b"));
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let b2 = barrier.clone();
        let t = std::thread::spawn(move || {
            b2.wait();
            drop(held);
        });
        barrier.wait();
        drop(w);
        t.join().expect("thread");
        let s = adm.snapshot();
        assert_eq!((s.queued, s.held()), (0, 0), "{s:?}");
    }
    let s = adm.snapshot();
    assert_eq!(s.counters.cancelled, rounds);
    eprintln!(
        "grant/drop race: {} of {rounds} drops lost to a grant",
        s.counters.undelivered
    );
    assert_accounted(&s, 2 * rounds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_futures_racing_grants_never_leak() {
    let adm = Admission::new(config(1000), vec![instance(0, 2)]);
    let mut tasks = Vec::new();
    for i in 0..300u64 {
        let adm = adm.clone();
        tasks.push(tokio::spawn(async move {
            let fut = adm.acquire(req(&format!("c{}", i % 5)));
            // Give up after a random short time: sometimes queued, sometimes mid-grant.
            let give_up = Duration::from_micros(rand::rng().random_range(0..300));
            if let Ok(Ok(p)) = tokio::time::timeout(give_up, fut).await {
                tokio::time::sleep(Duration::from_micros(100)).await;
                drop(p);
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let s = adm.snapshot();
    assert_eq!((s.queued, s.held()), (0, 0), "{s:?}");
    assert_accounted(&s, 300);
    now(&adm, req("z"));
}

#[tokio::test]
async fn no_ready_instance_waits_then_poke_grants() {
    let inst = instance(0, 1);
    inst.set_state(InstanceState::Starting);
    let adm = Admission::new(config(10), vec![inst.clone()]);
    let adm2 = adm.clone();
    let task = tokio::spawn(async move { adm2.acquire(req("a").model("m:latest")).await });
    until_queued(&adm, 1).await;
    adm.poke(); // still not ready: nothing happens
    tokio::task::yield_now().await;
    assert_eq!(adm.snapshot().queued, 1);
    inst.set_state(InstanceState::Ready);
    adm.poke();
    let p = task.await.expect("task").expect("admitted after poke");
    assert_eq!(p.instance().index, 0);
    assert!(inst.has_model("m:latest"));
    drop(p);
    assert_accounted(&adm.snapshot(), 1);
}

#[tokio::test]
async fn queued_waiters_go_before_a_newcomer_after_an_unpoked_ready() {
    let inst = instance(0, 1);
    inst.set_state(InstanceState::Stopped);
    let adm = Admission::new(config(10), vec![inst.clone()]);
    let mut w = vec![("old", queued(&adm, req("old")))];
    inst.set_state(InstanceState::Ready); // nobody pokes
    let newcomer = queued(&adm, req("new"));
    let (_, p) = take_granted(&mut w);
    drop(p);
    let mut n = vec![("new", newcomer)];
    let (_, p) = take_granted(&mut n);
    drop(p);
    assert_accounted(&adm.snapshot(), 2);
}

#[tokio::test]
async fn model_affinity_then_idle_then_most_free() {
    let instances = vec![instance(0, 3), instance(1, 2), instance(2, 2)];
    instances[0].set_loaded_models(vec!["other:latest".into()]);
    instances[1].set_loaded_models(vec!["m:latest".into()]);
    let adm = Admission::new(config(10), instances.clone());
    let p1 = now(&adm, req("a").model("m:latest"));
    assert_eq!(p1.instance().index, 1, "model loaded");
    let p2 = now(&adm, req("a").model("n:latest"));
    assert_eq!(p2.instance().index, 2, "idle instance");
    assert!(instances[2].has_model("n:latest"), "note_model on grant");
    let p3 = now(&adm, req("a").model("q:latest"));
    assert_eq!(p3.instance().index, 0, "most free slots");
    // The model-loaded instance is preferred even with fewer free slots.
    let p4 = now(&adm, req("a").model("m:latest"));
    assert_eq!(p4.instance().index, 1);
    // Full there: next best is the most free slots.
    let p5 = now(&adm, req("a").model("m:latest"));
    assert_eq!(p5.instance().index, 0);
    // Queued waiters get the same choice when a slot frees.
    let p6 = now(&adm, req("a"));
    let p7 = now(&adm, req("a"));
    let mut w = vec![("w", queued(&adm, req("b").model("n:latest")))];
    drop(p1); // frees a slot on instance 1 only
    let (_, p8) = take_granted(&mut w);
    assert_eq!(p8.instance().index, 1);
    drop((p2, p3, p4, p5, p6, p7, p8));
    let s = adm.snapshot();
    assert_eq!(s.held(), 0);
    assert_accounted(&s, 8);
}

#[tokio::test]
async fn ties_rotate() {
    let adm = Admission::new(config(10), vec![instance(0, 1), instance(1, 1)]);
    let mut seen = [0usize; 2];
    for _ in 0..10 {
        let p = now(&adm, req("a"));
        seen[p.instance().index] += 1;
    }
    assert_eq!(seen, [5, 5]);
}

#[tokio::test]
async fn close_refuses_waiters_and_later_requests() {
    let adm = Admission::new(config(10), vec![instance(0, 1)]);
    let held = now(&adm, req("a"));
    let mut tasks = Vec::new();
    for i in 0..3 {
        let adm2 = adm.clone();
        tasks.push(tokio::spawn(async move { adm2.acquire(req("b")).await }));
        until_queued(&adm, i + 1).await;
    }
    adm.close();
    for t in tasks {
        assert_eq!(t.await.expect("task").err(), Some(Refusal::Closed));
    }
    assert_eq!(adm.acquire(req("c")).await.err(), Some(Refusal::Closed));
    drop(held);
    let s = adm.snapshot();
    assert!(s.closed);
    assert_eq!(s.counters.closed, 4);
    assert_eq!((s.queued, s.held()), (0, 0));
    assert_accounted(&s, 5);
}

#[tokio::test]
async fn degenerate_configurations_do_not_panic() {
    tokio::time::pause();
    // No instances at all: requests wait, then expire.
    let cfg = QueueConfig {
        max_wait: Duration::from_millis(10),
        aging: Duration::ZERO,
        ..config(10)
    };
    let adm = Admission::new(cfg, Vec::new());
    adm.poke();
    assert!(matches!(
        adm.acquire(req("a")).await,
        Err(Refusal::WaitExpired { .. })
    ));
    // No queue: refused when busy. Zero slots: never granted.
    let adm = Admission::new(config(0), vec![instance(0, 1), instance(1, 0)]);
    let p = now(&adm, req("a"));
    assert_eq!(adm.admit(req("b")).err(), Some(Refusal::QueueFull));
    drop(p);
    // Huge max_wait and extreme priorities.
    let cfg = QueueConfig {
        max_wait: Duration::MAX,
        aging: Duration::from_nanos(1),
        ..config(10)
    };
    let adm = Admission::new(cfg, vec![instance(0, 1)]);
    let held = now(&adm, req("a").priority(i32::MIN));
    let mut w = vec![
        (1, queued(&adm, req("b").priority(i32::MIN))),
        (2, queued(&adm, req("c").priority(i32::MAX))),
    ];
    tokio::time::advance(Duration::from_secs(1)).await;
    drop(held);
    let (who, p) = take_granted(&mut w);
    assert_eq!(who, 2);
    drop(p);
    let (who, p) = take_granted(&mut w);
    assert_eq!(who, 1);
    drop(p);
    assert_accounted(&adm.snapshot(), 3);
}

#[tokio::test]
async fn snapshot_reports_queue_shape() {
    tokio::time::pause();
    let adm = Admission::new(config(10), vec![instance(0, 1)]);
    let held = now(&adm, req("a"));
    let w1 = queued(&adm, req("a").body_bytes(5));
    tokio::time::advance(Duration::from_secs(3)).await;
    let w2 = queued(&adm, req("b").body_bytes(6));
    let s = adm.snapshot();
    assert_eq!((s.queued, s.queued_bytes, s.clients_queued), (2, 11, 2));
    assert_eq!(s.oldest_wait, Some(Duration::from_secs(3)));
    assert_eq!(s.slots[0].busy, 1);
    assert_eq!(s.slots[0].slots, 1);
    drop(w1);
    assert_eq!(adm.snapshot().oldest_wait, Some(Duration::ZERO));
    drop((w2, held));
    assert_eq!(adm.snapshot().oldest_wait, None);
}

#[tokio::test(start_paused = true)]
async fn waits_for_a_near_warm_slot_never_longer_than_a_load() {
    let instances = vec![instance(0, 1), instance(1, 1)];
    instances[0].set_loaded_models(vec!["m:latest".into()]);
    // Instance 1 was seen holding one model: it holds one at a time.
    instances[1].set_loaded_models(vec!["x:latest".into()]);
    instances[1].set_loaded_models(vec![]);
    let adm = Admission::new(config(10), instances.clone());
    // Learn: m is served in 100 ms where it is warm; loading n took 600 ms.
    let p = now(&adm, req("a").model("m:latest"));
    assert_eq!(p.reason(), Reason::ModelLoaded);
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(p);
    let p = now(&adm, req("a").model("n:latest"));
    assert_eq!((p.instance().index, p.reason()), (1, Reason::ColdLoad));
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(p);

    // m's warm slot is busy, instance 1 is free: a warm slot (~100 ms) beats a load (600 ms).
    let busy = now(&adm, req("a").model("m:latest"));
    let mut w = queued(&adm, req("b").model("m:latest"));
    // Meanwhile another client's request for n takes the free slot: no head-of-line blocking.
    let mut o = queued(&adm, req("c").model("n:latest"));
    let other = o.try_take().expect("granted").expect("permit");
    assert_eq!(other.instance().index, 1);
    drop(other);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(w.try_take().is_none(), "still waiting for the warm slot");
    drop(busy);
    let p = w.try_take().expect("granted").expect("permit");
    assert_eq!((p.instance().index, p.reason()), (0, Reason::ModelLoaded));

    // The warm slot stays busy: the waiter loads m elsewhere after a load's cost, here two
    // load times (600 ms each), as the load evicts n, asked for just now.
    let mut w = queued(&adm, req("b").model("m:latest"));
    tokio::time::sleep(Duration::from_millis(1150)).await;
    assert!(w.try_take().is_none());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let p2 = w.try_take().expect("granted").expect("permit");
    assert_eq!(
        (p2.instance().index, p2.reason()),
        (1, Reason::ColdLoadWarmBusy)
    );
    // Loading m there evicted n in the sidecar's view at once.
    assert!(instances[1].has_model("m:latest"));
    assert!(!instances[1].has_model("n:latest"));
    let s = adm.snapshot();
    assert_eq!(s.placement[1].evictions, 1);
    assert_eq!(s.placement[0].warm_waits, 1);
    drop((p, p2));
    assert_accounted(&adm.snapshot(), 6);
}

#[tokio::test(start_paused = true)]
async fn a_cold_load_goes_where_it_evicts_nothing_else_the_model_asked_longest_ago() {
    // Each instance was seen holding two models at once.
    let instances = vec![instance(0, 1), instance(1, 1), instance(2, 1)];
    for (inst, models) in instances.iter().zip([["a", "b"], ["c", "d"], ["e", "f"]]) {
        inst.set_loaded_models(models.iter().map(|m| format!("{m}:latest")).collect());
    }
    instances[2].set_loaded_models(vec!["e:latest".into()]);
    let adm = Admission::new(config(10), instances.clone());
    // Instance 2 holds one model of two: loading there evicts nothing.
    let p = now(&adm, req("x").model("n:latest"));
    assert_eq!((p.instance().index, p.reason()), (2, Reason::ColdLoad));
    drop(p);
    assert_eq!(adm.snapshot().placement[2].evictions, 0);
    // Every instance is full now. A load evicts the first idle model by name (Ollama's order):
    // a, c or e. c was asked for longest ago: the load goes to instance 1 and evicts c.
    for m in ["c", "a", "e"] {
        tokio::time::advance(Duration::from_millis(10)).await;
        drop(now(&adm, req("x").model(format!("{m}:latest"))));
    }
    let p = now(&adm, req("y").model("z:latest"));
    assert_eq!((p.instance().index, p.reason()), (1, Reason::ColdLoad));
    assert!(!instances[1].has_model("c:latest"));
    assert!(instances[1].has_model("d:latest"));
    assert!(instances[1].has_model("z:latest"));
    assert_eq!(adm.snapshot().placement[1].evictions, 1);
}

#[tokio::test]
async fn a_retry_for_a_model_goes_back_to_the_only_instance() {
    let inst = instance(0, 1);
    let adm = Admission::new(config(10), vec![inst]);
    let p = now(&adm, req("a").model("m:latest").avoid(0));
    assert_eq!(p.instance().index, 0);
}

#[tokio::test]
async fn a_waiter_kept_out_only_by_what_it_avoids_lets_its_clients_next_waiter_pass() {
    let adm = Admission::new(config(10), vec![instance(0, 1), instance(1, 1)]);
    let busy = now(&adm, req("other"));
    let free = 1 - busy.instance().index;
    // A retry that avoids the free instance waits for the busy one ...
    let mut retry = queued(&adm, req("c").avoid(free));
    assert!(retry.try_take().is_none());
    // ... and the same client's next request takes the free slot at once.
    let mut next = queued(&adm, req("c"));
    let p = next
        .try_take()
        .expect("granted behind the retry")
        .expect("a permit");
    assert_eq!(p.instance().index, free);
    assert!(retry.try_take().is_none(), "the retry still waits");
    drop(busy);
    let r = retry.try_take().expect("granted").expect("a permit");
    assert_eq!(r.instance().index, 1 - free);
    drop((p, r));
    assert_accounted(&adm.snapshot(), 3);
}

#[tokio::test]
async fn a_client_without_a_retry_ahead_stays_fifo() {
    let inst = instance(0, 1);
    let adm = Admission::new(config(10), vec![inst]);
    let held = now(&adm, req("x"));
    let mut first = queued(&adm, req("c"));
    let mut second = queued(&adm, req("c"));
    drop(held);
    let permit = first.try_take().expect("granted").expect("a permit");
    assert!(second.try_take().is_none(), "FIFO within the client");
    drop(permit);
    assert!(second.try_take().is_some_and(|r| r.is_ok()));
}

#[tokio::test]
async fn past_the_starvation_bound_no_priority_gap_holds_a_waiter_back() {
    let (adm, mut held) = one_held_slot(Duration::from_secs(80), Duration::from_secs(30));
    let mut waiting = vec![("low", queued(&adm, req("low").priority(-100)))];
    let mut low_at = None;
    let mut requests = 2;
    // A steady flood of the highest priority from two clients, 10 s of service each. By aging
    // alone the gap of 200 levels would take 200 x 30 s; the bound is max_wait / 4 = 20 s.
    for round in 0..20 {
        for client in ["high-a", "high-b"] {
            if !waiting.iter().any(|(w, _)| *w == client) {
                waiting.push((client, queued(&adm, req(client).priority(100))));
                requests += 1;
            }
        }
        let (who, p) = serve_next(held, &mut waiting, Duration::from_secs(10)).await;
        held = p;
        if who == "low" {
            low_at = Some(round);
            break;
        }
    }
    let low_at = low_at.expect("the low-priority waiter starved");
    assert!(
        low_at <= 2,
        "served in round {low_at}, after {:?}",
        held.waited()
    );
    assert!(
        held.waited() < Duration::from_secs(40),
        "{:?}",
        held.waited()
    );
    drop(held);
    drop(waiting);
    assert_accounted(&adm.snapshot(), requests);
}

#[tokio::test]
async fn a_request_no_instance_can_serve_in_time_is_refused_at_once() {
    let inst = instance(0, 1);
    inst.set_state(InstanceState::Backoff);
    let cfg = |secs| QueueConfig {
        max_wait: Duration::from_secs(secs),
        ..config(10)
    };
    // Unknown readiness (no schedule): it may be ready any moment, so the request waits.
    let adm = Admission::new(cfg(5), vec![inst.clone()]);
    drop(queued(&adm, req("a")));
    inst.set_ready_not_before(Some((
        std::time::Instant::now() + Duration::from_secs(30),
        "restart backoff",
    )));
    match adm.admit(req("a")) {
        Err(Refusal::NotReadySoon { wait, cause }) => {
            assert!(wait > Duration::from_secs(25), "{wait:?}");
            assert_eq!(cause, "restart backoff");
        }
        _ => panic!("expected a refusal at once"),
    }
    assert_eq!(adm.snapshot().counters.refused_unready, 1);
    // A wait longer than the backoff is worth waiting.
    let patient = Admission::new(cfg(60), vec![inst.clone()]);
    drop(queued(&patient, req("a")));
    // A ready instance is never refused for another's schedule.
    let other = instance(1, 1);
    let fleet = Admission::new(cfg(5), vec![inst, other]);
    drop(now(&fleet, req("a")));
}

#[tokio::test]
async fn waiters_are_refused_when_a_crash_puts_readiness_past_their_wait() {
    let inst = instance(0, 1);
    inst.set_state(InstanceState::Starting);
    let cfg = QueueConfig {
        max_wait: Duration::from_secs(20),
        ..config(10)
    };
    let adm = Admission::new(cfg, vec![inst.clone()]);
    let mut waiting = queued(&adm, req("a"));
    // The instance crashes: its restart is 30 s away, after this waiter's 20 s.
    inst.set_ready_not_before(Some((
        std::time::Instant::now() + Duration::from_secs(30),
        "restart backoff",
    )));
    inst.set_state(InstanceState::Backoff);
    adm.poke();
    match waiting.try_take() {
        Some(Err(Refusal::NotReadySoon { cause, .. })) => assert_eq!(cause, "restart backoff"),
        _ => panic!("expected the waiter to be refused"),
    }
    let s = adm.snapshot();
    assert_eq!((s.queued, s.counters.refused_unready), (0, 1));
    // A backoff that ends within the wait leaves the waiter queued.
    inst.set_ready_not_before(Some((
        std::time::Instant::now() + Duration::from_secs(5),
        "restart backoff",
    )));
    let mut patient = queued(&adm, req("b"));
    adm.poke();
    assert!(patient.try_take().is_none());
}

#[tokio::test]
async fn past_the_starvation_bound_a_flooding_client_still_takes_turns() {
    let (adm, mut held) = one_held_slot(Duration::from_secs(40), Duration::from_secs(30));
    let mut waiting: Vec<(&str, Waiting)> = (0..10)
        .map(|_| ("flood", queued(&adm, req("flood"))))
        .collect();
    // Every flood request is past the bound (10 s) when the newcomer arrives.
    tokio::time::advance(Duration::from_secs(20)).await;
    waiting.push(("new", queued(&adm, req("new"))));
    let mut order = Vec::new();
    for _ in 0..3 {
        let (who, p) = serve_next(held, &mut waiting, Duration::ZERO).await;
        order.push(who);
        held = p;
    }
    // The flood's long-waiting turn goes first; its next turn starts at the back.
    assert_eq!(order, ["flood", "new", "flood"]);
    drop(held);
}

/// Ollama gives each loaded model `num_parallel` slots: on an instance seen holding two models,
/// a request for the second model runs beside the first's, while a second request for the
/// first waits; the instance serves at most two models' worth.
#[tokio::test]
async fn each_model_held_gets_its_own_slots() {
    let inst = instance(0, 1);
    inst.set_loaded_models(vec!["a:latest".into(), "b:latest".into()]);
    let adm = Admission::new(config(10), vec![inst.clone()]);
    assert_eq!(adm.snapshot().slots[0].slots, 2);
    let a = now(&adm, req("c1").model("a:latest"));
    let b = now(&adm, req("c2").model("b:latest"));
    let mut second_a = queued(&adm, req("c3").model("a:latest"));
    // A third model would need a third place: the instance is full.
    let mut c = queued(&adm, req("c4").model("c:latest"));
    assert_eq!(adm.snapshot().held(), 2);
    drop(a);
    tokio::task::yield_now().await;
    let second_a = second_a.try_take();
    assert!(
        matches!(&second_a, Some(Ok(p)) if p.instance().index == 0),
        "the freed slot of a goes to a"
    );
    assert!(c.try_take().is_none(), "{:?}", adm.snapshot());
    drop((b, second_a));
}
