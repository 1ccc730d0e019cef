use super::*;
use proptest::prelude::*;
use shoal_protocol::{ChunkId, ChunkRef};

fn path(s: &str) -> SyncPath {
    SyncPath::parse(s).unwrap()
}

fn manifest(seed: u8) -> Manifest {
    Manifest { size: 10, hash: ChunkId::of(&[seed]), chunks: vec![ChunkRef { id: ChunkId::of(&[seed, 1]), len: 10 }] }
}

fn entry(p: &SyncPath, version: Seq, seed: u8) -> Entry {
    Entry {
        path: p.clone(),
        kind: EntryKind::File,
        manifest: Some(manifest(seed)),
        exec: seed.is_multiple_of(2),
        mtime_ns: 5,
        deleted: seed.is_multiple_of(5),
        version,
        base: version.checked_sub(1),
        device: DeviceId([seed; 16]),
        time_ms: 7,
    }
}

fn index(seed: u8) -> IndexRec {
    IndexRec {
        kind: EntryKind::File,
        size: 10,
        mtime_ns: i64::from(seed),
        ctime_ns: 2,
        inode: 3,
        mode: 0o644,
        manifest: Some(manifest(seed / 2)),
        hashed_ns: 4,
    }
}

/// One update of the model-based test: (which record, path number, value seed or delete).
#[derive(Debug, Clone)]
enum Op {
    Index(usize, Option<u8>),
    Synced(usize, Option<u8>),
    Remote(usize, Option<u8>),
    RemoteIfNewer(usize, u8, Seq),
}

/// Paths spread over a few directories, one of them large enough to need several pages.
fn path_of(n: usize) -> SyncPath {
    match n % 4 {
        0 => path(&format!("big/f{n:04}")),
        1 => path(&format!("f{n}")),
        2 => path(&format!("big/sub/g{n}")),
        _ => path(&format!("bigger/h{n}")),
    }
}

