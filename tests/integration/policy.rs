//! The write-time policy end to end: the golden cases of the announcement, each with its
//! exact verdict and reasons, through the real client.

use featurestore::domain::{AgeBand, Timestamp, Topic, UserStateUpdate, Value, WriteRow};
use featurestore::proto::{self, Outcome, ReasonCode, ValueStatus, Verdict};
use featurestore_tests::{TestServer, at, read, row, write};
use tonic::Code;

use crate::{outcomes, status};

const ALL_SURFACES: [&str; 4] = [
    "facebook_feed",
    "facebook_ads",
    "instagram_reels",
    "instagram_ads",
];

/// 2025-12-15T12:00:00Z: the day before the effective date.
const BEFORE_EFFECTIVE_DATE: Timestamp = Timestamp::from_unix_micros(1_765_800_000_000_000);

fn person(
    user_id: u64,
    jurisdiction: &str,
    age_band: AgeBand,
    linked_apps: &[&str],
) -> UserStateUpdate {
    UserStateUpdate {
        user_id,
        jurisdiction: jurisdiction.to_string(),
        age_band,
        linked_apps: linked_apps.iter().map(|app| app.to_string()).collect(),
        ads_objection: false,
        expected_generation: None,
    }
}

fn hiking_chat(user_id: u64, interaction_time: Timestamp) -> WriteRow {
    row(
        user_id,
        &ALL_SURFACES,
        interaction_time,
        vec![("interest_hiking", Value::Float(0.83))],
    )
}

/// Writes one row and returns the verdict of its first feature.
async fn verdict_of(server: &TestServer, key: &str, row: WriteRow) -> proto::FeatureVerdict {
    let response = server
        .client
        .write_features(write(key, vec![row]))
        .await
        .expect("write succeeds");
    response.rows[0].verdicts[0].clone()
}

fn reasons(codes: &[ReasonCode]) -> Vec<i32> {
    codes.iter().map(|code| *code as i32).collect()
}

fn refused_on(verdict: &proto::FeatureVerdict) -> Vec<String> {
    outcomes(verdict)
        .into_iter()
        .filter(|(_, outcome)| *outcome == Outcome::Refused)
        .map(|(surface, _)| surface)
        .collect()
}

#[tokio::test]
async fn a_us_adults_hiking_chat_from_2026_is_stored_for_feeds_and_ads() {
    let server = TestServer::start().await;
    server.us_adults([1]).await;
    let verdict = verdict_of(&server, "us", hiking_chat(1, at(-3600))).await;
    assert_eq!(verdict.verdict, Verdict::Allow as i32, "{verdict:?}");
    assert!(verdict.reasons.is_empty());
    assert!(
        outcomes(&verdict)
            .iter()
            .all(|(_, outcome)| *outcome == Outcome::Stored)
    );

    let keys: Vec<(u64, &str)> = ALL_SURFACES.iter().map(|surface| (1, *surface)).collect();
    let response = server
        .client
        .get_features(read(&keys, &["interest_hiking"]))
        .await
        .expect("read");
    for index in 0..ALL_SURFACES.len() {
        assert_eq!(
            status(&response, index, "interest_hiking"),
            ValueStatus::Present
        );
    }
}

#[tokio::test]
async fn a_chat_from_before_the_effective_date_is_denied() {
    let server = TestServer::start().await;
    server.us_adults([1]).await;
    let verdict = verdict_of(&server, "old", hiking_chat(1, BEFORE_EFFECTIVE_DATE)).await;
    assert_eq!(verdict.verdict, Verdict::Deny as i32);
    assert_eq!(
        verdict.reasons,
        reasons(&[ReasonCode::AiSignalBeforeEffectiveDate])
    );

    // Engagement signals are not AI-derived: the date does not apply to them.
    let mut engagement = hiking_chat(1, BEFORE_EFFECTIVE_DATE);
    engagement.provenance.source = "engagement".to_string();
    let verdict = verdict_of(&server, "engagement", engagement).await;
    assert_eq!(verdict.verdict, Verdict::Allow as i32, "{verdict:?}");
}

