//! Named scenarios, one per case of the MTCP thesis and docs/architecture.md 3:
//! each drives one client and a pool of servers by hand over the simulated
//! network and checks every byte both applications read.

mod sim;

use migratory_proto::error::SessionError;
use migratory_proto::frame::{MigrateRequest, RejectReason};
use migratory_proto::server::{
    Arrival, Direction, MigrationOutcome, MigrationReport, ServerEvent, FINISHED_TEXT,
};
use migratory_proto::types::MigrationCause;
use sim::{id, AppKind, World, WorldConfig};

/// A manual world: three servers (eager when asked), nothing random.
fn world(eager: bool) -> World {
    let mut cfg = WorldConfig::new(1, AppKind::Transform);
    cfg.eager = eager;
    let mut w = World::new(cfg);
    w.pump();
    assert!(w.client.is_established());
    w
}

fn migrate(w: &mut World, to: usize) {
    w.client.migrate(w.now, Some(id(to))).expect("migrate");
    w.pump();
    assert!(
        w.client.is_established(),
        "migration to s{} completed",
        to + 1
    );
    assert_eq!(w.owner(), Some(to));
}

fn state(w: &World, i: usize) -> Vec<u8> {
    match w.arrival(i) {
        Arrival::Migrated { state } => state.to_vec(),
        Arrival::New => panic!("s{} got a new session, expected a migrated one", i + 1),
    }
}

#[test]
fn message_read_after_the_snapshot_is_replayed_at_the_new_server() {
    // Thesis figs 3.5-3.7: the application read m1, exported its state,
    // then read m2 without exporting. m2 must be read again at S2.
    let mut w = world(false);
    w.client.write(b"m1|m2|m3|").unwrap();
    w.pump();
    let h = w.handle(0);
    let mut m = [0u8; 3];
    assert_eq!(w.server(0).read(h, &mut m).unwrap(), Some(3));
    assert_eq!(&m, b"m1|");
    w.server(0).snapshot(h, b"read 1").unwrap();
    assert_eq!(w.server(0).read(h, &mut m).unwrap(), Some(3));
    assert_eq!(&m, b"m2|");
    migrate(&mut w, 1);
    assert_eq!(state(&w, 1), b"read 1");
    let (bytes, eof) = w.server_read_all(1);
    assert_eq!(bytes, b"m2|m3|", "m2 replayed from the read log, then m3");
    assert!(!eof);
    assert_eq!(w.server(1).stats().bytes_replayed, 6);
    // The old server's application is told its session moved (EMIGRATED).
    let err = w.server(0).read(h, &mut m).unwrap_err();
    assert!(matches!(err, migratory_proto::error::AppError::Session(e) if e.is_migrated()));
}

#[test]
fn unacknowledged_writes_from_before_the_snapshot_are_transferred() {
    // Thesis fig 3.9 / fig 4.9 scenario 1: the snapshot covers writes the
    // client never received; S2 cannot regenerate them, so S1 sends them.
    // A crash-tolerant session (eager replication) waits for the client's
    // acknowledgements before its reply; see the next test for one that
    // answers at once.
    let mut w = world(true);
    w.hold_from = Some(0);
    let h = w.handle(0);
    assert_eq!(w.server(0).write(h, b"AAAABBBB").unwrap(), 8);
    w.server(0).snapshot(h, b"wrote 8").unwrap();
    w.pump();
    assert_eq!(
        w.client.down_received(),
        0,
        "nothing reached the client yet"
    );
    // The client keeps reading its old connection, but nothing comes on
    // it: S1 answers once its wait for acknowledgements (`settle`) ends.
    w.client.migrate(w.now, Some(id(1))).expect("migrate");
    w.pump();
    assert!(w.client.is_migrating(), "S1 waits for the client's acks");
    w.advance(std::time::Duration::from_millis(100));
    w.pump();
    assert!(w.client.is_established(), "migration to s2 completed");
    assert_eq!(w.owner(), Some(1));
    w.hold_from = None;
    let h2 = w.handle(1);
    assert_eq!(state(&w, 1), b"wrote 8");
    w.server(1).write(h2, b"CCCC").unwrap();
    w.pump();
    assert_eq!(w.client_read_all().0, b"AAAABBBBCCCC");
    assert_eq!(w.server(1).stats().bytes_discarded, 0);
}

/// A world whose windows are `window` bytes, where S1's application wrote
/// a full window of `data` and snapshotted after it; everything is sent on
/// the connection and held there (nothing reached the client yet). With
/// `eager`, sessions are replicated (crash-tolerant): their origin waits
/// for the client's acknowledgements before it replies.
fn window_in_flight(window: usize, frame: usize, data: &[u8], eager: bool) -> World {
    let mut cfg = WorldConfig::new(1, AppKind::Transform);
    cfg.eager = eager;
    cfg.limits.recv_window = window as u64;
    cfg.limits.send_buffer = window as u64;
    cfg.limits.max_data_frame = frame;
    let mut w = World::new(cfg);
    w.pump();
    let h = w.handle(0);
    assert_eq!(w.server(0).write(h, data).unwrap(), window);
    w.server(0).snapshot(h, b"wrote a window").unwrap();
    w.hold_from = Some(0);
    w.pump();
    assert_eq!(w.client.down_received(), 0);
    w
}

#[test]
fn a_migration_under_a_full_window_leaves_the_data_in_flight_on_the_old_connection() {
    // Migration under load (MTCP 4.2.3 step 5): a full window of down
    // data, covered by the snapshot, is on its way to the client when it
    // migrates. The client keeps reading the old connection and
    // acknowledges there; the origin of a crash-tolerant session waits for
    // those acknowledgements, so its reply carries none of that data, and
    // the destination sends none of it again.
    const WINDOW: usize = 256 << 10;
    let data: Vec<u8> = (0..WINDOW as u32).map(|i| (i * 31 % 251) as u8).collect();
    let mut w = window_in_flight(WINDOW, 16 << 10, &data, true);
    let before = w.link_bytes.get(&(0, 1)).copied().unwrap_or(0);
    w.client.migrate(w.now, Some(id(1))).expect("migrate");
    w.pump();
    assert!(
        w.client.is_migrating(),
        "the origin waits for the client's acknowledgements"
    );
    w.hold_from = None;
    w.pump();
    assert!(w.client.is_established(), "migration to s2 completed");
    assert_eq!(w.owner(), Some(1));
    let shipped = w.link_bytes.get(&(0, 1)).copied().unwrap_or(0) - before;
    assert!(
        shipped < 1024,
        "the state reply carried {shipped} bytes for {WINDOW} bytes in flight"
    );
    assert_eq!(state(&w, 1), b"wrote a window");
    assert_eq!(w.server(1).stats().bytes_discarded, 0);
    // The window was full: the client reads it, then gets what follows.
    let mut got = w.client_read_all().0;
    let h2 = w.handle(1);
    w.server(1).write(h2, b"after").unwrap();
    w.pump();
    got.extend(w.client_read_all().0);
    let mut want = data.clone();
    want.extend_from_slice(b"after");
    assert_eq!(got, want, "every byte once, in order");
}

