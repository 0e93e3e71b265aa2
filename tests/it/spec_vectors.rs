//! The protocol specification against the codec. `protocol-spec/vectors.json` was computed
//! from the layouts in `protocol-spec/PROTOCOL.md`, not with this crate, so these tests are
//! an independent check of `bucketly::protocol`: every valid vector must decode to its
//! `decoded` value and encode back to exactly its bytes, and every invalid one must fail
//! with its documented code. The spec's error-code table, its command and permission
//! tables and its worked example are checked against the code too, so the document cannot
//! drift from it.

use std::collections::BTreeSet;
use std::path::PathBuf;

use bucketly::protocol::handshake::{FLAG_LOGIN_REQUIRED, MAX_HELLO_LEN};
use bucketly::protocol::{
    check_frame, ClientHello, Command, ErrorCode, FrameError, Request, Response, Secret, SendBatch,
    SendOutcome, ServerHello, Status,
};
use bytes::{Bytes, BytesMut};
use serde_json::Value;

/// Every `kind` the vector file may use; the file's format is described in PROTOCOL.md.
const KINDS: [&str; 7] = [
    "request",
    "response",
    "client_hello",
    "server_hello",
    "invalid_request",
    "invalid_client_hello",
    "invalid_frame",
];

fn spec_file(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("protocol-spec")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn vectors() -> Vec<Value> {
    let text = spec_file("vectors.json");
    match serde_json::from_str(&text) {
        Ok(Value::Array(vectors)) => vectors,
        Ok(_) => panic!("vectors.json must be a JSON array"),
        Err(e) => panic!("vectors.json: {e}"),
    }
}

type Check = Result<(), String>;

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if s.len() % 2 != 0 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!("{s:?} is not lowercase hex of whole bytes"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn field<'a>(v: &'a Value, key: &str) -> Result<&'a Value, String> {
    v.get(key).ok_or_else(|| format!("missing field {key:?}"))
}

fn string(v: &Value, key: &str) -> Result<String, String> {
    field(v, key)?
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{key:?} must be a string"))
}

fn number<T: TryFrom<u64>>(v: &Value, key: &str) -> Result<T, String> {
    field(v, key)?
        .as_u64()
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| format!("{key:?} must be an integer in range"))
}

/// A byte value in `decoded`: a string stands for its UTF-8 bytes, `{"hex": ...}` for any bytes.
fn bytes_of(v: &Value) -> Result<Bytes, String> {
    match v {
        Value::String(s) => Ok(Bytes::copy_from_slice(s.as_bytes())),
        Value::Object(o) if o.len() == 1 => {
            let h = o["hex"].as_str().ok_or("\"hex\" must be a string")?;
            Ok(unhex(h)?.into())
        }
        other => Err(format!("{other} is not a byte value")),
    }
}

fn bytes_field(v: &Value, key: &str) -> Result<Bytes, String> {
    bytes_of(field(v, key)?).map_err(|e| format!("{key:?}: {e}"))
}

/// The frame in `hex`, checked to be exactly one frame: returns its body.
fn one_frame(frame: &[u8], max: u32) -> Result<Bytes, String> {
    match check_frame(frame, max) {
        Ok(Some(len)) if len + 4 == frame.len() => Ok(Bytes::copy_from_slice(&frame[4..])),
        other => Err(format!(
            "hex is not exactly one frame of at most {max} bytes: {other:?}"
        )),
    }
}

fn same(what: &str, expected: &[u8], got: &[u8]) -> Check {
    if expected == got {
        Ok(())
    } else {
        Err(format!(
            "{what}:\n  expected {}\n  got      {}",
            hex(expected),
            hex(got)
        ))
    }
}

