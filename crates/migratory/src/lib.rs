//! **migratory**: live migration of TCP sessions between servers.
//!
//! This crate will hold the tokio runtime (servers, clients, the control
//! plane between servers). Today it re-exports the protocol core,
//! [`proto`], on which that runtime is built:
//!
//! ```
//! use migratory::proto::frame::{check_preamble, PreambleCheck, PREAMBLE};
//! assert_eq!(check_preamble(&PREAMBLE), Ok(PreambleCheck::Migratory));
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub use migratory_proto as proto;
