//! Checkpoint and restore of one kernel TCP socket with `TCP_REPAIR`
//! (docs/architecture.md section 5).
//!
//! Every state of an open connection is supported: ESTABLISHED; the
//! half-closes where only our side closed, FIN_WAIT1 (our FIN not yet
//! acknowledged, or not yet sent) and FIN_WAIT2; and those where the peer's
//! FIN was received, CLOSE_WAIT, LAST_ACK and CLOSING. A received FIN
//! cannot be put into a socket by any socket option: as CRIU does, the
//! restore re-creates it with a raw packet from the peer's address, marked
//! [`crate::lock::LOCK_MARK`] so that a network lock lets it through.
//!
//! Data that was sent but not acknowledged goes back into the socket as
//! sent (the peer may hold it and acknowledge it: the socket must know it
//! was sent); data never sent is written once the socket is live. Under
//! [`crate::process`]'s network lock, what the socket tries to send while
//! the lock drops it is never counted as sent, so it is in the second part
//! and goes out at once after the restore.

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use socket2::{Domain, SockAddr, SockRef, Socket, TcpKeepalive, Type};
use thiserror::Error;

use crate::image::{RepairWindow, SocketImage, SocketOptions, TcpState};
use crate::lock::{Connection, LOCK_MARK};
use crate::sys::{getsockopt, ioctl_int, recv, send, setsockopt_bytes, setsockopt_int};

// Kernel constants libc lacks (include/uapi/linux/tcp.h, sockios.h).
const TCP_REPAIR_ON: libc::c_int = 1;
const TCP_REPAIR_OFF: libc::c_int = 0;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
/// `TCP_LISTEN` of `tcpi_state`.
const TCP_LISTEN: u8 = 10;
const TCPOPT_MSS: u32 = 2;
/// The range TCP_MAXSEG takes (TCP_MIN_MSS, MAX_TCP_WINDOW).
const TCP_MIN_MSS: u32 = 88;
const MAX_TCP_MAXSEG: u32 = 32767;
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

/// How long a just-closed socket of the same connection may linger.
const CLOSE_GRACE: Duration = Duration::from_millis(50);

/// How far (in milliseconds) a restored socket's timestamp clock starts
/// ahead of the value read at checkpoint.
///
/// A peer drops, as old (PAWS, RFC 7323), every segment whose timestamp is
/// more than one below the newest it accepted. `TCP_TIMESTAMP` reads the
/// socket's clock, but a paced socket (BBR, fq) stamps its segments with
/// their departure time, which runs ahead of that clock: 36 ms ahead was
/// seen here, with the echo server's backlog sent at a restored socket's
/// first pacing rate. Restored at the clock's value, the socket's data was
/// dropped by the peer until its first retransmission timeout (1 s, with no
/// round-trip estimate yet): the ~1 s stalls of BENCHMARKS.md (the peer
/// counted them as `PAWSEstab`). Timestamps only have to grow: the peer
/// takes a jump forward as it is (it echoes it back; nothing measures the
/// gap), and one second is far above any pacing lead.
const TS_AHEAD: u32 = 1000;

/// How long a re-created FIN may take to reach the restored socket.
const FIN_TIMEOUT: Duration = Duration::from_secs(1);

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
    #[error("TCP state {0} cannot be moved (a connection that is open, or half-closed, can)")]
    UnsupportedState(&'static str),
    /// The peer's FIN, re-created with a raw packet, did not take: the
    /// restored socket did not reach the image's state.
    #[error("the re-created FIN of the peer was not taken: state {got} instead of {want}")]
    FinNotTaken {
        /// The state expected.
        want: &'static str,
        /// The state reached.
        got: &'static str,
    },
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
    #[error("the {0} changed while it was read (stop the owner and its traffic)")]
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
    // SO_PROTOCOL says TCP only for TCP sockets and raw sockets of
    // IPPROTO_TCP, which have no TCP_INFO.
    let proto = getsockopt::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTSOCK) => RepairError::NotTcp,
            _ => sys("SO_PROTOCOL")(e),
        })?
        .0;
    if proto != libc::IPPROTO_TCP {
        return Err(RepairError::NotTcp);
    }
    let (info, _) =
        getsockopt::<libc::tcp_info>(fd, libc::IPPROTO_TCP, libc::TCP_INFO).map_err(|e| match e
            .raw_os_error()
        {
            Some(libc::ENOPROTOOPT | libc::EOPNOTSUPP) => RepairError::NotTcp,
            _ => sys("TCP_INFO")(e),
        })?;
    // (What SO_ACCEPTCONN says, without asking again.)
    if info.tcpi_state == TCP_LISTEN {
        return Err(RepairError::Listening);
    }
    Ok(info)
}

/// The socket options of `sock`; `reuseaddr` as read before repair mode
/// (which reports it set; see [`checkpoint`] for a socket already in it).
///
/// The keepalive timings are read only when keepalive is on: the restore
/// sets them only then (0 in the image: not read).
fn options_of(sock: &SockRef<'_>, reuseaddr: bool) -> Result<SocketOptions, RepairError> {
    let secs = |d: io::Result<Duration>, op| d.map(|d| d.as_secs() as u32).map_err(sys(op));
    let keepalive = sock.keepalive().map_err(sys("SO_KEEPALIVE"))?;
    let (keepidle, keepintvl, keepcnt) = if keepalive {
        (
            secs(sock.tcp_keepalive_time(), "TCP_KEEPIDLE")?,
            secs(sock.tcp_keepalive_interval(), "TCP_KEEPINTVL")?,
            sock.tcp_keepalive_retries().map_err(sys("TCP_KEEPCNT"))?,
        )
    } else {
        (0, 0, 0)
    };
    let (sndbuf, rcvbuf) = buffer_sizes(sock)?;
    Ok(SocketOptions {
        nodelay: sock.tcp_nodelay().map_err(sys("TCP_NODELAY"))?,
        keepalive,
        keepidle,
        keepintvl,
        keepcnt,
        reuseaddr,
        sndbuf: sndbuf as u32,
        rcvbuf: rcvbuf as u32,
    })
}