#[tokio::test]
async fn people_in_the_eu_the_uk_and_south_korea_get_no_ai_signals() {
    let server = TestServer::start().await;
    for (user_id, jurisdiction) in [
        (1, "DE"),
        (2, "GB"),
        (3, "KR"),
        (4, "FR-75C"),
        (5, "GB-SCT"),
        (7, ""),
    ] {
        server
            .client
            .set_user_state(person(
                user_id,
                jurisdiction,
                AgeBand::Adult,
                &["facebook", "instagram"],
            ))
            .await
            .expect("state");
        let verdict = verdict_of(
            &server,
            &format!("region-{user_id}"),
            hiking_chat(user_id, at(-60)),
        )
        .await;
        assert_eq!(verdict.verdict, Verdict::Deny as i32, "{jurisdiction:?}");
        assert_eq!(
            verdict.reasons,
            reasons(&[ReasonCode::AiSignalRegionExcluded]),
            "{jurisdiction:?}"
        );
    }
    // A person with no user state at all: fail closed.
    let mut unknown = hiking_chat(9, at(-60));
    unknown.user_state_generation = 0;
    let verdict = verdict_of(&server, "no-state", unknown).await;
    assert_eq!(verdict.verdict, Verdict::Deny as i32);
    assert!(
        verdict
            .reasons
            .contains(&(ReasonCode::AiSignalRegionExcluded as i32)),
        "{verdict:?}"
    );
    // California is not excluded.
    server
        .client
        .set_user_state(person(
            6,
            "US-CA",
            AgeBand::Adult,
            &["facebook", "instagram"],
        ))
        .await
        .expect("state");
    let verdict = verdict_of(&server, "region-6", hiking_chat(6, at(-60))).await;
    assert_eq!(verdict.verdict, Verdict::Allow as i32, "{verdict:?}");
}

#[tokio::test]
async fn a_health_topic_never_targets_ads_and_stays_out_of_content_by_default() {
    let server = TestServer::start().await;
    server.us_adults([1]).await;
    let mut health = row(
        1,
        &["instagram_reels", "instagram_ads"],
        at(-60),
        vec![("interest_hiking", Value::Float(0.7))],
    );
    health.provenance.origin_app = "instagram".to_string();
    health.features[0].topic = Some(Topic {
        id: "health/knee_rehabilitation".to_string(),
        confidence: Some(0.9),
    });
    let verdict = verdict_of(&server, "health", health.clone()).await;
    assert_eq!(verdict.verdict, Verdict::Deny as i32);
    assert_eq!(
        verdict.reasons,
        reasons(&[
            ReasonCode::SensitiveTopicForAds,
            ReasonCode::SensitiveTopicForContent
        ])
    );
    let data_dir = server.stop().await;

    // With the content switch off, the same value is kept for reels and refused for ads.
    let bundle = featurestore_server::policy::DEFAULT_BUNDLE_TOML.replace(
        "reason = \"SENSITIVE_TOPIC_FOR_CONTENT\"\n# The content switch: set enabled = false to let special categories personalize content.\nenabled = true",
        "reason = \"SENSITIVE_TOPIC_FOR_CONTENT\"\nenabled = false",
    );
    let bundle_path = data_dir.path().join("bundle-content-allowed.toml");
    std::fs::write(&bundle_path, bundle).expect("write the bundle");
    let server = TestServer::start_with(data_dir, |config| {
        config.policy_bundle_path = Some(bundle_path)
    })
    .await;
    let verdict = verdict_of(&server, "health-2", health).await;
    assert_eq!(
        verdict.verdict,
        Verdict::AllowWithTransform as i32,
        "{verdict:?}"
    );
    assert_eq!(
        verdict.reasons,
        reasons(&[ReasonCode::SensitiveTopicForAds])
    );
    assert_eq!(refused_on(&verdict), ["instagram_ads"]);
}

#[tokio::test]
async fn a_signal_crosses_apps_only_between_linked_accounts() {
    let server = TestServer::start().await;
    server
        .client
        .set_user_state(person(1, "US", AgeBand::Adult, &[]))
        .await
        .expect("state");
    let mut from_instagram = row(
        1,
        &["facebook_feed", "instagram_reels"],
        at(-60),
        vec![("interest_hiking", Value::Float(0.5))],
    );
    from_instagram.provenance.origin_app = "instagram".to_string();
    let verdict = verdict_of(&server, "unlinked", from_instagram.clone()).await;
    assert_eq!(verdict.verdict, Verdict::AllowWithTransform as i32);
    assert_eq!(verdict.reasons, reasons(&[ReasonCode::CrossAppNotLinked]));
    assert_eq!(refused_on(&verdict), ["facebook_feed"]);

    // Linking one app is not linking both.
    let state = server
        .client
        .set_user_state(person(1, "US", AgeBand::Adult, &["instagram"]))
        .await
        .expect("state");
    from_instagram.user_state_generation = state.generation;
    let verdict = verdict_of(&server, "half-linked", from_instagram.clone()).await;
    assert_eq!(refused_on(&verdict), ["facebook_feed"]);

    let state = server
        .client
        .set_user_state(person(1, "US", AgeBand::Adult, &["instagram", "facebook"]))
        .await
        .expect("state");
    from_instagram.user_state_generation = state.generation;
    let verdict = verdict_of(&server, "linked", from_instagram).await;
    assert_eq!(verdict.verdict, Verdict::Allow as i32, "{verdict:?}");
}

