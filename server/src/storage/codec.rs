//! Value encoding of a stored row, and the per-feature last-writer-wins merge.
//!
//! Layout (integers little-endian), version 2:
//!
//! ```text
//! row        := 2:u8  provenances:u16  values:u16
//!               provenance*provenances  labels*provenances  value*values  crc32:u32
//! provenance := event_time:i64  write_time:i64  expires_at:i64  policy_version:u64
//!               source:u16  sensitivity:u8  flags:u8  confidence:f32        (40 bytes)
//!               flags: 1 microphone permission, 2 has confidence
//! labels     := origin_app:(len:u8 bytes)  topic_id:(len:u8 bytes)
//! value      := feature:u16  type:u8  provenance:u16  payload
//! payload    := f32 | i64 | len:u32 bytes | len:u16 f32*len | n:u16 (len:u8 topic weight:f32)*n
//! ```
//!
//! The values a write stores together share one provenance record, so a row of twenty
//! floats written at once costs about nine bytes per value; the fixed-size provenance
//! records let the read path reach a value's expiry and policy version without decoding
//! anything else ([`RowView`]). Values are sorted by feature id with no duplicates. The
//! checksum covers everything before it; decoding checks it, every length and every
//! index, so arbitrary bytes give an error, never a panic.
//!
//! Version 1, still read, stored every value with its own provenance inline:
//! `1:u8 count:u16 entry*count crc32:u32`, `entry := feature:u16 type:u8 event_time:i64
//! write_time:i64 expires_at:i64 source:u16 sensitivity:u8 policy_version:u64
//! origin_app:(len:u8 bytes) topic_id:(len:u8 bytes) flags:u8 [confidence:f32] payload`.

mod view;

use std::borrow::Cow;

use featurestore::domain::{Timestamp, Value};

use featurestore::domain::AgeBand;

pub use view::{Floats, Payload, Provenance, RowView, SparseEntries, ValueRef, Values};

use super::{ErasureState, IdempotencyRecord, StoredRow, StoredValue, UserState, ValueOutcome};
use crate::registry::{FeatureId, Sensitivity, SourceId};

const LEGACY_FORMAT: u8 = 1;
const FORMAT_VERSION: u8 = 2;
const PROVENANCE_LEN: usize = 40;
const HEADER_LEN: usize = 5;
const FLAG_MICROPHONE: u8 = 1;
const FLAG_CONFIDENCE: u8 = 2;
const TYPE_FLOAT: u8 = 1;
const TYPE_INT64: u8 = 2;
const TYPE_STRING: u8 = 3;
const TYPE_FLOAT_VECTOR: u8 = 4;
const TYPE_SPARSE: u8 = 5;

/// Bytes that are not a valid encoded row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable row: {0}")]
pub struct CodecError(&'static str);

/// Everything about a stored value but the feature and the value itself.
#[derive(PartialEq)]
struct ProvenanceOf<'a> {
    event_time: Timestamp,
    write_time: Timestamp,
    expires_at: Timestamp,
    policy_version: u64,
    source: SourceId,
    sensitivity: Sensitivity,
    microphone_permission: bool,
    /// The confidence's bits, so that equal records compare equal.
    topic_confidence: Option<u32>,
    origin_app: &'a str,
    topic_id: &'a str,
}

impl<'a> ProvenanceOf<'a> {
    fn of(value: &'a StoredValue) -> Self {
        ProvenanceOf {
            event_time: value.event_time,
            write_time: value.write_time,
            expires_at: value.expires_at,
            policy_version: value.policy_version,
            source: value.source,
            sensitivity: value.sensitivity,
            microphone_permission: value.microphone_permission,
            topic_confidence: value.topic_confidence.map(f32::to_bits),
            origin_app: &value.origin_app,
            topic_id: &value.topic_id,
        }
    }

    fn flags(&self) -> u8 {
        (if self.microphone_permission {
            FLAG_MICROPHONE
        } else {
            0
        }) | (if self.topic_confidence.is_some() {
            FLAG_CONFIDENCE
        } else {
            0
        })
    }
}

/// Encodes a row in the current format. The row must be sorted by feature id without
/// duplicates.
pub fn encode_row(row: &StoredRow) -> Vec<u8> {
    let bytes = encode_row_unchecked(row);
    // Compared as bytes: a float may be NaN (in damaged data that passed the checksum),
    // which equals nothing, not even itself.
    debug_assert!(
        decode_row(&bytes).is_ok_and(|decoded| encode_row_unchecked(&decoded) == bytes),
        "an encoded row decodes to itself"
    );
    bytes
}

