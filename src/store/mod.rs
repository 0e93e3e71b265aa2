//! The database file (redb): bucket configuration, users, and the state of durable
//! buckets, each in its own table.
//!
//! Tables:
//! - `meta`: `schema_version` → u64. A file written by a newer schema is refused.
//!   `wal` → the random id of the write-ahead directory ([`wal`]), set at its first
//!   segment: from then on the database does not open without that directory, nor with
//!   segments of another id in it.
//! - `buckets`: bucket name → [`BucketSpec`] as JSON.
//! - `users`: user name → [`crate::auth::UserRecord`] as JSON (password as an argon2id
//!   PHC string, never in clear).
//! - `log`, `snapshots`: durable buckets ([`log`]).
//!
//! redb calls block (a commit waits for fsync), so async callers go through
//! `spawn_blocking`, and durable writes through the writer thread of [`log`].
//!
//! After a failed write redb refuses everything until the database is opened again, so
//! the [`Database`] sits behind a lock and [`Store::reopen`] replaces it.

mod chain;
pub mod log;
pub mod priority;
pub mod wal;

use std::path::Path;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const BUCKETS: TableDefinition<&str, &[u8]> = TableDefinition::new("buckets");
const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
/// 2: durable records may be in the write-ahead directory ([`wal`]).
const SCHEMA_VERSION: u64 = 2;

/// Opens the database again (the file, or a test's storage backend).
pub type Opener = Box<dyn Fn() -> Result<Database, redb::DatabaseError> + Send + Sync>;

/// A storage failure, with a message fit for one log line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process holds the file.
    #[error("database {0} is locked by another process (is another bucketlyd running?)")]
    Locked(String),
    /// The file is damaged or not a redb file.
    #[error("database {path} is corrupt or not a bucketly database: {detail}")]
    Corrupt {
        /// The file.
        path: String,
        /// What redb said.
        detail: String,
    },
    /// Written by a newer bucketly.
    #[error(
        "database {path} has schema version {found}; this bucketlyd reads up to {SCHEMA_VERSION}"
    )]
    TooNew {
        /// The file.
        path: String,
        /// Its schema version.
        found: u64,
    },
    /// The database has used a write-ahead directory that is not there now.
    #[error(
        "the write-ahead directory {0} of this database is missing: it holds acknowledged \
         durable records. Restore it beside the database file, or create it empty to start \
         without them"
    )]
    WalMissing(String),
    /// The write-ahead directory holds a segment of another database.
    #[error(
        "the write-ahead segment {0} does not belong to this database (a database file \
         restored or copied without its own write-ahead directory?): move it away, or put \
         back the database file it belongs to"
    )]
    WalForeign(String),
    /// Any other I/O or transaction failure.
    #[error("database error: {0}")]
    Io(String),
}

fn io<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Io(e.to_string())
}

/// A bucket's configuration as stored: enough to create it again after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BucketSpec {
    /// Handler name.
    pub handler: String,
    /// Handler config (JSON; `null` when none was given).
    pub config: serde_json::Value,
    /// Bucket options (a JSON object, see [`crate::engine::BucketOptions`]).
    #[serde(default)]
    pub options: serde_json::Map<String, serde_json::Value>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The user who created the bucket; its forwards and emits carry that user's
    /// permissions. Empty for buckets stored before owners were recorded.
    #[serde(default)]
    pub owner: String,
    /// Identifies this incarnation of the bucket in the durable log (0: not durable).
    /// A bucket dropped and created again under the same name gets a new one, so its
    /// old records can never mix with the new.
    #[serde(default)]
    pub uid: u64,
}

/// A stored record: its name and its value, or why the record does not parse.
pub type Stored<T> = (String, Result<T, String>);

/// The open database file.
pub struct Store {
    db: RwLock<Option<Database>>,
    opener: Opener,
    shown: String,
    wal: Mutex<wal::Wal>,
    wal_stats: Arc<wal::WalStats>,
}

