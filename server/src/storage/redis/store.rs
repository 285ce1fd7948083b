//! [`Store`] on a Redis Cluster: each operation as reads, a decision in Rust, and one
//! compare-and-set step per user ([`RedisStore::change_user`]).

use super::*;

impl Store for RedisStore {
    fn visit_rows(
        &self,
        keys: &[RowKey],
        visit: &mut dyn FnMut(usize, RowFound<'_>),
    ) -> Result<(), StorageError> {
        // One MGET per partition (its keys share a slot), all sent at once: the cluster
        // connection pipelines those for one node on its connection to it.
        let groups: Vec<(Vec<usize>, Vec<String>)> =
            by_partition(&self.layout, keys.iter().map(|key| key.user_id))
                .into_values()
                .map(|indices| {
                    let names = indices
                        .iter()
                        .map(|&index| {
                            self.layout
                                .user(keys[index].user_id)
                                .row(keys[index].surface)
                        })
                        .collect();
                    (indices, names)
                })
                .collect();
        let names: Vec<Vec<String>> = groups.iter().map(|(_, names)| names.clone()).collect();
        let answers = self.get_groups(names)?;
        for ((indices, _), answer) in groups.iter().zip(answers) {
            match answer {
                Ok(values) => {
                    for (&index, value) in indices.iter().zip(values) {
                        match value {
                            None => visit(index, RowFound::Missing),
                            Some(bytes) => RowFound::visit_stored(index, &bytes, visit),
                        }
                    }
                }
                // A node that does not answer fails the rows it holds, not the batch.
                Err(error) => {
                    let problem = format!("redis: {error}");
                    for &index in indices {
                        visit(index, RowFound::Unavailable(&problem));
                    }
                }
            }
        }
        Ok(())
    }

    fn apply_write(
        &self,
        idempotency: &IdempotencyRecord,
        replay_since: Timestamp,
        users: &[UserWrite],
        answer: AnswerBuilder<'_>,
    ) -> Result<Vec<Applied>, StorageError> {
        for share in users {
            share.check_rows_are_the_users()?;
        }
        self.apply_shares(idempotency, replay_since, users, answer)
    }

    fn read_user_states(&self, users: &[u64]) -> Result<Vec<Option<UserState>>, StorageError> {
        let groups = by_partition(&self.layout, users.iter().copied());
        let names: Vec<Vec<String>> = groups
            .values()
            .map(|indices| {
                indices
                    .iter()
                    .map(|&index| self.layout.user(users[index]).state())
                    .collect()
            })
            .collect();
        let answers = self
            .get_groups(names)?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(engine)?;
        let mut states = vec![None; users.len()];
        for (indices, values) in groups.values().zip(answers) {
            for (&index, value) in indices.iter().zip(values) {
                if let Some(bytes) = value {
                    let user_id = users[index];
                    states[index] =
                        Some(decode_user_state(user_id, &bytes).map_err(|error| {
                            corrupt(format!("state of user {user_id}: {error}"))
                        })?);
                }
            }
        }
        Ok(states)
    }

    fn set_user_state(
        &self,
        update: &UserStateUpdate,
        now: Timestamp,
        revalidate: Revalidate<'_>,
        audit: &AuditEntry,
    ) -> Result<UserState, StorageError> {
        self.change_user(update.user_id, &|_| Vec::new(), &mut |keys, snapshot| {
            let state = UserState::updated(snapshot.state.as_ref(), update, now)?;
            let rows = self.user_rows(keys, &snapshot.surfaces)?;
            let mut step = snapshot.step(keys, true);
            step.set(&keys.state(), &encode_user_state(&state));
            Self::revalidated(&mut step, keys, Some(&state), rows, revalidate);
            audit::append(
                &mut step,
                &keys.chain(),
                &snapshot.tail,
                std::slice::from_ref(audit),
            );
            Ok(Decision::Apply(step, state))
        })
    }

    fn append_audit(&self, entries: &[AuditEntry]) -> Result<(), StorageError> {
        self.append_to_chain_zero(entries, None)
    }

    fn audit_trail(
        &self,
        user_id: u64,
        user: &Pseudonym,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StorageError> {
        self.read_trail(user_id, user, limit)
    }

    fn verify_audit(&self) -> Result<AuditReport, StorageError> {
        self.verify_chains()
    }

    fn revalidate_user(
        &self,
        user_id: u64,
        revalidate: Revalidate<'_>,
    ) -> Result<usize, StorageError> {
        self.change_user(user_id, &|_| Vec::new(), &mut |keys, snapshot| {
            let rows = self.user_rows(keys, &snapshot.surfaces)?;
            let mut step = snapshot.step(keys, false);
            let removed =
                Self::revalidated(&mut step, keys, snapshot.state.as_ref(), rows, revalidate);
            Ok(if removed == 0 {
                Decision::Done(0)
            } else {
                Decision::Apply(step, removed)
            })
        })
    }

    fn users_with_rows(&self, from_user: u64, limit: usize) -> Result<Vec<u64>, StorageError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let sets: Vec<String> = (0..self.layout.partitions())
            .map(|partition| self.layout.chain(partition).users())
            .collect();
        let from = format!("[{}", keys::user_member(from_user));
        let connection = self.connection.clone();
        let found = self.run(async move {
            let reads = sets.iter().map(|set| {
                let mut connection = connection.clone();
                let from = from.clone();
                async move {
                    redis::cmd("ZRANGEBYLEX")
                        .arg(set)
                        .arg(from)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(limit)
                        .query_async::<Vec<String>>(&mut connection)
                        .await
                }
            });
            join_all(reads)
                .await
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
        })?;
        let mut users = found
            .into_iter()
            .flatten()
            .map(|member| {
                u64::from_str_radix(&member, 16)
                    .map_err(|_| corrupt(format!("{member:?} in a set of users is not a user id")))
            })
            .collect::<Result<Vec<u64>, _>>()?;
        users.sort_unstable();
        users.dedup();
        users.truncate(limit);
        Ok(users)
    }

    fn read_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let (meta, key) = (self.layout.meta(), key.to_string());
        let mut connection = self.connection.clone();
        self.run(async move {
            redis::cmd("HGET")
                .arg(meta)
                .arg(key)
                .query_async(&mut connection)
                .await
        })
    }

