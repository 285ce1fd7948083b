//! The policy bundle file format: a TOML document with the bundle's version, effective
//! date, confidence threshold, jurisdiction groups, topic taxonomy, retention table and
//! rules. Loading validates all of it and compiles the rules into the decision table.
//!
//! A rule is "deny with REASON when every listed input is one of the listed values":
//!
//! ```toml
//! [[rules]]
//! reason = "AI_SIGNAL_REGION_EXCLUDED"
//! when = { source_kind = ["ai_text", "ai_voice"], jurisdiction_group = ["eea", "uk", "kr", "unknown"] }
//! ```

use std::collections::{HashMap, HashSet};
use std::time::{Duration, UNIX_EPOCH};

use featurestore::domain::Timestamp;
use featurestore::proto::ReasonCode;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::inputs::{DecisionInput, Dimension, JurisdictionGroup};
use super::{Policy, Reasons};
use crate::registry::{Registry, Sensitivity};

/// The bundle shipped with the server, used when the configuration names none.
pub const DEFAULT_BUNDLE_TOML: &str = include_str!("../../policy/bundle-v1.toml");

/// Reasons a bundle rule may give: the ones decided per (feature, surface) from the
/// bucketed inputs. Registry problems and the request-level fences are not rules.
const RULE_REASONS: [ReasonCode; 10] = [
    ReasonCode::AiSignalRegionExcluded,
    ReasonCode::AiSignalBeforeEffectiveDate,
    ReasonCode::SensitiveTopicForAds,
    ReasonCode::SensitiveTopicForContent,
    ReasonCode::MinorOrUnknownAgeForAds,
    ReasonCode::CrossAppNotLinked,
    ReasonCode::AdsObjection,
    ReasonCode::MicPermissionMissing,
    ReasonCode::LowConfidenceForAds,
    ReasonCode::RetentionExpired,
];

/// A bundle that cannot be used; the message names the problem.
#[derive(Debug, thiserror::Error)]
#[error("invalid policy bundle: {0}")]
pub struct PolicyError(String);

fn invalid(message: impl Into<String>) -> PolicyError {
    PolicyError(message.into())
}

/// One compiled rule.
#[derive(Clone, Debug)]
pub struct Rule {
    pub reason: ReasonCode,
    pub enabled: bool,
    pub description: String,
    /// Per dimension, the bit set of the value ordinals the rule applies to; dimensions
    /// the rule does not mention are absent (any value).
    pub conditions: Vec<(Dimension, u32)>,
}

