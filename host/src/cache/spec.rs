//! [`CacheSpec`]: what a version asks of the caches (the manifest's `[cache]` table),
//! persisted with the version.
//!
//! ```toml
//! [cache]
//! inference = false                  # default true
//! responses = { ttl = "60s", max_entries = 1000, vary = ["accept"] }   # off unless given
//! ```

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A version's caching: inference results (on by default) and whole responses (opt-in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheSpec {
    /// Cache `wasi:nn` compute results of identical inputs.
    #[serde(default = "yes")]
    pub inference: bool,
    /// Cache whole 200 responses; `None`: every request runs the function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responses: Option<ResponsePolicy>,
}

fn yes() -> bool {
    true
}

impl Default for CacheSpec {
    fn default() -> Self {
        CacheSpec {
            inference: true,
            responses: None,
        }
    }
}

/// The `responses = { ... }` policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResponsePolicy {
    /// How long a stored response is served (`"60s"`, `"5m"`, `"1h 30m"`).
    pub ttl: Ttl,
    /// Most responses kept for one version (least recently used beyond).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_entries: Option<u64>,
    /// Request headers that are part of the key (lower-cased).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vary: Vec<String>,
}

/// Longest TTL accepted: a week.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A positive duration written the human way (`"60s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttl(pub Duration);

impl Ttl {
    /// Parses `"60s"`, `"500ms"`, `"2m 30s"`; between 1 ms and [`MAX_TTL`].
    pub fn parse(s: &str) -> Result<Ttl, String> {
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| format!("invalid ttl {s:?}: {e} (write e.g. \"60s\", \"5m\")"))?;
        if d < Duration::from_millis(1) || d > MAX_TTL {
            return Err(format!("ttl {s:?} must be between 1ms and 7 days"));
        }
        Ok(Ttl(d))
    }
}

impl Serialize for Ttl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl schemars::JsonSchema for Ttl {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Ttl".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration from 1ms to 7 days: \"60s\", \"500ms\", \"2m 30s\".",
            "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*[a-zµ]+(\s*[0-9]+(\.[0-9]+)?\s*[a-zµ]+)*\s*$"
        })
    }
}

impl<'de> Deserialize<'de> for Ttl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ttl::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl CacheSpec {
    /// Checks and normalizes the policy (header names lower-cased and valid, caps >= 1).
    pub fn validate(mut self) -> Result<CacheSpec, String> {
        if let Some(p) = &mut self.responses {
            if p.max_entries == Some(0) {
                return Err("cache.responses.max_entries must be at least 1".into());
            }
            for h in &mut p.vary {
                let name = http::HeaderName::from_bytes(h.trim().as_bytes())
                    .map_err(|_| format!("cache.responses.vary: {h:?} is not a header name"))?;
                *h = name.as_str().to_string();
            }
            p.vary.sort();
            p.vary.dedup();
        }
        Ok(self)
    }

    /// Reads the bare-upload query parameters `cache_ttl`, `cache_max_entries`,
    /// `cache_vary` (comma separated) and `inference_cache`; returns whether `key` was one.
    pub fn set_from_query(&mut self, key: &str, value: &str) -> Result<bool, String> {
        match key {
            "cache_ttl" => {
                self.policy_mut().ttl = Ttl::parse(value)?;
            }
            "cache_max_entries" => {
                let n = value
                    .parse()
                    .map_err(|_| format!("cache_max_entries={value:?} is not a whole number"))?;
                self.policy_mut().max_entries = Some(n);
            }
            "cache_vary" => {
                self.policy_mut().vary = value
                    .split(',')
                    .filter(|h| !h.is_empty())
                    .map(str::to_string)
                    .collect();
            }
            "inference_cache" => {
                self.inference = match value {
                    "true" | "on" | "1" => true,
                    "false" | "off" | "0" => false,
                    _ => return Err(format!("inference_cache={value:?}: use true or false")),
                };
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn policy_mut(&mut self) -> &mut ResponsePolicy {
        self.responses
            .get_or_insert_with(|| default_policy(Ttl(Duration::from_secs(60))))
    }
}

fn default_policy(ttl: Ttl) -> ResponsePolicy {
    ResponsePolicy {
        ttl,
        max_entries: None,
        vary: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_validates_and_round_trips() {
        let s: CacheSpec = toml::from_str(
            "inference = false\nresponses = { ttl = \"1m 30s\", max_entries = 10, vary = [\"X-User\", \"accept\"] }\n",
        )
        .expect("parse");
        let s = s.validate().expect("valid");
        let p = s.responses.as_ref().expect("responses");
        assert_eq!(p.ttl.0, Duration::from_secs(90));
        assert_eq!(p.vary, ["accept", "x-user"]);
        assert!(!s.inference);
        let json = serde_json::to_string(&s).expect("json");
        let back: CacheSpec = serde_json::from_str(&json).expect("back");
        assert_eq!(back, s);
        let d: CacheSpec = serde_json::from_str("{}").expect("default");
        assert_eq!(d, CacheSpec::default());
        assert!(toml::from_str::<CacheSpec>("responses = { ttl = \"soon\" }").is_err());
        assert!(toml::from_str::<CacheSpec>("responses = { ttl = \"0s\" }").is_err());
        assert!(toml::from_str::<CacheSpec>("bogus = 1").is_err());
    }

    #[test]
    fn query_parameters_turn_caching_on() {
        let mut s = CacheSpec::default();
        assert!(s.set_from_query("cache_ttl", "5s").expect("ttl"));
        assert!(s.set_from_query("cache_vary", "x-a,x-b").expect("vary"));
        assert!(
            s.set_from_query("inference_cache", "false")
                .expect("inference")
        );
        assert!(!s.set_from_query("timeout_ms", "5").expect("not ours"));
        assert!(s.set_from_query("cache_ttl", "later").is_err());
        let p = s.responses.expect("on");
        assert_eq!(
            (p.ttl.0, p.vary.len(), s.inference),
            (Duration::from_secs(5), 2, false)
        );
    }
}
