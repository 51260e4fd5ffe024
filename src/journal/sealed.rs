//! Sealed generations: ids moved out of RAM into immutable files, each
//! with a compact filter kept in memory, so that a window of a week fits
//! in a few bytes of RAM per id while verdicts stay exact.
//!
//! A generation holds the accepted ids of a span of time (`from_ms` to
//! `cut_ms`), of any shards, sorted by `(shard, fingerprint)`. Each
//! shard's ids are split into *partitions* by the top bits of their
//! fingerprint's `hi` half (as many bits as make partitions of at most
//! [`PART_IDS`] ids), so a lookup finds its partition by arithmetic. In RAM
//! a generation keeps only:
//!
//! - a binary fuse filter (`xorf`, 8-bit fingerprints, false positives
//!   < 0.4 %) per partition, about 9.5 bits per id: a new id costs one
//!   filter probe per generation and nothing else, and a filter is built
//!   from one partition's keys, so writing (a merge too) streams;
//! - the first block of each partition, and the `hi` of each 4 KiB block's
//!   first entry (8 bytes per 146 ids, 0.055 B per id), used only to find
//!   the block to read on a filter hit.
//!
//! A filter hit is confirmed on disk: one `pread` of the block the fences
//! point to, its checksum checked, and the entry compared on the full
//! `(shard, 128-bit fingerprint)`; the entry's arrival time then tells
//! whether it is still within the window. So a sealed id is never judged a
//! duplicate on a filter collision, and the false-duplicate bound of the
//! fingerprint (see `engine::fingerprint`) holds as it does in RAM.
//!
//! # The file, `<from_ms>-<cut_ms>.sealed`
//!
//! - blocks of [`BLOCK`] bytes: up to [`PER_BLOCK`] entries of `shard (u32)
//!   ‖ hi (u64) ‖ lo (u64) ‖ born_ms (u64)` (little-endian), their count
//!   (u16), zeros, then XXH3-64 of the block's bytes before it, seeded with the block's number (so a
//!   block read from the wrong place fails too); a partition starts a
//!   block;
//! - the partitions: per partition its first block, and its filter's
//!   descriptor and fingerprints (none for an empty partition);
//! - the shards: per shard its partition bits, first partition and ids;
//! - the fences: each block's first `hi`;
//! - a footer of fixed size: counts, offsets, the span and the oldest and
//!   newest arrival, XXH3-64 of the partitions, of the shards and of the
//!   fences, and of the footer itself.
//!
//! Written once, to `<name>.tmp`, synced, then renamed: a crash leaves
//! either the whole file or a `.tmp` that [`Sealed::open`] deletes. Opening
//! reads the footer, the partitions, the shards and the fences (checksums
//! checked), not the entries.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use xorf::{BinaryFuse8, BinaryFuse16, Descriptor, DmaSerializable, Filter};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::engine::dedup::Older;
use crate::engine::fingerprint::Fingerprint;
use crate::journal::JournalReader;

/// Bytes per block on disk.
pub const BLOCK: usize = 4096;
const ENTRY: usize = 4 + 8 + 8 + 8;
const SUM: usize = 8;
/// Entries per block (then their count, a `u16`).
pub const PER_BLOCK: usize = (BLOCK - SUM - 2) / ENTRY;
const COUNT_AT: usize = PER_BLOCK * ENTRY;
/// Most ids a partition is planned for (a shard's partitions are a power
/// of two, so they hold half to all of this).
pub const PART_IDS: u64 = 65_536;
const MAGIC: &[u8; 8] = b"ESSEAL02";
const FOOTER: usize = 8 + 8 * 17;
const DESCRIPTOR: usize = Descriptor::DMA_LEN;
/// Generations of like size merged into one.
pub const MERGE_RUN: usize = 4;

/// The width of the filters' fingerprints: 8 bits (about 9.5 bits of RAM
/// per id, 0.39 % false positives, each a block read on disk) or 16 (about
/// 20 bits per id (2.49 B measured), 0.0015 %). Each file records its own; new files
/// (seals, merges) take the tier's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FilterBits {
    #[default]
    Eight,
    Sixteen,
}

impl FilterBits {
    /// From the number of bits (as configured, or in a file's footer, where
    /// files from before the choice have 0).
    pub fn from_bits(bits: u64) -> Option<Self> {
        match bits {
            0 | 8 => Some(Self::Eight),
            16 => Some(Self::Sixteen),
            _ => None,
        }
    }

    pub fn bits(self) -> u64 {
        match self {
            Self::Eight => 8,
            Self::Sixteen => 16,
        }
    }

    fn width(self) -> usize {
        self.bits() as usize / 8
    }
}

/// A partition's filter.
enum PartFilter {
    Eight(BinaryFuse8),
    Sixteen(BinaryFuse16),
}

impl PartFilter {
    fn build(bits: FilterBits, keys: &Vec<u64>) -> Result<Self, &'static str> {
        Ok(match bits {
            FilterBits::Eight => Self::Eight(BinaryFuse8::try_from(keys)?),
            FilterBits::Sixteen => Self::Sixteen(BinaryFuse16::try_from(keys)?),
        })
    }

    fn descriptor(&self) -> &Descriptor {
        match self {
            Self::Eight(f) => &f.descriptor,
            Self::Sixteen(f) => &f.descriptor,
        }
    }

    #[inline]
    fn contains(&self, key: u64) -> bool {
        match self {
            Self::Eight(f) => f.contains(&key),
            Self::Sixteen(f) => f.contains(&key),
        }
    }

    /// Bytes of its fingerprints.
    fn len(&self) -> usize {
        match self {
            Self::Eight(f) => f.fingerprints.len(),
            Self::Sixteen(f) => f.fingerprints.len() * 2,
        }
    }

    /// Appends its length in bytes, descriptor and fingerprints (little-endian).
    fn write_to(&self, out: &mut Vec<u8>) {
        let mut descriptor = [0u8; DESCRIPTOR];
        match self {
            Self::Eight(f) => f.dma_copy_descriptor_to(&mut descriptor),
            Self::Sixteen(f) => f.dma_copy_descriptor_to(&mut descriptor),
        }
        out.extend_from_slice(&(self.len() as u64).to_le_bytes());
        out.extend_from_slice(&descriptor);
        match self {
            Self::Eight(f) => out.extend_from_slice(&f.fingerprints),
            Self::Sixteen(f) => f
                .fingerprints
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
    }

    /// The filter of `bytes` fingerprints.
    fn read(bits: FilterBits, descriptor: Descriptor, bytes: &[u8]) -> Self {
        match bits {
            FilterBits::Eight => Self::Eight(BinaryFuse8 {
                descriptor,
                fingerprints: bytes.into(),
            }),
            FilterBits::Sixteen => Self::Sixteen(BinaryFuse16 {
                descriptor,
                fingerprints: bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            }),
        }
    }

    /// Asks the CPU for fingerprint `at`'s cache line.
    #[inline]
    fn prefetch(&self, at: usize) {
        match self {
            Self::Eight(f) => {
                if let Some(byte) = f.fingerprints.get(at) {
                    prefetch_read(std::ptr::from_ref(byte));
                }
            }
            Self::Sixteen(f) => {
                if let Some(word) = f.fingerprints.get(at) {
                    prefetch_read(std::ptr::from_ref(word).cast());
                }
            }
        }
    }
}

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

/// One shard's ids, sorted by fingerprint, with their arrivals: what a
/// seal writes.
pub type ShardIds = (u32, Vec<(Fingerprint, u64)>);

/// `entries` (sorted) as [`ShardIds`].
pub fn by_shard(entries: &[Entry]) -> Vec<ShardIds> {
    entries
        .chunk_by(|a, b| a.shard == b.shard)
        .map(|run| {
            (
                run[0].shard,
                run.iter().map(|e| (e.fingerprint, e.born_ms)).collect(),
            )
        })
        .collect()
}

/// The key a filter holds for an id (its partition fixes the shard).
fn filter_key(fp: Fingerprint) -> u64 {
    fp.lo ^ fp.hi.rotate_left(29)
}

/// Bits of `hi` that pick a partition of a shard of `ids` ids.
fn part_bits(ids: u64) -> u32 {
    let parts = ids.div_ceil(PART_IDS).max(1);
    (parts.next_power_of_two().trailing_zeros()).min(24)
}

