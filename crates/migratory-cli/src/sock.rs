//! `migratory sock`: MIGSOCK on modern Linux. Checkpoint a process's live
//! TCP sockets into an image file, restore them here or on another host
//! (that took over the address) into a cooperating process or a command,
//! inspect images, and hand a listening socket to a new process for a
//! zero-downtime restart.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;

use clap::{Args, Subcommand};
use migratory_repair::handoff::{self, exec_with_fds, send_sockets, take_fd};
use migratory_repair::process::{abandon_all, checkpoint_process, restore_all, After};
use migratory_repair::{is_tcp_listener, ImageFile};

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
    let after = if a.kill { After::Kill } else { After::Continue };
    let image = checkpoint_process(a.pid, &a.fds, after, &a.output).map_err(|e| e.to_string())?;
    eprintln!(
        "{}: {} socket(s) from pid {}",
        a.output.display(),
        image.sockets.len(),
        a.pid
    );
    Ok(true)
}

fn restore_cmd(a: RestoreArgs) -> Result<bool, String> {
    let image = ImageFile::read_from(&a.image).map_err(|e| e.to_string())?;
    // Where the sockets go is checked first: a restored socket that cannot
    // be handed on is abandoned (closed silently), and the image stays
    // good for another try.
    let channel = match &a.send {
        Some(target) => {
            let path = target
                .strip_prefix("unix:")
                .ok_or_else(|| format!("--send {target:?}: want unix:PATH"))?;
            let channel = UnixStream::connect(path).map_err(|e| format!("--send {path}: {e}"))?;
            Some((path.to_string(), channel))
        }
        None => None,
    };
    let argv = a.exec.unwrap_or_default();
    if channel.is_none() && argv.is_empty() {
        return Err("--exec needs a command".into());
    }
    let sockets = restore_all(&image).map_err(|e| e.to_string())?;
    eprintln!(
        "{}: {} socket(s) restored",
        a.image.display(),
        sockets.len()
    );
    let give_up = |e: String| {
        abandon_all(&sockets);
        e
    };
    if let Some((path, channel)) = channel {
        let fds: Vec<_> = sockets.iter().map(|s| s.as_fd()).collect();
        send_sockets(&channel, &fds, &image.app_state)
            .map_err(|e| give_up(format!("--send {path}: {e}")))?;
        eprintln!("{} socket(s) sent to {path}", sockets.len());
        return Ok(true);
    }
    let (prog, args) = argv.split_first().expect("checked above");
    let mut cmd = Command::new(prog);
    cmd.args(args);
    // The child gets copies; ours make a failed start silent.
    let copies = sockets
        .iter()
        .map(|s| s.try_clone())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| give_up(format!("dup: {e}")))?;
    let mut child =
        exec_with_fds(&mut cmd, copies).map_err(|e| give_up(format!("--exec {prog}: {e}")))?;
    drop(sockets);
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
                match take_fd(a.pid, fd) {
                    Ok(s) if is_tcp_listener(&s) => found.push(s),
                    Ok(_) => {}
                    // A connection that closed since the listing.
                    Err(handoff::HandoffError::NoSuchFd { .. }) => {}
                    Err(e) => return Err(format!("pid {} fd {fd}: {e}", a.pid)),
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
