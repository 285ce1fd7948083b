//! Set-up shared by the benchmarks: a core over a RocksDB store in a temporary directory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use featurestore::domain::{AgeBand, UserStateUpdate};
use featurestore_server::clock::Clock;
use featurestore_server::config::{Durability, StorageConfig};
use featurestore_server::core::{Core, CoreOptions};
use featurestore_server::policy::Policy;
use featurestore_server::registry::Registry;
use featurestore_server::storage::{RocksStore, Store};

/// A core on a store in `directory/db` (WAL on, not synced), with the default storage
/// settings; its ledger and backups live in `directory` too.
pub fn open_core(
    directory: &Path,
    registry: Arc<Registry>,
    policy: Arc<Policy>,
    clock: Arc<dyn Clock>,
) -> Core {
    let store: Arc<dyn Store> = Arc::new(
        RocksStore::open(
            &directory.join("db"),
            &StorageConfig::default(),
            Durability::Buffered,
            Duration::from_secs(3600),
            Arc::clone(&clock),
        )
        .expect("open store"),
    );
    let options = CoreOptions::under(directory);
    Core::new(registry, policy, store, clock, options).expect("core")
}

/// An adult in the US with linked Facebook and Instagram accounts: every signal passes.
pub fn us_adult(user_id: u64) -> UserStateUpdate {
    UserStateUpdate {
        user_id,
        jurisdiction: "US".to_string(),
        age_band: AgeBand::Adult,
        linked_apps: vec!["facebook".to_string(), "instagram".to_string()],
        ads_objection: false,
        expected_generation: None,
    }
}
