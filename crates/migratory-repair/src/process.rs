//! MIGSOCK's controlling program (MIGSOCK report, start_migrate and
//! finish_migrate): checkpoint the TCP sockets of a running process into an
//! image file, and restore an image's sockets to hand them on.
//!
//! # A checkpoint never loses the connection
//!
//! With a network lock (the default, [`CheckpointOptions::lock`]):
//!
//! 1. the sockets are taken from the running process (`pidfd_getfd`), their
//!    send buffers given room for what the process will answer (nothing is
//!    acknowledged while the lock holds), the lock's table made, and our
//!    packets to the peers dropped ([`Direction::Outbound`]): what arrives
//!    from now on is not acknowledged to the peer;
//! 2. once each peer has sent something new (then 0.5 ms or two round
//!    trips later; at most 30 ms for a peer that sends nothing), the
//!    peers' packets are dropped too
//!    ([`Direction::Inbound`]; a streaming peer then resends what the lock
//!    drops as soon as the restored socket answers, see "Packets dropped
//!    by the lock" below), and the process gets a moment (at most 100 ms)
//!    to finish with what it
//!    already received: until its threads sleep, its sockets have nothing
//!    left to read and room to write, and its pipes are empty;
//! 3. the process is stopped, the sockets frozen (repair mode) and read,
//!    the image written (renamed into place whole), read back and compared
//!    byte for byte with its encoding (which decodes to the image), and the
//!    lock checked;
//! 4. only then is the process killed ([`After::Kill`]); its sockets close
//!    silently, and the lock stays until the restore lifts it;
//! 5. the image is flushed to disk (file, then directory) before the
//!    checkpoint reports success.
//!
//! A failure at any point before 4 lifts the lock, takes the sockets out
//! of repair mode, lets the process continue and removes the image: the
//! peer sees at most a pause. [`FailPoint`] forces such failures in tests.
//! After 4 an error leaves the image in place: it is the connections' only
//! copy.
//!
//! # Packets dropped by the lock
//!
//! The inbound lock used to wait until the peers went quiet: a streaming
//! peer stops only once its congestion window is out, sent at its
//! application's pace (6-7 ms of the stall in BENCHMARKS.md), and nothing
//! it sent was dropped. Now each peer's packets are dropped shortly after
//! its first new byte (`wait_for_news`), and the restore makes it resend
//! them at once: the restored socket's first segment (an acknowledgement
//! the restore sends as it goes live: [`Prepared::go_live`]) acknowledges
//! what arrived here after our packets were held back, which the peer has
//! not seen acknowledged. That frees its window, it sends new data, which
//! arrives beyond the hole the lock left, the restored socket says so
//! (SACK), and the peer resends the dropped segments at once (RACK,
//! RFC 8985) rather than at its retransmission timeout (200 ms or more).
//! What the image holds is unaffected: the frozen socket's queues are what
//! the kernel took in and acknowledged (dropped packets never reach it),
//! checked before and after they are read and again after the kill.
//!
//! What still waits for the peer's timeout: a peer that sends nothing for
//! 30 ms and then sends while the lock holds (nothing new to
//! acknowledge), and one that stops sending while the lock holds (no new
//! data to send after the acknowledgement). Its data is resent then; the
//! connection is kept either way.
//!
//! # What is durable when
//!
//! The flush (2.5-5 ms of `fsync` on the disk measured in BENCHMARKS.md)
//! comes after the kill, off the path of the move: a restore reads the image
//! as soon as it is in place, from the page cache. Every reader sees the
//! whole image or none (the rename), and the process dies only once the
//! file system holds the image as verified. What the flush adds is the
//! image surviving a crash of this host; a crash between the kill and the
//! end of the flush (milliseconds) may leave no image, or a truncated file
//! that no restore accepts (length and checksum). Such a crash also ends
//! the lock, so the peers' next packets meet no socket and are reset: on
//! the same host the connections cannot outlive it whatever is on disk. A
//! checkpoint that succeeded has flushed its image, as before.
//!
//! A failed restore closes what it restored silently and keeps the lock:
//! the image still holds the connections, and can be restored again.
//!
//! A restore can start before the checkpoint ends ([`restore_when_ready`]):
//! it waits for the image to appear and for the checkpointed sockets to
//! close (or the address to arrive), so that no process start lies between
//! the checkpoint and the restore.

