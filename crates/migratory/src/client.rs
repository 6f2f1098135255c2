//! The client end of a session: [`MigratoryStream`], an `AsyncRead +
//! AsyncWrite` stream whose server end may move between the servers of a
//! pool. It learns the pool from the server (Welcome/Resumed), follows
//! Triggers, fails over when its server dies, and fails with a clear error
//! only when no server can resume the session. A [`Policy`] may move it on
//! its own (see [`crate::policy`]).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use migratory_proto::client::{Client, ClientConfig, ClientEvent, ClientStats};
use migratory_proto::error::AppError;
use migratory_proto::types::{Epoch, IncarnationId, ServerId, SessionId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::conn::{self, Input, Wire};
use crate::error::Error;
use crate::policy::{Action, ClientView, Manual, Policy, PolicyEvent};
use crate::tls::{self, ClientTls};

/// What the client has gone through, for policies and progress displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Connecting to the pool.
    Connecting,
    /// Attached to a server.
    Attached {
        /// The server.
        server: ServerId,
        /// The session epoch.
        epoch: Epoch,
    },
    /// Moving to another server.
    Migrating {
        /// Where to.
        to: ServerId,
    },
    /// The session ended (finished or failed).
    Ended,
}

enum ConnSlot {
    /// The connection is being opened; output waits here.
    Opening(Vec<Vec<Bytes>>),
    /// Open: output is written from whichever task framed it, while the
    /// socket takes it; the connection's task waits for room otherwise.
    Open(Conn),
    /// Abandoned or finished: what was framed for it is written (within a
    /// bound), then it closes.
    Closing(Conn),
}

/// An open connection.
struct Conn {
    stream: Arc<Wire>,
    /// Read from the socket and not yet taken by the session (a partial
    /// frame): the connection's task and the application's reads both read
    /// into it, under the lock.
    rx: Input,
    /// Framed for the connection, not yet taken by the socket.
    pending: VecDeque<Bytes>,
    /// Wakes the connection's task (no room, or closing).
    wake: Arc<Notify>,
    /// Its task stopped reading (see `Client::wants_input`): woken when
    /// the session wants its input again.
    paused: bool,
}

impl Conn {
    /// Reads what the socket has into `rx` (see [`Wire::try_read`]); a read
    /// block the reads moved on from goes to `core`'s receive queue.
    fn read(&mut self, core: &mut Client) -> io::Result<Option<usize>> {
        let r = self.stream.try_read(&mut self.rx);
        if let Some(b) = self.rx.retired() {
            core.adopt_read_block(b);
        }
        r
    }

    /// Writes `pending` while the socket takes it: `Ok(true)` when bytes
    /// remain (the connection's task waits for room).
    fn write(&mut self) -> io::Result<bool> {
        self.stream
            .try_write(&mut self.pending)
            .map(|(_, full)| full || self.stream.wants_write())
    }
}

struct State {
    core: Client,
    conns: HashMap<IncarnationId, ConnSlot>,
    /// Service addresses by server (from the pool's alternates, and the
    /// initial server's address once its id is known).
    addrs: HashMap<ServerId, Vec<SocketAddr>>,
    initial: Vec<SocketAddr>,
    /// The address the initial connection reached.
    initial_reached: Option<SocketAddr>,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    policy: Box<dyn Policy>,
    /// When the policy wants its next tick.
    policy_at: Option<Instant>,
    /// The session's receive window (for the policy's view).
    recv_window: u64,
    /// When the session last left each server (for a policy's migration
    /// to "another server").
    left: HashMap<ServerId, Instant>,
    segs: Vec<Bytes>,
    status: watch::Sender<Status>,
    /// The migration under way.
    migration: Option<Underway>,
    /// A migration resumed in this call: (start, Migrate written, Resumed
    /// read); its times are taken once the confirming Ack is written.
    resumed: Option<(Instant, Option<Instant>, Instant)>,
    /// How long the steps of the last migration took.
    last_times: Option<MigrationTimes>,
    /// The deadline the timer task sleeps until (`None`: none).
    armed: Option<Instant>,
    tls: ClientTls,
    /// Bound on connecting and the TLS handshake.
    handshake: Duration,
}

/// A migration under way: its span, start, resent-bytes baseline, and when
/// its (latest attempt's) Migrate was written.
struct Underway {
    span: tracing::Span,
    t0: Instant,
    resent: u64,
    sent: Option<Instant>,
}

