//! Adversarial raw-byte protocol tests against the real daemon: wrong peers (HTTP, other
//! versions, random bytes), framing violations, malformed payloads, abrupt disconnects,
//! deep pipelining, the connection limit, graceful shutdown, and login and permissions.
//!
//! Request bodies are built by hand from the byte layout in `src/protocol/request.rs`
//! (`opcode:u8 request_id:u32be payload`, `str16`, `blob32`, `opt`), so these tests are an
//! independent check of the codec rather than a round trip through it.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use bucketly::protocol::{ErrorCode, Response, Status};
use bytes::BytesMut;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{config_in, RawConn, TestServer, ADMIN, ADMIN_PASSWORD};

// ---------------------------------------------------------------------------------------
// Hand-built wire format.

const OP_PING: u8 = 0x01;
const OP_CREATE: u8 = 0x02;
const OP_DROP: u8 = 0x03;
const OP_LIST: u8 = 0x04;
const OP_SEND: u8 = 0x05;
const OP_VIEW: u8 = 0x06;
const OP_DUMP: u8 = 0x07;
const OP_INFO: u8 = 0x08;
const OP_ALTER: u8 = 0x09;
const OP_RELOAD: u8 = 0x0a;
const OP_TAKE: u8 = 0x0b;
const OP_RELEASE: u8 = 0x0c;
const OP_LOGIN: u8 = 0x10;
const OP_WHOAMI: u8 = 0x11;
const OP_USER_ADD: u8 = 0x12;
const OP_USER_DEL: u8 = 0x13;
const OP_USER_PASSWD: u8 = 0x14;
const OP_USER_LIST: u8 = 0x15;
const OP_USER_GRANT: u8 = 0x16;
const OP_USER_REVOKE: u8 = 0x17;
const OP_SUBSCRIBE: u8 = 0x20;
const OP_UNSUBSCRIBE: u8 = 0x21;

/// Server hello flag bit 0: the client must LOGIN before other commands.
const LOGIN_REQUIRED: u32 = 1;

const PROTOCOL_ERROR: u16 = 100;
const FRAME_TOO_LARGE: u16 = 101;
const BAD_HANDSHAKE: u16 = 102;
const UNSUPPORTED_VERSION: u16 = 103;
const TOO_MANY_CONNECTIONS: u16 = 104;
const SHUTTING_DOWN: u16 = 105;
const USER_DELETED: u16 = 107;
const UNKNOWN_COMMAND: u16 = 200;
const MALFORMED_REQUEST: u16 = 201;
const INVALID_ARGUMENT: u16 = 202;
const AUTH_REQUIRED: u16 = 300;
const LOGIN_FAILED: u16 = 301;
const PERMISSION_DENIED: u16 = 302;
const LOGIN_THROTTLED: u16 = 303;
const NO_SUCH_USER: u16 = 310;
const USER_EXISTS: u16 = 311;
const LAST_ADMIN: u16 = 312;
const NO_SUCH_BUCKET: u16 = 400;
const BUCKET_EXISTS: u16 = 401;
const NO_SUCH_HANDLER: u16 = 402;
const HANDLER_ERROR: u16 = 403;
const LIMIT_EXCEEDED: u16 = 404;

/// A request body: `opcode:u8 request_id:u32be payload`.
fn body(op: u8, id: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![op];
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// A frame: `length:u32be body`.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn str16(s: &[u8]) -> Vec<u8> {
    let mut b = (s.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(s);
    b
}

fn blob32(s: &[u8]) -> Vec<u8> {
    let mut b = (s.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(s);
    b
}

fn ping(id: u32, payload: &[u8]) -> Vec<u8> {
    body(OP_PING, id, payload)
}

fn create(id: u32, bucket: &str, handler: &str, config: &[u8], options: &[u8]) -> Vec<u8> {
    let mut p = str16(bucket.as_bytes());
    p.extend(str16(handler.as_bytes()));
    p.extend(blob32(config));
    p.extend(blob32(options));
    body(OP_CREATE, id, &p)
}

fn send(id: u32, bucket: &str, events: &[&[u8]]) -> Vec<u8> {
    let mut p = str16(bucket.as_bytes());
    p.extend((events.len() as u32).to_be_bytes());
    for e in events {
        p.extend(blob32(e));
    }
    body(OP_SEND, id, &p)
}

fn view(id: u32, bucket: &str, arg: Option<&[u8]>) -> Vec<u8> {
    let mut p = str16(bucket.as_bytes());
    match arg {
        Some(a) => {
            p.push(1);
            p.extend(blob32(a));
        }
        None => p.push(0),
    }
    body(OP_VIEW, id, &p)
}

fn dump(id: u32, bucket: &str) -> Vec<u8> {
    body(OP_DUMP, id, &str16(bucket.as_bytes()))
}

fn drop_bucket(id: u32, bucket: &str) -> Vec<u8> {
    body(OP_DROP, id, &str16(bucket.as_bytes()))
}

fn list(id: u32) -> Vec<u8> {
    body(OP_LIST, id, &[])
}

fn info(id: u32, bucket: Option<&str>) -> Vec<u8> {
    let p = match bucket {
        Some(b) => [vec![1], str16(b.as_bytes())].concat(),
        None => vec![0],
    };
    body(OP_INFO, id, &p)
}

/// LOGIN: `user:str16 password:str16`.
fn login(id: u32, user: &str, password: &str) -> Vec<u8> {
    let p = [str16(user.as_bytes()), str16(password.as_bytes())].concat();
    body(OP_LOGIN, id, &p)
}

fn whoami(id: u32) -> Vec<u8> {
    body(OP_WHOAMI, id, &[])
}

/// USER_ADD: `user:str16 password:str16`.
fn user_add(id: u32, user: &str, password: &str) -> Vec<u8> {
    let p = [str16(user.as_bytes()), str16(password.as_bytes())].concat();
    body(OP_USER_ADD, id, &p)
}

/// USER_DEL: `user:str16`.
fn user_del(id: u32, user: &str) -> Vec<u8> {
    body(OP_USER_DEL, id, &str16(user.as_bytes()))
}

fn user_list(id: u32) -> Vec<u8> {
    body(OP_USER_LIST, id, &[])
}

/// USER_GRANT: `user:str16 permission:str16 pattern:str16`.
fn user_grant(id: u32, user: &str, permission: &str, pattern: &str) -> Vec<u8> {
    let p = [
        str16(user.as_bytes()),
        str16(permission.as_bytes()),
        str16(pattern.as_bytes()),
    ]
    .concat();
    body(OP_USER_GRANT, id, &p)
}

/// A client hello frame: `magic version:u16be flags:u16be reserved`.
fn hello(magic: &[u8], version: u16, flags: u16, reserved: &[u8]) -> Vec<u8> {
    let mut b = magic.to_vec();
    b.extend(version.to_be_bytes());
    b.extend(flags.to_be_bytes());
    b.extend_from_slice(reserved);
    framed(&b)
}

fn v1_hello() -> Vec<u8> {
    hello(b"BUCKETLY", 1, 0, &[])
}

/// `accepted rejected` from a SEND's OK payload
/// (`accepted:u32be rejected:u32be n:u16be n × (index:u32be reason:str16)`).
fn send_counts(payload: &[u8]) -> (u32, u32) {
    assert!(payload.len() >= 10, "SEND outcome too short: {payload:?}");
    let accepted = u32::from_be_bytes(payload[0..4].try_into().expect("4 bytes"));
    let rejected = u32::from_be_bytes(payload[4..8].try_into().expect("4 bytes"));
    (accepted, rejected)
}

fn parse_json(payload: &[u8]) -> Value {
    serde_json::from_slice(payload)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(payload)))
}

// ---------------------------------------------------------------------------------------
// Reading answers.

/// Guard against a hung test; never reached when the daemon behaves.
const HANG_GUARD: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG_GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("no progress within {HANG_GUARD:?}: {what}"))
}

async fn next(conn: &mut RawConn, what: &str) -> Response {
    within(what, conn.read())
        .await
        .unwrap_or_else(|| panic!("connection closed while awaiting {what}"))
}

/// The next answer must be OK for request `id`; returns its payload.
async fn expect_ok(conn: &mut RawConn, id: u32) -> Vec<u8> {
    let r = next(conn, &format!("the answer to request {id}")).await;
    assert_eq!(
        (r.status, r.id),
        (Status::Ok, id),
        "failure: {:?}",
        r.failure()
    );
    r.payload.to_vec()
}

/// The next answer must be ERROR `code` for request `id`; returns its message.
async fn expect_error(conn: &mut RawConn, id: u32, code: u16) -> String {
    let r = next(conn, &format!("the answer to request {id}")).await;
    let (got, msg) = r
        .failure()
        .expect("well-formed error payload")
        .unwrap_or_else(|| panic!("request {id}: OK where ERROR {code} was expected: {r:?}"));
    assert_eq!((r.status, r.id, got), (Status::Error, id, code), "{msg}");
    assert!(!msg.is_empty(), "error {code} without a message");
    msg
}

/// The next answer must be FATAL `code` (request id 0), then the stream must end.
async fn expect_fatal_then_eof(conn: &mut RawConn, code: u16) -> String {
    let r = next(conn, &format!("FATAL {code}")).await;
    let (got, msg) = r
        .failure()
        .expect("well-formed error payload")
        .unwrap_or_else(|| panic!("OK where FATAL {code} was expected: {r:?}"));
    assert_eq!((r.status, r.id, got), (Status::Fatal, 0, code), "{msg}");
    assert!(
        within("EOF after FATAL", conn.closed()).await,
        "the server kept the connection open after FATAL {code}"
    );
    msg
}

/// A PING with a distinctive payload is echoed: the connection is usable.
async fn assert_usable(conn: &mut RawConn, id: u32) {
    let payload = format!("still-alive-{id}");
    conn.write_frame(&ping(id, payload.as_bytes())).await;
    assert_eq!(expect_ok(conn, id).await, payload.as_bytes());
}

/// Reads answers until `max` were read or the stream ends; asserts the stream did not
/// end inside a frame (a clean EOF).
async fn read_responses(rd: &mut (impl AsyncRead + Unpin), max: usize) -> Vec<Response> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    while out.len() < max {
        if buf.len() >= 4 {
            let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
            assert!(len > 0, "the server sent a zero-length frame");
            if buf.len() >= 4 + len {
                let frame = buf.split_to(4 + len).freeze();
                out.push(Response::decode(frame.slice(4..)).expect("a well-formed response"));
                continue;
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => {
                assert!(buf.is_empty(), "stream ended inside a frame: {buf:?}");
                break;
            }
            Ok(_) => {}
            // A reset after the server's last frame; whatever arrived was read above.
            Err(_) => break,
        }
    }
    out
}

