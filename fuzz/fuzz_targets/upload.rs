//! The upload path of `POST /v1/functions/{name}/versions`, everything the server parses
//! before the compiler sees the bytes: the query string of a bare upload, the signature
//! headers over a manifest, the digest in a blob URL, and the component bytes themselves
//! (the component/core/precompiled sniffing and the embedded-model sections).
//! Input: `query \0 signer \0 signature \0 body`.
#![no_main]

use kiln_host::api::functions::bare_upload_params;
use kiln_host::auth::signing;
use kiln_host::nn::embed;
use kiln_host::common::Digest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(4, |b| *b == 0);
    let query = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let signer = parts.next().unwrap_or_default();
    let signature = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();

    let _ = bare_upload_params(&query);
    let _ = query.parse::<Digest>();

    let mut headers = http::HeaderMap::new();
    for (name, value) in [(signing::SIGNER_HEADER, signer), (signing::SIGNATURE_HEADER, signature)] {
        if let Ok(v) = http::HeaderValue::from_bytes(value) {
            headers.insert(name, v);
        }
    }
    let _ = signing::verify(&headers, "fuzz", body);

    let _ = wasmparser::Parser::is_component(body);
    let _ = wasmparser::Parser::is_core_wasm(body);
    if let Ok(found) = embed::extract(body) {
        for (_, range) in found {
            assert!(range.end <= body.len(), "an embedded model outside the component");
        }
    }
});
