//! A busy session reuses the blocks its bytes pass through instead of
//! asking the allocator for new ones (alone in its process: it counts the
//! process's block allocations).

mod common;

use std::time::Duration;

use migratory::proto::stream::{blocks_allocated, BLOCK};
use migratory::{MigratoryStream, ServerBuilder};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_echo_reuses_its_blocks() {
    const LEN: usize = 32 << 20;
    let addrs = common::free_addrs(2);
    let mut b = ServerBuilder::new("s1");
    b.tls(common::server_tls("s1"));
    b.service(addrs[0])
        .control(addrs[1])
        .cluster_key(b"blocks test cluster key 0123456789");
    let mut server = b.bind().await.expect("bind");
    tokio::spawn(async move {
        while let Some((s, _)) = server.accept().await {
            tokio::spawn(common::echo(s));
        }
    });
    let before = blocks_allocated();
    let stream = MigratoryStream::connect(&addrs[..1], &common::client_tls())
        .await
        .expect("connect");
    let (mut rd, mut wr) = tokio::io::split(stream);
    let data: Vec<u8> = (0..LEN).map(|i| ((i * 2654435761) >> 13) as u8).collect();
    let sent = Sha256::digest(&data);
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(256 * 1024) {
            wr.write_all(chunk).await.expect("write");
        }
        wr
    });
    let mut got = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0;
    tokio::time::timeout(Duration::from_secs(120), async {
        while n < LEN {
            let k = rd.read(&mut buf).await.expect("read");
            assert!(k > 0, "early EOF after {n} bytes");
            got.update(&buf[..k]);
            n += k;
        }
    })
    .await
    .expect("the echo completes");
    writer.await.expect("writer");
    assert_eq!(n, LEN);
    assert_eq!(got.finalize(), sent, "every byte echoed, in order");
    // Each byte passed through four queues or read buffers (client send,
    // server receive, server send, client receive): 2048 block fills. What
    // is in flight at once is bounded by the windows; the rest is reuse.
    let allocated = blocks_allocated() - before;
    let fills = (4 * LEN / BLOCK) as u64;
    eprintln!("{allocated} blocks allocated for {fills} block fills");
    assert!(
        allocated < fills / 4,
        "{allocated} blocks allocated for {fills} block fills"
    );
}
