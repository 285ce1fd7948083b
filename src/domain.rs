//! Validated domain types. A value of these types has passed every structural check, so
//! code past the service boundary never re-checks field presence, lengths or ranges.

use std::fmt;
use std::time::Duration;

/// A point in time, in microseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The largest representable time, used for "never expires".
    pub const MAX: Timestamp = Timestamp(i64::MAX);

    pub const fn from_unix_micros(micros: i64) -> Self {
        Timestamp(micros)
    }

    pub const fn unix_micros(self) -> i64 {
        self.0
    }

    /// `self + duration`, saturating at [`Timestamp::MAX`].
    pub fn saturating_add(self, duration: Duration) -> Self {
        let micros = i64::try_from(duration.as_micros()).unwrap_or(i64::MAX);
        Timestamp(self.0.saturating_add(micros))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}us", self.0)
    }
}

/// A (user, surface) pair to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadKey {
    pub user_id: u64,
    /// Surface name as sent; resolved against the registry by the server, so an unknown
    /// surface is a per-row answer, not a request error.
    pub surface: String,
}

/// A batched read, structurally valid and within the configured limits.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadRequest {
    pub keys: Vec<ReadKey>,
    /// Feature names in the order wanted; empty means all features of the keys' surfaces.
    pub features: Vec<String>,
    pub include_event_times: bool,
}

/// A batched write, structurally valid and within the configured limits.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteRequest {
    pub idempotency_key: String,
    pub rows: Vec<WriteRow>,
}

/// The values of one user from one interaction, for some surfaces.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteRow {
    /// Never 0.
    pub user_id: u64,
    /// 1 to [`crate::RequestLimits::TARGET_SURFACES_MAX`] names, no duplicates.
    pub target_surfaces: Vec<String>,
    pub provenance: Provenance,
    /// At least one, no feature name twice.
    pub features: Vec<FeatureWrite>,
    pub user_state_generation: u64,
}

/// Where a row's values came from, as stated by the producer.
#[derive(Clone, Debug, PartialEq)]
pub struct Provenance {
    pub source: String,
    pub origin_app: String,
    /// The event time of every value in the row; after the epoch.
    pub interaction_time: Timestamp,
    pub producer_id: String,
    pub microphone_permission_granted: bool,
}

/// One feature value in a write.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureWrite {
    pub name: String,
    pub value: Value,
    pub topic: Option<Topic>,
    /// Requested time to live; `None` means the registered TTL.
    pub ttl: Option<Duration>,
}

/// The topic a topic feature's value is about.
#[derive(Clone, Debug, PartialEq)]
pub struct Topic {
    pub id: String,
    /// In `[0, 1]` when present.
    pub confidence: Option<f32>,
}

/// A feature value. Floats are always finite.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Float(f32),
    Int64(i64),
    String(String),
    FloatVector(Vec<f32>),
    /// Topic → weight, no topic twice.
    Sparse(Vec<(String, f32)>),
}

/// The registered type of a feature's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueType {
    Float,
    Int64,
    String,
    FloatVector,
    Sparse,
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::Float(_) => ValueType::Float,
            Value::Int64(_) => ValueType::Int64,
            Value::String(_) => ValueType::String,
            Value::FloatVector(_) => ValueType::FloatVector,
            Value::Sparse(_) => ValueType::Sparse,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ValueType::Float => "float",
            ValueType::Int64 => "int64",
            ValueType::String => "string",
            ValueType::FloatVector => "float_vector",
            ValueType::Sparse => "sparse",
        })
    }
}

/// A person's age band; unknown counts as a minor for ads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AgeBand {
    Unknown,
    Minor,
    Adult,
}

impl AgeBand {
    pub const ALL: [AgeBand; 3] = [AgeBand::Unknown, AgeBand::Minor, AgeBand::Adult];

    pub fn name(self) -> &'static str {
        match self {
            AgeBand::Unknown => "unknown",
            AgeBand::Minor => "minor",
            AgeBand::Adult => "adult",
        }
    }
}

/// A change of a user's state by the privacy role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserStateUpdate {
    /// Never 0.
    pub user_id: u64,
    /// An assigned ISO 3166-1 alpha-2 code or ISO 3166-2 subdivision code, in canonical
    /// form (see [`crate::jurisdiction`]); empty when unknown.
    pub jurisdiction: String,
    pub age_band: AgeBand,
    /// Apps whose accounts are linked with each other; no duplicates. Checked against the
    /// registry's apps by the server, which alone knows them.
    pub linked_apps: Vec<String>,
    pub ads_objection: bool,
    /// Apply only if the current generation is this one.
    pub expected_generation: Option<u64>,
}
