//! Names of the protocol (docs/architecture.md 3.1): sessions, servers, epochs,
//! incarnations and the alternates a client may migrate to.

use std::fmt;
use std::net::SocketAddr;

/// Length in bytes of a session secret.
pub const SECRET_LEN: usize = 32;

/// Longest server id, in bytes.
pub const MAX_SERVER_ID_LEN: usize = 64;

/// Random 128-bit identifier of a session; lives across every incarnation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u128);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// The 256-bit secret shared by the client and the servers holding a
/// session's state; keys the MAC of `Migrate`. Its `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub [u8; SECRET_LEN]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Name of a server of the pool, e.g. `"s1"`: 1 to 64 bytes of UTF-8.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId(String);

impl ServerId {
    /// A server id, or `None` when `name` is empty or longer than
    /// [`MAX_SERVER_ID_LEN`] bytes.
    pub fn new(name: impl Into<String>) -> Option<Self> {
        let name = name.into();
        (!name.is_empty() && name.len() <= MAX_SERVER_ID_LEN).then_some(Self(name))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerId({:?})", self.0)
    }
}

/// Counter of successful migrations of a session; a new incarnation bumps it.
pub type Epoch = u64;

/// A position in the up or down byte stream of a session (starts at 0 and
/// never restarts across incarnations).
pub type Pos = u64;

/// Why a client migrates. The client says it in its `Migrate` request, so
/// both servers can count migrations by cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigrationCause {
    /// The client's application or policy asked (`migrate()`).
    Requested,
    /// A server sent a Trigger (server push, destination pull, operator).
    Trigger,
    /// The current server failed (EOF or reset without Close, or silence).
    ServerFailed,
    /// A previous attempt failed; trying the next server.
    Retry,
}

impl MigrationCause {
    /// Lower-case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Trigger => "trigger",
            Self::ServerFailed => "server_failed",
            Self::Retry => "retry",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            Self::Requested => 0,
            Self::Trigger => 1,
            Self::ServerFailed => 2,
            Self::Retry => 3,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Requested,
            1 => Self::Trigger,
            2 => Self::ServerFailed,
            3 => Self::Retry,
            _ => return None,
        })
    }
}

impl fmt::Display for MigrationCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A server the client may migrate to: its id and where it listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alternate {
    /// The server's id.
    pub id: ServerId,
    /// Its service addresses, in order of preference.
    pub addrs: Vec<SocketAddr>,
}

/// Local handle of one TCP connection (an incarnation, or a connection that
/// has not yet said which session it carries). Chosen by the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IncarnationId(pub u64);

impl fmt::Display for IncarnationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "inc#{}", self.0)
    }
}
