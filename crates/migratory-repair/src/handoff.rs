//! Handing live sockets to another process (docs/architecture.md section 5).
//!
//! Three ways a socket changes owner on one host, none of which closes it
//! (the kernel socket lives while any descriptor for it is open, so the peer
//! notices nothing):
//!
//! * to a **cooperating process** over a unix socket: [`send_sockets`] and
//!   [`recv_sockets`] pass descriptors as `SCM_RIGHTS` ancillary data inside
//!   a small framed message that also carries an application blob;
//! * to a **command started with them** as descriptors 3, 4, ... (the systemd
//!   socket-activation convention, `LISTEN_FDS` / `LISTEN_PID`):
//!   [`exec_with_fds`] on the starting side, [`listen_fds`] on the receiving
//!   side. An unmodified `socat FD:3 ...` continues a restored connection;
//! * **out of an unmodified process** (MIGSOCK's controlling program):
//!   [`stop`] it, list its sockets with [`socket_fds`], duplicate them with
//!   [`take_fd`] (`pidfd_getfd`), then resume or kill it through the
//!   [`Stopped`] guard (or let it go with [`terminate`] once a new owner
//!   holds its listening socket).
//!
//! # Wire format of a handoff message
//!
//! All integers little-endian:
//!
//! | offset | size | field                                                  |
//! |-------:|-----:|--------------------------------------------------------|
//! | 0      | 8    | magic `MIGRHOF1` (the last byte is the format version) |
//! | 8      | 4    | number of descriptors, at most [`MAX_FDS`]             |
//! | 12     | 8    | blob length, at most [`MAX_BLOB`]                      |
//! | 20     | n    | the blob                                               |
//!
//! The descriptors travel as `SCM_RIGHTS` with the first bytes of the
//! message; the receiver checks that it got exactly the announced number.
//! The blob may arrive over several reads. Messages can follow each other on
//! one channel.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::c_char;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::io::{fcntl_dupfd_cloexec, fcntl_setfd, Errno, FdFlags};
use rustix::net::{
    recvmsg, send, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use rustix::process::{
    getpid, pidfd_getfd, pidfd_open, pidfd_send_signal, Pid, PidfdFlags, PidfdGetfdFlags, Signal,
};

/// Most descriptors one handoff message carries: the kernel's `SCM_MAX_FD`.
pub const MAX_FDS: usize = 253;

/// Largest application blob one handoff message carries (64 MiB).
pub const MAX_BLOB: usize = 64 << 20;

/// How long [`stop`] waits for a process to be stopped, and
/// [`Stopped::kill`] for it to die.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// How often [`stop`] and [`Stopped::kill`] look whether the process got
/// there (each look reads `/proc`; a move's pause includes both waits).
const POLL: Duration = Duration::from_micros(100);

/// The first descriptor of the socket-activation convention.
pub const LISTEN_FDS_START: RawFd = 3;

const MAGIC: [u8; 8] = *b"MIGRHOF1";
const HEADER_LEN: usize = 20;
const LISTEN_VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];
/// `execvp`'s search path when the environment has no `PATH`.
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// What ptrace-checked access to another process takes.
const NEEDS_PTRACE: &str = "needs ptrace access: the same user and kernel.yama.ptrace_scope 0 (or 1 for a descendant), or CAP_SYS_PTRACE";
/// What signalling another process takes.
const NEEDS_KILL: &str = "signals need the same user or CAP_KILL";

