//! Fuzz target `admission`: arbitrary bytes from client connections that
//! have proved nothing yet, fed to a whole `Server` in chunks. Bad input
//! must never panic, never get a connection attached without a Hello or a
//! proved Migrate, and never make the server send much before admission.
//!
//! Input layout (see `fuzz/README.md`): two selector bytes, then the stream
//! of the first connection; with the second phase on, a little-endian u16
//! gives the length of that stream, and after it come the fields of a
//! Migrate the target builds for the second connection, its MAC and the
//! bytes that connection sends after its Proof.
#![no_main]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use migratory_proto::config::ServerTimeouts;
use migratory_proto::error::DecodeError;
use migratory_proto::frame::{
    check_preamble, Frame, MigrateRequest, DEFAULT_MAX_FRAME, MAX_ADMISSION_FRAME, PREAMBLE,
};
use migratory_proto::mac::migrate_mac;
use migratory_proto::server::{Arrival, Dest, Server, ServerConfig, ServerEvent};
use migratory_proto::types::{
    Alternate, IncarnationId, MigrationCause, Secret, ServerId, SessionId,
};
use rand::rngs::SmallRng;
use rand::SeedableRng;

/// Most bytes a connection may receive before it is admitted: a Challenge
/// (37 bytes) and a Reject with a short text are all it should ever get.
const PRE_ADMISSION_OUTPUT: usize = 1024;

/// Frame type codes (crates/migratory-proto/src/frame.rs).
const MIGRATE: u8 = 0x03;
const LAST_TYPE: u8 = 0x0d;

fn sid(name: &str) -> ServerId {
    ServerId::new(name).expect("valid id")
}

/// What the target saw of one client connection.
#[derive(Default)]
struct Conn {
    /// Bytes fed to the server.
    fed: Vec<u8>,
    /// Output not decoded yet (a frame may come in pieces).
    out: BytesMut,
    /// Bytes sent to it before it was attached.
    pre_out: usize,
    attached: Option<SessionId>,
    ever_attached: bool,
    closed: bool,
    plain: bool,
    /// The target gave it a correct proof: it may be resumed.
    may_resume: bool,
    welcome: Option<(SessionId, Secret)>,
    challenge: Option<[u8; 32]>,
}

struct Harness {
    server: Server,
    now: Instant,
    conns: BTreeMap<IncarnationId, Conn>,
    max_sessions: usize,
}

impl Harness {
    fn conn(&mut self, inc: IncarnationId) -> &mut Conn {
        self.conns.get_mut(&inc).expect("known connection")
    }

    fn on_event(&mut self, ev: ServerEvent) {
        match ev {
            ServerEvent::Attached { inc, session } => {
                let c = self.conn(inc);
                assert!(!c.closed, "{inc} attached after it was closed");
                assert!(!c.plain, "{inc} attached after it was handed over as plain");
                c.attached = Some(session);
                c.ever_attached = true;
            }
            ServerEvent::Accepted {
                arrival: Arrival::Migrated { .. },
                ..
            } => {
                assert!(
                    self.conns.values().any(|c| c.may_resume),
                    "a session arrived migrated without any valid proof"
                );
            }
            ServerEvent::CloseIncarnation { inc, .. } => {
                if let Some(c) = self.conns.get_mut(&inc) {
                    c.closed = true;
                }
            }
            ServerEvent::PlainClient { inc, initial } => {
                let c = self.conn(inc);
                assert_eq!(
                    check_preamble(&initial),
                    Err(DecodeError::NotMigratory),
                    "a client with the preamble handed over as plain"
                );
                assert_eq!(&initial[..], &c.fed[..], "plain client lost bytes");
                assert!(!c.ever_attached && !c.closed);
                c.plain = true;
            }
            _ => {}
        }
    }

    fn on_output(&mut self, inc: IncarnationId, segs: &[Bytes]) {
        let n: usize = segs.iter().map(|b| b.len()).sum();
        let c = self.conn(inc);
        assert!(!c.plain, "output for a connection handed over as plain");
        if c.attached.is_none() {
            c.pre_out += n;
            assert!(
                c.pre_out <= PRE_ADMISSION_OUTPUT,
                "{} bytes sent to {inc} before admission",
                c.pre_out
            );
        }
        for s in segs {
            c.out.extend_from_slice(s);
        }
        loop {
            match Frame::decode(&mut c.out, DEFAULT_MAX_FRAME) {
                Ok(Some(f)) => match f {
                    Frame::Resumed { .. } => {
                        assert!(c.may_resume, "Resumed sent to {inc} without a valid proof")
                    }
                    Frame::Welcome {
                        session, secret, ..
                    } => c.welcome = Some((session, secret)),
                    Frame::Challenge { nonce } => c.challenge = Some(nonce),
                    _ => {}
                },
                Ok(None) => break,
                Err(e) => panic!("the server sent {inc} an undecodable frame: {e}"),
            }
        }
    }

