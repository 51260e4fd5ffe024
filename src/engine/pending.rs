//! Ids decided new but not yet durable, so that a twin gets its first
//! copy's outcome.
//!
//! A new id is in its shard's table from the moment it is decided, but its
//! commit may still fail (journal timeout, full disk, fenced shard); the id
//! is then forgotten and the first copy answered an error. An event with
//! the same id arriving in between (a *twin*) must not be told `false`: its
//! producer would drop an event nobody kept. So each shard keeps a
//! [`Ledger`] of its uncommitted ids beside the table, under the same lock,
//! each with the [`Settle`] cell its commit completes. A duplicate verdict
//! looks there: a twin of a pending id waits for that cell and gets `false`
//! once the commit succeeds, or the same error if it fails.
//!
//! Cost on the common path: one `Arc` clone and a push per new id (no lock
//! and no allocation beyond the ledger's reused capacity); the ledger is
//! pruned from its front, before each decision, as commits complete. Only a duplicate verdict
//! while the ledger is not empty scans it (newest first), and a twin is
//! rare.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

use crate::engine::fingerprint::Fingerprint;

/// Why new ids were not made durable; every request that depended on them
/// (twins included) gets the matching error and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitFailed {
    /// The journal refused the commit (disk full, I/O error): retry later.
    Journal,
    /// The writer has stopped (shutdown) or died: retry elsewhere or later.
    Stopped,
    /// An output that must take each new event before its id is committed
    /// did not acknowledge it; nothing was written: retry.
    Output,
    /// The id's shard is no longer held here (replicated journal): its
    /// owner answers a retry.
    Fenced,
    /// The replicated journal did not acknowledge (JetStream unavailable):
    /// retry.
    Unavailable,
}

const PENDING: u8 = 0;
const OK: u8 = 1;

impl CommitFailed {
    const ALL: [CommitFailed; 5] = [
        CommitFailed::Journal,
        CommitFailed::Stopped,
        CommitFailed::Output,
        CommitFailed::Fenced,
        CommitFailed::Unavailable,
    ];

    fn code(self) -> u8 {
        2 + Self::ALL.iter().position(|k| *k == self).unwrap_or(1) as u8
    }
}

/// The outcome of one commit of one shard's ids: set once, by whoever
/// completes the commit (the writer, or the output before it), and read by
/// the request that submitted them and by their twins.
#[derive(Debug)]
pub struct Settle {
    /// The shard whose ids this commit covers: a journal may fail one
    /// shard's append and not another's.
    shard: u32,
    /// [`PENDING`], [`OK`], or a failure's code.
    state: AtomicU8,
    /// The submitting request, waiting in [`Settle::wait`].
    waker: AtomicWaker,
}

impl Settle {
    pub fn new(shard: u32) -> Arc<Self> {
        Arc::new(Self {
            shard,
            state: AtomicU8::new(PENDING),
            waker: AtomicWaker::new(),
        })
    }

    pub fn shard(&self) -> u32 {
        self.shard
    }

    /// Records the outcome and wakes the submitter; the first outcome set
    /// wins (`false` if one was set already).
    pub fn set(&self, result: Result<(), CommitFailed>) -> bool {
        let code = match result {
            Ok(()) => OK,
            Err(failed) => failed.code(),
        };
        let first = self
            .state
            .compare_exchange(PENDING, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            self.waker.wake();
        }
        first
    }

    /// The outcome, if set.
    pub fn get(&self) -> Option<Result<(), CommitFailed>> {
        match self.state.load(Ordering::Acquire) {
            PENDING => None,
            OK => Some(Ok(())),
            code => Some(Err(CommitFailed::ALL[usize::from(code - 2)])),
        }
    }

    /// Waits for the outcome. For the one request that submitted the ids
    /// (a single waker is kept); twins poll [`Settle::get`] instead.
    pub fn wait(self: &Arc<Self>) -> Wait {
        Wait(self.clone())
    }
}

/// The future of [`Settle::wait`].
#[derive(Debug)]
pub struct Wait(Arc<Settle>);

impl Wait {
    pub fn settle(&self) -> &Arc<Settle> {
        &self.0
    }
}

impl Future for Wait {
    type Output = Result<(), CommitFailed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(result) = self.0.get() {
            return Poll::Ready(result);
        }
        self.0.waker.register(cx.waker());
        match self.0.get() {
            Some(result) => Poll::Ready(result),
            None => Poll::Pending,
        }
    }
}

/// Sets a cell to [`CommitFailed::Stopped`] when dropped unset: whoever
/// holds the duty to complete a commit (the writer's queue and groups)
/// holds it through this, so that no waiter is left hanging when that
/// holder dies or drops it.
#[derive(Debug)]
pub struct Signal(Option<Arc<Settle>>);

impl Signal {
    pub fn new(settle: Arc<Settle>) -> Self {
        Self(Some(settle))
    }

    /// The cell.
    pub fn settle(&self) -> &Arc<Settle> {
        self.0.as_ref().expect("a signal holds its cell until disarmed")
    }

    /// Hands the duty on (to the writer, which holds a signal of its own):
    /// dropping this one then sets nothing.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Signal {
    fn drop(&mut self) {
        if let Some(settle) = &self.0 {
            settle.set(Err(CommitFailed::Stopped));
        }
    }
}

/// One shard's ids decided new whose commit has not completed, oldest
/// first.
#[derive(Debug, Default)]
pub struct Ledger {
    ids: VecDeque<(Fingerprint, Arc<Settle>)>,
}