/// How long the steps of a migration took at the client (MTCP thesis,
/// fig 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationTimes {
    /// From the start of the migration to its `Migrate` written on the new
    /// connection, TCP connect included (`T_prep_migr`); over every
    /// attempt when one failed.
    pub prepare: Duration,
    /// From then to the new server's `Resumed` read (`T_wait_migr`).
    pub wait: Duration,
    /// From then to the confirming Ack written to the new server
    /// (`T_complete`).
    pub complete: Duration,
}

struct Shared {
    state: Mutex<State>,
    timer: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the current connection's input into the session from the
    /// application's own task, when the socket has some: the application
    /// then need not wait for the connection's task to hand it over (one
    /// task wakeup per message instead of two). Otherwise `cx` is woken
    /// when it has some. Returns whether anything was read. An end or an
    /// error is left to the connection's task, which reads it again.
    fn read_socket(self: &Arc<Self>, st: &mut State, cx: &mut Context<'_>) -> bool {
        let Some(inc) = st.core.current_incarnation() else {
            return false;
        };
        let State { core, conns, .. } = st;
        let Some(ConnSlot::Open(c)) = conns.get_mut(&inc) else {
            return false;
        };
        loop {
            if c.stream.stream().poll_read_ready(cx).is_pending() {
                return false;
            }
            let r = c.read(core);
            if c.stream.wants_write() {
                // TLS records the read produced (a key update's answer):
                // the connection's task writes them.
                c.wake.notify_one();
            }
            match r {
                Ok(Some(n)) if n > 0 => {
                    core.handle_input_buf(Instant::now(), inc, &mut c.rx.buf);
                    self.pump(st);
                    return true;
                }
                // Taken by the connection's task meanwhile: wait again.
                Ok(None) => continue,
                Ok(Some(_)) | Err(_) => {
                    c.wake.notify_one();
                    return false;
                }
            }
        }
    }

    fn pump(self: &Arc<Self>, st: &mut State) {
        let now = Instant::now();
        loop {
            let mut moved = false;
            while let Some(ev) = st.core.poll_event() {
                moved = true;
                self.on_event(st, ev);
            }
            while let Some(inc) = st.core.poll_transmit(now, &mut st.segs) {
                moved = true;
                let segs = std::mem::take(&mut st.segs);
                match st.conns.get_mut(&inc) {
                    Some(ConnSlot::Open(c)) => {
                        c.pending.extend(segs);
                        // A write error surfaces in the connection's task.
                        if !matches!(c.write(), Ok(false)) {
                            c.wake.notify_one();
                        }
                    }
                    Some(ConnSlot::Opening(q)) => q.push(segs),
                    Some(ConnSlot::Closing(_)) | None => {}
                }
            }
            if !moved {
                break;
            }
        }
        if let Some((t0, sent, resumed)) = st.resumed.take() {
            let sent = sent.unwrap_or(t0);
            st.last_times = Some(MigrationTimes {
                prepare: sent.saturating_duration_since(t0),
                wait: resumed.saturating_duration_since(sent),
                complete: resumed.elapsed(),
            });
        }
        let State { core, conns, .. } = st;
        for (inc, c) in conns.iter_mut() {
            if let ConnSlot::Open(c) = c {
                if c.paused && core.wants_input(*inc) {
                    c.paused = false;
                    c.wake.notify_one();
                }
            }
        }
        // Reads and writes rarely move the deadline.
        let next = next_deadline(st);
        conn::rearm_timer(&self.timer, &mut st.armed, next);
    }

