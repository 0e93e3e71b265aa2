//! Users, login and per-bucket permissions: the permission every command needs, login
//! failures and throttling, live grants, deleted users, the last-admin guard, password
//! storage, and the acceptance through the real binaries.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use bucketly::auth::throttle::{BASE_LOCK, FREE_FAILURES};
use bucketly::auth::HASH_SLOTS;
use bucketly::client::ClientError;
use bucketly::protocol::{
    check_frame, ClientHello, Command, ErrorCode, Request, Response, Secret, Status,
};
use bucketly::Client;
use bytes::BytesMut;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{cli, config_in, Daemon, RawConn, TestServer, ADMIN, ADMIN_PASSWORD};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The error code and message of a failed request; panics on success or a non-server
/// error.
fn server_error<T: std::fmt::Debug>(result: Result<T, ClientError>) -> (ErrorCode, String) {
    match result {
        Err(ClientError::Server { code, message }) => (
            ErrorCode::from_u16(code).unwrap_or_else(|| panic!("unknown code {code}")),
            message,
        ),
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// Asserts that `result` failed with `code`; returns the message.
#[track_caller]
fn expect_code<T: std::fmt::Debug>(result: Result<T, ClientError>, code: ErrorCode) -> String {
    let (got, message) = server_error(result);
    assert_eq!(got, code, "message: {message}");
    message
}

/// A user holding at most one grant, on `clicks.*` (or admin on `*`).
#[derive(Clone, Copy, Debug)]
struct Role {
    name: &'static str,
    permission: Option<&'static str>,
}

const ROLES: [Role; 6] = [
    Role {
        name: "sender",
        permission: Some("send"),
    },
    Role {
        name: "viewer",
        permission: Some("view"),
    },
    Role {
        name: "dumper",
        permission: Some("dump"),
    },
    Role {
        name: "creator",
        permission: Some("create"),
    },
    Role {
        name: "boss",
        permission: Some("admin"),
    },
    Role {
        name: "nobody",
        permission: None,
    },
];

fn password_of(user: &str) -> String {
    format!("{user}-pw")
}

/// Creates `role` through `admin` with its one grant (`clicks.*`, or `*` for admin).
async fn add_role(admin: &Client, role: Role) {
    admin
        .user_add(role.name, &password_of(role.name))
        .await
        .expect("user_add");
    if let Some(p) = role.permission {
        let pattern = if p == "admin" { "*" } else { "clicks.*" };
        admin
            .user_grant(role.name, p, pattern)
            .await
            .expect("grant");
    }
}

/// Every command of the protocol except LOGIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Ping,
    Create,
    Drop,
    List,
    Send,
    View,
    Dump,
    InfoServer,
    InfoBucket,
    Whoami,
    UserAdd,
    UserDel,
    PasswdSelf,
    PasswdOther,
    UserList,
    UserGrant,
    UserRevoke,
}

const OPS: [Op; 17] = [
    Op::Ping,
    Op::Create,
    Op::Drop,
    Op::List,
    Op::Send,
    Op::View,
    Op::Dump,
    Op::InfoServer,
    Op::InfoBucket,
    Op::Whoami,
    Op::UserAdd,
    Op::UserDel,
    Op::PasswdSelf,
    Op::PasswdOther,
    Op::UserList,
    Op::UserGrant,
    Op::UserRevoke,
];

/// What a command needs, as implemented in src/server/dispatch.rs and src/auth/mod.rs.
#[derive(Debug)]
enum Need {
    Nothing,
    Login,
    On(&'static str, String),
    Admin,
}

/// The objects one actor's commands work on, distinct per actor so every allowed
/// command has something to act on.
struct Targets {
    actor: String,
}

impl Targets {
    const BUCKET: &'static str = "clicks.home";
    const TARGET_USER: &'static str = "target";

    fn create(&self) -> String {
        format!("clicks.new-{}", self.actor)
    }
    fn drop(&self) -> String {
        format!("clicks.drop-{}", self.actor)
    }
    fn added(&self) -> String {
        format!("tmp-{}", self.actor)
    }
    fn deleted(&self) -> String {
        format!("del-{}", self.actor)
    }
    fn granted(&self) -> String {
        format!("g-{}.*", self.actor)
    }
    fn revoked(&self) -> String {
        format!("r-{}", self.actor)
    }

    fn need(&self, op: Op) -> Need {
        match op {
            Op::Ping => Need::Nothing,
            Op::List | Op::InfoServer | Op::Whoami | Op::PasswdSelf => Need::Login,
            Op::Create => Need::On("create", self.create()),
            Op::Drop => Need::On("create", self.drop()),
            Op::Send => Need::On("send", Self::BUCKET.into()),
            Op::View | Op::InfoBucket => Need::On("view", Self::BUCKET.into()),
            Op::Dump => Need::On("dump", Self::BUCKET.into()),
            Op::UserAdd
            | Op::UserDel
            | Op::PasswdOther
            | Op::UserList
            | Op::UserGrant
            | Op::UserRevoke => Need::Admin,
        }
    }

    /// Runs `op` on `client`; the JSON answer (null for empty ones).
    async fn run(&self, client: &Client, op: Op) -> Result<Value, ClientError> {
        let done = |r: Result<(), ClientError>| r.map(|()| Value::Null);
        match op {
            Op::Ping => done(client.ping().await),
            Op::Create => done(client.create(&self.create(), "counter", None).await),
            Op::Drop => done(client.drop_bucket(&self.drop()).await),
            Op::List => client.list().await,
            Op::Send => client
                .send(Self::BUCKET, &["/home"])
                .await
                .map(|o| json!([o.accepted, o.rejected])),
            Op::View => client.view(Self::BUCKET, None).await,
            Op::Dump => client.dump(Self::BUCKET).await,
            Op::InfoServer => client.info(None).await,
            Op::InfoBucket => client.info(Some(Self::BUCKET)).await,
            Op::Whoami => client.whoami().await,
            Op::UserAdd => done(client.user_add(&self.added(), "tmp-pw").await),
            Op::UserDel => done(client.user_del(&self.deleted()).await),
            Op::PasswdSelf => done(
                client
                    .user_passwd(&self.actor, &format!("{}-pw2", self.actor))
                    .await,
            ),
            Op::PasswdOther => done(
                client
                    .user_passwd(Self::TARGET_USER, &format!("t-{}", self.actor))
                    .await,
            ),
            Op::UserList => client.user_list().await,
            Op::UserGrant => done(
                client
                    .user_grant(Self::TARGET_USER, "view", &self.granted())
                    .await,
            ),
            Op::UserRevoke => done(
                client
                    .user_revoke(Self::TARGET_USER, "send", &self.revoked())
                    .await,
            ),
        }
    }

    /// What an admin prepares so that this actor's allowed commands can succeed.
    async fn prepare(&self, admin: &Client) {
        admin
            .create(&self.drop(), "counter", None)
            .await
            .expect("create");
        admin
            .user_add(&self.deleted(), "del-pw")
            .await
            .expect("user_add");
        admin
            .user_grant(Self::TARGET_USER, "send", &self.revoked())
            .await
            .expect("grant");
    }
}

fn names(list: &Value, key: &str) -> BTreeSet<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"))
        .iter()
        .map(|row| row[key].as_str().expect("name").to_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A raw connection from a chosen loopback source address, for login attempts that
/// must come from different addresses (the whole 127/8 is local on Linux).
struct Peer {
    stream: TcpStream,
    buf: BytesMut,
}

impl Peer {
    async fn connect(addr: SocketAddr, from: Ipv4Addr) -> Peer {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from((from, 0)))
            .expect("bind source address");
        let stream = socket.connect(addr).await.expect("connect");
        let mut peer = Peer {
            stream,
            buf: BytesMut::new(),
        };
        let mut out = BytesMut::new();
        ClientHello::v1().encode(&mut out);
        peer.stream.write_all(&out).await.expect("write hello");
        let hello = peer.read().await.expect("hello answer");
        assert_eq!(hello.status, Status::Ok);
        peer
    }

    async fn read(&mut self) -> Option<Response> {
        loop {
            if let Some(len) = check_frame(&self.buf, u32::MAX).expect("frame") {
                let frame = self.buf.split_to(4 + len).freeze();
                return Some(Response::decode(frame.slice(4..)).expect("response"));
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    async fn send_login(&mut self, user: &str, password: &str) {
        let mut out = BytesMut::new();
        Request {
            id: 1,
            command: Command::Login {
                user: user.into(),
                password: Secret(password.into()),
            },
        }
        .encode(&mut out);
        self.stream.write_all(&out).await.expect("write login");
    }

    /// LOGIN: Ok, or the error code and message.
    async fn login(&mut self, user: &str, password: &str) -> LoginAnswer {
        self.send_login(user, password).await;
        self.answer().await
    }

    async fn answer(&mut self) -> LoginAnswer {
        let r = self.read().await.expect("login answer");
        match r.failure().expect("well-formed") {
            None => Ok(()),
            Some(failure) => Err(failure),
        }
    }
}

/// A LOGIN's outcome on a raw connection: OK, or the error code and message.
type LoginAnswer = Result<(), (u16, String)>;

const LOCAL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

/// `f`, failing the test instead of hanging if it never completes (a server that should
/// send something and does not). Not a synchronisation: a correct server answers at once.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("no answer within 10 s")
}

// ---------------------------------------------------------------------------------------
// 1. The permission matrix
// ---------------------------------------------------------------------------------------

// Every command × users holding exactly one permission: allowed commands succeed and
// take effect, denied ones get PERMISSION_DENIED naming user, permission and bucket, take
// no effect, and leave the connection usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_matrix() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    for bucket in ["clicks.home", "clicks", "orders"] {
        admin.create(bucket, "counter", None).await.expect("create");
    }
    admin.send("clicks.home", &["/a"]).await.expect("send");
    admin
        .user_add(Targets::TARGET_USER, "t-pw")
        .await
        .expect("user_add");
    for role in ROLES {
        add_role(&admin, role).await;
        Targets {
            actor: role.name.into(),
        }
        .prepare(&admin)
        .await;
    }

    for role in ROLES {
        let client = server.client_as(role.name, &password_of(role.name)).await;
        let targets = Targets {
            actor: role.name.into(),
        };
        let is_admin = role.permission == Some("admin");
        for op in OPS {
            let need = targets.need(op);
            let allowed = match &need {
                Need::Nothing | Need::Login => true,
                Need::On(p, _) => is_admin || role.permission == Some(*p),
                Need::Admin => is_admin,
            };
            let result = targets.run(&client, op).await;
            let context = format!("{} {op:?} ({need:?})", role.name);
            if allowed {
                let value = result.unwrap_or_else(|e| panic!("{context}: {e}"));
                match op {
                    Op::Send => assert_eq!(value, json!([1, 0]), "{context}"),
                    Op::View | Op::Dump => assert!(value.is_object(), "{context}: {value}"),
                    Op::InfoBucket => assert_eq!(value["name"], "clicks.home", "{context}"),
                    Op::InfoServer => {
                        assert!(value["default_admin_password"].is_boolean(), "{context}")
                    }
                    Op::Whoami => assert_eq!(value["user"], role.name, "{context}"),
                    Op::List => {
                        let listed = names(&value, "name");
                        if !is_admin {
                            assert!(
                                listed.iter().all(|b| b.starts_with("clicks.")),
                                "{context}: {listed:?}"
                            );
                        }
                        if role.permission.is_none() {
                            assert!(listed.is_empty(), "{context}: {listed:?}");
                        }
                    }
                    Op::UserList => assert!(names(&value, "name").contains("target")),
                    _ => {}
                }
            } else {
                let message = expect_code(result, ErrorCode::PermissionDenied);
                let (permission, bucket) = match &need {
                    Need::On(p, b) => (*p, Some(b.as_str())),
                    _ => ("admin", None),
                };
                assert!(
                    message.contains(&format!("user \"{}\"", role.name))
                        && message.contains(&format!("permission {permission}")),
                    "{context}: {message}"
                );
                if let Some(b) = bucket {
                    assert!(
                        message.contains(&format!("bucket \"{b}\"")),
                        "{context}: {message}"
                    );
                }
                // The connection stays usable.
                let who = client.whoami().await.expect("whoami after a denial");
                assert_eq!(who["user"], role.name, "{context}");
            }
        }
    }

    // Exactly the allowed commands took effect.
    let buckets = names(&admin.list().await.expect("list"), "name");
    assert_eq!(
        buckets,
        set(&[
            "clicks",
            "clicks.drop-dumper",
            "clicks.drop-nobody",
            "clicks.drop-sender",
            "clicks.drop-viewer",
            "clicks.home",
            "clicks.new-boss",
            "clicks.new-creator",
            "orders",
        ])
    );
    let users = admin.user_list().await.expect("user_list");
    assert_eq!(
        names(&users, "name"),
        set(&[
            "admin",
            "boss",
            "creator",
            "del-creator",
            "del-dumper",
            "del-nobody",
            "del-sender",
            "del-viewer",
            "dumper",
            "nobody",
            "sender",
            "target",
            "tmp-boss",
            "viewer",
        ])
    );
    let target = users
        .as_array()
        .expect("array")
        .iter()
        .find(|u| u["name"] == "target")
        .expect("target listed");
    let grants: BTreeSet<(String, String)> = target["grants"]
        .as_array()
        .expect("grants")
        .iter()
        .map(|g| {
            (
                g["permission"].as_str().expect("permission").into(),
                g["pattern"].as_str().expect("pattern").into(),
            )
        })
        .collect();
    let mut want: BTreeSet<(String, String)> = ["creator", "dumper", "nobody", "sender", "viewer"]
        .iter()
        .map(|a| ("send".to_string(), format!("r-{a}")))
        .collect();
    want.insert(("view".into(), "g-boss.*".into()));
    assert_eq!(grants, want);
    // Only boss changed target's password; everyone changed their own.
    let c = Client::connect(server.addr).await.expect("connect");
    c.login("target", "t-boss")
        .await
        .expect("target's new password");
    c.login("nobody", "nobody-pw2")
        .await
        .expect("own new password");
    expect_code(c.login("sender", "sender-pw").await, ErrorCode::LoginFailed);
    drop((admin, c));
    server.stop().await;
}

// Before LOGIN every command but PING gets AUTH_REQUIRED (and does nothing); the
// connection then logs in and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_but_ping_needs_login() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    let targets = Targets {
        actor: ADMIN.into(),
    };
    admin
        .create(Targets::BUCKET, "counter", None)
        .await
        .expect("create");
    admin
        .user_add(Targets::TARGET_USER, "t-pw")
        .await
        .expect("user_add");
    targets.prepare(&admin).await;

    let anonymous = Client::connect(server.addr).await.expect("connect");
    for op in OPS {
        let result = targets.run(&anonymous, op).await;
        if op == Op::Ping {
            result.expect("PING needs no login");
        } else {
            let message = expect_code(result, ErrorCode::AuthRequired);
            assert!(message.contains("log in"), "{op:?}: {message}");
        }
    }
    // Nothing happened.
    assert_eq!(
        names(&admin.list().await.expect("list"), "name"),
        set(&["clicks.drop-admin", "clicks.home"])
    );
    let info = admin.info(Some(Targets::BUCKET)).await.expect("info");
    assert_eq!(info["events"], 0);
    assert_eq!(
        names(&admin.user_list().await.expect("user_list"), "name"),
        set(&["admin", "del-admin", "target"])
    );
    // The same connection logs in and is served.
    let who = anonymous.login(ADMIN, ADMIN_PASSWORD).await.expect("login");
    assert_eq!(who["user"], ADMIN);
    assert_eq!(anonymous.whoami().await.expect("whoami")["user"], ADMIN);

    // LOGIN pipelined between requests: those queued before it get 300, those after it
    // run as its user.
    let pipelined = Client::connect(server.addr).await.expect("connect");
    let before = pipelined.start(Command::Whoami).await.expect("queued");
    let login = pipelined
        .start(Command::Login {
            user: ADMIN.into(),
            password: Secret(ADMIN_PASSWORD.into()),
        })
        .await
        .expect("queued");
    let after = pipelined.start(Command::Whoami).await.expect("queued");
    expect_code(before.wait().await, ErrorCode::AuthRequired);
    login.wait().await.expect("login");
    let who: Value =
        serde_json::from_slice(&after.wait().await.expect("whoami").payload).expect("json");
    assert_eq!(who["user"], ADMIN);
    drop((admin, anonymous, pipelined));
    server.stop().await;
}

