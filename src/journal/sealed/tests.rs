use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn fp(hi: u64, lo: u64) -> Fingerprint {
    Fingerprint { hi, lo }
}

fn entry(shard: u32, fingerprint: Fingerprint, born_ms: u64) -> Entry {
    Entry {
        shard,
        fingerprint,
        born_ms,
    }
}

/// Id `i` (`id<i>`) of `shards` shards, arrived at `1_000 + i`.
fn spread(i: u64, shards: u64) -> Entry {
    entry(
        (i % shards) as u32,
        Fingerprint::of(format!("id{i}").as_bytes()),
        1_000 + i,
    )
}

fn sorted(mut entries: Vec<Entry>) -> Vec<Entry> {
    entries.sort();
    entries
}

#[test]
fn every_sealed_id_is_found_with_its_arrival_and_absent_ids_rarely_read_a_block() {
    // Absent ids reading a block at most (per 10 000), and RAM per id.
    found_and_rarely_read(FilterBits::Eight, 100, 1.0..1.5);
    found_and_rarely_read(FilterBits::Sixteen, 1, 2.0..2.6);
}

fn found_and_rarely_read(bits: FilterBits, reads_per_10k: u64, ram: std::ops::Range<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let sealed = Sealed::open(dir.path()).unwrap().with_filter(bits);
    // Three partitions' worth, over 8 shards.
    let n = 150_000u64;
    let ids: Vec<Entry> = (0..n).map(|i| spread(i, 8)).collect();
    let span = sealed.seal(by_shard(&sorted(ids.clone())), 200_000).unwrap();
    assert_eq!(span.ids, n);
    assert_eq!((span.oldest_ms, span.newest_ms), (1_000, 1_000 + n - 1));
    for e in &ids {
        assert_eq!(
            sealed.born_ms(e.shard, e.fingerprint, 0).unwrap(),
            Some(e.born_ms)
        );
    }
    let reads_before = sealed.block_reads.load(Relaxed);
    for i in 0..n {
        let absent = Fingerprint::of(format!("other{i}").as_bytes());
        assert_eq!(sealed.born_ms((i % 8) as u32, absent, 0).unwrap(), None);
        // Present under another shard only.
        let elsewhere = ids[i as usize];
        assert_eq!(
            sealed
                .born_ms(elsewhere.shard + 8, elsewhere.fingerprint, 0)
                .unwrap(),
            None
        );
    }
    let reads = sealed.block_reads.load(Relaxed) - reads_before;
    assert!(
        reads <= 2 * n * reads_per_10k / 10_000,
        "{bits:?}: {reads} block reads for {} absent ids",
        2 * n
    );
    // In RAM: the filters and fences.
    let per_id = sealed.memory_bytes() as f64 / n as f64;
    assert!(
        ram.contains(&per_id),
        "{bits:?}: {per_id} bytes of RAM per sealed id"
    );
    // Reopened, each file reads its own width.
    drop(sealed);
    let sealed = Sealed::open(dir.path()).unwrap();
    let e = ids[77];
    assert_eq!(
        sealed.born_ms(e.shard, e.fingerprint, 0).unwrap(),
        Some(e.born_ms)
    );
    assert_eq!(sealed.memory_bytes() as f64 / n as f64, per_id);
}

