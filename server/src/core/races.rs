//! Races inside one process that no caller can force through the API: data of a user
//! reappearing between an erasure's delete and its verification (as a bug, or a file
//! restored behind the server's back, would bring it), and a bundle reload with its whole
//! purge coming between a state change taking the policy in force and applying. Failpoints
//! are global to the process, so each acts only on its test's own thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use featurestore::domain::Timestamp;

use super::{Core, CoreOptions};
use crate::clock::ManualClock;
use crate::policy::Policy;
use crate::registry::{Registry, SurfaceId};
use crate::storage::codec::encode_row;
use crate::storage::{ErasureState, RowKey, RowRead, Store, StoredRow};

/// 2026-06-01T00:00:00Z.
const NOW: i64 = 1_780_272_000_000_000;

#[test]
fn an_erasure_whose_verification_finds_data_deletes_it_again() {
    let directory = tempfile::tempdir().expect("temp dir");
    let clock = Arc::new(ManualClock::new(Timestamp::from_unix_micros(NOW)));
    let store = Arc::new(super::test_store(directory.path(), clock.clone()));
    let registry = Arc::new(Registry::embedded_default());
    let policy = Arc::new(Policy::embedded_default(&registry).expect("default bundle"));
    let core = Core::new(
        registry,
        policy,
        Arc::clone(&store) as Arc<dyn Store>,
        clock,
        CoreOptions::under(directory.path()),
    )
    .expect("core");
    core.set_user_state(&super::adult_on_facebook(7, "US"), "tests")
        .expect("state");

    // Right after the erasure's first delete, a row of the user is back. Failpoints are
    // global to the process: only this test's thread brings it back.
    let key = RowKey {
        user_id: 7,
        surface: SurfaceId(1),
    };
    let resurrected = StoredRow {
        values: vec![crate::storage::conformance::value(1, 0, 0.5)],
    };
    let test_thread = std::thread::current().id();
    let brought_back = Arc::new(AtomicUsize::new(0));
    let injector = {
        let store = Arc::clone(&store);
        let brought_back = Arc::clone(&brought_back);
        move || {
            if std::thread::current().id() == test_thread
                && brought_back.fetch_add(1, Ordering::SeqCst) == 0
            {
                let bulk_files = crate::storage::Store::bulk_files(store.as_ref())
                    .expect("RocksDB ingests merge operands");
                bulk_files
                    .merge_rows(
                        &[(key, encode_row(&resurrected))],
                        ("tests", b""),
                        &[],
                        &bulk_files.hold_user_states(),
                    )
                    .expect("bring a row back");
            }
        }
    };
    fail::cfg_callback("erasure-deleted", injector).expect("failpoint");
    let receipt = core.erase_user(7, "tests");
    fail::remove("erasure-deleted");
    let receipt = receipt.expect("the erasure ends");

    assert_eq!(brought_back.load(Ordering::SeqCst), 2, "deleted twice");
    assert!(receipt.verified, "{receipt:?}");
    assert_eq!(receipt.reapplied_at.len(), 1, "{receipt:?}");
    assert_eq!(store.read_rows(&[key]).expect("read"), [RowRead::Missing]);
    assert!(!store.user_has_data(7).expect("scan"));
    let state = store.read_user_states(&[7]).expect("read").pop().flatten();
    assert_eq!(state.map(|state| state.erasure), Some(ErasureState::Erased));
}

/// A user's state changes while a bundle reload and its whole purge run between the change
/// taking the policy in force and applying: the rows it re-stamps are judged again by the
/// new bundle, so they are served, not withheld as values of a revoked bundle.
#[test]
fn a_state_change_that_overlaps_a_bundle_reload_leaves_rows_judged_by_the_new_bundle() {
    let directory = tempfile::tempdir().expect("temp dir");
    let bundle_path = directory.path().join("bundle.toml");
    std::fs::write(&bundle_path, crate::policy::DEFAULT_BUNDLE_TOML).expect("bundle");
    let clock = Arc::new(ManualClock::new(Timestamp::from_unix_micros(NOW)));
    let store = Arc::new(super::test_store(directory.path(), clock.clone()));
    let registry = Arc::new(Registry::embedded_default());
    let policy = Arc::new(Policy::embedded_default(&registry).expect("default bundle"));
    let core = Arc::new(
        Core::new(
            registry,
            policy,
            Arc::clone(&store) as Arc<dyn Store>,
            clock,
            CoreOptions {
                policy_path: Some(bundle_path.clone()),
                ..CoreOptions::under(directory.path())
            },
        )
        .expect("core"),
    );
    let adult = |jurisdiction: &str| super::adult_on_facebook(7, jurisdiction);
    let generation = core
        .set_user_state(&adult("US"), "tests")
        .expect("state")
        .generation;
    let hiking = featurestore::domain::WriteRequest {
        idempotency_key: "hiking".to_string(),
        rows: vec![featurestore::domain::WriteRow {
            user_id: 7,
            target_surfaces: vec!["facebook_feed".to_string()],
            provenance: featurestore::domain::Provenance {
                source: "ai_chat".to_string(),
                origin_app: "facebook".to_string(),
                interaction_time: Timestamp::from_unix_micros(NOW - 60_000_000),
                producer_id: "tests".to_string(),
                microphone_permission_granted: false,
            },
            features: vec![featurestore::domain::FeatureWrite {
                name: "interest_hiking".to_string(),
                value: featurestore::domain::Value::Float(0.5),
                topic: None,
                ttl: None,
            }],
            user_state_generation: generation,
        }],
    };
    core.write(&hiking, 1).expect("write");

    // A tighter bundle (a new threshold re-buckets every input) is put in force, and its
    // purge runs to the end, after the change took the old bundle and before it applies.
    std::fs::write(
        &bundle_path,
        crate::policy::DEFAULT_BUNDLE_TOML.replace(
            "low_confidence_threshold = 0.6",
            "low_confidence_threshold = 0.7",
        ),
    )
    .expect("bundle");
    let test_thread = std::thread::current().id();
    let reloader = Arc::clone(&core);
    fail::cfg_callback("user-state-policy-taken", move || {
        if std::thread::current().id() == test_thread && !reloader.purge_status().running {
            reloader.reload_policy("tests").expect("reload");
            assert!(reloader.join_purge(), "the purge thread does not panic");
        }
    })
    .expect("failpoint");
    let changed = core.set_user_state(&adult("US-CA"), "tests");
    fail::remove("user-state-policy-taken");
    changed.expect("state");

    let new_bundle = core.policy().hash_prefix;
    let key = RowKey {
        user_id: 7,
        surface: SurfaceId(1),
    };
    let rows = store.read_rows(&[key]).expect("read");
    let [RowRead::Found(row)] = rows.as_slice() else {
        panic!("the value is stored: {rows:?}")
    };
    assert_eq!(
        row.values
            .iter()
            .map(|value| value.policy_version)
            .collect::<Vec<_>>(),
        [new_bundle],
        "judged by the bundle in force, not withheld as a value of the revoked one"
    );
}
