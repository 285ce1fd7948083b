//! The audit log's records: what happened, under which bundle, to whom (pseudonymized),
//! and never a feature value. Records are chained by hash, so that changing, removing or
//! reordering any of them is detected by [`verify_chain`].

use featurestore::domain::Timestamp;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Length of a user pseudonym, in bytes.
pub const PSEUDONYM_LEN: usize = 16;
/// Length of a record hash, in bytes.
pub const HASH_LEN: usize = 32;
const RECORD_VERSION: u8 = 1;

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

/// Encodes an entry's fields (all but the chain).
fn encode_entry(sequence: u64, entry: &AuditEntry, bytes: &mut Vec<u8>) {
    bytes.push(RECORD_VERSION);
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

/// Numbers and chains an entry after the record whose hash is `previous_hash`.
pub fn chain(sequence: u64, entry: AuditEntry, previous_hash: [u8; HASH_LEN]) -> AuditRecord {
    let mut body = Vec::with_capacity(160);
    encode_entry(sequence, &entry, &mut body);
    let hash = record_hash(&body, &previous_hash);
    AuditRecord {
        sequence,
        entry,
        previous_hash,
        hash,
    }
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
    encode_entry(record.sequence, &record.entry, &mut bytes);
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
    if take(1)?[0] != RECORD_VERSION {
        return Err(AuditDecodeError("unknown version"));
    }
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

/// What checking the chain found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainReport {
    pub records_checked: u64,
    /// The first record whose content, hash, link or number is wrong, and why.
    pub first_broken: Option<(u64, String)>,
}

/// Checks stored records in sequence order: each decodes, is numbered one after the
/// previous, links to the previous record's hash, and hashes to what it says.
pub fn verify_chain<'a>(records: impl Iterator<Item = (u64, &'a [u8])>) -> ChainReport {
    let mut previous = [0u8; HASH_LEN];
    let mut checked = 0;
    for (key_sequence, bytes) in records {
        let broken = |why: &str| ChainReport {
            records_checked: checked,
            first_broken: Some((key_sequence, why.to_string())),
        };
        let record = match decode_record(bytes) {
            Ok(record) => record,
            Err(error) => return broken(&error.to_string()),
        };
        if record.sequence != key_sequence || record.sequence != checked {
            return broken("out of sequence: a record was removed or moved");
        }
        if record.previous_hash != previous {
            return broken("does not link to the previous record");
        }
        let mut body = Vec::with_capacity(bytes.len());
        encode_entry(record.sequence, &record.entry, &mut body);
        if record_hash(&body, &previous) != record.hash {
            return broken("its content does not match its hash");
        }
        previous = record.hash;
        checked += 1;
    }
    ChainReport {
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
                let record = chain(index as u64, entry(&format!("feature_{index}")), previous);
                previous = record.hash;
                encode_record(&record)
            })
            .collect()
    }

    fn verify(records: &[Vec<u8>]) -> ChainReport {
        verify_chain(
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
                records_checked: 5,
                first_broken: None
            }
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
    fn pseudonyms_depend_on_the_key() {
        assert_eq!(pseudonym(&[1; 32], 42), pseudonym(&[1; 32], 42));
        assert_ne!(pseudonym(&[1; 32], 42), pseudonym(&[1; 32], 43));
        assert_ne!(pseudonym(&[1; 32], 42), pseudonym(&[2; 32], 42));
    }
}