// Permission is checked before existence: without the permission on a bucket name the
// answer is PERMISSION_DENIED whether or not the bucket exists; with it, a missing
// bucket is NO_SUCH_BUCKET and an existing one BUCKET_EXISTS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_is_checked_before_existence() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    for bucket in ["clicks.home", "orders"] {
        admin.create(bucket, "counter", None).await.expect("create");
    }
    for role in &ROLES[..4] {
        add_role(&admin, *role).await;
    }
    let sender = server.client_as("sender", &password_of("sender")).await;
    let viewer = server.client_as("viewer", &password_of("viewer")).await;
    let dumper = server.client_as("dumper", &password_of("dumper")).await;
    let creator = server.client_as("creator", &password_of("creator")).await;

    let secret = "secret"; // does not exist, outside every grant
    let missing = "clicks.nope"; // does not exist, inside the grants
    let m = expect_code(viewer.view(secret, None).await, ErrorCode::PermissionDenied);
    assert!(m.contains("view") && m.contains("\"secret\""), "{m}");
    expect_code(viewer.info(Some(secret)).await, ErrorCode::PermissionDenied);
    expect_code(
        sender.send(secret, &["x"]).await,
        ErrorCode::PermissionDenied,
    );
    expect_code(dumper.dump(secret).await, ErrorCode::PermissionDenied);
    expect_code(
        creator.drop_bucket(secret).await,
        ErrorCode::PermissionDenied,
    );
    // An existing bucket outside the grant: denied, not BUCKET_EXISTS.
    expect_code(
        creator.create("orders", "counter", None).await,
        ErrorCode::PermissionDenied,
    );

    expect_code(viewer.view(missing, None).await, ErrorCode::NoSuchBucket);
    expect_code(viewer.info(Some(missing)).await, ErrorCode::NoSuchBucket);
    expect_code(sender.send(missing, &["x"]).await, ErrorCode::NoSuchBucket);
    expect_code(dumper.dump(missing).await, ErrorCode::NoSuchBucket);
    expect_code(creator.drop_bucket(missing).await, ErrorCode::NoSuchBucket);
    expect_code(
        creator.create("clicks.home", "counter", None).await,
        ErrorCode::BucketExists,
    );
    // CREATE: the permission before the name's validity.
    expect_code(
        creator.create("bad name!", "counter", None).await,
        ErrorCode::PermissionDenied,
    );
    expect_code(
        creator.create("clicks.bad name!", "counter", None).await,
        ErrorCode::InvalidArgument,
    );
    // Admin-only commands are refused before the target user is looked up.
    expect_code(sender.user_del("ghost").await, ErrorCode::PermissionDenied);
    expect_code(
        sender.user_passwd("ghost", "x").await,
        ErrorCode::PermissionDenied,
    );
    expect_code(
        sender.user_grant("ghost", "send", "*").await,
        ErrorCode::PermissionDenied,
    );
    drop((admin, sender, viewer, dumper, creator));
    server.stop().await;
}

