//! Integration tests over loopback: a pool of in-process servers, a
//! `MigratoryStream` client, migrations of every kind while data flows both
//! ways; every byte is checked with sha256.

mod common;

use common::free_addrs;

use std::net::SocketAddr;
use std::time::Duration;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use migratory::proto::control::{PushOutcome, Selection};
use migratory::proto::types::SessionId;
use migratory::{
    ClientControl, MigrationPhases, MigratoryStream, Operator, Peer, Server, ServerBuilder,
    ServerHandle, Session, SessionControl,
};
use migratory_services::transfer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &[u8] = b"loopback test cluster key 0123456789";

struct Pool {
    handles: Vec<ServerHandle>,
    service: Vec<SocketAddr>,
    control: Vec<SocketAddr>,
    /// The latest session control per server (for server push).
    controls: Arc<Mutex<HashMap<usize, SessionControl>>>,
}

fn name(i: usize) -> String {
    format!("s{}", i + 1)
}

/// Echo: every byte back, snapshot after each write (output depends only
/// on input, so the state is just the count).
async fn echo(mut s: Session) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut done = 0u64;
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) => {
                let _ = s.shutdown().await;
                return;
            }
            Ok(n) => n,
            Err(_) => return, // migrated away
        };
        if s.write_all(&buf[..n]).await.is_err() {
            return;
        }
        done += n as u64;
        if s.snapshot(&done.to_be_bytes()).is_err() {
            return;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum App {
    Echo,
    Transfer,
}

async fn pool(n: usize, app: App) -> Pool {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let service = free_addrs(n);
    let control = free_addrs(n);
    let controls: Arc<Mutex<HashMap<usize, SessionControl>>> = Arc::default();
    let mut handles = Vec::new();
    for i in 0..n {
        let mut b = ServerBuilder::new(name(i));
        b.tls(common::server_tls(&name(i)));
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
        let controls = controls.clone();
        tokio::spawn(async move {
            while let Some((s, arrival)) = server.accept().await {
                if let Some(c) = s.control() {
                    controls.lock().unwrap().insert(i, c);
                }
                match app {
                    App::Echo => drop(tokio::spawn(echo(s))),
                    App::Transfer => drop(tokio::spawn(transfer::serve(s, arrival))),
                }
            }
        });
    }
    Pool {
        handles,
        service,
        control,
        controls,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 * 2654435761) >> 13) as u8 ^ seed)
        .collect()
}