use std::os::fd::{OwnedFd, RawFd};
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::handoff::{self, HandoffError, Stopped};
use crate::image::{self, ImageError, ImageFile};
use crate::lock::{Connection, Direction, LockError, NetLock, DEFAULT_TIMEOUT};
use crate::repair::{
    abandon, bytes_received, checkpoint, connection, disconnect_silently, prepare,
    reserve_send_buffer, resume, smoothed_rtt, unchanged, unread, writable, Prepared, RepairError,
};
use crate::steps::step;

/// Times a killed process's sockets are checked again (and re-read) before
/// they close.
const RECHECKS: usize = 10;

/// How long after a peer's first new byte with our packets held back its
/// packets are dropped too (at least; two round trips if longer): see
/// [`wait_for_news`].
const PEERS_CUT: Duration = Duration::from_micros(500);

/// The longest the outbound-only phase of the lock lasts (a peer that
/// sends nothing is not waited for longer).
const PEERS_QUIET_MAX: Duration = Duration::from_millis(30);

/// The longest the process gets, once the lock holds, to finish with what
/// it received before it is stopped.
const SETTLE_MAX: Duration = Duration::from_millis(100);

/// What becomes of the process once its sockets are in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Kill it: its sockets close silently when this process lets go of
    /// them (migration).
    Kill,
    /// Resume its sockets and let it carry on (a snapshot).
    Continue,
}

/// How long [`Fault::Hang`] hangs (a test kills the tool meanwhile).
pub const HANG: Duration = Duration::from_secs(60);

/// A step of [`checkpoint_process`] after which a test can make it fail
/// or hang (fault injection), to see that nothing is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    /// The lock holds both ways; the process still runs.
    Locked,
    /// The process is stopped, its sockets not yet frozen.
    Stopped,
    /// Every socket is frozen and read.
    Checkpointed,
    /// The image is written.
    Written,
    /// The image is read back and matches.
    Verified,
    /// The lock was checked to hold; the process would be killed next.
    LockChecked,
}

impl FailPoint {
    /// Every point, in the order they are passed.
    pub const ALL: [FailPoint; 6] = [
        FailPoint::Locked,
        FailPoint::Stopped,
        FailPoint::Checkpointed,
        FailPoint::Written,
        FailPoint::Verified,
        FailPoint::LockChecked,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FailPoint::Locked => "locked",
            FailPoint::Stopped => "stopped",
            FailPoint::Checkpointed => "checkpointed",
            FailPoint::Written => "written",
            FailPoint::Verified => "verified",
            FailPoint::LockChecked => "lock-checked",
        }
    }
}

impl FromStr for FailPoint {
    type Err = String;

    fn from_str(s: &str) -> Result<FailPoint, String> {
        FailPoint::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = FailPoint::ALL.iter().map(|p| p.name()).collect();
                format!("unknown fail point {s:?} (one of {})", names.join(", "))
            })
    }
}

/// What an injected fault does at its [`FailPoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fail with [`ProcessError::Injected`] (and undo everything).
    Fail,
    /// Sleep for [`HANG`] first (a test kills the tool meanwhile), then
    /// fail.
    Hang,
}

/// How [`checkpoint_process`] goes about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointOptions {
    /// Lock the connections while they move, for at most this long if
    /// nobody lifts the lock; `None` takes no lock (the caller holds the
    /// peers' packets back itself).
    pub lock: Option<Duration>,
    /// A fault to inject after a step (tests).
    pub fault: Option<(FailPoint, Fault)>,
}

impl CheckpointOptions {
    /// The injected fault, if it is at `point`.
    fn inject(&self, point: FailPoint) -> Result<(), ProcessError> {
        match self.fault {
            Some((p, fault)) if p == point => {
                if fault == Fault::Hang {
                    std::thread::sleep(HANG);
                }
                Err(ProcessError::Injected(point))
            }
            _ => Ok(()),
        }
    }
}

