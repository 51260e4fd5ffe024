//! Counters of the service and their Prometheus text exposition, served on
//! `metrics_addr` by a minimal HTTP responder (any path answers the metrics).
//!
//! Scrapers cannot slow verdicts down: the table figures (entries, bytes,
//! live ids) come from a census that walks the tables at most once per
//! [`CENSUS_EVERY`] whatever the number of scrapes, one shard lock at a time;
//! rendering runs on the blocking pool, not on the runtime's workers; at
//! most [`MAX_SCRAPES`] connections are served at once (others wait in the
//! listen backlog); and a failing `accept` (e.g. out of file descriptors)
//! is logged and retried with a growing pause instead of at once.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::engine::Deduplicator;
use crate::engine::event::EventErrorKind;

/// Every counter the service keeps. All are monotonic except the gauges
/// read at scrape time.
#[derive(Default)]
pub struct Metrics {
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    /// Duplicates of an id whose first copy's commit then failed: answered
    /// that error, not `false`.
    pub twin_errors: AtomicU64,
    pub invalid: [AtomicU64; EventErrorKind::ALL.len()],
    pub not_ready: AtomicU64,
    /// Requests answered 503 because `max_inflight_bytes` was reached.
    pub overloaded: AtomicU64,
    /// Requests dropped unanswered because their reply subject was one of
    /// the sidecar's own (an output or request subject).
    pub refused_replies: AtomicU64,
    /// Ids forgotten on an operator's request.
    pub forgotten: AtomicU64,
    /// Times the window was halved to keep the tables under
    /// `max_table_bytes`.
    pub window_shrinks: AtomicU64,
    /// The window set (configured, or changed at run time), in ms.
    pub window_ms: AtomicU64,
    /// Times the window set was changed at run time.
    pub window_changes: AtomicU64,
    /// Values of the window key that were not a window, and were ignored.
    pub window_rejected: AtomicU64,
    /// Bytes of requests received and not yet answered.
    pub inflight_bytes: AtomicU64,
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
    /// Shard leases held (durability `replicated`).
    pub leases_held: AtomicU64,
    /// Shards taken (at start, from a dead node, or handed over).
    pub takeovers: AtomicU64,
    /// Time from acquiring a lease to serving the shard, summed, in ms.
    pub takeover_ms: AtomicU64,
    /// Ids put back in the tables at takeovers: from the local copy of the
    /// journal, and from the journal stream.
    pub restored_from_copy: AtomicU64,
    pub restored_from_journal: AtomicU64,
    /// Leases given up because a renewal failed.
    pub leases_lost: AtomicU64,
    /// Shards handed over to other nodes (rebalancing, shutdown).
    pub handovers: AtomicU64,
    /// Journal appends refused because another node appended to the shard.
    pub journal_fenced: AtomicU64,
    /// Journal messages acknowledged, and their acknowledgement time summed.
    pub journal_appends: AtomicU64,
    pub journal_append_micros: AtomicU64,
    /// The last walk over the tables.
    pub census: Census,
    /// Requests, errors and processing time per request subject, for
    /// `$SRV.STATS` (one set of atomics per endpoint: no lock).
    pub endpoints: [Served; Endpoint::ALL.len()],
    /// Metrics of other parts (the stages, the routing rules), appended to
    /// every render in the order they were added.
    extra: std::sync::Mutex<Vec<Arc<dyn Render>>>,
}

/// Something that adds its own metrics to the exposition.
pub trait Render: Send + Sync {
    /// Appends its metrics, in the Prometheus text format, to `out`.
    fn render(&self, out: &mut String);
}

/// How old the table figures in a scrape may be. A walk over 5 M ids is a
/// burst of CPU and memory traffic: once a second it raised verdict p99 by
/// a third under 64 scrapers on a 2-core machine, once every 10 s by less
/// than a fifth (README, "Inspecting state").
pub const CENSUS_EVERY: Duration = Duration::from_secs(10);
/// Most metrics connections served at once.
pub const MAX_SCRAPES: usize = 8;

/// What a walk over every table found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableCensus {
    /// Slots in use: live ids plus expired ones not yet reclaimed.
    pub entries: usize,
    /// Heap bytes of the tables.
    pub bytes: usize,
    /// Ids alive now.
    pub live: usize,
}

/// The table figures, walked for at most once per [`CENSUS_EVERY`].
#[derive(Debug, Default)]
pub struct Census {
    last: Mutex<Option<(Instant, TableCensus)>>,
    /// Walks made so far.
    pub walks: AtomicU64,
}

impl Census {
    /// The figures of the last walk if it is recent, else of a new one.
    /// Concurrent callers wait for one walk and share it.
    pub fn get(&self, dedup: &Deduplicator) -> TableCensus {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, census)) = *last
            && at.elapsed() < CENSUS_EVERY
        {
            return census;
        }
        let census = TableCensus {
            entries: dedup.len(),
            bytes: dedup.table_bytes(),
            live: dedup.live(crate::engine::unix_ms()),
        };
        self.walks.fetch_add(1, Relaxed);
        *last = Some((Instant::now(), census));
        census
    }
}

