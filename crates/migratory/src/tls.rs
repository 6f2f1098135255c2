//! TLS 1.3 on every connection: client incarnations, control links between
//! servers, operator connections (rustls, with the *ring* provider).
//!
//! A pool has its own certificate authority (CA). Every server holds a
//! certificate from it that names two DNS names: its server id (e.g. `a`)
//! and the pool's name ([`DEFAULT_POOL_NAME`] unless configured), with both
//! the server and the client extended key usages (a server is the TLS
//! client of the control links it dials). An operator holds a client
//! certificate that names [`OPERATOR_ID`](crate::OPERATOR_ID).
//!
//! Who checks what:
//!
//! * Every client handshake sends and verifies the pool name: any server of
//!   the pool may answer the first connection, and TLS 1.3 resumes a
//!   session only under the name it was made with. When the server then
//!   says who it is (its Welcome), and on every migration to server `b`,
//!   the client checks that the certificate also names that server id.
//!   A resumed handshake shows no certificate: it proves instead that the
//!   server opened a ticket sealed with the pool's ticket key, which is
//!   derived from the cluster key, so any server of the pool is taken
//!   (tickets are pool-wide: a migration to a
//!   server the client never met still resumes).
//! * Control links are mutual TLS: the dialler verifies the name of the
//!   peer it dials; the acceptor requires a certificate from the pool CA
//!   and checks that it names the server id the peer then authenticates
//!   as. A relay in the middle holds neither certificate, so it can only
//!   pass ciphertext along.
//! * An operator's certificate must name `operator`; that name is the
//!   operator's credential (the cluster key is checked too, inside the
//!   channel).
//!
//! Plaintext exists only behind constructors named `insecure_plaintext`.
//! [`PoolCerts::generate`] makes a CA and certificates (rcgen) for tests,
//! the demo and `migratory certs`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::error::Error;

/// The DNS name every server certificate of a pool carries besides its
/// server id; a client's first connection, to any server of the pool,
/// verifies it.
pub const DEFAULT_POOL_NAME: &str = "pool.migratory";

/// ALPN protocol of a migratory incarnation.
pub(crate) const ALPN: &[u8] = b"migratory/3";
/// ALPN protocol of a control link (peer or operator).
pub(crate) const ALPN_CONTROL: &[u8] = b"migratory-control/3";

/// *ring*'s TLS 1.3 suites, AES-128-GCM first: as strong as a session
/// needs and the fastest with AES instructions (bulk data is most of what a
/// migratory session encrypts).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// A name as rustls wants it, or a configuration error naming `what`.
fn dns_name(name: &str, what: &str) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(name.to_string())
        .map_err(|_| Error::Config(format!("{what} {name:?} is not a valid DNS name")))
}

/// Where a PEM input came from, for error messages.
#[derive(Clone)]
enum Source {
    File(PathBuf),
    Memory(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Memory(what) => write!(f, "{what} (PEM in memory)"),
        }
    }
}

fn read_pem(src: &Source, data: Option<&[u8]>) -> Result<Vec<u8>, Error> {
    match (src, data) {
        (_, Some(d)) => Ok(d.to_vec()),
        (Source::File(p), None) => std::fs::read(p)
            .map_err(|e| Error::Config(format!("{}: cannot read: {e}", p.display()))),
        (Source::Memory(_), None) => unreachable!("memory sources carry their data"),
    }
}

fn certs(src: &Source, data: Option<&[u8]>) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read_pem(src, data)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("{src}: not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Config(format!("{src}: no certificate in it")));
    }
    Ok(certs)
}

fn key(src: &Source, data: Option<&[u8]>) -> Result<PrivateKeyDer<'static>, Error> {
    let pem = read_pem(src, data)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| Error::Config(format!("{src}: not a PEM private key: {e}")))
}

