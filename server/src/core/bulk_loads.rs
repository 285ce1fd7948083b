//! Bulk loads: a job stages chunks of rows decided by the write path's own code (the same
//! fences, registry checks and policy as `write`), and its commit merges the staged
//! chunks in key order into table files that the store ingests at once.
//!
//! Event-time order against online writes holds because staged rows are merge operands:
//! per feature the latest event time wins, whichever reaches the store first. The
//! erasure fence holds because a commit checks, with user-state changes held off, that
//! every staged user still has the generation its rows were decided with; rows of a user
//! erased or changed since are left out and counted as refused.

mod commit;
mod shared;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use featurestore::InvalidRequest;
use featurestore::domain::{WriteRequest, WriteRow};
use featurestore::proto::ReasonCode;

use super::Core;
use super::write::{Decision, fence_refusal};
use crate::audit::AuditAction;
use crate::config::BulkLoadConfig;
use crate::error::Error;
use crate::staging::{
    JOB_KEY_PREFIX, JobRecord, JobState, MergedRows, StagedRow, StagedUser, Summary, chunk_path,
    job_id_problem, job_key, read_users, sync_directory, write_chunk,
};
use crate::storage::codec::encode_row;
use crate::storage::{ErasureState, RowKey, StoredRow, codec};
use parking_lot::Mutex;

/// The bulk-load part of the core.
#[derive(Debug)]
pub(super) struct LoadState {
    /// Bulk-load settings.
    pub(super) settings: BulkLoadConfig,
    /// Bulk-load jobs attached to a stream right now.
    pub(super) attached_jobs: Mutex<HashSet<String>>,
    /// Held while a staging file is written, so that an erasure's purge of staged rows
    /// never misses a chunk being made durable.
    pub(super) staging_lock: Mutex<()>,
}

impl LoadState {
    pub(super) fn new(settings: BulkLoadConfig) -> LoadState {
        LoadState {
            settings,
            attached_jobs: Mutex::new(HashSet::new()),
            staging_lock: Mutex::new(()),
        }
    }
}

/// What became of one chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkOutcome {
    pub sequence: u64,
    /// The chunk was already durable; nothing changed.
    pub duplicate: bool,
    pub summary: Summary,
    /// Malformed rows, by index in the chunk.
    pub invalid: Vec<(usize, InvalidRequest)>,
}

/// A chunk decided and encoded, ready to be made durable.
#[derive(Debug)]
pub struct PreparedChunk {
    sequence: u64,
    summary: Summary,
    users: Vec<StagedUser>,
    staged: Vec<StagedRow>,
    audit: Vec<crate::audit::AuditEntry>,
    invalid: Vec<(usize, InvalidRequest)>,
    /// Hash prefix of the bundle that decided it.
    policy_version: u64,
}

/// A job attached to one stream; detached when dropped. Only the attached stream sends
/// chunks or commits, and an attached job cannot be aborted.
#[derive(Debug)]
pub struct LoadAttachment {
    core: Arc<Core>,
    job_id: String,
}

impl LoadAttachment {
    pub fn job_id(&self) -> &str {
        &self.job_id
    }
}

impl Drop for LoadAttachment {
    fn drop(&mut self) {
        self.core.loads.attached_jobs.lock().remove(&self.job_id);
    }
}

fn conflict(job_id: &str, problem: impl Into<String>) -> Error {
    Error::LoadJobConflict {
        job_id: job_id.to_string(),
        problem: problem.into(),
    }
}

fn staging(job_id: &str, error: impl std::fmt::Display) -> Error {
    Error::Staging {
        job_id: job_id.to_string(),
        problem: error.to_string(),
    }
}

impl Core {
    fn staging_directory(&self, job_id: &str) -> PathBuf {
        self.loads.settings.staging_dir.join(job_id)
    }

    /// A job's record; `NoLoadJob` when there is none.
    pub fn load_job(&self, job_id: &str) -> Result<JobRecord, Error> {
        let bytes = self
            .store
            .read_meta(&job_key(job_id))?
            .ok_or_else(|| Error::NoLoadJob {
                job_id: job_id.to_string(),
            })?;
        serde_json::from_slice(&bytes).map_err(|error| {
            Error::Storage(crate::storage::StorageError::Corrupt(format!(
                "record of bulk-load job {job_id:?}: {error}"
            )))
        })
    }

