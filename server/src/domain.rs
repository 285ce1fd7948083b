//! The feature store's domain core: the read and write paths over the registry, the policy
//! and the storage engine, and the re-validation of stored values when the policy or a
//! user's state changes. Functions here block (they call the engine) and run on the
//! blocking pool or a thread of their own.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use featurestore::domain::{Timestamp, UserStateUpdate};
use parking_lot::{Mutex, RwLock};

use crate::audit::{AuditAction, AuditEntry, Pseudonymizer};
use crate::clock::Clock;
use crate::error::Error;
use crate::policy::{Policy, ValueFacts};
use crate::registry::Registry;
use crate::storage::{RowKey, Store, StoredRow, UserState};

mod read;
#[cfg(test)]
mod tests;
mod write;

/// Meta key holding the hash of the bundle every stored value was last validated under.
const VALIDATED_POLICY_KEY: &str = "validated_policy_hash";
/// Meta key holding the secret key of user pseudonyms in the audit log.
const PSEUDONYM_KEY: &str = "audit_pseudonym_key";
/// Users re-validated per storage scan of a purge.
const PURGE_USERS_PER_SCAN: usize = 1000;

/// The policy in force and what the read path serves.
#[derive(Clone, Debug)]
pub struct PolicyInForce {
    pub policy: Arc<Policy>,
    /// Hash prefixes of the bundles whose stored values are served as they are: the
    /// current one, and while a purge runs, earlier ones the current bundle does not
    /// tighten. Values of any other bundle are withheld until the purge re-validates them.
    pub served_versions: Vec<u64>,
    pub loaded_at: Timestamp,
}

/// Progress of the purge that re-validates every stored value after a bundle change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PurgeStatus {
    pub running: bool,
    /// The bundle the purge validates against.
    pub bundle_hash: String,
    pub users_done: u64,
    pub values_removed: u64,
    pub finished_at: Option<Timestamp>,
}

/// Shared state of the read and write paths.
#[derive(Debug)]
pub struct Core {
    /// The registered surfaces, sources and features; fixed for the server's life.
    pub registry: Arc<Registry>,
    /// The policy bundle in force. Each request takes it once, so a reload never changes
    /// the policy under a request in flight.
    policy: RwLock<PolicyInForce>,
    /// Where a reload reads the bundle from; `None` for the embedded default.
    policy_path: Option<PathBuf>,
    /// The latest purge's progress.
    purge: Mutex<PurgeStatus>,
    /// The storage engine.
    pub store: Arc<dyn Store>,
    /// The source of "now" for expiry, retention and idempotency.
    pub clock: Arc<dyn Clock>,
    /// How long an idempotency key's answer is replayed.
    pub idempotency_window: Duration,
    /// Turns user ids into the pseudonyms the audit log records.
    pub pseudonymizer: Pseudonymizer,
}

impl Core {
    pub fn new(
        registry: Arc<Registry>,
        policy: Arc<Policy>,
        policy_path: Option<PathBuf>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        idempotency_window: Duration,
    ) -> Result<Core, Error> {
        let in_force = PolicyInForce {
            served_versions: vec![policy.hash_prefix],
            policy,
            loaded_at: clock.now(),
        };
        let pseudonymizer = Pseudonymizer::new(pseudonym_key(store.as_ref())?);
        Ok(Core {
            registry,
            policy: RwLock::new(in_force),
            policy_path,
            purge: Mutex::new(PurgeStatus::default()),
            store,
            clock,
            idempotency_window,
            pseudonymizer,
        })
    }

    /// An audit entry stamped with the current time and bundle.
    pub fn audit_entry(
        &self,
        action: AuditAction,
        caller: &str,
        user_id: Option<u64>,
    ) -> AuditEntry {
        AuditEntry {
            time: self.clock.now(),
            action,
            caller: caller.to_string(),
            bundle_hash: self.policy().hash.clone(),
            user: user_id.map(|user_id| self.pseudonymizer.pseudonym(user_id)),
            surfaces: String::new(),
            subject: String::new(),
            reasons: 0,
        }
    }

    /// Re-validates one user's rows under the bundle in force, auditing what goes.
    fn revalidate_user(&self, user_id: u64, policy: &Policy, caller: &str) -> Result<usize, Error> {
        let now = self.clock.now();
        let removed = self
            .store
            .revalidate_user(user_id, &mut |state, key, row| {
                self.revalidate(policy, state, key, row, now)
            })?;
        if removed > 0 {
            let mut entry = self.audit_entry(AuditAction::ValuesPurged, caller, Some(user_id));
            entry.bundle_hash.clone_from(&policy.hash);
            entry.subject = format!("{removed} values");
            self.store.append_audit(&[entry])?;
        }
        Ok(removed)
    }

