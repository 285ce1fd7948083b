//! Tests of what only the RocksDB engine does: merge operands and corrupt bytes; the
//! conformance suite with and without the row cache.

use super::*;
use crate::clock::ManualClock;
use crate::registry::{FeatureId, Sensitivity, SourceId, SurfaceId};
use crate::storage::{RowWrite, StoredValue, ValueOutcome};
use featurestore::domain::Value;

fn open(dir: &Path) -> RocksStore {
    open_with(dir, &StorageConfig::default())
}

fn open_with(dir: &Path, config: &StorageConfig) -> RocksStore {
    let clock = Arc::new(ManualClock::new(Timestamp::from_unix_micros(1_000)));
    RocksStore::open(
        dir,
        config,
        Durability::Buffered,
        Duration::from_secs(60),
        clock,
    )
    .expect("open store")
}

fn value(feature: u16, event_time: i64, number: f32) -> StoredValue {
    StoredValue {
        feature: FeatureId(feature),
        event_time: Timestamp::from_unix_micros(event_time),
        write_time: Timestamp::from_unix_micros(event_time),
        expires_at: Timestamp::MAX,
        source: SourceId(1),
        sensitivity: Sensitivity::None,
        policy_version: 0,
        origin_app: "facebook".to_string(),
        topic_id: String::new(),
        microphone_permission: false,
        topic_confidence: None,
        value: Value::Float(number),
    }
}

mod conformance {
    use super::*;
    use crate::storage::conformance::{Opened, conformance_suite};

    conformance_suite!(|| {
        let directory = tempfile::tempdir().expect("temp dir");
        let store = open(directory.path());
        Opened {
            store: Arc::new(store),
            keep: Box::new(directory),
        }
    });
}

/// The same promises with every read going to the engine (`row_cache_bytes = 0`).
mod conformance_without_row_cache {
    use super::*;
    use crate::storage::conformance::{Opened, conformance_suite};

    conformance_suite!(|| {
        let directory = tempfile::tempdir().expect("temp dir");
        let config = StorageConfig {
            row_cache_bytes: 0,
            ..StorageConfig::default()
        };
        let store = open_with(directory.path(), &config);
        assert!(store.rows.is_none());
        Opened {
            store: Arc::new(store),
            keep: Box::new(directory),
        }
    });
}

#[test]
fn merge_operands_apply_last_event_time_wins_in_any_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let key = encode_row_key(RowKey {
        user_id: 7,
        surface: SurfaceId(1),
    });
    let cf = store.cf(FEATURES_CF);
    let operand = |value| {
        encode_row(&StoredRow {
            values: vec![value],
        })
    };
    // Newest first, then older ones: the newest must survive, also across a flush.
    store
        .db
        .merge_cf(cf, key, operand(value(1, 300, 3.0)))
        .expect("merge");
    store
        .db
        .merge_cf(cf, key, operand(value(1, 100, 1.0)))
        .expect("merge");
    store
        .db
        .merge_cf(cf, key, operand(value(2, 50, 5.0)))
        .expect("merge");
    store.flush().expect("flush");
    store
        .db
        .merge_cf(cf, key, operand(value(1, 200, 2.0)))
        .expect("merge");
    let reads = store
        .read_rows(&[RowKey {
            user_id: 7,
            surface: SurfaceId(1),
        }])
        .expect("read");
    let RowRead::Found(row) = &reads[0] else {
        panic!("row missing: {reads:?}")
    };
    assert_eq!(
        row.value(FeatureId(1)).map(|stored| &stored.value),
        Some(&Value::Float(3.0))
    );
    assert_eq!(
        row.value(FeatureId(2)).map(|stored| &stored.value),
        Some(&Value::Float(5.0))
    );
}

#[test]
fn corrupt_bytes_are_reported_per_row() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let bad = RowKey {
        user_id: 1,
        surface: SurfaceId(1),
    };
    let good = RowKey {
        user_id: 2,
        surface: SurfaceId(1),
    };
    store
        .db
        .put_cf(store.cf(FEATURES_CF), encode_row_key(bad), b"not a row")
        .expect("put");
    let record = IdempotencyRecord {
        key: "k".to_string(),
        fingerprint: 1,
        created_at: Timestamp::from_unix_micros(1),
    };
    let rows = [RowWrite {
        key: good,
        values: vec![value(1, 10, 1.0)],
    }];
    let applied = store
        .apply_write(
            &record,
            Timestamp::from_unix_micros(0),
            &[UserWrite {
                user_id: good.user_id,
                generation: 0,
                rows: rows.to_vec(),
                audit: Vec::new(),
            }],
            &mut |_, outcomes| {
                assert_eq!(outcomes, [vec![ValueOutcome::Stored]]);
                b"answer".to_vec()
            },
        )
        .expect("write");
    assert_eq!(
        applied,
        [Applied::Fresh {
            answer: b"answer".to_vec()
        }]
    );
    let reads = store
        .read_rows(&[
            bad,
            good,
            RowKey {
                user_id: 3,
                surface: SurfaceId(1),
            },
        ])
        .expect("read");
    assert!(matches!(reads[0], RowRead::Corrupt(_)), "{reads:?}");
    assert!(matches!(reads[1], RowRead::Found(_)), "{reads:?}");
    assert_eq!(reads[2], RowRead::Missing);
}

