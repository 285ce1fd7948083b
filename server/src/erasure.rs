//! The erasure ledger: one receipt per erasure, with the time each step finished. Beside
//! the embedded database it is a JSON Lines file kept outside the database, so that
//! restoring a backup taken before an erasure cannot roll it back: at start the server
//! erases again every user of the ledger whose data the database still holds. On a shared
//! engine (a Redis Cluster) it lives in the engine, replicated like the data, so that every
//! server sees every receipt and re-applies every erasure.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::storage::Store;

/// Where the store keeps a receipt: under this prefix and the receipt's id.
const RECEIPT_PREFIX: &str = "erasure-receipt/";

/// What happened to one erasure request. Times are microseconds since the epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub id: String,
    pub user_id: u64,
    pub requested_at: i64,
    /// The user's state became "erasure pending": every later write is refused.
    pub fenced_at: Option<i64>,
    /// Every row went in one range delete, and the pseudonym key was destroyed.
    pub deleted_at: Option<i64>,
    /// The user's ranges were flushed and compacted out of the data files.
    pub compacted_at: Option<i64>,
    /// The scan for anything left of the user finished.
    pub verified_at: Option<i64>,
    /// What the scan found: true when nothing was left.
    pub verified: bool,
    /// When the erasure was applied again: to a database restored from a backup or left
    /// by a crash mid-erasure, or because its verification found data left.
    #[serde(default)]
    pub reapplied_at: Vec<i64>,
}

/// Failures of the ledger file.
#[derive(Debug, thiserror::Error)]
#[error("erasure ledger {path}: {problem}")]
pub struct LedgerError {
    path: String,
    problem: String,
}

/// The ledger: receipts in a file of this server's, or in the store that every server shares.
#[derive(Debug)]
pub enum Ledger {
    File(FileLedger),
    InStore(std::sync::Arc<dyn Store>),
}

impl Ledger {
    /// Records a receipt's new state durably.
    pub fn record(&self, receipt: &Receipt) -> Result<(), LedgerError> {
        match self {
            Ledger::File(file) => file.record(receipt),
            Ledger::InStore(store) => {
                let json = serde_json::to_vec(receipt).map_err(|json| in_store(&json))?;
                store
                    .write_meta(&format!("{RECEIPT_PREFIX}{}", receipt.id), &json)
                    .map_err(|error| in_store(&error))
            }
        }
    }

    pub fn receipt(&self, id: &str) -> Result<Option<Receipt>, LedgerError> {
        match self {
            Ledger::File(file) => Ok(file.receipts.lock().get(id).cloned()),
            Ledger::InStore(store) => store
                .read_meta(&format!("{RECEIPT_PREFIX}{id}"))
                .map_err(|error| in_store(&error))?
                .map(|json| serde_json::from_slice(&json).map_err(|json| in_store(&json)))
                .transpose(),
        }
    }

    /// Every receipt, oldest request first.
    pub fn receipts(&self) -> Result<Vec<Receipt>, LedgerError> {
        let mut receipts: Vec<Receipt> = match self {
            Ledger::File(file) => file.receipts.lock().values().cloned().collect(),
            Ledger::InStore(store) => store
                .meta_with_prefix(RECEIPT_PREFIX)
                .map_err(|error| in_store(&error))?
                .into_iter()
                .map(|(_, json)| serde_json::from_slice(&json).map_err(|json| in_store(&json)))
                .collect::<Result<_, _>>()?,
        };
        receipts.sort_by(|a, b| (a.requested_at, &a.id).cmp(&(b.requested_at, &b.id)));
        Ok(receipts)
    }
}

fn in_store(problem: &dyn std::fmt::Display) -> LedgerError {
    LedgerError {
        path: "in the store".to_string(),
        problem: problem.to_string(),
    }
}

/// The append-only ledger file and the latest state of each receipt.
#[derive(Debug)]
pub struct FileLedger {
    path: PathBuf,
    /// The file, appended to and synced on every change.
    file: Mutex<File>,
    /// Receipt id → its latest version.
    receipts: Mutex<HashMap<String, Receipt>>,
}

impl FileLedger {
    /// Opens (creating when missing) the ledger at `path` and reads every receipt.
    pub fn open(path: &Path) -> Result<FileLedger, LedgerError> {
        let error = |problem: String| LedgerError {
            path: path.display().to_string(),
            problem,
        };
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|io| error(io.to_string()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(|io| error(io.to_string()))?;
        let mut receipts = HashMap::new();
        for (number, line) in BufReader::new(&file).lines().enumerate() {
            let line = line.map_err(|io| error(io.to_string()))?;
            if line.trim().is_empty() {
                continue;
            }
            let receipt: Receipt = serde_json::from_str(&line)
                .map_err(|parse| error(format!("line {}: {parse}", number + 1)))?;
            receipts.insert(receipt.id.clone(), receipt);
        }
        Ok(FileLedger {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            receipts: Mutex::new(receipts),
        })
    }

    /// Records a receipt's new state durably.
    fn record(&self, receipt: &Receipt) -> Result<(), LedgerError> {
        let error = |problem: String| LedgerError {
            path: self.path.display().to_string(),
            problem,
        };
        let mut line = serde_json::to_string(receipt).map_err(|json| error(json.to_string()))?;
        line.push('\n');
        {
            let mut file = self.file.lock();
            file.write_all(line.as_bytes())
                .map_err(|io| error(io.to_string()))?;
            file.sync_data().map_err(|io| error(io.to_string()))?;
        }
        self.receipts
            .lock()
            .insert(receipt.id.clone(), receipt.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_survive_reopening_and_the_latest_version_wins() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("ledger.jsonl");
        let ledger = Ledger::File(FileLedger::open(&path).expect("open"));
        let mut receipt = Receipt {
            id: "er-1".to_string(),
            user_id: 7,
            requested_at: 10,
            ..Receipt::default()
        };
        ledger.record(&receipt).expect("record");
        receipt.verified = true;
        receipt.verified_at = Some(20);
        ledger.record(&receipt).expect("record");
        drop(ledger);
        let reopened = Ledger::File(FileLedger::open(&path).expect("reopen"));
        assert_eq!(reopened.receipt("er-1").expect("read"), Some(receipt));
        assert_eq!(reopened.receipts().expect("read").len(), 1);
    }

    #[test]
    fn a_damaged_ledger_is_refused_naming_the_line() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("ledger.jsonl");
        std::fs::write(
            &path,
            "{\"id\":\"er-1\",\"user_id\":7,\"requested_at\":1,\"verified\":false}\nnot json\n",
        )
        .expect("write");
        let error = FileLedger::open(&path).expect_err("damaged");
        assert!(error.to_string().contains("line 2"), "{error}");
    }
}
