//! The in-memory hash-to-expiry table of one shard.
//!
//! Pure: no I/O, no clock. The caller passes `now` in milliseconds (any
//! monotonic-enough clock; the engine uses Unix time so that persisted times
//! survive restarts). A clock that steps back is clamped to the latest `now`
//! seen, so time inside a table never runs backwards.
//!
//! # Layout
//!
//! The table is an array of *segments*, chosen by the fingerprint's `hi`
//! half. A segment is a bucketised cuckoo hash table: buckets of 8 slots,
//! and every entry has two candidate buckets, one from the high and one from
//! the low bits of its tag. A slot is 10 bytes: the 64-bit tag (the
//! fingerprint's `lo` half; 0 marks an empty slot and 1 a removed one) and
//! the arrival time as a 16-bit offset from the segment's *floor*, a time no
//! later than any entry's arrival. A bucket is 80 bytes.
//!
//! # Time units
//!
//! Times are counted in units of `u = ceil(window / 30 000)` ms, at least 1:
//! to the millisecond for windows up to 30 s, 20 160 ms for a week. An
//! arrival is stored as the unit it falls in, and an entry is alive while
//! `now_unit - born_unit < ceil((window - 1) / u) + 1`. With 1-ms units that
//! is exactly `now - born < window`. With longer units an id is remembered
//! at least the window and forgotten less than `2u + 1` ms after it, which
//! is within the promised `max(10 ms, window / 10 000)` (for windows of
//! 30–100 s, `2u + 1 ≤ 9` ms; above, `u ≤ window / 30 000 + 1`). A window
//! is at most 30 001 units, so the floor is moved up (the segment rebuilt)
//! before `now` is 60 000 units past it, and offsets fit in 16 bits.
//!
//! A window change switches the unit; each segment converts when it is next
//! rebuilt, taking every birth as the last millisecond its old unit covers,
//! so a change never shortens a memory. Entries stored before a window
//! shrinks keep their old precision: they may be remembered up to one old
//! unit (window / 30 000 of the old window) longer than the new window.
//!
//! A lookup reads at most two buckets, whatever the load. An insert takes a
//! free slot in either bucket: preferably one whose entry is dead or
//! removed (so expired entries make room in place), else a never-used one in
//! the emptier bucket. When both buckets hold live entries only, it moves an
//! entry to its other bucket, and so on for at most `MAX_KICKS` moves;
//! after that the segment grows.
//!
//! An entry is *alive* while `now - born < window`. Expired entries are not
//! removed at once: a lookup treats them as absent and an insert reuses
//! their slots. When a segment's slots in use (live, dead or removed) reach
//! 93 %, the slots of dead entries are emptied in place; a lookup never
//! stops at an empty slot, so nothing moves. Only when its live entries
//! alone are above 87 % (or an insert finds no slot) is the segment
//! *rebuilt*: dead entries dropped and the capacity resized to 80 % load.
//! [`Table::sweep`] does the same for segments that see no inserts. Purges
//! and rebuilds touch one segment only, so their pause is bounded by the
//! segment size, not the table size (about 5 000 entries per segment at
//! 10 M live ids with 2048 segments: a rebuild costs 15–20 ns per slot,
//! about 0.1 ms; a chain of moves at most 64 cache misses).
//!
//! A growing segment runs between 80 % and 93 % full, so a live id costs
//! 10.8–12.5 bytes of slots, growth headroom included.

use crate::engine::fingerprint::Fingerprint;

/// Longest supported window: one week.
pub const MAX_WINDOW_MS: u64 = 7 * 24 * 3600 * 1000;

const SLOTS: usize = 8;
const EMPTY: u64 = 0;
const REMOVED: u64 = 1;
/// Load (in percent of slots) a rebuilt segment starts at.
const TARGET_LOAD_PCT: usize = 80;
/// Load (in percent, dead entries included) at which a segment is purged of
/// its dead entries before taking a new slot.
const MAX_LOAD_PCT: usize = 93;
/// Load (in percent) above which a purged segment is rebuilt larger: between
/// the two above, so that a segment with as many ids arriving as expiring
/// is purged in place, not reallocated each time.
const PURGED_LOAD_PCT: usize = 87;
/// Arrival times are kept as 16-bit offsets from a segment's floor, in
/// *units* of [`unit_for`] milliseconds; a segment is rebuilt (rebased)
/// before `now` is this many units past its floor.
const REBASE_AFTER: u64 = 60_000;
/// A window is this many units at most, so offsets up to twice the window
/// fit in 16 bits.
const UNITS_PER_WINDOW: u64 = 30_000;
type Born = u16;

/// The time unit for `window_ms`: 1 ms for windows up to 30 s, else
/// window / 30 000 rounded up (20 160 ms for a week).
fn unit_for(window_ms: u64) -> u64 {
    window_ms.div_ceil(UNITS_PER_WINDOW).max(1)
}

/// The window in units: an entry born in unit `b` is alive in unit `n`
/// while `n - b` is below it. Exact for 1-ms units; for longer units every
/// id is remembered at least the window and forgotten at most two units
/// after it (see the module docs).
fn window_units(window_ms: u64, unit: u64) -> u64 {
    if unit == 1 {
        window_ms
    } else {
        window_ms.saturating_sub(1).div_ceil(unit) + 1
    }
}

/// The moment an operation runs at, as the table counts it: worked out
/// once per operation or batch, so that deciding an id divides nothing.
#[derive(Clone, Copy)]
struct At {
    /// The table's clock, in milliseconds.
    ms: u64,
    /// The window that applies at `ms`, in milliseconds.
    window_ms: u64,
    /// The table's unit, and `ms` and the window in it.
    unit: u64,
    units: u64,
    window: u64,
}

