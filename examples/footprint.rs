//! Inserts N distinct ids through `Deduplicator::ingest_event` and reports the
//! memory per live id from the process's own RSS, and the insert rate.
//!
//! `cargo run --release --example footprint -- 10000000 [SEGMENTS_PER_SHARD]`
//!
//! The last line is `bytes_per_id=<f> peak_bytes_per_id=<f> inserts_per_s=<f>`,
//! where the per-id figures are (RSS − RSS before the engine existed) / N,
//! and the peak uses the kernel's high-water mark (`VmHWM`).
//!
//! `tier = "tiered"` (the sealed tier), in two processes:
//!
//! - `footprint --tier tiered build DIR N [PER_SEAL [BITS]]`: seals N ids
//!   (`ev<i>`, placed in 32 shards as the sidecar places them) into DIR,
//!   PER_SEAL (default 10 M) at a time, merged as the sidecar merges, with
//!   BITS-bit filters (8 or 16, `sealed_filter_bits`; `summary`: 8-bit
//!   ones on disk and the summary in RAM, `sealed_summary`); reports the
//!   time and the bytes on disk.
//! - `footprint --tier tiered seal DIR N`: fills an LMDB store in DIR
//!   with N ids as the sidecar's journal holds them, then seals them from
//!   it as the sidecar does; reports the seal's time and `RssAnon` peak
//!   growth.
//! - `footprint --tier tiered open DIR N M`: opens DIR (with its summary
//!   if it has one) in a fresh process
//!   and reports the time to serve (open) and `RssAnon` growth per sealed
//!   id (page cache excluded); then, with those N ids sealed behind an
//!   empty table, the verdict rate for M new ids and for M duplicates of
//!   sealed ids (batches of 1000 of a shard, as the batch path decides
//!   them), the filter probes and block reads per verdict; and the same M
//!   new ids into an all-in-RAM table already holding N ids (`--baseline`
//!   as a fifth argument, then optionally K to hold K ids instead; it
//!   needs about 14 B × K of RAM).

use std::fmt::Write;
use std::time::Instant;

