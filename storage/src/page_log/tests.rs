//! The page log against real files: reopen, torn tails, rot, compaction, pins, migration.
use std::time::{Duration, Instant};

use super::record::KIND_PAGE;
use super::*;

/// Waits (bounded) until the background compactor has run `n` compactions.
fn wait_compactions(log: &PageLog, n: u64) -> PageLogStats {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = log.stats();
        if s.compactions >= n {
            return s;
        }
        assert!(Instant::now() < deadline, "no compaction #{n} within 30 s: {s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn distinct(n: u32) -> (Hash, Vec<u8>) {
    let mut b = vec![0u8; 65536];
    b[..4].copy_from_slice(&n.to_le_bytes());
    (Hash::of(&b), b)
}

fn page(fill: u8) -> (Hash, Vec<u8>) {
    let bytes = vec![fill; 65536];
    (Hash::of(&bytes), bytes)
}

fn write_one(log: &PageLog, key: &str, pages: Vec<(Hash, Vec<u8>)>, manifest: &[u8]) -> u64 {
    let refs = pages.iter().map(|p| p.0).collect();
    log.write(&[PageWrite { pages, key: key.into(), manifest: manifest.to_vec(), refs, remove: vec![] }], true).unwrap()
}

#[test]
fn pages_are_written_once_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = PageLog::open(dir.path()).unwrap();
    let (a, b) = (page(1), page(2));
    let first = write_one(&log, "t#0", vec![a.clone(), b.clone()], b"m1");
    let second = write_one(&log, "t#0", vec![a.clone(), b.clone()], b"m2");
    assert!(second < first / 10, "unchanged pages must not be rewritten ({second} vs {first})");
    drop(log);
    let log = PageLog::open(dir.path()).unwrap();
    assert_eq!(log.read_manifest("t#0").unwrap().unwrap(), b"m2");
    assert_eq!(log.read_page(&a.0).unwrap(), a.1);
    assert_eq!(log.stats().pages, 2);
}

#[test]
fn pages_written_without_sync_are_kept_by_a_later_sync_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = PageLog::open(dir.path()).unwrap();
    let a = page(7);
    log.write(&[PageWrite { pages: vec![a.clone()], ..Default::default() }], false).unwrap();
    assert!(log.has_page(&a.0), "indexed at once");
    log.sync().unwrap();
    // A manifest written later refers to it without carrying it again.
    let refs = vec![a.0];
    log.write(&[PageWrite { key: "t#3".into(), manifest: b"m3".to_vec(), refs, ..Default::default() }], true).unwrap();
    drop(log);
    let log = PageLog::open(dir.path()).unwrap();
    assert_eq!(log.read_page(&a.0).unwrap(), a.1);
    assert_eq!(log.read_manifest("t#3").unwrap().unwrap(), b"m3");
}

#[test]
fn torn_tail_is_cut_and_earlier_records_kept() {
    let dir = tempfile::tempdir().unwrap();
    let log = PageLog::open(dir.path()).unwrap();
    write_one(&log, "t#0", vec![page(1)], b"m1");
    let good = log.stats().file_bytes;
    write_one(&log, "t#0", vec![page(3)], b"m2");
    drop(log);
    let path = dir.path().join("pages.log");
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(good + 1000).unwrap();
    let log = PageLog::open(dir.path()).unwrap();
    assert_eq!(log.read_manifest("t#0").unwrap().unwrap(), b"m1");
    assert_eq!(log.stats().file_bytes, good);
}

#[test]
fn flipped_bit_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let log = PageLog::open(dir.path()).unwrap();
    let p = page(7);
    write_one(&log, "t#0", vec![p.clone()], b"m");
    drop(log);
    let path = dir.path().join("pages.log");
    let mut bytes = fs::read(&path).unwrap();
    bytes[3 + 32 + 4 + 100] ^= 1;
    fs::write(&path, &bytes).unwrap();
    // The page fails its hash on scan, so the page is gone rather than wrong; the manifest after
    // it is read but left out (it could restore nothing), and the file is not cut.
    let log = PageLog::open(dir.path()).unwrap();
    assert!(matches!(log.read_page(&p.0), Err(PageLogError::MissingPage(_))));
    assert_eq!(log.read_manifest("t#0").unwrap(), None);
    assert_eq!(log.stats().file_bytes, bytes.len() as u64);
}

