//! `migratory sock` end to end on one host: real server processes (socat,
//! and the MIGSOCK II shapes of `examples/socket_echo.rs`), their live
//! connections checkpointed out of them and restored into new processes,
//! a listening socket handed to a new process under a client loop, and bad
//! input. Needs root (TCP_REPAIR, pidfd_getfd): skips, saying so, when not.
//!
//! Same host, so there is no way to hold the peer's packets back while a
//! socket is gone (the cross-host test in migratory-repair does that): each
//! client waits for its echo before a migration, so nothing is in flight
//! in user space or on the wire while the sockets are closed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../../migratory/tests/common/mod.rs"]
mod common;

use common::free_addrs;

const BIN: &str = env!("CARGO_BIN_EXE_migratory");

fn root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if !root {
        eprintln!("skipped: needs root (TCP_REPAIR and pidfd_getfd)");
    }
    root
}

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(p.exists(), "{} missing: cargo test builds it", p.display());
    p
}

fn free_addr() -> SocketAddr {
    free_addrs(1)[0]
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("migratory-sock-{}-{name}", std::process::id()))
}

/// Kills a process and its children (restored servers run as children of
/// `migratory sock restore` / `handoff`) when the test ends, passing or
/// not.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        for pid in children(self.0.id()) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `migratory sock restore ...` and waits until its sockets are
/// restored (it says so on stderr): only then may the peer send.
fn restore_spawn(cmd: &mut Command) -> Kill {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("restored"), "restore failed: {line}");
    // Keep draining stderr so the child never blocks on it.
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    Kill(child)
}

fn sock(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("sock")
        .args(args)
        .output()
        .expect("run migratory sock")
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn connect(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                return s;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "connect {addr}: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// One round trip: `n` bytes of a stream-specific pattern, echoed back
/// exactly.
fn round(s: &mut TcpStream, id: u8, round: u32, n: usize) {
    let data: Vec<u8> = (0..n)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2654435761)
                .wrapping_add(round << 8 | u32::from(id)) as u8
        })
        .collect();
    s.write_all(&data).unwrap();
    let mut back = vec![0u8; n];
    s.read_exact(&mut back).expect("the echo comes back");
    assert!(back == data, "stream {id} round {round}: echo differs");
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

#[test]
fn socat_echo_connection_continues_in_a_new_socat() {
    if !root() {
        return;
    }
    if Command::new("socat").arg("-V").output().is_err() {
        eprintln!("skipped: socat is not installed");
        return;
    }
    let addr = free_addr();
    let old = Kill(
        Command::new("socat")
            .arg(format!(
                "TCP-LISTEN:{},bind=127.0.0.1,reuseaddr",
                addr.port()
            ))
            .arg("EXEC:cat")
            .spawn()
            .unwrap(),
    );
    let mut c = connect(addr);
    for r in 0..20 {
        round(&mut c, 1, r, 10_000);
    }
    let img = tmp("socat.img");
    let pid = old.0.id().to_string();
    ok(&sock(&[
        "checkpoint",
        "--pid",
        &pid,
        "-o",
        img.to_str().unwrap(),
        "--kill",
    ]));
    let inspect = sock(&["inspect", img.to_str().unwrap()]);
    ok(&inspect);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains("ESTABLISHED") && text.contains(&addr.to_string()),
        "{text}"
    );
    // The new process: an unmodified socat on the restored socket (fd 3).
    let new = restore_spawn(Command::new(BIN).args([
        "sock",
        "restore",
        img.to_str().unwrap(),
        "--exec",
        "socat",
        "FD:3",
        "EXEC:cat",
    ]));
    for r in 20..40 {
        round(&mut c, 1, r, 10_000);
    }
    drop(c);
    drop((old, new));
    let _ = std::fs::remove_file(img);
}

/// MIGSOCK II's three test programs: five connections in one process, in
/// five processes, or in five threads; every one continues byte-exact.
#[test]
fn five_connections_in_one_process_five_processes_and_five_threads() {
    if !root() {
        return;
    }
    let echo = example("socket_echo");
    for mode in ["single", "process", "thread"] {
        let addr = free_addr();
        let server = Kill(
            Command::new(&echo)
                .args([
                    "--listen",
                    &addr.to_string(),
                    "--connections",
                    "5",
                    "--mode",
                    mode,
                ])
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let mut conns: Vec<TcpStream> = (0..5).map(|_| connect(addr)).collect();
        for (i, c) in conns.iter_mut().enumerate() {
            round(c, i as u8, 0, 50_000);
        }
        // The processes that own the sockets.
        let owners: Vec<u32> = if mode == "process" {
            wait_for("five children", || children(server.0.id()).len() == 5);
            children(server.0.id())
        } else {
            vec![server.0.id()]
        };
        let mut restored = Vec::new();
        for (k, pid) in owners.iter().enumerate() {
            let img = tmp(&format!("{mode}-{k}.img"));
            let out = sock(&[
                "checkpoint",
                "--pid",
                &pid.to_string(),
                "-o",
                img.to_str().unwrap(),
                "--kill",
            ]);
            ok(&out);
            let expect = if mode == "process" { 1 } else { 5 };
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(&format!("{expect} socket(s)")),
                "{mode}: {err}"
            );
            wait_for("the old owner to die", || gone(*pid));
            restored.push(restore_spawn(
                Command::new(BIN)
                    .args(["sock", "restore", img.to_str().unwrap(), "--exec"])
                    .arg(&echo)
                    .arg("--activated")
                    .stdout(Stdio::null()),
            ));
            let _ = std::fs::remove_file(img);
        }
        for r in 1..10 {
            for (i, c) in conns.iter_mut().enumerate() {
                round(c, i as u8, r, 50_000);
            }
        }
        // A clean end: EOF each way.
        for c in &mut conns {
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "{mode}");
        }
        drop((server, restored));
    }
}