    fn on_event(self: &Arc<Self>, st: &mut State, ev: ClientEvent) {
        let now = Instant::now();
        let action = ask_policy(st, PolicyEvent::Client(&ev), now);
        match &ev {
            ClientEvent::Connect { inc, server } => {
                let addrs = match server {
                    None => st.initial.clone(),
                    Some(s) => st.addrs.get(s).cloned().unwrap_or_default(),
                };
                st.conns.insert(*inc, ConnSlot::Opening(Vec::new()));
                tokio::spawn(open(self.clone(), *inc, addrs, server.clone()));
            }
            ClientEvent::CloseIncarnation(inc) => close(st, *inc),
            ClientEvent::Established { session, server } => {
                if let Some(reason) = self.unnamed(st, server) {
                    let inc = st.core.current_incarnation();
                    if let Some(inc) = inc {
                        warn!(%server, %reason, "closing the connection");
                        st.core
                            .handle_incarnation_closed(Instant::now(), inc, &reason);
                        close(st, inc);
                    }
                    return;
                }
                info!(%session, %server, "session established");
                if let Some(a) = st.initial_reached {
                    st.addrs.insert(server.clone(), vec![a]);
                }
                self.learn_alternates(st);
                let _ = st.status.send(Status::Attached {
                    server: server.clone(),
                    epoch: st.core.epoch().unwrap_or(0),
                });
            }
            ClientEvent::Migrated { from, to, epoch } => {
                st.left.insert(from.clone(), now);
                let resent_total = st.core.stats().bytes_resent;
                match st.migration.take() {
                    Some(m) => {
                        st.resumed = Some((m.t0, m.sent, Instant::now()));
                        m.span.in_scope(|| {
                            info!(
                                %from,
                                %to,
                                epoch,
                                duration_us = m.t0.elapsed().as_micros() as u64,
                                up_bytes_resent = resent_total - m.resent,
                                down_position = st.core.down_received(),
                                "session migrated"
                            )
                        })
                    }
                    None => info!(%from, %to, epoch, "session migrated"),
                }
                self.learn_alternates(st);
                let _ = st.status.send(Status::Attached {
                    server: to.clone(),
                    epoch: *epoch,
                });
            }
            ClientEvent::MigrationStarted { to, cause } => {
                let span = tracing::info_span!(
                    "migration",
                    session = %st.core.session().map(|s| s.to_string()).unwrap_or_default(),
                    from = %st.core.server().map(|s| s.to_string()).unwrap_or_default(),
                    %to,
                    trigger = ?cause,
                );
                span.in_scope(|| debug!("migration started"));
                let resent = st.core.stats().bytes_resent;
                // A retry keeps the first attempt's start: the duration is
                // the whole migration as the client saw it.
                let t0 = st.migration.take().map_or_else(Instant::now, |m| m.t0);
                st.migration = Some(Underway {
                    span,
                    t0,
                    resent,
                    sent: None,
                });
                let _ = st.status.send(Status::Migrating { to: to.clone() });
            }
            ClientEvent::AttemptFailed { server, reason } => {
                debug!(%server, %reason, "migration attempt failed")
            }
            ClientEvent::Triggered { dest } => debug!(?dest, "trigger received"),
            ClientEvent::Pong { rtt, .. } => debug!(rtt_us = rtt.as_micros() as u64, "pong"),
            ClientEvent::Readable => {
                if let Some(w) = st.read_waker.take() {
                    w.wake();
                }
            }
            ClientEvent::Writable => {
                if let Some(w) = st.write_waker.take() {
                    w.wake();
                }
            }
            ClientEvent::Finished | ClientEvent::Failed(_) => {
                if let ClientEvent::Failed(e) = &ev {
                    info!(error = %e, "session failed");
                }
                let _ = st.status.send(Status::Ended);
                for w in [st.read_waker.take(), st.write_waker.take()]
                    .into_iter()
                    .flatten()
                {
                    w.wake();
                }
            }
        }
        act(st, action, now);
    }

    /// Why the current connection's certificate may not speak for
    /// `server`, if it may not: the first connection only verified that
    /// the server belongs to the pool.
    fn unnamed(&self, st: &State, server: &ServerId) -> Option<String> {
        if st.tls.is_plaintext() {
            return None;
        }
        let inc = st.core.current_incarnation()?;
        let Some(ConnSlot::Open(c)) = st.conns.get(&inc) else {
            return None;
        };
        tls::check_server(&c.stream, server.as_str()).err()
    }

    fn learn_alternates(&self, st: &mut State) {
        for a in st.core.alternates() {
            if !a.addrs.is_empty() {
                st.addrs.insert(a.id.clone(), a.addrs.clone());
            }
        }
    }
}

