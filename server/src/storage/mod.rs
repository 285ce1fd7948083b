//! The storage layer: a [`Store`] trait in domain types, and its RocksDB implementation.
//!
//! Nothing here knows about gRPC: this module never imports tonic or prost. Values are
//! opaque to the engine beyond their encoding ([`codec`]); keys are user-first ([`keys`]).

pub mod codec;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod keys;
pub mod redis;

pub use self::redis::RedisStore;
mod rocks;

use std::fmt::Debug;

use featurestore::domain::{AgeBand, Timestamp, UserStateUpdate, Value};

pub use rocks::{COLUMN_FAMILIES, RocksStore};

use crate::audit::{AuditEntry, AuditRecord, AuditReport, Pseudonym};
use crate::registry::{FeatureId, Sensitivity, SourceId, SurfaceId};

/// The unit of storage: everything stored for one user on one surface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowKey {
    pub user_id: u64,
    pub surface: SurfaceId,
}

/// One stored feature value with its provenance.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredValue {
    pub feature: FeatureId,
    /// The interaction time the value was derived from; orders writes.
    pub event_time: Timestamp,
    /// When the store accepted the value.
    pub write_time: Timestamp,
    /// When the value stops being served.
    pub expires_at: Timestamp,
    pub source: SourceId,
    pub sensitivity: Sensitivity,
    /// Identifies the policy bundle that admitted the value: its hash prefix.
    pub policy_version: u64,
    /// The app the interaction happened in.
    pub origin_app: String,
    /// For topic values: the taxonomy topic (empty when none), kept so that a new
    /// taxonomy can re-classify the value.
    pub topic_id: String,
    /// For voice sources: whether microphone permission had been granted.
    pub microphone_permission: bool,
    /// For topic values: the classifier's confidence.
    pub topic_confidence: Option<f32>,
    pub value: Value,
}

/// Everything stored under one [`RowKey`], sorted by feature id, one value per feature.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoredRow {
    pub values: Vec<StoredValue>,
}

impl StoredRow {
    /// The stored value of `feature`, if any.
    pub fn value(&self, feature: FeatureId) -> Option<&StoredValue> {
        self.values
            .binary_search_by_key(&feature, |value| value.feature)
            .ok()
            .map(|index| &self.values[index])
    }
}

/// What reading one key found.
#[derive(Clone, Debug, PartialEq)]
pub enum RowRead {
    Found(StoredRow),
    Missing,
    /// The stored bytes do not decode; the string says how.
    Corrupt(String),
}