#[test]
fn a_migration_whose_old_connection_stalls_ships_what_was_not_acknowledged() {
    // The same, but the old connection delivers only part of the window
    // before it stalls: once `settle` passes, the reply carries the rest,
    // and the client drops what the destination sends that it already has.
    const WINDOW: usize = 64 << 10;
    let data: Vec<u8> = (0..WINDOW as u32).map(|i| (i * 7 % 253) as u8).collect();
    let mut w = window_in_flight(WINDOW, 4 << 10, &data, true);
    w.client.migrate(w.now, Some(id(1))).expect("migrate");
    w.pump();
    // A quarter of the window reaches the client; its ack goes back.
    let old = *w.conns.keys().next().expect("old connection");
    w.deliver_conn(old, false, WINDOW / 4 + 100);
    w.pump();
    assert!(w.client.is_migrating());
    w.advance(std::time::Duration::from_millis(100));
    w.pump();
    assert!(w.client.is_established(), "migration to s2 completed");
    w.hold_from = None;
    w.pump();
    assert_eq!(w.owner(), Some(1));
    let got = w.client_read_all().0;
    assert_eq!(got, data, "every byte once, in order");
}

#[test]
fn a_busy_session_answers_at_once_and_the_client_catches_up_on_its_old_connection() {
    // Migration under load, the rule for a session without a backup
    // (docs/migration.md): the origin answers the state request at once,
    // cut at everything it sent on the old connection; the destination
    // resumes there but sends nothing down until the client, still reading
    // the old connection, holds every byte below that point.
    const WINDOW: usize = 256 << 10;
    let data: Vec<u8> = (0..WINDOW as u32).map(|i| (i * 13 % 241) as u8).collect();
    let mut w = window_in_flight(WINDOW, 16 << 10, &data, false);
    let before = w.link_bytes.get(&(0, 1)).copied().unwrap_or(0);
    w.client.migrate(w.now, Some(id(1))).expect("migrate");
    w.pump();
    assert!(
        w.client.is_established() && w.client.is_catching_up(),
        "resumed at s2 while the window is still on the old connection"
    );
    assert_eq!(w.owner(), Some(1));
    let shipped = w.link_bytes.get(&(0, 1)).copied().unwrap_or(0) - before;
    assert!(
        shipped < 1024,
        "the state reply carried {shipped} bytes for {WINDOW} bytes in flight"
    );
    assert_eq!(state(&w, 1), b"wrote a window");
    // The new server's application writes at once; none of it may reach
    // the client before the window does.
    let h2 = w.handle(1);
    w.server(1).write(h2, b"after").unwrap();
    w.pump();
    assert_eq!(w.client.down_received(), 0, "nothing overtook the window");
    w.hold_from = None;
    w.pump();
    assert!(!w.client.is_catching_up());
    // The window was full: the client reads it, then gets what follows.
    let mut got = w.client_read_all().0;
    w.pump();
    got.extend(w.client_read_all().0);
    let mut want = data.clone();
    want.extend_from_slice(b"after");
    same_bytes(&got, &want);
    assert_eq!(w.server(1).stats().bytes_discarded, 0);
    // The origin freed the session once the client confirmed s2.
    assert!(w.server(0).owned_sessions().next().is_none());
}

#[test]
fn bytes_written_before_the_snapshot_beyond_the_window_travel_in_the_reply() {
    // The application wrote two windows and snapshotted after them; only
    // the first fits in the client's window. The second is part of the
    // state (the destination cannot write it again). The old connection
    // carries only what the client can take without its application
    // reading (else a client that does not read could never catch up):
    // the second window travels in the reply (thesis fig 3.9), and the
    // destination sends it after the first.
    const WINDOW: usize = 64 << 10;
    let mut cfg = WorldConfig::new(1, AppKind::Transform);
    cfg.limits.recv_window = WINDOW as u64;
    cfg.limits.send_buffer = 2 * WINDOW as u64;
    cfg.limits.max_data_frame = 4 << 10;
    let mut w = World::new(cfg);
    w.pump();
    let data: Vec<u8> = (0..2 * WINDOW as u32)
        .map(|i| (i * 5 % 229) as u8)
        .collect();
    let h = w.handle(0);
    assert_eq!(w.server(0).write(h, &data).unwrap(), 2 * WINDOW);
    w.server(0).snapshot(h, b"wrote two windows").unwrap();
    w.hold_from = Some(0);
    w.pump();
    let before = w.link_bytes.get(&(0, 1)).copied().unwrap_or(0);
    w.client.migrate(w.now, Some(id(1))).expect("migrate");
    w.pump();
    assert!(w.client.is_catching_up());
    let shipped = w.link_bytes.get(&(0, 1)).copied().unwrap_or(0) - before;
    assert!(
        (WINDOW as u64..WINDOW as u64 + 1024).contains(&shipped),
        "the state reply carried {shipped} bytes: the second window and little else"
    );
    assert_eq!(state(&w, 1), b"wrote two windows");
    w.hold_from = None;
    let mut got = Vec::new();
    for _ in 0..4 {
        w.pump();
        got.extend(w.client_read_all().0);
    }
    assert!(!w.client.is_catching_up());
    let h2 = w.handle(1);
    w.server(1).write(h2, b"after").unwrap();
    w.pump();
    got.extend(w.client_read_all().0);
    let mut want = data.clone();
    want.extend_from_slice(b"after");
    same_bytes(&got, &want);
    assert_eq!(w.server(1).stats().bytes_discarded, 0);
}

