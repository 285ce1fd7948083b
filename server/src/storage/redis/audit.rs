//! The audit log on a Redis Cluster: one hash chain per partition, in the partition's slot.
//! A chain's records are a hash (sequence → record), its tail a string (next sequence and
//! last hash), and each user's records a list of sequences. Records are appended by the
//! same script as the change they record, compared against the tail the server read, so
//! that two servers appending to one chain never fork it.

use futures_util::future::join_all;

use super::keys::ChainKeys;
use super::step::Step;
use super::{RedisStore, STEP_ATTEMPTS, corrupt};
use crate::audit::{
    AuditEntry, AuditRecord, AuditReport, HASH_LEN, Pseudonym, chain, decode_record, encode_record,
    verify_chain,
};
use crate::storage::StorageError;

/// Records read per command when a chain is checked.
const VERIFY_PAGE: u64 = 1_000;
/// Chains read at once when the log is checked.
const VERIFY_CHAINS_AT_ONCE: usize = 64;

/// The tail of a chain as read: its next sequence, the hash of its last record, and the
/// bytes to compare.
#[derive(Debug)]
pub(super) struct Tail {
    sequence: u64,
    hash: [u8; HASH_LEN],
    pub bytes: Option<Vec<u8>>,
}

impl Tail {
    pub fn read(bytes: Option<Vec<u8>>) -> Result<Tail, StorageError> {
        let (sequence, hash) = match &bytes {
            None => (0, [0; HASH_LEN]),
            Some(stored) => {
                let (sequence, hash) = stored
                    .split_first_chunk::<8>()
                    .ok_or_else(|| corrupt("an audit chain's tail is truncated"))?;
                let hash: [u8; HASH_LEN] = hash
                    .try_into()
                    .map_err(|_| corrupt("an audit chain's tail is not 40 bytes"))?;
                (u64::from_le_bytes(*sequence), hash)
            }
        };
        Ok(Tail {
            sequence,
            hash,
            bytes,
        })
    }
}

/// Adds to `step` the records of `entries`, chained after `tail`, with the new tail and
/// the users' indexes. The step must compare the tail.
pub(super) fn append(step: &mut Step, chain_keys: &ChainKeys, tail: &Tail, entries: &[AuditEntry]) {
    if entries.is_empty() {
        return;
    }
    let (mut sequence, mut previous) = (tail.sequence, tail.hash);
    for entry in entries {
        let record = chain(chain_keys.partition, sequence, entry.clone(), previous);
        let field = sequence.to_string();
        step.hash_set(
            &chain_keys.records(),
            field.as_bytes(),
            &encode_record(&record),
        );
        if let Some(user) = &entry.user {
            step.push(&chain_keys.by_user(user), field.as_bytes());
        }
        previous = record.hash;
        sequence += 1;
    }
    let mut bytes = Vec::with_capacity(8 + HASH_LEN);
    bytes.extend_from_slice(&sequence.to_le_bytes());
    bytes.extend_from_slice(&previous);
    step.set(&chain_keys.tail(), &bytes);
}

impl RedisStore {
    /// Appends `entries` to chain 0, with a metadata value when given, in one step.
    pub(super) fn append_to_chain_zero(
        &self,
        entries: &[AuditEntry],
        meta: Option<(&str, &[u8])>,
    ) -> Result<(), StorageError> {
        let chain_keys = self.layout.chain(0);
        for _ in 0..STEP_ATTEMPTS {
            let tail = Tail::read(self.get_many(vec![chain_keys.tail()])?.pop().flatten())?;
            let mut step = Step::default();
            step.compare(&chain_keys.tail(), tail.bytes.as_deref());
            if let Some((key, value)) = meta {
                step.hash_set(&self.layout.meta(), key.as_bytes(), value);
            }
            append(&mut step, &chain_keys, &tail, entries);
            if step.is_empty() || self.execute(&step)? {
                return Ok(());
            }
        }
        Err(StorageError::Engine(format!(
            "audit chain 0 moved {STEP_ATTEMPTS} times while records were appended"
        )))
    }

