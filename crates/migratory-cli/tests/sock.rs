//! `migratory sock` end to end: real server processes (socat, and the
//! MIGSOCK II shapes of `examples/socket_echo.rs`), their live connections
//! checkpointed out of them and restored into new processes, a listening
//! socket handed to a new process under a client loop, and bad input. Needs
//! root (TCP_REPAIR, pidfd_getfd) and `nft` (the network lock): skips,
//! saying so, without them.
//!
//! The loopback tests wait for each echo before a migration. The network
//! namespace tests (`ns_*`) do not: an unmodified peer (socat) streams 16
//! KiB every 0.5 ms both ways and checks every echoed byte while the server
//! (socat) is checkpointed, killed and restored 20 times, on one host and
//! between two hosts; checkpoints forced to fail at each step, and the tool
//! killed while it holds the lock, leave the stream intact.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../../migratory/tests/common/mod.rs"]
mod common;

/// The socket crate's namespace helpers.
#[allow(dead_code)]
#[path = "../../migratory-repair/tests/common/mod.rs"]
mod ns;

use ns::ip;

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
        return false;
    }
    if !have("nft", "--version") {
        eprintln!(
            "skipped: needs nft for the network lock (apt-get install nftables; .ci/run does)"
        );
        return false;
    }
    true
}

fn have(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
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
    restore_ready(restore_start(cmd))
}

