//! Socket checkpoint/restore with Linux `TCP_REPAIR`, and handoff of live
//! sockets between processes (docs/architecture.md section 5). While a connection
//! moves, [`lock`] keeps its packets from a socket that is frozen or not
//! yet restored (nftables); [`process`] checkpoints a running process's
//! sockets under that lock and never kills it before the image is safe.
//!
//! This is the only crate of the workspace allowed to use `unsafe`, each
//! block with a `// SAFETY:` comment.
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod handoff;
pub mod image;
pub mod lock;
mod nfnl;
pub mod process;
mod repair;
pub mod steps;
mod sys;

pub use image::{ImageFile, RepairWindow, SocketImage, SocketOptions, TcpState};
pub use lock::{Connection, NetLock};
pub use repair::{
    abandon, bytes_received, checkpoint, connection, disconnect_silently, is_tcp_listener, prepare,
    reserve_send_buffer, restore, resume, smoothed_rtt, state_name, tcp_state, unchanged, unread,
    writable, Prepared, RepairError,
};