impl At {
    fn new(ms: u64, window_ms: u64, unit: u64) -> Self {
        Self {
            ms,
            window_ms,
            unit,
            units: ms / unit,
            window: window_units(window_ms, unit),
        }
    }
}

/// The answer to a check-and-insert.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not seen within the window; now remembered from `now`.
    New,
    /// Seen within the window; nothing changed.
    Duplicate,
}

impl Verdict {
    pub fn is_new(self) -> bool {
        self == Verdict::New
    }
}

#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct Bucket {
    tags: [u64; SLOTS],
    born: [Born; SLOTS],
}

impl Bucket {
    const EMPTY: Bucket = Bucket {
        tags: [EMPTY; SLOTS],
        born: [0; SLOTS],
    };
}

struct Segment {
    buckets: Box<[Bucket]>,
    /// Slots holding a tag, live, dead or removed.
    used: usize,
    /// No entry of this segment was born before this time, in units;
    /// births are stored as offsets from it.
    floor: u64,
    /// Milliseconds per unit of this segment's times; it follows the
    /// table's window when the segment is next rebuilt.
    unit: u64,
}

/// Where a lookup ended.
enum Probe {
    Found(usize, usize),
    Absent,
}

impl Bucket {
    /// Slots holding `tag`, as a bit mask (at most one bit is set: a tag is
    /// stored once per segment).
    #[inline]
    fn matches(&self, tag: u64) -> u32 {
        let mut mask = 0;
        for s in 0..SLOTS {
            mask |= u32::from(self.tags[s] == tag) << s;
        }
        mask
    }

    /// Slots never used, and slots that can be reused (removed or dead), as
    /// two bit masks.
    #[inline]
    fn free(&self, now: u64, window: u64) -> (u32, u32) {
        let (mut empty, mut reusable) = (0, 0);
        for s in 0..SLOTS {
            let t = self.tags[s];
            empty |= u32::from(t == EMPTY) << s;
            reusable |= u32::from(t == REMOVED || (t > REMOVED && !alive(now, self.born[s], window))) << s;
        }
        (empty, reusable)
    }
}

/// Longest chain of moves an insert makes before the segment grows instead.
const MAX_KICKS: usize = 64;

impl Segment {
    fn capacity(&self) -> usize {
        self.buckets.len() * SLOTS
    }

    /// Readies the segment for one more entry. A segment whose slots in
    /// use reach [`MAX_LOAD_PCT`] first empties the slots of its dead
    /// entries in place (a lookup never stops at an empty slot, so this
    /// needs no moves); it is rebuilt only when its live entries alone are
    /// above [`PURGED_LOAD_PCT`], or when its floor is too old.
    ///
    /// Afterwards the segment counts in the table's unit, `at.unit`.
    #[inline]
    fn make_room(&mut self, at: &At) {
        let full = |seg: &Segment, pct| (seg.used + 1) * 100 > seg.capacity() * pct;
        if self.buckets.is_empty() || self.unit != at.unit || self.now(at) >= REBASE_AFTER {
            self.rebuild(at, None);
        } else if full(self, MAX_LOAD_PCT) {
            self.purge(self.now(at), at.window);
            if full(self, PURGED_LOAD_PCT) {
                self.rebuild(at, None);
            }
        }
    }

    /// Empties the slots of dead and removed entries; returns how many.
    fn purge(&mut self, now: u64, window: u64) -> usize {
        let mut freed = 0;
        for bucket in self.buckets.iter_mut() {
            let (_, reusable) = bucket.free(now, window);
            for s in 0..SLOTS {
                if reusable & (1 << s) != 0 {
                    bucket.tags[s] = EMPTY;
                }
            }
            freed += reusable.count_ones() as usize;
        }
        self.used -= freed;
        freed
    }

    /// `at` in this segment's units after its floor (never negative: the
    /// table's clock only moves forward and the floor is at most the latest
    /// `now`).
    #[inline]
    fn now(&self, at: &At) -> u64 {
        let units = if self.unit == at.unit {
            at.units
        } else {
            at.ms / self.unit
        };
        units.saturating_sub(self.floor)
    }

    /// The window at `at` in this segment's units.
    #[inline]
    fn window(&self, at: &At) -> u64 {
        if self.unit == at.unit {
            at.window
        } else {
            window_units(at.window_ms, self.unit)
        }
    }

