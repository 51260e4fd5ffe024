//! Bounded load generator: verdict requests (single events or batches)
//! against a running sidecar and, in the same run on the same server, three
//! baselines with the same concurrency and payloads:
//!
//! - `raw`: request-reply against a trivial responder that answers `ok`;
//! - `relay`: a responder that makes the NATS server carry what the sidecar
//!   makes it carry, without deduplicating: the request on a subject the
//!   server maps by partition (`loadgen.ingest.<id>`, when `nats/server.conf`
//!   maps it; a batch on one plain subject), a reply of the sidecar's size,
//!   and the new events (a `1 - dup-ratio` share) republished as the
//!   sidecar does: a single event as its own message; a batch's as one
//!   message per shard (`--shards`, default 32) with the count header, or
//!   one per event with `--batch-output per_event`. The sidecar can at
//!   best match it: the gap between the two is the sidecar's own cost, the
//!   gap to `raw` is the server's;
//! - `jetstream`: JetStream's own dedup (`Nats-Msg-Id` on a stream whose
//!   `duplicate_window` is the window).
//!
//! ```text
//! cargo run --release --example loadgen -- [--url nats://127.0.0.1:4222]
//!     [--seconds 10] [--baseline-seconds S] [--max-events 50000000]
//!     [--inflight 64] [--batch 0] [--dup-ratio 0.5] [--id-space N]
//!     [--size 200 | --size 20-4096] [--window 7d]
//!     [--baselines raw,relay,jetstream | --no-baseline]
//!     [--shards 32] [--batch-output per_shard|per_event]
//!     [--serve-relay | --relay-pid PID]
//!     [--metrics 127.0.0.1:9464] [--server-pid PID] [--json]
//!     [--format json|protobuf]
//! ```
//!
//! - `--format protobuf` sends the same events as `loadgen.v1.Event`
//!   messages (`examples/proto/loadgen/v1/event.proto`), padded to the same
//!   size, batches length-delimited; the sidecar must read that schema
//!   (`examples/scripts/format-compare.sh` runs both).
//!
//! - `--batch N` sends N events per request to `dedup.batch` (0: one event
//!   per request to `dedup.ingest.<id>`).
//! - `--size A-B` draws sizes log-uniformly between A and B bytes.
//! - `--id-space N` caps the distinct ids each run sends; once spent, every
//!   event is a duplicate.
//!
//! Every answer is checked: an id this worker has not sent must come back
//! new, one it saw accepted must come back a duplicate; anything else is
//! counted as wrong. The sidecar's memory (`RssAnon`, `RssFile`) and live
//! ids are read from its metrics endpoint after its run.
//!
//! Each run also reports CPU per event: the server's (from
//! `/proc/<pid>/stat`; `--server-pid`, else the one local process named
//! `nats-server`), the load generator's own (the baselines' responders run
//! in it), and the sidecar's (its `eventsieve_process_cpu_seconds_total`).
//!
//! The `relay` responder can run in a process of its own, so that its CPU
//! per event is measured as the sidecar's is: the floor for the same
//! messages through the same NATS client. `loadgen --serve-relay [--batch
//! N] --seconds S` serves only it for S seconds; `loadgen --relay-pid PID`
//! then drives that process instead of starting a responder, and reports
//! its CPU per event in the `relay µs` column.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap, jetstream};
use bytes::Bytes;
use eventsieve::engine::batch::{self, Entry};
use eventsieve::engine::shard::shard_of;
use eventsieve::observe::metrics::cpu_seconds;
use eventsieve::output::COUNT_HEADER;
use futures_util::StreamExt;
use tokio::task::JoinHandle;

#[derive(Clone)]
struct Args {
    url: String,
    seconds: u64,
    baseline_seconds: u64,
    max_events: u64,
    inflight: usize,
    batch: usize,
    dup_ratio: f64,
    id_space: u64,
    size: (usize, usize),
    window: Duration,
    raw: bool,
    relay: bool,
    jetstream: bool,
    metrics: String,
    server_pid: Option<u32>,
    shards: u32,
    per_event: bool,
    serve_relay: bool,
    relay_pid: Option<u32>,
    json: bool,
    /// Events as `loadgen.v1.Event` protobuf messages.
    protobuf: bool,
}

fn usage(problem: &str) -> ! {
    eprintln!("loadgen: {problem}; see the header of examples/loadgen.rs");
    std::process::exit(2)
}

