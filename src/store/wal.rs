//! The write-ahead file of the durable log: where records are appended before they are
//! acknowledged, with one `write` and one `fdatasync` per group commit.
//!
//! ```text
//!  NAME.wal/ID-00000000000000000007.wal   beside NAME.redb: the segment being written
//!  NAME.wal/ID-00000000000000000006.wal   the full one before it (two files, each
//!                                         zero-filled once, then reused)
//!  ID: the database's random id (hex), in its `meta` table
//!  frame: crc32:u32le len:u32le uid:u64le lsn:u64le record[len]
//!         crc32 over segment-number:u64le, then everything after the crc
//! ```
//!
//! A redb commit rewrites several B-tree pages and costs far more CPU than the record it
//! adds, so records go here first. The segment is written in place: its blocks exist
//! already, so an `fdatasync` flushes data only, no file size or extent. Snapshots,
//! bucket specs and older records stay in redb.
//!
//! When the segment is full, appends go on in a second one. When that one is full too,
//! the records in the first that no snapshot covers (by then, usually few: a busy bucket
//! snapshots every [`crate::engine::SNAPSHOT_EVERY_RECORDS`]) move into redb's `log`
//! table in one transaction, and the first file is reused under the next segment
//! number. Its old frames then fail their checksum, which includes the number. At open
//! and after a failed write ([`super::Store::reopen`]) every valid frame on disk moves
//! into redb the same way, so readers of the log ([`super::Store::replay`]) only ever
//! read redb. Moving a record twice (a crash between the move and the renumbering) puts
//! the same bytes under the same key.
//!
//! The frames of a segment are valid up to the first one that is not: a torn write at a
//! crash is where the log ends. Every record before it was synced before any later one
//! was acknowledged.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redb::{Database, ReadableTable};

use super::log::{LOG, SNAPSHOTS};
use super::{META, SCHEMA_VERSION};

/// The schema version of a database whose records may be in its WAL.
const WAL_SCHEMA: u64 = 2;
const _: () = assert!(SCHEMA_VERSION >= WAL_SCHEMA);
use super::{io as store_io, StoreError};

/// The default size a segment is zero-filled to; a batch that does not fit starts the
/// next one (a batch larger than the segment grows the file).
pub const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// Frame header: crc, length, uid, lsn.
const HEADER: usize = 4 + 4 + 8 + 8;
const SUFFIX: &str = ".wal";

/// What the WAL is about to do to its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Create a segment.
    Create,
    /// Write frames.
    Write,
    /// `fdatasync` them.
    Sync,
    /// Renumber a segment.
    Rename,
    /// Remove a segment.
    Remove,
}

/// Called before each step of the WAL on its files: tests inject disk failures here.
pub type IoCheck = Arc<dyn Fn(Step) -> io::Result<()> + Send + Sync>;

/// One record to append: bucket uid, lsn, [`super::log::Record`] bytes.
pub type Entry<'a> = (u64, u64, &'a [u8]);

/// The WAL directory and the segment being written.
pub struct Wal {
    dir: PathBuf,
    /// The database's id for its segments (`meta` `wal`), 0 before the first: a
    /// directory that belongs to another database is refused, never mixed in.
    id: u64,
    segment_bytes: u64,
    check: Option<IoCheck>,
    stats: Arc<WalStats>,
    segment: Option<Segment>,
    /// The full segment before it, kept until this one fills too: by then snapshots
    /// cover most of its records, so few have to move.
    sealed: Option<Segment>,
    /// A file to reuse for the next segment, its frames already moved (stale).
    spare: Option<Segment>,
    /// The number the next new segment gets: above every number on disk.
    next_no: u64,
    /// Buckets dropped, with the segment being written then: their records (in that
    /// segment or older ones) are not moved.
    forgotten: HashMap<u64, u64>,
    buf: Vec<u8>,
}

struct Segment {
    no: u64,
    path: PathBuf,
    file: File,
    /// Where the next frame goes.
    pos: u64,
    /// The file's length.
    len: u64,
}

/// What the WAL did, for server INFO (atomics: INFO must not wait for an fsync).
#[derive(Debug, Default)]
pub struct WalStats {
    /// The segment's number.
    pub segment: AtomicU64,
    /// Bytes of frames in it.
    pub bytes: AtomicU64,
    /// Segments filled.
    pub seals: AtomicU64,
    /// Records moved into the database file.
    pub moved: AtomicU64,
}

impl WalStats {
    /// As JSON, for server INFO.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "segment": self.segment.load(Ordering::Relaxed),
            "bytes": self.bytes.load(Ordering::Relaxed),
            "seals": self.seals.load(Ordering::Relaxed),
            "moved": self.moved.load(Ordering::Relaxed),
        })
    }
}