#[test]
fn a_summary_over_several_files_is_probed_once_per_id_and_follows_seals_merges_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = Sealed::open_summarized(dir.path(), 8).unwrap();
    let id = |i: u64| spread(i, 8);
    // Four files of 40 000 ids.
    let per_file = 40_000u64;
    for f in 0..4 {
        let ids: Vec<Entry> = (f * per_file..(f + 1) * per_file).map(id).collect();
        sealed
            .seal(by_shard(&sorted(ids)), 1_000 + (f + 1) * per_file)
            .unwrap();
    }
    let n = 4 * per_file;
    assert_eq!(sealed.files(), 4);
    let summary = sealed.summary.as_ref().expect("a summary");
    assert_eq!(summary.ids(), n);
    for e in (0..n).map(id) {
        assert_eq!(
            sealed.born_ms(e.shard, e.fingerprint, 0).unwrap(),
            Some(e.born_ms)
        );
    }
    let (probes, reads) = (
        sealed.filter_probes.load(Relaxed),
        sealed.block_reads.load(Relaxed),
    );
    for i in 0..n {
        let absent = Fingerprint::of(format!("other{i}").as_bytes());
        assert_eq!(sealed.born_ms((i % 8) as u32, absent, 0).unwrap(), None);
    }
    // One probe per id whatever the files; a false hit (about 0.01 %)
    // reads a block in each of the four.
    assert_eq!(sealed.filter_probes.load(Relaxed) - probes, n);
    let reads = sealed.block_reads.load(Relaxed) - reads;
    assert!(
        reads <= 4 * n * 3 / 10_000,
        "{reads} block reads for {n} absent ids"
    );
    let per_id = sealed.memory_bytes() as f64 / n as f64;
    assert!(
        (2.0..2.8).contains(&per_id),
        "{per_id} bytes of RAM per sealed id"
    );
    // A compaction first makes room in each shard's filter for another
    // seal like the last, so that the seal need not build it again.
    let next = lock(&sealed.last_seal).clone();
    assert_eq!(next.len(), 8);
    let crowded =
        |summary: &summary::Summary| (0..8).filter(|&s| summary.crowded(s, next[s as usize])).count();
    assert!(crowded(summary) > 0, "the test starts with crowded filters");
    sealed.grow_summary().unwrap();
    assert_eq!(crowded(summary), 0);
    assert_eq!(summary.ids(), n);

    // Expiry drops the oldest file's entries from the summary; a merge
    // those born before the horizon.
    let horizon = 1_000 + per_file + per_file / 2;
    assert_eq!(sealed.compact(horizon, 4).unwrap(), 1);
    let summary = sealed.summary.as_ref().expect("a summary");
    assert_eq!(summary.ids(), n - per_file);

    assert_eq!(sealed.compact(horizon, 1).unwrap(), 3);
    let summary = sealed.summary.as_ref().expect("a summary");
    assert_eq!(summary.ids(), n - per_file - per_file / 2);
    for e in (0..n).map(id) {
        let want = Some(e.born_ms).filter(|&b| b >= horizon);
        assert_eq!(sealed.born_ms(e.shard, e.fingerprint, horizon).unwrap(), want);
    }

    // Read back at open; built again from the files when damaged.
    drop(sealed);
    let sealed = Sealed::open_summarized(dir.path(), 8).unwrap();
    assert_eq!(
        sealed.summary.as_ref().map(summary::Summary::ids),
        Some(n - per_file - per_file / 2)
    );
    drop(sealed);
    let path = dir.path().join(summary::group_file(3));
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let sealed = Sealed::open_summarized(dir.path(), 8).unwrap();
    assert_eq!(
        sealed.summary.as_ref().map(summary::Summary::ids),
        Some(n - per_file - per_file / 2)
    );
    for e in (0..n).map(id) {
        let want = Some(e.born_ms).filter(|&b| b >= horizon);
        assert_eq!(sealed.born_ms(e.shard, e.fingerprint, horizon).unwrap(), want);
    }

    // A file rebuilt under the same name, with ids the old one lacked,
    // then a crash before the summary was saved: the summary left names
    // the same file, but not its footer, so it is built again.
    let group_files = || (0..8).map(|g| dir.path().join(summary::group_file(g)));
    let old_summary: Vec<Vec<u8>> = group_files().map(|p| std::fs::read(p).unwrap()).collect();
    let span = sealed.generations()[0].span();
    let extra: Vec<Entry> = (n..n + 1_000)
        .map(|i| entry((i % 8) as u32, id(i).fingerprint, span.cut_ms - 1))
        .collect();
    let mut all: Vec<Entry> = (0..n).map(id).filter(|e| e.born_ms >= horizon).collect();
    all.extend(&extra);
    sealed.rebuild(span, by_shard(&sorted(all))).unwrap();
    drop(sealed);
    for (path, bytes) in group_files().zip(&old_summary) {
        std::fs::write(path, bytes).unwrap();
    }
    let sealed = Sealed::open_summarized(dir.path(), 8).unwrap();
    for e in &extra {
        assert_eq!(
            sealed.born_ms(e.shard, e.fingerprint, 0).unwrap(),
            Some(e.born_ms)
        );
    }

    // An adoption writes its shard's group of the summary, and no other.
    let before: Vec<Vec<u8>> = group_files().map(|p| std::fs::read(p).unwrap()).collect();
    let adopted = Fingerprint::of(b"adopted");
    sealed.adopt(5, vec![(adopted, span.cut_ms - 1)], 0).unwrap();
    assert_eq!(sealed.born_ms(5, adopted, 0).unwrap(), Some(span.cut_ms - 1));
    for (g, (path, old)) in group_files().zip(&before).enumerate() {
        assert_eq!(std::fs::read(path).unwrap() != *old, g == 5, "group {g}");
    }
    drop(sealed);
    let sealed = Sealed::open_summarized(dir.path(), 8).unwrap();
    assert_eq!(sealed.born_ms(5, adopted, 0).unwrap(), Some(span.cut_ms - 1));
}

