//! From a decoded request to its answer: login state, the permission each command
//! needs, and the engine or auth call that serves it. Permission is checked before the
//! bucket is looked up, so a user learns nothing about buckets they may not use.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::auth::{Auth, Permission, Session};
use crate::engine::{
    requested_sinks, BucketMsg, Engine, PushSink, Subscriber, MAX_SUBSCRIPTIONS_PER_CONNECTION,
};
use crate::error::Error;
use crate::protocol::{Command, Request, Response};

/// What every connection serves requests from.
#[derive(Clone)]
pub(crate) struct Services {
    pub engine: Arc<Engine>,
    pub auth: Arc<Auth>,
    pub spin: Arc<super::spin::Spin>,
}

/// A connection's state as requests see it.
pub(crate) struct ConnState {
    /// Set by a successful LOGIN.
    pub session: Option<Session>,
    /// Where this connection's subscriptions deliver.
    pub sink: PushSink,
    /// Subscription id (the SUBSCRIBE request id) → bucket.
    pub subscriptions: HashMap<u32, String>,
}

/// An answer owed to the client, in request order.
pub(crate) enum Pending {
    Ready(Response),
    Waiting {
        id: u32,
        rx: oneshot::Receiver<Response>,
    },
    /// The answer to SUBSCRIBE: once it is written (if OK), the subscription's pushes
    /// may follow it.
    Subscribed {
        id: u32,
        rx: oneshot::Receiver<Response>,
    },
    /// The answers to consecutive SEND frames posted as one message, in order.
    WaitingMany {
        ids: Vec<u32>,
        rx: oneshot::Receiver<crate::engine::EncodedAnswers>,
    },
    /// Several answers known at once, in order.
    ReadyMany(Vec<Response>),
    /// SEND answers known at once, encoded (neither FATAL nor SUBSCRIBE).
    Encoded(crate::engine::EncodedAnswers),
    /// The answer to UNSUBSCRIBE: from it on, no push of `sub` is written.
    Unsubscribed {
        id: u32,
        sub: u32,
    },
}

fn json(id: u32, value: &serde_json::Value) -> Result<Pending, Error> {
    let payload = serde_json::to_vec(value).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Pending::Ready(Response::ok(id, payload.into())))
}

fn empty(id: u32) -> Result<Pending, Error> {
    Ok(Pending::Ready(Response::empty(id)))
}

/// The permissions an options object needs beyond `create`: `send` on the forward
/// target, `admin` for an exec command.
fn check_sinks(s: &Session, options: &[u8]) -> Result<(), Error> {
    let (forward, exec) = requested_sinks(options);
    if exec {
        s.check(Permission::Admin, None)?;
    }
    if let Some(target) = forward {
        s.check(Permission::Send, Some(&target))?;
    }
    Ok(())
}

