//! The audit log's records: what happened, under which bundle, to whom (pseudonymized),
//! and never a feature value. The log is one hash chain per partition of the users
//! ([`partition_of`]), so that appending never serializes the whole store: a user's
//! records are appended in the same atomic step as the change they record, to the user's
//! chain. Changing, removing or reordering a record, or moving it to another chain, is
//! detected by [`verify_chain`].

use featurestore::domain::Timestamp;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Length of a user pseudonym, in bytes.
pub const PSEUDONYM_LEN: usize = 16;
/// Length of a record hash, in bytes.
pub const HASH_LEN: usize = 32;
/// Most chains: as many as a Redis Cluster has hash slots, so that an engine can keep each
/// chain beside its users' keys.
pub const PARTITIONS_MAX: u32 = 16_384;
/// Records of version 1 were written before the log had partitions; they belong to chain 0.
const RECORD_VERSION_SINGLE_CHAIN: u8 = 1;
const RECORD_VERSION: u8 = 2;

/// The chain a user's records go to, among `partitions`. Records about no single user go
/// to chain 0.
pub fn partition_of(user_id: u64, partitions: u32) -> u32 {
    debug_assert!(partitions > 0);
    (xxhash_rust::xxh3::xxh3_64(&user_id.to_be_bytes()) % u64::from(partitions.max(1))) as u32
}

/// A keyed hash of a user id: the same user always gets the same pseudonym under one key,
/// and without the key the pseudonym can neither be computed nor reversed.
pub type Pseudonym = [u8; PSEUDONYM_LEN];

/// What an audit record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AuditAction {
    /// A write call (one per request).
    Write = 1,
    /// A feature value of a write refused on every target surface.
    FeatureDenied = 2,
    /// A feature value of a write refused on some target surfaces.
    FeatureTransformed = 3,
    /// A user's state was set.
    UserStateSet = 4,
    /// A policy bundle was put in force.
    PolicyLoaded = 5,
    /// Stored values were removed because the policy or the user's state changed.
    ValuesPurged = 6,
    /// The user was erased (or erased again after a restore).
    UserErased = 7,
    /// A backup was written.
    BackupCreated = 8,
    /// A chunk of a bulk load was staged (one per chunk).
    LoadChunk = 9,
    /// A bulk load was committed: its staged rows were applied.
    LoadCommitted = 10,
    /// A bulk load was aborted: its staged rows were deleted.
    LoadAborted = 11,
}

impl AuditAction {
    pub const ALL: [AuditAction; 11] = [
        AuditAction::Write,
        AuditAction::FeatureDenied,
        AuditAction::FeatureTransformed,
        AuditAction::UserStateSet,
        AuditAction::PolicyLoaded,
        AuditAction::ValuesPurged,
        AuditAction::UserErased,
        AuditAction::BackupCreated,
        AuditAction::LoadChunk,
        AuditAction::LoadCommitted,
        AuditAction::LoadAborted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AuditAction::Write => "write",
            AuditAction::FeatureDenied => "feature_denied",
            AuditAction::FeatureTransformed => "feature_transformed",
            AuditAction::UserStateSet => "user_state_set",
            AuditAction::PolicyLoaded => "policy_loaded",
            AuditAction::ValuesPurged => "values_purged",
            AuditAction::UserErased => "user_erased",
            AuditAction::BackupCreated => "backup_created",
            AuditAction::LoadChunk => "load_chunk",
            AuditAction::LoadCommitted => "load_committed",
            AuditAction::LoadAborted => "load_aborted",
        }
    }
}

/// An audit record before the log numbers and chains it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub time: Timestamp,
    pub action: AuditAction,
    /// Who made the call: the producer id of a write, the service of other calls.
    pub caller: String,
    /// Hex hash of the bundle in force.
    pub bundle_hash: String,
    /// The user concerned, pseudonymized; `None` for calls about no single user.
    pub user: Option<Pseudonym>,
    /// Surfaces concerned (e.g. those a value was refused on), comma separated.
    pub surfaces: String,
    /// The feature concerned, or a count ("3 rows") for calls.
    pub subject: String,
    /// Bit set of reason codes.
    pub reasons: u32,
}

