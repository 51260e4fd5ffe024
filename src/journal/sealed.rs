//! Sealed generations: ids moved out of RAM into immutable files, each
//! with a compact filter kept in memory, so that a window of a week fits
//! in a few bytes of RAM per id while verdicts stay exact.
//!
//! A generation holds the accepted ids of a span of time (`from_ms` to
//! `cut_ms`), of any shards, sorted by `(shard, fingerprint)`. In RAM it
//! keeps only:
//!
//! - a binary fuse filter (`xorf`, 8-bit fingerprints, false positives
//!   < 0.4 %) per *partition* of [`BLOCKS_PER_PART`] blocks (65 408 ids),
//!   about 9.5 bits per id: a lookup picks its partition by the fences
//!   below and probes one filter, whatever the generation's size, and a
//!   filter is built from one partition's keys, so building never holds
//!   more than that in memory;
//! - the *fence* of each 4 KiB block, its first `(shard, fingerprint.hi)`
//!   (12 bytes per 146 ids, 0.08 B per id).
//!
//! A filter hit is confirmed on disk: one `pread` of the one block the
//! fences point to, its checksum checked, and the entry compared on the full
//! `(shard, 128-bit fingerprint)`; the entry's arrival time then tells
//! whether it is still within the window. So a sealed id is never judged a
//! duplicate on a filter collision, and the false-duplicate bound of the
//! fingerprint (see `engine::fingerprint`) holds as it does in RAM.
//!
//! # The file, `<from_ms>-<cut_ms>.sealed`
//!
//! - blocks of [`BLOCK`] bytes: up to [`PER_BLOCK`] entries of `shard (u32)
//!   ‖ hi (u64) ‖ lo (u64) ‖ born_ms (u64)` (little-endian), then XXH3-64 of
//!   the block's bytes before it, seeded with the block's number (so a
//!   block read from the wrong place fails too);
//! - the filters: per partition, its descriptor and fingerprints;
//! - the fences;
//! - a footer of fixed size: counts, offsets, the span and the oldest and
//!   newest arrival, XXH3-64 of the filters and of the fences, and of the
//!   footer itself.
//!
//! Written once, to `<name>.tmp`, synced, then renamed: a crash leaves
//! either the whole file or a `.tmp` that [`Sealed::open`] deletes. Opening
//! reads the footer, the filters and the fences (checksums checked), not
//! the entries.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use xorf::{BinaryFuse8, Descriptor, DmaSerializable, Filter};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::engine::dedup::Older;
use crate::engine::fingerprint::Fingerprint;
use crate::journal::{JournalError, JournalReader};

/// Bytes per block on disk.
pub const BLOCK: usize = 4096;
const ENTRY: usize = 4 + 8 + 8 + 8;
const SUM: usize = 8;
/// Entries per block.
pub const PER_BLOCK: usize = (BLOCK - SUM) / ENTRY;
/// Blocks per filter partition.
pub const BLOCKS_PER_PART: usize = 448;
const PER_PART: usize = PER_BLOCK * BLOCKS_PER_PART;
const MAGIC: &[u8; 8] = b"ESSEAL01";
const FOOTER: usize = 8 + 8 * 12;
/// Generations of like size merged into one.
pub const MERGE_RUN: usize = 4;
const DESCRIPTOR: usize = Descriptor::DMA_LEN;

/// An accepted id as a generation holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub shard: u32,
    pub fingerprint: Fingerprint,
    pub born_ms: u64,
}

impl Entry {
    fn key(&self) -> (u32, Fingerprint) {
        (self.shard, self.fingerprint)
    }

    fn write(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.shard.to_le_bytes());
        out[4..12].copy_from_slice(&self.fingerprint.hi.to_le_bytes());
        out[12..20].copy_from_slice(&self.fingerprint.lo.to_le_bytes());
        out[20..28].copy_from_slice(&self.born_ms.to_le_bytes());
    }

    fn read(b: &[u8]) -> Self {
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        Self {
            shard: u32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
            fingerprint: Fingerprint {
                hi: u64_at(4),
                lo: u64_at(12),
            },
            born_ms: u64_at(20),
        }
    }
}

