//! What the network-namespace tests share: the check that they can run,
//! `ip`, and running code inside a namespace.

use std::fs::File;
use std::os::fd::AsFd;
use std::process::Command;

use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

/// Why namespace tests cannot run here (not root, no `ip`), if so.
pub fn needs_root_and_ip() -> Option<&'static str> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root (network namespaces and TCP_REPAIR)");
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("needs `ip` from iproute2 (.ci/run installs it)");
    }
    None
}

/// Runs `ip` with `args`; panics with its error output if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes namespaces (best effort: for `Drop`).
pub fn delete_namespaces<'a>(names: impl IntoIterator<Item = &'a String>) {
    for ns in names {
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
}

/// Runs `f` on a thread inside namespace `ns` (sockets it creates live
/// there; commands it starts act there).
pub fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).expect("open the namespace");
        move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network)).expect("setns");
        f()
    })
}
