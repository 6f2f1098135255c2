//! MTCP's example server (thesis fig 6.1), made real: a pool of file
//! servers in one process. A client sends `GET <name>\n`; the per-session
//! state is (file name, offset); the server snapshots after every chunk it
//! writes, and a server that receives the session resumes by seeking to the
//! offset. Every connection is TLS 1.3: the server makes a pool CA and its
//! servers' certificates in `--certs DIR` (unless `DIR/ca.pem` exists), and
//! the client trusts `DIR/ca.pem`. Run:
//!
//! ```sh
//! cargo run --example file_server -- --root DIR --certs /tmp/pool --service-ports 7101,7102,7103 --control-ports 7201,7202,7203
//! cargo run --example file_client -- --server 127.0.0.1:7101 --ca /tmp/pool/ca.pem --file NAME --out /tmp/copy --migrate-every 8
//! ```

use std::io::SeekFrom;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use migratory::{Arrival, Peer, PoolCerts, ServerBuilder, ServerTls, Session};
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

const CHUNK: usize = 64 * 1024;
const KEY: &[u8] = b"file server example cluster key!";

/// Fig 6.1's `state`: the file being served and how far.
fn encode(name: &str, off: u64) -> Vec<u8> {
    let mut v = off.to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

fn decode(state: &[u8]) -> Option<(String, u64)> {
    let (off, name) = state.split_at_checked(8)?;
    Some((
        String::from_utf8(name.to_vec()).ok()?,
        u64::from_be_bytes(off.try_into().ok()?),
    ))
}

/// Serves one session (fig 6.1 B).
async fn serve(mut s: Session, arrival: Arrival, root: PathBuf) -> std::io::Result<()> {
    let (name, mut off) = match arrival {
        // Migrated: resume from the exported state (lines 10-15).
        Arrival::Migrated { state } if !state.is_empty() => {
            decode(&state).ok_or_else(|| std::io::Error::other("bad state"))?
        }
        // New (or migrated before the first snapshot): parse the request,
        // then take the first snapshot (lines 3-9).
        _ => {
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while s.read(&mut b).await? == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            let name = line.strip_prefix("GET ").unwrap_or("").trim().to_string();
            s.snapshot(&encode(&name, 0))
                .map_err(std::io::Error::from)?;
            (name, 0)
        }
    };
    let path = root.join(Path::new(&name).file_name().unwrap_or_default());
    let mut f = File::open(&path).await?;
    f.seek(SeekFrom::Start(off)).await?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        // A write fails with "migrated" once the session moved: stop
        // (fig 6.1 lines 22-25).
        s.write_all(&buf[..n]).await?;
        off += n as u64;
        s.snapshot(&encode(&name, off))
            .map_err(std::io::Error::from)?;
    }
    s.shutdown().await
}

fn ports(args: &[String], flag: &str) -> Vec<u16> {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("missing {flag}"));
    args[i + 1]
        .split(',')
        .map(|p| p.parse().expect("a port number"))
        .collect()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let root = PathBuf::from(
        &args[args
            .iter()
            .position(|a| a == "--root")
            .expect("missing --root")
            + 1],
    );
    let svc = ports(&args, "--service-ports");
    let ctl = ports(&args, "--control-ports");
    let certs = PathBuf::from(
        &args[args
            .iter()
            .position(|a| a == "--certs")
            .expect("missing --certs")
            + 1],
    );
    let ids: Vec<String> = (0..svc.len()).map(|i| format!("s{}", i + 1)).collect();
    if !certs.join("ca.pem").exists() {
        let pool = PoolCerts::generate(migratory::tls::DEFAULT_POOL_NAME).expect("pool CA");
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        pool.write_dir(&certs, &ids)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    for i in 0..svc.len() {
        let mut b = ServerBuilder::new(&ids[i]);
        let tls = ServerTls::from_pem_files(
            certs.join("ca.pem"),
            certs.join(format!("{}.pem", ids[i])),
            certs.join(format!("{}.key", ids[i])),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        b.tls(tls)
            .service(addr(svc[i]))
            .control(addr(ctl[i]))
            .cluster_key(KEY);
        for j in (0..svc.len()).filter(|j| *j != i) {
            b.peer(Peer {
                id: format!("s{}", j + 1),
                service: addr(svc[j]),
                control: addr(ctl[j]),
            });
        }
        let mut server = b.bind().await.unwrap_or_else(|e| panic!("s{}: {e}", i + 1));
        let root = root.clone();
        tokio::spawn(async move {
            while let Some((s, arrival)) = server.accept().await {
                let root = root.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(s, arrival, root).await {
                        if !migratory::is_migrated(&e) {
                            eprintln!("session error: {e}");
                        }
                    }
                });
            }
        });
    }
    println!("ready");
    // Serve until killed.
    std::future::pending::<()>().await;
}
