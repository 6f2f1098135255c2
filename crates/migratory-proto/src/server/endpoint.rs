//! The endpoint of one server: admission of new client connections
//! (preamble, Hello, the Migrate challenge), the session table, the state
//! requests it sends for clients that migrate here, the replicas it keeps
//! for its peers, tombstones of finished sessions, and the control plane.
//!
//! It routes what concerns one session to that [`Session`] and learns from
//! sessions through [`EndpointEvent`]s, as quinn-proto's `Endpoint` does
//! for its connections. The sessions themselves live in slots chosen by
//! the caller ([`SessionSlot`]): a plain shared cell for a single-task
//! driver, a per-session lock for the tokio runtime.
//!
//! # Driving it
//!
//! * [`Endpoint::new_incarnation`] when a client connection is accepted,
//!   then [`Endpoint::handle_input`] with what it sends until
//!   [`ServerEvent::Attached`] hands it to a session (or it is closed);
//!   [`Endpoint::handle_incarnation_closed`] if it ends before that;
//! * [`Endpoint::handle_control`] with every message from an authenticated
//!   peer, [`Endpoint::handle_peer_down`] / [`Endpoint::handle_peer_up`];
//! * [`Endpoint::handle_timeout`] once [`Endpoint::poll_timeout`] passed;
//! * [`Endpoint::handle_endpoint_event`] with what sessions report, or
//!   [`Endpoint::absorb`] after calling a session directly.
//!
//! After each, drain [`Endpoint::poll_transmit`] (bytes for a connection
//! not yet attached, messages for peers) and [`Endpoint::poll_event`].

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use rand_core::RngCore;

use crate::control::{ControlMessage, LoadReport, ReplicaUpdate, SessionImage};
use crate::error::{DecodeError, ProtocolError};
use crate::frame::{
    check_preamble, Frame, Migrate, MigrateRequest, PreambleCheck, RejectReason,
    MAX_ADMISSION_FRAME, PREAMBLE,
};
use crate::types::{Epoch, IncarnationId, Secret, ServerId, SessionId};

use super::balance::{self, Candidate};
use super::events::{
    Arrival, Dest, Direction, DrainReport, DrainStatus, MigrationOutcome, MigrationReport,
    ServerEvent, ServerStats, SessionInfo,
};
use super::replica::Replica;
use super::session::{EndpointEvent, EndpointEventKind, ResumeHere, Session, Start};
use super::{ServerConfig, SessionHandle, ABORT_TEXT, FINISHED_TEXT};

/// Where the endpoint keeps a [`Session`]: the caller's choice of cell,
/// shared between the endpoint's table and whoever drives the session.
pub trait SessionSlot: Clone {
    /// A slot holding `session`.
    fn new(session: Session) -> Self;
    /// Runs `f` on the session (under the slot's lock, if it has one); the
    /// session may change, so whoever waits on it is to be woken.
    fn with<R>(&self, f: impl FnOnce(&mut Session) -> R) -> R;
    /// Reads the session without changing it: nobody is woken. The
    /// endpoint's periodic visits of every session (load reports, rebalance
    /// candidates) use this, so idle sessions stay asleep.
    fn peek<R>(&self, f: impl FnOnce(&Session) -> R) -> R;
}

impl SessionSlot for Arc<std::sync::Mutex<Session>> {
    fn new(session: Session) -> Self {
        Arc::new(std::sync::Mutex::new(session))
    }

    fn with<R>(&self, f: impl FnOnce(&mut Session) -> R) -> R {
        f(&mut self.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn peek<R>(&self, f: impl FnOnce(&Session) -> R) -> R {
        f(&self.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[derive(Debug)]
enum IncPhase {
    Preamble,
    AwaitFirst,
    /// A Migrate request was challenged; waiting for the client's proof.
    AwaitProof(Box<(MigrateRequest, [u8; 32])>),
    /// Waiting for the origin's answer to this state request.
    Pending(u64),
    Closing,
}

/// A client connection not (yet) attached to a session.
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
    /// The connection's channel binding (its TLS exporter), if it has one:
    /// the nonce a Migrate's proof on it covers, with no Challenge.
    binding: Option<[u8; 32]>,
}

#[derive(Debug)]
struct PendingMigration {
    inc: Option<IncarnationId>,
    migrate: Migrate,
    deadline: Instant,
}

/// What a deadline in the timer set is for. Entries are checked when they
/// fire (an entry whose object moved on does nothing), so nothing is ever
/// removed early and no event scans every session (the load report, the
/// rebalancer and the drain visit the table once a round, not per event).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Handshake(IncarnationId),
    Pending(u64),
    Session(SessionId),
    Replica(SessionId),
    /// Time to report this server's load to its peers.
    Load,
    /// Time for the rebalancer to look at the loads.
    Balance,
    /// Time for a drain round.
    Drain,
}

/// A drain under way ([`Endpoint::drain`]).
#[derive(Debug)]
struct Drain {
    started: Instant,
    deadline: Instant,
    /// When a peer could last take sessions.
    last_live: Instant,
    /// Sessions sent a Trigger and not yet gone, and when: at most
    /// [`BalanceConfig::drain_parallel`](super::BalanceConfig::drain_parallel).
    sent: HashMap<SessionId, Instant>,
    /// Sessions to send next.
    queue: VecDeque<SessionId>,
    /// When each session was last sent away: those never tried go first,
    /// so sessions that do not move cannot hold the others back.
    tried: HashMap<SessionId, Instant>,
    /// When the next round is due (a timer entry for another instant is
    /// stale).
    next_round: Instant,
    moved: u64,
    finished: u64,
    closed: u64,
    /// The drain is over (reported once).
    done: bool,
}

/// One server's endpoint. See the module documentation.
pub struct Endpoint<S: SessionSlot> {
    cfg: Arc<ServerConfig>,
    rng: Box<dyn RngCore + Send>,
    incs: HashMap<IncarnationId, Inc>,
    ready: VecDeque<IncarnationId>,
    /// The session table: each session's current handle and slot.
    sessions: HashMap<SessionId, (SessionHandle, S)>,
    pending: HashMap<u64, PendingMigration>,
    /// State replies handed out by frozen sessions, for routing StateAck.
    handed_out: HashMap<(ServerId, u64), SessionId>,
    replicas: HashMap<SessionId, Replica>,
    /// Recently finished sessions and when to forget them: a late Migrate
    /// (the client lost the final Ack) learns the session completed.
    tombstones: VecDeque<(Instant, SessionId)>,
    tombstoned: HashMap<SessionId, Instant>,
    timers: BTreeSet<(Instant, Timer)>,
    ctrl_out: VecDeque<(ServerId, ControlMessage)>,
    events: VecDeque<ServerEvent>,
    last_now: Instant,
    next_inc: u64,
    next_req: u64,
    next_handle: u64,
    stats: ServerStats,
    /// Peers' last load reports, and when they came.
    loads: HashMap<ServerId, (LoadReport, Instant)>,
    /// Bytes per second this server's sessions moved lately (the runtime
    /// measures it: [`Endpoint::set_throughput`]).
    throughput: u64,
    drain: Option<Drain>,
    /// The rebalancer is moving sessions off (see
    /// [`RebalanceConfig`](super::RebalanceConfig)).
    rebalancing: bool,
    /// Sessions the rebalancer's last round sent away, still here.
    rebalance_sent: Vec<SessionId>,
    /// When its last round sent sessions away, or when they all left.
    rebalance_at: Instant,
    /// Sessions sent to each peer since its last load report.
    sent_since_report: HashMap<ServerId, u32>,
    /// Sessions the rebalancer sent away lately, and when.
    rebalance_tried: HashMap<SessionId, Instant>,
    /// Peers whose control link failed and that have not been heard from
    /// since: load reports dial them only every tenth period.
    peers_down: std::collections::HashSet<ServerId>,
    /// Load reports sent so far (counts the periods).
    reports: u64,
    /// The sessions owned here at the last load report, and when: the
    /// rebalancer uses it within a period instead of visiting every
    /// session again.
    owned_at_report: Option<(Instant, u32)>,
    /// Peers whose link went down after they said they were draining:
    /// they left the pool in order (until they report again).
    peers_left: std::collections::HashSet<ServerId>,
    /// When a session last finished here (a drain lingers after it).
    last_finish: Option<Instant>,
}

impl<S: SessionSlot> std::fmt::Debug for Endpoint<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.cfg.id)
            .field("sessions", &self.sessions.len())
            .field("incarnations", &self.incs.len())
            .field("replicas", &self.replicas.len())
            .finish()
    }
}

