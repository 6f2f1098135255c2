//! `migratory serve`: one server of a pool, running a built-in service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tracing::{debug, info, warn};

use crate::config::PoolConfig;
use migratory_services::{self as service, Kind, Options};

/// Options of `migratory serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The pool configuration file (TOML): cluster key and every server's
    /// service and control addresses.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Which server of the pool this is (its `id` in the configuration).
    #[arg(long, value_name = "ID")]
    id: String,
    /// The built-in service to run: `http` (static files from --root),
    /// `echo`, or `counter` (MIGSOCK's count server).
    #[arg(long, value_enum, value_name = "SERVICE")]
    service: Kind,
    /// http: the directory to serve (every server of the pool should serve
    /// the same files).
    #[arg(long, value_name = "DIR", default_value = ".")]
    root: PathBuf,
    /// counter: pause between two numbers (e.g. 1s, 100ms; 0 = as fast as
    /// the client reads).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    counter_interval: Duration,
    /// http: how long a request head may take to arrive (from the
    /// connection's start, or its first byte), then 408 and close.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    header_timeout: std::time::Duration,
    /// http: how long a kept-alive connection may sit idle between
    /// requests before it is closed.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: std::time::Duration,
    /// Serve Prometheus metrics over HTTP at this address (any path, e.g.
    /// http://ADDR/metrics), and readiness at http://ADDR/ready (200, or
    /// 503 while the server drains).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// On SIGTERM or SIGINT the server drains: it stops taking sessions,
    /// moves every session to its live peers, waits for them at most this
    /// long (then closes what is left), and exits 0. A second signal
    /// stops it at once.
    #[arg(long, value_name = "DURATION", default_value = "25s", value_parser = parse_deadline)]
    drain_deadline: Duration,
}

/// A drain deadline: at most 10 minutes (as `migratory drain` takes).
fn parse_deadline(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d > Duration::from_secs(600) {
        return Err(format!("{s:?}: at most 10m"));
    }
    Ok(d)
}

/// Buckets of the migration duration histogram, in seconds.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

/// Runs the server until SIGINT or SIGTERM.
pub async fn run(args: ServeArgs) -> Result<bool, String> {
    let config = PoolConfig::load(&args.config).map_err(|e| e.to_string())?;
    if args.service == Kind::Http && !args.root.is_dir() {
        return Err(format!("--root {}: not a directory", args.root.display()));
    }
    let builder = config.builder(&args.id).map_err(|e| e.to_string())?;
    let metrics = match args.metrics {
        Some(addr) => {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(migratory::server::MIGRATION_SECONDS.into()),
                    DURATION_BUCKETS,
                )
                .map_err(|e| format!("--metrics: {e}"))?
                .install_recorder()
                .map_err(|e| format!("--metrics: {e}"))?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("--metrics {addr}: {e}"))?;
            Some((listener, handle))
        }
        None => None,
    };
    let mut server = builder.bind().await.map_err(|e| e.to_string())?;
    if let Some((listener, handle)) = metrics {
        let addr = listener
            .local_addr()
            .map_err(|e| format!("--metrics: {e}"))?;
        tokio::spawn(crate::metrics_http::serve(
            listener,
            handle,
            server.handle().draining(),
        ));
        info!(%addr, "metrics at http://{addr}/metrics, readiness at http://{addr}/ready");
    }
    let files = crate::nofile::raise();
    info!(
        open_files = ?files,
        "open-file limit raised to the hard limit (one per session)"
    );
    info!(
        server = %args.id,
        service = ?args.service,
        addr = %server.service_addr(),
        control = %server.control_addr(),
        "serving"
    );
    let opts = Arc::new(Options {
        root: args.root.clone(),
        counter_interval: args.counter_interval,
        header_timeout: args.header_timeout,
        idle_timeout: args.idle_timeout,
        draining: server.handle().draining(),
    });
    let kind = args.service;
    let spawn = |session: migratory::Session, arrival: migratory::Arrival| {
        let opts = opts.clone();
        tokio::spawn(async move {
            let id = service::SessionLabel(session.id());
            if let Err(e) = service::serve(kind, session, arrival, opts).await {
                debug!(session = %id, error = %e, "session ended with an error");
            }
        });
    };
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            next = server.accept() => {
                let Some((session, arrival)) = next else { break };
                spawn(session, arrival);
            }
            signal = &mut stop => {
                match signal {
                    Ok(name) => info!(server = %args.id, signal = name, "draining, then stopping"),
                    Err(e) => {
                        warn!(error = %e, "cannot wait for signals: stopping");
                        return Ok(true);
                    }
                }
                break;
            }
        }
    }
    // Drain: the accept loop keeps running (a session arriving now is sent
    // on at once, and clients that migrate are served until they leave)
    // until the sessions are gone and the plain clients have finished their
    // request (the services let them go once draining), all within the
    // deadline; a second signal stops at once.
    let handle = server.handle();
    let drain = handle.drain(args.drain_deadline);
    tokio::pin!(drain);
    let again = shutdown_signal();
    tokio::pin!(again);
    loop {
        tokio::select! {
            report = &mut drain => {
                if report.closed > 0 {
                    warn!(
                        server = %args.id,
                        closed = report.closed,
                        "sessions that could not move were closed"
                    );
                }
                break;
            }
            next = server.accept() => {
                let Some((session, arrival)) = next else { break };
                spawn(session, arrival);
            }
            _ = &mut again => {
                warn!(server = %args.id, "second signal: stopping without finishing the drain");
                break;
            }
        }
    }
    info!(server = %args.id, "stopped");
    drop(server);
    Ok(true)
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM, with its name.
pub async fn shutdown_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => Ok("SIGTERM"),
        _ = int.recv() => Ok("SIGINT"),
    }
}
