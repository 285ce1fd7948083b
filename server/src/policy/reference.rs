//! A straightforward evaluation of the write-time rules, written from the policy's prose
//! rather than from the bundle, and the exhaustive check that the compiled table agrees
//! with it on every input.

use featurestore::proto::ReasonCode;

use super::inputs::{AgeBand, Confidence, DecisionInput, JurisdictionGroup};
use super::{Policy, Reasons};
use crate::registry::{Purpose, Registry, Sensitivity, SourceKind};

/// The reasons the policy gives for refusing `input`. `sensitive_on_content` is the
/// bundle's content switch.
pub fn reference_reasons(input: &DecisionInput, sensitive_on_content: bool) -> Reasons {
    let ai = input.source_kind != SourceKind::NotAi;
    let ads = input.purpose == Purpose::Ads;
    let sensitive = input.sensitivity != Sensitivity::None;
    let mut reasons = Reasons::NONE;
    let mut deny_if = |condition: bool, reason: ReasonCode| {
        if condition {
            reasons = reasons.with(reason);
        }
    };
    deny_if(
        ai && matches!(
            input.jurisdiction_group,
            JurisdictionGroup::Eea
                | JurisdictionGroup::Uk
                | JurisdictionGroup::Kr
                | JurisdictionGroup::Unknown
        ),
        ReasonCode::AiSignalRegionExcluded,
    );
    deny_if(
        ai && input.before_effective_date,
        ReasonCode::AiSignalBeforeEffectiveDate,
    );
    deny_if(ads && sensitive, ReasonCode::SensitiveTopicForAds);
    deny_if(
        !ads && sensitive && sensitive_on_content,
        ReasonCode::SensitiveTopicForContent,
    );
    deny_if(
        ads && input.age_band != AgeBand::Adult,
        ReasonCode::MinorOrUnknownAgeForAds,
    );
    deny_if(input.cross_app_unlinked, ReasonCode::CrossAppNotLinked);
    deny_if(ads && input.ads_objection, ReasonCode::AdsObjection);
    deny_if(
        input.source_kind == SourceKind::AiVoice && !input.microphone_permission,
        ReasonCode::MicPermissionMissing,
    );
    deny_if(
        ads && input.confidence == Confidence::Below,
        ReasonCode::LowConfidenceForAds,
    );
    deny_if(input.retention_expired, ReasonCode::RetentionExpired);
    reasons
}

fn assert_table_agrees(policy: &Policy, sensitive_on_content: bool) {
    let mut disagreements = Vec::new();
    let mut denied = 0usize;
    for input in DecisionInput::all() {
        let expected = reference_reasons(&input, sensitive_on_content);
        let compiled = policy.decide(&input);
        if compiled != expected && disagreements.len() < 5 {
            disagreements.push(format!(
                "{input:?}: table {compiled:?}, reference {expected:?}"
            ));
        }
        denied += usize::from(!expected.is_empty());
    }
    assert!(
        disagreements.is_empty(),
        "the table disagrees with the reference:\n{}",
        disagreements.join("\n")
    );
    // Both outcomes occur: a table of all-allow or all-deny would agree with nothing else.
    assert!(denied > 0 && denied < DecisionInput::COMBINATIONS);
}

#[test]
fn the_compiled_default_bundle_agrees_with_the_reference_on_every_input() {
    let registry = Registry::embedded_default();
    let policy = Policy::embedded_default(&registry).expect("the default bundle is valid");
    assert_eq!(DecisionInput::COMBINATIONS, 82_944);
    assert_table_agrees(&policy, true);
}

#[test]
fn turning_the_content_switch_off_agrees_with_the_reference_too() {
    let registry = Registry::embedded_default();
    let text = super::DEFAULT_BUNDLE_TOML.replace(
        "reason = \"SENSITIVE_TOPIC_FOR_CONTENT\"\n# The content switch: set enabled = false to let special categories personalize content.\nenabled = true",
        "reason = \"SENSITIVE_TOPIC_FOR_CONTENT\"\nenabled = false",
    );
    assert_ne!(
        text,
        super::DEFAULT_BUNDLE_TOML,
        "the switch was found and flipped"
    );
    let policy = Policy::from_toml(&text, &registry).expect("valid bundle");
    assert_table_agrees(&policy, false);
}
