//! `GET /metrics`: Prometheus (OpenMetrics) text, named after OpenTelemetry's FaaS
//! conventions with a `kiln_` prefix and base units (seconds). Labels are bounded sets
//! (function, version, outcome, backend, device); tenants and request ids belong in the
//! usage ledger, not here. Every data-plane request is counted once, when its usage record
//! is written, with the outcome the ledger, version stats and rollout gates see; a
//! function's series go when it is deleted.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `kiln_faas_invocations_total` | counter | function, version, outcome |
//! | `kiln_faas_invoke_duration_seconds` | histogram | function, version, status_class |
//! | `kiln_faas_coldstarts_total` | counter | function |
//! | `kiln_faas_active_instances` | gauge | |
//! | `kiln_requests_in_flight` | gauge | |
//! | `kiln_connections_open` | gauge | |
//! | `kiln_connections_refused_total` | counter | |
//! | `kiln_nn_inference_duration_seconds` | histogram | backend, device |
//! | `kiln_nn_batch_rows` | histogram (rows per backend run, batching on) | backend, device |
//! | `kiln_nn_batch_wait_seconds` | histogram (a compute's wait in a batching queue) | backend, device |
//! | `kiln_compile_duration_seconds` | histogram | |
//! | `kiln_cache_hits_total`, `kiln_cache_misses_total`, `kiln_cache_evictions_total` | counter | cache (`response`, `inference`) |
//! | `kiln_cache_bytes` | gauge | cache |
//! | `kiln_outbound_breaker_state` | gauge (0 closed, 1 open, 2 half-open) | function, destination |
//! | `kiln_outbound_breaker_opened_total` | counter | function, destination |
//! | `kiln_ledger_records_total` | counter | |
//! | `kiln_ledger_commit_duration_seconds` | histogram | |
//! | `kiln_build_info` | gauge (1) | version |
//! | `kiln_model_drift_score`, `kiln_model_accuracy`, `kiln_feedback_total` | see [`ModelMetrics`] | |

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::metric_labels::{
    BreakerLabels, BuildLabels, CacheLabels, DurationLabels, FunctionLabels, InferenceLabels,
    InvocationLabels, RefusalLabels, SHADOW_RESULTS, STATUS_CLASSES, ShadowLabels,
    ShadowSideLabels, status_class,
};
pub use super::model_metrics::ModelMetrics;
pub use super::outcome::Outcome;
use crate::nn::{BackendKind, Device};

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// 100 µs .. ~105 s, doubling.
fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

/// 5 µs .. ~84 s, quadrupling.
fn inference_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000005, 4.0, 13))
}

/// 1 .. 1024 rows, doubling.
fn rows_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

