//! Guest stdout/stderr: forwarded line by line to the host log (`kiln::guest` target) with
//! the function's name, and kept in the function's log book ([`super::logs`]) with the
//! request's id and version, capped per request so a chatty guest cannot flood the log or
//! the host's memory. Bytes past the cap are counted and dropped, never an error for the
//! guest.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use super::logs::RequestLog;

/// Bytes of output kept per stream and request.
pub const GUEST_LOG_CAP: usize = 64 * 1024;

/// A guest output stream (`stdout` or `stderr`) of one function.
#[derive(Clone)]
pub struct GuestLog {
    function: Arc<str>,
    stream: &'static str,
    /// The request's place in the log book; `None` (compile checks, validation runs): the
    /// host log only.
    book: Option<RequestLog>,
}

impl GuestLog {
    pub fn new(function: Arc<str>, stream: &'static str, book: Option<RequestLog>) -> Self {
        GuestLog {
            function,
            stream,
            book,
        }
    }
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LineWriter::new(self.clone()))
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LineWriter::new(self.clone()))
    }
}

struct LineWriter {
    log: GuestLog,
    line: Vec<u8>,
    total: usize,
    dropped: usize,
}

impl LineWriter {
    fn new(log: GuestLog) -> Self {
        LineWriter {
            log,
            line: Vec::new(),
            total: 0,
            dropped: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = GUEST_LOG_CAP.saturating_sub(self.total);
        let (kept, over) = bytes.split_at(bytes.len().min(room));
        self.total += kept.len();
        self.dropped += over.len();
        for &b in kept {
            if b == b'\n' {
                self.emit();
            } else {
                self.line.push(b);
            }
        }
    }

    fn emit(&mut self) {
        // A CRLF line ends here too.
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        if self.line.iter().all(u8::is_ascii_whitespace) {
            self.line.clear();
            return;
        }
        let text = String::from_utf8_lossy(&self.line);
        tracing::info!(target: "kiln::guest", function = %self.log.function, stream = self.log.stream, "{text}");
        if let Some(book) = &self.log.book {
            book.line(self.log.stream, &text);
        }
        self.line.clear();
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
        if self.dropped > 0 {
            tracing::warn!(target: "kiln::guest", function = %self.log.function, stream = self.log.stream,
                dropped = self.dropped, "guest output over {GUEST_LOG_CAP} bytes per request was dropped");
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LineWriter {
    async fn ready(&mut self) {}
}

impl OutputStream for LineWriter {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for LineWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