fn roots(src: &Source, ca: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots
            .add(c.clone())
            .map_err(|e| Error::Config(format!("{src}: not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// A certificate with its key, checked against the pool CA.
#[derive(Clone)]
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
    cert_src: Source,
}

impl Identity {
    fn load(
        ca: (Source, Option<&[u8]>),
        cert: (Source, Option<&[u8]>),
        key_in: (Source, Option<&[u8]>),
    ) -> Result<Self, Error> {
        let ca_certs = certs(&ca.0, ca.1)?;
        let roots = roots(&ca.0, &ca_certs)?;
        let chain = certs(&cert.0, cert.1)?;
        let key = key(&key_in.0, key_in.1)?;
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider()).map_err(
            |e| {
                Error::Config(format!(
                    "{}: does not match the certificate in {}: {e}",
                    key_in.0, cert.0
                ))
            },
        )?;
        Ok(Self {
            chain,
            key: Arc::new(key),
            roots,
            cert_src: cert.0,
        })
    }

    fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, Error> {
        Self::load(
            (Source::File(ca.into()), None),
            (Source::File(cert.into()), None),
            (Source::File(key.into()), None),
        )
    }

    fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, Error> {
        Self::load(
            (Source::Memory("pool CA"), Some(ca.as_bytes())),
            (Source::Memory("certificate"), Some(cert.as_bytes())),
            (Source::Memory("key"), Some(key.as_bytes())),
        )
    }

    /// Checks that the certificate is valid now, issued by the pool CA and
    /// names each of `names`.
    fn check_names(&self, names: &[&str]) -> Result<(), Error> {
        let verifier = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| Error::Config(format!("pool CA: {e}")))?;
        for name in names {
            let sn = dns_name(name, "name")?;
            verifier
                .verify_server_cert(&self.chain[0], &self.chain[1..], &sn, &[], UnixTime::now())
                .map_err(|e| {
                    Error::Config(format!(
                        "{}: not a valid certificate for {name:?} from the pool CA: {e}",
                        self.cert_src
                    ))
                })?;
        }
        Ok(())
    }
}

/// A server's TLS settings: the pool CA, its certificate and its key; or
/// plaintext, which only [`ServerTls::insecure_plaintext`] gives.
#[derive(Clone)]
pub struct ServerTls {
    identity: Option<Identity>,
    pool_name: String,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.identity {
            Some(i) => write!(f, "ServerTls({}, pool {:?})", i.cert_src, self.pool_name),
            None => f.write_str("ServerTls(insecure plaintext)"),
        }
    }
}

impl ServerTls {
    /// Loads the pool CA certificate, this server's certificate chain and
    /// its private key from PEM files. Errors name the file at fault
    /// (missing, unreadable, not PEM, key not matching the certificate);
    /// the certificate's names and validity are checked when the server
    /// binds.
    pub fn from_pem_files(
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, Error> {
        let identity = Identity::from_files(ca.as_ref(), cert.as_ref(), key.as_ref())?;
        Ok(Self {
            identity: Some(identity),
            pool_name: DEFAULT_POOL_NAME.into(),
        })
    }

    /// The same from PEM text in memory.
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, Error> {
        let identity = Identity::from_pem(ca, cert, key)?;
        Ok(Self {
            identity: Some(identity),
            pool_name: DEFAULT_POOL_NAME.into(),
        })
    }

    /// No TLS at all: session secrets, replicas and application data cross
    /// the network in clear, and anyone who sees them can take sessions
    /// over. Only for a network you fully trust; the server logs a warning.
    pub fn insecure_plaintext() -> Self {
        Self {
            identity: None,
            pool_name: DEFAULT_POOL_NAME.into(),
        }
    }

    /// The pool name the certificate must carry ([`DEFAULT_POOL_NAME`]).
    pub fn pool_name(mut self, name: impl Into<String>) -> Self {
        self.pool_name = name.into();
        self
    }

    /// Whether this is plaintext.
    pub fn is_plaintext(&self) -> bool {
        self.identity.is_none()
    }

    /// The rustls configurations of server `id`: checks that the
    /// certificate is valid now and names `id` and the pool name. Session
    /// tickets are sealed with keys derived from `cluster_key`, so any
    /// server of the pool resumes them ([`PoolTicketer`]).
    pub(crate) fn configs(
        &self,
        id: &str,
        cluster_key: &[u8],
    ) -> Result<Option<ServerConfigs>, Error> {
        let Some(ident) = &self.identity else {
            return Ok(None);
        };
        ident.check_names(&[id, &self.pool_name])?;
        let tls_err = |e: rustls::Error| Error::Config(format!("{}: {e}", ident.cert_src));
        let v13 = &[&rustls::version::TLS13];
        let mut service = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(v13)
            .map_err(tls_err)?
            .with_no_client_auth()
            .with_single_cert(ident.chain.clone(), ident.key.clone_key())
            .map_err(tls_err)?;
        service.alpn_protocols = vec![ALPN.to_vec()];
        // TLS 1.3 resumption: a client that met any server of the pool
        // skips the certificate exchange here (clients name the pool in
        // their handshakes, which resumption requires to match).
        service.ticketer = Arc::new(PoolTicketer::new(cluster_key, &self.pool_name));
        // One ticket per handshake: a client spends one to come back, and
        // that handshake gives it the next (two would only cost more
        // crypto and bytes on every migration).
        service.send_tls13_tickets = 1;
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(ident.roots.clone(), provider())
                .build()
                .map_err(|e| Error::Config(format!("pool CA: {e}")))?;
        let mut control = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(v13)
            .map_err(tls_err)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(ident.chain.clone(), ident.key.clone_key())
            .map_err(tls_err)?;
        control.alpn_protocols = vec![ALPN_CONTROL.to_vec()];
        let dial = client_config(ident, ALPN_CONTROL, true)?;
        Ok(Some(ServerConfigs {
            service: Arc::new(service),
            control: Arc::new(control),
            dial,
        }))
    }
}

/// A rustls client configuration trusting `ident`'s pool CA, presenting its
/// certificate when `present` is set.
fn client_config(
    ident: &Identity,
    alpn: &[u8],
    present: bool,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(e.to_string()))?
        .with_root_certificates(ident.roots.clone());
    let mut c = if present {
        b.with_client_auth_cert(ident.chain.clone(), ident.key.clone_key())
            .map_err(|e| Error::Config(format!("{}: {e}", ident.cert_src)))?
    } else {
        b.with_no_client_auth()
    };
    c.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(c))
}

