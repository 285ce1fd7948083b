//! Each race between a decision and the user state it was made on, forced at the worst
//! moment: a failpoint stops the server's thread after it decided and before it applied
//! (a write, a bulk-load chunk, a bulk-load commit, a purge, a sweep; a read about to keep
//! the rows it read in the row cache), the test changes the
//! user's state or erases the user right then, lets the thread go, and reads back that
//! nothing the new state forbids was stored. Failpoints are global to a process, so each
//! scenario runs in a child process of this test binary (see [`crate::run_in_child`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use featurestore::domain::{UserStateUpdate, Value, WriteRow};
use featurestore::proto::{self, ErasureState, ReasonCode, ValueStatus};
use featurestore_server::policy::DEFAULT_BUNDLE_TOML;
use featurestore_tests::{TestServer, at, files_containing, row, us_adult, write};
use tonic::Code;

fn run_in_child(scenario: &str) {
    crate::run_in_child(&format!("races::{scenario}"));
}

fn is_child_for(scenario: &str) -> bool {
    crate::is_child_for(&format!("races::{scenario}"))
}

/// A failpoint that stops the first thread to reach it until the test lets it go, so that
/// the test can do, at exactly that moment, what would race it. Later threads pass.
pub(crate) struct Pause {
    name: &'static str,
    reached: Receiver<()>,
    release: Sender<()>,
}

impl Pause {
    pub(crate) fn arm(name: &'static str) -> Pause {
        let (reached_sender, reached) = std::sync::mpsc::channel();
        let (release, release_receiver) = std::sync::mpsc::channel::<()>();
        let armed = AtomicBool::new(true);
        let reached_sender = Mutex::new(reached_sender);
        let release_receiver = Mutex::new(release_receiver);
        fail::cfg_callback(name, move || {
            if armed.swap(false, Ordering::SeqCst) {
                let _ = reached_sender.lock().expect("not poisoned").send(());
                // Bounded, so that a failing test cannot hang the suite.
                let _ = release_receiver
                    .lock()
                    .expect("not poisoned")
                    .recv_timeout(Duration::from_secs(60));
            }
        })
        .expect("configure the failpoint");
        Pause {
            name,
            reached,
            release,
        }
    }

    /// Waits until a thread stands at the failpoint.
    pub(crate) async fn reached(&self) {
        let started = Instant::now();
        let mut ticks = featurestore_tests::poll_every(Duration::from_millis(5));
        loop {
            match self.reached.try_recv() {
                Ok(()) => return,
                Err(TryRecvError::Empty) => {
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "nothing reached the failpoint {}",
                        self.name
                    );
                    ticks.tick().await;
                }
                Err(TryRecvError::Disconnected) => panic!("the failpoint {} is gone", self.name),
            }
        }
    }

    pub(crate) fn release(&self) {
        let _ = self.release.send(());
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        self.release();
        fail::remove(self.name);
    }
}

/// An AI-derived value for the Facebook feed: allowed for a US adult, forbidden once the
/// user lives where AI signals are excluded (the EU, the UK, South Korea).
pub(crate) fn chat(user_id: u64) -> WriteRow {
    row(
        user_id,
        &["facebook_feed"],
        at(-60),
        vec![("interest_hiking", Value::Float(0.5))],
    )
}

pub(crate) fn moved_to(user_id: u64, jurisdiction: &str) -> UserStateUpdate {
    UserStateUpdate {
        jurisdiction: jurisdiction.to_string(),
        ..us_adult(user_id)
    }
}

/// The status of interest_hiking on the Facebook feed of each user.
pub(crate) async fn hiking(
    server: &TestServer,
    users: impl IntoIterator<Item = u64>,
) -> Vec<ValueStatus> {
    let keys: Vec<(u64, &str)> = users
        .into_iter()
        .map(|user| (user, "facebook_feed"))
        .collect();
    crate::statuses(server, &keys, "interest_hiking").await
}

pub(crate) const STORED: ValueStatus = ValueStatus::Present;
pub(crate) const ABSENT: ValueStatus = ValueStatus::Defaulted;

#[test]
fn a_write_decided_before_a_state_change_is_not_applied_after_it() {
    run_in_child("write_then_state_change");
}

