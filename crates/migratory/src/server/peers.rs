//! Control connections between the servers of a pool (docs/architecture.md 3.3):
//! authentication, one link per pair of peers, and operators.
//!
//! Every link is bounded. Messages for a peer (replication, state
//! requests and replies) queue on its link up to [`MAX_LINK_QUEUE`]
//! bytes; a peer that lets more pile up unsent — a stalled or slow backup
//! — is dropped: the link is closed and the endpoint learns the peer is
//! down, so the sessions it backs up continue without crash tolerance
//! (acknowledgements stop waiting for it) and migrations through it fall
//! back. The link is dialled again by the next message, and a backup
//! that is back receives each session's whole state anew.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use migratory_proto::control::ControlMessage;
use migratory_proto::peer::PeerLink;
use migratory_proto::types::ServerId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::driver::{ConnLimits, ConnPermit};
use super::{ServerHandle, Shared, State, OPERATOR_ID, PEERS_UP};
use crate::conn::{self, Input, LinkOut, Wire};
use crate::throttle::warn_throttled;
use crate::tls;

/// Bound on connecting to a peer and authenticating it.
const PEER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most bytes queued for one peer, unsent: past this the peer is stalled
/// and its link is dropped.
pub const MAX_LINK_QUEUE: usize = 16 * 1024 * 1024;

/// Our connection to a peer: one per pair, opened by whichever side needs
/// it first and then used both ways.
#[derive(Debug)]
pub(crate) enum Link {
    /// Connected: its sending side, and a number that tells connections
    /// apart.
    Up { out: Arc<LinkOut>, id: u64 },
    /// Being dialled; messages wait here.
    Dialing { queue: Vec<Bytes>, bytes: usize },
}

impl Link {
    /// Closes the connection at once, dropping what is queued.
    pub(crate) fn close(self) {
        if let Link::Up { out, .. } = self {
            out.close(false);
        }
    }

    /// Sends `last`, then closes the connection (after what is queued).
    pub(crate) fn close_after(self, last: Bytes) {
        if let Link::Up { out, .. } = self {
            let _ = out.send(last, usize::MAX);
            out.close(true);
        }
    }
}

static LINK_IDS: AtomicU64 = AtomicU64::new(1);

fn next_link_id() -> u64 {
    LINK_IDS.fetch_add(1, Ordering::Relaxed)
}

impl Shared {
    /// Publishes how many peers have a control connection up.
    pub(crate) fn count_peers(&self, links: &HashMap<ServerId, Link>) {
        let up = links
            .values()
            .filter(|l| matches!(l, Link::Up { .. }))
            .count();
        metrics::gauge!(PEERS_UP, "server" => self.me.to_string()).set(up as f64);
    }

    /// Queues `msg` for `peer`, dialling it if needed. Returns the peer
    /// if its link stalled and was dropped: the caller tells the endpoint
    /// it is down.
    pub(crate) fn send_link(
        self: &Arc<Self>,
        links: &mut HashMap<ServerId, Link>,
        peer: ServerId,
        msg: Bytes,
    ) -> Option<ServerId> {
        let len = msg.len();
        match links.get_mut(&peer) {
            Some(Link::Up { out, .. }) => {
                if out.send(msg, MAX_LINK_QUEUE).is_err() {
                    warn!(server = %self.me, %peer, "peer stalled: dropping its link");
                    if let Some(link) = links.remove(&peer) {
                        link.close();
                    }
                    self.count_peers(links);
                    return Some(peer);
                }
            }
            Some(Link::Dialing { queue, bytes }) => {
                if *bytes + len > MAX_LINK_QUEUE {
                    warn!(server = %self.me, %peer, "peer unreachable: dropping its queue");
                    links.remove(&peer);
                    return Some(peer);
                }
                *bytes += len;
                queue.push(msg);
            }
            None => {
                links.insert(
                    peer.clone(),
                    Link::Dialing {
                        queue: vec![msg],
                        bytes: len,
                    },
                );
                tokio::spawn(dial(self.clone(), peer));
            }
        }
        None
    }