/// The rustls configurations one server uses.
#[derive(Clone)]
pub(crate) struct ServerConfigs {
    /// Accepting clients on the service address.
    pub(crate) service: Arc<rustls::ServerConfig>,
    /// Accepting peers and operators on the control address (mutual TLS).
    pub(crate) control: Arc<rustls::ServerConfig>,
    /// Dialling peers (presents this server's certificate).
    pub(crate) dial: Arc<rustls::ClientConfig>,
}

/// A client's TLS settings: the pool CA and the pool name its servers'
/// certificates carry; or plaintext, which only
/// [`ClientTls::insecure_plaintext`] gives. Cheap to clone: clones share
/// one TLS session cache, so migrations back to a server resume TLS
/// sessions instead of redoing the full handshake.
#[derive(Clone)]
pub struct ClientTls {
    config: Option<Arc<rustls::ClientConfig>>,
    pool_name: ServerName<'static>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.config {
            Some(_) => write!(f, "ClientTls(pool {:?})", self.pool_name.to_str()),
            None => f.write_str("ClientTls(insecure plaintext)"),
        }
    }
}

impl ClientTls {
    /// Trusts the pool CA in this PEM file; servers must carry the pool
    /// name [`DEFAULT_POOL_NAME`] (see [`ClientTls::pool_name`]).
    pub fn from_ca_file(ca: impl AsRef<Path>) -> Result<Self, Error> {
        Self::from_ca(Source::File(ca.as_ref().into()), None)
    }

    /// The same from PEM text in memory.
    pub fn from_ca_pem(ca: &str) -> Result<Self, Error> {
        Self::from_ca(Source::Memory("pool CA"), Some(ca.as_bytes()))
    }

    fn from_ca(src: Source, data: Option<&[u8]>) -> Result<Self, Error> {
        let ca = certs(&src, data)?;
        let roots = roots(&src, &ca)?;
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = vec![ALPN.to_vec()];
        c.resumption = rustls::client::Resumption::store(Arc::new(TicketStore::default()));
        Ok(Self {
            config: Some(Arc::new(c)),
            pool_name: dns_name(DEFAULT_POOL_NAME, "pool name")?,
        })
    }

    /// The pool name the servers' certificates carry.
    pub fn pool_name(mut self, name: &str) -> Result<Self, Error> {
        self.pool_name = dns_name(name, "pool name")?;
        Ok(self)
    }

