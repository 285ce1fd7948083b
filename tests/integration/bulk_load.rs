//! Bulk loads: the loader CLI end to end, resuming a killed load, event-time order against
//! online writes, the erasure fence and the policy on every row, aborts, malformed files.

use std::path::Path;
use std::time::Duration;

use featurestore::domain::{UserStateUpdate, Value};
use featurestore::proto::{self, LoadJobState, ReasonCode, ValueStatus};
use featurestore_client::cli::EXIT_REFUSED;
use featurestore_client::generate::{GenerateOptions, generate};
use featurestore_client::load::formats::{FileFormat, Item, open};
use featurestore_tests::{START_TIME, TestServer, at, read, row, write};

use super::{featurestore, float, status};

/// A server on `directory` that commits every job by ingesting table files, however
/// small, so that tests exercise the fast path.
pub(super) async fn start_ingesting(directory: tempfile::TempDir) -> TestServer {
    TestServer::start_with(directory, |config| config.bulk_load.ingest_rows_min = 1).await
}

/// The count on the summary line `name` of a job printout.
pub(super) fn count(output: &str, name: &str) -> u64 {
    output
        .lines()
        .find_map(|line| {
            let line = line.trim();
            let rest = line.strip_prefix(name)?;
            rest.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("no count {name:?} in:\n{output}"))
}

/// Engagement rows of stateless users on Facebook Feed: a row from Facebook is admitted,
/// a row from Instagram is refused (the accounts are not known to be linked).
fn engagement_file(
    directory: &Path,
    name: &str,
    format: FileFormat,
    users: u64,
) -> GenerateOptions {
    let options = GenerateOptions {
        path: directory.join(name),
        format,
        users,
        first_user: 1_000_000,
        seed: 42,
        source: "engagement".to_string(),
        surfaces: vec!["facebook_feed".to_string()],
        features: vec![
            "interest_hiking".to_string(),
            "interest_cooking".to_string(),
            "assistant_sessions_7d".to_string(),
        ],
        producer: "backfill@v3".to_string(),
        origin_app: None,
        now_unix_micros: START_TIME.unix_micros(),
    };
    let registry: Vec<proto::FeatureDefinition> =
        featurestore_server::registry::Registry::embedded_default().feature_definitions();
    generate(&options, &registry).expect("generate the file");
    options
}

/// The rows of a file as the loader reads them.
fn rows_of(options: &GenerateOptions) -> Vec<proto::WriteRow> {
    let registry =
        featurestore_server::registry::Registry::embedded_default().feature_definitions();
    let mut source = open(&options.path, options.format, &registry, None).expect("open");
    let mut items = Vec::new();
    while source.read(10_000, &mut items).expect("read") {}
    items
        .into_iter()
        .map(|item| match item {
            Item::Row { row, .. } => row,
            Item::Bad { line, problem } => panic!("line {line}: {problem}"),
        })
        .collect()
}

fn from_facebook(row: &proto::WriteRow) -> bool {
    row.provenance
        .as_ref()
        .is_some_and(|provenance| provenance.origin_app == "facebook")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_rows_load_through_the_cli_and_a_killed_load_resumes_exactly() {
    const USERS: u64 = 100_000;
    let server = TestServer::start().await;
    let directory = tempfile::tempdir().expect("temporary directory");
    let file = engagement_file(
        directory.path(),
        "backfill.parquet",
        FileFormat::Parquet,
        USERS,
    );
    let rows = rows_of(&file);
    let admitted = rows.iter().filter(|row| from_facebook(row)).count() as u64;
    assert!(
        admitted > USERS / 3 && admitted < USERS * 2 / 3,
        "a mix of both apps"
    );
    let path = file.path.to_str().expect("UTF-8 path").to_string();

    // Killed once a few chunks are durable.
    let load = [
        "load",
        path.as_str(),
        "--job",
        "backfill-1",
        "--chunk-rows",
        "2000",
        "--quiet",
    ];
    let mut durable = 0;
    let chunks_durable = async {
        let mut ticks = featurestore_tests::poll_every(Duration::from_millis(10));
        loop {
            if let Ok(job) = server.client.load_job("backfill-1").await {
                durable = job.last_durable_chunk;
                if durable >= 5 {
                    return;
                }
            }
            ticks.tick().await;
        }
    };
    tokio::select! {
        finished = featurestore(&server, &load) => {
            panic!("the load ended before it was killed: {finished:?}")
        }
        () = chunks_durable => {}
    }
    // The load's future was dropped mid-stream, as a killed client leaves it.
    assert!(durable >= 5, "chunks became durable before the kill");
    let job = server.client.load_job("backfill-1").await.expect("job");
    assert_eq!(
        job.state(),
        LoadJobState::Open,
        "a killed load leaves its job open"
    );

    let (code, output) = featurestore(&server, &load).await.expect("resumed load");
    assert!(output.contains("resumed after chunk"), "{output}");
    assert_eq!(
        code, EXIT_REFUSED,
        "rows from Instagram were refused:\n{output}"
    );
    assert_eq!(
        count(&output, "rows received"),
        USERS,
        "every row counted once:\n{output}"
    );
    assert_eq!(count(&output, "accepted"), admitted, "{output}");
    assert_eq!(count(&output, "denied"), USERS - admitted, "{output}");
    assert_eq!(count(&output, "transformed"), 0, "{output}");
    assert_eq!(count(&output, "invalid"), 0, "{output}");
    assert_eq!(count(&output, "values admitted"), admitted * 3, "{output}");
    assert!(
        output.contains(&format!(
            "CROSS_APP_NOT_LINKED  {}  {}",
            USERS - admitted,
            (USERS - admitted) * 3
        )) || output
            .lines()
            .any(|line| line.split_whitespace().collect::<Vec<_>>()
                == [
                    "CROSS_APP_NOT_LINKED",
                    &(USERS - admitted).to_string(),
                    &((USERS - admitted) * 3).to_string()
                ]),
        "{output}"
    );
    let job = server.client.load_job("backfill-1").await.expect("job");
    assert_eq!(job.state(), LoadJobState::Committed);
    assert!(
        job.files_ingested >= 1,
        "a job this size is ingested as table files"
    );

    // A sample read back: the file's values where admitted, nothing where refused.
    let sample: Vec<&proto::WriteRow> = rows.iter().step_by(997).collect();
    let keys: Vec<(u64, &str)> = sample
        .iter()
        .map(|row| (row.user_id, "facebook_feed"))
        .collect();
    let response = server
        .client
        .get_features(read(&keys, &["interest_hiking", "assistant_sessions_7d"]))
        .await
        .expect("read");
    for (index, row) in sample.iter().enumerate() {
        if from_facebook(row) {
            assert_eq!(
                status(&response, index, "interest_hiking"),
                ValueStatus::Present
            );
            let Some(proto::feature_value::Value::FloatValue(expected)) = row.features[0].value
            else {
                panic!("interest_hiking is a float");
            };
            assert_eq!(float(&response, index, "interest_hiking"), expected);
        } else {
            assert_eq!(
                status(&response, index, "interest_hiking"),
                ValueStatus::Defaulted,
                "refused rows left nothing"
            );
        }
    }

    // Re-running a committed job sends nothing and changes nothing.
    let (_, again) = featurestore(&server, &load).await.expect("re-run");
    assert!(again.contains("already committed"), "{again}");
    assert_eq!(count(&again, "rows received"), USERS);

    // The same file loaded without interruption into another server gives the same summary.
    let other = TestServer::start().await;
    let (_, uninterrupted) = featurestore(&other, &load)
        .await
        .expect("uninterrupted load");
    let summary = |output: &str| -> Vec<u64> {
        [
            "rows received",
            "accepted",
            "transformed",
            "denied",
            "invalid",
            "values admitted",
            "values refused",
        ]
        .iter()
        .map(|name| count(output, name))
        .collect()
    };
    assert_eq!(summary(&output), summary(&uninterrupted));
}

/// Sends one chunk of `rows` through a new stream attached to `job`.
pub(super) async fn stage(
    server: &TestServer,
    job: &str,
    sequence: u64,
    rows: Vec<featurestore::domain::WriteRow>,
) -> proto::ChunkAck {
    let mut session = server.client.start_load(job, "").await.expect("attach");
    session
        .send_chunk(
            sequence,
            rows.into_iter().map(proto::WriteRow::from).collect(),
        )
        .await
        .expect("send");
    session.next_ack().await.expect("acknowledged")
}

pub(super) async fn commit(server: &TestServer, job: &str) -> proto::LoadJob {
    let session = server.client.start_load(job, "").await.expect("attach");
    session.commit().await.expect("commit")
}

pub(super) fn hiking(
    user_id: u64,
    surfaces: &[&str],
    seconds: i64,
    value: f32,
) -> featurestore::domain::WriteRow {
    row(
        user_id,
        surfaces,
        at(seconds),
        vec![("interest_hiking", Value::Float(value))],
    )
}

pub(super) fn reason(summary: &proto::LoadSummary, reason: ReasonCode) -> (u64, u64) {
    summary
        .reasons
        .iter()
        .find(|count| count.reason == reason as i32)
        .map_or((0, 0), |count| (count.rows, count.values))
}

#[tokio::test]
async fn event_time_order_holds_against_online_writes_during_a_job_on_both_commit_paths() {
    for ingest_rows_min in [1, 1_000_000] {
        let server = TestServer::start_with(tempfile::tempdir().expect("directory"), |config| {
            config.bulk_load.ingest_rows_min = ingest_rows_min;
        })
        .await;
        server.us_adults([1, 2]).await;
        let ack = stage(
            &server,
            "job",
            1,
            vec![
                hiking(1, &["facebook_feed"], 100, 0.1),
                hiking(2, &["facebook_feed"], 100, 0.2),
            ],
        )
        .await;
        assert_eq!(ack.summary.expect("summary").rows_accepted, 2);
        // While the job is open: a newer value for user 1, an older one for user 2.
        server
            .client
            .write_features(write(
                "online-1",
                vec![hiking(1, &["facebook_feed"], 200, 0.9)],
            ))
            .await
            .expect("online write");
        server
            .client
            .write_features(write(
                "online-2",
                vec![hiking(2, &["facebook_feed"], 50, 0.5)],
            ))
            .await
            .expect("online write");
        let before = server
            .client
            .get_features(read(
                &[(1, "facebook_feed"), (2, "facebook_feed")],
                &["interest_hiking"],
            ))
            .await
            .expect("read");
        assert_eq!(
            float(&before, 1, "interest_hiking"),
            0.5,
            "nothing of an open job is served"
        );

        let job = commit(&server, "job").await;
        assert_eq!(job.state(), LoadJobState::Committed);
        assert_eq!(job.files_ingested > 0, ingest_rows_min == 1);
        let after = server
            .client
            .get_features(read(
                &[(1, "facebook_feed"), (2, "facebook_feed")],
                &["interest_hiking"],
            ))
            .await
            .expect("read");
        assert_eq!(
            float(&after, 0, "interest_hiking"),
            0.9,
            "the newer online value survives the commit (ingest_rows_min {ingest_rows_min})"
        );
        assert_eq!(
            float(&after, 1, "interest_hiking"),
            0.2,
            "the backfill's newer value replaces the older online one (ingest_rows_min {ingest_rows_min})"
        );
    }
}

#[tokio::test]
async fn erased_users_and_forbidden_values_are_refused_and_counted_by_reason() {
    let server = start_ingesting(tempfile::tempdir().expect("directory")).await;
    // 1: erased before the load; 2: objects to ads; 3: erased after its chunk was staged;
    // 4: its state changes after its chunk was staged; 5: nothing happens to it.
    server.us_adults(1..=5).await;
    server.client.erase_user(1).await.expect("erase");
    server
        .client
        .set_user_state(UserStateUpdate {
            user_id: 2,
            jurisdiction: "US".to_string(),
            age_band: featurestore::domain::AgeBand::Adult,
            linked_apps: vec!["facebook".to_string(), "instagram".to_string()],
            ads_objection: true,
            expected_generation: None,
        })
        .await
        .expect("objection");
    let mut objector = hiking(2, &["facebook_feed", "facebook_ads"], 100, 0.2);
    objector.user_state_generation = 2;
    let ack = stage(
        &server,
        "job",
        1,
        vec![
            hiking(1, &["facebook_feed"], 100, 0.1),
            objector,
            hiking(3, &["facebook_feed"], 100, 0.3),
            hiking(4, &["facebook_feed"], 100, 0.4),
            hiking(5, &["facebook_feed", "facebook_ads"], 100, 0.5),
        ],
    )
    .await;
    let summary = ack.summary.expect("summary");
    assert_eq!(summary.rows_received, 5);
    assert_eq!(summary.rows_denied, 1, "the erased user's row");
    assert_eq!(
        summary.rows_transformed, 1,
        "the objector's row: feed yes, ads no"
    );
    assert_eq!(summary.rows_accepted, 3);
    assert_eq!(reason(&summary, ReasonCode::UserErased), (1, 1));
    assert_eq!(reason(&summary, ReasonCode::AdsObjection), (1, 1));

    server
        .client
        .erase_user(3)
        .await
        .expect("erase after staging");
    server
        .client
        .set_user_state(UserStateUpdate {
            user_id: 4,
            jurisdiction: "DE".to_string(),
            age_band: featurestore::domain::AgeBand::Adult,
            linked_apps: Vec::new(),
            ads_objection: false,
            expected_generation: None,
        })
        .await
        .expect("moved");
    let job = commit(&server, "job").await;
    let summary = job.summary.expect("summary");
    assert_eq!(summary.rows_received, 5);
    assert_eq!(
        summary.rows_accepted, 1,
        "only user 5's row is applied whole"
    );
    assert_eq!(summary.rows_transformed, 1);
    assert_eq!(summary.rows_denied, 3);
    assert_eq!(
        reason(&summary, ReasonCode::UserErased),
        (2, 2),
        "users 1 and 3"
    );
    assert_eq!(
        reason(&summary, ReasonCode::StaleGeneration),
        (1, 1),
        "user 4"
    );

    let keys = [
        (1, "facebook_feed"),
        (2, "facebook_feed"),
        (2, "facebook_ads"),
        (3, "facebook_feed"),
        (4, "facebook_feed"),
        (5, "facebook_ads"),
    ];
    let response = server
        .client
        .get_features(read(&keys, &["interest_hiking"]))
        .await
        .expect("read");
    let statuses: Vec<ValueStatus> = (0..keys.len())
        .map(|row| status(&response, row, "interest_hiking"))
        .collect();
    assert_eq!(
        statuses,
        vec![
            ValueStatus::Defaulted,
            ValueStatus::Present,
            ValueStatus::Defaulted,
            ValueStatus::Defaulted,
            ValueStatus::Defaulted,
            ValueStatus::Present,
        ]
    );
    let erasure = server
        .client
        .erase_user(5)
        .await
        .expect("erase a loaded user");
    assert!(erasure.verified, "ingested rows are erased like any other");
}