    fn live_entries(&self, now: u64, window: u64) -> impl Iterator<Item = (u64, Born)> + '_ {
        live_entries(&self.buckets, now, window)
    }

    /// Lowers the floor to `floor`, re-expressing every offset. Callers
    /// keep `now - floor` within the window, so offsets still fit.
    fn lower_floor(&mut self, floor: u64) {
        let delta = (self.floor - floor) as Born;
        for bucket in self.buckets.iter_mut() {
            for (t, born) in bucket.tags.iter().zip(bucket.born.iter_mut()) {
                if *t > REMOVED {
                    *born += delta;
                }
            }
        }
        self.floor = floor;
    }

    /// Looks `tag` up in its two buckets.
    #[inline]
    fn probe(&self, tag: u64) -> Probe {
        if self.buckets.is_empty() {
            return Probe::Absent;
        }
        let (b1, b2) = buckets_of(tag, self.buckets.len());
        for b in [b1, b2] {
            let m = self.buckets[b].matches(tag);
            if m != 0 {
                return Probe::Found(b, m.trailing_zeros() as usize);
            }
        }
        Probe::Absent
    }

    /// A free slot in bucket `b` and whether it was never used: a reusable
    /// one first, so that expired entries make room before fresh slots do.
    fn free_in(&self, b: usize, now: u64, window: u64) -> Option<(usize, bool)> {
        let (empty, reusable) = self.buckets[b].free(now, window);
        if reusable != 0 {
            Some((reusable.trailing_zeros() as usize, false))
        } else if empty != 0 {
            Some((empty.trailing_zeros() as usize, true))
        } else {
            None
        }
    }

    /// [`Segment::insert`], growing the segment when the entry finds no slot.
    /// The segment counts in `at.unit` (after [`Segment::make_room`]).
    fn insert_or_grow(&mut self, tag: u64, born: Born, at: &At) {
        if let Err(homeless) = self.insert(tag, born, self.now(at), at.window) {
            self.rebuild(at, Some(homeless));
        }
    }

    fn put(&mut self, b: usize, (s, fresh): (usize, bool), tag: u64, born: Born) {
        self.buckets[b].tags[s] = tag;
        self.buckets[b].born[s] = born;
        self.used += usize::from(fresh);
    }

    /// Stores `tag` (known to be absent): in a free slot of one of its two
    /// buckets, preferring a reusable slot, then the emptier bucket; when
    /// both are full, by moving entries to their other bucket (cuckoo
    /// hashing), at most `MAX_KICKS` times. On failure the entry left
    /// without a slot (`tag` itself or one it displaced) is returned.
    fn insert(&mut self, tag: u64, born: Born, now: u64, window: u64) -> Result<(), (u64, Born)> {
        let (b1, b2) = buckets_of(tag, self.buckets.len());
        let (f1, f2) = (
            self.buckets[b1].free(now, window),
            self.buckets[b2].free(now, window),
        );
        let pick = if f1.1 != 0 {
            Some((b1, f1.1.trailing_zeros() as usize, false))
        } else if f2.1 != 0 {
            Some((b2, f2.1.trailing_zeros() as usize, false))
        } else if f1.0 != 0 && f1.0.count_ones() >= f2.0.count_ones() {
            Some((b1, f1.0.trailing_zeros() as usize, true))
        } else if f2.0 != 0 {
            Some((b2, f2.0.trailing_zeros() as usize, true))
        } else {
            None
        };
        if let Some((b, s, fresh)) = pick {
            self.put(b, (s, fresh), tag, born);
            return Ok(());
        }
        // Both buckets hold live entries only: displace one and move it to
        // its other bucket, and so on. The victim slot varies with the step
        // and the tag so that the walk does not cycle between two entries.
        let (mut tag, mut born, mut b) = (tag, born, b1);
        for step in 0..MAX_KICKS {
            let s = (tag as usize).wrapping_add(step) % SLOTS;
            let bucket = &mut self.buckets[b];
            std::mem::swap(&mut tag, &mut bucket.tags[s]);
            std::mem::swap(&mut born, &mut bucket.born[s]);
            let (h1, h2) = buckets_of(tag, self.buckets.len());
            b = if h1 == b { h2 } else { h1 };
            if let Some(slot) = self.free_in(b, now, window) {
                self.put(b, slot, tag, born);
                return Ok(());
            }
        }
        Err((tag, born))
    }

    /// Drops dead and removed entries, resizes to [`TARGET_LOAD_PCT`],
    /// moves the floor up to the oldest live entry and switches to the
    /// table's unit. `extra` is an entry to add that found no slot (its
    /// birth an offset from the current floor).
    fn rebuild(&mut self, at: &At, extra: Option<(u64, Born)>) {
        let (now_ms, unit) = (at.ms, at.unit);
        let (now, window) = (self.now(at), self.window(at));
        let old = std::mem::take(&mut self.buckets);
        // A birth in the new unit: from the last millisecond the old unit
        // can stand for, so that a coarser past never shortens a memory.
        let (old_floor, old_unit, now_new) = (self.floor, self.unit, now_ms / unit);
        let rebirth =
            |born: Born| ((old_floor + u64::from(born)) * old_unit + old_unit - 1).min(now_ms) / unit;
        let entries = || {
            live_entries(&old, now, window)
                .chain(extra)
                .map(|(tag, born)| (tag, rebirth(born)))
        };
        let (count, oldest) = entries().fold((0usize, now_new), |(n, oldest), (_, born)| {
            (n + 1, oldest.min(born))
        });
        // Only after a window shrank a thousandfold can a live birth lie
        // further back than this; such an entry is dead in the new window.
        let floor = oldest.max(now_new.saturating_sub(REBASE_AFTER));
        let rebased = |born: u64| born.saturating_sub(floor) as Born;
        (self.floor, self.unit) = (floor, unit);
        let (now, window) = (self.now(at), at.window);
        let mut buckets = (count * 100).div_ceil(SLOTS * TARGET_LOAD_PCT).max(1);
        // Each entry goes to the emptier of its two buckets, counted in
        // `fill`; the few that find both full are inserted the usual way
        // afterwards. If even that fails, a slightly larger array takes them.
        'size: loop {
            self.buckets = vec![Bucket::EMPTY; buckets].into_boxed_slice();
            self.used = 0;
            let mut fill = vec![0u8; buckets];
            let mut crowded = Vec::new();
            for (tag, born) in entries() {
                let (b1, b2) = buckets_of(tag, buckets);
                let b = if fill[b1] <= fill[b2] { b1 } else { b2 };
                let s = usize::from(fill[b]);
                if s == SLOTS {
                    crowded.push((tag, rebased(born)));
                } else {
                    self.put(b, (s, true), tag, rebased(born));
                    fill[b] += 1;
                }
            }
            for (tag, born) in crowded {
                if self.insert(tag, born, now, window).is_err() {
                    buckets += buckets.div_ceil(16);
                    continue 'size;
                }
            }
            break;
        }
    }
}

