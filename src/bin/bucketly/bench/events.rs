//! Generated events: a template with the value of a key index filled in.
//!
//! `{}` in the template is replaced by the index as 16 lowercase hex digits (so every
//! index gives a distinct 16-byte value), `{n}` by the index in decimal. Indexes are
//! uniform random over `0..keys`, or, with `sequential`, taken in order from a counter
//! all connections share, so that together they send `0, 1, 2, …` each once per pass
//! however the frames fall among them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Hex,
    Decimal,
}

/// Parses a template; errors if it has no placeholder, since every event would be the
/// same.
pub fn parse_template(template: &str) -> Result<Vec<PartSpec>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    let mut placeholders = 0;
    while !rest.is_empty() {
        let (cut, part, skip) = match (rest.find("{}"), rest.find("{n}")) {
            (Some(h), Some(d)) if d < h => (d, Part::Decimal, 3),
            (Some(h), _) => (h, Part::Hex, 2),
            (None, Some(d)) => (d, Part::Decimal, 3),
            (None, None) => (rest.len(), Part::Text(String::new()), 0),
        };
        if cut > 0 {
            parts.push(PartSpec(Part::Text(rest[..cut].to_owned())));
        }
        if skip > 0 {
            placeholders += 1;
            parts.push(PartSpec(part));
        }
        rest = &rest[cut + skip..];
    }
    if placeholders == 0 {
        return Err(format!(
            "--event {template:?} has no placeholder: put {{}} (16 hex digits) or {{n}} (decimal) where the key goes"
        ));
    }
    Ok(parts)
}

/// A parsed template piece (opaque outside this module).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartSpec(Part);

/// Makes the events of one connection.
pub struct EventGen {
    parts: Vec<PartSpec>,
    keys: u64,
    /// Pad every event with `_` to at least this many bytes.
    size: usize,
    /// The next index, shared by every connection, in sequential mode.
    sequential: Option<Arc<AtomicU64>>,
    rng: u64,
    /// The current batch: all events back to back, and where each ends.
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl EventGen {
    /// Events for connection `conn`; `sequential` is the shared next index, if any.
    pub fn new(
        parts: Vec<PartSpec>,
        keys: u64,
        size: usize,
        sequential: Option<Arc<AtomicU64>>,
        conn: u64,
    ) -> EventGen {
        EventGen {
            parts,
            keys: keys.max(1),
            size,
            sequential,
            // Any odd, connection-specific seed will do for xorshift.
            rng: 0x9E37_79B9_7F4A_7C15 ^ (conn.wrapping_mul(0xA24B_AED4_963E_E407) | 1),
            data: Vec::new(),
            ends: Vec::new(),
        }
    }

    fn next_index(&mut self) -> u64 {
        match &self.sequential {
            Some(next) => next.fetch_add(1, Ordering::Relaxed) % self.keys,
            None => {
                let mut x = self.rng;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.rng = x;
                // Lemire's multiply-shift: uniform over 0..keys without a division.
                ((u128::from(x) * u128::from(self.keys)) >> 64) as u64
            }
        }
    }

    /// The length of every event, if the template fixes it (it has no decimal
    /// placeholder): then an event can be rewritten in place by [`EventGen::refill`].
    pub fn fixed_len(&self) -> Option<usize> {
        let mut len = 0;
        for PartSpec(part) in &self.parts {
            len += match part {
                Part::Text(t) => t.len(),
                Part::Hex => 16,
                Part::Decimal => return None,
            };
        }
        Some(len.max(self.size))
    }

    /// Rewrites `event`, one of [`EventGen::fixed_len`] bytes made by this generator,
    /// into the next event: the bytes [`EventGen::next_batch`] would have given.
    pub fn refill(&mut self, event: &mut [u8]) {
        let i = self.next_index();
        let mut at = 0;
        for PartSpec(part) in &self.parts {
            match part {
                Part::Text(t) => at += t.len(),
                Part::Hex => {
                    if let Some(digits) = event.get_mut(at..at + 16) {
                        digits.copy_from_slice(&hex16(i));
                    }
                    at += 16;
                }
                Part::Decimal => {}
            }
        }
    }

    /// The next `n` events; valid until the next call.
    pub fn next_batch(&mut self, n: usize) -> Batch<'_> {
        self.data.clear();
        self.ends.clear();
        for _ in 0..n {
            let i = self.next_index();
            let start = self.data.len();
            // Written digit by digit rather than through `fmt`: the load generator shares
            // the cores with the server it measures, so its own cost per event counts.
            for PartSpec(part) in &self.parts {
                match part {
                    Part::Text(t) => self.data.extend_from_slice(t.as_bytes()),
                    Part::Hex => self.data.extend_from_slice(&hex16(i)),
                    Part::Decimal => put_decimal(&mut self.data, i),
                }
            }
            if self.data.len() - start < self.size {
                self.data.resize(start + self.size, b'_');
            }
            self.ends.push(self.data.len());
        }
        Batch {
            data: &self.data,
            ends: &self.ends,
        }
    }
}

