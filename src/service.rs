//! The sidecar: NATS subscriptions, verdict replies, republish, group
//! commit to the store, `$SRV` discovery and clean shutdown.
//!
//! Per request: parse and key the event (pure, on the subscription's task),
//! then
//! - duplicate → reply `{"accepted":false}`;
//! - new, durability `memory` → republish, reply `{"accepted":true}`;
//! - new, durability `local` → queue for the commit task, which writes a
//!   whole group in one LMDB transaction off the runtime, then republishes
//!   and replies `true` for each id of the group (or 500 and forgets them
//!   if the commit failed);
//! - bad input → 400 with `Nats-Service-Error` headers, nothing changes;
//! - shard not owned here → forwarded to `<prefix>.shard.<n>.<id>`, the
//!   owner's answer relayed; shard not ready or no owner → 503.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap, Message, Subject};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::batch::{self, Decision, Entry, Route};
use crate::config::{Durability, Settings};
use crate::engine::{Deduplicator, Keyed, unix_ms};
use crate::metrics::Metrics;
use crate::store::{Record, Store, StoreError, StoreMeta};
use crate::table::Verdict;

const ACCEPTED: &[u8] = br#"{"accepted":true}"#;
const DUPLICATE: &[u8] = br#"{"accepted":false}"#;
/// Most ids in one group commit.
const MAX_GROUP: usize = 8192;
/// Most batches and forwards one subscription has in progress.
const MAX_TASKS: usize = 256;
/// How often expired ids are deleted from the store and tables swept.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

/// Why the service stopped or could not start.
#[derive(Debug)]
pub enum ServiceError {
    /// The NATS server could not be reached or refused the connection.
    Connect(String),
    /// A subscription could not be made.
    Subscribe(String),
    /// The store could not be opened or read.
    Store(StoreError),
    /// The metrics address could not be bound.
    Metrics(std::io::Error),
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "cannot connect to NATS: {e}"),
            Self::Subscribe(e) => write!(f, "cannot subscribe: {e}"),
            Self::Store(e) => write!(f, "store: {e}"),
            Self::Metrics(e) => write!(f, "cannot serve metrics: {e}"),
        }
    }
}

impl std::error::Error for ServiceError {}

/// An accepted id waiting for the commit that covers it.
struct Pending {
    record: Record,
    reply: Option<Subject>,
    event: Bytes,
}

enum ToCommit {
    Id(Pending),
    /// A batch's new ids; whether their commit succeeded is sent back.
    Batch {
        records: Vec<Record>,
        done: oneshot::Sender<bool>,
    },
    /// Commit what came before, then stop.
    Stop,
}

/// State shared by every task of the service.
struct Shared {
    settings: Settings,
    dedup: Deduplicator,
    client: Client,
    metrics: Arc<Metrics>,
    owned: Vec<bool>,
    ready: Vec<AtomicBool>,
    output: Vec<Subject>,
    /// `<prefix>.batch`.
    batch_subject: Subject,
    commits: Option<mpsc::Sender<ToCommit>>,
}

/// A running service: stop it with [`Running::shutdown`].
pub struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), ServiceError>>,
    metrics: Arc<Metrics>,
}

impl Running {
    /// Stops taking requests, answers those in flight, commits, closes.
    ///
    /// # Errors
    ///
    /// What stopped the service, if it failed while running.
    pub async fn shutdown(self) -> Result<(), ServiceError> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or(Ok(()))
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Runs the service until `shutdown` completes, then stops cleanly.
///
/// # Errors
///
/// A [`ServiceError`] if it cannot start.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), ServiceError> {
    let running = start(settings).await?;
    shutdown.await;
    tracing::info!(message = "Shutting down: draining subscriptions.");
    running.shutdown().await
}

