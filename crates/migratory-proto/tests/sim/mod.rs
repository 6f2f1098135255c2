//! Deterministic simulation of a migratory service pool: one client, N
//! servers each running a deterministic application, TCP connections as
//! byte pipes delivered in random pieces, control links as ordered message
//! queues that can break, virtual time, and crashes. Everything random comes
//! from one seed, so a failing seed replays exactly.
//!
//! Invariants checked (docs/architecture.md 4): 1 exactly-once in order (every byte the
//! client reads is compared with the expected stream; the server
//! application's own record of what it read is compared with everything
//! the client wrote); 2 fail closed (a lost session ends with a clean error
//! and a correct prefix, never wrong data, within the step budget);
//! 3 one owner (never two servers live at the client's epoch with a
//! connection to it; replayed and forged Migrates are refused); 5 no panic
//! (every byte on every wire goes through the decoders).
//!
//! Connections are TLS-like when `tls` is set: each has a random channel
//! binding that its two ends know, as a TLS exporter. The eavesdropper is
//! stronger than a real one: it reads every frame in clear. It replays the
//! Migrates and proofs it saw on connections of its own, and, having
//! followed Welcome and every Resumed's rekey, forges fresh proofs with
//! the secrets of epochs the client left behind. Neither may resume the
//! session.
#![allow(dead_code, clippy::disallowed_methods)]

pub mod apps;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use migratory_proto::client::{Client, ClientConfig, ClientEvent};
use migratory_proto::config::{ClientTimeouts, Limits, ServerTimeouts};
use migratory_proto::control::ControlMessage;
use migratory_proto::control::DEFAULT_MAX_CONTROL_FRAME;
use migratory_proto::error::{AppError, SessionError};
use migratory_proto::frame::{Frame, MigrateRequest, DEFAULT_MAX_FRAME, PREAMBLE};
use migratory_proto::mac::{migrate_mac, next_secret};
use migratory_proto::server::{Arrival, Dest, Server, ServerConfig, ServerEvent, SessionHandle};
use migratory_proto::types::{Alternate, IncarnationId, Secret, ServerId, SessionId};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

pub use apps::{AppKind, ServerApp};

/// What the world simulates.
#[derive(Debug, Clone)]
pub struct WorldConfig {
    pub seed: u64,
    pub servers: usize,
    /// Each server backs up to the next one (docs/architecture.md 3.6).
    pub eager: bool,
    pub app: AppKind,
    /// Bytes the client uploads.
    pub up_len: usize,
    /// Size of the downloaded file (file app).
    pub down_len: usize,
    /// Let the scheduler run applications, the client and faults randomly.
    pub random: bool,
    pub faults: Faults,
    pub max_steps: usize,
    /// Small buffers exercise back-pressure.
    pub limits: Limits,
    /// Connections have channel bindings (TLS); else Migrates are
    /// challenged (plaintext).
    pub tls: bool,
    /// Servers report their loads and may drain (no rebalancer: one
    /// client).
    pub balance: bool,
}

/// Fault probabilities per step, in millionths.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub migrate: u32,
    pub push: u32,
    pub pull: u32,
    pub crash: u32,
    pub link_break: u32,
    pub conn_reset: u32,
    pub replay: u32,
    pub restart: u32,
    /// A server drains (then exits once its drain is over, as a deploy
    /// does; the restart fault brings it back).
    pub drain: u32,
}

impl WorldConfig {
    pub fn new(seed: u64, app: AppKind) -> Self {
        Self {
            seed,
            servers: 3,
            eager: false,
            app,
            up_len: 20_000,
            down_len: 30_000,
            random: false,
            faults: Faults::default(),
            max_steps: 200_000,
            limits: Limits {
                max_frame: DEFAULT_MAX_FRAME,
                max_data_frame: 1500,
                recv_window: 8 * 1024,
                send_buffer: 8 * 1024,
                ack_delay: Duration::from_millis(5),
            },
            tls: true,
            balance: false,
        }
    }
}

/// One TCP connection between the client (or an attacker) and a server.
pub struct Conn {
    pub server: usize,
    pub server_inc: IncarnationId,
    pub c2s: BytesMut,
    pub s2c: BytesMut,
    pub client_closed: bool,
    pub server_closed: bool,
    pub attacker: bool,
    /// Attacker connections: the proof to answer a challenge with.
    pub proof: [u8; 32],
    /// Server output (attackers), or the client's first bytes (captured).
    pub seen: BytesMut,
    pub captured: BytesMut,
    /// The server's first bytes to the client (captured).
    pub captured_s2c: BytesMut,
    /// The epoch of the Migrate this (client) connection carried.
    pub migrate_epoch: Option<u64>,
    /// The connection's channel binding (TLS), if any.
    pub binding: Option<[u8; 32]>,
    /// Attackers holding a secret: the request they forge a proof for.
    pub forge: Option<(MigrateRequest, Secret)>,
}

pub struct ServerNode {
    pub core: Server,
    pub apps: BTreeMap<SessionHandle, ServerApp>,
    pub accepted: Vec<(SessionHandle, SessionId, Arrival)>,
    pub events: Vec<ServerEvent>,
}

/// Final record of a server application that finished its session.
#[derive(Debug, Clone)]
pub struct Finished {
    pub server: usize,
    pub app: ServerApp,
}

pub struct World {
    pub cfg: WorldConfig,
    pub now: Instant,
    pub rng: SmallRng,
    pub ids: Vec<ServerId>,
    pub servers: Vec<Option<ServerNode>>,
    pub client: Client,
    pub client_events: Vec<ClientEvent>,
    /// Expected up stream (what the client will write) and down stream.
    pub up_data: Vec<u8>,
    pub up_written: usize,
    pub closed_write: bool,
    pub received: Vec<u8>,
    pub client_eof: bool,
    pub conns: BTreeMap<IncarnationId, Conn>,
    /// Server-side incarnation -> client-side key.
    by_server: HashMap<(usize, IncarnationId), IncarnationId>,
    pub links: BTreeMap<(usize, usize), VecDeque<Bytes>>,
    /// Control-plane bytes sent from one server to another, in total.
    pub link_bytes: BTreeMap<(usize, usize), u64>,
    link_up: BTreeMap<(usize, usize), bool>,
    next_attacker: u64,
    pub finished: Vec<Finished>,
    /// Migrate requests the client sent, with the proof it gave (an
    /// eavesdropper's capture).
    pub sent_migrates: Vec<(MigrateRequest, [u8; 32])>,
    /// Every epoch's secret, as the eavesdropper followed them (Welcome,
    /// then each Resumed's rekey).
    pub leaked: BTreeMap<u64, Secret>,
    /// Challenges servers sent to the client (plaintext connections).
    pub challenges: u32,

