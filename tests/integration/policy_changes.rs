//! What happens to stored values when the rules or a user's state change: purges on a
//! state change, bundle reloads with a purge, and the read-time guard.

use featurestore::domain::{AgeBand, Timestamp, UserStateUpdate, Value};
use featurestore::proto::{RowStatus, ValueStatus};
use featurestore_server::policy::DEFAULT_BUNDLE_TOML;
use featurestore_server::registry::{FeatureId, Sensitivity, SourceId, SurfaceId};
use featurestore_server::storage::codec::encode_row;
use featurestore_server::storage::keys::encode_row_key;
use featurestore_server::storage::{RowKey, StoredRow, StoredValue};
use featurestore_tests::{TestServer, at, read, row, us_adult, write};
use tonic::Code;

use crate::status;

const ALL_SURFACES: [&str; 4] = [
    "facebook_feed",
    "facebook_ads",
    "instagram_reels",
    "instagram_ads",
];

/// Stores interest_hiking for `user_id` on every surface, from a Facebook chat.
async fn store_everywhere(server: &TestServer, user_id: u64) {
    let response = server
        .client
        .write_features(write(
            &format!("everywhere-{user_id}"),
            vec![row(
                user_id,
                &ALL_SURFACES,
                at(-60),
                vec![("interest_hiking", Value::Float(0.8))],
            )],
        ))
        .await
        .expect("write");
    assert!(
        response.rows[0].verdicts[0].reasons.is_empty(),
        "{response:?}"
    );
}

/// The status of interest_hiking for `user_id` on each surface, in ALL_SURFACES order.
async fn statuses(server: &TestServer, user_id: u64) -> Vec<ValueStatus> {
    let keys: Vec<(u64, &str)> = ALL_SURFACES
        .iter()
        .map(|surface| (user_id, *surface))
        .collect();
    crate::statuses(server, &keys, "interest_hiking").await
}

const PRESENT: ValueStatus = ValueStatus::Present;
const GONE: ValueStatus = ValueStatus::Defaulted;

#[tokio::test]
async fn a_state_change_purges_what_it_now_forbids() {
    let server = TestServer::start().await;
    for user_id in 1..=4 {
        server
            .client
            .set_user_state(us_adult(user_id))
            .await
            .expect("state");
        store_everywhere(&server, user_id).await;
        assert_eq!(statuses(&server, user_id).await, [PRESENT; 4]);
    }
    // Moves to an excluded region: every AI-derived value goes.
    server
        .client
        .set_user_state(UserStateUpdate {
            jurisdiction: "DE".to_string(),
            ..us_adult(1)
        })
        .await
        .expect("state");
    assert_eq!(statuses(&server, 1).await, [GONE; 4]);
    // Turns out to be a minor: the ads values go, the content values stay.
    server
        .client
        .set_user_state(UserStateUpdate {
            age_band: AgeBand::Minor,
            ..us_adult(2)
        })
        .await
        .expect("state");
    assert_eq!(statuses(&server, 2).await, [PRESENT, GONE, PRESENT, GONE]);
    // Objects to ads: the same.
    server
        .client
        .set_user_state(UserStateUpdate {
            ads_objection: true,
            ..us_adult(3)
        })
        .await
        .expect("state");
    assert_eq!(statuses(&server, 3).await, [PRESENT, GONE, PRESENT, GONE]);
    // Unlinks the accounts: the Facebook chat's values leave the Instagram surfaces.
    server
        .client
        .set_user_state(UserStateUpdate {
            linked_apps: vec![],
            ..us_adult(4)
        })
        .await
        .expect("state");
    assert_eq!(statuses(&server, 4).await, [PRESENT, PRESENT, GONE, GONE]);
}

fn tightened_bundle() -> String {
    // The US joins the excluded regions, and cycling becomes a health topic.
    let bundle = DEFAULT_BUNDLE_TOML
        .replace("uk = [\"GB\"]", "uk = [\"GB\", \"US\"]")
        .replace(
            "\"health\" = \"health\"",
            "\"health\" = \"health\"\n\"cycling\" = \"health\"",
        );
    assert_ne!(bundle, DEFAULT_BUNDLE_TOML);
    bundle
}

