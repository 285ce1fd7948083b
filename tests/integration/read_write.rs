//! Writes and reads through the real client: values of every type, statuses, expiry,
//! event-time order, idempotency and per-item verdicts.

use std::time::Duration;

use featurestore::domain::Value;
use featurestore::proto::{self, Outcome, ReasonCode, RowStatus, ValueStatus, Verdict};
use featurestore_tests::{TestServer, at, read, row, write};

use crate::{float, outcomes, status, verdict};

#[tokio::test]
async fn written_values_of_every_type_read_back() {
    let server = TestServer::start().await;
    server.us_adults([42]).await;
    let embedding: Vec<f32> = (0..8).map(|index| index as f32 / 8.0).collect();
    let response = server
        .client
        .write_features(write(
            "every-type",
            vec![row(
                42,
                &["facebook_feed", "instagram_reels"],
                at(-60),
                vec![
                    ("interest_hiking", Value::Float(0.83)),
                    ("topic_embedding", Value::FloatVector(embedding.clone())),
                    ("top_topic", Value::String("outdoors/hiking".to_string())),
                    (
                        "conversation_topics",
                        Value::Sparse(vec![
                            ("outdoors/hiking".to_string(), 0.9),
                            ("food/baking".to_string(), 0.2),
                        ]),
                    ),
                ],
            )],
        ))
        .await
        .expect("write succeeds");
    for index in 0..4 {
        let verdict = verdict(&response, 0, index);
        assert_eq!(verdict.verdict, Verdict::Allow as i32, "{verdict:?}");
        assert!(verdict.expires_at_unix_micros > at(0).unix_micros());
        assert_eq!(
            outcomes(verdict),
            vec![
                ("facebook_feed".to_string(), Outcome::Stored),
                ("instagram_reels".to_string(), Outcome::Stored)
            ]
        );
    }

    let features = [
        "topic_embedding",
        "interest_hiking",
        "top_topic",
        "conversation_topics",
    ];
    let response = server
        .client
        .get_features(read(
            &[(42, "instagram_reels"), (42, "facebook_feed")],
            &features,
        ))
        .await
        .expect("read succeeds");
    assert_eq!(response.rows.len(), 2);
    let names: Vec<_> = response
        .columns
        .iter()
        .map(|column| column.name.as_str())
        .collect();
    assert_eq!(names, features, "columns come in the requested order");
    for (index, row) in response.rows.iter().enumerate() {
        assert_eq!(row.status, RowStatus::Ok as i32);
        for feature in features {
            assert_eq!(
                status(&response, index, feature),
                ValueStatus::Present,
                "{feature}"
            );
        }
        // The embedding occupies 8 floats from its offset, then the scalar float follows.
        let embedding_column = &response.columns[0];
        assert_eq!(embedding_column.dimension, 8);
        let start = embedding_column.offset as usize;
        assert_eq!(&row.float_values[start..start + 8], embedding.as_slice());
        assert_eq!(float(&response, index, "interest_hiking"), 0.83);
        assert_eq!(row.string_values, vec!["outdoors/hiking".to_string()]);
        assert_eq!(
            row.sparse_values[0].topics,
            vec!["outdoors/hiking", "food/baking"]
        );
        assert_eq!(row.sparse_values[0].weights, vec![0.9, 0.2]);
        assert_eq!(row.event_times_unix_micros, vec![at(-60).unix_micros(); 4]);
    }
}

