//! Body types of the HTTP front: the one response body type, a request body with a byte
//! limit that tells the caller when it tripped and how much it read, and a response body
//! wrapper that holds a value (a concurrency permit) until the response has been fully
//! sent and reports the bytes sent (for metering).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    inner: Body,
    remaining: u64,
    limit: u64,
    stats: Arc<BodyStats>,
}

/// What a [`LimitedBody`] saw: bytes read, whether the limit tripped, and whether the
/// client sent it too slowly (`[server] min_body_bytes_per_s`).
#[derive(Debug, Default)]
pub struct BodyStats {
    pub read: AtomicU64,
    pub tripped: AtomicBool,
    pub slow: AtomicBool,
}

impl LimitedBody {
    pub fn new(inner: Body, limit: u64) -> (Self, Arc<BodyStats>) {
        let stats = Arc::new(BodyStats::default());
        let body = LimitedBody {
            inner,
            remaining: limit,
            limit,
            stats: stats.clone(),
        };
        (body, stats)
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
                        this.stats.tripped.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(BodyError::HttpRequestBodySize(Some(
                            this.limit,
                        )))));
                    }
                    this.remaining -= n;
                    this.stats.read.fetch_add(n, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                if super::too_slow(&e) {
                    this.stats.slow.store(true, Ordering::Relaxed);
                }
                Poll::Ready(Some(Err(e)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Sent to its end.
    Complete,
    /// The body itself failed (the guest trapped or ran out of time mid-stream).
    Failed,
    /// Dropped before its end: the client went away after the response head.
    Abandoned,
}

/// Called once when a response body ends (or is dropped unfinished) with the bytes sent
/// and how it ended; may return a receiver the end of the body waits for (a strict usage
/// record).
pub type OnEnd = Box<dyn FnOnce(u64, End) -> Option<tokio::sync::oneshot::Receiver<()>> + Send>;

/// A response body that keeps `guard` (a concurrency permit) alive until it is finished,
/// counts the bytes it sends and reports them at the end through [`OnEnd`].
///
/// With `hold_last`, the last frame is held back until the receiver `on_end` returned has
/// completed: the client cannot see a complete response before its usage record is durable.
pub struct Finishing<B, G> {
    inner: B,
    guard: Option<G>,
    on_end: Option<OnEnd>,
    hold_last: bool,
    held: Option<Frame<Bytes>>,
    ack: Option<tokio::sync::oneshot::Receiver<()>>,
    sent: u64,
    /// The body's length when it declared one: a body dropped once that much was sent
    /// was complete (a server may stop polling at its content-length).
    length: Option<u64>,
    done: bool,
}

impl<B, G> Finishing<B, G> {
    pub fn new(inner: B, guard: G, on_end: Option<OnEnd>, hold_last: bool) -> Self
    where
        B: HttpBody,
    {
        Finishing {
            length: inner.size_hint().exact(),
            inner,
            guard: Some(guard),
            hold_last: hold_last && on_end.is_some(),
            on_end,
            held: None,
            ack: None,
            sent: 0,
            done: false,
        }
    }

    /// Takes `length` (the response's `content-length`) as the body's length when the body
    /// itself declares none.
    pub fn declared(mut self, length: Option<u64>) -> Self {
        self.length = self.length.or(length);
        self
    }

    fn end(&mut self, how: End) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.guard = None;
        self.on_end.take().and_then(|f| f(self.sent, how))
    }
}

impl<B, G> HttpBody for Finishing<B, G>
where
    B: HttpBody<Data = Bytes, Error = BodyError> + Unpin,
    G: Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        loop {
            if let Some(ack) = &mut this.ack {
                let acked = std::task::ready!(Pin::new(ack).poll(cx));
                this.ack = None;
                this.done = true;
                if acked.is_err() {
                    this.held = None;
                    return Poll::Ready(Some(Err(BodyError::InternalError(Some(
                        "the usage record of this response could not be written".into(),
                    )))));
                }
            }
            if this.done {
                return Poll::Ready(this.held.take().map(Ok));
            }
            match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    this.sent += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if !this.hold_last {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    if let Some(prev) = this.held.replace(frame) {
                        return Poll::Ready(Some(Ok(prev)));
                    }
                }
                Some(Err(e)) => {
                    this.done = true;
                    this.held = None;
                    drop(this.end(End::Failed));
                    return Poll::Ready(Some(Err(e)));
                }
                None => match this.end(End::Complete) {
                    Some(ack) if this.hold_last => this.ack = Some(ack),
                    _ => this.done = true,
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.held.is_none() && self.ack.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B, G> Drop for Finishing<B, G> {
    fn drop(&mut self) {
        if self.on_end.is_none() {
            return;
        }
        // A client that went away before the end still used what it used, and is told
        // apart from one that got everything.
        let how = match self.length {
            Some(n) if self.sent >= n => End::Complete,
            _ => End::Abandoned,
        };
        drop(self.end(how));
    }
}

/// A response body that hashes (blake3) what it sends and reports the hash when it ends:
/// `None` if it failed or was dropped before its end. What a shadow's answer is compared
/// with.
pub struct Tapped {
    inner: Body,
    hasher: blake3::Hasher,
    report: Option<tokio::sync::oneshot::Sender<Option<blake3::Hash>>>,
}

impl Tapped {
    pub fn new(inner: Body) -> (Self, tokio::sync::oneshot::Receiver<Option<blake3::Hash>>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let body = Tapped {
            inner,
            hasher: blake3::Hasher::new(),
            report: Some(tx),
        };
        (body, rx)
    }

    fn report(&mut self, hash: Option<blake3::Hash>) {
        if let Some(tx) = self.report.take() {
            let _ = tx.send(hash);
        }
    }
}

impl HttpBody for Tapped {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.hasher.update(data);
                }
            }
            Poll::Ready(Some(Err(_))) => this.report(None),
            Poll::Ready(None) => {
                let hash = this.hasher.finalize();
                this.report(Some(hash));
            }
            Poll::Pending => {}
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

impl Drop for Tapped {
    fn drop(&mut self) {
        // A body with nothing left (an empty one is never polled) ended whole.
        let hash = self.inner.is_end_stream().then(|| self.hasher.finalize());
        self.report(hash);
    }
}

/// Bytes of a refused request's body read and dropped before answering.
pub const DRAIN_CAP: usize = 16 << 20;

/// Longest a refused request's body is read for.
pub const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and drops up to [`DRAIN_CAP`] bytes (for at most [`DRAIN_TIME`]) of a body that
/// will not be used, so that a client still sending it reads the answer instead of a
/// connection reset; a client trickling it holds nothing for long.
pub async fn drain<B: HttpBody + Unpin>(mut body: B) {
    let read = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, bytes::Buf::remaining);
            if seen > DRAIN_CAP {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, read).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn finishing_reports_bytes_and_holds_the_end_until_acknowledged() {
        let seen = Arc::new(Mutex::new(None));
        let (ack_tx, ack_rx) = tokio::sync::oneshot::channel();
        let mut ack_rx = Some(ack_rx);
        let s = seen.clone();
        let on_end: OnEnd = Box::new(move |sent, how| {
            assert_eq!(how, End::Complete);
            *s.lock().expect("lock") = Some(sent);
            ack_rx.take()
        });
        let mut body = Finishing::new(full("hello"), (), Some(on_end), true);
        // The only frame is held back until the record is acknowledged.
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), body.frame()).await;
        assert!(
            early.is_err(),
            "the end was released before the acknowledgement"
        );
        assert_eq!(*seen.lock().expect("lock"), Some(5));
        ack_tx.send(()).expect("send");
        let frame = body.frame().await.expect("frame").expect("ok");
        assert_eq!(frame.into_data().expect("data"), "hello");
        assert!(body.frame().await.is_none());

        // Without holding, the record is made when the body is dropped unfinished:
        // abandoned, unless all of its declared length was sent.
        let seen = Arc::new(Mutex::new(None));
        let s = seen.clone();
        let on_end: OnEnd = Box::new(move |sent, how| {
            *s.lock().expect("lock") = Some((sent, how));
            None
        });
        drop(Finishing::new(full("abc"), (), Some(on_end), false));
        assert_eq!(*seen.lock().expect("lock"), Some((0, End::Abandoned)));
        let s = seen.clone();
        let on_end: OnEnd = Box::new(move |sent, how| {
            *s.lock().expect("lock") = Some((sent, how));
            None
        });
        let mut body = Finishing::new(full("abc"), (), Some(on_end), false);
        assert!(body.frame().await.is_some());
        drop(body);
        assert_eq!(*seen.lock().expect("lock"), Some((3, End::Complete)));
    }
}
