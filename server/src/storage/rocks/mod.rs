//! The RocksDB implementation of [`Store`]: the only module that touches RocksDB.
//!
//! Column families: `features` holds one row per (user, surface) under a user-first key;
//! `idempotency` holds the answer of every recent write for each of its users, under
//! (user, idempotency key); `user_state` holds each user's state under the big-endian user
//! id; `meta` holds a few values the server keeps about itself; `audit` holds the audit
//! log's hash chains under (partition, sequence) ([`audit`]), and `audit_by_user` indexes
//! them by user pseudonym.

mod audit;
mod extras;
mod row_cache;
mod write;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use featurestore::domain::Timestamp;
use parking_lot::{Mutex, MutexGuard, RwLock};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType,
    DataBlockIndexType, Options, WriteBatch, WriteOptions, compaction_filter::Decision,
};
use xxhash_rust::xxh3::xxh3_64;

use crate::audit::{AuditEntry, AuditRecord, AuditReport, Pseudonym};

use super::codec::{
    self, RowView, decode_row, decode_user_state, encode_row, encode_user_state, merge_value,
};
use super::keys::{decode_row_key, encode_row_key, user_range};
use super::{
    AnswerBuilder, Applied, BulkFiles, EngineStats, ErasureState, IdempotencyRecord, Maintenance,
    Revalidate, RowFound, RowKey, RowRead, StorageError, Store, StoredRow, UserState, UserWrite,
    ValueOutcome, decode_rows,
};
use crate::clock::Clock;
use crate::config::{Durability, StorageConfig};
use crate::registry::SurfaceId;
use codec::idempotency_created_at;
use featurestore::domain::UserStateUpdate;
use write::{chain_zero, idempotency_key};

const FEATURES_CF: &str = "features";
const IDEMPOTENCY_CF: &str = "idempotency";
const USER_STATE_CF: &str = "user_state";
const META_CF: &str = "meta";
const AUDIT_CF: &str = "audit";
const AUDIT_BY_USER_CF: &str = "audit_by_user";
const PSEUDONYM_KEYS_CF: &str = "pseudonym_keys";
/// Every column family of the database, for tools that open it directly.
pub const COLUMN_FAMILIES: [&str; 7] = [
    FEATURES_CF,
    IDEMPOTENCY_CF,
    USER_STATE_CF,
    META_CF,
    AUDIT_CF,
    AUDIT_BY_USER_CF,
    PSEUDONYM_KEYS_CF,
];
/// Lock stripes serializing read-modify-write of a user's rows and state, and of
/// idempotency keys.
const WRITE_LOCK_STRIPES: usize = 1024;
/// Data block size: small, because a read wants one row of a few hundred bytes and every
/// block it misses in the cache is read and decompressed whole.
const BLOCK_BYTES: usize = 4 * 1024;

/// A [`Store`] on an embedded RocksDB database.
pub struct RocksStore {
    /// The open database; column families as above.
    db: DB,
    /// Options of every write: the WAL is always on; `sync` follows the durability mode.
    write_options: WriteOptions,
    /// The number of audit chains, fixed when the database was created.
    audit_partitions: u32,
    /// Per audit chain, its next sequence number and the hash of its last record. Appends
    /// hold the tails of the chains they append to until their batch is written, so each
    /// chain is written in order.
    audit_tails: Vec<Mutex<audit::Tail>>,
    /// Writes that touch the same user or idempotency key take the same stripe, so a
    /// read-modify-write never interleaves with another, and a user-state change never
    /// interleaves with a write for that user.
    write_locks: Vec<Mutex<()>>,
    /// Options of the table files a bulk load writes: the features' table format,
    /// compression and merge operator, so that ingested files read like flushed ones.
    table_file_options: Options,
    /// Every change of a user's state holds it shared; a bulk-load commit holds it
    /// exclusively ([`BulkFiles::hold_user_states`]) while it checks the generations its
    /// rows were decided with and applies them.
    state_gate: RwLock<()>,
    /// Counts changes of users' states ([`BulkFiles::user_state_changes`]).
    state_changes: AtomicU64,
    /// The database's options when RocksDB keeps statistics (block cache hits, stalls),
    /// which are read through them.
    statistics: Option<Options>,
    /// Rows kept in memory in front of the engine; `None` when `row_cache_bytes` is 0.
    rows: Option<row_cache::RowCache>,
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.db.path())
            .finish_non_exhaustive()
    }
}

