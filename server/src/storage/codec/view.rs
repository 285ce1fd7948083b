//! Reading a stored row in place: the read path's view of the current format, which
//! copies nothing, allocates nothing, and reads each value once.

use featurestore::domain::{Timestamp, Value, ValueType};

use super::{
    CodecError, FLAG_CONFIDENCE, FLAG_MICROPHONE, FORMAT_VERSION, PROVENANCE_LEN, Reader,
    checked_body,
};
use crate::registry::{FeatureId, Sensitivity, SourceId};
use crate::storage::{StoredRow, StoredValue};

/// A row in the current format whose checksum, header and provenance records were checked
/// when it was parsed (its labels' lengths too; their text when [`RowView::to_row`] copies
/// them); its values are checked as they are read, in one pass.
#[derive(Clone, Copy, Debug)]
pub struct RowView<'a> {
    provenances: &'a [u8],
    labels: &'a [u8],
    values: &'a [u8],
    value_count: u16,
}

impl<'a> RowView<'a> {
    /// Checks a row in the current format (version 2; see [`super::current_format`] for
    /// older ones) up to its values.
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
        // The labels are only stepped over: the read path serves none of them, and
        // `to_row` checks their text when it copies them.
        let labels_start = reader.bytes;
        for _ in 0..provenance_count * 2 {
            let len = usize::from(reader.u8()?);
            reader.take(len)?;
        }
        let labels = &labels_start[..labels_start.len() - reader.bytes.len()];
        Ok(RowView {
            provenances,
            labels,
            values: reader.bytes,
            value_count,
        })
    }

    /// The values, in feature id order, each checked as it is read: a damaged one ends
    /// the iteration with an error.
    pub fn values(&self) -> Values<'a> {
        Values {
            reader: Reader { bytes: self.values },
            remaining: self.value_count,
            provenance_count: self.provenance_count(),
            previous: None,
        }
    }

    fn provenance_count(&self) -> u16 {
        u16::try_from(self.provenances.len() / PROVENANCE_LEN)
            .expect("the count was read from a u16")
    }

    /// The provenance record of a value [`RowView::values`] returned.
    pub fn provenance(&self, index: u16) -> Provenance {
        let start = usize::from(index) * PROVENANCE_LEN;
        Provenance::read(&self.provenances[start..start + PROVENANCE_LEN])
            .expect("provenance records were checked when the row was parsed")
    }

    /// The owned row, labels and all, every value and label checked.
    pub fn to_row(&self) -> Result<StoredRow, CodecError> {
        let mut reader = Reader { bytes: self.labels };
        let labels: Vec<(&str, &str)> = (0..self.provenance_count())
            .map(|_| Ok((reader.short_text()?, reader.short_text()?)))
            .collect::<Result<_, CodecError>>()?;
        let values = self
            .values()
            .map(|value| {
                let value = value?;
                let provenance = self.provenance(value.provenance);
                let (origin_app, topic_id) = labels[usize::from(value.provenance)];
                Ok(StoredValue {
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
                })
            })
            .collect::<Result<_, CodecError>>()?;
        Ok(StoredRow { values })
    }
}

/// The values of a [`RowView`], in feature id order, each checked: its bytes, its order
/// after the previous one, its provenance index; bytes left after the last value are an
/// error too. After an error the iteration ends.
#[derive(Debug)]
pub struct Values<'a> {
    reader: Reader<'a>,
    remaining: u16,
    provenance_count: u16,
    previous: Option<FeatureId>,
}

impl<'a> Values<'a> {
    fn read(&mut self) -> Result<ValueRef<'a>, CodecError> {
        // The fixed part in one bounds check: feature:u16 type:u8 provenance:u16.
        let [
            feature_low,
            feature_high,
            type_tag,
            provenance_low,
            provenance_high,
        ] = self.reader.array::<5>()?;
        let feature = FeatureId(u16::from_le_bytes([feature_low, feature_high]));
        let provenance = u16::from_le_bytes([provenance_low, provenance_high]);
        let payload = self.reader.payload(type_tag)?;
        if self.previous.is_some_and(|previous| previous >= feature) {
            return Err(CodecError("feature ids out of order"));
        }
        if provenance >= self.provenance_count {
            return Err(CodecError("provenance index out of range"));
        }
        self.previous = Some(feature);
        Ok(ValueRef {
            feature,
            provenance,
            payload,
        })
    }
}

impl<'a> Iterator for Values<'a> {
    type Item = Result<ValueRef<'a>, CodecError>;

    fn next(&mut self) -> Option<Self::Item> {
        let read = match self.remaining.checked_sub(1) {
            Some(remaining) => {
                self.remaining = remaining;
                self.read()
            }
            None if self.reader.bytes.is_empty() => return None,
            None => Err(CodecError("trailing bytes")),
        };
        if read.is_err() {
            self.remaining = 0;
            self.reader.bytes = &[];
        }
        Some(read)
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

    pub fn iter(&self) -> impl Iterator<Item = (&'a str, f32)> + 'a {
        let mut reader = Reader { bytes: self.bytes };
        (0..self.count).map(move |_| {
            let topic = reader.short_text().expect("entries were checked when read");
            let weight = reader.f32().expect("entries were checked when read");
            (topic, weight)
        })
    }
}
