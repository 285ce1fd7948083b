//! Bulk loads: the record of a job, the summary of what its rows became, and the staging
//! files that hold a job's admitted rows until its commit.
//!
//! Each durable chunk is one staging file: a header, the users of the chunk with the
//! user-state generation their rows were decided with, then the chunk's storage rows
//! (encoded merge operands) sorted by key, and a CRC32 of everything before it. A commit
//! merges the chunk files in key order ([`MergedRows`]), leaving out the rows of users
//! whose state changed since their chunk was decided, into the table files it ingests.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use featurestore::proto::ReasonCode;
use serde::{Deserialize, Serialize};

use crate::storage::RowKey;
use crate::storage::codec::merge_operands;
use crate::storage::keys::{ROW_KEY_LEN, decode_row_key, encode_row_key};

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Open,
    Committing,
    Committed,
    Aborted,
}

/// Counts of what a load's rows became.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub rows_received: u64,
    pub rows_accepted: u64,
    pub rows_transformed: u64,
    pub rows_denied: u64,
    pub rows_invalid: u64,
    pub values_admitted: u64,
    pub values_refused: u64,
    /// Reason code → (rows it refused something in, values it refused).
    pub reasons: BTreeMap<i32, (u64, u64)>,
}

impl Summary {
    pub fn add(&mut self, other: &Summary) {
        self.rows_received += other.rows_received;
        self.rows_accepted += other.rows_accepted;
        self.rows_transformed += other.rows_transformed;
        self.rows_denied += other.rows_denied;
        self.rows_invalid += other.rows_invalid;
        self.values_admitted += other.values_admitted;
        self.values_refused += other.values_refused;
        for (reason, (rows, values)) in &other.reasons {
            let counts = self.reasons.entry(*reason).or_default();
            counts.0 += rows;
            counts.1 += values;
        }
    }

    /// Counts a reason refusing `values` values in one row.
    pub fn count_reason(&mut self, reason: ReasonCode, values: u64) {
        let counts = self.reasons.entry(reason as i32).or_default();
        counts.0 += 1;
        counts.1 += values;
    }

    /// Moves the rows of a user refused at commit (erased, or state changed since the
    /// chunk) from the admitted counts to the refused ones.
    pub fn refuse_at_commit(&mut self, user: &StagedUser, reason: ReasonCode) {
        let rows = u64::from(user.rows_accepted) + u64::from(user.rows_transformed);
        self.rows_accepted -= u64::from(user.rows_accepted);
        self.rows_transformed -= u64::from(user.rows_transformed);
        self.rows_denied += rows;
        self.values_admitted -= user.values;
        self.values_refused += user.values;
        let counts = self.reasons.entry(reason as i32).or_default();
        counts.0 += rows;
        counts.1 += user.values;
    }
}

/// The durable record of a job, kept in the database's metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    pub state: JobState,
    pub source_fingerprint: String,
    /// Highest durable chunk (0: none).
    pub last_durable_chunk: u64,
    pub summary: Summary,
    pub created_at: i64,
    pub updated_at: i64,
    pub committed_at: i64,
    pub files_ingested: u32,
    /// Hash prefixes of the policy bundles the chunks were decided under.
    pub policy_versions: Vec<u64>,
}

/// Metadata key prefix of job records.
pub const JOB_KEY_PREFIX: &str = "load-job/";

pub fn job_key(job_id: &str) -> String {
    format!("{JOB_KEY_PREFIX}{job_id}")
}

/// Longest job id, in bytes.
pub const JOB_ID_BYTES_MAX: usize = 128;
/// Longest source fingerprint, in bytes.
pub const FINGERPRINT_BYTES_MAX: usize = 1024;

/// Why a job id is not acceptable, if it is not. Job ids name staging directories, so
/// only letters, digits, '.', '_' and '-' are allowed, and not "." or "..".
pub fn job_id_problem(job_id: &str) -> Option<String> {
    if job_id.is_empty() || job_id.len() > JOB_ID_BYTES_MAX {
        return Some(format!("must be 1 to {JOB_ID_BYTES_MAX} bytes"));
    }
    if job_id == "." || job_id == ".." {
        return Some("must not be \".\" or \"..\"".to_string());
    }
    if !job_id
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
    {
        return Some("may hold only letters, digits, '.', '_' and '-'".to_string());
    }
    None
}

