//! Socket images: what [`crate::checkpoint`] reads out of a kernel TCP
//! socket and [`crate::restore`] puts back (docs/architecture.md section 5), and the
//! file that holds several of them with an application-state blob.
//!
//! # File format (version 1)
//!
//! All integers are big-endian. An image file is
//!
//! | bytes       | field                                                     |
//! |-------------|-----------------------------------------------------------|
//! | 8           | magic `b"MIGSOCK\0"`                                      |
//! | 2           | format version, u16 (1)                                   |
//! | 8           | body length in bytes, u64                                 |
//! | body length | body (below)                                              |
//! | 32          | SHA-256 of every byte before it (magic, version, length, body) |
//!
//! Magic and version keep their place in every version; what follows them
//! depends on the version. Nothing may follow the checksum.
//!
//! The body is a u32 socket count (at most [`MAX_SOCKETS`]), that many
//! sockets, then the application state as a u64 length and its bytes. Each
//! socket is, field by field in [`SocketImage`]'s order:
//!
//! * `local`, then `peer`: a family byte, 4 for IPv4 or 6 for IPv6; the
//!   address (4 or 16 bytes); the port (u16); for IPv6 only, the flow info
//!   and the scope id (u32 each);
//! * `state`: one byte, the kernel's number ([`TcpState::to_linux`]);
//! * `snd_seq`, `rcv_seq`: u32 each;
//! * `sent`, `unsent`, `received`: each a u32 length and that many bytes;
//! * `mss`: u32;
//! * `wscale`: a presence byte (0 absent, 1 present), then if present the
//!   send and receive shifts, one byte each, each at most 14;
//! * `sack`: a boolean byte (0 or 1);
//! * `timestamp`: a presence byte, then if present a u32;
//! * `window`: `snd_wl1`, `snd_wnd`, `max_window`, `rcv_wnd`, `rcv_wup`,
//!   u32 each;
//! * `options`: `nodelay` and `keepalive` (boolean bytes), `keepidle`,
//!   `keepintvl`, `keepcnt` (u32 each), `reuseaddr` (boolean byte),
//!   `sndbuf`, `rcvbuf` (u32 each).
//!
//! Every value has exactly one encoding (booleans and presence bytes are 0
//! or 1, nothing else), so `decode` then `encode` gives back the same bytes.
//!
//! The checksum detects corruption (a truncated copy, a flipped bit), not
//! tampering: anyone who can write the file can write a valid checksum.
//! An image holds a live connection's sequence numbers and data, enough to
//! take the connection over, so [`ImageFile::write_to`] creates it readable
//! by its owner only; keep it that way.
//!
//! ```
//! use migratory_repair::ImageFile;
//!
//! let image = ImageFile { sockets: Vec::new(), app_state: b"state".to_vec() };
//! let bytes = image.encode();
//! assert_eq!(&bytes[..8], b"MIGSOCK\0");
//! assert_eq!(ImageFile::decode(&bytes).unwrap(), image);
//! ```

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use thiserror::Error;

/// The first eight bytes of every image file.
pub const MAGIC: [u8; 8] = *b"MIGSOCK\0";

/// The format version this build writes, and the only one it reads.
pub const FORMAT_VERSION: u16 = 1;

/// The most sockets one image file may hold.
pub const MAX_SOCKETS: usize = 65536;

/// The largest window scale shift TCP allows (RFC 7323).
pub const MAX_WSCALE: u8 = 14;

/// Magic, version and body length.
const HEADER_LEN: usize = 8 + 2 + 8;
/// SHA-256.
const CHECKSUM_LEN: usize = 32;
/// How many bytes of a queue `Display` shows.
const PREVIEW_LEN: usize = 32;
/// The smallest encoding of one socket: IPv4 addresses, empty queues, no
/// optional fields. Bounds the capacity reserved for a decoded socket
/// count by what the body can really hold.
const MIN_SOCKET_LEN: usize = 2 * (1 + 4 + 2) // addresses
    + 1 // state
    + 2 * 4 // sequence numbers
    + 3 * 4 // queue lengths
    + 4 // mss
    + 1 // wscale presence
    + 1 // sack
    + 1 // timestamp presence
    + 5 * 4 // repair window
    + 3 + 5 * 4; // options
const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

/// Why an image could not be read or written.
#[derive(Debug, Error)]
pub enum ImageError {
    /// A file system operation failed; `action` and `path` say which.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "read image file".
        action: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// The image ends before the length its header announces.
    #[error("image truncated: {have} bytes, the header needs {need}")]
    Truncated {
        /// Bytes the image needs (at least the fixed header).
        need: u64,
        /// Bytes there are.
        have: u64,
    },
    /// The data does not start with [`MAGIC`]: it is not a socket image.
    #[error("not a migratory socket image (bad magic; expected \"MIGSOCK\\0\")")]
    BadMagic,
    /// The image was written in a format version this build cannot read.
    #[error("socket image format version {0} is not supported (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    /// The SHA-256 does not match the contents: the image is corrupted.
    #[error("socket image checksum mismatch: the image is corrupted")]
    Checksum,
    /// A field holds a value outside its domain, or a length overflows the
    /// body; `field` names it (e.g. `sockets[2].state`).
    #[error("invalid socket image: {field}: {what}")]
    Invalid {
        /// Which field.
        field: String,
        /// What is wrong with it.
        what: String,
    },
    /// An image file's contents are bad ([`ImageFile::read_from`]); `error`
    /// says how ([`ImageError::root`] gets it).
    #[error("{}: {error}", path.display())]
    InFile {
        /// The image file.
        path: PathBuf,
        /// What is wrong with its contents.
        error: Box<ImageError>,
    },
}

impl ImageError {
    /// The error without the file it was found in: for
    /// [`ImageError::InFile`] the error inside, for others `self`.
    pub fn root(&self) -> &ImageError {
        match self {
            ImageError::InFile { error, .. } => error.root(),
            other => other,
        }
    }

    fn invalid(field: impl Into<String>, what: impl Into<String>) -> ImageError {
        ImageError::Invalid {
            field: field.into(),
            what: what.into(),
        }
    }
}

/// TCP states a socket image can hold (`TCP_INFO`'s `tcpi_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpState {
    /// Both directions open.
    Established,
    /// We sent FIN; it is not acknowledged yet.
    FinWait1,
    /// We sent FIN and it was acknowledged; the peer may still send.
    FinWait2,
    /// The peer sent FIN; we may still send.
    CloseWait,
    /// The peer sent FIN, then we did; ours is not acknowledged yet.
    LastAck,
    /// Both sent FIN at once; ours is not acknowledged yet.
    Closing,
}