fn encode_row_unchecked(row: &StoredRow) -> Vec<u8> {
    debug_assert!(is_sorted_unique(row), "rows are kept sorted by feature id");
    // Rows hold at most a few hundred values and usually a handful of provenances, so a
    // linear search finds the shared records without hashing.
    let mut provenances: Vec<ProvenanceOf<'_>> = Vec::new();
    let indices: Vec<u16> = row
        .values
        .iter()
        .map(|value| {
            let provenance = ProvenanceOf::of(value);
            let index = match provenances.iter().position(|known| *known == provenance) {
                Some(index) => index,
                None => {
                    provenances.push(provenance);
                    provenances.len() - 1
                }
            };
            u16::try_from(index).expect("a row holds at most one value per feature id")
        })
        .collect();

    let mut bytes = Vec::with_capacity(
        HEADER_LEN + provenances.len() * (PROVENANCE_LEN + 16) + row.values.len() * 12 + 4,
    );
    bytes.push(FORMAT_VERSION);
    let count = |len: usize| {
        u16::try_from(len).expect("a row holds at most one value per registered feature id")
    };
    bytes.extend_from_slice(&count(provenances.len()).to_le_bytes());
    bytes.extend_from_slice(&count(row.values.len()).to_le_bytes());
    for provenance in &provenances {
        bytes.extend_from_slice(&provenance.event_time.unix_micros().to_le_bytes());
        bytes.extend_from_slice(&provenance.write_time.unix_micros().to_le_bytes());
        bytes.extend_from_slice(&provenance.expires_at.unix_micros().to_le_bytes());
        bytes.extend_from_slice(&provenance.policy_version.to_le_bytes());
        bytes.extend_from_slice(&provenance.source.0.to_le_bytes());
        bytes.push(provenance.sensitivity.code());
        bytes.push(provenance.flags());
        bytes.extend_from_slice(&provenance.topic_confidence.unwrap_or(0).to_le_bytes());
    }
    for provenance in &provenances {
        push_short_text(&mut bytes, provenance.origin_app);
        push_short_text(&mut bytes, provenance.topic_id);
    }
    for (value, index) in row.values.iter().zip(indices) {
        bytes.extend_from_slice(&value.feature.0.to_le_bytes());
        bytes.push(type_tag(&value.value));
        bytes.extend_from_slice(&index.to_le_bytes());
        encode_payload(&value.value, &mut bytes);
    }
    let checksum = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    bytes
}

fn push_short_text(bytes: &mut Vec<u8>, text: &str) {
    bytes.push(u8::try_from(text.len()).expect("app names and topics are at most 128 bytes"));
    bytes.extend_from_slice(text.as_bytes());
}

fn type_tag(value: &Value) -> u8 {
    match value {
        Value::Float(_) => TYPE_FLOAT,
        Value::Int64(_) => TYPE_INT64,
        Value::String(_) => TYPE_STRING,
        Value::FloatVector(_) => TYPE_FLOAT_VECTOR,
        Value::Sparse(_) => TYPE_SPARSE,
    }
}

fn encode_payload(value: &Value, bytes: &mut Vec<u8>) {
    // Lengths below were bounded when the request was parsed; the conversions only fail
    // on a broken invariant.
    match value {
        Value::Float(number) => bytes.extend_from_slice(&number.to_le_bytes()),
        Value::Int64(number) => bytes.extend_from_slice(&number.to_le_bytes()),
        Value::String(text) => {
            let len = u32::try_from(text.len()).expect("string values are at most 64 KiB");
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend_from_slice(text.as_bytes());
        }
        Value::FloatVector(elements) => {
            let len = u16::try_from(elements.len()).expect("vectors have at most 4096 elements");
            bytes.extend_from_slice(&len.to_le_bytes());
            for element in elements {
                bytes.extend_from_slice(&element.to_le_bytes());
            }
        }
        Value::Sparse(entries) => {
            let len =
                u16::try_from(entries.len()).expect("sparse values have at most 1024 entries");
            bytes.extend_from_slice(&len.to_le_bytes());
            for (topic, weight) in entries {
                push_short_text(bytes, topic);
                bytes.extend_from_slice(&weight.to_le_bytes());
            }
        }
    }
}

