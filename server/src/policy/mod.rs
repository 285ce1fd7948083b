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

use crate::registry::{Purpose, Sensitivity, Source, SourceId, SourceKind, Surface};
use crate::storage::UserState;

/// What a value brings to a decision, whether it arrives in a write or is already stored.
#[derive(Clone, Copy, Debug)]
pub struct ValueFacts<'a> {
    pub source: &'a Source,
    pub interaction_time: Timestamp,
    pub microphone_permission: bool,
    pub origin_app: &'a str,
    pub sensitivity: Sensitivity,
    pub topic_confidence: Option<f32>,
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
    /// Jurisdiction code ("DE", "US-CA") → group; codes not listed are "other".
    /// Looked up for every decision; the codes come from the bundle, so a fast hasher.
    jurisdictions: FxHashMap<String, JurisdictionGroup>,
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

    /// The group of a jurisdiction code: exact match first ("US-CA"), then the country
    /// part ("DE" for "DE-BY"); empty is unknown; anything else unlisted is other.
    pub fn jurisdiction_group(&self, code: &str) -> JurisdictionGroup {
        if code.is_empty() {
            return JurisdictionGroup::Unknown;
        }
        // Stored codes are upper case already; only others pay for the conversion.
        if code.bytes().any(|byte| byte.is_ascii_lowercase()) {
            return self.jurisdiction_group(&code.to_ascii_uppercase());
        }
        if let Some(group) = self.jurisdictions.get(code) {
            return *group;
        }
        let country = code.split('-').next().unwrap_or(code);
        self.jurisdictions
            .get(country)
            .copied()
            .unwrap_or(JurisdictionGroup::Other)
    }

    /// A value's sensitivity class: the feature's registered class, else the taxonomy's
    /// class of the value's topic, else that of the first sensitive topic of a sparse value.
    pub fn value_sensitivity(
        &self,
        registered: Sensitivity,
        topic: Option<&str>,
        value: &Value,
    ) -> Sensitivity {
        if registered != Sensitivity::None {
            return registered;
        }
        let topic = topic.map_or(Sensitivity::None, |topic| self.topic_sensitivity(topic));
        if topic != Sensitivity::None {
            return topic;
        }
        match value {
            Value::Sparse(entries) => entries
                .iter()
                .map(|(topic, _)| self.topic_sensitivity(topic))
                .find(|class| *class != Sensitivity::None)
                .unwrap_or(Sensitivity::None),
            Value::Float(_) | Value::Int64(_) | Value::String(_) | Value::FloatVector(_) => {
                Sensitivity::None
            }
        }
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
