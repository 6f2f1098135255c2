//! The authenticated control connection between two servers of a pool
//! (docs/architecture.md 3.3): a mutual challenge-response keyed by the cluster key,
//! then framed [`ControlMessage`]s.
//!
//! Each side sends `PeerHello {id, nonce}`; each answers the other's nonce
//! with `PeerAuth {HMAC(key, prover id, verifier id, verifier nonce, prover
//! nonce)}`. Nothing else is accepted until the peer's proof checks out.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use thiserror::Error;

use crate::control::{ControlMessage, DEFAULT_MAX_CONTROL_FRAME};
use crate::error::DecodeError;
use crate::mac::{peer_mac, verify_peer};
use crate::types::ServerId;

/// Why a control connection was refused or broken.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PeerError {
    /// Malformed input.
    #[error("malformed control message: {0}")]
    Decode(#[from] DecodeError),
    /// The peer's proof is wrong: it does not hold the cluster key.
    #[error("peer {0} failed authentication (wrong cluster key?)")]
    AuthFailed(ServerId),
    /// The peer is not the server we dialled, or claims our own id.
    #[error("unexpected peer {got} (expected {expected})")]
    WrongPeer {
        /// Who it says it is.
        got: ServerId,
        /// Who we expected.
        expected: String,
    },
    /// A message arrived out of order during the handshake.
    #[error("unexpected {0} during the handshake")]
    Unexpected(&'static str),
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    AwaitHello,
    AwaitAuth,
    Authenticated,
}

/// One side of a control connection.
#[derive(Debug)]
pub struct PeerLink {
    me: ServerId,
    key: Vec<u8>,
    nonce: [u8; 32],
    expected: Option<ServerId>,
    peer: Option<(ServerId, [u8; 32])>,
    state: State,
    rx: BytesMut,
    out: BytesMut,
    inbox: VecDeque<ControlMessage>,
    max_frame: usize,
}

/// Largest message accepted before the peer is authenticated (PeerHello
/// and PeerAuth are well under 200 bytes).
const HANDSHAKE_MAX_FRAME: usize = 1024;

impl PeerLink {
    /// Starts a link as `me`. `nonce` must be fresh and random; `expected`
    /// is the peer dialled (None when accepting).
    pub fn new(
        me: ServerId,
        cluster_key: &[u8],
        nonce: [u8; 32],
        expected: Option<ServerId>,
    ) -> Self {
        let mut out = BytesMut::new();
        ControlMessage::PeerHello {
            server: me.clone(),
            nonce,
        }
        .encode(&mut out);
        Self {
            me,
            key: cluster_key.to_vec(),
            nonce,
            expected,
            peer: None,
            state: State::AwaitHello,
            rx: BytesMut::new(),
            out,
            inbox: VecDeque::new(),
            max_frame: DEFAULT_MAX_CONTROL_FRAME,
        }
    }

    /// The authenticated peer, once the handshake is done.
    pub fn peer(&self) -> Option<&ServerId> {
        match self.state {
            State::Authenticated => self.peer.as_ref().map(|(id, _)| id),
            _ => None,
        }
    }

    /// Bytes read from the connection. An error means: close it.
    pub fn handle_input(&mut self, data: &[u8]) -> Result<(), PeerError> {
        self.rx.extend_from_slice(data);
        loop {
            let max = match self.state {
                State::Authenticated => self.max_frame,
                _ => HANDSHAKE_MAX_FRAME,
            };
            let Some(msg) = ControlMessage::decode(&mut self.rx, max)? else {
                break;
            };
            match (&self.state, msg) {
                (State::AwaitHello, ControlMessage::PeerHello { server, nonce }) => {
                    let wrong =
                        server == self.me || self.expected.as_ref().is_some_and(|e| *e != server);
                    if wrong {
                        let expected = self
                            .expected
                            .as_ref()
                            .map_or("another server".into(), |e| e.to_string());
                        return Err(PeerError::WrongPeer {
                            got: server,
                            expected,
                        });
                    }
                    let mac = peer_mac(&self.key, &self.me, &server, &nonce, &self.nonce);
                    ControlMessage::PeerAuth { mac }.encode(&mut self.out);
                    self.peer = Some((server, nonce));
                    self.state = State::AwaitAuth;
                }
                (State::AwaitAuth, ControlMessage::PeerAuth { mac }) => {
                    let (peer, peer_nonce) = self.peer.as_ref().expect("set with AwaitAuth");
                    if !verify_peer(&self.key, peer, &self.me, &self.nonce, peer_nonce, &mac) {
                        return Err(PeerError::AuthFailed(peer.clone()));
                    }
                    self.state = State::Authenticated;
                }
                (
                    State::Authenticated,
                    msg @ (ControlMessage::PeerHello { .. } | ControlMessage::PeerAuth { .. }),
                ) => {
                    return Err(PeerError::Unexpected(msg.name()));
                }
                (State::Authenticated, msg) => self.inbox.push_back(msg),
                (_, msg) => return Err(PeerError::Unexpected(msg.name())),
            }
        }
        Ok(())
    }

    /// The next message from the authenticated peer.
    pub fn poll_message(&mut self) -> Option<ControlMessage> {
        self.inbox.pop_front()
    }

    /// Queues a message for the peer (send only once authenticated).
    pub fn send(&mut self, msg: &ControlMessage) {
        msg.encode(&mut self.out);
    }

    /// Bytes to write to the connection.
    pub fn take_output(&mut self) -> Bytes {
        self.out.split().freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ServerId {
        ServerId::new(s).unwrap()
    }

    fn pump(a: &mut PeerLink, b: &mut PeerLink) -> Result<(), PeerError> {
        for _ in 0..3 {
            let x = a.take_output();
            b.handle_input(&x)?;
            let y = b.take_output();
            a.handle_input(&y)?;
        }
        Ok(())
    }

    #[test]
    fn same_key_authenticates_both_ways_and_carries_messages() {
        let mut a = PeerLink::new(id("s1"), b"k", [1; 32], Some(id("s2")));
        let mut b = PeerLink::new(id("s2"), b"k", [2; 32], None);
        pump(&mut a, &mut b).unwrap();
        assert_eq!(a.peer(), Some(&id("s2")));
        assert_eq!(b.peer(), Some(&id("s1")));
        let load = crate::control::LoadReport {
            sessions: 7,
            capacity: 9,
            bytes_per_sec: 1 << 40,
            draining: true,
        };
        a.send(&ControlMessage::Load(load));
        pump(&mut a, &mut b).unwrap();
        assert_eq!(b.poll_message(), Some(ControlMessage::Load(load)));
    }

    #[test]
    fn wrong_key_is_refused() {
        let mut a = PeerLink::new(id("s1"), b"right", [1; 32], None);
        let mut b = PeerLink::new(id("s2"), b"wrong", [2; 32], None);
        assert!(matches!(
            pump(&mut a, &mut b),
            Err(PeerError::AuthFailed(_))
        ));
    }

    #[test]
    fn reflected_hello_and_wrong_peer_are_refused() {
        let mut a = PeerLink::new(id("s1"), b"k", [1; 32], None);
        let own = a.take_output();
        assert!(matches!(
            a.handle_input(&own),
            Err(PeerError::WrongPeer { .. })
        ));
        let mut a = PeerLink::new(id("s1"), b"k", [1; 32], Some(id("s3")));
        let mut b = PeerLink::new(id("s2"), b"k", [2; 32], None);
        assert!(matches!(
            pump(&mut a, &mut b),
            Err(PeerError::WrongPeer { .. })
        ));
    }

    #[test]
    fn large_frames_before_authentication_are_refused() {
        let mut a = PeerLink::new(id("s1"), b"k", [1; 32], None);
        // A StateReply header announcing 1 MiB, from an unauthenticated peer.
        let header = [0x44, 0, 0x10, 0, 0];
        assert!(matches!(
            a.handle_input(&header),
            Err(PeerError::Decode(DecodeError::TooLarge { .. }))
        ));
    }

    #[test]
    fn messages_before_authentication_are_refused() {
        let mut a = PeerLink::new(id("s1"), b"k", [1; 32], None);
        let mut b = BytesMut::new();
        ControlMessage::Forget {
            session: crate::types::SessionId(1),
        }
        .encode(&mut b);
        assert_eq!(a.handle_input(&b), Err(PeerError::Unexpected("Forget")));
    }
}
