//! The audit log in RocksDB: one hash chain per partition of the users, each record under
//! (partition, sequence) in `audit`, indexed by user pseudonym in `audit_by_user`, and
//! appended in the same write batch as the change it records. Only the chains a batch
//! appends to are locked while it is written, so writes for users of different partitions
//! never wait for each other's audit records.

use parking_lot::{Mutex, MutexGuard};
use rocksdb::{DB, WriteBatch};

use super::{AUDIT_BY_USER_CF, AUDIT_CF, META_CF, RocksStore, engine};
use crate::audit::{
    AuditEntry, AuditRecord, AuditReport, HASH_LEN, PARTITIONS_MAX, PSEUDONYM_LEN, Pseudonym,
    chain, decode_record, encode_record, partition_of, verify_chain,
};
use crate::storage::StorageError;

/// The `meta` key holding the number of chains, fixed when the database is created.
const PARTITIONS_KEY: &str = "audit_partitions";
/// Length of a record's key: partition, then sequence, both big-endian.
const RECORD_KEY_LEN: usize = 4 + 8;
/// Length of a record's key in a database written before the log had partitions.
const SINGLE_CHAIN_KEY_LEN: usize = 8;
/// Records moved per batch when a single-chain log is migrated.
const MIGRATION_BATCH: usize = 10_000;

/// The next sequence number of a chain and the hash of its last record.
pub(super) type Tail = (u64, [u8; HASH_LEN]);

fn record_key(partition: u32, sequence: u64) -> [u8; RECORD_KEY_LEN] {
    let mut key = [0u8; RECORD_KEY_LEN];
    key[..4].copy_from_slice(&partition.to_be_bytes());
    key[4..].copy_from_slice(&sequence.to_be_bytes());
    key
}

fn decode_record_key(key: &[u8]) -> Option<(u32, u64)> {
    let key: &[u8; RECORD_KEY_LEN] = key.try_into().ok()?;
    let (partition, sequence) = key.split_at(4);
    Some((
        u32::from_be_bytes(partition.try_into().ok()?),
        u64::from_be_bytes(sequence.try_into().ok()?),
    ))
}

fn index_key(
    user: &Pseudonym,
    partition: u32,
    sequence: u64,
) -> [u8; PSEUDONYM_LEN + RECORD_KEY_LEN] {
    let mut key = [0u8; PSEUDONYM_LEN + RECORD_KEY_LEN];
    key[..PSEUDONYM_LEN].copy_from_slice(user);
    key[PSEUDONYM_LEN..].copy_from_slice(&record_key(partition, sequence));
    key
}

/// The number of chains of the database: the stored count, or `configured` for a database
/// that has none yet (new, or written before the log had partitions: its records are
/// moved to chain 0 first).
pub(super) fn open_partitions(db: &DB, configured: u32) -> Result<u32, StorageError> {
    if !(1..=PARTITIONS_MAX).contains(&configured) {
        return Err(StorageError::Engine(format!(
            "storage.audit_partitions must be 1 to {PARTITIONS_MAX}, not {configured}"
        )));
    }
    let meta = db
        .cf_handle(META_CF)
        .expect("created when the database is opened");
    if let Some(stored) = db.get_cf(meta, PARTITIONS_KEY).map_err(engine)? {
        let stored: [u8; 4] = stored.as_slice().try_into().map_err(|_| {
            StorageError::Corrupt("the number of audit chains is not a u32".to_string())
        })?;
        let stored = u32::from_le_bytes(stored);
        if stored != configured {
            tracing::warn!(
                stored,
                configured,
                "the audit log keeps the number of chains it was created with"
            );
        }
        return Ok(stored);
    }
    let moved = migrate_single_chain(db)?;
    if moved > 0 {
        tracing::info!(
            records = moved,
            "audit log moved to chain 0 of {configured}"
        );
    }
    db.put_cf(meta, PARTITIONS_KEY, configured.to_le_bytes())
        .map_err(engine)?;
    Ok(configured)
}

