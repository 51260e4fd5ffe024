//! The durable log of accepted ids in LMDB (through heed).
//!
//! One database, `log`, holds one key per accepted id and no value:
//! `shard (u16 BE) ‖ arrival ms (u64 BE) ‖ fingerprint (16 bytes)`. Keys are
//! ordered by shard, then time, so rebuilding a shard's table is one range
//! scan and expiring it is one range delete. A second database, `meta`,
//! records what the keys mean: store format, shard count, fingerprint
//! version and the window; opening a store written under a different format,
//! shard count or fingerprint is an error (the window may change: a larger
//! one reaches back as far as entries were retained).
//!
//! Only one writer (the service's commit thread) writes; every commit is
//! one transaction covering a whole group of ids (group commit).
//!
//! Durability: by default the environment is opened with `NO_SYNC`, so a
//! commit reaches the operating system (surviving a crash of the process,
//! not of the machine); with `fsync = true` each commit is flushed to disk.

use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};

use heed::types::{Bytes, Str, Unit};
use heed::{CommitOrAbort, Database, Env, EnvFlags, EnvOpenOptions, MdbError};

use crate::fingerprint::{self, Fingerprint};

/// Version of the key layout.
pub const FORMAT: u32 = 1;
const KEY_LEN: usize = 2 + 8 + 16;
const INITIAL_MAP_BYTES: usize = 256 << 20;

/// What a store is for; recorded at creation and checked at every open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreMeta {
    pub shards: u32,
    pub window_ms: u64,
}

/// What went wrong with the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The directory or LMDB environment could not be opened.
    Open,
    /// The store was written with another format, shard count or fingerprint.
    Mismatch,
    /// A read or write failed.
    Io,
}

#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
    source: Option<heed::Error>,
}

impl StoreError {
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    fn io(context: &str, source: heed::Error) -> Self {
        Self {
            kind: StoreErrorKind::Io,
            message: context.to_owned(),
            source: Some(source),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// One accepted id to persist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub shard: u32,
    pub born_ms: u64,
    pub fingerprint: Fingerprint,
}

fn key(shard: u32, born_ms: u64, fp: &[u8; 16]) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[..2].copy_from_slice(&(shard as u16).to_be_bytes());
    k[2..10].copy_from_slice(&born_ms.to_be_bytes());
    k[10..].copy_from_slice(fp);
    k
}

fn decode(k: &[u8]) -> Option<(u64, Fingerprint)> {
    let born = u64::from_be_bytes(k.get(2..10)?.try_into().ok()?);
    let fp = Fingerprint::from_bytes(k.get(10..KEY_LEN)?.try_into().ok()?);
    Some((born, fp))
}

type Log = Database<'static, Bytes, Unit>;
type Meta = Database<'static, Str, Str>;

/// The key range `[lo, hi)` in the form heed's range methods take.
fn between<'k>(lo: &'k [u8; KEY_LEN], hi: &'k [u8; KEY_LEN]) -> (Bound<&'k [u8]>, Bound<&'k [u8]>) {
    (Bound::Included(&lo[..]), Bound::Excluded(&hi[..]))
}

/// The LMDB store of one node.
pub struct Store {
    env: Env,
    log: Log,
    path: PathBuf,
}