    pub trace: Vec<String>,
    pub steps: usize,
    /// Some crash could legitimately lose the session (lazy mode, or eager
    /// with the backup out of step): a clean failure is then allowed.
    pub loss_allowed: bool,
    pub crashes: u32,
    pub replays_refused: u32,
    /// Rejects the attacker connections received.
    pub attacker_rejects: Vec<(migratory_proto::frame::RejectReason, String)>,
    /// Hold back what this server sends to the client (scenario tests).
    pub hold_from: Option<usize>,
    /// Hold back what this control link carries, (from, to) (scenario
    /// tests: a slow path between two servers).
    pub hold_link: Option<(usize, usize)>,
    pub migrations_seen: u32,
    /// Migrations that resumed beyond what the client held (it then caught
    /// up on its old connection), and gaps a destination fetched for it.
    pub catch_ups: u32,
    pub gaps_filled: u32,
    /// Of those, gaps fetched for a state request held while the client
    /// was away (see `cut_off`).
    pub gaps_held: u32,
    /// The server the client's last migration left (it may still hold
    /// bytes the client lacks while it catches up).
    pub left_from: Option<usize>,
    /// Drains started.
    pub drains: u32,
    /// Servers the client cannot reach (its connections to them are
    /// refused; the servers and their control links are fine), until then.
    pub unreachable: BTreeSet<usize>,
    pub unreachable_until: Option<Instant>,
    /// Times the client was cut off from its new server while it caught
    /// up (see `cut_off`).
    pub cut_offs: u32,
}

pub fn id(i: usize) -> ServerId {
    ServerId::new(format!("s{}", i + 1)).unwrap()
}

impl World {
    pub fn new(cfg: WorldConfig) -> Self {
        let now = Instant::now();
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let ids: Vec<ServerId> = (0..cfg.servers).map(id).collect();
        let servers = (0..cfg.servers)
            .map(|i| Some(Self::boot(&cfg, &ids, i, rng.next_u64(), now)))
            .collect();
        let client = Client::new(
            ClientConfig {
                limits: cfg.limits.clone(),
                timeouts: ClientTimeouts {
                    handshake: Duration::from_millis(500),
                    ping_interval: Duration::from_secs(1),
                    idle: Duration::from_secs(3),
                },
                ignore_triggers: false,
                failover_rounds: 3,
            },
            now,
        );
        let up_data = apps::client_upload(&cfg.app, cfg.seed, cfg.up_len, cfg.down_len);
        let mut w = Self {
            cfg,
            now,
            rng,
            ids,
            servers,
            client,
            client_events: Vec::new(),
            up_data,
            up_written: 0,
            closed_write: false,
            received: Vec::new(),
            client_eof: false,
            conns: BTreeMap::new(),
            by_server: HashMap::new(),
            links: BTreeMap::new(),
            link_bytes: BTreeMap::new(),
            link_up: BTreeMap::new(),
            next_attacker: 1 << 40,
            finished: Vec::new(),
            sent_migrates: Vec::new(),
            leaked: BTreeMap::new(),
            challenges: 0,
            trace: Vec::new(),
            steps: 0,
            loss_allowed: false,
            crashes: 0,
            replays_refused: 0,
            attacker_rejects: Vec::new(),
            hold_from: None,
            hold_link: None,
            migrations_seen: 0,
            catch_ups: 0,
            gaps_filled: 0,
            gaps_held: 0,
            left_from: None,
            drains: 0,
            unreachable: BTreeSet::new(),
            unreachable_until: None,
            cut_offs: 0,
        };
        let inc = w.client.start(w.now);
        w.log(format!("client starts on {inc}"));
        w.flush();
        w
    }