/// `i` as 16 lowercase hex digits, eight at a time: each nibble is spread into a byte of
/// its own, then every byte is turned into its digit at once.
fn hex16(i: u64) -> [u8; 16] {
    fn eight(half: u32) -> [u8; 8] {
        let mut x = u64::from(half);
        x = (x | (x << 16)) & 0x0000_FFFF_0000_FFFF;
        x = (x | (x << 8)) & 0x00FF_00FF_00FF_00FF;
        x = (x | (x << 4)) & 0x0F0F_0F0F_0F0F_0F0F;
        // 1 in each byte whose nibble is 10 or more; those skip from '9'+1 to 'a'.
        let letters = ((x + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
        (x + 0x3030_3030_3030_3030 + letters * (b'a' - b'9' - 1) as u64).to_be_bytes()
    }
    let mut digits = [0u8; 16];
    digits[..8].copy_from_slice(&eight((i >> 32) as u32));
    digits[8..].copy_from_slice(&eight(i as u32));
    digits
}

/// Appends `i` in decimal.
fn put_decimal(out: &mut Vec<u8>, mut i: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (i % 10) as u8;
        i /= 10;
        if i == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// A batch of events in one buffer.
pub struct Batch<'a> {
    data: &'a [u8],
    ends: &'a [usize],
}

impl<'a> Batch<'a> {
    /// The events in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &'a [u8]> + '_ {
        let data = self.data;
        self.ends.iter().enumerate().map(move |(k, &end)| {
            let start = if k == 0 { 0 } else { self.ends[k - 1] };
            &data[start..end]
        })
    }
}

/// The template a handler's events take by default.
pub fn default_template(handler: &str) -> &'static str {
    match handler {
        "unique" => "k {}",
        "latest" => "{} v",
        "stats" => "{n}",
        _ => "{}",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(template: &str, keys: u64, size: usize, seq: bool, n: usize) -> Vec<String> {
        let parts = parse_template(template).expect("template");
        let next = seq.then(|| Arc::new(AtomicU64::new(0)));
        let mut g = EventGen::new(parts, keys, size, next, 0);
        let batch = g.next_batch(n);
        batch
            .iter()
            .map(|e| String::from_utf8_lossy(e).into_owned())
            .collect()
    }

    #[test]
    fn placeholders_are_filled_in() {
        assert_eq!(
            events("k {} #{n}", 10, 0, true, 2),
            ["k 0000000000000000 #0", "k 0000000000000001 #1"]
        );
        assert_eq!(events("{}", 4, 20, true, 1), ["0000000000000000____"]);
        assert!(parse_template("no placeholder").is_err());
    }

    #[test]
    fn digits_match_the_formatter() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let spread = (0..1000).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        });
        let edges = [
            0,
            1,
            9,
            10,
            15,
            16,
            255,
            0x9a9a_afaf,
            u64::MAX / 3,
            u64::MAX,
        ];
        for i in edges.into_iter().chain(spread) {
            let mut dec = Vec::new();
            put_decimal(&mut dec, i);
            assert_eq!(hex16(i).to_vec(), format!("{i:016x}").into_bytes());
            assert_eq!(dec, i.to_string().into_bytes());
        }
    }

    #[test]
    fn sequential_connections_share_the_key_space() {
        let parts = parse_template("{n}").expect("template");
        let next = Arc::new(AtomicU64::new(0));
        let mut gens: Vec<EventGen> = (0..3)
            .map(|c| EventGen::new(parts.clone(), 9, 0, Some(next.clone()), c))
            .collect();
        // Uneven shares, as the shared frame budget gives them: still each index once.
        let mut seen = Vec::new();
        for (g, n) in gens.iter_mut().zip([5, 1, 3]) {
            let batch = g.next_batch(n);
            seen.extend(
                batch
                    .iter()
                    .map(|e| String::from_utf8_lossy(e).into_owned()),
            );
        }
        seen.sort_by_key(|s| s.parse::<u32>().unwrap_or(0));
        let all: Vec<String> = (0..9).map(|i| i.to_string()).collect();
        assert_eq!(seen, all);
    }

    #[test]
    fn random_indexes_stay_in_range_and_cover_it() {
        let mut seen = [0u32; 7];
        for e in events("{n}", 7, 0, false, 7000) {
            let i = e.parse::<usize>().expect("number");
            assert!(i < 7);
            seen[i] += 1;
        }
        // About 1000 each.
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }
}