/// Connects, recovers the owned shards from the store, subscribes, and
/// returns once requests are being answered.
///
/// # Errors
///
/// A [`ServiceError`] if NATS, the store or the metrics address fail.
pub async fn start(settings: Settings) -> Result<Running, ServiceError> {
    let metrics = Arc::new(Metrics::default());
    let client = connect(&settings, metrics.clone()).await?;
    let dedup = Deduplicator::new(settings.engine());
    let shards = settings.config.shards;
    let mut owned = vec![false; shards as usize];
    for &s in &settings.owned {
        owned[s as usize] = true;
    }

    let store = match settings.config.durability {
        Durability::Memory => None,
        Durability::Local => {
            let (dir, fsync) = (settings.config.data_dir.clone(), settings.config.fsync);
            let meta = StoreMeta {
                shards,
                window_ms: settings.window_ms,
            };
            let store = tokio::task::spawn_blocking(move || Store::open(&dir, meta, fsync))
                .await
                .expect("store open task panicked")
                .map_err(ServiceError::Store)?;
            Some(store)
        }
    };
    let (commit_tx, commit_rx) = mpsc::channel(settings.config.max_pending);
    let shared = Arc::new(Shared {
        output: (0..shards)
            .map(|s| Subject::from(settings.output_subject(s)))
            .collect(),
        ready: (0..shards).map(|_| AtomicBool::new(false)).collect(),
        batch_subject: Subject::from(format!("{}.batch", settings.config.subject_prefix)),
        commits: store.is_some().then_some(commit_tx),
        settings,
        dedup,
        client,
        metrics: metrics.clone(),
        owned,
    });

    // Subscribe first, so that requests during recovery get 503, not silence.
    let (stop_tx, stop_rx) = watch::channel(false);
    let prefix = shared.settings.config.subject_prefix.clone();
    // (subject, queue group, fence subject)
    let mut subjects: Vec<(String, Option<String>, String)> = shared
        .settings
        .owned
        .iter()
        .map(|s| {
            (
                format!("{prefix}.shard.{s}.*"),
                None,
                format!("{prefix}.shard.{s}._fence"),
            )
        })
        .collect();
    for fallback in [format!("{prefix}.ingest"), format!("{prefix}.batch")] {
        subjects.push((fallback.clone(), Some(fallback.clone()), fallback));
    }
    let mut subscriptions = JoinSet::new();
    for (subject, queue, fence_subject) in subjects {
        let sub = match queue {
            Some(q) => shared.client.queue_subscribe(subject.clone(), q).await,
            None => shared.client.subscribe(subject.clone()).await,
        }
        .map_err(|e| ServiceError::Subscribe(format!("{subject}: {e}")))?;
        let served = Served {
            sub,
            fence_subject: Subject::from(fence_subject),
        };
        subscriptions.spawn(serve_subscription(shared.clone(), served, stop_rx.clone()));
    }
    shared
        .client
        .flush()
        .await
        .map_err(|e| ServiceError::Connect(e.to_string()))?;

    let store = match store {
        Some(store) => Some(recover(&shared, store).await?),
        None => None,
    };
    for &s in &shared.settings.owned {
        shared.ready[s as usize].store(true, Relaxed);
    }
    // Discoverable only once every owned shard answers.
    let discovery = crate::discovery::spawn(shared.client.clone(), &shared.settings, metrics.clone())
        .await
        .map_err(|e| ServiceError::Subscribe(format!("$SRV: {e}")))?;

    let started = Instant::now();
    let metrics_task = match shared.settings.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(ServiceError::Metrics)?;
            let shared = shared.clone();
            Some(tokio::spawn(crate::metrics::serve(listener, move || {
                shared.metrics.render(&shared.dedup, started)
            })))
        }
        None => None,
    };

    let committer = store.map(|store| tokio::spawn(commit_loop(shared.clone(), store, commit_rx)));
    let sweeper = tokio::spawn(sweep_loop(shared.clone(), stop_rx.clone()));
    tracing::info!(
        message = "Serving.",
        shards = shared.settings.config.shards,
        owned = shared.settings.owned.len(),
        durability = ?shared.settings.config.durability,
        window_ms = shared.settings.window_ms,
        prefix = %prefix,
    );

    let task = tokio::spawn(async move {
        let mut stop_rx = stop_rx;
        let _ = stop_rx.changed().await;
        while subscriptions.join_next().await.is_some() {}
        discovery.abort();
        sweeper.abort();
        if let Some(tx) = &shared.commits {
            let _ = tx.send(ToCommit::Stop).await;
        }
        if let Some(committer) = committer {
            let _ = committer.await;
        }
        if let Err(e) = shared.client.flush().await {
            tracing::warn!(message = "Final flush failed.", error = %e);
        }
        if let Some(t) = metrics_task {
            t.abort();
        }
        tracing::info!(message = "Stopped.", answered = shared.metrics.answered());
        Ok(())
    });
    Ok(Running {
        stop: stop_tx,
        task,
        metrics,
    })
}

