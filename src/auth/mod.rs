//! Users, login and permissions. Every policy decision lives here: who may log in, what
//! a session may do, who may manage users, and the last-admin guard.
//!
//! Invariants:
//! - A user's record in memory changes only after the same change is on disk.
//! - Changes that must see a consistent set of users (add, delete, grant, revoke) are
//!   serialised by `writes`, so the last-admin check cannot race another change.
//! - A session reads its user's live record on every check, so a grant or revoke applies
//!   to open connections from their next request; deleting a user flips its `revoked`
//!   signal, which closes its connections.

pub mod password;
pub mod permission;
pub mod throttle;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{watch, Semaphore};

pub use permission::{Grant, Permission};

use crate::error::Error;
use crate::store::Store;
use throttle::Throttle;

/// The user created on first start, with every permission.
pub const BOOTSTRAP_USER: &str = "admin";
/// Its password until changed; the daemon warns at every start while it is unchanged.
pub const BOOTSTRAP_PASSWORD: &str = "admin";
/// Password verifications (and hashings) running at once; more wait their turn.
pub const HASH_SLOTS: usize = 2;

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// argon2id PHC string.
    pub password: String,
    /// What the user may do.
    pub grants: Vec<Grant>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

impl UserRecord {
    fn is_admin(&self) -> bool {
        self.grants
            .iter()
            .any(|g| g.permission == Permission::Admin)
    }
}

struct UserEntry {
    name: String,
    record: RwLock<UserRecord>,
    revoked: watch::Sender<bool>,
}

/// A logged-in connection's identity.
pub struct Session {
    user: Arc<UserEntry>,
    revoked: watch::Receiver<bool>,
}

impl Session {
    /// The user name.
    pub fn user(&self) -> &str {
        &self.user.name
    }

    /// Whether the user was deleted after this session logged in.
    pub fn is_revoked(&self) -> bool {
        *self.revoked.borrow()
    }

    /// Completes once the user is deleted.
    pub async fn revoked(&mut self) {
        let _ = self.revoked.wait_for(|r| *r).await;
    }

    /// Succeeds if the user's current grants allow `permission` on `bucket`.
    ///
    /// # Errors
    /// [`Error::PermissionDenied`] naming the permission and the bucket.
    pub fn check(&self, permission: Permission, bucket: Option<&str>) -> Result<(), Error> {
        if permission::allows(&self.user.record.read().grants, permission, bucket) {
            return Ok(());
        }
        Err(Error::PermissionDenied {
            user: self.user.name.clone(),
            permission,
            bucket: bucket.map(str::to_owned),
        })
    }

    /// A check, for later, of whether this user still holds `permission` on `bucket`
    /// (false once the user is deleted or the grant revoked).
    pub fn still_allows(
        &self,
        permission: Permission,
        bucket: &str,
    ) -> Arc<dyn Fn() -> bool + Send + Sync> {
        let (user, revoked, bucket) = (self.user.clone(), self.revoked.clone(), bucket.to_owned());
        Arc::new(move || {
            !*revoked.borrow()
                && permission::allows(&user.record.read().grants, permission, Some(&bucket))
        })
    }

    /// Whether the user may see `bucket` in LIST (holds any grant that matches it).
    pub fn sees(&self, bucket: &str) -> bool {
        permission::sees(&self.user.record.read().grants, bucket)
    }

    /// WHOAMI: the user and their grants.
    pub fn whoami(&self) -> serde_json::Value {
        json!({"user": self.user.name, "grants": self.user.record.read().grants})
    }
}

/// Whether `name` may name a user: 1 to 64 of `A-Z a-z 0-9 . _ - @`.
pub fn valid_user_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

fn check_user_name(name: &str) -> Result<(), Error> {
    if valid_user_name(name) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "invalid user name {name:?}: use 1 to 64 characters of A-Z a-z 0-9 . _ - @"
    )))
}

fn check_password(password: &str) -> Result<(), Error> {
    if password.is_empty() || password.len() > password::MAX_PASSWORD {
        return Err(Error::InvalidArgument(format!(
            "a password must have 1 to {} bytes",
            password::MAX_PASSWORD
        )));
    }
    Ok(())
}

/// The users of this daemon.
pub struct Auth {
    users: RwLock<HashMap<String, Arc<UserEntry>>>,
    store: Arc<Store>,
    throttle: Throttle,
    hash_slots: Semaphore,
    writes: tokio::sync::Mutex<()>,
    default_admin_password: AtomicBool,
    /// Verified against when the user does not exist, so both cases take the same time.
    dummy_hash: String,
}

