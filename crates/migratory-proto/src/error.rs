//! Errors of the protocol core, one enum per kind of operation.

use thiserror::Error;

use crate::frame::RejectReason;
use crate::types::ServerId;

/// Malformed input on the wire. Every decoder returns one of these for bad
/// input; none panics (docs/architecture.md invariant 5).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The connection did not start with the migratory preamble: it is a
    /// plain TCP client.
    #[error("not a migratory client (preamble mismatch)")]
    NotMigratory,
    /// The peer speaks a protocol version this build does not.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u16),
    /// The frame type byte is not one this codec knows.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// The frame announces a body larger than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Announced body length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The body ends before all of the frame's fields.
    #[error("{frame} frame truncated")]
    Truncated {
        /// Frame kind.
        frame: &'static str,
    },
    /// The body is longer than the frame's fields.
    #[error("{frame} frame has {extra} trailing bytes")]
    TrailingBytes {
        /// Frame kind.
        frame: &'static str,
        /// Bytes left over.
        extra: usize,
    },
    /// A field holds a value outside its domain.
    #[error("{frame} frame: field {field}: {what}")]
    Invalid {
        /// Frame kind.
        frame: &'static str,
        /// Field name.
        field: &'static str,
        /// What is wrong with it.
        what: &'static str,
    },
}

/// A peer broke the protocol on an incarnation or a control link. The
/// connection it came on must be closed; session data is never corrupted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    /// The bytes did not decode.
    #[error("malformed input: {0}")]
    Decode(#[from] DecodeError),
    /// A well-formed frame arrived where the protocol does not allow it.
    #[error("unexpected {frame} frame: {why}")]
    Unexpected {
        /// Frame kind.
        frame: &'static str,
        /// Why it is not allowed here.
        why: &'static str,
    },
    /// A position or window rule was broken (ack beyond data sent, data
    /// beyond the advertised limit, a resume point outside the buffers).
    #[error("stream position violation: {0}")]
    Position(&'static str),
}

/// Why a session ended for the application (client or server side).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    /// The session's server end moved to another server; this endpoint no
    /// longer serves it (MTCP's `EMIGRATED`). Stop serving the session.
    #[error("session migrated away")]
    Migrated,
    /// A server refused to resume the session.
    #[error("server {server} rejected the session: {reason}: {text}")]
    Rejected {
        /// The refusing server.
        server: ServerId,
        /// Its reason.
        reason: RejectReason,
        /// Its explanation.
        text: String,
    },
    /// Every known server was tried and none could resume the session: the
    /// state is lost (fail closed, docs/architecture.md invariant 2).
    #[error("no server could resume the session (last failure: {last})")]
    NoServerLeft {
        /// The last failure seen.
        last: String,
    },
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    /// The session was closed and both directions are finished.
    #[error("session closed")]
    Closed,
    /// The server's connection failed before the session was established.
    #[error("connection failed before the session was established: {0}")]
    Unestablished(String),
}

impl SessionError {
    /// True when the error only means "this endpoint no longer owns the
    /// session" (MTCP's `EMIGRATED`).
    pub fn is_migrated(&self) -> bool {
        matches!(self, SessionError::Migrated)
    }
}

/// An application call on a session that cannot be done now.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AppError {
    /// The session has migrated away or ended: see the error.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// Writing after `close_write()`.
    #[error("write after close")]
    WriteAfterClose,
    /// The snapshot exceeds the configured maximum state size.
    #[error("snapshot state of {len} bytes exceeds the maximum of {max}")]
    StateTooLarge {
        /// Offered size.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// No such session on this server.
    #[error("unknown session")]
    UnknownSession,
}
