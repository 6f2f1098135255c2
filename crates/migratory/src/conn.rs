//! Socket plumbing shared by servers and clients: non-blocking reads into
//! a buffer and writes from a queue of segments (zero-copy slices of the
//! protocol cores' buffers), and, for control links between servers, a
//! sending side that writes from the sender's task while the socket takes
//! bytes and one task per link that reads and writes the rest.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use migratory_proto::stream::{Block, BLOCK};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Size of one socket read while bytes flow.
const READ_CHUNK: usize = BLOCK;
/// Size of a read when no partial frame is pending: a request or a ping
/// fits, and only input that leaves a frame unfinished earns
/// [`READ_CHUNK`], so a connection with little traffic does not churn (and
/// pin, through the payload slices it hands on) 64 KiB blocks.
const FIRST_READ: usize = 4 * 1024;

/// Most bytes one read of a connection being admitted takes.
pub(crate) const ADMISSION_READ: usize = migratory_proto::frame::MAX_ADMISSION_FRAME;

/// A byte stream of an operator's connection to a server: TCP, with TLS
/// on it unless the pool runs insecure plaintext.
pub(crate) trait AsyncIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncIo for T {}
/// A boxed [`AsyncIo`].
pub(crate) type BoxIo = Box<dyn AsyncIo>;

/// Most bytes of one message a sender writes to a control link's socket
/// itself ([`LinkOut::send`]); larger messages (a big state reply, a
/// backup's catch-up) are left to the link's task, so a sender holding
/// the server's lock does not encrypt megabytes under it.
const LINK_DIRECT_WRITE: usize = 64 * 1024;

/// Most bytes a control link's task reads before it lets the other tasks
/// of its worker run.
const LINK_READ_BUDGET: usize = 1024 * 1024;

