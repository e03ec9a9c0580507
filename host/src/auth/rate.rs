//! Rate limits, enforced with GCRA (`governor`): a bucket of N requests that refills
//! evenly over the period, so bursts up to N pass and a steady stream above the rate is
//! refused with the time until the next request would pass.
//!
//! In a cluster each node enforces its share of every rate: `ceil(N / live nodes)`, the
//! live nodes counted at every heartbeat ([`Nodes`]). Behind a load balancer that spreads
//! requests evenly the cluster as a whole lets about N through; no request waits on another
//! node. A client whose requests all land on one node gets that node's share only. When
//! the number of nodes changes, each bucket starts again full at its new share.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{Quota, RateLimiter};

use crate::common::Rate;

/// How many nodes share every rate limit (1 on a single node).
#[derive(Debug, Clone)]
pub struct Nodes(Arc<AtomicUsize>);

impl Default for Nodes {
    fn default() -> Self {
        Nodes(Arc::new(AtomicUsize::new(1)))
    }
}

impl Nodes {
    /// The number of live nodes now (at least 1).
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed).max(1)
    }

    /// Sets the number of live nodes (at every heartbeat).
    pub fn set(&self, n: usize) {
        self.0.store(n.max(1), Ordering::Relaxed);
    }
}

/// One budget of requests (a key's or a function's).
#[derive(Debug)]
pub struct Limiter {
    rate: Rate,
    nodes: Nodes,
    /// The node count the bucket was made for, and the bucket.
    bucket: Mutex<(usize, governor::DefaultDirectRateLimiter)>,
}

/// A full bucket of `count` requests per `period`.
fn bucket(count: NonZeroU32, period: Duration) -> governor::DefaultDirectRateLimiter {
    let per_cell = period / count.get();
    let quota = Quota::with_period(per_cell.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(count))
        .allow_burst(count);
    RateLimiter::direct(quota)
}

impl Limiter {
    /// A full bucket for this node's share of `rate` among `nodes`.
    pub fn new(rate: Rate, nodes: &Nodes) -> Self {
        let n = nodes.get();
        Limiter {
            rate,
            nodes: nodes.clone(),
            bucket: Mutex::new((n, bucket(share(rate, n), rate.period.duration()))),
        }
    }

    /// The rate it enforces (over the cluster).
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes one request from this node's budget, or says how long until one would pass.
    pub fn check(&self) -> Result<(), Duration> {
        let n = self.nodes.get();
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        if b.0 != n {
            *b = (n, bucket(share(self.rate, n), self.rate.period.duration()));
        }
        b.1.check().map_err(|not_until| {
            not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ))
        })
    }
}

/// One node's share of `rate` among `nodes`: rounded up, so no node is left with none.
fn share(rate: Rate, nodes: usize) -> NonZeroU32 {
    let n = u32::try_from(nodes.max(1)).unwrap_or(u32::MAX);
    NonZeroU32::new(rate.count.get().div_ceil(n)).unwrap_or(NonZeroU32::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rest_wait() {
        let l = Limiter::new(
            "5/m".parse().unwrap_or_else(|e| panic!("{e}")),
            &Nodes::default(),
        );
        for _ in 0..5 {
            assert!(l.check().is_ok());
        }
        let wait = l.check().expect_err("the sixth in a minute is refused");
        assert!(
            wait > Duration::from_secs(5) && wait <= Duration::from_secs(12),
            "{wait:?}"
        );
    }

    #[test]
    fn each_node_enforces_its_share_of_the_rate_among_the_live_nodes() {
        let nodes = Nodes::default();
        let l = Limiter::new("10/m".parse().unwrap_or_else(|e| panic!("{e}")), &nodes);
        nodes.set(3);
        // ceil(10 / 3) = 4 on this node, from a fresh bucket.
        assert_eq!((0..10).filter(|_| l.check().is_ok()).count(), 4);
        nodes.set(1);
        assert_eq!((0..20).filter(|_| l.check().is_ok()).count(), 10);
        nodes.set(50);
        assert_eq!(
            (0..5).filter(|_| l.check().is_ok()).count(),
            1,
            "never none"
        );
    }
}