async fn connect(settings: &Settings, metrics: Arc<Metrics>) -> Result<Client, ServiceError> {
    let nats = &settings.config.nats;
    let mut options = async_nats::ConnectOptions::new()
        .name(&nats.name)
        .subscription_capacity(nats.subscription_capacity)
        .event_callback(move |event| {
            let metrics = metrics.clone();
            async move {
                match event {
                    async_nats::Event::SlowConsumer(sid) => {
                        Metrics::inc(&metrics.slow_consumers);
                        tracing::warn!(message = "Slow consumer: the client dropped messages.", sid);
                    }
                    other => tracing::info!(message = "NATS connection event.", event = %other),
                }
            }
        });
    if let (Some(user), Some(password)) = (&nats.user, &nats.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &nats.token {
        options = options.token(token.clone());
    }
    if let Some(path) = &nats.credentials {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| ServiceError::Connect(format!("credentials file {}: {e}", path.display())))?;
    }
    if let Some(ca) = &nats.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&nats.tls_cert, &nats.tls_key) {
        options = options
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    let urls: Vec<async_nats::ServerAddr> = nats
        .url
        .split(',')
        .map(|u| u.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| ServiceError::Connect(format!("nats.url {:?}: {e}", nats.url)))?;
    options
        .connect(urls)
        .await
        .map_err(|e| ServiceError::Connect(format!("{}: {e}", nats.url)))
}

/// Rebuilds the owned shards' tables from the store.
async fn recover(shared: &Arc<Shared>, store: Store) -> Result<Store, ServiceError> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let now = unix_ms();
        let since = now.saturating_sub(shared.settings.window_ms);
        let mut restored = 0usize;
        for &shard in &shared.settings.owned {
            let mut table = shared.dedup.table(shard);
            store
                .scan(shard, since, |fp, born| {
                    restored += usize::from(table.restore(fp, born, now));
                })
                .map_err(ServiceError::Store)?;
        }
        tracing::info!(message = "Recovered tables from the store.", ids = restored, elapsed_ms = started.elapsed().as_millis() as u64, path = %store.path().display());
        Ok(store)
    })
    .await
    .expect("recovery task panicked")
}

/// A subscription and the subject its shutdown fence is published on.
struct Served {
    sub: async_nats::Subscriber,
    /// Reaches this subscription only (or other members of its queue group,
    /// which ignore it): `<prefix>.shard.<n>._fence` or `<prefix>.ingest`.
    fence_subject: Subject,
}