/// Writes `bytes` (one write) while concurrently reading exactly `n` answers, so neither
/// side's socket buffer can fill up and deadlock the exchange.
async fn pipeline(conn: &mut RawConn, bytes: &[u8], n: usize) -> Vec<Response> {
    let (mut rd, mut wr) = conn.stream.split();
    let write = async {
        wr.write_all(bytes).await.expect("write pipeline");
    };
    let ((), responses) = within("pipelined answers", async {
        tokio::join!(write, read_responses(&mut rd, n))
    })
    .await;
    assert_eq!(
        responses.len(),
        n,
        "the server closed before answering everything"
    );
    responses
}

/// Writes `bytes` then half-closes, while reading every answer until the server closes.
/// Write errors are expected (the server may give up on the input first).
async fn blast(mut stream: TcpStream, bytes: Vec<u8>) -> Vec<Response> {
    let (mut rd, mut wr) = stream.split();
    let write = async {
        let _ = wr.write_all(&bytes).await;
        let _ = wr.shutdown().await;
    };
    let ((), responses) = within("the server to close a garbage connection", async {
        tokio::join!(write, read_responses(&mut rd, usize::MAX))
    })
    .await;
    responses
}

/// Checks the answers to garbage: well-formed, at most one FATAL, last, with a 1xx code
/// and id 0; ERRORs are request errors (2xx), login, user and permission errors (3xx) or
/// bucket errors (4xx), never INTERNAL or STORAGE. Before a handshake, exactly one FATAL.
fn check_garbage_answers(responses: &[Response], handshaken: bool, label: &str) {
    for (i, r) in responses.iter().enumerate() {
        let failure = r
            .failure()
            .unwrap_or_else(|e| panic!("{label}: malformed error payload {e}: {r:?}"));
        match (r.status, failure) {
            (Status::Ok, _) => assert!(handshaken, "{label}: OK before any handshake: {r:?}"),
            (Status::Push | Status::End, _) => {
                panic!("{label}: a push without a subscription: {r:?}")
            }
            (Status::Error, Some((code, msg))) => {
                assert!(handshaken, "{label}: ERROR before any handshake: {msg}");
                assert!(
                    (200..500).contains(&code),
                    "{label}: garbage caused server-side error {code}: {msg}"
                );
            }
            (Status::Fatal, Some((code, msg))) => {
                assert_eq!(
                    i,
                    responses.len() - 1,
                    "{label}: answers after FATAL: {msg}"
                );
                assert!((100..200).contains(&code), "{label}: FATAL {code}: {msg}");
                assert_eq!(r.id, 0, "{label}: FATAL with request id {}", r.id);
            }
            (status, None) => panic!("{label}: {status:?} without an error payload"),
        }
    }
    if !handshaken {
        assert_eq!(responses.len(), 1, "{label}: {responses:?}");
        let (code, msg) = responses[0].failure().expect("ok").expect("error");
        assert_eq!(responses[0].status, Status::Fatal, "{label}: {msg}");
        assert!(
            code == BAD_HANDSHAKE || code == UNSUPPORTED_VERSION,
            "{label}: FATAL {code}: {msg}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Helpers around the daemon.

/// A deterministic xorshift64 generator (no extra crates).
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

/// A real client creates a counter bucket, sends to it and views the right counts.
async fn assert_serves_normally(server: &TestServer, bucket: &str) {
    let client = server.client().await;
    client
        .create(bucket, "counter", None)
        .await
        .expect("create after abuse");
    let outcome = client
        .send(bucket, &["a", "b", "a"])
        .await
        .expect("send after abuse");
    assert_eq!((outcome.accepted, outcome.rejected), (3, 0));
    assert_eq!(
        client.view(bucket, None).await.expect("view after abuse"),
        json!({"a": 2, "b": 1})
    );
}

/// Polls INFO until `connections.current` equals `want` (connections are released
/// asynchronously after a peer goes away); fails after about 5 s.
async fn await_connections(client: &bucketly::Client, want: u64) {
    let mut last = Value::Null;
    for _ in 0..500 {
        let info = client.info(None).await.expect("INFO");
        last = info["connections"]["current"].clone();
        if last == json!(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("connections.current stayed {last}, expected {want}");
}

/// A server with `adjust` applied to its config; keep the returned directory alive.
async fn server_with(
    adjust: impl FnOnce(&mut bucketly::Config),
) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config_in(dir.path());
    adjust(&mut config);
    (TestServer::start_with(config).await, dir)
}

// ---------------------------------------------------------------------------------------
// 1–2. Handshake.

// An HTTP request as the first bytes gets FATAL BAD_HANDSHAKE naming HTTP, then EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_request_gets_bad_handshake_mentioning_http() {
    let server = TestServer::start().await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let msg = expect_fatal_then_eof(&mut conn, BAD_HANDSHAKE).await;
    assert!(msg.contains("HTTP"), "{msg}");
    assert_serves_normally(&server, "after-http").await;
}

// Other text and binary protocols (redis inline, TLS ClientHello) are refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_tls_first_bytes_get_bad_handshake() {
    let server = TestServer::start().await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.write(b"PING\r\n").await;
    let msg = expect_fatal_then_eof(&mut conn, BAD_HANDSHAKE).await;
    assert!(msg.contains("not HTTP or text"), "{msg}");

    let mut conn = RawConn::connect(server.addr).await;
    conn.write(&[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ])
    .await;
    let msg = expect_fatal_then_eof(&mut conn, BAD_HANDSHAKE).await;
    assert!(msg.contains("BUCKETLY"), "{msg}");
}

// A well-formed hello of version 2 (or 0) gets FATAL UNSUPPORTED_VERSION, then EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_with_another_version_gets_unsupported_version() {
    let server = TestServer::start().await;
    for version in [2u16, 0, u16::MAX] {
        let mut conn = RawConn::connect(server.addr).await;
        conn.write(&hello(b"BUCKETLY", version, 0, &[])).await;
        let msg = expect_fatal_then_eof(&mut conn, UNSUPPORTED_VERSION).await;
        assert!(msg.contains(&version.to_string()), "{msg}");
    }
}

// Wrong magic, a short hello, an empty first frame or an over-long hello all get
// FATAL BAD_HANDSHAKE, then EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_hellos_get_bad_handshake() {
    let server = TestServer::start().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("wrong magic", hello(b"BUCKETLZ", 1, 0, &[])),
        ("lower-case magic", hello(b"bucketly", 1, 0, &[])),
        ("no version", framed(b"BUCKETLY")),
        ("half a version", framed(b"BUCKETLY\x00\x01\x00")),
        ("empty first frame", vec![0, 0, 0, 0]),
        ("257-byte hello", hello(b"BUCKETLY", 1, 0, &[0u8; 245])),
        ("a request instead of a hello", framed(&ping(1, b"x"))),
    ];
    for (what, bytes) in cases {
        let mut conn = RawConn::connect(server.addr).await;
        conn.write(&bytes).await;
        let r = next(&mut conn, what).await;
        let (code, msg) = r
            .failure()
            .expect("ok")
            .unwrap_or_else(|| panic!("{what}: OK"));
        assert_eq!(
            (r.status, r.id, code),
            (Status::Fatal, 0, BAD_HANDSHAKE),
            "{what}: {msg}"
        );
        assert!(within(what, conn.closed()).await, "{what}: not closed");
    }
}

// The server hello is `OK id 0` with magic, version 1, flags (LOGIN_REQUIRED, always set),
// the configured max_frame and a server name; reserved hello bytes up to the 256-byte
// hello limit and non-zero client flags are ignored, and the connection then works:
// PING before LOGIN, anything after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_hello_layout_and_reserved_hello_bytes() {
    let (server, _dir) = server_with(|c| c.max_frame = 4096).await;
    for (flags, reserved) in [(0u16, vec![]), (0xffff, vec![7u8; 244])] {
        let mut conn = RawConn::connect(server.addr).await;
        conn.write(&hello(b"BUCKETLY", 1, flags, &reserved)).await;
        let p = expect_ok(&mut conn, 0).await;
        assert_eq!(&p[..8], b"BUCKETLY");
        assert_eq!(u16::from_be_bytes([p[8], p[9]]), 1, "version");
        assert_eq!(
            u32::from_be_bytes(p[10..14].try_into().expect("4")),
            LOGIN_REQUIRED,
            "flags"
        );
        assert_eq!(
            u32::from_be_bytes(p[14..18].try_into().expect("4")),
            4096,
            "max_frame"
        );
        let n = u16::from_be_bytes([p[18], p[19]]) as usize;
        assert_eq!(p.len(), 20 + n, "server hello has trailing bytes");
        let name = std::str::from_utf8(&p[20..]).expect("utf-8");
        assert!(name.starts_with("bucketlyd "), "{name}");
        assert_usable(&mut conn, 1).await;
        conn.write_frame(&login(2, ADMIN, ADMIN_PASSWORD)).await;
        expect_ok(&mut conn, 2).await;
        conn.write_frame(&list(3)).await;
        assert_eq!(parse_json(&expect_ok(&mut conn, 3).await), json!([]));
    }
}

// A hello and requests in one write, a LOGIN among them: the bytes after the hello are
// served as requests, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_and_requests_in_one_write() {
    let server = TestServer::start().await;
    let mut conn = RawConn::connect(server.addr).await;
    let mut bytes = v1_hello();
    bytes.extend(framed(&ping(7, b"first")));
    bytes.extend(framed(&login(8, ADMIN, ADMIN_PASSWORD)));
    bytes.extend(framed(&create(9, "together", "counter", b"", b"")));
    bytes.extend(framed(&send(10, "together", &[b"x", b"x"])));
    bytes.extend(framed(&view(11, "together", Some(b"x"))));
    conn.write(&bytes).await;
    expect_ok(&mut conn, 0).await;
    assert_eq!(expect_ok(&mut conn, 7).await, b"first");
    assert_eq!(parse_json(&expect_ok(&mut conn, 8).await)["user"], ADMIN);
    assert_eq!(expect_ok(&mut conn, 9).await, b"");
    assert_eq!(send_counts(&expect_ok(&mut conn, 10).await), (2, 0));
    assert_eq!(parse_json(&expect_ok(&mut conn, 11).await), json!(2));
}

// A hello delivered one byte per write is still recognised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_split_into_single_bytes() {
    let server = TestServer::start().await;
    let mut conn = RawConn::connect(server.addr).await;
    for b in v1_hello() {
        conn.write(&[b]).await;
        conn.stream.flush().await.expect("flush");
    }
    expect_ok(&mut conn, 0).await;
    let req = framed(&ping(3, b"drip"));
    for b in req {
        conn.write(&[b]).await;
    }
    assert_eq!(expect_ok(&mut conn, 3).await, b"drip");
}

// ---------------------------------------------------------------------------------------
// 3. Random bytes.