/// The live entries of `buckets` at `now`: (tag, birth offset).
fn live_entries(buckets: &[Bucket], now: u64, window: u64) -> impl Iterator<Item = (u64, Born)> + '_ {
    buckets.iter().flat_map(move |bucket| {
        (0..SLOTS).filter_map(move |s| {
            let t = bucket.tags[s];
            (t > REMOVED && alive(now, bucket.born[s], window)).then_some((t, bucket.born[s]))
        })
    })
}

/// The two buckets of `tag` in an array of `n`: one from its high bits, one
/// from its low bits, so they are independent.
#[inline]
fn buckets_of(tag: u64, n: usize) -> (usize, usize) {
    (reduce(tag, n), reduce(tag.rotate_left(32), n))
}

/// `now` and `born` are offsets from the same floor, `born <= now`.
#[inline]
fn alive(now: u64, born: Born, window: u64) -> bool {
    now - u64::from(born) < window
}

/// Asks the CPU to bring a bucket's two cache lines in; a no-op elsewhere.
#[inline]
fn prefetch_read(bucket: &Bucket) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let p = std::ptr::from_ref(bucket).cast::<i8>();
        // SAFETY: a prefetch is a hint that never faults and reads nothing
        // into the program; SSE is part of the x86_64 baseline.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(size_of::<Bucket>() - 1));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bucket;
}

/// Maps a 64-bit value onto `0..n` by its high bits (Lemire's multiply-shift).
fn reduce(x: u64, n: usize) -> usize {
    ((u128::from(x) * n as u128) >> 64) as usize
}

fn tag_of(fp: Fingerprint) -> u64 {
    fp.lo.max(REMOVED + 1)
}

/// The hash-to-expiry table of one shard.
pub struct Table {
    /// Empty until the first insert or restore: an idle shard costs only
    /// this struct.
    segments: Vec<Segment>,
    /// How many segments the table has once it is used.
    segment_count: usize,
    window_ms: u64,
    /// Milliseconds per unit of stored times, from the window.
    unit: u64,
    /// Entries born before this were forgotten before a window increase and
    /// stay forgotten.
    dead_before_ms: u64,
    /// Entries born before this were moved to the sealed tier: this table
    /// no longer holds them (they are not dead for the window in force).
    sealed_before_ms: u64,
    last_now_ms: u64,
    sweep_cursor: usize,
}

impl Table {
    /// An empty table with `segments` segments (at least 1) and the given
    /// window. Nothing is allocated until the first insert or restore.
    ///
    /// # Panics
    ///
    /// If `window_ms` is zero or above [`MAX_WINDOW_MS`]; configuration
    /// validates the window before a table is made.
    pub fn new(window_ms: u64, segments: usize) -> Self {
        assert!(
            (1..=MAX_WINDOW_MS).contains(&window_ms),
            "window out of range: {window_ms} ms"
        );
        Self {
            segments: Vec::new(),
            segment_count: segments.max(1),
            window_ms,
            unit: unit_for(window_ms),
            dead_before_ms: 0,
            sealed_before_ms: 0,
            last_now_ms: 0,
            sweep_cursor: 0,
        }
    }

    /// Forgets every id and frees the segments, keeping the window and
    /// how far back ids are held: for a shard that leaves this node, or is
    /// about to be rebuilt from its journal.
    pub fn clear(&mut self) {
        self.segments = Vec::new();
        self.sweep_cursor = 0;
    }

    /// The current window in milliseconds.
    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// Changes the window at `now_ms`. A smaller window applies to existing
    /// entries at once; a larger one extends the entries alive at `now_ms`,
    /// while ids already forgotten stay forgotten.
    ///
    /// # Panics
    ///
    /// As [`Table::new`].
    pub fn set_window(&mut self, window_ms: u64, now_ms: u64) {
        assert!(
            (1..=MAX_WINDOW_MS).contains(&window_ms),
            "window out of range: {window_ms} ms"
        );
        let now_ms = self.clock(now_ms);
        if window_ms > self.window_ms {
            self.dead_before_ms = self
                .dead_before_ms
                .max((now_ms + 1).saturating_sub(self.window_ms));
        }
        self.window_ms = window_ms;
        self.unit = unit_for(window_ms);
    }

    /// Records that ids accepted before `ms` are no longer held (the
    /// journal the table was rebuilt from expired them): the window in
    /// force reaches back no further, however large the window set.
    pub fn held_since(&mut self, ms: u64) {
        self.dead_before_ms = self.dead_before_ms.max(ms);
    }

    /// Records that the ids born before `ms` were sealed (moved to the
    /// sealed tier, which answers for them from now on): this table drops
    /// them as if they had expired.
    pub fn sealed_before(&mut self, ms: u64) {
        self.sealed_before_ms = self.sealed_before_ms.max(ms);
    }

    /// The window in force at `now_ms`: the set window, or less while a
    /// larger one grows back over ids it no longer holds.
    pub fn window_in_force(&self, now_ms: u64) -> u64 {
        let now_ms = now_ms.max(self.last_now_ms);
        self.window_ms
            .min((now_ms + 1).saturating_sub(self.dead_before_ms))
    }

