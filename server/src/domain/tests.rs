//! Property test of the whole write path: whatever the users' states and the rows, a value
//! is stored on a surface exactly when the policy's reference evaluation allows it there.

use std::sync::Arc;
use std::time::Duration;

use featurestore::domain::{
    AgeBand, FeatureWrite, Provenance, Timestamp, Topic, UserStateUpdate, Value, WriteRequest,
    WriteRow,
};
use featurestore::proto::{Outcome, Verdict};
use proptest::prelude::*;

use super::{Core, CoreOptions};
use crate::clock::ManualClock;
use crate::config::{Durability, StorageConfig};
use crate::policy::reference::reference_reasons;
use crate::policy::{Confidence, DecisionInput, JurisdictionGroup, Policy};
use crate::registry::{Purpose, Registry, Sensitivity, SourceKind};
use crate::storage::RocksStore;

const DAY_MICROS: i64 = 24 * 3600 * 1_000_000;
/// 2026-06-01T00:00:00Z.
const NOW: i64 = 1_780_272_000_000_000;
const SURFACES: [(&str, &str, Purpose); 4] = [
    ("facebook_feed", "facebook", Purpose::Content),
    ("facebook_ads", "facebook", Purpose::Ads),
    ("instagram_reels", "instagram", Purpose::Content),
    ("instagram_ads", "instagram", Purpose::Ads),
];
const APPS: [&str; 3] = ["facebook", "instagram", "whatsapp"];

