#![allow(clippy::disallowed_methods)] // a test picks its starting instant
//! Regressions found by review, each reproduced by hand over the simulated
//! network and now asserting the correct behaviour.

mod sim;

use std::time::Duration;

use bytes::BytesMut;
use migratory_proto::client::ClientEvent;
use migratory_proto::frame::{Frame, MigrateRequest, DEFAULT_MAX_FRAME, PREAMBLE};
use migratory_proto::server::{Server, ServerConfig, ServerEvent};
use migratory_proto::types::{MigrationCause, ServerId};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use sim::{id, AppKind, World, WorldConfig};

fn world_n(eager: bool, n: usize) -> World {
    let mut cfg = WorldConfig::new(1, AppKind::Transform);
    cfg.eager = eager;
    cfg.servers = n;
    let mut w = World::new(cfg);
    w.pump();
    assert!(w.client.is_established());
    w
}

fn newest_conn(w: &World) -> migratory_proto::types::IncarnationId {
    *w.conns.keys().max().unwrap()
}

/// resume_local advertises Resumed.window = recv_window from rx_pos, but the
/// server's own limit is up.start() + recv_window: a client with buffered
/// data overruns it and the server kills the incarnation.
#[test]
fn resume_local_window_overrun() {
    let mut w = world_n(false, 3);
    assert_eq!(w.client.write(&[b'a'; 8192]).unwrap(), 8192);
    w.pump();
    assert_eq!(w.client.write(&[b'b'; 8192]).unwrap(), 8192);
    w.pump();
    w.client_events.clear();
    w.client.migrate(w.now, Some(id(0))).unwrap();
    w.pump();
    assert!(
        !w.client_events.iter().any(|e| matches!(
            e,
            ClientEvent::MigrationStarted {
                cause: migratory_proto::client::MigrationCause::ServerFailed,
                ..
            }
        )),
        "the resumed window must cover the client's buffer: no spurious failover"
    );
    // The application reads and snapshots (which reopens the window).
    let mut got = Vec::new();
    for _ in 0..10 {
        got.extend(w.server_read_all(0).0);
        let h = w.handle(0);
        w.server(0).snapshot(h, b"").unwrap();
        w.pump();
    }
    let mut want = vec![b'a'; 8192];
    want.extend([b'b'; 8192]);
    assert!(
        got == want,
        "upload intact ({} of {} bytes)",
        got.len(),
        want.len()
    );
}

/// Same with a single server: the client loops resume -> overrun -> failover.
#[test]
fn resume_local_window_overrun_single_server_livelock() {
    let mut w = world_n(false, 1);
    w.client.write(&[b'a'; 8192]).unwrap();
    w.pump();
    w.client.write(&[b'b'; 8192]).unwrap();
    w.pump();
    w.client_events.clear();
    w.client.migrate(w.now, Some(id(0))).unwrap();
    w.pump();
    let n = w
        .client_events
        .iter()
        .filter(|e| matches!(e, ClientEvent::Migrated { .. }))
        .count();
    assert_eq!(n, 1, "one resume, no livelock");
    assert!(w.client.is_established());
}

/// After resume_local from the commit point (rx_pos < rcv_nxt), a late
/// ReplicateAck makes the server ack beyond what the client re-sent.
#[test]
fn ack_beyond_sent_after_resume_local() {
    let mut w = world_n(true, 3);
    w.client.write(&[1; 100]).unwrap();
    w.pump();
    w.client.write(&[2; 100]).unwrap();
    w.flush();
    let key = newest_conn(&w);
    w.deliver_conn(key, true, usize::MAX);
    w.flush();
    w.deliver_link(0, 1); // Replicate Up to the backup
    w.flush(); // ReplicateAck now waits on link (1,0)
    w.client_events.clear();
    w.client.migrate(w.now, Some(id(0))).unwrap();
    w.flush();
    let k2 = newest_conn(&w);
    w.deliver_conn(k2, true, usize::MAX); // Migrate -> Challenge
    w.flush();
    w.deliver_conn(k2, false, usize::MAX); // Challenge -> Proof
    w.flush();
    w.deliver_conn(k2, true, usize::MAX); // Proof -> Resumed{up: 100}
    w.flush();
    w.deliver_link(1, 0); // ReplicateAck{up:200} -> Ack{pos:200}
    w.flush();
    w.deliver_conn(k2, false, usize::MAX); // client: Resumed, then Ack 200
    w.flush();
    w.pump();
    assert!(
        !w.client_events.iter().any(|e| matches!(
            e,
            ClientEvent::MigrationStarted {
                cause: migratory_proto::client::MigrationCause::ServerFailed,
                ..
            }
        )),
        "no Ack beyond what the client re-sent"
    );
    let mut want = vec![1u8; 100];
    want.extend([2u8; 100]);
    assert!(w.server_read_all(0).0 == want, "upload intact");
}