// 1 MB of random bytes before any handshake: FATAL BAD_HANDSHAKE then EOF, while another
// client works normally during and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_megabyte_of_random_bytes_before_handshake() {
    let server = TestServer::start().await;
    let garbage = XorShift::new(1).bytes(1 << 20);
    let conn = RawConn::connect(server.addr).await;
    let (responses, ()) = tokio::join!(
        blast(conn.stream, garbage),
        assert_serves_normally(&server, "during-garbage")
    );
    check_garbage_answers(&responses, false, "1 MB before handshake");
    assert_serves_normally(&server, "after-garbage").await;
}

// 1 MB of random bytes after a valid handshake: only well-formed answers, ending in a
// FATAL or EOF; another client works during and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_megabyte_of_random_bytes_after_handshake() {
    let server = TestServer::start().await;
    for seed in [2u64, 3, 4] {
        let garbage = XorShift::new(seed).bytes(1 << 20);
        let conn = server.raw().await;
        let bucket = format!("during-{seed}");
        let (responses, ()) = tokio::join!(
            blast(conn.stream, garbage),
            assert_serves_normally(&server, &bucket)
        );
        check_garbage_answers(&responses, true, &format!("seed {seed}"));
    }
    assert_serves_normally(&server, "after-garbage").await;
}

// 50 connections each send different garbage (before, after, or glued to a valid hello);
// then a normal client works and every garbage connection has been released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_garbage_connections_then_a_normal_client() {
    let server = TestServer::start().await;
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let mut rng = XorShift::new(100 + i);
            let len = 1 + rng.below(64 * 1024) as usize;
            let garbage = rng.bytes(len);
            let label = format!("connection {i}");
            match i % 3 {
                0 => {
                    let conn = RawConn::connect(addr).await;
                    let responses = blast(conn.stream, garbage).await;
                    check_garbage_answers(&responses, false, &label);
                }
                1 => {
                    let mut conn = RawConn::connect(addr).await;
                    conn.handshake().await;
                    let responses = blast(conn.stream, garbage).await;
                    check_garbage_answers(&responses, true, &label);
                }
                _ => {
                    let conn = RawConn::connect(addr).await;
                    let responses = blast(conn.stream, [v1_hello(), garbage].concat()).await;
                    let (hello, rest) = responses.split_first().expect("a hello answer");
                    assert_eq!((hello.status, hello.id), (Status::Ok, 0), "{label}");
                    assert_eq!(&hello.payload[..8], b"BUCKETLY", "{label}");
                    check_garbage_answers(rest, true, &label);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("garbage task");
    }
    assert_serves_normally(&server, "after-fifty").await;
    let client = server.client().await;
    await_connections(&client, 1).await;
    let info = client.info(None).await.expect("INFO");
    assert!(
        info["protocol_errors"].as_u64().unwrap_or(0) >= 17,
        "protocol errors not counted: {info}"
    );
}

// Random request bodies inside valid frames (biased toward real opcodes and plausible
// bucket and user names), on a connection logged in as admin: each gets exactly one
// non-FATAL answer, in order, with its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bodies_in_valid_frames_are_answered_one_by_one() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    let mut rng = XorShift::new(77);
    let mut bytes = Vec::new();
    let mut sent = Vec::new();
    // The opcodes of the v1 commands and their unknown neighbours.
    let near: Vec<u8> = (0x00..=0x0d)
        .chain(0x10..=0x18)
        .chain(0x20..=0x22)
        .collect();
    for i in 0..3000u32 {
        let op = match rng.below(4) {
            0 => rng.next_u64() as u8,
            _ => near[rng.below(near.len() as u64) as usize],
        };
        let id = i.wrapping_mul(0x9E37_79B1);
        let mut payload = Vec::new();
        if rng.below(2) == 0 {
            let name_len = rng.below(8) as usize;
            let name: Vec<u8> = (0..name_len).map(|_| b'a' + rng.below(26) as u8).collect();
            payload.extend(str16(&name));
        }
        let tail = rng.below(24) as usize;
        payload.extend(rng.bytes(tail));
        let b = body(op, id, &payload);
        bytes.extend(framed(&b));
        sent.push((op, id, payload));
    }
    let responses = pipeline(&mut conn, &bytes, sent.len()).await;
    for ((op, id, payload), r) in sent.iter().zip(&responses) {
        assert_eq!(r.id, *id, "answer out of order (opcode {op:#04x})");
        match r.failure().expect("well-formed") {
            None if *op == OP_PING => assert_eq!(&r.payload[..], &payload[..]),
            None => assert!(
                matches!(
                    *op,
                    OP_LIST | OP_INFO | OP_WHOAMI | OP_USER_LIST | OP_RELOAD
                ),
                "opcode {op:#04x} with random payload {payload:?} succeeded"
            ),
            Some((code, msg)) => {
                assert_eq!(r.status, Status::Error, "{msg}");
                // Logged in as admin: never AUTH_REQUIRED or PERMISSION_DENIED.
                let expected: &[u16] = match *op {
                    OP_CREATE..=OP_ALTER | OP_TAKE | OP_RELEASE | OP_SUBSCRIBE => &[
                        MALFORMED_REQUEST,
                        INVALID_ARGUMENT,
                        NO_SUCH_BUCKET,
                        NO_SUCH_HANDLER,
                    ],
                    OP_LOGIN => &[MALFORMED_REQUEST, LOGIN_FAILED, LOGIN_THROTTLED],
                    OP_WHOAMI | OP_USER_LIST | OP_RELOAD => &[MALFORMED_REQUEST],
                    OP_UNSUBSCRIBE => &[MALFORMED_REQUEST, INVALID_ARGUMENT],
                    OP_USER_ADD => &[MALFORMED_REQUEST, INVALID_ARGUMENT, USER_EXISTS],
                    OP_USER_DEL => &[MALFORMED_REQUEST, NO_SUCH_USER, LAST_ADMIN],
                    OP_USER_PASSWD | OP_USER_GRANT => {
                        &[MALFORMED_REQUEST, INVALID_ARGUMENT, NO_SUCH_USER]
                    }
                    OP_USER_REVOKE => &[
                        MALFORMED_REQUEST,
                        INVALID_ARGUMENT,
                        NO_SUCH_USER,
                        LAST_ADMIN,
                    ],
                    _ => &[UNKNOWN_COMMAND],
                };
                assert!(
                    expected.contains(&code),
                    "opcode {op:#04x} payload {payload:?}: {code} {msg}"
                );
            }
        }
    }
    assert_usable(&mut conn, 1).await;
}

// ---------------------------------------------------------------------------------------
// 4. Oversized frames.

// A length prefix of max_frame + 1 gets FATAL FRAME_TOO_LARGE after the 4 header bytes
// alone (no body sent), then EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_length_prefix_is_refused_from_the_header_alone() {
    let (server, _dir) = server_with(|c| c.max_frame = 1024).await;
    for len in [1025u32, u32::MAX] {
        let mut conn = server.raw().await;
        conn.write(&len.to_be_bytes()).await;
        let msg = expect_fatal_then_eof(&mut conn, FRAME_TOO_LARGE).await;
        assert!(
            msg.contains(&len.to_string()) && msg.contains("1024"),
            "{msg}"
        );
    }
    assert_serves_normally(&server, "after-oversize").await;
}

// A frame of exactly max_frame bytes is accepted (the boundary is inclusive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_of_exactly_max_frame_is_accepted() {
    let (server, _dir) = server_with(|c| c.max_frame = 1024).await;
    let mut conn = server.raw().await;
    let payload = vec![0xabu8; 1024 - 5];
    let b = ping(5, &payload);
    assert_eq!(b.len(), 1024);
    conn.write_frame(&b).await;
    assert_eq!(expect_ok(&mut conn, 5).await, payload);
    assert_usable(&mut conn, 6).await;
}

// Requests sent before an oversize frame on the same connection are answered first, in
// order (including a SEND that waits on its bucket), then the FATAL, then EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_an_oversize_frame_are_answered_first() {
    let (server, _dir) = server_with(|c| c.max_frame = 1024).await;
    let mut conn = server.raw().await;
    conn.write_frame(&create(1, "before", "counter", b"", b""))
        .await;
    expect_ok(&mut conn, 1).await;
    let mut bytes = Vec::new();
    bytes.extend(framed(&ping(2, b"two")));
    bytes.extend(framed(&send(3, "before", &[b"k", b"k", b"j"])));
    bytes.extend(framed(&send(4, "missing", &[b"k"])));
    bytes.extend(framed(&view(5, "before", Some(b"k"))));
    bytes.extend(1025u32.to_be_bytes());
    conn.write(&bytes).await;
    assert_eq!(expect_ok(&mut conn, 2).await, b"two");
    assert_eq!(send_counts(&expect_ok(&mut conn, 3).await), (3, 0));
    expect_error(&mut conn, 4, NO_SUCH_BUCKET).await;
    assert_eq!(parse_json(&expect_ok(&mut conn, 5).await), json!(2));
    expect_fatal_then_eof(&mut conn, FRAME_TOO_LARGE).await;
    let client = server.client().await;
    assert_eq!(
        client.view("before", None).await.expect("view"),
        json!({"k": 2, "j": 1})
    );
}

// Requests after the frame that caused a FATAL are never executed (PROTOCOL.md §5): not
// after a zero-length frame, not inside or after an oversize frame's body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_after_a_fatal_frame_are_never_executed() {
    let (server, _dir) = server_with(|c| c.max_frame = 1024).await;
    let client = server.client().await;
    client
        .create("seen", "counter", None)
        .await
        .expect("create");

    let mut conn = server.raw().await;
    let mut bytes = framed(&send(1, "seen", &[b"before"]));
    bytes.extend([0, 0, 0, 0]);
    bytes.extend(framed(&send(2, "seen", &[b"after"])));
    bytes.extend(framed(&create(3, "ghost", "counter", b"", b"")));
    conn.write(&bytes).await;
    assert_eq!(send_counts(&expect_ok(&mut conn, 1).await), (1, 0));
    expect_fatal_then_eof(&mut conn, PROTOCOL_ERROR).await;

    let mut conn = server.raw().await;
    let inner = [
        framed(&send(5, "seen", &[b"smuggled"])),
        framed(&create(6, "ghost", "counter", b"", b"")),
    ]
    .concat();
    let mut bytes = framed(&send(4, "seen", &[b"before"]));
    bytes.extend(1025u32.to_be_bytes());
    bytes.extend(inner.iter().copied().cycle().take(1025));
    bytes.extend(framed(&send(7, "seen", &[b"after"])));
    conn.write(&bytes).await;
    assert_eq!(send_counts(&expect_ok(&mut conn, 4).await), (1, 0));
    expect_fatal_then_eof(&mut conn, FRAME_TOO_LARGE).await;

    assert_eq!(
        client.view("seen", None).await.expect("view"),
        json!({"before": 2})
    );
    assert_eq!(
        client.list().await.expect("list"),
        json!([{"name": "seen", "handler": "counter"}])
    );
}

