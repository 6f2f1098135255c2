//! `migratory bench stream`: the stream server experiment of the MTCP
//! thesis (section 5.3.2, fig 5.4). Servers of a pool (in this process,
//! over TLS) run a stream service whose writes slow down on each connection
//! after a threshold of bytes; a client downloads the stream with the
//! throughput policy and moves to another server each time its rate falls
//! to 0.7 of the best it saw there. The bytes received against time are
//! recorded without migration, and with application states of several
//! sizes (2, 10 and 16 KiB by default, the thesis's).
//!
//! The thesis's servers wrote 1 KiB chunks as fast as a 100 Mb/s Ethernet
//! took them. On loopback a server writes at over 1 GB/s, where the few
//! sampling periods the policy needs to notice a slowdown would dwarf
//! everything else; so each server writes at a best rate of `--rate`
//! (8 MiB/s by default, about the thesis's link) until the threshold, and
//! the rate then falls as the thesis describes: gradually, halving every
//! `--ramp` bytes more.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use migratory::proto::client::ClientConfig;
use migratory::{
    ClientTls, Manual, MigratoryStream, Peer, Policy, PoolCerts, ServerBuilder, Throughput,
    ThroughputConfig,
};
use migratory_services::stream::{self, byte_at, Shape};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

const KEY: &[u8] = b"migratory stream bench cluster key";

/// Options of `migratory bench stream`.
#[derive(Args, Debug)]
pub struct StreamArgs {
    /// Servers in the pool (the client goes round them).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..=16))]
    servers: u32,
    /// Length of the stream, e.g. 32MiB.
    #[arg(long, default_value = "32MiB", value_parser = crate::demo::parse_size)]
    size: u64,
    /// A server's best rate, in bytes per second (e.g. 8MiB): how fast it
    /// writes until the threshold.
    #[arg(long, default_value = "8MiB", value_parser = crate::demo::parse_size)]
    rate: u64,
    /// Bytes a server writes at its best rate on each connection before
    /// it slows down.
    #[arg(long, default_value = "8MiB", value_parser = crate::demo::parse_size)]
    threshold: u64,
    /// After the threshold, the server's rate halves every this many bytes
    /// more (its delay before each chunk grows with every chunk).
    #[arg(long, default_value = "4MiB", value_parser = crate::demo::parse_size)]
    ramp: u64,
    /// Bytes per write; the service snapshots after each (thesis: 1 KiB).
    #[arg(long, default_value = "1KiB", value_parser = crate::demo::parse_size)]
    chunk: u64,
    /// Application state sizes with migration enabled, e.g. 2KiB,10KiB,16KiB.
    #[arg(long, value_delimiter = ',', default_value = "2KiB,10KiB,16KiB", value_parser = crate::demo::parse_size)]
    state: Vec<u64>,
    /// The throughput policy's smoothing weight.
    #[arg(long, default_value_t = 0.4)]
    alpha: f64,
    /// The throughput policy's trigger (fraction of the best smoothed rate).
    #[arg(long, default_value_t = 0.7)]
    trigger: f64,
    /// The throughput policy's sampling period.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    period: Duration,
    /// The throughput policy's least time between migrations.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    min_interval: Duration,
    /// The throughput policy's samples in a row at or below the trigger
    /// before it acts.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    confirm: u32,
    /// Write the bytes received against time here (CSV: case, state_bytes,
    /// seconds, bytes).
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// Draw the figure (bytes received against time, one curve per case)
    /// as an SVG file here.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// A pool of `n` servers running the stream service; returns the service
/// addresses and the accept loops (aborting one drops its server).
async fn pool(
    n: usize,
    shape: Shape,
    state: usize,
    certs: &PoolCerts,
) -> Result<(Vec<SocketAddr>, Vec<JoinHandle<()>>), String> {
    let mut listeners = Vec::new();
    for _ in 0..2 * n {
        listeners.push(std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?);
    }
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr().map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    drop(listeners);
    let name = |i: usize| format!("s{}", i + 1);
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut b = ServerBuilder::new(name(i));
        b.tls(certs.server_tls(&name(i)).map_err(|e| e.to_string())?)
            .service(addrs[2 * i])
            .control(addrs[2 * i + 1])
            .cluster_key(KEY)
            .max_state(state.max(64 * 1024));
        for j in (0..n).filter(|j| *j != i) {
            b.peer(Peer {
                id: name(j),
                service: addrs[2 * j],
                control: addrs[2 * j + 1],
            });
        }
        let mut server = b.bind().await.map_err(|e| e.to_string())?;
        tasks.push(tokio::spawn(async move {
            while let Some((s, arrival)) = server.accept().await {
                tokio::spawn(stream::serve(s, arrival, shape, state));
            }
        }));
    }
    Ok(((0..n).map(|i| addrs[2 * i]).collect(), tasks))
}