impl Wal {
    /// The WAL in `dir` (created at the first append) with segments of `segment_bytes`;
    /// `check` as [`IoCheck`].
    pub fn new(dir: PathBuf, segment_bytes: u64, check: Option<IoCheck>) -> Wal {
        Wal {
            dir,
            id: 0,
            segment_bytes,
            check,
            stats: Arc::default(),
            segment: None,
            sealed: None,
            spare: None,
            next_no: 1,
            forgotten: HashMap::new(),
            buf: Vec::new(),
        }
    }

    /// The WAL directory beside database file `NAME.redb`: `NAME.wal`.
    pub fn dir_beside(db: &Path) -> PathBuf {
        db.with_extension("wal")
    }

    /// The counters INFO shows.
    pub fn stats(&self) -> Arc<WalStats> {
        self.stats.clone()
    }

    fn check(&self, step: Step) -> io::Result<()> {
        self.check.as_ref().map_or(Ok(()), |check| check(step))
    }

    /// Moves every valid record on disk into redb, then reuses the newest segment file
    /// for the next appends and the one before it as the spare. Returns the records
    /// moved.
    ///
    /// # Errors
    /// [`StoreError::Io`]; nothing is deleted then.
    pub fn drain(&mut self, db: &Database) -> Result<u64, StoreError> {
        self.segment = None;
        self.sealed = None;
        self.spare = None;
        self.id = wal_id(db)?;
        if !self.dir.exists() && self.id != 0 {
            return Err(StoreError::WalMissing(self.dir.display().to_string()));
        }
        let mut segments = self.segments()?;
        let mut moved = 0;
        if !segments.is_empty() {
            let tx = db.begin_write().map_err(store_io)?;
            {
                let mut mover = Mover::new(&tx, &self.forgotten)?;
                for (no, path) in &segments {
                    let bytes = std::fs::read(path).map_err(|e| self.error("read", e))?;
                    for entry in frames(*no, &bytes) {
                        moved += mover.put(entry)?;
                    }
                }
            }
            tx.commit().map_err(store_io)?;
            self.stats.moved.fetch_add(moved, Ordering::Relaxed);
        }
        self.forgotten.clear();
        let Some(&(newest, _)) = segments.last() else {
            return Ok(moved);
        };
        self.next_no = newest + 1;
        // The two newest files are kept for reuse: renumbered, so that what they hold
        // can never be read again. Any others go.
        let keep = segments.split_off(segments.len().saturating_sub(2));
        for (_, path) in segments {
            self.check(Step::Remove)
                .map_err(|e| self.error("remove", e))?;
            std::fs::remove_file(&path).map_err(|e| self.error("remove", e))?;
            self.sync_dir()?;
        }
        for (no, path) in keep {
            let file = File::options()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| self.error("open", e))?;
            let len = file.metadata().map_err(|e| self.error("open", e))?.len();
            let segment = self.renumber(Segment {
                no,
                path,
                file,
                pos: 0,
                len,
            })?;
            self.spare = self.segment.replace(segment);
        }
        Ok(moved)
    }

    /// Appends `entries` and syncs them: on return they are on disk.
    ///
    /// # Errors
    /// [`StoreError::Io`]. The segment is then given up: the caller reopens the store,
    /// which drains what did reach the disk.
    pub fn append(&mut self, db: &Database, entries: &[Entry<'_>]) -> Result<(), StoreError> {
        let result = self.try_append(db, entries);
        if result.is_err() {
            self.segment = None;
            self.sealed = None;
            self.spare = None;
        }
        result
    }

    fn try_append(&mut self, db: &Database, entries: &[Entry<'_>]) -> Result<(), StoreError> {
        let size: u64 = entries
            .iter()
            .map(|(_, _, record)| (HEADER + record.len()) as u64)
            .sum();
        let mut segment = match self.segment.take() {
            Some(segment) => segment,
            None => self.create(db)?,
        };
        if segment.pos > 0 && segment.pos + size > segment.len {
            let next = match (self.sealed.take(), self.spare.take()) {
                (Some(older), _) => self.retire(db, older)?,
                (None, Some(spare)) => self.renumber(spare)?,
                (None, None) => self.create(db)?,
            };
            self.sealed = Some(segment);
            segment = next;
            self.stats.seals.fetch_add(1, Ordering::Relaxed);
        }
        self.buf.clear();
        for &(uid, lsn, record) in entries {
            encode(&mut self.buf, segment.no, uid, lsn, record)?;
        }
        self.check(Step::Write)
            .map_err(|e| self.error("write", e))?;
        segment
            .file
            .write_all_at(&self.buf, segment.pos)
            .map_err(|e| self.error("write", e))?;
        self.check(Step::Sync).map_err(|e| self.error("sync", e))?;
        segment
            .file
            .sync_data()
            .map_err(|e| self.error("sync", e))?;
        segment.pos += size;
        segment.len = segment.len.max(segment.pos);
        self.stats.bytes.store(segment.pos, Ordering::Relaxed);
        if self.buf.capacity() > 4 * 1024 * 1024 {
            self.buf = Vec::new();
        }
        self.segment = Some(segment);
        Ok(())
    }

    /// Bucket `uid` was dropped and its redb data removed: its records are not moved.
    pub fn forget(&mut self, uid: u64) {
        let no = self.segment.as_ref().map_or(self.next_no, |s| s.no);
        self.forgotten.insert(uid, no);
    }

    /// Moves the records of a full segment that no snapshot covers into redb, and
    /// reuses the file as the next segment.
    fn retire(&mut self, db: &Database, segment: Segment) -> Result<Segment, StoreError> {
        let mut bytes = vec![0; usize::try_from(segment.pos).map_err(store_io)?];
        segment
            .file
            .read_exact_at(&mut bytes, 0)
            .map_err(|e| self.error("read", e))?;
        let tx = db.begin_write().map_err(store_io)?;
        let mut moved = 0;
        {
            let mut mover = Mover::new(&tx, &self.forgotten)?;
            for entry in frames(segment.no, &bytes) {
                moved += mover.put(entry)?;
            }
        }
        tx.commit().map_err(store_io)?;
        self.stats.moved.fetch_add(moved, Ordering::Relaxed);
        self.forgotten.retain(|_, at| *at > segment.no);
        self.renumber(segment)
    }

    /// Renames `segment` to the next number (its frames go stale) and syncs the directory.
    fn renumber(&mut self, segment: Segment) -> Result<Segment, StoreError> {
        let no = self.next_no;
        let path = self.dir.join(name(self.id, no));
        self.check(Step::Rename)
            .map_err(|e| self.error("rename", e))?;
        std::fs::rename(&segment.path, &path).map_err(|e| self.error("rename", e))?;
        self.sync_dir()?;
        self.next_no = no + 1;
        self.published(no);
        Ok(Segment {
            no,
            path,
            pos: 0,
            ..segment
        })
    }

    /// A new zero-filled segment; the database notes that it now depends on the
    /// directory.
    fn create(&mut self, db: &Database) -> Result<Segment, StoreError> {
        self.check(Step::Create)
            .map_err(|e| self.error("create", e))?;
        std::fs::create_dir_all(&self.dir).map_err(|e| self.error("create", e))?;
        if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent).map_err(|e| self.error("sync", e))?;
        }
        // The directory exists (on disk) before the database depends on it, and the
        // database names its id before any segment carries it.
        if self.id == 0 {
            let id = new_id();
            // Schema 2: a bucketlyd that does not know the WAL must not open the file.
            let tx = db.begin_write().map_err(store_io)?;
            {
                let mut meta = tx.open_table(META).map_err(store_io)?;
                meta.insert("wal", id).map_err(store_io)?;
                meta.insert("schema_version", WAL_SCHEMA)
                    .map_err(store_io)?;
            }
            tx.commit().map_err(store_io)?;
            self.id = id;
        }
        let tmp = self.dir.join("new.tmp");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| self.error("create", e))?;
        let zeros = vec![0u8; 64 * 1024];
        let mut at = 0;
        while at < self.segment_bytes {
            file.write_all_at(&zeros, at)
                .map_err(|e| self.error("create", e))?;
            at += zeros.len() as u64;
        }
        file.sync_all().map_err(|e| self.error("create", e))?;
        // Named (and numbered) only once it is whole.
        self.renumber(Segment {
            no: 0,
            path: tmp,
            file,
            pos: 0,
            len: at,
        })
    }

    fn published(&self, no: u64) {
        self.stats.segment.store(no, Ordering::Relaxed);
        self.stats.bytes.store(0, Ordering::Relaxed);
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        sync_dir(&self.dir).map_err(|e| self.error("sync", e))
    }

    /// The segment files, oldest first (none when the directory does not exist).
    ///
    /// # Errors
    /// [`StoreError::WalForeign`] for a segment that does not carry the database's id.
    fn segments(&self) -> Result<Vec<(u64, PathBuf)>, StoreError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.error("read", e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| self.error("read", e))?.path();
            let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(stem) = file.strip_suffix(SUFFIX) else {
                continue;
            };
            let parsed = stem.split_once('-').and_then(|(id, no)| {
                Some((u64::from_str_radix(id, 16).ok()?, no.parse::<u64>().ok()?))
            });
            match parsed {
                Some((id, no)) if id == self.id && id != 0 => out.push((no, path)),
                _ => return Err(StoreError::WalForeign(path.display().to_string())),
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn error(&self, what: &str, e: io::Error) -> StoreError {
        StoreError::Io(format!("{what} {}: {e}", self.dir.display()))
    }
}

