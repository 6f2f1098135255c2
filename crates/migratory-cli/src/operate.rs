//! Operator commands: `migratory sessions` lists a running server's
//! sessions, `migratory migrate` pushes sessions to a peer; both talk to
//! the server's control address, authenticated with the cluster key.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use migratory::proto::control::{PushOutcome, Selection};
use migratory::proto::types::SessionId;
use migratory::Operator;

use crate::config::PoolConfig;

/// Options of `migratory sessions`.
#[derive(Args, Debug)]
pub struct SessionsArgs {
    /// The pool configuration file (for the server's control address and
    /// the cluster key).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// The server to ask.
    #[arg(long, value_name = "ID")]
    id: String,
}

/// Options of `migratory migrate`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["session", "count", "all"])))]
pub struct MigrateArgs {
    /// The pool configuration file.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// The server that owns the sessions now.
    #[arg(long, value_name = "ID")]
    from: String,
    /// The server their clients should move to.
    #[arg(long, value_name = "ID")]
    to: String,
    /// Move this session (its id as `migratory sessions` prints it).
    #[arg(long, value_name = "SESSION", value_parser = parse_session)]
    session: Option<SessionId>,
    /// Move up to this many sessions, the oldest first.
    #[arg(long, value_name = "N")]
    count: Option<u32>,
    /// Move every session of the server.
    #[arg(long)]
    all: bool,
    /// How long to wait for the clients to move (at most 10m).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_timeout)]
    timeout: Duration,
}

/// Options of `migratory drain`.
#[derive(Args, Debug)]
pub struct DrainArgs {
    /// The pool configuration file.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// The server to drain.
    #[arg(long, value_name = "ID")]
    id: String,
    /// How long the drain may take; sessions that have not moved by then
    /// are closed (at most 10m).
    #[arg(long, value_name = "DURATION", default_value = "25s", value_parser = parse_timeout)]
    deadline: Duration,
}

/// Drains a running server: it stops taking sessions, moves every session
/// to its live peers, and answers once done (the process keeps running:
/// stop it afterwards, or send it SIGTERM, which drains too). Fails when
/// some session could not move.
pub async fn drain(args: DrainArgs) -> Result<bool, String> {
    let config = PoolConfig::load(&args.config).map_err(|e| e.to_string())?;
    let mut op = connect(&config, &args.id).await?;
    let (moved, closed, took) = op.drain(args.deadline).await.map_err(|e| e.to_string())?;
    println!(
        "{}: drained in {} ms: {moved} session(s) moved, {closed} closed",
        args.id,
        took.as_millis()
    );
    Ok(closed == 0)
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() || d > Duration::from_secs(600) {
        return Err(format!("{s:?}: must be above zero and at most 10m"));
    }
    Ok(d)
}

fn parse_session(s: &str) -> Result<SessionId, String> {
    if s.is_empty() || s.len() > 32 {
        return Err(format!("{s:?} is not a session id (up to 32 hex digits)"));
    }
    u128::from_str_radix(s, 16)
        .map(SessionId)
        .map_err(|_| format!("{s:?} is not a session id (up to 32 hex digits)"))
}

async fn connect(config: &PoolConfig, id: &str) -> Result<Operator, String> {
    let server = config.server(id).map_err(|e| e.to_string())?;
    let tls = config.operator_tls().map_err(|e| e.to_string())?;
    Operator::connect(server.control, &tls, config.key(), &server.id)
        .await
        .map_err(|e| format!("server {id}: {e}"))
}

/// Prints one line per session: id, client, age, bytes each way, epoch.
pub async fn sessions(args: SessionsArgs) -> Result<bool, String> {
    let config = PoolConfig::load(&args.config).map_err(|e| e.to_string())?;
    let mut op = connect(&config, &args.id).await?;
    let rows = op.sessions().await.map_err(|e| e.to_string())?;
    println!(
        "{:<32}  {:<21}  {:>9}  {:>14}  {:>14}  {:>5}",
        "SESSION", "CLIENT", "AGE", "UP BYTES", "DOWN BYTES", "EPOCH"
    );
    for r in &rows {
        let client = r
            .client
            .map_or_else(|| "(away)".to_string(), |a| a.to_string());
        println!(
            "{:<32}  {:<21}  {:>8.1}s  {:>14}  {:>14}  {:>5}",
            r.session.to_string(),
            client,
            r.age_ms as f64 / 1000.0,
            r.up,
            r.down,
            r.epoch
        );
    }
    eprintln!("{}: {} session(s)", args.id, rows.len());
    Ok(true)
}

/// Pushes sessions and prints what became of each; fails unless every
/// selected session moved.
pub async fn migrate(args: MigrateArgs) -> Result<bool, String> {
    let config = PoolConfig::load(&args.config).map_err(|e| e.to_string())?;
    config.server(&args.to).map_err(|e| format!("--to: {e}"))?;
    if args.from == args.to {
        return Err(format!("--from and --to are both {:?}", args.from));
    }
    let select = match (args.session, args.count, args.all) {
        (Some(s), _, _) => Selection::Session(s),
        (_, Some(n), _) => Selection::Count(n),
        _ => Selection::All,
    };
    let mut op = connect(&config, &args.from).await?;
    let results = op
        .push(&args.to, select, args.timeout)
        .await
        .map_err(|e| e.to_string())?;
    let mut ok = true;
    for (sid, outcome) in &results {
        let line = match outcome {
            PushOutcome::Moved { to, millis } => format!("moved to {to} in {millis} ms"),
            other => {
                ok = false;
                match other {
                    PushOutcome::NotFound => format!("not found on {}", args.from),
                    PushOutcome::NotConnected => {
                        "not moved: its client is not connected right now".into()
                    }
                    PushOutcome::TimedOut => format!(
                        "not moved: the client did not move within {}",
                        humantime::format_duration(args.timeout)
                    ),
                    _ => "ended before it moved".into(),
                }
            }
        };
        println!("{sid}  {line}");
    }
    let moved = results
        .iter()
        .filter(|(_, o)| matches!(o, PushOutcome::Moved { .. }))
        .count();
    eprintln!(
        "{} -> {}: {moved} of {} session(s) moved",
        args.from,
        args.to,
        results.len()
    );
    Ok(ok)
}