fn part_in_shard(hi: u64, bits: u32) -> u32 {
    match bits {
        0 => 0,
        bits => (hi >> (64 - bits)) as u32,
    }
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

/// The file of the ids of `shard` adopted from the journal before `cut_ms`.
fn adopted_name(shard: u32, cut_ms: u64) -> String {
    format!("adopted-{shard:05}-{cut_ms:013}.sealed")
}

fn parse_adopted(name: &str) -> Option<(u32, u64)> {
    let (shard, cut) = name
        .strip_prefix("adopted-")?
        .strip_suffix(".sealed")?
        .split_once('-')?;
    Some((shard.parse().ok()?, cut.parse().ok()?))
}

/// Writes a generation: shard by shard ([`Self::begin_shard`]), each
/// shard's entries in fingerprint order.
pub struct Writer {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    block: Box<[u8; BLOCK]>,
    in_block: usize,
    blocks: u64,
    fences: Vec<u8>,
    /// The shard being written: its number, partition bits and first
    /// partition.
    shard: Option<(u32, u32, u32)>,
    shards: Vec<u8>,
    /// Partitions planned so far (every shard's, empty ones included).
    parts: u32,
    /// The first block of each partition begun or passed.
    part_first: Vec<u8>,
    /// Each partition's filter (its key count, 0 for none, then descriptor
    /// and fingerprints), in partition order.
    filters: Vec<u8>,
    /// The partition being filled, and its keys.
    part: Option<u32>,
    keys: Vec<u64>,
    last: Option<Entry>,
    span: Span,
    filter: FilterBits,
}

impl Writer {
    /// Starts `<dir>/<from_ms>-<cut_ms>.sealed` (as a `.tmp` until
    /// [`Self::finish`]).
    ///
    /// # Errors
    ///
    /// The file could not be created.
    pub fn create(dir: &Path, from_ms: u64, cut_ms: u64) -> Result<Self, SealedError> {
        Self::create_named(dir, &file_name(from_ms, cut_ms), from_ms, cut_ms)
    }

    /// Starts `<dir>/<name>` (as a `.tmp`), of the span `from_ms..cut_ms`.
    ///
    /// # Errors
    ///
    /// The file could not be created.
    fn create_named(dir: &Path, name: &str, from_ms: u64, cut_ms: u64) -> Result<Self, SealedError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(name);
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
            shard: None,
            shards: Vec::new(),
            parts: 0,
            part_first: Vec::new(),
            filters: Vec::new(),
            part: None,
            keys: Vec::with_capacity(PART_IDS as usize),
            last: None,
            span: Span {
                from_ms,
                cut_ms,
                oldest_ms: u64::MAX,
                newest_ms: 0,
                ids: 0,
            },
            filter: FilterBits::default(),
        })
    }

    /// Builds the file's filters with `bits`-bit fingerprints.
    pub fn with_filter(mut self, bits: FilterBits) -> Self {
        self.filter = bits;
        self
    }

    /// Starts the entries of `shard` (above the last one's), planned for
    /// `ids` ids (more only makes its partitions larger; fewer, smaller).
    ///
    /// # Panics
    ///
    /// If shards come out of order: a bug of the caller.
    pub fn begin_shard(&mut self, shard: u32, ids: u64) -> Result<(), SealedError> {
        assert!(self.shard.is_none_or(|(s, ..)| s < shard), "shards in order");
        self.pass_parts_to(self.parts)?;
        let bits = part_bits(ids);
        self.shard = Some((shard, bits, self.parts));
        for v in [shard, bits, self.parts] {
            self.shards.extend_from_slice(&v.to_le_bytes());
        }
        self.parts += 1 << bits;
        Ok(())
    }

    /// Adds `entry` of the shard begun, whose fingerprint must follow the
    /// last one's; the same id again replaces it if it arrived later (an id
    /// accepted again after it was forgotten or expired).
    ///
    /// # Panics
    ///
    /// If the entry is of another shard or out of order: a bug of the
    /// caller.
    pub fn push(&mut self, entry: Entry) -> Result<(), SealedError> {
        let (shard, bits, base) = self.shard.expect("begin_shard first");
        assert_eq!(entry.shard, shard, "entries of the shard begun");
        if let Some(last) = self.last.filter(|l| l.shard == shard) {
            assert!(
                last.fingerprint <= entry.fingerprint,
                "entries in fingerprint order"
            );
            if last.fingerprint == entry.fingerprint {
                if entry.born_ms > last.born_ms {
                    // Still in the block being filled: a block is written
                    // only once a later id needs room.
                    let at = self.in_block - 1;
                    entry.write(&mut self.block[at * ENTRY..(at + 1) * ENTRY]);
                    self.note_born(entry.born_ms);
                    self.last = Some(entry);
                }
                return Ok(());
            }
        }
        let part = base + part_in_shard(entry.fingerprint.hi, bits);
        if self.part != Some(part) {
            self.pass_parts_to(part)?;
            self.part = Some(part);
            self.part_first.extend_from_slice(&self.blocks.to_le_bytes());
        }
        if self.in_block == PER_BLOCK {
            self.flush_block()?;
        }
        if self.in_block == 0 {
            self.fences.extend_from_slice(&entry.fingerprint.hi.to_le_bytes());
        }
        entry.write(&mut self.block[self.in_block * ENTRY..(self.in_block + 1) * ENTRY]);
        self.in_block += 1;
        self.keys.push(filter_key(entry.fingerprint));
        self.note_born(entry.born_ms);
        self.span.ids += 1;
        self.last = Some(entry);
        Ok(())
    }

    fn note_born(&mut self, born_ms: u64) {
        self.span.oldest_ms = self.span.oldest_ms.min(born_ms);
        self.span.newest_ms = self.span.newest_ms.max(born_ms);
    }

    /// Writes the block being filled.
    fn flush_block(&mut self) -> Result<(), SealedError> {
        self.block[self.in_block * ENTRY..BLOCK - SUM].fill(0);
        self.block[COUNT_AT..COUNT_AT + 2].copy_from_slice(&(self.in_block as u16).to_le_bytes());
        let sum = block_sum(&self.block[..], self.blocks);
        self.block[BLOCK - SUM..].copy_from_slice(&sum.to_le_bytes());
        self.out.write_all(&self.block[..]).map_err(io(&self.tmp))?;
        self.blocks += 1;
        self.in_block = 0;
        Ok(())
    }

    /// Ends the partition being filled (its last block written, its filter
    /// built), and records the partitions before `part` that got no
    /// entries.
    fn pass_parts_to(&mut self, part: u32) -> Result<(), SealedError> {
        if self.part.take().is_some() {
            if self.in_block > 0 {
                self.flush_block()?;
            }
            let filter = PartFilter::build(self.filter, &self.keys)
                .map_err(|e| SealedError::Damaged(self.tmp.clone(), format!("filter not built: {e}")))?;
            filter.write_to(&mut self.filters);
            self.keys.clear();
        }
        while (self.part_first.len() / 8) < part as usize {
            self.part_first.extend_from_slice(&self.blocks.to_le_bytes());
            self.filters.extend_from_slice(&0u64.to_le_bytes());
        }
        Ok(())
    }

    /// Completes the file: the last block and filter, the partitions,
    /// shards and fences, the footer; synced and renamed into place.
    ///
    /// # Errors
    ///
    /// Writing, syncing or renaming failed (the `.tmp` is left for the next
    /// [`Sealed::open`] to delete).
    pub fn finish(mut self) -> Result<(PathBuf, Span), SealedError> {
        self.pass_parts_to(self.parts)?;
        if self.span.ids == 0 {
            self.span.oldest_ms = 0;
        }
        let mut sections = self.part_first;
        sections.extend_from_slice(&self.filters);
        let parts_len = sections.len() as u64;
        let shards_len = self.shards.len() as u64;
        let fences_len = self.fences.len() as u64;
        let mut footer = Vec::with_capacity(FOOTER);
        footer.extend_from_slice(MAGIC);
        for v in [
            self.span.ids,
            self.blocks,
            u64::from(self.parts),
            parts_len,
            shards_len,
            fences_len,
            self.span.from_ms,
            self.span.cut_ms,
            self.span.oldest_ms,
            self.span.newest_ms,
            xxh3_64(&sections),
            xxh3_64(&self.shards),
            xxh3_64(&self.fences),
            self.filter.bits(),
            0,
            0,
        ] {
            footer.extend_from_slice(&v.to_le_bytes());
        }
        footer.extend_from_slice(&xxh3_64(&footer).to_le_bytes());
        let tmp = self.tmp.clone();
        for section in [&sections, &self.shards, &self.fences, &footer] {
            self.out.write_all(section).map_err(io(&tmp))?;
        }
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

/// Writes `shards` (each sorted by fingerprint, shards in order) to `writer`.
///
/// # Errors
///
/// As [`Writer::push`].
fn write_shards(writer: &mut Writer, shards: Vec<ShardIds>) -> Result<(), SealedError> {
    for (shard, ids) in shards {
        writer.begin_shard(shard, ids.len() as u64)?;
        for (fingerprint, born_ms) in ids {
            writer.push(Entry {
                shard,
                fingerprint,
                born_ms,
            })?;
        }
    }
    Ok(())
}

/// Where a shard's ids are in a generation.
#[derive(Debug, Clone, Copy)]
struct ShardParts {
    bits: u32,
    base: u32,
}

/// One sealed generation, open: its filters and fences in RAM, its entries
/// on disk.
pub struct Generation {
    path: PathBuf,
    file: File,
    span: Span,
    blocks: u64,
    /// By shard number; `None` for a shard it holds nothing of.
    shards: Vec<Option<ShardParts>>,
    /// Each partition's filter (`None`: no ids); empty when the filters
    /// were left on disk ([`Self::open_unfiltered`]): every partition's
    /// block is then read.
    filters: Vec<Option<PartFilter>>,
    filtered: bool,
    /// Each partition's first block, and the number of blocks at the end.
    part_first: Box<[u64]>,
    /// Each block's first `hi`.
    fences: Box<[u64]>,
    /// Its footer's checksum: what tells this file from another of the same
    /// name (a rebuild, a merge renamed over an input).
    footer_sum: u64,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Generation({}, {:?})", self.path.display(), self.span)
    }
}

