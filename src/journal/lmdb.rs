//! The durable log of accepted ids in LMDB (through heed). Why it is laid
//! out this way, and what its checksums and `fsync` guard against: README,
//! "The local store".
//!
//! - `log`: one chunk per shard per group commit; key `newest arrival ms
//!   (u64 BE) ‖ sequence (u32 BE) ‖ shard (u16 BE)`, value per id
//!   `fingerprint (16 bytes) ‖ age (u32 BE, ms before the newest arrival)`,
//!   then a checksum (XXH3-64 of the entries, seeded with XXH3-64 of the
//!   key). Time first: a commit appends at the end of the B-tree, expiry is
//!   one range delete at the start.
//! - `meta`: store format, shard count, fingerprint version, window; a
//!   store of another format, shard count or fingerprint does not open.
//! - `forgotten`: key `shard (u16 BE) ‖ fingerprint`, value `when (u64 BE
//!   ms) ‖ checksum`; a scan skips an id accepted at or before it; an entry
//!   goes once older than the window.
//!
//! One writer, one transaction per group commit. A damaged chunk is a
//! [`JournalErrorKind::Corrupt`] error at recovery; [`verify`] reads every
//! chunk (`eventsieve store verify`, run in a process of its own before
//! the sidecar opens the store).

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use heed::types::{Bytes, Str};
use heed::{CommitOrAbort, Database, Env, EnvFlags, EnvOpenOptions, MdbError, PutFlags};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::engine::Record;
use crate::engine::fingerprint::{self, Fingerprint};
use crate::journal::{Journal, JournalError, JournalErrorKind, JournalReader};

/// Version of the key and value layout.
pub const FORMAT: u32 = 4;
const KEY_LEN: usize = 8 + 4 + 2;
const ENTRY_LEN: usize = 16 + 4;
const SUM_LEN: usize = 8;
const INITIAL_MAP_BYTES: usize = 256 << 20;
/// Shards a key can tell apart (16 bits).
const MAX_SHARDS: usize = 1 << 16;

/// What a store is for; recorded at creation and checked at every open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreMeta {
    pub shards: u32,
    pub window_ms: u64,
    /// The field that places events in shards (`""`: the key).
    pub shard_key: String,
}

fn key(newest_ms: u64, seq: u32, shard: u32) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[..8].copy_from_slice(&newest_ms.to_be_bytes());
    k[8..12].copy_from_slice(&seq.to_be_bytes());
    k[12..].copy_from_slice(&(shard as u16).to_be_bytes());
    k
}

fn shard_of_key(k: &[u8]) -> Option<u32> {
    Some(u32::from(u16::from_be_bytes(k.get(12..14)?.try_into().ok()?)))
}

fn newest_of(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.get(..8)?.try_into().ok()?))
}

/// The checksum of a chunk: XXH3-64 of its entries seeded with XXH3-64 of
/// its key, so that a chunk moved under another key fails too.
fn checksum(key: &[u8], entries: &[u8]) -> [u8; SUM_LEN] {
    xxh3_64_with_seed(entries, xxh3_64(key)).to_be_bytes()
}

/// A chunk's entries, if its key has the right length and its checksum holds.
fn verified<'v>(key: &[u8], value: &'v [u8]) -> Option<&'v [u8]> {
    let (entries, sum) = value.split_at(value.len().checked_sub(SUM_LEN)?);
    let ok = key.len() == KEY_LEN && entries.len().is_multiple_of(ENTRY_LEN) && checksum(key, entries) == sum;
    ok.then_some(entries)
}

/// How many ids a chunk holds (whether or not its checksum holds).
fn ids_in(value: &[u8]) -> usize {
    value.len().saturating_sub(SUM_LEN) / ENTRY_LEN
}

/// The error for a chunk whose checksum fails.
fn corrupt(path: &Path, key: &[u8]) -> JournalError {
    let at = match (shard_of_key(key), newest_of(key)) {
        (Some(shard), Some(ms)) => format!("the chunk of shard {shard} written at {ms} ms"),
        _ => format!("a chunk with a malformed key ({} bytes)", key.len()),
    };
    JournalError::new(
        JournalErrorKind::Corrupt,
        format!(
            "the store in {} is damaged: {at} fails its checksum. Run `eventsieve store verify --data-dir {}`, \
             then restore the directory from a copy or move it aside (its ids would be accepted again)",
            path.display(),
            path.display()
        ),
    )
}

/// The error for a `forgotten` entry whose checksum fails.
fn corrupt_forgotten(path: &Path) -> JournalError {
    JournalError::new(
        JournalErrorKind::Corrupt,
        format!(
            "the store in {} is damaged: an entry of its forgotten ids fails its checksum. Run `eventsieve store \
             verify --data-dir {}`, then restore the directory from a copy",
            path.display(),
            path.display()
        ),
    )
}

/// A chunk's ids as `(fingerprint, arrival ms)`.
fn entries(newest_ms: u64, value: &[u8]) -> impl Iterator<Item = (Fingerprint, u64)> + '_ {
    value.chunks_exact(ENTRY_LEN).map(move |e| {
        let fp = Fingerprint::from_bytes(e[..16].try_into().expect("16 bytes"));
        let age = u32::from_be_bytes(e[16..].try_into().expect("4 bytes"));
        (fp, newest_ms.saturating_sub(u64::from(age)))
    })
}

type Log = Database<'static, Bytes, Bytes>;
type Forgotten = Database<'static, Bytes, Bytes>;

fn forgotten_key(shard: u32, fp: Fingerprint) -> [u8; 18] {
    let mut k = [0u8; 18];
    k[..2].copy_from_slice(&(shard as u16).to_be_bytes());
    k[2..].copy_from_slice(&fp.to_bytes());
    k
}

/// When a `forgotten` entry was made, if its checksum holds.
fn forgotten_at(key: &[u8], value: &[u8]) -> Option<u64> {
    let (at, sum) = value.split_at_checked(8)?;
    (key.len() == 18 && checksum(key, at) == sum).then(|| u64::from_be_bytes(at.try_into().expect("8 bytes")))
}
type Meta = Database<'static, Str, Str>;
/// The meta key of [`Journal::expired_before`].
const EXPIRED_BEFORE: &str = "expired_before";
/// The meta key of how far a shard's copy holds the replicated journal:
/// `journal_seq.<shard>`.
fn journal_seq_key(shard: u32) -> String {
    format!("journal_seq.{shard}")
}

