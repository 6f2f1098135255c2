//! A byte queue addressed by absolute stream positions: the storage of the
//! retransmit buffer, the receive buffer and the read log.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

use crate::frame::Frame;
use crate::types::Pos;

/// Bytes `[start, end)` of a stream, kept as shared chunks so slices for
/// transmission are zero-copy. Appends of borrowed slices go to a tail
/// block (one allocation per block, not per write) whose size doubles from
/// 1 KiB to 64 KiB while the queue is in use; once every byte is dropped
/// the block is given back, so an idle queue holds nothing.
#[derive(Debug, Clone)]
pub struct ByteQueue {
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    /// Size of the next tail block.
    block: usize,
    start: Pos,
    len: u64,
}

/// The first tail block of a queue in use: a small reply fits.
const MIN_BLOCK: usize = 1024;
/// The largest tail block: a busy stream appends with few allocations.
const MAX_BLOCK: usize = 64 * 1024;

impl Default for ByteQueue {
    fn default() -> Self {
        Self {
            chunks: VecDeque::new(),
            tail: BytesMut::new(),
            block: MIN_BLOCK,
            start: 0,
            len: 0,
        }
    }
}

/// Takes the scratch buffer that frame headers are encoded into. While a
/// session sends it has room for a batch: one allocation serves many
/// transmits (the frozen headers share it until they are written). A
/// session that has nothing to send gives it back ([`idle_scratch`]), so
/// the first transmit after a pause allocates only what it encodes.
pub(crate) fn take_scratch(scratch: &mut BytesMut) -> BytesMut {
    if scratch.capacity() > 0 && scratch.capacity() - scratch.len() < 512 {
        scratch.reserve(2048);
    }
    std::mem::take(scratch)
}

/// Gives back the scratch buffer of a session with nothing to send: an idle
/// session holds no header block.
pub(crate) fn idle_scratch(scratch: &mut BytesMut) {
    if scratch.is_empty() {
        *scratch = BytesMut::new();
    }
}

/// Most Data frames one transmit carries, so one busy session does not
/// starve the others.
pub const MAX_FRAMES_PER_BATCH: usize = 16;

impl ByteQueue {
    /// An empty queue whose next byte is at `start`.
    pub fn new(start: Pos) -> Self {
        Self {
            start,
            ..Self::default()
        }
    }

    /// Position of the first byte held.
    pub fn start(&self) -> Pos {
        self.start
    }

    /// Position after the last byte held.
    pub fn end(&self) -> Pos {
        self.start + self.len
    }

