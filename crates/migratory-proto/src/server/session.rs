//! One session's state machine at one server: its two byte streams with
//! their logs and windows, half-closes, the application's snapshot, the
//! gating of acknowledgements on its backup, and the client connection
//! (incarnation) it is attached to.
//!
//! A [`Session`] is driven by whoever holds it — in the tokio runtime, the
//! task that owns its client socket, under the session's own lock — and
//! talks to its [`Endpoint`](super::Endpoint) only through
//! [`Session::poll_endpoint_event`] (session finished, a deadline to
//! watch) and [`Session::poll_control`] (messages for peers). The
//! endpoint calls in for what arrives on the control plane (a state
//! request, a replication acknowledgement, a trigger).
//!
//! # Driving it
//!
//! * [`Session::handle_input`] with every byte read from the attached
//!   incarnation, [`Session::handle_incarnation_closed`] when it ends;
//! * while the socket is writable and [`Session::wants_transmit`] says so,
//!   [`Session::poll_transmit`], then [`Session::on_transmitted`] with the
//!   number of bytes the socket took — bytes count as sent only then, and
//!   a client that acknowledges more is closed with a protocol error;
//! * the application's [`Session::read`], [`Session::write`],
//!   [`Session::snapshot`], [`Session::close_write`], [`Session::release`];
//! * after each of these, drain [`Session::poll_event`] (wakeups for the
//!   application, connections to close), [`Session::poll_control`] and
//!   [`Session::poll_endpoint_event`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::config::Limits;
use crate::control::{ControlMessage, ReplicaUpdate, SessionImage};
use crate::error::{AppError, ProtocolError, SessionError};
use crate::frame::{Frame, Migrate, MigrateRequest, RejectReason};
use crate::mac::{next_secret, verify_migrate};
use crate::stream::{idle_scratch, take_scratch, ByteQueue};
use crate::sync::resume_point;
use crate::types::{Epoch, IncarnationId, MigrationCause, Pos, Secret, ServerId, SessionId};

use super::events::{Direction, MigrationOutcome, MigrationReport, ServerEvent, SessionInfo};
use super::replica::{image_of, Held};
use super::{ServerConfig, SessionHandle, ABORT_TEXT, FINISHED_TEXT};

/// How far beyond what a session's application produced a client's
/// position may be (see `Session::catch_up`): far more than any window,
/// and far from the end of the position space.
const MAX_AHEAD: u64 = 1 << 40;

/// Where a session stands. One declared state instead of a set of flags:
/// every transition is a method of [`Session`].
#[derive(Debug)]
enum Lifecycle {
    /// The application serves it.
    Live(Link),
    /// The application released it; it finishes its close with the client
    /// (input is discarded, the down direction is closed).
    Releasing(Link),
    /// A state request stopped the application of a replicated session
    /// (its backup is live) while down bytes sent on the attached
    /// incarnation were not yet acknowledged, and the client keeps reading
    /// that incarnation (its Migrate says `draining`). Nothing
    /// more is sent; the acknowledgements that come back shrink the state
    /// the reply carries (MTCP thesis, section 4.2.3, step 5). The reply
    /// leaves once everything sent is acknowledged, the connection ends,
    /// or `timeouts.settle` passes; then the session is frozen.
    Settling(Settling),
    /// Its state was handed to a destination for a migration (MTCP 4.2.3,
    /// "once S1 receives the state request"); it waits for the
    /// destination's StateAck, or for the client to come back for it. It
    /// may still hold the connection the client is draining (its `tail`).
    Frozen(Frozen),
    /// Gone from this server: finished, moved away, or dropped. Calls on it
    /// fail with this error.
    Ended(SessionError),
}

/// The client connection of a live session.
#[derive(Debug, Clone, Copy)]
enum Link {
    /// Attached to this incarnation.
    Attached(IncarnationId),
    /// No connection since then; dropped after the orphan timeout unless
    /// the client comes back.
    Orphaned(Instant),
}

#[derive(Debug)]
struct Settling {
    inc: IncarnationId,
    /// The reply leaves at the latest then.
    until: Instant,
    since: Instant,
    /// The state request to answer: (requester, req, the client's Migrate).
    request: (ServerId, u64, Migrate),
}

#[derive(Debug)]
struct Frozen {
    deadline: Instant,
    /// When the first state request came, and why the client migrated.
    since: Instant,
    cause: MigrationCause,
    /// State requests answered from this frozen state: (requester, req).
    replied: Vec<(ServerId, u64)>,
    /// The connection the client still drains, when the reply left before
    /// the client had every byte sent there.
    tail: Option<Tail>,
}

/// A frozen session's old connection while the client drains it: the
/// state reply resumed the stream at `cut` (everything sent there), and
/// the bytes below it stay here until the client acknowledges them on
/// this connection, or the destination fetches those it lacks
/// ([`ControlMessage::GapRequest`]).
#[derive(Debug, Clone, Copy)]
struct Tail {
    inc: IncarnationId,
    cut: Pos,
    /// Closed then at the latest (`timeouts.settle`).
    until: Instant,
}

/// A resumed session's down stream before the client holds everything
/// below the resume point (`at`): it sends nothing until the client shows
/// it does (any frame but Missing), or says where its old connection ended
/// (Missing) and the bytes from there arrived from their `holder`.
///
/// A client that leaves before it caught up (its connection here broke)
/// asks another server to resume the session: that server's state request
/// waits here while the bytes the client lacks are fetched from the
/// holder, and is answered once they are.
#[derive(Debug, Clone)]
struct Gate {
    at: Pos,
    /// The client's position in its Migrate: it holds every byte below.
    from: Pos,
    /// The server that replied with the state, and its request id.
    holder: Option<(ServerId, u64)>,
    /// The bytes from here were asked of the holder.
    asked: Option<Asked>,
    /// Where the client said its old connection ended (`Missing`): the
    /// down stream goes on from there once the bytes arrived.
    missing: Option<Pos>,
    /// A state request waiting for the bytes: (requester, req, Migrate).
    waiting: Option<(ServerId, u64, Migrate)>,
}

/// A gap request on its way, for up to `timeouts.state_request` (as long
/// as a destination waits for a state reply). Asked again only when the
/// control link to the holder went down meanwhile (it lost the request or
/// the reply): a link that stays up delivers both.
#[derive(Debug, Clone, Copy)]
struct Asked {
    pos: Pos,
    again: bool,
    until: Instant,
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
    /// Since when replicated state waits for the backup's acknowledgement
    /// (`None`: everything sent was acknowledged).
    waiting_since: Option<Instant>,
}

/// Something a [`Session`] tells its endpoint (see
/// [`Endpoint::handle_endpoint_event`](super::Endpoint::handle_endpoint_event)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointEvent(pub(super) EndpointEventKind);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum EndpointEventKind {
    /// The session's next deadline; the endpoint calls
    /// [`Session::handle_timeout`] then.
    Deadline(Instant),
    /// The session ended here and leaves the session table: finished
    /// (remembered as a tombstone), moved away (StateAck), or dropped.
    Ended { finished: bool, moved: bool },
    /// A migration of this session ended (for metrics).
    Report(MigrationReport),
    /// The session answered state request `req` of `to`: the StateAck
    /// that comes back for it is the session's.
    Replied { to: ServerId, req: u64 },
}

/// One session at one server. See the module documentation.
#[derive(Debug)]
pub struct Session {
    id: SessionId,
    handle: SessionHandle,
    cfg: Arc<ServerConfig>,
    lifecycle: Lifecycle,
    secret: Secret,
    epoch: Epoch,
    /// Next epoch this copy may hand out (one owner per epoch).
    next_epoch: Epoch,
    /// The newest Migrate attempt served: older ones still in flight are
    /// superseded.
    last_attempt: u64,
    /// When the session started or arrived here.
    since: Instant,
    /// StateAck owed to the origin once the client confirms this incarnation.
    owed_ack: Option<(ServerId, u64)>,
    /// Nothing is sent down before the client holds the resume point.
    gate: Option<Gate>,
    /// The epoch the client knew before this install, accepted until the
    /// client confirms the new incarnation (its Resumed may be lost), with
    /// that epoch's secret and the rekey that made the current one from
    /// it (a client coming back at `prev_epoch` derives the current
    /// secret with it).
    prev_epoch: Option<Epoch>,
    prev_secret: Option<(Secret, [u8; 32])>,
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
    /// When a delayed acknowledgement is sent at the latest.
    ack_at: Option<Instant>,
    // Down stream: [snd_una, app_write + discard) is the retransmit buffer.
    down: ByteQueue,
    /// Next down byte to frame on this incarnation.
    snd_nxt: Pos,
    /// Down bytes below this are in frames the socket took.
    snd_taken: Pos,
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
    // The incarnation's wire.
    /// Input not yet decoded.
    rx: BytesMut,
    /// Frames to send before any data (Welcome, Resumed, Pong, Trigger).
    out: VecDeque<Frame>,
    /// Ended by this server ([`Session::abort`]): it ends once the Reject
    /// in `out` is handed out.
    aborting: Option<(RejectReason, String)>,
    /// Wire bytes handed out by `poll_transmit` / taken by the socket on
    /// this incarnation.
    wire_out: u64,
    wire_taken: u64,
    /// (wire offset after a Data frame, down position after it), for the
    /// frames handed out but not yet taken.
    in_flight: VecDeque<(u64, Pos)>,
    scratch: BytesMut,
    // What the holder must act on.
    events: VecDeque<ServerEvent>,
    control: VecDeque<(ServerId, ControlMessage)>,
    to_endpoint: VecDeque<EndpointEvent>,
    /// The last time seen in a call.
    last_now: Instant,
    /// The earliest deadline the endpoint was asked to watch.
    armed: Option<Instant>,
}

