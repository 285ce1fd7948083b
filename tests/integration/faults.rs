//! Injected faults (the server's failpoints, from the `fail` crate): a full disk, an audit
//! log that cannot be appended to, a slow start. Failpoints are global to a process, so
//! each scenario runs in a child process of this test binary (the ignored tests below; see
//! [`crate::run_in_child`]), where no other test's server can trip over them.

use std::time::{Duration, Instant};

use featurestore::domain::Value;
use featurestore::proto::ValueStatus;
use featurestore_client::ClientOptions;
use featurestore_tests::{TestServer, at, read, row, write};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::{float, status};

/// Runs the ignored test `scenario` of this module in a child process.
fn run_in_child(scenario: &str) {
    crate::run_in_child(&format!("faults::{scenario}"));
}

/// Whether this process is the child running `scenario`.
fn is_child_for(scenario: &str) -> bool {
    crate::is_child_for(&format!("faults::{scenario}"))
}

async fn health(server: &TestServer) -> Option<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint.clone())
        .expect("endpoint")
        .connect()
        .await
        .ok()?;
    let answer = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "featurestore.v1.FeatureStore".to_string(),
        })
        .await
        .ok()?;
    Some(answer.into_inner().status())
}

/// Waits up to 20 seconds for the health service to say `wanted`.
async fn wait_for_health(server: &TestServer, wanted: ServingStatus) {
    let started = Instant::now();
    let mut ticks = featurestore_tests::poll_every(Duration::from_millis(20));
    loop {
        if health(server).await == Some(wanted) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "health did not turn {wanted:?}: {:?}",
            health(server).await
        );
        ticks.tick().await;
    }
}

fn hiking(key: &str, value: f32, seconds: i64) -> featurestore::domain::WriteRequest {
    write(
        key,
        vec![row(
            1,
            &["facebook_feed", "instagram_reels"],
            at(seconds),
            vec![
                ("interest_hiking", Value::Float(value)),
                ("interest_cooking", Value::Float(value)),
            ],
        )],
    )
}

fn both_surfaces() -> featurestore::domain::ReadRequest {
    read(
        &[(1, "facebook_feed"), (1, "instagram_reels")],
        &["interest_hiking", "interest_cooking"],
    )
}

/// Every value of user 1 on both surfaces, asserting they agree: a write is all there or
/// not at all.
async fn stored(server: &TestServer) -> Option<f32> {
    let response = server
        .client
        .get_features(both_surfaces())
        .await
        .expect("reads keep working");
    let mut values = Vec::new();
    for row in 0..2 {
        for feature in ["interest_hiking", "interest_cooking"] {
            values.push(match status(&response, row, feature) {
                ValueStatus::Present => Some(float(&response, row, feature)),
                _ => None,
            });
        }
    }
    assert!(
        values.windows(2).all(|pair| pair[0] == pair[1]),
        "a write was stored in part: {values:?}"
    );
    values[0]
}

fn quick_probe(data_dir: tempfile::TempDir) -> impl std::future::Future<Output = TestServer> {
    TestServer::start_with(data_dir, |config| {
        config.storage.health_probe_interval = Duration::from_millis(50);
    })
}

#[test]
fn a_full_disk_refuses_writes_whole_keeps_reads_and_turns_health_not_serving() {
    run_in_child("disk_full");
}

#[tokio::test]
// Ignored so that it runs only in the child process its parent test starts (failpoints
// are process-wide); the parent runs in every suite run.
#[ignore = "run by a_full_disk_refuses_writes_whole_keeps_reads_and_turns_health_not_serving"]
async fn disk_full() {
    if !is_child_for("disk_full") {
        return;
    }
    let server = quick_probe(tempfile::tempdir().expect("directory")).await;
    server.us_adults([1]).await;
    server
        .client
        .write_features(hiking("first", 0.25, -20))
        .await
        .expect("a write before the disk fills");
    wait_for_health(&server, ServingStatus::Serving).await;

    fail::cfg("engine-write", "return").expect("configure the failpoint");
    let client = server.client_with(ClientOptions {
        retries: 0,
        ..ClientOptions::default()
    });
    let error = client
        .write_features(hiking("second", 0.5, -10))
        .await
        .expect_err("no space left: the write is refused");
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    assert_eq!(
        stored(&server).await,
        Some(0.25),
        "nothing of it was stored"
    );
    wait_for_health(&server, ServingStatus::NotServing).await;

    fail::remove("engine-write");
    wait_for_health(&server, ServingStatus::Serving).await;
    // The caller retries the same write with the same key once the disk has room.
    client
        .write_features(hiking("second", 0.5, -10))
        .await
        .expect("the retry succeeds");
    assert_eq!(stored(&server).await, Some(0.5));
    let audit = client.verify_audit_log().await.expect("verify");
    assert!(audit.intact, "{audit:?}");
    server.stop().await;
}

