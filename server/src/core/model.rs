//! Model-based test of the store: random sequences of writes (some stating a stale
//! user-state generation, or one never issued), user-state changes, erasures, reads and
//! restarts, applied both to the real core over RocksDB and to an in-memory model of what
//! the store promises; every answer and every read must agree with the model.
//!
//! The model's promises: a write is refused whole when its user is erased or it states
//! another generation than the current one; otherwise each value is stored unless the
//! stored one has a later event time (on a tie the later write wins); an erasure removes
//! every value of the user and refuses its later writes; a restart changes nothing.
//!
//! The operations are applied one at a time: concurrent histories are the stress test's
//! (`tests/integration/stress.rs`), whose oracle judges every value served while they race.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use featurestore::domain::{
    AgeBand, FeatureWrite, Provenance, ReadKey, ReadRequest, Timestamp, UserStateUpdate, Value,
    WriteRequest, WriteRow,
};
use featurestore::proto::ValueStatus;
use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};

use super::{Core, CoreOptions};
use crate::clock::ManualClock;
use crate::policy::Policy;
use crate::registry::Registry;

const USERS: u64 = 3;
const SURFACES: [&str; 2] = ["facebook_feed", "instagram_reels"];
/// Engagement values of these features are allowed on both surfaces for the model's users.
const FEATURES: [&str; 2] = ["interest_hiking", "interest_cooking"];
/// 2026-06-01T00:00:00Z.
const NOW: i64 = 1_780_272_000_000_000;

#[derive(Clone, Debug)]
enum Operation {
    Write {
        user: u64,
        surfaces: Vec<usize>,
        /// (feature index, value), distinct features.
        values: Vec<(usize, u8)>,
        /// Seconds before now: few, so that event times often tie.
        event_seconds_ago: i64,
        /// The user-state generation the row states.
        stated: Stated,
    },
    /// The privacy system sets the user's state again: its generation goes up.
    SetState {
        user: u64,
    },
    Erase {
        user: u64,
    },
    Read,
    Restart,
}

/// The generation a write states, relative to the user's current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stated {
    Current,
    /// The generation before the current one: the producer saw an older state.
    Stale,
    /// The one after it: a generation the store never issued.
    Ahead,
}

/// What the store promises.
#[derive(Clone, Debug, Default)]
struct Model {
    generation: BTreeMap<u64, u64>,
    erased: BTreeMap<u64, bool>,
    /// (user, surface, feature) → (event time, value).
    values: BTreeMap<(u64, usize, usize), (i64, u8)>,
    /// Whether the last operation should have succeeded.
    last_succeeds: bool,
    /// Operations applied, which is also the write-time clock in seconds.
    step: u64,
}

impl Model {
    fn is_erased(&self, user: u64) -> bool {
        self.erased.get(&user).copied().unwrap_or(false)
    }
}

struct Reference;

impl ReferenceStateMachine for Reference {
    type State = Model;
    type Transition = Operation;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model {
            generation: (1..=USERS).map(|user| (user, 1)).collect(),
            last_succeeds: true,
            ..Model::default()
        })
        .boxed()
    }

    fn transitions(_: &Model) -> BoxedStrategy<Operation> {
        let user = 1..=USERS;
        prop_oneof![
            6 => (
                user.clone(),
                prop::sample::subsequence(vec![0usize, 1], 1..=2),
                prop::sample::subsequence(vec![0usize, 1], 1..=2),
                any::<[u8; 2]>(),
                0i64..4,
                prop_oneof![
                    17 => Just(Stated::Current),
                    2 => Just(Stated::Stale),
                    1 => Just(Stated::Ahead),
                ],
            )
                .prop_map(|(user, surfaces, features, values, event_seconds_ago, stated)| {
                    Operation::Write {
                        user,
                        surfaces,
                        values: features.into_iter().map(|feature| (feature, values[feature])).collect(),
                        event_seconds_ago,
                        stated,
                    }
                }),
            1 => user.clone().prop_map(|user| Operation::SetState { user }),
            1 => user.prop_map(|user| Operation::Erase { user }),
            3 => Just(Operation::Read),
            1 => Just(Operation::Restart),
        ]
        .boxed()
    }

    fn preconditions(state: &Model, operation: &Operation) -> bool {
        // An erased user's state is not set again, nor the user erased twice: both are
        // answered by the erasure, not modelled here.
        match operation {
            Operation::SetState { user } | Operation::Erase { user } => !state.is_erased(*user),
            _ => true,
        }
    }

    fn apply(mut state: Model, operation: &Operation) -> Model {
        state.step += 1;
        state.last_succeeds = true;
        match operation {
            Operation::Write {
                user,
                surfaces,
                values,
                event_seconds_ago,
                stated,
            } => {
                if state.is_erased(*user) || *stated != Stated::Current {
                    state.last_succeeds = false;
                    return state;
                }
                let event = -event_seconds_ago;
                for &surface in surfaces {
                    for &(feature, value) in values {
                        let slot = state.values.entry((*user, surface, feature));
                        match slot {
                            std::collections::btree_map::Entry::Occupied(mut stored) => {
                                // A later event wins; on a tie, the later write.
                                if event >= stored.get().0 {
                                    stored.insert((event, value));
                                }
                            }
                            std::collections::btree_map::Entry::Vacant(empty) => {
                                empty.insert((event, value));
                            }
                        }
                    }
                }
            }
            Operation::SetState { user } => {
                *state.generation.entry(*user).or_insert(0) += 1;
            }
            Operation::Erase { user } => {
                state.erased.insert(*user, true);
                state
                    .values
                    .retain(|(stored_user, _, _), _| stored_user != user);
            }
            Operation::Read | Operation::Restart => {}
        }
        state
    }
}