/// An entry as stored: numbered and chained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// The chain the record belongs to.
    pub partition: u32,
    /// Its number in the chain, from 0.
    pub sequence: u64,
    pub entry: AuditEntry,
    /// Hash of the previous record (zeros for the first).
    pub previous_hash: [u8; HASH_LEN],
    /// Hash of this record's sequence, entry and previous hash.
    pub hash: [u8; HASH_LEN],
}

/// The pseudonym of a user under the user's own secret key. Destroying the key (at
/// erasure) makes the user's records unlinkable: the pseudonym can no longer be computed.
pub fn pseudonym(key: &[u8; 32], user_id: u64) -> Pseudonym {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(&user_id.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    digest[..PSEUDONYM_LEN]
        .try_into()
        .expect("a SHA-256 MAC has 32 bytes")
}

/// Encodes an entry's fields (all but the links), in the record's version.
fn encode_entry(
    version: u8,
    partition: u32,
    sequence: u64,
    entry: &AuditEntry,
    bytes: &mut Vec<u8>,
) {
    bytes.push(version);
    if version != RECORD_VERSION_SINGLE_CHAIN {
        bytes.extend_from_slice(&partition.to_le_bytes());
    }
    bytes.extend_from_slice(&sequence.to_le_bytes());
    bytes.extend_from_slice(&entry.time.unix_micros().to_le_bytes());
    bytes.push(entry.action as u8);
    for text in [
        &entry.caller,
        &entry.bundle_hash,
        &entry.surfaces,
        &entry.subject,
    ] {
        let len = u16::try_from(text.len()).unwrap_or(u16::MAX);
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&text.as_bytes()[..usize::from(len)]);
    }
    match entry.user {
        Some(pseudonym) => {
            bytes.push(1);
            bytes.extend_from_slice(&pseudonym);
        }
        None => bytes.push(0),
    }
    bytes.extend_from_slice(&entry.reasons.to_le_bytes());
}

/// Numbers and chains an entry after the record of chain `partition` whose hash is
/// `previous_hash`.
pub fn chain(
    partition: u32,
    sequence: u64,
    entry: AuditEntry,
    previous_hash: [u8; HASH_LEN],
) -> AuditRecord {
    let mut body = Vec::with_capacity(160);
    encode_entry(RECORD_VERSION, partition, sequence, &entry, &mut body);
    let hash = record_hash(&body, &previous_hash);
    AuditRecord {
        partition,
        sequence,
        entry,
        previous_hash,
        hash,
    }
}

/// Encodes a record as the log did before it had partitions (chain 0 only): what a
/// database written then holds.
#[cfg(test)]
pub fn encode_single_chain_record(
    sequence: u64,
    entry: &AuditEntry,
    previous_hash: [u8; HASH_LEN],
) -> (Vec<u8>, [u8; HASH_LEN]) {
    let mut bytes = Vec::with_capacity(160 + 2 * HASH_LEN);
    encode_entry(RECORD_VERSION_SINGLE_CHAIN, 0, sequence, entry, &mut bytes);
    let hash = record_hash(&bytes, &previous_hash);
    bytes.extend_from_slice(&previous_hash);
    bytes.extend_from_slice(&hash);
    (bytes, hash)
}

fn record_hash(body: &[u8], previous_hash: &[u8; HASH_LEN]) -> [u8; HASH_LEN] {
    let mut hasher = Sha256::new();
    hasher.update(previous_hash);
    hasher.update(body);
    hasher.finalize().into()
}

/// Encodes a chained record: `body previous_hash hash`.
pub fn encode_record(record: &AuditRecord) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(160 + 2 * HASH_LEN);
    encode_entry(
        RECORD_VERSION,
        record.partition,
        record.sequence,
        &record.entry,
        &mut bytes,
    );
    bytes.extend_from_slice(&record.previous_hash);
    bytes.extend_from_slice(&record.hash);
    bytes
}

