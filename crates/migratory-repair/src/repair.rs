//! Checkpoint and restore of one kernel TCP socket with `TCP_REPAIR`
//! (DESIGN.md section 5; the sequences of `notes/tcp-repair.md`).
//!
//! Supported states: ESTABLISHED, and the half-closes where only our side
//! closed: FIN_WAIT1 (our FIN not yet acknowledged, or not yet sent) and
//! FIN_WAIT2 (acknowledged; the peer may still send). States where the
//! peer's FIN was received (CLOSE_WAIT, LAST_ACK, CLOSING) are refused with
//! [`RepairError::UnsupportedState`]: re-creating a received FIN needs a
//! forged packet (CRIU injects one through a raw socket), which this crate
//! does not do.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use socket2::{Domain, SockAddr, SockRef, Socket, TcpKeepalive, Type};
use thiserror::Error;

use crate::image::{RepairWindow, SocketImage, SocketOptions, TcpState};
use crate::sys::{getsockopt, ioctl_int, recv, send, setsockopt_bytes, setsockopt_int};

// Kernel constants libc lacks (include/uapi/linux/tcp.h, sockios.h).
const TCP_REPAIR_ON: libc::c_int = 1;
const TCP_REPAIR_OFF: libc::c_int = 0;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
const TCPOPT_MSS: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
const SIOCINQ: libc::c_ulong = libc::FIONREAD as libc::c_ulong;
const SIOCOUTQ: libc::c_ulong = libc::TIOCOUTQ as libc::c_ulong;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

/// How long restoring the never-sent tail may wait for send-buffer room.
const UNSENT_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong checkpointing or restoring a socket.
#[derive(Debug, Error)]
pub enum RepairError {
    /// `TCP_REPAIR` needs CAP_NET_ADMIN.
    #[error("not permitted: TCP_REPAIR needs CAP_NET_ADMIN (run as root)")]
    NotPermitted,
    /// The descriptor is not a TCP socket.
    #[error("not a TCP socket")]
    NotTcp,
    /// A listening socket has no connection to checkpoint.
    #[error("a listening socket cannot be checkpointed (hand it over instead)")]
    Listening,
    /// The connection is in a state this crate cannot restore.
    #[error("TCP state {0} is not supported (ESTABLISHED, FIN_WAIT1 and FIN_WAIT2 are)")]
    UnsupportedState(&'static str),
    /// The image's local address does not exist on this host.
    #[error("local address {0} is not on this host: move the address here first")]
    AddressNotLocal(SocketAddr),
    /// A socket for this very connection still exists on this host (close
    /// the checkpointed one first).
    #[error(
        "a socket for {0} -> {1} still exists on this host (close the checkpointed one first)"
    )]
    ConnectionExists(SocketAddr, SocketAddr),
    /// The local address and port are taken by another socket.
    #[error("local address {0} is in use by another socket")]
    AddressInUse(SocketAddr),
    /// A queue changed while it was read: the owner or its traffic was not
    /// stopped.
    #[error("the {0} queue changed while it was read (stop the owner and its traffic)")]
    QueueChanged(&'static str),
    /// The image cannot be restored as it is.
    #[error("invalid image: {0}")]
    InvalidImage(String),
    /// A system call failed.
    #[error("{op}: {source}")]
    Sys {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
}

fn sys(op: &'static str) -> impl Fn(io::Error) -> RepairError {
    move |source| RepairError::Sys { op, source }
}

/// The kernel's name of a TCP state number.
pub fn state_name(s: u8) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "UNKNOWN",
    }
}

fn set_repair(fd: BorrowedFd<'_>, value: libc::c_int) -> Result<(), RepairError> {
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, value).map_err(|e| {
        match e.raw_os_error() {
            // Only here does EPERM mean "no CAP_NET_ADMIN".
            Some(libc::EPERM) | Some(libc::EACCES) => RepairError::NotPermitted,
            _ => sys("TCP_REPAIR")(e),
        }
    })
}