impl Ledger {
    /// Records a new id whose commit `settle` completes. Call
    /// [`Ledger::prune`] before the table decides, not between: a failed
    /// entry's forgetting must not undo this one.
    pub fn push(&mut self, fp: Fingerprint, settle: &Arc<Settle>) {
        self.ids.push_back((fp, settle.clone()));
    }

    /// Drops the oldest entries whose commits completed. The id of one
    /// that failed is handed to `forget` (to be taken out of the table):
    /// its request would forget it too, but may never get to (cancelled at
    /// a shutdown), and an id whose commit failed must not stay remembered.
    pub fn prune(&mut self, mut forget: impl FnMut(Fingerprint)) {
        while let Some((fp, settle)) = self.ids.front() {
            match settle.get() {
                None => break,
                Some(Ok(())) => {}
                // Unless the id was accepted again since (forgotten by an
                // operator in between): that later entry decides.
                Some(Err(_)) if self.ids.iter().skip(1).any(|(f, _)| f == fp) => {}
                Some(Err(_)) => forget(*fp),
            }
            self.ids.pop_front();
        }
    }

    /// Drops the entry of `fp` completed by `settle`: its commit failed and
    /// its request forgets the id (under the same lock). `false` if it was
    /// gone already (pruned, and the id forgotten then): the table's entry
    /// of `fp`, if any, is then a later acceptance and must stay.
    pub fn remove(&mut self, fp: Fingerprint, settle: &Arc<Settle>) -> bool {
        match self
            .ids
            .iter()
            .rposition(|(f, s)| *f == fp && Arc::ptr_eq(s, settle))
        {
            Some(i) => {
                self.ids.remove(i);
                true
            }
            None => false,
        }
    }

    /// The commit a duplicate of `fp` depends on: the newest entry of that
    /// id unless its commit already succeeded (then the duplicate is
    /// final).
    pub fn twin_of(&self, fp: Fingerprint) -> Option<Arc<Settle>> {
        let (_, settle) = self.ids.iter().rev().find(|(f, _)| *f == fp)?;
        (settle.get() != Some(Ok(()))).then(|| settle.clone())
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// The cells of the entries whose commits have not completed.
    pub fn unsettled(&self) -> Vec<Arc<Settle>> {
        self.ids
            .iter()
            .filter(|(_, s)| s.get().is_none())
            .map(|(_, s)| s.clone())
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn clear(&mut self) {
        self.ids.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(i: u64) -> Fingerprint {
        Fingerprint::of(&i.to_le_bytes())
    }

    #[test]
    fn the_first_outcome_wins_and_every_kind_round_trips() {
        for kind in CommitFailed::ALL {
            let s = Settle::new(3);
            assert_eq!(s.get(), None);
            assert!(s.set(Err(kind)));
            assert!(!s.set(Ok(())));
            assert_eq!(s.get(), Some(Err(kind)));
        }
        let s = Settle::new(0);
        assert!(s.set(Ok(())));
        assert_eq!(s.get(), Some(Ok(())));
    }

    #[test]
    fn a_dropped_signal_stops_its_waiters() {
        let s = Settle::new(0);
        drop(Signal::new(s.clone()));
        assert_eq!(s.get(), Some(Err(CommitFailed::Stopped)));
        let handed = Settle::new(0);
        Signal::new(handed.clone()).disarm();
        assert_eq!(handed.get(), None, "a disarmed signal sets nothing");
        let done = Settle::new(0);
        done.set(Ok(()));
        drop(Signal::new(done.clone()));
        assert_eq!(done.get(), Some(Ok(())), "a set outcome stays");
    }

    #[tokio::test]
    async fn wait_resolves_when_set_from_another_task() {
        let s = Settle::new(0);
        let setter = s.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            setter.set(Err(CommitFailed::Journal));
        });
        assert_eq!(s.wait().await, Err(CommitFailed::Journal));
    }

    #[test]
    fn twins_find_pending_and_failed_commits_until_they_are_pruned() {
        let mut ledger = Ledger::default();
        let (a, b, c) = (Settle::new(0), Settle::new(0), Settle::new(0));
        ledger.push(fp(1), &a);
        ledger.push(fp(2), &b);
        ledger.push(fp(3), &c);
        assert!(Arc::ptr_eq(&ledger.twin_of(fp(1)).unwrap(), &a));
        assert!(ledger.twin_of(fp(4)).is_none());
        a.set(Ok(()));
        assert!(
            ledger.twin_of(fp(1)).is_none(),
            "a committed id is a plain duplicate"
        );
        b.set(Err(CommitFailed::Journal));
        assert_eq!(
            ledger.twin_of(fp(2)).unwrap().get(),
            Some(Err(CommitFailed::Journal)),
            "a twin of a failed id gets its error"
        );
        assert!(ledger.remove(fp(2), &b), "its request forgets the id");
        assert!(!ledger.remove(fp(2), &b), "once");
        assert!(ledger.twin_of(fp(2)).is_none());
        c.set(Err(CommitFailed::Fenced));
        let mut forgotten = Vec::new();
        ledger.prune(|f| forgotten.push(f));
        assert_eq!(forgotten, [fp(3)], "a failed id its request did not forget");
        assert!(ledger.is_empty());
    }

    #[test]
    fn the_newest_entry_of_an_id_decides() {
        let mut ledger = Ledger::default();
        let (old, new) = (Settle::new(0), Settle::new(0));
        ledger.push(fp(1), &old);
        ledger.push(fp(1), &new);
        old.set(Err(CommitFailed::Journal));
        let mut forgotten = Vec::new();
        ledger.prune(|f| forgotten.push(f));
        assert!(
            forgotten.is_empty(),
            "accepted again since: the later entry decides"
        );
        assert!(Arc::ptr_eq(&ledger.twin_of(fp(1)).unwrap(), &new));
    }
}