#[test]
fn a_write_whose_audit_record_cannot_be_appended_is_refused_not_stored_unaudited() {
    run_in_child("audit_append_fails");
}

#[tokio::test]
// Ignored so that it runs only in the child process its parent test starts (failpoints
// are process-wide); the parent runs in every suite run.
#[ignore = "run by a_write_whose_audit_record_cannot_be_appended_is_refused_not_stored_unaudited"]
async fn audit_append_fails() {
    if !is_child_for("audit_append_fails") {
        return;
    }
    let server = TestServer::start().await;
    server.us_adults([1]).await;
    let client = server.client_with(ClientOptions {
        retries: 0,
        ..ClientOptions::default()
    });
    let records = || async {
        client
            .verify_audit_log()
            .await
            .expect("verify the audit log")
            .records_checked
    };
    let before = records().await;

    fail::cfg("audit-append", "return").expect("configure the failpoint");
    let error = client
        .write_features(hiking("unaudited", 0.5, -10))
        .await
        .expect_err("the write cannot be audited");
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    assert_eq!(
        stored(&server).await,
        None,
        "the value was not stored unaudited"
    );
    let error = client
        .set_user_state(featurestore::domain::UserStateUpdate {
            user_id: 1,
            jurisdiction: "FR".to_string(),
            age_band: featurestore::domain::AgeBand::Adult,
            linked_apps: Vec::new(),
            ads_objection: true,
            expected_generation: None,
        })
        .await
        .expect_err("a change of user state cannot be audited either");
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    fail::remove("audit-append");
    let state = client.get_user_state(1).await.expect("state");
    assert_eq!(
        state.jurisdiction, "US",
        "the refused change was not applied"
    );

    assert_eq!(
        records().await,
        before,
        "no record of the refused calls, since nothing of them happened"
    );
    client
        .write_features(hiking("unaudited", 0.5, -10))
        .await
        .expect("the same write once the audit log works");
    assert_eq!(stored(&server).await, Some(0.5));
    assert_eq!(records().await, before + 1, "the write's record");
    assert!(client.verify_audit_log().await.expect("verify").intact);
    server.stop().await;
}

#[test]
fn while_starting_the_server_says_not_serving_and_refuses_calls_with_unavailable() {
    run_in_child("slow_start");
}

#[tokio::test]
// Ignored so that it runs only in the child process its parent test starts (failpoints
// are process-wide); the parent runs in every suite run.
#[ignore = "run by while_starting_the_server_says_not_serving_and_refuses_calls_with_unavailable"]
async fn slow_start() {
    if !is_child_for("slow_start") {
        return;
    }
    fail::cfg("core-start", "sleep(3000)").expect("configure the failpoint");
    let server = TestServer::launch_default();
    wait_for_health(&server, ServingStatus::NotServing).await;
    let client = server.client_with(ClientOptions {
        retries: 0,
        ..ClientOptions::default()
    });
    let error = client
        .get_features(both_surfaces())
        .await
        .expect_err("no reads before the core is ready");
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    assert!(error.to_string().contains("starting"), "{error}");

    wait_for_health(&server, ServingStatus::Serving).await;
    fail::remove("core-start");
    // The same client, whose connection was made while starting, is served now.
    let started = Instant::now();
    let mut ticks = featurestore_tests::poll_every(Duration::from_millis(20));
    loop {
        match client.get_features(both_surfaces()).await {
            Ok(response) => {
                assert_eq!(response.rows.len(), 2);
                break;
            }
            Err(error) => {
                assert_eq!(error.code(), Code::Unavailable, "{error}");
                assert!(started.elapsed() < Duration::from_secs(10), "{error}");
                ticks.tick().await;
            }
        }
    }
    server.stop().await;
}