/// What reading one key found, read in place (see [`Store::visit_rows`]).
#[derive(Clone, Copy, Debug)]
pub enum RowFound<'a> {
    Row(codec::RowView<'a>),
    Missing,
    /// The stored bytes do not decode; the string says how.
    Corrupt(&'a str),
    /// The part of the engine holding the key did not answer; the string says how.
    Unavailable(&'a str),
}

impl RowFound<'_> {
    /// Shows the stored bytes of key `index` to `visit`: the row read in place, or why the
    /// bytes do not decode.
    #[inline]
    pub fn visit_stored(index: usize, bytes: &[u8], visit: &mut dyn FnMut(usize, RowFound<'_>)) {
        match codec::current_format(bytes) {
            Ok(current) => match codec::RowView::parse(&current) {
                Ok(view) => visit(index, RowFound::Row(view)),
                Err(error) => visit(index, RowFound::Corrupt(&error.to_string())),
            },
            Err(error) => visit(index, RowFound::Corrupt(&error.to_string())),
        }
    }
}

/// The rows `visit_rows` shows of `keys` keys, decoded, one answer per key in order; fails
/// when a part of the engine holding some of them does not answer.
pub fn decode_rows(
    keys: usize,
    visit_rows: impl FnOnce(&mut dyn FnMut(usize, RowFound<'_>)) -> Result<(), StorageError>,
) -> Result<Vec<RowRead>, StorageError> {
    let mut reads = vec![RowRead::Missing; keys];
    let mut failure = None;
    visit_rows(&mut |index, found| {
        reads[index] = match found {
            RowFound::Row(view) => match view.to_row() {
                Ok(row) => RowRead::Found(row),
                Err(error) => RowRead::Corrupt(error.to_string()),
            },
            RowFound::Missing => RowRead::Missing,
            RowFound::Corrupt(problem) => RowRead::Corrupt(problem.to_owned()),
            RowFound::Unavailable(problem) => {
                failure.get_or_insert_with(|| problem.to_owned());
                RowRead::Missing
            }
        };
    })?;
    match failure {
        Some(problem) => Err(StorageError::Engine(problem)),
        None => Ok(reads),
    }
}

/// Values to merge into one row.
#[derive(Clone, Debug)]
pub struct RowWrite {
    pub key: RowKey,
    pub values: Vec<StoredValue>,
}

/// What a write did to one value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueOutcome {
    /// The value is now the stored one.
    Stored,
    /// A value with a later event time was already stored; this one was ignored.
    Superseded,
}

/// Identifies a write for idempotent retries. The store keeps one record per user of the
/// write: (key, user) → fingerprint, time, and the answer built for that user.
#[derive(Clone, Debug)]
pub struct IdempotencyRecord {
    pub key: String,
    /// Hash of the whole request, so reuse of a key for another request is caught.
    pub fingerprint: u64,
    pub created_at: Timestamp,
}

/// One user's share of a write: applied all or nothing, in one atomic step with the check
/// of the user's state (the fence), the user's idempotency record and its audit entries.
#[derive(Clone, Debug)]
pub struct UserWrite {
    pub user_id: u64,
    /// The generation of the user's state the write was decided with; 0 for no state.
    pub generation: u64,
    /// The user's rows to merge (possibly none: every value refused).
    pub rows: Vec<RowWrite>,
    /// Audit entries appended with the user's share.
    pub audit: Vec<AuditEntry>,
}

/// What [`Store::apply_write`] did with one user's share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Applied now; the answer stored with it was built from its outcomes.
    Fresh { answer: Vec<u8> },
    /// Already applied under this idempotency key (with the same fingerprint): nothing
    /// changed; the answer stored then.
    Replayed { answer: Vec<u8> },
}

/// Where a user is in erasure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErasureState {
    None,
    /// Requested; every write for the user is refused.
    Pending,
    Erased,
}

/// The authoritative state of one user, written only by the privacy role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserState {
    pub user_id: u64,
    /// ISO 3166 code ("DE", "US-CA"), upper case; empty when unknown.
    pub jurisdiction: String,
    pub age_band: AgeBand,
    /// Apps whose accounts are linked with each other.
    pub linked_apps: Vec<String>,
    pub ads_objection: bool,
    pub erasure: ErasureState,
    /// Increases by one on every change; 0 is "no state".
    pub generation: u64,
    pub updated_at: Timestamp,
}

/// Failures of the storage engine.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage engine error: {0}")]
    Engine(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A user's state is not at the generation the caller expected (or its erasure began).
    #[error("the state of user {user_id} changed: its generation is now {current_generation}")]
    GenerationChanged {
        user_id: u64,
        current_generation: u64,
    },
    /// A user's share of a write holds rows of another user: a bug of the caller, refused
    /// rather than applied unchecked.
    #[error("a write holds rows of user {user_id} in the share of another user")]
    Unfenced { user_id: u64 },
    /// The idempotency key was used for another request (another fingerprint) that
    /// shares a user with this one.
    #[error("the idempotency key was already used for another request")]
    IdempotencyKeyReused,
}

impl UserState {
    /// The state `update` makes of `current` (`None`: the user has none yet): the next
    /// generation, the erasure state kept. Refused when `update` expects another
    /// generation than the current one.
    pub fn updated(
        current: Option<&UserState>,
        update: &UserStateUpdate,
        now: Timestamp,
    ) -> Result<UserState, StorageError> {
        let current_generation = current.map_or(0, |state| state.generation);
        if update
            .expected_generation
            .is_some_and(|expected| expected != current_generation)
        {
            return Err(StorageError::GenerationChanged {
                user_id: update.user_id,
                current_generation,
            });
        }
        Ok(UserState {
            user_id: update.user_id,
            jurisdiction: update.jurisdiction.clone(),
            age_band: update.age_band,
            linked_apps: update.linked_apps.clone(),
            ads_objection: update.ads_objection,
            erasure: current.map_or(ErasureState::None, |state| state.erasure),
            generation: current_generation + 1,
            updated_at: now,
        })
    }

