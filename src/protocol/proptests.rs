//! Property tests of the codec: encode/decode round trips, any split of a valid byte
//! stream decodes the same, and arbitrary bytes never panic a decoder.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::frame::check_frame;
use super::{
    send_frame_to, ClientHello, Command, Request, Response, SendBatch, SendOutcome, SendView,
    ServerHello, Status,
};

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9._:-]{0,20}"
}

fn blob() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from)
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        blob().prop_map(Command::Ping),
        (name(), name(), blob(), blob()).prop_map(|(bucket, handler, config, options)| {
            Command::Create {
                bucket,
                handler,
                config,
                options,
            }
        }),
        name().prop_map(|bucket| Command::Drop { bucket }),
        Just(Command::List),
        (name(), proptest::collection::vec(blob(), 0..8)).prop_map(|(bucket, events)| {
            Command::Send {
                bucket,
                batch: SendBatch::from_events(&events),
            }
        }),
        (name(), proptest::option::of(blob()))
            .prop_map(|(bucket, arg)| Command::View { bucket, arg }),
        name().prop_map(|bucket| Command::Dump { bucket }),
        name().prop_map(|bucket| Command::Take { bucket }),
        (name(), any::<u64>()).prop_map(|(bucket, take)| Command::Release { bucket, take }),
        proptest::option::of(name()).prop_map(|bucket| Command::Info { bucket }),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (any::<u32>(), command()).prop_map(|(id, command)| Request { id, command })
}

fn send_target(req: &Request) -> Option<&str> {
    match &req.command {
        Command::Send { bucket, .. } => Some(bucket),
        _ => None,
    }
}

/// The body of `req` with the bytes at `flips` overwritten.
fn mutated(req: &Request, flips: &[(prop::sample::Index, u8)]) -> Bytes {
    let mut out = BytesMut::new();
    req.encode(&mut out);
    let mut body = out[4..].to_vec();
    for (at, byte) in flips {
        let i = at.index(body.len());
        body[i] = *byte;
    }
    Bytes::from(body)
}

/// Decodes every complete frame in `buf`, as the server's reader does.
fn drain(buf: &mut BytesMut, out: &mut Vec<Request>) {
    while let Some(len) = check_frame(buf, u32::MAX).expect("valid framing") {
        let frame = buf.split_to(4 + len).freeze();
        out.push(Request::decode(frame.slice(4..)).expect("valid request"));
    }
}

proptest! {
    #[test]
    fn requests_round_trip(req in request()) {
        let mut out = BytesMut::new();
        req.encode(&mut out);
        prop_assert_eq!(Request::decode(out.freeze().slice(4..)), Ok(req));
    }

    #[test]
    fn any_split_of_a_stream_decodes_the_same(
        reqs in proptest::collection::vec(request(), 1..12),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..16),
    ) {
        let mut wire = BytesMut::new();
        for r in &reqs {
            r.encode(&mut wire);
        }
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        points.push(wire.len());
        points.sort_unstable();
        let (mut buf, mut got, mut from) = (BytesMut::new(), Vec::new(), 0);
        for to in points {
            buf.extend_from_slice(&wire[from..to]);
            from = to;
            drain(&mut buf, &mut got);
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, reqs);
    }

    #[test]
    fn the_send_shortcut_reads_what_decode_reads(
        req in request(),
        other in name(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        tail in blob(),
    ) {
        let body = mutated(&req, &flips);
        let decoded = Request::decode(body.clone());
        // The frame, then whatever follows it in the buffer.
        let mut buf = (body.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(&body);
        let whole = buf.len();
        buf.extend_from_slice(&tail);
        let events = |b: SendView<'_>| b.iter().map(<[u8]>::to_vec).collect::<Vec<_>>();
        for bucket in [other.as_str(), send_target(&req).unwrap_or("")] {
            // Where the shortcut answers, decode agrees; where decode reads a SEND to
            // this bucket, the shortcut answers.
            let expected = match &decoded {
                Ok(Request { id, command: Command::Send { bucket: b, batch } }) if b == bucket => {
                    Some((*id, events(batch.view()), whole))
                }
                _ => None,
            };
            let got = send_frame_to(&buf, bucket, u32::MAX)
                .map(|f| (f.id, events(SendView::of_frame(&buf, &f)), f.len));
            prop_assert_eq!(&got, &expected);
            if expected.is_some() {
                // Never a frame longer than the maximum, nor an incomplete one.
                prop_assert!(send_frame_to(&buf, bucket, body.len() as u32 - 1).is_none());
                prop_assert!(send_frame_to(&buf[..whole - 1], bucket, u32::MAX).is_none());
            }
        }
    }

    #[test]
    fn the_send_shortcut_takes_only_sends(
        bucket in name(),
        events in proptest::collection::vec(blob(), 0..4),
        opcode in any::<u8>(),
    ) {
        let req = Request { id: 9, command: Command::Send { bucket: bucket.clone(), batch: SendBatch::from_events(&events) } };
        let mut out = BytesMut::new();
        req.encode(&mut out);
        let is_send = out[4] == opcode;
        out[4] = opcode;
        prop_assert_eq!(send_frame_to(&out, &bucket, u32::MAX).is_some(), is_send);
    }

    #[test]
    fn responses_and_outcomes_round_trip(
        id in any::<u32>(),
        payload in blob(),
        accepted in any::<u32>(),
        reasons in proptest::collection::vec((any::<u32>(), "[ -~]{0,30}"), 0..16),
    ) {
        let mut out = BytesMut::new();
        let r = Response::ok(id, payload);
        r.encode(&mut out);
        prop_assert_eq!(Response::decode(out.freeze().slice(4..)), Ok(r));
        let o = SendOutcome { accepted, rejected: reasons.len() as u32, reasons };
        prop_assert_eq!(SendOutcome::decode(o.encode()), Ok(o));
    }

    #[test]
    fn plain_counts_read_what_decode_reads(
        status in 0u8..6,
        id in any::<u32>(),
        counts in (any::<u32>(), any::<u32>()),
        reasons in proptest::collection::vec((any::<u32>(), "[ -~]{0,8}"), 0..3),
        cut in 0usize..3,
        reason_count in proptest::option::of(any::<u16>()),
    ) {
        let o = SendOutcome { accepted: counts.0, rejected: counts.1, reasons };
        let mut body = vec![status];
        body.extend(id.to_be_bytes());
        body.extend_from_slice(&o.encode());
        if let (Some(n), Some(at)) = (reason_count, body.get_mut(13..15)) {
            at.copy_from_slice(&n.to_be_bytes());
        }
        body.truncate(body.len().saturating_sub(cut));
        let full = Response::decode(Bytes::from(body.clone())).ok().and_then(|r| {
            let o = SendOutcome::decode(r.payload).ok()?;
            (r.status == Status::Ok && o.reasons.is_empty()).then_some((o.accepted, o.rejected))
        });
        prop_assert_eq!(SendOutcome::plain_counts(&body), full);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let b = Bytes::from(bytes);
        let _ = check_frame(&b, 1024);
        let _ = Request::decode(b.clone());
        let _ = ClientHello::decode(&b);
        let _ = ServerHello::decode(b.clone());
        let _ = SendOutcome::decode(b.clone());
        if let Ok(r) = Response::decode(b) {
            let _ = r.failure();
        }
    }

    #[test]
    fn mutated_valid_requests_never_panic(req in request(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        if let Ok(Request { command: Command::Send { batch, .. }, .. }) = Request::decode(mutated(&req, &flips)) {
            // A decoded batch is always fully iterable.
            prop_assert_eq!(batch.iter().count(), batch.len());
        }
    }
}
