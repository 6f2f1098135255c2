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

    /// The sum of a metric's samples over the three servers, for samples
    /// whose labels contain every one of `labels`.
    fn scrape(&self, metric: &str, labels: &[&str]) -> f64 {
        let mut sum = 0.0;
        for m in &self.metrics {
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
    let mut moves = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !writer.is_finished() && Instant::now() < deadline {
        if pool.session(pool.owner).is_none() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        if pool.migrate_next() {
            moves += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    writer.join().unwrap();
    let got = reader.join().unwrap();
    assert!(child.wait().unwrap().success());
    eprintln!("{moves} migrations while {} echoed", client[0]);
    assert!(moves >= 3, "only {moves} migrations");
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "echo differs");
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