    /// Number of bytes held.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no byte is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends shared bytes without copying.
    pub fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.seal();
        self.len += data.len() as u64;
        self.chunks.push_back(data);
    }

    /// Appends a copy of `data`.
    pub fn push_slice(&mut self, data: &[u8]) {
        if self.tail.capacity() - self.tail.len() < data.len() {
            self.seal();
            let size = data.len().max(self.block);
            self.tail = BytesMut::with_capacity(size);
            self.block = (size * 2).min(MAX_BLOCK);
        }
        self.tail.extend_from_slice(data);
        self.len += data.len() as u64;
    }

    fn seal(&mut self) {
        if !self.tail.is_empty() {
            self.chunks.push_back(self.tail.split().freeze());
        }
    }

    /// Drops every byte below `pos` (no-op for bytes already gone).
    pub fn drop_to(&mut self, pos: Pos) {
        let mut n = pos.saturating_sub(self.start).min(self.len);
        self.start += n;
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                self.tail.advance(n as usize);
                break;
            };
            let k = (front.len() as u64).min(n);
            front.advance(k as usize);
            n -= k;
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
        if self.len == 0 && self.tail.capacity() > 0 {
            // Idle: give the block back and start small again.
            self.tail = BytesMut::new();
            self.block = MIN_BLOCK;
        }
    }

    /// Drops every byte at or after `pos`.
    pub fn truncate(&mut self, pos: Pos) {
        let keep = pos.saturating_sub(self.start).min(self.len);
        let whole = self.slice(self.start, self.start + keep);
        let start = self.start;
        *self = Self::new(start);
        self.push(whole);
    }

    /// A zero-copy slice of at most `max` bytes starting at `pos` (shorter
    /// when it reaches a chunk boundary or the end). Empty when `pos` is not
    /// held.
    pub fn chunk_at(&mut self, pos: Pos, max: usize) -> Bytes {
        if pos < self.start || pos >= self.end() || max == 0 {
            return Bytes::new();
        }
        self.seal();
        let mut off = (pos - self.start) as usize;
        for c in &self.chunks {
            if off < c.len() {
                let n = (c.len() - off).min(max);
                return c.slice(off..off + n);
            }
            off -= c.len();
        }
        Bytes::new()
    }

    /// Bytes `[from, to)`, clipped to what is held; copies only when the
    /// range spans several chunks.
    pub fn slice(&mut self, from: Pos, to: Pos) -> Bytes {
        let from = from.max(self.start);
        let to = to.min(self.end());
        if from >= to {
            return Bytes::new();
        }
        let first = self.chunk_at(from, (to - from) as usize);
        if first.len() as u64 == to - from {
            return first;
        }
        let mut out = BytesMut::with_capacity((to - from) as usize);
        let mut pos = from;
        while pos < to {
            let c = self.chunk_at(pos, (to - pos) as usize);
            out.extend_from_slice(&c);
            pos += c.len() as u64;
        }
        out.freeze()
    }

    /// Frames the bytes `[*next, end)` as Data frames of at most
    /// `max_payload` bytes, at most [`MAX_FRAMES_PER_BATCH`] of them: the
    /// headers go through `hdr` into `out`, the payloads are zero-copy
    /// slices. Advances `*next`; returns whether bytes below `end` remain.
    pub fn frame_data(
        &mut self,
        next: &mut Pos,
        end: Pos,
        max_payload: usize,
        hdr: &mut BytesMut,
        out: &mut Vec<Bytes>,
    ) -> bool {
        for _ in 0..MAX_FRAMES_PER_BATCH {
            if *next >= end {
                break;
            }
            let chunk = self.chunk_at(*next, max_payload.min((end - *next) as usize));
            if chunk.is_empty() {
                break;
            }
            hdr.extend_from_slice(&Frame::data_header(chunk.len()));
            out.push(hdr.split().freeze());
            *next += chunk.len() as u64;
            out.push(chunk);
        }
        *next < end
    }

    /// Copies bytes starting at `pos` into `buf`; returns how many.
    pub fn copy_to(&mut self, pos: Pos, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            let c = self.chunk_at(pos + done as u64, buf.len() - done);
            if c.is_empty() {
                break;
            }
            buf[done..done + c.len()].copy_from_slice(&c);
            done += c.len();
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_slices_and_drops() {
        let mut q = ByteQueue::new(100);
        q.push(Bytes::from_static(b"hello "));
        q.push_slice(b"wor");
        q.push_slice(b"ld");
        assert_eq!((q.start(), q.end()), (100, 111));
        assert_eq!(&q.slice(104, 109)[..], b"o wor");
        assert_eq!(&q.chunk_at(100, 100)[..], b"hello ");
        q.drop_to(103);
        assert_eq!(&q.slice(0, 1000)[..], b"lo world");
        let mut buf = [0; 4];
        assert_eq!(q.copy_to(107, &mut buf), 4);
        assert_eq!(&buf, b"orld");
        q.truncate(108);
        assert_eq!(&q.slice(0, 1000)[..], b"lo wo");
        q.drop_to(500);
        assert!(q.is_empty());
        assert_eq!(q.start(), 108);
    }

    #[test]
    fn blocks_grow_while_in_use_and_are_given_back_when_idle() {
        let mut q = ByteQueue::new(0);
        q.push_slice(b"x");
        assert_eq!(
            q.tail.capacity(),
            MIN_BLOCK,
            "a small write takes a small block"
        );
        let big = vec![7u8; 5000];
        q.push_slice(&big);
        assert_eq!(q.tail.capacity(), 5000, "a big write takes what it needs");
        for _ in 0..100 {
            q.push_slice(&big);
        }
        assert!(q.chunks.iter().all(|c| c.len() <= MAX_BLOCK));
        assert_eq!(q.len(), 1 + 101 * 5000);
        assert_eq!(&q.slice(1, 5001)[..], &big[..]);
        q.drop_to(q.end());
        assert_eq!(q.tail.capacity(), 0, "an idle queue holds no block");
        q.push_slice(b"y");
        assert_eq!(q.tail.capacity(), MIN_BLOCK);
        assert_eq!(&q.slice(0, u64::MAX)[..], b"y");
    }
}
