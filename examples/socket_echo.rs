//! An echo server in the shapes of MIGSOCK II's test programs (MIGSOCK report,
//! section 6): one process with many sockets, one process per connection,
//! or one thread per connection; and a socket-activated mode that serves
//! whatever sockets it is started with (`LISTEN_FDS`), which is how
//! `migratory sock restore --exec` and `migratory sock handoff --exec` hand
//! it live connections or a listening socket.
//!
//! ```sh
//! socket_echo --listen 127.0.0.1:7000 --connections 5 --mode thread
//! socket_echo --listen 127.0.0.1:7000            # serve until SIGTERM, then drain
//! socket_echo --activated                        # serve fds 3.. (LISTEN_FDS)
//! ```

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use migratory_repair::handoff::{exec_with_fds, listen_fds};
use migratory_repair::is_tcp_listener;

fn usage() -> ! {
    eprintln!(
        "usage: socket_echo --listen ADDR [--connections N --mode single|thread|process]\n       socket_echo --activated"
    );
    std::process::exit(2)
}

fn main() {
    // First, before any thread: the inherited descriptors.
    let inherited = match listen_fds() {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("socket_echo: {e}");
            std::process::exit(1);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("socket_echo: signal handler: {e}");
            std::process::exit(1);
        }
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if args.iter().any(|a| a == "--activated") {
        return serve_inherited(inherited, &stop);
    }
    let Some(addr) = get("--listen").and_then(|a| a.parse::<SocketAddr>().ok()) else {
        usage()
    };
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| {
        eprintln!("socket_echo: bind {addr}: {e}");
        std::process::exit(1)
    });
    match get("--connections") {
        None => serve_listener(listener, &stop),
        Some(n) => {
            let n: usize = n.parse().unwrap_or_else(|_| usage());
            let mode = get("--mode").unwrap_or_else(|| "thread".into());
            // Like MIGSOCK's count server: accept, then close the listener.
            let conns: Vec<TcpStream> = (0..n)
                .map(|_| listener.accept().map(|(s, _)| s))
                .collect::<Result<_, _>>()
                .unwrap_or_else(|e| {
                    eprintln!("socket_echo: accept: {e}");
                    std::process::exit(1)
                });
            drop(listener);
            println!("ready");
            match mode.as_str() {
                "single" => echo_all(conns),
                "thread" => {
                    let ts: Vec<_> = conns
                        .into_iter()
                        .map(|c| std::thread::spawn(move || echo(c)))
                        .collect();
                    ts.into_iter().for_each(|t| drop(t.join()));
                }
                "process" => {
                    let me = std::env::current_exe().expect("own path");
                    let kids: Vec<Child> = conns
                        .into_iter()
                        .map(|c| {
                            let mut cmd = Command::new(&me);
                            cmd.arg("--activated");
                            exec_with_fds(&mut cmd, vec![OwnedFd::from(c)]).expect("spawn a child")
                        })
                        .collect();
                    for mut k in kids {
                        let _ = k.wait();
                    }
                }
                _ => usage(),
            }
        }
    }
}

/// Echoes one connection until EOF, then closes it.
fn echo(mut c: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = c.shutdown(std::net::Shutdown::Write);
}

/// One thread echoing every connection (MIGSOCK's single-process program
/// with several sockets).
fn echo_all(mut conns: Vec<TcpStream>) {
    let mut buf = vec![0u8; 64 << 10];
    for c in &conns {
        let _ = c.set_nonblocking(true);
    }
    while !conns.is_empty() {
        let mut moved = false;
        conns.retain_mut(|c| match c.read(&mut buf) {
            Ok(0) => {
                let _ = c.shutdown(std::net::Shutdown::Write);
                false
            }
            Ok(n) => {
                moved = true;
                let _ = c.set_nonblocking(false);
                let ok = c.write_all(&buf[..n]).is_ok();
                let _ = c.set_nonblocking(true);
                ok
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => true,
            Err(_) => false,
        });
        if !moved {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Accepts until SIGTERM/SIGINT, then stops accepting and lets the
/// connections it has finish (a drain: nothing is reset).
fn serve_listener(listener: TcpListener, stop: &AtomicBool) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    let mut workers = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((c, _)) => {
                let _ = c.set_nonblocking(false);
                workers.push(std::thread::spawn(move || echo(c)));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    drop(listener);
    for w in workers {
        let _ = w.join();
    }
}

/// Serves inherited descriptors: listening sockets accept, connections
/// echo.
fn serve_inherited(fds: Vec<OwnedFd>, stop: &Arc<AtomicBool>) {
    let mut ts = Vec::new();
    for fd in fds {
        let c = TcpStream::from(fd);
        if is_tcp_listener(&c) {
            let l = TcpListener::from(OwnedFd::from(c));
            let stop = stop.clone();
            ts.push(std::thread::spawn(move || serve_listener(l, &stop)));
        } else {
            ts.push(std::thread::spawn(move || echo(c)));
        }
    }
    for t in ts {
        let _ = t.join();
    }
}
