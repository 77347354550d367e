//! The metrics endpoint: GET /metrics over plain HTTP/1.x from a thread of its own, with
//! bounded request heads and deadlines, so a slow or hostile scraper holds nothing else up.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::Metrics;

/// The request head must arrive within this, in total.
pub(super) const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
pub(super) const MAX_REQUEST_HEAD: usize = 8 * 1024;
pub(super) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves GET /metrics on `listener` from a thread of its own; returns once the thread runs.
pub fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("metrics-http".to_string())
        .spawn(move || accept_loop(&listener, &metrics))
}

pub(super) fn accept_loop(listener: &TcpListener, metrics: &Metrics) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                if let Err(e) = answer(stream, metrics) {
                    log::debug!("metrics: request not answered: {e}");
                }
            }
            Err(e) => {
                log::warn!("metrics: accept failed: {e}");
                // Out of descriptors and the like: do not spin while it lasts.
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one request head and writes one response; the connection then closes.
pub(super) fn answer(mut stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let response = match read_head(&mut stream, Instant::now() + REQUEST_DEADLINE) {
        Ok(head) => respond(&head, metrics),
        Err(HeadError::TooLarge) => Response::plain(431, "Request Header Fields Too Large"),
        // Timed out or gone: nobody is waiting for an answer.
        Err(HeadError::Io(e)) => return Err(e),
    };
    stream.write_all(&response.into_bytes())?;
    stream.flush()?;
    close_gently(stream);
    Ok(())
}

/// Closing a socket with unread input makes the kernel send RST, which can destroy the
/// response before the client reads it (a refused oversized head, a POST body). So: half-close,
/// then read and drop what is left, bounded in bytes and time.
pub(super) fn close_gently(mut stream: TcpStream) {
    const DRAIN_LIMIT: usize = 64 * 1024;
    const DRAIN_TIME: Duration = Duration::from_millis(500);
    if stream.shutdown(std::net::Shutdown::Write).is_err()
        || stream.set_read_timeout(Some(DRAIN_TIME)).is_err()
    {
        return;
    }
    let deadline = Instant::now() + DRAIN_TIME;
    let mut drained = 0;
    let mut sink = [0u8; 4096];
    while drained < DRAIN_LIMIT && Instant::now() < deadline {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

/// Why no request head could be read.
pub(super) enum HeadError {
    TooLarge,
    Io(io::Error),
}

/// Reads until the blank line that ends the head, within `MAX_REQUEST_HEAD` and `deadline`.
pub(super) fn read_head(stream: &mut TcpStream, deadline: Instant) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(HeadError::Io(io::ErrorKind::TimedOut.into()));
        }
        stream
            .set_read_timeout(Some(remaining))
            .map_err(HeadError::Io)?;
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HeadError::Io(e)),
        };
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&head) {
            head.truncate(end);
            return Ok(head);
        }
        if head.len() >= MAX_REQUEST_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

/// Where the head ends: CRLF CRLF, or LF LF from a lenient client.
pub(super) fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

pub(super) fn respond(head: &[u8], metrics: &Metrics) -> Response {
    let line_end = head
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(head.len());
    let Ok(request_line) = std::str::from_utf8(&head[..line_end]) else {
        return Response::plain(400, "Bad Request");
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::plain(400, "Bad Request");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::plain(400, "Bad Request");
    }
    let is_head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Response::plain(405, "Method Not Allowed"),
    };
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return Response::plain(404, "Not Found");
    }
    Response {
        status: 200,
        reason: "OK",
        content_type: CONTENT_TYPE,
        body: metrics.render(),
        omit_body: is_head,
    }
}

/// One HTTP response; always `Connection: close`.
pub(super) struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    /// HEAD: the headers of the GET answer, without its body.
    omit_body: bool,
}

impl Response {
    /// An error page whose body is its reason phrase.
    fn plain(status: u16, reason: &'static str) -> Self {
        Self {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: format!("{reason}\n"),
            omit_body: false,
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        if self.status == 405 {
            head.push_str("Allow: GET, HEAD\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if !self.omit_body {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}