/// Starts `migratory sock restore ...` (see [`restore_ready`]).
fn restore_start(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until a restore started with [`restore_start`] has its sockets
/// restored.
fn restore_ready(mut child: Child) -> Kill {
    use std::io::BufRead;
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("restored"), "restore failed: {line}");
    // Keep draining stderr so the child never blocks on it (into ours:
    // what the restored program says shows with a failing test).
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::stderr()));
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
    // No lock (the client waits for each echo: nothing is in flight), as
    // before the lock existed.
    ok(&sock(&[
        "checkpoint",
        "--pid",
        &pid,
        "-o",
        img.to_str().unwrap(),
        "--kill",
        "--no-lock",
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
        "--no-lock",
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

// ---------------------------------------------------------------------------
// Network namespaces: a peer that never stops streaming
// ---------------------------------------------------------------------------

/// Bytes the peer writes at a time, and how often.
const CHUNK: usize = 16 << 10;
const EVERY: Duration = Duration::from_micros(500);
/// Migrations per run.
const MOVES: usize = 20;
/// The service's address (on `host`, or moving between `hostA` and
/// `hostB`).
const SERVICE: &str = "10.79.0.10";
const PORT: u16 = 7000;

fn ns_ready() -> bool {
    if !root() {
        return false;
    }
    for (tool, arg) in [("ip", "-V"), ("socat", "-V")] {
        if !have(tool, arg) {
            eprintln!("skipped: needs {tool} (.ci/run installs it)");
            return false;
        }
    }
    true
}

/// Network namespaces made for one test, deleted on drop: `client` with a
/// bridge, and hosts attached to it (10.79.0.2, .3, ...). The service
/// address starts on the first host.
struct Net {
    client: String,
    hosts: Vec<String>,
    /// Each host's `eth0` hardware address.
    macs: Vec<String>,
}

impl Net {
    fn new(tag: &str, hosts: usize) -> Net {
        let id = format!("{}{tag}", std::process::id());
        let mut n = Net {
            client: format!("mscl{id}"),
            hosts: (0..hosts).map(|i| format!("msh{i}{id}")).collect(),
            macs: Vec::new(),
        };
        for ns in std::iter::once(&n.client).chain(&n.hosts) {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let c = n.client.as_str();
        ip(&["-n", c, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", c, "link", "set", "br0", "up"]);
        ip(&["-n", c, "addr", "add", "10.79.0.1/24", "dev", "br0"]);
        for (i, host) in n.hosts.iter().enumerate() {
            let port = format!("p{i}");
            ip(&[
                "-n", c, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                host,
            ]);
            ip(&["-n", c, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", host, "link", "set", "eth0", "up"]);
            let addr = format!("10.79.0.{}/24", i + 2);
            ip(&["-n", host, "addr", "add", &addr, "dev", "eth0"]);
        }
        n.macs = n
            .hosts
            .iter()
            .map(|host| {
                let out = Command::new("ip")
                    .args(["-n", host, "-br", "link", "show", "eth0"])
                    .output()
                    .expect("run ip");
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.split_whitespace()
                    .nth(2)
                    .expect("eth0's hardware address")
                    .to_string()
            })
            .collect();
        n.move_address(None, 0);
        n
    }

    /// Moves the service address to host `to` (from host `from`). The
    /// client's neighbour entry for it points to the new host before the
    /// address is there (what a gratuitous ARP does, done first): a restore
    /// waiting for the address goes live the moment it arrives, and its
    /// peer's answers must not go to the old host.
    fn move_address(&self, from: Option<usize>, to: usize) {
        let a = format!("{SERVICE}/24");
        if let Some(from) = from {
            ip(&["-n", &self.hosts[from], "addr", "del", &a, "dev", "eth0"]);
        }
        ip(&[
            "-n",
            &self.client,
            "neigh",
            "replace",
            SERVICE,
            "lladdr",
            &self.macs[to],
            "dev",
            "br0",
            "nud",
            "reachable",
        ]);
        ip(&["-n", &self.hosts[to], "addr", "add", &a, "dev", "eth0"]);
    }

    /// `cmd` run inside namespace `ns`.
    fn exec(&self, ns: &str, cmd: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).args(cmd);
        c
    }

    /// The lock tables present in `ns`.
    fn lock_tables(&self, ns: &str) -> Vec<String> {
        let out = self.exec(ns, &["nft", "list", "tables"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("migratory_"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in std::iter::once(&self.client).chain(&self.hosts) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The peer's stream repeats this many bytes (a prime: no chunk size
/// divides it, so a lost or repeated piece shows).
const PERIOD: usize = 65521;

/// Two periods of the peer's stream: its bytes `pos..pos + n` (for `n` up
/// to a period) are `pattern[pos % PERIOD..][..n]`, compared at memcmp
/// speed so that checking never holds the peer back.
fn pattern() -> Arc<Vec<u8>> {
    let one: Vec<u8> = (0..PERIOD as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect();
    Arc::new([one.as_slice(), one.as_slice()].concat())
}

/// The unmodified peer: `socat - TCP:service` in `client`, fed 16 KiB
/// every 0.5 ms and its output (the echo) checked byte by byte.
struct Peer {
    child: Kill,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    echoed: Arc<AtomicU64>,
    writer: std::thread::JoinHandle<Result<(), String>>,
    reader: std::thread::JoinHandle<Result<Vec<(Instant, u64)>, String>>,
}

impl Peer {
    fn start(net: &Net) -> Peer {
        let target = format!("TCP:{SERVICE}:{PORT}");
        let mut child = net
            .exec(
                &net.client,
                &["socat", "-b", "65536", "-t", "5", "-", &target],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start socat");
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (stop, sent, echoed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let writer = {
            let (stop, sent) = (stop.clone(), sent.clone());
            let pattern = pattern();
            std::thread::spawn(move || {
                let mut pos = 0u64;
                let start = Instant::now();
                let mut k = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    let off = (pos % PERIOD as u64) as usize;
                    stdin
                        .write_all(&pattern[off..off + CHUNK])
                        .map_err(|e| format!("peer write: {e}"))?;
                    pos += CHUNK as u64;
                    sent.store(pos, Ordering::SeqCst);
                    k += 1;
                    if let Some(wait) = (start + EVERY * k).checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                Ok(())
                // (Dropping stdin closes the peer's sending half.)
            })
        };
        let reader = {
            let echoed = echoed.clone();
            let pattern = pattern();
            std::thread::spawn(move || {
                let mut pos = 0u64;
                let mut buf = vec![0u8; PERIOD];
                let mut arrivals = Vec::new();
                loop {
                    let n = stdout
                        .read(&mut buf)
                        .map_err(|e| format!("peer read: {e}"))?;
                    if n == 0 {
                        return Ok(arrivals);
                    }
                    let off = (pos % PERIOD as u64) as usize;
                    if buf[..n] != pattern[off..off + n] {
                        // Said at once: the test fails later, waiting.
                        let i = (0..n).find(|&i| buf[i] != pattern[off + i]).unwrap_or(0);
                        let e = format!("echoed byte {} differs", pos + i as u64);
                        eprintln!("peer: {e}");
                        return Err(e);
                    }
                    pos += n as u64;
                    echoed.store(pos, Ordering::SeqCst);
                    arrivals.push((Instant::now(), pos));
                }
            })
        };
        Peer {
            child: Kill(child),
            stop,
            sent,
            echoed,
            writer,
            reader,
        }
    }

    fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::SeqCst)
    }

    /// Waits until `more` bytes beyond what is echoed now come back.
    fn wait_more(&self, more: u64, what: &str) {
        let target = self.echoed() + more;
        wait_for(what, || self.echoed() >= target);
    }

    /// Stops streaming, waits for the last echo and EOF; checks that
    /// everything sent came back exactly and that socat saw no error.
    /// Returns the arrival times of the echo.
    fn finish(mut self) -> Vec<(Instant, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        self.writer
            .join()
            .unwrap()
            .expect("the peer wrote everything: no reset");
        let sent = self.sent.load(Ordering::SeqCst);
        // socat ends after EOF both ways; a reset ends it early.
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the peer never finished");
            std::thread::sleep(Duration::from_millis(10));
        };
        let echoed = self.echoed.clone();
        let arrivals = self.reader.join().unwrap().expect("echo exact");
        let mut err = String::new();
        if let Some(mut e) = self.child.0.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        assert!(status.success(), "peer socat: {status}: {err}");
        assert_eq!(
            echoed.load(Ordering::SeqCst),
            sent,
            "every byte sent came back"
        );
        arrivals
    }
}

/// What the peer saw of each move: the largest gap between two echo
/// arrivals from the move's start to the next one's (the last: `tail`).
fn stalls(arrivals: &[(Instant, u64)], starts: &[Instant], tail: Duration) -> Vec<Duration> {
    starts
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let end = starts.get(i + 1).copied().unwrap_or(t + tail);
            arrivals
                .windows(2)
                .filter(|w| w[1].0 >= t && w[0].0 <= end)
                .map(|w| w[1].0 - w[0].0)
                .max()
                .unwrap_or_default()
        })
        .collect()
}

fn summary(what: &str, mut d: Vec<Duration>) -> String {
    d.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "{what}: median {:.1} ms, max {:.1} ms over {} moves",
        ms(d[d.len() / 2]),
        ms(d[d.len() - 1]),
        d.len()
    )
}

/// The server: an unmodified socat echoing through a pipe, in `ns`. Its
/// blocks are one page (`-b 4096`): socat writes to its own pipe only when
/// the pipe has room, and a write of at most a page into a pipe with room
/// never blocks; with 8 KiB blocks it can block on its own pipe, with
/// nobody left to empty it, whenever its socket stops taking data for a
/// while (with or without a migration).
fn socat_server(net: &Net, ns: &str) -> Kill {
    let listen = format!("TCP-LISTEN:{PORT},bind={SERVICE},reuseaddr");
    let child = net
        .exec(ns, &["socat", "-b", "4096", &listen, "PIPE"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Kill(child)
}

fn wait_listening(net: &Net, ns: &str) {
    wait_for("the server to listen", || {
        let out = net
            .exec(ns, &["ss", "-Htln", &format!("sport = :{PORT}")])
            .output()
            .unwrap();
        !out.stdout.is_empty()
    });
}

/// `migratory sock ARGS` in `ns`.
fn sock_in(net: &Net, ns: &str, args: &[&str]) -> Output {
    let mut cmd = vec![BIN, "sock"];
    cmd.extend_from_slice(args);
    net.exec(ns, &cmd).output().unwrap()
}

/// The pid of the socat that `migratory sock restore --exec` started (its
/// other children run `nft`).
fn restored_server(restore: &Kill) -> u32 {
    let mut pid = None;
    wait_for("the restored server to start", || {
        pid = children(restore.0.id()).into_iter().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "socat")
        });
        pid.is_some()
    });
    pid.unwrap()
}

/// Whether the restore starts only after the checkpoint (and the address
/// move) are done, instead of ahead of them with `--wait` (set
/// `MIGRATORY_TEST_RESTORE_AFTER=1`: the stall the two ways compare).
fn restore_after() -> bool {
    std::env::var_os("MIGRATORY_TEST_RESTORE_AFTER").is_some_and(|v| v == "1")
}

/// Checkpoints the server `pid` in `from` (killing it) and restores it in
/// `to` under a new socat; the address moves when the hosts differ. The
/// restore is started first and waits for the image (`--wait`), unless
/// [`restore_after`]. Returns the new restore process, and how long the
/// address move took.
fn migrate(net: &Net, pid: u32, from: usize, to: usize, img: &Path) -> (Kill, Duration) {
    let imgs = img.to_str().unwrap();
    let (a, b) = (&net.hosts[from], &net.hosts[to]);
    if from != to {
        // The new host drops the connection's packets before it has the
        // address (and before the move starts: making the lock's table
        // takes tens of milliseconds).
        let conn = format!("{SERVICE}:{PORT},{}", peer_addr(net, a));
        ok(&sock_in(net, b, &["lock", "--connection", &conn]));
    }
    let restore = |wait: bool| {
        let mut argv = vec![BIN, "sock", "restore", imgs];
        if wait {
            argv.extend(["--wait", "10s"]);
        }
        argv.extend(["--exec", "socat", "-b", "4096", "FD:3", "PIPE"]);
        restore_start(&mut net.exec(b, &argv))
    };
    let early = (!restore_after()).then(|| restore(true));
    let out = sock_in(
        net,
        a,
        &[
            "checkpoint",
            "--pid",
            &pid.to_string(),
            "-o",
            imgs,
            "--kill",
        ],
    );
    ok(&out);
    let mut moved = Duration::ZERO;
    if from != to {
        let t = Instant::now();
        net.move_address(Some(from), to);
        moved = t.elapsed();
    }
    let restore = restore_ready(early.unwrap_or_else(|| restore(false)));
    if from != to {
        // The old host's lock is of no use any more.
        ok(&sock_in(net, a, &["unlock", imgs]));
    }
    let _ = std::fs::remove_file(img);
    (restore, moved)
}

/// The peer's address and port of the service's one connection in `ns`.
fn peer_addr(net: &Net, ns: &str) -> String {
    let out = net
        .exec(
            ns,
            &[
                "ss",
                "-Htn",
                "state",
                "established",
                &format!("sport = :{PORT}"),
            ],
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let peer = text
        .split_whitespace()
        .last()
        .unwrap_or_else(|| panic!("no connection in {ns}: {text}"));
    peer.to_string()
}

fn moves(tag: &str, hosts: usize) {
    let net = Net::new(tag, hosts);
    let server = socat_server(&net, &net.hosts[0]);
    wait_listening(&net, &net.hosts[0]);
    let peer = Peer::start(&net);
    peer.wait_more(4 * CHUNK as u64, "the echo to start");
    let img = tmp(&format!("ns-{tag}.img"));
    let mut pid = server.0.id();
    let mut keep = vec![server];
    let mut starts = Vec::new();
    let mut address_moves = Vec::new();
    let mut at = 0;
    for _ in 0..MOVES {
        let to = (at + 1) % hosts;
        starts.push(Instant::now());
        let (restore, moved) = migrate(&net, pid, at, to, &img);
        address_moves.push(moved);
        pid = restored_server(&restore);
        keep.push(restore);
        at = to;
        // The stream goes on through the new server.
        peer.wait_more(8 * CHUNK as u64, "the echo after a move");
    }
    let arrivals = peer.finish();
    let label = if hosts == 1 {
        "same host"
    } else {
        "cross host"
    };
    let stall = stalls(&arrivals, &starts, Duration::from_secs(2));
    let each: Vec<String> = stall
        .iter()
        .map(|d| format!("{:.1}", d.as_secs_f64() * 1e3))
        .collect();
    eprintln!("{label}: each move's stall (ms): {}", each.join(" "));
    eprintln!(
        "{}",
        summary(&format!("{label}: peer-observed stall"), stall)
    );
    if hosts > 1 {
        eprintln!("{}", summary("address move (ip commands)", address_moves));
    }
    for ns in &net.hosts {
        assert!(net.lock_tables(ns).is_empty() || hosts > 1, "lock left");
    }
    drop(keep);
}

/// One host: an unmodified socat echo server is checkpointed and killed,
/// then restored under a new socat, 20 times, while the peer streams both
/// ways; every byte comes back, and the peer sees no reset.
#[test]
fn ns_same_host_twenty_moves_under_a_streaming_peer() {
    if !ns_ready() {
        return;
    }
    moves("s", 1);
}

/// Two hosts on a bridge: the server moves from one to the other and back,
/// 20 times, with its address; the restoring host locks the connection
/// before the address arrives (no hand-made blackhole route).
#[test]
fn ns_cross_host_twenty_moves_under_a_streaming_peer() {
    if !ns_ready() {
        return;
    }
    moves("x", 2);
}

/// A checkpoint forced to fail after each of its steps: the server lives
/// on, the stream continues byte-exact, no lock and no image are left.
#[test]
fn ns_failed_checkpoints_lose_nothing() {
    if !ns_ready() {
        return;
    }
    let net = Net::new("f", 1);
    let host = net.hosts[0].clone();
    let server = socat_server(&net, &host);
    wait_listening(&net, &host);
    let peer = Peer::start(&net);
    peer.wait_more(4 * CHUNK as u64, "the echo to start");
    let img = tmp("ns-fail.img");
    let imgs = img.to_str().unwrap();
    let pid = server.0.id().to_string();
    for step in [
        "locked",
        "stopped",
        "checkpointed",
        "written",
        "verified",
        "lock-checked",
    ] {
        let out = sock_in(
            &net,
            &host,
            &[
                "checkpoint",
                "--pid",
                &pid,
                "-o",
                imgs,
                "--kill",
                "--fail-at",
                step,
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{step}: succeeded");
        assert!(err.contains(step), "{step}: {err}");
        assert!(!gone(server.0.id()), "{step}: the server was killed");
        assert!(!img.exists(), "{step}: an image was left");
        assert!(net.lock_tables(&host).is_empty(), "{step}: a lock was left");
        peer.wait_more(8 * CHUNK as u64, "the echo after a failed checkpoint");
    }
    peer.finish();
    drop(server);
}

/// The tool is killed (SIGKILL) while it holds the lock: the lock expires
/// by itself and the stream resumes; `sock unlock` removes the leftover
/// table.
#[test]
fn ns_killed_tool_lock_expires() {
    if !ns_ready() {
        return;
    }
    let net = Net::new("k", 1);
    let host = net.hosts[0].clone();
    let server = socat_server(&net, &host);
    wait_listening(&net, &host);
    let peer = Peer::start(&net);
    peer.wait_more(4 * CHUNK as u64, "the echo to start");
    let img = tmp("ns-kill.img");
    let pid = server.0.id().to_string();
    let mut tool = Kill(
        net.exec(
            &host,
            &[
                BIN,
                "sock",
                "checkpoint",
                "--pid",
                &pid,
                "-o",
                img.to_str().unwrap(),
                "--kill",
                "--lock-timeout",
                "1s",
                "--hang-at",
                "locked",
            ],
        )
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    wait_for("the lock", || !net.lock_tables(&host).is_empty());
    // Both directions are locked now (the tool hangs after that step).
    std::thread::sleep(Duration::from_millis(200));
    let locked_at = peer.echoed();
    let t = Instant::now();
    // `ip netns exec` ran the tool in place: this is the tool itself.
    tool.0.kill().unwrap();
    let _ = tool.0.wait();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        peer.echoed() - locked_at <= 2 * (CHUNK as u64) * 64,
        "the lock held"
    );
    // Both ends resend at their retransmission timeouts, which doubled
    // while the lock held (0.2, 0.6, 1.4, 3.0, 6.2 s...): allow for that.
    let target = peer.echoed() + 8 * CHUNK as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while peer.echoed() < target {
        assert!(Instant::now() < deadline, "the stream never resumed");
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "stream resumed {:.2} s after the tool was killed (lock timeout 1 s)",
        t.elapsed().as_secs_f64()
    );
    assert!(!gone(server.0.id()));
    assert!(!img.exists());
    // The expired lock's table is still there; unlock removes it.
    assert!(!net.lock_tables(&host).is_empty());
    let out = sock_in(&net, &host, &["unlock"]);
    ok(&out);
    assert!(net.lock_tables(&host).is_empty());
    peer.finish();
    drop(server);
}
