//! Deterministic server applications for the simulation. Each one's output
//! is a function of its snapshot state and the bytes it reads (MTCP's
//! contract, thesis 3.3.2), and its state records a checksum of everything
//! it read, so the final state proves the up stream was read exactly once.

use migratory_proto::error::AppError;
use migratory_proto::server::{Server, SessionHandle};

/// Which application the servers run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppKind {
    /// Thesis fig 6.1: the client asks for a file, the server streams it
    /// from an offset kept in its state; the client also uploads bytes the
    /// server checksums.
    File,
    /// Request/response: every byte read is transformed and written back;
    /// at the end of input a trailer with the count follows.
    Transform,
}

const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Bytes `[off, off + len)` of the generated file `seed`.
pub fn file_bytes(seed: u64, off: u64, len: usize) -> Vec<u8> {
    (off..off + len as u64)
        .map(|i| (splitmix(seed ^ (i / 8).wrapping_mul(0x1000_0000_01b3)) >> ((i % 8) * 8)) as u8)
        .collect()
}

fn transform(b: u8, pos: u64) -> u8 {
    b.rotate_left(3) ^ (pos as u8)
}

/// What the client uploads.
pub fn client_upload(kind: &AppKind, seed: u64, up_len: usize, down_len: usize) -> Vec<u8> {
    let body = file_bytes(seed.wrapping_add(7), 0, up_len);
    match kind {
        AppKind::File => {
            let mut v = format!("GET {seed} {down_len}\n").into_bytes();
            v.extend(body);
            v
        }
        AppKind::Transform => body,
    }
}

/// What the client must read, exactly.
pub fn expected_download(kind: &AppKind, seed: u64, up: &[u8], down_len: usize) -> Vec<u8> {
    match kind {
        AppKind::File => file_bytes(seed, 0, down_len),
        AppKind::Transform => {
            let mut v: Vec<u8> = up
                .iter()
                .enumerate()
                .map(|(i, b)| transform(*b, i as u64))
                .collect();
            v.extend(format!("END:{}\n", up.len()).into_bytes());
            v
        }
    }
}

/// One application instance on one server, for one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerApp {
    kind: AppKind,
    /// File: the request line so far. Transform: unused.
    line: Vec<u8>,
    /// File: (seed, size) once the request is parsed.
    file: Option<(u64, u64)>,
    /// File: offset reached (fig 6.1's `state.off`).
    off: u64,
    /// Bytes of payload read, and their checksum.
    read: u64,
    hash: u64,
    /// Transform: output computed but not yet written.
    pending: Vec<u8>,
    eof: bool,
    closed: bool,
}

