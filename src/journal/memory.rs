//! A journal in RAM: the [`Journal`] contract without a disk, for tests of
//! the layers above and for embedding the pipeline where a restart may
//! forget.

use crate::engine::Record;
use crate::journal::{Journal, JournalError};

/// Every appended record, in order, until it expires.
#[derive(Debug, Default)]
pub struct MemoryJournal {
    records: Vec<Record>,
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

    fn scan(&self, shards: &[u32], since_ms: u64, f: &mut dyn FnMut(Record)) -> Result<usize, JournalError> {
        let mut n = 0;
        for r in self
            .records
            .iter()
            .filter(|r| r.born_ms >= since_ms && shards.contains(&r.shard))
        {
            f(*r);
            n += 1;
        }
        Ok(n)
    }

    fn expire(&mut self, before_ms: u64) -> Result<usize, JournalError> {
        let before = self.records.len();
        self.records.retain(|r| r.born_ms >= before_ms);
        Ok(before - self.records.len())
    }

    fn sync(&mut self) -> Result<(), JournalError> {
        Ok(())
    }

    fn location(&self) -> String {
        "memory".into()
    }
}
