//! `migratory sock`: MIGSOCK on modern Linux. Checkpoint a process's live
//! TCP sockets into an image file, restore them here or on another host
//! (that took over the address) into a cooperating process or a command,
//! inspect images, and hand a listening socket to a new process for a
//! zero-downtime restart.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;

use clap::{Args, Subcommand};
use migratory_repair::handoff::{self, exec_with_fds, send_sockets, take_fd};
use migratory_repair::{checkpoint, is_tcp_listener, restore, resume, ImageFile, RepairError};

/// `migratory sock` subcommands.
#[derive(Subcommand, Debug)]
pub enum SockCommand {
    /// Stop a process, take its TCP sockets and write them to an image
    /// (MIGSOCK's start_migrate). The sockets stay silent: no FIN, no RST.
    /// Without --kill the process then continues as before (a snapshot).
    Checkpoint(CheckpointArgs),
    /// Restore an image's sockets and hand them on (MIGSOCK's
    /// finish_migrate): to a cooperating process (--send) or to a command
    /// started with them as fds 3.. (--exec).
    Restore(RestoreArgs),
    /// Print what an image holds.
    Inspect(InspectArgs),
    /// Zero-downtime restart of a listening service: start a new process
    /// with the old one's listening socket as fd 3 (LISTEN_FDS), then stop
    /// the old one. The socket never closes, so no connection is refused.
    Handoff(HandoffArgs),
}

/// Options of `migratory sock checkpoint`.
#[derive(Args, Debug)]
pub struct CheckpointArgs {
    /// The process that owns the sockets.
    #[arg(long, value_name = "PID")]
    pid: i32,
    /// A socket's descriptor number in that process (repeatable; see
    /// /proc/PID/fd). Default: every connected TCP socket of the process.
    #[arg(long = "fd", value_name = "N")]
    fds: Vec<i32>,
    /// Where to write the image.
    #[arg(short = 'o', long = "output", value_name = "IMAGE")]
    output: PathBuf,
    /// Kill the process after the image is written (migration). Without
    /// it, the sockets leave repair mode and the process continues.
    #[arg(long)]
    kill: bool,
}

/// Options of `migratory sock restore`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("to").required(true).args(["send", "exec"])))]
pub struct RestoreArgs {
    /// The image file.
    #[arg(value_name = "IMAGE")]
    image: PathBuf,
    /// Send the sockets and the image's application state over this unix
    /// socket (unix:PATH) to a cooperating process.
    #[arg(long, value_name = "unix:PATH")]
    send: Option<String>,
    /// Run this command with the sockets as fds 3.. (LISTEN_FDS and
    /// LISTEN_PID set) and exit with its status, e.g. `--exec socat FD:3
    /// TCP:backend:80`.
    #[arg(long, value_name = "CMD", num_args = 1.., allow_hyphen_values = true)]
    exec: Option<Vec<String>>,
}

/// Options of `migratory sock inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The image file.
    #[arg(value_name = "IMAGE")]
    image: PathBuf,
}

/// Options of `migratory sock handoff`.
#[derive(Args, Debug)]
pub struct HandoffArgs {
    /// The running service.
    #[arg(long, value_name = "PID")]
    pid: i32,
    /// Its listening socket's descriptor number. Default: its only
    /// listening TCP socket.
    #[arg(long, value_name = "N")]
    fd: Option<i32>,
    /// The new service, started with the socket as fd 3; this command
    /// waits for it and exits with its status.
    #[arg(long, value_name = "CMD", num_args = 1.., required = true, allow_hyphen_values = true)]
    exec: Vec<String>,
}

/// Runs a `sock` subcommand.
pub fn run(cmd: SockCommand) -> Result<bool, String> {
    match cmd {
        SockCommand::Checkpoint(a) => checkpoint_cmd(a),
        SockCommand::Restore(a) => restore_cmd(a),
        SockCommand::Inspect(a) => {
            let image = ImageFile::read_from(&a.image).map_err(|e| e.to_string())?;
            println!("{image}");
            Ok(true)
        }
        SockCommand::Handoff(a) => handoff_cmd(a),
    }
}

