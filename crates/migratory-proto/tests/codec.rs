//! Property and unit tests of the wire codecs (`frame`, `control`): every
//! value round-trips, an incremental decoder reassembles frames split at any
//! point, arbitrary bytes never panic a decoder (docs/architecture.md invariant 5), and
//! each kind of malformed input gets its typed error.

use std::net::{IpAddr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

use migratory_proto::control::{
    ControlMessage, LoadReport, PushOutcome, ReplicaUpdate, Selection, SessionImage, SessionRow,
    DEFAULT_MAX_CONTROL_FRAME,
};
use migratory_proto::error::DecodeError;
use migratory_proto::frame::{
    check_preamble, Frame, Migrate, MigrateRequest, PreambleCheck, RejectReason, DEFAULT_MAX_FRAME,
    PREAMBLE, VERSION,
};
use migratory_proto::types::{
    Alternate, MigrationCause, Secret, ServerId, SessionId, MAX_SERVER_ID_LEN,
};
use migratory_proto::{HEADER_LEN, MAX_ADDRS, MAX_ALTERNATES, MAX_TEXT_LEN};

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// Pushes chars while the text stays within `max` bytes.
fn take_bytes(chars: Vec<char>, max: usize) -> String {
    let mut s = String::new();
    for c in chars {
        if s.len() + c.len_utf8() > max {
            break;
        }
        s.push(c);
    }
    s
}

/// A `u64` biased towards the edges.
fn pos() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => any::<u64>(),
        1 => 0..16u64,
        1 => (u64::MAX - 16)..=u64::MAX,
    ]
}

fn server_id() -> impl Strategy<Value = ServerId> {
    prop_oneof![
        "[a-z0-9.-]{1,64}",
        vec(any::<char>(), 1..=MAX_SERVER_ID_LEN).prop_map(|c| take_bytes(c, MAX_SERVER_ID_LEN)),
    ]
    .prop_map(|s| ServerId::new(s).expect("1 to 64 bytes"))
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,40}",
        "[a-z]{1000,1024}",
        vec(any::<char>(), 0..400).prop_map(|c| take_bytes(c, MAX_TEXT_LEN)),
    ]
}