/// Moves every record of a single-chain log (and its index entries) under chain 0, keeping
/// its bytes: the chain verifies as before, and new records continue it. Safe to run
/// again after a crash: what was moved is not found under the old keys any more.
fn migrate_single_chain(db: &DB) -> Result<u64, StorageError> {
    let records = db
        .cf_handle(AUDIT_CF)
        .expect("created when the database is opened");
    let index = db
        .cf_handle(AUDIT_BY_USER_CF)
        .expect("created when the database is opened");
    let mut moved = 0;
    for (family, old_len, counted) in [
        (records, SINGLE_CHAIN_KEY_LEN, true),
        (index, PSEUDONYM_LEN + SINGLE_CHAIN_KEY_LEN, false),
    ] {
        loop {
            let mut batch = WriteBatch::default();
            let mut iterator = db.raw_iterator_cf(family);
            iterator.seek_to_first();
            let mut in_batch = 0;
            while iterator.valid() && in_batch < MIGRATION_BATCH {
                let (Some(key), Some(value)) = (iterator.key(), iterator.value()) else {
                    break;
                };
                if key.len() == old_len {
                    let (prefix, sequence) = key.split_at(old_len - SINGLE_CHAIN_KEY_LEN);
                    let mut new_key = prefix.to_vec();
                    new_key.extend_from_slice(&0u32.to_be_bytes());
                    new_key.extend_from_slice(sequence);
                    batch.put_cf(family, new_key, value);
                    batch.delete_cf(family, key);
                    in_batch += 1;
                }
                iterator.next();
            }
            iterator.status().map_err(engine)?;
            drop(iterator);
            if in_batch == 0 {
                break;
            }
            if counted {
                moved += in_batch as u64;
            }
            db.write(batch).map_err(engine)?;
        }
    }
    Ok(moved)
}

/// The tail of every chain, read from the last record of each.
pub(super) fn read_tails(db: &DB, partitions: u32) -> Result<Vec<Mutex<Tail>>, StorageError> {
    let records = db
        .cf_handle(AUDIT_CF)
        .expect("created when the database is opened");
    let mut iterator = db.raw_iterator_cf(records);
    (0..partitions)
        .map(|partition| {
            iterator.seek_for_prev(record_key(partition, u64::MAX));
            let tail = match (iterator.key(), iterator.value()) {
                (Some(key), Some(bytes))
                    if decode_record_key(key).is_some_and(|(found, _)| found == partition) =>
                {
                    let record = decode_record(bytes)
                        .map_err(|error| StorageError::Corrupt(error.to_string()))?;
                    (record.sequence + 1, record.hash)
                }
                _ => (0, [0; HASH_LEN]),
            };
            iterator.status().map_err(engine)?;
            Ok(Mutex::new(tail))
        })
        .collect()
}

impl RocksStore {
    /// The chain of a user's records.
    pub(super) fn partition(&self, user_id: u64) -> u32 {
        partition_of(user_id, self.audit_partitions)
    }