    /// The window as it applies to this table's entries at `now_ms`: an
    /// entry is alive while `now - born` is below it (this folds in
    /// `dead_before_ms` and `sealed_before_ms`).
    fn window_at(&self, now_ms: u64) -> u64 {
        self.window_ms
            .min((now_ms + 1).saturating_sub(self.dead_before_ms.max(self.sealed_before_ms)))
    }

    fn clock(&mut self, now_ms: u64) -> u64 {
        self.last_now_ms = self.last_now_ms.max(now_ms);
        self.last_now_ms
    }

    /// Allocates the (empty) segments on first use.
    #[inline]
    fn ensure_segments(&mut self) {
        if self.segments.is_empty() {
            self.segments = (0..self.segment_count)
                .map(|_| Segment {
                    buckets: Box::new([]),
                    used: 0,
                    floor: 0,
                    unit: self.unit,
                })
                .collect();
        }
    }

    /// The segment of `fp`, if the segments exist yet.
    fn segment(&self, fp: Fingerprint) -> Option<&Segment> {
        self.segments.get(reduce(fp.hi, self.segments.len()))
    }

    /// `now_ms` (already through [`Table::clock`]) as an [`At`].
    fn at(&self, now_ms: u64) -> At {
        At::new(now_ms, self.window_at(now_ms), self.unit)
    }

    /// Remembers `fp` from `now_ms` unless it is alive already: one operation.
    pub fn check_and_insert(&mut self, fp: Fingerprint, now_ms: u64) -> Verdict {
        self.ensure_segments();
        let now_ms = self.clock(now_ms);
        let at = self.at(now_ms);
        self.decide(fp, &at)
    }

    /// [`Table::check_and_insert`] for each fingerprint in order, appending
    /// the verdicts to `out`. Equivalent to calling it in a loop, but the
    /// buckets of later fingerprints are prefetched while earlier ones are
    /// decided, so the cache misses of a large table overlap.
    pub fn check_and_insert_batch(&mut self, fps: &[Fingerprint], now_ms: u64, out: &mut Vec<Verdict>) {
        const AHEAD: usize = 8;
        self.ensure_segments();
        let now_ms = self.clock(now_ms);
        let at = self.at(now_ms);
        out.reserve(fps.len());
        for fp in fps.iter().take(AHEAD) {
            self.prefetch(*fp);
        }
        for (i, fp) in fps.iter().enumerate() {
            if let Some(later) = fps.get(i + AHEAD) {
                self.prefetch(*later);
            }
            out.push(self.decide(*fp, &at));
        }
    }

    /// The check-and-insert itself, at a time already through
    /// [`Table::clock`], once the segments exist.
    #[inline]
    fn decide(&mut self, fp: Fingerprint, at: &At) -> Verdict {
        let tag = tag_of(fp);
        let i = reduce(fp.hi, self.segments.len());
        let seg = &mut self.segments[i];
        seg.make_room(at);
        let now = seg.now(at);
        match seg.probe(tag) {
            Probe::Found(b, s) => {
                let born = &mut seg.buckets[b].born[s];
                if alive(now, *born, at.window) {
                    return Verdict::Duplicate;
                }
                *born = now as Born;
            }
            Probe::Absent => seg.insert_or_grow(tag, now as Born, at),
        }
        Verdict::New
    }

    /// Hints the CPU to load the two buckets of `fp`.
    #[inline]
    fn prefetch(&self, fp: Fingerprint) {
        if let Some(seg) = self.segment(fp)
            && !seg.buckets.is_empty()
        {
            let (b1, b2) = buckets_of(tag_of(fp), seg.buckets.len());
            prefetch_read(&seg.buckets[b1]);
            prefetch_read(&seg.buckets[b2]);
        }
    }

    /// Whether `fp` is alive at `now_ms`, without changing anything.
    pub fn contains(&self, fp: Fingerprint, now_ms: u64) -> bool {
        let Some(seg) = self.segment(fp) else {
            return false;
        };
        let at = self.at(now_ms.max(self.last_now_ms));
        let (now, window) = (seg.now(&at), seg.window(&at));
        match seg.probe(tag_of(fp)) {
            Probe::Found(b, s) => alive(now, seg.buckets[b].born[s], window),
            Probe::Absent => false,
        }
    }

    /// When `fp` arrived (to the time unit the table keeps), if it is alive
    /// at `now_ms`; changes nothing.
    pub fn born_ms(&self, fp: Fingerprint, now_ms: u64) -> Option<u64> {
        let seg = self.segment(fp)?;
        let at = self.at(now_ms.max(self.last_now_ms));
        let (now, window) = (seg.now(&at), seg.window(&at));
        match seg.probe(tag_of(fp)) {
            Probe::Found(b, s) if alive(now, seg.buckets[b].born[s], window) => {
                Some((seg.floor + u64::from(seg.buckets[b].born[s])) * at.unit)
            }
            _ => None,
        }
    }

    /// Puts back an entry born at `born_ms` (recovery from the durable log).
    /// An entry already dead at `now_ms` is skipped; a later birth of the same
    /// fingerprint wins. Returns whether the entry is alive now.
    pub fn restore(&mut self, fp: Fingerprint, born_ms: u64, now_ms: u64) -> bool {
        let now_ms = self.clock(now_ms);
        let born_ms = born_ms.min(now_ms);
        let (at, tag) = (self.at(now_ms), tag_of(fp));
        if now_ms - born_ms >= at.window_ms {
            return false;
        }
        self.ensure_segments();
        let i = reduce(fp.hi, self.segments.len());
        let seg = &mut self.segments[i];
        seg.make_room(&at);
        let born = born_ms / at.unit;
        if born < seg.floor {
            seg.lower_floor(born);
        }
        let (now, born) = (seg.now(&at), (born - seg.floor) as Born);
        match seg.probe(tag) {
            Probe::Found(b, s) => {
                let old = &mut seg.buckets[b].born[s];
                if !alive(now, *old, at.window) || born > *old {
                    *old = born;
                }
            }
            Probe::Absent => seg.insert_or_grow(tag, born, &at),
        }
        true
    }

