//! The server side of the session protocol: one [`Server`] per server of
//! the pool holds every session it owns, every connection from clients
//! (incarnations), the migrations it takes part in and the replicas it keeps
//! for its peers.
//!
//! # Driving it
//!
//! The caller (the tokio runtime, or a simulation) owns the sockets and the
//! clock and calls, in any order:
//!
//! * [`Server::new_incarnation`] when a client connection is accepted, then
//!   [`Server::handle_input`] with every byte read from it and
//!   [`Server::handle_incarnation_closed`] when it ends;
//! * [`Server::handle_control`] with every message from an authenticated
//!   peer, [`Server::handle_peer_down`] / [`Server::handle_peer_up`] when a
//!   control connection is lost or (re)established;
//! * [`Server::handle_timeout`] once the instant from
//!   [`Server::poll_timeout`] has passed.
//!
//! After each of those it drains [`Server::poll_transmit`] (bytes for a
//! client connection or a message for a peer) and [`Server::poll_event`]
//! (sessions for the application, connections to close). The application
//! calls [`Server::read`], [`Server::write`], [`Server::snapshot`] and
//! [`Server::close_write`] on the [`SessionHandle`] it was given.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand_core::RngCore;

use crate::config::{Limits, ServerTimeouts};
use crate::control::{ControlMessage, ReplicaUpdate, SessionImage};
use crate::error::{AppError, DecodeError, ProtocolError, SessionError};
use crate::frame::{
    check_preamble, Frame, Migrate, MigrateRequest, PreambleCheck, RejectReason, PREAMBLE,
};
use crate::mac::verify_migrate;
use crate::stream::{take_scratch, ByteQueue};
use crate::sync::resume_point;
use crate::types::{
    Alternate, Epoch, IncarnationId, MigrationCause, Pos, Secret, ServerId, SessionId,
};

/// Configuration of one server of the pool.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// This server's id.
    pub id: ServerId,
    /// The other servers of the pool, as told to clients (preferred first).
    pub alternates: Vec<Alternate>,
    /// The peer that keeps an eager replica of every session this server
    /// owns (DESIGN.md 3.6), if any.
    pub backup: Option<ServerId>,
    /// Buffer and frame limits.
    pub limits: Limits,
    /// Largest application snapshot accepted.
    pub max_state: usize,
    /// Most sessions (owned, frozen or arriving) held at once; more are
    /// refused with `Busy`.
    pub max_sessions: usize,
    /// Timeouts.
    pub timeouts: ServerTimeouts,
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
            timeouts: ServerTimeouts::default(),
        }
    }
}

/// The application's handle on one session at one server. A session that
/// migrates away and comes back gets a new handle; calls on the old one fail
/// with [`SessionError::Migrated`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionHandle(pub u64);

/// How a session reached the application (MTCP's `get_state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// A new session: start from the beginning.
    New,
    /// A migrated session: resume from this snapshot (empty when the
    /// application never took one).
    Migrated {
        /// The application state of the last snapshot.
        state: Bytes,
    },
}

/// Which way a migration went, seen from this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// A session came here.
    In,
    /// A session left.
    Out,
}

impl Direction {
    /// `"in"` or `"out"`, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::In => "in",
            Self::Out => "out",
        }
    }
}

/// How a migration ended, seen from this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigrationOutcome {
    /// In: the session was installed from its owner's state (or resumed
    /// from its own frozen state). Out: the destination confirmed it.
    Moved,
    /// In: the session was installed from this server's replica; its owner
    /// had failed (DESIGN.md 3.6).
    Failover,
    /// In: the client was refused for this reason.
    Rejected(RejectReason),
    /// Out: the state was handed out but no destination confirmed it before
    /// the frozen timeout; the session is gone from here.
    Expired,
}

impl MigrationOutcome {
    /// Lower-case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Moved => "moved",
            Self::Failover => "failover",
            Self::Rejected(r) => r.as_str(),
            Self::Expired => "expired",
        }
    }
}

/// One finished migration of a session in or out of this server, for
/// metrics and logs ([`ServerEvent::Migration`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// The session.
    pub session: SessionId,
    /// In or out.
    pub direction: Direction,
    /// In: the origin the client named. Out: the destination.
    pub peer: ServerId,
    /// Why the client migrated (from its `Migrate` request).
    pub cause: MigrationCause,
    /// How it ended.
    pub outcome: MigrationOutcome,
    /// In: from the client's connection to the install (or refusal). Out:
    /// from the first state request to the destination's confirmation.
    pub duration: Duration,
    /// In: up bytes handed back to the application to re-read.
    pub replayed: u64,
    /// In: down bytes of re-executed writes to be discarded.
    pub discarded: u64,
}

/// What an operator sees of one session ([`Server::session_infos`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The session.
    pub session: SessionId,
    /// Its epoch.
    pub epoch: Epoch,
    /// The client's current connection, if attached.
    pub inc: Option<IncarnationId>,
    /// When it started or arrived here.
    pub since: Instant,
    /// Up bytes received from the client, in all (the up position).
    pub up: Pos,
    /// Down bytes the application wrote, in all (the down position).
    pub down: Pos,
}

/// Where a transmit goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// A client connection.
    Incarnation(IncarnationId),
    /// A peer's control connection.
    Peer(ServerId),
}

/// Something the runtime or the application must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// A session for the application (MTCP's `accept` + `get_state`).
    Accepted {
        /// The application's handle.
        handle: SessionHandle,
        /// The session.
        session: SessionId,
        /// New, or migrated with its state.
        arrival: Arrival,
    },
    /// Bytes (or the end of the stream) can be read.
    Readable(SessionHandle),
    /// Buffer space can be written.
    Writable(SessionHandle),
    /// The session moved to another server: stop serving it (EMIGRATED).
    MigratedAway(SessionHandle),
    /// Both directions are closed and acknowledged; the session is gone.
    Finished(SessionHandle),
    /// The session was dropped (its client never came back).
    Dropped(SessionHandle),
    /// The connection is not a migratory client: serve it as plain TCP. The
    /// bytes already read from it come along; the core forgets it.
    PlainClient {
        /// The connection.
        inc: IncarnationId,
        /// What it sent so far.
        initial: Bytes,
    },
    /// Close this connection once its pending transmits are written, then
    /// report it with [`Server::handle_incarnation_closed`].
    CloseIncarnation {
        /// The connection.
        inc: IncarnationId,
        /// Why, for logs.
        reason: String,
    },
    /// A migration in or out of this server ended.
    Migration(MigrationReport),
    /// A peer reported its load.
    PeerLoad {
        /// The peer.
        peer: ServerId,
        /// Its load in permille.
        permille: u32,
    },
}

/// Counters of what the server did, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Sessions started here.
    pub sessions_new: u64,
    /// Sessions resumed here from another server's state.
    pub migrations_in: u64,
    /// Sessions resumed here from a replica (the origin had failed).
    pub failovers_in: u64,
    /// Sessions handed to another server.
    pub migrations_out: u64,
    /// Up bytes handed back to the application to re-read after migrations.
    pub bytes_replayed: u64,
    /// Down bytes of re-executed writes discarded after migrations.
    pub bytes_discarded: u64,
    /// Migrations refused.
    pub rejects: u64,
}

#[derive(Debug)]
enum IncPhase {
    Preamble,
    AwaitFirst,
    /// A Migrate request was challenged; waiting for the client's proof.
    AwaitProof(Box<(MigrateRequest, [u8; 32])>),
    Pending(u64),
    Attached(SessionId),
    Closing,
}

#[derive(Debug)]
struct Inc {
    phase: IncPhase,
    rx: BytesMut,
    out: VecDeque<Frame>,
    queued: bool,
    opened: Instant,
    /// The Migrate this connection carries, until it is installed or
    /// refused (for the [`MigrationReport`]).
    migrating: Option<MigrateRequest>,
}

/// How a session starts at this server.
enum Start {
    /// A new session (Hello) with the client's receive window.
    Hello { window: u64 },
    /// A migrated session, for this request; StateAck owed to the origin
    /// once the client confirms the incarnation.
    Resume {
        request: MigrateRequest,
        owed_ack: Option<(ServerId, u64)>,
    },
}

#[derive(Debug)]
struct PendingMigration {
    inc: Option<IncarnationId>,
    migrate: Migrate,
    deadline: Instant,
}

#[derive(Debug)]
struct Backup {
    server: ServerId,
    live: bool,
    /// The replica holds every up byte below this.
    held_up: Pos,
    /// Down bytes below this were sent to the replica.
    down_sent: Pos,
    /// Last client ack forwarded.
    acked_sent: Pos,
    /// The epoch of the replica's last acknowledgement since the last full
    /// state was sent.
    acked_epoch: Option<Epoch>,
}

#[derive(Debug)]
struct Frozen {
    deadline: Instant,
    /// When the first state request came, and why the client migrated.
    since: Instant,
    cause: MigrationCause,
    /// State requests answered from this frozen state: (requester, req).
    replied: Vec<(ServerId, u64)>,
}

