//! The client side of the session protocol: one [`Client`] per session.
//!
//! The client is the sole initiator of every migration (MTCP 3.2.1): on an
//! explicit [`Client::migrate`], on a Trigger from a server, or when its
//! server fails, it opens a new incarnation to another server and sends
//! `Migrate` with its down-stream position. It stops sending on the old
//! incarnation at that moment. Unless that incarnation's server failed, it
//! keeps the incarnation and reads what arrives there, acknowledging it at
//! once, so the data in flight reaches it over that connection instead of
//! travelling with the state (MTCP thesis, section 4.2.3, step 5; see
//! docs/migration.md). The new server may resume the down stream below the
//! client's position (the client drops the bytes it already has: MTCP's β
//! correction, done at the client) or beyond it: the client then catches up
//! on the old incarnation, or tells the new server where that one ended
//! (`Missing`), before the new server's bytes follow.
//!
//! # Driving it
//!
//! Call [`Client::start`], then answer each [`ClientEvent::Connect`] by
//! opening a TCP connection (with TLS on it) for that incarnation to that
//! server and calling [`Client::handle_connected`] with its channel
//! binding once it is up; feed what it reads to [`Client::handle_input`]
//! and report its end with [`Client::handle_incarnation_closed`]. Drain [`Client::poll_transmit`]
//! and [`Client::poll_event`] after every call, and call
//! [`Client::handle_timeout`] when [`Client::poll_timeout`] has passed.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::config::{ClientTimeouts, Limits};
use crate::error::{AppError, ProtocolError, SessionError};
use crate::frame::{Frame, MigrateRequest, RejectReason, PREAMBLE};
use crate::mac::{migrate_mac, next_secret};
use crate::stream::{idle_scratch, take_scratch, ByteQueue};
use crate::types::{Alternate, Epoch, IncarnationId, Pos, Secret, ServerId, SessionId};

/// Most unanswered pings [`Client::ping`] remembers.
const MAX_PINGS: usize = 16;

/// Configuration of a client session.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Buffer and frame limits.
    pub limits: Limits,
    /// Timeouts.
    pub timeouts: ClientTimeouts,
    /// Do not migrate on a server's Trigger (only report it). Off by
    /// default: triggers are followed.
    pub ignore_triggers: bool,
    /// How many times every known server is tried before the session is
    /// given up as lost (connections can fail transiently). Default 3.
    pub failover_rounds: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            timeouts: ClientTimeouts::default(),
            ignore_triggers: false,
            failover_rounds: 3,
        }
    }
}

pub use crate::types::MigrationCause;

/// Something the runtime or the application must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// Open a TCP connection for `inc` to `server` (`None`: the initial
    /// connection, to an address of the runtime's choosing).
    Connect {
        /// The incarnation to carry.
        inc: IncarnationId,
        /// The server to reach.
        server: Option<ServerId>,
    },
    /// Close this connection (an abandoned incarnation).
    CloseIncarnation(IncarnationId),
    /// The session started.
    Established {
        /// The session.
        session: SessionId,
        /// Its server.
        server: ServerId,
    },
    /// A migration began.
    MigrationStarted {
        /// Where to.
        to: ServerId,
        /// Why.
        cause: MigrationCause,
    },
    /// The session resumed at another server.
    Migrated {
        /// Previous server.
        from: ServerId,
        /// New server.
        to: ServerId,
        /// New epoch.
        epoch: Epoch,
    },
    /// A migration attempt failed; the client tries the next server.
    AttemptFailed {
        /// The server tried.
        server: ServerId,
        /// Why it failed.
        reason: String,
    },
    /// The current server answered a Ping sent with [`Client::ping`].
    Pong {
        /// The Ping's nonce.
        nonce: u64,
        /// From the Ping queued to its Pong read.
        rtt: Duration,
    },
    /// A server asked the client to migrate.
    Triggered {
        /// Suggested destination.
        dest: Option<ServerId>,
    },
    /// Bytes (or the end of the stream) can be read.
    Readable,
    /// Buffer space can be written.
    Writable,
    /// Both directions are closed and acknowledged.
    Finished,
    /// The session is lost: see the error (fail closed).
    Failed(SessionError),
}

#[derive(Debug)]
enum Phase {
    Idle,
    Connecting {
        inc: IncarnationId,
        deadline: Instant,
    },
    Established,
    Migrating {
        inc: IncarnationId,
        target: ServerId,
        deadline: Instant,
        /// Sent once the connection is up; kept to answer a challenge.
        request: MigrateRequest,
        /// The connection is up and its Migrate sent: with its proof over
        /// the channel binding (`Some(true)`), or awaiting a Challenge
        /// (`Some(false)`, plaintext).
        bound: Option<bool>,
        /// Its proof is out: the origin may be asked for the state now.
        proved: bool,
    },
    Failed(SessionError),
    Finished,
}

#[derive(Debug)]
struct Identity {
    session: SessionId,
    secret: Secret,
    epoch: Epoch,
    owner: ServerId,
    /// The owner keeps a replica of the session (see `Frame::Welcome`).
    replicated: bool,
}

#[derive(Debug, Default)]
struct CInc {
    rx: BytesMut,
    out: BytesMut,
}

/// Counters of what the client did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Successful migrations.
    pub migrations: u64,
    /// Failed migration attempts.
    pub failed_attempts: u64,
    /// Up bytes sent again after migrations.
    pub bytes_resent: u64,
}

/// A resumed session whose new server starts the down stream beyond what
/// the client holds (the origin answered without waiting for the data in
/// flight, see docs/migration.md). The new server sends nothing down until
/// the client shows it caught up (its first frame there) or says where its
/// old connection ended (`Missing`).
#[derive(Debug, Clone, Copy)]
struct CatchUp {
    /// The resume point.
    to: Pos,
    /// The old connection is given up then.
    deadline: Instant,
    /// `Missing` was sent: the bytes come on the new connection.
    missing: bool,
}

/// One client session. See the module documentation for how to drive it.
#[derive(Debug)]
pub struct Client {
    cfg: ClientConfig,
    phase: Phase,
    id: Option<Identity>,
    /// Migrate requests made so far (the next request's attempt number).
    attempts: u64,
    alternates: Vec<Alternate>,
    /// Servers tried in the current failover round, and rounds done.
    tried: Vec<ServerId>,
    rounds: u32,
    owner_failed: bool,
    cause: MigrationCause,
    last_failure: String,
    cur: Option<IncarnationId>,
    /// The previous incarnation, still read while migrating away from a
    /// live server; what arrives there is acknowledged at once.
    draining: Option<IncarnationId>,
    /// Down bytes the current server sends that the client already has
    /// (received while draining): dropped as they come.
    skip: u64,
    /// The current server resumed beyond what the client holds: the
    /// draining connection still brings the bytes up to there.
    catch_up: Option<CatchUp>,
    /// A migration asked for while catching up: it starts once caught up
    /// (the bytes still on their way are only at the origin).
    deferred: Option<(Option<ServerId>, MigrationCause)>,
    /// The current server knows the client holds its Close (it sent it,
    /// or the Migrate said so): acknowledgements may confirm it.
    fin_known: bool,
    /// The server's Close came on a draining connection and no server
    /// holding the session has its acknowledgement yet: the session is not
    /// finished before one does (else the new server would wait for it).
    fin_unconfirmed: bool,
    incs: HashMap<IncarnationId, CInc>,
    ready: VecDeque<IncarnationId>,
    next_inc: u64,
    // Up stream: [up_una, up_end) kept until acknowledged.
    up: ByteQueue,
    up_sent: Pos,
    up_limit: Pos,
    up_fin: Option<Pos>,
    up_fin_sent: bool,
    up_fin_acked: bool,
    // Down stream: [app_read, down_rcv) received and not yet read.
    down: ByteQueue,
    down_fin: Option<Pos>,
    ack_sent: Pos,
    limit_sent: Pos,
    fin_ack_sent: bool,
    ack_due: bool,
    /// When a delayed acknowledgement is sent at the latest.
    ack_at: Option<Instant>,
    /// An Ack must go out on a fresh incarnation to confirm it.
    confirm: bool,
    /// The current incarnation delivered data or acks since it started.
    progress: bool,
    last_rx: Instant,
    ping_sent: Option<Instant>,
    /// Pings sent with [`Client::ping`] on the current incarnation and not
    /// answered yet: (nonce, sent), oldest first, at most `MAX_PINGS`.
    pings: VecDeque<(u64, Instant)>,
    /// The nonce of the next Ping.
    next_nonce: u64,
    events: VecDeque<ClientEvent>,
    stats: ClientStats,
    /// Where frame headers are encoded (see `take_scratch`).
    scratch: BytesMut,
}

