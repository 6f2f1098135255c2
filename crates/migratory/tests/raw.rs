//! The runtime against hand-made wire traffic: forged and unknown Migrates,
//! a stale incarnation writing into a migrated session, a destination that
//! never answers, and real `nc`/`socat` as plain clients.

mod common;

use common::free_addrs;
use common::wire::Wire;

use std::net::SocketAddr;
use std::time::Duration;

use migratory::proto::client::ClientConfig;
use migratory::proto::config::ClientTimeouts;
use migratory::proto::frame::{Frame, MigrateRequest, RejectReason};
use migratory::proto::mac::migrate_mac;
use migratory::proto::types::{MigrationCause, Secret, ServerId, SessionId};
use migratory::{Manual, MigratoryStream, Peer, Server, ServerBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &[u8] = b"raw wire test cluster key 0123456";

/// Echo servers s1..sn (peers of each other).
async fn pool(service: &[SocketAddr], control: &[SocketAddr], n: usize) {
    for i in 0..n {
        let mut b = ServerBuilder::new(format!("s{}", i + 1));
        b.tls(common::server_tls(&format!("s{}", i + 1)));
        b.service(service[i]).control(control[i]).cluster_key(KEY);
        for j in (0..service.len()).filter(|j| *j != i) {
            b.peer(Peer {
                id: format!("s{}", j + 1),
                service: service[j],
                control: control[j],
            });
        }
        let mut server: Server = b.bind().await.unwrap();
        tokio::spawn(async move {
            while let Some((s, _)) = server.accept().await {
                tokio::spawn(common::echo(s));
            }
        });
    }
}

/// A raw session on s1: (wire, session id, secret).
async fn raw_session(addr: SocketAddr) -> (Wire, SessionId, Secret) {
    let mut w = Wire::open(addr).await;
    w.send(Frame::Hello { window: 1 << 20 }).await;
    match w.recv().await {
        Some(Frame::Welcome {
            session, secret, ..
        }) => (w, session, secret),
        f => panic!("expected Welcome, got {f:?}"),
    }
}

fn request(session: SessionId, origin: &str) -> MigrateRequest {
    MigrateRequest {
        session,
        origin: ServerId::new(origin).unwrap(),
        epoch: 0,
        attempt: 1,
        cause: MigrationCause::Requested,
        down: 0,
        down_fin: false,
        draining: false,
        window: 1 << 20,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_unknown_migrates_are_refused() {
    let (svc, ctl) = (free_addrs(2), free_addrs(2));
    pool(&svc, &ctl, 2).await;
    let (_a, session, _) = raw_session(svc[0]).await;
    // Forged: the right session, a proof made without the secret.
    let mut w = Wire::open(svc[1]).await;
    let answer = w.migrate(request(session, "s1"), |_| [0x42; 32]).await;
    rejected(&answer, RejectReason::AuthFailed);
    // Unknown session.
    let mut w = Wire::open(svc[1]).await;
    let answer = w.migrate(request(SessionId(7), "s1"), |_| [0; 32]).await;
    rejected(&answer, RejectReason::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_incarnation_cannot_write_into_a_migrated_session() {
    let (svc, ctl) = (free_addrs(2), free_addrs(2));
    pool(&svc, &ctl, 2).await;
    let (mut old, session, secret) = raw_session(svc[0]).await;
    // Move the session to s2 on a new incarnation, with a real proof.
    let mut new = Wire::open(svc[1]).await;
    let req = request(session, "s1");
    let answer = new
        .migrate(req.clone(), |nonce| migrate_mac(&secret, &req, nonce))
        .await;
    assert!(
        matches!(answer, Some(Frame::Resumed { up: 0, down: 0, .. })),
        "{answer:?}"
    );
    // The stale incarnation writes; the live one writes; only the live
    // one's bytes reach the application (and come back, echoed).
    old.send(Frame::Data(bytes::Bytes::from_static(b"STALE")))
        .await;
    new.send(Frame::Data(bytes::Bytes::from_static(b"fresh")))
        .await;
    let mut echoed = Vec::new();
    while echoed.len() < 5 {
        match new.recv().await {
            Some(Frame::Data(d)) => echoed.extend_from_slice(&d),
            Some(_) => {}
            None => panic!("live incarnation closed"),
        }
    }
    assert_eq!(echoed, b"fresh");
    // The old incarnation gets nothing but its end.
    while let Some(f) = old.recv().await {
        assert!(
            !matches!(f, Frame::Data(_)),
            "data on a stale incarnation: {f:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_never_answers_costs_one_timeout_and_no_byte() {
    let (svc, ctl) = (free_addrs(2), free_addrs(2));
    // s2 is a black hole: it accepts connections and never answers.
    let hole = tokio::net::TcpListener::bind(svc[1]).await.unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    pool(&svc, &ctl, 1).await;
    let cfg = ClientConfig {
        timeouts: ClientTimeouts {
            handshake: Duration::from_millis(500),
            ..ClientTimeouts::default()
        },
        ..ClientConfig::default()
    };
    let mut c =
        MigratoryStream::connect_with(cfg, &common::client_tls(), Box::new(Manual), &svc[..1])
            .await
            .unwrap();
    c.write_all(b"one ").await.unwrap();
    let t0 = std::time::Instant::now();
    let at = tokio::time::timeout(Duration::from_secs(10), c.migrate(Some("s2")))
        .await
        .expect("no hang past the handshake timeout")
        .expect("the client carries on");
    assert_eq!(at.as_str(), "s1", "back on the live server");
    assert!(t0.elapsed() < Duration::from_secs(5));
    c.write_all(b"two").await.unwrap();
    let mut got = vec![0u8; 7];
    tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"one two");
}

/// Real `nc` and `socat` are plain TCP clients of a migratory port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nc_and_socat_work_as_plain_clients() {
    let (svc, ctl) = (free_addrs(1), free_addrs(1));
    pool(&svc, &ctl, 1).await;
    let mut ran = 0;
    for (tool, args) in [
        (
            "nc",
            vec![
                "-N".to_string(),
                "127.0.0.1".into(),
                svc[0].port().to_string(),
            ],
        ),
        (
            "socat",
            vec![
                "-t5".to_string(),
                "-".into(),
                format!("TCP:127.0.0.1:{}", svc[0].port()),
            ],
        ),
    ] {
        let Ok(mut child) = tokio::process::Command::new(tool)
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            println!("skipping {tool}: not installed");
            continue;
        };
        let payload = format!("hello from {tool}\n");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(payload.as_bytes())
            .await
            .unwrap();
        let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            payload,
            "{tool} got its bytes back"
        );
        ran += 1;
    }
    if ran == 0 {
        println!("skipping: neither nc nor socat is installed");
    }
}

/// Reads echoed Data on `w` until `want` came back.
async fn echoed(w: &mut Wire, want: &[u8]) {
    let mut got = Vec::new();
    while got.len() < want.len() {
        match w.recv().await {
            Some(Frame::Data(d)) => got.extend_from_slice(&d),
            Some(_) => {}
            None => panic!("closed after {} bytes", got.len()),
        }
    }
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proofs_are_bound_to_their_connection_and_old_secrets_move_nothing() {
    let (svc, ctl) = (free_addrs(2), free_addrs(2));
    pool(&svc, &ctl, 2).await;
    let (mut w1, session, secret0) = raw_session(svc[0]).await;
    w1.send(Frame::Data(bytes::Bytes::from_static(b"epoch 0")))
        .await;
    echoed(&mut w1, b"epoch 0").await;

    // A proof made for one connection, sent on another: refused.
    let mut real = Wire::open(svc[1]).await;
    let mut req = request(session, "s1");
    req.down = 7; // the echo so far
    let mac = migrate_mac(&secret0, &req, &real.binding());
    let mut thief = Wire::open(svc[1]).await;
    let answer = thief.migrate(req.clone(), |_| mac).await;
    rejected(&answer, RejectReason::AuthFailed);
    // On its own connection it is good: the session moves to s2, at a
    // new epoch with a new secret the client derives from the rekey.
    let answer = real.migrate(req.clone(), |_| mac).await;
    let Some(Frame::Resumed {
        epoch: 1,
        rekey: Some(rekey),
        ..
    }) = answer
    else {
        panic!("expected Resumed at epoch 1 with a rekey: {answer:?}");
    };
    let secret1 = migratory::proto::mac::next_secret(&secret0, &rekey, 1);
    assert_ne!(secret1, secret0);
    real.send(Frame::Data(bytes::Bytes::from_static(b"epoch 1")))
        .await;
    echoed(&mut real, b"epoch 1").await;

    // An attacker with the session id, its epoch and the old epoch's
    // secret, with fresh proofs for its own connections and the largest
    // attempt numbers: refused at both servers, for both epochs.
    for (epoch, origin) in [(0, "s1"), (1, "s2"), (0, "s2")] {
        for target in [svc[0], svc[1]] {
            let mut r = request(session, origin);
            r.epoch = epoch;
            r.attempt = u64::MAX;
            let mut w = Wire::open(target).await;
            let answer = w.migrate(r.clone(), |b| migrate_mac(&secret0, &r, b)).await;
            assert!(
                matches!(
                    answer,
                    Some(Frame::Reject {
                        reason: RejectReason::AuthFailed | RejectReason::NotFound,
                        ..
                    })
                ),
                "epoch {epoch} at {target}: {answer:?}"
            );
        }
    }
    // The client is not locked out: with the current secret and its own
    // next attempt it moves the session back to s1, and the stream is
    // exact.
    let mut back = Wire::open(svc[0]).await;
    let mut r = request(session, "s2");
    r.epoch = 1;
    r.attempt = 2;
    r.down = 14; // both echoes so far
    let answer = back
        .migrate(r.clone(), |b| migrate_mac(&secret1, &r, b))
        .await;
    assert!(
        matches!(answer, Some(Frame::Resumed { epoch: 2, .. })),
        "{answer:?}"
    );
    back.send(Frame::Data(bytes::Bytes::from_static(b"epoch 2")))
        .await;
    echoed(&mut back, b"epoch 2").await;
}

/// Asserts `answer` is a Reject for `reason`.
fn rejected(answer: &Option<Frame>, reason: RejectReason) {
    assert!(
        matches!(answer, Some(Frame::Reject { reason: r, .. }) if *r == reason),
        "expected a Reject for {reason:?}: {answer:?}"
    );
}