fn args() -> Args {
    let mut a = Args {
        url: "nats://127.0.0.1:4222".into(),
        seconds: 10,
        baseline_seconds: 0,
        max_events: 50_000_000,
        inflight: 64,
        batch: 0,
        dup_ratio: 0.5,
        id_space: u64::MAX,
        size: (200, 200),
        window: Duration::from_secs(7 * 86_400),
        raw: true,
        relay: true,
        jetstream: true,
        metrics: "127.0.0.1:9464".into(),
        server_pid: None,
        shards: 32,
        per_event: false,
        serve_relay: false,
        relay_pid: None,
        json: false,
        protobuf: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        fn num<T: std::str::FromStr>(flag: &str, v: String) -> T {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{flag}: {v:?} is not a number")))
        }
        match flag.as_str() {
            "--url" => a.url = value(),
            "--seconds" => a.seconds = num(&flag, value()),
            "--baseline-seconds" => a.baseline_seconds = num(&flag, value()),
            "--max-events" => a.max_events = num(&flag, value()),
            "--inflight" => a.inflight = num(&flag, value()),
            "--batch" => a.batch = num(&flag, value()),
            "--dup-ratio" => a.dup_ratio = num(&flag, value()),
            "--id-space" => a.id_space = num(&flag, value()),
            "--size" => {
                let v = value();
                a.size = match v.split_once('-') {
                    Some((lo, hi)) => (num(&flag, lo.into()), num(&flag, hi.into())),
                    None => {
                        let n = num(&flag, v);
                        (n, n)
                    }
                };
            }
            "--window" => {
                let v = value();
                a.window = Duration::from_millis(
                    eventsieve::config::parse_duration_ms(&v)
                        .unwrap_or_else(|| usage(&format!("--window: {v:?} is not like 90s, 5m, 7d"))),
                );
            }
            "--baselines" => {
                let v = value();
                let names: Vec<&str> = v.split(',').collect();
                if let Some(bad) = names.iter().find(|b| !["raw", "relay", "jetstream"].contains(b)) {
                    usage(&format!("--baselines: {bad:?} is not raw, relay or jetstream"));
                }
                a.raw = names.contains(&"raw");
                a.relay = names.contains(&"relay");
                a.jetstream = names.contains(&"jetstream");
            }
            "--no-baseline" => (a.raw, a.relay, a.jetstream) = (false, false, false),
            "--metrics" => a.metrics = value(),
            "--server-pid" => a.server_pid = Some(num(&flag, value())),
            "--shards" => a.shards = num(&flag, value()),
            "--serve-relay" => a.serve_relay = true,
            "--relay-pid" => a.relay_pid = Some(num(&flag, value())),
            "--batch-output" => {
                a.per_event = match value().as_str() {
                    "per_shard" => false,
                    "per_event" => true,
                    other => usage(&format!(
                        "--batch-output: {other:?} is not per_shard or per_event"
                    )),
                }
            }
            "--json" => a.json = true,
            "--format" => {
                a.protobuf = match value().as_str() {
                    "json" => false,
                    "protobuf" => true,
                    other => usage(&format!("--format: {other:?} is not json or protobuf")),
                }
            }
            other => usage(&format!("unknown flag {other}")),
        }
    }
    if a.inflight == 0
        || a.shards == 0
        || a.size.0 == 0
        || a.size.0 > a.size.1
        || !(0.0..=1.0).contains(&a.dup_ratio)
    {
        usage("--inflight and --shards must be positive, --size A-B with 0 < A <= B, --dup-ratio in 0..1");
    }
    if a.baseline_seconds == 0 {
        a.baseline_seconds = a.seconds;
    }
    a
}

/// Where a run sends its events.
#[derive(Clone)]
enum Target {
    /// A responder that answers every request `ok`.
    Raw,
    /// A responder that costs the server what the sidecar does (module docs).
    Relay,
    /// The sidecar.
    Sidecar,
    /// `Nats-Msg-Id` publishes to a stream that deduplicates.
    JetStream(Box<jetstream::Context>),
}

/// What one run counted.
#[derive(Default)]
struct Tally {
    requests: u64,
    events: u64,
    latencies_us: Vec<u32>,
    fresh_new: u64,
    dup_dup: u64,
    wrong: u64,
    errors: u64,
    /// The first error's message, to say what the errors were.
    first_error: Option<String>,
}

impl Tally {
    fn merge(&mut self, t: Tally) {
        self.requests += t.requests;
        self.events += t.events;
        self.latencies_us.extend(t.latencies_us);
        self.fresh_new += t.fresh_new;
        self.dup_dup += t.dup_dup;
        self.wrong += t.wrong;
        self.errors += t.errors;
        self.first_error = self.first_error.take().or(t.first_error);
    }
}