impl Store {
    /// Opens `path`, creating it if missing, and checks its schema.
    ///
    /// # Errors
    /// [`StoreError::Locked`], [`StoreError::Corrupt`], [`StoreError::TooNew`] or
    /// [`StoreError::Io`], each with a message naming the file.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_sized(path, wal::SEGMENT_BYTES)
    }

    /// [`Store::open`] with write-ahead segments of `segment_bytes` ([`wal`]).
    ///
    /// # Errors
    /// As [`Store::open`].
    pub fn open_sized(path: &Path, segment_bytes: u64) -> Result<Store, StoreError> {
        let file = path.to_owned();
        Store::open_with(
            path.display().to_string(),
            Box::new(move || Database::create(&file)),
            wal::Wal::new(wal::Wal::dir_beside(path), segment_bytes, None),
        )
    }

    /// Opens the database `opener` makes, with its write-ahead file `wal` (tests pass
    /// a fault-injecting storage backend and [`wal::IoCheck`]); `shown` names it in
    /// messages.
    ///
    /// # Errors
    /// As [`Store::open`].
    pub fn open_with(shown: String, opener: Opener, wal: wal::Wal) -> Result<Store, StoreError> {
        let db = Store::first_open(&shown, &opener)?;
        let store = Store {
            db: RwLock::new(Some(db)),
            opener,
            shown: shown.clone(),
            wal_stats: wal.stats(),
            wal: Mutex::new(wal),
        };
        store.check_schema(&shown)?;
        store.drain_wal()?;
        Ok(store)
    }

    /// Moves the records in the write-ahead file into the database ([`wal`]), so that
    /// [`Store::replay`] and [`Store::last_lsn`] see them: done at every open, and by
    /// a bucket that reloads from disk at runtime.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn drain_wal(&self) -> Result<(), StoreError> {
        let moved = self.with(|db| self.wal.lock().drain(db))?;
        if moved > 0 {
            tracing::info!("moved {moved} durable record(s) from the write-ahead file");
        }
        Ok(())
    }

    /// The write-ahead file's counters, for server INFO.
    pub fn wal_info(&self) -> serde_json::Value {
        self.wal_stats.to_json()
    }

    /// Appends records to the write-ahead file; on return they are on disk.
    fn append_wal(&self, entries: &[wal::Entry<'_>]) -> Result<(), StoreError> {
        self.with(|db| self.wal.lock().append(db, entries))
    }

    fn first_open(shown: &str, opener: &Opener) -> Result<Database, StoreError> {
        let shown = shown.to_owned();
        opener().map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked(shown.clone()),
            redb::DatabaseError::Storage(redb::StorageError::Io(e))
                if e.kind() != std::io::ErrorKind::InvalidData =>
            {
                StoreError::Io(format!("{shown}: {e}"))
            }
            other => StoreError::Corrupt {
                path: shown.clone(),
                detail: other.to_string(),
            },
        })
    }

    /// Closes and opens the database again: after a failed write redb refuses every
    /// operation until then. Then checks that a write commits.
    ///
    /// # Errors
    /// Why it still cannot be written; the store stays closed (every call fails) until
    /// a later reopen succeeds.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut db = self.db.write();
        drop(db.take()); // releases the file lock before opening again
        *db = Some(Store::first_open(&self.shown, &self.opener)?);
        drop(db);
        self.check_schema(&self.shown)?;
        self.drain_wal()
    }

    /// Runs `f` on the open database.
    fn with<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match self.db.read().as_ref() {
            Some(db) => f(db),
            None => Err(StoreError::Io(format!(
                "database {} is closed after a failed write; it is being opened again",
                self.shown
            ))),
        }
    }

    fn check_schema(&self, shown: &str) -> Result<(), StoreError> {
        self.with(|db| Store::check_schema_of(db, shown))
    }

    fn check_schema_of(db: &Database, shown: &str) -> Result<(), StoreError> {
        let tx = db.begin_write().map_err(io)?;
        {
            let mut meta = tx.open_table(META).map_err(|e| StoreError::Corrupt {
                path: shown.to_owned(),
                detail: e.to_string(),
            })?;
            let found = meta.get("schema_version").map_err(io)?.map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::TooNew {
                        path: shown.to_owned(),
                        found: v,
                    })
                }
                Some(_) => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION).map_err(io)?;
                }
            }
            tx.open_table(BUCKETS).map_err(io)?;
            tx.open_table(USERS).map_err(io)?;
            log::create_tables(&tx).map_err(io)?;
        }
        tx.commit().map_err(io)
    }

    /// Runs `f` on a blocking thread: redb calls block (a commit waits for fsync), so
    /// async code goes through here.
    ///
    /// # Errors
    /// What `f` returns, or [`StoreError::Io`] if the blocking task fails.
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Io(e.to_string()))?
    }

    /// Stores (or replaces) a bucket's spec; returns once it is on disk.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn put_bucket(&self, name: &str, spec: &BucketSpec) -> Result<(), StoreError> {
        self.put_json(BUCKETS, name, spec)
    }

    /// Removes a bucket's spec; returns once that is on disk.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn delete_bucket(&self, name: &str) -> Result<(), StoreError> {
        self.delete(BUCKETS, name)
    }

    /// Every stored bucket, by name. A record that does not parse is reported as an
    /// error for that bucket rather than failing the whole load.
    ///
    /// # Errors
    /// [`StoreError::Io`] if the table cannot be read.
    pub fn buckets(&self) -> Result<Vec<Stored<BucketSpec>>, StoreError> {
        self.all_json(BUCKETS)
    }

    /// Stores (or replaces) a user; returns once it is on disk.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn put_user(&self, name: &str, user: &crate::auth::UserRecord) -> Result<(), StoreError> {
        self.put_json(USERS, name, user)
    }

    /// Removes a user; returns once that is on disk.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn delete_user(&self, name: &str) -> Result<(), StoreError> {
        self.delete(USERS, name)
    }

    /// Every stored user, by name, each parsed or with the reason it does not parse.
    ///
    /// # Errors
    /// [`StoreError::Io`] if the table cannot be read.
    pub fn users(&self) -> Result<Vec<Stored<crate::auth::UserRecord>>, StoreError> {
        self.all_json(USERS)
    }

    fn put_json<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<(), StoreError> {
        let value = serde_json::to_vec(value).map_err(io)?;
        self.with(|db| {
            let tx = db.begin_write().map_err(io)?;
            tx.open_table(table)
                .map_err(io)?
                .insert(key, value.as_slice())
                .map_err(io)?;
            tx.commit().map_err(io)
        })
    }

    fn delete(&self, table: Table, key: &str) -> Result<(), StoreError> {
        self.with(|db| {
            let tx = db.begin_write().map_err(io)?;
            tx.open_table(table).map_err(io)?.remove(key).map_err(io)?;
            tx.commit().map_err(io)
        })
    }

    fn all_json<T: for<'de> Deserialize<'de>>(
        &self,
        table: Table,
    ) -> Result<Vec<Stored<T>>, StoreError> {
        self.with(|db| Store::all_json_of(db, table))
    }

    fn all_json_of<T: for<'de> Deserialize<'de>>(
        db: &Database,
        table: Table,
    ) -> Result<Vec<Stored<T>>, StoreError> {
        let tx = db.begin_read().map_err(io)?;
        let table = tx.open_table(table).map_err(io)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            let value = serde_json::from_slice(v.value()).map_err(|e| e.to_string());
            out.push((k.value().to_owned(), value));
        }
        Ok(out)
    }
}

