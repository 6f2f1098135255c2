//! MIGSOCK's count server (MIGSOCK report, "count server"): sends the integers
//! 1, 2, 3, ... one decimal number per line, one line per interval (or as
//! fast as the session takes them when the interval is zero), until the
//! client closes its side. Input is read and discarded, so the client can
//! close. A plain TCP client is closed, after the line being written, once
//! the server drains.
//!
//! State: the next number to send and how many bytes of its line were
//! already written (a write may take part of a line), snapshotted after
//! every write and every discarding read. Encoding: `b'C'`, version `1`,
//! the number (u64 big-endian), the offset in its line (u8): 11 bytes.

use std::future::{poll_fn, Future};
use std::io::{self, Write as _};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use migratory::{Arrival, Session};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::{invalid, snapshot, Drain};

const TAG: u8 = b'C';
const VERSION: u8 = 1;
const STATE_LEN: usize = 11;
/// Most bytes of lines offered to one write when the interval is zero.
const BATCH: usize = 16 * 1024;
/// Read buffer for the discarded input.
const READ_BUF: usize = 16 * 1024;

/// The count server's state (its snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    /// The number whose line is being (or will next be) written.
    next: u64,
    /// Bytes of that line already written.
    line_off: u8,
}

impl Default for State {
    fn default() -> Self {
        Self {
            next: 1,
            line_off: 0,
        }
    }
}

/// Length of `n`'s line: its decimal digits and the newline.
fn line_len(n: u64) -> usize {
    n.checked_ilog10().unwrap_or(0) as usize + 2
}

impl State {
    fn encode(&self) -> [u8; STATE_LEN] {
        let mut b = [0u8; STATE_LEN];
        b[0] = TAG;
        b[1] = VERSION;
        b[2..10].copy_from_slice(&self.next.to_be_bytes());
        b[10] = self.line_off;
        b
    }

    fn decode(b: &[u8]) -> io::Result<Self> {
        let b: &[u8; STATE_LEN] = b.try_into().map_err(|_| {
            invalid(format!(
                "counter state: {} bytes, expected {STATE_LEN}",
                b.len()
            ))
        })?;
        if b[0] != TAG || b[1] != VERSION {
            return Err(invalid(format!(
                "counter state: unknown tag/version {:#04x}/{}",
                b[0], b[1]
            )));
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&b[2..10]);
        let st = Self {
            next: u64::from_be_bytes(n),
            line_off: b[10],
        };
        if st.next == 0 || usize::from(st.line_off) >= line_len(st.next) {
            return Err(invalid(format!("counter state: inconsistent {st:?}")));
        }
        Ok(st)
    }

    /// Accounts for `k` more bytes written.
    fn advance(&mut self, mut k: usize) -> io::Result<()> {
        while k > 0 {
            let rest = line_len(self.next) - usize::from(self.line_off);
            if k >= rest {
                k -= rest;
                self.next = self
                    .next
                    .checked_add(1)
                    .ok_or_else(|| io::Error::other("counter: no numbers left"))?;
                self.line_off = 0;
            } else {
                // rest < 22, so this fits.
                self.line_off += k as u8;
                k = 0;
            }
        }
        Ok(())
    }

    /// The bytes to write next: the rest of the current line and, if
    /// `batch`, the following lines up to about [`BATCH`] bytes.
    fn fill(&self, out: &mut Vec<u8>, batch: bool) {
        out.clear();
        // Writing to a Vec cannot fail.
        let _ = writeln!(out, "{}", self.next);
        out.drain(..usize::from(self.line_off).min(out.len()));
        let mut n = self.next;
        while batch && out.len() < BATCH {
            match n.checked_add(1) {
                Some(m) => n = m,
                None => break,
            }
            let _ = writeln!(out, "{n}");
        }
    }
}

/// What one round of the loop did.
#[derive(Debug, Default)]
struct Round {
    /// The client closed its side, or the server drains.
    eof: bool,
    read: bool,
    wrote: usize,
}

