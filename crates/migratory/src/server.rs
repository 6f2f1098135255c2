//! A server of a pool: accepts clients on its service address, serves their
//! sessions to the application, and talks to its peers on its control
//! address (DESIGN.md 3.3) to move sessions in and out.
//!
//! One [`migratory_proto::server::Server`] core holds the protocol state; the
//! runtime feeds it what sockets read, writes what it emits, and wakes the
//! application's reads and writes.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use migratory_proto::config::{Limits, ServerTimeouts};
use migratory_proto::control::{ControlMessage, PushOutcome, Selection, SessionRow};
use migratory_proto::error::DecodeError;
use migratory_proto::frame::{check_preamble, PreambleCheck};
use migratory_proto::peer::PeerLink;
use migratory_proto::server::{
    self as core, Dest, Direction, MigrationOutcome, MigrationReport, ServerConfig, ServerEvent,
    ServerStats, SessionHandle,
};
use migratory_proto::types::{Alternate, Epoch, IncarnationId, ServerId, SessionId};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::conn::{self, Out, Tx};
use crate::error::Error;

/// Default bound on how long a new connection may take to show whether it
/// is a migratory client: a client that sends nothing first (a protocol
/// where the server speaks first) is served as plain TCP after this.
pub const DEFAULT_PREAMBLE_WAIT: Duration = Duration::from_millis(200);

/// Gauge: sessions held by the server (`server` label).
pub const SESSIONS_OPEN: &str = "migratory_sessions_open";
/// Counter: finished migrations (`server`, `direction` in/out, `cause`
/// requested/trigger/server_failed/retry, `outcome` moved/failover/expired
/// or a reject reason).
pub const MIGRATIONS: &str = "migratory_migrations_total";
/// Histogram: duration of successful migrations, in seconds (`server`,
/// `direction`).
pub const MIGRATION_SECONDS: &str = "migratory_migration_duration_seconds";
/// Counter: up bytes handed back to applications to re-read after
/// migrations in (`server`).
pub const BYTES_REPLAYED: &str = "migratory_bytes_replayed_total";
/// Counter: down bytes of re-executed writes discarded after migrations in
/// (`server`).
pub const BYTES_DISCARDED: &str = "migratory_bytes_discarded_total";
/// Gauge: peers with a control connection up (`server`).
pub const PEERS_UP: &str = "migratory_peers_up";

/// The id an operator (`migratory sessions`, `migratory migrate`)
/// authenticates with on a control connection; no server may take it.
pub const OPERATOR_ID: &str = "operator";

/// Longest wait an operator push may ask for.
const MAX_PUSH_WAIT: Duration = Duration::from_secs(600);

/// Bound on connecting to a peer and authenticating it.
const PEER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most message batches queued for a peer that is being dialled.
const MAX_DIAL_QUEUE: usize = 4096;

/// Another server of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its id.
    pub id: String,
    /// Where its clients connect.
    pub service: SocketAddr,
    /// Where its peers connect.
    pub control: SocketAddr,
}

/// A checked configuration: the core's config, the cluster key, and the
/// peers' control addresses.
type Validated = (ServerConfig, Vec<u8>, HashMap<ServerId, SocketAddr>);

/// Builds a [`Server`]: set the id, addresses, peers and cluster key, then
/// [`ServerBuilder::bind`].
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    id: String,
    service: Option<SocketAddr>,
    control: Option<SocketAddr>,
    peers: Vec<Peer>,
    cluster_key: Option<Vec<u8>>,
    backup: Option<String>,
    limits: Limits,
    timeouts: ServerTimeouts,
    max_state: usize,
    preamble_wait: Duration,
}

