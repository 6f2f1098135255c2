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
use tracing::{info, warn};

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
    if !any_answers(&args.service).await {
        warn!(
            service = ?args.service,
            "no service address answers now: sessions will fail until one does"
        );
    }
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
            warn!(%peer, error = %e, "cannot open a session: resetting the connection");
            abort(&conn);
            return;
        }
    };
    let id = session.session();
    info!(%peer, session = ?id, server = ?session.server(), "session opened");
    let (from_local, mut to_local) = conn.into_split();
    let result = tokio::try_join!(up(&from_local, &session), down(&session, &mut to_local));
    let conn = from_local
        .reunite(to_local)
        .expect("halves of one connection");
    match result {
        Ok((up, down)) => info!(%peer, session = ?id, up, down, "session closed"),
        Err(e) => {
            // A plain client cannot be told why; a reset at least tells it
            // that the stream did not end normally (a FIN would read as a
            // complete response to a length-less protocol).
            warn!(%peer, session = ?id, error = %e, "session failed: resetting the connection");
            abort(&conn);
        }
    }
}

/// Ends `conn` with a reset (SO_LINGER 0) when it is dropped.
fn abort(conn: &TcpStream) {
    let _ = socket2::SockRef::from(conn).set_linger(Some(std::time::Duration::ZERO));
}

/// Whether any of `service` accepts a TCP connection now (within a
/// second each).
pub(crate) async fn any_answers(service: &[SocketAddr]) -> bool {
    for a in service {
        let c = tokio::time::timeout(std::time::Duration::from_secs(1), TcpStream::connect(a));
        if matches!(c.await, Ok(Ok(_))) {
            return true;
        }
    }
    false
}

/// Most bytes a relay copies at a time in each direction.
const RELAY_BUF: usize = 64 * 1024;

/// Local connection to session, until the local side closes its writing.
async fn up(from: &OwnedReadHalf, mut to: &MigratoryStream) -> io::Result<u64> {
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
async fn down(mut from: &MigratoryStream, to: &mut OwnedWriteHalf) -> io::Result<u64> {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::{any_answers, relay};
    use crate::service::tests::{options, pool, TempDir, TEST_TIMEOUT};
    use crate::service::Kind;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_no_server_can_resume_resets_the_local_connection() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let dir = TempDir::new("proxy-reset");
            let pool = pool(Kind::Echo, vec![options(&dir.0, Duration::ZERO)]).await;
            assert!(any_answers(&pool.service).await);
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let (service, tls) = (pool.service.clone(), pool.tls.clone());
            tokio::spawn(async move {
                let (conn, peer) = l.accept().await.unwrap();
                relay(conn, peer, service, tls).await;
            });
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"hello").await.unwrap();
            let mut got = [0u8; 5];
            c.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"hello");
            // The pool's only server stops: no server can resume the
            // session, and the local client reads a reset, not an end.
            let service = pool.service.clone();
            drop(pool);
            let mut b = [0u8; 16];
            let r = c.read(&mut b).await;
            assert!(
                matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "{r:?}"
            );
            assert!(!any_answers(&service).await);
        })
        .await
        .expect("bounded");
    }
}