/// Why a handoff failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// More descriptors than one message can carry.
    #[error("{count} descriptors cannot be passed in one message (at most {MAX_FDS}, SCM_MAX_FD)")]
    TooManyFds {
        /// How many were given or announced.
        count: usize,
    },
    /// The application blob is larger than [`MAX_BLOB`].
    #[error("application blob of {len} bytes is larger than the {MAX_BLOB}-byte limit")]
    BlobTooLarge {
        /// Its length.
        len: u64,
    },
    /// The channel was closed before a message began.
    #[error("the handoff channel was closed before a message arrived")]
    ChannelClosed,
    /// The channel was closed in the middle of a message.
    #[error(
        "handoff message truncated: the channel closed after {got} of {expected} {part} bytes"
    )]
    Truncated {
        /// Which part was cut: "header" or "blob".
        part: &'static str,
        /// Bytes of that part received.
        got: u64,
        /// Bytes of that part announced.
        expected: u64,
    },
    /// The bytes on the channel are not a handoff message.
    #[error("not a migratory handoff message: magic {found:02x?}, expected \"MIGRHOF1\"")]
    BadMagic {
        /// The first eight bytes received.
        found: [u8; 8],
    },
    /// The message carried another number of descriptors than it announced.
    #[error(
        "handoff message announced {announced} descriptors but carried {received} (all closed)"
    )]
    FdCountMismatch {
        /// Descriptors announced in the header.
        announced: usize,
        /// Descriptors that arrived as SCM_RIGHTS.
        received: usize,
    },
    /// The kernel truncated the ancillary data (`MSG_CTRUNC`): descriptors were lost.
    #[error("ancillary data truncated (MSG_CTRUNC, descriptor limit reached?): descriptors were lost, the {received} received were closed")]
    ControlTruncated {
        /// Descriptors that did arrive (and were closed).
        received: usize,
    },
    /// A read or write timeout set on the channel expired.
    #[error("{op} on the handoff channel timed out")]
    Timeout {
        /// The operation.
        op: &'static str,
    },
    /// The socket-activation variables are malformed.
    #[error("socket activation: {detail}")]
    ListenEnv {
        /// What is wrong.
        detail: String,
    },
    /// `LISTEN_PID` names another process: the descriptors are not ours.
    #[error("socket activation: LISTEN_PID={listen_pid} is not this process ({our_pid}); the variables were inherited, not meant for us")]
    ListenPidMismatch {
        /// The pid in `LISTEN_PID`.
        listen_pid: u32,
        /// Our pid.
        our_pid: u32,
    },
    /// A descriptor announced by `LISTEN_FDS` is not open.
    #[error("socket activation: LISTEN_FDS={count} but descriptor {fd} is not open")]
    ListenFdNotOpen {
        /// The missing descriptor.
        fd: RawFd,
        /// The announced count.
        count: usize,
    },
    /// The command could not be started.
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: io::Error,
    },
    /// The number cannot name a process to act on.
    #[error("invalid process id {pid}: {reason}")]
    InvalidPid {
        /// The number given.
        pid: i32,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The process does not exist (any more): `ESRCH`, or a zombie.
    #[error("process {pid} is gone (no such process)")]
    ProcessGone {
        /// The process.
        pid: i32,
    },
    /// The process has no open descriptor of that number (`EBADF`).
    #[error("process {pid} has no open file descriptor {fd}")]
    NoSuchFd {
        /// The process.
        pid: i32,
        /// The descriptor number.
        fd: RawFd,
    },
    /// Not allowed to act on the process (`EPERM`/`EACCES`).
    #[error("not permitted to {action} process {pid}: {needs}")]
    NotPermitted {
        /// The process.
        pid: i32,
        /// What was attempted, e.g. "take descriptors from".
        action: &'static str,
        /// What that takes.
        needs: &'static str,
    },
    /// The process was not seen stopped within the time limit after `SIGSTOP`.
    #[error("process {pid} did not stop within {waited:?} after SIGSTOP (a thread is in state '{state}')")]
    StopTimeout {
        /// The process.
        pid: i32,
        /// How long we waited.
        waited: Duration,
        /// The state of a thread that was not stopped.
        state: char,
    },
    /// The process was not seen dead within the time limit after `SIGKILL`.
    #[error("process {pid} did not die within {waited:?} after SIGKILL")]
    KillTimeout {
        /// The process.
        pid: i32,
        /// How long we waited.
        waited: Duration,
    },
    /// Another system call failed.
    #[error("{op}: {source}")]
    Os {
        /// What was being done.
        op: String,
        /// The error, with its errno text.
        source: io::Error,
    },
}

fn os(op: impl Into<String>, source: impl Into<io::Error>) -> HandoffError {
    HandoffError::Os {
        op: op.into(),
        source: source.into(),
    }
}

fn channel_error(op: &'static str, source: io::Error) -> HandoffError {
    match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HandoffError::Timeout { op },
        _ => os(format!("{op} on the handoff channel"), source),
    }
}

// ---------------------------------------------------------------------------
// SCM_RIGHTS over a unix socket
// ---------------------------------------------------------------------------

/// Sends `sockets` (any descriptors: listening or established TCP sockets,
/// ...) and `blob` as one handoff message over `channel`.
///
/// The receiver gets duplicates ([`recv_sockets`]); ours stay open until the
/// caller drops them. Blocks until the whole message is written (or the
/// channel's write timeout expires, which leaves a partial message: close
/// the channel then). `SIGPIPE` is never raised.
pub fn send_sockets(
    channel: &UnixStream,
    sockets: &[BorrowedFd<'_>],
    blob: &[u8],
) -> Result<(), HandoffError> {
    if sockets.len() > MAX_FDS {
        return Err(HandoffError::TooManyFds {
            count: sockets.len(),
        });
    }
    if blob.len() > MAX_BLOB {
        return Err(HandoffError::BlobTooLarge {
            len: blob.len() as u64,
        });
    }
    let header = encode_header(sockets.len(), blob.len());
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !sockets.is_empty() && !control.push(SendAncillaryMessage::ScmRights(sockets)) {
        return Err(HandoffError::TooManyFds {
            count: sockets.len(),
        });
    }
    let sent = loop {
        let iov = [IoSlice::new(&header), IoSlice::new(blob)];
        match sendmsg(channel, &iov, &mut control, SendFlags::NOSIGNAL) {
            Ok(n) => break n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(channel_error("sendmsg", e.into())),
        }
    };
    // A stream sendmsg stops early only on a signal or a timeout; the
    // descriptors went with its first byte, the rest follows as plain data.
    let mut done = sent;
    let total = HEADER_LEN + blob.len();
    while done < total {
        let rest = if done < HEADER_LEN {
            &header[done..]
        } else {
            &blob[done - HEADER_LEN..]
        };
        match send(channel, rest, SendFlags::NOSIGNAL) {
            Ok(0) => {
                return Err(channel_error(
                    "send",
                    io::Error::from(io::ErrorKind::WriteZero),
                ))
            }
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(channel_error("send", e.into())),
        }
    }
    Ok(())
}

/// Receives one handoff message from `channel`: the descriptors (in the
/// sender's order, close-on-exec) and the blob.
///
/// Blocks until a whole message is there, or the channel's read timeout
/// expires ([`HandoffError::Timeout`]). On any error every descriptor that
/// arrived is closed: garbage, a wrong descriptor count, truncated ancillary
/// data (`MSG_CTRUNC`) or a message cut short never leak descriptors.
pub fn recv_sockets(channel: &UnixStream) -> Result<(Vec<OwnedFd>, Vec<u8>), HandoffError> {
    recv_with_capacity(channel, MAX_FDS)
}

fn encode_header(count: usize, blob_len: usize) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&(count as u32).to_le_bytes());
    header[12..].copy_from_slice(&(blob_len as u64).to_le_bytes());
    header
}

