//! The promises of [`Store`] about users' states, erasure and the audit log, and the fence
//! holding while writes and state changes race.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;

pub fn a_state_change_revalidates_the_users_rows_in_the_same_step(open: Open<'_>) {
    let opened = open();
    let store = opened.store.as_ref();
    let generation = set_state(store, 1, "US");
    apply(
        store,
        "w",
        &[(1, generation)],
        &[
            write(1, SURFACE, vec![value(1, 0, 1.0), value(2, 0, 2.0)]),
            write(1, OTHER_SURFACE, vec![value(1, 0, 1.0)]),
        ],
    )
    .expect("write");
    // The new state forbids feature 1 everywhere.
    let mut seen: Vec<(Option<UserState>, RowKey)> = Vec::new();
    let state = store
        .set_user_state(
            &update(1, "DE"),
            at(1),
            &mut |state, key, mut row| {
                seen.push((state.cloned(), key));
                row.values.retain(|value| value.feature != FeatureId(1));
                row
            },
            &entry(AuditAction::UserStateSet, Some(1)),
        )
        .expect("set");
    assert_eq!(state.generation, generation + 1);
    assert_eq!(state.jurisdiction, "DE");
    assert_eq!(seen.len(), 2, "every row of the user: {seen:?}");
    assert!(
        seen.iter().all(|(seen, _)| seen.as_ref() == Some(&state)),
        "revalidation sees the new state"
    );
    let kept = row(store, 1, SURFACE).expect("row");
    assert_eq!((number(&kept, 1), number(&kept, 2)), (None, Some(2.0)));
    assert_eq!(row(store, 1, OTHER_SURFACE), None, "an emptied row goes");
    assert_eq!(
        store.read_user_states(&[1]).expect("read").pop().flatten(),
        Some(state)
    );
    // The purge's path: the current state, the same step.
    let removed = store
        .revalidate_user(1, &mut |state, _, mut row| {
            assert_eq!(state.map(|state| state.jurisdiction.as_str()), Some("DE"));
            row.values.clear();
            row
        })
        .expect("revalidate");
    assert_eq!(removed, 1);
    assert_eq!(row(store, 1, SURFACE), None);
}

pub fn a_state_change_with_an_expected_generation_is_refused_when_it_moved(open: Open<'_>) {
    let opened = open();
    let store = opened.store.as_ref();
    let generation = set_state(store, 1, "US");
    let mut stale = update(1, "DE");
    stale.expected_generation = Some(generation - 1);
    let refused = store.set_user_state(
        &stale,
        at(0),
        &mut |_, _, row| row,
        &entry(AuditAction::UserStateSet, Some(1)),
    );
    assert!(
        matches!(
            refused,
            Err(StorageError::GenerationChanged {
                user_id: 1,
                current_generation
            }) if current_generation == generation
        ),
        "{refused:?}"
    );
    let state = store.read_user_states(&[1]).expect("read").pop().flatten();
    assert_eq!(
        state.map(|state| state.jurisdiction),
        Some("US".to_string())
    );
}

pub fn erasure_leaves_nothing_of_the_user(open: Open<'_>) {
    let opened = open();
    let store = opened.store.as_ref();
    let generation = set_state(store, 1, "US");
    let neighbour = set_state(store, 2, "US");
    apply(
        store,
        "w",
        &[(1, generation), (2, neighbour)],
        &[
            write(1, SURFACE, vec![value(1, 0, 1.0)]),
            write(1, OTHER_SURFACE, vec![value(1, 0, 1.0)]),
            write(2, SURFACE, vec![value(1, 0, 2.0)]),
        ],
    )
    .expect("write");
    assert!(store.pseudonym_key(1, true).expect("key").is_some());
    assert!(store.user_has_data(1).expect("scan"));

    let state = store
        .erase_user(1, at(5), &entry(AuditAction::UserErased, Some(1)))
        .expect("erase");
    assert_eq!(state.erasure, ErasureState::Pending);
    assert_eq!(state.generation, generation + 1);
    assert_eq!(
        (state.jurisdiction.as_str(), state.linked_apps.len()),
        ("", 0),
        "nothing of the user is kept in the fence"
    );
    assert_eq!(row(store, 1, SURFACE), None);
    assert_eq!(row(store, 1, OTHER_SURFACE), None);
    assert_eq!(store.pseudonym_key(1, false).expect("key"), None);
    assert_eq!(
        store.pseudonym_key(1, true).expect("key"),
        None,
        "an erased user's pseudonym key is never made again"
    );
    if let Some(files) = store.user_files() {
        files.rewrite_user_files(1).expect("rewrite the files");
    }
    assert!(!store.user_has_data(1).expect("scan"));
    assert_eq!(store.users_with_rows(0, 10).expect("users"), [2]);
    store.finish_erasure(1).expect("finish");
    let state = store.read_user_states(&[1]).expect("read").pop().flatten();
    assert_eq!(state.map(|state| state.erasure), Some(ErasureState::Erased));
    assert_eq!(number(&row(store, 2, SURFACE).expect("row"), 1), Some(2.0));
}

