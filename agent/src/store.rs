//! The agent's internal database: the only module that touches sled. It holds the scan index
//! (what each local file looked like when last hashed), the synced tree (the last state this
//! device and the coordinator agreed on, the planner's merge base), the remote tree (journal heads
//! seen so far), the outbox of commits not yet acknowledged, and the journal cursor. Every value
//! starts with a format-version byte. All updates go through an atomic `Batch`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use shoal_protocol::{Change, CommitId, Entry, EntryKind, Manifest, Seq, SyncPath};

const VALUE_VERSION: u8 = 1;
/// sled's page cache: the agent reads its trees in full once per cycle, so a small cache suffices.
const CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// What a local path looked like when it was last scanned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRec {
    pub kind: EntryKind,
    pub size: u64,
    pub mtime_ns: i64,
    /// Changes on every write and cannot be set back by tools like `touch -r`.
    pub ctime_ns: i64,
    pub inode: u64,
    pub mode: u32,
    /// `Some` for files.
    pub manifest: Option<Manifest>,
    /// When the content was last read, for spotting writes within one mtime tick.
    pub hashed_ns: i64,
}

impl IndexRec {
    /// `true` when `other` has the same size, mtime, ctime, inode and mode.
    pub fn same_stat(&self, other: &IndexRec) -> bool {
        self.kind == other.kind
            && self.size == other.size
            && self.mtime_ns == other.mtime_ns
            && self.ctime_ns == other.ctime_ns
            && self.inode == other.inode
            && self.mode == other.mode
    }
}

/// A commit waiting to be sent. Durable before anything is sent; removed in the same batch that
/// records its acknowledgement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxItem {
    pub commit_id: CommitId,
    pub changes: Vec<Change>,
}

/// The agent database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    state: sled::Tree,
    dir: std::path::PathBuf,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![VALUE_VERSION];
    out.extend(postcard::to_stdvec(v).expect("postcard serializes agent records"));
    out
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    match bytes.split_first() {
        Some((&VALUE_VERSION, rest)) => postcard::from_bytes(rest).ok(),
        _ => None,
    }
}

fn pkey(prefix: &[u8], path: &SyncPath) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(path.as_str().as_bytes());
    k
}

/// A set of updates applied atomically.
#[derive(Default)]
pub struct Batch(sled::Batch, bool);

impl Batch {
    pub fn put_index(&mut self, p: &SyncPath, rec: &IndexRec) {
        self.0.insert(pkey(b"i/", p), encode(rec));
        self.1 = true;
    }
    pub fn del_index(&mut self, p: &SyncPath) {
        self.0.remove(pkey(b"i/", p));
        self.1 = true;
    }
    pub fn put_synced(&mut self, e: &Entry) {
        self.0.insert(pkey(b"s/", &e.path), encode(e));
        self.1 = true;
    }
    pub fn del_synced(&mut self, p: &SyncPath) {
        self.0.remove(pkey(b"s/", p));
        self.1 = true;
    }
    pub fn put_remote(&mut self, e: &Entry) {
        self.0.insert(pkey(b"r/", &e.path), encode(e));
        self.1 = true;
    }
    pub fn set_cursor(&mut self, seq: Seq) {
        self.0.insert(b"m/cursor".to_vec(), seq.to_be_bytes().to_vec());
        self.1 = true;
    }
    pub fn put_outbox(&mut self, id: u64, item: &OutboxItem) {
        self.0.insert(outbox_key(id), encode(item));
        self.1 = true;
    }
    pub fn del_outbox(&mut self, id: u64) {
        self.0.remove(outbox_key(id));
        self.1 = true;
    }
    pub fn is_empty(&self) -> bool {
        !self.1
    }
}