fn get_window(fd: BorrowedFd<'_>) -> Result<RepairWindow, RepairError> {
    let (w, len) = getsockopt::<[u32; 5]>(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW)
        .map_err(sys("TCP_REPAIR_WINDOW"))?;
    if len != 20 {
        return Err(RepairError::Sys {
            op: "TCP_REPAIR_WINDOW",
            source: io::Error::new(io::ErrorKind::InvalidData, "unexpected size"),
        });
    }
    Ok(RepairWindow {
        snd_wl1: w[0],
        snd_wnd: w[1],
        max_window: w[2],
        rcv_wnd: w[3],
        rcv_wup: w[4],
    })
}

fn set_window(fd: BorrowedFd<'_>, w: &RepairWindow) -> Result<(), RepairError> {
    let mut win = Vec::with_capacity(20);
    for v in [w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup] {
        win.extend_from_slice(&v.to_ne_bytes());
    }
    setsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, &win)
        .map_err(sys("TCP_REPAIR_WINDOW"))
}

/// A queue's sequence number in repair mode: for the receive queue
/// `rcv_nxt`, for the send queue `write_seq` (its end).
fn queue_seq(fd: BorrowedFd<'_>, queue: libc::c_int) -> Result<u32, RepairError> {
    select_queue(fd, queue)?;
    Ok(get_int(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ")? as u32)
}

/// Sets where an empty queue starts (repair mode, before `connect`).
fn set_queue_seq(fd: BorrowedFd<'_>, queue: libc::c_int, seq: u32) -> Result<(), RepairError> {
    select_queue(fd, queue)?;
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_QUEUE_SEQ,
        seq as libc::c_int,
    )
    .map_err(sys("TCP_QUEUE_SEQ"))
}

fn select_queue(fd: BorrowedFd<'_>, queue: libc::c_int) -> Result<(), RepairError> {
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_QUEUE, queue)
        .map_err(sys("TCP_REPAIR_QUEUE"))
}

fn get_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    op: &'static str,
) -> Result<libc::c_int, RepairError> {
    Ok(getsockopt::<libc::c_int>(fd, level, name)
        .map_err(sys(op))?
        .0)
}

fn queue_len(
    fd: BorrowedFd<'_>,
    request: libc::c_ulong,
    op: &'static str,
) -> Result<usize, RepairError> {
    let n = ioctl_int(fd, request).map_err(sys(op))?;
    usize::try_from(n).map_err(|_| RepairError::Sys {
        op,
        source: io::Error::new(io::ErrorKind::InvalidData, "negative queue size"),
    })
}

/// Reads one queue in repair mode: its sequence number and its `len` bytes.
fn read_queue(
    fd: BorrowedFd<'_>,
    queue: libc::c_int,
    len: usize,
    name: &'static str,
) -> Result<(u32, Vec<u8>), RepairError> {
    let seq = queue_seq(fd, queue)?;
    let mut data = vec![0u8; len + 1];
    let n = if len == 0 {
        0
    } else {
        // A peek in repair mode always starts at the queue's head; one byte
        // more than expected tells whether the queue grew meanwhile.
        recv(fd, &mut data, libc::MSG_PEEK | libc::MSG_DONTWAIT).map_err(sys("recv (peek)"))?
    };
    if n != len {
        return Err(RepairError::QueueChanged(name));
    }
    data.truncate(len);
    Ok((seq, data))
}

/// Whether `socket` is a listening TCP socket (what a zero-downtime
/// restart hands over).
pub fn is_tcp_listener(socket: &impl AsFd) -> bool {
    let fd = socket.as_fd();
    let int = |name| getsockopt::<libc::c_int>(fd, libc::SOL_SOCKET, name).map(|(v, _)| v);
    matches!(int(libc::SO_PROTOCOL), Ok(libc::IPPROTO_TCP))
        && matches!(int(libc::SO_ACCEPTCONN), Ok(v) if v != 0)
}

