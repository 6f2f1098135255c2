//! A byte queue addressed by absolute stream positions: the storage of the
//! retransmit buffer, the receive buffer and the read log.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

use crate::frame::Frame;
use crate::types::Pos;

/// Bytes `[start, end)` of a stream, kept as shared chunks so slices for
/// transmission are zero-copy. Appends of borrowed slices go to a tail
/// block (one allocation per block, not per write) whose size doubles from
/// 1 KiB to 64 KiB ([`BLOCK`]) while the queue is in use; a full-size
/// block goes back to the process's pool once its bytes are dropped (see
/// [`Block`]), and an idle queue holds nothing.
#[derive(Debug)]
pub struct ByteQueue {
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    blocks: Blocks,
    /// Size of the next tail block.
    block: usize,
    start: Pos,
    len: u64,
}

/// The first tail block of a queue in use: a small reply fits.
const MIN_BLOCK: usize = 1024;

impl Default for ByteQueue {
    fn default() -> Self {
        Self {
            chunks: VecDeque::new(),
            tail: BytesMut::new(),
            blocks: Blocks::default(),
            block: MIN_BLOCK,
            start: 0,
            len: 0,
        }
    }
}

/// Size of the blocks that busy queues and connections' read buffers are
/// carved from, and that the process's pool keeps.
pub const BLOCK: usize = 64 * 1024;

/// Most free blocks the process's pool keeps (8 MiB); it also keeps at
/// most as many blocks given back while still in use, until they are free
/// and needed (see [`Block::give_back`]).
pub const POOL_BLOCKS: usize = 128;

/// Most blocks one queue tracks: 5 MiB, a little more than a session's
/// default window (4 MiB, which may start and end inside a block). A queue
/// holding more (a larger window) lets the oldest go to the allocator
/// instead; and a block that is free but queued behind one still referred
/// to (a slice a backup's link has not sent yet) is kept no longer than
/// that.
const MAX_HELD: usize = 80;

/// The process's blocks. One pool for all threads: a block is often freed
/// on one thread (where the application read its bytes) and needed on
/// another (where its connection reads).
static POOL: std::sync::Mutex<Pool> = std::sync::Mutex::new(Pool {
    free: Vec::new(),
    returning: VecDeque::new(),
});

#[derive(Debug)]
struct Pool {
    /// Free blocks, at most [`POOL_BLOCKS`].
    free: Vec<BytesMut>,
    /// Blocks given back while a slice of them was still held elsewhere
    /// (say, a payload an application took with `read_chunk` and has not
    /// written out yet), oldest first, at most [`POOL_BLOCKS`]: they join
    /// the free ones when the pool runs dry and nothing refers to them any
    /// more, instead of going back to the allocator.
    returning: VecDeque<BytesMut>,
}

impl Pool {
    /// A free block: a pooled one, or one given back in use and free since.
    fn pop(&mut self) -> Option<BytesMut> {
        if self.free.is_empty() {
            self.reclaim();
        }
        self.free.pop()
    }

    /// Moves the blocks given back in use that are free since to the free
    /// ones (beyond their bound, to the allocator).
    fn reclaim(&mut self) {
        let Self { free, returning } = self;
        returning.retain_mut(|b| {
            if !b.try_reclaim(BLOCK) {
                return true;
            }
            if free.len() < POOL_BLOCKS {
                free.push(std::mem::take(b));
            }
            false
        });
    }
}

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    // The pool holds plain buffers: a panic elsewhere cannot leave it
    // inconsistent.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Blocks allocated so far because the pool had none.
static ALLOCATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many free blocks the process's pool holds now (not counting those
/// given back in use and free since, which it finds when it runs dry).
pub fn pooled_blocks() -> usize {
    pool().free.len()
}

/// How many blocks the process has allocated so far (the others were
/// reused).
pub fn blocks_allocated() -> u64 {
    ALLOCATED.load(std::sync::atomic::Ordering::Relaxed)
}

/// A [`BLOCK`] of storage that queue chunks or frames are carved from, as
/// shared [`Bytes`] slices: the block can be written again only once every
/// slice is dropped.
///
/// Freeing each block and allocating the next, as a busy stream does
/// hundreds of times a second, lets the C allocator give the memory back to
/// the system and fault it in again page by page (or huge page by huge
/// page): that cost a session a third of its CPU time. So a block whose
/// bytes are all acknowledged or read goes to the process's pool
/// ([`Block::give_back`], at most [`POOL_BLOCKS`] blocks), where the next
/// busy queue or connection finds it ([`Block::take`]).
///
/// A `Block` is a token for the storage: an empty handle at its start,
/// through which it learns when nothing else refers to it.
#[derive(Debug)]
pub struct Block {
    owner: BytesMut,
}