async fn serve_subscription(shared: Arc<Shared>, served: Served, mut stop: watch::Receiver<bool>) {
    let Served {
        mut sub,
        fence_subject,
    } = served;
    let mut tasks = JoinSet::new();
    let mut received = 0u64;
    loop {
        tokio::select! {
            biased;
            message = sub.next() => match message {
                Some(message) => {
                    received += 1;
                    handle(&shared, message, &mut tasks).await;
                }
                None => break,
            },
            _ = stop.changed() => {
                fence(&shared, &mut sub, &fence_subject, received, &mut tasks).await;
                break;
            }
        }
        // Reap finished tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// How many messages past those already read the server may still send
/// after the fence's UNSUB; each one not used by requests costs one empty
/// fence message.
const FENCE_SLACK: u64 = 4096;
/// How long a fence waits before giving up and unsubscribing outright.
const FENCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Unsubscribes without dropping a request the server already routed here.
///
/// async-nats's `drain` forgets a subscription as soon as its UNSUB is
/// written, so a request the server sent before it read that UNSUB is
/// dropped inside the client (nats-io/nats.rs#1325). Instead, both ends are
/// told to stop after the same message: `UNSUB <sid> <limit>` with `limit`
/// past what the server can have sent, a flush to know the server read it,
/// then empty fence messages on the subscription's own subject make up the
/// difference. Requests keep being answered until the `limit`-th message,
/// after which the server routes nothing here; fences beyond it reach no one.
async fn fence(
    shared: &Arc<Shared>,
    sub: &mut async_nats::Subscriber,
    fence_subject: &Subject,
    mut received: u64,
    tasks: &mut JoinSet<()>,
) {
    // Empty the client's buffer first, so the slack covers only what is in
    // transit.
    while let Some(Some(message)) = sub.next().now_or_never() {
        received += 1;
        handle(shared, message, tasks).await;
    }
    let limit = received + FENCE_SLACK;
    let fenced = sub.unsubscribe_after(limit).await.is_ok() && shared.client.flush().await.is_ok();
    if !fenced {
        tracing::warn!(message = "Fence could not be set; unsubscribing outright.", subject = %fence_subject);
        let _ = sub.unsubscribe().await;
    }
    let deadline = tokio::time::Instant::now() + FENCE_TIMEOUT;
    let mut refill = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            biased;
            message = sub.next() => match message {
                Some(message) => {
                    received += 1;
                    handle(shared, message, tasks).await;
                }
                None => return,
            },
            // Top up: requests and queue-group peers may have taken some.
            _ = refill.tick(), if fenced => {
                for _ in received..limit {
                    if shared.client.publish(fence_subject.clone(), Bytes::new()).await.is_err() {
                        break;
                    }
                }
                let _ = shared.client.flush().await;
            }
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(message = "Fence timed out; unsubscribing outright.", subject = %fence_subject);
                let _ = sub.unsubscribe().await;
                while let Some(message) = sub.next().await {
                    handle(shared, message, tasks).await;
                }
                return;
            }
        }
    }
}

/// An empty message with nowhere to reply: a shutdown fence, never an event.
fn is_fence(message: &Message) -> bool {
    message.reply.is_none() && message.payload.is_empty()
}

async fn handle(shared: &Arc<Shared>, message: Message, tasks: &mut JoinSet<()>) {
    if is_fence(&message) {
        return;
    }
    let forwarded_batch = message.subject.ends_with("._batch");
    if forwarded_batch || message.subject == shared.batch_subject {
        // Backpressure: at most MAX_TASKS batches and forwards per subscription.
        while tasks.len() >= MAX_TASKS {
            tasks.join_next().await;
        }
        tasks.spawn(handle_batch(shared.clone(), message, forwarded_batch));
        return;
    }
    let payload = message.payload.clone();
    let keyed = match shared.dedup.key(&payload) {
        Ok(keyed) => keyed,
        Err(e) => {
            Metrics::inc(shared.metrics.invalid(e.kind()));
            tracing::debug!(message = "Rejected event.", reason = %e, subject = %message.subject);
            return reply_error(shared, message.reply, 400, &e.to_string()).await;
        }
    };
    let shard = keyed.shard as usize;
    if !shared.owned[shard] {
        let target = Subject::from(format!(
            "{}.shard.{}.{}",
            shared.settings.config.subject_prefix, keyed.shard, keyed.id
        ));
        while tasks.len() >= MAX_TASKS {
            tasks.join_next().await;
        }
        tasks.spawn(forward(shared.clone(), target, message));
        return;
    }
    if !shared.ready[shard].load(Relaxed) {
        Metrics::inc(&shared.metrics.not_ready);
        return reply_error(
            shared,
            message.reply,
            503,
            &format!("shard {shard} is not ready (recovering)"),
        )
        .await;
    }
    decide(shared, &keyed, message).await;
}