#[test]
fn a_damaged_block_the_summary_reads_leaves_its_file_out_listed_for_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = Sealed::open_summarized(dir.path(), 2).unwrap();
    let ids: Vec<Entry> = (0..1_000u64).map(|i| spread(i, 2)).collect();
    let span = sealed.seal(by_shard(&sorted(ids.clone())), 5_000).unwrap();
    drop(sealed);
    // The summary gone, so the next open reads every block; one damaged.
    for group in 0..2 {
        std::fs::remove_file(dir.path().join(summary::group_file(group))).unwrap();
    }
    let path = dir.path().join(file_name(span.from_ms, span.cut_ms));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let sealed = Sealed::open_summarized(dir.path(), 2).unwrap();
    let damaged: Vec<(u64, u64)> = sealed
        .take_damaged()
        .iter()
        .map(|s| (s.from_ms, s.cut_ms))
        .collect();
    assert_eq!(damaged, [(span.from_ms, span.cut_ms)]);
    assert!(path.with_extension("damaged").exists());
    assert!(sealed.generations().is_empty());
    sealed.rebuild(span, by_shard(&sorted(ids.clone()))).unwrap();
    for e in &ids {
        assert_eq!(
            sealed.born_ms(e.shard, e.fingerprint, 0).unwrap(),
            Some(e.born_ms)
        );
    }
}

#[test]
fn ids_sharing_their_shard_and_high_half_across_blocks_are_all_found() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = Sealed::open(dir.path()).unwrap();
    // 1 000 ids with the same (shard, hi) span seven blocks.
    let mut ids: Vec<Entry> = (0..1_000u64).map(|i| entry(3, fp(42, i * 7 + 1), i)).collect();
    ids.extend((0..500u64).map(|i| entry(3, fp(41 + 2 * (i % 2), i * 3 + 5_000), 7)));
    sealed.seal(by_shard(&sorted(ids.clone())), 10_000).unwrap();
    for e in &ids {
        assert_eq!(
            sealed.born_ms(3, e.fingerprint, 0).unwrap(),
            Some(e.born_ms),
            "{e:?}"
        );
    }
    for i in 0..1_000u64 {
        assert_eq!(sealed.born_ms(3, fp(42, i * 7 + 2), 0).unwrap(), None);
    }
}

#[test]
fn a_damaged_block_is_an_error_never_a_verdict_and_damaged_filters_do_not_open() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<Entry> = (0..2_000u64)
        .map(|i| entry(0, Fingerprint::of(format!("d{i}").as_bytes()), i))
        .collect();
    let ids = sorted(ids);
    let path = {
        let sealed = Sealed::open(dir.path()).unwrap();
        sealed.seal(by_shard(&ids), 5_000).unwrap();
        sealed.generations()[0].path().to_path_buf()
    };
    let good = std::fs::read(&path).unwrap();
    // A byte of block 2's entries.
    let mut bad = good.clone();
    bad[2 * BLOCK + 100] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let sealed = Sealed::open(dir.path()).unwrap();
    let in_block_2 = ids[2 * PER_BLOCK + 3];
    let err = sealed.born_ms(0, in_block_2.fingerprint, 0).unwrap_err();
    assert!(
        matches!(err, SealedError::Damaged(_, ref why) if why.contains("block 2")),
        "{err}"
    );
    assert_eq!(
        sealed.born_ms(0, ids[0].fingerprint, 0).unwrap(),
        Some(ids[0].born_ms)
    );
    // A merge reading it fails too, and changes nothing.
    assert!(sealed.compact(0, 0).is_ok(), "one generation: nothing to merge");
    drop(sealed);
    // A byte of the filters; then a truncated file: left out at open,
    // listed to be rebuilt, and rebuilt from the same entries.
    for bad in [
        {
            let mut bad = good.clone();
            bad[ids.len().div_ceil(PER_BLOCK) * BLOCK + 40] ^= 0x10;
            bad
        },
        good[..good.len() - 1].to_vec(),
    ] {
        std::fs::write(&path, &bad).unwrap();
        let sealed = Sealed::open(dir.path()).unwrap();
        assert!(sealed.generations().is_empty());
        let damaged = sealed.take_damaged();
        assert_eq!(
            damaged.iter().map(|s| (s.from_ms, s.cut_ms)).collect::<Vec<_>>(),
            [(0, 5_000)]
        );
        assert!(path.with_extension("damaged").exists());
        sealed.rebuild(damaged[0], by_shard(&ids)).unwrap();
        assert!(!path.with_extension("damaged").exists());
        assert_eq!(
            sealed.born_ms(0, in_block_2.fingerprint, 0).unwrap(),
            Some(in_block_2.born_ms)
        );
    }
}

