//! Cost of the write-time policy: one decision, one decision with its bucketing, and the
//! policy step of a write of 100 features × 3 surfaces next to the whole write.
//!
//! Run with `cargo bench -p featurestore-server --bench policy`; prints a table.

mod support;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use featurestore::domain::{FeatureWrite, Provenance, Timestamp, Value, WriteRequest, WriteRow};
use featurestore_server::clock::ManualClock;
use featurestore_server::policy::{DecisionInput, Policy, ValueFacts};
use featurestore_server::registry::{Registry, Sensitivity};

const FEATURES: usize = 100;
const SURFACES: [&str; 3] = ["feed", "reels", "ads"];
/// 2026-06-01T00:00:00Z.
const NOW: i64 = 1_780_272_000_000_000;

fn registry() -> Registry {
    let mut toml = String::from(
        "[[surfaces]]\nname = \"feed\"\nid = 1\napp = \"facebook\"\npurpose = \"content\"\n\
         [[surfaces]]\nname = \"reels\"\nid = 2\napp = \"instagram\"\npurpose = \"content\"\n\
         [[surfaces]]\nname = \"ads\"\nid = 3\napp = \"facebook\"\npurpose = \"ads\"\n\
         [[sources]]\nname = \"ai_chat\"\nid = 1\nkind = \"ai_text\"\n\
         [[sources]]\nname = \"ai_voice\"\nid = 2\nkind = \"ai_voice\"\n",
    );
    for index in 0..FEATURES {
        toml.push_str(&format!(
            "[[features]]\nname = \"f{index}\"\nid = {}\ntype = \"float\"\nsources = [\"ai_chat\"]\n\
             sensitivity = \"none\"\nsurfaces = [\"feed\", \"reels\", \"ads\"]\nttl = \"30days\"\n",
            index + 1
        ));
    }
    Registry::from_toml(&toml).expect("bench registry")
}

/// Median of `runs` timings of `work`, each divided by `per`.
fn median_ns(runs: usize, per: usize, mut work: impl FnMut()) -> f64 {
    let mut samples: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            work();
            start.elapsed().as_nanos() as f64 / per as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn write_request(key: usize) -> WriteRequest {
    WriteRequest {
        idempotency_key: format!("bench-{key}"),
        rows: vec![WriteRow {
            user_id: 7,
            target_surfaces: SURFACES.iter().map(|surface| surface.to_string()).collect(),
            provenance: Provenance {
                source: "ai_chat".to_string(),
                origin_app: "facebook".to_string(),
                interaction_time: Timestamp::from_unix_micros(NOW - 60_000_000 + key as i64),
                producer_id: "bench".to_string(),
                microphone_permission_granted: false,
            },
            features: (0..FEATURES)
                .map(|index| FeatureWrite {
                    name: format!("f{index}"),
                    value: Value::Float(index as f32),
                    topic: None,
                    ttl: None,
                })
                .collect(),
            user_state_generation: 1,
        }],
    }
}

fn main() {
    let registry = Arc::new(registry());
    let policy = Arc::new(Policy::embedded_default(&registry).expect("default bundle"));

    // One decision, over inputs spread across the whole table.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let inputs: Vec<DecisionInput> = (0..1 << 16)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            DecisionInput::from_index(state as usize % DecisionInput::COMBINATIONS)
        })
        .collect();
    let decision_ns = median_ns(31, inputs.len(), || {
        for input in &inputs {
            black_box(policy.decide(black_box(input)));
        }
    });

    // One decision with the bucketing of its inputs.
    let directory = tempfile::tempdir().expect("temp dir");
    let clock = Arc::new(ManualClock::new(Timestamp::from_unix_micros(NOW)));
    let core = support::open_core(
        directory.path(),
        Arc::clone(&registry),
        Arc::clone(&policy),
        clock,
    );
    let user = core
        .set_user_state(&support::us_adult(7), "bench")
        .expect("user state");
    let source = registry.source("ai_chat").expect("registered");
    let surfaces: Vec<_> = SURFACES
        .iter()
        .map(|name| registry.surface(name).expect("registered"))
        .collect();
    let facts = ValueFacts {
        source,
        interaction_time: Timestamp::from_unix_micros(NOW - 60_000_000),
        microphone_permission: false,
        origin_app: "facebook",
        sensitivity: Sensitivity::None,
        topic_value: true,
        topic_confidence: Some(0.8),
    };
    let now = Timestamp::from_unix_micros(NOW);
    let bucketed_ns = median_ns(31, FEATURES * SURFACES.len() * 100, || {
        for _ in 0..FEATURES * 100 {
            for surface in &surfaces {
                black_box(policy.decide(&policy.input(
                    black_box(&facts),
                    Some(&user),
                    surface,
                    now,
                )));
            }
        }
    });
    let policy_step_ns = bucketed_ns * (FEATURES * SURFACES.len()) as f64;

    // Whole writes of 100 features × 3 surfaces, and the same decided without storing.
    let mut key = 0;
    let write_ns = median_ns(201, 1, || {
        key += 1;
        black_box(core.write(&write_request(key), key as u64).expect("write"));
    });
    let explain_ns = median_ns(201, 1, || {
        key += 1;
        black_box(core.explain(&write_request(key)).expect("explain"));
    });

    println!("| measure | median | note |");
    println!("| --- | ---: | --- |");
    println!(
        "| one decision (table lookup) | {decision_ns:.1} ns | over {} inputs spread across the table |",
        inputs.len()
    );
    println!(
        "| one decision with bucketing | {bucketed_ns:.1} ns | jurisdiction group, linked apps, retention, confidence |"
    );
    println!(
        "| policy step of a 100 × 3 write | {:.1} µs | 300 bucketed decisions |",
        policy_step_ns / 1000.0
    );
    println!(
        "| whole write, 100 features × 3 surfaces | {:.1} µs | parse excluded; state read, decide, merge, RocksDB write (WAL, no sync), audit |",
        write_ns / 1000.0
    );
    println!(
        "| the same write explained (no store write) | {:.1} µs | state read, registry checks, decisions, verdicts |",
        explain_ns / 1000.0
    );
    println!(
        "| policy step / whole write | {:.1} % | goal ≤ 10 % |",
        100.0 * policy_step_ns / write_ns
    );
}