/// [`recv_sockets`] with room for `capacity` descriptors in the control
/// buffer (smaller in tests, to provoke `MSG_CTRUNC`).
fn recv_with_capacity(
    channel: &UnixStream,
    capacity: usize,
) -> Result<(Vec<OwnedFd>, Vec<u8>), HandoffError> {
    // Room for credentials too, in case SO_PASSCRED is set on the channel.
    let mut space = vec![
        MaybeUninit::<u8>::uninit();
        rustix::cmsg_space!(ScmRights(capacity), ScmCredentials(1))
    ];
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    let mut fds: Vec<OwnedFd> = Vec::new();
    while got < HEADER_LEN {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut header[got..])];
        let msg = match recvmsg(channel, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(msg) => msg,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(channel_error("recvmsg", e.into())),
        };
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if msg.flags.contains(ReturnFlags::CTRUNC) {
            return Err(HandoffError::ControlTruncated {
                received: fds.len(),
            });
        }
        if msg.bytes == 0 {
            return Err(if got == 0 && fds.is_empty() {
                HandoffError::ChannelClosed
            } else {
                HandoffError::Truncated {
                    part: "header",
                    got: got as u64,
                    expected: HEADER_LEN as u64,
                }
            });
        }
        got += msg.bytes;
    }

    let (magic, rest) = header.split_at(8);
    let (count, blob_len) = rest.split_at(4);
    let mut found = [0u8; 8];
    found.copy_from_slice(magic);
    if found != MAGIC {
        return Err(HandoffError::BadMagic { found });
    }
    let mut word = [0u8; 4];
    word.copy_from_slice(count);
    let announced = u32::from_le_bytes(word) as usize;
    let mut long = [0u8; 8];
    long.copy_from_slice(blob_len);
    let blob_len = u64::from_le_bytes(long);
    if announced > MAX_FDS {
        return Err(HandoffError::TooManyFds { count: announced });
    }
    if announced != fds.len() {
        return Err(HandoffError::FdCountMismatch {
            announced,
            received: fds.len(),
        });
    }
    if blob_len > MAX_BLOB as u64 {
        return Err(HandoffError::BlobTooLarge { len: blob_len });
    }
    // Grown as bytes arrive (not allocated from the announced length), so a
    // lying header costs nothing. Descriptors sent along with blob bytes are
    // discarded (closed) by the kernel: a plain read has no control buffer.
    let mut blob = Vec::with_capacity((blob_len as usize).min(1 << 20));
    let mut reader = channel.take(blob_len);
    loop {
        match reader.read_to_end(&mut blob) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(channel_error("read", e)),
        }
    }
    if (blob.len() as u64) < blob_len {
        return Err(HandoffError::Truncated {
            part: "blob",
            got: blob.len() as u64,
            expected: blob_len,
        });
    }
    Ok((fds, blob))
}

// ---------------------------------------------------------------------------
// Socket activation: LISTEN_FDS / LISTEN_PID
// ---------------------------------------------------------------------------

/// Takes the descriptors passed by the socket-activation convention
/// (systemd's `sd_listen_fds`), as the receiving side.
///
/// Reads `LISTEN_FDS` (a count `n`) and `LISTEN_PID` (which must be this
/// process), takes ownership of descriptors `3..3+n` (marking them
/// close-on-exec) and unsets `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`
/// in every case, so that children do not inherit a stale claim and a second
/// call returns nothing. Without `LISTEN_FDS`, returns an empty list.
///
/// Call it once, early in `main`, before starting threads (it changes the
/// environment) and before anything else could have taken descriptors 3 and
/// up: by the convention they belong to this process and to nothing in it
/// yet, which is what makes taking ownership of them sound.
pub fn listen_fds() -> Result<Vec<OwnedFd>, HandoffError> {
    let pid = std::env::var_os("LISTEN_PID");
    let count = std::env::var_os("LISTEN_FDS");
    for name in LISTEN_VARS {
        std::env::remove_var(name);
    }
    let Some(count) = count else {
        return Ok(Vec::new());
    };
    let Some(pid) = pid else {
        return Err(HandoffError::ListenEnv {
            detail: "LISTEN_FDS is set but LISTEN_PID is not".into(),
        });
    };
    let our_pid = std::process::id();
    let listen_pid: u32 =
        pid.to_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| HandoffError::ListenEnv {
                detail: format!("LISTEN_PID={pid:?} is not a process id"),
            })?;
    if listen_pid != our_pid {
        return Err(HandoffError::ListenPidMismatch {
            listen_pid,
            our_pid,
        });
    }
    let count: usize =
        count
            .to_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| HandoffError::ListenEnv {
                detail: format!("LISTEN_FDS={count:?} is not a descriptor count"),
            })?;
    let end = RawFd::try_from(count)
        .ok()
        .and_then(|n| n.checked_add(LISTEN_FDS_START))
        .ok_or_else(|| HandoffError::ListenEnv {
            detail: format!("LISTEN_FDS={count} is out of range"),
        })?;
    // Check every descriptor before taking any.
    for fd in LISTEN_FDS_START..end {
        // SAFETY: F_GETFD only reads the flags of descriptor `fd` in our own
        // table; any integer is acceptable (EBADF when it is not open) and no
        // memory is passed.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            return Err(HandoffError::ListenFdNotOpen { fd, count });
        }
    }
    let mut fds = Vec::with_capacity(count);
    for fd in LISTEN_FDS_START..end {
        // SAFETY: `fd` is open (checked above), and the socket-activation
        // convention hands descriptors 3..3+LISTEN_FDS to the process named by
        // LISTEN_PID, which is this one: nothing else in the process owns them
        // (the documented precondition), and the variables are already unset,
        // so no later call can take them a second time.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        fcntl_setfd(&owned, FdFlags::CLOEXEC)
            .map_err(|e| os(format!("fcntl(F_SETFD) on inherited descriptor {fd}"), e))?;
        fds.push(owned);
    }
    Ok(fds)
}