/// The key a filter holds for an id of a shard.
fn filter_key(shard: u32, fp: Fingerprint) -> u64 {
    fp.lo ^ fp.hi.rotate_left(29) ^ u64::from(shard).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn block_sum(block: &[u8], n: u64) -> u64 {
    xxh3_64_with_seed(&block[..BLOCK - SUM], n)
}

/// Why a generation cannot be read or written.
#[derive(Debug)]
pub enum SealedError {
    Io(PathBuf, std::io::Error),
    /// A checksum failed, or the layout does not hold together: the file
    /// must be rebuilt from the journal.
    Damaged(PathBuf, String),
}

impl std::fmt::Display for SealedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(path, e) => write!(f, "sealed generation {}: {e}", path.display()),
            Self::Damaged(path, why) => write!(
                f,
                "sealed generation {} is damaged ({why}); it is rebuilt from the journal",
                path.display()
            ),
        }
    }
}

impl std::error::Error for SealedError {}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SealedError + '_ {
    move |e| SealedError::Io(path.to_path_buf(), e)
}

/// The span and counts of a generation, as its footer records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Ids accepted at or after this and before `cut_ms`.
    pub from_ms: u64,
    pub cut_ms: u64,
    pub oldest_ms: u64,
    pub newest_ms: u64,
    pub ids: u64,
}

fn file_name(from_ms: u64, cut_ms: u64) -> String {
    format!("{from_ms:013}-{cut_ms:013}.sealed")
}

fn parse_name(name: &str) -> Option<(u64, u64)> {
    let (from, cut) = name.strip_suffix(".sealed")?.split_once('-')?;
    Some((from.parse().ok()?, cut.parse().ok()?))
}

/// Writes a generation from entries given in `(shard, fingerprint)` order.
pub struct Writer {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    block: Box<[u8; BLOCK]>,
    in_block: usize,
    blocks: u64,
    fences: Vec<u8>,
    /// The current partition's filter keys.
    keys: Vec<u64>,
    filters: Vec<u8>,
    last: Option<Entry>,
    span: Span,
}

