//! How long each step of a migration takes at a server (MTCP thesis,
//! section 5.3.1, fig 5.2), measured by the runtime around the protocol
//! core's calls (the core has no clock).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use migratory_proto::types::{ServerId, SessionId};

/// The steps of one migration at one server (see
/// [`ServerHandle::take_migration_phases`](super::ServerHandle::take_migration_phases)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationPhases {
    /// This server was the destination.
    Destination {
        /// The session.
        session: SessionId,
        /// From the client's proof read to the state request handed to
        /// the origin's link (MTCP's `T_prep_sr`).
        prepare_request: Duration,
        /// From then to the state reply read (`T_wait_sr`).
        wait_reply: Duration,
        /// From then to the session installed, its `Resumed` framed and
        /// its connection's task woken (`T_reinstate_s`).
        reinstate: Duration,
    },
    /// This server was the origin.
    Origin {
        /// The session.
        session: SessionId,
        /// From the state request read to the state reply handed to the
        /// destination's link (`T_prep_s`); for a busy session, this
        /// includes the wait for its client's acknowledgements of the data
        /// in flight (`docs/migration.md`).
        prepare_reply: Duration,
    },
}

/// Most migrations remembered until taken, and most state requests timed
/// at once.
const KEPT: usize = 4096;

/// The timings of the migrations through a server, until taken.
#[derive(Debug, Default)]
pub(super) struct PhaseLog {
    /// Destination: when each outstanding state request left, and how long
    /// preparing it took.
    requested: HashMap<SessionId, (Instant, Duration)>,
    /// Origin: when each state request not yet answered arrived.
    arrived: HashMap<(ServerId, u64), (SessionId, Instant)>,
    done: VecDeque<MigrationPhases>,
}

impl PhaseLog {
    /// A state request for `session` left at `at` after `prepare`.
    pub(super) fn requested(&mut self, session: SessionId, at: Instant, prepare: Duration) {
        if self.requested.len() >= KEPT {
            // Requests whose reply never came: forget them.
            self.requested.clear();
        }
        self.requested.entry(session).or_insert((at, prepare));
    }

    /// The reply for `session` was read at `arrived`; the session was
    /// installed by `installed`.
    pub(super) fn replied(&mut self, session: SessionId, arrived: Instant, installed: Instant) {
        if let Some((sent, prepare_request)) = self.requested.remove(&session) {
            self.push(MigrationPhases::Destination {
                session,
                prepare_request,
                wait_reply: arrived.saturating_duration_since(sent),
                reinstate: installed.saturating_duration_since(arrived),
            });
        }
    }

    /// `peer`'s state request `req` for `session` arrived at `at`.
    pub(super) fn request_arrived(
        &mut self,
        peer: &ServerId,
        req: u64,
        session: SessionId,
        at: Instant,
    ) {
        if self.arrived.len() >= KEPT {
            // Requests refused or never answered: forget them.
            self.arrived.clear();
        }
        self.arrived.insert((peer.clone(), req), (session, at));
    }

    /// The reply to `peer`'s state request `req` left at `at`.
    pub(super) fn answered(&mut self, peer: &ServerId, req: u64, at: Instant) {
        if let Some((session, arrived)) = self.arrived.remove(&(peer.clone(), req)) {
            self.push(MigrationPhases::Origin {
                session,
                prepare_reply: at.saturating_duration_since(arrived),
            });
        }
    }

    pub(super) fn take(&mut self) -> Vec<MigrationPhases> {
        self.done.drain(..).collect()
    }

    fn push(&mut self, p: MigrationPhases) {
        if self.done.len() >= KEPT {
            self.done.pop_front();
        }
        self.done.push_back(p);
    }
}