    /// Checks that every stored value was validated under the bundle in force; when not
    /// (the server restarted with another bundle), starts a purge.
    pub fn start(self: &Arc<Self>) -> Result<(), Error> {
        let hash = self.policy().hash.clone();
        if self.store.read_meta(VALIDATED_POLICY_KEY)?.as_deref() == Some(hash.as_bytes()) {
            return Ok(());
        }
        if self.store.users_with_rows(0, 1)?.is_empty() {
            self.store
                .write_meta(VALIDATED_POLICY_KEY, hash.as_bytes())?;
            return Ok(());
        }
        tracing::info!(bundle = %hash, "stored values were validated under another bundle; purging");
        Arc::clone(self).spawn_purge();
        Ok(())
    }

    /// The policy bundle in force now.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read().policy)
    }

    /// The policy in force and the bundle versions the read path serves.
    pub fn policy_in_force(&self) -> PolicyInForce {
        self.policy.read().clone()
    }

    pub fn purge_status(&self) -> PurgeStatus {
        self.purge.lock().clone()
    }

    /// Loads the bundle again from where it came from. An invalid bundle is refused and the
    /// old one stays in force. A different bundle is swapped in atomically (requests in
    /// flight finish on the old one) and a purge re-validates every stored value.
    pub fn reload_policy(self: &Arc<Self>) -> Result<PolicyInForce, Error> {
        let new = match &self.policy_path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| {
                    Error::InvalidBundle(format!("cannot read {}: {error}", path.display()))
                })?;
                Policy::from_toml(&text, &self.registry)
            }
            None => Policy::embedded_default(&self.registry),
        }
        .map_err(|error| Error::InvalidBundle(error.to_string()))?;
        let new = Arc::new(new);
        {
            let mut in_force = self.policy.write();
            if in_force.policy.hash == new.hash {
                return Ok(in_force.clone());
            }
            let mut served_versions = vec![new.hash_prefix];
            if !new.tightens(&in_force.policy) {
                served_versions.extend(in_force.served_versions.iter().copied());
            }
            tracing::info!(
                version = %new.version,
                hash = %new.hash,
                previous = %in_force.policy.hash,
                tightens = served_versions.len() == 1,
                "policy bundle reloaded"
            );
            *in_force = PolicyInForce {
                policy: Arc::clone(&new),
                served_versions,
                loaded_at: self.clock.now(),
            };
        }
        let mut entry = self.audit_entry(AuditAction::PolicyLoaded, "admin", None);
        entry.subject.clone_from(&new.version);
        self.store.append_audit(&[entry])?;
        Arc::clone(self).spawn_purge();
        Ok(self.policy_in_force())
    }

    /// Starts re-validating every stored value under the bundle in force, on a thread of
    /// its own. A purge that finds a newer bundle in force when it ends leaves the
    /// finishing to the purge of that bundle.
    fn spawn_purge(self: Arc<Self>) {
        let policy = self.policy();
        *self.purge.lock() = PurgeStatus {
            running: true,
            bundle_hash: policy.hash.clone(),
            ..PurgeStatus::default()
        };
        let spawned = std::thread::Builder::new()
            .name("policy-purge".to_string())
            .spawn(move || {
                if let Err(error) = self.run_purge(&policy) {
                    tracing::error!(%error, bundle = %policy.hash, "policy purge failed; values of earlier bundles stay withheld");
                    self.purge.lock().running = false;
                }
            });
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the policy purge thread");
        }
    }

    fn run_purge(&self, policy: &Arc<Policy>) -> Result<(), Error> {
        let mut from_user = 0;
        loop {
            let users = self
                .store
                .users_with_rows(from_user, PURGE_USERS_PER_SCAN)?;
            for &user_id in &users {
                if !Arc::ptr_eq(policy, &self.policy()) {
                    tracing::info!(bundle = %policy.hash, "a newer bundle is in force; this purge stops");
                    return Ok(());
                }
                let now = self.clock.now();
                let removed = self
                    .store
                    .revalidate_user(user_id, &mut |state, key, row| {
                        self.revalidate(policy, state, key, row, now)
                    })?;
                let mut status = self.purge.lock();
                status.users_done += 1;
                status.values_removed += removed as u64;
            }
            match users.last().and_then(|last| last.checked_add(1)) {
                Some(next) if users.len() == PURGE_USERS_PER_SCAN => from_user = next,
                _ => break,
            }
        }
        let mut in_force = self.policy.write();
        if !Arc::ptr_eq(policy, &in_force.policy) {
            return Ok(());
        }
        in_force.served_versions = vec![policy.hash_prefix];
        self.store
            .write_meta(VALIDATED_POLICY_KEY, policy.hash.as_bytes())?;
        let mut status = self.purge.lock();
        status.running = false;
        status.finished_at = Some(self.clock.now());
        tracing::info!(bundle = %policy.hash, users = status.users_done, removed = status.values_removed, "policy purge finished");
        Ok(())
    }

    /// The retention sweep: re-validates every user's rows (dropping expired values, and
    /// whatever the policy now forbids), then compacts the features so that the dropped
    /// bytes leave the files. Returns (users swept, values removed).
    pub fn sweep(&self) -> Result<(u64, u64), Error> {
        let policy = self.policy();
        let (mut users_swept, mut removed) = (0u64, 0u64);
        let mut from_user = 0;
        loop {
            let users = self
                .store
                .users_with_rows(from_user, PURGE_USERS_PER_SCAN)?;
            for &user_id in &users {
                removed += self.revalidate_user(user_id, &policy, "retention-sweep")? as u64;
                users_swept += 1;
            }
            match users.last().and_then(|last| last.checked_add(1)) {
                Some(next) if users.len() == PURGE_USERS_PER_SCAN => from_user = next,
                _ => break,
            }
        }
        self.store.compact_features()?;
        tracing::info!(users = users_swept, removed, "retention sweep finished");
        Ok((users_swept, removed))
    }

    /// Decides again which values of a stored row may stay under `policy` and the user's
    /// `state`: allowed values stay, re-stamped with the bundle and with their expiry
    /// clamped by its retention; refused and expired values go.
    pub fn revalidate(
        &self,
        policy: &Policy,
        state: Option<&UserState>,
        key: RowKey,
        mut row: StoredRow,
        now: Timestamp,
    ) -> StoredRow {
        let Some(surface) = self.registry.surface_by_id(key.surface) else {
            return StoredRow::default();
        };
        row.values.retain_mut(|value| {
            let (Some(source), Some(feature)) = (
                self.registry.source_by_id(value.source),
                self.registry.feature_by_id(value.feature),
            ) else {
                return false;
            };
            let topic = (!value.topic_id.is_empty()).then_some(value.topic_id.as_str());
            value.sensitivity = policy.value_sensitivity(feature.sensitivity, topic, &value.value);
            let facts = ValueFacts {
                source,
                interaction_time: value.event_time,
                microphone_permission: value.microphone_permission,
                origin_app: &value.origin_app,
                sensitivity: value.sensitivity,
                topic_confidence: value.topic_confidence,
            };
            let allowed = value.expires_at > now
                && policy
                    .decide(&policy.input(&facts, state, surface, now))
                    .is_empty();
            if allowed {
                value.policy_version = policy.hash_prefix;
                value.expires_at = value
                    .expires_at
                    .min(policy.retention_end(&facts, surface.purpose));
            }
            allowed
        });
        row
    }

    /// Creates or replaces a user's state; the user's stored values that the new state
    /// forbids are removed in the same atomic write.
    pub fn set_user_state(&self, update: &UserStateUpdate) -> Result<UserState, Error> {
        let policy = self.policy();
        let now = self.clock.now();
        let mut entry =
            self.audit_entry(AuditAction::UserStateSet, "privacy", Some(update.user_id));
        entry.bundle_hash.clone_from(&policy.hash);
        Ok(self.store.set_user_state(
            update,
            now,
            &mut |state, key, row| self.revalidate(&policy, state, key, row, now),
            &entry,
        )?)
    }

    /// A user's state.
    pub fn user_state(&self, user_id: u64) -> Result<UserState, Error> {
        self.store
            .read_user_states(&[user_id])?
            .pop()
            .flatten()
            .ok_or(Error::NoUserState { user_id })
    }
}

/// The secret key of audit pseudonyms: kept in the store, made at the first start from the
/// operating system's random source.
fn pseudonym_key(store: &dyn Store) -> Result<[u8; 32], Error> {
    if let Some(key) = store.read_meta(PSEUDONYM_KEY)? {
        return key.try_into().map_err(|_| {
            Error::Storage(crate::storage::StorageError::Corrupt(
                "the pseudonym key is not 32 bytes".to_string(),
            ))
        });
    }
    let mut key = [0u8; 32];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(Error::Random)?,
        &mut key,
    )
    .map_err(Error::Random)?;
    store.write_meta(PSEUDONYM_KEY, &key)?;
    Ok(key)
}
