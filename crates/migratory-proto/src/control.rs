//! Messages between the servers of a pool on their control connection
//! (docs/architecture.md 3.3, MTCP 4.2.3 "Control Connection and State Transfer
//! Details"): peer authentication, lazy state transfer, eager replication
//! and triggers. Same framing as [`crate::frame`], separate type space.
//!
//! An operator (`migratory sessions`, `migratory migrate`) speaks on the
//! same connection after the same authentication with the cluster key, under
//! an id that is not a server of the pool; its requests are the `Operator*`
//! messages, answered by the runtime (they never reach the core).

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::frame::{Migrate, RejectReason};
use std::net::SocketAddr;

use crate::types::{Epoch, Pos, Secret, ServerId, SessionId};
use crate::wire::{put_frame, split_frame, PutExt, Reader, MAX_TEXT_LEN};

/// Default largest control message body (64 MiB): it must hold a whole
/// session image (buffers plus application state).
pub const DEFAULT_MAX_CONTROL_FRAME: usize = 64 * 1024 * 1024;

/// Everything a server knows about a session that another server needs to
/// resume it, independent of the client's position (the body of MTCP's
/// state reply, and of a full replica).
///
/// Up stream: `up_data` holds `[up_snap, up_snap + up_data.len())`, the read
/// log plus the receive buffer (MTCP figs 3.8, 4.10). Down stream:
/// `down_data` holds `[down_base, down_base + down_data.len())`, the
/// unacknowledged writes from before the snapshot (fig 3.9); the application
/// resumes writing at `down_snap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionImage {
    /// The session.
    pub session: SessionId,
    /// Its secret.
    pub secret: Secret,
    /// The epoch the state was taken at.
    pub epoch: Epoch,
    /// `rcv_snap`: where the application resumes reading.
    pub up_snap: Pos,
    /// Up bytes from `up_snap` to `rcv_nxt`.
    pub up_data: Bytes,
    /// Position of the client's Close, if received.
    pub up_fin: Option<Pos>,
    /// `snd_snap`: where the application resumes writing.
    pub down_snap: Pos,
    /// First down position held in `down_data`.
    pub down_base: Pos,
    /// Unacknowledged down bytes up to (at least) `down_snap`.
    pub down_data: Bytes,
    /// The application had closed its write side at this position before
    /// the snapshot (the close is part of the restart point).
    pub down_fin: Option<Pos>,
    /// The application's last exported snapshot.
    pub app_state: Bytes,
}

impl SessionImage {
    /// End of the up bytes held (`rcv_nxt`).
    pub fn up_end(&self) -> Pos {
        self.up_snap + self.up_data.len() as u64
    }

    /// End of the down bytes held.
    pub fn down_end(&self) -> Pos {
        self.down_base + self.down_data.len() as u64
    }

    pub(crate) fn put(&self, b: &mut BytesMut) {
        b.put_session(self.session);
        b.put_slice(&self.secret.0);
        b.put_u64(self.epoch);
        b.put_u64(self.up_snap);
        b.put_bytes_u32(&self.up_data);
        b.put_opt_pos(self.up_fin);
        b.put_u64(self.down_snap);
        b.put_u64(self.down_base);
        b.put_bytes_u32(&self.down_data);
        b.put_opt_pos(self.down_fin);
        b.put_bytes_u32(&self.app_state);
    }

    pub(crate) fn read(r: &mut Reader) -> Result<Self, DecodeError> {
        let image = Self {
            session: r.session()?,
            secret: r.secret()?,
            epoch: r.u64()?,
            up_snap: r.u64()?,
            up_data: r.bytes("up_data", usize::MAX)?,
            up_fin: r.opt_pos("up_fin")?,
            down_snap: r.u64()?,
            down_base: r.u64()?,
            down_data: r.bytes("down_data", usize::MAX)?,
            down_fin: r.opt_pos("down_fin")?,
            app_state: r.bytes("app_state", usize::MAX)?,
        };
        let up_end = image.up_snap.checked_add(image.up_data.len() as u64);
        let down_end = image.down_base.checked_add(image.down_data.len() as u64);
        let (Some(up_end), Some(down_end)) = (up_end, down_end) else {
            return Err(r.invalid("positions", "stream position overflows"));
        };
        if image.up_fin.is_some_and(|f| f < up_end) {
            return Err(r.invalid("up_fin", "Close before the end of the received data"));
        }
        // The image must hold every unacknowledged byte written before the
        // snapshot (MTCP fig 3.9).
        if image.down_base <= image.down_snap && down_end < image.down_snap {
            return Err(r.invalid("down_data", "does not reach the snapshot position"));
        }
        if image.down_fin.is_some_and(|f| f != image.down_snap) {
            return Err(r.invalid(
                "down_fin",
                "a Close in the snapshot must sit at its position",
            ));
        }
        Ok(image)
    }
}

