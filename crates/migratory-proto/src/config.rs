//! Limits and timeouts of the session state machines, with safe defaults.

use std::time::Duration;

use crate::frame::DEFAULT_MAX_FRAME;

/// Buffer and frame limits shared by client and server (docs/architecture.md
/// invariant 4: every buffer is bounded by these).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest frame body accepted on an incarnation.
    pub max_frame: usize,
    /// Largest payload this side puts in one Data frame.
    pub max_data_frame: usize,
    /// Receive window: most bytes of the peer's stream this side holds
    /// unread (server: read log + receive buffer, MTCP fig 3.8).
    pub recv_window: u64,
    /// Most bytes this side keeps in its retransmit buffer.
    pub send_buffer: u64,
    /// How long an acknowledgement may wait for outgoing data to ride on
    /// (as TCP's delayed ACK): one is sent at once only when a quarter of
    /// the window is unacknowledged, the window opened by as much, or a
    /// Close is confirmed.
    pub ack_delay: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
            max_data_frame: 16 * 1024,
            recv_window: 4 * 1024 * 1024,
            send_buffer: 4 * 1024 * 1024,
            ack_delay: Duration::from_millis(5),
        }
    }
}

impl Limits {
    /// A quarter of the receive window: how far the advertised limit must
    /// move before a window update is worth a frame of its own.
    pub(crate) fn window_step(&self) -> u64 {
        (self.recv_window / 4).max(1)
    }
}

/// Timeouts of the server state machine.
#[derive(Debug, Clone)]
pub struct ServerTimeouts {
    /// A new connection must send the preamble and Hello/Migrate within this.
    pub handshake: Duration,
    /// How long a destination waits for the origin's StateReply before it
    /// falls back to a replica or rejects with `OriginUnreachable`.
    pub state_request: Duration,
    /// How long the data in flight on a migrating client's old connection
    /// may take (the client keeps reading it, see docs/migration.md): a
    /// replicated session waits at most this for the client's
    /// acknowledgements before it answers a state request (the reply then
    /// carries what is missing; keep it well below the destinations'
    /// `state_request`); any other session keeps the old connection open
    /// this long after its reply. A destination asks again this often for
    /// bytes a client's old connection lost.
    pub settle: Duration,
    /// How long a frozen session waits for StateAck before it is dropped.
    pub frozen: Duration,
    /// How long a session with no client connection is kept.
    pub orphan: Duration,
    /// How long a session waits for its backup to acknowledge replicated
    /// state before it gives the backup up: a stalled backup must not
    /// stall the sessions it protects (they continue without crash
    /// tolerance, as when the backup is unreachable).
    pub backup: Duration,
}

impl Default for ServerTimeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            state_request: Duration::from_secs(5),
            settle: Duration::from_secs(1),
            frozen: Duration::from_secs(60),
            orphan: Duration::from_secs(300),
            backup: Duration::from_secs(5),
        }
    }
}

/// Timeouts of the client state machine.
#[derive(Debug, Clone)]
pub struct ClientTimeouts {
    /// A server must answer Hello or Migrate within this.
    pub handshake: Duration,
    /// Send a Ping after this long without input. Pings find a server
    /// process that hangs; a dead host or a cut network is found sooner
    /// by the runtime's TCP keepalive, which costs neither process a
    /// wakeup, so the default is long: an idle session costs its server
    /// one Ping a minute (about 50 us of its CPU each).
    pub ping_interval: Duration,
    /// Declare the server failed after this long without input.
    pub idle: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            ping_interval: Duration::from_secs(60),
            idle: Duration::from_secs(120),
        }
    }
}