    /// The tombstone an erasure leaves of `current`: "erasure pending" with the next
    /// generation, and nothing else of the user (no jurisdiction, age or links).
    pub fn tombstone(user_id: u64, current: Option<&UserState>, now: Timestamp) -> UserState {
        UserState {
            user_id,
            jurisdiction: String::new(),
            age_band: AgeBand::Unknown,
            linked_apps: Vec::new(),
            ads_objection: false,
            erasure: ErasureState::Pending,
            generation: current.map_or(0, |state| state.generation) + 1,
            updated_at: now,
        }
    }
}

impl UserWrite {
    /// Refuses a share holding rows of another user ([`StorageError::Unfenced`]).
    pub fn check_rows_are_the_users(&self) -> Result<(), StorageError> {
        match self.rows.iter().find(|row| row.key.user_id != self.user_id) {
            Some(row) => Err(StorageError::Unfenced {
                user_id: row.key.user_id,
            }),
            None => Ok(()),
        }
    }
}

/// Decides again which values of a stored row may stay, given the user's state: returns
/// the row to keep (values removed or re-stamped), or the row unchanged.
pub type Revalidate<'a> = &'a mut dyn FnMut(Option<&UserState>, RowKey, StoredRow) -> StoredRow;

/// Builds the answer to store with one user's share of a write, from the share's index in
/// the write and the outcome of each value of each of its rows.
pub type AnswerBuilder<'a> = &'a mut dyn FnMut(usize, &[Vec<ValueOutcome>]) -> Vec<u8>;

