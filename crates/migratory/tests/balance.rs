//! Why sessions move on their own, over loopback with in-process servers:
//! the rebalancer spreads sessions that all started on one server and
//! then leaves them alone; a drain moves every session (and sends new
//! clients on) while the bytes keep flowing; a drain with no live peer
//! ends its sessions at once with a reason. Every byte is checked.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use migratory::proto::error::SessionError;
use migratory::proto::frame::RejectReason;
use migratory::proto::server::{BalanceConfig, RebalanceConfig};
use migratory::{MigratoryStream, Peer, ServerBuilder, ServerHandle};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

const KEY: &[u8] = b"balance test cluster key 0123456789";

fn name(i: usize) -> String {
    format!("s{}", i + 1)
}

/// Faster than the defaults, so the tests take seconds.
fn fast_balance() -> BalanceConfig {
    BalanceConfig {
        report_every: Duration::from_millis(200),
        stale_after: Duration::from_millis(600),
        rebalance: Some(RebalanceConfig {
            settle: Duration::from_secs(1),
            min_residence: Duration::from_millis(300),
            ..RebalanceConfig::default()
        }),
        ..BalanceConfig::default()
    }
}

/// `n` echo servers that know each other.
async fn pool(n: usize, balance: BalanceConfig) -> (Vec<ServerHandle>, Vec<SocketAddr>) {
    pool_with(
        n,
        balance,
        |_, _| {},
        |s| {
            tokio::spawn(common::echo(s));
        },
    )
    .await
}

