//! The audit log: what a privacy officer sees for a user, and tamper detection.

use featurestore::domain::{AgeBand, UserStateUpdate, Value};
use featurestore::proto::ReasonCode;
use featurestore_tests::{TestServer, at, row, write};

async fn minor_with_refused_values(server: &TestServer) {
    server
        .client
        .set_user_state(UserStateUpdate {
            user_id: 7,
            jurisdiction: "US".to_string(),
            age_band: AgeBand::Minor,
            linked_apps: vec!["facebook".to_string(), "instagram".to_string()],
            ads_objection: false,
            expected_generation: None,
        })
        .await
        .expect("state");
    server
        .client
        .write_features(write(
            "audited",
            vec![row(
                7,
                &["facebook_feed", "facebook_ads"],
                at(-60),
                vec![
                    ("interest_hiking", Value::Float(0.25)),
                    ("interest_fitness_health", Value::Float(0.75)),
                    ("top_topic", Value::String("canary/topic_3141".to_string())),
                ],
            )],
        ))
        .await
        .expect("write");
}

#[tokio::test]
async fn a_users_trail_shows_refusals_and_state_changes_without_values() {
    let server = TestServer::start().await;
    minor_with_refused_values(&server).await;
    let trail = server.client.audit_trail(7, 0).await.expect("trail");
    let actions: Vec<(&str, &str)> = trail
        .records
        .iter()
        .map(|record| (record.action.as_str(), record.subject.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("user_state_set", ""),
            ("feature_transformed", "interest_hiking"),
            ("feature_denied", "interest_fitness_health"),
            ("feature_transformed", "top_topic"),
        ]
    );
    let hiking = &trail.records[1];
    assert_eq!(hiking.surfaces, ["facebook_ads"]);
    assert_eq!(hiking.reasons, [ReasonCode::MinorOrUnknownAgeForAds as i32]);
    assert_eq!(hiking.caller, "tests@v1");
    assert_eq!(hiking.policy_bundle_hash.len(), 64);
    assert_eq!(hiking.user_pseudonym, trail.user_pseudonym);
    assert_eq!(trail.user_pseudonym.len(), 32);
    let printed = format!("{trail:?}");
    for secret in ["canary/topic_3141", "0.25", "0.75"] {
        assert!(
            !printed.contains(secret),
            "the audit trail holds a value: {secret}"
        );
    }
    // Another user's trail is another pseudonym, and empty.
    let other = server.client.audit_trail(8, 0).await.expect("trail");
    assert_ne!(other.user_pseudonym, trail.user_pseudonym);
    assert!(other.records.is_empty());
}

#[tokio::test]
async fn tampering_with_a_record_is_detected() {
    let server = TestServer::start().await;
    minor_with_refused_values(&server).await;
    let verification = server.client.verify_audit_log().await.expect("verify");
    assert!(verification.intact, "{verification:?}");
    assert_eq!(
        verification.records_checked, 5,
        "state set, write call, three refusals: {verification:?}"
    );
    let directory = server.stop().await;

    // Change who a record says was refused what, behind the server's back.
    {
        let db = featurestore_tests::open_database_directly(&directory);
        let audit = db.cf_handle("audit").expect("audit column family");
        // Records are keyed (chain, sequence): the user's chain holds all five.
        let mut records = db.raw_iterator_cf(audit);
        records.seek_to_first();
        let mut found = None;
        while let (Some(key), Some(record)) = (records.key(), records.value()) {
            if String::from_utf8_lossy(record).contains("interest_fitness_health") {
                found = Some((key.to_vec(), record.to_vec()));
                break;
            }
            records.next();
        }
        drop(records);
        let (key, record) = found.expect("the health refusal is recorded");
        assert!(
            key.ends_with(&3u64.to_be_bytes()),
            "the health refusal is record 3 of its chain"
        );
        let position = record
            .windows(b"interest_fitness_health".len())
            .position(|window| window == b"interest_fitness_health")
            .expect("subject in the record");
        let mut tampered = record.clone();
        // "interest_fitness_health" becomes "interest_hobbies_health".
        tampered[position + 9..position + 16].copy_from_slice(b"hobbies");
        assert_ne!(tampered, record);
        db.put_cf(audit, key, tampered).expect("put");
    }

    let server = TestServer::start_with(directory, |_| {}).await;
    let verification = server.client.verify_audit_log().await.expect("verify");
    assert!(!verification.intact);
    assert_eq!(verification.first_broken_sequence, 3);
    assert_eq!(verification.records_checked, 3);
    let broken: Vec<_> = verification
        .chains
        .iter()
        .filter(|chain| !chain.intact)
        .collect();
    assert_eq!(broken.len(), 1, "only the user's chain: {verification:?}");
    assert_eq!(broken[0].partition, verification.first_broken_partition);
    assert!(
        verification.problem.contains("does not match its hash"),
        "{verification:?}"
    );
}