#[tokio::test]
async fn reloading_a_tighter_bundle_purges_what_it_forbids() {
    let directory = tempfile::tempdir().expect("temp dir");
    let bundle_path = directory.path().join("bundle.toml");
    std::fs::write(&bundle_path, DEFAULT_BUNDLE_TOML).expect("write the bundle");
    let server = TestServer::start_with(directory, |config| {
        config.policy_bundle_path = Some(bundle_path.clone())
    })
    .await;
    server
        .client
        .set_user_state(us_adult(1))
        .await
        .expect("state");
    server
        .client
        .set_user_state(UserStateUpdate {
            jurisdiction: "BR".to_string(),
            ..us_adult(2)
        })
        .await
        .expect("state");
    store_everywhere(&server, 1).await;
    store_everywhere(&server, 2).await;
    let mut cycling = row(
        2,
        &ALL_SURFACES,
        at(-60),
        vec![("interest_cooking", Value::Float(0.6))],
    );
    cycling.features[0].topic = Some(featurestore::domain::Topic {
        id: "cycling/commute".to_string(),
        confidence: Some(0.9),
    });
    let response = server
        .client
        .write_features(write("cycling", vec![cycling]))
        .await
        .expect("write");
    assert!(
        response.rows[0].verdicts[0].reasons.is_empty(),
        "{response:?}"
    );
    let before = server.client.policy_status().await.expect("status");

    // An invalid bundle is refused, naming the problem, and the old one stays in force.
    std::fs::write(
        &bundle_path,
        DEFAULT_BUNDLE_TOML.replace(
            "purpose = \"ads\", ads_objection",
            "purpose = \"ads\", objection",
        ),
    )
    .expect("write the bundle");
    let error = server
        .client
        .reload_policy()
        .await
        .expect_err("invalid bundle");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error
            .to_string()
            .contains("rules[6]: unknown input \"objection\""),
        "{error}"
    );
    assert_eq!(
        server.client.policy_status().await.expect("status").hash,
        before.hash
    );
    assert_eq!(statuses(&server, 1).await, [PRESENT; 4]);

    std::fs::write(&bundle_path, tightened_bundle()).expect("write the bundle");
    let reloaded = server.client.reload_policy().await.expect("reload");
    assert_ne!(reloaded.hash, before.hash);
    let finished = server.wait_for_purge().await;
    assert!(finished.purge_finished_at_unix_micros > 0);
    assert_eq!(finished.purge_users_done, 2);
    assert_eq!(
        finished.purge_values_removed, 8,
        "user 1's four values, user 2's four cycling values"
    );
    assert_eq!(
        statuses(&server, 1).await,
        [GONE; 4],
        "a US user's AI values are purged"
    );
    assert_eq!(
        statuses(&server, 2).await,
        [PRESENT; 4],
        "a Brazilian user's stay, re-stamped"
    );
    let keys: Vec<(u64, &str)> = ALL_SURFACES.iter().map(|surface| (2, *surface)).collect();
    let response = server
        .client
        .get_features(read(&keys, &["interest_cooking"]))
        .await
        .expect("read");
    for index in 0..keys.len() {
        assert_eq!(
            status(&response, index, "interest_cooking"),
            GONE,
            "a topic re-classified as health is purged"
        );
    }

    // The purge is on the user's audit trail, under the new bundle.
    let trail = server.client.audit_trail(1, 0).await.expect("trail");
    let purged = trail
        .records
        .iter()
        .find(|record| record.action == "values_purged")
        .expect("the purge is audited");
    assert_eq!(purged.subject, "4 values");
    assert_eq!(purged.policy_bundle_hash, reloaded.hash);

    // Writes now follow the new bundle.
    let response = server
        .client
        .write_features(write(
            "after",
            vec![row(
                1,
                &ALL_SURFACES,
                at(-30),
                vec![("interest_hiking", Value::Float(0.5))],
            )],
        ))
        .await
        .expect("write");
    assert_eq!(response.policy_bundle_hash, reloaded.hash);
    assert!(!response.rows[0].verdicts[0].reasons.is_empty());

    // A restart keeps the new bundle's validation: nothing is withheld.
    let directory = server.stop().await;
    let server = TestServer::start_with(directory, |config| {
        config.policy_bundle_path = Some(bundle_path)
    })
    .await;
    assert_eq!(statuses(&server, 2).await, [PRESENT; 4]);
}

#[tokio::test]
async fn reads_withhold_values_the_policy_forbids_however_they_got_in() {
    let server = TestServer::start().await;
    server
        .client
        .set_user_state(us_adult(2))
        .await
        .expect("state");
    store_everywhere(&server, 2).await;
    let policy_version = {
        // The version stamped on values the current bundle admitted.
        let status = server.client.policy_status().await.expect("status");
        u64::from_str_radix(&status.hash[..16], 16).expect("hex hash")
    };
    let directory = server.stop().await;

    // Put values into RocksDB behind the server's back: a health interest on an ads
    // surface stamped with the current bundle, and a value stamped by a bundle that was
    // never in force.
    {
        let db = featurestore_tests::open_database_directly(&directory);
        let features = db.cf_handle("features").expect("features column family");
        let value = |feature: u16, sensitivity, policy_version| StoredValue {
            feature: FeatureId(feature),
            event_time: at(-60),
            write_time: at(-60),
            expires_at: Timestamp::MAX,
            source: SourceId(1),
            sensitivity,
            policy_version,
            origin_app: "facebook".to_string(),
            topic_id: String::new(),
            microphone_permission: false,
            topic_confidence: None,
            value: Value::Float(0.9),
        };
        let health_on_ads = StoredRow {
            values: vec![value(3, Sensitivity::Health, policy_version)],
        };
        db.put_cf(
            features,
            encode_row_key(RowKey {
                user_id: 1,
                surface: SurfaceId(2),
            }),
            encode_row(&health_on_ads),
        )
        .expect("put");
        let unknown_bundle = StoredRow {
            values: vec![value(1, Sensitivity::None, 0x0123_4567_89ab_cdef)],
        };
        db.put_cf(
            features,
            encode_row_key(RowKey {
                user_id: 1,
                surface: SurfaceId(1),
            }),
            encode_row(&unknown_bundle),
        )
        .expect("put");
    }

    let server = TestServer::start_with(directory, |_| {}).await;
    let response = server
        .client
        .get_features(read(
            &[
                (1, "facebook_ads"),
                (1, "facebook_feed"),
                (2, "facebook_feed"),
            ],
            &["interest_fitness_health", "interest_hiking"],
        ))
        .await
        .expect("read");
    assert_eq!(response.rows[0].status, RowStatus::Ok as i32);
    assert_eq!(
        status(&response, 0, "interest_fitness_health"),
        ValueStatus::WithheldByPolicy
    );
    assert_eq!(
        response.rows[0].float_values,
        vec![0.0, 0.0],
        "nothing withheld is served"
    );
    assert_eq!(
        status(&response, 1, "interest_hiking"),
        ValueStatus::WithheldByPolicy
    );
    assert_eq!(
        status(&response, 2, "interest_hiking"),
        ValueStatus::Present
    );
}