/// Serves one count session until the client closes its side, the server
/// drains (a plain client), or the session moves away.
pub(super) async fn serve(
    s: &mut Session,
    arrival: Arrival,
    interval: Duration,
    drain: Drain,
) -> io::Result<()> {
    let mut st = match arrival {
        Arrival::Migrated { state } if !state.is_empty() => State::decode(&state)?,
        _ => State::default(),
    };
    let batch = interval.is_zero();
    let mut out = Vec::with_capacity(BATCH + 32);
    let mut rbuf = vec![0u8; READ_BUF];
    let mut pause: Option<Pin<Box<tokio::time::Sleep>>> = None;
    st.fill(&mut out, batch);
    let mut drain = drain;
    let drained = drain.wait();
    tokio::pin!(drained);
    loop {
        let round = poll_fn(|cx| {
            let mut r = Round::default();
            // Draining ends the session as the client's end would.
            if drained.as_mut().poll(cx).is_ready() {
                r.eof = true;
                return Poll::Ready(Ok(r));
            }
            let mut rb = ReadBuf::new(&mut rbuf);
            match Pin::new(&mut *s).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => r.eof = true,
                Poll::Ready(Ok(())) => r.read = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
            if let Some(p) = pause.as_mut() {
                if p.as_mut().poll(cx).is_ready() {
                    pause = None;
                }
            }
            if !r.eof && pause.is_none() {
                match Pin::new(&mut *s).poll_write(cx, &out) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => r.wrote = n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            if r.eof || r.read || r.wrote > 0 {
                Poll::Ready(Ok(r))
            } else {
                Poll::Pending
            }
        })
        .await?;
        if round.wrote > 0 {
            st.advance(round.wrote)?;
            if !batch && st.line_off == 0 {
                pause = Some(Box::pin(tokio::time::sleep(interval)));
            }
            st.fill(&mut out, batch);
        }
        if round.eof {
            // Never leave the client a partial line.
            if st.line_off != 0 {
                let mut rest = Vec::new();
                st.fill(&mut rest, false);
                s.write_all(&rest).await?;
                st.advance(rest.len())?;
            }
            s.shutdown().await?;
            return snapshot(s, &st.encode());
        }
        snapshot(s, &st.encode())?;
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use migratory::MigratoryStream;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::testing::{draining_options, options, pool, TempDir, TEST_TIMEOUT};
    use crate::Kind;

    /// Reads lines, checking they are consecutive numbers from `*expect`.
    struct Lines {
        partial: Vec<u8>,
        expect: u64,
    }

    impl Lines {
        fn new() -> Self {
            Self {
                partial: Vec::new(),
                expect: 1,
            }
        }

        fn feed(&mut self, data: &[u8]) {
            for &b in data {
                if b == b'\n' {
                    let line = std::str::from_utf8(&self.partial).unwrap();
                    assert_eq!(line.parse::<u64>().ok(), Some(self.expect), "line {line:?}");
                    self.expect += 1;
                    self.partial.clear();
                } else {
                    self.partial.push(b);
                    assert!(self.partial.len() <= 20, "line too long");
                }
            }
        }

        /// Reads until `n` lines were seen in total.
        async fn read_until<R: AsyncRead + Unpin>(&mut self, r: &mut R, n: u64) {
            let mut buf = vec![0u8; 4096];
            while self.expect <= n {
                let k = r.read(&mut buf).await.unwrap();
                assert!(k > 0, "EOF after {} lines", self.expect - 1);
                self.feed(&buf[..k]);
            }
        }

        /// Reads to EOF; all lines complete.
        async fn read_to_end<R: AsyncRead + Unpin>(&mut self, r: &mut R) {
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await.unwrap();
            self.feed(&rest);
            assert!(self.partial.is_empty(), "partial last line");
        }
    }

    #[test]
    fn state_round_trips_and_rejects_bad_input() {
        for st in [
            State::default(),
            State {
                next: 12345,
                line_off: 3,
            },
            State {
                next: u64::MAX,
                line_off: 20,
            },
        ] {
            assert_eq!(State::decode(&st.encode()).unwrap(), st);
            let e = st.encode();
            for cut in 0..e.len() {
                assert!(State::decode(&e[..cut]).is_err());
            }
            let mut long = e.to_vec();
            long.push(0);
            assert!(State::decode(&long).is_err());
        }
        let bad = |f: &dyn Fn(&mut [u8; STATE_LEN])| {
            let mut e = State::default().encode();
            f(&mut e);
            State::decode(&e).unwrap_err().kind()
        };
        assert_eq!(bad(&|e| e[0] = b'H'), io::ErrorKind::InvalidData);
        assert_eq!(bad(&|e| e[1] = 9), io::ErrorKind::InvalidData);
        assert_eq!(bad(&|e| e[9] = 0), io::ErrorKind::InvalidData); // next = 0
        assert_eq!(bad(&|e| e[10] = 2), io::ErrorKind::InvalidData); // "1\n" has 2 bytes
        assert!(State::decode(b"garbage!!!!").is_err());
        assert!(State::decode(&[]).is_err());
    }

    #[test]
    fn lines_and_partial_writes() {
        assert_eq!(line_len(1), 2);
        assert_eq!(line_len(9), 2);
        assert_eq!(line_len(10), 3);
        assert_eq!(line_len(u64::MAX), 21);
        let mut st = State {
            next: 9,
            line_off: 1,
        };
        let mut out = Vec::new();
        st.fill(&mut out, false);
        assert_eq!(out, b"\n");
        st.fill(&mut out, true);
        assert!(out.starts_with(b"\n10\n11\n12\n"));
        assert!(out.len() >= BATCH && out.ends_with(b"\n"));
        st.advance(1 + 3 + 1).unwrap();
        assert_eq!(
            st,
            State {
                next: 11,
                line_off: 1
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_exactly_across_migrations() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let dir = TempDir::new("counter");
            let o = options(&dir.0, Duration::ZERO);
            let pool = pool(Kind::Counter, vec![o.clone(), o.clone(), o]).await;
            let stream = MigratoryStream::connect(&pool.service[..1], &pool.tls)
                .await
                .unwrap();
            let mut ctl = stream.control();
            let (mut rd, mut wr) = tokio::io::split(stream);
            // Input is read and discarded.
            wr.write_all(&[b'x'; 100_000]).await.unwrap();
            let mut lines = Lines::new();
            for (upto, dest) in [
                (5_000, "s2"),
                (60_000, "s3"),
                (61_000, "s1"),
                (150_000, "s2"),
            ] {
                lines.read_until(&mut rd, upto).await;
                assert_eq!(ctl.migrate(Some(dest)).await.unwrap().as_str(), dest);
                wr.write_all(b"more input").await.unwrap();
            }
            lines.read_until(&mut rd, 200_000).await;
            wr.shutdown().await.unwrap();
            lines.read_to_end(&mut rd).await;
            assert!(lines.expect > 200_000);
            assert!(pool.errors().is_empty(), "{:?}", pool.errors());
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paced_counter_migrates() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let dir = TempDir::new("counter2");
            let o = options(&dir.0, Duration::from_millis(20));
            let pool = pool(Kind::Counter, vec![o.clone(), o]).await;
            let t0 = Instant::now();
            let mut stream = MigratoryStream::connect(&pool.service[..1], &pool.tls)
                .await
                .unwrap();
            let mut lines = Lines::new();
            lines.read_until(&mut stream, 5).await;
            stream.migrate(Some("s2")).await.unwrap();
            lines.read_until(&mut stream, 10).await;
            // Nine gaps, of which a migration may skip one.
            assert!(t0.elapsed() >= Duration::from_millis(7 * 20));
            stream.shutdown().await.unwrap();
            lines.read_to_end(&mut stream).await;
            assert!(pool.errors().is_empty(), "{:?}", pool.errors());
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counter_serves_a_plain_tcp_client() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let dir = TempDir::new("counter3");
            let o = options(&dir.0, Duration::ZERO);
            let pool = pool(Kind::Counter, vec![o.clone(), o]).await;
            // Sends nothing first: served as plain TCP after the preamble wait.
            let mut s = tokio::net::TcpStream::connect(pool.service[0])
                .await
                .unwrap();
            let mut lines = Lines::new();
            lines.read_until(&mut s, 50_000).await;
            s.shutdown().await.unwrap();
            lines.read_to_end(&mut s).await;
            assert!(pool.errors().is_empty(), "{:?}", pool.errors());
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_draining_server_closes_a_plain_client_after_whole_lines() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let dir = TempDir::new("counter-drain");
            let (o, drain) = draining_options(&dir.0, Duration::ZERO);
            let pool = pool(Kind::Counter, vec![o]).await;
            let mut plain = tokio::net::TcpStream::connect(pool.service[0])
                .await
                .unwrap();
            let mut m = MigratoryStream::connect(&pool.service[..1], &pool.tls)
                .await
                .unwrap();
            let (mut lp, mut lm) = (Lines::new(), Lines::new());
            lp.read_until(&mut plain, 20_000).await;
            lm.read_until(&mut m, 20_000).await;
            drain.send_replace(true);
            // Consecutive whole lines up to the end, which comes without
            // the plain client closing first.
            lp.read_to_end(&mut plain).await;
            assert!(lp.expect > 20_000);
            // The migratory session counts on.
            let upto = lm.expect + 50_000;
            lm.read_until(&mut m, upto).await;
            m.shutdown().await.unwrap();
            lm.read_to_end(&mut m).await;
            assert!(pool.errors().is_empty(), "{:?}", pool.errors());
        })
        .await
        .expect("test timed out");
    }
}
