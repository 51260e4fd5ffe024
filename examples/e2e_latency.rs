//! End-to-end latency: from a producer's request to the moment a
//! subscriber on the output (or a routed) subject receives the event.
//! Single events at a fixed rate, bounded in count; prints p50, p99 and
//! the slowest, and how many arrived.
//!
//! ```text
//! cargo run --release --example e2e_latency -- [--url nats://127.0.0.1:4222]
//!     [--subject 'events.unique.*'] [--events 20000] [--rate 2000] [--prefix dedup]
//!     [--sessions N [--skip-every K]]
//! ```
//!
//! With `--sessions N`, event `i` belongs to session `q<i mod N>` with
//! `seq` `i / N` (one producer, in order), and is sent to
//! `<prefix>.ingest.q<i mod N>` (for `shard_key = "session_id"`). With
//! `--skip-every K`, every `seq` divisible by K is never sent: the event
//! after each gap waits out a reorder buffer's `hold`.
//!
//! Each event is `{"event_id":..,"kind":"order_placed","metric_value":2000.5,
//! "sent_ns":..}` padded to about 200 bytes and sent as a request to
//! `<prefix>.ingest.<id>`; `sent_ns` is read back by the subscriber (same
//! process, same clock).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

struct Args {
    url: String,
    subject: String,
    events: u64,
    rate: u64,
    prefix: String,
    sessions: u64,
    skip_every: u64,
}

fn args() -> Args {
    let mut a = Args {
        url: "nats://127.0.0.1:4222".into(),
        subject: "events.unique.*".into(),
        events: 20_000,
        rate: 2_000,
        prefix: "dedup".into(),
        sessions: 0,
        skip_every: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = value,
            "--subject" => a.subject = value,
            "--events" => a.events = value.parse().expect("--events N"),
            "--rate" => a.rate = value.parse().expect("--rate N"),
            "--prefix" => a.prefix = value,
            "--sessions" => a.sessions = value.parse().expect("--sessions N"),
            "--skip-every" => a.skip_every = value.parse().expect("--skip-every K"),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(a.events > 0 && a.events <= 10_000_000, "--events 1..=10000000");
    assert!(a.rate > 0, "--rate > 0");
    a
}

#[tokio::main]
async fn main() {
    let a = args();
    let client = async_nats::connect(&a.url).await.expect("connect");
    let mut sub = client.subscribe(a.subject.clone()).await.expect("subscribe");
    client.flush().await.expect("flush");
    let base = Instant::now();
    let run = base.elapsed().as_nanos() ^ u128::from(std::process::id());
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));

    let expected = a.events;
    let receiver = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(expected as usize);
        let deadline = Duration::from_secs(5);
        while (latencies.len() as u64) < expected {
            let Ok(Some(m)) = tokio::time::timeout(deadline, sub.next()).await else {
                break;
            };
            let now = base.elapsed().as_nanos() as u64;
            let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("a JSON event");
            if let Some(sent) = v["sent_ns"].as_u64() {
                latencies.push(now.saturating_sub(sent));
            }
        }
        latencies
    });

    let period = Duration::from_nanos(1_000_000_000 / a.rate);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let pad = "x".repeat(96);
    let mut tasks = tokio::task::JoinSet::new();
    let mut sending = 0;
    for i in 0..a.events + a.events {
        if sending == a.events {
            break;
        }
        let (session, seq) = (i % a.sessions.max(1), i / a.sessions.max(1));
        if a.sessions > 0 && a.skip_every > 0 && seq % a.skip_every == 0 {
            continue;
        }
        sending += 1;
        tick.tick().await;
        let id = format!("lat{run:x}n{i}");
        let sent = base.elapsed().as_nanos() as u64;
        let session_fields = if a.sessions > 0 {
            format!(r#""session_id":"q{run:x}x{session}","seq":{seq},"#)
        } else {
            String::new()
        };
        let event = format!(
            r#"{{"event_id":"{id}",{session_fields}"kind":"order_placed","metric_value":2000.5,"sent_ns":{sent},"pad":"{pad}"}}"#
        );
        let (client, errors) = (client.clone(), errors.clone());
        let token = if a.sessions > 0 {
            format!("q{run:x}x{session}")
        } else {
            id.clone()
        };
        let subject = format!("{}.ingest.{token}", a.prefix);
        tasks.spawn(async move {
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(10), client.request(subject, event.into())).await,
                Ok(Ok(m)) if &m.payload[..] == br#"{"accepted":true}"#
            );
            if !ok {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut latencies = receiver.await.expect("receiver");
    latencies.sort_unstable();
    let pct = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .map_or(f64::NAN, |&ns| ns as f64 / 1e6)
    };
    println!(
        "{} of {} events on {} at {}/s: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; {} requests not accepted",
        latencies.len(),
        a.events,
        a.subject,
        a.rate,
        pct(0.5),
        pct(0.99),
        pct(1.0),
        errors.load(std::sync::atomic::Ordering::Relaxed)
    );
}
