//! Cost of the protocol core per 16 KiB data frame and per 1 KiB snapshot.
//!
//! `data_frame_16k/full` moves one 16 KiB frame through the whole core:
//! client write, client transmit (encode), server input (decode, window and
//! position checks), server read, server ack (encode), client ack input
//! (decode, trim). Four payload copies are unavoidable on that path (app ->
//! client buffer, segments -> the "socket" buffer, socket -> server frame
//! buffer, server buffer -> app); `memcpy_baseline` does exactly those four
//! copies and nothing else, so protocol work = full - baseline. Results and
//! the method are in BENCHMARKS.md at the repository root.
#![allow(clippy::disallowed_methods, missing_docs)]

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use migratory_proto::client::{Client, ClientConfig};
use migratory_proto::config::Limits;
use migratory_proto::server::{Server, ServerConfig, ServerEvent, SessionHandle};
use migratory_proto::types::ServerId;
use rand::rngs::SmallRng;
use rand::SeedableRng;

const FRAME: usize = 16 * 1024;

struct Pair {
    now: Instant,
    client: Client,
    server: Server,
    handle: SessionHandle,
    inc: migratory_proto::types::IncarnationId,
    wire: Vec<u8>,
    segs: Vec<Bytes>,
}

impl Pair {
    fn new() -> Self {
        let now = Instant::now();
        let limits = Limits {
            max_data_frame: FRAME,
            recv_window: 64 * 1024 * 1024,
            send_buffer: 64 * 1024 * 1024,
            ..Limits::default()
        };
        let mut sc = ServerConfig::new(ServerId::new("s1").unwrap());
        sc.limits = limits.clone();
        let mut server = Server::new(sc, Box::new(SmallRng::seed_from_u64(1)), now);
        let mut client = Client::new(
            ClientConfig {
                limits,
                ..ClientConfig::default()
            },
            now,
        );
        let cinc = client.start(now);
        let sinc = server.new_incarnation(now, None);
        let mut p = Pair {
            now,
            client,
            server,
            handle: SessionHandle(0),
            inc: cinc,
            wire: Vec::with_capacity(4 * FRAME),
            segs: Vec::new(),
        };
        for _ in 0..4 {
            p.client_to_server(sinc);
            p.server_to_client();
        }
        while let Some(ev) = p.server.poll_event() {
            if let ServerEvent::Accepted { handle, .. } = ev {
                p.handle = handle;
            }
        }
        while p.client.poll_event().is_some() {}
        assert!(p.client.is_established());
        p.inc = sinc;
        p
    }

    fn client_to_server(&mut self, sinc: migratory_proto::types::IncarnationId) {
        while self
            .client
            .poll_transmit(self.now, &mut self.segs)
            .is_some()
        {
            for s in self.segs.drain(..) {
                self.wire.extend_from_slice(&s);
            }
        }
        self.server.handle_input(self.now, sinc, &self.wire);
        self.wire.clear();
    }

    fn server_to_client(&mut self) {
        let mut cinc = None;
        while let Some(dest) = self.server.poll_transmit(self.now, &mut self.segs) {
            if let migratory_proto::server::Dest::Incarnation(_) = dest {
                cinc = Some(());
                for s in self.segs.drain(..) {
                    self.wire.extend_from_slice(&s);
                }
            }
            self.segs.clear();
        }
        if cinc.is_some() {
            self.client.handle_input(
                self.now,
                migratory_proto::types::IncarnationId(1),
                &self.wire,
            );
        }
        self.wire.clear();
    }

    /// One 16 KiB frame up, read by the application, acknowledged.
    fn round(&mut self, payload: &[u8], buf: &mut [u8]) {
        assert_eq!(self.client.write(payload).unwrap(), FRAME);
        let inc = self.inc;
        self.client_to_server(inc);
        let mut got = 0;
        while got < FRAME {
            got += self
                .server
                .read(self.handle, &mut buf[got..])
                .unwrap()
                .unwrap();
        }
        // The application's restart point: the read log is dropped, which
        // keeps the up window open.
        self.server.snapshot(self.handle, b"").unwrap();
        self.server_to_client();
        while self.server.poll_event().is_some() {}
        while self.client.poll_event().is_some() {}
    }
}

fn data_frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("data_frame_16k");
    g.throughput(Throughput::Bytes(FRAME as u64));
    let payload = vec![0xa5u8; FRAME];
    let mut buf = vec![0u8; FRAME];
    g.bench_function("full", |b| {
        let mut pair = Pair::new();
        b.iter(|| pair.round(black_box(&payload), &mut buf));
    });
    g.bench_function("memcpy_baseline", |b| {
        let mut a = vec![0u8; FRAME];
        let mut w = vec![0u8; FRAME];
        let mut r = vec![0u8; FRAME];
        b.iter(|| {
            a.copy_from_slice(black_box(&payload));
            w.copy_from_slice(black_box(&a));
            r.copy_from_slice(black_box(&w));
            buf.copy_from_slice(black_box(&r));
            black_box(&buf);
        });
    });
    g.finish();
}

fn snapshot(c: &mut Criterion) {
    let mut pair = Pair::new();
    let state = vec![7u8; 1024];
    c.bench_function("snapshot_1k", |b| {
        b.iter(|| {
            pair.server
                .snapshot(pair.handle, black_box(&state))
                .unwrap()
        });
    });
}

criterion_group!(benches, data_frame, snapshot);
criterion_main!(benches);