fn request_of(d: &Value) -> Result<Request, String> {
    let bucket = || string(d, "bucket");
    let user = || string(d, "user");
    let password = || string(d, "password").map(Secret);
    let command = match string(d, "op")?.as_str() {
        "ping" => Command::Ping(bytes_field(d, "payload")?),
        "create" => Command::Create {
            bucket: bucket()?,
            handler: string(d, "handler")?,
            config: bytes_field(d, "config")?,
            options: bytes_field(d, "options")?,
        },
        "drop" => Command::Drop { bucket: bucket()? },
        "list" => Command::List,
        "send" => {
            let events = field(d, "events")?
                .as_array()
                .ok_or("\"events\" must be an array")?
                .iter()
                .map(bytes_of)
                .collect::<Result<Vec<_>, _>>()?;
            Command::Send {
                bucket: bucket()?,
                batch: SendBatch::from_events(&events),
            }
        }
        "view" => Command::View {
            bucket: bucket()?,
            arg: match field(d, "arg")? {
                Value::Null => None,
                arg => Some(bytes_of(arg)?),
            },
        },
        "dump" => Command::Dump { bucket: bucket()? },
        "take" => Command::Take { bucket: bucket()? },
        "release" => Command::Release {
            bucket: bucket()?,
            take: number(d, "take")?,
        },
        "info" => Command::Info {
            bucket: match field(d, "bucket")? {
                Value::Null => None,
                _ => Some(bucket()?),
            },
        },
        "alter" => Command::Alter {
            bucket: bucket()?,
            options: bytes_field(d, "options")?,
        },
        "reload" => Command::Reload,
        "subscribe" => Command::Subscribe { bucket: bucket()? },
        "unsubscribe" => Command::Unsubscribe {
            subscription: number(d, "subscription")?,
        },
        "login" => Command::Login {
            user: user()?,
            password: password()?,
        },
        "whoami" => Command::Whoami,
        "user_add" => Command::UserAdd {
            user: user()?,
            password: password()?,
        },
        "user_del" => Command::UserDel { user: user()? },
        "user_passwd" => Command::UserPasswd {
            user: user()?,
            password: password()?,
        },
        "user_list" => Command::UserList,
        "user_grant" => Command::UserGrant {
            user: user()?,
            permission: string(d, "permission")?,
            pattern: string(d, "pattern")?,
        },
        "user_revoke" => Command::UserRevoke {
            user: user()?,
            permission: string(d, "permission")?,
            pattern: string(d, "pattern")?,
        },
        other => return Err(format!("unknown op {other:?}")),
    };
    Ok(Request {
        id: number(d, "id")?,
        command,
    })
}

fn check_request(frame: &[u8], d: &Value) -> Check {
    let expected = request_of(d)?;
    let decoded = Request::decode(one_frame(frame, u32::MAX)?)
        .map_err(|e| format!("decode failed: {e:?}"))?;
    if decoded != expected {
        return Err(format!("decoded {decoded:?}\n  expected {expected:?}"));
    }
    let mut out = BytesMut::new();
    expected.encode(&mut out);
    same("encoding", frame, &out)
}

fn outcome_of(d: &Value) -> Result<SendOutcome, String> {
    let reasons = field(d, "reasons")?
        .as_array()
        .ok_or("\"reasons\" must be an array")?
        .iter()
        .map(|r| Ok((number(r, "index")?, string(r, "reason")?)))
        .collect::<Result<Vec<_>, String>>()?;
    Ok(SendOutcome {
        accepted: number(d, "accepted")?,
        rejected: number(d, "rejected")?,
        reasons,
    })
}

fn check_response(frame: &[u8], d: &Value) -> Check {
    let id = number(d, "id")?;
    let status = string(d, "status")?;
    let expected = match status.as_str() {
        "ok" => Response::ok(id, unhex(&string(d, "payload_hex")?)?.into()),
        "push" => Response::push(id, unhex(&string(d, "payload_hex")?)?.into()),
        "end" => {
            let n: u16 = number(d, "code")?;
            let code = ErrorCode::from_u16(n).ok_or(format!("unknown code {n}"))?;
            Response::end(id, code, &string(d, "message")?)
        }
        "error" | "fatal" => {
            let n: u16 = number(d, "code")?;
            let code = ErrorCode::from_u16(n).ok_or(format!("unknown code {n}"))?;
            let response = Response::error(id, code, &string(d, "message")?);
            // The status follows from the code alone (1xx ⇔ FATAL).
            let wanted = if status == "fatal" {
                Status::Fatal
            } else {
                Status::Error
            };
            if response.status != wanted {
                return Err(format!(
                    "code {n} is sent with {:?}, not {status}",
                    response.status
                ));
            }
            response
        }
        other => return Err(format!("unknown status {other:?}")),
    };
    let decoded =
        Response::decode(one_frame(frame, u32::MAX)?).map_err(|e| format!("decode failed: {e}"))?;
    if decoded != expected {
        return Err(format!("decoded {decoded:?}\n  expected {expected:?}"));
    }
    if let Some(text) = d.get("payload_text") {
        let text = text.as_str().ok_or("\"payload_text\" must be a string")?;
        same("payload_text", text.as_bytes(), &decoded.payload)?;
    }
    if let Some(value) = d.get("payload_json") {
        let got: Value = serde_json::from_slice(&decoded.payload)
            .map_err(|e| format!("payload is not JSON: {e}"))?;
        if &got != value {
            return Err(format!("payload JSON {got}\n  expected {value}"));
        }
    }
    if let Some(o) = d.get("send_outcome") {
        let outcome = outcome_of(o)?;
        let got = SendOutcome::decode(decoded.payload.clone())
            .map_err(|e| format!("SendOutcome::decode failed: {e}"))?;
        if got != outcome {
            return Err(format!("send outcome {got:?}\n  expected {outcome:?}"));
        }
        same("SendOutcome::encode", &decoded.payload, &outcome.encode())?;
    }
    let mut out = BytesMut::new();
    expected.encode(&mut out);
    same("encoding", frame, &out)
}

