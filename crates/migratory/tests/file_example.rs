//! The fig 6.1 example end to end: `file_server` (a pool in its own process)
//! serves a 64 MiB file to `file_client`, which migrates every 8 chunks;
//! the saved file's SHA-256 must equal the original's.

mod common;

use common::free_addrs;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

fn example(name: &str) -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

fn free_ports(n: usize) -> Vec<u16> {
    free_addrs(n).iter().map(|a| a.port()).collect()
}

struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sixty_four_mib_download_migrated_every_few_chunks() {
    let dir = std::env::temp_dir().join(format!("migratory-file-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data: Vec<u8> = (0..64u64 << 20)
        .map(|i| ((i * 2654435761) >> 11) as u8)
        .collect();
    std::fs::write(dir.join("big.bin"), &data).unwrap();
    let want: String = Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let p = free_ports(6);
    let join = |v: &[u16]| {
        v.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut server = Command::new(example("file_server"))
        .args([
            "--root",
            dir.to_str().unwrap(),
            "--certs",
            dir.join("pool").to_str().unwrap(),
            "--service-ports",
            &join(&p[..3]),
            "--control-ports",
            &join(&p[3..]),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start file_server (built by cargo test)");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    let _server = Kill(server);
    let out = dir.join("copy.bin");
    let client = Command::new(example("file_client"))
        .args([
            "--server",
            &format!("127.0.0.1:{}", p[0]),
            "--ca",
            dir.join("pool/ca.pem").to_str().unwrap(),
            "--file",
            "big.bin",
            "--out",
            out.to_str().unwrap(),
            "--migrate-every",
            "8",
        ])
        .output()
        .expect("run file_client");
    let stdout = String::from_utf8_lossy(&client.stdout);
    assert!(
        client.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&client.stderr)
    );
    assert!(stdout.contains(&format!("sha256 {want}")), "{stdout}");
    assert!(
        stdout.contains(&format!("bytes {}", 64u64 << 20)),
        "{stdout}"
    );
    let migrations: u64 = stdout
        .split("migrations ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(migrations >= 20, "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}