#[test]
fn an_old_connection_that_breaks_while_the_client_catches_up_is_refilled_by_the_destination() {
    // The same, but the old connection breaks after a quarter of the
    // window: the client tells s2 where it stopped (Missing), s2 fetches
    // the rest from the origin, which kept it, and sends it first.
    const WINDOW: usize = 64 << 10;
    let data: Vec<u8> = (0..WINDOW as u32).map(|i| (i * 7 % 239) as u8).collect();
    let mut w = catching_up_at_s2(&data);
    let old = *w.conns.keys().next().expect("old connection");
    w.deliver_conn(old, false, WINDOW / 4 + 100);
    w.pump();
    let before = w.link_bytes.get(&(0, 1)).copied().unwrap_or(0);
    w.reset_conn(old);
    w.pump();
    let fetched = w.link_bytes.get(&(0, 1)).copied().unwrap_or(0) - before;
    assert!(
        fetched as usize >= WINDOW * 3 / 4 - 200,
        "the rest of the window came from the origin ({fetched} bytes)"
    );
    assert!(!w.client.is_catching_up());
    assert_eq!(w.owner(), Some(1));
    client_gets_the_window_then_after(&mut w, 1, &data);
}

#[test]
fn a_migration_asked_for_while_catching_up_goes_where_it_was_asked() {
    // The client asks to move on while it still catches up with s2: the
    // migration starts once it has, and its Migrate (which may reach s2
    // before the client's confirming frame does) shows s2 that it caught
    // up, so s2 hands the session on to s3.
    const WINDOW: usize = 64 << 10;
    let data: Vec<u8> = (0..WINDOW as u32).map(|i| (i * 3 % 227) as u8).collect();
    let mut w = catching_up_at_s2(&data);
    w.client.migrate(w.now, Some(id(2))).expect("deferred");
    assert!(w.client.migration_pending() && !w.client.is_migrating());
    w.hold_from = None;
    let old = *w.conns.keys().next().expect("old connection");
    w.deliver_conn(old, false, usize::MAX);
    w.flush();
    assert!(w.client.is_migrating(), "the deferred migration started");
    // Its Migrate, and s3's state request, travel first.
    let to_s3 = client_conn_to(&w, 2).expect("connection to s3");
    w.deliver_conn(to_s3, true, usize::MAX);
    w.flush();
    w.deliver_link(2, 1);
    w.flush();
    w.pump();
    assert_eq!(w.owner(), Some(2), "the session went where it was asked");
    assert!(!w.client.migration_pending());
    client_gets_the_window_then_after(&mut w, 2, &data);
}

#[test]
fn a_gap_is_asked_for_once_while_the_control_link_stays_up() {
    // The destination asks the origin for the bytes a broken old
    // connection lost once, not again on every timer: a reply of up to a
    // send buffer must not be queued several times on the control link.
    const WINDOW: usize = 64 << 10;
    let data: Vec<u8> = (0..WINDOW as u32).map(|i| (i * 7 % 239) as u8).collect();
    let mut w = catching_up_at_s2(&data);
    let old = *w.conns.keys().next().expect("old connection");
    w.reset_conn(old);
    // The client's Missing reaches s2, which asks s1; the reply is slow.
    w.flush();
    let keys: Vec<_> = w.conns.keys().copied().collect();
    for k in keys {
        w.deliver_conn(k, true, usize::MAX);
    }
    w.flush();
    // (The simulated servers ask for at most 400 ms, `settle` is 100 ms.)
    for _ in 0..3 {
        w.advance(std::time::Duration::from_millis(60));
        w.flush();
    }
    let asked = w.links.get(&(1, 0)).map_or(0, |q| q.len());
    assert_eq!(asked, 1, "one GapRequest in almost two `settle`s");
    // The link breaks with the request on it: asked again, which brings
    // the link back.
    w.break_link(0, 1);
    w.advance(std::time::Duration::from_millis(110));
    w.pump();
    assert!(!w.client.is_catching_up());
    client_gets_the_window_then_after(&mut w, 1, &data);
}

#[test]
fn data_in_flight_lost_with_its_origin_ends_the_session_with_an_error() {
    // The origin (no backup) crashes while the client still drains its
    // connection: the bytes it lacks existed nowhere else. The session
    // ends with a clear error once the destination gives up asking; the
    // client never reads a byte out of place.
    const WINDOW: usize = 64 << 10;
    let data: Vec<u8> = (0..WINDOW as u32).map(|i| (i * 11 % 233) as u8).collect();
    let mut w = catching_up_at_s2(&data);
    let old = *w.conns.keys().next().expect("old connection");
    w.deliver_conn(old, false, WINDOW / 4 + 100);
    w.pump();
    w.crash(0);
    w.pump();
    for _ in 0..7 {
        w.advance(std::time::Duration::from_secs(1));
        w.pump();
    }
    match w.client.failure() {
        Some(SessionError::Rejected { reason, text, .. }) => {
            assert_eq!(
                *reason,
                migratory_proto::frame::RejectReason::OriginUnreachable
            );
            assert!(text.contains("old connection lost"), "{text}");
        }
        other => panic!("expected the destination's Reject, got {other:?}"),
    }
    let got = w.client_read_all_after_failure();
    assert!(!got.is_empty() && got.len() < WINDOW);
    same_bytes(&got, &data[..got.len()]);
}