fn op() -> impl Strategy<Value = Op> {
    let n = 0usize..1600;
    prop_oneof![
        (n.clone(), proptest::option::weighted(0.8, any::<u8>())).prop_map(|(n, v)| Op::Index(n, v)),
        (n.clone(), proptest::option::weighted(0.8, any::<u8>())).prop_map(|(n, v)| Op::Synced(n, v)),
        (n.clone(), proptest::option::weighted(0.8, any::<u8>())).prop_map(|(n, v)| Op::Remote(n, v)),
        (n, any::<u8>(), 0u64..20).prop_map(|(n, v, s)| Op::RemoteIfNewer(n, v, s)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Pages split and vanish as paths come and go; whatever the batches, the store reads back
    /// exactly what a plain map of path → records holds, per path, per directory and in full.
    #[test]
    fn pages_behave_like_a_map(
        batches in proptest::collection::vec(proptest::collection::vec(op(), 1..400), 1..6),
        merge_at in (1usize..400, 1usize..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("db")).unwrap();
        // Chunk map merges at random points, or (large limits) never.
        store.merge_at = if merge_at.0 > 300 { (usize::MAX, usize::MAX, usize::MAX) } else { (merge_at.0, merge_at.1, merge_at.0) };
        let mut model: BTreeMap<SyncPath, Slot> = BTreeMap::new();
        for ops in batches {
            let mut b = Batch::default();
            for op in ops {
                let (n, m) = match &op {
                    Op::Index(n, _) | Op::Synced(n, _) | Op::Remote(n, _) | Op::RemoteIfNewer(n, ..) => (*n, path_of(*n)),
                };
                let _ = n;
                let slot = model.entry(m.clone()).or_default();
                match op {
                    Op::Index(_, Some(v)) => { b.put_index(&m, &index(v)); slot.index = Some(index(v)); }
                    Op::Index(_, None) => { b.del_index(&m); slot.index = None; }
                    Op::Synced(_, Some(v)) => { b.put_synced(&entry(&m, 1, v)); slot.synced = Some(entry(&m, 1, v)); }
                    Op::Synced(_, None) => { b.del_synced(&m); slot.synced = None; }
                    Op::Remote(_, Some(v)) => { b.put_remote(&entry(&m, 9, v)); slot.remote = Some(entry(&m, 9, v)); }
                    Op::Remote(_, None) => { b.edit(&m).remote = Set::To(None); b.edit(&m).remote_if_newer = None; slot.remote = None; }
                    Op::RemoteIfNewer(_, v, seq) => {
                        b.put_remote_if_newer(&entry(&m, seq, v));
                        // The model applies it at apply time, like the store: after this batch's
                        // plain sets of the same path.
                        let _ = slot;
                    }
                }
            }
            // Replay the conditional sets on the model in batch order, after plain sets.
            for (p, e) in &b.slots {
                if let Some(newer) = &e.remote_if_newer {
                    let slot = model.entry(p.clone()).or_default();
                    if slot.remote.as_ref().is_none_or(|r| r.version < newer.version) {
                        slot.remote = Some(newer.clone());
                    }
                }
            }
            store.apply(b).unwrap();
            model.retain(|_, s| !s.is_empty());
        }
        // In full.
        let t = store.trees().unwrap();
        let mut full: BTreeMap<SyncPath, Slot> = BTreeMap::new();
        for (p, r) in t.index { full.entry(p).or_default().index = Some(r); }
        for (p, e) in t.synced { full.entry(p).or_default().synced = Some(e); }
        for (p, e) in t.remote { full.entry(p).or_default().remote = Some(e); }
        prop_assert_eq!(&full, &model);
        // Per path, including absent ones.
        for n in 0..1600 {
            let p = path_of(n);
            prop_assert_eq!(store.get(&p).unwrap(), model.get(&p).cloned().unwrap_or_default());
        }
        // Per directory and subtree.
        let mut top = BTreeMap::new();
        store.children(None, |p, s| { top.insert(p, s); }).unwrap();
        let want: BTreeMap<_, _> = model.iter().filter(|(p, _)| p.depth() == 1).map(|(p, s)| (p.clone(), s.clone())).collect();
        prop_assert_eq!(top, want);
        let mut big = BTreeMap::new();
        store.subtree(&path("big"), |p, s| { big.insert(p, s); }).unwrap();
        let want: BTreeMap<_, _> = model.iter().filter(|(p, _)| p.starts_with(&path("big")) && p.as_str() != "big").map(|(p, s)| (p.clone(), s.clone())).collect();
        prop_assert_eq!(big, want);
        // The chunk map holds exactly each indexed file's chunks, and lookups find them.
        let mut want: std::collections::BTreeSet<(ChunkId, SyncPath)> = std::collections::BTreeSet::new();
        for (p, slot) in &model {
            for c in slot.index.iter().flat_map(|r| r.manifest.iter()).flat_map(|m| m.chunks.iter()) {
                want.insert((c.id, p.clone()));
            }
        }
        let have = chunk_map::effective(&store.state, &store.delta.lock().unwrap());
        prop_assert_eq!(&have.keys().cloned().collect::<std::collections::BTreeSet<_>>(), &want);
        // What a restart reads back from the delta's records is the same map.
        let reloaded = Delta::load(&store.state).unwrap();
        prop_assert_eq!(&chunk_map::effective(&store.state, &reloaded), &have);
        let probe: Vec<ChunkId> = (0..=255u8).map(|seed| ChunkId::of(&[seed, 1])).collect();
        let found = store.chunk_locations(&probe).unwrap();
        for id in &probe {
            let holders: Vec<&SyncPath> = want.iter().filter(|(c, _)| c == id).map(|(_, p)| p).collect();
            match found.get(id) {
                Some(l) => prop_assert!(holders.contains(&&l.path) && l.offset == 0 && l.len == 10),
                None => prop_assert!(holders.is_empty()),
            }
        }
        // Pages respect their limits.
        for kv in store.state.scan_prefix(b"p/") {
            let (k, v) = kv.unwrap();
            let page = decode_page(&k, &v);
            prop_assert!(!page.is_empty() && page.len() <= PAGE_MAX_SLOTS);
            prop_assert!(page.windows(2).all(|w| w[0].name < w[1].name));
        }
    }
}

#[test]
fn a_large_directory_needs_few_keys() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db")).unwrap();
    let mut b = Batch::default();
    for i in 0..10_000 {
        let p = path(&format!("d{}/file-{i:05}", i % 10));
        b.put_index(&p, &index(2));
        b.put_synced(&entry(&p, 3, 1));
        b.put_remote(&entry(&p, 3, 1));
    }
    store.apply(b).unwrap();
    let keys = store.state.scan_prefix(b"p/").count();
    assert!(keys <= 10_000 / 100, "{keys} page keys for 10,000 paths");
    // One shared manifest per slot, not three copies.
    let (_, v) = store.state.scan_prefix(b"p/d3\0").next().unwrap().unwrap();
    let page = decode_page(b"p/d3\0", &v);
    assert!(page.iter().all(|s| s.manifests.len() == 1), "index and entries share a manifest");
    let before = store.reads();
    store.get(&path("d3/file-00013")).unwrap();
    let read = store.reads() - before;
    assert!(read <= PAGE_MAX_SLOTS as u64, "a lookup decodes one page, not the directory: {read}");
}

/// Writes records the way layout 1 stored them.
/// A store over `raw` as `Store::open` makes it, but not migrated.
fn unmigrated(raw: sled::Db, dir: &Path, files: Arc<shoal_sys::dbsync::DbFiles>) -> Store {
    Store {
        state: raw.open_tree("state").unwrap(),
        db: raw,
        dir: dir.to_path_buf(),
        files,
        reads: Arc::default(),
        delta: Arc::default(),
        merge_at: (chunk_map::MERGE_PAIRS, chunk_map::MERGE_RECORDS, chunk_map::MERGE_PAIRS_MAX),
    }
}

fn write_layout1(state: &sled::Tree, index_recs: &[(SyncPath, IndexRec)], synced: &[Entry], remote: &[Entry]) {
    for (p, r) in index_recs {
        state.insert([&b"i/"[..], p.as_str().as_bytes()].concat(), encode(r)).unwrap();
    }
    for e in synced {
        state.insert([&b"s/"[..], e.path.as_str().as_bytes()].concat(), encode(e)).unwrap();
    }
    for e in remote {
        state.insert([&b"r/"[..], e.path.as_str().as_bytes()].concat(), encode(e)).unwrap();
    }
}

#[test]
fn layout1_migrates_in_resumable_steps() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let paths: Vec<SyncPath> = (0..300).map(|i| path(&format!("dir{}/n{i}", i % 3))).collect();
    let idx: Vec<(SyncPath, IndexRec)> = paths.iter().map(|p| (p.clone(), index(4))).collect();
    let synced: Vec<Entry> = paths.iter().take(250).map(|p| entry(p, 2, 4)).collect();
    let remote: Vec<Entry> = paths.iter().map(|p| entry(p, 3, 6)).collect();
    let item = OutboxItem { commit_id: CommitId([9; 16]), changes: Vec::new() };
    {
        let raw = shoal_sys::dbsync::open_waiting(|| sled::open(&db)).unwrap();
        let state = raw.open_tree("state").unwrap();
        write_layout1(&state, &idx, &synced, &remote);
        state.insert(b"m/cursor", &42u64.to_be_bytes()).unwrap();
        state.insert(outbox_key(5), encode(&item)).unwrap();
        // An unreadable record is dropped, not fatal.
        state.insert(b"s/dir0/broken", &[1, 0xff][..]).unwrap();
        raw.flush().unwrap();
    }
    {
        // A first start that stops after one small step (as if killed mid-migration).
        let raw = shoal_sys::dbsync::open_waiting(|| sled::open(&db)).unwrap();
        let files = Arc::new(shoal_sys::dbsync::DbFiles::new(&db).unwrap());
        let store = unmigrated(raw, &db, files);
        let mut b = Batch::default();
        let first: Vec<_> = store.state.scan_prefix(b"i/").take(50).map(|kv| kv.unwrap()).collect();
        for (k, v) in first {
            let p = path(std::str::from_utf8(&k[2..]).unwrap());
            b.put_index(&p, &decode::<IndexRec>(&v).unwrap());
            b.raw_remove(k);
        }
        store.apply(b).unwrap();
        store.db.flush().unwrap();
    }
    let store = Store::open(&db).unwrap();
    let t = store.trees().unwrap();
    assert_eq!(t.index, idx.into_iter().collect());
    assert_eq!(t.synced, synced.into_iter().map(|e| (e.path.clone(), e)).collect());
    assert_eq!(t.remote, remote.into_iter().map(|e| (e.path.clone(), e)).collect());
    assert_eq!(store.cursor().unwrap(), 42);
    assert_eq!(store.outbox().unwrap().len(), 1);
    for prefix in [&b"i/"[..], b"s/", b"r/"] {
        assert_eq!(store.state.scan_prefix(prefix).count(), 0, "old keys are gone");
    }
    assert_eq!(store.state.get(b"m/layout").unwrap().as_deref(), Some(&[LAYOUT][..]));
    drop(store);
    // Reopening does nothing more, and a layout from the future is refused.
    let store = Store::open(&db).unwrap();
    store.state.insert(b"m/layout", &[LAYOUT + 1]).unwrap();
    drop(store);
    let err = Store::open(&db).err().expect("an unknown layout is refused").to_string();
    assert!(err.contains("newer version"), "{err}");
}

