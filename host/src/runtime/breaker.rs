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
//! state and openings are reported through [`BreakerEvents`] (the metrics, in practice),
//! in the order they happen (reported under the lock that changes them).
//!
//! What a guest can make them hold is bounded: only destinations that failed are tracked,
//! at most [`MAX_DESTINATIONS`] per function (a closed one makes room for a newcomer; with
//! every one open, a new destination goes untracked), and a deleted function's breakers go
//! with it, even while calls it made are still finishing.

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

/// Destinations tracked per function at most.
pub const MAX_DESTINATIONS: usize = 64;

/// Where a breaker's changes are reported.
pub trait BreakerEvents: Send + Sync {
    /// The breaker of `function` → `destination` is now `state` (`opened`: it just
    /// opened, from closed or half-open).
    fn changed(&self, function: &str, destination: &str, state: BreakerState, opened: bool);
    /// The breaker of `function` → `destination` is no longer tracked (it was closed and
    /// another destination needed its place).
    fn removed(&self, function: &str, destination: &str);
}

/// Reports nothing.
struct Silent;

impl BreakerEvents for Silent {
    fn changed(&self, _: &str, _: &str, _: BreakerState, _: bool) {}
    fn removed(&self, _: &str, _: &str) {}
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
    /// Its last failure or change, to pick which closed breaker makes room.
    touched: Instant,
}

/// The breakers of one function, by destination.
#[derive(Debug, Default)]
struct Destinations {
    /// The function was deleted: calls still finishing change nothing.
    gone: bool,
    map: HashMap<String, Breaker>,
}

type Shared = Arc<Mutex<Destinations>>;