/// Checks that `fd` is a connected TCP socket and returns its `TCP_INFO`.
fn tcp_info(fd: BorrowedFd<'_>) -> Result<libc::tcp_info, RepairError> {
    let sock = SockRef::from(&fd);
    let ty = sock.r#type().map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTSOCK) => RepairError::NotTcp,
        _ => RepairError::Sys {
            op: "SO_TYPE",
            source: e,
        },
    })?;
    let proto = get_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL, "SO_PROTOCOL")?;
    if ty != Type::STREAM || proto != libc::IPPROTO_TCP {
        return Err(RepairError::NotTcp);
    }
    if get_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN, "SO_ACCEPTCONN")? != 0 {
        return Err(RepairError::Listening);
    }
    let (info, _) = getsockopt::<libc::tcp_info>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
        .map_err(sys("TCP_INFO"))?;
    Ok(info)
}

fn options_of(sock: &SockRef<'_>) -> Result<SocketOptions, RepairError> {
    let secs = |d: io::Result<Duration>, op| d.map(|d| d.as_secs() as u32).map_err(sys(op));
    Ok(SocketOptions {
        nodelay: sock.tcp_nodelay().map_err(sys("TCP_NODELAY"))?,
        keepalive: sock.keepalive().map_err(sys("SO_KEEPALIVE"))?,
        keepidle: secs(sock.tcp_keepalive_time(), "TCP_KEEPIDLE")?,
        keepintvl: secs(sock.tcp_keepalive_interval(), "TCP_KEEPINTVL")?,
        keepcnt: sock.tcp_keepalive_retries().map_err(sys("TCP_KEEPCNT"))?,
        reuseaddr: sock.reuse_address().map_err(sys("SO_REUSEADDR"))?,
        sndbuf: sock.send_buffer_size().map_err(sys("SO_SNDBUF"))? as u32,
        rcvbuf: sock.recv_buffer_size().map_err(sys("SO_RCVBUF"))? as u32,
    })
}

/// Freezes a connected TCP socket and reads everything needed to rebuild
/// it: addresses, state, sequence numbers, the queued data in both
/// directions, the negotiated options, the repair window and the socket
/// options.
///
/// The socket is left in repair mode: closing it now sends neither FIN nor
/// RST (the peer sees nothing), while [`resume`] puts it back to work.
/// Stop the owner first (and, across hosts, the connection's packets): a
/// queue that changes while it is read gives [`RepairError::QueueChanged`],
/// and the socket is resumed.
pub fn checkpoint(socket: &impl AsFd) -> Result<SocketImage, RepairError> {
    let fd = socket.as_fd();
    let info = tcp_info(fd)?;
    let state = TcpState::from_linux(info.tcpi_state)
        .ok_or(RepairError::UnsupportedState(state_name(info.tcpi_state)))?;
    if !matches!(
        state,
        TcpState::Established | TcpState::FinWait1 | TcpState::FinWait2
    ) {
        return Err(RepairError::UnsupportedState(state_name(info.tcpi_state)));
    }
    let reuseaddr = SockRef::from(&fd).reuse_address().unwrap_or(false);
    let was_repairing = get_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, "TCP_REPAIR")? != 0;
    set_repair(fd, TCP_REPAIR_ON)?;
    let image = read_image(fd, state, &info);
    if image.is_err() && !was_repairing {
        let _ = set_repair(fd, TCP_REPAIR_OFF);
        let _ = SockRef::from(&fd).set_reuse_address(reuseaddr);
    }
    image
}

/// Whether a checkpointed socket (still in repair mode) is still as its
/// image says. A socket in repair mode goes on taking in and acknowledging
/// the peer's segments: check this just before closing it, and checkpoint
/// it again (the image would miss what came) when it says `false`.
pub fn unchanged(socket: &impl AsFd, image: &SocketImage) -> Result<bool, RepairError> {
    let fd = socket.as_fd();
    let [state, outq, _, inq, snd, rcv] = queue_marks(fd)?;
    let fin = u64::from(matches!(
        image.state,
        TcpState::FinWait1 | TcpState::FinWait2
    ));
    let queued = (image.sent.len() + image.unsent.len()) as u64;
    Ok(state == u64::from(image.state.to_linux())
        && inq == image.received.len() as u64
        && rcv == u64::from(image.rcv_seq)
        && snd == u64::from(image.snd_seq)
        && outq.saturating_sub(if outq > 0 { fin } else { 0 }) == queued)
}