#[derive(Debug)]
struct Session {
    secret: Secret,
    epoch: Epoch,
    /// Next epoch this copy may hand out (one owner per epoch).
    next_epoch: Epoch,
    /// The newest Migrate attempt served: older ones still in flight are
    /// superseded.
    last_attempt: u64,
    handle: SessionHandle,
    inc: Option<IncarnationId>,
    /// When the session started or arrived here.
    since: Instant,
    orphan_since: Option<Instant>,
    frozen: Option<Frozen>,
    /// StateAck owed to the origin once the client confirms this incarnation.
    owed_ack: Option<(ServerId, u64)>,
    /// The epoch the client knew before this install, accepted until the
    /// client confirms the new incarnation (its Resumed may be lost).
    prev_epoch: Option<Epoch>,
    // Up stream: [rcv_snap, rcv_nxt) is the read log plus receive buffer.
    up: ByteQueue,
    /// Position of the next byte arriving on the current incarnation; below
    /// `rcv_nxt` after a resume from the commit point (a resend overlap).
    rx_pos: Pos,
    app_read: Pos,
    up_fin: Option<Pos>,
    ack_sent: Pos,
    limit_sent: Pos,
    fin_ack_sent: bool,
    ack_due: bool,
    // Down stream: [snd_una, app_write + discard) is the retransmit buffer.
    down: ByteQueue,
    snd_nxt: Pos,
    app_write: Pos,
    discard: u64,
    down_snap: Pos,
    down_limit: Pos,
    down_fin: Option<Pos>,
    fin_sent: bool,
    fin_acked: bool,
    snap_down_fin: Option<Pos>,
    app_state: Bytes,
    backup: Option<Backup>,
    /// The application released the session: input is discarded.
    app_gone: bool,
}

impl Session {
    /// The application is gone: what arrived counts as read (and needs no
    /// log: nobody will resume it).
    fn discard_input(&mut self) {
        self.app_read = self.rcv_nxt();
        self.up.drop_to(self.app_read);
    }

    fn rcv_nxt(&self) -> Pos {
        self.up.end()
    }

    /// The up position acknowledged to the client: everything received, or
    /// with a live backup only what the backup holds (output commit,
    /// DESIGN.md 3.6).
    fn commit_point(&self) -> Pos {
        match &self.backup {
            Some(b) if b.live => self.rcv_nxt().min(b.held_up).max(self.ack_sent),
            _ => self.rcv_nxt(),
        }
    }

    fn up_limit(&self, limits: &Limits) -> Pos {
        self.up.start() + limits.recv_window
    }

    /// MTCP 4.2.3 step 3 (INVALID_STATE): a session is not migratable once
    /// both directions are closed and each side knows the other has its
    /// Close — the client has nothing left to ask a server for.
    fn migratable(&self) -> bool {
        !(self.fin_ack_sent && self.up_fin.is_some() && self.fin_acked)
    }

    /// Both directions closed and acknowledged, and every up byte read:
    /// nothing can happen on the session any more.
    fn finished(&self) -> bool {
        self.up_fin == Some(self.app_read) && self.fin_ack_sent && self.fin_acked
    }

    /// The whole state, independent of the client's position.
    fn image(&mut self, session: SessionId) -> SessionImage {
        image_of(
            session,
            Held {
                secret: &self.secret,
                epoch: self.epoch,
                up: &mut self.up,
                up_fin: self.up_fin,
                down: &mut self.down,
                down_snap: self.down_snap,
                down_fin: self.snap_down_fin,
                app_state: &self.app_state,
            },
        )
    }
}

/// What an owner and a replica both hold of a session.
struct Held<'a> {
    secret: &'a Secret,
    epoch: Epoch,
    up: &'a mut ByteQueue,
    up_fin: Option<Pos>,
    down: &'a mut ByteQueue,
    down_snap: Pos,
    down_fin: Option<Pos>,
    app_state: &'a Bytes,
}

/// The image of what is held: up bytes from the snapshot on (read log +
/// receive buffer), down bytes `[snd_una, snd_snap)` only — later writes
/// are regenerated by the resumed application.
fn image_of(session: SessionId, h: Held<'_>) -> SessionImage {
    let base = h.down.start();
    SessionImage {
        session,
        secret: h.secret.clone(),
        epoch: h.epoch,
        up_snap: h.up.start(),
        up_data: h.up.slice(h.up.start(), h.up.end()),
        up_fin: h.up_fin,
        down_snap: h.down_snap,
        down_base: base,
        down_data: h.down.slice(base, h.down_snap.max(base)),
        down_fin: h.down_fin,
        app_state: h.app_state.clone(),
    }
}

#[derive(Debug)]
struct Replica {
    owner: ServerId,
    secret: Secret,
    epoch: Epoch,
    /// Epochs below this were handed out by the owner.
    next_epoch: Epoch,
    up: ByteQueue,
    up_fin: Option<Pos>,
    down: ByteQueue,
    down_snap: Pos,
    down_fin: Option<Pos>,
    app_state: Bytes,
    /// The owner has been unreachable since then; the replica expires after
    /// the orphan timeout unless the owner speaks again.
    stale_since: Option<Instant>,
}

impl Replica {
    fn from_image(owner: ServerId, image: SessionImage) -> Self {
        let mut up = ByteQueue::new(image.up_snap);
        up.push(image.up_data);
        let mut down = ByteQueue::new(image.down_base);
        down.push(image.down_data);
        Self {
            owner,
            secret: image.secret,
            epoch: image.epoch,
            next_epoch: image.epoch + 1,
            up,
            up_fin: image.up_fin,
            down,
            down_snap: image.down_snap,
            down_fin: image.down_fin,
            app_state: image.app_state,
            stale_since: None,
        }
    }

    fn image(&mut self, session: SessionId) -> SessionImage {
        image_of(
            session,
            Held {
                secret: &self.secret,
                epoch: self.epoch,
                up: &mut self.up,
                up_fin: self.up_fin,
                down: &mut self.down,
                down_snap: self.down_snap,
                down_fin: self.down_fin,
                app_state: &self.app_state,
            },
        )
    }

    /// Applies one step; `false` when it does not follow from what is held
    /// (a gap: the owner must resend the whole state).
    fn apply(&mut self, update: ReplicaUpdate) -> bool {
        match update {
            ReplicaUpdate::Full { .. } => unreachable!("handled by the caller"),
            ReplicaUpdate::Up { pos, data } => {
                if pos > self.up.end() {
                    return false;
                }
                let skip = (self.up.end() - pos).min(data.len() as u64) as usize;
                self.up.push(data.slice(skip..));
            }
            ReplicaUpdate::UpFin { pos } => {
                if pos != self.up.end() {
                    return false;
                }
                self.up_fin = Some(pos);
            }
            ReplicaUpdate::Snapshot {
                up_snap,
                down_snap,
                down_fin,
                app_state,
                down_pos,
                down_data,
            } => {
                if up_snap > self.up.end() {
                    return false;
                }
                self.up.drop_to(up_snap);
                if down_pos > self.down.end() {
                    // Everything below `down_pos` was acknowledged.
                    self.down = ByteQueue::new(down_pos);
                }
                let skip = (self.down.end() - down_pos).min(down_data.len() as u64) as usize;
                self.down.push(down_data.slice(skip..));
                if self.down.start() <= down_snap && self.down.end() < down_snap {
                    return false;
                }
                self.down_snap = down_snap;
                self.down_fin = down_fin;
                self.app_state = app_state;
            }
            ReplicaUpdate::Acked { down } => self.down.drop_to(down),
            ReplicaUpdate::Epoch { epoch, next } => {
                self.epoch = epoch;
                self.next_epoch = self.next_epoch.max(next).max(epoch + 1);
            }
        }
        true
    }
}

/// Reject text for a session that completed (MTCP's INVALID_STATE for
/// LAST_ACK / TIME_WAIT): a client that had closed takes it as completion.
pub const FINISHED_TEXT: &str = "session finished";

/// One server's protocol state: its sessions, incarnations, migrations and
/// replicas. See the module documentation for how to drive it.
pub struct Server {
    cfg: ServerConfig,
    rng: Box<dyn RngCore + Send>,
    incs: HashMap<IncarnationId, Inc>,
    ready: VecDeque<IncarnationId>,
    sessions: HashMap<SessionId, Session>,
    handles: HashMap<SessionHandle, SessionId>,
    /// Handles whose session finished or was dropped, until released.
    ended: HashMap<SessionHandle, SessionError>,
    pending: HashMap<u64, PendingMigration>,
    replicas: HashMap<SessionId, Replica>,
    /// Recently finished sessions and when to forget them: a late Migrate
    /// (the client lost the final Ack) learns the session completed.
    tombstones: VecDeque<(Instant, SessionId)>,
    ctrl_out: VecDeque<(ServerId, ControlMessage)>,
    events: VecDeque<ServerEvent>,
    /// The latest time seen in a call (for deadlines set without one).
    last_now: Instant,
    /// Where frame headers are encoded (see `take_scratch`).
    scratch: BytesMut,
    next_inc: u64,
    next_req: u64,
    next_handle: u64,
    stats: ServerStats,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("id", &self.cfg.id)
            .field("sessions", &self.sessions.len())
            .field("incarnations", &self.incs.len())
            .field("replicas", &self.replicas.len())
            .finish()
    }
}

