//! The accept loop: connection limit, and the shutdown sequence.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, HANDSHAKE_TIMEOUT_SECS, SHUTDOWN_GRACE_SECS};
use crate::protocol::{ErrorCode, Response};

use super::connection::{self, CloseReason, Limits};
use super::dispatch::Services;

pub(crate) async fn run(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    services: Services,
    config: &Config,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let limits = Limits::from(config);
    let engine = services.engine.clone();
    tokio::pin!(shutdown);
    loop {
        let (socket, peer) = tokio::select! {
            _ = &mut shutdown => break,
            // Reap finished connection tasks so the set stays as large as the open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = socket.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            engine
                .stats
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "refusing connection: at the limit of {} connections", config.max_connections);
            tokio::spawn(refuse(socket, tls.clone(), config.max_connections));
            continue;
        };
        let (services, stop_rx, tls) = (services.clone(), stop_rx.clone(), tls.clone());
        connections.spawn(async move {
            let engine = services.engine.clone();
            engine.stats.connections.fetch_add(1, Ordering::Relaxed);
            engine
                .stats
                .connections_total
                .fetch_add(1, Ordering::Relaxed);
            let reason = match tls {
                None => connection::serve(socket, peer.ip(), services, limits, stop_rx).await,
                Some(tls) => match tls_accept(&tls, socket).await {
                    Ok(stream) => {
                        connection::serve(stream, peer.ip(), services, limits, stop_rx).await
                    }
                    Err(e) => CloseReason::Tls(e),
                },
            };
            tracing::debug!(%peer, "connection closed: {reason}");
            engine.stats.connections.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!("shutting down: no new connections; draining open ones");
    let _ = stop_tx.send(true);
    let grace = Duration::from_secs(SHUTDOWN_GRACE_SECS);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            "{} connections still open after {SHUTDOWN_GRACE_SECS}s; closing them",
            connections.len()
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

/// The TLS handshake, within the protocol handshake's time limit.
async fn tls_accept(
    tls: &TlsAcceptor,
    socket: TcpStream,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, String> {
    let limit = Duration::from_secs(HANDSHAKE_TIMEOUT_SECS);
    match tokio::time::timeout(limit, tls.accept(socket)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no TLS handshake within {HANDSHAKE_TIMEOUT_SECS}s")),
    }
}

/// Tells a client over the limit why (over TLS if the port speaks TLS), then closes.
async fn refuse(socket: TcpStream, tls: Option<TlsAcceptor>, max: usize) {
    let msg = format!("the server is at its limit of {max} connections; try again later");
    let last = Response::error(0, ErrorCode::TooManyConnections, &msg);
    match tls {
        None => connection::close_with(socket, last).await,
        Some(tls) => {
            if let Ok(stream) = tls_accept(&tls, socket).await {
                connection::close_with(stream, last).await;
            }
        }
    }
}
