//! Bulk loads on a Redis Cluster: the job and its staged chunks live in the cluster, so a
//! stream can stage through one server and commit through another; the commit applies the
//! rows user by user, leaving out users erased or changed since their rows were staged;
//! an erasure purges the user's staged rows wherever they were staged.

use featurestore::domain::{UserStateUpdate, Value};
use featurestore::proto::{ReasonCode, ValueStatus};
use featurestore_tests::cluster::{self, RedisCluster};
use featurestore_tests::{at, read, row};

use crate::bulk_load::{commit, reason, stage};
use crate::redis_server::server_on_cluster;
use crate::status;

const CANARY: &str = "canary/staged_on_cluster_91c3";

fn hiking_with_topic(user_id: u64) -> featurestore::domain::WriteRow {
    row(
        user_id,
        &["facebook_feed"],
        at(-60),
        vec![
            ("interest_hiking", Value::Float(user_id as f32 / 10.0)),
            ("top_topic", Value::String(format!("{CANARY}/{user_id}"))),
        ],
    )
}

/// The values of the keys of the store under `prefix` whose names contain `part`, on every
/// master.
fn values_of_keys(cluster: &RedisCluster, prefix: &str, part: &str) -> Vec<Vec<u8>> {
    let mut values = Vec::new();
    for port in cluster.master_ports() {
        let port = port.to_string();
        let listed = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &port,
                "--scan",
                "--pattern",
                &format!("*{prefix}{part}*"),
            ])
            .output()
            .expect("redis-cli");
        for key in String::from_utf8_lossy(&listed.stdout).lines() {
            let value = std::process::Command::new("redis-cli")
                .args(["-p", &port, "--no-raw", "get", key])
                .output()
                .expect("redis-cli");
            values.push(value.stdout);
        }
    }
    values
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test]
async fn a_job_staged_through_one_server_commits_through_another_without_the_erased() {
    let prefix = cluster::unique_prefix();
    let first = server_on_cluster(Some(&prefix)).await;
    let second = server_on_cluster(Some(&prefix)).await;
    first.us_adults(1..=4).await;
    let ack = stage(
        &first,
        "job",
        1,
        vec![
            hiking_with_topic(1),
            hiking_with_topic(2),
            hiking_with_topic(3),
        ],
    )
    .await;
    assert_eq!(ack.summary.expect("summary").rows_accepted, 3);
    // The stream resumes through the other server: the job is the cluster's.
    let ack = stage(&second, "job", 2, vec![hiking_with_topic(4)]).await;
    assert_eq!(ack.summary.expect("summary").rows_accepted, 1);
    let staged = values_of_keys(cluster::shared(), &prefix, "b:load/job/");
    assert_eq!(staged.len(), 2, "two chunks staged in the cluster");
    assert!(
        staged
            .iter()
            .any(|chunk| contains(chunk, &format!("{CANARY}/2")))
    );

    // Erased through the other server: its staged rows go at once.
    let receipt = second.client.erase_user(2).await.expect("erase");
    assert!(receipt.verified, "{receipt:?}");
    let staged = values_of_keys(cluster::shared(), &prefix, "b:load/job/");
    assert!(
        !staged
            .iter()
            .any(|chunk| contains(chunk, &format!("{CANARY}/2"))),
        "the erased user's staged rows left the cluster"
    );
    assert!(
        staged
            .iter()
            .any(|chunk| contains(chunk, &format!("{CANARY}/1")))
    );
    // User 3 moves where AI signals are excluded: its staged rows were decided before.
    first
        .client
        .set_user_state(UserStateUpdate {
            jurisdiction: "DE".to_string(),
            ..featurestore_tests::us_adult(3)
        })
        .await
        .expect("moved");

    let job = commit(&second, "job").await;
    let summary = job.summary.expect("summary");
    assert_eq!(summary.rows_received, 4);
    assert_eq!(summary.rows_accepted, 2, "users 1 and 4");
    assert_eq!(reason(&summary, ReasonCode::UserErased).0, 1, "user 2");
    assert_eq!(reason(&summary, ReasonCode::StaleGeneration).0, 1, "user 3");

    let keys: Vec<(u64, &str)> = (1..=4).map(|user| (user, "facebook_feed")).collect();
    let response = first
        .client
        .get_features(read(&keys, &["interest_hiking"]))
        .await
        .expect("read");
    let statuses: Vec<ValueStatus> = (0..keys.len())
        .map(|index| status(&response, index, "interest_hiking"))
        .collect();
    assert_eq!(
        statuses,
        [
            ValueStatus::Present,
            ValueStatus::Defaulted,
            ValueStatus::Defaulted,
            ValueStatus::Present
        ]
    );
    assert_eq!(
        values_of_keys(cluster::shared(), &prefix, "b:load/job/"),
        Vec::<Vec<u8>>::new(),
        "a committed job leaves no staged chunk"
    );
    first.stop().await;
    second.stop().await;
}