    /// Recent jobs, newest first.
    pub fn load_jobs(&self, limit: usize) -> Result<Vec<JobRecord>, Error> {
        let mut jobs = Vec::new();
        for (key, bytes) in self.store.meta_with_prefix(JOB_KEY_PREFIX)? {
            match serde_json::from_slice::<JobRecord>(&bytes) {
                Ok(job) => jobs.push(job),
                Err(error) => tracing::error!(%key, %error, "unreadable bulk-load job record"),
            }
        }
        jobs.sort_by_key(|job| std::cmp::Reverse(job.created_at));
        jobs.truncate(limit);
        Ok(jobs)
    }

    fn save_job(
        &self,
        job: &mut JobRecord,
        audit: &[crate::audit::AuditEntry],
    ) -> Result<(), Error> {
        job.updated_at = self.clock.now().unix_micros();
        let bytes = serde_json::to_vec(job).expect("a job record serializes");
        self.store
            .write_meta_audited(&job_key(&job.job_id), &bytes, audit)?;
        Ok(())
    }

    /// Attaches a stream to a job, creating the job when it does not exist. Refused when
    /// another stream is attached, or when the job was started from another input.
    pub fn load_attach(
        self: &Arc<Self>,
        job_id: &str,
        source_fingerprint: &str,
    ) -> Result<(LoadAttachment, JobRecord), Error> {
        if let Some(problem) = job_id_problem(job_id) {
            return Err(InvalidRequest::new("start.job_id", problem).into());
        }
        // Refused before anything is staged when the engine cannot apply a commit: it
        // ingests table files, or it is shared and applies the rows user by user.
        if self.store.blobs().is_none() {
            self.bulk_files()?;
        }
        if source_fingerprint.len() > crate::staging::FINGERPRINT_BYTES_MAX {
            return Err(InvalidRequest::new(
                "start.source_fingerprint",
                format!(
                    "is {} bytes; at most {} are allowed",
                    source_fingerprint.len(),
                    crate::staging::FINGERPRINT_BYTES_MAX
                ),
            )
            .into());
        }
        if !self.loads.attached_jobs.lock().insert(job_id.to_string()) {
            return Err(Error::LoadJobBusy {
                job_id: job_id.to_string(),
            });
        }
        let attachment = LoadAttachment {
            core: Arc::clone(self),
            job_id: job_id.to_string(),
        };
        let job = match self.load_job(job_id) {
            Ok(job) => {
                if job.state == JobState::Open && job.last_durable_chunk == 0 {
                    // Made again in case it went (the directory of a new job is the only
                    // one a job can lose harmlessly).
                    std::fs::create_dir_all(self.staging_directory(job_id))
                        .map_err(|error| staging(job_id, error))?;
                }
                if job.source_fingerprint != source_fingerprint {
                    return Err(conflict(
                        job_id,
                        format!(
                            "was started from another input ({:?}, not {source_fingerprint:?}); \
                             use another job id",
                            job.source_fingerprint
                        ),
                    ));
                }
                job
            }
            Err(Error::NoLoadJob { .. }) => {
                let now = self.clock.now().unix_micros();
                let mut job = JobRecord {
                    job_id: job_id.to_string(),
                    state: JobState::Open,
                    source_fingerprint: source_fingerprint.to_string(),
                    last_durable_chunk: 0,
                    summary: Summary::default(),
                    created_at: now,
                    updated_at: now,
                    committed_at: 0,
                    files_ingested: 0,
                    policy_versions: Vec::new(),
                };
                let directory = self.staging_directory(job_id);
                std::fs::create_dir_all(&directory).map_err(|error| staging(job_id, error))?;
                self.save_job(&mut job, &[])?;
                job
            }
            Err(error) => return Err(error),
        };
        Ok((attachment, job))
    }