/// Waits until the client is attached to `dest`.
async fn attached_to(c: &ClientControl, dest: &str) -> bool {
    tokio::time::timeout(Duration::from_secs(10), async {
        while c.server().as_ref().map(|s| s.as_str()) != Some(dest) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_through_mixed_migrations() {
    const LEN: u64 = 64 << 20;
    const MOVES: u64 = 24;
    let pool = pool(3, App::Transfer).await;
    let stream = MigratoryStream::connect(&pool.service[..1], &common::client_tls())
        .await
        .expect("connect");
    let mut ctl = stream.control();
    let session = ctl.session().unwrap();
    let (mut rd, mut wr) = tokio::io::split(stream);
    // Each side may only get this far, so every migration happens while
    // data flows both ways.
    let (gate_tx, gate) = tokio::sync::watch::channel(LEN / (MOVES + 1));
    let (up_gate, down_gate) = (gate.clone(), gate);
    let writer = tokio::spawn(async move {
        let digest = transfer::send_upload(&mut wr, LEN, 1, LEN, 2, Some(up_gate), |_| ())
            .await
            .unwrap();
        (digest, wr)
    });
    let reader = tokio::spawn(async move {
        let d = transfer::receive_download(&mut rd, LEN, 1, Some(down_gate), |_| ())
            .await
            .unwrap();
        (d, rd)
    });
    let mut owner = 0usize;
    for k in 0..MOVES {
        // Every kind of migration, to every other server, by turns.
        let next = (owner + 1 + ((k / 3) as usize % 2)) % 3;
        match k % 3 {
            0 => {
                ctl.migrate(Some(&name(next)))
                    .await
                    .expect("client migration");
            }
            1 => {
                // The accept loop stores the new session's control a moment
                // after the client attached: retry until it is the live one.
                let mut pushed = false;
                for _ in 0..1000 {
                    let c = pool.controls.lock().unwrap().get(&owner).cloned();
                    if c.is_some_and(|c| c.migrate_to(Some(&name(next))).is_ok()) {
                        pushed = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                assert!(pushed, "push {k} from {}", name(owner));
            }
            _ => pool.handles[next]
                .pull(session, &name(owner))
                .expect("pull"),
        }
        assert!(
            attached_to(&ctl, &name(next)).await,
            "migration {k} to {} did not happen",
            name(next)
        );
        owner = next;
        gate_tx.send_replace(LEN * (k + 2) / (MOVES + 1));
    }
    gate_tx.send_replace(u64::MAX);
    let (up_digest, wr) = writer.await.unwrap();
    let (down, rd) = reader.await.unwrap();
    assert_eq!(down.len, LEN);
    assert!(down.exact, "download is byte-exact");
    assert_eq!(down.sha256, transfer::expected_sha256(1, LEN));
    assert_eq!(
        down.upload_report,
        (LEN, up_digest),
        "the server read the upload exactly once, in order"
    );
    let stream = rd.unsplit(wr);
    assert_eq!(stream.stats().migrations, MOVES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_initiated_migrations_keep_the_stream_exact() {
    let pool = pool(3, App::Echo).await;
    let mut stream = MigratoryStream::connect(&pool.service[1..2], &common::client_tls())
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
    // A server the pool never announced: a clear error, and the session
    // stays where it is.
    let before = stream.server();
    let e = stream
        .migrate(Some("s9"))
        .await
        .expect_err("unknown server");
    assert!(
        matches!(&e, migratory::Error::UnknownServer { server, known }
            if server == "s9" && known == &["s1", "s2", "s3"]),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "unknown server s9: this session knows s1, s2, s3"
    );
    assert_eq!(stream.server(), before);
    assert_eq!(stream.stats().migrations, 20);
    stream.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_chunks_gives_the_stream_exactly_across_migrations() {
    const LEN: usize = 8 << 20;
    let pool = pool(2, App::Echo).await;
    let stream = MigratoryStream::connect(&pool.service[..1], &common::client_tls())
        .await
        .expect("connect");
    let mut control = stream.control();
    let data = pattern(LEN, 5);
    // The writer migrates the session as it goes (a session whose writing
    // is closed does not migrate any more), while the reader takes chunks.
    let write = async {
        let mut w = &stream;
        for (i, piece) in data.chunks(100_000).enumerate() {
            w.write_all(piece).await.expect("write");
            if i % 16 == 15 {
                let dest = if i / 16 % 2 == 0 { "s2" } else { "s1" };
                let at = control.migrate(Some(dest)).await.expect("migrate");
                assert_eq!(at.as_str(), dest);
            }
        }
        w.shutdown().await.expect("shutdown");
    };
    let read = async {
        let mut got = Vec::with_capacity(LEN);
        // A plain read first: the two kinds of read share one stream.
        let mut first = [0u8; 1000];
        (&stream).read_exact(&mut first).await.expect("read");
        got.extend_from_slice(&first);
        let mut chunks: [bytes::Bytes; 4] = Default::default();
        let mut calls = 0u32;
        while let Some(k) = stream.read_chunks(&mut chunks).await.expect("read_chunks") {
            assert!((1..=4).contains(&k), "{k} chunks");
            for c in &mut chunks[..k] {
                assert!(!c.is_empty());
                got.extend_from_slice(c);
                *c = bytes::Bytes::new();
            }
            calls += 1;
        }
        // The end stays the end.
        assert_eq!(
            stream.read_chunks(&mut chunks).await.expect("at the end"),
            None
        );
        (got, calls)
    };
    let ((), (got, calls)) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(write, read)
    })
    .await
    .expect("the echo completes");
    assert_eq!(got.len(), LEN);
    assert!(got == data, "every byte echoed once, in order");
    assert!(
        stream.stats().migrations >= 2,
        "{} migrations in {calls} reads",
        stream.stats().migrations
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_with_sends_what_it_appends_in_place() {
    const LEN: usize = 6 << 20;
    let pool = pool(2, App::Echo).await;
    let stream = MigratoryStream::connect(&pool.service[..1], &common::client_tls())
        .await
        .expect("connect");
    let mut control = stream.control();
    let data = pattern(LEN, 9);
    let write = async {
        // An error from `fill` comes back, and what it appended first is
        // sent all the same.
        let e = stream
            .write_with(|buf| {
                bytes::BufMut::put_slice(buf, &data[..3]);
                Err(std::io::Error::other("fill failed"))
            })
            .await
            .expect_err("the error of fill");
        assert_eq!(e.to_string(), "fill failed");
        let mut rest = &data[3..];
        let mut calls = 0u32;
        while !rest.is_empty() {
            let n = stream
                .write_with(|buf| {
                    let room = bytes::BufMut::remaining_mut(buf);
                    assert!((1..=64 * 1024).contains(&room), "{room}");
                    let n = room.min(rest.len());
                    bytes::BufMut::put_slice(buf, &rest[..n]);
                    Ok(n)
                })
                .await
                .expect("write_with");
            rest = &rest[n..];
            calls += 1;
            if calls % 40 == 0 {
                let dest = name((calls / 40) as usize % 2);
                let at = control.migrate(Some(&dest)).await.expect("migrate");
                assert_eq!(at.as_str(), dest);
            }
        }
        (&stream).shutdown().await.expect("shutdown");
    };
    let read = async {
        let mut got = Vec::with_capacity(LEN);
        (&stream).read_to_end(&mut got).await.expect("read");
        got
    };
    let ((), got) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(write, read)
    })
    .await
    .expect("the echo completes");
    assert_eq!(got.len(), LEN);
    assert!(got == data, "every byte echoed once, in order");
    assert!(stream.stats().migrations >= 2, "{:?}", stream.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_steps_of_a_migration_are_timed_at_client_destination_and_origin() {
    let pool = pool(2, App::Echo).await;
    let mut stream = MigratoryStream::connect(&pool.service[..1], &common::client_tls())
        .await
        .expect("connect");
    let (mut sent, mut got) = (Vec::new(), Vec::new());
    echo_round(&mut stream, 1, &mut sent, &mut got).await;
    assert!(stream.last_migration_times().is_none(), "no migration yet");
    let session = stream.session().expect("established");
    stream.migrate(Some(&name(1))).await.expect("migrate");
    echo_round(&mut stream, 2, &mut sent, &mut got).await;
    assert_eq!(got, sent);
    assert!(stream.last_migration_times().is_some());
    // The origin answered, the destination resumed it: each timed the
    // migration once.
    let origin = pool.handles[0].take_migration_phases();
    let dest = pool.handles[1].take_migration_phases();
    assert!(
        matches!(origin[..], [MigrationPhases::Origin { session: s, .. }] if s == session),
        "{origin:?}"
    );
    assert!(
        matches!(dest[..], [MigrationPhases::Destination { session: s, .. }] if s == session),
        "{dest:?}"
    );
    assert!(pool.handles[1].take_migration_phases().is_empty(), "taken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_client_is_served_as_plain() {
    let pool = pool(3, App::Echo).await;
    let mut s = tokio::net::TcpStream::connect(pool.service[0])
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 18];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"GET / HTTP/1.0\r\n\r\n");
}

/// Writes 100 kB and reads its echo.
async fn echo_round(stream: &mut MigratoryStream, i: u8, sent: &mut Vec<u8>, got: &mut Vec<u8>) {
    let chunk = pattern(100_000, i);
    sent.extend_from_slice(&chunk);
    stream.write_all(&chunk).await.expect("write");
    let mut back = vec![0u8; chunk.len()];
    stream.read_exact(&mut back).await.expect("read");
    got.extend_from_slice(&back);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_lists_and_pushes_sessions_over_the_control_address() {
    let pool = pool(3, App::Echo).await;
    let mut stream = MigratoryStream::connect(&pool.service[..1], &common::client_tls())
        .await
        .expect("connect");
    let sid = stream.session().expect("session");
    let mut sent = Vec::new();
    let mut got = Vec::new();
    echo_round(&mut stream, 1, &mut sent, &mut got).await;

    let mut op = Operator::connect(pool.control[0], &common::operator_tls(), KEY, "s1")
        .await
        .expect("operator connects");
    let rows = op.sessions().await.expect("list");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].session, sid);
    let client = rows[0].client.expect("client connected");
    assert!(client.ip().is_loopback() && client.port() != 0, "{client}");
    assert_eq!((rows[0].up, rows[0].down), (100_000, 100_000));

    // Push it to s2 and back to s1 by the session id, with data between.
    let res = op
        .push("s2", Selection::Session(sid), Duration::from_secs(10))
        .await
        .expect("push");
    assert!(
        matches!(&res[..], [(s, PushOutcome::Moved { to, .. })] if *s == sid && to.as_str() == "s2"),
        "{res:?}"
    );
    assert!(op.sessions().await.expect("list").is_empty());
    echo_round(&mut stream, 2, &mut sent, &mut got).await;
    let mut op2 = Operator::connect(pool.control[1], &common::operator_tls(), KEY, "s2")
        .await
        .expect("operator connects to s2");
    let res = op2
        .push("s1", Selection::All, Duration::from_secs(10))
        .await
        .expect("push all");
    assert!(
        matches!(&res[..], [(_, PushOutcome::Moved { to, .. })] if to.as_str() == "s1"),
        "{res:?}"
    );
    echo_round(&mut stream, 3, &mut sent, &mut got).await;
    // Two operators push the same session at once: each sees it move, or
    // (when its request came after the move) not here; never "ended".
    let mut op3 = Operator::connect(pool.control[0], &common::operator_tls(), KEY, "s1")
        .await
        .expect("second operator");
    let wait = Duration::from_secs(10);
    let (a, b) = tokio::join!(
        op.push("s3", Selection::Session(sid), wait),
        op3.push("s3", Selection::Session(sid), wait)
    );
    let (a, b) = (a.expect("push"), b.expect("push"));
    for res in [&a, &b] {
        assert!(
            matches!(&res[..], [(_, PushOutcome::Moved { to, .. })] if to.as_str() == "s3")
                || res[..] == [(sid, PushOutcome::NotFound)],
            "{res:?}"
        );
    }
    assert!(
        a.iter()
            .chain(&b)
            .any(|(_, o)| matches!(o, PushOutcome::Moved { .. })),
        "{a:?} {b:?}"
    );
    echo_round(&mut stream, 4, &mut sent, &mut got).await;
    assert_eq!(got, sent, "every byte echoed exactly once");

    // Nothing to move, an unknown session, a destination that is no peer.
    let res = op2
        .push("s1", Selection::Count(5), Duration::from_secs(1))
        .await
        .expect("push none");
    assert!(res.is_empty(), "{res:?}");
    let res = op2
        .push(
            "s3",
            Selection::Session(SessionId(7)),
            Duration::from_secs(1),
        )
        .await
        .expect("push unknown");
    assert_eq!(res, vec![(SessionId(7), PushOutcome::NotFound)]);
    let err = op2
        .push("nope", Selection::All, Duration::from_secs(1))
        .await
        .expect_err("not a peer");
    assert!(err.to_string().contains("not a peer"), "{err}");
    // The connection is still usable after a refused request.
    assert!(op2.sessions().await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_with_a_wrong_key_or_server_is_refused() {
    let pool = pool(2, App::Echo).await;
    let err = Operator::connect(
        pool.control[0],
        &common::operator_tls(),
        b"not the cluster key at all",
        "s1",
    )
    .await
    .expect_err("wrong key");
    assert!(err.to_string().contains("authentication"), "{err}");
    let err = Operator::connect(pool.control[0], &common::operator_tls(), KEY, "s2")
        .await
        .expect_err("wrong server");
    // TLS refuses a server whose certificate does not name the one asked for.
    assert!(
        err.to_string().contains("not valid for name \"s2\""),
        "{err}"
    );
    let closed = free_addrs(1)[0];
    let err = Operator::connect(closed, &common::operator_tls(), KEY, "s1")
        .await
        .expect_err("nobody there");
    assert!(matches!(err, migratory::Error::Connect { .. }), "{err}");
}