/// Starts `cmd` with `fds` as its descriptors 3, 4, ... and the
/// socket-activation variables `LISTEN_FDS=<n>` and `LISTEN_PID=<the child's
/// own pid>` (and no `LISTEN_FDNAMES`), so that an unmodified program
/// (`socat FD:3 ...`, or one calling `sd_listen_fds`) takes them over.
///
/// Ownership of `fds` passes to the child: this process's copies are closed
/// whether or not the start succeeds. The child gets no other descriptor of
/// ours beyond what `Command` would give it anyway (stdio and non-close-on-exec
/// descriptors); the originals are duplicated above the target range and
/// closed before the start, so their numbers never collide with 3..3+n.
/// Socket options travel with the sockets: clear any read or write timeout
/// this process set, unless the program expects it.
///
/// # How `LISTEN_PID` gets the child's pid
///
/// The pid exists only after the fork, and `Command` builds the child's
/// environment before it and installs it *after* any `pre_exec` hook, so a
/// hook cannot simply set a variable (and `setenv` is not async-signal-safe
/// anyway). So the hook installed here performs the final `execve` itself:
/// the argument and environment arrays are built beforehand in this process
/// (this process's environment with `cmd`'s changes applied, as `Command`
/// would), and in the child the hook only moves the descriptors into place
/// (`dup2`), writes the decimal pid into a stack buffer that fills the
/// reserved `LISTEN_PID` slot, and calls `execve` for each `PATH` candidate
/// (`execvp`'s search, with the child's `PATH`). Everything it does is
/// async-signal-safe. A failure after the descriptors were moved is
/// reported over a private close-on-exec socket and returned as
/// [`HandoffError::Spawn`], like a failure of `Command::spawn`: this
/// function returns once the child has exec'd the program or failed to
/// (waiting at most 30 s, in case another thread forked meanwhile and holds
/// a copy of that socket without exec'ing). (The
/// alternative, `sh -c 'LISTEN_PID=$$ exec "$@"'`, needs a new `Command`,
/// losing the caller's stdio settings, and the shell edits the environment.)
///
/// Everything `Command` does in the child before the hooks is kept: stdio,
/// working directory, uid/gid, process group, other `pre_exec` hooks that
/// were added before this call. Not honoured, because `Command` does not
/// expose them: `env_clear` (the child gets this process's environment plus
/// the explicit changes) and `arg0` (argv\[0\] is the program). Hooks added
/// after this call never run. The command is spent: spawning it again fails
/// rather than passing whatever then holds the old descriptor numbers.
pub fn exec_with_fds(cmd: &mut Command, fds: Vec<OwnedFd>) -> Result<Child, HandoffError> {
    let program = cmd.get_program().to_os_string();
    let name = program.to_string_lossy().into_owned();
    let spawn_error = |source: io::Error| HandoffError::Spawn {
        program: name.clone(),
        source,
    };
    let count = fds.len();
    let above = RawFd::try_from(count)
        .ok()
        .and_then(|n| n.checked_add(LISTEN_FDS_START))
        .ok_or(HandoffError::TooManyFds { count })?;

    // Copies numbered above 3..3+n, close-on-exec: in the child each is
    // dup2'ed onto its target, which never is another copy's number.
    let mut high = Vec::with_capacity(count);
    for fd in &fds {
        high.push(fcntl_dupfd_cloexec(fd, above).map_err(|e| os("fcntl(F_DUPFD_CLOEXEC)", e))?);
    }
    drop(fds);
    let moves: Vec<(RawFd, RawFd)> = high
        .iter()
        .zip(LISTEN_FDS_START..)
        .map(|(fd, target)| (fd.as_raw_fd(), target))
        .collect();

    // Failures after the descriptors moved are reported here (Command's own
    // error pipe may have been one of the targets).
    let (report_read, report_low) =
        UnixStream::pair().map_err(|e| os("socketpair for the exec report", e))?;
    let report_write =
        fcntl_dupfd_cloexec(&report_low, above).map_err(|e| os("fcntl(F_DUPFD_CLOEXEC)", e))?;
    // Only the child may keep a write end, or the report never reads EOF.
    drop(report_low);

    let mut env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => env.insert(key.to_os_string(), value.to_os_string()),
            None => env.remove(key),
        };
    }
    for var in LISTEN_VARS {
        env.remove(OsStr::new(var));
    }
    let path = env
        .get(OsStr::new("PATH"))
        .cloned()
        .unwrap_or_else(|| DEFAULT_PATH.into());
    let mut env_strings = Vec::with_capacity(env.len() + 2);
    for (key, value) in &env {
        let mut entry = key.as_bytes().to_vec();
        entry.push(b'=');
        entry.extend_from_slice(value.as_bytes());
        env_strings.push(cstring(entry).map_err(&spawn_error)?);
    }
    env_strings.push(cstring(format!("LISTEN_FDS={count}").into_bytes()).map_err(&spawn_error)?);
    // Placeholder, replaced in the child by "LISTEN_PID=<its pid>".
    env_strings.push(cstring(b"LISTEN_PID=".to_vec()).map_err(&spawn_error)?);
    let mut arg_strings = vec![cstring(program.as_bytes().to_vec()).map_err(&spawn_error)?];
    for arg in cmd.get_args() {
        arg_strings.push(cstring(arg.as_bytes().to_vec()).map_err(&spawn_error)?);
    }
    let candidates = exec_candidates(&program, &path).map_err(&spawn_error)?;

    let spent = Arc::new(AtomicBool::new(false));
    let mut plan = ExecPlan::new(
        Arc::clone(&spent),
        moves,
        report_write.as_raw_fd(),
        candidates,
        arg_strings,
        env_strings,
    );
    // SAFETY: the hook runs in the forked child before exec, where only
    // async-signal-safe work is allowed (another thread of ours may have held
    // the allocator's lock at the fork). `ExecPlan::run` loads an atomic,
    // calls dup2, getpid (a raw syscall), formats digits into a stack buffer,
    // stores one pointer in a vector allocated before the fork, and calls
    // execve, write and _exit: no allocation, no lock, no unwinding. All the
    // memory it reads was built here, before the fork, and is owned by the
    // closure.
    unsafe {
        cmd.pre_exec(move || plan.run());
    }
    let spawned = cmd.spawn();
    // The descriptor numbers in the hook are only valid for this one spawn.
    spent.store(true, Ordering::SeqCst);
    drop(high);
    drop(report_write);
    let mut child = spawned.map_err(&spawn_error)?;
    match read_exec_report(&report_read) {
        None => Ok(child),
        Some(errno) => {
            let _ = child.wait();
            Err(spawn_error(io::Error::from_raw_os_error(errno)))
        }
    }
}

