//! A server of a pool: accepts clients on its service address, serves their
//! sessions to the application, and talks to its peers on its control
//! address (docs/architecture.md 3.3) to move sessions in and out.
//!
//! The protocol core is split as quinn's is: one [`Endpoint`] under the
//! server's lock routes (admission, the session table, the control plane,
//! timers), and each session's
//! [`Session`](migratory_proto::server::Session) state machine sits behind
//! its own lock, driven by the task that owns its
//! client socket (`driver`). The server-wide lock is taken only to route:
//! accept, attach, migrate, finish, control messages. Every queue is
//! bounded: a session frames output only while its socket is writable,
//! and a peer link that holds too much unsent is dropped (`peers`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use migratory_proto::config::{Limits, ServerTimeouts};
use migratory_proto::control::{ControlMessage, PushOutcome, Selection, SessionRow};
use migratory_proto::server::{
    BalanceConfig, Direction, DrainReport, DrainStatus, Endpoint, MigrationOutcome,
    MigrationReport, ServerConfig, ServerEvent, ServerStats,
};
use migratory_proto::types::{Alternate, Epoch, IncarnationId, ServerId, SessionId};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::error::Error;
use crate::tls::{ServerConfigs, ServerTls};

mod driver;
mod peers;
mod phases;
mod session;

pub use peers::MAX_LINK_QUEUE;
pub use phases::MigrationPhases;
pub use session::{Session, SessionControl};

pub(crate) use peers::handshake;

use driver::{ConnEntry, Slot};
use peers::Link;

/// Default limit on client connections a server holds at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 32_768;

/// Default limit on client connections from one source address.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 4_096;

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
/// Gauge: 1 while the server drains, else 0 (`server`).
pub const DRAINING: &str = "migratory_draining";
/// Gauge: sessions still held by a draining server (`server`).
pub const DRAIN_REMAINING: &str = "migratory_drain_sessions_remaining";
/// Counter: how the sessions of drains ended (`server`, `outcome`
/// moved/finished/closed).
pub const DRAIN_SESSIONS: &str = "migratory_drain_sessions_total";
/// Counter: sessions the rebalancer sent to less loaded peers (`server`).
pub const REBALANCED: &str = "migratory_rebalanced_sessions_total";
/// Counter: new sessions sent on to a peer at once because this server
/// was full or draining (`server`).
pub const REDIRECTED: &str = "migratory_redirected_sessions_total";
/// Counter: TLS handshakes of client connections on the service address
/// (`server`, `kind`: `full` or `resumed`; a resumed one skips the
/// certificate exchange, see [`ServerHandle::tls_handshakes`]).
pub const TLS_HANDSHAKES: &str = "migratory_tls_handshakes_total";
/// Gauge: bytes per second this server's sessions moved lately
/// (`server`).
pub const THROUGHPUT: &str = "migratory_bytes_per_second";
/// Gauge: sessions each peer last reported (`server`, `peer`).
pub const PEER_SESSIONS: &str = "migratory_peer_sessions";

/// Default bound on a drain ([`ServerHandle::drain`]): it fits in
/// Kubernetes' default 30 s grace period with time to spare.
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(25);

/// The id an operator (`migratory sessions`, `migratory migrate`)
/// authenticates with on a control connection; no server may take it.
pub const OPERATOR_ID: &str = "operator";

/// Longest wait an operator push may ask for.
const MAX_PUSH_WAIT: Duration = Duration::from_secs(600);

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

