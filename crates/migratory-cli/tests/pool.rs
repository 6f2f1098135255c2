//! A real pool operated as a user would: three `migratory serve` processes
//! from a TOML configuration, the `migratory proxy` sidecar, unmodified
//! clients (curl, socat or nc) through it, sessions pushed between servers
//! with `migratory migrate` while the bytes flow, and metrics scraped
//! afterwards. Every byte is checked: SHA-256 or exact comparison.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

#[path = "../../migratory/tests/common/mod.rs"]
mod common;

use common::free_addrs;

const BIN: &str = env!("CARGO_BIN_EXE_migratory");

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits until `addr` accepts; false if `child` exited first (its port
/// was taken between `free_addrs` and its bind: the caller retries).
fn listening(addr: SocketAddr, child: &mut Child, what: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            eprintln!("{what} exited early ({status}): retrying on other ports");
            return false;
        }
        assert!(Instant::now() < deadline, "{what} never listened on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Deterministic file content.
fn write_file(path: &Path, len: usize, seed: u64) -> [u8; 32] {
    let mut f = std::fs::File::create(path).unwrap();
    let mut h = Sha256::new();
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        let n = left.min(buf.len());
        f.write_all(&buf[..n]).unwrap();
        h.update(&buf[..n]);
        left -= n;
    }
    h.finalize().into()
}

fn sha256_file(path: &Path) -> [u8; 32] {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.finalize().into();
        }
        h.update(&buf[..n]);
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Three servers and a proxy, killed on drop.
struct Pool {
    dir: PathBuf,
    config: PathBuf,
    children: Vec<Child>,
    metrics: Vec<SocketAddr>,
    proxy: SocketAddr,
    /// Where the session is now (the test moves it and keeps track).
    owner: usize,
}

impl Drop for Pool {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A pool that failed to start leaves the directory to the retry.
        if self.children.len() == 4 {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn id(i: usize) -> String {
    format!("s{}", i + 1)
}

impl Pool {
    fn start(name: &str, service: &str, files: &[(&str, usize, u64)]) -> (Pool, Vec<[u8; 32]>) {
        let dir =
            std::env::temp_dir().join(format!("migratory-pool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("www");
        std::fs::create_dir_all(&root).unwrap();
        let sums = files
            .iter()
            .map(|(f, len, seed)| write_file(&root.join(f), *len, *seed))
            .collect();
        std::fs::write(
            dir.join("cluster.key"),
            "pool test cluster key 0123456789\n",
        )
        .unwrap();
        for _attempt in 0..3 {
            if let Some(pool) = Self::spawn(&dir, &root, service) {
                return (pool, sums);
            }
        }
        panic!("could not start the pool in three attempts");
    }

    /// Starts three servers and a proxy on free ports; `None` if one exited
    /// before listening (its port was taken meanwhile).
    fn spawn(dir: &Path, root: &Path, service: &str) -> Option<Pool> {
        let addrs = free_addrs(10);
        let mut config = String::from(
            "cluster_key_file = \"cluster.key\"\n\
             [limits]\nsend_buffer = 262144\nrecv_window = 262144\n",
        );
        for i in 0..3 {
            config += &format!(
                "[[server]]\nid = \"{}\"\nservice = \"{}\"\ncontrol = \"{}\"\n",
                id(i),
                addrs[i],
                addrs[3 + i]
            );
        }
        let cfg = dir.join("pool.toml");
        std::fs::write(&cfg, config).unwrap();
        make_certs(&cfg);
        let mut pool = Pool {
            dir: dir.to_path_buf(),
            config: cfg.clone(),
            children: Vec::new(),
            metrics: addrs[6..9].to_vec(),
            proxy: addrs[9],
            owner: 0,
        };
        for (i, &service_addr) in addrs[..3].iter().enumerate() {
            let mut c = Command::new(BIN)
                .args(["serve", "--config"])
                .arg(&cfg)
                .args(["--id", &id(i), "--service", service, "--root"])
                .arg(root)
                .args(["--counter-interval", "0s"])
                .args(["--metrics", &pool.metrics[i].to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start migratory serve");
            let up = listening(service_addr, &mut c, &id(i))
                && listening(pool.metrics[i], &mut c, &id(i));
            pool.children.push(c);
            if !up {
                return None; // Drop kills what started
            }
        }
        let services = format!("{},{},{}", addrs[0], addrs[1], addrs[2]);
        let mut p = Command::new(BIN)
            .args(["proxy", "--listen", &pool.proxy.to_string()])
            .args(["--service", &services])
            // Every session starts on s1: the tests know where it is.
            .args(["--spread", "first"])
            .arg("--ca")
            .arg(dir.join("certs/ca.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start migratory proxy");
        let up = listening(pool.proxy, &mut p, "proxy");
        pool.children.push(p);
        up.then_some(pool)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .args(["--config", self.config.to_str().unwrap()])
            .output()
            .expect("run migratory")
    }

    /// The one session of `server`: (up, down) positions, if it has one.
    fn session(&self, server: usize) -> Option<(u64, u64)> {
        let out = self.run(&["sessions", "--id", &id(server)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let row = text.lines().nth(1)?;
        let cols: Vec<&str> = row.split_whitespace().collect();
        Some((cols[3].parse().unwrap(), cols[4].parse().unwrap()))
    }

    /// Pushes every session of the owner to the next server; true when one
    /// moved (then the next server owns it).
    fn migrate_next(&mut self) -> bool {
        let to = (self.owner + 1) % 3;
        let out = self.run(&[
            "migrate",
            "--from",
            &id(self.owner),
            "--to",
            &id(to),
            "--all",
            "--timeout",
            "10s",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let moved = stdout.contains(&format!("moved to {}", id(to)));
        // Not moving is allowed (the transfer may end meanwhile); failing
        // to ask is not.
        assert!(!stderr.contains("migratory:"), "migrate failed: {stderr}");
        if moved {
            self.owner = to;
        }
        moved
    }

    fn url(&self, file: &str) -> String {
        format!("http://{}/{file}", self.proxy)
    }

    /// Server `i`'s value of an unlabelled-but-`server` metric, if shown.
    fn scrape_one(&self, i: usize, metric: &str) -> Option<f64> {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                &format!("http://{}/metrics", self.metrics[i]),
            ])
            .output()
            .expect("curl");
        assert!(out.status.success(), "metrics scrape failed");
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == format!("{metric}{{server=\"{}\"}}", id(i))).then(|| value.parse().ok())?
        })
    }

    /// The sum of a metric's samples over the three servers, for samples
    /// whose labels contain every one of `labels`.
    fn scrape(&self, metric: &str, labels: &[&str]) -> f64 {
        self.scrape_from(&[0, 1, 2], metric, labels)
    }

    /// [`Pool::scrape`] over some of the servers.
    fn scrape_from(&self, servers: &[usize], metric: &str, labels: &[&str]) -> f64 {
        let mut sum = 0.0;
        for m in servers.iter().map(|i| &self.metrics[*i]) {
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "10", &format!("http://{m}/metrics")])
                .output()
                .expect("curl");
            assert!(out.status.success(), "metrics scrape of {m} failed");
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let Some((name, value)) = line.rsplit_once(' ') else {
                    continue;
                };
                if (name == metric || name.starts_with(&format!("{metric}{{")))
                    && labels.iter().all(|l| name.contains(l))
                {
                    sum += value.parse::<f64>().unwrap_or(0.0);
                }
            }
        }
        sum
    }
}

impl Pool {
    /// Sends SIGTERM to server `i`.
    fn term(&self, i: usize) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.children[i].id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Server `i`'s exit status, if it exited by `within`.
    fn exited(&mut self, i: usize, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.children[i].try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The status code of server `i`'s readiness path, `None` when it does
    /// not answer.
    fn ready(&self, i: usize) -> Option<u16> {
        let mut s = TcpStream::connect_timeout(&self.metrics[i], Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            .ok()?;
        let mut head = String::new();
        s.read_to_string(&mut head).ok()?;
        head.split_whitespace().nth(1)?.parse().ok()
    }

    /// The sessions `migratory sessions` lists on server `i`.
    fn listed(&self, i: usize) -> usize {
        let out = self.run(&["sessions", "--id", &id(i)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).lines().count() - 1
    }

    /// A new raw TCP client of the echo service through the proxy, after
    /// one checked round of `len` bytes.
    fn echo_client(&self, seed: u32, len: usize) -> TcpStream {
        let mut c = TcpStream::connect(self.proxy).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        echo_round(&mut c, seed, len);
        c
    }
}

/// 8 MiB written to an echo client process (socat or nc), 64 KiB every
/// 15 ms, and what comes back, read as it comes.
struct EchoStream {
    child: Child,
    writer: std::thread::JoinHandle<()>,
    reader: std::thread::JoinHandle<Vec<u8>>,
    sent: Vec<u8>,
}

impl EchoStream {
    fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the client");
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let sent: Vec<u8> = (0..8u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        let to_send = sent.clone();
        let writer = std::thread::spawn(move || {
            for chunk in to_send.chunks(64 << 10) {
                stdin.write_all(chunk).unwrap();
                std::thread::sleep(Duration::from_millis(15));
            }
            // Dropping stdin half-closes: the echo server ends the session.
        });
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            stdout.read_to_end(&mut got).unwrap();
            got
        });
        Self {
            child,
            writer,
            reader,
            sent,
        }
    }

    /// Still writing.
    fn writing(&self) -> bool {
        !self.writer.is_finished()
    }

    /// Waits for the end: the client exited 0 and every byte came back,
    /// once, in order.
    fn check(mut self) {
        self.writer.join().unwrap();
        let got = self.reader.join().unwrap();
        assert!(self.child.wait().unwrap().success());
        assert_eq!(got.len(), self.sent.len());
        assert!(got == self.sent, "echo differs");
    }
}

/// A raw TCP client of the echo service through the proxy: writes and
/// reads back `len` bytes.
fn echo_round(s: &mut TcpStream, seed: u32, len: usize) {
    let data: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    s.write_all(&data).unwrap();
    let mut got = vec![0u8; len];
    s.read_exact(&mut got).unwrap();
    assert!(got == data, "the echo differs");
}

#[test]
fn sigterm_drains_eight_curls_and_lets_a_plain_client_finish() {
    if !have("curl") {
        eprintln!("skipped: curl is not installed (.ci/run installs it)");
        return;
    }
    const LEN: usize = 24 << 20;
    const SMALL: usize = 4 << 20;
    let (mut pool, sums) = Pool::start(
        "drain",
        "http",
        &[("big.bin", LEN, 11), ("small.bin", SMALL, 12)],
    );
    // Eight downloads through the proxy (all on s1), slowed so the drain
    // comes in the middle.
    let mut curls = Vec::new();
    for k in 0..8 {
        let out = pool.dir.join(format!("got{k}.bin"));
        let c = Command::new("curl")
            .args(["-sS", "--fail", "--limit-rate", "6M", "-o"])
            .arg(&out)
            .arg(pool.url("big.bin"))
            .spawn()
            .expect("start curl");
        curls.push((c, out));
    }
    // And a plain HTTP client straight to s1 (not migratory): it must get
    // its whole response, then be let go.
    let service = pool.run(&["sessions", "--id", "s1"]);
    assert!(service.status.success());
    let cfg = std::fs::read_to_string(&pool.config).unwrap();
    let s1 = cfg
        .lines()
        .find_map(|l| l.strip_prefix("service = \""))
        .map(|l| l.trim_end_matches('"').to_string())
        .unwrap();
    let plain_out = pool.dir.join("plain.bin");
    let plain = Command::new("curl")
        .args(["-sS", "--fail", "--limit-rate", "1M", "-D", "-", "-o"])
        .arg(&plain_out)
        .arg(format!("http://{s1}/small.bin"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start plain curl");
    let deadline = Instant::now() + Duration::from_secs(60);
    while curls.iter().any(|(_, f)| file_len(f) == 0) || file_len(&plain_out) == 0 {
        assert!(Instant::now() < deadline, "the downloads did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(pool.listed(0), 8, "the eight sessions are on s1");
    assert_eq!(pool.ready(0), Some(200));
    let t0 = Instant::now();
    pool.term(0);
    // Readiness says no while the drain (and the plain client) go on.
    let mut saw_503 = false;
    let status = loop {
        if let Some(s) = pool.exited(0, Duration::ZERO) {
            break s;
        }
        saw_503 |= pool.ready(0) == Some(503);
        assert!(t0.elapsed() < Duration::from_secs(40), "s1 did not exit");
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = t0.elapsed();
    eprintln!("s1 drained and exited in {took:?}");
    assert!(status.success(), "s1 exited with {status}");
    assert!(took < Duration::from_secs(25), "within the drain deadline");
    assert!(saw_503, "readiness never said 503 while draining");
    for (mut c, out) in curls {
        let st = c.wait().unwrap();
        assert!(st.success(), "curl failed: {st}");
        assert_eq!(sha256_file(&out), sums[0], "a download differs");
    }
    let plain = plain.wait_with_output().unwrap();
    assert!(plain.status.success());
    assert_eq!(
        sha256_file(&plain_out),
        sums[1],
        "the plain download differs"
    );
    let head = String::from_utf8_lossy(&plain.stdout).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // Its response was under way when the drain began: it may have been
    // written already, with no `connection: close`; either way the server
    // closed the connection after it (curl would have waited otherwise).
    // The sessions moved: the other servers count them in.
    let moved_in = pool.scrape_from(
        &[1, 2],
        "migratory_migrations_total",
        &["direction=\"in\"", "outcome=\"moved\""],
    );
    assert!(moved_in >= 8.0, "{moved_in}");
}

#[test]
fn sigterm_drains_socat_echo_streaming_both_ways() {
    if !have("socat") {
        eprintln!("skipped: socat is not installed (.ci/run installs it)");
        return;
    }
    let (mut pool, _) = Pool::start("drain-echo", "echo", &[]);
    let mut socat = Command::new("socat");
    socat
        .args(["-t", "30", "-"])
        .arg(format!("TCP:{}", pool.proxy));
    let stream = EchoStream::start(socat);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pool.session(0).is_none_or(|(up, _)| up < 1 << 20) {
        assert!(Instant::now() < deadline, "the stream did not start on s1");
        std::thread::sleep(Duration::from_millis(20));
    }
    pool.term(0);
    let status = pool.exited(0, Duration::from_secs(25)).expect("s1 exits");
    assert!(status.success(), "s1 exited with {status}");
    stream.check();
}

#[test]
fn sigterm_to_the_last_server_standing_resets_its_clients() {
    let (mut pool, _) = Pool::start("last", "echo", &[]);
    let mut c = pool.echo_client(1, 100_000);
    // The two peers leave first (they hold nothing: they exit at once).
    for i in [1, 2] {
        pool.term(i);
        let st = pool.exited(i, Duration::from_secs(20)).expect("peer exits");
        assert!(st.success(), "s{} exited with {st}", i + 1);
    }
    echo_round(&mut c, 2, 100_000);
    let t0 = Instant::now();
    pool.term(0);
    let st = pool.exited(0, Duration::from_secs(20)).expect("s1 exits");
    assert!(st.success(), "s1 exited with {st}");
    eprintln!(
        "the last server ended its session and exited in {:?}",
        t0.elapsed()
    );
    // The client learns through a reset (not an end of stream it could
    // take for a complete answer).
    let mut buf = [0u8; 64];
    match c.read(&mut buf) {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("read {n} bytes instead of a reset"),
    }
}

#[test]
fn migratory_drain_moves_the_sessions_and_the_server_stays_up_not_ready() {
    let (mut pool, _) = Pool::start("drain-cmd", "echo", &[]);
    let mut clients: Vec<TcpStream> = (0..3).map(|k| pool.echo_client(k, 10_000)).collect();
    assert_eq!(pool.listed(0), 3);
    let out = pool.run(&["drain", "--id", "s1", "--deadline", "10s"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 session(s) moved, 0 closed"), "{stdout}");
    assert_eq!(pool.listed(0), 0);
    assert_eq!(pool.listed(1) + pool.listed(2), 3);
    // The process is still there, drained and not ready; the sessions
    // carry on elsewhere, every byte checked.
    assert!(pool.exited(0, Duration::ZERO).is_none(), "s1 exited");
    assert_eq!(pool.ready(0), Some(503));
    for (k, c) in clients.iter_mut().enumerate() {
        echo_round(c, 100 + k as u32, 10_000);
    }
    // A new session through the proxy does not stay on s1.
    clients.push(pool.echo_client(7, 10_000));
    assert_eq!(pool.listed(0), 0);
}

#[test]
fn metrics_match_the_session_listing_after_opens_moves_and_closes() {
    let (pool, _) = Pool::start("metrics", "echo", &[]);
    let open = |i: usize| pool.scrape_one(i, "migratory_sessions_open");
    // Every series is there before the first session (s3 never had one).
    assert_eq!(open(2), Some(0.0), "s3 shows no sessions gauge");
    for i in 0..3 {
        assert_eq!(pool.scrape_one(i, "migratory_draining"), Some(0.0));
    }
    let check = |want: [usize; 3]| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let listed: Vec<usize> = (0..3).map(|i| pool.listed(i)).collect();
            let gauge: Vec<Option<f64>> = (0..3).map(open).collect();
            let as_gauge: Vec<Option<f64>> = want.iter().map(|n| Some(*n as f64)).collect();
            if listed == want && gauge == as_gauge {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "want {want:?}: listed {listed:?}, gauge {gauge:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // The harness's readiness probe of the proxy was a session too: gone.
    check([0, 0, 0]);
    let mut clients: Vec<TcpStream> = (0..5).map(|k| pool.echo_client(k, 1000)).collect();
    check([5, 0, 0]);
    let out = pool.run(&["migrate", "--from", "s1", "--to", "s2", "--count", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check([3, 2, 0]);
    for (k, c) in clients.iter_mut().enumerate() {
        echo_round(c, 10 + k as u32, 1000);
    }
    drop(clients);
    check([0, 0, 0]);
}

#[test]
fn curl_downloads_256_mib_through_the_proxy_across_ten_migrations() {
    if !have("curl") {
        eprintln!("skipped: curl is not installed (.ci/run installs it)");
        return;
    }
    const LEN: usize = 256 << 20;
    let (mut pool, sums) = Pool::start("curl", "http", &[("big.bin", LEN, 7)]);
    let out_file = pool.dir.join("got.bin");
    let mut curl = Command::new("curl")
        .args(["-sS", "--fail", "--limit-rate", "48M", "-o"])
        .arg(&out_file)
        .arg(pool.url("big.bin"))
        .spawn()
        .expect("start curl");
    let mut moves = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while moves < 12 && Instant::now() < deadline {
        if curl.try_wait().unwrap().is_some() {
            break;
        }
        if file_len(&out_file) == 0 {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        if pool.migrate_next() {
            moves += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = curl.wait().unwrap();
    eprintln!("{moves} migrations while curl downloaded");
    assert!(status.success(), "curl failed: {status}");
    assert!(moves >= 10, "only {moves} migrations while curl ran");
    assert_eq!(file_len(&out_file), LEN as u64);
    assert_eq!(
        sha256_file(&out_file),
        sums[0],
        "what curl saved is the file"
    );
    // The scrape shows what happened: every move counted out at its origin
    // and in at its destination, with durations.
    let out = pool.scrape(
        "migratory_migrations_total",
        &[
            "direction=\"out\"",
            "outcome=\"moved\"",
            "cause=\"trigger\"",
        ],
    );
    let inn = pool.scrape(
        "migratory_migrations_total",
        &["direction=\"in\"", "outcome=\"moved\""],
    );
    assert!(
        out >= moves as f64 && inn >= moves as f64,
        "out {out} in {inn}"
    );
    let timed = pool.scrape(
        "migratory_migration_duration_seconds_count",
        &["direction=\"in\""],
    );
    assert!(timed >= moves as f64, "{timed}");
    // The ring s1 -> s2 -> s3 -> s1 used every pair: two peers up each.
    assert_eq!(pool.scrape("migratory_peers_up", &[]), 6.0);
}

#[test]
fn two_keep_alive_requests_in_one_curl_migrate_during_and_between() {
    if !have("curl") {
        eprintln!("skipped: curl is not installed (.ci/run installs it)");
        return;
    }
    const LEN: usize = 24 << 20;
    let (mut pool, sums) =
        Pool::start("keepalive", "http", &[("a.bin", LEN, 1), ("b.bin", LEN, 2)]);
    let (fa, fb) = (pool.dir.join("a.out"), pool.dir.join("b.out"));
    // --rate: the second transfer starts 4 s after the first on the same
    // connection, leaving an idle gap between the two responses.
    let mut curl = Command::new("curl")
        .args(["-sS", "--fail", "--limit-rate", "12M", "--rate", "15/m"])
        .args(["-w", "%{num_connects}\\n", "-o"])
        .arg(&fa)
        .arg(pool.url("a.bin"))
        .arg("-o")
        .arg(&fb)
        .arg(pool.url("b.bin"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start curl");
    let (mut during_a, mut between, mut during_b) = (0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && curl.try_wait().unwrap().is_none() {
        let (a0, b0) = (file_len(&fa), file_len(&fb));
        if a0 == 0 {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let before = pool.session(pool.owner);
        if !pool.migrate_next() {
            continue;
        }
        let after = pool.session(pool.owner);
        let (a1, b1) = (file_len(&fa), file_len(&fb));
        if a1 < LEN as u64 && b1 == 0 {
            during_a += 1;
        } else if a0 == LEN as u64 && b1 == 0 && before.is_some() && before == after {
            // The first response was whole at the client and no byte of
            // either direction moved while the session did.
            between += 1;
        } else if b0 > 0 && b1 < LEN as u64 {
            during_b += 1;
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    let out = curl.wait_with_output().unwrap();
    eprintln!(
        "migrations: during the first {during_a}, between {between}, during the second {during_b}"
    );
    assert!(out.status.success(), "curl failed: {}", out.status);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "1\n0\n",
        "one connection, reused for the second request"
    );
    assert_eq!(sha256_file(&fa), sums[0]);
    assert_eq!(sha256_file(&fb), sums[1]);
    assert!(
        during_a >= 1 && between >= 1 && during_b >= 1,
        "migrations during the first {during_a}, between {between}, during the second {during_b}"
    );
}

#[test]
fn socat_echo_through_the_proxy_is_exact_across_migrations() {
    let client: Vec<String> = if have("socat") {
        vec!["socat".into(), "-t".into(), "30".into(), "-".into()]
    } else if have("nc") {
        vec!["nc".into(), "-N".into()]
    } else {
        eprintln!("skipped: neither socat nor nc is installed");
        return;
    };
    let (mut pool, _) = Pool::start("echo", "echo", &[]);
    let mut cmd = Command::new(&client[0]);
    cmd.args(&client[1..]);
    if client[0] == "socat" {
        cmd.arg(format!("TCP:{}", pool.proxy));
    } else {
        cmd.args([pool.proxy.ip().to_string(), pool.proxy.port().to_string()]);
    }
    let stream = EchoStream::start(cmd);
    let mut moves = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stream.writing() && Instant::now() < deadline {
        if pool.session(pool.owner).is_none() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        if pool.migrate_next() {
            moves += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stream.check();
    eprintln!("{moves} migrations while {} echoed", client[0]);
    assert!(moves >= 3, "only {moves} migrations");
}

#[test]
fn operator_errors_are_one_clear_line() {
    let dir = std::env::temp_dir().join(format!("migratory-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let addrs = free_addrs(4);
    let good = format!(
        "cluster_key = \"pool test cluster key 0123456789\"\n\
         [[server]]\nid = \"s1\"\nservice = \"{}\"\ncontrol = \"{}\"\n\
         [[server]]\nid = \"s2\"\nservice = \"{}\"\ncontrol = \"{}\"\n",
        addrs[0], addrs[1], addrs[2], addrs[3]
    );
    let cfg = dir.join("pool.toml");
    std::fs::write(&cfg, &good).unwrap();
    make_certs(&cfg);
    let check = |args: &[&str], config: &str, want: &str| {
        std::fs::write(&cfg, config).unwrap();
        let out = Command::new(BIN)
            .args(args)
            .args(["--config", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {want:?} not in {err:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    };
    // A bad key in the file, named.
    let bad = good.replacen(&addrs[1].to_string(), "127.0.0.1", 1);
    check(&["sessions", "--id", "s1"], &bad, "server[0].control");
    // A server not in the pool.
    check(&["sessions", "--id", "s9"], &good, "no server \"s9\"");
    // Nobody listening on the control address.
    check(&["sessions", "--id", "s1"], &good, "server s1");
    check(
        &["migrate", "--from", "s1", "--to", "s2", "--all"],
        &good,
        "Connection refused",
    );
    // The service port is taken.
    let taken = TcpListener::bind(addrs[0]).unwrap();
    check(
        &["serve", "--id", "s1", "--service", "echo"],
        &good,
        &format!("cannot bind {}", addrs[0]),
    );
    drop(taken);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_logs_json_and_stops_cleanly_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("migratory-term-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let addrs = free_addrs(2);
    let cfg = dir.join("pool.toml");
    std::fs::write(
        &cfg,
        format!(
            "cluster_key = \"pool test cluster key 0123456789\"\n\
             [[server]]\nid = \"s1\"\nservice = \"{}\"\ncontrol = \"{}\"\n",
            addrs[0], addrs[1]
        ),
    )
    .unwrap();
    make_certs(&cfg);
    let mut c = Command::new(BIN)
        .args([
            "--log-json",
            "serve",
            "--service",
            "counter",
            "--id",
            "s1",
            "--config",
        ])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(listening(addrs[0], &mut c, "s1"));
    // A plain TCP client of the counter service (it speaks first: served
    // as plain TCP after the preamble wait).
    let mut s = TcpStream::connect(addrs[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut first = [0u8; 2];
    s.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"1\n");
    let kill = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = c.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let mut err = String::new();
    c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("SIGTERM"), "{err}");
    for line in err.lines() {
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not JSON: {line}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Makes the pool's TLS files with `migratory certs` (replacing any).
fn make_certs(cfg: &Path) {
    let out = Command::new(BIN)
        .args(["certs", "--force", "--config"])
        .arg(cfg)
        .output()
        .expect("run migratory certs");
    assert!(
        out.status.success(),
        "migratory certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