/// `SO_MEMINFO` (include/uapi/asm-generic/socket.h; libc lacks it). Its
/// number differs on a few architectures, where [`buffer_sizes`] does
/// without it.
#[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
const SO_MEMINFO: libc::c_int = 55;

/// A socket's `SO_SNDBUF` and `SO_RCVBUF`, in one call: `SO_MEMINFO`
/// reports both (`SK_MEMINFO_SNDBUF`, `SK_MEMINFO_RCVBUF`: the same fields
/// the two options read), else one call each.
fn buffer_sizes(sock: &SockRef<'_>) -> Result<(usize, usize), RepairError> {
    #[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
    if let Ok((m, len)) = getsockopt::<[u32; 4]>(sock.as_fd(), libc::SOL_SOCKET, SO_MEMINFO) {
        if len == 16 {
            let at = |i: libc::c_int| m[i as usize] as usize;
            return Ok((at(libc::SK_MEMINFO_SNDBUF), at(libc::SK_MEMINFO_RCVBUF)));
        }
    }
    Ok((
        sock.send_buffer_size().map_err(sys("SO_SNDBUF"))?,
        sock.recv_buffer_size().map_err(sys("SO_RCVBUF"))?,
    ))
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
///
/// A socket checkpointed again while still in repair mode reads
/// `SO_REUSEADDR` as set (repair mode forces it): the second image says
/// `reuseaddr` whatever the application chose, so keep the first image's.
pub fn checkpoint(socket: &impl AsFd) -> Result<SocketImage, RepairError> {
    let fd = socket.as_fd();
    let info = tcp_info(fd)?;
    let state = TcpState::from_linux(info.tcpi_state)
        .ok_or(RepairError::UnsupportedState(state_name(info.tcpi_state)))?;
    // Repair mode makes SO_REUSEADDR read as set (the kernel forces it):
    // a socket that reads it clear is not in repair mode, without asking.
    // (Only another program that froze the socket and then cleared the
    // option could make this wrong; a failed checkpoint would then take
    // the socket out of repair mode.)
    let reuseaddr = get_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, "SO_REUSEADDR")? != 0;
    let was_repairing =
        reuseaddr && get_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, "TCP_REPAIR")? != 0;
    set_repair(fd, TCP_REPAIR_ON)?;
    let image = read_image(fd, state, &info, reuseaddr);
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
    let fin = u64::from(fin_out(image.state));
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

/// What a connection's queues are, as far as one `TCP_INFO` read tells:
/// the state (a FIN), the bytes received (`rcv_nxt`) and acknowledged
/// (`snd_una`), those not yet sent (`write_seq - snd_nxt`), and the peer's
/// window. With the lengths of the receive queue (`rcv_nxt - copied_seq`)
/// and of the send queue (`write_seq - snd_una`), it pins both queues:
/// [`read_image`] compares them before and after it reads the queues.
fn movement(fd: BorrowedFd<'_>) -> Result<[u64; 5], RepairError> {
    let (info, _) = getsockopt::<libc::tcp_info>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
        .map_err(sys("TCP_INFO"))?;
    Ok(movement_of(&info))
}

/// [`movement`] from a `TCP_INFO` already read.
fn movement_of(info: &libc::tcp_info) -> [u64; 5] {
    [
        u64::from(info.tcpi_state),
        info.tcpi_bytes_received,
        info.tcpi_bytes_acked,
        u64::from(info.tcpi_notsent_bytes),
        u64::from(info.tcpi_snd_wnd),
    ]
}