// A grant on `clicks.*` covers `clicks.home` (and `clicks.`-prefixed names only): not
// `clicks`, not `orders`, not `xclicks.home`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glob_patterns_are_anchored() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    for bucket in ["clicks.home", "clicks", "orders", "xclicks.home"] {
        admin.create(bucket, "counter", None).await.expect("create");
    }
    add_role(&admin, ROLES[0]).await;
    let sender = server.client_as("sender", &password_of("sender")).await;
    sender
        .send("clicks.home", &["a"])
        .await
        .expect("clicks.home");
    for bucket in ["clicks", "orders", "xclicks.home"] {
        let m = expect_code(
            sender.send(bucket, &["a"]).await,
            ErrorCode::PermissionDenied,
        );
        assert!(m.contains(&format!("bucket \"{bucket}\"")), "{m}");
        let info = admin.info(Some(bucket)).await.expect("info");
        assert_eq!(info["events"], 0, "{bucket}");
    }
    // `*` inside a pattern matches any run, also an empty one.
    admin
        .user_grant("sender", "send", "*ers")
        .await
        .expect("grant");
    sender
        .send("orders", &["a"])
        .await
        .expect("orders via *ers");
    drop((admin, sender));
    server.stop().await;
}

// LIST shows exactly the buckets that match one of the user's grant patterns (of any
// permission); admin sees all, a user without grants none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_only_granted_buckets() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    let all = [
        "clicks",
        "clicks.away",
        "clicks.home",
        "orders",
        "xclicks.home",
    ];
    for bucket in all {
        admin.create(bucket, "counter", None).await.expect("create");
    }
    add_role(&admin, ROLES[0]).await; // sender: send on clicks.*
    add_role(&admin, ROLES[5]).await; // nobody
    admin.user_add("mixed", "m-pw").await.expect("user_add");
    admin
        .user_grant("mixed", "dump", "orders")
        .await
        .expect("grant");
    admin
        .user_grant("mixed", "view", "clicks.home")
        .await
        .expect("grant");

    let list = |c: Client| async move { names(&c.list().await.expect("list"), "name") };
    assert_eq!(list(admin.clone()).await, set(&all));
    let sender = server.client_as("sender", &password_of("sender")).await;
    assert_eq!(list(sender).await, set(&["clicks.away", "clicks.home"]));
    let nobody = server.client_as("nobody", &password_of("nobody")).await;
    assert_eq!(list(nobody).await, set(&[]));
    let mixed = server.client_as("mixed", "m-pw").await;
    assert_eq!(list(mixed).await, set(&["clicks.home", "orders"]));
    drop(admin);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// 2. Login failures and throttling