async fn decide(shared: &Shared, keyed: &Keyed<'_>, message: Message) {
    let now = unix_ms();
    match shared.dedup.check_and_insert(keyed, now) {
        Verdict::Duplicate => {
            Metrics::inc(&shared.metrics.duplicates);
            reply(shared, message.reply, DUPLICATE).await;
        }
        Verdict::New => match &shared.commits {
            None => {
                Metrics::inc(&shared.metrics.accepted);
                republish(shared, keyed.shard, message.payload).await;
                reply(shared, message.reply, ACCEPTED).await;
            }
            Some(commits) => {
                let pending = Pending {
                    record: Record {
                        shard: keyed.shard,
                        born_ms: now,
                        fingerprint: keyed.fingerprint,
                    },
                    reply: message.reply,
                    event: message.payload,
                };
                shared.metrics.pending.fetch_add(1, Relaxed);
                if commits.send(ToCommit::Id(pending)).await.is_err() {
                    // Only after shutdown began; the id was not stored.
                    shared.metrics.pending.fetch_sub(1, Relaxed);
                    shared.dedup.table(keyed.shard).remove(keyed.fingerprint);
                }
            }
        },
    }
}

/// Decides a batch (see [`crate::batch`]): lines of owned shards under one
/// lock per shard and one group commit, lines of other shards forwarded to
/// their owners as sub-batches (`<prefix>.shard.<n>._batch`) at the same
/// time; then one reply with a verdict per line. A forwarded sub-batch is
/// never forwarded again, so nodes that disagree cannot loop.
async fn handle_batch(shared: Arc<Shared>, message: Message, forwarded: bool) {
    Metrics::inc(&shared.metrics.batches);
    let body = message.payload;
    let route = |shard: u32| {
        let s = shard as usize;
        match (shared.owned[s], shared.ready[s].load(Relaxed), forwarded) {
            (true, true, _) => Route::Here,
            (true, false, _) => Route::NotReady,
            (false, _, false) => Route::Forward,
            (false, _, true) => Route::Refuse,
        }
    };
    let Decision {
        lines: ranges,
        mut entries,
        new,
        forward: remote,
        invalid,
        not_ready,
        duplicates,
    } = batch::decide(&shared.dedup, &body, unix_ms(), route);
    for kind in invalid {
        Metrics::inc(shared.metrics.invalid(kind));
    }
    shared.metrics.not_ready.fetch_add(not_ready, Relaxed);
    shared.metrics.duplicates.fetch_add(duplicates, Relaxed);

    let records: Vec<Record> = new.iter().map(|(_, r)| *r).collect();
    let forwards = futures_util::future::join_all(
        remote
            .into_iter()
            .map(|(shard, (lines, sub))| forward_batch(&shared, shard, lines, sub)),
    );
    let (committed, forwarded) = tokio::join!(commit_batch(&shared, records), forwards);
    match committed {
        Ok(()) => {
            shared.metrics.accepted.fetch_add(new.len() as u64, Relaxed);
            for (i, record) in &new {
                republish(&shared, record.shard, body.slice(ranges[*i].clone())).await;
            }
        }
        Err(failed) => {
            for (i, record) in &new {
                shared.dedup.table(record.shard).remove(record.fingerprint);
                entries[*i] = Some(failed.clone());
            }
        }
    }
    for (lines, answers) in forwarded {
        for (i, entry) in lines.into_iter().zip(answers) {
            entries[i] = Some(entry);
        }
    }

    let Some(to) = message.reply else { return };
    let mut out = Vec::with_capacity(entries.len() * 2);
    for entry in &entries {
        let entry = entry.as_ref().expect("every line of a batch gets an entry");
        batch::push(&mut out, entry);
    }
    if shared.client.publish(to, out.into()).await.is_err() {
        Metrics::inc(&shared.metrics.publish_errors);
    }
}

