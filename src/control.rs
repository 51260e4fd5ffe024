//! What operators change and read while the sidecar serves: the window, and
//! each node's status.
//!
//! **The window set** starts as the configuration's `window` and can be
//! changed at run time (`eventsieve window set 2h`):
//!
//! - With a KV bucket (`kv_bucket`, default `eventsieve`, created if
//!   absent), the key `window` holds it as text (`2h`), readable with
//!   `nats kv get eventsieve window`. Every sidecar watches the key and
//!   applies each new value; deleting the key (`eventsieve window reset`)
//!   goes back to the configured window. A sidecar reads the key before it
//!   rebuilds its tables, so a restart keeps the window.
//! - Without one (no JetStream, or `kv_bucket = ""`), a request to
//!   `<prefix>.window` reaches every sidecar; each applies it and keeps it
//!   in `<data_dir>/window` (durability `memory` keeps it until the process
//!   ends).
//!
//! A smaller window applies to the ids held at once; a larger one as far as
//! the ids the tables still hold reach (see `Table::set_window`; the
//! journal expires ids at the window set, and remembers how far it did, so
//! a restart does not claim more). `max_table_bytes` may hold the window in
//! force below the window set.
//!
//! `<prefix>.window` answers every sidecar's window (empty payload), sets it
//! (a duration such as `2h`: in the bucket when there is one) or resets it
//! (`reset`). `<prefix>.status` answers each node's status. Both reach every
//! sidecar (no queue group); the requester gathers the replies.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use async_nats::{Client, Message};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::config::{Durability, Settings, parse_duration_ms};
use crate::engine::table::MAX_WINDOW_MS;
use crate::engine::unix_ms;
use crate::observe::metrics::{Endpoint, Metrics};
use crate::transport::nats::Context;
use crate::transport::nats::fence::{self, Answer, Plain};
use crate::transport::nats::subscription::{publish, reply_error};
use tokio::sync::watch;

/// The KV key of the window set at run time.
pub const WINDOW_KEY: &str = "window";
/// The file of the window set at run time, in `data_dir`, without a bucket.
pub const WINDOW_FILE: &str = "window";
/// Pause before watching the key again after the watch ended.
const REWATCH_AFTER: Duration = Duration::from_secs(1);

/// Where a window set at run time is kept.
pub enum Keeper {
    /// The KV bucket's `window` key, watched by every sidecar.
    Kv(Box<kv::Store>),
    /// `<data_dir>/window`: this node only.
    File(PathBuf),
    /// Nowhere (durability `memory` without a bucket): until the process ends.
    Nowhere,
}

impl Keeper {
    fn describe(&self) -> String {
        match self {
            Keeper::Kv(store) => format!("kv:{}/{WINDOW_KEY}", store.name),
            Keeper::File(path) => format!("file:{}", path.display()),
            Keeper::Nowhere => "nowhere".into(),
        }
    }
}

/// Where the window set came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Config,
    RunTime,
}

/// A window given at run time: its text as given and its length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowValue {
    pub text: String,
    pub ms: u64,
}

impl WindowValue {
    /// A duration of 1 ms to 7 d, e.g. `2h`.
    ///
    /// # Errors
    ///
    /// What is wrong with `text`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        parse_duration_ms(text)
            .filter(|ms| (1..=MAX_WINDOW_MS).contains(ms))
            .map(|ms| Self {
                text: text.to_owned(),
                ms,
            })
            .ok_or_else(|| format!("window {text:?}: expected 1ms to 7d, e.g. \"2h\", \"30m\", \"7d\""))
    }
}

/// The window set, shared by the tables, the journal writer and the memory
/// budget.
pub struct Window {
    configured_ms: u64,
    /// The window set: what the writer expires at and the budget grows
    /// back to.
    set_ms: Arc<AtomicU64>,
    source: Mutex<Source>,
    keeper: Keeper,
    metrics: Arc<Metrics>,
}

