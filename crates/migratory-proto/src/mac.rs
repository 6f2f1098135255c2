//! Message authentication: the MAC on `Migrate` (keyed by the session
//! secret, docs/architecture.md 3.2), the secret's change at every epoch, and the
//! challenge-response between peers of a pool (keyed by the cluster key,
//! docs/architecture.md 3.3).
//!
//! The `nonce` a Migrate's proof covers is the new connection's channel
//! binding when it has one: a value both ends of that TLS connection
//! derive from its keys (an RFC 8446 section 7.5 exporter) and nobody
//! else can, so a proof made for one connection proves nothing on
//! another, relayed or replayed. A connection without TLS (insecure
//! plaintext) gets a fresh nonce from the server instead (the Challenge
//! round trip).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::frame::{Migrate, MigrateRequest};
use crate::types::{Secret, ServerId};

type HmacSha256 = Hmac<Sha256>;

fn keyed(key: &[u8], label: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(label);
    mac
}

fn migrate_mac_state(secret: &Secret, req: &MigrateRequest, nonce: &[u8; 32]) -> HmacSha256 {
    let mut mac = keyed(&secret.0, b"migratory/1 migrate");
    mac.update(&req.session.0.to_be_bytes());
    mac.update(&[req.origin.as_str().len() as u8]);
    mac.update(req.origin.as_str().as_bytes());
    mac.update(&req.epoch.to_be_bytes());
    mac.update(&req.attempt.to_be_bytes());
    mac.update(&[req.cause.code()]);
    mac.update(&req.down.to_be_bytes());
    mac.update(&[u8::from(req.down_fin)]);
    mac.update(&req.window.to_be_bytes());
    mac.update(nonce);
    mac
}

/// The label of the TLS exporter that gives a connection's channel
/// binding (RFC 8446 section 7.5; RFC 5705 asks labels to start with
/// "EXPORTER").
pub const BINDING_LABEL: &[u8] = b"EXPORTER-migratory/3 channel binding";

/// The session secret of `epoch`, derived from the previous epoch's with
/// `rekey`, a random value the resuming server sends inside the new
/// connection's TLS session (HKDF-SHA256, RFC 5869: the old secret is the
/// input key, `rekey` the salt, the epoch in the info). Someone who
/// learns an old epoch's secret but did not see `rekey` cannot derive the
/// new one, so an old secret moves nothing.
pub fn next_secret(old: &Secret, rekey: &[u8; 32], epoch: u64) -> Secret {
    let hk = hkdf::Hkdf::<Sha256>::new(Some(rekey), &old.0);
    let mut info = b"migratory/3 session secret, epoch ".to_vec();
    info.extend_from_slice(&epoch.to_be_bytes());
    let mut out = [0u8; 32];
    hk.expand(&info, &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    Secret(out)
}

/// The client's proof for a Migrate request and the destination's nonce
/// (the new connection's channel binding, or a Challenge's nonce).
pub fn migrate_mac(secret: &Secret, req: &MigrateRequest, nonce: &[u8; 32]) -> [u8; 32] {
    migrate_mac_state(secret, req, nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether an authenticated Migrate's MAC is right (constant time).
pub fn verify_migrate(secret: &Secret, m: &Migrate) -> bool {
    migrate_mac_state(secret, &m.request, &m.nonce)
        .verify_slice(&m.mac)
        .is_ok()
}

fn peer_mac_state(
    cluster_key: &[u8],
    prover: &ServerId,
    verifier: &ServerId,
    verifier_nonce: &[u8; 32],
    prover_nonce: &[u8; 32],
) -> HmacSha256 {
    let mut mac = keyed(cluster_key, b"migratory/1 peer");
    for id in [prover, verifier] {
        mac.update(&[id.as_str().len() as u8]);
        mac.update(id.as_str().as_bytes());
    }
    mac.update(verifier_nonce);
    mac.update(prover_nonce);
    mac
}

/// The proof `prover` sends `verifier`: a MAC over both ids and both
/// nonces, keyed by the cluster key.
pub fn peer_mac(
    cluster_key: &[u8],
    prover: &ServerId,
    verifier: &ServerId,
    verifier_nonce: &[u8; 32],
    prover_nonce: &[u8; 32],
) -> [u8; 32] {
    peer_mac_state(cluster_key, prover, verifier, verifier_nonce, prover_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a peer's proof in constant time.
pub fn verify_peer(
    cluster_key: &[u8],
    prover: &ServerId,
    verifier: &ServerId,
    verifier_nonce: &[u8; 32],
    prover_nonce: &[u8; 32],
    mac: &[u8; 32],
) -> bool {
    peer_mac_state(cluster_key, prover, verifier, verifier_nonce, prover_nonce)
        .verify_slice(mac)
        .is_ok()
}