/// Renames the store directory `dir` to `<dir>.damaged-<ms since the
/// epoch>` (for a store that cannot be used and can be rebuilt); returns
/// the new path.
///
/// # Errors
///
/// If the rename fails.
pub fn move_aside(dir: &Path) -> std::io::Result<PathBuf> {
    let mut name = dir.as_os_str().to_owned();
    name.push(format!(".damaged-{}", crate::engine::unix_ms()));
    let aside = PathBuf::from(name);
    std::fs::rename(dir, &aside)?;
    Ok(aside)
}

/// The LMDB store of one node.
pub struct LmdbStore {
    env: Env,
    log: Log,
    forgotten: Forgotten,
    meta: Meta,
    path: PathBuf,
    /// Tells apart chunks with the same newest arrival.
    seq: u32,
    /// See [`Journal::expired_before`]; in `meta` as `expired_before`.
    expired_before: u64,
    /// Kept between appends, so that one allocates nothing once warm.
    scratch: Scratch,
    /// Held (shared) by a [`LmdbReader`]'s transaction, and (exclusive) by
    /// a growth of the map, which LMDB allows only with no transaction of
    /// this process open.
    readers: Arc<RwLock<()>>,
}

/// What [`LmdbStore::append_with`] builds a commit's chunks in.
#[derive(Default)]
struct Scratch {
    /// The records' indices, by shard.
    order: Vec<usize>,
    /// Every chunk's value, one after another.
    values: Vec<u8>,
    /// Each chunk's key and where its value is in `values`.
    chunks: Vec<([u8; KEY_LEN], std::ops::Range<usize>)>,
}

impl LmdbStore {
    /// Opens or creates the store in `dir`.
    ///
    /// # Errors
    ///
    /// [`JournalErrorKind::Open`] if the directory or environment cannot be
    /// opened, [`JournalErrorKind::Mismatch`] if it was written for another
    /// format, shard count or fingerprint version.
    pub fn open(dir: &Path, meta: StoreMeta, fsync: bool) -> Result<Self, JournalError> {
        Self::open_with_map(dir, meta, fsync, INITIAL_MAP_BYTES)
    }

