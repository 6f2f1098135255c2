//! The server side of the session protocol, in three parts:
//!
//! * [`Endpoint`]: one per server of the pool — admission of client
//!   connections, the session table, state requests for clients that
//!   migrate here, replicas kept for peers, tombstones and timers;
//! * [`Session`]: one state machine per session — its streams, logs and
//!   windows, half-closes, snapshot, backup gating, lifecycle and the
//!   client connection it is attached to;
//! * [`Server`]: both driven from one task, for simulations, tests and
//!   single-task embedders (the tokio runtime instead drives each session
//!   from the task that owns its socket).
//!
//! The endpoint routes to sessions and sessions report back through
//! [`EndpointEvent`]s, as quinn-proto's `Endpoint` and `Connection` do.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use rand_core::RngCore;

use crate::config::{Limits, ServerTimeouts};
use crate::control::ControlMessage;
use crate::error::AppError;
use crate::stream::MAX_FRAMES_PER_BATCH;
use crate::types::{Alternate, Epoch, IncarnationId, ServerId, SessionId};

mod balance;
mod endpoint;
mod events;
mod replica;
mod session;

pub use balance::{BalanceConfig, Candidate, RebalanceConfig};
pub use endpoint::{Endpoint, SessionSlot};
pub use events::{
    Arrival, Dest, Direction, DrainReport, DrainStatus, MigrationOutcome, MigrationReport,
    ServerEvent, ServerStats, SessionInfo,
};
pub use session::{EndpointEvent, Session};

/// Reject text for a session that completed (MTCP's INVALID_STATE for
/// LAST_ACK / TIME_WAIT): a client that had closed takes it as completion.
pub const FINISHED_TEXT: &str = "session finished";

/// Reject text for a session a draining server ended because no peer could
/// take it (with [`RejectReason::Shutdown`](crate::frame::RejectReason::Shutdown)).
pub const ABORT_TEXT: &str = "server shut down; no peer could take the session";

/// Configuration of one server of the pool.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// This server's id.
    pub id: ServerId,
    /// The other servers of the pool, as told to clients (preferred first).
    pub alternates: Vec<Alternate>,
    /// The peer that keeps an eager replica of every session this server
    /// owns (docs/architecture.md 3.6), if any.
    pub backup: Option<ServerId>,
    /// Buffer and frame limits.
    pub limits: Limits,
    /// Largest application snapshot accepted.
    pub max_state: usize,
    /// Most sessions (owned, frozen or arriving) held at once. A new
    /// session beyond it is sent on to the least loaded peer with room
    /// when [`ServerConfig::balance`] is set (it is held here for the
    /// moment it takes to leave: at most `max_sessions / 8 + 16` more at
    /// once), else refused with `Busy`; a migration beyond it is refused
    /// with `Busy`.
    pub max_sessions: usize,
    /// Load reports, new sessions sent to peers, the rebalancer and drain
    /// ([`BalanceConfig`]); `None`: none of them (a drain then ends every
    /// session).
    pub balance: Option<BalanceConfig>,
    /// Timeouts.
    pub timeouts: ServerTimeouts,
    /// Serve migratory clients only on connections with a channel binding
    /// (TLS): one without is refused with `Reject(TlsRequired)`.
    pub require_binding: bool,
}

impl ServerConfig {
    /// A configuration with default limits and timeouts.
    pub fn new(id: ServerId) -> Self {
        Self {
            id,
            alternates: Vec::new(),
            backup: None,
            limits: Limits::default(),
            max_state: 64 * 1024,
            max_sessions: 100_000,
            balance: None,
            timeouts: ServerTimeouts::default(),
            require_binding: false,
        }
    }
}

/// The application's handle on one session at one server. A session that
/// migrates away and comes back gets a new handle; calls on the old one fail
/// with [`SessionError::Migrated`](crate::error::SessionError::Migrated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionHandle(pub u64);

type Slot = Arc<Mutex<Session>>;