impl<S: SessionSlot> Endpoint<S> {
    /// An endpoint with no sessions. `rng` makes session ids, secrets and
    /// challenge nonces: give it a cryptographically secure generator
    /// outside of tests.
    pub fn new(cfg: ServerConfig, rng: Box<dyn RngCore + Send>, now: Instant) -> Self {
        Self {
            cfg: Arc::new(cfg),
            rng,
            incs: HashMap::new(),
            ready: VecDeque::new(),
            sessions: HashMap::new(),
            pending: HashMap::new(),
            handed_out: HashMap::new(),
            replicas: HashMap::new(),
            tombstones: VecDeque::new(),
            tombstoned: HashMap::new(),
            timers: BTreeSet::new(),
            ctrl_out: VecDeque::new(),
            events: VecDeque::new(),
            last_now: now,
            next_inc: 0,
            next_req: 0,
            next_handle: 0,
            stats: ServerStats::default(),
            loads: HashMap::new(),
            throughput: 0,
            drain: None,
            rebalancing: false,
            rebalance_sent: Vec::new(),
            rebalance_at: now,
            sent_since_report: HashMap::new(),
            rebalance_tried: HashMap::new(),
            peers_down: std::collections::HashSet::new(),
            reports: 0,
            owned_at_report: None,
            last_finish: None,
            peers_left: std::collections::HashSet::new(),
        }
        .with_balance_timers(now)
    }

    fn with_balance_timers(mut self, now: Instant) -> Self {
        if let Some(b) = &self.cfg.balance {
            self.timers.insert((now + b.report_every, Timer::Load));
            if let Some(r) = &b.rebalance {
                self.timers.insert((now + r.settle, Timer::Balance));
            }
        }
        self
    }