/// A rotten record header in the middle of the log (its kind, or its data length made too large,
/// or too small) costs that record only: every valid record after it is kept, nothing is cut.
#[test]
fn a_rotten_header_in_the_middle_skips_one_record_and_keeps_the_rest() {
    let corruptions: [(&str, usize, &[u8]); 4] = [
        ("kind", 0, &[0xee]),
        ("huge data length", 3 + 32, &[0xff, 0xff, 0xff, 0xff]),
        ("short data length", 3 + 32, &[0x10, 0x00, 0x00, 0x00]),
        ("long data length", 3 + 32, &[0x00, 0x00, 0x03, 0x00]),
    ];
    for (what, at, bytes) in corruptions {
        let dir = tempfile::tempdir().unwrap();
        let log = PageLog::open(dir.path()).unwrap();
        write_one(&log, "a#0", vec![page(1)], b"ma");
        let rotten = log.stats().file_bytes as usize;
        let b = page(2);
        write_one(&log, "b#0", vec![b.clone()], b"mb");
        write_one(&log, "c#0", vec![page(3)], b"mc");
        let len = log.stats().file_bytes;
        drop(log);
        let path = dir.path().join("pages.log");
        let mut file = fs::read(&path).unwrap();
        file[rotten + at..rotten + at + bytes.len()].copy_from_slice(bytes);
        fs::write(&path, &file).unwrap();

        let log = PageLog::open(dir.path()).unwrap();
        assert!(matches!(log.read_page(&b.0), Err(PageLogError::MissingPage(_))), "{what}");
        assert_eq!(log.read_manifest("a#0").unwrap().unwrap(), b"ma", "{what}");
        // The record after the rotten page is b's manifest: read, but left out for its lost page.
        assert_eq!(log.read_manifest("b#0").unwrap(), None, "{what}: b's manifest lost its page");
        assert!(!log.is_complete("b#0"), "{what}");
        assert_eq!(log.read_manifest("c#0").unwrap().unwrap(), b"mc", "{what}");
        assert_eq!(log.read_page(&page(3).0).unwrap(), page(3).1, "{what}");
        assert_eq!(log.stats().file_bytes, len, "{what}: nothing was cut");
        // And the log goes on taking writes after the rot.
        write_one(&log, "d#0", vec![page(4)], b"md");
        drop(log);
        let log = PageLog::open(dir.path()).unwrap();
        assert_eq!(log.read_manifest("d#0").unwrap().unwrap(), b"md", "{what}");
    }
}

/// A batch torn in its middle by a crash (zeroed blocks before its manifest, which reached the
/// disk): the newest manifest lacks its page, so the key has no manifest (an older one of the key
/// may hold other contents, so it cannot stand in).
#[test]
fn a_manifest_whose_batch_tore_in_the_middle_is_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let log = PageLog::open(dir.path()).unwrap();
    write_one(&log, "t#0", vec![page(1)], b"m1");
    write_one(&log, "u#0", vec![page(3)], b"u1");
    let torn = log.stats().file_bytes as usize;
    // The same key written again with other contents: its old manifest must not stand in.
    write_one(&log, "u#0", vec![page(2)], b"u2");
    assert!(log.is_complete("u#0"));
    drop(log);
    let path = dir.path().join("pages.log");
    let mut file = fs::read(&path).unwrap();
    file[torn..torn + 4096].fill(0);
    fs::write(&path, &file).unwrap();
    let log = PageLog::open(dir.path()).unwrap();
    assert!(!log.has_manifest("u#0"), "a manifest without its pages restores nothing");
    assert!(log.read_manifest("u#0").unwrap().is_none());
    assert!(!log.is_complete("u#0"));
    assert_eq!(log.read_manifest("t#0").unwrap().unwrap(), b"m1");
    assert!(log.is_complete("t#0"));
    assert_eq!(log.read_page(&page(1).0).unwrap(), page(1).1);
    // A page forgotten at run time (found rotten) leaves its manifest incomplete.
    log.forget_page(&page(1).0);
    assert!(log.has_manifest("t#0") && !log.is_complete("t#0"));
}