/// One step of eager replication from a session's owner to its backup
/// (docs/architecture.md 3.6), in stream order on the control connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaUpdate {
    /// The whole state: opens the replica, or re-synchronises it after the
    /// link was lost.
    Full {
        /// The state.
        image: SessionImage,
    },
    /// Up bytes received from the client, appended at `pos`.
    Up {
        /// Position of the first byte.
        pos: Pos,
        /// The bytes.
        data: Bytes,
    },
    /// The client's Close arrived at `pos`.
    UpFin {
        /// Position of the Close.
        pos: Pos,
    },
    /// The application took a snapshot; down bytes written before it that
    /// the replica does not hold yet come along.
    Snapshot {
        /// `rcv_snap`.
        up_snap: Pos,
        /// `snd_snap`.
        down_snap: Pos,
        /// Close in the snapshot, if any.
        down_fin: Option<Pos>,
        /// The application state.
        app_state: Bytes,
        /// Position of the first byte of `down_data`.
        down_pos: Pos,
        /// Down bytes `[down_pos, down_snap)`.
        down_data: Bytes,
    },
    /// The client acknowledged down bytes below `down`: the replica trims.
    Acked {
        /// The client's cumulative ack.
        down: Pos,
    },
    /// The owner's epoch moved (a client reattached) or it handed out epochs
    /// below `next` to destinations (it froze the session for a
    /// migration): the replica answers Migrates at `epoch`, and a failover
    /// from it takes `next` or later, so no two servers serve one epoch.
    Epoch {
        /// The session's current epoch at the owner.
        epoch: Epoch,
        /// The lowest epoch not yet handed out.
        next: Epoch,
    },
}

/// Which sessions an operator's push moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// This one.
    Session(SessionId),
    /// Up to this many (the oldest first).
    Count(u32),
    /// Every session the server owns.
    All,
}

/// One session as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    /// The session.
    pub session: SessionId,
    /// Its epoch.
    pub epoch: Epoch,
    /// The client's address on its current connection (none while the
    /// client is away).
    pub client: Option<SocketAddr>,
    /// Milliseconds since the session started or arrived here.
    pub age_ms: u64,
    /// Up bytes received, in all.
    pub up: Pos,
    /// Down bytes written, in all.
    pub down: Pos,
}

/// What became of one session an operator pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// The destination confirmed the session after this many milliseconds.
    Moved {
        /// Where it went (the destination asked for, or one the client
        /// chose if that one failed).
        to: ServerId,
        /// From the Trigger to the destination's confirmation.
        millis: u64,
    },
    /// The server does not own the session.
    NotFound,
    /// The session's client is not connected now (it is between
    /// connections): no Trigger could be sent.
    NotConnected,
    /// The client did not complete a migration within the timeout; the
    /// session stays here.
    TimedOut,
    /// The session ended (finished or dropped) before it moved.
    Ended,
}

/// What a server tells its peers of its load ([`ControlMessage::Load`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadReport {
    /// Sessions it owns.
    pub sessions: u32,
    /// Sessions it takes before it sends new ones to peers
    /// (`ServerConfig::max_sessions`).
    pub capacity: u32,
    /// Bytes per second its sessions moved (both directions), over the
    /// last report period.
    pub bytes_per_sec: u64,
    /// It is draining: it takes no session and gives away all it has.
    pub draining: bool,
}

