//! Client connections: one task per connection admits it through the
//! endpoint (preamble, Hello or Migrate with its challenge, the wait for
//! the origin's state) and then drives the session it was attached to.
//!
//! The driver owns the socket and holds the session's own lock only for
//! each step. It reads into the session. Output leaves only while the
//! socket is writable ([`transmit`]): from the application's task right
//! after it writes, and from the driver when the socket has room again.
//! The session frames at most one batch beyond what the kernel took, and
//! counts bytes as sent only once the socket took them. A client's
//! memory cost at the server is thus its windows, one batch and the
//! kernel's buffers, whatever it acknowledges. The socket reads straight
//! into the session's input buffer, and a connection with nothing to read
//! gives it back, so an idle session holds no buffer at all.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use migratory_proto::control::ControlMessage;
use migratory_proto::error::DecodeError;
use migratory_proto::frame::{check_preamble, PreambleCheck};
use migratory_proto::server::{ServerEvent, Session as CoreSession, SessionSlot};
use migratory_proto::types::IncarnationId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tracing::debug;

use super::{Arrival, Session, Shared};
use crate::conn::{Input, Wire};
use crate::throttle::warn_throttled;

/// Bytes of output one driver frames at a time, beyond what the socket
/// took.
const BATCH: usize = 256 * 1024;

/// Most bytes one driver reads before it lets others run.
const READ_BUDGET: usize = 1024 * 1024;

/// Bound on writing the last bytes of a connection that is closing.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// A session behind its own lock, with the wakers of its application and
/// its driver.
#[derive(Debug)]
pub(crate) struct SessionCell {
    state: Mutex<CellState>,
}

#[derive(Debug)]
pub(crate) struct CellState {
    pub(crate) core: CoreSession,
    pub(crate) read_waker: Option<Waker>,
    pub(crate) write_waker: Option<Waker>,
    /// The task driving the session's current connection.
    pub(crate) driver: Option<Arc<Notify>>,
    /// The current connection's socket and what was framed for it but not
    /// yet taken: the driver and the application both write through it,
    /// under this lock.
    pub(crate) out: Option<Output>,
}

/// The write side of a session's connection.
#[derive(Debug)]
pub(crate) struct Output {
    wire: Arc<Wire>,
    inc: IncarnationId,
    pending: VecDeque<Bytes>,
    segs: Vec<Bytes>,
    /// The server's count of bytes its sessions moved (load reports).
    counted: Arc<std::sync::atomic::AtomicU64>,
}

/// Frames and writes the session's output while the socket takes bytes
/// (at most one batch framed beyond what it took, and about a batch
/// written per call: the session's lock is held meanwhile, and a state
/// request or the application must not wait behind a full-speed stream);
/// what the socket took counts as sent before this returns. `Ok(true)`
/// when output remains: the driver goes on once the socket is writable.
pub(crate) fn transmit(st: &mut CellState) -> io::Result<bool> {
    let CellState { core, out, .. } = st;
    // Only into the connection the session is attached to: right after a
    // client came back on a new one, the old one's driver may still hold
    // the output (the new driver takes over when it starts).
    let Some(o) = out.as_mut().filter(|o| core.incarnation() == Some(o.inc)) else {
        return Ok(false);
    };
    let mut taken = 0;
    let mut written = 0;
    let result = loop {
        if o.pending.is_empty() {
            core.on_transmitted(o.inc, std::mem::take(&mut taken));
            if core
                .poll_transmit(Instant::now(), &mut o.segs, BATCH)
                .is_none()
            {
                // Nothing more to frame: what TLS still holds goes out
                // (else the end of a burst would wait for the next one).
                break o.wire.try_write(&mut o.pending).map(|(_, full)| full);
            }
            o.pending.extend(o.segs.drain(..));
        }
        match o.wire.try_write(&mut o.pending) {
            Ok((n, full)) => {
                taken += n;
                written += n;
                o.counted
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                if full || written >= BATCH {
                    break Ok(true);
                }
            }
            Err(e) => break Err(e),
        }
    };
    if taken > 0 {
        core.on_transmitted(o.inc, taken);
    }
    result
}

/// How the endpoint, the driver and the application share a session.
#[derive(Debug, Clone)]
pub(crate) struct Slot(Arc<SessionCell>);

impl SessionSlot for Slot {
    fn new(core: CoreSession) -> Self {
        Slot(Arc::new(SessionCell {
            state: Mutex::new(CellState {
                core,
                read_waker: None,
                write_waker: None,
                driver: None,
                out: None,
            }),
        }))
    }

