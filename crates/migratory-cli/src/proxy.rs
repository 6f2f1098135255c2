//! `migratory proxy`: the client-side sidecar. Every plain TCP connection
//! accepted locally becomes one migratory session to the pool, so an
//! unmodified program (curl, nc, a browser) talks to a service whose server
//! end moves — as MTCP changed the client's stack, not its application.

use std::net::SocketAddr;

use clap::Args;
use migratory::MigratoryStream;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::serve::shutdown_signal;

/// Options of `migratory proxy`.
#[derive(Args, Debug)]
pub struct ProxyArgs {
    /// Where local programs connect (e.g. 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Service addresses of the pool, tried in order for each new session
    /// (comma-separated); the session then follows the servers' triggers
    /// and fails over to the pool's other servers.
    #[arg(
        long,
        value_name = "ADDR[,ADDR...]",
        value_delimiter = ',',
        required = true
    )]
    service: Vec<SocketAddr>,
}

/// Runs the proxy until SIGINT or SIGTERM.
pub async fn run(args: ProxyArgs) -> Result<bool, String> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot bind {}: {e}", args.listen))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot bind {}: {e}", args.listen))?;
    let files = crate::nofile::raise();
    info!(listen = %local, service = ?args.service, open_files = ?files, "proxy ready (open-file limit raised to the hard limit)");
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((conn, peer)) => {
                    tokio::spawn(relay(conn, peer, args.service.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            signal = &mut stop => {
                match signal {
                    Ok(name) => info!(signal = name, "stopping"),
                    Err(e) => warn!(error = %e, "cannot wait for signals: stopping"),
                }
                return Ok(true);
            }
        }
    }
}

/// Carries one local connection over one migratory session, both ways,
/// half-closes included. The only buffering is the session's own plus one
/// copy buffer per direction.
pub(crate) async fn relay(mut conn: TcpStream, peer: SocketAddr, service: Vec<SocketAddr>) {
    let _ = conn.set_nodelay(true);
    let mut session = match MigratoryStream::connect(&service).await {
        Ok(s) => s,
        Err(e) => {
            // Closing the local connection is all a plain client can be told.
            warn!(%peer, error = %e, "cannot open a session: closing the connection");
            return;
        }
    };
    let id = session.session();
    info!(%peer, session = ?id, server = ?session.server(), "session opened");
    match tokio::io::copy_bidirectional(&mut conn, &mut session).await {
        Ok((up, down)) => info!(%peer, session = ?id, up, down, "session closed"),
        Err(e) => debug!(%peer, session = ?id, error = %e, "session ended with an error"),
    }
}