    /// Forgets `fp` (an insert whose durable commit failed). Returns whether
    /// it was present.
    pub fn remove(&mut self, fp: Fingerprint) -> bool {
        if self.segments.is_empty() {
            return false;
        }
        let i = reduce(fp.hi, self.segments.len());
        let seg = &mut self.segments[i];
        match seg.probe(tag_of(fp)) {
            Probe::Found(b, s) => {
                seg.buckets[b].tags[s] = REMOVED;
                true
            }
            Probe::Absent => false,
        }
    }

    /// Reclaims dead entries in up to `segments` segments, continuing where
    /// the previous call stopped: a segment is purged when at least an
    /// eighth of it is dead, and rebuilt when it is far larger than its live
    /// entries need or its floor is getting old. Returns how many entries
    /// were reclaimed.
    pub fn sweep(&mut self, now_ms: u64, segments: usize) -> usize {
        let now_ms = self.clock(now_ms);
        let at = self.at(now_ms);
        let mut reclaimed = 0;
        let count = self.segments.len();
        for _ in 0..segments.min(count) {
            let seg = &mut self.segments[self.sweep_cursor];
            self.sweep_cursor = (self.sweep_cursor + 1) % count;
            if seg.used == 0 {
                (seg.floor, seg.unit) = (at.units, at.unit);
                continue;
            }
            let (now, window) = (seg.now(&at), seg.window(&at));
            let live = seg.live_entries(now, window).count();
            let dead = seg.used - live;
            let oversized = live * 100 < seg.capacity() * TARGET_LOAD_PCT / 2 && seg.capacity() > SLOTS;
            if oversized || seg.unit != at.unit || now >= REBASE_AFTER / 2 {
                seg.rebuild(&at, None);
                reclaimed += dead;
            } else if dead * 8 >= seg.used {
                reclaimed += seg.purge(now, window);
            }
        }
        reclaimed
    }

