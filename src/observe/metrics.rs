//! Counters of the service and their Prometheus text exposition, served on
//! `metrics_addr` by a minimal HTTP responder (any path answers the metrics).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::engine::Deduplicator;
use crate::engine::event::EventErrorKind;

/// Every counter the service keeps. All are monotonic except the gauges
/// read at scrape time.
#[derive(Default)]
pub struct Metrics {
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub invalid: [AtomicU64; EventErrorKind::ALL.len()],
    pub not_ready: AtomicU64,
    pub batches: AtomicU64,
    pub forwarded: AtomicU64,
    pub forward_failures: AtomicU64,
    pub store_errors: AtomicU64,
    pub commits: AtomicU64,
    pub committed_ids: AtomicU64,
    pub commit_micros: AtomicU64,
    pub expired_ids: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub publish_errors: AtomicU64,
    pub pending: AtomicU64,
}

impl Metrics {
    pub fn invalid(&self, kind: EventErrorKind) -> &AtomicU64 {
        let i = EventErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        &self.invalid[i]
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Requests answered so far (accepted, duplicate or invalid).
    pub fn answered(&self) -> u64 {
        self.accepted.load(Relaxed)
            + self.duplicates.load(Relaxed)
            + self.invalid.iter().map(|c| c.load(Relaxed)).sum::<u64>()
    }

    /// The Prometheus text format of every metric.
    pub fn render(&self, dedup: &Deduplicator, started: Instant) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
            let _ = writeln!(
                out,
                "# HELP eventsieve_{name} {help}\n# TYPE eventsieve_{name} {kind}"
            );
            for (labels, value) in samples {
                let _ = writeln!(out, "eventsieve_{name}{labels} {value}");
            }
        };
        let get = |c: &AtomicU64| c.load(Relaxed) as f64;
        metric(
            "verdicts_total",
            "counter",
            "Verdicts given, by verdict.",
            &[
                ("{verdict=\"accepted\"}", get(&self.accepted)),
                ("{verdict=\"duplicate\"}", get(&self.duplicates)),
            ],
        );
        let invalid: Vec<(String, f64)> = EventErrorKind::ALL
            .iter()
            .zip(&self.invalid)
            .map(|(k, c)| (format!("{{reason=\"{}\"}}", k.as_str()), get(c)))
            .collect();
        let invalid: Vec<(&str, f64)> = invalid.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(
            "invalid_total",
            "counter",
            "Events rejected with a 400 reply, by reason.",
            &invalid,
        );
        metric(
            "not_ready_total",
            "counter",
            "Requests answered 503 (shard not ready or no owner).",
            &[("", get(&self.not_ready))],
        );
        metric(
            "batches_total",
            "counter",
            "Batch requests (and forwarded sub-batches) decided.",
            &[("", get(&self.batches))],
        );
        metric(
            "forwarded_total",
            "counter",
            "Events forwarded to the owner of their shard.",
            &[("", get(&self.forwarded))],
        );
        metric(
            "forward_failures_total",
            "counter",
            "Forwards that got no answer.",
            &[("", get(&self.forward_failures))],
        );
        metric(
            "store_errors_total",
            "counter",
            "Failed store commits (their requests got 500).",
            &[("", get(&self.store_errors))],
        );
        metric(
            "commits_total",
            "counter",
            "Group commits to the store.",
            &[("", get(&self.commits))],
        );
        metric(
            "committed_ids_total",
            "counter",
            "Ids written by group commits.",
            &[("", get(&self.committed_ids))],
        );
        metric(
            "commit_seconds_total",
            "counter",
            "Time spent in store commits.",
            &[("", get(&self.commit_micros) / 1e6)],
        );
        metric(
            "expired_ids_total",
            "counter",
            "Ids deleted from the store after the window.",
            &[("", get(&self.expired_ids))],
        );
        metric(
            "slow_consumer_events_total",
            "counter",
            "Slow-consumer events reported by the NATS client.",
            &[("", get(&self.slow_consumers))],
        );
        metric(
            "publish_errors_total",
            "counter",
            "Replies or republishes the client could not send.",
            &[("", get(&self.publish_errors))],
        );
        metric(
            "pending_commits",
            "gauge",
            "New ids waiting for their commit.",
            &[("", get(&self.pending))],
        );
        metric(
            "table_entries",
            "gauge",
            "Table slots in use (live ids plus unreclaimed expired ones).",
            &[("", dedup.len() as f64)],
        );
        metric(
            "table_bytes",
            "gauge",
            "Heap bytes held by the tables.",
            &[("", dedup.memory_bytes() as f64)],
        );
        metric(
            "table_live_ids",
            "gauge",
            "Ids remembered within the window.",
            &[("", dedup.live(crate::engine::unix_ms()) as f64)],
        );
        let (anon, file) = rss_bytes();
        metric(
            "rss_anon_bytes",
            "gauge",
            "Resident anonymous memory of the process (RssAnon): tables, buffers, heap.",
            &[("", anon as f64)],
        );
        metric(
            "rss_file_bytes",
            "gauge",
            "Resident file-backed memory (RssFile): mostly LMDB pages, reclaimable page cache.",
            &[("", file as f64)],
        );
        metric(
            "uptime_seconds",
            "gauge",
            "Seconds since start.",
            &[("", started.elapsed().as_secs_f64().floor())],
        );
        out
    }
}

/// `RssAnon` and `RssFile` of this process in bytes (0 where
/// `/proc/self/status` does not say).
pub fn rss_bytes() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("RssAnon:"), field("RssFile:"))
}

/// Serves the metrics until the task is dropped.
pub async fn serve(listener: TcpListener, render: impl Fn() -> String + Send + Sync + 'static) {
    let render = std::sync::Arc::new(render);
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            // One read is enough to take a scraper's GET; the body is the same for any path.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf)).await;
            let body = render();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineConfig, unix_ms};

    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} missing"))
            .parse()
            .unwrap()
    }

    #[test]
    fn render_reports_live_ids_and_resident_memory() {
        let dedup = Deduplicator::new(EngineConfig::default());
        for i in 0..1000 {
            let event = format!(r#"{{"event_id":"m{}"}}"#, i % 700);
            let keyed = dedup.key(event.as_bytes()).unwrap();
            let _ = dedup.check_and_insert(&keyed, unix_ms());
        }
        let metrics = Metrics::default();
        metrics.accepted.store(700, Relaxed);
        let text = metrics.render(&dedup, Instant::now());
        assert_eq!(sample(&text, "eventsieve_table_live_ids"), 700.0);
        assert_eq!(
            sample(&text, "eventsieve_verdicts_total{verdict=\"accepted\"}"),
            700.0
        );
        assert!(sample(&text, "eventsieve_rss_anon_bytes") > 0.0);
        assert!(text.contains("# TYPE eventsieve_rss_file_bytes gauge"));
    }
}