/// The kernel's `TCP_REPAIR_WINDOW` (struct `tcp_repair_window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RepairWindow {
    /// Sequence of the segment that last updated the send window.
    pub snd_wl1: u32,
    /// The peer's advertised window.
    pub snd_wnd: u32,
    /// The largest window the peer ever advertised.
    pub max_window: u32,
    /// Our advertised receive window.
    pub rcv_wnd: u32,
    /// `rcv_nxt` when our window was last advertised.
    pub rcv_wup: u32,
}

/// Socket options an application commonly sets, restored with the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SocketOptions {
    /// `TCP_NODELAY`.
    pub nodelay: bool,
    /// `SO_KEEPALIVE`.
    pub keepalive: bool,
    /// `TCP_KEEPIDLE`, seconds (this and the next two: read and restored
    /// only with `keepalive` on; 0 otherwise, and 0 restores the default).
    pub keepidle: u32,
    /// `TCP_KEEPINTVL`, seconds.
    pub keepintvl: u32,
    /// `TCP_KEEPCNT`.
    pub keepcnt: u32,
    /// `SO_REUSEADDR`.
    pub reuseaddr: bool,
    /// `SO_SNDBUF` as the kernel reports it (twice what was set).
    pub sndbuf: u32,
    /// `SO_RCVBUF` as the kernel reports it (twice what was set).
    pub rcvbuf: u32,
}

/// One established (or half-closed) TCP socket, frozen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketImage {
    /// Our address (must exist on the host that restores the socket).
    pub local: SocketAddr,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The connection's state.
    pub state: TcpState,
    /// Sequence number of the next byte the application would write
    /// (`write_seq`, the end of the send queue), as read in repair mode.
    pub snd_seq: u32,
    /// Sequence number of the next byte expected from the peer (`rcv_nxt`),
    /// as read in repair mode.
    pub rcv_seq: u32,
    /// Sent but not acknowledged by the peer: the head of the send queue.
    pub sent: Vec<u8>,
    /// Written by the application but never sent: the tail of the send
    /// queue.
    pub unsent: Vec<u8>,
    /// Received from the peer, not yet read by the application.
    pub received: Vec<u8>,
    /// The MSS clamp (`TCP_MAXSEG` in repair mode).
    pub mss: u32,
    /// Window scaling, when negotiated: (send shift, receive shift), each
    /// at most 14.
    pub wscale: Option<(u8, u8)>,
    /// SACK was negotiated.
    pub sack: bool,
    /// TCP timestamps were negotiated: the `TCP_TIMESTAMP` value (the
    /// socket's clock with its offset) at checkpoint.
    pub timestamp: Option<u32>,
    /// The repair window.
    pub window: RepairWindow,
    /// The application's socket options.
    pub options: SocketOptions,
}

/// What an image file holds: one or more sockets, and an optional blob of
/// application state that travels with them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageFile {
    /// The sockets, in the order they were checkpointed.
    pub sockets: Vec<SocketImage>,
    /// Application state (empty if none).
    pub app_state: Vec<u8>,
}

impl TcpState {
    /// Every state, in the kernel's numbering order.
    pub const ALL: [TcpState; 6] = [
        TcpState::Established,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Closing,
    ];

    /// The state for the kernel's number (`TCP_ESTABLISHED` = 1, ...), or
    /// `None` for a state an image cannot hold (`TCP_SYN_SENT`,
    /// `TCP_LISTEN`, `TCP_CLOSE`, ...).
    pub fn from_linux(state: u8) -> Option<TcpState> {
        Some(match state {
            1 => TcpState::Established,
            4 => TcpState::FinWait1,
            5 => TcpState::FinWait2,
            8 => TcpState::CloseWait,
            9 => TcpState::LastAck,
            11 => TcpState::Closing,
            _ => return None,
        })
    }

    /// The kernel's number for this state (`include/net/tcp_states.h`).
    pub fn to_linux(self) -> u8 {
        match self {
            TcpState::Established => 1,
            TcpState::FinWait1 => 4,
            TcpState::FinWait2 => 5,
            TcpState::CloseWait => 8,
            TcpState::LastAck => 9,
            TcpState::Closing => 11,
        }
    }

    /// The kernel's name without `TCP_`, e.g. `"ESTABLISHED"`.
    pub fn name(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Closing => "CLOSING",
        }
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------
// Encoding

fn addr_len(addr: &SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(_) => 1 + 4 + 2,
        SocketAddr::V6(_) => 1 + 16 + 2 + 4 + 4,
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_bool(out: &mut Vec<u8>, v: bool) {
    out.push(u8::from(v));
}

fn put_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            out.push(FAMILY_V4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        SocketAddr::V6(a) => {
            out.push(FAMILY_V6);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
            put_u32(out, a.flowinfo());
            put_u32(out, a.scope_id());
        }
    }
}

/// A queue's u32 length prefix.
///
/// # Panics
///
/// If the queue is longer than `u32::MAX` bytes.
fn put_queue(out: &mut Vec<u8>, data: &[u8]) {
    let len = u32::try_from(data.len()).expect("socket queue longer than u32::MAX bytes");
    put_u32(out, len);
    out.extend_from_slice(data);
}

impl SocketImage {
    /// Length of this socket's encoding in an image body.
    fn encoded_len(&self) -> usize {
        MIN_SOCKET_LEN - 2 * (1 + 4 + 2)
            + addr_len(&self.local)
            + addr_len(&self.peer)
            + self.sent.len()
            + self.unsent.len()
            + self.received.len()
            + if self.wscale.is_some() { 2 } else { 0 }
            + if self.timestamp.is_some() { 4 } else { 0 }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        put_addr(out, &self.local);
        put_addr(out, &self.peer);
        out.push(self.state.to_linux());
        put_u32(out, self.snd_seq);
        put_u32(out, self.rcv_seq);
        put_queue(out, &self.sent);
        put_queue(out, &self.unsent);
        put_queue(out, &self.received);
        put_u32(out, self.mss);
        match self.wscale {
            Some((snd, rcv)) => out.extend_from_slice(&[1, snd, rcv]),
            None => out.push(0),
        }
        put_bool(out, self.sack);
        match self.timestamp {
            Some(ts) => {
                out.push(1);
                put_u32(out, ts);
            }
            None => out.push(0),
        }
        let w = &self.window;
        for v in [w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup] {
            put_u32(out, v);
        }
        let o = &self.options;
        put_bool(out, o.nodelay);
        put_bool(out, o.keepalive);
        put_u32(out, o.keepidle);
        put_u32(out, o.keepintvl);
        put_u32(out, o.keepcnt);
        put_bool(out, o.reuseaddr);
        put_u32(out, o.sndbuf);
        put_u32(out, o.rcvbuf);
    }