#[tokio::test]
// Ignored so that it runs only in the child process its parent test starts (failpoints
// are process-wide); the parent runs in every suite run.
#[ignore = "run by a_write_decided_before_a_state_change_is_not_applied_after_it"]
async fn write_then_state_change() {
    if !is_child_for("write_then_state_change") {
        return;
    }
    let server = TestServer::start().await;
    server.us_adults(1..=3).await;
    let pause = Pause::arm("write-decided");
    let client = server.client.clone();
    let writing = tokio::spawn(async move {
        client
            .write_features(write("raced", (1..=3).map(chat).collect()))
            .await
    });
    pause.reached().await;
    server
        .client
        .set_user_state(moved_to(2, "DE"))
        .await
        .expect("the state change is not held up by the write");
    pause.release();
    let error = writing
        .await
        .expect("the write's task")
        .expect_err("decided on a state that changed: refused whole");
    assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
    let refusal = error.policy_refusal().expect("a machine-readable reason");
    assert_eq!(
        (
            refusal.reason.as_str(),
            refusal.row,
            refusal.current_generation
        ),
        ("STALE_GENERATION", 1, 2)
    );
    assert_eq!(hiking(&server, 1..=3).await, [ABSENT; 3]);
}

#[test]
fn a_write_decided_before_an_erasure_is_not_applied_after_it() {
    run_in_child("write_then_erasure");
}

#[tokio::test]
// Ignored so that it runs only in the child process its parent test starts (failpoints
// are process-wide); the parent runs in every suite run.
#[ignore = "run by a_write_decided_before_an_erasure_is_not_applied_after_it"]
async fn write_then_erasure() {
    if !is_child_for("write_then_erasure") {
        return;
    }
    let server = TestServer::start().await;
    server.us_adults(1..=2).await;
    // The health interest is refused, so the write audits it under each user's pseudonym.
    let rows = (1..=2)
        .map(|user_id| {
            row(
                user_id,
                &["facebook_feed"],
                at(-60),
                vec![
                    ("interest_hiking", Value::Float(0.5)),
                    ("interest_fitness_health", Value::Float(0.5)),
                ],
            )
        })
        .collect();
    let pause = Pause::arm("write-decided");
    let client = server.client.clone();
    let writing = tokio::spawn(async move { client.write_features(write("raced", rows)).await });
    pause.reached().await;
    let receipt = server.client.erase_user(2).await.expect("erase");
    assert!(receipt.verified, "{receipt:?}");
    pause.release();
    let error = writing
        .await
        .expect("the write's task")
        .expect_err("refused whole");
    let refusal = error.policy_refusal().expect("a machine-readable reason");
    assert_eq!((refusal.reason.as_str(), refusal.row), ("USER_ERASED", 1));
    assert_eq!(hiking(&server, 1..=2).await, [ABSENT; 2]);
    // The erasure ended, and the write made the erased user no new pseudonym key.
    let state = server.client.get_user_state(2).await.expect("state");
    assert_eq!(state.erasure_state, ErasureState::Erased as i32);
    let trail = server.client.audit_trail(2, 0).await.expect("trail");
    assert_eq!(trail.user_pseudonym, "", "{trail:?}");
    // A restart finds nothing of the user to erase again.
    let directory = server.stop().await;
    let server = TestServer::start_with(directory, |_| {}).await;
    let receipt = server
        .client
        .erasure_status(&receipt.receipt_id)
        .await
        .expect("receipt");
    assert!(
        receipt.verified && receipt.reapplied_at_unix_micros.is_empty(),
        "{receipt:?}"
    );
}

#[test]
fn a_bulk_load_commit_leaves_out_users_whose_state_changed_after_it_was_prepared() {
    run_in_child("commit_then_state_change");
}