#[test]
fn a_client_cut_off_from_its_new_server_while_catching_up_resumes_elsewhere() {
    // The client migrated under load and is catching up on its old
    // connection when its connection to the new server (s2, alive) breaks.
    // It fails over; the server it reaches asks s2 for the state, and s2,
    // which lacks the bytes below its resume point, fetches them from the
    // origin and then answers, instead of refusing until the client caught
    // up (which it cannot do while its old connection stalls, or is broken
    // too: a client whose network changed).
    const WINDOW: usize = 64 << 10;
    let data: Vec<u8> = (0..WINDOW as u32).map(|i| (i * 13 % 241) as u8).collect();
    for old_breaks_too in [false, true] {
        let mut w = catching_up_at_s2(&data);
        let old = *w.conns.keys().next().expect("old connection");
        w.deliver_conn(old, false, WINDOW / 4 + 100);
        if old_breaks_too {
            w.reset_conn(old);
        }
        cut_off_from_s2(&mut w);
        // The old connection stays stalled (s1's output is held) while the
        // client fails over; then the network delivers everything again.
        let gaps = w.gaps_filled;
        w.pump();
        assert_eq!(
            w.gaps_filled,
            gaps + 1,
            "s2 fetched the bytes for the request"
        );
        w.hold_from = None;
        for _ in 0..5 {
            w.advance(std::time::Duration::from_millis(100));
            w.pump();
        }
        assert_eq!(
            w.client.failure(),
            None,
            "the session survives (old connection broken too: {old_breaks_too})"
        );
        assert!(!w.client.is_catching_up());
        let at = w.owner().expect("attached again");
        assert_ne!(at, 1, "not back on the server it lost");
        client_gets_the_window_then_after(&mut w, at, &data);
    }
}

#[test]
fn a_client_that_comes_back_while_its_gap_is_fetched_gets_every_byte_once() {
    // The client said Missing to s2, then lost that connection and came
    // back to s2 (the only server it reaches) while s2 still waited for
    // the bytes from s1; the bytes arrive before the client reads its
    // Resumed. s2 keeps the connection and sends from where the client
    // stopped, once.
    const WINDOW: usize = 64 << 10;
    let data: Vec<u8> = (0..WINDOW as u32).map(|i| (i * 17 % 227) as u8).collect();
    let mut w = catching_up_at_s2(&data);
    let to_s2 = |w: &World| client_conn_to(w, 1).expect("a connection to s2");
    let old = *w.conns.keys().next().expect("old connection");
    w.reset_conn(old);
    w.flush();
    let first = to_s2(&w);
    w.deliver_conn(first, true, usize::MAX);
    w.flush();
    assert_eq!(
        w.links.get(&(1, 0)).map_or(0, |q| q.len()),
        1,
        "s2 asked s1"
    );
    w.unreachable.extend([0, 2]);
    w.reset_conn(first);
    w.flush();
    let second = to_s2(&w);
    assert_ne!(first, second, "the client came back to s2");
    w.deliver_conn(second, true, usize::MAX);
    w.flush();
    // The gap request and its reply, before the client reads Resumed.
    w.deliver_link(1, 0);
    w.flush();
    w.deliver_link(0, 1);
    w.flush();
    w.unreachable.clear();
    w.pump();
    assert!(
        w.conns.contains_key(&second),
        "s2 kept the connection the client came back on"
    );
    assert_eq!(w.client.failure(), None);
    assert_eq!(w.owner(), Some(1));
    assert!(!w.client.is_catching_up());
    client_gets_the_window_then_after(&mut w, 1, &data);
}

#[test]
fn a_gap_asked_for_an_abandoned_attempt_does_not_position_the_client() {
    // Cut off from s2 with its old connection still open, the client tries
    // another server, whose state request s2 holds while it asks s1 for the
    // bytes from where that attempt stood. The attempt fails and the client
    // comes back to s2, and reads more of its old connection meanwhile.
    // s1's answer, arriving late, starts where the client no longer is: s2
    // does not go on from there, and the client gets every byte once.
    const WINDOW: usize = 64 << 10;
    let data: Vec<u8> = (0..WINDOW as u32).map(|i| (i * 19 % 233) as u8).collect();
    let mut w = catching_up_at_s2(&data);
    let old = *w.conns.keys().next().expect("old connection");
    // A quarter arrives on the old connection, and s1 hears the client's
    // acknowledgement of it.
    w.deliver_conn(old, false, WINDOW / 4);
    w.flush();
    w.deliver_conn(old, true, usize::MAX);
    w.flush();
    cut_off_from_s2(&mut w);
    w.flush();
    let x = [0, 2]
        .into_iter()
        .find(|i| client_conn_to(&w, *i).is_some_and(|k| k != old))
        .expect("an attempt at another server");
    let to_x = client_conn_to(&w, x).expect("connection to it");
    w.deliver_conn(to_x, true, usize::MAX);
    w.flush();
    w.deliver_link(x, 1);
    w.flush();
    assert_eq!(
        w.links.get(&(1, 0)).map_or(0, |q| q.len()),
        1,
        "s2 holds the request and asks s1"
    );
    // That attempt fails; only s2 is within reach now.
    w.unreachable = [0, 2].into();
    w.reset_conn(to_x);
    w.flush();
    let back = client_conn_to(&w, 1).expect("the client came back to s2");
    w.deliver_conn(back, true, usize::MAX);
    w.flush();
    w.deliver_conn(back, false, usize::MAX);
    w.flush();
    w.deliver_conn(old, false, WINDOW / 4);
    w.flush();
    w.deliver_link(1, 0);
    w.flush();
    w.deliver_link(0, 1);
    w.flush();
    let mut got = w.client_read_all().0;
    w.deliver_conn(back, false, usize::MAX);
    w.flush();
    got.extend(w.client_read_all().0);
    w.unreachable.clear();
    w.hold_from = None;
    w.pump();
    for _ in 0..5 {
        w.advance(std::time::Duration::from_millis(100));
        w.pump();
    }
    assert_eq!(w.client.failure(), None);
    got.extend(w.client_read_all().0);
    same_bytes(&got, &data);
    let at = w.owner().expect("attached");
    client_gets_the_window_then_after(&mut w, at, &[]);
}

#[test]
fn a_slow_origin_does_not_end_a_session_whose_client_catches_up() {
    // Cut off from s2, the client tries another server; s2 holds that
    // state request and asks s1 for the bytes the client lacks, but the
    // way from s2 to s1 is slow. Meanwhile the client gets them all on its
    // old connection. s2 refuses the held request in time (the client
    // tries again, now caught up) and keeps the session: nothing was lost.
    const WINDOW: usize = 64 << 10;
    let data: Vec<u8> = (0..WINDOW as u32).map(|i| (i * 23 % 229) as u8).collect();
    let mut w = catching_up_at_s2(&data);
    let old = *w.conns.keys().next().expect("old connection");
    w.deliver_conn(old, false, WINDOW / 4);
    cut_off_from_s2(&mut w);
    w.hold_from = None;
    w.hold_link = Some((1, 0));
    w.pump();
    for _ in 0..6 {
        w.advance(std::time::Duration::from_millis(100));
        w.pump();
    }
    w.hold_link = None;
    w.unreachable.clear();
    w.pump();
    for _ in 0..20 {
        w.advance(std::time::Duration::from_millis(100));
        w.pump();
    }
    assert_eq!(w.client.failure(), None, "the session survives");
    let at = w.owner().expect("attached");
    client_gets_the_window_then_after(&mut w, at, &data);
}

