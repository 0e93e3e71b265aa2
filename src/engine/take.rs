//! The two-phase dump: TAKE hands out the aggregate and keeps it as the bucket's
//! *pending take* until RELEASE, so a consumer that fails between reading it and storing
//! it elsewhere gets the same take again instead of losing it.
//!
//! ```text
//!  TAKE ──▶ pending? ── yes ─▶ the same answer again (same id, same output)
//!               └────── no ──▶ dump(state): answer {"events","id","output","since_ms","taken_ms"},
//!                              kept as the pending take
//!  RELEASE id ──▶ pending id: forgotten │ an earlier id: already released, OK │ later: error
//! ```
//!
//! At most one take is pending per bucket, so it costs one dump's JSON. Events that
//! arrive meanwhile go into the live aggregate, which the next take hands out. For a
//! durable bucket the pending take is in the log (one record per take and per release)
//! and in the snapshot header, so it survives a crash like the state does.

use bytes::Bytes;

/// The take-related part of a bucket: which take is pending and where the next starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Takes {
    /// The last take's id, 0 before the first.
    pub last_id: u64,
    /// The last take's `taken_ms`; the next take's window starts there.
    pub last_ms: u64,
    /// Events accepted since the aggregate was last reset (by a take, DUMP or flush).
    pub events: u64,
    /// The take handed out but not yet released.
    pub pending: Option<Pending>,
}

/// A take that was handed out and not released: its id and the exact answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pending {
    pub id: u64,
    pub answer: Bytes,
}

/// What a RELEASE finds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Release {
    /// It was the pending take; it is gone now.
    Released,
    /// It was released before (or handed out by no take still pending): nothing to do.
    Already,
    /// No take with that id was handed out yet.
    Unknown,
}

/// A snapshot that starts with this byte has the take header; a handler state never
/// does (its first byte is a value tag, `script::snapshot`).
const HEADER_TAG: u8 = 0xff;
const HEADER_VERSION: u8 = 1;

impl Takes {
    /// No take yet: the first window starts at `first_window_ms` (the bucket's creation,
    /// or for an in-memory bucket loaded at start-up, that start).
    pub fn new(first_window_ms: u64) -> Takes {
        Takes {
            last_ms: first_window_ms,
            ..Takes::default()
        }
    }

    /// The next take's id and time: the time strictly increases per bucket, so two
    /// windows never share a start, whatever the clock does. (Saturating: the counters
    /// come from files, and a corrupt one must not overflow.)
    pub fn next(&self, now_ms: u64) -> (u64, u64) {
        let last_ms = self.last_ms.saturating_add(1);
        (self.last_id.saturating_add(1), now_ms.max(last_ms))
    }

    /// The answer of a take `id` at `taken_ms` of the handler's `output` (JSON).
    pub fn answer(&self, id: u64, taken_ms: u64, output: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(output.len() + 96);
        out.extend_from_slice(
            format!("{{\"events\":{},\"id\":{id},\"output\":", self.events).as_bytes(),
        );
        out.extend_from_slice(output);
        out.extend_from_slice(
            format!(",\"since_ms\":{},\"taken_ms\":{taken_ms}}}", self.last_ms).as_bytes(),
        );
        Bytes::from(out)
    }

    /// Records a take just made (or replayed): it is pending from now on.
    pub fn taken(&mut self, id: u64, taken_ms: u64, answer: Bytes) {
        self.last_id = id;
        self.last_ms = taken_ms;
        self.events = 0;
        self.pending = Some(Pending { id, answer });
    }

    /// Handles RELEASE `id`.
    pub fn release(&mut self, id: u64) -> Release {
        match &self.pending {
            Some(p) if p.id == id => {
                self.pending = None;
                Release::Released
            }
            _ if id >= 1 && id <= self.last_id => Release::Already,
            _ => Release::Unknown,
        }
    }

    /// `tag version last_id last_ms events has_pending [id len answer]`, then the
    /// handler state follows in the snapshot.
    pub fn encode_header(&self, out: &mut Vec<u8>) {
        out.push(HEADER_TAG);
        out.push(HEADER_VERSION);
        for n in [self.last_id, self.last_ms, self.events] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        match &self.pending {
            None => out.push(0),
            Some(p) => {
                out.push(1);
                out.extend_from_slice(&p.id.to_be_bytes());
                out.extend_from_slice(&(p.answer.len() as u32).to_be_bytes());
                out.extend_from_slice(&p.answer);
            }
        }
    }

    /// Splits a stored snapshot into the take header (if it has one; older snapshots
    /// do not) and the handler state.
    ///
    /// # Errors
    /// A description of what is malformed.
    pub fn decode_header(snapshot: &[u8]) -> Result<(Option<Takes>, &[u8]), String> {
        if snapshot.first() != Some(&HEADER_TAG) {
            return Ok((None, snapshot));
        }
        let mut r = Cursor(snapshot.get(1..).unwrap_or_default());
        let version = r.take(1)?[0];
        if version != HEADER_VERSION {
            return Err(format!("unknown snapshot header version {version}"));
        }
        let (last_id, last_ms, events) = (r.u64()?, r.u64()?, r.u64()?);
        let pending = match r.take(1)?[0] {
            0 => None,
            1 => {
                let id = r.u64()?;
                let len = r.u32()? as usize;
                let answer = Bytes::copy_from_slice(r.take(len)?);
                Some(Pending { id, answer })
            }
            other => return Err(format!("malformed snapshot header (pending flag {other})")),
        };
        let takes = Takes {
            last_id,
            last_ms,
            events,
            pending,
        };
        Ok((Some(takes), r.0))
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated snapshot header".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_take_is_pending_until_released_and_ids_only_grow() {
        let mut t = Takes::new(1000);
        assert_eq!(t.release(1), Release::Unknown);
        t.events = 3;
        let (id, at) = t.next(900); // the clock went back: time still moves on
        assert_eq!((id, at), (1, 1001));
        let answer = t.answer(id, at, b"{\"a\":1}");
        let v: serde_json::Value = serde_json::from_slice(&answer).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"events": 3, "id": 1, "output": {"a": 1}, "since_ms": 1000, "taken_ms": 1001})
        );
        t.taken(id, at, answer);
        assert_eq!((t.events, t.next(5000)), (0, (2, 5000)));
        assert_eq!(t.release(2), Release::Unknown);
        assert_eq!(t.release(1), Release::Released);
        assert_eq!(t.release(1), Release::Already);
        assert_eq!(t.release(0), Release::Unknown);
    }

    #[test]
    fn the_header_round_trips_and_old_snapshots_have_none() {
        let mut t = Takes::new(7);
        t.events = 9;
        t.taken(4, 8, Bytes::from_static(b"{}"));
        t.events = 2;
        for takes in [Takes::new(5), t] {
            let mut bytes = Vec::new();
            takes.encode_header(&mut bytes);
            bytes.extend_from_slice(b"\x06state");
            let (back, state) = Takes::decode_header(&bytes).expect("decodes");
            assert_eq!((back, state), (Some(takes), &b"\x06state"[..]));
            // Cut inside the header (the state is 6 bytes): an error, not a short state.
            assert!(Takes::decode_header(&bytes[..bytes.len() - 7]).is_err());
        }
        assert_eq!(Takes::decode_header(b"\x06x"), Ok((None, &b"\x06x"[..])));
        assert!(Takes::decode_header(&[HEADER_TAG, 1, 0]).is_err());
    }
}
