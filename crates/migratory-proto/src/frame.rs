//! Frames on an incarnation between a client and a server (docs/architecture.md 3.2).
//!
//! An incarnation starts with [`PREAMBLE`] from the client, so a server can
//! tell a migratory client from a plain TCP client on the same port. Then
//! both sides exchange length-prefixed frames: `type: u8, len: u32 (big
//! endian), body`, at most the configured maximum frame size.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::types::{Alternate, Epoch, MigrationCause, Pos, ServerId, SessionId};
use crate::wire::{put_frame, put_header, split_frame, PutExt, Reader, MAX_TEXT_LEN};

/// Protocol version carried in the preamble.
pub const VERSION: u16 = 4;

/// What a migratory client sends first: magic `MIGR\r\n` and the version.
pub const PREAMBLE: [u8; 8] = [b'M', b'I', b'G', b'R', b'\r', b'\n', 0, VERSION as u8];

/// Default largest frame body accepted on an incarnation (256 KiB).
pub const DEFAULT_MAX_FRAME: usize = 256 * 1024;

/// Largest frame a connection may send before it is admitted (a Hello, or
/// a Migrate and its Proof): a client that has proved nothing yet cannot
/// make a server buffer more than this.
pub const MAX_ADMISSION_FRAME: usize = 4 * 1024;

/// Outcome of looking at the first bytes of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreambleCheck {
    /// The whole preamble is there: a migratory client of our version.
    Migratory,
    /// The bytes so far match; wait for more (bounded by the caller).
    NeedMore,
}

/// Checks the start of a connection against [`PREAMBLE`].
///
/// Returns [`DecodeError::NotMigratory`] as soon as a byte differs from the
/// magic (a plain TCP client) and [`DecodeError::UnsupportedVersion`] for a
/// migratory client of another version.
pub fn check_preamble(start: &[u8]) -> Result<PreambleCheck, DecodeError> {
    let n = start.len().min(6);
    if start[..n] != PREAMBLE[..n] {
        return Err(DecodeError::NotMigratory);
    }
    if start.len() < PREAMBLE.len() {
        return Ok(PreambleCheck::NeedMore);
    }
    match u16::from_be_bytes([start[6], start[7]]) {
        VERSION => Ok(PreambleCheck::Migratory),
        v => Err(DecodeError::UnsupportedVersion(v)),
    }
}

/// Why a server refused to start or resume a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// No server knows the session (MTCP's `CB_NOT_FOUND`).
    NotFound,
    /// The session exists but cannot migrate now: not established, or both
    /// directions closed and acknowledged (MTCP's `INVALID_STATE`).
    InvalidState,
    /// The Migrate's proof or epoch is wrong (forged, stale or replayed).
    AuthFailed,
    /// The server is out of capacity.
    Busy,
    /// The server that holds the state could not be reached and no replica
    /// exists.
    OriginUnreachable,
    /// The server requires TLS and the client spoke plaintext.
    TlsRequired,
    /// The server is shutting down and no peer could take the session:
    /// sent to refuse a new session, and on an established connection to
    /// end its session (the client fails at once instead of trying other
    /// servers).
    Shutdown,
}

impl RejectReason {
    /// Short snake-case name, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::InvalidState => "invalid_state",
            Self::AuthFailed => "auth_failed",
            Self::Busy => "busy",
            Self::OriginUnreachable => "origin_unreachable",
            Self::TlsRequired => "tls_required",
            Self::Shutdown => "shutdown",
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::NotFound => 1,
            Self::InvalidState => 2,
            Self::AuthFailed => 3,
            Self::Busy => 4,
            Self::OriginUnreachable => 5,
            Self::TlsRequired => 6,
            Self::Shutdown => 7,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::NotFound,
            2 => Self::InvalidState,
            3 => Self::AuthFailed,
            4 => Self::Busy,
            5 => Self::OriginUnreachable,
            6 => Self::TlsRequired,
            7 => Self::Shutdown,
            _ => return None,
        })
    }

    pub(crate) fn put(self, dst: &mut BytesMut) {
        dst.put_u8(self.code());
    }

    pub(crate) fn read(r: &mut Reader) -> Result<Self, DecodeError> {
        let code = r.u8()?;
        Self::from_code(code).ok_or_else(|| r.invalid("reason", "unknown reject reason"))
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotFound => "session not found",
            Self::InvalidState => "session not in a migratable state",
            Self::AuthFailed => "authentication failed",
            Self::Busy => "server busy",
            Self::OriginUnreachable => "origin server unreachable",
            Self::TlsRequired => "the server requires TLS; this client spoke plaintext",
            Self::Shutdown => "the server shut down and no other server could take the session",
        })
    }
}

