//! How an invocation ended: the one definition that `/metrics`, the version's recent
//! statistics, rollout gates and the usage ledger all use.

/// How an invocation ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The guest answered (any status it chose).
    Ok,
    /// The guest answered with an error instead of a response, or with none.
    GuestError,
    /// Past `timeout_ms` (504).
    Timeout,
    /// Trapped: panic, out of memory, stack overflow (500).
    Trap,
    /// Refused before running: concurrency and queue full (503) or body too large (413).
    Rejected,
    /// The client went away before the answer was ready.
    Cancelled,
}

impl Outcome {
    /// Every outcome, in the order of the enum.
    pub const ALL: [Outcome; 6] = [
        Outcome::Ok,
        Outcome::GuestError,
        Outcome::Timeout,
        Outcome::Trap,
        Outcome::Rejected,
        Outcome::Cancelled,
    ];

    /// The label value (also the ledger's `outcome` column).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::GuestError => "guest_error",
            Outcome::Timeout => "timeout",
            Outcome::Trap => "trap",
            Outcome::Rejected => "rejected",
            Outcome::Cancelled => "cancelled",
        }
    }

    /// The outcome named `s` (as [`Outcome::as_str`] writes it).
    pub fn parse(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }
}
