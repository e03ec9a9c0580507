//! Body types of the HTTP front: the one response body type, a request body with a byte
//! limit that tells the caller when it tripped, and a body wrapper that holds a value
//! (a concurrency permit) until the response has been fully sent.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

/// Error type of every response body.
pub type BodyError = wasmtime_wasi_http::Error;
/// The response body type of every handler.
pub type Body = UnsyncBoxBody<Bytes, BodyError>;

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// A request body that fails once more than `limit` bytes arrive, and records that it did
/// (so a guest that fails on the truncated body is answered 413, not 500).
pub struct LimitedBody {
    inner: hyper::body::Incoming,
    remaining: u64,
    limit: u64,
    tripped: Arc<AtomicBool>,
}

impl LimitedBody {
    pub fn new(inner: hyper::body::Incoming, limit: u64) -> (Self, Arc<AtomicBool>) {
        let tripped = Arc::new(AtomicBool::new(false));
        let body = LimitedBody {
            inner,
            remaining: limit,
            limit,
            tripped: tripped.clone(),
        };
        (body, tripped)
    }
}

impl HttpBody for LimitedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.remaining {
                        this.tripped.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(BodyError::HttpRequestBodySize(Some(
                            this.limit,
                        )))));
                    }
                    this.remaining -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body that keeps `guard` alive until the body is finished or dropped.
pub struct Holding<B, G> {
    inner: B,
    guard: Option<G>,
}

impl<B, G> Holding<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Holding {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: HttpBody + Unpin, G: Unpin> HttpBody for Holding<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Bytes of a refused request's body read and dropped before answering.
pub const DRAIN_CAP: usize = 16 << 20;

/// Reads and drops up to [`DRAIN_CAP`] bytes of a body that will not be used, so that a
/// client still sending it reads the answer instead of a connection reset.
pub async fn drain(mut body: hyper::body::Incoming) {
    let mut seen = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        seen += frame.data_ref().map_or(0, |d| d.len());
        if seen > DRAIN_CAP {
            break;
        }
    }
}