impl ServerBuilder {
    /// A builder for server `id`.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            service: None,
            control: None,
            peers: Vec::new(),
            cluster_key: None,
            backup: None,
            limits: Limits::default(),
            timeouts: ServerTimeouts::default(),
            max_state: 64 * 1024,
            preamble_wait: DEFAULT_PREAMBLE_WAIT,
        }
    }

    /// Where clients connect (port 0 picks a free port).
    pub fn service(&mut self, addr: SocketAddr) -> &mut Self {
        self.service = Some(addr);
        self
    }

    /// Where peers connect (port 0 picks a free port).
    pub fn control(&mut self, addr: SocketAddr) -> &mut Self {
        self.control = Some(addr);
        self
    }

    /// Adds a peer of the pool.
    pub fn peer(&mut self, peer: Peer) -> &mut Self {
        self.peers.push(peer);
        self
    }

    /// The key every server of the pool shares (at least 16 bytes).
    pub fn cluster_key(&mut self, key: impl Into<Vec<u8>>) -> &mut Self {
        self.cluster_key = Some(key.into());
        self
    }

    /// The peer that keeps an eager replica of every session (DESIGN.md 3.6).
    pub fn backup(&mut self, id: impl Into<String>) -> &mut Self {
        self.backup = Some(id.into());
        self
    }

    /// Buffer and frame limits.
    pub fn limits(&mut self, limits: Limits) -> &mut Self {
        self.limits = limits;
        self
    }

    /// Protocol timeouts.
    pub fn timeouts(&mut self, timeouts: ServerTimeouts) -> &mut Self {
        self.timeouts = timeouts;
        self
    }

    /// Largest application snapshot accepted.
    pub fn max_state(&mut self, bytes: usize) -> &mut Self {
        self.max_state = bytes;
        self
    }

    /// How long to wait for a new connection's preamble before serving it
    /// as plain TCP ([`DEFAULT_PREAMBLE_WAIT`]).
    pub fn preamble_wait(&mut self, wait: Duration) -> &mut Self {
        self.preamble_wait = wait;
        self
    }

    fn validate(&self) -> Result<Validated, Error> {
        let cfg_err = |s: String| Error::Config(s);
        let id = ServerId::new(self.id.clone())
            .filter(|id| id.as_str() != OPERATOR_ID)
            .ok_or_else(|| {
                cfg_err(format!(
                    "id {:?}: must be 1 to 64 bytes, and not {OPERATOR_ID:?}",
                    self.id
                ))
            })?;
        let key = self
            .cluster_key
            .clone()
            .ok_or_else(|| cfg_err("cluster_key: missing".into()))?;
        if key.len() < 16 {
            return Err(cfg_err("cluster_key: must be at least 16 bytes".into()));
        }
        if self.service.is_none() {
            return Err(cfg_err("service: missing address".into()));
        }
        if self.control.is_none() {
            return Err(cfg_err("control: missing address".into()));
        }
        let mut controls = HashMap::new();
        let mut alternates = Vec::new();
        for p in &self.peers {
            let pid = ServerId::new(p.id.clone())
                .filter(|id| id.as_str() != OPERATOR_ID)
                .ok_or_else(|| {
                    cfg_err(format!(
                        "peer id {:?}: must be 1 to 64 bytes, and not {OPERATOR_ID:?}",
                        p.id
                    ))
                })?;
            if pid == id || controls.insert(pid.clone(), p.control).is_some() {
                return Err(cfg_err(format!("peer id {:?}: duplicate server id", p.id)));
            }
            alternates.push(Alternate {
                id: pid,
                addrs: vec![p.service],
            });
        }
        let backup = match &self.backup {
            Some(b) => {
                let b = ServerId::new(b.clone()).filter(|b| controls.contains_key(b));
                Some(b.ok_or_else(|| cfg_err(format!("backup {:?}: not a peer", self.backup)))?)
            }
            None => None,
        };
        if let Some(b) = &backup {
            // Clients fail over to the backup first.
            if let Some(i) = alternates.iter().position(|a| &a.id == b) {
                let a = alternates.remove(i);
                alternates.insert(0, a);
            }
        }
        let mut cfg = ServerConfig::new(id);
        cfg.alternates = alternates;
        cfg.backup = backup;
        cfg.limits = self.limits.clone();
        cfg.timeouts = self.timeouts.clone();
        cfg.max_state = self.max_state;
        Ok((cfg, key, controls))
    }

    /// Checks the configuration, binds both addresses and starts serving.
    /// Peers need not be up: they are dialled on demand and retried.
    pub async fn bind(&self) -> Result<Server, Error> {
        let (cfg, key, controls) = self.validate()?;
        let service = self.service.expect("validated");
        let control = self.control.expect("validated");
        let svc = TcpListener::bind(service)
            .await
            .map_err(|source| Error::Bind {
                addr: service,
                source,
            })?;
        let ctl = TcpListener::bind(control)
            .await
            .map_err(|source| Error::Bind {
                addr: control,
                source,
            })?;
        let service_addr = svc.local_addr().map_err(|source| Error::Bind {
            addr: service,
            source,
        })?;
        let control_addr = ctl.local_addr().map_err(|source| Error::Bind {
            addr: control,
            source,
        })?;
        let (accept_tx, accept_rx) = mpsc::unbounded_channel();
        let me = cfg.id.clone();
        let shared = Arc::new(Shared {
            me: me.clone(),
            key,
            controls,
            preamble_wait: self.preamble_wait,
            timer: Notify::new(),
            changed: Notify::new(),
            stop: watch::channel(false).0,
            state: Mutex::new(State {
                core: core::Server::new(cfg, Box::new(StdRng::from_entropy()), Instant::now()),
                conns: HashMap::new(),
                watched: HashMap::new(),
                move_seq: 0,
                links: HashMap::new(),
                read_wakers: HashMap::new(),
                write_wakers: HashMap::new(),
                accept_tx,
                segs: Vec::new(),
            }),
        });
        let tasks = vec![
            tokio::spawn(accept_clients(shared.clone(), svc)),
            tokio::spawn(accept_peers(shared.clone(), ctl)),
            tokio::spawn(timer(shared.clone())),
        ];
        info!(server = %me, %service_addr, %control_addr, "server bound");
        Ok(Server {
            shared,
            accept_rx,
            service_addr,
            control_addr,
            tasks,
        })
    }
}

/// How a session reached the application (MTCP's `get_state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// A new migratory session: start from the beginning.
    New,
    /// A session migrated here: resume from this snapshot state.
    Migrated {
        /// The state of the application's last snapshot (empty if none).
        state: Bytes,
    },
    /// A plain TCP client (not migratable): serve it as usual.
    Plain,
}