impl Writer {
    /// Starts `<dir>/<from_ms>-<cut_ms>.sealed` (as a `.tmp` until
    /// [`Self::finish`]).
    ///
    /// # Errors
    ///
    /// The file could not be created.
    pub fn create(dir: &Path, from_ms: u64, cut_ms: u64) -> Result<Self, SealedError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(file_name(from_ms, cut_ms));
        let tmp = path.with_extension("tmp");
        let file = File::create(&tmp).map_err(io(&tmp))?;
        Ok(Self {
            path,
            tmp,
            out: BufWriter::with_capacity(1 << 20, file),
            block: Box::new([0; BLOCK]),
            in_block: 0,
            blocks: 0,
            fences: Vec::new(),
            keys: Vec::with_capacity(PER_PART),
            filters: Vec::new(),
            last: None,
            span: Span {
                from_ms,
                cut_ms,
                oldest_ms: u64::MAX,
                newest_ms: 0,
                ids: 0,
            },
        })
    }

    /// Adds `entry`, whose `(shard, fingerprint)` must follow the last
    /// one's; the same id again replaces it if it arrived later (an id
    /// accepted again after it was forgotten or expired).
    ///
    /// # Panics
    ///
    /// If entries come out of order: a bug of the caller.
    pub fn push(&mut self, entry: Entry) -> Result<(), SealedError> {
        if let Some(last) = self.last {
            assert!(last.key() <= entry.key(), "entries in (shard, fingerprint) order");
            if last.key() == entry.key() {
                if entry.born_ms > last.born_ms {
                    // Still in the block being filled, unless it began one.
                    let at = self
                        .in_block
                        .checked_sub(1)
                        .expect("the same id is never a block's first");
                    entry.write(&mut self.block[at * ENTRY..(at + 1) * ENTRY]);
                    self.note_born(entry.born_ms);
                    self.last = Some(entry);
                }
                return Ok(());
            }
        }
        if self.in_block == PER_BLOCK {
            self.flush_block()?;
        }
        if self.in_block == 0 {
            self.fences.extend_from_slice(&entry.shard.to_le_bytes());
            self.fences.extend_from_slice(&entry.fingerprint.hi.to_le_bytes());
        }
        entry.write(&mut self.block[self.in_block * ENTRY..(self.in_block + 1) * ENTRY]);
        self.in_block += 1;
        self.keys.push(filter_key(entry.shard, entry.fingerprint));
        self.note_born(entry.born_ms);
        self.span.ids += 1;
        self.last = Some(entry);
        Ok(())
    }

    fn note_born(&mut self, born_ms: u64) {
        self.span.oldest_ms = self.span.oldest_ms.min(born_ms);
        self.span.newest_ms = self.span.newest_ms.max(born_ms);
    }

    /// Writes the block being filled, and the partition's filter when it
    /// is complete.
    fn flush_block(&mut self) -> Result<(), SealedError> {
        // An id replaced in place keeps its first born in the block's
        // unused tail: cleared so the checksum covers zeros.
        self.block[self.in_block * ENTRY..BLOCK - SUM].fill(0);
        let sum = block_sum(&self.block[..], self.blocks);
        self.block[BLOCK - SUM..].copy_from_slice(&sum.to_le_bytes());
        self.out.write_all(&self.block[..]).map_err(io(&self.tmp))?;
        self.blocks += 1;
        self.in_block = 0;
        if self.blocks.is_multiple_of(BLOCKS_PER_PART as u64) {
            self.flush_filter()?;
        }
        Ok(())
    }

    fn flush_filter(&mut self) -> Result<(), SealedError> {
        let filter = BinaryFuse8::try_from(&self.keys)
            .map_err(|e| SealedError::Damaged(self.tmp.clone(), format!("filter not built: {e}")))?;
        let mut descriptor = [0u8; DESCRIPTOR];
        filter.dma_copy_descriptor_to(&mut descriptor);
        self.filters.extend_from_slice(&descriptor);
        let bytes = filter.dma_fingerprints();
        self.filters
            .extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        self.filters.extend_from_slice(bytes);
        self.keys.clear();
        Ok(())
    }

    /// Completes the file: the last block and filter, the fences, the
    /// footer; synced and renamed into place.
    ///
    /// # Errors
    ///
    /// Writing, syncing or renaming failed (the `.tmp` is left for the next
    /// [`Sealed::open`] to delete).
    pub fn finish(mut self) -> Result<(PathBuf, Span), SealedError> {
        if self.in_block > 0 {
            self.flush_block()?;
        }
        if !self.keys.is_empty() {
            self.flush_filter()?;
        }
        if self.span.ids == 0 {
            self.span.oldest_ms = 0;
        }
        let filters_at = self.blocks * BLOCK as u64;
        let fences_at = filters_at + self.filters.len() as u64;
        let mut footer = Vec::with_capacity(FOOTER);
        footer.extend_from_slice(MAGIC);
        for v in [
            self.span.ids,
            self.blocks,
            filters_at,
            self.filters.len() as u64,
            fences_at,
            self.span.from_ms,
            self.span.cut_ms,
            self.span.oldest_ms,
            self.span.newest_ms,
            xxh3_64(&self.filters),
            xxh3_64(&self.fences),
        ] {
            footer.extend_from_slice(&v.to_le_bytes());
        }
        footer.extend_from_slice(&xxh3_64(&footer).to_le_bytes());
        let tmp = self.tmp.clone();
        self.out.write_all(&self.filters).map_err(io(&tmp))?;
        self.out.write_all(&self.fences).map_err(io(&tmp))?;
        self.out.write_all(&footer).map_err(io(&tmp))?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| SealedError::Io(tmp.clone(), e.into_error()))?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io(&tmp))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
        }
        Ok((self.path, self.span))
    }
}

/// One sealed generation, open: its filters and fences in RAM, its entries
/// on disk.
pub struct Generation {
    path: PathBuf,
    file: File,
    span: Span,
    blocks: u64,
    filters: Vec<BinaryFuse8>,
    /// Each block's first `(shard, hi)`.
    fence_shards: Box<[u32]>,
    fence_his: Box<[u64]>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Generation({}, {:?})", self.path.display(), self.span)
    }
}

/// What probing the sealed tier for one id found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Probed {
    /// Filters probed.
    pub filters: u32,
    /// Blocks read to confirm a filter hit.
    pub reads: u32,
}