/// Commits a batch's new ids in the next group commit; the entry to give
/// them if that fails.
async fn commit_batch(shared: &Shared, records: Vec<Record>) -> Result<(), Entry> {
    let Some(commits) = shared.commits.as_ref().filter(|_| !records.is_empty()) else {
        return Ok(());
    };
    let count = records.len() as u64;
    let (done, committed) = oneshot::channel();
    shared.metrics.pending.fetch_add(count, Relaxed);
    if commits.send(ToCommit::Batch { records, done }).await.is_err() {
        shared.metrics.pending.fetch_sub(count, Relaxed);
        return Err(Entry::error(503, "shutting down; retry"));
    }
    match committed.await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Entry::error(500, STORE_FAILED)),
        Err(_) => Err(Entry::error(503, "shutting down; retry")),
    }
}

/// Sends one shard's lines to its owner; returns the lines and their entries
/// (503 for each if the owner did not answer with one entry per line).
async fn forward_batch(
    shared: &Shared,
    shard: u32,
    lines: Vec<usize>,
    sub: Vec<u8>,
) -> (Vec<usize>, Vec<Entry>) {
    shared.metrics.forwarded.fetch_add(lines.len() as u64, Relaxed);
    let target = format!("{}.shard.{shard}._batch", shared.settings.config.subject_prefix);
    let failure = match shared.client.request(target.clone(), sub.into()).await {
        Ok(answer) => match batch::decode(&answer.payload) {
            Ok(entries) if entries.len() == lines.len() => return (lines, entries),
            Ok(entries) => format!(
                "owner of shard {shard} answered {} entries for {} lines",
                entries.len(),
                lines.len()
            ),
            Err(e) => format!("owner of shard {shard}: {e}"),
        },
        Err(e) => format!("no owner answered on {target}: {e}"),
    };
    Metrics::inc(&shared.metrics.forward_failures);
    shared.metrics.not_ready.fetch_add(lines.len() as u64, Relaxed);
    tracing::debug!(message = "Batch forward failed.", shard, reason = %failure);
    let entries = vec![Entry::error(503, failure); lines.len()];
    (lines, entries)
}

async fn forward(shared: Arc<Shared>, target: Subject, message: Message) {
    Metrics::inc(&shared.metrics.forwarded);
    match shared.client.request(target.clone(), message.payload).await {
        Ok(answer) => {
            if let Some(reply) = message.reply {
                let sent = match answer.headers {
                    Some(headers) => {
                        shared
                            .client
                            .publish_with_headers(reply, headers, answer.payload)
                            .await
                    }
                    None => shared.client.publish(reply, answer.payload).await,
                };
                if sent.is_err() {
                    Metrics::inc(&shared.metrics.publish_errors);
                }
            }
        }
        Err(e) => {
            Metrics::inc(&shared.metrics.forward_failures);
            Metrics::inc(&shared.metrics.not_ready);
            tracing::debug!(message = "Forward failed.", subject = %target, error = %e);
            reply_error(
                &shared,
                message.reply,
                503,
                &format!("no owner answered on {target}: {e}"),
            )
            .await;
        }
    }
}

async fn reply(shared: &Shared, to: Option<Subject>, body: &'static [u8]) {
    if let Some(to) = to
        && shared.client.publish(to, Bytes::from_static(body)).await.is_err()
    {
        Metrics::inc(&shared.metrics.publish_errors);
    }
}

async fn reply_error(shared: &Shared, to: Option<Subject>, code: u16, reason: &str) {
    let Some(to) = to else { return };
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Service-Error-Code", code.to_string().as_str());
    headers.insert("Nats-Service-Error", reason);
    let body = serde_json::json!({ "error": reason, "code": code }).to_string();
    if shared
        .client
        .publish_with_headers(to, headers, body.into())
        .await
        .is_err()
    {
        Metrics::inc(&shared.metrics.publish_errors);
    }
}

async fn republish(shared: &Shared, shard: u32, event: Bytes) {
    if shared
        .client
        .publish(shared.output[shard as usize].clone(), event)
        .await
        .is_err()
    {
        Metrics::inc(&shared.metrics.publish_errors);
    }
}

/// What one group commit covers.
#[derive(Default)]
struct Group {
    records: Vec<Record>,
    singles: Vec<Pending>,
    batches: Vec<oneshot::Sender<bool>>,
}