    /// Sends a message to a peer from under the server's lock.
    pub(crate) fn send_peer(self: &Arc<Self>, st: &mut State, peer: ServerId, msg: Bytes) {
        let stalled = self.send_link(&mut self.links(), peer, msg);
        if let Some(peer) = stalled {
            st.core.handle_peer_down(Instant::now(), &peer);
        }
    }

    /// Sends a message to a peer from outside the server's lock.
    pub(crate) fn send_control(self: &Arc<Self>, peer: ServerId, msg: &ControlMessage) {
        let mut b = bytes::BytesMut::new();
        msg.encode(&mut b);
        let stalled = self.send_link(&mut self.links(), peer, b.freeze());
        if let Some(peer) = stalled {
            let mut st = self.lock();
            st.core.handle_peer_down(Instant::now(), &peer);
            self.pump(&mut st);
        }
    }
}

/// Most control connections being authenticated at once, in all and from
/// one address (peers and operators are few; each handshake is bounded by
/// [`PEER_HANDSHAKE_TIMEOUT`]).
const CONTROL_HANDSHAKES: (usize, usize) = (256, 32);

pub(super) async fn accept_peers(shared: Arc<Shared>, listener: TcpListener) {
    let handshakes = ConnLimits::new(CONTROL_HANDSHAKES.0, CONTROL_HANDSHAKES.1);
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => match handshakes.admit(addr.ip()) {
                Ok(permit) => {
                    tokio::spawn(serve_peer(shared.clone(), stream, addr, permit));
                }
                Err(limit) => {
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    warn_throttled!(server = %shared.me, %addr, limit, "control connection refused: too many handshakes");
                }
            },
            Err(e) => {
                warn_throttled!(server = %shared.me, error = %e, "control accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs the authentication handshake on a control connection; returns the
/// authenticated link.
pub(crate) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    me: &ServerId,
    key: &[u8],
    stream: &mut S,
    expected: Option<ServerId>,
) -> Result<PeerLink, String> {
    let nonce: [u8; 32] = rand::random();
    let mut link = PeerLink::new(me.clone(), key, nonce, expected);
    let mut buf = vec![0u8; 4096];
    let run = async {
        loop {
            let out = link.take_output();
            if !out.is_empty() {
                stream.write_all(&out).await.map_err(|e| e.to_string())?;
                stream.flush().await.map_err(|e| e.to_string())?;
            }
            if link.peer().is_some() {
                return Ok::<(), String>(());
            }
            let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed during the handshake".into());
            }
            link.handle_input(&buf[..n]).map_err(|e| e.to_string())?;
        }
    };
    tokio::time::timeout(PEER_HANDSHAKE_TIMEOUT, run)
        .await
        .map_err(|_| "handshake timed out".to_string())??;
    Ok(link)
}

fn link_reader(
    shared: Arc<Shared>,
    mut link: PeerLink,
    peer: ServerId,
) -> impl FnMut(&mut bytes::BytesMut) -> bool + Send + 'static {
    let deliver = move |shared: &Arc<Shared>, link: &mut PeerLink| {
        let mut st = shared.lock();
        while let Some(msg) = link.poll_message() {
            // A state request or reply is timed (MTCP fig 5.2) up to what
            // it made the server send.
            let timed = match &msg {
                ControlMessage::StateRequest { req, migrate } => {
                    Some((Some(*req), migrate.request.session))
                }
                ControlMessage::StateReply { image, .. } => Some((None, image.session)),
                _ => None,
            };
            let t0 = Instant::now();
            if let Some((Some(req), session)) = timed {
                st.phases.request_arrived(&peer, req, session, t0);
            }
            st.core.handle_control(t0, &peer, msg);
            if let Some((req, session)) = timed {
                shared.pump(&mut st);
                let t1 = Instant::now();
                match req {
                    // Answered at once (a busy session answers later, from
                    // its driver).
                    Some(req) if st.core.answered(&peer, req) => st.phases.answered(&peer, req, t1),
                    Some(_) => {}
                    None => st.phases.replied(session, t0, t1),
                }
            }
        }
        shared.pump(&mut st);
    };
    // Messages that came in the same read as the end of the handshake.
    deliver(&shared, &mut link);
    move |buf| {
        let ok = link.handle_input(buf);
        buf.clear();
        // What decoded before a bad frame still counts.
        deliver(&shared, &mut link);
        if let Err(e) = ok {
            warn_throttled!(server = %shared.me, error = %e, "bad control input: closing the link");
            return false;
        }
        true
    }
}