/// The real core over RocksDB in a temporary directory.
struct System {
    directory: tempfile::TempDir,
    clock: Arc<ManualClock>,
    core: Option<Core>,
}

impl System {
    fn open(directory: tempfile::TempDir, clock: Arc<ManualClock>) -> System {
        let store = super::test_store(directory.path(), clock.clone());
        let registry = Arc::new(Registry::embedded_default());
        let policy = Arc::new(Policy::embedded_default(&registry).expect("the default bundle"));
        let core = Arc::new(
            Core::new(
                registry,
                policy,
                Arc::new(store),
                clock.clone(),
                CoreOptions::under(directory.path()),
            )
            .expect("the core"),
        );
        core.start().expect("start");
        let core = Arc::into_inner(core).expect("nothing else holds the core");
        System {
            directory,
            clock,
            core: Some(core),
        }
    }

    fn core(&self) -> &Core {
        self.core.as_ref().expect("the core is open")
    }

    fn state(user: u64) -> UserStateUpdate {
        UserStateUpdate {
            user_id: user,
            jurisdiction: "US".to_string(),
            age_band: AgeBand::Adult,
            linked_apps: vec!["facebook".to_string(), "instagram".to_string()],
            ads_objection: false,
            expected_generation: None,
        }
    }

    /// Every (user, surface, feature) the store serves as present, with its value.
    fn served(&self) -> BTreeMap<(u64, usize, usize), u8> {
        let keys: Vec<ReadKey> = (1..=USERS)
            .flat_map(|user| {
                SURFACES.iter().map(move |surface| ReadKey {
                    user_id: user,
                    surface: surface.to_string(),
                })
            })
            .collect();
        let response = self
            .core()
            .read(&ReadRequest {
                keys,
                features: FEATURES.iter().map(|name| name.to_string()).collect(),
                include_event_times: false,
            })
            .expect("read");
        let mut served = BTreeMap::new();
        for (index, row) in response.rows.iter().enumerate() {
            let user = index as u64 / SURFACES.len() as u64 + 1;
            let surface = index % SURFACES.len();
            for (feature, column) in response.columns.iter().enumerate() {
                if row.statuses[feature] == ValueStatus::Present as i32 {
                    let value = row.float_values[column.offset as usize];
                    served.insert((user, surface, feature), value as u8);
                }
            }
        }
        served
    }
}

struct StoreAgainstModel;

impl StateMachineTest for StoreAgainstModel {
    type SystemUnderTest = System;
    type Reference = Reference;

    fn init_test(_: &Model) -> System {
        let system = System::open(
            tempfile::tempdir().expect("a temporary directory"),
            Arc::new(ManualClock::new(Timestamp::from_unix_micros(NOW))),
        );
        for user in 1..=USERS {
            system
                .core()
                .set_user_state(&System::state(user), "model")
                .expect("set the user's state");
        }
        system
    }

    fn apply(mut system: System, model: &Model, operation: Operation) -> System {
        // Write times grow with every operation, as they would in a live store.
        system.clock.advance(Duration::from_secs(1));
        let succeeded = match operation {
            Operation::Write {
                user,
                surfaces,
                values,
                event_seconds_ago,
                stated,
            } => {
                let current = model.generation[&user];
                let request = WriteRequest {
                    idempotency_key: format!("write-{}", model.step),
                    rows: vec![WriteRow {
                        user_id: user,
                        target_surfaces: surfaces
                            .iter()
                            .map(|&surface| SURFACES[surface].to_string())
                            .collect(),
                        provenance: Provenance {
                            source: "engagement".to_string(),
                            origin_app: "facebook".to_string(),
                            interaction_time: Timestamp::from_unix_micros(
                                NOW - event_seconds_ago * 1_000_000,
                            ),
                            producer_id: "model@v1".to_string(),
                            microphone_permission_granted: false,
                        },
                        features: values
                            .iter()
                            .map(|&(feature, value)| FeatureWrite {
                                name: FEATURES[feature].to_string(),
                                value: Value::Float(f32::from(value)),
                                topic: None,
                                ttl: None,
                            })
                            .collect(),
                        user_state_generation: match stated {
                            Stated::Current => current,
                            Stated::Stale => current - 1,
                            Stated::Ahead => current + 1,
                        },
                    }],
                };
                system.core().write(&request, model.step).is_ok()
            }
            Operation::SetState { user } => {
                let state = system
                    .core()
                    .set_user_state(&System::state(user), "model")
                    .expect("set the user's state");
                assert_eq!(state.generation, model.generation[&user]);
                true
            }
            Operation::Erase { user } => system.core().erase_user(user, "model").is_ok(),
            Operation::Read => true,
            Operation::Restart => {
                let core = system.core.take().expect("the core is open");
                core.stop();
                drop(core);
                let System {
                    directory, clock, ..
                } = system;
                system = System::open(directory, clock);
                let audit = system.core().verify_audit().expect("verify");
                assert!(audit.first_broken().is_none(), "{audit:?}");
                true
            }
        };
        assert_eq!(
            succeeded, model.last_succeeds,
            "the store and the model disagree on whether the operation succeeds"
        );
        system
    }

    fn check_invariants(system: &System, model: &Model) {
        let expected: BTreeMap<(u64, usize, usize), u8> = model
            .values
            .iter()
            .map(|(key, (_, value))| (*key, *value))
            .collect();
        assert_eq!(
            system.served(),
            expected,
            "what is served is what the model holds"
        );
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        max_shrink_iters: 2000,
        .. ProptestConfig::default()
    })]

    #[test]
    fn the_store_behaves_like_its_model_across_restarts(sequential 1..40 => StoreAgainstModel);
}
