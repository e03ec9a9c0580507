//! Sealing small values at rest: ChaCha20-Poly1305 (aws-lc-rs, the provider rustls already
//! links) under a 32-byte key, with a random nonce stored in front of the ciphertext. A
//! sealed value can only be opened with the same key and the same associated data, so a
//! row copied next to another name does not open there either.
//!
//! Callers derive keys from secrets the store never holds (a caller's bearer key, say), so
//! someone who reads the database, a backup or a replica reads nothing useful.

use aws_lc_rs::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

/// Writes `bytes` to `path` readable by its owner only (mode 0600), whole: under another
/// name, synced, then renamed, so a crash never leaves half a key under the real name.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("creating {}", path.display()))
}

/// Length of a sealing key, in bytes.
pub const KEY_LEN: usize = 32;

/// A value could not be opened: another key, other associated data, or altered bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the sealed value does not open with this key (another key, or altered bytes)")]
pub struct OpenError;

/// Derives a sealing key for `context` (a fixed, unique string naming the use) from
/// `material`: the parts are length-prefixed, so no two lists of parts give one key.
pub fn derive_key(context: &str, material: &[&[u8]]) -> [u8; KEY_LEN] {
    let mut hasher = blake3::Hasher::new_derive_key(context);
    for part in material {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    *hasher.finalize().as_bytes()
}

/// Seals `plain` under `key`, bound to `aad`: nonce, then ciphertext and tag.
pub fn seal(key: &[u8; KEY_LEN], aad: &[u8], plain: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("drawing a nonce: {e}"))?;
    let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + CHACHA20_POLY1305.tag_len());
    out.extend_from_slice(&nonce);
    let mut body = plain.to_vec();
    cipher(key)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut body,
        )
        .map_err(|_| anyhow::anyhow!("sealing a value failed"))?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Opens what [`seal`] made with the same `key` and `aad`.
pub fn open(key: &[u8; KEY_LEN], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
    if sealed.len() < NONCE_LEN {
        return Err(OpenError);
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError)?;
    let mut body = body.to_vec();
    let plain_len = cipher(key)
        .map_err(|_| OpenError)?
        .open_in_place(nonce, Aad::from(aad), &mut body)
        .map_err(|_| OpenError)?
        .len();
    body.truncate(plain_len);
    Ok(body)
}

fn cipher(key: &[u8; KEY_LEN]) -> anyhow::Result<LessSafeKey> {
    UnboundKey::new(&CHACHA20_POLY1305, key)
        .map(LessSafeKey::new)
        .map_err(|_| anyhow::anyhow!("a ChaCha20-Poly1305 key must be {KEY_LEN} bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_with_its_key_and_associated_data() {
        let key = derive_key("kiln test", &[b"secret", b"k1"]);
        let sealed = seal(&key, b"scope", b"{\"key\":\"kiln_abc\"}").unwrap();
        assert!(!sealed.windows(8).any(|w| w == b"kiln_abc"));
        assert_eq!(
            open(&key, b"scope", &sealed).unwrap(),
            b"{\"key\":\"kiln_abc\"}"
        );
        let other = derive_key("kiln test", &[b"secret", b"k2"]);
        assert_eq!(open(&other, b"scope", &sealed), Err(OpenError));
        assert_eq!(open(&key, b"other scope", &sealed), Err(OpenError));
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(open(&key, b"scope", &altered), Err(OpenError));
        assert_eq!(open(&key, b"scope", &sealed[..5]), Err(OpenError));
        // Two seals of one value differ (fresh nonces).
        assert_ne!(
            seal(&key, b"scope", b"x").unwrap(),
            seal(&key, b"scope", b"x").unwrap()
        );
    }

    #[test]
    fn derived_keys_do_not_collide_across_part_boundaries() {
        assert_ne!(
            derive_key("c", &[b"ab", b"c"]),
            derive_key("c", &[b"a", b"bc"])
        );
        assert_ne!(derive_key("c", &[b"a"]), derive_key("d", &[b"a"]));
    }
}