fn cstring(bytes: Vec<u8>) -> Result<CString, io::Error> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a program name, argument or environment entry contains a NUL byte",
        )
    })
}

/// The paths `execvp` would try for `program` with search path `path`.
fn exec_candidates(program: &OsStr, path: &OsStr) -> Result<Vec<CString>, io::Error> {
    let name = program.as_bytes();
    if name.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the program name is empty",
        ));
    }
    if name.contains(&b'/') {
        return Ok(vec![cstring(name.to_vec())?]);
    }
    path.as_bytes()
        .split(|&b| b == b':')
        .map(|dir| {
            let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
            let mut full = dir.to_vec();
            full.push(b'/');
            full.extend_from_slice(name);
            cstring(full)
        })
        .collect()
}

/// What the `pre_exec` hook of [`exec_with_fds`] needs, built before the
/// fork.
struct ExecPlan {
    spent: Arc<AtomicBool>,
    moves: Vec<(RawFd, RawFd)>,
    report: RawFd,
    candidates: Vec<CString>,
    /// Owns the strings `argv` and `envp` point into.
    _strings: (Vec<CString>, Vec<CString>),
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    pid_slot: usize,
}

// SAFETY: the raw pointers in `argv` and `envp` point into the heap buffers
// of the `CString`s owned by the same plan (moving a `CString` does not move
// its buffer), never into thread-local or borrowed memory; they are only
// dereferenced (by execve) in the forked child. Sending the plan to another
// thread is as sound as sending the strings.
unsafe impl Send for ExecPlan {}
// SAFETY: `&ExecPlan` gives no way to read or write through the pointers;
// only `run(&mut self)`, in the child, uses them.
unsafe impl Sync for ExecPlan {}

impl ExecPlan {
    fn new(
        spent: Arc<AtomicBool>,
        moves: Vec<(RawFd, RawFd)>,
        report: RawFd,
        candidates: Vec<CString>,
        args: Vec<CString>,
        env: Vec<CString>,
    ) -> ExecPlan {
        let argv = args
            .iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp = env
            .iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let pid_slot = env.len() - 1;
        ExecPlan {
            spent,
            moves,
            report,
            candidates,
            _strings: (args, env),
            argv,
            envp,
            pid_slot,
        }
    }

