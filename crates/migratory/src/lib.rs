//! **migratory**: live migration of TCP sessions between the servers of a
//! pool (the MTCP design; see `docs/architecture.md`).
//!
//! A [`ServerBuilder`] binds one server of a pool; [`Server::accept`] yields
//! each session with how it arrived — new, migrated with the application's
//! last snapshot, or a plain TCP client. A [`Session`] is `AsyncRead +
//! AsyncWrite`; [`Session::snapshot`] records the restart point (MTCP's
//! `set_state`). The protocol core is [`proto`].
//!
//! ```
//! use migratory::proto::frame::{check_preamble, PreambleCheck, PREAMBLE};
//! assert_eq!(check_preamble(&PREAMBLE), Ok(PreambleCheck::Migratory));
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
mod conn;
mod error;
pub mod operator;
pub mod policy;
pub mod server;
mod throttle;
pub mod tls;

pub use client::{ClientControl, MigrationTimes, MigratoryStream, Status};
pub use error::{is_migrated, Error};
pub use migratory_proto as proto;
pub use operator::Operator;
pub use policy::{
    Action, ClientView, Liveness, LivenessConfig, Manual, Policy, PolicyEvent, Throughput,
    ThroughputConfig,
};
pub use server::{
    Arrival, MigrationPhases, Peer, Server, ServerBuilder, ServerHandle, Session, SessionControl,
    OPERATOR_ID,
};
pub use tls::{ClientTls, OperatorTls, PoolCerts, ServerTls};
