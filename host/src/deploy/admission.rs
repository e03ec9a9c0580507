//! Per-version admission: at most `max_concurrency` requests run at once, at most
//! `queue_depth` more wait (each no longer than the version's timeout), and the rest are
//! refused at once. Memory use stays bounded under any load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The admission gate of one version.
#[derive(Debug)]
pub struct Admission {
    permits: Arc<Semaphore>,
    max_concurrency: u32,
    waiting: AtomicU32,
    queue_depth: u32,
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
}

impl Admission {
    /// A gate for `max_concurrency` running requests and `queue_depth` waiting ones.
    pub fn new(max_concurrency: u32, queue_depth: u32) -> Self {
        Admission {
            permits: Arc::new(Semaphore::new(max_concurrency as usize)),
            max_concurrency,
            waiting: AtomicU32::new(0),
            queue_depth,
        }
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
}
