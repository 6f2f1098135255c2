//! `migratory bench sock`: checkpoint and restore time per socket (the
//! numbers of BENCHMARKS.md, next to MIGSOCK's 1.53 ms / 2.79 ms).

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use migratory_repair::{checkpoint, restore};

/// `migratory bench` subcommands.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Checkpoint and restore N loopback TCP sockets, each with data
    /// queued, several rounds; prints the median time per socket.
    Sock(SockBenchArgs),
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
        BenchCommand::Sock(a) => sock(a),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn sock(a: SockBenchArgs) -> Result<bool, String> {
    let queued = usize::try_from(a.queued).map_err(|_| "--queued is too large")?;
    if queued > 4 << 20 {
        return Err("--queued: at most 4MiB (one socket's receive buffer)".into());
    }
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
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