impl Window {
    /// Finds where a window set at run time is kept and reads it; the
    /// configured window if there is none or it cannot be read (said in a
    /// warning).
    pub async fn open(client: &Client, settings: &Settings, metrics: Arc<Metrics>) -> Self {
        let keeper = keeper(client, settings).await;
        let kept = match &keeper {
            Keeper::Kv(store) => match store.get(WINDOW_KEY).await {
                Ok(value) => value.map(|v| String::from_utf8_lossy(&v).into_owned()),
                Err(e) => {
                    tracing::warn!(message = "Cannot read the window key; using the configured window.", error = %e);
                    None
                }
            },
            Keeper::File(path) => std::fs::read_to_string(path).ok(),
            Keeper::Nowhere => None,
        };
        let kept = kept.and_then(|text| match WindowValue::parse(&text) {
            Ok(value) => Some(value),
            Err(e) => {
                tracing::warn!(message = "Ignoring the window kept; using the configured window.", kept_in = %keeper.describe(), error = %e);
                None
            }
        });
        let (ms, source) = match &kept {
            Some(value) => (value.ms, Source::RunTime),
            None => (settings.window_ms, Source::Config),
        };
        metrics.window_ms.store(ms, Relaxed);
        tracing::info!(
            message = "Window set.",
            window_ms = ms,
            configured_ms = settings.window_ms,
            source = ?source,
            kept_in = %keeper.describe(),
        );
        Self {
            configured_ms: settings.window_ms,
            set_ms: Arc::new(AtomicU64::new(ms)),
            source: Mutex::new(source),
            keeper,
            metrics,
        }
    }

    /// The window set, in ms.
    pub fn ms(&self) -> u64 {
        self.set_ms.load(Relaxed)
    }

    /// The window set, shared (the journal writer expires at it).
    pub fn shared(&self) -> Arc<AtomicU64> {
        self.set_ms.clone()
    }

    /// Sets the window of the tables to `value` (`None`: the configured one).
    fn apply(&self, ctx: &Context, value: Option<&WindowValue>) {
        let (ms, source) = match value {
            Some(v) => (v.ms, Source::RunTime),
            None => (self.configured_ms, Source::Config),
        };
        let mut current = self.source.lock().unwrap_or_else(PoisonError::into_inner);
        if self.ms() == ms && *current == source {
            return;
        }
        let from = self.set_ms.swap(ms, Relaxed);
        *current = source;
        drop(current);
        ctx.pipeline.dedup().set_window(ms, unix_ms());
        self.metrics.window_ms.store(ms, Relaxed);
        Metrics::inc(&self.metrics.window_changes);
        tracing::info!(message = "Window changed.", from_ms = from, to_ms = ms, source = ?source);
    }

