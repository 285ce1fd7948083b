//! Users' states and erasures: a state change re-validates the user's rows in the same
//! step; an erasure fences, deletes, compacts, verifies and records each step in the
//! ledger, and is re-applied at start when the database still holds the user.

use featurestore::domain::UserStateUpdate;

use super::Core;
use crate::audit::AuditAction;
use crate::erasure::{Ledger, Receipt};
use crate::error::Error;
use crate::storage::UserState;

/// Times an erasure deletes and verifies before it gives up (and stays pending, to run
/// again at the next start).
const ERASURE_ATTEMPTS: usize = 3;

/// The privacy part of the core.
#[derive(Debug)]
pub(super) struct PrivacyState {
    /// Receipts of every erasure: in a file outside the embedded database, or in a shared
    /// engine.
    ledger: Ledger,
}

impl PrivacyState {
    pub(super) fn new(ledger: Ledger) -> PrivacyState {
        PrivacyState { ledger }
    }
}

impl Core {
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
            self.store.erase_user(user_id, self.clock.now(), &entry)?;
            let now = self.clock.now().unix_micros();
            receipt.fenced_at = Some(now);
            receipt.deleted_at = Some(now);
            self.record(receipt)?;
            // Deleted, not yet verified: what reappears here must be found and deleted.
            fail::fail_point!("erasure-deleted");
            // An engine whose files keep no deleted bytes has nothing to rewrite.
            if let Some(files) = self.store.user_files() {
                let rewritten = files.rewrite_user_files(user_id)?;
                tracing::info!(receipt = %receipt.id, %rewritten, "erased user's files rewritten");
            }
            receipt.compacted_at = Some(self.clock.now().unix_micros());
            self.record(receipt)?;
            // Bulk loads still open hold their own copy of the user's staged rows.
            self.erase_staged_user(user_id)?;
            receipt.verified = !self.store.user_has_data(user_id)? && !self.staged_user(user_id)?;
            receipt.verified_at = Some(self.clock.now().unix_micros());
            if receipt.verified {
                self.store.finish_erasure(user_id)?;
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
        self.privacy
            .ledger
            .record(receipt)
            .map_err(|error| Error::Ledger(error.to_string()))
    }

    /// An erasure's receipt.
    pub fn erasure_receipt(&self, id: &str) -> Result<Receipt, Error> {
        self.privacy
            .ledger
            .receipt(id)
            .map_err(|error| Error::Ledger(error.to_string()))?
            .ok_or_else(|| Error::NoReceipt { id: id.to_string() })
    }

    /// Erases again every user of the ledger whose data this database still holds, or
    /// whose erasure did not finish (a database restored from an older backup, or a crash
    /// during an erasure).
    pub(super) fn reapply_erasures(&self) -> Result<(), Error> {
        let mut latest: std::collections::HashMap<u64, Receipt> = std::collections::HashMap::new();
        let receipts = self
            .privacy
            .ledger
            .receipts()
            .map_err(|error| Error::Ledger(error.to_string()))?;
        for receipt in receipts {
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
        let state = self.store.set_user_state(
            update,
            now,
            &mut |state, key, row| self.revalidate(&policy, state, key, row, now),
            &entry,
        )?;
        // Rows it re-stamped under a bundle replaced meanwhile are judged by the new one.
        self.revalidate_if_policy_changed(&policy, [update.user_id])?;
        Ok(state)
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
