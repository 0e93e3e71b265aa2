//! The async Rust client. One [`Client`] is one connection; it is cheap to clone and
//! every clone pipelines over the same socket: requests are written as they come and
//! answers are matched in order.
//!
//! ```no_run
//! # async fn demo() -> Result<(), bucketly::client::ClientError> {
//! let client = bucketly::Client::connect("127.0.0.1:8484").await?;
//! client.login("admin", "admin").await?;
//! client.create("clicks", "counter", None).await?;
//! client.send("clicks", &["/home", "/about", "/home"]).await?;
//! println!("{}", client.view("clicks", None).await?);
//! # Ok(()) }
//! ```

mod connection;
mod error;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{oneshot, Semaphore};

pub use error::ClientError;

/// A take handed out by TAKE ([`Client::take`]).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct Take {
    /// Its id, increasing per bucket; RELEASE names it.
    pub id: u64,
    /// Where its window starts: the previous take's `taken_ms` (the bucket's creation
    /// for the first), in milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// When it was taken; strictly increasing per bucket.
    pub taken_ms: u64,
    /// Events accepted into the aggregate it holds.
    pub events: u64,
    /// The handler's `dump` result.
    pub output: serde_json::Value,
}

use crate::protocol::{Command, Request, Response, Secret, SendBatch, SendOutcome, ServerHello};
use connection::{Outgoing, SubEvent, Subscriptions};

/// Outputs a [`Subscription`] buffers before the connection stops reading.
pub const SUBSCRIPTION_BUFFER: usize = 256;

/// Requests one client keeps in flight by default; more wait for an answer.
pub const DEFAULT_CLIENT_IN_FLIGHT: usize = 1024;

/// A connection to `bucketlyd`.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    tx: tokio::sync::mpsc::Sender<Outgoing>,
    subs: Subscriptions,
    next_id: AtomicU32,
    hello: ServerHello,
    in_flight: Arc<Semaphore>,
}

/// An answer that will arrive; await [`PendingReply::wait`]. Dropping it is fine.
/// Its in-flight slot is released when the answer arrives, not when it is read, so a
/// caller may hold any number of these.
pub struct PendingReply {
    rx: oneshot::Receiver<Result<Response, ClientError>>,
}

impl PendingReply {
    /// The OK response.
    ///
    /// # Errors
    /// [`ClientError::Server`] for an ERROR answer, or a connection error.
    pub async fn wait(self) -> Result<Response, ClientError> {
        let response = self.rx.await.map_err(|_| ClientError::Closed)??;
        match response.failure() {
            Ok(None) => Ok(response),
            Ok(Some((code, message))) => Err(ClientError::Server { code, message }),
            Err(e) => Err(ClientError::Protocol(e.to_string())),
        }
    }
}

/// A live subscription: the flush outputs of one bucket, in order.
pub struct Subscription {
    id: u32,
    rx: tokio::sync::mpsc::Receiver<SubEvent>,
    client: Client,
}

impl Subscription {
    /// The subscription's id (its SUBSCRIBE request id).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The next output record (JSON text: `{"bucket","events","output","seq","time_ms"}`).
    /// `Some(Err)` once the subscription ended (the bucket was dropped, the permission
    /// revoked, the connection closed); `None` after that.
    pub async fn next(&mut self) -> Option<Result<Bytes, ClientError>> {
        self.rx.recv().await
    }

    /// [`Subscription::next`], parsed.
    pub async fn next_json(&mut self) -> Option<Result<serde_json::Value, ClientError>> {
        let item = self.next().await?;
        Some(item.and_then(|b| {
            serde_json::from_slice(&b)
                .map_err(|e| ClientError::Protocol(format!("output is not JSON: {e}")))
        }))
    }

