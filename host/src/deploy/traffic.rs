//! Traffic policies: which versions of a function serve its unpinned requests, in what
//! shares, and whether a request's key (a header) keeps it on one version.
//!
//! Weights are integers summing to 100. A request draws a point in `0..100` and lands on
//! the version whose cumulative range holds it: uniformly at random, or, with a sticky key,
//! at the point the key hashes to, so the same key always lands on the same version while
//! the weights are unchanged (and when they change, only the keys in the ranges that moved
//! change version). The key is hashed under a secret of the server's (shared by a
//! cluster's nodes) and the function's name, so a caller cannot compute which keys land on
//! a candidate, and one key lands independently in each function.
//!
//! A shadow version gets a copy of a share of the requests after the primary has answered;
//! its answer is compared with the primary's and thrown away.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderName};
use serde::{Deserialize, Serialize};

/// A function's traffic policy, as `PUT /v1/functions/{name}/traffic` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficPolicy {
    /// Version number to share of traffic, in percent; the shares sum to 100.
    pub weights: BTreeMap<u32, u8>,
    /// Keeps requests with the same key on the same version: `"header:x-user-id"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
    /// Copies a share of the requests to another version, for comparison only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
}

/// A version that gets copies of requests: `{"version": 5, "percent": 100}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shadow {
    pub version: u32,
    /// Share of the requests copied, 1 to 100.
    pub percent: u8,
}

impl FromStr for Shadow {
    type Err = String;

    /// `VERSION:PERCENT`, as the CLI takes it (`--shadow 5:100`).
    fn from_str(s: &str) -> Result<Self, String> {
        let (v, p) = s
            .split_once(':')
            .ok_or_else(|| format!("shadow {s:?}: write VERSION:PERCENT, e.g. 5:100"))?;
        Ok(Shadow {
            version: v
                .trim()
                .parse()
                .map_err(|_| format!("shadow {s:?}: {v:?} is not a version number"))?,
            percent: p
                .trim()
                .parse()
                .map_err(|_| format!("shadow {s:?}: {p:?} is not a percent"))?,
        })
    }
}

/// Where a request's sticky key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    Header(HeaderName),
}

impl FromStr for Sticky {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("header", name)) => HeaderName::from_bytes(name.trim().as_bytes())
                .map(Sticky::Header)
                .map_err(|_| format!("sticky {s:?}: {name:?} is not a header name")),
            _ => Err(format!("sticky {s:?}: use \"header:<name>\"")),
        }
    }
}

impl fmt::Display for Sticky {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sticky::Header(h) => write!(f, "header:{h}"),
        }
    }
}

impl Serialize for Sticky {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sticky {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl TrafficPolicy {
    /// Checks the policy against the function's versions: known versions only, shares
    /// summing to exactly 100, at least one version with traffic.
    pub fn validate(&self, versions: &BTreeSet<u32>) -> Result<(), String> {
        if self.weights.is_empty() {
            return Err("weights: name at least one version".into());
        }
        let unknown: Vec<String> = self
            .weights
            .keys()
            .filter(|v| !versions.contains(v))
            .map(ToString::to_string)
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "weights name versions that do not exist: {} (versions: {})",
                unknown.join(", "),
                versions
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let sum: u32 = self.weights.values().map(|w| u32::from(*w)).sum();
        if sum != 100 {
            return Err(format!("weights sum to {sum}, not 100"));
        }
        if let Some(s) = &self.shadow {
            if !versions.contains(&s.version) {
                return Err(format!(
                    "shadow names version {}, which does not exist",
                    s.version
                ));
            }
            if !(1..=100).contains(&s.percent) {
                return Err(format!("shadow percent {} is not from 1 to 100", s.percent));
            }
        }
        Ok(())
    }
}

/// A validated policy, ready to route: cumulative ranges over `0..100`.
#[derive(Debug, Clone)]
pub struct Routing {
    pub policy: TrafficPolicy,
    /// Bumped by every change: what `PUT` answers and history records.
    pub revision: u64,
    /// (upper bound, exclusive, of the range; version), ascending.
    ranges: Vec<(u32, u32)>,
}

/// The secret sticky keys are hashed under (the store's `sticky` secret): without it, the
/// keys that land on a version cannot be computed.
#[derive(Clone)]
pub struct StickySecret([u8; 32]);

impl fmt::Debug for StickySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StickySecret(..)")
    }
}

