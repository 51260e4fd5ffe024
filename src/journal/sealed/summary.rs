//! The summary: one filter per shard over every sealed file, in place of
//! each file's filters (`sealed_summary = true`).
//!
//! A new id then costs one probe, two cache lines (its two candidate
//! buckets, fetched ahead for a batch) whatever the number of files,
//! where per-file filters cost three lines per file. Each shard's filter is
//! a cuckoo filter: buckets of four 15-bit fingerprints stored semi-sorted
//! in 7 bytes (14 bits a slot), two buckets per id, kept between 90 % and
//! 96 % full: about 1.9–2.0 bytes per id, false positives about
//! `8 × load / 32 768` (0.022–0.023 %). A hit is confirmed in the files as
//! before (a block read in each file that may hold it), so verdicts stay
//! exact.
//!
//! What the summary holds is every entry of every file of the tier, as a
//! multiset (an id in two files is there twice), and possibly more: the
//! entries of a file being sealed before it is in place, and those of a
//! damaged file it could not read to remove. It never holds less, which
//! is what keeps verdicts exact: an entry is removed only when the file
//! it came from has left the tier (expired, or merged into one that
//! dropped it), and removing finds one copy of exactly what was inserted.
//!
//! It is updated in place under each shard's lock, a few thousand entries
//! at a time, by the one change the tier makes at a time, and saved after
//! each change in [`GROUPS`] files, `summary-<group>.filter`, each with the
//! names of the files holding its shards (and their footers' checksums);
//! only the groups that changed are written. At open a group is read back
//! if those are the tier's files, and otherwise (a crash during a change)
//! built again from the files.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use xxhash_rust::xxh3::xxh3_64;

use super::{Entry, Generation, SealedError, io};
use crate::engine::fingerprint::Fingerprint;

/// Fingerprints per bucket.
const SLOTS: u64 = 4;
/// Bits of a fingerprint, and of the part of it a bucket stores as is:
/// the top four bits of the bucket's four fingerprints are stored
/// together, sorted, as one of [`PREFIXES`] (12 bits instead of 16).
const TAG_BITS: u32 = 15;
const LOW_BITS: u32 = TAG_BITS - 4;
const CODE_BITS: u32 = 12;
/// Bytes a bucket takes: 12 + 4 × 11 = 56 bits.
const BUCKET_BYTES: usize = 7;
const BUCKET_MASK: u64 = (1 << (8 * BUCKET_BYTES)) - 1;
/// Kicks an insert tries before the filter counts as full.
const MAX_KICKS: usize = 2000;
/// The load a shard's filter is built for (with room for the next seal,
/// when it grows); it is built again from the files, larger, when the
/// next seal would take it above [`MAX_LOAD`] (or an insert fails). Once
/// the window is steady (a seal's ids as many as those expiring) the load
/// stays near [`BUILT_LOAD`]: 14 / 0.9 bits, 1.94 bytes per id.
const BUILT_LOAD: f64 = 0.90;
const MAX_LOAD: f64 = 0.96;
/// Entries applied per hold of a shard's lock.
const CHUNK: usize = 4096;
const MAGIC: &[u8; 8] = b"ESSUMM02";

/// The 3 876 ways four 4-bit prefixes can be in ascending order, each as
/// four nibbles (the first prefix in the top one), themselves ascending:
/// a bucket stores the index of its prefixes here.
static PREFIXES: [u16; 3876] = prefixes();

const fn prefixes() -> [u16; 3876] {
    let mut out = [0; 3876];
    let mut n = 0;
    let mut key: u32 = 0;
    while key < 1 << 16 {
        let (a, b, c, d) = (key >> 12, (key >> 8) & 15, (key >> 4) & 15, key & 15);
        if a <= b && b <= c && c <= d {
            out[n] = key as u16;
            n += 1;
        }
        key += 1;
    }
    out
}

