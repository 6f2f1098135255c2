//! Hostile clients against a real `migratory serve --service http`: a
//! thousand silent connections, connections beyond the limits, and
//! hundreds of connections that announce a huge frame before proving
//! anything. The server stays within its limits, keeps serving, and keeps
//! its log short.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[path = "../../migratory/tests/common/mod.rs"]
mod common;

const BIN: &str = env!("CARGO_BIN_EXE_migratory");

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A connection to `to` from loopback address `from` (127.0.0.x: each
/// its own source address as far as the server's limits go).
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(IpAddr::V4(from), 0))?;
    s.connect(to).await
}

/// Whether the server ended `s` (EOF or reset) within `within`.
async fn ended(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 64];
    loop {
        match tokio::time::timeout(within, s.read(&mut b)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// `GET /big.bin` over plain HTTP from `from`; the body's SHA-256.
async fn get(from: Ipv4Addr, to: SocketAddr) -> Vec<u8> {
    let mut s = connect_from(from, to).await.expect("connect");
    s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).await.unwrap();
    let at = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    assert!(all.starts_with(b"HTTP/1.1 200"), "{:?}", &all[..at]);
    Sha256::digest(&all[at..]).to_vec()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A TLS connection trusting the pool CA in `ca`.
async fn tls_to(
    from: Ipv4Addr,
    to: SocketAddr,
    ca: &Path,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = connect_from(from, to).await?;
    let name = rustls::pki_types::ServerName::try_from(migratory::tls::DEFAULT_POOL_NAME).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_oversized_and_excess_connections_are_bounded() {
    // This process holds about 1,600 sockets at once.
    let _ = migratory_cli_nofile_raise();
    let dir = std::env::temp_dir().join(format!("migratory-hostile-{}", std::process::id()));
    let root = dir.join("www");
    std::fs::create_dir_all(&root).unwrap();
    let body: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(root.join("big.bin"), &body).unwrap();
    let want = Sha256::digest(&body).to_vec();
    let addrs = common::free_addrs(2);
    std::fs::write(
        dir.join("cluster.key"),
        "hostile test cluster key 0123456789\n",
    )
    .unwrap();
    let cfg = dir.join("pool.toml");
    std::fs::write(
        &cfg,
        format!(
            "cluster_key_file = \"cluster.key\"\n\
             [limits]\nmax_connections = 1000\nmax_connections_per_address = 300\n\
             [timeouts]\nhandshake = \"2s\"\n\
             [[server]]\nid = \"s1\"\nservice = \"{}\"\ncontrol = \"{}\"\n",
            addrs[0], addrs[1]
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["certs", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A server with few file descriptors (as in the report this test
    // comes from: 256 open files).
    let log = dir.join("serve.log");
    let server = Kill(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n 512 && exec {BIN} serve --config {} --id s1 --service http --root {} \
                 --header-timeout 1s --idle-timeout 2s 2>{}",
                cfg.display(),
                root.display(),
                log.display()
            ))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while TcpStream::connect(addrs[0]).await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "serve did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = server.0.id();

    // 1,000 silent connections from one address: the first 300 are held
    // (until a timeout), the rest are refused at once.
    let mut silent = Vec::new();
    for _ in 0..1000 {
        if let Ok(s) = connect_from(Ipv4Addr::new(127, 0, 0, 1), addrs[0]).await {
            silent.push(s);
        }
    }
    // Meanwhile another client is served, exactly.
    assert_eq!(get(Ipv4Addr::new(127, 0, 0, 2), addrs[0]).await, want);
    // Every silent connection ends: refused, or closed by the header
    // timeout (1 s, after the 200 ms wait for a preamble).
    let mut refused_or_closed = 0;
    for s in &mut silent {
        if ended(s, Duration::from_secs(5)).await {
            refused_or_closed += 1;
        }
    }
    assert_eq!(
        refused_or_closed,
        silent.len(),
        "every silent connection ended"
    );
    drop(silent);
    assert_eq!(get(Ipv4Addr::new(127, 0, 0, 1), addrs[0]).await, want);

    // 500 connections that finish TLS, send the preamble and the header
    // of a 256 KiB Data frame: each is cut off before the server buffers
    // it, and they cost the server little memory.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid);
    let ca = dir.join("certs/ca.pem");
    let mut huge = Vec::new();
    for i in 0..500 {
        let from = Ipv4Addr::new(127, 0, 1, 1 + (i % 4) as u8);
        let mut s = tls_to(from, addrs[0], &ca).await.expect("TLS");
        let mut b = migratory::proto::frame::PREAMBLE.to_vec();
        b.extend_from_slice(&[0x06, 0x00, 0x04, 0x00, 0x00]); // Data, 256 KiB
        b.extend_from_slice(&[0x5a; 16 * 1024]);
        let _ = s.write_all(&b).await;
        let _ = s.flush().await;
        huge.push(s);
    }
    let after = rss_kib(pid);
    let mut cut = 0;
    for s in &mut huge {
        let mut b = [0u8; 64];
        if matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        ) {
            cut += 1;
        }
    }
    assert_eq!(cut, 500, "every oversized connection was cut off");
    let grown = after.saturating_sub(before);
    eprintln!("serve RSS {before} KiB before, {after} KiB with 500 oversized connections");
    assert!(grown < 5 * 1024, "the server grew by {grown} KiB");

    // Still serving, and the log stayed short.
    assert_eq!(get(Ipv4Addr::new(127, 0, 0, 3), addrs[0]).await, want);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text.lines().count();
    assert!(lines < 40, "{lines} log lines:\n{text}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Raises this test process's open-file limit to its hard limit.
fn migratory_cli_nofile_raise() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    lim.current = lim.maximum;
    setrlimit(Resource::Nofile, lim).ok()?;
    getrlimit(Resource::Nofile).current
}