/// One value with its provenance inline, as version 1 stored it. Still used to order
/// values that tie on event and write time (see [`supersedes`]).
fn encode_standalone_value(value: &StoredValue, bytes: &mut Vec<u8>) {
    bytes.extend_from_slice(&value.feature.0.to_le_bytes());
    bytes.push(type_tag(&value.value));
    bytes.extend_from_slice(&value.event_time.unix_micros().to_le_bytes());
    bytes.extend_from_slice(&value.write_time.unix_micros().to_le_bytes());
    bytes.extend_from_slice(&value.expires_at.unix_micros().to_le_bytes());
    bytes.extend_from_slice(&value.source.0.to_le_bytes());
    bytes.push(value.sensitivity.code());
    bytes.extend_from_slice(&value.policy_version.to_le_bytes());
    push_short_text(bytes, &value.origin_app);
    push_short_text(bytes, &value.topic_id);
    bytes.push(ProvenanceOf::of(value).flags());
    if let Some(confidence) = value.topic_confidence {
        bytes.extend_from_slice(&confidence.to_le_bytes());
    }
    encode_payload(&value.value, bytes);
}

/// The bytes before the trailing CRC32, if it matches them.
fn checked_body(bytes: &[u8]) -> Result<&[u8], CodecError> {
    let (body, checksum) = bytes
        .split_last_chunk::<4>()
        .ok_or(CodecError("shorter than a checksum"))?;
    if crc32fast::hash(body) != u32::from_le_bytes(*checksum) {
        return Err(CodecError("checksum mismatch"));
    }
    Ok(body)
}

/// Decodes a row of either format, checking its checksum, lengths and order.
pub fn decode_row(bytes: &[u8]) -> Result<StoredRow, CodecError> {
    match bytes.first() {
        Some(&LEGACY_FORMAT) => decode_legacy_row(bytes),
        _ => RowView::parse(bytes)?.to_row(),
    }
}

/// The row in the current format: borrowed as it is, or converted from version 1.
pub fn current_format(bytes: &[u8]) -> Result<Cow<'_, [u8]>, CodecError> {
    match bytes.first() {
        Some(&LEGACY_FORMAT) => Ok(Cow::Owned(encode_row(&decode_legacy_row(bytes)?))),
        _ => Ok(Cow::Borrowed(bytes)),
    }
}

fn decode_legacy_row(bytes: &[u8]) -> Result<StoredRow, CodecError> {
    let body = checked_body(bytes)?;
    let mut reader = Reader { bytes: body };
    if reader.u8()? != LEGACY_FORMAT {
        return Err(CodecError("unknown format version"));
    }
    let count = reader.u16()?;
    let mut values = Vec::with_capacity(usize::from(count).min(body.len() / 40));
    for _ in 0..count {
        let value = decode_legacy_value(&mut reader)?;
        if values
            .last()
            .is_some_and(|last: &StoredValue| last.feature >= value.feature)
        {
            return Err(CodecError("feature ids out of order"));
        }
        values.push(value);
    }
    if !reader.bytes.is_empty() {
        return Err(CodecError("trailing bytes"));
    }
    Ok(StoredRow { values })
}

fn decode_legacy_value(reader: &mut Reader<'_>) -> Result<StoredValue, CodecError> {
    let feature = FeatureId(reader.u16()?);
    let type_tag = reader.u8()?;
    let event_time = Timestamp::from_unix_micros(reader.i64()?);
    let write_time = Timestamp::from_unix_micros(reader.i64()?);
    let expires_at = Timestamp::from_unix_micros(reader.i64()?);
    let source = SourceId(reader.u16()?);
    let sensitivity =
        Sensitivity::from_code(reader.u8()?).ok_or(CodecError("unknown sensitivity class"))?;
    let policy_version = reader.u64()?;
    let origin_app = reader.short_text()?.to_owned();
    let topic_id = reader.short_text()?.to_owned();
    let flags = reader.u8()?;
    if flags > FLAG_MICROPHONE | FLAG_CONFIDENCE {
        return Err(CodecError("unknown flags"));
    }
    let topic_confidence = if flags & FLAG_CONFIDENCE != 0 {
        Some(reader.f32()?)
    } else {
        None
    };
    let value = reader.payload(type_tag)?.to_value();
    Ok(StoredValue {
        feature,
        event_time,
        write_time,
        expires_at,
        source,
        sensitivity,
        policy_version,
        origin_app,
        topic_id,
        microphone_permission: flags & FLAG_MICROPHONE != 0,
        topic_confidence,
        value,
    })
}