/// How a session starts at this server.
pub(super) enum Start {
    /// A new session (Hello) with the client's receive window.
    Hello { window: u64 },
    /// A migrated session, for this request; StateAck owed to the origin
    /// once the client confirms the incarnation.
    Resume {
        request: MigrateRequest,
        owed_ack: Option<(ServerId, u64)>,
        /// Random, from the endpoint: the new epoch's secret is derived
        /// from the image's with it, and the client learns it in Resumed.
        rekey: [u8; 32],
    },
}

/// What a client's Migrate to the session's own server did
/// ([`Session::resume_here`]).
pub(super) enum ResumeHere {
    /// The client is attached to its live session on a new incarnation.
    Reattached,
    /// The session was frozen: resume from this image as a new arrival
    /// (the old application instance stopped).
    FromFrozen { image: SessionImage, epoch: Epoch },
    /// Refused.
    Reject(RejectReason, &'static str),
}

impl Session {
    /// Installs a session from `image` attached to `inc` (MTCP 4.2.3,
    /// "once the state reply reaches S2"); `rx` is what the connection
    /// sent after its first frame. Queues Welcome or Resumed.
    pub(super) fn install(
        cfg: Arc<ServerConfig>,
        handle: SessionHandle,
        inc: IncarnationId,
        image: SessionImage,
        epoch: Epoch,
        start: Start,
        now: Instant,
    ) -> Self {
        let sid = image.session;
        let (down_limit, down_fin_acked, attempt, owed_ack, prev_epoch, rekey, from) = match start {
            Start::Hello { window } => (window, false, 0, None, None, None, 0),
            Start::Resume {
                request,
                owed_ack,
                rekey,
            } => (
                request.down.saturating_add(request.window),
                request.down_fin,
                request.attempt,
                owed_ack,
                Some(request.epoch),
                Some(rekey),
                request.down,
            ),
        };
        let new = rekey.is_none();
        // Every epoch has a secret of its own (see `next_secret`).
        let (secret, prev_secret) = match rekey {
            Some(k) => (
                next_secret(&image.secret, &k, epoch),
                Some((image.secret.clone(), k)),
            ),
            None => (image.secret.clone(), None),
        };
        let rp = resume_point(image.down_base, image.down_snap, image.down_base);
        // Resumed beyond the client's position: the bytes between are on
        // their way over the connection the client drains.
        let gate = (rekey.is_some() && rp.snd_max_seen > from).then(|| Gate {
            at: rp.snd_max_seen,
            from,
            holder: owed_ack.clone(),
            asked: None,
            missing: None,
            waiting: None,
        });
        let mut up = ByteQueue::new(image.up_snap);
        up.push(image.up_data);
        let mut down = ByteQueue::new(rp.snd_max_seen);
        down.push(image.down_data);
        let limit = image.up_snap + cfg.limits.recv_window;
        let backup = cfg.backup.clone().filter(|b| *b != cfg.id);
        let mut s = Session {
            id: sid,
            handle,
            lifecycle: Lifecycle::Live(Link::Attached(inc)),
            secret,
            epoch,
            next_epoch: epoch + 1,
            last_attempt: attempt,
            since: now,
            owed_ack,
            gate,
            prev_epoch,
            prev_secret,
            up,
            rx_pos: 0,
            app_read: image.up_snap,
            up_fin: image.up_fin,
            ack_sent: 0,
            limit_sent: limit,
            fin_ack_sent: false,
            ack_due: false,
            ack_at: None,
            down,
            snd_nxt: rp.snd_max_seen,
            snd_taken: rp.snd_max_seen,
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
            rx: BytesMut::new(),
            out: VecDeque::new(),
            aborting: None,
            wire_out: 0,
            wire_taken: 0,
            in_flight: VecDeque::new(),
            scratch: BytesMut::new(),
            events: VecDeque::new(),
            control: VecDeque::new(),
            to_endpoint: VecDeque::new(),
            last_now: now,
            armed: None,
            cfg,
        };
        s.ack_sent = s.rcv_nxt();
        s.rx_pos = s.rcv_nxt();
        s.fin_ack_sent = s.up_fin.is_some();
        let first = if new {
            Frame::Welcome {
                session: sid,
                secret: s.secret.clone(),
                epoch,
                server: s.cfg.id.clone(),
                alternates: s.cfg.alternates.clone(),
                window: s.cfg.limits.recv_window,
                replicated: backup.is_some(),
            }
        } else {
            Frame::Resumed {
                up: s.rcv_nxt(),
                up_fin: s.up_fin.is_some(),
                down: s.snd_nxt,
                epoch,
                server: s.cfg.id.clone(),
                alternates: s.cfg.alternates.clone(),
                window: limit.saturating_sub(s.rcv_nxt()),
                rekey,
                replicated: backup.is_some(),
            }
        };
        if let Some(b) = backup {
            let full = s.image();
            s.backup = Some(Backup {
                server: b.clone(),
                live: true,
                held_up: s.up.start(),
                down_sent: s.down_snap,
                acked_sent: s.down.start(),
                acked_epoch: None,
                waiting_since: None,
            });
            s.replicate_to(b, ReplicaUpdate::Full { image: full });
        }
        s.out.push_back(first);
        s.events.push_back(ServerEvent::Readable(handle));
        s.events.push_back(ServerEvent::Writable(handle));
        s
    }

    // ----- what the session is ----------------------------------------------

    /// The session id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The application's handle on this installation of the session.
    pub fn handle(&self) -> SessionHandle {
        self.handle
    }

    /// The session's epoch here.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The client connection the session is attached to, if any.
    pub fn incarnation(&self) -> Option<IncarnationId> {
        match self.lifecycle {
            Lifecycle::Live(Link::Attached(inc))
            | Lifecycle::Releasing(Link::Attached(inc))
            | Lifecycle::Settling(Settling { inc, .. }) => Some(inc),
            Lifecycle::Frozen(Frozen {
                tail: Some(Tail { inc, .. }),
                ..
            }) => Some(inc),
            _ => None,
        }
    }

    /// The cut of a frozen session's tail, if it has one.
    fn tail_cut(&self) -> Option<Pos> {
        match &self.lifecycle {
            Lifecycle::Frozen(Frozen { tail: Some(t), .. }) => Some(t.cut),
            _ => None,
        }
    }

    /// Whether the session is owned here and not frozen (the application
    /// may serve it, or it is finishing after the application let go).
    pub fn is_owned(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Live(_) | Lifecycle::Releasing(_))
    }

