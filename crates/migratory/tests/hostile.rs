//! Hostile peers against bounded memory (docs/architecture.md invariant 4): a client
//! that acknowledges bytes it never received, and a backup that stops
//! reading. Each test measures this process's resident memory, so they
//! run one at a time.

mod common;

use common::free_addrs;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use migratory::proto::config::ServerTimeouts;
use migratory::proto::frame::{Frame, DEFAULT_MAX_FRAME, PREAMBLE};
use migratory::proto::peer::PeerLink;
use migratory::proto::types::ServerId;
use migratory::{MigratoryStream, Peer, ServerBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

const KEY: &[u8] = b"hostile peers test cluster key 0123";

/// One memory-measuring test at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// This process's resident set size, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// The byte at position `i` of the generated down stream.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31).wrapping_add(7) % 251) as u8
}

/// A client that acknowledges far more than it received is closed with a
/// protocol error, and the server's memory stays bounded; an honest
/// session on the same server is served byte-exact afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_acknowledging_bytes_it_never_received_is_cut_off() {
    let _serial = SERIAL.lock().await;
    let a = free_addrs(2);
    let mut b = ServerBuilder::new("s1");
    b.tls(common::server_tls("s1"));
    b.service(a[0]).control(a[1]).cluster_key(KEY);
    let mut server = b.bind().await.unwrap();
    tokio::spawn(async move {
        while let Some((mut s, _)) = server.accept().await {
            tokio::spawn(async move {
                let mut pos = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    for (k, b) in buf.iter_mut().enumerate() {
                        *b = pattern(pos + k as u64);
                    }
                    if s.write_all(&buf).await.is_err() {
                        return;
                    }
                    pos += buf.len() as u64;
                }
            });
        }
    });
    let before = rss();

    let mut s = common::tls_connect(a[0], "s1").await;
    s.write_all(&PREAMBLE).await.unwrap();
    send(&mut s, Frame::Hello { window: 1 << 40 }).await;
    let mut rx = BytesMut::new();
    match recv(&mut s, &mut rx).await {
        Some(Frame::Welcome { .. }) => {}
        f => panic!("expected Welcome, got {f:?}"),
    }
    // Honest first: 1 MiB read, checked, and acknowledged exactly.
    let mut got = 0u64;
    while got < 1 << 20 {
        match recv(&mut s, &mut rx).await {
            Some(Frame::Data(d)) => {
                check(&d, got);
                got += d.len() as u64;
            }
            Some(Frame::Ack { .. }) => {}
            f => panic!("unexpected {f:?}"),
        }
    }
    send(
        &mut s,
        Frame::Ack {
            pos: got,
            limit: got + (1 << 40),
            fin: false,
        },
    )
    .await;
    // Then lies: acknowledgements of up to 256 MiB more, without reading.
    let mut lies = 0;
    for k in 1..=256u64 {
        let mut b = BytesMut::new();
        Frame::Ack {
            pos: got + (k << 20),
            limit: got + (1 << 40),
            fin: false,
        }
        .encode(&mut b);
        if s.write_all(&b).await.is_err() || s.flush().await.is_err() {
            break;
        }
        lies += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(lies > 0);
    // The server cut the connection off: what is left to read is bounded
    // (kernel buffers and one batch), exact, and ends.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut after = 0u64;
    loop {
        assert!(
            Instant::now() < deadline,
            "the lying client was never closed"
        );
        match recv(&mut s, &mut rx).await {
            Some(Frame::Data(d)) => {
                check(&d, got);
                got += d.len() as u64;
                after += d.len() as u64;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert!(
        after < 32 << 20,
        "{after} bytes were sent after the lies began"
    );
    let grown = rss().saturating_sub(before);
    assert!(grown < 48 << 20, "the server grew by {grown} bytes");

    // An honest session on the same server is served as usual.
    let mut c = MigratoryStream::connect(&[a[0]], &common::client_tls())
        .await
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    c.read_exact(&mut buf).await.unwrap();
    for (i, b) in buf.iter().enumerate() {
        assert_eq!(*b, pattern(i as u64), "byte {i}");
    }
}

/// An origin whose backup stops reading gives the backup up after the
/// backup timeout: its session keeps going, byte-exact, and its memory
/// stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_that_stops_reading_does_not_stall_the_origin() {
    let _serial = SERIAL.lock().await;
    let a = free_addrs(4);
    // The "backup" s2: authenticates as s2, then never reads again.
    let backup = TcpListener::bind(a[3]).await.unwrap();
    let stalled = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (tcp, _) = backup.accept().await.unwrap();
            let Ok(mut s) = common::tls_accept(tcp, "s2").await else {
                continue;
            };
            let me = ServerId::new("s2").unwrap();
            let mut link = PeerLink::new(me, KEY, [7; 32], None);
            let mut buf = vec![0u8; 4096];
            while link.peer().is_none() {
                let out = link.take_output();
                if !out.is_empty() && (s.write_all(&out).await.is_err() || s.flush().await.is_err())
                {
                    break;
                }
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if link.handle_input(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let out = link.take_output();
            let _ = s.write_all(&out).await;
            let _ = s.flush().await;
            held.push(s);
        }
    });
    let mut b = ServerBuilder::new("s1");
    b.tls(common::server_tls("s1"));
    b.service(a[0])
        .control(a[1])
        .cluster_key(KEY)
        .peer(Peer {
            id: "s2".into(),
            service: a[2],
            control: a[3],
        })
        .backup("s2")
        .timeouts(ServerTimeouts {
            backup: Duration::from_secs(1),
            ..ServerTimeouts::default()
        });
    let mut server = b.bind().await.unwrap();
    tokio::spawn(async move {
        while let Some((mut s, _)) = server.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    let _ = s.snapshot(b"");
                }
            });
        }
    });
    let before = rss();
    let c = MigratoryStream::connect(&[a[0]], &common::client_tls())
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(c);
    const TOTAL: u64 = 64 << 20;
    let writer = tokio::spawn(async move {
        let mut pos = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        while pos < TOTAL {
            for (k, b) in buf.iter_mut().enumerate() {
                *b = pattern(pos + k as u64);
            }
            wr.write_all(&buf).await.unwrap();
            pos += buf.len() as u64;
        }
        wr
    });
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let read = async {
        while got < TOTAL {
            let n = rd.read(&mut buf).await.unwrap();
            assert!(n > 0, "EOF after {got} bytes");
            check(&buf[..n], got);
            got += n as u64;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .expect("the session stalled behind its backup");
    let _ = writer.await.unwrap();
    let grown = rss().saturating_sub(before);
    assert!(grown < 96 << 20, "the origin grew by {grown} bytes");
    stalled.abort();
}

fn check(d: &[u8], at: u64) {
    for (k, b) in d.iter().enumerate() {
        assert_eq!(*b, pattern(at + k as u64), "byte {}", at + k as u64);
    }
}

async fn send(s: &mut common::TlsConn, f: Frame) {
    let mut b = BytesMut::new();
    f.encode(&mut b);
    s.write_all(&b).await.unwrap();
    s.flush().await.unwrap();
}

/// The next frame, or `None` at EOF or reset.
async fn recv(s: &mut common::TlsConn, rx: &mut BytesMut) -> Option<Frame> {
    loop {
        if let Some(f) = Frame::decode(rx, DEFAULT_MAX_FRAME).unwrap() {
            return Some(f);
        }
        let mut buf = [0u8; 64 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("no input for 10 s")
            .ok()?;
        if n == 0 {
            return None;
        }
        rx.extend_from_slice(&buf[..n]);
    }
}
