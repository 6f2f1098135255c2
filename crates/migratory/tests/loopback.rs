//! Integration tests over loopback: a pool of in-process servers, a
//! `MigratoryStream` client, migrations of every kind while data flows both
//! ways; every byte is checked with sha256.

use std::net::SocketAddr;
use std::time::Duration;

use migratory::{Arrival, MigratoryStream, Peer, Server, ServerBuilder, ServerHandle, Session};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;

const KEY: &[u8] = b"loopback test cluster key 0123456789";

/// Free loopback addresses (bound then released).
fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let ls: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap()).collect()
}

struct Pool {
    handles: Vec<ServerHandle>,
    service: Vec<SocketAddr>,
    push: broadcast::Sender<String>,
}

fn name(i: usize) -> String {
    format!("s{}", i + 1)
}

/// The application: echo every byte back, snapshot after each write
/// (MTCP's contract: the echo's output depends only on its input, so the
/// state is just how far it got). Pushes its client away on command.
async fn echo(mut s: Session, arrival: Arrival, mut push: broadcast::Receiver<String>) {
    let mut done: u64 = match arrival {
        Arrival::Migrated { state } => u64::from_be_bytes(state[..].try_into().unwrap_or([0; 8])),
        _ => 0,
    };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::select! {
            r = s.read(&mut buf) => {
                let n = match r {
                    Ok(0) => {
                        let _ = s.shutdown().await;
                        return;
                    }
                    Ok(n) => n,
                    Err(_) => return, // migrated away, or failed
                };
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                done += n as u64;
                if s.snapshot(&done.to_be_bytes()).is_err() {
                    return;
                }
            }
            Ok(dest) = push.recv() => {
                let _ = s.migrate_to(Some(&dest));
            }
        }
    }
}

async fn pool(n: usize) -> Pool {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let service = free_addrs(n);
    let control = free_addrs(n);
    let (push, _) = broadcast::channel(16);
    let mut handles = Vec::new();
    for i in 0..n {
        let mut b = ServerBuilder::new(name(i));
        b.service(service[i]).control(control[i]).cluster_key(KEY);
        for j in (0..n).filter(|j| *j != i) {
            b.peer(Peer {
                id: name(j),
                service: service[j],
                control: control[j],
            });
        }
        let mut server: Server = b.bind().await.expect("bind");
        handles.push(server.handle());
        let push = push.clone();
        tokio::spawn(async move {
            while let Some((s, arrival)) = server.accept().await {
                tokio::spawn(echo(s, arrival, push.subscribe()));
            }
        });
    }
    Pool {
        handles,
        service,
        push,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 * 2654435761) >> 13) as u8 ^ seed)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_through_mixed_migrations_is_exact_both_ways() {
    let pool = pool(3).await;
    let stream = MigratoryStream::connect(&pool.service[..1])
        .await
        .expect("connect");
    let session = stream.session().unwrap();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let up = pattern(4 << 20, 7);
    let expected = Sha256::digest(&up);
    let writer = tokio::spawn(async move {
        for chunk in up.chunks(8 * 1024) {
            wr.write_all(chunk).await.unwrap();
            tokio::task::yield_now().await;
        }
        wr.shutdown().await.unwrap();
        wr
    });
    let reader = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            let n = rd.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            total += n;
        }
        (h.finalize(), total, rd)
    });
    // Migrations while data flows: server push and destination pull, by
    // turns, each waiting until the owner changed.
    let mut moves = 0;
    let mut owner = 0usize;
    for k in 0..24 {
        let next = (owner + 1 + k % 2) % 3;
        if k % 2 == 0 {
            let _ = pool.push.send(name(next));
        } else {
            pool.handles[next].pull(session, &name(owner)).unwrap();
        }
        let moved = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if pool.handles[next]
                    .sessions()
                    .iter()
                    .any(|(s, _)| *s == session)
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        if moved.is_ok() {
            moves += 1;
            owner = next;
        }
        if reader.is_finished() {
            break;
        }
    }
    let wr = writer.await.unwrap();
    let (digest, total, rd) = reader.await.unwrap();
    assert_eq!(total, 4 << 20);
    assert_eq!(digest, expected, "echo is byte-exact across migrations");
    assert!(
        moves >= 10,
        "only {moves} migrations happened while data flowed"
    );
    let stream = rd.unsplit(wr);
    assert!(stream.stats().migrations >= 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_initiated_migrations_keep_the_stream_exact() {
    let pool = pool(3).await;
    let mut stream = MigratoryStream::connect(&pool.service[1..2])
        .await
        .expect("connect");
    let mut sent = Vec::new();
    let mut got = Vec::new();
    for k in 0..20u8 {
        let chunk = pattern(10_000 + k as usize * 777, k);
        stream.write_all(&chunk).await.unwrap();
        sent.extend_from_slice(&chunk);
        let dest = name((k as usize + 2) % 3);
        let at = stream.migrate(Some(&dest)).await.expect("migrate");
        assert_eq!(at.as_str(), dest);
        while got.len() < sent.len() {
            let mut buf = vec![0u8; 65536];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
    }
    assert_eq!(got, sent);
    assert_eq!(stream.stats().migrations, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_client_is_served_as_plain() {
    let pool = pool(3).await;
    let mut s = tokio::net::TcpStream::connect(pool.service[0])
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 18];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"GET / HTTP/1.0\r\n\r\n");
}