fn check_client_hello(frame: &[u8], d: &Value) -> Check {
    let expected = ClientHello {
        version: number(d, "version")?,
        flags: number(d, "flags")?,
    };
    let body = one_frame(frame, MAX_HELLO_LEN)?;
    let decoded = ClientHello::decode(&body).map_err(|e| format!("decode failed: {e:?}"))?;
    if decoded != expected {
        return Err(format!("decoded {decoded:?}, expected {expected:?}"));
    }
    // The encoder writes no reserved bytes: compare with the frame without them.
    let reserved = match d.get("reserved_hex") {
        Some(r) => unhex(r.as_str().ok_or("\"reserved_hex\" must be a string")?)?,
        None => Vec::new(),
    };
    let plain = body
        .len()
        .checked_sub(reserved.len())
        .ok_or("reserved_hex too long")?;
    same("reserved bytes", &reserved, &body[plain..])?;
    let mut wanted = (plain as u32).to_be_bytes().to_vec();
    wanted.extend_from_slice(&body[..plain]);
    let mut out = BytesMut::new();
    expected.encode(&mut out);
    same("encoding (reserved bytes left out)", &wanted, &out)
}

fn check_server_hello(frame: &[u8], d: &Value) -> Check {
    let expected = ServerHello {
        version: number(d, "version")?,
        flags: number(d, "flags")?,
        max_frame: number(d, "max_frame")?,
        server: string(d, "server")?,
    };
    let response = Response::decode(one_frame(frame, u32::MAX)?).map_err(|e| e.to_string())?;
    if (response.status, response.id) != (Status::Ok, 0) {
        return Err(format!(
            "a server hello is an OK response with id 0: {response:?}"
        ));
    }
    let decoded = ServerHello::decode(response.payload.clone())?;
    if decoded != expected {
        return Err(format!("decoded {decoded:?}\n  expected {expected:?}"));
    }
    let mut out = BytesMut::new();
    Response::ok(0, expected.payload()).encode(&mut out);
    same("encoding", frame, &out)
}

fn expected_code(v: &Value) -> Result<ErrorCode, String> {
    let n: u16 = number(field(v, "error")?, "code")?;
    ErrorCode::from_u16(n).ok_or(format!("unknown code {n}"))
}

fn check_invalid_request(frame: &[u8], v: &Value) -> Check {
    let code = expected_code(v)?;
    let id = match field(field(v, "error")?, "id")? {
        Value::Null => None,
        _ => Some(number(field(v, "error")?, "id")?),
    };
    let err = match Request::decode(one_frame(frame, u32::MAX)?) {
        Ok(r) => return Err(format!("decoded as {r:?}")),
        Err(e) => e,
    };
    if (err.code, err.id) != (code, id) {
        return Err(format!(
            "got {} with id {:?}, expected {code} with id {id:?}",
            err.code, err.id
        ));
    }
    // The server answers FATAL exactly when there is no id to answer.
    if err.code.is_fatal() != err.id.is_none() {
        return Err(format!(
            "{} with id {:?}: fatal iff no id",
            err.code, err.id
        ));
    }
    Ok(())
}

/// What the server does with a first frame: framing problems are BAD_HANDSHAKE, a
/// complete frame goes to `ClientHello::decode` (as in `server::connection`).
fn check_invalid_client_hello(bytes: &[u8], v: &Value) -> Check {
    let code = expected_code(v)?;
    let got = match check_frame(bytes, MAX_HELLO_LEN) {
        Err(_) => ErrorCode::BadHandshake,
        Ok(Some(len)) => match ClientHello::decode(&bytes[4..4 + len]) {
            Ok(h) => return Err(format!("accepted as {h:?}")),
            Err((code, _)) => code,
        },
        Ok(None) => return Err("not a complete frame".into()),
    };
    if got != code {
        return Err(format!("got {got}, expected {code}"));
    }
    Ok(())
}