#[derive(Debug)]
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], CodecError> {
        if self.bytes.len() < len {
            return Err(CodecError("truncated"));
        }
        let (taken, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let taken = self.take(N)?;
        Ok(taken.try_into().expect("take returned exactly N bytes"))
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        self.array().map(u64::from_le_bytes)
    }

    fn i64(&mut self) -> Result<i64, CodecError> {
        self.array().map(i64::from_le_bytes)
    }

    fn f32(&mut self) -> Result<f32, CodecError> {
        self.array().map(f32::from_le_bytes)
    }

    fn text(&mut self, len: usize) -> Result<&'a str, CodecError> {
        std::str::from_utf8(self.take(len)?).map_err(|_| CodecError("text is not UTF-8"))
    }

    /// A string of at most 255 bytes behind its one-byte length.
    fn short_text(&mut self) -> Result<&'a str, CodecError> {
        let len = usize::from(self.u8()?);
        self.text(len)
    }

    /// A value's payload of type `type_tag`, checked.
    fn payload(&mut self, type_tag: u8) -> Result<Payload<'a>, CodecError> {
        Ok(match type_tag {
            TYPE_FLOAT => Payload::Float(self.f32()?),
            TYPE_INT64 => Payload::Int64(self.i64()?),
            TYPE_STRING => {
                let len = self.u32()? as usize;
                Payload::String(self.text(len)?)
            }
            TYPE_FLOAT_VECTOR => {
                let len = usize::from(self.u16()?);
                let bytes = self.take(len.checked_mul(4).ok_or(CodecError("vector too long"))?)?;
                Payload::FloatVector(Floats::new(bytes))
            }
            TYPE_SPARSE => {
                let count = self.u16()?;
                let start = self.bytes;
                for _ in 0..count {
                    self.short_text()?;
                    self.f32()?;
                }
                let len = start.len() - self.bytes.len();
                Payload::Sparse(SparseEntries::new(count, &start[..len]))
            }
            _ => return Err(CodecError("unknown value type")),
        })
    }
}

fn is_sorted_unique(row: &StoredRow) -> bool {
    row.values
        .windows(2)
        .all(|pair| pair[0].feature < pair[1].feature)
}

/// Whether `candidate` replaces `current` for the same feature: the later event time wins,
/// then the later write time, then (so that the result never depends on arrival order) the
/// greater encoding.
pub fn supersedes(candidate: &StoredValue, current: &StoredValue) -> bool {
    let candidate_order = (candidate.event_time, candidate.write_time);
    let current_order = (current.event_time, current.write_time);
    if candidate_order != current_order {
        return candidate_order > current_order;
    }
    let mut candidate_bytes = Vec::new();
    let mut current_bytes = Vec::new();
    encode_standalone_value(candidate, &mut candidate_bytes);
    encode_standalone_value(current, &mut current_bytes);
    candidate_bytes >= current_bytes
}

/// Merges one value into a row: per feature, the value that [`supersedes`] the other stays.
pub fn merge_value(row: &mut StoredRow, incoming: StoredValue) -> ValueOutcome {
    match row
        .values
        .binary_search_by_key(&incoming.feature, |value| value.feature)
    {
        Ok(index) => {
            if supersedes(&incoming, &row.values[index]) {
                row.values[index] = incoming;
                ValueOutcome::Stored
            } else {
                ValueOutcome::Superseded
            }
        }
        Err(index) => {
            row.values.insert(index, incoming);
            ValueOutcome::Stored
        }
    }
}

/// Combines encoded rows into one, per feature the value that [`supersedes`] the others:
/// the same result as applying them to the store in any order.
pub fn merge_operands<'a>(
    operands: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<u8>, CodecError> {
    let mut row = StoredRow::default();
    for operand in operands {
        for value in decode_row(operand)?.values {
            merge_value(&mut row, value);
        }
    }
    Ok(encode_row(&row))
}

const USER_STATE_VERSION: u8 = 1;

/// Encodes a user state:
/// `version:u8 generation:u64 updated_at:i64 age:u8 erasure:u8 objection:u8
///  jurisdiction:(len:u8 bytes) apps:(n:u8 (len:u8 bytes)*n) crc32:u32`.
pub fn encode_user_state(state: &UserState) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(64);
    bytes.push(USER_STATE_VERSION);
    bytes.extend_from_slice(&state.generation.to_le_bytes());
    bytes.extend_from_slice(&state.updated_at.unix_micros().to_le_bytes());
    bytes.push(match state.age_band {
        AgeBand::Unknown => 0,
        AgeBand::Minor => 1,
        AgeBand::Adult => 2,
    });
    bytes.push(match state.erasure {
        ErasureState::None => 0,
        ErasureState::Pending => 1,
        ErasureState::Erased => 2,
    });
    bytes.push(u8::from(state.ads_objection));
    let short =
        |text: &str| u8::try_from(text.len()).expect("names and codes are at most 128 bytes");
    bytes.push(short(&state.jurisdiction));
    bytes.extend_from_slice(state.jurisdiction.as_bytes());
    bytes.push(u8::try_from(state.linked_apps.len()).expect("at most 16 linked apps"));
    for app in &state.linked_apps {
        bytes.push(short(app));
        bytes.extend_from_slice(app.as_bytes());
    }
    let checksum = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    debug_assert_eq!(decode_user_state(state.user_id, &bytes).as_ref(), Ok(state));
    bytes
}

