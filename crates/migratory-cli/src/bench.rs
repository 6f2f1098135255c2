//! `migratory bench sock`: checkpoint and restore time per socket (the
//! numbers of BENCHMARKS.md, next to MIGSOCK's 1.53 ms / 2.79 ms).

use std::io::Read;
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use migratory_repair::handoff::{recv_sockets, send_sockets};

use clap::{Args, Subcommand};
use migratory_repair::{checkpoint, restore};

#[path = "streambench.rs"]
mod streambench;

/// `migratory bench` subcommands.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Bulk transfer, server to client and back: raw tokio TCP vs a
    /// migratory session vs the proxy path, same process, same run.
    Throughput(crate::netbench::ThroughputArgs),
    /// 1-byte request/response round trips (p50/p99): raw TCP vs session
    /// vs proxy.
    Rtt(crate::netbench::RttArgs),
    /// MTCP fig 5.2/5.3: idle migrations for several state sizes next to a
    /// raw connect plus two round trips; then under a full-speed stream.
    Migrate(crate::netbench::MigrateArgs),
    /// MTCP fig 5.4: a download from servers whose writes slow down after
    /// a threshold, without migration and with the throughput policy for
    /// several state sizes; bytes received against time.
    Stream(streambench::StreamArgs),
    /// What idle sessions cost: RSS per session in `serve` and `proxy`,
    /// `serve`'s CPU while they sit idle, and the p99 round trip of active
    /// sessions beside them vs beside none.
    Idle(crate::netbench::IdleArgs),
    /// Drain a server of many sessions (a share of them streaming) to its
    /// two peers: how long it takes and what the clients saw go wrong.
    Drain(crate::netbench::DrainArgs),
    /// Checkpoint and restore N loopback TCP sockets, each with data
    /// queued, several rounds; prints the median time per socket.
    Sock(SockBenchArgs),
    /// Hand a live connection to another process over a unix socket
    /// (SCM_RIGHTS) while its peer runs ping-pong; prints the round-trip
    /// times the peer saw, the one across the handoff included.
    Handoff(HandoffBenchArgs),
    /// The receiving process of `bench handoff`.
    #[command(hide = true)]
    HandoffReceiver {
        /// Unix socket to receive the connection on.
        #[arg(long)]
        socket: PathBuf,
    },
}

/// Options of `migratory bench handoff`.
#[derive(Args, Debug)]
pub struct HandoffBenchArgs {
    /// Handoffs to measure (each with a fresh receiving process).
    #[arg(long, default_value_t = 21, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
}

/// Options of `migratory bench sock`.
#[derive(Args, Debug)]
pub struct SockBenchArgs {
    /// Sockets checkpointed and restored per round.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    sockets: u32,
    /// Bytes queued in each socket's receive queue (sent by the peer, not
    /// yet read), e.g. 1KiB, 1MiB.
    #[arg(long, default_value = "1KiB", value_parser = crate::demo::parse_size)]
    queued: u64,
    /// Rounds (each one checkpoint and one restore of every socket).
    #[arg(long, default_value_t = 11, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> Result<bool, String> {
    match cmd {
        BenchCommand::Throughput(a) => crate::netbench::throughput(a),
        BenchCommand::Rtt(a) => crate::netbench::rtt(a),
        BenchCommand::Migrate(a) => crate::netbench::migrate(a),
        BenchCommand::Idle(a) => crate::netbench::idle(a),
        BenchCommand::Drain(a) => crate::netbench::drain(a),
        BenchCommand::Stream(a) => streambench::run(a),
        BenchCommand::Sock(a) => sock(a),
        BenchCommand::Handoff(a) => handoff(a),
        BenchCommand::HandoffReceiver { socket } => receive(&socket),
    }
}

/// The middle of `v` (the upper one of an even count).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn sock(a: SockBenchArgs) -> Result<bool, String> {
    let queued = usize::try_from(a.queued).map_err(|_| "--queued is too large")?;
    if queued > 4 << 20 {
        return Err("--queued: at most 4MiB (one socket's receive buffer)".into());
    }
    // Receive buffers that hold the whole queue (accepted sockets inherit
    // the listener's, and the window scale follows).
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| format!("socket: {e}"))?;
    sock.set_recv_buffer_size(2 * queued + (64 << 10))
        .map_err(|e| format!("SO_RCVBUF: {e}"))?;
    sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .map_err(|e| format!("bind: {e}"))?;
    sock.listen(1024).map_err(|e| format!("listen: {e}"))?;
    let listener = TcpListener::from(sock);
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let payload = vec![0x5au8; queued];
    let mut pairs = Vec::new();
    for _ in 0..a.sockets {
        let mut peer = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        let (ours, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        peer.write_all(&payload)
            .map_err(|e| format!("peer write: {e}"))?;
        pairs.push((ours, peer));
    }
    drop(listener);
    // Let the queued bytes land in our receive queues.
    std::thread::sleep(Duration::from_millis(100));
    let (mut ck, mut rs) = (Vec::new(), Vec::new());
    for _ in 0..a.rounds {
        let t = Instant::now();
        let mut images = Vec::with_capacity(pairs.len());
        for (ours, _) in &pairs {
            let image = checkpoint(ours).map_err(|e| format!("checkpoint: {e}"))?;
            if image.received.len() != queued {
                return Err(format!(
                    "checkpoint saw {} queued bytes, expected {queued}",
                    image.received.len()
                ));
            }
            images.push(image);
        }
        ck.push(t.elapsed().as_secs_f64() / f64::from(a.sockets));
        let peers: Vec<TcpStream> = pairs
            .into_iter()
            .map(|(ours, peer)| {
                drop(ours); // silent: repair mode
                peer
            })
            .collect();
        let t = Instant::now();
        let mut restored = Vec::with_capacity(images.len());
        for image in &images {
            restored.push(restore(image).map_err(|e| format!("restore: {e}"))?);
        }
        rs.push(t.elapsed().as_secs_f64() / f64::from(a.sockets));
        pairs = restored.into_iter().zip(peers).collect();
    }
    // The connections still work: one byte each way on the first.
    if let Some((ours, peer)) = pairs.first_mut() {
        use std::io::Read;
        ours.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let mut back = vec![0u8; queued];
        ours.read_exact(&mut back)
            .map_err(|e| format!("read after restore: {e}"))?;
        peer.write_all(b"!").map_err(|e| e.to_string())?;
        let _ = peer.shutdown(Shutdown::Write);
    }
    let (c, r) = (median(ck) * 1e6, median(rs) * 1e6);
    println!(
        "sockets={} queued={} rounds={}: checkpoint {c:.1} us/socket, restore {r:.1} us/socket (medians)",
        a.sockets, a.queued, a.rounds
    );
    Ok(true)
}

