//! `handlers/counter.lua`, natively: events per key (the trimmed event).

use super::key::Key;
use super::snap::{self, V};
use super::{trim, write_counts, Table, OUT_OF_MEMORY};

/// Estimated bytes of one hash-table entry (a 32-byte slot at the table's load factor)
/// beyond a long key's own allocation.
const ENTRY: usize = 40;

pub(crate) struct Counter {
    counts: Table<Key, i64>,
    used: usize,
    limit: usize,
}

impl Counter {
    pub fn new(limit: usize) -> Counter {
        Counter {
            counts: Table::default(),
            used: 0,
            limit,
        }
    }

    pub fn send(&mut self, event: &[u8]) -> Result<(), String> {
        let key = trim(event);
        if key.is_empty() {
            return Err("empty event (expected KEY)".into());
        }
        if let Some(n) = self.counts.get_mut(key) {
            *n = n.wrapping_add(1);
            return Ok(());
        }
        self.insert(key, 1)
    }

    fn insert(&mut self, key: &[u8], n: i64) -> Result<(), String> {
        let cost = ENTRY + Key::heap_cost(key.len());
        if self.used + cost > self.limit {
            return Err(OUT_OF_MEMORY.into());
        }
        self.used += cost;
        self.counts.insert(key.into(), n);
        Ok(())
    }

    pub fn view(&self) -> Vec<u8> {
        write_counts(self.counts.iter().map(|(k, n)| (&k[..], *n)))
    }

    pub fn view_key(&self, key: &[u8]) -> i64 {
        self.counts.get(key).copied().unwrap_or(0)
    }

    pub fn clear(&mut self) {
        self.counts = Table::default();
        self.used = 0;
    }

    /// The Lua state `{counts = {KEY = n, ...}}`.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.counts.len() * 32);
        snap::put_table(&mut out, 1);
        snap::put_str(&mut out, b"counts");
        snap::put_table(&mut out, self.counts.len());
        for (k, n) in &self.counts {
            snap::put_str(&mut out, k);
            snap::put_int(&mut out, *n);
        }
        out
    }

    pub fn restore(&mut self, state: &V) -> Result<(), String> {
        let counts = state
            .field("counts")
            .ok_or("not a counter state: no counts")?;
        self.clear();
        for (k, v) in counts.entries("counts")? {
            match (k, v) {
                (V::Str(k), V::Int(n)) => self.insert(k, *n)?,
                _ => return Err("not a counter state: counts must map strings to integers".into()),
            }
        }
        Ok(())
    }

    pub fn memory_used(&self) -> usize {
        self.used
    }
}
