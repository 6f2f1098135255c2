//! Cross-host socket migration (the MIGSOCK report's experiment): network
//! namespaces `client`, `hostA` and `hostB` on a bridge; an unmodified peer
//! in `client` streams data both ways with a server in `hostA`; the
//! server's socket is checkpointed while data is in flight both ways, the
//! service address moves from hostA to hostB, and the socket is restored in
//! hostB. The peer sees no reset, and both streams are SHA-256-exact.
//!
//! Needs root and `ip` (iproute2); skips, saying why, without them.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{delete_namespaces, in_ns, ip, needs_root_and_ip as skip_reason};
use migratory_repair::{checkpoint, restore};
use sha2::{Digest, Sha256};

const UP_LEN: u64 = 96 << 20;
const DOWN_LEN: u64 = 96 << 20;
const SERVICE: &str = "10.77.0.10";

/// Three namespaces on a bridge, deleted on drop.
struct Net {
    client: String,
    a: String,
    b: String,
}

impl Net {
    fn new(test: &str) -> Net {
        let tag = format!("{}{test}", std::process::id());
        let n = Net {
            client: format!("migc{tag}"),
            a: format!("miga{tag}"),
            b: format!("migb{tag}"),
        };
        for ns in [&n.client, &n.a, &n.b] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let c = n.client.as_str();
        ip(&["-n", c, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", c, "link", "set", "br0", "up"]);
        ip(&["-n", c, "addr", "add", "10.77.0.1/24", "dev", "br0"]);
        for (host, port, addr) in [(&n.a, "pa", "10.77.0.2/24"), (&n.b, "pb", "10.77.0.3/24")] {
            ip(&[
                "-n", c, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host,
            ]);
            ip(&["-n", c, "link", "set", port, "master", "br0", "up"]);
            ip(&["-n", host, "link", "set", "eth0", "up"]);
            ip(&["-n", host, "addr", "add", addr, "dev", "eth0"]);
        }
        ip(&[
            "-n",
            &n.a,
            "addr",
            "add",
            &format!("{SERVICE}/24"),
            "dev",
            "eth0",
        ]);
        n
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        delete_namespaces([&self.client, &self.a, &self.b]);
    }
}

/// Byte `i` of stream `seed`.
fn fill(seed: u64, pos: u64, out: &mut [u8]) {
    for (k, b) in out.iter_mut().enumerate() {
        let x = (pos + k as u64)
            .wrapping_add(seed << 40)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        *b = (x >> 56) as u8;
    }
}

fn digest(seed: u64, len: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        fill(seed, pos, &mut buf[..n]);
        h.update(&buf[..n]);
        pos += n as u64;
    }
    h.finalize().into()
}

/// The server application: what it wrote and read so far (it moves with
/// the socket, as a migrated process's memory would).
struct ServerApp {
    down_off: u64,
    up: Sha256,
    up_len: u64,
    up_eof: bool,
    shut: bool,
}

/// Serves until done or `pause` is set; returns the socket either way.
fn serve(sock: TcpStream, app: &mut ServerApp, pause: &AtomicBool) -> TcpStream {
    sock.set_nonblocking(true).unwrap();
    let mut rbuf = vec![0u8; 256 << 10];
    let mut wbuf = vec![0u8; 256 << 10];
    let mut s = &sock;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pause.load(Ordering::SeqCst) && Instant::now() < deadline {
        let mut moved = false;
        if !app.up_eof {
            match s.read(&mut rbuf) {
                Ok(0) => app.up_eof = true,
                Ok(n) => {
                    app.up.update(&rbuf[..n]);
                    app.up_len += n as u64;
                    moved = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("server read: {e}"),
            }
        }
        if app.down_off < DOWN_LEN {
            let n = (DOWN_LEN - app.down_off).min(wbuf.len() as u64) as usize;
            fill(2, app.down_off, &mut wbuf[..n]);
            match s.write(&wbuf[..n]) {
                Ok(k) => {
                    app.down_off += k as u64;
                    moved = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("server write: {e}"),
            }
        } else if !app.shut {
            sock.shutdown(Shutdown::Write).unwrap();
            app.shut = true;
        }
        if app.up_eof && app.shut {
            break;
        }
        if !moved {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    sock.set_nonblocking(false).unwrap();
    sock
}

/// One non-blocking write of up to `max` bytes of the down stream.
fn write_some(sock: &TcpStream, app: &mut ServerApp, max: usize) {
    let n = (DOWN_LEN - app.down_off).min(max as u64) as usize;
    let mut buf = vec![0u8; n];
    fill(2, app.down_off, &mut buf);
    sock.set_nonblocking(true).unwrap();
    match (&*sock).write(&buf) {
        Ok(k) => app.down_off += k as u64,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(e) => panic!("server write: {e}"),
    }
    sock.set_nonblocking(false).unwrap();
}

#[test]
fn socket_moves_to_another_host_with_data_in_flight_both_ways() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    migrate_across_hosts(Peer::Std);
}

#[test]
fn socket_moves_to_another_host_under_socat() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    if Command::new("socat").arg("-V").output().is_err() {
        eprintln!("skipped: socat is not installed");
        return;
    }
    migrate_across_hosts(Peer::Socat);
}

/// The unmodified program at the other end.
#[derive(Clone, Copy, Debug)]
enum Peer {
    /// A plain std TcpStream program (threads of this test in `client`).
    Std,
    /// `socat - TCP:...` run in `client`, fed and read through pipes.
    Socat,
}

/// Streams the up bytes into `w`, then closes it.
fn feed(mut w: impl Write) {
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = 0u64;
    while pos < UP_LEN {
        let n = (UP_LEN - pos).min(buf.len() as u64) as usize;
        fill(1, pos, &mut buf[..n]);
        w.write_all(&buf[..n]).expect("peer write: no reset");
        pos += n as u64;
    }
}

/// Reads the down bytes to EOF: their digest and the longest wait
/// between two reads.
fn drain(mut r: impl Read, got: &AtomicU64) -> ([u8; 32], Duration) {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut last = Instant::now();
    let mut stall = Duration::ZERO;
    loop {
        let n = r.read(&mut buf).expect("peer read: no reset");
        let now = Instant::now();
        stall = stall.max(now - last);
        last = now;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got.fetch_add(n as u64, Ordering::SeqCst);
    }
    (h.finalize().into(), stall)
}

fn migrate_across_hosts(kind: Peer) {
    let net = Net::new(match kind {
        Peer::Std => "s",
        Peer::Socat => "x",
    });
    let service: SocketAddr = format!("{SERVICE}:7000").parse().unwrap();
    let listener = in_ns(&net.a, move || TcpListener::bind(service).unwrap())
        .join()
        .unwrap();

    let received = Arc::new(AtomicU64::new(0));
    let got = received.clone();
    let peer = match kind {
        Peer::Std => in_ns(&net.client, move || {
            let s = TcpStream::connect(service).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
            let w = s.try_clone().unwrap();
            let writer = std::thread::spawn(move || {
                feed(&w);
                w.shutdown(Shutdown::Write).unwrap();
            });
            let out = drain(&s, &got);
            writer.join().unwrap();
            out
        }),
        Peer::Socat => {
            let mut child = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &net.client,
                    "socat",
                    "-b",
                    "65536",
                    "-t",
                    "30",
                    "-",
                ])
                .arg(format!("TCP:{service}"))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start socat");
            let stdin = child.stdin.take().unwrap();
            let stdout = child.stdout.take().unwrap();
            std::thread::spawn(move || {
                let writer = std::thread::spawn(move || feed(stdin));
                let out = drain(stdout, &got);
                writer.join().unwrap();
                let status = child.wait().unwrap();
                assert!(status.success(), "socat: {status}");
                out
            })
        }
    };
    let (sock, _) = listener.accept().unwrap();
    drop(listener);
    let mut app = ServerApp {
        down_off: 0,
        up: Sha256::new(),
        up_len: 0,
        up_eof: false,
        shut: false,
    };
    let pause = Arc::new(AtomicBool::new(false));
    // Serve on this thread until a quarter of the download arrived.
    let watcher = {
        let (pause, got) = (pause.clone(), received.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while got.load(Ordering::SeqCst) < DOWN_LEN / 4 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            pause.store(true, Ordering::SeqCst);
        })
    };
    let sock = serve(sock, &mut app, &pause);
    watcher.join().unwrap();
    assert!(
        app.down_off < DOWN_LEN && app.up_len < UP_LEN,
        "paused mid-stream"
    );
    // The peer keeps sending into our receive queue (wait until some is
    // there: under load the peer may lag).
    sock.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(sock.peek(&mut [0u8; 1]), Ok(n) if n > 0) {
        assert!(Instant::now() < deadline, "the peer sends nothing");
        std::thread::sleep(Duration::from_millis(1));
    }
    sock.set_nonblocking(false).unwrap();
    std::thread::sleep(Duration::from_millis(20));

