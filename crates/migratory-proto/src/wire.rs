//! Low-level wire helpers shared by the frame and control-message codecs:
//! the length-prefixed header, a bounds-checked body reader and writers.
//!
//! Every frame is `type: u8, len: u32 (big endian), body: [u8; len]`.
//! Decoding is "parse, don't validate": a body is parsed into typed fields
//! and every malformed input becomes a [`DecodeError`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::types::{Alternate, Secret, ServerId, SessionId, MAX_SERVER_ID_LEN, SECRET_LEN};

/// Bytes of the frame header: type (1) and body length (4).
pub const HEADER_LEN: usize = 5;

/// Most alternates one frame may list.
pub const MAX_ALTERNATES: usize = 64;

/// Most addresses one alternate may list.
pub const MAX_ADDRS: usize = 16;

/// Longest human-readable text (reject reasons) in bytes.
pub const MAX_TEXT_LEN: usize = 1024;

/// Splits one whole frame off `src`: `Ok(None)` when more input is needed
/// (nothing consumed), else the type byte and the body.
pub(crate) fn split_frame(
    src: &mut BytesMut,
    max_body: usize,
    known: impl Fn(u8) -> bool,
) -> Result<Option<(u8, Bytes)>, DecodeError> {
    if src.is_empty() {
        return Ok(None);
    }
    let ty = src[0];
    if !known(ty) {
        return Err(DecodeError::UnknownType(ty));
    }
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]) as usize;
    if len > max_body {
        return Err(DecodeError::TooLarge { len, max: max_body });
    }
    if src.len() < HEADER_LEN + len {
        // The reader makes room as bytes arrive ([`bytes_missing`] says how
        // much the frame lacks): memory grows with bytes that actually
        // arrive, not with what a header claims.
        return Ok(None);
    }
    src.advance(HEADER_LEN);
    Ok(Some((ty, src.split_to(len).freeze())))
}

/// How many bytes the first frame in `src` lacks to be whole: 0 when it
/// is whole or `src` is empty, the rest of the header when only part of
/// one is there. Readers size their next read with it.
pub fn bytes_missing(src: &[u8]) -> usize {
    if src.is_empty() {
        return 0;
    }
    if src.len() < HEADER_LEN {
        return HEADER_LEN - src.len();
    }
    let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]) as usize;
    (HEADER_LEN + len).saturating_sub(src.len())
}

/// Writes a header for a body of `len` bytes.
pub(crate) fn put_header(dst: &mut BytesMut, ty: u8, len: usize) {
    dst.reserve(HEADER_LEN + len);
    dst.put_u8(ty);
    dst.put_u32(u32::try_from(len).expect("frame bodies are bounded far below 4 GiB"));
}

/// Encodes a body with `body` into a frame of type `ty` (length patched in).
pub(crate) fn put_frame(dst: &mut BytesMut, ty: u8, body: impl FnOnce(&mut BytesMut)) {
    let start = dst.len();
    put_header(dst, ty, 0);
    body(dst);
    let len = u32::try_from(dst.len() - start - HEADER_LEN).expect("frame bodies are bounded");
    dst[start + 1..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

/// Bounds-checked reader over one frame body.
pub(crate) struct Reader {
    body: Bytes,
    frame: &'static str,
}

impl Reader {
    pub(crate) fn new(body: Bytes, frame: &'static str) -> Self {
        Self { body, frame }
    }

    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.body.remaining() < n {
            return Err(DecodeError::Truncated { frame: self.frame });
        }
        Ok(())
    }

    pub(crate) fn invalid(&self, field: &'static str, what: &'static str) -> DecodeError {
        DecodeError::Invalid {
            frame: self.frame,
            field,
            what,
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.body.get_u8())
    }

    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.invalid(field, "boolean other than 0 or 1")),
        }
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.body.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.body.get_u32())
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.body.get_u64())
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.need(N)?;
        let mut out = [0; N];
        self.body.copy_to_slice(&mut out);
        Ok(out)
    }

    pub(crate) fn session(&mut self) -> Result<SessionId, DecodeError> {
        self.need(16)?;
        Ok(SessionId(self.body.get_u128()))
    }

    pub(crate) fn secret(&mut self) -> Result<Secret, DecodeError> {
        Ok(Secret(self.array::<SECRET_LEN>()?))
    }

    /// `u32` length then that many bytes (zero-copy).
    pub(crate) fn bytes(&mut self, field: &'static str, max: usize) -> Result<Bytes, DecodeError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(self.invalid(field, "longer than allowed"));
        }
        self.need(len)?;
        Ok(self.body.split_to(len))
    }

    /// `u16` length then UTF-8 text.
    pub(crate) fn text(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        if len > max {
            return Err(self.invalid(field, "longer than allowed"));
        }
        self.need(len)?;
        let raw = self.body.split_to(len);
        String::from_utf8(raw.to_vec()).map_err(|_| self.invalid(field, "not UTF-8"))
    }

    pub(crate) fn server_id(&mut self, field: &'static str) -> Result<ServerId, DecodeError> {
        let len = self.u8()? as usize;
        if len == 0 || len > MAX_SERVER_ID_LEN {
            return Err(self.invalid(field, "server id must be 1 to 64 bytes"));
        }
        self.need(len)?;
        let raw = self.body.split_to(len);
        let name = String::from_utf8(raw.to_vec()).map_err(|_| self.invalid(field, "not UTF-8"))?;
        ServerId::new(name).ok_or_else(|| self.invalid(field, "bad server id"))
    }

    pub(crate) fn opt_server_id(
        &mut self,
        field: &'static str,
    ) -> Result<Option<ServerId>, DecodeError> {
        if self.bool(field)? {
            Ok(Some(self.server_id(field)?))
        } else {
            Ok(None)
        }
    }

    pub(crate) fn opt_pos(&mut self, field: &'static str) -> Result<Option<u64>, DecodeError> {
        if self.bool(field)? {
            Ok(Some(self.u64()?))
        } else {
            Ok(None)
        }
    }

    pub(crate) fn addr(&mut self) -> Result<SocketAddr, DecodeError> {
        let ip = match self.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            _ => return Err(self.invalid("addr", "address family other than 4 or 6")),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }

    pub(crate) fn alternates(&mut self) -> Result<Vec<Alternate>, DecodeError> {
        let n = self.u8()? as usize;
        if n > MAX_ALTERNATES {
            return Err(self.invalid("alternates", "too many alternates"));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let id = self.server_id("alternates")?;
            let m = self.u8()? as usize;
            if m > MAX_ADDRS {
                return Err(self.invalid("alternates", "too many addresses"));
            }
            let addrs = (0..m).map(|_| self.addr()).collect::<Result<_, _>>()?;
            out.push(Alternate { id, addrs });
        }
        Ok(out)
    }

    /// Everything left (zero-copy).
    pub(crate) fn rest(&mut self) -> Bytes {
        self.body.split_to(self.body.len())
    }

    /// Fails unless the whole body was consumed.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.body.has_remaining() {
            return Err(DecodeError::TrailingBytes {
                frame: self.frame,
                extra: self.body.remaining(),
            });
        }
        Ok(())
    }
}