#[test]
fn small_migration_steps_cover_everything() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let paths: Vec<SyncPath> = (0..100).map(|i| path(&format!("x/y{i}"))).collect();
    let remote: Vec<Entry> = paths.iter().map(|p| entry(p, 3, 6)).collect();
    {
        let raw = shoal_sys::dbsync::open_waiting(|| sled::open(&db)).unwrap();
        write_layout1(&raw.open_tree("state").unwrap(), &[], &[], &remote);
        raw.flush().unwrap();
    }
    let raw = shoal_sys::dbsync::open_waiting(|| sled::open(&db)).unwrap();
    let files = Arc::new(shoal_sys::dbsync::DbFiles::new(&db).unwrap());
    let store = unmigrated(raw, &db, files);
    store.migrate(7).unwrap();
    assert_eq!(store.trees().unwrap().remote.len(), 100);
}

fn loc(seed: u8, p: &str, offset: u64) -> ChunkLoc {
    ChunkLoc { id: ChunkId::of(&[seed, 1]), path: path(p), offset, len: 10 }
}

#[test]
fn a_bucket_edit_drops_replaces_and_adds_in_order() {
    let first =
        edit_bucket(Vec::new(), Vec::new(), vec![loc(1, "b", 0), loc(1, "a", 0), loc(2, "a", 5), loc(1, "a", 3)]);
    let records = bucket_records(&first);
    let mut want = [loc(1, "a", 3), loc(1, "b", 0), loc(2, "a", 5)];
    want.sort_by(|a, b| (&a.id, &a.path).cmp(&(&b.id, &b.path)));
    let got: Vec<(ChunkId, &str, u64)> = records.iter().map(|r| (ChunkId(*r.id), r.path, r.offset)).collect();
    let expect: Vec<(ChunkId, &str, u64)> = want.iter().map(|l| (l.id, l.path.as_str(), l.offset)).collect();
    assert_eq!(got, expect, "the last of a pair added twice wins, records sorted by (chunk, path)");

    let second =
        edit_bucket(bucket_records(&first), vec![(loc(1, "b", 0).id, path("b"))], vec![loc(2, "a", 9), loc(3, "c", 1)]);
    let got: Vec<(ChunkId, &str, u64)> =
        bucket_records(&second).iter().map(|r| (ChunkId(*r.id), r.path, r.offset)).collect();
    let mut expect = vec![(loc(1, "a", 3).id, "a", 3), (loc(2, "a", 9).id, "a", 9), (loc(3, "c", 1).id, "c", 1)];
    expect.sort();
    assert_eq!(got, expect);
    assert_eq!(
        edit_bucket(bucket_records(&second), expect.iter().map(|(id, p, _)| (*id, path(p))).collect(), Vec::new()),
        vec![BUCKET_VERSION]
    );
}