/// What every storage backend offers, in the feature store's terms. Every guarantee is
/// stated per user, so that an engine that spreads users over machines can keep it: a
/// user's share of a write, a change of the user's state and the user's erasure are each
/// one atomic step, checked against the user's state in that step; no promise spans two
/// users. An engine may give more (RocksDB applies a whole write in one batch); callers
/// rely only on what is written here, and the conformance suite checks exactly that.
pub trait Store: Send + Sync + Debug + 'static {
    /// Reads the rows of `keys`, one answer per key, in order, decoded; fails when a part
    /// of the engine holding some of them does not answer.
    fn read_rows(&self, keys: &[RowKey]) -> Result<Vec<RowRead>, StorageError> {
        decode_rows(keys.len(), |visit| self.visit_rows(keys, visit))
    }

    /// Reads the rows of `keys` in one batch and shows each to `visit` in place, with its
    /// index in `keys`: every key exactly once, in no particular order. Nothing is copied
    /// or decoded beyond the check of each row; this is the read path.
    fn visit_rows(
        &self,
        keys: &[RowKey],
        visit: &mut dyn FnMut(usize, RowFound<'_>),
    ) -> Result<(), StorageError>;

    /// Applies a write, user by user in the order of `users` (sorted by user id, each
    /// once), and answers per user. Each user's share is atomic: its rows are merged (per
    /// feature, the latest event time wins), its idempotency record and its audit entries
    /// are written, in one step that first checks the fence: if the user's state now has
    /// another generation than the share was decided with, or an erasure began, the
    /// share is not applied and [`StorageError::GenerationChanged`] is returned, so that
    /// no write decided on an outdated user state is ever applied. A share whose record
    /// for `idempotency.key` was created at or after `replay_since` is not applied again:
    /// it is answered [`Applied::Replayed`] with the answer stored then, so that a retry
    /// completes exactly the users not yet applied. A record with another fingerprint
    /// refuses the write with [`StorageError::IdempotencyKeyReused`].
    ///
    /// On an error, some shares may have been applied (RocksDB: none; a Redis Cluster:
    /// those of earlier waves); a retry with the same key completes the others and replays
    /// those. Rows of another user in a share are refused with
    /// [`StorageError::Unfenced`]. A write that cannot be audited is not applied.
    fn apply_write(
        &self,
        idempotency: &IdempotencyRecord,
        replay_since: Timestamp,
        users: &[UserWrite],
        answer: AnswerBuilder<'_>,
    ) -> Result<Vec<Applied>, StorageError>;

    /// The states of `users`, one answer per user, in order.
    fn read_user_states(&self, users: &[u64]) -> Result<Vec<Option<UserState>>, StorageError>;

    /// Creates or replaces a user's state, increasing its generation by one, serialized
    /// with writes for the same user. Refuses with [`StorageError::GenerationChanged`] when
    /// `update.expected_generation` is set and differs. The erasure state is kept. Every row
    /// of the user is passed through `revalidate` with the new state, and the state and the
    /// rows it changed are written in one batch.
    fn set_user_state(
        &self,
        update: &UserStateUpdate,
        now: Timestamp,
        revalidate: Revalidate<'_>,
        audit: &AuditEntry,
    ) -> Result<UserState, StorageError>;

    /// Appends entries to the audit log, numbered and hash-chained after the last record.
    fn append_audit(&self, entries: &[AuditEntry]) -> Result<(), StorageError>;

    /// The audit records of one user, oldest first, at most `limit`: `user` is the user's
    /// pseudonym (what the records name), `user_id` lets the engine find the user's chain.
    fn audit_trail(
        &self,
        user_id: u64,
        user: &Pseudonym,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StorageError>;

    /// Checks the whole audit chain.
    fn verify_audit(&self) -> Result<AuditReport, StorageError>;

    /// Passes every row of `user_id` through `revalidate` with the user's current state,
    /// serialized with writes for the user, and writes the changes in one batch. Returns
    /// how many values were removed.
    fn revalidate_user(
        &self,
        user_id: u64,
        revalidate: Revalidate<'_>,
    ) -> Result<usize, StorageError>;

    /// Up to `limit` distinct users that have rows, from `from_user` on, in order.
    fn users_with_rows(&self, from_user: u64, limit: usize) -> Result<Vec<u64>, StorageError>;

    /// A small value the server keeps about itself (e.g. the policy version the stored
    /// values were last validated under).
    fn read_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError>;

    fn write_meta(&self, key: &str, value: &[u8]) -> Result<(), StorageError>;

    fn delete_meta(&self, key: &str) -> Result<(), StorageError>;

    /// The secret key of a user's audit pseudonym. When missing it is created if `create`
    /// (from the system's random source) and the user is not erased or being erased, else
    /// `None` is returned: an erased user's key is gone for good, whatever races the
    /// erasure.
    fn pseudonym_key(&self, user_id: u64, create: bool) -> Result<Option<[u8; 32]>, StorageError>;

    /// Fences and deletes a user in one atomic write, serialized with the user's writes:
    /// the state becomes "erasure pending" with a new generation and nothing else (no
    /// jurisdiction, age or links), every row goes in one range delete, the pseudonym key
    /// is destroyed, and `audit` is appended.
    fn erase_user(
        &self,
        user_id: u64,
        now: Timestamp,
        audit: &AuditEntry,
    ) -> Result<UserState, StorageError>;

    /// Whether any row or pseudonym key of the user is left.
    fn user_has_data(&self, user_id: u64) -> Result<bool, StorageError>;

    /// Marks an erasure pending for `user_id` as done.
    fn finish_erasure(&self, user_id: u64) -> Result<(), StorageError>;

    /// Writes a metadata value and appends audit entries, in one atomic write.
    fn write_meta_audited(
        &self,
        key: &str,
        value: &[u8],
        audit: &[AuditEntry],
    ) -> Result<(), StorageError>;

    /// Every metadata value whose key starts with `prefix`, in key order.
    fn meta_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StorageError>;

    /// The engine's bulk ingestion of sorted files, if it has one; bulk loads need it.
    fn bulk_files(&self) -> Option<&dyn BulkFiles> {
        None
    }

    /// Blobs kept where every server sharing the engine sees them, if the engine is
    /// shared: bulk loads stage their chunks there.
    fn blobs(&self) -> Option<&dyn Blobs> {
        None
    }

    /// The engine's rewriting of the files that may keep an erased user's bytes, if its
    /// files can keep deleted bytes.
    fn user_files(&self) -> Option<&dyn UserFiles> {
        None
    }

    /// The engine's maintenance (checkpoints, flushes, compaction), if it has any.
    fn maintenance(&self) -> Option<&dyn Maintenance> {
        None
    }

    /// The engine's own figures, if it keeps any.
    fn engine_stats(&self) -> Option<&dyn EngineStats> {
        None
    }
}

/// Every change of a user's state held off, until dropped (see
/// [`BulkFiles::hold_user_states`]).
pub struct UserStatesHeld<'a> {
    _hold: Box<dyn Hold + 'a>,
}

