//! The policy in force: its reload (by call or SIGHUP), the purge that re-validates every
//! stored value after a bundle change, the retention sweep, and the re-validation of one
//! user's rows under the user's lock.

use std::path::PathBuf;
use std::sync::Arc;

use featurestore::domain::Timestamp;
use parking_lot::{Mutex, RwLock};

use super::Core;
use crate::audit::AuditAction;
use crate::error::Error;
use crate::policy::{Policy, ValueFacts};
use crate::storage::{RowKey, StoredRow, UserState};

/// Meta key holding the hash of the bundle every stored value was last validated under.
pub(super) const VALIDATED_POLICY_KEY: &str = "validated_policy_hash";
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

/// The policy's part of the core.
#[derive(Debug)]
pub(super) struct PolicyState {
    /// The policy bundle in force. Each request takes it once, so a reload never changes
    /// the policy under a request in flight.
    in_force: RwLock<PolicyInForce>,
    /// Where a reload reads the bundle from; `None` for the embedded default.
    path: Option<PathBuf>,
    /// The latest purge's progress.
    purge: Mutex<PurgeStatus>,
    /// The thread of the latest purge, joined at shutdown.
    purge_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl PolicyState {
    pub(super) fn new(policy: Arc<Policy>, path: Option<PathBuf>, now: Timestamp) -> PolicyState {
        PolicyState {
            in_force: RwLock::new(PolicyInForce {
                served_versions: vec![policy.hash_prefix],
                policy,
                loaded_at: now,
            }),
            path,
            purge: Mutex::new(PurgeStatus::default()),
            purge_thread: Mutex::new(None),
        }
    }
}

impl Core {
    /// Re-validates one user's rows under the bundle in force, auditing what goes.
    pub(super) fn revalidate_user(
        &self,
        user_id: u64,
        policy: &Policy,
        caller: &str,
    ) -> Result<usize, Error> {
        let now = self.clock.now();
        let removed = self
            .store
            .revalidate_user(user_id, &mut |state, key, row| {
                self.revalidate(policy, state, key, row, now)
            })?;
        if removed > 0 {
            let mut entry = self.audit_entry(AuditAction::ValuesPurged, caller, Some(user_id))?;
            entry.bundle_hash.clone_from(&policy.hash);
            entry.subject = format!("{removed} values");
            self.store.append_audit(&[entry])?;
        }
        Ok(removed)
    }

    /// The policy bundle in force now.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.in_force.read().policy)
    }

    /// The policy in force and the bundle versions the read path serves.
    pub fn policy_in_force(&self) -> PolicyInForce {
        self.policy.in_force.read().clone()
    }

    pub fn purge_status(&self) -> PurgeStatus {
        self.policy.purge.lock().clone()
    }