#[test]
fn opening_removes_what_a_crash_left_half_done() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = Sealed::open(dir.path()).unwrap();
    let a = |i: u64| entry(1, Fingerprint::of(format!("a{i}").as_bytes()), i);
    sealed
        .seal(by_shard(&sorted((0..100).map(a).collect())), 100)
        .unwrap();
    sealed
        .seal(by_shard(&sorted((100..300).map(a).collect())), 300)
        .unwrap();
    // A merge that wrote its output and was cut off before removing its
    // inputs; a seal cut off before its rename.
    let inputs = sealed.generations();
    let merged = merge(dir.path(), &inputs, 0, FilterBits::Eight).unwrap();
    assert_eq!(merged.span().ids, 300);
    std::fs::write(dir.path().join("0000000000300-0000000000400.tmp"), b"half").unwrap();
    drop((sealed, inputs, merged));
    let sealed = Sealed::open(dir.path()).unwrap();
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["0000000000000-0000000000300.sealed"]);
    assert_eq!(sealed.ids(), 300);
    assert_eq!(sealed.cut_ms(), 300);
    assert_eq!(sealed.born_ms(1, a(250).fingerprint, 0).unwrap(), Some(250));
}

#[test]
fn adopted_ids_are_found_beside_the_generations_by_their_last_arrival_and_outlive_nothing() {
    adopted_ids_found(false);
    adopted_ids_found(true);
}

fn adopted_ids_found(summarized: bool) {
    let dir = tempfile::tempdir().unwrap();
    let sealed = open_tier(dir.path(), summarized, 8);
    let id = |i: u64| Fingerprint::of(format!("t{i}").as_bytes());
    // The generations: ids 0..100 of shard 3, arrived at 100 + i.
    let sealed_ids: Vec<Entry> = (0..100).map(|i| entry(3, id(i), 100 + i)).collect();
    sealed.seal(by_shard(&sorted(sealed_ids)), 1_000).unwrap();
    // Replayed from the journal at a takeover: ids 50..150 of shard 3
    // (50..100 again, later), and one of shard 4.
    let replayed: Vec<(Fingerprint, u64)> = (50..150).map(|i| (id(i), 500 + i)).collect();
    assert_eq!(sealed.adopt(3, replayed, 0).unwrap().unwrap().ids, 100);
    sealed.adopt(4, vec![(id(7), 900)], 0).unwrap();
    let born = |shard, i| sealed.born_ms(shard, id(i), 0).unwrap();
    assert_eq!(born(3, 10), Some(110), "in a generation only");
    assert_eq!(born(3, 60), Some(560), "the adopted arrival is the last");
    assert_eq!(born(3, 120), Some(620), "adopted only");
    assert_eq!(born(4, 7), Some(900));
    assert_eq!(born(4, 8), None, "another shard's adopted ids are not this one's");
    assert_eq!(born(5, 120), None);
    assert_eq!(sealed.files(), 3);
    // A forget hides an adopted arrival at or before it.
    sealed.forget(3, id(120), 700);
    assert_eq!(born(3, 120), None);
    // A second takeover adds to what was adopted, the older arrivals kept
    // once, ids before the horizon dropped; one file per shard.
    let again: Vec<(Fingerprint, u64)> = vec![(id(200), 950), (id(60), 520), (id(140), 640)];
    let span = sealed.adopt(3, again, 600).unwrap().unwrap();
    assert_eq!(span.ids, 50 + 1, "140..150 from before (≥ 600), and 200");
    assert_eq!(born(3, 200), Some(950));
    assert_eq!(born(3, 145), Some(645));
    let adopted_of_3 = |dir: &Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("adopted-00003")
            })
            .count()
    };
    assert_eq!(adopted_of_3(dir.path()), 1);
    // Reopened: the same answers; an older adopted file a crash left
    // behind is removed.
    drop(sealed);
    std::fs::copy(
        dir.path().join("adopted-00003-0000000001000.sealed"),
        dir.path().join("adopted-00003-0000000000999.sealed"),
    )
    .unwrap();
    let sealed = open_tier(dir.path(), summarized, 8);
    assert_eq!(adopted_of_3(dir.path()), 1);
    assert_eq!(sealed.born_ms(3, id(200), 0).unwrap(), Some(950));
    assert_eq!(sealed.born_ms(4, id(7), 0).unwrap(), Some(900));
    // Expiry deletes an adopted file whose newest id left the window.
    sealed.compact(920, 8).unwrap();
    assert_eq!(sealed.born_ms(4, id(7), 0).unwrap(), None);
    assert_eq!(sealed.born_ms(3, id(200), 0).unwrap(), Some(950));
    // A damaged adopted file is left out at open, and rebuilt.
    drop(sealed);
    let path = dir.path().join("adopted-00003-0000000001000.sealed");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 20;
    bytes[at] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let sealed = open_tier(dir.path(), summarized, 8);
    assert_eq!(sealed.take_damaged_adopted(), [(3, 1_000)]);
    assert_eq!(sealed.born_ms(3, id(200), 0).unwrap(), None);
    sealed.rebuild_adopted(3, 1_000, vec![(id(200), 950)], 0).unwrap();
    assert_eq!(sealed.born_ms(3, id(200), 0).unwrap(), Some(950));
    assert!(!dir.path().join("adopted-00003-0000000001000.damaged").exists());
}

