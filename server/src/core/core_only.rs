//! The core over a backend that offers only what every backend must: the `Store` core,
//! without bulk ingestion, maintenance or figures of its own. Reads, writes, state changes
//! and erasures work; what needs a missing capability is refused with UNIMPLEMENTED, never
//! half done. The backend is RocksDB with its capabilities hidden.

use std::sync::Arc;

use featurestore::domain::{ReadKey, ReadRequest, Timestamp, UserStateUpdate, WriteRequest};
use featurestore::proto;

use super::Core;
use crate::audit::{AuditEntry, AuditRecord, AuditReport, Pseudonym};
use crate::clock::ManualClock;
use crate::error::{Error, ErrorKind};
use crate::storage::{
    AnswerBuilder, Applied, IdempotencyRecord, Revalidate, RocksStore, RowFound, RowKey, RowRead,
    StorageError, Store, UserState, UserWrite,
};

/// 2026-06-01T00:00:00Z.
const NOW: i64 = 1_780_272_000_000_000;

/// A store that offers only the `Store` core: RocksDB's, with every capability hidden.
#[derive(Debug)]
struct CoreOnly(RocksStore);

impl Store for CoreOnly {
    fn read_rows(&self, keys: &[RowKey]) -> Result<Vec<RowRead>, StorageError> {
        self.0.read_rows(keys)
    }

    fn visit_rows(
        &self,
        keys: &[RowKey],
        visit: &mut dyn FnMut(usize, RowFound<'_>),
    ) -> Result<(), StorageError> {
        self.0.visit_rows(keys, visit)
    }

    fn apply_write(
        &self,
        idempotency: &IdempotencyRecord,
        replay_since: Timestamp,
        users: &[UserWrite],
        answer: AnswerBuilder<'_>,
    ) -> Result<Vec<Applied>, StorageError> {
        self.0.apply_write(idempotency, replay_since, users, answer)
    }

    fn read_user_states(&self, users: &[u64]) -> Result<Vec<Option<UserState>>, StorageError> {
        self.0.read_user_states(users)
    }

    fn set_user_state(
        &self,
        update: &UserStateUpdate,
        now: Timestamp,
        revalidate: Revalidate<'_>,
        audit: &AuditEntry,
    ) -> Result<UserState, StorageError> {
        self.0.set_user_state(update, now, revalidate, audit)
    }

    fn append_audit(&self, entries: &[AuditEntry]) -> Result<(), StorageError> {
        self.0.append_audit(entries)
    }

    fn audit_trail(
        &self,
        user_id: u64,
        user: &Pseudonym,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StorageError> {
        self.0.audit_trail(user_id, user, limit)
    }

    fn verify_audit(&self) -> Result<AuditReport, StorageError> {
        self.0.verify_audit()
    }

    fn revalidate_user(
        &self,
        user_id: u64,
        revalidate: Revalidate<'_>,
    ) -> Result<usize, StorageError> {
        self.0.revalidate_user(user_id, revalidate)
    }

    fn users_with_rows(&self, from_user: u64, limit: usize) -> Result<Vec<u64>, StorageError> {
        self.0.users_with_rows(from_user, limit)
    }

    fn read_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.0.read_meta(key)
    }

    fn write_meta(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.0.write_meta(key, value)
    }

    fn delete_meta(&self, key: &str) -> Result<(), StorageError> {
        self.0.delete_meta(key)
    }

    fn pseudonym_key(&self, user_id: u64, create: bool) -> Result<Option<[u8; 32]>, StorageError> {
        self.0.pseudonym_key(user_id, create)
    }

    fn erase_user(
        &self,
        user_id: u64,
        now: Timestamp,
        audit: &AuditEntry,
    ) -> Result<UserState, StorageError> {
        self.0.erase_user(user_id, now, audit)
    }

    fn user_has_data(&self, user_id: u64) -> Result<bool, StorageError> {
        self.0.user_has_data(user_id)
    }

    fn finish_erasure(&self, user_id: u64) -> Result<(), StorageError> {
        self.0.finish_erasure(user_id)
    }

    fn write_meta_audited(
        &self,
        key: &str,
        value: &[u8],
        audit: &[AuditEntry],
    ) -> Result<(), StorageError> {
        self.0.write_meta_audited(key, value, audit)
    }

    fn meta_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        self.0.meta_with_prefix(prefix)
    }
}