    /// No TLS: the session's secret and data cross the network in clear,
    /// and anyone who sees them can take the session over. Only for a
    /// network you fully trust.
    pub fn insecure_plaintext() -> Self {
        Self {
            config: None,
            pool_name: ServerName::try_from(DEFAULT_POOL_NAME).expect("a valid DNS name"),
        }
    }

    /// Whether this is plaintext.
    pub fn is_plaintext(&self) -> bool {
        self.config.is_none()
    }

    pub(crate) fn config(&self) -> Option<&Arc<rustls::ClientConfig>> {
        self.config.as_ref()
    }

    /// The name every incarnation's handshake sends and verifies: the
    /// pool's. TLS 1.3 resumes a session only under the name it was made
    /// with, and any server of the pool opens the pool's tickets
    /// ([`PoolTicketer`]); which server answered is checked after the
    /// handshake ([`check_server`]).
    pub(crate) fn name(&self) -> ServerName<'static> {
        self.pool_name.clone()
    }
}

/// Whether `wire`, just connected, may speak for server `id`: after a full
/// handshake its certificate must name `id`; a resumed one proved that the
/// server holds the pool's ticket key (derived from the cluster key), which
/// only the pool's servers do, and carries the certificate of the server
/// that issued the ticket, so it is taken for any server of the pool.
pub(crate) fn check_server(wire: &crate::conn::Wire, id: &str) -> Result<(), String> {
    if wire.resumed() || names(wire.peer_certificates().as_deref(), id) {
        Ok(())
    } else {
        Err(format!(
            "the server's certificate does not name server id {id:?}"
        ))
    }
}

/// Up to [`TICKETS_KEPT`] TLS 1.3 tickets per server name (a client names
/// the pool, so these are the pool's), each handed out once. rustls' own
/// cache keeps 8, which a proxy or a drain moving hundreds of sessions at
/// once uses up at the first burst.
#[derive(Debug, Default)]
struct TicketStore {
    inner: std::sync::Mutex<TicketStoreInner>,
}

#[derive(Debug, Default)]
struct TicketStoreInner {
    kx: std::collections::HashMap<ServerName<'static>, rustls::NamedGroup>,
    tickets: std::collections::HashMap<
        ServerName<'static>,
        std::collections::VecDeque<rustls::client::Tls13ClientSessionValue>,
    >,
}

/// Most TLS 1.3 tickets a client keeps per server name.
const TICKETS_KEPT: usize = 256;

impl TicketStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, TicketStoreInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl rustls::client::ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
        let mut st = self.lock();
        if st.kx.len() < TICKETS_KEPT || st.kx.contains_key(&name) {
            st.kx.insert(name, group);
        }
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.lock().kx.get(name).copied()
    }

    // TLS 1.2 is never negotiated (the configurations are TLS 1.3 only).
    fn set_tls12_session(
        &self,
        _: ServerName<'static>,
        _: rustls::client::Tls12ClientSessionValue,
    ) {
    }

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        let mut st = self.lock();
        if st.tickets.len() >= TICKETS_KEPT && !st.tickets.contains_key(&name) {
            return;
        }
        let q = st.tickets.entry(name).or_default();
        if q.len() == TICKETS_KEPT {
            q.pop_front();
        }
        q.push_back(value);
    }

    fn take_tls13_ticket(
        &self,
        name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        // The newest first: it is the furthest from expiring.
        self.lock().tickets.get_mut(name)?.pop_back()
    }
}

/// The DNS name a certificate must carry to speak for server `id`.
pub(crate) fn server_name(id: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(id.to_string())
        .map_err(|_| format!("server id {id:?} is not a DNS name: cannot verify it"))
}

/// A TLS connection over `tcp` with `config`, to a server whose
/// certificate names `name`.
pub(crate) async fn dial(
    config: &Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    tcp: tokio::net::TcpStream,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))
}

/// An operator's TLS settings: the pool CA and a client certificate that
/// names `operator`; or plaintext ([`OperatorTls::insecure_plaintext`]).
#[derive(Clone)]
pub struct OperatorTls {
    config: Option<Arc<rustls::ClientConfig>>,
}