#[test]
fn tombstone_and_compaction_drop_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let log = PageLog::open(dir.path()).unwrap();
    // 1100 distinct pages (~70 MiB) under a manifest, then replaced by one small page.
    for chunk in 0..11u32 {
        let pages: Vec<_> = (0..100u32)
            .map(|i| {
                let mut b = vec![0u8; 65536];
                b[..4].copy_from_slice(&(chunk * 100 + i).to_le_bytes());
                (Hash::of(&b), b)
            })
            .collect();
        write_one(&log, "big#0", pages, b"big");
    }
    write_one(&log, "big#0", vec![page(9)], b"small");
    let s = wait_compactions(&log, 1);
    assert_eq!(s.compactions, 1, "{s:?}");
    // 72 MiB were written; after compaction only the live chunk and what followed remain.
    assert!(s.file_bytes < 16 << 20, "{s:?}");
    assert_eq!(log.read_page(&page(9).0).unwrap(), page(9).1);
    log.remove("big#0").unwrap();
    drop(log);
    let log = PageLog::open(dir.path()).unwrap();
    assert!(log.read_manifest("big#0").unwrap().is_none());
}

#[test]
fn pinned_pages_survive_compaction_until_the_pin_drops() {
    let dir = tempfile::tempdir().unwrap();
    let log = PageLog::open(dir.path()).unwrap();
    // A push in flight: pages without a manifest yet, pinned.
    let mut pin = log.pin();
    let pushed: Vec<_> = (0..10u32).map(|i| distinct(1_000_000 + i)).collect();
    pin.add(pushed.iter().map(|(h, _)| *h));
    log.write(&[PageWrite { pages: pushed.clone(), ..Default::default() }], false).unwrap();
    // Enough garbage meanwhile to compact (as in `tombstone_and_compaction_drop_garbage`).
    for chunk in 0..11u32 {
        write_one(&log, "big#0", (0..100u32).map(|i| distinct(chunk * 100 + i)).collect(), b"big");
    }
    write_one(&log, "big#0", vec![page(9)], b"small");
    wait_compactions(&log, 1);
    for (h, b) in &pushed {
        assert_eq!(&log.read_page(h).unwrap(), b, "a pinned page was compacted away");
    }
    // Unpinned and still unreferenced: the next compaction drops them.
    drop(pin);
    for chunk in 0..11u32 {
        write_one(&log, "big#0", (0..100u32).map(|i| distinct(5_000 + chunk * 100 + i)).collect(), b"big");
    }
    write_one(&log, "big#0", vec![page(8)], b"small");
    wait_compactions(&log, 2);
    assert!(!log.has_page(&pushed[0].0));
}

#[test]
fn a_compaction_copies_live_pages_between_garbage_and_in_long_runs_intact() {
    let dir = tempfile::tempdir().unwrap();
    let log = PageLog::open(dir.path()).unwrap();
    log.pause_compactor();
    // Live pages one by one between garbage ones (runs of one), then 40 in a row (runs that
    // stop at the copy's chunk), and each of different lengths.
    let sized = |n: u32, len: usize| {
        let mut b = vec![(n % 251) as u8 + 1; len];
        b[..4].copy_from_slice(&n.to_le_bytes());
        (Hash::of(&b), b)
    };
    let (mut live, mut dead) = (Vec::new(), Vec::new());
    for i in 0..60u32 {
        let (a, b) = (sized(i, 65536 - i as usize * 7), sized(10_000 + i, 65536));
        log.write(&[PageWrite { pages: vec![a.clone(), b.clone()], ..Default::default() }], false).unwrap();
        live.push(a);
        dead.push(b);
    }
    // (The last one is larger than a copy's chunk.)
    let mut run: Vec<_> = (0..40u32).map(|i| sized(20_000 + i, 40_000 + i as usize * 1000)).collect();
    run.push(sized(30_000, 1_500_000));
    write_one(&log, "run#0", run.clone(), b"run");
    let refs = |p: &[(Hash, Vec<u8>)]| p.iter().map(|(h, _)| *h).collect::<Vec<_>>();
    let manifest = |key: &str, p: &[(Hash, Vec<u8>)]| PageWrite {
        key: key.into(),
        manifest: key.as_bytes().to_vec(),
        refs: refs(p),
        ..Default::default()
    };
    log.write(&[manifest("live#0", &live), manifest("dead#0", &dead)], true).unwrap();
    log.remove("dead#0").unwrap();
    // Enough garbage to compact.
    for chunk in 0..11u32 {
        write_one(&log, "big#0", (0..100u32).map(|i| distinct(chunk * 100 + i)).collect(), b"big");
    }
    log.remove("big#0").unwrap();
    // One record's checksum rots after the log was read: the compaction writes it anew.
    let rotten = log.lock().pages[&live[5].0];
    let file = OpenOptions::new().read(true).write(true).open(&log.path).unwrap();
    let at = rotten.offset + u64::from(rotten.len) + 3;
    let mut byte = [0u8];
    file.read_at(&mut byte, at).unwrap();
    file.write_at(&[byte[0] ^ 0x55], at).unwrap();
    assert!(log.compact_if_needed().unwrap());
    assert!(log.stats().file_bytes < 8 << 20, "{:?}", log.stats());
    for (h, b) in live.iter().chain(&run) {
        assert_eq!(&log.read_page(h).unwrap(), b, "compacted: page {h}");
    }
    assert!(!log.has_page(&dead[0].0), "garbage kept");
    assert_eq!(log.read_manifest("live#0").unwrap().as_deref(), Some(&b"live#0"[..]));
    drop(log);
    let log = PageLog::open(dir.path()).unwrap();
    assert_eq!((log.stats().pages, log.stats().manifests), (101, 2), "{:?}", log.stats());
    for (h, b) in live.iter().chain(&run) {
        assert_eq!(&log.read_page(h).unwrap(), b, "reopened: page {h}");
    }
}