/// [`pool`], each server's builder passed through `tweak` (with its index),
/// each session handed to `serve`.
async fn pool_with(
    n: usize,
    balance: BalanceConfig,
    tweak: impl Fn(usize, &mut ServerBuilder),
    serve: impl Fn(migratory::Session) + Clone + Send + 'static,
) -> (Vec<ServerHandle>, Vec<SocketAddr>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let service = common::free_addrs(n);
    let control = common::free_addrs(n);
    let mut handles = Vec::new();
    for i in 0..n {
        let mut b = ServerBuilder::new(name(i));
        b.tls(common::server_tls(&name(i)))
            .service(service[i])
            .control(control[i])
            .cluster_key(KEY)
            .balance(Some(balance.clone()));
        for j in (0..n).filter(|j| *j != i) {
            b.peer(Peer {
                id: name(j),
                service: service[j],
                control: control[j],
            });
        }
        tweak(i, &mut b);
        let mut server = b.bind().await.expect("bind");
        handles.push(server.handle());
        let serve = serve.clone();
        tokio::spawn(async move {
            while let Some((s, _)) = server.accept().await {
                serve(s);
            }
        });
    }
    (handles, service)
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// One echo round: `data` out, the same back.
async fn round(c: &mut MigratoryStream, data: &[u8]) {
    c.write_all(data).await.expect("write");
    let mut got = vec![0u8; data.len()];
    c.read_exact(&mut got).await.expect("read");
    assert!(got == data, "the echo differs");
}

fn counts(handles: &[ServerHandle]) -> Vec<usize> {
    handles.iter().map(|h| h.sessions().len()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_sessions_on_one_server_spread_evenly_and_stay_put() {
    let (handles, service) = pool(3, fast_balance()).await;
    let tls = common::client_tls();
    let mut clients = Vec::new();
    for i in 0..300u32 {
        let mut c = MigratoryStream::connect(&service[..1], &tls)
            .await
            .expect("connect");
        round(&mut c, &pattern(512, i)).await;
        clients.push(c);
    }
    // They all started on s1: the rebalancer sends two thirds away.
    let deadline = Instant::now() + Duration::from_secs(60);
    let settled = loop {
        let n = counts(&handles);
        if n.iter().sum::<usize>() == 300 && n.iter().all(|c| (90..=110).contains(c)) {
            break n;
        }
        assert!(Instant::now() < deadline, "not spread: {n:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("spread: {settled:?}");
    // Every client moved or not, each byte exact.
    for (i, c) in clients.iter_mut().enumerate() {
        round(c, &pattern(2048, 1000 + i as u32)).await;
    }
    // The rebalancer levels to the mean (it stops within `min_excess` of
    // it), then nothing moves: several rounds later, the same.
    let rebalanced = || -> Vec<u64> { handles.iter().map(|h| h.stats().rebalanced).collect() };
    let mut quiet = None;
    for _ in 0..10 {
        let before = (counts(&handles), rebalanced());
        tokio::time::sleep(Duration::from_millis(2500)).await;
        if (counts(&handles), rebalanced()) == before {
            quiet = Some(before);
            break;
        }
    }
    let (level, moved) = quiet.expect("the rebalancer never stopped");
    eprintln!("level: {level:?}");
    assert!(level.iter().all(|c| (90..=110).contains(c)), "{level:?}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(counts(&handles), level, "sessions flapped");
    assert_eq!(
        rebalanced(),
        moved,
        "the rebalancer moved sessions of a balanced pool"
    );
    for (i, c) in clients.iter_mut().enumerate() {
        round(c, &pattern(512, 5000 + i as u32)).await;
        c.shutdown().await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_moves_streaming_sessions_and_sends_new_clients_on() {
    // No rebalancer: every move is the drain's.
    let balance = BalanceConfig {
        rebalance: None,
        ..fast_balance()
    };
    let (handles, service) = pool(3, balance).await;
    // The peers have reported their loads.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tls = common::client_tls();
    // 24 clients on s1, each streaming 64 KiB rounds until s1 drained,
    // and a few more.
    let (drained_tx, drained) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..24u32 {
        let mut c = MigratoryStream::connect(&service[..1], &tls)
            .await
            .expect("connect");
        round(&mut c, &pattern(100, i)).await;
        let drained = drained.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = 0u32;
            while !*drained.borrow() {
                round(&mut c, &pattern(64 << 10, i * 1000 + r)).await;
                r += 1;
            }
            for r in 0..4u32 {
                round(&mut c, &pattern(64 << 10, i * 1000 + 999 - r)).await;
            }
            let server = c.server().expect("attached");
            c.shutdown().await.expect("close");
            server
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let drain = {
        let h = handles[0].clone();
        tokio::spawn(async move { h.drain(Duration::from_secs(20)).await })
    };
    // A client that arrives meanwhile is served elsewhere.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut late = MigratoryStream::connect(&service[..1], &tls)
        .await
        .expect("connect while draining");
    round(&mut late, &pattern(4096, 77)).await;
    assert_ne!(late.server().map(|s| s.to_string()), Some(name(0)));
    let report = drain.await.unwrap();
    drained_tx.send_replace(true);
    eprintln!("{report:?}");
    assert_eq!(report.closed, 0);
    // The 24, and the client that arrived during the drain.
    assert_eq!(report.moved + report.finished, 25, "{report:?}");
    assert!(handles[0].sessions().is_empty());
    for t in tasks {
        let server = t.await.unwrap();
        assert_ne!(server.as_str(), "s1");
    }
    round(&mut late, &pattern(4096, 78)).await;
    assert_eq!(handles[0].stats().redirected, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_sends_new_sessions_to_the_least_loaded_peer() {
    // s1 takes 5 sessions; no rebalancer, so only admission moves them.
    let balance = BalanceConfig {
        rebalance: None,
        ..fast_balance()
    };
    let (handles, service) = pool_with(
        3,
        balance,
        |i, b| {
            if i == 0 {
                b.max_sessions(5);
            }
        },
        |s| {
            tokio::spawn(common::echo(s));
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tls = common::client_tls();
    let mut clients = Vec::new();
    for i in 0..11u32 {
        let mut c = MigratoryStream::connect(&service[..1], &tls).await.unwrap();
        round(&mut c, &pattern(3000, i)).await;
        clients.push(c);
    }
    let n = counts(&handles);
    assert_eq!(n[0], 5, "{n:?}");
    // The six others were sent on, to both peers (least loaded first, by
    // loads a report may refresh meanwhile: not always 3 and 3).
    assert_eq!(n[1] + n[2], 6, "{n:?}");
    assert!(n[1] >= 2 && n[2] >= 2, "not spread: {n:?}");
    assert_eq!(handles[0].stats().redirected, 6);
    for (i, c) in clients.iter_mut().enumerate() {
        round(c, &pattern(3000, 100 + i as u32)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_with_no_live_peer_ends_sessions_with_a_reason() {
    let (handles, service) = pool(1, fast_balance()).await;
    let tls = common::client_tls();
    let mut c = MigratoryStream::connect(&service, &tls).await.unwrap();
    round(&mut c, &pattern(1000, 1)).await;
    let start = Instant::now();
    let report = handles[0].drain(Duration::from_secs(20)).await;
    assert_eq!((report.moved, report.closed), (0, 1), "{report:?}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    // The client learns at once, with the reason.
    let mut buf = [0u8; 16];
    let err = c.read(&mut buf).await.expect_err("the session ended");
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<migratory::Error>())
        .map(|e| e.to_string())
        .unwrap_or_else(|| err.to_string());
    assert!(inner.contains("shut down"), "{inner}");
    let _ = (SessionError::Closed, RejectReason::Shutdown);
}

/// Load reports visit every session each period, and must leave them
/// asleep: once they woke every session's tasks, which cost `serve` 9% of
/// a core with 10,000 idle sessions. An idle session's application read
/// is polled when bytes arrive, not at every report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_leave_idle_sessions_asleep() {
    let polls = Arc::new(AtomicU64::new(0));
    let counted = polls.clone();
    let balance = BalanceConfig {
        report_every: Duration::from_millis(10),
        stale_after: Duration::from_millis(100),
        rebalance: None,
        ..BalanceConfig::default()
    };
    let (_handles, service) = pool_with(
        2,
        balance,
        |_, _| {},
        move |s| {
            tokio::spawn(counting_echo(s, counted.clone()));
        },
    )
    .await;
    let tls = common::client_tls();
    let mut c = MigratoryStream::connect(&service[..1], &tls).await.unwrap();
    round(&mut c, &pattern(1000, 1)).await;
    // Let the last round's acknowledgements settle, then sit idle through
    // about 50 load reports.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = polls.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let woken = polls.load(Ordering::SeqCst) - before;
    assert!(
        woken <= 2,
        "an idle session's read was polled {woken} times in 50 load reports"
    );
    round(&mut c, &pattern(1000, 2)).await;
}

/// [`common::echo`], counting how often the session's read is polled.
async fn counting_echo(mut s: migratory::Session, polls: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let read = std::future::poll_fn(|cx| {
            polls.fetch_add(1, Ordering::SeqCst);
            let mut rb = tokio::io::ReadBuf::new(&mut buf);
            std::pin::Pin::new(&mut s)
                .poll_read(cx, &mut rb)
                .map_ok(|()| rb.filled().len())
        })
        .await;
        let n = match read {
            Ok(n) if n > 0 => n,
            _ => break,
        };
        if s.write_all(&buf[..n]).await.is_err() {
            break;
        }
        let _ = s.snapshot(b"");
    }
}

/// A one-server pool whose application, for a plain TCP client, reads a
/// 4-byte request, says so on the returned channel, then answers `done`
/// and lets the client go once `hold` turns true, setting `released`.
async fn plain_holding_server() -> (
    ServerHandle,
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<()>,
    tokio::sync::watch::Sender<bool>,
    Arc<AtomicBool>,
) {
    let released = Arc::new(AtomicBool::new(false));
    let (hold_tx, hold_rx) = tokio::sync::watch::channel(false);
    let (got_tx, got_rx) = tokio::sync::mpsc::unbounded_channel();
    let flag = released.clone();
    let (handles, service) = pool_with(
        1,
        fast_balance(),
        |_, _| {},
        move |mut s| {
            let (flag, mut hold, got) = (flag.clone(), hold_rx.clone(), got_tx.clone());
            tokio::spawn(async move {
                assert!(s.id().is_none(), "only plain clients here");
                let mut req = [0u8; 4];
                if s.read_exact(&mut req).await.is_err() {
                    return;
                }
                let _ = got.send(());
                let _ = hold.wait_for(|go| *go).await;
                let _ = s.write_all(b"done").await;
                flag.store(true, Ordering::SeqCst);
            });
        },
    )
    .await;
    (handles[0].clone(), service[0], got_rx, hold_tx, released)
}

/// A drain waits, within its deadline, for the plain (non-migratory)
/// clients the application still holds to finish their request; at the
/// deadline it returns without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_for_the_plain_clients_the_application_holds() {
    // The application lets its client go while the drain runs.
    let (handle, addr, mut got, hold, released) = plain_holding_server().await;
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(b"req!").await.unwrap();
    got.recv().await.unwrap();
    let h = handle.clone();
    let drain = tokio::spawn(async move { h.drain(Duration::from_secs(20)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !drain.is_finished(),
        "the drain ended while the application still held a plain client"
    );
    hold.send_replace(true);
    let report = drain.await.unwrap();
    assert!(released.load(Ordering::SeqCst), "{report:?}");
    let mut answer = Vec::new();
    c.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"done");

    // The application never lets go: the drain returns at its deadline.
    let (handle, addr, mut got, _hold, released) = plain_holding_server().await;
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(b"req!").await.unwrap();
    got.recv().await.unwrap();
    handle.drain(Duration::from_millis(300)).await;
    assert!(!released.load(Ordering::SeqCst));
}

/// Session tickets are pool-wide: a client that a drain moves to a server
/// it never met resumes its TLS session there (no certificate exchange),
/// and the servers of another pool (another cluster key) cannot open that
/// ticket: they do a full handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_resumes_tls_at_a_server_the_client_never_met() {
    let (handles, service) = pool(2, fast_balance()).await;
    // Let the servers hear each other's load first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tls = common::client_tls();
    let mut c = MigratoryStream::connect(&service[..1], &tls).await.unwrap();
    round(&mut c, &pattern(5000, 1)).await;
    assert_eq!(handles[0].tls_handshakes(), (1, 0), "a first connection");
    let report = handles[0].drain(Duration::from_secs(20)).await;
    assert_eq!(report.moved, 1, "{report:?}");
    round(&mut c, &pattern(5000, 2)).await;
    assert_eq!(
        handles[1].tls_handshakes(),
        (0, 1),
        "s2 resumed the session with the ticket s1 gave"
    );

    // The same client settings (holding s2's ticket) with another pool.
    let (other, other_service) = pool_with(
        1,
        fast_balance(),
        |_, b| {
            b.cluster_key(b"another pool's cluster key 0123456789".as_slice());
        },
        |s| {
            tokio::spawn(common::echo(s));
        },
    )
    .await;
    let mut d = MigratoryStream::connect(&other_service, &tls)
        .await
        .unwrap();
    round(&mut d, &pattern(5000, 3)).await;
    assert_eq!(other[0].tls_handshakes(), (1, 0), "another pool's ticket");
    round(&mut c, &pattern(5000, 4)).await;
}
