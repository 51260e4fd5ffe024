//! Latency of `dedup.agg.query` over a one-hour window of 1 s panes, through
//! NATS: fills an hour of event time (200 events a second of it, 16 groups,
//! in batches), then asks for one group's last hour `--queries` times, one at
//! a time, each after an event to that group's newest pane (not timed), and
//! prints p50, p99 and the slowest.
//!
//! The sidecar needs an aggregate whose lateness admits the hour of event
//! time sent now:
//!
//! ```toml
//! [[aggregate]]
//! group = "metric_name"
//! value = "metric_value"
//! time = "timestamp"
//! max_window = "1h"
//! lateness = "2h"
//! ```
//!
//! `cargo run --release --example agg_query -- [NATS_URL] [--queries N]`

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), async_nats::Error> {
    let mut url = "nats://127.0.0.1:4222".to_string();
    let mut queries = 1000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--queries" => queries = args.next().and_then(|n| n.parse().ok()).unwrap_or(queries),
            other => url = other.to_string(),
        }
    }
    let client = async_nats::connect(&url).await?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let started = Instant::now();
    let mut n = 0u64;
    for second in (now - 3599)..=now {
        let lines: Vec<String> = (0..200)
            .map(|_| {
                n += 1;
                format!(
                    r#"{{"event_id":"q{now}n{n}","metric_name":"m{}","metric_value":{},"timestamp":{second}}}"#,
                    n % 16,
                    1 + n * 7919 % 999
                )
            })
            .collect();
        let reply = client.request("dedup.batch", lines.join("\n").into()).await?;
        if reply.payload.first() == Some(&b'!') {
            return Err(format!("batch refused: {}", String::from_utf8_lossy(&reply.payload)).into());
        }
    }
    println!(
        "sent {n} events over an hour of event time in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let q = r#"{"metric_name":"m3","window":"3600s"}"#;
    let mut took = Vec::with_capacity(queries);
    let mut last = String::new();
    for i in 0..queries {
        // Events keep arriving (not timed): the newest pane changes
        // between queries, as it would in use.
        let second = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let event = format!(
            r#"{{"event_id":"q{now}l{i}","metric_name":"m3","metric_value":5,"timestamp":{second}}}"#
        );
        client.request("dedup.batch", event.into()).await?;
        let t = Instant::now();
        let reply = client.request("dedup.agg.query", q.into()).await?;
        took.push(t.elapsed());
        last = String::from_utf8_lossy(&reply.payload).into_owned();
    }
    took.sort();
    let at = |p: f64| took[((took.len() - 1) as f64 * p) as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{queries} queries of one group's last hour: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms\nlast reply: {last}",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(took[took.len() - 1])
    );
    Ok(())
}