/// Once both directions are closed and acked but the application has not
/// read everything, poll_timeout returns an instant in the past forever.
#[test]
fn client_timer_spins_when_wire_done_but_unread() {
    let mut w = world_n(false, 3);
    let h = w.handle(0);
    w.server(0).write(h, b"bye").unwrap();
    w.server(0).close_write(h).unwrap();
    w.client.close_write().unwrap();
    w.pump();
    let _ = w.server_read_all(0);
    w.pump();
    assert!(!w.client.is_finished());
    for _ in 0..5 {
        w.now += Duration::from_secs(2);
        let now = w.now;
        if w.client.poll_timeout().is_some_and(|t| t <= now) {
            w.client.handle_timeout(now);
        }
    }
    let now = w.now;
    for _ in 0..3 {
        w.client.handle_timeout(now);
    }
    let t = w.client.poll_timeout();
    assert!(
        t.is_none_or(|t| t > now),
        "no deadline in the past: no busy loop"
    );
    assert_eq!(w.client_read_all(), (b"bye".to_vec(), true));
}

/// A stale, never-confirmed install at the backup makes it ignore the
/// owner's Full replica (and every resync), so the owner never acks up data.
#[test]
fn stale_install_at_backup_blocks_output_commit() {
    let mut w = world_n(true, 3);
    w.client.write(&[1; 100]).unwrap();
    w.pump();
    w.client_events.clear();
    w.client.migrate(w.now, Some(id(1))).unwrap();
    w.flush();
    let k2 = newest_conn(&w);
    w.deliver_conn(k2, true, usize::MAX);
    w.flush();
    w.deliver_conn(k2, false, usize::MAX);
    w.flush();
    w.deliver_conn(k2, true, usize::MAX); // s2 -> StateRequest to s1
    w.flush();
    w.deliver_link(1, 0); // s1 freezes, replies
    w.flush();
    while w.links.get(&(0, 1)).is_some_and(|q| !q.is_empty()) {
        w.deliver_link(0, 1); // s2 installs, Resumed queued
        w.flush();
    }
    w.reset_conn(k2); // the Resumed never reaches the client
    w.pump(); // client retries the owner s1: resume from the frozen state
    assert_eq!(w.owner(), Some(0));
    w.client.write(&[2; 100]).unwrap();
    w.client.close_write().unwrap();
    w.pump();
    for _ in 0..200 {
        w.advance(Duration::from_millis(500));
        w.pump();
    }
    assert!(
        w.client.debug_positions().contains("acked true"),
        "the client's Close is acknowledged"
    );
    assert!(
        w.servers[1]
            .as_ref()
            .unwrap()
            .core
            .has_replica(w.client.session().unwrap()),
        "the backup replaced its stale copy with the owner's replica"
    );
}

fn drain(s: &mut Server, now: std::time::Instant) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut frames = Vec::new();
    while let Some(_d) = s.poll_transmit(now, &mut out) {
        let mut b = BytesMut::new();
        for x in out.drain(..) {
            b.extend_from_slice(&x);
        }
        while let Ok(Some(f)) = Frame::decode(&mut b, DEFAULT_MAX_FRAME) {
            frames.push(f);
        }
    }
    frames
}

/// A new client's connection: preamble and Hello; returns its incarnation
/// and the server's answer.
fn hello(
    s: &mut Server,
    now: std::time::Instant,
) -> (migratory_proto::types::IncarnationId, Vec<Frame>) {
    let inc = s.new_incarnation(now, None);
    let mut b = BytesMut::from(&PREAMBLE[..]);
    Frame::Hello { window: 1 << 20 }.encode(&mut b);
    s.handle_input(now, inc, &b);
    (inc, drain(s, now))
}

