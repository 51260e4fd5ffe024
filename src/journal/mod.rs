//! The durable log of accepted ids: one trait, its implementations, and the
//! group-commit writer that drives it.
//!
//! | module | role |
//! |---|---|
//! | [`lmdb`] | [`LmdbStore`]: the node's local log in LMDB (heed) |
//! | [`memory`] | [`MemoryJournal`]: the same contract in RAM, for tests and embedding |
//! | [`stream`] | [`StreamJournal`]: `durability = "replicated"`, a JetStream stream with a local LMDB copy |
//! | [`writer`] | the single writer: gathers ids into group commits off the runtime and signals each submitter |
//!
//! A journal is written by one writer only ([`writer`]) and read at
//! recovery ([`Journal::scan`]), before the writer starts. The pipeline
//! above sees only "committed" or "failed" (per shard).

pub mod lmdb;
pub mod memory;
pub mod sealed;
pub mod stream;
pub mod writer;

use std::fmt;

use crate::engine::Record;
use crate::engine::fingerprint::Fingerprint;

pub use lmdb::{LmdbStore, StoreMeta, VerifyReport, verify};
pub use memory::MemoryJournal;
pub use stream::{Positions, StreamJournal};
pub use writer::{CommitFailed, Writer, WriterError};

/// A durable log of accepted ids.
///
/// Blocking: the writer calls it from a blocking thread, never on the async
/// runtime's workers.
pub trait Journal: Send + 'static {
    /// Makes `records` durable: all of them, or none and an error, or (for
    /// a journal whose shards are written apart) every shard but those
    /// the error names in [`JournalError::failed_shards`].
    ///
    /// # Errors
    ///
    /// A [`JournalError`] if the records could not be made durable; nothing
    /// of them is kept then, or nothing of the shards it names.
    fn append(&mut self, records: &[Record]) -> Result<(), JournalError>;

    /// Makes the forgetting of ids durable: for each record, its id
    /// (`shard`, `fingerprint`) accepted at or before `born_ms` (here the
    /// time of forgetting) is no longer returned by [`Self::scan`]; an
    /// acceptance after it is.
    ///
    /// # Errors
    ///
    /// A [`JournalError`] if it could not be made durable.
    fn forget(&mut self, records: &[Record]) -> Result<(), JournalError>;

    /// Calls `f` for each id of one of `shards` accepted at or after
    /// `since_ms` (in no set order across shards); returns the count.
    ///
    /// # Errors
    ///
    /// A [`JournalError`] if the log cannot be read.
    fn scan(&self, shards: &[u32], since_ms: u64, f: &mut dyn FnMut(Record)) -> Result<usize, JournalError>;

    /// Forgets every id, of any shard, that was accepted before
    /// `before_ms`; returns how many ids that removed (an implementation
    /// may keep some a little longer, never shorter).
    ///
    /// # Errors
    ///
    /// A [`JournalError`] if the deletion fails.
    fn expire(&mut self, before_ms: u64) -> Result<usize, JournalError>;

    /// Every id accepted at or after this time is held; ids accepted
    /// before it may have been expired (0: nothing was ever expired). Kept
    /// across restarts, so that a window larger than the one the journal
    /// was expired with does not claim ids it no longer has.
    fn expired_before(&self) -> u64;

    /// Pushes what was appended to stable storage (for a clean shutdown of
    /// a log that does not do so on every append).
    ///
    /// # Errors
    ///
    /// A [`JournalError`] if the flush fails.
    fn sync(&mut self) -> Result<(), JournalError>;

    /// Where the log lives, for logs and error messages.
    fn location(&self) -> String;

    /// A reader that scans the log while its writer goes on, if this
    /// journal has one (the LMDB store): what the sealed tier is built
    /// from.
    fn reader(&self) -> Option<Box<dyn JournalReader>> {
        None
    }
}

/// Reads a journal beside its writer.
pub trait JournalReader: Send + Sync {
    /// Calls `f` for each id accepted in `since_ms..before_ms` and not
    /// forgotten after (in no set order); returns the count.
    ///
    /// # Errors
    ///
    /// A [`JournalError`] if the log cannot be read.
    fn scan_span(
        &self,
        since_ms: u64,
        before_ms: u64,
        f: &mut dyn FnMut(Record),
    ) -> Result<usize, JournalError>;

    /// Calls `f` with each forgotten id (`shard`, fingerprint) and when it
    /// was forgotten.
    ///
    /// # Errors
    ///
    /// A [`JournalError`] if they cannot be read.
    fn forgotten(&self, f: &mut dyn FnMut(u32, Fingerprint, u64)) -> Result<(), JournalError>;
}

/// What went wrong with a journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalErrorKind {
    /// The directory or LMDB environment could not be opened.
    Open,
    /// The store was written with another format, shard count or fingerprint.
    Mismatch,
    /// A read or write failed.
    Io,
    /// Stored data fails its checksum: the files were changed under LMDB.
    Corrupt,
    /// No space is left where the store lives; commits resume once there is.
    Full,
    /// The shard is not held here any more (its lease was lost, or another
    /// node appended to its journal): nothing of it was written.
    Fenced,
    /// A replicated journal did not answer (JetStream unavailable, e.g.
    /// during a leader election): retry.
    Unavailable,
}

/// A journal failure: its kind, what was being done, and the cause.
#[derive(Debug)]
pub struct JournalError {
    kind: JournalErrorKind,
    message: String,
    /// For an append: the shards it failed, when it made the others
    /// durable (`None`: none of them).
    shards: Option<Vec<u32>>,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl JournalError {
    pub fn new(kind: JournalErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            shards: None,
            source: None,
        }
    }

    /// Says that only `shards` failed: the append made the others durable.
    pub fn only_shards(mut self, shards: Vec<u32>) -> Self {
        self.shards = Some(shards);
        self
    }

    /// The shards an append failed, when it made the others durable.
    pub fn failed_shards(&self) -> Option<&[u32]> {
        self.shards.as_deref()
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    pub fn kind(&self) -> JournalErrorKind {
        self.kind
    }
}

impl fmt::Display for JournalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for JournalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}
