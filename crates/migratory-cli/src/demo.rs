//! `migratory demo`: a pool of server processes, one live transfer, many
//! migrations of every kind, every byte checked.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use migratory::proto::types::SessionId;
use migratory::{
    ClientTls, MigratoryStream, Peer, PoolCerts, ServerBuilder, ServerTls, SessionControl,
};
use migratory_services::transfer;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::watch;

/// Options of `migratory demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Bytes to download and to upload, each (e.g. 64MiB, 1GiB, 100000).
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    size: u64,
    /// Migrations to perform while the data flows.
    #[arg(long, default_value_t = 24)]
    migrations: u32,
    /// Servers in the pool (each a separate process).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=16))]
    servers: u32,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// Options of the hidden `migratory demo-server`.
#[derive(Args, Debug)]
pub struct ServerArgs {
    #[arg(long)]
    id: String,
    #[arg(long)]
    service: SocketAddr,
    #[arg(long)]
    control: SocketAddr,
    /// Cluster key, hex.
    #[arg(long)]
    key: String,
    /// Folder of the pool's TLS files (as `migratory certs` writes them).
    #[arg(long)]
    certs: std::path::PathBuf,
    /// A peer: ID=SERVICE,CONTROL (repeatable).
    #[arg(long = "peer")]
    peers: Vec<String>,
}

/// Parses `64MiB`, `1GiB`, `10MB`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 64MiB)"))?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "KB" => 1000,
        "M" | "MiB" => 1 << 20,
        "MB" => 1_000_000,
        "G" | "GiB" => 1 << 30,
        "GB" => 1_000_000_000,
        u => return Err(format!("unknown size unit {u:?} (use B, KiB, MiB, GiB)")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    hex::decode(s).map_err(|e| format!("bad hex {s:?}: {e}"))
}

fn name(i: usize) -> String {
    format!("s{}", i + 1)
}

/// One server of the demo pool: serves the transfer service and takes
/// `push SESSION DEST` / `pull SESSION OWNER` commands on stdin (the demo's
/// operator channel); exits when stdin closes.
pub async fn serve(args: ServerArgs) -> Result<bool, String> {
    let mut b = ServerBuilder::new(&args.id);
    let tls = ServerTls::from_pem_files(
        args.certs.join("ca.pem"),
        args.certs.join(format!("{}.pem", args.id)),
        args.certs.join(format!("{}.key", args.id)),
    )
    .map_err(|e| e.to_string())?;
    b.tls(tls)
        .service(args.service)
        .control(args.control)
        .cluster_key(unhex(&args.key)?)
        .max_state(1 << 20);
    for p in &args.peers {
        let (id, addrs) = p
            .split_once('=')
            .ok_or_else(|| format!("--peer {p:?}: want ID=SERVICE,CONTROL"))?;
        let (svc, ctl) = addrs
            .split_once(',')
            .ok_or_else(|| format!("--peer {p:?}: want ID=SERVICE,CONTROL"))?;
        b.peer(Peer {
            id: id.into(),
            service: svc.parse().map_err(|e| format!("--peer {p:?}: {e}"))?,
            control: ctl.parse().map_err(|e| format!("--peer {p:?}: {e}"))?,
        });
    }
    let mut server = b.bind().await.map_err(|e| e.to_string())?;
    let handle = server.handle();
    let controls: Arc<Mutex<HashMap<SessionId, SessionControl>>> = Arc::default();
    let c2 = controls.clone();
    tokio::spawn(async move {
        while let Some((s, arrival)) = server.accept().await {
            if let Some(c) = s.control() {
                c2.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(c.id(), c);
            }
            tokio::spawn(async move {
                if let Err(e) = transfer::serve(s, arrival).await {
                    eprintln!("demo-server: session failed: {e}");
                }
            });
        }
    });
    println!("ready");
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let sid = parts
            .get(1)
            .and_then(|s| u128::from_str_radix(s, 16).ok())
            .map(SessionId);
        let result = match (parts.first().copied(), sid, parts.get(2)) {
            (Some("push"), Some(sid), Some(dest)) => {
                let c = controls
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&sid)
                    .cloned();
                match c {
                    Some(c) => c.migrate_to(Some(dest)).map_err(|e| e.to_string()),
                    None => Err("no such session here".into()),
                }
            }
            (Some("pull"), Some(sid), Some(owner)) => {
                handle.pull(sid, owner).map_err(|e| e.to_string())
            }
            _ => Err(format!("unknown command {line:?}")),
        };
        if let Err(e) = result {
            eprintln!("demo-server {}: {e}", args.id);
        }
    }
    Ok(true)
}