    /// Writes `batch` together with `entries` appended to their chains (partition, entry),
    /// in order within each chain.
    pub(super) fn write_with_audit(
        &self,
        mut batch: WriteBatch,
        entries: &[(u32, AuditEntry)],
    ) -> Result<(), StorageError> {
        let mut partitions: Vec<u32> = entries.iter().map(|(partition, _)| *partition).collect();
        partitions.sort_unstable();
        partitions.dedup();
        // In partition order, so that two writes never deadlock.
        let mut tails: Vec<(u32, MutexGuard<'_, Tail>, Tail)> = partitions
            .into_iter()
            .map(|partition| {
                let guard = self.audit_tails[partition as usize].lock();
                let tail = *guard;
                (partition, guard, tail)
            })
            .collect();
        for (partition, entry) in entries {
            fail::fail_point!("audit-append", |_| Err(StorageError::Engine(
                "the audit log cannot be appended to (failpoint audit-append)".to_string()
            )));
            let slot = tails
                .binary_search_by_key(partition, |(partition, _, _)| *partition)
                .expect("every partition of the entries is locked");
            let (sequence, previous) = &mut tails[slot].2;
            let record = chain(*partition, *sequence, entry.clone(), *previous);
            batch.put_cf(
                self.cf(AUDIT_CF),
                record_key(*partition, *sequence),
                encode_record(&record),
            );
            if let Some(user) = &entry.user {
                batch.put_cf(
                    self.cf(AUDIT_BY_USER_CF),
                    index_key(user, *partition, *sequence),
                    [],
                );
            }
            *previous = record.hash;
            *sequence += 1;
        }
        if batch.is_empty() {
            return Ok(());
        }
        fail::fail_point!("engine-write", |_| Err(super::disk_full()));
        self.db
            .write_opt(batch, &self.write_options)
            .map_err(engine)?;
        for (_, mut guard, tail) in tails {
            *guard = tail;
        }
        Ok(())
    }

    /// The records of one user, oldest first, at most `limit`.
    pub(super) fn read_audit_trail(
        &self,
        user: &Pseudonym,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StorageError> {
        // The index is in (partition, sequence) order: the oldest `limit` of each chain.
        let mut keys: Vec<[u8; RECORD_KEY_LEN]> = Vec::new();
        let mut taken = (u32::MAX, 0usize);
        let mut iterator = self.db.raw_iterator_cf(self.cf(AUDIT_BY_USER_CF));
        iterator.seek(user);
        while iterator.valid() {
            let Some(key) = iterator.key() else { break };
            if !key.starts_with(user) {
                break;
            }
            let (partition, sequence) =
                decode_record_key(&key[PSEUDONYM_LEN..]).ok_or_else(|| {
                    StorageError::Corrupt("an audit index key has no record key".to_string())
                })?;
            if taken.0 != partition {
                taken = (partition, 0);
            }
            if taken.1 < limit {
                keys.push(record_key(partition, sequence));
                taken.1 += 1;
            }
            iterator.next();
        }
        iterator.status().map_err(engine)?;
        let mut records = self
            .db
            .batched_multi_get_cf(self.cf(AUDIT_CF), keys.iter(), true)
            .into_iter()
            .map(|result| {
                let bytes = result.map_err(engine)?.ok_or_else(|| {
                    StorageError::Corrupt("an indexed audit record is missing".to_string())
                })?;
                decode_record(&bytes).map_err(|error| StorageError::Corrupt(error.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        records.sort_by_key(|record| (record.entry.time, record.partition, record.sequence));
        records.truncate(limit);
        Ok(records)
    }

    /// Checks every chain that holds records, each on its own.
    pub(super) fn verify_audit_chains(&self) -> Result<AuditReport, StorageError> {
        let mut report = AuditReport::default();
        let mut iterator = self.db.raw_iterator_cf(self.cf(AUDIT_CF));
        iterator.seek_to_first();
        let mut chain_records: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut current = None;
        let mut finish = |partition: u32, records: &mut Vec<(u64, Vec<u8>)>| {
            report.chains.push(verify_chain(
                partition,
                records
                    .iter()
                    .map(|(sequence, bytes)| (*sequence, bytes.as_slice())),
            ));
            records.clear();
        };
        while iterator.valid() {
            let (Some(key), Some(value)) = (iterator.key(), iterator.value()) else {
                break;
            };
            // A key of another shape is reported where it sorts: as a break in its chain.
            let (partition, sequence) = decode_record_key(key).unwrap_or((
                key.get(..4)
                    .and_then(|prefix| prefix.try_into().ok())
                    .map_or(u32::MAX, u32::from_be_bytes),
                u64::MAX,
            ));
            if current.is_some_and(|current| current != partition) {
                finish(current.expect("checked above"), &mut chain_records);
            }
            current = Some(partition);
            chain_records.push((sequence, value.to_vec()));
            iterator.next();
        }
        iterator.status().map_err(engine)?;
        if let Some(partition) = current {
            finish(partition, &mut chain_records);
        }
        Ok(report)
    }
}