impl Generation {
    /// Opens the generation at `path`: footer, filters and fences read and
    /// checked.
    ///
    /// # Errors
    ///
    /// The file cannot be read, or a checksum or the layout fails.
    pub fn open(path: &Path) -> Result<Self, SealedError> {
        let damaged = |why: &str| SealedError::Damaged(path.to_path_buf(), why.to_string());
        let file = File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        if len < FOOTER as u64 {
            return Err(damaged("shorter than its footer"));
        }
        let mut footer = [0u8; FOOTER];
        file.read_exact_at(&mut footer, len - FOOTER as u64)
            .map_err(io(path))?;
        let word = |i: usize| u64::from_le_bytes(footer[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes"));
        if &footer[..8] != MAGIC || xxh3_64(&footer[..FOOTER - 8]) != word(11) {
            return Err(damaged("footer checksum"));
        }
        let (ids, blocks, filters_at, filters_len, fences_at) = (word(0), word(1), word(2), word(3), word(4));
        let span = Span {
            ids,
            from_ms: word(5),
            cut_ms: word(6),
            oldest_ms: word(7),
            newest_ms: word(8),
        };
        let fences_len = blocks * 12;
        if filters_at != blocks * BLOCK as u64
            || fences_at != filters_at + filters_len
            || fences_at + fences_len + FOOTER as u64 != len
            || ids > blocks * PER_BLOCK as u64
        {
            return Err(damaged("layout"));
        }
        let mut filters_bytes = vec![0u8; filters_len as usize];
        file.read_exact_at(&mut filters_bytes, filters_at)
            .map_err(io(path))?;
        let mut fences = vec![0u8; fences_len as usize];
        file.read_exact_at(&mut fences, fences_at).map_err(io(path))?;
        if xxh3_64(&filters_bytes) != word(9) || xxh3_64(&fences) != word(10) {
            return Err(damaged("filter or fence checksum"));
        }
        let mut filters = Vec::new();
        let mut rest = &filters_bytes[..];
        while !rest.is_empty() {
            if rest.len() < DESCRIPTOR + 8 {
                return Err(damaged("filters"));
            }
            let word = |at: usize| u32::from_le_bytes(rest[at..at + 4].try_into().expect("4 bytes"));
            let descriptor = Descriptor {
                seed: u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")),
                segment_length: word(8),
                segment_length_mask: word(12),
                segment_count_length: word(16),
            };
            let n =
                u64::from_le_bytes(rest[DESCRIPTOR..DESCRIPTOR + 8].try_into().expect("8 bytes")) as usize;
            rest = &rest[DESCRIPTOR + 8..];
            // What a probe reads must be within the fingerprints.
            let reach = descriptor.segment_count_length as usize + 2 * descriptor.segment_length as usize;
            if rest.len() < n
                || reach > n
                || descriptor.segment_length_mask != descriptor.segment_length.wrapping_sub(1)
            {
                return Err(damaged("filters"));
            }
            filters.push(BinaryFuse8 {
                descriptor,
                fingerprints: rest[..n].into(),
            });
            rest = &rest[n..];
        }
        if filters.len() as u64 != blocks.div_ceil(BLOCKS_PER_PART as u64) {
            return Err(damaged("filter count"));
        }
        let fence_shards = fences
            .chunks_exact(12)
            .map(|c| u32::from_le_bytes(c[..4].try_into().expect("4 bytes")))
            .collect();
        let fence_his = fences
            .chunks_exact(12)
            .map(|c| u64::from_le_bytes(c[4..].try_into().expect("8 bytes")))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            span,
            blocks,
            filters,
            fence_shards,
            fence_his,
        })
    }

