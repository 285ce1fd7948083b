//! The feature store's domain core: the read and write paths over the registry, the policy
//! and the storage engine, and the re-validation of stored values when the policy or a
//! user's state changes. Functions here block (they call the engine) and run on the
//! blocking pool or a thread of their own.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use featurestore::domain::{Timestamp, UserStateUpdate};
use parking_lot::{Mutex, RwLock};

use crate::audit::{AuditAction, AuditEntry, Pseudonym, pseudonym};
use crate::clock::Clock;
use crate::config::BulkLoadConfig;
use crate::erasure::{Ledger, Receipt};
use crate::error::Error;
use crate::policy::{Policy, ValueFacts};
use crate::registry::Registry;
use crate::storage::{RowKey, Store, StoredRow, UserState};

mod bulk_loads;
mod engine;
#[cfg(test)]
mod model;
#[cfg(test)]
mod races;
mod read;
pub mod read_tally;
#[cfg(test)]
mod tests;
mod write;

pub use bulk_loads::{ChunkOutcome, LoadAttachment, PreparedChunk};

/// Meta key holding the hash of the bundle every stored value was last validated under.
const VALIDATED_POLICY_KEY: &str = "validated_policy_hash";
/// Users re-validated per storage scan of a purge.
const PURGE_USERS_PER_SCAN: usize = 1000;
/// Times an erasure deletes and verifies before it gives up (and stays pending, to run
/// again at the next start).
const ERASURE_ATTEMPTS: usize = 3;

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
    /// The thread of the latest purge, joined at shutdown.
    purge_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set at shutdown: purges and sweeps stop between two users.
    stopping: std::sync::atomic::AtomicBool,
    /// The storage engine; private, so that nothing goes around the domain's rules.
    store: Arc<dyn Store>,
    /// The source of "now" for expiry, retention and idempotency.
    pub clock: Arc<dyn Clock>,
    /// How long an idempotency key's answer is replayed.
    pub idempotency_window: Duration,
    /// How far past the clock an interaction time may be; later ones are refused.
    interaction_time_skew_allowance: Duration,
    /// Receipts of every erasure, kept outside the database.
    pub ledger: Ledger,
    /// Where backups are written.
    backup_dir: PathBuf,
    /// Bulk-load settings.
    bulk_load: BulkLoadConfig,
    /// Bulk-load jobs attached to a stream right now.
    attached_jobs: Mutex<std::collections::HashSet<String>>,
    /// Held while a staging file is written, so that an erasure's purge of staged rows
    /// never misses a chunk being made durable.
    staging_lock: Mutex<()>,
    /// Every change of a user's state (set, erasure) holds it shared; a bulk-load commit
    /// holds it exclusively while it checks the generations its rows were decided with
    /// and applies them, so that no state changes in between.
    state_gate: RwLock<()>,
    /// Counts user-state changes, so that a commit can tell whether any happened while
    /// it prepared its files.
    state_changes: std::sync::atomic::AtomicU64,
}

/// A store in `directory` with a small block cache, for the domain's tests.
#[cfg(test)]
fn test_store(
    directory: &std::path::Path,
    clock: Arc<crate::clock::ManualClock>,
) -> crate::storage::RocksStore {
    crate::storage::RocksStore::open(
        &directory.join("db"),
        &crate::config::StorageConfig {
            block_cache_bytes: 1 << 20,
            ..crate::config::StorageConfig::default()
        },
        crate::config::Durability::Buffered,
        Duration::from_secs(3600),
        clock,
    )
    .expect("open the store")
}

/// Settings of a [`Core`] beyond its parts.
#[derive(Clone, Debug)]
pub struct CoreOptions {
    /// Where a policy reload reads the bundle; `None` for the embedded default.
    pub policy_path: Option<PathBuf>,
    /// How long an idempotency key's answer is replayed.
    pub idempotency_window: Duration,
    /// How far past the clock an interaction time may be (producers' clocks run a little
    /// ahead); later ones are refused with INTERACTION_TIME_IN_FUTURE.
    pub interaction_time_skew_allowance: Duration,
    /// The erasure ledger file.
    pub ledger_path: PathBuf,
    /// Where backups are written.
    pub backup_dir: PathBuf,
    /// Bulk-load settings.
    pub bulk_load: BulkLoadConfig,
}

