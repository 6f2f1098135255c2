//! Every state of a closing connection moves: CLOSE_WAIT, LAST_ACK,
//! CLOSING (the peer's FIN re-created with a raw packet that passes the
//! network lock) and FIN_WAIT1 with our FIN sent but not acknowledged (the
//! peer's ACK held back by the lock). Each is produced for real between two
//! network namespaces (`client` and `host`), checkpointed under the lock,
//! closed silently, restored, and then both sides finish their close with
//! every byte delivered. And ESTABLISHED with what the peer sent under the
//! lock unacknowledged: the restore acknowledges it at once.
//!
//! Needs root, `ip` and `nft`; skips, saying why, without them.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{delete_namespaces, in_ns, ip, needs_root_and_ip};
use migratory_repair::lock::{nft_available, Direction, NetLock};
use migratory_repair::process::restore_all;
use migratory_repair::{checkpoint, tcp_state, Connection, ImageFile, TcpState};

const SERVER: &str = "10.81.0.2";
const CLIENT: &str = "10.81.0.1";
const SERVER6: &str = "fd00:81::2";
const CLIENT6: &str = "fd00:81::1";

fn skip_reason() -> Option<&'static str> {
    if let Some(why) = needs_root_and_ip() {
        return Some(why);
    }
    if !nft_available() {
        return Some("needs `nft` for the network lock (.ci/run installs nftables)");
    }
    None
}

/// Two namespaces joined by a veth pair, deleted on drop.
struct Net {
    client: String,
    host: String,
}

impl Net {
    fn new(tag: &str) -> Net {
        let id = format!("{}{tag}", std::process::id());
        let n = Net {
            client: format!("mstc{id}"),
            host: format!("msth{id}"),
        };
        for ns in [&n.client, &n.host] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&[
            "-n", &n.client, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", &n.host,
        ]);
        for (ns, addr, addr6) in [(&n.client, CLIENT, CLIENT6), (&n.host, SERVER, SERVER6)] {
            for a in [format!("{addr}/24"), format!("{addr6}/64")] {
                ip(&["-n", ns, "addr", "add", &a, "dev", "eth0", "nodad"]);
            }
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
        }
        n
    }

    /// Runs `f` on a thread inside namespace `ns` and returns its result
    /// (sockets made there live there; `nft` started there acts there).
    fn run<T: Send + 'static>(&self, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_ns(ns, f).join().expect("namespace thread")
    }

    /// A connection: (the server's socket in `host`, the peer's in
    /// `client`).
    fn pair(&self, port: u16) -> (TcpStream, TcpStream) {
        self.pair_at(format!("{SERVER}:{port}").parse().unwrap())
    }

    /// [`Net::pair`] on the server address `addr`.
    fn pair_at(&self, addr: SocketAddr) -> (TcpStream, TcpStream) {
        let l = self.run(&self.host, move || TcpListener::bind(addr).unwrap());
        let peer = self.run(&self.client, move || TcpStream::connect(addr).unwrap());
        let (ours, _) = l.accept().unwrap();
        for s in [&ours, &peer] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        (ours, peer)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        delete_namespaces([&self.client, &self.host]);
    }
}

fn conn(s: &TcpStream) -> Connection {
    Connection {
        local: s.local_addr().unwrap(),
        peer: s.peer_addr().unwrap(),
    }
}

/// Locks `s`'s connection in `ns` (both directions, or `dirs`).
fn lock(net: &Net, ns: &str, c: Connection, dirs: &'static [Direction]) -> NetLock {
    let lock = NetLock::new(&[c], Duration::from_secs(30)).unwrap();
    let l = lock.clone();
    net.run(ns, move || l.take(dirs)).expect("lock");
    lock
}

fn wait_state(s: &TcpStream, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = tcp_state(s).unwrap();
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "state {now}, waiting for {want}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Checkpoints the server's socket (its connection locked in `host`),
/// closes it silently, restores it, and lifts the lock as the restore goes
/// live. Returns the restored socket.
fn move_socket(net: &Net, ours: TcpStream, lock: NetLock, want: TcpState) -> TcpStream {
    let image = checkpoint(&ours).expect("checkpoint");
    assert_eq!(image.state, want);
    drop(ours);
    let file = ImageFile {
        sockets: vec![image],
        app_state: Vec::new(),
    };
    let restored = net.run(&net.host, move || {
        let mut fds = restore_all(&file, Some(&lock)).expect("restore");
        lock.release().expect("release the lock");
        fds.pop().unwrap()
    });
    assert!(
        net.run(&net.host, || migratory_repair::lock::tables().unwrap())
            .is_empty(),
        "no lock left"
    );
    let s = TcpStream::from(restored);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn read_all(mut s: &TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).expect("EOF, no reset");
    v
}

#[test]
fn close_wait_moves_and_both_sides_close() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let net = Net::new("cw");
    let (ours, mut peer) = net.pair(7101);
    peer.write_all(b"up before the peer closed").unwrap();
    peer.shutdown(Shutdown::Write).unwrap();
    wait_state(&ours, "CLOSE_WAIT");
    (&ours).write_all(b"down before; ").unwrap();
    let l = lock(&net, &net.host, conn(&ours), &[Direction::Inbound]);
    let mut restored = move_socket(&net, ours, l, TcpState::CloseWait);
    assert_eq!(read_all(&restored), b"up before the peer closed");
    restored.write_all(b"down after").unwrap();
    restored.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&peer), b"down before; down after");
    wait_state(&restored, "CLOSE");
    drop(peer);
}