impl Services {
    /// Serves one request for a connection whose login state is `session`.
    ///
    /// # Errors
    /// The request's error, to be answered with its code.
    pub async fn dispatch(
        &self,
        conn: &mut ConnState,
        peer: IpAddr,
        request: Request,
    ) -> Result<Pending, Error> {
        let session = &mut conn.session;
        let id = request.id;
        let (engine, auth) = (&self.engine, &self.auth);
        let command = match (request.command, session.as_ref()) {
            (Command::Ping(payload), _) => return Ok(Pending::Ready(Response::ok(id, payload))),
            (Command::Login { user, password }, _) => {
                let s = auth.login(&user, password.expose(), peer).await?;
                let who = s.whoami();
                *session = Some(s);
                return json(id, &who);
            }
            (_, None) => return Err(Error::AuthRequired),
            (command, Some(_)) => command,
        };
        let Some(s) = session.as_ref() else {
            return Err(Error::AuthRequired);
        };
        let (bucket, msg) = match command {
            Command::Ping(_) | Command::Login { .. } => {
                return Err(Error::Internal("handled above".into()))
            }
            Command::Whoami => return json(id, &s.whoami()),
            Command::List => {
                let rows = engine.list_json(|b| s.sees(b));
                return Ok(Pending::Ready(Response::ok(id, rows.into())));
            }
            Command::Info { bucket: None } => {
                let mut info = engine.info(None)?;
                info["default_admin_password"] = auth.default_admin_password().into();
                return json(id, &info);
            }
            Command::Info { bucket: Some(b) } => {
                s.check(Permission::View, Some(&b))?;
                return json(id, &engine.info(Some(&b))?);
            }
            // CREATE and DROP finish before the next request is read, so a pipelined
            // SEND after CREATE finds the bucket.
            Command::Create {
                bucket,
                handler,
                config,
                options,
            } => {
                s.check(Permission::Create, Some(&bucket))?;
                check_sinks(s, &options)?;
                engine
                    .create(&bucket, &handler, &config, &options, s.user())
                    .await?;
                return empty(id);
            }
            Command::Alter { bucket, options } => {
                s.check(Permission::Create, Some(&bucket))?;
                check_sinks(s, &options)?;
                let options = engine.altered_options(&bucket, &options)?;
                engine.alter(&bucket, options).await?;
                return empty(id);
            }
            Command::Reload => {
                s.check(Permission::Admin, None)?;
                return json(id, &engine.reload()?);
            }
            Command::Subscribe { bucket } => {
                s.check(Permission::Subscribe, Some(&bucket))?;
                let handle = engine.bucket(&bucket)?;
                if conn.subscriptions.contains_key(&id) {
                    return Err(Error::InvalidArgument(format!(
                        "request id {id} is already a subscription on this connection"
                    )));
                }
                if conn.subscriptions.len() >= MAX_SUBSCRIPTIONS_PER_CONNECTION {
                    return Err(Error::LimitExceeded(format!(
                        "a connection may hold at most {MAX_SUBSCRIPTIONS_PER_CONNECTION} subscriptions"
                    )));
                }
                let subscriber = Subscriber {
                    sink: conn.sink.clone(),
                    sub: id,
                    allowed: s.still_allows(Permission::Subscribe, &bucket),
                };
                let (reply, rx) = oneshot::channel();
                handle
                    .post(BucketMsg::Subscribe {
                        id,
                        subscriber,
                        reply,
                    })
                    .await?;
                conn.subscriptions.insert(id, bucket);
                return Ok(Pending::Subscribed { id, rx });
            }
            Command::Unsubscribe { subscription } => {
                let Some(bucket) = conn.subscriptions.remove(&subscription) else {
                    return Err(Error::InvalidArgument(format!(
                        "no subscription {subscription} on this connection"
                    )));
                };
                if let Ok(handle) = engine.bucket(&bucket) {
                    let key = conn.sink.key();
                    let _ = handle
                        .post(BucketMsg::Unsubscribe {
                            key,
                            sub: subscription,
                        })
                        .await;
                }
                return Ok(Pending::Unsubscribed {
                    id,
                    sub: subscription,
                });
            }
            Command::Drop { bucket } => {
                s.check(Permission::Create, Some(&bucket))?;
                engine.drop_bucket(&bucket).await?;
                return empty(id);
            }
            Command::UserAdd { user, password } => {
                auth.add_user(s, &user, password.expose()).await?;
                return empty(id);
            }
            Command::UserDel { user } => {
                auth.delete_user(s, &user).await?;
                return empty(id);
            }
            Command::UserPasswd { user, password } => {
                auth.set_password(s, &user, password.expose()).await?;
                return empty(id);
            }
            Command::UserList => return json(id, &auth.list(s)?),
            Command::UserGrant {
                user,
                permission,
                pattern,
            } => {
                auth.grant(s, &user, &permission, &pattern).await?;
                return empty(id);
            }
            Command::UserRevoke {
                user,
                permission,
                pattern,
            } => {
                auth.revoke(s, &user, &permission, &pattern).await?;
                return empty(id);
            }
            // The connection routes SENDs itself, gathering consecutive ones
            // (`server::connection`), so that permission check and post live there.
            Command::Send { .. } => {
                return Err(Error::Internal("SEND is routed by the connection".into()))
            }
            Command::View { bucket, arg } => {
                s.check(Permission::View, Some(&bucket))?;
                (bucket, Msg::View(arg))
            }
            Command::Dump { bucket } => {
                s.check(Permission::Dump, Some(&bucket))?;
                (bucket, Msg::Dump)
            }
            Command::Take { bucket } => {
                s.check(Permission::Dump, Some(&bucket))?;
                (bucket, Msg::Take)
            }
            Command::Release { bucket, take } => {
                s.check(Permission::Dump, Some(&bucket))?;
                (bucket, Msg::Release(take))
            }
        };
        let handle = engine.bucket(&bucket)?;
        let (reply, rx) = oneshot::channel();
        let msg = match msg {
            Msg::View(arg) => BucketMsg::View { id, arg, reply },
            Msg::Dump => BucketMsg::Dump { id, reply },
            Msg::Take => BucketMsg::Take { id, reply },
            Msg::Release(take) => BucketMsg::Release { id, take, reply },
        };
        handle.post(msg).await?;
        Ok(Pending::Waiting { id, rx })
    }
}

enum Msg {
    View(Option<Bytes>),
    Dump,
    Take,
    Release(u64),
}
