//! The bucketed inputs of one policy decision, and their enumeration. Every input is a
//! small enumeration, so the whole input space is small enough to decide ahead of time
//! into a table indexed by [`DecisionInput::index`].

pub use featurestore::domain::AgeBand;

use crate::registry::{Purpose, Sensitivity, SourceKind};

/// Jurisdiction groups the bundle sorts user jurisdictions into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JurisdictionGroup {
    Eea,
    Uk,
    Kr,
    UsCa,
    Other,
    Unknown,
}

impl JurisdictionGroup {
    pub const ALL: [JurisdictionGroup; 6] = [
        JurisdictionGroup::Eea,
        JurisdictionGroup::Uk,
        JurisdictionGroup::Kr,
        JurisdictionGroup::UsCa,
        JurisdictionGroup::Other,
        JurisdictionGroup::Unknown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            JurisdictionGroup::Eea => "eea",
            JurisdictionGroup::Uk => "uk",
            JurisdictionGroup::Kr => "kr",
            JurisdictionGroup::UsCa => "us_ca",
            JurisdictionGroup::Other => "other",
            JurisdictionGroup::Unknown => "unknown",
        }
    }
}

/// A topic confidence compared with the bundle's threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Confidence {
    /// The value states no confidence (not a topic value).
    NotApplicable,
    Below,
    AtOrAbove,
}

impl Confidence {
    pub const ALL: [Confidence; 3] = [
        Confidence::NotApplicable,
        Confidence::Below,
        Confidence::AtOrAbove,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Confidence::NotApplicable => "not_applicable",
            Confidence::Below => "below",
            Confidence::AtOrAbove => "at_or_above",
        }
    }
}

/// Everything one (feature, target surface) decision depends on, bucketed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecisionInput {
    pub source_kind: SourceKind,
    /// The interaction happened before the bundle's effective date.
    pub before_effective_date: bool,
    pub microphone_permission: bool,
    pub jurisdiction_group: JurisdictionGroup,
    pub age_band: AgeBand,
    pub ads_objection: bool,
    /// The value's sensitivity class (from the registry or the topic taxonomy).
    pub sensitivity: Sensitivity,
    /// The target surface's purpose.
    pub purpose: Purpose,
    /// The origin app is not the surface's app and the user's accounts are not linked.
    pub cross_app_unlinked: bool,
    pub confidence: Confidence,
    /// Interaction time + the bundle's retention for (source, purpose) is already past.
    pub retention_expired: bool,
}

/// One input dimension, as named in bundle files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dimension {
    SourceKind,
    BeforeEffectiveDate,
    MicrophonePermission,
    JurisdictionGroup,
    AgeBand,
    AdsObjection,
    Sensitivity,
    Purpose,
    CrossAppUnlinked,
    Confidence,
    RetentionExpired,
}

const BOOLEAN_VALUES: [&str; 2] = ["false", "true"];

impl Dimension {
    pub const ALL: [Dimension; 11] = [
        Dimension::SourceKind,
        Dimension::BeforeEffectiveDate,
        Dimension::MicrophonePermission,
        Dimension::JurisdictionGroup,
        Dimension::AgeBand,
        Dimension::AdsObjection,
        Dimension::Sensitivity,
        Dimension::Purpose,
        Dimension::CrossAppUnlinked,
        Dimension::Confidence,
        Dimension::RetentionExpired,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Dimension::SourceKind => "source_kind",
            Dimension::BeforeEffectiveDate => "before_effective_date",
            Dimension::MicrophonePermission => "microphone_permission",
            Dimension::JurisdictionGroup => "jurisdiction_group",
            Dimension::AgeBand => "age_band",
            Dimension::AdsObjection => "ads_objection",
            Dimension::Sensitivity => "sensitivity",
            Dimension::Purpose => "purpose",
            Dimension::CrossAppUnlinked => "cross_app_unlinked",
            Dimension::Confidence => "confidence",
            Dimension::RetentionExpired => "retention_expired",
        }
    }

    pub fn from_name(name: &str) -> Option<Dimension> {
        Self::ALL
            .into_iter()
            .find(|dimension| dimension.name() == name)
    }

    /// The names of the dimension's values, in ordinal order. Booleans are "false", "true".
    pub fn values(self) -> Vec<&'static str> {
        match self {
            Dimension::SourceKind => SourceKind::ALL.iter().map(|kind| kind.name()).collect(),
            Dimension::JurisdictionGroup => JurisdictionGroup::ALL
                .iter()
                .map(|group| group.name())
                .collect(),
            Dimension::AgeBand => AgeBand::ALL.iter().map(|band| band.name()).collect(),
            Dimension::Sensitivity => Sensitivity::ALL.iter().map(|class| class.name()).collect(),
            Dimension::Purpose => Purpose::ALL.iter().map(|purpose| purpose.name()).collect(),
            Dimension::Confidence => Confidence::ALL
                .iter()
                .map(|confidence| confidence.name())
                .collect(),
            Dimension::BeforeEffectiveDate
            | Dimension::MicrophonePermission
            | Dimension::AdsObjection
            | Dimension::CrossAppUnlinked
            | Dimension::RetentionExpired => BOOLEAN_VALUES.to_vec(),
        }
    }

    pub fn cardinality(self) -> usize {
        match self {
            Dimension::SourceKind => SourceKind::ALL.len(),
            Dimension::JurisdictionGroup => JurisdictionGroup::ALL.len(),
            Dimension::AgeBand => AgeBand::ALL.len(),
            Dimension::Sensitivity => Sensitivity::ALL.len(),
            Dimension::Purpose => Purpose::ALL.len(),
            Dimension::Confidence => Confidence::ALL.len(),
            Dimension::BeforeEffectiveDate
            | Dimension::MicrophonePermission
            | Dimension::AdsObjection
            | Dimension::CrossAppUnlinked
            | Dimension::RetentionExpired => 2,
        }
    }
}