/// A user of a staged chunk: the generation its rows were decided with, and what they
/// counted as, so that a commit refusing them can correct the summary exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagedUser {
    pub user_id: u64,
    pub generation: u64,
    pub rows_accepted: u32,
    pub rows_transformed: u32,
    pub values: u64,
}

/// One storage row of a chunk: its key and the encoded merge operand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedRow {
    pub key: RowKey,
    pub operand: Vec<u8>,
}

const MAGIC: &[u8; 8] = b"FSLOAD01";
const USER_LEN: usize = 32;

/// The staging file of chunk `sequence` in `directory`.
pub fn chunk_path(directory: &Path, sequence: u64) -> PathBuf {
    directory.join(format!("chunk-{sequence:010}.stage"))
}

/// Writes a chunk's staging file durably: to a temporary name, synced, renamed, and the
/// directory synced. `users` must be sorted by user id, `rows` by key, keys unique.
pub fn write_chunk(path: &Path, users: &[StagedUser], rows: &[StagedRow]) -> io::Result<()> {
    let temporary = path.with_extension("partial");
    let file = File::create(&temporary)?;
    let mut writer = CrcWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hasher: crc32fast::Hasher::new(),
    };
    writer.write_all(MAGIC)?;
    writer.write_all(&(users.len() as u64).to_le_bytes())?;
    for user in users {
        writer.write_all(&user.user_id.to_le_bytes())?;
        writer.write_all(&user.generation.to_le_bytes())?;
        writer.write_all(&user.rows_accepted.to_le_bytes())?;
        writer.write_all(&user.rows_transformed.to_le_bytes())?;
        writer.write_all(&user.values.to_le_bytes())?;
    }
    writer.write_all(&(rows.len() as u64).to_le_bytes())?;
    for row in rows {
        writer.write_all(&encode_row_key(row.key))?;
        let len = u32::try_from(row.operand.len())
            .map_err(|_| io::Error::other("a staged row over 4 GiB"))?;
        writer.write_all(&len.to_le_bytes())?;
        writer.write_all(&row.operand)?;
    }
    let checksum = writer.hasher.clone().finalize();
    let mut inner = writer.inner;
    inner.write_all(&checksum.to_le_bytes())?;
    let file = inner.into_inner().map_err(|error| error.into_error())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    sync_directory(path.parent().unwrap_or(Path::new(".")))
}

/// Makes the entries of `directory` (creations, renames, removals) durable.
pub fn sync_directory(directory: &Path) -> io::Result<()> {
    File::open(directory)?.sync_all()
}