/// A bucket's fingerprints, ascending (0 for a free slot).
fn decode(word: u64) -> [u16; 4] {
    let prefixes = PREFIXES[(word & ((1 << CODE_BITS) - 1)) as usize];
    std::array::from_fn(|k| {
        let prefix = (prefixes >> (12 - 4 * k)) & 15;
        let low = (word >> (CODE_BITS + LOW_BITS * k as u32)) as u16 & ((1 << LOW_BITS) - 1);
        (prefix << LOW_BITS) | low
    })
}

/// The bucket holding `tags`, in any order.
fn encode(mut tags: [u16; 4]) -> u64 {
    tags.sort_unstable();
    let key = tags.iter().fold(0, |key, t| (key << 4) | (t >> LOW_BITS));
    // Sorted tags have sorted prefixes, each of which is listed.
    let code = PREFIXES.binary_search(&key).unwrap_or(0) as u64;
    tags.iter().enumerate().fold(code, |word, (k, &t)| {
        word | (u64::from(t & ((1 << LOW_BITS) - 1)) << (CODE_BITS + LOW_BITS * k as u32))
    })
}

/// One shard's cuckoo filter: buckets of four 15-bit fingerprints
/// stored semi-sorted in 7 bytes (Fan et al., "Cuckoo Filter: Practically
/// Better Than Bloom", 2014), 14 bits per slot.
pub(super) struct Cuckoo {
    /// The buckets, then one byte so that each bucket reads as a `u64`.
    bytes: Box<[u8]>,
    buckets: u64,
    ids: u64,
    rng: u64,
}

fn fastrange(x: u64, n: u64) -> u64 {
    ((u128::from(x) * u128::from(n)) >> 64) as u64
}

impl Cuckoo {
    /// An empty filter with room for `ids` at [`BUILT_LOAD`].
    pub(super) fn with_room(ids: u64) -> Self {
        let buckets = ((ids as f64 / BUILT_LOAD / SLOTS as f64).ceil() as u64).max(1);
        Self::from_bytes(vec![0; buckets as usize * BUCKET_BYTES + 1].into(), 0)
    }

