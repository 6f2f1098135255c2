//! The operator's side of a server's control address: list the sessions a
//! running server owns and push them to a peer (`migratory sessions`,
//! `migratory migrate`). The operator authenticates with a client
//! certificate from the pool CA that names [`OPERATOR_ID`] (mutual TLS),
//! and inside that channel with the cluster key, as a peer does, under the
//! same id. The certificate is what a server checks first; the key keeps
//! a plaintext pool (insecure) working the same way.

use std::net::SocketAddr;
use std::time::Duration;

use migratory_proto::control::{ControlMessage, PushOutcome, Selection, SessionRow};
use migratory_proto::peer::PeerLink;
use migratory_proto::types::{ServerId, SessionId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conn::BoxIo;
use crate::error::Error;
use crate::server::{handshake, OPERATOR_ID};
use crate::tls::{self, OperatorTls};

/// Bound on connecting and authenticating, and on a listing's answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// An authenticated operator connection to one server.
pub struct Operator {
    stream: BoxIo,
    link: PeerLink,
    server: ServerId,
    next_req: u64,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("server", &self.server)
            .finish()
    }
}

impl Operator {
    /// Connects to `server`'s control address over TLS (verifying that
    /// its certificate names `server`, and presenting the operator's) and
    /// authenticates with the cluster key; fails if the server there is
    /// not `server` or does not hold the key.
    pub async fn connect(
        control: SocketAddr,
        tls: &OperatorTls,
        key: &[u8],
        server: &str,
    ) -> Result<Self, Error> {
        let expected = ServerId::new(server)
            .ok_or_else(|| Error::Config(format!("bad server id {server:?}")))?;
        let me = ServerId::new(OPERATOR_ID).expect("a valid id");
        let connect = async {
            let tcp = TcpStream::connect(control)
                .await
                .map_err(|e| Error::Connect {
                    addrs: vec![control],
                    last: e.to_string(),
                })?;
            let mut stream: BoxIo = match tls.config() {
                Some(config) => {
                    let name = tls::server_name(server).map_err(Error::Config)?;
                    Box::new(
                        tls::dial(config, name, tcp)
                            .await
                            .map_err(|e| Error::Control(format!("{server} at {control}: {e}")))?,
                    )
                }
                None => Box::new(tcp),
            };
            let link = handshake(&me, key, &mut stream, Some(expected.clone()))
                .await
                .map_err(|e| {
                    Error::Control(format!("{server} at {control}: authentication: {e}"))
                })?;
            Ok::<_, Error>((stream, link))
        };
        let (stream, link) = tokio::time::timeout(REQUEST_TIMEOUT, connect)
            .await
            .map_err(|_| Error::Connect {
                addrs: vec![control],
                last: "timed out".into(),
            })??;
        Ok(Self {
            stream,
            link,
            server: expected,
            next_req: 1,
        })
    }

    /// The server this operator talks to.
    pub fn server(&self) -> &ServerId {
        &self.server
    }

    /// The sessions the server owns, oldest first.
    pub async fn sessions(&mut self) -> Result<Vec<SessionRow>, Error> {
        let req = self.next();
        match self
            .call(ControlMessage::OperatorList { req }, REQUEST_TIMEOUT)
            .await?
        {
            ControlMessage::OperatorSessions { sessions, .. } => Ok(sessions),
            other => Err(self.unexpected(other)),
        }
    }

    /// Asks the server to push the selected sessions' clients to `dest`
    /// and waits (up to `timeout`) for what became of each.
    pub async fn push(
        &mut self,
        dest: &str,
        select: Selection,
        timeout: Duration,
    ) -> Result<Vec<(SessionId, PushOutcome)>, Error> {
        let dest =
            ServerId::new(dest).ok_or_else(|| Error::Config(format!("bad server id {dest:?}")))?;
        let req = self.next();
        let msg = ControlMessage::OperatorPush {
            req,
            dest,
            select,
            timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
        };
        match self
            .call(msg, timeout.saturating_add(REQUEST_TIMEOUT))
            .await?
        {
            ControlMessage::OperatorPushed { results, .. } => Ok(results),
            other => Err(self.unexpected(other)),
        }
    }

    /// Asks the server to drain ([`ServerHandle::drain`](crate::ServerHandle::drain))
    /// within `deadline`, and waits for the end: (sessions moved, sessions
    /// closed, how long it took).
    pub async fn drain(&mut self, deadline: Duration) -> Result<(u64, u64, Duration), Error> {
        let req = self.next();
        let msg = ControlMessage::OperatorDrain {
            req,
            deadline_ms: deadline.as_millis().try_into().unwrap_or(u64::MAX),
        };
        // The server ends the drain by its deadline, then answers.
        let wait = deadline
            .saturating_add(Duration::from_secs(10))
            .saturating_add(REQUEST_TIMEOUT);
        match self.call(msg, wait).await? {
            ControlMessage::OperatorDrained {
                moved,
                closed,
                millis,
                ..
            } => Ok((moved, closed, Duration::from_millis(millis))),
            other => Err(self.unexpected(other)),
        }
    }

    fn next(&mut self) -> u64 {
        self.next_req += 1;
        self.next_req
    }

    fn unexpected(&self, msg: ControlMessage) -> Error {
        match msg {
            ControlMessage::OperatorError { text, .. } => {
                Error::Control(format!("{} refused: {text}", self.server))
            }
            other => Error::Control(format!(
                "{} answered with an unexpected {}",
                self.server,
                other.name()
            )),
        }
    }

    /// Sends one request and reads until its answer.
    async fn call(&mut self, msg: ControlMessage, wait: Duration) -> Result<ControlMessage, Error> {
        let server = self.server.clone();
        let lost = move |what: String| Error::Control(format!("{server}: {what}"));
        self.link.send(&msg);
        let out = self.link.take_output();
        let round = async {
            self.stream
                .write_all(&out)
                .await
                .map_err(|e| lost(format!("connection lost: {e}")))?;
            self.stream
                .flush()
                .await
                .map_err(|e| lost(format!("connection lost: {e}")))?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                if let Some(reply) = self.link.poll_message() {
                    return Ok(reply);
                }
                let n = self
                    .stream
                    .read(&mut buf)
                    .await
                    .map_err(|e| lost(format!("connection lost: {e}")))?;
                if n == 0 {
                    return Err(lost("the server closed the connection".into()));
                }
                self.link
                    .handle_input(&buf[..n])
                    .map_err(|e| lost(format!("bad answer: {e}")))?;
            }
        };
        let wait_for = self.server.clone();
        tokio::time::timeout(wait, round).await.map_err(|_| {
            Error::Control(format!("{wait_for}: no answer within {} s", wait.as_secs()))
        })?
    }
}
