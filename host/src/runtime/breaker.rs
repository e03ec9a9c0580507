//! Circuit breakers on guests' outbound HTTP, one per (function, destination): after
//! `failures` consecutive failed calls (no connection, a timeout, a 5xx answer) the breaker
//! opens and every call to that destination fails at once in the guest, with an error that
//! names the breaker, instead of waiting out its timeout against a host that is down. After
//! `cooldown` one call is let through (half-open): its success closes the breaker, its
//! failure opens it for another cooldown. A spike of traffic to a function whose upstream
//! died thus costs the server no held sockets and no instances parked on timeouts.
//!
//! Breakers are per node (each node learns an upstream's health from its own calls) and
//! per function (one tenant's broken upstream never fails another's calls to it). Their
//! state and openings are reported through [`BreakerEvents`] (the metrics, in practice).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a breaker is doing (`kiln_outbound_breaker_state`: 0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed = 0,
    /// Calls fail at once.
    Open = 1,
    /// One trial call is out; the others fail at once.
    HalfOpen = 2,
}

/// Where a breaker's changes are reported.
pub trait BreakerEvents: Send + Sync {
    /// The breaker of `function` → `destination` is now `state` (`opened`: it just
    /// opened, from closed or half-open).
    fn changed(&self, function: &str, destination: &str, state: BreakerState, opened: bool);
}

/// Reports nothing.
struct Silent;

impl BreakerEvents for Silent {
    fn changed(&self, _: &str, _: &str, _: BreakerState, _: bool) {}
}

#[derive(Debug)]
struct Breaker {
    state: BreakerState,
    /// Consecutive failures while closed.
    failures: u32,
    /// While open: when the next trial call may go.
    until: Instant,
    /// It has changed state (so it has metric series, kept until [`Breakers::forget`]).
    reported: bool,
}

/// Every breaker of this node.
pub struct Breakers {
    /// Consecutive failures that open a breaker (0: breakers off).
    failures: u32,
    cooldown: Duration,
    all: Mutex<HashMap<(Arc<str>, String), Breaker>>,
    events: Box<dyn BreakerEvents>,
}

impl std::fmt::Debug for Breakers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breakers")
            .field("failures", &self.failures)
            .field("cooldown", &self.cooldown)
            .finish_non_exhaustive()
    }
}

/// A call let through: report how it went with [`Permit::done`]. Dropped without a
/// report (the guest gave up on it), it counts neither way, and a trial slot is freed.
pub struct Permit {
    breakers: Arc<Breakers>,
    key: (Arc<str>, String),
    trial: bool,
    reported: bool,
}

impl Breakers {
    /// Breakers opening after `failures` consecutive failures (0: off) for `cooldown`.
    pub fn new(failures: u32, cooldown: Duration, events: Box<dyn BreakerEvents>) -> Self {
        Breakers {
            failures,
            cooldown,
            all: Mutex::new(HashMap::new()),
            events,
        }
    }