/// What a client asks for in a `Migrate` frame: resume this session here.
/// It is not trusted until the client proves, with [`Frame::Proof`], that it
/// holds the session secret and answers this server's fresh challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateRequest {
    /// The session to resume.
    pub session: SessionId,
    /// The server the client was last attached to (the owner it knows).
    pub origin: ServerId,
    /// The session's epoch as the client knows it.
    pub epoch: Epoch,
    /// The client's attempt counter: it grows with every Migrate, so the
    /// owner can refuse an older request still in flight after a newer one
    /// was served.
    pub attempt: u64,
    /// Why the client migrates (the cause of the round, for a retry).
    pub cause: MigrationCause,
    /// The client's down-stream position `c`: every byte below it was
    /// received (MTCP's `rcv_nxt` in `TCP_MIGRATED_CONN`).
    pub down: Pos,
    /// The client has received the server's Close.
    pub down_fin: bool,
    /// The client keeps its previous incarnation and reads what arrives
    /// there, acknowledging it, so that the data in flight reaches the
    /// client on the connection it is already on instead of travelling in
    /// the state (MTCP thesis, section 4.2.3, step 5; docs/migration.md).
    /// The destination then resumes the down stream at or beyond `down`;
    /// beyond what the client holds, the client catches up on that
    /// incarnation before the destination's bytes follow.
    pub draining: bool,
    /// How many down bytes beyond `down` the client can buffer.
    pub window: u64,
}

impl MigrateRequest {
    pub(crate) fn put(&self, dst: &mut BytesMut) {
        dst.put_session(self.session);
        dst.put_server_id(&self.origin);
        dst.put_u64(self.epoch);
        dst.put_u64(self.attempt);
        dst.put_u8(self.cause.code());
        dst.put_u64(self.down);
        dst.put_bool(self.down_fin);
        dst.put_bool(self.draining);
        dst.put_u64(self.window);
    }

    pub(crate) fn read(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            session: r.session()?,
            origin: r.server_id("origin")?,
            epoch: r.u64()?,
            attempt: r.u64()?,
            cause: MigrationCause::from_code(r.u8()?)
                .ok_or_else(|| r.invalid("cause", "unknown migration cause"))?,
            down: r.u64()?,
            down_fin: r.bool("down_fin")?,
            draining: r.bool("draining")?,
            window: r.u64()?,
        })
    }
}

/// An authenticated migration request: the client's request, the
/// destination's challenge and the client's MAC over both (keyed by the
/// session secret). The destination forwards it to the origin inside a
/// `StateRequest`; the origin, which knows the secret, verifies it. A
/// captured `Migrate` is useless: every destination picks a fresh nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrate {
    /// The request.
    pub request: MigrateRequest,
    /// The destination's random challenge.
    pub nonce: [u8; 32],
    /// HMAC-SHA256 over the request and the nonce.
    pub mac: [u8; 32],
}

impl Migrate {
    pub(crate) fn put(&self, dst: &mut BytesMut) {
        self.request.put(dst);
        dst.put_slice(&self.nonce);
        dst.put_slice(&self.mac);
    }

    pub(crate) fn read(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            request: MigrateRequest::read(r)?,
            nonce: r.array()?,
            mac: r.array()?,
        })
    }
}