    /// This server's id.
    pub fn id(&self) -> &ServerId {
        &self.cfg.id
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// What the server has done so far.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// The session `sid`, if held here (owned, frozen mid-migration, or
    /// ended and about to leave the table).
    pub fn session(&self, sid: SessionId) -> Option<S> {
        self.sessions.get(&sid).map(|(_, s)| s.clone())
    }

    /// Sessions held here, including any frozen mid-migration.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Whether the session is held here (owned, or frozen mid-migration).
    pub fn holds(&self, session: SessionId) -> bool {
        self.sessions
            .get(&session)
            .is_some_and(|(_, s)| s.peek(|s| !s.is_ended()))
    }

    /// Sessions this server owns (not frozen), with their epochs. Visits
    /// every session: for operators and tests.
    pub fn owned_sessions(&self) -> Vec<(SessionId, Epoch)> {
        self.sessions
            .iter()
            .filter_map(|(id, (_, s))| s.peek(|s| s.is_owned().then(|| (*id, s.epoch()))))
            .collect()
    }

    /// What an operator sees of the sessions this server owns. Visits
    /// every session.
    pub fn session_infos(&self) -> Vec<SessionInfo> {
        self.sessions
            .values()
            .filter_map(|(_, s)| s.peek(|s| s.is_owned().then(|| s.info())))
            .collect()
    }

    /// Whether `session`, owned here, would survive this server's crash
    /// (see [`Session::crash_tolerant`]).
    pub fn crash_tolerant(&self, session: SessionId) -> bool {
        self.sessions
            .get(&session)
            .is_some_and(|(_, s)| s.peek(|s| s.crash_tolerant()))
    }

    /// The epochs at which this server would still take a Migrate of
    /// `session` (its copy, live or frozen, its previous epoch until the
    /// client confirms, and a replica's): a secret of any other epoch
    /// moves nothing here.
    pub fn accepted_epochs(&self, session: SessionId) -> Vec<Epoch> {
        let mut out = self
            .sessions
            .get(&session)
            .map(|(_, s)| s.peek(|s| s.accepted_epochs()))
            .unwrap_or_default();
        out.extend(self.replicas.get(&session).map(|r| r.epoch));
        out
    }

    /// Whether this server holds a replica of `session`.
    pub fn has_replica(&self, session: SessionId) -> bool {
        self.replicas.contains_key(&session)
    }

    /// The session connection `inc` waits for, if a state request for it
    /// is out (for timing the phases of a migration).
    pub fn pending_state_request(&self, inc: IncarnationId) -> Option<SessionId> {
        match self.incs.get(&inc)?.phase {
            IncPhase::Pending(req) => self.pending.get(&req).map(|p| p.migrate.request.session),
            _ => None,
        }
    }

    /// Whether a session here answered `peer`'s state request `req` with
    /// its state (and waits for the StateAck).
    pub fn answered(&self, peer: &ServerId, req: u64) -> bool {
        self.handed_out.contains_key(&(peer.clone(), req))
    }

    fn bump(&mut self, now: Instant) {
        self.last_now = self.last_now.max(now);
    }

    /// Calls `f` on session `sid` and takes in what the session reports.
    fn call<R>(&mut self, sid: SessionId, f: impl FnOnce(&mut Session) -> R) -> Option<R> {
        let (handle, slot) = self.sessions.get(&sid)?.clone();
        let (r, evs, ctrl, eps) = slot.with(|s| {
            let r = f(s);
            let evs: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
            let ctrl: Vec<_> = std::iter::from_fn(|| s.poll_control()).collect();
            let eps: Vec<_> = std::iter::from_fn(|| s.poll_endpoint_event()).collect();
            (r, evs, ctrl, eps)
        });
        self.events.extend(evs);
        self.ctrl_out.extend(ctrl);
        for ev in eps {
            self.on_session_event(sid, handle, ev);
        }
        Some(r)
    }

    /// Takes in everything `session` reports after the caller called it
    /// directly (events, messages for peers, endpoint events).
    pub fn absorb(&mut self, now: Instant, session: &mut Session) {
        self.bump(now);
        while let Some(ev) = session.poll_event() {
            self.events.push_back(ev);
        }
        while let Some(m) = session.poll_control() {
            self.ctrl_out.push_back(m);
        }
        let (sid, handle) = (session.id(), session.handle());
        while let Some(ev) = session.poll_endpoint_event() {
            self.on_session_event(sid, handle, ev);
        }
    }

    /// An event a session reported (from [`Session::poll_endpoint_event`]),
    /// for a caller that drains sessions itself. `handle` is the
    /// session's [`Session::handle`]. The caller must not hold any
    /// session's lock: while draining, a session that ends lets the
    /// endpoint send the next one away (it calls into other sessions).
    pub fn handle_endpoint_event(
        &mut self,
        now: Instant,
        sid: SessionId,
        handle: SessionHandle,
        ev: EndpointEvent,
    ) {
        self.bump(now);
        self.on_session_event(sid, handle, ev);
    }

    fn on_session_event(&mut self, sid: SessionId, handle: SessionHandle, ev: EndpointEvent) {
        match ev.0 {
            EndpointEventKind::Deadline(at) => {
                self.timers.insert((at, Timer::Session(sid)));
            }
            EndpointEventKind::Report(r) => self.events.push_back(ServerEvent::Migration(r)),
            EndpointEventKind::Replied { to, req } => {
                self.handed_out.insert((to, req), sid);
            }
            EndpointEventKind::Ended { finished, moved } => {
                let current = self.sessions.get(&sid).is_some_and(|(h, _)| *h == handle);
                if !current {
                    return;
                }
                self.sessions.remove(&sid);
                self.handed_out.retain(|_, s| *s != sid);
                if moved {
                    self.stats.migrations_out += 1;
                }
                if let Some(d) = &mut self.drain {
                    d.sent.remove(&sid);
                    if moved {
                        d.moved += 1;
                    } else if finished {
                        d.finished += 1;
                    }
                    // The last one left: a round at once says whether the
                    // drain is over (not from here: this may be the old
                    // copy of a session being installed again).
                    if !d.done && self.sessions.is_empty() {
                        d.next_round = self.last_now;
                        self.timers.insert((self.last_now, Timer::Drain));
                    } else if !d.done {
                        // Room for one more on its way out.
                        self.drain_pump(self.last_now);
                    }
                }
                if finished {
                    self.last_finish = Some(self.last_now);
                    let until = self.last_now + self.cfg.timeouts.frozen;
                    self.tombstones.push_back((until, sid));
                    self.tombstoned.insert(sid, until);
                }
            }
        }
    }

    // ----- incarnations ---------------------------------------------------

    /// Registers a newly accepted client connection. `binding` is its
    /// channel binding ([`BINDING_LABEL`](crate::mac::BINDING_LABEL)
    /// exported from its TLS session), `None` for a plaintext connection:
    /// a Migrate on a bound connection carries its proof at once; on
    /// another it is challenged with a fresh nonce.
    pub fn new_incarnation(&mut self, now: Instant, binding: Option<[u8; 32]>) -> IncarnationId {
        self.bump(now);
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
                binding,
            },
        );
        self.timers
            .insert((now + self.cfg.timeouts.handshake, Timer::Handshake(id)));
        id
    }

    /// Bytes read from a client connection that is not attached to a
    /// session (input for an attached one goes to the session).
    pub fn handle_input(&mut self, now: Instant, inc: IncarnationId, data: &[u8]) {
        self.bump(now);
        let Some(i) = self.incs.get_mut(&inc) else {
            return;
        };
        if matches!(i.phase, IncPhase::Closing) {
            return;
        }
        i.rx.extend_from_slice(data);
        if matches!(i.phase, IncPhase::Pending(_)) && i.rx.len() > MAX_ADMISSION_FRAME {
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
        // Nothing proved yet: small frames only.
        let admission = MAX_ADMISSION_FRAME.min(self.cfg.limits.max_frame);
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
                        if self.cfg.require_binding && i.binding.is_none() {
                            self.reject(
                                inc,
                                RejectReason::TlsRequired,
                                "this pool accepts migratory clients over TLS only",
                            );
                            return Ok(());
                        }
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
                    let Some(frame) = Frame::decode(&mut i.rx, admission)? else {
                        return Ok(());
                    };
                    match frame {
                        Frame::Hello { window } => self.on_hello(now, inc, window),
                        Frame::Migrate(request) => {
                            let i = self.incs.get_mut(&inc).expect("present");
                            if let Some(binding) = i.binding {
                                // The proof follows at once, over this
                                // connection's binding: it cannot have been
                                // made for any other connection.
                                i.phase = IncPhase::AwaitProof(Box::new((request, binding)));
                            } else {
                                // Challenge first: a captured Migrate cannot
                                // be replayed against a fresh nonce.
                                let mut nonce = [0u8; 32];
                                self.rng.fill_bytes(&mut nonce);
                                let i = self.incs.get_mut(&inc).expect("present");
                                i.phase = IncPhase::AwaitProof(Box::new((request, nonce)));
                                self.queue_frame(inc, Frame::Challenge { nonce });
                            }
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
                    let Some(frame) = Frame::decode(&mut i.rx, admission)? else {
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
            }
        }
    }

    /// A client connection that was not attached to a session ended.
    pub fn handle_incarnation_closed(&mut self, now: Instant, inc: IncarnationId) {
        self.bump(now);
        let Some(i) = self.incs.remove(&inc) else {
            return;
        };
        if let IncPhase::Pending(req) = i.phase {
            // The state may still come; without a client it is not
            // installed, so the origin keeps it (no StateAck).
            if let Some(p) = self.pending.get_mut(&req) {
                p.inc = None;
            }
        }
    }

    fn close_inc(&mut self, inc: IncarnationId, reason: String) {
        if let Some(i) = self.incs.get_mut(&inc) {
            i.phase = IncPhase::Closing;
            self.events
                .push_back(ServerEvent::CloseIncarnation { inc, reason });
        }
    }

    fn queue_frame(&mut self, inc: IncarnationId, frame: Frame) {
        if let Some(i) = self.incs.get_mut(&inc) {
            i.out.push_back(frame);
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

    /// Hands `inc` over to session `sid`: the rest of its input goes there.
    fn attached(&mut self, inc: IncarnationId, sid: SessionId) -> BytesMut {
        let rx = self.incs.remove(&inc).map(|i| i.rx).unwrap_or_default();
        self.events
            .push_back(ServerEvent::Attached { inc, session: sid });
        rx
    }

    // ----- starting and resuming sessions --------------------------------

    fn on_hello(&mut self, now: Instant, inc: IncarnationId, window: u64) {
        // A draining or full server admits the session and at once sends
        // its client to the least loaded live peer (a Trigger after the
        // Welcome), within a bound on sessions on their way out.
        let full = self.sessions.len() >= self.cfg.max_sessions;
        let redirect = if self.drain.is_some() || full {
            let dest = balance::spread(1, &self.candidates(now)).pop();
            let overflow = self.cfg.max_sessions + self.cfg.max_sessions / 8 + 16;
            match dest {
                Some(dest) if self.sessions.len() < overflow => Some(dest),
                _ if self.drain.is_some() => {
                    return self.reject(
                        inc,
                        RejectReason::Shutdown,
                        "server draining and no peer can take new sessions",
                    )
                }
                _ => return self.reject(inc, RejectReason::Busy, "session limit reached"),
            }
        } else {
            None
        };
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
        self.install(now, inc, image, 0, Start::Hello { window });
        if let Some(dest) = redirect {
            self.stats.redirected += 1;
            self.send_to(sid, dest);
        }
    }

    /// A client asks to resume a session here (MTCP 4.2.3, fig 4.8).
    fn on_migrate(&mut self, now: Instant, inc: IncarnationId, m: Migrate) {
        if let Some(i) = self.incs.get_mut(&inc) {
            i.migrating = Some(m.request.clone());
        }
        if self.drain.as_ref().is_some_and(|d| d.done) {
            // Drained: about to stop. Another server can still ask for a
            // state frozen here, but nothing resumes here any more.
            return self.reject(inc, RejectReason::Busy, "server stopping");
        }
        // Served here when the client names us, or when we hold the session
        // live at an epoch the client knows (we resumed it, but the client
        // never saw our Resumed and still names the previous owner).
        let held = self
            .sessions
            .get(&m.request.session)
            .is_some_and(|(_, s)| s.peek(|s| s.serves_epoch(m.request.epoch)));
        if m.request.origin == self.cfg.id || held {
            return self.resume_local(now, inc, m);
        }
        let known = self.cfg.alternates.iter().any(|a| a.id == m.request.origin)
            || self
                .replicas
                .get(&m.request.session)
                .is_some_and(|r| r.owner == m.request.origin);
        if !known {
            return self.reject(inc, RejectReason::NotFound, "unknown origin server");
        }
        // A draining server takes no session in, except one it keeps a
        // replica of: its client may be failing over from a crashed owner
        // (the session then moves on with the rest of the drain).
        if self.drain.is_some() && !self.replicas.contains_key(&m.request.session) {
            return self.reject(inc, RejectReason::Busy, "server draining");
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
        let deadline = now + self.cfg.timeouts.state_request;
        self.pending.insert(
            req,
            PendingMigration {
                inc: Some(inc),
                migrate: m,
                deadline,
            },
        );
        self.timers.insert((deadline, Timer::Pending(req)));
        if let Some(i) = self.incs.get_mut(&inc) {
            i.phase = IncPhase::Pending(req);
        }
    }

    fn is_tombstone(&self, sid: SessionId) -> bool {
        self.tombstoned.contains_key(&sid)
    }

    /// The client comes back to the server that owns (or froze) its session.
    fn resume_local(&mut self, now: Instant, inc: IncarnationId, m: Migrate) {
        let sid = m.request.session;
        let live = self
            .sessions
            .get(&sid)
            .is_some_and(|(_, s)| s.peek(|s| !s.is_ended()));
        if !live {
            if self.is_tombstone(sid) {
                return self.reject(inc, RejectReason::InvalidState, FINISHED_TEXT);
            }
            return self.reject(inc, RejectReason::NotFound, "no such session here");
        }
        let outcome = self
            .call(sid, |s| s.resume_here(now, inc, &m))
            .expect("held");
        match outcome {
            ResumeHere::Reject(reason, text) => self.reject(inc, reason, text),
            ResumeHere::FromFrozen { image, epoch } => {
                self.install_image(now, inc, image, epoch, &m, None, MigrationOutcome::Moved)
            }
            ResumeHere::Reattached => {
                // The client came back to its owner: not a migration.
                if let Some(i) = self.incs.get_mut(&inc) {
                    i.migrating = None;
                }
                // What the connection sent after its Proof belongs to the
                // session.
                let rx = self.attached(inc, sid);
                if !rx.is_empty() {
                    self.call(sid, |s| s.handle_input(now, inc, &rx));
                }
            }
        }
    }

    /// Installs a session from an image for a client at `m.request.down`
    /// (MTCP 4.2.3, "Once the state reply reaches S2").
    #[allow(clippy::too_many_arguments)]
    fn install_image(
        &mut self,
        now: Instant,
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
        let mut rekey = [0u8; 32];
        self.rng.fill_bytes(&mut rekey);
        self.install(
            now,
            inc,
            image,
            new_epoch,
            Start::Resume {
                request: m.request.clone(),
                owed_ack,
                rekey,
            },
        );
    }

    fn install(
        &mut self,
        now: Instant,
        inc: IncarnationId,
        image: SessionImage,
        epoch: Epoch,
        start: Start,
    ) {
        let sid = image.session;
        // Owning the session makes any replica of it here stale.
        self.replicas.remove(&sid);
        if self.sessions.contains_key(&sid) {
            self.call(sid, |s| s.supersede("session re-installed"));
            self.sessions.remove(&sid);
            self.handed_out.retain(|_, s| *s != sid);
        }
        self.next_handle += 1;
        let handle = SessionHandle(self.next_handle);
        let arrival = match &start {
            Start::Hello { .. } => Arrival::New,
            Start::Resume { .. } => Arrival::Migrated {
                state: image.app_state.clone(),
            },
        };
        let rx = self.attached(inc, sid);
        let session = Session::install(self.cfg.clone(), handle, inc, image, epoch, start, now);
        self.sessions.insert(sid, (handle, S::new(session)));
        self.events.push_back(ServerEvent::Accepted {
            handle,
            session: sid,
            arrival,
        });
        self.call(sid, |s| {
            if !rx.is_empty() {
                s.handle_input(now, inc, &rx);
            }
        });
    }

    /// Server push by session id (e.g. for an operator): sends the
    /// session's client a Trigger, towards `dest` if given. `false` when the
    /// session is not live here or its client is not connected right now.
    pub fn trigger(&mut self, session: SessionId, dest: Option<ServerId>) -> bool {
        self.call(session, |s| s.trigger(dest)).unwrap_or(false)
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

    // ----- the control plane ------------------------------------------------

    /// A message from an authenticated peer.
    pub fn handle_control(&mut self, now: Instant, from: &ServerId, msg: ControlMessage) {
        self.bump(now);
        match msg {
            ControlMessage::StateRequest { req, migrate } => {
                self.on_state_request(now, from, req, migrate)
            }
            ControlMessage::StateReply {
                req,
                new_epoch,
                image,
            } => self.on_state_reply(now, from, req, new_epoch, image),
            ControlMessage::StateReject { req, reason, text } => {
                if let Some(p) = self.pending.remove(&req) {
                    self.fallback(now, p, reason, text);
                }
            }
            ControlMessage::StateAck { req } => {
                if let Some(sid) = self.handed_out.remove(&(from.clone(), req)) {
                    self.call(sid, |s| s.on_state_ack(from, req));
                }
            }
            ControlMessage::GapRequest {
                req,
                session,
                start,
                end,
            } => {
                let answered = self.handed_out.get(&(from.clone(), req)) == Some(&session);
                let asked = answered
                    .then(|| self.call(session, |s| s.on_gap_request(from, req, start, end)))
                    .flatten();
                if asked.is_none() {
                    self.ctrl_out.push_back((
                        from.clone(),
                        ControlMessage::GapReply {
                            session,
                            start,
                            data: None,
                        },
                    ));
                }
            }
            ControlMessage::GapReply {
                session,
                start,
                data,
            } => {
                self.call(session, |s| s.on_gap_reply(now, from, start, data));
            }
            ControlMessage::Replicate { session, update } => {
                self.on_replicate(from, session, update)
            }
            ControlMessage::ReplicateAck { session, up, epoch } => {
                self.call(session, |s| s.on_replicate_ack(now, from, up, epoch));
            }
            ControlMessage::ReplicateResync { session } => {
                self.call(session, |s| s.resync(from));
            }
            ControlMessage::Forget { session } => {
                if self
                    .replicas
                    .get(&session)
                    .is_some_and(|r| &r.owner == from)
                {
                    self.replicas.remove(&session);
                }
                // From our backup: it will not keep this session.
                self.call(session, |s| s.backup_lost(from));
            }
            ControlMessage::Load(load) => {
                self.loads.insert(from.clone(), (load, now));
                self.sent_since_report.remove(from);
                self.peers_down.remove(from);
                self.peers_left.remove(from);
                self.events.push_back(ServerEvent::PeerLoad {
                    peer: from.clone(),
                    load,
                });
            }
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
            | ControlMessage::OperatorDrain { .. }
            | ControlMessage::OperatorDrained { .. }
            | ControlMessage::OperatorError { .. } => {}
        }
    }

    /// MTCP 4.2.3 "Once S1 receives the state request": the session
    /// verifies, freezes and replies.
    fn on_state_request(&mut self, now: Instant, from: &ServerId, req: u64, m: Migrate) {
        let sid = m.request.session;
        let held = self
            .sessions
            .get(&sid)
            .is_some_and(|(_, s)| s.peek(|s| !s.is_ended()));
        if !held {
            let (reason, text) = if self.is_tombstone(sid) {
                (RejectReason::InvalidState, FINISHED_TEXT)
            } else {
                (RejectReason::NotFound, "no such session")
            };
            self.ctrl_out.push_back((
                from.clone(),
                ControlMessage::StateReject {
                    req,
                    reason,
                    text: text.to_string(),
                },
            ));
            return;
        }
        self.call(sid, |s| s.on_state_request(now, from, req, &m));
    }

    fn on_state_reply(
        &mut self,
        now: Instant,
        from: &ServerId,
        req: u64,
        new_epoch: Epoch,
        image: SessionImage,
    ) {
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
        // A draining client acknowledged bytes beyond its Migrate's
        // position on its old connection: the origin may start there.
        if !p.migrate.request.draining
            && p.migrate.request.down < image.down_base
            && image.down_base <= image.down_snap
        {
            return self.reject(
                inc,
                RejectReason::InvalidState,
                "origin lacks bytes the client needs",
            );
        }
        self.stats.migrations_in += 1;
        self.install_image(
            now,
            inc,
            image,
            new_epoch,
            &p.migrate,
            Some((from.clone(), req)),
            MigrationOutcome::Moved,
        );
    }

    /// The origin could not give the state: resume from a local replica if
    /// there is one (docs/architecture.md 3.6), else tell the client why.
    fn fallback(&mut self, now: Instant, p: PendingMigration, reason: RejectReason, text: String) {
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
        let unusable = Session::check_migrate(&r.secret, (r.epoch, None), None, &m).is_err()
            || m.request.down < r.down.start()
            || r.down_fin.is_some_and(|f| m.request.down > f);
        if unusable {
            return self.reject(inc, reason, text);
        }
        let mut r = self.replicas.remove(&m.request.session).expect("checked");
        let image = r.image(m.request.session);
        self.stats.failovers_in += 1;
        self.install_image(
            now,
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
                let local = self
                    .sessions
                    .get(&session)
                    .and_then(|(_, s)| s.peek(|s| s.is_owned().then(|| s.epoch())));
                if let Some(epoch) = local {
                    // Epochs order live copies: ours, if not older, is the
                    // one clients use: refuse to back up the other, so its
                    // owner stops waiting for us. An older live copy here
                    // is a zombie: the owner's state replaces it. (A frozen
                    // copy stays beside the replica: the client may still
                    // come back for it if it lost its Resumed.)
                    if epoch >= image.epoch {
                        self.ctrl_out
                            .push_back((from.clone(), ControlMessage::Forget { session }));
                        return;
                    }
                    self.call(session, |s| s.supersede("superseded by the owner's state"));
                    self.sessions.remove(&session);
                    self.handed_out.retain(|_, s| *s != session);
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

    /// The control connection to `peer` failed: requests to it fall back
    /// (replica or `OriginUnreachable`); sessions it backs up stop waiting
    /// for it (they keep running without crash tolerance until it is back).
    /// Visits every session (a rare event).
    pub fn handle_peer_down(&mut self, now: Instant, peer: &ServerId) {
        self.bump(now);
        // No session goes to it until it reports again.
        if self.loads.remove(peer).is_some_and(|(l, _)| l.draining) {
            self.peers_left.insert(peer.clone());
        }
        self.peers_down.insert(peer.clone());
        let reqs: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| &p.migrate.request.origin == peer)
            .map(|(r, _)| *r)
            .collect();
        for req in reqs {
            let p = self.pending.remove(&req).expect("listed");
            self.fallback(
                now,
                p,
                RejectReason::OriginUnreachable,
                format!("origin {peer} unreachable"),
            );
        }
        let orphan = self.cfg.timeouts.orphan;
        for (sid, r) in self.replicas.iter_mut().filter(|(_, r)| &r.owner == peer) {
            if r.stale_since.is_none() {
                r.stale_since = Some(now);
                self.timers.insert((now + orphan, Timer::Replica(*sid)));
            }
        }
        let concerned: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, (_, s))| s.peek(|s| s.backed_up_by(peer) || s.waits_gap_from(peer)))
            .map(|(sid, _)| *sid)
            .collect();
        for sid in concerned {
            self.call(sid, |s| s.peer_down(now, peer));
        }
    }

    /// The control connection to `peer` is (again) up: replicas it keeps for
    /// us are re-sent whole. Visits every session (a rare event).
    pub fn handle_peer_up(&mut self, now: Instant, peer: &ServerId) {
        self.bump(now);
        self.peers_down.remove(peer);
        let sids: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, (_, s))| s.peek(|s| s.backup_down_on(peer)))
            .map(|(sid, _)| *sid)
            .collect();
        for sid in sids {
            self.call(sid, |s| s.resync(peer));
        }
    }

    // ----- load, balance and drain ---------------------------------------------

    /// How many bytes per second this server's sessions moved lately, for
    /// its load reports (the runtime measures it; `0` if it does not).
    pub fn set_throughput(&mut self, bytes_per_sec: u64) {
        self.throughput = bytes_per_sec;
    }

    /// This server's load as its peers are told it. Visits every session.
    pub fn load(&self) -> LoadReport {
        let owned = self
            .sessions
            .values()
            .filter(|(_, s)| s.peek(|s| s.is_owned()))
            .count();
        LoadReport {
            sessions: u32::try_from(owned).unwrap_or(u32::MAX),
            capacity: u32::try_from(self.cfg.max_sessions).unwrap_or(u32::MAX),
            bytes_per_sec: self.throughput,
            draining: self.drain.is_some(),
        }
    }

    /// Whether `peer` left the pool in order: it said it was draining,
    /// then its link went down (and it has not reported since).
    pub fn peer_left(&self, peer: &ServerId) -> bool {
        self.peers_left.contains(peer)
    }

    /// The peers' last load reports, and when each came.
    pub fn peer_loads(&self) -> impl Iterator<Item = (&ServerId, &LoadReport, Instant)> + '_ {
        self.loads.iter().map(|(id, (l, at))| (id, l, *at))
    }

    /// Peers that may take sessions now: a fresh report, link up, not
    /// draining, room below their capacity.
    fn candidates(&self, now: Instant) -> Vec<Candidate> {
        let Some(b) = &self.cfg.balance else {
            return Vec::new();
        };
        let mut c: Vec<Candidate> = self
            .loads
            .iter()
            .filter(|(_, (l, at))| {
                !l.draining
                    && l.sessions < l.capacity
                    && now.saturating_duration_since(*at) < b.stale_after
            })
            .map(|(id, (l, _))| {
                let mut load = *l;
                let sent = self.sent_since_report.get(id).copied().unwrap_or(0);
                load.sessions = load.sessions.saturating_add(sent);
                Candidate {
                    id: id.clone(),
                    load,
                }
            })
            .filter(|c| c.load.sessions < c.load.capacity)
            .collect();
        c.sort_by(|a, b| a.id.cmp(&b.id));
        c
    }

    /// Sends `session`'s client to `dest` for the rebalancer, a drain or a
    /// new session sent on, counting it against `dest`'s load until its
    /// next report (which shows it, as it arrives in a few milliseconds).
    fn send_to(&mut self, session: SessionId, dest: ServerId) -> bool {
        if !self.trigger(session, Some(dest.clone())) {
            return false;
        }
        *self.sent_since_report.entry(dest).or_default() += 1;
        true
    }

    /// Sends this server's load to every peer, and arms the next report.
    fn report_load(&mut self, now: Instant) {
        let Some(b) = &self.cfg.balance else {
            return;
        };
        let next = now + b.report_every;
        self.timers.insert((next, Timer::Load));
        self.send_load(now);
    }

    /// A report to every peer; one whose link failed (and that has not
    /// been heard from since) only every tenth period: a report dials a
    /// peer that is not connected, and a peer that is gone for good must
    /// not be dialled every second.
    fn send_load(&mut self, now: Instant) {
        if self.cfg.alternates.is_empty() {
            // Nobody to tell: the visit of every session is not made.
            return;
        }
        let load = self.load();
        self.owned_at_report = Some((now, load.sessions));
        let retry = self.reports % 10 == 0;
        self.reports += 1;
        for a in &self.cfg.alternates {
            if retry || !self.peers_down.contains(&a.id) {
                self.ctrl_out
                    .push_back((a.id.clone(), ControlMessage::Load(load)));
            }
        }
    }

    /// Sessions owned here, attached to a client, that started or arrived
    /// at least `residence` before `now`, oldest first, skipping `skip`.
    fn movable(
        &self,
        now: Instant,
        residence: std::time::Duration,
        skip: impl Fn(&SessionId) -> bool,
    ) -> Vec<SessionId> {
        let mut v: Vec<SessionInfo> = self
            .sessions
            .iter()
            .filter(|(sid, _)| !skip(sid))
            .filter_map(|(_, (_, s))| {
                s.peek(|s| (s.is_live() && s.incarnation().is_some()).then(|| s.info()))
            })
            .filter(|i| now.saturating_duration_since(i.since) >= residence)
            .collect();
        v.sort_by_key(|i| (i.since, i.session.0));
        v.into_iter().map(|i| i.session).collect()
    }

    /// A rebalancer round (see [`balance::rebalance`]).
    fn rebalance(&mut self, now: Instant) {
        let Some(b) = self.cfg.balance.clone() else {
            return;
        };
        let Some(r) = b.rebalance.clone() else {
            return;
        };
        let next = self.rebalance_round(now, &b, &r);
        self.timers.insert((next, Timer::Balance));
    }

    /// One look of the rebalancer; returns when to look next. Sessions sent
    /// away in the last round count as this server's until they left, and
    /// a peer's report shows them only after it took them: the next round
    /// waits until they all left (or `5 x settle`) and then two reports,
    /// so no round acts on loads that do not count sessions in flight.
    fn rebalance_round(
        &mut self,
        now: Instant,
        b: &super::BalanceConfig,
        r: &super::RebalanceConfig,
    ) -> Instant {
        let reports = 2 * b.report_every;
        if !self.rebalance_sent.is_empty() {
            let sessions = &self.sessions;
            self.rebalance_sent.retain(|sid| {
                sessions
                    .get(sid)
                    .is_some_and(|(_, s)| s.peek(|s| s.is_owned()))
            });
            if !self.rebalance_sent.is_empty() && now < self.rebalance_at + 5 * r.settle {
                return now + b.report_every;
            }
            self.rebalance_sent.clear();
            self.rebalance_at = now;
        }
        let ready = (self.rebalance_at + r.settle).max(self.rebalance_at + reports);
        if now < ready {
            return ready;
        }
        if self.drain.is_some() {
            return now + r.settle;
        }
        let candidates = self.candidates(now);
        if candidates.is_empty() {
            // No live peer to move sessions to (the rebalancer stands
            // down, as `balance::rebalance` would say): the visit of every
            // session that counts this server's own is not made.
            self.rebalancing = false;
            return now + b.report_every;
        }
        // Counted at the last report if it is less than a period old (the
        // count is a visit of every session).
        let own = match self.owned_at_report {
            Some((at, n)) if now < at + b.report_every => n,
            _ => self.load().sessions,
        } as usize;
        // How many may move is known only from the session list: decide
        // with `own` as its bound, and list the sessions only to move some.
        let dests = balance::rebalance(own, own, &candidates, r, &mut self.rebalancing);
        if dests.is_empty() {
            return now + b.report_every;
        }
        // Sessions sent away lately and still here (their client did not
        // follow) are not the first to go again.
        let forget = 10 * r.settle;
        self.rebalance_tried.retain(|_, at| now < *at + forget);
        let tried = &self.rebalance_tried;
        let movable = self.movable(now, r.min_residence, |sid| tried.contains_key(sid));
        for (sid, dest) in movable.into_iter().zip(dests) {
            if self.send_to(sid, dest) {
                self.rebalance_sent.push(sid);
                self.rebalance_tried.insert(sid, now);
            }
        }
        if self.rebalance_sent.is_empty() {
            return now + b.report_every;
        }
        let sent = self.rebalance_sent.len() as u64;
        self.rebalance_at = now;
        self.stats.rebalanced += sent;
        self.events
            .push_back(ServerEvent::Rebalanced { sessions: sent });
        now + b.report_every
    }

    /// Starts draining (or moves the deadline of a drain under way): no
    /// new session is kept here (new clients are sent to peers, migrations
    /// in are refused with `Busy`), peers learn it at once, and every
    /// session is sent to the live peers, least loaded first, again every
    /// [`BalanceConfig::retrigger`](super::BalanceConfig::retrigger) while it is still here. Sessions still
    /// here at `deadline`, or when no peer took any for
    /// [`BalanceConfig::stale_after`](super::BalanceConfig::stale_after), are ended with
    /// `Reject(Shutdown)`. [`ServerEvent::Drained`] reports the end.
    /// Without a [`ServerConfig::balance`] there are no peers to send
    /// sessions to: they are all ended at once.
    pub fn drain(&mut self, now: Instant, deadline: Instant) {
        self.bump(now);
        match &mut self.drain {
            Some(d) => {
                // Only the deadline moves; an earlier one needs a round then.
                d.deadline = deadline;
                if !d.done && deadline.max(now) < d.next_round {
                    d.next_round = deadline.max(now);
                    self.timers.insert((d.next_round, Timer::Drain));
                }
                return;
            }
            None => {
                self.drain = Some(Drain {
                    started: now,
                    deadline,
                    last_live: now,
                    queue: VecDeque::new(),
                    tried: HashMap::new(),
                    next_round: now,
                    sent: HashMap::new(),
                    moved: 0,
                    finished: 0,
                    closed: 0,
                    done: false,
                });
                self.send_load(now);
            }
        }
        self.drain_round(now);
    }

    /// Where a drain stands (`None`: not draining).
    pub fn drain_status(&self) -> Option<DrainStatus> {
        let d = self.drain.as_ref()?;
        Some(DrainStatus {
            remaining: self.sessions.len() as u64,
            moved: d.moved,
            finished: d.finished,
            closed: d.closed,
            done: d.done,
        })
    }

    fn drain_round(&mut self, now: Instant) {
        let Some(d) = &self.drain else {
            return;
        };
        if d.done {
            return;
        }
        let deadline = d.deadline;
        let cfg = self.cfg.balance.clone().unwrap_or_default();
        let retrigger = cfg.retrigger;
        let candidates = if self.cfg.balance.is_some() {
            self.candidates(now)
        } else {
            Vec::new()
        };
        // No peer could take sessions for stale_after (a peer's reports
        // may be late for a moment): nobody will.
        let last_live = if candidates.is_empty() {
            d.last_live
        } else {
            now
        };
        let hopeless = candidates.is_empty()
            && (self.cfg.balance.is_none() || now >= last_live + cfg.stale_after);
        if let Some(d) = &mut self.drain {
            d.last_live = last_live;
        }
        if now >= deadline || hopeless {
            // At the deadline every session; when no peer is live, those
            // the application still serves (a released one is finishing:
            // it has until the deadline).
            self.close_all(now, now >= deadline);
        } else {
            // Sent long ago and still here: send again (maybe elsewhere).
            let d = self.drain.as_mut().expect("checked");
            d.sent.retain(|_, at| now < *at + retrigger);
            let d = self.drain.as_ref().expect("checked");
            let mut todo = self.movable(now, std::time::Duration::ZERO, |sid| {
                d.sent.contains_key(sid)
            });
            // Never tried first, then the longest ago (stable: oldest
            // session first among equals).
            todo.sort_by_key(|sid| d.tried.get(sid).copied());
            let d = self.drain.as_mut().expect("checked");
            d.tried.retain(|_, at| now < *at + 10 * retrigger);
            d.queue = todo.into();
            self.drain_pump(now);
        }
        let owned = self.load().sessions;
        let d = self.drain.as_mut().expect("checked");
        // Sessions ended at the deadline leave once their Reject is
        // written; one whose client does not read is not waited for long.
        let late = now >= deadline + retrigger;
        // Over when nothing is left here: no session, not even a frozen
        // copy on its way out, no migration in still waiting for its state
        // (it would be installed here after the drain), and no session
        // that finished lately (its client may still come back for the
        // last acknowledgement it lost: the tombstone answers it).
        let lingering = self.last_finish.is_some_and(|t| now < t + retrigger) && now < deadline;
        let empty = self.sessions.is_empty() && self.pending.is_empty() && !lingering;
        if (owned == 0 && (empty || now >= deadline)) || late {
            d.done = true;
            let report = DrainReport {
                moved: d.moved,
                finished: d.finished,
                closed: d.closed,
                duration: now.saturating_duration_since(d.started),
            };
            self.events.push_back(ServerEvent::Drained(report));
            // Migrations in still waiting for their state will not be
            // installed here: their clients go elsewhere (the origin keeps
            // the state, unacknowledged, for them).
            let waiting: Vec<u64> = self.pending.keys().copied().collect();
            for req in waiting {
                let p = self.pending.remove(&req).expect("listed");
                if let Some(inc) = p.inc {
                    self.reject(inc, RejectReason::Busy, "server stopping");
                }
            }
        } else {
            let next = if deadline > now {
                (now + cfg.drain_round).min(deadline)
            } else {
                now + cfg.drain_round
            };
            d.next_round = next;
            self.timers.insert((next, Timer::Drain));
        }
    }

    /// Sends the next sessions of the drain's queue to the least loaded
    /// candidates, while fewer than `drain_parallel` are on their way.
    fn drain_pump(&mut self, now: Instant) {
        let parallel = self
            .cfg
            .balance
            .as_ref()
            .map_or(0, |b| b.drain_parallel.max(1));
        let Some(d) = &mut self.drain else {
            return;
        };
        let room = parallel.saturating_sub(d.sent.len());
        if room == 0 || d.queue.is_empty() || d.done {
            return;
        }
        let mut picks = Vec::with_capacity(room.min(d.queue.len()));
        while picks.len() < room {
            let Some(sid) = d.queue.pop_front() else {
                break;
            };
            if !d.sent.contains_key(&sid) {
                picks.push(sid);
            }
        }
        for sid in picks {
            let Some(dest) = balance::spread(1, &self.candidates(now)).pop() else {
                break;
            };
            if self.send_to(sid, dest) {
                if let Some(d) = &mut self.drain {
                    d.sent.insert(sid, now);
                    d.tried.insert(sid, now);
                }
            }
        }
    }

    /// Ends every session owned here with `Reject(Shutdown)` (the drain
    /// could not move them).
    fn close_all(&mut self, now: Instant, released_too: bool) {
        let owned: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, (_, s))| {
                s.peek(|s| {
                    if released_too {
                        s.is_owned()
                    } else {
                        s.is_live()
                    }
                })
            })
            .map(|(sid, _)| *sid)
            .collect();
        for sid in owned {
            if self
                .call(sid, |s| s.abort(now, RejectReason::Shutdown, ABORT_TEXT))
                .unwrap_or(false)
            {
                if let Some(d) = &mut self.drain {
                    d.closed += 1;
                }
            }
        }
    }

    // ----- time ---------------------------------------------------------------

    /// The next instant at which [`Endpoint::handle_timeout`] must be
    /// called. Its cost does not depend on the number of sessions.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timer = self.timers.first().map(|(t, _)| *t);
        let tomb = self.tombstones.front().map(|(t, _)| *t);
        timer.into_iter().chain(tomb).min()
    }

    /// Expires whatever timed out by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.bump(now);
        while self.tombstones.front().is_some_and(|(t, _)| *t <= now) {
            let (t, sid) = self.tombstones.pop_front().expect("checked");
            if self.tombstoned.get(&sid) == Some(&t) {
                self.tombstoned.remove(&sid);
            }
        }
        while let Some((at, timer)) = self.timers.first().cloned() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            match timer {
                Timer::Handshake(inc) => {
                    let stale = self.incs.get(&inc).is_some_and(|i| {
                        matches!(
                            i.phase,
                            IncPhase::Preamble | IncPhase::AwaitFirst | IncPhase::AwaitProof(_)
                        )
                    });
                    if stale {
                        self.close_inc(inc, "handshake timeout".into());
                    }
                }
                Timer::Pending(req) => {
                    if self.pending.get(&req).is_some_and(|p| p.deadline <= now) {
                        let p = self.pending.remove(&req).expect("checked");
                        let text =
                            format!("origin {} did not answer in time", p.migrate.request.origin);
                        self.fallback(now, p, RejectReason::OriginUnreachable, text);
                    }
                }
                Timer::Session(sid) => {
                    self.call(sid, |s| s.handle_timeout(now));
                }
                Timer::Load => self.report_load(now),
                Timer::Balance => self.rebalance(now),
                Timer::Drain => {
                    if self.drain.as_ref().is_some_and(|d| d.next_round == at) {
                        self.drain_round(now);
                    }
                }
                Timer::Replica(sid) => {
                    let orphan = self.cfg.timeouts.orphan;
                    if self
                        .replicas
                        .get(&sid)
                        .and_then(|r| r.stale_since)
                        .is_some_and(|since| since + orphan <= now)
                    {
                        self.replicas.remove(&sid);
                    }
                }
            }
        }
    }

    // ----- output ---------------------------------------------------------------

    /// The next thing to send from the endpoint itself: a message for a
    /// peer, or frames for a connection not attached to a session
    /// (Challenge, Reject). Appends segments to `out` and says where they
    /// go; `None` when nothing is waiting.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<Bytes>) -> Option<Dest> {
        self.bump(now);
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
            let mut b = BytesMut::new();
            for f in i.out.drain(..) {
                f.encode(&mut b);
            }
            if !b.is_empty() {
                out.push(b.freeze());
                return Some(Dest::Incarnation(inc));
            }
        }
        None
    }

    /// The next event for the runtime or the application.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }
}
