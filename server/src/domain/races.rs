//! A race inside one process that no caller can bring about through the API: data of a
//! user reappearing between an erasure's delete and its verification (as a bug, or a
//! file restored behind the server's back, would bring it). The erasure must find it and
//! delete again, never end verified with data left, nor stay pending while it is served.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use featurestore::domain::{AgeBand, Timestamp, UserStateUpdate};

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
    core.set_user_state(
        &UserStateUpdate {
            user_id: 7,
            jurisdiction: "US".to_string(),
            age_band: AgeBand::Adult,
            linked_apps: vec!["facebook".to_string()],
            ads_objection: false,
            expected_generation: None,
        },
        "tests",
    )
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
                store
                    .merge_rows(&[(key, encode_row(&resurrected))], ("tests", b""), &[])
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
