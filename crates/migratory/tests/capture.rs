//! What an eavesdropper with a packet capture sees: a whole session —
//! handshake, data both ways, two migrations and a failover from a
//! replica — runs in a network namespace of its own while a packet socket
//! records every byte on its loopback. Over TLS neither the payload nor
//! any session secret (nor any rekey) appears in the capture; the same
//! run in insecure plaintext shows all of them, so the capture is real.
//!
//! Needs root (network namespaces, packet sockets) and `ip`; skips with a
//! printed reason otherwise.

mod common;

/// The socket-migration tests' namespace helpers.
#[allow(dead_code)]
#[path = "../../migratory-repair/tests/common/mod.rs"]
mod ns;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::wire::Wire;
use migratory::proto::frame::{Frame, MigrateRequest};
use migratory::proto::mac::{migrate_mac, next_secret};
use migratory::proto::types::{MigrationCause, Secret, ServerId, SessionId};
use migratory::{Peer, Server, ServerBuilder, ServerTls};

const KEY: &[u8] = b"capture test cluster key 0123456789ab";

/// A network namespace with its loopback up, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("migcap-{tag}-{}", std::process::id());
        ns::delete_namespaces([&name]);
        ns::ip(&["netns", "add", &name]);
        ns::ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        ns::delete_namespaces([&self.0]);
    }
}

/// Everything a run produced: the capture, and what must not be in it.
struct Run {
    capture: Vec<u8>,
    packets: usize,
    token: Vec<u8>,
    secrets: Vec<Secret>,
    rekeys: Vec<[u8; 32]>,
}

/// Runs the session inside `netns` while a packet socket records its
/// loopback.
fn run_in(netns: &Netns, tls: bool) -> Run {
    ns::in_ns(&netns.0, move || {
        // Every packet on this namespace's loopback, both ways.
        const ETH_P_ALL: u16 = 0x0003;
        let sock = socket2::Socket::new(
            socket2::Domain::PACKET,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(i32::from(ETH_P_ALL.to_be()))),
        )
        .expect("packet socket");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let captured = Arc::new(Mutex::new((Vec::new(), 0usize)));
        // Threads made here live in the namespace too.
        let reader = {
            let (stop, captured) = (stop.clone(), captured.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 70_000];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = (&sock).read(&mut buf) {
                        let mut c = captured.lock().unwrap();
                        c.0.extend_from_slice(&buf[..n]);
                        c.1 += 1;
                    }
                }
                // What is still queued.
                while let Ok(n) = (&sock).read(&mut buf) {
                    let mut c = captured.lock().unwrap();
                    c.0.extend_from_slice(&buf[..n]);
                    c.1 += 1;
                }
            })
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (token, secrets, rekeys) = rt.block_on(session(tls));
        drop(rt);
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        let (capture, packets) = std::mem::take(&mut *captured.lock().unwrap());
        Run {
            capture,
            packets,
            token,
            secrets,
            rekeys,
        }
    })
    .join()
    .expect("the run panicked")
}

/// Three echo servers, each the backup of the next; returns their service
/// addresses and the task that runs each (abort it to crash the server).
async fn pool(tls: bool) -> (Vec<SocketAddr>, Vec<tokio::task::JoinHandle<()>>) {
    let addrs: Vec<SocketAddr> = (0..6)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], 7400 + i)))
        .collect();
    let name = |i: usize| format!("s{}", i + 1);
    let mut tasks = Vec::new();
    for i in 0..3 {
        let mut b = ServerBuilder::new(name(i));
        b.tls(if tls {
            common::server_tls(&name(i))
        } else {
            ServerTls::insecure_plaintext()
        })
        .service(addrs[i])
        .control(addrs[3 + i])
        .cluster_key(KEY)
        .backup(name((i + 1) % 3));
        for j in (0..3).filter(|j| *j != i) {
            b.peer(Peer {
                id: name(j),
                service: addrs[j],
                control: addrs[3 + j],
            });
        }
        let mut server: Server = b.bind().await.expect("bind");
        tasks.push(tokio::spawn(async move {
            while let Some((s, _)) = server.accept().await {
                tokio::spawn(common::echo(s));
            }
        }));
    }
    (addrs[..3].to_vec(), tasks)
}

