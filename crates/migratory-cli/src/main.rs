//! The `migratory` command: `demo` runs a pool of three server processes
//! and moves a live transfer between them; more subcommands (serve, proxy,
//! sock, bench) arrive with their issues.

mod demo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Live migration of TCP connections.
#[derive(Parser, Debug)]
#[command(name = "migratory", version, about, long_about = None)]
struct Cli {
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
    /// Print the session-protocol version this build speaks.
    ProtocolVersion,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
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
        Command::ProtocolVersion => {
            println!("{}", migratory::proto::frame::VERSION);
            Ok(true)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("migratory: {e}");
            ExitCode::FAILURE
        }
    }
}
