//! Per-version admission: at most `max_concurrency` requests run at once, at most
//! `queue_depth` more wait (each no longer than the version's timeout), and the rest are
//! refused at once. Memory use stays bounded under any load.
//!
//! A version whose last [`SHED_AFTER_TIMEOUTS`] requests all timed out sheds load early:
//! with every slot busy it queues nothing and answers a fast 503, since a request queued
//! behind requests that time out would only time out later. Requests that find a free slot
//! still run, and the first one that does not time out ends the shedding.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// Consecutive timed-out requests after which a busy version queues no more.
pub const SHED_AFTER_TIMEOUTS: u32 = 3;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The admission gate of one version.
#[derive(Debug)]
pub struct Admission {
    permits: Arc<Semaphore>,
    max_concurrency: u32,
    waiting: AtomicU32,
    queue_depth: u32,
    /// Requests that timed out in a row (reset by any that did not).
    timeouts: AtomicU32,
}

/// A running request's slot; released when dropped (after the response body ends).
#[derive(Debug)]
pub struct Admitted(#[allow(dead_code)] OwnedSemaphorePermit);

/// Why a request was not admitted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejected {
    #[error("the function is at its concurrency limit of {0} and its queue is full")]
    QueueFull(u32),
    #[error("the function stayed at its concurrency limit of {0} for the whole wait")]
    WaitTimedOut(u32),
    #[error(
        "the function's last {0} requests timed out: while it is at its concurrency limit, requests are refused at once rather than queued behind them"
    )]
    Shedding(u32),
}

impl Admission {
    /// A gate for `max_concurrency` running requests and `queue_depth` waiting ones.
    pub fn new(max_concurrency: u32, queue_depth: u32) -> Self {
        Admission {
            permits: Arc::new(Semaphore::new(max_concurrency as usize)),
            max_concurrency,
            waiting: AtomicU32::new(0),
            queue_depth,
            timeouts: AtomicU32::new(0),
        }
    }

    /// Notes how a request that ran ended: timed out, or not.
    pub fn observe(&self, timed_out: bool) {
        if timed_out {
            let _ = self
                .timeouts
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_add(1));
        } else if self.timeouts.load(Ordering::Acquire) != 0 {
            self.timeouts.store(0, Ordering::Release);
        }
    }

    /// Whether the version is shedding load (its recent requests all timed out).
    pub fn shedding(&self) -> bool {
        self.timeouts.load(Ordering::Acquire) >= SHED_AFTER_TIMEOUTS
    }

    /// Admits a request only if a slot is free now (a shadow copy never waits).
    pub fn try_admit(&self) -> Result<Admitted, Rejected> {
        self.permits
            .clone()
            .try_acquire_owned()
            .map(Admitted)
            .map_err(|_| Rejected::QueueFull(self.max_concurrency))
    }

    /// Admits a request now, or after a bounded wait, or refuses it.
    pub async fn admit(&self, max_wait: Duration) -> Result<Admitted, Rejected> {
        let max_concurrency = self.max_concurrency;
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            return Ok(Admitted(p));
        }
        if self.shedding() {
            return Err(Rejected::Shedding(self.timeouts.load(Ordering::Acquire)));
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue_depth {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Rejected::QueueFull(max_concurrency));
        }
        let waited = tokio::time::timeout(max_wait, self.permits.clone().acquire_owned()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match waited {
            Ok(Ok(p)) => Ok(Admitted(p)),
            _ => Err(Rejected::WaitTimedOut(max_concurrency)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admission_queues_then_refuses() {
        let gate = Admission::new(1, 1);
        let first = gate.admit(Duration::from_millis(10)).await.expect("first");
        // One waiter fits in the queue but times out; with it waiting, a third is refused.
        let (second, third) = tokio::join!(gate.admit(Duration::from_millis(50)), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            gate.admit(Duration::from_millis(50)).await
        });
        assert_eq!(second.err(), Some(Rejected::WaitTimedOut(1)));
        assert_eq!(third.err(), Some(Rejected::QueueFull(1)));
        drop(first);
        assert!(gate.admit(Duration::from_millis(10)).await.is_ok());
    }

    #[tokio::test]
    async fn a_version_whose_requests_keep_timing_out_stops_queueing() {
        let gate = Admission::new(1, 4);
        for _ in 0..SHED_AFTER_TIMEOUTS - 1 {
            gate.observe(true);
        }
        let busy = gate
            .admit(Duration::from_millis(10))
            .await
            .expect("a free slot");
        // Not yet shedding: a request waits its turn (and here times out waiting).
        let waited = gate.admit(Duration::from_millis(20)).await;
        assert_eq!(waited.err(), Some(Rejected::WaitTimedOut(1)));
        gate.observe(true);
        assert!(gate.shedding());
        let started = std::time::Instant::now();
        let shed = gate.admit(Duration::from_secs(5)).await;
        assert_eq!(shed.err(), Some(Rejected::Shedding(SHED_AFTER_TIMEOUTS)));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused at once"
        );
        // A free slot still admits (that is how the version shows it recovered).
        drop(busy);
        let probe = gate
            .admit(Duration::from_millis(10))
            .await
            .expect("free slot");
        gate.observe(false);
        assert!(!gate.shedding());
        let queued = gate.admit(Duration::from_millis(20)).await;
        assert_eq!(
            queued.err(),
            Some(Rejected::WaitTimedOut(1)),
            "queues again"
        );
        drop(probe);
    }
}
