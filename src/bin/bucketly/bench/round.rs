//! The bytes of one round: `pipeline` SEND frames written together.
//!
//! When every event has the same length (the template has no decimal placeholder), a
//! round of as many frames as the last one has the same layout, so it is rewritten in
//! place: new request ids and new key digits, nothing else. redis-benchmark does the
//! same with its command buffer. The load generator shares the cores with the server it
//! measures, so encoding every frame again would cap what it can show.

use bucketly::protocol::encode_send;
use bytes::BytesMut;

use super::events::EventGen;

/// A round's frames, kept from one round to the next.
pub struct Round {
    out: BytesMut,
    /// The shape of the frames in `out` (frames, events per frame, bucket), when it may
    /// be rewritten in place.
    reusable: Option<(usize, usize, String)>,
}

/// Bytes of a SEND body before its bucket name: opcode, id, name length.
const ID_AT: usize = 4 + 1;
const NAME_AT: usize = ID_AT + 4 + 2;

impl Round {
    pub fn new() -> Round {
        Round {
            out: BytesMut::with_capacity(64 * 1024),
            reusable: None,
        }
    }

    /// The next round: `frames` SENDs of `per_frame` events to `bucket`, with ids from
    /// `id` on (which is advanced past them).
    pub fn next(
        &mut self,
        events: &mut EventGen,
        bucket: &str,
        frames: usize,
        per_frame: usize,
        id: &mut u32,
    ) -> &[u8] {
        let same = self.reusable.as_ref().is_some_and(|(f, e, b)| {
            (*f, *e, b.as_str()) == (frames, per_frame, bucket) && frames > 0
        });
        match events.fixed_len() {
            Some(len) if same => self.rewrite(events, frames, len, id),
            fixed => {
                self.out.clear();
                for _ in 0..frames {
                    let batch = events.next_batch(per_frame);
                    encode_send(&mut self.out, *id, bucket, batch.iter());
                    *id = id.wrapping_add(1);
                }
                self.reusable = fixed.map(|_| (frames, per_frame, bucket.to_owned()));
            }
        }
        &self.out
    }

    /// New ids and events in the `frames` frames already in `out`, whose events are
    /// `len` bytes each.
    fn rewrite(&mut self, events: &mut EventGen, frames: usize, len: usize, id: &mut u32) {
        // The name as encoded (which may have been cut to fit its length field).
        let name = self
            .out
            .get(NAME_AT - 2..NAME_AT)
            .map_or(0, |n| usize::from(u16::from_be_bytes([n[0], n[1]])));
        let events_at = NAME_AT + name + 4;
        let frame_len = self.out.len() / frames;
        for frame in self.out.chunks_exact_mut(frame_len) {
            frame[ID_AT..ID_AT + 4].copy_from_slice(&id.to_be_bytes());
            *id = id.wrapping_add(1);
            let mut at = events_at;
            while at + 4 + len <= frame.len() {
                events.refill(&mut frame[at + 4..at + 4 + len]);
                at += 4 + len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::events::parse_template;

    fn gen(template: &str, size: usize) -> EventGen {
        EventGen::new(
            parse_template(template).expect("template"),
            50,
            size,
            None,
            7,
        )
    }

    /// Rounds rewritten in place are the bytes that encoding them afresh gives.
    #[test]
    fn a_rewritten_round_is_the_round_encoded_afresh() {
        let cases = [
            ("{}", 0, 1),
            ("k {} / {}", 40, 3),
            ("{}x", 0, 2),
            ("{n}", 0, 2),
        ];
        for (template, size, per_frame) in cases {
            let (mut reused, mut fresh) = (gen(template, size), gen(template, size));
            let (mut round, mut id_a, mut id_b) = (Round::new(), 2u32, 2u32);
            for (frames, bucket) in [(4, "b"), (4, "b"), (4, "bb"), (2, "bb"), (2, "bb")] {
                let got = round
                    .next(&mut reused, bucket, frames, per_frame, &mut id_a)
                    .to_vec();
                let mut want = BytesMut::new();
                for _ in 0..frames {
                    let batch = fresh.next_batch(per_frame);
                    encode_send(&mut want, id_b, bucket, batch.iter());
                    id_b = id_b.wrapping_add(1);
                }
                assert_eq!(
                    got,
                    want.to_vec(),
                    "{template} x{per_frame}, {frames} frames"
                );
            }
            assert_eq!(id_a, id_b);
        }
    }
}
