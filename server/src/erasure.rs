//! The erasure ledger: one receipt per erasure, with the time each step finished. It is a
//! JSON Lines file kept outside the database, so that restoring a backup taken before an
//! erasure cannot roll it back: at start the server erases again every user of the ledger
//! whose data the database still holds.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

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

/// The append-only ledger and the latest state of each receipt.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    /// The file, appended to and synced on every change.
    file: Mutex<File>,
    /// Receipt id → its latest version.
    receipts: Mutex<HashMap<String, Receipt>>,
}

impl Ledger {
    /// Opens (creating when missing) the ledger at `path` and reads every receipt.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
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
        Ok(Ledger {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            receipts: Mutex::new(receipts),
        })
    }

    /// Records a receipt's new state durably.
    pub fn record(&self, receipt: &Receipt) -> Result<(), LedgerError> {
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

    pub fn receipt(&self, id: &str) -> Option<Receipt> {
        self.receipts.lock().get(id).cloned()
    }

    /// Every receipt, oldest request first.
    pub fn receipts(&self) -> Vec<Receipt> {
        let mut receipts: Vec<Receipt> = self.receipts.lock().values().cloned().collect();
        receipts.sort_by(|a, b| (a.requested_at, &a.id).cmp(&(b.requested_at, &b.id)));
        receipts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_survive_reopening_and_the_latest_version_wins() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("ledger.jsonl");
        let ledger = Ledger::open(&path).expect("open");
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
        let reopened = Ledger::open(&path).expect("reopen");
        assert_eq!(reopened.receipt("er-1"), Some(receipt));
        assert_eq!(reopened.receipts().len(), 1);
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
        let error = Ledger::open(&path).expect_err("damaged");
        assert!(error.to_string().contains("line 2"), "{error}");
    }
}
