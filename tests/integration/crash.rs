//! Crash durability: a server process with `durability = "sync"` is killed with SIGKILL at
//! random moments while writers run against it, restarted on the same directory, and
//! checked: every write it acknowledged is there, and no write is there in part.
//!
//! The server runs in a child process: this test binary again, running the ignored test
//! [`serve_until_killed`] with the directory in its environment.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use featurestore::domain::{Timestamp, Value};
use featurestore_client::{Client, ClientOptions};
use featurestore_tests::{ChildServer, read, row, write};

/// Kill-and-restart rounds in one run.
const ROUNDS: u64 = 20;
/// Writers running at once; each owns [`USERS_PER_WRITER`] users.
const WRITERS: u64 = 4;
/// Users every write of one writer sets, all in the one write.
const USERS_PER_WRITER: u64 = 3;
const FEATURES: [&str; 2] = ["interest_hiking", "interest_cooking"];

const DIRECTORY_VARIABLE: &str = "FEATURESTORE_CRASH_TEST_DIR";

/// Not a test of its own: the server process of [`acknowledged_writes_survive_kill_9`],
/// which runs it with [`DIRECTORY_VARIABLE`] set. Without it, it returns at once.
#[test]
// Ignored so that it runs only as the child process its parent test starts (with
// `--ignored --exact`); the parent runs in every suite run.
#[ignore = "the server process of acknowledged_writes_survive_kill_9"]
fn serve_until_killed() {
    let Some(directory) = std::env::var_os(DIRECTORY_VARIABLE).map(PathBuf::from) else {
        return;
    };
    let mut config = featurestore_tests::child_config(&directory);
    config.durability = featurestore_server::config::Durability::Sync;
    featurestore_tests::serve_in_child(&directory, config);
}

/// A server process on `directory`, logging to `server-<round>.log` there.
fn start_server(directory: &Path, round: u64) -> ChildServer {
    let log = std::fs::File::create(directory.join(format!("server-{round}.log")))
        .expect("create the log");
    ChildServer::start(
        "crash::serve_until_killed",
        DIRECTORY_VARIABLE,
        directory,
        log,
        &[],
    )
}

fn user(writer: u64, index: u64) -> u64 {
    1 + writer * USERS_PER_WRITER + index
}

/// Write `sequence` of `writer`: every feature of each of its users set to `sequence`, at
/// an interaction time that grows with it, so that a later write supersedes an earlier.
fn nth_write(writer: u64, sequence: u64, base: Timestamp) -> featurestore::domain::WriteRequest {
    let time = Timestamp::from_unix_micros(base.unix_micros() + sequence as i64);
    let rows = (0..USERS_PER_WRITER)
        .map(|index| {
            row(
                user(writer, index),
                &["facebook_feed"],
                time,
                FEATURES
                    .iter()
                    .map(|feature| (*feature, Value::Float(sequence as f32)))
                    .collect(),
            )
        })
        .collect();
    write(&format!("writer-{writer}-{sequence}"), rows)
}

