//! Retention is physical: once swept, an expired value's bytes are in no file.

use std::time::Duration;

use featurestore::domain::Value;
use featurestore::proto::ValueStatus;
use featurestore_tests::{
    TestServer, at, files_containing, files_still_containing, read, row, write,
};

use crate::status;

const CANARY: &str = "canary/expiry_5f3a9c1e";

#[tokio::test]
async fn expired_values_leave_the_data_files_after_the_sweep() {
    let server = TestServer::start().await;
    server.us_adults([5, 6]).await;
    // User 5's row keeps a live value beside the expiring one; user 6's expires whole.
    let mut partly = row(
        5,
        &["facebook_feed"],
        at(-60),
        vec![
            ("top_topic", Value::String(CANARY.to_string())),
            ("interest_hiking", Value::Float(0.4)),
        ],
    );
    partly.features[0].ttl = Some(Duration::from_secs(60));
    let mut wholly = row(
        6,
        &["facebook_feed"],
        at(-60),
        vec![("top_topic", Value::String(CANARY.to_string()))],
    );
    wholly.features[0].ttl = Some(Duration::from_secs(60));
    server
        .client
        .write_features(write("canary", vec![partly, wholly]))
        .await
        .expect("write");
    let data = server.config.data_dir.clone();
    assert!(
        !files_containing(&data, CANARY.as_bytes()).is_empty(),
        "the canary is on disk to begin with"
    );

    server.advance(Duration::from_secs(61));
    let report = server.client.sweep_expired().await.expect("sweep");
    assert_eq!(report.users_swept, 2);
    assert_eq!(report.values_removed, 2);

    let left = files_still_containing(&data, CANARY.as_bytes()).await;
    assert!(left.is_empty(), "the canary is still in {left:?}");

    let response = server
        .client
        .get_features(read(
            &[(5, "facebook_feed"), (6, "facebook_feed")],
            &["top_topic", "interest_hiking"],
        ))
        .await
        .expect("read");
    assert_eq!(status(&response, 0, "top_topic"), ValueStatus::NotFound);
    assert_eq!(
        status(&response, 0, "interest_hiking"),
        ValueStatus::Present,
        "live values stay"
    );
    assert_eq!(status(&response, 1, "top_topic"), ValueStatus::NotFound);
}
