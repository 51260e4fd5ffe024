//! A journal in RAM: the [`Journal`] contract without a disk, for tests of
//! the layers above and for embedding the pipeline where a restart may
//! forget.

use crate::engine::Record;
use crate::journal::{Journal, JournalError};

/// Every appended record, in order, until it expires.
#[derive(Debug, Default)]
pub struct MemoryJournal {
    records: Vec<Record>,
    /// Forgotten ids, `born_ms` being when.
    forgotten: Vec<Record>,
    expired_before: u64,
}

impl MemoryJournal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ids held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

impl Journal for MemoryJournal {
    fn append(&mut self, records: &[Record]) -> Result<(), JournalError> {
        self.records.extend_from_slice(records);
        Ok(())
    }

    fn forget(&mut self, records: &[Record]) -> Result<(), JournalError> {
        self.forgotten.extend_from_slice(records);
        Ok(())
    }

    fn scan(&self, shards: &[u32], since_ms: u64, f: &mut dyn FnMut(Record)) -> Result<usize, JournalError> {
        let forgotten = |r: &Record| {
            self.forgotten
                .iter()
                .any(|t| t.shard == r.shard && t.fingerprint == r.fingerprint && r.born_ms <= t.born_ms)
        };
        let mut n = 0;
        for r in self
            .records
            .iter()
            .filter(|r| r.born_ms >= since_ms && shards.contains(&r.shard) && !forgotten(r))
        {
            f(*r);
            n += 1;
        }
        Ok(n)
    }

    fn expire(&mut self, before_ms: u64) -> Result<usize, JournalError> {
        let before = self.records.len();
        self.records.retain(|r| r.born_ms >= before_ms);
        self.forgotten.retain(|t| t.born_ms >= before_ms);
        self.expired_before = self.expired_before.max(before_ms);
        Ok(before - self.records.len())
    }

    fn expired_before(&self) -> u64 {
        self.expired_before
    }

    fn sync(&mut self) -> Result<(), JournalError> {
        Ok(())
    }

    fn location(&self) -> String {
        "memory".into()
    }
}