/// The client of [`catching_up_at_s2`] loses its connection to s2, and
/// cannot reach s2 any more (s2 itself is fine).
fn cut_off_from_s2(w: &mut World) {
    let to_s2 = client_conn_to(w, 1).expect("connection to s2");
    w.unreachable.insert(1);
    w.reset_conn(to_s2);
}

/// The newest open connection of the client to server `i`.
fn client_conn_to(w: &World, i: usize) -> Option<migratory_proto::types::IncarnationId> {
    w.conns
        .iter()
        .filter(|(_, c)| c.server == i && !c.attacker && !c.client_closed)
        .map(|(k, _)| *k)
        .max()
}

/// A window of `data` in flight on s1's connection (see
/// `window_in_flight`), and the client migrated to s2, which resumed
/// beyond what the client holds: it catches up on the old connection.
fn catching_up_at_s2(data: &[u8]) -> World {
    let mut w = window_in_flight(data.len(), 4 << 10, data, false);
    w.client.migrate(w.now, Some(id(1))).expect("migrate");
    w.pump();
    assert!(w.client.is_catching_up());
    w
}

/// The client reads what it holds, then server `i`'s application writes
/// "after": the client got `data` and then "after", every byte once.
fn client_gets_the_window_then_after(w: &mut World, i: usize, data: &[u8]) {
    let mut got = w.client_read_all().0;
    let h = w.handle(i);
    w.server(i).write(h, b"after").unwrap();
    w.pump();
    got.extend(w.client_read_all().0);
    let mut want = data.to_vec();
    want.extend_from_slice(b"after");
    same_bytes(&got, &want);
}

/// Every byte once, in order (says where the first difference is, not
/// the whole stream).
fn same_bytes(got: &[u8], want: &[u8]) {
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    assert!(
        got == want,
        "every byte once, in order: got {} bytes, want {}, first difference at {first:?}",
        got.len(),
        want.len()
    );
}

#[test]
fn written_buffers_follow_the_rules_of_writes() {
    // `write_bytes` keeps the caller's buffer instead of copying it, and
    // takes it as `write` takes bytes: what the client already has (written
    // again after a migration) is dropped, and a full send buffer takes
    // part of it, leaving the rest to the caller.
    let mut w = moved_after_a_write_beyond_the_snapshot(|w, h, data| {
        w.server(0)
            .write_bytes(h, &bytes::Bytes::copy_from_slice(data))
            .unwrap()
    });
    let h2 = w.handle(1);
    let again = bytes::Bytes::from_static(b"BBBBCCCC");
    assert_eq!(w.server(1).write_bytes(h2, &again).unwrap(), 8);
    client_gets_only_cccc(&mut w);

    let mut cfg = WorldConfig::new(1, AppKind::Transform);
    cfg.limits.send_buffer = 16;
    let mut w = World::new(cfg);
    w.pump();
    let h = w.handle(0);
    let data: Vec<u8> = (0..24u8).collect();
    let buf = bytes::Bytes::from(data.clone());
    assert_eq!(w.server(0).write_bytes(h, &buf).unwrap(), 16, "what fits");
    w.pump();
    let mut got = w.client_read_all().0;
    // The client's acknowledgement (delayed) frees the send buffer.
    w.advance(std::time::Duration::from_millis(100));
    w.pump();
    assert_eq!(w.server(0).write_bytes(h, &buf.slice(16..)).unwrap(), 8);
    w.pump();
    got.extend(w.client_read_all().0);
    assert_eq!(got, data);
}

/// After [`moved_after_a_write_beyond_the_snapshot`] and s2's BBBBCCCC:
/// the client gets CCCC only, and s2 dropped the 4 bytes it already had.
fn client_gets_only_cccc(w: &mut World) {
    w.pump();
    assert_eq!(
        w.client_read_all().0,
        b"CCCC",
        "no duplicate, nothing missing"
    );
    assert_eq!(w.server(1).stats().bytes_discarded, 4);
}

/// A session on s1 wrote AAAA, snapshotted, then wrote BBBB (with
/// `write_after`), which the client read; it then moved to s2.
fn moved_after_a_write_beyond_the_snapshot(
    write_after: impl FnOnce(&mut World, migratory_proto::server::SessionHandle, &[u8]) -> usize,
) -> World {
    let mut w = world(false);
    let h = w.handle(0);
    w.server(0).write(h, b"AAAA").unwrap();
    w.server(0).snapshot(h, b"wrote 4").unwrap();
    assert_eq!(write_after(&mut w, h, b"BBBB"), 4);
    w.pump();
    assert_eq!(w.client_read_all().0, b"AAAABBBB");
    migrate(&mut w, 1);
    w
}

#[test]
fn writes_after_the_snapshot_the_client_already_has_are_discarded() {
    // Thesis fig 3.10 / fig 4.9 scenario 2: S2 re-executes from the
    // snapshot and writes BBBB again; the client has it, so it is dropped.
    let mut w =
        moved_after_a_write_beyond_the_snapshot(|w, h, data| w.server(0).write(h, data).unwrap());
    let h2 = w.handle(1);
    assert_eq!(state(&w, 1), b"wrote 4");
    assert_eq!(
        w.server(1).write(h2, b"BBBB").unwrap(),
        4,
        "re-executed write accepted"
    );
    w.server(1).write(h2, b"CCCC").unwrap();
    client_gets_only_cccc(&mut w);
}

