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
//! # The `nft` command, and netlink
//!
//! The table, its sets and chains are made by the `nft` program (nftables'
//! own command line, `apt-get install nftables`) from a script on its
//! standard input ([`NetLock::take`]), before anything is dropped: that is
//! rule compilation, which only nftables' own tools do well, and it takes
//! tens of milliseconds off the critical path of a move. Running a program
//! is not linking it, so no GPL code enters this crate; the script is built
//! from typed names only, so nothing can be injected into it. Listing the
//! tables ([`tables`], [`release_all`]) is also `nft`'s.
//!
//! Everything done while a connection is frozen goes to the kernel over
//! netlink from this process instead (the crate's `nfnl` module): adding
//! set elements ([`NetLock::block`], [`NetLock::unblock`]), asking whether
//! they are still there ([`NetLock::check`]), and deleting the table
//! ([`NetLock::release`]). An `nft` run costs about 5 ms of process start
//! and cache fetch each time; one of these requests costs tens of
//! microseconds. No MIT/Apache crate encodes nf_tables messages, so that
//! module does (see its docs).

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::nfnl::{self, Change};

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
    /// The kernel refused a netlink request (e.g. no CAP_NET_ADMIN).
    #[error("nf_tables {what}: {source}")]
    Kernel {
        /// What was being done.
        what: &'static str,
        /// The kernel's error.
        source: io::Error,
    },
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
        for name in ["pass", "in", "out"] {
            for (v6, ty) in [(false, "ipv4_addr"), (true, "ipv6_addr")] {
                let _ = writeln!(
                    s,
                    "  set {name}{} {{ type {ty} . inet_service . {ty} . inet_service; flags timeout; }}",
                    if v6 { 6 } else { 4 }
                );
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
        s.push_str("}\n");
        self.run("lock", &s)?;
        // Which table this is, for `release` (nft's own listing in the
        // same run shows handle 0 for a table the run made).
        self.pin_table("lock")?;
        for &dir in directions {
            self.block(dir)?;
        }
        Ok(())
    }

    /// Adds `direction` to a lock taken with [`NetLock::take`] (one netlink
    /// transaction).
    pub fn block(&self, direction: Direction) -> Result<(), LockError> {
        let changes: Vec<Change<'_>> = [false, true]
            .into_iter()
            .filter_map(|v6| {
                let elems = self.elements(direction, v6, true);
                (!elems.is_empty()).then(|| Change::AddElements {
                    set: set_name(direction, v6),
                    elems,
                })
            })
            .collect();
        nfnl::apply(&self.table, &changes).map_err(|source| LockError::Kernel {
            what: "lock",
            source,
        })
    }

    /// Lifts `directions` of the lock but keeps its table (their 4-tuples
    /// go into the `pass` set): the fast way, one transaction that takes
    /// effect at once, to let packets through at the moment a restored
    /// socket goes live. Lifting what is not locked is no error.
    pub fn unblock(&self, directions: &[Direction]) -> Result<(), LockError> {
        let mut changes = Vec::new();
        for &dir in directions {
            for v6 in [false, true] {
                let elems = self.elements(dir, v6, true);
                if !elems.is_empty() {
                    changes.push(Change::AddElements {
                        set: if v6 { "pass6" } else { "pass4" },
                        elems,
                    });
                }
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        let unlock = |source| LockError::Kernel {
            what: "unlock",
            source,
        };
        match nfnl::apply(&self.table, &changes) {
            Ok(()) => {}
            // No table: nothing is locked, nothing to remove.
            Err(e) if gone(&e) => {
                self.set_pin(None);
                return Ok(());
            }
            Err(e) => return Err(unlock(e)),
        }
        // Right after: which table this is, for `release`.
        self.pin_table("unlock")
    }

    /// Whether every element of `direction` is still in place (the lock
    /// holds: it has neither expired nor been removed). Lifting with
    /// [`NetLock::unblock`] is this crate's own doing, not checked.
    pub fn check(&self, direction: Direction) -> Result<(), LockError> {
        for v6 in [false, true] {
            for (key, _) in self.elements(direction, v6, false) {
                let held = nfnl::has_element(&self.table, set_name(direction, v6), key).map_err(
                    |source| LockError::Kernel {
                        what: "check lock",
                        source,
                    },
                )?;
                if !held {
                    return Err(LockError::NotHeld);
                }
            }
        }
        Ok(())
    }

    /// Removes the lock's table: every packet passes again. A table already
    /// gone is no error.
    pub fn release(&self) -> Result<(), LockError> {
        let deleted = match self.pin() {
            Pin::Table(h) => nfnl::delete_table(h),
            Pin::Unknown => nfnl::delete_table_named(&self.table),
            Pin::Absent => return Ok(()),
        };
        match deleted {
            Err(e) if gone(&e) => Ok(()),
            other => other.map_err(|source| LockError::Kernel {
                what: "unlock",
                source,
            }),
        }
    }

    /// Runs `script` (`nft -f -`).
    fn run(&self, what: &'static str, script: &str) -> Result<(), LockError> {
        nft(&["-f", "-"], script).map(drop).map_err(|e| match e {
            LockError::Nft { stderr, .. } => LockError::Nft { what, stderr },
            e => e,
        })
    }

    fn pin(&self) -> Pin {
        *self.pinned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers which table of the lock's name is there now (its
    /// handle), or that there is none.
    fn pin_table(&self, what: &'static str) -> Result<(), LockError> {
        let handle =
            nfnl::table_handle(&self.table).map_err(|source| LockError::Kernel { what, source })?;
        self.set_pin(handle);
        Ok(())
    }

    fn set_pin(&self, handle: Option<u64>) {
        *self.pinned.lock().unwrap_or_else(|p| p.into_inner()) =
            handle.map_or(Pin::Absent, Pin::Table);
    }

    fn family(&self, v6: bool) -> impl Iterator<Item = &Connection> {
        self.connections
            .iter()
            .filter(move |c| c.local.is_ipv6() == v6)
    }

    /// The set elements of one family: keys, with the lock's timeout if
    /// `with_timeout`.
    fn elements(
        &self,
        dir: Direction,
        v6: bool,
        with_timeout: bool,
    ) -> Vec<(Vec<u8>, Option<Duration>)> {
        let timeout = with_timeout.then_some(self.timeout);
        self.family(v6)
            .map(|c| (element(dir, c), timeout))
            .collect()
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
            match nfnl::delete_table_named(name) {
                Ok(()) => removed.push(name.to_string()),
                Err(e) if gone(&e) => {}
                Err(source) => {
                    return Err(LockError::Kernel {
                        what: "unlock",
                        source,
                    })
                }
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

/// The set key (`saddr . sport . daddr . dport`) of the packets `dir`
/// drops.
fn element(dir: Direction, c: &Connection) -> Vec<u8> {
    match dir {
        Direction::Inbound => nfnl::key(c.peer, c.local),
        Direction::Outbound => nfnl::key(c.local, c.peer),
    }
}

/// The kernel's error for an object that does not exist.
fn gone(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOENT)
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
        // 10.0.0.2 . 5000 . 10.0.0.1 . 80
        assert_eq!(
            element(Direction::Inbound, &c),
            [10, 0, 0, 2, 0x13, 0x88, 0, 0, 10, 0, 0, 1, 0, 80, 0, 0]
        );
        // 10.0.0.1 . 80 . 10.0.0.2 . 5000
        assert_eq!(
            element(Direction::Outbound, &c),
            [10, 0, 0, 1, 0, 80, 0, 0, 10, 0, 0, 2, 0x13, 0x88, 0, 0]
        );
        let lock = NetLock::new(&[c], Duration::from_secs(2)).unwrap();
        assert_eq!(
            lock.elements(Direction::Inbound, false, true),
            [(
                element(Direction::Inbound, &c),
                Some(Duration::from_secs(2))
            )]
        );
        assert!(lock.elements(Direction::Inbound, true, true).is_empty());
        assert_eq!(lock.elements(Direction::Outbound, false, false)[0].1, None);
    }

    #[test]
    fn release_removes_the_table_it_saw() {
        let c = conn("10.0.0.1:80", "10.0.0.2:5000");
        let lock = NetLock::new(&[c], DEFAULT_TIMEOUT).unwrap();
        assert_eq!(lock.pin(), Pin::Unknown);
        // (The kernel's answer to "which table is it" is decoded and
        // tested in `nfnl`.)
        lock.set_pin(Some(42));
        assert_eq!(lock.pin(), Pin::Table(42));
        assert_eq!(lock.clone().pin(), Pin::Table(42));
        lock.set_pin(None);
        assert_eq!(lock.pin(), Pin::Absent);
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
