//! Versions and routing: the in-memory registry of functions and their versions that the
//! data plane reads without touching SQLite, and per-version admission (concurrency cap with
//! a short bounded queue), traffic policies (weighted, sticky, shadowed) and progressive
//! rollouts with their health gates.

mod admission;
mod registry;
pub mod rollout;
pub mod traffic;
pub mod variables;

pub use admission::{Admission, Admitted, Rejected};
pub use registry::{DEFAULT_ALIAS, FunctionEntry, Registry, RouteError, VersionEntry};
pub use rollout::{Gates, Phase, Rollout, RolloutRequest};
pub use traffic::{Routing, Shadow, StickySecret, TrafficPolicy};

/// Checks a function name: 1-63 characters of `a-z`, `0-9`, `-`, `_`, starting with a
/// letter or digit. `@` and `:` stay free to pin versions and name aliases in URLs.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid function name {:?}: use 1-63 characters of a-z, 0-9, '-' and '_', starting with a letter or digit",
            name.chars().take(80).collect::<String>()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::validate_name;

    #[test]
    fn function_names_are_validated() {
        for ok in ["hello", "a", "digits-v2", "x_1", "9lives"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Hello", "a@1", "a:b", "-x", "a/b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
