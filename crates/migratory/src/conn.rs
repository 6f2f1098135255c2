//! Socket plumbing shared by servers and clients: a reader task that hands
//! every chunk read to a callback, and a writer task that writes queued
//! segments (zero-copy slices of the protocol core's buffers) in order.

use std::io;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

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
/// read). `initial` is handed to `on_data` first (bytes already read);
/// `on_data` runs for every chunk read, `on_closed` once when the connection
/// ends (EOF, error, or `Out::Close`).
pub(crate) fn start<D, C>(
    stream: TcpStream,
    rx: mpsc::UnboundedReceiver<Out>,
    initial: Option<Bytes>,
    on_data: D,
    on_closed: C,
) where
    D: FnMut(&[u8]) + Send + 'static,
    C: FnOnce(String) + Send + 'static,
{
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    tokio::spawn(write_loop(wr, rx));
    tokio::spawn(read_loop(rd, initial, on_data, on_closed));
}

async fn read_loop<D, C>(
    mut rd: OwnedReadHalf,
    initial: Option<Bytes>,
    mut on_data: D,
    on_closed: C,
) where
    D: FnMut(&[u8]),
    C: FnOnce(String),
{
    if let Some(b) = initial {
        on_data(&b);
    }
    let mut buf = vec![0u8; READ_CHUNK];
    let reason = loop {
        match rd.read(&mut buf).await {
            Ok(0) => break "EOF".to_string(),
            Ok(n) => on_data(&buf[..n]),
            Err(e) => break e.to_string(),
        }
    };
    on_closed(reason);
}

async fn write_loop(mut wr: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Out>) {
    while let Some(out) = rx.recv().await {
        match out {
            Out::Data(segs) => {
                if write_segments(&mut wr, &segs).await.is_err() {
                    break;
                }
            }
            Out::Close => break,
        }
    }
    let _ = wr.shutdown().await;
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
