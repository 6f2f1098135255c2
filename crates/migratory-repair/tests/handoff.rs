//! Handing live sockets between processes: SCM_RIGHTS messages, the
//! socket-activation convention (`exec_with_fds` / `listen_fds`), and taking
//! descriptors out of a stopped process with `pidfd_getfd`.
//!
//! Every blocking call is bounded (socket timeouts, deadlines), and every
//! child process is killed and reaped when its test ends, even on a panic.
//! Taking descriptors from a child needs ptrace access to it: root, or a
//! Yama `ptrace_scope` below 2 (we are its parent); those tests skip, saying
//! so, otherwise.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use migratory_repair::handoff::{
    exec_with_fds, listen_fds, recv_sockets, send_sockets, socket_fds, stop, take_fd, terminate,
    HandoffError, MAX_BLOB, MAX_FDS,
};

const TIMEOUT: Duration = Duration::from_secs(20);
const HELPER_ENV: &str = "MIGRATORY_HANDOFF_TEST_HELPER";
const TARGET_ENV: &str = "MIGRATORY_HANDOFF_TEST_TARGET";

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

/// Kills and reaps the child when the test ends, however it ends.
struct ChildGuard(Child);

impl ChildGuard {
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

fn timeouts(s: &TcpStream) {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
}

fn accept_within(listener: &TcpListener, limit: Duration) -> (TcpStream, SocketAddr) {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((s, a)) => {
                listener.set_nonblocking(false).unwrap();
                s.set_nonblocking(false).unwrap();
                timeouts(&s);
                return (s, a);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection within {limit:?}");
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A listener, the server side of a connection accepted on it, and the peer.
fn tcp_setup() -> (TcpListener, TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    timeouts(&peer);
    let (server, _) = accept_within(&listener, TIMEOUT);
    (listener, server, peer)
}

/// Sends `a_to_b` from `a` to `b` and `b_to_a` back at the same time, each
/// side then shutting down its write half; checks both arrive byte-exact.
fn exchange(a: &TcpStream, b: &TcpStream, a_to_b: &[u8], b_to_a: &[u8]) {
    let mut a_w = a.try_clone().unwrap();
    let mut b_w = b.try_clone().unwrap();
    let (x, y) = (a_to_b.to_vec(), b_to_a.to_vec());
    let wa = thread::spawn(move || {
        a_w.write_all(&x).unwrap();
        a_w.shutdown(Shutdown::Write).unwrap();
    });
    let wb = thread::spawn(move || {
        b_w.write_all(&y).unwrap();
        b_w.shutdown(Shutdown::Write).unwrap();
    });
    let mut at_b = Vec::new();
    (&*b).read_to_end(&mut at_b).unwrap();
    let mut at_a = Vec::new();
    (&*a).read_to_end(&mut at_a).unwrap();
    wa.join().unwrap();
    wb.join().unwrap();
    assert!(
        at_b == a_to_b,
        "a->b: {} bytes of {}",
        at_b.len(),
        a_to_b.len()
    );
    assert!(
        at_a == b_to_a,
        "b->a: {} bytes of {}",
        at_a.len(),
        b_to_a.len()
    );
}

/// Everything `r` yields until end-of-file, read in a thread: a test waits
/// for it with a deadline (the child guard's kill ends the read).
fn read_all_async(mut r: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut out = Vec::new();
        let _ = r.read_to_end(&mut out);
        let _ = tx.send(out);
    });
    rx
}

fn read_line(s: &TcpStream) -> String {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

fn root() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0")
}

/// Whether we may `pidfd_getfd` from our own child: as root, or when Yama
/// allows a parent to trace its children (scope 0 or 1, or no Yama).
fn can_take_fds() -> bool {
    if root() {
        return true;
    }
    match fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") {
        Ok(scope) if scope.trim().parse::<u32>().unwrap_or(3) >= 2 => {
            eprintln!(
                "skipped: kernel.yama.ptrace_scope={} forbids pidfd_getfd without CAP_SYS_PTRACE \
                 (run the tests as root)",
                scope.trim()
            );
            false
        }
        _ => true,
    }
}

