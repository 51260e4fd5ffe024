//! Bounded load generator: single-event verdict requests against a running
//! sidecar, and in the same run a trivial NATS responder as the baseline.
//!
//! ```text
//! cargo run --release --example loadgen -- [--url nats://127.0.0.1:4222]
//!     [--seconds 10] [--max-requests 5000000] [--inflight 64]
//!     [--dup-ratio 0.5] [--size 200] [--no-baseline] [--json]
//! ```
//!
//! Each worker keeps one request in flight. A fresh id must come back `true`;
//! a duplicate (an id this worker already saw accepted) must come back
//! `false`; any other answer is counted as a mismatch.

use std::time::{Duration, Instant};

use async_nats::Client;
use bytes::Bytes;

struct Args {
    url: String,
    seconds: u64,
    max_requests: u64,
    inflight: usize,
    dup_ratio: f64,
    size: usize,
    baseline: bool,
    json: bool,
}

fn args() -> Args {
    let mut a = Args {
        url: "nats://127.0.0.1:4222".into(),
        seconds: 10,
        max_requests: 5_000_000,
        inflight: 64,
        dup_ratio: 0.5,
        size: 200,
        baseline: true,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = value(),
            "--seconds" => a.seconds = value().parse().expect("--seconds: a number"),
            "--max-requests" => a.max_requests = value().parse().expect("--max-requests: a number"),
            "--inflight" => a.inflight = value().parse().expect("--inflight: a number"),
            "--dup-ratio" => a.dup_ratio = value().parse().expect("--dup-ratio: 0..1"),
            "--size" => a.size = value().parse().expect("--size: bytes"),
            "--no-baseline" => a.baseline = false,
            "--json" => a.json = true,
            other => panic!("unknown flag {other}; see the header of examples/loadgen.rs"),
        }
    }
    a
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    fresh_true: u64,
    dup_false: u64,
    mismatches: u64,
    errors: u64,
}

/// A `size`-byte event with this id (padding in a field).
fn event(id: &str, size: usize) -> Bytes {
    let head = format!(r#"{{"event_id":"{id}","kind":"load","pad":""#);
    let pad = size.saturating_sub(head.len() + 2);
    Bytes::from(format!("{head}{}\"}}", "x".repeat(pad)))
}

/// Runs `inflight` workers until the deadline or the request budget.
async fn drive(client: &Client, a: &Args, subject_of: fn(&str) -> String, run: &str) -> (Tally, Duration) {
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let per_worker = a.max_requests / a.inflight as u64;
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..a.inflight {
        let (client, size, dup_ratio, run) = (client.clone(), a.size, a.dup_ratio, run.to_string());
        workers.push(tokio::spawn(async move {
            let mut t = Tally::default();
            let mut accepted: Vec<u64> = Vec::new();
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ w as u64;
            for n in 0..per_worker {
                if Instant::now() >= deadline {
                    break;
                }
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let dup = !accepted.is_empty() && (rng % 1000) < (dup_ratio * 1000.0) as u64;
                let k = if dup {
                    accepted[(rng >> 20) as usize % accepted.len()]
                } else {
                    n
                };
                let id = format!("{run}w{w}n{k}");
                let sent = Instant::now();
                let reply = client.request(subject_of(&id), event(&id, size)).await;
                t.latencies_us.push(sent.elapsed().as_micros() as u32);
                match reply.as_ref().map(|r| &r.payload[..]) {
                    Ok(br#"{"accepted":true}"#) if !dup => {
                        t.fresh_true += 1;
                        accepted.push(k);
                    }
                    Ok(br#"{"accepted":false}"#) if dup => t.dup_false += 1,
                    Ok(b"ok") => t.fresh_true += 1,
                    Ok(_) => t.mismatches += 1,
                    Err(_) => t.errors += 1,
                }
            }
            t
        }));
    }
    let mut all = Tally::default();
    for w in workers {
        let t = w.await.expect("worker");
        all.latencies_us.extend(t.latencies_us);
        all.fresh_true += t.fresh_true;
        all.dup_false += t.dup_false;
        all.mismatches += t.mismatches;
        all.errors += t.errors;
    }
    (all, started.elapsed())
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

struct Row {
    name: &'static str,
    rate: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    tally: Tally,
}

fn row(name: &'static str, mut tally: Tally, elapsed: Duration) -> Row {
    tally.latencies_us.sort_unstable();
    let l = &tally.latencies_us;
    Row {
        name,
        rate: l.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(l, 0.5),
        p99: percentile(l, 0.99),
        p999: percentile(l, 0.999),
        tally,
    }
}

#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let a = args();
    let client = async_nats::connect(&a.url).await?;
    let run = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let mut rows = Vec::new();

    if a.baseline {
        // Trivial responder: answers every request with "ok", nothing else.
        let responder = async_nats::connect(&a.url).await?;
        let mut sub = responder.subscribe("loadgen.echo.*").await?;
        responder.flush().await?;
        let echo = tokio::spawn(async move {
            use futures_util::StreamExt;
            while let Some(m) = sub.next().await {
                if let Some(reply) = m.reply {
                    let _ = responder.publish(reply, Bytes::from_static(b"ok")).await;
                }
            }
        });
        let (t, elapsed) = drive(&client, &a, |id| format!("loadgen.echo.{id}"), &run).await;
        rows.push(row("raw request-reply (trivial responder)", t, elapsed));
        echo.abort();
    }
    let (t, elapsed) = drive(&client, &a, |id| format!("dedup.ingest.{id}"), &run).await;
    rows.push(row("eventsieve single-event verdicts", t, elapsed));

    if a.json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name, "requests_per_s": r.rate, "p50_ms": r.p50, "p99_ms": r.p99,
                    "p999_ms": r.p999, "requests": r.tally.latencies_us.len(),
                    "fresh_true": r.tally.fresh_true, "dup_false": r.tally.dup_false,
                    "mismatches": r.tally.mismatches, "errors": r.tally.errors,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "inflight": a.inflight, "size": a.size, "dup_ratio": a.dup_ratio, "runs": list })
        );
        return Ok(());
    }
    println!(
        "inflight={} size={}B dup_ratio={} seconds<={} max_requests={}",
        a.inflight, a.size, a.dup_ratio, a.seconds, a.max_requests
    );
    println!(
        "{:<40} {:>12} {:>8} {:>8} {:>9} {:>10} {:>10} {:>6}",
        "run", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "new=true", "dup=false", "wrong"
    );
    for r in &rows {
        println!(
            "{:<40} {:>12.0} {:>8.3} {:>8.3} {:>9.3} {:>10} {:>10} {:>6}",
            r.name,
            r.rate,
            r.p50,
            r.p99,
            r.p999,
            r.tally.fresh_true,
            r.tally.dup_false,
            r.tally.mismatches + r.tally.errors
        );
    }
    if let [base, ours] = &rows[..] {
        println!(
            "ratio eventsieve/raw: rate {:.2}x, p99 {:.2}x",
            ours.rate / base.rate,
            ours.p99 / base.p99
        );
    }
    Ok(())
}