    /// Runs in the forked child: async-signal-safe only.
    fn run(&mut self) -> io::Result<()> {
        if self.spent.load(Ordering::SeqCst) {
            // Before any change: Command reports this as a spawn error.
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        for &(from, to) in &self.moves {
            // SAFETY: dup2 takes two integers and changes only this (child)
            // process's descriptor table.
            if unsafe { libc::dup2(from, to) } == -1 {
                self.fail(last_errno());
            }
        }
        let mut entry = [0u8; 32];
        write_pid_entry(&mut entry, getpid().as_raw_pid());
        self.envp[self.pid_slot] = entry.as_ptr().cast();
        let mut error = libc::ENOENT;
        for candidate in &self.candidates {
            // SAFETY: `candidate` is a NUL-terminated string, `argv` and
            // `envp` are null-terminated arrays of NUL-terminated strings, all
            // owned by `self` or (the LISTEN_PID entry) on this stack frame,
            // alive until execve returns or replaces the process image.
            unsafe {
                libc::execve(candidate.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr());
            }
            match last_errno() {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => error = libc::EACCES,
                other => {
                    error = other;
                    break;
                }
            }
        }
        self.fail(error)
    }

    /// Reports `errno` to the parent and ends the child.
    fn fail(&self, errno: i32) -> ! {
        let bytes = errno.to_ne_bytes();
        // SAFETY: write reads 4 bytes from a live stack buffer into our
        // report socket; _exit ends the child at once, without the exit
        // handlers or unwinding a forked child must not run.
        unsafe {
            libc::write(self.report, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127)
        }
    }
}

fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Writes `LISTEN_PID=<pid>` and a NUL into `buf`, without allocating.
fn write_pid_entry(buf: &mut [u8; 32], pid: i32) {
    const PREFIX: &[u8] = b"LISTEN_PID=";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let mut n = pid.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for (i, digit) in digits[..len].iter().rev().enumerate() {
        buf[PREFIX.len() + i] = *digit;
    }
    buf[PREFIX.len() + len] = 0;
}

/// The errno sent by a child whose exec failed, or `None` once the report
/// socket reads end-of-file (the child exec'd: close-on-exec closed it).
fn read_exec_report(mut channel: &UnixStream) -> Option<i32> {
    // Bounded: the child reaches exec or _exit right after the fork.
    let _ = channel.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < buf.len() {
        match channel.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    (got == buf.len()).then(|| i32::from_ne_bytes(buf))
}

// ---------------------------------------------------------------------------
// Taking sockets out of another process
// ---------------------------------------------------------------------------

/// A process stopped by [`stop`]: while this guard lives, the process stays
/// stopped.
///
/// Dropping the guard, or [`Stopped::resume`], lets it run again; only
/// [`Stopped::kill`] and the explicit [`Stopped::leave_stopped`] end the
/// guard without resuming. A process that was already stopped before
/// [`stop`] (job control, a debugger) is left stopped, as it was found.
/// Signals go through a pidfd, so they reach this process even if its pid
/// is reused.
#[derive(Debug)]
#[must_use = "dropping the guard resumes the process at once"]
pub struct Stopped {
    pid: i32,
    pidfd: OwnedFd,
    was_stopped: bool,
    armed: bool,
}

/// Stops process `pid` with `SIGSTOP` and waits, at most [`STOP_TIMEOUT`],
/// until all its threads are seen stopped (state `T` in
/// `/proc/PID/task/*/stat`).
///
/// On a timeout the process is resumed before the error returns. Refuses
/// pids that are not positive (they name process groups) and our own.
pub fn stop(pid: i32) -> Result<Stopped, HandoffError> {
    stop_within(pid, STOP_TIMEOUT)
}

/// [`stop`] with another time limit.
pub fn stop_within(pid: i32, timeout: Duration) -> Result<Stopped, HandoffError> {
    check_pid(pid)?;
    if pid as u32 == std::process::id() {
        return Err(HandoffError::InvalidPid {
            pid,
            reason: "it is this process, which cannot wait for itself to stop",
        });
    }
    let pidfd = open_pidfd(pid)?;
    let was_stopped = match process_state(pid)? {
        ProcState::Stopped => true,
        ProcState::Running(_) => false,
        ProcState::Gone => return Err(HandoffError::ProcessGone { pid }),
    };
    signal(&pidfd, pid, Signal::STOP, "stop")?;
    // From here on, any error drops the guard, which resumes the process.
    let guard = Stopped {
        pid,
        pidfd,
        was_stopped,
        armed: true,
    };
    let start = Instant::now();
    loop {
        match process_state(pid)? {
            ProcState::Stopped => return Ok(guard),
            ProcState::Gone => return Err(HandoffError::ProcessGone { pid }),
            ProcState::Running(state) if start.elapsed() >= timeout => {
                return Err(HandoffError::StopTimeout {
                    pid,
                    waited: start.elapsed(),
                    state,
                })
            }
            ProcState::Running(_) => std::thread::sleep(POLL),
        }
    }
}

impl Stopped {
    /// The stopped process.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the process was already stopped before [`stop`] (it will be
    /// left stopped).
    pub fn was_already_stopped(&self) -> bool {
        self.was_stopped
    }

    /// [`take_fd`] from the stopped process, through the guard's pidfd (so
    /// certainly from this process, even if its pid was reused).
    pub fn take_fd(&self, fd: RawFd) -> Result<OwnedFd, HandoffError> {
        getfd(&self.pidfd, self.pid, fd)
    }

    /// Lets the process run again (`SIGCONT`), unless it was already stopped
    /// before [`stop`].
    pub fn resume(mut self) -> Result<(), HandoffError> {
        self.armed = false;
        if self.was_stopped {
            return Ok(());
        }
        signal(&self.pidfd, self.pid, Signal::CONT, "resume")
    }

    /// Kills the process (`SIGKILL`) and waits, at most [`STOP_TIMEOUT`],
    /// until it is dead (gone, or a zombie its parent has not reaped).
    pub fn kill(mut self) -> Result<(), HandoffError> {
        self.armed = false;
        match signal(&self.pidfd, self.pid, Signal::KILL, "kill") {
            Err(HandoffError::ProcessGone { .. }) => return Ok(()),
            other => other?,
        }
        let start = Instant::now();
        loop {
            if let ProcState::Gone = process_state(self.pid)? {
                return Ok(());
            }
            if start.elapsed() >= STOP_TIMEOUT {
                return Err(HandoffError::KillTimeout {
                    pid: self.pid,
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Kills the process (`SIGKILL`) and returns without waiting for it to
    /// die: it never runs again (`SIGKILL` cannot be caught, and wakes a
    /// stopped process only to end it), and the caller need not wait for
    /// its exit (its descriptors close a moment later).
    pub fn kill_no_wait(mut self) -> Result<(), HandoffError> {
        self.armed = false;
        match signal(&self.pidfd, self.pid, Signal::KILL, "kill") {
            Err(HandoffError::ProcessGone { .. }) => Ok(()),
            other => other,
        }
    }

    /// Ends the guard and leaves the process stopped, deliberately: someone
    /// must send it `SIGCONT` or `SIGKILL` later. Returns its pid.
    pub fn leave_stopped(mut self) -> i32 {
        self.armed = false;
        self.pid
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if self.armed && !self.was_stopped {
            // Nothing to do about an error here: the process may be gone.
            let _ = signal(&self.pidfd, self.pid, Signal::CONT, "resume");
        }
    }
}

/// Asks process `pid` to exit (`SIGTERM`, through a pidfd) and returns
/// without waiting: for the old service of a handoff, once the new one holds
/// its listening socket (the socket stays open through the new owner).
pub fn terminate(pid: i32) -> Result<(), HandoffError> {
    check_pid(pid)?;
    if pid as u32 == std::process::id() {
        return Err(HandoffError::InvalidPid {
            pid,
            reason: "it is this process",
        });
    }
    let pidfd = open_pidfd(pid)?;
    signal(&pidfd, pid, Signal::TERM, "terminate")
}

/// Duplicates descriptor `fd` of process `pid` into this process
/// (`pidfd_open` + `pidfd_getfd`, Linux 5.6): the same open socket, not a
/// copy, close-on-exec here.
///
/// Needs ptrace access to the process (`PTRACE_MODE_ATTACH_REALCREDS`): the
/// same user and a Yama `ptrace_scope` that allows it (0, or 1 for a
/// descendant), or `CAP_SYS_PTRACE`. Stop the owner first ([`stop`]) before
/// changing the socket (e.g. `TCP_REPAIR`): the change affects the owner too.
pub fn take_fd(pid: i32, fd: RawFd) -> Result<OwnedFd, HandoffError> {
    check_pid(pid)?;
    let pidfd = open_pidfd(pid)?;
    getfd(&pidfd, pid, fd)
}

/// The descriptors of process `pid` that are sockets (`/proc/PID/fd/N` links
/// to `socket:[inode]`), in increasing order.
pub fn socket_fds(pid: i32) -> Result<Vec<RawFd>, HandoffError> {
    fds_of_kind(pid, b"socket:[")
}

/// The descriptors of process `pid` that are pipes (`pipe:[inode]`), in
/// increasing order.
pub fn pipe_fds(pid: i32) -> Result<Vec<RawFd>, HandoffError> {
    fds_of_kind(pid, b"pipe:[")
}

/// The descriptors of `pid` whose `/proc/PID/fd/N` link starts with `kind`.
fn fds_of_kind(pid: i32, kind: &[u8]) -> Result<Vec<RawFd>, HandoffError> {
    check_pid(pid)?;
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => HandoffError::ProcessGone { pid },
        io::ErrorKind::PermissionDenied => HandoffError::NotPermitted {
            pid,
            action: "list the descriptors of",
            needs: NEEDS_PTRACE,
        },
        _ => os(format!("reading {dir}"), e),
    })?;
    let mut sockets = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            // The process exited while we were reading.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(os(format!("reading {dir}"), e)),
        };
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        match fs::read_link(entry.path()) {
            Ok(target) if target.as_os_str().as_bytes().starts_with(kind) => sockets.push(fd),
            Ok(_) => {}
            // Closed meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(HandoffError::NotPermitted {
                    pid,
                    action: "list the descriptors of",
                    needs: NEEDS_PTRACE,
                })
            }
            Err(e) => return Err(os(format!("readlink {dir}/{fd}"), e)),
        }
    }
    sockets.sort_unstable();
    Ok(sockets)
}