// Requests glued to a refused hello never run (PROTOCOL.md §4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_glued_to_a_refused_hello_never_run() {
    let server = TestServer::start().await;
    for (bad_hello, code) in [
        (hello(b"BUCKETLY", 2, 0, &[]), UNSUPPORTED_VERSION),
        (hello(b"BUCKETLX", 1, 0, &[]), BAD_HANDSHAKE),
    ] {
        let mut conn = RawConn::connect(server.addr).await;
        let bytes = [bad_hello, framed(&create(1, "ghost", "counter", b"", b""))].concat();
        conn.write(&bytes).await;
        expect_fatal_then_eof(&mut conn, code).await;
    }
    let client = server.client().await;
    assert_eq!(client.list().await.expect("list"), json!([]));
}

// INFO `requests` counts request frames, malformed and unknown ones included, but not
// hellos; `protocol_errors` counts each connection closed by a protocol FATAL
// (102, 103, 100, 101) and not ERROR answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_counts_requests_and_protocol_errors() {
    let server = TestServer::start().await;
    let mut probe = server.raw().await;
    probe.write_frame(&info(1, None)).await;
    let before = parse_json(&expect_ok(&mut probe, 1).await);
    assert_eq!(before["protocol_errors"], json!(0), "{before}");

    // Two request frames and an INFO on one connection; elsewhere a handshake (not a
    // request), then a LOGIN and a PING (two requests).
    let mut other = server.raw().await;
    probe.write_frame(&body(0x33, 2, b"")).await;
    expect_error(&mut probe, 2, UNKNOWN_COMMAND).await;
    probe.write_frame(&body(OP_LIST, 3, b"junk")).await;
    expect_error(&mut probe, 3, MALFORMED_REQUEST).await;
    assert_usable(&mut other, 4).await;
    probe.write_frame(&info(5, None)).await;
    let after = parse_json(&expect_ok(&mut probe, 5).await);
    let requests = |v: &Value| v["requests"].as_u64().expect("requests");
    assert_eq!(
        requests(&after) - requests(&before),
        5,
        "{before} -> {after}"
    );
    assert_eq!(after["protocol_errors"], json!(0), "{after}");

    let violations: Vec<(bool, Vec<u8>, u16)> = vec![
        (false, b"GET / HTTP/1.1\r\n\r\n".to_vec(), BAD_HANDSHAKE),
        (false, hello(b"BUCKETLY", 9, 0, &[]), UNSUPPORTED_VERSION),
        (true, vec![0, 0, 0, 0], PROTOCOL_ERROR),
        (true, framed(&[OP_PING, 0]), PROTOCOL_ERROR),
        (true, u32::MAX.to_be_bytes().to_vec(), FRAME_TOO_LARGE),
    ];
    for (handshaken, bytes, code) in &violations {
        let mut conn = if *handshaken {
            server.raw().await
        } else {
            RawConn::connect(server.addr).await
        };
        conn.write(bytes).await;
        expect_fatal_then_eof(&mut conn, *code).await;
    }
    // The counter is bumped as each connection ends, which may follow its FATAL.
    let mut last = Value::Null;
    for id in 100..600u32 {
        probe.write_frame(&info(id, None)).await;
        last = parse_json(&expect_ok(&mut probe, id).await)["protocol_errors"].clone();
        if last == json!(violations.len()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "protocol_errors stayed {last}, expected {}",
        violations.len()
    );
}

// ---------------------------------------------------------------------------------------
// 5. Framing errors.

// A zero-length frame after the handshake gets FATAL PROTOCOL_ERROR, after the answers
// to the requests before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_length_frame_is_a_protocol_error() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    let mut bytes = framed(&ping(1, b"before"));
    bytes.extend([0, 0, 0, 0]);
    conn.write(&bytes).await;
    assert_eq!(expect_ok(&mut conn, 1).await, b"before");
    expect_fatal_then_eof(&mut conn, PROTOCOL_ERROR).await;
}

// A body of 1 to 4 bytes (shorter than opcode + request id) gets FATAL PROTOCOL_ERROR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_shorter_than_the_request_header_is_a_protocol_error() {
    let server = TestServer::start().await;
    for n in 1..=4usize {
        let mut conn = server.raw().await;
        conn.write_frame(&ping(9, b"")[..n]).await;
        let msg = expect_fatal_then_eof(&mut conn, PROTOCOL_ERROR).await;
        assert!(msg.contains(&n.to_string()), "{msg}");
    }
}

// ---------------------------------------------------------------------------------------
// 6. Request errors keep the connection.

// Unknown opcodes get ERROR UNKNOWN_COMMAND with the request's id and the connection
// stays usable; a second hello after the handshake is just an unknown opcode ('B').
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_opcodes_are_request_errors() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    let cases = [
        (0x00u8, 1u32, &b"whatever"[..]),
        (0x0d, 0, b"x"),
        (0x18, 3, b""),
        (0x22, 5, b"\x00\x06clicks"),
        (0x42, 7, b""),
        (0x7f, 0xDEAD_BEEF, b"\x00\x01"),
        (0xff, u32::MAX, b"whatever"),
    ];
    for (op, id, payload) in cases {
        conn.write_frame(&body(op, id, payload)).await;
        let msg = expect_error(&mut conn, id, UNKNOWN_COMMAND).await;
        assert!(msg.contains(&format!("{op:02x}")), "{msg}");
        assert_usable(&mut conn, id.wrapping_add(1)).await;
    }
    conn.write(&v1_hello()).await;
    expect_error(&mut conn, u32::from_be_bytes(*b"UCKE"), UNKNOWN_COMMAND).await;
    assert_usable(&mut conn, 99).await;
}

// Malformed payloads (truncated fields, lying SEND counts, trailing bytes, bad opt
// markers, invalid UTF-8) get ERROR MALFORMED_REQUEST with their id, pipelined in one
// write, and the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_request_errors() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    conn.write_frame(&create(1, "real", "counter", b"", b""))
        .await;
    expect_ok(&mut conn, 1).await;
    let real = str16(b"real");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("DROP with empty payload", body(OP_DROP, 0, &[])),
        (
            "DROP str16 says 10, has 3",
            body(OP_DROP, 0, &[0, 10, b'a', b'b', b'c']),
        ),
        ("DROP str16 length cut in half", body(OP_DROP, 0, &[0])),
        (
            "DUMP str16 says 65535",
            body(OP_DUMP, 0, &[0xff, 0xff, b'r']),
        ),
        (
            "SEND count 2, one event",
            body(
                OP_SEND,
                0,
                &[real.clone(), vec![0, 0, 0, 2], blob32(b"a")].concat(),
            ),
        ),
        (
            "SEND count 1, two events",
            body(
                OP_SEND,
                0,
                &[real.clone(), vec![0, 0, 0, 1], blob32(b"a"), blob32(b"b")].concat(),
            ),
        ),
        (
            "SEND count u32::MAX, one event",
            body(
                OP_SEND,
                0,
                &[real.clone(), vec![0xff; 4], blob32(b"a")].concat(),
            ),
        ),
        (
            "SEND event length u32::MAX",
            body(
                OP_SEND,
                0,
                &[real.clone(), vec![0, 0, 0, 1], vec![0xff; 4], b"a".to_vec()].concat(),
            ),
        ),
        ("SEND without count", body(OP_SEND, 0, &real)),
        (
            "SEND count cut short",
            body(OP_SEND, 0, &[real.clone(), vec![0, 0]].concat()),
        ),
        ("LIST with a trailing byte", body(OP_LIST, 0, &[0])),
        (
            "DROP with trailing bytes",
            body(OP_DROP, 0, &[real.clone(), b"xx".to_vec()].concat()),
        ),
        ("VIEW without arg marker", body(OP_VIEW, 0, &real)),
        (
            "VIEW arg marker 2",
            body(OP_VIEW, 0, &[real.clone(), vec![2]].concat()),
        ),
        (
            "VIEW arg marker 1, blob missing",
            body(OP_VIEW, 0, &[real.clone(), vec![1]].concat()),
        ),
        (
            "VIEW trailing after absent arg",
            body(OP_VIEW, 0, &[real.clone(), vec![0, 0]].concat()),
        ),
        ("INFO marker 7", body(OP_INFO, 0, &[7])),
        ("INFO without marker", body(OP_INFO, 0, &[])),
        ("INFO marker 1, no name", body(OP_INFO, 0, &[1])),
        (
            "SEND bucket not UTF-8",
            body(
                OP_SEND,
                0,
                &[vec![0, 2, 0xff, 0xfe], vec![0, 0, 0, 1], blob32(b"a")].concat(),
            ),
        ),
        (
            "VIEW bucket not UTF-8",
            body(
                OP_VIEW,
                0,
                &[vec![0, 3, b'a', 0xc3, 0x28], vec![0]].concat(),
            ),
        ),
        (
            "CREATE handler not UTF-8",
            body(
                OP_CREATE,
                0,
                &[str16(b"x"), vec![0, 1, 0x80], blob32(b""), blob32(b"")].concat(),
            ),
        ),
        (
            "CREATE without options",
            body(
                OP_CREATE,
                0,
                &[str16(b"x"), str16(b"counter"), blob32(b"")].concat(),
            ),
        ),
        (
            "CREATE config blob32 says 100",
            body(
                OP_CREATE,
                0,
                &[
                    str16(b"x"),
                    str16(b"counter"),
                    vec![0, 0, 0, 100],
                    b"{}".to_vec(),
                ]
                .concat(),
            ),
        ),
    ];
    let mut bytes = Vec::new();
    for (i, (_, b)) in cases.iter().enumerate() {
        let mut b = b.clone();
        b[1..5].copy_from_slice(&(1000 + i as u32).to_be_bytes());
        bytes.extend(framed(&b));
    }
    bytes.extend(framed(&ping(5000, b"end")));
    conn.write(&bytes).await;
    for (i, (what, _)) in cases.iter().enumerate() {
        let id = 1000 + i as u32;
        let r = next(&mut conn, what).await;
        let (code, msg) = r
            .failure()
            .expect("well-formed")
            .unwrap_or_else(|| panic!("{what}: accepted: {r:?}"));
        assert_eq!(
            (r.status, r.id, code),
            (Status::Error, id, MALFORMED_REQUEST),
            "{what}: {msg}"
        );
    }
    assert_eq!(expect_ok(&mut conn, 5000).await, b"end");
    // Nothing malformed reached the bucket.
    conn.write_frame(&view(5001, "real", None)).await;
    assert_eq!(parse_json(&expect_ok(&mut conn, 5001).await), json!({}));
    // The well-formed neighbours of those layouts decode as documented: a present but
    // empty VIEW argument is "" (counter answers 0), not absent (counter answers {}).
    conn.write_frame(&send(5002, "real", &[b"", b"k"])).await;
    assert_eq!(send_counts(&expect_ok(&mut conn, 5002).await), (1, 1));
    conn.write_frame(&view(5003, "real", Some(b""))).await;
    assert_eq!(parse_json(&expect_ok(&mut conn, 5003).await), json!(0));
    conn.write_frame(&view(5004, "real", Some(b" k "))).await;
    assert_eq!(parse_json(&expect_ok(&mut conn, 5004).await), json!(1));
    conn.write_frame(&info(5005, Some("real"))).await;
    let bucket_info = parse_json(&expect_ok(&mut conn, 5005).await);
    assert_eq!(
        (
            &bucket_info["name"],
            &bucket_info["handler"],
            &bucket_info["events"]
        ),
        (&json!("real"), &json!("counter"), &json!(1)),
        "{bucket_info}"
    );
    assert_usable(&mut conn, 5006).await;
}

