//! `migratory bench throughput | rtt | migrate`: migratory sessions against
//! the raw tokio TCP they ride on, both measured in the same process and
//! the same run, on loopback. Each prints the baseline, the session and
//! their ratio; `--json` prints one JSON object instead.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use migratory::proto::server::BalanceConfig;
use migratory::{
    Arrival, ClientTls, MigrationPhases, MigrationTimes, MigratoryStream, PoolCerts, ServerBuilder,
    ServerHandle, ServerTls, Session,
};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::bench::median;

const KEY: &[u8] = b"migratory bench cluster key, loopback only";

/// Options of `migratory bench throughput`.
#[derive(Args, Debug)]
pub struct ThroughputArgs {
    /// Concurrent streams.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    streams: u32,
    /// Bytes each stream carries, e.g. 256MiB.
    #[arg(long, default_value = "256MiB", value_parser = crate::demo::parse_size)]
    size: u64,
    /// Runs of each measurement (medians are reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Options of `migratory bench rtt`.
#[derive(Args, Debug)]
pub struct RttArgs {
    /// Round trips measured per path.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(10..=10_000_000))]
    count: u32,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Options of `migratory bench migrate`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Application state sizes to measure, e.g. 0,5KiB,10KiB,64KiB,1MiB.
    #[arg(long, value_delimiter = ',', default_value = "0,5KiB,10KiB,64KiB,1MiB", value_parser = crate::demo::parse_size)]
    state: Vec<u64>,
    /// Migrations per state size (back and forth between two servers).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(2..=100_000))]
    rounds: u32,
    /// Also draw MTCP fig 5.3 (time to migrate against the state size) as
    /// an SVG file here.
    #[arg(long, value_name = "FILE")]
    svg: Option<std::path::PathBuf>,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

fn emit(json_out: bool, v: Value, text: String) -> Result<bool, String> {
    if json_out {
        println!("{v}");
    } else {
        print!("{text}");
    }
    Ok(true)
}

// ----- servers and clients of the three paths -----------------------------

/// What a benchmark server's application does with each connection.
#[derive(Clone, Copy)]
enum App {
    /// Writes `n` bytes, then closes.
    Source(u64),
    /// Reads until EOF, then closes.
    Sink,
    /// Echoes.
    Echo,
    /// Writes for ever, taking a snapshot (its position) every MiB; a
    /// migrated instance resumes from the snapshot.
    Stream,
}

async fn run_app<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, app: App) {
    let mut buf = vec![0u8; 256 * 1024];
    match app {
        App::Source(n) => {
            let mut left = n;
            while left > 0 {
                let k = left.min(buf.len() as u64) as usize;
                if s.write_all(&buf[..k]).await.is_err() {
                    return;
                }
                left -= k as u64;
            }
            let _ = s.shutdown().await;
        }
        App::Sink => {
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            let _ = s.shutdown().await;
        }
        App::Stream => {}
        App::Echo => loop {
            let n = match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if s.write_all(&buf[..n]).await.is_err() {
                return;
            }
        },
    }
}

/// A raw tokio TCP server running `app`.
async fn raw_server(app: App) -> Result<SocketAddr, String> {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(run_app(s, app));
        }
    });
    Ok(addr)
}

/// Whether a benchmark's sessions run over TLS (the default of every
/// pool) or the plaintext a pool gets only when it asks for it (the
/// runtime's own cost, against raw TCP).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sec {
    Plain,
    Tls,
}

/// The benchmark pool's CA and certificates, made once per run.
fn bench_certs() -> Result<&'static PoolCerts, String> {
    static CERTS: std::sync::OnceLock<PoolCerts> = std::sync::OnceLock::new();
    if let Some(c) = CERTS.get() {
        return Ok(c);
    }
    let c = PoolCerts::generate(migratory::tls::DEFAULT_POOL_NAME).map_err(|e| e.to_string())?;
    Ok(CERTS.get_or_init(|| c))
}

fn server_tls(sec: Sec, id: &str) -> Result<ServerTls, String> {
    match sec {
        Sec::Plain => Ok(ServerTls::insecure_plaintext()),
        Sec::Tls => bench_certs()?.server_tls(id).map_err(|e| e.to_string()),
    }
}

fn client_tls(sec: Sec) -> Result<ClientTls, String> {
    match sec {
        Sec::Plain => Ok(ClientTls::insecure_plaintext()),
        Sec::Tls => bench_certs()?.client_tls().map_err(|e| e.to_string()),
    }
}

/// A pool of `n` migratory servers s1..sn running `app`; each session
/// takes a snapshot of `state` bytes when it starts. Returns the service
/// addresses.
async fn pool(n: usize, app: App, state: usize, sec: Sec) -> Result<Vec<SocketAddr>, String> {
    Ok(pool_handles(n, app, state, sec).await?.0)
}

/// [`pool`], with a handle on each server.
async fn pool_handles(
    n: usize,
    app: App,
    state: usize,
    sec: Sec,
) -> Result<(Vec<SocketAddr>, Vec<ServerHandle>), String> {
    pool_with(n, app, state, sec, Some(BalanceConfig::default())).await
}

/// [`pool_handles`] with these balance settings.
async fn pool_with(
    n: usize,
    app: App,
    state: usize,
    sec: Sec,
    balance: Option<BalanceConfig>,
) -> Result<(Vec<SocketAddr>, Vec<ServerHandle>), String> {
    let mut listeners = Vec::new();
    for _ in 0..2 * n {
        listeners.push(std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?);
    }
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    drop(listeners);
    let state = Arc::new(vec![0x5a; state]);
    let mut handles = Vec::new();
    for i in 0..n {
        let mut b = ServerBuilder::new(format!("s{}", i + 1));
        b.tls(server_tls(sec, &format!("s{}", i + 1))?)
            .service(addrs[2 * i])
            .control(addrs[2 * i + 1])
            .cluster_key(KEY)
            .balance(balance.clone())
            .max_state(state.len().max(64 * 1024));
        for j in (0..n).filter(|j| *j != i) {
            b.peer(migratory::Peer {
                id: format!("s{}", j + 1),
                service: addrs[2 * j],
                control: addrs[2 * j + 1],
            });
        }
        let mut server = b.bind().await.map_err(|e| e.to_string())?;
        handles.push(server.handle());
        let state = state.clone();
        tokio::spawn(async move {
            while let Some((s, arrival)) = server.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    if matches!(arrival, Arrival::New) && !state.is_empty() {
                        let _ = s.snapshot(&state);
                    }
                    serve_session(s, arrival, app, &state).await;
                });
            }
        });
    }
    Ok(((0..n).map(|i| addrs[2 * i]).collect(), handles))
}