    /// The filter of `bytes` (buckets and the byte past them) holding `ids`.
    fn from_bytes(bytes: Box<[u8]>, ids: u64) -> Self {
        Self {
            buckets: (bytes.len() / BUCKET_BYTES) as u64,
            bytes,
            ids,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn slots(&self) -> u64 {
        self.buckets * SLOTS
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Whether `more` ids fit without passing [`MAX_LOAD`].
    fn fits(&self, more: u64) -> bool {
        (self.ids + more) as f64 <= self.slots() as f64 * MAX_LOAD
    }

    /// The id's fingerprint (never 0, which marks a free slot) and first
    /// bucket: from the `lo` half, as files use the `hi` half's top bits.
    fn place(&self, fp: Fingerprint) -> (u16, u64) {
        let tag = (fp.lo as u16 & ((1 << TAG_BITS) - 1)).max(1);
        (tag, fastrange(fp.lo, self.buckets))
    }

    /// The other bucket of `tag` in bucket `i`: `(h(tag) - i) mod n`, its
    /// own inverse, so that it works for any number of buckets.
    fn alt(&self, i: u64, tag: u16) -> u64 {
        let n = self.buckets;
        let h = fastrange(super::fmix64(u64::from(tag)), n);
        // `h` and `i` are below `n`: one subtraction, not a division.
        let alt = h + n - i;
        if alt >= n { alt - n } else { alt }
    }

    fn word(&self, i: u64) -> u64 {
        let at = i as usize * BUCKET_BYTES;
        let mut word = [0; 8];
        word.copy_from_slice(&self.bytes[at..at + 8]);
        u64::from_le_bytes(word) & BUCKET_MASK
    }

    fn set_word(&mut self, i: u64, word: u64) {
        let at = i as usize * BUCKET_BYTES;
        self.bytes[at..at + BUCKET_BYTES].copy_from_slice(&word.to_le_bytes()[..BUCKET_BYTES]);
    }

    fn bucket_has(&self, i: u64, tag: u16) -> bool {
        decode(self.word(i)).contains(&tag)
    }

    #[inline]
    pub(super) fn contains(&self, fp: Fingerprint) -> bool {
        let (tag, i) = self.place(fp);
        self.bucket_has(i, tag) || self.bucket_has(self.alt(i, tag), tag)
    }

    /// Asks the CPU for the two buckets of `fp` (each may straddle two
    /// cache lines).
    #[inline]
    pub(super) fn prefetch(&self, fp: Fingerprint) {
        let (tag, i) = self.place(fp);
        for b in [i, self.alt(i, tag)] {
            let at = b as usize * BUCKET_BYTES;
            for byte in [at, at + BUCKET_BYTES] {
                super::prefetch_read(std::ptr::from_ref(&self.bytes[byte]));
            }
        }
    }

    /// Puts `tag` in a free slot of bucket `i`, if it has one.
    fn put(&mut self, i: u64, tag: u16) -> bool {
        let mut tags = decode(self.word(i));
        match tags.iter().position(|&t| t == 0) {
            Some(s) => {
                tags[s] = tag;
                self.set_word(i, encode(tags));
                true
            }
            None => false,
        }
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Inserts `fp`; false (the filter unchanged) when no room was found
    /// within [`MAX_KICKS`] moves.
    pub(super) fn insert(&mut self, fp: Fingerprint) -> bool {
        let (tag, i1) = self.place(fp);
        let i2 = self.alt(i1, tag);
        if self.put(i1, tag) || self.put(i2, tag) {
            self.ids += 1;
            return true;
        }
        // Each bucket changed is recorded as it was, so that a failed
        // insert can be undone: no fingerprint already in may be lost.
        let mut moves: Vec<(u64, u64)> = Vec::new();
        let (mut i, mut tag) = (if self.next_random() & 1 == 0 { i1 } else { i2 }, tag);
        for _ in 0..MAX_KICKS {
            let slot = (self.next_random() % SLOTS) as usize;
            let word = self.word(i);
            let mut tags = decode(word);
            let victim = std::mem::replace(&mut tags[slot], tag);
            self.set_word(i, encode(tags));
            moves.push((i, word));
            tag = victim;
            i = self.alt(i, tag);
            if self.put(i, tag) {
                self.ids += 1;
                return true;
            }
        }
        for (i, word) in moves.into_iter().rev() {
            self.set_word(i, word);
        }
        false
    }

    /// Removes one copy of `fp`; false if it holds none.
    pub(super) fn remove(&mut self, fp: Fingerprint) -> bool {
        let (tag, i1) = self.place(fp);
        for i in [i1, self.alt(i1, tag)] {
            let mut tags = decode(self.word(i));
            if let Some(s) = tags.iter().position(|&t| t == tag) {
                tags[s] = 0;
                self.set_word(i, encode(tags));
                self.ids -= 1;
                return true;
            }
        }
        false
    }
}

fn write_guard<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read_guard<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Files the summary is saved in: shard `s` in group `s % GROUPS`, so that
/// a change to one shard's file (an adoption at a takeover) writes one
/// group, not the whole summary.
pub(super) const GROUPS: u32 = 64;

pub(super) fn group_of(shard: u32) -> usize {
    (shard % GROUPS) as usize
}

/// The shards of group `group`, of `count`.
fn group_shards(group: usize, count: u32) -> impl Iterator<Item = u32> {
    (group as u32..count).step_by(GROUPS as usize)
}

/// The file of group `group` in the tier's directory.
pub(super) fn group_file(group: usize) -> String {
    format!("summary-{group:02}.filter")
}

/// The summary of a tier: a filter per shard.
pub(super) struct Summary {
    shards: Box<[RwLock<Cuckoo>]>,
    /// Per group, the files its file on disk covers; `None` once one of
    /// its shards changed since it was saved.
    saved: Mutex<Vec<Option<Vec<String>>>>,
    /// Per shard, changes made to its filter.
    versions: Box<[AtomicU64]>,
}

impl Summary {
    /// Opens the summary of `files` for `shards` shards (more if a file
    /// holds a shard beyond them): each group read back from `dir` if its
    /// file covers `covers(group)`, the others built from `files` and
    /// saved. Returns it and how many groups were built.
    ///
    /// # Errors
    ///
    /// A file could not be read, or a group could not be saved.
    pub(super) fn open(
        dir: &Path,
        shards: u32,
        files: &[Arc<Generation>],
        covers: impl Fn(usize) -> Vec<String>,
    ) -> Result<(Self, usize), SealedError> {
        let most = files
            .iter()
            .flat_map(|g| g.shards_held())
            .map(|s| s + 1)
            .max()
            .unwrap_or(0);
        let count = shards.max(most);
        let summary = Self {
            shards: (0..count).map(|_| RwLock::new(Cuckoo::with_room(0))).collect(),
            saved: Mutex::new(vec![None; GROUPS as usize]),
            versions: (0..count).map(|_| AtomicU64::new(0)).collect(),
        };
        let mut built = 0;
        for group in 0..summary.groups() {
            let names = covers(group);
            if !summary.load_group(dir, group, &names) {
                built += 1;
                for shard in group_shards(group, count) {
                    summary.rebuild_shard(shard, files)?;
                }
            }
        }
        summary.save(dir, covers)?;
        Ok((summary, built))
    }

    /// Groups with shards: files it is saved in.
    fn groups(&self) -> usize {
        self.shard_count().min(GROUPS) as usize
    }

    /// Shards it has filters for.
    pub(super) fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    /// The filter of `shard`, to probe; `None` for a shard beyond those it
    /// has (whose ids no file may hold).
    pub(super) fn read(&self, shard: u32) -> Option<RwLockReadGuard<'_, Cuckoo>> {
        self.shards.get(shard as usize).map(read_guard)
    }

    /// Fingerprints it holds.
    #[cfg(test)]
    pub(super) fn ids(&self) -> u64 {
        self.shards.iter().map(|s| read_guard(s).ids).sum()
    }

    /// Bytes of RAM its filters take.
    pub(super) fn memory_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| read_guard(s).bytes() + std::mem::size_of::<RwLock<Cuckoo>>())
            .sum()
    }

    /// Marks `shard` changed: its version moves on, and its group is to be
    /// saved again.
    fn touch(&self, shard: u32) {
        self.versions[shard as usize].fetch_add(1, Relaxed);
        self.saved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)[group_of(shard)] = None;
    }

