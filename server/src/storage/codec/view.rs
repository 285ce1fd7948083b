//! Reading a stored row in place: the read path's view of the current format, which
//! copies nothing and allocates nothing.

use featurestore::domain::{Timestamp, Value, ValueType};

use super::{
    CodecError, FLAG_CONFIDENCE, FLAG_MICROPHONE, FORMAT_VERSION, PROVENANCE_LEN, Reader,
    checked_body,
};
use crate::registry::{FeatureId, Sensitivity, SourceId};
use crate::storage::{StoredRow, StoredValue};

/// A row in the current format whose checksum, lengths, order and indices were checked
/// once, when it was parsed; reading it afterwards cannot fail.
#[derive(Clone, Copy, Debug)]
pub struct RowView<'a> {
    provenances: &'a [u8],
    labels: &'a [u8],
    values: &'a [u8],
    value_count: u16,
}

impl<'a> RowView<'a> {
    /// Checks a row in the current format (version 2; see [`super::current_format`] for
    /// older ones).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, CodecError> {
        let body = checked_body(bytes)?;
        let mut reader = Reader { bytes: body };
        if reader.u8()? != FORMAT_VERSION {
            return Err(CodecError("unknown format version"));
        }
        let provenance_count = reader.u16()?;
        let value_count = reader.u16()?;
        let provenances = reader.take(usize::from(provenance_count) * PROVENANCE_LEN)?;
        for record in provenances.chunks_exact(PROVENANCE_LEN) {
            Provenance::read(record)?;
        }
        let labels_start = reader.bytes;
        for _ in 0..provenance_count {
            reader.short_text()?;
            reader.short_text()?;
        }
        let labels = &labels_start[..labels_start.len() - reader.bytes.len()];
        let values = reader.bytes;
        let mut previous = None;
        for _ in 0..value_count {
            let value = read_value(&mut reader)?;
            if previous.is_some_and(|previous| previous >= value.feature) {
                return Err(CodecError("feature ids out of order"));
            }
            if value.provenance >= provenance_count {
                return Err(CodecError("provenance index out of range"));
            }
            previous = Some(value.feature);
        }
        if !reader.bytes.is_empty() {
            return Err(CodecError("trailing bytes"));
        }
        Ok(RowView {
            provenances,
            labels,
            values,
            value_count,
        })
    }

    /// The values, in feature id order.
    pub fn values(&self) -> Values<'a> {
        Values {
            reader: Reader { bytes: self.values },
            remaining: self.value_count,
        }
    }

    /// The provenance record a value refers to.
    pub fn provenance(&self, index: u16) -> Provenance {
        let start = usize::from(index) * PROVENANCE_LEN;
        Provenance::read(&self.provenances[start..start + PROVENANCE_LEN])
            .expect("provenance records were checked when the row was parsed")
    }

    /// The owned row, labels and all.
    pub fn to_row(&self) -> StoredRow {
        let mut reader = Reader { bytes: self.labels };
        let labels: Vec<(&str, &str)> = (0..self.provenances.len() / PROVENANCE_LEN)
            .map(|_| {
                let origin_app = reader.short_text().expect("labels were checked");
                let topic_id = reader.short_text().expect("labels were checked");
                (origin_app, topic_id)
            })
            .collect();
        let values = self
            .values()
            .map(|value| {
                let provenance = self.provenance(value.provenance);
                let (origin_app, topic_id) = labels[usize::from(value.provenance)];
                StoredValue {
                    feature: value.feature,
                    event_time: provenance.event_time,
                    write_time: provenance.write_time,
                    expires_at: provenance.expires_at,
                    source: provenance.source,
                    sensitivity: provenance.sensitivity,
                    policy_version: provenance.policy_version,
                    origin_app: origin_app.to_owned(),
                    topic_id: topic_id.to_owned(),
                    microphone_permission: provenance.microphone_permission,
                    topic_confidence: provenance.topic_confidence,
                    value: value.payload.to_value(),
                }
            })
            .collect();
        StoredRow { values }
    }
}

fn read_value<'a>(reader: &mut Reader<'a>) -> Result<ValueRef<'a>, CodecError> {
    let feature = FeatureId(reader.u16()?);
    let type_tag = reader.u8()?;
    let provenance = reader.u16()?;
    let payload = reader.payload(type_tag)?;
    Ok(ValueRef {
        feature,
        provenance,
        payload,
    })
}

/// The values of a [`RowView`], in feature id order.
#[derive(Debug)]
pub struct Values<'a> {
    reader: Reader<'a>,
    remaining: u16,
}

impl<'a> Iterator for Values<'a> {
    type Item = ValueRef<'a>;

