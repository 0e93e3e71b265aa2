//! Login throttling, per peer address and per user name (existing or not, so throttling
//! reveals nothing about which users exist).
//!
//! Policy: the first [`FREE_FAILURES`]` - 1` failures cost nothing extra. From the
//! [`FREE_FAILURES`]th consecutive failure on, each failure locks further attempts (for
//! that address, and for that name) for [`BASE_LOCK`], doubled per further failure, up to
//! [`MAX_LOCK`]. A locked attempt is
//! refused with `LOGIN_THROTTLED` without checking the password. A success clears the
//! record of its user name only: clearing the address too would let anyone holding one
//! valid account reset the address between guesses at other names. A record is
//! forgotten [`FORGET_AFTER`] after its last failure. Each table
//! holds at most [`MAX_ENTRIES`] records; beyond that the oldest is evicted.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The failure that first locks (the earlier ones do not).
pub const FREE_FAILURES: u32 = 5;
/// Lock after the first failure past the free ones.
pub const BASE_LOCK: Duration = Duration::from_secs(1);
/// Longest lock.
pub const MAX_LOCK: Duration = Duration::from_secs(300);
/// A record is dropped this long after its last failure.
pub const FORGET_AFTER: Duration = Duration::from_secs(900);
/// Records kept per table.
pub const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    last: Instant,
    locked_until: Option<Instant>,
}

struct Table<K> {
    map: HashMap<K, Record>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn locked(&mut self, key: &K, now: Instant) -> Option<Duration> {
        let r = self.map.get(key)?;
        if now.duration_since(r.last) > FORGET_AFTER {
            self.map.remove(key);
            return None;
        }
        r.locked_until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    fn fail(&mut self, key: &K, now: Instant) {
        if !self.map.contains_key(key) && self.map.len() >= MAX_ENTRIES {
            self.map
                .retain(|_, r| now.duration_since(r.last) <= FORGET_AFTER);
            if self.map.len() >= MAX_ENTRIES {
                let oldest = self
                    .map
                    .iter()
                    .min_by_key(|(_, r)| r.last)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.map.remove(&k);
                }
            }
        }
        let r = self.map.entry(key.clone()).or_insert(Record {
            failures: 0,
            last: now,
            locked_until: None,
        });
        r.failures += 1;
        r.last = now;
        if r.failures >= FREE_FAILURES {
            let doublings = (r.failures - FREE_FAILURES).min(16);
            let lock = BASE_LOCK.saturating_mul(1 << doublings).min(MAX_LOCK);
            r.locked_until = Some(now + lock);
        }
    }
}

/// Failure records for addresses and names.
pub struct Throttle {
    peers: Mutex<Table<IpAddr>>,
    users: Mutex<Table<String>>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            peers: Mutex::new(Table {
                map: HashMap::new(),
            }),
            users: Mutex::new(Table {
                map: HashMap::new(),
            }),
        }
    }
}

impl Throttle {
    /// How long `peer` or `user` must still wait, if either is locked.
    pub fn locked(&self, peer: IpAddr, user: &str, now: Instant) -> Option<Duration> {
        let a = self.peers.lock().locked(&peer, now);
        let b = self.users.lock().locked(&user.to_owned(), now);
        a.max(b)
    }

    /// Records a failed attempt.
    pub fn fail(&self, peer: IpAddr, user: &str, now: Instant) {
        self.peers.lock().fail(&peer, now);
        self.users.lock().fail(&user.to_owned(), now);
    }

    /// Records a success: clears the user name's record, not the address's.
    pub fn succeed(&self, user: &str) {
        self.users.lock().map.remove(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_free_failures_and_doubles() {
        let t = Throttle::default();
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let now = Instant::now();
        for _ in 0..FREE_FAILURES - 1 {
            t.fail(ip, "bob", now);
            assert_eq!(t.locked(ip, "bob", now), None);
        }
        t.fail(ip, "bob", now);
        assert_eq!(t.locked(ip, "bob", now), Some(BASE_LOCK));
        // Another address for the same name is locked too; another name from the same address too.
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        assert!(t.locked(other, "bob", now).is_some());
        assert!(t.locked(ip, "alice", now).is_some());
        t.fail(ip, "bob", now);
        assert_eq!(t.locked(ip, "bob", now), Some(BASE_LOCK * 2));
        assert_eq!(t.locked(ip, "bob", now + BASE_LOCK * 2), None);
        t.succeed("bob");
        assert_eq!(t.locked(other, "bob", now), None, "the name is cleared");
        assert!(t.locked(ip, "bob", now).is_some(), "the address is not");
    }

    #[test]
    fn records_are_forgotten_and_bounded() {
        let t = Throttle::default();
        let now = Instant::now();
        for i in 0..(MAX_ENTRIES + 10) {
            t.fail(
                IpAddr::from([10, 0, (i >> 8) as u8, i as u8]),
                &format!("u{i}"),
                now,
            );
        }
        assert!(t.peers.lock().map.len() <= MAX_ENTRIES);
        assert!(t.users.lock().map.len() <= MAX_ENTRIES);
        let ip: IpAddr = "10.9.9.9".parse().expect("ip");
        for _ in 0..FREE_FAILURES {
            t.fail(ip, "x", now);
        }
        assert!(t.locked(ip, "x", now).is_some());
        assert_eq!(
            t.locked(ip, "x", now + FORGET_AFTER + Duration::from_secs(1)),
            None
        );
    }
}