fn check_invalid_frame(bytes: &[u8], v: &Value) -> Check {
    let code = expected_code(v)?;
    let max: u32 = number(v, "max_frame")?;
    let len = bytes
        .first_chunk::<4>()
        .map(|h| u32::from_be_bytes(*h))
        .ok_or("no length prefix")?;
    let got = match check_frame(bytes, max) {
        Err(FrameError::Empty) if len == 0 => ErrorCode::ProtocolError,
        Err(FrameError::TooLarge { len: l, max: m }) if (l, m) == (len, max) => {
            ErrorCode::FrameTooLarge
        }
        other => return Err(format!("check_frame gave {other:?}")),
    };
    if got != code {
        return Err(format!("got {got}, expected {code}"));
    }
    Ok(())
}

fn check_vector(v: &Value) -> Check {
    let bytes = unhex(&string(v, "hex")?)?;
    let decoded = || field(v, "decoded");
    match string(v, "kind")?.as_str() {
        "request" => check_request(&bytes, decoded()?),
        "response" => check_response(&bytes, decoded()?),
        "client_hello" => check_client_hello(&bytes, decoded()?),
        "server_hello" => check_server_hello(&bytes, decoded()?),
        "invalid_request" => check_invalid_request(&bytes, v),
        "invalid_client_hello" => check_invalid_client_hello(&bytes, v),
        "invalid_frame" => check_invalid_frame(&bytes, v),
        other => Err(format!("unknown kind {other:?}")),
    }
}

