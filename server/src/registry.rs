//! The feature registry: the surfaces, sources and features the store knows, loaded from a
//! TOML file at start-up (or the embedded default) and validated as a whole.
//!
//! Every entry has a stable numeric id besides its name. Stored keys and values carry the
//! ids, so renaming an entry never orphans data, and ids must never be reused.

use std::collections::HashSet;

use rustc_hash::FxHashMap;
use std::time::Duration;

use featurestore::domain::{Value, ValueType};
use featurestore::proto;
use serde::Deserialize;

/// The registry shipped with the server, used when the configuration names none.
pub const DEFAULT_REGISTRY_TOML: &str = include_str!("../registry.toml");

/// Stable id of a surface; part of every stored key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SurfaceId(pub u16);

/// Stable id of a feature; tags every stored value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FeatureId(pub u16);

/// Stable id of a source; a label on every stored value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceId(pub u16);

/// What a source is, as far as the policy is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Not derived from the AI assistant (engagement, ...).
    NotAi,
    /// Derived from text conversations with the AI assistant.
    AiText,
    /// Derived from voice conversations with the AI assistant (needs microphone permission).
    AiVoice,
}

impl SourceKind {
    pub const ALL: [SourceKind; 3] = [SourceKind::NotAi, SourceKind::AiText, SourceKind::AiVoice];

    pub fn name(self) -> &'static str {
        match self {
            SourceKind::NotAi => "not_ai",
            SourceKind::AiText => "ai_text",
            SourceKind::AiVoice => "ai_voice",
        }
    }
}

/// What a surface ranks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    Content,
    Ads,
}

impl Purpose {
    pub const ALL: [Purpose; 2] = [Purpose::Content, Purpose::Ads];

    pub fn name(self) -> &'static str {
        match self {
            Purpose::Content => "content",
            Purpose::Ads => "ads",
        }
    }
}

/// The special categories of personal data a topic may fall in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Sensitivity {
    None = 0,
    ReligiousViews = 1,
    SexualOrientation = 2,
    PoliticalViews = 3,
    Health = 4,
    RacialOrEthnicOrigin = 5,
    PhilosophicalBeliefs = 6,
    TradeUnionMembership = 7,
}

impl Sensitivity {
    pub const ALL: [Sensitivity; 8] = [
        Sensitivity::None,
        Sensitivity::ReligiousViews,
        Sensitivity::SexualOrientation,
        Sensitivity::PoliticalViews,
        Sensitivity::Health,
        Sensitivity::RacialOrEthnicOrigin,
        Sensitivity::PhilosophicalBeliefs,
        Sensitivity::TradeUnionMembership,
    ];

    /// The class stored as `code`, if it is one.
    pub fn from_code(code: u8) -> Option<Sensitivity> {
        Self::ALL.get(usize::from(code)).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Sensitivity::None => "none",
            Sensitivity::ReligiousViews => "religious_views",
            Sensitivity::SexualOrientation => "sexual_orientation",
            Sensitivity::PoliticalViews => "political_views",
            Sensitivity::Health => "health",
            Sensitivity::RacialOrEthnicOrigin => "racial_or_ethnic_origin",
            Sensitivity::PhilosophicalBeliefs => "philosophical_beliefs",
            Sensitivity::TradeUnionMembership => "trade_union_membership",
        }
    }

    pub fn code(self) -> u8 {
        self as u8
    }
}

#[derive(Clone, Debug)]
pub struct Surface {
    pub id: SurfaceId,
    pub name: String,
    pub app: String,
    pub purpose: Purpose,
    pub description: String,
}

#[derive(Clone, Debug)]
pub struct Source {
    pub id: SourceId,
    pub name: String,
    /// What the policy treats the source as.
    pub kind: SourceKind,
    pub description: String,
}

#[derive(Clone, Debug)]
pub struct Feature {
    pub id: FeatureId,
    pub name: String,
    pub value_type: ValueType,
    /// Required length of a float vector; 1 for floats; 0 otherwise.
    pub dimension: u32,
    pub sources: Vec<SourceId>,
    pub sensitivity: Sensitivity,
    /// Surfaces the feature is served on, in registry order.
    pub surfaces: Vec<SurfaceId>,
    pub default: Option<Value>,
    pub ttl: Duration,
    /// For string features: each value is a taxonomy topic id, held to the canonical form
    /// and classified by the policy's taxonomy like a `topic_id`.
    pub topic_valued: bool,
    pub description: String,
}