/// One download: bytes received against time.
struct Run {
    label: String,
    state: Option<usize>,
    /// (seconds since the request, bytes received), every 10 ms or so.
    trace: Vec<(f64, u64)>,
    seconds: f64,
    migrations: u64,
}

impl Run {
    /// When the first `bytes` had arrived.
    fn time_to(&self, bytes: u64) -> Option<f64> {
        self.trace
            .iter()
            .find(|(_, b)| *b >= bytes)
            .map(|(t, _)| *t)
    }
}

/// Downloads the stream once from a fresh pool; `state` is `None` for the
/// case without migration.
async fn download(
    a: &StreamArgs,
    shape: Shape,
    state: Option<usize>,
    certs: &PoolCerts,
    tls: &ClientTls,
) -> Result<Run, String> {
    let (service, tasks) = pool(a.servers as usize, shape, state.unwrap_or(2048), certs).await?;
    let policy: Box<dyn Policy> = match state {
        None => Box::new(Manual),
        Some(_) => {
            let cfg = ThroughputConfig {
                alpha: a.alpha,
                trigger: a.trigger,
                period: a.period,
                confirm: a.confirm,
                min_interval: a.min_interval,
                ..ThroughputConfig::default()
            };
            cfg.validate()?;
            Box::new(Throughput::new(cfg))
        }
    };
    let mut c = MigratoryStream::connect_with(ClientConfig::default(), tls, policy, &service[..1])
        .await
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    c.write_all(&a.size.to_be_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0u64;
    let mut trace = vec![(0.0, 0)];
    let mut last = 0.0;
    loop {
        let n = c.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        if let Some(i) = buf[..n]
            .iter()
            .enumerate()
            .position(|(i, b)| *b != byte_at(pos + i as u64))
        {
            return Err(format!("byte {} of the stream differs", pos + i as u64));
        }
        pos += n as u64;
        let t = t0.elapsed().as_secs_f64();
        if t - last >= 0.01 {
            trace.push((t, pos));
            last = t;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    trace.push((seconds, pos));
    if pos != a.size {
        return Err(format!("the stream ended after {pos} of {} bytes", a.size));
    }
    let migrations = c.stats().migrations;
    drop(c);
    for t in tasks {
        t.abort();
    }
    let label = match state {
        None => "no migration".to_string(),
        Some(s) => format!("state {}", size_label(s as u64)),
    };
    Ok(Run {
        label,
        state,
        trace,
        seconds,
        migrations,
    })
}

fn size_label(b: u64) -> String {
    if b % 1024 == 0 {
        format!("{} KiB", b / 1024)
    } else {
        format!("{b} B")
    }
}

const MIB: f64 = 1048576.0;

/// Runs the experiment.
pub fn run(a: StreamArgs) -> Result<bool, String> {
    if a.chunk == 0 || a.chunk > 1 << 20 {
        return Err("--chunk: between 1 byte and 1 MiB".into());
    }
    if a.rate == 0 || a.ramp == 0 || a.size == 0 {
        return Err("--rate, --ramp and --size must not be zero".into());
    }
    if let Some(s) = a.state.iter().find(|s| **s > 1 << 20) {
        return Err(format!("--state {s}: at most 1 MiB"));
    }
    let shape = Shape {
        rate: a.rate as f64,
        threshold: a.threshold,
        ramp: a.ramp,
        chunk: a.chunk as usize,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let certs = Arc::new(
        PoolCerts::generate(migratory::tls::DEFAULT_POOL_NAME).map_err(|e| e.to_string())?,
    );
    let tls = certs.client_tls().map_err(|e| e.to_string())?;
    let cases: Vec<Option<usize>> = std::iter::once(None)
        .chain(a.state.iter().map(|s| Some(*s as usize)))
        .collect();
    let mut runs = Vec::new();
    for state in cases {
        runs.push(rt.block_on(download(&a, shape, state, &certs, &tls))?);
    }
    // The best server's rate: the rate at which the download without
    // migration received its first `threshold` bytes (a server at its
    // best), measured; else the configured one.
    let base = &runs[0];
    let upto = a.threshold.min(a.size);
    let best = match base.time_to(upto) {
        Some(t) if t > 0.0 => upto as f64 / t,
        _ => a.rate as f64,
    };
    let mut text = format!(
        "stream of {} in {} B chunks from {} servers; best rate {:.2} MiB/s up to {} per connection, then halving every {}\n  best server's rate (measured, first {} without migration): {:.2} MiB/s\n  case              seconds  effective MiB/s  of best  migrations\n",
        size_label(a.size),
        a.chunk,
        a.servers,
        a.rate as f64 / MIB,
        size_label(a.threshold),
        size_label(a.ramp),
        size_label(upto),
        best / MIB
    );
    let mut rows = Vec::new();
    for r in &runs {
        let eff = a.size as f64 / r.seconds;
        text += &format!(
            "  {:<16} {:>8.2} {:>16.2} {:>7.1}% {:>11}\n",
            r.label,
            r.seconds,
            eff / MIB,
            100.0 * eff / best,
            r.migrations
        );
        rows.push(json!({
            "case": r.label,
            "state_bytes": r.state,
            "seconds": r.seconds,
            "effective_rate": eff,
            "best_rate": best,
            "ratio": eff / best,
            "migrations": r.migrations,
        }));
    }
    if let Some(path) = &a.csv {
        let mut csv = String::from("case,state_bytes,seconds,bytes\n");
        for r in &runs {
            let st = r.state.map_or(String::new(), |s| s.to_string());
            for (t, b) in &r.trace {
                csv += &format!("{},{st},{t:.4},{b}\n", r.label);
            }
        }
        std::fs::write(path, csv).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &a.svg {
        figure(path, &runs, &a).map_err(|e| format!("cannot draw {}: {e}", path.display()))?;
    }
    let v: Value = json!({
        "bench": "stream",
        "size": a.size,
        "servers": a.servers,
        "chunk": a.chunk,
        "rate": a.rate,
        "threshold": a.threshold,
        "ramp": a.ramp,
        "alpha": a.alpha,
        "trigger": a.trigger,
        "period_ms": a.period.as_secs_f64() * 1e3,
        "confirm": a.confirm,
        "min_interval_ms": a.min_interval.as_secs_f64() * 1e3,
        "best_rate": best,
        "cases": rows,
    });
    if a.json {
        println!("{v}");
    } else {
        print!("{text}");
    }
    Ok(true)
}

/// MTCP fig 5.4: bytes received against time, one curve per case.
fn figure(
    path: &std::path::Path,
    runs: &[Run],
    a: &StreamArgs,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let x_max = runs.iter().map(|r| r.seconds).fold(1.0, f64::max) * 1.02;
    let y_max = a.size as f64 / MIB * 1.05;
    let root = SVGBackend::new(path, (720, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Stream server experiment: {} download, servers degrade after {}",
                size_label(a.size),
                size_label(a.threshold)
            ),
            ("sans-serif", 17),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("MiB received")
        .draw()?;
    let colors = [
        BLACK,
        BLUE,
        RED,
        RGBColor(0, 140, 0),
        MAGENTA,
        RGBColor(200, 120, 0),
    ];
    for (i, r) in runs.iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(
                r.trace.iter().map(|(t, b)| (*t, *b as f64 / MIB)),
                color.stroke_width(2),
            ))?
            .label(format!("{} ({} migrations)", r.label, r.migrations))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
