//! Every input the policy reads has one canonical form; what is not canonical is refused
//! with a clear code (or normalised where the mapping is unambiguous), never treated as
//! allowed. Each test sends what a producer with messy data, or an attacker, would send,
//! and reads back that nothing forbidden was stored.

use std::time::Duration;

use featurestore::domain::{Topic, UserStateUpdate, Value, WriteRow};
use featurestore::proto::{self, Outcome, ReasonCode, ValueStatus};
use featurestore_tests::{TestServer, at, read, row, us_adult, write};
use tonic::Code;

use crate::{outcomes, statuses};

fn reasons(codes: &[ReasonCode]) -> Vec<i32> {
    codes.iter().map(|code| *code as i32).collect()
}

async fn verdicts(
    server: &TestServer,
    key: &str,
    rows: Vec<WriteRow>,
) -> proto::WriteFeaturesResponse {
    server
        .client
        .write_features(write(key, rows))
        .await
        .expect("the write is answered")
}

/// A hiking interest on `surfaces`, inferred from a conversation about `topic`.
fn hiking_about(user_id: u64, surfaces: &[&str], topic: &str, confidence: Option<f32>) -> WriteRow {
    let mut hiking = row(
        user_id,
        surfaces,
        at(-60),
        vec![("interest_hiking", Value::Float(0.5))],
    );
    hiking.features[0].topic = Some(Topic {
        id: topic.to_string(),
        confidence,
    });
    hiking
}

#[tokio::test]
async fn jurisdictions_that_are_not_assigned_iso_codes_are_refused() {
    let server = TestServer::start().await;
    for (code, expected) in [
        ("UK", "this country's code is \"GB\""),
        ("EL", "this country's code is \"GR\""),
        ("DEU", "send the alpha-2 code \"DE\""),
        ("276", "send the alpha-2 code \"DE\""),
        ("US-XX", "not an ISO 3166-2 subdivision of US"),
        ("XK", "not an assigned"),
        ("EU", "not an assigned"),
        ("ZZ", "not an assigned"),
        ("Germany", "not an assigned"),
        ("DE_BY", "not an assigned"),
        ("D E", "not an assigned"),
    ] {
        let mut state = us_adult(1);
        state.jurisdiction = code.to_string();
        let error = server.client.set_user_state(state).await.expect_err(code);
        assert_eq!(error.code(), Code::InvalidArgument, "{code}: {error}");
        assert!(
            error.to_string().contains("state.jurisdiction")
                && error.to_string().contains(expected),
            "{code}: {error}"
        );
    }
    let error = server
        .client
        .get_user_state(1)
        .await
        .expect_err("no state was set");
    assert_eq!(error.code(), Code::NotFound);

    // Case and surrounding spaces are normalised: the mapping is unambiguous.
    for (user_id, code, canonical, group) in [
        (1, " de ", "DE", "eea"),
        (2, "gb-sct", "GB-SCT", "uk"),
        (3, "us-ny", "US-NY", "other"),
        (4, "", "", "unknown"),
    ] {
        let mut state = us_adult(user_id);
        state.jurisdiction = code.to_string();
        server.client.set_user_state(state).await.expect(code);
        let state = server.client.get_user_state(user_id).await.expect("state");
        assert_eq!(
            (
                state.jurisdiction.as_str(),
                state.jurisdiction_group.as_str()
            ),
            (canonical, group),
            "{code:?}"
        );
    }
}

#[tokio::test]
async fn linked_apps_must_be_apps_of_registered_surfaces() {
    let server = TestServer::start().await;
    for apps in [
        &["whatsapp"][..],
        &["Facebook"],
        &["facebook", "instagram "],
    ] {
        let state = UserStateUpdate {
            linked_apps: apps.iter().map(|app| app.to_string()).collect(),
            ..us_adult(1)
        };
        let error = server
            .client
            .set_user_state(state)
            .await
            .expect_err("refused");
        assert_eq!(error.code(), Code::InvalidArgument, "{apps:?}: {error}");
        assert!(
            error
                .to_string()
                .contains("is not an app of a registered surface (facebook, instagram)"),
            "{error}"
        );
    }
    server
        .client
        .get_user_state(1)
        .await
        .expect_err("no state was set");
}

