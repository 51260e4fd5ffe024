//! How soon an accepted event shows in an emitted statistic: sends one
//! event of a group of its own every `--gap-ms`, and for each finds the
//! first message on `stats.mean.<group>` whose count includes it; prints
//! p50, p99 and the largest delay (from the request to that message), and
//! the emission period for comparison.
//!
//! ```text
//! cargo run --release --example emit_latency -- [--url nats://127.0.0.1:4222]
//!     [--events 100] [--gap-ms 137] [--every-ms 1000]
//! ```
//!
//! The sidecar needs an aggregate over `metric_name` / `metric_value` (no
//! time field) emitting `mean` to `stats.mean.{group}` every `--every-ms`,
//! as `examples/scripts/emit-latency.sh` configures it. The gap is not a
//! divisor of the period, so the events fall at every phase of it.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut url, mut events, mut gap_ms, mut every_ms) =
        ("nats://127.0.0.1:4222".to_string(), 100usize, 137u64, 1000u64);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => url = value,
            "--events" => events = value.parse()?,
            "--gap-ms" => gap_ms = value.parse()?,
            "--every-ms" => every_ms = value.parse()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let client = async_nats::connect(&url).await?;
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let group = format!("lat{run}");
    let mut stats = client.subscribe(format!("stats.mean.{group}")).await?;
    client.flush().await?;
    let started = Instant::now();
    // Counts seen, with when: (count, arrival); until three periods after
    // the last event (the group is published every tick from then on).
    let until =
        tokio::time::Instant::now() + Duration::from_millis(gap_ms * events as u64 + 3 * every_ms + 1000);
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout_at(until, stats.next()).await {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload)
                && let Some(count) = v["count"].as_u64()
            {
                seen.push((count, started.elapsed()));
            }
        }
        seen
    });
    let mut sent_at = Vec::with_capacity(events);
    for i in 0..events {
        let body = format!(r#"{{"event_id":"{group}e{i}","metric_name":"{group}","metric_value":{i}}}"#);
        let at = started.elapsed();
        let asked = client.request(format!("dedup.ingest.{group}e{i}"), body.into());
        let reply = tokio::time::timeout(Duration::from_secs(10), asked)
            .await
            .map_err(|_| format!("event {i}: no reply within 10 s"))??;
        if &reply.payload[..] != br#"{"accepted":true}"# {
            return Err(format!("event {i} not accepted: {:?}", reply.payload).into());
        }
        sent_at.push(at);
        tokio::time::sleep(Duration::from_millis(gap_ms)).await;
    }
    let seen = reader.await?;
    let mut delays: Vec<Duration> = Vec::with_capacity(events);
    for (i, at) in sent_at.iter().enumerate() {
        // The first message after the request whose count includes event i.
        let first = seen.iter().find(|(count, when)| *count > i as u64 && when >= at);
        match first {
            Some((_, when)) => delays.push(*when - *at),
            None => return Err(format!("event {i} never showed in an emission").into()),
        }
    }
    delays.sort();
    let pick = |q: f64| delays[((delays.len() - 1) as f64 * q) as usize];
    println!(
        "{events} events of group {group}, every emission {every_ms} ms: in the next emission p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (every + 50 ms = {} ms)",
        pick(0.5).as_secs_f64() * 1e3,
        pick(0.99).as_secs_f64() * 1e3,
        delays[delays.len() - 1].as_secs_f64() * 1e3,
        every_ms + 50
    );
    Ok(())
}