impl Feature {
    /// Whether `value` has this feature's registered type and shape.
    pub fn accepts(&self, value: &Value) -> bool {
        match value {
            Value::FloatVector(elements) => {
                self.value_type == ValueType::FloatVector
                    && elements.len() == self.dimension as usize
            }
            other => other.value_type() == self.value_type,
        }
    }
}

/// The loaded, validated registry with lookups by name and id.
#[derive(Debug)]
pub struct Registry {
    surfaces: Vec<Surface>,
    sources: Vec<Source>,
    features: Vec<Feature>,
    // Looked up for every value of every write: a fast hasher (the names come from the
    // operator's registry, not from callers, so hash flooding is no concern).
    surfaces_by_name: FxHashMap<String, usize>,
    sources_by_name: FxHashMap<String, usize>,
    features_by_name: FxHashMap<String, usize>,
    features_by_id: FxHashMap<FeatureId, usize>,
}

/// A registry that cannot be used; the message names the entry and the problem.
#[derive(Debug, thiserror::Error)]
#[error("invalid feature registry: {0}")]
pub struct RegistryError(String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    surfaces: Vec<SurfaceEntry>,
    #[serde(default)]
    sources: Vec<SourceEntry>,
    #[serde(default)]
    features: Vec<FeatureEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SurfaceEntry {
    name: String,
    id: u16,
    app: String,
    purpose: Purpose,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceEntry {
    name: String,
    id: u16,
    kind: SourceKind,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeatureEntry {
    name: String,
    id: u16,
    #[serde(rename = "type")]
    value_type: ValueTypeEntry,
    #[serde(default)]
    dimension: u32,
    sources: Vec<String>,
    sensitivity: Sensitivity,
    surfaces: Vec<String>,
    default: Option<toml::Value>,
    #[serde(with = "humantime_serde")]
    ttl: Duration,
    #[serde(default)]
    topic_valued: bool,
    #[serde(default)]
    description: String,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ValueTypeEntry {
    Float,
    Int64,
    String,
    FloatVector,
    Sparse,
}

impl From<ValueTypeEntry> for ValueType {
    fn from(entry: ValueTypeEntry) -> Self {
        match entry {
            ValueTypeEntry::Float => ValueType::Float,
            ValueTypeEntry::Int64 => ValueType::Int64,
            ValueTypeEntry::String => ValueType::String,
            ValueTypeEntry::FloatVector => ValueType::FloatVector,
            ValueTypeEntry::Sparse => ValueType::Sparse,
        }
    }
}

fn invalid(message: String) -> RegistryError {
    RegistryError(message)
}

impl Registry {
    /// Parses and validates a registry file's text.
    pub fn from_toml(text: &str) -> Result<Registry, RegistryError> {
        let file: RegistryFile =
            toml::from_str(text).map_err(|error| invalid(error.to_string()))?;
        Self::build(file)
    }

    /// The embedded default registry.
    pub fn embedded_default() -> Registry {
        Self::from_toml(DEFAULT_REGISTRY_TOML)
            .expect("the embedded registry is checked by a unit test")
    }

    fn build(file: RegistryFile) -> Result<Registry, RegistryError> {
        let mut ids = HashSet::new();
        let mut surfaces_by_name = FxHashMap::default();
        let mut surfaces = Vec::with_capacity(file.surfaces.len());
        for entry in file.surfaces {
            check_entry(
                "surface",
                &entry.name,
                entry.id,
                &mut ids,
                &surfaces_by_name,
            )?;
            if entry.app.is_empty() {
                return Err(invalid(format!("surface {:?} has no app", entry.name)));
            }
            surfaces_by_name.insert(entry.name.clone(), surfaces.len());
            surfaces.push(Surface {
                id: SurfaceId(entry.id),
                name: entry.name,
                app: entry.app,
                purpose: entry.purpose,
                description: entry.description,
            });
        }
        let mut ids = HashSet::new();
        let mut sources_by_name = FxHashMap::default();
        let mut sources = Vec::with_capacity(file.sources.len());
        for entry in file.sources {
            check_entry("source", &entry.name, entry.id, &mut ids, &sources_by_name)?;
            sources_by_name.insert(entry.name.clone(), sources.len());
            sources.push(Source {
                id: SourceId(entry.id),
                name: entry.name,
                kind: entry.kind,
                description: entry.description,
            });
        }
        let mut ids = HashSet::new();
        let mut features_by_name = FxHashMap::default();
        let mut features_by_id = FxHashMap::default();
        let mut features = Vec::with_capacity(file.features.len());
        for entry in file.features {
            check_entry(
                "feature",
                &entry.name,
                entry.id,
                &mut ids,
                &features_by_name,
            )?;
            let name = entry.name.clone();
            let feature = Self::build_feature(
                entry,
                &surfaces,
                &surfaces_by_name,
                &sources,
                &sources_by_name,
            )
            .map_err(|problem| invalid(format!("feature {name:?}: {problem}")))?;
            features_by_name.insert(name, features.len());
            features_by_id.insert(feature.id, features.len());
            features.push(feature);
        }
        Ok(Registry {
            surfaces,
            sources,
            features,
            surfaces_by_name,
            sources_by_name,
            features_by_name,
            features_by_id,
        })
    }

    fn build_feature(
        entry: FeatureEntry,
        surfaces: &[Surface],
        surfaces_by_name: &FxHashMap<String, usize>,
        sources: &[Source],
        sources_by_name: &FxHashMap<String, usize>,
    ) -> Result<Feature, String> {
        let value_type = ValueType::from(entry.value_type);
        let dimension = match value_type {
            ValueType::FloatVector => {
                let max = featurestore::RequestLimits::VECTOR_ELEMENTS_MAX as u32;
                if entry.dimension == 0 || entry.dimension > max {
                    return Err(format!("a float_vector needs a dimension from 1 to {max}"));
                }
                entry.dimension
            }
            ValueType::Float if entry.dimension <= 1 => 1,
            _ if entry.dimension == 0 => 0,
            _ => {
                return Err(format!(
                    "dimension is only for float_vector, not {value_type}"
                ));
            }
        };
        if entry.sources.is_empty() {
            return Err("lists no sources".to_string());
        }
        let sources = entry
            .sources
            .iter()
            .map(|name| {
                sources_by_name
                    .get(name)
                    .map(|&index| sources[index].id)
                    .ok_or_else(|| format!("unknown source {name:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if entry.surfaces.is_empty() {
            return Err("lists no surfaces".to_string());
        }
        let surface_ids = entry
            .surfaces
            .iter()
            .map(|name| {
                surfaces_by_name
                    .get(name)
                    .map(|&index| surfaces[index].id)
                    .ok_or_else(|| format!("unknown surface {name:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if entry.ttl.is_zero() {
            return Err("ttl must be longer than zero".to_string());
        }
        if entry.topic_valued && value_type != ValueType::String {
            return Err(format!(
                "topic_valued is only for string features, not {value_type}"
            ));
        }
        let mut feature = Feature {
            id: FeatureId(entry.id),
            name: entry.name,
            value_type,
            dimension,
            sources,
            sensitivity: entry.sensitivity,
            surfaces: surface_ids,
            default: None,
            ttl: entry.ttl,
            topic_valued: entry.topic_valued,
            description: entry.description,
        };
        if let Some(default) = entry.default {
            let value = default_value(value_type, default)?;
            if !feature.accepts(&value) {
                return Err(format!(
                    "the default does not fit the type {value_type} of dimension {dimension}"
                ));
            }
            feature.default = Some(value);
        }
        Ok(feature)
    }

    pub fn surfaces(&self) -> &[Surface] {
        &self.surfaces
    }

    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    pub fn features(&self) -> &[Feature] {
        &self.features
    }

    pub fn surface(&self, name: &str) -> Option<&Surface> {
        self.surfaces_by_name
            .get(name)
            .map(|&index| &self.surfaces[index])
    }

    pub fn source(&self, name: &str) -> Option<&Source> {
        self.sources_by_name
            .get(name)
            .map(|&index| &self.sources[index])
    }

    /// Whether `app` is the app of a registered surface: the apps a value may come from and
    /// a user may link.
    pub fn knows_app(&self, app: &str) -> bool {
        self.surfaces.iter().any(|surface| surface.app == app)
    }

    /// The apps of the registered surfaces, each once, in registry order.
    pub fn apps(&self) -> Vec<&str> {
        let mut apps: Vec<&str> = Vec::new();
        for surface in &self.surfaces {
            if !apps.contains(&surface.app.as_str()) {
                apps.push(&surface.app);
            }
        }
        apps
    }

    pub fn feature(&self, name: &str) -> Option<&Feature> {
        self.features_by_name
            .get(name)
            .map(|&index| &self.features[index])
    }

    pub fn surface_by_id(&self, id: SurfaceId) -> Option<&Surface> {
        self.surfaces.iter().find(|surface| surface.id == id)
    }

    pub fn source_by_id(&self, id: SourceId) -> Option<&Source> {
        self.sources.iter().find(|source| source.id == id)
    }

    pub fn feature_by_id(&self, id: FeatureId) -> Option<&Feature> {
        self.features_by_id
            .get(&id)
            .map(|&index| &self.features[index])
    }

    /// Wire form of the feature list, for ListFeatures.
    pub fn feature_definitions(&self) -> Vec<proto::FeatureDefinition> {
        self.features
            .iter()
            .map(|feature| proto::FeatureDefinition {
                name: feature.name.clone(),
                value_type: proto::ValueType::from(feature.value_type) as i32,
                dimension: if feature.value_type == ValueType::FloatVector {
                    feature.dimension
                } else {
                    0
                },
                sources: feature
                    .sources
                    .iter()
                    .filter_map(|id| self.sources.iter().find(|source| source.id == *id))
                    .map(|source| source.name.clone())
                    .collect(),
                sensitivity: sensitivity_to_proto(feature.sensitivity) as i32,
                surfaces: feature
                    .surfaces
                    .iter()
                    .filter_map(|id| self.surfaces.iter().find(|surface| surface.id == *id))
                    .map(|surface| surface.name.clone())
                    .collect(),
                default_value: feature.default.clone().map(|value| proto::FeatureValue {
                    name: feature.name.clone(),
                    value: Some(value.into()),
                    ..Default::default()
                }),
                ttl_seconds: feature.ttl.as_secs(),
                topic_valued: feature.topic_valued,
                description: feature.description.clone(),
            })
            .collect()
    }

    /// Wire form of the surface list, for ListSurfaces.
    pub fn surface_definitions(&self) -> Vec<proto::SurfaceDefinition> {
        self.surfaces
            .iter()
            .map(|surface| proto::SurfaceDefinition {
                name: surface.name.clone(),
                app: surface.app.clone(),
                purpose: match surface.purpose {
                    Purpose::Content => proto::Purpose::Content,
                    Purpose::Ads => proto::Purpose::Ads,
                } as i32,
                description: surface.description.clone(),
            })
            .collect()
    }
}

fn check_entry(
    kind: &str,
    name: &str,
    id: u16,
    ids: &mut HashSet<u16>,
    by_name: &FxHashMap<String, usize>,
) -> Result<(), RegistryError> {
    if name.is_empty() || name.len() > featurestore::RequestLimits::NAME_BYTES_MAX {
        return Err(invalid(format!(
            "{kind} name {name:?} must be 1 to 128 bytes"
        )));
    }
    if by_name.contains_key(name) {
        return Err(invalid(format!("{kind} {name:?} is registered twice")));
    }
    if id == 0 {
        return Err(invalid(format!("{kind} {name:?} has id 0; ids start at 1")));
    }
    if !ids.insert(id) {
        return Err(invalid(format!("{kind} {name:?} reuses id {id}")));
    }
    Ok(())
}

fn sensitivity_to_proto(sensitivity: Sensitivity) -> proto::SensitivityClass {
    match sensitivity {
        Sensitivity::None => proto::SensitivityClass::None,
        Sensitivity::ReligiousViews => proto::SensitivityClass::ReligiousViews,
        Sensitivity::SexualOrientation => proto::SensitivityClass::SexualOrientation,
        Sensitivity::PoliticalViews => proto::SensitivityClass::PoliticalViews,
        Sensitivity::Health => proto::SensitivityClass::Health,
        Sensitivity::RacialOrEthnicOrigin => proto::SensitivityClass::RacialOrEthnicOrigin,
        Sensitivity::PhilosophicalBeliefs => proto::SensitivityClass::PhilosophicalBeliefs,
        Sensitivity::TradeUnionMembership => proto::SensitivityClass::TradeUnionMembership,
    }
}

fn default_value(value_type: ValueType, value: toml::Value) -> Result<Value, String> {
    let as_float = |value: &toml::Value| match value {
        toml::Value::Float(number) => Some(*number as f32),
        toml::Value::Integer(number) => Some(*number as f32),
        _ => None,
    };
    let mismatch = || format!("the default is not a {value_type}");
    match value_type {
        ValueType::Float => as_float(&value).map(Value::Float).ok_or_else(mismatch),
        ValueType::Int64 => value.as_integer().map(Value::Int64).ok_or_else(mismatch),
        ValueType::String => value
            .as_str()
            .map(|text| Value::String(text.to_string()))
            .ok_or_else(mismatch),
        ValueType::FloatVector => value
            .as_array()
            .and_then(|elements| elements.iter().map(as_float).collect::<Option<Vec<_>>>())
            .map(Value::FloatVector)
            .ok_or_else(mismatch),
        ValueType::Sparse => value
            .as_table()
            .and_then(|table| {
                table
                    .iter()
                    .map(|(topic, weight)| as_float(weight).map(|weight| (topic.clone(), weight)))
                    .collect::<Option<Vec<_>>>()
            })
            .map(Value::Sparse)
            .ok_or_else(mismatch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_registry_is_valid() {
        let registry =
            Registry::from_toml(DEFAULT_REGISTRY_TOML).expect("embedded registry parses");
        assert!(registry.surface("facebook_feed").is_some());
        assert!(registry.feature("interest_hiking").is_some());
    }

    #[test]
    fn invalid_registries_are_refused_with_the_entry_named() {
        let duplicate_id = r#"
            [[surfaces]]
            name = "a"
            id = 1
            app = "facebook"
            purpose = "content"
            [[surfaces]]
            name = "b"
            id = 1
            app = "facebook"
            purpose = "ads"
        "#;
        let error = Registry::from_toml(duplicate_id).expect_err("duplicate id refused");
        assert!(error.to_string().contains("\"b\" reuses id 1"), "{error}");

        let unknown_surface = r#"
            [[sources]]
            name = "ai_chat"
            id = 1
            kind = "ai_text"
            [[features]]
            name = "f"
            id = 1
            type = "float"
            sources = ["ai_chat"]
            sensitivity = "none"
            surfaces = ["nowhere"]
            ttl = "1d"
        "#;
        let error = Registry::from_toml(unknown_surface).expect_err("unknown surface refused");
        assert!(
            error.to_string().contains("unknown surface \"nowhere\""),
            "{error}"
        );

        let topic_valued_float = DEFAULT_REGISTRY_TOML.replacen(
            "default = 0.0\nttl = \"90days\"",
            "default = 0.0\nttl = \"90days\"\ntopic_valued = true",
            1,
        );
        assert_ne!(topic_valued_float, DEFAULT_REGISTRY_TOML);
        let error =
            Registry::from_toml(&topic_valued_float).expect_err("a topic-valued float refused");
        assert!(
            error
                .to_string()
                .contains("topic_valued is only for string features, not float"),
            "{error}"
        );
    }

    #[test]
    fn the_apps_are_those_of_the_surfaces() {
        let registry = Registry::embedded_default();
        assert_eq!(registry.apps(), ["facebook", "instagram"]);
        assert!(registry.knows_app("instagram"));
        assert!(!registry.knows_app("Instagram") && !registry.knows_app("whatsapp"));
        assert!(
            registry
                .feature("top_topic")
                .is_some_and(|feature| feature.topic_valued)
        );
    }
}
