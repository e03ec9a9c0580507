//! What every layer shares and none owns: content digests, the limits a version runs
//! under, rates, the byte budget buffered bodies share, times as the API reads and writes
//! them, values sealed at rest, and the [`BlobSource`] through which the runtime and `nn`
//! reach blob bytes without knowing where they are stored.

mod blobs;
mod budget;
mod digest;
mod limits;
mod rate;
pub mod seal;
pub mod time;

pub use blobs::BlobSource;
pub use budget::{BudgetShare, ByteBudget, OverBudget};
pub use digest::{Digest, DigestError};
pub use limits::{LimitError, Limits, LimitsSpec};
pub use rate::{Period, Rate};
