//! The guard on every stored change of a rollout, the same on both backends: each change
//! says what it expects of the function's stored rollout ([`Expect`]), the transaction
//! reads that row (locked) and refuses with [`RolloutMoved`] when it is not so, and a
//! rollout written moves its epoch. A node that decided on an older state (a driver paused
//! or cut off while another took its lease over, a node whose memory is a moment behind)
//! can therefore never write over a newer one.

use crate::deploy::Rollout;

/// What a change expects of its function's stored rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Nothing (an alias's policy, which no rollout owns).
    Anything,
    /// No rollout running or paused: a hand-made change of the main policy, a rollout's
    /// start.
    NoActiveRollout,
    /// The active rollout, at this epoch: a step, a pause, a resume, an abort, each decided
    /// on that state.
    Epoch(u64),
}

/// A change refused because the function's rollout is not what the change was decided on.
#[derive(Debug, thiserror::Error)]
#[error("the rollout of {function:?} changed meanwhile (on another node, or by another request)")]
pub struct RolloutMoved {
    pub function: String,
    /// The rollout in progress now, if any.
    pub now: Option<Box<Rollout>>,
    /// The stored rollout's epoch now (0: none was ever stored).
    pub epoch: u64,
}

/// A function's `rollouts` row as a change reads it: active, epoch, JSON, driver.
pub(super) type RolloutRow = (bool, i64, String, Option<String>);

/// A stored rollout with the columns that are the truth about it put in.
pub(super) fn decode(json: &str, epoch: i64, driver: Option<String>) -> Option<Rollout> {
    match serde_json::from_str::<Rollout>(json) {
        Ok(mut r) => {
            r.epoch = epoch.max(0) as u64;
            r.driver = driver;
            Some(r)
        }
        Err(e) => {
            tracing::error!("stored rollout unreadable: {e}: {json}");
            None
        }
    }
}

/// Checks `expect` against the row read; returns the stored epoch (0 without a row).
pub(super) fn check(
    function: &str,
    expect: Expect,
    row: Option<&RolloutRow>,
) -> Result<i64, RolloutMoved> {
    let active = row.filter(|r| r.0);
    let ok = match expect {
        Expect::Anything => true,
        Expect::NoActiveRollout => active.is_none(),
        Expect::Epoch(e) => active.is_some_and(|r| r.1 == e as i64),
    };
    match ok {
        true => Ok(row.map_or(0, |r| r.1)),
        false => Err(RolloutMoved {
            function: function.to_string(),
            epoch: row.map_or(0, |r| r.1.max(0) as u64),
            now: active
                .and_then(|(_, epoch, json, driver)| decode(json, *epoch, driver.clone()))
                .map(Box::new),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_decided_on_another_state_is_refused() {
        let running = (true, 4, "{}".to_string(), None);
        let ended = (false, 5, "{}".to_string(), None);
        assert_eq!(check("f", Expect::Anything, Some(&running)).ok(), Some(4));
        assert_eq!(check("f", Expect::Epoch(4), Some(&running)).ok(), Some(4));
        assert!(check("f", Expect::Epoch(3), Some(&running)).is_err());
        assert!(check("f", Expect::Epoch(5), Some(&ended)).is_err());
        assert!(check("f", Expect::Epoch(1), None).is_err());
        assert!(check("f", Expect::NoActiveRollout, Some(&running)).is_err());
        assert_eq!(
            check("f", Expect::NoActiveRollout, Some(&ended)).ok(),
            Some(5)
        );
        assert_eq!(check("f", Expect::NoActiveRollout, None).ok(), Some(0));
    }
}