impl StickySecret {
    /// The secret of these bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        StickySecret(bytes)
    }

    /// Where `key` lands in `function`'s policy: a keyed BLAKE3 of the (length-prefixed)
    /// name and the key.
    fn point(&self, function: &str, key: &[u8]) -> u64 {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(&(function.len() as u64).to_le_bytes());
        h.update(function.as_bytes());
        h.update(key);
        let mut first = [0u8; 8];
        first.copy_from_slice(&h.finalize().as_bytes()[..8]);
        u64::from_le_bytes(first)
    }
}

/// Draws for requests without a sticky key.
static DRAWS: AtomicU64 = AtomicU64::new(0);

/// SplitMix64: a good 64-bit mix of a counter (or a hash) into a uniform value.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Routing {
    /// Builds the ranges of a validated policy.
    pub fn new(policy: TrafficPolicy, revision: u64) -> Self {
        let mut upper = 0;
        let ranges = policy
            .weights
            .iter()
            .filter(|(_, w)| **w > 0)
            .map(|(v, w)| {
                upper += u32::from(*w);
                (upper, *v)
            })
            .collect();
        Routing {
            policy,
            revision,
            ranges,
        }
    }

    /// The versions this policy sends traffic (or copies) to.
    pub fn targets(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges
            .iter()
            .map(|(_, v)| *v)
            .chain(self.policy.shadow.map(|s| s.version))
    }

    /// Whether this policy sends `version` a share of its requests (a shadow version gets
    /// copies only: not routed).
    pub fn routes(&self, version: u32) -> bool {
        self.ranges.iter().any(|(_, v)| *v == version)
    }

    /// The version a request to `function` with `headers` goes to.
    pub fn pick(&self, function: &str, headers: &HeaderMap, secret: &StickySecret) -> u32 {
        let key = match &self.policy.sticky {
            Some(Sticky::Header(name)) => headers.get(name).map(|v| v.as_bytes()),
            None => None,
        };
        let draw = match key {
            // Keyed: the same key, the same point.
            Some(k) => secret.point(function, k),
            None => mix(DRAWS.fetch_add(1, Ordering::Relaxed) ^ seed()),
        };
        let point = (draw % 100) as u32;
        self.ranges
            .iter()
            .find(|(upper, _)| point < *upper)
            .or(self.ranges.last())
            .map_or(0, |(_, v)| *v)
    }
}

impl Routing {
    /// The shadow version a request answered by `primary` is copied to, if it is drawn
    /// (never the primary itself).
    pub fn shadow_for(&self, primary: u32) -> Option<u32> {
        let s = self.policy.shadow?;
        if s.version == primary {
            return None;
        }
        let draw = mix(DRAWS.fetch_add(1, Ordering::Relaxed) ^ seed().rotate_left(17)) % 100;
        (draw < u64::from(s.percent)).then_some(s.version)
    }
}

