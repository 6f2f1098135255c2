//! A static HTTP/1.1 file server over a root directory: GET and HEAD,
//! Content-Length, keep-alive and pipelining, single byte ranges.
//!
//! Per-session state ([`State`]): the phase (waiting for a request, sending
//! a file body, closing), the body being sent (path relative to the root,
//! file length, range, offset reached), whether the connection closes after
//! the response, and the bytes read from the session but not yet consumed
//! (the start of the next pipelined request). The service snapshots after
//! writing a response head, after each body chunk, and after finishing a
//! response. Responses depend only on the request and the file (no dates),
//! so a server that resumes from an earlier snapshot writes the same bytes:
//! the response head is written here, by hand, field by field.
//!
//! Once the server drains, a plain TCP client gets the response in
//! progress (with `Connection: close` if its head is not written yet) and
//! then the connection closes; a kept-alive connection waiting for its
//! next request closes at once. A request whose head had begun to arrive
//! is still answered.

use std::io::{self, SeekFrom};
use std::path::Path;
use std::time::Duration;

use http::StatusCode;
use http_range_header::{EndPosition, RangeUnsatisfiableError, StartPosition};
use migratory::{Arrival, Session};
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tracing::{debug, warn};

use super::{invalid, snapshot, Drain, Options};

/// Largest request head accepted (a larger one gets 431).
const MAX_HEAD: usize = 16 * 1024;
/// Most header fields in a request (more gets 431).
const MAX_HEADERS: usize = 64;
/// Body chunk: read from the file into a buffer of its own (no larger
/// than what is left of the body), handed to the session without a copy
/// (`Session::write_bytes`: it keeps the buffer until the client has the
/// bytes), then snapshotted. Each file read is a hand-off to tokio's
/// blocking threads and back (two context switches): 64 KiB chunks made a
/// plain download cost `serve` a third more CPU than these
/// (BENCHMARKS.md).
const CHUNK: usize = 256 * 1024;
/// How long a closing connection waits for the client's end.
const LINGER: Duration = Duration::from_secs(30);

const TAG: u8 = b'H';
const VERSION: u8 = 1;

/// Where a session is in the request/response cycle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Phase {
    /// Reading and parsing the next request.
    #[default]
    Idle,
    /// Sending a file body.
    Body(Body),
    /// The response is complete and the connection closes: the down
    /// stream is shut, the rest of the input is discarded until EOF.
    Closing,
}

/// The file body being sent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Body {
    /// Path relative to the root, `/`-separated, checked by [`components`].
    path: String,
    /// The file's length when the response head was written.
    file_len: u64,
    /// First byte of the range.
    start: u64,
    /// End of the range (exclusive).
    end: u64,
    /// Next byte to send.
    offset: u64,
}

/// The service's per-session state (its snapshot).
///
/// Encoding, all integers big-endian: `b'H'`, version `1`, phase (0 idle,
/// 1 body, 2 closing), flags (bit 0: close after the response); for the
/// body phase: path length (u16) and path (UTF-8), file length, start,
/// end, offset (u64 each); then the leftover length (u32, at most 16 KiB)
/// and the leftover bytes. Nothing may follow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct State {
    phase: Phase,
    /// Whether the connection closes after the current response.
    close: bool,
    /// Bytes read from the session and not yet consumed.
    leftover: Vec<u8>,
}

impl State {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64 + self.leftover.len());
        v.push(TAG);
        v.push(VERSION);
        v.push(match self.phase {
            Phase::Idle => 0,
            Phase::Body(_) => 1,
            Phase::Closing => 2,
        });
        v.push(u8::from(self.close));
        if let Phase::Body(b) = &self.phase {
            // Paths come from request heads (at most 16 KiB).
            let len = u16::try_from(b.path.len()).unwrap_or(u16::MAX);
            v.extend_from_slice(&len.to_be_bytes());
            v.extend_from_slice(&b.path.as_bytes()[..usize::from(len)]);
            for x in [b.file_len, b.start, b.end, b.offset] {
                v.extend_from_slice(&x.to_be_bytes());
            }
        }
        v.extend_from_slice(&(self.leftover.len() as u32).to_be_bytes());
        v.extend_from_slice(&self.leftover);
        v
    }

    fn decode(b: &[u8]) -> io::Result<Self> {
        let mut r = Reader(b);
        let (tag, version) = (r.u8()?, r.u8()?);
        if tag != TAG || version != VERSION {
            return Err(invalid(format!(
                "http state: unknown tag/version {tag:#04x}/{version}"
            )));
        }
        let phase = r.u8()?;
        let flags = r.u8()?;
        if flags > 1 {
            return Err(invalid(format!("http state: unknown flags {flags:#04x}")));
        }
        let phase = match phase {
            0 => Phase::Idle,
            1 => {
                let len = usize::from(r.u16()?);
                let path = std::str::from_utf8(r.take(len)?)
                    .map_err(|_| invalid("http state: path is not UTF-8"))?
                    .to_string();
                if !components(&path).is_ok_and(|c| c.join("/") == path) {
                    return Err(invalid(format!("http state: bad path {path:?}")));
                }
                let body = Body {
                    path,
                    file_len: r.u64()?,
                    start: r.u64()?,
                    end: r.u64()?,
                    offset: r.u64()?,
                };
                if !(body.start <= body.offset
                    && body.offset <= body.end
                    && body.end <= body.file_len)
                {
                    return Err(invalid(format!("http state: inconsistent range {body:?}")));
                }
                Phase::Body(body)
            }
            2 => Phase::Closing,
            p => return Err(invalid(format!("http state: unknown phase {p}"))),
        };
        let len = r.u32()? as usize;
        if len > MAX_HEAD {
            return Err(invalid(format!(
                "http state: {len} leftover bytes, more than {MAX_HEAD}"
            )));
        }
        let leftover = r.take(len)?.to_vec();
        if !r.0.is_empty() {
            return Err(invalid(format!(
                "http state: {} bytes after the end",
                r.0.len()
            )));
        }
        Ok(Self {
            phase,
            close: flags & 1 != 0,
            leftover,
        })
    }
}

/// Reads a state encoding; every shortfall is an `InvalidData` error.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        let (a, rest) = self
            .0
            .split_at_checked(n)
            .ok_or_else(|| invalid("http state: truncated"))?;
        self.0 = rest;
        Ok(a)
    }

    fn array<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> io::Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