impl DecisionInput {
    /// How many distinct inputs there are: the size of a compiled table.
    pub const COMBINATIONS: usize = 3 * 2 * 2 * 6 * 3 * 2 * 8 * 2 * 2 * 3 * 2;

    /// The ordinal of this input's value in `dimension`: its place in the type's `ALL`
    /// list, which is the declaration order (a test checks this for every value).
    pub fn ordinal(&self, dimension: Dimension) -> usize {
        match dimension {
            Dimension::SourceKind => self.source_kind as usize,
            Dimension::BeforeEffectiveDate => usize::from(self.before_effective_date),
            Dimension::MicrophonePermission => usize::from(self.microphone_permission),
            Dimension::JurisdictionGroup => self.jurisdiction_group as usize,
            Dimension::AgeBand => self.age_band as usize,
            Dimension::AdsObjection => usize::from(self.ads_objection),
            Dimension::Sensitivity => usize::from(self.sensitivity.code()),
            Dimension::Purpose => self.purpose as usize,
            Dimension::CrossAppUnlinked => usize::from(self.cross_app_unlinked),
            Dimension::Confidence => self.confidence as usize,
            Dimension::RetentionExpired => usize::from(self.retention_expired),
        }
    }

    /// The table index of this input: its ordinals in mixed radix.
    #[inline]
    pub fn index(&self) -> usize {
        let mut index = 0;
        for dimension in Dimension::ALL {
            index = index * dimension.cardinality() + self.ordinal(dimension);
        }
        debug_assert!(index < Self::COMBINATIONS);
        index
    }

    /// The input at table index `index` (the inverse of [`DecisionInput::index`]).
    pub fn from_index(mut index: usize) -> DecisionInput {
        assert!(
            index < Self::COMBINATIONS,
            "index {index} is outside the input space"
        );
        let mut ordinals = [0usize; Dimension::ALL.len()];
        for (slot, dimension) in Dimension::ALL.iter().enumerate().rev() {
            ordinals[slot] = index % dimension.cardinality();
            index /= dimension.cardinality();
        }
        DecisionInput {
            source_kind: SourceKind::ALL[ordinals[0]],
            before_effective_date: ordinals[1] == 1,
            microphone_permission: ordinals[2] == 1,
            jurisdiction_group: JurisdictionGroup::ALL[ordinals[3]],
            age_band: AgeBand::ALL[ordinals[4]],
            ads_objection: ordinals[5] == 1,
            sensitivity: Sensitivity::ALL[ordinals[6]],
            purpose: Purpose::ALL[ordinals[7]],
            cross_app_unlinked: ordinals[8] == 1,
            confidence: Confidence::ALL[ordinals[9]],
            retention_expired: ordinals[10] == 1,
        }
    }

    /// Every possible input, in index order.
    pub fn all() -> impl Iterator<Item = DecisionInput> {
        (0..Self::COMBINATIONS).map(Self::from_index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_input_space_is_the_product_of_the_dimensions() {
        let product: usize = Dimension::ALL
            .iter()
            .map(|dimension| dimension.cardinality())
            .product();
        assert_eq!(product, DecisionInput::COMBINATIONS);
        for dimension in Dimension::ALL {
            assert_eq!(
                dimension.values().len(),
                dimension.cardinality(),
                "{}",
                dimension.name()
            );
        }
    }

    #[test]
    fn ordinals_are_places_in_the_all_lists() {
        for (ordinal, kind) in SourceKind::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, ordinal);
        }
        for (ordinal, purpose) in Purpose::ALL.into_iter().enumerate() {
            assert_eq!(purpose as usize, ordinal);
        }
        for (ordinal, class) in Sensitivity::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(class.code()), ordinal);
        }
        for (ordinal, group) in JurisdictionGroup::ALL.into_iter().enumerate() {
            assert_eq!(group as usize, ordinal);
        }
        for (ordinal, band) in AgeBand::ALL.into_iter().enumerate() {
            assert_eq!(band as usize, ordinal);
        }
        for (ordinal, confidence) in Confidence::ALL.into_iter().enumerate() {
            assert_eq!(confidence as usize, ordinal);
        }
    }

    #[test]
    fn index_and_from_index_are_inverse_over_the_whole_space() {
        for index in 0..DecisionInput::COMBINATIONS {
            assert_eq!(DecisionInput::from_index(index).index(), index);
        }
    }
}