async fn serve_session(s: Session, arrival: Arrival, app: App, state: &[u8]) {
    if let App::Sink = app {
        // What was read is done with: each read is a snapshot (MTCP's
        // contract), so the read log does not hold the window shut.
        return run_app(Snapshotting(s), app).await;
    }
    if let App::Echo = app {
        // A snapshot (of the pool's state size) once each echo is written
        // back in full: a resumed instance reads from the first byte not
        // yet echoed.
        let mut s = s;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if s.write_all(&buf[..n]).await.is_err() || s.snapshot(state).is_err() {
                return;
            }
        }
    }
    let App::Stream = app else {
        return run_app(s, app).await;
    };
    let mut s = s;
    let mut pos = match arrival {
        Arrival::Migrated { state } if state.len() >= 8 => {
            u64::from_le_bytes(state[..8].try_into().expect("8 bytes"))
        }
        _ => 0,
    };
    let buf = vec![0u8; 1 << 20];
    loop {
        if s.write_all(&buf).await.is_err() {
            return;
        }
        pos += buf.len() as u64;
        if s.snapshot(&pos.to_le_bytes()).is_err() {
            return;
        }
    }
}

/// A session whose application takes a snapshot after every read.
struct Snapshotting(Session);

impl AsyncRead for Snapshotting {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = r {
            let _ = self.0.snapshot(b"");
        }
        r
    }
}

impl AsyncWrite for Snapshotting {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A local proxy (as `migratory proxy` runs it) in front of `service`.
async fn proxy(service: Vec<SocketAddr>, sec: Sec) -> Result<SocketAddr, String> {
    let tls = client_tls(sec)?;
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Ok((conn, peer)) = l.accept().await {
            tokio::spawn(crate::proxy::relay(
                conn,
                peer,
                service.clone(),
                tls.clone(),
            ));
        }
    });
    Ok(addr)
}

#[derive(Clone, Copy)]
enum Path {
    Raw,
    /// A session in insecure plaintext: the runtime's own cost.
    Session,
    /// The proxy path: a plain TCP connection to a local proxy.
    Proxy,
    /// A session over TLS 1.3, as pools run by default.
    SessionTls,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Raw => "raw TCP",
            Path::Session => "session",
            Path::Proxy => "proxy",
            Path::SessionTls => "session+TLS",
        }
    }
}

/// A connected client stream of either kind.
enum Client {
    Tcp(TcpStream),
    Session(Box<MigratoryStream>),
}

async fn connect(path: Path, addr: SocketAddr) -> Result<Client, String> {
    match path {
        Path::Raw | Path::Proxy => {
            let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let _ = s.set_nodelay(true);
            Ok(Client::Tcp(s))
        }
        Path::Session | Path::SessionTls => {
            let sec = match path {
                Path::SessionTls => Sec::Tls,
                _ => Sec::Plain,
            };
            Ok(Client::Session(Box::new(
                MigratoryStream::connect(&[addr], &client_tls(sec)?)
                    .await
                    .map_err(|e| e.to_string())?,
            )))
        }
    }
}

async fn drive_client(c: Client, app: App) -> Result<u64, String> {
    match c {
        Client::Tcp(s) => client_io(s, app).await,
        Client::Session(s) => client_io(*s, app).await,
    }
}

/// The client side of a transfer: reads everything (the server is a
/// source) or writes `n` bytes and waits for the end (the server is a
/// sink). Returns the bytes moved.
async fn client_io<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, app: App) -> Result<u64, String> {
    let mut buf = vec![0u8; 256 * 1024];
    match app {
        App::Source(_) => {
            let mut got = 0u64;
            loop {
                let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Ok(got);
                }
                got += n as u64;
            }
        }
        App::Sink | App::Echo | App::Stream => Err("not a client of this app".into()),
    }
}

async fn upload<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, n: u64) -> Result<u64, String> {
    let buf = vec![0u8; 256 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..k]).await.map_err(|e| e.to_string())?;
        left -= k as u64;
    }
    s.shutdown().await.map_err(|e| e.to_string())?;
    // The server closes after reading everything.
    let mut rest = [0u8; 16];
    while s.read(&mut rest).await.map_err(|e| e.to_string())? > 0 {}
    Ok(n)
}