impl Default for CheckpointOptions {
    fn default() -> Self {
        CheckpointOptions {
            lock: Some(DEFAULT_TIMEOUT),
            fault: None,
        }
    }
}

/// What can go wrong checkpointing a process or restoring an image.
#[derive(Debug, Error)]
pub enum ProcessError {
    /// Stopping, resuming or inspecting the process failed.
    #[error("pid {pid}: {source}")]
    Process {
        /// The process.
        pid: i32,
        /// Why.
        source: HandoffError,
    },
    /// Taking one of its descriptors failed.
    #[error("pid {pid} fd {fd}: {source}")]
    Fd {
        /// The process.
        pid: i32,
        /// The descriptor.
        fd: RawFd,
        /// Why.
        source: HandoffError,
    },
    /// Checkpointing one of its sockets failed.
    #[error("pid {pid} fd {fd}: {source}")]
    Socket {
        /// The process.
        pid: i32,
        /// The descriptor.
        fd: RawFd,
        /// Why.
        source: RepairError,
    },
    /// The process has no connected TCP socket to take.
    #[error("pid {0}: no connected TCP socket")]
    NoSockets(i32),
    /// The image could not be written or read.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The image read back differs from the one written.
    #[error("{0}: the image read back differs from the one written")]
    Verify(String),
    /// The network lock could not be taken, checked or lifted.
    #[error("network lock: {0}")]
    Lock(#[from] LockError),
    /// A failure forced by [`CheckpointOptions::fault`].
    #[error("failure injected after step {}", .0.name())]
    Injected(FailPoint),
    /// Data kept arriving at the frozen sockets after the process was
    /// killed: the peers' packets must be held back.
    #[error("the peers keep sending: hold their packets back while checkpointing")]
    PeersKeepSending,
    /// A restore waiting for its image found it gone or changed each time
    /// it had its sockets ready, until its time was up.
    #[error("{0}: the image kept changing (or was removed) while the restore waited")]
    ImageChanged(String),
    /// Restoring one of the image's sockets failed.
    #[error("socket {index} ({connection}): {source}")]
    Restore {
        /// Its place in the image.
        index: usize,
        /// `local -> peer`.
        connection: String,
        /// Why.
        source: Box<RepairError>,
    },
}

/// The sockets taken from the process: its descriptor number and our copy.
type Taken = Vec<(RawFd, OwnedFd)>;

/// Checkpoints the sockets `fds` (empty: every connected TCP socket) of
/// process `pid` into the image file `output`, then kills the process or
/// lets it continue (see the [module docs](self) for the steps). On any
/// error the process continues, its sockets leave repair mode, the lock is
/// lifted and no image is left at `output`.
///
/// Without a lock the process is stopped first, and with [`After::Kill`] a
/// frozen socket still takes in what its peer sends until it closes: each
/// is checked again after the kill, and re-read (and the image rewritten)
/// if anything came.
pub fn checkpoint_process(
    pid: i32,
    fds: &[RawFd],
    after: After,
    output: &Path,
    options: &CheckpointOptions,
) -> Result<ImageFile, ProcessError> {
    let process = |source| ProcessError::Process { pid, source };
    let Some(timeout) = options.lock else {
        let stopped = handoff::stop(pid).map_err(process)?;
        let taken = take_sockets(pid, fds, |fd| stopped.take_fd(fd))?;
        return finish_checkpoint(pid, stopped, taken, None, after, output, options);
    };
    // With a lock: the sockets are taken and locked while the process
    // runs, so that it can finish with what it received before it stops.
    let taken = take_sockets(pid, fds, |fd| handoff::take_fd(pid, fd))?;
    let conns = taken
        .iter()
        .map(|(fd, s)| {
            connection(s).map_err(|source| ProcessError::Socket {
                pid,
                fd: *fd,
                source,
            })
        })
        .collect::<Result<Vec<Connection>, _>>()?;
    let lock = NetLock::new(&conns, timeout)?;
    for (fd, s) in &taken {
        reserve_send_buffer(s).map_err(|source| ProcessError::Socket {
            pid,
            fd: *fd,
            source,
        })?;
    }
    // The table first (tens of milliseconds: its chains are hooked in),
    // while nothing is dropped yet; then each direction is one quick set
    // update.
    step("ck start");
    lock.take(&[])?;
    step("ck table");
    let locked = (|| {
        lock.block(Direction::Outbound)?;
        step("ck out");
        wait_for_news(&taken);
        step("ck quiet");
        lock.block(Direction::Inbound)?;
        step("ck in");
        options.inject(FailPoint::Locked)?;
        wait_settled(pid, &taken);
        step("ck settled");
        let stopped = handoff::stop(pid).map_err(process)?;
        step("ck stopped");
        Ok(stopped)
    })();
    let stopped = match locked {
        Ok(stopped) => stopped,
        Err(e) => {
            let _ = lock.release();
            return Err(e);
        }
    };
    finish_checkpoint(pid, stopped, taken, Some(&lock), after, output, options)
}

/// The descriptors to take (all sockets when `fds` is empty, keeping the
/// connected TCP ones), taken with `take`.
fn take_sockets(
    pid: i32,
    fds: &[RawFd],
    take: impl Fn(RawFd) -> Result<OwnedFd, HandoffError>,
) -> Result<Taken, ProcessError> {
    let auto = fds.is_empty();
    let fds = if auto {
        handoff::socket_fds(pid).map_err(|source| ProcessError::Process { pid, source })?
    } else {
        fds.to_vec()
    };
    let mut taken = Vec::new();
    for fd in fds {
        let sock = match take(fd) {
            Ok(s) => s,
            // Picking automatically: a descriptor closed since the listing.
            Err(HandoffError::NoSuchFd { .. }) if auto => continue,
            Err(source) => return Err(ProcessError::Fd { pid, fd, source }),
        };
        match connection(&sock) {
            Ok(_) => taken.push((fd, sock)),
            // Picking automatically: listeners and other sockets stay.
            Err(RepairError::NotTcp | RepairError::Listening) if auto => {}
            Err(source) => return Err(ProcessError::Socket { pid, fd, source }),
        }
    }
    if taken.is_empty() {
        return Err(ProcessError::NoSockets(pid));
    }
    Ok(taken)
}

/// With our packets held back, waits until every socket has taken in
/// something new and then [`PEERS_CUT`] or two round trips went by; at most
/// [`PEERS_QUIET_MAX`] (a peer that sends nothing). Something new arrived
/// here is what the restored socket's first segment acknowledges, which
/// makes a streaming peer resend what the lock drops at once (see "Packets
/// dropped by the lock" in the [module docs](self)); the wait after the
/// first new byte lets what was already in flight, or sent in one burst at
/// the link's pace, arrive whole. A peer that pauses is waited for rather
/// than cut off after a quiet moment: what it sends after its pause arrives
/// here instead of meeting the inbound lock with nothing new to acknowledge
/// (its resending would then wait for its retransmission timeout).
fn wait_for_news(taken: &Taken) {
    let rtt = taken
        .iter()
        .filter_map(|(_, s)| smoothed_rtt(s).ok())
        .max()
        .unwrap_or_default();
    let cut = PEERS_CUT.max(2 * rtt);
    let received = |s: &OwnedFd| bytes_received(s).unwrap_or(0);
    let start = Instant::now();
    // Per socket: bytes received when our packets were first held back,
    // and when more had come.
    let mut seen: Vec<(u64, Option<Instant>)> =
        taken.iter().map(|(_, s)| (received(s), None)).collect();
    let done = |seen: &[(u64, Option<Instant>)]| {
        seen.iter()
            .all(|&(_, first)| first.is_some_and(|first| first.elapsed() >= cut))
    };
    while start.elapsed() < PEERS_QUIET_MAX && !done(&seen) {
        std::thread::sleep(Duration::from_micros(100));
        for ((_, s), (before, first)) in taken.iter().zip(seen.iter_mut()) {
            if first.is_none() && received(s) != *before {
                *first = Some(Instant::now());
            }
        }
    }
}

/// Waits (at most [`SETTLE_MAX`]) until the process is idle, seen twice in
/// a row: every thread sleeps, its sockets have nothing left to read and
/// room to write, and none of its pipes holds data. A server that only
/// reacts to its peers has then done with what it received (nothing new
/// can arrive through the lock) and holds none of it in its own buffers or
/// pipes. A process still busy at the deadline is stopped where it is
/// (what it holds in its memory then dies with it).
fn wait_settled(pid: i32, taken: &Taken) {
    let pipes: Vec<OwnedFd> = handoff::pipe_fds(pid)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|fd| handoff::take_fd(pid, fd).ok())
        .collect();
    let start = Instant::now();
    let mut settled = 0;
    while settled < 2 && start.elapsed() < SETTLE_MAX {
        let asleep = matches!(handoff::thread_states(pid),
            Ok(states) if !states.is_empty() && states.iter().all(|&s| s == 'S'));
        let sockets = taken
            .iter()
            .all(|(_, s)| writable(s).unwrap_or(true) && unread(s).unwrap_or(0) == 0);
        let pipes_empty = pipes.iter().all(|p| unread(p).unwrap_or(0) == 0);
        settled = if asleep && sockets && pipes_empty {
            settled + 1
        } else {
            0
        };
        if settled < 2 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Steps 3 and 4 of the [module docs](self), with the process stopped.
fn finish_checkpoint(
    pid: i32,
    stopped: Stopped,
    taken: Taken,
    lock: Option<&NetLock>,
    after: After,
    output: &Path,
    options: &CheckpointOptions,
) -> Result<ImageFile, ProcessError> {
    let process = |source| ProcessError::Process { pid, source };
    let fail = |point| options.inject(point);
    let mut image = ImageFile::default();
    let mut written = false;
    let placed = &mut None;
    let result = (|| {
        fail(FailPoint::Stopped)?;
        for (fd, sock) in &taken {
            let s = checkpoint(sock).map_err(|source| ProcessError::Socket {
                pid,
                fd: *fd,
                source,
            })?;
            image.sockets.push(s);
        }
        fail(FailPoint::Checkpointed)?;
        step("ck checkpointed");
        image.validate()?;
        let bytes = image.encode();
        // While the image is written: the lock is checked (a netlink
        // request), and the encoding decoded again, which must give the
        // image back. The file read back must then be the encoding, byte
        // for byte: together, the file decodes to the image.
        std::thread::scope(|scope| {
            let check = lock.map(|l| scope.spawn(|| l.check(Direction::Inbound)));
            let decoded = scope.spawn(|| ImageFile::decode(&bytes).is_ok_and(|d| d == image));
            // Flushed to disk only once the process is killed (below): see
            // the module docs.
            *placed = Some(image::place_unflushed(&bytes, output)?);
            step("ck written");
            written = true;
            fail(FailPoint::Written)?;
            let read_back = ImageFile::read_bytes(output)?;
            if !decoded.join().unwrap_or(false) || read_back != bytes {
                return Err(ProcessError::Verify(output.display().to_string()));
            }
            fail(FailPoint::Verified)?;
            step("ck verified");
            if let Some(check) = check {
                check.join().map_err(|_| LockError::NotHeld)??;
            }
            step("ck checked");
            fail(FailPoint::LockChecked)
        })
    })();
    let frozen = || taken.iter().zip(&image.sockets);
    if let Err(e) = result {
        // Undo in order: the image goes (a restore started early must not
        // find it), packets flow again, the sockets leave repair mode (the
        // kernel's window probe then finds where the peer is), the process
        // continues, the lock's table goes.
        if written {
            let _ = std::fs::remove_file(output);
        }
        if let Some(lock) = lock {
            let _ = lock.unblock(&[Direction::Inbound, Direction::Outbound]);
        }
        for ((_, s), img) in frozen() {
            let _ = resume(s, img);
        }
        // (The guard resumes the process when dropped.)
        drop(stopped);
        if let Some(lock) = lock {
            let _ = lock.release();
        }
        return Err(e);
    }
    match after {
        After::Continue => {
            if let Some(lock) = lock {
                let _ = lock.unblock(&[Direction::Inbound, Direction::Outbound]);
            }
            // Every socket is resumed before any error is reported.
            let mut first_error = None;
            for ((fd, s), img) in frozen() {
                if let Err(source) = resume(s, img) {
                    first_error.get_or_insert(ProcessError::Socket {
                        pid,
                        fd: *fd,
                        source,
                    });
                }
            }
            stopped.resume().map_err(process)?;
            if let Some(lock) = lock {
                lock.release()?;
            }
            if let Some(placed) = placed.take() {
                placed.flush()?;
            }
            first_error.map_or(Ok(image), Err)
        }
        After::Kill => {
            // Not waiting for it to die (a millisecond or more): its
            // sockets are frozen, and leave the kernel's tables below (or,
            // without a lock, when it and this process let go of them; a
            // restore here waits for that, CLOSE_GRACE).
            stopped.kill_no_wait().map_err(process)?;
            step("ck killed");
            for _ in 0..RECHECKS {
                let mut changed = false;
                for ((fd, sock), img) in taken.iter().zip(image.sockets.iter_mut()) {
                    let socket = |source| ProcessError::Socket {
                        pid,
                        fd: *fd,
                        source,
                    };
                    if !unchanged(sock, img).map_err(socket)? {
                        // Read again in repair mode, which reports
                        // SO_REUSEADDR set: the application's choice is
                        // the first image's.
                        let reuseaddr = img.options.reuseaddr;
                        *img = checkpoint(sock).map_err(socket)?;
                        img.options.reuseaddr = reuseaddr;
                        changed = true;
                    }
                }
                if !changed {
                    if lock.is_some() {
                        // Out of the kernel's tables now rather than when
                        // the dying process and this one let go: a restore
                        // here waits for that. (Under the lock only:
                        // without it, what the peer sends meanwhile would
                        // meet no socket and be answered with a reset.)
                        for (_, sock) in &taken {
                            let _ = disconnect_silently(sock);
                        }
                        step("ck disconnected");
                    }
                    // On disk before the checkpoint says it is done (an
                    // image rewritten below already is).
                    if let Some(placed) = placed.take() {
                        placed.flush()?;
                    }
                    step("ck flushed");
                    return Ok(image);
                }
                image.write_to(output)?;
                *placed = None;
            }
            Err(ProcessError::PeersKeepSending)
        }
    }
}

/// Restores every socket of `image`: all are rebuilt in repair mode
/// first, then `lock` (the image's network lock on this host, if any) lets
/// their packets through, then each goes live. If one fails, those already
/// restored are abandoned (closed silently: the image still holds their
/// connections) and the lock, if it was not lifted yet, stays.
///
/// The lock's table is left in place (empty): remove it with
/// [`NetLock::release`] once the sockets are handed on (that takes tens of
/// milliseconds, which the new owner should not wait for).
pub fn restore_all(
    image: &ImageFile,
    lock: Option<&NetLock>,
) -> Result<Vec<OwnedFd>, ProcessError> {
    step("rs start");
    let prepared = prepare_all(image, None)?;
    go_live_all(image, prepared, lock)
}

/// [`restore_all`] of the image at `path` by a restore started early: before
/// the checkpoint that writes the image is done, or before the image's
/// addresses have moved to this host. Waits, at most `wait` in all, for the
/// image to appear, for each connection's local address to be here and for
/// the checkpointed sockets to be gone from this host; then reads the image
/// again and starts over if it is no longer there or differs (a checkpoint
/// that failed removes its image). Returns the image restored, its lock on
/// this host (lifted; `lock_timeout` `None`: no lock) and the sockets.
///
/// Only for checkpoints under a network lock: without one, a checkpoint may
/// rewrite its image after the process is killed (what the peers sent
/// meanwhile), after a restore on another host has read it. Across hosts,
/// the address must move here only once the checkpoint has succeeded (on
/// one host, the checkpointed sockets close only then).
pub fn restore_when_ready(
    path: &Path,
    wait: Duration,
    lock_timeout: Option<Duration>,
) -> Result<(ImageFile, Option<NetLock>, Vec<OwnedFd>), ProcessError> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (image, bytes) = ImageFile::wait_read_bytes(path, left)?;
        step("rs image");
        let prepared = prepare_all(&image, Some(deadline))?;
        step("rs connected");
        // The checkpointed sockets are gone (on this host): the image is the
        // last its checkpoint wrote, unless that checkpoint failed. (The
        // same bytes: the same image, without decoding it again.)
        match ImageFile::read_bytes(path) {
            Ok(again) if again == bytes => {
                let lock = lock_timeout.map(|t| image_lock(&image, t)).transpose()?;
                let sockets = go_live_all(&image, prepared, lock.as_ref())?;
                return Ok((image, lock, sockets));
            }
            // Dropped in repair mode: closed silently.
            _ => drop(prepared),
        }
        if Instant::now() >= deadline {
            return Err(ProcessError::ImageChanged(path.display().to_string()));
        }
    }
}