/// Decodes a user state stored under `user_id`.
pub fn decode_user_state(user_id: u64, bytes: &[u8]) -> Result<UserState, CodecError> {
    let body = checked_body(bytes)?;
    let mut reader = Reader { bytes: body };
    if reader.u8()? != USER_STATE_VERSION {
        return Err(CodecError("unknown user state version"));
    }
    let generation = reader.u64()?;
    let updated_at = Timestamp::from_unix_micros(reader.i64()?);
    let age_band = match reader.u8()? {
        0 => AgeBand::Unknown,
        1 => AgeBand::Minor,
        2 => AgeBand::Adult,
        _ => return Err(CodecError("unknown age band")),
    };
    let erasure = match reader.u8()? {
        0 => ErasureState::None,
        1 => ErasureState::Pending,
        2 => ErasureState::Erased,
        _ => return Err(CodecError("unknown erasure state")),
    };
    let ads_objection = match reader.u8()? {
        0 => false,
        1 => true,
        _ => return Err(CodecError("objection flag is not 0 or 1")),
    };
    let jurisdiction_len = usize::from(reader.u8()?);
    let jurisdiction = reader.text(jurisdiction_len)?.to_owned();
    let apps = usize::from(reader.u8()?);
    let mut linked_apps = Vec::with_capacity(apps);
    for _ in 0..apps {
        let len = usize::from(reader.u8()?);
        linked_apps.push(reader.text(len)?.to_owned());
    }
    if !reader.bytes.is_empty() {
        return Err(CodecError("trailing bytes"));
    }
    Ok(UserState {
        user_id,
        jurisdiction,
        age_band,
        linked_apps,
        ads_objection,
        erasure,
        generation,
        updated_at,
    })
}

/// Records of version 1 held one answer per request under the bare idempotency key; they
/// are no longer read, and expire like the others.
const IDEMPOTENCY_RECORD_VERSION: u8 = 2;
/// version:u8 created_at:i64 fingerprint:u64
const IDEMPOTENCY_HEADER_LEN: usize = 17;

/// Encodes a user's idempotency record: `version:u8 created_at:i64 fingerprint:u64`, then
/// the answer stored for the user.
pub fn encode_idempotency_record(record: &IdempotencyRecord, answer: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(IDEMPOTENCY_HEADER_LEN + answer.len());
    bytes.push(IDEMPOTENCY_RECORD_VERSION);
    bytes.extend_from_slice(&record.created_at.unix_micros().to_le_bytes());
    bytes.extend_from_slice(&record.fingerprint.to_le_bytes());
    bytes.extend_from_slice(answer);
    bytes
}

/// A stored idempotency record: (created at, fingerprint, answer); `None` for a record of
/// an older version, which is no longer read.
pub fn decode_idempotency_record(
    bytes: &[u8],
) -> Result<Option<(Timestamp, u64, Vec<u8>)>, CodecError> {
    if bytes.first() != Some(&IDEMPOTENCY_RECORD_VERSION) {
        return Ok(None);
    }
    let created_at = idempotency_created_at(bytes).ok_or(CodecError("idempotency record"))?;
    let fingerprint = u64::from_le_bytes(
        bytes[9..17]
            .try_into()
            .expect("the header's length is checked by idempotency_created_at"),
    );
    Ok(Some((
        created_at,
        fingerprint,
        bytes[IDEMPOTENCY_HEADER_LEN..].to_vec(),
    )))
}

/// When an idempotency record (of any version) was created, if it has a header.
pub fn idempotency_created_at(record: &[u8]) -> Option<Timestamp> {
    if record.len() < IDEMPOTENCY_HEADER_LEN || !matches!(record[0], 1 | IDEMPOTENCY_RECORD_VERSION)
    {
        return None;
    }
    let created_at = i64::from_le_bytes(record[1..9].try_into().ok()?);
    Some(Timestamp::from_unix_micros(created_at))
}

#[cfg(test)]
pub(crate) mod tests;
