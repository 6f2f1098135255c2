//! The pool configuration file (TOML): the cluster key, the TLS files,
//! every server's addresses, and the limits and timeouts they share.
//!
//! ```toml
//! cluster_key_file = "cluster.key"     # or cluster_key = "..."; never logged
//! [tls]                                # optional: these are the defaults
//! dir = "certs"                        # ca.pem, <id>.pem, <id>.key, operator.pem/.key
//! pool_name = "pool.migratory"         # the name every server certificate carries
//! [[server]]
//! id = "s1"
//! service = "127.0.0.1:7101"           # clients connect here
//! control = "127.0.0.1:7201"           # peers and operators connect here
//! # cert = "...", key = "..."          # instead of <dir>/s1.pem and <dir>/s1.key
//! ```
//!
//! TLS is always on unless the file says `insecure_plaintext = true`.
//! `migratory certs --config FILE` makes the files `[tls]` names.
//!
//! Every error is one line naming the file and the key at fault.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use migratory::proto::config::{Limits, ServerTimeouts};
use migratory::proto::server::BalanceConfig;
use migratory::server::DEFAULT_PREAMBLE_WAIT;
#[cfg(test)]
use migratory::ClientTls;
use migratory::{OperatorTls, Peer, ServerBuilder, ServerTls, OPERATOR_ID};
use serde::Deserialize;

/// Shortest cluster key accepted, in bytes.
const MIN_KEY_LEN: usize = 16;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cluster_key: Option<String>,
    cluster_key_file: Option<PathBuf>,
    #[serde(default)]
    insecure_plaintext: bool,
    #[serde(default)]
    tls: RawTls,
    #[serde(default, with = "humantime_serde")]
    preamble_wait: Option<Duration>,
    max_state: Option<usize>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    balance: RawBalance,
    #[serde(rename = "server", default)]
    servers: Vec<RawServer>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    dir: Option<PathBuf>,
    ca: Option<PathBuf>,
    pool_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_sessions: Option<usize>,
    max_connections: Option<usize>,
    max_connections_per_address: Option<usize>,
    max_frame: Option<usize>,
    max_data_frame: Option<usize>,
    recv_window: Option<u64>,
    send_buffer: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    #[serde(default, with = "humantime_serde")]
    handshake: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    state_request: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    settle: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    frozen: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    orphan: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    backup: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBalance {
    rebalance: Option<bool>,
    factor: Option<f64>,
    max_moves: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    settle: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    min_residence: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    report_every: Option<Duration>,
    drain_parallel: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    id: String,
    service: SocketAddr,
    control: SocketAddr,
    backup: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// One server of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    /// Its id.
    pub id: String,
    /// Where clients connect.
    pub service: SocketAddr,
    /// Where peers and operators connect.
    pub control: SocketAddr,
    /// The peer that keeps eager replicas of its sessions.
    pub backup: Option<String>,
    /// Its certificate and key files (TLS).
    pub cert: PathBuf,
    /// Its private key file.
    pub key: PathBuf,
}

/// Where a pool's TLS files are (`None` in [`PoolConfig`]: insecure
/// plaintext).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Folder of the files `migratory certs` writes.
    pub dir: PathBuf,
    /// The pool CA's certificate.
    pub ca: PathBuf,
    /// The name every server certificate carries.
    pub pool_name: String,
}

/// A checked pool configuration.
#[derive(Clone)]
pub struct PoolConfig {
    /// Where it was read from.
    pub path: PathBuf,
    key: Vec<u8>,
    /// The servers, in file order.
    pub servers: Vec<ServerEntry>,
    limits: Limits,
    timeouts: ServerTimeouts,
    preamble_wait: Duration,
    max_state: usize,
    /// Client connections a server holds at once: in all, and from one
    /// source address.
    max_connections: (usize, usize),
    /// Sessions a server keeps before it sends new ones to peers.
    max_sessions: usize,
    balance: BalanceConfig,
    /// The TLS files; `None` when the pool runs insecure plaintext.
    pub tls: Option<TlsFiles>,
}

