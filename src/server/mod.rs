//! The daemon: opens the database, loads handlers, starts the engine, accepts
//! connections and shuts down gracefully.

mod budget;
mod connection;
mod dispatch;
mod group;
mod listener;
mod spin;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::auth::{Auth, Permission, BOOTSTRAP_PASSWORD, BOOTSTRAP_USER};
use crate::config::Config;
use crate::engine::Engine;
use crate::script::HandlerCatalog;
use crate::store::{Store, StoreError};
use dispatch::Services;

/// Why the daemon could not start. Each renders as one line for the operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The database file could not be opened.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The users in the database could not be loaded.
    #[error("cannot load users: {0}")]
    Users(crate::error::Error),
    /// The handlers directory could not be read.
    #[error("cannot read handlers directory {dir}: {source}")]
    Handlers {
        /// The directory.
        dir: String,
        /// Why.
        source: std::io::Error,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// A thread could not be started.
    #[error("cannot start: {0}")]
    Runtime(std::io::Error),
}

/// A bound, ready daemon. [`Server::run`] serves until the shutdown future completes.
pub struct Server {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    services: Services,
    config: Config,
}

impl Server {
    /// Opens the database, loads handlers, restores stored buckets and binds the port.
    ///
    /// # Errors
    /// [`StartError`] with a one-line reason.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        // Before the database is opened, which creates it: a start refused for a bad
        // flag leaves no file behind.
        let files = Files::load(&config)?;
        let (path, segment) = (config.database.clone(), config.wal_segment);
        let store = tokio::task::spawn_blocking(move || Store::open_sized(&path, segment))
            .await
            .map_err(|e| StartError::Runtime(std::io::Error::other(e)))??;
        Server::start(config, files, store).await
    }

    /// [`Server::bind`] on a store opened by the caller (tests open one on a
    /// fault-injecting storage backend); `config.database` is then only used to place
    /// the exec directory.
    ///
    /// # Errors
    /// As [`Server::bind`].
    pub async fn bind_with_store(config: Config, store: Store) -> Result<Server, StartError> {
        let files = Files::load(&config)?;
        Server::start(config, files, store).await
    }

    async fn start(config: Config, files: Files, store: Store) -> Result<Server, StartError> {
        let Files { tls, catalog } = files;
        let store = Arc::new(store);
        let users = store.clone();
        let auth = tokio::task::spawn_blocking(move || Auth::load(users))
            .await
            .map_err(|e| StartError::Runtime(std::io::Error::other(e)))?
            .map_err(StartError::Users)?;
        if auth.default_admin_password() {
            tracing::warn!(
                "user {BOOTSTRAP_USER:?} still has the default password {BOOTSTRAP_PASSWORD:?}: \
                 change it now with `bucketly user passwd {BOOTSTRAP_USER}`"
            );
        }
        let auth = Arc::new(auth);
        let users = auth.clone();
        let may_send: crate::engine::SendCheck =
            Arc::new(move |user, bucket| users.allows(user, Permission::Send, bucket));
        let engine = Engine::new(&config, store, catalog, may_send).map_err(StartError::Runtime)?;
        let engine = Arc::new(engine);
        for problem in engine.restore().await {
            tracing::warn!("{problem}");
        }
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let spin = spin::Spin::new(config.busy_poll);
        Ok(Server {
            listener,
            tls,
            services: Services { engine, auth, spin },
            config,
        })
    }

    /// The address actually bound (useful with port 0).
    ///
    /// # Errors
    /// If the socket cannot report it.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The engine, for in-process inspection.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.services.engine
    }

    /// Serves until `shutdown` completes, then stops accepting, lets every connection
    /// answer what it has read, closes them and stops the handler threads.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let engine = self.services.engine.clone();
        let spinner = tokio::spawn(self.services.spin.clone().run(engine.clone()));
        listener::run(
            self.listener,
            self.tls,
            self.services,
            &self.config,
            shutdown,
        )
        .await;
        // Wait for the aborted task to be dropped: it holds the engine, and with it the
        // database file, which a restart in the same process must be able to open.
        spinner.abort();
        let _ = spinner.await;
        let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
    }
}

/// What a start reads from files other than the database: checked first.
struct Files {
    tls: Option<TlsAcceptor>,
    catalog: HandlerCatalog,
}

impl Files {
    fn load(config: &Config) -> Result<Files, StartError> {
        let tls = match &config.tls {
            Some(files) => {
                let tls =
                    crate::tls::server_config(&files.cert, &files.key).map_err(StartError::Tls)?;
                Some(TlsAcceptor::from(tls))
            }
            None if !config.listen.ip().is_loopback() => {
                tracing::warn!(
                    "listening on {} without TLS: passwords and events cross the network in clear \
                     (use --tls-cert and --tls-key)",
                    config.listen
                );
                None
            }
            None => None,
        };
        Ok(Files {
            tls,
            catalog: load_catalog(config)?,
        })
    }
}

fn load_catalog(config: &Config) -> Result<HandlerCatalog, StartError> {
    let dir = &config.handlers_dir;
    if !dir.is_dir() && !config.handlers_dir_required {
        tracing::info!(dir = %dir.display(), "no handlers directory; using the stock handlers");
        return Ok(HandlerCatalog::stock());
    }
    let (catalog, warnings) =
        HandlerCatalog::with_dir(dir).map_err(|source| StartError::Handlers {
            dir: dir.display().to_string(),
            source,
        })?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    Ok(catalog)
}