/// A request subject the service answers, as NATS micro discovery lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `<prefix>.shard.*.*`: single events (through the partition mapping).
    Shards,
    /// `<prefix>.ingest`: single events without the mapping.
    Ingest,
    Batch,
    /// `<prefix>.internal.batch.*`: sub-batches between sidecars.
    SubBatches,
    Lookup,
    Forget,
    Window,
    Status,
    /// `<prefix>.rules.test`.
    RulesTest,
    /// `<prefix>.agg.query` and `<prefix>.agg.quantile`.
    Aggregates,
}

impl Endpoint {
    pub const ALL: [Endpoint; 10] = [
        Endpoint::Shards,
        Endpoint::Ingest,
        Endpoint::Batch,
        Endpoint::SubBatches,
        Endpoint::Lookup,
        Endpoint::Forget,
        Endpoint::Window,
        Endpoint::Status,
        Endpoint::RulesTest,
        Endpoint::Aggregates,
    ];

    /// Its name in `$SRV.INFO` and `$SRV.STATS`.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Shards => "shards",
            Endpoint::Ingest => "ingest",
            Endpoint::Batch => "batch",
            Endpoint::SubBatches => "sub_batches",
            Endpoint::Lookup => "lookup",
            Endpoint::Forget => "forget",
            Endpoint::Window => "window",
            Endpoint::Status => "status",
            Endpoint::RulesTest => "rules_test",
            Endpoint::Aggregates => "aggregates",
        }
    }
}

/// One endpoint's counters.
#[derive(Default)]
pub struct Served {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    /// From receipt to reply, summed, in ns.
    pub nanos: AtomicU64,
}