/// One server of a pool.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    accept_rx: mpsc::UnboundedReceiver<(Session, Arrival)>,
    service_addr: SocketAddr,
    control_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// The next session for the application, new or migrated (MTCP's
    /// `accept` + `get_state`). `None` once the server stopped.
    pub async fn accept(&mut self) -> Option<(Session, Arrival)> {
        self.accept_rx.recv().await
    }

    /// This server's id.
    pub fn id(&self) -> &ServerId {
        &self.shared.me
    }

    /// The bound service address.
    pub fn service_addr(&self) -> SocketAddr {
        self.service_addr
    }

    /// The bound control address.
    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }

    /// A cloneable handle for pool operations while `accept` runs elsewhere.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            shared: self.shared.clone(),
        }
    }
}

/// Pool operations on a running [`Server`] (cloneable, usable from any task).
#[derive(Debug, Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

impl ServerHandle {
    /// This server's id.
    pub fn id(&self) -> &ServerId {
        &self.shared.me
    }

    /// Sessions this server owns, with their epochs.
    pub fn sessions(&self) -> Vec<(SessionId, Epoch)> {
        self.shared.lock().core.owned_sessions().collect()
    }

    /// What the server has done so far.
    pub fn stats(&self) -> ServerStats {
        self.shared.lock().core.stats().clone()
    }

    /// Destination pull (MTCP 3.2.1): asks `owner` to send `session`'s
    /// client here.
    pub fn pull(&self, session: SessionId, owner: &str) -> Result<(), Error> {
        let owner = self.shared.peer_id(owner)?;
        let mut st = self.shared.lock();
        st.core.pull(session, owner);
        self.shared.pump(&mut st);
        Ok(())
    }

    /// Third-party trigger: asks `owner` to send `session`'s client to `dest`.
    pub fn request_trigger(
        &self,
        session: SessionId,
        owner: &str,
        dest: &str,
    ) -> Result<(), Error> {
        let owner = self.shared.peer_id(owner)?;
        let dest =
            ServerId::new(dest).ok_or_else(|| Error::Config(format!("bad server id {dest:?}")))?;
        let mut st = self.shared.lock();
        st.core.request_trigger(session, owner, dest);
        self.shared.pump(&mut st);
        Ok(())
    }
}

impl ServerHandle {
    /// The sessions this server owns, oldest first, as an operator sees
    /// them.
    pub fn session_rows(&self) -> Vec<SessionRow> {
        let now = Instant::now();
        let st = self.shared.lock();
        let mut infos = st.core.session_infos();
        infos.sort_by_key(|i| i.since);
        infos
            .into_iter()
            .map(|i| SessionRow {
                session: i.session,
                epoch: i.epoch,
                client: i
                    .inc
                    .and_then(|inc| st.conns.get(&inc))
                    .map(|(_, addr)| *addr),
                age_ms: now.saturating_duration_since(i.since).as_millis() as u64,
                up: i.up,
                down: i.down,
            })
            .collect()
    }

    /// Server push for an operator (MTCP 3.2.1 case a): sends the selected
    /// sessions' clients a Trigger to `dest`, then waits until each moved,
    /// ended, or `timeout` passed. Sessions are taken oldest first.
    pub async fn push(
        &self,
        dest: &str,
        select: Selection,
        timeout: Duration,
    ) -> Result<Vec<(SessionId, PushOutcome)>, Error> {
        let dest = self.shared.peer_id(dest)?;
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout.min(MAX_PUSH_WAIT);
        let mut results: Vec<(SessionId, Option<PushOutcome>)> = Vec::new();
        // Unregisters this push's interest however it ends (even dropped).
        let mut guard = PushGuard {
            shared: &self.shared,
            sessions: Vec::new(),
        };
        let mut stopped = self.shared.stop.subscribe();
        let first_move = {
            let mut st = self.shared.lock();
            let first_move = st.move_seq + 1;
            let mut infos = st.core.session_infos();
            infos.sort_by_key(|i| i.since);
            let chosen: Vec<SessionId> = match select {
                Selection::Session(sid) => vec![sid],
                Selection::Count(n) => infos.iter().take(n as usize).map(|i| i.session).collect(),
                Selection::All => infos.iter().map(|i| i.session).collect(),
            };
            for sid in chosen {
                let outcome = if !infos.iter().any(|i| i.session == sid) {
                    Some(PushOutcome::NotFound)
                } else if st.core.trigger(sid, Some(dest.clone())) {
                    st.watched.entry(sid).or_default().waiters += 1;
                    guard.sessions.push(sid);
                    None
                } else {
                    Some(PushOutcome::NotConnected)
                };
                results.push((sid, outcome));
            }
            self.shared.pump(&mut st);
            first_move
        };
        info!(server = %self.shared.me, %dest, sessions = results.len(), "operator push");
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let pending = {
                let st = self.shared.lock();
                for (sid, outcome) in results.iter_mut().filter(|(_, o)| o.is_none()) {
                    let moved = st.watched.get(sid).and_then(|w| w.moved.as_ref());
                    if let Some((_, to)) = moved.filter(|(seq, _)| *seq >= first_move) {
                        *outcome = Some(PushOutcome::Moved {
                            to: to.clone(),
                            millis: start.elapsed().as_millis() as u64,
                        });
                    } else if !st.core.holds(*sid) {
                        *outcome = Some(PushOutcome::Ended);
                    }
                }
                results.iter().any(|(_, o)| o.is_none())
            };
            if !pending {
                break;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => break,
                _ = stopped.wait_for(|s| *s) => return Err(Error::Stopped),
            }
        }
        drop(guard);
        Ok(results
            .into_iter()
            .map(|(sid, o)| (sid, o.unwrap_or(PushOutcome::TimedOut)))
            .collect())
    }

    /// Answers one operator request.
    async fn operator_request(&self, msg: ControlMessage) -> ControlMessage {
        match msg {
            ControlMessage::OperatorList { req } => ControlMessage::OperatorSessions {
                req,
                sessions: self.session_rows(),
            },
            ControlMessage::OperatorPush {
                req,
                dest,
                select,
                timeout_ms,
            } => match self
                .push(dest.as_str(), select, Duration::from_millis(timeout_ms))
                .await
            {
                Ok(results) => ControlMessage::OperatorPushed { req, results },
                Err(e) => ControlMessage::OperatorError {
                    req,
                    text: e.to_string(),
                },
            },
            other => ControlMessage::OperatorError {
                req: 0,
                text: format!("{} is not an operator request", other.name()),
            },
        }
    }
}

