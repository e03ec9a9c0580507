//! Benchmark support. The criterion benches live in `benches/`; the HTTP load bench is
//! `benches/http_load.py`, which runs Kiln, `wasmtime serve` and the native [`hyper-hello`]
//! ceiling side by side; `first-response` times server start to first answer.
//!
//! [`hyper-hello`]: ../hyper_hello/index.html
