//! Cost of a 500-key batched read in the server's own layers, next to the storage floor:
//! a raw RocksDB `batched_multi_get` of the same keys, without decoding.
//!
//! Run with `cargo bench -p featurestore-server --bench read`; prints a table. (The
//! transport is not included: this is the server-side cost per request.)

mod support;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use featurestore::domain::{
    FeatureWrite, Provenance, ReadKey, ReadRequest, Value, WriteRequest, WriteRow,
};
use featurestore_server::clock::{Clock, SystemClock};
use featurestore_server::policy::Policy;
use featurestore_server::registry::{Registry, SurfaceId};
use featurestore_server::storage::keys::encode_row_key;
use featurestore_server::storage::{COLUMN_FAMILIES, RowKey};

const USERS: u64 = 20_000;
const SURFACES: [&str; 3] = ["feed", "reels", "ads"];
const FLOAT_FEATURES: usize = 20;
const EMBEDDING: usize = 64;
const KEYS_PER_READ: usize = 500;

fn registry() -> Registry {
    let mut toml = String::from(
        "[[surfaces]]\nname = \"feed\"\nid = 1\napp = \"facebook\"\npurpose = \"content\"\n\
         [[surfaces]]\nname = \"reels\"\nid = 2\napp = \"facebook\"\npurpose = \"content\"\n\
         [[surfaces]]\nname = \"ads\"\nid = 3\napp = \"facebook\"\npurpose = \"ads\"\n\
         [[sources]]\nname = \"ai_chat\"\nid = 1\nkind = \"ai_text\"\n\
         [[sources]]\nname = \"ai_voice\"\nid = 2\nkind = \"ai_voice\"\n",
    );
    for index in 0..FLOAT_FEATURES {
        toml.push_str(&format!(
            "[[features]]\nname = \"f{index}\"\nid = {}\ntype = \"float\"\nsources = [\"ai_chat\"]\n\
             sensitivity = \"none\"\nsurfaces = [\"feed\", \"reels\", \"ads\"]\nttl = \"30days\"\n",
            index + 1
        ));
    }
    toml.push_str(&format!(
        "[[features]]\nname = \"embedding\"\nid = 100\ntype = \"float_vector\"\ndimension = {EMBEDDING}\n\
         sources = [\"ai_chat\"]\nsensitivity = \"none\"\nsurfaces = [\"feed\", \"reels\", \"ads\"]\nttl = \"30days\"\n"
    ));
    Registry::from_toml(&toml).expect("bench registry")
}