#[test]
fn receive_state_is_the_read_log_plus_the_receive_buffer() {
    // Thesis fig 4.10: up data [rcv_snap, rcv_nxt) = read log + buffer.
    let mut w = world(false);
    w.client.write(b"0123456789").unwrap();
    w.pump();
    let h = w.handle(0);
    let mut b3 = [0u8; 3];
    w.server(0).read(h, &mut b3).unwrap();
    w.server(0).snapshot(h, b"3").unwrap();
    let mut b4 = [0u8; 4];
    w.server(0).read(h, &mut b4).unwrap();
    assert_eq!(&b4, b"3456");
    assert_eq!(
        w.server(0).readable_bytes(h),
        3,
        "789 still in the receive buffer"
    );
    migrate(&mut w, 2);
    assert_eq!(w.server_read_all(2).0, b"3456789");
    assert_eq!(w.server(2).stats().bytes_replayed, 7);
}

#[test]
fn migration_after_the_client_half_closed() {
    let mut w = world(false);
    w.client.write(b"request").unwrap();
    w.client.close_write().unwrap();
    w.pump();
    let h = w.handle(0);
    assert_eq!(w.server_read_all(0), (b"request".to_vec(), true));
    w.server(0).snapshot(h, b"got request").unwrap();
    migrate(&mut w, 1);
    let h2 = w.handle(1);
    assert_eq!(w.server_read_all(1), (Vec::new(), true), "EOF carried over");
    w.server(1).write(h2, b"response").unwrap();
    w.server(1).close_write(h2).unwrap();
    w.pump();
    assert_eq!(w.client_read_all(), (b"response".to_vec(), true));
    w.pump();
    assert!(w.client.is_finished());
    assert!(w.servers[1]
        .as_ref()
        .unwrap()
        .events
        .iter()
        .any(|e| matches!(e, migratory_proto::server::ServerEvent::Finished(x) if *x == h2)));
}

#[test]
fn migration_after_the_server_half_closed() {
    let mut w = world(false);
    let h = w.handle(0);
    w.server(0).write(h, b"banner").unwrap();
    w.server(0).close_write(h).unwrap();
    w.server(0).snapshot(h, b"closed").unwrap();
    w.pump();
    assert_eq!(w.client_read_all(), (b"banner".to_vec(), true));
    w.client.write(b"upload").unwrap();
    w.pump();
    migrate(&mut w, 2);
    let h2 = w.handle(2);
    // The close is part of the restart point: S2 cannot write again.
    assert!(w.server(2).write(h2, b"x").is_err());
    assert_eq!(w.server_read_all(2).0, b"upload");
    w.client.close_write().unwrap();
    w.pump();
    assert!(w.server_read_all(2).1, "EOF");
    w.pump();
    assert!(w.client.is_finished());
    assert_eq!(w.client_read_all(), (Vec::new(), true));
}

/// An echo application played by the test: read all, write it back,
/// snapshot with the count.
fn echo(w: &mut World, i: usize) {
    let h = w.handle(i);
    let (bytes, _) = w.server_read_all(i);
    assert_eq!(w.server(i).write(h, &bytes).unwrap(), bytes.len());
    w.server(i).snapshot(h, b"echo").unwrap();
}

#[test]
fn fifty_migrations_in_a_row_lose_and_repeat_nothing() {
    let mut w = world(false);
    let mut sent = Vec::new();
    let mut got = Vec::new();
    for k in 0..50u32 {
        let chunk: Vec<u8> = (0..97 + k).map(|j| (j * 7 + k) as u8).collect();
        w.client.write(&chunk).unwrap();
        sent.extend_from_slice(&chunk);
        w.pump();
        let at = w.owner().unwrap();
        echo(&mut w, at);
        w.pump();
        got.extend(w.client_read_all().0);
        migrate(&mut w, (at + 1) % 3);
    }
    assert_eq!(w.client.stats().migrations, 50);
    assert_eq!(
        got, sent,
        "every byte echoed exactly once across 50 migrations"
    );
}

#[test]
fn s1_to_s2_and_back_to_s1() {
    let mut w = world(false);
    w.client.write(b"one").unwrap();
    w.pump();
    echo(&mut w, 0);
    migrate(&mut w, 1);
    w.client.write(b"two").unwrap();
    w.pump();
    echo(&mut w, 1);
    migrate(&mut w, 0);
    assert!(
        matches!(w.arrival(0), Arrival::Migrated { .. }),
        "S1 resumes it as a migrated session"
    );
    w.client.write(b"three").unwrap();
    w.pump();
    echo(&mut w, 0);
    w.pump();
    assert_eq!(w.client_read_all().0, b"onetwothree");
    assert_eq!(w.client.epoch(), Some(2));
}

fn request_for(w: &World, epoch: u64) -> MigrateRequest {
    MigrateRequest {
        session: w.client.session().unwrap(),
        origin: w.client.server().unwrap().clone(),
        epoch,
        attempt: 99,
        cause: MigrationCause::Requested,
        down: 0,
        down_fin: false,
        draining: false,
        window: 1 << 16,
    }
}

#[test]
fn unknown_session_is_rejected_not_found() {
    let mut w = world(false);
    let mut req = request_for(&w, 0);
    req.session = migratory_proto::types::SessionId(12345);
    w.replay(req, [0; 32], 1);
    w.pump();
    assert_eq!(
        w.attacker_rejects.last().map(|r| r.0),
        Some(RejectReason::NotFound)
    );
}

#[test]
fn finished_session_is_rejected_invalid_state() {
    let mut w = world(false);
    let h = w.handle(0);
    w.client.close_write().unwrap();
    w.server(0).close_write(h).unwrap();
    w.pump();
    assert!(w.server_read_all(0).1, "EOF");
    w.pump();
    assert!(w.client.is_finished());
    let req = request_for(&w, 0);
    w.replay(req, [0; 32], 0);
    w.pump();
    assert_eq!(
        w.attacker_rejects.last().cloned(),
        Some((RejectReason::InvalidState, FINISHED_TEXT.to_string()))
    );
}