/// Any client can get a session with Hello and then send a Migrate with
/// window = u64::MAX: `request.down + request.window` overflows.
#[test]
fn migrate_window_overflow() {
    let now = std::time::Instant::now();
    let me = ServerId::new("s1").unwrap();
    let mut s = Server::new(
        ServerConfig::new(me.clone()),
        Box::new(SmallRng::seed_from_u64(1)),
        now,
    );
    let (_, fr) = hello(&mut s, now);
    let Frame::Welcome {
        session, secret, ..
    } = fr[0].clone()
    else {
        panic!()
    };
    let mut h = None;
    while let Some(e) = s.poll_event() {
        if let ServerEvent::Accepted { handle, .. } = e {
            h = Some(handle);
        }
    }
    s.write(h.unwrap(), b"x").unwrap();
    drain(&mut s, now);
    let inc2 = s.new_incarnation(now, None);
    let req = MigrateRequest {
        session,
        origin: me,
        epoch: 0,
        attempt: 1,
        cause: MigrationCause::Requested,
        down: 1,
        down_fin: false,
        draining: false,
        window: u64::MAX,
    };
    let mut b = BytesMut::from(&PREAMBLE[..]);
    Frame::Migrate(req.clone()).encode(&mut b);
    s.handle_input(now, inc2, &b);
    let fr = drain(&mut s, now);
    let Frame::Challenge { nonce } = fr[0] else {
        panic!("{fr:?}")
    };
    let mac = migratory_proto::mac::migrate_mac(&secret, &req, &nonce);
    let mut b = BytesMut::new();
    Frame::Proof { mac }.encode(&mut b);
    s.handle_input(now, inc2, &b); // overflowed (a debug panic) before the fix
    assert_eq!(s.write(h.unwrap(), b"yyyy").unwrap(), 4);
    let fr = drain(&mut s, now);
    assert!(
        fr.iter().any(|f| matches!(f, Frame::Resumed { .. })),
        "{fr:?}"
    );
    assert!(
        fr.iter()
            .any(|f| matches!(f, Frame::Data(d) if &d[..] == b"yyyy")),
        "{fr:?}"
    );
}

/// The owner dies after handing the session to s3 but before StateAck:
/// the backup's replica (owner s1) is never forgotten. Replicas have no
/// lifetime at all.
#[test]
fn replica_leaks_forever_when_owner_dies_after_handoff() {
    let mut w = world_n(true, 3);
    w.client.write(&[1; 100]).unwrap();
    w.pump();
    let sid = w.client.session().unwrap();
    assert!(w.servers[1].as_ref().unwrap().core.has_replica(sid));
    w.client.migrate(w.now, Some(id(2))).unwrap();
    w.flush();
    let k = newest_conn(&w);
    w.deliver_conn(k, true, usize::MAX);
    w.flush();
    w.deliver_conn(k, false, usize::MAX);
    w.flush();
    w.deliver_conn(k, true, usize::MAX); // StateRequest s3 -> s1
    w.flush();
    w.deliver_link(2, 0);
    w.flush();
    w.deliver_link(0, 2); // StateReply -> s3 installs
    w.flush();
    w.deliver_conn(k, false, usize::MAX); // Resumed -> client confirms
    w.flush();
    w.deliver_conn(k, true, usize::MAX); // s3 queues StateAck to s1
    w.flush();
    w.crash(0);
    w.pump();
    for _ in 0..2000 {
        w.advance(Duration::from_secs(2));
        w.pump();
    }
    w.restart(0);
    w.pump();
    assert!(
        !w.servers[1].as_ref().unwrap().core.has_replica(sid),
        "the dead owner's replica expired"
    );
    assert_eq!(w.owner(), Some(2));
}

/// A session whose incarnation the *server* closes (protocol error) never
/// gets an orphan timer: close_inc() moves the incarnation to Closing, so
/// handle_incarnation_closed() no longer sets orphan_since. Unauthenticated
/// clients can fill max_sessions this way; the server then refuses everyone.
#[test]
fn server_closed_incarnation_leaks_session_forever() {
    let mut now = std::time::Instant::now();
    let me = ServerId::new("s1").unwrap();
    let mut cfg = ServerConfig::new(me.clone());
    cfg.max_sessions = 10;
    let mut s = Server::new(cfg, Box::new(SmallRng::seed_from_u64(1)), now);
    for _ in 0..10 {
        let inc = s.new_incarnation(now, None);
        let mut b = BytesMut::from(&PREAMBLE[..]);
        Frame::Hello { window: 1 << 20 }.encode(&mut b);
        Frame::Close { pos: 5 }.encode(&mut b); // bad position -> server closes
        s.handle_input(now, inc, &b);
        drain(&mut s, now);
        while s.poll_event().is_some() {}
        s.handle_incarnation_closed(now, inc);
    }
    now += Duration::from_secs(24 * 3600);
    if s.poll_timeout().is_some_and(|t| t <= now) {
        s.handle_timeout(now);
    }
    assert_eq!(s.owned_sessions().count(), 0, "abandoned sessions expire");
    let (_, fr) = hello(&mut s, now);
    assert!(
        matches!(fr[0], Frame::Welcome { .. }),
        "a new client is served: {fr:?}"
    );
}

