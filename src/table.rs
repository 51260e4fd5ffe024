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
//! half. A segment is a bucketised open-addressing table: buckets of 8 slots,
//! linear probing from bucket to bucket. A slot is 12 bytes: the 64-bit tag
//! (the fingerprint's `lo` half; 0 marks an empty slot and 1 a removed one)
//! and the arrival time as 32-bit milliseconds after the segment's *floor*, a
//! time no later than any entry's arrival. A bucket is 96 bytes.
//!
//! An entry is *alive* while `now - born < window`. Expired entries are not
//! removed at once: a lookup treats them as absent, an insert reuses the
//! first dead slot on its probe path, and the segment is *rebuilt* (dead
//! entries dropped, capacity resized) when it fills up or when
//! [`Table::sweep`] visits it. A rebuild touches one segment only, so its
//! pause is bounded by the segment size, not the table size (about 5 000
//! entries per segment at 10 M live ids with 2048 segments: tens of
//! microseconds).
//!
//! After a rebuild a segment is 80 % full and it is rebuilt again at 92 %, so
//! a live id costs 13.0–15.0 bytes of slots, growth headroom included.
//!
//! A segment is rebuilt (which moves its floor up to its oldest live entry)
//! before `now` gets 2^31 ms (24 days) past the floor, so offsets always fit
//! in 32 bits; the window is capped at [`MAX_WINDOW_MS`] to keep that true.

use crate::fingerprint::Fingerprint;

/// Longest supported window: one week.
pub const MAX_WINDOW_MS: u64 = 7 * 24 * 3600 * 1000;

const SLOTS: usize = 8;
const EMPTY: u64 = 0;
const REMOVED: u64 = 1;
/// Load (in percent of slots) a rebuilt segment starts at.
const TARGET_LOAD_PCT: usize = 80;
/// Load (in percent) at which a segment is rebuilt before taking a new slot.
const MAX_LOAD_PCT: usize = 92;
/// A segment whose floor is this far behind `now` is rebuilt before use.
const REBASE_AFTER_MS: u64 = 1 << 31;

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
#[repr(C, align(32))]
struct Bucket {
    tags: [u64; SLOTS],
    born: [u32; SLOTS],
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
    /// No entry of this segment was born before this time; births are
    /// stored as offsets from it.
    floor_ms: u64,
}

/// Where a probe ended.
enum Probe {
    Found(usize, usize),
    /// Not present; the slot to insert into and whether it was never used.
    Absent(usize, usize, bool),
}

impl Segment {
    fn capacity(&self) -> usize {
        self.buckets.len() * SLOTS
    }

    fn must_rebuild(&self, now_ms: u64) -> bool {
        (self.used + 1) * 100 > self.capacity() * MAX_LOAD_PCT || now_ms - self.floor_ms >= REBASE_AFTER_MS
    }

    /// `now` as an offset from the floor (never negative: the table's clock
    /// only moves forward and the floor is at most the latest `now`).
    fn offset(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.floor_ms)
    }

    fn live_entries(&self, now: u64, window: u64) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.buckets.iter().flat_map(move |bucket| {
            (0..SLOTS).filter_map(move |s| {
                let t = bucket.tags[s];
                (t > REMOVED && alive(now, bucket.born[s], window)).then_some((t, bucket.born[s]))
            })
        })
    }

    /// Lowers the floor to `floor_ms`, re-expressing every offset.
    /// Callers keep `now - floor_ms` below the window, so offsets still fit.
    fn lower_floor(&mut self, floor_ms: u64) {
        let delta = (self.floor_ms - floor_ms) as u32;
        for bucket in self.buckets.iter_mut() {
            for (t, born) in bucket.tags.iter().zip(bucket.born.iter_mut()) {
                if *t > REMOVED {
                    *born += delta;
                }
            }
        }
        self.floor_ms = floor_ms;
    }

    /// Looks `tag` up. The bucket array is never full (see `must_rebuild`),
    /// so the probe meets an empty slot and ends.
    fn probe(&self, tag: u64, now: u64, window: u64) -> Probe {
        let n = self.buckets.len();
        let mut b = bucket_of(tag, n);
        let mut reuse = None;
        loop {
            let bucket = &self.buckets[b];
            for s in 0..SLOTS {
                let t = bucket.tags[s];
                if t == tag {
                    return Probe::Found(b, s);
                }
                if t == EMPTY {
                    return match reuse {
                        Some((rb, rs)) => Probe::Absent(rb, rs, false),
                        None => Probe::Absent(b, s, true),
                    };
                }
                if reuse.is_none() && (t == REMOVED || !alive(now, bucket.born[s], window)) {
                    reuse = Some((b, s));
                }
            }
            b += 1;
            if b == n {
                b = 0;
            }
        }
    }

    fn put(&mut self, (b, s, fresh): (usize, usize, bool), tag: u64, born: u32) {
        self.buckets[b].tags[s] = tag;
        self.buckets[b].born[s] = born;
        if fresh {
            self.used += 1;
        }
    }

    /// Drops dead and removed entries, resizes to [`TARGET_LOAD_PCT`] and
    /// moves the floor up to the oldest live entry.
    fn rebuild(&mut self, now_ms: u64, window: u64) {
        let now = self.offset(now_ms);
        let live = self.live_entries(now, window).count();
        let oldest = self
            .live_entries(now, window)
            .map(|(_, born)| born)
            .min()
            .map_or(now, u64::from);
        let buckets = (live * 100).div_ceil(SLOTS * TARGET_LOAD_PCT).max(1);
        let mut fresh = vec![Bucket::EMPTY; buckets].into_boxed_slice();
        for (tag, born) in self.live_entries(now, window) {
            place(&mut fresh, tag, (u64::from(born) - oldest) as u32);
        }
        self.buckets = fresh;
        self.used = live;
        self.floor_ms += oldest;
    }
}

