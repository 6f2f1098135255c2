//! A pool of in-process servers serving a built-in service, for the
//! services' tests and those of other crates (feature `testing`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use migratory::proto::config::Limits;
use migratory::{ClientTls, Peer, Server, ServerBuilder, ServerHandle};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{serve, Kind, Options};

/// The runtime tests' helpers (free loopback addresses, the test pool's
/// certificates).
#[path = "../../migratory/tests/common/mod.rs"]
mod common;

const KEY: &[u8] = b"service test cluster key 0123456789";

/// Bound on every test.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(90);

/// Servers `s1..sn` serving one kind of service; each server may have
/// its own options. Errors of the services (not migrations) are kept.
/// Dropping the pool stops its servers.
pub struct Pool {
    /// The servers' service addresses, `s1` first.
    pub service: Vec<SocketAddr>,
    /// The errors the services returned so far.
    pub errors: Arc<Mutex<Vec<String>>>,
    /// The servers' handles, `s1` first.
    pub handles: Vec<ServerHandle>,
    tasks: Vec<JoinHandle<()>>,
    /// What a client of the pool trusts.
    pub tls: ClientTls,
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
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    /// Waits (bounded) until a service returned an error.
    pub async fn wait_error(&self) -> Vec<String> {
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

/// The options of a server that never drains.
pub fn options(root: &Path, counter_interval: Duration) -> Arc<Options> {
    Arc::new(Options {
        root: root.to_path_buf(),
        counter_interval,
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        draining: Options::never_draining(),
    })
}

/// The options of a server that drains when the returned sender says
/// `true`.
pub fn draining_options(
    root: &Path,
    counter_interval: Duration,
) -> (Arc<Options>, watch::Sender<bool>) {
    let (tx, rx) = watch::channel(false);
    let mut o = Arc::unwrap_or_clone(options(root, counter_interval));
    o.draining = rx;
    (Arc::new(o), tx)
}

/// Binds `opts.len()` servers that are each other's peers. Their send
/// buffers are small, so a migration usually finds the service in the
/// middle of what it writes.
pub async fn pool(kind: Kind, opts: Vec<Arc<Options>>) -> Pool {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let n = opts.len();
    let service = common::free_addrs(n);
    let control = common::free_addrs(n);
    let name = |i: usize| format!("s{}", i + 1);
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut handles = Vec::new();
    let mut tasks = Vec::new();
    for (i, o) in opts.into_iter().enumerate() {
        let mut b = ServerBuilder::new(name(i));
        b.tls(common::server_tls(&name(i)));
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
        tls: common::client_tls(),
    }
}

/// A fresh directory under the system's temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Makes the directory; `tag` goes into its name.
    pub fn new(tag: &str) -> Self {
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
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2654435761) >> 13) as u8 ^ seed)
        .collect()
}