// ---------------------------------------------------------------------------------------

// A wrong password and an unknown user get the same code and the same message; so does
// an empty user name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_do_not_reveal_which_users_exist() {
    let server = TestServer::start().await;
    let c = Client::connect(server.addr).await.expect("connect");
    let wrong = expect_code(c.login(ADMIN, "not-admin").await, ErrorCode::LoginFailed);
    let unknown = expect_code(c.login("ghost", "admin").await, ErrorCode::LoginFailed);
    let empty = expect_code(c.login("", "").await, ErrorCode::LoginFailed);
    assert_eq!(wrong, unknown);
    assert_eq!(wrong, empty);
    assert_eq!(wrong, "invalid user name or password");
    // Still not logged in after the failures; still usable.
    expect_code(c.whoami().await, ErrorCode::AuthRequired);
    c.login(ADMIN, ADMIN_PASSWORD).await.expect("login");
    // LOGIN again on a logged-in connection: a failure keeps the login it had, a success
    // switches to the new user.
    c.user_add("w", "w-pw").await.expect("user_add");
    expect_code(c.login("w", "wrong").await, ErrorCode::LoginFailed);
    assert_eq!(c.whoami().await.expect("whoami")["user"], ADMIN);
    assert_eq!(c.login("w", "w-pw").await.expect("login")["user"], "w");
    assert_eq!(c.whoami().await.expect("whoami")["user"], "w");
    expect_code(c.user_list().await, ErrorCode::PermissionDenied);
    drop(c);
    server.stop().await;
}

/// The outcome of one throttling round: how long after the 5th failure was sent the last
/// check answered, and each check's label and answer.
struct Round {
    since_fifth: Duration,
    checks: Vec<(&'static str, LoginAnswer)>,
}

/// Runs `round` on fresh servers until it gives a verdict. Every check in a round is
/// expected to be refused with LOGIN_THROTTLED. The lock after the 5th failure lasts
/// BASE_LOCK (1 s) and this test must not wait for it, nor depend on finishing within it:
/// a round whose checks all answered less than BASE_LOCK after the 5th failure was sent
/// proves a bug if any check got through (the server recorded the failure after it was
/// sent, so it was still locked); a round that took longer and let a check through
/// proves nothing, and is retried on a fresh server (fresh throttle records).
async fn throttle_rounds<F, Fut>(what: &str, round: F)
where
    F: Fn(TestServer) -> Fut,
    Fut: std::future::Future<Output = Round>,
{
    for _ in 0..5 {
        let server = TestServer::start().await;
        let r = round(server).await;
        let refused = r.checks.iter().all(|(_, a)| matches!(a, Err((303, _))));
        if refused {
            for (label, answer) in &r.checks {
                let Err((_, message)) = answer else {
                    unreachable!()
                };
                let secs: u64 = message
                    .strip_prefix("too many failed logins; retry in ")
                    .and_then(|rest| rest.strip_suffix(" s"))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("{label}: {message}"));
                // Whole seconds, at least 1; every check ran under the first lock
                // (BASE_LOCK = 1 s), so rounding either way gives 1.
                assert_eq!(secs, BASE_LOCK.as_secs(), "{label}: {message}");
            }
            return;
        }
        assert!(
            r.since_fifth >= BASE_LOCK,
            "{what}: an attempt within the lock got through: {:?}",
            r.checks
        );
    }
    panic!("{what}: no round finished within {BASE_LOCK:?} of its 5th failure");
}