/// The earlier of the core's and the policy's deadlines.
fn next_deadline(st: &State) -> Option<Instant> {
    match (st.core.poll_timeout(), st.policy_at) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Calls the policy with what it may see of the client, and notes when it
/// wants its next tick.
fn ask_policy(st: &mut State, event: PolicyEvent<'_>, now: Instant) -> Action {
    let State {
        core,
        policy,
        recv_window,
        ..
    } = st;
    let view = ClientView {
        now,
        server: core.server(),
        attached: core.current_incarnation().is_some(),
        down_received: core.down_received(),
        unread: core.read_available() as u64,
        recv_window: *recv_window,
        migrations: core.stats().migrations,
    };
    let action = policy.on_event(event, &view);
    st.policy_at = st.policy.poll_timeout();
    action
}

/// Does what the policy asked for (within a call to `pump`, which sends
/// what it framed).
fn act(st: &mut State, action: Action, now: Instant) {
    if action == Action::Stay || st.core.current_incarnation().is_none() {
        return;
    }
    match action {
        Action::Stay => {}
        Action::Ping => {
            st.core.ping(now);
        }
        Action::Migrate(dest) => {
            let Some(dest) = dest.or_else(|| other_server(st)) else {
                debug!("the policy asks to migrate, but no other server is known");
                return;
            };
            info!(%dest, "the policy migrates the session");
            if let Err(e) = st.core.migrate(now, Some(dest)) {
                debug!(error = %e, "the policy's migration did not start");
            }
        }
        Action::FailServer(reason) => {
            let server = st.core.server().map_or_else(String::new, |s| s.to_string());
            warn!(%server, %reason, "the policy declares the server failed");
            if let Err(e) = st.core.fail_server(now, &reason) {
                debug!(error = %e, "the server could not be declared failed");
            }
        }
    }
}

/// The server of the pool, other than the current one, that the session
/// left the longest time ago (one it never was on first).
fn other_server(st: &State) -> Option<ServerId> {
    let current = st.core.server();
    st.core
        .alternates()
        .iter()
        .map(|a| &a.id)
        .filter(|id| Some(*id) != current)
        .min_by_key(|id| st.left.get(*id).copied())
        .cloned()
}

/// Opens the connection of one incarnation to `server` (`None`: the
/// initial connection, to any server of the pool), with TLS unless the
/// client runs insecure plaintext.
async fn open(
    shared: Arc<Shared>,
    inc: IncarnationId,
    addrs: Vec<SocketAddr>,
    server: Option<ServerId>,
) {
    let initial = server.is_none();
    let (tls, handshake) = {
        let st = shared.lock();
        (st.tls.clone(), st.handshake)
    };
    let mut last = "no address known for this server".to_string();
    let mut stream = None;
    for a in &addrs {
        let connect = connect_one(*a, &tls, server.as_ref());
        match tokio::time::timeout(handshake, connect).await {
            Ok(Ok(s)) => {
                stream = Some((s, *a));
                break;
            }
            Ok(Err(e)) => last = format!("{a}: {e}"),
            Err(_) => last = format!("{a}: connection timed out"),
        }
    }
    let (stream, wake) = {
        let mut st = shared.lock();
        let Some(ConnSlot::Opening(queue)) = st.conns.remove(&inc) else {
            return; // abandoned meanwhile
        };
        let Some((stream, addr)) = stream else {
            st.core.handle_incarnation_closed(
                Instant::now(),
                inc,
                &format!("connect failed: {last}"),
            );
            shared.pump(&mut st);
            return;
        };
        if initial {
            st.initial_reached = Some(addr);
        }
        conn::keepalive(stream.stream());
        let stream = Arc::new(stream);
        let wake = Arc::new(Notify::new());
        let mut c = Conn {
            stream: stream.clone(),
            rx: Input::default(),
            pending: queue.into_iter().flatten().collect(),
            wake: wake.clone(),
            paused: false,
        };
        if !matches!(c.write(), Ok(false)) {
            wake.notify_one();
        }
        let binding = c.stream.binding();
        st.conns.insert(inc, ConnSlot::Open(c));
        // Frames the Migrate (with its proof over the binding), if this
        // connection carries one.
        st.core.handle_connected(Instant::now(), inc, binding);
        shared.pump(&mut st);
        if let Some(m) = st.migration.as_mut().filter(|_| !initial) {
            // This connection carries the migration's Migrate.
            m.sent = Some(Instant::now());
        }
        (stream, wake)
    };
    let reason = run_conn(&shared, inc, &stream, &wake).await;
    {
        let mut st = shared.lock();
        if let Some(ConnSlot::Open(_)) = st.conns.remove(&inc) {
            debug!(%inc, %reason, "connection closed");
            st.core
                .handle_incarnation_closed(Instant::now(), inc, &reason);
            shared.pump(&mut st);
        }
    }
    stream.close(&mut VecDeque::new(), CLOSE_FLUSH).await;
}

/// A TCP connection to `addr`, with the TLS handshake done (verifying
/// `server`'s name, or the pool's for the first connection).
async fn connect_one(
    addr: SocketAddr,
    tls: &ClientTls,
    server: Option<&ServerId>,
) -> Result<Wire, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let Some(config) = tls.config() else {
        return Ok(Wire::plain(tcp));
    };
    let (tcp, conn) = tls::dial(config, tls.name(), tcp).await?.into_inner();
    let wire = Wire::tls(tcp, rustls::Connection::Client(conn));
    if let Some(id) = server {
        tls::check_server(&wire, id.as_str())?;
    }
    Ok(wire)
}