/// Serves one HTTP session until the client closes, the connection must
/// close (or the server drains, for a plain client), or the session moves
/// away.
pub(super) async fn serve(
    s: &mut Session,
    arrival: Arrival,
    opts: &Options,
    mut drain: Drain,
) -> io::Result<()> {
    let mut st = match arrival {
        Arrival::Migrated { state } if !state.is_empty() => State::decode(&state)?,
        _ => State::default(),
    };
    // The open file of the body being sent (opened again after a resume).
    let mut file: Option<File> = None;
    // A new connection gets the header timeout for its first request; a
    // kept-alive one the idle timeout between requests.
    let mut first = true;
    loop {
        match &st.phase {
            Phase::Idle => {
                let wait = if first {
                    opts.header_timeout
                } else {
                    opts.idle_timeout
                };
                first = false;
                let next = read_request(s, &mut st.leftover, wait, opts.header_timeout, &mut drain)
                    .await?;
                let (req, used) = match next {
                    Next::Eof => {
                        s.shutdown().await?;
                        return snapshot(s, &st.encode());
                    }
                    Next::Idle => {
                        debug!("idle connection closed");
                        st.phase = Phase::Closing;
                        continue;
                    }
                    Next::Drain => {
                        debug!("idle connection closed: the server drains");
                        st.phase = Phase::Closing;
                        continue;
                    }
                    Next::Bad(status) => (Err(status), 0),
                    Next::Request(req, used) => (Ok(req), used),
                };
                let resp = match req {
                    Ok(mut req) => {
                        // Its head is not written yet: it says the close.
                        req.close |= drain.now();
                        respond(&req, &opts.root).await
                    }
                    Err(status) => Response::error(status, true, false, false),
                };
                debug!(
                    status = resp.status.as_u16(),
                    close = resp.close,
                    "response"
                );
                st.leftover.drain(..used);
                st.close = resp.close;
                s.write_all(&resp.head).await?;
                match resp.body {
                    Some((body, f)) => {
                        st.phase = Phase::Body(body);
                        file = Some(f);
                        snapshot(s, &st.encode())?;
                    }
                    None => finish(s, &mut st, &drain)?,
                }
            }
            Phase::Body(body) => {
                let body = body.clone();
                let f = match file.take() {
                    Some(f) => f,
                    None => reopen(&opts.root, &body).await?,
                };
                let f = std::sync::Arc::new(f.into_std().await);
                let mut chunks = Chunks::default();
                let mut offset = body.offset;
                while offset < body.end {
                    let want = usize::try_from(body.end - offset).map_or(CHUNK, |n| n.min(CHUNK));
                    let data = read_at(&f, offset, chunks.take(want)).await?;
                    chunks.keep(&data);
                    let n = data.len();
                    if n == 0 {
                        warn!(path = %body.path, offset, "file shrank while being sent");
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "http: {} ended at byte {offset} while being sent (length was {})",
                                body.path, body.file_len
                            ),
                        ));
                    }
                    // The session keeps the chunk itself: no copy.
                    s.write_bytes(data).await?;
                    offset += n as u64;
                    if let Phase::Body(b) = &mut st.phase {
                        b.offset = offset;
                    }
                    snapshot(s, &st.encode())?;
                }
                finish(s, &mut st, &drain)?;
            }
            Phase::Closing => {
                st.leftover.clear();
                s.shutdown().await?;
                snapshot(s, &st.encode())?;
                return linger(s, &st).await;
            }
        }
    }
}

/// After a complete response: the next request, or closing (also when the
/// server drains).
fn finish(s: &Session, st: &mut State, drain: &Drain) -> io::Result<()> {
    if st.close || drain.now() {
        // The Closing arm shuts the down stream and snapshots after that.
        st.phase = Phase::Closing;
        Ok(())
    } else {
        st.phase = Phase::Idle;
        snapshot(s, &st.encode())
    }
}

/// Reads and discards the input until the client's end (so a plain TCP
/// close does not reset the response), for at most [`LINGER`].
async fn linger(s: &mut Session, st: &State) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    let run = async {
        loop {
            if s.read(&mut buf).await? == 0 {
                return Ok(());
            }
            snapshot(s, &st.encode())?;
        }
    };
    match tokio::time::timeout(LINGER, run).await {
        Ok(r) => r,
        Err(_) => {
            debug!("client did not close within the linger time");
            Ok(())
        }
    }
}

/// Opens a resumed body's file again under this server's root; it must be
/// the same length as when the response started.
/// Most chunk buffers a body keeps for reuse: a little more than a
/// default send buffer's worth (4 MiB), so a download holds at most 5 MiB
/// of chunks, those the session still holds included, and none once its
/// body is sent.
const KEPT_CHUNKS: usize = 20;

/// The buffers of a body's chunks, taken back for the next chunks once the
/// session has let go of them (the client acknowledged their bytes): a
/// download reuses a few buffers instead of allocating, zeroing and
/// faulting in a new one for every chunk.
#[derive(Default)]
struct Chunks {
    /// Oldest first: the first the client acknowledges.
    sent: std::collections::VecDeque<bytes::Bytes>,
}

impl Chunks {
    /// A buffer of `len` bytes to read into.
    fn take(&mut self, len: usize) -> bytes::BytesMut {
        if let Some(b) = self.sent.pop_front() {
            match b.try_into_mut() {
                Ok(mut buf) => {
                    // Only bytes beyond the old length are zeroed.
                    buf.resize(len, 0);
                    return buf;
                }
                Err(b) => self.sent.push_front(b),
            }
        }
        bytes::BytesMut::zeroed(len)
    }

    /// Remembers a chunk handed to the session.
    fn keep(&mut self, chunk: &bytes::Bytes) {
        if self.sent.len() == KEPT_CHUNKS {
            self.sent.pop_front();
        }
        self.sent.push_back(chunk.clone());
    }
}

/// Reads `f` from `offset` into `buf` (fewer bytes at its end) on a
/// blocking thread; the session then keeps the buffer until the client
/// has its bytes.
async fn read_at(
    f: &std::sync::Arc<std::fs::File>,
    offset: u64,
    mut buf: bytes::BytesMut,
) -> io::Result<bytes::Bytes> {
    let f = f.clone();
    tokio::task::spawn_blocking(move || {
        let n = std::os::unix::fs::FileExt::read_at(&*f, &mut buf, offset)?;
        buf.truncate(n);
        Ok(buf.freeze())
    })
    .await
    .map_err(io::Error::other)?
}

async fn reopen(root: &Path, body: &Body) -> io::Result<File> {
    match open_under(root, &body.path).await {
        Lookup::Found(mut f, len) if len == body.file_len => {
            f.seek(SeekFrom::Start(body.offset)).await?;
            Ok(f)
        }
        Lookup::Found(_, len) => {
            warn!(path = %body.path, expected = body.file_len, found = len,
                "resumed session: the file's length changed");
            Err(io::Error::other(format!(
                "http: cannot resume {}: its length is {len} here, {} when the response started",
                body.path, body.file_len
            )))
        }
        other => {
            let found = other.describe();
            warn!(path = %body.path, %found, "resumed session: the file is not here");
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("http: cannot resume {}: {found}", body.path),
            ))
        }
    }
}

/// What the parser found at the start of the unconsumed input.
enum Next {
    /// The client closed between requests.
    Eof,
    /// The client sent nothing within the wait.
    Idle,
    /// The server drains and no request had begun.
    Drain,
    /// A malformed or oversized request head: answer with this status and
    /// close.
    Bad(StatusCode),
    /// A request and the length of its head.
    Request(Request, usize),
}

