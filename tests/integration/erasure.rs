//! Erasure that sticks: nothing of the user is served, written, linkable or on disk, and a
//! backup taken before the erasure does not bring the user back.

use featurestore::domain::Value;
use featurestore::proto::ValueStatus;
use featurestore_tests::{
    TestServer, at, files_containing, files_still_containing, read, row, write,
};
use tonic::Code;

use crate::status;

const CANARY: &str = "canary/erasure_7c41d09b";

#[tokio::test]
async fn an_erased_user_is_gone_from_reads_writes_the_audit_trail_the_files_and_restored_backups() {
    let server = TestServer::start().await;
    server.us_adults([42, 43]).await;
    let canary_row = |user_id| {
        row(
            user_id,
            &["facebook_feed", "instagram_reels"],
            at(-60),
            vec![
                ("top_topic", Value::String(CANARY.to_string())),
                ("interest_hiking", Value::Float(0.5)),
            ],
        )
    };
    let request = write("canary", vec![canary_row(42)]);
    server
        .client
        .write_features(request.clone())
        .await
        .expect("write");
    server
        .client
        .write_features(write(
            "neighbour",
            vec![row(
                43,
                &["facebook_feed"],
                at(-60),
                vec![("interest_hiking", Value::Float(0.7))],
            )],
        ))
        .await
        .expect("write");
    let backup = server.client.create_backup().await.expect("backup");
    let backup_path = std::path::PathBuf::from(&backup.path);
    assert!(
        !files_containing(&backup_path, CANARY.as_bytes()).is_empty(),
        "the backup holds the canary"
    );
    let data = server.config.data_dir.clone();
    assert!(
        !files_containing(&data, CANARY.as_bytes()).is_empty(),
        "the canary is on disk to begin with"
    );
    let trail_before = server.client.audit_trail(42, 0).await.expect("trail");
    assert!(!trail_before.records.is_empty());

    let receipt = server.client.erase_user(42).await.expect("erase");
    assert!(receipt.verified, "{receipt:?}");
    for step in [
        receipt.fenced_at_unix_micros,
        receipt.deleted_at_unix_micros,
        receipt.compacted_at_unix_micros,
        receipt.verified_at_unix_micros,
    ] {
        assert!(step >= receipt.requested_at_unix_micros, "{receipt:?}");
    }
    assert_eq!(
        server
            .client
            .erasure_status(&receipt.receipt_id)
            .await
            .expect("status"),
        receipt
    );
    let error = server
        .client
        .erasure_status("er-unknown")
        .await
        .expect_err("unknown receipt");
    assert_eq!(error.code(), Code::NotFound);

    // Reads: nothing.
    let keys = [
        (42, "facebook_feed"),
        (42, "instagram_reels"),
        (43, "facebook_feed"),
    ];
    let response = server
        .client
        .get_features(read(&keys, &["top_topic", "interest_hiking"]))
        .await
        .expect("read");
    assert_eq!(status(&response, 0, "top_topic"), ValueStatus::NotFound);
    assert_eq!(
        status(&response, 1, "interest_hiking"),
        ValueStatus::Defaulted
    );
    assert_eq!(
        status(&response, 2, "interest_hiking"),
        ValueStatus::Present,
        "other users are untouched"
    );

    // Writes: refused whole, whatever generation they saw, including a retry of the
    // request that stored the canary.
    for attempt in [request.clone(), write("after", vec![canary_row(42)])] {
        let error = server
            .client
            .write_features(attempt)
            .await
            .expect_err("refused");
        assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
        assert_eq!(
            error.policy_refusal().expect("a policy reason").reason,
            "USER_ERASED"
        );
    }
    let mut fresh_generation = canary_row(42);
    fresh_generation.user_state_generation = 99;
    let error = server
        .client
        .write_features(write("later", vec![fresh_generation]))
        .await
        .expect_err("refused");
    assert_eq!(
        error.policy_refusal().expect("a policy reason").reason,
        "USER_ERASED"
    );

    // The audit records stay but no longer link to the person.
    let trail_after = server.client.audit_trail(42, 0).await.expect("trail");
    assert!(trail_after.records.is_empty());
    assert!(trail_after.user_pseudonym.is_empty());
    let verification = server.client.verify_audit_log().await.expect("verify");
    assert!(verification.intact);

    // Files: the canary is in none of the data directory's files.
    let left = files_still_containing(&data, CANARY.as_bytes()).await;
    assert!(left.is_empty(), "the canary is still in {left:?}");
    let temp = server.stop().await;

    // Restore the backup taken before the erasure and start on it.
    let erased_data = temp.path().join("db-before-restore");
    std::fs::rename(&data, &erased_data).expect("move the live database aside");
    featurestore_server::restore_backup(&backup_path, &data).expect("restore");
    assert!(
        !files_containing(&data, CANARY.as_bytes()).is_empty(),
        "the restored files hold the canary"
    );
    let server = TestServer::start_with(temp, |_| {}).await;
    let response = server
        .client
        .get_features(read(&keys, &["top_topic", "interest_hiking"]))
        .await
        .expect("read");
    assert_eq!(
        status(&response, 0, "top_topic"),
        ValueStatus::NotFound,
        "the restore did not resurrect the user"
    );
    assert_eq!(
        status(&response, 2, "interest_hiking"),
        ValueStatus::Present
    );
    let left = files_still_containing(&data, CANARY.as_bytes()).await;
    assert!(
        left.is_empty(),
        "the canary is still in the restored directory: {left:?}"
    );
    let receipt = server
        .client
        .erasure_status(&receipt.receipt_id)
        .await
        .expect("status");
    assert_eq!(receipt.reapplied_at_unix_micros.len(), 1, "{receipt:?}");
    assert!(receipt.verified);
}

#[tokio::test]
async fn a_write_racing_an_erasure_is_refused_whole() {
    let server = TestServer::start().await;
    server.us_adults([1, 2]).await;
    // A pipeline derived these rows before the erasure (generation 1).
    let racing = write(
        "racing",
        vec![
            row(
                2,
                &["facebook_feed"],
                at(-60),
                vec![("interest_hiking", Value::Float(0.3))],
            ),
            row(
                1,
                &["facebook_feed"],
                at(-60),
                vec![("interest_hiking", Value::Float(0.9))],
            ),
        ],
    );
    server.client.erase_user(1).await.expect("erase");
    let error = server
        .client
        .write_features(racing)
        .await
        .expect_err("refused whole");
    let refusal = error.policy_refusal().expect("a policy reason");
    assert_eq!(refusal.reason, "USER_ERASED");
    assert_eq!(refusal.row, 1);
    assert_eq!(refusal.current_generation, 2);
    let response = server
        .client
        .get_features(read(&[(2, "facebook_feed")], &["interest_hiking"]))
        .await
        .expect("read");
    assert_eq!(
        status(&response, 0, "interest_hiking"),
        ValueStatus::Defaulted,
        "not even the other user's row"
    );
    let state = server.client.get_user_state(1).await.expect("state");
    assert_eq!(
        state.erasure_state,
        featurestore::proto::ErasureState::Erased as i32
    );
    assert!(
        state.jurisdiction.is_empty() && state.linked_apps.is_empty(),
        "the state keeps nothing but the fence"
    );
}