#[test]
fn listening_socket_handoff_refuses_and_resets_nothing() {
    if !root() {
        return;
    }
    let echo = example("socket_echo");
    let addr = free_addr();
    let old = Kill(
        Command::new(&echo)
            .args(["--listen", &addr.to_string()])
            .spawn()
            .unwrap(),
    );
    drop(connect(addr));
    // A client loop connecting throughout the restart.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let (stop2, served2) = (stop.clone(), served.clone());
    let clients = std::thread::spawn(move || {
        let mut failures = Vec::new();
        let mut r = 0;
        while !stop2.load(Ordering::SeqCst) {
            let res = TcpStream::connect(addr).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let msg = format!("hello {r}");
                s.write_all(msg.as_bytes())?;
                s.shutdown(std::net::Shutdown::Write)?;
                let mut back = String::new();
                s.read_to_string(&mut back)?;
                if back != msg {
                    return Err(std::io::Error::other(format!("echo {back:?}")));
                }
                Ok(())
            });
            match res {
                Ok(()) => drop(served2.fetch_add(1, Ordering::SeqCst)),
                Err(e) => failures.push(format!("{r}: {e}")),
            }
            r += 1;
        }
        failures
    });
    wait_for("a few connections", || served.load(Ordering::SeqCst) > 50);
    let old_pid = old.0.id();
    // (No pipe to the new service's stdout: it outlives this test's
    // handles; stderr tells why a handoff failed.)
    let mut handoff = Kill(
        Command::new(BIN)
            .args(["sock", "handoff", "--pid", &old_pid.to_string(), "--exec"])
            .arg(&echo)
            .arg("--activated")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_for("the old service to drain and exit", || {
        if let Ok(Some(status)) = handoff.0.try_wait() {
            let mut err = String::new();
            let _ = handoff
                .0
                .stderr
                .take()
                .map(|mut e| e.read_to_string(&mut err));
            panic!("handoff exited early ({status}): {err}");
        }
        gone(old_pid)
    });
    let at_handoff = served.load(Ordering::SeqCst);
    wait_for("connections served by the new process", || {
        served.load(Ordering::SeqCst) > at_handoff + 50
    });
    stop.store(true, Ordering::SeqCst);
    let failures = clients.join().unwrap();
    assert!(failures.is_empty(), "refused or reset: {failures:?}");
    eprintln!(
        "{} connections, {} after the old process exited",
        served.load(Ordering::SeqCst),
        served.load(Ordering::SeqCst) - at_handoff
    );
    drop((old, handoff));
}

#[test]
fn bad_input_gives_one_clear_line() {
    if !root() {
        return;
    }
    let check = |args: &[&str], want: &str| {
        let out = sock(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {want:?} not in {err:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err:?}");
    };
    // A real image to spoil.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let holder = Kill(
        Command::new("bash")
            .arg("-c")
            .arg(format!(
                "exec 3<>/dev/tcp/127.0.0.1/{}; exec sleep 30",
                addr.port()
            ))
            .spawn()
            .unwrap(),
    );
    let (_peer, _) = l.accept().unwrap();
    drop(l);
    let img = tmp("bad.img");
    let imgs = img.to_str().unwrap();
    let pid = holder.0.id().to_string();
    ok(&sock(&[
        "checkpoint",
        "--pid",
        &pid,
        "--fd",
        "3",
        "-o",
        imgs,
    ]));
    let good = std::fs::read(&img).unwrap();
    std::fs::write(&img, &good[..good.len() / 2]).unwrap();
    check(&["inspect", imgs], "truncated");
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(&img, &bad).unwrap();
    check(&["inspect", imgs], "checksum");
    let mut bad = good.clone();
    bad[9] = 9; // the version
    std::fs::write(&img, &bad).unwrap();
    check(&["inspect", imgs], "version");
    check(&["inspect", "/nonexistent/x.img"], "/nonexistent/x.img");
    // The local address must exist here (restore of the real image while
    // the original connection lives: the address is there but in use).
    std::fs::write(&img, &good).unwrap();
    check(&["restore", imgs, "--exec", "true"], "still exists");
    // Not a TCP socket, no such descriptor, no such process.
    check(
        &["checkpoint", "--pid", &pid, "--fd", "0", "-o", imgs],
        "not a TCP socket",
    );
    check(
        &["checkpoint", "--pid", &pid, "--fd", "77", "-o", imgs],
        "77",
    );
    check(
        &["checkpoint", "--pid", "999999999", "-o", imgs],
        "999999999",
    );
    // The process was resumed after each failure: still alive.
    assert!(!gone(holder.0.id()));
    // Not privileged.
    if Command::new("setpriv").arg("--version").output().is_ok() {
        use std::os::unix::fs::PermissionsExt;
        // Images are private (0600); let `nobody` read this one.
        std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                BIN,
                "sock",
                "restore",
                imgs,
                "--exec",
                "true",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("not permitted"),
            "{err}"
        );
    }
    let _ = std::fs::remove_file(img);
}

#[test]
fn benchmarks_run() {
    if !root() {
        return;
    }
    for args in [
        &[
            "bench",
            "sock",
            "--sockets",
            "3",
            "--queued",
            "1KiB",
            "--rounds",
            "3",
        ][..],
        &[
            "bench",
            "sock",
            "--sockets",
            "1",
            "--queued",
            "1MiB",
            "--rounds",
            "2",
        ],
        &["bench", "handoff", "--rounds", "2"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        ok(&out);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(" us"), "{args:?}: {text}");
    }
}
