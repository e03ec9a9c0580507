//! Cost budgets per tenant and month (UTC), in micro-units of the price plan's currency,
//! computed from the usage ledger (every node's records, in cluster mode). A budget raises
//! a `budget.threshold` alert once per threshold crossed in a month, cluster-wide (the
//! crossing is recorded in the ledger's database before the alert is sent), and a hard
//! budget refuses the tenant's requests with 429 `budget.exhausted` once the month's cost
//! reaches it. Every node refreshes the spend of budgeted tenants every [`REFRESH`]; the
//! data plane reads only an in-memory set.
//!
//! Budgets live beside the ledger (SQLite `usage.db`, or the cluster's PostgreSQL), so
//! they need metering on.

use std::collections::HashSet;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Ledger;
use super::ledger::{Arg, Cell};

/// How often every node recomputes the spend of budgeted tenants.
pub const REFRESH: Duration = Duration::from_secs(2);

/// One tenant's monthly budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    #[serde(default)]
    pub tenant: String,
    /// Micro-units of the price plan's currency per calendar month (UTC).
    pub monthly: u64,
    /// Percentages of the budget whose crossing raises an alert (default 50, 80, 100).
    #[serde(default = "default_alert_at")]
    pub alert_at: Vec<u8>,
    /// Refuse the tenant's requests once the month's cost reaches the budget.
    #[serde(default)]
    pub hard: bool,
}

fn default_alert_at() -> Vec<u8> {
    vec![50, 80, 100]
}

impl Budget {
    /// Checks the amounts.
    pub fn check(&self) -> Result<(), String> {
        if self.monthly == 0 || self.monthly > i64::MAX as u64 {
            return Err("monthly must be a positive number of micro-units".into());
        }
        if self.alert_at.len() > 10 || self.alert_at.iter().any(|p| !(1..=200).contains(p)) {
            return Err("alert_at: at most 10 percentages from 1 to 200".into());
        }
        Ok(())
    }
}

/// A budget with the month's spend so far.
#[derive(Debug, Clone, Serialize)]
pub struct Standing {
    #[serde(flatten)]
    pub budget: Budget,
    /// The month (`2026-12`, UTC) and its cost so far.
    pub month: String,
    pub spent: u64,
    pub exhausted: bool,
}