fn median_us(runs: usize, mut work: impl FnMut()) -> f64 {
    let mut samples: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            work();
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let directory = tempfile::tempdir().expect("temp dir");
    let path = directory.path().join("db");
    let registry = Arc::new(registry());
    let policy = Arc::new(Policy::embedded_default(&registry).expect("default bundle"));
    let clock = Arc::new(SystemClock);
    let core = support::open_core(directory.path(), registry, policy, clock.clone());
    let store = Arc::clone(&core.store);

    let load_started = Instant::now();
    let now = clock.now();
    for user_id in 1..=USERS {
        core.set_user_state(&support::us_adult(user_id))
            .expect("state");
    }
    let users: Vec<u64> = (1..=USERS).collect();
    for (batch, chunk) in users.chunks(500).enumerate() {
        let rows = chunk
            .iter()
            .map(|&user_id| {
                let mut features: Vec<FeatureWrite> = (0..FLOAT_FEATURES)
                    .map(|index| FeatureWrite {
                        name: format!("f{index}"),
                        value: Value::Float(index as f32 / 20.0),
                        topic: None,
                        ttl: None,
                    })
                    .collect();
                features.push(FeatureWrite {
                    name: "embedding".to_string(),
                    value: Value::FloatVector(vec![0.5; EMBEDDING]),
                    topic: None,
                    ttl: None,
                });
                WriteRow {
                    user_id,
                    target_surfaces: SURFACES.iter().map(|surface| surface.to_string()).collect(),
                    provenance: Provenance {
                        source: "ai_chat".to_string(),
                        origin_app: "facebook".to_string(),
                        interaction_time: featurestore::domain::Timestamp::from_unix_micros(
                            now.unix_micros() - 60_000_000,
                        ),
                        producer_id: "bench".to_string(),
                        microphone_permission_granted: false,
                    },
                    features,
                    user_state_generation: 1,
                }
            })
            .collect();
        core.write(
            &WriteRequest {
                idempotency_key: format!("load-{batch}"),
                rows,
            },
            batch as u64,
        )
        .expect("write");
    }
    store.compact_features().expect("compact");
    let load = load_started.elapsed();

    // Random keys, the same for every layer.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let batches: Vec<Vec<(u64, usize)>> = (0..64)
        .map(|_| {
            (0..KEYS_PER_READ)
                .map(|_| {
                    (
                        next() % USERS + 1,
                        (next() % SURFACES.len() as u64) as usize,
                    )
                })
                .collect()
        })
        .collect();

    let raw = rocksdb::DB::open_cf_for_read_only(
        &rocksdb::Options::default(),
        &path,
        COLUMN_FAMILIES,
        false,
    )
    .expect("open read-only");
    let features = raw.cf_handle("features").expect("features column family");
    let raw_keys: Vec<Vec<[u8; 10]>> = batches
        .iter()
        .map(|batch| {
            let mut keys: Vec<[u8; 10]> = batch
                .iter()
                .map(|&(user_id, surface)| {
                    encode_row_key(RowKey {
                        user_id,
                        surface: SurfaceId(surface as u16 + 1),
                    })
                })
                .collect();
            keys.sort_unstable();
            keys
        })
        .collect();
    let store_keys: Vec<Vec<RowKey>> = batches
        .iter()
        .map(|batch| {
            batch
                .iter()
                .map(|&(user_id, surface)| RowKey {
                    user_id,
                    surface: SurfaceId(surface as u16 + 1),
                })
                .collect()
        })
        .collect();
    let requests: Vec<ReadRequest> = batches
        .iter()
        .map(|batch| ReadRequest {
            keys: batch
                .iter()
                .map(|&(user_id, surface)| ReadKey {
                    user_id,
                    surface: SURFACES[surface].to_string(),
                })
                .collect(),
            features: Vec::new(),
            include_event_times: false,
        })
        .collect();

    // Warm the block cache of both handles.
    for index in 0..batches.len() {
        black_box(raw.batched_multi_get_cf(features, raw_keys[index].iter(), true));
        black_box(core.read(&requests[index]).expect("read"));
    }
    let mut index = 0;
    let mut cycle = || {
        index = (index + 1) % batches.len();
        index
    };
    let raw_us = median_us(301, || {
        let batch = cycle();
        for value in raw.batched_multi_get_cf(features, raw_keys[batch].iter(), true) {
            black_box(value.expect("read").map(|bytes| bytes.len()));
        }
    });
    let store_us = median_us(301, || {
        black_box(store.read_rows(&store_keys[cycle()]).expect("read"));
    });
    let core_us = median_us(301, || {
        black_box(core.read(&requests[cycle()]).expect("read"));
    });
    let per_key = |us: f64| us * 1000.0 / KEYS_PER_READ as f64;

    println!("| layer | 500-key read, median | per key | × floor |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| raw RocksDB batched_multi_get (floor) | {raw_us:.0} µs | {:.0} ns | 1.00 |",
        per_key(raw_us)
    );
    println!(
        "| Store::read_rows (multi-get + decode) | {store_us:.0} µs | {:.0} ns | {:.2} |",
        per_key(store_us),
        store_us / raw_us
    );
    println!(
        "| Core::read (+ columns, guard, response) | {core_us:.0} µs | {:.0} ns | {:.2} |",
        per_key(core_us),
        core_us / raw_us
    );
    println!(
        "\n{USERS} users × {} surfaces × ({FLOAT_FEATURES} floats + {EMBEDDING}-float embedding), loaded in {:.1} s; warm cache; no transport.",
        SURFACES.len(),
        load.as_secs_f64()
    );
}