impl<'a> UserStatesHeld<'a> {
    /// Wraps what keeps the engine's user states from changing (a lock guard).
    pub fn new(hold: impl Sized + 'a) -> UserStatesHeld<'a> {
        UserStatesHeld {
            _hold: Box::new(hold),
        }
    }
}

impl Debug for UserStatesHeld<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserStatesHeld")
    }
}

/// Anything kept alive for its `Drop`.
trait Hold {}
impl<T> Hold for T {}

/// Bulk ingestion: rows written into sorted files outside the engine, then added to it
/// all at once. An engine offers it through [`Store::bulk_files`].
pub trait BulkFiles {
    /// Writes `rows` (encoded rows, sorted by key, each key once) as merge operands into
    /// table files in `directory`, starting a new file past `file_bytes_max`, and returns
    /// their paths. Nothing is visible until [`BulkFiles::ingest_table_files`].
    fn write_table_files(
        &self,
        rows: &mut dyn Iterator<Item = (RowKey, Vec<u8>)>,
        directory: &std::path::Path,
        file_bytes_max: u64,
    ) -> Result<Vec<std::path::PathBuf>, StorageError>;

    /// Adds table files written by [`Store::write_table_files`] to the features, all at
    /// once. Their rows are merge operands: per feature the latest event time wins against
    /// what is stored, whichever was written first.
    fn ingest_table_files(
        &self,
        files: &[std::path::PathBuf],
        held: &UserStatesHeld<'_>,
    ) -> Result<(), StorageError>;

    /// Merges `rows` (encoded rows) into the features as merge operands, in one atomic
    /// write together with a metadata value and audit entries.
    fn merge_rows(
        &self,
        rows: &[(RowKey, Vec<u8>)],
        meta: (&str, &[u8]),
        audit: &[AuditEntry],
        held: &UserStatesHeld<'_>,
    ) -> Result<(), StorageError>;

    /// A count that moves whenever a user's state changes (set, erased, its erasure
    /// finished), so that a commit can tell whether any changed while it prepared.
    fn user_state_changes(&self) -> u64;

    /// Holds every change of a user's state off until the hold is dropped. A bulk-load
    /// commit holds it from its last look at the states its rows were decided with until
    /// they are applied, so that no change comes between: the engine applies files and
    /// merge operands only under a hold.
    fn hold_user_states(&self) -> UserStatesHeld<'_>;
}

/// Named blobs of bytes in an engine that several servers share, so that what one server
/// stages another can read (a bulk load's chunks). Through [`Store::blobs`].
pub trait Blobs {
    /// Stores `bytes` under `name`, replacing what was there, durably (as a write is).
    fn put_blob(&self, name: &str, bytes: &[u8]) -> Result<(), StorageError>;

