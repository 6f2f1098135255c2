//! The network lock: while a connection moves, its packets are dropped on
//! this host so that nothing reaches (or is answered by) a socket that is
//! frozen, gone, or not yet restored (CRIU's "network lock", with nftables).
//!
//! # What is dropped, and where
//!
//! Each lock is an nftables table of its own, `inet migratory_<hash>`
//! ([`NetLock::table`]; the hash is of the locked connections, so the host
//! that restores an image finds the same name). It holds two chains at the
//! `raw` priority, before connection tracking, and never anything else:
//!
//! * `inbound` (hook `prerouting`): drops packets whose
//!   `saddr . sport . daddr . dport` is a locked connection seen from the
//!   peer ([`Direction::Inbound`]);
//! * `outbound` (hook `output`): drops this host's packets of a locked
//!   connection ([`Direction::Outbound`]).
//!
//! Both chains first accept packets marked [`LOCK_MARK`] (0xC114, CRIU's
//! mark): the peer's FIN that a restore re-creates passes the lock that
//! way; then packets whose 4-tuple is in the `pass` set: lifting a lock at
//! the moment a restored socket goes live is adding to that set, which the
//! kernel does at once (removing set elements waits for an RCU grace
//! period, about 15 ms here). The policy of both chains is `accept`:
//! nothing but the locked 4-tuples is touched.
//!
//! # It cannot leak
//!
//! The connections are set elements with a timeout: if the tool dies
//! between lock and unlock, traffic resumes by itself when they expire
//! ([`DEFAULT_TIMEOUT`], well above a normal move). [`NetLock::release`]
//! removes the table; [`release_all`] (`migratory sock unlock`) removes
//! every lock table this crate ever made on the host (in this network
//! namespace).
//!
//! # Why the `nft` command
//!
//! The rules are given to the `nft` program (nftables' own command line,
//! `apt-get install nftables`) as a script on its standard input: the
//! kernel's netlink interface for nf_tables is undocumented outside
//! libnftnl, and the Rust crates that speak it are GPL (`rustables`), bind
//! the GPL libnftnl (`nftnl`), or are not MIT/Apache. Running a program is
//! not linking it, so no GPL code enters this crate; the script is built
//! from typed addresses and ports only, so nothing can be injected into it.
//! Each call costs about 4 ms (creating or deleting a table about 30 ms,
//! which is done off the critical path of a move).

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};
use thiserror::Error;

/// The packet mark that passes every lock (CRIU's 0xC114): the re-created
/// FIN of a restored half-closed connection carries it.
pub const LOCK_MARK: u32 = 0xC114;

/// How long a lock holds if nobody lifts it: far above a normal move
/// (milliseconds), short enough that a crashed tool does not cut a
/// connection for good.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Every lock table's name starts with this.
pub const TABLE_PREFIX: &str = "migratory_";

/// The longest timeout nftables takes for a set element is far larger;
/// ours is bounded so a typo cannot lock a connection for weeks.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// One TCP connection as this host sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Connection {
    /// Our address and port.
    pub local: SocketAddr,
    /// The peer's address and port.
    pub peer: SocketAddr,
}

/// Which of a connection's packets a lock drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The peer's packets to us (the lock of the issue: nothing reaches the
    /// frozen socket, nothing is answered with a reset).
    Inbound,
    /// Our packets to the peer (its acknowledgements stop, so a sending
    /// peer stops once its window is out, and loses nothing when the
    /// inbound lock follows).
    Outbound,
}