fn read_image(
    fd: BorrowedFd<'_>,
    state: TcpState,
    info: &libc::tcp_info,
    reuseaddr: bool,
) -> Result<SocketImage, RepairError> {
    let sock = SockRef::from(&fd);
    let addr =
        |a: io::Result<SockAddr>, op| a.map_err(sys(op))?.as_socket().ok_or(RepairError::NotTcp);
    let local = addr(sock.local_addr(), "getsockname")?;
    let peer = addr(sock.peer_addr(), "getpeername")?;
    // A set SO_PEEK_OFF would move our peeks off the queue heads.
    let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, -1);
    // The marks everything read is compared with: the `TCP_INFO` read
    // before repair mode (a longer span to watch than from here on, so
    // nothing that moves while the queues are read goes unseen).
    let marks = movement_of(info);
    let fin_states = fin_out(state);
    let outq_marked = queue_len(fd, SIOCOUTQ, "SIOCOUTQ")?;
    let mut outq = outq_marked;
    // Not yet sent (`write_seq - snd_nxt`, what SIOCOUTQNSD reads), as
    // the marks say. Read before repair mode, it can only be larger than
    // now: bytes sent since (or counted as sent without having been sent,
    // see below) stay unsent in the image, and the restore sends them
    // again under the same sequence numbers. (Under the network lock
    // nothing of ours reaches the peer meanwhile; without it, the peer may
    // acknowledge such bytes before the restored socket has written them
    // again, and that acknowledgement is dropped as one for data not yet
    // sent.)
    let mut unsent = usize::try_from(marks[3]).unwrap_or(usize::MAX);
    let inq = queue_len(fd, SIOCINQ, "SIOCINQ")?;
    if fin_states {
        // Our FIN takes a sequence number but no byte of the queue; when
        // nothing is unsent, it was sent.
        outq = outq.saturating_sub(1);
        unsent = unsent.saturating_sub(1);
    }
    let unsent = unsent.min(outq);
    // The receive queue last, and left selected: with the send queue
    // selected, a transmission in repair mode (a timer's) would count data
    // as sent without sending it.
    let (snd_seq, send_q) = read_queue(fd, TCP_SEND_QUEUE, outq, "send queue")?;
    let (rcv_seq, received) = read_queue(fd, TCP_RECV_QUEUE, inq, "receive queue")?;
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
    // Nothing may have moved while we read (data, the peer's FIN, an ACK,
    // a read or write by the owner): with `snd_una` (bytes acknowledged)
    // pinned, SIOCOUTQ pins the send queue's end.
    let now = movement(fd)?;
    let rcv_moved = now[1] != marks[1] || queue_len(fd, SIOCINQ, "SIOCINQ")? != inq;
    // Less unsent than before (and the same queue) is no change: with the
    // send queue selected in repair mode, a transmission the kernel had
    // deferred (pacing, small queues) runs at the end of our own call and
    // counts data as sent without sending it (or, without a lock, sends
    // it). The image keeps it unsent: the restore sends it (again, under
    // the same sequence numbers, which a peer that has it ignores).
    let snd_moved = now[2] != marks[2]
        || now[3] > marks[3]
        || queue_len(fd, SIOCOUTQ, "SIOCOUTQ")? != outq_marked;
    match (now[0] != marks[0], rcv_moved, snd_moved, now[4] != marks[4]) {
        (true, ..) => return Err(RepairError::QueueChanged("state")),
        (_, true, true, _) => return Err(RepairError::QueueChanged("send and receive queues")),
        (_, true, _, _) => return Err(RepairError::QueueChanged("receive queue")),
        (_, _, true, _) => return Err(RepairError::QueueChanged("send queue")),
        (.., true) => return Err(RepairError::QueueChanged("peer's window")),
        _ => {}
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
        options: options_of(&sock, reuseaddr)?,
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

/// Ends a checkpointed socket (in repair mode) at once, for every process
/// that holds it, silently: `connect(AF_UNSPEC)`, whose disconnect sends
/// no reset in repair mode, takes the connection out of the kernel's tables
/// so that its restore on this host need not wait until the last holder
/// closes it. The socket must be in repair mode (see [`checkpoint`]).
pub fn disconnect_silently(socket: &impl AsFd) -> Result<(), RepairError> {
    let fd = socket.as_fd();
    if get_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, "TCP_REPAIR")? == 0 {
        return Err(RepairError::Sys {
            op: "disconnect",
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "not in repair mode: a disconnect would reset the connection",
            ),
        });
    }
    rustix::net::connect_unspec(fd).map_err(|e| sys("connect (AF_UNSPEC)")(e.into()))
}

/// Whether our FIN is part of the state (sent, or at least queued).
fn fin_out(state: TcpState) -> bool {
    matches!(
        state,
        TcpState::FinWait1 | TcpState::FinWait2 | TcpState::Closing | TcpState::LastAck
    )
}

/// Whether the peer's FIN was received.
fn fin_in(state: TcpState) -> bool {
    matches!(
        state,
        TcpState::CloseWait | TcpState::LastAck | TcpState::Closing
    )
}

/// The connection of a socket that [`checkpoint`] can take: a connected
/// TCP socket in a state it supports. Reads only (no repair mode): what a
/// network lock needs before the socket is frozen.
pub fn connection(socket: &impl AsFd) -> Result<Connection, RepairError> {
    let fd = socket.as_fd();
    let info = tcp_info(fd)?;
    TcpState::from_linux(info.tcpi_state)
        .ok_or(RepairError::UnsupportedState(state_name(info.tcpi_state)))?;
    let sock = SockRef::from(&fd);
    let addr =
        |a: io::Result<SockAddr>, op| a.map_err(sys(op))?.as_socket().ok_or(RepairError::NotTcp);
    Ok(Connection {
        local: addr(sock.local_addr(), "getsockname")?,
        peer: addr(sock.peer_addr(), "getpeername")?,
    })
}

/// Lets the send queue of a live socket grow by what its owner may have to
/// answer to everything it can receive (`SO_SNDBUFFORCE` to its send
/// buffer plus four times its receive buffer, for the kernel's per-packet
/// overhead, and at least 32 MiB more; this also ends the automatic sizing
/// of the send buffer; only what is queued takes memory).
/// While a network lock holds, nothing the socket sends is acknowledged,
/// and the peer cannot send more than the receive buffer holds: this gives
/// an owner that answers what it receives (an echo, a proxy) room to write
/// its answers, instead of blocking with them in its own memory.
pub fn reserve_send_buffer(socket: &impl AsFd) -> Result<(), RepairError> {
    let sock = SockRef::from(socket);
    let snd = sock.send_buffer_size().map_err(sys("SO_SNDBUF"))?;
    let rcv = sock.recv_buffer_size().map_err(sys("SO_RCVBUF"))?;
    // The kernel doubles the value it is given. The receive buffer may
    // still grow (autotuning) while the peer sends: at least 32 MiB more.
    let half = (snd / 2).saturating_add(rcv.saturating_mul(2).max(16 << 20));
    let half = libc::c_int::try_from(half).unwrap_or(libc::c_int::MAX / 2);
    setsockopt_int(socket.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, half)
        .map_err(sys("SO_SNDBUFFORCE"))
}

