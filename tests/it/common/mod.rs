//! Test harness: the real daemon on port 0, in-process ([`TestServer`]) or as the built
//! binary ([`Daemon`]), and a raw-bytes connection ([`RawConn`]) for protocol tests.

#![allow(dead_code)]

pub mod postgres;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use bucketly::protocol::frame::check_frame;
use bucketly::protocol::{ClientHello, Response};
use bucketly::server::Server;
use bucketly::{Client, Config};
use bytes::BytesMut;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// Longest a test waits for something the daemon should do soon (an output, a change):
/// reached only when the daemon misbehaves.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(15);

/// `f`, failing the test instead of hanging if it takes longer than [`PATIENCE`].
pub async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(PATIENCE, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {PATIENCE:?} waiting for {what}"),
    }
}

/// The next output record of `sub`, parsed.
pub async fn next_record(sub: &mut bucketly::client::Subscription) -> serde_json::Value {
    bounded("an output record", sub.next_json())
        .await
        .expect("the subscription is still open")
        .expect("an output record")
}

/// The user every fresh database starts with.
pub const ADMIN: &str = "admin";
/// Its password.
pub const ADMIN_PASSWORD: &str = "admin";

/// A config for a daemon whose files live in `dir`, listening on a free loopback port.
pub fn config_in(dir: &Path) -> Config {
    Config {
        database: dir.join("bucketly.redb"),
        handlers_dir: dir.join("handlers"),
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..Config::default()
    }
}

/// The daemon running inside the test process, on the test's runtime.
pub struct TestServer {
    pub addr: SocketAddr,
    pub config: Config,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestServer {
    /// A daemon with a fresh database in its own temporary directory.
    pub async fn start() -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = TestServer::start_with(config_in(dir.path())).await;
        server._dir = Some(dir);
        server
    }

    /// A daemon with `config` (its directory is the caller's to keep).
    pub async fn start_with(config: Config) -> TestServer {
        let server = Server::bind(config.clone()).await.expect("daemon starts");
        TestServer::serve(server, config)
    }

    /// A daemon with `config` on a store the caller opened (for example on a
    /// fault-injecting storage backend); `config.database` only places the exec directory.
    pub async fn start_with_store(config: Config, store: bucketly::store::Store) -> TestServer {
        let server = Server::bind_with_store(config.clone(), store)
            .await
            .expect("daemon starts");
        TestServer::serve(server, config)
    }

    fn serve(server: Server, config: Config) -> TestServer {
        let addr = server.local_addr().expect("bound address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            config,
            stop: Some(stop),
            task: Some(task),
            _dir: None,
        }
    }

    /// A new client connection, logged in as the bootstrap admin.
    pub async fn client(&self) -> Client {
        self.client_as(ADMIN, ADMIN_PASSWORD).await
    }

    /// A new client connection logged in as `user`.
    pub async fn client_as(&self, user: &str, password: &str) -> Client {
        let client = Client::connect(self.addr).await.expect("client connects");
        client.login(user, password).await.expect("login");
        client
    }

    /// A new raw connection that has completed the handshake and logged in as admin.
    pub async fn raw(&self) -> RawConn {
        let mut c = RawConn::connect(self.addr).await;
        c.handshake().await;
        c.login(ADMIN, ADMIN_PASSWORD).await;
        c
    }

    /// Graceful shutdown; returns once the daemon has released its database.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }
}

/// The `bucketlyd` binary, started on port 0; the listen line on stdout gives the port.
pub struct Daemon {
    pub addr: SocketAddr,
    pub child: tokio::process::Child,
}

impl Daemon {
    /// Starts `bucketlyd DATABASE --port 0 ARGS...` in `dir`.
    pub async fn start(dir: &Path, args: &[&str]) -> Daemon {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bucketlyd"))
            .arg(dir.join("bucketly.redb"))
            .args(["--port", "0"])
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn bucketlyd");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .await
            .expect("listen line");
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Daemon { addr, child }
    }

    /// A new client connection to the daemon, logged in as the bootstrap admin.
    pub async fn client(&self) -> Client {
        let client = Client::connect(self.addr).await.expect("client connects");
        client.login(ADMIN, ADMIN_PASSWORD).await.expect("login");
        client
    }

    /// SIGKILL (no graceful shutdown), then wait for the process to be gone.
    pub async fn kill(mut self) -> std::process::ExitStatus {
        self.child.start_kill().expect("SIGKILL");
        self.child.wait().await.expect("wait")
    }

    /// SIGTERM, then wait for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
        self.child.wait().await.expect("wait")
    }
}

/// Path of the `bucketly` CLI binary.
pub fn cli() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bucketly"))
}

/// A connection that speaks raw bytes.
pub struct RawConn {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl RawConn {
    /// Connects without handshaking.
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        RawConn {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Sends the v1 hello and checks the OK answer.
    pub async fn handshake(&mut self) {
        let mut out = BytesMut::new();
        ClientHello::v1().encode(&mut out);
        self.write(&out).await;
        let r = self.read().await.expect("hello answer");
        assert_eq!(r.status, bucketly::protocol::Status::Ok, "{r:?}");
    }

    /// Sends LOGIN (request id 0) and checks the OK answer.
    pub async fn login(&mut self, user: &str, password: &str) {
        let mut out = BytesMut::new();
        bucketly::protocol::Request {
            id: 0,
            command: bucketly::protocol::Command::Login {
                user: user.into(),
                password: bucketly::protocol::Secret(password.into()),
            },
        }
        .encode(&mut out);
        self.write(&out).await;
        let r = self.read().await.expect("login answer");
        assert_eq!(
            r.status,
            bucketly::protocol::Status::Ok,
            "{:?}",
            r.failure()
        );
    }

    /// Writes raw bytes.
    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Writes one frame with `body`.
    pub async fn write_frame(&mut self, body: &[u8]) {
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        self.write(&out).await;
    }

    /// Reads one response; None at end of stream.
    pub async fn read(&mut self) -> Option<Response> {
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

    /// Reads the error code of the next response, panicking if it is OK.
    pub async fn read_error(&mut self) -> (bucketly::protocol::Status, u32, u16, String) {
        let r = self.read().await.expect("a response");
        let (code, msg) = r.failure().expect("well-formed").expect("an error");
        (r.status, r.id, code, msg)
    }

    /// True once the server has closed the connection (after any pending bytes).
    pub async fn closed(&mut self) -> bool {
        self.read().await.is_none()
    }
}
