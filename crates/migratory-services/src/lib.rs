//! The built-in services of `migratory serve` — a static HTTP/1.1 file
//! server, an echo server and MIGSOCK's count server — and the demo's
//! bulk-transfer service ([`transfer`]).
//!
//! Every service follows MTCP's contract (docs/architecture.md 3.4): it snapshots its
//! per-connection state with [`migratory::Session::snapshot`] at points
//! where that state, together with the up stream from the first byte not yet
//! read and the down stream from the first byte not yet written, lets a
//! fresh process continue exactly as this one would. A server that resumes
//! the session gets [`migratory::Arrival::Migrated`] with the last snapshot
//! and carries on from it. For a plain TCP client snapshots are no-ops and
//! the same code serves it.
//!
//! When the server drains ([`Options::draining`]), plain TCP clients are let
//! go at their next clean point; migratory sessions are left alone (the
//! server moves them).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod counter;
mod echo;
mod http;
pub mod stream;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod transfer;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use migratory::proto::types::SessionId;
use migratory::{Arrival, Session};
use tokio::sync::watch;
use tracing::debug;

/// Which built-in service a server runs (with the `clap` feature, a
/// `clap::ValueEnum`: `http`, `echo`, `counter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Kind {
    /// HTTP/1.1 static files (GET, HEAD, keep-alive, single byte ranges).
    Http,
    /// Writes back every byte it reads.
    Echo,
    /// MIGSOCK's count server: "1\n2\n3\n..." until the client closes.
    Counter,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Http => "http",
            Kind::Echo => "echo",
            Kind::Counter => "counter",
        })
    }
}

/// Options of the built-in services. [`Options::default`] has the
/// defaults of `migratory serve` and never drains.
#[derive(Debug, Clone)]
pub struct Options {
    /// http: the directory served.
    pub root: PathBuf,
    /// counter: the pause between two numbers (zero: as fast as the
    /// session takes them).
    pub counter_interval: Duration,
    /// http: how long a request head may take to arrive, from the
    /// connection's start or its first byte (then 408 and close).
    pub header_timeout: Duration,
    /// http: how long a kept-alive connection may sit between requests.
    pub idle_timeout: Duration,
    /// Becomes `true` once the server drains. Plain TCP clients are then
    /// let go: http answers the request in progress (with `Connection:
    /// close` if its head is not written yet) and closes after it, and
    /// closes an idle kept-alive connection at once, reading no new
    /// request; echo and counter close at once (counter after finishing
    /// its line), with a FIN after what they wrote. Migratory sessions are
    /// not affected. A receiver whose sender is gone while it is `false`
    /// ([`Options::never_draining`]) never drains.
    pub draining: watch::Receiver<bool>,
}

impl Options {
    /// A drain signal that never becomes `true`, for servers that do not
    /// drain.
    pub fn never_draining() -> watch::Receiver<bool> {
        watch::channel(false).1
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            root: PathBuf::from("."),
            counter_interval: Duration::from_secs(1),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            draining: Self::never_draining(),
        }
    }
}

/// A session's id for logs: the id, or `plain` for a plain TCP client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLabel(pub Option<SessionId>);

impl fmt::Display for SessionLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(id) => fmt::Display::fmt(id, f),
            None => f.write_str("plain"),
        }
    }
}

/// Serves one session (new, migrated, or plain TCP) until it ends or moves
/// away. Returns `Ok(())` also when the session migrated away
/// ([`migratory::is_migrated`]): that is not an error.
pub async fn serve(
    kind: Kind,
    mut session: Session,
    arrival: Arrival,
    opts: Arc<Options>,
) -> io::Result<()> {
    let label = SessionLabel(session.id());
    let how = match &arrival {
        Arrival::New => "new".to_string(),
        Arrival::Migrated { state } => format!("migrated with a {}-byte state", state.len()),
        Arrival::Plain => "plain TCP".to_string(),
    };
    debug!(service = %kind, session = %label, arrival = %how, "serving a session");
    let drain = Drain::new(&arrival, &opts);
    // Each service's future is boxed: the session's task then holds the
    // state of the service it runs, not that of the largest one (HTTP's).
    let result = match kind {
        Kind::Http => Box::pin(http::serve(&mut session, arrival, &opts, drain)).await,
        Kind::Echo => Box::pin(echo::serve(&mut session, arrival, drain)).await,
        Kind::Counter => {
            Box::pin(counter::serve(
                &mut session,
                arrival,
                opts.counter_interval,
                drain,
            ))
            .await
        }
    };
    match result {
        Err(e) if migratory::is_migrated(&e) => {
            debug!(service = %kind, session = %label, "session migrated away");
            Ok(())
        }
        r => r,
    }
}

/// The server's drain signal as one session's service sees it: only a
/// plain TCP client watches it.
#[derive(Debug)]
struct Drain(Option<watch::Receiver<bool>>);

impl Drain {
    fn new(arrival: &Arrival, opts: &Options) -> Self {
        Self(matches!(arrival, Arrival::Plain).then(|| opts.draining.clone()))
    }

    /// Whether the server drains (and this session is to let go).
    fn now(&self) -> bool {
        self.0.as_ref().is_some_and(|rx| *rx.borrow())
    }

    /// Resolves once [`Drain::now`] is true; never for a migratory session,
    /// nor once the sender is gone without draining.
    async fn wait(&mut self) {
        if let Some(rx) = &mut self.0 {
            if rx.wait_for(|d| *d).await.is_ok() {
                return;
            }
        }
        std::future::pending().await
    }
}

/// Records `state` as the session's restart point.
fn snapshot(session: &Session, state: &[u8]) -> io::Result<()> {
    session.snapshot(state).map_err(io::Error::from)
}

/// An `InvalidData` error (bad snapshot state).
fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "clap")]
    #[test]
    fn kinds_parse_from_the_command_line() {
        use clap::ValueEnum;
        assert_eq!(Kind::from_str("http", false), Ok(Kind::Http));
        assert_eq!(Kind::from_str("echo", false), Ok(Kind::Echo));
        assert_eq!(Kind::from_str("counter", false), Ok(Kind::Counter));
        assert!(Kind::from_str("ftp", false).is_err());
        for k in Kind::value_variants() {
            assert_eq!(Kind::from_str(&k.to_string(), false), Ok(*k));
        }
    }

    #[test]
    fn labels_and_names_are_display_forms() {
        assert_eq!(SessionLabel(None).to_string(), "plain");
        assert_eq!(
            SessionLabel(Some(SessionId(0xab))).to_string(),
            format!("{:032x}", 0xab)
        );
        assert_eq!(Kind::Http.to_string(), "http");
        assert_eq!(Kind::Echo.to_string(), "echo");
        assert_eq!(Kind::Counter.to_string(), "counter");
    }

    #[tokio::test]
    async fn drain_is_seen_by_plain_clients_only() {
        let (tx, rx) = watch::channel(false);
        let opts = Options {
            draining: rx,
            ..Options::default()
        };
        let mut plain = Drain::new(&Arrival::Plain, &opts);
        let migratory = Drain::new(&Arrival::New, &opts);
        assert!(!plain.now() && !migratory.now());
        tx.send_replace(true);
        plain.wait().await;
        assert!(plain.now() && !migratory.now());
        // A sender gone before draining: never drains.
        let mut never = Drain::new(&Arrival::Plain, &Options::default());
        assert!(!never.now());
        let waited = tokio::time::timeout(Duration::ZERO, never.wait()).await;
        assert!(waited.is_err());
    }
}