impl Auth {
    /// Whether user `name` exists and holds `permission` on `bucket` now.
    pub fn allows(&self, name: &str, permission: Permission, bucket: &str) -> bool {
        let Some(user) = self.users.read().get(name).cloned() else {
            return false;
        };
        let grants = &user.record.read().grants;
        permission::allows(grants, permission, Some(bucket))
    }

    /// Loads the users; on an empty database creates `admin`/`admin` with every
    /// permission. Blocking (hashes a password): call it off the async runtime.
    ///
    /// # Errors
    /// Storage errors, or a user record that does not parse.
    pub fn load(store: Arc<Store>) -> Result<Auth, Error> {
        let storage = |e: crate::store::StoreError| Error::Storage(e.to_string());
        let mut stored = store.users().map_err(storage)?;
        if stored.is_empty() {
            let record = UserRecord {
                password: password::hash(BOOTSTRAP_PASSWORD).map_err(Error::Internal)?,
                grants: vec![Grant {
                    permission: Permission::Admin,
                    pattern: "*".into(),
                }],
                created_ms: crate::engine::now_ms(),
            };
            store.put_user(BOOTSTRAP_USER, &record).map_err(storage)?;
            tracing::warn!("created user {BOOTSTRAP_USER:?} with password {BOOTSTRAP_PASSWORD:?}");
            stored.push((BOOTSTRAP_USER.to_owned(), Ok(record)));
        }
        let mut users = HashMap::new();
        for (name, record) in stored {
            let record =
                record.map_err(|e| Error::Storage(format!("user {name:?} is unreadable: {e}")))?;
            users.insert(
                name.clone(),
                Arc::new(UserEntry {
                    name,
                    record: RwLock::new(record),
                    revoked: watch::Sender::new(false),
                }),
            );
        }
        let default = users
            .get(BOOTSTRAP_USER)
            .is_some_and(|u| password::verify(&u.record.read().password, BOOTSTRAP_PASSWORD));
        Ok(Auth {
            users: RwLock::new(users),
            store,
            throttle: Throttle::default(),
            hash_slots: Semaphore::new(HASH_SLOTS),
            writes: tokio::sync::Mutex::new(()),
            default_admin_password: AtomicBool::new(default),
            dummy_hash: password::hash("not a real password").map_err(Error::Internal)?,
        })
    }

    /// Whether `admin` still has the password `admin`.
    pub fn default_admin_password(&self) -> bool {
        self.default_admin_password.load(Ordering::Relaxed)
    }