#[test]
fn writes_during_a_compaction_are_kept_and_late_references_revive_pages() {
    let dir = tempfile::tempdir().unwrap();
    let log = PageLog::open(dir.path()).unwrap();
    log.pause_compactor();
    for chunk in (2000..3100u32).map(distinct).collect::<Vec<_>>().chunks(100) {
        write_one(&log, "big#0", chunk.to_vec(), b"big");
    }
    write_one(&log, "big#0", vec![page(9)], b"small");
    let before = log.stats().compactions;
    let old = distinct(2500);
    let compacted = log
        .compact_with(|| {
            // Between the copy and the swap: a new checkpoint, and one that refers to a page
            // that was garbage at the snapshot (the write skips it: the log still has it).
            write_one(&log, "other#0", vec![page(4)], b"other");
            write_one(&log, "late#0", vec![old.clone()], b"late");
            log.remove("big#0").unwrap();
        })
        .unwrap();
    assert!(compacted);
    assert_eq!(log.stats().compactions, before + 1);
    let check = |log: &PageLog| {
        assert_eq!(log.read_manifest("other#0").unwrap().unwrap(), b"other");
        assert_eq!(log.read_page(&page(4).0).unwrap(), page(4).1);
        assert_eq!(log.read_manifest("late#0").unwrap().unwrap(), b"late");
        assert_eq!(log.read_page(&old.0).unwrap(), old.1, "a page referred to meanwhile was dropped");
        assert!(log.read_manifest("big#0").unwrap().is_none());
    };
    check(&log);
    assert!(log.stats().file_bytes < 8 << 20, "{:?}", log.stats());
    drop(log);
    check(&PageLog::open(dir.path()).unwrap());
}

#[test]
fn a_big_write_during_a_compaction_is_copied_without_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let log = PageLog::open(dir.path()).unwrap();
    log.pause_compactor();
    for chunk in (4000..5100u32).map(distinct).collect::<Vec<_>>().chunks(100) {
        write_one(&log, "big#0", chunk.to_vec(), b"big");
    }
    write_one(&log, "big#0", vec![page(9)], b"small");
    let fresh: Vec<_> = (6000..6040u32).map(distinct).collect();
    let revived: Vec<_> = (4100..4120u32).map(distinct).collect();
    let compacted = log
        .compact_with(|| {
            // 2.5 MiB of new pages and 1.25 MiB of pages that were garbage at the snapshot: more
            // than a catch-up round leaves for the locked step.
            write_one(&log, "fresh#0", fresh.clone(), b"fresh");
            write_one(&log, "revived#0", revived.clone(), b"revived");
        })
        .unwrap();
    assert!(compacted);
    let stats = log.stats();
    assert_eq!(stats.compaction_locked_bytes_max, 0, "the catch-up round left work for the lock: {stats:?}");
    let check = |log: &PageLog| {
        for (key, pages) in [("fresh#0", &fresh), ("revived#0", &revived)] {
            assert_eq!(log.read_manifest(key).unwrap().unwrap(), key.split('#').next().unwrap().as_bytes());
            for (h, bytes) in pages.iter() {
                assert_eq!(&log.read_page(h).unwrap(), bytes, "{key}: page {h} lost");
            }
        }
        assert_eq!(log.read_manifest("big#0").unwrap().unwrap(), b"small");
        assert!(!log.has_page(&distinct(4500).0), "garbage survived the compaction");
    };
    check(&log);
    assert!(log.stats().file_bytes < 8 << 20, "{:?}", log.stats());
    drop(log);
    check(&PageLog::open(dir.path()).unwrap());
}

