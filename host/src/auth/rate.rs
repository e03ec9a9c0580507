//! Rate limits, enforced with GCRA (`governor`): a bucket of N requests that refills
//! evenly over the period, so bursts up to N pass and a steady stream above the rate is
//! refused with the time until the next request would pass.

use std::time::Duration;

use governor::{Quota, RateLimiter};

use crate::common::Rate;

/// One budget of requests (a key's or a function's).
#[derive(Debug)]
pub struct Limiter {
    rate: Rate,
    inner: governor::DefaultDirectRateLimiter,
}

impl Limiter {
    /// A full bucket for `rate`.
    pub fn new(rate: Rate) -> Self {
        let per_cell = rate.period.duration() / rate.count.get();
        let quota = Quota::with_period(per_cell.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(rate.count))
            .allow_burst(rate.count);
        Limiter {
            rate,
            inner: RateLimiter::direct(quota),
        }
    }

    /// The rate it enforces.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes one request from the budget, or says how long until one would pass.
    pub fn check(&self) -> Result<(), Duration> {
        self.inner.check().map_err(|not_until| {
            not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rest_wait() {
        let l = Limiter::new("5/m".parse().unwrap_or_else(|e| panic!("{e}")));
        for _ in 0..5 {
            assert!(l.check().is_ok());
        }
        let wait = l.check().expect_err("the sixth in a minute is refused");
        assert!(
            wait > Duration::from_secs(5) && wait <= Duration::from_secs(12),
            "{wait:?}"
        );
    }
}
