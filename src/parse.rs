//! Conversion of wire messages into domain types, done once on receipt, and back again for
//! the client. Every structural check lives here; the error names the offending field.

use std::collections::HashSet;
use std::time::Duration;

use crate::domain::{
    AgeBand, FeatureWrite, Provenance, ReadKey, ReadRequest, Timestamp, Topic, UserStateUpdate,
    Value, ValueType, WriteRequest, WriteRow,
};
use crate::proto;

/// A request that is malformed or over a limit. `field` is a path into the request such as
/// `rows[3].features[0].vector_value`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidRequest {
    pub field: String,
    pub problem: String,
}

impl InvalidRequest {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        InvalidRequest {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// Prefixes the field path with the path of the enclosing message.
    fn within(mut self, parent: impl std::fmt::Display) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

/// The configurable request limits that parsing enforces. The fixed limits of the protocol
/// are associated constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// Most keys in one read.
    pub read_keys_max: usize,
    /// Most feature names in one read's selection.
    pub read_features_max: usize,
    /// Most rows in one write.
    pub write_rows_max: usize,
    /// Most feature values in one write row.
    pub features_per_row_max: usize,
    /// Most rows in one chunk of a bulk load.
    pub load_chunk_rows_max: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            read_keys_max: 1000,
            read_features_max: 1000,
            write_rows_max: 1000,
            features_per_row_max: 256,
            load_chunk_rows_max: 10_000,
        }
    }
}

impl RequestLimits {
    /// Longest name (feature, surface, source, app, topic), in bytes.
    pub const NAME_BYTES_MAX: usize = 128;
    /// Longest idempotency key and producer id, in bytes.
    pub const IDENTIFIER_BYTES_MAX: usize = 128;
    /// Most target surfaces in one write row.
    pub const TARGET_SURFACES_MAX: usize = 16;
    /// Longest string value, in bytes.
    pub const STRING_VALUE_BYTES_MAX: usize = 65_536;
    /// Most elements in a float vector value.
    pub const VECTOR_ELEMENTS_MAX: usize = 4096;
    /// Most entries in a sparse value.
    pub const SPARSE_ENTRIES_MAX: usize = 1024;

    /// Parses a read request.
    pub fn parse_read(
        &self,
        request: proto::GetFeaturesRequest,
    ) -> Result<ReadRequest, InvalidRequest> {
        check_count(
            "keys",
            request.keys.len(),
            0,
            self.read_keys_max,
            "read_keys_max",
        )?;
        check_count(
            "features",
            request.features.len(),
            0,
            self.read_features_max,
            "read_features_max",
        )?;
        let keys = request
            .keys
            .into_iter()
            .enumerate()
            .map(|(index, key)| {
                check_name("surface", &key.surface)
                    .map_err(|error| error.within(format_args!("keys[{index}]")))?;
                Ok(ReadKey {
                    user_id: key.user_id,
                    surface: key.surface,
                })
            })
            .collect::<Result<Vec<_>, InvalidRequest>>()?;
        let mut seen = HashSet::with_capacity(request.features.len());
        for (index, name) in request.features.iter().enumerate() {
            check_name(format!("features[{index}]"), name)?;
            if !seen.insert(name.as_str()) {
                return Err(InvalidRequest::new(
                    format!("features[{index}]"),
                    format!("feature {name:?} is selected twice"),
                ));
            }
        }
        Ok(ReadRequest {
            keys,
            features: request.features,
            include_event_times: request.include_event_times,
        })
    }

