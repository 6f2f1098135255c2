//! What a server reports: events for the application and the runtime,
//! migration reports for metrics, session listings for operators.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::control::LoadReport;
use crate::frame::RejectReason;
use crate::types::{Epoch, IncarnationId, MigrationCause, Pos, ServerId, SessionId};

use super::SessionHandle;

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
    /// had failed (docs/architecture.md 3.6).
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

/// What an operator sees of one session ([`Endpoint::session_infos`](super::Endpoint::session_infos)).
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
    /// The connection now carries this session: from here on its input
    /// goes to the session ([`Endpoint::session`](super::Endpoint::session)).
    Attached {
        /// The connection.
        inc: IncarnationId,
        /// The session.
        session: SessionId,
    },
    /// The connection is not a migratory client: serve it as plain TCP. The
    /// bytes already read from it come along; the core forgets it.
    PlainClient {
        /// The connection.
        inc: IncarnationId,
        /// What it sent so far.
        initial: Bytes,
    },
    /// Close this connection once its pending transmits are written, then
    /// report it with [`Session::handle_incarnation_closed`](super::Session::handle_incarnation_closed).
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
        /// Its report.
        load: LoadReport,
    },
    /// The rebalancer sent this many sessions' clients to less loaded
    /// peers (each still has to move).
    Rebalanced {
        /// Sessions sent a Trigger.
        sessions: u64,
    },
    /// The drain is over ([`Endpoint::drain`](super::Endpoint::drain)):
    /// no session is owned here any more.
    Drained(DrainReport),
}

/// How a drain ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainReport {
    /// Sessions that moved to peers.
    pub moved: u64,
    /// Sessions that finished (both sides closed) during the drain.
    pub finished: u64,
    /// Sessions that could not move and were ended with `Reject(Shutdown)`.
    pub closed: u64,
    /// From the start of the drain to its end.
    pub duration: Duration,
}

/// Where a drain stands ([`Endpoint::drain_status`](super::Endpoint::drain_status)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainStatus {
    /// Sessions still held here (owned, or frozen on their way out).
    pub remaining: u64,
    /// Moved so far.
    pub moved: u64,
    /// Finished so far.
    pub finished: u64,
    /// Ended with `Reject(Shutdown)` so far.
    pub closed: u64,
    /// The drain is over.
    pub done: bool,
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
    /// New sessions sent on to a peer at once (this server was full or
    /// draining).
    pub redirected: u64,
    /// Sessions the rebalancer sent to other servers.
    pub rebalanced: u64,
}