#[test]
fn a_version_1_log_is_rewritten_as_version_2_and_garbage_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (h, p) = page(5);
    let mut v1 = Vec::new();
    record::encode_v1(&mut v1, KIND_PAGE, &h.0, &p);
    let mut data = encode_refs(&[h]);
    data.extend_from_slice(b"manifest");
    record::encode_v1(&mut v1, KIND_MANIFEST, b"t/1/1", &data);
    record::encode_v1(&mut v1, KIND_MANIFEST, b"gone/1/1", &encode_refs(&[]));
    record::encode_v1(&mut v1, KIND_TOMBSTONE, b"gone/1/1", &[]);
    fs::write(dir.path().join("pages.log"), &v1).unwrap();
    let log = PageLog::open(dir.path()).unwrap();
    assert_eq!(log.read_page(&h).unwrap(), p);
    assert_eq!(log.read_manifest("t/1/1").unwrap().unwrap(), b"manifest");
    assert_eq!(log.manifest_keys(), ["t/1/1"]);
    drop(log);
    assert!(fs::read(dir.path().join("pages.log")).unwrap().starts_with(MAGIC));
    assert_eq!(PageLog::open(dir.path()).unwrap().read_page(&h).unwrap(), p);

    let other = tempfile::tempdir().unwrap();
    fs::write(other.path().join("pages.log"), b"GIF89a not a page log").unwrap();
    assert!(matches!(PageLog::open(other.path()), Err(PageLogError::Format { .. })));
    assert_eq!(fs::read(other.path().join("pages.log")).unwrap(), b"GIF89a not a page log", "left as it was");
}

#[test]
fn a_manifest_whose_pages_are_gone_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let log = PageLog::open(dir.path()).unwrap();
    write_one(&log, "t/1/1", vec![page(1)], b"m1");
    let before = log.stats();
    // A page checked a moment ago but compacted away since: not here, not in the write.
    let gone = page(2).0;
    let w =
        PageWrite { key: "t/1/2".into(), manifest: b"m2".to_vec(), refs: vec![page(1).0, gone], ..Default::default() };
    assert!(matches!(log.write(&[w], true), Err(PageLogError::MissingPage(h)) if h == gone));
    assert_eq!(log.stats(), before);
    assert!(log.read_manifest("t/1/2").unwrap().is_none());
}

#[test]
fn a_failed_fdatasync_fails_every_later_synced_write_and_they_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = PageLog::open(dir.path()).unwrap();
    let a = page(11);
    log.write(&[PageWrite { pages: vec![a.clone()], ..Default::default() }], false).unwrap();
    log.sync_behind();
    log.write(&[PageWrite { key: "t#1".into(), manifest: b"m".to_vec(), refs: vec![a.0], ..Default::default() }], true)
        .unwrap();
    // A failed fdatasync (as the syncer or any writer records it): the kernel may have dropped
    // unsynced pages of any writer and reports that once, so no later sync may vouch for them.
    *log.sync_failed.lock().unwrap() = Some((std::io::ErrorKind::Other, "injected".into()));
    let b = page(12);
    for key in ["t#2", "t#3"] {
        let w = PageWrite {
            key: key.into(),
            manifest: b"m".to_vec(),
            refs: vec![b.0],
            pages: vec![b.clone()],
            ..Default::default()
        };
        assert!(matches!(log.write(&[w], true), Err(PageLogError::Io { .. })), "{key}");
        assert!(log.read_manifest(key).unwrap().is_none(), "a write that failed must not be stored");
    }
    assert!(!log.has_page(&b.0));
    assert!(log.sync().is_err() && log.remove("t#1").is_err());
    // What was synced before survives a restart, which clears the failure.
    drop(log);
    let log = PageLog::open(dir.path()).unwrap();
    assert_eq!(log.read_page(&a.0).unwrap(), a.1);
    assert!(log.read_manifest("t#1").unwrap().is_some());
    log.write(
        &[PageWrite {
            pages: vec![b.clone()],
            key: "t#4".into(),
            manifest: b"m".to_vec(),
            refs: vec![b.0],
            ..Default::default()
        }],
        true,
    )
    .unwrap();
}