/// xorshift64: cheap, deterministic per worker.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() % 1_000_000) < (p * 1_000_000.0) as u64
    }

    /// Log-uniform in `lo..=hi`.
    fn size(&mut self, (lo, hi): (usize, usize)) -> usize {
        if lo == hi {
            return lo;
        }
        let f = (self.next() % 1_000_000) as f64 / 1_000_000.0;
        ((lo as f64).ln() + f * ((hi as f64).ln() - (lo as f64).ln())).exp() as usize
    }
}

/// Appends an event of about `size` bytes with id `<tag>w<w>n<k>`, a
/// `session_id` (64 per worker, for `shard_key`; JSON events number each
/// session's events in `seq`, in the order a worker sends them), a metric for aggregates
/// (`metric_name` one of 16, `metric_value`, `timestamp` in seconds) and
/// padding in a field; never shorter than those need. As JSON, or as a
/// `loadgen.v1.Event` protobuf message of the same size.
fn event(out: &mut Vec<u8>, (tag, w, k): (&str, usize, u64), size: usize, protobuf: bool) {
    use std::io::Write;
    const PAD: &[u8] = &[b'x'; 8192];
    let start = out.len();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let pad_to = |out: &mut Vec<u8>, mut pad: usize| {
        while pad > 0 {
            let n = pad.min(PAD.len());
            out.extend_from_slice(&PAD[..n]);
            pad -= n;
        }
    };
    if protobuf {
        use prost::encoding::{WireType, encode_key, encode_varint};
        let text = |out: &mut Vec<u8>, number: u32, value: &[u8]| {
            encode_key(number, WireType::LengthDelimited, out);
            encode_varint(value.len() as u64, out);
            out.extend_from_slice(value);
        };
        text(out, 1, format!("{tag}w{w}n{k}").as_bytes());
        text(out, 2, format!("s{w}x{}", k % 64).as_bytes());
        text(out, 3, b"load");
        text(out, 4, format!("m{}", k % 16).as_bytes());
        encode_key(5, WireType::SixtyFourBit, out);
        out.extend_from_slice(&((k % 1000) as f64).to_le_bytes());
        encode_key(6, WireType::Varint, out);
        encode_varint(now, out);
        // The pad: its key and length take 3 bytes up to 16 KiB.
        let pad = size.saturating_sub(out.len() - start + 3);
        encode_key(7, WireType::LengthDelimited, out);
        encode_varint(pad as u64, out);
        pad_to(out, pad);
        return;
    }
    write!(
        out,
        r#"{{"event_id":"{tag}w{w}n{k}","session_id":"s{w}x{}","seq":{},"kind":"load","metric_name":"m{}","metric_value":{},"timestamp":{now},"pad":""#,
        k % 64,
        k / 64,
        k % 16,
        k % 1000
    )
    .expect("write to a Vec");
    let pad = size.saturating_sub(out.len() - start + 2);
    pad_to(out, pad);
    out.extend_from_slice(b"\"}");
}

/// The events of a batch body: lines, or length-delimited messages.
fn frames(body: &[u8], protobuf: bool) -> Vec<Range<usize>> {
    if !protobuf {
        return batch::lines(body);
    }
    let mut out = Vec::new();
    let mut rest = body;
    while let Ok(len) = prost::encoding::decode_varint(&mut rest) {
        let start = body.len() - rest.len();
        let end = (start + len as usize).min(body.len());
        out.push(start..end);
        rest = &body[end..];
        if rest.is_empty() {
            break;
        }
    }
    out
}

/// `ranges` of `body` as one batch body, framed as the format frames them.
fn join(body: &[u8], ranges: &[Range<usize>], protobuf: bool) -> Vec<(Vec<u8>, usize)> {
    if !protobuf {
        return batch::join(body, ranges, usize::MAX);
    }
    let mut out = Vec::new();
    for r in ranges {
        prost::encoding::encode_varint(r.len() as u64, &mut out);
        out.extend_from_slice(&body[r.clone()]);
    }
    vec![(out, ranges.len())]
}

