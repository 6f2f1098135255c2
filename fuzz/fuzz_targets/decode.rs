//! Fuzz target `decode`: arbitrary bytes into the frame or control-message
//! decoder; every value decoded must re-encode to the bytes it came from and
//! decode back to itself.
//!
//! Input layout: the first byte selects the codec (bit 0: 0 = incarnation
//! frames, 1 = control messages) and the maximum frame body (bits 1-2: the
//! codec's default, 1 KiB, 64 KiB, or bits 3-7 as a tiny maximum of 0 to 31
//! bytes); the rest is the byte stream, which also goes through
//! `check_preamble`.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use migratory_proto::control::{ControlMessage, DEFAULT_MAX_CONTROL_FRAME};
use migratory_proto::error::DecodeError;
use migratory_proto::frame::{check_preamble, Frame, PreambleCheck, DEFAULT_MAX_FRAME, PREAMBLE};

/// Decodes values from `stream` until more input is needed or an error, and
/// checks each one round-trips.
fn run<T: PartialEq + std::fmt::Debug>(
    stream: &[u8],
    max: usize,
    decode: fn(&mut BytesMut, usize) -> Result<Option<T>, DecodeError>,
    encode: fn(&T, &mut BytesMut),
) {
    let mut src = BytesMut::from(stream);
    loop {
        let before = src.clone();
        match decode(&mut src, max) {
            Ok(Some(value)) => {
                let used = before.len() - src.len();
                assert!(used >= 5, "a frame is at least its header");
                assert!(used - 5 <= max, "decoded a frame over the maximum");
                let mut again = BytesMut::new();
                encode(&value, &mut again);
                assert_eq!(
                    &again[..],
                    &before[..used],
                    "re-encoding differs from the input"
                );
                let mut wire = again.clone();
                let back = decode(&mut wire, max);
                assert_eq!(back.as_ref(), Ok(&Some(value)), "round trip mismatch");
                assert!(wire.is_empty(), "round trip left bytes behind");
            }
            Ok(None) => {
                assert_eq!(src, before, "Ok(None) consumed input");
                return;
            }
            Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, stream)) = data.split_first() else {
        return;
    };
    // The preamble check sees the same bytes (it must not panic either).
    if check_preamble(stream) == Ok(PreambleCheck::Migratory) {
        assert!(stream.starts_with(&PREAMBLE));
    }
    let control = sel & 1 == 1;
    let max = match (sel >> 1) & 3 {
        0 if control => DEFAULT_MAX_CONTROL_FRAME,
        0 => DEFAULT_MAX_FRAME,
        1 => 1024,
        2 => 64 * 1024,
        _ => usize::from(sel >> 3),
    };
    if control {
        run(stream, max, ControlMessage::decode, ControlMessage::encode);
    } else {
        run(stream, max, Frame::decode, Frame::encode);
    }
});
