//! The window set at run time: its state, where it is kept, the
//! `<prefix>.window` request, and the CLI's `eventsieve window`.
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

use async_nats::jetstream::kv;
use async_nats::{Client, Message};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::config::{Durability, Settings, parse_duration_ms};
use crate::engine::table::MAX_WINDOW_MS;
use crate::engine::unix_ms;
use crate::observe::metrics::Metrics;
use crate::shared::Shared;

use super::{format_ms, gather, reply_body};
use crate::nats::kv::{open_bucket, watch_key};

/// The KV key of the window set at run time.
pub const WINDOW_KEY: &str = "window";
/// The file of the window set at run time, in `data_dir`, without a bucket.
pub const WINDOW_FILE: &str = "window";

/// Where a window set at run time is kept.
pub enum KeptIn {
    /// The KV bucket's `window` key, watched by every sidecar.
    Kv(Box<kv::Store>),
    /// `<data_dir>/window`: this node only.
    File(PathBuf),
    /// Nowhere (durability `memory` without a bucket): until the process ends.
    Nowhere,
}

impl KeptIn {
    fn describe(&self) -> String {
        match self {
            KeptIn::Kv(store) => format!("kv:{}/{WINDOW_KEY}", store.name),
            KeptIn::File(path) => format!("file:{}", path.display()),
            KeptIn::Nowhere => "nowhere".into(),
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
    keeper: KeptIn,
    metrics: Arc<Metrics>,
}

impl Window {
    /// Finds where a window set at run time is kept and reads it; the
    /// configured window if there is none or it cannot be read (said in a
    /// warning).
    pub async fn open(client: &Client, settings: &Settings, metrics: Arc<Metrics>) -> Self {
        let keeper = kept_in(client, settings).await;
        let kept = match &keeper {
            KeptIn::Kv(store) => match store.get(WINDOW_KEY).await {
                Ok(value) => value.map(|v| String::from_utf8_lossy(&v).into_owned()),
                Err(e) => {
                    tracing::warn!(message = "Cannot read the window key; using the configured window.", error = %e);
                    None
                }
            },
            KeptIn::File(path) => std::fs::read_to_string(path).ok(),
            KeptIn::Nowhere => None,
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

    /// The KV bucket the sidecars share, if this node reached it (the
    /// routing rules are kept there too).
    pub fn bucket(&self) -> Option<&kv::Store> {
        match &self.keeper {
            KeptIn::Kv(store) => Some(store),
            _ => None,
        }
    }

    /// The window set, shared (the journal writer expires at it).
    pub fn shared(&self) -> Arc<AtomicU64> {
        self.set_ms.clone()
    }

    /// Sets the window of the tables to `value` (`None`: the configured one).
    fn apply(&self, ctx: &Shared, value: Option<&WindowValue>) {
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
    async fn set(&self, ctx: &Shared, value: Option<&WindowValue>) -> Result<(), String> {
        match (&self.keeper, value) {
            // Every sidecar receives the request: the first puts the value,
            // the others find it there.
            (KeptIn::Kv(store), Some(v)) => match store.get(WINDOW_KEY).await {
                Ok(Some(kept)) if kept == v.text.as_bytes() => Ok(()),
                _ => store
                    .put(WINDOW_KEY, Bytes::from(v.text.clone()))
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
            },
            (KeptIn::Kv(store), None) => store.delete(WINDOW_KEY).await.map_err(|e| e.to_string()),
            (KeptIn::File(path), Some(v)) => write_atomically(path, &v.text).map_err(|e| e.to_string()),
            (KeptIn::File(path), None) => match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            },
            (KeptIn::Nowhere, _) => Ok(()),
        }
        .map_err(|e| format!("cannot keep the window in {}: {e}", self.keeper.describe()))?;
        self.apply(ctx, value);
        Ok(())
    }

    /// This node's window, as `<prefix>.window` answers it.
    pub fn describe(&self, ctx: &Shared, node: &str) -> Value {
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
    pub async fn watch(self: Arc<Self>, ctx: Arc<Shared>) {
        let KeptIn::Kv(store) = &self.keeper else {
            return;
        };
        watch_key(store, WINDOW_KEY, "window", |entry| {
            self.entry(&ctx, &entry);
            std::future::ready(())
        })
        .await;
    }

    fn entry(&self, ctx: &Shared, entry: &kv::Entry) {
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
async fn kept_in(client: &Client, settings: &Settings) -> KeptIn {
    let fallback = || match settings.config.durability {
        Durability::Memory => KeptIn::Nowhere,
        Durability::Local | Durability::Replicated => {
            KeptIn::File(settings.config.data_dir.join(WINDOW_FILE))
        }
    };
    let bucket = &settings.config.kv_bucket;
    if bucket.is_empty() {
        return fallback();
    }
    match open_bucket(client, bucket, settings.config.cluster.replicas).await {
        Ok(store) => KeptIn::Kv(Box::new(store)),
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

fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{text}\n"))?;
    std::fs::rename(&tmp, path)
}

/// Empty: nothing to do; `reset`: the configured window; else a duration.
pub(super) async fn window_request(ctx: &Shared, window: &Window, message: &Message) -> Result<(), String> {
    let text = std::str::from_utf8(&message.payload)
        .map_err(|_| "the window must be text, e.g. \"2h\"".to_string())?;
    match text.trim() {
        "" => Ok(()),
        "reset" => window.set(ctx, None).await,
        text => window.set(ctx, Some(&WindowValue::parse(text)?)).await,
    }
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
    let client = crate::nats::options::connect(&settings.config.nats, Arc::default())
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
}