    fn write_meta(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        let mut step = Step::default();
        step.hash_set(&self.layout.meta(), key.as_bytes(), value);
        self.execute(&step).map(|_| ())
    }

    fn delete_meta(&self, key: &str) -> Result<(), StorageError> {
        let mut step = Step::default();
        step.hash_delete(&self.layout.meta(), key.as_bytes());
        self.execute(&step).map(|_| ())
    }

    fn pseudonym_key(&self, user_id: u64, create: bool) -> Result<Option<[u8; 32]>, StorageError> {
        let decode = |bytes: &[u8]| -> Result<[u8; 32], StorageError> {
            bytes.try_into().map_err(|_| {
                corrupt(format!(
                    "the pseudonym key of user {user_id} is not 32 bytes"
                ))
            })
        };
        self.change_user(user_id, &|_| Vec::new(), &mut |keys, snapshot| {
            if let Some(secret) = &snapshot.pseudonym_key {
                return Ok(Decision::Done(Some(decode(secret)?)));
            }
            // An erased user's key is never made again: the step applies only if the
            // user's state did not change since it was read.
            if !create || snapshot.erasing() {
                return Ok(Decision::Done(None));
            }
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret).map_err(|error| {
                StorageError::Engine(format!("no randomness for a pseudonym key: {error}"))
            })?;
            let mut step = snapshot.step(keys, false);
            step.set(&keys.pseudonym_key(), &secret);
            Ok(Decision::Apply(step, Some(secret)))
        })
    }

    fn erase_user(
        &self,
        user_id: u64,
        now: Timestamp,
        audit: &AuditEntry,
    ) -> Result<UserState, StorageError> {
        self.change_user(user_id, &|_| Vec::new(), &mut |keys, snapshot| {
            let state = UserState::tombstone(user_id, snapshot.state.as_ref(), now);
            let mut step = snapshot.step(keys, true);
            step.set(&keys.state(), &encode_user_state(&state));
            for &surface in &snapshot.surfaces {
                step.delete(&keys.row(surface));
            }
            set_surfaces(&mut step, keys, &[]);
            step.delete(&keys.pseudonym_key());
            audit::append(
                &mut step,
                &keys.chain(),
                &snapshot.tail,
                std::slice::from_ref(audit),
            );
            Ok(Decision::Apply(step, state))
        })
    }

    fn user_has_data(&self, user_id: u64) -> Result<bool, StorageError> {
        let keys = self.layout.user(user_id);
        let found = self.get_many(vec![keys.surfaces(), keys.pseudonym_key()])?;
        Ok(found.iter().any(Option::is_some))
    }

    fn finish_erasure(&self, user_id: u64) -> Result<(), StorageError> {
        self.change_user(user_id, &|_| Vec::new(), &mut |keys, snapshot| {
            let Some(mut state) = snapshot.state.clone() else {
                return Ok(Decision::Done(()));
            };
            state.erasure = ErasureState::Erased;
            let mut step = snapshot.step(keys, false);
            step.set(&keys.state(), &encode_user_state(&state));
            Ok(Decision::Apply(step, ()))
        })
    }

    fn write_meta_audited(
        &self,
        key: &str,
        value: &[u8],
        audit: &[AuditEntry],
    ) -> Result<(), StorageError> {
        self.append_to_chain_zero(audit, Some((key, value)))
    }

    fn user_files(&self) -> Option<&dyn crate::storage::UserFiles> {
        Some(self)
    }

    fn engine_stats(&self) -> Option<&dyn crate::storage::EngineStats> {
        Some(self)
    }

    fn blobs(&self) -> Option<&dyn crate::storage::Blobs> {
        Some(self)
    }

    fn meta_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let meta = self.layout.meta();
        let mut connection = self.connection.clone();
        let all: Vec<(String, Vec<u8>)> = self.run(async move {
            redis::cmd("HGETALL")
                .arg(meta)
                .query_async(&mut connection)
                .await
        })?;
        let mut found: Vec<(String, Vec<u8>)> = all
            .into_iter()
            .filter(|(key, _)| key.starts_with(prefix))
            .collect();
        found.sort();
        Ok(found)
    }
}

