//! Client migration policies against real servers on loopback: the
//! throughput policy leaves a server whose stream degrades and stays on a
//! healthy one; the liveness policy leaves a server whose process hangs.
//! Every test checks each byte the client received.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use migratory::proto::client::ClientConfig;
use migratory::proto::config::ServerTimeouts;
use migratory::{
    Liveness, LivenessConfig, MigratoryStream, Peer, Policy, ServerBuilder, Status, Throughput,
    ThroughputConfig,
};
use migratory_services::stream::{self, byte_at, Shape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &[u8] = b"policy test cluster key 0123456789ab";

/// Bytes per write of the stream service.
const CHUNK: usize = 1024;

fn name(i: usize) -> String {
    format!("s{}", i + 1)
}

/// Server `i` of a pool whose service and control addresses are given,
/// backed up by `backup` if any.
fn builder(
    i: usize,
    service: &[SocketAddr],
    control: &[SocketAddr],
    backup: Option<usize>,
) -> ServerBuilder {
    let mut b = ServerBuilder::new(name(i));
    b.tls(common::server_tls(&name(i)));
    b.service(service[i]).control(control[i]).cluster_key(KEY);
    for j in (0..service.len()).filter(|j| *j != i) {
        b.peer(Peer {
            id: name(j),
            service: service[j],
            control: control[j],
        });
    }
    if let Some(k) = backup {
        b.backup(name(k));
    }
    b
}

/// Runs the stream service on a bound server, on the current runtime.
fn serve(mut server: migratory::Server, shape: Shape) {
    tokio::spawn(async move {
        while let Some((s, arrival)) = server.accept().await {
            tokio::spawn(stream::serve(s, arrival, shape, 16));
        }
    });
}

/// A pool of `n` servers running the stream service with `shape`.
async fn pool(n: usize, shape: Shape) -> Vec<SocketAddr> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let service = common::free_addrs(n);
    let control = common::free_addrs(n);
    for i in 0..n {
        let server = builder(i, &service, &control, None)
            .bind()
            .await
            .expect("bind");
        serve(server, shape);
    }
    service
}

/// What a client saw of a stream.
struct Received {
    /// Every byte matched the stream, and there were `len` of them.
    exact: bool,
    len: u64,
    /// The servers the session was attached to, in order.
    servers: Vec<String>,
    migrations: u64,
}