use eventsieve::{Deduplicator, EngineConfig};

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{field} missing from /proc/self/status"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--tier") {
        assert_eq!(
            args.get(2).map(String::as_str),
            Some("tiered"),
            "--tier tiered build|open ..."
        );
        return tiered::main(&args[3..]);
    }
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(10_000_000, |a| a.parse().expect("N must be a number"));
    let base_rss = status_kib("VmRSS:") * 1024;
    let mut config = EngineConfig::default();
    if let Some(segments) = std::env::args().nth(2) {
        config.segments_per_shard = segments.parse().expect("segments per shard: a number");
    }
    let dedup = Deduplicator::new(config);
    let mut event = String::with_capacity(64);
    let start = Instant::now();
    for i in 0..n {
        event.clear();
        write!(event, r#"{{"event_id":"ev{i:x}","value":1}}"#).unwrap();
        assert!(dedup.ingest_event(&event).unwrap(), "id {i} judged duplicate");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let rss = status_kib("VmRSS:") * 1024;
    let peak = status_kib("VmHWM:") * 1024;
    let anon = status_kib("RssAnon:") * 1024;
    let per = |bytes: u64| bytes.saturating_sub(base_rss) as f64 / n as f64;
    println!("ids={n} rss_bytes={rss} rss_anon_bytes={anon} baseline_rss_bytes={base_rss}");
    println!(
        "table_heap_bytes={} ({:.2} per id)",
        dedup.memory_bytes(),
        dedup.memory_bytes() as f64 / n as f64
    );
    println!(
        "bytes_per_id={:.2} peak_bytes_per_id={:.2} inserts_per_s={:.0}",
        per(rss),
        per(peak),
        n as f64 / elapsed
    );
}

mod tiered {
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Instant;

    use eventsieve::engine::fingerprint::Fingerprint;
    use eventsieve::engine::shard::shard_of;
    use eventsieve::engine::{Deduplicator, EngineConfig, Verdict};
    use eventsieve::journal::sealed::{Entry, FilterBits, Sealed};

    use super::status_kib;

    const SHARDS: u32 = 32;
    const WINDOW_MS: u64 = 7 * 24 * 3600 * 1000;
    /// The arrival given to every sealed id: an hour ago, well in the window.
    fn born() -> u64 {
        eventsieve::engine::unix_ms() - 3_600_000
    }

    fn id(i: u64) -> String {
        format!("ev{i:x}")
    }

    pub fn main(args: &[String]) {
        let arg = |i: usize, what: &str| -> u64 {
            args.get(i)
                .unwrap_or_else(|| panic!("missing {what}"))
                .parse()
                .unwrap_or_else(|_| panic!("{what}: a number"))
        };
        let dir = Path::new(args.get(1).expect("DIR"));
        match args.first().map(String::as_str) {
            Some("build") => build(
                dir,
                arg(2, "N"),
                args.get(3).map_or(10_000_000, |_| arg(3, "PER_SEAL")),
                args.get(4).map_or("8", String::as_str),
            ),
            Some("open") => open(
                dir,
                arg(2, "N"),
                arg(3, "M"),
                match args.get(4).map(String::as_str) {
                    Some("--baseline") => Some(args.get(5).map_or(arg(2, "N"), |_| arg(5, "K"))),
                    _ => None,
                },
            ),
            Some("seal") => seal(dir, arg(2, "N")),
            _ => panic!(
                "--tier tiered build DIR N [PER_SEAL [BITS]] | open DIR N M [--baseline [K]] | seal DIR N"
            ),
        }
    }

    /// Fills an LMDB store in `dir` with `n` ids, as the sidecar's journal
    /// holds them, then seals them from it as the sidecar does, and
    /// reports the seal's time and `RssAnon` peak growth (sampled every
    /// 5 ms).
    fn seal(dir: &Path, n: u64) {
        use eventsieve::engine::Record;
        use eventsieve::journal::{Journal, LmdbStore, StoreMeta};
        let meta = StoreMeta {
            shards: SHARDS,
            window_ms: WINDOW_MS,
            shard_key: String::new(),
        };
        let mut store = LmdbStore::open(&dir.join("journal"), meta, false).expect("open the store");
        let born = born();
        let mut chunk = Vec::with_capacity(10_000);
        for i in 0..n {
            let id = id(i);
            chunk.push(Record {
                shard: shard_of(&id, SHARDS),
                born_ms: born + i / 1000,
                fingerprint: Fingerprint::of(id.as_bytes()),
            });
            if chunk.len() == chunk.capacity() || i + 1 == n {
                store.append(&chunk).expect("append");
                chunk.clear();
            }
        }
        let reader = store.reader().expect("a reader");
        let sealed = Sealed::open(&dir.join("sealed")).expect("open the sealed tier");
        let before = status_kib("RssAnon:");
        let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sampler = {
            let sampling = sampling.clone();
            std::thread::spawn(move || {
                let mut peak = 0;
                while sampling.load(Relaxed) {
                    peak = peak.max(status_kib("RssAnon:"));
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                peak
            })
        };
        let started = Instant::now();
        let span = sealed
            .seal_journal(reader.as_ref(), 0, born + n / 1000 + 1)
            .expect("seal");
        let elapsed = started.elapsed().as_secs_f64();
        sampling.store(false, Relaxed);
        let peak = sampler.join().expect("the sampler").max(status_kib("RssAnon:"));
        println!(
            "sealed={} seal_s={elapsed:.1} rss_anon_peak_growth_mb={}",
            span.ids,
            peak.saturating_sub(before) / 1024
        );
    }

    fn build(dir: &Path, n: u64, per_seal: u64, bits: &str) {
        let started = Instant::now();
        let sealed = match bits {
            "summary" => Sealed::open_summarized(dir, SHARDS).expect("open DIR"),
            bits => {
                let bits = bits.parse().ok().and_then(FilterBits::from_bits);
                Sealed::open(dir)
                    .expect("open DIR")
                    .with_filter(bits.expect("BITS: 8, 16 or summary"))
            }
        };
        let born = born();
        let mut first = 0;
        while first < n {
            let last = (first + per_seal).min(n);
            let mut entries: Vec<Entry> = (first..last)
                .map(|i| {
                    let id = id(i);
                    Entry {
                        shard: shard_of(&id, SHARDS),
                        fingerprint: Fingerprint::of(id.as_bytes()),
                        born_ms: born,
                    }
                })
                .collect();
            entries.sort_unstable();
            let sealing = Instant::now();
            sealed
                .seal(eventsieve::journal::sealed::by_shard(&entries), born + 1 + last)
                .expect("seal");
            sealed.save_summary_after_seal();
            let merging = Instant::now();
            sealed.compact(0, 8).expect("merge");
            eprintln!(
                "sealed {last}: seal_s={:.1} merge_s={:.1} memory_bytes={}",
                (merging - sealing).as_secs_f64(),
                merging.elapsed().as_secs_f64(),
                sealed.memory_bytes()
            );
            first = last;
        }
        println!(
            "sealed={n} generations={} disk_bytes={} ({:.2} per id) memory_bytes={} ({:.3} per id) merges={} build_s={:.1}",
            sealed.generations().len(),
            sealed.disk_bytes(),
            sealed.disk_bytes() as f64 / n as f64,
            sealed.memory_bytes(),
            sealed.memory_bytes() as f64 / n as f64,
            sealed.merges.load(Relaxed),
            started.elapsed().as_secs_f64()
        );
    }

    /// Decides `ids` in batches of 1000 of one shard each; returns the rate
    /// and how many were new.
    fn decide(dedup: &Deduplicator, ids: impl Iterator<Item = u64>) -> (f64, usize) {
        let mut by_shard: Vec<Vec<Fingerprint>> = vec![Vec::new(); SHARDS as usize];
        for i in ids {
            let id = id(i);
            by_shard[shard_of(&id, SHARDS) as usize].push(Fingerprint::of(id.as_bytes()));
        }
        let total: usize = by_shard.iter().map(Vec::len).sum();
        let (mut out, mut twins, mut new) = (Vec::new(), Vec::new(), 0);
        let now = eventsieve::engine::unix_ms();
        let started = Instant::now();
        for (shard, fps) in by_shard.iter().enumerate() {
            for batch in fps.chunks(1000) {
                out.clear();
                dedup
                    .check_and_insert_many(shard as u32, batch, now, None, &mut out, &mut twins)
                    .expect("sealed tier readable");
                new += out.iter().filter(|v| **v == Verdict::New).count();
            }
        }
        (total as f64 / started.elapsed().as_secs_f64(), new)
    }

    fn engine() -> Deduplicator {
        Deduplicator::new(EngineConfig {
            window_ms: WINDOW_MS,
            shards: SHARDS,
            ..EngineConfig::default()
        })
    }

    fn open(dir: &Path, n: u64, m: u64, baseline: Option<u64>) {
        let anon_before = status_kib("RssAnon:") * 1024;
        let started = Instant::now();
        let summarized = std::fs::read_dir(dir)
            .expect("read DIR")
            .any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("summary")));
        let sealed = match summarized {
            true => Sealed::open_summarized(dir, SHARDS),
            false => Sealed::open(dir),
        };
        let sealed = Arc::new(sealed.expect("open DIR"));
        let open_s = started.elapsed().as_secs_f64();
        let anon = (status_kib("RssAnon:") * 1024).saturating_sub(anon_before);
        println!(
            "summary={summarized} open_s={open_s:.2} sealed={} rss_anon_growth={anon} ({:.3} per sealed id) memory_bytes={}",
            sealed.ids(),
            anon as f64 / sealed.ids() as f64,
            sealed.memory_bytes()
        );
        // The tables alone, for what the sealed tier adds.
        let (rate, _) = decide(&engine(), n..n + m);
        println!("new_ids_per_s_without_sealed_tier={rate:.0}");
        let dedup = engine();
        dedup.set_older(sealed.clone());
        let probes = |s: &Sealed| (s.filter_probes.load(Relaxed), s.block_reads.load(Relaxed));
        let (p0, r0) = probes(&sealed);
        let (rate, new) = decide(&dedup, n..n + m);
        let (p1, r1) = probes(&sealed);
        assert_eq!(new as u64, m, "every new id new");
        println!(
            "new_ids_per_s={rate:.0} filter_probes_per_verdict={:.2} block_reads_per_verdict={:.4}",
            (p1 - p0) as f64 / m as f64,
            (r1 - r0) as f64 / m as f64
        );
        // Duplicates of sealed ids spread over the whole span.
        let step = (n / m).max(1);
        let (rate, new) = decide(&dedup, (0..m).map(|k| (k * step) % n));
        let (p2, r2) = probes(&sealed);
        assert_eq!(new, 0, "every sealed id a duplicate");
        println!(
            "sealed_duplicates_per_s={rate:.0} filter_probes_per_verdict={:.2} block_reads_per_verdict={:.4}",
            (p2 - p1) as f64 / m as f64,
            (r2 - r1) as f64 / m as f64
        );
        if let Some(k) = baseline {
            drop(dedup);
            let memory = engine();
            let (fill, _) = decide(&memory, 0..k);
            let (rate, new) = decide(&memory, n..n + m);
            assert_eq!(new as u64, m);
            println!("in_ram_table_of_{k}: fill_per_s={fill:.0} new_ids_per_s={rate:.0}");
        }
    }
}