fn check_pid(pid: i32) -> Result<Pid, HandoffError> {
    if pid <= 0 {
        return Err(HandoffError::InvalidPid {
            pid,
            reason: "not positive (0 and negative numbers name process groups)",
        });
    }
    Pid::from_raw(pid).ok_or(HandoffError::InvalidPid {
        pid,
        reason: "not positive",
    })
}

fn open_pidfd(pid: i32) -> Result<OwnedFd, HandoffError> {
    let raw = check_pid(pid)?;
    pidfd_open(raw, PidfdFlags::empty()).map_err(|e| match e {
        Errno::SRCH => HandoffError::ProcessGone { pid },
        e => os(format!("pidfd_open({pid})"), e),
    })
}

fn getfd(pidfd: &OwnedFd, pid: i32, fd: RawFd) -> Result<OwnedFd, HandoffError> {
    if fd < 0 {
        return Err(HandoffError::NoSuchFd { pid, fd });
    }
    pidfd_getfd(pidfd, fd, PidfdGetfdFlags::empty()).map_err(|e| match e {
        Errno::SRCH => HandoffError::ProcessGone { pid },
        Errno::BADF => HandoffError::NoSuchFd { pid, fd },
        Errno::PERM | Errno::ACCESS => HandoffError::NotPermitted {
            pid,
            action: "take descriptors from",
            needs: NEEDS_PTRACE,
        },
        e => os(format!("pidfd_getfd(pid {pid}, fd {fd})"), e),
    })
}