#[test]
fn a_seal_goes_on_while_a_merge_writes_and_the_merge_then_takes_its_inputs_place() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = Sealed::open(dir.path()).unwrap();
    let a = |i: u64| entry(1, Fingerprint::of(format!("m{i}").as_bytes()), i);
    let ids = |r: std::ops::Range<u64>| by_shard(&sorted(r.map(a).collect()));
    for cut in [100, 200, 300, 400] {
        sealed.seal(ids(cut - 100..cut), cut).unwrap();
    }
    let files = |dir: &Path| std::fs::read_dir(dir).unwrap().count();
    let inputs = sealed.next_merge(8).expect("four of like size");
    assert_eq!(inputs.len(), 4);
    let merged = Arc::new(merge(dir.path(), &inputs, 0, FilterBits::Eight).unwrap());
    // A seal while the merge was writing: it goes after the merged file.
    sealed.seal(ids(400..450), 450).unwrap();
    assert_eq!(sealed.put_merged(&inputs, merged, 0).unwrap(), Some(4));
    let spans: Vec<(u64, u64)> = sealed
        .generations()
        .iter()
        .map(|g| (g.span().from_ms, g.span().cut_ms))
        .collect();
    assert_eq!(spans, [(0, 400), (400, 450)]);
    assert_eq!(sealed.cut_ms(), 450);
    assert_eq!(files(dir.path()), 2);
    for i in 0..450 {
        assert_eq!(sealed.born_ms(1, a(i).fingerprint, 0).unwrap(), Some(i));
    }
    // A merge one of whose inputs was rebuilt meanwhile is dropped.
    let inputs = sealed.next_merge(1).expect("more than one file");
    let merged = Arc::new(merge(dir.path(), &inputs, 0, FilterBits::Eight).unwrap());
    sealed.rebuild(inputs[1].span(), ids(400..450)).unwrap();
    assert_eq!(sealed.put_merged(&inputs, merged, 0).unwrap(), None);
    assert_eq!(sealed.generations().len(), 2);
    assert_eq!(files(dir.path()), 2, "the dropped merge's file deleted");
    for i in 0..450 {
        assert_eq!(sealed.born_ms(1, a(i).fingerprint, 0).unwrap(), Some(i));
    }
    // Merged again later.
    assert_eq!(sealed.compact(0, 1).unwrap(), 2);
    assert_eq!(sealed.generations().len(), 1);
}