fn engine(error: rocksdb::Error) -> StorageError {
    StorageError::Engine(error.into_string())
}

/// What the engine answers when its disk is full; the `engine-write` failpoint injects it.
#[allow(dead_code, reason = "called only where failpoints are compiled in")]
fn disk_full() -> StorageError {
    StorageError::Engine("IO error: No space left on device (failpoint engine-write)".to_string())
}

/// RocksDB associative merge operator over encoded rows: the per-feature last-writer-wins
/// union of the existing row and every operand, whatever their order. An undecodable input
/// makes the merge fail, which RocksDB reports as corruption of that key on read.
pub fn merge_operator(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    codec::merge_operands(existing.into_iter().chain(operands)).ok()
}

/// Block-based table options of every column family holding data, on a shared cache.
fn table_options(cache: &Cache) -> BlockBasedOptions {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    // Point lookups dominate: a whole-key bloom filter skips files without the key and
    // a hash index inside each data block avoids the binary search.
    table.set_bloom_filter(10.0, false);
    table.set_whole_key_filtering(true);
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    table.set_data_block_index_type(DataBlockIndexType::BinaryAndHash);
    table.set_block_size(BLOCK_BYTES);
    table
}

/// Options that decide how the `features` column family's files are laid out and read:
/// shared by the column family, the table files a bulk load writes, and the raw engine
/// handle the benchmarks measure.
fn features_format(table: &BlockBasedOptions) -> Options {
    let mut options = Options::default();
    options.set_block_based_table_factory(table);
    options.set_compression_type(DBCompressionType::Lz4);
    options.set_merge_operator_associative("featurestore.last_event_time_wins.v1", merge_operator);
    options
}

/// The column families and their options: the features laid out for point lookups and
/// rows whose every value expired dropped by compaction; idempotency records dropped past
/// the window; user states compressed; the rest as RocksDB's defaults.
fn column_families(
    table: &BlockBasedOptions,
    config: &StorageConfig,
    idempotency_window: Duration,
    clock: Arc<dyn Clock>,
) -> [ColumnFamilyDescriptor; 7] {
    let mut features = features_format(table);
    features.set_write_buffer_size(config.write_buffer_bytes);
    // Rows whose every value has expired are dropped whenever compaction meets them;
    // rows with some expired values are rewritten by the retention sweep.
    let expiry_clock = Arc::clone(&clock);
    features.set_compaction_filter(
        "featurestore.expired_rows",
        move |_level, _key, value: &[u8]| {
            let now = expiry_clock.now();
            let expired = |view: RowView<'_>| {
                view.values().try_fold(true, |expired, value| {
                    let value = value?;
                    Ok(expired && view.provenance(value.provenance).expires_at <= now)
                })
            };
            match codec::current_format(value)
                .and_then(|row| RowView::parse(&row).and_then(expired))
            {
                Ok(true) => Decision::Remove,
                _ => Decision::Keep,
            }
        },
    );

    let mut idempotency = Options::default();
    idempotency.set_block_based_table_factory(table);
    idempotency.set_compression_type(DBCompressionType::Lz4);
    let window_micros = i64::try_from(idempotency_window.as_micros()).unwrap_or(i64::MAX);
    idempotency.set_compaction_filter(
        "featurestore.idempotency_expiry",
        move |_level, _key, value: &[u8]| match idempotency_created_at(value) {
            Some(created_at)
                if created_at.unix_micros()
                    < clock.now().unix_micros().saturating_sub(window_micros) =>
            {
                Decision::Remove
            }
            _ => Decision::Keep,
        },
    );

    let mut user_state = Options::default();
    user_state.set_block_based_table_factory(table);
    user_state.set_compression_type(DBCompressionType::Lz4);
    [
        ColumnFamilyDescriptor::new(FEATURES_CF, features),
        ColumnFamilyDescriptor::new(IDEMPOTENCY_CF, idempotency),
        ColumnFamilyDescriptor::new(USER_STATE_CF, user_state),
        ColumnFamilyDescriptor::new(META_CF, Options::default()),
        ColumnFamilyDescriptor::new(AUDIT_CF, Options::default()),
        ColumnFamilyDescriptor::new(AUDIT_BY_USER_CF, Options::default()),
        ColumnFamilyDescriptor::new(PSEUDONYM_KEYS_CF, Options::default()),
    ]
}