/// A checked configuration: the core's config, the cluster key, the
/// peers' control addresses, and the TLS configurations (`None`: insecure
/// plaintext).
type Validated = (
    ServerConfig,
    Vec<u8>,
    HashMap<ServerId, SocketAddr>,
    Option<ServerConfigs>,
);

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
    tls: Option<ServerTls>,
    max_connections: usize,
    max_connections_per_address: usize,
    max_sessions: usize,
    balance: Option<BalanceConfig>,
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
            tls: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            max_sessions: 100_000,
            balance: Some(BalanceConfig::default()),
        }
    }

    /// Sessions this server holds before it sends new ones on to the least
    /// loaded peer with room (100,000); beyond it migrations in are
    /// refused with `Busy`.
    pub fn max_sessions(&mut self, n: usize) -> &mut Self {
        self.max_sessions = n;
        self
    }

    /// Load reports to peers, sending new sessions on when full or
    /// draining, and the rebalancer ([`BalanceConfig::default`]: reports
    /// every second, the rebalancer on). `None` turns all of it off: then
    /// a drain can only end sessions.
    pub fn balance(&mut self, balance: Option<BalanceConfig>) -> &mut Self {
        self.balance = balance;
        self
    }

    /// Most client connections held at once (migratory or plain, admitted
    /// or not; [`DEFAULT_MAX_CONNECTIONS`]), and most from one source
    /// address ([`DEFAULT_MAX_CONNECTIONS_PER_ADDRESS`]). A connection
    /// beyond either is reset at once.
    pub fn max_connections(&mut self, total: usize, per_address: usize) -> &mut Self {
        self.max_connections = total;
        self.max_connections_per_address = per_address;
        self
    }

    /// TLS settings: the pool CA, this server's certificate and key
    /// ([`ServerTls::from_pem_files`]), or
    /// [`ServerTls::insecure_plaintext`]. Required: a server never falls
    /// back to plaintext by itself.
    pub fn tls(&mut self, tls: ServerTls) -> &mut Self {
        self.tls = Some(tls);
        self
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

    /// The peer that keeps an eager replica of every session (docs/architecture.md 3.6).
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
        let tls = self
            .tls
            .as_ref()
            .ok_or_else(|| {
                cfg_err(
                    "tls: not set (give the pool CA, this server's certificate and key, \
                     or choose insecure plaintext explicitly)"
                        .into(),
                )
            })?
            .configs(id.as_str(), &key)?;
        if self.service.is_none() {
            return Err(cfg_err("service: missing address".into()));
        }
        if self.max_connections == 0 || self.max_connections_per_address == 0 {
            return Err(cfg_err(
                "max_connections: the limits must be at least 1".into(),
            ));
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
        cfg.require_binding = tls.is_some();
        if self.max_sessions == 0 {
            return Err(cfg_err("max_sessions: must be at least 1".into()));
        }
        if let Some(b) = &self.balance {
            let zero = [
                ("report_every", b.report_every),
                ("stale_after", b.stale_after),
                ("drain_round", b.drain_round),
                ("retrigger", b.retrigger),
            ]
            .into_iter()
            .chain(b.rebalance.as_ref().map(|r| ("settle", r.settle)))
            .find(|(_, d)| d.is_zero());
            if let Some((name, _)) = zero {
                return Err(cfg_err(format!("balance.{name}: must be above zero")));
            }
            if b.drain_parallel == 0 {
                return Err(cfg_err("balance.drain_parallel: must be at least 1".into()));
            }
            if let Some(r) = &b.rebalance {
                if !(r.factor >= 1.0 && r.factor.is_finite()) || r.max_moves == 0 {
                    return Err(cfg_err(
                        "balance: factor must be at least 1 and max_moves at least 1".into(),
                    ));
                }
            }
        }
        cfg.max_sessions = self.max_sessions;
        cfg.balance = self.balance.clone();
        Ok((cfg, key, controls, tls))
    }

    /// Checks the configuration, binds both addresses and starts serving.
    /// Peers need not be up: they are dialled on demand and retried.
    pub async fn bind(&self) -> Result<Server, Error> {
        let (cfg, key, controls, tls) = self.validate()?;
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
        if tls.is_none() {
            warn!(
                server = %me,
                "insecure plaintext: session secrets, replicas and data cross the network \
                 in clear, and anyone who sees them can take sessions over"
            );
        }
        let shared = Arc::new(Shared {
            me: me.clone(),
            key,
            tls,
            controls,
            preamble_wait: self.preamble_wait,
            handshake: self.timeouts.handshake,
            conn_limits: driver::ConnLimits::new(
                self.max_connections,
                self.max_connections_per_address,
            ),
            timer: Notify::new(),
            changed: Notify::new(),
            stop: watch::channel(false).0,
            draining: watch::channel(false).0,
            plain: std::sync::atomic::AtomicUsize::new(0),
            handshakes: Default::default(),
            bytes: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            rate: Mutex::new((Instant::now(), 0)),
            state: Mutex::new(State {
                core: Endpoint::new(cfg, Box::new(StdRng::from_entropy()), Instant::now()),
                conns: HashMap::new(),
                watched: HashMap::new(),
                move_seq: 0,
                accept_tx,
                segs: Vec::new(),
                phases: phases::PhaseLog::default(),
                sessions_gauge: usize::MAX,
                armed: None,
                redirected_seen: 0,
            }),
            links: Mutex::new(HashMap::new()),
        });
        shared.register_metrics();
        let tasks = vec![
            tokio::spawn(driver::accept_clients(shared.clone(), svc)),
            tokio::spawn(peers::accept_peers(shared.clone(), ctl)),
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
        self.shared.lock().core.owned_sessions()
    }

    /// What the server has done so far.
    pub fn stats(&self) -> ServerStats {
        self.shared.lock().core.stats().clone()
    }

    /// Drains the server (MTCP thesis, section 3.2.1, server push, for
    /// every session): it stops keeping new sessions (new clients are
    /// sent on to a peer with a Trigger right after their Welcome;
    /// migrations in are refused with `Busy`), tells its peers, sends every
    /// session to the live peers least loaded first, and waits until all
    /// have moved or finished. Sessions still here at `deadline` (or at
    /// once when no peer is live) are ended with `Reject(Shutdown)`: their
    /// clients fail at once. Progress is logged every second and exported
    /// ([`DRAINING`], [`DRAIN_REMAINING`], [`DRAIN_SESSIONS`]). Plain
    /// (non-migratory) clients learn it from [`ServerHandle::draining`]:
    /// once the sessions are gone the drain also waits, within the same
    /// deadline, until the application has dropped every plain client's
    /// [`Session`] (finished its request), and logs a warning naming how
    /// many it still held at the deadline. Calling it again while a drain
    /// runs moves the deadline and waits for the same drain.
    pub async fn drain(&self, deadline: Duration) -> DrainReport {
        let deadline = deadline.min(MAX_PUSH_WAIT);
        let server = self.shared.me.to_string();
        let start = Instant::now();
        {
            let mut st = self.shared.lock();
            st.core.drain(start, start + deadline);
            self.shared.draining.send_replace(true);
            metrics::gauge!(DRAINING, "server" => server.clone()).set(1.0);
            self.shared.pump(&mut st);
        }
        info!(server = %self.shared.me, deadline_ms = deadline.as_millis() as u64, "draining");
        // The core ends the drain by the deadline; this bound only guards
        // against a runtime that stopped.
        let give_up = tokio::time::Instant::now() + deadline + Duration::from_secs(10);
        let plain_deadline = tokio::time::Instant::now() + deadline;
        let mut next_log = tokio::time::Instant::now() + Duration::from_secs(1);
        let mut last = DrainStatus {
            remaining: 0,
            moved: 0,
            finished: 0,
            closed: 0,
            done: false,
        };
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(s) = self.shared.lock().core.drain_status() {
                last = s;
            }
            metrics::gauge!(DRAIN_REMAINING, "server" => server.clone()).set(last.remaining as f64);
            let plain = self.shared.plain.load(std::sync::atomic::Ordering::SeqCst);
            if last.done && plain == 0 {
                break;
            }
            let now = tokio::time::Instant::now();
            if last.done && now >= plain_deadline {
                warn!(server = %self.shared.me, plain, "plain clients still served at the drain's deadline");
                break;
            }
            if now >= next_log {
                info!(
                    server = %self.shared.me,
                    remaining = last.remaining,
                    moved = last.moved,
                    finished = last.finished,
                    closed = last.closed,
                    plain,
                    "draining"
                );
                next_log = now + Duration::from_secs(1);
            }
            if now >= give_up {
                warn!(server = %self.shared.me, remaining = last.remaining, "drain did not finish in time");
                break;
            }
            let wake = if last.done {
                next_log.min(plain_deadline)
            } else {
                next_log.min(give_up)
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
        DrainReport {
            moved: last.moved,
            finished: last.finished,
            closed: last.closed,
            duration: start.elapsed(),
        }
    }

    /// Client TLS handshakes this server completed so far: `(full,
    /// resumed)`. Session tickets are pool-wide, so a client that met any
    /// server of the pool resumes here too.
    pub fn tls_handshakes(&self) -> (u64, u64) {
        let [full, resumed] = &self.shared.handshakes;
        (
            full.load(std::sync::atomic::Ordering::Relaxed),
            resumed.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// `true` from the moment the server starts draining: plain
    /// (non-migratory) clients finish their current request and close, a
    /// readiness check says not ready.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.shared.draining.subscribe()
    }

    /// How long each step of the migrations through this server took
    /// since the last call (MTCP thesis, fig 5.2); at most the last 4,096
    /// are kept.
    pub fn take_migration_phases(&self) -> Vec<MigrationPhases> {
        self.shared.lock().phases.take()
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
                client: i.inc.and_then(|inc| st.conns.get(&inc)).map(|c| c.addr),
                age_ms: now.saturating_duration_since(i.since).as_millis() as u64,
                up: i.up,
                down: i.down,
            })
            .collect()
    }

    /// Server push for an operator (MTCP 3.2.1 case a): sends the selected
    /// sessions' clients a Trigger to `dest`, then waits until each moved,
    /// ended, or `timeout` passed. Sessions are taken oldest first. A
    /// session whose client is between connections gets no Trigger but is
    /// watched too (it may be migrating already): it is NotConnected if it
    /// neither moved nor ended by the timeout.
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
        // Sessions whose client was between connections when the push came.
        let mut unconnected: Vec<SessionId> = Vec::new();
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
                } else {
                    // A client between connections (it may be migrating
                    // already) gets no Trigger; its session is watched all
                    // the same, and is NotConnected if it neither moves
                    // nor ends within the timeout.
                    if !st.core.trigger(sid, Some(dest.clone())) {
                        unconnected.push(sid);
                    }
                    st.watched.entry(sid).or_default().waiters += 1;
                    guard.sessions.push(sid);
                    None
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
            .map(|(sid, o)| {
                let late = if unconnected.contains(&sid) {
                    PushOutcome::NotConnected
                } else {
                    PushOutcome::TimedOut
                };
                (sid, o.unwrap_or(late))
            })
            .collect())
    }

    /// Answers one operator request.
    async fn operator_request(&self, msg: ControlMessage) -> ControlMessage {
        match msg {
            ControlMessage::OperatorList { req } => ControlMessage::OperatorSessions {
                req,
                sessions: self.session_rows(),
            },
            ControlMessage::OperatorDrain { req, deadline_ms } => {
                let r = self.drain(Duration::from_millis(deadline_ms)).await;
                ControlMessage::OperatorDrained {
                    req,
                    moved: r.moved,
                    closed: r.closed,
                    millis: r.duration.as_millis() as u64,
                }
            }
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
        for (_, c) in st.conns.drain() {
            c.wake.notify_one();
        }
        // Peers learn that this is an orderly stop (they log it as such,
        // and send nothing more here), before the links close.
        let mut load = st.core.load();
        load.draining = true;
        drop(st);
        let mut bye = bytes::BytesMut::new();
        ControlMessage::Load(load).encode(&mut bye);
        let bye = bye.freeze();
        for (_, link) in self.shared.links().drain() {
            link.close_after(bye.clone());
        }
    }
}

