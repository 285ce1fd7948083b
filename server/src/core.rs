//! The feature store's core: the read path (`read.rs`), the write path (`write.rs`), the
//! policy in force and the re-validation of stored values (`policy.rs`), users' states and
//! erasures (`privacy.rs`), bulk loads (`bulk_loads.rs`), and what the rest of the server
//! may ask of the engine (`engine.rs`), over the registry, the policy and the storage
//! seam. Functions here block (they call the engine) and run on the blocking pool or a
//! thread of their own.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::audit::{AuditAction, AuditEntry, Pseudonym, pseudonym};
use crate::clock::Clock;
use crate::config::BulkLoadConfig;
use crate::erasure::{FileLedger, Ledger};
use crate::error::Error;
use crate::policy::Policy;
use crate::registry::Registry;
use crate::storage::Store;
use policy::VALIDATED_POLICY_KEY;

mod bulk_loads;
#[cfg(test)]
mod core_only;
mod engine;
#[cfg(test)]
mod model;
mod policy;
mod privacy;
#[cfg(test)]
mod races;
mod read;
pub mod read_tally;
#[cfg(test)]
mod tests;
mod write;

pub use bulk_loads::{ChunkOutcome, LoadAttachment, PreparedChunk};
pub use policy::{PolicyInForce, PurgeStatus};

use bulk_loads::LoadState;
use policy::PolicyState;
use privacy::PrivacyState;
use write::WriteSettings;

/// The feature store's core: the read and write paths, the policy in force, users' states
/// and erasures, and bulk loads, each concern with its own state.
#[derive(Debug)]
pub struct Core {
    /// The registered surfaces, sources and features; fixed for the server's life.
    pub registry: Arc<Registry>,
    /// The storage engine; private, so that nothing goes around the core's rules.
    store: Arc<dyn Store>,
    /// The source of "now" for expiry, retention and idempotency.
    pub clock: Arc<dyn Clock>,
    /// What the write path needs beyond the policy.
    writes: WriteSettings,
    /// The policy in force, its reloads and purges.
    policy: PolicyState,
    /// Users' state changes and erasures.
    privacy: PrivacyState,
    /// Bulk-load jobs.
    loads: LoadState,
    /// Where backups are written.
    backup_dir: PathBuf,
    /// Set at shutdown: purges and sweeps stop between two users.
    stopping: std::sync::atomic::AtomicBool,
    /// Reads large enough to be split running now (see `core/read.rs`).
    large_reads: std::sync::atomic::AtomicUsize,
}

/// A store in `directory` with a small block cache, for the domain's tests.
#[cfg(test)]
fn test_store(
    directory: &std::path::Path,
    clock: Arc<crate::clock::ManualClock>,
) -> crate::storage::RocksStore {
    crate::storage::RocksStore::open(
        &directory.join("db"),
        &crate::config::StorageConfig {
            block_cache_bytes: 1 << 20,
            ..crate::config::StorageConfig::default()
        },
        crate::config::Durability::Buffered,
        Duration::from_secs(3600),
        clock,
    )
    .expect("open the store")
}

/// A core on `store` with the embedded registry and policy bundle, its files under
/// `directory`, for the core's tests.
#[cfg(test)]
fn test_core(
    directory: &std::path::Path,
    store: Arc<dyn Store>,
    clock: Arc<crate::clock::ManualClock>,
) -> Core {
    let registry = Arc::new(Registry::embedded_default());
    let policy = Arc::new(Policy::embedded_default(&registry).expect("default bundle"));
    Core::new(
        registry,
        policy,
        store,
        clock,
        CoreOptions::under(directory),
    )
    .expect("core")
}

/// A row of `interest_hiking` = `value` for `user_id` on the Facebook feed, from an
/// interaction at `interaction_time` (Unix microseconds), decided on generation 1, for the
/// core's tests.
#[cfg(test)]
fn hiking_row(user_id: u64, value: f32, interaction_time: i64) -> featurestore::domain::WriteRow {
    use featurestore::domain::{FeatureWrite, Provenance, Timestamp, Value, WriteRow};
    WriteRow {
        user_id,
        target_surfaces: vec!["facebook_feed".to_string()],
        provenance: Provenance {
            source: "engagement".to_string(),
            origin_app: "facebook".to_string(),
            interaction_time: Timestamp::from_unix_micros(interaction_time),
            producer_id: "tests@v1".to_string(),
            microphone_permission_granted: false,
        },
        features: vec![FeatureWrite {
            name: "interest_hiking".to_string(),
            value: Value::Float(value),
            topic: None,
            ttl: None,
        }],
        user_state_generation: 1,
    }
}

/// An adult in `jurisdiction` with a Facebook account only, for the core's tests.
#[cfg(test)]
fn adult_on_facebook(user_id: u64, jurisdiction: &str) -> featurestore::domain::UserStateUpdate {
    featurestore::domain::UserStateUpdate {
        user_id,
        jurisdiction: jurisdiction.to_string(),
        age_band: featurestore::domain::AgeBand::Adult,
        linked_apps: vec!["facebook".to_string()],
        ads_objection: false,
        expected_generation: None,
    }
}