impl RocksStore {
    /// The database in `path` opened read-only with the options the store reads its rows
    /// with (table format, block cache of `config`'s size, merge operator), for measuring
    /// the engine on its own. Rows are in the `features` column family under
    /// [`super::keys::encode_row_key`].
    pub fn open_engine_read_only(path: &Path, config: &StorageConfig) -> Result<DB, StorageError> {
        let table = table_options(&Cache::new_lru_cache(config.block_cache_bytes));
        let descriptors = COLUMN_FAMILIES.iter().map(|&name| {
            let options = if name == FEATURES_CF {
                features_format(&table)
            } else {
                Options::default()
            };
            ColumnFamilyDescriptor::new(name, options)
        });
        DB::open_cf_descriptors_read_only(&Options::default(), path, descriptors, false)
            .map_err(engine)
    }

    /// Opens (creating when missing) the database in `path`. Idempotency records older
    /// than `idempotency_window` by `clock` are dropped when compaction meets them.
    pub fn open(
        path: &Path,
        config: &StorageConfig,
        durability: Durability,
        idempotency_window: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<RocksStore, StorageError> {
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_max_open_files(config.max_open_files);
        db_options.set_max_background_jobs(config.background_jobs);
        db_options.set_keep_log_file_num(10);
        // Both column families flush together, so a write's rows and its idempotency
        // record are never split across a crash.
        db_options.set_atomic_flush(true);
        if config.statistics {
            // Counters only: RocksDB's histograms and timers cost a clock read per call.
            db_options.enable_statistics();
            db_options
                .set_statistics_level(rocksdb::statistics::StatsLevel::ExceptHistogramOrTimers);
        }

        let table = table_options(&Cache::new_lru_cache(config.block_cache_bytes));
        let table_file_options = features_format(&table);
        let db = DB::open_cf_descriptors(
            &db_options,
            path,
            column_families(&table, config, idempotency_window, clock),
        )
        .map_err(engine)?;
        let mut write_options = WriteOptions::default();
        write_options.set_sync(durability == Durability::Sync);
        write_options.disable_wal(false);
        let audit_partitions = audit::open_partitions(&db, config.audit_partitions)?;
        let audit_tails = audit::read_tails(&db, audit_partitions)?;
        Ok(RocksStore {
            db,
            write_options,
            audit_partitions,
            audit_tails,
            state_gate: RwLock::new(()),
            state_changes: AtomicU64::new(0),
            write_locks: (0..WRITE_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            table_file_options,
            statistics: config.statistics.then_some(db_options),
            rows: row_cache::RowCache::new(config.row_cache_bytes),
        })
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("both column families are created when the database is opened")
    }

    /// Locks the stripes of every key (an idempotency key, or a big-endian user id), in
    /// stripe order so that two writes never deadlock.
    fn lock_stripes<'a>(&'a self, keys: impl Iterator<Item = &'a [u8]>) -> Vec<MutexGuard<'a, ()>> {
        let mut stripes: Vec<usize> = keys
            .map(|key| (xxh3_64(key) as usize) % WRITE_LOCK_STRIPES)
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes
            .into_iter()
            .map(|stripe| self.write_locks[stripe].lock())
            .collect()
    }
}

/// A change of users' states in progress: holds the state gate shared, and counts the
/// change when it ends (still under the gate, so that a commit that read the count before
/// sees it move).
struct StateChange<'a> {
    _gate: parking_lot::RwLockReadGuard<'a, ()>,
    changes: &'a AtomicU64,
}

impl Drop for StateChange<'_> {
    fn drop(&mut self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
    }
}