/// What the server's lock guards: the endpoint and the runtime's routing
/// tables.
struct State {
    core: Endpoint<Slot>,
    /// Client connections of this server, attached or not.
    conns: HashMap<IncarnationId, ConnEntry>,
    /// Sessions an operator push waits for: where each went and when.
    watched: HashMap<SessionId, Watch>,
    /// Moves out so far (numbers them for [`Watch`]).
    move_seq: u64,
    accept_tx: mpsc::UnboundedSender<(Session, Arrival)>,
    segs: Vec<Bytes>,
    /// How long the steps of migrations through this server took.
    phases: phases::PhaseLog,
    /// The session count the gauge shows.
    sessions_gauge: usize,
    /// New sessions sent on to peers, as counted so far.
    redirected_seen: u64,
    /// The deadline the timer task sleeps until (`None`: none).
    armed: Option<Instant>,
}

struct Shared {
    me: ServerId,
    key: Vec<u8>,
    /// TLS configurations; `None` when the pool runs insecure plaintext.
    tls: Option<ServerConfigs>,
    controls: HashMap<ServerId, SocketAddr>,
    preamble_wait: Duration,
    /// Bound on a new connection's TLS handshake and preamble.
    handshake: Duration,
    conn_limits: Arc<driver::ConnLimits>,
    timer: Notify,
    /// Woken when a session ends or migrates (operator pushes wait on it).
    changed: Notify,
    /// Set when the [`Server`] is dropped: connections and operator
    /// connections end.
    stop: watch::Sender<bool>,
    /// Set when the server starts draining.
    draining: watch::Sender<bool>,
    /// Plain (non-migratory) clients the application still holds: a drain
    /// waits for them to finish their request.
    plain: std::sync::atomic::AtomicUsize,
    /// Client TLS handshakes completed here: full, resumed.
    handshakes: [std::sync::atomic::AtomicU64; 2],
    /// Bytes the sessions moved (both directions), for load reports.
    bytes: Arc<std::sync::atomic::AtomicU64>,
    /// When the rate was last measured, and the count then.
    rate: Mutex<(Instant, u64)>,
    state: Mutex<State>,
    /// Control connections to peers. Taken after `state` when both are.
    links: Mutex<HashMap<ServerId, Link>>,
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