/// Asks for a stream of `len` bytes from `service` under `policy`, reads
/// it to its end and checks each byte against the stream; `at(pos)` is
/// called as the bytes come (to act at a given position).
async fn download(
    service: &[SocketAddr],
    policy: Box<dyn Policy>,
    len: u64,
    mut at: impl FnMut(u64),
) -> Received {
    let mut c = MigratoryStream::connect_with(
        ClientConfig::default(),
        &common::client_tls(),
        policy,
        &service[..1],
    )
    .await
    .expect("connect");
    let mut status = c.status();
    let servers = tokio::spawn(async move {
        let mut seen: Vec<String> = Vec::new();
        loop {
            if let Status::Attached { server, .. } = &*status.borrow_and_update() {
                if seen.last().map(String::as_str) != Some(server.as_str()) {
                    seen.push(server.to_string());
                }
            }
            if status.changed().await.is_err() || *status.borrow() == Status::Ended {
                return seen;
            }
        }
    });
    c.write_all(&len.to_be_bytes()).await.expect("request");
    let mut buf = vec![0u8; 64 * 1024];
    let (mut pos, mut exact) = (0u64, true);
    loop {
        let n = c.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        exact &= buf[..n]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == byte_at(pos + i as u64));
        pos += n as u64;
        at(pos);
    }
    let migrations = c.stats().migrations;
    drop(c);
    Received {
        exact: exact && pos == len,
        len: pos,
        servers: servers.await.unwrap(),
        migrations,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_throughput_policy_leaves_a_degrading_server() {
    tokio::time::timeout(Duration::from_secs(30), async {
        // 4 MiB/s for the first MiB on each server, then the rate halves
        // every 256 KiB: at that pace the 6 MiB would take over 40 s on one
        // server; with migrations, a few seconds.
        let shape = Shape {
            rate: 4.0 * 1048576.0,
            threshold: 1 << 20,
            ramp: 256 << 10,
            chunk: CHUNK,
        };
        let service = pool(2, shape).await;
        let len = 6 << 20;
        let got = download(
            &service,
            Box::new(Throughput::new(ThroughputConfig::default())),
            len,
            |_| (),
        )
        .await;
        assert_eq!(got.len, len);
        assert!(got.exact, "every byte once, in order");
        assert!(got.migrations >= 1, "servers: {:?}", got.servers);
        assert!(
            got.servers.len() >= 2 && got.servers[..2] == ["s1", "s2"],
            "{:?}",
            got.servers
        );
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_throughput_policy_stays_on_a_healthy_server() {
    tokio::time::timeout(Duration::from_secs(30), async {
        // A steady 4 MiB/s for the whole 8 MiB (two seconds, twenty
        // samples): never a reason to move.
        let shape = Shape {
            rate: 4.0 * 1048576.0,
            threshold: u64::MAX / 2,
            ramp: 1,
            chunk: CHUNK,
        };
        let service = pool(2, shape).await;
        let len = 8 << 20;
        let got = download(
            &service,
            Box::new(Throughput::new(ThroughputConfig::default())),
            len,
            |_| (),
        )
        .await;
        assert_eq!(got.len, len);
        assert!(got.exact, "every byte once, in order");
        assert_eq!(got.migrations, 0);
        assert_eq!(got.servers, ["s1"]);
    })
    .await
    .expect("bounded");
}

/// A server on a runtime of its own, on one thread, that the test can
/// freeze: a task that blocks that thread stops the server's process as
/// SIGSTOP, a deadlock or a long pause would. Its sockets stay open and its
/// kernel keeps acknowledging TCP; nothing reads, writes or answers.
struct Freezable {
    handle: tokio::runtime::Handle,
    release: Option<std::sync::mpsc::Sender<()>>,
}

impl Freezable {
    fn start(b: ServerBuilder, shape: Shape) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let server = b.bind().await.expect("bind");
                serve(server, shape);
                tx.send(tokio::runtime::Handle::current()).unwrap();
                std::future::pending::<()>().await
            });
        });
        Self {
            handle: rx.recv().unwrap(),
            release: None,
        }
    }

    fn freeze(&mut self) {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // Blocks the server's only thread until `tx` is dropped.
        self.handle.spawn(async move {
            let _ = rx.recv();
        });
        self.release = Some(tx);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_liveness_policy_leaves_a_server_that_hangs() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        // A steady stream; s1 keeps a replica of every session on s2
        // (eager replication), so that s2 can resume the session without
        // its hung origin.
        let shape = Shape {
            rate: 2.0 * 1048576.0,
            threshold: u64::MAX / 2,
            ramp: 1,
            chunk: CHUNK,
        };
        let service = common::free_addrs(2);
        let control = common::free_addrs(2);
        let mut s1 = Freezable::start(builder(0, &service, &control, Some(1)), shape);
        // s2 gives up on the hung origin after a second and resumes from
        // its replica.
        let mut b2 = builder(1, &service, &control, None);
        b2.timeouts(ServerTimeouts {
            state_request: Duration::from_secs(1),
            ..ServerTimeouts::default()
        });
        serve(b2.bind().await.expect("bind"), shape);
        let policy = Liveness::new(LivenessConfig {
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(200),
            misses: 3,
        });
        let len = 3 << 20;
        let mut frozen = false;
        let got = download(&service, Box::new(policy), len, |pos| {
            if !frozen && pos >= 1 << 20 {
                frozen = true;
                s1.freeze();
            }
        })
        .await;
        assert!(frozen);
        assert_eq!(got.len, len);
        assert!(got.exact, "every byte once, in order");
        assert_eq!(got.migrations, 1);
        assert_eq!(got.servers, ["s1", "s2"]);
        drop(s1.release.take());
    })
    .await
    .expect("bounded");
}
