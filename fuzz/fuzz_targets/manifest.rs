//! Manifests from users: `kiln.toml` text and the JSON version manifest of
//! `POST /v1/functions/{name}/versions`. Any input must give a value or an error, never a
//! panic, and whatever parses must survive the checks a deploy runs on it.
#![no_main]

use kiln_host::api::CreateVersion;
use kiln_host::config::RuntimeConfig;
use kiln_host::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Manifest::parse(text);
    }
    if let Ok(m) = serde_json::from_slice::<CreateVersion>(data) {
        let _ = m.nn_spec();
        let _ = m.cache.clone().validate();
        let _ = kiln_host::runtime::parse_patterns(&m.allowed_outbound_hosts);
        let limits = m.limits.resolve(&kiln_host::common::Limits::default());
        let _ = limits.check(&RuntimeConfig::default());
    }
});
