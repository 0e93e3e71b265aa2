//! Consecutive SEND frames to one bucket found in one read buffer, gathered into one
//! [`SendGroup`]: posted to the bucket as one message (or applied at once by its fast
//! lane) and answered in one go, so a pipelining client costs one mailbox message and
//! one wake-up per read rather than per frame.
//!
//! The group's first SEND is routed like any request: decoded, its user and permission
//! checked. The frames after it are taken straight from the read buffer
//! ([`SendGroup::gather`]): each is checked to be a well-formed SEND to the same bucket,
//! the whole run takes its in-flight budget at once, and the run leaves the buffer as one
//! piece that the frames' events borrow from, so a gathered frame costs no allocation
//! and no reference count of its own.

use bytes::{Bytes, BytesMut};

use super::budget::Budget;
use crate::protocol::{send_frame_to, SendBatch, SendFrame, SendView, FRAME_HEADER_LEN};

/// Largest group: frames, and bytes of events.
pub(super) const GROUP_MAX_FRAMES: usize = 64;
pub(super) const GROUP_MAX_BYTES: usize = 1024 * 1024;

/// A group of SENDs to one bucket ([module docs](self)).
pub(super) struct SendGroup {
    pub bucket: String,
    /// The pieces of the read buffer the frames lie in.
    runs: Vec<Bytes>,
    frames: Vec<Gathered>,
    bytes: usize,
    pub budget: Option<Budget>,
    /// Frames taken by [`SendGroup::gather`], counted in INFO `requests` when the group
    /// is posted (a routed frame is counted when it is routed).
    pub uncounted: u64,
}

/// One frame of a group: where its events lie in which run.
struct Gathered {
    run: usize,
    frame: SendFrame,
}

/// An emptied group's vectors, kept for the next group.
#[derive(Default)]
pub(super) struct Spare {
    runs: Vec<Bytes>,
    frames: Vec<Gathered>,
}

impl SendGroup {
    pub fn new(bucket: String, spare: Spare) -> SendGroup {
        SendGroup {
            bucket,
            runs: spare.runs,
            frames: spare.frames,
            bytes: 0,
            budget: None,
            uncounted: 0,
        }
    }

    /// Adds a routed SEND and the budget it holds; true if the group is now full.
    pub fn add(&mut self, id: u32, batch: SendBatch, budget: Option<Budget>) -> bool {
        let (count, data) = batch.into_parts();
        let len = data.len();
        self.frames.push(Gathered {
            run: self.runs.len(),
            // The whole run is the events; its frame's length is not known here, and
            // only `gather` reads `len`, of the frames it took itself.
            frame: SendFrame {
                id,
                count,
                events: 0..len,
                len,
            },
        });
        self.runs.push(data);
        self.bytes += len;
        match (&mut self.budget, budget) {
            (Some(mine), Some(more)) => mine.merge(more),
            (mine @ None, more) => *mine = more,
            (Some(_), None) => {}
        }
        self.is_full()
    }