/// A message on a control connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// First message each way: who I am and a fresh challenge.
    PeerHello {
        /// The sender's server id.
        server: ServerId,
        /// Random challenge the other side must MAC.
        nonce: [u8; 32],
    },
    /// Answer to the other side's challenge, keyed by the cluster key.
    PeerAuth {
        /// HMAC-SHA256 over both ids and both nonces.
        mac: [u8; 32],
    },
    /// S2 -> S1: the client migrated to me; give me the session's state.
    StateRequest {
        /// Request id, chosen by the requester.
        req: u64,
        /// The client's Migrate, forwarded for the owner to verify.
        migrate: Migrate,
    },
    /// S1 -> S2: the state, trimmed to what the client needs.
    StateReply {
        /// The request answered.
        req: u64,
        /// The epoch the destination must take.
        new_epoch: Epoch,
        /// The state.
        image: SessionImage,
    },
    /// S1 -> S2: no state for you.
    StateReject {
        /// The request answered.
        req: u64,
        /// Why.
        reason: RejectReason,
        /// Detail.
        text: String,
    },
    /// S2 -> S1: the state is installed; forget the session.
    StateAck {
        /// The request answered.
        req: u64,
    },
    /// S2 -> S1: the client's old connection ended before it delivered
    /// the down bytes `[start, end)` that S1 sent there before its reply
    /// (`end` is where that reply resumed the stream); send them.
    GapRequest {
        /// The state request S1 answered.
        req: u64,
        /// The session.
        session: SessionId,
        /// First byte the client lacks.
        start: Pos,
        /// The resume point of S1's reply.
        end: Pos,
    },
    /// S1 -> S2: the bytes of a [`ControlMessage::GapRequest`], or `None`
    /// when S1 no longer holds them.
    GapReply {
        /// The session.
        session: SessionId,
        /// Position of the first byte.
        start: Pos,
        /// The bytes `[start, end)`.
        data: Option<Bytes>,
    },
    /// Owner -> backup: one replication step.
    Replicate {
        /// The session.
        session: SessionId,
        /// The step.
        update: ReplicaUpdate,
    },
    /// Backup -> owner: I hold every up byte below `up`, at `epoch`.
    ReplicateAck {
        /// The session.
        session: SessionId,
        /// The replica's up end.
        up: Pos,
        /// The epoch the replica answers at.
        epoch: Epoch,
    },
    /// Backup -> owner: my replica is missing or out of step; send it whole.
    ReplicateResync {
        /// The session.
        session: SessionId,
    },
    /// Owner -> backup: drop the replica (the session ended or moved).
    Forget {
        /// The session.
        session: SessionId,
    },
    /// A server's load, sent to every connected peer periodically and at
    /// once when it starts draining (load balancing, drain).
    Load(LoadReport),
    /// Anyone -> owner: send the session's client a Trigger to `dest`
    /// (destination pull, or a third party).
    TriggerRequest {
        /// The session.
        session: SessionId,
        /// Where the client should go.
        dest: ServerId,
    },
    /// Operator -> server: list the sessions you own.
    OperatorList {
        /// Request id, chosen by the operator.
        req: u64,
    },
    /// Server -> operator: the sessions it owns.
    OperatorSessions {
        /// The request answered.
        req: u64,
        /// One row per session.
        sessions: Vec<SessionRow>,
    },
    /// Operator -> server: push these sessions' clients to `dest` (server
    /// push, MTCP 3.2.1 case a) and report once each moved or `timeout_ms`
    /// passed.
    OperatorPush {
        /// Request id, chosen by the operator.
        req: u64,
        /// The peer the clients should go to.
        dest: ServerId,
        /// Which sessions.
        select: Selection,
        /// How long to wait for the migrations.
        timeout_ms: u64,
    },
    /// Server -> operator: what became of each session pushed.
    OperatorPushed {
        /// The request answered.
        req: u64,
        /// One entry per session selected.
        results: Vec<(SessionId, PushOutcome)>,
    },
    /// Operator -> server: drain (stop admitting sessions, move every
    /// session to live peers, close what cannot move by the deadline).
    OperatorDrain {
        /// Request id, echoed in the answer.
        req: u64,
        /// How long the drain may take, in milliseconds.
        deadline_ms: u64,
    },
    /// Server -> operator: the drain is over.
    OperatorDrained {
        /// The request answered.
        req: u64,
        /// Sessions moved to peers.
        moved: u64,
        /// Sessions that could not move and were closed.
        closed: u64,
        /// How long the drain took, in milliseconds.
        millis: u64,
    },
    /// Server -> operator: the request cannot be served.
    OperatorError {
        /// The request answered.
        req: u64,
        /// Why.
        text: String,
    },
}

