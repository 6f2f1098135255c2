//! The `migratory` command: run a pool (`serve`), let unmodified clients
//! use it (`proxy`), operate it (`sessions`, `migrate`), and see it all at
//! once (`demo`).

mod bench;
mod certs;
mod config;
mod demo;
mod metrics_http;
mod netbench;
mod nofile;
mod operate;
mod proxy;
mod serve;
mod sock;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Live migration of TCP connections.
#[derive(Parser, Debug)]
#[command(name = "migratory", version, about, long_about = None)]
struct Cli {
    /// Log as JSON lines (on stderr) instead of human-readable text. The
    /// level comes from RUST_LOG (default: info for serve and proxy, warn
    /// otherwise).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a pool of servers as separate processes on loopback, download
    /// and upload generated data at the same time while the session
    /// migrates between them (client-initiated, server push and
    /// destination pull, by turns), and check both directions with SHA-256.
    Demo(demo::DemoArgs),
    /// One server of the demo pool (started by `demo`).
    #[command(hide = true)]
    DemoServer(demo::ServerArgs),
    /// Run one server of a pool (from its configuration file) with a
    /// built-in service: http, echo or counter. Stops on SIGINT/SIGTERM.
    Serve(serve::ServeArgs),
    /// Client sidecar: every TCP connection accepted on --listen becomes
    /// one migratory session to the pool, so unmodified programs (curl, nc)
    /// keep their connection while its server end moves.
    Proxy(proxy::ProxyArgs),
    /// List a running server's sessions (id, client, age, bytes, epoch).
    Sessions(operate::SessionsArgs),
    /// Ask a running server to push sessions to a peer, wait for the
    /// outcome and print it (exit status 1 unless every one moved).
    Migrate(operate::MigrateArgs),
    /// Drain a running server: it stops taking sessions and moves every
    /// session to its live peers, least loaded first (exit status 1 if
    /// some could not move and were closed). SIGTERM to `serve` does the
    /// same, then exits.
    Drain(operate::DrainArgs),
    /// Socket checkpoint/restore with TCP_REPAIR (MIGSOCK) and same-host
    /// socket handoff: checkpoint, restore, inspect, handoff.
    Sock {
        /// What to do.
        #[command(subcommand)]
        command: sock::SockCommand,
    },
    /// Benchmarks (results in BENCHMARKS.md).
    Bench {
        /// Which.
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Print a new random cluster key (64 hex digits) for a pool's
    /// `cluster_key_file`.
    Keygen,
    /// Make a pool CA and TLS certificates for every server of a pool file
    /// and for its operator, where the file's `[tls]` section says.
    Certs(certs::CertsArgs),
    /// Print the session-protocol version this build speaks.
    ProtocolVersion,
}

fn init_logs(json: bool, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colour only for a person at a terminal, not in a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = if json {
        fmt.json().try_init()
    } else {
        fmt.try_init()
    };
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line: clap's first paragraph, without its "error: ".
            let text = e.to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!(
                "migratory: {} (see --help)",
                first.join(" ").trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    let default_level = match cli.command {
        Command::Serve(_) | Command::Proxy(_) => "info",
        _ => "warn",
    };
    init_logs(cli.log_json, default_level);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("migratory: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Demo(args) => rt.block_on(demo::run(args)),
        Command::DemoServer(args) => rt.block_on(demo::serve(args)),
        Command::Serve(args) => rt.block_on(serve::run(args)),
        Command::Proxy(args) => rt.block_on(proxy::run(args)),
        Command::Sessions(args) => rt.block_on(operate::sessions(args)),
        Command::Migrate(args) => rt.block_on(operate::migrate(args)),
        Command::Drain(args) => rt.block_on(operate::drain(args)),
        Command::Sock { command } => sock::run(command),
        Command::Bench { command } => bench::run(command),
        Command::Keygen => {
            let key: [u8; 32] = rand::random();
            println!(
                "{}",
                key.iter().map(|b| format!("{b:02x}")).collect::<String>()
            );
            Ok(true)
        }
        Command::Certs(args) => certs::run(args),
        Command::ProtocolVersion => {
            println!("{}", migratory::proto::frame::VERSION);
            Ok(true)
        }
    };
    // Tasks still running (connections being closed) must not hold the
    // exit.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("migratory: {e}");
            ExitCode::FAILURE
        }
    }
}
