//! The serving benchmarks' dataset — users × 3 surfaces × 20 floats + a 64-float
//! embedding — and a small in-process store holding it: what the read path's
//! micro-benchmark and its instruction-count check measure.

use std::sync::Arc;
use std::time::Duration;

use featurestore::domain::{
    FeatureWrite, Provenance, ReadKey, ReadRequest, Value, WriteRequest, WriteRow,
};
use featurestore_server::clock::ManualClock;
use featurestore_server::config::{Durability, StorageConfig};
use featurestore_server::core::{Core, CoreOptions};
use featurestore_server::policy::Policy;
use featurestore_server::registry::Registry;
use featurestore_server::storage::{RocksStore, Store};
use tempfile::TempDir;

use crate::START_TIME;

pub const SURFACES: [&str; 3] = ["feed", "video", "stories"];
pub const FLOATS: usize = 20;
pub const EMBEDDING: usize = 64;

/// The registry: the three content surfaces, the floats `f00`…`f19` and `embedding`, all
/// from the `engagement` source (not AI-derived, so no user state is needed to store them).
pub fn registry_toml() -> String {
    let mut toml = String::new();
    for (index, surface) in SURFACES.iter().enumerate() {
        toml.push_str(&format!(
            "[[surfaces]]\nname = \"{surface}\"\nid = {}\napp = \"facebook\"\npurpose = \"content\"\n",
            index + 1
        ));
    }
    toml.push_str(
        "[[sources]]\nname = \"ai_chat\"\nid = 1\nkind = \"ai_text\"\n\
         [[sources]]\nname = \"ai_voice\"\nid = 2\nkind = \"ai_voice\"\n\
         [[sources]]\nname = \"engagement\"\nid = 3\nkind = \"not_ai\"\n",
    );
    let surfaces = "[\"feed\", \"video\", \"stories\"]";
    for index in 0..FLOATS {
        toml.push_str(&format!(
            "[[features]]\nname = \"{}\"\nid = {}\ntype = \"float\"\n\
             sources = [\"engagement\"]\nsensitivity = \"none\"\nsurfaces = {surfaces}\n\
             ttl = \"30days\"\n",
            float_name(index),
            index + 1
        ));
    }
    toml.push_str(&format!(
        "[[features]]\nname = \"embedding\"\nid = {}\ntype = \"float_vector\"\n\
         dimension = {EMBEDDING}\nsources = [\"engagement\"]\nsensitivity = \"none\"\n\
         surfaces = {surfaces}\nttl = \"30days\"\n",
        FLOATS + 1
    ));
    toml
}

/// The name of float feature `index`.
pub fn float_name(index: usize) -> String {
    format!("f{index:02}")
}

/// SplitMix64: the same key sequence on every run.
#[derive(Debug, Clone)]
pub struct Random(pub u64);

impl Random {
    pub fn below(&mut self, bound: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % bound
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// `keys` random (user, surface) keys among `users` users, asking for the 20 floats:
/// workload (a)'s request.
pub fn random_read(random: &mut Random, users: u64, keys: usize) -> ReadRequest {
    ReadRequest {
        keys: (0..keys)
            .map(|_| ReadKey {
                user_id: 1 + random.below(users),
                surface: SURFACES[random.below(SURFACES.len() as u64) as usize].to_string(),
            })
            .collect(),
        features: (0..FLOATS).map(float_name).collect(),
        include_event_times: false,
    }
}

/// A one-row write of every feature of `user_id` on the three surfaces, as `producer`:
/// values as varied as real ones (pseudo-random, seeded by the user), so that block
/// compression finds what it would in production.
pub fn user_write(user_id: u64, producer: &str) -> WriteRow {
    let mut random = Random(user_id);
    let mut unit = move || random.below(1 << 24) as f32 / (1 << 24) as f32;
    let mut features: Vec<FeatureWrite> = (0..FLOATS)
        .map(|index| FeatureWrite {
            name: float_name(index),
            value: Value::Float(unit()),
            topic: None,
            ttl: None,
        })
        .collect();
    features.push(FeatureWrite {
        name: "embedding".to_string(),
        value: Value::FloatVector((0..EMBEDDING).map(|_| unit() * 2.0 - 1.0).collect()),
        topic: None,
        ttl: None,
    });
    WriteRow {
        user_id,
        target_surfaces: SURFACES.iter().map(|surface| surface.to_string()).collect(),
        provenance: Provenance {
            source: "engagement".to_string(),
            origin_app: "facebook".to_string(),
            interaction_time: START_TIME,
            producer_id: producer.to_string(),
            microphone_permission_granted: false,
        },
        features,
        user_state_generation: 0,
    }
}

/// A core over a RocksDB store in a temporary directory, holding `users` users of the
/// dataset written through [`Core::write`], flushed and compacted into one level; its
/// clock stands still at [`START_TIME`], so that the same reads do the same work.
#[derive(Debug)]
pub struct InProcessStore {
    pub core: Core,
    /// The core's engine, for measurements below the core.
    pub store: Arc<RocksStore>,
    pub storage: StorageConfig,
    directory: TempDir,
}

impl InProcessStore {
    pub fn with_users(users: u64) -> InProcessStore {
        let directory = tempfile::tempdir().expect("temporary directory");
        let clock = Arc::new(ManualClock::new(START_TIME));
        let storage = StorageConfig {
            block_cache_bytes: 64 << 20,
            ..StorageConfig::default()
        };
        let store = Arc::new(
            RocksStore::open(
                &directory.path().join("db"),
                &storage,
                Durability::Buffered,
                Duration::from_secs(3600),
                clock.clone(),
            )
            .expect("open the store"),
        );
        let registry = Arc::new(Registry::from_toml(&registry_toml()).expect("registry"));
        let policy = Arc::new(Policy::embedded_default(&registry).expect("default bundle"));
        let core = Core::new(
            registry,
            policy,
            Arc::clone(&store) as Arc<dyn Store>,
            clock,
            CoreOptions::under(directory.path()),
        )
        .expect("core");
        let all: Vec<u64> = (1..=users).collect();
        for (batch, chunk) in all.chunks(250).enumerate() {
            let request = WriteRequest {
                idempotency_key: format!("load-{batch}"),
                rows: chunk
                    .iter()
                    .map(|&user_id| user_write(user_id, "workload@v1"))
                    .collect(),
            };
            core.write(&request, batch as u64).expect("write");
        }
        core.compact().expect("compact");
        InProcessStore {
            core,
            store,
            storage,
            directory,
        }
    }

    /// The RocksDB directory.
    pub fn database(&self) -> std::path::PathBuf {
        self.directory.path().join("db")
    }
}