    /// Decides a chunk's rows (the fences, the registry and the policy, as `write` does)
    /// and encodes what is admitted, without touching the job: chunks of one stream are
    /// prepared in parallel and persisted in order by [`Core::load_persist`].
    pub fn load_prepare(
        &self,
        job_id: &str,
        sequence: u64,
        rows: Vec<(usize, WriteRow)>,
        invalid: Vec<(usize, InvalidRequest)>,
    ) -> Result<PreparedChunk, Error> {
        let policy = self.policy();
        let now = self.clock.now();
        let rows: Vec<WriteRow> = rows.into_iter().map(|(_, row)| row).collect();
        let states = self.user_states(&rows)?;

        let mut summary = Summary {
            rows_received: (rows.len() + invalid.len()) as u64,
            rows_invalid: invalid.len() as u64,
            ..Summary::default()
        };
        // Rows whose user's state refuses every write are counted, not decided.
        let mut decided = Vec::with_capacity(rows.len());
        for row in rows {
            let pairs = (row.features.len() * row.target_surfaces.len()) as u64;
            match fence_refusal(&row, states.get(&row.user_id)) {
                Some(reason) => {
                    summary.rows_denied += 1;
                    summary.values_refused += pairs;
                    summary.count_reason(reason, pairs);
                }
                None => decided.push(row),
            }
        }
        let (writes, decisions) = self.decide_rows(&decided, &states, &policy, now);

        let users = count_decided(&decided, &decisions, &states, &mut summary);
        let staged = staged_rows(writes);

        let request = WriteRequest {
            idempotency_key: format!("{job_id}#{sequence}"),
            rows: decided,
        };
        // The audit entries come from the decisions; the values are staged already.
        let (mut call, refusals) = self.audit_entries(&request, &decisions, &policy)?;
        call.action = AuditAction::LoadChunk;
        call.subject = format!(
            "job {job_id} chunk {sequence}: {} rows",
            summary.rows_received
        );
        let audit = std::iter::once(call)
            .chain(refusals.into_iter().map(|(_, entry)| entry))
            .collect();
        Ok(PreparedChunk {
            sequence,
            summary,
            users,
            staged,
            audit,
            invalid,
            policy_version: policy.hash_prefix,
        })
    }

    /// Makes a prepared chunk durable in the job's staging area: the chunk file is synced,
    /// then the job record and the chunk's audit entries are written together. Chunks must
    /// come in sequence; one already durable is a no-op.
    pub fn load_persist(
        &self,
        attachment: &LoadAttachment,
        chunk: PreparedChunk,
    ) -> Result<ChunkOutcome, Error> {
        let job_id = attachment.job_id();
        let sequence = chunk.sequence;
        let mut job = self.load_job(job_id)?;
        if job.state != JobState::Open {
            return Err(conflict(
                job_id,
                format!("is {:?}; it takes no more chunks", job.state),
            ));
        }
        if sequence <= job.last_durable_chunk {
            return Ok(ChunkOutcome {
                sequence,
                duplicate: true,
                summary: Summary::default(),
                invalid: Vec::new(),
            });
        }
        if sequence != job.last_durable_chunk + 1 {
            return Err(conflict(
                job_id,
                format!(
                    "chunk {sequence} arrived but the next is {}",
                    job.last_durable_chunk + 1
                ),
            ));
        }
        // Decided, not yet durable: an erasure of one of its users may come here.
        fail::fail_point!("load-chunk-decided");
        let directory = self.staging_directory(job_id);
        let _staging = self.loads.staging_lock.lock();
        // A user erased since the chunk was decided leaves no staged copy: an erasure
        // purges the chunks already durable, and this one is written after it.
        let erased = self.erased_among(&chunk.users)?;
        let mut staged = chunk.staged;
        if !erased.is_empty() {
            staged.retain(|row| !erased.contains(&row.key.user_id));
        }
        // On a shared engine the job may have been started through another server.
        std::fs::create_dir_all(&directory).map_err(|error| staging(job_id, error))?;
        write_chunk(&chunk_path(&directory, sequence), &chunk.users, &staged)
            .map_err(|error| staging(job_id, error))?;
        self.publish_chunk(job_id, sequence)
            .map_err(|error| staging(job_id, error))?;
        job.last_durable_chunk = sequence;
        job.summary.add(&chunk.summary);
        if !job.policy_versions.contains(&chunk.policy_version) {
            job.policy_versions.push(chunk.policy_version);
        }
        self.save_job(&mut job, &chunk.audit)?;
        self.purge_erased_after_publish(job_id, sequence, &chunk.users)?;
        Ok(ChunkOutcome {
            sequence,
            duplicate: false,
            summary: chunk.summary,
            invalid: chunk.invalid,
        })
    }

