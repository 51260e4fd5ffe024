//! Producers for the aggregates (see the README's "Aggregates and medians").
//!
//! `cargo run --example metrics -- iot [NATS_URL]`: 50 devices send
//! temperature and humidity readings (each with an `event_id`, some sent
//! twice) for 10 s; then the average temperature over the last minute is
//! asked for. Sidecar configuration:
//!
//! ```toml
//! [[aggregate]]
//! group = "metric_name"
//! value = "metric_value"
//! time = "timestamp"
//! ```
//!
//! `cargo run --example metrics -- categories [NATS_URL]`: 20 simulated
//! nodes send latency readings in 5 categories, in batches, without an
//! `event_id`: 10 % arrive up to 3 s out of order, 2 % later than the
//! lateness, 5 % twice; the medians the sidecar publishes are printed as
//! they come, for 10 s. Sidecar configuration:
//!
//! ```toml
//! key = ["node_id", "timestamp", "category"]
//! [[aggregate]]
//! group = "category"
//! value = "value"
//! time = "timestamp"
//! time_unit = "ms"
//! pane = "500ms"
//! emit_every = "500ms"
//! emit_window = "5s"
//! ```

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::Client;
use futures_util::StreamExt;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

async fn iot(client: &Client) -> Result<(), async_nats::Error> {
    let mut rng = Rng(7);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut sent, mut new) = (0u64, 0u64);
    let mut n = 0u64;
    while Instant::now() < deadline {
        let mut lines = Vec::new();
        for device in 0..50 {
            n += 1;
            let t = now_ms() / 1000;
            let temperature = 20.0 + (device % 10) as f64 + rng.unit() * 2.0;
            let humidity = 40.0 + rng.unit() * 20.0;
            lines.push(format!(
                r#"{{"event_id":"d{device}r{n}t","device":"d{device}","metric_name":"temperature","metric_value":{temperature:.2},"timestamp":{t}}}"#
            ));
            lines.push(format!(
                r#"{{"event_id":"d{device}r{n}h","device":"d{device}","metric_name":"humidity","metric_value":{humidity:.1},"timestamp":{t}}}"#
            ));
            if rng.unit() < 0.05 {
                let again = lines[lines.len() - 1].clone();
                lines.push(again);
            }
        }
        sent += lines.len() as u64;
        let reply = client.request("dedup.batch", lines.join("\n").into()).await?;
        new += reply
            .payload
            .split(|&b| b == b'\n')
            .filter(|l| *l == b"1")
            .count() as u64;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("sent {sent} readings, {new} new");
    for metric in ["temperature", "humidity"] {
        let q = format!(r#"{{"metric_name":"{metric}","window":"60s"}}"#);
        let reply = client.request("dedup.agg.query", q.into()).await?;
        println!("{}", String::from_utf8_lossy(&reply.payload));
    }
    Ok(())
}

async fn categories(client: &Client) -> Result<(), async_nats::Error> {
    const CATEGORIES: [&str; 5] = ["cpu", "disk", "net", "db", "cache"];
    let mut medians = client.subscribe("dedup.median.>").await?;
    let printer = tokio::spawn(async move {
        while let Some(m) = medians.next().await {
            println!("{}  {}", m.subject, String::from_utf8_lossy(&m.payload));
        }
    });
    let mut rng = Rng(11);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut previous: Vec<String> = Vec::new();
    while Instant::now() < deadline {
        let mut lines = Vec::new();
        for node in 0..20 {
            let category = CATEGORIES[(rng.next() % 5) as usize];
            let r = rng.unit();
            let delay = if r < 0.02 {
                20_000 // later than the lateness: counted and dropped
            } else if r < 0.12 {
                rng.next() % 3000
            } else {
                0
            };
            let base = 10.0 * (1 + CATEGORIES.iter().position(|c| *c == category).unwrap_or(0)) as f64;
            let value = base * (0.5 + rng.unit()) + if rng.unit() < 0.1 { 100.0 } else { 0.0 };
            lines.push(format!(
                r#"{{"node_id":"n{node}","timestamp":{},"category":"{category}","value":{value:.3}}}"#,
                now_ms() - delay
            ));
        }
        // 5 % of the last round again: the sidecar drops them.
        lines.extend(previous.iter().filter(|_| rng.unit() < 0.05).cloned());
        client.request("dedup.batch", lines.join("\n").into()).await?;
        previous = lines;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    printer.abort();
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), async_nats::Error> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    let url = args.next().unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let client = async_nats::connect(&url).await?;
    match mode.as_str() {
        "iot" => iot(&client).await,
        "categories" => categories(&client).await,
        _ => {
            eprintln!("usage: metrics iot|categories [NATS_URL]");
            std::process::exit(2);
        }
    }
}