fn payload(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn session() -> impl Strategy<Value = SessionId> {
    any::<u128>().prop_map(SessionId)
}

fn secret() -> impl Strategy<Value = Secret> {
    any::<[u8; 32]>().prop_map(Secret)
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    // Through `SocketAddr::new`: the wire carries family, ip and port only
    // (no IPv6 flow info or scope id).
    (any::<IpAddr>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

fn alternates(max_alts: usize, max_addrs: usize) -> impl Strategy<Value = Vec<Alternate>> {
    vec(
        (server_id(), vec(addr(), 0..=max_addrs)).prop_map(|(id, addrs)| Alternate { id, addrs }),
        0..=max_alts,
    )
}

fn some_alternates() -> impl Strategy<Value = Vec<Alternate>> {
    prop_oneof![
        8 => alternates(4, 4),
        1 => alternates(MAX_ALTERNATES, 2),
        1 => alternates(2, MAX_ADDRS),
    ]
}

fn reason() -> impl Strategy<Value = RejectReason> {
    prop_oneof![
        Just(RejectReason::NotFound),
        Just(RejectReason::InvalidState),
        Just(RejectReason::AuthFailed),
        Just(RejectReason::Busy),
        Just(RejectReason::OriginUnreachable),
        Just(RejectReason::TlsRequired),
    ]
}

fn migrate_request() -> impl Strategy<Value = MigrateRequest> {
    (
        session(),
        server_id(),
        pos(),
        pos(),
        pos(),
        any::<bool>(),
        pos(),
        any::<bool>(),
        prop_oneof![
            Just(MigrationCause::Requested),
            Just(MigrationCause::Trigger),
            Just(MigrationCause::ServerFailed),
            Just(MigrationCause::Retry),
        ],
    )
        .prop_map(
            |(session, origin, epoch, attempt, down, down_fin, window, draining, cause)| {
                MigrateRequest {
                    session,
                    origin,
                    epoch,
                    attempt,
                    cause,
                    down,
                    down_fin,
                    draining,
                    window,
                }
            },
        )
}

fn migrate() -> impl Strategy<Value = Migrate> {
    (migrate_request(), any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(request, nonce, mac)| {
        Migrate {
            request,
            nonce,
            mac,
        }
    })
}

/// A session image that satisfies the invariants `SessionImage::read`
/// checks: no position overflows, `up_fin >= up_end`, the down data reaches
/// `down_snap` when it starts at or below it, and `down_fin` is either
/// absent or at `down_snap`.
fn image() -> impl Strategy<Value = SessionImage> {
    (
        (session(), secret(), pos()),
        (pos(), payload(64), proptest::option::of(pos())),
        (pos(), payload(64), any::<bool>(), pos(), any::<bool>()),
        payload(64),
    )
        .prop_map(
            |(
                (session, secret, epoch),
                (up_snap, up_data, up_fin),
                (down_base, down_data, snap_below, snap_raw, down_fin),
                app_state,
            )| {
                let up_snap = up_snap.min(u64::MAX - up_data.len() as u64);
                let up_end = up_snap + up_data.len() as u64;
                let up_fin = up_fin.map(|d| up_end.saturating_add(d));
                let down_base = down_base.min(u64::MAX - down_data.len() as u64);
                let down_snap = if snap_below && down_base > 0 {
                    // Below the data: the data need not reach it.
                    snap_raw % down_base
                } else {
                    down_base + snap_raw % (down_data.len() as u64 + 1)
                };
                SessionImage {
                    session,
                    secret,
                    epoch,
                    up_snap,
                    up_data,
                    up_fin,
                    down_snap,
                    down_base,
                    down_data,
                    down_fin: down_fin.then_some(down_snap),
                    app_state,
                }
            },
        )
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        pos().prop_map(|window| Frame::Hello { window }),
        (
            session(),
            secret(),
            pos(),
            server_id(),
            some_alternates(),
            pos(),
            any::<bool>()
        )
            .prop_map(
                |(session, secret, epoch, server, alternates, window, replicated)| {
                    Frame::Welcome {
                        session,
                        secret,
                        epoch,
                        server,
                        alternates,
                        window,
                        replicated,
                    }
                }
            ),
        migrate_request().prop_map(Frame::Migrate),
        any::<[u8; 32]>().prop_map(|nonce| Frame::Challenge { nonce }),
        any::<[u8; 32]>().prop_map(|mac| Frame::Proof { mac }),
        (
            pos(),
            any::<bool>(),
            pos(),
            pos(),
            server_id(),
            some_alternates(),
            pos(),
            (proptest::option::of(any::<[u8; 32]>()), any::<bool>())
        )
            .prop_map(
                |(up, up_fin, down, epoch, server, alternates, window, (rekey, replicated))| {
                    Frame::Resumed {
                        up,
                        up_fin,
                        down,
                        epoch,
                        server,
                        alternates,
                        window,
                        rekey,
                        replicated,
                    }
                }
            ),
        (reason(), text()).prop_map(|(reason, text)| Frame::Reject { reason, text }),
        payload(300).prop_map(Frame::Data),
        (pos(), pos(), any::<bool>()).prop_map(|(pos, limit, fin)| Frame::Ack { pos, limit, fin }),
        proptest::option::of(server_id()).prop_map(|dest| Frame::Trigger { dest }),
        pos().prop_map(|pos| Frame::Close { pos }),
        pos().prop_map(|nonce| Frame::Ping { nonce }),
        pos().prop_map(|nonce| Frame::Pong { nonce }),
        (pos(), pos()).prop_map(|(pos, limit)| Frame::Missing { pos, limit }),
    ]
}

fn replica_update() -> impl Strategy<Value = ReplicaUpdate> {
    prop_oneof![
        image().prop_map(|image| ReplicaUpdate::Full { image }),
        (pos(), payload(200)).prop_map(|(pos, data)| ReplicaUpdate::Up { pos, data }),
        pos().prop_map(|pos| ReplicaUpdate::UpFin { pos }),
        (
            pos(),
            pos(),
            proptest::option::of(pos()),
            payload(100),
            pos(),
            payload(100)
        )
            .prop_map(
                |(up_snap, down_snap, down_fin, app_state, down_pos, down_data)| {
                    ReplicaUpdate::Snapshot {
                        up_snap,
                        down_snap,
                        down_fin,
                        app_state,
                        down_pos,
                        down_data,
                    }
                }
            ),
        pos().prop_map(|down| ReplicaUpdate::Acked { down }),
        (pos(), pos()).prop_map(|(epoch, next)| ReplicaUpdate::Epoch { epoch, next }),
    ]
}

fn control() -> impl Strategy<Value = ControlMessage> {
    prop_oneof![
        (server_id(), any::<[u8; 32]>())
            .prop_map(|(server, nonce)| ControlMessage::PeerHello { server, nonce }),
        any::<[u8; 32]>().prop_map(|mac| ControlMessage::PeerAuth { mac }),
        (pos(), migrate()).prop_map(|(req, migrate)| ControlMessage::StateRequest { req, migrate }),
        (pos(), pos(), image()).prop_map(|(req, new_epoch, image)| ControlMessage::StateReply {
            req,
            new_epoch,
            image
        }),
        (pos(), reason(), text()).prop_map(|(req, reason, text)| ControlMessage::StateReject {
            req,
            reason,
            text
        }),
        pos().prop_map(|req| ControlMessage::StateAck { req }),
        (pos(), session(), pos(), pos()).prop_map(|(req, session, start, end)| {
            ControlMessage::GapRequest {
                req,
                session,
                start,
                end,
            }
        }),
        (session(), pos(), proptest::option::of(payload(300))).prop_map(
            |(session, start, data)| ControlMessage::GapReply {
                session,
                start,
                data
            }
        ),
        (session(), replica_update())
            .prop_map(|(session, update)| ControlMessage::Replicate { session, update }),
        (session(), pos(), pos()).prop_map(|(session, up, epoch)| ControlMessage::ReplicateAck {
            session,
            up,
            epoch
        }),
        session().prop_map(|session| ControlMessage::ReplicateResync { session }),
        session().prop_map(|session| ControlMessage::Forget { session }),
        (any::<u32>(), any::<u32>(), any::<u64>(), any::<bool>()).prop_map(
            |(sessions, capacity, bytes_per_sec, draining)| {
                ControlMessage::Load(LoadReport {
                    sessions,
                    capacity,
                    bytes_per_sec,
                    draining,
                })
            }
        ),
        (pos(), pos())
            .prop_map(|(req, deadline_ms)| ControlMessage::OperatorDrain { req, deadline_ms }),
        (pos(), pos(), pos(), pos()).prop_map(|(req, moved, closed, millis)| {
            ControlMessage::OperatorDrained {
                req,
                moved,
                closed,
                millis,
            }
        }),
        (session(), server_id())
            .prop_map(|(session, dest)| ControlMessage::TriggerRequest { session, dest }),
        pos().prop_map(|req| ControlMessage::OperatorList { req }),
        (pos(), proptest::collection::vec(session_row(), 0..5))
            .prop_map(|(req, sessions)| ControlMessage::OperatorSessions { req, sessions }),
        (pos(), server_id(), selection(), pos()).prop_map(|(req, dest, select, timeout_ms)| {
            ControlMessage::OperatorPush {
                req,
                dest,
                select,
                timeout_ms,
            }
        }),
        (
            pos(),
            proptest::collection::vec((session(), push_outcome()), 0..5)
        )
            .prop_map(|(req, results)| ControlMessage::OperatorPushed { req, results }),
        (pos(), text()).prop_map(|(req, text)| ControlMessage::OperatorError { req, text }),
    ]
}

fn session_row() -> impl Strategy<Value = SessionRow> {
    (
        session(),
        pos(),
        proptest::option::of(addr()),
        pos(),
        pos(),
        pos(),
    )
        .prop_map(|(session, epoch, client, age_ms, up, down)| SessionRow {
            session,
            epoch,
            client,
            age_ms,
            up,
            down,
        })
}

fn selection() -> impl Strategy<Value = Selection> {
    prop_oneof![
        session().prop_map(Selection::Session),
        any::<u32>().prop_map(Selection::Count),
        Just(Selection::All),
    ]
}

fn push_outcome() -> impl Strategy<Value = PushOutcome> {
    prop_oneof![
        (server_id(), pos()).prop_map(|(to, millis)| PushOutcome::Moved { to, millis }),
        Just(PushOutcome::NotFound),
        Just(PushOutcome::NotConnected),
        Just(PushOutcome::TimedOut),
        Just(PushOutcome::Ended),
    ]
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

type DecodeFn<T> = fn(&mut BytesMut, usize) -> Result<Option<T>, DecodeError>;

fn encode_frame(f: &Frame) -> BytesMut {
    let mut b = BytesMut::new();
    f.encode(&mut b);
    b
}

fn encode_control(m: &ControlMessage) -> BytesMut {
    let mut b = BytesMut::new();
    m.encode(&mut b);
    b
}

/// Checks that `wire` (one encoded value) decodes to `value`, consumes
/// exactly its bytes, has a consistent header, and that every proper prefix
/// asks for more input without consuming anything.
fn check_round_trip<T: PartialEq + std::fmt::Debug>(
    value: &T,
    wire: &[u8],
    decode: DecodeFn<T>,
    max: usize,
) -> Result<(), TestCaseError> {
    prop_assert!(wire.len() >= HEADER_LEN);
    let body_len = u32::from_be_bytes([wire[1], wire[2], wire[3], wire[4]]) as usize;
    prop_assert_eq!(body_len, wire.len() - HEADER_LEN);

    // Followed by unrelated bytes: exactly the value's bytes are consumed.
    let trailer = [0xde, 0xad, 0xbe, 0xef];
    let mut buf = BytesMut::from(wire);
    buf.put_slice(&trailer);
    let got = decode(&mut buf, max);
    prop_assert_eq!(got.as_ref().map(Option::as_ref), Ok(Some(value)));
    prop_assert_eq!(&buf[..], &trailer[..]);

    // Alone: the buffer ends empty.
    let mut buf = BytesMut::from(wire);
    let got = decode(&mut buf, max);
    prop_assert_eq!(got.as_ref().map(Option::as_ref), Ok(Some(value)));
    prop_assert!(buf.is_empty());

    // Every proper prefix: more input needed, nothing consumed.
    for cut in 0..wire.len() {
        let mut buf = BytesMut::from(&wire[..cut]);
        let got = decode(&mut buf, max);
        prop_assert_eq!(got, Ok(None), "prefix of {} bytes", cut);
        prop_assert_eq!(&buf[..], &wire[..cut]);
    }
    Ok(())
}

/// Feeds `wire` to an incremental decoder in chunks of the given sizes
/// (cycled; a zero size is a read that returned nothing, and all zeros
/// mean one byte at a time) and returns every value decoded and the bytes
/// left over.
fn feed<T>(
    wire: &[u8],
    chunks: &[usize],
    decode: DecodeFn<T>,
    max: usize,
) -> Result<(Vec<T>, BytesMut), DecodeError> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    let progress = chunks.iter().any(|&n| n > 0);
    let mut sizes = chunks.iter().copied().cycle();
    while at < wire.len() {
        let n = match sizes.next() {
            Some(n) if progress => n,
            _ => 1,
        };
        let n = n.min(wire.len() - at);
        buf.put_slice(&wire[at..at + n]);
        at += n;
        while let Some(v) = decode(&mut buf, max)? {
            out.push(v);
        }
    }
    Ok((out, buf))
}

/// Checks the outcome contract of one decode call on arbitrary input:
/// `Ok(None)` consumes nothing, `Ok(Some)` consumes a whole frame (header
/// plus announced body, within `max`) whose re-encoding is exactly the bytes
/// consumed, and errors are fine.
fn check_decode_contract<T: PartialEq + std::fmt::Debug>(
    input: &[u8],
    max: usize,
    decode: DecodeFn<T>,
    encode: fn(&T) -> BytesMut,
) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::from(input);
    match decode(&mut buf, max) {
        Ok(None) => prop_assert_eq!(&buf[..], input),
        Ok(Some(v)) => {
            let used = input.len() - buf.len();
            prop_assert!(used >= HEADER_LEN);
            prop_assert!(used - HEADER_LEN <= max);
            prop_assert_eq!(&buf[..], &input[used..]);
            // The codec is canonical: re-encoding gives the same bytes.
            let again = encode(&v);
            prop_assert_eq!(&again[..], &input[..used]);
        }
        Err(_) => {}
    }
    Ok(())
}

/// Decodes exactly one value from `wire`, expecting an error.
fn frame_err(wire: &[u8]) -> DecodeError {
    let mut buf = BytesMut::from(wire);
    Frame::decode(&mut buf, DEFAULT_MAX_FRAME).expect_err("malformed frame must be rejected")
}

fn control_err(wire: &[u8]) -> DecodeError {
    let mut buf = BytesMut::from(wire);
    ControlMessage::decode(&mut buf, DEFAULT_MAX_CONTROL_FRAME)
        .expect_err("malformed message must be rejected")
}

/// A frame of type `ty` with `body`.
fn raw(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![ty];
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn sid(s: &str) -> ServerId {
    ServerId::new(s).expect("valid server id")
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

proptest! {
    // Failing cases are saved beside this file, as
    // `codec.proptest-regressions`, and replayed first on later runs.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn frame_round_trips(f in frame()) {
        let wire = encode_frame(&f);
        check_round_trip(&f, &wire, Frame::decode, DEFAULT_MAX_FRAME)?;
        // The smallest max that admits the frame admits it.
        check_round_trip(&f, &wire, Frame::decode, wire.len() - HEADER_LEN)?;
        if let Frame::Data(payload) = &f {
            prop_assert_eq!(&Frame::data_header(payload.len())[..], &wire[..HEADER_LEN]);
        }
    }

    #[test]
    fn control_round_trips(m in control()) {
        let wire = encode_control(&m);
        check_round_trip(&m, &wire, ControlMessage::decode, DEFAULT_MAX_CONTROL_FRAME)?;
        check_round_trip(&m, &wire, ControlMessage::decode, wire.len() - HEADER_LEN)?;
    }

    #[test]
    fn frame_over_max_is_too_large(f in frame()) {
        let wire = encode_frame(&f);
        let body = wire.len() - HEADER_LEN;
        prop_assume!(body > 0);
        let mut buf = wire.clone();
        prop_assert_eq!(
            Frame::decode(&mut buf, body - 1),
            Err(DecodeError::TooLarge { len: body, max: body - 1 })
        );
    }

    #[test]
    fn frames_split_anywhere(
        frames in vec(frame(), 1..8),
        chunks in vec(0..64usize, 1..16),
    ) {
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        let (out, rest) = feed(&wire, &chunks, Frame::decode, DEFAULT_MAX_FRAME)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(out, frames);
        prop_assert!(rest.is_empty());
    }

    #[test]
    fn control_split_anywhere(
        msgs in vec(control(), 1..6),
        chunks in vec(0..128usize, 1..16),
    ) {
        let mut wire = BytesMut::new();
        for m in &msgs {
            m.encode(&mut wire);
        }
        let (out, rest) = feed(&wire, &chunks, ControlMessage::decode, DEFAULT_MAX_CONTROL_FRAME)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(out, msgs);
        prop_assert!(rest.is_empty());
    }

    #[test]
    fn random_bytes_never_panic(
        input in vec(any::<u8>(), 0..256),
        max in prop_oneof![0..64usize, Just(DEFAULT_MAX_FRAME)],
    ) {
        check_decode_contract(&input, max, Frame::decode, encode_frame)?;
        check_decode_contract(&input, max, ControlMessage::decode, encode_control)?;
        // Mostly known types too: a type byte from each codec's range.
        let mut typed = input.clone();
        if let Some(first) = typed.first_mut() {
            *first %= 0x10;
        }
        check_decode_contract(&typed, max, Frame::decode, encode_frame)?;
        if let Some(first) = typed.first_mut() {
            *first |= 0x40;
        }
        check_decode_contract(&typed, max, ControlMessage::decode, encode_control)?;
    }

    #[test]
    fn mutated_frames_never_panic(
        f in frame(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut wire = encode_frame(&f).to_vec();
        for (at, byte) in &flips {
            let i = at.index(wire.len());
            // Keep the length field mostly sane so bodies get parsed.
            if !(1..HEADER_LEN).contains(&i) {
                wire[i] ^= byte;
            }
        }
        check_decode_contract(&wire, DEFAULT_MAX_FRAME, Frame::decode, encode_frame)?;
        let cut = cut.index(wire.len() + 1);
        check_decode_contract(&wire[..cut], DEFAULT_MAX_FRAME, Frame::decode, encode_frame)?;
    }

    #[test]
    fn mutated_control_never_panics(
        m in control(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut wire = encode_control(&m).to_vec();
        for (at, byte) in &flips {
            let i = at.index(wire.len());
            if !(1..HEADER_LEN).contains(&i) {
                wire[i] ^= byte;
            }
        }
        let max = DEFAULT_MAX_CONTROL_FRAME;
        check_decode_contract(&wire, max, ControlMessage::decode, encode_control)?;
        let cut = cut.index(wire.len() + 1);
        check_decode_contract(&wire[..cut], max, ControlMessage::decode, encode_control)?;
    }

    #[test]
    fn preamble_never_panics(input in prop_oneof![
        vec(any::<u8>(), 0..16),
        (0..=PREAMBLE.len(), vec(any::<u8>(), 0..8)).prop_map(|(n, tail)| {
            let mut v = PREAMBLE[..n].to_vec();
            v.extend(tail);
            v
        }),
    ]) {
        let magic = input.len().min(6);
        let expected = if input[..magic] != PREAMBLE[..magic] {
            Err(DecodeError::NotMigratory)
        } else if input.len() < PREAMBLE.len() {
            Ok(PreambleCheck::NeedMore)
        } else {
            match u16::from_be_bytes([input[6], input[7]]) {
                VERSION => Ok(PreambleCheck::Migratory),
                v => Err(DecodeError::UnsupportedVersion(v)),
            }
        };
        prop_assert_eq!(check_preamble(&input), expected);
    }
}

// ---------------------------------------------------------------------------
// Typed errors
// ---------------------------------------------------------------------------

#[test]
fn unknown_type() {
    assert_eq!(frame_err(&[0x00]), DecodeError::UnknownType(0x00));
    assert_eq!(frame_err(&raw(0x0f, &[])), DecodeError::UnknownType(0x0f));
    assert_eq!(
        frame_err(&raw(0xff, &[1, 2])),
        DecodeError::UnknownType(0xff)
    );
    // The two codecs have separate type spaces.
    assert_eq!(frame_err(&raw(0x41, &[])), DecodeError::UnknownType(0x41));
    assert_eq!(control_err(&[0x01]), DecodeError::UnknownType(0x01));
    assert_eq!(control_err(&raw(0x56, &[])), DecodeError::UnknownType(0x56));
    // An unknown type is reported before the header is complete.
    let mut one = BytesMut::from(&[0x07u8][..]);
    assert_eq!(Frame::decode(&mut one, DEFAULT_MAX_FRAME), Ok(None));
    assert_eq!(&one[..], &[0x07]);
}

#[test]
fn too_large() {
    // Reported from the header alone, before the body arrives.
    let mut buf = BytesMut::from(&[0x06, 0, 0, 0x01, 0x01][..]);
    assert_eq!(
        Frame::decode(&mut buf, 256),
        Err(DecodeError::TooLarge { len: 257, max: 256 })
    );
    let mut buf = BytesMut::from(&[0x06, 0xff, 0xff, 0xff, 0xff][..]);
    assert_eq!(
        Frame::decode(&mut buf, DEFAULT_MAX_FRAME),
        Err(DecodeError::TooLarge {
            len: u32::MAX as usize,
            max: DEFAULT_MAX_FRAME
        })
    );
    let mut buf = BytesMut::from(&raw(0x4b, &[0; 4])[..]);
    assert_eq!(
        ControlMessage::decode(&mut buf, 3),
        Err(DecodeError::TooLarge { len: 4, max: 3 })
    );
    // Exactly the maximum is fine.
    let mut buf = BytesMut::from(&raw(0x06, &[7; 256])[..]);
    assert_eq!(
        Frame::decode(&mut buf, 256),
        Ok(Some(Frame::Data(Bytes::from(vec![7; 256]))))
    );
}

#[test]
fn truncated() {
    assert_eq!(
        frame_err(&raw(0x01, &[0; 7])),
        DecodeError::Truncated { frame: "Hello" }
    );
    assert_eq!(
        frame_err(&raw(0x07, &[0; 16])),
        DecodeError::Truncated { frame: "Ack" }
    );
    // A length field pointing past the end of the body.
    assert_eq!(
        frame_err(&raw(0x05, &[1, 0, 5, b'a', b'b'])),
        DecodeError::Truncated { frame: "Reject" }
    );
    assert_eq!(
        frame_err(&raw(0x08, &[1, 3, b'a'])),
        DecodeError::Truncated { frame: "Trigger" }
    );
    assert_eq!(
        frame_err(&raw(0x0c, &[0; 31])),
        DecodeError::Truncated { frame: "Challenge" }
    );
    assert_eq!(
        control_err(&raw(0x42, &[0; 31])),
        DecodeError::Truncated { frame: "PeerAuth" }
    );
    let mut body = vec![0; 16];
    body.push(2); // Up
    body.extend_from_slice(&5u64.to_be_bytes());
    body.extend_from_slice(&10u32.to_be_bytes());
    body.extend_from_slice(&[1; 9]);
    assert_eq!(
        control_err(&raw(0x47, &body)),
        DecodeError::Truncated { frame: "Replicate" }
    );
}

#[test]
fn trailing_bytes() {
    assert_eq!(
        frame_err(&raw(0x01, &[0; 9])),
        DecodeError::TrailingBytes {
            frame: "Hello",
            extra: 1
        }
    );
    assert_eq!(
        frame_err(&raw(0x08, &[0, 0, 0])),
        DecodeError::TrailingBytes {
            frame: "Trigger",
            extra: 2
        }
    );
    assert_eq!(
        control_err(&raw(0x4b, &[0; 18])),
        DecodeError::TrailingBytes {
            frame: "Load",
            extra: 1
        }
    );
}

#[test]
fn bad_boolean() {
    let mut body = vec![0; 16];
    body.push(2);
    assert!(matches!(
        frame_err(&raw(0x07, &body)),
        DecodeError::Invalid {
            frame: "Ack",
            field: "fin",
            ..
        }
    ));
    assert!(matches!(
        frame_err(&raw(0x08, &[0xff])),
        DecodeError::Invalid {
            frame: "Trigger",
            field: "dest",
            ..
        }
    ));
    let mut body = 1u64.to_be_bytes().to_vec();
    body.push(7);
    assert!(matches!(
        frame_err(&raw(0x04, &body)),
        DecodeError::Invalid {
            frame: "Resumed",
            field: "up_fin",
            ..
        }
    ));
}

#[test]
fn bad_reject_reason() {
    for code in [0u8, 8, 0xff] {
        assert!(matches!(
            frame_err(&raw(0x05, &[code, 0, 0])),
            DecodeError::Invalid {
                frame: "Reject",
                field: "reason",
                ..
            }
        ));
        let mut body = 9u64.to_be_bytes().to_vec();
        body.extend_from_slice(&[code, 0, 0]);
        assert!(matches!(
            control_err(&raw(0x45, &body)),
            DecodeError::Invalid {
                frame: "StateReject",
                field: "reason",
                ..
            }
        ));
    }
}

/// A Welcome body listing one alternate `"b"` with one address whose family
/// byte is `family` (followed by an IPv4 address and a port).
fn welcome_with_family(family: u8) -> Vec<u8> {
    let mut body = vec![0; 16 + 32 + 8]; // session, secret, epoch
    body.extend_from_slice(&[1, b'a']); // server
    body.push(1); // one alternate
    body.extend_from_slice(&[1, b'b']);
    body.push(1); // one address
    body.push(family);
    body.extend_from_slice(&[127, 0, 0, 1, 0x1f, 0x90]);
    body.extend_from_slice(&[0; 8]); // window
    body.push(0); // replicated
    raw(0x02, &body)
}

#[test]
fn bad_address_family() {
    // The hand-built frame is well formed with family 4 ...
    let mut ok = BytesMut::from(&welcome_with_family(4)[..]);
    let Ok(Some(Frame::Welcome { alternates, .. })) = Frame::decode(&mut ok, DEFAULT_MAX_FRAME)
    else {
        panic!("valid Welcome expected");
    };
    assert_eq!(alternates[0].addrs, vec!["127.0.0.1:8080".parse().unwrap()]);
    // ... and refused with any other.
    for family in [0u8, 5, 46, 0xff] {
        assert!(matches!(
            frame_err(&welcome_with_family(family)),
            DecodeError::Invalid {
                frame: "Welcome",
                field: "addr",
                ..
            }
        ));
    }
}

#[test]
fn invalid_server_id() {
    // Not UTF-8.
    for bad in [&[0xffu8][..], &[b'a', 0xc3], &[0xed, 0xa0, 0x80]] {
        let mut body = vec![1, bad.len() as u8];
        body.extend_from_slice(bad);
        assert!(matches!(
            frame_err(&raw(0x08, &body)),
            DecodeError::Invalid {
                frame: "Trigger",
                field: "dest",
                ..
            }
        ));
        let mut body = vec![bad.len() as u8];
        body.extend_from_slice(bad);
        body.extend_from_slice(&[0; 32]);
        assert!(matches!(
            control_err(&raw(0x41, &body)),
            DecodeError::Invalid {
                frame: "PeerHello",
                field: "server",
                ..
            }
        ));
    }
    // Empty or longer than 64 bytes.
    assert!(matches!(
        frame_err(&raw(0x08, &[1, 0])),
        DecodeError::Invalid {
            frame: "Trigger",
            field: "dest",
            ..
        }
    ));
    let mut body = vec![1, 65];
    body.extend_from_slice(&[b'x'; 65]);
    assert!(matches!(
        frame_err(&raw(0x08, &body)),
        DecodeError::Invalid {
            frame: "Trigger",
            field: "dest",
            ..
        }
    ));
}

#[test]
fn text_and_list_limits() {
    // Reject text: 1025 bytes is refused even when present.
    let mut body = vec![1];
    body.extend_from_slice(&1025u16.to_be_bytes());
    body.extend_from_slice(&[b'x'; 1025]);
    assert!(matches!(
        frame_err(&raw(0x05, &body)),
        DecodeError::Invalid {
            frame: "Reject",
            field: "text",
            ..
        }
    ));
    // Invalid UTF-8 text.
    assert!(matches!(
        frame_err(&raw(0x05, &[1, 0, 1, 0x80])),
        DecodeError::Invalid {
            frame: "Reject",
            field: "text",
            ..
        }
    ));
    // 65 alternates, 17 addresses.
    let mut body = welcome_with_family(4)[HEADER_LEN..].to_vec();
    body[16 + 32 + 8 + 2] = 65;
    assert!(matches!(
        frame_err(&raw(0x02, &body)),
        DecodeError::Invalid {
            frame: "Welcome",
            field: "alternates",
            ..
        }
    ));
    let mut body = welcome_with_family(4)[HEADER_LEN..].to_vec();
    body[16 + 32 + 8 + 2 + 3] = 17;
    assert!(matches!(
        frame_err(&raw(0x02, &body)),
        DecodeError::Invalid {
            frame: "Welcome",
            field: "alternates",
            ..
        }
    ));
}

#[test]
fn limits_round_trip_at_the_maximum() {
    let id = "é".repeat(32); // 64 bytes
    let alternates: Vec<Alternate> = (0..MAX_ALTERNATES)
        .map(|i| Alternate {
            id: sid(&format!("{i:0>64}")),
            addrs: (0..MAX_ADDRS as u16)
                .map(|p| SocketAddr::from(([0xfe80, 0, 0, 0, 0, 0, 0, p], p)))
                .collect(),
        })
        .collect();
    let f = Frame::Resumed {
        up: u64::MAX,
        up_fin: true,
        down: 0,
        epoch: u64::MAX,
        server: sid(&id),
        alternates,
        window: u64::MAX,
        rekey: Some([0xff; 32]),
        replicated: true,
    };
    let mut wire = encode_frame(&f);
    assert_eq!(Frame::decode(&mut wire, DEFAULT_MAX_FRAME), Ok(Some(f)));
    assert!(wire.is_empty());
    let f = Frame::Reject {
        reason: RejectReason::Busy,
        text: "z".repeat(MAX_TEXT_LEN),
    };
    let mut wire = encode_frame(&f);
    assert_eq!(Frame::decode(&mut wire, DEFAULT_MAX_FRAME), Ok(Some(f)));
}

#[test]
fn encoder_clamps_to_limits() {
    // Text beyond the limit is cut on a char boundary, lists beyond theirs
    // are cut to their first entries: the result always decodes.
    let text = "€".repeat(500); // 1500 bytes, 3 per char
    let mut wire = encode_frame(&Frame::Reject {
        reason: RejectReason::NotFound,
        text,
    });
    let Ok(Some(Frame::Reject { text, .. })) = Frame::decode(&mut wire, DEFAULT_MAX_FRAME) else {
        panic!("clamped Reject must decode");
    };
    assert_eq!(text, "€".repeat(MAX_TEXT_LEN / 3));
    let alt = Alternate {
        id: sid("b"),
        addrs: vec!["10.0.0.1:1".parse().unwrap(); MAX_ADDRS + 3],
    };
    let mut wire = encode_frame(&Frame::Welcome {
        session: SessionId(1),
        secret: Secret([0; 32]),
        epoch: 1,
        server: sid("a"),
        alternates: vec![alt; MAX_ALTERNATES + 5],
        window: 1,
        replicated: false,
    });
    let Ok(Some(Frame::Welcome { alternates, .. })) = Frame::decode(&mut wire, DEFAULT_MAX_FRAME)
    else {
        panic!("clamped Welcome must decode");
    };
    assert_eq!(alternates.len(), MAX_ALTERNATES);
    assert!(alternates.iter().all(|a| a.addrs.len() == MAX_ADDRS));
}

#[test]
fn unknown_replication_step() {
    for step in [0u8, 7, 0xff] {
        let mut body = vec![0; 16];
        body.push(step);
        assert!(matches!(
            control_err(&raw(0x47, &body)),
            DecodeError::Invalid {
                frame: "Replicate",
                field: "update",
                ..
            }
        ));
    }
}

fn valid_image() -> SessionImage {
    SessionImage {
        session: SessionId(7),
        secret: Secret([9; 32]),
        epoch: 3,
        up_snap: 100,
        up_data: Bytes::from_static(b"0123456789"),
        up_fin: Some(110),
        down_snap: 205,
        down_base: 200,
        down_data: Bytes::from_static(b"abcdefgh"),
        down_fin: Some(205),
        app_state: Bytes::from_static(b"state"),
    }
}

fn reply_err(image: SessionImage) -> DecodeError {
    control_err(&encode_control(&ControlMessage::StateReply {
        req: 1,
        new_epoch: 4,
        image,
    }))
}

#[test]
fn session_image_invariants() {
    let ok = ControlMessage::StateReply {
        req: 1,
        new_epoch: 4,
        image: valid_image(),
    };
    let mut wire = encode_control(&ok);
    assert_eq!(
        ControlMessage::decode(&mut wire, DEFAULT_MAX_CONTROL_FRAME),
        Ok(Some(ok))
    );
    let field = |e: DecodeError| match e {
        DecodeError::Invalid {
            frame: "StateReply",
            field,
            ..
        } => field,
        other => panic!("unexpected error {other:?}"),
    };
    // The client's Close before the end of the up data.
    let img = SessionImage {
        up_fin: Some(109),
        ..valid_image()
    };
    assert_eq!(field(reply_err(img)), "up_fin");
    // Down data starting below the snapshot but not reaching it.
    let img = SessionImage {
        down_snap: 209,
        down_fin: None,
        ..valid_image()
    };
    assert_eq!(field(reply_err(img)), "down_data");
    // A Close in the snapshot elsewhere than at its position.
    let img = SessionImage {
        down_fin: Some(206),
        ..valid_image()
    };
    assert_eq!(field(reply_err(img)), "down_fin");
    // Positions that overflow.
    let img = SessionImage {
        up_snap: u64::MAX - 5,
        up_fin: None,
        ..valid_image()
    };
    assert_eq!(field(reply_err(img)), "positions");
    let img = SessionImage {
        down_base: u64::MAX - 1,
        down_snap: 0,
        down_fin: None,
        ..valid_image()
    };
    assert_eq!(field(reply_err(img)), "positions");
    // Data starting above the snapshot is allowed, and so is data ending
    // exactly at it.
    for (base, snap) in [(300, 205), (197, 205)] {
        let img = SessionImage {
            down_base: base,
            down_snap: snap,
            down_fin: None,
            ..valid_image()
        };
        let msg = ControlMessage::Replicate {
            session: SessionId(7),
            update: ReplicaUpdate::Full { image: img },
        };
        let mut wire = encode_control(&msg);
        assert_eq!(
            ControlMessage::decode(&mut wire, DEFAULT_MAX_CONTROL_FRAME),
            Ok(Some(msg))
        );
    }
}

#[test]
fn preamble() {
    assert_eq!(check_preamble(&PREAMBLE), Ok(PreambleCheck::Migratory));
    assert_eq!(check_preamble(b""), Ok(PreambleCheck::NeedMore));
    assert_eq!(check_preamble(b"MIG"), Ok(PreambleCheck::NeedMore));
    assert_eq!(check_preamble(b"MIGR\r\n\0"), Ok(PreambleCheck::NeedMore));
    let mut more = PREAMBLE.to_vec();
    more.extend_from_slice(&raw(0x01, &[0; 8]));
    assert_eq!(check_preamble(&more), Ok(PreambleCheck::Migratory));
    // Plain TCP clients.
    assert_eq!(check_preamble(b"G"), Err(DecodeError::NotMigratory));
    assert_eq!(
        check_preamble(b"GET / HTTP/1.1\r\n"),
        Err(DecodeError::NotMigratory)
    );
    assert_eq!(check_preamble(b"MIGX"), Err(DecodeError::NotMigratory));
    assert_eq!(
        check_preamble(b"MIGR\n\r\0\x01"),
        Err(DecodeError::NotMigratory)
    );
    // Other versions (1: before the Migrate carried its cause; 2: before
    // Resumed carried the rekey; 3: before a Resumed could start beyond
    // what the client holds, with Missing).
    assert_eq!(
        check_preamble(b"MIGR\r\n\0\x01"),
        Err(DecodeError::UnsupportedVersion(1))
    );
    assert_eq!(
        check_preamble(b"MIGR\r\n\0\x02"),
        Err(DecodeError::UnsupportedVersion(2))
    );
    assert_eq!(
        check_preamble(b"MIGR\r\n\0\x03"),
        Err(DecodeError::UnsupportedVersion(3))
    );
    assert_eq!(
        check_preamble(b"MIGR\r\n\0\x05"),
        Err(DecodeError::UnsupportedVersion(5))
    );
    assert_eq!(
        check_preamble(b"MIGR\r\n\x01\x00"),
        Err(DecodeError::UnsupportedVersion(256))
    );
    assert_eq!(
        check_preamble(b"MIGR\r\n\0\0"),
        Err(DecodeError::UnsupportedVersion(0))
    );
}

#[test]
fn data_is_zero_copy_and_empty_frames_work() {
    let mut wire = BytesMut::new();
    Frame::Data(Bytes::new()).encode(&mut wire);
    Frame::Data(Bytes::from_static(b"hello")).encode(&mut wire);
    assert_eq!(
        Frame::decode(&mut wire, 0),
        Ok(Some(Frame::Data(Bytes::new())))
    );
    assert_eq!(
        Frame::decode(&mut wire, DEFAULT_MAX_FRAME),
        Ok(Some(Frame::Data(Bytes::from_static(b"hello"))))
    );
    assert_eq!(Frame::decode(&mut wire, DEFAULT_MAX_FRAME), Ok(None));
}

#[test]
fn documented_limits() {
    // Part of the wire format: peers built from other versions rely on them.
    assert_eq!(HEADER_LEN, 5);
    assert_eq!(MAX_SERVER_ID_LEN, 64);
    assert_eq!(MAX_ALTERNATES, 64);
    assert_eq!(MAX_ADDRS, 16);
    assert_eq!(MAX_TEXT_LEN, 1024);
}
