//! Sans-IO core of **migratory**, the live-migration protocol for TCP
//! sessions (the MTCP design; see `docs/architecture.md`).
//!
//! This crate does no IO and reads no clock: bytes and `Instant`s go in,
//! frames and events come out. It holds every protocol rule — the frame
//! and control-message codecs, the client and server session state
//! machines, the synchronisation arithmetic of MTCP chapter 4 — so each can
//! be tested deterministically with simulated time, loss and crashes.
//!
//! ```
//! use bytes::BytesMut;
//! use migratory_proto::frame::{Frame, DEFAULT_MAX_FRAME};
//!
//! let mut wire = BytesMut::new();
//! Frame::Ack { pos: 42, limit: 1 << 20, fin: false }.encode(&mut wire);
//! // A partial frame asks for more input and consumes nothing.
//! let mut part = BytesMut::from(&wire[..3]);
//! assert_eq!(Frame::decode(&mut part, DEFAULT_MAX_FRAME), Ok(None));
//! let frame = Frame::decode(&mut wire, DEFAULT_MAX_FRAME).unwrap().unwrap();
//! assert_eq!(frame, Frame::Ack { pos: 42, limit: 1 << 20, fin: false });
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod config;
pub mod control;
pub mod error;
pub mod frame;
pub mod mac;
pub mod peer;
pub mod server;
pub mod stream;
pub mod sync;
pub mod types;
mod wire;

pub use wire::{bytes_missing, HEADER_LEN, MAX_ADDRS, MAX_ALTERNATES, MAX_TEXT_LEN};