    fn open_with_map(
        dir: &Path,
        meta: StoreMeta,
        fsync: bool,
        map_bytes: usize,
    ) -> Result<Self, JournalError> {
        let open_err = |message: String, source: Option<heed::Error>| {
            let e = JournalError::new(JournalErrorKind::Open, message);
            match source {
                Some(source) => e.with_source(source),
                None => e,
            }
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
            .map_size(map_bytes.max(existing.next_power_of_two()))
            .max_dbs(3);
        // SAFETY: LMDB requires that one process does not open the same
        // environment twice and that its files are changed by nothing but
        // LMDB. The caller must give a directory that is exclusive to this
        // store and on a local filesystem (LMDB's lock file does not work
        // over network filesystems); the service opens its data directory
        // once, and LMDB's lock file serialises writers across processes.
        // NO_SYNC (unless `fsync`) means LMDB does not flush after a
        // commit: per LMDB's docs a system crash may then undo the last
        // commits or corrupt the database; a process crash cannot (see the
        // module docs).
        let env = unsafe {
            if !fsync {
                options.flags(EnvFlags::NO_SYNC);
            }
            options.open(dir)
        }
        .map_err(|e| open_err(format!("cannot open LMDB store in {}", dir.display()), Some(e)))?;
        let create = || -> heed::Result<(Log, Meta, Forgotten)> {
            let wtxn = env.write_txn()?;
            let dbs = env.create_databases_and_commit(wtxn, |dbo, wtxn| -> heed::Result<_> {
                let log: Database<Bytes, Bytes> = dbo.create_database(wtxn, Some("log"))?;
                let meta: Database<Str, Str> = dbo.create_database(wtxn, Some("meta"))?;
                let forgotten: Database<Bytes, Bytes> = dbo.create_database(wtxn, Some("forgotten"))?;
                Ok(CommitOrAbort::<_, ()>::Commit((log, meta, forgotten)))
            })?;
            Ok(dbs.unwrap_commit())
        };
        let (log, meta_db, forgotten) = create().map_err(|e| io("create databases", e))?;
        let mut wtxn = env.write_txn().map_err(|e| io("begin", e))?;
        let want = [
            ("format", FORMAT.to_string()),
            ("shards", meta.shards.to_string()),
            ("fingerprint", format!("xxh3-128/v{}", fingerprint::VERSION)),
            ("shard_key", meta.shard_key.clone()),
        ];
        let existing = meta_db
            .get(&wtxn, "format")
            .map_err(|e| io("read meta", e))?
            .is_some();
        for (field, value) in &want {
            let found = meta_db.get(&wtxn, field).map_err(|e| io("read meta", e))?;
            // Stores from before `shard_key` placed events by their key.
            let found = found.or((existing && *field == "shard_key").then_some(""));
            match found {
                Some(found) if found != value && *field == "shard_key" => {
                    let name = |v: &str| {
                        if v.is_empty() {
                            "the key".to_string()
                        } else {
                            format!("{v:?}")
                        }
                    };
                    return Err(JournalError::new(
                        JournalErrorKind::Mismatch,
                        format!(
                            "store in {} holds ids placed in shards by {}, this configuration places them by {}: \
                             the ids would be looked for in the wrong shards. Set shard_key back, or move the \
                             directory aside and start empty (the ids it holds would be accepted again)",
                            dir.display(),
                            name(found),
                            name(value)
                        ),
                    ));
                }
                Some(found) if found != value && *field == "format" => {
                    return Err(JournalError::new(
                        JournalErrorKind::Mismatch,
                        format!(
                            "store in {} has format {found}, from another version of eventsieve; this one reads \
                             format {value}. Run the version that wrote it, or move the directory aside and start \
                             empty (the ids it holds would be accepted again)",
                            dir.display()
                        ),
                    ));
                }
                Some(found) if found != value => {
                    return Err(JournalError::new(
                        JournalErrorKind::Mismatch,
                        format!(
                            "store in {} was written with {field} = {found}, this configuration has {value}; \
                             use another data_dir or the original setting",
                            dir.display()
                        ),
                    ));
                }
                Some(_) => {}
                None => meta_db
                    .put(&mut wtxn, field, value)
                    .map_err(|e| io("write meta", e))?,
            }
        }
        let window = meta.window_ms.to_string();
        if let Some(old) = meta_db.get(&wtxn, "window_ms").map_err(|e| io("read meta", e))?
            && old != window
        {
            tracing::info!(message = "Window changed since the store was written.", old_ms = old, new_ms = %window);
        }
        meta_db
            .put(&mut wtxn, "window_ms", &window)
            .map_err(|e| io("write meta", e))?;
        let expired_before = meta_db
            .get(&wtxn, EXPIRED_BEFORE)
            .map_err(|e| io("read meta", e))?
            .map_or(0, |v| v.parse().unwrap_or(0));
        wtxn.commit().map_err(|e| io("commit meta", e))?;
        Ok(Self {
            env,
            log,
            forgotten,
            meta: meta_db,
            path: dir.to_owned(),
            seq: 0,
            expired_before,
            scratch: Scratch::default(),
            readers: Arc::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of ids in the log.
    ///
    /// # Errors
    ///
    /// [`JournalErrorKind::Io`] if the read fails.
    pub fn len(&self) -> Result<u64, JournalError> {
        let read = || -> heed::Result<u64> {
            let rtxn = self.env.read_txn()?;
            let mut ids = 0;
            for entry in self.log.iter(&rtxn)? {
                ids += ids_in(entry?.1) as u64;
            }
            Ok(ids)
        };
        read().map_err(|e| io("count the log", e))
    }

    pub fn is_empty(&self) -> Result<bool, JournalError> {
        Ok(self.len()? == 0)
    }
}

impl LmdbStore {
    /// A value kept in the store's meta table (set by [`Self::set_meta`]).
    ///
    /// # Errors
    ///
    /// [`JournalErrorKind::Io`] if the read fails.
    pub fn meta(&self, key: &str) -> Result<Option<String>, JournalError> {
        let rtxn = self.env.read_txn().map_err(|e| io("read meta", e))?;
        let value = self.meta.get(&rtxn, key).map_err(|e| io("read meta", e))?;
        Ok(value.map(str::to_owned))
    }

    /// Keeps `value` under `key` in the store's meta table.
    ///
    /// # Errors
    ///
    /// [`JournalErrorKind::Io`] if the write fails.
    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<(), JournalError> {
        let (env, meta) = (&self.env, self.meta);
        with_growth(env, &self.readers, || {
            let mut wtxn = env.write_txn()?;
            meta.put(&mut wtxn, key, value)?;
            wtxn.commit()
        })
        .map_err(|e| write_failed(&self.path, "write meta", e))
    }

    /// The sequence of the replicated journal up to which this store holds
    /// a copy of `shard`'s messages (0: none).
    ///
    /// # Errors
    ///
    /// [`JournalErrorKind::Io`] if the read fails.
    pub fn journal_position(&self, shard: u32) -> Result<u64, JournalError> {
        let rtxn = self.env.read_txn().map_err(|e| io("read meta", e))?;
        let value = self
            .meta
            .get(&rtxn, &journal_seq_key(shard))
            .map_err(|e| io("read meta", e))?;
        Ok(value.and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    /// [`Journal::append`], recording in the same transaction that the
    /// copy of each shard in `positions` now holds the replicated journal
    /// up to its sequence.
    ///
    /// # Errors
    ///
    /// As [`Journal::append`].
    pub fn append_at(&mut self, records: &[Record], positions: &[(u32, u64)]) -> Result<(), JournalError> {
        self.append_with(records, positions)
    }

    /// [`Journal::forget`], recording positions as [`Self::append_at`].
    ///
    /// # Errors
    ///
    /// As [`Journal::forget`].
    pub fn forget_at(&mut self, records: &[Record], positions: &[(u32, u64)]) -> Result<(), JournalError> {
        self.forget_with(records, positions)
    }

    /// Appends `records` in one transaction, one chunk per shard, with the
    /// journal positions; a full map is grown and the transaction retried.
    fn append_with(&mut self, records: &[Record], positions: &[(u32, u64)]) -> Result<(), JournalError> {
        let Scratch {
            order,
            values,
            chunks,
        } = &mut self.scratch;
        order.clear();
        order.extend(0..records.len());
        order.sort_unstable_by_key(|&i| records[i].shard);
        values.clear();
        chunks.clear();
        for group in order.chunk_by(|&a, &b| records[a].shard == records[b].shard) {
            let newest = group.iter().map(|&i| records[i].born_ms).max().unwrap_or(0);
            let start = values.len();
            for &i in group {
                let r = &records[i];
                values.extend_from_slice(&r.fingerprint.to_bytes());
                let age = u32::try_from(newest - r.born_ms).unwrap_or(u32::MAX);
                values.extend_from_slice(&age.to_be_bytes());
            }
            values.extend_from_slice(&[0; SUM_LEN]);
            chunks.push((key(newest, 0, records[group[0]].shard), start..values.len()));
        }
        // Ascending keys within the commit, so that each one appends.
        chunks.sort_unstable_by_key(|(k, _)| *k);
        let seq = &mut self.seq;
        let (env, log, meta) = (&self.env, self.log, self.meta);
        let result = with_growth(env, &self.readers, || {
            let mut wtxn = env.write_txn()?;
            for (shard, at) in positions {
                meta.put(&mut wtxn, &journal_seq_key(*shard), &at.to_string())?;
            }
            for (k, at) in chunks.iter_mut() {
                let value = &mut values[at.clone()];
                loop {
                    *seq = seq.wrapping_add(1);
                    k[8..12].copy_from_slice(&seq.to_be_bytes());
                    let n = value.len() - SUM_LEN;
                    let sum = checksum(&k[..], &value[..n]);
                    value[n..].copy_from_slice(&sum);
                    // Appending needs a key above every other; after a
                    // clock step back, or a restart that reset `seq`, it
                    // is not, and the key is inserted where it belongs.
                    let append = log.put_with_flags(&mut wtxn, PutFlags::APPEND, &k[..], &value[..]);
                    let put = match append {
                        Err(heed::Error::Mdb(MdbError::KeyExist)) => {
                            log.put_with_flags(&mut wtxn, PutFlags::NO_OVERWRITE, &k[..], &value[..])
                        }
                        other => other,
                    };
                    match put {
                        Err(heed::Error::Mdb(MdbError::KeyExist)) => continue,
                        other => break other?,
                    }
                }
            }
            wtxn.commit()
        });
        result.map_err(|e| write_failed(&self.path, "append to the log", e))
    }

    /// Records each forgetting in `forgotten` (the later one when an id is
    /// forgotten twice), with the journal positions, in one transaction.
    fn forget_with(&mut self, records: &[Record], positions: &[(u32, u64)]) -> Result<(), JournalError> {
        let (env, forgotten, meta) = (&self.env, self.forgotten, self.meta);
        with_growth(env, &self.readers, || {
            let mut wtxn = env.write_txn()?;
            for (shard, at) in positions {
                meta.put(&mut wtxn, &journal_seq_key(*shard), &at.to_string())?;
            }
            for r in records {
                let k = forgotten_key(r.shard, r.fingerprint);
                let earlier = forgotten.get(&wtxn, &k[..])?.and_then(|v| forgotten_at(&k, v));
                let at = earlier.unwrap_or(0).max(r.born_ms).to_be_bytes();
                let value = [at, checksum(&k, &at)].concat();
                forgotten.put(&mut wtxn, &k[..], &value)?;
            }
            wtxn.commit()
        })
        .map_err(|e| write_failed(&self.path, "record forgotten ids", e))
    }
}

impl Journal for LmdbStore {
    fn append(&mut self, records: &[Record]) -> Result<(), JournalError> {
        self.append_with(records, &[])
    }

    fn forget(&mut self, records: &[Record]) -> Result<(), JournalError> {
        self.forget_with(records, &[])
    }

    /// Deletes the chunks whose ids all arrived before `before_ms` (a
    /// chunk goes once its newest id has expired): one range delete at the
    /// start of the keys; and the forgettings older than that.
    fn expire(&mut self, before_ms: u64) -> Result<usize, JournalError> {
        let (env, log, forgotten, meta) = (&self.env, self.log, self.forgotten, self.meta);
        let horizon = self.expired_before.max(before_ms);
        let hi = key(before_ms, 0, 0);
        let range = (Bound::Unbounded, Bound::Excluded(&hi[..]));
        let ids = with_growth(env, &self.readers, || {
            let mut wtxn = env.write_txn()?;
            let mut ids = 0;
            for entry in log.range(&wtxn, &range)? {
                ids += ids_in(entry?.1);
            }
            log.delete_range(&mut wtxn, &range)?;
            let mut old = Vec::new();
            for entry in forgotten.iter(&wtxn)? {
                let (k, v) = entry?;
                if forgotten_at(k, v).is_none_or(|at| at < before_ms) {
                    old.push(k.to_vec());
                }
            }
            for k in old {
                forgotten.delete(&mut wtxn, &k)?;
            }
            meta.put(&mut wtxn, EXPIRED_BEFORE, &horizon.to_string())?;
            wtxn.commit()?;
            Ok(ids)
        })
        .map_err(|e| write_failed(&self.path, "expire old entries", e))?;
        self.expired_before = horizon;
        Ok(ids)
    }

    fn expired_before(&self) -> u64 {
        self.expired_before
    }

    /// One pass over the chunks that may hold ids since `since_ms`; every
    /// chunk read is checked, whichever its shard.
    fn scan(&self, shards: &[u32], since_ms: u64, f: &mut dyn FnMut(Record)) -> Result<usize, JournalError> {
        let mut wanted = vec![false; MAX_SHARDS];
        for &shard in shards {
            wanted[shard as usize] = true;
        }
        let (env, dbs) = (&self.env, (self.log, self.forgotten));
        scan_log(env, dbs, &self.path, (&wanted, since_ms, u64::MAX), f, None)
    }

    fn reader(&self) -> Option<Box<dyn JournalReader>> {
        Some(Box::new(LmdbReader {
            env: self.env.clone(),
            log: self.log,
            forgotten: self.forgotten,
            path: self.path.clone(),
            readers: self.readers.clone(),
        }))
    }

    /// Forces commits made under `NO_SYNC` to disk.
    fn sync(&mut self) -> Result<(), JournalError> {
        self.env.force_sync().map_err(|e| io("sync", e))
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }
}

/// Below this many free bytes, an I/O error on write is taken for a full
/// disk: LMDB reports a short write (what a full disk gives) as `EIO`.
const FULL_BELOW: u64 = 16 << 20;

/// The error for a failed write; a full filesystem is named as such, with
/// the store's place and the free bytes.
/// Chunks a scan reads under one read transaction: between them a scan
/// beside the writer lets it reuse freed pages and grow the map.
const CHUNKS_PER_TXN: usize = 4096;

/// Calls `f` for each id of a `wanted` shard accepted in `since_ms..before_ms`
/// that was not forgotten after; returns the count. With `readers` (a scan
/// beside the writer) each transaction holds it shared.
fn scan_log(
    env: &Env,
    (log, forgotten_db): (Log, Forgotten),
    path: &Path,
    (wanted, since_ms, before_ms): (&[bool], u64, u64),
    f: &mut dyn FnMut(Record),
    readers: Option<&RwLock<()>>,
) -> Result<usize, JournalError> {
    let hold = || readers.map(|l| l.read().unwrap_or_else(PoisonError::into_inner));
    let mut forgotten = std::collections::HashMap::new();
    {
        let _reading = hold();
        let rtxn = env.read_txn().map_err(|e| io("scan the log", e))?;
        for entry in forgotten_db
            .iter(&rtxn)
            .map_err(|e| io("scan forgotten ids", e))?
        {
            let (k, v) = entry.map_err(|e| io("scan forgotten ids", e))?;
            let at = forgotten_at(k, v).ok_or_else(|| corrupt_forgotten(path))?;
            forgotten.insert(k.to_vec(), at);
        }
    }
    let mut n = 0;
    // Where the next transaction starts: at `since_ms`, then at the chunk
    // the one before stopped at (unread).
    let mut start = key(since_ms, 0, 0).to_vec();
    loop {
        let _reading = hold();
        let rtxn = env.read_txn().map_err(|e| io("scan the log", e))?;
        let range = log
            .range(&rtxn, &(Bound::Included(&start[..]), Bound::Unbounded))
            .map_err(|e| io("scan the log", e))?;
        let mut last = None;
        for (read, entry) in range.enumerate() {
            let (k, value) = entry.map_err(|e| io("scan the log", e))?;
            if read == CHUNKS_PER_TXN {
                last = Some(k.to_vec());
                break;
            }
            let (Some(newest), Some(shard), Some(chunk)) =
                (newest_of(k), shard_of_key(k), verified(k, value))
            else {
                return Err(corrupt(path, k));
            };
            if !wanted[shard as usize] {
                continue;
            }
            let within = |&(_, born): &(Fingerprint, u64)| born >= since_ms && born < before_ms;
            for (fingerprint, born_ms) in entries(newest, chunk).filter(within) {
                let hidden = !forgotten.is_empty()
                    && forgotten
                        .get(&forgotten_key(shard, fingerprint)[..])
                        .is_some_and(|&at| born_ms <= at);
                if hidden {
                    continue;
                }
                f(Record {
                    shard,
                    born_ms,
                    fingerprint,
                });
                n += 1;
            }
        }
        match last {
            None => return Ok(n),
            Some(k) => start = k,
        }
    }
}

/// Reads a store while its writer goes on (LMDB readers do not block the
/// writer): what the sealed tier is built from.
pub struct LmdbReader {
    env: Env,
    log: Log,
    forgotten: Forgotten,
    path: PathBuf,
    readers: Arc<RwLock<()>>,
}

impl JournalReader for LmdbReader {
    fn scan_span(
        &self,
        since_ms: u64,
        before_ms: u64,
        f: &mut dyn FnMut(Record),
    ) -> Result<usize, JournalError> {
        let wanted = vec![true; MAX_SHARDS];
        let dbs = (self.log, self.forgotten);
        scan_log(
            &self.env,
            dbs,
            &self.path,
            (&wanted, since_ms, before_ms),
            f,
            Some(&self.readers),
        )
    }

    fn forgotten(&self, f: &mut dyn FnMut(u32, Fingerprint, u64)) -> Result<(), JournalError> {
        let _reading = self.readers.read().unwrap_or_else(PoisonError::into_inner);
        let rtxn = self.env.read_txn().map_err(|e| io("scan forgotten ids", e))?;
        for entry in self
            .forgotten
            .iter(&rtxn)
            .map_err(|e| io("scan forgotten ids", e))?
        {
            let (k, v) = entry.map_err(|e| io("scan forgotten ids", e))?;
            let at = forgotten_at(k, v).ok_or_else(|| corrupt_forgotten(&self.path))?;
            let shard = u32::from(u16::from_be_bytes([k[0], k[1]]));
            f(
                shard,
                Fingerprint::from_bytes(k[2..].try_into().expect("16 bytes")),
                at,
            );
        }
        Ok(())
    }
}

fn write_failed(path: &Path, context: &str, source: heed::Error) -> JournalError {
    if let heed::Error::Io(e) = &source {
        let free = free_bytes(path);
        if is_full(e.raw_os_error(), free) {
            let free = free.map_or_else(|| "unknown".into(), |b| b.to_string());
            return JournalError::new(
                JournalErrorKind::Full,
                format!(
                    "the store in {} is full: no space left on its filesystem ({free} bytes free); \
                     free space or move data_dir elsewhere; commits resume as soon as there is room ({context})",
                    path.display()
                ),
            )
            .with_source(source);
        }
    }
    io(context, source)
}

/// Whether a write error with `errno` means the filesystem is full.
fn is_full(errno: Option<i32>, free: Option<u64>) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    const EIO: i32 = 5;
    match errno {
        Some(ENOSPC | EDQUOT) => true,
        Some(EIO) => free.is_some_and(|f| f < FULL_BELOW),
        _ => false,
    }
}

/// Bytes free for unprivileged writers on the filesystem holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: `c` is a NUL-terminated path and `st` points to writable
        // memory of the size statvfs fills; it is read only on success.
        let ok = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } == 0;
        // SAFETY: statvfs returned 0, so it filled `st`.
        let st = ok.then(|| unsafe { st.assume_init() })?;
        // The fields are 32 bits wide on some targets.
        #[allow(clippy::unnecessary_cast)]
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = path;
        None
    }
}

fn io(context: &str, source: heed::Error) -> JournalError {
    JournalError::new(JournalErrorKind::Io, context).with_source(source)
}
/// What [`verify`] found in an intact store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub chunks: u64,
    pub ids: u64,
}

/// Reads every chunk of the store in `dir`, changing nothing, and checks
/// its checksum.
///
/// A damaged B-tree page can crash the process that reads it (LMDB trusts
/// its pages): run this in a process of its own (`eventsieve store verify`).
///
/// # Errors
///
/// [`JournalErrorKind::Open`] if there is no store, [`JournalErrorKind::Mismatch`]
/// for another format, [`JournalErrorKind::Corrupt`] naming the first damaged
/// chunk and how many there are, [`JournalErrorKind::Io`] if LMDB reports
/// an error.
pub fn verify(dir: &Path) -> Result<VerifyReport, JournalError> {
    let size = std::fs::metadata(dir.join("data.mdb")).map_err(|e| {
        JournalError::new(
            JournalErrorKind::Open,
            format!("no store in {}: {e}", dir.display()),
        )
    })?;
    let mut options = EnvOpenOptions::new();
    options
        .map_size((size.len() as usize).next_power_of_two().max(INITIAL_MAP_BYTES))
        .max_dbs(3);
    // SAFETY: as in `LmdbStore::open`: the directory must be a store's own
    // local directory. READ_ONLY: nothing is written.
    let env = unsafe {
        options.flags(EnvFlags::READ_ONLY);
        options.open(dir)
    }
    .map_err(|e| {
        JournalError::new(
            JournalErrorKind::Open,
            format!("cannot open the LMDB store in {}", dir.display()),
        )
        .with_source(e)
    })?;
    let rtxn = env.read_txn().map_err(|e| io("begin", e))?;
    let (log, meta, forgotten) = env
        .open_databases_and_commit(rtxn, |dbo, rtxn| -> heed::Result<_> {
            let log: Option<Database<Bytes, Bytes>> = dbo.open_database(rtxn, Some("log"))?;
            let meta: Option<Database<Str, Str>> = dbo.open_database(rtxn, Some("meta"))?;
            let forgotten: Option<Database<Bytes, Bytes>> = dbo.open_database(rtxn, Some("forgotten"))?;
            Ok(CommitOrAbort::<_, ()>::Commit((log, meta, forgotten)))
        })
        .map_err(|e| io("open the databases", e))?
        .unwrap_commit();
    let rtxn = env.read_txn().map_err(|e| io("begin", e))?;
    if let Some(meta) = meta {
        let format = meta.get(&rtxn, "format").map_err(|e| io("read meta", e))?;
        if format != Some(FORMAT.to_string().as_str()) {
            return Err(JournalError::new(
                JournalErrorKind::Mismatch,
                format!(
                    "the store in {} has format {}, this version reads format {FORMAT}",
                    dir.display(),
                    format.unwrap_or("(none)")
                ),
            ));
        }
    }
    if let Some(forgotten) = forgotten {
        for entry in forgotten.iter(&rtxn).map_err(|e| io("read forgotten ids", e))? {
            let (k, v) = entry.map_err(|e| io("read forgotten ids", e))?;
            if forgotten_at(k, v).is_none() {
                return Err(corrupt_forgotten(dir));
            }
        }
    }
    let Some(log) = log else {
        return Ok(VerifyReport::default());
    };
    let mut report = VerifyReport::default();
    let (mut damaged, mut first) = (0u64, None);
    for entry in log.iter(&rtxn).map_err(|e| io("read the log", e))? {
        let (k, value) = entry.map_err(|e| io("read the log", e))?;
        report.chunks += 1;
        if newest_of(k).is_some() && verified(k, value).is_some() {
            report.ids += ids_in(value) as u64;
        } else {
            damaged += 1;
            first.get_or_insert_with(|| k.to_vec());
        }
    }
    match first {
        None => Ok(report),
        Some(k) => {
            let e = corrupt(dir, &k);
            Err(JournalError::new(
                JournalErrorKind::Corrupt,
                format!("{e} ({damaged} of {} chunks damaged)", report.chunks),
            ))
        }
    }
}

/// Runs `op`; on `MapFull`, doubles the map and runs it again.
fn with_growth<T>(
    env: &Env,
    readers: &RwLock<()>,
    mut op: impl FnMut() -> heed::Result<T>,
) -> heed::Result<T> {
    loop {
        match op() {
            Err(heed::Error::Mdb(MdbError::MapFull)) => {
                let size = env.info().map_size * 2;
                tracing::info!(message = "LMDB map full; growing it.", new_map_bytes = size);
                let _alone = readers.write().unwrap_or_else(PoisonError::into_inner);
                // SAFETY: no transaction of this environment is open: `op`'s
                // has just ended and the store has one writer; its own
                // readers (`scan`, `len`) run on the same thread, and a
                // `LmdbReader` holds `readers` while its transaction is open.
                unsafe { env.resize(size)? };
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: StoreMeta = StoreMeta {
        shards: 4,
        window_ms: 1000,
        shard_key: String::new(),
    };

    fn rec(shard: u32, born_ms: u64, i: u64) -> Record {
        Record {
            shard,
            born_ms,
            fingerprint: Fingerprint::of(&i.to_le_bytes()),
        }
    }

    #[test]
    fn a_scan_over_more_chunks_than_one_transaction_reads_takes_each_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LmdbStore::open(dir.path(), META, false).unwrap();
        let n = 2 * CHUNKS_PER_TXN as u64 + 7;
        for i in 0..n {
            store.append(&[rec((i % 4) as u32, 1_000 + i, i)]).unwrap();
        }
        let mut seen = std::collections::BTreeSet::new();
        let reader = store.reader().unwrap();
        let count = reader
            .scan_span(1_000, 1_000 + n, &mut |r| assert!(seen.insert(r.fingerprint)))
            .unwrap();
        assert_eq!((count, seen.len()), (n as usize, n as usize));
        let mut late = 0;
        reader
            .scan_span(1_000 + n - 10, u64::MAX, &mut |_| late += 1)
            .unwrap();
        assert_eq!(late, 10);
    }

    #[test]
    fn append_scan_expire_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LmdbStore::open(dir.path(), META, false).unwrap();
        store.append(&[rec(1, 10, 1), rec(2, 15, 3)]).unwrap();
        store.append(&[rec(1, 20, 2), rec(1, 30, 4)]).unwrap();
        let mut seen = vec![];
        store.scan(&[1], 20, &mut |r| seen.push(r)).unwrap();
        assert_eq!(seen, vec![rec(1, 20, 2), rec(1, 30, 4)]);
        let mut both = 0;
        store.scan(&[1, 2], 0, &mut |_| both += 1).unwrap();
        assert_eq!(both, 4);
        assert_eq!(
            store.expire(25).unwrap(),
            2,
            "the first commit's chunks of shards 1 and 2"
        );
        store.sync().unwrap();
        drop(store);
        let store = LmdbStore::open(dir.path(), META, true).unwrap();
        assert_eq!(store.len().unwrap(), 2);
    }

    #[test]
    fn keys_order_by_time_then_sequence_then_shard() {
        assert!(key(10, 0, 65_535) < key(11, 0, 0));
        assert!(key(10, 1, 65_535) < key(10, 2, 0));
        let k = key(1_700_000_000_123, 7, 65_535);
        assert_eq!(
            (newest_of(&k), shard_of_key(&k)),
            (Some(1_700_000_000_123), Some(65_535))
        );
    }

    /// A clock that steps back, and a reopened store whose sequence starts
    /// again at zero, give keys below the last: inserted, not lost.
    #[test]
    fn keys_below_the_last_are_inserted_where_they_belong() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LmdbStore::open(dir.path(), META, false).unwrap();
        store.append(&[rec(0, 100, 1), rec(1, 100, 2)]).unwrap();
        store.append(&[rec(2, 90, 3)]).unwrap();
        drop(store);
        let mut store = LmdbStore::open(dir.path(), META, false).unwrap();
        store.append(&[rec(0, 100, 4), rec(1, 100, 5)]).unwrap();
        let mut seen = vec![];
        store
            .scan(&[0, 1, 2], 0, &mut |r| seen.push(r.fingerprint))
            .unwrap();
        seen.sort_by_key(|fp| fp.to_bytes());
        let mut want: Vec<_> = [(0, 1), (1, 2), (2, 3), (0, 4), (1, 5)]
            .map(|(s, i)| rec(s, 100, i).fingerprint)
            .to_vec();
        want.sort_by_key(|fp| fp.to_bytes());
        assert_eq!(seen, want);
        assert_eq!(store.expire(95).unwrap(), 1, "the chunk written at 90");
    }

    #[test]
    fn a_store_of_the_previous_format_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let store = LmdbStore::open(dir.path(), META, false).unwrap();
        let rtxn = store.env.read_txn().unwrap();
        let meta: Meta = store
            .env
            .open_databases_and_commit(rtxn, |dbo, rtxn| -> heed::Result<_> {
                let meta = dbo.open_database(rtxn, Some("meta"))?.expect("created at open");
                Ok(CommitOrAbort::<_, ()>::Commit(meta))
            })
            .unwrap()
            .unwrap_commit();
        let mut wtxn = store.env.write_txn().unwrap();
        meta.put(&mut wtxn, "format", "3").unwrap();
        wtxn.commit().unwrap();
        drop(store);
        let err = LmdbStore::open(dir.path(), META, false).err().unwrap();
        assert_eq!(err.kind(), JournalErrorKind::Mismatch);
        let text = err.to_string();
        assert!(
            text.contains("format 3") && text.contains("reads format 4"),
            "{text}"
        );
        assert_eq!(verify(dir.path()).unwrap_err().kind(), JournalErrorKind::Mismatch);
    }