    /// Checks what the format cannot hold or `decode` would refuse: a
    /// window scale above [`MAX_WSCALE`], a queue longer than `u32::MAX`
    /// bytes. `index` names the socket in the error.
    fn validate(&self, index: usize) -> Result<(), ImageError> {
        if let Some((snd, rcv)) = self.wscale {
            if snd > MAX_WSCALE || rcv > MAX_WSCALE {
                return Err(ImageError::invalid(
                    format!("sockets[{index}].wscale"),
                    format!("shifts ({snd}, {rcv}): each must be at most {MAX_WSCALE}"),
                ));
            }
        }
        for (name, queue) in [
            ("sent", &self.sent),
            ("unsent", &self.unsent),
            ("received", &self.received),
        ] {
            if u32::try_from(queue.len()).is_err() {
                return Err(ImageError::invalid(
                    format!("sockets[{index}].{name}"),
                    format!("{} bytes: at most {} fit", queue.len(), u32::MAX),
                ));
            }
        }
        Ok(())
    }
}

impl ImageFile {
    /// Checks that the image can be written and read back: at most
    /// [`MAX_SOCKETS`] sockets, window scales at most [`MAX_WSCALE`], queues
    /// at most `u32::MAX` bytes. [`ImageFile::write_to`] calls it.
    pub fn validate(&self) -> Result<(), ImageError> {
        if self.sockets.len() > MAX_SOCKETS {
            return Err(ImageError::invalid(
                "sockets",
                format!(
                    "{} sockets: at most {MAX_SOCKETS} fit in one image",
                    self.sockets.len()
                ),
            ));
        }
        for (i, socket) in self.sockets.iter().enumerate() {
            socket.validate(i)?;
        }
        Ok(())
    }

    /// The image in the file format (see the [module docs](self)).
    ///
    /// Does not validate: an image that [`ImageFile::validate`] refuses
    /// encodes, but does not decode.
    ///
    /// # Panics
    ///
    /// If a queue is longer than `u32::MAX` bytes or there are more than
    /// `u32::MAX` sockets (the kernel's queues are far smaller).
    pub fn encode(&self) -> Vec<u8> {
        let body_len = 4
            + self
                .sockets
                .iter()
                .map(SocketImage::encoded_len)
                .sum::<usize>()
            + 8
            + self.app_state.len();
        let mut out = Vec::with_capacity(HEADER_LEN + body_len + CHECKSUM_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.extend_from_slice(&(body_len as u64).to_be_bytes());
        let count = u32::try_from(self.sockets.len()).expect("more than u32::MAX sockets");
        put_u32(&mut out, count);
        for socket in &self.sockets {
            socket.encode_into(&mut out);
        }
        out.extend_from_slice(&(self.app_state.len() as u64).to_be_bytes());
        out.extend_from_slice(&self.app_state);
        debug_assert_eq!(out.len(), HEADER_LEN + body_len);
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        out
    }

    /// Reads an image written by [`ImageFile::encode`].
    ///
    /// Checks, in order: the magic, the version, the length (the data must
    /// end exactly after the checksum), the checksum, then every field.
    /// Never panics, and allocates in proportion to `bytes`, never to a
    /// length or count read from them.
    pub fn decode(bytes: &[u8]) -> Result<ImageFile, ImageError> {
        let have = bytes.len() as u64;
        let Some(magic) = bytes.get(..MAGIC.len()) else {
            return Err(if MAGIC.starts_with(bytes) {
                ImageError::Truncated {
                    need: HEADER_LEN as u64,
                    have,
                }
            } else {
                ImageError::BadMagic
            });
        };
        if magic != MAGIC {
            return Err(ImageError::BadMagic);
        }
        let Some(header) = bytes.get(..HEADER_LEN) else {
            return Err(ImageError::Truncated {
                need: HEADER_LEN as u64,
                have,
            });
        };
        let mut r = Reader::new(&header[MAGIC.len()..]);
        let version = r.u16("version")?;
        if version != FORMAT_VERSION {
            return Err(ImageError::UnsupportedVersion(version));
        }
        let body_len = r.u64("body length")?;
        let need = body_len.saturating_add((HEADER_LEN + CHECKSUM_LEN) as u64);
        if have < need {
            return Err(ImageError::Truncated { need, have });
        }
        if have > need {
            return Err(ImageError::invalid(
                "file",
                format!("{} bytes after the checksum", have - need),
            ));
        }
        // have == need, so the body length fits in usize.
        let body_end = bytes.len() - CHECKSUM_LEN;
        let (signed, checksum) = bytes.split_at(body_end);
        if Sha256::digest(signed).as_slice() != checksum {
            return Err(ImageError::Checksum);
        }
        decode_body(&signed[HEADER_LEN..])
    }

    /// Writes the image to `path` atomically: into a new temporary file in
    /// the same directory (mode 0600 on Unix), flushed to disk, then renamed
    /// over `path`, and the directory flushed. A crash leaves either the old
    /// file or the new one, never half an image (at worst a stray
    /// `.NAME.tmp-*` file). Validates first ([`ImageFile::validate`]).
    pub fn write_to(&self, path: &Path) -> Result<(), ImageError> {
        self.put_in_place(path, true)?.flush()
    }

    /// Writes the encoded image to a temporary file next to `path` (flushed
    /// first if `flush`) and renames it over `path`.
    fn put_in_place(&self, path: &Path, flush: bool) -> Result<Placed, ImageError> {
        self.validate()?;
        place_bytes(&self.encode(), path, flush)
    }
}

/// Puts `bytes` (an image's encoding) at `path` as [`ImageFile::write_to`]
/// does, without waiting for the disk: the image is renamed into place
/// whole (every reader sees all of it or none of it), but not yet flushed;
/// [`Placed::flush`] does that. Until then a crash of the host may leave
/// no file, or a truncated one that [`ImageFile::decode`] refuses (length
/// and checksum), at `path`: never an image that decodes to something
/// else.
pub(crate) fn place_unflushed(bytes: &[u8], path: &Path) -> Result<Placed, ImageError> {
    place_bytes(bytes, path, false)
}

/// Writes `bytes` to a temporary file next to `path` (flushed first if
/// `flush`) and renames it over `path`.
fn place_bytes(bytes: &[u8], path: &Path, flush: bool) -> Result<Placed, ImageError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let Some(name) = path.file_name() else {
        return Err(io_err("write image file", path)(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path does not name a file",
        )));
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&tmp)
        .map_err(io_err("create temporary image file", &tmp))?;
    let written = file
        .write_all(bytes)
        .and_then(|()| if flush { file.sync_all() } else { Ok(()) })
        .map_err(io_err("write temporary image file", &tmp))
        .and_then(|()| {
            fs::rename(&tmp, path).map_err(io_err("move the new image into place at", path))
        });
    if let Err(e) = written {
        drop(file);
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(Placed {
        // Already flushed: only the directory is left.
        file: (!flush).then_some(file),
        path: path.to_path_buf(),
        dir: dir.to_path_buf(),
    })
}

impl ImageFile {
    /// [`ImageFile::read_from`], waiting at most `timeout` for the file to
    /// appear first: a checkpoint still running writes it
    /// ([`ImageFile::write_to`] puts it in place whole, with a rename).
    pub fn wait_read(path: &Path, timeout: Duration) -> Result<ImageFile, ImageError> {
        Ok(ImageFile::wait_read_bytes(path, timeout)?.0)
    }

