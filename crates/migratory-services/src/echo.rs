//! Echo: whatever is read is written back.
//!
//! The output depends only on the input, so the state is empty: after each
//! chunk is written back in full the service snapshots, and a server that
//! resumes the session reads from the first byte not yet echoed. A plain
//! TCP client is closed once the server drains.

use std::io;

use migratory::{Arrival, Session};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{invalid, snapshot, Drain};

/// Largest chunk read (and written back) at once.
const CHUNK: usize = 64 * 1024;

/// The buffer an idle session keeps: it grows to [`CHUNK`] while reads fill
/// it and shrinks back when they do not, so ten thousand idle sessions do
/// not hold ten thousand large buffers.
const IDLE_CHUNK: usize = 1024;

/// Serves one echo session until the client closes its side (then closes
/// ours), the server drains (a plain client), or the session moves away.
pub(super) async fn serve(s: &mut Session, arrival: Arrival, mut drain: Drain) -> io::Result<()> {
    if let Arrival::Migrated { state } = &arrival {
        if !state.is_empty() {
            return Err(invalid(format!(
                "echo: a migrated session brought a {}-byte state, not an echo session's (empty)",
                state.len()
            )));
        }
    }
    let mut buf = vec![0u8; IDLE_CHUNK];
    loop {
        let n = tokio::select! {
            biased;
            () = drain.wait() => 0,
            r = s.read(&mut buf) => r?,
        };
        if n == 0 {
            s.shutdown().await?;
            return snapshot(s, &[]);
        }
        s.write_all(&buf[..n]).await?;
        snapshot(s, &[])?;
        if n == buf.len() && buf.len() < CHUNK {
            buf.resize(CHUNK, 0);
        } else if n < IDLE_CHUNK && buf.len() > IDLE_CHUNK {
            buf = vec![0u8; IDLE_CHUNK];
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use migratory::MigratoryStream;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::testing::{draining_options, options, pattern, pool, TempDir, TEST_TIMEOUT};
    use crate::Kind;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn echo_is_exact_across_migrations() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let dir = TempDir::new("echo");
            let o = options(&dir.0, Duration::ZERO);
            let pool = pool(Kind::Echo, vec![o.clone(), o.clone(), o]).await;
            const LEN: usize = 3 << 20;
            let data = pattern(LEN, 7);
            let stream = MigratoryStream::connect(&pool.service[..1], &pool.tls)
                .await
                .unwrap();
            let mut ctl = stream.control();
            let (mut rd, mut wr) = tokio::io::split(stream);
            let up = Arc::new(data.clone());
            // The session must stay open until the last migration.
            let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
            let writer = tokio::spawn(async move {
                for c in up.chunks(10_000) {
                    wr.write_all(c).await.unwrap();
                }
                done.await.unwrap();
                wr.shutdown().await.unwrap();
                wr
            });
            let mut done_tx = Some(done_tx);
            let moves = [
                (100_000, "s2"),
                (900_000, "s3"),
                (1_500_000, "s1"),
                (2_600_000, "s2"),
            ];
            let mut got = Vec::with_capacity(LEN);
            let mut buf = vec![0u8; 32 * 1024];
            let mut next = 0;
            loop {
                if next < moves.len() && got.len() >= moves[next].0 {
                    assert_eq!(
                        ctl.migrate(Some(moves[next].1)).await.unwrap().as_str(),
                        moves[next].1
                    );
                    next += 1;
                }
                if next == moves.len() {
                    if let Some(tx) = done_tx.take() {
                        tx.send(()).unwrap();
                    }
                }
                let n = rd.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                assert!(got.len() <= LEN, "more bytes than were sent");
            }
            assert_eq!(next, moves.len());
            assert!(got == data, "echoed bytes differ");
            let _wr = writer.await.unwrap();
            assert!(pool.errors().is_empty(), "{:?}", pool.errors());
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn echo_with_migrations_between_exchanges() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let dir = TempDir::new("echo2");
            let o = options(&dir.0, Duration::ZERO);
            let pool = pool(Kind::Echo, vec![o.clone(), o]).await;
            let mut stream = MigratoryStream::connect(&pool.service[..1], &pool.tls)
                .await
                .unwrap();
            for i in 0..6u8 {
                let msg = pattern(1000 + usize::from(i) * 777, i);
                stream.write_all(&msg).await.unwrap();
                let mut back = vec![0u8; msg.len()];
                stream.read_exact(&mut back).await.unwrap();
                assert_eq!(back, msg);
                let dest = if i % 2 == 0 { "s2" } else { "s1" };
                stream.migrate(Some(dest)).await.unwrap();
            }
            stream.shutdown().await.unwrap();
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            assert!(pool.errors().is_empty(), "{:?}", pool.errors());
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn echo_serves_a_plain_tcp_client() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let dir = TempDir::new("echo3");
            let o = options(&dir.0, Duration::ZERO);
            let pool = pool(Kind::Echo, vec![o.clone(), o]).await;
            let s = tokio::net::TcpStream::connect(pool.service[1])
                .await
                .unwrap();
            let (mut rd, mut wr) = s.into_split();
            let data = pattern(1 << 20, 3);
            let up = data.clone();
            let writer = tokio::spawn(async move {
                wr.write_all(&up).await.unwrap();
                wr.shutdown().await.unwrap();
                wr
            });
            let mut got = Vec::new();
            rd.read_to_end(&mut got).await.unwrap();
            assert!(got == data);
            let _wr = writer.await.unwrap();
            assert!(pool.errors().is_empty(), "{:?}", pool.errors());
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_draining_server_closes_plain_clients_only() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let dir = TempDir::new("echo-drain");
            let (o, drain) = draining_options(&dir.0, Duration::ZERO);
            let pool = pool(Kind::Echo, vec![o]).await;
            let mut plain = tokio::net::TcpStream::connect(pool.service[0])
                .await
                .unwrap();
            let mut m = MigratoryStream::connect(&pool.service[..1], &pool.tls)
                .await
                .unwrap();
            let msg = pattern(100_000, 9);
            for s in [&mut plain as &mut (dyn AsyncRw + Unpin), &mut m] {
                s.write_all(&msg).await.unwrap();
                let mut back = vec![0u8; msg.len()];
                s.read_exact(&mut back).await.unwrap();
                assert!(back == msg);
            }
            drain.send_replace(true);
            // The plain client reads the end, after nothing more.
            let mut rest = Vec::new();
            plain.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "{} bytes after the echo", rest.len());
            // The migratory session is not the service's to close.
            m.write_all(b"still here").await.unwrap();
            let mut back = [0u8; 10];
            m.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"still here");
            m.shutdown().await.unwrap();
            let mut rest = Vec::new();
            m.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            assert!(pool.errors().is_empty(), "{:?}", pool.errors());
        })
        .await
        .expect("test timed out");
    }

    /// A stream of either kind.
    trait AsyncRw: tokio::io::AsyncRead + tokio::io::AsyncWrite {}
    impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite> AsyncRw for T {}
}