#[tokio::test]
async fn a_generation_the_store_never_issued_is_refused_whole() {
    let server = TestServer::start().await;
    server.us_adults([1]).await;
    let hiking = |user_id, generation| {
        let mut hiking = row(
            user_id,
            &["facebook_feed"],
            at(-60),
            vec![("interest_hiking", Value::Float(0.5))],
        );
        hiking.user_state_generation = generation;
        hiking
    };
    // User 1 is at generation 1; user 2 has no state, so its generation is 0.
    for (user_id, generation, current) in [(1, 2, 1), (1, u64::MAX, 1), (2, 1, 0)] {
        let request = write("ahead", vec![hiking(user_id, generation)]);
        let explained = server
            .client
            .explain_write(request.clone())
            .await
            .expect("explain");
        assert_eq!(
            explained.request_refusal,
            ReasonCode::GenerationNotIssued as i32
        );
        let error = server
            .client
            .write_features(request)
            .await
            .expect_err("refused whole");
        assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
        let refusal = error.policy_refusal().expect("a machine-readable reason");
        assert_eq!(refusal.reason, "GENERATION_NOT_ISSUED");
        assert_eq!(refusal.current_generation, current, "{error}");
    }
    assert_eq!(
        statuses(
            &server,
            &[(1, "facebook_feed"), (2, "facebook_feed")],
            "interest_hiking"
        )
        .await,
        [ValueStatus::Defaulted; 2],
        "nothing was stored"
    );
}

#[tokio::test]
async fn interaction_times_in_the_future_are_refused_and_cannot_win_event_time_order() {
    let server = TestServer::start().await;
    server.us_adults([1]).await;
    let hiking = |seconds_from_now: i64, value: f32| {
        row(
            1,
            &["facebook_feed"],
            at(seconds_from_now),
            vec![("interest_hiking", Value::Float(value))],
        )
    };
    // A producer's clock a little ahead is allowed (five minutes by default); a year is not.
    let response = verdicts(
        &server,
        "future",
        vec![hiking(4 * 60, 0.4), hiking(365 * 24 * 3600, 0.9)],
    )
    .await;
    assert_eq!(
        outcomes(&response.rows[0].verdicts[0]),
        [("facebook_feed".to_string(), Outcome::Stored)]
    );
    assert_eq!(
        response.rows[1].verdicts[0].reasons,
        reasons(&[ReasonCode::InteractionTimeInFuture])
    );
    // The real interaction that follows wins, as it would have against the refused one.
    server.advance(Duration::from_secs(10 * 60));
    let response = verdicts(&server, "present", vec![hiking(5 * 60, 0.5)]).await;
    assert_eq!(
        outcomes(&response.rows[0].verdicts[0]),
        [("facebook_feed".to_string(), Outcome::Stored)]
    );
    let response = server
        .client
        .get_features(read(&[(1, "facebook_feed")], &["interest_hiking"]))
        .await
        .expect("read");
    assert_eq!(crate::float(&response, 0, "interest_hiking"), 0.5);
}

#[tokio::test]
async fn topics_not_in_canonical_form_are_refused_everywhere() {
    let server = TestServer::start().await;
    server.us_adults([1]).await;
    let surfaces = ["facebook_feed", "facebook_ads"];
    let with_topic = |topic: &str| hiking_about(1, &surfaces, topic, Some(0.9));
    let sparse = |topic: &str| {
        row(
            1,
            &surfaces,
            at(-60),
            vec![(
                "conversation_topics",
                Value::Sparse(vec![
                    ("outdoors/hiking".to_string(), 0.5),
                    (topic.to_string(), 0.5),
                ]),
            )],
        )
    };
    let top_topic = |topic: &str| {
        row(
            1,
            &["facebook_feed"],
            at(-60),
            vec![("top_topic", Value::String(topic.to_string()))],
        )
    };
    for topic in [
        "Health/Diabetes",
        "health/diabetes ",
        " health",
        "health//diabetes",
        "health/",
        "health\u{200b}/diabetes",
        "HEALTH",
    ] {
        for (kind, candidate) in [
            ("topic_id", with_topic(topic)),
            ("sparse topic", sparse(topic)),
            ("topic-valued string", top_topic(topic)),
        ] {
            let response = verdicts(&server, &format!("{kind}-{topic}"), vec![candidate]).await;
            let verdict = &response.rows[0].verdicts[0];
            assert_eq!(
                verdict.verdict,
                proto::Verdict::Deny as i32,
                "{kind} {topic:?}"
            );
            assert_eq!(
                verdict.reasons,
                reasons(&[ReasonCode::NonCanonicalTopic]),
                "{kind} {topic:?}"
            );
        }
    }
    for feature in ["interest_hiking", "conversation_topics", "top_topic"] {
        assert_eq!(
            statuses(
                &server,
                &[(1, "facebook_feed"), (1, "facebook_ads")],
                feature
            )
            .await[0],
            if feature == "interest_hiking" {
                ValueStatus::Defaulted
            } else {
                ValueStatus::NotFound
            },
            "nothing of {feature} was stored"
        );
    }
}