/// Removes a push's interest in its sessions' moves when the push ends.
struct PushGuard<'a> {
    shared: &'a Arc<Shared>,
    sessions: Vec<SessionId>,
}

impl Drop for PushGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        for sid in &self.sessions {
            if let Some(w) = st.watched.get_mut(sid) {
                w.waiters -= 1;
                if w.waiters == 0 {
                    st.watched.remove(sid);
                }
            }
        }
    }
}

/// What operator pushes waiting on a session know of its moves.
#[derive(Debug, Default)]
struct Watch {
    /// Pushes waiting.
    waiters: usize,
    /// Its latest move out while watched: (move number, destination).
    moved: Option<(u64, ServerId)>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
        for t in &self.tasks {
            t.abort();
        }
        let mut st = self.shared.lock();
        for (_, (tx, _)) in st.conns.drain() {
            let _ = tx.send(Out::Close);
        }
        for (_, link) in st.links.drain() {
            if let Link::Up(tx, _) = link {
                let _ = tx.send(Out::Close);
            }
        }
    }
}

/// Our connection to a peer: one per pair, opened by whichever side needs
/// it first and then used both ways.
#[derive(Debug)]
enum Link {
    /// Connected (the number tells connections apart).
    Up(Tx, u64),
    /// Being dialled; messages wait here.
    Dialing(Vec<Vec<Bytes>>),
}