const PEER_HELLO: u8 = 0x41;
const PEER_AUTH: u8 = 0x42;
const STATE_REQUEST: u8 = 0x43;
const STATE_REPLY: u8 = 0x44;
const STATE_REJECT: u8 = 0x45;
const STATE_ACK: u8 = 0x46;
const REPLICATE: u8 = 0x47;
const REPLICATE_ACK: u8 = 0x48;
const REPLICATE_RESYNC: u8 = 0x49;
const FORGET: u8 = 0x4a;
const LOAD: u8 = 0x4b;
const TRIGGER_REQUEST: u8 = 0x4c;
const OPERATOR_LIST: u8 = 0x4d;
const OPERATOR_SESSIONS: u8 = 0x4e;
const OPERATOR_PUSH: u8 = 0x4f;
const OPERATOR_PUSHED: u8 = 0x50;
const OPERATOR_ERROR: u8 = 0x51;
const OPERATOR_DRAIN: u8 = 0x52;
const OPERATOR_DRAINED: u8 = 0x53;
const GAP_REQUEST: u8 = 0x54;
const GAP_REPLY: u8 = 0x55;

const SEL_SESSION: u8 = 1;
const SEL_COUNT: u8 = 2;
const SEL_ALL: u8 = 3;

const OUT_MOVED: u8 = 1;
const OUT_NOT_FOUND: u8 = 2;
const OUT_NOT_CONNECTED: u8 = 3;
const OUT_TIMED_OUT: u8 = 4;
const OUT_ENDED: u8 = 5;

const UPD_FULL: u8 = 1;
const UPD_UP: u8 = 2;
const UPD_UP_FIN: u8 = 3;
const UPD_SNAPSHOT: u8 = 4;
const UPD_ACKED: u8 = 5;
const UPD_EPOCH: u8 = 6;