/// A database written when the audit log was one chain (records under their 8-byte
/// sequence, index entries under pseudonym + sequence, no partition count) opens with
/// those records moved to chain 0, bytes unchanged: the chain verifies, the user's trail
/// finds them, and new records continue the chain.
#[test]
fn a_single_chain_audit_log_is_moved_to_chain_zero() {
    use crate::audit::{
        AuditAction, AuditEntry, PSEUDONYM_LEN, encode_single_chain_record, pseudonym,
    };

    let directory = tempfile::tempdir().expect("temporary directory");
    let user = pseudonym(&[9; 32], 42);
    let entry = |action, subject: &str| AuditEntry {
        time: Timestamp::from_unix_micros(1_000),
        action,
        caller: "tests".to_string(),
        bundle_hash: "00".repeat(32),
        user: Some(user),
        surfaces: String::new(),
        subject: subject.to_string(),
        reasons: 0,
    };
    // Open once to create the column families, then put the old layout in place.
    drop(open(directory.path()));
    {
        let mut options = Options::default();
        options.create_missing_column_families(true);
        let db = DB::open_cf(&options, directory.path(), COLUMN_FAMILIES).expect("open raw");
        let meta = db.cf_handle(META_CF).expect("meta");
        db.delete_cf(meta, "audit_partitions").expect("delete");
        let records = db.cf_handle(AUDIT_CF).expect("audit");
        let index = db.cf_handle(AUDIT_BY_USER_CF).expect("index");
        let mut previous = [0; 32];
        for (sequence, subject) in ["old_a", "old_b", "old_c"].into_iter().enumerate() {
            let sequence = sequence as u64;
            let (bytes, hash) = encode_single_chain_record(
                sequence,
                &entry(AuditAction::FeatureDenied, subject),
                previous,
            );
            previous = hash;
            db.put_cf(records, sequence.to_be_bytes(), bytes)
                .expect("put");
            let mut index_key = user.to_vec();
            index_key.extend_from_slice(&sequence.to_be_bytes());
            assert_eq!(index_key.len(), PSEUDONYM_LEN + 8);
            db.put_cf(index, index_key, []).expect("put");
        }
    }

    let store = open(directory.path());
    let report = store.verify_audit().expect("verify");
    assert_eq!(report.chains.len(), 1, "{report:?}");
    assert_eq!(
        (
            report.chains[0].partition,
            report.chains[0].records_checked,
            report.first_broken()
        ),
        (0, 3, None)
    );
    let subjects = |store: &RocksStore| -> Vec<String> {
        store
            .audit_trail(42, &user, 10)
            .expect("trail")
            .into_iter()
            .map(|record| record.entry.subject)
            .collect()
    };
    assert_eq!(subjects(&store), ["old_a", "old_b", "old_c"]);
    store
        .append_audit(&[entry(AuditAction::LoadChunk, "new")])
        .expect("append");
    let report = store.verify_audit().expect("verify");
    assert_eq!((report.records_checked(), report.first_broken()), (4, None));
    assert_eq!(subjects(&store), ["old_a", "old_b", "old_c", "new"]);
    drop(store);
    // Opening again finds nothing more to move, and the chain still verifies.
    let store = open(directory.path());
    assert_eq!(store.verify_audit().expect("verify").records_checked(), 4);
}

#[test]
fn an_audit_partition_count_out_of_range_is_refused() {
    let directory = tempfile::tempdir().expect("temporary directory");
    for partitions in [0, 16_385] {
        let opened = RocksStore::open(
            directory.path(),
            &StorageConfig {
                audit_partitions: partitions,
                ..StorageConfig::default()
            },
            Durability::Buffered,
            Duration::from_secs(60),
            Arc::new(ManualClock::new(Timestamp::from_unix_micros(1_000))),
        );
        let message = opened.expect_err("refused").to_string();
        assert!(
            message.contains("storage.audit_partitions must be 1 to 16384"),
            "{message}"
        );
    }
}