    /// Breakers that never open (tests, tools).
    pub fn off() -> Arc<Self> {
        Arc::new(Breakers::new(0, Duration::ZERO, Box::new(Silent)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Arc<str>, String), Breaker>> {
        // Every update leaves the map consistent: a poisoned lock is safe to reuse.
        self.all.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets a call of `function` to `destination` (`host:port`) through, or refuses it
    /// with the error the guest sees.
    pub fn admit(
        self: &Arc<Self>,
        function: &Arc<str>,
        destination: &str,
    ) -> Result<Permit, String> {
        let key = (function.clone(), destination.to_string());
        let permit = |trial| Permit {
            breakers: self.clone(),
            key: key.clone(),
            trial,
            reported: false,
        };
        if self.failures == 0 {
            return Ok(permit(false));
        }
        let mut all = self.lock();
        let Some(b) = all.get_mut(&key) else {
            return Ok(permit(false));
        };
        let now = Instant::now();
        match b.state {
            BreakerState::Closed => Ok(permit(false)),
            BreakerState::Open if now >= b.until => {
                b.state = BreakerState::HalfOpen;
                drop(all);
                self.events
                    .changed(function, destination, BreakerState::HalfOpen, false);
                Ok(permit(true))
            }
            BreakerState::Open => Err(format!(
                "circuit breaker open for {destination} (function {function}): {} consecutive calls failed; calls fail at once for another {:.1}s",
                self.failures,
                (b.until - now).as_secs_f64()
            )),
            BreakerState::HalfOpen => Err(format!(
                "circuit breaker half-open for {destination} (function {function}): a trial call is out; others fail at once until it succeeds"
            )),
        }
    }

    fn report(&self, key: &(Arc<str>, String), trial: bool, ok: Option<bool>) {
        if self.failures == 0 {
            return;
        }
        let mut all = self.lock();
        let b = all.entry(key.clone()).or_insert(Breaker {
            state: BreakerState::Closed,
            failures: 0,
            until: Instant::now(),
            reported: false,
        });
        let before = b.state;
        match ok {
            // Abandoned: a trial that never finished lets the next call try.
            None if trial && b.state == BreakerState::HalfOpen => {
                b.state = BreakerState::Open;
                b.until = Instant::now();
            }
            None => {}
            Some(true) => {
                b.state = BreakerState::Closed;
                b.failures = 0;
            }
            Some(false) if trial || b.state == BreakerState::HalfOpen => {
                b.state = BreakerState::Open;
                b.until = Instant::now() + self.cooldown;
            }
            Some(false) => {
                b.failures += 1;
                if b.state == BreakerState::Closed && b.failures >= self.failures {
                    b.state = BreakerState::Open;
                    b.until = Instant::now() + self.cooldown;
                }
            }
        }
        let after = b.state;
        b.reported |= after != before;
        // A destination that never troubled the function is not kept: the map holds only
        // those that failed (and whose series the metrics show).
        if after == BreakerState::Closed && b.failures == 0 && !b.reported {
            all.remove(key);
        }
        drop(all);
        if after != before {
            let opened = after == BreakerState::Open && ok == Some(false);
            self.events.changed(&key.0, &key.1, after, opened);
        }
    }

    /// The state of `function`'s breaker for `destination`.
    pub fn state(&self, function: &str, destination: &str) -> BreakerState {
        self.lock()
            .get(&(Arc::from(function), destination.to_string()))
            .map_or(BreakerState::Closed, |b| b.state)
    }

    /// Drops every breaker of `function` (deleted); returns their destinations.
    pub fn forget(&self, function: &str) -> Vec<String> {
        let mut all = self.lock();
        let gone: Vec<_> = all
            .keys()
            .filter(|(f, _)| &**f == function)
            .cloned()
            .collect();
        for k in &gone {
            all.remove(k);
        }
        gone.into_iter().map(|(_, d)| d).collect()
    }
}

impl Permit {
    /// Reports the call: `ok` when an answer came that was not a 5xx.
    pub fn done(mut self, ok: bool) {
        self.reported = true;
        self.breakers.report(&self.key, self.trial, Some(ok));
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.reported {
            self.breakers.report(&self.key, self.trial, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Log(Mutex<Vec<(BreakerState, bool)>>);

    impl BreakerEvents for Arc<Log> {
        fn changed(&self, _: &str, _: &str, state: BreakerState, opened: bool) {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((state, opened));
        }
    }

    #[test]
    fn opens_after_consecutive_failures_fails_fast_then_half_opens_and_closes() {
        let log = Arc::new(Log::default());
        let b = Arc::new(Breakers::new(
            3,
            Duration::from_millis(50),
            Box::new(log.clone()),
        ));
        let f: Arc<str> = "f".into();
        let call = |ok: bool| b.admit(&f, "up:80").map(|p| p.done(ok));
        // A success in between resets the count.
        for ok in [false, false, true, false, false] {
            call(ok).expect("closed");
        }
        assert_eq!(b.state("f", "up:80"), BreakerState::Closed);
        call(false).expect("the third in a row");
        assert_eq!(b.state("f", "up:80"), BreakerState::Open);
        let e = b.admit(&f, "up:80").err().expect("open: fails fast");
        assert!(
            e.contains("circuit breaker open for up:80") && e.contains("function f"),
            "{e}"
        );
        // Another function's calls, and other destinations, are their own.
        assert!(b.admit(&"g".into(), "up:80").is_ok());
        assert!(b.admit(&f, "other:80").is_ok());

        std::thread::sleep(Duration::from_millis(60));
        let trial = b.admit(&f, "up:80").expect("half-open lets one through");
        assert!(b.admit(&f, "up:80").is_err(), "only one trial at a time");
        trial.done(false);
        assert_eq!(
            b.state("f", "up:80"),
            BreakerState::Open,
            "a failed trial reopens"
        );
        std::thread::sleep(Duration::from_millis(60));
        b.admit(&f, "up:80").expect("trial").done(true);
        assert_eq!(b.state("f", "up:80"), BreakerState::Closed);
        call(false).expect("closed again, counting from zero");
        let events = log.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        use BreakerState::*;
        assert_eq!(
            events,
            [
                (Open, true),
                (HalfOpen, false),
                (Open, true),
                (HalfOpen, false),
                (Closed, false)
            ]
        );
    }

    #[test]
    fn an_abandoned_trial_frees_the_slot_and_off_means_off() {
        let b = Arc::new(Breakers::new(
            1,
            Duration::from_millis(10),
            Box::new(Silent),
        ));
        let f: Arc<str> = "f".into();
        b.admit(&f, "up:80").expect("closed").done(false);
        std::thread::sleep(Duration::from_millis(20));
        drop(b.admit(&f, "up:80").expect("trial"));
        assert!(b.admit(&f, "up:80").is_ok(), "the next call tries instead");
        assert_eq!(b.forget("f"), ["up:80"]);
        let off = Breakers::off();
        for _ in 0..10 {
            off.admit(&f, "up:80").expect("off").done(false);
        }
        assert!(off.admit(&f, "up:80").is_ok());
    }
}