static LINK_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_link_id() -> u64 {
    LINK_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

struct State {
    core: core::Server,
    /// Client connections: their write queue and address.
    conns: HashMap<IncarnationId, (Tx, SocketAddr)>,
    /// Sessions an operator push waits for: where each went and when.
    watched: HashMap<SessionId, Watch>,
    /// Moves out so far (numbers them for [`Watch`]).
    move_seq: u64,
    links: HashMap<ServerId, Link>,
    read_wakers: HashMap<SessionHandle, Waker>,
    write_wakers: HashMap<SessionHandle, Waker>,
    accept_tx: mpsc::UnboundedSender<(Session, Arrival)>,
    segs: Vec<Bytes>,
}

struct Shared {
    me: ServerId,
    key: Vec<u8>,
    controls: HashMap<ServerId, SocketAddr>,
    preamble_wait: Duration,
    timer: Notify,
    /// Woken when a session ends or migrates (operator pushes wait on it).
    changed: Notify,
    /// Set when the [`Server`] is dropped: operator connections end.
    stop: watch::Sender<bool>,
    state: Mutex<State>,
}

/// What kind of event, for the sessions-open gauge.
#[derive(Clone, Copy, PartialEq, Eq)]
enum EvKind {
    Accepted,
    Ended,
    Migration,
    Other,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("me", &self.me).finish()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn peer_id(&self, id: &str) -> Result<ServerId, Error> {
        ServerId::new(id)
            .filter(|p| self.controls.contains_key(p))
            .ok_or_else(|| Error::Config(format!("{id:?} is not a peer of this server")))
    }

    /// Performs everything the core asks for after a call: transmits to
    /// clients and peers, events to the application and the sockets.
    fn pump(self: &Arc<Self>, st: &mut State) {
        let now = Instant::now();
        loop {
            let mut moved = false;
            while let Some(dest) = st.core.poll_transmit(now, &mut st.segs) {
                moved = true;
                let segs = std::mem::take(&mut st.segs);
                match dest {
                    Dest::Incarnation(inc) => {
                        if let Some((tx, _)) = st.conns.get(&inc) {
                            let _ = tx.send(Out::Data(segs));
                        }
                    }
                    Dest::Peer(peer) => self.send_peer(st, peer, segs),
                }
            }
            while let Some(ev) = st.core.poll_event() {
                moved = true;
                self.on_event(st, ev);
            }
            if !moved {
                break;
            }
        }
        self.timer.notify_one();
    }

    fn on_event(self: &Arc<Self>, st: &mut State, ev: ServerEvent) {
        let ev_kind = match &ev {
            ServerEvent::Accepted { .. } => EvKind::Accepted,
            ServerEvent::MigratedAway(_) | ServerEvent::Finished(_) | ServerEvent::Dropped(_) => {
                EvKind::Ended
            }
            ServerEvent::Migration(_) => EvKind::Migration,
            _ => EvKind::Other,
        };
        let wake = |m: &mut HashMap<SessionHandle, Waker>, h: &SessionHandle| {
            if let Some(w) = m.remove(h) {
                w.wake();
            }
        };
        match ev {
            ServerEvent::Accepted {
                handle,
                session,
                arrival,
            } => {
                let stats = st.core.stats().clone();
                let arrival = match arrival {
                    core::Arrival::New => {
                        info!(server = %self.me, %session, "new session");
                        Arrival::New
                    }
                    core::Arrival::Migrated { state } => {
                        info!(
                            server = %self.me,
                            %session,
                            state_bytes = state.len(),
                            replayed_total = stats.bytes_replayed,
                            discarded_total = stats.bytes_discarded,
                            "session migrated in"
                        );
                        Arrival::Migrated { state }
                    }
                };
                let s = Session {
                    inner: Inner::Migratory {
                        shared: self.clone(),
                        handle,
                        session,
                    },
                };
                if let Err(unsent) = st.accept_tx.send((s, arrival)) {
                    // Nobody accepts any more. The session's Drop takes the
                    // lock we hold: drop it elsewhere, later.
                    tokio::spawn(async move { drop(unsent) });
                }
            }
            ServerEvent::Readable(h) => wake(&mut st.read_wakers, &h),
            ServerEvent::Writable(h) => wake(&mut st.write_wakers, &h),
            ServerEvent::MigratedAway(h) | ServerEvent::Finished(h) | ServerEvent::Dropped(h) => {
                debug!(server = %self.me, ?h, "session ended here");
                self.changed.notify_waiters();
                wake(&mut st.read_wakers, &h);
                wake(&mut st.write_wakers, &h);
            }
            ServerEvent::CloseIncarnation { inc, reason } => {
                debug!(server = %self.me, %inc, %reason, "closing connection");
                if let Some((tx, _)) = st.conns.remove(&inc) {
                    let _ = tx.send(Out::Close);
                }
            }
            ServerEvent::Attached { .. } => {}
            // Plain clients are recognised before a connection reaches the core.
            ServerEvent::PlainClient { inc, .. } => {
                st.conns.remove(&inc);
            }
            ServerEvent::Migration(r) => self.on_migration(st, r),
            ServerEvent::PeerLoad { peer, permille } => debug!(%peer, permille, "peer load"),
        }
        if matches!(
            ev_kind,
            EvKind::Accepted | EvKind::Ended | EvKind::Migration
        ) {
            metrics::gauge!(SESSIONS_OPEN, "server" => self.me.to_string())
                .set(st.core.session_count() as f64);
        }
    }

    /// Counts a finished migration (metrics), logs it, and tells an
    /// operator push waiting for it.
    fn on_migration(&self, st: &mut State, r: MigrationReport) {
        let server = self.me.to_string();
        metrics::counter!(
            MIGRATIONS,
            "server" => server.clone(),
            "direction" => r.direction.as_str(),
            "cause" => r.cause.as_str(),
            "outcome" => r.outcome.as_str(),
        )
        .increment(1);
        if matches!(
            r.outcome,
            MigrationOutcome::Moved | MigrationOutcome::Failover
        ) {
            metrics::histogram!(
                MIGRATION_SECONDS,
                "server" => server.clone(),
                "direction" => r.direction.as_str(),
            )
            .record(r.duration.as_secs_f64());
        }
        if r.direction == Direction::In {
            metrics::counter!(BYTES_REPLAYED, "server" => server.clone()).increment(r.replayed);
            metrics::counter!(BYTES_DISCARDED, "server" => server).increment(r.discarded);
        }
        info!(
            server = %self.me,
            session = %r.session,
            direction = r.direction.as_str(),
            peer = %r.peer,
            cause = r.cause.as_str(),
            outcome = r.outcome.as_str(),
            duration_ms = r.duration.as_secs_f64() * 1e3,
            replayed = r.replayed,
            discarded = r.discarded,
            "migration"
        );
        if r.direction == Direction::Out && r.outcome == MigrationOutcome::Moved {
            st.move_seq += 1;
            let seq = st.move_seq;
            if let Some(w) = st.watched.get_mut(&r.session) {
                w.moved = Some((seq, r.peer));
            }
        }
        self.changed.notify_waiters();
    }

    /// Publishes how many peers have a control connection up.
    fn count_peers(&self, st: &State) {
        let up = st
            .links
            .values()
            .filter(|l| matches!(l, Link::Up(..)))
            .count();
        metrics::gauge!(PEERS_UP, "server" => self.me.to_string()).set(up as f64);
    }

    fn send_peer(self: &Arc<Self>, st: &mut State, peer: ServerId, segs: Vec<Bytes>) {
        match st.links.get_mut(&peer) {
            Some(Link::Up(tx, _)) => {
                let _ = tx.send(Out::Data(segs));
            }
            Some(Link::Dialing(queue)) if queue.len() < MAX_DIAL_QUEUE => queue.push(segs),
            Some(Link::Dialing(_)) => {
                // The peer has been unreachable for a while: it is down.
                warn!(server = %self.me, %peer, "peer unreachable: dropping its queue");
                st.links.remove(&peer);
                st.core.handle_peer_down(Instant::now(), &peer);
            }
            None => {
                st.links.insert(peer.clone(), Link::Dialing(vec![segs]));
                tokio::spawn(dial(self.clone(), peer));
            }
        }
    }
}

async fn accept_clients(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                tokio::spawn(serve_client(shared.clone(), stream, addr));
            }
            Err(e) => {
                warn!(server = %shared.me, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads the start of a connection, within the preamble wait, to tell a
/// migratory client from a plain one.
async fn serve_client(shared: Arc<Shared>, mut stream: TcpStream, addr: SocketAddr) {
    let mut first = BytesMut::with_capacity(64);
    let deadline = tokio::time::Instant::now() + shared.preamble_wait;
    let migratory = loop {
        match check_preamble(&first) {
            Ok(PreambleCheck::Migratory) => break true,
            Ok(PreambleCheck::NeedMore) => {}
            Err(DecodeError::NotMigratory) => break false,
            Err(e) => {
                debug!(%addr, error = %e, "refusing connection");
                return;
            }
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut first)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            // Silent client: a plain protocol where the server speaks first.
            Err(_) => break false,
        }
    };
    if !migratory {
        debug!(%addr, "plain TCP client");
        let s = Session {
            inner: Inner::Plain {
                initial: first.freeze(),
                stream,
            },
        };
        let st = shared.lock();
        let _ = st.accept_tx.send((s, Arrival::Plain));
        return;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let mut st = shared.lock();
    let inc = st.core.new_incarnation(Instant::now());
    st.conns.insert(inc, (tx, addr));
    drop(st);
    let (s1, s2) = (shared.clone(), shared.clone());
    conn::start(
        stream,
        rx,
        Some(first.freeze()),
        move |data| {
            let mut st = s1.lock();
            st.core.handle_input(Instant::now(), inc, data);
            s1.pump(&mut st);
            true
        },
        move |reason| {
            debug!(%inc, %reason, "client connection closed");
            let mut st = s2.lock();
            st.conns.remove(&inc);
            st.core.handle_incarnation_closed(Instant::now(), inc);
            s2.pump(&mut st);
        },
    );
}

async fn accept_peers(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                tokio::spawn(serve_peer(shared.clone(), stream, addr));
            }
            Err(e) => {
                warn!(server = %shared.me, error = %e, "control accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs the authentication handshake on a control connection; returns the
/// authenticated link.
pub(crate) async fn handshake(
    me: &ServerId,
    key: &[u8],
    stream: &mut TcpStream,
    expected: Option<ServerId>,
) -> Result<PeerLink, String> {
    let nonce: [u8; 32] = rand::random();
    let mut link = PeerLink::new(me.clone(), key, nonce, expected);
    let mut buf = vec![0u8; 4096];
    let run = async {
        loop {
            let out = link.take_output();
            if !out.is_empty() {
                stream.write_all(&out).await.map_err(|e| e.to_string())?;
            }
            if link.peer().is_some() {
                return Ok::<(), String>(());
            }
            let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed during the handshake".into());
            }
            link.handle_input(&buf[..n]).map_err(|e| e.to_string())?;
        }
    };
    tokio::time::timeout(PEER_HANDSHAKE_TIMEOUT, run)
        .await
        .map_err(|_| "handshake timed out".to_string())??;
    Ok(link)
}

fn link_reader(
    shared: Arc<Shared>,
    mut link: PeerLink,
    peer: ServerId,
) -> impl FnMut(&[u8]) -> bool + Send + 'static {
    let deliver = move |shared: &Arc<Shared>, link: &mut PeerLink| {
        let mut st = shared.lock();
        while let Some(msg) = link.poll_message() {
            st.core.handle_control(Instant::now(), &peer, msg);
        }
        shared.pump(&mut st);
    };
    // Messages that came in the same read as the end of the handshake.
    deliver(&shared, &mut link);
    move |data| {
        let ok = link.handle_input(data);
        // What decoded before a bad frame still counts.
        deliver(&shared, &mut link);
        if let Err(e) = ok {
            warn!(server = %shared.me, error = %e, "bad control input: closing the link");
            return false;
        }
        true
    }
}

async fn serve_peer(shared: Arc<Shared>, mut stream: TcpStream, addr: SocketAddr) {
    let link = match handshake(&shared.me, &shared.key, &mut stream, None).await {
        Ok(link) => link,
        Err(e) => {
            warn!(server = %shared.me, %addr, error = %e, "control connection refused");
            return;
        }
    };
    let peer = link.peer().expect("authenticated").clone();
    if peer.as_str() == OPERATOR_ID {
        info!(server = %shared.me, %addr, "operator connected");
        return serve_operator(ServerHandle { shared }, stream, link).await;
    }
    if !shared.controls.contains_key(&peer) {
        warn!(server = %shared.me, %addr, %peer, "control connection from a server not in the pool");
        return;
    }
    debug!(server = %shared.me, %peer, "peer connected in");
    let (tx, rx) = mpsc::unbounded_channel();
    let id = register_link(&shared, &peer, tx.clone());
    let reader = link_reader(shared.clone(), link, peer.clone());
    let closed = link_closed(shared.clone(), peer, id);
    // The writer lives as long as the connection even when it is not the
    // link (it is then only read).
    conn::start(stream, rx, None, reader, move |reason| {
        drop(tx);
        closed(reason);
    });
}

/// Makes a new authenticated connection the link to `peer`, unless one is
/// up already (then it is only read: both sides dialled at once). Queued
/// messages go out on it.
fn register_link(shared: &Arc<Shared>, peer: &ServerId, tx: Tx) -> u64 {
    let id = next_link_id();
    let mut st = shared.lock();
    let queued = match st.links.remove(peer) {
        Some(Link::Up(old, old_id)) => {
            st.links.insert(peer.clone(), Link::Up(old, old_id));
            return 0;
        }
        Some(Link::Dialing(q)) => q,
        None => Vec::new(),
    };
    for segs in queued {
        let _ = tx.send(Out::Data(segs));
    }
    st.links.insert(peer.clone(), Link::Up(tx, id));
    shared.count_peers(&st);
    st.core.handle_peer_up(Instant::now(), peer);
    shared.pump(&mut st);
    id
}

/// What to do when a control connection ends: if it was the link, the core
/// learns the peer is down (pending requests fall back, replication stops
/// gating acks) and the next message dials again.
fn link_closed(
    shared: Arc<Shared>,
    peer: ServerId,
    id: u64,
) -> impl FnOnce(String) + Send + 'static {
    move |reason| {
        let mut st = shared.lock();
        let was_link = matches!(st.links.get(&peer), Some(Link::Up(_, i)) if *i == id);
        if was_link {
            warn!(server = %shared.me, %peer, %reason, "control connection lost");
            if let Some(Link::Up(tx, _)) = st.links.remove(&peer) {
                let _ = tx.send(Out::Close);
            }
            shared.count_peers(&st);
            st.core.handle_peer_down(Instant::now(), &peer);
            shared.pump(&mut st);
        } else {
            debug!(server = %shared.me, %peer, %reason, "extra control connection closed");
        }
    }
}

/// Opens our control connection to `peer` and flushes what was queued; on
/// failure the core learns the peer is down (requests fall back).
async fn dial(shared: Arc<Shared>, peer: ServerId) {
    let addr = shared.controls[&peer];
    let result = tokio::time::timeout(PEER_HANDSHAKE_TIMEOUT, async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let link = handshake(&shared.me, &shared.key, &mut stream, Some(peer.clone())).await?;
        Ok::<_, String>((stream, link))
    })
    .await
    .unwrap_or_else(|_| Err("connect timed out".into()));
    match result {
        Ok((stream, link)) => {
            debug!(server = %shared.me, %peer, "peer connected out");
            let (tx, rx) = mpsc::unbounded_channel();
            let id = register_link(&shared, &peer, tx.clone());
            let reader = link_reader(shared.clone(), link, peer.clone());
            let closed = link_closed(shared, peer, id);
            conn::start(stream, rx, None, reader, move |reason| {
                drop(tx);
                closed(reason);
            });
        }
        Err(e) => {
            warn!(server = %shared.me, %peer, %addr, error = %e, "peer unreachable");
            let mut st = shared.lock();
            if matches!(st.links.get(&peer), Some(Link::Dialing(_))) {
                st.links.remove(&peer);
                st.core.handle_peer_down(Instant::now(), &peer);
                shared.pump(&mut st);
            }
        }
    }
}

/// Answers an operator's requests, one at a time, until it disconnects.
async fn serve_operator(handle: ServerHandle, mut stream: TcpStream, mut link: PeerLink) {
    let mut stopped = handle.shared.stop.subscribe();
    tokio::select! {
        _ = operator_requests(&handle, &mut stream, &mut link) => {}
        _ = stopped.wait_for(|s| *s) => {}
    }
}

async fn operator_requests(handle: &ServerHandle, stream: &mut TcpStream, link: &mut PeerLink) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while let Some(msg) = link.poll_message() {
            let reply = handle.operator_request(msg).await;
            link.send(&reply);
            if stream.write_all(&link.take_output()).await.is_err() {
                return;
            }
        }
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Err(e) = link.handle_input(&buf[..n]) {
            warn!(server = %handle.shared.me, error = %e, "bad operator input: closing");
            return;
        }
    }
}

