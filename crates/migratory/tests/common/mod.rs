//! Helpers shared by the runtime's integration tests.

use std::net::SocketAddr;

/// Free loopback addresses: bound, then released for the test to bind.
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let ls: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap()).collect()
}