/// The server closed its write side after its last snapshot; the client
/// has the Close. After migrating, the client's confirming Ack carries
/// fin=true before the new server's re-executed application closed again:
/// the server rejects it ("ack of a Close not sent") and kills the
/// incarnation; the client fails over again, and again.
#[test]
fn confirm_ack_with_fin_before_reexecuted_close() {
    let mut w = world_n(false, 3);
    let h = w.handle(0);
    w.server(0).snapshot(h, b"before").unwrap();
    w.server(0).write(h, b"banner").unwrap();
    w.server(0).close_write(h).unwrap();
    w.pump();
    assert_eq!(w.client_read_all(), (b"banner".to_vec(), true));
    w.client_events.clear();
    w.client.migrate(w.now, Some(id(1))).unwrap();
    w.pump();
    let n = w
        .client_events
        .iter()
        .filter(|e| {
            matches!(
                e,
                ClientEvent::MigrationStarted {
                    cause: migratory_proto::client::MigrationCause::ServerFailed,
                    ..
                }
            )
        })
        .count();
    assert_eq!(n, 0, "the confirming Ack with fin is accepted");
    assert_eq!(w.owner(), Some(1));
    w.client.write(b"after").unwrap();
    w.pump();
    assert_eq!(w.server_read_all(1).0, b"after");
}

/// A connection that has proved nothing cannot make the server buffer a
/// large frame: the header of a 256 KiB Data frame closes it at once.
#[test]
fn a_large_frame_before_admission_closes_the_connection() {
    let now = std::time::Instant::now();
    let mut s = Server::new(
        ServerConfig::new(ServerId::new("s1").unwrap()),
        Box::new(SmallRng::seed_from_u64(1)),
        now,
    );
    let inc = s.new_incarnation(now, None);
    let mut b = BytesMut::from(&PREAMBLE[..]);
    b.extend_from_slice(&[0x06, 0, 4, 0, 0]); // Data, 256 KiB
    b.extend_from_slice(&[0u8; 1000]);
    s.handle_input(now, inc, &b);
    let closed = closed_connection(&mut s);
    let (i, reason) = closed.expect("closed");
    assert_eq!(i, inc);
    assert!(
        reason.contains("large") || reason.contains("max"),
        "{reason}"
    );
}

/// A pool that requires TLS refuses a migratory connection without a
/// channel binding right after its preamble, saying so; one with a
/// binding is served.
#[test]
fn a_pool_requiring_tls_refuses_an_unbound_connection() {
    let now = std::time::Instant::now();
    let mut cfg = ServerConfig::new(ServerId::new("s1").unwrap());
    cfg.require_binding = true;
    let mut s = Server::new(cfg, Box::new(SmallRng::seed_from_u64(1)), now);
    let mut b = BytesMut::from(&PREAMBLE[..]);
    Frame::Hello { window: 1 << 20 }.encode(&mut b);
    let plain = s.new_incarnation(now, None);
    s.handle_input(now, plain, &b);
    let fr = drain(&mut s, now);
    assert!(
        matches!(
            &fr[..],
            [Frame::Reject {
                reason: migratory_proto::frame::RejectReason::TlsRequired,
                ..
            }]
        ),
        "{fr:?}"
    );
    let bound = s.new_incarnation(now, Some([7; 32]));
    s.handle_input(now, bound, &b);
    let fr = drain(&mut s, now);
    assert!(matches!(fr[..], [Frame::Welcome { .. }]), "{fr:?}");
}

/// A client that says its old connection ended short (`Missing`) on a
/// session that did not resume beyond it: a protocol error that closes
/// that connection (nothing is fetched from any peer, nothing panics), and
/// the session waits for the client to come back.
#[test]
fn missing_without_a_gap_closes_the_connection() {
    let now = std::time::Instant::now();
    let me = ServerId::new("s1").unwrap();
    let mut s = Server::new(
        ServerConfig::new(me),
        Box::new(SmallRng::seed_from_u64(1)),
        now,
    );
    let (inc, _) = hello(&mut s, now);
    while s.poll_event().is_some() {}
    // On the session's connection, and as the first frame of a new one.
    for pos in [0, u64::MAX] {
        let (inc, mut b) = if pos == 0 {
            (inc, BytesMut::new())
        } else {
            (s.new_incarnation(now, None), BytesMut::from(&PREAMBLE[..]))
        };
        Frame::Missing {
            pos,
            limit: 1 << 20,
        }
        .encode(&mut b);
        s.handle_input(now, inc, &b);
        let mut out = Vec::new();
        while let Some(d) = s.poll_transmit(now, &mut out) {
            assert!(
                matches!(d, migratory_proto::server::Dest::Incarnation(_)),
                "nothing goes to any peer: {d:?}"
            );
            out.clear();
        }
        let closed = closed_connection(&mut s);
        let (i, reason) = closed.expect("the connection is closed");
        assert_eq!(i, inc);
        let want = if pos == 0 {
            "Missing outside the gap"
        } else {
            "must start with Hello or Migrate"
        };
        assert!(reason.contains(want), "{reason}");
    }
}

/// The last connection the server's events close, and why.
fn closed_connection(s: &mut Server) -> Option<(migratory_proto::types::IncarnationId, String)> {
    let mut closed = None;
    while let Some(e) = s.poll_event() {
        if let ServerEvent::CloseIncarnation { inc, reason } = e {
            closed = Some((inc, reason));
        }
    }
    closed
}