async fn timer(shared: Arc<Shared>) {
    conn::run_timer(
        &shared.timer,
        || shared.lock().core.poll_timeout(),
        || {
            let mut st = shared.lock();
            st.core.handle_timeout(Instant::now());
            shared.pump(&mut st);
        },
    )
    .await;
}

enum Inner {
    Migratory {
        shared: Arc<Shared>,
        handle: SessionHandle,
        session: SessionId,
    },
    Plain {
        initial: Bytes,
        stream: TcpStream,
    },
}

/// One client's session at this server: `AsyncRead + AsyncWrite`, plus the
/// migration calls. After the session moved away every read and write
/// fails with an error for which [`crate::is_migrated`] is true (MTCP's
/// `EMIGRATED`): stop serving it.
pub struct Session {
    inner: Inner,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Inner::Migratory { session, .. } => write!(f, "Session({session})"),
            Inner::Plain { .. } => f.write_str("Session(plain)"),
        }
    }
}

impl Session {
    /// The session id (`None` for a plain TCP client).
    pub fn id(&self) -> Option<SessionId> {
        match &self.inner {
            Inner::Migratory { session, .. } => Some(*session),
            Inner::Plain { .. } => None,
        }
    }

    /// MTCP's `set_state`: records `state` as this session's restart point.
    /// A server resuming from it reads and writes from here on. A no-op for
    /// a plain TCP client.
    pub fn snapshot(&self, state: &[u8]) -> Result<(), Error> {
        match self.control() {
            Some(c) => c.snapshot(state),
            None => Ok(()),
        }
    }