    /// Takes the complete, well-formed SEND frames to this group's bucket at the start of
    /// `buf` out of it, as many as the group and the in-flight budget have room for.
    /// `None` if it took none: the first frame is something else, incomplete, or over
    /// budget, and is read as a request (which waits for budget, or reports what is
    /// wrong). Else whether the group is now full.
    ///
    /// A frame costs the budget what a routed one does: its body's length, at least 1
    /// and at most `max_cost`. The caller must hold that the group's routed SEND's
    /// permission check covers these frames (see `Reader::run`).
    pub fn gather(&mut self, buf: &mut BytesMut, max_frame: u32, max_cost: usize) -> Option<bool> {
        let budget = self.budget.as_mut()?;
        let cost_of = |f: &SendFrame| (f.len - FRAME_HEADER_LEN).clamp(1, max_cost) as u64;
        let (first, run) = (self.frames.len(), self.runs.len());
        let (mut at, mut bytes, mut cost) = (0, self.bytes, 0u64);
        while self.frames.len() < GROUP_MAX_FRAMES && bytes < GROUP_MAX_BYTES {
            let Some(mut frame) = send_frame_to(&buf[at..], &self.bucket, max_frame) else {
                break;
            };
            frame.events = at + frame.events.start..at + frame.events.end;
            at += frame.len;
            bytes += frame.events.len();
            cost += cost_of(&frame);
            self.frames.push(Gathered { run, frame });
        }
        let found = self.frames.len() - first;
        if found == 0 {
            return None;
        }
        let all = u32::try_from(cost).is_ok_and(|c| budget.try_add_many(found as u32, c));
        if !all {
            // Not room for all of them: as many as fit, in order.
            let taken = self.frames[first..]
                .iter()
                .take_while(|g| budget.try_add(cost_of(&g.frame) as u32))
                .count();
            self.frames.truncate(first + taken);
        }
        let last = self.frames[first..].last()?;
        // The events of a gathered frame run to its end.
        at = last.frame.events.end;
        self.bytes += self.frames[first..]
            .iter()
            .map(|g| g.frame.events.len())
            .sum::<usize>();
        self.uncounted += (self.frames.len() - first) as u64;
        self.runs.push(buf.split_to(at).freeze());
        Some(self.is_full())
    }