/// A whole server driven from one task: an [`Endpoint`] and its
/// [`Session`]s, addressed by [`SessionHandle`] and [`IncarnationId`].
/// Simulations and tests use it; it visits its attached sessions to find
/// output, so it suits a handful of sessions, not a production server.
///
/// The caller owns the sockets and the clock and calls, in any order:
/// [`Server::new_incarnation`], [`Server::handle_input`] and
/// [`Server::handle_incarnation_closed`] for client connections;
/// [`Server::handle_control`], [`Server::handle_peer_down`] and
/// [`Server::handle_peer_up`] for peers; [`Server::handle_timeout`] once
/// [`Server::poll_timeout`] passed. After each it drains
/// [`Server::poll_transmit`] and [`Server::poll_event`]. The application
/// calls [`Server::read`], [`Server::write`], [`Server::snapshot`] and
/// [`Server::close_write`] with its [`SessionHandle`].
pub struct Server {
    endpoint: Endpoint<Slot>,
    /// Connections attached to sessions.
    attached: BTreeMap<IncarnationId, Slot>,
    /// Where the next [`Server::poll_transmit`] starts looking.
    cursor: IncarnationId,
    by_handle: HashMap<SessionHandle, Slot>,
    events: VecDeque<ServerEvent>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.endpoint.fmt(f)
    }
}