    /// Loads the bundle again from where it came from. An invalid bundle is refused and the
    /// old one stays in force. A different bundle is swapped in atomically (requests in
    /// flight finish on the old one) and a purge re-validates every stored value.
    /// `caller` is recorded in the audit log.
    pub fn reload_policy(self: &Arc<Self>, caller: &str) -> Result<PolicyInForce, Error> {
        let new = match &self.policy.path {
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
            let mut in_force = self.policy.in_force.write();
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
        let mut entry = self.audit_entry(AuditAction::PolicyLoaded, caller, None)?;
        entry.subject.clone_from(&new.version);
        self.store.append_audit(&[entry])?;
        Arc::clone(self).spawn_purge();
        Ok(self.policy_in_force())
    }

    /// Starts re-validating every stored value under the bundle in force, on a thread of
    /// its own. A purge that finds a newer bundle in force when it ends leaves the
    /// finishing to the purge of that bundle.
    pub(super) fn spawn_purge(self: Arc<Self>) {
        let policy = self.policy();
        *self.policy.purge.lock() = PurgeStatus {
            running: true,
            bundle_hash: policy.hash.clone(),
            ..PurgeStatus::default()
        };
        let core = Arc::clone(&self);
        let spawned = std::thread::Builder::new()
            .name("policy-purge".to_string())
            .spawn(move || match self.run_purge(&policy) {
                Ok(()) => {}
                Err(Error::Stopping) => {
                    tracing::info!(bundle = %policy.hash, "policy purge interrupted by shutdown; it runs again at start");
                }
                Err(error) => {
                    tracing::error!(%error, bundle = %policy.hash, "policy purge failed; values of earlier bundles stay withheld");
                    self.policy.purge.lock().running = false;
                }
            });
        match spawned {
            // An earlier purge stops by itself when it sees the newer bundle.
            Ok(thread) => drop(core.policy.purge_thread.lock().replace(thread)),
            Err(error) => tracing::error!(%error, "cannot start the policy purge thread"),
        }
    }

    fn run_purge(&self, policy: &Arc<Policy>) -> Result<(), Error> {
        let mut superseded = false;
        self.for_each_user_with_rows(|user_id| {
            if !Arc::ptr_eq(policy, &self.policy()) {
                superseded = true;
                return Ok(false);
            }
            let removed = self.revalidate_user(user_id, policy, "policy-purge")?;
            let mut status = self.policy.purge.lock();
            status.users_done += 1;
            status.values_removed += removed as u64;
            Ok(true)
        })?;
        let mut in_force = self.policy.in_force.write();
        if superseded || !Arc::ptr_eq(policy, &in_force.policy) {
            tracing::info!(bundle = %policy.hash, "a newer bundle is in force; its purge finishes the work");
            return Ok(());
        }
        in_force.served_versions = vec![policy.hash_prefix];
        self.store
            .write_meta(VALIDATED_POLICY_KEY, policy.hash.as_bytes())?;
        let mut status = self.policy.purge.lock();
        status.running = false;
        status.finished_at = Some(self.clock.now());
        tracing::info!(bundle = %policy.hash, users = status.users_done, removed = status.values_removed, "policy purge finished");
        Ok(())
    }

    /// The retention sweep: re-validates every user's rows (dropping expired values, and
    /// whatever the policy now forbids), then compacts the features so that the dropped
    /// bytes leave the files. Returns (users swept, values removed).
    pub fn sweep(&self) -> Result<(u64, u64), Error> {
        self.expire_loads()?;
        let policy = self.policy();
        let (mut users_swept, mut removed) = (0u64, 0u64);
        self.for_each_user_with_rows(|user_id| {
            removed += self.revalidate_user(user_id, &policy, "retention-sweep")? as u64;
            users_swept += 1;
            Ok(true)
        })?;
        if let Some(maintenance) = self.store.maintenance() {
            maintenance.compact_features()?;
        }
        tracing::info!(users = users_swept, removed, "retention sweep finished");
        Ok((users_swept, removed))
    }

    /// Waits for the latest purge's thread to end; false if it panicked.
    pub(super) fn join_purge(&self) -> bool {
        let purge = self.policy.purge_thread.lock().take();
        purge.is_none_or(|purge| purge.join().is_ok())
    }

    /// Calls `visit` for every user that has rows, in user order, until it returns false
    /// or the server stops (then [`Error::Stopping`]).
    fn for_each_user_with_rows(
        &self,
        mut visit: impl FnMut(u64) -> Result<bool, Error>,
    ) -> Result<(), Error> {
        let mut from_user = 0;
        loop {
            let users = self
                .store
                .users_with_rows(from_user, PURGE_USERS_PER_SCAN)?;
            for &user_id in &users {
                if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(Error::Stopping);
                }
                if !visit(user_id)? {
                    return Ok(());
                }
            }
            match users.last().and_then(|last| last.checked_add(1)) {
                Some(next) if users.len() == PURGE_USERS_PER_SCAN => from_user = next,
                _ => return Ok(()),
            }
        }
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
            let class = policy.classify(feature, topic, &value.value);
            value.sensitivity = class.sensitivity;
            let facts = ValueFacts {
                source,
                interaction_time: value.event_time,
                microphone_permission: value.microphone_permission,
                origin_app: &value.origin_app,
                sensitivity: value.sensitivity,
                topic_value: class.is_topic_value,
                topic_confidence: value.topic_confidence,
            };
            // Judged as a new write would be: what cannot be placed goes too.
            let allowed = value.expires_at > now
                && class.canonical
                && self
                    .unplaceable(&value.origin_app, value.event_time, now)
                    .is_empty()
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
}