#[test]
fn a_damaged_bucket_yields_what_precedes_the_damage() {
    let v = edit_bucket(Vec::new(), Vec::new(), vec![loc(1, "a", 0), loc(2, "bb", 0)]);
    let first_len = bucket_records(&v)[0].bytes.len();
    // Cut inside the second record's path, and give the second record a path that is not UTF-8.
    assert_eq!(bucket_records(&v[..v.len() - 1]).len(), 1);
    let mut bad = v.clone();
    let at = 1 + first_len + BUCKET_RECORD_HEAD;
    bad[at] = 0xff;
    assert_eq!(bucket_records(&bad).len(), 1);
    assert!(bucket_records(&[]).is_empty() && bucket_records(&[9, 1, 2]).is_empty());
}

/// Buckets written by layout 2's first release (postcard, which decoded every record on every
/// edit) are read as they are and rewritten in the current form when next edited.
#[test]
fn first_form_buckets_are_read_and_rewritten_when_edited() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db")).unwrap();
    let old = vec![loc(7, "x/one", 0), loc(7, "w", 4)];
    let key = chunk_key(&old[0].id);
    store.state.insert(key, encode(&old)).unwrap();
    let found = store.chunk_locations(&[old[0].id]).unwrap();
    assert_eq!(found[&old[0].id], old[1], "the first location by path");

    // An edit of the bucket: a new file holds the same chunk.
    let mut b = Batch::default();
    let m = Manifest { size: 10, hash: ChunkId::of(&[7]), chunks: vec![ChunkRef { id: old[0].id, len: 10 }] };
    b.put_index(&path("v"), &IndexRec { manifest: Some(m), ..index(7) });
    store.apply(b).unwrap();
    assert_eq!(store.chunk_locations(&[old[0].id]).unwrap()[&old[0].id].path, path("v"), "from the delta");
    chunk_map::merge(&store.state, &store.delta).unwrap();
    let v = store.state.get(key).unwrap().unwrap();
    assert_eq!(v[0], BUCKET_VERSION);
    let paths: Vec<&str> = bucket_records(&v).iter().map(|r| r.path).collect();
    assert_eq!(paths, ["v", "w", "x/one"]);
    assert_eq!(store.chunk_locations(&[old[0].id]).unwrap()[&old[0].id].path, path("v"));
}