    /// The users among `users` whose erasure has begun.
    fn erased_among(&self, users: &[StagedUser]) -> Result<HashSet<u64>, Error> {
        let ids: Vec<u64> = users.iter().map(|user| user.user_id).collect();
        Ok(ids
            .iter()
            .zip(self.store.read_user_states(&ids)?)
            .filter(|(_, state)| {
                state
                    .as_ref()
                    .is_some_and(|state| state.erasure != ErasureState::None)
            })
            .map(|(user, _)| *user)
            .collect())
    }

    /// Deletes the staged rows of an erased user from every job not yet applied. The
    /// user stays listed in the chunks, so that their commit counts the rows as refused.
    pub(in crate::core) fn erase_staged_user(&self, user_id: u64) -> Result<(), Error> {
        let _staging = self.loads.staging_lock.lock();
        for (job_id, sequence) in self.staged_chunks()? {
            match self.purge_staged_chunk(&job_id, sequence, &HashSet::from([user_id])) {
                Ok(true) => {
                    tracing::info!(job = %job_id, chunk = sequence, "erased a user's staged rows");
                }
                Ok(false) => {}
                // A commit that just ended deleted its staging.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(staging(&job_id, error)),
            }
        }
        Ok(())
    }

    /// Whether any job not yet applied still stages rows of the user.
    pub(in crate::core) fn staged_user(&self, user_id: u64) -> Result<bool, Error> {
        for (job_id, sequence) in self.staged_chunks()? {
            let rows = self
                .chunk_file(&job_id, sequence)
                .and_then(|path| chunk_rows(&path, HashSet::new()));
            match rows {
                Ok(rows) if rows.iter().any(|row| row.key.user_id == user_id) => return Ok(true),
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(staging(&job_id, error)),
            }
        }
        Ok(false)
    }

    /// Every durable chunk of the jobs not yet applied: (job id, sequence).
    fn staged_chunks(&self) -> Result<Vec<(String, u64)>, Error> {
        let mut chunks = Vec::new();
        for job in self.load_jobs(usize::MAX)? {
            if matches!(job.state, JobState::Open | JobState::Committing) {
                for sequence in 1..=job.last_durable_chunk {
                    chunks.push((job.job_id.clone(), sequence));
                }
            }
        }
        Ok(chunks)
    }

    /// Aborts an open job: nothing of it is applied, its staged rows are deleted.
    pub fn load_abort(&self, job_id: &str) -> Result<JobRecord, Error> {
        if self.loads.attached_jobs.lock().contains(job_id) {
            return Err(Error::LoadJobBusy {
                job_id: job_id.to_string(),
            });
        }
        let mut job = self.load_job(job_id)?;
        match job.state {
            JobState::Aborted => return Ok(job),
            JobState::Committed | JobState::Committing => {
                return Err(conflict(
                    job_id,
                    format!("is {:?}; only an open job can be aborted", job.state),
                ));
            }
            JobState::Open => {}
        }
        self.abort(&mut job, "backfill")?;
        Ok(job)
    }

    fn abort(&self, job: &mut JobRecord, caller: &str) -> Result<(), Error> {
        job.state = JobState::Aborted;
        let mut entry = self.audit_entry(AuditAction::LoadAborted, caller, None)?;
        entry.subject = format!(
            "job {}: {} staged rows deleted",
            job.job_id, job.summary.rows_received
        );
        self.save_job(job, &[entry])?;
        self.remove_job_staging(job);
        Ok(())
    }

