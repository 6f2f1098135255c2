//! `migratory sock`: MIGSOCK on modern Linux. Checkpoint a process's live
//! TCP sockets into an image file, restore them here or on another host
//! (that took over the address) into a cooperating process or a command,
//! inspect images, and hand a listening socket to a new process for a
//! zero-downtime restart. While a connection moves, a network lock
//! (nftables, `migratory_repair::lock`) keeps its packets from reaching a
//! socket that is frozen or not yet restored.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use clap::{Args, Subcommand};
use migratory_repair::handoff::{self, exec_with_fds, send_sockets, take_fd};
use migratory_repair::lock::{self, Direction, DEFAULT_TIMEOUT};
use migratory_repair::process::{
    abandon_all, checkpoint_process, image_lock, restore_all, restore_when_ready, After,
    CheckpointOptions, FailPoint, Fault,
};
use migratory_repair::steps::step;
use migratory_repair::{is_tcp_listener, Connection, ImageFile, NetLock};

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
    /// On the host that will restore an image, drop its connections'
    /// packets from now on (before the address moves here), until
    /// `restore` lifts the lock or it expires.
    Lock(LockArgs),
    /// Remove network locks: an image's, or every lock this tool left on
    /// this host (e.g. after it was killed mid-move).
    Unlock(UnlockArgs),
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
    #[command(flatten)]
    lock: LockOpts,
    /// Fail on purpose after this step (tests of the failure paths):
    /// locked, stopped, checkpointed, written, verified, lock-checked.
    #[arg(long, value_name = "STEP", hide = true)]
    fail_at: Option<FailPoint>,
    /// Hang (for a minute, then fail) after this step: tests kill the tool
    /// there.
    #[arg(long, value_name = "STEP", hide = true, conflicts_with = "fail_at")]
    hang_at: Option<FailPoint>,
}

/// The network lock options.
#[derive(Args, Debug)]
pub struct LockOpts {
    /// Take no network lock: the caller holds the peers' packets back
    /// itself (the behaviour before locks existed).
    #[arg(long)]
    no_lock: bool,
    /// How long the lock holds if nobody lifts it (e.g. this tool is
    /// killed): traffic then resumes by itself.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_timeout)]
    lock_timeout: Duration,
}

fn parse_connection(s: &str) -> Result<Connection, String> {
    let (local, peer) = s
        .split_once(',')
        .ok_or("want LOCAL,PEER (two addresses with ports)")?;
    let addr = |a: &str| {
        a.trim()
            .parse::<std::net::SocketAddr>()
            .map_err(|e| format!("{a:?}: {e}"))
    };
    Ok(Connection {
        local: addr(local)?,
        peer: addr(peer)?,
    })
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) || d > lock::MAX_TIMEOUT {
        return Err("must be between 1s and 24h".into());
    }
    Ok(d)
}

/// Options of `migratory sock lock`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["image", "connection"])))]
pub struct LockArgs {
    /// The image whose connections to lock.
    #[arg(value_name = "IMAGE")]
    image: Option<PathBuf>,
    /// A connection to lock, as this host will see it once it has the
    /// address: LOCAL,PEER (e.g. 10.0.0.10:7000,10.0.0.1:40000;
    /// repeatable). Lets the restoring host lock before the image exists,
    /// so that making the lock's table is off the move's critical path.
    #[arg(long, value_name = "LOCAL,PEER", value_parser = parse_connection)]
    connection: Vec<Connection>,
    /// How long the lock holds if nobody lifts it.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_timeout)]
    lock_timeout: Duration,
}

/// Options of `migratory sock unlock`.
#[derive(Args, Debug)]
pub struct UnlockArgs {
    /// Lift only this image's lock. Default: every lock left on this host
    /// (in this network namespace).
    #[arg(value_name = "IMAGE")]
    image: Option<PathBuf>,
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
    /// Lift no network lock (none was taken, or the caller lifts it).
    #[arg(long)]
    no_lock: bool,
    /// Start before the checkpoint is done (or before the address has
    /// moved here) and wait, at most this long, for the image to appear,
    /// its addresses to be here and the checkpointed sockets to close:
    /// the restore is then ready the moment the checkpoint ends. Remove
    /// the previous image at this path first, and move the address here
    /// only once the checkpoint has succeeded. Needs the network lock.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with = "no_lock")]
    wait: Option<Duration>,
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
        SockCommand::Lock(a) => {
            let lock = match &a.image {
                Some(path) => {
                    let image = ImageFile::read_from(path).map_err(|e| e.to_string())?;
                    image_lock(&image, a.lock_timeout)
                }
                None => NetLock::new(&a.connection, a.lock_timeout),
            }
            .map_err(|e| e.to_string())?;
            lock.take(&[Direction::Inbound])
                .map_err(|e| e.to_string())?;
            eprintln!(
                "{} connection(s) locked for at most {}",
                lock.connections().len(),
                humantime::format_duration(a.lock_timeout)
            );
            Ok(true)
        }
        SockCommand::Unlock(a) => {
            let removed = match a.image {
                Some(path) => {
                    let image = ImageFile::read_from(&path).map_err(|e| e.to_string())?;
                    let lock = image_lock(&image, DEFAULT_TIMEOUT).map_err(|e| e.to_string())?;
                    lock.release().map_err(|e| e.to_string())?;
                    vec![lock.table().to_string()]
                }
                None => lock::release_all().map_err(|e| e.to_string())?,
            };
            eprintln!("{} lock table(s) removed", removed.len());
            Ok(true)
        }
        SockCommand::Handoff(a) => handoff_cmd(a),
    }
}

fn checkpoint_cmd(a: CheckpointArgs) -> Result<bool, String> {
    step("ck main");
    let after = if a.kill { After::Kill } else { After::Continue };
    let options = CheckpointOptions {
        lock: (!a.lock.no_lock).then_some(a.lock.lock_timeout),
        fault: match (a.fail_at, a.hang_at) {
            (Some(p), _) => Some((p, Fault::Fail)),
            (None, Some(p)) => Some((p, Fault::Hang)),
            (None, None) => None,
        },
    };
    let image =
        checkpoint_process(a.pid, &a.fds, after, &a.output, &options).map_err(|e| e.to_string())?;
    step("ck done");
    eprintln!(
        "{}: {} socket(s) from pid {}",
        a.output.display(),
        image.sockets.len(),
        a.pid
    );
    Ok(true)
}

fn restore_cmd(a: RestoreArgs) -> Result<bool, String> {
    step("rs main");
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
    let (image, lock, sockets) = match a.wait {
        Some(wait) => {
            restore_when_ready(&a.image, wait, Some(DEFAULT_TIMEOUT)).map_err(|e| e.to_string())?
        }
        None => {
            let image = ImageFile::read_from(&a.image).map_err(|e| e.to_string())?;
            let lock = if a.no_lock {
                None
            } else {
                Some(image_lock(&image, DEFAULT_TIMEOUT).map_err(|e| e.to_string())?)
            };
            let sockets = restore_all(&image, lock.as_ref()).map_err(|e| e.to_string())?;
            (image, lock, sockets)
        }
    };
    // The sockets are live and the packets flow; the lock's (empty) table
    // goes once the new owner has them.
    let release = || {
        if let Some(lock) = &lock {
            if let Err(e) = lock.release() {
                eprintln!("warning: {e}");
            }
        }
    };
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
        release();
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
    step("rs spawned");
    drop(sockets);
    release();
    step("rs released");
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