    /// How many changes `shard`'s filter has had: a filter built from a
    /// snapshot of the files is put in place only if this has not moved.
    pub(super) fn version(&self, shard: u32) -> u64 {
        self.versions[shard as usize].load(Relaxed)
    }

    /// Whether `shard`'s filter could not take `more` ids without passing
    /// [`MAX_LOAD`].
    pub(super) fn crowded(&self, shard: u32, more: u64) -> bool {
        self.shards
            .get(shard as usize)
            .is_some_and(|lock| !read_guard(lock).fits(more))
    }

    /// A filter of `shard` built from `files`, with room for `more` ids
    /// besides theirs.
    ///
    /// # Errors
    ///
    /// A file could not be read.
    pub(super) fn built(
        &self,
        shard: u32,
        files: &[Arc<Generation>],
        more: u64,
    ) -> Result<Cuckoo, SealedError> {
        let mut room: u64 = files.iter().map(|g| g.shard_room(shard)).sum::<u64>() + more;
        'build: loop {
            let mut filter = Cuckoo::with_room(room);
            for g in files {
                for e in g.shard_entries(shard) {
                    if !filter.insert(e?.fingerprint) {
                        room += room / 4 + 1;
                        continue 'build;
                    }
                }
            }
            return Ok(filter);
        }
    }

    /// Puts `filter` in place as `shard`'s.
    pub(super) fn install(&self, shard: u32, filter: Cuckoo) {
        self.touch(shard);
        *write_guard(&self.shards[shard as usize]) = filter;
    }

    /// Builds the filter of `shard` again from `files` and puts it in place.
    fn rebuild_shard(&self, shard: u32, files: &[Arc<Generation>]) -> Result<(), SealedError> {
        let filter = self.built(shard, files, 0)?;
        self.install(shard, filter);
        Ok(())
    }

    /// Adds every entry of `file`, which `files` (the tier's files with it)
    /// hold too: a shard whose filter it would fill is built again from
    /// `files`.
    ///
    /// # Errors
    ///
    /// A file could not be read, or `file` holds a shard the summary has
    /// no filter for.
    pub(super) fn add(&self, file: &Generation, files: &[Arc<Generation>]) -> Result<(), SealedError> {
        for shard in file.shards_held() {
            let Some(lock) = self.shards.get(shard as usize) else {
                return Err(SealedError::Damaged(
                    file.path().to_path_buf(),
                    format!("shard {shard}, beyond the summary's {}", self.shards.len()),
                ));
            };
            self.touch(shard);
            if !read_guard(lock).fits(file.shard_room(shard)) {
                self.rebuild_shard(shard, files)?;
                continue;
            }
            // In the order of their first buckets (the `lo` half's), so that
            // inserting walks the filter instead of jumping about it.
            let mut fps = file
                .shard_entries(shard)
                .map(|e| e.map(|e| e.fingerprint))
                .collect::<Result<Vec<_>, _>>()?;
            fps.sort_unstable_by_key(|fp| fp.lo);
            for chunk in fps.chunks(CHUNK) {
                let mut filter = write_guard(lock);
                if !chunk.iter().all(|&fp| filter.insert(fp)) {
                    drop(filter);
                    // Those inserted stay until the rebuild replaces them:
                    // more than the files hold, never less.
                    self.rebuild_shard(shard, files)?;
                    break;
                }
            }
        }
        Ok(())
    }

    /// Removes the entries of `file` that `gone` picks, now that the tier
    /// no longer holds them there; `files` are the tier's files, to build
    /// a shard again from should one not be found (which would be a bug:
    /// the summary then holds less than it must, and is rebuilt).
    ///
    /// # Errors
    ///
    /// A file could not be read.
    pub(super) fn remove(
        &self,
        file: &Generation,
        gone: impl Fn(&Entry) -> bool,
        files: &[Arc<Generation>],
    ) -> Result<(), SealedError> {
        for shard in file.shards_held() {
            let Some(lock) = self.shards.get(shard as usize) else {
                continue;
            };
            self.touch(shard);
            let mut entries = file.shard_entries(shard);
            let mut chunk = Vec::with_capacity(CHUNK);
            loop {
                chunk.clear();
                let mut read = 0;
                for e in entries.by_ref().take(CHUNK) {
                    let e = e?;
                    read += 1;
                    if gone(&e) {
                        chunk.push(e.fingerprint);
                    }
                }
                if read == 0 {
                    break;
                }
                let mut filter = write_guard(lock);
                if !chunk.iter().all(|&fp| filter.remove(fp)) {
                    drop(filter);
                    tracing::error!(
                        message = "The sealed summary missed an id it should hold; building the shard's filter again.",
                        shard,
                        file = %file.path().display(),
                    );
                    self.rebuild_shard(shard, files)?;
                    break;
                }
            }
        }
        Ok(())
    }

    /// Saves each group that changed, or whose files changed, to its file
    /// in `dir` (through a `.tmp`, synced and renamed) with the files it
    /// covers (`covers(group)`).
    ///
    /// # Errors
    ///
    /// A file could not be written; the groups not yet saved stay marked.
    pub(super) fn save(&self, dir: &Path, covers: impl Fn(usize) -> Vec<String>) -> Result<(), SealedError> {
        for group in 0..self.groups() {
            let names = covers(group);
            let saved = self
                .saved
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)[group]
                .clone();
            if saved.as_ref() != Some(&names) {
                self.save_group(dir, group, &names)?;
                self.saved
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)[group] = Some(names);
            }
        }
        Ok(())
    }

    /// Writes group `group`'s file: the names it covers, then each of its
    /// shards' filter, each part with its XXH3-64.
    fn save_group(&self, dir: &Path, group: usize, names: &[String]) -> Result<(), SealedError> {
        let path = dir.join(group_file(group));
        let tmp = path.with_extension("tmp");
        let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let shards: Vec<u32> = group_shards(group, self.shard_count()).collect();
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&(names.len() as u64).to_le_bytes());
        for name in names {
            head.extend_from_slice(&(name.len() as u64).to_le_bytes());
            head.extend_from_slice(name.as_bytes());
        }
        head.extend_from_slice(&(shards.len() as u64).to_le_bytes());
        head.extend_from_slice(&xxh3_64(&head).to_le_bytes());
        out.write_all(&head).map_err(io(&tmp))?;
        for shard in shards {
            let filter = read_guard(&self.shards[shard as usize]);
            let mut bytes = Vec::with_capacity(24 + filter.bytes());
            for v in [u64::from(shard), filter.buckets, filter.ids] {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            bytes.extend_from_slice(&filter.bytes[..filter.buckets as usize * BUCKET_BYTES]);
            drop(filter);
            out.write_all(&bytes).map_err(io(&tmp))?;
            out.write_all(&xxh3_64(&bytes).to_le_bytes()).map_err(io(&tmp))?;
        }
        let file = out
            .into_inner()
            .map_err(|e| SealedError::Io(tmp.clone(), e.into_error()))?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&tmp))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))
    }

    /// Reads group `group` back from its file in `dir` if it covers
    /// exactly `names`, holds each of the group's shards and every checksum
    /// holds; whether it did (if not: missing, damaged, or left from before
    /// a change a crash cut short, and nothing is changed).
    fn load_group(&self, dir: &Path, group: usize, names: &[String]) -> bool {
        let Some(filters) = read_group(dir, group, names) else {
            return false;
        };
        if filters
            .iter()
            .map(|(s, _)| *s)
            .ne(group_shards(group, self.shard_count()))
        {
            return false;
        }
        for (shard, filter) in filters {
            *write_guard(&self.shards[shard as usize]) = filter;
        }
        self.saved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)[group] = Some(names.to_vec());
        true
    }
}