/// A stored record that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable audit record: {0}")]
pub struct AuditDecodeError(&'static str);

/// Decodes a stored record. It does not check the hashes: [`verify_chain`] does.
pub fn decode_record(bytes: &[u8]) -> Result<AuditRecord, AuditDecodeError> {
    let truncated = AuditDecodeError("truncated");
    let (rest, hash) = bytes
        .split_last_chunk::<HASH_LEN>()
        .ok_or(truncated.clone())?;
    let (body, previous_hash) = rest
        .split_last_chunk::<HASH_LEN>()
        .ok_or(truncated.clone())?;
    let mut cursor = body;
    let mut take = |len: usize| -> Result<&[u8], AuditDecodeError> {
        if cursor.len() < len {
            return Err(AuditDecodeError("truncated"));
        }
        let (taken, remaining) = cursor.split_at(len);
        cursor = remaining;
        Ok(taken)
    };
    let partition = match take(1)?[0] {
        RECORD_VERSION_SINGLE_CHAIN => 0,
        RECORD_VERSION => u32::from_le_bytes(take(4)?.try_into().map_err(|_| truncated.clone())?),
        _ => return Err(AuditDecodeError("unknown version")),
    };
    let sequence = u64::from_le_bytes(take(8)?.try_into().map_err(|_| truncated.clone())?);
    let time = Timestamp::from_unix_micros(i64::from_le_bytes(
        take(8)?.try_into().map_err(|_| truncated.clone())?,
    ));
    let action_code = take(1)?[0];
    let action = AuditAction::ALL
        .into_iter()
        .find(|action| *action as u8 == action_code)
        .ok_or(AuditDecodeError("unknown action"))?;
    let mut texts = Vec::with_capacity(4);
    for _ in 0..4 {
        let len = u16::from_le_bytes(take(2)?.try_into().map_err(|_| truncated.clone())?);
        let text = std::str::from_utf8(take(usize::from(len))?)
            .map_err(|_| AuditDecodeError("text is not UTF-8"))?;
        texts.push(text.to_string());
    }
    let user = match take(1)?[0] {
        0 => None,
        1 => Some(
            take(PSEUDONYM_LEN)?
                .try_into()
                .map_err(|_| truncated.clone())?,
        ),
        _ => return Err(AuditDecodeError("bad user flag")),
    };
    let reasons = u32::from_le_bytes(take(4)?.try_into().map_err(|_| truncated.clone())?);
    if !cursor.is_empty() {
        return Err(AuditDecodeError("trailing bytes"));
    }
    let [caller, bundle_hash, surfaces, subject] =
        <[String; 4]>::try_from(texts).map_err(|_| truncated)?;
    Ok(AuditRecord {
        partition,
        sequence,
        entry: AuditEntry {
            time,
            action,
            caller,
            bundle_hash,
            user,
            surfaces,
            subject,
            reasons,
        },
        previous_hash: *previous_hash,
        hash: *hash,
    })
}

/// What checking one chain found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainReport {
    pub partition: u32,
    pub records_checked: u64,
    /// The first record whose content, hash, link or number is wrong, and why.
    pub first_broken: Option<(u64, String)>,
}

/// What checking the whole log found: one report per chain that holds records, by
/// partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditReport {
    pub chains: Vec<ChainReport>,
}

impl AuditReport {
    /// Records checked over every chain.
    pub fn records_checked(&self) -> u64 {
        self.chains.iter().map(|chain| chain.records_checked).sum()
    }

    /// The first broken chain, if any.
    pub fn first_broken(&self) -> Option<&ChainReport> {
        self.chains
            .iter()
            .find(|chain| chain.first_broken.is_some())
    }
}

