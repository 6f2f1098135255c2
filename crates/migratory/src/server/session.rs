//! What the application holds of a session: [`Session`] (`AsyncRead +
//! AsyncWrite`) and [`SessionControl`].

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use migratory_proto::types::SessionId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::driver::{settle, ConnPermit, Slot};
use super::Shared;
use crate::error::Error;

enum Inner {
    Migratory {
        shared: Arc<Shared>,
        slot: Slot,
        session: SessionId,
    },
    Plain {
        initial: Bytes,
        stream: TcpStream,
        /// Counts the connection against the server's limits until the
        /// application drops it.
        _permit: ConnPermit,
        /// Counts it among the plain clients a drain waits for.
        _held: PlainHeld,
    },
}

/// One plain client the application holds; a drain waits until none is
/// left.
struct PlainHeld(Arc<Shared>);

impl PlainHeld {
    fn new(shared: Arc<Shared>) -> Self {
        shared.plain.fetch_add(1, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for PlainHeld {
    fn drop(&mut self) {
        self.0.plain.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// One client's session at this server: `AsyncRead + AsyncWrite`, plus the
/// migration calls. After the session moved away every read and write
/// fails with an error for which [`crate::is_migrated`] is true (MTCP's
/// `EMIGRATED`): stop serving it.
pub struct Session {
    inner: Inner,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Inner::Migratory { session, .. } => write!(f, "Session({session})"),
            Inner::Plain { .. } => f.write_str("Session(plain)"),
        }
    }
}

impl Session {
    pub(super) fn migratory(shared: Arc<Shared>, slot: Slot, session: SessionId) -> Self {
        Self {
            inner: Inner::Migratory {
                shared,
                slot,
                session,
            },
        }
    }

    pub(super) fn plain(
        shared: Arc<Shared>,
        initial: Bytes,
        stream: TcpStream,
        permit: ConnPermit,
    ) -> Self {
        Self {
            inner: Inner::Plain {
                initial,
                stream,
                _permit: permit,
                _held: PlainHeld::new(shared),
            },
        }
    }

    /// The session id (`None` for a plain TCP client).
    pub fn id(&self) -> Option<SessionId> {
        match &self.inner {
            Inner::Migratory { session, .. } => Some(*session),
            Inner::Plain { .. } => None,
        }
    }

    /// Writes all of `data` without copying it: the session keeps the
    /// buffer itself (slices of it) until the client acknowledges its
    /// bytes, where [`AsyncWriteExt::write_all`](tokio::io::AsyncWriteExt::write_all)
    /// copies them into the session's send buffer. For an application that
    /// reads its output into buffers of its own anyway, such as a file
    /// server. Waits for room as a write does; the same rules apply (bytes
    /// the client already has from before a migration are dropped). As with
    /// `write_all`, a future dropped before it completes may have written
    /// part of `data`.
    pub async fn write_bytes(&mut self, mut data: Bytes) -> io::Result<()> {
        match &mut self.inner {
            Inner::Plain { stream, .. } => tokio::io::AsyncWriteExt::write_all(stream, &data).await,
            Inner::Migratory { shared, slot, .. } => {
                std::future::poll_fn(|cx| {
                    while !data.is_empty() {
                        let mut st = slot.lock();
                        match st.core.write_bytes(&data) {
                            Ok(0) => {
                                st.write_waker = Some(cx.waker().clone());
                                return Poll::Pending;
                            }
                            Ok(n) => {
                                bytes::Buf::advance(&mut data, n);
                                // As in `poll_write`.
                                if !matches!(super::driver::transmit(&mut st), Ok(false)) {
                                    notify_driver(&st);
                                }
                                settle(shared, st);
                            }
                            Err(e) => return Poll::Ready(Err(Error::from(e).into())),
                        }
                    }
                    Poll::Ready(Ok(()))
                })
                .await
            }
        }
    }

    /// MTCP's `set_state`: records `state` as this session's restart point.
    /// A server resuming from it reads and writes from here on. A no-op for
    /// a plain TCP client.
    pub fn snapshot(&self, state: &[u8]) -> Result<(), Error> {
        match self.control() {
            Some(c) => c.snapshot(state),
            None => Ok(()),
        }
    }

    /// Server push (MTCP 3.2.1): asks the client to migrate, to `dest` if
    /// given. Fails for a plain TCP client.
    pub fn migrate_to(&self, dest: Option<&str>) -> Result<(), Error> {
        match self.control() {
            Some(c) => c.migrate_to(dest),
            None => Err(Error::Config("a plain TCP client cannot migrate".into())),
        }
    }

    /// A cloneable handle for [`Session::snapshot`] and
    /// [`Session::migrate_to`], for use while the session's IO runs
    /// elsewhere (`None` for a plain TCP client).
    pub fn control(&self) -> Option<SessionControl> {
        match &self.inner {
            Inner::Migratory {
                shared,
                slot,
                session,
                ..
            } => Some(SessionControl {
                shared: shared.clone(),
                slot: slot.clone(),
                session: *session,
            }),
            Inner::Plain { .. } => None,
        }
    }
}

/// Snapshot and migration calls on a session, detached from its IO.
#[derive(Debug, Clone)]
pub struct SessionControl {
    shared: Arc<Shared>,
    slot: Slot,
    session: SessionId,
}

impl SessionControl {
    /// The session id.
    pub fn id(&self) -> SessionId {
        self.session
    }

    /// See [`Session::snapshot`].
    pub fn snapshot(&self, state: &[u8]) -> Result<(), Error> {
        let mut st = self.slot.lock();
        let r = st.core.snapshot(state);
        notify_driver(&st);
        settle(&self.shared, st);
        Ok(r?)
    }

    /// See [`Session::migrate_to`].
    pub fn migrate_to(&self, dest: Option<&str>) -> Result<(), Error> {
        let dest = match dest {
            Some(d) => Some(self.shared.peer_id(d)?),
            None => None,
        };
        let mut st = self.slot.lock();
        let r = st.core.migrate_to(dest);
        notify_driver(&st);
        settle(&self.shared, st);
        Ok(r?)
    }
}

impl AsyncRead for Session {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Inner::Plain {
                initial, stream, ..
            } => {
                if !initial.is_empty() {
                    let n = initial.len().min(buf.remaining());
                    buf.put_slice(&initial.split_to(n));
                    return Poll::Ready(Ok(()));
                }
                Pin::new(stream).poll_read(cx, buf)
            }
            Inner::Migratory { shared, slot, .. } => {
                let mut st = slot.lock();
                match st.core.read(buf.initialize_unfilled()) {
                    Ok(Some(n)) => {
                        buf.advance(n);
                        // Reading may open the client's window.
                        if n > 0 && st.core.wants_transmit(std::time::Instant::now()) {
                            notify_driver(&st);
                        }
                        settle(shared, st);
                        Poll::Ready(Ok(()))
                    }
                    Ok(None) => {
                        st.read_waker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                    Err(e) => Poll::Ready(Err(Error::from(e).into())),
                }
            }
        }
    }
}

impl AsyncWrite for Session {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.inner {
            Inner::Plain { stream, .. } => Pin::new(stream).poll_write(cx, data),
            Inner::Migratory { shared, slot, .. } => {
                let mut st = slot.lock();
                match st.core.write(data) {
                    Ok(0) if !data.is_empty() => {
                        st.write_waker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                    Ok(n) => {
                        // Written out from here while the socket takes it;
                        // the driver only waits for room when it does not.
                        if !matches!(super::driver::transmit(&mut st), Ok(false)) {
                            notify_driver(&st);
                        }
                        settle(shared, st);
                        Poll::Ready(Ok(n))
                    }
                    Err(e) => Poll::Ready(Err(Error::from(e).into())),
                }
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Inner::Plain { stream, .. } => Pin::new(stream).poll_flush(cx),
            // Written bytes are in the session's retransmit buffer, which is
            // what survives a migration; the socket drains it on its own.
            Inner::Migratory { .. } => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Inner::Plain { stream, .. } => Pin::new(stream).poll_shutdown(cx),
            Inner::Migratory { shared, slot, .. } => {
                let mut st = slot.lock();
                let r = st.core.close_write();
                notify_driver(&st);
                settle(shared, st);
                Poll::Ready(r.map_err(|e| Error::from(e).into()))
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Inner::Migratory { shared, slot, .. } = &self.inner {
            let mut st = slot.lock();
            st.read_waker = None;
            st.write_waker = None;
            // A session dropped while live ends gracefully (Close sent,
            // further input discarded), as a closed TCP socket would.
            st.core.release();
            notify_driver(&st);
            settle(shared, st);
        }
    }
}

/// Wakes the task driving the session's connection (it has output to
/// frame).
fn notify_driver(st: &super::driver::CellState) {
    if let Some(d) = &st.driver {
        d.notify_one();
    }
}