/// Sizes and sequence numbers of both queues, and the state (raw, as the
/// kernel reports them): read twice to tell whether anything moved.
fn queue_marks(fd: BorrowedFd<'_>) -> Result<[u64; 6], RepairError> {
    let (info, _) = getsockopt::<libc::tcp_info>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
        .map_err(sys("TCP_INFO"))?;
    let snd = queue_seq(fd, TCP_SEND_QUEUE)?;
    Ok([
        u64::from(info.tcpi_state),
        queue_len(fd, SIOCOUTQ, "SIOCOUTQ")? as u64,
        queue_len(fd, SIOCOUTQNSD, "SIOCOUTQNSD")? as u64,
        queue_len(fd, SIOCINQ, "SIOCINQ")? as u64,
        u64::from(snd),
        u64::from(queue_seq(fd, TCP_RECV_QUEUE)?),
    ])
}

fn read_image(
    fd: BorrowedFd<'_>,
    state: TcpState,
    info: &libc::tcp_info,
) -> Result<SocketImage, RepairError> {
    let sock = SockRef::from(&fd);
    let addr =
        |a: io::Result<SockAddr>, op| a.map_err(sys(op))?.as_socket().ok_or(RepairError::NotTcp);
    let local = addr(sock.local_addr(), "getsockname")?;
    let peer = addr(sock.peer_addr(), "getpeername")?;
    // A set SO_PEEK_OFF would move our peeks off the queue heads.
    let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, -1);
    let marks = queue_marks(fd)?;
    if marks[0] != u64::from(info.tcpi_state) {
        return Err(RepairError::QueueChanged("state"));
    }
    let fin_states = matches!(state, TcpState::FinWait1 | TcpState::FinWait2);
    let mut outq = queue_len(fd, SIOCOUTQ, "SIOCOUTQ")?;
    let mut unsent = queue_len(fd, SIOCOUTQNSD, "SIOCOUTQNSD")?;
    let inq = queue_len(fd, SIOCINQ, "SIOCINQ")?;
    if fin_states {
        // Our FIN takes a sequence number but no byte of the queue; when
        // nothing is unsent, it was sent.
        outq = outq.saturating_sub(1);
        unsent = unsent.saturating_sub(1);
    }
    let unsent = unsent.min(outq);
    let (snd_seq, send_q) = read_queue(fd, TCP_SEND_QUEUE, outq, "send")?;
    let (rcv_seq, received) = read_queue(fd, TCP_RECV_QUEUE, inq, "receive")?;
    let mss = get_int(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG, "TCP_MAXSEG")? as u32;
    let timestamp = if info.tcpi_options & TCPI_OPT_TIMESTAMPS != 0 {
        Some(get_int(fd, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP, "TCP_TIMESTAMP")? as u32)
    } else {
        None
    };
    let wscale = (info.tcpi_options & TCPI_OPT_WSCALE != 0).then(|| {
        let b = info.tcpi_snd_rcv_wscale;
        (b & 0x0f, b >> 4)
    });
    let window = get_window(fd)?;
    // Nothing may have moved while we read (data, the peer's FIN, an ACK).
    if queue_marks(fd)? != marks {
        return Err(RepairError::QueueChanged("send or receive"));
    }
    let split = outq - unsent;
    Ok(SocketImage {
        local,
        peer,
        state,
        snd_seq,
        rcv_seq,
        sent: send_q[..split].to_vec(),
        unsent: send_q[split..].to_vec(),
        received,
        mss,
        wscale,
        sack: info.tcpi_options & TCPI_OPT_SACK != 0,
        timestamp,
        window,
        options: options_of(&sock)?,
    })
}

/// Takes a checkpointed socket out of repair mode: it carries on as if
/// nothing happened (e.g. when saving its image failed, or for a
/// snapshot). `image` is its checkpoint (for the options repair mode
/// clears).
pub fn resume(socket: &impl AsFd, image: &SocketImage) -> Result<(), RepairError> {
    let fd = socket.as_fd();
    set_repair(fd, TCP_REPAIR_OFF)?;
    // Leaving repair mode clears SO_REUSEADDR.
    SockRef::from(&fd)
        .set_reuse_address(image.options.reuseaddr)
        .map_err(sys("SO_REUSEADDR"))
}