#[tokio::test]
// Ignored so that it runs only in the child process its parent test starts (failpoints
// are process-wide); the parent runs in every suite run.
#[ignore = "run by a_bulk_load_commit_leaves_out_users_whose_state_changed_after_it_was_prepared"]
async fn commit_then_state_change() {
    if !is_child_for("commit_then_state_change") {
        return;
    }
    // Both commit paths: table files ingested, and a small job's one write batch.
    for ingest_rows_min in [1, 1_000_000] {
        let server = TestServer::start_with(tempfile::tempdir().expect("directory"), |config| {
            config.bulk_load.ingest_rows_min = ingest_rows_min;
        })
        .await;
        server.us_adults(1..=4).await;
        let mut session = server.client.start_load("raced", "").await.expect("attach");
        session
            .send_chunk(
                1,
                (1..=4)
                    .map(|user| proto::WriteRow::from(chat(user)))
                    .collect(),
            )
            .await
            .expect("send");
        session.next_ack().await.expect("staged");
        let pause = Pause::arm("load-commit-prepared");
        let committing = tokio::spawn(session.commit());
        pause.reached().await;
        server
            .client
            .set_user_state(moved_to(3, "KR"))
            .await
            .expect("state");
        let receipt = server.client.erase_user(4).await.expect("erase");
        assert!(receipt.verified, "{receipt:?}");
        pause.release();
        let job = committing
            .await
            .expect("the commit's task")
            .expect("committed");
        let summary = job.summary.expect("a summary");
        let refused = |reason: ReasonCode| {
            summary
                .reasons
                .iter()
                .find(|count| count.reason == reason as i32)
                .map_or(0, |count| count.rows)
        };
        assert_eq!(
            (
                refused(ReasonCode::StaleGeneration),
                refused(ReasonCode::UserErased)
            ),
            (1, 1),
            "{summary:?}"
        );
        assert_eq!(
            hiking(&server, 1..=4).await,
            [STORED, STORED, ABSENT, ABSENT],
            "ingest_rows_min {ingest_rows_min}"
        );
        server.stop().await;
    }
}

#[test]
fn a_chunk_decided_before_an_erasure_is_staged_without_the_erased_user() {
    run_in_child("chunk_then_erasure");
}

#[tokio::test]
// Ignored so that it runs only in the child process its parent test starts (failpoints
// are process-wide); the parent runs in every suite run.
#[ignore = "run by a_chunk_decided_before_an_erasure_is_staged_without_the_erased_user"]
async fn chunk_then_erasure() {
    if !is_child_for("chunk_then_erasure") {
        return;
    }
    const CANARY: &str = "canary/staged_5e1f09";
    let server = TestServer::start().await;
    server.us_adults(1..=2).await;
    let mut session = server.client.start_load("raced", "").await.expect("attach");
    let pause = Pause::arm("load-chunk-decided");
    let canary = row(
        2,
        &["facebook_feed"],
        at(-60),
        vec![("top_topic", Value::String(CANARY.to_string()))],
    );
    session
        .send_chunk(
            1,
            vec![
                proto::WriteRow::from(chat(1)),
                proto::WriteRow::from(canary),
            ],
        )
        .await
        .expect("send");
    pause.reached().await;
    let receipt = server.client.erase_user(2).await.expect("erase");
    assert!(receipt.verified, "{receipt:?}");
    pause.release();
    session.next_ack().await.expect("staged");
    assert_eq!(
        files_containing(&server.config.bulk_load.staging_dir, CANARY.as_bytes()),
        Vec::<std::path::PathBuf>::new(),
        "no staged copy of the erased user's value"
    );
    let job = session.commit().await.expect("committed");
    let summary = job.summary.expect("a summary");
    assert!(
        summary
            .reasons
            .iter()
            .any(|count| count.reason == ReasonCode::UserErased as i32 && count.rows == 1),
        "{summary:?}"
    );
    assert_eq!(hiking(&server, 1..=2).await, [STORED, ABSENT]);
}

/// Stops a revalidation of user 1's rows (by a purge or a sweep, started by `start`) after
/// it decided what to keep and before it wrote it, moves the user to South Korea meanwhile,
/// and checks that the change waited for that step and then removed the user's AI-derived
/// values, rather than the step writing back what the change had removed.
async fn revalidation_then_state_change(
    server: &TestServer,
    start: impl std::future::Future<Output = ()> + Send + 'static,
) {
    server.us_adults([1]).await;
    server
        .client
        .write_features(write("chat", vec![chat(1)]))
        .await
        .expect("write");
    assert_eq!(hiking(server, [1]).await, [STORED]);
    let pause = Pause::arm("revalidate-decided");
    let started = tokio::spawn(start);
    pause.reached().await;
    let client = server.client.clone();
    let mut change = tokio::spawn(async move { client.set_user_state(moved_to(1, "KR")).await });
    // Time for the change to overtake the revalidation, were the user's rows not held.
    let overtook = tokio::time::timeout(Duration::from_secs(1), &mut change)
        .await
        .is_ok();
    pause.release();
    change
        .await
        .expect("the change's task")
        .expect("the state change");
    started.await.expect("the revalidation's task");
    assert!(
        !overtook,
        "the state change went through while a revalidation of the user stood decided"
    );
    assert_eq!(hiking(server, [1]).await, [ABSENT]);
}