/// Every breaker of this node.
pub struct Breakers {
    /// Consecutive failures that open a breaker (0: breakers off).
    failures: u32,
    cooldown: Duration,
    all: Mutex<HashMap<Arc<str>, Shared>>,
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
    /// The function's breakers (none while breakers are off).
    destinations: Option<Shared>,
    function: Arc<str>,
    destination: String,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Shared>> {
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
        let mut permit = Permit {
            breakers: self.clone(),
            destinations: None,
            function: function.clone(),
            destination: destination.to_string(),
            trial: false,
            reported: false,
        };
        if self.failures == 0 {
            return Ok(permit);
        }
        // A function's breakers are made by its first failure (in `report`), so calls of
        // a function that never fails, or that was deleted, add nothing here.
        let Some(shared) = self.lock().get(function).cloned() else {
            return Ok(permit);
        };
        permit.destinations = Some(shared.clone());
        let mut d = lock(&shared);
        let Some(b) = d.map.get_mut(destination) else {
            return Ok(permit);
        };
        let now = Instant::now();
        match b.state {
            BreakerState::Closed => Ok(permit),
            BreakerState::Open if now >= b.until => {
                b.state = BreakerState::HalfOpen;
                b.touched = now;
                self.events
                    .changed(function, destination, BreakerState::HalfOpen, false);
                permit.trial = true;
                Ok(permit)
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

    fn report(&self, p: &Permit, ok: Option<bool>) {
        let shared = match &p.destinations {
            Some(shared) => shared.clone(),
            None if ok == Some(false) && self.failures > 0 => {
                self.lock().entry(p.function.clone()).or_default().clone()
            }
            None => return,
        };
        let mut d = lock(&shared);
        if d.gone {
            return;
        }
        let now = Instant::now();
        if !d.map.contains_key(&p.destination) {
            // Only a failure starts tracking a destination.
            if ok != Some(false) || !self.make_room(&p.function, &mut d) {
                return;
            }
            d.map.insert(
                p.destination.clone(),
                Breaker {
                    state: BreakerState::Closed,
                    failures: 0,
                    until: now,
                    reported: false,
                    touched: now,
                },
            );
        }
        let Some(b) = d.map.get_mut(&p.destination) else {
            return;
        };
        let before = b.state;
        match ok {
            // Abandoned: a trial that never finished lets the next call try.
            None if p.trial && b.state == BreakerState::HalfOpen => {
                b.state = BreakerState::Open;
                b.until = now;
            }
            None => {}
            Some(true) => {
                b.state = BreakerState::Closed;
                b.failures = 0;
            }
            Some(false) if p.trial || b.state == BreakerState::HalfOpen => {
                b.state = BreakerState::Open;
                b.until = now + self.cooldown;
            }
            Some(false) => {
                b.failures += 1;
                b.touched = now;
                if b.state == BreakerState::Closed && b.failures >= self.failures {
                    b.state = BreakerState::Open;
                    b.until = now + self.cooldown;
                }
            }
        }
        let after = b.state;
        b.reported |= after != before;
        if after != before {
            b.touched = now;
            let opened = after == BreakerState::Open && ok == Some(false);
            self.events
                .changed(&p.function, &p.destination, after, opened);
        }
        // A destination that never troubled the function is not kept: the map holds only
        // those that failed (and whose series the metrics show).
        if after == BreakerState::Closed && b.failures == 0 && !b.reported {
            d.map.remove(&p.destination);
        }
    }

    /// Makes room for one more destination of `function`: at the cap, the closed breaker
    /// least recently troubled goes. `false` when every tracked breaker is open.
    fn make_room(&self, function: &str, d: &mut Destinations) -> bool {
        if d.map.len() < MAX_DESTINATIONS {
            return true;
        }
        let Some(victim) = d
            .map
            .iter()
            .filter(|(_, b)| b.state == BreakerState::Closed)
            .min_by_key(|(_, b)| b.touched)
            .map(|(dest, _)| dest.clone())
        else {
            return false;
        };
        if let Some(b) = d.map.remove(&victim)
            && b.reported
        {
            self.events.removed(function, &victim);
        }
        true
    }

    /// The state of `function`'s breaker for `destination`.
    pub fn state(&self, function: &str, destination: &str) -> BreakerState {
        let Some(shared) = self.lock().get(function).cloned() else {
            return BreakerState::Closed;
        };
        lock(&shared)
            .map
            .get(destination)
            .map_or(BreakerState::Closed, |b| b.state)
    }

    /// Drops every breaker of `function` (deleted); returns their destinations. Calls it
    /// made that finish later change nothing.
    pub fn forget(&self, function: &str) -> Vec<String> {
        let Some(shared) = self.lock().remove(function) else {
            return Vec::new();
        };
        let mut d = lock(&shared);
        d.gone = true;
        d.map.drain().map(|(dest, _)| dest).collect()
    }
}

fn lock(d: &Shared) -> std::sync::MutexGuard<'_, Destinations> {
    // As above: every update leaves the map consistent.
    d.lock().unwrap_or_else(|p| p.into_inner())
}

impl Permit {
    /// Reports the call: `ok` when an answer came that was not a 5xx.
    pub fn done(mut self, ok: bool) {
        self.reported = true;
        self.breakers.report(&self, Some(ok));
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.reported {
            self.breakers.report(self, None);
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
        fn removed(&self, _: &str, _: &str) {}
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

    #[derive(Default)]
    struct Removed(Mutex<Vec<String>>);

    impl BreakerEvents for Arc<Removed> {
        fn changed(&self, _: &str, _: &str, _: BreakerState, _: bool) {}
        fn removed(&self, _: &str, destination: &str) {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(destination.to_string());
        }
    }

    #[test]
    fn a_guest_calling_endless_new_destinations_holds_a_bounded_number_of_breakers() {
        let removed = Arc::new(Removed::default());
        let b = Arc::new(Breakers::new(
            1,
            Duration::from_secs(60),
            Box::new(removed.clone()),
        ));
        let f: Arc<str> = "f".into();
        let tracked = |b: &Breakers| lock(&b.lock()[&f]).map.len();
        // Every one opens at its first failure: the cap is reached with all of them open.
        for i in 0..MAX_DESTINATIONS {
            b.admit(&f, &format!("h{i}:80")).expect("new").done(false);
        }
        assert_eq!(tracked(&b), MAX_DESTINATIONS);
        b.admit(&f, "extra:80").expect("new").done(false);
        assert_eq!(
            tracked(&b),
            MAX_DESTINATIONS,
            "all open: the newcomer goes untracked"
        );
        assert_eq!(b.state("f", "extra:80"), BreakerState::Closed);
        assert_eq!(
            b.state("f", "h0:80"),
            BreakerState::Open,
            "open ones are kept"
        );
        // A closed one makes room, the least recently troubled first; one that had
        // changed state (it has series) is reported gone.
        let b2 = Arc::new(Breakers::new(2, Duration::ZERO, Box::new(removed.clone())));
        b2.admit(&f, "r:80").expect("closed").done(false);
        b2.admit(&f, "r:80").expect("closed").done(false);
        b2.admit(&f, "r:80").expect("trial").done(true);
        assert_eq!(b2.state("f", "r:80"), BreakerState::Closed);
        for i in 0..MAX_DESTINATIONS + 100 {
            b2.admit(&f, &format!("n{i}:80"))
                .expect("closed")
                .done(false);
        }
        let held = lock(&b2.lock()[&f]).map.keys().cloned().collect::<Vec<_>>();
        assert_eq!(held.len(), MAX_DESTINATIONS);
        assert!(
            held.contains(&format!("n{}:80", MAX_DESTINATIONS + 99)),
            "{held:?}"
        );
        assert!(!held.contains(&"n0:80".to_string()) && !held.contains(&"r:80".to_string()));
        assert_eq!(
            *removed.0.lock().unwrap_or_else(|p| p.into_inner()),
            ["r:80"],
            "only the breaker with series is reported gone"
        );
    }

    #[test]
    fn calls_finishing_after_their_function_was_deleted_change_nothing() {
        let b = Arc::new(Breakers::new(1, Duration::from_secs(60), Box::new(Silent)));
        let f: Arc<str> = "f".into();
        b.admit(&f, "up:80").expect("closed").done(false);
        let late = b.admit(&f, "other:80").expect("closed");
        assert_eq!(b.forget("f"), ["up:80"]);
        late.done(false);
        assert!(b.forget("f").is_empty(), "nothing was made again");
        assert_eq!(b.state("f", "other:80"), BreakerState::Closed);
        // Calls that succeed keep nothing: a deleted (or healthy) function has no entry.
        b.admit(&f, "up:80").expect("closed").done(true);
        assert!(
            b.lock().get("f").is_none(),
            "an entry for a deleted function"
        );
        // A failure still starts tracking (the name may be deployed again).
        b.admit(&f, "up:80").expect("closed").done(false);
        assert_eq!(b.state("f", "up:80"), BreakerState::Open);
    }
}