    /// Server push (MTCP 3.2.1): asks the client to migrate, to `dest` if
    /// given. Fails for a plain TCP client.
    pub fn migrate_to(&self, dest: Option<&str>) -> Result<(), Error> {
        match self.control() {
            Some(c) => c.migrate_to(dest),
            None => Err(Error::Config("a plain TCP client cannot migrate".into())),
        }
    }

    /// A cloneable handle for [`Session::snapshot`] and
    /// [`Session::migrate_to`], for use while the session's IO runs
    /// elsewhere (`None` for a plain TCP client).
    pub fn control(&self) -> Option<SessionControl> {
        match &self.inner {
            Inner::Migratory {
                shared,
                handle,
                session,
            } => Some(SessionControl {
                shared: shared.clone(),
                handle: *handle,
                session: *session,
            }),
            Inner::Plain { .. } => None,
        }
    }
}

/// Snapshot and migration calls on a session, detached from its IO.
#[derive(Debug, Clone)]
pub struct SessionControl {
    shared: Arc<Shared>,
    handle: SessionHandle,
    session: SessionId,
}

impl SessionControl {
    /// The session id.
    pub fn id(&self) -> SessionId {
        self.session
    }

    /// See [`Session::snapshot`].
    pub fn snapshot(&self, state: &[u8]) -> Result<(), Error> {
        let mut st = self.shared.lock();
        st.core.snapshot(self.handle, state)?;
        self.shared.pump(&mut st);
        Ok(())
    }

