//! The HTTP front on hyper + tokio: the accept loop (HTTP/1.1 and h2c), header-read timeout
//! against slow clients, graceful drain on shutdown, request ids, and routing between the
//! data plane (`/fn/...`), the control plane (`/v1/...`) and `/healthz`.

mod body;
mod data_plane;
mod listener;
mod pace;
mod router;
mod shadow;
pub mod tls;
mod usage;
mod whole;

pub use body::{Body, BodyError, DRAIN_CAP, LimitedBody, drain, empty, full};
pub use data_plane::{PREDICTION_HEADER, prediction_of};
pub use listener::serve;
pub use pace::{MinRate, paced, too_slow, too_slow_message};
pub use router::{handle, json_response};