/// Every socket of `image` rebuilt in repair mode. With a `deadline`, a
/// socket whose local address is not on this host yet, or whose connection
/// still has a socket here, is tried again until then.
fn prepare_all(
    image: &ImageFile,
    deadline: Option<Instant>,
) -> Result<Vec<Prepared<'_>>, ProcessError> {
    let mut prepared = Vec::with_capacity(image.sockets.len());
    for (index, s) in image.sockets.iter().enumerate() {
        let p = loop {
            match prepare(s) {
                Err(RepairError::AddressNotLocal(_) | RepairError::ConnectionExists(..))
                    if deadline.is_some_and(|d| Instant::now() < d) =>
                {
                    std::thread::sleep(Duration::from_micros(200));
                }
                other => break other,
            }
        };
        prepared.push(p.map_err(|e| restore_failed(image, index, e))?);
    }
    Ok(prepared)
}

/// Lifts `lock` and takes the `prepared` sockets of `image` live (see
/// [`restore_all`]).
fn go_live_all(
    image: &ImageFile,
    prepared: Vec<Prepared<'_>>,
    lock: Option<&NetLock>,
) -> Result<Vec<OwnedFd>, ProcessError> {
    if let Some(lock) = lock {
        step("rs prepared");
        lock.unblock(&[Direction::Inbound, Direction::Outbound])?;
        step("rs unblocked");
    }
    let mut sockets = Vec::with_capacity(prepared.len());
    for (index, p) in prepared.into_iter().enumerate() {
        match p.go_live() {
            Ok(stream) => sockets.push(OwnedFd::from(stream)),
            Err(source) => {
                abandon_all(&sockets);
                return Err(restore_failed(image, index, source));
            }
        }
    }
    step("rs live");
    Ok(sockets)
}

fn restore_failed(image: &ImageFile, index: usize, source: RepairError) -> ProcessError {
    let s = &image.sockets[index];
    ProcessError::Restore {
        index,
        connection: format!("{} -> {}", s.local, s.peer),
        source: Box::new(source),
    }
}

/// The network lock of an image's connections (the same on every host).
pub fn image_lock(image: &ImageFile, timeout: Duration) -> Result<NetLock, LockError> {
    let conns: Vec<Connection> = image
        .sockets
        .iter()
        .map(|s| Connection {
            local: s.local,
            peer: s.peer,
        })
        .collect();
    NetLock::new(&conns, timeout)
}

/// Puts restored sockets back into repair mode so that dropping them says
/// nothing to their peers (when they cannot be handed on after all).
pub fn abandon_all(sockets: &[OwnedFd]) {
    for s in sockets {
        let _ = abandon(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_points_parse_by_name() {
        for p in FailPoint::ALL {
            assert_eq!(p.name().parse::<FailPoint>().unwrap(), p);
        }
        let e = "nope".parse::<FailPoint>().unwrap_err();
        assert!(e.contains("lock-checked"), "{e}");
    }
}
