//! From a decoded request to its answer: login state, the permission each command
//! needs, and the engine or auth call that serves it. Permission is checked before the
//! bucket is looked up, so a user learns nothing about buckets they may not use.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::auth::{Auth, Permission, Session};
use crate::engine::{BucketMsg, Engine};
use crate::error::Error;
use crate::protocol::{Command, Request, Response};

/// What every connection serves requests from.
#[derive(Clone)]
pub(crate) struct Services {
    pub engine: Arc<Engine>,
    pub auth: Arc<Auth>,
}

/// An answer owed to the client, in request order.
pub(crate) enum Pending {
    Ready(Response),
    Waiting {
        id: u32,
        rx: oneshot::Receiver<Response>,
    },
}

fn json(id: u32, value: &serde_json::Value) -> Result<Pending, Error> {
    let payload = serde_json::to_vec(value).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Pending::Ready(Response::ok(id, payload.into())))
}

fn empty(id: u32) -> Result<Pending, Error> {
    Ok(Pending::Ready(Response::empty(id)))
}

impl Services {
    /// Serves one request for a connection whose login state is `session`.
    ///
    /// # Errors
    /// The request's error, to be answered with its code.
    pub async fn dispatch(
        &self,
        session: &mut Option<Session>,
        peer: IpAddr,
        request: Request,
    ) -> Result<Pending, Error> {
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
                engine.create(&bucket, &handler, &config, &options).await?;
                return empty(id);
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
            Command::Send { bucket, batch } => {
                s.check(Permission::Send, Some(&bucket))?;
                (bucket, Msg::Send(batch))
            }
            Command::View { bucket, arg } => {
                s.check(Permission::View, Some(&bucket))?;
                (bucket, Msg::View(arg))
            }
            Command::Dump { bucket } => {
                s.check(Permission::Dump, Some(&bucket))?;
                (bucket, Msg::Dump)
            }
        };
        let handle = engine.bucket(&bucket)?;
        let (reply, rx) = oneshot::channel();
        let msg = match msg {
            Msg::Send(batch) => BucketMsg::Send { id, batch, reply },
            Msg::View(arg) => BucketMsg::View { id, arg, reply },
            Msg::Dump => BucketMsg::Dump { id, reply },
        };
        handle.post(msg).await?;
        Ok(Pending::Waiting { id, rx })
    }
}

enum Msg {
    Send(crate::protocol::SendBatch),
    View(Option<Bytes>),
    Dump,
}