/// One throughput measurement: `streams` transfers of `size` bytes at
/// once; returns bytes per second.
async fn transfer(
    path: Path,
    addr: SocketAddr,
    streams: u32,
    size: u64,
    down: bool,
) -> Result<f64, String> {
    let mut clients = Vec::new();
    for _ in 0..streams {
        clients.push(connect(path, addr).await?);
    }
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| {
            tokio::spawn(async move {
                if down {
                    drive_client(c, App::Source(size)).await
                } else {
                    match c {
                        Client::Tcp(s) => upload(s, size).await,
                        Client::Session(s) => upload(*s, size).await,
                    }
                }
            })
        })
        .collect();
    let mut total = 0u64;
    for t in tasks {
        total += t.await.map_err(|e| e.to_string())??;
    }
    if total != size * u64::from(streams) {
        return Err(format!(
            "moved {total} bytes instead of {}",
            size * u64::from(streams)
        ));
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// `migratory bench throughput`.
pub fn throughput(a: ThroughputArgs) -> Result<bool, String> {
    runtime()?.block_on(async {
        let mut rows = Vec::new();
        let mut text = format!(
            "throughput, {} stream(s) of {} MiB, median of {} runs (GB/s)\n",
            a.streams,
            a.size >> 20,
            a.runs
        );
        for down in [true, false] {
            let app = if down { App::Source(a.size) } else { App::Sink };
            let raw = raw_server(app).await?;
            let svc = pool(1, app, 0, Sec::Plain).await?;
            let prx = proxy(svc.clone(), Sec::Plain).await?;
            let svc_tls = pool(1, app, 0, Sec::Tls).await?;
            let prx_tls = proxy(svc_tls.clone(), Sec::Tls).await?;
            let mut got: Vec<Vec<f64>> = vec![Vec::new(); 5];
            for _ in 0..a.runs {
                // Interleaved, so each path sees the same machine.
                for (k, (path, addr)) in [
                    (Path::Raw, raw),
                    (Path::Session, svc[0]),
                    (Path::Proxy, prx),
                    (Path::SessionTls, svc_tls[0]),
                    (Path::Proxy, prx_tls),
                ]
                .into_iter()
                .enumerate()
                {
                    got[k].push(transfer(path, addr, a.streams, a.size, down).await?);
                }
            }
            let med: Vec<f64> = got.into_iter().map(median).collect();
            let dir = if down {
                "server writes"
            } else {
                "client writes"
            };
            for (k, name) in ["session", "proxy", "session+TLS", "proxy+TLS"]
                .into_iter()
                .enumerate()
            {
                text += &format!(
                    "  {dir:<14} {:<11} {:>6.2}  raw TCP {:>6.2}  ratio {:.2}\n",
                    name,
                    med[k + 1] / 1e9,
                    med[0] / 1e9,
                    med[k + 1] / med[0]
                );
            }
            rows.push(json!({
                "direction": if down { "down" } else { "up" },
                "raw_gbps": med[0] / 1e9,
                "session_gbps": med[1] / 1e9,
                "proxy_gbps": med[2] / 1e9,
                "session_ratio": med[1] / med[0],
                "proxy_ratio": med[2] / med[0],
                "session_tls_gbps": med[3] / 1e9,
                "proxy_tls_gbps": med[4] / 1e9,
                "session_tls_ratio": med[3] / med[0],
                "proxy_tls_ratio": med[4] / med[0],
            }));
        }
        let v = json!({
            "bench": "throughput",
            "streams": a.streams,
            "size": a.size,
            "runs": a.runs,
            "results": rows,
        });
        emit(a.json, v, text)
    })
}

/// Round trips of one byte on one connection; returns the histogram (ns).
async fn round_trips(c: Client, count: u32) -> Result<Histogram<u64>, String> {
    async fn go<S: AsyncRead + AsyncWrite + Unpin>(
        mut s: S,
        count: u32,
    ) -> Result<Histogram<u64>, String> {
        let mut h = Histogram::new(3).map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        // Warm up, then measure.
        for i in 0..count + count / 10 {
            let t = Instant::now();
            s.write_all(&[7]).await.map_err(|e| e.to_string())?;
            s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            if i >= count / 10 {
                h.record(t.elapsed().as_nanos() as u64)
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(h)
    }
    match c {
        Client::Tcp(s) => go(s, count).await,
        Client::Session(s) => go(*s, count).await,
    }
}

/// `migratory bench rtt`.
pub fn rtt(a: RttArgs) -> Result<bool, String> {
    runtime()?.block_on(async {
        let raw = raw_server(App::Echo).await?;
        let svc = pool(1, App::Echo, 0, Sec::Plain).await?;
        let prx = proxy(svc.clone(), Sec::Plain).await?;
        let mut text = format!("1-byte round trips, {} each (us)\n", a.count);
        let mut out = serde_json::Map::new();
        let mut base = (0.0, 0.0);
        for (path, addr) in [
            (Path::Raw, raw),
            (Path::Session, svc[0]),
            (Path::Proxy, prx),
        ] {
            let c = connect(path, addr).await?;
            let h = round_trips(c, a.count).await?;
            let (p50, p99) = (
                h.value_at_quantile(0.5) as f64 / 1e3,
                h.value_at_quantile(0.99) as f64 / 1e3,
            );
            if matches!(path, Path::Raw) {
                base = (p50, p99);
            }
            text += &format!(
                "  {:<8} p50 {:>7.1}  p99 {:>7.1}  p50 ratio {:.2}\n",
                path.name(),
                p50,
                p99,
                p50 / base.0
            );
            out.insert(
                path.name().replace(' ', "_"),
                json!({"p50_us": p50, "p99_us": p99, "p50_ratio": p50 / base.0}),
            );
        }
        let v = json!({"bench": "rtt", "count": a.count, "results": out});
        emit(a.json, v, text)
    })
}

/// `migratory bench migrate`: MTCP fig 5.2/5.3 — an idle session moved
/// back and forth between two servers, for each state size, next to a raw
/// TCP connect plus two raw round trips; then the same while the session
/// streams at full speed.
pub fn migrate(a: MigrateArgs) -> Result<bool, String> {
    runtime()?.block_on(async {
        let raw = raw_server(App::Echo).await?;
        let baseline = raw_connect_and_trips(raw, a.rounds.min(200), 2).await?;
        let mut text = format!(
            "migration of an idle session, {} moves per state size (p50, us)\n  raw connect + 2 round trips: {:.0}\n",
            a.rounds, baseline
        );
        let mut rows = Vec::new();
        let mut points = Vec::new();
        let mut phase_text = String::new();
        // The sizes asked for in plaintext (the runtime's own cost), then an
        // empty state over TLS (what pools run by default).
        let runs: Vec<(u64, Sec)> = a
            .state
            .iter()
            .map(|s| (*s, Sec::Plain))
            .chain([(0, Sec::Tls)])
            .collect();
        let mut tls_p50 = None;
        for (state, sec) in runs {
            let state = usize::try_from(state).map_err(|_| "--state too large")?;
            let (svc, servers) = pool_handles(2, App::Echo, state, sec).await?;
            let mut c = MigratoryStream::connect(&[svc[0]], &client_tls(sec)?)
                .await
                .map_err(|e| e.to_string())?;
            // One exchange, so the session (and its snapshot) exists.
            let mut b = [0u8; 1];
            c.write_all(&[1]).await.map_err(|e| e.to_string())?;
            c.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            for s in &servers {
                s.take_migration_phases();
            }
            let mut times = Vec::new();
            let mut client = Vec::new();
            for i in 0..a.rounds {
                let dest = if i % 2 == 0 { "s2" } else { "s1" };
                let t = Instant::now();
                c.migrate(Some(dest)).await.map_err(|e| e.to_string())?;
                times.push(t.elapsed().as_secs_f64() * 1e6);
                client.extend(c.last_migration_times());
            }
            let phases = Phases::of(&client, &servers);
            // Still the same conversation.
            c.write_all(&[9]).await.map_err(|e| e.to_string())?;
            c.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            if b[0] != 9 {
                return Err("echo lost after the migrations".into());
            }
            let p50 = median(times);
            if sec == Sec::Tls {
                tls_p50 = Some(p50);
                phase_text += &phases.row("0 B, TLS");
                continue;
            }
            text += &format!(
                "  state {:>8} B: {:>7.0}  ratio to baseline {:.2}\n",
                state,
                p50,
                p50 / baseline
            );
            phase_text += &phases.row(&format!("{state} B"));
            points.push((state as f64 / 1024.0, p50));
            rows.push(json!({
                "state": state,
                "p50_us": p50,
                "ratio": p50 / baseline,
                "phases_p50_us": phases.json(),
            }));
        }
        // TLS: each migration is a new TLS connection (resumed when the
        // client comes back to a server it met), its Migrate proved over
        // the connection's binding with no Challenge round trip.
        let tls_p50 = tls_p50.expect("measured above");
        let trips3 = raw_connect_and_trips(raw, a.rounds.min(200), 3).await?;
        let tls_target = trips3 + 300.0;
        text += &format!(
            "  over TLS, state 0 B: {tls_p50:>7.0}  (target: raw connect + 3 round trips + 300 us = {tls_target:.0}; ratio {:.2})\n",
            tls_p50 / tls_target
        );
        let (full, resumed) = tls_handshakes(a.rounds.min(200)).await?;
        text += &format!(
            "  TLS handshake, TCP connect included: full {full:>7.0}, resumed {resumed:>7.0}\n"
        );
        let (loaded, pause, loaded_phases) = loaded_migrations(a.rounds.min(50)).await?;
        phase_text += &loaded_phases.row("0 B, streaming");
        text += &format!("{}{}{}", Phases::HEADER, phase_text, Phases::THESIS);
        if let Some(path) = &a.svg {
            fig_5_3(path, &points, baseline)
                .map_err(|e| format!("cannot draw {}: {e}", path.display()))?;
        }
        text += &format!(
            "  while streaming at full speed (0 B state): {:>7.0}  (the data in flight is delivered on the old connection meanwhile)\n  longest pause in the client's stream around each of those migrations: {:>7.0}\n",
            loaded, pause
        );
        let v = json!({
            "bench": "migrate",
            "rounds": a.rounds,
            "baseline_us": baseline,
            "idle": rows,
            "loaded_p50_us": loaded,
            "loaded_pause_p50_us": pause,
            "loaded_phases_p50_us": loaded_phases.json(),
            "tls_p50_us": tls_p50,
            "tls_target_us": tls_target,
            "tls_handshake_full_us": full,
            "tls_handshake_resumed_us": resumed,
        });
        emit(a.json, v, text)
    })
}

/// The median of `rounds` raw TCP connects to `raw` each followed by
/// `trips` 1-byte round trips, in us.
async fn raw_connect_and_trips(raw: SocketAddr, rounds: u32, trips: u32) -> Result<f64, String> {
    let mut v = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let mut s = TcpStream::connect(raw).await.map_err(|e| e.to_string())?;
        let _ = s.set_nodelay(true);
        let mut b = [0u8; 1];
        for _ in 0..trips {
            s.write_all(&[1]).await.map_err(|e| e.to_string())?;
            s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        }
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(median(v))
}

/// Medians of a TCP connect plus a TLS 1.3 handshake with a pool server:
/// full (a client with no session cache) and resumed (one client config
/// whose cache holds the server's ticket), in us.
async fn tls_handshakes(rounds: u32) -> Result<(f64, f64), String> {
    use rustls::pki_types::pem::PemObject;
    let svc = pool(1, App::Echo, 0, Sec::Tls).await?;
    let ca = bench_certs()?.ca_pem();
    let config = |cache: bool| -> Result<Arc<rustls::ClientConfig>, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots
                .add(c.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        if !cache {
            c.resumption = rustls::client::Resumption::disabled();
        }
        Ok(Arc::new(c))
    };
    let name = rustls::pki_types::ServerName::try_from("s1").map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for cache in [false, true] {
        let cfg = config(cache)?;
        let mut v = Vec::new();
        for i in 0..=rounds {
            let t = Instant::now();
            let tcp = TcpStream::connect(svc[0])
                .await
                .map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            let s = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| e.to_string())?;
            let kind = s.get_ref().1.handshake_kind();
            // The first handshake of the caching client fills its cache.
            if i > 0 || !cache {
                if cache && kind != Some(rustls::HandshakeKind::Resumed) {
                    return Err(format!("TLS resumption did not happen: {kind:?}"));
                }
                v.push(t.elapsed().as_secs_f64() * 1e6);
            }
            // A ticket arrives after the handshake: read until it has (a
            // busy box may take longer than a millisecond to send it).
            let mut s = s;
            let mut b = [0u8; 1];
            let wait = Instant::now();
            while cache
                && s.get_ref().1.tls13_tickets_received() == 0
                && wait.elapsed() < Duration::from_secs(1)
            {
                let _ = tokio::time::timeout(Duration::from_millis(1), s.read(&mut b)).await;
            }
        }
        out.push(median(v));
    }
    Ok((out[0], out[1]))
}

/// MTCP fig 5.3: the median time to migrate an idle session against its
/// state size, next to the raw TCP baseline of the same run.
fn fig_5_3(
    path: &std::path::Path,
    points: &[(f64, f64)],
    baseline: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let y_max = points.iter().map(|p| p.1).fold(baseline, f64::max) * 1.15;
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Time to migrate an idle session (p50) vs state size",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("application state (KiB)")
        .y_desc("microseconds")
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            points.iter().copied(),
            BLUE.stroke_width(2),
        ))?
        .label("migratory session")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))?;
    chart
        .draw_series(LineSeries::new([(0.0, baseline), (x_max, baseline)], RED))?
        .label("raw TCP connect + 2 round trips")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Medians (us) of the steps of a set of migrations, as in MTCP fig 5.2:
/// the client's, the destination's and the origin's.
struct Phases([f64; 7]);

impl Phases {
    const HEADER: &'static str = "  steps, p50 (us)     client: prepare  wait  complete | destination: prepare  wait  reinstate | origin: prepare\n";
    /// MTCP thesis, fig 5.2 (2.2 GHz hosts, 100 Mb/s Ethernet, kernel TCP).
    const THESIS: &'static str = "  thesis (fig 5.2):\n    0 B                        73   490    10  |                40   191     20  |          50\n    5 KiB                      87  1002     7  |                42   784     25  |          89\n    10 KiB                     90  1521     7  |                42  1382     27  |         120\n";

    /// The medians of the client's steps and of the steps the servers
    /// timed since they were last asked (which this takes).
    fn of(client: &[migratory::MigrationTimes], servers: &[ServerHandle]) -> Phases {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let mut dest = [Vec::new(), Vec::new(), Vec::new()];
        let mut origin = Vec::new();
        for p in servers.iter().flat_map(|s| s.take_migration_phases()) {
            match p {
                MigrationPhases::Destination {
                    prepare_request,
                    wait_reply,
                    reinstate,
                    ..
                } => {
                    dest[0].push(us(prepare_request));
                    dest[1].push(us(wait_reply));
                    dest[2].push(us(reinstate));
                }
                MigrationPhases::Origin { prepare_reply, .. } => origin.push(us(prepare_reply)),
            }
        }
        // Not a number when no migration was timed at that step.
        let p50 = |v: Vec<f64>| if v.is_empty() { f64::NAN } else { median(v) };
        let [dp, dw, dr] = dest;
        Phases([
            p50(client.iter().map(|t| us(t.prepare)).collect()),
            p50(client.iter().map(|t| us(t.wait)).collect()),
            p50(client.iter().map(|t| us(t.complete)).collect()),
            p50(dp),
            p50(dw),
            p50(dr),
            p50(origin),
        ])
    }