#[test]
fn every_vector_matches_the_codec() {
    let vectors = vectors();
    assert!(!vectors.is_empty(), "no vectors");
    let failures: Vec<String> = vectors
        .iter()
        .filter_map(|v| {
            let name = v.get("name").and_then(Value::as_str).unwrap_or("(unnamed)");
            check_vector(v).err().map(|e| format!("{name}: {e}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} vectors fail:\n{}",
        failures.len(),
        vectors.len(),
        failures.join("\n")
    );
}

#[test]
fn every_vector_is_well_formed_and_of_a_known_kind() {
    let mut names = BTreeSet::new();
    for v in vectors() {
        let name = string(&v, "name").expect("every vector has a name");
        assert!(names.insert(name.clone()), "duplicate vector name {name:?}");
        let kind = string(&v, "kind").unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            KINDS.contains(&kind.as_str()),
            "{name}: unknown kind {kind:?}"
        );
        unhex(&string(&v, "hex").unwrap_or_else(|e| panic!("{name}: {e}")))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let valid = !kind.starts_with("invalid_");
        assert_eq!(
            v.get("decoded").is_some(),
            valid,
            "{name}: \"decoded\" iff valid"
        );
        assert_eq!(
            v.get("error").is_some(),
            !valid,
            "{name}: \"error\" iff invalid"
        );
        assert!(
            v.get("note").is_some_and(Value::is_string),
            "{name}: no note"
        );
    }
}

/// One command of each kind. The exhaustive match makes a new `Command` variant a
/// compile error here until it is added (and so covered by vectors and spec tables).
fn every_command() -> Vec<Command> {
    let s = String::new;
    let commands = vec![
        Command::Ping(Bytes::new()),
        Command::Create {
            bucket: s(),
            handler: s(),
            config: Bytes::new(),
            options: Bytes::new(),
        },
        Command::Drop { bucket: s() },
        Command::List,
        Command::Send {
            bucket: s(),
            batch: SendBatch::from_events::<&[u8]>(&[]),
        },
        Command::View {
            bucket: s(),
            arg: None,
        },
        Command::Dump { bucket: s() },
        Command::Take { bucket: s() },
        Command::Release {
            bucket: s(),
            take: 1,
        },
        Command::Info { bucket: None },
        Command::Alter {
            bucket: s(),
            options: Bytes::new(),
        },
        Command::Reload,
        Command::Subscribe { bucket: s() },
        Command::Unsubscribe { subscription: 0 },
        Command::Login {
            user: s(),
            password: Secret(s()),
        },
        Command::Whoami,
        Command::UserAdd {
            user: s(),
            password: Secret(s()),
        },
        Command::UserDel { user: s() },
        Command::UserPasswd {
            user: s(),
            password: Secret(s()),
        },
        Command::UserList,
        Command::UserGrant {
            user: s(),
            permission: s(),
            pattern: s(),
        },
        Command::UserRevoke {
            user: s(),
            permission: s(),
            pattern: s(),
        },
    ];
    for c in &commands {
        match c {
            Command::Ping(_)
            | Command::Create { .. }
            | Command::Drop { .. }
            | Command::List
            | Command::Send { .. }
            | Command::View { .. }
            | Command::Dump { .. }
            | Command::Take { .. }
            | Command::Release { .. }
            | Command::Info { .. }
            | Command::Alter { .. }
            | Command::Reload
            | Command::Subscribe { .. }
            | Command::Unsubscribe { .. }
            | Command::Login { .. }
            | Command::Whoami
            | Command::UserAdd { .. }
            | Command::UserDel { .. }
            | Command::UserPasswd { .. }
            | Command::UserList
            | Command::UserGrant { .. }
            | Command::UserRevoke { .. } => {}
        }
    }
    commands
}

#[test]
fn vectors_cover_every_opcode_status_and_kind() {
    let vectors = vectors();
    let of_kind = |kind: &str| {
        vectors
            .iter()
            .filter(|v| v["kind"] == kind)
            .map(|v| unhex(v["hex"].as_str().unwrap_or_default()).unwrap_or_default())
            .collect::<Vec<_>>()
    };
    let requests = of_kind("request");
    for command in every_command() {
        let op = command.opcode();
        assert!(
            requests.iter().any(|f| f.get(4) == Some(&op)),
            "no request vector for opcode 0x{op:02x} ({})",
            command.name()
        );
    }
    let responses = of_kind("response");
    for status in [
        Status::Ok,
        Status::Error,
        Status::Fatal,
        Status::Push,
        Status::End,
    ] {
        assert!(
            responses.iter().any(|f| f.get(4) == Some(&(status as u8))),
            "no response vector with status {status:?}"
        );
    }
    for kind in KINDS {
        assert!(!of_kind(kind).is_empty(), "no vector of kind {kind}");
    }
}

/// The body of the level-2 section of PROTOCOL.md whose heading contains `title`.
fn section(doc: &str, title: &str) -> String {
    let start = doc
        .lines()
        .position(|l| l.starts_with("## ") && l.contains(title))
        .unwrap_or_else(|| panic!("PROTOCOL.md has no section {title:?}"));
    doc.lines()
        .skip(start + 1)
        .take_while(|l| !l.starts_with("## "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn error_code_table_lists_exactly_the_codes() {
    let doc = spec_file("PROTOCOL.md");
    let table: Vec<(u16, String, String)> = section(&doc, "Error codes")
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // `| 100 | `PROTOCOL_ERROR` | FATAL | meaning |`
            let code = cells.get(1)?.parse().ok()?;
            Some((
                code,
                cells.get(2)?.trim_matches('`').to_owned(),
                cells.get(3)?.to_string(),
            ))
        })
        .collect();
    let expected: Vec<(u16, String, String)> = ErrorCode::ALL
        .iter()
        .map(|c| {
            let status = if c.is_fatal() { "FATAL" } else { "ERROR" };
            (c.as_u16(), c.name().to_owned(), status.to_owned())
        })
        .collect();
    assert_eq!(table, expected, "PROTOCOL.md error table vs ErrorCode::ALL");
}

/// The rows of the first Markdown table in `text` whose header row starts with `header`:
/// each row's cells, trimmed.
fn table_rows(text: &str, header: &str) -> Vec<Vec<String>> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with(header));
    assert!(lines.next().is_some(), "no table with header {header:?}");
    lines
        .skip(1) // | --- | --- |
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').collect();
            cells[1..cells.len().saturating_sub(1)]
                .iter()
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect()
}

#[test]
fn command_table_lists_exactly_the_opcodes() {
    let doc = spec_file("PROTOCOL.md");
    let table: BTreeSet<(String, String)> = table_rows(&section(&doc, "Commands"), "| opcode |")
        .into_iter()
        .map(|row| (row[0].clone(), row[1].clone()))
        .collect();
    let expected: BTreeSet<(String, String)> = every_command()
        .iter()
        .map(|c| (format!("0x{:02x}", c.opcode()), c.name().to_owned()))
        .collect();
    assert_eq!(table, expected, "PROTOCOL.md command table vs Command");
}

#[test]
fn permission_table_names_every_command() {
    let doc = spec_file("PROTOCOL.md");
    let rows = table_rows(&section(&doc, "Login and permissions"), "| command |");
    // First cell: `SEND` or `VIEW, INFO with a bucket`: command names, each possibly
    // followed by a qualifier.
    let listed: BTreeSet<String> = rows
        .iter()
        .flat_map(|row| {
            row[0]
                .split(',')
                .map(|c| c.split_whitespace().next().unwrap_or_default().to_owned())
        })
        .collect();
    let names: BTreeSet<String> = every_command()
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    assert_eq!(listed, names, "PROTOCOL.md permission table vs Command");
}

/// One frame of the worked example: direction and bytes.
fn example_frames(doc: &str) -> Vec<(&'static str, Vec<u8>)> {
    let mut frames: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let mut in_block = false;
    for line in section(doc, "Worked example").lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block || line.trim().is_empty() {
            continue;
        }
        let rest = if let Some(rest) = line.strip_prefix("C→S") {
            frames.push(("C→S", Vec::new()));
            rest
        } else if let Some(rest) = line.strip_prefix("S→C") {
            frames.push(("S→C", Vec::new()));
            rest
        } else {
            line
        };
        // Hex bytes separated by single spaces, then two spaces and a comment.
        let rest = rest.trim_start();
        let hex_part = rest.split("  ").next().unwrap_or_default();
        let frame = &mut frames.last_mut().expect("a dump line before C→S/S→C").1;
        for token in hex_part.split(' ') {
            frame.extend(unhex(token).unwrap_or_else(|e| panic!("example line {line:?}: {e}")));
        }
    }
    frames
}