/// One frame on an incarnation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// C->S: start a new session.
    Hello {
        /// How many down bytes the client can buffer.
        window: u64,
    },
    /// S->C: the new session's identity and where else it may go.
    Welcome {
        /// The session id.
        session: SessionId,
        /// The session secret (keys Migrate MACs).
        secret: crate::types::Secret,
        /// The session epoch.
        epoch: Epoch,
        /// The answering server.
        server: ServerId,
        /// Other servers of the pool, preferred first.
        alternates: Vec<Alternate>,
        /// How many up bytes the server can buffer (limit = window).
        window: u64,
        /// The server keeps a replica of the session at a backup (crash
        /// tolerance). A state request for it then waits until the client
        /// acknowledged the down bytes in flight on its old connection, so
        /// a migrating client reads that connection during the handshake;
        /// without a replica it need not until the session resumed.
        replicated: bool,
    },
    /// C->S2: resume a session here (answered with a Challenge).
    Migrate(MigrateRequest),
    /// S2->C: prove you hold the session secret, for this nonce.
    Challenge {
        /// Fresh random nonce.
        nonce: [u8; 32],
    },
    /// C->S2: HMAC over the Migrate request and the challenge nonce.
    Proof {
        /// The MAC.
        mac: [u8; 32],
    },
    /// S2->C: the session resumed.
    Resumed {
        /// Up position the client must resend from (all below is held).
        up: Pos,
        /// The server holds the client's Close.
        up_fin: bool,
        /// Down position this server sends from.
        down: Pos,
        /// The session's new epoch.
        epoch: Epoch,
        /// The answering server.
        server: ServerId,
        /// Other servers of the pool, preferred first.
        alternates: Vec<Alternate>,
        /// The client may send up bytes below `up + window`.
        window: u64,
        /// The session secret changed with the epoch: the client derives
        /// the new one from its secret and this value
        /// ([`next_secret`](crate::mac::next_secret)). `None` when the
        /// epoch (and secret) stayed, as when the client came back to its
        /// own live server.
        rekey: Option<[u8; 32]>,
        /// The server keeps a replica of the session at a backup (crash
        /// tolerance). A state request for it then waits until the client
        /// acknowledged the down bytes in flight on its old connection, so
        /// a migrating client reads that connection during the handshake;
        /// without a replica it need not until the session resumed.
        replicated: bool,
    },
    /// S2->C: the session cannot start or resume here.
    Reject {
        /// Why.
        reason: RejectReason,
        /// Human-readable detail.
        text: String,
    },
    /// Both ways: stream bytes; their position is implicit.
    Data(Bytes),
    /// Both ways: cumulative acknowledgement and flow-control limit.
    Ack {
        /// Every byte below this position is held by the receiver.
        pos: Pos,
        /// The sender may send bytes below this position.
        limit: Pos,
        /// The receiver holds the sender's Close.
        fin: bool,
    },
    /// S->C: migrate now, to `dest` if given.
    Trigger {
        /// Suggested destination.
        dest: Option<ServerId>,
    },
    /// Both ways: no more bytes in this direction after `pos`.
    Close {
        /// End position of the direction.
        pos: Pos,
    },
    /// Both ways: liveness probe.
    Ping {
        /// Echoed in the Pong.
        nonce: u64,
    },
    /// Both ways: answer to a Ping.
    Pong {
        /// The Ping's nonce.
        nonce: u64,
    },
    /// C->S, first frame on a resumed incarnation whose Resumed starts the
    /// down stream beyond what the client holds: the connection it was
    /// draining ended at `pos`, short of the resume point, so the server
    /// sends from `pos` (fetching those bytes from the origin).
    Missing {
        /// Every down byte below this is held by the client.
        pos: Pos,
        /// The server may send bytes below this position.
        limit: Pos,
    },
}

const HELLO: u8 = 0x01;
const WELCOME: u8 = 0x02;
const MIGRATE: u8 = 0x03;
const RESUMED: u8 = 0x04;
const REJECT: u8 = 0x05;
const DATA: u8 = 0x06;
const ACK: u8 = 0x07;
const TRIGGER: u8 = 0x08;
const CLOSE: u8 = 0x09;
const PING: u8 = 0x0a;
const PONG: u8 = 0x0b;
const CHALLENGE: u8 = 0x0c;
const PROOF: u8 = 0x0d;
const MISSING: u8 = 0x0e;