impl fmt::Debug for OperatorTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.config {
            Some(_) => "OperatorTls(..)",
            None => "OperatorTls(insecure plaintext)",
        })
    }
}

impl OperatorTls {
    /// Loads the pool CA, the operator's certificate and its key from PEM
    /// files (errors name the file at fault).
    pub fn from_pem_files(
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, Error> {
        Self::from_identity(Identity::from_files(
            ca.as_ref(),
            cert.as_ref(),
            key.as_ref(),
        )?)
    }

    /// The same from PEM text in memory.
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, Error> {
        Self::from_identity(Identity::from_pem(ca, cert, key)?)
    }

    fn from_identity(ident: Identity) -> Result<Self, Error> {
        Ok(Self {
            config: Some(client_config(&ident, ALPN_CONTROL, true)?),
        })
    }

    /// No TLS: the cluster key's proof and every answer cross the network
    /// in clear. Only for a server that runs plaintext.
    pub fn insecure_plaintext() -> Self {
        Self { config: None }
    }

    pub(crate) fn config(&self) -> Option<&Arc<rustls::ClientConfig>> {
        self.config.as_ref()
    }
}

/// Whether the end-entity certificate in `certs` names `name`.
pub(crate) fn names(certs: Option<&[CertificateDer<'_>]>, name: &str) -> bool {
    let (Some(cert), Ok(sn)) = (
        certs.and_then(<[_]>::first),
        ServerName::try_from(name.to_string()),
    ) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .and_then(|c| c.verify_is_valid_for_subject_name(&sn))
        .is_ok()
}

/// A pool CA with certificates made by it, as PEM text: for tests, the
/// demo and `migratory certs`. Each certificate is valid for ten years
/// from now (one day back, for clock skew).
pub struct PoolCerts {
    ca_cert: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pool_name: String,
}

impl fmt::Debug for PoolCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PoolCerts(pool {:?})", self.pool_name)
    }
}

/// A certificate and its private key, as PEM text.
#[derive(Clone)]
pub struct CertPem {
    /// The certificate.
    pub cert: String,
    /// Its private key (keep it secret).
    pub key: String,
}

impl fmt::Debug for CertPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertPem(..)")
    }
}

/// Makes `p` valid from `days_back` days ago until `days` days from now
/// (negative: already expired).
fn set_validity(p: &mut rcgen::CertificateParams, days_back: i64, days: i64) {
    let now = rcgen::date_time_ymd(1970, 1, 1)
        + std::time::Duration::from_secs(UnixTime::now().as_secs());
    p.not_before = now - time_days(days_back);
    p.not_after = if days >= 0 {
        now + time_days(days)
    } else {
        now - time_days(-days)
    };
}