struct Pool {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    service: Vec<SocketAddr>,
    /// The pool's TLS files (removed when the demo ends).
    certs: CertsDir,
}

/// A folder of TLS files, removed on drop.
struct CertsDir(std::path::PathBuf);

impl Drop for CertsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start_pool(n: usize) -> Result<Pool, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let key = hex::encode(rand::random::<[u8; 32]>());
    // Free loopback ports, bound and released.
    let reserve = |n| -> Result<Vec<SocketAddr>, String> {
        let ls: Vec<std::net::TcpListener> = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        ls.iter()
            .map(|l| l.local_addr().map_err(|e| e.to_string()))
            .collect()
    };
    let service = reserve(n)?;
    let control = reserve(n)?;
    // A pool CA and certificates of its own: every connection is TLS.
    let certs =
        CertsDir(std::env::temp_dir().join(format!("migratory-demo-{}", std::process::id())));
    let ids: Vec<String> = (0..n).map(name).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    PoolCerts::generate(migratory::tls::DEFAULT_POOL_NAME)
        .and_then(|p| p.write_dir(&certs.0, &ids))
        .map_err(|e| e.to_string())?;
    let mut children = Vec::new();
    let mut stdins = Vec::new();
    for i in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.arg("demo-server")
            .arg("--id")
            .arg(name(i))
            .arg("--service")
            .arg(service[i].to_string())
            .arg("--control")
            .arg(control[i].to_string())
            .arg("--key")
            .arg(&key)
            .arg("--certs")
            .arg(&certs.0);
        for j in (0..n).filter(|j| *j != i) {
            cmd.arg("--peer")
                .arg(format!("{}={},{}", name(j), service[j], control[j]));
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start server {}: {e}", name(i)))?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        match tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await {
            Ok(Ok(Some(l))) if l == "ready" => {}
            _ => return Err(format!("server {} did not start", name(i))),
        }
        stdins.push(child.stdin.take().expect("piped"));
        children.push(child);
    }
    Ok(Pool {
        children,
        stdins,
        service,
        certs,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Client,
    Push,
    Pull,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Client => "client",
            Kind::Push => "server push",
            Kind::Pull => "destination pull",
        }
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// What the transfer and the migrations have done so far.
#[derive(Debug, Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    migrations: AtomicU64,
}

impl Counters {
    fn line(&self, size: u64) -> String {
        format!(
            "down {:.1}/{:.1} MiB, up {:.1}/{:.1} MiB, {} migrations",
            mib(self.down.load(Ordering::Relaxed)),
            mib(size),
            mib(self.up.load(Ordering::Relaxed)),
            mib(size),
            self.migrations.load(Ordering::Relaxed)
        )
    }
}