/// Bound on writing what a closing control link has queued.
const LINK_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The sending side of a control link. A message goes out on the socket
/// from the sender's own task when nothing is queued before it and the
/// socket takes it (one task wake-up less per state request and reply);
/// what the socket does not take waits here, in order, for the link's
/// task ([`start_link`]), which writes it when the socket has room,
/// without holding the queue's lock (senders only append meanwhile).
#[derive(Debug)]
pub(crate) struct LinkOut {
    wire: Arc<Wire>,
    q: std::sync::Mutex<LinkQueue>,
    /// Wakes the link's task: output waits for it, or the link closes.
    wake: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct LinkQueue {
    pending: VecDeque<Bytes>,
    /// Bytes in `pending` and in the link task's batch.
    bytes: usize,
    /// The link's task is writing a batch taken from `pending`: what is
    /// queued now goes after it.
    writing: bool,
    /// The socket was full when last written: the link's task waits for
    /// room.
    full: bool,
    /// The link is closing: nothing more is queued. `Some(true)` writes
    /// what is queued first; `Some(false)` drops it.
    closing: Option<bool>,
    /// A sender's write failed: the link's task ends with this.
    failed: Option<String>,
}

/// A message could not be queued: `max` bytes already wait unsent.
#[derive(Debug)]
pub(crate) struct Stalled;

impl LinkOut {
    /// The sending side of `wire`.
    pub(crate) fn new(wire: Arc<Wire>) -> Arc<Self> {
        Arc::new(Self {
            wire,
            q: std::sync::Mutex::new(LinkQueue::default()),
            wake: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkQueue> {
        self.q.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `msg` after what is queued, and writes it at once if it is
    /// first in line and small. Refused when more than `max` bytes would
    /// wait unsent: the peer stopped reading. A link that is closing
    /// drops it (its end tells the endpoint the peer is gone).
    pub(crate) fn send(&self, msg: Bytes, max: usize) -> Result<(), Stalled> {
        let mut q = self.lock();
        if q.closing.is_some() || q.failed.is_some() || msg.is_empty() {
            return Ok(());
        }
        if q.bytes + msg.len() > max {
            return Err(Stalled);
        }
        let len = msg.len();
        q.bytes += len;
        q.pending.push_back(msg);
        if q.writing || q.full || q.pending.len() > 1 {
            // The link's task writes it after what is before it.
            return Ok(());
        }
        if len > LINK_DIRECT_WRITE {
            self.wake.notify_one();
            return Ok(());
        }
        let r = self.wire.try_write(&mut q.pending);
        if q.settle(r) {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Closes the link: after what is queued (within a bound) if `flush`,
    /// else at once, dropping it.
    pub(crate) fn close(&self, flush: bool) {
        let mut q = self.lock();
        if q.closing != Some(false) {
            q.closing = Some(flush);
        }
        self.wake.notify_one();
    }
}

impl LinkQueue {
    /// Records the outcome of a write of the front of the queue; whether
    /// the link's task must act (bytes remain, or the write failed).
    fn settle(&mut self, r: io::Result<(usize, bool)>) -> bool {
        match r {
            Ok((n, full)) => {
                self.bytes -= n;
                self.full = full;
                full
            }
            Err(e) => {
                self.failed = Some(e.to_string());
                true
            }
        }
    }
}

/// Runs a control link's task: it reads, handing what it read to
/// `on_data`, and writes what senders left queued in `out` when the
/// socket has room. `on_data` gets the input buffer: what it left there
/// last time, followed by what was read; it takes what it can use, leaves
/// the rest (a partial message), and returns `false` to close the link.
/// `on_closed` runs once when the link ends for any reason (EOF, error,
/// `on_data` refusing, or [`LinkOut::close`]), after its socket was shut
/// down; the socket closes when the last handle on `out` goes.
pub(crate) fn start_link<D, C>(out: Arc<LinkOut>, on_data: D, on_closed: C)
where
    D: FnMut(&mut BytesMut) -> bool + Send + 'static,
    C: FnOnce(String) + Send + 'static,
{
    tokio::spawn(async move {
        let reason = run_link(&out, on_data).await;
        let (flush, mut pending) = {
            let mut q = out.lock();
            let flush = reason.is_none() && q.closing == Some(true);
            q.closing = Some(flush);
            q.bytes = 0;
            (flush, std::mem::take(&mut q.pending))
        };
        if flush {
            // Closed locally: what was queued goes out first.
            out.wire.close(&mut pending, LINK_FLUSH_TIMEOUT).await;
        } else {
            let _ = socket2::SockRef::from(out.wire.stream()).shutdown(std::net::Shutdown::Both);
        }
        on_closed(reason.unwrap_or_else(|| "closed locally".into()));
    });
}

/// The link's loop: `None` when it was closed locally, else why it ended.
async fn run_link<D>(out: &LinkOut, mut on_data: D) -> Option<String>
where
    D: FnMut(&mut BytesMut) -> bool,
{
    let wire = &out.wire;
    let mut input = Input::default();
    loop {
        // Input first: bytes TLS decrypted during the handshake wait in
        // it, not in the socket. What there is now (at most the budget),
        // handed on a block at a time, and not once the link is closing.
        let mut total = 0;
        let mut drained = false;
        let mut ended = None;
        while total < LINK_READ_BUDGET && !drained && ended.is_none() {
            match wire.try_read(&mut input) {
                Ok(Some(0)) => ended = Some("EOF".to_string()),
                Ok(Some(n)) => total += n,
                Ok(None) => drained = true,
                Err(e) => ended = Some(e.to_string()),
            }
            let hand_on = drained || ended.is_some() || input.buf.len() >= READ_CHUNK;
            if hand_on && !input.buf.is_empty() {
                if out.lock().closing.is_some() {
                    return None;
                }
                if !on_data(&mut input.buf) {
                    return Some("input refused".into());
                }
            }
        }
        // The messages were decoded out of the block: it goes back.
        if let Some(b) = input.retired() {
            b.give_back();
        }
        if ended.is_some() {
            return ended;
        }
        // Output: what is queued (and TLS records a read produced), in
        // batches written without the queue's lock.
        let full = loop {
            let mut batch = {
                let mut q = out.lock();
                if let Some(e) = q.failed.take() {
                    q.closing = Some(false);
                    return Some(e);
                }
                if q.closing.is_some() {
                    return None;
                }
                if q.pending.is_empty() && !q.full && !wire.wants_write() {
                    break false;
                }
                q.writing = true;
                std::mem::take(&mut q.pending)
            };
            let r = wire.try_write(&mut batch);
            let mut q = out.lock();
            q.writing = false;
            // What the socket did not take goes back in front of what was
            // queued meanwhile.
            batch.append(&mut q.pending);
            q.pending = batch;
            q.settle(r);
            if let Some(e) = q.failed.take() {
                q.closing = Some(false);
                return Some(e);
            }
            if q.full {
                break true;
            }
        };
        if total >= LINK_READ_BUDGET {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            r = wire.stream().readable() => if let Err(e) = r { return Some(e.to_string()) },
            r = wire.stream().writable(), if full => if let Err(e) = r { return Some(e.to_string()) },
            _ = out.wake.notified() => {}
        }
    }
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

/// A connection's input: bytes read and not yet framed. Frames are carved
/// out of its block as shared slices, which the session's receive queue
/// keeps until the application reads them; so a block the reads have moved
/// on from is handed to that queue ([`Input::retired`], then the core's
/// `adopt_read_block`), which gives it to the process's pool once the bytes
/// in it are read ([`Block`]). The next busy connection takes it from there
/// instead of from the allocator, and an idle connection holds no block.
#[derive(Debug, Default)]
pub(crate) struct Input {
    /// Read and not yet framed.
    pub(crate) buf: BytesMut,
    /// The pooled block `buf` is in, if it is one.
    block: Option<Block>,
    /// A block the reads moved on from.
    retired: Option<Block>,
}

impl Input {
    /// Room for `want` more bytes after those pending: in place if there
    /// is room (or, for a buffer that is not a pooled block, if nothing
    /// else refers to it any more), else in a new buffer (at least `block`
    /// bytes, and twice what is pending, so a large frame arriving piece by
    /// piece is copied a bounded number of times), to which the pending
    /// bytes move. A new buffer of exactly [`BLOCK`] bytes is a pooled
    /// block.
    fn room(&mut self, want: usize, block: usize) {
        let pending = self.buf.len();
        // A pooled block is never free in place (its token refers to it).
        let reclaimable = self.block.is_none();
        if self.buf.capacity() - pending >= want || (reclaimable && self.buf.try_reclaim(want)) {
            return;
        }
        let size = block.max(pending + want).max(2 * pending);
        // A full block (a frame in progress) comes from the pool; small
        // first reads, and connections not admitted yet, do not earn one.
        let (next_block, mut next) = if size == BLOCK {
            let (b, work) = Block::take();
            (Some(b), work)
        } else {
            (None, BytesMut::with_capacity(size))
        };
        next.extend_from_slice(&self.buf);
        self.buf = next;
        if let Some(used) = std::mem::replace(&mut self.block, next_block) {
            self.retire(used);
        }
    }

    fn retire(&mut self, block: Block) {
        if let Some(older) = self.retired.replace(block) {
            older.give_back();
        }
    }

    /// Nothing more to read now: with nothing pending either, the
    /// connection is idle and retires its block.
    fn idle(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
            if let Some(b) = self.block.take() {
                self.retire(b);
            }
        }
    }

    /// The block the reads last moved on from, for the session's receive
    /// queue to keep until the bytes carved from it are read.
    pub(crate) fn retired(&mut self) -> Option<Block> {
        self.retired.take()
    }
}

/// Reads what the socket has now into `input` (after what it already
/// holds): `Ok(Some(n))` for `n` bytes, `Ok(Some(0))` at EOF, `Ok(None)`
/// when nothing is there (an idle connection then holds no buffer).
pub(crate) fn try_read_some(stream: &TcpStream, input: &mut Input) -> io::Result<Option<usize>> {
    if input.buf.is_empty() {
        // Nothing pending: a small read first (a frame that does not fit
        // leaves a part pending, and the next read is a full one).
        input.room(FIRST_READ, FIRST_READ);
    } else {
        // Room for the rest of the pending frame (as far as one read
        // goes), so it is not moved again.
        let rest = migratory_proto::bytes_missing(&input.buf);
        input.room(rest.clamp(READ_CHUNK / 4, READ_CHUNK), READ_CHUNK);
    }
    match stream.try_read_buf(&mut input.buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            input.idle();
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The first segments of `pending`, for one vectored write.
fn front_slices(pending: &VecDeque<Bytes>) -> Vec<io::IoSlice<'_>> {
    pending
        .iter()
        .take(64)
        .map(|b| io::IoSlice::new(b))
        .collect()
}

/// Drops the first `n` bytes of `pending` (they were written).
fn consume_front(pending: &mut VecDeque<Bytes>, mut n: usize) {
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

/// Writes the front of `pending` while the socket takes bytes; returns how
/// many it took and whether bytes remain because it is full.
pub(crate) fn try_write_queued(
    stream: &TcpStream,
    pending: &mut VecDeque<Bytes>,
) -> io::Result<(usize, bool)> {
    let mut taken = 0;
    while !pending.is_empty() {
        match stream.try_write_vectored(&front_slices(pending)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                taken += n;
                consume_front(pending, n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((taken, true)),
            Err(e) => return Err(e),
        }
    }
    Ok((taken, false))
}

/// Tells a timer task ([`run_timer`]) sleeping until `armed` about the
/// core's next deadline `next`: it is woken only when `next` is earlier
/// (most calls into a core do not move its deadline, and a needless
/// wake-up costs a task switch and the core's lock once more).
pub(crate) fn rearm_timer(
    notify: &tokio::sync::Notify,
    armed: &mut Option<std::time::Instant>,
    next: Option<std::time::Instant>,
) {
    if next.is_some_and(|t| armed.is_none_or(|a| t < a)) {
        *armed = next;
        notify.notify_one();
    }
}

/// Drives a protocol core's timer: sleeps until `deadline()` (or until
/// `notify` says the deadline may have moved), then calls `fire()`.
/// `deadline` records what it returns as the deadline slept until, for
/// [`rearm_timer`].
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

/// One incarnation's connection: a TCP socket, with a TLS 1.3 session on
/// it unless the pool runs insecure plaintext. Reads and writes are
/// non-blocking (`try_*`) so that any task holding the session can move
/// bytes while the socket is ready; the TLS state has its own short lock
/// (taken after a session's lock, never before it).
#[derive(Debug)]
pub(crate) struct Wire {
    stream: TcpStream,
    /// Boxed: a rustls connection is over a kilobyte, which a plaintext
    /// connection should not carry.
    tls: Option<Box<std::sync::Mutex<rustls::Connection>>>,
}

/// `io::Read`/`io::Write` over a tokio socket's non-blocking calls, for
/// rustls.
struct SockIo<'a>(&'a TcpStream);

impl io::Read for SockIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl io::Write for SockIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl Wire {
    /// A plaintext connection.
    pub(crate) fn plain(stream: TcpStream) -> Self {
        Self { stream, tls: None }
    }

    /// A connection whose TLS handshake is done (bytes it already
    /// decrypted stay in `tls`, and are read first).
    pub(crate) fn tls(stream: TcpStream, tls: rustls::Connection) -> Self {
        Self {
            stream,
            tls: Some(Box::new(std::sync::Mutex::new(tls))),
        }
    }

    /// The socket, for a connection that turned out not to be migratory.
    pub(crate) fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// The socket (for readiness and socket options).
    pub(crate) fn stream(&self) -> &TcpStream {
        &self.stream
    }

    fn lock_tls(&self) -> Option<std::sync::MutexGuard<'_, rustls::Connection>> {
        self.tls
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The peer's certificate chain (TLS only).
    pub(crate) fn peer_certificates(
        &self,
    ) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
        let tls = self.lock_tls()?;
        tls.peer_certificates().map(<[_]>::to_vec)
    }

    /// Whether the TLS handshake resumed an earlier session (no
    /// certificate was exchanged).
    pub(crate) fn resumed(&self) -> bool {
        self.lock_tls()
            .is_some_and(|t| t.handshake_kind() == Some(rustls::HandshakeKind::Resumed))
    }

    /// The connection's channel binding: 32 bytes both ends export from
    /// its TLS session (RFC 8446 section 7.5) and nobody else can; `None`
    /// without TLS.
    pub(crate) fn binding(&self) -> Option<[u8; 32]> {
        let tls = self.lock_tls()?;
        tls.export_keying_material([0u8; 32], migratory_proto::mac::BINDING_LABEL, None)
            .ok()
    }

    /// Whether TLS records wait for the socket to take them.
    pub(crate) fn wants_write(&self) -> bool {
        self.lock_tls().is_some_and(|t| t.wants_write())
    }

    /// As [`try_read_some`]: what the peer sent, decrypted, appended to
    /// `input` (all of it: no decrypted byte waits behind the socket's
    /// readiness).
    pub(crate) fn try_read(&self, input: &mut Input) -> io::Result<Option<usize>> {
        self.try_read_max(input, usize::MAX)
    }

    fn try_read_max(&self, input: &mut Input, max: usize) -> io::Result<Option<usize>> {
        let Some(mut tls) = self.lock_tls() else {
            if max == usize::MAX {
                return try_read_some(&self.stream, input);
            }
            input.room(max, max);
            let mut limited = bytes::BufMut::limit(&mut input.buf, max);
            return match self.stream.try_read_buf(&mut limited) {
                Ok(n) => Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(e),
            };
        };
        loop {
            let state = tls.process_new_packets().map_err(tls_error)?;
            let n = state.plaintext_bytes_to_read().min(max);
            if n > 0 {
                // Straight from rustls's buffers: one copy, nothing zeroed.
                input.room(n, READ_CHUNK);
                let buf = &mut input.buf;
                let mut reader = tls.reader();
                let mut left = n;
                while left > 0 {
                    let chunk = io::BufRead::fill_buf(&mut reader)?;
                    if chunk.is_empty() {
                        break;
                    }
                    let k = chunk.len().min(left);
                    buf.extend_from_slice(&chunk[..k]);
                    io::BufRead::consume(&mut reader, k);
                    left -= k;
                }
                return Ok(Some(n - left));
            }
            if state.peer_has_closed() {
                return Ok(Some(0));
            }
            match tls.read_tls(&mut SockIo(&self.stream)) {
                Ok(0) => return Ok(Some(0)),
                Ok(_) => {
                    // Records the reading produced (a key update's answer).
                    if tls.wants_write() {
                        let _ = tls.write_tls(&mut SockIo(&self.stream));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    input.idle();
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// As [`try_write_queued`]: with TLS, what the TLS session took (it
    /// holds at most its buffer limit of records the socket did not take
    /// yet) counts as taken; bytes remain when the socket is full.
    pub(crate) fn try_write(&self, pending: &mut VecDeque<Bytes>) -> io::Result<(usize, bool)> {
        let Some(mut tls) = self.lock_tls() else {
            return try_write_queued(&self.stream, pending);
        };
        let mut taken = 0;
        loop {
            while tls.wants_write() {
                match tls.write_tls(&mut SockIo(&self.stream)) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((taken, true)),
                    Err(e) => return Err(e),
                }
            }
            if pending.is_empty() {
                return Ok((taken, false));
            }
            let n = io::Write::write_vectored(&mut tls.writer(), &front_slices(pending))?;
            if n == 0 {
                return Ok((taken, true));
            }
            taken += n;
            consume_front(pending, n);
        }
    }

    /// Reads at least one byte and at most [`ADMISSION_READ`] (waiting for
    /// the socket), appended to `input`; 0 at the end. For a connection not
    /// admitted yet: what it has proved does not earn it large buffers.
    pub(crate) async fn read(&self, input: &mut Input) -> io::Result<usize> {
        loop {
            if let Some(n) = self.try_read_max(input, ADMISSION_READ)? {
                return Ok(n);
            }
            self.stream.readable().await?;
        }
    }

    /// Writes all of `pending` (and the TLS records behind it), waiting
    /// for room.
    pub(crate) async fn write_all(&self, pending: &mut VecDeque<Bytes>) -> io::Result<()> {
        loop {
            let (_, full) = self.try_write(pending)?;
            if !full && !self.wants_write() {
                return Ok(());
            }
            self.stream.writable().await?;
        }
    }

    /// Writes what is pending within `bound`, then ends the connection: a
    /// TLS close_notify, then the TCP FIN.
    pub(crate) async fn close(&self, pending: &mut VecDeque<Bytes>, bound: Duration) {
        let flush = async {
            self.write_all(pending).await?;
            if let Some(mut tls) = self.lock_tls() {
                tls.send_close_notify();
            }
            self.write_all(pending).await
        };
        let _ = tokio::time::timeout(bound, flush).await;
        let _ = socket2::SockRef::from(&self.stream).shutdown(std::net::Shutdown::Write);
    }
}
