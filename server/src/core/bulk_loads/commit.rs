//! The commit of a bulk load: the staged rows of users whose state still has the
//! generation their rows were decided with are merged in key order and applied at once
//! (ingested as table files, or merged in one write when few), with the job's record.

use super::*;

impl Core {
    /// Commits a job: every durable chunk is applied at once. Committing a committed job
    /// returns its record; the commit of a job left COMMITTING by a crash is finished.
    pub fn load_commit(&self, attachment: &LoadAttachment) -> Result<JobRecord, Error> {
        let job_id = attachment.job_id();
        let mut job = self.load_job(job_id)?;
        match job.state {
            JobState::Committed => return Ok(job),
            JobState::Aborted => return Err(conflict(job_id, "was aborted")),
            JobState::Committing => {}
            JobState::Open => {
                job.state = JobState::Committing;
                self.save_job(&mut job, &[])?;
            }
        }
        self.finish_commit(job)
    }

    /// Applies a job marked committing. When it fails before anything was applied, the
    /// job is open again (its chunks intact), so the commit can be retried or the job
    /// aborted; once applied, a failure leaves it committing, and the next start finishes
    /// it (applying merge operands again changes nothing).
    pub(super) fn finish_commit(&self, job: JobRecord) -> Result<JobRecord, Error> {
        let mut committed = job.clone();
        let mut applied = false;
        match self.apply_commit(&mut committed, &mut applied) {
            Ok(()) => Ok(committed),
            Err(error) if !applied => {
                let mut reopened = job;
                reopened.state = JobState::Open;
                if let Err(save_error) = self.save_job(&mut reopened, &[]) {
                    tracing::error!(job = %reopened.job_id, %save_error, "cannot reopen a job whose commit failed");
                }
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    fn apply_commit(&self, job: &mut JobRecord, applied: &mut bool) -> Result<(), Error> {
        let job_id = job.job_id.clone();
        let chunks: Vec<PathBuf> = (1..=job.last_durable_chunk)
            .map(|sequence| self.chunk_file(&job_id, sequence))
            .collect::<std::io::Result<_>>()
            .map_err(|error| staging(&job_id, error))?;
        let mut chunk_users = Vec::with_capacity(chunks.len());
        let mut staged_rows = 0u64;
        for path in &chunks {
            let (users, rows) = read_users(path).map_err(|error| staging(&job_id, error))?;
            chunk_users.push(users);
            staged_rows += rows;
        }
        let ingest = staged_rows >= self.loads.settings.ingest_rows_min;
        if self.store.blobs().is_some() {
            // A shared engine: applied user by user.
            self.apply_commit_by_user(job, &chunks, &chunk_users, applied)?;
            return self.finish_applied(job, &chunk_users);
        }
        let bulk_files = self.bulk_files()?;
        let mut exclusive = false;
        loop {
            // A first attempt prepares without holding user-state changes off, then checks
            // that none happened meanwhile; if some did, the second attempt holds them off
            // from the start. The engine keeps the hold and the count of changes.
            let early_hold = exclusive.then(|| bulk_files.hold_user_states());
            let changes_seen = bulk_files.user_state_changes();
            let refused = self.refused_at_commit(&chunk_users)?;
            let prepared = self.prepare_commit(&job_id, &chunks, &refused, ingest)?;
            if !exclusive {
                // Decided and written into table files, not yet applied: a change of a
                // staged user's state here must be seen below.
                fail::fail_point!("load-commit-prepared");
            }
            let held = match early_hold {
                Some(held) => held,
                None => bulk_files.hold_user_states(),
            };
            if !exclusive && bulk_files.user_state_changes() != changes_seen {
                exclusive = true;
                continue;
            }
            for (users, refused) in chunk_users.iter().zip(&refused) {
                for user in users {
                    if let Some(reason) = refused.get(&user.user_id) {
                        job.summary.refuse_at_commit(user, *reason);
                    }
                }
            }
            job.state = JobState::Committed;
            job.committed_at = self.clock.now().unix_micros();
            job.files_ingested = u32::try_from(prepared.files.len()).unwrap_or(u32::MAX);
            let mut entry = self.audit_entry(AuditAction::LoadCommitted, "backfill", None)?;
            entry.subject = format!(
                "job {job_id}: {} rows admitted, {} table files",
                job.summary.rows_accepted + job.summary.rows_transformed,
                prepared.files.len()
            );
            if ingest {
                bulk_files.ingest_table_files(&prepared.files, &held)?;
                *applied = true;
                self.save_job(job, &[entry])?;
            } else {
                job.updated_at = self.clock.now().unix_micros();
                let bytes = serde_json::to_vec(&job).expect("a job record serializes");
                let meta = (job_key(&job_id), bytes);
                bulk_files.merge_rows(&prepared.small, (&meta.0, &meta.1), &[entry], &held)?;
                *applied = true;
            }
            break;
        }
        self.finish_applied(job, &chunk_users)
    }

    /// After a job's rows are applied: re-validates them when they were decided under
    /// another bundle, and deletes the job's staging.
    fn finish_applied(
        &self,
        job: &JobRecord,
        chunk_users: &[Vec<StagedUser>],
    ) -> Result<(), Error> {
        self.revalidate_if_decided_under_other_bundles(job, chunk_users)?;
        self.remove_job_staging(job);
        tracing::info!(
            job = %job.job_id,
            rows = job.summary.rows_received,
            files = job.files_ingested,
            "bulk load committed"
        );
        Ok(())
    }

    /// Merges a job's chunks in key order, leaving out the `refused` users of each chunk:
    /// into table files under the job's staging directory when `ingest`, else into memory
    /// (a small job is applied as one write).
    fn prepare_commit(
        &self,
        job_id: &str,
        chunks: &[PathBuf],
        refused: &[HashMap<u64, ReasonCode>],
        ingest: bool,
    ) -> Result<PreparedCommit, Error> {
        let merged = MergedRows::open(
            chunks,
            refused
                .iter()
                .map(|users| users.keys().copied().collect())
                .collect(),
        )
        .map_err(|error| staging(job_id, error))?;
        let mut rows = StagedRows {
            merged,
            error: None,
        };
        let prepared = if ingest {
            let tables = self.staging_directory(job_id).join("tables");
            if tables.exists() {
                std::fs::remove_dir_all(&tables).map_err(|error| staging(job_id, error))?;
            }
            std::fs::create_dir_all(&tables).map_err(|error| staging(job_id, error))?;
            PreparedCommit {
                files: self.bulk_files()?.write_table_files(
                    &mut rows,
                    &tables,
                    self.loads.settings.table_file_bytes_max,
                )?,
                small: Vec::new(),
            }
        } else {
            PreparedCommit {
                files: Vec::new(),
                small: rows.by_ref().collect(),
            }
        };
        match rows.error {
            Some(error) => Err(staging(job_id, error)),
            None => Ok(prepared),
        }
    }

    /// Per chunk, the users whose rows a commit must leave out: erased since, or whose
    /// state generation is no longer the one their rows were decided with.
    pub(super) fn refused_at_commit(
        &self,
        chunk_users: &[Vec<StagedUser>],
    ) -> Result<Vec<HashMap<u64, ReasonCode>>, Error> {
        let mut users: Vec<u64> = chunk_users
            .iter()
            .flatten()
            .map(|user| user.user_id)
            .collect();
        users.sort_unstable();
        users.dedup();
        let states: HashMap<u64, (ErasureState, u64)> = users
            .iter()
            .zip(self.store.read_user_states(&users)?)
            .filter_map(|(user, state)| {
                state.map(|state| (*user, (state.erasure, state.generation)))
            })
            .collect();
        Ok(chunk_users
            .iter()
            .map(|users| {
                users
                    .iter()
                    .filter_map(|user| {
                        let (erasure, generation) = states
                            .get(&user.user_id)
                            .copied()
                            .unwrap_or((ErasureState::None, 0));
                        if erasure != ErasureState::None {
                            Some((user.user_id, ReasonCode::UserErased))
                        } else if generation != user.generation {
                            Some((user.user_id, ReasonCode::StaleGeneration))
                        } else {
                            None
                        }
                    })
                    .collect()
            })
            .collect())
    }

    /// Chunks decided under a bundle other than the one in force have their users'
    /// values re-validated under it, as a purge would.
    fn revalidate_if_decided_under_other_bundles(
        &self,
        job: &JobRecord,
        chunk_users: &[Vec<StagedUser>],
    ) -> Result<(), Error> {
        let policy = self.policy();
        if job
            .policy_versions
            .iter()
            .all(|version| *version == policy.hash_prefix)
        {
            return Ok(());
        }
        let users: HashSet<u64> = chunk_users
            .iter()
            .flatten()
            .map(|user| user.user_id)
            .collect();
        for user_id in users {
            self.revalidate_user(user_id, &policy, "policy-purge")?;
        }
        Ok(())
    }
}

/// The merged rows of a commit as an iterator; the first staging error ends it and is
/// kept for the caller.
struct StagedRows {
    merged: MergedRows,
    error: Option<std::io::Error>,
}

impl Iterator for StagedRows {
    type Item = (RowKey, Vec<u8>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.error.is_some() {
            return None;
        }
        match self.merged.next_row() {
            Ok(row) => row.map(|row| (row.key, row.operand)),
            Err(error) => {
                self.error = Some(error);
                None
            }
        }
    }
}

/// A commit's rows, merged and ready to apply: table files, or the rows of a small job.
struct PreparedCommit {
    files: Vec<PathBuf>,
    small: Vec<(RowKey, Vec<u8>)>,
}
