//! `migratory proxy`: the client-side sidecar. Every plain TCP connection
//! accepted locally becomes one migratory session to the pool, so an
//! unmodified program (curl, nc, a browser) talks to a service whose server
//! end moves — as MTCP changed the client's stack, not its application.
//! Each session may follow a migration policy of its own (`--policy`), and
//! new sessions are spread over the pool's addresses (`--spread`).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes};
use clap::{Args, ValueEnum};
use migratory::proto::client::ClientConfig;
use migratory::{
    ClientTls, Liveness, LivenessConfig, Manual, MigratoryStream, Policy, Throughput,
    ThroughputConfig,
};
use rand::seq::SliceRandom;
use tokio::io::AsyncWriteExt;
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
    /// Service addresses of the pool (comma-separated), tried in the order
    /// `--spread` says for each new session; the session then follows the
    /// servers' triggers and fails over to the pool's other servers.
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
    /// In which order a new session tries the --service addresses: random
    /// (a new random order for each session, so sessions spread over the
    /// servers) or first (the order given: every session lands on the
    /// first server that answers). The proxy knows nothing of the
    /// servers' load; the pool's own balancing moves sessions afterwards.
    #[arg(long, value_enum, default_value_t = Spread::Random)]
    spread: Spread,
    /// When a session migrates on its own: manual (never: only the
    /// servers' triggers and failover move it), throughput (it leaves a
    /// server whose download slows down: MTCP thesis, section 5.3.2) or
    /// liveness (it fails over from a server that stops answering pings).
    /// See docs/policies.md.
    #[arg(long, value_enum, default_value_t = PolicyKind::Manual)]
    policy: PolicyKind,
    /// throughput: weight of the newest sample in the smoothed rate.
    #[arg(long, value_name = "ALPHA", default_value_t = 0.4)]
    throughput_alpha: f64,
    /// throughput: migrate when the smoothed rate falls to this fraction
    /// of the best smoothed rate seen on the current server.
    #[arg(long, value_name = "FRACTION", default_value_t = 0.7)]
    throughput_trigger: f64,
    /// throughput: how often the received rate is sampled.
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = humantime::parse_duration)]
    throughput_period: Duration,
    /// throughput: least time between two migrations, and after any
    /// migration before the policy asks for another.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    throughput_min_interval: Duration,
    /// throughput: a download that brings nothing for this long is idle,
    /// not slow (its samples are forgotten; no migration for idleness).
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = humantime::parse_duration)]
    throughput_idle: Duration,
    /// liveness: how often the current server is pinged while no data
    /// comes from it.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    ping_interval: Duration,
    /// liveness: how long a ping may wait for its answer.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    ping_timeout: Duration,
    /// liveness: pings unanswered in a row after which the server is
    /// declared failed and the session fails over.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    ping_misses: u32,
}

/// How new sessions pick among the service addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Spread {
    /// A random order for each session.
    Random,
    /// The order given.
    First,
}

impl Spread {
    /// The order in which a new session tries `service`.
    pub fn order(self, service: &[SocketAddr]) -> Vec<SocketAddr> {
        let mut v = service.to_vec();
        if self == Spread::Random {
            v.shuffle(&mut rand::thread_rng());
        }
        v
    }
}

/// The migration policy of each session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PolicyKind {
    /// Never migrates on its own.
    Manual,
    /// Leaves a server whose download slows down.
    Throughput,
    /// Fails over from a server that stops answering pings.
    Liveness,
}

/// One session's policy, as the options say (checked once at start).
#[derive(Clone, Debug)]
pub(crate) enum PolicySpec {
    Manual,
    Throughput(ThroughputConfig),
    Liveness(LivenessConfig),
}

impl PolicySpec {
    fn of(a: &ProxyArgs) -> Result<Self, String> {
        Ok(match a.policy {
            PolicyKind::Manual => PolicySpec::Manual,
            PolicyKind::Throughput => {
                let c = ThroughputConfig {
                    alpha: a.throughput_alpha,
                    trigger: a.throughput_trigger,
                    period: a.throughput_period,
                    min_interval: a.throughput_min_interval,
                    idle: a.throughput_idle,
                    ..ThroughputConfig::default()
                };
                c.validate()
                    .map_err(|e| format!("--policy throughput: {e}"))?;
                PolicySpec::Throughput(c)
            }
            PolicyKind::Liveness => {
                let c = LivenessConfig {
                    interval: a.ping_interval,
                    timeout: a.ping_timeout,
                    misses: a.ping_misses,
                };
                c.validate()
                    .map_err(|e| format!("--policy liveness: {e}"))?;
                PolicySpec::Liveness(c)
            }
        })
    }