/// Why a lock could not be taken, checked or lifted.
#[derive(Debug, Error)]
pub enum LockError {
    /// The `nft` program is not installed.
    #[error(
        "the network lock needs the `nft` command (apt-get install nftables), or pass --no-lock"
    )]
    NftMissing,
    /// `nft` refused the request; `stderr` says why (e.g. no CAP_NET_ADMIN).
    #[error("nft {what}: {stderr}")]
    Nft {
        /// What was being done.
        what: &'static str,
        /// nft's message.
        stderr: String,
    },
    /// Running `nft` failed.
    #[error("running nft: {0}")]
    Io(#[from] io::Error),
    /// The lock's elements are gone (expired, or removed by someone else).
    #[error("the network lock no longer holds (expired or removed)")]
    NotHeld,
    /// A connection whose ends are of different address families.
    #[error("connection {0} -> {1} mixes IPv4 and IPv6")]
    MixedFamilies(SocketAddr, SocketAddr),
    /// The timeout is zero or above [`MAX_TIMEOUT`].
    #[error("lock timeout {0:?}: must be between 1 s and 24 h")]
    BadTimeout(Duration),
}

/// A lock on some connections: an nftables table of its own. Dropping the
/// handle does not lift the lock (a checkpointed connection stays locked
/// until it is restored, possibly by another process); call
/// [`NetLock::release`].
#[derive(Debug)]
pub struct NetLock {
    table: String,
    connections: Vec<Connection>,
    timeout: Duration,
    /// The table this handle took, or found when it lifted the lock:
    /// [`NetLock::release`] removes that table only, never one that a
    /// later move of the same connections made since (the restore of a
    /// move and the checkpoint of the next one may overlap).
    pinned: Mutex<Pin>,
}

/// Which table [`NetLock::release`] removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pin {
    /// Not known: the table of that name.
    Unknown,
    /// The table with this nftables handle.
    Table(u64),
    /// There was no table: none.
    Absent,
}

impl Clone for NetLock {
    fn clone(&self) -> NetLock {
        NetLock {
            table: self.table.clone(),
            connections: self.connections.clone(),
            timeout: self.timeout,
            pinned: Mutex::new(self.pin()),
        }
    }
}

impl NetLock {
    /// The lock of `connections` (in any order), not yet taken: the same
    /// table name on every host and in every process.
    pub fn new(connections: &[Connection], timeout: Duration) -> Result<NetLock, LockError> {
        if timeout < Duration::from_secs(1) || timeout > MAX_TIMEOUT {
            return Err(LockError::BadTimeout(timeout));
        }
        let mut connections = connections.to_vec();
        connections.sort();
        connections.dedup();
        let mut h = Sha256::new();
        for c in &connections {
            if c.local.is_ipv4() != c.peer.is_ipv4() {
                return Err(LockError::MixedFamilies(c.local, c.peer));
            }
            h.update(format!("{} {};", c.local, c.peer));
        }
        let digest = h.finalize();
        let mut table = TABLE_PREFIX.to_string();
        for b in &digest[..8] {
            let _ = write!(table, "{b:02x}");
        }
        Ok(NetLock {
            table,
            connections,
            timeout,
            pinned: Mutex::new(Pin::Unknown),
        })
    }

    /// The nftables table (family `inet`) of this lock.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The locked connections.
    pub fn connections(&self) -> &[Connection] {
        &self.connections
    }