impl Frame {
    /// Short name of the frame kind, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "Hello",
            Frame::Welcome { .. } => "Welcome",
            Frame::Migrate(_) => "Migrate",
            Frame::Resumed { .. } => "Resumed",
            Frame::Reject { .. } => "Reject",
            Frame::Data(_) => "Data",
            Frame::Ack { .. } => "Ack",
            Frame::Trigger { .. } => "Trigger",
            Frame::Close { .. } => "Close",
            Frame::Ping { .. } => "Ping",
            Frame::Pong { .. } => "Pong",
            Frame::Challenge { .. } => "Challenge",
            Frame::Proof { .. } => "Proof",
            Frame::Missing { .. } => "Missing",
        }
    }

    /// Appends the encoded frame to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            Frame::Data(payload) => {
                put_header(dst, DATA, payload.len());
                dst.put_slice(payload);
            }
            Frame::Hello { window } => put_frame(dst, HELLO, |b| b.put_u64(*window)),
            Frame::Welcome {
                session,
                secret,
                epoch,
                server,
                alternates,
                window,
                replicated,
            } => put_frame(dst, WELCOME, |b| {
                b.put_session(*session);
                b.put_slice(&secret.0);
                b.put_u64(*epoch);
                b.put_server_id(server);
                b.put_alternates(alternates);
                b.put_u64(*window);
                b.put_bool(*replicated);
            }),
            Frame::Migrate(m) => put_frame(dst, MIGRATE, |b| m.put(b)),
            Frame::Resumed {
                up,
                up_fin,
                down,
                epoch,
                server,
                alternates,
                window,
                rekey,
                replicated,
            } => put_frame(dst, RESUMED, |b| {
                b.put_u64(*up);
                b.put_bool(*up_fin);
                b.put_u64(*down);
                b.put_u64(*epoch);
                b.put_server_id(server);
                b.put_alternates(alternates);
                b.put_u64(*window);
                b.put_bool(rekey.is_some());
                if let Some(k) = rekey {
                    b.put_slice(k);
                }
                b.put_bool(*replicated);
            }),
            Frame::Reject { reason, text } => put_frame(dst, REJECT, |b| {
                reason.put(b);
                b.put_text(text);
            }),
            Frame::Ack { pos, limit, fin } => put_frame(dst, ACK, |b| {
                b.put_u64(*pos);
                b.put_u64(*limit);
                b.put_bool(*fin);
            }),
            Frame::Trigger { dest } => {
                put_frame(dst, TRIGGER, |b| b.put_opt_server_id(dest.as_ref()))
            }
            Frame::Close { pos } => put_frame(dst, CLOSE, |b| b.put_u64(*pos)),
            Frame::Ping { nonce } => put_frame(dst, PING, |b| b.put_u64(*nonce)),
            Frame::Pong { nonce } => put_frame(dst, PONG, |b| b.put_u64(*nonce)),
            Frame::Challenge { nonce } => put_frame(dst, CHALLENGE, |b| b.put_slice(nonce)),
            Frame::Proof { mac } => put_frame(dst, PROOF, |b| b.put_slice(mac)),
            Frame::Missing { pos, limit } => put_frame(dst, MISSING, |b| {
                b.put_u64(*pos);
                b.put_u64(*limit);
            }),
        }
    }

    /// The header of a Data frame carrying `len` bytes, for senders that
    /// write the payload straight from their buffer (vectored IO).
    pub fn data_header(len: usize) -> [u8; crate::wire::HEADER_LEN] {
        let len = u32::try_from(len).expect("data frames are bounded far below 4 GiB");
        let l = len.to_be_bytes();
        [DATA, l[0], l[1], l[2], l[3]]
    }

    /// Decodes one frame from the front of `src`.
    ///
    /// Returns `Ok(None)` when `src` holds only part of a frame (nothing is
    /// consumed), and an error for a frame larger than `max_frame` or
    /// malformed in any way. A Data payload is split off without copying.
    pub fn decode(src: &mut BytesMut, max_frame: usize) -> Result<Option<Frame>, DecodeError> {
        let Some((ty, body)) = split_frame(src, max_frame, |t| (HELLO..=MISSING).contains(&t))?
        else {
            return Ok(None);
        };
        let name = match ty {
            HELLO => "Hello",
            WELCOME => "Welcome",
            MIGRATE => "Migrate",
            RESUMED => "Resumed",
            REJECT => "Reject",
            DATA => "Data",
            ACK => "Ack",
            TRIGGER => "Trigger",
            CLOSE => "Close",
            PING => "Ping",
            PONG => "Pong",
            CHALLENGE => "Challenge",
            PROOF => "Proof",
            _ => "Missing",
        };
        let mut r = Reader::new(body, name);
        let frame = match ty {
            HELLO => Frame::Hello { window: r.u64()? },
            WELCOME => Frame::Welcome {
                session: r.session()?,
                secret: r.secret()?,
                epoch: r.u64()?,
                server: r.server_id("server")?,
                alternates: r.alternates()?,
                window: r.u64()?,
                replicated: r.bool("replicated")?,
            },
            MIGRATE => Frame::Migrate(MigrateRequest::read(&mut r)?),
            RESUMED => Frame::Resumed {
                up: r.u64()?,
                up_fin: r.bool("up_fin")?,
                down: r.u64()?,
                epoch: r.u64()?,
                server: r.server_id("server")?,
                alternates: r.alternates()?,
                window: r.u64()?,
                rekey: match r.bool("rekey")? {
                    true => Some(r.array()?),
                    false => None,
                },
                replicated: r.bool("replicated")?,
            },
            REJECT => Frame::Reject {
                reason: RejectReason::read(&mut r)?,
                text: r.text("text", MAX_TEXT_LEN)?,
            },
            DATA => Frame::Data(r.rest()),
            ACK => Frame::Ack {
                pos: r.u64()?,
                limit: r.u64()?,
                fin: r.bool("fin")?,
            },
            TRIGGER => Frame::Trigger {
                dest: r.opt_server_id("dest")?,
            },
            CLOSE => Frame::Close { pos: r.u64()? },
            PING => Frame::Ping { nonce: r.u64()? },
            PONG => Frame::Pong { nonce: r.u64()? },
            CHALLENGE => Frame::Challenge { nonce: r.array()? },
            PROOF => Frame::Proof { mac: r.array()? },
            _ => Frame::Missing {
                pos: r.u64()?,
                limit: r.u64()?,
            },
        };
        r.finish()?;
        Ok(Some(frame))
    }
}