impl RocksStore {
    /// Marks a change of a user's state, for as long as it is held.
    fn changing_state(&self) -> StateChange<'_> {
        StateChange {
            _gate: self.state_gate.read(),
            changes: &self.state_changes,
        }
    }
}

impl RocksStore {
    /// Reads the rows of the keys at `order` (indexes into `keys`) from the engine and shows
    /// them to `visit`; with a cache, keeps them in it.
    fn visit_engine_rows(
        &self,
        keys: &[RowKey],
        mut order: Vec<usize>,
        visit: &mut dyn FnMut(usize, RowFound<'_>),
        cache: Option<&row_cache::RowCache>,
    ) -> Result<(), StorageError> {
        // Sorted input lets RocksDB walk each file once for the whole batch; it also puts
        // the keys of a user side by side.
        order.sort_unstable_by_key(|&index| keys[index]);
        let tickets: Vec<_> = match cache {
            Some(cache) => order
                .iter()
                .map(|&index| cache.ticket(keys[index].user_id))
                .collect(),
            None => Vec::new(),
        };
        let encoded: Vec<_> = order
            .iter()
            .map(|&index| encode_row_key(keys[index]))
            .collect();
        let results = self
            .db
            .batched_multi_get_cf(self.cf(FEATURES_CF), encoded.iter(), true);
        // The rows of the user being read, to cache once its last key is read.
        let mut read = Vec::new();
        for (position, (&index, result)) in order.iter().zip(results).enumerate() {
            let key = keys[index];
            match result {
                Ok(Some(bytes)) => {
                    RowFound::visit_stored(index, &bytes, visit);
                    if cache.is_some() {
                        read.push((key.surface, Some(Arc::<[u8]>::from(&*bytes))));
                    }
                }
                Ok(None) => {
                    visit(index, RowFound::Missing);
                    if cache.is_some() {
                        read.push((key.surface, None));
                    }
                }
                // A merge over undecodable operands surfaces as corruption of that key.
                Err(error) if error.kind() == rocksdb::ErrorKind::Corruption => {
                    visit(index, RowFound::Corrupt(&error.into_string()));
                }
                Err(error) => return Err(engine(error)),
            }
            let last_of_user = order
                .get(position + 1)
                .is_none_or(|&next| keys[next].user_id != key.user_id);
            if let Some(cache) = cache
                && last_of_user
            {
                fail::fail_point!("row-cache-keep");
                cache.keep(key.user_id, tickets[position], read.drain(..));
            }
        }
        Ok(())
    }

    /// Drops the cached rows of `users` once their change is in the engine, before it is
    /// acknowledged. Called whether the engine's write succeeded or not: a change that may
    /// have been applied is treated as made.
    fn rows_changed(&self, users: impl IntoIterator<Item = u64>) {
        if let Some(cache) = &self.rows {
            for user_id in users {
                cache.changed(user_id);
            }
        }
    }

    /// Drops every cached row, after a change whose users are not known one by one.
    fn all_rows_changed(&self) {
        if let Some(cache) = &self.rows {
            cache.clear();
        }
    }
}

impl Store for RocksStore {
    fn visit_rows(
        &self,
        keys: &[RowKey],
        visit: &mut dyn FnMut(usize, RowFound<'_>),
    ) -> Result<(), StorageError> {
        let Some(cache) = &self.rows else {
            return self.visit_engine_rows(keys, (0..keys.len()).collect(), visit, None);
        };
        // Rows in the cache are shown at once; the others are read from the engine.
        let mut missed = Vec::new();
        let mut last: Option<(u64, Option<Arc<row_cache::CachedUser>>)> = None;
        for (index, key) in keys.iter().enumerate() {
            let cached = match &last {
                Some((user_id, cached)) if *user_id == key.user_id => cached.clone(),
                _ => {
                    let cached = cache.user(key.user_id);
                    last = Some((key.user_id, cached.clone()));
                    cached
                }
            };
            match cached.as_ref().and_then(|cached| cached.row(key.surface)) {
                Some(Some(bytes)) => RowFound::visit_stored(index, bytes, visit),
                Some(None) => visit(index, RowFound::Missing),
                None => missed.push(index),
            }
        }
        cache.count((keys.len() - missed.len()) as u64, missed.len() as u64);
        if missed.is_empty() {
            return Ok(());
        }
        self.visit_engine_rows(keys, missed, visit, Some(cache))
    }

    fn apply_write(
        &self,
        idempotency: &IdempotencyRecord,
        replay_since: Timestamp,
        users: &[UserWrite],
        answer: AnswerBuilder<'_>,
    ) -> Result<Vec<Applied>, StorageError> {
        debug_assert!(
            users
                .windows(2)
                .all(|pair| pair[0].user_id < pair[1].user_id)
        );
        let user_keys: Vec<[u8; 8]> = users
            .iter()
            .map(|share| share.user_id.to_be_bytes())
            .collect();
        // A user's stripe covers its rows, its state and its idempotency records.
        let _guards = self.lock_stripes(user_keys.iter().map(|key| key.as_slice()));

        let mut applied: Vec<Option<Applied>> = vec![None; users.len()];
        for (slot, record) in applied
            .iter_mut()
            .zip(self.read_idempotency(&idempotency.key, users)?)
        {
            if let Some((created_at, fingerprint, answer)) = record
                && created_at >= replay_since
            {
                if fingerprint != idempotency.fingerprint {
                    return Err(StorageError::IdempotencyKeyReused);
                }
                *slot = Some(Applied::Replayed { answer });
            }
        }
        // Under the users' stripes: no state changes until the batch below is written.
        for (share, slot) in users.iter().zip(&applied) {
            if slot.is_none() {
                self.check_fence(share)?;
            }
        }

        // RocksDB applies every user's share in one batch: all of the write or none.
        let mut batch = WriteBatch::default();
        let mut audit = Vec::new();
        for (index, (share, slot)) in users.iter().zip(&mut applied).enumerate() {
            if slot.is_some() {
                continue;
            }
            let outcomes = self.merge_share(share, &mut batch)?;
            let answer = answer(index, &outcomes);
            let record = codec::encode_idempotency_record(idempotency, &answer);
            batch.put_cf(
                self.cf(IDEMPOTENCY_CF),
                idempotency_key(&idempotency.key, share.user_id),
                record,
            );
            let partition = self.partition(share.user_id);
            audit.extend(share.audit.iter().map(|entry| (partition, entry.clone())));
            *slot = Some(Applied::Fresh { answer });
        }
        let written = self.write_with_audit(batch, &audit);
        self.rows_changed(users.iter().map(|share| share.user_id));
        written?;
        Ok(applied
            .into_iter()
            .map(|slot| slot.expect("every share is replayed or applied"))
            .collect())
    }

    fn read_user_states(&self, users: &[u64]) -> Result<Vec<Option<UserState>>, StorageError> {
        let keys: Vec<[u8; 8]> = users.iter().map(|user| user.to_be_bytes()).collect();
        self.db
            .batched_multi_get_cf(self.cf(USER_STATE_CF), keys.iter(), false)
            .into_iter()
            .zip(users)
            .map(|(result, &user_id)| match result.map_err(engine)? {
                Some(bytes) => decode_user_state(user_id, &bytes)
                    .map(Some)
                    .map_err(|error| {
                        StorageError::Corrupt(format!("state of user {user_id}: {error}"))
                    }),
                None => Ok(None),
            })
            .collect()
    }

    fn set_user_state(
        &self,
        update: &UserStateUpdate,
        now: Timestamp,
        revalidate: Revalidate<'_>,
        audit: &AuditEntry,
    ) -> Result<UserState, StorageError> {
        let _change = self.changing_state();
        let key = update.user_id.to_be_bytes();
        let _guard = self.lock_stripes(std::iter::once(key.as_slice()));
        let current = self
            .read_user_states(&[update.user_id])?
            .pop()
            .expect("one answer per user");
        let state = UserState::updated(current.as_ref(), update, now)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(USER_STATE_CF), key, encode_user_state(&state));
        self.revalidate_rows(update.user_id, Some(&state), revalidate, &mut batch)?;
        let written =
            self.write_with_audit(batch, &[(self.partition(update.user_id), audit.clone())]);
        self.rows_changed([update.user_id]);
        written?;
        Ok(state)
    }

