//! Models carried inside the component itself, so that one `.wasm` file is the whole
//! deployable: each model is a top-level custom section named [`SECTION`] whose payload is
//! a little-endian `u32` header length, a JSON [`EmbeddedModel`] header, then the model
//! bytes. Custom sections never reach guest memory; the server copies them out at deploy
//! into content-addressed blobs, after which they are ordinary models.

use serde::{Deserialize, Serialize};

use super::{BackendKind, BatchSpec, Encoding, Target};

/// Name of the custom section holding one embedded model.
pub const SECTION: &str = "kiln:model";

/// The header stored before an embedded model's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedModel {
    pub name: String,
    #[serde(default)]
    pub encoding: Encoding,
    #[serde(default)]
    pub target: Target,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendKind>,
    #[serde(default, skip_serializing_if = "BatchSpec::is_off")]
    pub batch: BatchSpec,
}

/// Why embedded models could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EmbedError {
    #[error("not a WebAssembly binary (bad header)")]
    NotWasm,
    #[error("truncated section at byte {0}")]
    Truncated(usize),
    #[error("embedded model section at byte {offset}: {reason}")]
    BadModel { offset: usize, reason: String },
}

/// A top-level section: id, where its contents are, and where the whole section starts.
struct Section {
    id: u8,
    start: usize,
    contents: std::ops::Range<usize>,
}

fn read_leb_u32(bytes: &[u8], mut at: usize) -> Option<(u32, usize)> {
    let mut result: u64 = 0;
    for shift in (0..35).step_by(7) {
        let b = *bytes.get(at)?;
        at += 1;
        result |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return u32::try_from(result).ok().map(|v| (v, at));
        }
    }
    None
}

fn write_leb_u32(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn sections(bytes: &[u8]) -> Result<Vec<Section>, EmbedError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(EmbedError::NotWasm);
    }
    let mut out = Vec::new();
    let mut at = 8;
    while at < bytes.len() {
        let start = at;
        let id = bytes[at];
        let (size, body) = read_leb_u32(bytes, at + 1).ok_or(EmbedError::Truncated(start))?;
        let end = body
            .checked_add(size as usize)
            .filter(|e| *e <= bytes.len())
            .ok_or(EmbedError::Truncated(start))?;
        out.push(Section {
            id,
            start,
            contents: body..end,
        });
        at = end;
    }
    Ok(out)
}

/// The custom-section name and payload of a section, if it is a custom section.
fn custom<'a>(bytes: &'a [u8], s: &Section) -> Option<(&'a str, &'a [u8], usize)> {
    if s.id != 0 {
        return None;
    }
    let (len, name_at) = read_leb_u32(bytes, s.contents.start)?;
    let name_end = name_at.checked_add(len as usize)?;
    if name_end > s.contents.end {
        return None;
    }
    let name = std::str::from_utf8(&bytes[name_at..name_end]).ok()?;
    Some((name, &bytes[name_end..s.contents.end], name_end))
}

/// The embedded models of a component: header and the byte range of the model.
pub fn extract(bytes: &[u8]) -> Result<Vec<(EmbeddedModel, std::ops::Range<usize>)>, EmbedError> {
    let mut out = Vec::new();
    for s in sections(bytes)? {
        let Some((SECTION, payload, payload_at)) = custom(bytes, &s) else {
            continue;
        };
        let bad = |reason: String| EmbedError::BadModel {
            offset: s.start,
            reason,
        };
        let header_len = payload
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| bad("no header".into()))?;
        let header = payload
            .get(4..4 + header_len)
            .ok_or_else(|| bad("header longer than the section".into()))?;
        let meta: EmbeddedModel =
            serde_json::from_slice(header).map_err(|e| bad(format!("header: {e}")))?;
        let model_at = payload_at + 4 + header_len;
        out.push((meta, model_at..s.contents.end));
    }
    Ok(out)
}

/// `component` with its embedded models replaced by `models` (each appended as a custom
/// section). Any models embedded before are dropped first, so embedding twice is the same
/// as embedding once.
pub fn embed(component: &[u8], models: &[(EmbeddedModel, Vec<u8>)]) -> Result<Vec<u8>, EmbedError> {
    let all = sections(component)?;
    let mut out = Vec::with_capacity(component.len());
    out.extend_from_slice(&component[..8]);
    for s in &all {
        if matches!(custom(component, s), Some((SECTION, _, _))) {
            continue;
        }
        out.extend_from_slice(&component[s.start..s.contents.end]);
    }
    for (meta, bytes) in models {
        let header = serde_json::to_vec(meta).map_err(|e| EmbedError::BadModel {
            offset: out.len(),
            reason: e.to_string(),
        })?;
        let mut payload = Vec::with_capacity(16 + header.len() + bytes.len());
        write_leb_u32(&mut payload, SECTION.len() as u32);
        payload.extend_from_slice(SECTION.as_bytes());
        payload.extend_from_slice(&(header.len() as u32).to_le_bytes());
        payload.extend_from_slice(&header);
        payload.extend_from_slice(bytes);
        let size = u32::try_from(payload.len()).map_err(|_| EmbedError::BadModel {
            offset: out.len(),
            reason: "model over 4 GiB".into(),
        })?;
        out.push(0);
        write_leb_u32(&mut out, size);
        out.extend_from_slice(&payload);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest component: header only (layer 1).
    const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\x00\x01\x00";

    fn meta(name: &str) -> EmbeddedModel {
        EmbeddedModel {
            name: name.into(),
            encoding: Encoding::Onnx,
            target: Target::Auto,
            backend: None,
            batch: BatchSpec::Off,
        }
    }

    #[test]
    fn embedded_models_round_trip_and_reembedding_replaces() {
        let big = vec![7u8; 300];
        let once = embed(
            EMPTY_COMPONENT,
            &[(meta("a"), b"first".to_vec()), (meta("b"), big.clone())],
        )
        .expect("embed");
        let got = extract(&once).expect("extract");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, meta("a"));
        assert_eq!(&once[got[0].1.clone()], b"first");
        assert_eq!(&once[got[1].1.clone()], &big[..]);

        let twice = embed(&once, &[(meta("c"), b"x".to_vec())]).expect("re-embed");
        let got = extract(&twice).expect("extract");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.name, "c");
        assert_eq!(extract(EMPTY_COMPONENT).expect("none"), vec![]);
    }

    #[test]
    fn damaged_sections_are_errors_not_panics() {
        let good = embed(EMPTY_COMPONENT, &[(meta("a"), b"model".to_vec())]).expect("embed");
        for cut in 9..good.len() {
            let _ = extract(&good[..cut]);
        }
        assert_eq!(extract(b"nope"), Err(EmbedError::NotWasm));
        assert!(matches!(
            extract(&good[..good.len() - 1]),
            Err(EmbedError::Truncated(8))
        ));
    }
}
