//! The read-modify-write steps of the RocksDB store, under the users' stripe locks: the
//! fence on a user's state, the per-user idempotency records, merging a user's share of a
//! write, and re-validating a user's rows.

use featurestore::domain::Timestamp;
use rocksdb::WriteBatch;

use super::*;

impl RocksStore {
    /// Refuses a user's share unless its rows are the user's, and the user still has the
    /// generation the share was decided with (0 for no state) and no erasure. The caller
    /// holds the user's stripe, so that the answer stays true until its batch is written.
    pub(super) fn check_fence(&self, share: &UserWrite) -> Result<(), StorageError> {
        share.check_rows_are_the_users()?;
        let state = self
            .read_user_states(&[share.user_id])?
            .pop()
            .expect("one answer per user");
        let current_generation = state.as_ref().map_or(0, |state| state.generation);
        let erased = state.is_some_and(|state| state.erasure != ErasureState::None);
        if current_generation != share.generation || erased {
            return Err(StorageError::GenerationChanged {
                user_id: share.user_id,
                current_generation,
            });
        }
        Ok(())
    }

    /// The idempotency records of `key` for each of `users`: (created at, fingerprint,
    /// answer), `None` where there is none.
    #[allow(clippy::type_complexity)]
    pub(super) fn read_idempotency(
        &self,
        key: &str,
        users: &[UserWrite],
    ) -> Result<Vec<Option<(Timestamp, u64, Vec<u8>)>>, StorageError> {
        let keys: Vec<Vec<u8>> = users
            .iter()
            .map(|share| idempotency_key(key, share.user_id))
            .collect();
        self.db
            .batched_multi_get_cf(self.cf(IDEMPOTENCY_CF), keys.iter(), false)
            .into_iter()
            .map(|result| match result.map_err(engine)? {
                Some(bytes) => codec::decode_idempotency_record(&bytes)
                    .map_err(|error| StorageError::Corrupt(error.to_string())),
                None => Ok(None),
            })
            .collect()
    }

    /// Merges a user's share into `batch`: reads the rows it touches, merges each value
    /// (per feature, the latest event time wins), and puts the rows that changed. Returns
    /// the outcome of each value of each row. The caller holds the user's stripe.
    pub(super) fn merge_share(
        &self,
        share: &UserWrite,
        batch: &mut WriteBatch,
    ) -> Result<Vec<Vec<ValueOutcome>>, StorageError> {
        let mut distinct: Vec<RowKey> = share.rows.iter().map(|row| row.key).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let mut current: Vec<StoredRow> = Vec::with_capacity(distinct.len());
        // From the engine, not the row cache: what is merged and put back must be the
        // latest row, whatever changed it (a bulk load's merge does not take the stripe).
        let reads = decode_rows(distinct.len(), |visit| {
            self.visit_engine_rows(&distinct, (0..distinct.len()).collect(), visit, None)
        })?;
        for (key, read) in distinct.iter().zip(reads) {
            current.push(match read {
                RowRead::Found(row) => row,
                RowRead::Missing => StoredRow::default(),
                RowRead::Corrupt(problem) => {
                    return Err(StorageError::Corrupt(format!(
                        "row of user {} surface {}: {problem}",
                        key.user_id, key.surface.0
                    )));
                }
            });
        }
        let mut changed = vec![false; distinct.len()];
        let outcomes = share
            .rows
            .iter()
            .map(|row| {
                let slot = distinct
                    .binary_search(&row.key)
                    .expect("every row key is in the distinct list");
                row.values
                    .iter()
                    .map(|value| {
                        let outcome = merge_value(&mut current[slot], value.clone());
                        changed[slot] |= outcome == ValueOutcome::Stored;
                        outcome
                    })
                    .collect()
            })
            .collect();
        let features_cf = self.cf(FEATURES_CF);
        for ((key, row), changed) in distinct.iter().zip(&current).zip(changed) {
            if changed {
                batch.put_cf(features_cf, encode_row_key(*key), encode_row(row));
            }
        }
        Ok(outcomes)
    }
}

/// Entries about no single user's change, for chain 0.
pub(super) fn chain_zero(entries: &[AuditEntry]) -> Vec<(u32, AuditEntry)> {
    entries.iter().map(|entry| (0, entry.clone())).collect()
}

/// The key of a user's idempotency record: the big-endian user id, then the request's key.
pub(super) fn idempotency_key(key: &str, user_id: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(8 + key.len());
    bytes.extend_from_slice(&user_id.to_be_bytes());
    bytes.extend_from_slice(key.as_bytes());
    bytes
}

impl RocksStore {
    /// Adds to `batch` the changes `revalidate` makes to the rows of `user_id`; the caller
    /// holds the user's stripe. Returns how many values were removed.
    pub(super) fn revalidate_rows(
        &self,
        user_id: u64,
        state: Option<&UserState>,
        revalidate: Revalidate<'_>,
        batch: &mut WriteBatch,
    ) -> Result<usize, StorageError> {
        let (start, end) = user_range(user_id);
        let features = self.cf(FEATURES_CF);
        let mut iterator = self.db.raw_iterator_cf(features);
        iterator.seek(&start);
        let mut removed = 0;
        while iterator.valid() {
            let (Some(key), Some(bytes)) = (iterator.key(), iterator.value()) else {
                break;
            };
            if key >= end.as_slice() {
                break;
            }
            let Some(row_key) = decode_row_key(key) else {
                return Err(StorageError::Corrupt(format!(
                    "key {key:?} of user {user_id} is not a row key"
                )));
            };
            let row = decode_row(bytes).map_err(|error| {
                StorageError::Corrupt(format!(
                    "row of user {user_id} surface {}: {error}",
                    row_key.surface.0
                ))
            })?;
            let kept = revalidate(state, row_key, row.clone());
            // Decided, not yet written: the user's stripe must keep every change of its
            // state out until the batch is.
            fail::fail_point!("revalidate-decided");
            if kept != row {
                removed += row.values.len().saturating_sub(kept.values.len());
                if kept.values.is_empty() {
                    batch.delete_cf(features, key);
                } else {
                    batch.put_cf(features, key, encode_row(&kept));
                }
            }
            iterator.next();
        }
        iterator.status().map_err(engine)?;
        Ok(removed)
    }
}