    fn append_audit(&self, entries: &[AuditEntry]) -> Result<(), StorageError> {
        self.write_with_audit(WriteBatch::default(), &chain_zero(entries))
    }

    fn audit_trail(
        &self,
        _user_id: u64,
        user: &Pseudonym,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StorageError> {
        self.read_audit_trail(user, limit)
    }

    fn verify_audit(&self) -> Result<AuditReport, StorageError> {
        self.verify_audit_chains()
    }

    fn revalidate_user(
        &self,
        user_id: u64,
        revalidate: Revalidate<'_>,
    ) -> Result<usize, StorageError> {
        let key = user_id.to_be_bytes();
        let _guard = self.lock_stripes(std::iter::once(key.as_slice()));
        let state = self.read_user_states(&[user_id])?.pop().flatten();
        let mut batch = WriteBatch::default();
        let removed = self.revalidate_rows(user_id, state.as_ref(), revalidate, &mut batch)?;
        if !batch.is_empty() {
            let written = self.db.write_opt(batch, &self.write_options);
            self.rows_changed([user_id]);
            written.map_err(engine)?;
        }
        Ok(removed)
    }

    fn users_with_rows(&self, from_user: u64, limit: usize) -> Result<Vec<u64>, StorageError> {
        let mut users = Vec::new();
        let mut iterator = self.db.raw_iterator_cf(self.cf(FEATURES_CF));
        iterator.seek(user_range(from_user).0);
        while users.len() < limit && iterator.valid() {
            let Some(key) = iterator.key().and_then(decode_row_key) else {
                return Err(StorageError::Corrupt(
                    "a key of the features column family is not a row key".to_string(),
                ));
            };
            users.push(key.user_id);
            match key.user_id.checked_add(1) {
                Some(next) => iterator.seek(user_range(next).0),
                None => break,
            }
        }
        iterator.status().map_err(engine)?;
        Ok(users)
    }

    fn read_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.db
            .get_cf(self.cf(META_CF), key.as_bytes())
            .map_err(engine)
    }