    /// See [`Session::migrate_to`].
    pub fn migrate_to(&self, dest: Option<&str>) -> Result<(), Error> {
        let dest = match dest {
            Some(d) => Some(self.shared.peer_id(d)?),
            None => None,
        };
        let mut st = self.shared.lock();
        st.core.migrate_to(self.handle, dest)?;
        self.shared.pump(&mut st);
        Ok(())
    }
}

impl AsyncRead for Session {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Inner::Plain { initial, stream } => {
                if !initial.is_empty() {
                    let n = initial.len().min(buf.remaining());
                    buf.put_slice(&initial.split_to(n));
                    return Poll::Ready(Ok(()));
                }
                Pin::new(stream).poll_read(cx, buf)
            }
            Inner::Migratory { shared, handle, .. } => {
                let mut st = shared.lock();
                match st.core.read(*handle, buf.initialize_unfilled()) {
                    Ok(Some(n)) => {
                        buf.advance(n);
                        if n > 0 {
                            shared.pump(&mut st);
                        }
                        Poll::Ready(Ok(()))
                    }
                    Ok(None) => {
                        st.read_wakers.insert(*handle, cx.waker().clone());
                        Poll::Pending
                    }
                    Err(e) => Poll::Ready(Err(Error::from(e).into())),
                }
            }
        }
    }
}

impl AsyncWrite for Session {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.inner {
            Inner::Plain { stream, .. } => Pin::new(stream).poll_write(cx, data),
            Inner::Migratory { shared, handle, .. } => {
                let mut st = shared.lock();
                match st.core.write(*handle, data) {
                    Ok(0) if !data.is_empty() => {
                        st.write_wakers.insert(*handle, cx.waker().clone());
                        Poll::Pending
                    }
                    Ok(n) => {
                        shared.pump(&mut st);
                        Poll::Ready(Ok(n))
                    }
                    Err(e) => Poll::Ready(Err(Error::from(e).into())),
                }
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Inner::Plain { stream, .. } => Pin::new(stream).poll_flush(cx),
            // Written bytes are in the session's retransmit buffer, which is
            // what survives a migration; the socket drains it on its own.
            Inner::Migratory { .. } => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Inner::Plain { stream, .. } => Pin::new(stream).poll_shutdown(cx),
            Inner::Migratory { shared, handle, .. } => {
                let mut st = shared.lock();
                let r = st.core.close_write(*handle);
                shared.pump(&mut st);
                Poll::Ready(r.map_err(|e| Error::from(e).into()))
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Inner::Migratory { shared, handle, .. } = &self.inner {
            let mut st = shared.lock();
            st.read_wakers.remove(handle);
            st.write_wakers.remove(handle);
            // A session dropped while live ends gracefully (Close sent,
            // further input discarded), as a closed TCP socket would.
            st.core.release(*handle);
            shared.pump(&mut st);
        }
    }
}
