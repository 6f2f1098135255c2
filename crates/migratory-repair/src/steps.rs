//! Where a move's time goes: with `MIGRATORY_SOCK_TRACE=FILE` in the
//! environment, each step of a checkpoint or restore appends a line
//! `MICROSECONDS_SINCE_EPOCH PID STEP` to FILE (wall clock, so that the lines
//! of the checkpointing and the restoring process, and of several hosts
//! sharing a clock, can be put side by side). Without it a step costs one
//! environment look-up. BENCHMARKS.md's breakdown of the stall comes from
//! these lines.

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// The environment variable that names the trace file.
pub const TRACE_VAR: &str = "MIGRATORY_SOCK_TRACE";

/// Records that step `what` is done (see the [module docs](self)). Errors
/// writing the trace are ignored: it never changes what a move does.
pub fn step(what: &str) {
    static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
    let Some(path) = FILE.get_or_init(|| std::env::var_os(TRACE_VAR).map(PathBuf::from)) else {
        return;
    };
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    let line = format!("{t} {} {what}\n", std::process::id());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
    {
        // One write: lines of several processes never interleave.
        let _ = f.write_all(line.as_bytes());
    }
}
