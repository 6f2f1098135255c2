//! Helpers shared by the runtime's integration tests.

use std::net::SocketAddr;

/// Free loopback addresses: bound, then released for the test to bind.
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
