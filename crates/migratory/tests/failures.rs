//! Failure handling over loopback: bad configuration, a peer with the wrong
//! cluster key, an origin killed in lazy mode.

mod common;

use common::free_addrs;

use std::net::SocketAddr;
use std::time::Duration;

use migratory::proto::client::ClientConfig;
use migratory::proto::config::ClientTimeouts;
use migratory::{Error, Manual, MigratoryStream, Peer, Server, ServerBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &[u8] = b"failure test cluster key 0123456789";

fn builder(i: usize, service: &[SocketAddr], control: &[SocketAddr], key: &[u8]) -> ServerBuilder {
    let mut b = ServerBuilder::new(format!("s{}", i + 1));
    b.tls(common::server_tls(&format!("s{}", i + 1)));
    b.service(service[i]).control(control[i]).cluster_key(key);
    for j in (0..service.len()).filter(|j| *j != i) {
        b.peer(Peer {
            id: format!("s{}", j + 1),
            service: service[j],
            control: control[j],
        });
    }
    b
}

/// Echo server loop; returns the task so a test can kill the server.
fn run(mut server: Server) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some((mut s, _)) = server.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut n_total = 0u64;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    n_total += n as u64;
                    let _ = s.snapshot(&n_total.to_be_bytes());
                }
            });
        }
    })
}

async fn msg(b: &ServerBuilder) -> String {
    b.bind().await.unwrap_err().to_string()
}

#[tokio::test]
async fn bad_configuration_fails_with_one_clear_error() {
    let a = free_addrs(2);
    let mut b = ServerBuilder::new("s1");
    b.tls(common::server_tls("s1"));
    b.service(a[0]).control(a[1]);
    assert!(msg(&b).await.contains("cluster_key: missing"));
    b.cluster_key(b"short");
    assert!(msg(&b).await.contains("at least 16 bytes"));
    b.cluster_key(KEY);
    b.peer(Peer {
        id: "s2".into(),
        service: a[0],
        control: a[1],
    });
    b.peer(Peer {
        id: "s2".into(),
        service: a[0],
        control: a[1],
    });
    assert!(msg(&b).await.contains("duplicate server id"));
    let mut b = ServerBuilder::new("");
    b.tls(common::server_tls("s1"));
    b.service(a[0]).control(a[1]).cluster_key(KEY);
    assert!(msg(&b).await.contains("must be 1 to 64 bytes"));
    let mut b = ServerBuilder::new("s1");
    b.tls(common::server_tls("s1"));
    b.service(a[0]).control(a[1]).cluster_key(KEY).backup("s9");
    assert!(msg(&b).await.contains("not a peer"));
    // Port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut b = ServerBuilder::new("s1");
    b.tls(common::server_tls("s1"));
    b.service(taken.local_addr().unwrap())
        .control(a[1])
        .cluster_key(KEY);
    let e = b.bind().await.unwrap_err();
    assert!(matches!(e, Error::Bind { .. }), "{e}");
    assert!(e.to_string().contains("cannot bind"), "{e}");
    // Peers not up yet are not fatal: binding works without them.
    let mut b = ServerBuilder::new("s1");
    b.tls(common::server_tls("s1"));
    b.service(a[0]).control(a[1]).cluster_key(KEY).peer(Peer {
        id: "s2".into(),
        service: "127.0.0.1:1".parse().unwrap(),
        control: "127.0.0.1:1".parse().unwrap(),
    });
    assert!(b.bind().await.is_ok());
}

#[tokio::test]
async fn a_peer_with_the_wrong_cluster_key_is_refused_and_the_session_stays() {
    let service = free_addrs(2);
    let control = free_addrs(2);
    let _s1 = run(builder(0, &service, &control, KEY).bind().await.unwrap());
    let _s2 = run(
        builder(1, &service, &control, b"another key, not the pool's 1234")
            .bind()
            .await
            .unwrap(),
    );
    let mut c = MigratoryStream::connect(&service[..1], &common::client_tls())
        .await
        .unwrap();
    c.write_all(b"hello").await.unwrap();
    // s2 cannot authenticate to s1, so it cannot get the state: the client
    // stays with (or returns to) s1 and nothing is lost.
    let r = c.migrate(Some("s2")).await;
    assert!(
        r.is_ok_and(|s| s.as_str() == "s1"),
        "the client is back on s1"
    );
    c.write_all(b" world").await.unwrap();
    let mut got = vec![0u8; 11];
    tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"hello world");
}

#[tokio::test]
async fn origin_killed_in_lazy_mode_is_a_clean_abort() {
    let service = free_addrs(3);
    let control = free_addrs(3);
    let s1 = run(builder(0, &service, &control, KEY).bind().await.unwrap());
    let _s2 = run(builder(1, &service, &control, KEY).bind().await.unwrap());
    let _s3 = run(builder(2, &service, &control, KEY).bind().await.unwrap());
    let cfg = ClientConfig {
        timeouts: ClientTimeouts {
            handshake: Duration::from_secs(2),
            ..ClientTimeouts::default()
        },
        ..ClientConfig::default()
    };
    let mut c =
        MigratoryStream::connect_with(cfg, &common::client_tls(), Box::new(Manual), &service[..1])
            .await
            .unwrap();
    c.write_all(b"before").await.unwrap();
    let mut got = vec![0u8; 6];
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"before");
    s1.abort(); // the origin dies; no replica anywhere (lazy mode)
    let mut buf = [0u8; 16];
    let err = tokio::time::timeout(Duration::from_secs(30), c.read(&mut buf))
        .await
        .expect("no hang past the timeouts")
        .expect_err("the session is lost");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted);
    let inner = Error::from_io(&err).expect("a migratory error");
    assert!(
        inner.to_string().contains("no server could resume"),
        "{inner}"
    );
}

#[tokio::test]
async fn a_session_the_application_drops_ends_with_eof_not_a_hang() {
    let (service, control) = (free_addrs(1), free_addrs(1));
    let mut server = builder(0, &service, &control, KEY).bind().await.unwrap();
    let handle = server.handle();
    tokio::spawn(async move {
        while let Some((mut s, _)) = server.accept().await {
            // Answer once, then drop the session without shutdown().
            let mut b = [0u8; 4];
            let _ = s.read_exact(&mut b).await;
            let _ = s.write_all(b"bye").await;
        }
    });
    let mut c = MigratoryStream::connect(&service, &common::client_tls())
        .await
        .unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got))
        .await
        .expect("EOF, not a hang")
        .unwrap();
    assert_eq!(got, b"bye");
    c.shutdown().await.unwrap();
    // The server forgets the session once the client closed too.
    tokio::time::timeout(Duration::from_secs(10), async {
        while !handle.sessions().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("session released");
}