    /// Drains events and transmits until there are none. Events first, so
    /// a connection attached by the last call is known as attached.
    fn drain(&mut self) {
        for _ in 0..100_000 {
            let mut progress = false;
            while let Some(ev) = self.server.poll_event() {
                progress = true;
                self.on_event(ev);
            }
            let mut segs = Vec::new();
            match self.server.poll_transmit(self.now, &mut segs) {
                Some(Dest::Incarnation(inc)) => {
                    progress = true;
                    self.on_output(inc, &segs);
                }
                Some(Dest::Peer(_)) => progress = true,
                None => {}
            }
            if !progress {
                assert!(self.server.session_count() <= self.max_sessions);
                return;
            }
        }
        panic!("the server never stops producing output");
    }

    fn tick(&mut self, step: Duration) {
        self.now += step;
        if self.server.poll_timeout().is_some_and(|t| t <= self.now) {
            self.server.handle_timeout(self.now);
            self.drain();
        }
    }

    /// Feeds `bytes` to `inc` in chunks, as long as the connection is open.
    fn feed(&mut self, inc: IncarnationId, bytes: &[u8], chunking: u8, step: Duration) {
        let mut rest = bytes;
        let mut k = 0usize;
        while !rest.is_empty() {
            let c = self.conn(inc);
            if c.closed || c.plain {
                return;
            }
            let n = chunk_len(chunking, k).min(rest.len());
            k += 1;
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            c.fed.extend_from_slice(chunk);
            self.server.handle_input(self.now, inc, chunk);
            self.drain();
            if !step.is_zero() {
                self.tick(step);
            }
        }
    }

    fn open(&mut self, binding: Option<[u8; 32]>) -> IncarnationId {
        let inc = self.server.new_incarnation(self.now, binding);
        self.conns.insert(inc, Conn::default());
        self.drain();
        inc
    }

    fn close(&mut self, inc: IncarnationId) {
        self.server.handle_incarnation_closed(self.now, inc);
        self.conn(inc).attached = None;
        self.drain();
    }
}

/// How many bytes the `k`-th chunk has.
fn chunk_len(chunking: u8, k: usize) -> usize {
    match chunking {
        0 => usize::MAX,
        1 => 1,
        2 => 2,
        3 => 3,
        4 => 7,
        5 => 64,
        6 => MAX_ADMISSION_FRAME + 1,
        _ => [1, 5, 13, 4, 300, 2, 4100][k % 7],
    }
}

/// The frame header at the start of `b`, if it is complete and of a known
/// type: (type, body length).
fn header(b: &[u8]) -> Option<(u8, usize)> {
    if b.len() < 5 || !(1..=LAST_TYPE).contains(&b[0]) {
        return None;
    }
    Some((b[0], u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize))
}

/// Whether `stream`, as a whole connection, sends a frame over the
/// admission limit before it can have been admitted: its first frame, or
/// the one after a first Migrate (the Proof's place). Such a connection is
/// closed and never attached.
fn oversized_before_admission(stream: &[u8]) -> bool {
    let Some(rest) = stream.strip_prefix(&PREAMBLE[..]) else {
        return false;
    };
    let Some((ty, len)) = header(rest) else {
        return false;
    };
    if len > MAX_ADMISSION_FRAME {
        return true;
    }
    if ty == MIGRATE && rest.len() >= 5 + len {
        return header(&rest[5 + len..]).is_some_and(|(_, l)| l > MAX_ADMISSION_FRAME);
    }
    false
}

/// Whether the first frame of `stream` is a complete Migrate: the fuzzer
/// cannot prove it, so the connection is never attached.
fn starts_with_migrate(stream: &[u8]) -> bool {
    stream
        .strip_prefix(&PREAMBLE[..])
        .and_then(header)
        .is_some_and(|(ty, _)| ty == MIGRATE)
}