/// Whether a write to the socket would not block now (its owner is not
/// held up by a full send queue).
pub fn writable(socket: &impl AsFd) -> Result<bool, RepairError> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(socket, PollFlags::OUT)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let n = poll(&mut fds, Some(&zero)).map_err(|e| sys("poll")(e.into()))?;
    Ok(n == 1 && fds[0].revents().contains(PollFlags::OUT))
}

/// The kernel's name of a TCP socket's state now (`"ESTABLISHED"`,
/// `"CLOSE"` once both sides finished, ...).
pub fn tcp_state(socket: &impl AsFd) -> Result<&'static str, RepairError> {
    let (info, _) = getsockopt::<libc::tcp_info>(socket.as_fd(), libc::IPPROTO_TCP, libc::TCP_INFO)
        .map_err(sys("TCP_INFO"))?;
    Ok(state_name(info.tcpi_state))
}

/// Bytes waiting to be read from a socket or a pipe (`FIONREAD`).
pub fn unread(fd: &impl AsFd) -> Result<usize, RepairError> {
    queue_len(fd.as_fd(), SIOCINQ, "FIONREAD")
}

/// The socket's smoothed round-trip time (`tcpi_rtt`).
pub fn smoothed_rtt(socket: &impl AsFd) -> Result<Duration, RepairError> {
    let (info, _) = getsockopt::<libc::tcp_info>(socket.as_fd(), libc::IPPROTO_TCP, libc::TCP_INFO)
        .map_err(sys("TCP_INFO"))?;
    Ok(Duration::from_micros(info.tcpi_rtt.into()))
}

/// Bytes received on a socket so far (`tcpi_bytes_received`): a peer that
/// still sends makes it grow.
pub fn bytes_received(socket: &impl AsFd) -> Result<u64, RepairError> {
    let (info, _) = getsockopt::<libc::tcp_info>(socket.as_fd(), libc::IPPROTO_TCP, libc::TCP_INFO)
        .map_err(sys("TCP_INFO"))?;
    Ok(info.tcpi_bytes_received)
}

/// Rebuilds a socket from its image: bound to the image's local address
/// (which must exist on this host), connected to its peer without a
/// handshake, with its queues, options and window, out of repair mode. The
/// peer sees no reset and no gap. A half-closed image comes back
/// half-closed. On any error nothing is left behind (the new socket is
/// closed silently).
///
/// This is [`prepare`] then [`Prepared::go_live`]; a network lock must be
/// lifted between the two (see [`crate::process::restore_all`]).
pub fn restore(image: &SocketImage) -> Result<TcpStream, RepairError> {
    prepare(image)?.go_live()
}

/// A socket rebuilt from its image, still in repair mode: it sends nothing
/// yet, and dropping it closes it silently.
#[derive(Debug)]
pub struct Prepared<'a> {
    socket: Socket,
    image: &'a SocketImage,
}

/// The first half of [`restore`]: a new socket in repair mode with the
/// image's addresses, sequence numbers, options, receive queue and window.
pub fn prepare(image: &SocketImage) -> Result<Prepared<'_>, RepairError> {
    check_image(image)?;
    let domain = Domain::for_address(image.local);
    let sock =
        Socket::new(domain, Type::STREAM, Some(socket2::Protocol::TCP)).map_err(sys("socket"))?;
    // (Repair mode lets the bind below reuse the address: the kernel
    // forces SO_REUSEADDR on with it.)
    set_repair(sock.as_fd(), TCP_REPAIR_ON)?;
    // From here on, dropping `sock` closes it silently (repair mode).
    rebuild(&sock, image)?;
    Ok(Prepared {
        socket: sock,
        image,
    })
}

impl Prepared<'_> {
    /// The second half of [`restore`]: out of repair mode (the kernel sends
    /// a window probe, whose answer tells the socket where the peer is),
    /// the peer's FIN re-created if it had been received, the data never
    /// sent written, and our FIN sent again if it was not acknowledged. On error the socket is put
    /// back into repair mode and closed silently.
    pub fn go_live(self) -> Result<TcpStream, RepairError> {
        let image = self.image;
        set_repair(self.socket.as_fd(), TCP_REPAIR_OFF)?;
        let mut stream = TcpStream::from(self.socket);
        if let Err(e) = finish(&mut stream, image) {
            // Back to repair mode: dropping it now says nothing to the peer.
            let _ = abandon(&stream);
            return Err(e);
        }
        Ok(stream)
    }
}

