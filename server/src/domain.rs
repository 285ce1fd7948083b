//! The feature store's domain core: the read and write paths over the registry, the policy
//! and the storage engine. Functions here block (they call the engine) and run on the
//! blocking pool.

use std::sync::Arc;
use std::time::Duration;

use featurestore::domain::UserStateUpdate;
use parking_lot::RwLock;

use crate::clock::Clock;
use crate::error::Error;
use crate::policy::Policy;
use crate::registry::Registry;
use crate::storage::{Store, UserState};

mod read;
#[cfg(test)]
mod tests;
mod write;

/// Shared state of the read and write paths.
#[derive(Debug)]
pub struct Core {
    /// The registered surfaces, sources and features; fixed for the server's life.
    pub registry: Arc<Registry>,
    /// The policy bundle in force. Each request takes the `Arc` once, so a reload never
    /// changes the policy under a request in flight.
    policy: RwLock<Arc<Policy>>,
    /// The storage engine.
    pub store: Arc<dyn Store>,
    /// The source of "now" for expiry, retention and idempotency.
    pub clock: Arc<dyn Clock>,
    /// How long an idempotency key's answer is replayed.
    pub idempotency_window: Duration,
}

impl Core {
    pub fn new(
        registry: Arc<Registry>,
        policy: Arc<Policy>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        idempotency_window: Duration,
    ) -> Core {
        Core {
            registry,
            policy: RwLock::new(policy),
            store,
            clock,
            idempotency_window,
        }
    }

    /// The policy bundle in force now.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read())
    }

    /// Creates or replaces a user's state.
    pub fn set_user_state(&self, update: &UserStateUpdate) -> Result<UserState, Error> {
        Ok(self.store.set_user_state(update, self.clock.now())?)
    }

    /// A user's state.
    pub fn user_state(&self, user_id: u64) -> Result<UserState, Error> {
        self.store
            .read_user_states(&[user_id])?
            .pop()
            .flatten()
            .ok_or(Error::NoUserState { user_id })
    }
}