/// Bound on writing out a closing connection's last bytes.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);

/// Most bytes one connection's task reads before it lets others run.
const READ_BUDGET: usize = 1024 * 1024;

/// Marks `inc`'s connection closing: its task writes what is pending, then
/// closes it.
fn close(st: &mut State, inc: IncarnationId) {
    match st.conns.remove(&inc) {
        Some(ConnSlot::Open(c)) | Some(ConnSlot::Closing(c)) => {
            c.wake.notify_one();
            st.conns.insert(inc, ConnSlot::Closing(c));
        }
        // Still connecting: `open` finds its slot gone and gives up.
        Some(ConnSlot::Opening(_)) | None => {}
    }
}

/// Serves one open connection: reads into the session, and writes what is
/// pending whenever the socket has room. Returns why it ended.
async fn run_conn(shared: &Arc<Shared>, inc: IncarnationId, wire: &Wire, wake: &Notify) -> String {
    let stream = wire.stream();
    let mut closing_since: Option<tokio::time::Instant> = None;
    loop {
        let (want_write, closing, want_read) = {
            let mut st = shared.lock();
            let State { core, conns, .. } = &mut *st;
            let read = core.wants_input(inc);
            match conns.get_mut(&inc) {
                Some(ConnSlot::Open(c)) => {
                    c.paused = !read;
                    (!c.pending.is_empty() || wire.wants_write(), false, read)
                }
                Some(ConnSlot::Closing(c)) => {
                    (!c.pending.is_empty() || wire.wants_write(), true, read)
                }
                _ => return "closed locally".into(),
            }
        };
        if closing {
            if !want_write {
                shared.lock().conns.remove(&inc);
                return "closed locally".into();
            }
            closing_since.get_or_insert_with(tokio::time::Instant::now);
        }
        let flush_deadline = closing_since.map(|t| t + CLOSE_FLUSH);
        tokio::select! {
            r = stream.readable(), if !closing && want_read => {
                if let Err(e) = r {
                    return e.to_string();
                }
                let mut total = 0;
                while total < READ_BUDGET {
                    let mut st = shared.lock();
                    let State { core, conns, .. } = &mut *st;
                    let Some(ConnSlot::Open(c)) = conns.get_mut(&inc) else {
                        break;
                    };
                    match c.read(core) {
                        Ok(Some(0)) => return "EOF".into(),
                        Ok(Some(n)) => {
                            total += n;
                            core.handle_input_buf(Instant::now(), inc, &mut c.rx.buf);
                            shared.pump(&mut st);
                        }
                        Ok(None) => break,
                        Err(e) => return e.to_string(),
                    }
                }
                if total >= READ_BUDGET {
                    // More may be waiting: let the other tasks on this
                    // worker run first.
                    tokio::task::yield_now().await;
                }
            }
            r = stream.writable(), if want_write => {
                if let Err(e) = r {
                    return e.to_string();
                }
                let mut st = shared.lock();
                let r = match st.conns.get_mut(&inc) {
                    Some(ConnSlot::Open(c)) | Some(ConnSlot::Closing(c)) => c.write(),
                    _ => Ok(false),
                };
                if let Err(e) = r {
                    return e.to_string();
                }
            }
            _ = wake.notified() => {}
            _ = sleep_until(flush_deadline) => {
                shared.lock().conns.remove(&inc);
                return "closing timed out".into();
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn timer(shared: Arc<Shared>) {
    conn::run_timer(
        &shared.timer,
        || {
            let mut st = shared.lock();
            st.armed = next_deadline(&st);
            st.armed
        },
        || {
            let mut st = shared.lock();
            let now = Instant::now();
            st.core.handle_timeout(now);
            if st.policy_at.is_some_and(|t| t <= now) {
                let action = ask_policy(&mut st, PolicyEvent::Tick, now);
                act(&mut st, action, now);
            }
            shared.pump(&mut st);
        },
    )
    .await;
}

/// A session to a pool of servers, seen as one byte stream each way.
pub struct MigratoryStream {
    shared: Arc<Shared>,
    status: watch::Receiver<Status>,
    timer: JoinHandle<()>,
}

impl std::fmt::Debug for MigratoryStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigratoryStream")
            .field("status", &*self.status.borrow())
            .finish()
    }
}

impl MigratoryStream {
    /// Connects to the pool at the first of `addrs` that answers, over TLS
    /// as `tls` says, with default settings and manual migration.
    pub async fn connect(addrs: &[SocketAddr], tls: &ClientTls) -> Result<Self, Error> {
        Self::connect_with(ClientConfig::default(), tls, Box::new(Manual), addrs).await
    }

    /// Connects with explicit settings and a migration policy.
    pub async fn connect_with(
        config: ClientConfig,
        tls: &ClientTls,
        policy: Box<dyn Policy>,
        addrs: &[SocketAddr],
    ) -> Result<Self, Error> {
        if addrs.is_empty() {
            return Err(Error::Config("no server address given".into()));
        }
        let handshake = config.timeouts.handshake;
        let recv_window = config.limits.recv_window;
        let (status_tx, status) = watch::channel(Status::Connecting);
        let shared = Arc::new(Shared {
            timer: Notify::new(),
            state: Mutex::new(State {
                core: Client::new(config, Instant::now()),
                conns: HashMap::new(),
                addrs: HashMap::new(),
                initial: addrs.to_vec(),
                initial_reached: None,
                read_waker: None,
                write_waker: None,
                policy,
                policy_at: None,
                recv_window,
                left: HashMap::new(),
                segs: Vec::new(),
                status: status_tx,
                migration: None,
                resumed: None,
                last_times: None,
                armed: None,
                tls: tls.clone(),
                handshake,
            }),
        });
        {
            let mut st = shared.lock();
            st.core.start(Instant::now());
            shared.pump(&mut st);
        }
        let timer = tokio::spawn(timer(shared.clone()));
        let mut me = Self {
            shared,
            status,
            timer,
        };
        me.wait_established(addrs).await?;
        Ok(me)
    }

    async fn wait_established(&mut self, addrs: &[SocketAddr]) -> Result<(), Error> {
        loop {
            match &*self.status.borrow_and_update() {
                Status::Attached { .. } => return Ok(()),
                Status::Ended => {
                    let st = self.shared.lock();
                    let last = st
                        .core
                        .failure()
                        .map_or("session ended".into(), |e| e.to_string());
                    return Err(Error::Connect {
                        addrs: addrs.to_vec(),
                        last,
                    });
                }
                _ => {}
            }
            if self.status.changed().await.is_err() {
                return Err(Error::Stopped);
            }
        }
    }

    /// The session id.
    pub fn session(&self) -> Option<SessionId> {
        self.shared.lock().core.session()
    }

    /// The server the session is attached to.
    pub fn server(&self) -> Option<ServerId> {
        self.shared.lock().core.server().cloned()
    }

    /// Watches the session's status (attached, migrating, ended).
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// What the client has done so far.
    pub fn stats(&self) -> ClientStats {
        self.shared.lock().core.stats().clone()
    }

    /// How long the steps of the last completed migration took.
    pub fn last_migration_times(&self) -> Option<MigrationTimes> {
        self.shared.lock().last_times
    }

    /// Migrates now, to `dest` or to the next alternate, and waits until the
    /// session is attached again (or fails).
    pub async fn migrate(&mut self, dest: Option<&str>) -> Result<ServerId, Error> {
        self.control().migrate(dest).await
    }

    /// A cloneable handle for migrations and status while the stream's IO
    /// runs elsewhere (e.g. after `tokio::io::split`).
    pub fn control(&self) -> ClientControl {
        ClientControl {
            shared: self.shared.clone(),
            status: self.status.clone(),
        }
    }
}

/// Migration calls and status of a [`MigratoryStream`], detached from its IO.
#[derive(Clone)]
pub struct ClientControl {
    shared: Arc<Shared>,
    status: watch::Receiver<Status>,
}

impl std::fmt::Debug for ClientControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientControl").finish_non_exhaustive()
    }
}

