//! The feature store's domain core: the read and write paths over the registry and the
//! storage engine. Functions here block (they call the engine) and run on the blocking pool.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::registry::Registry;
use crate::storage::Store;

mod read;
mod write;

/// Shared state of the read and write paths.
#[derive(Debug)]
pub struct Core {
    /// The registered surfaces, sources and features; fixed for the server's life.
    pub registry: Arc<Registry>,
    /// The storage engine.
    pub store: Arc<dyn Store>,
    /// The source of "now" for expiry and idempotency.
    pub clock: Arc<dyn Clock>,
    /// How long an idempotency key's answer is replayed.
    pub idempotency_window: Duration,
}