#[tokio::test]
async fn rows_come_back_in_request_order_with_a_status_each() {
    let server = TestServer::start().await;
    server.us_adults([7]).await;
    server
        .write_float("order", 7, "facebook_feed", at(-1), "interest_cooking", 0.5)
        .await;
    let response = server
        .client
        .get_features(read(
            &[
                (999, "facebook_feed"),
                (7, "facebook_feed"),
                (7, "no_such_surface"),
                (7, "facebook_feed"),
            ],
            &[
                "interest_cooking",
                "interest_fitness_health",
                "topic_embedding",
            ],
        ))
        .await
        .expect("read succeeds");
    assert_eq!(response.rows.len(), 4);
    // An unknown user: a feature with a default is defaulted, one without is not found.
    assert_eq!(
        status(&response, 0, "interest_cooking"),
        ValueStatus::Defaulted
    );
    assert_eq!(float(&response, 0, "interest_cooking"), 0.0);
    assert_eq!(
        status(&response, 0, "interest_fitness_health"),
        ValueStatus::NotFound
    );
    // The stored value, answered for both occurrences of the key.
    for index in [1, 3] {
        assert_eq!(
            status(&response, index, "interest_cooking"),
            ValueStatus::Present
        );
        assert_eq!(float(&response, index, "interest_cooking"), 0.5);
        assert_eq!(
            status(&response, index, "interest_fitness_health"),
            ValueStatus::NotFound
        );
    }
    // An unknown surface fails only its own row.
    assert_eq!(response.rows[2].status, RowStatus::UnknownSurface as i32);
    // Every row has the same fixed layout, whatever its statuses.
    for row in &response.rows {
        assert_eq!(row.float_values.len(), 1 + 1 + 8);
        assert_eq!(row.statuses.len(), 3);
    }

    // Without a selection, every feature of the keys' surfaces is returned; a feature not
    // registered for a row's surface says so.
    let response = server
        .client
        .get_features(read(
            &[(7, "facebook_ads")],
            &["topic_embedding", "interest_cooking"],
        ))
        .await
        .expect("read succeeds");
    assert_eq!(
        status(&response, 0, "topic_embedding"),
        ValueStatus::NotRegisteredForSurface
    );
    let response = server
        .client
        .get_features(read(&[(7, "facebook_ads")], &[]))
        .await
        .expect("read succeeds");
    let names: Vec<_> = response
        .columns
        .iter()
        .map(|column| column.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "interest_hiking",
            "interest_cooking",
            "interest_fitness_health",
            "conversation_topics",
            "assistant_sessions_7d"
        ]
    );
}

#[tokio::test]
async fn values_expire_by_the_servers_clock() {
    let server = TestServer::start().await;
    server.us_adults([5, 6]).await;
    let mut short = row(
        5,
        &["facebook_feed"],
        at(-10),
        vec![
            ("interest_hiking", Value::Float(0.7)),
            ("top_topic", Value::String("outdoors/hiking".to_string())),
        ],
    );
    for feature in &mut short.features {
        feature.ttl = Some(Duration::from_secs(60));
    }
    let response = server
        .client
        .write_features(write("ttl", vec![short]))
        .await
        .expect("write succeeds");
    assert_eq!(
        verdict(&response, 0, 0).expires_at_unix_micros,
        at(60).unix_micros()
    );

    let features = ["interest_hiking", "top_topic"];
    let before = server
        .client
        .get_features(read(&[(5, "facebook_feed")], &features))
        .await
        .expect("read");
    assert_eq!(status(&before, 0, "top_topic"), ValueStatus::Present);
    assert_eq!(float(&before, 0, "interest_hiking"), 0.7);

    server.advance(Duration::from_secs(61));
    let after = server
        .client
        .get_features(read(&[(5, "facebook_feed")], &features))
        .await
        .expect("read");
    assert_eq!(status(&after, 0, "top_topic"), ValueStatus::Expired);
    assert_eq!(
        after.rows[0].string_values,
        vec![String::new()],
        "an expired value is never returned"
    );
    assert_eq!(status(&after, 0, "interest_hiking"), ValueStatus::Defaulted);
    assert_eq!(
        float(&after, 0, "interest_hiking"),
        0.0,
        "the registered default replaces it"
    );

    // A requested TTL never exceeds the registered one (90 days for interest_hiking).
    let mut long = row(
        6,
        &["facebook_feed"],
        at(0),
        vec![("interest_hiking", Value::Float(0.1))],
    );
    long.features[0].ttl = Some(Duration::from_secs(365 * 24 * 3600));
    let response = server
        .client
        .write_features(write("long-ttl", vec![long]))
        .await
        .expect("write succeeds");
    let now = at(61).unix_micros();
    assert_eq!(
        verdict(&response, 0, 0).expires_at_unix_micros,
        now + 90 * 24 * 3600 * 1_000_000
    );
}

