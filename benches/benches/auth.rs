//! What authenticating one request costs: the `authorization` header parsed, the key hashed
//! (SHA-256) and looked up, with and without a rate limit on the key, and a request with no
//! key at all (public functions).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use kiln_host::auth::{AuditLog, Auth, Bootstrap, Caller, KeyStore, NewKey};

fn auth_benches(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("kiln-auth-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let boot = Bootstrap {
        admin_key: Some("kiln-bench-admin-key-0123456789abcdef".into()),
        listen: "127.0.0.1:0".parse().unwrap(),
        insecure: false,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (auth, _) = rt
        .block_on(Auth::open(
            KeyStore::sqlite(&dir.join("kiln.db")).unwrap(),
            AuditLog::sqlite(&dir.join("audit.db")).unwrap(),
            &boot,
            None,
            kiln_host::auth::Nodes::default(),
        ))
        .unwrap();
    let new = |rate: Option<&str>| NewKey {
        tenant: "bench".into(),
        scopes: vec!["invoke:*".into()],
        rate: rate.map(|r| r.parse().unwrap()),
    };
    let (_, plain) = rt.block_on(auth.create(&new(None), &Caller::Open)).unwrap();
    let (_, limited) = rt
        .block_on(auth.create(&new(Some("1000000000/s")), &Caller::Open))
        .unwrap();
    let headers = |key: &str| {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        h
    };
    let (plain, limited, none) = (headers(&plain), headers(&limited), http::HeaderMap::new());
    c.bench_function("authenticate: key", |b| {
        b.iter(|| auth.authenticate(std::hint::black_box(&plain)).unwrap())
    });
    c.bench_function("authenticate: key with a rate limit", |b| {
        b.iter(|| auth.authenticate(std::hint::black_box(&limited)).unwrap())
    });
    c.bench_function("authenticate: no key", |b| {
        b.iter(|| auth.authenticate(std::hint::black_box(&none)).unwrap())
    });
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(benches, auth_benches);
criterion_main!(benches);