/// Per-process seed, so draws differ between runs.
fn seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(weights: &[(u32, u8)], sticky: Option<&str>) -> TrafficPolicy {
        TrafficPolicy {
            weights: weights.iter().copied().collect(),
            sticky: sticky.map(|s| s.parse().unwrap_or_else(|e| panic!("{e}"))),
            shadow: None,
        }
    }

    #[test]
    fn policies_are_validated() {
        let versions: BTreeSet<u32> = [1, 2, 3].into();
        assert!(
            policy(&[(1, 90), (2, 10)], None)
                .validate(&versions)
                .is_ok()
        );
        assert!(
            policy(&[(1, 100), (2, 0)], None)
                .validate(&versions)
                .is_ok()
        );
        let sum = policy(&[(1, 90), (2, 20)], None).validate(&versions);
        assert!(sum.is_err_and(|e| e.contains("110")));
        let unknown = policy(&[(1, 50), (7, 50)], None).validate(&versions);
        assert!(unknown.is_err_and(|e| e.contains('7')));
        assert!(policy(&[], None).validate(&versions).is_err());
        assert!("cookie:x".parse::<Sticky>().is_err());
        let mut shadowed = policy(&[(1, 100)], None);
        shadowed.shadow = Some("3:100".parse().unwrap_or_else(|e| panic!("{e}")));
        assert!(shadowed.validate(&versions).is_ok());
        shadowed.shadow = Some("4:100".parse().unwrap_or_else(|e| panic!("{e}")));
        assert!(shadowed.validate(&versions).is_err_and(|e| e.contains('4')));
        shadowed.shadow = Some("3:0".parse().unwrap_or_else(|e| panic!("{e}")));
        assert!(shadowed.validate(&versions).is_err());
        assert!("3".parse::<Shadow>().is_err() && "x:5".parse::<Shadow>().is_err());
        assert!("header:bad header".parse::<Sticky>().is_err());
    }

    /// The versions each of 200 keys lands on in `function` under `secret`.
    fn landings(r: &Routing, function: &str, secret: &StickySecret) -> Vec<u32> {
        (0..200)
            .map(|user| {
                let mut h = HeaderMap::new();
                h.insert(
                    "x-user",
                    user.to_string().parse().unwrap_or_else(|e| panic!("{e}")),
                );
                r.pick(function, &h, secret)
            })
            .collect()
    }

    #[test]
    fn sticky_keys_land_by_the_secret_and_the_function() {
        let r = Routing::new(policy(&[(1, 50), (2, 50)], Some("header:x-user")), 1);
        let secret = StickySecret::new([7; 32]);
        let base = landings(&r, "f", &secret);
        assert_eq!(
            base,
            landings(&r, "f", &StickySecret::new([7; 32])),
            "same secret, same landings"
        );
        // Another secret or another function moves about half of the keys: neither can be
        // predicted from the other.
        for other in [
            landings(&r, "f", &StickySecret::new([8; 32])),
            landings(&r, "g", &secret),
        ] {
            let moved = base.iter().zip(&other).filter(|(a, b)| a != b).count();
            assert!((50..150).contains(&moved), "{moved} of 200 moved");
        }
    }

    #[test]
    fn draws_follow_the_weights_and_sticky_keys_stay() {
        let secret = StickySecret::new([1; 32]);
        let r = Routing::new(policy(&[(1, 70), (2, 30)], None), 1);
        let none = HeaderMap::new();
        let ones = (0..10_000)
            .filter(|_| r.pick("f", &none, &secret) == 1)
            .count();
        assert!((6_800..7_200).contains(&ones), "{ones}");
        let r = Routing::new(policy(&[(1, 50), (2, 50)], Some("header:x-user")), 2);
        let mut h = HeaderMap::new();
        let mut seen = BTreeSet::new();
        for user in 0..200 {
            h.insert(
                "x-user",
                user.to_string().parse().unwrap_or_else(|e| panic!("{e}")),
            );
            let first = r.pick("f", &h, &secret);
            assert!((0..5).all(|_| r.pick("f", &h, &secret) == first));
            seen.insert(first);
        }
        assert_eq!(seen.len(), 2, "keys spread over both versions");
        let zero = Routing::new(policy(&[(1, 0), (2, 100)], None), 3);
        assert!((0..1000).all(|_| zero.pick("f", &none, &secret) == 2));
        let mut p = policy(&[(1, 100)], None);
        p.shadow = Some(Shadow {
            version: 2,
            percent: 30,
        });
        let r = Routing::new(p, 4);
        let copied = (0..10_000).filter(|_| r.shadow_for(1) == Some(2)).count();
        assert!((2_800..3_200).contains(&copied), "{copied}");
        assert_eq!(r.shadow_for(2), None, "never shadows itself");
    }
}