    fn links(&self) -> MutexGuard<'_, HashMap<ServerId, Link>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn peer_id(&self, id: &str) -> Result<ServerId, Error> {
        ServerId::new(id)
            .filter(|p| self.controls.contains_key(p))
            .ok_or_else(|| Error::Config(format!("{id:?} is not a peer of this server")))
    }

    /// Performs everything the endpoint asks for after a call: messages to
    /// peers, frames to connections being admitted, events.
    fn pump(self: &Arc<Self>, st: &mut State) {
        let now = Instant::now();
        loop {
            let mut moved = false;
            while let Some(dest) = st.core.poll_transmit(now, &mut st.segs) {
                moved = true;
                let segs = std::mem::take(&mut st.segs);
                match dest {
                    migratory_proto::server::Dest::Incarnation(inc) => {
                        if let Some(c) = st.conns.get_mut(&inc) {
                            for s in segs {
                                c.out.extend_from_slice(&s);
                            }
                            c.wake.notify_one();
                        }
                    }
                    migratory_proto::server::Dest::Peer(peer) => {
                        for s in segs {
                            self.send_peer(st, peer.clone(), s);
                        }
                    }
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
        if st.core.session_count() != st.sessions_gauge {
            st.sessions_gauge = st.core.session_count();
            self.count_sessions(st);
        }
        // Most calls (a control message, a connection admitted) do not
        // move the deadline.
        let next = st.core.poll_timeout();
        crate::conn::rearm_timer(&self.timer, &mut st.armed, next);
    }

    /// Every series at zero from the start: a scrape of a fresh server
    /// shows what it exports.
    fn register_metrics(&self) {
        let server = self.me.to_string();
        for name in [
            SESSIONS_OPEN,
            PEERS_UP,
            DRAINING,
            DRAIN_REMAINING,
            THROUGHPUT,
        ] {
            metrics::gauge!(name, "server" => server.clone()).set(0.0);
        }
        for name in [BYTES_REPLAYED, BYTES_DISCARDED, REBALANCED, REDIRECTED] {
            metrics::counter!(name, "server" => server.clone()).absolute(0);
        }
        for outcome in ["moved", "finished", "closed"] {
            metrics::counter!(DRAIN_SESSIONS, "server" => server.clone(), "outcome" => outcome)
                .absolute(0);
        }
        for kind in ["full", "resumed"] {
            metrics::counter!(TLS_HANDSHAKES, "server" => server.clone(), "kind" => kind)
                .absolute(0);
        }
        for direction in [Direction::In, Direction::Out] {
            for cause in [
                migratory_proto::types::MigrationCause::Requested,
                migratory_proto::types::MigrationCause::Trigger,
                migratory_proto::types::MigrationCause::ServerFailed,
            ] {
                metrics::counter!(
                    MIGRATIONS,
                    "server" => server.clone(),
                    "direction" => direction.as_str(),
                    "cause" => cause.as_str(),
                    "outcome" => MigrationOutcome::Moved.as_str(),
                )
                .absolute(0);
            }
            // Registered: shown once the first migration is recorded.
            let _ = metrics::histogram!(
                MIGRATION_SECONDS,
                "server" => server.clone(),
                "direction" => direction.as_str(),
            );
        }
    }

    /// Measures the bytes per second the sessions moved, for the load
    /// reports (at most once per 500 ms).
    fn measure_rate(&self, st: &mut State) {
        let now = Instant::now();
        let total = self.bytes.load(std::sync::atomic::Ordering::Relaxed);
        let mut r = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        let dt = now.saturating_duration_since(r.0);
        if dt >= Duration::from_millis(500) {
            let bps = ((total - r.1) as f64 / dt.as_secs_f64()) as u64;
            *r = (now, total);
            st.core.set_throughput(bps);
            metrics::gauge!(THROUGHPUT, "server" => self.me.to_string()).set(bps as f64);
        }
    }

    fn on_event(self: &Arc<Self>, st: &mut State, ev: ServerEvent) {
        match ev {
            ServerEvent::Accepted {
                session, arrival, ..
            } => {
                let Some(slot) = st.core.session(session) else {
                    return;
                };
                let stats = st.core.stats().clone();
                let arrival = match arrival {
                    migratory_proto::server::Arrival::New => {
                        info!(server = %self.me, %session, "new session");
                        Arrival::New
                    }
                    migratory_proto::server::Arrival::Migrated { state } => {
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
                let s = Session::migratory(self.clone(), slot, session);
                let redirected = st.core.stats().redirected;
                if redirected > st.redirected_seen {
                    metrics::counter!(REDIRECTED, "server" => self.me.to_string())
                        .increment(redirected - st.redirected_seen);
                    st.redirected_seen = redirected;
                }
                if let Err(unsent) = st.accept_tx.send((s, arrival)) {
                    // Nobody accepts any more. The session's Drop takes the
                    // lock we hold: drop it elsewhere, later.
                    tokio::spawn(async move { drop(unsent) });
                }
                self.count_sessions(st);
            }
            ServerEvent::Attached { inc, session } => {
                let slot = st.core.session(session);
                if let Some(c) = st.conns.get_mut(&inc) {
                    c.attached = slot;
                    c.wake.notify_one();
                }
            }
            // Sessions called through the endpoint wake their own
            // application and driver (see `driver::Slot`).
            ServerEvent::Readable(_) | ServerEvent::Writable(_) => {}
            ServerEvent::MigratedAway(h) | ServerEvent::Finished(h) | ServerEvent::Dropped(h) => {
                debug!(server = %self.me, handle = h.0, "session ended here");
                self.changed.notify_waiters();
            }
            ServerEvent::CloseIncarnation { inc, reason } => {
                debug!(server = %self.me, %inc, %reason, "closing connection");
                if let Some(c) = st.conns.get_mut(&inc) {
                    c.close = Some(reason);
                    c.wake.notify_one();
                }
            }
            // Plain clients are recognised before a connection reaches the core.
            ServerEvent::PlainClient { inc, .. } => {
                st.conns.remove(&inc);
            }
            ServerEvent::Migration(r) => self.on_migration(st, r),
            ServerEvent::PeerLoad { peer, load } => {
                metrics::gauge!(
                    PEER_SESSIONS,
                    "server" => self.me.to_string(),
                    "peer" => peer.to_string(),
                )
                .set(f64::from(load.sessions));
                debug!(
                    server = %self.me,
                    %peer,
                    sessions = load.sessions,
                    bytes_per_sec = load.bytes_per_sec,
                    draining = load.draining,
                    "peer load"
                );
            }
            ServerEvent::Rebalanced { sessions } => {
                metrics::counter!(REBALANCED, "server" => self.me.to_string()).increment(sessions);
                info!(server = %self.me, sessions, "rebalancing: sessions sent to less loaded peers");
            }
            ServerEvent::Drained(report) => {
                // Counted here, once, however many callers wait for it.
                let server = self.me.to_string();
                for (outcome, n) in [
                    ("moved", report.moved),
                    ("finished", report.finished),
                    ("closed", report.closed),
                ] {
                    metrics::counter!(DRAIN_SESSIONS, "server" => server.clone(), "outcome" => outcome)
                        .increment(n);
                }
                metrics::gauge!(DRAIN_REMAINING, "server" => server).set(0.0);
                info!(
                    server = %self.me,
                    moved = report.moved,
                    finished = report.finished,
                    closed = report.closed,
                    duration_ms = report.duration.as_millis() as u64,
                    "drained"
                );
                self.changed.notify_waiters();
            }
        }
    }

    fn count_sessions(&self, st: &State) {
        metrics::gauge!(SESSIONS_OPEN, "server" => self.me.to_string())
            .set(st.core.session_count() as f64);
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
}

async fn timer(shared: Arc<Shared>) {
    crate::conn::run_timer(
        &shared.timer,
        || {
            let mut st = shared.lock();
            st.armed = st.core.poll_timeout();
            st.armed
        },
        || {
            let mut st = shared.lock();
            shared.measure_rate(&mut st);
            st.core.handle_timeout(Instant::now());
            shared.pump(&mut st);
        },
    )
    .await;
}