    /// Creates the lock's table (replacing a leftover of the same name)
    /// and drops the connections' packets in `directions` from now on.
    pub fn take(&self, directions: &[Direction]) -> Result<(), LockError> {
        let t = &self.table;
        let mut s = String::new();
        // The classic idiom for "replace": add (no-op if present), delete,
        // define; nft applies the whole script as one transaction.
        let _ = writeln!(
            s,
            "add table inet {t}\ndelete table inet {t}\ntable inet {t} {{"
        );
        for v6 in [false, true] {
            let ty = if v6 { "ipv6_addr" } else { "ipv4_addr" };
            let _ = writeln!(
                s,
                "  set pass{} {{ type {ty} . inet_service . {ty} . inet_service; flags timeout; }}",
                if v6 { 6 } else { 4 }
            );
        }
        for (dir, name) in [(Direction::Inbound, "in"), (Direction::Outbound, "out")] {
            for v6 in [false, true] {
                let ty = if v6 { "ipv6_addr" } else { "ipv4_addr" };
                let _ = write!(
                    s,
                    "  set {name}{} {{ type {ty} . inet_service . {ty} . inet_service; flags timeout;",
                    if v6 { 6 } else { 4 }
                );
                if directions.contains(&dir) {
                    let elems = self.elements(dir, v6, true);
                    if !elems.is_empty() {
                        let _ = write!(s, " elements = {{ {elems} }};");
                    }
                }
                s.push_str(" }\n");
            }
        }
        for (chain, hook, set) in [
            ("inbound", "prerouting", "in"),
            ("outbound", "output", "out"),
        ] {
            let _ = writeln!(
                s,
                "  chain {chain} {{ type filter hook {hook} priority raw; policy accept;\n    meta mark {LOCK_MARK:#010x} accept\n    ip saddr . tcp sport . ip daddr . tcp dport @pass4 accept\n    ip6 saddr . tcp sport . ip6 daddr . tcp dport @pass6 accept\n    ip saddr . tcp sport . ip daddr . tcp dport @{set}4 drop\n    ip6 saddr . tcp sport . ip6 daddr . tcp dport @{set}6 drop\n  }}"
            );
        }
        // In the same run: which table this is, for `release`.
        let _ = writeln!(s, "}}\nlist table inet {t}");
        let listing = self.run("lock", &s)?;
        self.set_pin(&listing);
        Ok(())
    }

    /// Adds `direction` to a lock taken with [`NetLock::take`].
    pub fn block(&self, direction: Direction) -> Result<(), LockError> {
        let mut s = String::new();
        for v6 in [false, true] {
            let elems = self.elements(direction, v6, true);
            if !elems.is_empty() {
                let _ = writeln!(
                    s,
                    "add element inet {} {} {{ {elems} }}",
                    self.table,
                    set_name(direction, v6)
                );
            }
        }
        self.run("lock", &s).map(drop)
    }