    /// UNSUBSCRIBE: the server sends nothing more for it after its OK.
    ///
    /// # Errors
    /// The server's error, or a connection error.
    pub async fn unsubscribe(self) -> Result<(), ClientError> {
        let result = self
            .client
            .call(Command::Unsubscribe {
                subscription: self.id,
            })
            .await
            .map(|_| ());
        self.client.inner.subs.lock().remove(&self.id);
        result
    }
}

impl Client {
    /// Connects and performs the handshake.
    ///
    /// # Errors
    /// I/O errors, or the server's FATAL answer (for example TOO_MANY_CONNECTIONS).
    pub async fn connect(addr: impl ToSocketAddrs) -> Result<Client, ClientError> {
        Client::connect_with(addr, DEFAULT_CLIENT_IN_FLIGHT).await
    }

    /// Connects with a custom in-flight limit.
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub async fn connect_with(
        addr: impl ToSocketAddrs,
        max_in_flight: usize,
    ) -> Result<Client, ClientError> {
        let socket = TcpStream::connect(addr).await?;
        let _ = socket.set_nodelay(true);
        let (hello, tx, subs) = connection::start(socket).await?;
        Ok(Client::from_parts(hello, tx, subs, max_in_flight))
    }

    /// Connects over TLS to `host:port`, verifying the server's certificate against the
    /// CA certificates in `ca` (PEM), or the system's roots when `ca` is None. `host`
    /// must be a name or address the certificate is issued for.
    ///
    /// # Errors
    /// [`ClientError::Tls`] for configuration or handshake failures, otherwise as
    /// [`Client::connect`].
    pub async fn connect_tls(
        host: &str,
        port: u16,
        ca: Option<&std::path::Path>,
    ) -> Result<Client, ClientError> {
        let config = crate::tls::client_config(ca).map_err(ClientError::Tls)?;
        let name = rustls_pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| ClientError::Tls(format!("{host:?} is not a valid server name: {e}")))?;
        let socket = TcpStream::connect((host, port)).await?;
        let _ = socket.set_nodelay(true);
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, socket)
            .await
            .map_err(|e| {
                ClientError::Tls(format!("TLS handshake with {host}:{port} failed: {e}"))
            })?;
        let (hello, tx, subs) = connection::start(stream).await?;
        Ok(Client::from_parts(
            hello,
            tx,
            subs,
            DEFAULT_CLIENT_IN_FLIGHT,
        ))
    }

    fn from_parts(
        hello: ServerHello,
        tx: tokio::sync::mpsc::Sender<Outgoing>,
        subs: Subscriptions,
        max_in_flight: usize,
    ) -> Client {
        Client {
            inner: Arc::new(Inner {
                tx,
                subs,
                next_id: AtomicU32::new(1),
                hello,
                in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
            }),
        }
    }

    /// What the server said in the handshake.
    pub fn server_hello(&self) -> &ServerHello {
        &self.inner.hello
    }

    /// Queues a request and returns its future answer without waiting for it, so many
    /// can be in flight. Waits only while the in-flight limit is reached.
    ///
    /// # Errors
    /// [`ClientError::TooLarge`] if the frame exceeds the server's maximum, or
    /// [`ClientError::Closed`].
    pub async fn start(&self, command: Command) -> Result<PendingReply, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.start_as(id, command).await
    }

    async fn start_as(&self, id: u32, command: Command) -> Result<PendingReply, ClientError> {
        let mut frame = BytesMut::new();
        Request { id, command }.encode(&mut frame);
        let max = self.inner.hello.max_frame as usize;
        if frame.len() - 4 > max {
            return Err(ClientError::TooLarge {
                len: frame.len() - 4,
                max,
            });
        }
        let permit = self
            .inner
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ClientError::Closed)?;
        let (reply, rx) = oneshot::channel();
        let out = Outgoing {
            id,
            frame: frame.freeze(),
            reply,
            _permit: permit,
        };
        self.inner
            .tx
            .send(out)
            .await
            .map_err(|_| ClientError::Closed)?;
        Ok(PendingReply { rx })
    }

    /// Sends a request and waits for its OK payload.
    ///
    /// # Errors
    /// As [`Client::start`] and [`PendingReply::wait`].
    pub async fn call(&self, command: Command) -> Result<Bytes, ClientError> {
        Ok(self.start(command).await?.wait().await?.payload)
    }

    async fn call_json(&self, command: Command) -> Result<serde_json::Value, ClientError> {
        let payload = self.call(command).await?;
        serde_json::from_slice(&payload)
            .map_err(|e| ClientError::Protocol(format!("reply is not JSON: {e}")))
    }

    /// LOGIN; every command but PING needs it. Returns the user and grants (WHOAMI).
    ///
    /// # Errors
    /// LOGIN_FAILED, LOGIN_THROTTLED, or connection errors.
    pub async fn login(
        &self,
        user: &str,
        password: &str,
    ) -> Result<serde_json::Value, ClientError> {
        self.call_json(Command::Login {
            user: user.into(),
            password: Secret(password.into()),
        })
        .await
    }

    /// WHOAMI: the logged-in user and their grants.
    ///
    /// # Errors
    /// AUTH_REQUIRED, or connection errors.
    pub async fn whoami(&self) -> Result<serde_json::Value, ClientError> {
        self.call_json(Command::Whoami).await
    }

    /// USER_ADD: a new user without grants (admin).
    ///
    /// # Errors
    /// PERMISSION_DENIED, USER_EXISTS, INVALID_ARGUMENT, ...
    pub async fn user_add(&self, user: &str, password: &str) -> Result<(), ClientError> {
        let password = Secret(password.into());
        self.call(Command::UserAdd {
            user: user.into(),
            password,
        })
        .await
        .map(|_| ())
    }

    /// USER_DEL: delete a user and close its connections (admin).
    ///
    /// # Errors
    /// PERMISSION_DENIED, NO_SUCH_USER, LAST_ADMIN, ...
    pub async fn user_del(&self, user: &str) -> Result<(), ClientError> {
        self.call(Command::UserDel { user: user.into() })
            .await
            .map(|_| ())
    }

    /// USER_PASSWD: set a password (one's own, or anyone's as admin).
    ///
    /// # Errors
    /// PERMISSION_DENIED, NO_SUCH_USER, INVALID_ARGUMENT, ...
    pub async fn user_passwd(&self, user: &str, password: &str) -> Result<(), ClientError> {
        let password = Secret(password.into());
        self.call(Command::UserPasswd {
            user: user.into(),
            password,
        })
        .await
        .map(|_| ())
    }

    /// USER_LIST: users and their grants, never password hashes (admin).
    ///
    /// # Errors
    /// PERMISSION_DENIED, ...
    pub async fn user_list(&self) -> Result<serde_json::Value, ClientError> {
        self.call_json(Command::UserList).await
    }

    /// USER_GRANT: give `user` a permission on buckets matching `pattern` (admin).
    ///
    /// # Errors
    /// PERMISSION_DENIED, NO_SUCH_USER, INVALID_ARGUMENT, ...
    pub async fn user_grant(
        &self,
        user: &str,
        permission: &str,
        pattern: &str,
    ) -> Result<(), ClientError> {
        self.call(Command::UserGrant {
            user: user.into(),
            permission: permission.into(),
            pattern: pattern.into(),
        })
        .await
        .map(|_| ())
    }

    /// USER_REVOKE: remove a grant (admin).
    ///
    /// # Errors
    /// PERMISSION_DENIED, NO_SUCH_USER, LAST_ADMIN, INVALID_ARGUMENT, ...
    pub async fn user_revoke(
        &self,
        user: &str,
        permission: &str,
        pattern: &str,
    ) -> Result<(), ClientError> {
        self.call(Command::UserRevoke {
            user: user.into(),
            permission: permission.into(),
            pattern: pattern.into(),
        })
        .await
        .map(|_| ())
    }

    /// PING.
    ///
    /// # Errors
    /// Connection errors.
    pub async fn ping(&self) -> Result<(), ClientError> {
        self.call(Command::Ping(Bytes::new())).await.map(|_| ())
    }

    /// CREATE a bucket running `handler` with an optional JSON config.
    ///
    /// # Errors
    /// The server's error (BUCKET_EXISTS, NO_SUCH_HANDLER, HANDLER_ERROR, ...).
    pub async fn create(
        &self,
        bucket: &str,
        handler: &str,
        config: Option<&serde_json::Value>,
    ) -> Result<(), ClientError> {
        self.create_raw(bucket, handler, config, Bytes::new()).await
    }

    /// CREATE with bucket options (schedule and sinks, see PROTOCOL.md), for example
    /// `{"every": 60}` or `{"threshold": 100, "timeout": 2, "forward": "totals"}`.
    ///
    /// # Errors
    /// As [`Client::create`], and INVALID_ARGUMENT for bad options.
    pub async fn create_with(
        &self,
        bucket: &str,
        handler: &str,
        config: Option<&serde_json::Value>,
        options: &serde_json::Value,
    ) -> Result<(), ClientError> {
        let options = options.to_string().into();
        self.create_raw(bucket, handler, config, options).await
    }

    async fn create_raw(
        &self,
        bucket: &str,
        handler: &str,
        config: Option<&serde_json::Value>,
        options: Bytes,
    ) -> Result<(), ClientError> {
        let config = config.map(|c| c.to_string()).unwrap_or_default();
        self.call(Command::Create {
            bucket: bucket.into(),
            handler: handler.into(),
            config: config.into(),
            options,
        })
        .await
        .map(|_| ())
    }

    /// ALTER a bucket's options: each key of `changes` replaces that option, `null`
    /// removes it. The aggregate and the events not yet flushed are kept.
    ///
    /// # Errors
    /// The server's error (NO_SUCH_BUCKET, INVALID_ARGUMENT, PERMISSION_DENIED, ...).
    pub async fn alter(
        &self,
        bucket: &str,
        changes: &serde_json::Value,
    ) -> Result<(), ClientError> {
        self.call(Command::Alter {
            bucket: bucket.into(),
            options: changes.to_string().into(),
        })
        .await
        .map(|_| ())
    }

    /// RELOAD the server's handler files (admin): `{"handlers": [...], "warnings": [...]}`.
    ///
    /// # Errors
    /// The server's error.
    pub async fn reload(&self) -> Result<serde_json::Value, ClientError> {
        self.call_json(Command::Reload).await
    }

    /// SUBSCRIBE to a bucket's flush outputs. Outputs produced after the server's OK
    /// arrive on the returned [`Subscription`] in order.
    ///
    /// # Errors
    /// The server's error (NO_SUCH_BUCKET, PERMISSION_DENIED, LIMIT_EXCEEDED, ...).
    pub async fn subscribe(&self, bucket: &str) -> Result<Subscription, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::mpsc::channel(SUBSCRIPTION_BUFFER);
        // Registered before the request leaves: its first output can follow the OK
        // in the same read.
        self.inner.subs.lock().insert(id, tx);
        let answer = match self
            .start_as(
                id,
                Command::Subscribe {
                    bucket: bucket.into(),
                },
            )
            .await
        {
            Ok(pending) => pending.wait().await,
            Err(e) => Err(e),
        };
        if let Err(e) = answer {
            self.inner.subs.lock().remove(&id);
            return Err(e);
        }
        Ok(Subscription {
            id,
            rx,
            client: self.clone(),
        })
    }

    /// DROP a bucket.
    ///
    /// # Errors
    /// The server's error (NO_SUCH_BUCKET, ...).
    pub async fn drop_bucket(&self, bucket: &str) -> Result<(), ClientError> {
        self.call(Command::Drop {
            bucket: bucket.into(),
        })
        .await
        .map(|_| ())
    }

    /// LIST buckets: a JSON array of `{"name", "handler"}`.
    ///
    /// # Errors
    /// Connection errors.
    pub async fn list(&self) -> Result<serde_json::Value, ClientError> {
        self.call_json(Command::List).await
    }

    /// SEND events to a bucket and wait for the outcome.
    ///
    /// # Errors
    /// The server's error (NO_SUCH_BUCKET, ...). Rejected events are not an error; see
    /// [`SendOutcome::rejected`].
    pub async fn send<E: AsRef<[u8]>>(
        &self,
        bucket: &str,
        events: &[E],
    ) -> Result<SendOutcome, ClientError> {
        let pending = self.start_send(bucket, events).await?;
        decode_outcome(pending.wait().await?)
    }

    /// Queues a SEND without waiting; finish it with [`Client::finish_send`].
    ///
    /// # Errors
    /// As [`Client::start`].
    pub async fn start_send<E: AsRef<[u8]>>(
        &self,
        bucket: &str,
        events: &[E],
    ) -> Result<PendingReply, ClientError> {
        self.start(Command::Send {
            bucket: bucket.into(),
            batch: SendBatch::from_events(events),
        })
        .await
    }

    /// Waits for a SEND queued with [`Client::start_send`].
    ///
    /// # Errors
    /// As [`Client::send`].
    pub async fn finish_send(pending: PendingReply) -> Result<SendOutcome, ClientError> {
        decode_outcome(pending.wait().await?)
    }

    /// VIEW a bucket's aggregate, optionally with an argument for the handler.
    ///
    /// # Errors
    /// The server's error (NO_SUCH_BUCKET, HANDLER_ERROR, ...).
    pub async fn view(
        &self,
        bucket: &str,
        arg: Option<&[u8]>,
    ) -> Result<serde_json::Value, ClientError> {
        self.call_json(Command::View {
            bucket: bucket.into(),
            arg: arg.map(Bytes::copy_from_slice),
        })
        .await
    }

    /// DUMP a bucket: its aggregate, then reset.
    ///
    /// # Errors
    /// As [`Client::view`].
    pub async fn dump(&self, bucket: &str) -> Result<serde_json::Value, ClientError> {
        self.call_json(Command::Dump {
            bucket: bucket.into(),
        })
        .await
    }

    /// TAKE, the first phase of a two-phase dump: the bucket's pending take if it has
    /// one (the same take again), otherwise a new one made from the aggregate, which is
    /// reset. Store [`Take::output`] elsewhere, then [`Client::release`] it; until then
    /// every TAKE answers the same take, so a consumer that fails in between loses
    /// nothing.
    ///
    /// # Errors
    /// As [`Client::dump`].
    pub async fn take(&self, bucket: &str) -> Result<Take, ClientError> {
        let body = self
            .call(Command::Take {
                bucket: bucket.into(),
            })
            .await?;
        serde_json::from_slice(&body)
            .map_err(|e| ClientError::Protocol(format!("TAKE answer: {e}")))
    }

    /// RELEASE, the second phase: forget take `id`. Releasing a take that was
    /// already released succeeds again.
    ///
    /// # Errors
    /// INVALID_ARGUMENT when the bucket handed out no take `id`; as [`Client::dump`].
    pub async fn release(&self, bucket: &str, id: u64) -> Result<(), ClientError> {
        self.call(Command::Release {
            bucket: bucket.into(),
            take: id,
        })
        .await?;
        Ok(())
    }

    /// INFO for the server, or for one bucket.
    ///
    /// # Errors
    /// NO_SUCH_BUCKET, or connection errors.
    pub async fn info(&self, bucket: Option<&str>) -> Result<serde_json::Value, ClientError> {
        self.call_json(Command::Info {
            bucket: bucket.map(str::to_owned),
        })
        .await
    }
}

fn decode_outcome(response: Response) -> Result<SendOutcome, ClientError> {
    SendOutcome::decode(response.payload).map_err(|e| ClientError::Protocol(e.to_string()))
}