fn core_only(directory: &std::path::Path) -> Arc<Core> {
    let clock = Arc::new(ManualClock::new(Timestamp::from_unix_micros(NOW)));
    let store = CoreOnly(super::test_store(directory, clock.clone()));
    let core = super::test_core(directory, Arc::new(store), clock);
    let core = Arc::new(core);
    core.start().expect("start");
    core
}

fn hiking(user_id: u64, value: f32) -> WriteRequest {
    WriteRequest {
        idempotency_key: format!("hiking-{user_id}-{value}"),
        rows: vec![super::hiking_row(user_id, value, NOW - 1_000_000)],
    }
}

fn unsupported(result: Result<impl std::fmt::Debug, Error>) -> String {
    match result {
        Err(error) if error.kind() == ErrorKind::Unsupported => error.to_string(),
        other => panic!("expected UNIMPLEMENTED, got {other:?}"),
    }
}

#[test]
fn the_core_serves_writes_reads_and_erasures_over_the_store_core_alone() {
    let directory = tempfile::tempdir().expect("temp dir");
    let core = core_only(directory.path());
    core.set_user_state(&super::adult_on_facebook(7, "US"), "tests")
        .expect("state");
    let written = core.write(&hiking(7, 0.5), 1).expect("write");
    assert_eq!(
        written.rows[0].verdicts[0].verdict,
        proto::Verdict::Allow as i32
    );
    let read = ReadRequest {
        keys: vec![ReadKey {
            user_id: 7,
            surface: "facebook_feed".to_string(),
        }],
        features: vec!["interest_hiking".to_string()],
        include_event_times: false,
    };
    let response = core.read(&read).expect("read");
    assert_eq!(response.rows[0].float_values, [0.5]);

    // Erasure needs no compaction of its own: the engine's delete is what it verifies.
    let receipt = core.erase_user(7, "tests").expect("erase");
    assert!(receipt.verified, "{receipt:?}");
    let response = core.read(&read).expect("read");
    assert_eq!(
        response.rows[0].statuses,
        [proto::ValueStatus::Defaulted as i32],
        "nothing of the user is served: {response:?}"
    );
    assert!(
        core.verify_audit()
            .expect("verify")
            .first_broken()
            .is_none()
    );
    // An engine without figures reports zeros.
    assert_eq!(
        core.engine_figures().expect("figures"),
        crate::storage::EngineFigures::default()
    );
}

#[test]
fn what_needs_a_missing_capability_is_refused_whole_with_unimplemented() {
    let directory = tempfile::tempdir().expect("temp dir");
    let core = core_only(directory.path());
    assert!(unsupported(core.backup("tests")).contains("checkpoints"));
    assert!(
        !directory.path().join("backups").exists()
            || std::fs::read_dir(directory.path().join("backups"))
                .expect("read")
                .next()
                .is_none(),
        "no backup was started"
    );
    assert!(unsupported(core.census(100)).contains("engine figures"));
    assert!(unsupported(core.compact()).contains("compaction"));
    // Refused when the job would start, before anything is staged.
    assert!(unsupported(core.load_attach("job-1", "").map(|(_, job)| job)).contains("bulk loads"));
    assert!(core.load_job("job-1").is_err(), "no job was created");
}

/// The `Store` promises hold without the capabilities too (those about a capability are
/// skipped when it is missing).
mod conformance {
    use super::*;
    use crate::storage::conformance::{Opened, conformance_suite};

    conformance_suite!(|| {
        let directory = tempfile::tempdir().expect("temp dir");
        let clock = Arc::new(ManualClock::new(Timestamp::from_unix_micros(NOW)));
        let store = CoreOnly(super::super::test_store(directory.path(), clock));
        Opened {
            store: Arc::new(store),
            keep: Box::new(directory),
        }
    });
}
