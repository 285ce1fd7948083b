//! The promises of [`Store`], as one suite every implementation must pass:
//! `conformance_suite!(|| Opened { .. })` in the implementation's tests generates one test
//! per promise. Each test opens a fresh store through the closure and checks one
//! documented guarantee from the outside, through the trait only: the fence checked in the
//! atomic step of a write (also with writes and state changes racing), all-or-nothing
//! writes, event-time order, idempotent retries, user-state changes that re-validate in the
//! same step, erasure that leaves nothing, the audit log.

use std::sync::Arc;

use featurestore::domain::{AgeBand, Timestamp, UserStateUpdate, Value};

use super::{
    Applied, ErasureState, IdempotencyRecord, RowKey, RowRead, RowWrite, StorageError, Store,
    StoredRow, StoredValue, UserState, UserWrite, ValueOutcome,
};
use crate::audit::{AuditAction, AuditEntry, pseudonym};
use crate::registry::{FeatureId, Sensitivity, SourceId, SurfaceId};

/// A store opened for one test, and whatever must live as long as it (its directory).
#[derive(Debug)]
pub struct Opened {
    pub store: Arc<dyn Store>,
    /// Held, not read: dropped with the store.
    pub keep: Box<dyn std::any::Any>,
}

/// Calls the macro `$then` with `($args)` and then the name of every promise.
#[doc(hidden)]
#[macro_export]
macro_rules! with_store_promises {
    ($then:ident, $($args:tt)*) => {
        $crate::$then!(($($args)*)
            a_share_decided_on_another_generation_is_refused_whole,
            a_write_for_a_user_being_erased_is_refused,
            rows_of_a_user_the_fence_does_not_name_are_refused,
            the_latest_event_time_wins_per_feature,
            merge_operands_follow_the_same_order,
            a_hold_keeps_user_states_from_changing,
            a_retry_is_answered_with_the_first_answer_and_changes_nothing,
            a_retry_completes_exactly_the_users_not_yet_applied,
            a_key_reused_for_another_request_is_refused,
            a_state_change_revalidates_the_users_rows_in_the_same_step,
            a_state_change_with_an_expected_generation_is_refused_when_it_moved,
            erasure_leaves_nothing_of_the_user,
            audit_records_are_chained_and_found_by_user,
            reads_answer_every_key_in_request_order,
            the_fence_holds_while_writes_and_state_changes_race,
        );
    };
}

