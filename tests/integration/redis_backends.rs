//! The two backends give the same answers: random interleavings of several producers'
//! writes (some decided on an outdated user state), the privacy system's state changes
//! and erasures, and re-validations, applied in the same order through the `Store` trait
//! to the embedded RocksDB and to a Redis Cluster; after every operation both must have
//! answered alike and must serve the same rows and user states.

use std::sync::Arc;
use std::time::Duration;

use featurestore::domain::{AgeBand, Timestamp, UserStateUpdate};
use featurestore_server::audit::{AuditAction, AuditEntry};
use featurestore_server::clock::ManualClock;
use featurestore_server::config::{Durability, StorageConfig};
use featurestore_server::registry::SurfaceId;
use featurestore_server::storage::conformance::value;
use featurestore_server::storage::{
    IdempotencyRecord, RedisStore, RocksStore, RowKey, RowRead, RowWrite, StorageError, Store,
    StoredRow, UserState, UserWrite, ValueOutcome,
};
use featurestore_tests::cluster;
use proptest::prelude::*;

const USERS: u64 = 4;
const SURFACES: u16 = 2;
const T0: i64 = 1_780_272_000_000_000;

#[derive(Clone, Debug)]
enum Op {
    /// A producer's write of one value; `stale`: decided on the generation before the
    /// current one.
    Write {
        user: u64,
        surface: u16,
        feature: u16,
        event_seconds: i64,
        number: u8,
        stale: bool,
    },
    /// The privacy system moves the user (`excluded`: where every stored value goes).
    SetState {
        user: u64,
        excluded: bool,
    },
    Erase {
        user: u64,
    },
    Revalidate {
        user: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let user = 1..=USERS;
    prop_oneof![
        6 => (user.clone(), 1..=SURFACES, 1..=3u16, 0..20i64, any::<u8>(), prop::bool::weighted(0.2))
            .prop_map(|(user, surface, feature, event_seconds, number, stale)| Op::Write {
                user,
                surface,
                feature,
                event_seconds,
                number,
                stale,
            }),
        2 => (user.clone(), any::<bool>()).prop_map(|(user, excluded)| Op::SetState { user, excluded }),
        1 => user.clone().prop_map(|user| Op::Erase { user }),
        1 => user.prop_map(|user| Op::Revalidate { user }),
    ]
}

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_unix_micros(T0 + seconds * 1_000_000)
}

fn entry(action: AuditAction) -> AuditEntry {
    AuditEntry {
        time: at(30),
        action,
        caller: "property".to_string(),
        bundle_hash: "ab".to_string(),
        user: None,
        surfaces: String::new(),
        subject: String::new(),
        reasons: 0,
    }
}

/// The rule both backends re-validate with: an excluded user keeps nothing.
fn revalidate(state: Option<&UserState>, _key: RowKey, row: StoredRow) -> StoredRow {
    match state {
        Some(state) if state.jurisdiction == "DE" => StoredRow::default(),
        _ => row,
    }
}

fn error_kind(error: &StorageError) -> String {
    match error {
        StorageError::GenerationChanged {
            user_id,
            current_generation,
        } => format!("generation changed: user {user_id} at {current_generation}"),
        other => format!("{other:?}"),
    }
}

/// Applies `op` (the `index`th) to `store`; what it answered, comparable across backends.
fn apply(store: &dyn Store, index: usize, op: &Op) -> String {
    let state = |user: u64| {
        store
            .read_user_states(&[user])
            .expect("read the state")
            .pop()
            .flatten()
    };
    match op {
        Op::Write {
            user,
            surface,
            feature,
            event_seconds,
            number,
            stale,
        } => {
            let generation = state(*user).map_or(0, |state| state.generation);
            let share = UserWrite {
                user_id: *user,
                generation: if *stale {
                    generation.saturating_sub(1)
                } else {
                    generation
                },
                rows: vec![RowWrite {
                    key: RowKey {
                        user_id: *user,
                        surface: SurfaceId(*surface),
                    },
                    values: vec![value(*feature, *event_seconds, f32::from(*number))],
                }],
                audit: vec![entry(AuditAction::Write)],
            };
            let record = IdempotencyRecord {
                key: format!("op-{index}"),
                fingerprint: index as u64,
                created_at: at(30),
            };
            let answer = &mut |_: usize, outcomes: &[Vec<ValueOutcome>]| -> Vec<u8> {
                outcomes
                    .iter()
                    .flatten()
                    .map(|outcome| u8::from(*outcome == ValueOutcome::Stored))
                    .collect()
            };
            match store.apply_write(&record, at(0), &[share], answer) {
                Ok(applied) => format!("{applied:?}"),
                Err(error) => error_kind(&error),
            }
        }
        Op::SetState { user, excluded } => {
            let update = UserStateUpdate {
                user_id: *user,
                jurisdiction: if *excluded { "DE" } else { "US" }.to_string(),
                age_band: AgeBand::Adult,
                linked_apps: vec!["facebook".to_string()],
                ads_objection: false,
                expected_generation: None,
            };
            match store.set_user_state(
                &update,
                at(30),
                &mut revalidate,
                &entry(AuditAction::UserStateSet),
            ) {
                Ok(state) => format!("generation {}", state.generation),
                Err(error) => error_kind(&error),
            }
        }
        Op::Erase { user } => {
            match store.erase_user(*user, at(30), &entry(AuditAction::UserErased)) {
                Ok(state) => format!("erased at generation {}", state.generation),
                Err(error) => error_kind(&error),
            }
        }
        Op::Revalidate { user } => match store.revalidate_user(*user, &mut revalidate) {
            Ok(removed) => format!("{removed} removed"),
            Err(error) => error_kind(&error),
        },
    }
}

/// What a store serves: every row and every user's state.
fn served(store: &dyn Store) -> String {
    let keys: Vec<RowKey> = (1..=USERS)
        .flat_map(|user_id| {
            (1..=SURFACES).map(move |surface| RowKey {
                user_id,
                surface: SurfaceId(surface),
            })
        })
        .collect();
    let rows: Vec<RowRead> = store.read_rows(&keys).expect("read the rows");
    let users: Vec<u64> = (1..=USERS).collect();
    let states: Vec<Option<(String, u64, String)>> = store
        .read_user_states(&users)
        .expect("read the states")
        .into_iter()
        .map(|state| {
            state.map(|state| {
                (
                    state.jurisdiction,
                    state.generation,
                    format!("{:?}", state.erasure),
                )
            })
        })
        .collect();
    format!("{rows:?}\n{states:?}")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn both_backends_answer_and_serve_alike(ops in prop::collection::vec(op(), 1..30)) {
        let directory = tempfile::tempdir().expect("a directory");
        let rocks = RocksStore::open(
            directory.path(),
            &StorageConfig {
                block_cache_bytes: 1 << 20,
                ..StorageConfig::default()
            },
            Durability::Buffered,
            Duration::from_secs(3600),
            Arc::new(ManualClock::new(at(30))),
        )
        .expect("open RocksDB");
        let redis = RedisStore::open(&crate::redis_cluster::store_config(cluster::shared()), 8)
            .expect("open the cluster store");
        for (index, op) in ops.iter().enumerate() {
            let embedded = apply(&rocks, index, op);
            let clustered = apply(&redis, index, op);
            prop_assert_eq!(&embedded, &clustered, "answers to {:?}", op);
            prop_assert_eq!(served(&rocks), served(&redis), "after {:?}", op);
        }
    }
}