#[test]
fn forged_and_replayed_migrates_are_refused() {
    let mut w = world(false);
    migrate(&mut w, 1);
    migrate(&mut w, 0);
    // An eavesdropper holds both real requests with their real proofs.
    let (first, first_proof) = w.sent_migrates[0].clone();
    let (second, second_proof) = w.sent_migrates[1].clone();
    // Forged: right fields for the live session, guessed proof.
    let forged = request_for(&w, w.client.epoch().unwrap());
    w.replay(forged, [7; 32], 2);
    w.pump();
    // Replayed to a fresh challenge: the owner (s1, alive) refuses the proof.
    w.replay(first, first_proof, 1);
    w.pump();
    // Replayed naming an origin that no longer has the session.
    w.replay(second, second_proof, 2);
    w.pump();
    let reasons: Vec<RejectReason> = w.attacker_rejects.iter().map(|r| r.0).collect();
    assert_eq!(
        reasons,
        [
            RejectReason::AuthFailed,
            RejectReason::AuthFailed,
            RejectReason::NotFound
        ],
        "{:?}",
        w.attacker_rejects
    );
    // (The harness panics if any of them ever saw Resumed or Data.) The
    // real client is untouched.
    w.client.write(b"still here").unwrap();
    w.pump();
    assert_eq!(w.server_read_all(0).0, b"still here");
}

#[test]
fn origin_crash_with_a_backup_the_session_survives() {
    let mut w = world(true);
    let h = w.handle(0);
    w.client.write(b"before crash").unwrap();
    w.server(0).write(h, b"AAAA").unwrap();
    w.pump();
    let (got, _) = w.server_read_all(0);
    assert_eq!(got, b"before crash");
    w.server(0).snapshot(h, b"s").unwrap();
    w.server(0).write(h, b"BBBB").unwrap();
    w.pump();
    let sid = w.client.session().unwrap();
    assert!(w.server(0).crash_tolerant(sid));
    w.crash(0);
    w.pump();
    // The client failed over to S1's backup, S2, which resumed from its
    // replica: re-executed BBBB is discarded, new bytes flow.
    assert_eq!(w.owner(), Some(1));
    assert_eq!(w.server(1).stats().failovers_in, 1);
    let h2 = w.handle(1);
    assert_eq!(state(&w, 1), b"s");
    w.server(1).write(h2, b"BBBBCCCC").unwrap();
    w.client.write(b" after").unwrap();
    w.pump();
    assert_eq!(w.client_read_all().0, b"AAAABBBBCCCC");
    assert_eq!(w.server_read_all(1).0, b" after");
}

#[test]
fn origin_crash_without_a_backup_is_a_clean_abort() {
    let mut w = world(false);
    let h = w.handle(0);
    w.server(0).write(h, b"partial").unwrap();
    w.pump();
    w.crash(0);
    w.pump();
    // Every alternate asks the dead origin: the session is lost, the client
    // says so, and what it read is a correct prefix.
    for _ in 0..40 {
        if w.client.failure().is_some() {
            break;
        }
        let t = w.next_timeout().unwrap();
        w.advance(t - w.now);
        w.pump();
    }
    let err = w.client.failure().cloned().expect("the client gives up");
    assert!(matches!(err, SessionError::NoServerLeft { .. }), "{err}");
    assert_eq!(w.client_read_all_after_failure(), b"partial");
}

fn reports(w: &mut World, i: usize) -> Vec<MigrationReport> {
    let node = w.servers[i].as_mut().expect("up");
    node.events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Migration(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn operator_push_by_session_id_is_reported_on_both_sides() {
    // An operator's push (MTCP 3.2.1 case a, by session id): the client
    // follows the Trigger; s2 reports the migration in, s1 reports it out,
    // both with the client's cause; the listing follows the session.
    let mut w = world(false);
    let sid = w.client.session().expect("established");
    let h = w.handle(0);
    w.client.write(b"abc").unwrap();
    w.server(0).write(h, b"xyz").unwrap();
    w.pump();
    let infos = w.server(0).session_infos();
    assert_eq!(infos.len(), 1);
    assert_eq!((infos[0].session, infos[0].up, infos[0].down), (sid, 3, 3));
    assert!(infos[0].inc.is_some());
    assert!(w.server(0).trigger(sid, Some(id(1))));
    w.pump();
    assert_eq!(w.owner(), Some(1));
    assert!(w.server(0).session_infos().is_empty());
    assert_eq!(w.server(1).session_infos()[0].session, sid);
    // Not owned any more: nothing to trigger.
    assert!(!w.server(0).trigger(sid, Some(id(2))));
    let inr = reports(&mut w, 1);
    assert_eq!(inr.len(), 1, "{inr:?}");
    assert_eq!(
        (
            inr[0].session,
            inr[0].direction,
            &inr[0].peer,
            inr[0].cause,
            inr[0].outcome
        ),
        (
            sid,
            Direction::In,
            &id(0),
            MigrationCause::Trigger,
            MigrationOutcome::Moved
        )
    );
    // The snapshot was never taken: all 3 up bytes come back to be re-read.
    assert_eq!(inr[0].replayed, 3);
    let out = reports(&mut w, 0);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(
        (
            out[0].session,
            out[0].direction,
            &out[0].peer,
            out[0].cause,
            out[0].outcome
        ),
        (
            sid,
            Direction::Out,
            &id(1),
            MigrationCause::Trigger,
            MigrationOutcome::Moved
        )
    );
    // A client-requested migration says so.
    migrate(&mut w, 2);
    let inr = reports(&mut w, 2);
    assert_eq!(
        (inr[0].cause, inr[0].outcome),
        (MigrationCause::Requested, MigrationOutcome::Moved)
    );
}

#[test]
fn a_refused_migration_is_reported_with_its_reason() {
    let mut w = world(false);
    let mut req = request_for(&w, 0);
    req.session = migratory_proto::types::SessionId(12345);
    w.replay(req, [0; 32], 1);
    w.pump();
    let r = reports(&mut w, 1);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(
        (r[0].direction, r[0].outcome),
        (
            Direction::In,
            MigrationOutcome::Rejected(RejectReason::NotFound)
        )
    );
    assert_eq!(r[0].outcome.as_str(), "not_found");
}

/// The eavesdropper's view of the session's secrets (Welcome, then each
/// Resumed's rekey) — what a leak of old keys would give an attacker.
fn leaked(w: &World, epoch: u64) -> migratory_proto::types::Secret {
    w.leaked.get(&epoch).cloned().unwrap_or_else(|| {
        panic!(
            "no secret followed for epoch {epoch}: {:?}",
            w.leaked.keys()
        )
    })
}

#[test]
fn the_secret_changes_at_every_epoch_and_an_old_one_moves_nothing() {
    let mut w = world(false);
    migrate(&mut w, 1);
    w.client.write(b"confirm at s2|").unwrap();
    w.pump();
    migrate(&mut w, 2);
    w.client.write(b"confirm at s3|").unwrap();
    w.pump();
    let now = w.client.epoch().unwrap();
    assert!(w.leaked.len() >= 3, "{:?}", w.leaked.keys());
    let epochs: Vec<u64> = w.leaked.keys().copied().collect();
    for pair in epochs.windows(2) {
        assert_ne!(
            leaked(&w, pair[0]),
            leaked(&w, pair[1]),
            "a new secret per epoch"
        );
    }
    // An attacker holding every old epoch's secret, a fresh proof for its
    // own connection and the largest attempt number, at every server: each
    // refuses, and the session stays with the client.
    for old in epochs.iter().copied().filter(|e| *e != now) {
        let mut req = request_for(&w, old);
        req.attempt = u64::MAX;
        for target in 0..3 {
            w.forge(req.clone(), leaked(&w, old), target);
            w.pump();
        }
    }
    assert!(!w.attacker_rejects.is_empty());
    assert!(
        w.attacker_rejects
            .iter()
            .all(|(r, _)| matches!(r, RejectReason::AuthFailed | RejectReason::NotFound)),
        "{:?}",
        w.attacker_rejects
    );
    // The huge attempts locked nothing: the client migrates on, and every
    // byte is still exact (the harness checks both streams).
    migrate(&mut w, 0);
    w.client.write(b"still mine|").unwrap();
    w.pump();
    assert_eq!(w.owner(), Some(0));
    // With the current secret (a client's own), a fresh proof does move it:
    // the refusals above are not a harness that refuses everything.
    let mut req = request_for(&w, w.client.epoch().unwrap());
    req.attempt = u64::MAX;
    let before = w.attacker_rejects.len();
    let current = leaked(&w, w.client.epoch().unwrap());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        w.forge(req, current, 1);
        w.pump();
    }));
    assert!(
        r.is_err() && w.attacker_rejects.len() == before,
        "the current secret must resume the session (the harness then reports invariant 3)"
    );
}

