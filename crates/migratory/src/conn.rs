//! Socket plumbing shared by servers and clients: non-blocking reads into
//! a buffer and writes from a queue of segments (zero-copy slices of the
//! protocol cores' buffers), and, for peer links, a reader task that hands
//! every chunk read to a callback and a writer task that writes queued
//! segments in order.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Size of one socket read.
const READ_CHUNK: usize = 64 * 1024;

/// What the writer task is asked to do.
#[derive(Debug)]
pub(crate) enum Out {
    /// Write these segments, in order.
    Data(Vec<Bytes>),
    /// Flush and close the connection.
    Close,
}

/// Sending side of a connection's write queue.
pub(crate) type Tx = mpsc::UnboundedSender<Out>;

/// Starts the reader and writer tasks of `stream`; the writer serves `rx`
/// (make the channel first, so its sender is registered before any byte is
/// read) and, if given, takes what it wrote off `queued` (the senders add
/// what they queue: the caller bounds the queue with it). `initial` is
/// handed to `on_data` first (bytes already read). `on_data` runs after
/// every read with the input buffer: what it left there last time,
/// followed by what was read. It takes what it can use and leaves the rest
/// (a partial frame) for the next read to append to, and returns `false`
/// to close the connection; `on_closed` runs once when it ends for any reason (EOF,
/// error, `on_data` refusing, or `Out::Close`). Either way both halves are
/// closed: nothing is left half-open.
pub(crate) fn start<D, C>(
    stream: TcpStream,
    rx: mpsc::UnboundedReceiver<Out>,
    queued: Option<Arc<AtomicUsize>>,
    initial: Option<Bytes>,
    on_data: D,
    on_closed: C,
) where
    D: FnMut(&mut BytesMut) -> bool + Send + 'static,
    C: FnOnce(String) + Send + 'static,
{
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let (stop_tx, stop_rx) = oneshot::channel();
    let writer = tokio::spawn(write_loop(wr, rx, queued, stop_tx));
    tokio::spawn(async move {
        let reason = read_loop(rd, initial, on_data, stop_rx).await;
        // The writer ends with us (it may be blocked on a peer that does
        // not read): the socket closes whole.
        writer.abort();
        on_closed(reason);
    });
}

async fn read_loop<D>(
    rd: OwnedReadHalf,
    initial: Option<Bytes>,
    mut on_data: D,
    mut stop: oneshot::Receiver<()>,
) -> String
where
    D: FnMut(&mut BytesMut) -> bool,
{
    // The socket reads straight into this buffer, after what the last
    // round left unprocessed: no copy of our own. A connection with
    // nothing to read gives it back, so an idle one holds none.
    let mut buf = BytesMut::new();
    if let Some(b) = initial {
        buf.extend_from_slice(&b);
        if !on_data(&mut buf) {
            return "input refused".into();
        }
    }
    loop {
        tokio::select! {
            r = rd.readable() => {
                if let Err(e) = r {
                    return e.to_string();
                }
            }
            _ = &mut stop => return "closed locally".into(),
        }
        loop {
            if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                buf.reserve(READ_CHUNK);
            }
            match rd.try_read_buf(&mut buf) {
                Ok(0) => return "EOF".into(),
                Ok(_) => {
                    if !on_data(&mut buf) {
                        return "input refused".into();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if buf.is_empty() {
                        buf = BytesMut::new();
                    }
                    break;
                }
                Err(e) => return e.to_string(),
            }
        }
    }
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Out>,
    queued: Option<Arc<AtomicUsize>>,
    stop: oneshot::Sender<()>,
) {
    while let Some(out) = rx.recv().await {
        match out {
            Out::Data(segs) => {
                if write_segments(&mut wr, &segs).await.is_err() {
                    break;
                }
                if let Some(q) = &queued {
                    let n: usize = segs.iter().map(Bytes::len).sum();
                    q.fetch_sub(n, Ordering::Relaxed);
                }
            }
            Out::Close => break,
        }
    }
    let _ = wr.shutdown().await;
    let _ = stop.send(());
}

/// Writes every segment, vectored where the kernel takes several at once.
async fn write_segments(wr: &mut OwnedWriteHalf, segs: &[Bytes]) -> io::Result<()> {
    let mut i = 0;
    let mut off = 0;
    while i < segs.len() {
        let slices: Vec<io::IoSlice<'_>> = std::iter::once(io::IoSlice::new(&segs[i][off..]))
            .chain(segs[i + 1..].iter().take(63).map(|s| io::IoSlice::new(s)))
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 && i < segs.len() {
            let left = segs[i].len() - off;
            if n >= left {
                n -= left;
                i += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
        while i < segs.len() && segs[i].len() == off {
            i += 1;
            off = 0;
        }
    }
    Ok(())
}

/// TCP keepalive on a session's connection: the kernel probes a peer that
/// has been silent for `KEEPALIVE_IDLE` and reports the connection dead
/// after `KEEPALIVE_PROBES` unanswered probes, `KEEPALIVE_INTERVAL` apart
/// (about 20 s in all). This finds a dead host or a cut network without
/// waking either process while the session is idle, so an idle session
/// needs only rare application-level Pings (which also catch a server
/// process that hangs).
pub(crate) fn keepalive(stream: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    // Best effort: without it, Pings still find a silent server.
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&ka);
}

const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_PROBES: u32 = 5;

/// Reads what the socket has now into `buf` (after what it already
/// holds): `Ok(Some(n))` for `n` bytes, `Ok(Some(0))` at EOF, `Ok(None)`
/// when nothing is there (an empty buffer is then given back, so an idle
/// connection holds none).
pub(crate) fn try_read_some(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<Option<usize>> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    match stream.try_read_buf(buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            if buf.is_empty() {
                *buf = BytesMut::new();
            }
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Writes the front of `pending` while the socket takes bytes; returns how
/// many it took and whether bytes remain because it is full.
pub(crate) fn try_write_queued(
    stream: &TcpStream,
    pending: &mut VecDeque<Bytes>,
) -> io::Result<(usize, bool)> {
    let mut taken = 0;
    while !pending.is_empty() {
        let slices: Vec<io::IoSlice<'_>> = pending
            .iter()
            .take(64)
            .map(|b| io::IoSlice::new(b))
            .collect();
        match stream.try_write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(mut n) => {
                taken += n;
                while n > 0 {
                    let front = pending.front_mut().expect("bytes were written");
                    if front.len() <= n {
                        n -= front.len();
                        pending.pop_front();
                    } else {
                        front.advance(n);
                        n = 0;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((taken, true)),
            Err(e) => return Err(e),
        }
    }
    Ok((taken, false))
}

/// Writes all of `pending`, waiting for room, within `bound` (for a
/// connection that is closing).
pub(crate) async fn flush_queued(
    stream: &TcpStream,
    pending: &mut VecDeque<Bytes>,
    bound: Duration,
) {
    let write = async {
        while !pending.is_empty() {
            stream.writable().await?;
            try_write_queued(stream, pending)?;
        }
        Ok::<(), io::Error>(())
    };
    let _ = tokio::time::timeout(bound, write).await;
}

/// Drives a protocol core's timer: sleeps until `deadline()` (or until
/// `notify` says the deadline may have moved), then calls `fire()`.
pub(crate) async fn run_timer(
    notify: &tokio::sync::Notify,
    deadline: impl Fn() -> Option<std::time::Instant>,
    fire: impl Fn(),
) {
    loop {
        match deadline() {
            Some(t) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t.into()) => fire(),
                    _ = notify.notified() => {}
                }
            }
            None => notify.notified().await,
        }
    }
}
