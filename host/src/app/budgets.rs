//! Keeps every node's view of the tenants' budgets current: every
//! [`REFRESH`](crate::meter::budgets::REFRESH) the month's spend of each budgeted tenant is
//! read from the ledger, thresholds crossed raise `budget.threshold` (once per month,
//! cluster-wide), and the tenants whose hard budget is spent are refused on the data plane.

use std::collections::HashSet;
use std::sync::Arc;

use super::App;
use crate::meter::budgets;

/// Refreshes the budgets while the app lives (nothing without a ledger).
pub(super) fn spawn_budgets(app: &Arc<App>) {
    if app.ledger.is_none() {
        return;
    }
    let weak = Arc::downgrade(app);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(budgets::REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(app) = weak.upgrade() else { return };
            if let Err(e) = app.refresh_budgets().await {
                tracing::warn!("budgets: {e:#}");
            }
        }
    });
}

impl App {
    /// Reads every budget's month so far; alerts on new crossings; sets who is refused.
    pub(crate) async fn refresh_budgets(&self) -> anyhow::Result<()> {
        let Some(ledger) = &self.ledger else {
            return Ok(());
        };
        let mut exhausted = HashSet::new();
        for s in budgets::standings(ledger, crate::unix_ms()).await? {
            let b = &s.budget;
            for &p in &b.alert_at {
                let reached = u128::from(s.spent) * 100 >= u128::from(b.monthly) * u128::from(p);
                if reached && budgets::crossed(ledger, &b.tenant, &s.month, p).await? {
                    tracing::info!(
                        tenant = b.tenant,
                        percent = p,
                        spent = s.spent,
                        "budget threshold crossed"
                    );
                    self.alerts.send(
                        "budget.threshold",
                        serde_json::json!({
                            "tenant": b.tenant,
                            "month": s.month,
                            "percent": p,
                            "spent": s.spent,
                            "monthly": b.monthly,
                            "currency": self.config.pricing.currency,
                            "hard": b.hard,
                        }),
                    );
                }
            }
            if b.hard && s.exhausted {
                exhausted.insert(b.tenant.clone());
            }
        }
        self.budgets_exhausted.set(exhausted);
        Ok(())
    }
}