    /// The bytes under `name`, if any.
    fn blob(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError>;

    /// Replaces the bytes under `name` only if they are still `expected`; `false`, and
    /// nothing changed, when another server replaced them first.
    fn replace_blob(&self, name: &str, expected: &[u8], bytes: &[u8])
    -> Result<bool, StorageError>;

    fn delete_blob(&self, name: &str) -> Result<(), StorageError>;
}

/// What an engine whose files may keep deleted bytes offers an erasure. Through
/// [`Store::user_files`].
pub trait UserFiles {
    /// Rewrites every file of the engine that may still hold bytes of `user_id` deleted
    /// before the call (RocksDB: flushes, then compacts the user's ranges; a Redis Cluster:
    /// rewrites the persistence files of the nodes serving the user's slot), and says
    /// what was rewritten.
    fn rewrite_user_files(&self, user_id: u64) -> Result<String, StorageError>;
}

/// What an engine with files on one machine offers to keep them: consistent copies,
/// flushes and compaction (so that deleted bytes leave the files). Through
/// [`Store::maintenance`].
pub trait Maintenance {
    /// Writes a consistent copy of the database to `directory`, which must not exist.
    fn checkpoint(&self, directory: &std::path::Path) -> Result<(), StorageError>;

    /// Flushes the features to disk and compacts them fully, so that bytes of deleted or
    /// rewritten rows leave the engine's files.
    fn compact_features(&self) -> Result<(), StorageError>;

    /// Makes everything written so far durable in the engine's files.
    fn flush(&self) -> Result<(), StorageError>;
}

/// The engine's own figures, read at every metrics scrape and by `GetStorageStats`.
/// Through [`Store::engine_stats`].
pub trait EngineStats {
    /// The engine's own figures (properties and statistics): cheap, read at every metrics
    /// scrape.
    fn engine_figures(&self) -> Result<EngineFigures, StorageError>;

    /// Counts rows and their bytes per surface: every row when there are at most
    /// `rows_max`, otherwise about `rows_max` of them read at points spread over the user
    /// ids, scaled to the engine's estimate of the total.
    fn census(&self, rows_max: usize) -> Result<Census, StorageError>;
}

/// Figures the engine keeps about itself. Estimates are RocksDB's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineFigures {
    /// Estimated rows (keys) of the features column family.
    pub rows_estimate: u64,
    /// Estimated users with a stored privacy state.
    pub user_states_estimate: u64,
    /// Bytes of table files on disk, over every column family.
    pub table_file_bytes: u64,
    /// Bytes in memtables (active and immutable), over every column family.
    pub memtable_bytes: u64,
    /// Bytes compaction would have to rewrite to bring the levels to their targets.
    pub pending_compaction_bytes: u64,
    pub running_compactions: u64,
    /// Bytes held in the shared block cache, and its capacity.
    pub block_cache_usage_bytes: u64,
    pub block_cache_capacity_bytes: u64,
    /// Lookups of the block cache that found their block, and that did not, since the
    /// database opened (zero when statistics are off).
    pub block_cache_hits: u64,
    pub block_cache_misses: u64,
    /// Bytes held in the row cache in front of the engine, and its capacity (zero when
    /// there is none).
    pub row_cache_usage_bytes: u64,
    pub row_cache_capacity_bytes: u64,
    /// Rows read that the row cache held, and that it did not, since the store opened.
    pub row_cache_hits: u64,
    pub row_cache_misses: u64,
    /// Time writes were stalled or slowed by RocksDB to let compaction catch up, since the
    /// database opened (zero when statistics are off).
    pub write_stall_micros: u64,
    /// Whether writes are stopped right now.
    pub writes_stopped: bool,
}

/// Rows and bytes per surface, counted or estimated by [`EngineStats::census`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Whether every row was counted; otherwise the figures are scaled from a sample.
    pub exact: bool,
    /// Rows read to make the figures.
    pub rows_read: u64,
    /// Users with at least one row (distinct users among the rows read, scaled).
    pub users: u64,
    /// Per surface with at least one row, by surface id.
    pub surfaces: Vec<SurfaceCensus>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SurfaceCensus {
    pub surface: SurfaceId,
    pub rows: u64,
    /// Bytes of the stored rows (keys and encoded values, before compression).
    pub bytes: u64,
}