struct CrcWriter<W> {
    inner: W,
    hasher: crc32fast::Hasher,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(bytes)?;
        self.hasher.update(&bytes[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn corrupt(path: &Path, problem: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("staging file {} is damaged: {problem}", path.display()),
    )
}

/// Reads a staging file from its start, hashing what it reads.
#[derive(Debug)]
struct ChunkFile {
    path: PathBuf,
    reader: BufReader<File>,
    hasher: crc32fast::Hasher,
}

impl ChunkFile {
    fn open(path: &Path) -> io::Result<ChunkFile> {
        let mut file = ChunkFile {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(256 * 1024, File::open(path)?),
            hasher: crc32fast::Hasher::new(),
        };
        let magic: [u8; 8] = file.array()?;
        if &magic != MAGIC {
            return Err(corrupt(path, "not a staging file"));
        }
        Ok(file)
    }

    fn array<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut bytes = [0u8; N];
        self.reader
            .read_exact(&mut bytes)
            .map_err(|error| match error.kind() {
                io::ErrorKind::UnexpectedEof => corrupt(&self.path, "truncated"),
                _ => error,
            })?;
        self.hasher.update(&bytes);
        Ok(bytes)
    }

    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn users(&mut self) -> io::Result<Vec<StagedUser>> {
        let count = self.u64()?;
        let mut users = Vec::with_capacity(usize::try_from(count.min(1 << 20)).unwrap_or(0));
        for _ in 0..count {
            let bytes: [u8; USER_LEN] = self.array()?;
            let field = |range: std::ops::Range<usize>| &bytes[range];
            users.push(StagedUser {
                user_id: u64::from_le_bytes(field(0..8).try_into().expect("8 bytes")),
                generation: u64::from_le_bytes(field(8..16).try_into().expect("8 bytes")),
                rows_accepted: u32::from_le_bytes(field(16..20).try_into().expect("4 bytes")),
                rows_transformed: u32::from_le_bytes(field(20..24).try_into().expect("4 bytes")),
                values: u64::from_le_bytes(field(24..32).try_into().expect("8 bytes")),
            });
        }
        Ok(users)
    }

    fn row(&mut self) -> io::Result<StagedRow> {
        let key: [u8; ROW_KEY_LEN] = self.array()?;
        let key = decode_row_key(&key).expect("every 10-byte string is a row key");
        let len = u32::from_le_bytes(self.array()?) as usize;
        let mut operand = vec![0u8; len];
        self.reader
            .read_exact(&mut operand)
            .map_err(|_| corrupt(&self.path, "truncated"))?;
        self.hasher.update(&operand);
        Ok(StagedRow { key, operand })
    }

    /// Reads the trailing checksum and compares it with what was read.
    fn finish(&mut self) -> io::Result<()> {
        let expected = self.hasher.clone().finalize();
        let mut stored = [0u8; 4];
        self.reader
            .read_exact(&mut stored)
            .map_err(|_| corrupt(&self.path, "truncated"))?;
        if u32::from_le_bytes(stored) != expected {
            return Err(corrupt(&self.path, "checksum mismatch"));
        }
        let mut rest = [0u8; 1];
        if self.reader.read(&mut rest)? != 0 {
            return Err(corrupt(&self.path, "bytes after the checksum"));
        }
        Ok(())
    }
}

/// The users section of a staging file, and how many rows follow it.
pub fn read_users(path: &Path) -> io::Result<(Vec<StagedUser>, u64)> {
    let mut file = ChunkFile::open(path)?;
    let users = file.users()?;
    Ok((users, file.u64()?))
}

/// The rows of a staging file, in key order, checksum verified when the last is read.
#[derive(Debug)]
struct ChunkRows {
    file: ChunkFile,
    remaining: u64,
    /// Users of this chunk whose rows are left out.
    refused: HashSet<u64>,
}

impl ChunkRows {
    fn open(path: &Path, refused: HashSet<u64>) -> io::Result<ChunkRows> {
        let mut file = ChunkFile::open(path)?;
        file.users()?;
        let remaining = file.u64()?;
        Ok(ChunkRows {
            file,
            remaining,
            refused,
        })
    }

    /// The next row not left out, or `None` at the end (after checking the checksum).
    fn next_row(&mut self) -> io::Result<Option<StagedRow>> {
        while self.remaining > 0 {
            self.remaining -= 1;
            let row = self.file.row()?;
            if !self.refused.contains(&row.key.user_id) {
                return Ok(Some(row));
            }
        }
        self.file.finish()?;
        Ok(None)
    }
}

/// The rows of several chunks merged in key order: rows of the same key from different
/// chunks are combined with the last-writer-wins merge, so each key comes out once.
#[derive(Debug)]
pub struct MergedRows {
    chunks: Vec<ChunkRows>,
    /// The next row of each chunk, smallest key first; ties by chunk index.
    heads: BinaryHeap<Reverse<(RowKey, usize)>>,
    pending: Vec<Option<StagedRow>>,
}

impl MergedRows {
    /// Opens every chunk file; `refused[i]` lists the users left out of chunk `i`.
    pub fn open(paths: &[PathBuf], refused: Vec<HashSet<u64>>) -> io::Result<MergedRows> {
        let mut chunks = Vec::with_capacity(paths.len());
        for (path, refused) in paths.iter().zip(refused) {
            chunks.push(ChunkRows::open(path, refused)?);
        }
        let mut merged = MergedRows {
            heads: BinaryHeap::with_capacity(chunks.len()),
            pending: vec![None; chunks.len()],
            chunks,
        };
        for index in 0..merged.chunks.len() {
            merged.advance(index)?;
        }
        Ok(merged)
    }

    fn advance(&mut self, index: usize) -> io::Result<()> {
        if let Some(row) = self.chunks[index].next_row()? {
            self.heads.push(Reverse((row.key, index)));
            self.pending[index] = Some(row);
        }
        Ok(())
    }

