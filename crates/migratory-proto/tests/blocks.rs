//! The process's pool of free blocks, which busy queues and connections'
//! read buffers share (one test: nothing else in this process touches the
//! pool).

use migratory_proto::stream::{
    blocks_allocated, pooled_blocks, Block, ByteQueue, BLOCK, POOL_BLOCKS,
};

/// Where a block's storage starts (a fresh handle of it is empty there).
fn addr(work: &bytes::BytesMut) -> usize {
    work.as_ptr() as usize
}

#[test]
fn free_blocks_go_to_the_pool_and_busy_queues_take_them_from_there() {
    // A queue that streamed and went idle gives its blocks to the pool.
    let mut q = ByteQueue::new(0);
    let piece = vec![1u8; BLOCK];
    for _ in 0..4 {
        q.push_slice(&piece);
    }
    let held: Vec<usize> = (0..4)
        .map(|i| q.chunk_at(i * BLOCK as u64, BLOCK).as_ptr() as usize)
        .collect();
    q.drop_to(q.end());
    let (token, work) = Block::take();
    assert!(held.contains(&addr(&work)), "a pooled block, not a new one");
    assert_eq!((work.len(), work.capacity()), (0, BLOCK));
    drop(work);
    token.give_back();

    // The next busy queue takes them instead of allocating.
    let mut other = ByteQueue::new(7);
    other.push_slice(&vec![2u8; BLOCK]);
    assert!(held.contains(&(other.chunk_at(7, 1).as_ptr() as usize)));
    assert!(other.slice(7, 7 + BLOCK as u64).iter().all(|&b| b == 2));

    // A block something still refers to is not pooled (it would be
    // overwritten under the reader).
    let (token, mut work) = Block::take();
    work.extend_from_slice(&[3; 10]);
    let slice = work.split().freeze();
    let busy = addr(&work) - 10;
    token.give_back();
    drop(work);
    let mut taken = Vec::new();
    for _ in 0..POOL_BLOCKS {
        let (t, w) = Block::take();
        assert_ne!(addr(&w), busy);
        taken.push((t, w));
    }
    assert_eq!(&slice[..], &[3; 10]);

    // Once its last slice is dropped it is reused after all: a pool that
    // ran dry takes the blocks given back in use that are free since.
    drop(slice);
    let before = blocks_allocated();
    let (t, w) = Block::take();
    assert_eq!(addr(&w), busy, "the block given back in use");
    assert_eq!(blocks_allocated(), before, "nothing allocated");
    taken.push((t, w));

    // The pool is bounded: of more blocks than it keeps, the rest go to
    // the allocator.
    assert_eq!(pooled_blocks(), 0);
    taken.extend((0..10).map(|_| Block::take()));
    for (t, w) in taken {
        drop(w);
        t.give_back();
    }
    assert_eq!(pooled_blocks(), POOL_BLOCKS);

    // Blocks given back in use are kept within a bound too: of one more
    // than it keeps, the oldest goes to the allocator.
    let hold: Vec<_> = (0..POOL_BLOCKS).map(|_| Block::take()).collect();
    assert_eq!(pooled_blocks(), 0);
    let mut slices = Vec::new();
    for _ in 0..=POOL_BLOCKS {
        let (t, mut w) = Block::take();
        w.extend_from_slice(&[4; 8]);
        slices.push(w.split().freeze());
        t.give_back();
    }
    drop(slices);
    let before = blocks_allocated();
    let again: Vec<_> = (0..POOL_BLOCKS).map(|_| Block::take()).collect();
    assert_eq!(blocks_allocated(), before, "every block kept is reused");
    let extra = Block::take();
    assert_eq!(
        blocks_allocated(),
        before + 1,
        "the one beyond the bound was not kept"
    );
    drop((hold, again, extra));

    // A busy queue, acknowledged in order a few blocks behind its writes
    // (the slices handed out for transmission dropped by then), takes its
    // blocks back from the pool: a few blocks for a thousand writes. (The
    // pool is emptied first, so every block the queue uses is counted.)
    let emptied: Vec<_> = (0..pooled_blocks()).map(|_| Block::take()).collect();
    let mut q = ByteQueue::new(0);
    let piece = vec![1u8; BLOCK];
    let before = blocks_allocated();
    for i in 0..1000u64 {
        q.push_slice(&piece);
        let out = q.chunk_at(q.start(), BLOCK);
        drop(out);
        if i >= 3 {
            q.drop_to((i - 3) * BLOCK as u64);
        }
    }
    let fresh = blocks_allocated() - before;
    assert!(fresh <= 8, "{fresh} blocks for 1000 writes");
    drop(emptied);
}
