//! A budget of bytes shared by every request that holds data in memory (a request body
//! read whole): each takes its share before it reads and gives it back when done, and one
//! that would go over is refused at once rather than queued, so memory stays bounded under
//! any flood and the refusal is fast.
//!
//! Each tenant may hold at most a part of the whole (`[server] body_buffer_tenant_percent`),
//! so one tenant's flood (its own keys, or anyone calling its public functions) is refused
//! within its part and leaves the rest to everyone else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Bytes that may be held at once, over all holders, and per tenant.
#[derive(Debug, Clone)]
pub struct ByteBudget {
    bytes: Arc<Semaphore>,
    total: u64,
    /// Bytes one tenant may hold at once.
    per_tenant: u64,
    /// Bytes each tenant holds now (only tenants holding some).
    tenants: Arc<Mutex<HashMap<Arc<str>, u64>>>,
}

/// A share of a [`ByteBudget`] held for one tenant, given back when dropped; it can grow
/// as more arrives.
#[derive(Debug)]
pub struct BudgetShare {
    budget: ByteBudget,
    tenant: Arc<str>,
    permits: Option<OwnedSemaphorePermit>,
}

/// The budget cannot give that many bytes now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverBudget {
    /// Every tenant's requests together hold too much.
    #[error("{wanted} more bytes would exceed the server's buffer budget of {total} bytes")]
    Server { wanted: u64, total: u64 },
    /// This tenant's requests hold their whole part.
    #[error(
        "{wanted} more bytes would exceed tenant {tenant}'s part of the server's buffer budget ({part} bytes)"
    )]
    Tenant {
        wanted: u64,
        tenant: Arc<str>,
        part: u64,
    },
}

impl ByteBudget {
    /// A budget of `total` bytes (at most `u32::MAX` counted per share step), of which
    /// one tenant may hold `per_tenant`.
    pub fn new(total: u64, per_tenant: u64) -> Self {
        let total = total.min(Semaphore::MAX_PERMITS as u64);
        ByteBudget {
            bytes: Arc::new(Semaphore::new(total as usize)),
            total,
            per_tenant: per_tenant.min(total),
            tenants: Arc::default(),
        }
    }

    /// An empty share for `tenant`, to grow with [`BudgetShare::grow`].
    pub fn share(&self, tenant: &Arc<str>) -> BudgetShare {
        BudgetShare {
            budget: self.clone(),
            tenant: tenant.clone(),
            permits: None,
        }
    }

    fn tenants(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, u64>> {
        // Each update is one map operation: a poisoned lock is safe to reuse.
        self.tenants.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes held now, over all shares.
    #[cfg(test)]
    fn held(&self) -> u64 {
        self.total - self.bytes.available_permits() as u64
    }
}

impl BudgetShare {
    /// Takes `n` more bytes, or refuses at once when the budget (or the tenant's part of
    /// it) lacks them.
    pub fn grow(&mut self, n: u64) -> Result<(), OverBudget> {
        if n == 0 {
            return Ok(());
        }
        let budget = &self.budget;
        let over = || OverBudget::Server {
            wanted: n,
            total: budget.total,
        };
        let permits = u32::try_from(n).map_err(|_| over())?;
        let mut tenants = budget.tenants();
        let held = tenants.get(&self.tenant).copied().unwrap_or(0);
        if held.saturating_add(n) > budget.per_tenant {
            return Err(OverBudget::Tenant {
                wanted: n,
                tenant: self.tenant.clone(),
                part: budget.per_tenant,
            });
        }
        match budget.bytes.clone().try_acquire_many_owned(permits) {
            Ok(p) => {
                match &mut self.permits {
                    Some(mine) => mine.merge(p),
                    None => self.permits = Some(p),
                }
                tenants.insert(self.tenant.clone(), held + n);
                Ok(())
            }
            Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => Err(over()),
        }
    }

    /// Bytes this share holds.
    pub fn bytes(&self) -> u64 {
        self.permits.as_ref().map_or(0, |p| p.num_permits() as u64)
    }
}

impl Drop for BudgetShare {
    fn drop(&mut self) {
        let mine = self.bytes();
        if mine == 0 {
            return;
        }
        let mut tenants = self.budget.tenants();
        if let Some(held) = tenants.get_mut(&self.tenant) {
            *held = held.saturating_sub(mine);
            if *held == 0 {
                tenants.remove(&self.tenant);
            }
        }
        // The permits go back to the semaphore when `self.permits` drops, after this.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_refused_past_the_total_and_given_back_on_drop() {
        let budget = ByteBudget::new(100, 100);
        let t: Arc<str> = "t".into();
        let mut a = budget.share(&t);
        a.grow(60).unwrap();
        a.grow(30).unwrap();
        assert_eq!((a.bytes(), budget.held()), (90, 90));
        let mut b = budget.share(&"u".into());
        assert_eq!(
            b.grow(20),
            Err(OverBudget::Server {
                wanted: 20,
                total: 100
            })
        );
        b.grow(10).unwrap();
        drop(a);
        assert_eq!(budget.held(), 10);
        b.grow(90).unwrap();
        drop(b);
        assert_eq!(budget.held(), 0);
        assert!(budget.tenants().is_empty());
    }

    #[test]
    fn one_tenant_holds_at_most_its_part_and_leaves_the_rest_to_others() {
        let budget = ByteBudget::new(100, 40);
        let (flood, other): (Arc<str>, Arc<str>) = ("flood".into(), "other".into());
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut s = budget.share(&flood);
            s.grow(10).unwrap();
            held.push(s);
        }
        let mut fifth = budget.share(&flood);
        let refused = fifth.grow(10).unwrap_err();
        assert!(
            matches!(&refused, OverBudget::Tenant { part: 40, .. }),
            "{refused}"
        );
        assert!(refused.to_string().contains("tenant flood"), "{refused}");
        // Everyone else still has the other 60 (each within a part of its own).
        let mut o = budget.share(&other);
        o.grow(40).unwrap();
        let mut third = budget.share(&"third".into());
        third.grow(20).unwrap();
        assert_eq!(budget.held(), 100);
        held.pop();
        fifth
            .grow(10)
            .expect("a share given back makes room in the part");
        assert!(matches!(
            budget.share(&"fourth".into()).grow(1),
            Err(OverBudget::Server { .. })
        ));
        drop((held, fifth, o, third));
        assert_eq!(budget.held(), 0);
        assert!(budget.tenants().is_empty(), "no tenant left counted");
    }
}