/// The shards' filters of group `group`'s file in `dir`, if it covers
/// exactly `names` and every checksum holds.
fn read_group(dir: &Path, group: usize, names: &[String]) -> Option<Vec<(u32, Cuckoo)>> {
    let file = std::fs::File::open(dir.join(group_file(group))).ok()?;
    let mut input = BufReader::with_capacity(1 << 20, file);
    let mut read = |n: usize, into: &mut Vec<u8>| -> Option<()> {
        let at = into.len();
        into.resize(at + n, 0);
        input.read_exact(&mut into[at..]).ok()
    };
    let word = |bytes: &[u8], at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
    };
    let mut head = Vec::new();
    read(16, &mut head)?;
    if &head[..8] != MAGIC || word(&head, 8)? != names.len() as u64 {
        return None;
    }
    for name in names {
        let at = head.len();
        read(8, &mut head)?;
        if word(&head, at)? != name.len() as u64 {
            return None;
        }
        let at = head.len();
        read(name.len(), &mut head)?;
        if &head[at..] != name.as_bytes() {
            return None;
        }
    }
    read(16, &mut head)?;
    let n = head.len();
    let shards = word(&head, n - 16)?;
    if xxh3_64(&head[..n - 8]) != word(&head, n - 8)? || shards > u64::from(u16::MAX) + 1 {
        return None;
    }
    let mut filters = Vec::with_capacity(shards as usize);
    for _ in 0..shards {
        let mut bytes = Vec::new();
        read(24, &mut bytes)?;
        let (shard, buckets, ids) = (word(&bytes, 0)?, word(&bytes, 8)?, word(&bytes, 16)?);
        if buckets == 0 || buckets > 1 << 36 || ids > buckets * SLOTS || shard > u64::from(u16::MAX) {
            return None;
        }
        read(buckets as usize * BUCKET_BYTES + 8, &mut bytes)?;
        let end = bytes.len() - 8;
        if xxh3_64(&bytes[..end]) != word(&bytes, end)? {
            return None;
        }
        // The byte past the buckets, then each bucket's prefixes listed.
        let mut filter = bytes[24..=end].to_vec();
        filter[end - 24] = 0;
        let filter = Cuckoo::from_bytes(filter.into(), ids);
        if (0..buckets).any(|i| filter.word(i) & ((1 << CODE_BITS) - 1) >= PREFIXES.len() as u64) {
            return None;
        }
        filters.push((shard as u32, filter));
    }
    let mut rest = [0u8; 1];
    if input.read(&mut rest).ok()? != 0 {
        return None;
    }
    Some(filters)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(i: u64) -> Fingerprint {
        let lo = super::super::fmix64(i);
        Fingerprint { hi: i, lo }
    }

    #[test]
    fn a_filter_filled_to_its_limit_finds_every_id_and_loses_none_when_full() {
        let mut filter = Cuckoo::with_room(100_000);
        let mut n = 0;
        while filter.insert(fp(n)) {
            n += 1;
        }
        let load = n as f64 / filter.slots() as f64;
        assert!(load > MAX_LOAD + 0.005, "filled to {load:.3}");
        // The failed insert undid its moves: every id in is still found.
        assert!((0..n).all(|i| filter.contains(fp(i))));
        assert_eq!(filter.ids, n);
        let false_hits = (1u64 << 40..(1 << 40) + 1_000_000)
            .filter(|&i| filter.contains(fp(i)))
            .count();
        // 8 × load / 2^15 expected: about 240.
        assert!(false_hits < 350, "{false_hits} false hits in 10^6");
        // Removing one copy leaves the other of an id in twice.
        for i in 0..n / 2 {
            assert!(filter.remove(fp(i)));
        }
        assert!((n / 2..n).all(|i| filter.contains(fp(i))));
        assert_eq!(filter.ids, n - n / 2);
    }

    #[test]
    fn a_bucket_gives_back_its_fingerprints_in_seven_bytes() {
        assert_eq!(encode([0; 4]), 0, "a zeroed bucket is empty");
        let mut rng = 1u64;
        for _ in 0..100_000 {
            let tags: [u16; 4] = std::array::from_fn(|_| {
                rng = super::super::fmix64(rng);
                match rng % 4 {
                    0 => 0,
                    _ => (rng >> 8) as u16 & ((1 << TAG_BITS) - 1),
                }
            });
            let word = encode(tags);
            assert_eq!(word & !BUCKET_MASK, 0);
            let mut sorted = tags;
            sorted.sort_unstable();
            assert_eq!(decode(word), sorted);
        }
    }

    #[test]
    fn an_id_in_twice_stays_until_removed_twice() {
        let mut filter = Cuckoo::with_room(10);
        assert!(filter.insert(fp(7)) && filter.insert(fp(7)));
        assert!(filter.remove(fp(7)));
        assert!(filter.contains(fp(7)));
        assert!(filter.remove(fp(7)));
        assert!(!filter.contains(fp(7)));
        assert!(!filter.remove(fp(7)));
    }
}