impl CoreOptions {
    /// The embedded default policy, a one-hour idempotency window, and the ledger,
    /// backups and bulk-load staging all kept under `directory`.
    pub fn under(directory: &std::path::Path) -> CoreOptions {
        CoreOptions {
            policy_path: None,
            idempotency_window: Duration::from_secs(3600),
            interaction_time_skew_allowance: crate::config::DEFAULT_INTERACTION_TIME_SKEW_ALLOWANCE,
            ledger_path: directory.join("erasures.jsonl"),
            backup_dir: directory.join("backups"),
            bulk_load: BulkLoadConfig {
                staging_dir: directory.join("staging"),
                ..BulkLoadConfig::default()
            },
        }
    }
}

impl Core {
    pub fn new(
        registry: Arc<Registry>,
        policy: Arc<Policy>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        options: CoreOptions,
    ) -> Result<Core, Error> {
        let in_force = PolicyInForce {
            served_versions: vec![policy.hash_prefix],
            policy,
            loaded_at: clock.now(),
        };
        let ledger =
            Ledger::open(&options.ledger_path).map_err(|error| Error::Ledger(error.to_string()))?;
        Ok(Core {
            registry,
            policy: RwLock::new(in_force),
            policy_path: options.policy_path,
            purge: Mutex::new(PurgeStatus::default()),
            purge_thread: Mutex::new(None),
            stopping: std::sync::atomic::AtomicBool::new(false),
            store,
            clock,
            idempotency_window: options.idempotency_window,
            interaction_time_skew_allowance: options.interaction_time_skew_allowance,
            ledger,
            backup_dir: options.backup_dir,
            bulk_load: options.bulk_load,
            attached_jobs: Mutex::new(std::collections::HashSet::new()),
            staging_lock: Mutex::new(()),
            state_gate: RwLock::new(()),
            state_changes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// A user's audit pseudonym; its key is created when missing if `create`. `None` for a
    /// user whose key does not exist (never audited, or erased).
    pub fn pseudonym(&self, user_id: u64, create: bool) -> Result<Option<Pseudonym>, Error> {
        Ok(self
            .store
            .pseudonym_key(user_id, create)?
            .map(|key| pseudonym(&key, user_id)))
    }

    /// An audit entry stamped with the current time and bundle.
    pub fn audit_entry(
        &self,
        action: AuditAction,
        caller: &str,
        user_id: Option<u64>,
    ) -> Result<AuditEntry, Error> {
        let user = match user_id {
            Some(user_id) => self.pseudonym(user_id, true)?,
            None => None,
        };
        Ok(AuditEntry {
            time: self.clock.now(),
            action,
            caller: caller.to_string(),
            bundle_hash: self.policy().hash.clone(),
            user,
            surfaces: String::new(),
            subject: String::new(),
            reasons: 0,
        })
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
            let mut entry = self.audit_entry(AuditAction::ValuesPurged, caller, Some(user_id))?;
            entry.bundle_hash.clone_from(&policy.hash);
            entry.subject = format!("{removed} values");
            self.store.append_audit(&[entry])?;
        }
        Ok(removed)
    }

    /// Erases a user: fences every later write, deletes every row in one range delete and
    /// destroys the pseudonym key (one atomic write), compacts the bytes out of the data
    /// files, and verifies that nothing is left. Each step is recorded in the ledger first.
    /// `caller` (the authenticated principal) is recorded in the audit log.
    pub fn erase_user(&self, user_id: u64, caller: &str) -> Result<Receipt, Error> {
        let mut id = [0u8; 8];
        getrandom::fill(&mut id)
            .map_err(|error| Error::Ledger(format!("no randomness for a receipt id: {error}")))?;
        let mut receipt = Receipt {
            id: format!(
                "er-{}",
                id.iter()
                    .map(|byte| format!("{byte:02x}"))
                    .collect::<String>()
            ),
            user_id,
            requested_at: self.clock.now().unix_micros(),
            ..Receipt::default()
        };
        self.record(&receipt)?;
        self.run_erasure(&mut receipt, caller)?;
        Ok(receipt)
    }

    /// The steps of an erasure, recording each in the receipt and the ledger. A
    /// verification that finds anything of the user left deletes again, up to
    /// [`ERASURE_ATTEMPTS`] times; past that the erasure fails, stays pending, and runs
    /// again at the next start.
    fn run_erasure(&self, receipt: &mut Receipt, caller: &str) -> Result<(), Error> {
        let user_id = receipt.user_id;
        let mut entry = self.audit_entry(AuditAction::UserErased, caller, Some(user_id))?;
        entry.subject.clone_from(&receipt.id);
        for attempt in 1..=ERASURE_ATTEMPTS {
            if attempt > 1 {
                receipt.reapplied_at.push(self.clock.now().unix_micros());
            }
            self.changing_user_state(|| {
                self.store
                    .erase_user(user_id, self.clock.now(), &entry)
                    .map_err(Error::from)
            })?;
            let now = self.clock.now().unix_micros();
            receipt.fenced_at = Some(now);
            receipt.deleted_at = Some(now);
            self.record(receipt)?;
            // Deleted, not yet verified: what reappears here must be found and deleted.
            fail::fail_point!("erasure-deleted");
            // An engine without files of its own to compact has nothing to rewrite.
            if let Some(maintenance) = self.store.maintenance() {
                maintenance.compact_user(user_id)?;
            }
            receipt.compacted_at = Some(self.clock.now().unix_micros());
            self.record(receipt)?;
            // Bulk loads still open hold their own copy of the user's staged rows.
            self.erase_staged_user(user_id)?;
            receipt.verified = !self.store.user_has_data(user_id)? && !self.staged_user(user_id)?;
            receipt.verified_at = Some(self.clock.now().unix_micros());
            if receipt.verified {
                self.changing_user_state(|| {
                    self.store.finish_erasure(user_id).map_err(Error::from)
                })?;
                return self.record(receipt);
            }
            tracing::error!(receipt = %receipt.id, attempt, "erasure verification found data left; deleting again");
            self.record(receipt)?;
        }
        Err(Error::ErasureUnverified {
            receipt: receipt.id.clone(),
            attempts: ERASURE_ATTEMPTS,
        })
    }

    fn record(&self, receipt: &Receipt) -> Result<(), Error> {
        self.ledger
            .record(receipt)
            .map_err(|error| Error::Ledger(error.to_string()))
    }

    /// An erasure's receipt.
    pub fn erasure_receipt(&self, id: &str) -> Result<Receipt, Error> {
        self.ledger
            .receipt(id)
            .ok_or_else(|| Error::NoReceipt { id: id.to_string() })
    }

    /// Erases again every user of the ledger whose data this database still holds, or
    /// whose erasure did not finish (a database restored from an older backup, or a crash
    /// during an erasure).
    fn reapply_erasures(&self) -> Result<(), Error> {
        let mut latest: std::collections::HashMap<u64, Receipt> = std::collections::HashMap::new();
        for receipt in self.ledger.receipts() {
            latest.insert(receipt.user_id, receipt);
        }
        for (user_id, mut receipt) in latest {
            let state = self.store.read_user_states(&[user_id])?.pop().flatten();
            let erased =
                state.is_some_and(|state| state.erasure == crate::storage::ErasureState::Erased);
            if erased && !self.store.user_has_data(user_id)? {
                continue;
            }
            tracing::warn!(receipt = %receipt.id, "the database holds a user the ledger says was erased; erasing again");
            receipt.reapplied_at.push(self.clock.now().unix_micros());
            self.run_erasure(&mut receipt, "erasure-ledger")?;
        }
        Ok(())
    }

    /// Writes a consistent backup of the database; returns its directory. `caller` is
    /// recorded in the audit log.
    pub fn backup(&self, caller: &str) -> Result<PathBuf, Error> {
        std::fs::create_dir_all(&self.backup_dir).map_err(|error| {
            Error::Backup(format!(
                "cannot create {}: {error}",
                self.backup_dir.display()
            ))
        })?;
        let directory = self
            .backup_dir
            .join(format!("backup-{}", self.clock.now().unix_micros()));
        self.maintenance()?.checkpoint(&directory)?;
        let mut entry = self.audit_entry(AuditAction::BackupCreated, caller, None)?;
        entry.subject = directory.display().to_string();
        self.store.append_audit(&[entry])?;
        Ok(directory)
    }

    /// Re-applies the erasure ledger, then checks that every stored value was validated
    /// under the bundle in force; when not (the server restarted with another bundle),
    /// starts a purge. Runs before the server serves.
    pub fn start(self: &Arc<Self>) -> Result<(), Error> {
        // Stands for a long recovery in the tests of what the server says meanwhile.
        fail::fail_point!("core-start");
        self.reapply_erasures()?;
        self.recover_loads()?;
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
    /// `caller` is recorded in the audit log.
    pub fn reload_policy(self: &Arc<Self>, caller: &str) -> Result<PolicyInForce, Error> {
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
        let mut entry = self.audit_entry(AuditAction::PolicyLoaded, caller, None)?;
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
                    self.purge.lock().running = false;
                }
            });
        match spawned {
            // An earlier purge stops by itself when it sees the newer bundle.
            Ok(thread) => drop(core.purge_thread.lock().replace(thread)),
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
            let mut status = self.purge.lock();
            status.users_done += 1;
            status.values_removed += removed as u64;
            Ok(true)
        })?;
        let mut in_force = self.policy.write();
        if superseded || !Arc::ptr_eq(policy, &in_force.policy) {
            tracing::info!(bundle = %policy.hash, "a newer bundle is in force; its purge finishes the work");
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

    /// Waits for the latest purge to finish.
    #[cfg(test)]
    pub(crate) fn join_purge(&self) {
        let purge = self.purge_thread.lock().take();
        if let Some(purge) = purge {
            purge.join().expect("the purge thread does not panic");
        }
    }

    /// Stops purges and sweeps between two users and waits for the latest purge thread;
    /// an unfinished purge runs again at the next start.
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let thread = self.purge_thread.lock().take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            tracing::error!("the policy purge thread panicked");
        }
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