    fn boot(cfg: &WorldConfig, ids: &[ServerId], i: usize, seed: u64, now: Instant) -> ServerNode {
        let mut sc = ServerConfig::new(ids[i].clone());
        sc.alternates = ids
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, id)| Alternate {
                id: id.clone(),
                addrs: vec![],
            })
            .collect();
        if cfg.eager {
            let b = (i + 1) % ids.len();
            sc.backup = Some(ids[b].clone());
            // Clients fail over to the backup first.
            if let Some(pos) = sc.alternates.iter().position(|a| a.id == ids[b]) {
                let alt = sc.alternates.remove(pos);
                sc.alternates.insert(0, alt);
            }
        }
        if cfg.balance {
            sc.balance = Some(migratory_proto::server::BalanceConfig {
                rebalance: None,
                ..Default::default()
            });
        }
        if cfg.faults.drain > 0 {
            // Simulated time moves in milliseconds: quick reports and rounds.
            sc.balance = Some(migratory_proto::server::BalanceConfig {
                report_every: Duration::from_millis(100),
                stale_after: Duration::from_millis(300),
                rebalance: None,
                drain_round: Duration::from_millis(20),
                retrigger: Duration::from_millis(300),
                drain_parallel: 4,
            });
        }
        sc.limits = cfg.limits.clone();
        sc.timeouts = ServerTimeouts {
            handshake: Duration::from_secs(2),
            state_request: Duration::from_millis(400),
            settle: Duration::from_millis(100),
            frozen: Duration::from_secs(30),
            orphan: Duration::from_secs(60),
            backup: Duration::from_secs(60),
        };
        ServerNode {
            core: Server::new(sc, Box::new(SmallRng::seed_from_u64(seed)), now),
            apps: BTreeMap::new(),
            accepted: Vec::new(),
            events: Vec::new(),
        }
    }

    pub fn log(&mut self, s: String) {
        if self.trace.len() > 4000 {
            self.trace.drain(..2000);
        }
        self.trace.push(format!("[{:>7}] {s}", self.steps));
    }

    /// The application handle of the session at server `i` (the latest).
    pub fn handle(&self, i: usize) -> SessionHandle {
        self.servers[i]
            .as_ref()
            .expect("up")
            .accepted
            .last()
            .expect("a session was accepted")
            .0
    }

    /// How the latest session arrived at server `i`.
    pub fn arrival(&self, i: usize) -> Arrival {
        self.servers[i]
            .as_ref()
            .expect("up")
            .accepted
            .last()
            .expect("accepted")
            .2
            .clone()
    }

    /// Reads everything the server application can read now.
    pub fn server_read_all(&mut self, i: usize) -> (Vec<u8>, bool) {
        let h = self.handle(i);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.server(i).read(h, &mut buf).expect("server read") {
                Some(0) => return (out, true),
                Some(n) => out.extend_from_slice(&buf[..n]),
                None => return (out, false),
            }
        }
    }

    /// Reads everything the client application can read now.
    pub fn client_read_all(&mut self) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.client.read(&mut buf).expect("client read") {
                Some(0) => return (out, true),
                Some(n) => out.extend_from_slice(&buf[..n]),
                None => return (out, false),
            }
        }
    }

    /// Reads what the client received before it failed.
    pub fn client_read_all_after_failure(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(Some(n)) = self.client.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    pub fn server(&mut self, i: usize) -> &mut Server {
        &mut self.servers[i].as_mut().expect("server is up").core
    }

    pub fn index_of(&self, id: &ServerId) -> usize {
        self.ids.iter().position(|x| x == id).expect("known server")
    }

    pub fn owner(&self) -> Option<usize> {
        self.client.server().map(|s| self.index_of(s))
    }

    // ----- moving bytes and messages ------------------------------------------

    /// Runs every node's output and events until nothing moves (no delivery
    /// of network bytes: that is `deliver`).
    pub fn flush(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            moved |= self.flush_client();
            for i in 0..self.servers.len() {
                moved |= self.flush_server(i);
            }
            if !moved {
                return;
            }
        }
        panic!("flush did not settle");
    }

    fn flush_client(&mut self) -> bool {
        let mut moved = false;
        // Events first: a Connect must exist before its bytes are written.
        while let Some(ev) = self.client.poll_event() {
            moved = true;
            self.on_client_event(ev);
        }
        let mut segs = Vec::new();
        while let Some(inc) = self.client.poll_transmit(self.now, &mut segs) {
            moved = true;
            let bytes: Vec<u8> = segs.drain(..).flat_map(|b| b.to_vec()).collect();
            if let Some(c) = self.conns.get_mut(&inc) {
                if !c.client_closed {
                    c.c2s.extend_from_slice(&bytes);
                }
            }
            self.capture(inc, &bytes);
        }
        while let Some(ev) = self.client.poll_event() {
            moved = true;
            self.on_client_event(ev);
        }
        moved
    }

    /// An eavesdropper records each incarnation's Migrate and Proof.
    fn capture(&mut self, inc: IncarnationId, bytes: &[u8]) {
        let Some(c) = self.conns.get_mut(&inc) else {
            return;
        };
        if c.captured.len() > 4096 {
            return;
        }
        c.captured.extend_from_slice(bytes);
        let mut b = c.captured.clone();
        if !b.starts_with(&PREAMBLE) {
            return;
        }
        let _ = b.split_to(PREAMBLE.len());
        let first = Frame::decode(&mut b, DEFAULT_MAX_FRAME);
        let second = Frame::decode(&mut b, DEFAULT_MAX_FRAME);
        if let Ok(Some(Frame::Migrate(req))) = &first {
            c.migrate_epoch = Some(req.epoch);
        }
        if let (Ok(Some(Frame::Migrate(req))), Ok(Some(Frame::Proof { mac }))) = (first, second) {
            c.captured = BytesMut::from(&[0xffu8; 4097][..]);
            self.sent_migrates.push((req, mac));
        }
    }

    /// The eavesdropper follows the session's secrets: Welcome's, then
    /// each Resumed's rekey applied to the secret of the epoch its Migrate
    /// named.
    fn capture_s2c(&mut self, key: IncarnationId, bytes: &[u8]) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.attacker || c.captured_s2c.len() > 4096 {
            return;
        }
        c.captured_s2c.extend_from_slice(bytes);
        let mut b = c.captured_s2c.clone();
        let frame = match Frame::decode(&mut b, DEFAULT_MAX_FRAME) {
            Ok(Some(f)) => f,
            _ => return,
        };
        c.captured_s2c = BytesMut::from(&[0xffu8; 4097][..]);
        let from = c.migrate_epoch;
        match frame {
            Frame::Challenge { .. } => self.challenges += 1,
            Frame::Welcome { secret, epoch, .. } => {
                self.leaked.insert(epoch, secret);
            }
            Frame::Resumed {
                epoch,
                rekey: Some(k),
                ..
            } => {
                if let Some(old) = from.and_then(|e| self.leaked.get(&e)) {
                    let new = next_secret(old, &k, epoch);
                    self.leaked.insert(epoch, new);
                }
            }
            _ => {}
        }
    }

    fn on_client_event(&mut self, ev: ClientEvent) {
        self.log(format!("client: {ev:?}"));
        match &ev {
            ClientEvent::Connect { inc, server } => {
                let target = match server {
                    Some(s) => self.index_of(s),
                    None => 0,
                };
                self.connect(*inc, target, false);
            }
            ClientEvent::CloseIncarnation(inc) => {
                if let Some(c) = self.conns.get_mut(inc) {
                    c.client_closed = true;
                }
            }
            ClientEvent::Migrated { from, to, .. } => {
                if from != to {
                    self.left_from = Some(self.index_of(from));
                }
                self.migrations_seen += 1;
                self.catch_ups += u32::from(self.client.is_catching_up());
            }
            _ => {}
        }
        self.client_events.push(ev);
    }

    fn connect(&mut self, inc: IncarnationId, target: usize, attacker: bool) {
        let now = self.now;
        let reachable = attacker || !self.unreachable.contains(&target);
        match self.servers[target].as_mut().filter(|_| reachable) {
            Some(node) => {
                let binding = self.cfg.tls.then(|| {
                    let mut b = [0u8; 32];
                    self.rng.fill_bytes(&mut b);
                    b
                });
                let server_inc = node.core.new_incarnation(now, binding);
                self.by_server.insert((target, server_inc), inc);
                self.conns.insert(
                    inc,
                    Conn {
                        server: target,
                        server_inc,
                        c2s: BytesMut::new(),
                        s2c: BytesMut::new(),
                        client_closed: false,
                        server_closed: false,
                        attacker,
                        proof: [0; 32],
                        seen: BytesMut::new(),
                        captured: BytesMut::new(),
                        captured_s2c: BytesMut::new(),
                        migrate_epoch: None,
                        binding,
                        forge: None,
                    },
                );
                if !attacker {
                    self.client.handle_connected(now, inc, binding);
                }
            }
            None if !attacker => {
                self.log(format!("connect {inc} to s{} refused", target + 1));
                self.client
                    .handle_incarnation_closed(now, inc, "connection refused");
            }
            None => {}
        }
    }

    fn flush_server(&mut self, i: usize) -> bool {
        let now = self.now;
        let Some(node) = self.servers[i].as_mut() else {
            return false;
        };
        let mut moved = false;
        let mut segs = Vec::new();
        let mut outs = Vec::new();
        while let Some(dest) = node.core.poll_transmit(now, &mut segs) {
            let bytes: Bytes = segs
                .drain(..)
                .flat_map(|b| b.to_vec())
                .collect::<Vec<u8>>()
                .into();
            outs.push((dest, bytes));
        }
        let mut events = Vec::new();
        while let Some(ev) = node.core.poll_event() {
            events.push(ev);
        }
        for (dest, bytes) in outs {
            moved = true;
            match dest {
                Dest::Incarnation(sinc) => {
                    if let Some(key) = self.by_server.get(&(i, sinc)) {
                        let key = *key;
                        if let Some(c) = self.conns.get_mut(&key) {
                            if !c.server_closed {
                                c.s2c.extend_from_slice(&bytes);
                            }
                        }
                        self.capture_s2c(key, &bytes);
                    }
                }
                Dest::Peer(peer) => self.send_control(i, &peer, bytes),
            }
        }
        for ev in events {
            moved = true;
            self.on_server_event(i, ev);
        }
        moved
    }

    fn send_control(&mut self, from: usize, peer: &ServerId, bytes: Bytes) {
        let to = self.index_of(peer);
        let now = self.now;
        if self.servers[to].is_none() {
            // Connection refused: the sender learns the peer is down.
            self.log(format!("s{} -> s{}: peer down", from + 1, to + 1));
            self.server(from).handle_peer_down(now, peer);
            return;
        }
        let up = self
            .link_up
            .entry((from.min(to), from.max(to)))
            .or_insert(true);
        if !*up {
            // Opened again on demand.
            *up = true;
            let (a, b) = (self.ids[from].clone(), self.ids[to].clone());
            self.log(format!("link s{}-s{} re-established", from + 1, to + 1));
            self.server(from).handle_peer_up(now, &b);
            self.server(to).handle_peer_up(now, &a);
        }
        *self.link_bytes.entry((from, to)).or_default() += bytes.len() as u64;
        self.links.entry((from, to)).or_default().push_back(bytes);
    }

    fn on_server_event(&mut self, i: usize, ev: ServerEvent) {
        self.log(format!("s{}: {ev:?}", i + 1));
        let now = self.now;
        let app_kind = self.cfg.app.clone();
        let node = self.servers[i].as_mut().expect("up");
        match &ev {
            ServerEvent::Accepted {
                handle,
                session,
                arrival,
            } => {
                node.accepted.push((*handle, *session, arrival.clone()));
                if !self.cfg.random {
                    // Scenario tests play the application themselves.
                    self.servers[i].as_mut().expect("up").events.push(ev);
                    return;
                }
                let app = match arrival {
                    Arrival::New => ServerApp::new(&app_kind),
                    Arrival::Migrated { state } => {
                        ServerApp::restore(&app_kind, state).expect("application state decodes")
                    }
                };
                node.apps.insert(*handle, app);
            }
            ServerEvent::MigratedAway(h) => {
                node.apps.remove(h);
            }
            ServerEvent::Dropped(h) => {
                // Dropped after the client left for good: if the client had
                // finished, this is the session's final server state. Unless
                // a drain ended it at its deadline: then, as in a crash, what
                // the application had not read yet is gone (the server
                // exits next).
                let ended_by_drain = node.core.drain_status().is_some_and(|d| d.closed > 0);
                if let Some(app) = node.apps.remove(h) {
                    if self.client.is_finished() && !ended_by_drain {
                        self.finished.push(Finished { server: i, app });
                    }
                }
            }
            ServerEvent::Finished(h) => {
                if self.cfg.random {
                    node.core.release(*h);
                }
                if let Some(app) = node.apps.remove(h) {
                    self.finished.push(Finished { server: i, app });
                }
            }
            ServerEvent::CloseIncarnation { inc, .. } => {
                if let Some(key) = self.by_server.get(&(i, *inc)) {
                    if let Some(c) = self.conns.get_mut(key) {
                        c.server_closed = true;
                    }
                }
            }
            ServerEvent::PlainClient { inc, .. } => {
                node.core.handle_incarnation_closed(now, *inc);
            }
            _ => {}
        }
        self.servers[i].as_mut().expect("up").events.push(ev);
    }

    /// Delivers up to `max` bytes of one direction of one connection; closes
    /// drained connections.
    pub fn deliver_conn(&mut self, key: IncarnationId, to_server: bool, max: usize) {
        let now = self.now;
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let (server, sinc) = (c.server, c.server_inc);
        if to_server {
            let n = c.c2s.len().min(max);
            let chunk = c.c2s.split_to(n);
            let done = c.client_closed && c.c2s.is_empty();
            if let Some(node) = self.servers[server].as_mut() {
                if !chunk.is_empty() && !c.server_closed {
                    node.core.handle_input(now, sinc, &chunk);
                }
                if done {
                    node.core.handle_incarnation_closed(now, sinc);
                }
            }
            if done {
                self.close_conn(key);
            }
        } else {
            let n = c.s2c.len().min(max);
            let chunk = c.s2c.split_to(n);
            let done = c.server_closed && c.s2c.is_empty();
            if c.attacker {
                c.seen.extend_from_slice(&chunk);
                self.check_attacker(key);
                if done {
                    self.close_conn(key);
                }
                return;
            }
            if !chunk.is_empty() && !c.client_closed {
                self.client.handle_input(now, key, &chunk);
            }
            if done {
                if !c.client_closed {
                    self.client.handle_incarnation_closed(now, key, "EOF");
                }
                if let Some(node) = self.servers[server].as_mut() {
                    node.core.handle_incarnation_closed(now, sinc);
                }
                self.close_conn(key);
            }
        }
    }

    fn close_conn(&mut self, key: IncarnationId) {
        if let Some(c) = self.conns.remove(&key) {
            self.by_server.remove(&(c.server, c.server_inc));
        }
    }

    pub fn deliver_link(&mut self, from: usize, to: usize) {
        let Some(bytes) = self.links.get_mut(&(from, to)).and_then(|q| q.pop_front()) else {
            return;
        };
        let now = self.now;
        let mut b = BytesMut::from(&bytes[..]);
        let msg = ControlMessage::decode(&mut b, DEFAULT_MAX_CONTROL_FRAME)
            .expect("control messages decode")
            .expect("whole message");
        assert!(b.is_empty(), "one message per transmit");
        self.log(format!("s{} -> s{}: {}", from + 1, to + 1, msg.name()));
        if let ControlMessage::GapReply { data: Some(_), .. } = &msg {
            self.gaps_filled += 1;
            // Not for the client's own Missing: for a state request the
            // server held while the client was away.
            if !(self.owner() == Some(to) && self.client.is_catching_up()) {
                self.gaps_held += 1;
            }
        }
        let from_id = self.ids[from].clone();
        if let Some(node) = self.servers[to].as_mut() {
            node.core.handle_control(now, &from_id, msg);
        }
    }

    /// Control links with messages in flight (not held back).
    fn busy_links(&self) -> Vec<(usize, usize)> {
        self.links
            .iter()
            .filter(|(k, q)| !q.is_empty() && Some(**k) != self.hold_link)
            .map(|(k, _)| *k)
            .collect()
    }

    /// Delivers everything in flight, in order, until the world is quiet.
    pub fn pump(&mut self) {
        for _ in 0..100_000 {
            self.flush();
            let mut moved = false;
            let keys: Vec<IncarnationId> = self.conns.keys().copied().collect();
            for k in keys {
                let busy = self.conns.get(&k).is_some_and(|c| {
                    !c.c2s.is_empty() || !c.s2c.is_empty() || c.client_closed || c.server_closed
                });
                if busy {
                    let held = self
                        .conns
                        .get(&k)
                        .is_some_and(|c| Some(c.server) == self.hold_from);
                    let before = self.conns.get(&k).map(|c| (c.c2s.len(), c.s2c.len()));
                    self.deliver_conn(k, true, usize::MAX);
                    self.flush();
                    if !held {
                        self.deliver_conn(k, false, usize::MAX);
                    }
                    let after = self.conns.get(&k).map(|c| (c.c2s.len(), c.s2c.len()));
                    moved |= before != after;
                }
            }
            let links = self.busy_links();
            for (a, b) in links {
                moved = true;
                self.deliver_link(a, b);
            }
            if !moved {
                self.flush();
                return;
            }
        }
        panic!("pump did not settle");
    }

    // ----- faults and actions ------------------------------------------------

    pub fn crash(&mut self, i: usize) {
        if self.servers[i].is_none() {
            return;
        }
        // What the client already did (a Resumed it took) counts.
        while let Some(ev) = self.client.poll_event() {
            self.on_client_event(ev);
        }
        let Some(node) = self.servers[i].as_ref() else {
            return;
        };
        let sid = self.client.session();
        // The client's current server, even if the session already
        // finished there and only the client's last Ack is missing.
        let owned_here = sid.is_some_and(|sid| node.core.owned_sessions().any(|(s, _)| s == sid))
            || self.client.server() == Some(&self.ids[i]);
        // Or the origin of a migration whose data in flight the client
        // still drains from it.
        let frozen_or_pending = self.client.is_migrating()
            || (self.client.is_catching_up() && self.left_from == Some(i));
        if owned_here || frozen_or_pending {
            let tolerant = sid.is_some_and(|sid| node.core.crash_tolerant(sid));
            if !tolerant {
                self.loss_allowed = true;
            }
        }
        self.crashes += 1;
        self.log(format!("CRASH s{}", i + 1));
        // One fault at a time: the client reaches every live server again
        // (a crash must not leave it only an unreachable one).
        self.unreachable.clear();
        self.servers[i] = None;
        let now = self.now;
        let keys: Vec<IncarnationId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.server == i)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            let c = self.conns.remove(&k).expect("listed");
            self.by_server.remove(&(c.server, c.server_inc));
            if !c.attacker && !c.client_closed {
                self.client
                    .handle_incarnation_closed(now, k, "connection reset");
            }
        }
        let peer = self.ids[i].clone();
        for j in 0..self.servers.len() {
            self.links.remove(&(i, j));
            self.links.remove(&(j, i));
            if let Some(node) = self.servers[j].as_mut() {
                node.core.handle_peer_down(now, &peer);
            }
        }
    }

    pub fn restart(&mut self, i: usize) {
        if self.servers[i].is_some() {
            return;
        }
        self.log(format!("RESTART s{}", i + 1));
        let seed = self.rng.next_u64();
        self.servers[i] = Some(Self::boot(&self.cfg, &self.ids, i, seed, self.now));
    }

    pub fn break_link(&mut self, a: usize, b: usize) {
        let key = (a.min(b), a.max(b));
        if self.link_up.get(&key) == Some(&false) {
            return;
        }
        self.log(format!("LINK BREAK s{}-s{}", a + 1, b + 1));
        self.link_up.insert(key, false);
        self.links.remove(&(a, b));
        self.links.remove(&(b, a));
        let now = self.now;
        let (ia, ib) = (self.ids[a].clone(), self.ids[b].clone());
        if let Some(n) = self.servers[a].as_mut() {
            n.core.handle_peer_down(now, &ib);
        }
        if let Some(n) = self.servers[b].as_mut() {
            n.core.handle_peer_down(now, &ia);
        }
    }

    pub fn reset_conn(&mut self, key: IncarnationId) {
        let Some(c) = self.conns.remove(&key) else {
            return;
        };
        self.log(format!("RESET {key}"));
        self.by_server.remove(&(c.server, c.server_inc));
        let now = self.now;
        if let Some(n) = self.servers[c.server].as_mut() {
            n.core.handle_incarnation_closed(now, c.server_inc);
        }
        if !c.attacker && !c.client_closed {
            self.client
                .handle_incarnation_closed(now, key, "connection reset");
        }
    }

    /// Sends a captured (or forged) Migrate to server `target` on a fresh
    /// attacker connection, answering the challenge with `proof`.
    pub fn replay(&mut self, req: MigrateRequest, proof: [u8; 32], target: usize) {
        self.next_attacker += 1;
        let key = IncarnationId(self.next_attacker);
        self.log(format!("REPLAY epoch {} to s{}", req.epoch, target + 1));
        self.connect(key, target, true);
        if let Some(c) = self.conns.get_mut(&key) {
            c.c2s.extend_from_slice(&PREAMBLE);
            Frame::Migrate(req).encode(&mut c.c2s);
            c.proof = proof;
            if c.binding.is_some() {
                // A bound connection takes the proof at once.
                Frame::Proof { mac: proof }.encode(&mut c.c2s);
            }
        }
    }

    /// Sends a Migrate with a proof made with `secret` (a leaked one) for
    /// the attacker's own connection to server `target`.
    pub fn forge(&mut self, req: MigrateRequest, secret: Secret, target: usize) {
        self.next_attacker += 1;
        let key = IncarnationId(self.next_attacker);
        self.log(format!("FORGE epoch {} to s{}", req.epoch, target + 1));
        self.connect(key, target, true);
        if let Some(c) = self.conns.get_mut(&key) {
            c.c2s.extend_from_slice(&PREAMBLE);
            Frame::Migrate(req.clone()).encode(&mut c.c2s);
            match c.binding {
                Some(b) => Frame::Proof {
                    mac: migrate_mac(&secret, &req, &b),
                }
                .encode(&mut c.c2s),
                None => c.forge = Some((req, secret)),
            }
        }
    }

    fn check_attacker(&mut self, key: IncarnationId) {
        let c = self.conns.get_mut(&key).expect("present");
        while let Ok(Some(f)) = Frame::decode(&mut c.seen, DEFAULT_MAX_FRAME) {
            match f {
                Frame::Challenge { nonce } => {
                    let mac = match &c.forge {
                        Some((req, secret)) => migrate_mac(secret, req, &nonce),
                        None => c.proof,
                    };
                    Frame::Proof { mac }.encode(&mut c.c2s)
                }
                Frame::Resumed { .. } | Frame::Data(_) => {
                    panic!("invariant 3 violated: a replayed or forged Migrate resumed the session")
                }
                Frame::Reject { reason, text } => {
                    self.replays_refused += 1;
                    self.attacker_rejects.push((reason, text));
                }
                _ => {}
            }
        }
    }

    /// Advances virtual time by `d` and fires every timeout due.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        let now = self.now;
        if self.unreachable_until.is_some_and(|t| t <= now) {
            self.unreachable.clear();
            self.unreachable_until = None;
        }
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
        }
        for node in self.servers.iter_mut().flatten() {
            if node.core.poll_timeout().is_some_and(|t| t <= now) {
                node.core.handle_timeout(now);
            }
        }
    }

    /// The next timeout of any node.
    pub fn next_timeout(&self) -> Option<Instant> {
        let c = self.client.poll_timeout();
        let s = self
            .servers
            .iter()
            .flatten()
            .filter_map(|n| n.core.poll_timeout());
        c.into_iter().chain(s).min()
    }

    // ----- the client application ----------------------------------------------

    /// Writes up to `max` more bytes of the upload; closes when done.
    pub fn client_write(&mut self, max: usize) {
        if self.client.failure().is_some() || self.client.session().is_none() {
            return;
        }
        let end = (self.up_written + max).min(self.up_data.len());
        if self.up_written < end {
            let n = self
                .client
                .write(&self.up_data[self.up_written..end])
                .expect("client write");
            self.up_written += n;
        }
        if self.up_written == self.up_data.len() && !self.closed_write {
            self.client.close_write().expect("close");
            self.closed_write = true;
        }
    }

    /// Reads up to `max` bytes and checks them against the expected stream
    /// at once (never wrong data).
    pub fn client_read(&mut self, max: usize) {
        let mut buf = vec![0; max.max(1)];
        if let Ok(Some(n)) = self.client.read(&mut buf) {
            if n == 0 {
                self.client_eof = true;
            }
            self.received.extend_from_slice(&buf[..n]);
            let expected = apps::expected_download(
                &self.cfg.app,
                self.cfg.seed,
                &self.up_data,
                self.cfg.down_len,
            );
            let k = self.received.len();
            assert!(
                k <= expected.len(),
                "invariant 1: client read more than was written"
            );
            if self.received[..] != expected[..k] {
                let at = self
                    .received
                    .iter()
                    .zip(&expected)
                    .position(|(a, b)| a != b)
                    .unwrap();
                panic!("invariant 1 violated: wrong byte at down position {at}");
            }
        }
    }

    /// Runs one step of each live application, with snapshots at random.
    pub fn run_apps(&mut self, snapshot_per_mille: u32) {
        for i in 0..self.servers.len() {
            let Some(node) = self.servers[i].as_mut() else {
                continue;
            };
            let handles: Vec<SessionHandle> = node.apps.keys().copied().collect();
            for h in handles {
                let node = self.servers[i].as_mut().expect("up");
                let app = node.apps.get_mut(&h).expect("listed");
                let snap = self.rng.gen_range(0..1000) < snapshot_per_mille;
                let chunk = self.rng.gen_range(1..4000);
                if let Err(e) = app.step(&mut node.core, h, chunk, snap) {
                    let app = node.apps.remove(&h).expect("listed");
                    self.log(format!("s{}: app {h:?} stops: {e}", i + 1));
                    // The session finished during this step: the app's state
                    // is final.
                    if matches!(e, AppError::Session(SessionError::Closed)) {
                        self.finished.push(Finished { server: i, app });
                    }
                }
            }
        }
    }

    // ----- the random scheduler ------------------------------------------------

    /// One random step of the whole world.
    pub fn step(&mut self) {
        self.steps += 1;
        let f = self.cfg.faults.clone();
        let roll = |rng: &mut SmallRng, p: u32| p > 0 && rng.gen_range(0..1_000_000) < p;
        match self.rng.gen_range(0..10) {
            0..=4 => {
                // Deliver part of a random connection direction.
                let keys: Vec<IncarnationId> = self.conns.keys().copied().collect();
                if !keys.is_empty() {
                    let k = keys[self.rng.gen_range(0..keys.len())];
                    let to_server = self.rng.gen_bool(0.5);
                    let max = self.rng.gen_range(1..6000);
                    self.deliver_conn(k, to_server, max);
                }
            }
            5 => {
                let links = self.busy_links();
                if !links.is_empty() {
                    let (a, b) = links[self.rng.gen_range(0..links.len())];
                    self.deliver_link(a, b);
                }
            }
            6 => self.run_apps(300),
            7 => {
                let n = self.rng.gen_range(1..5000);
                self.client_write(n);
                let n = self.rng.gen_range(1..5000);
                self.client_read(n);
            }
            8 => {
                let d = self.rng.gen_range(0..3_000);
                self.advance(Duration::from_micros(d));
            }
            _ => {
                if self.conns.is_empty() && self.links.values().all(|q| q.is_empty()) {
                    // Nothing in flight: let the applications finish their
                    // work (as they would in microseconds), then jump to
                    // the next timeout.
                    for _ in 0..20 {
                        self.run_apps(300);
                        self.flush();
                    }
                    if let Some(t) = self.next_timeout() {
                        let d = t.saturating_duration_since(self.now) + Duration::from_millis(1);
                        self.advance(d);
                    }
                } else {
                    self.advance(Duration::from_millis(1));
                }
            }
        }
        let n = self.servers.len();
        if self.client.session().is_none() {
            // Faults start once the session exists (the runtime retries the
            // initial connection itself).
            self.flush();
            return;
        }
        if roll(&mut self.rng, f.migrate) && self.client.is_established() {
            let dest = self.rng.gen_range(0..n);
            self.log(format!("MIGRATE to s{}", dest + 1));
            let _ = self.client.migrate(self.now, Some(self.ids[dest].clone()));
        }
        if roll(&mut self.rng, f.push) {
            self.server_push();
        }
        if roll(&mut self.rng, f.pull) {
            self.dest_pull();
        }
        if roll(&mut self.rng, f.crash) {
            let i = self.rng.gen_range(0..n);
            let alive = self.servers.iter().filter(|s| s.is_some()).count();
            if alive > 1 {
                self.crash(i);
            }
        }
        if roll(&mut self.rng, f.restart) {
            let i = self.rng.gen_range(0..n);
            self.restart(i);
        }
        if roll(&mut self.rng, f.link_break) {
            let a = self.rng.gen_range(0..n);
            let b = (a + self.rng.gen_range(1..n)) % n;
            self.break_link(a, b);
        }
        if roll(&mut self.rng, f.conn_reset) && !self.conns.is_empty() {
            let keys: Vec<IncarnationId> = self.conns.keys().copied().collect();
            let k = keys[self.rng.gen_range(0..keys.len())];
            self.reset_conn(k);
        }
        if f.conn_reset > 0 && self.client.is_catching_up() && self.rng.gen_range(0..40) == 0 {
            // The old connection of a migration under load fails while the
            // client drains it: the destination fetches what it lacks.
            let owner = self.client.server().cloned();
            let old = self
                .conns
                .iter()
                .find(|(_, c)| !c.attacker && Some(&self.ids[c.server]) != owner.as_ref())
                .map(|(k, _)| *k);
            if let Some(k) = old {
                self.reset_conn(k);
            }
        }
        if f.conn_reset > 0 && self.client.is_catching_up() && self.rng.gen_range(0..80) == 0 {
            self.cut_off();
        }
        if roll(&mut self.rng, f.drain) {
            self.drain_one();
        }
        self.exit_drained();
        if roll(&mut self.rng, f.replay) {
            self.random_replay();
        }
        self.flush();
        self.check_one_owner();
    }

    /// The client loses its new server while it catches up after a
    /// migration under load: its connection there breaks, and the server
    /// is out of its reach for 20 to 300 ms (the servers stay up). Half the
    /// time its old connection breaks too (its network changed), and a
    /// third of the time the control link between the new server and the
    /// origin. Another server resumes the session, the bytes the client
    /// lacks fetched from the origin, or the client comes back.
    pub fn cut_off(&mut self) {
        let Some(owner) = self.owner().filter(|_| self.unreachable.is_empty()) else {
            return;
        };
        // Only while another server can take the session.
        let takers = (0..self.servers.len()).filter(|i| {
            *i != owner
                && self.servers[*i]
                    .as_ref()
                    .is_some_and(|n| n.core.drain_status().is_none())
        });
        if takers.count() == 0 {
            return;
        }
        let all = self.rng.gen_bool(0.5);
        let ms = self.rng.gen_range(20..=300);
        self.log(format!(
            "CUT OFF from s{} for {ms} ms (all: {all})",
            owner + 1
        ));
        self.cut_offs += 1;
        self.unreachable.insert(owner);
        self.unreachable_until = Some(self.now + Duration::from_millis(ms));
        let keys: Vec<IncarnationId> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.attacker && (all || c.server == owner))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.reset_conn(k);
        }
        // A third of the time the way from the new server to the origin
        // fails too: the bytes the client lacks come late.
        if let Some(origin) = self.left_from.filter(|o| *o != owner) {
            if self.rng.gen_range(0..3) == 0 {
                self.break_link(owner, origin);
            }
        }
    }

    /// A random live server that is not draining starts a drain with a
    /// deadline of 0.1 to 2 s (one in five: under 30 ms). A drain may end the session (no peer could
    /// take it in time), but only with `Reject(Shutdown)` (see `verify`).
    pub fn drain_one(&mut self) {
        let live: Vec<usize> = (0..self.servers.len())
            .filter(|i| {
                self.servers[*i]
                    .as_ref()
                    .is_some_and(|n| n.core.drain_status().is_none())
            })
            .collect();
        if live.len() < 2 {
            return; // keep one server taking sessions
        }
        let i = live[self.rng.gen_range(0..live.len())];
        // Some too short to move anything: the session is then ended.
        let deadline = if self.rng.gen_bool(0.2) {
            Duration::from_millis(self.rng.gen_range(0..30))
        } else {
            Duration::from_millis(self.rng.gen_range(100..2_000))
        };
        self.log(format!("DRAIN s{} within {deadline:?}", i + 1));
        self.drains += 1;
        // One fault at a time (as for a crash).
        self.unreachable.clear();
        let now = self.now;
        if let Some(n) = self.servers[i].as_mut() {
            n.core.drain(now, now + deadline);
        }
    }

    /// A server whose drain is over exits (its process ends, as `serve`
    /// does after a drain).
    fn exit_drained(&mut self) {
        for i in 0..self.servers.len() {
            // A drain that ended sessions may have ended this one. Its
            // client learns it from the Reject on its connection, or, if
            // it had none just then, from no server resuming the session:
            // a clean failure either way.
            let closed = self.servers[i]
                .as_ref()
                .and_then(|n| n.core.drain_status())
                .is_some_and(|d| d.closed > 0);
            if closed {
                self.loss_allowed = true;
            }
            let over = self.servers[i]
                .as_ref()
                .and_then(|n| n.core.drain_status())
                .is_some_and(|d| d.done);
            // What it wrote goes out before it exits (a runtime flushes
            // its connections as it closes them): a session that finished
            // at the end of the drain has its last Ack with the client.
            let flushing = self
                .conns
                .values()
                .any(|c| c.server == i && (!c.s2c.is_empty() || !c.c2s.is_empty()));
            if over && !flushing {
                self.log(format!("DRAINED s{}: exits", i + 1));
                let node = self.servers[i].as_ref().expect("live");
                if let Some(sid) = self.client.session() {
                    assert!(
                        !node.core.owned_sessions().any(|(s, _)| s == sid),
                        "a drained server still owns the session"
                    );
                }
                // Nothing left here (not even a frozen copy on its way):
                // an orderly exit, which loses nothing. A replica it keeps
                // for the owner goes with it: the owner carries on without
                // crash tolerance, and its crash now (a second fault) may
                // lose the session, as the crash of a backup would.
                let replica = self
                    .client
                    .session()
                    .is_some_and(|sid| node.core.has_replica(sid));
                let orderly = node.core.session_count() == 0 && !replica;
                let allowed = self.loss_allowed;
                self.crash(i);
                if orderly {
                    self.loss_allowed = allowed;
                } else if replica {
                    self.loss_allowed = true;
                }
            }
        }
    }

    /// Server push: the owner's application asks its client to move.
    pub fn server_push(&mut self) {
        let Some(o) = self.owner() else { return };
        let n = self.servers.len();
        let dest = self.ids[(o + 1 + self.rng.gen_range(0..n - 1)) % n].clone();
        if let Some(node) = self.servers[o].as_mut() {
            if let Some(h) = node.apps.keys().next().copied() {
                let _ = node.core.migrate_to(h, Some(dest.clone()));
                self.log(format!("PUSH from s{} to {dest}", o + 1));
            }
        }
    }

    /// Destination pull: a server asks the owner to send the client to it.
    pub fn dest_pull(&mut self) {
        let (Some(o), Some(sid)) = (self.owner(), self.client.session()) else {
            return;
        };
        let n = self.servers.len();
        let d = (o + 1 + self.rng.gen_range(0..n - 1)) % n;
        let owner = self.ids[o].clone();
        if let Some(node) = self.servers[d].as_mut() {
            node.core.pull(sid, owner);
            self.log(format!("PULL by s{}", d + 1));
        }
    }

    fn random_replay(&mut self) {
        let Some(epoch) = self.client.epoch() else {
            return;
        };
        let target = self.rng.gen_range(0..self.servers.len());
        if self.sent_migrates.is_empty() {
            return;
        }
        let (mut req, mut proof) =
            self.sent_migrates[self.rng.gen_range(0..self.sent_migrates.len())].clone();
        // Secrets of epochs that are over: no server takes a Migrate at
        // them any more. (Until the client confirms a new epoch, the one
        // before stays valid for a client whose Resumed was lost, and an
        // origin's frozen copy answers its own epoch until the session is
        // confirmed elsewhere: see docs/security.md.)
        let sid = self.client.session();
        let live: Vec<u64> = self
            .servers
            .iter()
            .flatten()
            .flat_map(|n| sid.map(|s| n.core.accepted_epochs(s)).unwrap_or_default())
            .collect();
        let old: Vec<(u64, Secret)> = self
            .leaked
            .iter()
            .filter(|(e, _)| **e != epoch && !live.contains(e))
            .map(|(e, s)| (*e, s.clone()))
            .collect();
        match self.rng.gen_range(0..3) {
            0 => {
                // Forged: the current epoch with a guessed proof.
                req.epoch = epoch;
                self.rng.fill_bytes(&mut proof);
                self.replay(req, proof, target);
            }
            1 if !old.is_empty() => {
                // An old epoch's secret, a fresh proof for the attacker's
                // own connection, and a huge attempt number.
                let (e, secret) = old[self.rng.gen_range(0..old.len())].clone();
                req.epoch = e;
                req.attempt = u64::MAX - self.rng.gen_range(0..1000);
                self.forge(req, secret, target);
            }
            _ => self.replay(req, proof, target),
        }
    }

    /// Invariant 3: never two servers live at one epoch with a connection
    /// from the client.
    pub fn check_one_owner(&self) {
        let Some(sid) = self.client.session() else {
            return;
        };
        let mut seen: HashMap<u64, usize> = HashMap::new();
        for (i, node) in self.servers.iter().enumerate() {
            let Some(node) = node else { continue };
            for (s, epoch) in node.core.owned_sessions() {
                if s != sid {
                    continue;
                }
                let connected = self.conns.values().any(|c| {
                    c.server == i
                        && !c.client_closed
                        && !c.attacker
                        && node.core.incarnation_session(c.server_inc) == Some(sid)
                });
                if connected {
                    if let Some(j) = seen.insert(epoch, i) {
                        panic!(
                            "invariant 3 violated: s{} and s{} both serve epoch {epoch}",
                            j + 1,
                            i + 1
                        );
                    }
                }
            }
        }
    }

    /// Whether the run is over: the session finished on both sides, or the
    /// client failed.
    pub fn done(&self) -> bool {
        // Every server-side copy ended (finished, or dropped as an orphan or
        // zombie), so the record of the one that served the client exists.
        let apps_done = self.servers.iter().flatten().all(|n| n.apps.is_empty());
        let server_done = (!self.finished.is_empty() && apps_done) || self.servers_quiet();
        (self.client.is_finished() && self.client_eof && server_done)
            || self.client.failure().is_some()
    }

    /// No server holds the session any more (it crashed after the client
    /// was done).
    fn servers_quiet(&self) -> bool {
        let Some(sid) = self.client.session() else {
            return false;
        };
        self.crashes > 0
            && self
                .servers
                .iter()
                .flatten()
                .all(|n| n.core.owned_sessions().all(|(s, _)| s != sid))
    }

    /// Runs the random scheduler to the end and checks every invariant.
    pub fn run(&mut self) -> Outcome {
        while !self.done() && self.steps < self.cfg.max_steps {
            self.step();
            // Drain reads/writes often enough to make progress.
            if self.steps % 7 == 0 {
                self.client_write(4096);
                self.client_read(8192);
            }
        }
        self.verify()
    }

    /// Checks the end state (invariants 1 and 2).
    pub fn verify(&mut self) -> Outcome {
        if let Some(e) = self.client.failure() {
            // A drain that could not move the session in time ends it, and
            // says so.
            let shut_down = self.drains > 0
                && matches!(
                    e,
                    migratory_proto::error::SessionError::Rejected {
                        reason: migratory_proto::frame::RejectReason::Shutdown,
                        ..
                    }
                );
            assert!(
                self.loss_allowed || shut_down,
                "invariant 2: session lost without a fault that can lose it: {e}"
            );
            return Outcome::FailedClosed {
                error: e.to_string(),
                drains: self.drains,
            };
        }
        if !self.done() {
            let apps: Vec<String> = self
                .servers
                .iter()
                .enumerate()
                .filter_map(|(i, n)| {
                    n.as_ref()
                        .map(|n| format!("s{}: {:?} apps {:?}", i + 1, n.core, n.apps))
                })
                .collect();
            self.log(format!(
                "HANG: client finished {} eof {} received {} written {}/{} closed {}\n{:?}\n{}",
                self.client.is_finished(),
                self.client_eof,
                self.received.len(),
                self.up_written,
                self.up_data.len(),
                self.closed_write,
                self.client.debug_positions(),
                apps.join("\n")
            ));
            panic!(
                "invariant 2: run did not finish in {} steps (hang?)",
                self.cfg.max_steps
            );
        }
        let expected = apps::expected_download(
            &self.cfg.app,
            self.cfg.seed,
            &self.up_data,
            self.cfg.down_len,
        );
        assert_eq!(
            self.received.len(),
            expected.len(),
            "invariant 1: download length"
        );
        assert!(self.received == expected, "invariant 1: download bytes");
        // The server application's record of what it read, unless the
        // server crashed after the client was done.
        // Zombie copies (a stale owner's, dropped later) may be recorded too:
        // the session's own lineage is the one that read the most.
        match self.finished.iter().max_by_key(|f| f.app.read_len()) {
            Some(f) => f.app.clone().verify_upload(&self.up_data),
            None => assert!(
                self.crashes > 0,
                "invariant 1: no server application finished"
            ),
        }
        Outcome::Completed {
            migrations: self.migrations_seen,
            catch_ups: self.catch_ups,
            gaps_filled: self.gaps_filled,
            gaps_held: self.gaps_held,
            cut_offs: self.cut_offs,
            drains: self.drains,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Both streams arrived whole and exactly once.
    Completed {
        migrations: u32,
        drains: u32,
        catch_ups: u32,
        gaps_filled: u32,
        gaps_held: u32,
        cut_offs: u32,
    },
    /// The session was lost cleanly (allowed only after a fault that can
    /// lose it).
    FailedClosed { error: String, drains: u32 },
}