#[test]
fn a_plaintext_pool_challenges_each_migrate_and_a_bound_one_does_not() {
    for tls in [false, true] {
        let mut cfg = WorldConfig::new(3, AppKind::Transform);
        cfg.tls = tls;
        let mut w = World::new(cfg);
        w.pump();
        migrate(&mut w, 1);
        w.client.write(b"x|").unwrap();
        w.pump();
        migrate(&mut w, 2);
        // The eavesdropper's replays fail either way.
        let (req, proof) = w.sent_migrates[0].clone();
        w.replay(req, proof, 1);
        w.pump();
        assert_eq!(
            w.attacker_rejects.last().map(|r| r.0),
            Some(RejectReason::NotFound),
            "tls {tls}"
        );
        assert_eq!(w.challenges, if tls { 0 } else { 2 }, "tls {tls}");
    }
}

/// A world whose servers report their loads, and have exchanged them.
fn balanced_world() -> World {
    let mut cfg = WorldConfig::new(1, AppKind::Transform);
    cfg.balance = true;
    let mut w = World::new(cfg);
    w.pump();
    assert!(w.client.is_established());
    w.advance(std::time::Duration::from_millis(1000));
    w.pump();
    w
}

#[test]
fn a_drain_moves_the_session_to_a_live_peer_and_reports_it() {
    let mut w = balanced_world();
    let h = w.handle(0);
    w.client.write(b"before the drain").unwrap();
    w.server(0).write(h, b"AAAA").unwrap();
    w.pump();
    assert_eq!(w.server_read_all(0).0, b"before the drain");
    w.server(0).snapshot(h, b"s").unwrap();
    w.server(0).write(h, b"BBBB").unwrap();
    let now = w.now;
    w.server(0)
        .drain(now, now + std::time::Duration::from_secs(10));
    w.pump();
    let to = w.owner().expect("moved");
    assert_ne!(to, 0, "the session left the draining server");
    // A draining server takes no session in.
    let status = w.server(0).drain_status().expect("draining");
    assert_eq!((status.moved, status.closed), (1, 0));
    w.advance(std::time::Duration::from_millis(300));
    w.pump();
    let drained: Vec<_> = w.servers[0]
        .as_ref()
        .unwrap()
        .events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Drained(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(drained.len(), 1, "{drained:?}");
    assert_eq!((drained[0].moved, drained[0].closed), (1, 0));
    // The session carries on, byte-exact, at the peer.
    assert_eq!(state(&w, to), b"s");
    let h2 = w.handle(to);
    w.server(to).write(h2, b"BBBBCCCC").unwrap();
    w.client.write(b" after").unwrap();
    w.pump();
    assert_eq!(w.client_read_all().0, b"AAAABBBBCCCC");
    assert_eq!(w.server_read_all(to).0, b" after");
    // Coming back to the draining server is refused; the client goes on.
    w.client.migrate(w.now, Some(id(0))).expect("migrate");
    w.pump();
    assert!(w.client.is_established());
    assert_ne!(w.owner(), Some(0));
}

#[test]
fn a_drain_with_no_live_peer_ends_the_session_with_shutdown() {
    let mut w = balanced_world();
    let h = w.handle(0);
    w.server(0).write(h, b"partial").unwrap();
    w.pump();
    w.crash(1);
    w.crash(2);
    w.pump();
    let now = w.now;
    w.server(0)
        .drain(now, now + std::time::Duration::from_secs(30));
    w.pump();
    // No peer has reported for stale_after: the session is ended, and the
    // client fails at once with the reason (it tries no other server).
    for _ in 0..100 {
        if w.client.failure().is_some() {
            break;
        }
        let t = w.next_timeout().unwrap();
        w.advance(t - w.now);
        w.pump();
    }
    let err = w.client.failure().cloned().expect("the session ended");
    assert!(
        matches!(
            err,
            SessionError::Rejected {
                reason: RejectReason::Shutdown,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        w.now < now + std::time::Duration::from_secs(5),
        "long before the deadline"
    );
    assert_eq!(w.client_read_all_after_failure(), b"partial");
    // The next drain round sees nothing left.
    w.advance(std::time::Duration::from_millis(300));
    w.pump();
    let status = w.server(0).drain_status().unwrap();
    assert_eq!((status.moved, status.closed, status.done), (0, 1, true));
}