#[tokio::test]
async fn the_latest_event_time_wins_whatever_the_arrival_order() {
    let server = TestServer::start().await;
    server.us_adults([1]).await;
    let hiking = |value: f32, time: i64| {
        row(
            1,
            &["facebook_feed"],
            at(time),
            vec![("interest_hiking", Value::Float(value))],
        )
    };

    let response = server
        .client
        .write_features(write("newer", vec![hiking(0.9, -10)]))
        .await
        .expect("write");
    assert_eq!(outcomes(verdict(&response, 0, 0))[0].1, Outcome::Stored);
    // An older interaction arriving later is ignored, and the answer says so.
    let response = server
        .client
        .write_features(write("older", vec![hiking(0.1, -20)]))
        .await
        .expect("write");
    assert_eq!(verdict(&response, 0, 0).verdict, Verdict::Allow as i32);
    assert_eq!(outcomes(verdict(&response, 0, 0))[0].1, Outcome::Superseded);
    // Within one batch too, in either order.
    let response = server
        .client
        .write_features(write("batch", vec![hiking(0.5, -5), hiking(0.3, -8)]))
        .await
        .expect("write");
    assert_eq!(outcomes(verdict(&response, 0, 0))[0].1, Outcome::Stored);
    assert_eq!(outcomes(verdict(&response, 1, 0))[0].1, Outcome::Superseded);

    let response = server
        .client
        .get_features(read(&[(1, "facebook_feed")], &["interest_hiking"]))
        .await
        .expect("read");
    assert_eq!(float(&response, 0, "interest_hiking"), 0.5);
    assert_eq!(
        response.rows[0].event_times_unix_micros,
        vec![at(-5).unix_micros()]
    );
}

#[tokio::test]
async fn a_retried_write_returns_the_first_answer_and_changes_nothing() {
    let server = TestServer::start().await;
    server.us_adults([3]).await;
    let first = write(
        "retry-me",
        vec![row(
            3,
            &["facebook_feed"],
            at(-3),
            vec![("interest_hiking", Value::Float(0.2))],
        )],
    );
    let answer = server
        .client
        .write_features(first.clone())
        .await
        .expect("write");
    assert!(!answer.replayed);

    // Meanwhile a newer value is written under another key.
    server
        .write_float("other", 3, "facebook_feed", at(-1), "interest_hiking", 0.6)
        .await;

    let replay = server
        .client
        .write_features(first.clone())
        .await
        .expect("retry");
    assert!(replay.replayed);
    assert_eq!(
        replay.rows, answer.rows,
        "the first answer, not a new one (which would say superseded)"
    );
    let response = server
        .client
        .get_features(read(&[(3, "facebook_feed")], &["interest_hiking"]))
        .await
        .expect("read");
    assert_eq!(float(&response, 0, "interest_hiking"), 0.6);

    // The same key for a different request is refused and changes nothing.
    let reused = write(
        "retry-me",
        vec![row(
            3,
            &["facebook_feed"],
            at(0),
            vec![("interest_hiking", Value::Float(0.9))],
        )],
    );
    let error = server
        .client
        .write_features(reused)
        .await
        .expect_err("key reuse refused");
    assert_eq!(error.code(), tonic::Code::FailedPrecondition, "{error}");
    let response = server
        .client
        .get_features(read(&[(3, "facebook_feed")], &["interest_hiking"]))
        .await
        .expect("read");
    assert_eq!(float(&response, 0, "interest_hiking"), 0.6);

    // After the idempotency window the key is forgotten, and the write applies anew.
    server.advance(server.config.idempotency_window + Duration::from_secs(1));
    let again = server.client.write_features(first).await.expect("write");
    assert!(!again.replayed);
}