impl ControlMessage {
    /// Short name of the message kind, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::PeerHello { .. } => "PeerHello",
            Self::PeerAuth { .. } => "PeerAuth",
            Self::StateRequest { .. } => "StateRequest",
            Self::StateReply { .. } => "StateReply",
            Self::StateReject { .. } => "StateReject",
            Self::StateAck { .. } => "StateAck",
            Self::GapRequest { .. } => "GapRequest",
            Self::GapReply { .. } => "GapReply",
            Self::Replicate { .. } => "Replicate",
            Self::ReplicateAck { .. } => "ReplicateAck",
            Self::ReplicateResync { .. } => "ReplicateResync",
            Self::Forget { .. } => "Forget",
            Self::Load { .. } => "Load",
            Self::TriggerRequest { .. } => "TriggerRequest",
            Self::OperatorList { .. } => "OperatorList",
            Self::OperatorSessions { .. } => "OperatorSessions",
            Self::OperatorPush { .. } => "OperatorPush",
            Self::OperatorPushed { .. } => "OperatorPushed",
            Self::OperatorError { .. } => "OperatorError",
            Self::OperatorDrain { .. } => "OperatorDrain",
            Self::OperatorDrained { .. } => "OperatorDrained",
        }
    }

    /// Whether this is an operator's request or its answer (handled by the
    /// runtime, never by the core).
    pub fn is_operator(&self) -> bool {
        matches!(
            self,
            Self::OperatorList { .. }
                | Self::OperatorSessions { .. }
                | Self::OperatorPush { .. }
                | Self::OperatorPushed { .. }
                | Self::OperatorError { .. }
                | Self::OperatorDrain { .. }
                | Self::OperatorDrained { .. }
        )
    }

    /// Appends the encoded message to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            Self::PeerHello { server, nonce } => put_frame(dst, PEER_HELLO, |b| {
                b.put_server_id(server);
                b.put_slice(nonce);
            }),
            Self::PeerAuth { mac } => put_frame(dst, PEER_AUTH, |b| b.put_slice(mac)),
            Self::StateRequest { req, migrate } => put_frame(dst, STATE_REQUEST, |b| {
                b.put_u64(*req);
                migrate.put(b);
            }),
            Self::StateReply {
                req,
                new_epoch,
                image,
            } => put_frame(dst, STATE_REPLY, |b| {
                b.put_u64(*req);
                b.put_u64(*new_epoch);
                image.put(b);
            }),
            Self::StateReject { req, reason, text } => put_frame(dst, STATE_REJECT, |b| {
                b.put_u64(*req);
                reason.put(b);
                b.put_text(text);
            }),
            Self::StateAck { req } => put_frame(dst, STATE_ACK, |b| b.put_u64(*req)),
            Self::GapRequest {
                req,
                session,
                start,
                end,
            } => put_frame(dst, GAP_REQUEST, |b| {
                b.put_u64(*req);
                b.put_session(*session);
                b.put_u64(*start);
                b.put_u64(*end);
            }),
            Self::GapReply {
                session,
                start,
                data,
            } => put_frame(dst, GAP_REPLY, |b| {
                b.put_session(*session);
                b.put_u64(*start);
                b.put_bool(data.is_some());
                if let Some(d) = data {
                    b.put_bytes_u32(d);
                }
            }),
            Self::Replicate { session, update } => put_frame(dst, REPLICATE, |b| {
                b.put_session(*session);
                match update {
                    ReplicaUpdate::Full { image } => {
                        b.put_u8(UPD_FULL);
                        image.put(b);
                    }
                    ReplicaUpdate::Up { pos, data } => {
                        b.put_u8(UPD_UP);
                        b.put_u64(*pos);
                        b.put_bytes_u32(data);
                    }
                    ReplicaUpdate::UpFin { pos } => {
                        b.put_u8(UPD_UP_FIN);
                        b.put_u64(*pos);
                    }
                    ReplicaUpdate::Snapshot {
                        up_snap,
                        down_snap,
                        down_fin,
                        app_state,
                        down_pos,
                        down_data,
                    } => {
                        b.put_u8(UPD_SNAPSHOT);
                        b.put_u64(*up_snap);
                        b.put_u64(*down_snap);
                        b.put_opt_pos(*down_fin);
                        b.put_bytes_u32(app_state);
                        b.put_u64(*down_pos);
                        b.put_bytes_u32(down_data);
                    }
                    ReplicaUpdate::Acked { down } => {
                        b.put_u8(UPD_ACKED);
                        b.put_u64(*down);
                    }
                    ReplicaUpdate::Epoch { epoch, next } => {
                        b.put_u8(UPD_EPOCH);
                        b.put_u64(*epoch);
                        b.put_u64(*next);
                    }
                }
            }),
            Self::ReplicateAck { session, up, epoch } => put_frame(dst, REPLICATE_ACK, |b| {
                b.put_session(*session);
                b.put_u64(*up);
                b.put_u64(*epoch);
            }),
            Self::ReplicateResync { session } => {
                put_frame(dst, REPLICATE_RESYNC, |b| b.put_session(*session))
            }
            Self::Forget { session } => put_frame(dst, FORGET, |b| b.put_session(*session)),
            Self::Load(l) => put_frame(dst, LOAD, |b| {
                b.put_u32(l.sessions);
                b.put_u32(l.capacity);
                b.put_u64(l.bytes_per_sec);
                b.put_bool(l.draining);
            }),
            Self::TriggerRequest { session, dest } => put_frame(dst, TRIGGER_REQUEST, |b| {
                b.put_session(*session);
                b.put_server_id(dest);
            }),
            Self::OperatorList { req } => put_frame(dst, OPERATOR_LIST, |b| b.put_u64(*req)),
            Self::OperatorSessions { req, sessions } => put_frame(dst, OPERATOR_SESSIONS, |b| {
                b.put_u64(*req);
                b.put_u32(u32::try_from(sessions.len()).unwrap_or(u32::MAX));
                for row in sessions.iter().take(u32::MAX as usize) {
                    b.put_session(row.session);
                    b.put_u64(row.epoch);
                    match &row.client {
                        Some(a) => {
                            b.put_bool(true);
                            b.put_addr(a);
                        }
                        None => b.put_bool(false),
                    }
                    b.put_u64(row.age_ms);
                    b.put_u64(row.up);
                    b.put_u64(row.down);
                }
            }),
            Self::OperatorPush {
                req,
                dest,
                select,
                timeout_ms,
            } => put_frame(dst, OPERATOR_PUSH, |b| {
                b.put_u64(*req);
                b.put_server_id(dest);
                match select {
                    Selection::Session(s) => {
                        b.put_u8(SEL_SESSION);
                        b.put_session(*s);
                    }
                    Selection::Count(n) => {
                        b.put_u8(SEL_COUNT);
                        b.put_u32(*n);
                    }
                    Selection::All => b.put_u8(SEL_ALL),
                }
                b.put_u64(*timeout_ms);
            }),
            Self::OperatorPushed { req, results } => put_frame(dst, OPERATOR_PUSHED, |b| {
                b.put_u64(*req);
                b.put_u32(u32::try_from(results.len()).unwrap_or(u32::MAX));
                for (session, outcome) in results.iter().take(u32::MAX as usize) {
                    b.put_session(*session);
                    match outcome {
                        PushOutcome::Moved { to, millis } => {
                            b.put_u8(OUT_MOVED);
                            b.put_server_id(to);
                            b.put_u64(*millis);
                        }
                        PushOutcome::NotFound => b.put_u8(OUT_NOT_FOUND),
                        PushOutcome::NotConnected => b.put_u8(OUT_NOT_CONNECTED),
                        PushOutcome::TimedOut => b.put_u8(OUT_TIMED_OUT),
                        PushOutcome::Ended => b.put_u8(OUT_ENDED),
                    }
                }
            }),
            Self::OperatorError { req, text } => put_frame(dst, OPERATOR_ERROR, |b| {
                b.put_u64(*req);
                b.put_text(text);
            }),
            Self::OperatorDrain { req, deadline_ms } => put_frame(dst, OPERATOR_DRAIN, |b| {
                b.put_u64(*req);
                b.put_u64(*deadline_ms);
            }),
            Self::OperatorDrained {
                req,
                moved,
                closed,
                millis,
            } => put_frame(dst, OPERATOR_DRAINED, |b| {
                b.put_u64(*req);
                b.put_u64(*moved);
                b.put_u64(*closed);
                b.put_u64(*millis);
            }),
        }
    }

    /// Decodes one message from the front of `src`: `Ok(None)` when only
    /// part of a message is there (nothing consumed), an error for a message
    /// larger than `max_frame` or malformed in any way.
    pub fn decode(
        src: &mut BytesMut,
        max_frame: usize,
    ) -> Result<Option<ControlMessage>, DecodeError> {
        let known = |t| (PEER_HELLO..=GAP_REPLY).contains(&t);
        let Some((ty, body)) = split_frame(src, max_frame, known)? else {
            return Ok(None);
        };
        let name = match ty {
            PEER_HELLO => "PeerHello",
            PEER_AUTH => "PeerAuth",
            STATE_REQUEST => "StateRequest",
            STATE_REPLY => "StateReply",
            STATE_REJECT => "StateReject",
            STATE_ACK => "StateAck",
            REPLICATE => "Replicate",
            REPLICATE_ACK => "ReplicateAck",
            REPLICATE_RESYNC => "ReplicateResync",
            FORGET => "Forget",
            LOAD => "Load",
            TRIGGER_REQUEST => "TriggerRequest",
            OPERATOR_LIST => "OperatorList",
            OPERATOR_SESSIONS => "OperatorSessions",
            OPERATOR_PUSH => "OperatorPush",
            OPERATOR_PUSHED => "OperatorPushed",
            OPERATOR_DRAIN => "OperatorDrain",
            OPERATOR_DRAINED => "OperatorDrained",
            GAP_REQUEST => "GapRequest",
            GAP_REPLY => "GapReply",
            _ => "OperatorError",
        };
        let mut r = Reader::new(body, name);
        let msg = match ty {
            PEER_HELLO => Self::PeerHello {
                server: r.server_id("server")?,
                nonce: r.array()?,
            },
            PEER_AUTH => Self::PeerAuth { mac: r.array()? },
            STATE_REQUEST => Self::StateRequest {
                req: r.u64()?,
                migrate: Migrate::read(&mut r)?,
            },
            STATE_REPLY => Self::StateReply {
                req: r.u64()?,
                new_epoch: r.u64()?,
                image: SessionImage::read(&mut r)?,
            },
            STATE_REJECT => Self::StateReject {
                req: r.u64()?,
                reason: RejectReason::read(&mut r)?,
                text: r.text("text", MAX_TEXT_LEN)?,
            },
            STATE_ACK => Self::StateAck { req: r.u64()? },
            GAP_REQUEST => Self::GapRequest {
                req: r.u64()?,
                session: r.session()?,
                start: r.u64()?,
                end: r.u64()?,
            },
            GAP_REPLY => Self::GapReply {
                session: r.session()?,
                start: r.u64()?,
                data: match r.bool("held")? {
                    true => Some(r.bytes("data", usize::MAX)?),
                    false => None,
                },
            },
            REPLICATE => {
                let session = r.session()?;
                let update = match r.u8()? {
                    UPD_FULL => ReplicaUpdate::Full {
                        image: SessionImage::read(&mut r)?,
                    },
                    UPD_UP => ReplicaUpdate::Up {
                        pos: r.u64()?,
                        data: r.bytes("data", usize::MAX)?,
                    },
                    UPD_UP_FIN => ReplicaUpdate::UpFin { pos: r.u64()? },
                    UPD_SNAPSHOT => ReplicaUpdate::Snapshot {
                        up_snap: r.u64()?,
                        down_snap: r.u64()?,
                        down_fin: r.opt_pos("down_fin")?,
                        app_state: r.bytes("app_state", usize::MAX)?,
                        down_pos: r.u64()?,
                        down_data: r.bytes("down_data", usize::MAX)?,
                    },
                    UPD_ACKED => ReplicaUpdate::Acked { down: r.u64()? },
                    UPD_EPOCH => ReplicaUpdate::Epoch {
                        epoch: r.u64()?,
                        next: r.u64()?,
                    },
                    _ => return Err(r.invalid("update", "unknown replication step")),
                };
                Self::Replicate { session, update }
            }
            REPLICATE_ACK => Self::ReplicateAck {
                session: r.session()?,
                up: r.u64()?,
                epoch: r.u64()?,
            },
            REPLICATE_RESYNC => Self::ReplicateResync {
                session: r.session()?,
            },
            FORGET => Self::Forget {
                session: r.session()?,
            },
            LOAD => Self::Load(LoadReport {
                sessions: r.u32()?,
                capacity: r.u32()?,
                bytes_per_sec: r.u64()?,
                draining: r.bool("draining")?,
            }),
            OPERATOR_DRAIN => Self::OperatorDrain {
                req: r.u64()?,
                deadline_ms: r.u64()?,
            },
            OPERATOR_DRAINED => Self::OperatorDrained {
                req: r.u64()?,
                moved: r.u64()?,
                closed: r.u64()?,
                millis: r.u64()?,
            },
            TRIGGER_REQUEST => Self::TriggerRequest {
                session: r.session()?,
                dest: r.server_id("dest")?,
            },
            OPERATOR_LIST => Self::OperatorList { req: r.u64()? },
            OPERATOR_SESSIONS => {
                let req = r.u64()?;
                let n = r.u32()?;
                // No preallocation: a lying count fails at the body's end.
                let mut sessions = Vec::new();
                for _ in 0..n {
                    sessions.push(SessionRow {
                        session: r.session()?,
                        epoch: r.u64()?,
                        client: if r.bool("client")? {
                            Some(r.addr()?)
                        } else {
                            None
                        },
                        age_ms: r.u64()?,
                        up: r.u64()?,
                        down: r.u64()?,
                    });
                }
                Self::OperatorSessions { req, sessions }
            }
            OPERATOR_PUSH => Self::OperatorPush {
                req: r.u64()?,
                dest: r.server_id("dest")?,
                select: match r.u8()? {
                    SEL_SESSION => Selection::Session(r.session()?),
                    SEL_COUNT => Selection::Count(r.u32()?),
                    SEL_ALL => Selection::All,
                    _ => return Err(r.invalid("select", "unknown selection")),
                },
                timeout_ms: r.u64()?,
            },
            OPERATOR_PUSHED => {
                let req = r.u64()?;
                let n = r.u32()?;
                let mut results = Vec::new();
                for _ in 0..n {
                    let session = r.session()?;
                    let outcome = match r.u8()? {
                        OUT_MOVED => PushOutcome::Moved {
                            to: r.server_id("to")?,
                            millis: r.u64()?,
                        },
                        OUT_NOT_FOUND => PushOutcome::NotFound,
                        OUT_NOT_CONNECTED => PushOutcome::NotConnected,
                        OUT_TIMED_OUT => PushOutcome::TimedOut,
                        OUT_ENDED => PushOutcome::Ended,
                        _ => return Err(r.invalid("outcome", "unknown push outcome")),
                    };
                    results.push((session, outcome));
                }
                Self::OperatorPushed { req, results }
            }
            _ => Self::OperatorError {
                req: r.u64()?,
                text: r.text("text", MAX_TEXT_LEN)?,
            },
        };
        r.finish()?;
        Ok(Some(msg))
    }
}