/// A user's records go to the user's chain in the step of the change they record; records
/// about no single user's change to chain 0; every chain verifies on its own, and a
/// user's trail gathers the user's records from every chain, oldest first.
pub fn audit_records_are_chained_and_found_by_user(open: Open<'_>) {
    let opened = open();
    let store = opened.store.as_ref();
    let before = audit_records(store);
    let at_second = |seconds, action, user| AuditEntry {
        time: at(seconds),
        ..entry(action, user)
    };
    store
        .set_user_state(
            &update(1, "US"),
            at(1),
            &mut |_, _, row| row,
            &at_second(1, AuditAction::UserStateSet, Some(1)),
        )
        .expect("set the state");
    let mut shares = shares(&[(1, 1)], &[write(1, SURFACE, vec![value(1, 0, 1.0)])]);
    shares[0].audit = vec![at_second(2, AuditAction::FeatureDenied, Some(1))];
    store
        .apply_write(&idempotency("w", 0), at(-60), &shares, &mut |_, _| {
            Vec::new()
        })
        .expect("write");
    store
        .append_audit(&[
            at_second(3, AuditAction::LoadChunk, Some(1)),
            at_second(3, AuditAction::FeatureDenied, Some(2)),
        ])
        .expect("append");
    // Users spread over the chains.
    for user_id in 10..40 {
        set_state(store, user_id, "US");
    }
    assert_eq!(audit_records(store), before + 4 + 30);
    let report = store.verify_audit().expect("verify");
    let mut partitions: Vec<u32> = report.chains.iter().map(|chain| chain.partition).collect();
    partitions.dedup();
    assert_eq!(
        partitions.len(),
        report.chains.len(),
        "one report per chain"
    );

    let trail = store
        .audit_trail(1, &pseudonym(&[7; 32], 1), 10)
        .expect("trail");
    let actions: Vec<AuditAction> = trail.iter().map(|record| record.entry.action).collect();
    assert_eq!(
        actions,
        [
            AuditAction::UserStateSet,
            AuditAction::FeatureDenied,
            AuditAction::LoadChunk
        ]
    );
    assert_eq!(
        trail[0].partition, trail[1].partition,
        "the user's changes are recorded in the user's chain"
    );
    assert_eq!(
        trail[2].partition, 0,
        "records about no single user's change: chain 0"
    );
    let oldest = store
        .audit_trail(1, &pseudonym(&[7; 32], 1), 1)
        .expect("trail");
    assert_eq!(oldest, trail[..1]);
}

/// Writers apply values fenced on the generation they read, while another thread keeps
/// changing the user's state, each change removing every stored value in its own step.
/// A value written under an older generation than the current one must never be left:
/// it would be a decision applied after the state it was made on had changed.
pub fn the_fence_holds_while_writes_and_state_changes_race(open: Open<'_>) {
    const WRITERS: usize = 3;
    const STATE_CHANGES: usize = 200;
    let opened = open();
    let store = Arc::clone(&opened.store);
    set_state(store.as_ref(), 1, "US");
    let stop = Arc::new(AtomicBool::new(false));
    let applied_now = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let store = Arc::clone(&store);
            let stop = Arc::clone(&stop);
            let applied_now = Arc::clone(&applied_now);
            std::thread::spawn(move || {
                let (mut applied, mut refused) = (0u64, 0u64);
                let mut sequence = 0i64;
                while !stop.load(Ordering::SeqCst) {
                    sequence += 1;
                    let generation = store
                        .read_user_states(&[1])
                        .expect("read")
                        .pop()
                        .flatten()
                        .map_or(0, |state| state.generation);
                    // The value is the generation it was decided on.
                    let mut decided = value(1, sequence, generation as f32);
                    decided.feature = FeatureId(writer as u16 + 1);
                    match apply(
                        store.as_ref(),
                        &format!("{writer}-{sequence}"),
                        &[(1, generation)],
                        &[write(1, SURFACE, vec![decided])],
                    ) {
                        Ok(_) => {
                            applied += 1;
                            applied_now.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(StorageError::GenerationChanged { .. }) => refused += 1,
                        Err(error) => panic!("{error}"),
                    }
                }
                (applied, refused)
            })
        })
        .collect();
    // Only this thread changes the state: right after each change, every value stored
    // must have been decided under the new generation.
    let mut stale_values = 0;
    for _ in 0..STATE_CHANGES {
        let current = store
            .set_user_state(
                &update(1, "US"),
                at(0),
                &mut |_, _, _| StoredRow::default(),
                &entry(AuditAction::UserStateSet, Some(1)),
            )
            .expect("set")
            .generation;
        // The next change waits for a write to land under this generation (for a second
        // at most), so that both orders of write and change happen, however busy the
        // machine.
        let landed = applied_now.load(Ordering::SeqCst) + 1;
        let waited = crate::clock::monotonic_now();
        while applied_now.load(Ordering::SeqCst) < landed
            && waited.elapsed() < std::time::Duration::from_secs(1)
        {
            std::thread::yield_now();
        }
        if let Some(row) = row(store.as_ref(), 1, SURFACE) {
            stale_values += row
                .values
                .iter()
                .filter(|stored| stored.value != Value::Float(current as f32))
                .count();
        }
    }
    stop.store(true, Ordering::SeqCst);
    let (mut applied, mut refused) = (0, 0);
    for writer in writers {
        let (a, r) = writer.join().expect("writer");
        applied += a;
        refused += r;
    }
    assert!(applied > 0, "the writers wrote ({refused} refused)");
    assert_eq!(
        stale_values, 0,
        "values decided under an older generation were applied after a state change \
         ({applied} writes applied, {refused} refused)"
    );
}
