//! What RocksDB offers beyond the core of a store: bulk ingestion of table files,
//! checkpoints, flushes and compaction, and its own figures.

use std::path::Path;

use rocksdb::{IngestExternalFileOptions, SstFileWriter, WriteBatch};

use super::*;
use crate::storage::{
    BulkFiles, Census, EngineFigures, EngineStats, Maintenance, SurfaceCensus, UserFiles,
    UserStatesHeld,
};

impl BulkFiles for RocksStore {
    fn write_table_files(
        &self,
        rows: &mut dyn Iterator<Item = (RowKey, Vec<u8>)>,
        directory: &Path,
        file_bytes_max: u64,
    ) -> Result<Vec<std::path::PathBuf>, StorageError> {
        let mut files = Vec::new();
        let mut writer: Option<SstFileWriter<'_>> = None;
        for (key, operand) in rows {
            if writer
                .as_ref()
                .is_none_or(|current| current.file_size() >= file_bytes_max)
            {
                if let Some(mut full) = writer.take() {
                    full.finish().map_err(engine)?;
                }
                let path = directory.join(format!("table-{:06}.sst", files.len() + 1));
                let next = SstFileWriter::create(&self.table_file_options);
                next.open(&path).map_err(engine)?;
                files.push(path);
                writer = Some(next);
            }
            if let Some(current) = &mut writer {
                current
                    .merge(encode_row_key(key), operand)
                    .map_err(engine)?;
            }
        }
        if let Some(mut last) = writer {
            last.finish().map_err(engine)?;
        }
        Ok(files)
    }

    fn ingest_table_files(
        &self,
        files: &[std::path::PathBuf],
        _held: &UserStatesHeld<'_>,
    ) -> Result<(), StorageError> {
        if files.is_empty() {
            return Ok(());
        }
        let mut options = IngestExternalFileOptions::default();
        // Hard links when the staging directory is on the same file system: no copy.
        options.set_move_files(true);
        let ingested =
            self.db
                .ingest_external_file_cf_opts(self.cf(FEATURES_CF), &options, files.to_vec());
        self.all_rows_changed();
        ingested.map_err(engine)
    }

    fn merge_rows(
        &self,
        rows: &[(RowKey, Vec<u8>)],
        meta: (&str, &[u8]),
        audit: &[AuditEntry],
        _held: &UserStatesHeld<'_>,
    ) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        let features = self.cf(FEATURES_CF);
        for (key, operand) in rows {
            batch.merge_cf(features, encode_row_key(*key), operand);
        }
        batch.put_cf(self.cf(META_CF), meta.0.as_bytes(), meta.1);
        let written = self.write_with_audit(batch, &chain_zero(audit));
        self.rows_changed(rows.iter().map(|(key, _)| key.user_id));
        written
    }

    fn user_state_changes(&self) -> u64 {
        self.state_changes.load(Ordering::SeqCst)
    }

    fn hold_user_states(&self) -> UserStatesHeld<'_> {
        UserStatesHeld::new(self.state_gate.write())
    }
}

impl UserFiles for RocksStore {
    fn rewrite_user_files(&self, user_id: u64) -> Result<String, StorageError> {
        // Every column family is flushed, so that no write-ahead log file still holds the
        // user's bytes, then each of the user's ranges is compacted to the bottom.
        self.flush()?;
        let mut options = rocksdb::CompactOptions::default();
        options.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        let (start, end) = user_range(user_id);
        self.db
            .compact_range_cf_opt(self.cf(FEATURES_CF), Some(&start), Some(&end), &options);
        let key = user_id.to_be_bytes();
        let next = user_id.checked_add(1).map(u64::to_be_bytes);
        for family in [USER_STATE_CF, PSEUDONYM_KEYS_CF] {
            self.db.compact_range_cf_opt(
                self.cf(family),
                Some(&key[..]),
                next.as_ref().map(|next| &next[..]),
                &options,
            );
        }
        Ok("the write-ahead log flushed, the user's ranges compacted".to_string())
    }
}