impl Server {
    /// A server with no sessions. `rng` makes session ids and secrets: give
    /// it a cryptographically secure generator outside of tests.
    pub fn new(cfg: ServerConfig, rng: Box<dyn RngCore + Send>, now: Instant) -> Self {
        Self {
            endpoint: Endpoint::new(cfg, rng, now),
            attached: BTreeMap::new(),
            cursor: IncarnationId(0),
            by_handle: HashMap::new(),
            events: VecDeque::new(),
        }
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint<Slot> {
        &self.endpoint
    }

    /// This server's id.
    pub fn id(&self) -> &ServerId {
        self.endpoint.id()
    }

    /// What the server has done so far.
    pub fn stats(&self) -> &ServerStats {
        self.endpoint.stats()
    }

    /// Sessions this server owns (not frozen), with their epochs.
    pub fn owned_sessions(&self) -> impl Iterator<Item = (SessionId, Epoch)> {
        self.endpoint.owned_sessions().into_iter()
    }

    /// Sessions held here, including any frozen mid-migration.
    pub fn session_count(&self) -> usize {
        self.endpoint.session_count()
    }

    /// Whether the session is held here (owned, or frozen mid-migration).
    pub fn holds(&self, session: SessionId) -> bool {
        self.endpoint.holds(session)
    }

    /// What an operator sees of the sessions this server owns.
    pub fn session_infos(&self) -> Vec<SessionInfo> {
        self.endpoint.session_infos()
    }

    /// The epochs at which this server would still take a Migrate of
    /// `session` (see [`Endpoint::accepted_epochs`]).
    pub fn accepted_epochs(&self, session: SessionId) -> Vec<Epoch> {
        self.endpoint.accepted_epochs(session)
    }

    /// Whether `session`, owned here, would survive this server's crash.
    pub fn crash_tolerant(&self, session: SessionId) -> bool {
        self.endpoint.crash_tolerant(session)
    }

    /// The session an incarnation carries, if it is attached to one.
    pub fn incarnation_session(&self, inc: IncarnationId) -> Option<SessionId> {
        self.attached
            .get(&inc)
            .and_then(|s| s.peek(|s| (s.incarnation() == Some(inc)).then(|| s.id())))
    }

    /// Whether this server holds a replica of `session`.
    pub fn has_replica(&self, session: SessionId) -> bool {
        self.endpoint.has_replica(session)
    }

    /// The session a handle refers to, while the application serves it.
    pub fn session_of(&self, handle: SessionHandle) -> Option<SessionId> {
        self.by_handle
            .get(&handle)
            .and_then(|s| s.peek(|s| s.is_live().then(|| s.id())))
    }

    /// Moves what the endpoint reported to this server's queue, keeping
    /// track of attached connections and handles.
    fn sync(&mut self) {
        while let Some(ev) = self.endpoint.poll_event() {
            match &ev {
                ServerEvent::Attached { inc, session } => {
                    if let Some(slot) = self.endpoint.session(*session) {
                        self.attached.insert(*inc, slot);
                    }
                }
                ServerEvent::Accepted {
                    handle, session, ..
                } => {
                    if let Some(slot) = self.endpoint.session(*session) {
                        self.by_handle.insert(*handle, slot);
                    }
                }
                _ => {}
            }
            self.events.push_back(ev);
        }
    }

    /// Runs `f` on a session the caller addressed directly, then lets the
    /// endpoint take in what it reported.
    fn on_session<R>(&mut self, now: Instant, slot: &Slot, f: impl FnOnce(&mut Session) -> R) -> R {
        let r = slot.with(|s| {
            let r = f(s);
            self.endpoint.absorb(now, s);
            r
        });
        self.sync();
        r
    }

    fn handle_slot(&self, handle: SessionHandle) -> Result<Slot, AppError> {
        self.by_handle
            .get(&handle)
            .cloned()
            .ok_or(AppError::Session(crate::error::SessionError::Migrated))
    }

    // ----- incarnations ---------------------------------------------------

    /// Registers a newly accepted client connection, with its channel
    /// binding if it has one (see [`Endpoint::new_incarnation`]).
    pub fn new_incarnation(&mut self, now: Instant, binding: Option<[u8; 32]>) -> IncarnationId {
        self.endpoint.new_incarnation(now, binding)
    }

    /// Bytes read from a client connection.
    pub fn handle_input(&mut self, now: Instant, inc: IncarnationId, data: &[u8]) {
        match self.attached.get(&inc).cloned() {
            Some(slot) => self.on_session(now, &slot, |s| s.handle_input(now, inc, data)),
            None => {
                self.endpoint.handle_input(now, inc, data);
                self.sync();
            }
        }
    }

    /// The client connection ended (EOF, reset or error).
    pub fn handle_incarnation_closed(&mut self, now: Instant, inc: IncarnationId) {
        match self.attached.remove(&inc) {
            Some(slot) => self.on_session(now, &slot, |s| s.handle_incarnation_closed(now, inc)),
            None => {
                self.endpoint.handle_incarnation_closed(now, inc);
                self.sync();
            }
        }
    }

    // ----- the application's calls ------------------------------------------

    /// The application is done with `handle` (see [`Session::release`]).
    pub fn release(&mut self, handle: SessionHandle) {
        if let Some(slot) = self.by_handle.remove(&handle) {
            let now = slot.peek(|s| s.last_now());
            self.on_session(now, &slot, Session::release);
        }
    }

    /// See [`Session::read`].
    pub fn read(
        &mut self,
        handle: SessionHandle,
        buf: &mut [u8],
    ) -> Result<Option<usize>, AppError> {
        let slot = self.handle_slot(handle)?;
        let now = slot.peek(|s| s.last_now());
        self.on_session(now, &slot, |s| s.read(buf))
    }

    /// See [`Session::write`].
    pub fn write(&mut self, handle: SessionHandle, data: &[u8]) -> Result<usize, AppError> {
        let slot = self.handle_slot(handle)?;
        let now = slot.peek(|s| s.last_now());
        self.on_session(now, &slot, |s| s.write(data))
    }

    /// See [`Session::write_bytes`].
    pub fn write_bytes(
        &mut self,
        handle: SessionHandle,
        data: &bytes::Bytes,
    ) -> Result<usize, AppError> {
        let slot = self.handle_slot(handle)?;
        let now = slot.peek(|s| s.last_now());
        self.on_session(now, &slot, |s| s.write_bytes(data))
    }

    /// See [`Session::close_write`].
    pub fn close_write(&mut self, handle: SessionHandle) -> Result<(), AppError> {
        let slot = self.handle_slot(handle)?;
        let now = slot.peek(|s| s.last_now());
        self.on_session(now, &slot, Session::close_write)
    }

    /// See [`Session::snapshot`].
    pub fn snapshot(&mut self, handle: SessionHandle, state: &[u8]) -> Result<(), AppError> {
        let slot = self.handle_slot(handle)?;
        let now = slot.peek(|s| s.last_now());
        self.on_session(now, &slot, |s| s.snapshot(state))
    }

    /// See [`Session::migrate_to`].
    pub fn migrate_to(
        &mut self,
        handle: SessionHandle,
        dest: Option<ServerId>,
    ) -> Result<(), AppError> {
        let slot = self.handle_slot(handle)?;
        let now = slot.peek(|s| s.last_now());
        self.on_session(now, &slot, |s| s.migrate_to(dest))
    }

    /// See [`Endpoint::trigger`].
    pub fn trigger(&mut self, session: SessionId, dest: Option<ServerId>) -> bool {
        let r = self.endpoint.trigger(session, dest);
        self.sync();
        r
    }

    /// See [`Endpoint::pull`].
    pub fn pull(&mut self, session: SessionId, owner: ServerId) {
        self.endpoint.pull(session, owner);
    }

    /// See [`Endpoint::request_trigger`].
    pub fn request_trigger(&mut self, session: SessionId, owner: ServerId, dest: ServerId) {
        self.endpoint.request_trigger(session, owner, dest);
    }

    /// Number of up bytes the application can read now.
    pub fn readable_bytes(&self, handle: SessionHandle) -> u64 {
        self.by_handle
            .get(&handle)
            .map_or(0, |s| s.peek(|s| s.readable_bytes()))
    }

    // ----- the control plane and time ----------------------------------------

    /// See [`Endpoint::handle_control`].
    pub fn handle_control(&mut self, now: Instant, from: &ServerId, msg: ControlMessage) {
        self.endpoint.handle_control(now, from, msg);
        self.sync();
    }

    /// See [`Endpoint::handle_peer_down`].
    pub fn handle_peer_down(&mut self, now: Instant, peer: &ServerId) {
        self.endpoint.handle_peer_down(now, peer);
        self.sync();
    }

    /// See [`Endpoint::drain`].
    pub fn drain(&mut self, now: Instant, deadline: Instant) {
        self.endpoint.drain(now, deadline);
        self.sync();
    }

    /// See [`Endpoint::drain_status`].
    pub fn drain_status(&self) -> Option<DrainStatus> {
        self.endpoint.drain_status()
    }

    /// See [`Endpoint::handle_peer_up`].
    pub fn handle_peer_up(&mut self, now: Instant, peer: &ServerId) {
        self.endpoint.handle_peer_up(now, peer);
        self.sync();
    }

    /// The next instant at which [`Server::handle_timeout`] must be called
    /// (the endpoint's deadlines and the sessions' delayed acks).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let acks = self
            .attached
            .values()
            .filter_map(|s| s.peek(|s| s.ack_deadline()));
        self.endpoint.poll_timeout().into_iter().chain(acks).min()
    }