/// The sequence every value of `writer`'s users holds: they must all agree (a write is
/// applied whole or not at all). None when nothing was stored yet.
async fn stored_sequence(client: &Client, writer: u64) -> Option<u64> {
    let keys: Vec<(u64, &str)> = (0..USERS_PER_WRITER)
        .map(|index| (user(writer, index), "facebook_feed"))
        .collect();
    let response = client
        .get_features(read(&keys, &FEATURES))
        .await
        .expect("read after the restart");
    let mut seen = Vec::new();
    for (index, _) in keys.iter().enumerate() {
        for feature in FEATURES {
            seen.push(match super::status(&response, index, feature) {
                featurestore::proto::ValueStatus::Present => {
                    Some(super::float(&response, index, feature) as u64)
                }
                _ => None,
            });
        }
    }
    assert!(
        seen.windows(2).all(|pair| pair[0] == pair[1]),
        "writer {writer}: a write was applied in part: {seen:?}"
    );
    seen[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let directory = tempfile::tempdir().expect("directory");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as u64;
    println!("crash test seed {seed}");
    let mut random = featurestore_tests::workload::Random(seed);
    // Interaction times a minute ago: the server runs on the system clock.
    let base = Timestamp::from_unix_micros(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_micros() as i64
            - 60_000_000,
    );
    // Per writer: the last sequence acknowledged, and the next to send.
    let acknowledged: Arc<Vec<AtomicU64>> =
        Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let mut next_sequence = 1;
    let mut acknowledged_total = 0;
    let mut killed_early = 0;
    let mut killed_starting = 0;
    // No stored value may be from a write never sent.
    let mut sent_max = 0;
    for round in 0..ROUNDS {
        if round % 4 == 3 {
            // Killed while it opens and recovers the database.
            let starting = start_server(directory.path(), round + 1000);
            featurestore_tests::pause(Duration::from_millis(random.below(60))).await;
            starting.kill();
            killed_starting += 1;
        }
        let mut server = start_server(directory.path(), round);
        let Some(endpoint) = server.endpoint(directory.path()).await else {
            panic!(
                "round {round}: the server exited while starting; see {}",
                directory
                    .path()
                    .join(format!("server-{round}.log"))
                    .display()
            );
        };
        let client = Client::connect(
            &endpoint,
            ClientOptions {
                retries: 0,
                ..ClientOptions::default()
            },
        )
        .expect("endpoint");
        // What the last process acknowledged is all there, and nothing is there in part.
        for writer in 0..WRITERS {
            let stored = stored_sequence(&client, writer).await.unwrap_or(0);
            let acked = acknowledged[writer as usize].load(Ordering::SeqCst);
            assert!(
                stored >= acked,
                "round {round}, writer {writer}: write {acked} was acknowledged, but the store holds {stored} (seed {seed})"
            );
            assert!(
                stored <= sent_max,
                "round {round}, writer {writer}: {stored} was never sent"
            );
        }
        let audit = client
            .verify_audit_log()
            .await
            .expect("verify the audit log");
        assert!(
            audit.intact,
            "round {round}: the audit chain is broken: {audit:?}"
        );
        if round == 0 {
            for writer in 0..WRITERS {
                for index in 0..USERS_PER_WRITER {
                    client
                        .set_user_state(featurestore_tests::us_adult(user(writer, index)))
                        .await
                        .expect("set the user state");
                }
            }
        }
        // Writers run until the kill; the kill comes at a random moment.
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let client = client.clone();
                let acknowledged = Arc::clone(&acknowledged);
                let first = next_sequence;
                tokio::spawn(async move {
                    let mut sequence = first;
                    loop {
                        match client
                            .write_features(nth_write(writer, sequence, base))
                            .await
                        {
                            Ok(_) => {
                                acknowledged[writer as usize].store(sequence, Ordering::SeqCst);
                                sequence += 1;
                            }
                            // The server was killed; `sequence` may or may not be stored.
                            Err(_) => return sequence,
                        }
                    }
                })
            })
            .collect();
        let delay = Duration::from_millis(20 + random.below(400));
        featurestore_tests::pause(delay).await;
        server.kill();
        let mut written = 0;
        let first = next_sequence;
        for writer in writers {
            let last_sent = writer.await.expect("writer task");
            written += last_sent - first;
            // Sequences of later rounds are larger, so that their writes supersede.
            next_sequence = next_sequence.max(last_sent + 1);
        }
        if written == 0 {
            killed_early += 1;
        }
        acknowledged_total += written;
        sent_max = next_sequence - 1;
    }
    // A last start checks the last round.
    let mut server = start_server(directory.path(), ROUNDS);
    let endpoint = server
        .endpoint(directory.path())
        .await
        .expect("the server starts after the last kill");
    let client = Client::connect(&endpoint, ClientOptions::default()).expect("endpoint");
    for writer in 0..WRITERS {
        let stored = stored_sequence(&client, writer).await.unwrap_or(0);
        let acked = acknowledged[writer as usize].load(Ordering::SeqCst);
        assert!(
            stored >= acked,
            "writer {writer}: acknowledged {acked}, stored {stored}"
        );
    }
    server.kill();
    println!(
        "{ROUNDS} kills while writing and {killed_starting} while starting: {acknowledged_total} writes acknowledged, all present; {killed_early} rounds killed before any write"
    );
    assert!(
        acknowledged_total > ROUNDS,
        "the writers got too few writes through to test anything: {acknowledged_total}"
    );
}