/// The id of the database's write-ahead directory, 0 before it has one.
fn wal_id(db: &Database) -> Result<u64, StoreError> {
    use redb::ReadableDatabase;
    let tx = db.begin_read().map_err(store_io)?;
    let meta = tx.open_table(META).map_err(store_io)?;
    Ok(meta.get("wal").map_err(store_io)?.map_or(0, |v| v.value()))
}

/// A random, non-zero id (`RandomState` is seeded from the OS).
fn new_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish().max(1)
}

/// A segment's file name: the database's id, then the segment number.
fn name(id: u64, no: u64) -> String {
    format!("{id:016x}-{no:020}{SUFFIX}")
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn checksum(no: u64, rest: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&no.to_le_bytes());
    crc.update(rest);
    crc.finalize()
}

/// Appends one frame of segment `no` to `out`.
fn encode(out: &mut Vec<u8>, no: u64, uid: u64, lsn: u64, record: &[u8]) -> Result<(), StoreError> {
    let len = u32::try_from(record.len())
        .map_err(|_| StoreError::Io(format!("a record of {} bytes", record.len())))?;
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&uid.to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(record);
    let crc = checksum(no, &out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The valid frames of segment `no` at the start of `bytes`, up to the first that is not.
fn frames(no: u64, bytes: &[u8]) -> impl Iterator<Item = Entry<'_>> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        let header = rest.get(..HEADER)?;
        let word = |at: usize| u32::from_le_bytes([0, 1, 2, 3].map(|i| header[at + i]));
        let long = |at: usize| u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7].map(|i| header[at + i]));
        let len = usize::try_from(word(4)).ok()?;
        let end = HEADER.checked_add(len)?;
        let frame = rest.get(..end)?;
        if len == 0 || word(0) != checksum(no, &frame[4..]) {
            return None;
        }
        rest = &rest[end..];
        Some((long(8), long(16), &frame[HEADER..]))
    })
}

