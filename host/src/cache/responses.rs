//! The response cache: whole 200 responses of functions that opt in
//! (`[cache] responses = { ttl, max_entries, vary }`). A hit is answered without
//! instantiating anything.
//!
//! The key covers the version (its unique id and component digest), the method, the path
//! and query, the values of the policy's `vary` headers and the body's hash. A request
//! with `cache-control: no-cache` (or `pragma: no-cache`) bypasses the cache; only GET,
//! HEAD and POST are cached, and a guest's `cache-control: no-store` / `private` or a
//! `set-cookie` keeps its response out.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, header};

use super::{ByteCache, Key, KeyHasher};
use crate::common::Digest;

/// A stored response.
#[derive(Debug)]
pub struct CachedResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// What the answer predicted (recorded again with every hit's usage).
    pub prediction: Option<String>,
}

impl CachedResponse {
    /// Bytes this entry costs the budget.
    pub fn size(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        (self.body.len() + headers) as u64
    }
}

/// Whole responses by key.
pub type ResponseCache = ByteCache<Arc<CachedResponse>>;

/// How the response cache treated a request (`x-kiln-cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    Bypass,
}

impl CacheStatus {
    /// The header value and ledger label.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Bypass => "bypass",
        }
    }
}

fn has_directive(headers: &HeaderMap, name: header::HeaderName, wanted: &[&str]) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|d| {
                let d = d.trim();
                let d = d.split('=').next().unwrap_or(d);
                wanted.iter().any(|w| d.eq_ignore_ascii_case(w))
            })
        })
    })
}

/// Whether a request must skip the cache (and not fill it).
pub fn bypass(method: &Method, headers: &HeaderMap) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::POST)
        || has_directive(headers, header::CACHE_CONTROL, &["no-cache", "no-store"])
        || has_directive(headers, header::PRAGMA, &["no-cache"])
}

/// Whether a guest's response may be stored and served to others.
pub fn storable(status: StatusCode, headers: &HeaderMap) -> bool {
    status == StatusCode::OK
        && !headers.contains_key(header::SET_COOKIE)
        && !has_directive(headers, header::CACHE_CONTROL, &["no-store", "private"])
}

/// The key of a request to version `scope` (component `digest`) whose guest sees the
/// variables `vars` (an alias's values answer apart from another's).
#[allow(clippy::too_many_arguments)]
pub fn key(
    scope: u64,
    digest: &Digest,
    vars: &[(String, String)],
    method: &Method,
    path_and_query: &str,
    vary: &[String],
    headers: &HeaderMap,
    body: &[u8],
) -> Key {
    let mut h = KeyHasher::new(b"kiln.response.v1", scope);
    h.field(&digest.0).field(&(vars.len() as u64).to_le_bytes());
    for (k, v) in vars {
        h.field(k.as_bytes()).field(v.as_bytes());
    }
    h.field(method.as_str().as_bytes())
        .field(path_and_query.as_bytes());
    for name in vary {
        let values = headers.get_all(name.as_str());
        h.field(name.as_bytes())
            .field(&(values.iter().count() as u64).to_le_bytes());
        for v in values {
            h.field(v.as_bytes());
        }
    }
    h.field(blake3::hash(body).as_bytes()).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_every_part_and_bypass_rules_hold() {
        let d = Digest::of(b"c");
        let mut hs = HeaderMap::new();
        hs.insert("x-user", "a".parse().expect("hv"));
        let vary = vec!["x-user".to_string()];
        let base = key(1, &d, &[], &Method::GET, "/a?b", &vary, &hs, b"");
        assert_eq!(base, key(1, &d, &[], &Method::GET, "/a?b", &vary, &hs, b""));
        assert_ne!(base, key(2, &d, &[], &Method::GET, "/a?b", &vary, &hs, b""));
        assert_ne!(
            base,
            key(1, &d, &[], &Method::POST, "/a?b", &vary, &hs, b"")
        );
        assert_ne!(base, key(1, &d, &[], &Method::GET, "/a?c", &vary, &hs, b""));
        assert_ne!(
            base,
            key(1, &d, &[], &Method::GET, "/a?b", &vary, &hs, b"x")
        );
        let mut other = HeaderMap::new();
        other.insert("x-user", "b".parse().expect("hv"));
        assert_ne!(
            base,
            key(1, &d, &[], &Method::GET, "/a?b", &vary, &other, b"")
        );
        // A header not in `vary` does not split the key.
        other.insert("x-user", "a".parse().expect("hv"));
        other.insert("x-other", "z".parse().expect("hv"));
        assert_eq!(
            base,
            key(1, &d, &[], &Method::GET, "/a?b", &vary, &other, b"")
        );
        let vars = [("greeting".to_string(), "hi".to_string())];
        let staged = [("greeting".to_string(), "staged".to_string())];
        let with = key(1, &d, &vars, &Method::GET, "/a?b", &vary, &hs, b"");
        assert_ne!(base, with);
        assert_ne!(
            with,
            key(1, &d, &staged, &Method::GET, "/a?b", &vary, &hs, b"")
        );

        let mut h = HeaderMap::new();
        assert!(!bypass(&Method::GET, &h));
        assert!(bypass(&Method::PUT, &h));
        h.insert(
            header::CACHE_CONTROL,
            "max-age=0, No-Cache".parse().expect("hv"),
        );
        assert!(bypass(&Method::GET, &h));
        let mut r = HeaderMap::new();
        assert!(storable(StatusCode::OK, &r));
        assert!(!storable(StatusCode::NOT_FOUND, &r));
        r.insert(header::CACHE_CONTROL, "private".parse().expect("hv"));
        assert!(!storable(StatusCode::OK, &r));
    }
}
