//! A hand-driven client connection speaking frames: to test a server
//! against exact wire traffic, and to be an attacker.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use migratory::proto::frame::{Frame, MigrateRequest, DEFAULT_MAX_FRAME, PREAMBLE};
use migratory::proto::mac::BINDING_LABEL;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// One connection to a server's service address.
pub struct Wire {
    s: Box<dyn Io>,
    binding: Option<[u8; 32]>,
    rx: BytesMut,
}

impl Wire {
    /// Over TLS to any server of the test pool; the preamble is sent.
    pub async fn open(addr: SocketAddr) -> Self {
        let s = super::tls_connect(addr, migratory::tls::DEFAULT_POOL_NAME).await;
        let binding = s
            .get_ref()
            .1
            .export_keying_material([0u8; 32], BINDING_LABEL, None)
            .unwrap();
        Self::start(Box::new(s), Some(binding)).await
    }

    /// In plaintext (a pool that runs insecure plaintext).
    pub async fn open_plain(addr: SocketAddr) -> Self {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        Self::start(Box::new(s), None).await
    }

    async fn start(s: Box<dyn Io>, binding: Option<[u8; 32]>) -> Self {
        let mut w = Self {
            s,
            binding,
            rx: BytesMut::new(),
        };
        w.s.write_all(&PREAMBLE).await.unwrap();
        w.s.flush().await.unwrap();
        w
    }

    /// Sends one frame.
    pub async fn send(&mut self, f: Frame) {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        self.s.write_all(&b).await.unwrap();
        self.s.flush().await.unwrap();
    }

    /// The next frame, or None at EOF.
    pub async fn recv(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = Frame::decode(&mut self.rx, DEFAULT_MAX_FRAME).unwrap() {
                return Some(f);
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut buf))
                .await
                .unwrap()
                .ok()?;
            if n == 0 {
                return None;
            }
            self.rx.extend_from_slice(&buf[..n]);
        }
    }

    /// This TLS connection's channel binding (what a proof on it covers).
    pub fn binding(&self) -> [u8; 32] {
        self.binding.expect("a TLS connection")
    }

    /// Sends a Migrate with `proof(nonce)`: right behind it over the
    /// binding on TLS, or answering the server's Challenge in plaintext.
    /// Returns the server's answer.
    pub async fn migrate(
        &mut self,
        req: MigrateRequest,
        proof: impl Fn(&[u8; 32]) -> [u8; 32],
    ) -> Option<Frame> {
        self.send(Frame::Migrate(req)).await;
        let nonce = match self.binding {
            Some(b) => b,
            None => match self.recv().await {
                Some(Frame::Challenge { nonce }) => nonce,
                f => return f,
            },
        };
        self.send(Frame::Proof { mac: proof(&nonce) }).await;
        self.recv().await
    }
}