#[tokio::test]
async fn minors_and_people_of_unknown_age_get_no_ads() {
    let server = TestServer::start().await;
    for (user_id, age_band) in [(1, AgeBand::Minor), (2, AgeBand::Unknown)] {
        server
            .client
            .set_user_state(person(user_id, "US", age_band, &["facebook", "instagram"]))
            .await
            .expect("state");
        let verdict = verdict_of(
            &server,
            &format!("age-{user_id}"),
            hiking_chat(user_id, at(-60)),
        )
        .await;
        assert_eq!(
            verdict.verdict,
            Verdict::AllowWithTransform as i32,
            "{age_band:?}"
        );
        assert_eq!(
            verdict.reasons,
            reasons(&[ReasonCode::MinorOrUnknownAgeForAds])
        );
        assert_eq!(refused_on(&verdict), ["facebook_ads", "instagram_ads"]);
    }
}

#[tokio::test]
async fn objections_confidence_and_retention_keep_values_out_of_ads() {
    let server = TestServer::start().await;
    let mut objector = person(1, "US", AgeBand::Adult, &["facebook", "instagram"]);
    objector.ads_objection = true;
    server.client.set_user_state(objector).await.expect("state");
    let verdict = verdict_of(&server, "objection", hiking_chat(1, at(-60))).await;
    assert_eq!(verdict.reasons, reasons(&[ReasonCode::AdsObjection]));
    assert_eq!(refused_on(&verdict), ["facebook_ads", "instagram_ads"]);

    server.us_adults([2]).await;
    let mut unsure = hiking_chat(2, at(-60));
    unsure.features[0].topic = Some(Topic {
        id: "outdoors/hiking".to_string(),
        confidence: Some(0.4),
    });
    let verdict = verdict_of(&server, "confidence", unsure).await;
    assert_eq!(verdict.reasons, reasons(&[ReasonCode::LowConfidenceForAds]));
    assert_eq!(refused_on(&verdict), ["facebook_ads", "instagram_ads"]);

    // 300 days after the interaction: past the 180 days of ads retention for AI chat, within
    // the 365 days for content. What is stored expires when the content retention ends,
    // before the 90 days of the feature's TTL are up.
    server.advance(std::time::Duration::from_secs(300 * 24 * 3600));
    let verdict = verdict_of(&server, "retention", hiking_chat(2, at(-60))).await;
    assert_eq!(verdict.reasons, reasons(&[ReasonCode::RetentionExpired]));
    assert_eq!(refused_on(&verdict), ["facebook_ads", "instagram_ads"]);
    let retention_end = at(-60).unix_micros() + 365 * 24 * 3600 * 1_000_000;
    assert_eq!(
        verdict.expires_at_unix_micros, retention_end,
        "expiry is clamped by retention"
    );
}

#[tokio::test]
async fn voice_without_microphone_permission_is_denied() {
    let server = TestServer::start().await;
    server.us_adults([1]).await;
    let mut voice = hiking_chat(1, at(-60));
    voice.provenance.source = "ai_voice".to_string();
    let verdict = verdict_of(&server, "voice", voice.clone()).await;
    assert_eq!(verdict.verdict, Verdict::Deny as i32);
    assert_eq!(
        verdict.reasons,
        reasons(&[ReasonCode::MicPermissionMissing])
    );

    voice.provenance.microphone_permission_granted = true;
    let verdict = verdict_of(&server, "voice-granted", voice).await;
    assert_eq!(verdict.verdict, Verdict::Allow as i32);
}

