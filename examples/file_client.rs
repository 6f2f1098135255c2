//! Client for `file_server`: downloads a file through a `MigratoryStream`,
//! migrating to the next server every N chunks, and prints the SHA-256 of
//! what it saved and how many migrations happened.

use std::net::SocketAddr;

use migratory::proto::error::SessionError;
use migratory::{ClientTls, MigratoryStream};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn arg(args: &[String], flag: &str) -> String {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("missing {flag}"));
    args[i + 1].clone()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let server: SocketAddr = arg(&args, "--server").parse().expect("--server ADDR");
    let file = arg(&args, "--file");
    let out = arg(&args, "--out");
    let every: u64 = arg(&args, "--migrate-every")
        .parse()
        .expect("--migrate-every N");
    // The pool CA that `file_server --certs DIR` wrote (DIR/ca.pem).
    let tls = ClientTls::from_ca_file(arg(&args, "--ca")).unwrap_or_else(|e| panic!("{e}"));
    let mut s = MigratoryStream::connect(&[server], &tls)
        .await
        .expect("connect");
    s.write_all(format!("GET {file}\n").as_bytes())
        .await
        .expect("request");
    s.shutdown().await.expect("close the request side");
    let mut saved = tokio::fs::File::create(&out).await.expect("create --out");
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let (mut total, mut chunks) = (0u64, 0u64);
    loop {
        let n = s.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        saved.write_all(&buf[..n]).await.expect("save");
        sha.update(&buf[..n]);
        total += n as u64;
        chunks += 1;
        if every > 0 && chunks % every == 0 {
            match s.migrate(None).await {
                Ok(_) => {}
                // The server already closed: nothing left to move.
                Err(migratory::Error::Session(SessionError::Closed)) => {}
                Err(e) => panic!("migrate: {e}"),
            }
        }
    }
    let hex: String = sha.finalize().iter().map(|b| format!("{b:02x}")).collect();
    println!(
        "bytes {total} migrations {} sha256 {hex}",
        s.stats().migrations
    );
}
