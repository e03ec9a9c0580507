//! A budget of bytes shared by every request that holds data in memory (a request body
//! read whole): each takes its share before it reads and gives it back when done, and one
//! that would go over is refused at once rather than queued, so memory stays bounded under
//! any flood and the refusal is fast.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Bytes that may be held at once, over all holders.
#[derive(Debug, Clone)]
pub struct ByteBudget {
    bytes: Arc<Semaphore>,
    total: u64,
}

/// A share of a [`ByteBudget`], given back when dropped; it can grow as more arrives.
#[derive(Debug)]
pub struct BudgetShare {
    budget: ByteBudget,
    permits: Option<OwnedSemaphorePermit>,
}

/// The budget cannot give that many bytes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{wanted} more bytes would exceed the server's buffer budget of {total} bytes")]
pub struct OverBudget {
    pub wanted: u64,
    pub total: u64,
}

impl ByteBudget {
    /// A budget of `total` bytes (at most `u32::MAX` counted per share step).
    pub fn new(total: u64) -> Self {
        let total = total.min(Semaphore::MAX_PERMITS as u64);
        ByteBudget {
            bytes: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// An empty share, to grow with [`BudgetShare::grow`].
    pub fn share(&self) -> BudgetShare {
        BudgetShare {
            budget: self.clone(),
            permits: None,
        }
    }

    /// Bytes held now, over all shares.
    #[cfg(test)]
    fn held(&self) -> u64 {
        self.total - self.bytes.available_permits() as u64
    }
}

impl BudgetShare {
    /// Takes `n` more bytes, or refuses at once when the budget lacks them.
    pub fn grow(&mut self, n: u64) -> Result<(), OverBudget> {
        if n == 0 {
            return Ok(());
        }
        let over = OverBudget {
            wanted: n,
            total: self.budget.total,
        };
        let n = u32::try_from(n).map_err(|_| over)?;
        match self.budget.bytes.clone().try_acquire_many_owned(n) {
            Ok(p) => {
                match &mut self.permits {
                    Some(held) => held.merge(p),
                    None => self.permits = Some(p),
                }
                Ok(())
            }
            Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => Err(over),
        }
    }

    /// Bytes this share holds.
    pub fn bytes(&self) -> u64 {
        self.permits.as_ref().map_or(0, |p| p.num_permits() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_refused_past_the_total_and_given_back_on_drop() {
        let budget = ByteBudget::new(100);
        let mut a = budget.share();
        a.grow(60).unwrap();
        a.grow(30).unwrap();
        assert_eq!((a.bytes(), budget.held()), (90, 90));
        let mut b = budget.share();
        assert_eq!(
            b.grow(20),
            Err(OverBudget {
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
    }
}