/// Puts a socket (back) into repair mode so that closing it sends neither
/// FIN nor RST: for a restored socket that cannot be handed on after all
/// (its image still holds the connection).
pub fn abandon(socket: &impl AsFd) -> Result<(), RepairError> {
    set_repair(socket.as_fd(), TCP_REPAIR_ON)
}

/// Rebuilds a socket from its image: bound to the image's local address
/// (which must exist on this host), connected to its peer without a
/// handshake, with its queues, options and window, out of repair mode. The
/// peer sees no reset and no gap. A half-closed image comes back
/// half-closed. On any error nothing is left behind (the new socket is
/// closed silently).
pub fn restore(image: &SocketImage) -> Result<TcpStream, RepairError> {
    check_image(image)?;
    let domain = Domain::for_address(image.local);
    let sock =
        Socket::new(domain, Type::STREAM, Some(socket2::Protocol::TCP)).map_err(sys("socket"))?;
    let fd = sock.as_fd();
    sock.set_reuse_address(true).map_err(sys("SO_REUSEADDR"))?;
    set_repair(fd, TCP_REPAIR_ON)?;
    // From here on, dropping `sock` closes it silently (repair mode).
    rebuild(&sock, image)?;
    set_repair(fd, TCP_REPAIR_OFF)?;
    let mut stream = TcpStream::from(sock);
    if let Err(e) = finish(&mut stream, image) {
        // Back to repair mode: dropping it now says nothing to the peer.
        let _ = abandon(&stream);
        return Err(e);
    }
    Ok(stream)
}

/// After repair mode: the options it clears, the never-sent tail as
/// ordinary writes, then our FIN if it was never sent either.
fn finish(stream: &mut TcpStream, image: &SocketImage) -> Result<(), RepairError> {
    SockRef::from(&*stream)
        .set_reuse_address(image.options.reuseaddr)
        .map_err(sys("SO_REUSEADDR"))?;
    if !image.unsent.is_empty() {
        stream
            .set_write_timeout(Some(UNSENT_TIMEOUT))
            .map_err(sys("SO_SNDTIMEO"))?;
        stream
            .write_all(&image.unsent)
            .map_err(sys("send (unsent data)"))?;
        stream.set_write_timeout(None).map_err(sys("SO_SNDTIMEO"))?;
        if image.state == TcpState::FinWait1 {
            stream
                .shutdown(std::net::Shutdown::Write)
                .map_err(sys("shutdown"))?;
        }
    }
    Ok(())
}

fn check_image(image: &SocketImage) -> Result<(), RepairError> {
    let bad = |s: &str| Err(RepairError::InvalidImage(s.into()));
    if image.local.is_ipv4() != image.peer.is_ipv4() {
        return bad("local and peer addresses of different families");
    }
    if image.wscale.is_some_and(|(s, r)| s > 14 || r > 14) {
        return bad("window scale above 14");
    }
    if !matches!(
        image.state,
        TcpState::Established | TcpState::FinWait1 | TcpState::FinWait2
    ) {
        return Err(RepairError::UnsupportedState(image.state.name()));
    }
    if image.state == TcpState::FinWait2 && !(image.sent.is_empty() && image.unsent.is_empty()) {
        return bad("FIN_WAIT2 with data still queued to send");
    }
    Ok(())
}

