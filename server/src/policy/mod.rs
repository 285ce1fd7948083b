//! The write-time privacy policy: a bundle file ([`bundle`]) compiled into a decision table
//! over the bucketed inputs ([`inputs`]), so that deciding one (feature, target surface) is
//! one array lookup.

pub mod bundle;
pub mod inputs;
#[cfg(test)]
pub(crate) mod reference;

use rustc_hash::FxHashMap;
use std::time::Duration;

use featurestore::domain::{Timestamp, Value};
use featurestore::proto::ReasonCode;

pub use bundle::{DEFAULT_BUNDLE_TOML, PolicyError, Rule};
pub use inputs::{AgeBand, Confidence, DecisionInput, Dimension, JurisdictionGroup};

use crate::registry::{Feature, Purpose, Sensitivity, Source, SourceId, SourceKind, Surface};
use crate::storage::UserState;

/// What a value brings to a decision, whether it arrives in a write or is already stored.
#[derive(Clone, Copy, Debug)]
pub struct ValueFacts<'a> {
    pub source: &'a Source,
    pub interaction_time: Timestamp,
    pub microphone_permission: bool,
    pub origin_app: &'a str,
    pub sensitivity: Sensitivity,
    /// The value is about a topic (see [`TopicClass::is_topic_value`]): without a
    /// confidence it counts as below the bundle's threshold.
    pub topic_value: bool,
    pub topic_confidence: Option<f32>,
}

/// What the taxonomy makes of the topics a value carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopicClass {
    /// The value's sensitivity class: the feature's registered class, else that of the
    /// first sensitive topic.
    pub sensitivity: Sensitivity,
    /// Every topic of the value is in canonical form ([`is_canonical_topic`]); a value
    /// with one that is not cannot be placed in the taxonomy, and is refused.
    pub canonical: bool,
    /// The value has a topic id, or is the value of a topic-valued feature: a topic
    /// inference, whose confidence the ads rules look at.
    pub is_topic_value: bool,
}

/// Whether `topic` is a taxonomy topic id in its one canonical form: segments of lower-case
/// ASCII letters, digits and `_`, separated by single `/` (no empty segment, no spaces), at
/// most [`featurestore::RequestLimits::NAME_BYTES_MAX`] bytes.
pub fn is_canonical_topic(topic: &str) -> bool {
    topic.len() <= featurestore::RequestLimits::NAME_BYTES_MAX
        && topic.split('/').all(|segment| {
            !segment.is_empty()
                && segment
                    .bytes()
                    .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_')
        })
}

/// A set of reason codes, one bit per code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Reasons(u32);

impl Reasons {
    pub const NONE: Reasons = Reasons(0);

    pub fn of(reason: ReasonCode) -> Reasons {
        Reasons(1 << (reason as u32))
    }

    pub fn with(self, reason: ReasonCode) -> Reasons {
        Reasons(self.0 | Self::of(reason).0)
    }

    pub fn union(self, other: Reasons) -> Reasons {
        Reasons(self.0 | other.0)
    }

    /// The set as bits, one per code (as the audit log stores it).
    pub fn bits(self) -> u32 {
        self.0
    }

    pub fn from_bits(bits: u32) -> Reasons {
        Reasons(bits)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, reason: ReasonCode) -> bool {
        self.0 & Self::of(reason).0 != 0
    }

    /// The codes in the set, in code order.
    pub fn iter(self) -> impl Iterator<Item = ReasonCode> {
        (0..32)
            .filter(move |bit| self.0 & (1 << bit) != 0)
            .filter_map(|bit| ReasonCode::try_from(bit).ok())
    }
}

/// A loaded, validated and compiled policy bundle.
#[derive(Debug)]
pub struct Policy {
    /// The bundle's own version label, e.g. "v1".
    pub version: String,
    /// Hex SHA-256 of the bundle file: stamped on every decision and audit record.
    pub hash: String,
    /// The first 8 bytes of the hash, stamped on every stored value.
    pub hash_prefix: u64,
    /// AI-derived signals from interactions before this time are never used.
    pub effective_date: Timestamp,
    /// Topic confidence under which a value is kept out of ads.
    pub low_confidence_threshold: f32,
    /// The rules, as written in the bundle (disabled ones included).
    pub rules: Vec<Rule>,
    /// Every assigned jurisdiction code ("DE", "US-CA") → its group: the bundle's, else
    /// "other". A code not in the map is not an assigned ISO 3166 code, and is "unknown".
    /// Looked up for every decision; the codes come from ISO 3166, so a fast hasher.
    jurisdictions: FxHashMap<&'static str, JurisdictionGroup>,
    /// Topic prefix → sensitivity class, longest prefix first.
    taxonomy: Vec<(String, Sensitivity)>,
    /// Retention per source and purpose (indexed by `Purpose as usize`); a few entries,
    /// scanned.
    retention: Vec<(SourceId, [Duration; 2])>,
    /// Retention of sources the table does not list.
    default_retention: [Duration; 2],
    /// The compiled decisions: the reasons refusing each input, by input index.
    table: Box<[Reasons]>,
    /// Per (source kind, sensitivity, purpose): whether no input with these labels is
    /// allowed, so that the read path can refuse such a value from its labels alone.
    forbidden_labels: [[[bool; 2]; 8]; 3],
}

impl Policy {
    /// The reasons that refuse a value with this input; empty when it is admitted.
    #[inline]
    pub fn decide(&self, input: &DecisionInput) -> Reasons {
        self.table[input.index()]
    }