/// Sends `data` and reads its echo on `w`.
async fn echo(w: &mut Wire, data: &[u8]) {
    w.send(Frame::Data(Bytes::copy_from_slice(data))).await;
    let mut got = Vec::new();
    while got.len() < data.len() {
        match w.recv().await {
            Some(Frame::Data(d)) => got.extend_from_slice(&d),
            Some(_) => {}
            None => panic!("closed after {} of {} bytes", got.len(), data.len()),
        }
    }
    assert_eq!(got, data, "the echo is exact");
}

/// The session, from a hand-written client that knows its secrets.
async fn session(tls: bool) -> (Vec<u8>, Vec<Secret>, Vec<[u8; 32]>) {
    let (svc, tasks) = pool(tls).await;
    let open = |a: SocketAddr| async move {
        if tls {
            Wire::open(a).await
        } else {
            Wire::open_plain(a).await
        }
    };
    let token = b"PAYLOAD-TOKEN-5b1e0c7d-never-in-clear".to_vec();
    let mut w = open(svc[0]).await;
    w.send(Frame::Hello { window: 1 << 20 }).await;
    let (session, mut secret): (SessionId, Secret) = match w.recv().await {
        Some(Frame::Welcome {
            session, secret, ..
        }) => (session, secret),
        f => panic!("expected Welcome, got {f:?}"),
    };
    let mut secrets = vec![secret.clone()];
    let mut rekeys = Vec::new();
    echo(&mut w, &token).await;
    let mut down = token.len() as u64;
    let mut epoch = 0;
    // s1 -> s2 -> s3 (migrations), then s3 crashes and s1 resumes the
    // session from its replica (failover).
    for (attempt, (to, origin, cause)) in [
        (1, "s1", MigrationCause::Requested),
        (2, "s2", MigrationCause::Requested),
        (0, "s3", MigrationCause::ServerFailed),
    ]
    .into_iter()
    .enumerate()
    {
        if cause == MigrationCause::ServerFailed {
            // Let the replica catch up, then crash s3.
            tokio::time::sleep(Duration::from_millis(300)).await;
            tasks[2].abort();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let req = MigrateRequest {
            session,
            origin: ServerId::new(origin).unwrap(),
            epoch,
            attempt: attempt as u64 + 1,
            cause,
            down,
            down_fin: false,
            draining: false,
            window: 1 << 20,
        };
        let mut next = open(svc[to]).await;
        let answer = next
            .migrate(req.clone(), |n| migrate_mac(&secret, &req, n))
            .await;
        let Some(Frame::Resumed {
            epoch: e,
            rekey: Some(k),
            ..
        }) = answer
        else {
            panic!("expected Resumed with a rekey from s{}: {answer:?}", to + 1);
        };
        secret = next_secret(&secret, &k, e);
        secrets.push(secret.clone());
        rekeys.push(k);
        epoch = e;
        w = next;
        echo(&mut w, &token).await;
        down += token.len() as u64;
    }
    for t in tasks {
        t.abort();
    }
    (token, secrets, rekeys)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_packet_capture_of_a_whole_session_shows_no_payload_and_no_secret() {
    if let Some(why) = ns::needs_root_and_ip() {
        eprintln!("skipped: {why}");
        return;
    }
    let ns = Netns::new("tls");
    let run = run_in(&ns, true);
    assert!(
        run.packets > 50 && run.capture.len() > 20_000,
        "a real capture: {} packets, {} bytes",
        run.packets,
        run.capture.len()
    );
    assert_eq!(run.secrets.len(), 4, "Welcome and three resumptions");
    assert!(!contains(&run.capture, &run.token), "the payload in clear");
    for (i, s) in run.secrets.iter().enumerate() {
        assert!(
            !contains(&run.capture, &s.0),
            "secret of epoch {i} in clear"
        );
    }
    for k in &run.rekeys {
        assert!(!contains(&run.capture, k), "a rekey in clear");
    }
    drop(ns);

    // The same in insecure plaintext: all of it is there to see.
    let ns = Netns::new("plain");
    let run = run_in(&ns, false);
    assert!(
        contains(&run.capture, &run.token),
        "plaintext payload captured"
    );
    for s in &run.secrets {
        assert!(contains(&run.capture, &s.0), "plaintext secret captured");
    }
}