/// What probing the sealed tier for one id cost.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Probed {
    /// Filters probed.
    pub filters: u32,
    /// Blocks read to confirm a filter hit.
    pub reads: u32,
}

fn u64s(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
}

impl Generation {
    /// Opens the generation at `path`: footer, partitions, shards and
    /// fences read and checked.
    ///
    /// # Errors
    ///
    /// The file cannot be read, or a checksum or the layout fails.
    pub fn open(path: &Path) -> Result<Self, SealedError> {
        Self::open_with(path, true)
    }

    /// [`Self::open`] leaving its filters on disk (checked, not kept): for
    /// a tier whose summary filters every file.
    ///
    /// # Errors
    ///
    /// As [`Self::open`].
    pub fn open_unfiltered(path: &Path) -> Result<Self, SealedError> {
        Self::open_with(path, false)
    }

    fn open_with(path: &Path, filtered: bool) -> Result<Self, SealedError> {
        let damaged = |why: &str| SealedError::Damaged(path.to_path_buf(), why.to_string());
        let file = File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        if len < FOOTER as u64 {
            return Err(damaged("shorter than its footer"));
        }
        let mut footer = [0u8; FOOTER];
        file.read_exact_at(&mut footer, len - FOOTER as u64)
            .map_err(io(path))?;
        let w: Vec<u64> = u64s(&footer[8..]).collect();
        if &footer[..8] != MAGIC || xxh3_64(&footer[..FOOTER - 8]) != w[16] {
            return Err(damaged("footer checksum"));
        }
        let (ids, blocks, parts, parts_len, shards_len, fences_len) = (w[0], w[1], w[2], w[3], w[4], w[5]);
        let span = Span {
            ids,
            from_ms: w[6],
            cut_ms: w[7],
            oldest_ms: w[8],
            newest_ms: w[9],
        };
        let at = blocks * BLOCK as u64;
        if at + parts_len + shards_len + fences_len + FOOTER as u64 != len
            || ids > blocks * PER_BLOCK as u64
            || fences_len != blocks * 8
            || shards_len % 12 != 0
            || parts_len < parts * 16
        {
            return Err(damaged("layout"));
        }
        let mut sections = vec![0u8; (parts_len + shards_len + fences_len) as usize];
        file.read_exact_at(&mut sections, at).map_err(io(path))?;
        let (parts_bytes, rest) = sections.split_at(parts_len as usize);
        let (shards_bytes, fences_bytes) = rest.split_at(shards_len as usize);
        if xxh3_64(parts_bytes) != w[10] || xxh3_64(shards_bytes) != w[11] || xxh3_64(fences_bytes) != w[12] {
            return Err(damaged("partition, shard or fence checksum"));
        }
        let (first_bytes, mut rest) = parts_bytes.split_at(parts as usize * 8);
        let mut part_first: Vec<u64> = u64s(first_bytes).collect();
        part_first.push(blocks);
        if part_first.windows(2).any(|w| w[0] > w[1]) {
            return Err(damaged("partitions"));
        }
        let bits = FilterBits::from_bits(w[13]).ok_or_else(|| damaged("filter width"))?;
        let mut filters = Vec::with_capacity(parts as usize);
        for _ in 0..parts {
            let (n, after) = rest.split_at_checked(8).ok_or_else(|| damaged("filters"))?;
            let n = u64::from_le_bytes(n.try_into().expect("8 bytes")) as usize;
            rest = after;
            if n == 0 {
                if filtered {
                    filters.push(None);
                }
                continue;
            }
            if rest.len() < DESCRIPTOR + n {
                return Err(damaged("filters"));
            }
            let word = |at: usize| u32::from_le_bytes(rest[at..at + 4].try_into().expect("4 bytes"));
            let descriptor = Descriptor {
                seed: u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")),
                segment_length: word(8),
                segment_length_mask: word(12),
                segment_count_length: word(16),
            };
            // What a probe reads must be within the fingerprints.
            let reach = descriptor.segment_count_length as usize + 2 * descriptor.segment_length as usize;
            if reach * bits.width() > n
                || !n.is_multiple_of(bits.width())
                || descriptor.segment_length_mask != descriptor.segment_length.wrapping_sub(1)
            {
                return Err(damaged("filters"));
            }
            if filtered {
                filters.push(Some(PartFilter::read(
                    bits,
                    descriptor,
                    &rest[DESCRIPTOR..DESCRIPTOR + n],
                )));
            }
            rest = &rest[DESCRIPTOR + n..];
        }
        if !rest.is_empty() {
            return Err(damaged("filters"));
        }
        let mut shards = Vec::new();
        for s in shards_bytes.chunks_exact(12) {
            let word = |at: usize| u32::from_le_bytes(s[at..at + 4].try_into().expect("4 bytes"));
            let (shard, bits, base) = (word(0) as usize, word(4), word(8));
            if bits > 24 || u64::from(base) + (1 << bits) > parts || shard > u16::MAX as usize {
                return Err(damaged("shards"));
            }
            if shards.len() <= shard {
                shards.resize(shard + 1, None);
            }
            shards[shard] = Some(ShardParts { bits, base });
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            span,
            blocks,
            shards,
            filters,
            filtered,
            part_first: part_first.into(),
            fences: u64s(fences_bytes).collect(),
            footer_sum: w[16],
        })
    }

    pub fn span(&self) -> Span {
        self.span
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of RAM its filters, partitions and fences take.
    pub fn memory_bytes(&self) -> usize {
        let filters: usize = self
            .filters
            .iter()
            .map(|f| f.as_ref().map_or(0, PartFilter::len) + std::mem::size_of::<Option<PartFilter>>())
            .sum();
        filters
            + self.part_first.len() * 8
            + self.fences.len() * 8
            + self.shards.len() * std::mem::size_of::<Option<ShardParts>>()
            + std::mem::size_of::<Self>()
    }

    /// Bytes of the file.
    pub fn disk_bytes(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.len())
    }

    /// Ids planned per shard (for a merge's partitions): what each shard's
    /// partitions were sized for, at most.
    fn shard_ids(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.shards.iter().enumerate().filter_map(|(shard, parts)| {
            let parts = (*parts)?;
            let blocks = self.part_first[(parts.base + (1 << parts.bits)) as usize]
                - self.part_first[parts.base as usize];
            Some((shard as u32, blocks * PER_BLOCK as u64))
        })
    }

    /// The shards it holds ids of.
    pub(super) fn shards_held(&self) -> impl Iterator<Item = u32> + '_ {
        self.shards
            .iter()
            .enumerate()
            .filter(|(_, parts)| parts.is_some())
            .map(|(shard, _)| shard as u32)
    }

    /// The blocks of `shard`'s ids.
    fn shard_blocks(&self, shard: u32) -> std::ops::Range<u64> {
        match self.shards.get(shard as usize).copied().flatten() {
            Some(parts) => {
                self.part_first[parts.base as usize]
                    ..self.part_first[(parts.base + (1 << parts.bits)) as usize]
            }
            None => 0..0,
        }
    }

    /// At most how many ids of `shard` it holds (its blocks' room).
    pub(super) fn shard_room(&self, shard: u32) -> u64 {
        let blocks = self.shard_blocks(shard);
        (blocks.end - blocks.start) * PER_BLOCK as u64
    }

    /// The partition of `(shard, fp)`, if the generation holds any of the
    /// shard.
    fn part_of(&self, shard: u32, fp: Fingerprint) -> Option<usize> {
        let parts = (*self.shards.get(shard as usize)?)?;
        Some((parts.base + part_in_shard(fp.hi, parts.bits)) as usize)
    }

    /// Asks the CPU for the three bytes of the filter a lookup of
    /// `(shard, fp)` reads. The positions follow the binary fuse filter's
    /// published layout; should they ever differ from `xorf`'s, only the
    /// hint is wasted: the lookup itself asks `xorf`.
    #[inline]
    fn prefetch(&self, shard: u32, fp: Fingerprint) {
        let Some(Some(filter)) = self.part_of(shard, fp).and_then(|p| self.filters.get(p)) else {
            return;
        };
        let d = filter.descriptor();
        let hash = fmix64(filter_key(fp).wrapping_add(d.seed));
        let h0 = ((u128::from(hash) * u128::from(d.segment_count_length)) >> 64) as u32;
        let h1 = (h0 + d.segment_length) ^ ((hash >> 18) as u32 & d.segment_length_mask);
        let h2 = (h0 + 2 * d.segment_length) ^ (hash as u32 & d.segment_length_mask);
        for h in [h0, h1, h2] {
            filter.prefetch(h as usize);
        }
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
        let Some(part) = self.part_of(shard, fp) else {
            return Ok(None);
        };
        if self.filtered {
            let Some(filter) = &self.filters[part] else {
                return Ok(None);
            };
            probed.filters += 1;
            if !filter.contains(filter_key(fp)) {
                return Ok(None);
            }
        }
        // The partition's blocks that begin at or before `hi`: the last of
        // them holds it, or (ids with the same `hi` running over blocks)
        // one of those that begin with it, or the one before those.
        let (start, end) = (self.part_first[part] as usize, self.part_first[part + 1] as usize);
        let fences = &self.fences[start..end];
        let first = start + fences.partition_point(|&f| f < fp.hi);
        let last = start + fences.partition_point(|&f| f <= fp.hi);
        // Entries are in `(key, born)` order: an id that arrived twice (a
        // merge of a generation before a forget with one after it) is
        // answered by its last arrival.
        let mut found = None;
        for b in first.saturating_sub(1).max(start)..last {
            probed.reads += 1;
            let newest = self
                .read_block(b as u64)?
                .into_iter()
                .filter(|e| e.key() == (shard, fp))
                .map(|e| e.born_ms)
                .max();
            found = found.max(newest);
        }
        Ok(found)
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
        let count = u16::from_le_bytes([block[COUNT_AT], block[COUNT_AT + 1]]) as usize;
        if count > PER_BLOCK {
            return Err(SealedError::Damaged(
                self.path.clone(),
                format!("block {n}: {count} entries"),
            ));
        }
        Ok(block[..count * ENTRY]
            .chunks_exact(ENTRY)
            .map(Entry::read)
            .collect())
    }

    /// Every entry, in order, each block's checksum checked (a merge reads
    /// generations through this).
    ///
    /// # Errors
    ///
    /// The file cannot be opened again.
    pub fn entries(&self) -> Result<Entries<'_>, SealedError> {
        Ok(self.entries_in(0..self.blocks))
    }

    /// The entries of `shard`, in order, as [`Self::entries`] (reading may
    /// fail as they come).
    pub(super) fn shard_entries(&self, shard: u32) -> Entries<'_> {
        self.entries_in(self.shard_blocks(shard))
    }

    /// The entries of `blocks`, read from the file it has open (by
    /// position, so a file renamed over or deleted since is still read).
    fn entries_in(&self, blocks: std::ops::Range<u64>) -> Entries<'_> {
        Entries {
            generation: self,
            blocks,
            buffer: Vec::new(),
            buffered: Vec::new().into_iter(),
        }
    }
}

