//! The function's variables (`[variables]` in kiln.toml, values set with `kiln vars set`),
//! read through `wasi:config/store`. A request through an alias gets that alias's values.
//!
//! ```ignore
//! let greeting = kiln_guest::variable("greeting").unwrap_or_default();
//! ```
//!
//! Programs that read their settings from the environment find the same values there,
//! upper-cased (`api_key` is `API_KEY`), and nothing else of the host's environment.

mod bindings {
    wit_bindgen::generate!({
        path: "../wit/wasi-config.wit",
        world: "config",
        generate_all,
    });
}

use bindings::wasi::config::store;

/// The value of variable `key` for this request: the alias's, the function's, or the
/// declared default; `None` when the version does not declare it or it has no value.
pub fn variable(key: &str) -> Option<String> {
    store::get(key).ok().flatten()
}

/// Every variable this request sees, as (key, value).
pub fn variables() -> Vec<(String, String)> {
    store::get_all().unwrap_or_default()
}
