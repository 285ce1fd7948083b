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
use tonic::Code;

use super::{featurestore, float, status};

/// A server on `directory` that commits every job by ingesting table files, however
/// small, so that tests exercise the fast path.
async fn start_ingesting(directory: tempfile::TempDir) -> TestServer {
    TestServer::start_with(directory, |config| config.bulk_load.ingest_rows_min = 1).await
}

/// The count on the summary line `name` of a job printout.
fn count(output: &str, name: &str) -> u64 {
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
        loop {
            if let Ok(job) = server.client.load_job("backfill-1").await {
                durable = job.last_durable_chunk;
                if durable >= 5 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
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
async fn stage(
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

async fn commit(server: &TestServer, job: &str) -> proto::LoadJob {
    let session = server.client.start_load(job, "").await.expect("attach");
    session.commit().await.expect("commit")
}

fn hiking(
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

fn reason(summary: &proto::LoadSummary, reason: ReasonCode) -> (u64, u64) {
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

#[tokio::test]
async fn an_aborted_job_leaves_nothing_and_takes_no_more_chunks() {
    let server = TestServer::start().await;
    server.us_adults([7]).await;
    stage(
        &server,
        "doomed",
        1,
        vec![hiking(7, &["facebook_feed"], 100, 0.7)],
    )
    .await;
    let staging = server.config.bulk_load.staging_dir.join("doomed");
    assert!(staging.exists(), "the chunk is staged");

    let job = server.client.abort_load("doomed").await.expect("abort");
    assert_eq!(job.state(), LoadJobState::Aborted);
    assert!(!staging.exists(), "the staged rows are deleted");
    let response = server
        .client
        .get_features(read(&[(7, "facebook_feed")], &["interest_hiking"]))
        .await
        .expect("read");
    assert_eq!(
        status(&response, 0, "interest_hiking"),
        ValueStatus::Defaulted
    );

    let mut session = server
        .client
        .start_load("doomed", "")
        .await
        .expect("attach");
    assert_eq!(session.job.state(), LoadJobState::Aborted);
    session
        .send_chunk(
            2,
            vec![proto::WriteRow::from(hiking(
                7,
                &["facebook_feed"],
                100,
                0.7,
            ))],
        )
        .await
        .expect("queued");
    let error = session
        .next_ack()
        .await
        .expect_err("an aborted job takes no chunk");
    assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
    let session = server
        .client
        .start_load("doomed", "")
        .await
        .expect("attach");
    let error = session.commit().await.expect_err("nor a commit");
    assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
}

#[tokio::test]
async fn chunks_are_idempotent_in_order_and_survive_a_restart() {
    let server = TestServer::start().await;
    server.us_adults([1, 2]).await;
    let mut session = server
        .client
        .start_load("job", "file-a")
        .await
        .expect("attach");
    assert_eq!(session.job.last_durable_chunk, 0);
    session
        .send_chunk(
            1,
            vec![proto::WriteRow::from(hiking(
                1,
                &["facebook_feed"],
                100,
                0.1,
            ))],
        )
        .await
        .expect("send");
    assert!(!session.next_ack().await.expect("ack").duplicate);
    session
        .send_chunk(
            3,
            vec![proto::WriteRow::from(hiking(
                2,
                &["facebook_feed"],
                100,
                0.2,
            ))],
        )
        .await
        .expect("queued");
    let error = session.next_ack().await.expect_err("a gap is refused");
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(error.to_string().contains("next is 2"), "{error}");

    let error = server
        .client
        .start_load("job", "file-b")
        .await
        .expect_err("a resume from another input is refused");
    assert_eq!(error.code(), Code::FailedPrecondition);

    let directory = server.stop().await;
    let server = start_ingesting(directory).await;
    let mut session = server
        .client
        .start_load("job", "file-a")
        .await
        .expect("attach");
    assert_eq!(
        session.job.last_durable_chunk, 1,
        "the job outlives a restart"
    );
    session
        .send_chunk(
            1,
            vec![proto::WriteRow::from(hiking(
                1,
                &["facebook_feed"],
                100,
                0.1,
            ))],
        )
        .await
        .expect("send");
    let ack = session.next_ack().await.expect("ack");
    assert!(ack.duplicate, "a durable chunk sent again is a no-op");
    session
        .send_chunk(
            2,
            vec![proto::WriteRow::from(hiking(
                2,
                &["facebook_feed"],
                100,
                0.2,
            ))],
        )
        .await
        .expect("send");
    session.next_ack().await.expect("ack");
    let job = session.commit().await.expect("commit");
    let summary = job.summary.expect("summary");
    assert_eq!(summary.rows_received, 2, "the duplicate is not counted");
    assert_eq!(summary.rows_accepted, 2);

    let jobs = server.client.load_jobs(10).await.expect("list");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].state(), LoadJobState::Committed);
}

#[tokio::test]
async fn malformed_records_are_reported_by_line_and_counted() {
    let server = TestServer::start().await;
    let directory = tempfile::tempdir().expect("temporary directory");
    let csv = directory.path().join("rows.csv");
    let time = START_TIME.unix_micros() - 1_000_000;
    std::fs::write(
        &csv,
        format!(
            "user_id,surfaces,source,origin_app,interaction_time_unix_micros,interest_hiking\n\
             11,facebook_feed,engagement,facebook,{time},0.5\n\
             12,facebook_feed,engagement,facebook,{time},very\n\
             13,facebook_feed,engagement,facebook,{time},0.25\n\
             0,facebook_feed,engagement,facebook,{time},0.75\n"
        ),
    )
    .expect("write the file");
    let path = csv.to_str().expect("UTF-8 path");
    let (code, output) = featurestore(
        &server,
        &[
            "load",
            path,
            "--job",
            "csv",
            "--producer",
            "backfill@v1",
            "--quiet",
        ],
    )
    .await
    .expect("load");
    assert_eq!(code, EXIT_REFUSED, "{output}");
    assert!(output.contains("1 malformed lines, not sent"), "{output}");
    assert!(
        output.contains("line 3: interest_hiking: expected a number, found \"very\""),
        "the loader names the line and the problem:\n{output}"
    );
    assert!(
        output.contains("line 5: user_id: must not be 0"),
        "rows the server finds malformed are mapped to their line:\n{output}"
    );
    assert_eq!(count(&output, "rows received"), 3, "{output}");
    assert_eq!(count(&output, "accepted"), 2, "{output}");
    assert_eq!(count(&output, "invalid"), 1, "{output}");

    let error = featurestore(
        &server,
        &[
            "load",
            path,
            "--job",
            "csv-strict",
            "--producer",
            "backfill@v1",
            "--strict",
            "--quiet",
        ],
    )
    .await
    .expect_err("--strict stops at the first malformed record");
    assert!(error.to_string().contains("line 3"), "{error}");

    let jsonl = directory.path().join("rows.jsonl");
    std::fs::write(
        &jsonl,
        format!(
            "{{\"user_id\": 21, \"surfaces\": [\"facebook_feed\"], \"source\": \"engagement\", \"origin_app\": \"facebook\", \"interaction_time_unix_micros\": {time}, \"producer_id\": \"p@1\", \"interest_hiking\": 0.5}}\n\
             {{\"user_id\": 22, \"surfaces\": [\"facebook_feed\"]\n\
             {{\"user_id\": 23, \"colour\": \"blue\"}}\n"
        ),
    )
    .expect("write the file");
    let (_, output) = featurestore(
        &server,
        &[
            "load",
            jsonl.to_str().expect("UTF-8"),
            "--job",
            "jsonl",
            "--quiet",
        ],
    )
    .await
    .expect("load");
    assert!(output.contains("2 malformed lines"), "{output}");
    assert!(output.contains("line 2: not JSON"), "{output}");
    assert!(output.contains("line 3: \"colour\" is neither"), "{output}");

    let unknown = directory.path().join("unknown.csv");
    std::fs::write(
        &unknown,
        "user_id,surfaces,interest_kayaking\n1,facebook_feed,0.5\n",
    )
    .expect("write the file");
    let error = featurestore(
        &server,
        &[
            "load",
            unknown.to_str().expect("UTF-8"),
            "--job",
            "unknown",
            "--quiet",
        ],
    )
    .await
    .expect_err("an unknown column stops the load before anything is sent");
    assert!(
        format!("{error:#}").contains("interest_kayaking"),
        "{error:#}"
    );
    let error = server
        .client
        .load_job("unknown")
        .await
        .expect_err("no job was created");
    assert_eq!(error.code(), Code::NotFound);
}

#[tokio::test]
async fn a_commit_a_crash_interrupted_is_finished_at_the_next_start() {
    let server = start_ingesting(tempfile::tempdir().expect("directory")).await;
    server.us_adults([1]).await;
    stage(
        &server,
        "job",
        1,
        vec![hiking(1, &["facebook_feed"], 100, 0.1)],
    )
    .await;
    let staging = server.config.bulk_load.staging_dir.join("job");
    let directory = server.stop().await;
    // What a crash after the commit started and before it ended leaves behind.
    {
        let db = featurestore_tests::open_database_directly(&directory);
        let meta = db.cf_handle("meta").expect("the meta column family");
        let key = b"load-job/job";
        let mut record: serde_json::Value =
            serde_json::from_slice(&db.get_cf(meta, key).expect("read").expect("the job record"))
                .expect("a JSON record");
        assert_eq!(record["state"], "open");
        record["state"] = "committing".into();
        db.put_cf(meta, key, serde_json::to_vec(&record).expect("JSON"))
            .expect("write");
    }
    let server = start_ingesting(directory).await;
    let job = server.client.load_job("job").await.expect("job");
    assert_eq!(
        job.state(),
        LoadJobState::Committed,
        "the start finished the commit"
    );
    assert_eq!(job.files_ingested, 1);
    assert!(!staging.exists(), "the staging is cleaned up");
    let response = server
        .client
        .get_features(read(&[(1, "facebook_feed")], &["interest_hiking"]))
        .await
        .expect("read");
    assert_eq!(float(&response, 0, "interest_hiking"), 0.1);
}

#[tokio::test]
async fn erasing_a_user_deletes_their_rows_staged_by_open_jobs() {
    const ERASED: u64 = 0x5eed_c0ff_ee15_900d;
    const KEPT: u64 = 0x5eed_c0ff_ee15_900e;
    let server = start_ingesting(tempfile::tempdir().expect("directory")).await;
    server.us_adults([ERASED, KEPT]).await;
    stage(
        &server,
        "open-job",
        1,
        vec![
            hiking(ERASED, &["facebook_feed"], 100, 0.1),
            hiking(KEPT, &["facebook_feed"], 100, 0.2),
        ],
    )
    .await;
    let staging = server.config.bulk_load.staging_dir.join("open-job");
    assert!(
        !featurestore_tests::files_containing(&staging, &ERASED.to_be_bytes()).is_empty(),
        "the user's row is staged"
    );

    let receipt = server.client.erase_user(ERASED).await.expect("erase");
    assert!(receipt.verified);
    assert!(
        featurestore_tests::files_containing(&staging, &ERASED.to_be_bytes()).is_empty(),
        "no staged copy of the erased user is left"
    );
    assert!(
        !featurestore_tests::files_containing(&staging, &KEPT.to_be_bytes()).is_empty(),
        "other users' staged rows stay"
    );

    let job = commit(&server, "open-job").await;
    let summary = job.summary.expect("summary");
    assert_eq!(summary.rows_accepted, 1);
    assert_eq!(reason(&summary, ReasonCode::UserErased), (1, 1));
    let response = server
        .client
        .get_features(read(
            &[(ERASED, "facebook_feed"), (KEPT, "facebook_feed")],
            &["interest_hiking"],
        ))
        .await
        .expect("read");
    assert_eq!(
        status(&response, 0, "interest_hiking"),
        ValueStatus::Defaulted
    );
    assert_eq!(float(&response, 1, "interest_hiking"), 0.2);
}

#[tokio::test]
async fn a_damaged_staging_file_fails_the_commit_and_applies_nothing() {
    let server = start_ingesting(tempfile::tempdir().expect("directory")).await;
    server.us_adults([1, 2]).await;
    stage(
        &server,
        "job",
        1,
        vec![hiking(1, &["facebook_feed"], 100, 0.1)],
    )
    .await;
    let mut session = server.client.start_load("job", "").await.expect("attach");
    session
        .send_chunk(
            2,
            vec![proto::WriteRow::from(hiking(
                2,
                &["facebook_feed"],
                100,
                0.2,
            ))],
        )
        .await
        .expect("send");
    session.next_ack().await.expect("ack");
    drop(session);
    let chunk = server
        .config
        .bulk_load
        .staging_dir
        .join("job")
        .join("chunk-0000000002.stage");
    let mut bytes = std::fs::read(&chunk).expect("the staged chunk");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&chunk, bytes).expect("damage it");

    let session = server.client.start_load("job", "").await.expect("attach");
    let error = session.commit().await.expect_err("the damage is found");
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    assert!(error.to_string().contains("damaged"), "{error}");
    let job = server.client.load_job("job").await.expect("job");
    assert_eq!(
        job.state(),
        LoadJobState::Open,
        "nothing was applied: the job is open again"
    );
    let response = server
        .client
        .get_features(read(
            &[(1, "facebook_feed"), (2, "facebook_feed")],
            &["interest_hiking"],
        ))
        .await
        .expect("read");
    assert_eq!(
        status(&response, 0, "interest_hiking"),
        ValueStatus::Defaulted,
        "not even the intact chunk"
    );
    assert_eq!(
        status(&response, 1, "interest_hiking"),
        ValueStatus::Defaulted
    );
    let job = server.client.abort_load("job").await.expect("abort");
    assert_eq!(job.state(), LoadJobState::Aborted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_see_none_or_all_of_a_job_committed_as_many_table_files() {
    const USERS: u64 = 2000;
    let server = TestServer::start_with(tempfile::tempdir().expect("directory"), |config| {
        config.bulk_load.ingest_rows_min = 1;
        // A new table file after every data block: one ingestion of many files.
        config.bulk_load.table_file_bytes_max = 1;
    })
    .await;
    let rows: Vec<proto::WriteRow> = (1..=USERS)
        .map(|user| {
            let mut row = hiking(user, &["facebook_feed"], 100, 0.5);
            row.provenance.source = "engagement".to_string();
            row.user_state_generation = 0;
            proto::WriteRow::from(row)
        })
        .collect();
    let mut session = server.client.start_load("job", "").await.expect("attach");
    session.send_chunk(1, rows).await.expect("send");
    assert_eq!(
        session
            .next_ack()
            .await
            .expect("ack")
            .summary
            .expect("summary")
            .rows_accepted,
        USERS
    );

    let reader = server.client.clone();
    let watching = tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            let response = reader
                .get_features(read(
                    &[(1, "facebook_feed"), (USERS, "facebook_feed")],
                    &["interest_hiking"],
                ))
                .await
                .expect("read");
            let first = status(&response, 0, "interest_hiking") == ValueStatus::Present;
            let last = status(&response, 1, "interest_hiking") == ValueStatus::Present;
            seen.push((first, last));
            if first && last {
                return seen;
            }
        }
    });
    let job = session.commit().await.expect("commit");
    assert!(
        job.files_ingested > 1,
        "the commit wrote several table files"
    );
    let seen = watching.await.expect("reader");
    assert!(
        seen.iter().all(|(first, last)| first == last),
        "a reader saw part of a job: {seen:?}"
    );
}

#[tokio::test]
async fn the_sweep_aborts_abandoned_jobs_and_forgets_finished_ones() {
    const DAY: Duration = Duration::from_secs(24 * 3600);
    let server = TestServer::start().await;
    server.us_adults([1]).await;
    stage(
        &server,
        "abandoned",
        1,
        vec![hiking(1, &["facebook_feed"], 100, 0.1)],
    )
    .await;
    stage(
        &server,
        "finished",
        1,
        vec![hiking(1, &["facebook_feed"], 100, 0.2)],
    )
    .await;
    commit(&server, "finished").await;

    server.advance(8 * DAY);
    server.client.sweep_expired().await.expect("sweep");
    let abandoned = server.client.load_job("abandoned").await.expect("job");
    assert_eq!(
        abandoned.state(),
        LoadJobState::Aborted,
        "idle for 8 days > 7"
    );
    assert!(
        !server
            .config
            .bulk_load
            .staging_dir
            .join("abandoned")
            .exists()
    );
    let finished = server
        .client
        .load_job("finished")
        .await
        .expect("still known");
    assert_eq!(finished.state(), LoadJobState::Committed);

    server.advance(23 * DAY);
    server.client.sweep_expired().await.expect("sweep");
    let error = server
        .client
        .load_job("finished")
        .await
        .expect_err("forgotten after 30 days");
    assert_eq!(error.code(), Code::NotFound);
    let abandoned = server
        .client
        .load_job("abandoned")
        .await
        .expect("aborted 23 days ago");
    assert_eq!(abandoned.state(), LoadJobState::Aborted);
}