// ---------------------------------------------------------------------------------------
// 7. Abrupt disconnects.

// Peers that vanish mid-frame, mid-handshake, before any byte, or with a reset do not
// disturb others, and connections.current returns to the number of live connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_disconnect_mid_frame_or_mid_handshake_are_released() {
    let server = TestServer::start().await;
    let client = server.client().await;
    await_connections(&client, 1).await;

    let mut mid_frame = server.raw().await;
    mid_frame
        .write(
            &[
                &100u32.to_be_bytes()[..],
                &[OP_PING, 0, 0, 0, 1, 1, 2, 3, 4, 5],
            ]
            .concat(),
        )
        .await;
    let mut mid_hello = RawConn::connect(server.addr).await;
    mid_hello.write(&v1_hello()[..6]).await;
    let mut reset = server.raw().await;
    reset.write(&[0, 0, 0, 50, OP_SEND]).await;
    let silent = RawConn::connect(server.addr).await;
    await_connections(&client, 5).await;

    // While they hang half-way, others are served.
    assert_serves_normally(&server, "meanwhile").await;

    drop(mid_frame);
    drop(mid_hello);
    #[allow(deprecated)]
    reset
        .stream
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
    drop(reset);
    drop(silent);
    await_connections(&client, 1).await;
    assert_serves_normally(&server, "afterwards").await;
}

// A peer that pipelines requests and half-closes its side still gets every answer, in
// order, then EOF; a partial frame left at EOF is dropped silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_after_pipelined_requests_gets_every_answer() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    let mut bytes = Vec::new();
    bytes.extend(framed(&create(1, "hc", "counter", b"", b"")));
    for i in 0..100u32 {
        bytes.extend(framed(&send(10 + i, "hc", &[b"e"])));
    }
    bytes.extend(framed(&view(500, "hc", None)));
    bytes.extend([0, 0, 0, 9, OP_PING]);
    conn.write(&bytes).await;
    conn.stream.shutdown().await.expect("half-close");
    expect_ok(&mut conn, 1).await;
    for i in 0..100u32 {
        assert_eq!(send_counts(&expect_ok(&mut conn, 10 + i).await), (1, 0));
    }
    assert_eq!(
        parse_json(&expect_ok(&mut conn, 500).await),
        json!({"e": 100})
    );
    assert!(
        within("EOF", conn.closed()).await,
        "not closed after half-close"
    );
}

// ---------------------------------------------------------------------------------------
// 8. Pipelining.

#[derive(Debug)]
enum Expect {
    Empty,
    Echo(Vec<u8>),
    Sent(u32),
}

/// CREATE, then `n` PINGs (distinct payloads) and SENDs to a counter bucket, then VIEW,
/// all in one write; checks every answer's id, order and content and the final counts.
async fn pipeline_mixed(conn: &mut RawConn, bucket: &str, n: u32) {
    let mut bytes = framed(&create(0x0102_0304, bucket, "counter", b"null", b"{}"));
    let mut expected = vec![(0x0102_0304u32, Expect::Empty)];
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..n {
        // Odd multiplier: distinct ids, in no particular numeric order.
        let id = i.wrapping_mul(2_654_435_761) ^ 0x5bd1_e995;
        if i % 3 == 0 {
            let keys: Vec<String> = (0..1 + i % 4)
                .map(|j| format!("k{}", (i + j) % 7))
                .collect();
            for k in &keys {
                *counts.entry(k.clone()).or_default() += 1;
            }
            let events: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
            bytes.extend(framed(&send(id, bucket, &events)));
            expected.push((id, Expect::Sent(keys.len() as u32)));
        } else {
            let mut payload = format!("ping-{i}-").into_bytes();
            payload.extend(i.to_be_bytes());
            payload.extend(std::iter::repeat_n(b'.', (i % 13) as usize));
            bytes.extend(framed(&ping(id, &payload)));
            expected.push((id, Expect::Echo(payload)));
        }
    }
    bytes.extend(framed(&view(0xFFFF_FFFF, bucket, None)));
    let responses = pipeline(conn, &bytes, expected.len() + 1).await;
    for (k, ((id, want), r)) in expected.iter().zip(&responses).enumerate() {
        assert_eq!(
            (r.status, r.id),
            (Status::Ok, *id),
            "answer #{k} ({want:?}): {:?}",
            r.failure()
        );
        match want {
            Expect::Empty => assert!(r.payload.is_empty()),
            Expect::Echo(p) => assert_eq!(&r.payload[..], &p[..], "answer #{k}"),
            Expect::Sent(m) => assert_eq!(send_counts(&r.payload), (*m, 0), "answer #{k}"),
        }
    }
    let last = responses.last().expect("view answer");
    assert_eq!((last.status, last.id), (Status::Ok, 0xFFFF_FFFF));
    let want: serde_json::Map<String, Value> =
        counts.into_iter().map(|(k, v)| (k, json!(v))).collect();
    assert_eq!(parse_json(&last.payload), Value::Object(want));
}

// 5,000 PINGs and SENDs in one write are answered in exactly request order with the
// right payloads, and the VIEW after them shows every event counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_pipelined_requests_in_one_write() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    pipeline_mixed(&mut conn, "piped", 5000).await;
    assert_usable(&mut conn, 1).await;
}

// SENDs to one bucket that arrive together are gathered into one run, but each frame is
// still read on its own: a malformed one in the run is answered MALFORMED_REQUEST with
// its id, one to another bucket gets that bucket's answer, the rest are counted, and
// every frame counts as a request in INFO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_frame_of_a_gathered_run_of_sends_is_answered_on_its_own() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    conn.write_frame(&create(1, "run", "counter", b"", b""))
        .await;
    expect_ok(&mut conn, 1).await;
    conn.write_frame(&info(2, None)).await;
    let before = parse_json(&expect_ok(&mut conn, 2).await)["requests"].clone();
    let truncated = body(
        OP_SEND,
        12,
        &[str16(b"run"), vec![0, 0, 0, 2], blob32(b"a")].concat(),
    );
    let mut bytes = Vec::new();
    bytes.extend(framed(&send(10, "run", &[b"a"])));
    bytes.extend(framed(&send(11, "run", &[b"a", b"b"])));
    bytes.extend(framed(&truncated));
    bytes.extend(framed(&send(13, "run", &[b"b"])));
    bytes.extend(framed(&send(14, "no-such", &[b"a"])));
    bytes.extend(framed(&send(15, "run", &[b"c"])));
    bytes.extend(framed(&send(16, "run", &[])));
    bytes.extend(framed(&view(17, "run", None)));
    bytes.extend(framed(&info(18, None)));
    let responses = pipeline(&mut conn, &bytes, 9).await;
    let got: Vec<(u32, Status)> = responses.iter().map(|r| (r.id, r.status)).collect();
    let want: Vec<(u32, Status)> = (10..19)
        .map(|id| match id {
            12 | 14 => (id, Status::Error),
            _ => (id, Status::Ok),
        })
        .collect();
    assert_eq!(got, want);
    let code = |r: &Response| r.failure().ok().flatten().map(|(c, _)| c);
    assert_eq!(code(&responses[2]), Some(MALFORMED_REQUEST));
    assert_eq!(code(&responses[4]), Some(NO_SUCH_BUCKET));
    let accepted: Vec<u32> = [0, 1, 3, 5, 6]
        .iter()
        .map(|&k| send_counts(&responses[k].payload).0)
        .collect();
    assert_eq!(accepted, [1, 2, 1, 1, 0]);
    assert_eq!(
        parse_json(&responses[7].payload),
        json!({"a": 2, "b": 2, "c": 1})
    );
    let after = &parse_json(&responses[8].payload)["requests"];
    let counted = after.as_u64().zip(before.as_u64()).map(|(a, b)| a - b);
    // Each INFO counts itself: the nine frames after the first INFO.
    assert_eq!(counted, Some(9), "{before} -> {after}");
}

// With in-flight limits of one request and a few bytes, deep pipelining still completes
// in order (back-pressure, not deadlock or loss).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_under_tight_in_flight_limits() {
    let (server, _dir) = server_with(|c| {
        c.max_in_flight = 1;
        c.max_in_flight_bytes = 16;
        c.mailbox = 1;
    })
    .await;
    let mut conn = server.raw().await;
    pipeline_mixed(&mut conn, "tight", 2000).await;
    assert_usable(&mut conn, 1).await;
}

// Pipelined CREATE and DROP complete before the next request is read (PROTOCOL.md §8):
// SENDs right after CREATE find the bucket, one right after DROP gets NO_SUCH_BUCKET, and
// the name can be created again at once, empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_create_and_drop_take_effect_in_request_order() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    let mut bytes = Vec::new();
    bytes.extend(framed(&create(1, "cd", "counter", b"", b"")));
    for i in 0..50u32 {
        bytes.extend(framed(&send(10 + i, "cd", &[b"old"])));
    }
    bytes.extend(framed(&view(100, "cd", None)));
    bytes.extend(framed(&drop_bucket(101, "cd")));
    bytes.extend(framed(&send(102, "cd", &[b"lost"])));
    bytes.extend(framed(&view(103, "cd", None)));
    bytes.extend(framed(&create(104, "cd", "unique", b"", b"")));
    bytes.extend(framed(&send(105, "cd", &[b"new a", b"new a"])));
    bytes.extend(framed(&view(106, "cd", None)));
    bytes.extend(framed(&list(107)));
    let responses = pipeline(&mut conn, &bytes, 59).await;
    let mut it = responses.iter();
    let mut ok = |id: u32| {
        let r = it.next().expect("answer");
        assert_eq!((r.status, r.id), (Status::Ok, id), "{:?}", r.failure());
        r.payload.to_vec()
    };
    ok(1);
    for i in 0..50u32 {
        assert_eq!(send_counts(&ok(10 + i)), (1, 0));
    }
    assert_eq!(parse_json(&ok(100)), json!({"old": 50}));
    ok(101);
    for id in [102u32, 103] {
        let r = &responses[53 + (id - 102) as usize];
        let (code, msg) = r.failure().expect("ok").expect("an error");
        assert_eq!(
            (r.status, r.id, code),
            (Status::Error, id, NO_SUCH_BUCKET),
            "{msg}"
        );
    }
    let r = &responses[55..];
    assert_eq!((r[0].status, r[0].id), (Status::Ok, 104));
    assert_eq!((r[1].status, r[1].id), (Status::Ok, 105));
    assert_eq!(send_counts(&r[1].payload), (2, 0));
    assert_eq!((r[2].status, r[2].id), (Status::Ok, 106));
    assert_eq!((r[3].status, r[3].id), (Status::Ok, 107));
    assert_eq!(
        parse_json(&r[3].payload),
        json!([{"name": "cd", "handler": "unique"}])
    );
    // `unique` counts distinct members per key: the old bucket's state is gone.
    assert_eq!(parse_json(&r[2].payload), json!({"new": 1}));
}

