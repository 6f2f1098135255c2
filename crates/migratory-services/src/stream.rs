//! MTCP's stream server (thesis, section 5.3.2, fig 5.4): a download
//! whose pace degrades on each connection after a threshold, the way a
//! loaded or far-away server slows down. The client sends the stream's
//! length (8 bytes, big-endian); the server writes the stream in chunks,
//! each followed by a snapshot (the length and the position, padded to the
//! application state size asked for), and closes. A migrated session
//! resumes at the snapshot's position, and its new server's pace starts
//! again from its best rate. `migratory bench stream` and the client
//! policy tests run it.

use std::time::Duration;

use migratory::{Arrival, Session};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How a server's rate falls on one connection.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Bytes per second up to the threshold.
    pub rate: f64,
    /// Bytes written at the best rate on each connection.
    pub threshold: u64,
    /// After the threshold the rate halves every `ramp` bytes more.
    pub ramp: u64,
    /// Bytes per write (each followed by a snapshot).
    pub chunk: usize,
}

impl Shape {
    /// Seconds from the session's arrival to the `x`th byte written: at
    /// `rate` up to the threshold, then at `rate / (1 + slow / ramp)`
    /// after `slow` bytes more.
    pub fn time_for(&self, x: u64) -> f64 {
        let fast = x.min(self.threshold) as f64;
        let slow = x.saturating_sub(self.threshold) as f64;
        (fast + slow + slow * slow / (2.0 * self.ramp as f64)) / self.rate
    }
}

/// The byte at stream position `p`.
pub fn byte_at(p: u64) -> u8 {
    (p.wrapping_mul(2654435761) >> 13) as u8 ^ (p >> 20) as u8
}

/// The stream service: the client asks for a length (8 bytes); the server
/// writes the stream in chunks paced by `shape`, each followed by a
/// snapshot of `state` bytes (the length and the position, padded), and
/// closes. A migrated session resumes at the snapshot's position, and the
/// new server's pace starts again from its best rate.
pub async fn serve(mut s: Session, arrival: Arrival, shape: Shape, state: usize) {
    let resumed = match arrival {
        Arrival::Plain => return,
        Arrival::Migrated { state } if state.len() >= 16 => Some(state),
        _ => None,
    };
    let (len, mut pos) = match resumed {
        Some(st) => (
            u64::from_be_bytes(st[..8].try_into().expect("8 bytes")),
            u64::from_be_bytes(st[8..16].try_into().expect("8 bytes")),
        ),
        None => {
            let mut b = [0u8; 8];
            if s.read_exact(&mut b).await.is_err() {
                return;
            }
            (u64::from_be_bytes(b), 0)
        }
    };
    let mut snap = vec![0x5au8; state.max(16)];
    snap[..8].copy_from_slice(&len.to_be_bytes());
    let start = tokio::time::Instant::now();
    let mut here = 0u64;
    let mut chunk = vec![0u8; shape.chunk];
    while pos < len {
        let due = start + Duration::from_secs_f64(shape.time_for(here));
        tokio::time::sleep_until(due).await;
        let n = (len - pos).min(shape.chunk as u64) as usize;
        for (i, b) in chunk[..n].iter_mut().enumerate() {
            *b = byte_at(pos + i as u64);
        }
        if s.write_all(&chunk[..n]).await.is_err() {
            return; // migrated away
        }
        pos += n as u64;
        here += n as u64;
        snap[8..16].copy_from_slice(&pos.to_be_bytes());
        if s.snapshot(&snap).is_err() {
            return;
        }
    }
    let _ = s.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::{byte_at, Shape};

    #[test]
    fn the_pace_is_the_best_rate_then_halves_every_ramp() {
        let s = Shape {
            rate: 1000.0,
            threshold: 4000,
            ramp: 2000,
            chunk: 1024,
        };
        assert_eq!(s.time_for(0), 0.0);
        assert_eq!(s.time_for(4000), 4.0);
        // The rate after `slow` bytes is rate / (1 + slow / ramp): the
        // time of the next byte there is (1 + slow / ramp) / rate.
        let dt = s.time_for(6001) - s.time_for(6000);
        assert!((dt - 2.0 / 1000.0).abs() < 1e-6, "{dt}");
        // The stream's bytes depend on their position only.
        let a: Vec<u8> = (0..4096).map(byte_at).collect();
        let b: Vec<u8> = (0..4096).map(byte_at).collect();
        assert_eq!(a, b);
        assert_ne!(a[..1024], a[1024..2048]);
    }
}