    /// Keeps `value` (`None`: forgets the window kept) and applies it.
    async fn set(&self, ctx: &Context, value: Option<&WindowValue>) -> Result<(), String> {
        match (&self.keeper, value) {
            // Every sidecar receives the request: the first puts the value,
            // the others find it there.
            (Keeper::Kv(store), Some(v)) => match store.get(WINDOW_KEY).await {
                Ok(Some(kept)) if kept == v.text.as_bytes() => Ok(()),
                _ => store
                    .put(WINDOW_KEY, Bytes::from(v.text.clone()))
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
            },
            (Keeper::Kv(store), None) => store.delete(WINDOW_KEY).await.map_err(|e| e.to_string()),
            (Keeper::File(path), Some(v)) => write_atomically(path, &v.text).map_err(|e| e.to_string()),
            (Keeper::File(path), None) => match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            },
            (Keeper::Nowhere, _) => Ok(()),
        }
        .map_err(|e| format!("cannot keep the window in {}: {e}", self.keeper.describe()))?;
        self.apply(ctx, value);
        Ok(())
    }

    /// This node's window, as `<prefix>.window` answers it.
    pub fn describe(&self, ctx: &Context, node: &str) -> Value {
        let source = *self.source.lock().unwrap_or_else(PoisonError::into_inner);
        json!({
            "node": node,
            "window_ms": self.ms(),
            "in_force_ms": ctx.pipeline.dedup().window_in_force(unix_ms()),
            "configured_ms": self.configured_ms,
            "source": match source { Source::Config => "config", Source::RunTime => "run-time" },
            "kept_in": self.keeper.describe(),
        })
    }

    /// Applies every change of the KV key until aborted; nothing to do
    /// without a bucket.
    pub async fn watch(self: Arc<Self>, ctx: Arc<Context>) {
        let Keeper::Kv(store) = &self.keeper else {
            return;
        };
        loop {
            match store.watch_with_history(WINDOW_KEY).await {
                Ok(mut entries) => {
                    while let Some(entry) = entries.next().await {
                        match entry {
                            Ok(entry) => self.entry(&ctx, &entry),
                            Err(e) => {
                                tracing::warn!(message = "Watching the window key failed; watching again.", error = %e);
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(message = "Cannot watch the window key; retrying.", error = %e),
            }
            tokio::time::sleep(REWATCH_AFTER).await;
        }
    }

    fn entry(&self, ctx: &Context, entry: &kv::Entry) {
        match entry.operation {
            kv::Operation::Put => match WindowValue::parse(&String::from_utf8_lossy(&entry.value)) {
                Ok(value) => self.apply(ctx, Some(&value)),
                Err(e) => {
                    Metrics::inc(&self.metrics.window_rejected);
                    tracing::warn!(message = "Ignoring a window put in the KV bucket; keeping the window set.", error = %e, revision = entry.revision);
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => self.apply(ctx, None),
        }
    }
}

/// The bucket if there is one (created if absent), else the file or nothing.
async fn keeper(client: &Client, settings: &Settings) -> Keeper {
    let fallback = || match settings.config.durability {
        Durability::Memory => Keeper::Nowhere,
        Durability::Local | Durability::Replicated => {
            Keeper::File(settings.config.data_dir.join(WINDOW_FILE))
        }
    };
    let bucket = &settings.config.kv_bucket;
    if bucket.is_empty() {
        return fallback();
    }
    match open_bucket(client, bucket, settings.config.cluster.replicas).await {
        Ok(store) => Keeper::Kv(Box::new(store)),
        Err(e) => {
            let keeper = fallback();
            tracing::warn!(
                message = "No KV bucket: the window set at run time follows requests to <prefix>.window on this node only.",
                bucket = %bucket,
                error = %e,
                kept_in = %keeper.describe(),
            );
            keeper
        }
    }
}

/// Opens `bucket`, creating it with `replicas` replicas if absent.
///
/// # Errors
///
/// Why it can be neither opened nor created (e.g. no JetStream).
pub async fn open_bucket(client: &Client, bucket: &str, replicas: usize) -> Result<kv::Store, String> {
    let js = async_nats::jetstream::new(client.clone());
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    let config = kv::Config {
        bucket: bucket.to_owned(),
        description: "eventsieve: the window set at run time, shard leases, nodes".into(),
        history: 8,
        num_replicas: replicas,
        // Per-key TTL for leases and heartbeats, and a marker when one
        // expires (so that `nats kv watch` shows it): nats-server 2.11+.
        limit_markers: Some(EXPIRY_MARKER_TTL),
        ..Default::default()
    };
    match js.create_key_value(config.clone()).await {
        Ok(store) => Ok(store),
        // An older server: the window works without per-key TTL.
        Err(_) => {
            js.create_key_value(kv::Config {
                limit_markers: None,
                ..config
            })
            .await
        }
    }
    .map_err(|e| format!("cannot open or create KV bucket {bucket:?}: {e}"))
}

/// How long the marker of an expired lease or heartbeat stays in the
/// bucket. The server raises a shorter per-key TTL to this, so it must be
/// below any lease TTL.
pub const EXPIRY_MARKER_TTL: Duration = Duration::from_secs(1);

fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{text}\n"))?;
    std::fs::rename(&tmp, path)
}

/// Answers `<prefix>.window` and `<prefix>.status` until `stop` changes;
/// then fences both subscriptions and answers every request routed here
/// before the fence.
///
/// # Errors
///
/// If the subscriptions cannot be made.
pub async fn serve(
    ctx: Arc<Context>,
    window: Arc<Window>,
    node: String,
    started: Instant,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError> {
    let responder = Arc::new(Responder {
        ctx: ctx.clone(),
        window,
        node,
        started,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for subject in [ctx.subjects.window(), ctx.subjects.status()] {
        let sub = Plain::new(ctx.client.subscribe(subject.to_owned()).await?);
        let (responder, mut stop) = (responder.clone(), stop.clone());
        let subject = async_nats::Subject::from(subject);
        tasks.spawn(async move {
            let mut sub = sub;
            loop {
                tokio::select! {
                    message = sub.next() => match message {
                        Some(message) => responder.answer(message).await,
                        None => return,
                    },
                    _ = async { drop(stop.wait_for(|stopped| *stopped).await) } => break,
                }
            }
            let client = responder.ctx.client.clone();
            sub.fence(&client, &subject, &*responder).await;
        });
    }
    Ok(tokio::spawn(
        async move { while tasks.join_next().await.is_some() {} },
    ))
}

/// What the window and status requests are answered from.
struct Responder {
    ctx: Arc<Context>,
    window: Arc<Window>,
    /// This node's id, as replies name it.
    node: String,
    /// When the service started (uptime).
    started: Instant,
}

impl fence::Answer for Responder {
    async fn answer(&self, message: Message) {
        let ctx = &self.ctx;
        let received = Instant::now();
        if fence::is_fence(&message) {
            return;
        }
        let Some(to) = message.reply.clone() else { return };
        if ctx.subjects.is_ours(&to) {
            Metrics::inc(&ctx.metrics.refused_replies);
            return;
        }
        if message.subject.as_str() == ctx.subjects.status() {
            let status = status(ctx, &self.window, &self.node, self.started).await;
            publish(ctx, to, status.to_string().into()).await;
            return ctx.metrics.served(Endpoint::Status, received, false);
        }
        let error = match window_request(ctx, &self.window, &message).await {
            Ok(()) => {
                let described = self.window.describe(ctx, &self.node).to_string();
                publish(ctx, to, described.into()).await;
                false
            }
            Err(e) => {
                reply_error(ctx, to, 400, &e).await;
                true
            }
        };
        ctx.metrics.served(Endpoint::Window, received, error);
    }
}

/// Empty: nothing to do; `reset`: the configured window; else a duration.
async fn window_request(ctx: &Context, window: &Window, message: &Message) -> Result<(), String> {
    let text = std::str::from_utf8(&message.payload)
        .map_err(|_| "the window must be text, e.g. \"2h\"".to_string())?;
    match text.trim() {
        "" => Ok(()),
        "reset" => window.set(ctx, None).await,
        text => window.set(ctx, Some(&WindowValue::parse(text)?)).await,
    }
}

/// This node: its shards, window and tables.
async fn status(ctx: &Arc<Context>, window: &Window, node: &str, started: Instant) -> Value {
    let owned = ctx.pipeline.ownership().owned();
    let ready = owned
        .iter()
        .filter(|&&s| ctx.pipeline.ownership().state(s) == crate::pipeline::ShardState::Ready)
        .count();
    let c = ctx.clone();
    let census = tokio::task::spawn_blocking(move || c.metrics.census.get(c.pipeline.dedup())).await;
    let (live, bytes) = census.map_or((0, 0), |c| (c.live, c.bytes));
    json!({
        "node": node,
        "shards": ctx.pipeline.ownership().shards(),
        "owned": owned,
        "ready": ready,
        "window": window.describe(ctx, node),
        "live_ids": live,
        "table_bytes": bytes,
        "verdicts": ctx.metrics.answered(),
        "uptime_s": started.elapsed().as_secs(),
    })
}

/// Longest an operator's request waits for replies.
const GATHER_WAIT: Duration = Duration::from_secs(2);
/// Once replies come, the request ends when none came for this long.
const GATHER_QUIET: Duration = Duration::from_millis(300);

/// Sends `payload` to `subject`, which every sidecar receives, and gathers
/// the replies: until [`GATHER_QUIET`] passes without one, at most
/// [`GATHER_WAIT`].
///
/// # Errors
///
/// If the request cannot be sent.
pub async fn gather(client: &Client, subject: String, payload: Bytes) -> Result<Vec<Message>, String> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.map_err(|e| e.to_string())?;
    client
        .publish_with_reply(subject, inbox, payload)
        .await
        .map_err(|e| e.to_string())?;
    client.flush().await.map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + GATHER_WAIT;
    let mut out = Vec::new();
    loop {
        let quiet = tokio::time::Instant::now() + GATHER_QUIET;
        let until = if out.is_empty() {
            deadline
        } else {
            deadline.min(quiet)
        };
        match tokio::time::timeout_at(until, replies.next()).await {
            // The server's word that nobody is subscribed.
            Ok(Some(m)) if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) => return Ok(out),
            Ok(Some(message)) => out.push(message),
            _ => return Ok(out),
        }
    }
}

/// A reply's JSON body, or the error it carries.
fn reply_body(message: &Message) -> Result<Value, String> {
    if let Some(reason) = message.headers.as_ref().and_then(|h| h.get("Nats-Service-Error")) {
        return Err(reason.to_string());
    }
    serde_json::from_slice(&message.payload).map_err(|e| format!("unreadable reply: {e}"))
}

/// `ms` in the largest unit that divides it: `2h`, `90m`, `1500ms`.
pub fn format_ms(ms: u64) -> String {
    for (unit, scale) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms > 0 && ms.is_multiple_of(scale) {
            return format!("{}{unit}", ms / scale);
        }
    }
    format!("{ms}ms")
}

/// `eventsieve window [set <w> | reset]`: `request` is `None` to read,
/// `Some(None)` to reset, `Some(Some(w))` to set. Returns a line per node.
///
/// # Errors
///
/// NATS unreachable, a node refusing, or nobody to answer or keep it.
pub async fn window_command(
    settings: &Settings,
    request: Option<Option<WindowValue>>,
) -> Result<Vec<String>, String> {
    let client = crate::transport::nats::options::connect(&settings.config.nats, Arc::default())
        .await
        .map_err(|e| e.to_string())?;
    let subject = format!("{}.window", settings.config.subject_prefix);
    let payload = match &request {
        None => Bytes::new(),
        Some(None) => Bytes::from_static(b"reset"),
        Some(Some(v)) => Bytes::from(v.text.clone()),
    };
    let replies = gather(&client, subject.clone(), payload).await?;
    let mut lines = Vec::new();
    for reply in &replies {
        let w = reply_body(reply).map_err(|e| format!("a sidecar refused: {e}"))?;
        let ms = |field: &str| format_ms(w[field].as_u64().unwrap_or(0));
        lines.push(format!(
            "{}  window {} ({}, kept in {})  in force {}  configured {}",
            w["node"].as_str().unwrap_or("?"),
            ms("window_ms"),
            w["source"].as_str().unwrap_or("?"),
            w["kept_in"].as_str().unwrap_or("?"),
            ms("in_force_ms"),
            ms("configured_ms"),
        ));
    }
    if !replies.is_empty() {
        return Ok(lines);
    }
    // Nobody serving: a change still goes into the bucket for those that start.
    let Some(change) = request else {
        return Err(format!("no sidecar answered on {subject}"));
    };
    let bucket = &settings.config.kv_bucket;
    if bucket.is_empty() {
        return Err(format!(
            "no sidecar answered on {subject}, and kv_bucket is empty: nothing changed"
        ));
    }
    let store = open_bucket(&client, bucket, settings.config.cluster.replicas)
        .await
        .map_err(|e| format!("no sidecar answered on {subject}, and {e}: nothing changed"))?;
    match change {
        Some(v) => store
            .put(WINDOW_KEY, Bytes::from(v.text))
            .await
            .map(drop)
            .map_err(|e| e.to_string())?,
        None => store.delete(WINDOW_KEY).await.map_err(|e| e.to_string())?,
    }
    Ok(vec![format!(
        "no sidecar answered; kept in kv:{bucket}/{WINDOW_KEY} for those that start"
    )])
}

/// `eventsieve status`: a line per node (or its reply as JSON).
///
/// # Errors
///
/// NATS unreachable, or no sidecar answered.
pub async fn status_command(settings: &Settings, json: bool) -> Result<Vec<String>, String> {
    let client = crate::transport::nats::options::connect(&settings.config.nats, Arc::default())
        .await
        .map_err(|e| e.to_string())?;
    let subject = format!("{}.status", settings.config.subject_prefix);
    let replies = gather(&client, subject.clone(), Bytes::new()).await?;
    if replies.is_empty() {
        return Err(format!("no sidecar answered on {subject}"));
    }
    let mut lines = Vec::new();
    for reply in &replies {
        let s = reply_body(reply)?;
        if json {
            lines.push(s.to_string());
            continue;
        }
        let owned: Vec<u32> = serde_json::from_value(s["owned"].clone()).unwrap_or_default();
        let (live, bytes) = (
            s["live_ids"].as_u64().unwrap_or(0),
            s["table_bytes"].as_u64().unwrap_or(0),
        );
        let w = &s["window"];
        lines.push(format!(
            "{}  shards {} of {} ({} ready)  window {} (in force {})  live ids {live}  table {bytes} B ({:.1} B/id)  verdicts {}  up {} s",
            s["node"].as_str().unwrap_or("?"),
            shard_ranges(&owned),
            s["shards"],
            s["ready"],
            format_ms(w["window_ms"].as_u64().unwrap_or(0)),
            format_ms(w["in_force_ms"].as_u64().unwrap_or(0)),
            bytes as f64 / live.max(1) as f64,
            s["verdicts"],
            s["uptime_s"],
        ));
    }
    if settings.config.durability == Durability::Replicated {
        let rows = crate::cluster::lease_table(&client, settings).await?;
        if json {
            lines.push(json!({ "leases": rows }).to_string());
        } else {
            lines.push("shard  owner                   epoch  journal seq (lease / last)".into());
            for r in &rows {
                let owner = r["owner"].as_str().unwrap_or_default();
                lines.push(format!(
                    "{:>5}  {:<22}  {:>5}  {} / {}",
                    r["shard"],
                    if owner.is_empty() { "(free)" } else { owner },
                    r["epoch"].as_u64().map_or("-".into(), |e| e.to_string()),
                    r["journal_seq"].as_u64().map_or("-".into(), |e| e.to_string()),
                    r["journal_last"],
                ));
            }
        }
    }
    Ok(lines)
}

/// `0-15,20`.
fn shard_ranges(shards: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < shards.len() {
        let mut j = i;
        while j + 1 < shards.len() && shards[j + 1] == shards[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            shards[i].to_string()
        } else {
            format!("{}-{}", shards[i], shards[j])
        });
        i = j + 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_within_bounds_and_print_in_their_largest_unit() {
        assert_eq!(
            WindowValue::parse(" 2h ").unwrap(),
            WindowValue {
                text: "2h".into(),
                ms: 7_200_000
            }
        );
        for bad in ["", "0s", "8d", "soon", "2"] {
            assert!(WindowValue::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_ms(7_200_000), "2h");
        assert_eq!(format_ms(5_400_000), "90m");
        assert_eq!(format_ms(1500), "1500ms");
        assert_eq!(format_ms(604_800_000), "7d");
    }

    #[test]
    fn shard_lists_print_as_ranges() {
        assert_eq!(shard_ranges(&[0, 1, 2, 3, 7, 9, 10]), "0-3,7,9-10");
        assert_eq!(shard_ranges(&[]), "none");
    }
}