    pub fn span(&self) -> Span {
        self.span
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of RAM its filters and fences take.
    pub fn memory_bytes(&self) -> usize {
        self.filters
            .iter()
            .map(|f| f.fingerprints.len() + 32)
            .sum::<usize>()
            + self.fence_shards.len() * 12
            + std::mem::size_of::<Self>()
    }

    /// Bytes of the file.
    pub fn disk_bytes(&self) -> u64 {
        self.blocks * BLOCK as u64
            + self
                .filters
                .iter()
                .map(|f| f.fingerprints.len() as u64 + 28)
                .sum::<u64>()
            + self.blocks * 12
            + FOOTER as u64
    }

    fn fence(&self, b: usize) -> (u32, u64) {
        (self.fence_shards[b], self.fence_his[b])
    }

    /// When the id `(shard, fp)` arrived, if this generation holds it.
    ///
    /// # Errors
    ///
    /// The block that would hold it cannot be read or fails its checksum.
    pub fn born_ms(
        &self,
        shard: u32,
        fp: Fingerprint,
        probed: &mut Probed,
    ) -> Result<Option<u64>, SealedError> {
        let key = (shard, fp.hi);
        // The blocks that begin with this `(shard, hi)` and the one before
        // them; in the common case none begin with it and that is the one
        // block whose range holds it.
        let first = partition_point(self.blocks as usize, |b| self.fence(b) < key);
        let last = partition_point(self.blocks as usize, |b| self.fence(b) <= key);
        let wanted = filter_key(shard, fp);
        let mut filter_said = None;
        for b in first.saturating_sub(1)..last {
            let part = b / BLOCKS_PER_PART;
            if filter_said.is_none_or(|(p, _)| p != part) {
                probed.filters += 1;
                filter_said = Some((part, self.filters[part].contains(&wanted)));
            }
            if filter_said.is_some_and(|(_, hit)| !hit) {
                continue;
            }
            probed.reads += 1;
            if let Some(e) = self
                .read_block(b as u64)?
                .into_iter()
                .find(|e| e.key() == (shard, fp))
            {
                return Ok(Some(e.born_ms));
            }
        }
        Ok(None)
    }

    /// The entries of block `n`, its checksum checked.
    fn read_block(&self, n: u64) -> Result<Vec<Entry>, SealedError> {
        let mut block = vec![0u8; BLOCK];
        self.file
            .read_exact_at(&mut block, n * BLOCK as u64)
            .map_err(io(&self.path))?;
        self.entries_of(&block, n)
    }

    fn entries_of(&self, block: &[u8], n: u64) -> Result<Vec<Entry>, SealedError> {
        let sum = u64::from_le_bytes(block[BLOCK - SUM..].try_into().expect("8 bytes"));
        if block_sum(block, n) != sum {
            return Err(SealedError::Damaged(
                self.path.clone(),
                format!("block {n} fails its checksum"),
            ));
        }
        let count = (self.span.ids - n * PER_BLOCK as u64).min(PER_BLOCK as u64) as usize;
        Ok(block[..count * ENTRY]
            .chunks_exact(ENTRY)
            .map(Entry::read)
            .collect())
    }

    /// Every entry, in order, each block's checksum checked (a merge reads
    /// generations through this).
    pub fn entries(&self) -> Result<Entries<'_>, SealedError> {
        let file = File::open(&self.path).map_err(io(&self.path))?;
        Ok(Entries {
            generation: self,
            reader: BufReader::with_capacity(1 << 20, file),
            block: 0,
            buffered: Vec::new().into_iter(),
        })
    }
}

/// Reads a generation's entries in order.
pub struct Entries<'a> {
    generation: &'a Generation,
    reader: BufReader<File>,
    block: u64,
    buffered: std::vec::IntoIter<Entry>,
}

impl Iterator for Entries<'_> {
    type Item = Result<Entry, SealedError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.buffered.next() {
                return Some(Ok(e));
            }
            if self.block == self.generation.blocks {
                return None;
            }
            let mut block = vec![0u8; BLOCK];
            if let Err(e) = self.reader.read_exact(&mut block) {
                self.block = self.generation.blocks;
                return Some(Err(SealedError::Io(self.generation.path.clone(), e)));
            }
            match self.generation.entries_of(&block, self.block) {
                Ok(entries) => self.buffered = entries.into_iter(),
                Err(e) => {
                    self.block = self.generation.blocks;
                    return Some(Err(e));
                }
            }
            self.block += 1;
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The first `i` in `0..n` for which `below(i)` is false (`below` holds for
/// a prefix).
fn partition_point(n: usize, below: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if below(mid) { lo = mid + 1 } else { hi = mid }
    }
    lo
}

/// Writes the entries of `generations` still alive at `horizon_ms` (born at
/// or after it) into one new generation in `dir` spanning them all: a
/// k-way merge, reading each file once in order.
///
/// # Errors
///
/// A generation could not be read (or fails a checksum), or the new one
/// could not be written.
pub fn merge(
    dir: &Path,
    generations: &[Arc<Generation>],
    horizon_ms: u64,
) -> Result<Generation, SealedError> {
    let from = generations.iter().map(|g| g.span.from_ms).min().unwrap_or(0);
    let cut = generations.iter().map(|g| g.span.cut_ms).max().unwrap_or(0);
    let mut writer = Writer::create(dir, from, cut)?;
    let mut readers = generations
        .iter()
        .map(|g| g.entries())
        .collect::<Result<Vec<_>, _>>()?;
    let mut heap = BinaryHeap::new();
    for (i, r) in readers.iter_mut().enumerate() {
        if let Some(e) = r.next() {
            heap.push(Reverse((e?, i)));
        }
    }
    while let Some(Reverse((entry, i))) = heap.pop() {
        if entry.born_ms >= horizon_ms {
            writer.push(entry)?;
        }
        if let Some(next) = readers[i].next() {
            heap.push(Reverse((next?, i)));
        }
    }
    let (path, _) = writer.finish()?;
    Generation::open(&path)
}