    /// Slots in use: live entries plus dead ones not yet reclaimed.
    pub fn len(&self) -> usize {
        self.segments.iter().map(|s| s.used).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live entries at `now_ms`; walks the whole table.
    pub fn live(&self, now_ms: u64) -> usize {
        self.live_in(now_ms, 0..self.segments.len())
    }

    /// Live entries at `now_ms` in the segments `range` (clipped to the
    /// segments there are), so that a caller can walk a large table a few
    /// segments per lock.
    pub fn live_in(&self, now_ms: u64, range: std::ops::Range<usize>) -> usize {
        let at = self.at(now_ms.max(self.last_now_ms));
        let end = range.end.min(self.segments.len());
        self.segments[range.start.min(end)..end]
            .iter()
            .map(|s| s.live_entries(s.now(&at), s.window(&at)).count())
            .sum()
    }

    /// Segments the table has (none until it is first used).
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Heap bytes held by the table.
    pub fn memory_bytes(&self) -> usize {
        size_of::<Self>()
            + self.segments.len() * size_of::<Segment>()
            + self
                .segments
                .iter()
                .map(|s| s.buckets.len() * size_of::<Bucket>())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn fp(i: u64) -> Fingerprint {
        Fingerprint::of(&i.to_le_bytes())
    }

    #[test]
    fn bucket_is_80_bytes() {
        assert_eq!(size_of::<Bucket>(), 80);
    }

    #[test]
    fn a_full_segment_loses_no_entry() {
        // Four buckets, 32 slots: inserts past that move entries between
        // buckets and finally hand back the one entry left without a slot.
        let mut seg = Segment {
            buckets: vec![Bucket::EMPTY; 4].into_boxed_slice(),
            used: 0,
            floor: 0,
            unit: 1,
        };
        let mut sent = Vec::new();
        let homeless = (0..)
            .find_map(|i| {
                let tag = tag_of(fp(i));
                sent.push(tag);
                seg.insert(tag, 7, 10, 1000).err()
            })
            .unwrap();
        assert!(sent.len() > 28, "full after {} inserts", sent.len());
        assert_eq!(homeless.1, 7);
        let mut kept: Vec<u64> = seg.live_entries(10, 1000).map(|(tag, _)| tag).collect();
        kept.push(homeless.0);
        kept.sort_unstable();
        sent.sort_unstable();
        assert_eq!(kept, sent);
        assert!(
            sent.iter()
                .all(|&t| t == homeless.0 || matches!(seg.probe(t), Probe::Found(..)))
        );
    }

    #[test]
    fn an_unused_table_allocates_nothing() {
        let mut t = Table::new(MAX_WINDOW_MS, 2048);
        assert_eq!(t.memory_bytes(), size_of::<Table>());
        assert!(!t.contains(fp(1), 10));
        assert!(!t.remove(fp(1)));
        assert_eq!(t.sweep(10, 64), 0);
        assert!(t.check_and_insert(fp(1), 10).is_new());
        assert!(t.memory_bytes() >= size_of::<Table>() + 2048 * size_of::<Segment>());
        assert!(!t.check_and_insert(fp(1), 11).is_new());
    }

    #[test]
    fn steady_churn_reuses_the_slots_of_expired_entries() {
        // As many ids arrive as expire: once the segment has its size it is
        // purged in place, never reallocated.
        let mut t = Table::new(1000, 1);
        let mut arrays = Vec::new();
        for round in 0..40u64 {
            for i in 0..1000 {
                assert!(t.check_and_insert(fp(round * 1000 + i), round * 1000).is_new());
            }
            assert_eq!(t.live(round * 1000), 1000);
            arrays.push(t.segments[0].buckets.as_ptr());
        }
        assert!(
            arrays[3..].iter().all(|&a| a == arrays[3]),
            "reallocated under steady churn"
        );
        assert!((39_000..40_000).all(|i| t.contains(fp(i), 39_999)));
    }

    #[test]
    fn a_window_change_never_shortens_a_memory() {
        // One segment, so the inserts after the change rebuild it in the
        // new unit (20 160 ms for a week, 1 ms for 10 s).
        let (week, ten_s) = (MAX_WINDOW_MS, 10_000);
        let mut t = Table::new(week, 1);
        let born = 5_000_000_017;
        let _ = t.check_and_insert(fp(1), born);
        t.set_window(ten_s, born + 3);
        for i in 2..200 {
            let _ = t.check_and_insert(fp(i), born + 4);
        }
        assert_eq!(t.segments[0].unit, 1);
        assert!(t.contains(fp(1), born + ten_s - 1));
        // Stored to a week's precision, it may be remembered up to one old
        // unit longer, never less.
        assert!(!t.contains(fp(1), born + ten_s + 20_160));
        t.set_window(week, born + 5);
        for i in 200..400 {
            let _ = t.check_and_insert(fp(i), born + 6);
        }
        assert_eq!(t.segments[0].unit, 20_160);
        assert!(
            t.contains(fp(1), born + week - 1),
            "alive entries get the larger window"
        );
        assert!(t.contains(fp(300), born + 6 + week - 1));
        assert!(!t.contains(fp(300), born + 6 + week + week / 10_000));
    }

    #[test]
    fn remembers_for_the_window_exactly() {
        let mut t = Table::new(1000, 4);
        assert_eq!(t.check_and_insert(fp(1), 10_000), Verdict::New);
        assert_eq!(t.check_and_insert(fp(1), 10_999), Verdict::Duplicate);
        assert_eq!(t.check_and_insert(fp(1), 11_000), Verdict::New);
        assert_eq!(t.check_and_insert(fp(1), 11_500), Verdict::Duplicate);
    }

    #[test]
    fn smaller_window_applies_at_once_larger_extends_the_living() {
        let mut t = Table::new(10_000, 4);
        let _ = t.check_and_insert(fp(1), 0);
        let _ = t.check_and_insert(fp(2), 150);
        t.set_window(100, 200);
        assert!(!t.contains(fp(1), 200));
        assert!(t.contains(fp(2), 200));
        t.set_window(10_000, 200);
        assert!(!t.contains(fp(1), 200), "forgotten stays forgotten");
        assert!(t.contains(fp(2), 9_000), "alive entries get the larger window");
        assert!(!t.contains(fp(2), 10_150));
    }

    #[test]
    fn clock_steps_back_are_clamped() {
        let mut t = Table::new(1000, 1);
        let _ = t.check_and_insert(fp(1), 5000);
        assert_eq!(t.check_and_insert(fp(1), 1000), Verdict::Duplicate);
        assert_eq!(t.check_and_insert(fp(2), 1000), Verdict::New);
        assert!(t.contains(fp(2), 5999));
        assert!(!t.contains(fp(2), 6000));
    }

    #[test]
    fn grows_and_reclaims() {
        let mut t = Table::new(1000, 16);
        for i in 0..100_000 {
            assert!(t.check_and_insert(fp(i), 0).is_new());
        }
        assert_eq!(t.live(0), 100_000);
        let per_id = t.memory_bytes() as f64 / 100_000.0;
        assert!(per_id < 16.0, "{per_id} bytes per id");
        for i in 0..100_000 {
            assert_eq!(t.check_and_insert(fp(i), 999), Verdict::Duplicate);
        }
        let reclaimed = t.sweep(1000, 16);
        assert_eq!(reclaimed, 100_000);
        assert_eq!(t.len(), 0);
        assert!(t.memory_bytes() < 16 * size_of::<Bucket>() + 4096);
    }

    #[test]
    fn survives_clock_jumps_past_the_wrap() {
        let mut t = Table::new(MAX_WINDOW_MS, 2);
        let _ = t.check_and_insert(fp(7), 0);
        // 2^32 ms later a 32-bit wrapping age would be zero again.
        assert!(!t.contains(fp(7), 1 << 32));
        assert_eq!(t.check_and_insert(fp(7), 1 << 32), Verdict::New);
        assert_eq!(
            t.check_and_insert(fp(7), (1 << 32) + MAX_WINDOW_MS - 1),
            Verdict::Duplicate
        );
        assert_eq!(t.check_and_insert(fp(8), 3 << 32), Verdict::New);
        assert!(!t.contains(fp(7), 3 << 32));
    }

    #[test]
    fn remove_and_restore() {
        let mut t = Table::new(1000, 2);
        let _ = t.check_and_insert(fp(1), 100);
        assert!(t.remove(fp(1)));
        assert!(!t.remove(fp(1)));
        assert_eq!(t.check_and_insert(fp(1), 150), Verdict::New);
        assert!(!t.restore(fp(2), 0, 1500), "dead at restore time");
        assert!(t.restore(fp(3), 600, 1500));
        assert!(t.restore(fp(3), 900, 1500), "a later birth wins");
        assert!(t.contains(fp(3), 1899));
        assert!(!t.contains(fp(3), 1900));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8),
        Advance(u32),
        StepBack(u16),
        SetWindow(u32),
        Remove(u8),
        Restore(u8, u16),
        Sweep(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => any::<u8>().prop_map(Op::Insert),
            3 => (0u32..3000).prop_map(Op::Advance),
            1 => any::<u16>().prop_map(Op::StepBack),
            1 => (1u32..5000).prop_map(Op::SetWindow),
            1 => any::<u8>().prop_map(Op::Remove),
            1 => (any::<u8>(), any::<u16>()).prop_map(|(k, a)| Op::Restore(k, a)),
            1 => (1u8..8).prop_map(Op::Sweep),
        ]
    }

    /// The naive model: id -> birth, alive while `now - birth < window`.
    /// A window increase forgets nothing and revives nothing: the model
    /// drops what is dead at that moment.
    struct Model {
        born: HashMap<u8, u64, foldhash::fast::RandomState>,
        window: u64,
        now: u64,
        dead_before: u64,
    }

    impl Model {
        /// Whether an entry born at `born` is alive at `now` (at least the
        /// table's clock).
        fn alive_at(&self, born: u64, now: u64) -> bool {
            born >= self.dead_before && now.max(self.now) - born < self.window
        }

        fn alive(&self, k: u8, now: u64) -> bool {
            self.born.get(&k).is_some_and(|&b| self.alive_at(b, now))
        }
    }

    proptest! {
        /// Windows above 30 s keep times in coarser units: an id is still
        /// remembered for at least the window and forgotten no later than
        /// max(10 ms, window / 10 000) after it, through growth, purges and
        /// rebases.
        #[test]
        fn long_windows_stay_within_the_tolerance(
            window in 30_001u64..=MAX_WINDOW_MS,
            start in 0u64..1 << 45,
            steps in prop::collection::vec((0u64..1000, any::<bool>()), 1..300),
            segments in 1usize..3,
        ) {
            let tolerance = (window / 10_000).max(10);
            let mut t = Table::new(window, segments);
            let mut born: HashMap<u64, u64> = HashMap::new();
            let mut now = start;
            for (i, (advance, query)) in steps.into_iter().enumerate() {
                now += advance * window / 400;
                if query {
                    for (&k, &b) in &born {
                        let age = now - b;
                        if age < window {
                            prop_assert!(t.contains(fp(k), now), "forgotten at age {} of {}", age, window);
                            // The edges, looked at from now.
                            prop_assert!(t.contains(fp(k), b + window - 1), "forgotten before {}", window);
                            prop_assert!(!t.contains(fp(k), b + window + tolerance), "remembered past {}", window);
                        } else if age >= window + tolerance {
                            prop_assert!(!t.contains(fp(k), now), "remembered at age {} of {}", age, window);
                        }
                    }
                } else {
                    let k = i as u64 % 40;
                    let alive = born.get(&k).map(|&b| now - b);
                    let verdict = t.check_and_insert(fp(k), now);
                    match alive {
                        Some(age) if age < window => prop_assert_eq!(verdict, Verdict::Duplicate),
                        Some(age) if age < window + tolerance => {}
                        _ => prop_assert_eq!(verdict, Verdict::New),
                    }
                    if verdict.is_new() {
                        born.insert(k, now);
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn matches_a_naive_model(ops in prop::collection::vec(op(), 1..400), segments in 1usize..4) {
            let mut t = Table::new(1000, segments);
            let mut m = Model { born: HashMap::default(), window: 1000, now: 0, dead_before: 0 };
            let mut now = 1_000_000;
            for op in ops {
                if !matches!(op, Op::Advance(_) | Op::StepBack(_) | Op::Remove(_)) {
                    m.now = m.now.max(now);
                }
                match op {
                    Op::Insert(k) => {
                        let want = if m.alive(k, now) { Verdict::Duplicate } else {
                            m.born.insert(k, m.now);
                            Verdict::New
                        };
                        prop_assert_eq!(t.check_and_insert(fp(k.into()), now), want);
                    }
                    Op::Advance(d) => now += u64::from(d),
                    Op::StepBack(d) => now = now.saturating_sub(u64::from(d)),
                    Op::SetWindow(w) => {
                        t.set_window(w.into(), now);
                        if u64::from(w) > m.window {
                            m.dead_before = m.dead_before.max(m.now + 1 - m.window);
                        }
                        m.window = w.into();
                    }
                    Op::Remove(k) => {
                        let present = t.remove(fp(k.into()));
                        if m.alive(k, 0) { prop_assert!(present); }
                        m.born.remove(&k);
                    }
                    Op::Restore(k, age) => {
                        let born = m.now.saturating_sub(u64::from(age));
                        let alive_now = m.alive_at(born, now);
                        prop_assert_eq!(t.restore(fp(k.into()), born, now), alive_now);
                        if alive_now && (!m.alive(k, now) || m.born[&k] < born) {
                            m.born.insert(k, born);
                        }
                    }
                    Op::Sweep(n) => { t.sweep(now, n.into()); }
                }
                for k in [0u8, 1, 2, 77, 255] {
                    prop_assert_eq!(t.contains(fp(k.into()), now), m.alive(k, now), "key {}", k);
                }
            }
            let live = (0..=255u8).filter(|&k| m.alive(k, now)).count();
            prop_assert_eq!(t.live(now), live);
        }
    }
}