#[test]
fn worked_example_is_a_valid_session() {
    let doc = spec_file("PROTOCOL.md");
    let frames = example_frames(&doc);
    let body = |f: &[u8]| one_frame(f, u32::MAX).unwrap_or_else(|e| panic!("{}: {e}", hex(f)));
    let mut client = frames.iter().filter(|f| f.0 == "C→S").map(|f| body(&f.1));
    let mut server = frames.iter().filter(|f| f.0 == "S→C").map(|f| body(&f.1));

    let hello = ClientHello::decode(&client.next().expect("client hello")).expect("hello");
    assert_eq!(hello, ClientHello::v1());
    let server_hello = Response::decode(server.next().expect("server hello")).expect("response");
    assert_eq!((server_hello.status, server_hello.id), (Status::Ok, 0));
    let server_hello = ServerHello::decode(server_hello.payload).expect("server hello payload");
    assert_eq!(
        server_hello.flags & FLAG_LOGIN_REQUIRED,
        FLAG_LOGIN_REQUIRED,
        "the server hello announces LOGIN_REQUIRED"
    );

    let requests: Vec<Request> = client
        .map(|b| Request::decode(b).expect("request"))
        .collect();
    let responses: Vec<Response> = server
        .map(|b| Response::decode(b).expect("response"))
        .collect();
    assert!(
        matches!(
            requests.first(),
            Some(Request {
                command: Command::Login { .. },
                ..
            })
        ),
        "the session logs in first"
    );
    assert_eq!(requests.len(), responses.len(), "one response per request");
    let mut seen = BTreeSet::new();
    for (request, response) in requests.iter().zip(&responses) {
        seen.insert(request.command.name());
        assert_eq!(request.id, response.id, "responses in request order");
        assert_eq!(response.status, Status::Ok, "{}", request.command.name());
        match &request.command {
            Command::Send { batch, .. } => {
                let outcome = SendOutcome::decode(response.payload.clone()).expect("outcome");
                assert_eq!((outcome.accepted + outcome.rejected) as usize, batch.len());
            }
            Command::View { .. } => {
                serde_json::from_slice::<Value>(&response.payload).expect("VIEW answers JSON");
            }
            Command::Login { user, .. } => {
                let who: Value =
                    serde_json::from_slice(&response.payload).expect("LOGIN answers JSON");
                assert_eq!(who["user"], Value::String(user.clone()), "{who}");
                assert!(who["grants"].is_array(), "{who}");
            }
            _ => {}
        }
    }
    for name in ["LOGIN", "CREATE", "SEND", "VIEW"] {
        assert!(seen.contains(name), "the example shows {name}");
    }
}