#[tokio::test]
async fn invalid_items_get_verdicts_and_valid_ones_are_stored() {
    let server = TestServer::start().await;
    server.us_adults([11, 12]).await;
    let mut voice = row(
        11,
        &["facebook_feed", "no_such_surface", "facebook_ads"],
        at(-1),
        vec![
            ("interest_hiking", Value::Float(0.4)),
            ("no_such_feature", Value::Float(0.4)),
            ("interest_cooking", Value::String("not a float".to_string())),
            ("topic_embedding", Value::FloatVector(vec![0.1; 3])),
        ],
    );
    voice.provenance.source = "ai_voice".to_string();
    voice.provenance.microphone_permission_granted = true;
    let mut unknown_source = row(
        12,
        &["facebook_feed"],
        at(-1),
        vec![("interest_hiking", Value::Float(0.4))],
    );
    unknown_source.provenance.source = "rumours".to_string();
    let response = server
        .client
        .write_features(write("mixed", vec![voice, unknown_source]))
        .await
        .expect("one bad item never fails the batch");

    let hiking = verdict(&response, 0, 0);
    assert_eq!(hiking.verdict, Verdict::AllowWithTransform as i32);
    assert_eq!(hiking.reasons, vec![ReasonCode::UnknownSurface as i32]);
    assert_eq!(
        outcomes(hiking),
        vec![
            ("facebook_feed".to_string(), Outcome::Stored),
            ("no_such_surface".to_string(), Outcome::Refused),
            ("facebook_ads".to_string(), Outcome::Stored)
        ]
    );
    let unknown = verdict(&response, 0, 1);
    assert_eq!(unknown.verdict, Verdict::Deny as i32);
    assert!(
        unknown
            .reasons
            .contains(&(ReasonCode::UnknownFeature as i32)),
        "{unknown:?}"
    );
    let wrong_type = verdict(&response, 0, 2);
    assert_eq!(wrong_type.verdict, Verdict::Deny as i32);
    assert!(
        wrong_type
            .reasons
            .contains(&(ReasonCode::SchemaViolation as i32)),
        "{wrong_type:?}"
    );
    // Wrong length on facebook_feed; not registered at all on facebook_ads.
    let wrong_length = verdict(&response, 0, 3);
    assert_eq!(wrong_length.verdict, Verdict::Deny as i32);
    assert_eq!(wrong_length.expires_at_unix_micros, 0);
    let source = verdict(&response, 1, 0);
    assert_eq!(source.reasons, vec![ReasonCode::UnknownSource as i32]);

    let read_back = server
        .client
        .get_features(read(
            &[
                (11, "facebook_feed"),
                (11, "facebook_ads"),
                (12, "facebook_feed"),
            ],
            &["interest_hiking", "interest_cooking", "topic_embedding"],
        ))
        .await
        .expect("read");
    assert_eq!(
        status(&read_back, 0, "interest_hiking"),
        ValueStatus::Present
    );
    assert_eq!(
        status(&read_back, 1, "interest_hiking"),
        ValueStatus::Present
    );
    assert_eq!(
        status(&read_back, 0, "interest_cooking"),
        ValueStatus::Defaulted,
        "refused values are not stored"
    );
    assert_eq!(
        status(&read_back, 0, "topic_embedding"),
        ValueStatus::NotFound
    );
    assert_eq!(
        status(&read_back, 2, "interest_hiking"),
        ValueStatus::Defaulted
    );
}

#[tokio::test]
async fn empty_batches_get_empty_answers() {
    let server = TestServer::start().await;
    let response = server
        .client
        .get_features(read(&[], &["interest_hiking"]))
        .await
        .expect("read");
    assert!(response.rows.is_empty());
    let response = server
        .client
        .write_features(write("empty", vec![]))
        .await
        .expect("write");
    assert!(response.rows.is_empty());
}

#[tokio::test]
async fn the_registry_is_listed() {
    let server = TestServer::start().await;
    let features = server.client.list_features().await.expect("list features");
    let embedding = features
        .iter()
        .find(|feature| feature.name == "topic_embedding")
        .expect("registered");
    assert_eq!(embedding.value_type, proto::ValueType::FloatVector as i32);
    assert_eq!(embedding.dimension, 8);
    let health = features
        .iter()
        .find(|feature| feature.name == "interest_fitness_health")
        .expect("registered");
    assert_eq!(health.sensitivity, proto::SensitivityClass::Health as i32);
    let surfaces = server.client.list_surfaces().await.expect("list surfaces");
    let ads = surfaces
        .iter()
        .find(|surface| surface.name == "instagram_ads")
        .expect("registered");
    assert_eq!(ads.app, "instagram");
    assert_eq!(ads.purpose, proto::Purpose::Ads as i32);
}