impl Block {
    /// A block from the process's pool, or a new one; returns its token and
    /// the handle to write into (empty, room for [`BLOCK`] bytes).
    pub fn take() -> (Block, BytesMut) {
        let mut work = pool().pop().unwrap_or_else(|| {
            ALLOCATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            BytesMut::with_capacity(BLOCK)
        });
        let owner = work.split_to(0);
        (Block { owner }, work)
    }

    /// Whether nothing but this token refers to the storage any more.
    fn is_free(&mut self) -> bool {
        // The token has no room of its own, so this asks whether the
        // storage is shared (and reclaims it whole when it is not).
        self.owner.try_reclaim(BLOCK)
    }

    /// Gives the block back to the process's pool: at once when nothing
    /// else refers to it, else once its last slice is dropped (when the
    /// pool needs it). Beyond the pool's bounds ([`POOL_BLOCKS`] of each
    /// kind) it goes to the allocator instead.
    pub fn give_back(mut self) {
        let free = self.is_free();
        let mut p = pool();
        if free {
            if p.free.len() < POOL_BLOCKS {
                p.free.push(self.owner);
            }
            return;
        }
        if p.returning.len() == POOL_BLOCKS {
            // Make room: first from those free since; if none is, the
            // oldest goes to the allocator once its slices are dropped.
            p.reclaim();
            if p.returning.len() == POOL_BLOCKS {
                p.returning.pop_front();
            }
        }
        p.returning.push_back(self.owner);
    }
}

/// The blocks a queue's chunks point into, in the order they were filled,
/// which is the order their bytes are dropped (acknowledged or read); the
/// last one may be the block being written.
#[derive(Debug, Default)]
struct Blocks {
    held: VecDeque<Block>,
}

impl Blocks {
    /// A block to write into next.
    fn next(&mut self) -> BytesMut {
        let (block, work) = Block::take();
        self.hold(block);
        work
    }

    /// Keeps `block` until the slices of it are dropped.
    fn hold(&mut self, block: Block) {
        if self.held.len() == MAX_HELD {
            // Let the allocator have it, when its bytes go.
            self.held.pop_front();
        }
        self.held.push_back(block);
    }

    /// Gives back the oldest blocks that nothing refers to any more.
    fn release_free(&mut self) {
        while self.held.front_mut().is_some_and(Block::is_free) {
            self.held.pop_front().expect("front exists").give_back();
        }
    }

