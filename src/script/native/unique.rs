//! `handlers/unique.lua`, natively: distinct members per key.

use super::key::Key;
use super::snap::{self, V};
use super::{quote, trim, write_counts, Set, Table, OUT_OF_MEMORY};

/// Estimated bytes of one set slot (24 bytes at the table's load factor) beyond a long
/// member's own allocation.
const MEMBER: usize = 28;
/// Estimated bytes of one key's map entry and empty set beyond a long key's allocation.
const KEY: usize = 104;

pub(crate) struct Unique {
    members: Table<Key, Set<Key>>,
    used: usize,
    limit: usize,
}

/// `bucketly.split`: the event trimmed and cut at its first space into key and member,
/// both trimmed; `None` without a space.
fn split(event: &[u8]) -> Result<(&[u8], &[u8]), String> {
    let s = trim(event);
    match s.iter().position(|&b| b == b' ') {
        Some(sp) => Ok((trim(&s[..sp]), trim(&s[sp + 1..]))),
        None if s.is_empty() => Err("empty event (expected KEY MEMBER)".into()),
        None => Err(format!("expected KEY MEMBER, got {}", quote(s))),
    }
}

impl Unique {
    pub fn new(limit: usize) -> Unique {
        Unique {
            members: Table::default(),
            used: 0,
            limit,
        }
    }

    pub fn send(&mut self, event: &[u8]) -> Result<(), String> {
        let (key, member) = split(event)?;
        self.add(key, member)
    }

    fn add(&mut self, key: &[u8], member: &[u8]) -> Result<(), String> {
        let (limit, used) = (self.limit, &mut self.used);
        let set = match self.members.get_mut(key) {
            Some(set) => set,
            None => {
                let cost = KEY + Key::heap_cost(key.len());
                if *used + cost > limit {
                    return Err(OUT_OF_MEMORY.into());
                }
                *used += cost;
                self.members.entry(key.into()).or_default()
            }
        };
        if set.contains(member) {
            return Ok(());
        }
        let cost = MEMBER + Key::heap_cost(member.len());
        if *used + cost > limit {
            return Err(OUT_OF_MEMORY.into());
        }
        *used += cost;
        set.insert(member.into());
        Ok(())
    }

    pub fn view(&self) -> Vec<u8> {
        write_counts(self.members.iter().map(|(k, s)| (&k[..], s.len() as i64)))
    }

    pub fn view_key(&self, key: &[u8]) -> i64 {
        self.members.get(key).map_or(0, |s| s.len() as i64)
    }

    pub fn clear(&mut self) {
        self.members = Table::default();
        self.used = 0;
    }

    /// The Lua state `{members = {KEY = {MEMBER = true, ...}}, counts = {KEY = n}}`.
    pub fn snapshot(&self) -> Vec<u8> {
        let members: usize = self.members.values().map(|s| s.len()).sum();
        let mut out = Vec::with_capacity(32 + self.members.len() * 48 + members * 24);
        snap::put_table(&mut out, 2);
        snap::put_str(&mut out, b"members");
        snap::put_table(&mut out, self.members.len());
        for (k, set) in &self.members {
            snap::put_str(&mut out, k);
            snap::put_table(&mut out, set.len());
            for m in set {
                snap::put_str(&mut out, m);
                snap::put_true(&mut out);
            }
        }
        snap::put_str(&mut out, b"counts");
        snap::put_table(&mut out, self.members.len());
        for (k, set) in &self.members {
            snap::put_str(&mut out, k);
            snap::put_int(&mut out, set.len() as i64);
        }
        out
    }

    pub fn restore(&mut self, state: &V) -> Result<(), String> {
        let members = state
            .field("members")
            .ok_or("not a unique state: no members")?;
        self.clear();
        for (k, set) in members.entries("members")? {
            let V::Str(k) = k else {
                return Err("not a unique state: a key is not a string".into());
            };
            let set = set.entries("a member set")?;
            if set.is_empty() {
                // A key with no members still shows in the view, with 0.
                let cost = KEY + Key::heap_cost(k.len());
                self.used += cost;
                self.members.entry(k[..].into()).or_default();
            }
            for (m, _) in set {
                let V::Str(m) = m else {
                    return Err("not a unique state: a member is not a string".into());
                };
                self.add(k, m)?;
            }
        }
        Ok(())
    }

    pub fn memory_used(&self) -> usize {
        self.used
    }
}