/// Ping-pong message size.
const PING: usize = 64;

/// Echoes `PING`-byte messages until EOF, or until `stop` is set between
/// two messages.
fn echo_messages(mut s: &TcpStream, stop: Option<&AtomicBool>) -> std::io::Result<bool> {
    let mut m = [0u8; PING];
    loop {
        if stop.is_some_and(|f| f.load(Ordering::SeqCst)) {
            return Ok(false);
        }
        match s.read_exact(&mut m) {
            Ok(()) => s.write_all(&m)?,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

fn receive(path: &Path) -> Result<bool, String> {
    let channel = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (mut fds, _) = recv_sockets(&channel).map_err(|e| e.to_string())?;
    let fd = fds.pop().ok_or("no socket received")?;
    let conn = TcpStream::from(fd);
    conn.set_read_timeout(None).map_err(|e| e.to_string())?;
    echo_messages(&conn, None).map_err(|e| e.to_string())?;
    Ok(true)
}

fn handoff(a: HandoffBenchArgs) -> Result<bool, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let (mut before, mut across) = (Vec::new(), Vec::new());
    for round in 0..a.rounds {
        let path = std::env::temp_dir().join(format!(
            "migratory-bench-handoff-{}-{round}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let unix = UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut receiver = Command::new(&me)
            .args(["bench", "handoff-receiver", "--socket"])
            .arg(&path)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("start the receiver: {e}"))?;
        let (channel, _) = unix.accept().map_err(|e| e.to_string())?;
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let mut peer = TcpStream::connect(listener.local_addr().map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let (ours, _) = listener.accept().map_err(|e| e.to_string())?;
        for s in [&peer, &ours] {
            s.set_nodelay(true).map_err(|e| e.to_string())?;
        }
        // A short read timeout lets the old owner notice `stop` between
        // messages; the receiver clears it.
        ours.set_read_timeout(Some(Duration::from_millis(1)))
            .map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let old = std::thread::spawn(move || {
            let r = echo_messages(&ours, Some(&stop2));
            (ours, r)
        });
        // Ping-pong: 200 round trips, the handoff after the 100th.
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut rtts = Vec::new();
        let mut handed = None;
        for i in 0..200u32 {
            if i == 100 {
                // The old owner stops between two messages; the peer's
                // next ping is answered by the new process: its round
                // trip spans the whole handoff.
                stop.store(true, Ordering::SeqCst);
                let (ours, r) = old.join().map_err(|_| "the old owner panicked")?;
                r.map_err(|e| e.to_string())?;
                let m = [0xaa; PING];
                let t = Instant::now();
                peer.write_all(&m).map_err(|e| e.to_string())?;
                send_sockets(&channel, &[ours.as_fd()], b"").map_err(|e| e.to_string())?;
                drop(ours);
                let mut back = [0u8; PING];
                peer.read_exact(&mut back)
                    .map_err(|e| format!("echo: {e}"))?;
                handed = Some(rtts.len());
                rtts.push(t.elapsed().as_secs_f64());
                if back != m {
                    return Err("echo differs across the handoff".into());
                }
                break;
            }
            let m = [i as u8; PING];
            let t = Instant::now();
            peer.write_all(&m).map_err(|e| e.to_string())?;
            let mut back = [0u8; PING];
            peer.read_exact(&mut back)
                .map_err(|e| format!("echo: {e}"))?;
            rtts.push(t.elapsed().as_secs_f64());
            if back != m {
                return Err("echo differs".into());
            }
        }
        // Then more round trips with the new owner.
        for i in 0..100u32 {
            let m = [i as u8 ^ 0xff; PING];
            let t = Instant::now();
            peer.write_all(&m).map_err(|e| e.to_string())?;
            let mut back = [0u8; PING];
            peer.read_exact(&mut back)
                .map_err(|e| format!("echo after handoff: {e}"))?;
            rtts.push(t.elapsed().as_secs_f64());
            if back != m {
                return Err("echo differs after the handoff".into());
            }
        }
        drop(peer);
        let _ = receiver.wait();
        let _ = std::fs::remove_file(&path);
        let h = handed.ok_or("no handoff")?;
        before.push(median(rtts[..h].to_vec()));
        across.push(rtts[h]);
    }
    println!(
        "handoff of a live connection over SCM_RIGHTS, {} rounds: peer round trip {:.1} us before (median), {:.1} us across the handoff (median; max {:.1} us)",
        a.rounds,
        median(before) * 1e6,
        median(across.clone()) * 1e6,
        across.iter().cloned().fold(0.0, f64::max) * 1e6
    );
    Ok(true)
}