/// Blocks a generation's entries are read by at a time.
const READ_BLOCKS: u64 = 256;

/// Reads a generation's entries in order.
pub struct Entries<'a> {
    generation: &'a Generation,
    /// The blocks still to read.
    blocks: std::ops::Range<u64>,
    buffer: Vec<u8>,
    buffered: std::vec::IntoIter<Entry>,
}

impl Iterator for Entries<'_> {
    type Item = Result<Entry, SealedError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.buffered.next() {
                return Some(Ok(e));
            }
            if self.blocks.is_empty() {
                return None;
            }
            let (first, n) = (
                self.blocks.start,
                (self.blocks.end - self.blocks.start).min(READ_BLOCKS),
            );
            let g = self.generation;
            self.buffer.resize(n as usize * BLOCK, 0);
            let read = g
                .file
                .read_exact_at(&mut self.buffer, first * BLOCK as u64)
                .map_err(io(&g.path))
                .and_then(|()| {
                    let mut entries = Vec::with_capacity(n as usize * PER_BLOCK);
                    for (i, block) in self.buffer.chunks_exact(BLOCK).enumerate() {
                        entries.extend(g.entries_of(block, first + i as u64)?);
                    }
                    Ok(entries)
                });
            match read {
                Ok(entries) => {
                    self.buffered = entries.into_iter();
                    self.blocks.start += n;
                }
                Err(e) => {
                    self.blocks.start = self.blocks.end;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// MurmurHash3's 64-bit finalizer, as the binary fuse filter mixes keys.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// Asks the CPU to bring the cache line at `at` in; a no-op elsewhere.
#[inline]
fn prefetch_read(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: a prefetch is a hint that never faults and reads nothing
        // into the program; SSE is part of the x86_64 baseline.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Pushes `item` unless `list` has it; whether it was new.
fn push_new<T: PartialEq>(list: &mut Vec<T>, item: T) -> bool {
    let new = !list.contains(&item);
    if new {
        list.push(item);
    }
    new
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
    filter: FilterBits,
) -> Result<Generation, SealedError> {
    Generation::open(&merge_into(dir, generations, horizon_ms, filter)?)
}

/// [`merge`], giving the new file's path.
fn merge_into(
    dir: &Path,
    generations: &[Arc<Generation>],
    horizon_ms: u64,
    filter: FilterBits,
) -> Result<PathBuf, SealedError> {
    let from = generations.iter().map(|g| g.span.from_ms).min().unwrap_or(0);
    let cut = generations.iter().map(|g| g.span.cut_ms).max().unwrap_or(0);
    let mut planned: BTreeMap<u32, u64> = BTreeMap::new();
    for (shard, ids) in generations.iter().flat_map(|g| g.shard_ids()) {
        *planned.entry(shard).or_default() += ids;
    }
    let mut writer = Writer::create(dir, from, cut)?.with_filter(filter);
    let mut shard = None;
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
            if shard != Some(entry.shard) {
                shard = Some(entry.shard);
                writer.begin_shard(entry.shard, planned.get(&entry.shard).copied().unwrap_or(0))?;
            }
            writer.push(entry)?;
        }
        if let Some(next) = readers[i].next() {
            heap.push(Reverse((next?, i)));
        }
    }
    let (path, _) = writer.finish()?;
    Ok(path)
}

/// The sealed generations of a node, newest last, with counters of what
/// lookups cost.
pub struct Sealed {
    dir: PathBuf,
    generations: arc_swap::ArcSwap<Vec<Arc<Generation>>>,
    /// Held while the generations change (a seal, an expiry, a merge put
    /// in place, a rebuild): one change at a time. Not while a merge
    /// writes its file, so seals go on meanwhile.
    changing: std::sync::Mutex<()>,
    /// Held by a compaction: one at a time.
    compacting: std::sync::Mutex<()>,
    /// Ids forgotten (`eventsieve forget`) after they were sealed, and
    /// when: an arrival at or before that is not answered.
    forgotten: std::sync::Mutex<std::collections::HashMap<(u32, Fingerprint), u64>>,
    /// Generations a lookup found damaged, to be rebuilt from the journal.
    damaged: std::sync::Mutex<Vec<Span>>,
    /// Per shard, the ids that came from the journal stream when the shard
    /// was taken over (or caught up), arrived before the cut but after the
    /// seals that covered their time: at most one file per shard, outside
    /// the generations' sequence of cuts ([`Self::adopt`]).
    adopted: arc_swap::ArcSwap<BTreeMap<u32, Arc<Generation>>>,
    /// Adopted files found damaged: their shard and cut.
    damaged_adopted: std::sync::Mutex<Vec<(u32, u64)>>,
    /// Held (exclusively) by a seal from its read of the journal until the
    /// tables dropped what it sealed, and (shared) by a replay of a
    /// shard's journal from reading the cut until it has adopted what it
    /// found before the cut: a replay never misses what a seal moved.
    turn: tokio::sync::RwLock<()>,
    /// The filters of the files it writes.
    filter: FilterBits,
    /// With `sealed_summary`: one filter per shard over every file, in
    /// place of the files' own (see `summary`).
    summary: Option<summary::Summary>,
    /// Per shard, the room the last seal's file had for its ids: what the
    /// next seal is likely to add to the summary.
    last_seal: std::sync::Mutex<Vec<u64>>,
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
        Self::open_as(dir, None)
    }

    /// [`Self::open`] with a summary over its files for `shards` shards
    /// (see `summary`): the files' own filters stay on disk, and the
    /// summary is read back, or built from the files if it does not cover
    /// exactly them (a crash during a change), then saved.
    ///
    /// # Errors
    ///
    /// As [`Self::open`]; or the summary could not be built or saved.
    pub fn open_summarized(dir: &Path, shards: u32) -> Result<Self, SealedError> {
        Self::open_as(dir, Some(shards))
    }

    fn open_as(dir: &Path, summary_shards: Option<u32>) -> Result<Self, SealedError> {
        let open_file = match summary_shards {
            Some(_) => Generation::open_unfiltered,
            None => Generation::open,
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut spans = Vec::new();
        let mut adopted_files: BTreeMap<u32, Vec<(u64, PathBuf)>> = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.ends_with(".tmp") {
                std::fs::remove_file(&path).map_err(io(&path))?;
            } else if let Some((shard, cut)) = parse_adopted(name) {
                adopted_files.entry(shard).or_default().push((cut, path));
            } else if let Some(span) = parse_name(name) {
                spans.push((span, path));
            }
        }
        // A shard's newest adopted file holds what the older ones did (a
        // crash may leave an older one behind).
        let (mut adopted, mut damaged_adopted) = (BTreeMap::new(), Vec::new());
        for (shard, mut files) in adopted_files {
            files.sort();
            let (cut, newest) = files.pop().expect("a file");
            for (_, older) in files {
                std::fs::remove_file(&older).map_err(io(&older))?;
            }
            match open_file(&newest) {
                Ok(g) => {
                    adopted.insert(shard, Arc::new(g));
                }
                Err(e @ SealedError::Damaged(..)) => {
                    tracing::error!(message = "An adopted sealed file is damaged; rebuilding it from the journal.", error = %e);
                    std::fs::rename(&newest, newest.with_extension("damaged")).map_err(io(&newest))?;
                    damaged_adopted.push((shard, cut));
                }
                Err(e) => return Err(e),
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
            match open_file(&path) {
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
        let mut sealed = Self {
            dir: dir.to_path_buf(),
            generations: arc_swap::ArcSwap::from_pointee(generations),
            changing: std::sync::Mutex::default(),
            compacting: std::sync::Mutex::default(),
            forgotten: std::sync::Mutex::default(),
            damaged: std::sync::Mutex::new(damaged),
            adopted: arc_swap::ArcSwap::from_pointee(adopted),
            damaged_adopted: std::sync::Mutex::new(damaged_adopted),
            turn: tokio::sync::RwLock::new(()),
            filter: FilterBits::default(),
            summary: None,
            last_seal: std::sync::Mutex::default(),
            seals: AtomicU64::new(0),
            merges: AtomicU64::new(0),
            filter_probes: AtomicU64::new(0),
            block_reads: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        };
        if let Some(shards) = summary_shards {
            let started = std::time::Instant::now();
            let (summary, built) = loop {
                let files = sealed.files_now();
                let covers = covered_by_groups(&files);
                match summary::Summary::open(dir, shards, &files, |g| covers[g].clone()) {
                    Ok(opened) => break opened,
                    // A block found damaged while building: the file is
                    // left out, as one damaged at its footer is.
                    Err(SealedError::Damaged(path, why)) => sealed.leave_out(path, why)?,
                    Err(e) => return Err(e),
                }
            };
            if built > 0 {
                tracing::info!(
                    message = "Built groups of the sealed tier's summary from its files.",
                    groups = built,
                    files = sealed.files(),
                    seconds = started.elapsed().as_secs_f64(),
                );
            }
            sealed.summary = Some(summary);
        }
        Ok(sealed)
    }

    /// At open: leaves out its file at `path`, found damaged (`why`),
    /// renamed `.damaged` and listed for its rebuild from the journal.
    ///
    /// # Errors
    ///
    /// The damage itself if `path` is none of its files, or the rename
    /// failed.
    fn leave_out(&self, path: PathBuf, why: String) -> Result<(), SealedError> {
        let Some(g) = self.files_now().into_iter().find(|g| g.path == path) else {
            return Err(SealedError::Damaged(path, why));
        };
        self.list_damaged(&g, &SealedError::Damaged(path, why));
        std::fs::rename(&g.path, g.path.with_extension("damaged")).map_err(io(&g.path))?;
        self.generations.store(Arc::new(
            self.generations()
                .iter()
                .filter(|o| !Arc::ptr_eq(o, &g))
                .cloned()
                .collect(),
        ));
        let mut adopted = BTreeMap::clone(&self.adopted.load());
        adopted.retain(|_, o| !Arc::ptr_eq(o, &g));
        self.adopted.store(Arc::new(adopted));
        Ok(())
    }

    /// Its files now: the generations, then the adopted ones.
    fn files_now(&self) -> Vec<Arc<Generation>> {
        let (generations, adopted) = (self.generations.load(), self.adopted.load());
        generations.iter().chain(adopted.values()).cloned().collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the files of its seals and merges with `bits`-bit filters
    /// (those it has keep theirs).
    pub fn with_filter(mut self, bits: FilterBits) -> Self {
        self.filter = bits;
        self
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
        let mut answer = None;
        self.each_born(shard, std::slice::from_ref(&fp), horizon_ms, |born| answer = born)?;
        Ok(answer)
    }

    /// [`Self::born_ms`] for each of `fps` of one shard, appended to `out`
    /// in order: the filters of later ids are fetched while earlier ones
    /// are probed, so the cache misses of a batch overlap.
    ///
    /// # Errors
    ///
    /// As [`Self::born_ms`]; `out` then holds the answers before it.
    pub fn born_many(
        &self,
        shard: u32,
        fps: &[Fingerprint],
        horizon_ms: u64,
        out: &mut Vec<Option<u64>>,
    ) -> Result<(), SealedError> {
        self.each_born(shard, fps, horizon_ms, |born| out.push(born))
    }

    /// Calls `answer` with [`Self::born_ms`] of each of `fps`, in order;
    /// stops at the first error.
    fn each_born(
        &self,
        shard: u32,
        fps: &[Fingerprint],
        horizon_ms: u64,
        mut answer: impl FnMut(Option<u64>),
    ) -> Result<(), SealedError> {
        const AHEAD: usize = 8;
        let generations = self.generations.load();
        // Newest first; older generations hold older ids only.
        let live = || {
            generations
                .iter()
                .rev()
                .filter(|g| g.span.ids > 0)
                .take_while(|g| g.span.newest_ms >= horizon_ms)
        };
        let adopted = self.adopted.load();
        let adopted = adopted
            .get(&shard)
            .filter(|g| g.span.ids > 0 && g.span.newest_ms >= horizon_ms);
        // With a summary, its filter alone is probed; `Some(None)`: a shard
        // beyond it, which no file holds.
        let summary = self.summary.as_ref().map(|s| s.read(shard));
        let prefetch = |fp: Fingerprint| match &summary {
            Some(Some(filter)) => filter.prefetch(fp),
            Some(None) => {}
            None => live().chain(adopted).for_each(|g| g.prefetch(shard, fp)),
        };
        for fp in fps.iter().take(AHEAD) {
            prefetch(*fp);
        }
        let (mut probed, mut hits) = (Probed::default(), 0);
        let mut answered = Ok(());
        for (i, &fp) in fps.iter().enumerate() {
            if let Some(later) = fps.get(i + AHEAD) {
                prefetch(*later);
            }
            let maybe = match &summary {
                Some(Some(filter)) => {
                    probed.filters += 1;
                    filter.contains(fp)
                }
                Some(None) => false,
                None => true,
            };
            let found = match maybe {
                true => self.find(live(), adopted, shard, fp, &mut probed),
                false => Ok(None),
            };
            match found {
                Ok(found) => {
                    let alive = found.filter(|&born| born >= horizon_ms);
                    hits += u64::from(alive.is_some());
                    answer(alive);
                }
                Err(e) => {
                    answered = Err(e);
                    break;
                }
            }
        }
        self.filter_probes.fetch_add(u64::from(probed.filters), Relaxed);
        self.block_reads.fetch_add(u64::from(probed.reads), Relaxed);
        self.hits.fetch_add(hits, Relaxed);
        answered
    }

    /// When `(shard, fp)` last arrived, unless it was forgotten since: the
    /// later of its arrival in the newest of the generations `live`
    /// (newest first) holding it and in the shard's `adopted` file.
    fn find<'g>(
        &self,
        live: impl Iterator<Item = &'g Arc<Generation>>,
        adopted: Option<&Arc<Generation>>,
        shard: u32,
        fp: Fingerprint,
        probed: &mut Probed,
    ) -> Result<Option<u64>, SealedError> {
        let mut born = None;
        for g in live {
            born = self.probe(g, shard, fp, probed)?;
            if born.is_some() {
                break;
            }
        }
        // The adopted file's arrivals may be newer than the generations'.
        if let Some(g) = adopted {
            born = born.max(self.probe(g, shard, fp, probed)?);
        }
        let Some(born) = born else { return Ok(None) };
        let forgotten = lock(&self.forgotten);
        Ok(match forgotten.get(&(shard, fp)) {
            Some(&at) if born <= at => None,
            _ => Some(born),
        })
    }

    /// [`Generation::born_ms`], a damaged generation listed for its rebuild.
    fn probe(
        &self,
        g: &Generation,
        shard: u32,
        fp: Fingerprint,
        probed: &mut Probed,
    ) -> Result<Option<u64>, SealedError> {
        g.born_ms(shard, fp, probed)
            .inspect_err(|e| self.list_damaged(g, e))
    }

    /// Lists `g`, found damaged (`e`), for its rebuild from the journal.
    fn list_damaged(&self, g: &Generation, e: &SealedError) {
        let name = g.path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let listed = match parse_adopted(name) {
            Some(adopted) => push_new(&mut lock(&self.damaged_adopted), adopted),
            None => push_new(&mut lock(&self.damaged), g.span),
        };
        if listed {
            tracing::error!(message = "A sealed generation is damaged; rebuilding it from the journal.", error = %e);
        }
    }

    /// `result`, a file it names as damaged listed for its rebuild (the
    /// summary reads every block of the files it builds from).
    fn noting_damage<T>(&self, result: Result<T, SealedError>) -> Result<T, SealedError> {
        if let Err(e @ SealedError::Damaged(path, _)) = &result
            && let Some(g) = self.files_now().iter().find(|g| g.path == *path)
        {
            self.list_damaged(g, e);
        }
        result
    }

    /// Seals `shards` (in order, each sorted by fingerprint), the ids
    /// accepted from the last cut to `cut_ms`, as the newest generation.
    /// With a summary, [`Self::save_summary_after_seal`] is the caller's.
    ///
    /// # Errors
    ///
    /// The generation could not be written; nothing changes.
    pub fn seal(&self, shards: Vec<ShardIds>, cut_ms: u64) -> Result<Span, SealedError> {
        self.seal_with(cut_ms, |writer| write_shards(writer, shards))
    }

    /// Seals the ids `reader` holds from `from_ms` (at least the last cut)
    /// to `cut_ms`, as [`Self::seal`]: in RAM up to [`SORT_IN_RAM_IDS`],
    /// a longer span through bucket files, so that a seal's RAM is bounded
    /// whatever the span.
    ///
    /// # Errors
    ///
    /// The journal cannot be read or the generation written; nothing
    /// changes.
    pub fn seal_journal(
        &self,
        reader: &dyn JournalReader,
        from_ms: u64,
        cut_ms: u64,
    ) -> Result<Span, SealedError> {
        let from_ms = from_ms.max(self.cut_ms());
        self.seal_with(cut_ms, |writer| {
            write_journal(writer, reader, (from_ms, cut_ms), &self.dir, SORT_IN_RAM_IDS)
        })
    }

    /// A seal whose ids `fill` writes.
    fn seal_with(
        &self,
        cut_ms: u64,
        fill: impl FnOnce(&mut Writer) -> Result<(), SealedError>,
    ) -> Result<Span, SealedError> {
        let _changing = lock(&self.changing);
        if cut_ms <= self.cut_ms() {
            let why = format!("a seal's cut {cut_ms} must follow the last, {}", self.cut_ms());
            return Err(SealedError::Io(
                self.dir.clone(),
                std::io::Error::new(std::io::ErrorKind::InvalidInput, why),
            ));
        }
        let mut writer = Writer::create(&self.dir, self.cut_ms(), cut_ms)?.with_filter(self.filter);
        fill(&mut writer)?;
        let (path, span) = writer.finish()?;
        let generation = self.open_new(&path)?;
        self.generations.rcu(|gs| {
            let mut gs = Vec::clone(gs);
            gs.push(generation.clone());
            gs
        });
        *lock(&self.last_seal) = generation
            .shards_held()
            .map(|shard| (shard, generation.shard_room(shard)))
            .fold(Vec::new(), |mut rooms, (shard, room)| {
                rooms.resize(rooms.len().max(shard as usize + 1), 0);
                rooms[shard as usize] = room;
                rooms
            });
        self.seals.fetch_add(1, Relaxed);
        Ok(span)
    }

    /// Opens one of its files: its filters left on disk if it keeps a
    /// summary.
    fn open_file(&self, path: &Path) -> Result<Generation, SealedError> {
        match self.summary {
            Some(_) => Generation::open_unfiltered(path),
            None => Generation::open(path),
        }
    }

    /// Opens a file just written, and adds it to the summary (if any) before
    /// the caller puts it in place; on failure the file is deleted.
    fn open_new(&self, path: &Path) -> Result<Arc<Generation>, SealedError> {
        let opened = self
            .open_file(path)
            .map(Arc::new)
            .and_then(|g| match &self.summary {
                None => Ok(g),
                Some(summary) => {
                    let mut files = self.files_now();
                    files.push(g.clone());
                    self.noting_damage(summary.add(&g, &files)).map(|()| g)
                }
            });
        if opened.is_err() {
            let _ = std::fs::remove_file(path);
        }
        opened
    }

    /// Removes from the summary (if any) the entries of `file`, no longer
    /// in the tier, that `gone` picks.
    fn unsummarize(&self, file: &Generation, gone: impl Fn(&Entry) -> bool) -> Result<(), SealedError> {
        match &self.summary {
            Some(summary) => self.noting_damage(summary.remove(file, gone, &self.files_now())),
            None => Ok(()),
        }
    }

    /// Saves the summary (if any) after a seal, which leaves it to the
    /// caller so that it need not hold the turn for it (other changes save
    /// it themselves); until then a crash costs building the summary again
    /// at the next start.
    pub fn save_summary_after_seal(&self) {
        let _changing = lock(&self.changing);
        self.save_summary();
    }

    /// Saves the summary (if any) after a change; a failure is logged (the
    /// summary on disk then names other files, and the next open builds
    /// those groups from the files).
    fn save_summary(&self) {
        if let Some(summary) = &self.summary
            && let Err(e) = {
                let covers = covered_by_groups(&self.files_now());
                summary.save(&self.dir, |g| covers[g].clone())
            }
        {
            tracing::warn!(message = "Could not save the sealed tier's summary; the next start builds it from the files.", error = %e);
        }
    }

    /// Drops the generations whose newest id arrived before `horizon_ms`
    /// (deleting their files), the newest excepted; then merges the newest
    /// run of generations of like size (each at most twice the newest's
    /// ids) once it has [`MERGE_RUN`] of them, as an LSM tree's size tiers
    /// do (an id is rewritten about `log4(ids / seal)` times), and the
    /// newest ones while more than `max` remain; merges drop the ids
    /// arrived before the horizon. Returns how many files it removed.
    ///
    /// A merge writes its file without holding the generations still:
    /// seals go on meanwhile, and the merged file then takes its inputs'
    /// place (unless one of them was rebuilt meanwhile: then it is
    /// dropped, and merged again later).
    ///
    /// # Errors
    ///
    /// A merge failed; the generations stay as they were.
    pub fn compact(&self, horizon_ms: u64, max: usize) -> Result<usize, SealedError> {
        let _compacting = lock(&self.compacting);
        self.grow_summary()?;
        let mut removed = self.expire(horizon_ms)?;
        while let Some(inputs) = self.next_merge(max) {
            // (With a summary, its entries are there already, as its
            // inputs'.)
            let path = merge_into(&self.dir, &inputs, horizon_ms, self.filter)?;
            let merged = Arc::new(self.open_file(&path)?);
            self.merges.fetch_add(1, Relaxed);
            match self.put_merged(&inputs, merged, horizon_ms)? {
                Some(n) => removed += n,
                None => break,
            }
        }
        Ok(removed)
    }

    /// Builds again, larger, each shard's filter of the summary that the
    /// next seal, as large as the last, would take past its limit: here,
    /// beside the seals, so that a seal (and a takeover waiting for one)
    /// seldom has to. Each is built from a snapshot of the files without
    /// holding the tier, and put in place only if neither the files nor
    /// the shard's filter changed meanwhile (else it is tried again on the
    /// next call).
    ///
    /// # Errors
    ///
    /// A file could not be read.
    fn grow_summary(&self) -> Result<(), SealedError> {
        let Some(summary) = &self.summary else {
            return Ok(());
        };
        let next = lock(&self.last_seal).clone();
        let mut grown = false;
        for (shard, &more) in next.iter().enumerate() {
            let shard = shard as u32;
            if !summary.crowded(shard, more) {
                continue;
            }
            let version = summary.version(shard);
            let files = self.files_now();
            let filter = self.noting_damage(summary.built(shard, &files, more))?;
            let _changing = lock(&self.changing);
            let now = self.files_now();
            let same = now.len() == files.len() && now.iter().zip(&files).all(|(a, b)| Arc::ptr_eq(a, b));
            if same && summary.version(shard) == version {
                summary.install(shard, filter);
                grown = true;
            }
        }
        if grown {
            let _changing = lock(&self.changing);
            self.save_summary();
        }
        Ok(())
    }

    /// Drops the files whose newest id arrived before `horizon_ms` (the
    /// newest generation excepted); how many.
    fn expire(&self, horizon_ms: u64) -> Result<usize, SealedError> {
        let _changing = lock(&self.changing);
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
                self.unsummarize(&g, |_| true)?;
                std::fs::remove_file(&g.path).map_err(io(&g.path))?;
            }
        }
        lock(&self.forgotten).retain(|_, at| *at >= horizon_ms);
        let adopted = self.adopted.load_full();
        let gone: Vec<u32> = adopted
            .iter()
            .filter(|(_, g)| g.span.newest_ms < horizon_ms)
            .map(|(shard, _)| *shard)
            .collect();
        if !gone.is_empty() {
            let mut left = BTreeMap::clone(&adopted);
            let gone: Vec<_> = gone
                .iter()
                .map(|shard| left.remove(shard).expect("listed"))
                .collect();
            self.adopted.store(Arc::new(left));
            for g in gone {
                removed += 1;
                self.unsummarize(&g, |_| true)?;
                std::fs::remove_file(&g.path).map_err(io(&g.path))?;
            }
        }
        if removed > 0 {
            self.save_summary();
        }
        Ok(removed)
    }

    /// The generations to merge next, if any: the newest run of like size
    /// (each at most twice the newest's ids) once it has [`MERGE_RUN`] of
    /// them, or at least the two newest while more than `max` remain.
    fn next_merge(&self, max: usize) -> Option<Vec<Arc<Generation>>> {
        let gens = self.generations();
        if gens.len() < 2 {
            return None;
        }
        let newest = gens.len() - 1;
        let like = 2 * gens[newest].span.ids.max(1);
        let mut start = newest;
        while start > 0 && gens[start - 1].span.ids <= like {
            start -= 1;
        }
        if gens.len() - start < MERGE_RUN && gens.len() <= max.max(1) {
            return None;
        }
        Some(gens[start.min(newest - 1)..].to_vec())
    }

    /// Puts `merged` in place of `inputs` (still generations in a row, with
    /// any sealed since after them) and deletes their files, their entries
    /// born before `horizon_ms` (which the merge dropped) removed from the
    /// summary; how many. If
    /// they are not (one was rebuilt meanwhile), `merged` is deleted
    /// instead and `None` returned.
    ///
    /// # Errors
    ///
    /// An input's file could not be deleted.
    fn put_merged(
        &self,
        inputs: &[Arc<Generation>],
        merged: Arc<Generation>,
        horizon_ms: u64,
    ) -> Result<Option<usize>, SealedError> {
        let _changing = lock(&self.changing);
        let current = self.generations();
        let at = current.iter().position(|g| Arc::ptr_eq(g, &inputs[0]));
        let in_place = at.is_some_and(|at| {
            current.len() >= at + inputs.len()
                && current[at..at + inputs.len()]
                    .iter()
                    .zip(inputs)
                    .all(|(g, i)| Arc::ptr_eq(g, i))
        });
        let Some(at) = at.filter(|_| in_place) else {
            if !current.iter().any(|g| g.path == merged.path) {
                std::fs::remove_file(&merged.path).map_err(io(&merged.path))?;
            }
            return Ok(None);
        };
        let mut gens = current[..at].to_vec();
        gens.push(merged.clone());
        gens.extend_from_slice(&current[at + inputs.len()..]);
        self.generations.store(Arc::new(gens));
        // (An input spanning all the others, which were empty, had the
        // output's name: the rename replaced it.)
        // (An input's file renamed over is still read: through its handle.)
        for g in inputs.iter().filter(|g| g.span.oldest_ms < horizon_ms) {
            self.unsummarize(g, |e| e.born_ms < horizon_ms)?;
        }
        let mut removed = 0;
        for g in inputs.iter().filter(|g| g.path != merged.path) {
            removed += 1;
            std::fs::remove_file(&g.path).map_err(io(&g.path))?;
        }
        self.save_summary();
        Ok(Some(removed))
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

    /// The adopted files found damaged since the last call: their shard
    /// and cut.
    pub fn take_damaged_adopted(&self) -> Vec<(u32, u64)> {
        std::mem::take(&mut *lock(&self.damaged_adopted))
    }

    /// See the field `turn`: a seal takes it exclusively, a replay shared.
    pub fn turn(&self) -> &tokio::sync::RwLock<()> {
        &self.turn
    }

    /// Adds to the sealed tier `ids` of `shard` (fingerprint and arrival)
    /// that arrived before the cut but were not in the journal's local
    /// copy when the seals covering their time ran: what a node replays of
    /// a shard's journal stream when it takes the shard over (or catches up
    /// on it) before the cut. They join the shard's adopted file (one per
    /// shard, written again with what it held, ids before `horizon_ms`
    /// dropped, one arrival per id: the last), so that the tables, which
    /// hold no id before the cut, need not hold them. The caller holds
    /// [`Self::turn`] (shared) from reading the cut until this returns.
    ///
    /// # Errors
    ///
    /// The shard's adopted file could not be read or the new one written;
    /// the old one stays.
    pub fn adopt(
        &self,
        shard: u32,
        mut ids: Vec<(Fingerprint, u64)>,
        horizon_ms: u64,
    ) -> Result<Option<Span>, SealedError> {
        let _changing = lock(&self.changing);
        if let Some(old) = self.adopted.load().get(&shard) {
            for e in old.entries()? {
                let e = e?;
                ids.push((e.fingerprint, e.born_ms));
            }
        }
        self.write_adopted(shard, self.cut_ms(), ids, horizon_ms)
    }

    /// Puts in place of the damaged adopted file of `shard` and `cut_ms`
    /// one written from `ids` (rebuilt from the journal's local copy: every
    /// id of the shard before the cut, which holds what it held).
    ///
    /// # Errors
    ///
    /// The new one could not be written.
    pub fn rebuild_adopted(
        &self,
        shard: u32,
        cut_ms: u64,
        ids: Vec<(Fingerprint, u64)>,
        horizon_ms: u64,
    ) -> Result<Option<Span>, SealedError> {
        let _changing = lock(&self.changing);
        let rebuilt = self.write_adopted(shard, cut_ms, ids, horizon_ms)?;
        let _ = std::fs::remove_file(
            self.dir
                .join(adopted_name(shard, cut_ms))
                .with_extension("damaged"),
        );
        Ok(rebuilt)
    }

    /// Writes `ids` as the adopted file of `shard` and puts it in place of
    /// the shard's last one (deleted); none if no id is left.
    fn write_adopted(
        &self,
        shard: u32,
        cut_ms: u64,
        mut ids: Vec<(Fingerprint, u64)>,
        horizon_ms: u64,
    ) -> Result<Option<Span>, SealedError> {
        ids.retain(|&(_, born)| born >= horizon_ms);
        // The last arrival of each id first, then one per id.
        ids.sort_unstable_by_key(|&(fp, born)| (fp, Reverse(born)));
        ids.dedup_by_key(|&mut (fp, _)| fp);
        let generation = match ids.is_empty() {
            true => None,
            false => {
                let name = adopted_name(shard, cut_ms);
                let mut writer = Writer::create_named(&self.dir, &name, 0, cut_ms)?.with_filter(self.filter);
                write_shards(&mut writer, vec![(shard, ids)])?;
                let (path, _) = writer.finish()?;
                Some(self.open_new(&path)?)
            }
        };
        let mut adopted = BTreeMap::clone(&self.adopted.load());
        let old = match &generation {
            Some(g) => adopted.insert(shard, g.clone()),
            None => adopted.remove(&shard),
        };
        self.adopted.store(Arc::new(adopted));
        if let Some(old) = &old {
            self.unsummarize(old, |_| true)?;
        }
        // (One of the same cut was replaced by the rename.)
        if let Some(old) = old.filter(|old| generation.as_ref().is_none_or(|g| g.path != old.path)) {
            std::fs::remove_file(&old.path).map_err(io(&old.path))?;
        }
        self.save_summary();
        Ok(generation.map(|g| g.span))
    }

    /// Puts in place of the generation of `span` (damaged, or left out at
    /// open) one written from `entries` (the same span, rebuilt from the
    /// journal).
    ///
    /// # Errors
    ///
    /// The new one could not be written; the damaged one stays (and its
    /// lookups keep failing).
    pub fn rebuild(&self, span: Span, shards: Vec<ShardIds>) -> Result<Span, SealedError> {
        self.rebuild_with(span, |writer| write_shards(writer, shards))
    }

    /// [`Self::rebuild`] from the ids `reader` holds in the span, sorted as
    /// [`Self::seal_journal`] sorts them.
    ///
    /// # Errors
    ///
    /// As [`Self::seal_journal`].
    pub fn rebuild_journal(&self, reader: &dyn JournalReader, span: Span) -> Result<Span, SealedError> {
        self.rebuild_with(span, |writer| {
            write_journal(
                writer,
                reader,
                (span.from_ms, span.cut_ms),
                &self.dir,
                SORT_IN_RAM_IDS,
            )
        })
    }

    /// A rebuild whose ids `fill` writes.
    fn rebuild_with(
        &self,
        span: Span,
        fill: impl FnOnce(&mut Writer) -> Result<(), SealedError>,
    ) -> Result<Span, SealedError> {
        let _changing = lock(&self.changing);
        let mut writer = Writer::create(&self.dir, span.from_ms, span.cut_ms)?.with_filter(self.filter);
        fill(&mut writer)?;
        let (path, new) = writer.finish()?;
        // The damaged file's entries stay in the summary: it cannot be read
        // to remove them, and more is never wrong.
        let generation = self.open_new(&path)?;
        let same = |g: &Arc<Generation>| (g.span.from_ms, g.span.cut_ms) == (span.from_ms, span.cut_ms);
        self.generations.rcu(|gs| {
            let mut gs: Vec<_> = gs.iter().filter(|g| !same(g)).cloned().collect();
            gs.push(generation.clone());
            gs.sort_by_key(|g| g.span.cut_ms);
            gs
        });
        let _ = std::fs::remove_file(path.with_extension("damaged"));
        self.save_summary();
        Ok(new)
    }

    /// Calls `f` with every file: the generations, then the adopted ones.
    fn each_file<T: std::iter::Sum<T>>(&self, f: impl Fn(&Generation) -> T) -> T {
        let (generations, adopted) = (self.generations.load(), self.adopted.load());
        generations.iter().chain(adopted.values()).map(|g| f(g)).sum()
    }

    /// Ids in every file (some may have expired already).
    pub fn ids(&self) -> u64 {
        self.each_file(|g| g.span.ids)
    }

    /// Files of sealed ids: the generations and the adopted files.
    pub fn files(&self) -> u64 {
        self.each_file(|_| 1)
    }

    /// RAM the filters (the summary's too) and fences take.
    pub fn memory_bytes(&self) -> usize {
        self.each_file(Generation::memory_bytes)
            + self.summary.as_ref().map_or(0, summary::Summary::memory_bytes)
    }

    /// Bytes on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.each_file(Generation::disk_bytes)
    }
}

impl Older for Sealed {
    fn born_ms(&self, shard: u32, fp: Fingerprint, horizon_ms: u64) -> Result<Option<u64>, String> {
        Sealed::born_ms(self, shard, fp, horizon_ms).map_err(|e| e.to_string())
    }

    fn memory_bytes(&self) -> usize {
        Sealed::memory_bytes(self)
    }

    fn born_many(
        &self,
        shard: u32,
        fps: &[Fingerprint],
        horizon_ms: u64,
        out: &mut Vec<Option<u64>>,
    ) -> Result<(), String> {
        Sealed::born_many(self, shard, fps, horizon_ms, out).map_err(|e| e.to_string())
    }

    fn forget(&self, shard: u32, fp: Fingerprint, at_ms: u64) {
        Sealed::forget(self, shard, fp, at_ms);
    }

    fn figures(&self) -> crate::engine::dedup::TierFigures {
        crate::engine::dedup::TierFigures {
            ids: self.ids(),
            generations: self.files(),
            memory_bytes: self.memory_bytes() as u64,
            disk_bytes: self.disk_bytes(),
            filter_probes: self.filter_probes.load(Relaxed),
            block_reads: self.block_reads.load(Relaxed),
        }
    }
}

/// Per group of the summary, the files holding its shards, each named with
/// its footer's checksum (which tells it from another of the same name: a
/// rebuild, a merge renamed over an input).
fn covered_by_groups(files: &[Arc<Generation>]) -> Vec<Vec<String>> {
    let mut groups = vec![Vec::new(); summary::GROUPS as usize];
    for g in files {
        let name = g.path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let name = format!("{name} {:016x}", g.footer_sum);
        let mut of: Vec<usize> = g.shards_held().map(summary::group_of).collect();
        of.sort_unstable();
        of.dedup();
        for group in of {
            groups[group].push(name.clone());
        }
    }
    groups
}

/// Ids a seal (or rebuild) from the journal sorts in RAM at once, 32
/// bytes each (128 MiB). A longer span is spread over [`SORT_BUCKETS`]
/// files by shard (contiguous ranges of shards, each about as many ids, as
/// the first ids showed them), and each file is then sorted in RAM in
/// turn: a seal's RAM is about `span / SORT_BUCKETS` ids, whatever the
/// span, for one more write and read of it.
pub const SORT_IN_RAM_IDS: usize = 1 << 22;

/// Files a long span is spread over while it is sorted.
const SORT_BUCKETS: usize = 64;

/// Writes the ids `reader` holds from `from_ms` to `cut_ms` to `writer`,
/// in `(shard, fingerprint, arrival)` order: in RAM up to `in_ram` of
/// them, else through bucket files in `dir` (deleted when done, or by
/// [`Sealed::open`] after a crash).
///
/// # Errors
///
/// The journal cannot be read, a bucket cannot be written or read back,
/// or the writer fails.
fn write_journal(
    writer: &mut Writer,
    reader: &dyn JournalReader,
    (from_ms, cut_ms): (u64, u64),
    dir: &Path,
    in_ram: usize,
) -> Result<(), SealedError> {
    let mut counts: BTreeMap<u32, u64> = BTreeMap::new();
    let mut sorter = SpanSorter {
        dir: dir.to_path_buf(),
        name: format!("sort-{from_ms}-{cut_ms}"),
        in_ram: in_ram.max(1),
        buf: Vec::new(),
        buckets: Vec::new(),
        bounds: Vec::new(),
        failed: None,
    };
    reader
        .scan_span(from_ms, cut_ms, &mut |r| {
            *counts.entry(r.shard).or_default() += 1;
            sorter.push(Entry {
                shard: r.shard,
                fingerprint: r.fingerprint,
                born_ms: r.born_ms,
            });
        })
        .map_err(|e| {
            SealedError::Io(
                dir.to_path_buf(),
                std::io::Error::other(format!("reading the journal: {e}")),
            )
        })?;
    let mut shard = None;
    for entry in sorter.sorted()? {
        let entry = entry?;
        if shard != Some(entry.shard) {
            writer.begin_shard(entry.shard, counts[&entry.shard])?;
            shard = Some(entry.shard);
        }
        writer.push(entry)?;
    }
    Ok(())
}

/// A span's entries being sorted: in RAM until there are `in_ram` of
/// them, then spread over bucket files by shard.
struct SpanSorter {
    dir: PathBuf,
    name: String,
    in_ram: usize,
    buf: Vec<Entry>,
    /// The bucket files (empty while the span fits in RAM): each one's
    /// path, writer and entries.
    buckets: Vec<(PathBuf, BufWriter<File>, usize)>,
    /// The first shard of each bucket after the first.
    bounds: Vec<u32>,
    /// The first failure to write a bucket; later entries are dropped.
    failed: Option<SealedError>,
}

impl SpanSorter {
    fn push(&mut self, entry: Entry) {
        if self.failed.is_some() {
            return;
        }
        let written = if self.buckets.is_empty() {
            self.buf.push(entry);
            if self.buf.len() < self.in_ram {
                return;
            }
            self.spread()
        } else {
            self.write(entry)
        };
        if let Err(e) = written {
            self.failed = Some(e);
        }
    }

    /// Opens the bucket files, their shard ranges cut where the entries
    /// so far have about equal shares, and moves the entries there.
    fn spread(&mut self) -> Result<(), SealedError> {
        let mut per_shard: BTreeMap<u32, usize> = BTreeMap::new();
        for e in &self.buf {
            *per_shard.entry(e.shard).or_default() += 1;
        }
        let share = self.buf.len().div_ceil(SORT_BUCKETS);
        let mut filled = 0;
        for (&shard, &n) in &per_shard {
            if filled >= share && self.bounds.len() + 1 < SORT_BUCKETS {
                self.bounds.push(shard);
                filled = 0;
            }
            filled += n;
        }
        for i in 0..=self.bounds.len() {
            let path = self.dir.join(format!("{}-{i}.tmp", self.name));
            let file = File::create(&path).map_err(io(&path))?;
            self.buckets
                .push((path, BufWriter::with_capacity(1 << 18, file), 0));
        }
        for entry in std::mem::take(&mut self.buf) {
            self.write(entry)?;
        }
        Ok(())
    }

    fn write(&mut self, entry: Entry) -> Result<(), SealedError> {
        let (path, out, n) = &mut self.buckets[self.bounds.partition_point(|&b| b <= entry.shard)];
        let mut record = [0u8; ENTRY];
        entry.write(&mut record);
        *n += 1;
        out.write_all(&record).map_err(io(path))
    }

    /// Every entry in order: the ones in RAM sorted, or each bucket read
    /// back and sorted in turn.
    fn sorted(mut self) -> Result<Sorted, SealedError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let (mut buckets, mut flushed) = (std::collections::VecDeque::new(), Ok(()));
        for (path, mut out, n) in std::mem::take(&mut self.buckets) {
            if flushed.is_ok() {
                flushed = out.flush().map_err(io(&path));
            }
            buckets.push_back((path, n));
        }
        let mut buffered = std::mem::take(&mut self.buf);
        buffered.sort_unstable();
        // Built first, so that its drop deletes the files on an error.
        let sorted = Sorted {
            current: buffered.into_iter(),
            buckets,
        };
        flushed.map(|()| sorted)
    }
}