// Consecutive SENDs read together are applied and answered as a group (the server posts
// them to the bucket as one message): runs longer than a group (64 frames), events the
// handler rejects, a SEND the user may not make, one to a bucket that does not exist and
// a PING inside the runs are each answered in exactly request order with their own
// outcome, and the bucket counts exactly the accepted events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_sends_keep_per_frame_answers_and_order() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    admin.create("g", "counter", None).await.expect("create g");
    admin
        .create("other", "counter", None)
        .await
        .expect("create other");
    admin.user_add("sender", "pw").await.expect("user");
    admin
        .user_grant("sender", "send", "g")
        .await
        .expect("grant send");
    admin
        .user_grant("sender", "view", "g")
        .await
        .expect("grant view");
    let mut conn = RawConn::connect(server.addr).await;
    conn.handshake().await;
    conn.login("sender", "pw").await;

    // What each answer must be: OK with (accepted, rejected), or an error code.
    type Outcome = Result<(u32, u32), u16>;
    let mut want: Vec<(u32, Outcome)> = Vec::new();
    let mut bytes = Vec::new();
    let mut accepted = 0u64;
    for i in 0..300u32 {
        let id = 10_000 + i;
        match i {
            70 => {
                bytes.extend(framed(&send(id, "other", &[b"x"])));
                want.push((id, Err(PERMISSION_DENIED)));
            }
            140 => {
                bytes.extend(framed(&send(id, "nope", &[b"x"])));
                // Permission is checked first: "sender" may not send to "nope" either.
                want.push((id, Err(PERMISSION_DENIED)));
            }
            200 => {
                bytes.extend(framed(&ping(id, b"mid")));
                want.push((id, Ok((0, 0))));
            }
            _ => {
                // Every 7th frame carries an empty event, which `counter` rejects.
                let events: Vec<&[u8]> = if i % 7 == 0 {
                    vec![b"k", b"  ", b"k"]
                } else {
                    vec![b"k"]
                };
                let rejected = u32::from(i % 7 == 0);
                let ok = events.len() as u32 - rejected;
                accepted += u64::from(ok);
                bytes.extend(framed(&send(id, "g", &events)));
                want.push((id, Ok((ok, rejected))));
            }
        }
    }
    bytes.extend(framed(&view(99, "g", Some(b"k"))));
    let responses = pipeline(&mut conn, &bytes, want.len() + 1).await;
    for (k, ((id, expect), r)) in want.iter().zip(&responses).enumerate() {
        assert_eq!(r.id, *id, "answer #{k} out of order");
        match expect {
            Ok(counts) => {
                assert_eq!(r.status, Status::Ok, "answer #{k}: {:?}", r.failure());
                if *id != 10_200 {
                    assert_eq!(send_counts(&r.payload), *counts, "answer #{k}");
                }
            }
            Err(code) => {
                let (got, msg) = r.failure().expect("decodes").expect("an error");
                assert_eq!(
                    (r.status, got),
                    (Status::Error, *code),
                    "answer #{k}: {msg}"
                );
            }
        }
    }
    let last = responses.last().expect("view answer");
    assert_eq!((last.status, last.id), (Status::Ok, 99));
    assert_eq!(parse_json(&last.payload), json!(accepted));
    assert_usable(&mut conn, 1).await;
}

// Requests spread over several buckets (which run on different handler threads and finish
// in any order) are still answered in exactly request order, with the right counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_across_buckets_come_back_in_request_order() {
    let (server, _dir) = server_with(|c| c.workers = 4).await;
    let mut conn = server.raw().await;
    let buckets = ["b0", "b1", "b2", "b3"];
    let mut bytes = Vec::new();
    let mut want: Vec<(u32, Option<u32>)> = Vec::new();
    let mut counts = [0u64; 4];
    for (i, b) in buckets.iter().enumerate() {
        bytes.extend(framed(&create(i as u32, b, "counter", b"", b"")));
        want.push((i as u32, None));
    }
    let mut rng = XorShift::new(9);
    let event = [b'e'];
    for i in 0..2000u32 {
        let id = 1_000_000 - i;
        let b = rng.below(4) as usize;
        // Bucket 0 gets heavy batches, the others light ones, so later answers are often
        // ready before earlier ones.
        let n = if b == 0 {
            200
        } else {
            1 + rng.below(3) as usize
        };
        let events: Vec<&[u8]> = vec![&event[..]; n];
        bytes.extend(framed(&send(id, buckets[b], &events)));
        counts[b] += n as u64;
        want.push((id, Some(n as u32)));
    }
    for (i, b) in buckets.iter().enumerate() {
        bytes.extend(framed(&view(7_000_000 + i as u32, b, Some(b"e"))));
    }
    let responses = pipeline(&mut conn, &bytes, want.len() + buckets.len()).await;
    for (k, ((id, n), r)) in want.iter().zip(&responses).enumerate() {
        assert_eq!(
            (r.status, r.id),
            (Status::Ok, *id),
            "answer #{k}: {:?}",
            r.failure()
        );
        if let Some(n) = n {
            assert_eq!(send_counts(&r.payload), (*n, 0), "answer #{k}");
        }
    }
    for (i, r) in responses[want.len()..].iter().enumerate() {
        assert_eq!((r.status, r.id), (Status::Ok, 7_000_000 + i as u32));
        assert_eq!(parse_json(&r.payload), json!(counts[i]), "bucket {i}");
    }
}

// ---------------------------------------------------------------------------------------
// 9. Connection limit.

// At max_connections = 2 a third connection gets FATAL TOO_MANY_CONNECTIONS and EOF (and
// the real client reports the code); once one closes, a new connection is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_refuses_then_frees_a_slot() {
    let (server, _dir) = server_with(|c| c.max_connections = 2).await;
    let mut first = server.raw().await;
    let mut second = server.raw().await;

    let mut third = RawConn::connect(server.addr).await;
    let msg = expect_fatal_then_eof(&mut third, TOO_MANY_CONNECTIONS).await;
    assert!(msg.contains('2'), "{msg}");

    // The real client sends its hello at once; the refusal does not read it, so per
    // PROTOCOL.md §5 the client may see a reset instead of the FATAL.
    let err = match bucketly::Client::connect(server.addr).await {
        Ok(_) => panic!("a third client was accepted at max_connections = 2"),
        Err(e) => e,
    };
    if let Some(code) = err.code() {
        assert_eq!(code, ErrorCode::TooManyConnections, "{err}");
    }

    // The held connections were not disturbed.
    assert_usable(&mut first, 1).await;
    assert_usable(&mut second, 2).await;
    first.write_frame(&info(3, None)).await;
    let info = parse_json(&expect_ok(&mut first, 3).await);
    assert_eq!(info["connections"]["max"], json!(2), "{info}");
    assert_eq!(info["connections"]["current"], json!(2), "{info}");
    assert!(info["connections"]["refused"].as_u64() >= Some(2), "{info}");

    drop(first);
    let mut accepted = None;
    for _ in 0..500 {
        let mut conn = RawConn::connect(server.addr).await;
        conn.write(&v1_hello()).await;
        match within("hello answer", conn.read()).await {
            Some(r) if r.status == Status::Ok => {
                accepted = Some(conn);
                break;
            }
            Some(r) => {
                let (code, msg) = r.failure().expect("ok").expect("error");
                assert_eq!(code, TOO_MANY_CONNECTIONS, "{msg}");
            }
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut conn = accepted.expect("no connection accepted after a slot was freed");
    assert_usable(&mut conn, 4).await;
    assert_usable(&mut second, 5).await;
}

// ---------------------------------------------------------------------------------------
// 10. Request-level errors.

// Missing buckets, unknown handlers, invalid names, duplicates, bad options and bad config
// get their ERROR codes with the request's id; the connection stays usable throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_carry_their_codes_and_keep_the_connection() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("SEND to missing", send(0, "nope", &[b"a"]), NO_SUCH_BUCKET),
        ("VIEW missing", view(0, "nope", None), NO_SUCH_BUCKET),
        (
            "VIEW missing with arg",
            view(0, "nope", Some(b"k")),
            NO_SUCH_BUCKET,
        ),
        ("DUMP missing", dump(0, "nope"), NO_SUCH_BUCKET),
        ("DROP missing", drop_bucket(0, "nope"), NO_SUCH_BUCKET),
        ("INFO missing", info(0, Some("nope")), NO_SUCH_BUCKET),
        (
            "unknown handler",
            create(0, "b1", "no-such-handler", b"", b""),
            NO_SUCH_HANDLER,
        ),
        (
            "name with a space",
            create(0, "a b", "counter", b"", b""),
            INVALID_ARGUMENT,
        ),
        (
            "empty name",
            create(0, "", "counter", b"", b""),
            INVALID_ARGUMENT,
        ),
        (
            "non-ASCII name",
            create(0, "é", "counter", b"", b""),
            INVALID_ARGUMENT,
        ),
        (
            "256-char name",
            create(0, &"x".repeat(256), "counter", b"", b""),
            INVALID_ARGUMENT,
        ),
        (
            "unknown option",
            create(0, "b2", "counter", b"", br#"{"nope":1}"#),
            INVALID_ARGUMENT,
        ),
        (
            "options not an object",
            create(0, "b3", "counter", b"", b"[1]"),
            INVALID_ARGUMENT,
        ),
        (
            "options not JSON",
            create(0, "b4", "counter", b"", b"{"),
            INVALID_ARGUMENT,
        ),
        (
            "config not JSON",
            create(0, "b5", "counter", b"not json", b""),
            INVALID_ARGUMENT,
        ),
        (
            "config rejected by init",
            create(0, "b6", "counter", br#"{"x":1}"#, b""),
            HANDLER_ERROR,
        ),
    ];
    for (i, (what, mut b, code)) in cases.into_iter().enumerate() {
        let id = 100 + i as u32;
        b[1..5].copy_from_slice(&id.to_be_bytes());
        conn.write_frame(&b).await;
        let r = next(&mut conn, what).await;
        let (got, msg) = r
            .failure()
            .expect("well-formed")
            .unwrap_or_else(|| panic!("{what}: OK"));
        assert_eq!(
            (r.status, r.id, got),
            (Status::Error, id, code),
            "{what}: {msg}"
        );
        assert_usable(&mut conn, 1000 + i as u32).await;
    }
    // None of the failed CREATEs left a bucket behind.
    conn.write_frame(&list(2000)).await;
    assert_eq!(parse_json(&expect_ok(&mut conn, 2000).await), json!([]));
    // A 255-char name is fine; creating it twice is BUCKET_EXISTS.
    let long = "y".repeat(255);
    conn.write_frame(&create(2001, &long, "counter", b"", b""))
        .await;
    expect_ok(&mut conn, 2001).await;
    conn.write_frame(&create(2002, &long, "unique", b"", b""))
        .await;
    expect_error(&mut conn, 2002, BUCKET_EXISTS).await;
    conn.write_frame(&create(2003, "dup", "counter", b"{}", b"{}"))
        .await;
    expect_ok(&mut conn, 2003).await;
    conn.write_frame(&create(2004, "dup", "counter", b"{}", b"{}"))
        .await;
    expect_error(&mut conn, 2004, BUCKET_EXISTS).await;
    // After DROP the bucket is gone for every command.
    conn.write_frame(&drop_bucket(2005, "dup")).await;
    expect_ok(&mut conn, 2005).await;
    conn.write_frame(&send(2006, "dup", &[b"a"])).await;
    expect_error(&mut conn, 2006, NO_SUCH_BUCKET).await;
    assert_usable(&mut conn, 2007).await;
}

// Error messages quoting a huge client-supplied name are cut to at most 4096 bytes on a
// character boundary (the str16 stays valid UTF-8); the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_messages_quoting_huge_names_stay_bounded_and_utf8() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    // 'é' is two bytes: an odd cut point would split one.
    let name = format!("x{}", "é".repeat(30_000));
    conn.write_frame(&send(1, &name, &[b"a"])).await;
    let msg = expect_error(&mut conn, 1, NO_SUCH_BUCKET).await;
    assert!(msg.len() <= 4096 && msg.len() > 4000, "{} bytes", msg.len());
    conn.write_frame(&create(2, &name, "counter", b"", b""))
        .await;
    let msg = expect_error(&mut conn, 2, INVALID_ARGUMENT).await;
    assert!(msg.len() <= 4096, "{} bytes", msg.len());
    assert_usable(&mut conn, 3).await;
}