/// One worker: keeps one request in flight until the deadline or its share
/// of the event budget.
async fn worker(client: Client, target: Target, a: Args, tag: String, w: usize, seconds: u64) -> Tally {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    // JetStream takes one event per message.
    let per_request = match target {
        Target::JetStream(_) => 1,
        _ => a.batch.max(1),
    };
    let budget = a.max_events / a.inflight as u64;
    let id_budget = a.id_space / a.inflight as u64;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut t = Tally::default();
    let mut accepted: Vec<u64> = Vec::new();
    let mut fresh = 0u64;
    let mut ids: Vec<(u64, bool)> = Vec::with_capacity(per_request);
    let mut body = Vec::new();
    let mut scratch = Vec::new();
    while t.events < budget && Instant::now() < deadline {
        ids.clear();
        for _ in 0..per_request {
            let dup = !accepted.is_empty() && (fresh >= id_budget || rng.chance(a.dup_ratio));
            if dup {
                ids.push((accepted[(rng.next() >> 16) as usize % accepted.len()], true));
            } else {
                ids.push((fresh, false));
                fresh += 1;
            }
        }
        let id = |k: u64| format!("{tag}w{w}n{k}");
        let sent = Instant::now();
        // Per event: Some(true) new, Some(false) duplicate, None no verdict (raw).
        let verdicts: Result<Vec<Option<bool>>, String> = match &target {
            Target::JetStream(js) => {
                let (k, _) = ids[0];
                body.clear();
                event(&mut body, (&tag, w, k), rng.size(a.size), a.protobuf);
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", id(k).as_str());
                let subject = format!("loadgen.js.{tag}.{w}");
                match js
                    .publish_with_headers(subject, headers, body.clone().into())
                    .await
                {
                    Ok(ack) => ack
                        .await
                        .map(|ack| vec![Some(!ack.duplicate)])
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
            Target::Raw | Target::Relay | Target::Sidecar => {
                body.clear();
                let framed = a.protobuf && per_request > 1;
                for (i, &(k, _)) in ids.iter().enumerate() {
                    if framed {
                        // Length-delimited: the event goes after its length.
                        scratch.clear();
                        event(&mut scratch, (&tag, w, k), rng.size(a.size), true);
                        prost::encoding::encode_varint(scratch.len() as u64, &mut body);
                        body.extend_from_slice(&scratch);
                        continue;
                    }
                    if i > 0 {
                        body.push(b'\n');
                    }
                    event(&mut body, (&tag, w, k), rng.size(a.size), a.protobuf);
                }
                let subject = match (&target, a.batch) {
                    (Target::Raw, _) => format!("loadgen.echo.{tag}"),
                    (Target::Relay, 0) => format!("loadgen.ingest.{}", id(ids[0].0)),
                    (Target::Relay, _) => format!("loadgen.batch.{}", relay_tag(&a, &tag)),
                    (_, 0) => format!("dedup.ingest.{}", id(ids[0].0)),
                    _ => "dedup.batch".to_string(),
                };
                match client.request(subject, body.clone().into()).await {
                    Err(e) => Err(e.to_string()),
                    Ok(reply) => match (&target, a.batch) {
                        (Target::Raw | Target::Relay, _) => Ok(vec![None; ids.len()]),
                        (_, 0) => match &reply.payload[..] {
                            br#"{"accepted":true}"# => Ok(vec![Some(true)]),
                            br#"{"accepted":false}"# => Ok(vec![Some(false)]),
                            other => Err(String::from_utf8_lossy(other).into_owned()),
                        },
                        _ => batch::decode(&reply.payload)
                            .map_err(|e| e.to_string())
                            .map(|entries| {
                                entries
                                    .into_iter()
                                    .map(|e| match e {
                                        Entry::New => Some(true),
                                        Entry::Duplicate => Some(false),
                                        Entry::Error { .. } => None,
                                    })
                                    .collect()
                            }),
                    },
                }
            }
        };
        t.latencies_us.push(sent.elapsed().as_micros() as u32);
        t.requests += 1;
        t.events += ids.len() as u64;
        match verdicts {
            Err(e) => {
                t.errors += ids.len() as u64;
                t.first_error.get_or_insert(e);
            }
            Ok(v) if v.len() != ids.len() => t.wrong += ids.len() as u64,
            Ok(v) => {
                for (&(k, dup), verdict) in ids.iter().zip(v) {
                    match (verdict, dup, &target) {
                        (None, true, Target::Raw | Target::Relay) => t.dup_dup += 1,
                        (None, false, Target::Raw | Target::Relay) => t.fresh_new += 1,
                        (Some(true), false, _) => {
                            t.fresh_new += 1;
                            accepted.push(k);
                        }
                        (Some(false), true, _) => t.dup_dup += 1,
                        // A line the sidecar answered with an error (a 503
                        // while a shard is not served): no verdict.
                        (None, _, _) => {
                            t.errors += 1;
                            t.first_error.get_or_insert_with(|| {
                                "a batch line answered with an error (e.g. 503)".into()
                            });
                        }
                        (Some(false), false, _) | (Some(true), true, _) => t.wrong += 1,
                    }
                }
                if let Target::Raw | Target::Relay = target {
                    // The responder accepts everything; remember fresh ids so
                    // duplicates are drawn as in the other runs.
                    accepted.extend(ids.iter().filter(|(_, d)| !d).map(|(k, _)| *k));
                }
            }
        }
    }
    t
}

/// Runs `inflight` workers against `target` and returns the merged tally.
async fn drive(
    client: &Client,
    clocks: &Clocks,
    target: Target,
    a: &Args,
    tag: &str,
    seconds: u64,
) -> (Tally, (Duration, Cpu)) {
    let cpu = clocks.now();
    let started = Instant::now();
    let workers: Vec<_> = (0..a.inflight)
        .map(|w| {
            tokio::spawn(worker(
                client.clone(),
                target.clone(),
                a.clone(),
                tag.to_string(),
                w,
                seconds,
            ))
        })
        .collect();
    let mut all = Tally::default();
    for w in workers {
        all.merge(w.await.expect("worker panicked"));
    }
    let elapsed = started.elapsed();
    let mut spent = clocks.now() - cpu;
    if !matches!(target, Target::Sidecar) {
        // Idle during a baseline: its figure would only say so.
        spent.sidecar = None;
    }
    if !matches!(target, Target::Relay) {
        spent.relay = None;
    }
    (all, (elapsed, spent))
}

/// CPU seconds spent so far by the processes a run involves.
#[derive(Clone, Copy, Default)]
struct Cpu {
    server: Option<f64>,
    own: f64,
    sidecar: Option<f64>,
    /// An external `relay` responder (`--relay-pid`).
    relay: Option<f64>,
}

/// Where to read the CPU time of the server and the sidecar.
struct Clocks {
    server_pid: Option<u32>,
    relay_pid: Option<u32>,
    metrics: String,
}

impl Clocks {
    fn new(a: &Args) -> Self {
        let server_pid = a.server_pid.or_else(|| {
            let found = find_process("nats-server");
            if found.len() != 1 {
                eprintln!(
                    "loadgen: {} local nats-server processes: pass --server-pid for its CPU column",
                    found.len()
                );
            }
            (found.len() == 1).then(|| found[0])
        });
        Self {
            server_pid,
            relay_pid: a.relay_pid,
            metrics: a.metrics.clone(),
        }
    }

    fn now(&self) -> Cpu {
        Cpu {
            server: self.server_pid.and_then(|pid| cpu_seconds(Some(pid))),
            own: cpu_seconds(None).unwrap_or(0.0),
            sidecar: scrape_value(&self.metrics, "eventsieve_process_cpu_seconds_total").ok(),
            relay: self.relay_pid.and_then(|pid| cpu_seconds(Some(pid))),
        }
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, earlier: Cpu) -> Cpu {
        let diff = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        Cpu {
            server: diff(self.server, earlier.server),
            own: self.own - earlier.own,
            sidecar: diff(self.sidecar, earlier.sidecar),
            relay: diff(self.relay, earlier.relay),
        }
    }
}

/// The pids of the processes whose command name is `name`.
fn find_process(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .collect()
}

struct Row {
    name: String,
    /// CPU spent during the run.
    cpu: Cpu,
    events_per_s: f64,
    requests_per_s: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    tally: Tally,
}

impl Row {
    /// Microseconds of CPU per event verdicted.
    fn per_event(&self, seconds: Option<f64>) -> Option<f64> {
        Some(seconds? * 1e6 / self.tally.events.max(1) as f64)
    }
}

fn row(name: String, mut tally: Tally, (elapsed, cpu): (Duration, Cpu)) -> Row {
    tally.latencies_us.sort_unstable();
    let l = &tally.latencies_us;
    let pct = |p: f64| {
        l.get(((l.len().max(1) - 1) as f64 * p).round() as usize)
            .map_or(0.0, |&us| us as f64 / 1000.0)
    };
    Row {
        name,
        cpu,
        events_per_s: tally.events as f64 / elapsed.as_secs_f64(),
        requests_per_s: tally.requests as f64 / elapsed.as_secs_f64(),
        p50: pct(0.5),
        p99: pct(0.99),
        p999: pct(0.999),
        tally,
    }
}

/// A message a baseline responder publishes besides its reply.
struct Republish {
    subject: String,
    headers: Option<HeaderMap>,
    payload: Bytes,
}

/// Starts a baseline responder on a connection of its own: `answer` turns
/// a request's subject and payload into its reply and the messages to
/// publish alongside it. Subscriptions share a queue group, so that each
/// request has one answer.
async fn respond<F>(
    url: &str,
    subjects: Vec<String>,
    mut answer: F,
) -> Result<JoinHandle<()>, async_nats::Error>
where
    F: FnMut(&str, &Bytes) -> (Bytes, Vec<Republish>) + Send + 'static,
{
    let conn = async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 16)
        .connect(url)
        .await?;
    let mut subs = Vec::new();
    for subject in subjects {
        subs.push(conn.queue_subscribe(subject, "loadgen".into()).await?);
    }
    conn.flush().await?;
    let mut requests = futures_util::stream::select_all(subs);
    Ok(tokio::spawn(async move {
        while let Some(m) = requests.next().await {
            let Some(reply) = m.reply else { continue };
            let (body, republish) = answer(m.subject.as_str(), &m.payload);
            for m in republish {
                let _ = match m.headers {
                    Some(h) => conn.publish_with_headers(m.subject, h, m.payload).await,
                    None => conn.publish(m.subject, m.payload).await,
                };
            }
            let _ = conn.publish(reply, body).await;
        }
    }))
}

/// The `relay` baseline's responder (module docs), and whether the server
/// mapped its single-event subject.
struct Relay {
    task: JoinHandle<()>,
    mapped: Arc<AtomicBool>,
}

/// The tag of the relay's batch subject: fixed when the relay runs in a
/// process of its own.
fn relay_tag<'a>(a: &Args, tag: &'a str) -> &'a str {
    if a.serve_relay || a.relay_pid.is_some() {
        "ext"
    } else {
        tag
    }
}