impl Drop for SpanSorter {
    fn drop(&mut self) {
        for (path, ..) in &self.buckets {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A span's entries in order: the bucket being read, then the ones left
/// (their files deleted as they are read, or on drop).
struct Sorted {
    current: std::vec::IntoIter<Entry>,
    buckets: std::collections::VecDeque<(PathBuf, usize)>,
}

impl Sorted {
    /// The next bucket's entries, sorted; its file deleted.
    fn read_next(&mut self) -> Result<bool, SealedError> {
        let Some((path, n)) = self.buckets.pop_front() else {
            return Ok(false);
        };
        let read = || -> std::io::Result<Vec<Entry>> {
            let mut bytes = Vec::with_capacity(n * ENTRY);
            File::open(&path)?.read_to_end(&mut bytes)?;
            if bytes.len() != n * ENTRY {
                let why = format!("{} bytes where {} entries were written", bytes.len(), n);
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, why));
            }
            Ok(bytes.chunks_exact(ENTRY).map(Entry::read).collect())
        };
        let entries = read();
        let _ = std::fs::remove_file(&path);
        let mut entries = entries.map_err(io(&path))?;
        entries.sort_unstable();
        self.current = entries.into_iter();
        Ok(true)
    }
}

impl Iterator for Sorted {
    type Item = Result<Entry, SealedError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(entry) = self.current.next() {
                return Some(Ok(entry));
            }
            match self.read_next() {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => {
                    self.buckets.clear();
                    return Some(Err(e));
                }
            }
        }
    }
}

impl Drop for Sorted {
    fn drop(&mut self) {
        for (path, _) in &self.buckets {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl crate::observe::metrics::Render for Sealed {
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let gauges = [
            (
                "sealed_generations",
                "Files of ids moved out of RAM: sealed generations, and ids adopted from the journal stream at takeovers.",
                self.files(),
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

mod summary;

#[cfg(test)]
mod tests;
