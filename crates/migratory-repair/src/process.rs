//! MIGSOCK's controlling program (seed 004, start_migrate and
//! finish_migrate): checkpoint the TCP sockets of a running process into an
//! image file, and restore an image's sockets to hand them on. Nothing is
//! left half-done: a failed checkpoint resumes the sockets and the process,
//! a failed restore closes what it restored silently.

use std::os::fd::{OwnedFd, RawFd};
use std::path::Path;

use thiserror::Error;

use crate::handoff::{self, HandoffError};
use crate::image::{ImageError, ImageFile};
use crate::repair::{abandon, checkpoint, restore, resume, unchanged, RepairError};

/// Times a killed process's sockets are checked again (and re-read) before
/// they close.
const RECHECKS: usize = 10;

/// What becomes of the process once its sockets are in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Kill it: its sockets close silently when this process lets go of
    /// them (migration).
    Kill,
    /// Resume its sockets and let it carry on (a snapshot).
    Continue,
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
    /// Data kept arriving at the frozen sockets after the process was
    /// killed: the peers' packets must be held back.
    #[error("the peers keep sending: hold their packets back while checkpointing")]
    PeersKeepSending,
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

/// Stops process `pid`, checkpoints its sockets `fds` (empty: every
/// connected TCP socket it has), writes the image to `output`, then kills
/// the process or lets it continue. On any error the sockets leave repair
/// mode and the process continues.
///
/// With [`After::Kill`], a frozen socket still takes in what its peer sends
/// until it closes: each is checked again after the kill, and re-read (and
/// the image rewritten) if anything came.
pub fn checkpoint_process(
    pid: i32,
    fds: &[RawFd],
    after: After,
    output: &Path,
) -> Result<ImageFile, ProcessError> {
    let process = |source| ProcessError::Process { pid, source };
    let stopped = handoff::stop(pid).map_err(process)?;
    let auto = fds.is_empty();
    let fds = if auto {
        handoff::socket_fds(pid).map_err(process)?
    } else {
        fds.to_vec()
    };
    let mut taken: Vec<(RawFd, OwnedFd)> = Vec::new();
    for fd in fds {
        match stopped.take_fd(fd) {
            Ok(s) => taken.push((fd, s)),
            // Picking automatically: a descriptor closed since the listing.
            Err(HandoffError::NoSuchFd { .. }) if auto => {}
            Err(source) => return Err(ProcessError::Fd { pid, fd, source }),
        }
    }
    let mut image = ImageFile::default();
    let mut frozen: Vec<&OwnedFd> = Vec::new();
    let mut failure = None;
    for (fd, sock) in &taken {
        match checkpoint(sock) {
            Ok(s) => {
                image.sockets.push(s);
                frozen.push(sock);
            }
            // Picking automatically: listeners and other sockets stay.
            Err(RepairError::NotTcp | RepairError::Listening) if auto => {}
            Err(source) => {
                failure = Some(ProcessError::Socket {
                    pid,
                    fd: *fd,
                    source,
                });
                break;
            }
        }
    }
    if failure.is_none() && image.sockets.is_empty() {
        failure = Some(ProcessError::NoSockets(pid));
    }
    if failure.is_none() {
        failure = image.write_to(output).err().map(ProcessError::from);
    }
    if let Some(e) = failure {
        for (s, img) in frozen.iter().zip(&image.sockets) {
            let _ = resume(*s, img);
        }
        // (The guard resumes the process when dropped.)
        drop(stopped);
        return Err(e);
    }
    match after {
        After::Continue => {
            // Every socket is resumed before any error is reported.
            let mut first_error = None;
            for ((fd, _), (s, img)) in taken.iter().zip(frozen.iter().zip(&image.sockets)) {
                if let Err(source) = resume(*s, img) {
                    first_error.get_or_insert(ProcessError::Socket {
                        pid,
                        fd: *fd,
                        source,
                    });
                }
            }
            stopped.resume().map_err(process)?;
            first_error.map_or(Ok(image), Err)
        }
        After::Kill => {
            stopped.kill().map_err(process)?;
            for _ in 0..RECHECKS {
                let mut changed = false;
                for ((fd, _), (sock, img)) in taken
                    .iter()
                    .zip(frozen.iter().zip(image.sockets.iter_mut()))
                {
                    let socket = |source| ProcessError::Socket {
                        pid,
                        fd: *fd,
                        source,
                    };
                    if !unchanged(*sock, img).map_err(socket)? {
                        *img = checkpoint(*sock).map_err(socket)?;
                        changed = true;
                    }
                }
                if !changed {
                    return Ok(image);
                }
                image.write_to(output)?;
            }
            Err(ProcessError::PeersKeepSending)
        }
    }
}

/// Restores every socket of `image`. If one fails, those already restored
/// are abandoned (closed silently: the image still holds their
/// connections).
pub fn restore_all(image: &ImageFile) -> Result<Vec<OwnedFd>, ProcessError> {
    let mut sockets = Vec::with_capacity(image.sockets.len());
    for (index, s) in image.sockets.iter().enumerate() {
        match restore(s) {
            Ok(stream) => sockets.push(OwnedFd::from(stream)),
            Err(source) => {
                abandon_all(&sockets);
                return Err(ProcessError::Restore {
                    index,
                    connection: format!("{} -> {}", s.local, s.peer),
                    source: Box::new(source),
                });
            }
        }
    }
    Ok(sockets)
}

/// Puts restored sockets back into repair mode so that dropping them says
/// nothing to their peers (when they cannot be handed on after all).
pub fn abandon_all(sockets: &[OwnedFd]) {
    for s in sockets {
        let _ = abandon(s);
    }
}