    /// The records of one user, oldest first, at most `limit`: from the user's chain and
    /// from chain 0 (records about calls that name the user).
    pub(super) fn read_trail(
        &self,
        user_id: u64,
        user: &Pseudonym,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StorageError> {
        let mut partitions = vec![0, self.layout.user(user_id).partition];
        partitions.dedup();
        let chains: Vec<ChainKeys> = partitions
            .into_iter()
            .map(|partition| self.layout.chain(partition))
            .collect();
        let user = *user;
        let mut connection = self.connection.clone();
        let stop = isize::try_from(limit)
            .unwrap_or(isize::MAX)
            .saturating_sub(1);
        let found = self.run(async move {
            let mut found = Vec::new();
            for chain_keys in &chains {
                if limit == 0 {
                    break;
                }
                let sequences: Vec<String> = redis::cmd("LRANGE")
                    .arg(chain_keys.by_user(&user))
                    .arg(0)
                    .arg(stop)
                    .query_async(&mut connection)
                    .await?;
                if sequences.is_empty() {
                    continue;
                }
                let records: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
                    .arg(chain_keys.records())
                    .arg(&sequences)
                    .query_async(&mut connection)
                    .await?;
                found.extend(records);
            }
            Ok(found)
        })?;
        let mut records = found
            .into_iter()
            .map(|bytes| {
                let bytes = bytes.ok_or_else(|| corrupt("an indexed audit record is missing"))?;
                decode_record(&bytes).map_err(corrupt)
            })
            .collect::<Result<Vec<_>, _>>()?;
        records.sort_by_key(|record| (record.entry.time, record.partition, record.sequence));
        records.truncate(limit);
        Ok(records)
    }

    /// Checks every chain that holds records, each on its own, up to its tail.
    pub(super) fn verify_chains(&self) -> Result<AuditReport, StorageError> {
        let partitions: Vec<u32> = (0..self.layout.partitions()).collect();
        let mut report = AuditReport::default();
        for batch in partitions.chunks(VERIFY_CHAINS_AT_ONCE) {
            let chains: Vec<ChainKeys> = batch
                .iter()
                .map(|&partition| self.layout.chain(partition))
                .collect();
            let connection = self.connection.clone();
            let read: Vec<Option<StoredChain>> = self.run(async move {
                let reads = chains.iter().map(|chain_keys| {
                    let mut connection = connection.clone();
                    async move { read_chain(&mut connection, chain_keys).await }
                });
                join_all(reads).await.into_iter().collect()
            })?;
            for (partition, records) in batch.iter().zip(read) {
                let Some((tail, records)) = records else {
                    continue;
                };
                let tail = Tail::read(tail)?;
                let mut chain_report = verify_chain(
                    *partition,
                    records
                        .iter()
                        .enumerate()
                        .filter_map(|(sequence, bytes)| Some((sequence as u64, bytes.as_deref()?))),
                );
                // Records removed from the end leave a tail that no record ends with.
                if chain_report.first_broken.is_none()
                    && chain_report.records_checked != tail.sequence
                {
                    chain_report.first_broken = Some((
                        chain_report.records_checked,
                        "the chain ends before its tail: records were removed".to_string(),
                    ));
                }
                report.chains.push(chain_report);
            }
        }
        Ok(report)
    }
}

/// A chain's tail as stored, and its records from sequence 0 on (`None` where one is
/// missing).
type StoredChain = (Option<Vec<u8>>, Vec<Option<Vec<u8>>>);

/// A chain's tail and its records up to the tail (or as many as are stored, when more);
/// `None` for a chain without records.
async fn read_chain(
    connection: &mut redis::cluster_async::ClusterConnection,
    chain_keys: &ChainKeys,
) -> redis::RedisResult<Option<StoredChain>> {
    let tail: Option<Vec<u8>> = redis::cmd("GET")
        .arg(chain_keys.tail())
        .query_async(connection)
        .await?;
    let stored: u64 = redis::cmd("HLEN")
        .arg(chain_keys.records())
        .query_async(connection)
        .await?;
    let next = match Tail::read(tail.clone()) {
        Ok(tail) => tail.sequence,
        // Reported by the caller, which reads the tail again.
        Err(_) => stored,
    };
    if next == 0 && stored == 0 {
        return Ok(None);
    }
    let mut records = Vec::with_capacity(next.max(stored) as usize);
    let mut from = 0;
    while from < next.max(stored) {
        let to = (from + VERIFY_PAGE).min(next.max(stored));
        let fields: Vec<String> = (from..to).map(|sequence| sequence.to_string()).collect();
        let page: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
            .arg(chain_keys.records())
            .arg(&fields)
            .query_async(connection)
            .await?;
        records.extend(page);
        from = to;
    }
    Ok(Some((tail, records)))
}