/// Inserts records into redb's `log` table, unless a snapshot covers them or their
/// bucket was dropped.
struct Mover<'t> {
    log: redb::Table<'t, (u64, u64), &'static [u8]>,
    snapshots: redb::Table<'t, u64, &'static [u8]>,
    forgotten: &'t HashMap<u64, u64>,
    /// Each bucket's snapshot lsn, looked up once.
    covered: HashMap<u64, u64>,
}

impl<'t> Mover<'t> {
    fn new(
        tx: &'t redb::WriteTransaction,
        forgotten: &'t HashMap<u64, u64>,
    ) -> Result<Self, StoreError> {
        Ok(Mover {
            log: tx.open_table(LOG).map_err(store_io)?,
            snapshots: tx.open_table(SNAPSHOTS).map_err(store_io)?,
            forgotten,
            covered: HashMap::new(),
        })
    }

    /// Returns 1 if the record was moved, 0 if not needed.
    fn put(&mut self, (uid, lsn, record): Entry<'_>) -> Result<u64, StoreError> {
        if self.forgotten.contains_key(&uid) {
            return Ok(0);
        }
        let covered = match self.covered.get(&uid) {
            Some(&lsn) => lsn,
            None => {
                let lsn = match self.snapshots.get(uid).map_err(store_io)? {
                    Some(v) => v
                        .value()
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u64::from_be_bytes),
                    None => 0,
                };
                self.covered.insert(uid, lsn);
                lsn
            }
        };
        if lsn <= covered {
            return Ok(0);
        }
        self.log.insert((uid, lsn), record).map_err(store_io)?;
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(no: u64, uid: u64, lsn: u64, record: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, no, uid, lsn, record).expect("encode");
        out
    }

    #[test]
    fn frames_end_at_the_first_torn_or_stale_one() {
        let mut bytes = frame(3, 1, 1, b"a");
        bytes.extend(frame(3, 2, 5, b"bc"));
        let whole = bytes.len();
        bytes.extend(frame(2, 1, 2, b"stale")); // a previous life of the file
        bytes.extend(frame(3, 1, 3, b"after"));
        let read: Vec<_> = frames(3, &bytes).collect();
        assert_eq!(read, vec![(1, 1, &b"a"[..]), (2, 5, &b"bc"[..])]);
        // Torn: every cut inside the second frame ends the log after the first.
        for cut in HEADER + 1..whole {
            assert_eq!(frames(3, &bytes[..cut]).count(), 1, "cut at {cut}");
        }
        let mut flipped = bytes[..whole].to_vec();
        flipped[whole - 1] ^= 1;
        assert_eq!(frames(3, &flipped).count(), 1);
        assert_eq!(frames(3, &[0; 64]).count(), 0, "zero fill");
    }
}
