//! The `migratory` command. Its subcommands (demo, serve, proxy, sock,
//! bench) arrive with the runtime issues; today it reports its version and
//! the protocol version it speaks.

use clap::Parser;

/// Live migration of TCP connections.
#[derive(Parser, Debug)]
#[command(name = "migratory", version, about, long_about = None)]
struct Cli {
    /// Print the session-protocol version this build speaks.
    #[arg(long)]
    protocol_version: bool,
}

fn main() {
    let cli = Cli::parse();
    if cli.protocol_version {
        println!("{}", migratory::proto::frame::VERSION);
    } else {
        println!(
            "migratory {}: no subcommands yet; see --help",
            env!("CARGO_PKG_VERSION")
        );
    }
}