/// The tier in `dir`, with a summary over `shards` shards or with each
/// file's filters.
fn open_tier(dir: &Path, summarized: bool, shards: u32) -> Sealed {
    match summarized {
        true => Sealed::open_summarized(dir, shards).unwrap(),
        false => Sealed::open(dir).unwrap(),
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// An id (of a small space, so ids come again) arrives `dt` ms later.
    Arrive {
        shard: u32,
        id: u16,
        dt: u16,
    },
    /// The ids arrived since the last cut are sealed.
    Seal,
    /// Expired generations dropped and the rest merged down to `max`.
    Compact {
        max: usize,
    },
    Lookup {
        shard: u32,
        id: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        30 => (0..3u32, 0..400u16, 0..50u16).prop_map(|(shard, id, dt)| Op::Arrive { shard, id, dt }),
        3 => Just(Op::Seal),
        2 => (0..4usize).prop_map(|max| Op::Compact { max }),
        20 => (0..3u32, 0..400u16).prop_map(|(shard, id)| Op::Lookup { shard, id }),
    ]
}

/// Ids of a small space with few distinct high halves, so that ids share
/// `(shard, hi)` across blocks.
fn id_fp(id: u16) -> Fingerprint {
    let full = Fingerprint::of(&id.to_le_bytes());
    fp(full.hi % 3, full.lo)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the seals and merges, a lookup answers the latest sealed
    /// arrival of an id within the window, as an exact model does.
    #[test]
    fn lookups_equal_an_exact_model_through_seals_and_merges(
        ops in prop::collection::vec(op(), 1..400),
        summarized in any::<bool>(),
    ) {
        const WINDOW: u64 = 2_000;
        let dir = tempfile::tempdir().unwrap();
        let sealed = open_tier(dir.path(), summarized, 3);
        let mut now = 10_000u64;
        let mut since_cut: Vec<Entry> = Vec::new();
        let mut model: BTreeMap<(u32, Fingerprint), u64> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Arrive { shard, id, dt } => {
                    now += u64::from(dt);
                    since_cut.push(entry(shard, id_fp(id), now));
                }
                Op::Seal => {
                    now += 1;
                    let entries = sorted(std::mem::take(&mut since_cut));
                    for e in &entries {
                        model.insert(e.key(), e.born_ms);
                    }
                    sealed.seal(by_shard(&entries), now).unwrap();
                }
                Op::Compact { max } => {
                    sealed.compact(now.saturating_sub(WINDOW), max).unwrap();
                    prop_assert!(sealed.generations().len() <= max.max(1));
                }
                Op::Lookup { shard, id } => {
                    let horizon = now - WINDOW;
                    let want = model.get(&(shard, id_fp(id))).copied().filter(|&b| b >= horizon);
                    prop_assert_eq!(sealed.born_ms(shard, id_fp(id), horizon).unwrap(), want);
                }
            }
        }
        // And after reopening (the summary read back, or built again
        // when it is gone).
        let horizon = now - WINDOW;
        drop(sealed);
        let sealed = open_tier(dir.path(), summarized, 3);
        for (&(shard, fp), &born) in &model {
            prop_assert_eq!(sealed.born_ms(shard, fp, horizon).unwrap(), Some(born).filter(|&b| b >= horizon));
        }
        drop(sealed);
        for group in 0..summary::GROUPS as usize {
            let _ = std::fs::remove_file(dir.path().join(summary::group_file(group)));
        }
        let sealed = open_tier(dir.path(), summarized, 3);
        for (&(shard, fp), &born) in &model {
            prop_assert_eq!(sealed.born_ms(shard, fp, horizon).unwrap(), Some(born).filter(|&b| b >= horizon));
        }
    }
}

/// What the tiered table is tested against: every acceptance, forgetting
/// and window change, verdicts computed from them exactly.
#[derive(Default)]
struct Exact {
    /// Each id's acceptances.
    accepted: BTreeMap<(u32, Fingerprint), Vec<u64>>,
    forgotten: BTreeMap<(u32, Fingerprint), u64>,
    window: u64,
    /// Ids born before this were dropped by a window change.
    dead_before: u64,
}

impl Exact {
    fn window_in_force(&self, now: u64) -> u64 {
        self.window.min((now + 1).saturating_sub(self.dead_before))
    }