/// The month of `ms` (`YYYY-MM`, UTC) and when it began (unix ms).
pub fn month_of(ms: i64) -> (String, i64) {
    let ts = jiff::Timestamp::from_millisecond(ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let date = ts.to_zoned(jiff::tz::TimeZone::UTC).date();
    let first = date.first_of_month();
    let start = first
        .to_zoned(jiff::tz::TimeZone::UTC)
        .map_or(0, |z| z.timestamp().as_millisecond());
    (format!("{:04}-{:02}", date.year(), date.month()), start)
}

/// Sets (or replaces) a tenant's budget.
pub async fn set(ledger: &Ledger, b: &Budget) -> anyhow::Result<()> {
    let m = ledger.marker();
    ledger
        .execute(
            format!(
                "INSERT INTO budgets (tenant, monthly, alert_at, hard, updated_ms)
                 VALUES ({}, {}, {}, {}, {})
                 ON CONFLICT (tenant) DO UPDATE SET monthly = excluded.monthly,
                     alert_at = excluded.alert_at, hard = excluded.hard,
                     updated_ms = excluded.updated_ms",
                m(1),
                m(2),
                m(3),
                m(4),
                m(5)
            ),
            vec![
                Arg::Text(b.tenant.clone()),
                Arg::Int(b.monthly as i64),
                Arg::Text(serde_json::to_string(&b.alert_at)?),
                Arg::Int(i64::from(b.hard)),
                Arg::Int(crate::unix_ms()),
            ],
        )
        .await?;
    Ok(())
}

/// Removes a tenant's budget; false when it had none.
pub async fn delete(ledger: &Ledger, tenant: &str) -> anyhow::Result<bool> {
    let m = ledger.marker();
    let n = ledger
        .execute(
            format!("DELETE FROM budgets WHERE tenant = {}", m(1)),
            vec![Arg::Text(tenant.to_string())],
        )
        .await?;
    Ok(n > 0)
}

/// Every budget with its month so far (`now_ms` says which month).
pub async fn standings(ledger: &Ledger, now_ms: i64) -> anyhow::Result<Vec<Standing>> {
    let rows = ledger
        .rows(
            format!(
                "SELECT tenant, monthly, alert_at, hard FROM budgets ORDER BY {}",
                ledger.binary_order("tenant")
            ),
            vec![],
        )
        .await?;
    let (month, start) = month_of(now_ms);
    let m = ledger.marker();
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let budget = Budget {
            tenant: r[0].text().to_string(),
            monthly: r[1].int().max(0) as u64,
            alert_at: serde_json::from_str(r[2].text()).unwrap_or_default(),
            hard: r[3].int() != 0,
        };
        let spent = ledger
            .rows(
                format!(
                    "SELECT CAST(SUM(cost) AS BIGINT) FROM usage WHERE start_ms >= {} AND tenant = {}",
                    m(1),
                    m(2)
                ),
                vec![Arg::Int(start), Arg::Text(budget.tenant.clone())],
            )
            .await?
            .first()
            .and_then(|r| r.first())
            .map_or(0, Cell::int)
            .max(0) as u64;
        out.push(Standing {
            exhausted: spent >= budget.monthly,
            budget,
            month: month.clone(),
            spent,
        });
    }
    Ok(out)
}

/// Records that `tenant` crossed `percent` in `month`; true the first time (on any node).
pub async fn crossed(
    ledger: &Ledger,
    tenant: &str,
    month: &str,
    percent: u8,
) -> anyhow::Result<bool> {
    let m = ledger.marker();
    let n = ledger
        .execute(
            format!(
                "INSERT INTO budget_alerts (tenant, month, percent, at_ms) VALUES ({}, {}, {}, {})
                 ON CONFLICT (tenant, month, percent) DO NOTHING",
                m(1),
                m(2),
                m(3),
                m(4)
            ),
            vec![
                Arg::Text(tenant.to_string()),
                Arg::Text(month.to_string()),
                Arg::Int(i64::from(percent)),
                Arg::Int(crate::unix_ms()),
            ],
        )
        .await?;
    Ok(n > 0)
}

/// The tenants whose hard budget is spent, as the data plane reads them.
#[derive(Default)]
pub struct Exhausted {
    any: AtomicBool,
    tenants: RwLock<HashSet<String>>,
}

impl Exhausted {
    /// Whether `tenant`'s requests are refused (one atomic load when nobody is).
    pub fn contains(&self, tenant: &str) -> bool {
        self.any.load(Ordering::Relaxed)
            && self
                .tenants
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(tenant)
    }

    /// Replaces the set.
    pub fn set(&self, tenants: HashSet<String>) {
        let any = !tenants.is_empty();
        *self.tenants.write().unwrap_or_else(|p| p.into_inner()) = tenants;
        self.any.store(any, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_begin_on_the_first_at_midnight_utc() {
        // 2026-12-07T18:31:35Z
        let (month, start) = month_of(1_796_668_295_000);
        assert_eq!(month, "2026-12");
        assert_eq!(start, 1_796_083_200_000); // 2026-12-01T00:00:00Z
    }

    #[test]
    fn budgets_check_their_amounts() {
        let b = |monthly: u64, alert_at: Vec<u8>| Budget {
            tenant: "t".into(),
            monthly,
            alert_at,
            hard: false,
        };
        assert!(b(100, vec![50, 100]).check().is_ok());
        assert!(b(0, vec![]).check().is_err());
        assert!(b(1, vec![0]).check().is_err());
    }
}