// The SEND outcome layout: exact counts, and the first 16 rejections as
// (index, reason) pairs in batch order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_outcome_lists_rejections_by_index() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    conn.write_frame(&create(1, "rej", "counter", b"", b""))
        .await;
    expect_ok(&mut conn, 1).await;
    // 40 events: every even one is blank (rejected by counter), the odd ones count.
    let events: Vec<&[u8]> = (0..40)
        .map(|i| if i % 2 == 0 { &b" "[..] } else { b"k" })
        .collect();
    conn.write_frame(&send(2, "rej", &events)).await;
    let p = expect_ok(&mut conn, 2).await;
    assert_eq!(send_counts(&p), (20, 20));
    let n = u16::from_be_bytes([p[8], p[9]]) as usize;
    assert_eq!(n, 16, "reasons carried");
    let mut at = 10;
    for k in 0..n {
        let index = u32::from_be_bytes(p[at..at + 4].try_into().expect("4"));
        let len = u16::from_be_bytes([p[at + 4], p[at + 5]]) as usize;
        let reason = std::str::from_utf8(&p[at + 6..at + 6 + len]).expect("utf-8");
        assert_eq!(index, 2 * k as u32, "reason #{k}");
        assert!(reason.contains("empty"), "{reason}");
        at += 6 + len;
    }
    assert_eq!(at, p.len(), "trailing bytes in the SEND outcome");
    // An empty batch is valid and changes nothing.
    conn.write_frame(&send(3, "rej", &[])).await;
    assert_eq!(expect_ok(&mut conn, 3).await, [0u8; 10]);
    conn.write_frame(&view(4, "rej", None)).await;
    assert_eq!(parse_json(&expect_ok(&mut conn, 4).await), json!({"k": 20}));
}

// CREATE beyond max_buckets gets ERROR LIMIT_EXCEEDED; the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_beyond_max_buckets_is_limit_exceeded() {
    let (server, _dir) = server_with(|c| c.max_buckets = 1).await;
    let mut conn = server.raw().await;
    conn.write_frame(&create(1, "one", "counter", b"", b""))
        .await;
    expect_ok(&mut conn, 1).await;
    conn.write_frame(&create(2, "two", "counter", b"", b""))
        .await;
    expect_error(&mut conn, 2, LIMIT_EXCEEDED).await;
    assert_usable(&mut conn, 3).await;
}

// A peer that connects and sends nothing, or only part of a hello, gets FATAL
// HANDSHAKE_TIMEOUT then EOF. Uses a paused clock (hence the current-thread runtime,
// which `tokio::time::pause` requires) so no real 10 s wait happens: once both
// connections are counted, their handshake timers are armed, and the clock jumps to them.
#[tokio::test]
async fn silent_or_partial_hello_gets_handshake_timeout() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut silent = RawConn::connect(server.addr).await;
    let mut partial = RawConn::connect(server.addr).await;
    partial.write(&[0, 0, 0, 12, b'B', b'U', b'C']).await;
    await_connections(&client, 3).await;
    tokio::time::pause();
    for conn in [&mut silent, &mut partial] {
        let msg = expect_fatal_then_eof(conn, 106).await;
        assert!(msg.contains("handshake"), "{msg}");
    }
}

// A peer that pipelines requests, then neither reads nor sends, is disconnected once
// the daemon's write timeout (30 s, `WRITE_TIMEOUT` in src/server/connection.rs) expires:
// its slot is released. Paused clock (current-thread runtime): each virtual 1 s sleep
// completes only once every socket is quiet, so the clock reaches the timeout without a
// real wait; the polled condition (INFO connections.current) is the actual signal.
#[tokio::test]

async fn peer_that_stops_reading_is_disconnected_after_the_write_timeout() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut conn = server.raw().await;
    // 400 PINGs of 64 KiB: 25 MiB of answers, more than loopback socket buffers hold,
    // but within the in-flight limits, so the server reads every request.
    let payload = vec![0x5a; 64 * 1024];
    let frame = framed(&ping(1, &payload));
    let bytes: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * 400)
        .collect();
    conn.write(&bytes).await;
    await_connections(&client, 2).await;
    tokio::time::pause();
    let mut last = Value::Null;
    for _ in 0..120 {
        last = client.info(None).await.expect("INFO")["connections"]["current"].clone();
        if last == json!(1) {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!(
        "connections.current is still {last} 120 virtual seconds after the peer stopped reading"
    );
}

// A slow reader that keeps making progress receives the whole of a large answer: the
// write timeout is documented as "a write that makes no progress for this long". Paused
// clock as above; the reader takes 256 KiB per virtual second, so the 32 MiB answer
// takes about two virtual minutes while progressing all the time.
#[tokio::test]

async fn slow_but_steady_reader_gets_a_large_answer_in_full() {
    let (server, _dir) = server_with(|c| {
        c.max_frame = 32 * 1024 * 1024;
        c.max_in_flight_bytes = 64 * 1024 * 1024;
    })
    .await;
    let mut conn = server.raw().await;
    let payload: Vec<u8> = (0..32 * 1024 * 1024 - 5).map(|i| (i % 251) as u8).collect();
    conn.write_frame(&ping(1, &payload)).await;
    tokio::time::pause();
    let mut got = Vec::with_capacity(payload.len() + 9);
    let mut chunk = vec![0u8; 256 * 1024];
    for _ in 0..2000 {
        let n = conn.stream.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
        if got.len() >= payload.len() + 9 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        got.len(),
        payload.len() + 9,
        "the answer was cut off after {} of {} bytes",
        got.len(),
        payload.len() + 9
    );
    assert_eq!(
        &got[..9],
        &[
            &((payload.len() + 5) as u32).to_be_bytes()[..],
            &[0, 0, 0, 0, 1]
        ]
        .concat()[..]
    );
    assert!(got[9..] == payload[..], "echoed payload differs");
}

// ---------------------------------------------------------------------------------------
// 11. Graceful shutdown.

// Stopping the server sends a handshaken connection FATAL SHUTTING_DOWN, then EOF; a
// partly received frame is discarded, not answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_shutting_down_then_eof() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    conn.write_frame(&create(1, "s", "counter", b"", b"")).await;
    expect_ok(&mut conn, 1).await;
    conn.write_frame(&send(2, "s", &[b"a"])).await;
    assert_eq!(send_counts(&expect_ok(&mut conn, 2).await), (1, 0));
    let mut idle = server.raw().await;
    idle.write(&[0, 0, 0, 100, OP_PING, 0, 0, 0, 3, b'p']).await;
    let stopping = tokio::spawn(server.stop());
    let msg = expect_fatal_then_eof(&mut conn, SHUTTING_DOWN).await;
    assert!(msg.contains("shutting down"), "{msg}");
    expect_fatal_then_eof(&mut idle, SHUTTING_DOWN).await;
    within("server stop", stopping).await.expect("stop task");
}

// A connection that cannot drain (its peer stopped reading) is closed when the 10 s
// shutdown grace ends (PROTOCOL.md §8: "connections that are still open ... are
// closed"), so answers still queued in the daemon are never delivered. Paused clock
// (current-thread runtime) so the grace passes without a real wait; the signal is
// `stop()` returning, then what the socket still delivers.
#[tokio::test]

async fn connections_still_open_after_the_shutdown_grace_are_closed() {
    let server = TestServer::start().await;
    let mut conn = server.raw().await;
    // 400 answers of 64 KiB: far more than the socket buffers between us hold.
    let payload = vec![0xa5; 64 * 1024];
    let frame = framed(&ping(1, &payload));
    let bytes: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * 400)
        .collect();
    conn.write(&bytes).await;
    let client = server.client().await;
    await_connections(&client, 2).await;
    drop(client);
    tokio::time::pause();
    server.stop().await;
    let mut answers = 0;
    while let Some(r) = conn.read().await {
        if r.status == Status::Ok {
            answers += 1;
        }
    }
    assert!(
        answers < 400,
        "all {answers} answers were delivered after the server stopped: the connection outlived the grace"
    );
}

