//! Usage records and the price plan.
//!
//! One [`UsageRecord`] per request (cache hits and refused requests included) says what the
//! request used; [`Pricing::cost`] turns it into an integer cost in micro-units of the plan's
//! currency. Every term is an integer computed from integers and floored on its own, so a
//! bill can be recomputed exactly from the records:
//!
//! ```text
//! request   = per_request, or per_request * (100 - cache_hit_discount_percent) / 100 on a
//!             response-cache hit, or 0 for a request refused before it ran
//! memory    = per_gb_second * mem_mib_ms / 1_024_000
//!             where mem_mib_ms = ceil(memory_peak_bytes / 2^20) * wall_us / 1000
//! cpu       = per_cpu_ms * cpu_us / 1000
//! inference = per_inference_ms_cpu * inference_cpu_us / 1000
//!           + per_inference_ms_gpu * inference_gpu_us / 1000
//! ```

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Outcome;

/// What one request used.
#[derive(Debug, Clone)]
pub struct UsageRecord {
    /// The `x-kiln-request-id` answered to the client: unique, makes replays count once.
    pub request_id: String,
    /// Who pays (`anonymous` until API keys exist).
    pub tenant: Arc<str>,
    pub function: Arc<str>,
    pub version: u32,
    /// Unix milliseconds when the request reached the function.
    pub start_ms: i64,
    /// From routing to the last byte of the response.
    pub wall_us: u64,
    /// CPU time running the guest (its code and synchronous host calls; inference is
    /// counted apart, waiting never).
    pub cpu_us: u64,
    /// Largest total linear memory the instance had.
    pub memory_peak_bytes: u64,
    pub inference_cpu_us: u64,
    pub inference_gpu_us: u64,
    /// Most rows in a backend run the request's computes shared (more than its own when
    /// batching merged it with others; 0 without inference).
    pub batch_rows: u32,
    /// Request body bytes read.
    pub bytes_in: u64,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// The version had to be mapped from disk first.
    pub cold: bool,
    /// Response cache: `hit`, `miss`, `bypass`, or `off` for functions without one.
    pub cache: &'static str,
    pub outcome: Outcome,
    /// HTTP status answered.
    pub status: u16,
    /// Computed by [`Pricing::cost`] when the record is made.
    pub cost: u64,
    /// What the request predicted: the guest's `x-kiln-prediction`, or the class its
    /// model's output named (label, or argmax of class scores); `None` otherwise.
    pub prediction: Option<String>,
}

impl UsageRecord {
    /// Memory × time in MiB-milliseconds (the billed memory quantity).
    pub fn mem_mib_ms(&self) -> u64 {
        let mib = self.memory_peak_bytes.div_ceil(1 << 20);
        mul_div(mib, self.wall_us, 1000)
    }
}

/// `a * b / d` without overflow (saturating at `u64::MAX`).
fn mul_div(a: u64, b: u64, d: u64) -> u64 {
    u64::try_from(u128::from(a) * u128::from(b) / u128::from(d)).unwrap_or(u64::MAX)
}

/// The price plan (`[pricing]` in the server config); every price is an integer number of
/// micro-units of `currency`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pricing {
    pub currency: String,
    pub per_request: u64,
    pub per_gb_second: u64,
    pub per_cpu_ms: u64,
    pub per_inference_ms_cpu: u64,
    pub per_inference_ms_gpu: u64,
    /// Percent taken off `per_request` when the response cache answers.
    pub cache_hit_discount_percent: u64,
}

impl Default for Pricing {
    /// A plan near common serverless list prices, in micro-USD.
    fn default() -> Self {
        Pricing {
            currency: "USD".into(),
            per_request: 2,
            per_gb_second: 17,
            per_cpu_ms: 1,
            per_inference_ms_cpu: 1,
            per_inference_ms_gpu: 10,
            cache_hit_discount_percent: 50,
        }
    }
}

impl Pricing {
    /// Checks the plan once at startup.
    pub fn validate(&self) -> Result<(), String> {
        if self.cache_hit_discount_percent > 100 {
            return Err("pricing.cache_hit_discount_percent must be between 0 and 100".into());
        }
        if self.currency.is_empty() {
            return Err("pricing.currency must not be empty".into());
        }
        Ok(())
    }

    /// The cost of `r` in micro-units (see the module docs for the formula).
    pub fn cost(&self, r: &UsageRecord) -> u64 {
        let request = match (r.outcome, r.cache) {
            (Outcome::Rejected, _) => 0,
            (_, "hit") => mul_div(
                self.per_request,
                100 - self.cache_hit_discount_percent.min(100),
                100,
            ),
            _ => self.per_request,
        };
        request
            .saturating_add(mul_div(self.per_gb_second, r.mem_mib_ms(), 1_024_000))
            .saturating_add(mul_div(self.per_cpu_ms, r.cpu_us, 1000))
            .saturating_add(mul_div(self.per_inference_ms_cpu, r.inference_cpu_us, 1000))
            .saturating_add(mul_div(self.per_inference_ms_gpu, r.inference_gpu_us, 1000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> UsageRecord {
        UsageRecord {
            request_id: "r".into(),
            tenant: "anonymous".into(),
            function: "f".into(),
            version: 1,
            start_ms: 0,
            wall_us: 2_500,
            cpu_us: 1_999,
            memory_peak_bytes: (3 << 20) + 1,
            inference_cpu_us: 10_000,
            inference_gpu_us: 500,
            batch_rows: 0,
            bytes_in: 0,
            bytes_out: 0,
            cold: false,
            cache: "miss",
            outcome: Outcome::Ok,
            status: 200,
            cost: 0,
            prediction: None,
        }
    }

    #[test]
    fn cost_is_the_documented_integer_formula() {
        let p = Pricing {
            currency: "USD".into(),
            per_request: 100,
            per_gb_second: 1_024_000,
            per_cpu_ms: 7,
            per_inference_ms_cpu: 3,
            per_inference_ms_gpu: 40,
            cache_hit_discount_percent: 80,
        };
        let r = record();
        // 4 MiB (3 MiB + 1 byte, rounded up) for 2.5 ms = 10 MiB-ms.
        assert_eq!(r.mem_mib_ms(), 10);
        // 100 + 1_024_000*10/1_024_000 + 7*1999/1000 + 3*10 + 40*500/1000
        assert_eq!(p.cost(&r), 100 + 10 + 13 + 30 + 20);
        let hit = UsageRecord {
            cache: "hit",
            wall_us: 0,
            cpu_us: 0,
            inference_cpu_us: 0,
            inference_gpu_us: 0,
            batch_rows: 0,
            ..record()
        };
        assert_eq!(p.cost(&hit), 20);
        let rejected = UsageRecord {
            outcome: Outcome::Rejected,
            ..hit
        };
        assert_eq!(p.cost(&rejected), 0);
        // Huge values saturate instead of wrapping.
        let huge = UsageRecord {
            cpu_us: u64::MAX,
            ..record()
        };
        let dear = Pricing {
            per_cpu_ms: 2000,
            ..p
        };
        assert_eq!(dear.cost(&huge), u64::MAX);
    }
}