/// Five failed logins for `user` from `from` (all LOGIN_FAILED: the lock starts only
/// after the 5th); returns when the 5th was sent.
async fn five_failures(addr: SocketAddr, from: Ipv4Addr, user: &str) -> Instant {
    assert_eq!(FREE_FAILURES, 5, "this test documents a policy of 5");
    let mut peer = Peer::connect(addr, from).await;
    let mut fifth = Instant::now();
    for i in 1..=FREE_FAILURES {
        fifth = Instant::now();
        let answer = peer.login(user, "wrong").await;
        assert!(
            matches!(answer, Err((301, _))),
            "failure {i} for {user}: {answer:?}"
        );
    }
    fifth
}

// Login throttling, per src/auth/throttle.rs: failures are counted per peer address and
// per user name (existing or not). The 5th failure (FREE_FAILURES) locks both that address
// and that name for BASE_LOCK = 1 s (doubling with each further failure, up to 5 min);
// a locked attempt is refused with LOGIN_THROTTLED ("retry in N s") without checking the
// password, so the correct password is refused too. So after 5 failures for `victim`
// from 127.0.0.1: `victim` is locked from any address, and every user is locked from
// 127.0.0.1; another user from another address is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_failures_lock_the_name_and_the_address() {
    throttle_rounds("existing user", |server| async move {
        let admin = server.client().await;
        admin.user_add("victim", "v-pw").await.expect("user_add");
        admin.user_add("bystander", "b-pw").await.expect("user_add");
        drop(admin);
        let addr = server.addr;
        let other = Ipv4Addr::new(127, 0, 0, 2);
        // Connections made beforehand, so the checks run back to back.
        let mut same = Peer::connect(addr, LOCAL).await;
        let mut elsewhere = Peer::connect(addr, other).await;
        let mut free = Peer::connect(addr, Ipv4Addr::new(127, 0, 0, 3)).await;

        let fifth = five_failures(addr, LOCAL, "victim").await;
        let checks = vec![
            (
                "victim, right password, same address",
                same.login("victim", "v-pw").await,
            ),
            (
                "victim, wrong password, same address",
                same.login("victim", "x").await,
            ),
            (
                "bystander, right password, same address",
                same.login("bystander", "b-pw").await,
            ),
            (
                "admin, right password, same address",
                same.login(ADMIN, ADMIN_PASSWORD).await,
            ),
            (
                "victim, right password, other address",
                elsewhere.login("victim", "v-pw").await,
            ),
        ];
        let since_fifth = fifth.elapsed();
        // Neither the name nor the address is locked: served, whenever it runs.
        free.login("bystander", "b-pw")
            .await
            .expect("another user from another address is not throttled");
        server.stop().await;
        Round {
            since_fifth,
            checks,
        }
    })
    .await;
}

// The per-name lock applies to names that do not exist exactly as to names that do, so
// throttling reveals nothing about which users exist (src/auth/throttle.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_are_throttled_like_known_ones() {
    throttle_rounds("unknown user", |server| async move {
        let addr = server.addr;
        let mut elsewhere = Peer::connect(addr, Ipv4Addr::new(127, 0, 0, 2)).await;
        let fifth = five_failures(addr, LOCAL, "ghost").await;
        let checks = vec![(
            "ghost from another address",
            elsewhere.login("ghost", "anything").await,
        )];
        let since_fifth = fifth.elapsed();
        server.stop().await;
        Round {
            since_fifth,
            checks,
        }
    })
    .await;
}

// Concurrent attempts cannot get many more password checks than the policy allows: of 16
// wrong-password LOGINs for one name sent at once from 16 addresses, at least
// FREE_FAILURES and at most FREE_FAILURES + HASH_SLOTS - 1 are checked (LOGIN_FAILED: the
// attempts already verifying when the lock is set finish); the rest are refused with
// LOGIN_THROTTLED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_attempts_do_not_bypass_throttling() {
    let server = TestServer::start().await;
    server
        .client()
        .await
        .user_add("victim", "v-pw")
        .await
        .expect("user_add");
    let mut peers = Vec::new();
    for i in 0..16u8 {
        peers.push(Peer::connect(server.addr, Ipv4Addr::new(127, 0, 1, i + 1)).await);
    }
    for (i, peer) in peers.iter_mut().enumerate() {
        peer.send_login("victim", &format!("guess-{i}")).await;
    }
    let mut checked = 0usize;
    for peer in &mut peers {
        match peer.answer().await {
            Err((301, _)) => checked += 1,
            Err((303, _)) => {}
            other => panic!("{other:?}"),
        }
    }
    let most = FREE_FAILURES as usize + HASH_SLOTS - 1;
    assert!(
        (FREE_FAILURES as usize..=most).contains(&checked),
        "{checked} of 16 concurrent guesses were checked; the policy allows {most}"
    );
    server.stop().await;
}