#[derive(Clone, Debug)]
struct Case {
    state: Option<(String, AgeBand, Vec<String>, bool)>,
    source: (&'static str, SourceKind),
    origin_app: &'static str,
    interaction_days_ago: i64,
    microphone: bool,
    surfaces: Vec<usize>,
    /// (topic, confidence) on interest_hiking.
    topic: Option<(&'static str, Option<f32>)>,
    health: bool,
}

fn case() -> impl Strategy<Value = Case> {
    let state = proptest::option::of((
        prop::sample::select(vec!["", "US", "US-CA", "BR", "DE", "FR-75", "GB", "KR"])
            .prop_map(str::to_string),
        prop::sample::select(AgeBand::ALL.to_vec()),
        prop::sample::subsequence(APPS.to_vec(), 0..=3)
            .prop_map(|apps| apps.into_iter().map(str::to_string).collect()),
        any::<bool>(),
    ));
    (
        state,
        prop::sample::select(vec![
            ("ai_chat", SourceKind::AiText),
            ("ai_voice", SourceKind::AiVoice),
            ("engagement", SourceKind::NotAi),
        ]),
        prop::sample::select(APPS.to_vec()),
        prop::sample::select(vec![0i64, 100, 170, 200, 400, 800]),
        any::<bool>(),
        prop::sample::subsequence(vec![0usize, 1, 2, 3], 1..=4),
        proptest::option::of((
            prop::sample::select(vec!["outdoors/hiking", "health/knees", "politics/local"]),
            proptest::option::of(prop::sample::select(vec![0.3f32, 0.6, 0.9])),
        )),
        any::<bool>(),
    )
        .prop_map(
            |(
                state,
                source,
                origin_app,
                interaction_days_ago,
                microphone,
                surfaces,
                topic,
                health,
            )| Case {
                state,
                source,
                origin_app,
                interaction_days_ago,
                microphone,
                surfaces,
                topic,
                health,
            },
        )
}

/// The bucketed input of a (feature, surface), worked out from the case directly.
fn expected_input(case: &Case, feature_is_health: bool, surface: usize) -> DecisionInput {
    let (_, app, purpose) = SURFACES[surface];
    let interaction = NOW - case.interaction_days_ago * DAY_MICROS;
    let (content_days, ads_days) = match case.source.0 {
        "ai_chat" => (365, 180),
        "ai_voice" => (180, 90),
        _ => (730, 365),
    };
    let retention_days = if purpose == Purpose::Ads {
        ads_days
    } else {
        content_days
    };
    let jurisdiction_group = match case.state.as_ref().map(|state| state.0.as_str()) {
        None | Some("") => JurisdictionGroup::Unknown,
        Some("DE" | "FR-75") => JurisdictionGroup::Eea,
        Some("GB") => JurisdictionGroup::Uk,
        Some("KR") => JurisdictionGroup::Kr,
        Some("US-CA") => JurisdictionGroup::UsCa,
        Some(_) => JurisdictionGroup::Other,
    };
    let linked = |app: &str| {
        case.state
            .as_ref()
            .is_some_and(|state| state.2.iter().any(|linked| linked == app))
    };
    let sensitivity = if feature_is_health {
        Sensitivity::Health
    } else {
        match case.topic.map(|topic| topic.0) {
            Some("health/knees") => Sensitivity::Health,
            Some("politics/local") => Sensitivity::PoliticalViews,
            _ => Sensitivity::None,
        }
    };
    DecisionInput {
        source_kind: case.source.1,
        before_effective_date: interaction < 1_765_843_200_000_000,
        microphone_permission: case.microphone,
        jurisdiction_group,
        age_band: case
            .state
            .as_ref()
            .map_or(AgeBand::Unknown, |state| state.1),
        ads_objection: case.state.as_ref().is_some_and(|state| state.3),
        sensitivity,
        purpose,
        cross_app_unlinked: case.origin_app != app && !(linked(case.origin_app) && linked(app)),
        confidence: match case
            .topic
            .and_then(|topic| topic.1)
            .filter(|_| !feature_is_health)
        {
            None => Confidence::NotApplicable,
            Some(confidence) if confidence < 0.6 => Confidence::Below,
            Some(_) => Confidence::AtOrAbove,
        },
        retention_expired: interaction + retention_days * DAY_MICROS <= NOW,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn a_value_is_stored_exactly_where_the_policy_allows_it(cases in proptest::collection::vec(case(), 1..6)) {
        let directory = tempfile::tempdir().expect("temp dir");
        let clock = Arc::new(ManualClock::new(Timestamp::from_unix_micros(NOW)));
        let store = RocksStore::open(&directory.path().join("db"), &StorageConfig { block_cache_bytes: 1 << 20, ..StorageConfig::default() }, Durability::Buffered, Duration::from_secs(60), clock.clone())
            .expect("open store");
        let registry = Arc::new(Registry::embedded_default());
        let policy = Arc::new(Policy::embedded_default(&registry).expect("default bundle"));
        let options = CoreOptions { idempotency_window: Duration::from_secs(60), ..CoreOptions::under(directory.path()) };
        let core = Core::new(registry, policy, Arc::new(store), clock, options).expect("core");

        for (index, case) in cases.iter().enumerate() {
            let user_id = index as u64 + 1;
            let generation = match &case.state {
                Some((jurisdiction, age_band, linked_apps, ads_objection)) => core
                    .set_user_state(&UserStateUpdate {
                        user_id,
                        jurisdiction: jurisdiction.clone(),
                        age_band: *age_band,
                        linked_apps: linked_apps.clone(),
                        ads_objection: *ads_objection,
                        expected_generation: None,
                    }, "tests")
                    .expect("set state")
                    .generation,
                None => 0,
            };
            let mut features = vec![FeatureWrite {
                name: "interest_hiking".to_string(),
                value: Value::Float(0.5),
                topic: case.topic.map(|(id, confidence)| Topic { id: id.to_string(), confidence }),
                ttl: None,
            }];
            if case.health && case.source.1 != SourceKind::NotAi {
                features.push(FeatureWrite {
                    name: "interest_fitness_health".to_string(),
                    value: Value::Float(0.5),
                    topic: None,
                    ttl: None,
                });
            }
            let request = WriteRequest {
                idempotency_key: format!("case-{index}"),
                rows: vec![WriteRow {
                    user_id,
                    target_surfaces: case.surfaces.iter().map(|&surface| SURFACES[surface].0.to_string()).collect(),
                    provenance: Provenance {
                        source: case.source.0.to_string(),
                        origin_app: case.origin_app.to_string(),
                        interaction_time: Timestamp::from_unix_micros(NOW - case.interaction_days_ago * DAY_MICROS),
                        producer_id: "proptest".to_string(),
                        microphone_permission_granted: case.microphone,
                    },
                    features,
                    user_state_generation: generation,
                }],
            };
            let response = core.write(&request, index as u64).expect("write");
            for (feature, verdict) in request.rows[0].features.iter().zip(&response.rows[0].verdicts) {
                let mut admitted = 0;
                for (&surface, outcome) in case.surfaces.iter().zip(&verdict.surfaces) {
                    let expected = reference_reasons(&expected_input(case, feature.name == "interest_fitness_health", surface), true);
                    let stored = outcome.outcome == Outcome::Stored as i32;
                    prop_assert_eq!(stored, expected.is_empty(), "{:?} on {}: {:?}", case, SURFACES[surface].0, outcome);
                    let reasons: Vec<i32> = expected.iter().map(|reason| reason as i32).collect();
                    prop_assert_eq!(&outcome.reasons, &reasons);
                    admitted += usize::from(stored);
                }
                let expected_verdict = match admitted {
                    0 => Verdict::Deny,
                    all if all == case.surfaces.len() => Verdict::Allow,
                    _ => Verdict::AllowWithTransform,
                };
                prop_assert_eq!(verdict.verdict, expected_verdict as i32);
            }
        }
    }
}