impl ClientControl {
    /// The session id.
    pub fn session(&self) -> Option<SessionId> {
        self.shared.lock().core.session()
    }

    /// The server the session is attached to.
    pub fn server(&self) -> Option<ServerId> {
        self.shared.lock().core.server().cloned()
    }

    /// What the client has done so far.
    pub fn stats(&self) -> ClientStats {
        self.shared.lock().core.stats().clone()
    }

    /// How long the steps of the last completed migration took.
    pub fn last_migration_times(&self) -> Option<MigrationTimes> {
        self.shared.lock().last_times
    }

    /// Watches the session's status.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Migrates now, to `dest` or to the next alternate, and waits until the
    /// session is attached again (or fails). `dest` must be a server the
    /// session knows an address of (its pool's, as the servers announced
    /// them), else [`Error::UnknownServer`]; the session may still end up
    /// on another one when `dest` cannot take it: the result says where.
    pub async fn migrate(&mut self, dest: Option<&str>) -> Result<ServerId, Error> {
        let dest = match dest {
            Some(d) => Some(
                ServerId::new(d).ok_or_else(|| Error::Config(format!("bad server id {d:?}")))?,
            ),
            None => None,
        };
        self.status.borrow_and_update();
        {
            let mut st = self.shared.lock();
            if let Some(d) = dest.as_ref().filter(|d| !st.addrs.contains_key(*d)) {
                let mut known: Vec<String> = st.addrs.keys().map(ToString::to_string).collect();
                known.sort();
                return Err(Error::UnknownServer {
                    server: d.to_string(),
                    known,
                });
            }
            st.core.migrate(Instant::now(), dest)?;
            self.shared.pump(&mut st);
        }
        self.wait_attached().await
    }

