//! The summary: one filter per shard over every sealed file, in place of
//! each file's filters (`sealed_summary = true`).
//!
//! A new id then costs one probe, two cache lines (its two candidate
//! buckets, fetched ahead for a batch) whatever the number of files,
//! where per-file filters cost three lines per file. Each shard's filter is
//! a cuckoo filter: buckets of four 16-bit fingerprints (one `u64`), two
//! buckets per id, false positives about `8 × load / 65 536` (0.011 % at
//! the loads kept here). A hit is confirmed in the files as before (a
//! block read in each file that may hold it), so verdicts stay exact.
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
/// Kicks an insert tries before the filter counts as full.
const MAX_KICKS: usize = 500;
/// The load a shard's filter is built for (with room for the next seal,
/// when it grows); it is built again from the files, larger, when the
/// next seal would take it above [`MAX_LOAD`] (or an insert fails).
const BUILT_LOAD: f64 = 0.80;
const MAX_LOAD: f64 = 0.95;
/// Entries applied per hold of a shard's lock.
const CHUNK: usize = 4096;
const MAGIC: &[u8; 8] = b"ESSUMM01";

/// One shard's cuckoo filter.
pub(super) struct Cuckoo {
    buckets: Box<[u64]>,
    ids: u64,
    rng: u64,
}

const LANES_LOW: u64 = 0x0001_0001_0001_0001;
const LANES_HIGH: u64 = 0x8000_8000_8000_8000;

/// Whether a lane of `word` is zero.
fn has_zero_lane(word: u64) -> bool {
    word.wrapping_sub(LANES_LOW) & !word & LANES_HIGH != 0
}

fn fastrange(x: u64, n: u64) -> u64 {
    ((u128::from(x) * u128::from(n)) >> 64) as u64
}

impl Cuckoo {
    /// An empty filter with room for `ids` at [`BUILT_LOAD`].
    pub(super) fn with_room(ids: u64) -> Self {
        let buckets = ((ids as f64 / BUILT_LOAD / SLOTS as f64).ceil() as u64).max(1);
        Self {
            buckets: vec![0; buckets as usize].into(),
            ids: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn slots(&self) -> u64 {
        self.buckets.len() as u64 * SLOTS
    }

    pub(super) fn bytes(&self) -> usize {
        self.buckets.len() * 8
    }

    /// Whether `more` ids fit without passing [`MAX_LOAD`].
    fn fits(&self, more: u64) -> bool {
        (self.ids + more) as f64 <= self.slots() as f64 * MAX_LOAD
    }

    /// The id's fingerprint (never 0, which marks a free slot) and first
    /// bucket: from the `lo` half, as files use the `hi` half's top bits.
    fn place(&self, fp: Fingerprint) -> (u16, u64) {
        let tag = (fp.lo as u16).max(1);
        (tag, fastrange(fp.lo, self.buckets.len() as u64))
    }

    /// The other bucket of `tag` in bucket `i`: `(h(tag) - i) mod n`, its
    /// own inverse, so that it works for any number of buckets.
    fn alt(&self, i: u64, tag: u16) -> u64 {
        let n = self.buckets.len() as u64;
        let h = fastrange(super::fmix64(u64::from(tag)), n);
        // `h` and `i` are below `n`: one subtraction, not a division.
        let alt = h + n - i;
        if alt >= n { alt - n } else { alt }
    }

    fn bucket_has(&self, i: u64, tag: u16) -> bool {
        has_zero_lane(self.buckets[i as usize] ^ (u64::from(tag) * LANES_LOW))
    }

    #[inline]
    pub(super) fn contains(&self, fp: Fingerprint) -> bool {
        let (tag, i) = self.place(fp);
        self.bucket_has(i, tag) || self.bucket_has(self.alt(i, tag), tag)
    }

    /// Asks the CPU for the two buckets of `fp`.
    #[inline]
    pub(super) fn prefetch(&self, fp: Fingerprint) {
        let (tag, i) = self.place(fp);
        for b in [i, self.alt(i, tag)] {
            super::prefetch_read(std::ptr::from_ref(&self.buckets[b as usize]).cast());
        }
    }

    fn lane(&self, i: u64, slot: u64) -> u16 {
        (self.buckets[i as usize] >> (16 * slot)) as u16
    }

    fn set_lane(&mut self, i: u64, slot: u64, tag: u16) {
        let word = &mut self.buckets[i as usize];
        *word = (*word & !(0xffff << (16 * slot))) | (u64::from(tag) << (16 * slot));
    }

    /// Puts `tag` in a free slot of bucket `i`, if it has one.
    fn put(&mut self, i: u64, tag: u16) -> bool {
        match (0..SLOTS).find(|&s| self.lane(i, s) == 0) {
            Some(s) => {
                self.set_lane(i, s, tag);
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
        // Each move is recorded, so that a failed insert can be undone:
        // no fingerprint already in may be lost.
        let mut moves: Vec<(u64, u64, u16)> = Vec::new();
        let (mut i, mut tag) = (if self.next_random() & 1 == 0 { i1 } else { i2 }, tag);
        for _ in 0..MAX_KICKS {
            let slot = self.next_random() % SLOTS;
            let victim = self.lane(i, slot);
            self.set_lane(i, slot, tag);
            moves.push((i, slot, victim));
            tag = victim;
            i = self.alt(i, tag);
            if self.put(i, tag) {
                self.ids += 1;
                return true;
            }
        }
        for (i, slot, victim) in moves.into_iter().rev() {
            self.set_lane(i, slot, victim);
        }
        false
    }

    /// Removes one copy of `fp`; false if it holds none.
    pub(super) fn remove(&mut self, fp: Fingerprint) -> bool {
        let (tag, i1) = self.place(fp);
        for i in [i1, self.alt(i1, tag)] {
            if let Some(s) = (0..SLOTS).find(|&s| self.lane(i, s) == tag) {
                self.set_lane(i, s, 0);
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
            for v in [u64::from(shard), filter.buckets.len() as u64, filter.ids] {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            for word in &filter.buckets {
                bytes.extend_from_slice(&word.to_le_bytes());
            }
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
        read(buckets as usize * 8 + 8, &mut bytes)?;
        let end = bytes.len() - 8;
        if xxh3_64(&bytes[..end]) != word(&bytes, end)? {
            return None;
        }
        let buckets = super::u64s(&bytes[24..end]).collect();
        filters.push((
            shard as u32,
            Cuckoo {
                buckets,
                ids,
                rng: 0x9e37_79b9_7f4a_7c15,
            },
        ));
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
        assert!(load > 0.95, "filled to {load:.3}");
        // The failed insert undid its moves: every id in is still found.
        assert!((0..n).all(|i| filter.contains(fp(i))));
        assert_eq!(filter.ids, n);
        let false_hits = (1u64 << 40..(1 << 40) + 1_000_000)
            .filter(|&i| filter.contains(fp(i)))
            .count();
        assert!(false_hits < 200, "{false_hits} false hits in 10^6");
        // Removing one copy leaves the other of an id in twice.
        for i in 0..n / 2 {
            assert!(filter.remove(fp(i)));
        }
        assert!((n / 2..n).all(|i| filter.contains(fp(i))));
        assert_eq!(filter.ids, n - n / 2);
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