    /// [`ImageFile::wait_read`], returning the file's bytes too.
    pub(crate) fn wait_read_bytes(
        path: &Path,
        timeout: Duration,
    ) -> Result<(ImageFile, Vec<u8>), ImageError> {
        wait_for_file(path, timeout).map_err(|source| ImageError::Io {
            action: "wait for image file",
            path: path.to_path_buf(),
            source,
        })?;
        crate::steps::step("rs image there");
        let bytes = ImageFile::read_bytes(path)?;
        let image = ImageFile::decode(&bytes).map_err(|error| ImageError::InFile {
            path: path.to_path_buf(),
            error: Box::new(error),
        })?;
        Ok((image, bytes))
    }

    /// The bytes of the file at `path`, undecoded (to compare with bytes
    /// known to be an image's).
    pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>, ImageError> {
        fs::read(path).map_err(io_err("read image file", path))
    }

    /// Reads and decodes the image file at `path`. A missing or unreadable
    /// file gives [`ImageError::Io`]; bad contents give
    /// [`ImageError::InFile`] around the [`ImageFile::decode`] error.
    pub fn read_from(path: &Path) -> Result<ImageFile, ImageError> {
        let bytes = fs::read(path).map_err(|source| ImageError::Io {
            action: "read image file",
            path: path.to_path_buf(),
            source,
        })?;
        ImageFile::decode(&bytes).map_err(|error| ImageError::InFile {
            path: path.to_path_buf(),
            error: Box::new(error),
        })
    }
}

/// An image file renamed into place by [`place_unflushed`],
/// not yet known to be on disk.
#[derive(Debug)]
pub(crate) struct Placed {
    /// The file written, still open, if its data is not flushed yet.
    file: Option<fs::File>,
    path: PathBuf,
    dir: PathBuf,
}

impl Placed {
    /// Flushes the image's data, then its directory (the rename): from now
    /// on a crash of the host leaves this image at its path.
    pub(crate) fn flush(self) -> Result<(), ImageError> {
        if let Some(file) = &self.file {
            file.sync_all()
                .map_err(io_err("flush image file", &self.path))?;
        }
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("flush directory", &self.dir))
    }
}

/// An [`ImageError::Io`] maker for `action` on `path`.
fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::Io {
        action,
        path,
        source,
    }
}

/// Waits at most `timeout` until `path` exists (inotify on its directory:
/// no polling).
fn wait_for_file(path: &Path, timeout: Duration) -> io::Result<()> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
    let deadline = Instant::now() + timeout;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let watch = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
    inotify::add_watch(
        &watch,
        dir,
        WatchFlags::MOVED_TO | WatchFlags::CREATE | WatchFlags::CLOSE_WRITE,
    )?;
    let mut events = [0u8; 4096];
    loop {
        // Looked at after the watch exists: an image put in place between
        // the two is seen here, later ones wake the poll.
        if path.try_exists()? {
            // Closing an inotify instance waits for an SRCU grace period
            // (13 ms measured here): not on the way to a restore.
            std::thread::spawn(move || drop(watch));
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("not there after {timeout:?}"),
            ));
        }
        let left = Timespec {
            tv_sec: left.as_secs().try_into().unwrap_or(i64::MAX),
            tv_nsec: left.subsec_nanos().into(),
        };
        match poll(&mut [PollFd::new(&watch, PollFlags::IN)], Some(&left)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        // What happened does not matter, only whether the file is there.
        while rustix::io::read(&watch, &mut events).is_ok_and(|n| n > 0) {}
    }
}

// ---------------------------------------------------------------------
// Decoding

/// Reads fields off a byte slice; every error names the field.
struct Reader<'a> {
    buf: &'a [u8],
    /// The socket being read, to prefix field names with `sockets[i].`.
    socket: Option<usize>,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, socket: None }
    }

    fn invalid(&self, field: &str, what: impl Into<String>) -> ImageError {
        let field = match self.socket {
            Some(i) => format!("sockets[{i}].{field}"),
            None => field.to_owned(),
        };
        ImageError::invalid(field, what)
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], ImageError> {
        if n > self.buf.len() {
            return Err(self.invalid(
                field,
                format!(
                    "the body ends inside this field ({n} bytes needed, {} left)",
                    self.buf.len()
                ),
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], ImageError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    fn u8(&mut self, field: &str) -> Result<u8, ImageError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &str) -> Result<u16, ImageError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &str) -> Result<u32, ImageError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn u64(&mut self, field: &str) -> Result<u64, ImageError> {
        self.array(field).map(u64::from_be_bytes)
    }

    /// A byte that must be 0 or 1 (a boolean or a presence byte).
    fn flag(&mut self, field: &str) -> Result<bool, ImageError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.invalid(field, format!("byte {b} is neither 0 nor 1"))),
        }
    }

    /// `len` bytes, copied; refuses a length beyond what is left before
    /// allocating anything.
    fn bytes(&mut self, len: u64, field: &str) -> Result<Vec<u8>, ImageError> {
        match usize::try_from(len) {
            Ok(n) if n <= self.buf.len() => Ok(self.take(n, field)?.to_vec()),
            _ => Err(self.invalid(
                field,
                format!(
                    "length {len} exceeds the {} bytes left in the body",
                    self.buf.len()
                ),
            )),
        }
    }

    fn queue(&mut self, field: &str) -> Result<Vec<u8>, ImageError> {
        let len = self.u32(field)?;
        self.bytes(u64::from(len), field)
    }

    fn addr(&mut self, field: &str) -> Result<SocketAddr, ImageError> {
        let family = self.u8(field)?;
        match family {
            FAMILY_V4 => {
                let ip = Ipv4Addr::from(self.array::<4>(field)?);
                let port = self.u16(field)?;
                Ok(SocketAddr::V4(SocketAddrV4::new(ip, port)))
            }
            FAMILY_V6 => {
                let ip = Ipv6Addr::from(self.array::<16>(field)?);
                let port = self.u16(field)?;
                let flowinfo = self.u32(field)?;
                let scope_id = self.u32(field)?;
                Ok(SocketAddr::V6(SocketAddrV6::new(
                    ip, port, flowinfo, scope_id,
                )))
            }
            other => Err(self.invalid(
                field,
                format!("unknown address family {other} (expected 4 or 6)"),
            )),
        }
    }

    fn socket(&mut self) -> Result<SocketImage, ImageError> {
        let local = self.addr("local")?;
        let peer = self.addr("peer")?;
        let state_byte = self.u8("state")?;
        let state = TcpState::from_linux(state_byte).ok_or_else(|| {
            self.invalid(
                "state",
                format!("{state_byte} is not a TCP state an image can hold"),
            )
        })?;
        let snd_seq = self.u32("snd_seq")?;
        let rcv_seq = self.u32("rcv_seq")?;
        let sent = self.queue("sent")?;
        let unsent = self.queue("unsent")?;
        let received = self.queue("received")?;
        let mss = self.u32("mss")?;
        let wscale = if self.flag("wscale")? {
            let snd = self.u8("wscale")?;
            let rcv = self.u8("wscale")?;
            if snd > MAX_WSCALE || rcv > MAX_WSCALE {
                return Err(self.invalid(
                    "wscale",
                    format!("shifts ({snd}, {rcv}): each must be at most {MAX_WSCALE}"),
                ));
            }
            Some((snd, rcv))
        } else {
            None
        };
        let sack = self.flag("sack")?;
        let timestamp = if self.flag("timestamp")? {
            Some(self.u32("timestamp")?)
        } else {
            None
        };
        let window = RepairWindow {
            snd_wl1: self.u32("window.snd_wl1")?,
            snd_wnd: self.u32("window.snd_wnd")?,
            max_window: self.u32("window.max_window")?,
            rcv_wnd: self.u32("window.rcv_wnd")?,
            rcv_wup: self.u32("window.rcv_wup")?,
        };
        let options = SocketOptions {
            nodelay: self.flag("options.nodelay")?,
            keepalive: self.flag("options.keepalive")?,
            keepidle: self.u32("options.keepidle")?,
            keepintvl: self.u32("options.keepintvl")?,
            keepcnt: self.u32("options.keepcnt")?,
            reuseaddr: self.flag("options.reuseaddr")?,
            sndbuf: self.u32("options.sndbuf")?,
            rcvbuf: self.u32("options.rcvbuf")?,
        };
        Ok(SocketImage {
            local,
            peer,
            state,
            snd_seq,
            rcv_seq,
            sent,
            unsent,
            received,
            mss,
            wscale,
            sack,
            timestamp,
            window,
            options,
        })
    }
}