impl Maintenance for RocksStore {
    fn checkpoint(&self, directory: &Path) -> Result<(), StorageError> {
        self.flush()?;
        rocksdb::checkpoint::Checkpoint::new(&self.db)
            .and_then(|checkpoint| checkpoint.create_checkpoint(directory))
            .map_err(engine)
    }

    fn compact_features(&self) -> Result<(), StorageError> {
        let features = self.cf(FEATURES_CF);
        self.db.flush_cf(features).map_err(engine)?;
        let mut options = rocksdb::CompactOptions::default();
        options.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        self.db
            .compact_range_cf_opt(features, None::<&[u8]>, None::<&[u8]>, &options);
        // Rows whose every value expired are gone from the engine: from the cache too, so
        // that they read as not found rather than expired, as the engine answers.
        self.all_rows_changed();
        Ok(())
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.db.flush_wal(true).map_err(engine)?;
        self.db
            .flush_cfs_opt(
                &[
                    self.cf(FEATURES_CF),
                    self.cf(IDEMPOTENCY_CF),
                    self.cf(USER_STATE_CF),
                    self.cf(META_CF),
                    self.cf(AUDIT_CF),
                    self.cf(AUDIT_BY_USER_CF),
                    self.cf(PSEUDONYM_KEYS_CF),
                ],
                &rocksdb::FlushOptions::default(),
            )
            .map_err(engine)
    }
}

impl EngineStats for RocksStore {
    fn engine_figures(&self) -> Result<EngineFigures, StorageError> {
        let property = |cf: &str, name: &rocksdb::properties::PropName| {
            self.db
                .property_int_value_cf(self.cf(cf), name)
                .map(Option::unwrap_or_default)
                .map_err(engine)
        };
        let over_every_cf = |name: &rocksdb::properties::PropName| {
            COLUMN_FAMILIES
                .iter()
                .try_fold(0u64, |sum, cf| Ok(sum + property(cf, name)?))
        };
        use rocksdb::properties;
        let ticker = |ticker| {
            self.statistics
                .as_ref()
                .map_or(0, |options| options.get_ticker_count(ticker))
        };
        use rocksdb::statistics::Ticker;
        Ok(EngineFigures {
            rows_estimate: property(FEATURES_CF, properties::ESTIMATE_NUM_KEYS)?,
            user_states_estimate: property(USER_STATE_CF, properties::ESTIMATE_NUM_KEYS)?,
            table_file_bytes: over_every_cf(properties::TOTAL_SST_FILES_SIZE)?,
            memtable_bytes: over_every_cf(properties::CUR_SIZE_ALL_MEM_TABLES)?,
            pending_compaction_bytes: over_every_cf(properties::ESTIMATE_PENDING_COMPACTION_BYTES)?,
            running_compactions: self
                .db
                .property_int_value(properties::NUM_RUNNING_COMPACTIONS)
                .map_err(engine)?
                .unwrap_or_default(),
            // Every column family holding data shares one cache.
            block_cache_usage_bytes: property(FEATURES_CF, properties::BLOCK_CACHE_USAGE)?,
            block_cache_capacity_bytes: property(FEATURES_CF, properties::BLOCK_CACHE_CAPACITY)?,
            block_cache_hits: ticker(Ticker::BlockCacheHit),
            block_cache_misses: ticker(Ticker::BlockCacheMiss),
            row_cache_usage_bytes: self.rows.as_ref().map_or(0, |rows| rows.usage_bytes()),
            row_cache_capacity_bytes: self.rows.as_ref().map_or(0, |rows| rows.capacity_bytes()),
            row_cache_hits: self.rows.as_ref().map_or(0, |rows| rows.hits()),
            row_cache_misses: self.rows.as_ref().map_or(0, |rows| rows.misses()),
            write_stall_micros: ticker(Ticker::StallMicros),
            writes_stopped: COLUMN_FAMILIES
                .iter()
                .map(|cf| property(cf, properties::IS_WRITE_STOPPED))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .any(|stopped| stopped != 0),
        })
    }