    fn remembered(&self, key: (u32, Fingerprint), now: u64) -> bool {
        let after = self.forgotten.get(&key).copied();
        let w = self.window_in_force(now);
        self.accepted
            .get(&key)
            .into_iter()
            .flatten()
            .any(|&b| now - b < w && after.is_none_or(|f| b > f))
    }

    /// What the LMDB store's scan gives for `from..cut`.
    fn journal(&self, from: u64, cut: u64) -> Vec<Entry> {
        let mut entries = Vec::new();
        for (&(shard, fingerprint), borns) in &self.accepted {
            let hidden = self.forgotten.get(&(shard, fingerprint)).copied();
            for &born_ms in borns {
                if born_ms >= from && born_ms < cut && hidden.is_none_or(|f| born_ms > f) {
                    entries.push(entry(shard, fingerprint, born_ms));
                }
            }
        }
        sorted(entries)
    }
}

#[derive(Debug, Clone)]
enum Step {
    Arrive {
        shard: u32,
        id: u16,
        dt: u16,
    },
    /// Seal the ids accepted before `back` ms ago.
    Seal {
        back: u16,
    },
    Compact {
        max: usize,
    },
    Forget {
        shard: u32,
        id: u16,
    },
    Window {
        ms: u64,
    },
    Sweep,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        40 => (0..2u32, 0..300u16, 0..60u16).prop_map(|(shard, id, dt)| Step::Arrive { shard, id, dt }),
        4 => (0..200u16).prop_map(|back| Step::Seal { back }),
        2 => (0..4usize).prop_map(|max| Step::Compact { max }),
        3 => (0..2u32, 0..300u16).prop_map(|(shard, id)| Step::Forget { shard, id }),
        1 => (500..4_000u64).prop_map(|ms| Step::Window { ms }),
        2 => Just(Step::Sweep),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The tables and the sealed tier together, through the engine's batch
    /// path, as the sidecar runs them: arrivals, seals of the store's ids
    /// at random cuts (then the tables drop what was sealed), merges and
    /// expiry, forgets, window changes and sweeps; every verdict equals
    /// the exact model's.
    #[test]
    fn tables_and_sealed_tier_give_the_exact_verdicts(
        steps in prop::collection::vec(step(), 1..500),
        summarized in any::<bool>(),
    ) {
        use crate::engine::{Deduplicator, EngineConfig, Verdict};
        let dir = tempfile::tempdir().unwrap();
        let sealed = Arc::new(open_tier(dir.path(), summarized, 2));
        let dedup = Deduplicator::new(EngineConfig {
            window_ms: 2_000,
            shards: 2,
            segments_per_shard: 4,
            ..EngineConfig::default()
        });
        dedup.set_older(sealed.clone());
        let mut exact = Exact { window: 2_000, ..Exact::default() };
        let mut now = 100_000u64;
        let (mut out, mut twins) = (Vec::new(), Vec::new());
        for step in steps {
            match step {
                Step::Arrive { shard, id, dt } => {
                    now += u64::from(dt);
                    let fp = id_fp(id);
                    out.clear();
                    dedup.check_and_insert_many(shard, &[fp], now, None, &mut out, &mut twins).unwrap();
                    let want = match exact.remembered((shard, fp), now) {
                        true => Verdict::Duplicate,
                        false => Verdict::New,
                    };
                    prop_assert_eq!(out[0], want, "shard {} id {} at {}", shard, id, now);
                    if want == Verdict::New {
                        exact.accepted.entry((shard, fp)).or_default().push(now);
                    }
                }
                Step::Seal { back } => {
                    let cut = now.saturating_sub(u64::from(back));
                    if cut <= sealed.cut_ms() {
                        continue;
                    }
                    let horizon = (now + 1).saturating_sub(exact.window_in_force(now));
                    let entries = exact.journal(sealed.cut_ms().max(horizon), cut);
                    sealed.seal(by_shard(&entries), cut).unwrap();
                    dedup.sealed_before(cut);
                }
                Step::Compact { max } => {
                    let horizon = (now + 1).saturating_sub(exact.window_in_force(now));
                    sealed.compact(horizon, max).unwrap();
                }
                Step::Forget { shard, id } => {
                    let key = (shard, id_fp(id));
                    if exact.remembered(key, now) {
                        dedup.forget(shard, key.1, now);
                        exact.forgotten.insert(key, now);
                        // As the sidecar does: an acceptance after a
                        // forget is in a later millisecond.
                        now += 1;
                    }
                }
                Step::Window { ms } => {
                    dedup.set_window(ms, now);
                    if ms > exact.window {
                        exact.dead_before = exact.dead_before.max((now + 1).saturating_sub(exact.window));
                    }
                    exact.window = ms;
                }
                Step::Sweep => {
                    dedup.sweep(now, 4);
                }
            }
        }
    }
}

