//! The metrics address of `migratory serve`: Prometheus text at any path,
//! and readiness at `/ready` (200 `ready`, or 503 `draining` once the
//! server drains, so a load balancer or Kubernetes stops sending it new
//! clients).

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Largest request head read (scrapers send a few hundred bytes).
const MAX_HEAD: usize = 8 * 1024;
/// How long a scraper may take to send its request.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Most scrapes and checks answered at once; more are closed at once.
const MAX_CONCURRENT: usize = 64;

/// Answers scrapes and readiness checks until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    draining: watch::Receiver<bool>,
) {
    // Histogram samples are folded in by the upkeep (else they pile up).
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed at once
        };
        let handle = handle.clone();
        let draining = draining.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(HEAD_TIMEOUT, answer(stream, &handle, &draining)).await;
            drop(slot);
        });
    }
}

/// Reads one request head and answers it; the connection then closes.
async fn answer(
    mut stream: TcpStream,
    handle: &PrometheusHandle,
    draining: &watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let path = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&head) {
            Ok(httparse::Status::Complete(_)) => break req.path.unwrap_or("/").to_string(),
            Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => continue,
            _ => return respond(&mut stream, 400, "Bad Request", "bad request\n").await,
        }
    };
    let path = path.split('?').next().unwrap_or("/");
    if path == "/ready" || path == "/readyz" {
        if *draining.borrow() {
            respond(&mut stream, 503, "Service Unavailable", "draining\n").await
        } else {
            respond(&mut stream, 200, "OK", "ready\n").await
        }
    } else {
        respond(&mut stream, 200, "OK", &handle.render()).await
    }
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    reason: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