    /// Creates or replaces a user's state; the user's stored values that the new state
    /// forbids are removed in the same atomic write.
    /// `caller` (the authenticated principal) is recorded in the audit log.
    /// Linked apps must be apps of the registry's surfaces (INVALID_ARGUMENT otherwise): a
    /// link the policy cannot place would never match, and a misspelt one would hide a
    /// link the user made.
    pub fn set_user_state(
        &self,
        update: &UserStateUpdate,
        caller: &str,
    ) -> Result<UserState, Error> {
        if let Some((index, app)) = update
            .linked_apps
            .iter()
            .enumerate()
            .find(|(_, app)| !self.registry.knows_app(app))
        {
            return Err(featurestore::InvalidRequest::new(
                format!("state.linked_apps[{index}]"),
                format!(
                    "{app:?} is not an app of a registered surface ({})",
                    self.registry.apps().join(", ")
                ),
            )
            .into());
        }
        let policy = self.policy();
        // A bundle reload here leaves this change re-stamping rows with the old bundle.
        fail::fail_point!("user-state-policy-taken");
        let now = self.clock.now();
        let mut entry =
            self.audit_entry(AuditAction::UserStateSet, caller, Some(update.user_id))?;
        entry.bundle_hash.clone_from(&policy.hash);
        let state = self.changing_user_state(|| {
            Ok(self.store.set_user_state(
                update,
                now,
                &mut |state, key, row| self.revalidate(&policy, state, key, row, now),
                &entry,
            )?)
        })?;
        // Rows it re-stamped under a bundle replaced meanwhile are judged by the new one.
        self.revalidate_if_policy_changed(&policy, [update.user_id])?;
        Ok(state)
    }

    /// Runs a change of user state under the state gate, and counts it.
    fn changing_user_state<T>(
        &self,
        change: impl FnOnce() -> Result<T, Error>,
    ) -> Result<T, Error> {
        let _gate = self.state_gate.read();
        let changed = change();
        // Counted after the change is written: a commit that read the counter before it
        // sees it move, whether or not its read of the states saw the change.
        self.state_changes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        changed
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
