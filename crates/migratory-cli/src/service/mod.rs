//! The built-in services of `migratory serve`: a static HTTP/1.1 file
//! server, an echo server and MIGSOCK's count server.
//!
//! Every service follows MTCP's contract (DESIGN.md 3.4): it snapshots its
//! per-connection state with [`migratory::Session::snapshot`] at points
//! where that state, together with the up stream from the first byte not yet
//! read and the down stream from the first byte not yet written, lets a
//! fresh process continue exactly as this one would. A server that resumes
//! the session gets [`migratory::Arrival::Migrated`] with the last snapshot
//! and carries on from it. For a plain TCP client snapshots are no-ops and
//! the same code serves it.

mod counter;
mod echo;
mod http;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use migratory::{Arrival, Session};
use tracing::debug;

/// Which built-in service a server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// HTTP/1.1 static files (GET, HEAD, keep-alive, single byte ranges).
    Http,
    /// Writes back every byte it reads.
    Echo,
    /// MIGSOCK's count server: "1\n2\n3\n..." until the client closes.
    Counter,
}

/// Options of the built-in services.
#[derive(Debug, Clone)]
pub struct Options {
    /// http: the directory served.
    pub root: PathBuf,
    /// counter: the pause between two numbers (zero: as fast as the
    /// session takes them).
    pub counter_interval: Duration,
    /// http: how long a request head may take to arrive, from the
    /// connection's start or its first byte (then 408 and close).
    pub header_timeout: Duration,
    /// http: how long a kept-alive connection may sit between requests.
    pub idle_timeout: Duration,
}

/// Serves one session (new, migrated, or plain TCP) until it ends or moves
/// away. Returns `Ok(())` also when the session migrated away
/// ([`migratory::is_migrated`]): that is not an error.
pub async fn serve(
    kind: Kind,
    mut session: Session,
    arrival: Arrival,
    opts: Arc<Options>,
) -> io::Result<()> {
    let how = match &arrival {
        Arrival::New => "new".to_string(),
        Arrival::Migrated { state } => format!("migrated with a {}-byte state", state.len()),
        Arrival::Plain => "plain TCP".to_string(),
    };
    debug!(service = ?kind, session = ?session.id(), arrival = %how, "serving a session");
    let result = match kind {
        Kind::Http => http::serve(&mut session, arrival, &opts).await,
        Kind::Echo => echo::serve(&mut session, arrival).await,
        Kind::Counter => counter::serve(&mut session, arrival, opts.counter_interval).await,
    };
    match result {
        Err(e) if migratory::is_migrated(&e) => {
            debug!(service = ?kind, session = ?session.id(), "session migrated away");
            Ok(())
        }
        r => r,
    }
}

/// Records `state` as the session's restart point.
fn snapshot(session: &Session, state: &[u8]) -> io::Result<()> {
    session.snapshot(state).map_err(io::Error::from)
}

/// An `InvalidData` error (bad snapshot state).
fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The runtime tests' helpers (free loopback addresses).
#[cfg(test)]
#[path = "../../../migratory/tests/common/mod.rs"]
mod test_common;

/// A pool of in-process servers for the services' tests.
#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use migratory::proto::config::Limits;
    use migratory::{ClientTls, Peer, PoolCerts, Server, ServerBuilder, ServerHandle};
    use tokio::task::JoinHandle;

    use super::{serve, Kind, Options};

    use super::test_common::free_addrs;

    const KEY: &[u8] = b"service test cluster key 0123456789";

    /// Bound on every test.
    pub(crate) const TEST_TIMEOUT: Duration = Duration::from_secs(90);

    /// Servers `s1..sn` serving one kind of service; each server may have
    /// its own options. Errors of the services (not migrations) are kept.
    pub(crate) struct Pool {
        pub(crate) service: Vec<SocketAddr>,
        pub(crate) errors: Arc<Mutex<Vec<String>>>,
        #[allow(dead_code)]
        pub(crate) handles: Vec<ServerHandle>,
        tasks: Vec<JoinHandle<()>>,
        /// What a client of the pool trusts.
        pub(crate) tls: ClientTls,
    }

    /// The test pool's CA and certificates, made once per test binary.
    fn certs() -> &'static PoolCerts {
        static CERTS: std::sync::OnceLock<PoolCerts> = std::sync::OnceLock::new();
        CERTS.get_or_init(|| PoolCerts::generate(migratory::tls::DEFAULT_POOL_NAME).unwrap())
    }

    impl Drop for Pool {
        fn drop(&mut self) {
            for t in &self.tasks {
                t.abort();
            }
        }
    }

    impl Pool {
        /// The errors the services returned so far.
        pub(crate) fn errors(&self) -> Vec<String> {
            self.errors.lock().unwrap().clone()
        }

        /// Waits (bounded) until a service returned an error.
        pub(crate) async fn wait_error(&self) -> Vec<String> {
            for _ in 0..500 {
                let e = self.errors();
                if !e.is_empty() {
                    return e;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Vec::new()
        }
    }

    /// The options of every server.
    pub(crate) fn options(root: &Path, counter_interval: Duration) -> Arc<Options> {
        Arc::new(Options {
            root: root.to_path_buf(),
            counter_interval,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        })
    }

    /// Binds `opts.len()` servers that are each other's peers. Their send
    /// buffers are small, so a migration usually finds the service in the
    /// middle of what it writes.
    pub(crate) async fn pool(kind: Kind, opts: Vec<Arc<Options>>) -> Pool {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let n = opts.len();
        let service = free_addrs(n);
        let control = free_addrs(n);
        let name = |i: usize| format!("s{}", i + 1);
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut handles = Vec::new();
        let mut tasks = Vec::new();
        for (i, o) in opts.into_iter().enumerate() {
            let mut b = ServerBuilder::new(name(i));
            b.tls(certs().server_tls(&name(i)).unwrap());
            let limits = Limits {
                send_buffer: 256 * 1024,
                ..Limits::default()
            };
            b.service(service[i])
                .control(control[i])
                .cluster_key(KEY)
                .limits(limits);
            for j in (0..n).filter(|j| *j != i) {
                b.peer(Peer {
                    id: name(j),
                    service: service[j],
                    control: control[j],
                });
            }
            let mut server: Server = b.bind().await.expect("bind");
            handles.push(server.handle());
            let errors = errors.clone();
            tasks.push(tokio::spawn(async move {
                while let Some((s, arrival)) = server.accept().await {
                    let (o, errors) = (o.clone(), errors.clone());
                    tokio::spawn(async move {
                        if let Err(e) = serve(kind, s, arrival, o).await {
                            errors.lock().unwrap().push(e.to_string());
                        }
                    });
                }
            }));
        }
        Pool {
            service,
            errors,
            handles,
            tasks,
            tls: certs().client_tls().unwrap(),
        }
    }

    /// A fresh directory under the system's temp dir, removed on drop.
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "migratory-service-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Deterministic test bytes.
    pub(crate) fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| ((i as u64).wrapping_mul(2654435761) >> 13) as u8 ^ seed)
            .collect()
    }

    #[test]
    fn kinds_parse_from_the_command_line() {
        use clap::ValueEnum;
        assert_eq!(Kind::from_str("http", false), Ok(Kind::Http));
        assert_eq!(Kind::from_str("echo", false), Ok(Kind::Echo));
        assert_eq!(Kind::from_str("counter", false), Ok(Kind::Counter));
        assert!(Kind::from_str("ftp", false).is_err());
    }
}