impl Client {
    /// A client that has not connected yet.
    pub fn new(cfg: ClientConfig, now: Instant) -> Self {
        Self {
            cfg,
            phase: Phase::Idle,
            id: None,
            attempts: 0,
            alternates: Vec::new(),
            tried: Vec::new(),
            rounds: 0,
            owner_failed: false,
            cause: MigrationCause::Requested,
            last_failure: String::new(),
            cur: None,
            draining: None,
            skip: 0,
            catch_up: None,
            deferred: None,
            fin_known: false,
            fin_unconfirmed: false,
            incs: HashMap::new(),
            ready: VecDeque::new(),
            next_inc: 0,
            up: ByteQueue::new(0),
            up_sent: 0,
            up_limit: 0,
            up_fin: None,
            up_fin_sent: false,
            up_fin_acked: false,
            down: ByteQueue::new(0),
            down_fin: None,
            ack_sent: 0,
            limit_sent: 0,
            fin_ack_sent: false,
            ack_due: false,
            ack_at: None,
            confirm: false,
            progress: false,
            last_rx: now,
            ping_sent: None,
            pings: VecDeque::new(),
            next_nonce: 0,
            events: VecDeque::new(),
            stats: ClientStats::default(),
            scratch: BytesMut::new(),
        }
    }

    /// Starts the session: asks for a connection to a server of the pool,
    /// on which Hello is sent.
    pub fn start(&mut self, now: Instant) -> IncarnationId {
        let inc = self.new_inc();
        let window = self.cfg.limits.recv_window;
        self.limit_sent = window;
        self.push_frame(inc, Frame::Hello { window });
        self.phase = Phase::Connecting {
            inc,
            deadline: now + self.cfg.timeouts.handshake,
        };
        self.events
            .push_back(ClientEvent::Connect { inc, server: None });
        inc
    }

    /// The connection of `inc` is up (TCP, and TLS when the pool uses it).
    /// `binding` is its channel binding: the value both ends export from
    /// its TLS session ([`BINDING_LABEL`](crate::mac::BINDING_LABEL),
    /// 32 bytes), `None` for a plaintext connection. A migration's Migrate
    /// goes out now, with its proof over the binding (or, without one, to
    /// be challenged by the server).
    pub fn handle_connected(
        &mut self,
        _now: Instant,
        inc: IncarnationId,
        binding: Option<[u8; 32]>,
    ) {
        let Phase::Migrating {
            inc: i,
            request,
            bound,
            proved,
            ..
        } = &mut self.phase
        else {
            return;
        };
        if *i != inc || bound.is_some() {
            return;
        }
        *bound = Some(binding.is_some());
        *proved = binding.is_some();
        let request = request.clone();
        self.push_frame(inc, Frame::Migrate(request.clone()));
        if let Some(b) = binding {
            let secret = &self
                .id
                .as_ref()
                .expect("migrating sessions are established")
                .secret;
            let mac = migrate_mac(secret, &request, &b);
            self.push_frame(inc, Frame::Proof { mac });
        }
    }

    fn new_inc(&mut self) -> IncarnationId {
        self.next_inc += 1;
        let inc = IncarnationId(self.next_inc);
        let mut c = CInc::default();
        c.out.extend_from_slice(&PREAMBLE);
        self.incs.insert(inc, c);
        inc
    }

    fn push_frame(&mut self, inc: IncarnationId, frame: Frame) {
        if let Some(c) = self.incs.get_mut(&inc) {
            frame.encode(&mut c.out);
            if !self.ready.contains(&inc) {
                self.ready.push_back(inc);
            }
        }
    }

    /// Something may be sent: on the current incarnation, and on the
    /// draining one (its acknowledgements and window updates).
    fn mark_ready(&mut self) {
        for inc in [self.cur, self.draining].into_iter().flatten() {
            if !self.ready.contains(&inc) {
                self.ready.push_back(inc);
            }
        }
    }

    /// What the client has done so far.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// The session id, once established.
    pub fn session(&self) -> Option<SessionId> {
        self.id.as_ref().map(|i| i.session)
    }

    /// The server that owns the session as far as the client knows.
    pub fn server(&self) -> Option<&ServerId> {
        self.id.as_ref().map(|i| &i.owner)
    }

    /// The session's epoch as the client knows it.
    pub fn epoch(&self) -> Option<Epoch> {
        self.id.as_ref().map(|i| i.epoch)
    }

    /// The servers the client may migrate to (learned from the pool).
    pub fn alternates(&self) -> &[Alternate] {
        &self.alternates
    }

    /// Whether the session is established and not migrating.
    pub fn is_established(&self) -> bool {
        matches!(self.phase, Phase::Established)
    }

    /// The incarnation that carries the session's data now, if any.
    pub fn current_incarnation(&self) -> Option<IncarnationId> {
        self.cur
            .filter(|_| matches!(self.phase, Phase::Established))
    }

    /// Whether the runtime should read `inc` now. Not the connection the
    /// client drains while its migration's handshake is under way: the
    /// handshake goes first (on a busy host the stream would otherwise take
    /// the cores it needs), and the data waits in the socket. A replicated
    /// session's origin waits for the client's acknowledgements before it
    /// answers the state request: its client reads again once its proof is
    /// out.
    pub fn wants_input(&self, inc: IncarnationId) -> bool {
        let replicated = self.id.as_ref().is_some_and(|i| i.replicated);
        !(self.draining == Some(inc)
            && matches!(self.phase, Phase::Migrating { proved, .. } if !proved || !replicated))
    }

    /// Whether a migration is under way.
    pub fn is_migrating(&self) -> bool {
        matches!(self.phase, Phase::Migrating { .. })
    }

    /// Whether a migration is under way or asked for: one asked for while
    /// the client catches up (see [`Client::is_catching_up`]) starts once
    /// it has.
    pub fn migration_pending(&self) -> bool {
        self.is_migrating() || (self.deferred.is_some() && !self.is_finished())
    }

    /// Whether the session resumed at a new server beyond what the client
    /// holds, and the rest of the way still comes over the old connection
    /// (or, if that ended short, from the new server): the new server's
    /// data follows once the client holds the resume point.
    pub fn is_catching_up(&self) -> bool {
        self.catch_up.is_some()
    }