    fn write_meta(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        fail::fail_point!("engine-write", |_| Err(disk_full()));
        self.db
            .put_cf_opt(self.cf(META_CF), key.as_bytes(), value, &self.write_options)
            .map_err(engine)
    }

    fn delete_meta(&self, key: &str) -> Result<(), StorageError> {
        self.db
            .delete_cf_opt(self.cf(META_CF), key.as_bytes(), &self.write_options)
            .map_err(engine)
    }

    fn pseudonym_key(&self, user_id: u64, create: bool) -> Result<Option<[u8; 32]>, StorageError> {
        let key = user_id.to_be_bytes();
        let read = || -> Result<Option<[u8; 32]>, StorageError> {
            match self
                .db
                .get_pinned_cf(self.cf(PSEUDONYM_KEYS_CF), key)
                .map_err(engine)?
            {
                Some(bytes) => bytes.as_ref().try_into().map(Some).map_err(|_| {
                    StorageError::Corrupt(format!(
                        "the pseudonym key of user {user_id} is not 32 bytes"
                    ))
                }),
                None => Ok(None),
            }
        };
        if let Some(secret) = read()? {
            return Ok(Some(secret));
        }
        if !create {
            return Ok(None);
        }
        let _guard = self.lock_stripes(std::iter::once(key.as_slice()));
        if let Some(secret) = read()? {
            return Ok(Some(secret));
        }
        // An erased user's key is never made again: under the stripe, no erasure can
        // come between this check and the write below.
        let erased = self
            .read_user_states(&[user_id])?
            .pop()
            .flatten()
            .is_some_and(|state| state.erasure != ErasureState::None);
        if erased {
            return Ok(None);
        }
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|error| {
            StorageError::Engine(format!("no randomness for a pseudonym key: {error}"))
        })?;
        self.db
            .put_cf_opt(self.cf(PSEUDONYM_KEYS_CF), key, secret, &self.write_options)
            .map_err(engine)?;
        Ok(Some(secret))
    }