/// A merge cut short after rewriting buckets but before removing the delta's records reads the
/// same after a restart, and merging again changes nothing.
#[test]
fn a_merge_cut_short_is_done_again() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let file = |seed: u8, chunks: &[u8]| IndexRec {
        manifest: Some(Manifest {
            size: 10 * chunks.len() as u64,
            hash: ChunkId::of(&[seed]),
            chunks: chunks.iter().map(|c| ChunkRef { id: ChunkId::of(&[*c]), len: 10 }).collect(),
        }),
        ..index(seed)
    };
    let expected;
    {
        let store = Store::open(&db).unwrap();
        let mut b = Batch::default();
        for i in 0..40u8 {
            b.put_index(&path(&format!("f{i}")), &file(i, &[i, 100 + i / 2]));
        }
        store.apply(b).unwrap();
        chunk_map::merge(&store.state, &store.delta).unwrap();
        // Changes after the merge: one file edited, one removed, one added.
        let mut b = Batch::default();
        b.put_index(&path("f3"), &file(3, &[200]));
        b.del_index(&path("f4"));
        b.put_index(&path("g"), &file(99, &[4, 201]));
        store.apply(b).unwrap();
        expected = chunk_map::effective(&store.state, &store.delta.lock().unwrap());
        assert!(!expected.contains_key(&(ChunkId::of(&[4]), path("f4"))));
        assert!(expected.contains_key(&(ChunkId::of(&[4]), path("g"))));
        let records: Vec<_> = store.state.scan_prefix(b"d/").map(|kv| kv.unwrap()).collect();
        assert_eq!(records.len(), 1);
        chunk_map::merge(&store.state, &store.delta).unwrap();
        assert_eq!(store.state.scan_prefix(b"d/").count(), 0);
        // As if the merge had stopped before removing its records.
        for (k, v) in records {
            store.state.insert(k, v).unwrap();
        }
        store.db.flush().unwrap();
    }
    let store = Store::open(&db).unwrap();
    assert_eq!(chunk_map::effective(&store.state, &store.delta.lock().unwrap()), expected);
    let found = store.chunk_locations(&[ChunkId::of(&[4]), ChunkId::of(&[200]), ChunkId::of(&[3])]).unwrap();
    assert_eq!(found[&ChunkId::of(&[4])].path, path("g"));
    assert_eq!(found[&ChunkId::of(&[200])].path, path("f3"));
    assert!(!found.contains_key(&ChunkId::of(&[3])), "no file holds chunk 3 any more");
    // A chunk two files share is found at the first by path.
    assert_eq!(store.chunk_locations(&[ChunkId::of(&[101])]).unwrap()[&ChunkId::of(&[101])].path, path("f2"));
    chunk_map::merge(&store.state, &store.delta).unwrap();
    assert_eq!(chunk_map::effective(&store.state, &store.delta.lock().unwrap()), expected);
}