// A connection still in its handshake when the server stops is closed promptly, at most
// after a FATAL SHUTTING_DOWN (PROTOCOL.md §4 and §8 say it gets 105; a plain close is
// accepted here too, a connection left open is not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_still_in_handshake() {
    let server = TestServer::start().await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.write(&v1_hello()[..5]).await;
    // Make sure the server has accepted it: INFO counts it.
    let client = server.client().await;
    await_connections(&client, 2).await;
    drop(client);
    let stopping = tokio::spawn(server.stop());
    if let Some(r) = within("close during handshake", conn.read()).await {
        let (code, msg) = r
            .failure()
            .expect("well-formed")
            .unwrap_or_else(|| panic!("OK at shutdown: {r:?}"));
        assert_eq!(
            (r.status, r.id, code),
            (Status::Fatal, 0, SHUTTING_DOWN),
            "{msg}"
        );
        assert!(within("EOF", conn.closed()).await, "open after FATAL 105");
    }
    within("server stop", stopping).await.expect("stop task");
}

// ---------------------------------------------------------------------------------------
// 12. Login and permissions.

// Before LOGIN every command but PING gets ERROR AUTH_REQUIRED with its own id and has no
// effect; the connection stays open, and can PING and then log in. Decoding comes first:
// an unknown opcode is still UNKNOWN_COMMAND, a malformed LOGIN still MALFORMED_REQUEST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_before_login_get_auth_required_and_the_connection_stays() {
    let server = TestServer::start().await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.handshake().await;
    let early: Vec<(u32, Vec<u8>)> = vec![
        (1, list(1)),
        (2, info(2, None)),
        (3, create(3, "early", "counter", b"", b"")),
        (4, send(4, "early", &[b"x"])),
        (5, view(5, "early", None)),
        (6, whoami(6)),
        (7, user_add(7, "eve", "eve-pw")),
        (8, user_list(8)),
        (0xffff_ffff, info(0xffff_ffff, Some("early"))),
    ];
    for (id, request) in &early {
        conn.write_frame(request).await;
        let msg = expect_error(&mut conn, *id, AUTH_REQUIRED).await;
        assert!(msg.contains("LOGIN"), "{msg}");
    }
    conn.write_frame(&body(0x33, 9, b"")).await;
    expect_error(&mut conn, 9, UNKNOWN_COMMAND).await;
    conn.write_frame(&body(OP_LOGIN, 10, &str16(b"admin")))
        .await;
    expect_error(&mut conn, 10, MALFORMED_REQUEST).await;
    assert_usable(&mut conn, 11).await;
    conn.write_frame(&login(12, ADMIN, ADMIN_PASSWORD)).await;
    expect_ok(&mut conn, 12).await;
    // The early CREATE and USER_ADD did nothing.
    conn.write_frame(&list(13)).await;
    assert_eq!(parse_json(&expect_ok(&mut conn, 13).await), json!([]));
    conn.write_frame(&user_list(14)).await;
    let users = parse_json(&expect_ok(&mut conn, 14).await);
    assert_eq!(users.as_array().map(Vec::len), Some(1), "{users}");
}

// PING needs no login: right after the handshake it is echoed, payload or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_works_before_login() {
    let server = TestServer::start().await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.handshake().await;
    conn.write_frame(&ping(1, b"no login needed")).await;
    assert_eq!(expect_ok(&mut conn, 1).await, b"no login needed");
    conn.write_frame(&ping(2, b"")).await;
    assert_eq!(expect_ok(&mut conn, 2).await, b"");
    // Still not logged in.
    conn.write_frame(&list(3)).await;
    expect_error(&mut conn, 3, AUTH_REQUIRED).await;
}

// A wrong password and an unknown user both get LOGIN_FAILED with the same message; the
// connection stays open, still without a login, and can then log in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_with_a_wrong_password_gets_login_failed() {
    let server = TestServer::start().await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.handshake().await;
    conn.write_frame(&login(1, ADMIN, "not the password")).await;
    let wrong_password = expect_error(&mut conn, 1, LOGIN_FAILED).await;
    conn.write_frame(&login(2, "nobody", "not the password"))
        .await;
    let unknown_user = expect_error(&mut conn, 2, LOGIN_FAILED).await;
    assert_eq!(
        wrong_password, unknown_user,
        "the message must not tell whether the user exists"
    );
    conn.write_frame(&whoami(3)).await;
    expect_error(&mut conn, 3, AUTH_REQUIRED).await;
    conn.write_frame(&login(4, ADMIN, ADMIN_PASSWORD)).await;
    expect_ok(&mut conn, 4).await;
    // A failed LOGIN after a successful one keeps the connection's login.
    conn.write_frame(&login(5, ADMIN, "wrong again")).await;
    expect_error(&mut conn, 5, LOGIN_FAILED).await;
    conn.write_frame(&whoami(6)).await;
    assert_eq!(parse_json(&expect_ok(&mut conn, 6).await)["user"], ADMIN);
}

// LOGIN pipelined with other requests in one write (the hello included): they run in
// request order, so a SEND before the LOGIN gets AUTH_REQUIRED and applies nothing, and
// the SEND after it runs as the user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_login_then_send_in_one_write() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    admin
        .create("piped", "counter", None)
        .await
        .expect("create");
    let mut conn = RawConn::connect(server.addr).await;
    let mut bytes = v1_hello();
    bytes.extend(framed(&send(1, "piped", &[b"early"])));
    bytes.extend(framed(&login(2, ADMIN, ADMIN_PASSWORD)));
    bytes.extend(framed(&send(3, "piped", &[b"a", b"a", b"b"])));
    bytes.extend(framed(&view(4, "piped", None)));
    conn.write(&bytes).await;
    expect_ok(&mut conn, 0).await;
    expect_error(&mut conn, 1, AUTH_REQUIRED).await;
    assert_eq!(
        parse_json(&expect_ok(&mut conn, 2).await),
        json!({"user": "admin", "grants": [{"permission": "admin", "pattern": "*"}]})
    );
    assert_eq!(send_counts(&expect_ok(&mut conn, 3).await), (3, 0));
    assert_eq!(
        parse_json(&expect_ok(&mut conn, 4).await),
        json!({"a": 2, "b": 1})
    );
}

// A user without the permission gets PERMISSION_DENIED whether or not the bucket exists,
// and keeps its connection; LIST shows only the buckets its grants match; a grant given
// meanwhile applies from the connection's next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_denied_keeps_the_connection_and_grants_apply_at_once() {
    let server = TestServer::start().await;
    let mut admin = server.raw().await;
    admin
        .write(
            &[
                framed(&create(1, "clicks.home", "counter", b"", b"")),
                framed(&create(2, "orders", "counter", b"", b"")),
                framed(&user_add(3, "bob", "bob-pw")),
                framed(&user_grant(4, "bob", "send", "clicks.*")),
            ]
            .concat(),
        )
        .await;
    for id in 1..=4 {
        expect_ok(&mut admin, id).await;
    }
    let mut bob = RawConn::connect(server.addr).await;
    bob.handshake().await;
    bob.write_frame(&login(1, "bob", "bob-pw")).await;
    assert_eq!(
        parse_json(&expect_ok(&mut bob, 1).await),
        json!({"user": "bob", "grants": [{"permission": "send", "pattern": "clicks.*"}]})
    );
    bob.write_frame(&send(2, "orders", &[b"x"])).await;
    let msg = expect_error(&mut bob, 2, PERMISSION_DENIED).await;
    assert!(
        msg.contains("bob") && msg.contains("send") && msg.contains("orders"),
        "{msg}"
    );
    bob.write_frame(&send(3, "no-such-bucket", &[b"x"])).await;
    expect_error(&mut bob, 3, PERMISSION_DENIED).await;
    bob.write_frame(&send(4, "clicks.home", &[b"a"])).await;
    assert_eq!(send_counts(&expect_ok(&mut bob, 4).await), (1, 0));
    bob.write_frame(&view(5, "clicks.home", None)).await;
    expect_error(&mut bob, 5, PERMISSION_DENIED).await;
    bob.write_frame(&list(6)).await;
    assert_eq!(
        parse_json(&expect_ok(&mut bob, 6).await),
        json!([{"handler": "counter", "name": "clicks.home"}])
    );
    bob.write_frame(&user_list(7)).await;
    expect_error(&mut bob, 7, PERMISSION_DENIED).await;

    admin
        .write_frame(&user_grant(5, "bob", "view", "clicks.*"))
        .await;
    expect_ok(&mut admin, 5).await;
    bob.write_frame(&view(8, "clicks.home", None)).await;
    assert_eq!(parse_json(&expect_ok(&mut bob, 8).await), json!({"a": 1}));
    assert_usable(&mut bob, 9).await;
}

// Deleting a user closes its connections with FATAL USER_DELETED and id 0, even an idle
// one; the deleting connection gets OK and stays. The last admin cannot be deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_user_closes_its_idle_connection_with_user_deleted() {
    let server = TestServer::start().await;
    let mut admin = server.raw().await;
    admin.write_frame(&user_add(1, "temp", "temp-pw")).await;
    expect_ok(&mut admin, 1).await;
    let mut temp = RawConn::connect(server.addr).await;
    temp.handshake().await;
    temp.write_frame(&login(1, "temp", "temp-pw")).await;
    expect_ok(&mut temp, 1).await;
    assert_usable(&mut temp, 2).await;
    // `temp` is idle now: nothing sent, nothing pending.
    admin.write_frame(&user_del(2, "temp")).await;
    expect_ok(&mut admin, 2).await;
    let msg = expect_fatal_then_eof(&mut temp, USER_DELETED).await;
    assert!(msg.contains("deleted"), "{msg}");
    assert_usable(&mut admin, 3).await;
    admin.write_frame(&user_del(4, ADMIN)).await;
    expect_error(&mut admin, 4, LAST_ADMIN).await;
    admin.write_frame(&user_del(5, "temp")).await;
    expect_error(&mut admin, 5, NO_SUCH_USER).await;
}

// The 5th failed LOGIN from an address locks it: the next LOGIN is LOGIN_THROTTLED even
// with the right password (which is not checked); the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifth_failed_login_locks_the_address() {
    let server = TestServer::start().await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.handshake().await;
    for id in 1..=5 {
        conn.write_frame(&login(id, &format!("nobody{id}"), "bad"))
            .await;
        expect_error(&mut conn, id, LOGIN_FAILED).await;
    }
    conn.write_frame(&login(6, ADMIN, ADMIN_PASSWORD)).await;
    let msg = expect_error(&mut conn, 6, LOGIN_THROTTLED).await;
    assert!(msg.contains("retry in"), "{msg}");
    assert_usable(&mut conn, 7).await;
}