/// Reads `n` bytes from the front of `data`, zero-padded.
fn take<const N: usize>(data: &mut &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = N.min(data.len());
    out[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    out
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let [sel0, sel1] = take::<2>(&mut data);
    let bound = sel0 & 1 == 1;
    let chunking = (sel0 >> 1) & 7;
    let second = sel0 & 0x10 != 0;
    let valid_proof = sel0 & 0x20 != 0;
    let step = if sel1 & 1 == 1 {
        Duration::from_millis(250)
    } else {
        Duration::ZERO
    };
    let close_first = sel1 & 2 != 0;
    let origin = match (sel1 >> 2) & 3 {
        1 => sid("s2"),
        2 => sid("zz"),
        _ => sid("s1"),
    };
    let max_sessions = if sel1 & 0x10 != 0 { 1 } else { 3 };

    let stream1 = if second {
        let len = usize::from(u16::from_le_bytes(take::<2>(&mut data))).min(data.len());
        let (s, rest) = data.split_at(len);
        data = rest;
        s
    } else {
        std::mem::take(&mut data)
    };

    let start = Instant::now();
    let mut cfg = ServerConfig::new(sid("s1"));
    cfg.alternates = vec![Alternate {
        id: sid("s2"),
        addrs: vec!["127.0.0.1:4000".parse().unwrap()],
    }];
    cfg.max_sessions = max_sessions;
    cfg.timeouts = ServerTimeouts::default();
    let rng = Box::new(SmallRng::seed_from_u64(0x6d69_6772));
    let mut h = Harness {
        server: Server::new(cfg, rng, start),
        now: start,
        conns: BTreeMap::new(),
        max_sessions,
    };

    // Phase 1: one connection sends the fuzzer's stream.
    let inc1 = h.open(bound.then_some([0xb1; 32]));
    h.feed(inc1, stream1, chunking, step);
    {
        let c = h.conn(inc1);
        if oversized_before_admission(&c.fed) {
            assert!(c.closed, "oversized frame before admission, not closed");
            assert!(
                !c.ever_attached,
                "oversized frame before admission, attached"
            );
        }
        if starts_with_migrate(&c.fed) {
            assert!(!c.ever_attached, "unproved Migrate attached");
        }
    }

    // Phase 2: a second connection asks to resume the session the first
    // one got (if any), with the fuzzer's MAC or, on request, a valid one.
    if second {
        if close_first {
            h.close(inc1);
        }
        // Without a session from the first connection, the fuzzer names one.
        let (session, secret) = match h.conn(inc1).welcome.clone() {
            Some(w) => w,
            None => (
                SessionId(u128::from_le_bytes(take::<16>(&mut data))),
                Secret([0; 32]),
            ),
        };
        let [epoch, attempt, cause, d0, d1, flags, w0, w1] = take::<8>(&mut data);
        let request = MigrateRequest {
            session,
            origin,
            epoch: u64::from(epoch & 3),
            attempt: u64::from(attempt),
            cause: match cause & 3 {
                0 => MigrationCause::Requested,
                1 => MigrationCause::Trigger,
                2 => MigrationCause::ServerFailed,
                _ => MigrationCause::Retry,
            },
            down: u64::from(u16::from_le_bytes([d0, d1])),
            down_fin: flags & 1 != 0,
            draining: flags & 2 != 0,
            window: u64::from(u16::from_le_bytes([w0, w1])),
        };
        let fuzz_mac = take::<32>(&mut data);
        let binding = bound.then_some([0xb2; 32]);
        let inc2 = h.open(binding);
        let mut first = BytesMut::from(&PREAMBLE[..]);
        Frame::Migrate(request.clone()).encode(&mut first);
        h.feed(inc2, &first, chunking, step);
        let nonce = binding.or(h.conn(inc2).challenge);
        let valid = nonce.map(|n| migrate_mac(&secret, &request, &n));
        let mac = match valid {
            Some(v) if valid_proof => v,
            _ => fuzz_mac,
        };
        // The fuzzer cannot know the secret; should it ever hit the right
        // MAC anyway, the session may resume.
        h.conn(inc2).may_resume = valid == Some(mac);
        let mut then = BytesMut::new();
        Frame::Proof { mac }.encode(&mut then);
        then.extend_from_slice(data);
        h.feed(inc2, &then, chunking, step);
        let c = h.conn(inc2);
        if !c.may_resume {
            assert!(!c.ever_attached, "Migrate without a valid proof attached");
        }
    }

    // Let every timer run out, then close whatever is still open.
    let end = start + Duration::from_secs(3600);
    for _ in 0..1000 {
        match h.server.poll_timeout() {
            Some(t) if t <= end => {
                h.now = h.now.max(t);
                h.server.handle_timeout(h.now);
                h.drain();
            }
            _ => break,
        }
    }
    let open: Vec<_> = h
        .conns
        .iter()
        .filter(|(_, c)| !c.plain)
        .map(|(i, _)| *i)
        .collect();
    for inc in open {
        h.close(inc);
    }
});