/// A merge rewrites nearly every bucket, so the delta waits for more changes as the buckets
/// grow (one pair per 256 bytes of them), between the least and the most configured.
#[test]
fn merges_wait_longer_as_the_buckets_grow() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("db")).unwrap();
    store.merge_at = (8, usize::MAX, 300);
    let mut gaps = Vec::new();
    let mut since = 0;
    for i in 0..2_000u32 {
        let id = ChunkId::of(&i.to_le_bytes());
        let m = Manifest { size: 10, hash: id, chunks: vec![ChunkRef { id, len: 10 }] };
        let mut b = Batch::default();
        b.put_index(&path(&format!("d{}/file-{i}", i / 100)), &IndexRec { manifest: Some(m), ..index(1) });
        store.apply(b).unwrap();
        since += 1;
        if store.state.scan_prefix(b"d/").next().is_none() {
            gaps.push(std::mem::take(&mut since));
        }
    }
    // The least while the buckets are small, then more as they grow: ~60 bytes per record, so
    // 2,000 records call for ~470 pairs, past the most.
    assert_eq!(gaps[..2], [8, 8], "{gaps:?}");
    assert!(gaps.windows(2).all(|w| w[0] <= w[1]) && gaps.len() > 10, "{gaps:?}");
    assert_eq!(gaps.last(), Some(&300), "{gaps:?}");
    let map = chunk_map::effective(&store.state, &store.delta.lock().unwrap());
    assert_eq!(map.len(), 2_000);
}

#[test]
fn edits_that_change_nothing_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db")).unwrap();
    let (a, b) = (path("d/a"), path("d/b"));
    let mut batch = Batch::default();
    batch.put_remote(&entry(&a, 3, 1));
    batch.put_synced(&entry(&a, 3, 1));
    batch.put_index(&b, &index(4));
    store.apply(batch).unwrap();
    let mut events = store.state.watch_prefix(b"");
    // The same records again, and a remote older than the one held: the page is not rewritten.
    let mut batch = Batch::default();
    batch.put_remote(&entry(&a, 3, 1));
    batch.put_remote_if_newer(&entry(&a, 2, 9));
    batch.put_index(&b, &index(4));
    assert!(store.apply_unsynced(batch).unwrap().is_empty());
    let wait = std::time::Duration::from_millis(200);
    assert!(events.next_timeout(wait).is_err(), "nothing written");
    let mut batch = Batch::default();
    batch.put_remote(&entry(&a, 4, 1));
    assert_eq!(store.apply_unsynced(batch).unwrap(), std::slice::from_ref(&a));
    assert!(events.next_timeout(wait).is_ok(), "a new remote version is written");
    assert_eq!(store.get(&a).unwrap().remote.unwrap().version, 4);
}