/// Settings of a [`Core`] beyond its parts.
#[derive(Clone, Debug)]
pub struct CoreOptions {
    /// Where a policy reload reads the bundle; `None` for the embedded default.
    pub policy_path: Option<PathBuf>,
    /// How long an idempotency key's answer is replayed.
    pub idempotency_window: Duration,
    /// How far past the clock an interaction time may be (producers' clocks run a little
    /// ahead); later ones are refused with INTERACTION_TIME_IN_FUTURE.
    pub interaction_time_skew_allowance: Duration,
    /// The erasure ledger file; `None` keeps the ledger in the store (an engine every
    /// server shares).
    pub ledger_path: Option<PathBuf>,
    /// Where backups are written.
    pub backup_dir: PathBuf,
    /// Bulk-load settings.
    pub bulk_load: BulkLoadConfig,
}

impl CoreOptions {
    /// The embedded default policy, a one-hour idempotency window, and the ledger,
    /// backups and bulk-load staging all kept under `directory`.
    pub fn under(directory: &std::path::Path) -> CoreOptions {
        CoreOptions {
            policy_path: None,
            idempotency_window: Duration::from_secs(3600),
            interaction_time_skew_allowance: crate::config::DEFAULT_INTERACTION_TIME_SKEW_ALLOWANCE,
            ledger_path: Some(directory.join("erasures.jsonl")),
            backup_dir: directory.join("backups"),
            bulk_load: BulkLoadConfig {
                staging_dir: directory.join("staging"),
                ..BulkLoadConfig::default()
            },
        }
    }
}

impl Core {
    pub fn new(
        registry: Arc<Registry>,
        policy: Arc<Policy>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        options: CoreOptions,
    ) -> Result<Core, Error> {
        let ledger = match &options.ledger_path {
            Some(path) => Ledger::File(
                FileLedger::open(path).map_err(|error| Error::Ledger(error.to_string()))?,
            ),
            None => Ledger::InStore(Arc::clone(&store)),
        };
        Ok(Core {
            registry,
            policy: PolicyState::new(policy, options.policy_path, clock.now()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            large_reads: std::sync::atomic::AtomicUsize::new(0),
            store,
            clock,
            writes: WriteSettings {
                idempotency_window: options.idempotency_window,
                interaction_time_skew_allowance: options.interaction_time_skew_allowance,
            },
            privacy: PrivacyState::new(ledger),
            backup_dir: options.backup_dir,
            loads: LoadState::new(options.bulk_load),
        })
    }

    /// A user's audit pseudonym; its key is created when missing if `create`. `None` for a
    /// user whose key does not exist (never audited, or erased).
    pub fn pseudonym(&self, user_id: u64, create: bool) -> Result<Option<Pseudonym>, Error> {
        Ok(self
            .store
            .pseudonym_key(user_id, create)?
            .map(|key| pseudonym(&key, user_id)))
    }

    /// An audit entry stamped with the current time and bundle.
    pub fn audit_entry(
        &self,
        action: AuditAction,
        caller: &str,
        user_id: Option<u64>,
    ) -> Result<AuditEntry, Error> {
        let user = match user_id {
            Some(user_id) => self.pseudonym(user_id, true)?,
            None => None,
        };
        Ok(AuditEntry {
            time: self.clock.now(),
            action,
            caller: caller.to_string(),
            bundle_hash: self.policy().hash.clone(),
            user,
            surfaces: String::new(),
            subject: String::new(),
            reasons: 0,
        })
    }

    /// Re-applies the erasure ledger, then checks that every stored value was validated
    /// under the bundle in force; when not (the server restarted with another bundle),
    /// starts a purge. Runs before the server serves.
    pub fn start(self: &Arc<Self>) -> Result<(), Error> {
        // Stands for a long recovery in the tests of what the server says meanwhile.
        fail::fail_point!("core-start");
        self.reapply_erasures()?;
        self.recover_loads()?;
        let hash = self.policy().hash.clone();
        if self.store.read_meta(VALIDATED_POLICY_KEY)?.as_deref() == Some(hash.as_bytes()) {
            return Ok(());
        }
        if self.store.users_with_rows(0, 1)?.is_empty() {
            self.store
                .write_meta(VALIDATED_POLICY_KEY, hash.as_bytes())?;
            return Ok(());
        }
        tracing::info!(bundle = %hash, "stored values were validated under another bundle; purging");
        Arc::clone(self).spawn_purge();
        Ok(())
    }

    /// Stops purges and sweeps between two users and waits for the latest purge thread;
    /// an unfinished purge runs again at the next start.
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if !self.join_purge() {
            tracing::error!("the policy purge thread panicked");
        }
        self.forget_probe();
    }
}
