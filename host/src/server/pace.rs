//! A floor under how slowly a client may send a request body (`[server]
//! min_body_bytes_per_s`, after `min_body_rate_grace_ms`): an upload trickled a few bytes
//! at a time would otherwise hold its connection, a concurrency slot, a share of the body
//! budget or a blob writer for as long as the client likes.
//!
//! Only time spent *waiting* for the client counts: the clock runs while someone polls the
//! body and no data is there, never while the body sits unread (a request queued for
//! admission, a guest busy between reads; flow control then holds the client back, not
//! its own slowness). A body whose reader has waited longer than the grace plus one second
//! per `min_body_bytes_per_s` bytes received fails with
//! [`BodyError::ConnectionReadTimeout`]; [`too_slow`] tells that failure apart.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::{Instant, Sleep};

use super::body::{Body, BodyError};

/// The slowest a client may send a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinRate {
    /// Bytes per second, on average over the time waited (0: no floor).
    pub bytes_per_s: u64,
    /// Waiting allowed before the floor applies.
    pub grace: Duration,
}

impl MinRate {
    /// No floor at all.
    pub const OFF: MinRate = MinRate {
        bytes_per_s: 0,
        grace: Duration::ZERO,
    };

    /// The floor `[server]` sets.
    pub fn of(limits: &crate::config::ServerLimits) -> MinRate {
        MinRate {
            bytes_per_s: limits.min_body_bytes_per_s,
            grace: Duration::from_millis(limits.min_body_rate_grace_ms),
        }
    }

    /// How long a reader may have waited in all once `received` bytes have arrived.
    fn allowance(&self, received: u64) -> Duration {
        self.grace.saturating_add(Duration::from_secs_f64(
            received as f64 / self.bytes_per_s as f64,
        ))
    }
}

/// A request body as every handler takes it: `body`, failing once its client sends
/// slower than `rate`.
pub fn paced(body: hyper::body::Incoming, rate: MinRate) -> Body {
    let body = body.map_err(BodyError::from);
    if rate.bytes_per_s == 0 {
        return body.boxed_unsync();
    }
    Paced {
        inner: body,
        rate,
        received: 0,
        waited: Duration::ZERO,
        waiting_since: None,
        timer: None,
    }
    .boxed_unsync()
}

/// Whether a body failed because its client sent it too slowly.
pub fn too_slow(e: &BodyError) -> bool {
    matches!(e, BodyError::ConnectionReadTimeout)
}

/// The client-facing words for a body that came too slowly.
pub fn too_slow_message(rate: MinRate) -> String {
    format!(
        "the request body arrived slower than {} bytes/s (after {} ms of grace); send it faster",
        rate.bytes_per_s,
        rate.grace.as_millis()
    )
}

struct Paced<B> {
    inner: B,
    rate: MinRate,
    received: u64,
    /// Time readers spent waiting, over the waits that ended.
    waited: Duration,
    /// When the wait in progress began.
    waiting_since: Option<Instant>,
    /// Fires when the wait in progress has used up the allowance (made on the first wait).
    timer: Option<Pin<Box<Sleep>>>,
}

impl<B> HttpBody for Paced<B>
where
    B: HttpBody<Data = Bytes, Error = BodyError> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(since) = this.waiting_since.take() {
                    this.waited += since.elapsed();
                }
                if let Some(Ok(f)) = &frame
                    && let Some(data) = f.data_ref()
                {
                    this.received += data.len() as u64;
                }
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let now = Instant::now();
                let since = *this.waiting_since.get_or_insert(now);
                let left = this
                    .rate
                    .allowance(this.received)
                    .saturating_sub(this.waited);
                let deadline = since + left;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Some(Err(BodyError::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body fed by hand through a channel, with a floor of 1000 bytes/s after 50 ms.
    fn channel_body() -> (
        futures::channel::mpsc::UnboundedSender<Result<Frame<Bytes>, BodyError>>,
        Paced<Body>,
    ) {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let inner = http_body_util::StreamBody::new(rx).boxed_unsync();
        let rate = MinRate {
            bytes_per_s: 1000,
            grace: Duration::from_millis(50),
        };
        let body = Paced {
            inner,
            rate,
            received: 0,
            waited: Duration::ZERO,
            waiting_since: None,
            timer: None,
        };
        (tx, body)
    }

    fn data(n: usize) -> Result<Frame<Bytes>, BodyError> {
        Ok(Frame::data(Bytes::from(vec![0u8; n])))
    }

    #[tokio::test]
    async fn a_trickle_fails_once_the_wait_outgrows_what_arrived() {
        let (tx, mut body) = channel_body();
        // 50 ms of grace + 1 s per 1000 bytes: 100 bytes buy 100 ms more.
        tx.unbounded_send(data(100)).unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        let started = Instant::now();
        let failed = body.frame().await.unwrap().unwrap_err();
        assert!(too_slow(&failed), "{failed}");
        let took = started.elapsed();
        assert!(
            (Duration::from_millis(150)..Duration::from_secs(2)).contains(&took),
            "{took:?}"
        );
        let msg = too_slow_message(body.rate);
        assert!(
            msg.contains("1000 bytes/s") && msg.contains("50 ms"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn a_steady_sender_and_an_unread_body_are_never_cut_off() {
        let (tx, mut body) = channel_body();
        let feeder = tokio::spawn(async move {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                tx.unbounded_send(data(100)).unwrap();
            }
        });
        // 100 bytes every 20 ms: five times the floor, for 400 ms (past the grace).
        let mut got = 0;
        for _ in 0..20 {
            let frame = body
                .frame()
                .await
                .unwrap()
                .expect("a steady sender is served");
            got += frame.into_data().map_or(0, |d| d.len());
        }
        assert_eq!(got, 2000);
        feeder.await.unwrap();

        // Nobody reading for a while is not the client's fault.
        let (tx, mut body) = channel_body();
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.unbounded_send(data(10)).unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        drop(tx);
        assert!(body.frame().await.is_none(), "the end comes through");
    }
}