/// The body of a checksummed image.
fn decode_body(body: &[u8]) -> Result<ImageFile, ImageError> {
    let mut r = Reader::new(body);
    let count = r.u32("socket count")?;
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    if count > MAX_SOCKETS {
        return Err(r.invalid(
            "socket count",
            format!("{count} sockets (at most {MAX_SOCKETS})"),
        ));
    }
    // Never reserve more than the body can hold.
    let mut sockets = Vec::with_capacity(count.min(r.buf.len() / MIN_SOCKET_LEN));
    for i in 0..count {
        r.socket = Some(i);
        sockets.push(r.socket()?);
    }
    r.socket = None;
    let app_len = r.u64("app_state")?;
    let app_state = r.bytes(app_len, "app_state")?;
    if !r.buf.is_empty() {
        return Err(r.invalid(
            "body",
            format!("{} bytes after the application state", r.buf.len()),
        ));
    }
    Ok(ImageFile { sockets, app_state })
}

// ---------------------------------------------------------------------
// Display

/// Width of the label column in `Display`, after the two-space indent.
const LABEL_WIDTH: usize = 13;

/// Writes `label` and `value` as one indented, aligned line.
fn line(f: &mut fmt::Formatter<'_>, label: &str, value: fmt::Arguments<'_>) -> fmt::Result {
    write!(f, "\n  {label:<LABEL_WIDTH$}{value}")
}

fn on_off(v: bool) -> &'static str {
    if v {
        "on"
    } else {
        "off"
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A byte count, then a hex + ASCII preview of the first
/// [`PREVIEW_LEN`] bytes, 16 a line, under the value column.
fn queue(f: &mut fmt::Formatter<'_>, label: &str, data: &[u8]) -> fmt::Result {
    let count = plural(data.len(), "byte", "bytes");
    if data.len() > PREVIEW_LEN {
        line(
            f,
            label,
            format_args!("{count} (first {PREVIEW_LEN} shown)"),
        )?;
    } else {
        line(f, label, format_args!("{count}"))?;
    }
    let shown = &data[..data.len().min(PREVIEW_LEN)];
    for (n, chunk) in shown.chunks(16).enumerate() {
        let mut hex = String::with_capacity(48);
        for (i, b) in chunk.iter().enumerate() {
            if i > 0 {
                hex.push(' ');
            }
            if i == 8 {
                hex.push(' ');
            }
            hex.push_str(&format!("{b:02x}"));
        }
        let ascii: String = chunk
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    char::from(b)
                } else {
                    '.'
                }
            })
            .collect();
        write!(
            f,
            "\n  {:LABEL_WIDTH$}{:04x}  {hex:<48}  |{ascii}|",
            "",
            n * 16
        )?;
    }
    Ok(())
}

/// Multi-line, no trailing newline: the first line is `local -> peer`, the
/// others are indented by two spaces, a label column and its value.
impl fmt::Display for SocketImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.local, self.peer)?;
        line(f, "state", format_args!("{}", self.state))?;
        line(
            f,
            "snd_seq",
            format_args!("{} ({:#010x})", self.snd_seq, self.snd_seq),
        )?;
        line(
            f,
            "rcv_seq",
            format_args!("{} ({:#010x})", self.rcv_seq, self.rcv_seq),
        )?;
        queue(f, "sent-unacked", &self.sent)?;
        queue(f, "unsent", &self.unsent)?;
        queue(f, "received", &self.received)?;
        line(f, "mss", format_args!("{}", self.mss))?;
        match self.wscale {
            Some((snd, rcv)) => line(f, "wscale", format_args!("send {snd}, receive {rcv}"))?,
            None => line(f, "wscale", format_args!("off"))?,
        }
        line(f, "sack", format_args!("{}", on_off(self.sack)))?;
        match self.timestamp {
            Some(ts) => line(
                f,
                "timestamps",
                format_args!("on, TCP_TIMESTAMP {ts} ({ts:#010x})"),
            )?,
            None => line(f, "timestamps", format_args!("off"))?,
        }
        let w = &self.window;
        line(
            f,
            "repair win",
            format_args!(
                "snd_wl1 {}, snd_wnd {}, max_window {}, rcv_wnd {}, rcv_wup {}",
                w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup
            ),
        )?;
        let o = &self.options;
        line(
            f,
            "options",
            format_args!(
                "nodelay {}, reuseaddr {}, sndbuf {}, rcvbuf {}",
                on_off(o.nodelay),
                on_off(o.reuseaddr),
                o.sndbuf,
                o.rcvbuf
            ),
        )?;
        line(
            f,
            "keepalive",
            format_args!(
                "{} (idle {} s, interval {} s, count {})",
                on_off(o.keepalive),
                o.keepidle,
                o.keepintvl,
                o.keepcnt
            ),
        )
    }
}