/// Accepts one control connection: TLS with a client certificate from the
/// pool CA (unless the pool runs plaintext), then the cluster key's
/// handshake, whose claimed id the certificate must name.
async fn serve_peer(shared: Arc<Shared>, tcp: TcpStream, addr: SocketAddr, permit: ConnPermit) {
    let _ = tcp.set_nodelay(true);
    let accepted = async {
        let Some(tls) = &shared.tls else {
            let mut tcp = tcp;
            let link = handshake(&shared.me, &shared.key, &mut tcp, None).await?;
            return Ok((Wire::plain(tcp), link));
        };
        let mut s = tokio_rustls::TlsAcceptor::from(tls.control.clone())
            .accept(tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let link = handshake(&shared.me, &shared.key, &mut s, None).await?;
        let peer = link.peer().expect("authenticated");
        if !tls::names(s.get_ref().1.peer_certificates(), peer.as_str()) {
            return Err(format!(
                "authenticated as {peer:?} with a certificate that does not name it"
            ));
        }
        let (tcp, conn) = s.into_inner();
        Ok((Wire::tls(tcp, rustls::Connection::Server(conn)), link))
    };
    let (wire, link) = match tokio::time::timeout(PEER_HANDSHAKE_TIMEOUT, accepted).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            warn_throttled!(server = %shared.me, %addr, error = %e, "control connection refused");
            return;
        }
        Err(_) => {
            warn_throttled!(server = %shared.me, %addr, "control connection refused: handshake timed out");
            return;
        }
    };
    // Authenticated: no longer counted against the handshake limits.
    drop(permit);
    let peer = link.peer().expect("authenticated").clone();
    if peer.as_str() == OPERATOR_ID {
        info!(server = %shared.me, %addr, "operator connected");
        return serve_operator(ServerHandle { shared }, wire, link).await;
    }
    if !shared.controls.contains_key(&peer) {
        warn_throttled!(server = %shared.me, %addr, %peer, "control connection from a server not in the pool");
        return;
    }
    debug!(server = %shared.me, %peer, "peer connected in");
    start_link(shared, wire, link, peer);
}

/// Runs an authenticated connection to `peer`: it becomes the link unless
/// one is up already (then it is only read until it ends).
fn start_link(shared: Arc<Shared>, wire: Wire, link: PeerLink, peer: ServerId) {
    let out = LinkOut::new(Arc::new(wire));
    let id = register_link(&shared, &peer, &out);
    let reader = link_reader(shared.clone(), link, peer.clone());
    let closed = link_closed(shared, peer, id);
    conn::start_link(out, reader, closed);
}

/// Makes a new authenticated connection the link to `peer`, unless one is
/// up already (then it is only read: both sides dialled at once). Queued
/// messages go out on it.
fn register_link(shared: &Arc<Shared>, peer: &ServerId, out: &Arc<LinkOut>) -> u64 {
    let id = next_link_id();
    let mut st = shared.lock();
    let mut links = shared.links();
    let waiting = match links.remove(peer) {
        Some(up @ Link::Up { .. }) => {
            links.insert(peer.clone(), up);
            return 0;
        }
        Some(Link::Dialing { queue, .. }) => queue,
        None => Vec::new(),
    };
    // Already bounded while the link was dialled.
    for msg in waiting {
        let _ = out.send(msg, usize::MAX);
    }
    links.insert(
        peer.clone(),
        Link::Up {
            out: out.clone(),
            id,
        },
    );
    shared.count_peers(&links);
    drop(links);
    st.core.handle_peer_up(Instant::now(), peer);
    shared.pump(&mut st);
    id
}