    #[test]
    fn how_far_the_log_was_expired_is_kept_across_opens_and_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LmdbStore::open(dir.path(), META, false).unwrap();
        assert_eq!(store.expired_before(), 0, "a new store has lost nothing");
        store.append(&[rec(1, 10, 1)]).unwrap();
        store.append(&[rec(1, 50, 2)]).unwrap();
        store.expire(40).unwrap();
        store.expire(30).unwrap();
        assert_eq!(store.expired_before(), 40);
        drop(store);
        let store = LmdbStore::open(dir.path(), META, false).unwrap();
        assert_eq!(store.expired_before(), 40);
        let mut seen = vec![];
        store.scan(&[1], 0, &mut |r| seen.push(r)).unwrap();
        assert_eq!(seen, vec![rec(1, 50, 2)]);
    }

    #[test]
    fn a_forgotten_id_is_hidden_until_accepted_again_and_expires_with_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LmdbStore::open(dir.path(), META, false).unwrap();
        store
            .append(&[rec(1, 10, 1), rec(1, 10, 2), rec(2, 10, 1)])
            .unwrap();
        // Forget id 1 of shard 1 at 20; accept it again at 30.
        store.forget(&[rec(1, 20, 1)]).unwrap();
        let seen = |store: &LmdbStore| {
            let mut seen = vec![];
            store.scan(&[1, 2], 0, &mut |r| seen.push(r)).unwrap();
            seen.sort_by_key(|r| (r.shard, r.born_ms, r.fingerprint.to_bytes()));
            seen
        };
        let mut want = vec![rec(1, 10, 2), rec(2, 10, 1)];
        want.sort_by_key(|r| (r.shard, r.born_ms, r.fingerprint.to_bytes()));
        assert_eq!(seen(&store), want, "only shard 1's id 1 is hidden");
        store.append(&[rec(1, 30, 1)]).unwrap();
        drop(store);
        let mut store = LmdbStore::open(dir.path(), META, false).unwrap();
        assert!(seen(&store).contains(&rec(1, 30, 1)), "accepted after the forget");
        assert!(!seen(&store).contains(&rec(1, 10, 1)));
        // The forgetting goes with the window.
        store.expire(21).unwrap();
        let rtxn = store.env.read_txn().unwrap();
        assert_eq!(store.forgotten.len(&rtxn).unwrap(), 0);
        drop(rtxn);
        drop(store);
        assert_eq!(verify(dir.path()).unwrap().ids, 1);
    }

    #[test]
    fn mismatched_shards_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(LmdbStore::open(dir.path(), META, false).unwrap());
        let err = LmdbStore::open(dir.path(), StoreMeta { shards: 8, ..META }, false)
            .err()
            .unwrap();
        assert_eq!(err.kind(), JournalErrorKind::Mismatch);
        assert!(err.to_string().contains("shards = 4"), "{err}");
        assert!(LmdbStore::open(dir.path(), StoreMeta { window_ms: 5, ..META }, false).is_ok());
    }

    #[test]
    fn a_changed_shard_key_is_refused_and_stores_from_before_it_were_placed_by_the_key() {
        let by_session = || StoreMeta {
            shard_key: "session_id".into(),
            ..META
        };
        let dir = tempfile::tempdir().unwrap();
        drop(LmdbStore::open(dir.path(), META, false).unwrap());
        let err = LmdbStore::open(dir.path(), by_session(), false).err().unwrap();
        assert_eq!(err.kind(), JournalErrorKind::Mismatch);
        assert!(
            err.to_string().contains("by the key") && err.to_string().contains("Set shard_key back"),
            "{err}"
        );
        // A store written before the setting existed has no entry for it.
        let old = tempfile::tempdir().unwrap();
        let store = LmdbStore::open(old.path(), META, false).unwrap();
        let mut wtxn = store.env.write_txn().unwrap();
        assert!(store.meta.delete(&mut wtxn, "shard_key").unwrap());
        wtxn.commit().unwrap();
        drop(store);
        assert!(LmdbStore::open(old.path(), by_session(), false).is_err());
        assert!(LmdbStore::open(old.path(), META, false).is_ok());
        let kept = tempfile::tempdir().unwrap();
        drop(LmdbStore::open(kept.path(), by_session(), false).unwrap());
        assert!(LmdbStore::open(kept.path(), by_session(), false).is_ok());
    }

    #[test]
    fn a_full_map_grows() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LmdbStore::open_with_map(dir.path(), META, false, 1 << 20).unwrap();
        // 2 M ids of 20 bytes in chunks of 100 000: far past the 1 MiB map.
        for round in 0..20u64 {
            let chunk: Vec<Record> = (0..100_000)
                .map(|i| rec((i % 4) as u32, round, round * 100_000 + i))
                .collect();
            store.append(&chunk).unwrap();
        }
        assert_eq!(store.len().unwrap(), 2_000_000);
        assert!(store.env.info().map_size > 32 << 20);
    }

    #[test]
    fn chunks_with_the_same_newest_arrival_are_all_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LmdbStore::open(dir.path(), META, false).unwrap();
        store.append(&[rec(3, 50, 1), rec(3, 40, 2)]).unwrap();
        store.append(&[rec(3, 50, 3)]).unwrap();
        let mut seen = vec![];
        store.scan(&[3], 45, &mut |r| seen.push(r)).unwrap();
        seen.sort_by_key(|r| r.fingerprint.to_bytes());
        let mut want = vec![rec(3, 50, 1), rec(3, 50, 3)];
        want.sort_by_key(|r| r.fingerprint.to_bytes());
        assert_eq!(seen, want, "the id born at 40 is before `since`");
        // A chunk expires once its newest id has.
        assert_eq!(store.expire(50).unwrap(), 0);
        assert_eq!(store.expire(51).unwrap(), 3);
        assert!(store.is_empty().unwrap());
    }

    /// Changes the first `len` bytes of every copy of `find` in the store's
    /// data file (a bad disk, a stray write; free pages may hold old copies).
    fn damage(dir: &Path, find: &[u8], len: usize) {
        let path = dir.join("data.mdb");
        let mut bytes = std::fs::read(&path).unwrap();
        let copies: Vec<usize> = (0..bytes.len() - find.len())
            .filter(|&i| bytes[i..i + find.len()] == *find)
            .collect();
        assert!(!copies.is_empty(), "the bytes to damage are in the file");
        for at in copies {
            for b in &mut bytes[at..at + len] {
                *b ^= 0x5a;
            }
        }
        std::fs::write(&path, bytes).unwrap();
    }

    #[test]
    fn a_damaged_chunk_is_a_clear_error_at_recovery_and_in_verify() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LmdbStore::open(dir.path(), META, false).unwrap();
        let records: Vec<Record> = (0..1000).map(|i| rec((i % 4) as u32, 100, i)).collect();
        store.append(&records).unwrap();
        store.sync().unwrap();
        drop(store);
        assert_eq!(verify(dir.path()).unwrap(), VerifyReport { chunks: 4, ids: 1000 });

        damage(dir.path(), &rec(2, 100, 2).fingerprint.to_bytes(), 16);
        let err = verify(dir.path()).unwrap_err();
        assert_eq!(err.kind(), JournalErrorKind::Corrupt);
        let text = err.to_string();
        assert!(
            text.contains("shard 2") && text.contains(&dir.path().display().to_string()),
            "{text}"
        );
        assert!(text.contains("1 of 4 chunks"), "{text}");

        // Recovery reads every chunk of the window, whichever shard it asks
        // for: a damaged one stops it.
        let store = LmdbStore::open(dir.path(), META, false).unwrap();
        for shards in [&[1][..], &[2], &[0, 1, 2, 3]] {
            let err = store.scan(shards, 0, &mut |_| {}).unwrap_err();
            assert_eq!(err.kind(), JournalErrorKind::Corrupt, "{err}");
        }
        assert_eq!(
            store.scan(&[1], 101, &mut |_| {}).unwrap(),
            0,
            "chunks before `since` are not read"
        );
    }

    #[test]
    fn a_full_filesystem_is_named_with_the_store_and_the_free_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let enospc = heed::Error::Io(std::io::Error::from_raw_os_error(28));
        let err = write_failed(dir.path(), "append to the log", enospc);
        assert_eq!(err.kind(), JournalErrorKind::Full);
        let text = err.to_string();
        assert!(
            text.contains("is full") && text.contains(&dir.path().display().to_string()),
            "{text}"
        );
        assert!(free_bytes(dir.path()).is_some_and(|b| b > 0));
        // EIO is a full disk only when the filesystem is nearly full.
        assert!(is_full(Some(5), Some(1 << 20)));
        assert!(!is_full(Some(5), Some(1 << 30)));
        let eio = heed::Error::Io(std::io::Error::from_raw_os_error(5));
        assert_eq!(
            write_failed(dir.path(), "append", eio).kind(),
            JournalErrorKind::Io
        );
    }

    #[test]
    fn verify_refuses_another_format_and_a_missing_store() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(verify(dir.path()).unwrap_err().kind(), JournalErrorKind::Open);
        drop(LmdbStore::open(dir.path(), META, false).unwrap());
        assert_eq!(verify(dir.path()).unwrap(), VerifyReport::default());
    }

    #[test]
    fn the_highest_shard_is_recovered_and_expired_like_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let meta = StoreMeta {
            shards: 65_536,
            window_ms: 1000,
            shard_key: String::new(),
        };
        let mut store = LmdbStore::open(dir.path(), meta.clone(), false).unwrap();
        store
            .append(&[rec(65_535, 10, 1), rec(65_534, 10, 2), rec(0, 10, 3)])
            .unwrap();
        store.append(&[rec(65_535, 20, 4)]).unwrap();
        drop(store);
        let mut store = LmdbStore::open(dir.path(), meta, false).unwrap();
        let count = |store: &LmdbStore, shard| store.scan(&[shard], 0, &mut |_| {}).unwrap();
        assert_eq!(count(&store, 65_535), 2);
        assert_eq!(count(&store, 65_534), 1);
        assert_eq!(count(&store, 0), 1);
        assert_eq!(store.expire(15).unwrap(), 3, "one chunk in each of three shards");
        assert_eq!(count(&store, 65_535), 1);
    }
}