/// After repair mode: the options it clears, the peer's FIN, the queued
/// data as ordinary writes, then our FIN.
fn finish(stream: &mut TcpStream, image: &SocketImage) -> Result<(), RepairError> {
    // Leaving repair mode cleared SO_REUSEADDR.
    if image.options.reuseaddr {
        SockRef::from(&*stream)
            .set_reuse_address(true)
            .map_err(sys("SO_REUSEADDR"))?;
    }
    let fin = u32::from(fin_out(image.state));
    let queued = image.sent.len() + image.unsent.len();
    let snd_una = image.snd_seq.wrapping_sub(fin).wrapping_sub(queued as u32);
    if matches!(image.state, TcpState::CloseWait | TcpState::LastAck) {
        // ESTABLISHED -> CLOSE_WAIT, before anything of ours is sent.
        inject_fin(stream.as_fd(), image, snd_una)?;
        wait_state(stream, &[TcpState::CloseWait.to_linux()], "CLOSE_WAIT")?;
    }
    // Before anything else of ours goes out, an acknowledgement the peer
    // reads (see `send_ack`). Not where the socket itself acknowledges at
    // once: the re-created FIN of CLOSE_WAIT and CLOSING, our FIN of
    // FIN_WAIT1 and LAST_ACK. Best effort: the connection is whole without
    // it, only the peer may wait for its timeout.
    let snd_nxt = match image.state {
        TcpState::Established => Some(image.snd_seq.wrapping_sub(image.unsent.len() as u32)),
        TcpState::FinWait2 => Some(image.snd_seq),
        _ => None,
    };
    if let Some(snd_nxt) = snd_nxt {
        let _ = send_ack(stream, image, snd_nxt);
    }
    if !image.unsent.is_empty() {
        // Room for the whole queue at once, so that writing it never waits
        // for the peer (an explicit size stops autotuning: only when the
        // default is too small).
        let sock = SockRef::from(&*stream);
        if queued > sock.send_buffer_size().map_err(sys("SO_SNDBUF"))? {
            let want = libc::c_int::try_from(queued).unwrap_or(libc::c_int::MAX / 2);
            setsockopt_int(stream.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want)
                .map_err(sys("SO_SNDBUFFORCE"))?;
        }
        stream
            .set_write_timeout(Some(UNSENT_TIMEOUT))
            .map_err(sys("SO_SNDTIMEO"))?;
        stream
            .write_all(&image.unsent)
            .map_err(sys("send (unsent data)"))?;
        stream.set_write_timeout(None).map_err(sys("SO_SNDTIMEO"))?;
    }
    if fin == 1 && image.state != TcpState::FinWait2 {
        // FIN_WAIT1 / LAST_ACK / CLOSING: our FIN, not acknowledged, goes
        // out again after the data.
        stream
            .shutdown(std::net::Shutdown::Write)
            .map_err(sys("shutdown"))?;
    }
    if image.state == TcpState::Closing {
        // FIN_WAIT1 -> CLOSING (or on, if the peer's ACK of our FIN came
        // first: FIN_WAIT2 -> TIME_WAIT).
        inject_fin(stream.as_fd(), image, snd_una)?;
        wait_state(stream, &[11, 6, 7], "CLOSING")?;
    }
    Ok(())
}