/// Generates one `#[test]` per promise of [`Store`] for the implementation `open` makes.
#[macro_export]
macro_rules! conformance_suite {
    ($open:expr) => {
        $crate::with_store_promises!(store_promise_tests, $open);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! store_promise_tests {
    (($open:expr) $($name:ident,)*) => {
        $(
            #[test]
            fn $name() {
                $crate::storage::conformance::$name(&$open);
            }
        )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! store_promise_list {
    (() $($name:ident,)*) => {
        /// Every promise, by name, for a harness that runs them one after the other.
        pub const PROMISES: &[(&str, fn(Open<'_>))] = &[$((stringify!($name), $name),)*];
    };
}

with_store_promises!(store_promise_list,);

pub use crate::conformance_suite;

mod privacy;
pub use privacy::*;

pub type Open<'a> = &'a dyn Fn() -> Opened;

const SURFACE: SurfaceId = SurfaceId(1);
const OTHER_SURFACE: SurfaceId = SurfaceId(2);
const T0: i64 = 1_780_272_000_000_000;

fn key(user_id: u64, surface: SurfaceId) -> RowKey {
    RowKey { user_id, surface }
}

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_unix_micros(T0 + seconds * 1_000_000)
}

/// A float value of `feature`, as if written `event_seconds` after a fixed time.
pub fn value(feature: u16, event_seconds: i64, number: f32) -> StoredValue {
    StoredValue {
        feature: FeatureId(feature),
        event_time: at(event_seconds),
        write_time: at(event_seconds),
        expires_at: Timestamp::MAX,
        source: SourceId(1),
        sensitivity: Sensitivity::None,
        policy_version: 7,
        origin_app: "facebook".to_string(),
        topic_id: String::new(),
        microphone_permission: false,
        topic_confidence: None,
        value: Value::Float(number),
    }
}

fn write(user_id: u64, surface: SurfaceId, values: Vec<StoredValue>) -> RowWrite {
    RowWrite {
        key: key(user_id, surface),
        values,
    }
}

fn idempotency(key: &str, created_seconds: i64) -> IdempotencyRecord {
    IdempotencyRecord {
        key: key.to_string(),
        fingerprint: 42,
        created_at: at(created_seconds),
    }
}

fn entry(action: AuditAction, user: Option<u64>) -> AuditEntry {
    AuditEntry {
        time: at(0),
        action,
        caller: "conformance".to_string(),
        bundle_hash: "00".repeat(32),
        user: user.map(|user_id| pseudonym(&[7; 32], user_id)),
        surfaces: String::new(),
        subject: String::new(),
        reasons: 0,
    }
}

fn update(user_id: u64, jurisdiction: &str) -> UserStateUpdate {
    UserStateUpdate {
        user_id,
        jurisdiction: jurisdiction.to_string(),
        age_band: AgeBand::Adult,
        linked_apps: vec!["facebook".to_string()],
        ads_objection: false,
        expected_generation: None,
    }
}

/// Sets the user's state, keeping every row; returns the new generation.
fn set_state(store: &dyn Store, user_id: u64, jurisdiction: &str) -> u64 {
    store
        .set_user_state(
            &update(user_id, jurisdiction),
            at(0),
            &mut |_, _, row| row,
            &entry(AuditAction::UserStateSet, Some(user_id)),
        )
        .expect("set the state")
        .generation
}

/// The shares of a write: for each (user, generation) of `fence`, the user's rows of
/// `rows`; rows of a user the fence does not name go into the first share.
fn shares(fence: &[(u64, u64)], rows: &[RowWrite]) -> Vec<UserWrite> {
    let mut shares: Vec<UserWrite> = fence
        .iter()
        .map(|&(user_id, generation)| UserWrite {
            user_id,
            generation,
            rows: Vec::new(),
            audit: vec![entry(AuditAction::FeatureDenied, Some(user_id))],
        })
        .collect();
    for row in rows {
        let share = shares
            .iter()
            .position(|share| share.user_id == row.key.user_id)
            .unwrap_or(0);
        shares[share].rows.push(row.clone());
    }
    shares
}

/// Applies `rows` fenced on `fence` under `record`, answering each share with its
/// outcomes' debug text.
fn apply_all(
    store: &dyn Store,
    record: &IdempotencyRecord,
    fence: &[(u64, u64)],
    rows: &[RowWrite],
) -> Result<Vec<Applied>, StorageError> {
    store.apply_write(record, at(-60), &shares(fence, rows), &mut |_, outcomes| {
        format!("{outcomes:?}").into_bytes()
    })
}

/// Applies `rows` fenced on `fence`; what happened to the first user's share.
fn apply(
    store: &dyn Store,
    key: &str,
    fence: &[(u64, u64)],
    rows: &[RowWrite],
) -> Result<Applied, StorageError> {
    apply_all(store, &idempotency(key, 0), fence, rows).map(|mut applied| applied.remove(0))
}

fn row(store: &dyn Store, user_id: u64, surface: SurfaceId) -> Option<StoredRow> {
    match store
        .read_rows(&[key(user_id, surface)])
        .expect("read")
        .pop()
    {
        Some(RowRead::Found(row)) => Some(row),
        Some(RowRead::Missing) => None,
        other => panic!("user {user_id}: {other:?}"),
    }
}

fn number(row: &StoredRow, feature: u16) -> Option<f32> {
    match row.value(FeatureId(feature)).map(|value| &value.value) {
        Some(Value::Float(number)) => Some(*number),
        _ => None,
    }
}

fn audit_records(store: &dyn Store) -> u64 {
    let report = store.verify_audit().expect("verify");
    assert_eq!(report.first_broken(), None, "every audit chain is intact");
    report.records_checked()
}

/// A share decided on another generation is not applied, nothing of it: no row, no
/// idempotency record, no audit record; a share of another user in the same write is
/// applied whole or not at all, and a retry completes what was not applied.
pub fn a_share_decided_on_another_generation_is_refused_whole(open: Open<'_>) {
    let opened = open();
    let store = opened.store.as_ref();
    let first = set_state(store, 1, "US");
    let second = set_state(store, 2, "US");
    let rows = [
        write(1, SURFACE, vec![value(1, 0, 1.0)]),
        write(1, OTHER_SURFACE, vec![value(1, 0, 1.5)]),
        write(2, SURFACE, vec![value(1, 0, 2.0)]),
    ];
    let user_1_whole =
        |store: &dyn Store| match (row(store, 1, SURFACE), row(store, 1, OTHER_SURFACE)) {
            (None, None) => false,
            (Some(_), Some(_)) => true,
            partial => panic!("user 1's share was applied in part: {partial:?}"),
        };
    let records = audit_records(store);
    let refused = apply(store, "w", &[(1, first), (2, second - 1)], &rows);
    assert!(
        matches!(
            refused,
            Err(StorageError::GenerationChanged { user_id: 2, .. })
        ),
        "{refused:?}"
    );
    assert_eq!(row(store, 2, SURFACE), None, "nothing of user 2");
    let user_1_applied = user_1_whole(store);
    assert_eq!(
        audit_records(store),
        records + u64::from(user_1_applied),
        "only an applied share's audit record"
    );
    // The user the write came first to: refused whatever the other's share.
    let refused = apply(store, "w2", &[(1, first + 1), (2, second)], &rows);
    assert!(
        matches!(
            refused,
            Err(StorageError::GenerationChanged { user_id: 1, .. })
        ),
        "{refused:?}"
    );
    assert_eq!(
        user_1_whole(store),
        user_1_applied,
        "nothing more of user 1"
    );
    assert_eq!(row(store, 2, SURFACE), None, "nothing of user 2");
    // The refused share's idempotency record was not written: the same key applies it
    // now, and replays what was applied before.
    let applied = apply_all(
        store,
        &idempotency("w", 0),
        &[(1, first), (2, second)],
        &rows,
    )
    .expect("applied");
    assert_eq!(
        (
            matches!(applied[0], Applied::Replayed { .. }),
            matches!(applied[1], Applied::Fresh { .. })
        ),
        (user_1_applied, true),
        "{applied:?}"
    );
    assert!(user_1_whole(store));
    assert_eq!(
        row(store, 2, SURFACE).and_then(|row| number(&row, 1)),
        Some(2.0)
    );
    // A user without a state is fenced on generation 0, and loses it once one is set.
    let rows = [write(3, SURFACE, vec![value(1, 0, 3.0)])];
    apply(store, "x", &[(3, 0)], &rows).expect("no state yet");
    set_state(store, 3, "US");
    let refused = apply(store, "y", &[(3, 0)], &rows);
    assert!(
        matches!(
            refused,
            Err(StorageError::GenerationChanged {
                user_id: 3,
                current_generation: 1
            })
        ),
        "{refused:?}"
    );
}

pub fn a_write_for_a_user_being_erased_is_refused(open: Open<'_>) {
    let opened = open();
    let store = opened.store.as_ref();
    set_state(store, 1, "US");
    let erased = store
        .erase_user(1, at(0), &entry(AuditAction::UserErased, Some(1)))
        .expect("erase");
    assert_eq!(erased.erasure, ErasureState::Pending);
    // Even a write that names the erasure's own generation.
    let refused = apply(
        store,
        "w",
        &[(1, erased.generation)],
        &[write(1, SURFACE, vec![value(1, 0, 1.0)])],
    );
    assert!(
        matches!(refused, Err(StorageError::GenerationChanged { .. })),
        "{refused:?}"
    );
    assert_eq!(row(store, 1, SURFACE), None);
}

pub fn rows_of_a_user_the_fence_does_not_name_are_refused(open: Open<'_>) {
    let opened = open();
    let store = opened.store.as_ref();
    let generation = set_state(store, 1, "US");
    let refused = apply(
        store,
        "w",
        &[(1, generation)],
        &[
            write(1, SURFACE, vec![value(1, 0, 1.0)]),
            write(2, SURFACE, vec![value(1, 0, 1.0)]),
        ],
    );
    assert!(
        matches!(refused, Err(StorageError::Unfenced { user_id: 2 })),
        "{refused:?}"
    );
    assert_eq!(row(store, 1, SURFACE), None);
}

pub fn the_latest_event_time_wins_per_feature(open: Open<'_>) {
    let opened = open();
    let store = opened.store.as_ref();
    let fence = [(1, 0)];
    let outcomes = |applied: Applied| match applied {
        Applied::Fresh { answer } => String::from_utf8(answer).expect("text"),
        replayed => panic!("{replayed:?}"),
    };
    let first = apply(
        store,
        "a",
        &fence,
        &[write(
            1,
            SURFACE,
            vec![value(1, 200, 2.0), value(2, 100, 1.0)],
        )],
    )
    .expect("write");
    assert_eq!(
        outcomes(first),
        format!("{:?}", [[ValueOutcome::Stored; 2]])
    );
    // Feature 1: older than what is stored; feature 2: newer.
    let second = apply(
        store,
        "b",
        &fence,
        &[write(
            1,
            SURFACE,
            vec![value(1, 100, 9.0), value(2, 300, 3.0)],
        )],
    )
    .expect("write");
    assert_eq!(
        outcomes(second),
        format!("{:?}", [[ValueOutcome::Superseded, ValueOutcome::Stored]])
    );
    let stored = row(store, 1, SURFACE).expect("row");
    assert_eq!(
        (number(&stored, 1), number(&stored, 2)),
        (Some(2.0), Some(3.0))
    );
    // On a tie of event times, the later write wins.
    let mut tie = value(1, 200, 4.0);
    tie.write_time = at(500);
    apply(store, "c", &fence, &[write(1, SURFACE, vec![tie])]).expect("write");
    assert_eq!(number(&row(store, 1, SURFACE).expect("row"), 1), Some(4.0));
}

/// For an engine with bulk ingestion: its merge operands follow the write path's order.
pub fn merge_operands_follow_the_same_order(open: Open<'_>) {
    let opened = open();
    let store = opened.store.as_ref();
    apply(
        store,
        "a",
        &[(1, 0)],
        &[write(
            1,
            SURFACE,
            vec![value(1, 200, 2.0), value(2, 200, 2.0)],
        )],
    )
    .expect("write");
    let operand = |values| super::codec::encode_row(&StoredRow { values });
    let Some(bulk_files) = store.bulk_files() else {
        return;
    };
    bulk_files
        .merge_rows(
            &[(
                key(1, SURFACE),
                operand(vec![value(1, 100, 1.0), value(2, 300, 3.0)]),
            )],
            ("conformance", b"1"),
            &[],
            &bulk_files.hold_user_states(),
        )
        .expect("merge");
    let stored = row(store, 1, SURFACE).expect("row");
    assert_eq!(
        (number(&stored, 1), number(&stored, 2)),
        (Some(2.0), Some(3.0)),
        "the older operand lost, the newer won"
    );
}

/// For an engine with bulk ingestion: while a hold on users' states is kept, no change of
/// a user's state is applied (it waits), and the count of changes moves once one is, so
/// that a commit checks its generations and applies its rows with nothing in between.
pub fn a_hold_keeps_user_states_from_changing(open: Open<'_>) {
    let opened = open();
    let store = Arc::clone(&opened.store);
    let Some(bulk_files) = opened.store.bulk_files() else {
        return;
    };
    let before = bulk_files.user_state_changes();
    let held = bulk_files.hold_user_states();
    let (changed, change_done) = std::sync::mpsc::channel();
    let changer = std::thread::spawn(move || {
        set_state(store.as_ref(), 1, "US");
        changed.send(()).expect("the test waits");
    });
    // However long the change is given, it does not happen while the hold is kept.
    assert!(
        change_done
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_err(),
        "a user's state changed under the hold"
    );
    assert_eq!(opened.store.read_user_states(&[1]).expect("read"), [None]);
    assert_eq!(bulk_files.user_state_changes(), before);
    drop(held);
    change_done
        .recv()
        .expect("the change happens once the hold is dropped");
    changer.join().expect("the changer ends");
    assert!(bulk_files.user_state_changes() > before);
}

pub fn a_retry_is_answered_with_the_first_answer_and_changes_nothing(open: Open<'_>) {
    let opened = open();
    let store = opened.store.as_ref();
    let first = apply(
        store,
        "k",
        &[(1, 0)],
        &[write(1, SURFACE, vec![value(1, 10, 1.0)])],
    )
    .expect("write");
    let Applied::Fresh { answer } = first else {
        panic!("{first:?}")
    };
    // Within the window, whatever the retry carries: the first answer, nothing applied.
    let retry = apply(
        store,
        "k",
        &[(1, 0)],
        &[write(1, SURFACE, vec![value(1, 20, 2.0)])],
    )
    .expect("retry");
    assert_eq!(
        retry,
        Applied::Replayed {
            answer: answer.clone()
        }
    );
    assert_eq!(number(&row(store, 1, SURFACE).expect("row"), 1), Some(1.0));
    // Past the window, the key is free again.
    let later = store
        .apply_write(
            &idempotency("k", 120),
            at(60),
            &shares(&[(1, 0)], &[write(1, SURFACE, vec![value(1, 20, 2.0)])]),
            &mut |_, _| b"again".to_vec(),
        )
        .expect("write")
        .remove(0);
    assert_eq!(
        later,
        Applied::Fresh {
            answer: b"again".to_vec()
        }
    );
    assert_eq!(number(&row(store, 1, SURFACE).expect("row"), 1), Some(2.0));
}

/// A write whose first attempt reached only some users (a per-user engine that failed
/// between two shares) is completed by its retry: the users applied are replayed with
/// their first answer and not applied again, the others are applied.
pub fn a_retry_completes_exactly_the_users_not_yet_applied(open: Open<'_>) {
    let opened = open();
    let store = opened.store.as_ref();
    let first = apply(
        store,
        "k",
        &[(1, 0)],
        &[write(1, SURFACE, vec![value(1, 10, 1.0)])],
    )
    .expect("the first user's share");
    let Applied::Fresh { answer } = first else {
        panic!("{first:?}")
    };
    let records = audit_records(store);
    let retry = apply_all(
        store,
        &idempotency("k", 0),
        &[(1, 0), (2, 0)],
        &[
            write(1, SURFACE, vec![value(1, 20, 9.0)]),
            write(2, SURFACE, vec![value(1, 20, 2.0)]),
        ],
    )
    .expect("retry");
    assert_eq!(retry[0], Applied::Replayed { answer });
    assert!(matches!(retry[1], Applied::Fresh { .. }), "{retry:?}");
    assert_eq!(
        number(&row(store, 1, SURFACE).expect("row"), 1),
        Some(1.0),
        "not applied again"
    );
    assert_eq!(
        number(&row(store, 2, SURFACE).expect("row"), 1),
        Some(2.0),
        "completed"
    );
    assert_eq!(
        audit_records(store),
        records + 1,
        "the completed share's audit record only"
    );
    // Once every user is applied, the whole write replays.
    let again = apply_all(
        store,
        &idempotency("k", 0),
        &[(1, 0), (2, 0)],
        &[write(2, SURFACE, vec![value(1, 30, 3.0)])],
    )
    .expect("retry");
    assert!(
        again
            .iter()
            .all(|applied| matches!(applied, Applied::Replayed { .. }))
    );
    assert_eq!(number(&row(store, 2, SURFACE).expect("row"), 1), Some(2.0));
}

/// An idempotency key used for another request (another fingerprint) that shares a user
/// is refused, and nothing of the new request is applied.
pub fn a_key_reused_for_another_request_is_refused(open: Open<'_>) {
    let opened = open();
    let store = opened.store.as_ref();
    apply(
        store,
        "k",
        &[(1, 0)],
        &[write(1, SURFACE, vec![value(1, 10, 1.0)])],
    )
    .expect("write");
    let other = IdempotencyRecord {
        fingerprint: 43,
        ..idempotency("k", 0)
    };
    let reused = apply_all(
        store,
        &other,
        &[(1, 0)],
        &[write(1, SURFACE, vec![value(1, 20, 2.0)])],
    );
    assert!(
        matches!(reused, Err(StorageError::IdempotencyKeyReused)),
        "{reused:?}"
    );
    assert_eq!(number(&row(store, 1, SURFACE).expect("row"), 1), Some(1.0));
}

pub fn reads_answer_every_key_in_request_order(open: Open<'_>) {
    let opened = open();
    let store = opened.store.as_ref();
    apply(
        store,
        "w",
        &[(3, 0), (5, 0)],
        &[
            write(5, SURFACE, vec![value(1, 0, 5.0)]),
            write(3, SURFACE, vec![value(1, 0, 3.0)]),
        ],
    )
    .expect("write");
    let keys = [
        key(5, SURFACE),
        key(4, SURFACE),
        key(3, SURFACE),
        key(5, SURFACE),
    ];
    let reads = store.read_rows(&keys).expect("read");
    let numbers: Vec<Option<f32>> = reads
        .iter()
        .map(|read| match read {
            RowRead::Found(row) => number(row, 1),
            RowRead::Missing => None,
            RowRead::Corrupt(problem) => panic!("{problem}"),
        })
        .collect();
    assert_eq!(numbers, [Some(5.0), None, Some(3.0), Some(5.0)]);
    let mut visits = vec![0; keys.len()];
    store
        .visit_rows(&keys, &mut |index, _| visits[index] += 1)
        .expect("visit");
    assert_eq!(visits, [1; 4], "every key exactly once");
    assert_eq!(store.users_with_rows(0, 10).expect("users"), [3, 5]);
    assert_eq!(store.users_with_rows(4, 10).expect("users"), [5]);
}