impl RedisStore {
    /// Applies a write's shares in waves ([`super::waves`]): every pending user's snapshot
    /// read at once, each share decided on its snapshot, every step sent at once; the
    /// users whose step found something moved go to the next wave. A key reused for
    /// another request refuses the write before anything of it is applied.
    fn apply_shares(
        &self,
        idempotency: &IdempotencyRecord,
        replay_since: Timestamp,
        users: &[UserWrite],
        answer: AnswerBuilder<'_>,
    ) -> Result<Vec<Applied>, StorageError> {
        let surfaces: Vec<Vec<SurfaceId>> = users
            .iter()
            .map(|share| {
                let mut surfaces: Vec<SurfaceId> =
                    share.rows.iter().map(|row| row.key.surface).collect();
                surfaces.sort_unstable();
                surfaces.dedup();
                surfaces
            })
            .collect();
        let window_millis = replay_since
            .unix_micros()
            .abs_diff(idempotency.created_at.unix_micros())
            / 1_000;
        let mut applied: Vec<Option<Applied>> = vec![None; users.len()];
        let mut pending: Vec<usize> = (0..users.len()).collect();
        for wave in 0..STEP_ATTEMPTS {
            let reads: Vec<(UserKeys, Vec<String>)> = pending
                .iter()
                .map(|&index| {
                    let keys = self.layout.user(users[index].user_id);
                    let mut extra = vec![keys.idempotency(&idempotency.key)];
                    extra.extend(surfaces[index].iter().map(|&surface| keys.row(surface)));
                    (keys, extra)
                })
                .collect();
            let snapshots = self.snapshots(&reads)?;
            if wave == 0 {
                for snapshot in &snapshots {
                    if let Some((created_at, fingerprint, _)) = recorded(snapshot)?
                        && created_at >= replay_since
                        && fingerprint != idempotency.fingerprint
                    {
                        return Err(StorageError::IdempotencyKeyReused);
                    }
                }
            }
            let mut steps = Vec::new();
            let mut stepped = Vec::new();
            for (&index, ((keys, _), snapshot)) in pending.iter().zip(reads.iter().zip(snapshots)) {
                let share = Share {
                    index,
                    write: &users[index],
                    surfaces: &surfaces[index],
                };
                match decide_share(
                    idempotency,
                    replay_since,
                    window_millis,
                    &share,
                    keys,
                    snapshot,
                    answer,
                )? {
                    Decision::Done(done) => applied[index] = Some(done),
                    Decision::Apply(step, done) => {
                        steps.push(step);
                        stepped.push((index, done));
                    }
                }
            }
            // Decided on what was read, not yet written: another server's change of a user
            // may land here, and that user's step must then write nothing.
            fail::fail_point!("redis-step-decided");
            let written = self.execute_all(&steps)?;
            pending.clear();
            for ((index, done), written) in stepped.into_iter().zip(written) {
                if written {
                    applied[index] = Some(done);
                } else {
                    pending.push(index);
                }
            }
            if pending.is_empty() {
                return Ok(applied
                    .into_iter()
                    .map(|applied| applied.expect("every share is applied or replayed"))
                    .collect());
            }
        }
        Err(StorageError::Engine(format!(
            "{} users of a write changed {STEP_ATTEMPTS} times while it was decided",
            pending.len()
        )))
    }
}