/// The parts of a request the responses depend on.
#[derive(Debug)]
struct Request {
    method: String,
    target: String,
    /// Minor version: 0 or 1.
    version: u8,
    /// Whether the connection closes after this response.
    close: bool,
    /// The `Range` field, if exactly one and no `If-Range`.
    range: Option<String>,
}

/// Reads until `buf` holds a complete request head (or an error or EOF).
/// `buf` never grows beyond [`MAX_HEAD`]. Nothing within `wait`: `Idle`;
/// a head begun but not complete within `header` of its first byte: 408.
/// While no head has begun, the server's drain ends the wait (`Drain`);
/// input already there still counts as a begun head.
async fn read_request(
    s: &mut Session,
    buf: &mut Vec<u8>,
    wait: Duration,
    header: Duration,
    drain: &mut Drain,
) -> io::Result<Next> {
    let mut tmp = vec![0u8; MAX_HEAD];
    let mut deadline = tokio::time::Instant::now() + if buf.is_empty() { wait } else { header };
    loop {
        if !buf.is_empty() {
            match parse(buf) {
                Parsed::Complete(req, used) => return Ok(Next::Request(req, used)),
                Parsed::Bad(status) => return Ok(Next::Bad(status)),
                Parsed::Partial if buf.len() >= MAX_HEAD => {
                    return Ok(Next::Bad(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE))
                }
                Parsed::Partial => {}
            }
        }
        let room = MAX_HEAD.saturating_sub(buf.len()).max(1);
        let read = tokio::time::timeout_at(deadline, s.read(&mut tmp[..room]));
        let n = if buf.is_empty() {
            tokio::select! {
                biased;
                r = read => r,
                () = drain.wait() => return Ok(Next::Drain),
            }
        } else {
            read.await
        };
        let n = match n {
            Ok(r) => r?,
            Err(_) if buf.is_empty() => return Ok(Next::Idle),
            Err(_) => return Ok(Next::Bad(StatusCode::REQUEST_TIMEOUT)),
        };
        if n == 0 {
            return Ok(Next::Eof);
        }
        if buf.is_empty() {
            // The head began: it has the header timeout to complete.
            deadline = tokio::time::Instant::now() + header;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

enum Parsed {
    Complete(Request, usize),
    Partial,
    Bad(StatusCode),
}

/// Whether a comma-separated field value holds `token` (case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Bad(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        }
        Err(httparse::Error::Version) => {
            return Parsed::Bad(StatusCode::HTTP_VERSION_NOT_SUPPORTED)
        }
        Err(_) => return Parsed::Bad(StatusCode::BAD_REQUEST),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Bad(StatusCode::BAD_REQUEST);
    };
    let mut keep_alive = version >= 1;
    let mut has_body = false;
    let mut content_length: Option<&[u8]> = None;
    let mut ranges = Vec::new();
    let mut if_range = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("connection") {
            if has_token(h.value, "close") {
                keep_alive = false;
            } else if has_token(h.value, "keep-alive") {
                keep_alive = keep_alive || version == 0;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let v = h.value.trim_ascii();
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                return Parsed::Bad(StatusCode::BAD_REQUEST);
            }
            if content_length.is_some_and(|c| c != v) {
                return Parsed::Bad(StatusCode::BAD_REQUEST);
            }
            content_length = Some(v);
            has_body |= v.iter().any(|d| *d != b'0');
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            has_body = true;
        } else if name.eq_ignore_ascii_case("range") {
            ranges.push(h.value);
        } else if name.eq_ignore_ascii_case("if-range") {
            if_range = true;
        }
    }
    // A request body is not read: the connection closes after the response.
    let close = !keep_alive || has_body;
    let range = match (ranges.as_slice(), if_range) {
        // Without validators an If-Range never matches: send it all.
        ([one], false) => std::str::from_utf8(one).ok().map(str::to_string),
        _ => None,
    };
    Parsed::Complete(
        Request {
            method: method.to_string(),
            target: target.to_string(),
            version,
            close,
            range,
        },
        used,
    )
}

/// A response: its head (with the whole body for small ones), and the
/// file range to send after it.
struct Response {
    status: StatusCode,
    head: Vec<u8>,
    body: Option<(Body, File)>,
    close: bool,
}

/// The status code and reason phrase, e.g. `404 Not Found`.
fn status_line(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Unknown")
    )
}

/// The head of a response, ending with the empty line.
fn head(
    status: StatusCode,
    fields: &[(&str, String)],
    close: bool,
    keep_alive_10: bool,
) -> Vec<u8> {
    let mut h = format!("HTTP/1.1 {}\r\nServer: migratory\r\n", status_line(status));
    for (name, value) in fields {
        h.push_str(name);
        h.push_str(": ");
        h.push_str(value);
        h.push_str("\r\n");
    }
    if close {
        h.push_str("Connection: close\r\n");
    } else if keep_alive_10 {
        h.push_str("Connection: keep-alive\r\n");
    }
    h.push_str("\r\n");
    h.into_bytes()
}

impl Response {
    /// A short text response.
    fn error(status: StatusCode, close: bool, keep_alive_10: bool, head_only: bool) -> Self {
        Self::text(status, Vec::new(), close, keep_alive_10, head_only)
    }

    fn text(
        status: StatusCode,
        mut fields: Vec<(&str, String)>,
        close: bool,
        keep_alive_10: bool,
        head_only: bool,
    ) -> Self {
        let body = format!("{}\n", status_line(status));
        fields.insert(0, ("Content-Type", "text/plain; charset=utf-8".into()));
        fields.insert(1, ("Content-Length", body.len().to_string()));
        let mut h = head(status, &fields, close, keep_alive_10);
        if !head_only {
            h.extend_from_slice(body.as_bytes());
        }
        Self {
            status,
            head: h,
            body: None,
            close,
        }
    }
}