    /// Expires whatever timed out by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.endpoint.handle_timeout(now);
        self.sync();
    }

    // ----- output ---------------------------------------------------------------

    /// The next thing to send: appends segments to `out` and says where
    /// they go (everything handed out counts as taken by the socket).
    /// `None` when nothing is waiting.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<Bytes>) -> Option<Dest> {
        if let Some(dest) = self.endpoint.poll_transmit(now, out) {
            return Some(dest);
        }
        let order: Vec<IncarnationId> = self
            .attached
            .range(self.cursor..)
            .chain(self.attached.range(..self.cursor))
            .map(|(inc, _)| *inc)
            .collect();
        for inc in order {
            let slot = self.attached[&inc].clone();
            let start = out.len();
            let sent = self.on_session(now, &slot, |s| {
                let max = MAX_FRAMES_PER_BATCH * s.max_data_frame();
                let dest = s.poll_transmit(now, out, max)?;
                let n: usize = out[start..].iter().map(|b| b.len()).sum();
                s.on_transmitted(dest, n);
                Some(dest)
            });
            if let Some(dest) = sent {
                self.cursor = IncarnationId(inc.0 + 1);
                return Some(Dest::Incarnation(dest));
            }
        }
        None
    }

    /// The next event for the runtime or the application.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.sync();
        self.events.pop_front()
    }
}