#[tokio::test]
async fn a_write_that_raced_a_state_change_is_refused_whole() {
    let server = TestServer::start().await;
    server.us_adults([1]).await;
    server.us_adults([2]).await;
    // The producer derived user 2's row before the consent system changed user 2's state.
    server
        .client
        .set_user_state(person(2, "US", AgeBand::Minor, &["facebook", "instagram"]))
        .await
        .expect("state");
    let request = write(
        "raced",
        vec![hiking_chat(1, at(-60)), hiking_chat(2, at(-60))],
    );

    let explained = server
        .client
        .explain_write(request.clone())
        .await
        .expect("explain");
    assert_eq!(
        explained.request_refusal,
        ReasonCode::StaleGeneration as i32
    );
    assert_eq!(explained.refused_row, 1);

    let error = server
        .client
        .write_features(request)
        .await
        .expect_err("refused whole");
    assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
    let refusal = error.policy_refusal().expect("a machine-readable reason");
    assert_eq!(refusal.reason, "STALE_GENERATION");
    assert_eq!(refusal.row, 1);
    assert_eq!(refusal.current_generation, 2);
    assert!(
        !error.to_string().contains("0.83"),
        "values are never echoed: {error}"
    );
    // Not even user 1's row was stored.
    let response = server
        .client
        .get_features(read(&[(1, "facebook_feed")], &["interest_hiking"]))
        .await
        .expect("read");
    assert_eq!(
        status(&response, 0, "interest_hiking"),
        ValueStatus::Defaulted
    );
}

#[tokio::test]
async fn explain_decides_like_a_write_and_stores_nothing() {
    let server = TestServer::start().await;
    server
        .client
        .set_user_state(person(1, "US", AgeBand::Minor, &["facebook", "instagram"]))
        .await
        .expect("state");
    let request = write("explained", vec![hiking_chat(1, at(-60))]);
    let explained = server
        .client
        .explain_write(request.clone())
        .await
        .expect("explain");
    let verdicts = explained.verdicts.expect("verdicts");
    let verdict = &verdicts.rows[0].verdicts[0];
    assert_eq!(
        verdict.reasons,
        reasons(&[ReasonCode::MinorOrUnknownAgeForAds])
    );
    assert_eq!(
        outcomes(verdict),
        vec![
            ("facebook_feed".to_string(), Outcome::Admitted),
            ("facebook_ads".to_string(), Outcome::Refused),
            ("instagram_reels".to_string(), Outcome::Admitted),
            ("instagram_ads".to_string(), Outcome::Refused),
        ]
    );
    assert_eq!(explained.policy_bundle_hash.len(), 64);
    let response = server
        .client
        .get_features(read(&[(1, "facebook_feed")], &["interest_hiking"]))
        .await
        .expect("read");
    assert_eq!(
        status(&response, 0, "interest_hiking"),
        ValueStatus::Defaulted,
        "explain stored nothing"
    );

    // The idempotency key was not consumed: the real write applies.
    let written = server.client.write_features(request).await.expect("write");
    assert!(!written.replayed);
    assert_eq!(written.policy_bundle_hash, explained.policy_bundle_hash);
    assert_eq!(written.rows[0].verdicts[0].reasons, verdict.reasons);
}

#[tokio::test]
async fn user_state_is_kept_with_a_generation_per_change() {
    let server = TestServer::start().await;
    let error = server
        .client
        .get_user_state(5)
        .await
        .expect_err("no state yet");
    assert_eq!(error.code(), Code::NotFound);
    let first = server
        .client
        .set_user_state(person(5, "de", AgeBand::Adult, &["facebook"]))
        .await
        .expect("state");
    assert_eq!(first.generation, 1);
    assert_eq!(first.jurisdiction, "DE");
    assert_eq!(first.jurisdiction_group, "eea");
    assert_eq!(first.erasure_state, proto::ErasureState::None as i32);

    let mut stale = person(5, "US", AgeBand::Adult, &[]);
    stale.expected_generation = Some(7);
    let error = server
        .client
        .set_user_state(stale.clone())
        .await
        .expect_err("expected generation differs");
    assert_eq!(error.code(), Code::FailedPrecondition);
    stale.expected_generation = Some(1);
    let second = server.client.set_user_state(stale).await.expect("state");
    assert_eq!(second.generation, 2);
    let data_dir = server.stop().await;

    let server = TestServer::start_with(data_dir, |_| {}).await;
    let read_back = server.client.get_user_state(5).await.expect("durable");
    assert_eq!(read_back, second);

    let mut missing_age = proto::SetUserStateRequest::from(person(6, "US", AgeBand::Adult, &[]));
    missing_age.state.as_mut().expect("state").age_band = proto::AgeBand::Unspecified as i32;
    let error =
        featurestore::proto::privacy_client::PrivacyClient::connect(server.endpoint.clone())
            .await
            .expect("connect")
            .set_user_state(missing_age)
            .await
            .expect_err("age band is required");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("state.age_band"),
        "{}",
        error.message()
    );
}