/// Checks the stored records of chain `partition` in sequence order: each decodes, says
/// it belongs to this chain, is numbered one after the previous, links to the previous
/// record's hash, and hashes to what it says.
pub fn verify_chain<'a>(
    partition: u32,
    records: impl Iterator<Item = (u64, &'a [u8])>,
) -> ChainReport {
    let mut previous = [0u8; HASH_LEN];
    let mut checked = 0;
    for (key_sequence, bytes) in records {
        let broken = |why: &str| ChainReport {
            partition,
            records_checked: checked,
            first_broken: Some((key_sequence, why.to_string())),
        };
        let record = match decode_record(bytes) {
            Ok(record) => record,
            Err(error) => return broken(&error.to_string()),
        };
        if record.partition != partition {
            return broken("it belongs to another chain: a record was moved");
        }
        if record.sequence != key_sequence || record.sequence != checked {
            return broken("out of sequence: a record was removed or moved");
        }
        if record.previous_hash != previous {
            return broken("does not link to the previous record");
        }
        let mut body = Vec::with_capacity(bytes.len());
        encode_entry(
            bytes[0],
            record.partition,
            record.sequence,
            &record.entry,
            &mut body,
        );
        if record_hash(&body, &previous) != record.hash {
            return broken("its content does not match its hash");
        }
        previous = record.hash;
        checked += 1;
    }
    ChainReport {
        partition,
        records_checked: checked,
        first_broken: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(subject: &str) -> AuditEntry {
        AuditEntry {
            time: Timestamp::from_unix_micros(5),
            action: AuditAction::FeatureDenied,
            caller: "pipeline@v1".to_string(),
            bundle_hash: "ab".repeat(32),
            user: Some(pseudonym(&[7; 32], 42)),
            surfaces: "facebook_ads".to_string(),
            subject: subject.to_string(),
            reasons: 1 << 8,
        }
    }

    fn log(entries: usize) -> Vec<Vec<u8>> {
        let mut previous = [0; HASH_LEN];
        (0..entries)
            .map(|index| {
                let record = chain(
                    3,
                    index as u64,
                    entry(&format!("feature_{index}")),
                    previous,
                );
                previous = record.hash;
                encode_record(&record)
            })
            .collect()
    }

    fn verify(records: &[Vec<u8>]) -> ChainReport {
        verify_chain(
            3,
            records
                .iter()
                .enumerate()
                .map(|(index, bytes)| (index as u64, bytes.as_slice())),
        )
    }

    #[test]
    fn records_round_trip_and_an_intact_chain_verifies() {
        let records = log(5);
        let decoded = decode_record(&records[2]).expect("decodes");
        assert_eq!(decoded.entry, entry("feature_2"));
        assert_eq!(
            verify(&records),
            ChainReport {
                partition: 3,
                records_checked: 5,
                first_broken: None
            }
        );
        assert_eq!(
            verify_chain(
                4,
                records
                    .iter()
                    .enumerate()
                    .map(|(index, bytes)| (index as u64, bytes.as_slice()))
            )
            .first_broken
            .map(|(sequence, _)| sequence),
            Some(0),
            "a chain's records are not another chain's"
        );
    }

    #[test]
    fn changing_removing_or_reordering_a_record_is_found() {
        let mut changed = log(5);
        let position = changed[3].len() / 2;
        changed[3][position] ^= 1;
        assert_eq!(
            verify(&changed).first_broken.map(|(sequence, _)| sequence),
            Some(3)
        );

        let mut removed = log(5);
        removed.remove(2);
        assert_eq!(
            verify(&removed).first_broken.map(|(sequence, _)| sequence),
            Some(2)
        );

        let mut swapped = log(5);
        swapped.swap(1, 2);
        assert_eq!(
            verify(&swapped).first_broken.map(|(sequence, _)| sequence),
            Some(1)
        );
    }

    #[test]
    fn records_written_before_partitions_verify_as_chain_zero() {
        let mut previous = [0; HASH_LEN];
        let mut records: Vec<Vec<u8>> = (0..3)
            .map(|index| {
                let (bytes, hash) =
                    encode_single_chain_record(index, &entry(&format!("old_{index}")), previous);
                previous = hash;
                bytes
            })
            .collect();
        // New records continue the chain after the old ones.
        let record = chain(0, 3, entry("new"), previous);
        records.push(encode_record(&record));
        let report = verify_chain(
            0,
            records
                .iter()
                .enumerate()
                .map(|(index, bytes)| (index as u64, bytes.as_slice())),
        );
        assert_eq!((report.records_checked, report.first_broken), (4, None));
        assert_eq!(
            decode_record(&records[1]).expect("decodes").entry,
            entry("old_1")
        );
    }

    /// A user's chain is part of what is stored: the function may never change, or the
    /// chains of existing databases would mix users.
    #[test]
    fn the_partition_of_a_user_is_fixed() {
        let partitions: Vec<u32> = [0, 1, 7, 42].map(|user| partition_of(user, 64)).to_vec();
        assert_eq!(partitions, [25, 51, 60, 44]);
        assert_eq!(partition_of(42, 1), 0);
        assert!((0..1000).all(|user| partition_of(user, 16_384) < 16_384));
    }

    #[test]
    fn pseudonyms_depend_on_the_key() {
        assert_eq!(pseudonym(&[1; 32], 42), pseudonym(&[1; 32], 42));
        assert_ne!(pseudonym(&[1; 32], 42), pseudonym(&[1; 32], 43));
        assert_ne!(pseudonym(&[1; 32], 42), pseudonym(&[2; 32], 42));
    }
}