impl fmt::Debug for PoolConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("PoolConfig")
            .field("path", &self.path)
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

/// A configuration error: one line, naming the file and the key at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PoolConfig {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        Self::parse(&text, path)
    }

    /// Parses and checks `text`, read from `path` (relative key files are
    /// found beside it).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file = path.display();
        let at = |key: &str, what: String| ConfigError(format!("{file}: {key}: {what}"));
        let de = toml::Deserializer::parse(text).map_err(|e| {
            let line = e.span().map_or(0, |s| line_of(text, s.start));
            ConfigError(format!("{file}: line {line}: {}", e.message()))
        })?;
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let line = e.inner().span().map_or(0, |s| line_of(text, s.start));
            let path = e.path().to_string();
            let key = if path == "." {
                "(top level)".into()
            } else {
                path
            };
            ConfigError(format!(
                "{file}: {key} (line {line}): {}",
                e.inner().message()
            ))
        })?;
        let key = match (&raw.cluster_key, &raw.cluster_key_file) {
            (Some(_), Some(_)) => {
                return Err(at(
                    "cluster_key_file",
                    "give cluster_key or cluster_key_file, not both".into(),
                ))
            }
            (None, None) => {
                return Err(at(
                    "cluster_key_file",
                    "missing (or give cluster_key); `migratory keygen` makes one".into(),
                ))
            }
            (Some(k), None) => {
                let k = k.trim().as_bytes().to_vec();
                if k.len() < MIN_KEY_LEN {
                    return Err(at(
                        "cluster_key",
                        format!("must be at least {MIN_KEY_LEN} bytes"),
                    ));
                }
                k
            }
            (None, Some(f)) => {
                let full = path.parent().unwrap_or(Path::new(".")).join(f);
                let content = std::fs::read_to_string(&full).map_err(|e| {
                    at(
                        "cluster_key_file",
                        format!("cannot read {}: {e}", full.display()),
                    )
                })?;
                let k = content.trim().as_bytes().to_vec();
                if k.len() < MIN_KEY_LEN {
                    return Err(at(
                        "cluster_key_file",
                        format!(
                            "{}: the key must be at least {MIN_KEY_LEN} bytes",
                            full.display()
                        ),
                    ));
                }
                k
            }
        };
        if raw.servers.is_empty() {
            return Err(at("server", "no [[server]] entries".into()));
        }
        let beside = |f: &Path| path.parent().unwrap_or(Path::new(".")).join(f);
        let dir = beside(raw.tls.dir.as_deref().unwrap_or(Path::new("certs")));
        let pool_name = raw
            .tls
            .pool_name
            .clone()
            .unwrap_or_else(|| migratory::tls::DEFAULT_POOL_NAME.into());
        if rustls_pki_types::ServerName::try_from(pool_name.as_str()).is_err() {
            return Err(at(
                "tls.pool_name",
                format!("{pool_name:?} is not a DNS name"),
            ));
        }
        let tls_given =
            raw.tls.dir.is_some() || raw.tls.ca.is_some() || raw.tls.pool_name.is_some();
        if raw.insecure_plaintext
            && (tls_given
                || raw
                    .servers
                    .iter()
                    .any(|s| s.cert.is_some() || s.key.is_some()))
        {
            return Err(at(
                "insecure_plaintext",
                "true, but TLS files are given too: choose one".into(),
            ));
        }
        let tls = (!raw.insecure_plaintext).then(|| TlsFiles {
            ca: raw
                .tls
                .ca
                .as_deref()
                .map_or_else(|| dir.join("ca.pem"), beside),
            dir: dir.clone(),
            pool_name,
        });
        let mut servers: Vec<ServerEntry> = Vec::new();
        for (i, s) in raw.servers.iter().enumerate() {
            let key = |k: &str| format!("server[{i}].{k}");
            if s.id.is_empty() || s.id.len() > 64 || s.id == OPERATOR_ID {
                return Err(at(
                    &key("id"),
                    format!("{:?}: must be 1 to 64 bytes, and not {OPERATOR_ID:?}", s.id),
                ));
            }
            if let Some(j) = servers.iter().position(|o| o.id == s.id) {
                return Err(at(
                    &key("id"),
                    format!("{:?} is also the id of server[{j}]", s.id),
                ));
            }
            for (k, addr) in [("service", s.service), ("control", s.control)] {
                let clash = servers
                    .iter()
                    .position(|o| o.service == addr || o.control == addr);
                if let Some(j) = clash {
                    return Err(at(
                        &key(k),
                        format!("{addr} is already used by server[{j}]"),
                    ));
                }
            }
            if s.service == s.control {
                return Err(at(&key("control"), "must differ from service".into()));
            }
            if rustls_pki_types::ServerName::try_from(s.id.as_str()).is_err() {
                return Err(at(
                    &key("id"),
                    format!("{:?}: must be a DNS name (its certificate names it)", s.id),
                ));
            }
            servers.push(ServerEntry {
                id: s.id.clone(),
                service: s.service,
                control: s.control,
                backup: s.backup.clone(),
                cert: s
                    .cert
                    .as_deref()
                    .map_or_else(|| dir.join(format!("{}.pem", s.id)), beside),
                key: s
                    .key
                    .as_deref()
                    .map_or_else(|| dir.join(format!("{}.key", s.id)), beside),
            });
        }
        for (i, s) in servers.iter().enumerate() {
            if let Some(b) = &s.backup {
                if *b == s.id || !servers.iter().any(|o| o.id == *b) {
                    return Err(at(
                        &format!("server[{i}].backup"),
                        format!("{b:?} is not another server of the pool"),
                    ));
                }
            }
        }
        let mut limits = Limits::default();
        let l = &raw.limits;
        limits.max_frame = l.max_frame.unwrap_or(limits.max_frame);
        limits.max_data_frame = l.max_data_frame.unwrap_or(limits.max_data_frame);
        limits.recv_window = l.recv_window.unwrap_or(limits.recv_window);
        limits.send_buffer = l.send_buffer.unwrap_or(limits.send_buffer);
        if !(1024..=16 << 20).contains(&limits.max_data_frame) {
            return Err(at(
                "limits.max_data_frame",
                "must be 1 KiB to 16 MiB".into(),
            ));
        }
        if limits.max_frame < limits.max_data_frame + 64 {
            return Err(at(
                "limits.max_frame",
                "must exceed limits.max_data_frame by at least 64 bytes".into(),
            ));
        }
        if limits.recv_window < 64 * 1024 || limits.recv_window > 1 << 30 {
            return Err(at("limits.recv_window", "must be 64 KiB to 1 GiB".into()));
        }
        if limits.send_buffer < 64 * 1024 || limits.send_buffer > 1 << 30 {
            return Err(at("limits.send_buffer", "must be 64 KiB to 1 GiB".into()));
        }
        let max_connections = (
            l.max_connections
                .unwrap_or(migratory::server::DEFAULT_MAX_CONNECTIONS),
            l.max_connections_per_address
                .unwrap_or(migratory::server::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS),
        );
        for (k, v) in [
            ("limits.max_connections", max_connections.0),
            ("limits.max_connections_per_address", max_connections.1),
        ] {
            if !(1..=1 << 24).contains(&v) {
                return Err(at(k, "must be 1 to 16777216".into()));
            }
        }
        let max_sessions = l.max_sessions.unwrap_or(100_000);
        if !(1..=1 << 24).contains(&max_sessions) {
            return Err(at("limits.max_sessions", "must be 1 to 16777216".into()));
        }
        let rb = &raw.balance;
        let mut balance = BalanceConfig::default();
        if let Some(d) = rb.report_every {
            if d < Duration::from_millis(100) || d > Duration::from_secs(60) {
                return Err(at("balance.report_every", "must be 100ms to 60s".into()));
            }
            balance.report_every = d;
            balance.stale_after = 3 * d;
        }
        if let Some(n) = rb.drain_parallel {
            if !(1..=1 << 20).contains(&n) {
                return Err(at("balance.drain_parallel", "must be 1 to 1048576".into()));
            }
            balance.drain_parallel = n;
        }
        // Checked whether or not the rebalancer is on.
        let mut r = balance.rebalance.take().unwrap_or_default();
        if let Some(f) = rb.factor {
            if !(1.0..=100.0).contains(&f) {
                return Err(at("balance.factor", "must be 1.0 to 100.0".into()));
            }
            r.factor = f;
        }
        if let Some(n) = rb.max_moves {
            if !(1..=1 << 20).contains(&n) {
                return Err(at("balance.max_moves", "must be 1 to 1048576".into()));
            }
            r.max_moves = n;
        }
        r.settle = rb.settle.unwrap_or(r.settle.max(balance.report_every));
        if r.settle < balance.report_every || r.settle > Duration::from_secs(3600) {
            return Err(at(
                "balance.settle",
                "must be at least report_every and at most 1h".into(),
            ));
        }
        if let Some(d) = rb.min_residence {
            if d > Duration::from_secs(3600) {
                return Err(at("balance.min_residence", "must be at most 1h".into()));
            }
            r.min_residence = d;
        }
        balance.rebalance = (rb.rebalance != Some(false)).then_some(r);
        let mut timeouts = ServerTimeouts::default();
        let t = &raw.timeouts;
        for (name, given, slot) in [
            ("handshake", t.handshake, &mut timeouts.handshake),
            (
                "state_request",
                t.state_request,
                &mut timeouts.state_request,
            ),
            ("settle", t.settle, &mut timeouts.settle),
            ("frozen", t.frozen, &mut timeouts.frozen),
            ("orphan", t.orphan, &mut timeouts.orphan),
            ("backup", t.backup, &mut timeouts.backup),
        ] {
            if let Some(d) = given {
                if d.is_zero() {
                    return Err(at(&format!("timeouts.{name}"), "must be above zero".into()));
                }
                *slot = d;
            }
        }
        let max_state = raw.max_state.unwrap_or(1 << 20);
        if max_state > 64 << 20 {
            return Err(at("max_state", "must be at most 64 MiB".into()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            key,
            servers,
            limits,
            timeouts,
            preamble_wait: raw.preamble_wait.unwrap_or(DEFAULT_PREAMBLE_WAIT),
            max_state,
            max_connections,
            max_sessions,
            balance,
            tls,
        })
    }

    /// Server `id`'s TLS settings, loaded from its files.
    pub fn server_tls(&self, id: &str) -> Result<ServerTls, ConfigError> {
        let me = self.server(id)?;
        match &self.tls {
            None => Ok(ServerTls::insecure_plaintext()),
            Some(t) => Ok(ServerTls::from_pem_files(&t.ca, &me.cert, &me.key)
                .map_err(|e| self.tls_error(e))?
                .pool_name(&t.pool_name)),
        }
    }

    /// The TLS settings of a client of the pool (the CA file).
    #[cfg(test)]
    pub fn client_tls(&self) -> Result<ClientTls, ConfigError> {
        match &self.tls {
            None => Ok(ClientTls::insecure_plaintext()),
            Some(t) => ClientTls::from_ca_file(&t.ca)
                .and_then(|c| c.pool_name(&t.pool_name))
                .map_err(|e| self.tls_error(e)),
        }
    }

    /// The operator's TLS settings (`operator.pem` and `operator.key` in
    /// the TLS folder).
    pub fn operator_tls(&self) -> Result<OperatorTls, ConfigError> {
        match &self.tls {
            None => Ok(OperatorTls::insecure_plaintext()),
            Some(t) => OperatorTls::from_pem_files(
                &t.ca,
                t.dir.join(format!("{OPERATOR_ID}.pem")),
                t.dir.join(format!("{OPERATOR_ID}.key")),
            )
            .map_err(|e| self.tls_error(e)),
        }
    }

    fn tls_error(&self, e: migratory::Error) -> ConfigError {
        let text = match e {
            migratory::Error::Config(t) => t,
            other => other.to_string(),
        };
        ConfigError(format!(
            "{}: tls: {text} (`migratory certs --config {}` makes the pool's files)",
            self.path.display(),
            self.path.display()
        ))
    }

    /// The cluster key.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The server called `id`.
    pub fn server(&self, id: &str) -> Result<&ServerEntry, ConfigError> {
        self.servers.iter().find(|s| s.id == id).ok_or_else(|| {
            let ids: Vec<&str> = self.servers.iter().map(|s| s.id.as_str()).collect();
            ConfigError(format!(
                "{}: no server {id:?} (the pool has {})",
                self.path.display(),
                ids.join(", ")
            ))
        })
    }

    /// A builder for server `id`, with every other server as its peer and
    /// its TLS files loaded.
    pub fn builder(&self, id: &str) -> Result<ServerBuilder, ConfigError> {
        let me = self.server(id)?;
        let mut b = ServerBuilder::new(&me.id);
        b.tls(self.server_tls(id)?)
            .service(me.service)
            .control(me.control)
            .cluster_key(self.key.clone())
            .limits(self.limits.clone())
            .timeouts(self.timeouts.clone())
            .max_state(self.max_state)
            .preamble_wait(self.preamble_wait)
            .max_connections(self.max_connections.0, self.max_connections.1)
            .max_sessions(self.max_sessions)
            .balance(Some(self.balance.clone()));
        if let Some(backup) = &me.backup {
            b.backup(backup);
        }
        for p in self.servers.iter().filter(|s| s.id != me.id) {
            b.peer(Peer {
                id: p.id.clone(),
                service: p.service,
                control: p.control,
            });
        }
        Ok(b)
    }
}