#[test]
fn last_ack_moves_and_both_sides_close() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let net = Net::new("la");
    let (ours, mut peer) = net.pair(7102);
    peer.write_all(b"up").unwrap();
    peer.shutdown(Shutdown::Write).unwrap();
    wait_state(&ours, "CLOSE_WAIT");
    // Our data and FIN go out, the peer's ACK of them is held back.
    let l = lock(&net, &net.host, conn(&ours), &[Direction::Inbound]);
    (&ours).write_all(b"down, then our FIN").unwrap();
    ours.shutdown(Shutdown::Write).unwrap();
    wait_state(&ours, "LAST_ACK");
    std::thread::sleep(Duration::from_millis(20));
    let restored = move_socket(&net, ours, l, TcpState::LastAck);
    assert_eq!(read_all(&restored), b"up");
    assert_eq!(read_all(&peer), b"down, then our FIN");
    wait_state(&restored, "CLOSE");
    drop(peer);
}

#[test]
fn fin_wait1_with_the_fin_unacknowledged_moves_and_both_sides_close() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let net = Net::new("fw");
    let (ours, mut peer) = net.pair(7103);
    let l = lock(&net, &net.host, conn(&ours), &[Direction::Inbound]);
    (&ours).write_all(b"down, then our FIN").unwrap();
    ours.shutdown(Shutdown::Write).unwrap();
    // The FIN reached the peer; its ACK did not reach us.
    assert_eq!(read_all(&peer), b"down, then our FIN");
    assert_eq!(tcp_state(&ours).unwrap(), "FIN_WAIT1");
    let restored = move_socket(&net, ours, l, TcpState::FinWait1);
    // The peer acknowledges the FIN sent again: FIN_WAIT2.
    wait_state(&restored, "FIN_WAIT2");
    peer.write_all(b"up after").unwrap();
    peer.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&restored), b"up after");
    wait_state(&restored, "CLOSE");
}

#[test]
fn closing_moves_and_both_sides_close() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let net = Net::new("cl");
    let (ours, mut peer) = net.pair(7104);
    // Simultaneous close: our FIN is held back at the peer, so the peer's
    // FIN does not acknowledge it.
    let at_peer = lock(&net, &net.client, conn(&peer), &[Direction::Inbound]);
    (&ours).write_all(b"down, then our FIN").unwrap();
    ours.shutdown(Shutdown::Write).unwrap();
    peer.write_all(b"up, then the peer's FIN").unwrap();
    peer.shutdown(Shutdown::Write).unwrap();
    wait_state(&ours, "CLOSING");
    let l = lock(&net, &net.host, conn(&ours), &[Direction::Inbound]);
    net.run(&net.client, move || at_peer.release()).unwrap();
    let restored = move_socket(&net, ours, l, TcpState::Closing);
    assert_eq!(read_all(&restored), b"up, then the peer's FIN");
    assert_eq!(read_all(&peer), b"down, then our FIN");
    // Our FIN acknowledged: TIME_WAIT (the socket itself is CLOSE).
    wait_state(&restored, "CLOSE");
    wait_state(&peer, "CLOSE");
}

/// IPv6: the lock's IPv6 sets and the re-created FIN in an IPv6 packet.
#[test]
fn close_wait_moves_over_ipv6() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let net = Net::new("v6");
    let (ours, mut peer) = net.pair_at(format!("[{SERVER6}]:7105").parse().unwrap());
    peer.write_all(b"up over IPv6").unwrap();
    peer.shutdown(Shutdown::Write).unwrap();
    wait_state(&ours, "CLOSE_WAIT");
    let l = lock(&net, &net.host, conn(&ours), &[Direction::Inbound]);
    let mut restored = move_socket(&net, ours, l, TcpState::CloseWait);
    assert_eq!(read_all(&restored), b"up over IPv6");
    restored.write_all(b"down over IPv6").unwrap();
    restored.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&peer), b"down over IPv6");
    wait_state(&restored, "CLOSE");
}