/// What to do when a control connection ends: if it was the link, the core
/// learns the peer is down (pending requests fall back, replication stops
/// gating acks) and the next message dials again.
fn link_closed(
    shared: Arc<Shared>,
    peer: ServerId,
    id: u64,
) -> impl FnOnce(String) + Send + 'static {
    move |reason| {
        let mut st = shared.lock();
        let mut links = shared.links();
        let was_link = matches!(links.get(&peer), Some(Link::Up { id: i, .. }) if *i == id);
        if was_link {
            // A peer that said it was draining, or our own stop, is an
            // orderly shutdown; anything else may be a failure.
            let left = st
                .core
                .peer_loads()
                .any(|(id, l, _)| id == &peer && l.draining);
            if left || *shared.stop.borrow() {
                info!(server = %shared.me, %peer, "control connection closed: orderly shutdown");
            } else {
                warn!(server = %shared.me, %peer, %reason, "control connection lost");
            }
            if let Some(link) = links.remove(&peer) {
                link.close();
            }
            shared.count_peers(&links);
            drop(links);
            st.core.handle_peer_down(Instant::now(), &peer);
            shared.pump(&mut st);
        } else {
            debug!(server = %shared.me, %peer, %reason, "extra control connection closed");
        }
    }
}

/// Opens our control connection to `peer` and flushes what was queued; on
/// failure the core learns the peer is down (requests fall back).
async fn dial(shared: Arc<Shared>, peer: ServerId) {
    let addr = shared.controls[&peer];
    let result = tokio::time::timeout(PEER_HANDSHAKE_TIMEOUT, async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &shared.tls else {
            let mut tcp = tcp;
            let link = handshake(&shared.me, &shared.key, &mut tcp, Some(peer.clone())).await?;
            return Ok((Wire::plain(tcp), link));
        };
        let mut s = tls::dial(&tls.dial, tls::server_name(peer.as_str())?, tcp).await?;
        let link = handshake(&shared.me, &shared.key, &mut s, Some(peer.clone())).await?;
        let (tcp, conn) = s.into_inner();
        Ok::<_, String>((Wire::tls(tcp, rustls::Connection::Client(conn)), link))
    })
    .await
    .unwrap_or_else(|_| Err("connect timed out".into()));
    match result {
        Ok((wire, link)) => {
            debug!(server = %shared.me, %peer, "peer connected out");
            start_link(shared, wire, link, peer);
        }
        Err(e) => {
            let mut st = shared.lock();
            if st.core.peer_left(&peer) {
                debug!(server = %shared.me, %peer, %addr, error = %e, "peer unreachable (it drained and left)");
            } else {
                warn_throttled!(server = %shared.me, %peer, %addr, error = %e, "peer unreachable");
            }
            let dialing = matches!(shared.links().get(&peer), Some(Link::Dialing { .. }));
            if dialing {
                shared.links().remove(&peer);
                st.core.handle_peer_down(Instant::now(), &peer);
                shared.pump(&mut st);
            }
        }
    }
}

/// Answers an operator's requests, one at a time, until it disconnects.
async fn serve_operator(handle: ServerHandle, wire: Wire, mut link: PeerLink) {
    let mut stopped = handle.shared.stop.subscribe();
    tokio::select! {
        _ = operator_requests(&handle, &wire, &mut link) => {}
        _ = stopped.wait_for(|s| *s) => {}
    }
}

async fn operator_requests(handle: &ServerHandle, wire: &Wire, link: &mut PeerLink) {
    let mut input = Input::default();
    loop {
        while let Some(msg) = link.poll_message() {
            let reply = handle.operator_request(msg).await;
            link.send(&reply);
            let mut out = std::collections::VecDeque::from([link.take_output()]);
            if wire.write_all(&mut out).await.is_err() {
                return;
            }
        }
        match wire.read(&mut input).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let ok = link.handle_input(&input.buf);
        input.buf.clear();
        if let Err(e) = ok {
            warn_throttled!(server = %handle.shared.me, error = %e, "bad operator input: closing");
            return;
        }
    }
}