    async fn off_runtime<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Error> {
        let _slot = self
            .hash_slots
            .acquire()
            .await
            .map_err(|_| Error::ShuttingDown)?;
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| Error::Internal(e.to_string()))
    }

    /// LOGIN: checks the password off the async runtime, subject to throttling.
    ///
    /// # Errors
    /// [`Error::LoginThrottled`] while `peer` or `user` is locked, [`Error::LoginFailed`]
    /// for a wrong password or an unknown user alike.
    pub async fn login(&self, user: &str, password: &str, peer: IpAddr) -> Result<Session, Error> {
        let throttled = |wait: std::time::Duration| {
            Error::LoginThrottled(wait.as_millis().div_ceil(1000) as u64)
        };
        if let Some(wait) = self.throttle.locked(peer, user, Instant::now()) {
            return Err(throttled(wait));
        }
        let _slot = self
            .hash_slots
            .acquire()
            .await
            .map_err(|_| Error::ShuttingDown)?;
        // Checked again with the slot held: attempts queued in parallel must not get
        // past a lock that the attempts ahead of them set.
        if let Some(wait) = self.throttle.locked(peer, user, Instant::now()) {
            return Err(throttled(wait));
        }
        let entry = self.users.read().get(user).cloned();
        let phc = match &entry {
            Some(e) => e.record.read().password.clone(),
            None => self.dummy_hash.clone(),
        };
        let attempt = password.to_owned();
        let matches = tokio::task::spawn_blocking(move || password::verify(&phc, &attempt))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        match entry {
            Some(entry) if matches => {
                self.throttle.succeed(user);
                Ok(Session {
                    revoked: entry.revoked.subscribe(),
                    user: entry,
                })
            }
            _ => {
                self.throttle.fail(peer, user, Instant::now());
                tracing::info!(%peer, user, "failed login");
                Err(Error::LoginFailed)
            }
        }
    }

    /// Keeps `default_admin_password` true exactly while `admin` exists with password `admin`.
    fn note_password(&self, name: &str, password: Option<&str>) {
        if name == BOOTSTRAP_USER {
            self.default_admin_password
                .store(password == Some(BOOTSTRAP_PASSWORD), Ordering::Relaxed);
        }
    }

    fn entry(&self, name: &str) -> Result<Arc<UserEntry>, Error> {
        self.users
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NoSuchUser(name.to_owned()))
    }

    fn admins(&self) -> usize {
        self.users
            .read()
            .values()
            .filter(|u| u.record.read().is_admin())
            .count()
    }

    /// Writes `record` for `name` to disk, then installs it in memory.
    async fn commit(&self, entry: &UserEntry, record: UserRecord) -> Result<(), Error> {
        let (name, stored) = (entry.name.clone(), record.clone());
        self.store
            .blocking(move |s| s.put_user(&name, &stored))
            .await
            .map_err(|e| Error::Storage(e.to_string()))?;
        *entry.record.write() = record;
        Ok(())
    }

    /// USER_ADD: a new user with no grants. Admin only.
    ///
    /// # Errors
    /// `PermissionDenied`, `InvalidArgument`, `UserExists`, `StorageError`.
    pub async fn add_user(&self, by: &Session, name: &str, password: &str) -> Result<(), Error> {
        by.check(Permission::Admin, None)?;
        check_user_name(name)?;
        check_password(password)?;
        let _w = self.writes.lock().await;
        if self.users.read().contains_key(name) {
            return Err(Error::UserExists(name.to_owned()));
        }
        let pw = password.to_owned();
        let phc = self
            .off_runtime(move || password::hash(&pw))
            .await?
            .map_err(Error::Internal)?;
        let record = UserRecord {
            password: phc,
            grants: Vec::new(),
            created_ms: crate::engine::now_ms(),
        };
        let entry = Arc::new(UserEntry {
            name: name.to_owned(),
            record: RwLock::new(record.clone()),
            revoked: watch::Sender::new(false),
        });
        self.commit(&entry, record).await?;
        self.users.write().insert(name.to_owned(), entry);
        self.note_password(name, Some(password));
        Ok(())
    }

    /// USER_DEL: removes a user and closes its connections. Admin only; never the last
    /// admin.
    ///
    /// # Errors
    /// `PermissionDenied`, `NoSuchUser`, `LastAdmin`, `StorageError`.
    pub async fn delete_user(&self, by: &Session, name: &str) -> Result<(), Error> {
        by.check(Permission::Admin, None)?;
        let _w = self.writes.lock().await;
        let entry = self.entry(name)?;
        if entry.record.read().is_admin() && self.admins() == 1 {
            return Err(Error::LastAdmin(name.to_owned()));
        }
        let key = name.to_owned();
        self.store
            .blocking(move |s| s.delete_user(&key))
            .await
            .map_err(|e| Error::Storage(e.to_string()))?;
        self.users.write().remove(name);
        entry.revoked.send_replace(true);
        self.note_password(name, None);
        Ok(())
    }

    /// USER_PASSWD: anyone may change their own password, an admin anyone's.
    ///
    /// # Errors
    /// `PermissionDenied`, `InvalidArgument`, `NoSuchUser`, `StorageError`.
    pub async fn set_password(
        &self,
        by: &Session,
        name: &str,
        password: &str,
    ) -> Result<(), Error> {
        if by.user() != name {
            by.check(Permission::Admin, None)?;
        }
        check_password(password)?;
        let pw = password.to_owned();
        let phc = self
            .off_runtime(move || password::hash(&pw))
            .await?
            .map_err(Error::Internal)?;
        let _w = self.writes.lock().await;
        let entry = self.entry(name)?;
        let mut record = entry.record.read().clone();
        record.password = phc;
        self.commit(&entry, record).await?;
        self.note_password(name, Some(password));
        Ok(())
    }

    /// USER_GRANT: adds a grant (a no-op if the user holds it already). Admin only.
    ///
    /// # Errors
    /// `PermissionDenied`, `InvalidArgument` (bad permission or pattern; admin is granted
    /// on `*` only), `NoSuchUser`, `StorageError`.
    pub async fn grant(
        &self,
        by: &Session,
        name: &str,
        permission: &str,
        pattern: &str,
    ) -> Result<(), Error> {
        by.check(Permission::Admin, None)?;
        let grant = parse_grant(permission, pattern)?;
        let _w = self.writes.lock().await;
        let entry = self.entry(name)?;
        let mut record = entry.record.read().clone();
        if record.grants.contains(&grant) {
            return Ok(());
        }
        record.grants.push(grant);
        record.grants.sort();
        self.commit(&entry, record).await
    }

    /// USER_REVOKE: removes a grant. Admin only; the last admin keeps `admin`.
    ///
    /// # Errors
    /// `PermissionDenied`, `InvalidArgument` (no such grant), `NoSuchUser`, `LastAdmin`,
    /// `StorageError`.
    pub async fn revoke(
        &self,
        by: &Session,
        name: &str,
        permission: &str,
        pattern: &str,
    ) -> Result<(), Error> {
        by.check(Permission::Admin, None)?;
        let grant = parse_grant(permission, pattern)?;
        let _w = self.writes.lock().await;
        let entry = self.entry(name)?;
        let mut record = entry.record.read().clone();
        let before = record.grants.len();
        record.grants.retain(|g| *g != grant);
        if record.grants.len() == before {
            return Err(Error::InvalidArgument(format!(
                "user {name:?} has no grant {} on {:?}",
                grant.permission, grant.pattern
            )));
        }
        if grant.permission == Permission::Admin && !record.is_admin() && self.admins() == 1 {
            return Err(Error::LastAdmin(name.to_owned()));
        }
        self.commit(&entry, record).await
    }

    /// USER_LIST: names and grants, never password hashes. Admin only.
    ///
    /// # Errors
    /// `PermissionDenied`.
    pub fn list(&self, by: &Session) -> Result<serde_json::Value, Error> {
        by.check(Permission::Admin, None)?;
        let users = self.users.read();
        let mut rows: Vec<_> = users
            .values()
            .map(|u| json!({"name": u.name, "grants": u.record.read().grants}))
            .collect();
        rows.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        Ok(serde_json::Value::Array(rows))
    }
}