/// Encoders matching [`Reader`]; callers keep values within the limits the
/// reader enforces.
pub(crate) trait PutExt: BufMut {
    fn put_bool(&mut self, v: bool) {
        self.put_u8(u8::from(v));
    }

    fn put_session(&mut self, s: SessionId) {
        self.put_u128(s.0);
    }

    fn put_bytes_u32(&mut self, b: &[u8]) {
        self.put_u32(u32::try_from(b.len()).expect("bounded by frame limits"));
        self.put_slice(b);
    }

    fn put_text(&mut self, s: &str) {
        let s = truncate_utf8(s, MAX_TEXT_LEN);
        self.put_u16(s.len() as u16);
        self.put_slice(s.as_bytes());
    }

    fn put_server_id(&mut self, id: &ServerId) {
        self.put_u8(id.as_str().len() as u8);
        self.put_slice(id.as_str().as_bytes());
    }

    fn put_opt_server_id(&mut self, id: Option<&ServerId>) {
        self.put_bool(id.is_some());
        if let Some(id) = id {
            self.put_server_id(id);
        }
    }

    fn put_opt_pos(&mut self, p: Option<u64>) {
        self.put_bool(p.is_some());
        if let Some(p) = p {
            self.put_u64(p);
        }
    }

    fn put_addr(&mut self, a: &SocketAddr) {
        match a.ip() {
            IpAddr::V4(ip) => {
                self.put_u8(4);
                self.put_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                self.put_u8(6);
                self.put_slice(&ip.octets());
            }
        }
        self.put_u16(a.port());
    }

    fn put_alternates(&mut self, alts: &[Alternate]) {
        let alts = &alts[..alts.len().min(MAX_ALTERNATES)];
        self.put_u8(alts.len() as u8);
        for alt in alts {
            self.put_server_id(&alt.id);
            let addrs = &alt.addrs[..alt.addrs.len().min(MAX_ADDRS)];
            self.put_u8(addrs.len() as u8);
            for a in addrs {
                self.put_addr(a);
            }
        }
    }
}

impl<B: BufMut> PutExt for B {}

/// The longest prefix of `s` of at most `max` bytes that ends on a char
/// boundary.
pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_missing_counts_what_the_first_frame_lacks() {
        let mut frame = BytesMut::new();
        put_header(&mut frame, 7, 10);
        frame.put_slice(&[1; 10]);
        assert_eq!(bytes_missing(&[]), 0);
        assert_eq!(bytes_missing(&frame[..2]), HEADER_LEN - 2);
        assert_eq!(bytes_missing(&frame[..HEADER_LEN]), 10);
        assert_eq!(bytes_missing(&frame[..HEADER_LEN + 4]), 6);
        assert_eq!(bytes_missing(&frame), 0);
        frame.put_u8(7);
        assert_eq!(bytes_missing(&frame), 0, "only the first frame counts");
        // A header that announces 4 GiB asks for it; readers bound their
        // reads, so memory follows what arrives.
        assert_eq!(bytes_missing(&[7, 255, 255, 255, 255]), u32::MAX as usize);
    }
}
