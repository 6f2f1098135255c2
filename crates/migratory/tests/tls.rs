//! TLS on every connection: certificates the pool does not trust, that
//! expired or that name another server, and plaintext peers of a TLS pool
//! each fail with one clear error; a session over TLS carries every byte.

mod common;

use common::free_addrs;

use std::net::SocketAddr;

use migratory::{ClientTls, MigratoryStream, PoolCerts, Server, ServerBuilder, ServerTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &[u8] = b"tls test cluster key 0123456789abcdef";

/// Binds echo server `id` with `tls`; returns its service address.
async fn echo_server(id: &str, tls: ServerTls) -> Result<SocketAddr, migratory::Error> {
    let a = free_addrs(2);
    let mut b = ServerBuilder::new(id);
    b.tls(tls).service(a[0]).control(a[1]).cluster_key(KEY);
    let mut server: Server = b.bind().await?;
    tokio::spawn(async move {
        while let Some((s, _)) = server.accept().await {
            tokio::spawn(common::echo(s));
        }
    });
    Ok(a[0])
}

/// One line, containing each of `want`.
fn one_clear_line(e: &impl std::fmt::Display, want: &[&str]) {
    let e = e.to_string();
    assert!(!e.contains('\n'), "one line: {e:?}");
    for w in want {
        assert!(e.contains(w), "{w:?} not in {e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_over_tls_echoes_every_byte() {
    let addr = echo_server("s1", common::server_tls("s1")).await.unwrap();
    let mut c = MigratoryStream::connect(&[addr], &common::client_tls())
        .await
        .unwrap();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut rd, mut wr) = tokio::io::split(&mut c);
    let send = async {
        wr.write_all(&data).await.unwrap();
    };
    let mut got = vec![0u8; data.len()];
    let recv = async {
        rd.read_exact(&mut got).await.unwrap();
    };
    tokio::join!(send, recv);
    assert!(got == data, "echo differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_expired_and_wrong_name_certificates_each_give_one_clear_error() {
    let pool = common::certs();
    // A client that trusts another CA refuses the pool's servers.
    let addr = echo_server("s1", common::server_tls("s1")).await.unwrap();
    let other = PoolCerts::generate(migratory::tls::DEFAULT_POOL_NAME).unwrap();
    let e = MigratoryStream::connect(&[addr], &other.client_tls().unwrap())
        .await
        .unwrap_err();
    one_clear_line(&e, &["TLS handshake", "certificate", "UnknownIssuer"]);

    // A server refuses to start with an expired certificate, one from
    // another CA, or one that names another server; each error names the
    // certificate and what is wrong.
    let ca = pool.ca_pem();
    let expired = pool
        .issue(&["s1", migratory::tls::DEFAULT_POOL_NAME], "s1", 30, -1)
        .unwrap();
    let tls = ServerTls::from_pem(&ca, &expired.cert, &expired.key).unwrap();
    let e = echo_server("s1", tls).await.unwrap_err();
    one_clear_line(&e, &["certificate", "\"s1\"", "expired"]);
    let foreign = other.server("s1").unwrap();
    let tls = ServerTls::from_pem(&ca, &foreign.cert, &foreign.key).unwrap();
    let e = echo_server("s1", tls).await.unwrap_err();
    one_clear_line(&e, &["certificate", "UnknownIssuer"]);
    let e = echo_server("s1", common::server_tls("s2"))
        .await
        .unwrap_err();
    one_clear_line(&e, &["certificate", "not a valid certificate for \"s1\""]);
    // A key that is not the certificate's, and files that are missing or
    // not PEM: the file is named.
    let s1 = pool.server("s1").unwrap();
    let s2 = pool.server("s2").unwrap();
    let e = ServerTls::from_pem(&ca, &s1.cert, &s2.key).unwrap_err();
    one_clear_line(&e, &["key", "does not match the certificate"]);
    let e = ServerTls::from_pem_files("/nonexistent/ca.pem", "a.pem", "a.key").unwrap_err();
    one_clear_line(&e, &["/nonexistent/ca.pem", "cannot read"]);
    let e = ServerTls::from_pem("not pem", &s1.cert, &s1.key).unwrap_err();
    one_clear_line(&e, &["pool CA", "no certificate"]);
    // No TLS setting at all: bind says how to choose.
    let a = free_addrs(2);
    let mut b = ServerBuilder::new("s1");
    b.service(a[0]).control(a[1]).cluster_key(KEY);
    let e = b.bind().await.unwrap_err();
    one_clear_line(&e, &["tls: not set", "insecure plaintext"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_peers_of_a_tls_pool_and_tls_clients_of_a_plaintext_pool_fail_clearly() {
    // A plaintext migratory client is told the pool requires TLS.
    let addr = echo_server("s1", common::server_tls("s1")).await.unwrap();
    let e = MigratoryStream::connect(&[addr], &ClientTls::insecure_plaintext())
        .await
        .unwrap_err();
    one_clear_line(&e, &["requires TLS"]);
    // A TLS client of a plaintext server fails its handshake, saying so.
    let plain = echo_server("s1", ServerTls::insecure_plaintext())
        .await
        .unwrap();
    let e = MigratoryStream::connect(&[plain], &common::client_tls())
        .await
        .unwrap_err();
    one_clear_line(&e, &["TLS handshake"]);
    // The plaintext pool serves plaintext clients.
    let mut c = MigratoryStream::connect(&[plain], &ClientTls::insecure_plaintext())
        .await
        .unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
}

/// Runs the cluster key's handshake as `me` on `s`; returns whether the
/// server then keeps the connection (it must not).
async fn claims_to_be(mut s: common::TlsConn, me: &str) -> bool {
    use migratory::proto::peer::PeerLink;
    use migratory::proto::types::ServerId;
    let mut link = PeerLink::new(ServerId::new(me).unwrap(), KEY, [9; 32], None);
    let mut buf = vec![0u8; 4096];
    let run = async {
        loop {
            let out = link.take_output();
            if !out.is_empty() && (s.write_all(&out).await.is_err() || s.flush().await.is_err()) {
                return false;
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    if link.handle_input(&buf[..n]).is_err() {
                        return false;
                    }
                }
            }
        }
    };
    // A connection kept open past the handshake would still be reading.
    tokio::time::timeout(std::time::Duration::from_secs(3), run)
        .await
        .unwrap_or(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_address_takes_only_pool_certificates_that_name_the_claimed_id() {
    let a = free_addrs(4);
    let mut b = ServerBuilder::new("s1");
    b.tls(common::server_tls("s1"))
        .service(a[0])
        .control(a[1])
        .cluster_key(KEY)
        .peer(migratory::Peer {
            id: "s2".into(),
            service: a[2],
            control: a[3],
        });
    let _server = b.bind().await.unwrap();
    // No client certificate: the TLS handshake itself is refused.
    let refused = match common::tls_connect_as(a[1], "s1", None).await {
        Err(_) => true,
        Ok(mut s) => {
            s.write_all(b"x").await.ok();
            let _ = s.flush().await;
            let mut b = [0u8; 1];
            !matches!(s.read(&mut b).await, Ok(n) if n > 0)
        }
    };
    assert!(refused, "a client without a certificate was served");
    // A certificate from another CA: refused too.
    let other = PoolCerts::generate(migratory::tls::DEFAULT_POOL_NAME).unwrap();
    let foreign = other.server("s2").unwrap();
    let refused = match common::tls_connect_as(a[1], "s1", Some(&foreign)).await {
        Err(_) => true,
        Ok(s) => !claims_to_be(s, "s2").await,
    };
    assert!(refused, "a certificate from another CA was accepted");
    // The pool's operator certificate with the cluster key, claiming to be
    // peer s2 (what a relay between two servers would need): refused,
    // because the certificate does not name s2.
    let op = common::certs().operator().unwrap();
    let s = common::tls_connect_as(a[1], "s1", Some(&op)).await.unwrap();
    assert!(
        !claims_to_be(s, "s2").await,
        "a certificate that does not name s2 was accepted as s2"
    );
    // s2's own certificate is accepted as s2 (the check above can fail).
    let s2 = common::certs().server("s2").unwrap();
    let s = common::tls_connect_as(a[1], "s1", Some(&s2)).await.unwrap();
    assert!(claims_to_be(s, "s2").await, "s2 itself was refused");
}
