//! The single writer: gathers submitted ids into group commits, runs each
//! commit (and the periodic expiry) on a blocking thread, and signals every
//! submitter whether its ids are durable. It writes and signals, nothing
//! more: replies, republish and undo happen on the request side (the
//! pipeline).
//!
//! A submission waits at most `commit_interval` for the commit that covers
//! it; a group holds at most [`MAX_GROUP`] ids. The channel to the writer is
//! bounded (`max_pending`), so a slow disk slows producers instead of
//! growing memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::engine::{Record, unix_ms};
use crate::journal::{Journal, JournalError, JournalErrorKind};
use crate::observe::metrics::Metrics;

/// Most ids in one group commit.
pub const MAX_GROUP: usize = 8192;

pub use crate::engine::pending::CommitFailed;
use crate::engine::pending::{Settle, Signal, Wait};

/// Completes when the submitted ids are durable, or with why not.
pub type Committed = Wait;

/// Why the writer ended other than by [`Writer::stop`].
#[derive(Debug)]
pub enum WriterError {
    /// The journal panicked during a commit; its group got `Stopped` and
    /// nothing more was written.
    Panicked(String),
    /// The final flush at shutdown failed.
    Sync(JournalError),
}

impl std::fmt::Display for WriterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Panicked(why) => write!(f, "the commit writer panicked: {why}"),
            Self::Sync(e) => write!(f, "the final flush of the journal failed: {e}"),
        }
    }
}

impl std::error::Error for WriterError {}

enum Ids {
    One(Record),
    Many(Vec<Record>),
    /// An id to forget; `born_ms` is when.
    Forget(Record),
}

impl Ids {
    /// How many ids the pending gauge counts for it.
    fn count(&self) -> u64 {
        match self {
            Ids::One(_) => 1,
            Ids::Many(records) => records.len() as u64,
            Ids::Forget(_) => 0,
        }
    }
}

/// The cells of one submission: one for a single id (no allocation), or
/// one per shard of a batch.
enum Done {
    One(Signal),
    Many(Vec<Signal>),
}

enum Inbound {
    Commit {
        ids: Ids,
        /// One cell per shard of `ids`: each learns its own shard's outcome.
        done: Done,
    },
    /// Commit what came before, flush, then end.
    Stop,
}

/// The handle submitters use; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Inbound>,
    metrics: Arc<Metrics>,
}

/// The writer's end of the channel, until [`spawn`] runs it.
pub struct Inbox {
    rx: mpsc::Receiver<Inbound>,
}

/// A handle and its inbox, with room for `capacity` waiting submissions.
pub fn channel(capacity: usize, metrics: Arc<Metrics>) -> (Writer, Inbox) {
    let (tx, rx) = mpsc::channel(capacity);
    (Writer { tx, metrics }, Inbox { rx })
}

/// How the writer runs.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Longest a submission waits for the commit that covers it.
    pub commit_interval: Duration,
    /// How often ids older than the window are deleted.
    pub expire_every: Duration,
    /// The window set, in ms (it may change at run time): ids older than
    /// this are expired.
    pub window_ms: Arc<AtomicU64>,
}

impl Writer {
    /// Queues one id for the next group commit (waiting while the queue is
    /// full); `settle` (of the record's shard) learns the outcome.
    ///
    /// # Errors
    ///
    /// [`CommitFailed::Stopped`] if the writer no longer takes ids.
    pub async fn submit_one(&self, record: Record, settle: &Arc<Settle>) -> Result<(), CommitFailed> {
        self.send(Ids::One(record), Done::One(Signal::new(settle.clone())))
            .await
    }

    /// Queues ids for the next group commit, all in the same one; each
    /// shard's cell in `settles` (one per shard of `records`) learns that
    /// shard's outcome: a journal may append one shard and not another.
    ///
    /// # Errors
    ///
    /// [`CommitFailed::Stopped`] if the writer no longer takes ids.
    pub async fn submit(&self, records: Vec<Record>, settles: &[Arc<Settle>]) -> Result<(), CommitFailed> {
        let done = settles.iter().map(|s| Signal::new(s.clone())).collect();
        self.send(Ids::Many(records), Done::Many(done)).await
    }