impl Group {
    fn add(&mut self, item: ToCommit) -> bool {
        match item {
            ToCommit::Id(p) => {
                self.records.push(p.record);
                self.singles.push(p);
            }
            ToCommit::Batch { records, done } => {
                self.records.extend(records);
                self.batches.push(done);
            }
            ToCommit::Stop => return false,
        }
        true
    }
}

/// The single writer: gathers ids into groups, commits each group in one
/// transaction off the runtime, then republishes and replies for it.
async fn commit_loop(shared: Arc<Shared>, store: Store, mut rx: mpsc::Receiver<ToCommit>) {
    let mut store = Some(store);
    let interval = Duration::from_millis(shared.settings.commit_interval_ms);
    let mut expire_at = Instant::now() + EXPIRE_EVERY;
    let mut stopping = false;
    while !stopping {
        let mut group = Group::default();
        match tokio::time::timeout_at(expire_at.into(), rx.recv()).await {
            Ok(Some(item)) => stopping = !group.add(item),
            Ok(None) => stopping = true,
            Err(_) => {}
        }
        // Take what is queued, for at most `commit_interval`.
        let deadline = Instant::now() + interval;
        while !stopping
            && !group.records.is_empty()
            && group.records.len() < MAX_GROUP
            && Instant::now() <= deadline
        {
            match rx.try_recv() {
                Ok(item) => stopping = !group.add(item),
                Err(_) => break,
            }
        }
        let expire = Instant::now() >= expire_at;
        if expire {
            expire_at = Instant::now() + EXPIRE_EVERY;
        }
        if group.records.is_empty() && !expire {
            continue;
        }
        let records = std::mem::take(&mut group.records);
        let count = records.len();
        // Only an expiry pass needs the shard list.
        let owned = if expire {
            shared.settings.owned.clone()
        } else {
            Vec::new()
        };
        let window_ms = shared.settings.window_ms;
        let mut st = store.take().expect("store is put back after every commit");
        let started = Instant::now();
        let (st, result, expired) = tokio::task::spawn_blocking(move || {
            let result = if records.is_empty() {
                Ok(())
            } else {
                st.append(&records)
            };
            let mut expired = 0;
            if expire {
                let before = unix_ms().saturating_sub(window_ms);
                for shard in owned {
                    match st.expire(shard, before) {
                        Ok(n) => expired += n,
                        Err(e) => tracing::warn!(message = "Expiring old ids failed.", shard, error = %e),
                    }
                }
            }
            (st, result, expired)
        })
        .await
        .expect("commit task panicked");
        store = Some(st);
        shared.metrics.expired_ids.fetch_add(expired as u64, Relaxed);
        if count == 0 {
            continue;
        }
        shared.metrics.pending.fetch_sub(count as u64, Relaxed);
        let ok = result.is_ok();
        match result {
            Ok(()) => {
                Metrics::inc(&shared.metrics.commits);
                shared.metrics.committed_ids.fetch_add(count as u64, Relaxed);
                shared
                    .metrics
                    .commit_micros
                    .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
            }
            Err(e) => {
                Metrics::inc(&shared.metrics.store_errors);
                tracing::error!(message = "Commit failed; its events get 500.", ids = count, error = %e);
            }
        }
        for done in group.batches {
            let _ = done.send(ok);
        }
        for p in group.singles {
            if ok {
                Metrics::inc(&shared.metrics.accepted);
                republish(&shared, p.record.shard, p.event).await;
                reply(&shared, p.reply, ACCEPTED).await;
            } else {
                shared.dedup.table(p.record.shard).remove(p.record.fingerprint);
                reply_error(&shared, p.reply, 500, STORE_FAILED).await;
            }
        }
    }
}

const STORE_FAILED: &str = "the store could not commit this event; retry";

/// Reclaims expired table entries a few segments at a time.
async fn sweep_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(EXPIRE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => { shared.dedup.sweep(unix_ms(), 64); }
            _ = stop.changed() => return,
        }
    }
}