fn have(program: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        eprintln!("skipped: {program} is not installed");
    }
    found
}

/// The state letter of process `pid` in `/proc/PID/stat`.
fn state(pid: i32) -> char {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    rest.trim_start().chars().next().unwrap()
}

fn wait_for_state(pid: i32, wanted: impl Fn(char) -> bool, what: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while !wanted(state(pid)) {
        assert!(Instant::now() < deadline, "process {pid} never {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// The descriptor of `s`, for a child process, with our test timeouts
/// removed: socket options travel with the socket, and GNU cat, for one,
/// reports EAGAIN when a receive timeout expires.
fn for_child(s: TcpStream) -> OwnedFd {
    s.set_read_timeout(None).unwrap();
    s.set_write_timeout(None).unwrap();
    OwnedFd::from(s)
}

/// A header as `send_sockets` writes it (see the module documentation).
fn header(count: u32, blob_len: u64) -> Vec<u8> {
    let mut h = b"MIGRHOF1".to_vec();
    h.extend_from_slice(&count.to_le_bytes());
    h.extend_from_slice(&blob_len.to_le_bytes());
    h
}

fn channel() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
    }
    (a, b)
}

// ---------------------------------------------------------------------------
// SCM_RIGHTS
// ---------------------------------------------------------------------------

#[test]
fn sockets_and_blob_between_threads() {
    let (listener, server, peer) = tcp_setup();
    let listen_addr = listener.local_addr().unwrap();
    let (tx, rx) = channel();
    let blob = pattern(1 << 20, 7);
    let to_send = blob.clone();
    let sender = thread::spawn(move || {
        send_sockets(&tx, &[server.as_fd(), listener.as_fd()], &to_send).unwrap();
        // The sender's copies close here: only the received ones remain.
    });
    let (fds, got) = recv_sockets(&rx).unwrap();
    sender.join().unwrap();
    assert_eq!(fds.len(), 2);
    assert!(got == blob, "blob: {} bytes of {}", got.len(), blob.len());

    let mut fds = fds.into_iter();
    let stream = TcpStream::from(fds.next().unwrap());
    let listener = TcpListener::from(fds.next().unwrap());
    timeouts(&stream);
    assert_eq!(listener.local_addr().unwrap(), listen_addr);
    assert_eq!(stream.peer_addr().unwrap(), peer.local_addr().unwrap());

    // The received listener accepts a new connection.
    let client = TcpStream::connect(listen_addr).unwrap();
    timeouts(&client);
    let (accepted, from) = accept_within(&listener, TIMEOUT);
    assert_eq!(from, client.local_addr().unwrap());
    exchange(&client, &accepted, b"hello, new owner", b"hello, client");

    // The received stream carries data both ways, byte-exact.
    exchange(&peer, &stream, &pattern(300_000, 1), &pattern(200_000, 2));
}

#[test]
fn several_messages_follow_each_other_on_one_channel() {
    let (tx, rx) = channel();
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let big = pattern(100_000, 3);
    let big2 = big.clone();
    let sender = thread::spawn(move || {
        send_sockets(&tx, &[listeners[0].as_fd()], b"one").unwrap();
        send_sockets(&tx, &[], b"").unwrap();
        send_sockets(&tx, &[listeners[1].as_fd(), listeners[2].as_fd()], &big2).unwrap();
        send_sockets(&tx, &[], b"last").unwrap();
    });
    let (fds, blob) = recv_sockets(&rx).unwrap();
    assert_eq!(blob, b"one");
    assert_eq!(
        TcpListener::from(fds.into_iter().next().unwrap())
            .local_addr()
            .unwrap(),
        addrs[0]
    );
    let (fds, blob) = recv_sockets(&rx).unwrap();
    assert!(fds.is_empty() && blob.is_empty());
    let (fds, blob) = recv_sockets(&rx).unwrap();
    assert!(blob == big);
    let got: Vec<SocketAddr> = fds
        .into_iter()
        .map(|fd| TcpListener::from(fd).local_addr().unwrap())
        .collect();
    assert_eq!(got, addrs[1..]);
    let (fds, blob) = recv_sockets(&rx).unwrap();
    assert!(fds.is_empty());
    assert_eq!(blob, b"last");
    sender.join().unwrap();
    assert!(matches!(
        recv_sockets(&rx),
        Err(HandoffError::ChannelClosed)
    ));
}

#[test]
fn wire_format_is_the_documented_one() {
    let (tx, mut rx) = channel();
    send_sockets(&tx, &[], b"xyz").unwrap();
    let mut raw = [0u8; 23];
    rx.read_exact(&mut raw).unwrap();
    let mut expected = header(0, 3);
    expected.extend_from_slice(b"xyz");
    assert_eq!(&raw[..], &expected[..]);
}

/// Sends raw bytes with descriptors attached, bypassing `send_sockets`.
fn send_raw(channel: &UnixStream, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::mem::MaybeUninit;
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(8))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    let n = sendmsg(
        channel,
        &[std::io::IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .unwrap();
    assert_eq!(n, bytes.len());
}

#[test]
fn garbage_and_lies_on_the_channel_are_errors() {
    // Closed before anything.
    let (tx, rx) = channel();
    drop(tx);
    assert!(matches!(
        recv_sockets(&rx),
        Err(HandoffError::ChannelClosed)
    ));

    // Not a handoff message at all.
    let (mut tx, rx) = channel();
    tx.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let e = recv_sockets(&rx).unwrap_err();
    assert!(matches!(e, HandoffError::BadMagic { .. }), "{e:?}");
    assert!(e.to_string().contains("not a migratory handoff message"));

    // Cut in the header.
    let (mut tx, rx) = channel();
    tx.write_all(&header(0, 0)[..7]).unwrap();
    drop(tx);
    let e = recv_sockets(&rx).unwrap_err();
    assert!(
        matches!(
            e,
            HandoffError::Truncated {
                part: "header",
                got: 7,
                expected: 20
            }
        ),
        "{e:?}"
    );

    // Cut in the blob.
    let (mut tx, rx) = channel();
    tx.write_all(&header(0, 100)).unwrap();
    tx.write_all(&[1; 10]).unwrap();
    drop(tx);
    let e = recv_sockets(&rx).unwrap_err();
    assert!(
        matches!(
            e,
            HandoffError::Truncated {
                part: "blob",
                got: 10,
                expected: 100
            }
        ),
        "{e:?}"
    );

    // Announces descriptors it does not carry.
    let (mut tx, rx) = channel();
    tx.write_all(&header(2, 0)).unwrap();
    let e = recv_sockets(&rx).unwrap_err();
    assert!(
        matches!(
            e,
            HandoffError::FdCountMismatch {
                announced: 2,
                received: 0
            }
        ),
        "{e:?}"
    );

    // Carries a descriptor it does not announce: refused, and closed (the
    // witness, peer of the passed socket, sees end-of-file).
    let (tx, rx) = channel();
    let (passed, mut witness) = UnixStream::pair().unwrap();
    witness.set_read_timeout(Some(TIMEOUT)).unwrap();
    send_raw(&tx, &header(0, 0), &[passed.as_fd()]);
    drop(passed);
    let e = recv_sockets(&rx).unwrap_err();
    assert!(
        matches!(
            e,
            HandoffError::FdCountMismatch {
                announced: 0,
                received: 1
            }
        ),
        "{e:?}"
    );
    assert_eq!(witness.read(&mut [0u8; 1]).unwrap(), 0, "descriptor leaked");

    // Announces too much.
    let (mut tx, rx) = channel();
    tx.write_all(&header(0, MAX_BLOB as u64 + 1)).unwrap();
    let e = recv_sockets(&rx).unwrap_err();
    assert!(matches!(e, HandoffError::BlobTooLarge { .. }), "{e:?}");
    let (mut tx, rx) = channel();
    tx.write_all(&header(MAX_FDS as u32 + 1, 0)).unwrap();
    let e = recv_sockets(&rx).unwrap_err();
    assert!(
        matches!(e, HandoffError::TooManyFds { count: 254 }),
        "{e:?}"
    );

    // Nothing arrives within the channel's read timeout.
    let (_tx, rx) = channel();
    rx.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let e = recv_sockets(&rx).unwrap_err();
    assert!(matches!(e, HandoffError::Timeout { .. }), "{e:?}");

    // Pseudo-random garbage never panics and never succeeds.
    for seed in 0..200u32 {
        let len = (seed as usize * 7919) % 90;
        let (mut tx, rx) = channel();
        tx.write_all(&pattern(len, seed)).unwrap();
        drop(tx);
        assert!(recv_sockets(&rx).is_err(), "seed {seed}");
    }
}

#[test]
fn sender_refuses_what_cannot_be_sent() {
    let (tx, _rx) = channel();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let many = vec![l.as_fd(); MAX_FDS + 1];
    let e = send_sockets(&tx, &many, b"").unwrap_err();
    assert!(
        matches!(e, HandoffError::TooManyFds { count: 254 }),
        "{e:?}"
    );
    let huge = vec![0u8; MAX_BLOB + 1];
    let e = send_sockets(&tx, &[], &huge).unwrap_err();
    assert!(matches!(e, HandoffError::BlobTooLarge { .. }), "{e:?}");
    // The peer is gone: an error, no SIGPIPE.
    let (tx, rx) = channel();
    drop(rx);
    assert!(send_sockets(&tx, &[l.as_fd()], b"x").is_err());
}

// ---------------------------------------------------------------------------
// Taking descriptors out of a process
// ---------------------------------------------------------------------------

#[test]
fn take_a_connected_socket_out_of_a_stopped_process() {
    if !can_take_fds() || !have("bash") {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // The owner: an unmodified program holding a connected socket as fd 3.
    let child = ChildGuard(
        Command::new("bash")
            .arg("-c")
            .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{port}; exec sleep 60"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.pid();
    let (mut peer, _) = accept_within(&listener, TIMEOUT);

    let stopped = stop(pid).unwrap();
    assert_eq!(stopped.pid(), pid);
    assert!(!stopped.was_already_stopped());
    assert_eq!(state(pid), 'T');

    let sockets = socket_fds(pid).unwrap();
    assert!(sockets.contains(&3), "socket fds of {pid}: {sockets:?}");
    assert!(!sockets.contains(&0) && !sockets.contains(&1));

    let mut taken = TcpStream::from(take_fd(pid, 3).unwrap());
    timeouts(&taken);
    assert_eq!(taken.peer_addr().unwrap(), listener.local_addr().unwrap());
    assert_eq!(taken.local_addr().unwrap(), peer.peer_addr().unwrap());
    // The guard's pidfd gives the same socket.
    let again = TcpStream::from(stopped.take_fd(3).unwrap());
    assert_eq!(again.local_addr().unwrap(), taken.local_addr().unwrap());
    drop(again);

    // Both directions through the taken descriptor.
    let out = pattern(100_000, 11);
    taken.write_all(&out).unwrap();
    let mut got = vec![0u8; out.len()];
    peer.read_exact(&mut got).unwrap();
    assert!(got == out);
    let back = pattern(50_000, 12);
    peer.write_all(&back).unwrap();
    let mut got = vec![0u8; back.len()];
    taken.read_exact(&mut got).unwrap();
    assert!(got == back);

    stopped.resume().unwrap();
    wait_for_state(pid, |s| s != 'T', "resumed");
    drop(child);
}

#[test]
fn the_stop_guard_resumes_on_drop_and_kill_kills() {
    let mut child = ChildGuard(
        Command::new("sleep")
            .arg("60")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.pid();
    {
        let first = stop(pid).unwrap();
        assert_eq!(state(pid), 'T');
        // Stopped already: that guard leaves it stopped.
        let second = stop(pid).unwrap();
        assert!(second.was_already_stopped());
        drop(second);
        thread::sleep(Duration::from_millis(50));
        assert_eq!(state(pid), 'T');
        drop(first);
    }
    wait_for_state(pid, |s| s != 'T', "resumed after the guard dropped");

    // A stop error path drops the guard: an early `?` cannot leave it stopped.
    fn stop_and_fail(pid: i32) -> Result<(), HandoffError> {
        let _guard = stop(pid)?;
        take_fd(pid, 99_999)?;
        Ok(())
    }
    if can_take_fds() {
        assert!(matches!(
            stop_and_fail(pid),
            Err(HandoffError::NoSuchFd { fd: 99_999, .. })
        ));
        wait_for_state(pid, |s| s != 'T', "resumed after an error");
    }

    let stopped = stop(pid).unwrap();
    stopped.kill().unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");

    // terminate: SIGTERM.
    let mut child = ChildGuard(
        Command::new("sleep")
            .arg("60")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    terminate(child.pid()).unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(status.signal(), Some(15), "{status:?}");
}

#[test]
fn errors_name_the_cause() {
    // A process that is gone.
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id() as i32;
    gone.wait().unwrap();
    let e = take_fd(pid, 0).unwrap_err();
    assert!(
        matches!(e, HandoffError::ProcessGone { pid: p } if p == pid),
        "{e:?}"
    );
    assert!(e.to_string().contains(&pid.to_string()), "{e}");
    assert!(matches!(stop(pid), Err(HandoffError::ProcessGone { .. })));
    assert!(matches!(
        socket_fds(pid),
        Err(HandoffError::ProcessGone { .. })
    ));
    assert!(matches!(
        terminate(pid),
        Err(HandoffError::ProcessGone { .. })
    ));

    // Numbers that name no single other process.
    for bad in [0, -1, -42] {
        assert!(matches!(
            take_fd(bad, 0),
            Err(HandoffError::InvalidPid { .. })
        ));
        assert!(matches!(stop(bad), Err(HandoffError::InvalidPid { .. })));
        assert!(matches!(
            socket_fds(bad),
            Err(HandoffError::InvalidPid { .. })
        ));
        assert!(matches!(
            terminate(bad),
            Err(HandoffError::InvalidPid { .. })
        ));
    }
    let own = std::process::id() as i32;
    assert!(matches!(stop(own), Err(HandoffError::InvalidPid { .. })));

    // A descriptor number the process does not have.
    if can_take_fds() {
        let child = ChildGuard(
            Command::new("sleep")
                .arg("60")
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let e = take_fd(child.pid(), 9999).unwrap_err();
        assert!(
            matches!(e, HandoffError::NoSuchFd { pid, fd: 9999 } if pid == child.pid()),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("no open file descriptor 9999"),
            "{e}"
        );
        assert!(matches!(
            take_fd(child.pid(), -1),
            Err(HandoffError::NoSuchFd { .. })
        ));
        // Not a socket: the CLI checks that itself; socket_fds leaves it out.
        assert!(!socket_fds(child.pid()).unwrap().contains(&0));
    }
}

// ---------------------------------------------------------------------------
// Socket activation
// ---------------------------------------------------------------------------

#[test]
fn exec_with_fds_gives_the_child_fd_3_and_its_own_pid() {
    let (_listener, server, mut peer) = tcp_setup();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        r#"echo "$LISTEN_FDS $LISTEN_PID $$ ${LISTEN_FDNAMES-unset} $HANDOFF_MARK"; exec cat <&3"#,
    ])
    .env("HANDOFF_MARK", "kept")
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    let mut child = ChildGuard(exec_with_fds(&mut cmd, vec![for_child(server)]).unwrap());
    let pid = child.pid();
    let output = read_all_async(child.0.stdout.take().unwrap());

    let data = pattern(256 * 1024, 5);
    peer.write_all(&data).unwrap();
    peer.shutdown(Shutdown::Write).unwrap();
    let out = output.recv_timeout(TIMEOUT).expect("child output");
    let split = out.iter().position(|&b| b == b'\n').unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out[..split]),
        format!("1 {pid} {pid} unset kept")
    );
    assert!(out[split + 1..] == data[..], "bytes through fd 3 differ");
    assert!(child.0.wait().unwrap().success());

    // The command is spent: a second spawn fails instead of passing whatever
    // holds the old descriptor numbers now.
    assert!(cmd.spawn().is_err());
}

#[test]
fn exec_with_fds_lets_unmodified_socat_continue_the_connection() {
    if !have("socat") {
        return;
    }
    let (_listener, server, peer) = tcp_setup();
    let mut cmd = Command::new("socat");
    cmd.args(["FD:3", "EXEC:cat"])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let child = ChildGuard(exec_with_fds(&mut cmd, vec![for_child(server)]).unwrap());
    let pid = child.pid();

    let environ = fs::read(format!("/proc/{pid}/environ")).unwrap();
    let vars: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
    assert!(vars.contains(&format!("LISTEN_PID={pid}").as_bytes()));
    assert!(vars.contains(&&b"LISTEN_FDS=1"[..]));

    // socat echoes through cat: everything comes back, in order.
    let data = pattern(512 * 1024, 9);
    let mut writer = peer.try_clone().unwrap();
    let to_write = data.clone();
    let w = thread::spawn(move || {
        writer.write_all(&to_write).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut echoed = Vec::new();
    (&peer).read_to_end(&mut echoed).unwrap();
    w.join().unwrap();
    assert!(
        echoed == data,
        "echo: {} bytes of {}",
        echoed.len(),
        data.len()
    );
    drop(child);
}

#[test]
fn exec_with_fds_reports_a_missing_program() {
    // The search uses the command's own PATH, like `Command`: `sh` is not in
    // /nonexistent-dir.
    for (program, path) in [
        ("/nonexistent/program", "/usr/bin:/bin"),
        ("no-such-program-migratory", "/usr/bin:/bin"),
        ("sh", "/nonexistent-dir"),
    ] {
        let (_listener, server, peer) = tcp_setup();
        let mut cmd = Command::new(program);
        cmd.env("PATH", path);
        let e = exec_with_fds(&mut cmd, vec![OwnedFd::from(server)]).unwrap_err();
        match &e {
            HandoffError::Spawn { source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{e}")
            }
            other => panic!("expected Spawn, got {other:?}"),
        }
        assert!(e.to_string().contains(program), "{e}");
        // The descriptor was ours to close: the peer sees end-of-file.
        assert_eq!((&peer).read(&mut [0u8; 1]).unwrap(), 0);
    }
}

/// Not a test of its own: the child half of the `listen_fds` tests, run by
/// them in a new process of this test binary with `HELPER_ENV` set.
#[test]
fn helper_listen_fds() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let result = listen_fds();
    let cleared = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"]
        .iter()
        .all(|v| std::env::var_os(v).is_none());
    let me = std::process::id();
    match result {
        Ok(fds) => {
            println!("RESULT: ok n={} pid={me} cleared={cleared}", fds.len());
            if fds.len() == 2 {
                let mut fds = fds.into_iter();
                let listener = TcpListener::from(fds.next().unwrap());
                let mut stream = TcpStream::from(fds.next().unwrap());
                stream
                    .write_all(format!("stream ok from {me}\n").as_bytes())
                    .unwrap();
                let (mut c, _) = accept_within(&listener, TIMEOUT);
                c.write_all(b"accepted by the new owner\n").unwrap();
            }
        }
        Err(e) => println!("RESULT: err cleared={cleared} {e:?}"),
    }
}

fn helper_command() -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "helper_listen_fds",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(HELPER_ENV, "1")
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    cmd
}

/// The `RESULT:` line the helper printed.
fn helper_result(mut child: ChildGuard) -> String {
    let output = read_all_async(child.0.stdout.take().unwrap());
    let out = output.recv_timeout(TIMEOUT).expect("helper output");
    let status = child.0.wait().unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(status.success(), "helper failed: {status:?}\n{text}");
    text.lines()
        .find_map(|l| l.split_once("RESULT: ").map(|(_, result)| result))
        .unwrap_or_else(|| panic!("no RESULT line in:\n{text}"))
        .to_string()
}

#[test]
fn exec_with_fds_then_listen_fds_in_the_child() {
    let (listener, server, peer) = tcp_setup();
    let addr = listener.local_addr().unwrap();
    let mut cmd = helper_command();
    let child = ChildGuard(
        exec_with_fds(&mut cmd, vec![OwnedFd::from(listener), for_child(server)]).unwrap(),
    );
    let pid = child.pid();
    assert_eq!(read_line(&peer), format!("stream ok from {pid}\n"));
    let client = TcpStream::connect(addr).unwrap();
    timeouts(&client);
    assert_eq!(read_line(&client), "accepted by the new owner\n");
    assert_eq!(
        helper_result(child),
        format!("ok n=2 pid={pid} cleared=true")
    );
}

#[test]
fn listen_fds_checks_the_variables() {
    // None set: nothing passed.
    let child = ChildGuard(helper_command().spawn().unwrap());
    let pid = child.pid();
    assert_eq!(
        helper_result(child),
        format!("ok n=0 pid={pid} cleared=true")
    );

    // Inherited variables meant for another process.
    let child = ChildGuard(
        helper_command()
            .env("LISTEN_PID", "1")
            .env("LISTEN_FDS", "1")
            .spawn()
            .unwrap(),
    );
    let pid = child.pid();
    assert_eq!(
        helper_result(child),
        format!("err cleared=true ListenPidMismatch {{ listen_pid: 1, our_pid: {pid} }}")
    );

    // LISTEN_FDS alone.
    let child = ChildGuard(helper_command().env("LISTEN_FDS", "1").spawn().unwrap());
    let result = helper_result(child);
    assert!(result.starts_with("err cleared=true ListenEnv"), "{result}");

    // Announced descriptors that are not open (LISTEN_PID set the shell way).
    let exe = std::env::current_exe().unwrap();
    let child = ChildGuard(
        Command::new("sh")
            .args([
                "-c",
                r#"exec 3<&- 4<&-; LISTEN_PID=$$ LISTEN_FDS=2 exec "$0" "$@""#,
            ])
            .arg(exe)
            .args([
                "--exact",
                "helper_listen_fds",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let result = helper_result(child);
    assert_eq!(
        result,
        "err cleared=true ListenFdNotOpen { fd: 3, count: 2 }"
    );
}

/// Not a test of its own: run as user `nobody` by
/// `an_unprivileged_user_is_not_permitted`, against a process of root.
#[test]
fn helper_unprivileged() {
    let Some(target) = std::env::var_os(TARGET_ENV) else {
        return;
    };
    let pid: i32 = target.to_str().unwrap().parse().unwrap();
    fn kind<T>(r: Result<T, HandoffError>) -> String {
        match r {
            Ok(_) => "ok".into(),
            Err(HandoffError::NotPermitted { action, .. }) => format!("NotPermitted({action})"),
            Err(e) => format!("{e:?}"),
        }
    }
    println!(
        "RESULT: take={} stop={} list={}",
        kind(take_fd(pid, 0)),
        kind(stop(pid)),
        kind(socket_fds(pid))
    );
}

#[test]
fn an_unprivileged_user_is_not_permitted() {
    if !root() {
        eprintln!("skipped: running a helper as another user (nobody) needs root");
        return;
    }
    let target = ChildGuard(
        Command::new("sleep")
            .arg("60")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let spawned = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_unprivileged",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(TARGET_ENV, target.pid().to_string())
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn();
    let child = match spawned {
        Ok(child) => ChildGuard(child),
        Err(e) => {
            eprintln!("skipped: cannot run the test binary as nobody: {e}");
            return;
        }
    };
    assert_eq!(
        helper_result(child),
        "take=NotPermitted(take descriptors from) stop=NotPermitted(stop) \
         list=NotPermitted(list the descriptors of)"
    );
    assert_ne!(state(target.pid()), 'T');
    let e = HandoffError::NotPermitted {
        pid: 1,
        action: "take descriptors from",
        needs: "x",
    };
    assert_eq!(
        e.to_string(),
        "not permitted to take descriptors from process 1: x"
    );
}