/// The sealed generations of a node, newest last, with counters of what
/// lookups cost.
pub struct Sealed {
    dir: PathBuf,
    generations: arc_swap::ArcSwap<Vec<Arc<Generation>>>,
    /// Held by a seal or a compaction: one changes the generations at a
    /// time.
    changing: std::sync::Mutex<()>,
    /// Ids forgotten (`eventsieve forget`) after they were sealed, and
    /// when: an arrival at or before that is not answered.
    forgotten: std::sync::Mutex<std::collections::HashMap<(u32, Fingerprint), u64>>,
    /// Generations a lookup found damaged, to be rebuilt from the journal.
    damaged: std::sync::Mutex<Vec<Span>>,
    pub seals: AtomicU64,
    pub merges: AtomicU64,
    pub filter_probes: AtomicU64,
    pub block_reads: AtomicU64,
    pub hits: AtomicU64,
}

impl Sealed {
    /// Opens the generations in `dir` (created if missing): deletes `.tmp`
    /// files (a seal or merge a crash cut short) and generations whose span
    /// lies within another's (a merge's inputs a crash left behind). A
    /// damaged generation is left out, its file renamed `.damaged`, and
    /// its span listed by [`Self::take_damaged`]: the caller must
    /// [`Self::rebuild`] it before answering.
    ///
    /// # Errors
    ///
    /// The directory cannot be read.
    pub fn open(dir: &Path) -> Result<Self, SealedError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut spans = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.ends_with(".tmp") {
                std::fs::remove_file(&path).map_err(io(&path))?;
            } else if let Some(span) = parse_name(name) {
                spans.push((span, path));
            }
        }
        spans.sort_by_key(|((from, cut), _)| (*from, Reverse(*cut)));
        let mut generations: Vec<Arc<Generation>> = Vec::new();
        let mut damaged = Vec::new();
        for ((from, cut), path) in spans {
            let covered = generations
                .iter()
                .any(|g| g.span.from_ms <= from && cut <= g.span.cut_ms);
            if covered {
                std::fs::remove_file(&path).map_err(io(&path))?;
                continue;
            }
            match Generation::open(&path) {
                Ok(g) => generations.push(Arc::new(g)),
                Err(e @ SealedError::Damaged(..)) => {
                    tracing::error!(message = "A sealed generation is damaged; rebuilding it from the journal.", error = %e);
                    std::fs::rename(&path, path.with_extension("damaged")).map_err(io(&path))?;
                    damaged.push(Span {
                        from_ms: from,
                        cut_ms: cut,
                        oldest_ms: 0,
                        newest_ms: 0,
                        ids: 0,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        generations.sort_by_key(|g| g.span.cut_ms);
        Ok(Self {
            dir: dir.to_path_buf(),
            generations: arc_swap::ArcSwap::from_pointee(generations),
            changing: std::sync::Mutex::default(),
            forgotten: std::sync::Mutex::default(),
            damaged: std::sync::Mutex::new(damaged),
            seals: AtomicU64::new(0),
            merges: AtomicU64::new(0),
            filter_probes: AtomicU64::new(0),
            block_reads: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The generations, oldest first.
    pub fn generations(&self) -> Arc<Vec<Arc<Generation>>> {
        self.generations.load_full()
    }

    /// Where ids accepted before it are sealed (0: none are).
    pub fn cut_ms(&self) -> u64 {
        self.generations.load().last().map_or(0, |g| g.span.cut_ms)
    }

    /// When the id `(shard, fp)` last arrived, if a generation holds it
    /// with an arrival at or after `horizon_ms`: newest generation first.
    ///
    /// # Errors
    ///
    /// A block that would hold it is damaged or unreadable: no verdict can
    /// be given from it.
    pub fn born_ms(&self, shard: u32, fp: Fingerprint, horizon_ms: u64) -> Result<Option<u64>, SealedError> {
        let generations = self.generations.load();
        let mut probed = Probed::default();
        let mut found = None;
        for g in generations.iter().rev() {
            if g.span.ids == 0 {
                continue;
            }
            // Older generations hold older ids only.
            if g.span.newest_ms < horizon_ms {
                break;
            }
            match g.born_ms(shard, fp, &mut probed) {
                Ok(Some(born)) => {
                    found = Some(born);
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    let mut damaged = lock(&self.damaged);
                    if !damaged.contains(&g.span) {
                        tracing::error!(message = "A sealed generation is damaged; rebuilding it from the journal.", error = %e);
                        damaged.push(g.span);
                    }
                    return Err(e);
                }
            }
        }
        let found = found.filter(|&born| {
            let forgotten = lock(&self.forgotten);
            forgotten.is_empty() || forgotten.get(&(shard, fp)).is_none_or(|&at| born > at)
        });
        self.filter_probes.fetch_add(u64::from(probed.filters), Relaxed);
        self.block_reads.fetch_add(u64::from(probed.reads), Relaxed);
        let alive = found.filter(|&born| born >= horizon_ms);
        if alive.is_some() {
            self.hits.fetch_add(1, Relaxed);
        }
        Ok(alive)
    }

    /// Seals `entries` (sorted by `(shard, fingerprint)`), the ids accepted
    /// from the last cut to `cut_ms`, as the newest generation.
    ///
    /// # Errors
    ///
    /// The generation could not be written; nothing changes.
    pub fn seal(&self, entries: impl IntoIterator<Item = Entry>, cut_ms: u64) -> Result<Span, SealedError> {
        let _changing = self
            .changing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut writer = Writer::create(&self.dir, self.cut_ms(), cut_ms)?;
        for e in entries {
            writer.push(e)?;
        }
        let (path, span) = writer.finish()?;
        let generation = Arc::new(Generation::open(&path)?);
        self.generations.rcu(|gs| {
            let mut gs = Vec::clone(gs);
            gs.push(generation.clone());
            gs
        });
        self.seals.fetch_add(1, Relaxed);
        Ok(span)
    }

    /// Drops the generations whose newest id arrived before `horizon_ms`
    /// (deleting their files), the newest excepted; then merges the newest
    /// run of generations of like size (each at most twice the newest's
    /// ids) once it has [`MERGE_RUN`] of them, as an LSM tree's size tiers
    /// do (an id is rewritten about `log4(ids / seal)` times), and the
    /// newest ones while more than `max` remain; merges drop the ids
    /// arrived before the horizon. Returns how many files it removed.
    ///
    /// # Errors
    ///
    /// A merge failed; the generations stay as they were.
    pub fn compact(&self, horizon_ms: u64, max: usize) -> Result<usize, SealedError> {
        let _changing = self
            .changing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut removed = 0;
        let current = self.generations();
        // The newest is kept whatever its age: it records the cut.
        let (mut expired, mut kept) = (Vec::new(), Vec::new());
        for (i, g) in current.iter().enumerate() {
            match i + 1 < current.len() && g.span.newest_ms < horizon_ms {
                true => expired.push(g.clone()),
                false => kept.push(g.clone()),
            }
        }
        if !expired.is_empty() {
            self.generations.store(Arc::new(kept.clone()));
            for g in expired {
                removed += 1;
                std::fs::remove_file(&g.path).map_err(io(&g.path))?;
            }
        }
        lock(&self.forgotten).retain(|_, at| *at >= horizon_ms);
        let mut gens = kept;
        while gens.len() >= 2 {
            // The newest run of like size: each at most twice the newest's
            // ids. Merged once it has `MERGE_RUN` generations (or, at least
            // the two newest, while there are more than `max`).
            let newest = gens.len() - 1;
            let like = 2 * gens[newest].span.ids.max(1);
            let mut start = newest;
            while start > 0 && gens[start - 1].span.ids <= like {
                start -= 1;
            }
            if gens.len() - start < MERGE_RUN && gens.len() <= max.max(1) {
                break;
            }
            let start = start.min(newest - 1);
            let merged = Arc::new(merge(&self.dir, &gens[start..], horizon_ms)?);
            self.merges.fetch_add(1, Relaxed);
            let old: Vec<_> = gens.drain(start..).collect();
            gens.push(merged);
            self.generations.store(Arc::new(gens.clone()));
            for g in old {
                removed += 1;
                std::fs::remove_file(&g.path).map_err(io(&g.path))?;
            }
        }
        Ok(removed)
    }

    /// Hides the arrivals of `(shard, fp)` at or before `at_ms` (the id was
    /// forgotten then; the journal keeps the same record).
    pub fn forget(&self, shard: u32, fp: Fingerprint, at_ms: u64) {
        let mut forgotten = lock(&self.forgotten);
        let at = forgotten.entry((shard, fp)).or_default();
        *at = (*at).max(at_ms);
    }

    /// The generations found damaged since the last call.
    pub fn take_damaged(&self) -> Vec<Span> {
        std::mem::take(&mut *lock(&self.damaged))
    }

    /// Puts in place of the generation of `span` (damaged, or left out at
    /// open) one written from `entries` (the same span, rebuilt from the
    /// journal).
    ///
    /// # Errors
    ///
    /// The new one could not be written; the damaged one stays (and its
    /// lookups keep failing).
    pub fn rebuild(&self, span: Span, entries: impl IntoIterator<Item = Entry>) -> Result<Span, SealedError> {
        let _changing = lock(&self.changing);
        let mut writer = Writer::create(&self.dir, span.from_ms, span.cut_ms)?;
        for e in entries {
            writer.push(e)?;
        }
        let (path, new) = writer.finish()?;
        let generation = Arc::new(Generation::open(&path)?);
        let same = |g: &Arc<Generation>| (g.span.from_ms, g.span.cut_ms) == (span.from_ms, span.cut_ms);
        self.generations.rcu(|gs| {
            let mut gs: Vec<_> = gs.iter().filter(|g| !same(g)).cloned().collect();
            gs.push(generation.clone());
            gs.sort_by_key(|g| g.span.cut_ms);
            gs
        });
        let _ = std::fs::remove_file(path.with_extension("damaged"));
        Ok(new)
    }

    /// Ids in every generation (some may have expired already).
    pub fn ids(&self) -> u64 {
        self.generations.load().iter().map(|g| g.span.ids).sum()
    }

    /// RAM the filters and fences take.
    pub fn memory_bytes(&self) -> usize {
        self.generations.load().iter().map(|g| g.memory_bytes()).sum()
    }

    /// Bytes on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.generations.load().iter().map(|g| g.disk_bytes()).sum()
    }
}

impl Older for Sealed {
    fn born_ms(&self, shard: u32, fp: Fingerprint, horizon_ms: u64) -> Result<Option<u64>, String> {
        Sealed::born_ms(self, shard, fp, horizon_ms).map_err(|e| e.to_string())
    }

    fn memory_bytes(&self) -> usize {
        Sealed::memory_bytes(self)
    }

    fn forget(&self, shard: u32, fp: Fingerprint, at_ms: u64) {
        Sealed::forget(self, shard, fp, at_ms);
    }
}

/// The ids `reader` holds accepted in `from_ms..cut_ms`, in generation
/// order: what a seal (or the rebuild of a damaged generation) writes.
/// Held per shard as `(fingerprint, born)` while they are sorted: 24 bytes
/// per id for a moment.
///
/// # Errors
///
/// The journal cannot be read.
pub fn from_journal(
    reader: &dyn JournalReader,
    from_ms: u64,
    cut_ms: u64,
) -> Result<impl Iterator<Item = Entry> + use<>, JournalError> {
    let mut by_shard: std::collections::BTreeMap<u32, Vec<(Fingerprint, u64)>> =
        std::collections::BTreeMap::new();
    reader.scan_span(from_ms, cut_ms, &mut |r| {
        by_shard
            .entry(r.shard)
            .or_default()
            .push((r.fingerprint, r.born_ms));
    })?;
    Ok(by_shard.into_iter().flat_map(|(shard, mut ids)| {
        ids.sort_unstable();
        ids.into_iter().map(move |(fingerprint, born_ms)| Entry {
            shard,
            fingerprint,
            born_ms,
        })
    }))
}

impl crate::observe::metrics::Render for Sealed {
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let gauges = [
            (
                "sealed_generations",
                "Sealed generations (files) of ids moved out of RAM.",
                self.generations.load().len() as u64,
            ),
            (
                "sealed_ids",
                "Ids in the sealed generations (some may have expired, until their generation goes).",
                self.ids(),
            ),
            (
                "sealed_memory_bytes",
                "RAM the sealed generations take: their filters and block fences.",
                self.memory_bytes() as u64,
            ),
            (
                "sealed_disk_bytes",
                "Bytes of the sealed generations' files.",
                self.disk_bytes(),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP eventsieve_{name} {help}\n# TYPE eventsieve_{name} gauge\neventsieve_{name} {value}"
            );
        }
        let counters = [
            (
                "sealed_filter_probes_total",
                "Filters of sealed generations probed by lookups.",
                &self.filter_probes,
            ),
            (
                "sealed_block_reads_total",
                "Blocks read from sealed generations to confirm a filter hit.",
                &self.block_reads,
            ),
            (
                "sealed_hits_total",
                "Lookups answered from a sealed generation (a duplicate of a sealed id).",
                &self.hits,
            ),
            ("seals_total", "Generations sealed.", &self.seals),
            (
                "sealed_merges_total",
                "Merges of sealed generations.",
                &self.merges,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP eventsieve_{name} {help}\n# TYPE eventsieve_{name} counter\neventsieve_{name} {}",
                value.load(Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests;