#[test]
fn a_purge_never_writes_back_what_a_state_change_removed() {
    run_in_child("purge_then_state_change");
}

#[tokio::test]
// Ignored so that it runs only in the child process its parent test starts (failpoints
// are process-wide); the parent runs in every suite run.
#[ignore = "run by a_purge_never_writes_back_what_a_state_change_removed"]
async fn purge_then_state_change() {
    if !is_child_for("purge_then_state_change") {
        return;
    }
    let bundle = tempfile::tempdir().expect("directory");
    let bundle_path = bundle.path().join("bundle.toml");
    std::fs::write(&bundle_path, DEFAULT_BUNDLE_TOML).expect("write the bundle");
    let server = TestServer::start_with(tempfile::tempdir().expect("directory"), |config| {
        config.policy_bundle_path = Some(bundle_path.clone());
    })
    .await;
    // A new threshold changes how inputs are bucketed: every stored value is judged again.
    std::fs::write(
        &bundle_path,
        DEFAULT_BUNDLE_TOML.replace(
            "low_confidence_threshold = 0.6",
            "low_confidence_threshold = 0.7",
        ),
    )
    .expect("write the new bundle");
    let client = server.client.clone();
    revalidation_then_state_change(&server, async move {
        client.reload_policy().await.expect("reload");
    })
    .await;
    server.wait_for_purge().await;
    assert_eq!(hiking(&server, [1]).await, [ABSENT]);
}

#[test]
fn a_sweep_never_writes_back_what_a_state_change_removed() {
    run_in_child("sweep_then_state_change");
}

#[tokio::test]
// Ignored so that it runs only in the child process its parent test starts (failpoints
// are process-wide); the parent runs in every suite run.
#[ignore = "run by a_sweep_never_writes_back_what_a_state_change_removed"]
async fn sweep_then_state_change() {
    if !is_child_for("sweep_then_state_change") {
        return;
    }
    let server = TestServer::start().await;
    let client = server.client.clone();
    revalidation_then_state_change(&server, async move {
        client.sweep_expired().await.expect("sweep");
    })
    .await;
}

#[test]
fn rows_read_before_an_erasure_are_not_kept_in_the_row_cache_after_it() {
    run_in_child("read_then_erasure");
}

#[tokio::test]
// Ignored so that it runs only in the child process its parent test starts (failpoints
// are process-wide); the parent runs in every suite run.
#[ignore = "run by rows_read_before_an_erasure_are_not_kept_in_the_row_cache_after_it"]
async fn read_then_erasure() {
    if !is_child_for("read_then_erasure") {
        return;
    }
    let server = TestServer::start().await;
    server.us_adults([1]).await;
    server
        .client
        .write_features(write("before", vec![chat(1)]))
        .await
        .expect("write");
    // A read large enough for the blocking pool, stopped after it read the user's row from
    // the engine and before it keeps it in the cache.
    let pause = Pause::arm("row-cache-keep");
    let client = server.client.clone();
    let reading = tokio::spawn(async move {
        let keys: Vec<(u64, &str)> = (1..=20).map(|user| (user, "facebook_feed")).collect();
        client
            .get_features(featurestore_tests::read(&keys, &["interest_hiking"]))
            .await
    });
    pause.reached().await;
    let receipt = server.client.erase_user(1).await.expect("erase");
    assert!(receipt.verified, "{receipt:?}");
    pause.release();
    let read = reading.await.expect("the read's task").expect("read");
    assert_eq!(read.rows.len(), 20);
    // The row read before the erasure is not served after it.
    assert_eq!(hiking(&server, [1]).await, [ABSENT]);
    // Rows read after a change are kept and served.
    server.us_adults([2]).await;
    server
        .client
        .write_features(write("after", vec![chat(2)]))
        .await
        .expect("write");
    assert_eq!(hiking(&server, [2]).await, [STORED]);
    assert_eq!(hiking(&server, [2]).await, [STORED]);
}