/// Builds the response to a well-formed request.
async fn respond(req: &Request, root: &Path) -> Response {
    let close = req.close;
    let ka10 = req.version == 0 && !close;
    let head_only = req.method == "HEAD";
    if req.method != "GET" && !head_only {
        return Response::text(
            StatusCode::METHOD_NOT_ALLOWED,
            vec![("Allow", "GET, HEAD".into())],
            close,
            ka10,
            false,
        );
    }
    let err = |status| Response::error(status, close, ka10, head_only);
    let rel = match request_path(&req.target) {
        Ok(rel) => rel,
        Err(status) => return err(status),
    };
    let (mut f, len) = match open_under(root, &rel).await {
        Lookup::Found(f, len) => (f, len),
        Lookup::NotFound => return err(StatusCode::NOT_FOUND),
        Lookup::Forbidden => return err(StatusCode::FORBIDDEN),
        Lookup::Failed(e) => {
            warn!(path = %rel, error = %e, "cannot serve a file");
            return err(StatusCode::INTERNAL_SERVER_ERROR);
        }
    };
    let (status, start, end) = match req.range.as_deref().filter(|_| !head_only) {
        None => (StatusCode::OK, 0, len),
        Some(r) => match parse_range(r, len) {
            RangeSpec::Whole => (StatusCode::OK, 0, len),
            RangeSpec::Part(a, b) => (StatusCode::PARTIAL_CONTENT, a, b),
            RangeSpec::Unsatisfiable => {
                return Response::text(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    vec![("Content-Range", format!("bytes */{len}"))],
                    close,
                    ka10,
                    false,
                );
            }
        },
    };
    if let Err(e) = f.seek(SeekFrom::Start(start)).await {
        warn!(path = %rel, error = %e, "cannot seek in a file");
        return err(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let mut fields = vec![
        ("Content-Type", content_type(&rel)),
        ("Content-Length", (end - start).to_string()),
        ("Accept-Ranges", "bytes".to_string()),
    ];
    if status == StatusCode::PARTIAL_CONTENT {
        fields.push(("Content-Range", format!("bytes {start}-{}/{len}", end - 1)));
    }
    let h = head(status, &fields, close, ka10);
    let body = if head_only || start == end {
        None
    } else {
        let body = Body {
            path: rel,
            file_len: len,
            start,
            end,
            offset: start,
        };
        Some((body, f))
    };
    Response {
        status,
        head: h,
        body,
        close,
    }
}

/// The path of a request target, relative to the root: origin form (or
/// absolute form), query and fragment dropped, percent-decoded, `.` and
/// empty segments dropped. `..` is refused (403); bad encodings are 400.
fn request_path(target: &str) -> Result<String, StatusCode> {
    let mut t = target;
    for scheme in ["http://", "https://"] {
        let prefixed = t
            .as_bytes()
            .get(..scheme.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(scheme.as_bytes()));
        if prefixed {
            // An ASCII prefix: the rest starts on a character boundary.
            let rest = &t[scheme.len()..];
            t = rest.find('/').map_or("/", |i| &rest[i..]);
        }
    }
    if !t.starts_with('/') {
        return Err(StatusCode::BAD_REQUEST);
    }
    let t = t.split(['?', '#']).next().unwrap_or("");
    let decoded = percent_decode(t.as_bytes()).ok_or(StatusCode::BAD_REQUEST)?;
    let decoded = String::from_utf8(decoded).map_err(|_| StatusCode::BAD_REQUEST)?;
    match components(&decoded) {
        Ok(c) => Ok(c.join("/")),
        Err(PathError::Traversal) => Err(StatusCode::FORBIDDEN),
        Err(PathError::Bad) => Err(StatusCode::BAD_REQUEST),
    }
}

enum PathError {
    /// A `..` segment.
    Traversal,
    /// A NUL byte.
    Bad,
}

/// The segments of a `/`-separated path, without empty and `.` ones.
fn components(path: &str) -> Result<Vec<&str>, PathError> {
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(PathError::Traversal),
            c if c.contains('\0') => return Err(PathError::Bad),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Percent-decodes `s`; `None` if a `%` is not followed by two hex digits
/// (`percent_encoding` would keep such a `%` as it is).
fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let well_formed = s.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || s.get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    well_formed.then(|| percent_encoding::percent_decode(s).collect())
}

/// The result of looking a path up under the root.
#[derive(Debug)]
enum Lookup {
    /// A regular file inside the root, opened, with its length.
    Found(File, u64),
    NotFound,
    /// A directory, not a regular file, outside the root, or no permission.
    Forbidden,
    Failed(io::Error),
}

impl Lookup {
    /// What was found, in words (for logs and errors).
    fn describe(&self) -> String {
        match self {
            Lookup::Found(_, len) => format!("a file of {len} bytes"),
            Lookup::NotFound => "not found".into(),
            Lookup::Forbidden => "forbidden (not a regular file under the root)".into(),
            Lookup::Failed(e) => format!("cannot open: {e}"),
        }
    }
}

/// Opens `rel` (checked by [`components`]) under `root`, refusing anything
/// that resolves (through symbolic links) outside the root.
async fn open_under(root: &Path, rel: &str) -> Lookup {
    let root = match tokio::fs::canonicalize(root).await {
        Ok(r) => r,
        Err(e) => return Lookup::Failed(e),
    };
    let path = match tokio::fs::canonicalize(root.join(rel)).await {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Lookup::Forbidden,
        Err(_) => return Lookup::NotFound,
    };
    if !path.starts_with(&root) {
        return Lookup::Forbidden;
    }
    match tokio::fs::metadata(&path).await {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Lookup::Forbidden,
        Err(_) => return Lookup::NotFound,
    }
    let f = match File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Lookup::Forbidden,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Lookup::NotFound,
        Err(e) => return Lookup::Failed(e),
    };
    match f.metadata().await {
        Ok(m) if m.is_file() => Lookup::Found(f, m.len()),
        Ok(_) => Lookup::Forbidden,
        Err(e) => Lookup::Failed(e),
    }
}

/// The media type of a file, from its name's last extension; text gets
/// `charset=utf-8`, an unknown type is `application/octet-stream`.
fn content_type(path: &str) -> String {
    let name = path.rsplit('/').next().unwrap_or(path);
    let mime = mime_guess::from_path(name).first_or_octet_stream();
    if mime.type_() == mime_guess::mime::TEXT && mime.get_param("charset").is_none() {
        format!("{}; charset=utf-8", mime.essence_str())
    } else {
        mime.essence_str().to_string()
    }
}

/// What a `Range` field asks of a file of some length.
#[derive(Debug, PartialEq, Eq)]
enum RangeSpec {
    /// Not a single valid byte range (or several): send everything.
    Whole,
    /// Bytes `[a, b)`.
    Part(u64, u64),
    /// No byte of the range exists: 416.
    Unsatisfiable,
}

/// What a `Range` field asks of a file of `len` bytes. `http_range_header`
/// parses the range; satisfiability follows RFC 9110 14.1.2 (a suffix
/// longer than the file is the whole file; `-0`, a first byte past the
/// end, or any range of an empty file is unsatisfiable). The unit is
/// case-insensitive and whitespace inside the range is ignored.
fn parse_range(value: &str, len: u64) -> RangeSpec {
    let Some((unit, set)) = value.split_once('=') else {
        return RangeSpec::Whole;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeSpec::Whole;
    }
    let set: String = set.split_ascii_whitespace().collect();
    if set.contains(',') {
        // Several ranges: served as a whole (allowed by RFC 9110 14.2).
        return RangeSpec::Whole;
    }
    let range = match http_range_header::parse_range_header(&format!("bytes={set}")) {
        Ok(parsed) => match parsed.ranges.first() {
            Some(r) => *r,
            None => return RangeSpec::Whole,
        },
        Err(RangeUnsatisfiableError::ZeroSuffix) => return RangeSpec::Unsatisfiable,
        Err(_) => return RangeSpec::Whole,
    };
    match (range.start, range.end) {
        // Not a valid range (RFC 9110 14.1.1): ignored.
        (StartPosition::Index(a), EndPosition::Index(b)) if b < a => RangeSpec::Whole,
        (StartPosition::Index(a), _) if a >= len => RangeSpec::Unsatisfiable,
        (StartPosition::FromLast(_), _) if len == 0 => RangeSpec::Unsatisfiable,
        (StartPosition::Index(a), EndPosition::Index(b)) => RangeSpec::Part(a, b.min(len - 1) + 1),
        (StartPosition::Index(a), EndPosition::LastByte) => RangeSpec::Part(a, len),
        (StartPosition::FromLast(n), _) => RangeSpec::Part(len - n.min(len), len),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use migratory::{ClientControl, MigratoryStream};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::*;
    use crate::testing::{draining_options, options, pattern, pool, Pool, TempDir, TEST_TIMEOUT};
    use crate::Kind;

    /// A response as the client read it.
    #[derive(Debug)]
    struct Resp {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Resp {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// A test client over any stream, with migrations at chosen body
    /// offsets when it is migratory.
    struct Client<S> {
        s: S,
        buf: Vec<u8>,
        ctl: Option<ClientControl>,
    }

    impl Client<MigratoryStream> {
        async fn migratory(pool: &Pool) -> Self {
            let s = MigratoryStream::connect(&pool.service[..1], &pool.tls)
                .await
                .unwrap();
            let ctl = Some(s.control());
            Self {
                s,
                buf: Vec::new(),
                ctl,
            }
        }
    }

    impl Client<tokio::net::TcpStream> {
        async fn plain(pool: &Pool) -> Self {
            Self {
                s: tokio::net::TcpStream::connect(pool.service[0])
                    .await
                    .unwrap(),
                buf: Vec::new(),
                ctl: None,
            }
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
        async fn send(&mut self, req: &str) {
            self.s.write_all(req.as_bytes()).await.unwrap();
        }

        async fn get(&mut self, path: &str) -> Resp {
            self.send(&format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n"))
                .await;
            self.response(false, &[]).await
        }

        async fn migrate(&mut self, dest: &str) {
            let ctl = self.ctl.as_mut().expect("a migratory client");
            assert_eq!(ctl.migrate(Some(dest)).await.unwrap().as_str(), dest);
        }

        async fn more(&mut self, max: usize) -> usize {
            let mut b = vec![0u8; max];
            let n = self.s.read(&mut b).await.unwrap();
            self.buf.extend_from_slice(&b[..n]);
            n
        }

        /// Reads one response; migrates to `dest` when `at` body bytes
        /// were read, for each `(at, dest)`.
        async fn response(&mut self, head_only: bool, moves: &[(usize, &str)]) -> Resp {
            let (status, headers, used) = loop {
                let mut hs = [httparse::EMPTY_HEADER; 32];
                let mut r = httparse::Response::new(&mut hs);
                if let httparse::Status::Complete(n) = r.parse(&self.buf).unwrap() {
                    let headers = r
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8(h.value.to_vec()).unwrap(),
                            )
                        })
                        .collect::<Vec<_>>();
                    break (r.code.unwrap(), headers, n);
                }
                assert!(self.more(4096).await > 0, "EOF in a response head");
            };
            self.buf.drain(..used);
            let mut resp = Resp {
                status,
                headers,
                body: Vec::new(),
            };
            let len: usize = resp.header("content-length").unwrap().parse().unwrap();
            let len = if head_only { 0 } else { len };
            let mut next = 0;
            loop {
                while next < moves.len() && resp.body.len() >= moves[next].0 {
                    self.migrate(moves[next].1).await;
                    next += 1;
                }
                let limit = moves.get(next).map_or(len, |m| m.0.min(len));
                let take = (limit - resp.body.len()).min(self.buf.len());
                resp.body.extend(self.buf.drain(..take));
                if resp.body.len() == len && next == moves.len() {
                    break;
                }
                if resp.body.len() < limit {
                    let want = (limit - resp.body.len()).min(64 * 1024);
                    assert!(self.more(want).await > 0, "EOF in a response body");
                }
            }
            resp
        }

        /// Expects the end of the down stream (nothing more).
        async fn expect_eof(&mut self) {
            assert!(self.buf.is_empty(), "unexpected bytes {:?}", self.buf);
            let mut rest = Vec::new();
            self.s.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "unexpected bytes after the end");
        }
    }

    /// A root with a few files: `big.bin` of `big` bytes, `a.txt`,
    /// `index.html`, `data.json`, `empty`, `sub/inner.txt`.
    fn files(dir: &TempDir, big: usize) -> Vec<u8> {
        let data = pattern(big, 0x5a);
        std::fs::write(dir.0.join("big.bin"), &data).unwrap();
        std::fs::write(dir.0.join("a.txt"), b"hello, world\n").unwrap();
        std::fs::write(dir.0.join("index.html"), b"<p>hi</p>").unwrap();
        std::fs::write(dir.0.join("data.json"), b"{}").unwrap();
        std::fs::write(dir.0.join("empty"), b"").unwrap();
        std::fs::create_dir_all(dir.0.join("sub")).unwrap();
        std::fs::write(dir.0.join("sub/inner.txt"), b"inner").unwrap();
        data
    }

    async fn http_pool(n: usize, root: &std::path::Path) -> Pool {
        let o = options(root, Duration::ZERO);
        pool(Kind::Http, vec![o; n]).await
    }

    async fn run<F: std::future::Future<Output = ()>>(f: F) {
        tokio::time::timeout(TEST_TIMEOUT, f)
            .await
            .expect("test timed out")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn big_get_migrates_in_the_middle_of_the_body() {
        run(async {
            let dir = TempDir::new("http-big");
            let data = files(&dir, 5 << 20);
            let pool = http_pool(3, &dir.0).await;
            let mut c = Client::migratory(&pool).await;
            c.send("GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n").await;
            let moves = [
                (300_000, "s2"),
                (1_000_000, "s3"),
                (1_000_001, "s1"),
                (3_500_000, "s3"),
                (5 << 20, "s2"),
            ];
            let r = c.response(false, &moves).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.header("content-type"), Some("application/octet-stream"));
            assert_eq!(r.header("content-length"), Some("5242880"));
            assert_eq!(r.header("connection"), None);
            assert!(r.body == data, "body differs");
            // The session goes on at the last server.
            let r = c.get("/a.txt").await;
            assert_eq!((r.status, &r.body[..]), (200, &b"hello, world\n"[..]));
            c.s.shutdown().await.unwrap();
            c.expect_eof().await;
            assert!(pool.errors().is_empty(), "{:?}", pool.errors());
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keep_alive_requests_with_migrations_between_and_during() {
        run(async {
            let dir = TempDir::new("http-ka");
            let data = files(&dir, 3 << 20);
            let pool = http_pool(3, &dir.0).await;
            let mut c = Client::migratory(&pool).await;
            c.send("GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n").await;
            let r = c.response(false, &[(700_000, "s2")]).await;
            assert!(r.status == 200 && r.body == data);
            c.migrate("s3").await;
            c.send("GET /big.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=1000-2999999\r\n\r\n")
                .await;
            let r = c.response(false, &[(1_200_000, "s1")]).await;
            assert_eq!(r.status, 206);
            assert_eq!(
                r.header("content-range"),
                Some(format!("bytes 1000-2999999/{}", data.len()).as_str())
            );
            assert!(r.body == data[1000..3_000_000]);
            c.s.shutdown().await.unwrap();
            c.expect_eof().await;
            assert!(pool.errors().is_empty(), "{:?}", pool.errors());
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_requests_survive_migrations() {
        run(async {
            let dir = TempDir::new("http-pipe");
            let data = files(&dir, 2 << 20);
            let pool = http_pool(3, &dir.0).await;
            let mut c = Client::migratory(&pool).await;
            // All at once: the server reads the next requests with the
            // first; they travel in its state.
            c.send(concat!(
                "GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n",
                "HEAD /a.txt HTTP/1.1\r\nHost: t\r\n\r\n",
                "GET /big.bin HTTP/1.1\r\nRange: bytes=-100000\r\nHost: t\r\n\r\n",
                "GET /nope HTTP/1.1\r\nHost: t\r\n\r\n",
                "GET /a.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            ))
            .await;
            let r = c
                .response(false, &[(500_000, "s2"), (1_500_000, "s3")])
                .await;
            assert!(r.status == 200 && r.body == data);
            c.migrate("s1").await;
            let r = c.response(true, &[]).await;
            assert_eq!((r.status, r.header("content-length")), (200, Some("13")));
            c.migrate("s2").await;
            let r = c.response(false, &[(50_000, "s3")]).await;
            assert_eq!(r.status, 206);
            assert!(r.body == data[data.len() - 100_000..]);
            let r = c.response(false, &[]).await;
            assert_eq!(r.status, 404);
            c.migrate("s1").await;
            let r = c.response(false, &[]).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.header("connection"), Some("close"));
            assert_eq!(r.body, b"hello, world\n");
            c.expect_eof().await;
            assert!(pool.errors().is_empty(), "{:?}", pool.errors());
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ranges_are_exact() {
        run(async {
            let dir = TempDir::new("http-range");
            let data = files(&dir, 100_000);
            let pool = http_pool(2, &dir.0).await;
            let mut c = Client::migratory(&pool).await;
            let len = data.len();
            for (range, status, want) in [
                ("bytes=0-0", 206, Some((0, 1))),
                ("bytes=10-19", 206, Some((10, 20))),
                ("bytes=99990-", 206, Some((99_990, len))),
                ("bytes=-10", 206, Some((len - 10, len))),
                ("bytes=-1000000", 206, Some((0, len))),
                ("bytes=50000-9999999", 206, Some((50_000, len))),
                ("bytes=0-1,5-9", 200, Some((0, len))),
                ("bytes=9-5", 200, Some((0, len))),
                ("lines=1-2", 200, Some((0, len))),
                ("bytes=x-y", 200, Some((0, len))),
                ("bytes=100000-", 416, None),
                ("bytes=100000-100001", 416, None),
                ("bytes=-0", 416, None),
            ] {
                c.send(&format!(
                    "GET /big.bin HTTP/1.1\r\nHost: t\r\nRange: {range}\r\n\r\n"
                ))
                .await;
                let r = c.response(false, &[]).await;
                assert_eq!(r.status, status, "{range}");
                match want {
                    Some((a, b)) => {
                        assert!(r.body == data[a..b], "{range}");
                        if status == 206 {
                            assert_eq!(
                                r.header("content-range"),
                                Some(format!("bytes {a}-{}/{len}", b - 1).as_str())
                            );
                        } else {
                            assert_eq!(r.header("content-range"), None);
                        }
                    }
                    None => {
                        assert_eq!(
                            r.header("content-range"),
                            Some(format!("bytes */{len}").as_str())
                        );
                    }
                }
                c.migrate(if c.s.server().unwrap().as_str() == "s1" {
                    "s2"
                } else {
                    "s1"
                })
                .await;
            }
            // An empty file has no byte to give.
            c.send("GET /empty HTTP/1.1\r\nRange: bytes=0-\r\n\r\n")
                .await;
            let r = c.response(false, &[]).await;
            assert_eq!(
                (r.status, r.header("content-range")),
                (416, Some("bytes */0"))
            );
            // If-Range without validators: the whole file.
            c.send("GET /a.txt HTTP/1.1\r\nRange: bytes=0-1\r\nIf-Range: \"x\"\r\n\r\n")
                .await;
            let r = c.response(false, &[]).await;
            assert_eq!((r.status, &r.body[..]), (200, &b"hello, world\n"[..]));
            assert!(pool.errors().is_empty(), "{:?}", pool.errors());
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn head_has_the_headers_and_no_body() {
        run(async {
            let dir = TempDir::new("http-head");
            files(&dir, 70_000);
            let pool = http_pool(2, &dir.0).await;
            let mut c = Client::migratory(&pool).await;
            for (path, ct, len) in [
                ("/big.bin", "application/octet-stream", "70000"),
                ("/index.html", "text/html; charset=utf-8", "9"),
                ("/data.json", "application/json", "2"),
                ("/a.txt", "text/plain; charset=utf-8", "13"),
            ] {
                c.send(&format!("HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n"))
                    .await;
                let r = c.response(true, &[]).await;
                assert_eq!(r.status, 200);
                assert_eq!(r.header("content-type"), Some(ct));
                assert_eq!(r.header("content-length"), Some(len));
                assert_eq!(r.header("accept-ranges"), Some("bytes"));
            }
            c.send("HEAD /missing HTTP/1.1\r\n\r\n").await;
            let r = c.response(true, &[]).await;
            assert_eq!(r.status, 404);
            // No body bytes came: the next response starts right away.
            let r = c.get("/index.html").await;
            assert_eq!((r.status, &r.body[..]), (200, &b"<p>hi</p>"[..]));
            assert!(pool.errors().is_empty(), "{:?}", pool.errors());
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn errors_and_traversal() {
        run(async {
            let dir = TempDir::new("http-err");
            files(&dir, 10);
            let outside = TempDir::new("http-outside");
            std::fs::write(outside.0.join("secret"), b"secret").unwrap();
            std::os::unix::fs::symlink(outside.0.join("secret"), dir.0.join("link")).unwrap();
            std::os::unix::fs::symlink(&outside.0, dir.0.join("linkdir")).unwrap();
            let pool = http_pool(2, &dir.0).await;
            let mut c = Client::migratory(&pool).await;
            let secret_rel = format!(
                "/../{}/secret",
                outside.0.file_name().unwrap().to_str().unwrap()
            );
            for (path, status) in [
                ("/nope.txt", 404),
                ("/sub/nope", 404),
                ("/a.txt/x", 404),
                ("/sub", 403),
                ("/sub/", 403),
                ("/", 403),
                (secret_rel.as_str(), 403),
                ("/%2e%2e/etc/passwd", 403),
                ("/sub/%2E%2E/%2e%2e/etc/passwd", 403),
                ("/sub/..%2f..%2fetc%2fpasswd", 403),
                ("/link", 403),
                ("/linkdir/secret", 403),
                ("a.txt", 400),
                ("*", 400),
                ("/a%ZZ", 400),
                ("/a%2", 400),
                ("/a%00b", 400),
                ("/%ff", 400),
                ("/sub/./inner.txt", 200),
                ("//sub//inner.txt?x=1&y=/../..", 200),
                ("/%73ub/inner%2Etxt#frag", 200),
                ("http://example.com/sub/inner.txt", 200),
            ] {
                let r = c.get(path).await;
                assert_eq!(r.status, status, "{path}");
                if status == 200 {
                    assert_eq!(r.body, b"inner", "{path}");
                } else {
                    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
                }
            }
            c.migrate("s2").await;
            c.send("POST /a.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
                .await;
            let r = c.response(false, &[]).await;
            assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
            assert_eq!(r.header("connection"), None);
            c.send("DELETE /a.txt HTTP/1.1\r\n\r\n").await;
            let r = c.response(false, &[]).await;
            assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
            // Still alive; then a request with a body closes after its
            // response (the body is not read).
            let r = c.get("/a.txt").await;
            assert_eq!(r.status, 200);
            c.send("PUT /a.txt HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
                .await;
            let r = c.response(false, &[]).await;
            assert_eq!((r.status, r.header("connection")), (405, Some("close")));
            c.expect_eof().await;
            assert!(pool.errors().is_empty(), "{:?}", pool.errors());
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_and_oversized_heads_close() {
        run(async {
            let dir = TempDir::new("http-bad");
            files(&dir, 10);
            let pool = http_pool(2, &dir.0).await;
            for (req, status) in [
                ("GARBAGE\r\n\r\n".to_string(), 400),
                ("GET /a.txt HTTP/1.1\r\nBad Header\r\n\r\n".to_string(), 400),
                (
                    "GET /a.txt HTTP/1.1\r\nContent-Length: x\r\n\r\n".to_string(),
                    400,
                ),
                (
                    "GET /a.txt HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
                        .to_string(),
                    400,
                ),
                ("GET /a.txt HTTP/2.0\r\n\r\n".to_string(), 505),
                (
                    format!("GET /a.txt HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(17_000)),
                    431,
                ),
                (
                    format!(
                        "GET /a.txt HTTP/1.1\r\n{}\r\n",
                        "X: y\r\n".repeat(MAX_HEADERS + 1)
                    ),
                    431,
                ),
            ] {
                let mut c = Client::migratory(&pool).await;
                c.send(&req).await;
                let r = c.response(false, &[]).await;
                assert_eq!(r.status, status, "{req:.60}");
                assert_eq!(r.header("connection"), Some("close"));
                c.expect_eof().await;
                // A plain client gets the same.
                let mut p = Client::plain(&pool).await;
                p.send(&req).await;
                let r = p.response(false, &[]).await;
                assert_eq!(r.status, status, "{req:.60}");
                p.s.shutdown().await.unwrap();
                p.expect_eof().await;
            }
            // A head of exactly 16 KiB is fine.
            let start = "GET /a.txt HTTP/1.1\r\nX: ";
            let pad = MAX_HEAD - start.len() - 4;
            let mut c = Client::migratory(&pool).await;
            c.send(&format!("{start}{}\r\n\r\n", "y".repeat(pad))).await;
            let r = c.response(false, &[]).await;
            assert_eq!(r.status, 200);
            assert!(pool.errors().is_empty(), "{:?}", pool.errors());
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plain_tcp_clients_are_served() {
        run(async {
            let dir = TempDir::new("http-plain");
            let data = files(&dir, 3 << 20);
            let pool = http_pool(2, &dir.0).await;
            let mut p = Client::plain(&pool).await;
            let r = p.get("/big.bin").await;
            assert!(r.status == 200 && r.body == data);
            p.send("GET /big.bin HTTP/1.1\r\nRange: bytes=5-9\r\n\r\n")
                .await;
            let r = p.response(false, &[]).await;
            assert!(r.status == 206 && r.body == data[5..10]);
            p.send("GET /a.txt HTTP/1.1\r\nConnection: close\r\n\r\n")
                .await;
            let r = p.response(false, &[]).await;
            assert_eq!(r.header("connection"), Some("close"));
            p.expect_eof().await;
            // HTTP/1.0 closes unless asked to keep alive.
            let mut p = Client::plain(&pool).await;
            p.send("GET /a.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .await;
            let r = p.response(false, &[]).await;
            assert_eq!(r.header("connection"), Some("keep-alive"));
            p.send("GET /a.txt HTTP/1.0\r\n\r\n").await;
            let r = p.response(false, &[]).await;
            assert_eq!((r.status, r.header("connection")), (200, Some("close")));
            assert_eq!(r.body, b"hello, world\n");
            p.expect_eof().await;
            // The client closes between requests: the server closes too.
            let mut p = Client::plain(&pool).await;
            let r = p.get("/a.txt").await;
            assert_eq!(r.status, 200);
            p.s.shutdown().await.unwrap();
            p.expect_eof().await;
            assert!(pool.errors().is_empty(), "{:?}", pool.errors());
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_draining_server_lets_plain_clients_go_after_their_response() {
        run(async {
            let dir = TempDir::new("http-drain");
            let data = files(&dir, 16 << 20);
            let (o, drain) = draining_options(&dir.0, Duration::ZERO);
            let pool = pool(Kind::Http, vec![o]).await;
            // Kept alive, waiting for its next request.
            let mut idle = Client::plain(&pool).await;
            let r = idle.get("/a.txt").await;
            assert_eq!((r.status, r.header("connection")), (200, None));
            // In the middle of a body (its head is out, without a close),
            // with the next request pipelined behind it.
            let mut busy = Client::plain(&pool).await;
            busy.send(concat!(
                "GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n",
                "GET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n",
            ))
            .await;
            while !busy.buf.windows(4).any(|w| w == b"\r\n\r\n") || busy.buf.len() < 100_000 {
                assert!(busy.more(4096).await > 0);
            }
            // A request whose head has begun to arrive.
            let mut begun = Client::plain(&pool).await;
            begun.send("GET /a.txt HTTP/1.1\r\nHost: t\r\n").await;
            // A migratory session, kept alive too.
            let mut m = Client::migratory(&pool).await;
            let r = m.get("/a.txt").await;
            assert_eq!((r.status, r.header("connection")), (200, None));

            drain.send_replace(true);
            // The idle connection ends at once.
            idle.expect_eof().await;
            // The body in progress ends whole, then the connection: the
            // pipelined request is not answered.
            let r = busy.response(false, &[]).await;
            assert_eq!((r.status, r.header("connection")), (200, None));
            assert!(r.body == data, "body differs");
            busy.expect_eof().await;
            // The begun request is answered, saying the close.
            begun.send("\r\n").await;
            let r = begun.response(false, &[]).await;
            assert_eq!((r.status, r.header("connection")), (200, Some("close")));
            assert_eq!(r.body, b"hello, world\n");
            begun.expect_eof().await;
            // The migratory session is left alone: still kept alive.
            let r = m.get("/index.html").await;
            assert_eq!((r.status, r.header("connection")), (200, None));
            assert_eq!(r.body, b"<p>hi</p>");
            m.s.shutdown().await.unwrap();
            m.expect_eof().await;
            assert!(pool.errors().is_empty(), "{:?}", pool.errors());
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_changed_file_ends_the_resumed_session() {
        run(async {
            let (d1, d2) = (TempDir::new("http-c1"), TempDir::new("http-c2"));
            let data = files(&d1, 3 << 20);
            files(&d2, 1 << 20);
            let pool = pool(
                Kind::Http,
                vec![
                    options(&d1.0, Duration::ZERO),
                    options(&d2.0, Duration::ZERO),
                ],
            )
            .await;
            let mut c = Client::migratory(&pool).await;
            c.send("GET /big.bin HTTP/1.1\r\n\r\n").await;
            // Read the head and some of the body, then move to s2.
            while !c.buf.windows(4).any(|w| w == b"\r\n\r\n") {
                assert!(c.more(4096).await > 0);
            }
            let head_end = c.buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            while c.buf.len() < head_end + 100_000 {
                assert!(c.more(4096).await > 0);
            }
            c.migrate("s2").await;
            let mut rest = Vec::new();
            let r = c.s.read_to_end(&mut rest).await;
            let mut body = c.buf[head_end..].to_vec();
            body.extend_from_slice(&rest);
            // What came is exact, and it is not everything.
            assert!(body.len() < data.len(), "{r:?}");
            assert!(body == data[..body.len()]);
            let errors = pool.wait_error().await;
            assert!(
                errors.len() == 1 && errors[0].contains("length is 1048576 here"),
                "{errors:?}"
            );
        })
        .await
    }

    #[test]
    fn state_round_trips_and_rejects_bad_input() {
        let states = [
            State::default(),
            State {
                phase: Phase::Idle,
                close: false,
                leftover: b"GET / HTTP/1.1\r\nHo".to_vec(),
            },
            State {
                phase: Phase::Body(Body {
                    path: "sub/big.bin".into(),
                    file_len: 1 << 40,
                    start: 5,
                    end: 1 << 30,
                    offset: 77,
                }),
                close: true,
                leftover: vec![0xff; MAX_HEAD],
            },
            State {
                phase: Phase::Closing,
                close: true,
                leftover: Vec::new(),
            },
        ];
        for st in &states {
            let e = st.encode();
            assert_eq!(&State::decode(&e).unwrap(), st);
            for cut in 0..e.len() {
                let err = State::decode(&e[..cut]).unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            }
            let mut long = e.clone();
            long.push(0);
            assert!(State::decode(&long).is_err());
        }
        let body = |path: &str, file_len, start, end, offset| State {
            phase: Phase::Body(Body {
                path: path.into(),
                file_len,
                start,
                end,
                offset,
            }),
            close: false,
            leftover: Vec::new(),
        };
        for bad in [
            body("../etc/passwd", 10, 0, 10, 0),
            body("a/../../x", 10, 0, 10, 0),
            body("/abs", 10, 0, 10, 0),
            body("a//b", 10, 0, 10, 0),
            body("a/./b", 10, 0, 10, 0),
            body("a\0b", 10, 0, 10, 0),
            body("a", 10, 5, 10, 4),
            body("a", 10, 0, 10, 11),
            body("a", 10, 0, 11, 0),
            State {
                leftover: vec![0; MAX_HEAD + 1],
                ..State::default()
            },
        ] {
            let err = State::decode(&bad.encode()).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{bad:?}");
        }
        let mut e = states[2].encode();
        e[0] = b'C';
        assert!(State::decode(&e).is_err());
        let mut e = states[2].encode();
        e[1] = 2;
        assert!(State::decode(&e).is_err());
        let mut e = states[2].encode();
        e[2] = 3;
        assert!(State::decode(&e).is_err());
        let mut e = states[2].encode();
        e[3] = 4;
        assert!(State::decode(&e).is_err());
        let mut e = states[1].encode();
        e.truncate(e.len() - 1);
        assert!(State::decode(&e).is_err());
        // Garbage never panics.
        let mut x: u64 = 0x1234_5678;
        for i in 0..20_000usize {
            let mut g = Vec::new();
            for _ in 0..(i % 90) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                g.push(x as u8);
            }
            if i % 3 == 0 && g.len() > 2 {
                g[0] = TAG;
                g[1] = VERSION;
                g[2] %= 3;
            }
            let _ = State::decode(&g);
        }
    }

    #[test]
    fn ranges_paths_and_types() {
        assert_eq!(parse_range("bytes=0-499", 1000), RangeSpec::Part(0, 500));
        assert_eq!(
            parse_range(" Bytes = 500 - ", 1000),
            RangeSpec::Part(500, 1000)
        );
        assert_eq!(parse_range("bytes=-1", 1000), RangeSpec::Part(999, 1000));
        assert_eq!(parse_range("bytes=1000-", 1000), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=1-0", 1000), RangeSpec::Whole);
        assert_eq!(parse_range("bytes=", 1000), RangeSpec::Whole);
        assert_eq!(parse_range("bytes=-", 1000), RangeSpec::Whole);
        assert_eq!(
            parse_range("bytes=99999999999999999999-", 1000),
            RangeSpec::Whole
        );
        assert_eq!(parse_range("bytes=+1-2", 1000), RangeSpec::Whole);
        assert_eq!(request_path("/a/b?c"), Ok("a/b".into()));
        assert_eq!(request_path("/"), Ok(String::new()));
        assert_eq!(request_path("*"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(request_path("/a/%2e%2E"), Err(StatusCode::FORBIDDEN));
        assert_eq!(request_path("HTTP://h"), Ok(String::new()));
        // Non-ASCII where a scheme would end: no slicing inside a character.
        assert_eq!(request_path("/abcdeé"), Ok("abcdeé".into()));
        assert_eq!(request_path("/abcdefé"), Ok("abcdefé".into()));
        assert_eq!(request_path("éééé"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(percent_decode(b"%41%2f%2F"), Some(b"A//".to_vec()));
        for bad in [&b"%"[..], b"%4", b"%4g", b"a%%41", "%é".as_bytes()] {
            assert_eq!(percent_decode(bad), None, "{bad:?}");
        }
        assert_eq!(content_type("x/Y.HTML"), "text/html; charset=utf-8");
        assert_eq!(content_type("a.txt"), "text/plain; charset=utf-8");
        assert_eq!(content_type("data.json"), "application/json");
        // The last extension counts; an unknown one is octet-stream.
        assert_eq!(content_type("x.tar.gz"), "application/gzip");
        assert_eq!(content_type("x.gz.unknownext"), "application/octet-stream");
        assert_eq!(content_type("dir.json/file"), "application/octet-stream");
        assert_eq!(content_type("big.bin"), "application/octet-stream");
    }
}