/// Puts `tag` in the first empty slot from its home bucket (rebuild only: no
/// duplicates, and the array has room).
fn place(buckets: &mut [Bucket], tag: u64, born: u32) {
    let n = buckets.len();
    let mut b = bucket_of(tag, n);
    loop {
        if let Some(s) = buckets[b].tags.iter().position(|&t| t == EMPTY) {
            buckets[b].tags[s] = tag;
            buckets[b].born[s] = born;
            return;
        }
        b += 1;
        if b == n {
            b = 0;
        }
    }
}

/// `now` and `born` are offsets from the same floor, `born <= now`.
#[inline]
fn alive(now: u64, born: u32, window: u64) -> bool {
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

fn bucket_of(tag: u64, n: usize) -> usize {
    reduce(tag, n)
}

fn tag_of(fp: Fingerprint) -> u64 {
    fp.lo.max(REMOVED + 1)
}

/// The hash-to-expiry table of one shard.
pub struct Table {
    segments: Box<[Segment]>,
    window_ms: u64,
    /// Entries born before this were forgotten before a window increase and
    /// stay forgotten.
    dead_before_ms: u64,
    last_now_ms: u64,
    sweep_cursor: usize,
}

impl Table {
    /// An empty table with `segments` segments (at least 1) and the given window.
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
        let segments = (0..segments.max(1))
            .map(|_| Segment {
                buckets: Box::new([]),
                used: 0,
                floor_ms: 0,
            })
            .collect();
        Self {
            segments,
            window_ms,
            dead_before_ms: 0,
            last_now_ms: 0,
            sweep_cursor: 0,
        }
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
    }

    /// The window as it applies at `now_ms`: an entry is alive while
    /// `now - born` is below it (this folds in `dead_before_ms`).
    fn window_at(&self, now_ms: u64) -> u64 {
        self.window_ms
            .min((now_ms + 1).saturating_sub(self.dead_before_ms))
    }

    fn clock(&mut self, now_ms: u64) -> u64 {
        self.last_now_ms = self.last_now_ms.max(now_ms);
        self.last_now_ms
    }

    fn segment_for(&mut self, fp: Fingerprint, now_ms: u64) -> &mut Segment {
        let window = self.window_at(now_ms);
        let seg = &mut self.segments[reduce(fp.hi, self.segments.len())];
        if seg.must_rebuild(now_ms) {
            seg.rebuild(now_ms, window);
        }
        seg
    }

    /// Remembers `fp` from `now_ms` unless it is alive already: one operation.
    pub fn check_and_insert(&mut self, fp: Fingerprint, now_ms: u64) -> Verdict {
        let now_ms = self.clock(now_ms);
        let (window, tag) = (self.window_at(now_ms), tag_of(fp));
        let seg = self.segment_for(fp, now_ms);
        let now = seg.offset(now_ms);
        match seg.probe(tag, now, window) {
            Probe::Found(b, s) => {
                let born = &mut seg.buckets[b].born[s];
                if alive(now, *born, window) {
                    return Verdict::Duplicate;
                }
                *born = now as u32;
            }
            Probe::Absent(b, s, fresh) => seg.put((b, s, fresh), tag, now as u32),
        }
        Verdict::New
    }

    /// [`Table::check_and_insert`] for each fingerprint in order, appending
    /// the verdicts to `out`. Equivalent to calling it in a loop, but the
    /// buckets of later fingerprints are prefetched while earlier ones are
    /// decided, so the cache misses of a large table overlap.
    pub fn check_and_insert_batch(&mut self, fps: &[Fingerprint], now_ms: u64, out: &mut Vec<Verdict>) {
        const AHEAD: usize = 12;
        out.reserve(fps.len());
        for fp in fps.iter().take(AHEAD) {
            self.prefetch(*fp);
        }
        for (i, fp) in fps.iter().enumerate() {
            if let Some(later) = fps.get(i + AHEAD) {
                self.prefetch(*later);
            }
            out.push(self.check_and_insert(*fp, now_ms));
        }
    }

    /// Hints the CPU to load the home bucket of `fp`.
    #[inline]
    fn prefetch(&self, fp: Fingerprint) {
        let seg = &self.segments[reduce(fp.hi, self.segments.len())];
        if let Some(bucket) = seg.buckets.get(bucket_of(tag_of(fp), seg.buckets.len())) {
            prefetch_read(bucket);
        }
    }

    /// Whether `fp` is alive at `now_ms`, without changing anything.
    pub fn contains(&self, fp: Fingerprint, now_ms: u64) -> bool {
        let seg = &self.segments[reduce(fp.hi, self.segments.len())];
        if seg.buckets.is_empty() {
            return false;
        }
        let now_ms = now_ms.max(self.last_now_ms);
        let (now, window) = (seg.offset(now_ms), self.window_at(now_ms));
        match seg.probe(tag_of(fp), now, window) {
            Probe::Found(b, s) => alive(now, seg.buckets[b].born[s], window),
            Probe::Absent(..) => false,
        }
    }

    /// Puts back an entry born at `born_ms` (recovery from the durable log).
    /// An entry already dead at `now_ms` is skipped; a later birth of the same
    /// fingerprint wins. Returns whether the entry is alive now.
    pub fn restore(&mut self, fp: Fingerprint, born_ms: u64, now_ms: u64) -> bool {
        let now_ms = self.clock(now_ms);
        let born_ms = born_ms.min(now_ms);
        let (window, tag) = (self.window_at(now_ms), tag_of(fp));
        if now_ms - born_ms >= window {
            return false;
        }
        let seg = self.segment_for(fp, now_ms);
        if born_ms < seg.floor_ms {
            seg.lower_floor(born_ms);
        }
        let (now, born) = (seg.offset(now_ms), (born_ms - seg.floor_ms) as u32);
        match seg.probe(tag, now, window) {
            Probe::Found(b, s) => {
                let old = &mut seg.buckets[b].born[s];
                if !alive(now, *old, window) || born > *old {
                    *old = born;
                }
            }
            Probe::Absent(b, s, fresh) => seg.put((b, s, fresh), tag, born),
        }
        true
    }

    /// Forgets `fp` (an insert whose durable commit failed). Returns whether
    /// it was present.
    pub fn remove(&mut self, fp: Fingerprint) -> bool {
        let (now_ms, window) = (self.last_now_ms, self.window_at(self.last_now_ms));
        let seg = &mut self.segments[reduce(fp.hi, self.segments.len())];
        if seg.buckets.is_empty() {
            return false;
        }
        match seg.probe(tag_of(fp), seg.offset(now_ms), window) {
            Probe::Found(b, s) => {
                seg.buckets[b].tags[s] = REMOVED;
                true
            }
            Probe::Absent(..) => false,
        }
    }

    /// Reclaims dead entries in up to `segments` segments, continuing where
    /// the previous call stopped; a segment is rebuilt when at least an
    /// eighth of it is dead or when it is far larger than its live entries
    /// need. Returns how many entries were reclaimed.
    pub fn sweep(&mut self, now_ms: u64, segments: usize) -> usize {
        let now_ms = self.clock(now_ms);
        let window = self.window_at(now_ms);
        let mut reclaimed = 0;
        let count = self.segments.len();
        for _ in 0..segments.min(count) {
            let seg = &mut self.segments[self.sweep_cursor];
            self.sweep_cursor = (self.sweep_cursor + 1) % count;
            if seg.used == 0 {
                seg.floor_ms = now_ms;
                continue;
            }
            let live = seg.live_entries(seg.offset(now_ms), window).count();
            let dead = seg.used - live;
            let oversized = live * 100 < seg.capacity() * TARGET_LOAD_PCT / 2 && seg.capacity() > SLOTS;
            if dead * 8 >= seg.used || oversized || now_ms - seg.floor_ms >= REBASE_AFTER_MS / 2 {
                seg.rebuild(now_ms, window);
                reclaimed += dead;
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
        let now_ms = now_ms.max(self.last_now_ms);
        self.segments
            .iter()
            .map(|s| s.live_entries(s.offset(now_ms), self.window_at(now_ms)).count())
            .sum()
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
    fn bucket_is_96_bytes() {
        assert_eq!(size_of::<Bucket>(), 96);
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
        assert!(t.memory_bytes() < 16 * 96 + 4096);
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