    /// Gives every block back (see [`Block::give_back`]).
    fn release(&mut self) {
        for b in std::mem::take(&mut self.held) {
            b.give_back();
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

    /// Keeps `block`, a read buffer's block that chunks pushed here point
    /// into, until the bytes in it are dropped: it then goes to the
    /// process's pool for the next read.
    pub fn adopt(&mut self, block: Block) {
        self.blocks.hold(block);
        self.blocks.release_free();
    }

    /// Appends a copy of `data`.
    pub fn push_slice(&mut self, data: &[u8]) {
        // No block is larger than a pool's: large writes fill several.
        for piece in data.chunks(BLOCK) {
            self.push_piece(piece);
        }
    }

    fn push_piece(&mut self, data: &[u8]) {
        self.tail_room(data.len());
        self.tail.extend_from_slice(data);
        self.len += data.len() as u64;
    }

    /// Makes room for `want` more bytes (at most [`BLOCK`]) in the tail
    /// block, starting a new one if needed.
    fn tail_room(&mut self, want: usize) {
        if self.tail.capacity() - self.tail.len() < want {
            self.seal();
            let size = want.max(self.block);
            self.tail = if size == BLOCK {
                self.blocks.next()
            } else {
                // Small blocks (a queue starting up) go to the allocator.
                BytesMut::with_capacity(size)
            };
            self.block = (size * 2).min(BLOCK);
        }
    }

    /// Appends bytes that `fill` writes in place, into the tail block,
    /// without a copy of them: `fill` gets room for at least one byte and
    /// at most `max` (1 if `max` is 0), and at most what the tail block has
    /// left (1 KiB to [`BLOCK`]); what it appends is queued. Returns what
    /// `fill` returns. A `fill` that goes around the limit (`set_limit`,
    /// `get_mut`) has its bytes queued all the same, copied.
    pub fn fill<R>(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut bytes::buf::Limit<&mut BytesMut>) -> R,
    ) -> R {
        self.tail_room(1);
        let room = (self.tail.capacity() - self.tail.len()).min(max.max(1));
        // `fill` writes into the tail's spare room, split off: should it
        // panic, the queue keeps its bytes (the next append starts a new
        // block).
        let mut spare = self.tail.split_off(self.tail.len());
        let r = fill(&mut bytes::BufMut::limit(&mut spare, room));
        self.len += spare.len() as u64;
        // Contiguous with the tail and within its capacity: joined again
        // without a copy.
        self.tail.unsplit(spare);
        if self.len == 0 {
            // Nothing was appended to an idle queue: it stays empty-handed.
            self.idle();
        }
        r
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
        if self.len == 0 {
            self.idle();
        } else {
            self.blocks.release_free();
        }
    }

    /// Empty: gives the blocks back and starts small again.
    fn idle(&mut self) {
        self.tail = BytesMut::new();
        self.blocks.release();
        self.block = MIN_BLOCK;
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
        assert!(q.chunks.iter().all(|c| c.len() <= BLOCK));
        assert_eq!(q.len(), 1 + 101 * 5000);
        assert_eq!(&q.slice(1, 5001)[..], &big[..]);
        q.drop_to(q.end());
        assert_eq!(q.tail.capacity(), 0, "an idle queue holds no block");
        q.push_slice(b"y");
        assert_eq!(q.tail.capacity(), MIN_BLOCK);
        assert_eq!(&q.slice(0, u64::MAX)[..], b"y");
    }

    #[test]
    fn fill_appends_in_place_within_its_bounds() {
        let mut q = ByteQueue::new(5);
        q.push_slice(b"abc");
        let n = q.fill(1 << 20, |buf| {
            let room = bytes::BufMut::remaining_mut(buf);
            assert!((1..=MIN_BLOCK).contains(&room), "{room}");
            bytes::BufMut::put_slice(buf, b"defg");
            4
        });
        assert_eq!(n, 4);
        assert_eq!((q.start(), q.end()), (5, 12));
        // In the block the earlier bytes are in, right after them.
        assert_eq!(&q.chunk_at(5, 100)[..], b"abcdefg");
        // Bounded by `max`; nothing appended is nothing queued.
        q.fill(2, |buf| assert_eq!(bytes::BufMut::remaining_mut(buf), 2));
        assert_eq!(q.end(), 12);
        // A full tail block: the next fill gets a new one (twice as large).
        let left = q.tail.capacity() - q.tail.len();
        q.push_slice(&vec![b'x'; left]);
        q.fill(usize::MAX, |buf| {
            assert_eq!(bytes::BufMut::remaining_mut(buf), 2 * MIN_BLOCK);
            bytes::BufMut::put_slice(buf, b"yz");
        });
        assert_eq!(q.len(), (7 + left + 2) as u64);
        assert_eq!(&q.slice(q.end() - 3, q.end())[..], b"xyz");
        // A `fill` that panics after writing leaves the queue's bytes as
        // they were.
        let end = q.end();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            q.fill(usize::MAX, |buf| {
                bytes::BufMut::put_slice(buf, b"lost");
                panic!("fill fails");
            })
        }));
        assert!(r.is_err());
        assert_eq!(q.end(), end);
        q.push_slice(b"!");
        assert_eq!(&q.slice(end - 3, end + 1)[..], b"xyz!");
        // An empty queue that a fill appends nothing to holds no block.
        let mut idle = ByteQueue::new(0);
        idle.fill(usize::MAX, |_| ());
        assert_eq!(
            (idle.len(), idle.tail.capacity(), idle.block),
            (0, 0, MIN_BLOCK)
        );
    }

    /// That a busy queue reuses its blocks is checked in
    /// `tests/blocks.rs`, whose process no other test shares the pool with.
    #[test]
    fn a_busy_queue_cuts_writes_to_blocks_and_gives_them_back_when_idle() {
        let mut q = ByteQueue::new(0);
        // Large writes are cut to blocks.
        q.push_slice(&vec![2u8; 3 * BLOCK + 10]);
        assert!(q.chunks.iter().all(|c| c.len() <= BLOCK));
        assert_eq!(&q.slice(q.end() - 10, q.end())[..], &[2u8; 10]);
        // Idle: every block goes back (to the process's pool: see
        // tests/blocks.rs).
        q.drop_to(q.end());
        assert_eq!(q.tail.capacity(), 0);
        assert!(q.blocks.held.is_empty());
    }
}
