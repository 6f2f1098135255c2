//! Helpers shared by the runtime's integration tests.

use std::net::SocketAddr;

#[allow(dead_code)]
pub mod wire;

/// Free loopback addresses: bound, then released for the test to bind.
#[allow(dead_code)]
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    // Below the ephemeral range (32768-60999 by default), so that no
    // outgoing connection of a concurrent test takes the port between now
    // and the bind; spread over processes, stepped within one.
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id().wrapping_mul(7919) % 20_000;
    let mut held = Vec::new();
    while held.len() < n {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 10_000 + (base + k) % 20_000;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            held.push(l);
        }
    }
    held.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// The test pool's CA and certificates, made once per test binary.
#[allow(dead_code)]
pub fn certs() -> &'static migratory::PoolCerts {
    static CERTS: std::sync::OnceLock<migratory::PoolCerts> = std::sync::OnceLock::new();
    CERTS.get_or_init(|| migratory::PoolCerts::generate(migratory::tls::DEFAULT_POOL_NAME).unwrap())
}

/// TLS settings of server `id` of the test pool.
#[allow(dead_code)]
pub fn server_tls(id: &str) -> migratory::ServerTls {
    certs().server_tls(id).unwrap()
}

/// TLS settings of a client of the test pool.
#[allow(dead_code)]
pub fn client_tls() -> migratory::ClientTls {
    certs().client_tls().unwrap()
}

/// TLS settings of an operator of the test pool.
#[allow(dead_code)]
pub fn operator_tls() -> migratory::OperatorTls {
    certs().operator_tls().unwrap()
}

/// A hand-written client's TLS connection to a server of the test pool.
#[allow(dead_code)]
pub type TlsConn = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// Connects a hand-written client to `addr` over TLS, verifying `name`
/// against the test pool's CA.
#[allow(dead_code)]
pub async fn tls_connect(addr: SocketAddr, name: &str) -> TlsConn {
    tls_connect_as(addr, name, None).await.unwrap()
}

/// The same, presenting `cert` as a client certificate if given (for the
/// control address).
#[allow(dead_code)]
pub async fn tls_connect_as(
    addr: SocketAddr,
    name: &str,
    cert: Option<&migratory::tls::CertPem>,
) -> std::io::Result<TlsConn> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(certs().ca_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match cert {
        Some(c) => {
            let chain = rustls::pki_types::CertificateDer::pem_slice_iter(c.cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(c.key.as_bytes()).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
}

/// Accepts a TLS connection as server `id` of the test pool (for a
/// hand-written peer).
#[allow(dead_code)]
pub async fn tls_accept(
    tcp: tokio::net::TcpStream,
    id: &str,
) -> std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let c = certs().server(id).unwrap();
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(c.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(c.key.as_bytes()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg))
        .accept(tcp)
        .await
}

/// An echo application: every byte back, a snapshot after each write
/// (its output depends only on its input), until the client closes.
#[allow(dead_code)]
pub async fn echo(mut s: migratory::Session) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
            break;
        }
        let _ = s.snapshot(b"");
    }
}
