//! Cost of erasing a user with 1,000 rows (one per surface) from a store that holds other
//! users too: fence and range delete, flush and compaction, verification.
//!
//! Run with `cargo bench -p featurestore-server --bench erasure`; prints a table.

mod support;

use std::sync::Arc;
use std::time::Instant;

use featurestore::domain::{FeatureWrite, Provenance, Timestamp, Value, WriteRequest, WriteRow};
use featurestore_server::clock::{Clock, SystemClock};
use featurestore_server::policy::Policy;
use featurestore_server::registry::Registry;

const SURFACES: usize = 1000;
const OTHER_USERS: u64 = 20_000;
const ERASED_USERS: u64 = 9;

fn registry() -> Registry {
    let mut toml = String::from(
        "[[sources]]\nname = \"ai_chat\"\nid = 1\nkind = \"ai_text\"\n\
         [[sources]]\nname = \"ai_voice\"\nid = 2\nkind = \"ai_voice\"\n",
    );
    let mut names = Vec::new();
    for index in 0..SURFACES {
        toml.push_str(&format!(
            "[[surfaces]]\nname = \"s{index}\"\nid = {}\napp = \"facebook\"\npurpose = \"content\"\n",
            index + 1
        ));
        names.push(format!("\"s{index}\""));
    }
    toml.push_str(&format!(
        "[[features]]\nname = \"topic\"\nid = 1\ntype = \"string\"\nsources = [\"ai_chat\"]\n\
         sensitivity = \"none\"\nsurfaces = [{}]\nttl = \"30days\"\n",
        names.join(", ")
    ));
    Registry::from_toml(&toml).expect("bench registry")
}

fn row(user_id: u64, surfaces: &[usize], now: Timestamp) -> WriteRow {
    WriteRow {
        user_id,
        target_surfaces: surfaces
            .iter()
            .map(|surface| format!("s{surface}"))
            .collect(),
        provenance: Provenance {
            source: "ai_chat".to_string(),
            origin_app: "facebook".to_string(),
            interaction_time: Timestamp::from_unix_micros(now.unix_micros() - 60_000_000),
            producer_id: "bench".to_string(),
            microphone_permission_granted: false,
        },
        features: vec![FeatureWrite {
            name: "topic".to_string(),
            value: Value::String(format!(
                "user {user_id} talked about hiking and the outdoors"
            )),
            topic: None,
            ttl: None,
        }],
        user_state_generation: 1,
    }
}

fn main() {
    let directory = tempfile::tempdir().expect("temp dir");
    let registry = Arc::new(registry());
    let policy = Arc::new(Policy::embedded_default(&registry).expect("default bundle"));
    // The system clock, so that the receipts time each step.
    let clock = Arc::new(SystemClock);
    let now = clock.now();
    let core = support::open_core(directory.path(), registry, policy, clock);

    let load_started = Instant::now();
    let mut key = 0;
    for user_id in 1..=OTHER_USERS + ERASED_USERS {
        core.set_user_state(&support::us_adult(user_id), "bench")
            .expect("state");
    }
    // Other users: 4 rows each. Erased users: one row on each of the 1,000 surfaces.
    let others: Vec<WriteRow> = (ERASED_USERS + 1..=ERASED_USERS + OTHER_USERS)
        .map(|user_id| row(user_id, &[0, 1, 2, 3], now))
        .collect();
    for chunk in others.chunks(500) {
        key += 1;
        let request = WriteRequest {
            idempotency_key: format!("load-{key}"),
            rows: chunk.to_vec(),
        };
        core.write(&request, key).expect("write");
    }
    let all_surfaces: Vec<usize> = (0..SURFACES).collect();
    for user_id in 1..=ERASED_USERS {
        let rows: Vec<WriteRow> = all_surfaces
            .chunks(16)
            .map(|surfaces| row(user_id, surfaces, now))
            .collect();
        key += 1;
        core.write(
            &WriteRequest {
                idempotency_key: format!("load-{key}"),
                rows,
            },
            key,
        )
        .expect("write");
    }
    core.compact().expect("compact");
    let load = load_started.elapsed();

    let mut totals = Vec::new();
    let mut steps = Vec::new();
    for user_id in 1..=ERASED_USERS {
        let started = Instant::now();
        let receipt = core.erase_user(user_id, "bench").expect("erase");
        totals.push(started.elapsed());
        assert!(receipt.verified);
        let fence = receipt.deleted_at.unwrap_or(0) - receipt.requested_at;
        let compaction = receipt.compacted_at.unwrap_or(0) - receipt.deleted_at.unwrap_or(0);
        let verification = receipt.verified_at.unwrap_or(0) - receipt.compacted_at.unwrap_or(0);
        steps.push((fence, compaction, verification));
    }
    totals.sort();
    let median = |mut values: Vec<i64>| {
        values.sort_unstable();
        values[values.len() / 2]
    };
    println!("| measure | value |");
    println!("| --- | ---: |");
    println!(
        "| store | {} users × 4 rows + {ERASED_USERS} users × {SURFACES} rows, loaded in {:.1} s |",
        OTHER_USERS,
        load.as_secs_f64()
    );
    println!(
        "| erasure of a user with {SURFACES} rows, median | {:.1} ms |",
        totals[totals.len() / 2].as_secs_f64() * 1e3
    );
    println!(
        "| erasure, slowest of {ERASED_USERS} | {:.1} ms |",
        totals[totals.len() - 1].as_secs_f64() * 1e3
    );
    println!(
        "| fence + range delete + key destruction, median | {:.2} ms |",
        median(steps.iter().map(|step| step.0).collect()) as f64 / 1e3
    );
    println!(
        "| flush + compaction of the user's ranges, median | {:.2} ms |",
        median(steps.iter().map(|step| step.1).collect()) as f64 / 1e3
    );
    println!(
        "| verification scan, median | {:.2} ms |",
        median(steps.iter().map(|step| step.2).collect()) as f64 / 1e3
    );
}