    // hostA gives up the address (the peer's segments are now dropped,
    // not answered), the socket is frozen and closed silently.
    let t0 = Instant::now();
    // The connection's packets from the peer are held back (CRIU blocks
    // them with netfilter; here a blackhole route at the client).
    let hole = format!("{SERVICE}/32");
    ip(&["-n", &net.client, "route", "add", "blackhole", &hole]);
    // The application writes on: these bytes reach the peer, but its
    // acknowledgements do not come back (sent, never acknowledged).
    write_some(&sock, &mut app, 256 << 10);
    std::thread::sleep(Duration::from_millis(5));
    ip(&[
        "-n",
        &net.a,
        "addr",
        "del",
        &format!("{SERVICE}/24"),
        "dev",
        "eth0",
    ]);
    let image = checkpoint(&sock).expect("checkpoint");
    drop(sock);
    let t_checkpoint = t0.elapsed();
    assert!(!image.received.is_empty(), "up data in flight");
    assert!(!image.sent.is_empty(), "down data in flight");
    eprintln!(
        "image: {} B received, {} B sent-unacked, {} B unsent",
        image.received.len(),
        image.sent.len(),
        image.unsent.len()
    );
    // hostB takes the address over and restores the socket; then the
    // client's neighbour entry is refreshed (as a gratuitous ARP would).
    ip(&[
        "-n",
        &net.b,
        "addr",
        "add",
        &format!("{SERVICE}/24"),
        "dev",
        "eth0",
    ]);
    let restored = in_ns(&net.b, move || restore(&image).expect("restore"))
        .join()
        .unwrap();
    // Only now may the peer's segments arrive: before the restore, hostB
    // would answer them with a reset.
    ip(&["-n", &net.client, "neigh", "flush", "dev", "br0"]);
    ip(&["-n", &net.client, "route", "del", "blackhole", &hole]);
    let t_restore = t0.elapsed();
    let no_pause = AtomicBool::new(false);
    let sock = serve(restored, &mut app, &no_pause);
    let (down_digest, stall) = peer.join().expect("the peer saw no reset");
    eprintln!("peer: {kind:?}");
    drop(sock);
    assert_eq!(app.up_len, UP_LEN);
    assert_eq!(
        <[u8; 32]>::from(app.up.finalize()),
        digest(1, UP_LEN),
        "up exact"
    );
    assert_eq!(down_digest, digest(2, DOWN_LEN), "down exact");
    eprintln!(
        "checkpoint done at {:.2} ms, restored at {:.2} ms; peer-observed stall {:.1} ms",
        t_checkpoint.as_secs_f64() * 1e3,
        t_restore.as_secs_f64() * 1e3,
        stall.as_secs_f64() * 1e3
    );
}