fn checkpoint_cmd(a: CheckpointArgs) -> Result<bool, String> {
    let stopped = handoff::stop(a.pid).map_err(|e| format!("pid {}: {e}", a.pid))?;
    let auto = a.fds.is_empty();
    let fds = if auto {
        handoff::socket_fds(a.pid).map_err(|e| format!("pid {}: {e}", a.pid))?
    } else {
        a.fds.clone()
    };
    let mut taken: Vec<OwnedFd> = Vec::new();
    for fd in &fds {
        taken.push(take_fd(a.pid, *fd).map_err(|e| format!("pid {} fd {fd}: {e}", a.pid))?);
    }
    let mut image = ImageFile::default();
    let mut frozen: Vec<&OwnedFd> = Vec::new();
    let mut failure = None;
    for (fd, sock) in fds.iter().zip(&taken) {
        match checkpoint(sock) {
            Ok(s) => {
                image.sockets.push(s);
                frozen.push(sock);
            }
            // Picking automatically: listeners and other sockets stay.
            Err(RepairError::NotTcp | RepairError::Listening) if auto => {}
            Err(e) => {
                failure = Some(format!("pid {} fd {fd}: {e}", a.pid));
                break;
            }
        }
    }
    if failure.is_none() && image.sockets.is_empty() {
        failure = Some(format!("pid {}: no connected TCP socket", a.pid));
    }
    if failure.is_none() {
        if let Err(e) = image.write_to(&a.output) {
            failure = Some(e.to_string());
        }
    }
    if let Some(e) = failure {
        // Nothing half-done: the sockets leave repair mode, the process
        // carries on.
        for s in frozen {
            let _ = resume(s);
        }
        stopped
            .resume()
            .map_err(|r| format!("{e}; and resuming failed: {r}"))?;
        return Err(e);
    }
    eprintln!(
        "{}: {} socket(s) from pid {}",
        a.output.display(),
        image.sockets.len(),
        a.pid
    );
    if a.kill {
        // Its descriptors close; ours keep the sockets (in repair mode)
        // until we exit, and then they close silently.
        stopped.kill().map_err(|e| format!("pid {}: {e}", a.pid))?;
    } else {
        for s in frozen {
            resume(s).map_err(|e| e.to_string())?;
        }
        stopped
            .resume()
            .map_err(|e| format!("pid {}: {e}", a.pid))?;
    }
    Ok(true)
}

fn restore_cmd(a: RestoreArgs) -> Result<bool, String> {
    let image = ImageFile::read_from(&a.image).map_err(|e| e.to_string())?;
    let mut sockets = Vec::new();
    for (i, s) in image.sockets.iter().enumerate() {
        // On error, the sockets restored so far close (silently enough: the
        // connection is lost either way) and nothing is handed on.
        let stream =
            restore(s).map_err(|e| format!("socket {i} ({} -> {}): {e}", s.local, s.peer))?;
        sockets.push(OwnedFd::from(stream));
    }
    eprintln!(
        "{}: {} socket(s) restored",
        a.image.display(),
        sockets.len()
    );
    if let Some(target) = a.send {
        let path = target
            .strip_prefix("unix:")
            .ok_or_else(|| format!("--send {target:?}: want unix:PATH"))?;
        let channel = UnixStream::connect(path).map_err(|e| format!("--send {path}: {e}"))?;
        let fds: Vec<_> = sockets.iter().map(|s| s.as_fd()).collect();
        send_sockets(&channel, &fds, &image.app_state)
            .map_err(|e| format!("--send {path}: {e}"))?;
        eprintln!("{} socket(s) sent to {path}", sockets.len());
        return Ok(true);
    }
    let argv = a.exec.unwrap_or_default();
    let (prog, args) = argv.split_first().ok_or("--exec needs a command")?;
    let mut cmd = Command::new(prog);
    cmd.args(args);
    let mut child = exec_with_fds(&mut cmd, sockets).map_err(|e| format!("--exec {prog}: {e}"))?;
    let status = child.wait().map_err(|e| format!("--exec {prog}: {e}"))?;
    Ok(status.success())
}

fn handoff_cmd(a: HandoffArgs) -> Result<bool, String> {
    let listener = match a.fd {
        Some(fd) => {
            let l = take_fd(a.pid, fd).map_err(|e| format!("pid {} fd {fd}: {e}", a.pid))?;
            if !is_tcp_listener(&l) {
                return Err(format!("pid {} fd {fd}: not a listening TCP socket", a.pid));
            }
            l
        }
        None => {
            let mut found = Vec::new();
            for fd in handoff::socket_fds(a.pid).map_err(|e| format!("pid {}: {e}", a.pid))? {
                let s = take_fd(a.pid, fd).map_err(|e| format!("pid {} fd {fd}: {e}", a.pid))?;
                if is_tcp_listener(&s) {
                    found.push(s);
                }
            }
            if found.len() != 1 {
                return Err(format!(
                    "pid {}: {} listening TCP sockets; say which with --fd",
                    a.pid,
                    found.len()
                ));
            }
            found.remove(0)
        }
    };
    let (prog, args) = a.exec.split_first().ok_or("--exec needs a command")?;
    let mut cmd = Command::new(prog);
    cmd.args(args);
    let mut child =
        exec_with_fds(&mut cmd, vec![listener]).map_err(|e| format!("--exec {prog}: {e}"))?;
    // Both processes now accept from the one socket; the old one can go.
    handoff::terminate(a.pid).map_err(|e| format!("pid {}: {e}", a.pid))?;
    eprintln!(
        "pid {}: listening socket handed to pid {}",
        a.pid,
        child.id()
    );
    let status = child.wait().map_err(|e| format!("--exec {prog}: {e}"))?;
    Ok(status.success())
}