/// The demo's progress on stderr: a bar (bytes both ways, migrations) when
/// stderr is a terminal, a plain line every second otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(size: u64, counters: Arc<Counters>) -> Self {
        if !std::io::stderr().is_terminal() {
            let task = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    eprintln!("  progress: {}", counters.line(size));
                }
            });
            return Self { bar: None, task };
        }
        let style = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let bar = ProgressBar::new(size.saturating_mul(2)).with_style(style);
        let b = bar.clone();
        let task = tokio::spawn(async move {
            loop {
                let c = &counters;
                b.set_position(c.up.load(Ordering::Relaxed) + c.down.load(Ordering::Relaxed));
                b.set_message(c.line(size));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self {
            bar: Some(bar),
            task,
        }
    }

    /// Prints a line (above the bar, if there is one).
    fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn finish(self) {
        self.task.abort();
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

/// Runs the demo; `Ok(false)` when any check failed.
pub async fn run(args: DemoArgs) -> Result<bool, String> {
    let n = args.servers as usize;
    let size = args.size;
    let started = Instant::now();
    let mut pool = start_pool(n).await?;
    eprintln!(
        "pool of {n} server processes on loopback: {:?}",
        pool.service
    );
    let tls = ClientTls::from_ca_file(pool.certs.0.join("ca.pem")).map_err(|e| e.to_string())?;
    let stream = MigratoryStream::connect(&pool.service[..1], &tls)
        .await
        .map_err(|e| e.to_string())?;
    let mut ctl = stream.control();
    let sid = ctl.session().ok_or("no session id")?;
    eprintln!(
        "session {sid} on {}",
        ctl.server().map(|s| s.to_string()).unwrap_or_default()
    );
    let (mut rd, mut wr) = tokio::io::split(stream);
    let moves = u64::from(args.migrations);
    let step = size / (moves + 1);
    let (gate_tx, gate) = watch::channel(step.max(1));
    let counters = Arc::new(Counters::default());
    let (u, d) = (counters.clone(), counters.clone());
    let up_gate = gate.clone();
    let uploader = tokio::spawn(async move {
        transfer::send_upload(&mut wr, size, 1, size, 2, Some(up_gate), |k| {
            u.up.fetch_add(k as u64, Ordering::Relaxed);
        })
        .await
    });
    let downloader = tokio::spawn(async move {
        transfer::receive_download(&mut rd, size, 1, Some(gate), |k| {
            d.down.fetch_add(k as u64, Ordering::Relaxed);
        })
        .await
    });
    let progress = Progress::start(size, counters.clone());
    let mut durations = Vec::new();
    let mut counts = HashMap::new();
    let mut owner = 0usize;
    let mut failures = 0u32;
    for k in 0..moves {
        // Wait until the data reached this step in both directions.
        while (counters.up.load(Ordering::Relaxed) < step * (k + 1).min(moves)
            || counters.down.load(Ordering::Relaxed) < step * (k + 1).min(moves))
            && !uploader.is_finished()
            && !downloader.is_finished()
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let kind = [Kind::Client, Kind::Push, Kind::Pull][k as usize % 3];
        let next = (owner + 1 + (k as usize / 3) % (n - 1)) % n;
        let t0 = Instant::now();
        let issued = match kind {
            Kind::Client => ctl
                .migrate(Some(&name(next)))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Kind::Push => {
                command(
                    &mut pool.stdins[owner],
                    &format!("push {sid} {}", name(next)),
                )
                .await
            }
            Kind::Pull => {
                command(
                    &mut pool.stdins[next],
                    &format!("pull {sid} {}", name(owner)),
                )
                .await
            }
        };
        let arrived = issued.is_ok()
            && tokio::time::timeout(Duration::from_secs(10), async {
                while ctl.server().map(|s| s.to_string()) != Some(name(next)) {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            })
            .await
            .is_ok();
        let took = t0.elapsed();
        if arrived {
            progress.println(&format!(
                "migration {:>2}: {:<16} {} -> {}  {:>8.2} ms",
                k + 1,
                kind.name(),
                name(owner),
                name(next),
                took.as_secs_f64() * 1e3
            ));
            counters.migrations.fetch_add(1, Ordering::Relaxed);
            durations.push(took);
            *counts.entry(kind.name()).or_insert(0u32) += 1;
            owner = next;
        } else {
            failures += 1;
            progress.println(&format!(
                "migration {:>2}: {} to {} did not happen: {issued:?}",
                k + 1,
                kind.name(),
                name(next)
            ));
        }
        gate_tx.send_replace(step * (k + 2));
    }
    gate_tx.send_replace(u64::MAX);
    let up = uploader.await.map_err(|e| e.to_string())?;
    let down = downloader.await.map_err(|e| e.to_string())?;
    progress.finish();
    let seconds = started.elapsed().as_secs_f64();
    let (up_digest, down) = match (up, down) {
        (Ok(u), Ok(d)) => (u, d),
        (u, d) => {
            let e = u
                .err()
                .or(d.err())
                .map(|e| e.to_string())
                .unwrap_or_default();
            eprintln!("transfer failed: {e}");
            print_json(args.json, false, 0, 0, &durations, seconds);
            return Ok(false);
        }
    };
    let down_ok =
        down.exact && down.len == size && down.sha256 == transfer::expected_sha256(1, size);
    let up_ok = down.upload_report == (size, up_digest);
    durations.sort();
    let ok = down_ok && up_ok && failures == 0;
    let pct = |p: usize| {
        durations
            .get((durations.len().saturating_sub(1)) * p / 100)
            .copied()
            .unwrap_or_default()
    };
    eprintln!();
    eprintln!("summary");
    eprintln!(
        "  bytes down {} ({:.1} MiB), bytes up {} ({:.1} MiB)",
        down.len,
        mib(down.len),
        down.upload_report.0,
        mib(down.upload_report.0)
    );
    eprintln!(
        "  migrations {} ({}), failed {failures}",
        durations.len(),
        ["client", "server push", "destination pull"]
            .iter()
            .map(|k| format!("{k}: {}", counts.get(k).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!(
        "  migration time p50 {:.2} ms, p99 {:.2} ms",
        pct(50).as_secs_f64() * 1e3,
        pct(99).as_secs_f64() * 1e3
    );
    eprintln!(
        "  {:.2} s, {:.1} MiB/s each way",
        seconds,
        mib(size) / seconds
    );
    eprintln!(
        "  down sha256 {} {}",
        hex::encode(down.sha256),
        if down_ok {
            "OK (matches the generated file)"
        } else {
            "MISMATCH"
        }
    );
    eprintln!(
        "  up   digest {} {}",
        hex::encode(down.upload_report.1),
        if up_ok {
            "OK (server read exactly what was sent)"
        } else {
            "MISMATCH"
        }
    );
    print_json(
        args.json,
        ok,
        down.upload_report.0,
        down.len,
        &durations,
        seconds,
    );
    // All at once, so that no server outlives another long enough to
    // report its peer gone.
    for c in &mut pool.children {
        let _ = c.start_kill();
    }
    for mut c in pool.children.drain(..) {
        let _ = c.wait().await;
    }
    Ok(ok)
}

async fn command(stdin: &mut ChildStdin, line: &str) -> Result<(), String> {
    stdin
        .write_all(format!("{line}\n").as_bytes())
        .await
        .map_err(|e| format!("server gone: {e}"))
}

/// The `--json` line.
#[derive(Debug, serde::Serialize)]
struct Outcome {
    ok: bool,
    bytes_up: u64,
    bytes_down: u64,
    migrations: usize,
    migration_p50_us: u64,
    migration_p99_us: u64,
    seconds: f64,
}

fn print_json(json: bool, ok: bool, up: u64, down: u64, sorted: &[Duration], seconds: f64) {
    if !json {
        return;
    }
    let pct = |p: usize| {
        sorted
            .get((sorted.len().saturating_sub(1)) * p / 100)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    };
    let outcome = Outcome {
        ok,
        bytes_up: up,
        bytes_down: down,
        migrations: sorted.len(),
        migration_p50_us: pct(50),
        migration_p99_us: pct(99),
        // Milliseconds are enough.
        seconds: (seconds * 1e3).round() / 1e3,
    };
    match serde_json::to_string(&outcome) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("cannot write the JSON line: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(
            unhex(&hex::encode([0, 1, 254, 255])).unwrap(),
            vec![0, 1, 254, 255]
        );
        assert!(unhex("abc").is_err());
        assert!(unhex("zz").is_err());
    }

    #[test]
    fn the_json_line_has_the_fields_in_order() {
        let o = Outcome {
            ok: true,
            bytes_up: 1,
            bytes_down: 2,
            migrations: 3,
            migration_p50_us: 4,
            migration_p99_us: 5,
            seconds: 1.25,
        };
        assert_eq!(
            serde_json::to_string(&o).unwrap(),
            r#"{"ok":true,"bytes_up":1,"bytes_down":2,"migrations":3,"migration_p50_us":4,"migration_p99_us":5,"seconds":1.25}"#
        );
    }
}
