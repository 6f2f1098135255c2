//! Socket checkpoint/restore with Linux `TCP_REPAIR`, and handoff of live
//! sockets between processes (DESIGN.md section 5).
//!
//! This is the only crate of the workspace allowed to use `unsafe`, each
//! block with a `// SAFETY:` comment. It is empty until the socket
//! checkpoint/restore issue fills it; nothing here claims to work yet.
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