fn put(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

fn take(s: &mut &[u8]) -> Option<u64> {
    let (a, b) = s.split_at_checked(8)?;
    *s = b;
    Some(u64::from_le_bytes(a.try_into().ok()?))
}

impl ServerApp {
    pub fn new(kind: &AppKind) -> Self {
        Self {
            kind: kind.clone(),
            line: Vec::new(),
            file: None,
            off: 0,
            read: 0,
            hash: FNV0,
            pending: Vec::new(),
            eof: false,
            closed: false,
        }
    }

    /// The snapshot state (MTCP's exported state).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        put(&mut v, self.line.len() as u64);
        v.extend_from_slice(&self.line);
        let (seed, size, has) = self.file.map_or((0, 0, 0), |(a, b)| (a, b, 1));
        for x in [
            has,
            seed,
            size,
            self.off,
            self.read,
            self.hash,
            self.pending.len() as u64,
        ] {
            put(&mut v, x);
        }
        v.extend_from_slice(&self.pending);
        v.push(u8::from(self.eof) | u8::from(self.closed) << 1);
        v
    }

    /// MTCP's `get_state == MIGRATED`: resume from the snapshot.
    pub fn restore(kind: &AppKind, state: &[u8]) -> Option<Self> {
        if state.is_empty() {
            return Some(Self::new(kind));
        }
        let mut s = state;
        let n = take(&mut s)? as usize;
        let (line, rest) = s.split_at_checked(n)?;
        s = rest;
        let has = take(&mut s)?;
        let seed = take(&mut s)?;
        let size = take(&mut s)?;
        let off = take(&mut s)?;
        let read = take(&mut s)?;
        let hash = take(&mut s)?;
        let p = take(&mut s)? as usize;
        let (pending, rest) = s.split_at_checked(p)?;
        let flags = *rest.first()?;
        Some(Self {
            kind: kind.clone(),
            line: line.to_vec(),
            file: (has == 1).then_some((seed, size)),
            off,
            read,
            hash,
            pending: pending.to_vec(),
            eof: flags & 1 != 0,
            closed: flags & 2 != 0,
        })
    }

    /// One round of work: read up to `chunk` bytes, write what it can,
    /// close when done, and snapshot if `snap`.
    pub fn step(
        &mut self,
        core: &mut Server,
        h: SessionHandle,
        chunk: usize,
        snap: bool,
    ) -> Result<(), AppError> {
        match self.kind {
            AppKind::File => self.step_file(core, h, chunk)?,
            AppKind::Transform => self.step_transform(core, h, chunk)?,
        }
        if snap {
            core.snapshot(h, &self.encode())?;
        }
        Ok(())
    }

    fn absorb(&mut self, bytes: &[u8]) {
        self.read += bytes.len() as u64;
        self.hash = fnv(self.hash, bytes);
    }

    fn read_some(
        &mut self,
        core: &mut Server,
        h: SessionHandle,
        chunk: usize,
    ) -> Result<Option<Vec<u8>>, AppError> {
        let mut buf = vec![0; chunk];
        match core.read(h, &mut buf)? {
            Some(0) => {
                self.eof = true;
                Ok(None)
            }
            Some(n) => {
                buf.truncate(n);
                Ok(Some(buf))
            }
            None => Ok(None),
        }
    }

    fn step_file(
        &mut self,
        core: &mut Server,
        h: SessionHandle,
        chunk: usize,
    ) -> Result<(), AppError> {
        if !self.eof {
            if let Some(bytes) = self.read_some(core, h, chunk)? {
                let mut rest = &bytes[..];
                while self.file.is_none() && !rest.is_empty() {
                    let b = rest[0];
                    rest = &rest[1..];
                    if b == b'\n' {
                        let line = String::from_utf8(std::mem::take(&mut self.line))
                            .expect("request is text");
                        let mut parts = line.split(' ');
                        assert_eq!(parts.next(), Some("GET"));
                        let seed = parts.next().and_then(|x| x.parse().ok()).expect("seed");
                        let size = parts.next().and_then(|x| x.parse().ok()).expect("size");
                        self.file = Some((seed, size));
                    } else {
                        self.line.push(b);
                    }
                }
                self.absorb(rest);
            }
        }
        if let Some((seed, size)) = self.file {
            if self.off < size {
                let n = (size - self.off).min(chunk as u64) as usize;
                let data = file_bytes(seed, self.off, n);
                self.off += core.write(h, &data)? as u64;
            }
            if self.off == size && !self.closed {
                core.close_write(h)?;
                self.closed = true;
            }
        }
        Ok(())
    }

    fn step_transform(
        &mut self,
        core: &mut Server,
        h: SessionHandle,
        chunk: usize,
    ) -> Result<(), AppError> {
        if !self.eof && self.pending.len() < 16 * 1024 {
            if let Some(bytes) = self.read_some(core, h, chunk)? {
                for b in &bytes {
                    self.pending.push(transform(*b, self.read));
                    self.absorb(std::slice::from_ref(b));
                }
            }
            if self.eof {
                self.pending
                    .extend(format!("END:{}\n", self.read).into_bytes());
            }
        }
        if !self.pending.is_empty() {
            let n = core.write(h, &self.pending)?;
            self.pending.drain(..n);
        }
        if self.eof && self.pending.is_empty() && !self.closed {
            core.close_write(h)?;
            self.closed = true;
        }
        Ok(())
    }

    /// Payload bytes read so far.
    pub fn read_len(&self) -> u64 {
        self.read
    }

    /// The application read exactly the client's upload, once, in order.
    pub fn verify_upload(&self, up: &[u8]) {
        let payload = match self.kind {
            AppKind::File => {
                let nl = up.iter().position(|b| *b == b'\n').expect("request line");
                &up[nl + 1..]
            }
            AppKind::Transform => up,
        };
        assert_eq!(
            self.read,
            payload.len() as u64,
            "invariant 1: upload length at the server"
        );
        assert_eq!(
            self.hash,
            fnv(FNV0, payload),
            "invariant 1: upload checksum at the server"
        );
    }
}