impl Metrics {
    /// Counts a request of `endpoint` received at `started` and answered
    /// now (with an error reply when `error`).
    pub fn served(&self, endpoint: Endpoint, started: Instant, error: bool) {
        let e = &self.endpoints[endpoint as usize];
        e.requests.fetch_add(1, Relaxed);
        e.errors.fetch_add(u64::from(error), Relaxed);
        e.nanos.fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
    }

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
    /// Blocks for a table walk at most once per [`CENSUS_EVERY`]: call it
    /// off the async runtime.
    pub fn render(&self, dedup: &Deduplicator, started: Instant) -> String {
        let census = self.census.get(dedup);
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
            "twin_errors_total",
            "counter",
            "Events whose id was remembered but not yet durable, answered the error of that commit (it failed) instead of a duplicate verdict.",
            &[("", get(&self.twin_errors))],
        );
        metric(
            "not_ready_total",
            "counter",
            "Requests answered 503 (shard not ready or no owner).",
            &[("", get(&self.not_ready))],
        );
        metric(
            "window_ms",
            "gauge",
            "The window set, in ms: the configured one, or the one set at run time (eventsieve window set).",
            &[("", get(&self.window_ms))],
        );
        metric(
            "window_changes_total",
            "counter",
            "Times the window set was changed at run time.",
            &[("", get(&self.window_changes))],
        );
        metric(
            "window_rejected_total",
            "counter",
            "Values put in the window key that were not a window (ignored).",
            &[("", get(&self.window_rejected))],
        );
        metric(
            "window_in_force_ms",
            "gauge",
            "The window verdicts are given for now, in ms (below the configured window while max_table_bytes holds it down).",
            &[("", dedup.window_in_force(crate::engine::unix_ms()) as f64)],
        );
        metric(
            "window_shrinks_total",
            "counter",
            "Times the window in force was halved to keep the tables under max_table_bytes.",
            &[("", get(&self.window_shrinks))],
        );
        metric(
            "forgotten_total",
            "counter",
            "Ids forgotten on request (<prefix>.forget.<id>).",
            &[("", get(&self.forgotten))],
        );
        metric(
            "refused_reply_subjects_total",
            "counter",
            "Requests dropped unanswered: their reply subject was an output or request subject of the sidecar's.",
            &[("", get(&self.refused_replies))],
        );
        metric(
            "overloaded_total",
            "counter",
            "Requests answered 503 because max_inflight_bytes were already held.",
            &[("", get(&self.overloaded))],
        );
        metric(
            "inflight_bytes",
            "gauge",
            "Bytes of requests received and not yet answered.",
            &[("", get(&self.inflight_bytes))],
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
            "leases_held",
            "gauge",
            "Shard leases this node holds (durability replicated).",
            &[("", get(&self.leases_held))],
        );
        metric(
            "takeovers_total",
            "counter",
            "Shards this node took: acquired its lease and replayed its journal.",
            &[("", get(&self.takeovers))],
        );
        metric(
            "takeover_ms_total",
            "counter",
            "Time from a lease acquired to its shard served, summed over takeovers, in ms.",
            &[("", get(&self.takeover_ms))],
        );
        metric(
            "takeover_ids_total",
            "counter",
            "Ids put back in the tables at takeovers, by source: the node's local copy, or the journal stream beyond it.",
            &[
                ("{source=\"copy\"}", get(&self.restored_from_copy)),
                ("{source=\"journal\"}", get(&self.restored_from_journal)),
            ],
        );
        metric(
            "leases_lost_total",
            "counter",
            "Leases given up because their renewal failed (the shard answered 503 from then on).",
            &[("", get(&self.leases_lost))],
        );
        metric(
            "handovers_total",
            "counter",
            "Shards handed over to other nodes (rebalancing or shutdown).",
            &[("", get(&self.handovers))],
        );
        metric(
            "journal_fenced_total",
            "counter",
            "Journal appends refused because another node had appended to the shard.",
            &[("", get(&self.journal_fenced))],
        );
        metric(
            "journal_appends_total",
            "counter",
            "Journal messages acknowledged by JetStream.",
            &[("", get(&self.journal_appends))],
        );
        metric(
            "journal_append_seconds_total",
            "counter",
            "Time journal appends waited for their acknowledgement, summed.",
            &[("", get(&self.journal_append_micros) / 1e6)],
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
            &[("", census.entries as f64)],
        );
        metric(
            "table_bytes",
            "gauge",
            "Heap bytes held by the tables (with tier = \"tiered\", the hot tier; the sealed tier's are eventsieve_sealed_memory_bytes).",
            &[("", census.bytes as f64)],
        );
        metric(
            "table_live_ids",
            "gauge",
            "Ids remembered within the window.",
            &[("", census.live as f64)],
        );
        metric(
            "table_census_walks_total",
            "counter",
            "Walks over the tables for the three figures above (at most one per 10 s).",
            &[("", get(&self.census.walks))],
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
            "process_cpu_seconds_total",
            "counter",
            "CPU time of the process, user and system, in seconds (10 ms steps).",
            &[("", cpu_seconds(None).unwrap_or(0.0))],
        );
        metric(
            "uptime_seconds",
            "gauge",
            "Seconds since start.",
            &[("", started.elapsed().as_secs_f64().floor())],
        );
        let extra = self
            .extra
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for part in extra {
            part.render(&mut out);
        }
        out
    }

    /// Appends `part`'s metrics to every render from now on.
    pub fn add_render(&self, part: Arc<dyn Render>) {
        self.extra
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(part);
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

/// CPU time (user + system) of process `pid`, or of this process, in
/// seconds, from `/proc/<pid>/stat`; `None` where it cannot be read. The
/// kernel counts it in `USER_HZ` ticks, 100 per second on Linux.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    const USER_HZ: f64 = 100.0;
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces; fields after it do not.
    let mut fields = stat.get(stat.rfind(')')? + 2..)?.split(' ');
    // utime and stime are fields 14 and 15; the first after the name is 3.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// Serves the metrics until the task is dropped.
pub async fn serve(listener: TcpListener, render: impl Fn() -> String + Send + Sync + 'static) {
    const FIRST_PAUSE: Duration = Duration::from_millis(10);
    let render = Arc::new(render);
    let permits = Arc::new(Semaphore::new(MAX_SCRAPES));
    let mut pause = FIRST_PAUSE;
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut conn = match listener.accept().await {
            Ok((conn, _)) => {
                pause = FIRST_PAUSE;
                conn
            }
            Err(error) => {
                tracing::warn!(
                    message = "Metrics endpoint cannot accept a connection; pausing.",
                    %error,
                    pause_ms = pause.as_millis() as u64,
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = [0u8; 1024];
            // One read is enough to take a scraper's GET; the body is the same for any path.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await;
            let Ok(body) = tokio::task::spawn_blocking(move || render()).await else {
                return;
            };
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
    fn cpu_seconds_follows_work_done() {
        let before = cpu_seconds(None).expect("this process's stat");
        assert_eq!(
            cpu_seconds(Some(std::process::id())).map(|s| s >= before),
            Some(true)
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut spin = 0u64;
        while cpu_seconds(None).unwrap() < before + 0.05 {
            assert!(Instant::now() < deadline, "50 ms of CPU not counted in 10 s");
            spin = std::hint::black_box(spin.wrapping_mul(31).wrapping_add(1));
        }
        assert_eq!(cpu_seconds(Some(u32::MAX)), None, "no such process");
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
        for i in 0..10 {
            let _ = dedup.check_and_insert(
                &dedup.key(format!(r#"{{"event_id":"x{i}"}}"#).as_bytes()).unwrap(),
                unix_ms(),
            );
        }
        let again = metrics.render(&dedup, Instant::now());
        assert_eq!(
            sample(&again, "eventsieve_table_live_ids"),
            700.0,
            "one walk per census interval"
        );
        assert_eq!(sample(&again, "eventsieve_table_census_walks_total"), 1.0);
        assert!(text.contains("# TYPE eventsieve_rss_file_bytes gauge"));
        assert!(text.contains("# TYPE eventsieve_process_cpu_seconds_total counter"));
    }
}