/// The re-created FIN carries the lock's mark: it reaches the restored
/// socket even while the lock still drops the peer's packets (a restore
/// that lifts no lock, e.g. `restore --no-lock` under `sock lock`).
#[test]
fn the_recreated_fin_passes_a_lock_that_still_holds() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let net = Net::new("mk");
    let (ours, mut peer) = net.pair(7106);
    peer.write_all(b"up").unwrap();
    peer.shutdown(Shutdown::Write).unwrap();
    wait_state(&ours, "CLOSE_WAIT");
    let l = lock(&net, &net.host, conn(&ours), &[Direction::Inbound]);
    let image = checkpoint(&ours).expect("checkpoint");
    drop(ours);
    // The plain restore lifts nothing: the peer's packets are still
    // dropped, and the socket must reach CLOSE_WAIT through the lock.
    let restored = net.run(&net.host, move || {
        migratory_repair::restore(&image).expect("restore: the FIN passed the lock")
    });
    assert_eq!(tcp_state(&restored).unwrap(), "CLOSE_WAIT");
    net.run(&net.host, move || l.release()).unwrap();
    restored
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(read_all(&restored), b"up");
    drop(restored);
    assert!(read_all(&peer).is_empty());
}

/// Bytes `s` sent that its peer has not acknowledged yet (`SIOCOUTQ`),
/// and its retransmission timeout (`tcpi_rto`).
fn unacked_and_rto(s: &TcpStream) -> (usize, Duration) {
    let (outq, info) = unacked_and_info(s);
    (outq, Duration::from_micros(info.tcpi_rto.into()))
}

/// `SIOCOUTQ` and `TCP_INFO` of `s`.
fn unacked_and_info(s: &TcpStream) -> (usize, libc::tcp_info) {
    use std::os::fd::AsRawFd;
    let mut outq: libc::c_int = 0;
    // SAFETY: `s` is an open socket for the whole call, and TIOCOUTQ
    // (SIOCOUTQ) writes one c_int to the valid pointer given.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut outq) };
    assert_eq!(r, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
    // SAFETY: tcp_info is plain data, for which all zeroes is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of `len` bytes; the
    // kernel writes at most that much and sets `len`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    (outq as usize, info)
}

/// What the peer sent after our packets were held back (its
/// acknowledgement never left) is acknowledged by the restored socket as
/// soon as it goes live, though it has nothing to send: the peer hears it
/// before its retransmission timeout would have made it resend. (The
/// kernel's own window probe, as repair mode ends, carries an old
/// sequence number: the peer drops it unread.)
#[test]
fn a_restored_socket_acknowledges_at_once_what_came_under_the_lock() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let net = Net::new("ak");
    let (ours, mut peer) = net.pair(7107);
    let l = lock(&net, &net.host, conn(&ours), &[Direction::Outbound]);
    let data = vec![7u8; 10_000];
    peer.write_all(&data).unwrap();
    let sent = Instant::now();
    let (_, rto) = unacked_and_rto(&peer);
    let deadline = Instant::now() + Duration::from_secs(10);
    while migratory_repair::unread(&ours).unwrap() < data.len() {
        assert!(Instant::now() < deadline, "the data never arrived");
        std::thread::sleep(Duration::from_micros(200));
    }
    let (unacked, _) = unacked_and_rto(&peer);
    assert_eq!(unacked, data.len(), "our acknowledgement was held back");
    let inbound = l.clone();
    net.run(&net.host, move || inbound.block(Direction::Inbound))
        .expect("lock inbound");
    // The peer's tail loss probe (its last segment sent again, two round
    // trips and a few timer ticks after it sent) meets the lock: only its
    // retransmission timeout would resend now.
    std::thread::sleep(rto / 4);
    let mss = unacked_and_info(&ours).1.tcpi_snd_mss;
    let mut restored = move_socket(&net, ours, l, TcpState::Established);
    // The restored socket sends segments as large as the old one did (not
    // the 536 bytes `connect` in repair mode would fix).
    assert_eq!(unacked_and_info(&restored).1.tcpi_snd_mss, mss);
    loop {
        let (unacked, _) = unacked_and_rto(&peer);
        if unacked == 0 {
            break;
        }
        assert!(
            sent.elapsed() < rto,
            "{unacked} bytes still unacknowledged {:?} after they were sent (the peer's RTO: {rto:?})",
            sent.elapsed()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut got = vec![0u8; data.len()];
    restored.read_exact(&mut got).unwrap();
    assert_eq!(got, data);
    restored.write_all(b"and back").unwrap();
    let mut back = [0u8; 8];
    peer.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"and back");
}
