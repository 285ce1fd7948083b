//! The write fence under fire: a write of 500 rows (one per US adult, AI-derived values for
//! the Facebook feed: an interest and a map of fifty conversation topics, each row stating
//! the user's current generation) raced, again and
//! again, against a change of one of those users' state: moved to Germany (where AI-derived
//! signals are excluded), or erased. The change is timed to take effect at a random point
//! of the write's usual duration, so it falls before, during or after the write's decision
//! and its application. After each race the victim's cell is read: a value served for a user in
//! Germany, or for an erased user, is a forbidden value; an erasure must end verified, its
//! user's state "erased", nothing of the user left.
//!
//! Run with `cargo bench -p featurestore-tests --bench privacy_races`; `PRIVACY_RACES` sets
//! the races per mode (default 1,000). Prints a table.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use featurestore::domain::{UserStateUpdate, Value};
use featurestore::proto::{ErasureState, ValueStatus};
use featurestore_client::ClientError;
use featurestore_tests::workload::Random;
use featurestore_tests::{TestServer, at, read, row, us_adult, write};
use tonic::Code;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROWS: u64 = 500;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    StateChange,
    Erasure,
}

#[derive(Default)]
struct Outcome {
    races: u64,
    /// The change and the write were in flight at the same time.
    overlapped: u64,
    writes_applied: u64,
    writes_refused: u64,
    forbidden_values: u64,
    erasures_pending_or_with_data: u64,
}

async fn run(server: &TestServer, mode: Mode, races: u64, first_user: u64) -> Outcome {
    let client = &server.client;
    // Users first_user.. are the writes' other rows; the victims come after them, one per
    // race when they are erased.
    let victims = match mode {
        Mode::StateChange => 1,
        Mode::Erasure => races,
    };
    let mut generations: HashMap<u64, u64> = HashMap::new();
    for user_id in first_user..first_user + ROWS - 1 + victims {
        let state = client
            .set_user_state(us_adult(user_id))
            .await
            .expect("set the state");
        generations.insert(user_id, state.generation);
    }
    let mut random = Random(7);
    // What a conversation-topics pipeline sends beside the interest: fifty weighted topics.
    let topics = Value::Sparse(
        (0..50)
            .map(|topic| (format!("outdoors/topic_{topic}"), 0.02))
            .collect(),
    );
    let mut outcome = Outcome::default();
    let mut write_duration = Duration::from_millis(5);
    let mut change_duration = Duration::from_millis(1);
    for race in 0..races {
        let victim = first_user + ROWS - 1 + race % victims;
        let users: Vec<u64> = (first_user..first_user + ROWS - 1)
            .chain(std::iter::once(victim))
            .collect();
        // Each race writes a new interaction, so that what it stored is told apart.
        let interaction = at(-3600 + race as i64);
        let rows = users
            .iter()
            .map(|&user_id| {
                let mut row = row(
                    user_id,
                    &["facebook_feed"],
                    interaction,
                    vec![
                        ("interest_hiking", Value::Float(0.5)),
                        ("conversation_topics", topics.clone()),
                    ],
                );
                row.user_state_generation = generations[&user_id];
                row
            })
            .collect();
        // The change takes effect when its call ends: aim that at a random point of the
        // write's usual duration.
        let delay = Duration::from_micros(
            random.below(
                u64::try_from(write_duration.as_micros())
                    .unwrap_or(1)
                    .max(1),
            ),
        )
        .saturating_sub(change_duration);
        let writer = client.clone();
        let key = format!("race-{}-{race}", mode as u8);
        let started = Instant::now();
        let writing = tokio::spawn(async move {
            let answer = writer.write_features(write(&key, rows)).await;
            (answer, Instant::now())
        });
        tokio::time::sleep(delay).await;
        let change_started = Instant::now();
        let receipt = match mode {
            Mode::StateChange => {
                let moved = UserStateUpdate {
                    jurisdiction: "DE".to_string(),
                    ..us_adult(victim)
                };
                let state = client.set_user_state(moved).await.expect("move");
                generations.insert(victim, state.generation);
                None
            }
            Mode::Erasure => Some(client.erase_user(victim).await.expect("erase")),
        };
        let changed = Instant::now();
        change_duration = changed - change_started;
        let (answer, written) = writing.await.expect("the write's task");
        outcome.races += 1;
        if change_started < written && started < changed {
            outcome.overlapped += 1;
        }
        match answer {
            Ok(_) => {
                outcome.writes_applied += 1;
                write_duration = written - started;
            }
            Err(error) if refused(&error) => outcome.writes_refused += 1,
            Err(error) => panic!("write: {error}"),
        }
        let response = client
            .get_features(read(&[(victim, "facebook_feed")], &["interest_hiking"]))
            .await
            .expect("read");
        let present =
            response.rows[0].statuses.first().copied() == Some(ValueStatus::Present as i32);
        // In Germany, or erased: any AI-derived value served is forbidden.
        if present {
            outcome.forbidden_values += 1;
        }
        match (mode, receipt) {
            (Mode::StateChange, _) => {
                // Back to the US for the next race.
                let state = client
                    .set_user_state(us_adult(victim))
                    .await
                    .expect("move back");
                generations.insert(victim, state.generation);
            }
            (Mode::Erasure, Some(receipt)) => {
                let receipt = client
                    .erasure_status(&receipt.receipt_id)
                    .await
                    .expect("receipt");
                let state = client.get_user_state(victim).await.expect("state");
                if !receipt.verified
                    || state.erasure_state != ErasureState::Erased as i32
                    || present
                {
                    outcome.erasures_pending_or_with_data += 1;
                }
            }
            (Mode::Erasure, None) => unreachable!("an erasure answers with a receipt"),
        }
    }
    outcome
}

fn refused(error: &ClientError) -> bool {
    matches!(error.code(), Code::FailedPrecondition | Code::Aborted)
}

fn main() {
    let races: u64 = std::env::var("PRIVACY_RACES")
        .ok()
        .and_then(|races| races.parse().ok())
        .unwrap_or(1000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let server = TestServer::start().await;
        println!("| mode | races | change and write in flight together | writes applied | writes refused whole | forbidden values served | erasures pending or with data |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        let mut first_user = 1;
        for (mode, name) in [
            (Mode::StateChange, "state change (moved to DE)"),
            (Mode::Erasure, "erasure"),
        ] {
            let started = Instant::now();
            let outcome = run(&server, mode, races, first_user).await;
            first_user += 10 * ROWS + races;
            println!(
                "| {name} | {} | {} | {} | {} | {} | {} |",
                outcome.races,
                outcome.overlapped,
                outcome.writes_applied,
                outcome.writes_refused,
                outcome.forbidden_values,
                if mode == Mode::Erasure {
                    outcome.erasures_pending_or_with_data.to_string()
                } else {
                    "-".to_string()
                },
            );
            eprintln!("{name}: {:.1} s", started.elapsed().as_secs_f64());
        }
        server.stop().await;
    });
}