/// What `migratory sock inspect` prints: a summary line, each socket, then
/// the application state. Multi-line, no trailing newline.
impl fmt::Display for ImageFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "socket image (format version {FORMAT_VERSION}): {}, {} of application state",
            plural(self.sockets.len(), "socket", "sockets"),
            plural(self.app_state.len(), "byte", "bytes"),
        )?;
        for (i, socket) in self.sockets.iter().enumerate() {
            write!(f, "\nsocket {i}: {socket}")?;
        }
        write!(f, "\napplication state:")?;
        queue(f, "length", &self.app_state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_socket(local: SocketAddr, peer: SocketAddr, state: TcpState) -> SocketImage {
        SocketImage {
            local,
            peer,
            state,
            snd_seq: 0x1234_5678,
            rcv_seq: 0xaabb_ccdd,
            sent: b"hello, world".to_vec(),
            unsent: Vec::new(),
            received: (0..=255u8).cycle().take(1000).collect(),
            mss: 1460,
            wscale: Some((7, 9)),
            sack: true,
            timestamp: Some(0x0102_0304),
            window: RepairWindow {
                snd_wl1: 1,
                snd_wnd: 65535,
                max_window: 65535,
                rcv_wnd: 43690,
                rcv_wup: 2,
            },
            options: SocketOptions {
                nodelay: true,
                keepalive: true,
                keepidle: 7200,
                keepintvl: 75,
                keepcnt: 9,
                reuseaddr: false,
                sndbuf: 16384,
                rcvbuf: 131072,
            },
        }
    }

    fn sample() -> ImageFile {
        let mut v6 = sample_socket(
            "[2001:db8::1]:443".parse().unwrap(),
            "[fe80::2%3]:50000".parse().unwrap(),
            TcpState::FinWait1,
        );
        v6.wscale = None;
        v6.timestamp = None;
        v6.received.truncate(20);
        ImageFile {
            sockets: vec![
                sample_socket(
                    "10.0.0.1:8080".parse().unwrap(),
                    "10.0.0.2:51234".parse().unwrap(),
                    TcpState::Established,
                ),
                v6,
            ],
            app_state: b"app state blob".to_vec(),
        }
    }

    /// A valid header and checksum around `body`.
    fn wrap(body: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.extend_from_slice(&(body.len() as u64).to_be_bytes());
        out.extend_from_slice(body);
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        out
    }

    /// The body of an encoding.
    fn body(bytes: &[u8]) -> &[u8] {
        &bytes[HEADER_LEN..bytes.len() - CHECKSUM_LEN]
    }

    fn invalid_field(result: Result<ImageFile, ImageError>) -> String {
        match result {
            Err(ImageError::Invalid { field, .. }) => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::V4(SocketAddrV4::new(ip.into(), port))),
            (any::<[u8; 16]>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(
                |(ip, port, flow, scope)| {
                    SocketAddr::V6(SocketAddrV6::new(ip.into(), port, flow, scope))
                }
            ),
        ]
    }

    fn arb_queue() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(Vec::new()),
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(any::<u8>(), 0..4096),
        ]
    }

    fn arb_socket() -> impl Strategy<Value = SocketImage> {
        (
            (
                arb_addr(),
                arb_addr(),
                prop::sample::select(TcpState::ALL.to_vec()),
            ),
            (any::<u32>(), any::<u32>()),
            (arb_queue(), arb_queue(), arb_queue()),
            (
                any::<u32>(),
                prop::option::of((0..=MAX_WSCALE, 0..=MAX_WSCALE)),
                any::<bool>(),
                prop::option::of(any::<u32>()),
            ),
            any::<[u32; 5]>(),
            (any::<[bool; 3]>(), any::<[u32; 5]>()),
        )
            .prop_map(
                |(
                    (local, peer, state),
                    (snd_seq, rcv_seq),
                    (sent, unsent, received),
                    (mss, wscale, sack, timestamp),
                    w,
                    (flags, nums),
                )| SocketImage {
                    local,
                    peer,
                    state,
                    snd_seq,
                    rcv_seq,
                    sent,
                    unsent,
                    received,
                    mss,
                    wscale,
                    sack,
                    timestamp,
                    window: RepairWindow {
                        snd_wl1: w[0],
                        snd_wnd: w[1],
                        max_window: w[2],
                        rcv_wnd: w[3],
                        rcv_wup: w[4],
                    },
                    options: SocketOptions {
                        nodelay: flags[0],
                        keepalive: flags[1],
                        keepidle: nums[0],
                        keepintvl: nums[1],
                        keepcnt: nums[2],
                        reuseaddr: flags[2],
                        sndbuf: nums[3],
                        rcvbuf: nums[4],
                    },
                },
            )
    }

    fn arb_image() -> impl Strategy<Value = ImageFile> {
        (
            prop::collection::vec(arb_socket(), 0..4),
            prop::collection::vec(any::<u8>(), 0..2048),
        )
            .prop_map(|(sockets, app_state)| ImageFile { sockets, app_state })
    }

    proptest! {
        #[test]
        fn round_trip(image in arb_image()) {
            let bytes = image.encode();
            prop_assert_eq!(&bytes[..8], &MAGIC[..]);
            prop_assert_eq!(ImageFile::decode(&bytes).unwrap(), image);
        }

        #[test]
        fn every_cut_of_an_encoding_is_truncated(image in arb_image(), cut in any::<prop::sample::Index>()) {
            let bytes = image.encode();
            let n = cut.index(bytes.len());
            let result = ImageFile::decode(&bytes[..n]);
            prop_assert!(
                matches!(result, Err(ImageError::Truncated { have, .. }) if have == n as u64),
                "{:?}", result
            );
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = ImageFile::decode(&bytes);
            // Behind a valid magic and version too, so the length is read.
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
            framed.extend_from_slice(&bytes);
            let _ = ImageFile::decode(&framed);
        }

        #[test]
        fn random_body_with_valid_checksum_never_panics(
            body in prop::collection::vec(any::<u8>(), 0..2048)
        ) {
            // The encoding is canonical: whatever decodes re-encodes to the
            // same bytes.
            let bytes = wrap(&body);
            if let Ok(image) = ImageFile::decode(&bytes) {
                prop_assert_eq!(image.encode(), bytes);
            }
        }

        #[test]
        fn mutated_body_with_valid_checksum_never_panics(
            image in arb_image(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let bytes = image.encode();
            let mut body = body(&bytes).to_vec();
            let i = at.index(body.len());
            body[i] = byte;
            let bytes = wrap(&body);
            match ImageFile::decode(&bytes) {
                Ok(decoded) => prop_assert_eq!(decoded.encode(), bytes),
                Err(e) => prop_assert!(matches!(e, ImageError::Invalid { .. }), "{:?}", e),
            }
        }
    }

    #[test]
    fn every_truncation_errors() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            match ImageFile::decode(&bytes[..n]) {
                Err(ImageError::Truncated { need, have }) => {
                    assert_eq!(have, n as u64);
                    assert!(need > have);
                }
                other => panic!("cut at {n}: {other:?}"),
            }
        }
        assert!(ImageFile::decode(&bytes).is_ok());
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << bit;
                let result = ImageFile::decode(&bad);
                let ok = match i {
                    0..8 => matches!(result, Err(ImageError::BadMagic)),
                    8..10 => matches!(result, Err(ImageError::UnsupportedVersion(_))),
                    // The body length: too long is a truncation, too short
                    // leaves bytes after the checksum.
                    10..HEADER_LEN => matches!(
                        result,
                        Err(ImageError::Truncated { .. } | ImageError::Invalid { .. })
                    ),
                    // Body and checksum.
                    _ => matches!(result, Err(ImageError::Checksum)),
                };
                assert!(ok, "bit {bit} of byte {i}: {result:?}");
            }
        }
    }

    #[test]
    fn wrong_magic_and_version() {
        let mut bytes = sample().encode();
        bytes[..8].copy_from_slice(b"NOTSOCK\0");
        assert!(matches!(
            ImageFile::decode(&bytes),
            Err(ImageError::BadMagic)
        ));
        assert!(matches!(
            ImageFile::decode(b"GIF89a"),
            Err(ImageError::BadMagic)
        ));
        assert!(matches!(
            ImageFile::decode(b"MIG"),
            Err(ImageError::Truncated { need: 18, have: 3 })
        ));

        let mut bytes = sample().encode();
        bytes[8..10].copy_from_slice(&2u16.to_be_bytes());
        let err = ImageFile::decode(&bytes).unwrap_err();
        assert!(matches!(err, ImageError::UnsupportedVersion(2)), "{err:?}");
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn trailing_bytes_after_checksum() {
        let mut bytes = sample().encode();
        bytes.push(0);
        assert_eq!(invalid_field(ImageFile::decode(&bytes)), "file");
    }

    #[test]
    fn empty_image_round_trips() {
        let image = ImageFile::default();
        let bytes = image.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 4 + 8 + CHECKSUM_LEN);
        assert_eq!(ImageFile::decode(&bytes).unwrap(), image);
    }

    #[test]
    fn layout_is_as_documented() {
        let mut socket = sample_socket(
            "1.2.3.4:258".parse().unwrap(),
            "5.6.7.8:9".parse().unwrap(),
            TcpState::CloseWait,
        );
        socket.sent.clear();
        socket.received.clear();
        socket.wscale = None;
        socket.timestamp = None;
        let image = ImageFile {
            sockets: vec![socket],
            app_state: vec![0xee],
        };
        let bytes = image.encode();
        assert_eq!(
            bytes.len(),
            HEADER_LEN + 4 + MIN_SOCKET_LEN + 9 + CHECKSUM_LEN
        );
        assert_eq!(&bytes[8..10], &[0, 1]);
        let body_len = (4 + MIN_SOCKET_LEN + 9) as u64;
        assert_eq!(&bytes[10..18], &body_len.to_be_bytes());
        let body = body(&bytes);
        assert_eq!(&body[..4], &[0, 0, 0, 1]);
        assert_eq!(&body[4..11], &[4, 1, 2, 3, 4, 1, 2]); // local
        assert_eq!(&body[11..18], &[4, 5, 6, 7, 8, 0, 9]); // peer
        assert_eq!(body[18], 8); // TCP_CLOSE_WAIT
        assert_eq!(&body[19..23], &[0x12, 0x34, 0x56, 0x78]);
        assert_eq!(&body[body.len() - 9..], &[0, 0, 0, 0, 0, 0, 0, 1, 0xee]);
        let digest = Sha256::digest(&bytes[..bytes.len() - CHECKSUM_LEN]);
        assert_eq!(&bytes[bytes.len() - CHECKSUM_LEN..], digest.as_slice());
    }

    /// The body of `sample()` with its first socket's byte at `offset`
    /// (from the socket's start) replaced, re-checksummed.
    fn patch_first_socket(offset: usize, value: &[u8]) -> Vec<u8> {
        let bytes = sample().encode();
        let mut body = body(&bytes).to_vec();
        body[4 + offset..4 + offset + value.len()].copy_from_slice(value);
        wrap(&body)
    }

    #[test]
    fn invalid_fields_are_named() {
        // Offsets in the first (IPv4) socket of sample().
        let state = 14;
        assert_eq!(
            invalid_field(ImageFile::decode(&patch_first_socket(0, &[5]))),
            "sockets[0].local"
        );
        assert_eq!(
            invalid_field(ImageFile::decode(&patch_first_socket(7, &[2]))),
            "sockets[0].peer"
        );
        let err = ImageFile::decode(&patch_first_socket(state, &[7])).unwrap_err();
        assert!(matches!(&err, ImageError::Invalid { field, .. } if field == "sockets[0].state"));
        assert!(err.to_string().contains("sockets[0].state"), "{err}");
        // sent length: claims more than the body holds.
        let sent_len = state + 1 + 8;
        let err = ImageFile::decode(&patch_first_socket(sent_len, &u32::MAX.to_be_bytes()));
        assert_eq!(invalid_field(err), "sockets[0].sent");
        // wscale of 15.
        let wscale = sent_len + 4 + 12 + 4 + 4 + 1000 + 4;
        let fixed = patch_first_socket(wscale, &[1, 7, 9]);
        assert_eq!(ImageFile::decode(&fixed).unwrap(), sample());
        let err = ImageFile::decode(&patch_first_socket(wscale, &[1, 15, 9]));
        assert_eq!(invalid_field(err), "sockets[0].wscale");
        let err = ImageFile::decode(&patch_first_socket(wscale, &[2]));
        assert_eq!(invalid_field(err), "sockets[0].wscale");
        // sack must be 0 or 1.
        let err = ImageFile::decode(&patch_first_socket(wscale + 3, &[2]));
        assert_eq!(invalid_field(err), "sockets[0].sack");
    }

    #[test]
    fn socket_count_is_bounded() {
        // Too many sockets: refused before reading any.
        let mut body = (MAX_SOCKETS as u32 + 1).to_be_bytes().to_vec();
        body.extend_from_slice(&0u64.to_be_bytes());
        let err = ImageFile::decode(&wrap(&body)).unwrap_err();
        assert!(err.to_string().contains("65537 sockets"), "{err}");
        // A plausible count with nothing behind it: no huge reservation,
        // just an error naming the first missing field.
        let mut body = (MAX_SOCKETS as u32).to_be_bytes().to_vec();
        body.extend_from_slice(&0u64.to_be_bytes());
        assert_eq!(
            invalid_field(ImageFile::decode(&wrap(&body))),
            "sockets[0].local"
        );
        // A huge application-state length.
        let mut body = 0u32.to_be_bytes().to_vec();
        body.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(invalid_field(ImageFile::decode(&wrap(&body))), "app_state");
        // Bytes after the application state.
        let mut body = 0u32.to_be_bytes().to_vec();
        body.extend_from_slice(&0u64.to_be_bytes());
        body.push(0);
        assert_eq!(invalid_field(ImageFile::decode(&wrap(&body))), "body");
    }

    #[test]
    fn huge_body_length_is_truncated_not_allocated() {
        let mut bytes = sample().encode();
        bytes[10..18].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            ImageFile::decode(&bytes),
            Err(ImageError::Truncated { need: u64::MAX, .. })
        ));
    }

    #[test]
    fn validate_refuses_what_decode_would() {
        let mut image = sample();
        image.sockets[1].wscale = Some((3, 15));
        let err = image.validate().unwrap_err();
        assert!(matches!(&err, ImageError::Invalid { field, .. } if field == "sockets[1].wscale"));
        // It encodes, but does not decode.
        assert!(ImageFile::decode(&image.encode()).is_err());
        let dir = TempDir::new();
        let path = dir.0.join("bad.img");
        assert!(matches!(
            image.write_to(&path),
            Err(ImageError::Invalid { .. })
        ));
        assert!(!path.exists());
    }

    #[test]
    fn tcp_states() {
        let numbers: Vec<u8> = TcpState::ALL.iter().map(|s| s.to_linux()).collect();
        assert_eq!(numbers, [1, 4, 5, 8, 9, 11]);
        for state in TcpState::ALL {
            assert_eq!(TcpState::from_linux(state.to_linux()), Some(state));
            assert_eq!(state.to_string(), state.name());
        }
        for n in [0, 2, 3, 6, 7, 10, 12, 255] {
            assert_eq!(TcpState::from_linux(n), None, "{n}");
        }
        assert_eq!(TcpState::Established.name(), "ESTABLISHED");
        assert_eq!(TcpState::FinWait2.name(), "FIN_WAIT2");
    }

    /// A fresh directory under the system's temporary directory, removed
    /// on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let dir = std::env::temp_dir().join(format!(
                "migratory-image-test-{}-{nanos}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir(&dir).unwrap();
            TempDir(dir)
        }

        fn entries(&self) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn write_then_read_file() {
        let dir = TempDir::new();
        let path = dir.0.join("sockets.img");
        let image = sample();
        image.write_to(&path).unwrap();
        assert_eq!(ImageFile::read_from(&path).unwrap(), image);
        assert_eq!(fs::read(&path).unwrap(), image.encode());
        // Only the image: no temporary file left behind.
        assert_eq!(dir.entries(), ["sockets.img"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        // Overwriting replaces the image whole.
        let other = ImageFile {
            sockets: Vec::new(),
            app_state: b"second".to_vec(),
        };
        other.write_to(&path).unwrap();
        assert_eq!(ImageFile::read_from(&path).unwrap(), other);
        assert_eq!(dir.entries(), ["sockets.img"]);
    }

    #[test]
    fn file_errors_name_the_path() {
        let dir = TempDir::new();
        let missing = dir.0.join("missing.img");
        let err = ImageFile::read_from(&missing).unwrap_err();
        assert!(
            matches!(&err, ImageError::Io { path, source, .. }
                if path == &missing && source.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
        assert!(err.to_string().contains("missing.img"), "{err}");

        // A corrupted file: the checksum error, with the file's name.
        let path = dir.0.join("corrupt.img");
        let mut bytes = sample().encode();
        bytes[40] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        let err = ImageFile::read_from(&path).unwrap_err();
        assert!(matches!(err.root(), ImageError::Checksum), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("corrupt.img") && text.contains("checksum"),
            "{text}"
        );

        // Writing into a directory that does not exist.
        let nowhere = dir.0.join("no-such-dir").join("x.img");
        let err = sample().write_to(&nowhere).unwrap_err();
        assert!(matches!(&err, ImageError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("no-such-dir"), "{err}");

        // A path that names no file.
        let err = sample().write_to(Path::new("/")).unwrap_err();
        assert!(matches!(&err, ImageError::Io { .. }), "{err:?}");
        assert_eq!(dir.entries(), ["corrupt.img"]);
    }

    #[test]
    fn display_shows_the_connection() {
        let image = sample();
        let text = image.to_string();
        println!("{text}");
        for needle in [
            "2 sockets, 14 bytes of application state",
            "socket 0: 10.0.0.1:8080 -> 10.0.0.2:51234",
            "socket 1: [2001:db8::1]:443 -> [fe80::2%3]:50000",
            "ESTABLISHED",
            "FIN_WAIT1",
            "12 bytes",
            "1000 bytes (first 32 shown)",
            "20 bytes",
            "0 bytes",
            "|hello, world|",
            "305419896 (0x12345678)",
            "mss          1460",
            "wscale       send 7, receive 9",
            "wscale       off",
            "sack         on",
            "timestamps   on, TCP_TIMESTAMP 16909060",
            "timestamps   off",
            "max_window 65535",
            "keepalive    on (idle 7200 s, interval 75 s, count 9)",
            "nodelay on",
            "14 bytes",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        for line in text.lines() {
            assert_eq!(line, line.trim_end(), "trailing space in {line:?}");
        }
        assert!(!text.ends_with('\n'));
        // Hex previews are aligned: both lines of the 1000-byte queue's
        // preview put the ASCII column at the same place.
        let bars: Vec<usize> = text
            .lines()
            .filter(|l| l.trim_start().starts_with("00"))
            .map(|l| l.find('|').unwrap())
            .collect();
        assert!(bars.len() >= 4);
        assert!(bars.iter().all(|&b| b == bars[0]), "{bars:?}");

        let socket = image.sockets[0].to_string();
        assert!(socket.starts_with("10.0.0.1:8080 -> 10.0.0.2:51234\n  state        ESTABLISHED"));
        assert_eq!(ImageFile::default().to_string().lines().count(), 3);
    }
}
