//! Inserts N distinct ids through `Deduplicator::ingest_event` and reports the
//! memory per live id from the process's own RSS, and the insert rate.
//!
//! `cargo run --release --example footprint -- 10000000 [SEGMENTS_PER_SHARD]`
//!
//! The last line is `bytes_per_id=<f> peak_bytes_per_id=<f> inserts_per_s=<f>`,
//! where the per-id figures are (RSS − RSS before the engine existed) / N,
//! and the peak uses the kernel's high-water mark (`VmHWM`).

use std::fmt::Write;
use std::time::Instant;

use eventsieve::{Deduplicator, EngineConfig};

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{field} missing from /proc/self/status"))
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(10_000_000, |a| a.parse().expect("N must be a number"));
    let base_rss = status_kib("VmRSS:") * 1024;
    let mut config = EngineConfig::default();
    if let Some(segments) = std::env::args().nth(2) {
        config.segments_per_shard = segments.parse().expect("segments per shard: a number");
    }
    let dedup = Deduplicator::new(config);
    let mut event = String::with_capacity(64);
    let start = Instant::now();
    for i in 0..n {
        event.clear();
        write!(event, r#"{{"event_id":"ev{i:x}","value":1}}"#).unwrap();
        assert!(dedup.ingest_event(&event).unwrap(), "id {i} judged duplicate");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let rss = status_kib("VmRSS:") * 1024;
    let peak = status_kib("VmHWM:") * 1024;
    let anon = status_kib("RssAnon:") * 1024;
    let per = |bytes: u64| bytes.saturating_sub(base_rss) as f64 / n as f64;
    println!("ids={n} rss_bytes={rss} rss_anon_bytes={anon} baseline_rss_bytes={base_rss}");
    println!(
        "table_heap_bytes={} ({:.2} per id)",
        dedup.memory_bytes(),
        dedup.memory_bytes() as f64 / n as f64
    );
    println!(
        "bytes_per_id={:.2} peak_bytes_per_id={:.2} inserts_per_s={:.0}",
        per(rss),
        per(peak),
        n as f64 / elapsed
    );
}