    fn erase_user(
        &self,
        user_id: u64,
        now: Timestamp,
        audit: &AuditEntry,
    ) -> Result<UserState, StorageError> {
        let _change = self.changing_state();
        let key = user_id.to_be_bytes();
        let _guard = self.lock_stripes(std::iter::once(key.as_slice()));
        let current = self.read_user_states(&[user_id])?.pop().flatten();
        let state = UserState::tombstone(user_id, current.as_ref(), now);
        let (start, end) = user_range(user_id);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(USER_STATE_CF), key, encode_user_state(&state));
        batch.delete_range_cf(self.cf(FEATURES_CF), start, end);
        batch.delete_cf(self.cf(PSEUDONYM_KEYS_CF), key);
        let written = self.write_with_audit(batch, &[(self.partition(user_id), audit.clone())]);
        self.rows_changed([user_id]);
        written?;
        Ok(state)
    }

    fn user_has_data(&self, user_id: u64) -> Result<bool, StorageError> {
        let has_rows = self.users_with_rows(user_id, 1)?.first() == Some(&user_id);
        Ok(has_rows || self.pseudonym_key(user_id, false)?.is_some())
    }

    fn finish_erasure(&self, user_id: u64) -> Result<(), StorageError> {
        let _change = self.changing_state();
        let key = user_id.to_be_bytes();
        let _guard = self.lock_stripes(std::iter::once(key.as_slice()));
        let Some(mut state) = self.read_user_states(&[user_id])?.pop().flatten() else {
            return Ok(());
        };
        state.erasure = ErasureState::Erased;
        self.db
            .put_cf_opt(
                self.cf(USER_STATE_CF),
                key,
                encode_user_state(&state),
                &self.write_options,
            )
            .map_err(engine)
    }

    fn write_meta_audited(
        &self,
        key: &str,
        value: &[u8],
        audit: &[AuditEntry],
    ) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(META_CF), key.as_bytes(), value);
        self.write_with_audit(batch, &chain_zero(audit))
    }

    fn meta_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let mut iterator = self.db.raw_iterator_cf(self.cf(META_CF));
        iterator.seek(prefix.as_bytes());
        let mut found = Vec::new();
        while let (Some(key), Some(value)) = (iterator.key(), iterator.value()) {
            if !key.starts_with(prefix.as_bytes()) {
                break;
            }
            found.push((String::from_utf8_lossy(key).into_owned(), value.to_vec()));
            iterator.next();
        }
        iterator.status().map_err(engine)?;
        Ok(found)
    }

    fn bulk_files(&self) -> Option<&dyn BulkFiles> {
        Some(self)
    }

    fn maintenance(&self) -> Option<&dyn Maintenance> {
        Some(self)
    }

    fn user_files(&self) -> Option<&dyn super::UserFiles> {
        Some(self)
    }

    fn engine_stats(&self) -> Option<&dyn EngineStats> {
        Some(self)
    }
}

#[cfg(test)]
mod tests;
