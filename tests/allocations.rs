//! Heap allocations per event on the sidecar's own threads, batch and
//! single paths, through a real nats-server with the LMDB store: the
//! sidecar runs on a runtime of its own whose threads (workers and
//! blocking ones: the writer's commits) are the only ones counted, so the
//! test's client does not count. The figures are printed
//! (`cargo test --test allocations -- --nocapture`) and held below a
//! ceiling each, so that a change that adds allocations per event shows.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use eventsieve::config::Durability;
use eventsieve::service;
use futures_util::StreamExt;

/// Counts allocations (and reallocations) made on threads marked counted.
struct Counting;

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

fn count() {
    if COUNTED.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Relaxed);
    }
}

// SAFETY: every call is passed on to the system allocator unchanged; the
// counting touches a const-initialised thread-local and an atomic only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Most allocations per batched event (batches of 1000 lines of 200 B,
/// half of them repeats), and per single-event request. Measured
/// (2026-12-03): 0.57 and 8.2, then 0.535 and 4.7 once the journal's
/// appends reused their buffers and a request took no copy of its subject
/// (plain rules) nor an `Arc`. Of a batch's, most are per output message
/// (its count header: about six inside async-nats; the joined body) and
/// per shard (the commit's signal), and 0.12 per event the table's
/// segments doubling as it grows (200 000 ids here); of a single
/// request's, three are async-nats copying the subject and reply in and
/// the reply's subject out, one the commit's signal.
const BATCH_CEILING: f64 = 0.65;
const SINGLE_CEILING: f64 = 6.5;

fn line(i: usize) -> String {
    let pad = "x".repeat(120);
    format!(
        r#"{{"event_id":"a{i}","session_id":"s{}","metric_value":{},"pad":"{pad}"}}"#,
        i % 64,
        i % 1000
    )
}

/// Waits until `out` got `want` events (batch messages count their lines).
async fn received(out: &mut async_nats::Subscriber, want: usize) {
    let mut got = 0;
    while got < want {
        let m = tokio::time::timeout(Duration::from_secs(10), out.next())
            .await
            .expect("the output within 10 s")
            .unwrap();
        let count = m
            .headers
            .as_ref()
            .and_then(|h| h.get(eventsieve::output::COUNT_HEADER));
        got += count.map_or(1, |c| c.as_str().parse::<usize>().unwrap());
    }
}

/// Allocations on the sidecar's threads while `work` runs.
async fn counted<F: Future<Output = ()>>(work: F) -> u64 {
    // What the sidecar's timers do between events counts too; settle first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = ALLOCATIONS.load(Relaxed);
    work.await;
    ALLOCATIONS.load(Relaxed) - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_per_event_on_the_batch_and_single_paths_stay_few() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let s = settings(&server, data.path(), "1h", Durability::Local);
    // The sidecar on a runtime of its own, its threads counted.
    let sidecar = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(|| COUNTED.set(true))
        .build()
        .unwrap();
    let running = sidecar.spawn(service::start(s)).await.unwrap().unwrap();

    let client = server.client().await;
    let mut out = client.subscribe("events.unique.*").await.unwrap();
    client.flush().await.unwrap();
    // Batches: 20 of 1000 lines, each half new, half repeats of the one
    // before; one first to warm up.
    const BATCHES: usize = 20;
    const LINES: usize = 1000;
    let batch = |b: usize| {
        let new = (0..LINES / 2).map(|i| b * LINES / 2 + i);
        let repeats = (0..LINES / 2).map(|i| b.saturating_sub(1) * LINES / 2 + i);
        Bytes::from(new.chain(repeats).map(line).collect::<Vec<_>>().join("\n"))
    };
    let ask_batch = |b: usize| {
        let client = client.clone();
        let body = batch(b);
        async move { request(&client, "dedup.batch", body).await }
    };
    // The table at a steady size first (growing, its segments allocate as
    // they double): 200 000 ids, none of them used below.
    for w in 0..200 {
        let ids = (0..LINES).map(|i| line(10_000_000 + w * LINES + i));
        request(
            &client,
            "dedup.batch",
            Bytes::from(ids.collect::<Vec<_>>().join("\n")),
        )
        .await;
    }
    received(&mut out, 200 * LINES).await;
    ask_batch(0).await;
    received(&mut out, LINES / 2).await;
    let batched = counted(async {
        for b in 1..=BATCHES {
            ask_batch(b).await;
        }
        received(&mut out, BATCHES * LINES / 2).await;
    })
    .await;
    let per_batched = batched as f64 / (BATCHES * LINES) as f64;

    // Single events: 2 000 requests, 16 in flight.
    const SINGLES: usize = 2000;
    let singles = counted(async {
        let asks = (0..SINGLES).map(|i| {
            let client = client.clone();
            async move {
                let event = line(1_000_000 + i);
                let answer = ask(&client, &format!("dedup.ingest.a{}", 1_000_000 + i), event).await;
                assert_eq!(answer, Answer::Verdict(true));
            }
        });
        futures_util::stream::iter(asks)
            .buffer_unordered(16)
            .collect::<Vec<()>>()
            .await;
        received(&mut out, SINGLES).await;
    })
    .await;
    let per_single = singles as f64 / SINGLES as f64;
    println!(
        "allocations on the sidecar's threads: {per_batched:.3} per batched event ({batched} for {} lines), \
         {per_single:.1} per single-event request ({singles} for {SINGLES})",
        BATCHES * LINES
    );
    assert!(
        per_batched <= BATCH_CEILING,
        "{per_batched:.3} allocations per batched event, over {BATCH_CEILING}"
    );
    assert!(
        per_single <= SINGLE_CEILING,
        "{per_single:.1} allocations per single event, over {SINGLE_CEILING}"
    );
    sidecar.spawn(running.shutdown()).await.unwrap().unwrap();
    // A runtime is dropped outside an asynchronous context.
    tokio::task::spawn_blocking(move || sidecar.shutdown_timeout(Duration::from_secs(5)))
        .await
        .unwrap();
}