    fn census(&self, rows_max: usize) -> Result<Census, StorageError> {
        /// Points of the user-id range a sample reads from.
        const SAMPLE_POINTS: u64 = 64;
        let rows_max = rows_max.max(SAMPLE_POINTS as usize);
        let mut iterator = self.db.raw_iterator_cf(self.cf(FEATURES_CF));
        iterator.seek_to_first();
        let mut tally = CensusTally::default();
        tally.read(&mut iterator, rows_max, None)?;
        if !iterator.valid() {
            iterator.status().map_err(engine)?;
            return Ok(tally.finish(true, 1.0));
        }
        // Too many rows to count them all: read from points spread evenly between the
        // first and the last user, each up to the next point.
        let first = tally.first_user.expect("rows were read");
        iterator.seek_to_last();
        let last = match iterator.key().and_then(decode_row_key) {
            Some(key) => key.user_id,
            None => {
                return Err(StorageError::Corrupt(
                    "a key of the features column family is not a row key".to_string(),
                ));
            }
        };
        let step = ((last - first) / SAMPLE_POINTS).max(1);
        let mut tally = CensusTally::default();
        let rows_per_point = rows_max / SAMPLE_POINTS as usize;
        for point in 0..SAMPLE_POINTS {
            let Some(start) = first
                .checked_add(point * step)
                .filter(|&start| start <= last)
            else {
                break;
            };
            iterator.seek(start.to_be_bytes());
            tally.read(&mut iterator, rows_per_point, start.checked_add(step))?;
        }
        iterator.status().map_err(engine)?;
        let total = self
            .db
            .property_int_value_cf(self.cf(FEATURES_CF), rocksdb::properties::ESTIMATE_NUM_KEYS)
            .map_err(engine)?
            .unwrap_or_default();
        let scale = total as f64 / tally.rows_read.max(1) as f64;
        Ok(tally.finish(false, scale.max(1.0)))
    }
}

/// Rows, bytes and users counted by [`Store::census`].
#[derive(Default)]
struct CensusTally {
    rows_read: u64,
    users: u64,
    first_user: Option<u64>,
    last_user: Option<u64>,
    surfaces: std::collections::BTreeMap<SurfaceId, (u64, u64)>,
}

impl CensusTally {
    /// Counts up to `rows_max` rows from where `iterator` stands, stopping before user
    /// `until`.
    fn read(
        &mut self,
        iterator: &mut rocksdb::DBRawIterator<'_>,
        rows_max: usize,
        until: Option<u64>,
    ) -> Result<(), StorageError> {
        let mut read = 0;
        while read < rows_max {
            let (Some(key), Some(value)) = (iterator.key(), iterator.value()) else {
                break;
            };
            let Some(row) = decode_row_key(key) else {
                return Err(StorageError::Corrupt(
                    "a key of the features column family is not a row key".to_string(),
                ));
            };
            if until.is_some_and(|until| row.user_id >= until) {
                break;
            }
            self.first_user.get_or_insert(row.user_id);
            if self.last_user != Some(row.user_id) {
                self.users += 1;
                self.last_user = Some(row.user_id);
            }
            let (rows, bytes) = self.surfaces.entry(row.surface).or_default();
            *rows += 1;
            *bytes += (key.len() + value.len()) as u64;
            self.rows_read += 1;
            read += 1;
            iterator.next();
        }
        Ok(())
    }

    fn finish(self, exact: bool, scale: f64) -> Census {
        let scaled = |count: u64| (count as f64 * scale).round() as u64;
        Census {
            exact,
            rows_read: self.rows_read,
            users: scaled(self.users),
            surfaces: self
                .surfaces
                .into_iter()
                .map(|(surface, (rows, bytes))| SurfaceCensus {
                    surface,
                    rows: scaled(rows),
                    bytes: scaled(bytes),
                })
                .collect(),
        }
    }
}
