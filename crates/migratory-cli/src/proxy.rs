//! `migratory proxy`: the client-side sidecar. Every plain TCP connection
//! accepted locally becomes one migratory session to the pool, so an
//! unmodified program (curl, nc, a browser) talks to a service whose server
//! end moves — as MTCP changed the client's stack, not its application.

use std::io;
use std::net::SocketAddr;

use bytes::BytesMut;
use clap::Args;
use migratory::{ClientTls, MigratoryStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
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
    /// The pool CA's certificate (PEM): sessions run over TLS 1.3 to
    /// servers whose certificates it signed (e.g. `certs/ca.pem` as
    /// `migratory certs` writes it).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "insecure_plaintext"
    )]
    ca: Option<std::path::PathBuf>,
    /// The name every server certificate of the pool carries.
    #[arg(long, value_name = "NAME", default_value = migratory::tls::DEFAULT_POOL_NAME)]
    pool_name: String,
    /// No TLS: session secrets and data cross the network in clear, and
    /// anyone who sees them can take sessions over. For a pool that runs
    /// `insecure_plaintext = true` on a network you fully trust.
    #[arg(long, conflicts_with = "ca")]
    insecure_plaintext: bool,
}

/// Runs the proxy until SIGINT or SIGTERM.
pub async fn run(args: ProxyArgs) -> Result<bool, String> {
    let tls = match &args.ca {
        Some(ca) => ClientTls::from_ca_file(ca)
            .and_then(|t| t.pool_name(&args.pool_name))
            .map_err(|e| e.to_string())?,
        None => {
            warn!("insecure plaintext: session secrets and data cross the network in clear");
            ClientTls::insecure_plaintext()
        }
    };
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
                    tokio::spawn(relay(conn, peer, args.service.clone(), tls.clone()));
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
/// half-closes included. Each direction holds a copy buffer only while
/// bytes flow (an idle relay holds none), and copies up to `RELAY_BUF` at
/// a time.
pub(crate) async fn relay(
    conn: TcpStream,
    peer: SocketAddr,
    service: Vec<SocketAddr>,
    tls: ClientTls,
) {
    let _ = conn.set_nodelay(true);
    let session = match MigratoryStream::connect(&service, &tls).await {
        Ok(s) => s,
        Err(e) => {
            // Closing the local connection is all a plain client can be told.
            warn!(%peer, error = %e, "cannot open a session: closing the connection");
            return;
        }
    };
    let id = session.session();
    info!(%peer, session = ?id, server = ?session.server(), "session opened");
    let (from_local, to_local) = conn.into_split();
    match tokio::try_join!(up(from_local, &session), down(&session, to_local)) {
        Ok((up, down)) => info!(%peer, session = ?id, up, down, "session closed"),
        Err(e) => debug!(%peer, session = ?id, error = %e, "session ended with an error"),
    }
}

/// Most bytes a relay copies at a time in each direction.
const RELAY_BUF: usize = 64 * 1024;

/// Local connection to session, until the local side closes its writing.
async fn up(from: OwnedReadHalf, mut to: &MigratoryStream) -> io::Result<u64> {
    let mut total = 0;
    loop {
        from.readable().await?;
        let mut buf = Vec::with_capacity(RELAY_BUF);
        loop {
            match from.try_read_buf(&mut buf) {
                Ok(0) => {
                    to.shutdown().await?;
                    return Ok(total);
                }
                Ok(n) => {
                    to.write_all(&buf).await?;
                    buf.clear();
                    total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Session to local connection, until the session's down stream ends.
async fn down(mut from: &MigratoryStream, mut to: OwnedWriteHalf) -> io::Result<u64> {
    let mut total = 0;
    loop {
        from.readable().await;
        let mut buf = BytesMut::with_capacity(RELAY_BUF);
        loop {
            buf.clear();
            let n = from.read_buf(&mut buf).await?;
            if n == 0 {
                to.shutdown().await?;
                return Ok(total);
            }
            to.write_all(&buf).await?;
            total += n as u64;
            if n < RELAY_BUF {
                // Drained for now: wait without the buffer.
                break;
            }
        }
    }
}