    /// Buckets everything a decision depends on. `state` is the user's state (none counts
    /// as unknown jurisdiction and age, no objection, no linked accounts).
    pub fn input(
        &self,
        facts: &ValueFacts<'_>,
        state: Option<&UserState>,
        surface: &Surface,
        now: Timestamp,
    ) -> DecisionInput {
        let linked = |app: &str| {
            state.is_some_and(|state| state.linked_apps.iter().any(|linked| linked == app))
        };
        DecisionInput {
            source_kind: facts.source.kind,
            before_effective_date: facts.interaction_time < self.effective_date,
            microphone_permission: facts.microphone_permission,
            jurisdiction_group: state.map_or(JurisdictionGroup::Unknown, |state| {
                self.jurisdiction_group(&state.jurisdiction)
            }),
            age_band: state.map_or(AgeBand::Unknown, |state| state.age_band),
            ads_objection: state.is_some_and(|state| state.ads_objection),
            sensitivity: facts.sensitivity,
            purpose: surface.purpose,
            cross_app_unlinked: facts.origin_app != surface.app
                && !(linked(facts.origin_app) && linked(&surface.app)),
            confidence: match facts.topic_confidence {
                // A topic inference that states no confidence is not trusted for ads.
                None if facts.topic_value => Confidence::Below,
                None => Confidence::NotApplicable,
                Some(confidence) if confidence < self.low_confidence_threshold => Confidence::Below,
                Some(_) => Confidence::AtOrAbove,
            },
            retention_expired: self.retention_end(facts, surface.purpose) <= now,
        }
    }

    /// When a value may no longer be used for `purpose`: interaction time + retention.
    pub fn retention_end(&self, facts: &ValueFacts<'_>, purpose: Purpose) -> Timestamp {
        facts
            .interaction_time
            .saturating_add(self.retention(facts.source.id, purpose))
    }

    /// Whether a stored value with these labels may be served on a surface for `purpose`:
    /// false when the bundle refuses every value with these labels there, whoever the user.
    #[inline]
    pub fn labels_allowed(
        &self,
        source_kind: SourceKind,
        sensitivity: Sensitivity,
        purpose: Purpose,
    ) -> bool {
        !self.forbidden_labels[source_kind as usize][usize::from(sensitivity.code())]
            [purpose as usize]
    }

    /// Whether this bundle may refuse a value that `old` admitted: a decision that `old`
    /// allowed and this one denies, or any change to how inputs are bucketed (dates,
    /// threshold, jurisdiction groups, taxonomy, retention).
    pub fn tightens(&self, old: &Policy) -> bool {
        let bucketing_changed = self.effective_date != old.effective_date
            || self.low_confidence_threshold != old.low_confidence_threshold
            || self.jurisdictions != old.jurisdictions
            || self.taxonomy != old.taxonomy
            || self.retention != old.retention
            || self.default_retention != old.default_retention;
        bucketing_changed
            || self
                .table
                .iter()
                .zip(old.table.iter())
                .any(|(new, old)| old.is_empty() && !new.is_empty())
    }

    /// The group of a jurisdiction code. Empty is unknown, and so is anything that is not
    /// an assigned ISO 3166 code in canonical form (fail closed: a code the bundle cannot
    /// place is never "other"); an assigned code not listed by the bundle, nor its country,
    /// is other.
    pub fn jurisdiction_group(&self, code: &str) -> JurisdictionGroup {
        self.jurisdictions
            .get(code)
            .copied()
            .unwrap_or(JurisdictionGroup::Unknown)
    }

    /// Classifies the topics a value carries: its `topic_id`, its value when `feature` is
    /// topic-valued, and the topics of a sparse value.
    pub fn classify(&self, feature: &Feature, topic_id: Option<&str>, value: &Value) -> TopicClass {
        let mut class = TopicClass {
            sensitivity: feature.sensitivity,
            canonical: true,
            is_topic_value: topic_id.is_some(),
        };
        let mut add = |topic: &str| {
            class.canonical &= is_canonical_topic(topic);
            if class.sensitivity == Sensitivity::None {
                class.sensitivity = self.topic_sensitivity(topic);
            }
        };
        if let Some(topic) = topic_id {
            add(topic);
        }
        match value {
            Value::String(topic) if feature.topic_valued => {
                add(topic);
                class.is_topic_value = true;
            }
            Value::Sparse(entries) => entries.iter().for_each(|(topic, _)| add(topic)),
            Value::Float(_) | Value::Int64(_) | Value::String(_) | Value::FloatVector(_) => {}
        }
        class
    }

    /// The sensitivity class of a taxonomy topic: the class of its longest listed prefix
    /// (matched on whole path segments), or none.
    pub fn topic_sensitivity(&self, topic: &str) -> Sensitivity {
        self.taxonomy
            .iter()
            .find(|(prefix, _)| {
                topic == prefix
                    || (topic.starts_with(prefix.as_str())
                        && topic.as_bytes().get(prefix.len()) == Some(&b'/'))
            })
            .map_or(Sensitivity::None, |(_, class)| *class)
    }

    /// How long after the interaction a value from `source` may be used for `purpose`.
    pub fn retention(&self, source: SourceId, purpose: Purpose) -> Duration {
        self.retention
            .iter()
            .find(|(id, _)| *id == source)
            .map_or(&self.default_retention, |(_, retention)| retention)[purpose as usize]
    }
}