    /// Aborts open jobs that received nothing for `abandoned_after`, and forgets the
    /// records of jobs that ended more than `finished_jobs_kept` ago.
    pub(super) fn expire_loads(&self) -> Result<(), Error> {
        let now = self.clock.now().unix_micros();
        let before = |age: std::time::Duration| {
            now.saturating_sub(i64::try_from(age.as_micros()).unwrap_or(i64::MAX))
        };
        let abandoned = before(self.loads.settings.abandoned_after);
        let forgotten = before(self.loads.settings.finished_jobs_kept);
        for mut job in self.load_jobs(usize::MAX)? {
            match job.state {
                JobState::Open
                    if job.updated_at < abandoned
                        && !self.loads.attached_jobs.lock().contains(&job.job_id) =>
                {
                    tracing::warn!(job = %job.job_id, "aborting an abandoned bulk load");
                    self.abort(&mut job, "retention-sweep")?;
                }
                JobState::Committed | JobState::Aborted if job.updated_at < forgotten => {
                    self.store.delete_meta(&job_key(&job.job_id))?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// At start: finishes commits a crash interrupted, and deletes staging left by jobs
    /// that ended.
    pub(super) fn recover_loads(&self) -> Result<(), Error> {
        let jobs = self.load_jobs(usize::MAX)?;
        for job in &jobs {
            if job.state == JobState::Committing {
                tracing::warn!(job = %job.job_id, "finishing a bulk-load commit a restart interrupted");
                // A job that cannot be committed must not keep the server from serving.
                if let Err(error) = self.finish_commit(job.clone()) {
                    tracing::error!(job = %job.job_id, %error, "cannot finish the commit of a bulk load");
                }
            }
        }
        for job in &jobs {
            if matches!(job.state, JobState::Aborted | JobState::Committed) {
                self.remove_job_staging(job);
            }
        }
        Ok(())
    }
}

/// Deletes a job's staging directory; a failure is logged (the next start retries).
fn remove_staging(directory: &Path) {
    match std::fs::remove_dir_all(directory) {
        Ok(()) => {
            if let Some(parent) = directory.parent() {
                let _ = sync_directory(parent);
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::error!(directory = %directory.display(), %error, "cannot delete bulk-load staging");
        }
    }
}

/// A chunk's admitted values as storage rows: sorted by key, one per key (rows of the
/// same user and surface combined by the last-writer-wins merge), values sorted by
/// feature, encoded as merge operands.
fn staged_rows(mut writes: Vec<crate::storage::RowWrite>) -> Vec<StagedRow> {
    writes.sort_by_key(|write| write.key);
    let mut staged: Vec<StagedRow> = Vec::with_capacity(writes.len());
    let mut writes = writes.into_iter().peekable();
    while let Some(first) = writes.next() {
        let key = first.key;
        let mut row = StoredRow {
            values: first.values,
        };
        row.values.sort_by_key(|value| value.feature);
        while let Some(next) = writes.next_if(|next| next.key == key) {
            for value in next.values {
                codec::merge_value(&mut row, value);
            }
        }
        staged.push(StagedRow {
            key,
            operand: encode_row(&row),
        });
    }
    staged
}

/// The rows of one chunk file, without those of `left_out` users.
pub(super) fn chunk_rows(path: &Path, left_out: HashSet<u64>) -> std::io::Result<Vec<StagedRow>> {
    let mut rows = MergedRows::open(std::slice::from_ref(&path.to_path_buf()), vec![left_out])?;
    let mut kept = Vec::new();
    while let Some(row) = rows.next_row()? {
        kept.push(row);
    }
    Ok(kept)
}

/// Counts what the policy decided for each row of a chunk into `summary`, and returns the
/// chunk's users (with the generation their rows were decided with and what was admitted
/// of them), sorted by user id: the users of rows with something admitted.
fn count_decided(
    decided: &[WriteRow],
    decisions: &[Vec<Vec<Decision>>],
    states: &HashMap<u64, crate::storage::UserState>,
    summary: &mut Summary,
) -> Vec<StagedUser> {
    let mut users: HashMap<u64, StagedUser> = HashMap::new();
    for (row, row_decisions) in decided.iter().zip(decisions) {
        let mut admitted = 0u64;
        let mut refused = 0u64;
        let mut reasons: HashMap<ReasonCode, u64> = HashMap::new();
        for decision in row_decisions.iter().flatten() {
            match decision {
                Decision::Admitted(_) => admitted += 1,
                Decision::Refused(refusal) => {
                    refused += 1;
                    for reason in refusal.iter() {
                        *reasons.entry(reason).or_default() += 1;
                    }
                }
            }
        }
        summary.values_admitted += admitted;
        summary.values_refused += refused;
        for (reason, values) in reasons {
            summary.count_reason(reason, values);
        }
        if admitted == 0 {
            summary.rows_denied += 1;
            continue;
        }
        let user = users.entry(row.user_id).or_insert_with(|| StagedUser {
            user_id: row.user_id,
            generation: states.get(&row.user_id).map_or(0, |state| state.generation),
            rows_accepted: 0,
            rows_transformed: 0,
            values: 0,
        });
        user.values += admitted;
        if refused == 0 {
            summary.rows_accepted += 1;
            user.rows_accepted += 1;
        } else {
            summary.rows_transformed += 1;
            user.rows_transformed += 1;
        }
    }
    let mut users: Vec<StagedUser> = users.into_values().collect();
    users.sort_unstable_by_key(|user| user.user_id);
    users
}