/// Waits (at most a second) until the socket is in one of `states`.
fn wait_state(stream: &TcpStream, states: &[u8], want: &'static str) -> Result<(), RepairError> {
    let start = std::time::Instant::now();
    loop {
        let (info, _) =
            getsockopt::<libc::tcp_info>(stream.as_fd(), libc::IPPROTO_TCP, libc::TCP_INFO)
                .map_err(sys("TCP_INFO"))?;
        if states.contains(&info.tcpi_state) {
            return Ok(());
        }
        if start.elapsed() > FIN_TIMEOUT {
            return Err(RepairError::FinNotTaken {
                want,
                got: state_name(info.tcpi_state),
            });
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Sends the peer's FIN to the restored socket, as the peer sent it: from
/// the peer's address and port, sequence number the image's `rcv_seq - 1`,
/// acknowledging `ack` (which acknowledges nothing new), through a raw
/// socket whose packets carry [`LOCK_MARK`].
fn inject_fin(via: BorrowedFd<'_>, image: &SocketImage, ack: u32) -> Result<(), RepairError> {
    let window = image.window.snd_wnd >> image.wscale.map_or(0, |(snd, _)| snd);
    let tcp = tcp_segment(
        image.peer,
        image.local,
        (image.rcv_seq.wrapping_sub(1), ack),
        TCP_FIN | TCP_ACK,
        window.min(0xffff) as u16,
        &[],
    );
    send_raw(via, image.peer, image.local, &tcp)
}

/// Sends the peer, from the restored (live) socket's address, the
/// acknowledgement that socket would send: sequence number `snd_nxt`,
/// acknowledging the image's `rcv_seq`, the window the old socket last
/// advertised (same right edge), and the timestamp the socket's clock was
/// set to when timestamps are on (echoing 0, as the restored socket itself
/// does until it hears from the peer: repair mode does not restore the
/// peer's last timestamp).
///
/// Why: on leaving repair mode the kernel sends a window probe, whose
/// sequence number is one before `snd_una`, so the peer drops it as old
/// without reading its acknowledgement (and answers at most twice a
/// second, `tcp_invalid_ratelimit`). Under a network lock the peer has not
/// seen what arrived after our packets were held back acknowledged: until
/// something of ours in its window says so, a peer whose window is out
/// waits for its retransmission timeout (200 ms or more), and a peer whose
/// later packets the lock dropped cannot learn that (see
/// [`crate::process`]). A socket that has data to send says so with it;
/// one that only receives would say nothing.
fn send_ack(stream: &TcpStream, image: &SocketImage, snd_nxt: u32) -> Result<(), RepairError> {
    let rcv_wscale = image.wscale.map_or(0, |(_, rcv)| rcv);
    let right_edge = image.window.rcv_wup.wrapping_add(image.window.rcv_wnd);
    let window = (right_edge.wrapping_sub(image.rcv_seq) as i32).max(0) as u32;
    let mut options = Vec::new();
    if let Some(now) = restored_clock(image) {
        // The clock as the restore set it, a moment ago (not read again:
        // one system call less): above anything the old socket sent (see
        // TS_AHEAD) and not above what the socket sends next, which is
        // what the peer's check (PAWS) needs. (The window probe sent as
        // repair mode ended carries a later value, but the peer drops it
        // as old before taking its timestamp.)
        // NOP, NOP, timestamps (kind 8, length 10): TSval, TSecr.
        options.extend_from_slice(&[1, 1, 8, 10]);
        options.extend_from_slice(&now.to_be_bytes());
        options.extend_from_slice(&0u32.to_be_bytes());
    }
    let tcp = tcp_segment(
        image.local,
        image.peer,
        (snd_nxt, image.rcv_seq),
        TCP_ACK,
        (window >> rcv_wscale).min(0xffff) as u16,
        &options,
    );
    send_raw(stream.as_fd(), image.local, image.peer, &tcp)
}

/// Sends the TCP segment `tcp` from `src` to `dst` through a raw socket
/// whose packets carry [`LOCK_MARK`] (a network lock lets them through), in
/// the network namespace of `via` (the restored socket).
///
/// The raw socket is kept for the next segment (one per address family and
/// thread, for the namespace it was made in, compared by its cookie):
/// making one costs more than the rest of a restore (about 20 us per
/// socket in `migratory bench sock`).
fn send_raw(
    via: BorrowedFd<'_>,
    src: SocketAddr,
    dst: SocketAddr,
    tcp: &[u8],
) -> Result<(), RepairError> {
    let (domain, packet) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (Domain::IPV4, ipv4_packet(s, d, tcp)),
        (IpAddr::V6(s), IpAddr::V6(d)) => (Domain::IPV6, ipv6_packet(s, d, tcp)),
        _ => return Err(RepairError::InvalidImage("mixed address families".into())),
    };
    let to: SockAddr = SocketAddr::new(dst.ip(), 0).into();
    let send = |raw: &Socket| {
        raw.send_to(&packet, &to)
            .map(drop)
            .map_err(sys("send (raw TCP segment)"))
    };
    let Some(netns) = netns_cookie(via) else {
        // (A kernel without namespace cookies, before 5.14.)
        return send(&raw_socket(domain)?);
    };
    let slot = usize::from(domain == Domain::IPV6);
    RAW.with(|cache| {
        let mut cache = cache.borrow_mut();
        if !matches!(&cache[slot], Some((cookie, _)) if *cookie == netns) {
            let raw = raw_socket(domain)?;
            if netns_cookie(raw.as_fd()) != Some(netns) {
                // This thread is in another namespace than `via`: as
                // before, from here (not kept).
                return send(&raw);
            }
            cache[slot] = Some((netns, raw));
        }
        match &cache[slot] {
            Some((_, raw)) => send(raw),
            None => unreachable!("filled above"),
        }
    })
}

thread_local! {
    /// [`send_raw`]'s raw sockets: IPv4, IPv6, each with the cookie of its
    /// network namespace.
    static RAW: std::cell::RefCell<[Option<(u64, Socket)>; 2]> =
        const { std::cell::RefCell::new([None, None]) };
}

/// `SO_NETNS_COOKIE` (include/uapi/asm-generic/socket.h; libc lacks it on
/// some targets).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace `fd` belongs to (unique while the
/// system runs), if the kernel tells it (5.14 and later).
fn netns_cookie(fd: BorrowedFd<'_>) -> Option<u64> {
    match getsockopt::<u64>(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE) {
        Ok((cookie, 8)) => Some(cookie),
        _ => None,
    }
}

/// A raw socket that sends whole IP packets (ours carry TCP) marked
/// [`LOCK_MARK`]. Of protocol `IPPROTO_RAW`: it includes the IP header
/// itself and receives nothing (a raw socket of `IPPROTO_TCP` would be
/// handed a copy of every TCP packet the namespace receives for as long as
/// it is kept).
fn raw_socket(domain: Domain) -> Result<Socket, RepairError> {
    let raw = Socket::new(
        domain,
        Type::RAW,
        Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
    )
    .map_err(sys("socket (raw)"))?;
    raw.set_mark(LOCK_MARK).map_err(sys("SO_MARK"))?;
    Ok(raw)
}

/// TCP header flags.
const TCP_FIN: u8 = 0x01;
const TCP_ACK: u8 = 0x10;

/// A TCP segment without data from `src` to `dst`: `(seq, ack)`, `flags`,
/// `window`, `options` (a multiple of four bytes), and its checksum over
/// the pseudo-header.
fn tcp_segment(
    src: SocketAddr,
    dst: SocketAddr,
    (seq, ack): (u32, u32),
    flags: u8,
    window: u16,
    options: &[u8],
) -> Vec<u8> {
    debug_assert!(options.len() % 4 == 0 && options.len() <= 40);
    let mut h = Vec::with_capacity(20 + options.len());
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h.extend_from_slice(&seq.to_be_bytes());
    h.extend_from_slice(&ack.to_be_bytes());
    h.push((5 + options.len() as u8 / 4) << 4); // data offset, in words
    h.push(flags);
    h.extend_from_slice(&window.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    h.extend_from_slice(options);
    let mut pseudo = Vec::with_capacity(40 + h.len());
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
            pseudo.extend_from_slice(&(h.len() as u16).to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            pseudo.extend_from_slice(&v6(s));
            pseudo.extend_from_slice(&v6(d));
            pseudo.extend_from_slice(&(h.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, libc::IPPROTO_TCP as u8]);
        }
    }
    pseudo.extend_from_slice(&h);
    let sum = checksum(&pseudo);
    h[16..18].copy_from_slice(&sum.to_be_bytes());
    h
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet around `payload` (the kernel fills in the header
/// checksum and, if zero, the id).
fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(20 + payload.len());
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0]); // id, don't fragment
    p.extend_from_slice(&[64, libc::IPPROTO_TCP as u8, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// An IPv6 packet around `payload`.
fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(40 + payload.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[libc::IPPROTO_TCP as u8, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

fn check_image(image: &SocketImage) -> Result<(), RepairError> {
    let bad = |s: &str| Err(RepairError::InvalidImage(s.into()));
    if image.local.is_ipv4() != image.peer.is_ipv4() {
        return bad("local and peer addresses of different families");
    }
    if image.wscale.is_some_and(|(s, r)| s > 14 || r > 14) {
        return bad("window scale above 14");
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
    // Enough buffer for the queues filled in repair mode (an explicit size
    // stops autotuning, so only when the default is too small; forced past
    // rmem_max/wmem_max, as the old socket's queues were). The unsent data
    // gets its room once the socket is live.
    let (sndbuf, rcvbuf) = if image.sent.is_empty() && image.received.is_empty() {
        (0, 0)
    } else {
        buffer_sizes(&SockRef::from(sock))?
    };
    if image.sent.len() > sndbuf {
        let want = libc::c_int::try_from(image.sent.len()).unwrap_or(libc::c_int::MAX / 2);
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want)
            .map_err(sys("SO_SNDBUFFORCE"))?;
    }
    let queued = image.sent.len() + image.unsent.len();
    if image.received.len() > rcvbuf / 2 {
        let want = (image.options.rcvbuf as usize / 2).max(image.received.len() * 2);
        let want = libc::c_int::try_from(want).unwrap_or(libc::c_int::MAX);
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, want)
            .map_err(sys("SO_RCVBUFFORCE"))?;
    }
    // Sequence numbers: the receive queue starts `received` bytes before
    // rcv_nxt (less the peer's FIN, re-created after repair mode); the send
    // queue starts at snd_una, `sent + unsent` bytes before write_seq (less
    // our FIN).
    let rcv_start = image
        .rcv_seq
        .wrapping_sub(u32::from(fin_in(image.state)))
        .wrapping_sub(image.received.len() as u32);
    let snd_start = image
        .snd_seq
        .wrapping_sub(u32::from(fin_out(image.state)))
        .wrapping_sub(queued as u32);
    // The receive queue last: it stays selected (nothing below selects
    // another) until it is filled after `connect`.
    set_queue_seq(fd, TCP_SEND_QUEUE, snd_start)?;
    set_queue_seq(fd, TCP_RECV_QUEUE, rcv_start)?;
    // The segment size is fixed at `connect` from the MSS clamp, which
    // TCP_REPAIR_OPTIONS can only set afterwards: without this the restored
    // socket sends 536-byte segments (524 with timestamps) for good, as
    // `ss -ti` showed. TCP_MAXSEG before `connect` becomes the clamp there
    // (it takes at most MAX_TCP_WINDOW, 32767: loopback's 65483 is cut to
    // that).
    if image.mss >= TCP_MIN_MSS {
        let mss = image.mss.min(MAX_TCP_MAXSEG) as libc::c_int;
        setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG, mss).map_err(sys("TCP_MAXSEG"))?;
    }
    // In repair mode connect sends no SYN; it still needs a route. A
    // socket of this connection closed a moment ago (silently, in repair
    // mode) can take a little while to leave the kernel's table: try again
    // for a short while before saying it still exists.
    let start = std::time::Instant::now();
    loop {
        match sock.connect(&image.peer.into()) {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                if start.elapsed() >= CLOSE_GRACE {
                    return Err(RepairError::ConnectionExists(image.local, image.peer));
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            Err(e) => return Err(sys("connect")(e)),
        }
    }
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
    if let Some(ts) = restored_clock(image) {
        setsockopt_int(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_TIMESTAMP,
            ts as libc::c_int,
        )
        .map_err(sys("TCP_TIMESTAMP"))?;
    }
    // (The receive queue is still selected, from `set_queue_seq`.)
    fill_queue(fd, &image.received, "send (receive queue)")?;
    select_queue(fd, TCP_SEND_QUEUE)?;
    fill_queue(fd, &image.sent, "send (send queue)")?;
    if image.state == TcpState::FinWait2 {
        // Our FIN was sent and acknowledged: queue it as sent, with the
        // send queue selected (the window probe's answer acknowledges it).
        sock.shutdown(std::net::Shutdown::Write)
            .map_err(sys("shutdown (repair)"))?;
    }
    // The kernel refuses a window update point past rcv_nxt: without the
    // peer's FIN (re-created later), rcv_nxt is one less than it was.
    let mut window = image.window;
    let rcv_nxt = rcv_start.wrapping_add(image.received.len() as u32);
    if (window.rcv_wup.wrapping_sub(rcv_nxt) as i32) > 0 {
        window.rcv_wup = rcv_nxt;
    }
    set_window(fd, &window)?;
    let o = &image.options;
    if o.nodelay {
        // (Off in a new socket.)
        sock.set_tcp_nodelay(true).map_err(sys("TCP_NODELAY"))?;
    }
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

/// The timestamp clock a restored socket starts at: ahead of the
/// checkpoint's (see [`TS_AHEAD`]). The low bit says whether the clock
/// counts microseconds (kept as it is).
fn restored_clock(image: &SocketImage) -> Option<u32> {
    let ts = image.timestamp?;
    let ahead = if ts & 1 == 1 {
        TS_AHEAD * 1000
    } else {
        TS_AHEAD
    };
    Some(ts.wrapping_add(ahead) & !1 | ts & 1)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn wait_until(mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A checkpointed socket disconnected in repair mode: the peer hears
    /// nothing, and the connection can be restored at once though the old
    /// socket is still open.
    #[test]
    fn a_disconnected_checkpoint_restores_at_once_and_silently() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root (TCP_REPAIR)");
            return;
        }
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        peer.write_all(b"queued").unwrap();
        wait_until(|| unread(&ours).unwrap() == 6);
        assert!(disconnect_silently(&ours).is_err(), "not in repair mode");
        let image = checkpoint(&ours).unwrap();
        disconnect_silently(&ours).unwrap();
        // `ours` is still open: without the disconnect this would wait
        // CLOSE_GRACE and fail.
        let start = std::time::Instant::now();
        let mut restored = restore(&image).unwrap();
        assert!(start.elapsed() < CLOSE_GRACE, "{:?}", start.elapsed());
        let mut buf = [0u8; 6];
        restored.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"queued");
        restored.write_all(b"back").unwrap();
        let mut back = [0u8; 4];
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        peer.read_exact(&mut back).expect("no reset");
        assert_eq!(&back, b"back");
        drop(ours);
    }

    /// What the checkpoint and the restore take for granted to save system
    /// calls: `SO_MEMINFO` reports the buffer sizes `SO_SNDBUF` and
    /// `SO_RCVBUF` read; repair mode makes `SO_REUSEADDR` read set (a clear
    /// one means no repair mode) and leaving it clears it; a socket
    /// checkpointed again in repair mode stays in it; a restored socket
    /// gets `SO_REUSEADDR` and `TCP_NODELAY` back as they were.
    #[test]
    fn shortcuts_hold() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        let sock = SockRef::from(&ours);
        sock.set_recv_buffer_size(50_000).unwrap();
        sock.set_send_buffer_size(70_000).unwrap();
        assert_eq!(
            buffer_sizes(&sock).unwrap(),
            (
                sock.send_buffer_size().unwrap(),
                sock.recv_buffer_size().unwrap()
            )
        );
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped the rest: needs root (TCP_REPAIR)");
            return;
        }
        for (reuse, nodelay) in [(false, false), (true, true), (false, true)] {
            let mut peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (ours, _) = l.accept().unwrap();
            let sock = SockRef::from(&ours);
            sock.set_reuse_address(reuse).unwrap();
            sock.set_tcp_nodelay(nodelay).unwrap();
            set_repair(ours.as_fd(), TCP_REPAIR_ON).unwrap();
            assert!(sock.reuse_address().unwrap(), "set in repair mode");
            set_repair(ours.as_fd(), TCP_REPAIR_OFF).unwrap();
            assert!(!sock.reuse_address().unwrap(), "cleared after");
            sock.set_reuse_address(reuse).unwrap();
            peer.write_all(b"x").unwrap();
            wait_until(|| unread(&ours).unwrap() == 1);
            let image = checkpoint(&ours).unwrap();
            assert_eq!(image.options.reuseaddr, reuse);
            assert_eq!(image.options.nodelay, nodelay);
            let again = checkpoint(&ours).unwrap();
            assert_eq!(again.received, image.received);
            // Read in repair mode: set whatever the application chose
            // (callers keep the first image's value).
            assert!(again.options.reuseaddr);
            disconnect_silently(&ours).expect("still in repair mode");
            let mut restored = restore(&image).unwrap();
            let r = SockRef::from(&restored);
            assert_eq!(r.reuse_address().unwrap(), reuse);
            assert_eq!(r.tcp_nodelay().unwrap(), nodelay);
            let mut buf = [0u8; 1];
            restored
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            restored.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"x");
            restored.write_all(b"y").unwrap();
            peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            peer.read_exact(&mut buf).expect("no reset");
            assert_eq!(&buf, b"y");
        }
    }

    #[test]
    fn only_connected_tcp_sockets_are_taken() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(matches!(tcp_info(l.as_fd()), Err(RepairError::Listening)));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(matches!(tcp_info(udp.as_fd()), Err(RepairError::NotTcp)));
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(tcp_info(file.as_fd()), Err(RepairError::NotTcp)));
        // A raw socket of IPPROTO_TCP says TCP too (needs CAP_NET_RAW).
        if let Ok(raw) = Socket::new(Domain::IPV4, Type::RAW, Some(socket2::Protocol::TCP)) {
            assert!(matches!(tcp_info(raw.as_fd()), Err(RepairError::NotTcp)));
        }
        let peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(tcp_info(peer.as_fd()).is_ok());
    }

    /// What the checkpoint's before-and-after comparison reads moves with
    /// data in, acknowledgements of data out, and data not yet sent.
    #[test]
    fn movement_sees_data_acks_and_unsent_bytes() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut ours, _) = l.accept().unwrap();
        let fd = ours.as_fd();
        let m0 = movement(fd).unwrap();
        assert_eq!(m0[0], 1, "ESTABLISHED");
        assert_eq!(movement(fd).unwrap(), m0, "nothing happened");
        peer.write_all(b"in").unwrap();
        wait_until(|| movement(ours.as_fd()).unwrap()[1] == m0[1] + 2);
        let m1 = movement(ours.as_fd()).unwrap();
        ours.write_all(b"out").unwrap();
        wait_until(|| movement(ours.as_fd()).unwrap()[2] == m1[2] + 3);
        let mut buf = [0u8; 3];
        peer.read_exact(&mut buf).unwrap();
        // Data queued but not sent: more than the peer, who reads
        // nothing, has room for.
        let m2 = movement(ours.as_fd()).unwrap();
        assert_eq!(m2[3], 0, "{m2:?}");
        ours.set_nonblocking(true).unwrap();
        let chunk = vec![0u8; 1 << 16];
        while ours.write(&chunk).is_ok() {}
        wait_until(|| movement(ours.as_fd()).unwrap()[3] > 0);
    }
}