impl Server {
    /// A server with no sessions. `rng` makes session ids and secrets: give
    /// it a cryptographically secure generator outside of tests.
    pub fn new(cfg: ServerConfig, rng: Box<dyn RngCore + Send>, now: Instant) -> Self {
        Self {
            last_now: now,
            scratch: BytesMut::new(),
            cfg,
            rng,
            incs: HashMap::new(),
            ready: VecDeque::new(),
            sessions: HashMap::new(),
            handles: HashMap::new(),
            ended: HashMap::new(),
            pending: HashMap::new(),
            replicas: HashMap::new(),
            tombstones: VecDeque::new(),
            ctrl_out: VecDeque::new(),
            events: VecDeque::new(),
            next_inc: 0,
            next_req: 0,
            next_handle: 0,
            stats: ServerStats::default(),
        }
    }

    /// This server's id.
    pub fn id(&self) -> &ServerId {
        &self.cfg.id
    }

    /// What the server has done so far.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Sessions this server owns (not frozen), with their epochs.
    pub fn owned_sessions(&self) -> impl Iterator<Item = (SessionId, Epoch)> + '_ {
        self.sessions
            .iter()
            .filter(|(_, s)| s.frozen.is_none())
            .map(|(id, s)| (*id, s.epoch))
    }

    /// Sessions held here, including any frozen mid-migration.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Whether the session is held here (owned, or frozen mid-migration).
    pub fn holds(&self, session: SessionId) -> bool {
        self.sessions.contains_key(&session)
    }

    /// What an operator sees of the sessions this server owns.
    pub fn session_infos(&self) -> Vec<SessionInfo> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.frozen.is_none())
            .map(|(id, s)| SessionInfo {
                session: *id,
                epoch: s.epoch,
                inc: s.inc,
                since: s.since,
                up: s.rcv_nxt(),
                down: s.app_write,
            })
            .collect()
    }

    /// Whether `session`, owned here, would survive this server's crash: its
    /// backup is connected and holds the whole state, including every up
    /// byte acknowledged to the client (DESIGN.md 3.6).
    pub fn crash_tolerant(&self, session: SessionId) -> bool {
        self.sessions.get(&session).is_some_and(|s| {
            s.backup.as_ref().is_some_and(|b| {
                b.live && b.acked_epoch == Some(s.epoch) && b.held_up >= s.ack_sent
            })
        })
    }

    /// The session an incarnation carries, if it is attached to one.
    pub fn incarnation_session(&self, inc: IncarnationId) -> Option<SessionId> {
        match self.incs.get(&inc)?.phase {
            IncPhase::Attached(sid) => Some(sid),
            _ => None,
        }
    }

    /// Whether this server holds a replica of `session`.
    pub fn has_replica(&self, session: SessionId) -> bool {
        self.replicas.contains_key(&session)
    }

    /// The session a handle refers to, while the handle is current.
    pub fn session_of(&self, handle: SessionHandle) -> Option<SessionId> {
        self.handles.get(&handle).copied()
    }

    // ----- incarnations ---------------------------------------------------

    /// Registers a newly accepted client connection.
    pub fn new_incarnation(&mut self, now: Instant) -> IncarnationId {
        self.last_now = self.last_now.max(now);
        self.next_inc += 1;
        let id = IncarnationId(self.next_inc);
        self.incs.insert(
            id,
            Inc {
                phase: IncPhase::Preamble,
                rx: BytesMut::new(),
                out: VecDeque::new(),
                queued: false,
                opened: now,
                migrating: None,
            },
        );
        id
    }

    /// Bytes read from a client connection.
    pub fn handle_input(&mut self, now: Instant, inc: IncarnationId, data: &[u8]) {
        self.last_now = self.last_now.max(now);
        let Some(i) = self.incs.get_mut(&inc) else {
            return;
        };
        if matches!(i.phase, IncPhase::Closing) {
            return;
        }
        i.rx.extend_from_slice(data);
        if matches!(i.phase, IncPhase::Pending(_)) && i.rx.len() > self.cfg.limits.max_frame {
            // Nothing is decoded while the state is on its way, and a client
            // sends nothing before Resumed: do not buffer without bound.
            let e = ProtocolError::Unexpected {
                frame: "input",
                why: "sent before Resumed",
            };
            return self.close_inc(inc, e.to_string());
        }
        if let Err(e) = self.process_input(now, inc) {
            self.close_inc(inc, e.to_string());
        }
    }

    fn process_input(&mut self, now: Instant, inc: IncarnationId) -> Result<(), ProtocolError> {
        let max_frame = self.cfg.limits.max_frame;
        loop {
            let Some(i) = self.incs.get_mut(&inc) else {
                return Ok(());
            };
            match i.phase {
                IncPhase::Preamble => match check_preamble(&i.rx) {
                    Ok(PreambleCheck::NeedMore) => return Ok(()),
                    Ok(PreambleCheck::Migratory) => {
                        let _ = i.rx.split_to(PREAMBLE.len());
                        i.phase = IncPhase::AwaitFirst;
                    }
                    Err(DecodeError::NotMigratory) => {
                        let i = self.incs.remove(&inc).expect("present");
                        self.events.push_back(ServerEvent::PlainClient {
                            inc,
                            initial: i.rx.freeze(),
                        });
                        return Ok(());
                    }
                    Err(e) => return Err(e.into()),
                },
                // Nothing more is read until the state arrives: the client
                // sends nothing before Resumed.
                IncPhase::Pending(_) | IncPhase::Closing => return Ok(()),
                IncPhase::AwaitFirst => {
                    let Some(frame) = Frame::decode(&mut i.rx, max_frame)? else {
                        return Ok(());
                    };
                    match frame {
                        Frame::Hello { window } => self.on_hello(inc, window),
                        Frame::Migrate(request) => {
                            // Challenge first: a captured Migrate cannot be
                            // replayed against a fresh nonce.
                            let mut nonce = [0u8; 32];
                            self.rng.fill_bytes(&mut nonce);
                            let i = self.incs.get_mut(&inc).expect("present");
                            i.phase = IncPhase::AwaitProof(Box::new((request, nonce)));
                            self.queue_frame(inc, Frame::Challenge { nonce });
                        }
                        f => {
                            return Err(ProtocolError::Unexpected {
                                frame: f.name(),
                                why: "a connection must start with Hello or Migrate",
                            })
                        }
                    }
                }
                IncPhase::AwaitProof(_) => {
                    let Some(frame) = Frame::decode(&mut i.rx, max_frame)? else {
                        return Ok(());
                    };
                    let Frame::Proof { mac } = frame else {
                        return Err(ProtocolError::Unexpected {
                            frame: frame.name(),
                            why: "a challenged Migrate must be followed by its Proof",
                        });
                    };
                    let IncPhase::AwaitProof(b) =
                        std::mem::replace(&mut i.phase, IncPhase::AwaitFirst)
                    else {
                        unreachable!("matched above")
                    };
                    let (request, nonce) = *b;
                    self.on_migrate(
                        now,
                        inc,
                        Migrate {
                            request,
                            nonce,
                            mac,
                        },
                    );
                }
                IncPhase::Attached(sid) => {
                    let Some(frame) = Frame::decode(&mut i.rx, max_frame)? else {
                        return Ok(());
                    };
                    self.on_session_frame(sid, inc, frame)?;
                }
            }
        }
    }

    /// The client connection ended (EOF, reset or error).
    pub fn handle_incarnation_closed(&mut self, now: Instant, inc: IncarnationId) {
        let Some(i) = self.incs.remove(&inc) else {
            return;
        };
        match i.phase {
            IncPhase::Attached(sid) => {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    if s.inc == Some(inc) {
                        s.inc = None;
                        s.orphan_since = Some(now);
                    }
                }
            }
            IncPhase::Pending(req) => {
                // The state may still come; without a client it is not
                // installed, so the origin keeps it (no StateAck).
                if let Some(p) = self.pending.get_mut(&req) {
                    p.inc = None;
                }
            }
            _ => {}
        }
    }

    fn close_inc(&mut self, inc: IncarnationId, reason: String) {
        if let Some(i) = self.incs.get_mut(&inc) {
            if let IncPhase::Attached(sid) = i.phase {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    if s.inc == Some(inc) {
                        s.inc = None;
                        // Without a client the session expires unless one
                        // comes back (no connection can pin it).
                        s.orphan_since = Some(self.last_now);
                    }
                }
            }
            i.phase = IncPhase::Closing;
            self.events
                .push_back(ServerEvent::CloseIncarnation { inc, reason });
        }
    }

    fn queue_frame(&mut self, inc: IncarnationId, frame: Frame) {
        if let Some(i) = self.incs.get_mut(&inc) {
            i.out.push_back(frame);
        }
        self.mark_ready(inc);
    }

    fn mark_ready(&mut self, inc: IncarnationId) {
        if let Some(i) = self.incs.get_mut(&inc) {
            if !i.queued {
                i.queued = true;
                self.ready.push_back(inc);
            }
        }
    }

    fn reject(&mut self, inc: IncarnationId, reason: RejectReason, text: impl Into<String>) {
        let text = text.into();
        self.stats.rejects += 1;
        self.report_in(inc, MigrationOutcome::Rejected(reason), 0, 0);
        self.queue_frame(
            inc,
            Frame::Reject {
                reason,
                text: text.clone(),
            },
        );
        self.close_inc(inc, format!("rejected: {reason}: {text}"));
    }

    /// Reports the end of the migration `inc` carries, if it carries one.
    fn report_in(
        &mut self,
        inc: IncarnationId,
        outcome: MigrationOutcome,
        replayed: u64,
        discarded: u64,
    ) {
        let now = self.last_now;
        let Some(i) = self.incs.get_mut(&inc) else {
            return;
        };
        let Some(req) = i.migrating.take() else {
            return;
        };
        let duration = now.saturating_duration_since(i.opened);
        self.events
            .push_back(ServerEvent::Migration(MigrationReport {
                session: req.session,
                direction: Direction::In,
                peer: req.origin,
                cause: req.cause,
                outcome,
                duration,
                replayed,
                discarded,
            }));
    }

    // ----- starting and resuming sessions --------------------------------

    fn new_handle(&mut self, sid: SessionId) -> SessionHandle {
        self.next_handle += 1;
        let h = SessionHandle(self.next_handle);
        self.handles.insert(h, sid);
        h
    }

    fn on_hello(&mut self, inc: IncarnationId, window: u64) {
        if self.sessions.len() >= self.cfg.max_sessions {
            return self.reject(inc, RejectReason::Busy, "session limit reached");
        }
        let sid =
            SessionId(u128::from(self.rng.next_u64()) << 64 | u128::from(self.rng.next_u64()));
        let mut secret = [0u8; 32];
        self.rng.fill_bytes(&mut secret);
        let image = SessionImage {
            session: sid,
            secret: Secret(secret),
            epoch: 0,
            up_snap: 0,
            up_data: Bytes::new(),
            up_fin: None,
            down_snap: 0,
            down_base: 0,
            down_data: Bytes::new(),
            down_fin: None,
            app_state: Bytes::new(),
        };
        self.stats.sessions_new += 1;
        self.install(inc, image, 0, Start::Hello { window });
    }

    /// A client asks to resume a session here (MTCP 4.2.3, fig 4.8).
    fn on_migrate(&mut self, now: Instant, inc: IncarnationId, m: Migrate) {
        if let Some(i) = self.incs.get_mut(&inc) {
            i.migrating = Some(m.request.clone());
        }
        // Served here when the client names us, or when we hold the session
        // live at an epoch the client knows (we resumed it, but the client
        // never saw our Resumed and still names the previous owner).
        let held = self.sessions.get(&m.request.session).is_some_and(|s| {
            s.frozen.is_none()
                && (s.epoch == m.request.epoch || s.prev_epoch == Some(m.request.epoch))
        });
        if m.request.origin == self.cfg.id || held {
            return self.resume_local(inc, m);
        }
        let known = self.cfg.alternates.iter().any(|a| a.id == m.request.origin)
            || self
                .replicas
                .get(&m.request.session)
                .is_some_and(|r| r.owner == m.request.origin);
        if !known {
            return self.reject(inc, RejectReason::NotFound, "unknown origin server");
        }
        if self.sessions.len() + self.pending.len() >= self.cfg.max_sessions {
            return self.reject(inc, RejectReason::Busy, "session limit reached");
        }
        // Lazy pull: ask the origin (step 4 of 4.2.3).
        self.next_req += 1;
        let req = self.next_req;
        self.ctrl_out.push_back((
            m.request.origin.clone(),
            ControlMessage::StateRequest {
                req,
                migrate: m.clone(),
            },
        ));
        self.pending.insert(
            req,
            PendingMigration {
                inc: Some(inc),
                migrate: m,
                deadline: now + self.cfg.timeouts.state_request,
            },
        );
        if let Some(i) = self.incs.get_mut(&inc) {
            i.phase = IncPhase::Pending(req);
        }
    }

    /// Checks an authenticated Migrate against the holder's secret and
    /// epoch (the nonce was fresh: this pool's destinations choose it) and,
    /// at an owner, that no newer attempt of the client was served.
    fn check_migrate(
        secret: &Secret,
        epochs: (Epoch, Option<Epoch>),
        last_attempt: Option<u64>,
        m: &Migrate,
    ) -> Result<(), (RejectReason, &'static str)> {
        if !verify_migrate(secret, m) {
            return Err((RejectReason::AuthFailed, "bad proof"));
        }
        if m.request.epoch != epochs.0 && Some(m.request.epoch) != epochs.1 {
            return Err((RejectReason::AuthFailed, "stale epoch"));
        }
        if last_attempt.is_some_and(|a| m.request.attempt <= a) {
            return Err((RejectReason::AuthFailed, "superseded attempt"));
        }
        Ok(())
    }

    /// The client comes back to the server that owns (or froze) its session.
    fn resume_local(&mut self, inc: IncarnationId, m: Migrate) {
        let Some(s) = self.sessions.get_mut(&m.request.session) else {
            if self.is_tombstone(m.request.session) {
                return self.reject(inc, RejectReason::InvalidState, FINISHED_TEXT);
            }
            return self.reject(inc, RejectReason::NotFound, "no such session here");
        };
        if let Err((reason, text)) =
            Self::check_migrate(&s.secret, (s.epoch, s.prev_epoch), Some(s.last_attempt), &m)
        {
            return self.reject(inc, reason, text);
        }
        if !s.migratable() {
            return self.reject(inc, RejectReason::InvalidState, FINISHED_TEXT);
        }
        if m.request.down > s.down.end() || m.request.down < s.down.start() {
            return self.reject(
                inc,
                RejectReason::InvalidState,
                "client position outside the stream",
            );
        }
        s.last_attempt = m.request.attempt;
        if s.frozen.is_some() {
            // Handed out but not confirmed anywhere: resume from the frozen
            // state as a new arrival (the old application instance stopped).
            let new_epoch = s.next_epoch;
            let image = s.image(m.request.session);
            self.install_image(inc, image, new_epoch, &m, None, MigrationOutcome::Moved);
            return;
        }
        // Still live here: only the incarnation changes; owner and epoch
        // stay and the application carries on (requests other destinations
        // made for older attempts are refused as superseded). Resend from
        // the client's position.
        let old = s.inc.replace(inc);
        s.orphan_since = None;
        s.snd_nxt = m.request.down;
        s.down_limit = m.request.down.saturating_add(m.request.window);
        s.fin_sent = false;
        s.fin_acked |= m.request.down_fin;
        s.ack_due = true;
        // The client resends from what it may drop (the commit point);
        // bytes this server already holds are skipped as they come again.
        s.rx_pos = s.commit_point();
        // The window is what the enforced limit leaves above the resend point.
        s.limit_sent = s.limit_sent.max(s.up_limit(&self.cfg.limits));
        let resumed = Frame::Resumed {
            up: s.rx_pos,
            up_fin: s.up_fin.is_some() && s.rx_pos == s.rcv_nxt(),
            down: m.request.down,
            epoch: s.epoch,
            server: self.cfg.id.clone(),
            alternates: self.cfg.alternates.clone(),
            window: s.limit_sent - s.rx_pos,
        };
        if let Some(i) = self.incs.get_mut(&inc) {
            // The client came back to its owner: not a migration.
            i.migrating = None;
            i.phase = IncPhase::Attached(m.request.session);
        }
        self.queue_frame(inc, resumed);
        if let Some(old) = old {
            self.close_inc(old, "client moved to a new incarnation".into());
        }
    }

    /// Installs a session from an image for a client at `m.request.down` (MTCP
    /// 4.2.3, "Once the state reply reaches S2").
    fn install_image(
        &mut self,
        inc: IncarnationId,
        image: SessionImage,
        new_epoch: Epoch,
        m: &Migrate,
        owed_ack: Option<(ServerId, u64)>,
        outcome: MigrationOutcome,
    ) {
        let replayed = image.up_data.len() as u64;
        let (image, rp) = image.trim_for(m.request.down);
        self.stats.bytes_replayed += replayed;
        self.stats.bytes_discarded += rp.discard;
        self.report_in(inc, outcome, replayed, rp.discard);
        self.install(
            inc,
            image,
            new_epoch,
            Start::Resume {
                request: m.request.clone(),
                owed_ack,
            },
        );
    }

    fn install(&mut self, inc: IncarnationId, image: SessionImage, epoch: Epoch, start: Start) {
        let sid = image.session;
        // Owning the session makes any replica of it here stale.
        self.replicas.remove(&sid);
        if let Some(old) = self.sessions.remove(&sid) {
            self.retire(old.handle, ServerEvent::MigratedAway(old.handle));
            if let Some(old_inc) = old.inc {
                self.close_inc(old_inc, "session re-installed".into());
            }
        }
        let handle = self.new_handle(sid);
        let (down_limit, down_fin_acked, attempt, owed_ack, prev_epoch, arrival) = match start {
            Start::Hello { window } => (window, false, 0, None, None, Arrival::New),
            Start::Resume { request, owed_ack } => (
                request.down.saturating_add(request.window),
                request.down_fin,
                request.attempt,
                owed_ack,
                Some(request.epoch),
                Arrival::Migrated {
                    state: image.app_state.clone(),
                },
            ),
        };
        let rp = resume_point(image.down_base, image.down_snap, image.down_base);
        let mut up = ByteQueue::new(image.up_snap);
        up.push(image.up_data);
        let mut down = ByteQueue::new(rp.snd_max_seen);
        down.push(image.down_data);
        let limit = image.up_snap + self.cfg.limits.recv_window;
        let mut s = Session {
            secret: image.secret,
            epoch,
            next_epoch: epoch + 1,
            last_attempt: attempt,
            handle,
            inc: Some(inc),
            since: self.last_now,
            orphan_since: None,
            frozen: None,
            owed_ack,
            prev_epoch,
            up,
            rx_pos: 0,
            app_read: image.up_snap,
            up_fin: image.up_fin,
            ack_sent: 0,
            limit_sent: limit,
            fin_ack_sent: false,
            ack_due: false,
            down,
            snd_nxt: rp.snd_max_seen,
            app_write: image.down_snap,
            discard: rp.discard,
            down_snap: image.down_snap,
            down_limit,
            down_fin: image.down_fin,
            fin_sent: false,
            fin_acked: down_fin_acked,
            snap_down_fin: image.down_fin,
            app_state: image.app_state,
            backup: None,
            app_gone: false,
        };
        s.ack_sent = s.rcv_nxt();
        s.rx_pos = s.rcv_nxt();
        s.fin_ack_sent = s.up_fin.is_some();
        let first = if matches!(arrival, Arrival::New) {
            Frame::Welcome {
                session: sid,
                secret: s.secret.clone(),
                epoch,
                server: self.cfg.id.clone(),
                alternates: self.cfg.alternates.clone(),
                window: self.cfg.limits.recv_window,
            }
        } else {
            Frame::Resumed {
                up: s.rcv_nxt(),
                up_fin: s.up_fin.is_some(),
                down: s.snd_nxt,
                epoch,
                server: self.cfg.id.clone(),
                alternates: self.cfg.alternates.clone(),
                window: limit.saturating_sub(s.rcv_nxt()),
            }
        };
        if let Some(b) = self.cfg.backup.clone().filter(|b| *b != self.cfg.id) {
            let full = s.image(sid);
            s.backup = Some(Backup {
                server: b.clone(),
                live: true,
                held_up: s.up.start(),
                down_sent: s.down_snap,
                acked_sent: s.down.start(),
                acked_epoch: None,
            });
            self.ctrl_out.push_back((
                b,
                ControlMessage::Replicate {
                    session: sid,
                    update: ReplicaUpdate::Full { image: full },
                },
            ));
        }
        self.sessions.insert(sid, s);
        if let Some(i) = self.incs.get_mut(&inc) {
            i.phase = IncPhase::Attached(sid);
        }
        self.queue_frame(inc, first);
        self.events.push_back(ServerEvent::Accepted {
            handle,
            session: sid,
            arrival,
        });
        self.events.push_back(ServerEvent::Readable(handle));
        self.events.push_back(ServerEvent::Writable(handle));
    }

    fn retire(&mut self, handle: SessionHandle, event: ServerEvent) {
        if self.handles.remove(&handle).is_some() {
            match event {
                ServerEvent::Finished(_) => {
                    self.ended.insert(handle, SessionError::Closed);
                }
                ServerEvent::Dropped(_) => {
                    self.ended.insert(
                        handle,
                        SessionError::NoServerLeft {
                            last: "the client never came back".into(),
                        },
                    );
                }
                _ => {}
            }
            self.events.push_back(event);
        }
    }

    /// The application is done with `handle` (it dropped its session).
    /// A session still live here ends gracefully, as a TCP socket closed
    /// by its application: the down direction is closed if it was not,
    /// unread and further up bytes are discarded, and the session finishes
    /// once the client closes too. Calls on a released handle fail with
    /// [`SessionError::Migrated`].
    pub fn release(&mut self, handle: SessionHandle) {
        self.ended.remove(&handle);
        let Ok((sid, s)) = self.live(handle) else {
            return;
        };
        s.app_gone = true;
        if s.down_fin.is_none() {
            s.app_write += s.discard;
            s.discard = 0;
            s.down_fin = Some(s.app_write);
        }
        s.discard_input();
        let inc = s.inc;
        self.handles.remove(&handle);
        if let Some(inc) = inc {
            self.mark_ready(inc);
        }
        self.maybe_finish(sid);
    }

    // ----- frames from the client -----------------------------------------

    fn on_session_frame(
        &mut self,
        sid: SessionId,
        inc: IncarnationId,
        frame: Frame,
    ) -> Result<(), ProtocolError> {
        let limits = self.cfg.limits.clone();
        let Some(s) = self.sessions.get_mut(&sid) else {
            return Ok(());
        };
        if s.frozen.is_some() || s.inc != Some(inc) {
            // MTCP's BLACKHOLE: input on an abandoned incarnation is ignored.
            return Ok(());
        }
        s.prev_epoch = None;
        if let Some((origin, req)) = s.owed_ack.take() {
            // The client confirmed this incarnation: the origin may forget.
            self.ctrl_out
                .push_back((origin, ControlMessage::StateAck { req }));
        }
        let mut replicate = None;
        match frame {
            Frame::Data(mut data) => {
                let end = s.rx_pos + data.len() as u64;
                if s.up_fin.is_some_and(|f| end > f) {
                    return Err(ProtocolError::Position("data after Close"));
                }
                if end > s.limit_sent.max(s.rcv_nxt()) {
                    return Err(ProtocolError::Position("data beyond the advertised window"));
                }
                // Skip what a resend overlaps with bytes already held.
                let skip = s.rcv_nxt().saturating_sub(s.rx_pos).min(data.len() as u64);
                s.rx_pos = end;
                let _ = data.split_to(skip as usize);
                if data.is_empty() {
                    return Ok(());
                }
                if s.backup.as_ref().is_some_and(|b| b.live) {
                    replicate = Some(ReplicaUpdate::Up {
                        pos: s.rcv_nxt(),
                        data: data.clone(),
                    });
                }
                s.up.push(data);
                if s.app_gone {
                    s.discard_input();
                }
                s.ack_due = true;
                self.events.push_back(ServerEvent::Readable(s.handle));
            }
            Frame::Ack { pos, limit, fin } => {
                if pos > s.snd_nxt {
                    return Err(ProtocolError::Position("ack beyond the data sent"));
                }
                // The client may confirm a Close it got from an earlier
                // server (its Migrate said so: `fin_acked`).
                if fin && !s.fin_sent && !s.fin_acked {
                    return Err(ProtocolError::Position("ack of a Close not sent"));
                }
                let freed = pos > s.down.start();
                s.down.drop_to(pos);
                s.down_limit = s.down_limit.max(limit);
                s.fin_acked |= fin;
                if let Some(b) = s.backup.as_mut().filter(|b| b.live) {
                    if s.down.start() >= b.acked_sent + limits.send_buffer / 4 {
                        b.acked_sent = s.down.start();
                        replicate = Some(ReplicaUpdate::Acked { down: b.acked_sent });
                    }
                }
                if freed {
                    self.events.push_back(ServerEvent::Writable(s.handle));
                }
                if fin && s.finished() {
                    self.maybe_finish(sid);
                    return Ok(());
                }
            }
            Frame::Close { pos } => {
                if pos != s.rx_pos || pos != s.rcv_nxt() || s.up_fin.is_some_and(|f| f != pos) {
                    return Err(ProtocolError::Position("Close not at the end of the data"));
                }
                if s.up_fin.is_none() {
                    s.up_fin = Some(pos);
                    if s.backup.as_ref().is_some_and(|b| b.live) {
                        replicate = Some(ReplicaUpdate::UpFin { pos });
                    }
                }
                s.ack_due = true;
                self.events.push_back(ServerEvent::Readable(s.handle));
            }
            Frame::Ping { nonce } => {
                self.queue_frame(inc, Frame::Pong { nonce });
                return Ok(());
            }
            Frame::Pong { .. } => return Ok(()),
            f => {
                return Err(ProtocolError::Unexpected {
                    frame: f.name(),
                    why: "not allowed on an established incarnation",
                })
            }
        }
        if let Some(update) = replicate {
            let b = s.backup.as_ref().expect("checked").server.clone();
            self.ctrl_out.push_back((
                b,
                ControlMessage::Replicate {
                    session: sid,
                    update,
                },
            ));
        }
        self.mark_ready(inc);
        Ok(())
    }

    // ----- the application's calls ------------------------------------------

    fn live(&mut self, handle: SessionHandle) -> Result<(SessionId, &mut Session), AppError> {
        let Some(&sid) = self.handles.get(&handle) else {
            let e = self
                .ended
                .get(&handle)
                .cloned()
                .unwrap_or(SessionError::Migrated);
            return Err(AppError::Session(e));
        };
        match self.sessions.get_mut(&sid) {
            Some(s) if s.handle == handle && s.frozen.is_none() => Ok((sid, s)),
            _ => Err(AppError::Session(SessionError::Migrated)),
        }
    }

    /// Reads up-stream bytes: `Ok(Some(n))` with `n > 0` bytes, `Ok(Some(0))`
    /// at the end of the stream, `Ok(None)` when nothing is there yet (wait
    /// for [`ServerEvent::Readable`]). Read bytes stay in the read log until
    /// the next [`Server::snapshot`].
    pub fn read(
        &mut self,
        handle: SessionHandle,
        buf: &mut [u8],
    ) -> Result<Option<usize>, AppError> {
        if self.ended.get(&handle) == Some(&SessionError::Closed) {
            // A finished session read everything: only the end remains.
            return Ok(Some(0));
        }
        let (sid, s) = self.live(handle)?;
        if s.app_read == s.rcv_nxt() {
            return Ok(if s.up_fin == Some(s.app_read) {
                Some(0)
            } else {
                None
            });
        }
        let n = s.up.copy_to(s.app_read, buf);
        s.app_read += n as u64;
        if s.up_fin == Some(s.app_read) {
            self.maybe_finish(sid);
        }
        Ok(Some(n))
    }

    /// Writes down-stream bytes; returns how many were taken (0 when the
    /// send buffer is full: wait for [`ServerEvent::Writable`]). Bytes the
    /// client already has from before a migration are counted and dropped.
    pub fn write(&mut self, handle: SessionHandle, data: &[u8]) -> Result<usize, AppError> {
        let send_buffer = self.cfg.limits.send_buffer;
        let (_, s) = self.live(handle)?;
        if s.down_fin.is_some() {
            return Err(AppError::WriteAfterClose);
        }
        let dropped = (s.discard.min(data.len() as u64)) as usize;
        s.discard -= dropped as u64;
        let room = send_buffer.saturating_sub(s.down.len()) as usize;
        let take = (data.len() - dropped).min(room);
        s.down.push_slice(&data[dropped..dropped + take]);
        s.app_write += (dropped + take) as u64;
        if let Some(inc) = s.inc.filter(|_| take > 0) {
            self.mark_ready(inc);
        }
        Ok(dropped + take)
    }

    /// Closes the down direction after the bytes written so far.
    pub fn close_write(&mut self, handle: SessionHandle) -> Result<(), AppError> {
        let (_, s) = self.live(handle)?;
        if s.down_fin.is_none() {
            // A deterministic application never closes before the bytes
            // the client already has; if it does, the stream ends there.
            s.app_write += s.discard;
            s.discard = 0;
            s.down_fin = Some(s.app_write);
        }
        if let Some(inc) = s.inc {
            self.mark_ready(inc);
        }
        Ok(())
    }

    /// MTCP's `set_state` / `export_state`: records `state` as the restart
    /// point. The read log is dropped and the write position remembered: a
    /// server resuming from `state` will read from here and write from here.
    pub fn snapshot(&mut self, handle: SessionHandle, state: &[u8]) -> Result<(), AppError> {
        let max_state = self.cfg.max_state;
        let step = self.cfg.limits.window_step();
        let window = self.cfg.limits.recv_window;
        if state.len() > max_state {
            return Err(AppError::StateTooLarge {
                len: state.len(),
                max: max_state,
            });
        }
        let (sid, s) = self.live(handle)?;
        s.up.drop_to(s.app_read);
        s.down_snap = s.app_write;
        s.snap_down_fin = s.down_fin.filter(|f| *f == s.app_write);
        s.app_state = Bytes::copy_from_slice(state);
        let limit = s.up.start() + window;
        if limit >= s.limit_sent + step || (limit > s.limit_sent && s.rcv_nxt() == s.limit_sent) {
            s.ack_due = true;
            if let Some(inc) = s.inc {
                self.mark_ready(inc);
            }
        }
        let s = self.sessions.get_mut(&sid).expect("live");
        if let Some(b) = s.backup.as_mut().filter(|b| b.live) {
            let from = b.down_sent.max(s.down.start());
            let down_data = s.down.slice(from, s.down_snap);
            b.down_sent = b.down_sent.max(s.down_snap);
            let server = b.server.clone();
            let update = ReplicaUpdate::Snapshot {
                up_snap: s.up.start(),
                down_snap: s.down_snap,
                down_fin: s.snap_down_fin,
                app_state: s.app_state.clone(),
                down_pos: from.min(s.down_snap),
                down_data,
            };
            self.ctrl_out.push_back((
                server,
                ControlMessage::Replicate {
                    session: sid,
                    update,
                },
            ));
        }
        Ok(())
    }

    /// Server push (MTCP 3.2.1 case a): asks the client to migrate, to
    /// `dest` if given. The client initiates the migration.
    pub fn migrate_to(
        &mut self,
        handle: SessionHandle,
        dest: Option<ServerId>,
    ) -> Result<(), AppError> {
        let (_, s) = self.live(handle)?;
        if let Some(inc) = s.inc {
            self.queue_frame(inc, Frame::Trigger { dest });
        }
        Ok(())
    }

    /// Server push by session id (e.g. for an operator): sends the
    /// session's client a Trigger, towards `dest` if given. `false` when the
    /// session is not live here or its client is not connected right now.
    pub fn trigger(&mut self, session: SessionId, dest: Option<ServerId>) -> bool {
        let inc = self
            .sessions
            .get(&session)
            .filter(|s| s.frozen.is_none() && !s.app_gone)
            .and_then(|s| s.inc);
        if let Some(inc) = inc {
            self.queue_frame(inc, Frame::Trigger { dest });
        }
        inc.is_some()
    }

    /// Destination pull (MTCP 3.2.1 case b): asks `owner` to send the
    /// session's client a Trigger towards this server.
    pub fn pull(&mut self, session: SessionId, owner: ServerId) {
        let dest = self.cfg.id.clone();
        self.ctrl_out
            .push_back((owner, ControlMessage::TriggerRequest { session, dest }));
    }

    /// Asks `owner` to send `session`'s client to `dest` (third-party
    /// trigger, e.g. an operator or a load balancer).
    pub fn request_trigger(&mut self, session: SessionId, owner: ServerId, dest: ServerId) {
        self.ctrl_out
            .push_back((owner, ControlMessage::TriggerRequest { session, dest }));
    }

    /// Number of up bytes the application can read now.
    pub fn readable_bytes(&self, handle: SessionHandle) -> u64 {
        self.handles
            .get(&handle)
            .and_then(|sid| self.sessions.get(sid))
            .map_or(0, |s| s.rcv_nxt() - s.app_read)
    }

    // ----- the control plane ------------------------------------------------

    /// A message from an authenticated peer.
    pub fn handle_control(&mut self, now: Instant, from: &ServerId, msg: ControlMessage) {
        self.last_now = self.last_now.max(now);
        match msg {
            ControlMessage::StateRequest { req, migrate } => {
                self.on_state_request(now, from, req, migrate)
            }
            ControlMessage::StateReply {
                req,
                new_epoch,
                image,
            } => self.on_state_reply(from, req, new_epoch, image),
            ControlMessage::StateReject { req, reason, text } => {
                if let Some(p) = self.pending.remove(&req) {
                    self.fallback(p, reason, text);
                }
            }
            ControlMessage::StateAck { req } => self.on_state_ack(from, req),
            ControlMessage::Replicate { session, update } => {
                self.on_replicate(from, session, update)
            }
            ControlMessage::ReplicateAck { session, up, epoch } => {
                if let Some(s) = self.sessions.get_mut(&session) {
                    if let Some(b) = s.backup.as_mut().filter(|b| &b.server == from) {
                        b.acked_epoch = Some(epoch);
                        if up > b.held_up {
                            b.held_up = up;
                            s.ack_due = true;
                            if let Some(inc) = s.inc {
                                self.mark_ready(inc);
                            }
                        }
                    }
                }
            }
            ControlMessage::ReplicateResync { session } => self.resync(session, from),
            ControlMessage::Forget { session } => {
                if self
                    .replicas
                    .get(&session)
                    .is_some_and(|r| &r.owner == from)
                {
                    self.replicas.remove(&session);
                }
                // From our backup: it will not keep this session.
                if let Some(s) = self.sessions.get_mut(&session) {
                    if let Some(b) = s.backup.as_mut().filter(|b| &b.server == from) {
                        b.live = false;
                        s.ack_due = true;
                    }
                }
            }
            ControlMessage::Load { permille } => self.events.push_back(ServerEvent::PeerLoad {
                peer: from.clone(),
                permille,
            }),
            ControlMessage::TriggerRequest { session, dest } => {
                self.trigger(session, Some(dest));
            }
            // Authentication is the link's business (`PeerLink`); operators
            // are the runtime's.
            ControlMessage::PeerHello { .. }
            | ControlMessage::PeerAuth { .. }
            | ControlMessage::OperatorList { .. }
            | ControlMessage::OperatorSessions { .. }
            | ControlMessage::OperatorPush { .. }
            | ControlMessage::OperatorPushed { .. }
            | ControlMessage::OperatorError { .. } => {}
        }
    }

    /// MTCP 4.2.3 "Once S1 receives the state request": verify, freeze,
    /// pack the state for the client's position and reply.
    fn on_state_request(&mut self, now: Instant, from: &ServerId, req: u64, m: Migrate) {
        let frozen_timeout = self.cfg.timeouts.frozen;
        let reject = |reason, text: &str| ControlMessage::StateReject {
            req,
            reason,
            text: text.to_string(),
        };
        let Some(s) = self.sessions.get_mut(&m.request.session) else {
            let msg = if self.is_tombstone(m.request.session) {
                reject(RejectReason::InvalidState, FINISHED_TEXT)
            } else {
                reject(RejectReason::NotFound, "no such session")
            };
            self.ctrl_out.push_back((from.clone(), msg));
            return;
        };
        if let Err((reason, text)) =
            Self::check_migrate(&s.secret, (s.epoch, s.prev_epoch), Some(s.last_attempt), &m)
        {
            self.ctrl_out
                .push_back((from.clone(), reject(reason, text)));
            return;
        }
        if !s.migratable() {
            let msg = reject(RejectReason::InvalidState, FINISHED_TEXT);
            self.ctrl_out.push_back((from.clone(), msg));
            return;
        }
        if m.request.down > s.down.end() || m.request.down < s.down.start() {
            let msg = reject(
                RejectReason::InvalidState,
                "client position outside the stream",
            );
            self.ctrl_out.push_back((from.clone(), msg));
            return;
        }
        s.last_attempt = m.request.attempt;
        let handle = s.handle;
        let old_inc = s.inc.take();
        let frozen = s.frozen.get_or_insert(Frozen {
            deadline: now + frozen_timeout,
            since: now,
            cause: m.request.cause,
            replied: Vec::new(),
        });
        frozen.replied.push((from.clone(), req));
        frozen.deadline = now + frozen_timeout;
        let new_epoch = s.next_epoch;
        s.next_epoch += 1;
        if let Some(b) = s.backup.as_ref().filter(|b| b.live) {
            let update = ReplicaUpdate::Epoch {
                epoch: s.epoch,
                next: s.next_epoch,
            };
            self.ctrl_out.push_back((
                b.server.clone(),
                ControlMessage::Replicate {
                    session: m.request.session,
                    update,
                },
            ));
        }
        let s = self.sessions.get_mut(&m.request.session).expect("present");
        let (image, _) = s.image(m.request.session).trim_for(m.request.down);
        self.ctrl_out.push_back((
            from.clone(),
            ControlMessage::StateReply {
                req,
                new_epoch,
                image,
            },
        ));
        self.retire(handle, ServerEvent::MigratedAway(handle));
        if let Some(inc) = old_inc {
            self.close_inc(inc, "session migrated away".into());
        }
    }

    fn on_state_reply(&mut self, from: &ServerId, req: u64, new_epoch: Epoch, image: SessionImage) {
        let Some(p) = self.pending.remove(&req) else {
            return;
        };
        let Some(inc) = p.inc.filter(|i| self.incs.contains_key(i)) else {
            // The client left: do not install, so the origin keeps the
            // state for the client's next attempt.
            return;
        };
        if image.session != p.migrate.request.session || &p.migrate.request.origin != from {
            return self.reject(
                inc,
                RejectReason::InvalidState,
                "origin answered for another session",
            );
        }
        if p.migrate.request.down < image.down_base && image.down_base <= image.down_snap {
            return self.reject(
                inc,
                RejectReason::InvalidState,
                "origin lacks bytes the client needs",
            );
        }
        self.stats.migrations_in += 1;
        self.install_image(
            inc,
            image,
            new_epoch,
            &p.migrate,
            Some((from.clone(), req)),
            MigrationOutcome::Moved,
        );
    }

    fn on_state_ack(&mut self, from: &ServerId, req: u64) {
        let found = self.sessions.iter().find_map(|(sid, s)| {
            let f = s.frozen.as_ref()?;
            f.replied
                .iter()
                .any(|(p, r)| p == from && *r == req)
                .then_some(*sid)
        });
        if let Some(sid) = found {
            let s = self.sessions.remove(&sid).expect("found");
            self.stats.migrations_out += 1;
            if let Some(f) = &s.frozen {
                self.report_out(sid, from.clone(), f, MigrationOutcome::Moved);
            }
            if let Some(b) = s.backup {
                self.ctrl_out
                    .push_back((b.server, ControlMessage::Forget { session: sid }));
            }
        }
    }

    fn report_out(
        &mut self,
        session: SessionId,
        to: ServerId,
        f: &Frozen,
        outcome: MigrationOutcome,
    ) {
        self.events
            .push_back(ServerEvent::Migration(MigrationReport {
                session,
                direction: Direction::Out,
                peer: to,
                cause: f.cause,
                outcome,
                duration: self.last_now.saturating_duration_since(f.since),
                replayed: 0,
                discarded: 0,
            }));
    }

    /// The origin could not give the state: resume from a local replica if
    /// there is one (DESIGN.md 3.6), else tell the client why.
    fn fallback(&mut self, p: PendingMigration, reason: RejectReason, text: String) {
        let Some(inc) = p.inc.filter(|i| self.incs.contains_key(i)) else {
            return;
        };
        let m = p.migrate;
        // A replica answers when its owner is unreachable (it crashed) or
        // says it has no such session (it restarted): a client names an
        // origin only while that origin still owes it the session (the
        // origin forgets only after the client confirmed elsewhere, and
        // replays die on the nonce).
        let usable = matches!(
            reason,
            RejectReason::NotFound | RejectReason::OriginUnreachable
        ) && self
            .replicas
            .get(&m.request.session)
            .is_some_and(|r| r.owner == m.request.origin);
        if !usable {
            return self.reject(inc, reason, text);
        }
        let r = self.replicas.get(&m.request.session).expect("checked");
        // A replica that cannot serve this client (out of step with the
        // owner) is not the client's fault: it tries elsewhere.
        let unusable = Self::check_migrate(&r.secret, (r.epoch, None), None, &m).is_err()
            || m.request.down < r.down.start()
            || r.down_fin.is_some_and(|f| m.request.down > f);
        if unusable {
            return self.reject(inc, reason, text);
        }
        let mut r = self.replicas.remove(&m.request.session).expect("checked");
        let image = r.image(m.request.session);
        self.stats.failovers_in += 1;
        self.install_image(
            inc,
            image,
            r.next_epoch,
            &m,
            None,
            MigrationOutcome::Failover,
        );
    }

    fn on_replicate(&mut self, from: &ServerId, session: SessionId, update: ReplicaUpdate) {
        let ok = match update {
            ReplicaUpdate::Full { image } => {
                if image.session != session {
                    return;
                }
                if let Some(local) = self.sessions.get(&session).filter(|l| l.frozen.is_none()) {
                    // Epochs order live copies: ours, if not older, is the
                    // one clients use: refuse to back up the other, so its
                    // owner stops waiting for us. An older live copy here
                    // is a zombie: the owner's state replaces it. (A frozen
                    // copy stays beside the replica: the client may still
                    // come back for it if it lost its Resumed.)
                    if local.epoch >= image.epoch {
                        self.ctrl_out
                            .push_back((from.clone(), ControlMessage::Forget { session }));
                        return;
                    }
                    let old = self.sessions.remove(&session).expect("present");
                    self.retire(old.handle, ServerEvent::MigratedAway(old.handle));
                    if let Some(inc) = old.inc {
                        self.close_inc(inc, "superseded by the owner's state".into());
                    }
                }
                self.replicas
                    .insert(session, Replica::from_image(from.clone(), image));
                true
            }
            update => match self.replicas.get_mut(&session) {
                Some(r) if &r.owner == from => {
                    r.stale_since = None;
                    r.apply(update)
                }
                _ => false,
            },
        };
        let msg = if ok {
            let r = self.replicas.get(&session).expect("applied");
            ControlMessage::ReplicateAck {
                session,
                up: r.up.end(),
                epoch: r.epoch,
            }
        } else {
            self.replicas.remove(&session);
            ControlMessage::ReplicateResync { session }
        };
        self.ctrl_out.push_back((from.clone(), msg));
    }

    fn resync(&mut self, session: SessionId, backup: &ServerId) {
        let Some(s) = self
            .sessions
            .get_mut(&session)
            .filter(|s| s.frozen.is_none())
        else {
            return;
        };
        let Some(b) = s.backup.as_ref().filter(|b| &b.server == backup) else {
            return;
        };
        let server = b.server.clone();
        let image = s.image(session);
        let b = s.backup.as_mut().expect("checked");
        b.live = true;
        b.acked_epoch = None;
        b.down_sent = s.down_snap;
        b.acked_sent = s.down.start();
        self.ctrl_out.push_back((
            server,
            ControlMessage::Replicate {
                session,
                update: ReplicaUpdate::Full { image },
            },
        ));
    }

    /// The control connection to `peer` failed: requests to it fall back
    /// (replica or `OriginUnreachable`); sessions it backs up stop waiting
    /// for it (they keep running without crash tolerance until it is back).
    pub fn handle_peer_down(&mut self, now: Instant, peer: &ServerId) {
        self.last_now = self.last_now.max(now);
        let reqs: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| &p.migrate.request.origin == peer)
            .map(|(r, _)| *r)
            .collect();
        for req in reqs {
            let p = self.pending.remove(&req).expect("listed");
            self.fallback(
                p,
                RejectReason::OriginUnreachable,
                format!("origin {peer} unreachable"),
            );
        }
        for r in self.replicas.values_mut().filter(|r| &r.owner == peer) {
            r.stale_since.get_or_insert(now);
        }
        for s in self.sessions.values_mut() {
            if let Some(b) = s.backup.as_mut().filter(|b| &b.server == peer) {
                b.live = false;
                s.ack_due = true;
                if let Some(inc) = s.inc {
                    if let Some(i) = self.incs.get_mut(&inc) {
                        if !i.queued {
                            i.queued = true;
                            self.ready.push_back(inc);
                        }
                    }
                }
            }
        }
    }

    /// The control connection to `peer` is (again) up: replicas it keeps for
    /// us are re-sent whole.
    pub fn handle_peer_up(&mut self, now: Instant, peer: &ServerId) {
        self.last_now = self.last_now.max(now);
        let sids: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.frozen.is_none()
                    && s.backup
                        .as_ref()
                        .is_some_and(|b| &b.server == peer && !b.live)
            })
            .map(|(sid, _)| *sid)
            .collect();
        for sid in sids {
            self.resync(sid, peer);
        }
    }

    // ----- time ---------------------------------------------------------------

    /// The next instant at which [`Server::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = &self.cfg.timeouts;
        let incs = self.incs.values().filter_map(|i| match i.phase {
            IncPhase::Preamble | IncPhase::AwaitFirst | IncPhase::AwaitProof(_) => {
                Some(i.opened + t.handshake)
            }
            _ => None,
        });
        let pending = self.pending.values().map(|p| p.deadline);
        let sessions = self
            .sessions
            .values()
            .filter_map(|s| match (&s.frozen, s.orphan_since) {
                (Some(f), _) => Some(f.deadline),
                (None, Some(since)) => Some(since + t.orphan),
                _ => None,
            });
        let tomb = self.tombstones.front().map(|(t, _)| *t);
        let replicas = self
            .replicas
            .values()
            .filter_map(|r| r.stale_since.map(|since| since + t.orphan));
        incs.chain(pending)
            .chain(sessions)
            .chain(tomb)
            .chain(replicas)
            .min()
    }

    /// Expires whatever timed out by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = self.last_now.max(now);
        let t = self.cfg.timeouts.clone();
        let stale: Vec<IncarnationId> = self
            .incs
            .iter()
            .filter(|(_, i)| {
                matches!(
                    i.phase,
                    IncPhase::Preamble | IncPhase::AwaitFirst | IncPhase::AwaitProof(_)
                ) && i.opened + t.handshake <= now
            })
            .map(|(id, _)| *id)
            .collect();
        for inc in stale {
            self.close_inc(inc, "handshake timeout".into());
        }
        while self.tombstones.front().is_some_and(|(t, _)| *t <= now) {
            self.tombstones.pop_front();
        }
        self.replicas
            .retain(|_, r| r.stale_since.is_none_or(|since| since + t.orphan > now));
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(r, _)| *r)
            .collect();
        for req in expired {
            let p = self.pending.remove(&req).expect("listed");
            let text = format!("origin {} did not answer in time", p.migrate.request.origin);
            self.fallback(p, RejectReason::OriginUnreachable, text);
        }
        let dead: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| match (&s.frozen, s.orphan_since) {
                (Some(f), _) => f.deadline <= now,
                (None, Some(since)) => since + t.orphan <= now,
                _ => false,
            })
            .map(|(sid, _)| *sid)
            .collect();
        for sid in dead {
            let s = self.sessions.remove(&sid).expect("listed");
            if let Some(f) = &s.frozen {
                let to = f.replied.last().map(|(p, _)| p.clone());
                if let Some(to) = to {
                    self.report_out(sid, to, f, MigrationOutcome::Expired);
                }
            }
            self.retire(s.handle, ServerEvent::Dropped(s.handle));
            if let Some(b) = s.backup {
                self.ctrl_out
                    .push_back((b.server, ControlMessage::Forget { session: sid }));
            }
        }
    }

    // ----- output ---------------------------------------------------------------

    /// The next thing to send: appends segments to `out` (frame headers and
    /// zero-copy payload slices, to be written in order, e.g. vectored) and
    /// says where they go. `None` when nothing is waiting.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<Bytes>) -> Option<Dest> {
        self.last_now = self.last_now.max(now);
        if let Some((peer, msg)) = self.ctrl_out.pop_front() {
            let mut b = BytesMut::new();
            msg.encode(&mut b);
            out.push(b.freeze());
            return Some(Dest::Peer(peer));
        }
        while let Some(inc) = self.ready.pop_front() {
            let Some(i) = self.incs.get_mut(&inc) else {
                continue;
            };
            i.queued = false;
            let start = out.len();
            let mut hdr = take_scratch(&mut self.scratch);
            for f in i.out.drain(..) {
                f.encode(&mut hdr);
            }
            if let IncPhase::Attached(sid) = i.phase {
                if let Some(s) = self
                    .sessions
                    .get_mut(&sid)
                    .filter(|s| s.frozen.is_none() && s.inc == Some(inc))
                {
                    let more = Self::session_output(&self.cfg.limits, s, &mut hdr, out);
                    if more {
                        i.queued = true;
                        self.ready.push_back(inc);
                    }
                    if s.finished() {
                        if !hdr.is_empty() {
                            out.push(hdr.split().freeze());
                        }
                        self.maybe_finish(sid);
                    }
                }
            }
            if !hdr.is_empty() {
                out.push(hdr.split().freeze());
            }
            self.scratch = hdr;
            if out.len() > start {
                return Some(Dest::Incarnation(inc));
            }
        }
        None
    }

    /// Data, Close and Ack frames of one session, within the client's window.
    /// Returns whether more data is ready than one batch carries.
    fn session_output(
        limits: &Limits,
        s: &mut Session,
        hdr: &mut BytesMut,
        out: &mut Vec<Bytes>,
    ) -> bool {
        let end = s.down.end().min(s.down_limit);
        let more = s
            .down
            .frame_data(&mut s.snd_nxt, end, limits.max_data_frame, hdr, out);
        if s.down_fin == Some(s.snd_nxt) && !s.fin_sent && s.snd_nxt == s.down.end() {
            Frame::Close { pos: s.snd_nxt }.encode(hdr);
            s.fin_sent = true;
        }
        let limit = s.up_limit(limits);
        // Never acknowledge what the client has not (re)sent on this
        // incarnation: after a reattach it resends from `rx_pos`.
        let commit = s.commit_point().min(s.rx_pos.max(s.ack_sent));
        let fin = s.up_fin.is_some_and(|f| f == commit);
        let moved = commit > s.ack_sent || limit >= s.limit_sent + limits.window_step();
        let blocked = limit > s.limit_sent && s.rcv_nxt() == s.limit_sent;
        if fin != s.fin_ack_sent || blocked || (s.ack_due && moved) {
            Frame::Ack {
                pos: commit,
                limit: limit.max(s.limit_sent),
                fin,
            }
            .encode(hdr);
            s.ack_sent = commit;
            s.limit_sent = limit.max(s.limit_sent);
            s.fin_ack_sent = fin;
            s.ack_due = false;
        }
        more
    }

    fn is_tombstone(&self, sid: SessionId) -> bool {
        self.tombstones.iter().any(|(_, s)| *s == sid)
    }

    /// Removes a finished session: its application is told, its replica
    /// forgotten, its connection closed (after pending output).
    fn maybe_finish(&mut self, sid: SessionId) {
        if !self.sessions.get(&sid).is_some_and(Session::finished) {
            return;
        }
        let s = self.sessions.remove(&sid).expect("present");
        if let Some(b) = s.backup {
            self.ctrl_out
                .push_back((b.server, ControlMessage::Forget { session: sid }));
        }
        self.tombstones
            .push_back((self.last_now + self.cfg.timeouts.frozen, sid));
        self.retire(s.handle, ServerEvent::Finished(s.handle));
        if let Some(inc) = s.inc {
            self.close_inc(inc, "session finished".into());
        }
    }

    /// The next event for the runtime or the application.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }
}
