//! What the rest of the server asks of the storage engine, through the core: the engine's
//! figures, the audit log, the health probe, durability at shutdown. The store itself is
//! private to the core, so that nothing goes around the domain's rules; what an engine
//! does not offer is answered with [`Error::Unsupported`].

use std::path::PathBuf;

use crate::audit::{AuditAction, AuditRecord, AuditReport, Pseudonym};
use crate::error::Error;
use crate::storage::{BulkFiles, Census, EngineFigures, EngineStats, Maintenance, StorageError};

use super::Core;

/// The `meta` key this process's storage probe writes: its own, so that servers sharing a
/// store never read each other's probe back.
fn probe_key() -> &'static str {
    static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let mut id = [0u8; 8];
        // Without randomness the probe falls back on the process id, unique on one machine.
        let id = match getrandom::fill(&mut id) {
            Ok(()) => u64::from_le_bytes(id),
            Err(_) => u64::from(std::process::id()),
        };
        format!("health-probe/{id:016x}")
    })
}

impl Core {
    /// The engine's bulk ingestion of table files.
    pub(super) fn bulk_files(&self) -> Result<&dyn BulkFiles, Error> {
        self.store.bulk_files().ok_or(Error::Unsupported {
            capability: "bulk loads of table files",
        })
    }

    /// The engine's checkpoints, flushes and compaction.
    pub(super) fn maintenance(&self) -> Result<&dyn Maintenance, Error> {
        self.store.maintenance().ok_or(Error::Unsupported {
            capability: "checkpoints and compaction",
        })
    }

    fn engine_stats(&self) -> Result<&dyn EngineStats, Error> {
        self.store.engine_stats().ok_or(Error::Unsupported {
            capability: "engine figures",
        })
    }

    /// The engine's own figures; an engine without any reports zeros.
    pub fn engine_figures(&self) -> Result<EngineFigures, Error> {
        match self.store.engine_stats() {
            Some(stats) => Ok(stats.engine_figures()?),
            None => Ok(EngineFigures::default()),
        }
    }

    /// Rows and bytes per surface, counted when at most `rows_max`, else estimated.
    pub fn census(&self, rows_max: usize) -> Result<Census, Error> {
        Ok(self.engine_stats()?.census(rows_max)?)
    }

    /// Checks every chain of the audit log.
    pub fn verify_audit(&self) -> Result<AuditReport, Error> {
        Ok(self.store.verify_audit()?)
    }

    /// The audit records of one user, oldest first, at most `limit`.
    pub fn audit_trail(
        &self,
        user_id: u64,
        user: &Pseudonym,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, Error> {
        Ok(self.store.audit_trail(user_id, user, limit)?)
    }

    /// Makes everything written so far durable in the engine's files (a no-op for an
    /// engine without maintenance: it acknowledges only what is durable).
    pub fn flush(&self) -> Result<(), Error> {
        match self.store.maintenance() {
            Some(maintenance) => Ok(maintenance.flush()?),
            None => Ok(()),
        }
    }

    /// Flushes and compacts the features fully, so that bytes of deleted or rewritten
    /// rows leave the engine's files.
    pub fn compact(&self) -> Result<(), Error> {
        Ok(self.maintenance()?.compact_features()?)
    }

    /// The health probe: a small write of the clock's time and its read-back.
    pub fn probe_storage(&self) -> Result<(), Error> {
        let stamp = self.clock.now().unix_micros().to_le_bytes();
        self.store.write_meta(probe_key(), &stamp)?;
        match self.store.read_meta(probe_key())? {
            Some(read) if read == stamp => Ok(()),
            _ => Err(StorageError::Engine(
                "the health probe did not read back what it wrote".to_string(),
            )
            .into()),
        }
    }

    /// Removes this process's probe key, as the server stops.
    pub(super) fn forget_probe(&self) {
        if let Err(error) = self.store.delete_meta(probe_key()) {
            tracing::warn!(%error, "the storage probe's key was not removed");
        }
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
}