async fn relay(a: &Args, tag: &str) -> Result<Relay, async_nats::Error> {
    let mapped = Arc::new(AtomicBool::new(false));
    let seen = mapped.clone();
    // New events are spread evenly: every time `credit` reaches one.
    let (share, mut credit) = (1.0 - a.dup_ratio, 0.0);
    let mut is_new = move || {
        credit += share;
        (credit >= 1.0).then(|| credit -= 1.0).is_some()
    };
    let subjects = if a.batch == 0 {
        vec!["loadgen.shard.*.*".to_string(), "loadgen.ingest.*".to_string()]
    } else {
        vec![format!("loadgen.batch.{}", relay_tag(a, tag))]
    };
    let (batch, shards, per_event, protobuf) = (a.batch > 0, a.shards, a.per_event, a.protobuf);
    let single = |shard: u32, payload: Bytes| Republish {
        subject: format!("loadgen.unique.{shard}"),
        headers: None,
        payload,
    };
    let task = respond(&a.url, subjects, move |subject, payload| {
        if !batch {
            seen.store(subject.starts_with("loadgen.shard."), Ordering::Relaxed);
            return match is_new() {
                true => (
                    Bytes::from_static(br#"{"accepted":true}"#),
                    vec![single(shard(payload, shards), payload.clone())],
                ),
                false => (Bytes::from_static(br#"{"accepted":false}"#), Vec::new()),
            };
        }
        let mut verdicts = Vec::new();
        let mut new: Vec<Vec<Range<usize>>> = vec![Vec::new(); shards as usize];
        for range in frames(payload, protobuf) {
            if is_new() {
                verdicts.push(Entry::New);
                new[shard(&payload[range.clone()], shards) as usize].push(range);
            } else {
                verdicts.push(Entry::Duplicate);
            }
        }
        let mut republish = Vec::new();
        for (shard, lines) in new.iter().enumerate().filter(|(_, l)| !l.is_empty()) {
            if per_event {
                republish.extend(
                    lines
                        .iter()
                        .map(|r| single(shard as u32, payload.slice(r.clone()))),
                );
                continue;
            }
            for (joined, count) in join(payload, lines, protobuf) {
                let mut headers = HeaderMap::new();
                headers.insert(COUNT_HEADER, count.to_string().as_str());
                republish.push(Republish {
                    headers: Some(headers),
                    ..single(shard as u32, joined.into())
                });
            }
        }
        (batch::encode(&verdicts).into(), republish)
    })
    .await?;
    Ok(Relay { task, mapped })
}

/// The shard of one of this generator's events, as the sidecar computes it
/// (the id is read at its fixed place, not parsed).
fn shard(event: &[u8], shards: u32) -> u32 {
    // A protobuf event: field 1 (tag 0x0a), a one-byte length, the id.
    if let [0x0a, len, rest @ ..] = event {
        let id = rest.get(..usize::from(*len)).unwrap_or_default();
        return shard_of(std::str::from_utf8(id).unwrap_or(""), shards);
    }
    const PREFIX: &[u8] = br#"{"event_id":""#;
    let id = &event[PREFIX.len()..];
    let end = memchr::memchr(b'"', id).unwrap_or(id.len());
    shard_of(std::str::from_utf8(&id[..end]).unwrap_or(""), shards)
}

/// The sidecar's memory and live ids from its Prometheus endpoint.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    rss_anon: f64,
    rss_file: f64,
    live_ids: f64,
    table_bytes: f64,
}

/// The sidecar's metrics page.
fn scrape(addr: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
    conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    conn.read_to_string(&mut text).map_err(|e| e.to_string())?;
    Ok(text)
}

/// One sample of the sidecar's metrics page.
fn sample(text: &str, name: &str) -> Result<f64, String> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .ok_or_else(|| format!("{name} missing from the metrics"))
}

fn scrape_value(addr: &str, name: &str) -> Result<f64, String> {
    sample(&scrape(addr)?, name)
}

fn memory(addr: &str) -> Result<Memory, String> {
    let text = scrape(addr)?;
    let get = |name: &str| sample(&text, name);
    Ok(Memory {
        rss_anon: get("eventsieve_rss_anon_bytes")?,
        rss_file: get("eventsieve_rss_file_bytes")?,
        live_ids: get("eventsieve_table_live_ids")?,
        table_bytes: get("eventsieve_table_bytes")?,
    })
}

#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let a = args();
    let client = async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 16)
        .connect(&a.url)
        .await?;
    let tag = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let mode = if a.batch == 0 {
        "single".to_string()
    } else {
        format!("batch of {}", a.batch)
    };
    if a.serve_relay {
        let relay = relay(&a, &tag).await?;
        eprintln!(
            "loadgen: serving the relay responder for {} s (pid {})",
            a.seconds,
            std::process::id()
        );
        tokio::time::sleep(Duration::from_secs(a.seconds)).await;
        relay.task.abort();
        return Ok(());
    }
    let mut rows = Vec::new();
    let clocks = Clocks::new(&a);

    if a.raw {
        let echo = respond(&a.url, vec![format!("loadgen.echo.{tag}")], |_, _| {
            (Bytes::from_static(b"ok"), Vec::new())
        })
        .await?;
        let (t, elapsed) = drive(&client, &clocks, Target::Raw, &a, &tag, a.baseline_seconds).await;
        rows.push(row(format!("raw request-reply ({mode})"), t, elapsed));
        echo.abort();
    }
    if a.relay && a.relay_pid.is_some() {
        let (t, elapsed) = drive(&client, &clocks, Target::Relay, &a, &tag, a.baseline_seconds).await;
        rows.push(row(format!("relay, no dedup ({mode}, external)"), t, elapsed));
    } else if a.relay {
        let relay = relay(&a, &tag).await?;
        let (t, elapsed) = drive(&client, &clocks, Target::Relay, &a, &tag, a.baseline_seconds).await;
        let how = match (a.batch, relay.mapped.load(Ordering::Relaxed)) {
            (0, true) => "mapped",
            (0, false) => "NOT mapped",
            _ => "batch",
        };
        rows.push(row(format!("relay, no dedup ({mode}, {how})"), t, elapsed));
        relay.task.abort();
    }
    if a.jetstream {
        let js = jetstream::new(client.clone());
        let name = format!("LOADGEN_{tag}");
        js.create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("loadgen.js.{tag}.>")],
            duplicate_window: a.window,
            max_age: a.window,
            ..Default::default()
        })
        .await?;
        let (t, elapsed) = drive(
            &client,
            &clocks,
            Target::JetStream(Box::new(js.clone())),
            &a,
            &tag,
            a.baseline_seconds,
        )
        .await;
        rows.push(row("JetStream Nats-Msg-Id dedup (single)".into(), t, elapsed));
        js.delete_stream(&name).await?;
    }
    let (t, elapsed) = drive(&client, &clocks, Target::Sidecar, &a, &tag, a.seconds).await;
    rows.push(row(format!("eventsieve ({mode})"), t, elapsed));
    // The sidecar's table figures are walked at most once a second: wait
    // until one walk is sure to follow the run.
    tokio::time::sleep(eventsieve::observe::metrics::CENSUS_EVERY + Duration::from_millis(100)).await;
    let memory = memory(&a.metrics);

    let ours = rows.last().expect("the sidecar run");
    let ratio = |name: &str| {
        rows.iter()
            .find(|r| r.name.starts_with(name))
            .map(|b| (ours.events_per_s / b.events_per_s, ours.p99 / b.p99))
    };
    if a.json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name, "events_per_s": r.events_per_s, "requests_per_s": r.requests_per_s,
                    "p50_ms": r.p50, "p99_ms": r.p99, "p999_ms": r.p999,
                    "requests": r.tally.requests, "events": r.tally.events,
                    "fresh_new": r.tally.fresh_new, "dup_duplicate": r.tally.dup_dup,
                    "wrong": r.tally.wrong, "errors": r.tally.errors, "first_error": r.tally.first_error,
                    "server_cpu_us_per_event": r.per_event(r.cpu.server),
                    "loadgen_cpu_us_per_event": r.per_event(Some(r.cpu.own)),
                    "sidecar_cpu_us_per_event": r.per_event(r.cpu.sidecar),
                    "relay_cpu_us_per_event": r.per_event(r.cpu.relay),
                })
            })
            .collect();
        let memory = match &memory {
            Ok(m) => serde_json::json!({
                "rss_anon_bytes": m.rss_anon, "rss_file_bytes": m.rss_file, "live_ids": m.live_ids,
                "table_bytes": m.table_bytes,
                "anon_bytes_per_live_id": m.rss_anon / m.live_ids.max(1.0),
            }),
            Err(e) => serde_json::json!({ "error": e }),
        };
        println!(
            "{}",
            serde_json::json!({
                "inflight": a.inflight, "batch": a.batch, "size": [a.size.0, a.size.1],
                "dup_ratio": a.dup_ratio, "runs": list, "sidecar_memory": memory,
                "ratio_to_raw": ratio("raw").map(|r| r.0), "p99_ratio_to_raw": ratio("raw").map(|r| r.1),
                "ratio_to_relay": ratio("relay").map(|r| r.0), "p99_ratio_to_relay": ratio("relay").map(|r| r.1),
                "ratio_to_jetstream": ratio("JetStream").map(|r| r.0),
            })
        );
        return Ok(());
    }
    println!(
        "mode={mode} inflight={} size={}-{}B dup_ratio={} seconds={} (baselines {}) max_events={}",
        a.inflight, a.size.0, a.size.1, a.dup_ratio, a.seconds, a.baseline_seconds, a.max_events
    );
    println!(
        "{:<40} {:>11} {:>10} {:>8} {:>8} {:>9} {:>10} {:>10} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8}",
        "run",
        "events/s",
        "req/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "new=new",
        "dup=dup",
        "wrong",
        "errors",
        "srv µs",
        "gen µs",
        "side µs",
        "relay µs"
    );
    let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for r in &rows {
        println!(
            "{:<40} {:>11.0} {:>10.0} {:>8.3} {:>8.3} {:>9.3} {:>10} {:>10} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8}",
            r.name,
            r.events_per_s,
            r.requests_per_s,
            r.p50,
            r.p99,
            r.p999,
            r.tally.fresh_new,
            r.tally.dup_dup,
            r.tally.wrong,
            r.tally.errors,
            us(r.per_event(r.cpu.server)),
            us(r.per_event(Some(r.cpu.own))),
            us(r.per_event(r.cpu.sidecar)),
            us(r.per_event(r.cpu.relay)),
        );
    }
    println!(
        "CPU per event verdicted: srv = nats-server, gen = this load generator (and the baselines' responders), side = the sidecar, relay = an external relay (--relay-pid)"
    );
    for r in rows.iter().filter(|r| r.tally.errors > 0) {
        let first = r.tally.first_error.as_deref().unwrap_or("?");
        println!(
            "{}: {} events without a verdict; the first error: {first}",
            r.name, r.tally.errors
        );
    }
    if let Some((rate, p99)) = ratio("raw") {
        println!("eventsieve / raw request-reply:  events/s {rate:.2}x, p99 {p99:.2}x");
    }
    if let Some((rate, p99)) = ratio("relay") {
        println!("eventsieve / relay, no dedup:    events/s {rate:.2}x, p99 {p99:.2}x");
    }
    if let Some((rate, p99)) = ratio("JetStream") {
        println!("eventsieve / JetStream dedup:    events/s {rate:.2}x, p99 {p99:.2}x");
    }
    match memory {
        Ok(m) => println!(
            "sidecar memory: RssAnon {:.1} MiB, RssFile {:.1} MiB, live ids {:.0}: {:.1} anon bytes per live id (tables {:.1})",
            m.rss_anon / 1048576.0,
            m.rss_file / 1048576.0,
            m.live_ids,
            m.rss_anon / m.live_ids.max(1.0),
            m.table_bytes / m.live_ids.max(1.0),
        ),
        Err(e) => println!("sidecar memory: metrics endpoint not readable ({e})"),
    }
    Ok(())
}