    /// Queues the forgetting of an id (`record.born_ms`: when) for the next
    /// group commit.
    ///
    /// # Errors
    ///
    /// [`CommitFailed::Stopped`] if the writer no longer takes ids.
    pub async fn forget(&self, record: Record) -> Result<Committed, CommitFailed> {
        let settle = Settle::new(record.shard);
        self.send(Ids::Forget(record), Done::One(Signal::new(settle.clone())))
            .await?;
        Ok(settle.wait())
    }

    /// Sends one submission; on refusal its cells are set to `Stopped`
    /// (dropped with it) and the error returned too.
    async fn send(&self, ids: Ids, done: Done) -> Result<(), CommitFailed> {
        let count = ids.count();
        self.metrics.pending.fetch_add(count, Relaxed);
        if self.tx.send(Inbound::Commit { ids, done }).await.is_err() {
            self.metrics.pending.fetch_sub(count, Relaxed);
            return Err(CommitFailed::Stopped);
        }
        Ok(())
    }

    /// Asks the writer to commit what it was given, flush and end; its task
    /// then completes. Submissions after this fail with `Stopped`.
    pub async fn stop(&self) {
        let _ = self.tx.send(Inbound::Stop).await;
    }
}

/// Runs the writer on `journal` until [`Writer::stop`] or until every
/// handle is dropped.
///
/// # Errors
///
/// The task ends with a [`WriterError`] if the journal panicked or the
/// final flush failed.
pub fn spawn(
    inbox: Inbox,
    journal: Box<dyn Journal>,
    config: WriterConfig,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<Result<(), WriterError>> {
    tokio::spawn(async move {
        let mut rx = inbox.rx;
        let result = run(&mut rx, journal, config, metrics.clone()).await;
        // Submissions still queued are refused: their cells are set to
        // `Stopped` as they drop, and they leave the pending gauge.
        rx.close();
        while let Ok(item) = rx.try_recv() {
            if let Inbound::Commit { ids, .. } = item {
                metrics.pending.fetch_sub(ids.count(), Relaxed);
            }
        }
        result
    })
}

/// What one group commit covers.
#[derive(Default)]
struct Group {
    records: Vec<Record>,
    forgets: Vec<Record>,
    done: Vec<Signal>,
    /// The forgets' cells: they succeed only with the whole commit (a
    /// forget is not attempted after an append that failed in part).
    forgets_done: Vec<Signal>,
}

impl Group {
    fn is_empty(&self) -> bool {
        self.records.is_empty() && self.forgets.is_empty()
    }
}

impl Group {
    /// Adds a submission; `false` for the stop request.
    fn add(&mut self, item: Inbound) -> bool {
        match item {
            Inbound::Commit { ids, done } => {
                let forget = matches!(ids, Ids::Forget(_));
                match ids {
                    Ids::One(r) => self.records.push(r),
                    Ids::Many(rs) => self.records.extend(rs),
                    Ids::Forget(r) => self.forgets.push(r),
                }
                let done_here = if forget {
                    &mut self.forgets_done
                } else {
                    &mut self.done
                };
                match done {
                    Done::One(signal) => done_here.push(signal),
                    Done::Many(signals) => done_here.extend(signals),
                }
                true
            }
            Inbound::Stop => false,
        }
    }
}

async fn run(
    rx: &mut mpsc::Receiver<Inbound>,
    journal: Box<dyn Journal>,
    config: WriterConfig,
    metrics: Arc<Metrics>,
) -> Result<(), WriterError> {
    let mut journal = Some(journal);
    let mut expire_at = Instant::now() + config.expire_every;
    let mut stopping = false;
    while !stopping {
        let mut group = Group::default();
        match tokio::time::timeout_at(expire_at.into(), rx.recv()).await {
            Ok(Some(item)) => stopping = !group.add(item),
            Ok(None) => stopping = true,
            Err(_) => {}
        }
        // Take what is queued, for at most `commit_interval`.
        let deadline = Instant::now() + config.commit_interval;
        while !stopping && !group.is_empty() && group.records.len() < MAX_GROUP && Instant::now() <= deadline
        {
            match rx.try_recv() {
                Ok(item) => stopping = !group.add(item),
                Err(_) => break,
            }
        }
        let expire = Instant::now() >= expire_at;
        if expire {
            expire_at = Instant::now() + config.expire_every;
        }
        if group.is_empty() && !expire {
            continue;
        }
        let records = std::mem::take(&mut group.records);
        let forgets = std::mem::take(&mut group.forgets);
        let count = records.len();
        let mut j = journal
            .take()
            .expect("the journal is put back after every commit");
        let window_ms = config.window_ms.load(Relaxed);
        let started = Instant::now();
        let outcome = tokio::task::spawn_blocking(move || {
            let mut result = if records.is_empty() {
                Ok(())
            } else {
                j.append(&records)
            };
            if result.is_ok() && !forgets.is_empty() {
                result = j.forget(&forgets);
            }
            let expired = if expire {
                j.expire(unix_ms().saturating_sub(window_ms))
            } else {
                Ok(0)
            };
            (j, result, expired)
        })
        .await;
        metrics.pending.fetch_sub(count as u64, Relaxed);
        let (j, result, expired) = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                // The group's senders drop here: each submitter sees `Stopped`.
                let why = panic_message(e);
                tracing::error!(message = "The commit writer panicked; no more commits.", ids = count, error = %why);
                return Err(WriterError::Panicked(why));
            }
        };
        journal = Some(j);
        match expired {
            Ok(n) => {
                metrics.expired_ids.fetch_add(n as u64, Relaxed);
            }
            Err(e) => tracing::warn!(message = "Expiring old ids failed.", error = %e),
        }
        if group.done.is_empty() && group.forgets_done.is_empty() {
            continue;
        }
        let (signal, failed_shards) = match result {
            Ok(()) => {
                Metrics::inc(&metrics.commits);
                metrics.committed_ids.fetch_add(count as u64, Relaxed);
                metrics
                    .commit_micros
                    .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
                (Ok(()), None)
            }
            Err(e) => {
                let failed = match e.kind() {
                    JournalErrorKind::Fenced => {
                        tracing::warn!(message = "Commit fenced; its events get 503.", ids = count, error = %e);
                        CommitFailed::Fenced
                    }
                    JournalErrorKind::Unavailable => {
                        Metrics::inc(&metrics.store_errors);
                        tracing::warn!(message = "The journal did not acknowledge; its events get 503.", ids = count, error = %e);
                        CommitFailed::Unavailable
                    }
                    _ => {
                        Metrics::inc(&metrics.store_errors);
                        tracing::error!(message = "Commit failed; its events get 500.", ids = count, error = %e);
                        CommitFailed::Journal
                    }
                };
                (Err(failed), e.failed_shards().map(<[u32]>::to_vec))
            }
        };
        for settle in group.done.iter().map(Signal::settle) {
            // A journal that names the shards it failed has made the others
            // durable: their requests are answered as committed.
            let result = match &failed_shards {
                Some(shards) if !shards.contains(&settle.shard()) => Ok(()),
                _ => signal,
            };
            settle.set(result);
        }
        for settle in group.forgets_done.iter().map(Signal::settle) {
            settle.set(signal);
        }
    }
    let mut journal = journal.expect("the journal is back once the loop ends");
    tokio::task::spawn_blocking(move || journal.sync())
        .await
        .map_err(|e| WriterError::Panicked(panic_message(e)))?
        .map_err(WriterError::Sync)
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into()),
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fingerprint::Fingerprint;
    use crate::journal::MemoryJournal;

    fn config() -> WriterConfig {
        WriterConfig {
            commit_interval: Duration::from_millis(1),
            expire_every: Duration::from_secs(3600),
            window_ms: Arc::new(AtomicU64::new(60_000)),
        }
    }

    fn record(i: u64) -> Record {
        Record {
            shard: (i % 4) as u32,
            born_ms: unix_ms(),
            fingerprint: Fingerprint::of(&i.to_le_bytes()),
        }
    }

    /// Panics on every append.
    struct Exploding;

    impl Journal for Exploding {
        fn append(&mut self, _: &[Record]) -> Result<(), JournalError> {
            panic!("disk on fire");
        }
        fn forget(&mut self, _: &[Record]) -> Result<(), JournalError> {
            Ok(())
        }
        fn scan(&self, _: &[u32], _: u64, _: &mut dyn FnMut(Record)) -> Result<usize, JournalError> {
            Ok(0)
        }
        fn expire(&mut self, _: u64) -> Result<usize, JournalError> {
            Ok(0)
        }
        fn expired_before(&self) -> u64 {
            0
        }
        fn sync(&mut self) -> Result<(), JournalError> {
            Ok(())
        }
        fn location(&self) -> String {
            "nowhere".into()
        }
    }

    #[tokio::test]
    async fn every_submission_is_signalled_and_stop_commits_what_came_before() {
        let metrics = Arc::new(Metrics::default());
        let (writer, inbox) = channel(16, metrics.clone());
        let task = spawn(inbox, Box::new(MemoryJournal::new()), config(), metrics.clone());
        let (one, last) = (Settle::new(1), Settle::new(2));
        let many: Vec<_> = (0..4).map(Settle::new).collect();
        writer.submit_one(record(1), &one).await.unwrap();
        writer.submit((2..50).map(record).collect(), &many).await.unwrap();
        writer.submit_one(record(50), &last).await.unwrap();
        writer.stop().await;
        assert_eq!(one.wait().await, Ok(()));
        for settle in &many {
            assert_eq!(settle.wait().await, Ok(()));
        }
        assert_eq!(last.wait().await, Ok(()));
        task.await.unwrap().unwrap();
        assert_eq!(metrics.committed_ids.load(Relaxed), 50);
        assert_eq!(metrics.pending.load(Relaxed), 0);
        let refused = Settle::new(3);
        assert_eq!(
            writer.submit_one(record(51), &refused).await.err(),
            Some(CommitFailed::Stopped),
            "a stopped writer refuses at once"
        );
        assert_eq!(refused.get(), Some(Err(CommitFailed::Stopped)));
    }

    #[tokio::test]
    async fn a_panicking_journal_ends_the_writer_with_an_error_and_fails_its_group() {
        let metrics = Arc::new(Metrics::default());
        let (writer, inbox) = channel(16, metrics.clone());
        let task = spawn(inbox, Box::new(Exploding), config(), metrics);
        let committed = Settle::new(1);
        writer.submit_one(record(1), &committed).await.unwrap();
        assert_eq!(
            committed.wait().await,
            Err(CommitFailed::Stopped),
            "the group is dropped, not committed"
        );
        match task.await.unwrap() {
            Err(WriterError::Panicked(why)) => assert!(why.contains("disk on fire"), "{why}"),
            other => panic!("expected a panic error, got {other:?}"),
        }
        assert_eq!(
            writer.submit_one(record(2), &Settle::new(2)).await.err(),
            Some(CommitFailed::Stopped)
        );
    }

    /// Appends fail for shard 0 only; forgets succeed.
    struct HalfFenced;

    impl Journal for HalfFenced {
        fn append(&mut self, _: &[Record]) -> Result<(), JournalError> {
            Err(JournalError::new(JournalErrorKind::Fenced, "shard 0 moved").only_shards(vec![0]))
        }
        fn forget(&mut self, _: &[Record]) -> Result<(), JournalError> {
            Ok(())
        }
        fn scan(&self, _: &[u32], _: u64, _: &mut dyn FnMut(Record)) -> Result<usize, JournalError> {
            Ok(0)
        }
        fn expire(&mut self, _: u64) -> Result<usize, JournalError> {
            Ok(0)
        }
        fn expired_before(&self) -> u64 {
            0
        }
        fn sync(&mut self) -> Result<(), JournalError> {
            Ok(())
        }
        fn location(&self) -> String {
            "half".into()
        }
    }

    /// Fault: a forget in a group whose append failed for one shard was
    /// answered as done (its shard was not among those named), though the
    /// forget was never written.
    #[tokio::test]
    async fn each_shard_gets_its_own_outcome_and_a_forget_only_a_whole_one() {
        let metrics = Arc::new(Metrics::default());
        let (writer, inbox) = channel(16, metrics.clone());
        // Queued before the writer runs: one group.
        let (zero, one) = (Settle::new(0), Settle::new(1));
        writer.submit_one(record(4), &zero).await.unwrap(); // shard 0
        writer.submit_one(record(1), &one).await.unwrap(); // shard 1
        let forgot = writer.forget(record(5)).await.unwrap(); // shard 1
        let _task = spawn(inbox, Box::new(HalfFenced), config(), metrics);
        assert_eq!(zero.wait().await, Err(CommitFailed::Fenced));
        assert_eq!(one.wait().await, Ok(()), "its shard's append succeeded");
        assert_eq!(forgot.await, Err(CommitFailed::Fenced), "not attempted");
    }
}