impl PoolCerts {
    /// A new pool CA (ECDSA P-256) for pool `pool_name`.
    pub fn generate(pool_name: &str) -> Result<Self, Error> {
        let err = |e: rcgen::Error| Error::Config(format!("cannot make the pool CA: {e}"));
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        // A name of its own: certificates are matched to their issuer by
        // name, so two pools' CAs must not share one.
        let tag: u64 = rand::random();
        p.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("migratory pool CA {pool_name} {tag:016x}"),
        );
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        set_validity(&mut p, 1, 3650);
        let key = rcgen::KeyPair::generate().map_err(err)?;
        Ok(Self {
            ca_cert: rcgen::CertifiedIssuer::self_signed(p, key).map_err(err)?,
            pool_name: pool_name.into(),
        })
    }

    /// The CA certificate (give it to clients, servers and operators).
    pub fn ca_pem(&self) -> String {
        self.ca_cert.pem()
    }

    /// A certificate for server `id`: names `id` and the pool name, for TLS
    /// servers and clients (control links).
    pub fn server(&self, id: &str) -> Result<CertPem, Error> {
        self.issue(&[id, &self.pool_name], id, 1, 3650)
    }

    /// A client certificate for the operator (names `operator`).
    pub fn operator(&self) -> Result<CertPem, Error> {
        self.issue(&[crate::OPERATOR_ID], crate::OPERATOR_ID, 1, 3650)
    }

    /// A certificate for `names`, valid from `days_back` days ago for
    /// `days` days from now (negative: already expired); for tests of
    /// certificate checks.
    pub fn issue(
        &self,
        names: &[&str],
        common_name: &str,
        days_back: i64,
        days: i64,
    ) -> Result<CertPem, Error> {
        let err = |e: rcgen::Error| Error::Config(format!("cannot make a certificate: {e}"));
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .map_err(err)?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, common_name.to_string());
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        set_validity(&mut p, days_back, days);
        let key = rcgen::KeyPair::generate().map_err(err)?;
        let cert = p.signed_by(&key, &self.ca_cert).map_err(err)?;
        Ok(CertPem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// Writes the pool's files into `dir` (created if missing): `ca.pem`,
    /// and for each of `servers` and for the operator `<id>.pem` with
    /// `<id>.key` (keys readable by their owner only). The CA's own key is
    /// not written: to add a server later, make the pool's files again.
    pub fn write_dir(&self, dir: &Path, servers: &[&str]) -> Result<(), Error> {
        let io_err = |p: &Path, e: std::io::Error| {
            Error::Config(format!("{}: cannot write: {e}", p.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let write = |name: String, text: &str, secret: bool| {
            let p = dir.join(name);
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create(true).truncate(true);
            #[cfg(unix)]
            if secret {
                use std::os::unix::fs::OpenOptionsExt;
                o.mode(0o600);
            }
            #[cfg(not(unix))]
            let _ = secret;
            let mut f = o.open(&p).map_err(|e| io_err(&p, e))?;
            #[cfg(unix)]
            if secret {
                // A key file that existed keeps its old mode otherwise.
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| io_err(&p, e))?;
            }
            std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| io_err(&p, e))
        };
        write("ca.pem".into(), &self.ca_pem(), false)?;
        for id in servers {
            let c = self.server(id)?;
            write(format!("{id}.pem"), &c.cert, false)?;
            write(format!("{id}.key"), &c.key, true)?;
        }
        let c = self.operator()?;
        write(format!("{}.pem", crate::OPERATOR_ID), &c.cert, false)?;
        write(format!("{}.key", crate::OPERATOR_ID), &c.key, true)?;
        Ok(())
    }

    /// TLS settings of server `id`, with a fresh certificate.
    pub fn server_tls(&self, id: &str) -> Result<ServerTls, Error> {
        let c = self.server(id)?;
        Ok(ServerTls::from_pem(&self.ca_pem(), &c.cert, &c.key)?.pool_name(&self.pool_name))
    }

    /// TLS settings of a client of the pool.
    pub fn client_tls(&self) -> Result<ClientTls, Error> {
        ClientTls::from_ca_pem(&self.ca_pem())?.pool_name(&self.pool_name)
    }

    /// TLS settings of an operator, with a fresh certificate.
    pub fn operator_tls(&self) -> Result<OperatorTls, Error> {
        let c = self.operator()?;
        OperatorTls::from_pem(&self.ca_pem(), &c.cert, &c.key)
    }
}

fn time_days(days: i64) -> std::time::Duration {
    std::time::Duration::from_secs(days.unsigned_abs() * 86_400)
}

/// How long one ticket key of a pool is current; a ticket opens during its
/// key's period and the next.
const TICKET_PERIOD_SECS: u64 = 6 * 3600;

/// TLS 1.3 session tickets that every server of a pool can open: a client
/// that met any server resumes its TLS session at any other (a migration
/// to a server it never visited, a drain, a rebalance), skipping the
/// certificate exchange and its signatures.
///
/// The key of each six-hour period is derived (HKDF-SHA256) from the
/// cluster key, salted with the pool name; a ticket is that period's
/// number, a random nonce and the session's resumption state sealed with
/// AES-256-GCM. Resumption in TLS 1.3 here always runs a fresh ECDHE
/// exchange (rustls offers only `psk_dhe_ke`), so whoever learns a ticket
/// key cannot read traffic; what a ticket proves is that the server holds
/// the cluster key, i.e. is a member of the pool.
pub(crate) struct PoolTicketer {
    prk: ring::hkdf::Prk,
    rng: ring::rand::SystemRandom,
    /// The current period's key and its number.
    current: std::sync::Mutex<Option<(u64, Arc<ring::aead::LessSafeKey>)>>,
}

impl fmt::Debug for PoolTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PoolTicketer(..)")
    }
}