    /// A new session's policy.
    pub(crate) fn build(&self) -> Box<dyn Policy> {
        match self {
            PolicySpec::Manual => Box::new(Manual),
            PolicySpec::Throughput(c) => Box::new(Throughput::new(c.clone())),
            PolicySpec::Liveness(c) => Box::new(Liveness::new(c.clone())),
        }
    }
}

/// Runs the proxy until SIGINT or SIGTERM.
pub async fn run(args: ProxyArgs) -> Result<bool, String> {
    let policy = PolicySpec::of(&args)?;
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
            service = %addr_list(&args.service),
            "no service address answers now: sessions will fail until one does"
        );
    }
    let files = crate::nofile::raise();
    info!(
        listen = %local,
        service = %addr_list(&args.service),
        spread = ?args.spread,
        policy = ?policy,
        open_files = ?files,
        "proxy ready (open-file limit raised to the hard limit)"
    );
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((conn, peer)) => {
                    let service = args.spread.order(&args.service);
                    tokio::spawn(relay_with(conn, peer, service, tls.clone(), policy.build()));
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
/// half-closes included, without copies of its own: the up direction reads
/// the local socket into the session's send buffer, the down direction
/// writes the session's payloads as they were received. An idle relay
/// holds no buffer.
pub(crate) async fn relay(
    conn: TcpStream,
    peer: SocketAddr,
    service: Vec<SocketAddr>,
    tls: ClientTls,
) {
    relay_with(conn, peer, service, tls, Box::new(Manual)).await
}

/// [`relay`], the session trying `service` in this order and migrating as
/// `policy` says.
pub(crate) async fn relay_with(
    conn: TcpStream,
    peer: SocketAddr,
    service: Vec<SocketAddr>,
    tls: ClientTls,
    policy: Box<dyn Policy>,
) {
    let _ = conn.set_nodelay(true);
    let session = MigratoryStream::connect_with(ClientConfig::default(), &tls, policy, &service);
    let session = match session.await {
        Ok(s) => s,
        Err(e) => {
            warn!(%peer, error = %e, "cannot open a session: resetting the connection");
            abort(&conn);
            return;
        }
    };
    let id = session
        .session()
        .map_or_else(|| "-".to_string(), |s| s.to_string());
    let server = session
        .server()
        .map_or_else(|| "-".to_string(), |s| s.to_string());
    info!(%peer, session = %id, %server, "session opened");
    let (from_local, mut to_local) = conn.into_split();
    let result = tokio::try_join!(up(&from_local, &session), down(&session, &mut to_local));
    let conn = from_local
        .reunite(to_local)
        .expect("halves of one connection");
    match result {
        Ok((up, down)) => info!(%peer, session = %id, up, down, "session closed"),
        Err(e) => {
            // A plain client cannot be told why; a reset at least tells it
            // that the stream did not end normally (a FIN would read as a
            // complete response to a length-less protocol).
            warn!(%peer, session = %id, error = %e, "session failed: resetting the connection");
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

/// Local connection to session, until the local side closes its writing.
/// The socket reads straight into the session's send buffer: no buffer of
/// our own, no copy.
async fn up(from: &OwnedReadHalf, mut to: &MigratoryStream) -> io::Result<u64> {
    let mut total = 0;
    loop {
        from.readable().await?;
        loop {
            match to.write_with(|buf| from.try_read_buf(buf)).await {
                Ok(0) => {
                    to.shutdown().await?;
                    return Ok(total);
                }
                Ok(n) => total += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Most chunks the down relay takes from the session at a time (each one
/// Data frame's payload as it arrived, 16 KiB by default).
const RELAY_CHUNKS: usize = 8;

/// Session to local connection, until the session's down stream ends. The
/// session's received payloads go to the socket as they are, in one
/// vectored write, without a copy of our own.
async fn down(from: &MigratoryStream, to: &mut OwnedWriteHalf) -> io::Result<u64> {
    let mut total = 0;
    let mut chunks: [Bytes; RELAY_CHUNKS] = Default::default();
    loop {
        let Some(k) = from.read_chunks(&mut chunks).await? else {
            to.shutdown().await?;
            return Ok(total);
        };
        total += write_chunks(to, &mut chunks[..k]).await?;
    }
}

/// Writes every byte of `chunks` and lets go of them (so the buffers they
/// share are free again); returns how many bytes.
async fn write_chunks(to: &mut OwnedWriteHalf, chunks: &mut [Bytes]) -> io::Result<u64> {
    let total = chunks.iter().map(|c| c.len() as u64).sum();
    let mut i = 0;
    while i < chunks.len() {
        let slices: [io::IoSlice<'_>; RELAY_CHUNKS] =
            std::array::from_fn(|j| io::IoSlice::new(chunks.get(i + j).map_or(&[], |c| &c[..])));
        let mut n = to.write_vectored(&slices[..chunks.len() - i]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let k = n.min(chunks[i].len());
            chunks[i].advance(k);
            n -= k;
            if chunks[i].is_empty() {
                // An empty slice still shares its buffer.
                chunks[i] = Bytes::new();
                i += 1;
            }
        }
    }
    Ok(total)
}

/// `a,b,c`: addresses as a user typed them.
fn addr_list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use clap::Parser;
    use migratory::{LivenessConfig, ThroughputConfig};

    use super::{any_answers, relay, relay_with, PolicySpec, ProxyArgs, Spread};
    use migratory_services::testing::{options, pattern, pool, TempDir, TEST_TIMEOUT};
    use migratory_services::Kind;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        proxy: ProxyArgs,
    }

    fn parse(extra: &[&str]) -> Result<ProxyArgs, clap::Error> {
        let base = [
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--service",
            "127.0.0.1:1,127.0.0.1:2",
            "--insecure-plaintext",
        ];
        Cli::try_parse_from(base.iter().chain(extra)).map(|c| c.proxy)
    }

    #[test]
    fn the_flags_default_to_the_policies_defaults() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.spread, Spread::Random);
        assert!(matches!(PolicySpec::of(&a), Ok(PolicySpec::Manual)));
        let a = parse(&["--policy", "throughput"]).unwrap();
        let Ok(PolicySpec::Throughput(c)) = PolicySpec::of(&a) else {
            panic!("throughput");
        };
        assert_eq!(c, ThroughputConfig::default());
        let a = parse(&["--policy", "liveness"]).unwrap();
        let Ok(PolicySpec::Liveness(c)) = PolicySpec::of(&a) else {
            panic!("liveness");
        };
        assert_eq!(c, LivenessConfig::default());
        let a = parse(&[
            "--policy",
            "liveness",
            "--ping-interval",
            "300ms",
            "--ping-misses",
            "5",
            "--spread",
            "first",
        ])
        .unwrap();
        assert_eq!(a.spread, Spread::First);
        let Ok(PolicySpec::Liveness(c)) = PolicySpec::of(&a) else {
            panic!("liveness");
        };
        assert_eq!((c.interval, c.misses), (Duration::from_millis(300), 5));
        // Out of range: one clear error at start.
        let a = parse(&["--policy", "throughput", "--throughput-trigger", "1.5"]).unwrap();
        assert!(PolicySpec::of(&a).unwrap_err().contains("trigger"));
        assert!(parse(&["--spread", "least-loaded"]).is_err());
    }

    #[test]
    fn first_keeps_the_order_and_random_permutes_it() {
        let service: Vec<std::net::SocketAddr> = (1..=5)
            .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p)))
            .collect();
        assert_eq!(Spread::First.order(&service), service);
        let mut orders = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut o = Spread::Random.order(&service);
            orders.insert(o.clone());
            o.sort();
            assert_eq!(o, service, "a permutation");
        }
        // 50 draws of 120 orders: all the same has odds 120^-49.
        assert!(orders.len() > 1);
    }

    /// Opens `n` sessions through a relay whose order of the pool's
    /// addresses is `spread`'s, checks an echo on each, and returns how many
    /// sessions each server holds.
    async fn sessions_per_server(spread: Spread, n: usize) -> Vec<usize> {
        let dir = TempDir::new("proxy-spread");
        let pool = pool(
            Kind::Echo,
            (0..3).map(|_| options(&dir.0, Duration::ZERO)).collect(),
        )
        .await;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (service, tls) = (pool.service.clone(), pool.tls.clone());
        tokio::spawn(async move {
            while let Ok((conn, peer)) = l.accept().await {
                let order = spread.order(&service);
                let policy = PolicySpec::Manual.build();
                tokio::spawn(relay_with(conn, peer, order, tls.clone(), policy));
            }
        });
        let mut conns = Vec::new();
        for i in 0..n {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let msg = pattern(1000 + i, i as u8);
            c.write_all(&msg).await.unwrap();
            let mut got = vec![0u8; msg.len()];
            c.read_exact(&mut got).await.unwrap();
            assert_eq!(got, msg);
            conns.push(c);
        }
        let counts = pool.handles.iter().map(|h| h.sessions().len()).collect();
        drop(conns);
        counts
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_sessions_spread_over_the_pool() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let first = sessions_per_server(Spread::First, 6).await;
            assert_eq!(first, [6, 0, 0]);
            // 12 sessions on one of 3 servers by chance: odds 3^-11.
            let random = sessions_per_server(Spread::Random, 12).await;
            assert_eq!(random.iter().sum::<usize>(), 12);
            assert!(random.iter().filter(|n| **n > 0).count() >= 2, "{random:?}");
        })
        .await
        .expect("bounded");
    }

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