    /// Whether the application serves the session here (not frozen, not
    /// released, not ended).
    pub fn is_live(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Live(_))
    }

    /// Whether the session is gone from this server (finished, moved away
    /// or dropped).
    pub fn is_ended(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Ended(_))
    }

    /// What an operator sees of it.
    pub fn info(&self) -> SessionInfo {
        SessionInfo {
            session: self.id,
            epoch: self.epoch,
            inc: self.incarnation(),
            since: self.since,
            up: self.rcv_nxt(),
            down: self.app_write,
        }
    }

    /// Whether the session would survive this server's crash: its backup
    /// is connected and holds the whole state, including every up byte
    /// acknowledged to the client (docs/architecture.md 3.6). Not while
    /// its client catches up (see `Gate`): the bytes it lacks are only at
    /// the origin, and the backup's replica starts beyond them.
    pub fn crash_tolerant(&self) -> bool {
        self.is_owned()
            && self.gate.is_none()
            && self.backup.as_ref().is_some_and(|b| {
                b.live && b.acked_epoch == Some(self.epoch) && b.held_up >= self.ack_sent
            })
    }

    /// Number of up bytes the application can read now.
    pub fn readable_bytes(&self) -> u64 {
        if self.is_owned() {
            self.rcv_nxt() - self.app_read
        } else {
            0
        }
    }

    fn rcv_nxt(&self) -> Pos {
        self.up.end()
    }

    fn app_gone(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Releasing(_))
    }

    /// The up position acknowledged to the client: everything received, or
    /// with a live backup only what the backup holds (output commit,
    /// docs/architecture.md 3.6).
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
    pub(super) fn image(&mut self) -> SessionImage {
        self.image_from(0)
    }

    /// The state without the down bytes below `from` (the retransmit
    /// buffer of a busy session holds megabytes nobody needs copied).
    fn image_from(&mut self, from: Pos) -> SessionImage {
        image_of(
            self.id,
            Held {
                secret: &self.secret,
                epoch: self.epoch,
                up: &mut self.up,
                up_fin: self.up_fin,
                down: &mut self.down,
                down_from: from,
                down_snap: self.down_snap,
                down_fin: self.snap_down_fin,
                app_state: &self.app_state,
            },
        )
    }

    // ----- the client connection ---------------------------------------------

    /// Whether this live session is the one a client's Migrate at `epoch`
    /// means, even though it names another origin: we resumed it, but the
    /// client never saw our Resumed and still names the previous owner.
    pub(super) fn serves_epoch(&self, epoch: Epoch) -> bool {
        self.is_owned() && (self.epoch == epoch || self.prev_epoch == Some(epoch))
    }

    /// Checks an authenticated Migrate against the holder's secret and
    /// epoch (the nonce was fresh: this pool's destinations choose it) and,
    /// at an owner, that no newer attempt of the client was served.
    pub(super) fn check_migrate(
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

    /// The checks an owner (live or frozen) makes on a Migrate or a state
    /// request for it.
    fn admit(&mut self, m: &Migrate) -> Result<(), (RejectReason, &'static str)> {
        if self.is_ended() {
            return Err((RejectReason::NotFound, "no such session here"));
        }
        Self::check_migrate(
            self.secret_for(m.request.epoch),
            (self.epoch, self.prev_epoch),
            Some(self.last_attempt),
            m,
        )?;
        if self.aborting.is_some() {
            // Being ended (a drain that could not move it): it neither
            // moves nor resumes.
            return Err((RejectReason::Shutdown, ABORT_TEXT));
        }
        if self.gate.as_ref().is_some_and(|g| m.request.down >= g.at) {
            // Proved, from a client that holds the resume point: it caught
            // up (its confirming frame may have gone to no one). A request
            // that waited for the bytes was an earlier attempt.
            self.refuse_waiting(RejectReason::AuthFailed, "superseded attempt");
            self.gate = None;
        }
        if m.request.epoch == self.epoch && self.gate.is_none() {
            // Proved with this epoch's secret: the client has this epoch's
            // Resumed, so the one before is over (as when it confirms the
            // connection with its first frame). The origin forgets its
            // frozen copy, and that epoch's secret moves nothing any more.
            // (Not while the origin may still owe the client bytes that
            // were in flight: a client failing over before it caught up.)
            self.confirmed();
        }
        if !self.migratable() {
            return Err((RejectReason::InvalidState, FINISHED_TEXT));
        }
        // A draining client may have acknowledged more on its old
        // connection since it sent the Migrate: the down stream then
        // resumes where its acknowledgements say. It may also hold bytes
        // this copy has not produced yet (see `catch_up`), but never any
        // beyond the Close.
        // A client still catching up here (see `Gate`) lacks bytes below
        // the resume point that the gate's holder keeps.
        let gap = self.gate.as_ref().is_some_and(|g| m.request.down >= g.from);
        let below = m.request.down < self.down.start() && !m.request.draining && !gap;
        let beyond = self.down_fin.is_some_and(|f| m.request.down > f)
            || m.request.down > self.down.end().saturating_add(MAX_AHEAD);
        if beyond || below {
            return Err((
                RejectReason::InvalidState,
                "client position outside the stream",
            ));
        }
        Ok(())
    }

    /// The epochs a Migrate may name here (none once the session ended).
    pub(super) fn accepted_epochs(&self) -> Vec<Epoch> {
        if self.is_ended() {
            return Vec::new();
        }
        std::iter::once(self.epoch).chain(self.prev_epoch).collect()
    }

    /// The secret a Migrate at `epoch` proves with: a client whose Resumed
    /// was lost still holds the previous epoch's.
    fn secret_for(&self, epoch: Epoch) -> &Secret {
        match &self.prev_secret {
            Some((s, _)) if self.prev_epoch == Some(epoch) && epoch != self.epoch => s,
            _ => &self.secret,
        }
    }

    /// The session's image for the server that resumes it for `m`: with
    /// the secret the client holds, which the next epoch's derives from,
    /// and without the down bytes below `from`.
    fn image_for(&mut self, m: &Migrate, from: Pos) -> SessionImage {
        let mut image = self.image_from(from);
        image.secret = self.secret_for(m.request.epoch).clone();
        image
    }

    /// The client comes back to the server that owns (or froze) its
    /// session, on incarnation `inc`.
    pub(super) fn resume_here(
        &mut self,
        now: Instant,
        inc: IncarnationId,
        m: &Migrate,
    ) -> ResumeHere {
        self.last_now = self.last_now.max(now);
        if let Err((reason, text)) = self.admit(m) {
            return ResumeHere::Reject(reason, text);
        }
        let held = self.gate.as_ref().and_then(|g| g.waiting.as_ref());
        if held.is_some_and(|w| w.2.request.attempt >= m.request.attempt) {
            // A later attempt of the client waits here already.
            return ResumeHere::Reject(RejectReason::AuthFailed, "superseded attempt");
        }
        self.last_attempt = m.request.attempt;
        if let Some(g) = self.gate.as_mut() {
            // A state request held for an older attempt is superseded. The
            // bytes asked for it only (the client said no Missing) were
            // asked from where that attempt stood, not from where the
            // client stands now: their reply is not taken, and the client
            // says Missing itself if its old connection ends short.
            if g.missing.is_none() {
                g.asked = None;
            }
            self.refuse_waiting(RejectReason::AuthFailed, "superseded attempt");
        }
        if matches!(self.lifecycle, Lifecycle::Settling(_)) {
            // The client gave up waiting for the destination and came back
            // here: the pending request is superseded.
            if let Lifecycle::Settling(st) = &self.lifecycle {
                let (since, cause) = (st.since, st.request.2.request.cause);
                self.reject_settling_request();
                self.freeze(now, since, cause, None, "client moved to a new incarnation");
            }
        }
        let link = match &self.lifecycle {
            Lifecycle::Frozen(_) => {
                let epoch = self.next_epoch;
                return ResumeHere::FromFrozen {
                    image: self.image_for(m, 0),
                    epoch,
                };
            }
            Lifecycle::Live(l) | Lifecycle::Releasing(l) => *l,
            Lifecycle::Settling(_) | Lifecycle::Ended(_) => {
                unreachable!("frozen above, or refused by admit")
            }
        };
        // Still live here: only the incarnation changes; owner and epoch
        // stay and the application carries on (requests other destinations
        // made for older attempts are refused as superseded). Resend from
        // the client's position.
        self.set_link(Link::Attached(inc));
        if let Link::Attached(old) = link {
            self.events.push_back(ServerEvent::CloseIncarnation {
                inc: old,
                reason: "client moved to a new incarnation".into(),
            });
        }
        self.rx = BytesMut::new();
        self.out.clear();
        self.in_flight.clear();
        self.wire_out = 0;
        self.wire_taken = 0;
        self.catch_up(m.request.down);
        // A draining client may have acknowledged more than its Migrate says.
        let down = m.request.down.max(self.down.start());
        self.snd_nxt = down;
        self.snd_taken = down;
        self.down_limit = m.request.down.saturating_add(m.request.window);
        self.fin_sent = false;
        self.fin_acked |= m.request.down_fin;
        self.ack_due = true;
        // The client resends from what it may drop (the commit point);
        // bytes this server already holds are skipped as they come again.
        self.rx_pos = self.commit_point();
        // The window is what the enforced limit leaves above the resend point.
        self.limit_sent = self.limit_sent.max(self.up_limit(&self.cfg.limits));
        self.out.push_back(Frame::Resumed {
            up: self.rx_pos,
            up_fin: self.up_fin.is_some() && self.rx_pos == self.rcv_nxt(),
            down,
            epoch: self.epoch,
            server: self.cfg.id.clone(),
            alternates: self.cfg.alternates.clone(),
            window: self.limit_sent - self.rx_pos,
            // A client at the previous epoch derives the current secret.
            rekey: self
                .prev_secret
                .as_ref()
                .filter(|_| {
                    self.prev_epoch == Some(m.request.epoch) && m.request.epoch != self.epoch
                })
                .map(|(_, k)| *k),
            replicated: self.backup.is_some(),
        });
        ResumeHere::Reattached
    }

    /// The client holds down bytes up to `c`, beyond what this copy's
    /// application has produced: it received them while draining a server
    /// that ran ahead of the state this copy resumed from. The application
    /// produces them again (it runs deterministically from its snapshot);
    /// they are dropped as it does (MTCP's discard, fig 4.9).
    fn catch_up(&mut self, c: Pos) {
        let end = self.down.end();
        if c > end {
            self.down = ByteQueue::new(c);
            self.discard += c - end;
        }
    }

    fn set_link(&mut self, link: Link) {
        match &mut self.lifecycle {
            Lifecycle::Live(l) | Lifecycle::Releasing(l) => *l = link,
            _ => {}
        }
        if let Link::Orphaned(since) = link {
            self.deadline(since + self.cfg.timeouts.orphan);
        }
    }

    /// Asks the endpoint to call [`Session::handle_timeout`] at `at`,
    /// unless it will call it sooner anyway.
    fn deadline(&mut self, at: Instant) {
        if self.armed.is_none_or(|a| at < a) {
            self.armed = Some(at);
            self.to_endpoint
                .push_back(EndpointEvent(EndpointEventKind::Deadline(at)));
        }
    }

    /// Bytes read from incarnation `inc`. Input on any other connection is
    /// ignored (MTCP's BLACKHOLE: an abandoned incarnation).
    pub fn handle_input(&mut self, now: Instant, inc: IncarnationId, data: &[u8]) {
        self.last_now = self.last_now.max(now);
        if self.incarnation() != Some(inc) {
            return;
        }
        self.rx.extend_from_slice(data);
        if let Err(e) = self.process_input() {
            self.close_incarnation(inc, e.to_string());
        }
    }

    /// Like [`Session::handle_input`], for a caller that reads into its own
    /// buffer: `buf` holds what this call left last time followed by what
    /// was just read. Frames are taken out of it without a copy; what is
    /// left (a partial frame) stays for the next read to append to.
    pub fn handle_input_buf(&mut self, now: Instant, inc: IncarnationId, buf: &mut BytesMut) {
        self.last_now = self.last_now.max(now);
        if self.incarnation() != Some(inc) {
            buf.clear();
            return;
        }
        if self.rx.is_empty() {
            std::mem::swap(&mut self.rx, buf);
        } else {
            self.rx.extend_from_slice(buf);
            buf.clear();
        }
        let r = self.process_input();
        std::mem::swap(&mut self.rx, buf);
        if let Err(e) = r {
            self.close_incarnation(inc, e.to_string());
        }
    }

    fn process_input(&mut self) -> Result<(), ProtocolError> {
        let max_frame = self.cfg.limits.max_frame;
        if let Lifecycle::Frozen(Frozen { tail: Some(t), .. }) = self.lifecycle {
            return self.tail_input(t);
        }
        while self.incarnation().is_some() {
            let Some(frame) = Frame::decode(&mut self.rx, max_frame)? else {
                break;
            };
            self.on_frame(frame)?;
        }
        if matches!(self.lifecycle, Lifecycle::Settling(_)) && self.down.start() >= self.snd_nxt {
            // Everything sent on the old incarnation reached the client.
            self.settle(self.last_now, "session migrated away");
        }
        Ok(())
    }

    /// Input on a frozen session's tail: the acknowledgements of what the
    /// client drains there free those bytes; once it has them all, the
    /// connection is closed.
    fn tail_input(&mut self, t: Tail) -> Result<(), ProtocolError> {
        let max_frame = self.cfg.limits.max_frame;
        while let Some(frame) = Frame::decode(&mut self.rx, max_frame)? {
            if let Frame::Ack { pos, limit, .. } = frame {
                if pos > self.snd_taken {
                    return Err(ProtocolError::Position("ack beyond the data sent"));
                }
                if pos > self.down.start() {
                    // Progress: the tail may take another `settle`.
                    let until = self.last_now + self.cfg.timeouts.settle;
                    if let Lifecycle::Frozen(Frozen { tail: Some(t), .. }) = &mut self.lifecycle {
                        t.until = until;
                    }
                }
                self.down.drop_to(pos);
                self.down_limit = self.down_limit.max(limit);
            }
        }
        if self.down.start() >= t.cut {
            self.end_tail("the client has everything sent there");
        }
        Ok(())
    }

    /// Closes a frozen session's tail, if it has one.
    fn end_tail(&mut self, reason: &str) {
        let Lifecycle::Frozen(f) = &mut self.lifecycle else {
            return;
        };
        if let Some(t) = f.tail.take() {
            self.rx = BytesMut::new();
            self.in_flight.clear();
            self.events.push_back(ServerEvent::CloseIncarnation {
                inc: t.inc,
                reason: reason.into(),
            });
        }
    }

    /// Keeps a block of the connection's read buffer that frames handed to
    /// [`Session::handle_input_buf`] were carved from, until the bytes
    /// received in it are read (see [`ByteQueue::adopt`]).
    pub fn adopt_read_block(&mut self, block: crate::stream::Block) {
        self.up.adopt(block);
    }

    /// The client connection ended (EOF, reset or error).
    pub fn handle_incarnation_closed(&mut self, now: Instant, inc: IncarnationId) {
        self.last_now = self.last_now.max(now);
        if self.incarnation() == Some(inc) {
            self.detach(now);
        }
    }

    fn detach(&mut self, now: Instant) {
        if matches!(self.lifecycle, Lifecycle::Settling(_)) {
            // Nothing more will be acknowledged: answer with what was.
            return self.settle(now, "client connection ended");
        }
        if let Lifecycle::Frozen(f) = &mut self.lifecycle {
            // The tail ended: what the client lacks, the destination asks.
            f.tail = None;
            self.rx = BytesMut::new();
            self.in_flight.clear();
            return;
        }
        self.set_link(Link::Orphaned(now));
        self.rx = BytesMut::new();
        self.out.clear();
        self.in_flight.clear();
    }

    /// Closes the attached incarnation (after pending output): without a
    /// client the session expires unless one comes back.
    fn close_incarnation(&mut self, inc: IncarnationId, reason: String) {
        if self.incarnation() == Some(inc) {
            if matches!(self.lifecycle, Lifecycle::Settling(_)) {
                return self.settle(self.last_now, &reason);
            }
            self.detach(self.last_now);
        }
        self.events
            .push_back(ServerEvent::CloseIncarnation { inc, reason });
    }

    /// The client holds the current epoch: the previous one is over.
    fn confirmed(&mut self) {
        self.prev_epoch = None;
        self.prev_secret = None;
        if let Some((origin, req)) = self.owed_ack.take() {
            // The origin may forget its frozen copy.
            self.control
                .push_back((origin, ControlMessage::StateAck { req }));
        }
    }

    fn on_frame(&mut self, frame: Frame) -> Result<(), ProtocolError> {
        if let Frame::Missing { pos, limit } = frame {
            return self.on_missing(pos, limit);
        }
        match &self.gate {
            // Until the bytes it lacks arrive, the client only acknowledges
            // (and opens its window).
            Some(g) if g.missing.is_some() && !matches!(frame, Frame::Ack { fin: false, .. }) => {
                return Err(ProtocolError::Unexpected {
                    frame: frame.name(),
                    why: "sent before the missing bytes arrived",
                });
            }
            Some(g) if g.missing.is_some() => {}
            // Any other frame says the client drained its old connection
            // up to the resume point: the down stream may go on (bytes
            // asked for meanwhile are not needed any more).
            Some(_) => self.lift_gate(),
            None => {}
        }
        if self.gate.is_none() {
            // The client confirmed this incarnation.
            self.confirmed();
        }
        let limits = &self.cfg.limits;
        let mut replicate = None;
        match frame {
            Frame::Data(mut data) => {
                let end = self.rx_pos + data.len() as u64;
                if self.up_fin.is_some_and(|f| end > f) {
                    return Err(ProtocolError::Position("data after Close"));
                }
                if end > self.limit_sent.max(self.rcv_nxt()) {
                    return Err(ProtocolError::Position("data beyond the advertised window"));
                }
                // Skip what a resend overlaps with bytes already held.
                let skip = self
                    .rcv_nxt()
                    .saturating_sub(self.rx_pos)
                    .min(data.len() as u64);
                self.rx_pos = end;
                let _ = data.split_to(skip as usize);
                if data.is_empty() {
                    return Ok(());
                }
                if self.backup.as_ref().is_some_and(|b| b.live) {
                    replicate = Some(ReplicaUpdate::Up {
                        pos: self.rcv_nxt(),
                        data: data.clone(),
                    });
                }
                self.up.push(data);
                if self.app_gone() {
                    self.discard_input();
                }
                self.ack_due = true;
                let at = self.last_now + self.cfg.limits.ack_delay;
                self.ack_at.get_or_insert(at);
                self.events.push_back(ServerEvent::Readable(self.handle));
            }
            Frame::Ack { pos, limit, fin } => {
                // Bytes count as sent once the socket took them: an ack
                // beyond that is a lie (TCP treats it the same way).
                if pos > self.snd_taken {
                    return Err(ProtocolError::Position("ack beyond the data sent"));
                }
                // The client may confirm a Close it got from an earlier
                // server (its Migrate said so: `fin_acked`).
                if fin && !self.fin_sent && !self.fin_acked {
                    return Err(ProtocolError::Position("ack of a Close not sent"));
                }
                let freed = pos > self.down.start();
                self.down.drop_to(pos);
                self.down_limit = self.down_limit.max(limit);
                self.fin_acked |= fin;
                let step = limits.send_buffer / 4;
                if let Some(b) = self.backup.as_mut().filter(|b| b.live) {
                    if self.down.start() >= b.acked_sent + step {
                        b.acked_sent = self.down.start();
                        replicate = Some(ReplicaUpdate::Acked { down: b.acked_sent });
                    }
                }
                if freed {
                    self.events.push_back(ServerEvent::Writable(self.handle));
                }
                if fin && self.finished() {
                    self.finish();
                    return Ok(());
                }
            }
            Frame::Close { pos } => {
                if pos != self.rx_pos
                    || pos != self.rcv_nxt()
                    || self.up_fin.is_some_and(|f| f != pos)
                {
                    return Err(ProtocolError::Position("Close not at the end of the data"));
                }
                if self.up_fin.is_none() {
                    self.up_fin = Some(pos);
                    if self.backup.as_ref().is_some_and(|b| b.live) {
                        replicate = Some(ReplicaUpdate::UpFin { pos });
                    }
                }
                self.ack_due = true;
                self.events.push_back(ServerEvent::Readable(self.handle));
            }
            Frame::Ping { nonce } => {
                self.out.push_back(Frame::Pong { nonce });
                return Ok(());
            }
            Frame::Pong { .. } => return Ok(()),
            f => {
                return Err(ProtocolError::Unexpected {
                    frame: f.name(),
                    why: "not allowed on an established incarnation",
                });
            }
        }
        if let Some(update) = replicate {
            self.replicate(update);
        }
        Ok(())
    }

    fn replicate(&mut self, update: ReplicaUpdate) {
        if let Some(b) = self.backup.as_ref() {
            let server = b.server.clone();
            self.replicate_to(server, update);
        }
    }

    fn replicate_to(&mut self, server: ServerId, update: ReplicaUpdate) {
        let now = self.last_now;
        let waiting = self
            .backup
            .as_mut()
            .filter(|b| b.live && b.waiting_since.is_none());
        if let Some(b) = waiting {
            b.waiting_since = Some(now);
            let at = now + self.cfg.timeouts.backup;
            self.deadline(at);
        }
        self.control.push_back((
            server,
            ControlMessage::Replicate {
                session: self.id,
                update,
            },
        ));
    }

    // ----- output ---------------------------------------------------------------

    /// Whether [`Session::poll_transmit`] has something to send at `now`:
    /// frames, data within the client's window, a Close, or an
    /// acknowledgement that cannot wait (see [`Session::ack_deadline`]).
    pub fn wants_transmit(&self, now: Instant) -> bool {
        if let Some(cut) = self.tail_cut() {
            return self.snd_nxt < cut.min(self.down_limit);
        }
        if self.incarnation().is_none() || !self.is_owned() {
            return false;
        }
        if !self.out.is_empty() {
            return true;
        }
        if self.gate.is_none() {
            let end = self.down.end().min(self.down_limit);
            if self.snd_nxt < end {
                return true;
            }
            if self.down_fin == Some(self.snd_nxt) && !self.fin_sent {
                return true;
            }
        }
        self.ack_needed(now, false).is_some()
    }

    /// When a delayed acknowledgement must go out if no data carries it
    /// sooner: call [`Session::poll_transmit`] then.
    pub fn ack_deadline(&self) -> Option<Instant> {
        self.ack_at
            .filter(|_| self.incarnation().is_some() && self.is_owned())
    }

    /// The Ack to send at `now`, if one is due: the Close became
    /// acknowledged, the client is blocked on a window that has opened, a
    /// quarter of the window is unacknowledged or opened, or the commit
    /// point moved and either other frames are `sending` (the Ack rides
    /// along) or the ack delay has passed.
    fn ack_needed(&self, now: Instant, sending: bool) -> Option<Frame> {
        let limits = &self.cfg.limits;
        let step = limits.window_step();
        let limit = self.up_limit(limits);
        // Never acknowledge what the client has not (re)sent on this
        // incarnation: after a reattach it resends from `rx_pos`.
        let commit = self.commit_point().min(self.rx_pos.max(self.ack_sent));
        let fin = self.up_fin.is_some_and(|f| f == commit);
        let urgent = commit >= self.ack_sent + step || limit >= self.limit_sent + step;
        let late = sending || self.ack_at.is_some_and(|t| t <= now);
        let moved = urgent || (commit > self.ack_sent && late);
        let blocked = limit > self.limit_sent && self.rcv_nxt() == self.limit_sent;
        (fin != self.fin_ack_sent || blocked || (self.ack_due && moved)).then(|| Frame::Ack {
            pos: commit,
            limit: limit.max(self.limit_sent),
            fin,
        })
    }

    /// The next bytes for the attached incarnation: appends segments to
    /// `out` (frame headers and zero-copy payload slices, to be written in
    /// order, e.g. vectored), about `max` bytes at most. Returns the
    /// incarnation they are for, or `None` when nothing is waiting. Call
    /// [`Session::on_transmitted`] with what the socket took.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        out: &mut Vec<Bytes>,
        max: usize,
    ) -> Option<IncarnationId> {
        self.last_now = self.last_now.max(now);
        let tail = self.tail_cut();
        let inc = self
            .incarnation()
            .filter(|_| self.is_owned() || tail.is_some())?;
        let start = out.len();
        let mut hdr = take_scratch(&mut self.scratch);
        for f in self.out.drain(..) {
            f.encode(&mut hdr);
        }
        if !hdr.is_empty() {
            let b = hdr.split().freeze();
            self.wire_out += b.len() as u64;
            out.push(b);
        }
        if let Some((reason, text)) = self.aborting.take() {
            // The Reject went out: nothing follows it.
            self.scratch = hdr;
            self.end_aborted(reason, &text);
            return (out.len() > start).then_some(inc);
        }
        let limits = self.cfg.limits.clone();
        let mut budget = max;
        loop {
            // A tail carries the stream up to its cut, and nothing else.
            let end = tail.unwrap_or(self.down.end()).min(self.down_limit);
            if self.snd_nxt >= end || budget == 0 || self.gate.is_some() {
                break;
            }
            let before = out.len();
            let frame_end = end.min(self.snd_nxt + limits.max_data_frame as u64);
            let mut next = self.snd_nxt;
            self.down
                .frame_data(&mut next, frame_end, limits.max_data_frame, &mut hdr, out);
            if next == self.snd_nxt {
                break;
            }
            let bytes: u64 = out[before..].iter().map(|b| b.len() as u64).sum();
            self.wire_out += bytes;
            self.snd_nxt = next;
            self.in_flight.push_back((self.wire_out, next));
            budget = budget.saturating_sub(bytes as usize);
        }
        if self.down_fin == Some(self.snd_nxt)
            && !self.fin_sent
            && self.snd_nxt == self.down.end()
            && self.gate.is_none()
            && tail.is_none()
        {
            Frame::Close { pos: self.snd_nxt }.encode(&mut hdr);
            self.fin_sent = true;
        }
        let sending = out.len() > start || !hdr.is_empty();
        if let Some(ack) = self.ack_needed(now, sending).filter(|_| tail.is_none()) {
            ack.encode(&mut hdr);
            if let Frame::Ack { pos, limit, fin } = ack {
                self.ack_sent = pos;
                self.limit_sent = limit;
                self.fin_ack_sent = fin;
            }
            self.ack_due = false;
        }
        if self.commit_point().min(self.rx_pos.max(self.ack_sent)) <= self.ack_sent {
            // Nothing left to acknowledge: no delayed ack pending.
            self.ack_at = None;
        }
        if !hdr.is_empty() {
            let b = hdr.split().freeze();
            self.wire_out += b.len() as u64;
            out.push(b);
        }
        self.scratch = hdr;
        if out.len() == start {
            idle_scratch(&mut self.scratch);
        }
        if self.finished() {
            self.finish();
        }
        (out.len() > start).then_some(inc)
    }

    /// The socket took `bytes` more bytes of what
    /// [`Session::poll_transmit`] handed out for incarnation `inc`: the
    /// Data frames among them count as sent.
    pub fn on_transmitted(&mut self, inc: IncarnationId, bytes: usize) {
        if self.incarnation() != Some(inc) {
            return;
        }
        self.wire_taken = (self.wire_taken + bytes as u64).min(self.wire_out);
        while let Some(&(wire, pos)) = self.in_flight.front() {
            if wire > self.wire_taken {
                break;
            }
            self.snd_taken = self.snd_taken.max(pos);
            self.in_flight.pop_front();
        }
    }

    // ----- the application's calls ------------------------------------------

    fn live(&mut self) -> Result<&mut Self, AppError> {
        match &self.lifecycle {
            Lifecycle::Live(_) => Ok(self),
            Lifecycle::Ended(e) => Err(AppError::Session(e.clone())),
            _ => Err(AppError::Session(SessionError::Migrated)),
        }
    }

    /// Reads up-stream bytes: `Ok(Some(n))` with `n > 0` bytes, `Ok(Some(0))`
    /// at the end of the stream, `Ok(None)` when nothing is there yet (wait
    /// for [`ServerEvent::Readable`]). Read bytes stay in the read log until
    /// the next [`Session::snapshot`].
    pub fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, AppError> {
        if matches!(self.lifecycle, Lifecycle::Ended(SessionError::Closed)) {
            // A finished session read everything: only the end remains.
            return Ok(Some(0));
        }
        let s = self.live()?;
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
            s.maybe_finish();
        }
        Ok(Some(n))
    }

    /// Writes down-stream bytes; returns how many were taken (0 when the
    /// send buffer is full: wait for [`ServerEvent::Writable`]). Bytes the
    /// client already has from before a migration are counted and dropped.
    pub fn write(&mut self, data: &[u8]) -> Result<usize, AppError> {
        self.take_write(data.len(), |down, r| down.push_slice(&data[r]))
    }

    /// As [`Session::write`], without copying: the send buffer keeps (a
    /// slice of) `data` itself until the client acknowledges it. For an
    /// application that reads its output into buffers of its own, such as
    /// a file server; a partial take leaves the rest to the caller.
    pub fn write_bytes(&mut self, data: &Bytes) -> Result<usize, AppError> {
        self.take_write(data.len(), |down, r| down.push(data.slice(r)))
    }

    /// Takes what fits of `len` bytes written by the application: those the
    /// client already has count and are dropped, `push` appends the range
    /// of them that the send buffer takes.
    fn take_write(
        &mut self,
        len: usize,
        push: impl FnOnce(&mut ByteQueue, std::ops::Range<usize>),
    ) -> Result<usize, AppError> {
        let send_buffer = self.cfg.limits.send_buffer;
        let s = self.live()?;
        if s.down_fin.is_some() {
            return Err(AppError::WriteAfterClose);
        }
        let dropped = (s.discard.min(len as u64)) as usize;
        s.discard -= dropped as u64;
        let room = send_buffer.saturating_sub(s.down.len()) as usize;
        let take = (len - dropped).min(room);
        push(&mut s.down, dropped..dropped + take);
        s.app_write += (dropped + take) as u64;
        Ok(dropped + take)
    }

    /// Closes the down direction after the bytes written so far.
    pub fn close_write(&mut self) -> Result<(), AppError> {
        let s = self.live()?;
        s.close_down();
        Ok(())
    }

    fn close_down(&mut self) {
        if self.down_fin.is_none() {
            // A deterministic application never closes before the bytes
            // the client already has; if it does, the stream ends there.
            self.app_write += self.discard;
            self.discard = 0;
            self.down_fin = Some(self.app_write);
        }
    }

    /// MTCP's `set_state` / `export_state`: records `state` as the restart
    /// point. The read log is dropped and the write position remembered: a
    /// server resuming from `state` will read from here and write from here.
    /// On a session that finished (both directions closed and acknowledged,
    /// perhaps just after the application's own close) there is nothing
    /// left to resume: it succeeds and records nothing.
    pub fn snapshot(&mut self, state: &[u8]) -> Result<(), AppError> {
        if matches!(self.lifecycle, Lifecycle::Ended(SessionError::Closed)) {
            return Ok(());
        }
        let max_state = self.cfg.max_state;
        let step = self.cfg.limits.window_step();
        let window = self.cfg.limits.recv_window;
        if state.len() > max_state {
            return Err(AppError::StateTooLarge {
                len: state.len(),
                max: max_state,
            });
        }
        let s = self.live()?;
        s.up.drop_to(s.app_read);
        s.down_snap = s.app_write;
        s.snap_down_fin = s.down_fin.filter(|f| *f == s.app_write);
        s.app_state = Bytes::copy_from_slice(state);
        let limit = s.up.start() + window;
        if limit >= s.limit_sent + step || (limit > s.limit_sent && s.rcv_nxt() == s.limit_sent) {
            s.ack_due = true;
        }
        if let Some(b) = s.backup.as_mut().filter(|b| b.live) {
            let from = b.down_sent.max(s.down.start());
            let down_data = s.down.slice(from, s.down_snap);
            b.down_sent = b.down_sent.max(s.down_snap);
            let update = ReplicaUpdate::Snapshot {
                up_snap: s.up.start(),
                down_snap: s.down_snap,
                down_fin: s.snap_down_fin,
                app_state: s.app_state.clone(),
                down_pos: from.min(s.down_snap),
                down_data,
            };
            s.replicate(update);
        }
        Ok(())
    }

    /// Server push (MTCP 3.2.1 case a): asks the client to migrate, to
    /// `dest` if given. The client initiates the migration.
    pub fn migrate_to(&mut self, dest: Option<ServerId>) -> Result<(), AppError> {
        let s = self.live()?;
        if s.incarnation().is_some() {
            s.out.push_back(Frame::Trigger { dest });
        }
        Ok(())
    }

    /// Sends the client a Trigger towards `dest` if given (operator push,
    /// destination pull); `false` when the session is not live here or
    /// its client is not connected right now.
    pub(super) fn trigger(&mut self, dest: Option<ServerId>) -> bool {
        let ok = matches!(self.lifecycle, Lifecycle::Live(Link::Attached(_)));
        if ok {
            self.out.push_back(Frame::Trigger { dest });
        }
        ok
    }

    /// The application is done with the session (it dropped it). A session
    /// still live here ends gracefully, as a TCP socket closed by its
    /// application: the down direction is closed if it was not, unread and
    /// further up bytes are discarded, and the session finishes once the
    /// client closes too. Later calls fail with [`SessionError::Migrated`].
    pub fn release(&mut self) {
        match self.lifecycle {
            Lifecycle::Live(link) => {
                self.lifecycle = Lifecycle::Releasing(link);
                self.close_down();
                self.discard_input();
                self.maybe_finish();
            }
            Lifecycle::Ended(_) => self.lifecycle = Lifecycle::Ended(SessionError::Migrated),
            _ => {}
        }
    }

    /// The application is gone: what arrived counts as read (and needs no
    /// log: nobody will resume it).
    fn discard_input(&mut self) {
        self.app_read = self.rcv_nxt();
        self.up.drop_to(self.app_read);
    }

    fn maybe_finish(&mut self) {
        if self.is_owned() && self.finished() {
            self.finish();
        }
    }

    /// Both directions are closed and acknowledged: the session is gone
    /// (its connection is closed after pending output).
    fn finish(&mut self) {
        if !self.is_owned() {
            return;
        }
        self.forget_backup();
        self.end(
            SessionError::Closed,
            ServerEvent::Finished(self.handle),
            "session finished",
            EndpointEventKind::Ended {
                finished: true,
                moved: false,
            },
        );
    }

    fn forget_backup(&mut self) {
        if let Some(b) = self.backup.take() {
            self.control
                .push_back((b.server, ControlMessage::Forget { session: self.id }));
        }
    }

    /// Ends the session here: an application still serving it gets
    /// `event`, and `error` from then on; its connection is closed (after
    /// pending output) for `reason`; the endpoint learns `ended`.
    fn end(
        &mut self,
        error: SessionError,
        event: ServerEvent,
        reason: &str,
        ended: EndpointEventKind,
    ) {
        self.refuse_waiting(RejectReason::NotFound, "no such session here");
        let app = matches!(self.lifecycle, Lifecycle::Live(_));
        let inc = self.incarnation();
        self.lifecycle = Lifecycle::Ended(error);
        if app {
            self.events.push_back(event);
        }
        if let Some(inc) = inc {
            self.events.push_back(ServerEvent::CloseIncarnation {
                inc,
                reason: reason.into(),
            });
        }
        self.to_endpoint.push_back(EndpointEvent(ended));
    }

    /// Ends the session for good, with `Reject(reason)` to its client
    /// (when it is connected; the client then fails at once instead of
    /// looking for another server): a draining server that could not move
    /// it. `false` when it is not owned here (frozen or ended).
    /// `false` also when it is being ended already.
    pub(super) fn abort(&mut self, now: Instant, reason: RejectReason, text: &str) -> bool {
        self.last_now = self.last_now.max(now);
        let (Lifecycle::Live(link) | Lifecycle::Releasing(link)) = self.lifecycle else {
            return false;
        };
        if self.aborting.is_some() {
            return false;
        }
        self.refuse_waiting(reason, text);
        self.forget_backup();
        match link {
            Link::Attached(_) => {
                self.out.push_back(Frame::Reject {
                    reason,
                    text: text.into(),
                });
                self.aborting = Some((reason, text.into()));
            }
            Link::Orphaned(_) => self.end_aborted(reason, text),
        }
        true
    }

    fn end_aborted(&mut self, reason: RejectReason, text: &str) {
        self.end(
            SessionError::Rejected {
                server: self.cfg.id.clone(),
                reason,
                text: text.into(),
            },
            ServerEvent::Dropped(self.handle),
            &format!("session ended: {reason}"),
            EndpointEventKind::Ended {
                finished: false,
                moved: false,
            },
        );
    }

    /// Replaced by a newer installation of the same session here (or by the
    /// owner's state): the application stops serving it.
    pub(super) fn supersede(&mut self, reason: &str) {
        self.refuse_waiting(RejectReason::NotFound, "no such session here");
        let inc = self.incarnation();
        let app = matches!(self.lifecycle, Lifecycle::Live(_));
        self.lifecycle = Lifecycle::Ended(SessionError::Migrated);
        if app {
            self.events
                .push_back(ServerEvent::MigratedAway(self.handle));
        }
        if let Some(inc) = inc {
            self.events.push_back(ServerEvent::CloseIncarnation {
                inc,
                reason: reason.into(),
            });
        }
    }

    // ----- the control plane ----------------------------------------------------

    /// MTCP 4.2.3 "Once S1 receives the state request": verify, stop the
    /// application, pack the state for the client's position and reply.
    ///
    /// When down bytes sent on the attached incarnation are not yet
    /// acknowledged and the client keeps that incarnation (`draining`),
    /// they reach the client there: under a full-speed stream they are up
    /// to a window of data, which would otherwise travel to the
    /// destination and be sent a second time. Without a live backup the
    /// reply leaves at once, cut after everything the incarnation carries
    /// (see [`Tail`]); the destination resumes there and waits for the
    /// client to catch up (see [`Gate`]). A replicated session waits for
    /// the acknowledgements first (see [`Lifecycle::Settling`]) and cuts at
    /// `max(c, snd_una)`, every byte of which the client holds; the client
    /// drops what the destination sends below its own position (MTCP's β
    /// correction, done by the client).
    pub(super) fn on_state_request(
        &mut self,
        now: Instant,
        from: &ServerId,
        req: u64,
        m: &Migrate,
    ) {
        self.last_now = self.last_now.max(now);
        if let Err((reason, text)) = self.admit(m) {
            return self.reject_request(from.clone(), req, reason, text);
        }
        if self.gate.is_some() {
            return self.hold_request(from, req, m);
        }
        self.last_attempt = m.request.attempt;
        let request = (from.clone(), req, m.clone());
        if matches!(self.lifecycle, Lifecycle::Settling(_)) {
            // A newer attempt of the client (it gave up on the destination
            // of the older one): answer this one instead.
            self.reject_settling_request();
            if let Lifecycle::Settling(st) = &mut self.lifecycle {
                st.request = request;
            }
            return;
        }
        let unacked = self.down.start() < self.snd_nxt;
        let backed_up = self.backup.as_ref().is_some_and(|b| b.live);
        match self.lifecycle {
            Lifecycle::Live(Link::Attached(inc)) | Lifecycle::Releasing(Link::Attached(inc))
                if m.request.draining && unacked && !backed_up =>
            {
                // Answer at once, cut at everything sent; the connection
                // stays open for the client to drain (see `Tail`).
                self.freeze_for(now, request, now, Some(inc), "session migrated away");
            }
            Lifecycle::Live(Link::Attached(inc)) | Lifecycle::Releasing(Link::Attached(inc))
                if m.request.draining && unacked =>
            {
                let app = self.is_live();
                let until = now + self.cfg.timeouts.settle;
                self.lifecycle = Lifecycle::Settling(Settling {
                    inc,
                    until,
                    since: now,
                    request,
                });
                self.out.clear();
                self.ack_at = None;
                if app {
                    self.events
                        .push_back(ServerEvent::MigratedAway(self.handle));
                }
                self.deadline(until);
            }
            _ => self.freeze_for(now, request, now, None, "session migrated away"),
        }
    }

    /// The settling session answers its state request now.
    fn settle(&mut self, now: Instant, reason: &str) {
        let Lifecycle::Settling(st) = &self.lifecycle else {
            return;
        };
        let (request, since) = (st.request.clone(), st.since);
        self.freeze_for(now, request, since, None, reason);
    }

    /// The settling session's request is superseded: its destination is
    /// told so, and the session freezes without answering it.
    fn reject_settling_request(&mut self) {
        if let Lifecycle::Settling(st) = &self.lifecycle {
            let (to, req) = (st.request.0.clone(), st.request.1);
            self.reject_request(to, req, RejectReason::AuthFailed, "superseded attempt");
        }
    }

    /// Refuses state request `req` of `to`.
    fn reject_request(&mut self, to: ServerId, req: u64, reason: RejectReason, text: &str) {
        self.control.push_back((
            to,
            ControlMessage::StateReject {
                req,
                reason,
                text: text.to_string(),
            },
        ));
    }

    /// Stops the session here, if it is not frozen yet: the application's
    /// next call fails with *migrated*, and the connection it was attached
    /// to is closed for `reason`. It then waits for StateAck (or for the
    /// client to come back) until `timeouts.frozen`.
    fn freeze(
        &mut self,
        now: Instant,
        since: Instant,
        cause: MigrationCause,
        keep: Option<IncarnationId>,
        reason: &str,
    ) {
        if matches!(self.lifecycle, Lifecycle::Frozen(_)) {
            return;
        }
        let app = self.is_live();
        let inc = self.incarnation();
        let deadline = now + self.cfg.timeouts.frozen;
        // The tail also carries what the application wrote before its
        // snapshot and was not sent yet, as far as the client's window
        // reaches: the destination could not produce those bytes again,
        // and they need not cross the control plane. (Not beyond the
        // window: the client must be able to take the whole tail without
        // its application reading.)
        let tail = keep.filter(|k| inc == Some(*k)).map(|inc| Tail {
            inc,
            cut: self.snd_nxt.max(self.down_snap.min(self.down_limit)),
            until: now + self.cfg.timeouts.settle,
        });
        self.lifecycle = Lifecycle::Frozen(Frozen {
            deadline,
            since,
            cause,
            replied: Vec::new(),
            tail,
        });
        self.deadline(deadline);
        if app {
            self.events
                .push_back(ServerEvent::MigratedAway(self.handle));
        }
        match tail {
            Some(t) => {
                // Nothing more goes out there; the socket delivers what it
                // took, and the acknowledgements keep coming in.
                self.out.clear();
                self.ack_at = None;
                self.deadline(t.until);
            }
            None => self.close_detached(inc, reason),
        }
    }

    /// Freezes the session (if it is not yet, see [`Session::freeze`]) and
    /// answers `request` with its state cut for the client's position
    /// (MTCP 4.2.3 step 4).
    fn freeze_for(
        &mut self,
        now: Instant,
        request: (ServerId, u64, Migrate),
        since: Instant,
        keep: Option<IncarnationId>,
        reason: &str,
    ) {
        let (from, req, m) = request;
        self.freeze(now, since, m.request.cause, keep, reason);
        let frozen_timeout = self.cfg.timeouts.frozen;
        if let Lifecycle::Frozen(f) = &mut self.lifecycle {
            f.replied.push((from.clone(), req));
            f.deadline = now + frozen_timeout;
        }
        self.deadline(now + frozen_timeout);
        let new_epoch = self.next_epoch;
        self.next_epoch += 1;
        if self.backup.as_ref().is_some_and(|b| b.live) {
            let update = ReplicaUpdate::Epoch {
                epoch: self.epoch,
                next: self.next_epoch,
            };
            self.replicate(update);
        }
        // With a tail the stream resumes after everything sent there.
        let cut = match &self.lifecycle {
            Lifecycle::Frozen(Frozen { tail: Some(t), .. }) => m.request.down.max(t.cut),
            _ => m.request.down,
        };
        let (image, _) = self.image_for(&m, cut).trim_for(cut);
        self.control.push_back((
            from.clone(),
            ControlMessage::StateReply {
                req,
                new_epoch,
                image,
            },
        ));
        self.to_endpoint
            .push_back(EndpointEvent(EndpointEventKind::Replied { to: from, req }));
    }

    /// Closes `inc`, the connection a session just left (after pending
    /// output), and drops what was read or framed for it.
    fn close_detached(&mut self, inc: Option<IncarnationId>, reason: &str) {
        self.rx = BytesMut::new();
        self.out.clear();
        self.in_flight.clear();
        if let Some(inc) = inc {
            self.events.push_back(ServerEvent::CloseIncarnation {
                inc,
                reason: reason.into(),
            });
        }
    }

    /// Whether this frozen session answered `from`'s request `req`.
    pub(super) fn replied_to(&self, from: &ServerId, req: u64) -> bool {
        matches!(&self.lifecycle, Lifecycle::Frozen(f)
            if f.replied.iter().any(|(p, r)| p == from && *r == req))
    }

    /// The destination `from` asks for the down bytes `[start, end)` that
    /// the client's old connection (this session's tail) did not deliver.
    /// Those the client acknowledged there since are not sent (it holds
    /// them): the answer starts where this copy's bytes do.
    pub(super) fn on_gap_request(&mut self, from: &ServerId, req: u64, start: Pos, end: Pos) {
        let start = start.max(self.down.start());
        let held = self.replied_to(from, req)
            && self.down.start() <= start
            && start <= end
            && end <= self.down.end()
            && end - start <= self.cfg.limits.recv_window.max(self.cfg.limits.send_buffer);
        let data = held.then(|| self.down.slice(start, end));
        // The client no longer reads the tail.
        self.end_tail("the destination sends what the client lacks");
        self.control.push_back((
            from.clone(),
            ControlMessage::GapReply {
                session: self.id,
                start,
                data,
            },
        ));
    }

    /// The client's old connection ended at `pos`, short of the resume
    /// point: ask the server that gave the state for the bytes between.
    fn on_missing(&mut self, pos: Pos, limit: Pos) -> Result<(), ProtocolError> {
        let until = self.last_now + self.cfg.timeouts.state_request;
        let Some(g) = self.gate.as_mut().filter(|g| g.from <= pos && pos < g.at) else {
            return Err(ProtocolError::Position("Missing outside the gap"));
        };
        if g.missing.is_some_and(|m| m != pos) {
            return Err(ProtocolError::Position("Missing moved"));
        }
        g.missing = Some(pos);
        match g.asked {
            // Asked already: the client came back on a new connection, or
            // a state request that came while it was away asked from where
            // its Migrate said (it held every byte below).
            Some(a) if a.pos <= pos => {}
            Some(_) => return Err(ProtocolError::Position("Missing moved")),
            // Resumed from a replica: the bytes were only on the lost
            // connection and at the crashed origin.
            None if g.holder.is_none() => {
                self.abort(
                    self.last_now,
                    RejectReason::InvalidState,
                    "down bytes in flight on the old connection were lost with it",
                );
                return Ok(());
            }
            None => {
                g.asked = Some(Asked {
                    pos,
                    again: false,
                    until,
                });
                self.ask_gap();
            }
        }
        self.down_limit = self.down_limit.max(limit);
        Ok(())
    }

    /// Sends (again) the gap request of the gate.
    fn ask_gap(&mut self) {
        let Some(g) = &self.gate else {
            return;
        };
        let (Some((holder, req)), Some(a)) = (g.holder.clone(), g.asked) else {
            return;
        };
        let msg = ControlMessage::GapRequest {
            req,
            session: self.id,
            start: a.pos,
            end: g.at,
        };
        self.control.push_back((holder, msg));
        self.deadline(a.until);
    }

    /// Whether this session waits for bytes from `peer` (a gap request).
    pub(super) fn waits_gap_from(&self, peer: &ServerId) -> bool {
        self.gate
            .as_ref()
            .is_some_and(|g| g.asked.is_some() && g.holder.as_ref().is_some_and(|(h, _)| h == peer))
    }

    /// The control link to `peer` went down: a backup there is lost, and
    /// bytes asked of it are asked again (the link comes back for the
    /// message).
    pub(super) fn peer_down(&mut self, now: Instant, peer: &ServerId) {
        self.last_now = self.last_now.max(now);
        self.backup_lost(peer);
        if !self.waits_gap_from(peer) {
            return;
        }
        if let Some(a) = self.gate.as_mut().and_then(|g| g.asked.as_mut()) {
            a.again = true;
        }
        let at = now + self.cfg.timeouts.settle;
        self.deadline(at);
    }

    /// The server that gave the state answered a gap request: the bytes go
    /// out first, then the stream from the resume point.
    pub(super) fn on_gap_reply(
        &mut self,
        now: Instant,
        from: &ServerId,
        start: Pos,
        data: Option<Bytes>,
    ) {
        self.last_now = self.last_now.max(now);
        // The holder answers from where it was asked, or later when the
        // client acknowledged more on its old connection meanwhile (it
        // holds those bytes).
        let Some(g) = self.gate.as_ref().filter(|g| {
            g.asked.is_some_and(|a| a.pos <= start)
                && g.holder.as_ref().is_some_and(|(h, _)| h == from)
        }) else {
            return;
        };
        // The down stream goes on from where the client said it stopped,
        // or, asked for a state request while the client is away, from
        // where the bytes start (the reply's image starts there).
        let attached = self.incarnation().is_some();
        let Some(resume) = g.missing.or((!attached).then_some(start)) else {
            return;
        };
        let at = g.at;
        let fits = |d: &Bytes| d.len() as u64 == at - start;
        match data.filter(|d| fits(d) && self.down.start() == at && start <= resume) {
            Some(d) => {
                let mut down = ByteQueue::new(start);
                down.push(d);
                let rest = self.down.slice(at, self.down.end());
                if !rest.is_empty() {
                    down.push(rest);
                }
                self.down = down;
                // The client holds what its old connection brought.
                self.down.drop_to(resume);
                self.snd_nxt = resume;
                self.snd_taken = resume;
                self.lift_gate();
            }
            None => self.gap_failed(
                now,
                RejectReason::InvalidState,
                "the origin no longer holds the down bytes the old connection lost",
            ),
        }
    }

    /// A state request while the client catches up here (see [`Gate`]):
    /// the client left before it held the resume point, so the bytes below
    /// it are fetched from the holder (from where the client's Migrate
    /// says it stands), and the request waits for them. A newer attempt
    /// of the client takes the place of an older one.
    fn hold_request(&mut self, from: &ServerId, req: u64, m: &Migrate) {
        // Half the requester's own wait: it hears a refusal before it
        // gives up on its own.
        let until = self.last_now + self.cfg.timeouts.state_request / 2;
        let Some(g) = self.gate.as_mut() else {
            return;
        };
        let pos = m.request.down;
        let ask = match (&g.holder, g.asked) {
            (Some(_), None) => true,
            (Some(_), Some(a)) if a.pos <= pos => false,
            // Resumed from a replica (the bytes were only at the crashed
            // origin and on the lost connection), or a position the
            // client's own Missing contradicts.
            _ => {
                return self.reject_request(
                    from.clone(),
                    req,
                    RejectReason::Busy,
                    "the client has not caught up with this server yet",
                )
            }
        };
        let newer = (from.clone(), req, m.clone());
        let older = match g.waiting.take() {
            Some(w) if w.2.request.attempt >= m.request.attempt => {
                g.waiting = Some(w);
                Some(newer)
            }
            w => {
                g.waiting = Some(newer);
                w
            }
        };
        if ask {
            g.asked = Some(Asked {
                pos,
                again: false,
                until,
            });
            self.ask_gap();
        }
        if let Some((to, req, _)) = older {
            self.reject_request(to, req, RejectReason::AuthFailed, "superseded attempt");
        }
    }

    /// The client holds everything below the resume point: the down
    /// stream goes on, and a state request that waited is answered.
    fn lift_gate(&mut self) {
        let Some(g) = self.gate.take() else {
            return;
        };
        if let Some((from, req, m)) = g.waiting {
            self.on_state_request(self.last_now, &from, req, &m);
        }
    }

    /// The bytes below the resume point cannot be had. After the client's
    /// Missing the session ends (they existed nowhere else). Asked only
    /// for a held state request, the client may still catch up on its old
    /// connection: that request is refused (`Busy`) and the session stays.
    fn gap_failed(&mut self, now: Instant, reason: RejectReason, text: &str) {
        match self.gate.as_mut() {
            Some(g) if g.missing.is_none() => {
                g.asked = None;
                self.refuse_waiting(RejectReason::Busy, text);
            }
            _ => {
                self.refuse_waiting(reason, text);
                self.gate = None;
                self.abort(now, reason, text);
            }
        }
    }

    /// Refuses the state request held for the bytes below the resume
    /// point, if there is one.
    fn refuse_waiting(&mut self, reason: RejectReason, text: &str) {
        if let Some((to, req, _)) = self.gate.as_mut().and_then(|g| g.waiting.take()) {
            self.reject_request(to, req, reason, text);
        }
    }

    /// The destination confirmed the session (StateAck): it is gone from
    /// here (MTCP's BLACKHOLE for anything still arriving).
    pub(super) fn on_state_ack(&mut self, from: &ServerId, req: u64) {
        if !self.replied_to(from, req) {
            return;
        }
        self.report_out(from.clone(), MigrationOutcome::Moved);
        self.forget_backup();
        self.end(
            SessionError::Migrated,
            ServerEvent::MigratedAway(self.handle),
            "session migrated away",
            EndpointEventKind::Ended {
                finished: false,
                moved: true,
            },
        );
    }

    fn report_out(&mut self, to: ServerId, outcome: MigrationOutcome) {
        let Lifecycle::Frozen(f) = &self.lifecycle else {
            return;
        };
        let report = MigrationReport {
            session: self.id,
            direction: Direction::Out,
            peer: to,
            cause: f.cause,
            outcome,
            duration: self.last_now.saturating_duration_since(f.since),
            replayed: 0,
            discarded: 0,
        };
        self.to_endpoint
            .push_back(EndpointEvent(EndpointEventKind::Report(report)));
    }

    /// The backup acknowledged replicated state up to `up` at `epoch`.
    pub(super) fn on_replicate_ack(
        &mut self,
        now: Instant,
        from: &ServerId,
        up: Pos,
        epoch: Epoch,
    ) {
        self.last_now = self.last_now.max(now);
        let rcv_nxt = self.rcv_nxt();
        let mut rearm = None;
        if let Some(b) = self.backup.as_mut().filter(|b| &b.server == from) {
            b.acked_epoch = Some(epoch);
            if up > b.held_up {
                b.held_up = up;
                self.ack_due = true;
            }
            // Progress restarts the wait for what is still unacknowledged.
            b.waiting_since = (b.held_up < rcv_nxt).then_some(now);
            rearm = b.waiting_since;
        }
        if let Some(since) = rearm {
            self.deadline(since + self.cfg.timeouts.backup);
        }
    }

    /// The backup lost step: send it the whole state again.
    pub(super) fn resync(&mut self, backup: &ServerId) {
        if !self.is_owned() || self.backup.as_ref().is_none_or(|b| &b.server != backup) {
            return;
        }
        let image = self.image();
        let (down_snap, start) = (self.down_snap, self.down.start());
        let b = self.backup.as_mut().expect("checked");
        b.live = true;
        b.acked_epoch = None;
        b.waiting_since = None;
        b.down_sent = down_snap;
        b.acked_sent = start;
        let server = b.server.clone();
        self.replicate_to(server, ReplicaUpdate::Full { image });
    }

    /// The backup `peer` will not keep this session, or is unreachable: the
    /// session keeps running without crash tolerance (acks stop waiting
    /// for it).
    pub(super) fn backup_lost(&mut self, peer: &ServerId) {
        if let Some(b) = self.backup.as_mut().filter(|b| &b.server == peer) {
            b.live = false;
            b.waiting_since = None;
            self.ack_due = true;
        }
    }

    /// Whether `peer` backs this session up and is not live (to resync
    /// when it comes back).
    pub(super) fn backup_down_on(&self, peer: &ServerId) -> bool {
        self.is_owned()
            && self
                .backup
                .as_ref()
                .is_some_and(|b| &b.server == peer && !b.live)
    }

    /// Whether `peer` backs this session up.
    pub(super) fn backed_up_by(&self, peer: &ServerId) -> bool {
        self.backup.as_ref().is_some_and(|b| &b.server == peer)
    }

    // ----- time ---------------------------------------------------------------

    /// The session's next deadline, if any: the frozen timeout, the
    /// orphan timeout of a session without a client, the end of a wait for
    /// the client's acknowledgements before a state reply, or the wait for
    /// a backup's acknowledgement.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.end_deadline()
            .into_iter()
            .chain(self.settle_deadline())
            .chain(self.backup_deadline())
            .chain(self.gap_deadline())
            .min()
    }

    /// The wait for the client's acknowledgements: before the reply while
    /// settling, of the tail after it.
    fn settle_deadline(&self) -> Option<Instant> {
        match &self.lifecycle {
            Lifecycle::Settling(st) => Some(st.until),
            Lifecycle::Frozen(Frozen { tail: Some(t), .. }) => Some(t.until),
            _ => None,
        }
    }

    /// The wait for the bytes a client's old connection lost.
    fn gap_deadline(&self) -> Option<Instant> {
        self.gate.as_ref()?.asked.map(|a| a.until)
    }

    fn end_deadline(&self) -> Option<Instant> {
        match &self.lifecycle {
            Lifecycle::Frozen(f) => Some(f.deadline),
            Lifecycle::Live(Link::Orphaned(since))
            | Lifecycle::Releasing(Link::Orphaned(since)) => {
                Some(*since + self.cfg.timeouts.orphan)
            }
            _ => None,
        }
    }

    fn backup_deadline(&self) -> Option<Instant> {
        let b = self.backup.as_ref().filter(|b| b.live && self.is_owned())?;
        Some(b.waiting_since? + self.cfg.timeouts.backup)
    }

    /// Gives up a stalled backup, or ends the session, if its deadline
    /// passed by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = self.last_now.max(now);
        if self.armed.is_some_and(|a| a <= now) {
            self.armed = None;
        }
        if self.settle_deadline().is_some_and(|t| t <= now) {
            // The client did not acknowledge everything in time: the reply
            // carries what it lacks, or the destination fetches it.
            self.settle(now, "session migrated away");
            self.end_tail("the client did not drain it in time");
        }
        if let Some(a) = self.gate.as_mut().and_then(|g| g.asked.as_mut()) {
            if a.until <= now {
                self.gap_failed(
                    now,
                    RejectReason::OriginUnreachable,
                    "no answer from the origin for the down bytes the old connection lost",
                );
            } else if a.again {
                a.again = false;
                self.ask_gap();
            }
        }
        if self.backup_deadline().is_some_and(|t| t <= now) {
            // The backup stalled: continue without crash tolerance (as
            // when it is unreachable) and tell it to drop its stale copy.
            let server = self.backup.as_ref().expect("deadline").server.clone();
            self.backup_lost(&server);
            self.control
                .push_back((server, ControlMessage::Forget { session: self.id }));
        }
        if self.end_deadline().is_none_or(|t| t > now) {
            if let Some(t) = self.poll_timeout() {
                self.deadline(t);
            }
            return;
        }
        if let Lifecycle::Frozen(f) = &self.lifecycle {
            if let Some((to, _)) = f.replied.last().cloned() {
                self.report_out(to, MigrationOutcome::Expired);
            }
        }
        self.forget_backup();
        // An application that saw the session migrate away keeps seeing that.
        let error = if matches!(self.lifecycle, Lifecycle::Live(_)) {
            SessionError::NoServerLeft {
                last: "the client never came back".into(),
            }
        } else {
            SessionError::Migrated
        };
        self.end(
            error,
            ServerEvent::Dropped(self.handle),
            "session dropped",
            EndpointEventKind::Ended {
                finished: false,
                moved: false,
            },
        );
    }

    // ----- what the holder acts on ---------------------------------------------

    /// The next event for the application or the runtime.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// The next message for a peer (replication, StateReply, StateAck,
    /// Forget).
    pub fn poll_control(&mut self) -> Option<(ServerId, ControlMessage)> {
        self.control.pop_front()
    }

    /// The next event for the endpoint; give it to
    /// [`Endpoint::handle_endpoint_event`](super::Endpoint::handle_endpoint_event).
    pub fn poll_endpoint_event(&mut self) -> Option<EndpointEvent> {
        self.to_endpoint.pop_front()
    }

    /// The latest time the session saw in a call.
    pub fn last_now(&self) -> Instant {
        self.last_now
    }

    /// Largest payload of one Data frame this session sends.
    pub fn max_data_frame(&self) -> usize {
        self.cfg.limits.max_data_frame
    }
}
