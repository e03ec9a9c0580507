//! Signed bundles: a publisher signs the version manifest (the JSON that names the
//! component and every model by digest) with Ed25519; the server checks the signature,
//! the signer against its trusted keys, and the blobs against their digests, so what runs
//! is byte for byte what the publisher built.
//!
//! The signature covers `kiln-bundle-v1 \0 <function> \0 <manifest bytes>` (a manifest
//! signed for one function cannot be replayed onto another) and travels in two headers:
//! `x-kiln-signer: ed25519:<hex public key>` and `x-kiln-signature: <hex signature>`.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use http::HeaderMap;
use serde::{Deserialize, Serialize};

/// Header naming the signer's public key.
pub const SIGNER_HEADER: &str = "x-kiln-signer";
/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-kiln-signature";
/// First line of a secret key file written by `kiln keygen`.
const SECRET_PREFIX: &str = "kiln-ed25519-secret:";

/// A publisher's public key, written `ed25519:<64 hex>`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl FromStr for PublicKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid public key {s:?}: expected ed25519:<64 hex digits>");
        let hex = s.trim().strip_prefix("ed25519:").ok_or_else(bad)?;
        let bytes: [u8; 32] = hex::decode(hex)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?;
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|_| bad())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519:{}", hex::encode(self.0.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Why a bundle is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    #[error(
        "this server only accepts signed bundles for tenant {0:?}: deploy with `kiln deploy --sign KEYFILE`"
    )]
    Unsigned(String),
    #[error("malformed signature headers: {0}")]
    Malformed(String),
    #[error(
        "the bundle's signature does not verify: the manifest was changed after signing, or signed for another function"
    )]
    BadSignature,
    #[error("signer {0} is not trusted for tenant {1:?}")]
    Untrusted(String, String),
    #[error("bare component uploads cannot be signed; deploy a manifest (kiln deploy --sign)")]
    BareUpload,
    #[error("{0}")]
    Replayed(String),
}

/// What is signed for `function`'s manifest `body`.
pub fn message(function: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + function.len() + 16);
    m.extend_from_slice(b"kiln-bundle-v1\0");
    m.extend_from_slice(function.as_bytes());
    m.push(0);
    m.extend_from_slice(body);
    m
}

/// A new key pair: the secret key file's text and the public key.
pub fn keygen() -> std::io::Result<(String, PublicKey)> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| std::io::Error::other(e.to_string()))?;
    let key = SigningKey::from_bytes(&seed);
    let public = PublicKey(key.verifying_key());
    Ok((
        format!(
            "{SECRET_PREFIX}{}\n# public key: {public}\n",
            hex::encode(seed)
        ),
        public,
    ))
}

/// Signs `function`'s manifest `body` with the secret key file text `secret`; returns the
/// two header values.
pub fn sign(secret: &str, function: &str, body: &[u8]) -> Result<(String, String), String> {
    let seed: [u8; 32] = secret
        .lines()
        .find_map(|l| l.trim().strip_prefix(SECRET_PREFIX))
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| b.try_into().ok())
        .ok_or("not a Kiln secret key file (make one with `kiln keygen`)")?;
    let key = SigningKey::from_bytes(&seed);
    let sig = key.sign(&message(function, body));
    Ok((
        PublicKey(key.verifying_key()).to_string(),
        hex::encode(sig.to_bytes()),
    ))
}

/// The signer of a request's manifest: `None` when unsigned, an error when the headers are
/// malformed or the signature does not verify.
pub fn verify(
    headers: &HeaderMap,
    function: &str,
    body: &[u8],
) -> Result<Option<PublicKey>, SignError> {
    let get = |name: &str| {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map_err(|_| SignError::Malformed(format!("{name} is not text")))
            })
            .transpose()
    };
    let (signer, signature) = match (get(SIGNER_HEADER)?, get(SIGNATURE_HEADER)?) {
        (None, None) => return Ok(None),
        (Some(k), Some(s)) => (k, s),
        _ => {
            return Err(SignError::Malformed(format!(
                "send both {SIGNER_HEADER} and {SIGNATURE_HEADER}"
            )));
        }
    };
    let signer: PublicKey = signer.parse().map_err(SignError::Malformed)?;
    let sig: [u8; 64] = hex::decode(signature.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| SignError::Malformed(format!("{SIGNATURE_HEADER} is not 128 hex digits")))?;
    signer
        .0
        .verify_strict(&message(function, body), &Signature::from_bytes(&sig))
        .map_err(|_| SignError::BadSignature)?;
    Ok(Some(signer))
}