/// 10 µs .. ~41 s, quadrupling.
fn wait_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00001, 4.0, 12))
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    invocations: Family<InvocationLabels, Counter>,
    duration: HistogramFamily<DurationLabels>,
    coldstarts: Family<FunctionLabels, Counter>,
    active: Gauge<i64, AtomicI64>,
    in_flight: Gauge<i64, AtomicI64>,
    connections: Gauge<i64, AtomicI64>,
    connections_refused: Counter,
    inference: HistogramFamily<InferenceLabels>,
    batch_rows: HistogramFamily<InferenceLabels>,
    batch_wait: HistogramFamily<InferenceLabels>,
    compile: Histogram,
    cache_hits: Family<CacheLabels, Counter>,
    cache_misses: Family<CacheLabels, Counter>,
    cache_evictions: Family<CacheLabels, Counter>,
    cache_bytes: Family<CacheLabels, Gauge<i64, AtomicI64>>,
    auth_refusals: Family<RefusalLabels, Counter>,
    rollout_steps: Family<FunctionLabels, Counter>,
    rollout_rollbacks: Family<FunctionLabels, Counter>,
    shadow: Family<ShadowLabels, Counter>,
    shadow_seconds: Family<ShadowSideLabels, Counter<f64, AtomicU64>>,
    breaker_state: Family<BreakerLabels, Gauge>,
    breaker_opened: Family<BreakerLabels, Counter>,
    /// Drift, accuracy and feedback of monitored models.
    pub models: ModelMetrics,
    /// Usage records committed to the ledger.
    pub ledger_records: Counter,
    /// Time of one ledger commit (a batch of records).
    pub ledger_commit: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric (all start at zero).
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kiln");
        let invocations = Family::<InvocationLabels, Counter>::default();
        registry.register(
            "faas_invocations",
            "Invocations by function, version and outcome",
            invocations.clone(),
        );
        let duration: HistogramFamily<DurationLabels> =
            Family::new_with_constructor(request_histogram);
        registry.register(
            "faas_invoke_duration_seconds",
            "Time from routing a request to the guest's response head",
            duration.clone(),
        );
        let coldstarts = Family::<FunctionLabels, Counter>::default();
        registry.register(
            "faas_coldstarts",
            "Requests that had to map a version's compiled artifact first",
            coldstarts.clone(),
        );
        let active = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "faas_active_instances",
            "Instances running a request right now",
            active.clone(),
        );
        let in_flight = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "requests_in_flight",
            "Function requests being answered right now (queued ones included)",
            in_flight.clone(),
        );
        let connections = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "connections_open",
            "Client connections open now",
            connections.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Connections answered 503 and closed at [server] max_connections",
            connections_refused.clone(),
        );
        let inference: HistogramFamily<InferenceLabels> =
            Family::new_with_constructor(inference_histogram);
        registry.register(
            "nn_inference_duration_seconds",
            "Native inference time of one wasi-nn compute",
            inference.clone(),
        );
        let batch_rows: HistogramFamily<InferenceLabels> =
            Family::new_with_constructor(rows_histogram);
        registry.register(
            "nn_batch_rows",
            "Rows in one backend run of a model with batching on (1: it ran alone)",
            batch_rows.clone(),
        );
        let batch_wait: HistogramFamily<InferenceLabels> =
            Family::new_with_constructor(wait_histogram);
        registry.register(
            "nn_batch_wait_seconds",
            "Time a compute waited in a model's batching queue before its run began",
            batch_wait.clone(),
        );
        let compile = request_histogram();
        registry.register(
            "compile_duration_seconds",
            "Compiling a component at deploy",
            compile.clone(),
        );
        let cache_hits = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_hits",
            "Lookups answered from a cache",
            cache_hits.clone(),
        );
        let cache_misses = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_misses",
            "Lookups that had to compute",
            cache_misses.clone(),
        );
        let cache_evictions = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_evictions",
            "Entries dropped to stay within the byte budget or a version's cap",
            cache_evictions.clone(),
        );
        let cache_bytes = Family::<CacheLabels, Gauge<i64, AtomicI64>>::default();
        registry.register("cache_bytes", "Bytes held by a cache", cache_bytes.clone());
        let auth_refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "auth_refusals",
            "Requests refused by authentication, authorization or a rate limit",
            auth_refusals.clone(),
        );
        let rollout_steps = Family::<FunctionLabels, Counter>::default();
        registry.register(
            "rollout_steps",
            "Progressive rollout steps applied (the first included)",
            rollout_steps.clone(),
        );
        let rollout_rollbacks = Family::<FunctionLabels, Counter>::default();
        registry.register(
            "rollout_rollbacks",
            "Progressive rollouts rolled back automatically by a failing health gate",
            rollout_rollbacks.clone(),
        );
        let shadow = Family::<ShadowLabels, Counter>::default();
        registry.register(
            "shadow_requests",
            "Request copies to a shadow version, by result: match, mismatch (status or body differ from the primary's), skipped (not copied: body too large or unknown, no free copy slot, or the primary failed or was cut short)",
            shadow.clone(),
        );
        let shadow_seconds = Family::<ShadowSideLabels, Counter<f64, AtomicU64>>::default();
        registry.register(
            "shadow_latency_seconds",
            "Total latency of compared requests on each side (primary, shadow): their difference over shadow_requests is the mean latency difference",
            shadow_seconds.clone(),
        );
        let models = ModelMetrics::register(&mut registry);
        let breaker_state = Family::<BreakerLabels, Gauge>::default();
        registry.register(
            "outbound_breaker_state",
            "Circuit breaker of a function's outbound calls to one destination: 0 closed, 1 open (calls fail at once), 2 half-open (one trial call out); only destinations that have failed appear, at most 64 per function",
            breaker_state.clone(),
        );
        let breaker_opened = Family::<BreakerLabels, Counter>::default();
        registry.register(
            "outbound_breaker_opened",
            "Times a function's circuit breaker for a destination opened",
            breaker_opened.clone(),
        );
        let ledger_records = Counter::default();
        registry.register(
            "ledger_records",
            "Usage records committed to the ledger",
            ledger_records.clone(),
        );
        let ledger_commit = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "ledger_commit_duration_seconds",
            "One group commit of usage records",
            ledger_commit.clone(),
        );
        // Which build answers: a constant 1 whose label joins onto any other series.
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The build of kiln serving", build);
        Metrics {
            registry,
            invocations,
            duration,
            coldstarts,
            active,
            in_flight,
            connections,
            connections_refused,
            inference,
            batch_rows,
            batch_wait,
            compile,
            cache_hits,
            cache_misses,
            cache_evictions,
            cache_bytes,
            auth_refusals,
            rollout_steps,
            rollout_rollbacks,
            shadow,
            shadow_seconds,
            breaker_state,
            breaker_opened,
            models,
            ledger_records,
            ledger_commit,
        }
    }

    /// The handles of one version's series, made once (at deploy or startup) so that a
    /// request only increments them: no label strings or map lookups per request.
    pub fn version(&self, function: &str, version: u32) -> VersionMetrics {
        let outcomes = Outcome::ALL.map(|o| {
            self.invocations
                .get_or_create(&InvocationLabels {
                    function: function.to_string(),
                    version: version.to_string(),
                    outcome: o.as_str(),
                })
                .clone()
        });
        let duration = STATUS_CLASSES.map(|status_class| {
            self.duration
                .get_or_create(&DurationLabels {
                    function: function.to_string(),
                    version: version.to_string(),
                    status_class,
                })
                .clone()
        });
        let f = FunctionLabels {
            function: function.to_string(),
        };
        VersionMetrics {
            outcomes,
            duration,
            coldstarts: self.coldstarts.get_or_create(&f).clone(),
        }
    }

    /// Marks an instance started; the guard marks it finished when dropped.
    pub fn instance(&self) -> ActiveInstance {
        self.active.inc();
        ActiveInstance(self.active.clone())
    }

    /// Counts a function request in `kiln_requests_in_flight` until the guard is dropped.
    pub fn request(&self) -> ActiveInstance {
        self.in_flight.inc();
        ActiveInstance(self.in_flight.clone())
    }

    /// Counts a client connection in `kiln_connections_open` until the guard is dropped.
    pub fn connection_opened(&self) -> ActiveInstance {
        self.connections.inc();
        ActiveInstance(self.connections.clone())
    }

    /// Counts a connection refused at the connection limit.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// Function requests being answered now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.get().max(0) as u64
    }

    /// Records one native inference.
    pub fn inference(&self, backend: BackendKind, device: Device, took: Duration) {
        self.inference
            .get_or_create(&InferenceLabels {
                backend: backend.as_str(),
                device: device.as_str(),
            })
            .observe(took.as_secs_f64());
    }

    /// Records one backend run of `rows` rows through a batching queue, and how long each
    /// of its computes waited for it.
    pub fn batch(
        &self,
        backend: BackendKind,
        device: Device,
        rows: u32,
        waits: impl Iterator<Item = Duration>,
    ) {
        let labels = InferenceLabels {
            backend: backend.as_str(),
            device: device.as_str(),
        };
        self.batch_rows
            .get_or_create(&labels)
            .observe(f64::from(rows));
        let wait = self.batch_wait.get_or_create(&labels);
        for w in waits {
            wait.observe(w.as_secs_f64());
        }
    }

    /// The series of cache `name` (`response`, `inference`).
    pub fn cache(&self, name: &'static str) -> CacheMetrics {
        let l = CacheLabels { cache: name };
        CacheMetrics {
            hits: self.cache_hits.get_or_create(&l).clone(),
            misses: self.cache_misses.get_or_create(&l).clone(),
            evictions: self.cache_evictions.get_or_create(&l).clone(),
            bytes: self.cache_bytes.get_or_create(&l).clone(),
        }
    }

    /// Counts a request refused for `reason` (see `AuthError::reason`).
    pub fn refused(&self, reason: &'static str) {
        self.auth_refusals
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }

    /// Counts a rollout step of `function`.
    pub fn rollout_step(&self, function: &str) {
        self.rollout_steps
            .get_or_create(&FunctionLabels {
                function: function.to_string(),
            })
            .inc();
    }

    /// Counts an automatic rollback of `function`'s rollout.
    pub fn rollout_rolled_back(&self, function: &str) {
        self.rollout_rollbacks
            .get_or_create(&FunctionLabels {
                function: function.to_string(),
            })
            .inc();
    }

    /// Counts one shadow copy of `function` to `version` with its `result`, and, when
    /// compared, each side's latency.
    pub fn shadowed(
        &self,
        function: &str,
        version: u32,
        result: &'static str,
        latencies: Option<(Duration, Duration)>,
    ) {
        let version = version.to_string();
        self.shadow
            .get_or_create(&ShadowLabels {
                function: function.to_string(),
                version: version.clone(),
                result,
            })
            .inc();
        if let Some((primary, shadow)) = latencies {
            for (side, took) in [("primary", primary), ("shadow", shadow)] {
                self.shadow_seconds
                    .get_or_create(&ShadowSideLabels {
                        function: function.to_string(),
                        version: version.clone(),
                        side,
                    })
                    .inc_by(took.as_secs_f64());
            }
        }
    }

    /// Removes every series of function `name` and its `versions` (it was deleted): a
    /// scraper stops seeing them, and the registry does not grow with deleted functions.
    pub fn forget(&self, name: &str, versions: impl IntoIterator<Item = u32>) {
        for version in versions {
            let version = version.to_string();
            for outcome in Outcome::ALL {
                self.invocations.remove(&InvocationLabels {
                    function: name.to_string(),
                    version: version.clone(),
                    outcome: outcome.as_str(),
                });
            }
            for status_class in STATUS_CLASSES {
                self.duration.remove(&DurationLabels {
                    function: name.to_string(),
                    version: version.clone(),
                    status_class,
                });
            }
            for result in SHADOW_RESULTS {
                self.shadow.remove(&ShadowLabels {
                    function: name.to_string(),
                    version: version.clone(),
                    result,
                });
            }
            for side in ["primary", "shadow"] {
                self.shadow_seconds.remove(&ShadowSideLabels {
                    function: name.to_string(),
                    version: version.clone(),
                    side,
                });
            }
        }
        let f = FunctionLabels {
            function: name.to_string(),
        };
        self.coldstarts.remove(&f);
        self.rollout_steps.remove(&f);
        self.rollout_rollbacks.remove(&f);
    }

    /// Records that the circuit breaker of `function`'s calls to `destination` is now in
    /// `state` (0 closed, 1 open, 2 half-open); `opened`: it just opened.
    pub fn breaker(&self, function: &str, destination: &str, state: i64, opened: bool) {
        let l = BreakerLabels {
            function: function.to_string(),
            destination: destination.to_string(),
        };
        self.breaker_state.get_or_create(&l).set(state);
        if opened {
            self.breaker_opened.get_or_create(&l).inc();
        }
    }

    /// Removes the breaker series of `function` for `destinations` (it was deleted, or
    /// the breakers are no longer tracked).
    pub fn forget_breakers(&self, function: &str, destinations: &[String]) {
        for d in destinations {
            let l = BreakerLabels {
                function: function.to_string(),
                destination: d.clone(),
            };
            self.breaker_state.remove(&l);
            self.breaker_opened.remove(&l);
        }
    }

    /// Records one component compilation.
    pub fn compiled(&self, took: Duration) {
        self.compile.observe(took.as_secs_f64());
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One version's invocation series (see [`Metrics::version`]).
#[derive(Clone)]
pub struct VersionMetrics {
    /// Indexed like [`Outcome::ALL`].
    outcomes: [Counter; 6],
    /// Indexed like [`STATUS_CLASSES`].
    duration: [Histogram; 5],
    coldstarts: Counter,
}

impl VersionMetrics {
    /// Records one finished request answered `status` (`took` is `None` when it never
    /// ran: refused before admission).
    pub fn record(&self, outcome: Outcome, status: u16, took: Option<Duration>, cold: bool) {
        self.outcomes[outcome as usize].inc();
        if let Some(t) = took {
            self.duration[status_class(status)].observe(t.as_secs_f64());
        }
        if cold {
            self.coldstarts.inc();
        }
    }
}

/// One cache's series (see [`Metrics::cache`]).
#[derive(Clone)]
pub struct CacheMetrics {
    pub hits: Counter,
    pub misses: Counter,
    pub evictions: Counter,
    pub bytes: Gauge<i64, AtomicI64>,
}

/// An instance (or a request) counted in its gauge until dropped.
pub struct ActiveInstance(Gauge<i64, AtomicI64>);

impl Drop for ActiveInstance {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_named_after_the_faas_conventions() {
        let m = Metrics::new();
        m.version("hello", 2)
            .record(Outcome::Timeout, 504, Some(Duration::from_millis(3)), true);
        m.inference(BackendKind::Tract, Device::Cpu, Duration::from_micros(20));
        let guard = m.instance();
        let text = m.encode();
        drop(guard);
        assert!(
            text.contains(
                "kiln_faas_invocations_total{function=\"hello\",version=\"2\",outcome=\"timeout\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("kiln_faas_coldstarts_total{function=\"hello\"} 1"),
            "{text}"
        );
        assert!(text.contains("kiln_faas_active_instances 1"), "{text}");
        assert!(
            text.contains(
                "kiln_nn_inference_duration_seconds_count{backend=\"tract\",device=\"cpu\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("kiln_faas_invoke_duration_seconds_count{function=\"hello\",version=\"2\",status_class=\"5xx\"} 1"),
            "{text}"
        );
        assert!(m.encode().contains("kiln_faas_active_instances 0"));
        m.shadowed("hello", 2, "match", Some((Duration::ZERO, Duration::ZERO)));
        m.forget("hello", [2]);
        let text = m.encode();
        assert!(!text.contains("function=\"hello\""), "{text}");
    }

    #[test]
    fn status_classes_are_bounded() {
        assert_eq!(
            [100, 200, 299, 304, 404, 499, 503, 0, 999].map(|s| STATUS_CLASSES[status_class(s)]),
            [
                "1xx", "2xx", "2xx", "3xx", "4xx", "4xx", "5xx", "5xx", "5xx"
            ]
        );
    }
}