#[tokio::test]
async fn a_topic_valued_string_is_classified_by_the_taxonomy() {
    let server = TestServer::start().await;
    server.us_adults([1, 2]).await;
    let top_topic = |user_id, topic: &str| {
        row(
            user_id,
            &["facebook_feed", "instagram_reels"],
            at(-60),
            vec![("top_topic", Value::String(topic.to_string()))],
        )
    };
    let response = verdicts(
        &server,
        "topics",
        vec![
            top_topic(1, "health/diabetes"),
            top_topic(2, "outdoors/hiking"),
        ],
    )
    .await;
    assert_eq!(
        response.rows[0].verdicts[0].reasons,
        reasons(&[ReasonCode::SensitiveTopicForContent]),
        "a health topic is a special category"
    );
    assert_eq!(
        response.rows[1].verdicts[0].verdict,
        proto::Verdict::Allow as i32
    );
    assert_eq!(
        statuses(
            &server,
            &[(1, "facebook_feed"), (2, "facebook_feed")],
            "top_topic"
        )
        .await,
        [ValueStatus::NotFound, ValueStatus::Present]
    );
}

#[tokio::test]
async fn a_topic_without_a_confidence_is_kept_out_of_ads() {
    let server = TestServer::start().await;
    server.us_adults([1, 2]).await;
    let with_topic = |user_id, confidence| {
        hiking_about(
            user_id,
            &["facebook_feed", "facebook_ads"],
            "outdoors/hiking",
            confidence,
        )
    };
    let response = verdicts(
        &server,
        "confidence",
        vec![with_topic(1, None), with_topic(2, Some(0.9))],
    )
    .await;
    let unsure = &response.rows[0].verdicts[0];
    assert_eq!(unsure.reasons, reasons(&[ReasonCode::LowConfidenceForAds]));
    assert_eq!(
        outcomes(unsure),
        [
            ("facebook_feed".to_string(), Outcome::Stored),
            ("facebook_ads".to_string(), Outcome::Refused)
        ]
    );
    assert_eq!(
        response.rows[1].verdicts[0].verdict,
        proto::Verdict::Allow as i32
    );
    assert_eq!(
        statuses(
            &server,
            &[(1, "facebook_ads"), (2, "facebook_ads")],
            "interest_hiking"
        )
        .await,
        [ValueStatus::Defaulted, ValueStatus::Present]
    );
}

#[tokio::test]
async fn an_origin_app_no_surface_has_is_refused() {
    let server = TestServer::start().await;
    server.us_adults([1]).await;
    for app in ["whatsapp", "Facebook", "facebook "] {
        let mut hiking = row(
            1,
            &["facebook_feed"],
            at(-60),
            vec![("interest_hiking", Value::Float(0.5))],
        );
        hiking.provenance.origin_app = app.to_string();
        let response = verdicts(&server, app, vec![hiking]).await;
        assert_eq!(
            response.rows[0].verdicts[0].reasons,
            reasons(&[ReasonCode::UnknownApp]),
            "{app:?}"
        );
    }
    assert_eq!(
        statuses(&server, &[(1, "facebook_feed")], "interest_hiking").await,
        [ValueStatus::Defaulted]
    );
}