impl Store {
    /// Opens or creates the store in `dir`.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Open`] if the directory or environment cannot be
    /// opened, [`StoreErrorKind::Mismatch`] if it was written for another
    /// format, shard count or fingerprint version.
    pub fn open(dir: &Path, meta: StoreMeta, fsync: bool) -> Result<Self, StoreError> {
        let open_err = |message: String, source: Option<heed::Error>| StoreError {
            kind: StoreErrorKind::Open,
            message,
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| {
            open_err(
                format!("cannot create data directory {}: {e}", dir.display()),
                None,
            )
        })?;
        let existing = std::fs::metadata(dir.join("data.mdb")).map_or(0, |m| m.len() as usize);
        let mut options = EnvOpenOptions::new();
        options
            .map_size(INITIAL_MAP_BYTES.max(existing.next_power_of_two()))
            .max_dbs(2);
        // SAFETY (flags): NO_SYNC only changes when data reaches the disk.
        // SAFETY (open): LMDB requires that one process does not open the
        // same environment twice and that the files are not modified by
        // anything but LMDB. The service opens its data directory once, and
        // LMDB's own lock file serialises writers across processes.
        let env = unsafe {
            if !fsync {
                options.flags(EnvFlags::NO_SYNC);
            }
            options.open(dir)
        }
        .map_err(|e| open_err(format!("cannot open LMDB store in {}", dir.display()), Some(e)))?;
        let create = || -> heed::Result<(Log, Meta)> {
            let wtxn = env.write_txn()?;
            let dbs = env.create_databases_and_commit(wtxn, |dbo, wtxn| -> heed::Result<_> {
                let log: Database<Bytes, Unit> = dbo.create_database(wtxn, Some("log"))?;
                let meta: Database<Str, Str> = dbo.create_database(wtxn, Some("meta"))?;
                Ok(CommitOrAbort::<_, ()>::Commit((log, meta)))
            })?;
            Ok(dbs.unwrap_commit())
        };
        let (log, meta_db) = create().map_err(|e| StoreError::io("create databases", e))?;
        let mut wtxn = env.write_txn().map_err(|e| StoreError::io("begin", e))?;
        let want = [
            ("format", FORMAT.to_string()),
            ("shards", meta.shards.to_string()),
            ("fingerprint", format!("xxh3-128/v{}", fingerprint::VERSION)),
        ];
        for (field, value) in &want {
            match meta_db
                .get(&wtxn, field)
                .map_err(|e| StoreError::io("read meta", e))?
            {
                Some(found) if found != value => {
                    return Err(StoreError {
                        kind: StoreErrorKind::Mismatch,
                        message: format!(
                            "store in {} was written with {field} = {found}, this configuration has {value}; \
                             use another data_dir or the original setting",
                            dir.display()
                        ),
                        source: None,
                    });
                }
                Some(_) => {}
                None => meta_db
                    .put(&mut wtxn, field, value)
                    .map_err(|e| StoreError::io("write meta", e))?,
            }
        }
        let window = meta.window_ms.to_string();
        if let Some(old) = meta_db
            .get(&wtxn, "window_ms")
            .map_err(|e| StoreError::io("read meta", e))?
            && old != window
        {
            tracing::info!(message = "Window changed since the store was written.", old_ms = old, new_ms = %window);
        }
        meta_db
            .put(&mut wtxn, "window_ms", &window)
            .map_err(|e| StoreError::io("write meta", e))?;
        wtxn.commit().map_err(|e| StoreError::io("commit meta", e))?;
        Ok(Self {
            env,
            log,
            path: dir.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `records` in one transaction; a full map is grown and the
    /// transaction retried.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Io`] if the transaction fails for another reason;
    /// nothing of it is stored then.
    pub fn append(&mut self, records: &[Record]) -> Result<(), StoreError> {
        self.with_growth(|env, log| {
            let mut wtxn = env.write_txn()?;
            for r in records {
                log.put(
                    &mut wtxn,
                    &key(r.shard, r.born_ms, &r.fingerprint.to_bytes()),
                    &(),
                )?;
            }
            wtxn.commit()
        })
        .map_err(|e| StoreError::io("append to the log", e))
    }

    /// Deletes the entries of `shard` that arrived before `before_ms`;
    /// returns how many.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Io`] if the transaction fails.
    pub fn expire(&mut self, shard: u32, before_ms: u64) -> Result<usize, StoreError> {
        let (lo, hi) = (key(shard, 0, &[0; 16]), key(shard, before_ms, &[0; 16]));
        self.with_growth(|env, log| {
            let mut wtxn = env.write_txn()?;
            let n = log.delete_range(&mut wtxn, &between(&lo, &hi))?;
            wtxn.commit()?;
            Ok(n)
        })
        .map_err(|e| StoreError::io("expire old entries", e))
    }

    /// Calls `f(fingerprint, arrival_ms)` for each entry of `shard` that
    /// arrived at or after `since_ms`, in arrival order; returns the count.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Io`] if the read fails.
    pub fn scan(
        &self,
        shard: u32,
        since_ms: u64,
        mut f: impl FnMut(Fingerprint, u64),
    ) -> Result<usize, StoreError> {
        let mut read = || -> heed::Result<usize> {
            let rtxn = self.env.read_txn()?;
            let (lo, hi) = (key(shard, since_ms, &[0; 16]), key(shard + 1, 0, &[0; 16]));
            let mut n = 0;
            for entry in self.log.range(&rtxn, &between(&lo, &hi))? {
                let (k, ()) = entry?;
                if let Some((born, fp)) = decode(k) {
                    f(fp, born);
                    n += 1;
                }
            }
            Ok(n)
        };
        read().map_err(|e| StoreError::io("scan the log", e))
    }

    /// Number of entries in the log.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Io`] if the read fails.
    pub fn len(&self) -> Result<u64, StoreError> {
        let read = || -> heed::Result<u64> {
            let rtxn = self.env.read_txn()?;
            self.log.len(&rtxn)
        };
        read().map_err(|e| StoreError::io("count the log", e))
    }

    /// Forces buffered commits to disk.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Io`] if the flush fails.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.env.force_sync().map_err(|e| StoreError::io("sync", e))
    }

    /// Runs `op`; on `MapFull`, doubles the map and runs it again.
    fn with_growth<T>(&mut self, mut op: impl FnMut(&Env, Log) -> heed::Result<T>) -> heed::Result<T> {
        loop {
            match op(&self.env, self.log) {
                Err(heed::Error::Mdb(MdbError::MapFull)) => {
                    let size = self.env.info().map_size * 2;
                    tracing::info!(message = "LMDB map full; growing it.", new_map_bytes = size);
                    // SAFETY: no transaction of this environment is open: this
                    // thread's has just ended and the store has one writer;
                    // readers (`scan`, `len`) run on the same thread.
                    unsafe { self.env.resize(size)? };
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: StoreMeta = StoreMeta {
        shards: 4,
        window_ms: 1000,
    };

    fn rec(shard: u32, born_ms: u64, i: u64) -> Record {
        Record {
            shard,
            born_ms,
            fingerprint: Fingerprint::of(&i.to_le_bytes()),
        }
    }

    #[test]
    fn append_scan_expire_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), META, false).unwrap();
        store
            .append(&[rec(1, 10, 1), rec(1, 20, 2), rec(2, 15, 3), rec(1, 30, 4)])
            .unwrap();
        let mut seen = vec![];
        store.scan(1, 20, |fp, born| seen.push((fp, born))).unwrap();
        assert_eq!(
            seen,
            vec![(rec(1, 20, 2).fingerprint, 20), (rec(1, 30, 4).fingerprint, 30)]
        );
        assert_eq!(store.expire(1, 25).unwrap(), 2);
        drop(store);
        let store = Store::open(dir.path(), META, true).unwrap();
        assert_eq!(store.len().unwrap(), 2);
    }

    #[test]
    fn mismatched_shards_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), META, false).unwrap());
        let err = Store::open(dir.path(), StoreMeta { shards: 8, ..META }, false)
            .err()
            .unwrap();
        assert_eq!(err.kind(), StoreErrorKind::Mismatch);
        assert!(err.to_string().contains("shards = 4"), "{err}");
        assert!(Store::open(dir.path(), StoreMeta { window_ms: 5, ..META }, false).is_ok());
    }

    #[test]
    fn a_full_map_grows() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), META, false).unwrap();
        // 256 MiB initial map; 4 M keys of 26 bytes need more than that.
        let batch: Vec<Record> = (0..500_000).map(|i| rec(0, i, i)).collect();
        for round in 0..8u64 {
            let shifted: Vec<Record> = batch
                .iter()
                .map(|r| rec(0, r.born_ms + round * 1_000_000, r.born_ms + round * 1_000_000))
                .collect();
            store.append(&shifted).unwrap();
        }
        assert_eq!(store.len().unwrap(), 4_000_000);
    }
}