    fn next(&mut self) -> Option<ValueRef<'a>> {
        self.remaining = self.remaining.checked_sub(1)?;
        Some(read_value(&mut self.reader).expect("values were checked when the row was parsed"))
    }
}

/// One stored value, read in place.
#[derive(Clone, Copy, Debug)]
pub struct ValueRef<'a> {
    pub feature: FeatureId,
    /// Index of its record in [`RowView::provenance`].
    pub provenance: u16,
    pub payload: Payload<'a>,
}

/// Where, when and under which policy a value was written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Provenance {
    pub event_time: Timestamp,
    pub write_time: Timestamp,
    pub expires_at: Timestamp,
    pub policy_version: u64,
    pub source: SourceId,
    pub sensitivity: Sensitivity,
    pub microphone_permission: bool,
    pub topic_confidence: Option<f32>,
}

impl Provenance {
    /// Reads a fixed-size record; see the layout in [`super`].
    fn read(record: &[u8]) -> Result<Provenance, CodecError> {
        let mut reader = Reader { bytes: record };
        let event_time = Timestamp::from_unix_micros(reader.i64()?);
        let write_time = Timestamp::from_unix_micros(reader.i64()?);
        let expires_at = Timestamp::from_unix_micros(reader.i64()?);
        let policy_version = reader.u64()?;
        let source = SourceId(reader.u16()?);
        let sensitivity =
            Sensitivity::from_code(reader.u8()?).ok_or(CodecError("unknown sensitivity class"))?;
        let flags = reader.u8()?;
        if flags > FLAG_MICROPHONE | FLAG_CONFIDENCE {
            return Err(CodecError("unknown flags"));
        }
        let confidence = reader.f32()?;
        Ok(Provenance {
            event_time,
            write_time,
            expires_at,
            policy_version,
            source,
            sensitivity,
            microphone_permission: flags & FLAG_MICROPHONE != 0,
            topic_confidence: (flags & FLAG_CONFIDENCE != 0).then_some(confidence),
        })
    }
}

/// A value as stored, read in place.
#[derive(Clone, Copy, Debug)]
pub enum Payload<'a> {
    Float(f32),
    Int64(i64),
    String(&'a str),
    FloatVector(Floats<'a>),
    Sparse(SparseEntries<'a>),
}

impl Payload<'_> {
    pub fn value_type(&self) -> ValueType {
        match self {
            Payload::Float(_) => ValueType::Float,
            Payload::Int64(_) => ValueType::Int64,
            Payload::String(_) => ValueType::String,
            Payload::FloatVector(_) => ValueType::FloatVector,
            Payload::Sparse(_) => ValueType::Sparse,
        }
    }

    pub fn to_value(&self) -> Value {
        match *self {
            Payload::Float(number) => Value::Float(number),
            Payload::Int64(number) => Value::Int64(number),
            Payload::String(text) => Value::String(text.to_owned()),
            Payload::FloatVector(elements) => Value::FloatVector(elements.iter().collect()),
            Payload::Sparse(entries) => Value::Sparse(
                entries
                    .iter()
                    .map(|(topic, weight)| (topic.to_owned(), weight))
                    .collect(),
            ),
        }
    }
}

/// The elements of a stored float vector (little-endian `f32`s).
#[derive(Clone, Copy, Debug)]
pub struct Floats<'a>(&'a [u8]);

impl<'a> Floats<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        debug_assert_eq!(bytes.len() % 4, 0, "whole f32s");
        Floats(bytes)
    }

    pub fn len(&self) -> usize {
        self.0.len() / 4
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = f32> + 'a {
        self.0.chunks_exact(4).map(|element| {
            f32::from_le_bytes(element.try_into().expect("chunks of exactly four bytes"))
        })
    }

    /// Copies the elements into `out`, which has room for exactly [`Floats::len`] of them.
    pub fn copy_to(&self, out: &mut [f32]) {
        debug_assert_eq!(out.len(), self.len());
        for (slot, element) in out.iter_mut().zip(self.iter()) {
            *slot = element;
        }
    }
}

/// The (topic, weight) entries of a stored sparse value.
#[derive(Clone, Copy, Debug)]
pub struct SparseEntries<'a> {
    count: u16,
    bytes: &'a [u8],
}

impl<'a> SparseEntries<'a> {
    pub(super) fn new(count: u16, bytes: &'a [u8]) -> Self {
        SparseEntries { count, bytes }
    }

    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'a str, f32)> + 'a {
        let mut reader = Reader { bytes: self.bytes };
        (0..self.count).map(move |_| {
            let topic = reader.short_text().expect("entries were checked when read");
            let weight = reader.f32().expect("entries were checked when read");
            (topic, weight)
        })
    }
}