/// A table of JSON records keyed by name.
type Table = TableDefinition<'static, &'static str, &'static [u8]>;

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BucketSpec {
        BucketSpec {
            handler: "counter".into(),
            config: serde_json::json!({"max": 3}),
            options: Default::default(),
            created_ms: 1,
            owner: "admin".into(),
            uid: 0,
        }
    }

    #[test]
    fn buckets_survive_reopen_and_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.redb");
        {
            let store = Store::open(&path).expect("open");
            store.put_bucket("a", &spec()).expect("put");
            store.put_bucket("b", &spec()).expect("put");
            store.delete_bucket("b").expect("delete");
        }
        let store = Store::open(&path).expect("reopen");
        let buckets = store.buckets().expect("list");
        assert_eq!(buckets.len(), 1);
        assert_eq!(buckets[0].0, "a");
        assert_eq!(buckets[0].1.as_ref().expect("parses"), &spec());
    }

    #[test]
    fn a_second_open_is_refused_as_locked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.redb");
        let _first = Store::open(&path).expect("open");
        let err = Store::open(&path).err().expect("locked");
        assert!(matches!(err, StoreError::Locked(_)), "{err}");
    }

    #[test]
    fn a_database_without_its_write_ahead_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.redb");
        let (wal, moved) = (dir.path().join("db.wal"), dir.path().join("elsewhere"));
        Store::open(&path)
            .expect("open")
            .append_wal(&[(1, 1, b"r")])
            .expect("append");
        std::fs::rename(&wal, &moved).expect("move the directory away");
        let err = Store::open(&path).err().expect("refused");
        assert!(matches!(err, StoreError::WalMissing(_)), "{err}");
        std::fs::rename(&moved, &wal).expect("restore");
        let mut lsns = Vec::new();
        Store::open(&path)
            .expect("open with the directory back")
            .replay(1, 0, |lsn, _| {
                lsns.push(lsn);
                Ok(())
            })
            .expect("replay");
        assert_eq!(lsns, [1], "the record was kept");
        std::fs::remove_dir_all(&wal).expect("remove");
        std::fs::create_dir(&wal).expect("an empty directory");
        Store::open(&path).expect("an empty directory is the operator's choice");
    }

    #[test]
    fn write_ahead_segments_of_another_database_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a.redb"), dir.path().join("b.redb"));
        for path in [&a, &b] {
            Store::open(path)
                .expect("open")
                .append_wal(&[(1, 1, b"r")])
                .expect("append");
        }
        let theirs = std::fs::read_dir(dir.path().join("b.wal"))
            .expect("ls")
            .next()
            .expect("a segment")
            .expect("entry")
            .path();
        let copied = dir
            .path()
            .join("a.wal")
            .join(theirs.file_name().expect("name"));
        std::fs::copy(&theirs, &copied).expect("copy");
        let err = Store::open(&a).err().expect("refused");
        assert!(matches!(err, StoreError::WalForeign(_)), "{err}");
        // A database that never had a write-ahead directory does not adopt one either.
        let fresh = dir.path().join("c.redb");
        drop(Store::open(&fresh).expect("open"));
        std::fs::create_dir(dir.path().join("c.wal")).expect("mkdir");
        std::fs::rename(&copied, dir.path().join("c.wal").join("x.wal")).expect("move");
        let err = Store::open(&fresh).err().expect("refused");
        assert!(matches!(err, StoreError::WalForeign(_)), "{err}");
        std::fs::remove_file(dir.path().join("c.wal").join("x.wal")).expect("rm");
        Store::open(&a).expect("opens once the foreign segment is gone");
    }

    /// A store at `path` whose write-ahead file fails `failing` steps with EIO.
    fn failing_at(path: &Path, failing: Arc<Mutex<Option<wal::Step>>>) -> Store {
        let file = path.to_owned();
        let check: wal::IoCheck = Arc::new(move |step| match *failing.lock() {
            Some(f) if f == step => Err(std::io::Error::from_raw_os_error(libc::EIO)),
            _ => Ok(()),
        });
        Store::open_with(
            "test".into(),
            Box::new(move || Database::create(&file)),
            wal::Wal::new(wal::Wal::dir_beside(path), 64 * 1024, Some(check)),
        )
        .expect("open")
    }

    #[test]
    fn a_record_written_but_not_synced_is_on_disk_after_the_drain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.redb");
        let failing = Arc::new(Mutex::new(None));
        let store = failing_at(&path, failing.clone());
        store.append_wal(&[(1, 1, b"a")]).expect("append");
        *failing.lock() = Some(wal::Step::Sync);
        store
            .append_wal(&[(1, 2, b"b")])
            .expect_err("the sync fails");
        *failing.lock() = None;
        // What a failed sync wrote may be on disk all the same: the drain keeps it, and
        // the bucket's chain goes on from it (`Store::last_lsn`).
        store.drain_wal().expect("drain");
        assert_eq!(store.last_lsn(1).expect("last"), 2);
        store
            .append_wal(&[(1, 3, b"c")])
            .expect("append after the drain");
        drop(store);
        let store = failing_at(&path, failing);
        let mut seen = Vec::new();
        store
            .replay(1, 0, |lsn, r| {
                seen.push((lsn, r.to_vec()));
                Ok(())
            })
            .expect("replay");
        assert_eq!(
            seen,
            [(1, b"a".to_vec()), (2, b"b".to_vec()), (3, b"c".to_vec())]
        );
    }

    #[test]
    fn a_database_that_used_its_write_ahead_file_is_schema_2() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.redb");
        let version = |store: &Store| {
            store
                .with(|db| {
                    let tx = db.begin_read().map_err(io)?;
                    let meta = tx.open_table(META).map_err(io)?;
                    Ok(meta.get("schema_version").map_err(io)?.map(|v| v.value()))
                })
                .expect("read")
        };
        let store = Store::open(&path).expect("open");
        // As a database written before the write-ahead file, which older daemons read.
        store
            .with(|db| {
                let tx = db.begin_write().map_err(io)?;
                tx.open_table(META)
                    .map_err(io)?
                    .insert("schema_version", 1)
                    .map_err(io)?;
                tx.commit().map_err(io)
            })
            .expect("write");
        store.append_wal(&[(1, 1, b"a")]).expect("append");
        assert_eq!(version(&store), Some(2), "older daemons must refuse it now");
    }

    #[test]
    fn a_file_that_is_not_redb_is_refused_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.redb");
        std::fs::write(&path, vec![0x5au8; 8192]).expect("write");
        let err = Store::open(&path).err().expect("corrupt");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }
}
