//! Checkpoint and restore of real kernel TCP sockets over loopback, in one
//! process: the peer is a plain `std` TcpStream that never knows. Needs
//! CAP_NET_ADMIN: each test skips, saying so, when not root.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

use migratory_repair::{checkpoint, restore, RepairError, TcpState};

fn root() -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        eprintln!("skipped: TCP_REPAIR needs CAP_NET_ADMIN (run the tests as root)");
    }
    root
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

/// A connected pair: (our server-side socket, the plain peer).
fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (ours, _) = l.accept().unwrap();
    // The listener must go: a restored socket re-binds its port.
    drop(l);
    for s in [&ours, &peer] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    (ours, peer)
}

/// Writes without blocking forever: as much of `data` as fits.
fn write_some(s: &TcpStream, data: &[u8]) -> usize {
    s.set_nonblocking(true).unwrap();
    let mut n = 0;
    let mut w = s;
    while n < data.len() {
        match w.write(&data[n..]) {
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    n
}

#[test]
fn established_socket_with_data_queued_both_ways_continues_exactly() {
    if !root() {
        return;
    }
    let (ours, mut peer) = pair();
    ours.set_nodelay(true).unwrap();
    // Up: the peer writes; we never read it (our receive queue).
    let up = pattern(100_000, 1);
    peer.write_all(&up).unwrap();
    // Down: we write more than the peer's buffers take (sent-unacked and
    // never-sent data in our send queue).
    let down = pattern(8 << 20, 2);
    let queued = write_some(&ours, &down);
    assert!(queued > 0);
    std::thread::sleep(Duration::from_millis(100));

    let image = checkpoint(&ours).expect("checkpoint");
    assert_eq!(image.state, TcpState::Established);
    assert_eq!(
        image.received, up,
        "the receive queue is what the peer wrote"
    );
    assert!(
        !image.unsent.is_empty(),
        "part of the send queue was never sent"
    );
    assert!(image.options.nodelay);
    let in_image = image.sent.len() + image.unsent.len();
    drop(ours); // silent: still in repair mode

    let mut restored = restore(&image).expect("restore");
    assert!(restored.nodelay().unwrap());
    // Everything written before the checkpoint reaches the peer, once.
    let mut got = vec![0u8; queued];
    let reader = std::thread::spawn(move || {
        peer.read_exact(&mut got).unwrap();
        (peer, got)
    });
    let (mut peer, got) = reader.join().unwrap();
    assert_eq!(got, down[..queued], "down stream exact");
    assert!(queued >= in_image);
    // The restored socket reads the queued up bytes, then carries on.
    let mut back = vec![0u8; up.len()];
    restored.read_exact(&mut back).unwrap();
    assert_eq!(back, up);
    peer.write_all(b"after").unwrap();
    let mut after = [0u8; 5];
    restored.read_exact(&mut after).unwrap();
    assert_eq!(&after, b"after");
    restored.write_all(b"and back").unwrap();
    let mut and_back = [0u8; 8];
    peer.read_exact(&mut and_back).unwrap();
    assert_eq!(&and_back, b"and back");
    // A clean close both ways.
    restored.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    peer.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    peer.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    restored.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn our_half_close_restores_and_finishes() {
    if !root() {
        return;
    }
    // FIN_WAIT2: we closed our side, the peer acknowledged, and may still
    // send.
    let (ours, mut peer) = pair();
    ours.shutdown(Shutdown::Write).unwrap();
    let mut eof = Vec::new();
    peer.read_to_end(&mut eof).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    peer.write_all(b"late data").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let image = checkpoint(&ours).expect("checkpoint");
    assert_eq!(image.state, TcpState::FinWait2);
    assert_eq!(image.received, b"late data");
    drop(ours);
    let mut restored = restore(&image).expect("restore");
    peer.write_all(b" and more").unwrap();
    peer.shutdown(Shutdown::Write).unwrap();
    let mut all = Vec::new();
    restored.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"late data and more");
}

#[test]
fn fin_wait1_with_unsent_data_restores_and_finishes() {
    if !root() {
        return;
    }
    // FIN_WAIT1: we wrote more than the peer takes, then closed: the FIN
    // waits behind never-sent data.
    let (ours, mut peer) = pair();
    let down = pattern(8 << 20, 3);
    let queued = write_some(&ours, &down);
    ours.shutdown(Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let image = checkpoint(&ours).expect("checkpoint");
    assert_eq!(image.state, TcpState::FinWait1);
    drop(ours);
    let restored = restore(&image).expect("restore");
    let mut got = Vec::new();
    peer.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), queued);
    assert!(got == down[..queued], "down stream exact, then EOF");
    drop(restored);
}

#[test]
fn bad_descriptors_are_refused() {
    if !root() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    assert!(matches!(checkpoint(&l), Err(RepairError::Listening)));
    let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    assert!(matches!(checkpoint(&u), Err(RepairError::NotTcp)));
    let f = std::fs::File::open("/proc/self/status").unwrap();
    assert!(matches!(checkpoint(&f), Err(RepairError::NotTcp)));
}

/// CLOSE_WAIT: the peer's FIN was received, we still have data both ways
/// (unread from the peer, unsent to it). The restored socket gets the FIN
/// again (a raw packet) and reads it after the data; our data and FIN
/// reach the peer.
#[test]
fn close_wait_restores_with_the_peers_fin() {
    if !root() {
        return;
    }
    let (ours, mut peer) = pair();
    let up = pattern(50_000, 7);
    peer.write_all(&up).unwrap();
    peer.shutdown(Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let down = pattern(30_000, 8);
    (&ours).write_all(&down).unwrap();
    let image = checkpoint(&ours).expect("checkpoint");
    assert_eq!(image.state, TcpState::CloseWait);
    assert_eq!(image.received, up);
    drop(ours);
    let mut restored = restore(&image).expect("restore");
    let mut got = Vec::new();
    restored.read_to_end(&mut got).unwrap();
    assert!(got == up, "up stream exact, then the peer's FIN");
    restored.write_all(b"after").unwrap();
    restored.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    peer.read_to_end(&mut back).unwrap();
    let mut want = down.clone();
    want.extend_from_slice(b"after");
    assert!(back == want, "down stream exact, then our FIN");
}

#[test]
fn restoring_onto_an_address_not_on_this_host_is_refused() {
    if !root() {
        return;
    }
    let (ours, _peer) = pair();
    let mut image = checkpoint(&ours).expect("checkpoint");
    migratory_repair::resume(&ours, &image).expect("resume");
    image.local = "192.0.2.7:4000".parse().unwrap(); // TEST-NET-1
    match restore(&image) {
        Err(RepairError::AddressNotLocal(a)) => assert_eq!(a, image.local),
        other => panic!("{other:?}"),
    }
    // The original socket was resumed and still works.
    (&ours).write_all(b"still fine").unwrap();
}

#[test]
fn ipv6_socket_with_keepalive_options_restores() {
    if !root() {
        return;
    }
    let Ok(l) = TcpListener::bind("[::1]:0") else {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    };
    let mut peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (ours, _) = l.accept().unwrap();
    drop(l);
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(33))
        .with_interval(Duration::from_secs(7))
        .with_retries(4);
    socket2::SockRef::from(&ours)
        .set_tcp_keepalive(&ka)
        .unwrap();
    peer.write_all(b"v6 up").unwrap();
    (&ours).write_all(b"v6 down").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let image = checkpoint(&ours).expect("checkpoint");
    assert!(image.local.is_ipv6() && image.peer.is_ipv6());
    assert_eq!(image.received, b"v6 up");
    let o = image.options;
    assert!(o.keepalive);
    assert_eq!((o.keepidle, o.keepintvl, o.keepcnt), (33, 7, 4));
    drop(ours);
    let mut restored = restore(&image).expect("restore");
    let r = socket2::SockRef::from(&restored);
    assert!(r.keepalive().unwrap());
    assert_eq!(r.tcp_keepalive_time().unwrap(), Duration::from_secs(33));
    assert_eq!(r.tcp_keepalive_interval().unwrap(), Duration::from_secs(7));
    assert_eq!(r.tcp_keepalive_retries().unwrap(), 4);
    let mut down = [0u8; 7];
    peer.read_exact(&mut down).unwrap();
    assert_eq!(&down, b"v6 down");
    let mut up = [0u8; 5];
    restored.read_exact(&mut up).unwrap();
    assert_eq!(&up, b"v6 up");
    restored.write_all(b"!").unwrap();
    let mut bang = [0u8; 1];
    peer.read_exact(&mut bang).unwrap();
    assert_eq!(&bang, b"!");
}

#[test]
fn data_the_peer_sends_while_the_socket_is_frozen_is_caught_before_closing() {
    if !root() {
        return;
    }
    // A frozen socket still takes in (and acknowledges) what the peer
    // sends: `unchanged` notices before the socket is closed, and a second
    // checkpoint catches the bytes instead of losing them.
    let (ours, mut peer) = pair();
    peer.write_all(b"before|").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let image = checkpoint(&ours).expect("checkpoint");
    assert_eq!(image.received, b"before|");
    assert!(migratory_repair::unchanged(&ours, &image).unwrap());
    peer.write_all(b"while frozen|").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(!migratory_repair::unchanged(&ours, &image).unwrap());
    let image = checkpoint(&ours).expect("checkpoint again");
    assert_eq!(image.received, b"before|while frozen|");
    assert!(migratory_repair::unchanged(&ours, &image).unwrap());
    drop(ours);
    let mut restored = restore(&image).expect("restore");
    restored
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    peer.write_all(b"after").unwrap();
    let mut got = vec![0u8; 25];
    restored
        .read_exact(&mut got)
        .expect("everything arrives, once");
    assert_eq!(got, b"before|while frozen|after");

    // Resuming after a checkpoint: the socket reads on, options intact.
    let (ours, mut peer) = pair();
    let image = checkpoint(&ours).expect("checkpoint");
    peer.write_all(b"during").unwrap();
    migratory_repair::resume(&ours, &image).expect("resume");
    assert!(
        socket2::SockRef::from(&ours).reuse_address().unwrap(),
        "SO_REUSEADDR kept"
    );
    peer.write_all(b"|after").unwrap();
    let mut got = vec![0u8; 12];
    (&ours)
        .read_exact(&mut got)
        .expect("resumed socket reads on");
    assert_eq!(got, b"during|after");
}