    fn is_full(&self) -> bool {
        self.frames.len() >= GROUP_MAX_FRAMES || self.bytes >= GROUP_MAX_BYTES
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// The frames' ids, in order.
    pub fn ids(&self) -> Vec<u32> {
        self.frames.iter().map(|g| g.frame.id).collect()
    }

    /// The frames' ids and events, borrowed, in order.
    pub fn views(&self) -> impl Iterator<Item = (u32, SendView<'_>)> + Clone {
        self.frames.iter().map(|g| {
            let run = self.runs.get(g.run).map_or(&[][..], |r| &r[..]);
            (g.frame.id, SendView::of_frame(run, &g.frame))
        })
    }

    /// The frames' ids and events as owned batches, in order: to post them.
    pub fn batches(&self) -> Vec<(u32, SendBatch)> {
        let none = Bytes::new();
        self.frames
            .iter()
            .map(|g| {
                let run = self.runs.get(g.run).unwrap_or(&none);
                (g.frame.id, SendBatch::of_frame(run, &g.frame))
            })
            .collect()
    }

    /// Empties the group, keeping its vectors; the budget it holds is dropped (given
    /// back) unless taken before.
    pub fn into_spare(mut self) -> Spare {
        self.runs.clear();
        self.frames.clear();
        Spare {
            runs: self.runs,
            frames: self.frames,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Command, Request};
    use crate::server::budget::InFlight;

    fn send(out: &mut BytesMut, id: u32, bucket: &str, events: &[&str]) {
        let batch = SendBatch::from_events(events);
        let command = Command::Send {
            bucket: bucket.into(),
            batch,
        };
        Request { id, command }.encode(out);
    }

    /// A group of one routed SEND of `a` to "b", holding one request's budget.
    fn routed(pool: &std::sync::Arc<InFlight>) -> SendGroup {
        let mut group = SendGroup::new("b".into(), Spare::default());
        let budget = pool.try_take(10);
        assert!(budget.is_some());
        assert!(!group.add(1, SendBatch::from_events(&["a"]), budget));
        group
    }

    fn events(group: &SendGroup) -> Vec<(u32, Vec<Vec<u8>>)> {
        let views: Vec<_> = group
            .views()
            .map(|(id, v)| (id, v.iter().map(<[u8]>::to_vec).collect()))
            .collect();
        let batches: Vec<_> = group
            .batches()
            .into_iter()
            .map(|(id, b)| (id, b.iter().map(<[u8]>::to_vec).collect()))
            .collect();
        assert_eq!(views, batches, "views and batches agree");
        views
    }

    #[test]
    fn takes_the_run_of_sends_to_its_bucket_and_leaves_the_rest() {
        let pool = InFlight::new(100, 10_000);
        let mut group = routed(&pool);
        let mut buf = BytesMut::new();
        send(&mut buf, 2, "b", &["x", "y"]);
        send(&mut buf, 3, "b", &[]);
        let run = buf.len();
        send(&mut buf, 4, "other", &["z"]);
        send(&mut buf, 5, "b", &["w"]);
        let rest = buf[run..].to_vec();
        assert_eq!(group.gather(&mut buf, 1 << 20, 1 << 20), Some(false));
        let v = |s: &[&str]| s.iter().map(|e| e.as_bytes().to_vec()).collect::<Vec<_>>();
        assert_eq!(
            events(&group),
            vec![(1, v(&["a"])), (2, v(&["x", "y"])), (3, vec![])]
        );
        assert_eq!(group.ids(), vec![1, 2, 3]);
        assert_eq!(group.uncounted, 2, "the routed frame was counted");
        assert_eq!(&buf[..], &rest[..], "the frame to another bucket is next");
        assert_eq!(group.gather(&mut buf, 1 << 20, 1 << 20), None);
        assert_eq!(&buf[..], &rest[..], "nothing taken");
        // Three requests hold budget: 97 are left.
        let held: Vec<_> = (0..100).filter_map(|_| pool.try_take(1)).collect();
        assert_eq!(held.len(), 97);
        assert!(pool.try_take(1).is_none());
        drop(held);
        drop(group);
        let all: Vec<_> = (0..100).filter_map(|_| pool.try_take(1)).collect();
        assert_eq!(all.len(), 100, "the group gave its budget back");
    }

    #[test]
    fn stops_at_an_incomplete_or_oversized_frame() {
        let pool = InFlight::new(100, 10_000);
        let mut group = routed(&pool);
        let mut buf = BytesMut::new();
        send(&mut buf, 2, "b", &["x"]);
        let one = buf.len();
        send(&mut buf, 3, "b", &["a longer event"]);
        let mut cut = BytesMut::from(&buf[..buf.len() - 1]);
        assert_eq!(group.gather(&mut cut, 1 << 20, 1 << 20), Some(false));
        assert_eq!(cut.len(), buf.len() - 1 - one, "the incomplete frame stays");
        let mut group = routed(&pool);
        let mut big = buf.clone();
        assert_eq!(group.gather(&mut big, one as u32 - 4, 1 << 20), Some(false));
        assert_eq!(
            big.len(),
            buf.len() - one,
            "the frame over the maximum stays"
        );
        assert_eq!(group.len(), 2);
    }

    #[test]
    fn takes_only_what_the_budget_and_the_group_have_room_for() {
        let mut buf = BytesMut::new();
        for id in 0..100 {
            send(&mut buf, id, "b", &["e"]);
        }
        let frame = buf.len() / 100;
        // Room for the routed request and 2 more.
        let pool = InFlight::new(3, 10_000);
        let mut group = routed(&pool);
        let mut short = buf.clone();
        assert_eq!(group.gather(&mut short, 1 << 20, 1 << 20), Some(false));
        assert_eq!(group.len(), 3);
        assert_eq!(short.len(), buf.len() - 2 * frame);
        assert_eq!(group.gather(&mut short, 1 << 20, 1 << 20), None, "spent");
        assert_eq!(short.len(), buf.len() - 2 * frame);
        // Bytes: a frame costs its body, at most `max_cost`.
        let pool = InFlight::new(100, 10 + 2 * 5);
        let mut group = routed(&pool);
        let mut short = buf.clone();
        assert_eq!(group.gather(&mut short, 1 << 20, 5), Some(false));
        assert_eq!(group.len(), 3, "two frames of cost 5");
        // The group is full at GROUP_MAX_FRAMES.
        let pool = InFlight::new(1000, 1 << 20);
        let mut group = routed(&pool);
        let mut long = buf.clone();
        assert_eq!(group.gather(&mut long, 1 << 20, 1 << 20), Some(true));
        assert_eq!(group.len(), GROUP_MAX_FRAMES);
        assert_eq!(long.len(), buf.len() - (GROUP_MAX_FRAMES - 1) * frame);
        let spare = group.into_spare();
        assert!(spare.frames.is_empty() && spare.frames.capacity() >= GROUP_MAX_FRAMES);
    }
}