    /// Waits until the session is attached after a change of status (a
    /// migration this client or a server started), and returns the server.
    pub async fn wait_attached(&mut self) -> Result<ServerId, Error> {
        loop {
            let s = self.status.borrow_and_update().clone();
            match s {
                Status::Attached { server, .. } if !self.shared.lock().core.migration_pending() => {
                    return Ok(server)
                }
                Status::Ended => {
                    let st = self.shared.lock();
                    return Err(st
                        .core
                        .failure()
                        .cloned()
                        .map_or(Error::Stopped, Error::Session));
                }
                _ => {}
            }
            if self.status.changed().await.is_err() {
                return Err(Error::Stopped);
            }
        }
    }
}

impl Drop for MigratoryStream {
    fn drop(&mut self) {
        self.timer.abort();
        let mut st = self.shared.lock();
        // Controls waiting for a status must not wait forever.
        let _ = st.status.send(Status::Ended);
        let incs: Vec<IncarnationId> = st.conns.keys().copied().collect();
        for inc in incs {
            close(&mut st, inc);
        }
    }
}

impl MigratoryStream {
    /// Waits until a read would return at once (data, the end of the
    /// stream, or the session's failure) without taking anything, as
    /// [`TcpStream::readable`] does: a relay can wait for input without
    /// holding a buffer. One task reads a stream at a time.
    pub async fn readable(&self) {
        std::future::poll_fn(|cx| {
            let mut st = self.shared.lock();
            if st.core.read_ready() {
                return Poll::Ready(());
            }
            st.read_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Reads the next pieces of the down stream without copying them, as
    /// far as they are there: fills `bufs` from the front with up to
    /// `bufs.len()` chunks (each at most one Data frame's payload, as it
    /// arrived) and returns how many, waiting until there is at least one;
    /// `None` at the end of the stream (`Some(0)` at once for an empty
    /// `bufs`). A relay can hand the chunks to a vectored write; while one
    /// is held, the block it was received into is not reused, so drop them
    /// once written.
    pub async fn read_chunks(&self, bufs: &mut [Bytes]) -> io::Result<Option<usize>> {
        if bufs.is_empty() {
            return Ok(Some(0));
        }
        std::future::poll_fn(|cx| {
            self.poll_read_with(cx, |core| {
                let mut k = 0;
                while k < bufs.len() {
                    match core.read_chunk() {
                        Ok(Some(c)) if c.is_empty() => {
                            // The end (after the chunks this call took).
                            return Ok(Some(if k == 0 { None } else { Some(k) }));
                        }
                        Ok(Some(c)) => {
                            bufs[k] = c;
                            k += 1;
                        }
                        Ok(None) => break,
                        // The error again on the next call, once these are read.
                        Err(_) if k > 0 => break,
                        Err(e) => return Err(e),
                    }
                }
                Ok(if k == 0 { None } else { Some(Some(k)) })
            })
        })
        .await
    }

    fn read_into(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.poll_read_with(cx, |core| {
            // Initialise only what the read fills (a large buffer is not
            // zeroed for a small message).
            let n = core.read_available().clamp(1, buf.remaining().max(1));
            let r = core.read(buf.initialize_unfilled_to(n.min(buf.remaining())));
            if let Ok(Some(n)) = r {
                buf.advance(n);
            }
            r.map(|n| n.map(|_| ()))
        })
    }

    /// Runs `read` on the session until it yields a value (`Ok(Some)`):
    /// while it finds nothing (`Ok(None)`), reads the socket from this task
    /// when it has input, and otherwise waits for input.
    fn poll_read_with<T>(
        &self,
        cx: &mut Context<'_>,
        mut read: impl FnMut(&mut Client) -> Result<Option<T>, AppError>,
    ) -> Poll<io::Result<T>> {
        let mut st = self.shared.lock();
        loop {
            match read(&mut st.core) {
                Ok(Some(v)) => {
                    self.shared.pump(&mut st);
                    return Poll::Ready(Ok(v));
                }
                Ok(None) => {
                    st.read_waker = Some(cx.waker().clone());
                    if !self.shared.read_socket(&mut st, cx) {
                        return Poll::Pending;
                    }
                }
                Err(e) => return Poll::Ready(Err(Error::from(e).into())),
            }
        }
    }

    /// Writes up-stream bytes that `fill` produces in place, straight into
    /// the session's send buffer (no copy of them by the session): once the
    /// buffer has room, `fill` is called with room for at least one byte
    /// and at most 64 KiB, appends what it has (a relay: a non-blocking
    /// socket read, `try_read_buf`) and returns a count or an error, which
    /// this returns. What it appended is sent whatever it returns. Waits
    /// while the buffer is full. `fill` runs under the session's lock: it
    /// must not block, and must not go around the limit (`set_limit`,
    /// `get_mut`): the bytes would still be sent, but beyond the send
    /// buffer's bound.
    pub async fn write_with(
        &self,
        fill: impl FnOnce(&mut bytes::buf::Limit<&mut bytes::BytesMut>) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut fill = Some(fill);
        std::future::poll_fn(|cx| {
            let mut st = self.shared.lock();
            let write = st.core.write_in_place(64 * 1024, |buf| {
                let fill = fill.take().expect("called once: the call ends with it");
                fill(buf)
            });
            match write {
                Ok(None) => {
                    st.write_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                Ok(Some(r)) => {
                    self.shared.pump(&mut st);
                    Poll::Ready(r)
                }
                Err(e) => Poll::Ready(Err(Error::from(e).into())),
            }
        })
        .await
    }

    fn write_from(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut st = self.shared.lock();
        match st.core.write(data) {
            Ok(0) if !data.is_empty() => {
                st.write_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Ok(n) => {
                self.shared.pump(&mut st);
                Poll::Ready(Ok(n))
            }
            Err(e) => Poll::Ready(Err(Error::from(e).into())),
        }
    }

    fn close_write(&self) -> Poll<io::Result<()>> {
        let mut st = self.shared.lock();
        let r = st.core.close_write();
        self.shared.pump(&mut st);
        Poll::Ready(r.map_err(|e| Error::from(e).into()))
    }
}

impl AsyncRead for MigratoryStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.read_into(cx, buf)
    }
}

/// A shared reference reads and writes too (as `&TcpStream` does with
/// `try_read`/`try_write`): one task may read while another writes.
impl AsyncRead for &MigratoryStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.read_into(cx, buf)
    }
}

impl AsyncWrite for MigratoryStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write_from(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are kept until the server holds them, across
        // migrations; the socket drains them on its own.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.close_write()
    }
}

impl AsyncWrite for &MigratoryStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write_from(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.close_write()
    }
}