/// One user's share of a write, with its index in the write and the surfaces it touches.
struct Share<'a> {
    index: usize,
    write: &'a UserWrite,
    surfaces: &'a [SurfaceId],
}

/// The idempotency record a share's snapshot found (its first extra key).
#[allow(clippy::type_complexity)]
fn recorded(snapshot: &Snapshot) -> Result<Option<(Timestamp, u64, Vec<u8>)>, StorageError> {
    match snapshot.extra.first().cloned().flatten() {
        Some(record) => decode_idempotency_record(&record).map_err(corrupt),
        None => Ok(None),
    }
}

/// Decides one user's share on its snapshot: replayed when its record is there, refused
/// when its fence moved, else the step that merges its rows and writes its record and
/// audit records.
fn decide_share(
    idempotency: &IdempotencyRecord,
    replay_since: Timestamp,
    window_millis: u64,
    share: &Share<'_>,
    keys: &UserKeys,
    snapshot: Snapshot,
    answer: AnswerBuilder<'_>,
) -> Result<Decision<Applied>, StorageError> {
    if let Some((created_at, fingerprint, stored)) = recorded(&snapshot)?
        && created_at >= replay_since
    {
        if fingerprint != idempotency.fingerprint {
            return Err(StorageError::IdempotencyKeyReused);
        }
        return Ok(Decision::Done(Applied::Replayed { answer: stored }));
    }
    let write = share.write;
    if snapshot.generation() != write.generation || snapshot.erasing() {
        return Err(StorageError::GenerationChanged {
            user_id: write.user_id,
            current_generation: snapshot.generation(),
        });
    }
    let mut current = Vec::with_capacity(share.surfaces.len());
    for (&surface, bytes) in share.surfaces.iter().zip(snapshot.extra.iter().skip(1)) {
        let key = RowKey {
            user_id: write.user_id,
            surface,
        };
        current.push(match bytes {
            Some(bytes) => decode_stored_row(key, bytes)?,
            None => StoredRow::default(),
        });
    }
    let mut changed = vec![false; share.surfaces.len()];
    let outcomes: Vec<Vec<_>> = write
        .rows
        .iter()
        .map(|row| {
            let slot = share
                .surfaces
                .binary_search(&row.key.surface)
                .expect("every surface is in the distinct list");
            row.values
                .iter()
                .map(|value| {
                    let outcome = merge_value(&mut current[slot], value.clone());
                    changed[slot] |= outcome == crate::storage::ValueOutcome::Stored;
                    outcome
                })
                .collect()
        })
        .collect();
    let built = answer(share.index, &outcomes);
    let mut step = snapshot.step(keys, !write.audit.is_empty());
    let mut surfaces = snapshot.surfaces.clone();
    for ((surface, row), changed) in share.surfaces.iter().zip(&current).zip(changed) {
        if changed {
            step.set(&keys.row(*surface), &encode_row(row));
            if let Err(position) = surfaces.binary_search(surface) {
                surfaces.insert(position, *surface);
            }
        }
    }
    if surfaces != snapshot.surfaces {
        set_surfaces(&mut step, keys, &surfaces);
    }
    step.set_expiring(
        &keys.idempotency(&idempotency.key),
        &codec::encode_idempotency_record(idempotency, &built),
        window_millis,
    );
    audit::append(&mut step, &keys.chain(), &snapshot.tail, &write.audit);
    Ok(Decision::Apply(step, Applied::Fresh { answer: built }))
}

impl crate::storage::Blobs for RedisStore {
    fn put_blob(&self, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
        let mut step = Step::default();
        step.set(&self.layout.blob(name), bytes);
        self.execute(&step).map(|_| ())
    }

    fn blob(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.get_many(vec![self.layout.blob(name)])?.pop().flatten())
    }

    fn replace_blob(
        &self,
        name: &str,
        expected: &[u8],
        bytes: &[u8],
    ) -> Result<bool, StorageError> {
        let key = self.layout.blob(name);
        let mut step = Step::default();
        step.compare(&key, Some(expected));
        step.set(&key, bytes);
        self.execute(&step)
    }

    fn delete_blob(&self, name: &str) -> Result<(), StorageError> {
        let mut step = Step::default();
        step.delete(&self.layout.blob(name));
        self.execute(&step).map(|_| ())
    }
}