// A successful login for one's own account does not wipe the address's count of
// failures for other names: 4 failures for different names, a success as `mallory`,
// then a 5th failure, lock the address. (Regression: a success used to clear the
// address record, so one valid account let an attacker spray guesses without a lock.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_success_does_not_reset_the_address_count() {
    throttle_rounds("address count reset by a success", |server| async move {
        let admin = server.client().await;
        admin.user_add("mallory", "m-pw").await.expect("user_add");
        admin.user_add("bystander", "b-pw").await.expect("user_add");
        drop(admin);
        let mut peer = Peer::connect(server.addr, LOCAL).await;
        for name in ["u1", "u2", "u3", "u4"] {
            assert!(matches!(peer.login(name, "guess").await, Err((301, _))));
        }
        peer.login("mallory", "m-pw")
            .await
            .expect("mallory's own login");
        let fifth = Instant::now();
        assert!(matches!(peer.login("u5", "guess").await, Err((301, _))));
        let checks = vec![(
            "bystander after 5 failures from this address",
            peer.login("bystander", "b-pw").await,
        )];
        let since_fifth = fifth.elapsed();
        server.stop().await;
        Round {
            since_fifth,
            checks,
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 3. Grants apply to open connections
// ---------------------------------------------------------------------------------------

// A grant or a revoke applies to the user's already open connection from its next
// request: SEND denied, granted, allowed, revoked, denied again (WHOAMI and LIST follow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_apply_to_open_connections() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    admin.create("b", "counter", None).await.expect("create");
    admin.user_add("w", "w-pw").await.expect("user_add");
    let w = server.client_as("w", "w-pw").await;

    expect_code(w.send("b", &["1"]).await, ErrorCode::PermissionDenied);
    assert_eq!(w.list().await.expect("list"), json!([]));
    admin.user_grant("w", "send", "b").await.expect("grant");
    let outcome = w.send("b", &["2"]).await.expect("send after grant");
    assert_eq!(outcome.accepted, 1);
    assert_eq!(
        w.whoami().await.expect("whoami"),
        json!({"user": "w", "grants": [{"permission": "send", "pattern": "b"}]})
    );
    assert_eq!(names(&w.list().await.expect("list"), "name"), set(&["b"]));
    admin.user_revoke("w", "send", "b").await.expect("revoke");
    expect_code(w.send("b", &["3"]).await, ErrorCode::PermissionDenied);
    assert_eq!(w.whoami().await.expect("whoami")["grants"], json!([]));
    // Only the event sent while granted arrived.
    assert_eq!(admin.view("b", None).await.expect("view"), json!({"2": 1}));
    drop((admin, w));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// 4. Deleting a user closes its connections
// ---------------------------------------------------------------------------------------

// Deleting a user closes its idle connections with FATAL USER_DELETED (107); re-creating
// a user of the same name (same password) does not revive an old connection: its next
// request gets the FATAL, never an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_user_closes_its_connections() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    admin.create("b", "counter", None).await.expect("create");
    admin.user_add("w", "w-pw").await.expect("user_add");
    admin.user_grant("w", "send", "*").await.expect("grant");
    let mut idle = RawConn::connect(server.addr).await;
    idle.handshake().await;
    idle.login("w", "w-pw").await;
    let mut second = RawConn::connect(server.addr).await;
    second.handshake().await;
    second.login("w", "w-pw").await;

    admin.user_del("w").await.expect("user_del");
    let (status, _, code, message) = within(idle.read_error()).await;
    assert_eq!((status, code), (Status::Fatal, 107), "{message}");
    assert!(message.contains("deleted"), "{message}");
    assert!(within(idle.closed()).await, "closed after the FATAL");

    admin.user_add("w", "w-pw").await.expect("same name again");
    admin.user_grant("w", "send", "*").await.expect("grant");
    let mut out = BytesMut::new();
    Request {
        id: 7,
        command: Command::Send {
            bucket: "b".into(),
            batch: bucketly::protocol::SendBatch::from_events(&["revived?"]),
        },
    }
    .encode(&mut out);
    second.write(&out).await;
    let (status, _, code, _) = within(second.read_error()).await;
    assert_eq!((status, code), (Status::Fatal, 107));
    assert!(within(second.closed()).await);
    assert_eq!(admin.view("b", None).await.expect("view"), json!({}));
    // The new `w` logs in and works.
    let w = server.client_as("w", "w-pw").await;
    w.send("b", &["new"]).await.expect("send as the new w");
    drop((admin, w));
    server.stop().await;
}

// A client whose connection the server closed fails every later request instead of
// waiting forever: after its user is deleted, two requests in a row both end with an
// error (the FATAL's code or "closed"). (Regression: such a request was queued after the
// reader had ended and its answer never resolved.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_requests_after_the_server_closed_do_not_hang() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    admin.user_add("w", "w-pw").await.expect("user_add");
    let w = server.client_as("w", "w-pw").await;
    admin.user_del("w").await.expect("user_del");
    for attempt in 1..=2 {
        // The timeout only detects a hang; a correct client answers at once.
        let answer = tokio::time::timeout(Duration::from_secs(10), w.whoami()).await;
        let err = answer
            .unwrap_or_else(|_| panic!("request {attempt} after the close never completed"))
            .expect_err("the connection is closed");
        if let Some(code) = err.code() {
            assert_eq!(code, ErrorCode::UserDeleted);
        }
    }
    drop((admin, w));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// 5. User management errors and the last-admin guard
// ---------------------------------------------------------------------------------------

// The last admin can neither be deleted nor lose admin (LAST_ADMIN); admin only on `*`,
// unknown permissions, bad names and passwords are INVALID_ARGUMENT; duplicates are
// USER_EXISTS, unknown users NO_SUCH_USER. With a second admin, `admin` can be deleted
// (its own connection then closes) and the second is the last admin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_management_errors_and_last_admin() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    let m = expect_code(admin.user_del(ADMIN).await, ErrorCode::LastAdmin);
    assert!(m.contains("last admin"), "{m}");
    expect_code(
        admin.user_revoke(ADMIN, "admin", "*").await,
        ErrorCode::LastAdmin,
    );
    assert_eq!(
        admin.whoami().await.expect("whoami")["grants"],
        json!([{"permission": "admin", "pattern": "*"}])
    );

    admin.user_add("second", "s-pw").await.expect("user_add");
    expect_code(admin.user_add("second", "x").await, ErrorCode::UserExists);
    expect_code(admin.user_del("ghost").await, ErrorCode::NoSuchUser);
    // Only USER_ADD validates names; elsewhere an invalid name is just not found.
    expect_code(admin.user_del("bad name!").await, ErrorCode::NoSuchUser);
    expect_code(
        admin.user_grant("ghost", "send", "*").await,
        ErrorCode::NoSuchUser,
    );
    expect_code(admin.user_passwd("ghost", "x").await, ErrorCode::NoSuchUser);
    let m = expect_code(
        admin.user_grant("second", "admin", "clicks.*").await,
        ErrorCode::InvalidArgument,
    );
    assert!(m.contains("admin"), "{m}");
    let m = expect_code(
        admin.user_grant("second", "superuser", "*").await,
        ErrorCode::InvalidArgument,
    );
    assert!(m.contains("superuser") && m.contains("send"), "{m}");
    expect_code(
        admin.user_grant("second", "send", "bad pattern!").await,
        ErrorCode::InvalidArgument,
    );
    expect_code(
        admin.user_revoke("second", "send", "never-granted").await,
        ErrorCode::InvalidArgument,
    );
    expect_code(
        admin.user_add("bad name", "x").await,
        ErrorCode::InvalidArgument,
    );
    expect_code(admin.user_add("", "x").await, ErrorCode::InvalidArgument);
    expect_code(
        admin.user_add("empty-pw", "").await,
        ErrorCode::InvalidArgument,
    );
    expect_code(
        admin.user_add("long-pw", &"p".repeat(1025)).await,
        ErrorCode::InvalidArgument,
    );
    expect_code(
        admin.user_passwd("second", "").await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(
        names(&admin.user_list().await.expect("user_list"), "name"),
        set(&[ADMIN, "second"])
    );

    // Two admins: `admin` may go, even by its own hand.
    admin
        .user_grant("second", "admin", "*")
        .await
        .expect("grant");
    admin
        .user_grant("second", "admin", "*")
        .await
        .expect("granting twice is a no-op");
    drop(admin);
    // `admin` deletes itself: the request is answered OK, then its connection is closed
    // with USER_DELETED.
    let mut own = server.raw().await;
    let mut out = BytesMut::new();
    Request {
        id: 9,
        command: Command::UserDel { user: ADMIN.into() },
    }
    .encode(&mut out);
    own.write(&out).await;
    let answer = within(own.read()).await.expect("USER_DEL answer");
    assert_eq!(
        (answer.status, answer.id),
        (Status::Ok, 9),
        "{:?}",
        answer.failure()
    );
    let (status, _, code, _) = within(own.read_error()).await;
    assert_eq!((status, code), (Status::Fatal, 107));
    assert!(within(own.closed()).await);
    let second = server.client_as("second", "s-pw").await;
    let users = second.user_list().await.expect("user_list");
    assert_eq!(
        users,
        json!([{"name": "second", "grants": [{"permission": "admin", "pattern": "*"}]}])
    );
    expect_code(second.user_del("second").await, ErrorCode::LastAdmin);
    expect_code(
        second.user_revoke("second", "admin", "*").await,
        ErrorCode::LastAdmin,
    );
    let c = Client::connect(server.addr).await.expect("connect");
    expect_code(c.login(ADMIN, ADMIN_PASSWORD).await, ErrorCode::LoginFailed);
    drop((second, c));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// 6. Passwords
// ---------------------------------------------------------------------------------------

// Anyone may change their own password, only an admin someone else's; changes survive a
// restart; the database holds only argon2id hashes; USER_LIST never shows a hash; WHOAMI
// shows the user and its grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_change_persist_and_are_hashed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start_with(config_in(dir.path())).await;
    let admin = server.client().await;
    admin.user_add("w", "w-old").await.expect("user_add");
    admin.user_add("other", "o-old").await.expect("user_add");
    admin
        .user_grant("w", "send", "clicks.*")
        .await
        .expect("grant");
    let w = server.client_as("w", "w-old").await;
    assert_eq!(
        w.whoami().await.expect("whoami"),
        json!({"user": "w", "grants": [{"permission": "send", "pattern": "clicks.*"}]})
    );
    w.user_passwd("w", "w-new").await.expect("own password");
    // The connection that changed it stays logged in.
    assert_eq!(w.whoami().await.expect("whoami")["user"], "w");
    let m = expect_code(
        w.user_passwd("other", "o-w").await,
        ErrorCode::PermissionDenied,
    );
    assert!(m.contains("admin"), "{m}");
    admin
        .user_passwd("other", "o-new")
        .await
        .expect("admin sets other's");
    let listed = admin.user_list().await.expect("user_list");
    let text = listed.to_string();
    assert!(
        !text.contains("$argon2") && !text.contains("password"),
        "{text}"
    );
    for row in listed.as_array().expect("array") {
        let mut keys: Vec<_> = row.as_object().expect("object").keys().collect();
        keys.sort();
        assert_eq!(keys, ["grants", "name"], "{row}");
    }
    drop((admin, w));
    server.stop().await;

    // Only argon2id PHC strings on disk, never a plaintext password.
    let plaintexts = ["w-old", "w-new", "o-old", "o-w", "o-new", ADMIN_PASSWORD];
    let store = bucketly::store::Store::open(&config_in(dir.path()).database).expect("open");
    let users = store.users().expect("users");
    assert_eq!(users.len(), 3);
    for (name, record) in users {
        let record = record.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            record.password.starts_with("$argon2id$"),
            "{name}: {}",
            record.password
        );
        for p in plaintexts {
            // `admin`'s hash may not contain its own name either ("admin" is its password).
            assert!(!record.password.contains(p), "{name}'s hash contains {p:?}");
        }
    }
    drop(store);

    let server = TestServer::start_with(config_in(dir.path())).await;
    let c = Client::connect(server.addr).await.expect("connect");
    expect_code(c.login("w", "w-old").await, ErrorCode::LoginFailed);
    expect_code(c.login("other", "o-old").await, ErrorCode::LoginFailed);
    assert_eq!(
        c.login("w", "w-new").await.expect("new password")["user"],
        "w"
    );
    c.login("other", "o-new").await.expect("new password");
    drop(c);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// 7. default_admin_password
// ---------------------------------------------------------------------------------------

// Server INFO says whether `admin` still has the password `admin`: true on a fresh
// database, false once changed (also after a restart), true again if set back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_admin_password_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start_with(config_in(dir.path())).await;
    let admin = server.client().await;
    let flag = |c: Client| async move {
        c.info(None).await.expect("info")["default_admin_password"].clone()
    };
    assert_eq!(flag(admin.clone()).await, json!(true));
    admin.user_passwd(ADMIN, "better").await.expect("passwd");
    assert_eq!(flag(admin.clone()).await, json!(false));
    drop(admin);
    server.stop().await;

    let server = TestServer::start_with(config_in(dir.path())).await;
    let admin = server.client_as(ADMIN, "better").await;
    assert_eq!(flag(admin.clone()).await, json!(false));
    admin
        .user_passwd(ADMIN, ADMIN_PASSWORD)
        .await
        .expect("passwd");
    assert_eq!(flag(admin.clone()).await, json!(true));
    drop(admin);
    server.stop().await;
}

// The flag follows the user `admin`: false once it is deleted, true again when it is
// re-created with the password `admin`; the same after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_admin_password_flag_follows_the_admin_user() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start_with(config_in(dir.path())).await;
    let admin = server.client().await;
    admin.user_add("second", "s-pw").await.expect("user_add");
    admin
        .user_grant("second", "admin", "*")
        .await
        .expect("grant");
    drop(admin);
    let second = server.client_as("second", "s-pw").await;
    let flag = |c: Client| async move {
        c.info(None).await.expect("info")["default_admin_password"].clone()
    };
    assert_eq!(flag(second.clone()).await, json!(true));
    second.user_del(ADMIN).await.expect("user_del");
    assert_eq!(flag(second.clone()).await, json!(false));
    second
        .user_add(ADMIN, ADMIN_PASSWORD)
        .await
        .expect("re-create admin");
    assert_eq!(flag(second.clone()).await, json!(true));
    drop(second);
    server.stop().await;

    let server = TestServer::start_with(config_in(dir.path())).await;
    let second = server.client_as("second", "s-pw").await;
    assert_eq!(flag(second.clone()).await, json!(true));
    second.user_del(ADMIN).await.expect("user_del");
    drop(second);
    server.stop().await;
    let server = TestServer::start_with(config_in(dir.path())).await;
    let second = server.client_as("second", "s-pw").await;
    assert_eq!(flag(second.clone()).await, json!(false));
    drop(second);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// 8. The acceptance through the real binaries
// ---------------------------------------------------------------------------------------

/// Runs `bucketly --port PORT [--user U --password P] ARGS...` with no terminal and no
/// BUCKETLY_* variables from the test's environment.
async fn bucketly(port: u16, login: Option<(&str, &str)>, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(cli());
    for var in [
        "BUCKETLY_USER",
        "BUCKETLY_PASSWORD",
        "BUCKETLY_HOST",
        "BUCKETLY_PORT",
        "BUCKETLY_TLS",
        "BUCKETLY_CA",
    ] {
        cmd.env_remove(var);
    }
    cmd.args(["--port", &port.to_string()]);
    if let Some((user, password)) = login {
        cmd.args(["--user", user, "--password", password]);
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .expect("run bucketly")
}

async fn cli_ok(port: u16, login: (&str, &str), args: &[&str]) -> String {
    let out = bucketly(port, Some(login), args).await;
    assert!(
        out.status.success(),
        "{args:?} as {}: {}",
        login.0,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

async fn cli_json(port: u16, login: (&str, &str), args: &[&str]) -> Value {
    let stdout = cli_ok(port, login, args).await;
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

/// Asserts the command fails with exit code 1 and one stderr line containing `needle`.
async fn cli_fails(port: u16, login: Option<(&str, &str)>, args: &[&str], needle: &str) {
    let out = bucketly(port, login, args).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(
        stderr.contains(needle) && stderr.trim().lines().count() == 1,
        "{args:?}: wanted one line with {needle:?}, got {stderr:?}"
    );
    assert!(out.stdout.is_empty(), "{args:?}");
}

/// What must hold before and after the restart: `writer` may send to `clicks.home` and
/// nothing else; the old admin password is refused and the new one works.
async fn writer_and_admin_as_specified(port: u16) {
    const NEW: (&str, &str) = (ADMIN, "N3w-admin");
    const WRITER: (&str, &str) = ("writer", "W");
    cli_ok(port, WRITER, &["send", "clicks.home", "/home"]).await;
    let view = cli_json(port, NEW, &["view", "clicks.home"]).await;
    // Bucket state starts empty at each start (buckets are not durable yet).
    assert_eq!(view, json!({"/home": 1}));
    for args in [
        &["view", "clicks.home"][..],
        &["dump", "clicks.home"],
        &["create", "clicks.new", "--handler", "counter"],
        &["send", "orders", "x"],
        &["info", "clicks.home"],
    ] {
        cli_fails(port, Some(WRITER), args, "PERMISSION_DENIED").await;
    }
    let list = cli_json(port, WRITER, &["list"]).await;
    assert_eq!(list, json!([{"name": "clicks.home", "handler": "counter"}]));
    let orders = cli_json(port, NEW, &["info", "orders"]).await;
    assert_eq!(orders["events"], 0);
    cli_fails(
        port,
        Some((ADMIN, ADMIN_PASSWORD)),
        &["whoami"],
        "LOGIN_FAILED",
    )
    .await;
    let who = cli_json(port, NEW, &["whoami"]).await;
    assert_eq!(who["user"], ADMIN);
    let info = cli_json(port, NEW, &["info"]).await;
    assert_eq!(info["default_admin_password"], json!(false));
}

// The acceptance with bucketlyd and the bucketly CLI as processes: change the
// admin password, add `writer` with send on `clicks.*`, and `writer` can send to
// `clicks.home` and nothing else; all of it holds after SIGTERM and a restart on the same
// database. Without a password and without a terminal the CLI fails with one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_through_the_binaries() {
    const OLD: (&str, &str) = (ADMIN, ADMIN_PASSWORD);
    const NEW: (&str, &str) = (ADMIN, "N3w-admin");
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(dir.path(), &[]).await;
    let port = daemon.addr.port();

    let info = cli_json(port, OLD, &["info"]).await;
    assert_eq!(info["default_admin_password"], json!(true));
    cli_ok(port, OLD, &["user", "passwd", ADMIN, "--password", NEW.1]).await;
    cli_ok(port, NEW, &["user", "add", "writer", "--password", "W"]).await;
    cli_ok(port, NEW, &["user", "grant", "writer", "send", "clicks.*"]).await;
    cli_ok(
        port,
        NEW,
        &["create", "clicks.home", "--handler", "counter"],
    )
    .await;
    cli_ok(port, NEW, &["create", "orders", "--handler", "counter"]).await;
    let users = cli_json(port, NEW, &["user", "list"]).await;
    assert_eq!(
        users,
        json!([
            {"name": "admin", "grants": [{"permission": "admin", "pattern": "*"}]},
            {"name": "writer", "grants": [{"permission": "send", "pattern": "clicks.*"}]},
        ])
    );
    let who = cli_json(port, ("writer", "W"), &["whoami"]).await;
    assert_eq!(
        who,
        json!({"user": "writer", "grants": [{"permission": "send", "pattern": "clicks.*"}]})
    );
    writer_and_admin_as_specified(port).await;

    // No password and no terminal: one clear line, exit 1 — for the login password and
    // for a new user's password alike. No user at all: likewise.
    cli_fails(
        port,
        None,
        &["--user", ADMIN, "whoami"],
        "no password given",
    )
    .await;
    cli_fails(port, Some(NEW), &["user", "add", "x"], "no password given").await;
    cli_fails(port, None, &["whoami"], "--user").await;
    let users = cli_json(port, NEW, &["user", "list"]).await;
    assert_eq!(users.as_array().map(Vec::len), Some(2), "{users}");

    assert!(
        daemon.terminate().await.success(),
        "graceful exit on SIGTERM"
    );
    let daemon = Daemon::start(dir.path(), &[]).await;
    let port = daemon.addr.port();
    writer_and_admin_as_specified(port).await;
    assert!(daemon.terminate().await.success());
}
