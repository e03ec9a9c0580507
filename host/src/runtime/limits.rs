//! Validation of a version's [`Limits`] against the server's ceilings.

use crate::common::{LimitError, Limits};
use crate::config::RuntimeConfig;

impl Limits {
    /// Checks each limit is at least 1 and within the server's ceiling.
    pub fn check(&self, rt: &RuntimeConfig) -> Result<(), LimitError> {
        let checks = [
            ("timeout_ms", self.timeout_ms, rt.max_timeout_ms),
            ("memory_mb", self.memory_mb, rt.max_memory_mb),
            (
                "max_concurrency",
                u64::from(self.max_concurrency),
                u64::from(rt.max_instances),
            ),
        ];
        for (name, value, max) in checks {
            if value == 0 || value > max {
                return Err(LimitError { name, value, max });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_zero_or_over_ceiling_are_rejected() {
        let rt = RuntimeConfig::default();
        assert!(Limits::default().check(&rt).is_ok());
        let zero = Limits {
            timeout_ms: 0,
            ..Limits::default()
        };
        assert_eq!(zero.check(&rt).map_err(|e| e.name), Err("timeout_ms"));
        let big = Limits {
            memory_mb: rt.max_memory_mb + 1,
            ..Limits::default()
        };
        assert_eq!(big.check(&rt).map_err(|e| e.name), Err("memory_mb"));
    }
}
