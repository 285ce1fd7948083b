//! Bulk loads on an engine that several servers share (a Redis Cluster): a chunk is
//! staged on the server's disk as everywhere, then published to the engine as a blob, so
//! that the commit, an erasure's purge of staged rows, or a resumed stream can run on any
//! server; a server fetches a chunk before it reads it. The commit applies each chunk's
//! rows user by user, each user's share atomic with the check of the generation its rows
//! were decided with, so a user whose state changed since is left out.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use featurestore::domain::Timestamp;
use featurestore::proto::ReasonCode;

use super::*;
use crate::storage::{IdempotencyRecord, RowWrite, StorageError, UserWrite};

/// The blob of chunk `sequence` of job `job_id`.
fn chunk_blob(job_id: &str, sequence: u64) -> String {
    format!("load/{job_id}/{sequence}")
}

fn io_error(error: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(error.to_string())
}

impl Core {
    /// The staging file of a job's chunk on this server's disk; on a shared engine fetched
    /// from it first (another server may have staged the chunk, or purged a user from it).
    /// `NotFound` when the chunk is not staged (any more).
    pub(super) fn chunk_file(&self, job_id: &str, sequence: u64) -> std::io::Result<PathBuf> {
        let path = chunk_path(&self.staging_directory(job_id), sequence);
        if let Some(blobs) = self.store.blobs() {
            let Some(bytes) = blobs
                .blob(&chunk_blob(job_id, sequence))
                .map_err(io_error)?
            else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("chunk {sequence} of job {job_id} is not staged"),
                ));
            };
            std::fs::create_dir_all(self.staging_directory(job_id))?;
            let partial = path.with_extension("fetched");
            std::fs::write(&partial, bytes)?;
            std::fs::rename(&partial, &path)?;
        }
        Ok(path)
    }

    /// Makes a chunk this server staged visible to every server sharing the engine.
    pub(super) fn publish_chunk(&self, job_id: &str, sequence: u64) -> std::io::Result<()> {
        if let Some(blobs) = self.store.blobs() {
            let bytes = std::fs::read(chunk_path(&self.staging_directory(job_id), sequence))?;
            blobs
                .put_blob(&chunk_blob(job_id, sequence), &bytes)
                .map_err(io_error)?;
        }
        Ok(())
    }

    /// Deletes the rows of `users` from a staged chunk (they stay listed, so that the
    /// commit counts them as refused); whether the chunk held any. On a shared engine the
    /// chunk is replaced only if no other server replaced it meanwhile, else read again.
    pub(super) fn purge_staged_chunk(
        &self,
        job_id: &str,
        sequence: u64,
        users: &HashSet<u64>,
    ) -> std::io::Result<bool> {
        loop {
            let path = self.chunk_file(job_id, sequence)?;
            let before = match self.store.blobs() {
                Some(_) => Some(std::fs::read(&path)?),
                None => None,
            };
            let (listed, _) = read_users(&path)?;
            if !listed.iter().any(|user| users.contains(&user.user_id)) {
                return Ok(false);
            }
            let kept = chunk_rows(&path, users.clone())?;
            write_chunk(&path, &listed, &kept)?;
            let (Some(blobs), Some(before)) = (self.store.blobs(), before) else {
                return Ok(true);
            };
            let after = std::fs::read(&path)?;
            if blobs
                .replace_blob(&chunk_blob(job_id, sequence), &before, &after)
                .map_err(io_error)?
            {
                return Ok(true);
            }
        }
    }

    /// On a shared engine, once a chunk is durable: purges the users of the chunk erased
    /// meanwhile. An erasure on another server purges the chunks its job record lists; a
    /// chunk published after that listing is purged here, since the erasure's fence came
    /// before this look at the states.
    pub(super) fn purge_erased_after_publish(
        &self,
        job_id: &str,
        sequence: u64,
        users: &[StagedUser],
    ) -> Result<(), Error> {
        if self.store.blobs().is_none() {
            return Ok(());
        }
        let erased = self.erased_among(users)?;
        if !erased.is_empty() {
            self.purge_staged_chunk(job_id, sequence, &erased)
                .map_err(|error| staging(job_id, error))?;
        }
        Ok(())
    }

    /// Deletes a job's staging: this server's files and, on a shared engine, its blobs.
    pub(super) fn remove_job_staging(&self, job: &JobRecord) {
        remove_staging(&self.staging_directory(&job.job_id));
        if let Some(blobs) = self.store.blobs() {
            for sequence in 1..=job.last_durable_chunk {
                if let Err(error) = blobs.delete_blob(&chunk_blob(&job.job_id, sequence)) {
                    tracing::error!(job = %job.job_id, sequence, %error, "cannot delete a staged chunk");
                }
            }
        }
    }

    /// Applies a job on an engine without table files: chunk by chunk, each user's staged
    /// rows as one share of a write decided with the generation the rows were staged
    /// with. A user whose state changed since (or who is being erased) is left out and
    /// counted as refused. Applying again (a commit a crash interrupted) replays what was
    /// applied: every chunk has its idempotency key, and merging a staged value twice
    /// changes nothing.
    pub(super) fn apply_commit_by_user(
        &self,
        job: &mut JobRecord,
        chunks: &[PathBuf],
        chunk_users: &[Vec<StagedUser>],
        applied: &mut bool,
    ) -> Result<(), Error> {
        let job_id = job.job_id.clone();
        let refused = self.refused_at_commit(chunk_users)?;
        let replay_since = Timestamp::from_unix_micros(job.created_at);
        for (sequence, ((path, users), refused)) in
            (1u64..).zip(chunks.iter().zip(chunk_users).zip(refused))
        {
            let mut left_out: HashMap<u64, ReasonCode> = refused;
            let rows = chunk_rows(path, left_out.keys().copied().collect())
                .map_err(|error| staging(&job_id, error))?;
            let mut shares = shares_of(users, rows).map_err(|error| staging(&job_id, error))?;
            let key = format!("load/{job_id}#{sequence}");
            let record = IdempotencyRecord {
                fingerprint: xxhash_rust::xxh3::xxh3_64(key.as_bytes()),
                key,
                created_at: self.clock.now(),
            };
            // From here on, a failure may leave some users applied: the job stays
            // committing, and the commit is finished by a retry or at the next start.
            *applied = true;
            loop {
                match self
                    .store
                    .apply_write(&record, replay_since, &shares, &mut |_, _| Vec::new())
                {
                    Ok(_) => break,
                    Err(StorageError::GenerationChanged { user_id, .. }) => {
                        let erasing = self
                            .store
                            .read_user_states(&[user_id])?
                            .pop()
                            .flatten()
                            .is_some_and(|state| state.erasure != ErasureState::None);
                        let reason = if erasing {
                            ReasonCode::UserErased
                        } else {
                            ReasonCode::StaleGeneration
                        };
                        left_out.insert(user_id, reason);
                        shares.retain(|share| share.user_id != user_id);
                    }
                    Err(error) => return Err(error.into()),
                }
            }
            for user in users {
                if let Some(reason) = left_out.get(&user.user_id) {
                    job.summary.refuse_at_commit(user, *reason);
                }
            }
        }
        job.state = JobState::Committed;
        job.committed_at = self.clock.now().unix_micros();
        job.files_ingested = 0;
        let mut entry = self.audit_entry(AuditAction::LoadCommitted, "backfill", None)?;
        entry.subject = format!(
            "job {job_id}: {} rows admitted, applied user by user",
            job.summary.rows_accepted + job.summary.rows_transformed,
        );
        self.save_job(job, &[entry])
    }
}

/// A chunk's rows (sorted by key) as one share per user, with the generation the user's
/// rows were decided with.
fn shares_of(users: &[StagedUser], rows: Vec<StagedRow>) -> std::io::Result<Vec<UserWrite>> {
    let mut shares: Vec<UserWrite> = Vec::new();
    for row in rows {
        let values = codec::decode_row(&row.operand)
            .map_err(|error| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, error.to_string())
            })?
            .values;
        let write = RowWrite {
            key: row.key,
            values,
        };
        match shares.last_mut() {
            Some(share) if share.user_id == row.key.user_id => share.rows.push(write),
            _ => {
                let generation = users
                    .binary_search_by_key(&row.key.user_id, |user| user.user_id)
                    .map(|index| users[index].generation)
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("staged rows of user {} who is not listed", row.key.user_id),
                        )
                    })?;
                shares.push(UserWrite {
                    user_id: row.key.user_id,
                    generation,
                    rows: vec![write],
                    audit: Vec::new(),
                });
            }
        }
    }
    Ok(shares)
}
