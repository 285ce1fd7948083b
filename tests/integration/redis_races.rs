//! Two servers on one Redis Cluster changing the same users: no guarantee rests on a
//! server's own locks. One test stops a server's step between what it read and its script,
//! changes the user through the other server right then, and reads back that nothing the
//! new state forbids was stored; a bounded stress test races writers, state changes and
//! erasures through both servers and judges every value served with an independent oracle.
//! Failpoints are global to a process, so each runs in a child process of this binary.

use featurestore_tests::cluster;
use featurestore_tests::write;
use tonic::Code;

use crate::races::{ABSENT, Pause, STORED, chat, hiking, moved_to};
use crate::redis_server::server_on_cluster;

#[test]
fn a_step_read_before_another_servers_state_change_writes_nothing_after_it() {
    crate::run_in_child("redis_races::step_then_state_change_elsewhere");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Ignored so that it runs only in the child process its parent test starts (failpoints
// are process-wide); the parent runs in every suite run.
#[ignore = "run by a_step_read_before_another_servers_state_change_writes_nothing_after_it"]
async fn step_then_state_change_elsewhere() {
    if !crate::is_child_for("redis_races::step_then_state_change_elsewhere") {
        return;
    }
    let prefix = cluster::unique_prefix();
    let first = server_on_cluster(Some(&prefix)).await;
    let second = server_on_cluster(Some(&prefix)).await;
    first.us_adults([1, 2]).await;
    // Both users' steps are decided, not yet sent. User 1's carries the call's audit
    // record; user 2's records nothing in the audit log: only the user's version can tell
    // that its state moved.
    let pause = Pause::arm("redis-step-decided");
    let writing = {
        let client = first.client.clone();
        tokio::spawn(async move {
            client
                .write_features(write("both", vec![chat(1), chat(2)]))
                .await
        })
    };
    pause.reached().await;
    second
        .client
        .set_user_state(moved_to(2, "DE"))
        .await
        .expect("the state changes through the other server");
    pause.release();
    let answer = writing.await.expect("the write ends");
    if let Err(error) = &answer {
        assert!(
            matches!(error.code(), Code::FailedPrecondition | Code::Aborted),
            "{error}"
        );
    }
    assert_eq!(hiking(&first, [1]).await, [STORED]);
    assert_eq!(
        hiking(&second, [2]).await,
        [ABSENT],
        "a value decided for a US adult was stored after the user moved to Germany"
    );
}

#[test]
fn two_servers_racing_on_one_cluster_never_serve_a_forbidden_value() {
    let report = crate::run_in_child("redis_races::two_servers_race");
    for line in report.lines().filter(|line| line.starts_with("stress ")) {
        eprintln!("{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Ignored so that it runs only in the child process its parent test starts (failpoints
// are process-wide); the parent runs in every suite run.
#[ignore = "run by two_servers_racing_on_one_cluster_never_serve_a_forbidden_value"]
async fn two_servers_race() {
    if !crate::is_child_for("redis_races::two_servers_race") {
        return;
    }
    // Each write waits a little between its decision and its application, and each step of
    // the store between its read and its script, so that changes through the other server
    // land in between.
    fail::cfg("write-decided", "50%sleep(3)").expect("configure the failpoint");
    fail::cfg("redis-step-decided", "30%sleep(2)").expect("configure the failpoint");
    let prefix = cluster::unique_prefix();
    let first = server_on_cluster(Some(&prefix)).await;
    let second = server_on_cluster(Some(&prefix)).await;
    crate::stress::race(
        &[&first, &second],
        None,
        false,
        std::time::Duration::from_secs(8),
    )
    .await;
}