impl Rule {
    pub fn matches(&self, input: &DecisionInput) -> bool {
        self.conditions
            .iter()
            .all(|(dimension, allowed)| allowed & (1 << input.ordinal(*dimension)) != 0)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BundleFile {
    version: String,
    effective_date: String,
    low_confidence_threshold: f32,
    jurisdiction_groups: HashMap<String, Vec<String>>,
    taxonomy: HashMap<String, Sensitivity>,
    retention: HashMap<String, RetentionEntry>,
    rules: Vec<RuleEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionEntry {
    #[serde(with = "humantime_serde")]
    content: Duration,
    #[serde(with = "humantime_serde")]
    ads: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    reason: String,
    #[serde(default = "enabled_by_default")]
    enabled: bool,
    #[serde(default)]
    description: String,
    when: toml::Table,
}

fn enabled_by_default() -> bool {
    true
}

impl Policy {
    /// Parses, validates and compiles a bundle. Source names in its retention table are
    /// checked against `registry`.
    pub fn from_toml(text: &str, registry: &Registry) -> Result<Policy, PolicyError> {
        let file: BundleFile = toml::from_str(text).map_err(|error| invalid(error.to_string()))?;
        if file.version.is_empty() {
            return Err(invalid("version must not be empty"));
        }
        let effective_date = humantime::parse_rfc3339(&file.effective_date)
            .ok()
            .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
            .and_then(|since| i64::try_from(since.as_micros()).ok())
            .map(Timestamp::from_unix_micros)
            .ok_or_else(|| {
                invalid(format!(
                    "effective_date {:?} is not an RFC 3339 UTC time",
                    file.effective_date
                ))
            })?;
        if !(0.0..=1.0).contains(&file.low_confidence_threshold) {
            return Err(invalid(format!(
                "low_confidence_threshold {} is outside [0, 1]",
                file.low_confidence_threshold
            )));
        }
        let jurisdictions = jurisdictions(file.jurisdiction_groups)?;
        let taxonomy = taxonomy(file.taxonomy)?;

        let (default_retention, retention) = retention(&file.retention, registry)?;

        let rules = rules(file.rules)?;

        let mut policy = Policy {
            version: file.version,
            hash: String::new(),
            hash_prefix: 0,
            effective_date,
            low_confidence_threshold: file.low_confidence_threshold,
            rules,
            jurisdictions,
            taxonomy,
            retention,
            default_retention,
            table: Box::default(),
            forbidden_labels: [[[true; 2]; 8]; 3],
        };
        let digest = Sha256::digest(text.as_bytes());
        policy.hash = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        policy.hash_prefix = u64::from_be_bytes(
            digest[..8]
                .try_into()
                .expect("a SHA-256 digest has 32 bytes"),
        );
        policy.table = compile(&policy.rules);
        for input in DecisionInput::all() {
            if policy.decide(&input).is_empty() {
                policy.forbidden_labels[input.source_kind as usize]
                    [usize::from(input.sensitivity.code())][input.purpose as usize] = false;
            }
        }
        Ok(policy)
    }

    /// The embedded default bundle, for `registry`.
    pub fn embedded_default(registry: &Registry) -> Result<Policy, PolicyError> {
        Self::from_toml(DEFAULT_BUNDLE_TOML, registry)
    }
}

/// Decides every input ahead of time.
fn compile(rules: &[Rule]) -> Box<[Reasons]> {
    let enabled: Vec<&Rule> = rules.iter().filter(|rule| rule.enabled).collect();
    DecisionInput::all()
        .map(|input| {
            enabled
                .iter()
                .filter(|rule| rule.matches(&input))
                .fold(Reasons::NONE, |reasons, rule| reasons.with(rule.reason))
        })
        .collect()
}

/// The bundle's name of a reason code, e.g. "ADS_OBJECTION".
pub fn reason_name(reason: ReasonCode) -> &'static str {
    reason.as_str_name().trim_start_matches("REASON_CODE_")
}

fn parse_rule(entry: RuleEntry) -> Result<Rule, String> {
    let reason = ReasonCode::from_str_name(&format!("REASON_CODE_{}", entry.reason))
        .filter(|reason| RULE_REASONS.contains(reason))
        .ok_or_else(|| {
            let names: Vec<_> = RULE_REASONS
                .iter()
                .map(|reason| reason_name(*reason))
                .collect();
            format!(
                "reason {:?} is not one of {}",
                entry.reason,
                names.join(", ")
            )
        })?;
    if entry.when.is_empty() {
        return Err(
            "\"when\" lists no conditions; a rule that always denies is a mistake".to_string(),
        );
    }
    let conditions = entry
        .when
        .iter()
        .map(|(name, values)| {
            let dimension = Dimension::from_name(name).ok_or_else(|| {
                let names: Vec<_> = Dimension::ALL
                    .iter()
                    .map(|dimension| dimension.name())
                    .collect();
                format!("unknown input {name:?}; inputs are {}", names.join(", "))
            })?;
            Ok((dimension, value_set(dimension, values)?))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Rule {
        reason,
        enabled: entry.enabled,
        description: entry.description,
        conditions,
    })
}

/// The ordinal bit set of a condition's values: a value or an array of values, strings
/// for enumerations and booleans for flags.
fn value_set(dimension: Dimension, values: &toml::Value) -> Result<u32, String> {
    let names = dimension.values();
    let list = match values {
        toml::Value::Array(list) => list.clone(),
        single => vec![single.clone()],
    };
    if list.is_empty() {
        return Err(format!("{} lists no values", dimension.name()));
    }
    let mut set = 0u32;
    for value in &list {
        let text = match value {
            toml::Value::String(text) => text.clone(),
            toml::Value::Boolean(flag) => flag.to_string(),
            other => {
                return Err(format!(
                    "{}: {other} is neither a string nor a boolean",
                    dimension.name()
                ));
            }
        };
        let ordinal = names.iter().position(|name| *name == text).ok_or_else(|| {
            format!(
                "{}: {text:?} is not one of {}",
                dimension.name(),
                names.join(", ")
            )
        })?;
        set |= 1 << ordinal;
    }
    Ok(set)
}

/// The group of every assigned jurisdiction code: the bundle's group of the code, else that
/// of its country, else "other". Codes the bundle lists must be assigned ISO 3166 codes.
fn jurisdictions(
    groups: HashMap<String, Vec<String>>,
) -> Result<rustc_hash::FxHashMap<&'static str, JurisdictionGroup>, PolicyError> {
    let mut listed: HashMap<String, JurisdictionGroup> = HashMap::new();
    for (name, codes) in groups {
        let group = JurisdictionGroup::ALL
            .into_iter()
            .filter(|group| !matches!(group, JurisdictionGroup::Other | JurisdictionGroup::Unknown))
            .find(|group| group.name() == name)
            .ok_or_else(|| {
                invalid(format!(
                    "jurisdiction group {name:?} is not one of eea, uk, kr, us_ca"
                ))
            })?;
        for code in codes {
            let canonical = featurestore::jurisdiction::canonical(&code)
                .ok()
                .filter(|canonical| !canonical.is_empty() && *canonical == code)
                .ok_or_else(|| {
                    invalid(format!(
                        "jurisdiction code {code:?} in {name} is not an assigned ISO 3166 code \
                         in canonical form (\"DE\", \"US-CA\")"
                    ))
                })?;
            if let Some(previous) = listed.insert(canonical, group) {
                return Err(invalid(format!(
                    "jurisdiction {code:?} is in both {} and {name}",
                    previous.name()
                )));
            }
        }
    }
    Ok(featurestore::jurisdiction::assigned_codes()
        .map(|code| {
            let group = listed
                .get(code)
                .or_else(|| listed.get(featurestore::jurisdiction::country(code)))
                .copied()
                .unwrap_or(JurisdictionGroup::Other);
            (code, group)
        })
        .collect())
}

/// The taxonomy's topics, each in canonical form, longest first (so that the most specific
/// topic a value names is found first).
fn taxonomy(file: HashMap<String, Sensitivity>) -> Result<Vec<(String, Sensitivity)>, PolicyError> {
    let mut taxonomy: Vec<(String, Sensitivity)> = file.into_iter().collect();
    if let Some((topic, _)) = taxonomy
        .iter()
        .find(|(topic, _)| !super::is_canonical_topic(topic))
    {
        return Err(invalid(format!(
            "taxonomy topic {topic:?} is not in canonical form: lower-case segments of \
             a-z, 0-9 and _, separated by single /"
        )));
    }
    taxonomy.sort_by(|(a, _), (b, _)| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    Ok(taxonomy)
}

/// The retention per source (by registry id, sorted) and the default, each longer than
/// zero; every source named must be registered.
#[allow(clippy::type_complexity)]
fn retention(
    file: &HashMap<String, RetentionEntry>,
    registry: &Registry,
) -> Result<
    (
        [Duration; 2],
        Vec<(crate::registry::SourceId, [Duration; 2])>,
    ),
    PolicyError,
> {
    let default_retention = file
        .get("default")
        .map(|entry| [entry.content, entry.ads])
        .ok_or_else(|| invalid("retention needs a \"default\" entry"))?;
    let mut retention = Vec::new();
    for (source, entry) in file {
        if source == "default" {
            continue;
        }
        let id = registry
            .source(source)
            .ok_or_else(|| invalid(format!("retention names unknown source {source:?}")))?
            .id;
        retention.push((id, [entry.content, entry.ads]));
    }
    // Sorted, so that `Policy::tightens` compares retention tables by value.
    retention.sort_by_key(|(id, _)| *id);
    if let Some(zero) = file
        .iter()
        .find(|(_, entry)| entry.content.is_zero() || entry.ads.is_zero())
    {
        return Err(invalid(format!(
            "retention of {:?} must be longer than zero",
            zero.0
        )));
    }
    Ok((default_retention, retention))
}

/// The rules, each parsed and at most one per reason.
fn rules(entries: Vec<RuleEntry>) -> Result<Vec<Rule>, PolicyError> {
    let mut seen = HashSet::new();
    entries
        .into_iter()
        .enumerate()
        .map(|(index, entry)| {
            let rule = parse_rule(entry)
                .map_err(|problem| invalid(format!("rules[{index}]: {problem}")))?;
            if !seen.insert(rule.reason) {
                return Err(invalid(format!(
                    "rules[{index}]: a second rule for {}",
                    reason_name(rule.reason)
                )));
            }
            Ok(rule)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Policy, PolicyError> {
        Policy::from_toml(text, &Registry::embedded_default())
    }

    #[test]
    fn invalid_bundles_are_refused_naming_the_problem() {
        let cases = [
            (
                "effective_date = \"2025-12-16T00:00:00Z\"",
                "effective_date = \"yesterday\"",
                "effective_date \"yesterday\"",
            ),
            (
                "low_confidence_threshold = 0.6",
                "low_confidence_threshold = 1.5",
                "outside [0, 1]",
            ),
            (
                "uk = [\"GB\"]",
                "uk = [\"GB\", \"DE\"]",
                "\"DE\" is in both",
            ),
            (
                "us_ca = [\"US-CA\"]",
                "us_ca = [\"US-CA\"]\nmars = [\"MA\"]",
                "group \"mars\"",
            ),
            (
                "\"politics\" = \"political_views\"",
                "\"Politics\" = \"political_views\"",
                "taxonomy topic \"Politics\" is not in canonical form",
            ),
            (
                "\"politics\" = \"political_views\"",
                "\"politics/\" = \"political_views\"",
                "taxonomy topic \"politics/\" is not in canonical form",
            ),
            (
                "uk = [\"GB\"]",
                "uk = [\"UK\"]",
                "jurisdiction code \"UK\" in uk is not an assigned ISO 3166 code",
            ),
            (
                "kr = [\"KR\"]",
                "kr = [\"kr\"]",
                "jurisdiction code \"kr\" in kr is not an assigned ISO 3166 code",
            ),
            (
                "us_ca = [\"US-CA\"]",
                "us_ca = [\"US-XX\"]",
                "jurisdiction code \"US-XX\" in us_ca is not an assigned ISO 3166 code",
            ),
            (
                "ai_voice = { content",
                "podcasts = { content = \"1d\", ads = \"1d\" }\nai_voice = { content",
                "unknown source \"podcasts\"",
            ),
            (
                "reason = \"ADS_OBJECTION\"",
                "reason = \"BECAUSE\"",
                "rules[6]: reason \"BECAUSE\" is not one of",
            ),
            (
                "when = { purpose = \"ads\", ads_objection = true }",
                "when = { purpose = \"ads\", objection = true }",
                "rules[6]: unknown input \"objection\"",
            ),
            (
                "when = { purpose = \"ads\", ads_objection = true }",
                "when = { purpose = \"billboards\" }",
                "rules[6]: purpose: \"billboards\" is not one of content, ads",
            ),
            (
                "when = { purpose = \"ads\", ads_objection = true }",
                "when = {}",
                "rules[6]: \"when\" lists no conditions",
            ),
            (
                "reason = \"ADS_OBJECTION\"",
                "reason = \"ADS_OBJECTION\"\nunknown_key = 1",
                "unknown field `unknown_key`",
            ),
            (
                "reason = \"ADS_OBJECTION\"",
                "reason = \"CROSS_APP_NOT_LINKED\"",
                "rules[6]: a second rule for CROSS_APP_NOT_LINKED",
            ),
        ];
        for (original, replacement, expected) in cases {
            let text = DEFAULT_BUNDLE_TOML.replacen(original, replacement, 1);
            assert_ne!(
                text, DEFAULT_BUNDLE_TOML,
                "{original:?} is in the default bundle"
            );
            let error = load(&text).expect_err(expected);
            assert!(
                error.to_string().contains(expected),
                "expected {expected:?} in {error}"
            );
        }
    }

    #[test]
    fn the_default_bundle_is_hashed_and_looks_up_its_tables() {
        let policy = load(DEFAULT_BUNDLE_TOML).expect("valid");
        assert_eq!(policy.version, "v1");
        assert_eq!(policy.hash.len(), 64);
        assert_eq!(
            policy
                .hash_prefix
                .to_be_bytes()
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect::<String>(),
            policy.hash[..16]
        );
        assert_eq!(policy.jurisdiction_group("DE"), JurisdictionGroup::Eea);
        assert_eq!(policy.jurisdiction_group("DE-BY"), JurisdictionGroup::Eea);
        assert_eq!(policy.jurisdiction_group("GB-ENG"), JurisdictionGroup::Uk);
        assert_eq!(policy.jurisdiction_group("US-CA"), JurisdictionGroup::UsCa);
        assert_eq!(policy.jurisdiction_group("US-NY"), JurisdictionGroup::Other);
        assert_eq!(policy.jurisdiction_group("US"), JurisdictionGroup::Other);
        assert_eq!(policy.jurisdiction_group(""), JurisdictionGroup::Unknown);
        // Whatever is not an assigned code in canonical form cannot be placed: unknown,
        // never other (a state stored before codes were checked may hold one).
        for code in [
            "de", "UK", "EL", "DEU", "276", "XK", "EU", "ZZ", "US-XX", "Europe", " DE",
        ] {
            assert_eq!(
                policy.jurisdiction_group(code),
                JurisdictionGroup::Unknown,
                "{code:?}"
            );
        }
        assert_eq!(policy.topic_sensitivity("health"), Sensitivity::Health);
        assert_eq!(
            policy.topic_sensitivity("health/diabetes"),
            Sensitivity::Health
        );
        assert_eq!(
            policy.topic_sensitivity("healthy_recipes"),
            Sensitivity::None,
            "whole segments only"
        );
        assert_eq!(
            policy.topic_sensitivity("work/trade_unions/strikes"),
            Sensitivity::TradeUnionMembership
        );
        assert_eq!(policy.topic_sensitivity("work/careers"), Sensitivity::None);
        // A different bundle text is a different hash.
        let other = load(&DEFAULT_BUNDLE_TOML.replace("version = \"v1\"", "version = \"v1.1\""))
            .expect("valid");
        assert_ne!(other.hash, policy.hash);
    }
}