/// The 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
cluster_key = "0123456789abcdef0123"
[timeouts]
orphan = "2m"
[[server]]
id = "s1"
service = "127.0.0.1:7101"
control = "127.0.0.1:7201"
backup = "s2"
[[server]]
id = "s2"
service = "127.0.0.1:7102"
control = "127.0.0.1:7202"
"#;

    fn err(text: &str) -> String {
        PoolConfig::parse(text, Path::new("pool.toml"))
            .expect_err("invalid")
            .to_string()
    }

    /// `GOOD` with its TLS files made in a fresh folder (removed on drop).
    struct WithCerts(PathBuf, String);

    impl WithCerts {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("migratory-config-{tag}-{}", std::process::id()));
            migratory::PoolCerts::generate(migratory::tls::DEFAULT_POOL_NAME)
                .unwrap()
                .write_dir(&dir, &["s1", "s2"])
                .unwrap();
            // A table may follow the [[server]] entries.
            let text = format!("{GOOD}[tls]\ndir = {:?}\n", dir.display().to_string());
            Self(dir, text)
        }
    }

    impl Drop for WithCerts {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_good_config_builds_every_server() {
        let certs = WithCerts::new("good");
        let c = PoolConfig::parse(&certs.1, Path::new("pool.toml")).expect("valid");
        assert_eq!(c.servers.len(), 2);
        assert_eq!(c.key(), b"0123456789abcdef0123");
        assert_eq!(c.timeouts.orphan, Duration::from_secs(120));
        assert_eq!(c.server("s1").unwrap().backup.as_deref(), Some("s2"));
        assert!(c.builder("s2").is_ok());
        assert!(
            !format!("{c:?}").contains("0123456789abcdef"),
            "key not shown"
        );
        assert!(c.server("s9").unwrap_err().to_string().contains("s1, s2"));
    }

    #[test]
    fn tls_files_are_named_in_errors_and_plaintext_only_by_name() {
        // No [tls]: the default folder `certs` beside the file, missing.
        let c = PoolConfig::parse(GOOD, Path::new("/nonexistent/pool.toml")).expect("valid");
        let e = c.builder("s1").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/certs/ca.pem"), "{e}");
        assert!(e.contains("migratory certs"), "{e}");
        assert!(!e.contains('\n'), "one line: {e:?}");
        // A certificate of another server: named, with the id it lacks.
        let certs = WithCerts::new("swap");
        let text = certs.1.replacen(
            "id = \"s1\"\n",
            &format!(
                "id = \"s1\"\ncert = {:?}\nkey = {:?}\n",
                certs.0.join("s2.pem").display().to_string(),
                certs.0.join("s2.key").display().to_string()
            ),
            1,
        );
        let c = PoolConfig::parse(&text, Path::new("pool.toml")).expect("valid");
        let e = match c.builder("s1") {
            Ok(b) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(b.bind())
                .unwrap_err()
                .to_string(),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("s2.pem") && e.contains("\"s1\""), "{e}");
        // A key that is not the certificate's: both files named.
        let text = certs.1.replacen(
            "id = \"s1\"\n",
            &format!(
                "id = \"s1\"\nkey = {:?}\n",
                certs.0.join("s2.key").display().to_string()
            ),
            1,
        );
        let c = PoolConfig::parse(&text, Path::new("pool.toml")).expect("valid");
        let e = c.builder("s1").unwrap_err().to_string();
        assert!(e.contains("s2.key") && e.contains("s1.pem"), "{e}");
        // Plaintext only when the file says so.
        let text = format!("insecure_plaintext = true\n{GOOD}");
        let c = PoolConfig::parse(&text, Path::new("pool.toml")).expect("valid");
        assert!(c.tls.is_none());
        assert!(c.builder("s1").is_ok());
        assert!(c.client_tls().unwrap().is_plaintext());
    }

    #[test]
    fn each_error_is_one_line_naming_the_key() {
        let cases = [
            (format!("{GOOD}[balance]\nfactor = 0.5\n"), "balance.factor"),
            (
                format!("{GOOD}[balance]\nrebalance = false\nmax_moves = 0\n"),
                "balance.max_moves",
            ),
            (
                format!("{GOOD}[balance]\nreport_every = \"5s\"\nsettle = \"1s\"\n"),
                "balance.settle",
            ),
            (
                format!("{GOOD}[balance]\ndrain_parallel = 0\n"),
                "balance.drain_parallel",
            ),
            (
                format!("{GOOD}[limits]\nmax_sessions = 0\n"),
                "limits.max_sessions",
            ),
            (GOOD.replace("7101\"", "7101x\""), "server[0].service"),
            (
                GOOD.replace("backup = \"s2\"", "backup = \"s7\""),
                "server[0].backup",
            ),
            (GOOD.replace("id = \"s2\"", "id = \"s1\""), "server[1].id"),
            (GOOD.replace("id = \"s2\"", "id = \"s 2\""), "server[1].id"),
            (
                format!("{GOOD}[tls]\npool_name = \"a b\"\n"),
                "tls.pool_name",
            ),
            (
                format!("insecure_plaintext = true\n{GOOD}[tls]\ndir = \"certs\"\n"),
                "insecure_plaintext",
            ),
            (GOOD.replace("7202", "7201"), "server[1].control"),
            (
                GOOD.replace("orphan = \"2m\"", "orphan = \"2 parsecs\""),
                "timeouts.orphan",
            ),
            (GOOD.replace("orphan", "orphn"), "timeouts.orphn"),
            (GOOD.replace("0123456789abcdef0123", "short"), "cluster_key"),
            (
                GOOD.replace("cluster_key", "cluster_key_file"),
                "cluster_key_file",
            ),
            (
                GOOD.replace("id = \"s1\"", "id = \"operator\""),
                "server[0].id",
            ),
            (
                GOOD.replace("[timeouts]", "[limits]\nrecv_window = 5\n[timeouts]"),
                "limits.recv_window",
            ),
            (
                "cluster_key = \"0123456789abcdef0123\"\n".to_string(),
                "server",
            ),
            ("cluster_key = oops\n".to_string(), "line 1"),
        ];
        for (text, key) in cases {
            let e = err(&text);
            assert!(e.starts_with("pool.toml: "), "{e}");
            assert!(e.contains(key), "{key:?} not named in {e:?}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
    }
}