    /// The endpoint's calls (state requests, triggers, replication acks)
    /// are rare: everyone interested is woken after each.
    fn with<R>(&self, f: impl FnOnce(&mut CoreSession) -> R) -> R {
        let mut st = self.lock();
        let r = f(&mut st.core);
        let wakers = [st.read_waker.take(), st.write_waker.take()];
        let driver = st.driver.clone();
        drop(st);
        wakers.into_iter().flatten().for_each(Waker::wake);
        if let Some(d) = driver {
            d.notify_one();
        }
        r
    }

    fn peek<R>(&self, f: impl FnOnce(&CoreSession) -> R) -> R {
        f(&self.lock().core)
    }
}

impl Slot {
    pub(crate) fn lock(&self) -> MutexGuard<'_, CellState> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// After the application or a driver called its session directly: wakes
/// whom its events concern, sends its messages to peers, and tells the
/// endpoint what it must know. Takes the session's guard and releases it
/// before touching anything else (the endpoint's lock is taken before a
/// session's, never after).
pub(crate) fn settle(shared: &Arc<Shared>, mut st: MutexGuard<'_, CellState>) {
    let (mut read, mut write, mut ended) = (false, false, false);
    let mut close = Vec::new();
    while let Some(ev) = st.core.poll_event() {
        match ev {
            ServerEvent::Readable(_) => read = true,
            ServerEvent::Writable(_) => write = true,
            ServerEvent::MigratedAway(_) | ServerEvent::Finished(_) | ServerEvent::Dropped(_) => {
                (read, write, ended) = (true, true, true)
            }
            ServerEvent::CloseIncarnation { inc, reason } => close.push((inc, reason)),
            _ => {}
        }
    }
    let control: Vec<_> = std::iter::from_fn(|| st.core.poll_control()).collect();
    let endpoint: Vec<_> = std::iter::from_fn(|| st.core.poll_endpoint_event()).collect();
    let (sid, handle) = (st.core.id(), st.core.handle());
    let rw = if read { st.read_waker.take() } else { None };
    let ww = if write { st.write_waker.take() } else { None };
    drop(st);
    rw.into_iter().chain(ww).for_each(Waker::wake);
    if !endpoint.is_empty() || !close.is_empty() {
        let now = Instant::now();
        let mut ep = shared.lock();
        for ev in endpoint {
            ep.core.handle_endpoint_event(now, sid, handle, ev);
        }
        for (peer, msg) in &control {
            if let ControlMessage::StateReply { req, .. } = msg {
                // A busy session answered once its client caught up.
                ep.phases.answered(peer, *req, now);
            }
        }
        for (inc, reason) in close {
            if let Some(c) = ep.conns.get_mut(&inc) {
                debug!(server = %shared.me, %inc, %reason, "closing connection");
                c.close = Some(reason);
                c.wake.notify_one();
            }
        }
        shared.pump(&mut ep);
    }
    // After the endpoint learnt of a state reply among them, so that the
    // StateAck coming back finds the session.
    for (peer, msg) in control {
        shared.send_control(peer, &msg);
    }
    if ended {
        shared.changed.notify_waiters();
    }
}

/// What the runtime knows of one client connection (under the server's
/// lock).
#[derive(Debug)]
pub(crate) struct ConnEntry {
    pub(crate) addr: SocketAddr,
    /// Wakes the connection's task.
    pub(crate) wake: Arc<Notify>,
    /// Frames from the endpoint, while the connection is being admitted.
    pub(crate) out: BytesMut,
    /// Close the connection (after `out`), for this reason.
    pub(crate) close: Option<String>,
    /// The session the connection now carries.
    pub(crate) attached: Option<Slot>,
}

/// The client connections a server holds, against its limits (total and
/// per source address; an IPv6 source counts by its /64). Every accepted connection holds a [`ConnPermit`]
/// until it closes, plain TCP clients included.
#[derive(Debug)]
pub(crate) struct ConnLimits {
    total: usize,
    per_address: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl ConnLimits {
    pub(crate) fn new(total: usize, per_address: usize) -> Arc<Self> {
        debug_assert!(total > 0 && per_address > 0);
        Arc::new(Self {
            total,
            per_address,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// A permit for a new connection from `ip`, unless a limit is reached
    /// (then which).
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, &'static str> {
        // An IPv6 host usually holds a whole /64: count it as one address.
        let ip = match ip {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
                IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into())
            }
            IpAddr::V6(v6) => IpAddr::V4(v6.to_ipv4_mapped().expect("checked")),
            v4 => v4,
        };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.0 >= self.total {
            return Err("max_connections");
        }
        let n = open.1.entry(ip).or_insert(0);
        if *n >= self.per_address {
            return Err("max_connections_per_address");
        }
        *n += 1;
        open.0 += 1;
        Ok(ConnPermit {
            limits: self.clone(),
            ip,
        })
    }
}

/// One open client connection, counted until dropped.
#[derive(Debug)]
pub(crate) struct ConnPermit {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

pub(super) async fn accept_clients(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => match shared.conn_limits.admit(addr.ip()) {
                Ok(permit) => {
                    tokio::spawn(serve_client(shared.clone(), stream, addr, permit));
                }
                Err(limit) => {
                    // Refused at once (a reset: nothing was read), so the
                    // server keeps serving the connections it has.
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    warn_throttled!(server = %shared.me, %addr, limit, "connection refused: limit reached");
                }
            },
            Err(e) => {
                // Out of file descriptors (or the like): wait for some to
                // close, and say so once in a while, not for every try.
                warn_throttled!(server = %shared.me, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// First byte of a TLS record carrying a handshake message (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Tells a migratory client (TLS, or plaintext if the pool runs so) from a
/// plain one by the connection's first bytes, within the preamble wait;
/// serves a migratory one.
///
/// The task lives as long as the connection, so its future is kept small:
/// the TLS handshake and the preamble (about 2 KB of state), admission and
/// the final flush run as futures of their own, boxed for the time they
/// run, and an idle session's task holds little more than [`drive`]'s
/// state.
async fn serve_client(
    shared: Arc<Shared>,
    stream: TcpStream,
    addr: SocketAddr,
    permit: ConnPermit,
) {
    // Each boxed future is made in a statement of its own: a temporary of
    // the awaiting statement would keep its space in this future.
    let open = Box::pin(open_client(&shared, stream, addr, permit));
    let Some((wire, first, _permit)) = open.await else {
        return;
    };
    crate::conn::keepalive(wire.stream());
    let wake = Arc::new(Notify::new());
    let inc = {
        let mut st = shared.lock();
        let inc = st.core.new_incarnation(Instant::now(), wire.binding());
        st.conns.insert(
            inc,
            ConnEntry {
                addr,
                wake: wake.clone(),
                out: BytesMut::new(),
                close: None,
                attached: None,
            },
        );
        admission_input(&shared, &mut st, inc, &first);
        inc
    };
    // The preamble's buffer is not needed again: not kept for the life of
    // the connection.
    drop(first);
    let wire = Arc::new(wire);
    let admission = Box::pin(admit(&shared, &wire, inc, &wake));
    let admitted = admission.await;
    let (reason, mut pending) = match admitted {
        Ok(Some(slot)) => drive(&shared, &wire, inc, &slot, &wake).await,
        Ok(None) => ("refused".to_string(), VecDeque::new()),
        Err(e) => (e, VecDeque::new()),
    };
    debug!(server = %shared.me, %inc, %reason, "client connection closed");
    let close = Box::pin(wire.close(&mut pending, FLUSH_TIMEOUT));
    close.await;
    let mut st = shared.lock();
    st.conns.remove(&inc);
    st.core.handle_incarnation_closed(Instant::now(), inc);
    shared.pump(&mut st);
}

/// The start of a client connection: a plain client is handed to the
/// application (`None`); a migratory one comes back with its wire (TLS
/// set up), the bytes read so far, and its permit.
async fn open_client(
    shared: &Arc<Shared>,
    stream: TcpStream,
    addr: SocketAddr,
    permit: ConnPermit,
) -> Option<(Wire, BytesMut, ConnPermit)> {
    let mut peek = [0u8; 1];
    let first_byte = match tokio::time::timeout(shared.preamble_wait, stream.peek(&mut peek)).await
    {
        Ok(Ok(0)) | Ok(Err(_)) => return None,
        Ok(Ok(_)) => Some(peek[0]),
        // Silent client: a plain protocol where the server speaks first.
        Err(_) => None,
    };
    let _ = stream.set_nodelay(true);
    let Some(first_byte) = first_byte else {
        // Silent: a protocol where the server speaks first.
        debug!(%addr, "plain TCP client");
        let s = Session::plain(shared.clone(), Bytes::new(), stream, permit);
        let _ = shared.lock().accept_tx.send((s, Arrival::Plain));
        return None;
    };
    // One bound on the TLS handshake and the preamble together.
    let handshake_end = tokio::time::Instant::now() + shared.handshake;
    let (wire, first) = match (&shared.tls, first_byte) {
        (Some(tls), TLS_HANDSHAKE_RECORD) => {
            let accept = tokio_rustls::TlsAcceptor::from(tls.service.clone()).accept(stream);
            let tls_stream = match tokio::time::timeout_at(handshake_end, accept).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(server = %shared.me, %addr, error = %e, "TLS handshake failed");
                    return None;
                }
                Err(_) => {
                    debug!(server = %shared.me, %addr, "TLS handshake timed out");
                    return None;
                }
            };
            let (tcp, conn) = tls_stream.into_inner();
            let wire = Wire::tls(tcp, rustls::Connection::Server(conn));
            let resumed = wire.resumed();
            shared.handshakes[usize::from(resumed)]
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            metrics::counter!(
                super::TLS_HANDSHAKES,
                "server" => shared.me.to_string(),
                "kind" => if resumed { "resumed" } else { "full" }
            )
            .increment(1);
            // Inside TLS only a migratory client is served. (A migratory
            // client without TLS is refused by the endpoint when the pool
            // requires TLS.)
            let left = handshake_end.saturating_duration_since(tokio::time::Instant::now());
            match read_preamble(shared, &wire, addr, left).await {
                Some((true, first)) => (wire, first),
                _ => return None,
            }
        }
        _ => {
            let wire = Wire::plain(stream);
            match read_preamble(shared, &wire, addr, shared.preamble_wait).await {
                Some((true, first)) => (wire, first),
                Some((false, first)) => {
                    debug!(%addr, "plain TCP client");
                    let s =
                        Session::plain(shared.clone(), first.freeze(), wire.into_stream(), permit);
                    let st = shared.lock();
                    let _ = st.accept_tx.send((s, Arrival::Plain));
                    return None;
                }
                None => return None,
            }
        }
    };
    Some((wire, first, permit))
}

/// Reads the start of a connection until it shows whether it is a
/// migratory client: `(true, bytes)` once the whole preamble is there,
/// `(false, bytes)` for a plain client (or one silent for `wait`), `None`
/// when it ended or sent an unsupported version.
async fn read_preamble(
    shared: &Shared,
    wire: &Wire,
    addr: SocketAddr,
    wait: Duration,
) -> Option<(bool, BytesMut)> {
    let mut first = Input::default();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match check_preamble(&first.buf) {
            Ok(PreambleCheck::Migratory) => return Some((true, first.buf)),
            Ok(PreambleCheck::NeedMore) => {}
            Err(DecodeError::NotMigratory) => return Some((false, first.buf)),
            Err(e) => {
                debug!(server = %shared.me, %addr, error = %e, "refusing connection");
                return None;
            }
        }
        match tokio::time::timeout_at(deadline, wire.read(&mut first)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(_)) => {}
            Err(_) => return Some((false, first.buf)),
        }
    }
}

/// Runs a connection through admission: returns the session it was
/// attached to, `None` when the endpoint closed it (after sending its
/// frames), or why it ended.
async fn admit(
    shared: &Arc<Shared>,
    wire: &Wire,
    inc: IncarnationId,
    wake: &Notify,
) -> Result<Option<Slot>, String> {
    let mut input = Input::default();
    loop {
        let (out, close, attached) = {
            let mut st = shared.lock();
            let Some(c) = st.conns.get_mut(&inc) else {
                return Err("server stopped".into());
            };
            (c.out.split(), c.close.clone(), c.attached.clone())
        };
        if !out.is_empty() {
            let mut out = VecDeque::from([out.freeze()]);
            tokio::time::timeout(FLUSH_TIMEOUT, wire.write_all(&mut out))
                .await
                .map_err(|_| "write timed out".to_string())?
                .map_err(|e| e.to_string())?;
        }
        if let Some(slot) = attached {
            return Ok(Some(slot));
        }
        if close.is_some() {
            return Ok(None);
        }
        tokio::select! {
            r = wire.read(&mut input) => match r {
                Ok(0) => return Err("EOF".into()),
                Ok(_) => {
                    let mut st = shared.lock();
                    admission_input(shared, &mut st, inc, &input.buf);
                    input.buf.clear();
                }
                Err(e) => return Err(e.to_string()),
            },
            _ = wake.notified() => {}
        }
    }
}

/// Input of a connection being admitted, into the endpoint; times the
/// state request a Migrate's proof sends out (MTCP fig 5.2).
fn admission_input(shared: &Arc<Shared>, st: &mut super::State, inc: IncarnationId, data: &[u8]) {
    let t0 = Instant::now();
    let waiting = st.core.pending_state_request(inc).is_some();
    st.core.handle_input(t0, inc, data);
    shared.pump(st);
    if let Some(sid) = st.core.pending_state_request(inc).filter(|_| !waiting) {
        let t1 = Instant::now();
        st.phases.requested(sid, t1, t1 - t0);
    }
}

/// Drives `slot`'s session over the connection until the connection ends
/// or the session leaves it; returns why, and what was framed for the
/// connection but not yet written.
async fn drive(
    shared: &Arc<Shared>,
    wire: &Arc<Wire>,
    inc: IncarnationId,
    slot: &Slot,
    wake: &Arc<Notify>,
) -> (String, VecDeque<Bytes>) {
    let stream = wire.stream();
    {
        let mut st = slot.lock();
        st.driver = Some(wake.clone());
        st.out = Some(Output {
            wire: wire.clone(),
            inc,
            pending: VecDeque::new(),
            segs: Vec::new(),
            counted: shared.bytes.clone(),
        });
    }
    let mut input = Input::default();
    let mut stop = shared.stop.subscribe();
    // What admission read but did not need (decrypted, or still staged in
    // TLS) is the session's now: take it before waiting for the socket.
    let mut failed = None;
    let mut busy = read_some(shared, wire, inc, slot, &mut input).unwrap_or_else(|e| {
        failed = Some(e);
        false
    });
    let reason = loop {
        if let Some(e) = failed.take() {
            break closed(shared, inc, slot, e);
        }
        let (current, want_write, ack_at) = {
            let st = slot.lock();
            (
                st.core.incarnation() == Some(inc),
                st.core.wants_transmit(Instant::now())
                    || st.out.as_ref().is_some_and(|o| !o.pending.is_empty())
                    || wire.wants_write(),
                st.core.ack_deadline(),
            )
        };
        if !current {
            break "session left the connection".into();
        }
        tokio::select! {
            r = stream.readable() => {
                if let Err(e) = r {
                    break closed(shared, inc, slot, e.to_string());
                }
                match read_some(shared, wire, inc, slot, &mut input) {
                    Ok(more) => busy = more,
                    Err(e) => break closed(shared, inc, slot, e),
                }
            }
            r = stream.writable(), if want_write => {
                if let Err(e) = r {
                    break closed(shared, inc, slot, e.to_string());
                }
                let mut st = slot.lock();
                let r = transmit(&mut st);
                settle(shared, st);
                if let Err(e) = r {
                    break closed(shared, inc, slot, e.to_string());
                }
            }
            _ = wake.notified() => {}
            // A delayed acknowledgement that no data carried.
            _ = sleep_until(ack_at), if ack_at.is_some() && !want_write => {}
            _ = stop.wait_for(|s| *s) => break "server stopped".into(),
        }
        if std::mem::take(&mut busy) {
            // A full-speed stream always has input: after a read budget,
            // let the other tasks on this worker run (a migration's
            // handshake would wait behind it otherwise).
            tokio::task::yield_now().await;
        }
    };
    let out = {
        let mut st = slot.lock();
        if st.driver.as_ref().is_some_and(|d| Arc::ptr_eq(d, wake)) {
            st.driver = None;
        }
        st.out.take_if(|o| o.inc == inc)
    };
    // What was framed for this connection before the session left it.
    let pending = out.map(|o| o.pending).unwrap_or_default();
    let reason = shared
        .lock()
        .conns
        .get(&inc)
        .and_then(|c| c.close.clone())
        .unwrap_or(reason);
    (reason, pending)
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// The connection failed or ended: the session learns it.
fn closed(shared: &Arc<Shared>, inc: IncarnationId, slot: &Slot, reason: String) -> String {
    let mut st = slot.lock();
    st.core.handle_incarnation_closed(Instant::now(), inc);
    settle(shared, st);
    reason
}

/// Reads what the socket has (up to a budget) into the session. The
/// socket reads straight into `buf`, after the partial frame the session
/// left there; an idle connection gives its buffer back. Returns whether
/// the budget ran out (more may be waiting).
fn read_some(
    shared: &Arc<Shared>,
    wire: &Wire,
    inc: IncarnationId,
    slot: &Slot,
    input: &mut Input,
) -> Result<bool, String> {
    let mut total = 0;
    while total < READ_BUDGET {
        match wire.try_read(input) {
            Ok(Some(0)) => return Err("EOF".to_string()),
            Ok(Some(n)) => {
                total += n;
                shared
                    .bytes
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                let mut st = slot.lock();
                st.core
                    .handle_input_buf(Instant::now(), inc, &mut input.buf);
                if let Some(b) = input.retired() {
                    st.core.adopt_read_block(b);
                }
                settle(shared, st);
            }
            Ok(None) => {
                if let Some(b) = input.retired() {
                    slot.lock().core.adopt_read_block(b);
                }
                return Ok(false);
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(true)
}
