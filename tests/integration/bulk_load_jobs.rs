//! Bulk-load jobs over their life: aborts, idempotent chunks across a restart, malformed
//! records, a commit a crash interrupted, erasure of staged rows, damaged staging files,
//! readers during a many-file commit, and the sweep of abandoned jobs.

use std::time::Duration;

use featurestore::proto::{self, LoadJobState, ReasonCode, ValueStatus};
use featurestore_client::cli::EXIT_REFUSED;
use featurestore_tests::{START_TIME, TestServer, read};
use tonic::Code;

use super::bulk_load::{commit, count, hiking, reason, stage, start_ingesting};
use super::{featurestore, float, status};

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