fn parse_grant(permission: &str, pattern: &str) -> Result<Grant, Error> {
    let permission = Permission::parse(permission).ok_or_else(|| {
        let names: Vec<_> = Permission::ALL.iter().map(|p| p.name()).collect();
        Error::InvalidArgument(format!(
            "unknown permission {permission:?}; use one of {}",
            names.join(", ")
        ))
    })?;
    if !permission::valid_pattern(pattern) {
        return Err(Error::InvalidArgument(format!(
            "invalid pattern {pattern:?}: use 1 to 255 characters of A-Z a-z 0-9 . _ - : and *"
        )));
    }
    if permission == Permission::Admin && pattern != "*" {
        return Err(Error::InvalidArgument("admin is granted on * only".into()));
    }
    Ok(Grant {
        permission,
        pattern: pattern.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(dir: &std::path::Path) -> Arc<Auth> {
        let store = Arc::new(Store::open(&dir.join("db.redb")).expect("store"));
        Arc::new(Auth::load(store).expect("auth"))
    }

    // Regression: the lock was checked only before waiting for a hashing slot, so wrong
    // passwords sent in parallel were all verified (20 of 20 answered LOGIN_FAILED).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parallel_attempts_cannot_bypass_throttling() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = auth(dir.path());
        let peer: IpAddr = "10.1.2.3".parse().expect("ip");
        let attempts: Vec<_> = (0..20)
            .map(|_| {
                let auth = auth.clone();
                tokio::spawn(async move { auth.login(BOOTSTRAP_USER, "wrong", peer).await.err() })
            })
            .collect();
        let (mut failed, mut throttled) = (0, 0);
        for a in attempts {
            match a.await.expect("task") {
                Some(Error::LoginFailed) => failed += 1,
                Some(Error::LoginThrottled(_)) => throttled += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        let most = throttle::FREE_FAILURES as usize + HASH_SLOTS - 1;
        assert!(
            failed <= most,
            "{failed} passwords verified, at most {most} allowed"
        );
        assert_eq!(failed + throttled, 20);
    }

    // Regression: deleting (or re-creating) `admin` did not update the INFO flag.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn default_password_flag_follows_the_admin_user() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = auth(dir.path());
        let peer: IpAddr = "127.0.0.1".parse().expect("ip");
        assert!(auth.default_admin_password());
        let root = auth
            .login(BOOTSTRAP_USER, BOOTSTRAP_PASSWORD, peer)
            .await
            .expect("login");
        auth.add_user(&root, "root", "pw").await.expect("add");
        auth.grant(&root, "root", "admin", "*")
            .await
            .expect("grant");
        let root = auth.login("root", "pw", peer).await.expect("login");
        auth.delete_user(&root, BOOTSTRAP_USER)
            .await
            .expect("delete");
        assert!(!auth.default_admin_password());
        auth.add_user(&root, BOOTSTRAP_USER, BOOTSTRAP_PASSWORD)
            .await
            .expect("re-add");
        assert!(auth.default_admin_password());
        auth.set_password(&root, BOOTSTRAP_USER, "better")
            .await
            .expect("passwd");
        assert!(!auth.default_admin_password());
    }
}