const TICKET_HEADER: usize = 8 + ring::aead::NONCE_LEN;

impl PoolTicketer {
    pub(crate) fn new(cluster_key: &[u8], pool_name: &str) -> Self {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, pool_name.as_bytes());
        Self {
            prk: salt.extract(cluster_key),
            rng: ring::rand::SystemRandom::new(),
            current: std::sync::Mutex::new(None),
        }
    }

    fn period_now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / TICKET_PERIOD_SECS)
    }

    fn derive(&self, period: u64) -> Option<ring::aead::LessSafeKey> {
        let info = [
            b"migratory tls ticket key".as_slice(),
            &period.to_be_bytes(),
        ];
        let okm = self.prk.expand(&info, &ring::aead::AES_256_GCM).ok()?;
        Some(ring::aead::LessSafeKey::new(okm.into()))
    }

    /// The key of `period`: the current one is kept, another is derived.
    fn key(&self, period: u64) -> Option<Arc<ring::aead::LessSafeKey>> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        match &*cur {
            Some((p, k)) if *p == period => Some(k.clone()),
            _ if period == Self::period_now() => {
                let k = Arc::new(self.derive(period)?);
                *cur = Some((period, k.clone()));
                Some(k)
            }
            _ => self.derive(period).map(Arc::new),
        }
    }

    fn seal(&self, period: u64, plain: &[u8]) -> Option<Vec<u8>> {
        use ring::rand::SecureRandom;
        let key = self.key(period)?;
        let mut nonce = [0u8; ring::aead::NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(TICKET_HEADER + plain.len() + 16);
        out.extend_from_slice(&period.to_be_bytes());
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.seal_in_place_append_tag(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(period.to_be_bytes()),
            &mut body,
        )
        .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn open(&self, now: u64, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < TICKET_HEADER {
            return None;
        }
        let (head, body) = cipher.split_at(TICKET_HEADER);
        let period = u64::from_be_bytes(head[..8].try_into().ok()?);
        if period != now && period.checked_add(1) != Some(now) {
            return None;
        }
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(&head[8..]).ok()?;
        let mut body = body.to_vec();
        let n = self
            .key(period)?
            .open_in_place(
                nonce,
                ring::aead::Aad::from(period.to_be_bytes()),
                &mut body,
            )
            .ok()?
            .len();
        body.truncate(n);
        Some(body)
    }
}

impl rustls::server::ProducesTickets for PoolTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        TICKET_PERIOD_SECS as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(Self::period_now(), plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open(Self::period_now(), cipher)
    }
}

#[cfg(test)]
mod ticket_tests {
    use super::*;

    #[test]
    fn pool_tickets_open_anywhere_in_the_pool_and_nowhere_else() {
        let a = PoolTicketer::new(b"cluster key of the pool, 32 bytes", "pool.migratory");
        let b = PoolTicketer::new(b"cluster key of the pool, 32 bytes", "pool.migratory");
        let p = PoolTicketer::period_now();
        let t = a.seal(p, b"resumption state").unwrap();
        // Another server of the pool opens it, now and in the next period.
        assert_eq!(b.open(p, &t).unwrap(), b"resumption state");
        assert_eq!(b.open(p + 1, &t).unwrap(), b"resumption state");
        // Not two periods later, nor before it was made.
        assert!(b.open(p + 2, &t).is_none());
        assert!(b.open(p - 1, &t).is_none());
        // Not with another cluster key or another pool name.
        let other_key = PoolTicketer::new(b"another cluster key, 32 bytes...", "pool.migratory");
        assert!(other_key.open(p, &t).is_none());
        let other_pool = PoolTicketer::new(b"cluster key of the pool, 32 bytes", "other.pool");
        assert!(other_pool.open(p, &t).is_none());
        // Any changed byte (period, nonce, body, tag) or a cut is refused.
        for i in 0..t.len() {
            let mut bad = t.clone();
            bad[i] ^= 1;
            assert!(b.open(p, &bad).is_none(), "byte {i}");
        }
        for n in 0..t.len() {
            assert!(b.open(p, &t[..n]).is_none(), "cut at {n}");
        }
        // Two tickets of the same state differ (fresh nonces).
        assert_ne!(a.seal(p, b"resumption state").unwrap(), t);
    }
}