/// The publisher keys trusted for one tenant's bundles.
#[derive(Debug, Clone)]
pub struct Trust<'a> {
    /// Trusted for every tenant.
    pub global: &'a [PublicKey],
    /// Trusted for this tenant.
    pub tenant: &'a [PublicKey],
    pub tenant_name: String,
}

impl Trust<'_> {
    /// Checks a bundle signed by `signer` (or unsigned). With no trusted key for the
    /// tenant, any valid signature (or none) is accepted.
    pub fn check(&self, signer: Option<&PublicKey>) -> Result<(), SignError> {
        if !self.required() {
            return Ok(());
        }
        let signer = signer.ok_or_else(|| SignError::Unsigned(self.tenant_name.clone()))?;
        if self.global.iter().chain(self.tenant).any(|k| k == signer) {
            Ok(())
        } else {
            Err(SignError::Untrusted(
                signer.to_string(),
                self.tenant_name.clone(),
            ))
        }
    }

    /// Whether bundles must be signed.
    pub fn required(&self) -> bool {
        !self.global.is_empty() || !self.tenant.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(signer: &str, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            SIGNER_HEADER,
            signer.parse().unwrap_or_else(|e| panic!("{e}")),
        );
        h.insert(
            SIGNATURE_HEADER,
            sig.parse().unwrap_or_else(|e| panic!("{e}")),
        );
        h
    }

    #[test]
    fn a_signature_covers_the_function_and_every_byte() {
        let (secret, public) = keygen().unwrap_or_else(|e| panic!("{e}"));
        let body = br#"{"component":"sha256:00"}"#;
        let (signer, sig) = sign(&secret, "f", body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(signer, public.to_string());
        let h = headers(&signer, &sig);
        assert_eq!(verify(&h, "f", body), Ok(Some(public)));
        assert_eq!(verify(&h, "g", body), Err(SignError::BadSignature));
        assert_eq!(
            verify(&h, "f", br#"{"component":"sha256:01"}"#),
            Err(SignError::BadSignature)
        );
        assert_eq!(verify(&HeaderMap::new(), "f", body), Ok(None));
        assert!(matches!(
            verify(&headers(&signer, "zz"), "f", body),
            Err(SignError::Malformed(_))
        ));
    }

    #[test]
    fn trust_applies_globally_and_per_tenant() {
        let (_, a) = keygen().unwrap_or_else(|e| panic!("{e}"));
        let (_, b) = keygen().unwrap_or_else(|e| panic!("{e}"));
        let trust = |global: &'static [PublicKey], tenant: Vec<PublicKey>| {
            let tenant: &'static [PublicKey] = Vec::leak(tenant);
            Trust {
                global,
                tenant,
                tenant_name: "t".into(),
            }
        };
        assert_eq!(trust(&[], vec![]).check(None), Ok(()));
        let per_tenant = trust(&[], vec![a]);
        assert!(per_tenant.required());
        assert_eq!(per_tenant.check(Some(&a)), Ok(()));
        assert!(matches!(
            per_tenant.check(Some(&b)),
            Err(SignError::Untrusted(..))
        ));
        assert!(matches!(
            per_tenant.check(None),
            Err(SignError::Unsigned(_))
        ));
        let global = trust(Vec::leak(vec![b]), vec![]);
        assert_eq!(global.check(Some(&b)), Ok(()));
        assert_eq!(
            format!("{a}").parse::<PublicKey>().map(|k| k == a),
            Ok(true)
        );
    }
}