fn rebuild(sock: &Socket, image: &SocketImage) -> Result<(), RepairError> {
    let fd = sock.as_fd();
    sock.bind(&image.local.into())
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EADDRNOTAVAIL) => RepairError::AddressNotLocal(image.local),
            Some(libc::EADDRINUSE) => RepairError::AddressInUse(image.local),
            _ => sys("bind")(e),
        })?;
    // Enough buffer for the queues (an explicit size stops autotuning, so
    // only when the default is too small).
    let queued = image.sent.len() + image.unsent.len();
    if queued > sock.send_buffer_size().map_err(sys("SO_SNDBUF"))? {
        let want = (image.options.sndbuf as usize / 2).max(queued);
        sock.set_send_buffer_size(want).map_err(sys("SO_SNDBUF"))?;
    }
    if image.received.len() > sock.recv_buffer_size().map_err(sys("SO_RCVBUF"))? / 2 {
        let want = (image.options.rcvbuf as usize / 2).max(image.received.len() * 2);
        sock.set_recv_buffer_size(want).map_err(sys("SO_RCVBUF"))?;
    }
    // Sequence numbers: the receive queue starts `received` bytes before
    // rcv_nxt, the send queue `sent + unsent` bytes before write_seq (less
    // our FIN's number in the FIN states).
    let fin = u32::from(matches!(
        image.state,
        TcpState::FinWait1 | TcpState::FinWait2
    ));
    let rcv_start = image.rcv_seq.wrapping_sub(image.received.len() as u32);
    let snd_start = image.snd_seq.wrapping_sub(fin).wrapping_sub(queued as u32);
    set_queue_seq(fd, TCP_RECV_QUEUE, rcv_start)?;
    set_queue_seq(fd, TCP_SEND_QUEUE, snd_start)?;
    // In repair mode connect sends no SYN; it still needs a route.
    sock.connect(&image.peer.into())
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EADDRNOTAVAIL) => RepairError::ConnectionExists(image.local, image.peer),
            _ => sys("connect")(e),
        })?;
    let mut opts = Vec::with_capacity(32);
    let mut opt = |code: u32, value: u32| {
        opts.extend_from_slice(&code.to_ne_bytes());
        opts.extend_from_slice(&value.to_ne_bytes());
    };
    opt(TCPOPT_MSS, image.mss);
    if let Some((snd, rcv)) = image.wscale {
        opt(TCPOPT_WINDOW, u32::from(snd) | u32::from(rcv) << 16);
    }
    if image.sack {
        opt(TCPOPT_SACK_PERM, 0);
    }
    if image.timestamp.is_some() {
        opt(TCPOPT_TIMESTAMP, 0);
    }
    setsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_OPTIONS, &opts)
        .map_err(sys("TCP_REPAIR_OPTIONS"))?;
    if let Some(ts) = image.timestamp {
        setsockopt_int(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_TIMESTAMP,
            ts as libc::c_int,
        )
        .map_err(sys("TCP_TIMESTAMP"))?;
    }
    select_queue(fd, TCP_RECV_QUEUE)?;
    fill_queue(fd, &image.received, "send (receive queue)")?;
    select_queue(fd, TCP_SEND_QUEUE)?;
    fill_queue(fd, &image.sent, "send (send queue)")?;
    if fin == 1 && image.unsent.is_empty() {
        // Our FIN was sent: queue it as sent, with the send queue selected.
        sock.shutdown(std::net::Shutdown::Write)
            .map_err(sys("shutdown (repair)"))?;
    }
    set_window(fd, &image.window)?;
    let o = &image.options;
    sock.set_tcp_nodelay(o.nodelay)
        .map_err(sys("TCP_NODELAY"))?;
    if o.keepalive {
        let mut ka = TcpKeepalive::new();
        if o.keepidle > 0 {
            ka = ka.with_time(Duration::from_secs(o.keepidle.into()));
        }
        if o.keepintvl > 0 {
            ka = ka.with_interval(Duration::from_secs(o.keepintvl.into()));
        }
        if o.keepcnt > 0 {
            ka = ka.with_retries(o.keepcnt);
        }
        sock.set_tcp_keepalive(&ka).map_err(sys("SO_KEEPALIVE"))?;
    }
    Ok(())
}

/// Puts `data` into the selected queue in repair mode (partial writes, and
/// smaller pieces when the kernel is short of memory).
fn fill_queue(fd: BorrowedFd<'_>, mut data: &[u8], op: &'static str) -> Result<(), RepairError> {
    let mut chunk = data.len().max(1);
    while !data.is_empty() {
        match send(fd, &data[..chunk.min(data.len())], 0) {
            Ok(0) => {
                return Err(RepairError::Sys {
                    op,
                    source: io::ErrorKind::WriteZero.into(),
                })
            }
            Ok(n) => data = &data[n..],
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && chunk > 1024 => chunk /= 2,
            Err(e) => return Err(sys(op)(e)),
        }
    }
    Ok(())
}