fn outbox_key(id: u64) -> Vec<u8> {
    let mut k = b"o/".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

impl Store {
    /// Opens the database. A database sled cannot read is moved aside and rebuilt: it is a cache
    /// of the disk and the coordinator, and the planner treats an empty merge base safely
    /// (differences become conflicted copies, never overwrites).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        crate::config::create_private_dir(dir)?;
        let open = || sled::Config::new().path(dir).flush_every_ms(Some(500)).cache_capacity(CACHE_BYTES).open();
        let db = match open() {
            Ok(db) => db,
            Err(sled::Error::Corruption { .. }) => {
                let aside = dir.with_extension(format!("corrupt-{}", std::process::id()));
                tracing::error!(db = %dir.display(), aside = %aside.display(), "agent database is corrupt; rebuilding it");
                std::fs::rename(dir, &aside)?;
                open()?
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("opening {} (is another shoal process using this home?)", dir.display()));
            }
        };
        // sled creates its files with the process umask; the directory is 0700 already, and what
        // sled made so far loses group and other access too.
        if let Err(e) = crate::config::tighten_tree(dir) {
            tracing::warn!(db = %dir.display(), error = %e, "cannot restrict the database's files to their owner");
        }
        let state = db.open_tree("state")?;
        Ok(Store { db, state, dir: dir.to_path_buf() })
    }

    pub fn apply(&self, batch: Batch) -> anyhow::Result<()> {
        if !batch.is_empty() {
            self.state.apply_batch(batch.0)?;
        }
        Ok(())
    }

    /// Makes everything applied so far durable. sled's own flush uses `sync_file_range` and
    /// leaves large values (blob files) unsynced, so the file system holding the database is
    /// synced too: a lost record could otherwise read as a remote deletion after a power cut.
    pub async fn flush(&self) -> anyhow::Result<()> {
        self.db.flush_async().await?;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> { crate::syncfs(&std::fs::File::open(dir)?) })
            .await??;
        Ok(())
    }

    fn load<T: DeserializeOwned>(&self, prefix: &[u8]) -> anyhow::Result<BTreeMap<SyncPath, T>> {
        let mut out = BTreeMap::new();
        for kv in self.state.scan_prefix(prefix) {
            let (k, v) = kv?;
            let (Ok(s), Some(val)) = (std::str::from_utf8(&k[prefix.len()..]), decode(&v)) else {
                tracing::warn!(key = %String::from_utf8_lossy(&k), "skipping an unreadable database record");
                continue;
            };
            if let Ok(p) = SyncPath::parse(s) {
                out.insert(p, val);
            }
        }
        Ok(out)
    }

    pub fn index(&self) -> anyhow::Result<BTreeMap<SyncPath, IndexRec>> {
        self.load(b"i/")
    }

    pub fn synced(&self) -> anyhow::Result<BTreeMap<SyncPath, Entry>> {
        self.load(b"s/")
    }

    pub fn remote(&self) -> anyhow::Result<BTreeMap<SyncPath, Entry>> {
        self.load(b"r/")
    }

    /// The remote head of one path, if known.
    pub fn remote_entry(&self, path: &SyncPath) -> anyhow::Result<Option<Entry>> {
        Ok(self.state.get(pkey(b"r/", path))?.and_then(|v| decode(&v)))
    }

    pub fn cursor(&self) -> anyhow::Result<Seq> {
        Ok(self.state.get(b"m/cursor")?.and_then(|v| <[u8; 8]>::try_from(&v[..]).ok()).map_or(0, u64::from_be_bytes))
    }

    pub fn outbox(&self) -> anyhow::Result<Vec<(u64, OutboxItem)>> {
        let mut out = Vec::new();
        for kv in self.state.scan_prefix(b"o/") {
            let (k, v) = kv?;
            let id = <[u8; 8]>::try_from(&k[2..]).map(u64::from_be_bytes).unwrap_or(0);
            match decode(&v) {
                Some(item) => out.push((id, item)),
                None => tracing::warn!(id, "dropping an unreadable outbox item; the next scan re-plans it"),
            }
        }
        Ok(out)
    }

    pub fn next_outbox_id(&self) -> anyhow::Result<u64> {
        Ok(self.db.generate_id()?)
    }
}