    /// Parses a write request.
    pub fn parse_write(
        &self,
        request: proto::WriteFeaturesRequest,
    ) -> Result<WriteRequest, InvalidRequest> {
        check_identifier("idempotency_key", &request.idempotency_key)?;
        check_count(
            "rows",
            request.rows.len(),
            0,
            self.write_rows_max,
            "write_rows_max",
        )?;
        let rows = request
            .rows
            .into_iter()
            .enumerate()
            .map(|(index, row)| {
                self.parse_row(row)
                    .map_err(|error| error.within(format_args!("rows[{index}]")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(WriteRequest {
            idempotency_key: request.idempotency_key,
            rows,
        })
    }

    /// Parses the rows of a bulk-load chunk one by one: the well-formed rows with their
    /// index in the chunk, and the malformed ones with their problem, so that one bad row
    /// does not fail the chunk. Only a chunk over the size limit fails as a whole.
    #[allow(clippy::type_complexity)]
    pub fn parse_load_chunk(
        &self,
        rows: Vec<proto::WriteRow>,
    ) -> Result<(Vec<(usize, WriteRow)>, Vec<(usize, InvalidRequest)>), InvalidRequest> {
        check_count(
            "rows",
            rows.len(),
            1,
            self.load_chunk_rows_max,
            "load_chunk_rows_max",
        )?;
        let mut parsed = Vec::with_capacity(rows.len());
        let mut invalid = Vec::new();
        for (index, row) in rows.into_iter().enumerate() {
            match self.parse_row(row) {
                Ok(row) => parsed.push((index, row)),
                Err(error) => invalid.push((index, error)),
            }
        }
        Ok((parsed, invalid))
    }

    fn parse_row(&self, row: proto::WriteRow) -> Result<WriteRow, InvalidRequest> {
        if row.user_id == 0 {
            return Err(InvalidRequest::new("user_id", "must not be 0"));
        }
        check_count(
            "target_surfaces",
            row.target_surfaces.len(),
            1,
            Self::TARGET_SURFACES_MAX,
            "target surfaces per row",
        )?;
        check_unique_names(
            "target_surfaces",
            row.target_surfaces.iter().map(String::as_str),
        )?;
        let provenance = row
            .provenance
            .ok_or_else(|| InvalidRequest::new("provenance", "is required"))
            .and_then(|provenance| {
                Provenance::try_from(provenance).map_err(|e| e.within("provenance"))
            })?;
        check_count(
            "features",
            row.features.len(),
            1,
            self.features_per_row_max,
            "features_per_row_max",
        )?;
        check_unique_names(
            "features",
            row.features.iter().map(|feature| feature.name.as_str()),
        )?;
        let features = row
            .features
            .into_iter()
            .enumerate()
            .map(|(index, feature)| {
                FeatureWrite::try_from(feature)
                    .map_err(|error| error.within(format_args!("features[{index}]")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(WriteRow {
            user_id: row.user_id,
            target_surfaces: row.target_surfaces,
            provenance,
            features,
            user_state_generation: row.user_state_generation,
        })
    }
}

fn check_count(
    field: &str,
    count: usize,
    min: usize,
    max: usize,
    limit: &str,
) -> Result<(), InvalidRequest> {
    if count < min {
        return Err(InvalidRequest::new(
            field,
            format!("needs at least {min} entries"),
        ));
    }
    if count > max {
        return Err(InvalidRequest::new(
            field,
            format!("{count} entries exceed the limit {limit} = {max}"),
        ));
    }
    Ok(())
}

fn check_name(field: impl Into<String>, name: &str) -> Result<(), InvalidRequest> {
    check_text(field, name, RequestLimits::NAME_BYTES_MAX)
}

fn check_identifier(field: impl Into<String>, identifier: &str) -> Result<(), InvalidRequest> {
    check_text(field, identifier, RequestLimits::IDENTIFIER_BYTES_MAX)
}

fn check_text(
    field: impl Into<String>,
    text: &str,
    bytes_max: usize,
) -> Result<(), InvalidRequest> {
    if text.is_empty() {
        return Err(InvalidRequest::new(field, "must not be empty"));
    }
    if text.len() > bytes_max {
        return Err(InvalidRequest::new(
            field,
            format!(
                "is {} bytes, longer than the limit of {bytes_max}",
                text.len()
            ),
        ));
    }
    Ok(())
}

fn check_unique_names<'a>(
    field: &str,
    names: impl Iterator<Item = &'a str>,
) -> Result<(), InvalidRequest> {
    // Called for every row: the field path is only formatted for an error, and duplicates
    // are found by sorting (rows hold tens of names, where that beats hashing).
    let names: Vec<&str> = names.collect();
    for (index, name) in names.iter().enumerate() {
        check_name("", name)
            .map_err(|error| InvalidRequest::new(format!("{field}[{index}]"), error.problem))?;
    }
    let mut sorted = names.clone();
    sorted.sort_unstable();
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0] == pair[1]) {
        let twice = pair[0];
        let index = names
            .iter()
            .enumerate()
            .filter(|(_, name)| **name == twice)
            .nth(1)
            .map_or(0, |(index, _)| index);
        return Err(InvalidRequest::new(
            format!("{field}[{index}]"),
            format!("{twice:?} appears twice"),
        ));
    }
    Ok(())
}

fn check_finite(field: impl Into<String>, value: f32) -> Result<f32, InvalidRequest> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(InvalidRequest::new(
            field,
            format!("{value} is not a finite number"),
        ))
    }
}

impl TryFrom<proto::Provenance> for Provenance {
    type Error = InvalidRequest;

    fn try_from(provenance: proto::Provenance) -> Result<Self, Self::Error> {
        check_name("source", &provenance.source)?;
        check_name("origin_app", &provenance.origin_app)?;
        check_identifier("producer_id", &provenance.producer_id)?;
        if provenance.interaction_time_unix_micros <= 0 {
            return Err(InvalidRequest::new(
                "interaction_time_unix_micros",
                "is required and must be after the Unix epoch",
            ));
        }
        Ok(Provenance {
            source: provenance.source,
            origin_app: provenance.origin_app,
            interaction_time: Timestamp::from_unix_micros(provenance.interaction_time_unix_micros),
            producer_id: provenance.producer_id,
            microphone_permission_granted: provenance.microphone_permission_granted,
        })
    }
}

impl TryFrom<proto::FeatureValue> for FeatureWrite {
    type Error = InvalidRequest;

    fn try_from(feature: proto::FeatureValue) -> Result<Self, Self::Error> {
        check_name("name", &feature.name)?;
        let value = feature
            .value
            .ok_or_else(|| InvalidRequest::new("value", "is required"))
            .and_then(Value::try_from)?;
        let topic = if feature.topic_id.is_empty() {
            if feature.topic_confidence.is_some() {
                return Err(InvalidRequest::new(
                    "topic_confidence",
                    "is set without a topic_id",
                ));
            }
            None
        } else {
            check_name("topic_id", &feature.topic_id)?;
            let confidence = feature
                .topic_confidence
                .map(|confidence| {
                    if (0.0..=1.0).contains(&confidence) {
                        Ok(confidence)
                    } else {
                        Err(InvalidRequest::new(
                            "topic_confidence",
                            format!("{confidence} is outside [0, 1]"),
                        ))
                    }
                })
                .transpose()?;
            Some(Topic {
                id: feature.topic_id,
                confidence,
            })
        };
        let ttl = (feature.ttl_seconds > 0).then(|| Duration::from_secs(feature.ttl_seconds));
        Ok(FeatureWrite {
            name: feature.name,
            value,
            topic,
            ttl,
        })
    }
}

impl TryFrom<proto::feature_value::Value> for Value {
    type Error = InvalidRequest;

    fn try_from(value: proto::feature_value::Value) -> Result<Self, Self::Error> {
        use proto::feature_value::Value as Wire;
        Ok(match value {
            Wire::FloatValue(value) => Value::Float(check_finite("float_value", value)?),
            Wire::Int64Value(value) => Value::Int64(value),
            Wire::StringValue(value) => {
                if value.len() > RequestLimits::STRING_VALUE_BYTES_MAX {
                    return Err(InvalidRequest::new(
                        "string_value",
                        format!(
                            "is {} bytes, longer than the limit of {}",
                            value.len(),
                            RequestLimits::STRING_VALUE_BYTES_MAX
                        ),
                    ));
                }
                Value::String(value)
            }
            Wire::VectorValue(vector) => {
                check_count(
                    "vector_value.values",
                    vector.values.len(),
                    1,
                    RequestLimits::VECTOR_ELEMENTS_MAX,
                    "vector elements",
                )?;
                for (index, element) in vector.values.iter().enumerate() {
                    check_finite(format!("vector_value.values[{index}]"), *element)?;
                }
                Value::FloatVector(vector.values)
            }
            Wire::SparseValue(sparse) => Value::Sparse(parse_sparse("sparse_value", sparse)?),
        })
    }
}

fn parse_sparse(
    field: &str,
    sparse: proto::SparseVector,
) -> Result<Vec<(String, f32)>, InvalidRequest> {
    if sparse.topics.len() != sparse.weights.len() {
        return Err(InvalidRequest::new(
            field,
            format!(
                "has {} topics but {} weights; they must pair up",
                sparse.topics.len(),
                sparse.weights.len()
            ),
        ));
    }
    check_count(
        &format!("{field}.topics"),
        sparse.topics.len(),
        0,
        RequestLimits::SPARSE_ENTRIES_MAX,
        "sparse entries",
    )?;
    check_unique_names(
        &format!("{field}.topics"),
        sparse.topics.iter().map(String::as_str),
    )?;
    sparse
        .topics
        .into_iter()
        .zip(sparse.weights)
        .enumerate()
        .map(|(index, (topic, weight))| {
            Ok((
                topic,
                check_finite(format!("{field}.weights[{index}]"), weight)?,
            ))
        })
        .collect()
}

impl From<ValueType> for proto::ValueType {
    fn from(value_type: ValueType) -> Self {
        match value_type {
            ValueType::Float => proto::ValueType::Float,
            ValueType::Int64 => proto::ValueType::Int64,
            ValueType::String => proto::ValueType::String,
            ValueType::FloatVector => proto::ValueType::FloatVector,
            ValueType::Sparse => proto::ValueType::Sparse,
        }
    }
}

impl TryFrom<proto::ValueType> for ValueType {
    type Error = InvalidRequest;

    fn try_from(value_type: proto::ValueType) -> Result<Self, Self::Error> {
        match value_type {
            proto::ValueType::Unspecified => {
                Err(InvalidRequest::new("value_type", "is unspecified"))
            }
            proto::ValueType::Float => Ok(ValueType::Float),
            proto::ValueType::Int64 => Ok(ValueType::Int64),
            proto::ValueType::String => Ok(ValueType::String),
            proto::ValueType::FloatVector => Ok(ValueType::FloatVector),
            proto::ValueType::Sparse => Ok(ValueType::Sparse),
        }
    }
}

// Domain → wire, used by clients to send requests.

impl From<ReadRequest> for proto::GetFeaturesRequest {
    fn from(request: ReadRequest) -> Self {
        proto::GetFeaturesRequest {
            keys: request
                .keys
                .into_iter()
                .map(|key| proto::FeatureKey {
                    user_id: key.user_id,
                    surface: key.surface,
                })
                .collect(),
            features: request.features,
            include_event_times: request.include_event_times,
        }
    }
}

impl From<WriteRequest> for proto::WriteFeaturesRequest {
    fn from(request: WriteRequest) -> Self {
        proto::WriteFeaturesRequest {
            idempotency_key: request.idempotency_key,
            rows: request
                .rows
                .into_iter()
                .map(proto::WriteRow::from)
                .collect(),
        }
    }
}

impl From<WriteRow> for proto::WriteRow {
    fn from(row: WriteRow) -> Self {
        proto::WriteRow {
            user_id: row.user_id,
            target_surfaces: row.target_surfaces,
            provenance: Some(proto::Provenance {
                source: row.provenance.source,
                origin_app: row.provenance.origin_app,
                interaction_time_unix_micros: row.provenance.interaction_time.unix_micros(),
                producer_id: row.provenance.producer_id,
                microphone_permission_granted: row.provenance.microphone_permission_granted,
            }),
            features: row
                .features
                .into_iter()
                .map(proto::FeatureValue::from)
                .collect(),
            user_state_generation: row.user_state_generation,
        }
    }
}

impl From<FeatureWrite> for proto::FeatureValue {
    fn from(feature: FeatureWrite) -> Self {
        let (topic_id, topic_confidence) = match feature.topic {
            Some(topic) => (topic.id, topic.confidence),
            None => (String::new(), None),
        };
        proto::FeatureValue {
            name: feature.name,
            value: Some(feature.value.into()),
            topic_id,
            topic_confidence,
            ttl_seconds: feature.ttl.map_or(0, |ttl| ttl.as_secs()),
        }
    }
}

impl From<Value> for proto::feature_value::Value {
    fn from(value: Value) -> Self {
        use proto::feature_value::Value as Wire;
        match value {
            Value::Float(value) => Wire::FloatValue(value),
            Value::Int64(value) => Wire::Int64Value(value),
            Value::String(value) => Wire::StringValue(value),
            Value::FloatVector(values) => Wire::VectorValue(proto::FloatVector { values }),
            Value::Sparse(entries) => {
                let (topics, weights) = entries.into_iter().unzip();
                Wire::SparseValue(proto::SparseVector { topics, weights })
            }
        }
    }
}

/// Most apps in one user's linked accounts.
const LINKED_APPS_MAX: usize = 16;

impl TryFrom<proto::SetUserStateRequest> for UserStateUpdate {
    type Error = InvalidRequest;

    fn try_from(request: proto::SetUserStateRequest) -> Result<Self, Self::Error> {
        let state = request
            .state
            .ok_or_else(|| InvalidRequest::new("state", "is required"))?;
        if state.user_id == 0 {
            return Err(InvalidRequest::new("state.user_id", "must not be 0"));
        }
        if state.jurisdiction.len() > RequestLimits::NAME_BYTES_MAX {
            return Err(InvalidRequest::new(
                "state.jurisdiction",
                format!(
                    "is {} bytes, longer than the limit of {}",
                    state.jurisdiction.len(),
                    RequestLimits::NAME_BYTES_MAX
                ),
            ));
        }
        let jurisdiction = crate::jurisdiction::canonical(&state.jurisdiction)
            .map_err(|problem| InvalidRequest::new("state.jurisdiction", problem))?;
        let age_band = match proto::AgeBand::try_from(state.age_band) {
            Ok(proto::AgeBand::Unknown) => AgeBand::Unknown,
            Ok(proto::AgeBand::Minor) => AgeBand::Minor,
            Ok(proto::AgeBand::Adult) => AgeBand::Adult,
            Ok(proto::AgeBand::Unspecified) | Err(_) => {
                return Err(InvalidRequest::new(
                    "state.age_band",
                    "is required: AGE_BAND_UNKNOWN, AGE_BAND_MINOR or AGE_BAND_ADULT",
                ));
            }
        };
        check_count(
            "state.linked_apps",
            state.linked_apps.len(),
            0,
            LINKED_APPS_MAX,
            "linked apps",
        )?;
        check_unique_names(
            "state.linked_apps",
            state.linked_apps.iter().map(String::as_str),
        )?;
        Ok(UserStateUpdate {
            user_id: state.user_id,
            jurisdiction,
            age_band,
            linked_apps: state.linked_apps,
            ads_objection: state.ads_objection,
            expected_generation: (request.expected_generation > 0)
                .then_some(request.expected_generation),
        })
    }
}

impl From<AgeBand> for proto::AgeBand {
    fn from(age_band: AgeBand) -> Self {
        match age_band {
            AgeBand::Unknown => proto::AgeBand::Unknown,
            AgeBand::Minor => proto::AgeBand::Minor,
            AgeBand::Adult => proto::AgeBand::Adult,
        }
    }
}

impl From<UserStateUpdate> for proto::SetUserStateRequest {
    fn from(update: UserStateUpdate) -> Self {
        proto::SetUserStateRequest {
            state: Some(proto::UserState {
                user_id: update.user_id,
                jurisdiction: update.jurisdiction,
                age_band: proto::AgeBand::from(update.age_band) as i32,
                linked_apps: update.linked_apps,
                ads_objection: update.ads_objection,
                ..Default::default()
            }),
            expected_generation: update.expected_generation.unwrap_or(0),
        }
    }
}