/// A real LMDB journal holding `records`, and its reader.
fn journal(
    dir: &Path,
    records: &[crate::journal::Record],
) -> (crate::journal::LmdbStore, Box<dyn JournalReader>) {
    use crate::journal::Journal;
    let meta = crate::journal::StoreMeta {
        shards: 8,
        window_ms: 1 << 40,
        shard_key: String::new(),
    };
    let mut store = crate::journal::LmdbStore::open(dir, meta, false).unwrap();
    for chunk in records.chunks(1000) {
        store.append(chunk).unwrap();
    }
    let reader = store.reader().unwrap();
    (store, reader)
}

fn tmp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

#[test]
fn a_span_sorted_through_bucket_files_is_written_as_one_sorted_in_ram() {
    let dir = tempfile::tempdir().unwrap();
    // 5 000 arrivals over 8 shards, in time order; ids 0..200 arrive twice.
    let records: Vec<crate::journal::Record> = (0..5_000u64)
        .map(|i| {
            let id = if i >= 4_800 { i - 4_800 } else { i };
            crate::journal::Record {
                shard: (id % 8) as u32,
                born_ms: 1_000 + i,
                fingerprint: Fingerprint::of(format!("id{id}").as_bytes()),
            }
        })
        .collect();
    let (_store, reader) = journal(&dir.path().join("journal"), &records);
    let written = |in_ram: usize| {
        let out = dir.path().join(format!("sorted-{in_ram}"));
        std::fs::create_dir_all(&out).unwrap();
        let mut writer = Writer::create(&out, 0, 10_000).unwrap();
        write_journal(&mut writer, reader.as_ref(), (0, 10_000), &out, in_ram).unwrap();
        let (path, span) = writer.finish().unwrap();
        assert!(
            tmp_files(&out).is_empty(),
            "buckets deleted: {:?}",
            tmp_files(&out)
        );
        let g = Generation::open(&path).unwrap();
        let entries: Vec<Entry> = g.entries().unwrap().map(Result::unwrap).collect();
        (span.ids, entries)
    };
    let (ids, all_in_ram) = written(usize::MAX);
    assert_eq!(ids, 4_800, "one entry per id");
    // The later arrival of each id that came twice.
    let mut expected: BTreeMap<(u32, Fingerprint), u64> = BTreeMap::new();
    for r in &records {
        expected.insert((r.shard, r.fingerprint), r.born_ms);
    }
    let expected: Vec<Entry> = expected.into_iter().map(|((s, f), b)| entry(s, f, b)).collect();
    assert_eq!(all_in_ram, expected);
    for in_ram in [1, 7, 1_000, 4_999] {
        assert_eq!(written(in_ram), (4_800, expected.clone()), "{in_ram} in RAM");
    }
}

#[test]
fn a_seal_from_the_journal_finds_its_ids_and_leaves_no_bucket_files() {
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<crate::journal::Record> = (0..3_000u64)
        .map(|i| crate::journal::Record {
            shard: (i % 8) as u32,
            born_ms: 1_000 + i,
            fingerprint: Fingerprint::of(format!("id{i}").as_bytes()),
        })
        .collect();
    let (_store, reader) = journal(&dir.path().join("journal"), &records);
    let sealed = Sealed::open(&dir.path().join("sealed")).unwrap();
    let span = sealed.seal_journal(reader.as_ref(), 0, 3_000).unwrap();
    assert_eq!((span.ids, span.oldest_ms, span.newest_ms), (2_000, 1_000, 2_999));
    let span = sealed.seal_journal(reader.as_ref(), 0, 10_000).unwrap();
    assert_eq!((span.from_ms, span.ids), (3_000, 1_000), "from the last cut on");
    for r in &records {
        assert_eq!(
            sealed.born_ms(r.shard, r.fingerprint, 0).unwrap(),
            Some(r.born_ms)
        );
    }
    assert!(tmp_files(&dir.path().join("sealed")).is_empty());
}