fn signal(
    pidfd: &OwnedFd,
    pid: i32,
    sig: Signal,
    action: &'static str,
) -> Result<(), HandoffError> {
    pidfd_send_signal(pidfd, sig).map_err(|e| match e {
        Errno::SRCH => HandoffError::ProcessGone { pid },
        Errno::PERM => HandoffError::NotPermitted {
            pid,
            action,
            needs: NEEDS_KILL,
        },
        e => os(format!("pidfd_send_signal({pid}, {sig:?})"), e),
    })
}

/// What `/proc` says about a whole process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcState {
    /// Every live thread is stopped (`T`, or `t` under a tracer).
    Stopped,
    /// A thread is in this other state.
    Running(char),
    /// No such process, or only a zombie.
    Gone,
}

fn process_state(pid: i32) -> Result<ProcState, HandoffError> {
    Ok(summarize(&thread_states(pid)?))
}

/// The state letter of every live thread of `pid` (`/proc/PID/task/*/stat`;
/// empty if the process is gone).
pub(crate) fn thread_states(pid: i32) -> Result<Vec<char>, HandoffError> {
    let dir = format!("/proc/{pid}/task");
    let tasks = match fs::read_dir(&dir) {
        Ok(tasks) => tasks,
        // ESRCH: the process is exiting as we look.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(os(format!("reading {dir}"), e)),
    };
    let mut states = Vec::new();
    for task in tasks {
        let Ok(task) = task else { continue };
        // A thread that exits meanwhile is simply not counted.
        if let Ok(stat) = fs::read_to_string(task.path().join("stat")) {
            if let Some(state) = stat_state(&stat) {
                states.push(state);
            }
        }
    }
    Ok(states)
}

/// The state letter of a `/proc/.../stat` line: the first field after the
/// command name, which is in parentheses and may itself contain `)`.
fn stat_state(stat: &str) -> Option<char> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

fn summarize(states: &[char]) -> ProcState {
    if let Some(&running) = states.iter().find(|s| !matches!(s, 'T' | 't' | 'Z' | 'X')) {
        return ProcState::Running(running);
    }
    if states.iter().any(|s| matches!(s, 'T' | 't')) {
        ProcState::Stopped
    } else {
        ProcState::Gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn pid_entry_is_decimal_and_nul_terminated() {
        for (pid, text) in [
            (1, "LISTEN_PID=1"),
            (42, "LISTEN_PID=42"),
            (4194304, "LISTEN_PID=4194304"),
            (i32::MAX, "LISTEN_PID=2147483647"),
        ] {
            let mut buf = [0xffu8; 32];
            write_pid_entry(&mut buf, pid);
            let end = buf.iter().position(|&b| b == 0).unwrap();
            assert_eq!(&buf[..end], text.as_bytes());
        }
    }

    #[test]
    fn stat_state_survives_odd_command_names() {
        assert_eq!(stat_state("123 (sleep) S 1 2 3"), Some('S'));
        assert_eq!(stat_state("123 (a) T (b)) T 1 2"), Some('T'));
        assert_eq!(stat_state("garbage"), None);
    }

    #[test]
    fn summary_of_thread_states() {
        assert_eq!(summarize(&['T', 'T']), ProcState::Stopped);
        assert_eq!(summarize(&['Z', 't']), ProcState::Stopped);
        assert_eq!(summarize(&['T', 'R']), ProcState::Running('R'));
        assert_eq!(summarize(&['Z']), ProcState::Gone);
        assert_eq!(summarize(&[]), ProcState::Gone);
    }

    #[test]
    fn exec_candidates_follow_execvp() {
        let c = exec_candidates(OsStr::new("socat"), OsStr::new("/a::/b")).unwrap();
        let c: Vec<_> = c.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(c, ["/a/socat", "./socat", "/b/socat"]);
        let c = exec_candidates(OsStr::new("./x"), OsStr::new("/a")).unwrap();
        assert_eq!(c[0].to_str().unwrap(), "./x");
        assert!(exec_candidates(OsStr::new(""), OsStr::new("/a")).is_err());
    }

    /// A control buffer too small for the descriptors sent gives
    /// `MSG_CTRUNC`: an error, and every descriptor closed (the peer of the
    /// passed socket sees end-of-file).
    #[test]
    fn truncated_control_data_is_an_error_and_closes_fds() {
        let (tx, rx) = UnixStream::pair().unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (passed, witness) = UnixStream::pair().unwrap();
        witness
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let fds = vec![passed.as_fd(); 100];
        send_sockets(&tx, &fds, b"blob").unwrap();
        drop(passed);
        match recv_with_capacity(&rx, 1) {
            Err(HandoffError::ControlTruncated { .. }) => {}
            other => panic!("expected ControlTruncated, got {other:?}"),
        }
        let mut buf = [0u8; 1];
        assert_eq!((&witness).read(&mut buf).unwrap(), 0, "a copy leaked");
    }
}