    /// The error that ended the session, if it failed.
    pub fn failure(&self) -> Option<&SessionError> {
        match &self.phase {
            Phase::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// Whether both directions finished.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    /// Both directions are closed and acknowledged: no server is needed any
    /// more, only the application's reading of what is buffered.
    fn wire_done(&self) -> bool {
        self.down_fin.is_some() && self.up_fin_acked
    }

    /// Both Closes are out (ours sent, the server's received): only the
    /// ack of ours is missing, so voluntary migrations are pointless.
    fn closing(&self) -> bool {
        self.down_fin.is_some() && self.up_fin_sent
    }

    fn check_finished(&mut self) {
        // The ack of the server's Close is a courtesy: with no connection
        // left (the server closed or failed) there is no one to send it to.
        // A Close that came on a draining connection is confirmed to the
        // server that resumes the session.
        if self.wire_done()
            && self.down.is_empty()
            && (self.fin_ack_sent || self.cur.is_none())
            && !self.fin_unconfirmed
            && !matches!(self.phase, Phase::Finished | Phase::Failed(_))
        {
            self.phase = Phase::Finished;
            self.events.push_back(ClientEvent::Finished);
            for inc in self.incs.keys().copied().collect::<Vec<_>>() {
                self.abandon(inc);
            }
            self.cur = None;
        }
    }

    /// Stream positions, for diagnostics: (up acked, up sent, up end, up
    /// limit, up fin, fin acked, down read, down received, down fin).
    #[doc(hidden)]
    pub fn debug_positions(&self) -> String {
        format!(
            "phase {:?} up [{}, sent {}, {}) limit {} fin {:?} acked {} | down [{}, {}) fin {:?} ack_sent {} fin_ack_sent {}",
            self.phase,
            self.up.start(),
            self.up_sent,
            self.up.end(),
            self.up_limit,
            self.up_fin,
            self.up_fin_acked,
            self.down.start(),
            self.down.end(),
            self.down_fin,
            self.ack_sent,
            self.fin_ack_sent
        )
    }

    /// Bytes received so far (the down position `c`).
    pub fn down_received(&self) -> Pos {
        self.down.end()
    }

    // ----- migration ---------------------------------------------------------

    /// Migrates the session now, to `dest` or to the next alternate. Fails
    /// when the session is not established (or already migrating).
    pub fn migrate(&mut self, now: Instant, dest: Option<ServerId>) -> Result<(), SessionError> {
        match &self.phase {
            Phase::Established => {}
            Phase::Finished => return Err(SessionError::Closed),
            Phase::Failed(e) => return Err(e.clone()),
            Phase::Migrating { .. } => {
                return Err(SessionError::Unestablished(
                    "a migration is under way".into(),
                ))
            }
            Phase::Idle | Phase::Connecting { .. } => {
                return Err(SessionError::Unestablished(
                    "session not established".into(),
                ))
            }
        }
        if self.closing() {
            return Err(SessionError::Closed);
        }
        self.tried.clear();
        self.owner_failed = false;
        self.begin_migration(now, dest, MigrationCause::Requested);
        Ok(())
    }

    /// Sends a Ping to the current server now and returns its nonce; a
    /// [`ClientEvent::Pong`] with the round-trip time follows when the
    /// server answers. For a liveness check of a server process (its
    /// kernel may still acknowledge TCP while the process hangs). `None`
    /// when the session is not attached to a server (connecting,
    /// migrating, catching up after one, ended). At most `MAX_PINGS` pings
    /// are remembered: an answer to an older one is not reported.
    pub fn ping(&mut self, now: Instant) -> Option<u64> {
        // A frame on the new connection would tell its server that the
        // client caught up.
        let inc = self
            .current_incarnation()
            .filter(|_| self.catch_up.is_none())?;
        let nonce = self.take_nonce();
        if self.pings.len() == MAX_PINGS {
            self.pings.pop_front();
        }
        self.pings.push_back((nonce, now));
        self.push_frame(inc, Frame::Ping { nonce });
        Some(nonce)
    }

    fn take_nonce(&mut self) -> u64 {
        self.next_nonce = self.next_nonce.wrapping_add(1);
        self.next_nonce
    }

    /// Declares the current server failed (say, it stopped answering
    /// pings): the client leaves its connection at once, without draining
    /// it, and fails over to the other servers as when the connection
    /// breaks (`reason` is kept for the error if no server can resume the
    /// session). Fails when the session is not attached to a server.
    pub fn fail_server(&mut self, now: Instant, reason: &str) -> Result<(), SessionError> {
        match &self.phase {
            Phase::Established if self.cur.is_some() && !self.wire_done() => {}
            Phase::Finished => return Err(SessionError::Closed),
            Phase::Failed(e) => return Err(e.clone()),
            _ => return Err(SessionError::Unestablished("no server attached".into())),
        }
        if let Some(inc) = self.cur.take() {
            self.abandon(inc);
        }
        self.server_failed(now, reason.to_string());
        Ok(())
    }

    /// The next server to try in this failover round.
    fn next_candidate(&self) -> Option<ServerId> {
        let owner = self.id.as_ref().map(|i| i.owner.clone());
        let alts = self.alternates.iter().map(|a| a.id.clone());
        let order: Vec<ServerId> = if self.owner_failed {
            alts.chain(owner).collect()
        } else {
            owner.into_iter().chain(alts).collect()
        };
        order.into_iter().find(|s| !self.tried.contains(s))
    }

    fn begin_migration(&mut self, now: Instant, dest: Option<ServerId>, cause: MigrationCause) {
        if self.catch_up.is_some()
            && !matches!(cause, MigrationCause::ServerFailed | MigrationCause::Retry)
        {
            self.deferred = Some((dest, cause));
            return;
        }
        self.deferred = None;
        let mut target = dest.or_else(|| self.next_candidate());
        if target.is_none() && self.rounds + 1 < self.cfg.failover_rounds {
            self.rounds += 1;
            self.tried.clear();
            target = self.next_candidate();
        }
        let Some(target) = target else {
            let last = std::mem::take(&mut self.last_failure);
            return self.fail(SessionError::NoServerLeft { last });
        };
        // Pings on the old incarnation are answered there, if at all.
        self.pings.clear();
        // Stop sending on the old incarnation; keep it while its server is
        // alive (what is in flight there reaches the client on it).
        if let Some(old) = self.cur.take() {
            if cause == MigrationCause::ServerFailed || self.draining.is_some() {
                self.abandon(old);
            } else {
                // Acknowledge at once what arrived so far (it may wait for
                // a delayed ack): the origin frees it, or, for a replicated
                // session, waits for it before it answers.
                self.draining = Some(old);
                if !self.ready.contains(&old) {
                    self.ready.push_back(old);
                }
            }
        }
        if let Phase::Migrating { inc, .. } = self.phase {
            self.abandon(inc);
        }
        // The next server resumes where it can; the old connection, if
        // still drained, keeps bringing what it carries.
        self.catch_up = None;
        let id = self
            .id
            .as_ref()
            .expect("migrations need an established session");
        self.attempts += 1;
        // A retry keeps the cause of the round it continues.
        if cause != MigrationCause::Retry {
            self.cause = cause;
        }
        let request = MigrateRequest {
            session: id.session,
            origin: id.owner.clone(),
            epoch: id.epoch,
            attempt: self.attempts,
            cause: self.cause,
            // What the current server's stream delivered: bytes the client
            // holds beyond it (`skip`) are ones that server has not
            // regenerated yet, and no other server can know of them.
            down: self.wire_pos(),
            down_fin: self.down_fin.is_some() && self.skip == 0,
            draining: self.draining.is_some(),
            window: self.cfg.limits.recv_window - self.down.len(),
        };
        // The Migrate goes out once the connection is up (its proof covers
        // the connection's channel binding).
        let inc = self.new_inc();
        self.tried.push(target.clone());
        self.phase = Phase::Migrating {
            inc,
            target: target.clone(),
            deadline: now + self.cfg.timeouts.handshake,
            request,
            bound: None,
            proved: false,
        };
        self.events.push_back(ClientEvent::MigrationStarted {
            to: target.clone(),
            cause,
        });
        self.events.push_back(ClientEvent::Connect {
            inc,
            server: Some(target),
        });
    }

    fn abandon(&mut self, inc: IncarnationId) {
        if self.draining == Some(inc) {
            self.draining = None;
        }
        if self.incs.remove(&inc).is_some() {
            self.ready.retain(|i| *i != inc);
            self.events.push_back(ClientEvent::CloseIncarnation(inc));
        }
    }

    /// The server that owns the session ended it (a Reject on an
    /// established connection).
    fn ended_by_owner(&mut self, reason: RejectReason, text: String) {
        if let Some(server) = self.id.as_ref().map(|i| i.owner.clone()) {
            self.fail(SessionError::Rejected {
                server,
                reason,
                text,
            });
        }
    }

    fn fail(&mut self, e: SessionError) {
        if matches!(self.phase, Phase::Failed(_)) {
            return;
        }
        for inc in self.incs.keys().copied().collect::<Vec<_>>() {
            self.abandon(inc);
        }
        self.cur = None;
        self.events.push_back(ClientEvent::Failed(e.clone()));
        self.phase = Phase::Failed(e);
    }

    /// The attempt on the migration target failed: try the next server.
    fn attempt_failed(&mut self, now: Instant, reason: String) {
        let Phase::Migrating { inc, target, .. } = &self.phase else {
            return;
        };
        let (inc, target) = (*inc, target.clone());
        self.abandon(inc);
        self.stats.failed_attempts += 1;
        self.last_failure = format!("{target}: {reason}");
        self.events.push_back(ClientEvent::AttemptFailed {
            server: target,
            reason,
        });
        self.phase = Phase::Established;
        self.begin_migration(now, None, MigrationCause::Retry);
    }

    /// The current server failed: fail over to the alternates.
    fn server_failed(&mut self, now: Instant, reason: String) {
        let owner = self.id.as_ref().map(|i| i.owner.clone());
        self.last_failure = format!(
            "{}: {reason}",
            owner.map_or("server".into(), |o| o.to_string())
        );
        self.owner_failed = true;
        if self.progress {
            self.tried.clear();
            self.rounds = 0;
        }
        self.progress = false;
        self.begin_migration(now, None, MigrationCause::ServerFailed);
    }

    // ----- input ------------------------------------------------------------

    /// Bytes read from the connection of `inc`.
    pub fn handle_input(&mut self, now: Instant, inc: IncarnationId, data: &[u8]) {
        if let Some(c) = self.incs.get_mut(&inc) {
            c.rx.extend_from_slice(data);
        }
        self.process_input(now, inc);
    }

    /// Like [`Client::handle_input`], for a caller that reads into its own
    /// buffer: `buf` holds what this call left last time followed by what
    /// was just read. The frames are taken out of it without a copy; what
    /// is left (a partial frame) stays for the next read to append to.
    pub fn handle_input_buf(&mut self, now: Instant, inc: IncarnationId, buf: &mut BytesMut) {
        if let Some(c) = self.incs.get_mut(&inc) {
            if c.rx.is_empty() {
                std::mem::swap(&mut c.rx, buf);
            } else {
                c.rx.extend_from_slice(buf);
                buf.clear();
            }
        }
        self.process_input(now, inc);
        if let Some(c) = self.incs.get_mut(&inc) {
            std::mem::swap(&mut c.rx, buf);
        }
    }

    /// Keeps a block of a connection's read buffer that frames handed to
    /// [`Client::handle_input_buf`] were carved from, until the bytes
    /// received in it are read (see [`ByteQueue::adopt`]).
    pub fn adopt_read_block(&mut self, block: crate::stream::Block) {
        self.down.adopt(block);
    }

    fn process_input(&mut self, now: Instant, inc: IncarnationId) {
        self.decode_input(now, inc);
        self.check_catch_up(now);
    }

    fn decode_input(&mut self, now: Instant, inc: IncarnationId) {
        let expected = match self.phase {
            Phase::Connecting { inc: i, .. } | Phase::Migrating { inc: i, .. } => Some(i),
            Phase::Established => self.cur,
            _ => None,
        };
        if expected != Some(inc) && self.draining != Some(inc) {
            // An abandoned incarnation (MTCP's BLACKHOLE) or a stray one.
            return;
        }
        if !self.incs.contains_key(&inc) {
            return;
        }
        self.last_rx = now;
        self.ping_sent = None;
        let max_frame = self.cfg.limits.max_frame;
        loop {
            let Some(c) = self.incs.get_mut(&inc) else {
                return;
            };
            let frame = match Frame::decode(&mut c.rx, max_frame) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => return self.protocol_error(now, inc, e.into()),
            };
            if let Err(e) = self.on_frame(now, inc, frame) {
                return self.protocol_error(now, inc, e);
            }
            if !self.incs.contains_key(&inc) {
                return;
            }
        }
    }

    fn protocol_error(&mut self, now: Instant, inc: IncarnationId, e: ProtocolError) {
        if self.draining == Some(inc) {
            // The new server resends what the old one did not deliver.
            self.abandon(inc);
            return self.check_catch_up(now);
        }
        match self.phase {
            Phase::Migrating { inc: i, .. } if i == inc => self.attempt_failed(now, e.to_string()),
            Phase::Established if self.cur == Some(inc) => self.server_failed(now, e.to_string()),
            _ => self.fail(SessionError::Protocol(e)),
        }
    }

    fn on_frame(
        &mut self,
        now: Instant,
        inc: IncarnationId,
        frame: Frame,
    ) -> Result<(), ProtocolError> {
        if self.draining == Some(inc) {
            // Down data and the server's Close still count; the rest is for
            // a session that is leaving this server.
            return match frame {
                Frame::Data(data) => {
                    if self
                        .catch_up
                        .is_some_and(|c| self.wire_pos() + data.len() as u64 > c.to)
                    {
                        return Err(ProtocolError::Position(
                            "data beyond where the new server resumed",
                        ));
                    }
                    self.on_down_data(data)
                }
                Frame::Close { pos } => {
                    self.fin_unconfirmed = true;
                    // While catching up, the new server has not sent its
                    // Close yet: the Close is confirmed to it once it has.
                    let known = self.fin_known;
                    self.on_down_close(pos)?;
                    if self.catch_up.is_some() {
                        self.fin_known = known;
                    }
                    Ok(())
                }
                // The server ended the session while the client was leaving
                // it (a drain's deadline): it exists nowhere now.
                Frame::Reject {
                    reason: RejectReason::Shutdown,
                    text,
                } => {
                    self.ended_by_owner(RejectReason::Shutdown, text);
                    Ok(())
                }
                _ => Ok(()),
            };
        }
        match (&self.phase, frame) {
            (
                Phase::Connecting { .. },
                Frame::Welcome {
                    session,
                    secret,
                    epoch,
                    server,
                    alternates,
                    window,
                    replicated,
                },
            ) => {
                self.id = Some(Identity {
                    session,
                    secret,
                    epoch,
                    owner: server.clone(),
                    replicated,
                });
                self.alternates = alternates;
                self.up_limit = window;
                self.cur = Some(inc);
                self.phase = Phase::Established;
                self.events
                    .push_back(ClientEvent::Established { session, server });
                self.events.push_back(ClientEvent::Writable);
                self.mark_ready();
            }
            (
                Phase::Migrating { .. },
                Frame::Resumed {
                    up,
                    up_fin,
                    down,
                    epoch,
                    server,
                    alternates,
                    window,
                    rekey,
                    replicated,
                },
            ) => self.on_resumed(
                inc, up, up_fin, down, epoch, server, alternates, window, rekey, replicated,
            ),
            (
                Phase::Migrating {
                    request,
                    bound: Some(false),
                    ..
                },
                Frame::Challenge { nonce },
            ) => {
                let secret = &self
                    .id
                    .as_ref()
                    .expect("migrating sessions are established")
                    .secret;
                let mac = migrate_mac(secret, request, &nonce);
                self.push_frame(inc, Frame::Proof { mac });
                if let Phase::Migrating { proved, .. } = &mut self.phase {
                    *proved = true;
                }
            }
            (Phase::Connecting { .. }, Frame::Reject { reason, text }) => {
                self.fail(SessionError::Unestablished(format!("{reason}: {text}")));
            }
            (Phase::Migrating { target, .. }, Frame::Reject { reason, text }) => {
                let server = target.clone();
                match reason {
                    // The session completed while our final Ack was lost.
                    RejectReason::InvalidState
                        if self.closing() && text == crate::server::FINISHED_TEXT =>
                    {
                        self.up_fin_acked = true;
                        // Finished there: it had our acknowledgement too.
                        self.fin_unconfirmed = false;
                        if let Phase::Migrating { inc, .. } = self.phase {
                            self.abandon(inc);
                        }
                        self.phase = Phase::Established;
                        self.check_finished();
                    }
                    // The state exists and this request is wrong, or the
                    // session is over: no other server can do better.
                    RejectReason::AuthFailed
                    | RejectReason::InvalidState
                    | RejectReason::TlsRequired
                    | RejectReason::Shutdown => {
                        self.fail(SessionError::Rejected {
                            server,
                            reason,
                            text,
                        });
                    }
                    _ => self.attempt_failed(now, format!("{reason}: {text}")),
                }
            }
            (Phase::Established, frame) => self.on_established_frame(now, inc, frame)?,
            (_, f) => {
                return Err(ProtocolError::Unexpected {
                    frame: f.name(),
                    why: "not allowed before the session is established or resumed",
                })
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn on_resumed(
        &mut self,
        inc: IncarnationId,
        up: Pos,
        up_fin: bool,
        down: Pos,
        epoch: Epoch,
        server: ServerId,
        alternates: Vec<Alternate>,
        window: u64,
        rekey: Option<[u8; 32]>,
        replicated: bool,
    ) {
        // The server must send from a position the client holds and that
        // is not below its Migrate's (nothing before it is kept), and must
        // hold every up byte we dropped (else it lost acknowledged data).
        let Phase::Migrating { request, .. } = &self.phase else {
            return;
        };
        // Beyond what the client holds: the rest of the way is on the old
        // connection, or (once that ended) the new server fetches it.
        let ahead = down > self.down.end();
        if down < request.down {
            return self.fail(SessionError::Protocol(ProtocolError::Position(
                "server resumes the down stream outside what the client holds",
            )));
        }
        let fin_known = request.down_fin;
        if up < self.up.start() || up > self.up.end() || (up_fin && self.up_fin != Some(up)) {
            return self.fail(SessionError::Protocol(ProtocolError::Position(
                "server resumed the up stream outside the client's buffer (acknowledged data lost)",
            )));
        }
        let id = self
            .id
            .as_mut()
            .expect("migrating sessions are established");
        if (epoch != id.epoch) != rekey.is_some() {
            // A new epoch comes with a new secret, and only a new one.
            return self.fail(SessionError::Protocol(ProtocolError::Unexpected {
                frame: "Resumed",
                why: "a new epoch without a rekey, or a rekey without a new epoch",
            }));
        }
        let from = std::mem::replace(&mut id.owner, server.clone());
        if let Some(k) = rekey {
            // The new epoch's secret (an old one moves nothing any more).
            id.secret = next_secret(&id.secret, &k, epoch);
        }
        id.epoch = epoch;
        id.replicated = replicated;
        // MTCP's implicit ACK: drop what the new server holds, resend the rest.
        self.stats.bytes_resent += self.up_sent.saturating_sub(up);
        self.up.drop_to(up);
        self.up_sent = up;
        self.up_limit = up.saturating_add(window);
        self.up_fin_sent = up_fin;
        self.up_fin_acked = up_fin;
        self.alternates = alternates;
        self.alternates.retain(|a| a.id != server);
        if ahead {
            // The old incarnation still brings [c, down); the new server
            // waits until it did (see `CatchUp`).
            self.catch_up = Some(CatchUp {
                to: down,
                deadline: self.last_rx + self.cfg.timeouts.handshake,
                missing: false,
            });
        } else {
            // The old incarnation is done; what it delivered beyond `down`
            // the new server sends again, and the client drops it.
            if let Some(old) = self.draining {
                self.abandon(old);
            }
            self.skip = self.down.end() - down;
            self.ack_sent = down;
        }
        self.fin_known = fin_known;
        // Our Migrate told the new server we hold its Close.
        self.fin_unconfirmed &= !fin_known;
        self.fin_ack_sent = false;
        self.cur = Some(inc);
        self.phase = Phase::Established;
        // The failover budget (`tried`, `rounds`) is only reset once the new
        // incarnation shows progress: one that fails straight after
        // Resumed must not make a failover loop endless.
        self.owner_failed = false;
        self.stats.migrations += 1;
        // Confirm at once (once caught up): the Ack tells the server this
        // incarnation is live.
        self.confirm = !ahead;
        self.events.push_back(ClientEvent::Migrated {
            from,
            to: server,
            epoch,
        });
        self.events.push_back(ClientEvent::Writable);
        self.mark_ready();
    }

    fn on_established_frame(
        &mut self,
        now: Instant,
        inc: IncarnationId,
        frame: Frame,
    ) -> Result<(), ProtocolError> {
        match frame {
            Frame::Data(data) => {
                self.progress = true;
                self.on_down_data(data)?;
            }
            Frame::Ack { pos, limit, fin } => {
                self.progress |= pos > self.up.start() || fin;
                if pos > self.up_sent {
                    return Err(ProtocolError::Position("ack beyond the data sent"));
                }
                if fin && !self.up_fin_sent {
                    return Err(ProtocolError::Position("ack of a Close not sent"));
                }
                if pos > self.up.start() {
                    self.up.drop_to(pos);
                    self.events.push_back(ClientEvent::Writable);
                }
                self.up_limit = self.up_limit.max(limit);
                self.up_fin_acked |= fin;
                self.mark_ready();
            }
            Frame::Close { pos } => self.on_down_close(pos)?,
            Frame::Trigger { dest } => {
                self.events
                    .push_back(ClientEvent::Triggered { dest: dest.clone() });
                if !self.cfg.ignore_triggers && !self.closing() {
                    self.tried.clear();
                    self.owner_failed = false;
                    self.begin_migration(now, dest, MigrationCause::Trigger);
                }
            }
            // Not while catching up: a frame there means the client caught up.
            Frame::Ping { nonce } if self.catch_up.is_none() => {
                self.push_frame(inc, Frame::Pong { nonce })
            }
            Frame::Ping { .. } => {}
            Frame::Pong { nonce } => {
                if let Some(i) = self.pings.iter().position(|(n, _)| *n == nonce) {
                    let (_, sent) = self.pings.remove(i).expect("found");
                    self.events.push_back(ClientEvent::Pong {
                        nonce,
                        rtt: now.saturating_duration_since(sent),
                    });
                }
            }
            // The server ended the session: it shut down and no peer could
            // take it (`Shutdown`). No other server holds it: fail at once
            // rather than try them one by one.
            Frame::Reject { reason, text } => self.ended_by_owner(reason, text),
            f => {
                return Err(ProtocolError::Unexpected {
                    frame: f.name(),
                    why: "not allowed on an established session",
                })
            }
        }
        Ok(())
    }

    /// Down data on the current (or draining) incarnation: its first
    /// `skip` bytes are ones the client already has.
    fn on_down_data(&mut self, mut data: Bytes) -> Result<(), ProtocolError> {
        let len = data.len() as u64;
        let window = self
            .limit_sent
            .max(self.down.start() + self.cfg.limits.recv_window);
        if self.wire_pos() + len > window {
            return Err(ProtocolError::Position("data beyond the advertised window"));
        }
        let dup = self.skip.min(len);
        self.skip -= dup;
        let _ = data.split_to(dup as usize);
        if data.is_empty() {
            return Ok(());
        }
        if self.down_fin.is_some() {
            return Err(ProtocolError::Position("data after Close"));
        }
        self.down.push(data);
        self.ack_due = true;
        let at = self.last_rx + self.cfg.limits.ack_delay;
        self.ack_at.get_or_insert(at);
        self.mark_ready();
        self.events.push_back(ClientEvent::Readable);
        Ok(())
    }

    /// The server's Close at `pos`.
    fn on_down_close(&mut self, pos: Pos) -> Result<(), ProtocolError> {
        if self.skip > 0 || pos != self.down.end() || self.down_fin.is_some_and(|f| f != pos) {
            return Err(ProtocolError::Position("Close not at the end of the data"));
        }
        self.down_fin = Some(pos);
        self.fin_known = true;
        self.ack_due = true;
        self.mark_ready();
        self.events.push_back(ClientEvent::Readable);
        Ok(())
    }

    /// While catching up: once the client holds the resume point, the old
    /// connection is done and the new server hears of it (the confirming
    /// Ack); if the old connection ended short of it, the new server is
    /// told where (`Missing`) and sends the rest.
    fn check_catch_up(&mut self, now: Instant) {
        let Some(c) = self.catch_up else {
            return;
        };
        if !matches!(self.phase, Phase::Established) {
            return;
        }
        let Some(cur) = self.cur else {
            return;
        };
        if self.wire_pos() >= c.to {
            if let Some(old) = self.draining {
                self.abandon(old);
            }
            self.catch_up = None;
            self.confirm = true;
            self.mark_ready();
            if let Some((dest, cause)) = self.deferred.take() {
                if !self.closing() {
                    self.begin_migration(now, dest, cause);
                }
            }
        } else if self.draining.is_none() && !c.missing {
            let pos = self.wire_pos();
            let limit = (self.down.start() + self.cfg.limits.recv_window).max(self.limit_sent);
            self.catch_up = Some(CatchUp { missing: true, ..c });
            self.ack_sent = pos;
            self.limit_sent = limit;
            self.push_frame(cur, Frame::Missing { pos, limit });
        }
    }

    /// The down position the current server has sent up to, as far as the
    /// client knows: its own position less what it will drop.
    fn wire_pos(&self) -> Pos {
        self.down.end() - self.skip
    }

    /// The connection of `inc` ended (EOF, reset, or it could not be
    /// opened), with `reason` for the record.
    pub fn handle_incarnation_closed(&mut self, now: Instant, inc: IncarnationId, reason: &str) {
        if self.draining == Some(inc) {
            // The origin answered (or failed): the new server takes over.
            self.draining = None;
            self.incs.remove(&inc);
            self.ready.retain(|i| *i != inc);
            return self.check_catch_up(now);
        }
        match self.phase {
            Phase::Connecting { inc: i, .. } if i == inc => {
                self.fail(SessionError::Unestablished(reason.to_string()));
            }
            Phase::Migrating { inc: i, .. } if i == inc => {
                self.attempt_failed(now, reason.to_string())
            }
            Phase::Established if self.cur == Some(inc) => {
                self.incs.remove(&inc);
                self.cur = None;
                if self.wire_done() && !self.fin_unconfirmed {
                    // The server finished the session and closed: normal.
                    self.check_finished();
                } else {
                    self.server_failed(now, reason.to_string());
                }
            }
            _ => {
                self.incs.remove(&inc);
            }
        }
    }

    // ----- the application's calls ---------------------------------------

    fn usable(&self) -> Result<(), AppError> {
        match &self.phase {
            Phase::Failed(e) => Err(AppError::Session(e.clone())),
            Phase::Idle => Err(AppError::Session(SessionError::Unestablished(
                "not started".into(),
            ))),
            _ => Ok(()),
        }
    }

    /// Down bytes buffered for the application to read.
    pub fn read_available(&self) -> usize {
        self.down.len() as usize
    }

    /// Whether [`Client::read`] would return at once: down bytes are
    /// buffered, the stream ended, or the session failed.
    pub fn read_ready(&self) -> bool {
        self.read_available() > 0
            || self.down_fin == Some(self.down.end())
            || matches!(self.phase, Phase::Failed(_) | Phase::Idle)
    }

    /// Reads down-stream bytes: `Ok(Some(n))` with `n > 0` bytes,
    /// `Ok(Some(0))` at the end of the stream, `Ok(None)` when nothing is
    /// there yet (wait for [`ClientEvent::Readable`]).
    pub fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, AppError> {
        if self.down.is_empty() {
            return Ok(self.down_ended()?.then_some(0));
        }
        let n = self.down.copy_to(self.down.start(), buf);
        self.consumed(n);
        Ok(Some(n))
    }

    /// Reads the next piece of the down stream without copying it:
    /// `Ok(Some(bytes))` with what is held contiguously (at most one Data
    /// frame's payload), `Ok(Some(empty))` at the end of the stream,
    /// `Ok(None)` when nothing is there yet (wait for
    /// [`ClientEvent::Readable`]). The piece shares the buffer it was
    /// received into, which is not reused while the piece is held.
    pub fn read_chunk(&mut self) -> Result<Option<Bytes>, AppError> {
        if self.down.is_empty() {
            return Ok(self.down_ended()?.then(Bytes::new));
        }
        let chunk = self.down.chunk_at(self.down.start(), usize::MAX);
        self.consumed(chunk.len());
        Ok(Some(chunk))
    }

    /// For a read that finds nothing buffered: whether the down stream has
    /// ended (else bytes may still come), or the session's failure.
    fn down_ended(&self) -> Result<bool, AppError> {
        if self.down_fin == Some(self.down.end()) {
            return Ok(true);
        }
        self.usable()?;
        Ok(false)
    }

    /// The application took `n` bytes from the front of the down stream:
    /// they are dropped, and the window moves (acknowledged once it moved
    /// by a step).
    fn consumed(&mut self, n: usize) {
        self.down.drop_to(self.down.start() + n as u64);
        self.check_finished();
        let limit = self.down.start() + self.cfg.limits.recv_window;
        if limit >= self.limit_sent + self.cfg.limits.window_step() {
            self.ack_due = true;
            self.mark_ready();
        }
    }

    /// Writes up-stream bytes; returns how many were taken (0 when the
    /// buffer is full: wait for [`ClientEvent::Writable`]). They are kept
    /// until the server holds them, across migrations.
    pub fn write(&mut self, data: &[u8]) -> Result<usize, AppError> {
        let n = self.up_room()?.min(data.len());
        self.up.push_slice(&data[..n]);
        if n > 0 {
            self.mark_ready();
        }
        Ok(n)
    }

    /// Writes up-stream bytes in place: `fill` appends them straight into
    /// the send buffer (say, a socket read), with room for at least one
    /// byte and at most `max` (and what the buffer and its current block
    /// have left). Returns what `fill` returned, or `Ok(None)` without
    /// calling it when the buffer is full (wait for
    /// [`ClientEvent::Writable`]).
    pub fn write_in_place<R>(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut bytes::buf::Limit<&mut BytesMut>) -> R,
    ) -> Result<Option<R>, AppError> {
        let room = self.up_room()?;
        if room == 0 {
            return Ok(None);
        }
        let before = self.up.len();
        let r = self.up.fill(room.min(max), fill);
        if self.up.len() > before {
            self.mark_ready();
        }
        Ok(Some(r))
    }

    /// Room the send buffer has for the application's next bytes, or why
    /// it may not write.
    fn up_room(&self) -> Result<usize, AppError> {
        self.usable()?;
        if self.up_fin.is_some() {
            return Err(AppError::WriteAfterClose);
        }
        Ok(self.cfg.limits.send_buffer.saturating_sub(self.up.len()) as usize)
    }

    /// Closes the up direction after the bytes written so far.
    pub fn close_write(&mut self) -> Result<(), AppError> {
        self.usable()?;
        if self.up_fin.is_none() {
            self.up_fin = Some(self.up.end());
            self.mark_ready();
        }
        Ok(())
    }

    // ----- time -------------------------------------------------------------

    /// The next instant at which [`Client::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = &self.cfg.timeouts;
        match self.phase {
            Phase::Connecting { deadline, .. } | Phase::Migrating { deadline, .. } => {
                Some(deadline)
            }
            // Nothing left to wait for on the wire: no timer.
            Phase::Established if self.wire_done() => None,
            Phase::Established => {
                let ping = match self.ping_sent {
                    None => self.last_rx + t.ping_interval,
                    Some(_) => self.last_rx + t.idle,
                };
                let ack = self.ack_at.filter(|_| self.cur.is_some());
                let drain = self.catch_up.filter(|c| !c.missing).map(|c| c.deadline);
                Some(ping.min(self.last_rx + t.idle))
                    .into_iter()
                    .chain(ack)
                    .chain(drain)
                    .min()
            }
            _ => None,
        }
    }

    /// Handles whatever timed out by `now`: handshakes, pings, silence.
    pub fn handle_timeout(&mut self, now: Instant) {
        let t = self.cfg.timeouts.clone();
        if self.ack_at.is_some_and(|a| a <= now) {
            // A delayed acknowledgement no data carried goes out now.
            self.ack_due = true;
            self.mark_ready();
        }
        if self
            .catch_up
            .is_some_and(|c| !c.missing && c.deadline <= now)
        {
            // The old connection stalled: the new server sends the rest.
            if let Some(old) = self.draining {
                self.abandon(old);
            }
            self.check_catch_up(now);
        }
        match self.phase {
            Phase::Connecting { deadline, .. } if deadline <= now => {
                self.fail(SessionError::Unestablished("no answer to Hello".into()));
            }
            Phase::Migrating { deadline, .. } if deadline <= now => {
                self.attempt_failed(now, "no answer to Migrate".into());
            }
            Phase::Established if self.last_rx + t.idle <= now && !self.wire_done() => {
                if let Some(inc) = self.cur.take() {
                    self.abandon(inc);
                }
                self.server_failed(now, "server silent".into());
            }
            Phase::Established
                if self.ping_sent.is_none()
                    && self.last_rx + t.ping_interval <= now
                    && self.catch_up.is_none() =>
            {
                self.ping_sent = Some(now);
                if let Some(inc) = self.cur {
                    let nonce = self.take_nonce();
                    self.push_frame(inc, Frame::Ping { nonce });
                }
            }
            _ => {}
        }
    }

    // ----- output -----------------------------------------------------------

    /// The next thing to send: appends segments to `out` and returns the
    /// incarnation they are for. `None` when nothing is waiting.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<Bytes>) -> Option<IncarnationId> {
        while let Some(inc) = self.ready.pop_front() {
            let Some(c) = self.incs.get_mut(&inc) else {
                continue;
            };
            let start = out.len();
            // Control frames queued for this incarnation, then its data.
            let mut hdr = take_scratch(&mut self.scratch);
            hdr.extend_from_slice(&c.out);
            c.out.clear();
            let mut more = false;
            if self.cur == Some(inc) && matches!(self.phase, Phase::Established) {
                // While catching up, only `Missing` (queued above) goes out,
                // then acknowledgements of what the server sends from there.
                match self.catch_up {
                    None => more = self.session_output(now, &mut hdr, out),
                    Some(c) if c.missing => self.acks_only(&mut hdr),
                    Some(_) => {}
                }
            } else if self.draining == Some(inc) {
                self.acks_only(&mut hdr);
            }
            if !hdr.is_empty() {
                out.push(hdr.split().freeze());
            }
            self.scratch = hdr;
            if more {
                self.ready.push_back(inc);
            }
            self.check_finished();
            if out.len() > start {
                return Some(inc);
            }
        }
        idle_scratch(&mut self.scratch);
        None
    }

    fn session_output(&mut self, now: Instant, hdr: &mut BytesMut, out: &mut Vec<Bytes>) -> bool {
        let start = out.len();
        let limits = &self.cfg.limits;
        let end = self.up.end().min(self.up_limit);
        let more = self
            .up
            .frame_data(&mut self.up_sent, end, limits.max_data_frame, hdr, out);
        if self.up_fin == Some(self.up_sent) && !self.up_fin_sent {
            Frame::Close { pos: self.up_sent }.encode(hdr);
            self.up_fin_sent = true;
        }
        let pos = self.wire_pos();
        let limit = (self.down.start() + limits.recv_window).max(self.limit_sent);
        let fin = self.down_fin.is_some() && self.fin_known;
        // As TCP's delayed ACK: at once for a quarter of the window (or
        // its opening by as much), else riding on outgoing frames, else
        // after the ack delay.
        let step = limits.window_step();
        let urgent = pos >= self.ack_sent + step || limit >= self.limit_sent + step;
        let sending = out.len() > start || !hdr.is_empty();
        let late = sending || self.ack_at.is_some_and(|t| t <= now);
        let moved = urgent || (pos > self.ack_sent && late);
        if (self.ack_due && moved) || fin != self.fin_ack_sent || self.confirm {
            Frame::Ack { pos, limit, fin }.encode(hdr);
            self.ack_sent = pos;
            self.limit_sent = limit;
            self.fin_ack_sent = fin;
            self.fin_unconfirmed &= !fin;
            self.ack_due = false;
            self.confirm = false;
        }
        if pos <= self.ack_sent {
            self.ack_at = None;
        }
        more
    }

    /// What the draining incarnation carries, and the new one while the
    /// bytes a draining one lost come on it: an acknowledgement of every
    /// down byte received, at once (the origin frees them), and the window
    /// as the application opens it (the server may still be sending). A
    /// Close is not confirmed there: the session's close completes once
    /// the client caught up.
    fn acks_only(&mut self, hdr: &mut BytesMut) {
        let pos = self.wire_pos();
        let limit = (self.down.start() + self.cfg.limits.recv_window).max(self.limit_sent);
        let step = self.cfg.limits.window_step();
        if pos > self.ack_sent || limit >= self.limit_sent + step {
            Frame::Ack {
                pos,
                limit,
                fin: false,
            }
            .encode(hdr);
            self.ack_sent = pos;
            self.limit_sent = limit;
        }
    }

    /// The next event for the runtime or the application.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use bytes::BytesMut;

    use super::{Client, ClientConfig, ClientEvent, MAX_PINGS};
    use crate::frame::{Frame, DEFAULT_MAX_FRAME, PREAMBLE};
    use crate::types::{Alternate, Secret, ServerId, SessionId};

    /// A client established with server `s1` (one alternate, `s2`) on its
    /// first incarnation, its output and events drained.
    fn established(now: Instant) -> Client {
        let mut c = Client::new(ClientConfig::default(), now);
        let inc = c.start(now);
        c.handle_connected(now, inc, None);
        let mut wire = BytesMut::new();
        Frame::Welcome {
            session: SessionId(7),
            secret: Secret([3; 32]),
            epoch: 1,
            server: ServerId::new("s1").unwrap(),
            alternates: vec![Alternate {
                id: ServerId::new("s2").unwrap(),
                addrs: vec![],
            }],
            window: 1 << 20,
            replicated: false,
        }
        .encode(&mut wire);
        c.handle_input(now, inc, &wire);
        assert!(c.is_established());
        drain(&mut c, now);
        c
    }

    /// Every frame the client sends, decoded (preambles dropped).
    fn drain(c: &mut Client, now: Instant) -> Vec<Frame> {
        let mut out = Vec::new();
        let mut segs = Vec::new();
        while c.poll_transmit(now, &mut segs).is_some() {}
        let mut buf = BytesMut::new();
        for s in segs {
            buf.extend_from_slice(&s);
        }
        if buf.starts_with(&PREAMBLE) {
            let _ = buf.split_to(PREAMBLE.len());
        }
        while let Some(f) = Frame::decode(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
            out.push(f);
        }
        while c.poll_event().is_some() {}
        out
    }

    fn pong(c: &mut Client, now: Instant, nonce: u64) -> Vec<ClientEvent> {
        let mut wire = BytesMut::new();
        Frame::Pong { nonce }.encode(&mut wire);
        let inc = c.current_incarnation().unwrap();
        c.handle_input(now, inc, &wire);
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a test picks its starting instant
    fn a_ping_is_sent_and_its_pong_reports_the_round_trip() {
        let t0 = Instant::now();
        let mut c = established(t0);
        let n = c.ping(t0).expect("attached");
        assert_eq!(drain(&mut c, t0), vec![Frame::Ping { nonce: n }]);
        let events = pong(&mut c, t0 + Duration::from_millis(7), n);
        assert_eq!(
            events,
            vec![ClientEvent::Pong {
                nonce: n,
                rtt: Duration::from_millis(7)
            }]
        );
        // A second Pong with the same nonce, or one never asked for, is
        // not reported.
        assert!(pong(&mut c, t0, n).is_empty());
        assert!(pong(&mut c, t0, n + 100).is_empty());
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn only_the_latest_pings_are_remembered() {
        let t0 = Instant::now();
        let mut c = established(t0);
        let nonces: Vec<u64> = (0..MAX_PINGS + 2).map(|_| c.ping(t0).unwrap()).collect();
        let sent = drain(&mut c, t0);
        assert_eq!(
            sent,
            nonces
                .iter()
                .map(|&nonce| Frame::Ping { nonce })
                .collect::<Vec<_>>()
        );
        assert!(pong(&mut c, t0, nonces[0]).is_empty(), "forgotten");
        let last = *nonces.last().unwrap();
        assert_eq!(pong(&mut c, t0, last).len(), 1);
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn read_chunk_hands_out_the_received_payloads_without_copying() {
        let t0 = Instant::now();
        let mut c = established(t0);
        let inc = c.current_incarnation().unwrap();
        assert_eq!(c.read_chunk(), Ok(None));
        let payloads: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 1000 + usize::from(i)]).collect();
        let mut wire = BytesMut::new();
        for p in &payloads {
            Frame::Data(p.clone().into()).encode(&mut wire);
        }
        let total: usize = payloads.iter().map(Vec::len).sum();
        Frame::Close { pos: total as u64 }.encode(&mut wire);
        let start = wire.as_ptr() as usize..wire.as_ptr() as usize + wire.len();
        c.handle_input_buf(t0, inc, &mut wire);
        let mut got = Vec::new();
        loop {
            let chunk = c.read_chunk().unwrap().expect("all of it arrived");
            if chunk.is_empty() {
                break;
            }
            // A slice of the input buffer, not a copy of it.
            assert!(start.contains(&(chunk.as_ptr() as usize)));
            got.push(chunk.to_vec());
        }
        assert_eq!(got, payloads);
        // The end stays the end, and the plain read agrees.
        assert_eq!(c.read_chunk().unwrap(), Some(bytes::Bytes::new()));
        assert_eq!(c.read(&mut [0u8; 8]), Ok(Some(0)));
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn write_in_place_queues_what_it_appends_up_to_the_send_buffer() {
        let t0 = Instant::now();
        let mut c = established(t0);
        let r = c.write_in_place(usize::MAX, |buf| {
            bytes::BufMut::put_slice(buf, b"in place");
            "what fill returns"
        });
        assert_eq!(r, Ok(Some("what fill returns")));
        assert_eq!(
            drain(&mut c, t0),
            vec![Frame::Data(bytes::Bytes::from_static(b"in place"))]
        );
        // Nothing appended: nothing sent.
        assert_eq!(c.write_in_place(10, |_| ()), Ok(Some(())));
        assert_eq!(drain(&mut c, t0), vec![]);
        // Never beyond the send buffer: a full one does not call `fill`.
        let limit = c.cfg.limits.send_buffer as usize;
        let mut queued = 8;
        while queued < limit {
            c.write_in_place(usize::MAX, |buf| {
                let n = bytes::BufMut::remaining_mut(buf);
                bytes::BufMut::put_bytes(buf, 1, n);
                queued += n;
            })
            .unwrap()
            .expect("room left");
        }
        assert_eq!(queued, limit);
        assert_eq!(c.write_in_place(usize::MAX, |_| unreachable!()), Ok(None));
        c.close_write().unwrap();
        assert_eq!(
            c.write_in_place(1, |_| ()),
            Err(crate::error::AppError::WriteAfterClose)
        );
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn a_failed_server_is_left_without_draining_for_an_alternate() {
        let t0 = Instant::now();
        let mut c = established(t0);
        let old = c.current_incarnation().unwrap();
        c.fail_server(t0, "no answer to 3 pings").unwrap();
        let events: Vec<ClientEvent> = std::iter::from_fn(|| c.poll_event()).collect();
        assert!(
            events.contains(&ClientEvent::CloseIncarnation(old)),
            "{events:?}"
        );
        let s2 = ServerId::new("s2").unwrap();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, ClientEvent::Connect { server: Some(s), .. } if *s == s2)),
            "{events:?}"
        );
        assert!(c.is_migrating());
        // No ping while migrating, and no second failure.
        assert_eq!(c.ping(t0), None);
        assert!(c.fail_server(t0, "again").is_err());
    }
}