    /// The next key and its combined operand, or `None` when every chunk is done.
    pub fn next_row(&mut self) -> io::Result<Option<StagedRow>> {
        let Some(Reverse((key, index))) = self.heads.pop() else {
            return Ok(None);
        };
        let first = self.pending[index].take().expect("a head has its row");
        self.advance(index)?;
        let mut same_key = Vec::new();
        while let Some(Reverse((next_key, next_index))) = self.heads.peek().copied() {
            if next_key != key {
                break;
            }
            self.heads.pop();
            same_key.push(self.pending[next_index].take().expect("a head has its row"));
            self.advance(next_index)?;
        }
        if same_key.is_empty() {
            return Ok(Some(first));
        }
        let operands = std::iter::once(first.operand.as_slice())
            .chain(same_key.iter().map(|row| row.operand.as_slice()));
        let operand = merge_operands(operands).map_err(|error| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("staged rows of one key do not merge: {error}"),
            )
        })?;
        Ok(Some(StagedRow { key, operand }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{FeatureId, Sensitivity, SourceId, SurfaceId};
    use crate::storage::codec::{decode_row, encode_row};
    use crate::storage::{StoredRow, StoredValue};
    use featurestore::domain::{Timestamp, Value};

    fn value(feature: u16, event_time: i64, number: f32) -> StoredValue {
        StoredValue {
            feature: FeatureId(feature),
            event_time: Timestamp::from_unix_micros(event_time),
            write_time: Timestamp::from_unix_micros(event_time),
            expires_at: Timestamp::from_unix_micros(i64::MAX),
            source: SourceId(1),
            sensitivity: Sensitivity::None,
            policy_version: 7,
            origin_app: "facebook".to_string(),
            topic_id: String::new(),
            microphone_permission: false,
            topic_confidence: None,
            value: Value::Float(number),
        }
    }

    fn row(user_id: u64, surface: u16, values: Vec<StoredValue>) -> StagedRow {
        StagedRow {
            key: RowKey {
                user_id,
                surface: SurfaceId(surface),
            },
            operand: encode_row(&StoredRow { values }),
        }
    }

    fn user(user_id: u64) -> StagedUser {
        StagedUser {
            user_id,
            generation: 1,
            rows_accepted: 1,
            rows_transformed: 0,
            values: 1,
        }
    }

    #[test]
    fn chunks_merge_in_key_order_with_the_latest_event_time_winning_and_refused_users_left_out() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let first = chunk_path(directory.path(), 1);
        let second = chunk_path(directory.path(), 2);
        write_chunk(
            &first,
            &[user(1), user(3)],
            &[
                row(1, 1, vec![value(1, 10, 1.0)]),
                row(3, 1, vec![value(1, 10, 3.0)]),
            ],
        )
        .expect("written");
        write_chunk(
            &second,
            &[user(1), user(2)],
            &[
                row(1, 1, vec![value(1, 5, 9.0), value(2, 5, 2.0)]),
                row(2, 2, vec![value(1, 10, 2.0)]),
            ],
        )
        .expect("written");
        assert_eq!(
            read_users(&second).expect("read"),
            (vec![user(1), user(2)], 2)
        );

        let mut merged =
            MergedRows::open(&[first, second], vec![HashSet::from([3]), HashSet::new()])
                .expect("opened");
        let mut out = Vec::new();
        while let Some(row) = merged.next_row().expect("merged") {
            out.push((row.key.user_id, decode_row(&row.operand).expect("decodes")));
        }
        let users: Vec<u64> = out.iter().map(|(user, _)| *user).collect();
        assert_eq!(
            users,
            vec![1, 2],
            "user 3 is refused, user 1 comes out once"
        );
        let user_one = &out[0].1;
        assert_eq!(user_one.values.len(), 2);
        assert_eq!(
            user_one.values[0].value,
            Value::Float(1.0),
            "the value with the later event time wins whatever the chunk order"
        );
    }

    #[test]
    fn a_damaged_staging_file_is_refused() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let path = chunk_path(directory.path(), 1);
        write_chunk(&path, &[user(1)], &[row(1, 1, vec![value(1, 10, 1.0)])]).expect("written");
        let mut bytes = std::fs::read(&path).expect("read");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(&path, bytes).expect("rewritten");
        let error = MergedRows::open(&[path], vec![HashSet::new()])
            .and_then(|mut merged| {
                while merged.next_row()?.is_some() {}
                Ok(())
            })
            .expect_err("damage is found");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
    }

    #[test]
    fn job_ids_are_safe_directory_names() {
        assert_eq!(job_id_problem("backfill-2026-11-29.v2_a"), None);
        for bad in ["", ".", "..", "a/b", "a b", "é"] {
            assert!(job_id_problem(bad).is_some(), "{bad:?} is refused");
        }
        assert!(job_id_problem(&"x".repeat(129)).is_some());
    }
}