    fn row(&self, label: &str) -> String {
        let p = &self.0;
        format!(
            "    {label:<22} {:>7.0} {:>5.0} {:>5.0}  | {:>17.0} {:>5.0} {:>6.0}  | {:>11.0}\n",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6]
        )
    }

    fn json(&self) -> Value {
        let p = &self.0;
        json!({
            "client": {"prepare": p[0], "wait": p[1], "complete": p[2]},
            "destination": {"prepare": p[3], "wait": p[4], "reinstate": p[5]},
            "origin": {"prepare": p[6]},
        })
    }
}

/// Migrations of a session whose server streams to it at full speed; the
/// client reads everything meanwhile. Returns the median time of a
/// migration and the median of the longest pause between two reads of the
/// client from a migration's start to its end (us), and the medians of
/// the migrations' steps.
async fn loaded_migrations(rounds: u32) -> Result<(f64, f64, Phases), String> {
    let (svc, servers) = pool_handles(2, App::Stream, 0, Sec::Plain).await?;
    let c = MigratoryStream::connect(&[svc[0]], &client_tls(Sec::Plain)?)
        .await
        .map_err(|e| e.to_string())?;
    let mut control = c.control();
    let stop = Arc::new(Semaphore::new(0));
    let reader = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut c = c;
            let mut buf = vec![0u8; 256 * 1024];
            // When each read returned (bounded: the run lasts about 1.5 s).
            let mut reads = Vec::with_capacity(1 << 16);
            loop {
                tokio::select! {
                    r = c.read(&mut buf) => match r {
                        Ok(0) | Err(_) => return reads,
                        Ok(_) => if reads.len() < 1 << 22 { reads.push(Instant::now()) },
                    },
                    _ = stop.acquire() => return reads,
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    for s in &servers {
        s.take_migration_phases();
    }
    let mut times = Vec::new();
    let mut spans = Vec::new();
    let mut client = Vec::new();
    for i in 0..rounds {
        let dest = if i % 2 == 0 { "s2" } else { "s1" };
        let t = Instant::now();
        control
            .migrate(Some(dest))
            .await
            .map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        spans.push((t, Instant::now()));
        client.extend(control.last_migration_times());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let phases = Phases::of(&client, &servers);
    stop.add_permits(1);
    let reads = reader.await.map_err(|e| e.to_string())?;
    // For each migration: the longest gap between two consecutive reads
    // that overlaps it (from the last read before its start to the first
    // read after its end).
    let pauses = spans
        .iter()
        .map(|&(start, end)| {
            let from = reads.partition_point(|&r| r < start).saturating_sub(1);
            let to = (reads.partition_point(|&r| r <= end) + 1).min(reads.len());
            reads[from..to]
                .windows(2)
                .map(|w| (w[1] - w[0]).as_secs_f64() * 1e6)
                .fold(0.0, f64::max)
        })
        .collect();
    Ok((median(times), median(pauses), phases))
}

/// A server's client TLS handshakes so far, `(full, resumed)`, read from
/// its Prometheus metrics at `addr`.
async fn served_handshakes(addr: SocketAddr) -> Result<(u64, u64), String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("metrics {addr}: {e}"))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    let count = |kind: &str| {
        body.lines()
            .filter(|l| {
                l.starts_with(migratory::server::TLS_HANDSHAKES)
                    && l.contains(&format!("kind=\"{kind}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    Ok((count("full"), count("resumed")))
}

/// Options of `migratory bench idle`.
#[derive(Args, Debug)]
pub struct IdleArgs {
    /// Idle sessions to open.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    sessions: u32,
    /// Active sessions whose round trips are measured beside the idle ones.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    active: u32,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// A child process of this binary, killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn proc_status(pid: u32, key: &str) -> Result<u64, String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| format!("no {key} for {pid}"))
}

/// CPU time (user + system) of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    let rest = s.rsplit_once(')').map(|(_, r)| r).ok_or("bad stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let u: u64 = f.get(11).and_then(|v| v.parse().ok()).ok_or("bad stat")?;
    let k: u64 = f.get(12).and_then(|v| v.parse().ok()).ok_or("bad stat")?;
    Ok(u + k)
}

fn free_port() -> Result<SocketAddr, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map_err(|e| e.to_string())
}

async fn wait_listening(addr: SocketAddr) -> Result<(), String> {
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(format!("nothing listens on {addr}"))
}

/// p99 (us) of 1-byte round trips on `n` fresh sessions at once.
async fn active_p99(path: Path, addr: SocketAddr, n: u32) -> Result<f64, String> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let c = connect(path, addr).await?;
        tasks.push(tokio::spawn(round_trips(c, 200)));
    }
    let mut all = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    for t in tasks {
        let h = t.await.map_err(|e| e.to_string())??;
        all.add(&h).map_err(|e| e.to_string())?;
    }
    Ok(all.value_at_quantile(0.99) as f64 / 1e3)
}

/// `migratory bench idle`: what idle sessions cost `serve` and `proxy`.
pub fn idle(a: IdleArgs) -> Result<bool, String> {
    crate::nofile::raise();
    runtime()?.block_on(async {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let dir = std::env::temp_dir().join(format!("migratory-bench-idle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let (service, control) = (free_port()?, free_port()?);
        std::fs::write(dir.join("cluster.key"), "bench-idle-cluster-key-0123456789abcdef")
            .map_err(|e| e.to_string())?;
        std::fs::write(
            dir.join("pool.toml"),
            format!(
                "cluster_key_file = \"cluster.key\"\ninsecure_plaintext = true\n[limits]\nmax_connections_per_address = 65536\n[[server]]\nid = \"s1\"\nservice = \"{service}\"\ncontrol = \"{control}\"\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        let quiet = || std::process::Stdio::null();
        let serve = Child(
            std::process::Command::new(&exe)
                .args(["serve", "--config"])
                .arg(dir.join("pool.toml"))
                .args(["--id", "s1", "--service", "echo"])
                .stdout(quiet())
                .stderr(quiet())
                .spawn()
                .map_err(|e| format!("cannot start serve: {e}"))?,
        );
        wait_listening(service).await?;
        let spid = serve.0.id();
        let alone = active_p99(Path::Session, service, a.active).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss0 = proc_status(spid, "VmRSS:")?;
        let mut idle = Vec::new();
        let mut b = [0u8; 1];
        // The runtime's own idle cost: TLS state would come on top.
        let plain = client_tls(Sec::Plain)?;
        for _ in 0..a.sessions {
            let one = async {
                let mut c = MigratoryStream::connect(&[service], &plain)
                    .await
                    .map_err(|e| e.to_string())?;
                c.write_all(&[1]).await.map_err(|e| e.to_string())?;
                c.read_exact(&mut b).await.map_err(|e| e.to_string())?;
                Ok::<_, String>(c)
            };
            let c = tokio::time::timeout(Duration::from_secs(10), one)
                .await
                .map_err(|_| "a session did not answer in 10 s".to_string())??;
            idle.push(c);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss1 = proc_status(spid, "VmRSS:")?;
        let t0 = cpu_ticks(spid)?;
        let wall = Instant::now();
        // Over a whole ping interval (and the kernel's keepalive probes):
        // every idle session pings once in it.
        let ping = migratory::proto::config::ClientTimeouts::default().ping_interval;
        tokio::time::sleep(ping + Duration::from_secs(5)).await;
        let ticks = cpu_ticks(spid)? - t0;
        let hz = 100.0; // USER_HZ on Linux
        let cpu = ticks as f64 / hz / wall.elapsed().as_secs_f64() * 100.0;
        let beside = active_p99(Path::Session, service, a.active).await?;
        drop(idle);

        // The proxy: the same number of plain local connections through it.
        let listen = free_port()?;
        let proxy = Child(
            std::process::Command::new(&exe)
                .args(["proxy", "--insecure-plaintext", "--listen"])
                .arg(listen.to_string())
                .arg("--service")
                .arg(service.to_string())
                .stdout(quiet())
                .stderr(quiet())
                .spawn()
                .map_err(|e| format!("cannot start proxy: {e}"))?,
        );
        wait_listening(listen).await?;
        let ppid = proxy.0.id();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let prss0 = proc_status(ppid, "VmRSS:")?;
        // Each proxied session takes two of the proxy's files.
        let files = crate::nofile::raise().unwrap_or(1024);
        let proxied = u64::from(a.sessions).min(files.saturating_sub(64) / 2) as u32;
        let mut conns = Vec::new();
        for _ in 0..proxied {
            let one = async {
                let mut c = TcpStream::connect(listen).await?;
                c.write_all(&[1]).await?;
                c.read_exact(&mut b).await?;
                Ok::<_, std::io::Error>(c)
            };
            let c = tokio::time::timeout(Duration::from_secs(10), one)
                .await
                .map_err(|_| "a proxied session did not answer in 10 s".to_string())?
                .map_err(|e| e.to_string())?;
            conns.push(c);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let prss1 = proc_status(ppid, "VmRSS:")?;
        drop(conns);
        drop(proxy);
        drop(serve);
        let _ = std::fs::remove_dir_all(&dir);

        let n = f64::from(a.sessions);
        let per_serve = rss1.saturating_sub(rss0) as f64 / n;
        let per_proxy = prss1.saturating_sub(prss0) as f64 / f64::from(proxied.max(1));
        let text = format!(
            "{} idle sessions\n  serve: {:.1} KiB RSS per session, {:.2}% of one core while idle\n  proxy: {:.1} KiB RSS per session ({} sessions: two files each)\n  p99 round trip of {} active sessions: {:.0} us beside none, {:.0} us beside the idle ones (ratio {:.2})\n",
            a.sessions,
            per_serve / 1024.0,
            cpu,
            per_proxy / 1024.0,
            proxied,
            a.active,
            alone,
            beside,
            beside / alone
        );
        let v = json!({
            "bench": "idle",
            "sessions": a.sessions,
            "serve_rss_per_session_bytes": per_serve,
            "serve_idle_cpu_percent": cpu,
            "proxy_rss_per_session_bytes": per_proxy,
            "proxy_sessions": proxied,
            "active": a.active,
            "active_p99_us_alone": alone,
            "active_p99_us_beside_idle": beside,
            "ratio": beside / alone,
        });
        emit(a.json, v, text)
    })
}

/// Options of `migratory bench drain`.
#[derive(Args, Debug)]
pub struct DrainArgs {
    /// Sessions on the server that drains.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    sessions: u32,
    /// The share of them streaming (16 KiB echo rounds, checked) while the
    /// server drains; the others are idle.
    #[arg(long, default_value_t = 0.5)]
    streaming: f64,
    /// Pace of each streaming session, bytes per second each way (e.g.
    /// 1MiB; 0: as fast as it goes).
    #[arg(long, default_value = "0", value_parser = crate::demo::parse_size)]
    rate: u64,
    /// Most sessions on their way out at once (`[balance]
    /// drain_parallel` of the servers; default: theirs, 512).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    parallel: Option<u32>,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// One echo round of `len` bytes, checked: `false` on any error or
/// difference (a client-visible error).
async fn echo_checked(c: &mut MigratoryStream, seed: u64, len: usize) -> bool {
    let data: Vec<u8> = (0..len as u64)
        .map(|i| ((i + seed).wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    if c.write_all(&data).await.is_err() {
        return false;
    }
    let mut got = vec![0u8; len];
    c.read_exact(&mut got).await.is_ok() && got == data
}

/// A pool of three `migratory serve --service echo` processes over TLS
/// (no rebalancer: every session starts and stays on s1), `sessions`
/// clients in this process on s1, a share of them streaming; then an
/// operator drains s1, as `migratory drain` does. Measures the drain and
/// counts what the clients saw go wrong (every byte is checked, and every
/// idle client does one more round after the drain).
pub fn drain(a: DrainArgs) -> Result<bool, String> {
    if !(0.0..=1.0).contains(&a.streaming) {
        return Err("--streaming must be between 0 and 1".into());
    }
    crate::nofile::raise();
    let rt = runtime()?;
    let v = rt.block_on(async {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let dir =
            std::env::temp_dir().join(format!("migratory-bench-drain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let key = "bench-drain-cluster-key-0123456789abcdef";
        std::fs::write(dir.join("cluster.key"), key).map_err(|e| e.to_string())?;
        let mut cfg = String::from(
            "cluster_key_file = \"cluster.key\"\n[limits]\nmax_connections = 1000000\n\
             max_connections_per_address = 1000000\n[balance]\nrebalance = false\n",
        );
        if let Some(n) = a.parallel {
            cfg += &format!("drain_parallel = {n}\n");
        }
        let mut service = Vec::new();
        let mut control = Vec::new();
        for i in 0..3 {
            service.push(free_port()?);
            control.push(free_port()?);
            cfg += &format!(
                "[[server]]\nid = \"s{}\"\nservice = \"{}\"\ncontrol = \"{}\"\n",
                i + 1,
                service[i],
                control[i]
            );
        }
        let pool = dir.join("pool.toml");
        std::fs::write(&pool, cfg).map_err(|e| e.to_string())?;
        // The pool's CA and certificates (servers and operator), where the
        // pool file's default `[tls] dir` looks for them.
        bench_certs()?
            .write_dir(&dir.join("certs"), &["s1", "s2", "s3"])
            .map_err(|e| e.to_string())?;
        let metrics: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
        let mut servers = Vec::new();
        for (i, m) in metrics.iter().enumerate() {
            servers.push(Child(
                std::process::Command::new(&exe)
                    .args(["serve", "--config"])
                    .arg(&pool)
                    .args(["--id", &format!("s{}", i + 1), "--service", "echo"])
                    .arg("--metrics")
                    .arg(m.to_string())
                    .env("RUST_LOG", "warn")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .map_err(|e| format!("cannot start serve: {e}"))?,
            ));
        }
        for s in &service {
            wait_listening(*s).await?;
        }
        // The peers report their loads.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let tls = ClientTls::from_ca_file(dir.join("certs/ca.pem")).map_err(|e| e.to_string())?;
        let op_tls = migratory::OperatorTls::from_pem_files(
            dir.join("certs/ca.pem"),
            dir.join("certs/operator.pem"),
            dir.join("certs/operator.key"),
        )
        .map_err(|e| e.to_string())?;
        let listed = |i: usize| {
            let op_tls = op_tls.clone();
            let control = control[i];
            async move {
                let id = format!("s{}", i + 1);
                let mut op = migratory::Operator::connect(control, &op_tls, key.as_bytes(), &id)
                    .await
                    .map_err(|e| e.to_string())?;
                op.sessions()
                    .await
                    .map(|r| r.len())
                    .map_err(|e| e.to_string())
            }
        };
        let n = a.sessions as usize;
        let streaming = ((n as f64) * a.streaming).round() as usize;
        let connects = Arc::new(Semaphore::new(64));
        let mut opening = Vec::with_capacity(n);
        for i in 0..n {
            let (tls, addr, connects) = (tls.clone(), service[0], connects.clone());
            opening.push(tokio::spawn(async move {
                let _permit = connects.acquire().await.map_err(|e| e.to_string())?;
                let mut c = MigratoryStream::connect(&[addr], &tls)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                if !echo_checked(&mut c, i as u64, 16).await {
                    return Err("first round failed".to_string());
                }
                Ok::<_, String>(c)
            }));
        }
        let mut clients = Vec::with_capacity(n);
        let progress = Opening::start(n as u64);
        for o in opening {
            clients.push(o.await.map_err(|e| e.to_string())??);
            progress.inc();
        }
        progress.finish();
        let on_s1 = listed(0).await?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut streamers = Vec::new();
        let idle: Vec<MigratoryStream> = clients.split_off(streaming);
        const ROUND: usize = 16 << 10;
        let pause = (a.rate > 0).then(|| Duration::from_secs_f64(ROUND as f64 / a.rate as f64));
        for (i, mut c) in clients.into_iter().enumerate() {
            let stop = stop.clone();
            streamers.push(tokio::spawn(async move {
                let mut rounds = 0u64;
                let mut next = tokio::time::Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if !echo_checked(&mut c, (i as u64) << 32 | rounds, ROUND).await {
                        return (rounds, 1u64);
                    }
                    rounds += 1;
                    if let Some(p) = pause {
                        next += p;
                        tokio::time::sleep_until(next).await;
                    }
                }
                (rounds, 0)
            }));
        }
        // Let the streams run.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut op = migratory::Operator::connect(control[0], &op_tls, key.as_bytes(), "s1")
            .await
            .map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let (moved, closed, took) = op
            .drain(Duration::from_secs(25))
            .await
            .map_err(|e| e.to_string())?;
        let drain_ms = t0.elapsed().as_secs_f64() * 1e3;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut errors = 0u64;
        let mut rounds = 0u64;
        for t in streamers {
            let (r, e) = t.await.map_err(|e| e.to_string())?;
            rounds += r;
            errors += e;
        }
        let ms = |v: Vec<f64>| {
            if v.is_empty() {
                f64::NAN
            } else {
                median(v) * 1e3
            }
        };
        let client: Vec<MigrationTimes> = idle
            .iter()
            .filter_map(|c| c.last_migration_times())
            .collect();
        let c_prepare = ms(client.iter().map(|t| t.prepare.as_secs_f64()).collect());
        let c_wait = ms(client.iter().map(|t| t.wait.as_secs_f64()).collect());
        let mut idle_errors = 0u64;
        for (i, mut c) in idle.into_iter().enumerate() {
            if !echo_checked(&mut c, 1 << 40 | i as u64, 64).await {
                idle_errors += 1;
            }
        }
        let after = vec![listed(1).await?, listed(2).await?];
        // How the migrations' TLS handshakes went at the peers (tickets are
        // pool-wide: a client resumes at a server it never met).
        let mut handshakes = [0u64; 2];
        for m in &metrics[1..] {
            let (full, resumed) = served_handshakes(*m).await?;
            handshakes[0] += full;
            handshakes[1] += resumed;
        }
        drop(servers);
        let _ = std::fs::remove_dir_all(&dir);
        Ok::<_, String>(json!({
            "sessions": n,
            "streaming": streaming,
            "rate": a.rate,
            "parallel": a
                .parallel
                .map_or(BalanceConfig::default().drain_parallel, |n| n as usize),
            "on_s1_before": on_s1,
            "drain_ms": drain_ms,
            "server_drain_ms": took.as_secs_f64() * 1e3,
            "moved": moved,
            "closed": closed,
            "stream_rounds": rounds,
            "errors": errors + idle_errors,
            "after_s2_s3": after,
            "client_prepare_p50_ms": c_prepare,
            "client_wait_p50_ms": c_wait,
            "peer_tls_handshakes_full": handshakes[0],
            "peer_tls_handshakes_resumed": handshakes[1],
        }))
    })?;
    let text = format!(
        "drain of {} sessions ({} streaming) on s1: {:.0} ms; moved {}, closed {}; \
         client-visible errors {}; sessions on s2, s3 after: {}; \
         TLS handshakes at s2 and s3: {} full, {} resumed\n",
        v["sessions"],
        v["streaming"],
        v["drain_ms"].as_f64().unwrap_or(0.0),
        v["moved"],
        v["closed"],
        v["errors"],
        v["after_s2_s3"],
        v["peer_tls_handshakes_full"],
        v["peer_tls_handshakes_resumed"]
    );
    emit(a.json, v, text)
}

/// Sessions being opened, on stderr: a bar on a terminal, a line a
/// second otherwise (opening ten thousand takes a while).
struct Opening {
    bar: Option<indicatif::ProgressBar>,
    done: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Opening {
    fn start(n: u64) -> Self {
        use std::io::IsTerminal;
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        if std::io::stderr().is_terminal() {
            let style = indicatif::ProgressStyle::with_template(
                "opening sessions {elapsed_precise} [{bar:30}] {pos}/{len}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            let bar = indicatif::ProgressBar::new(n).with_style(style);
            let task = tokio::spawn(async {});
            return Self {
                bar: Some(bar),
                done,
                task,
            };
        }
        let d = done.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                eprintln!(
                    "  opening sessions: {} of {n}",
                    d.load(std::sync::atomic::Ordering::Relaxed)
                );
            }
        });
        Self {
            bar: None,
            done,
            task,
        }
    }

    fn inc(&self) {
        self.done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }

    fn finish(self) {
        self.task.abort();
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
