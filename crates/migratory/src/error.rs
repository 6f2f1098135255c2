//! The runtime's error type.

use std::io;
use std::net::SocketAddr;

use migratory_proto::error::{AppError, SessionError};
use thiserror::Error;

/// Everything that can go wrong in the runtime. Session-level failures
/// reach `AsyncRead`/`AsyncWrite` callers as an [`io::Error`] wrapping this
/// type; [`Error::from_io`] gets it back.
#[derive(Debug, Error)]
pub enum Error {
    /// The configuration is wrong; the text names the field at fault.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A listening address could not be bound (in use, not local, ...).
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// No initial server could be reached.
    #[error("cannot connect to any of {addrs:?}: {last}")]
    Connect {
        /// The addresses tried.
        addrs: Vec<SocketAddr>,
        /// The last error.
        last: String,
    },
    /// A control connection (an operator's, to a server) failed or was
    /// refused; the text says which server and why.
    #[error("control connection: {0}")]
    Control(String),
    /// The session failed or moved away (see the inner error).
    #[error(transparent)]
    Session(#[from] SessionError),
    /// An application call was refused.
    #[error(transparent)]
    App(#[from] AppError),
    /// The runtime that owned the session is gone.
    #[error("the runtime stopped")]
    Stopped,
    /// A migration was asked for to a server the session knows no address
    /// of (servers announce their pool's addresses to their clients).
    #[error("unknown server {server}: this session knows {}", if known.is_empty() { "none yet".to_string() } else { known.join(", ") })]
    UnknownServer {
        /// The server asked for.
        server: String,
        /// The servers the session knows, sorted.
        known: Vec<String>,
    },
}

impl Error {
    /// The runtime error inside an `io::Error` from a session's read/write.
    pub fn from_io(e: &io::Error) -> Option<&Error> {
        e.get_ref()?.downcast_ref::<Error>()
    }

    /// Whether this is MTCP's `EMIGRATED`: the session moved to another
    /// server and this endpoint must stop serving it.
    pub fn is_migrated(&self) -> bool {
        match self {
            Error::Session(e) => e.is_migrated(),
            Error::App(AppError::Session(e)) => e.is_migrated(),
            _ => false,
        }
    }
}

/// Whether an `io::Error` from a session means "the session migrated away".
pub fn is_migrated(e: &io::Error) -> bool {
    Error::from_io(e).is_some_and(Error::is_migrated)
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        let kind = match &e {
            Error::Session(SessionError::Closed)
            | Error::App(AppError::Session(SessionError::Closed))
            | Error::App(AppError::WriteAfterClose) => io::ErrorKind::BrokenPipe,
            Error::Session(_) | Error::App(_) => io::ErrorKind::ConnectionAborted,
            Error::Stopped => io::ErrorKind::NotConnected,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}