    /// Lifts `directions` of the lock but keeps its table (their 4-tuples
    /// go into the `pass` set): the fast way, one transaction that takes
    /// effect at once, to let packets through at the moment a restored
    /// socket goes live. Lifting what is not locked is no error.
    pub fn unblock(&self, directions: &[Direction]) -> Result<(), LockError> {
        let mut s = String::new();
        for &dir in directions {
            for v6 in [false, true] {
                let elems = self.elements(dir, v6, true);
                if !elems.is_empty() {
                    let _ = writeln!(
                        s,
                        "add element inet {} pass{} {{ {elems} }}",
                        self.table,
                        if v6 { 6 } else { 4 }
                    );
                }
            }
        }
        if s.is_empty() {
            return Ok(());
        }
        // In the same run: which table this is, for `release`.
        let _ = writeln!(s, "list table inet {}", self.table);
        match self.run("unlock", &s) {
            Ok(listing) => {
                self.set_pin(&listing);
                Ok(())
            }
            // No table: nothing is locked, nothing to remove.
            Err(LockError::Nft { stderr, .. }) if gone(&stderr) => {
                *self.pinned.lock().unwrap_or_else(|p| p.into_inner()) = Pin::Absent;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Whether every element of `direction` is still in place (the lock
    /// holds: it has neither expired nor been removed). Lifting with
    /// [`NetLock::unblock`] is this crate's own doing, not checked.
    pub fn check(&self, direction: Direction) -> Result<(), LockError> {
        for v6 in [false, true] {
            let elems = self.elements(direction, v6, false);
            if elems.is_empty() {
                continue;
            }
            let cmd = format!(
                "get element inet {} {} {{ {elems} }}",
                self.table,
                set_name(direction, v6)
            );
            match self.run("check lock", &cmd) {
                Ok(_) => {}
                Err(LockError::Nft { stderr, .. }) if gone(&stderr) => {
                    return Err(LockError::NotHeld)
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Removes the lock's table: every packet passes again. A table already
    /// gone is no error.
    pub fn release(&self) -> Result<(), LockError> {
        let which = match self.pin() {
            Pin::Table(h) => format!("delete table inet handle {h}"),
            Pin::Unknown => format!("delete table inet {}", self.table),
            Pin::Absent => return Ok(()),
        };
        match self.run("unlock", &which) {
            Err(LockError::Nft { stderr, .. }) if gone(&stderr) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Runs `script` (`nft -a -f -`: listings show handles); returns
    /// what it printed.
    fn run(&self, what: &'static str, script: &str) -> Result<String, LockError> {
        nft(&["-a", "-f", "-"], script).map_err(|e| match e {
            LockError::Nft { stderr, .. } => LockError::Nft { what, stderr },
            e => e,
        })
    }

    fn pin(&self) -> Pin {
        *self.pinned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers the handle of the table in `listing` (`nft -a list
    /// table`).
    fn set_pin(&self, listing: &str) {
        let handle = listing
            .lines()
            .find(|l| l.trim_start().starts_with("table inet"))
            .and_then(|l| l.rsplit_once("# handle "))
            .and_then(|(_, h)| h.trim().parse().ok());
        *self.pinned.lock().unwrap_or_else(|p| p.into_inner()) =
            handle.map_or(Pin::Unknown, Pin::Table);
    }

    fn family(&self, v6: bool) -> impl Iterator<Item = &Connection> {
        self.connections
            .iter()
            .filter(move |c| c.local.is_ipv6() == v6)
    }

    /// The set elements of one family, comma-separated.
    fn elements(&self, dir: Direction, v6: bool, with_timeout: bool) -> String {
        let timeout = with_timeout.then_some(self.timeout);
        self.family(v6)
            .map(|c| element(dir, c, timeout))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Removes every lock table of this crate in this network namespace
/// (`migratory sock unlock`): the leftovers of a tool that died. Returns
/// the tables removed.
pub fn release_all() -> Result<Vec<String>, LockError> {
    let out = nft(&["list", "tables", "inet"], "")?;
    let mut removed = Vec::new();
    for line in out.lines() {
        let Some(name) = line.trim().strip_prefix("table inet ") else {
            continue;
        };
        if is_lock_table(name) {
            match nft_script("unlock", &format!("delete table inet {name}")) {
                Ok(()) => removed.push(name.to_string()),
                Err(LockError::Nft { stderr, .. }) if gone(&stderr) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// The lock tables of this crate now present in this network namespace.
pub fn tables() -> Result<Vec<String>, LockError> {
    let out = nft(&["list", "tables", "inet"], "")?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table inet "))
        .filter(|n| is_lock_table(n))
        .map(str::to_string)
        .collect())
}

/// Whether the `nft` command can be run.
pub fn nft_available() -> bool {
    Command::new("nft")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_lock_table(name: &str) -> bool {
    name.strip_prefix(TABLE_PREFIX)
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn set_name(dir: Direction, v6: bool) -> &'static str {
    match (dir, v6) {
        (Direction::Inbound, false) => "in4",
        (Direction::Inbound, true) => "in6",
        (Direction::Outbound, false) => "out4",
        (Direction::Outbound, true) => "out6",
    }
}

/// `saddr . sport . daddr . dport` of the packets `dir` drops.
fn element(dir: Direction, c: &Connection, timeout: Option<Duration>) -> String {
    let (src, dst) = match dir {
        Direction::Inbound => (c.peer, c.local),
        Direction::Outbound => (c.local, c.peer),
    };
    let ip = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => v4.to_string(),
        // Scope ids have no place in nft's syntax; the address is enough.
        IpAddr::V6(v6) => v6.to_string(),
    };
    let mut e = format!(
        "{} . {} . {} . {}",
        ip(src),
        src.port(),
        ip(dst),
        dst.port()
    );
    if let Some(t) = timeout {
        let _ = write!(e, " timeout {}ms", t.as_millis());
    }
    e
}

/// nft's message for an object that does not exist.
fn gone(stderr: &str) -> bool {
    stderr.contains("No such file or directory")
}

fn nft_script(what: &'static str, script: &str) -> Result<(), LockError> {
    nft(&["-f", "-"], script).map(drop).map_err(|e| match e {
        LockError::Nft { stderr, .. } => LockError::Nft { what, stderr },
        e => e,
    })
}

/// Runs `nft args` with `stdin`, returns its standard output.
fn nft(args: &[&str], stdin: &str) -> Result<String, LockError> {
    finish_nft(spawn_nft(args)?, stdin)
}

/// Starts `nft args`, which waits for its standard input.
fn spawn_nft(args: &[&str]) -> Result<Child, LockError> {
    Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => LockError::NftMissing,
            _ => LockError::Io(e),
        })
}

/// Gives a started `nft` its input, waits for it, returns its output.
fn finish_nft(mut child: Child, stdin: &str) -> Result<String, LockError> {
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // nft repeats the offending line under its message: keep the first.
        let first = stderr.lines().next().unwrap_or("").trim();
        Err(LockError::Nft {
            what: "command",
            stderr: if first.is_empty() {
                format!("exit status {}", out.status)
            } else {
                first.to_string()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(l: &str, p: &str) -> Connection {
        Connection {
            local: l.parse().unwrap(),
            peer: p.parse().unwrap(),
        }
    }

    #[test]
    fn table_name_is_the_same_for_the_same_connections() {
        let a = conn("10.0.0.1:80", "10.0.0.2:5000");
        let b = conn("[::1]:80", "[::1]:5001");
        let t = Duration::from_secs(5);
        let x = NetLock::new(&[a, b], t).unwrap();
        let y = NetLock::new(&[b, a, a], t).unwrap();
        assert_eq!(x.table(), y.table());
        assert!(is_lock_table(x.table()), "{}", x.table());
        assert_ne!(x.table(), NetLock::new(&[a], t).unwrap().table());
        assert!(!is_lock_table("migratory_xyz"));
        assert!(!is_lock_table("filter"));
    }

    #[test]
    fn elements_name_the_packets_dropped() {
        let c = conn("10.0.0.1:80", "10.0.0.2:5000");
        assert_eq!(
            element(Direction::Inbound, &c, Some(Duration::from_secs(2))),
            "10.0.0.2 . 5000 . 10.0.0.1 . 80 timeout 2000ms"
        );
        assert_eq!(
            element(Direction::Outbound, &c, None),
            "10.0.0.1 . 80 . 10.0.0.2 . 5000"
        );
    }

    #[test]
    fn release_removes_the_table_it_saw() {
        let c = conn("10.0.0.1:80", "10.0.0.2:5000");
        let lock = NetLock::new(&[c], DEFAULT_TIMEOUT).unwrap();
        assert_eq!(lock.pin(), Pin::Unknown);
        let listing = format!(
            "table inet {} {{ # handle 42\n\tset in4 {{ # handle 3\n",
            lock.table()
        );
        lock.set_pin(&listing);
        assert_eq!(lock.pin(), Pin::Table(42));
        assert_eq!(lock.clone().pin(), Pin::Table(42));
        lock.set_pin("garbage");
        assert_eq!(lock.pin(), Pin::Unknown);
    }

    #[test]
    fn bad_locks_are_refused() {
        let c = conn("10.0.0.1:80", "[::1]:5000");
        assert!(matches!(
            NetLock::new(&[c], DEFAULT_TIMEOUT),
            Err(LockError::MixedFamilies(..))
        ));
        let c = conn("10.0.0.1:80", "10.0.0.2:5000");
        assert!(matches!(
            NetLock::new(&[c], Duration::ZERO),
            Err(LockError::BadTimeout(_))
        ));
        assert!(NetLock::new(&[c], MAX_TIMEOUT * 2).is_err());
    }
}
