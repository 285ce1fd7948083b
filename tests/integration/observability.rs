//! What operators see: the metrics endpoint after a known workload, request ids in
//! responses and in the server's log lines, and the Stats call.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use featurestore::domain::{Timestamp, Value};
use featurestore::proto::{self, ReasonCode};
use featurestore_tests::{ChildServer, START_TIME, TestServer, read, row, write};

use crate::featurestore;

/// One sample of a scrape: its metric name, labels and value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format strictly: every line is a `# HELP`, a `# TYPE` or a
/// sample of the family its last `# TYPE` declared; names and labels follow the format's
/// grammar; values are numbers; each histogram's buckets are cumulative and end with
/// `+Inf` equal to its `_count`.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    fn is_name(name: &str) -> bool {
        let mut characters = name.chars();
        characters
            .next()
            .is_some_and(|first| first.is_ascii_alphabetic() || first == '_' || first == ':')
            && characters.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut samples = Vec::new();
    let mut family: Option<(String, String)> = None;
    for (number, line) in text.lines().enumerate() {
        let context = format!("line {}: {line:?}", number + 1);
        if let Some(help) = line.strip_prefix("# HELP ") {
            let (name, _) = help.split_once(' ').expect(&context);
            assert!(is_name(name), "{context}");
            continue;
        }
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let (name, kind) = declared.split_once(' ').expect(&context);
            assert!(is_name(name), "{context}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{context}"
            );
            family = Some((name.to_string(), kind.to_string()));
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment, {context}");
        if line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect(&context);
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            number => number.parse().expect(&context),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.strip_suffix('}').expect(&context)),
            None => (series, ""),
        };
        assert!(is_name(name), "{context}");
        let (family_name, kind) = family.as_ref().expect(&context);
        let suffixes: &[&str] = match kind.as_str() {
            "histogram" => &["_bucket", "_sum", "_count"],
            "counter" => &["", "_total"],
            _ => &[""],
        };
        assert!(
            suffixes
                .iter()
                .any(|suffix| name == format!("{family_name}{suffix}")),
            "a sample of another family than {family_name}, {context}"
        );
        let mut parsed = BTreeMap::new();
        let mut rest = labels;
        while !rest.is_empty() {
            let (label, after) = rest.split_once("=\"").expect(&context);
            assert!(is_name(label), "{context}");
            let mut value = String::new();
            let mut characters = after.char_indices();
            let end = loop {
                match characters.next().expect(&context) {
                    (index, '"') => break index,
                    (_, '\\') => match characters.next().expect(&context).1 {
                        'n' => value.push('\n'),
                        escaped @ ('\\' | '"') => value.push(escaped),
                        other => panic!("bad escape \\{other}, {context}"),
                    },
                    (_, character) => value.push(character),
                }
            };
            assert!(
                parsed.insert(label.to_string(), value).is_none(),
                "{context}"
            );
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        samples.push(Sample {
            name: name.to_string(),
            labels: parsed,
            value,
        });
    }
    check_histograms(&samples);
    samples
}

/// Each histogram series: buckets cumulative, `+Inf` bucket equal to `_count`.
fn check_histograms(samples: &[Sample]) {
    /// A series (name and labels but `le`) → its buckets (bound, cumulative count).
    type Series = BTreeMap<(String, BTreeMap<String, String>), Vec<(f64, f64)>>;
    let mut series = Series::new();
    for sample in samples {
        if let Some(name) = sample.name.strip_suffix("_bucket") {
            let mut labels = sample.labels.clone();
            let bound = labels.remove("le").expect("a bucket has `le`");
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().expect("a numeric bound")
            };
            series
                .entry((name.to_string(), labels))
                .or_default()
                .push((bound, sample.value));
        }
    }
    for ((name, labels), buckets) in series {
        assert!(
            buckets
                .windows(2)
                .all(|pair| pair[0].0 < pair[1].0 && pair[0].1 <= pair[1].1),
            "{name} {labels:?}: buckets not cumulative: {buckets:?}"
        );
        let last = buckets.last().expect("at least the +Inf bucket");
        assert_eq!(last.0, f64::INFINITY, "{name}: last bucket is +Inf");
        let count = samples
            .iter()
            .find(|sample| sample.name == format!("{name}_count") && sample.labels == labels)
            .expect("a _count beside the buckets");
        assert_eq!(
            last.1, count.value,
            "{name} {labels:?}: +Inf bucket = _count"
        );
    }
}

/// The value of the sample `name` with exactly `labels`; zero when it is absent.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect();
    samples
        .iter()
        .find(|sample| sample.name == name && sample.labels == labels)
        .map_or(0.0, |sample| sample.value)
}

fn at(offset_seconds: i64) -> Timestamp {
    Timestamp::from_unix_micros(START_TIME.unix_micros() + offset_seconds * 1_000_000)
}

const WRITTEN_USERS: u64 = 490;
const READ_USERS: u64 = 500;

/// Writes `top_topic` of users 1..=490 on Facebook Feed, two hours before "now".
async fn write_topics(server: &TestServer) {
    server.us_adults(1..=READ_USERS).await;
    let rows: Vec<_> = (1..=WRITTEN_USERS)
        .map(|user| {
            row(
                user,
                &["facebook_feed"],
                at(-2 * 60 * 60),
                vec![("top_topic", Value::String(format!("topics/topic_{user}")))],
            )
        })
        .collect();
    for (index, rows) in rows.chunks(245).enumerate() {
        server
            .client
            .write_features(write(&format!("topics-{index}"), rows.to_vec()))
            .await
            .expect("the write succeeds");
    }
}

/// A write the policy refuses: a health topic is never stored for ads.
async fn write_health_for_ads(server: &TestServer, user: u64) -> proto::WriteFeaturesResponse {
    server
        .client
        .write_features(write(
            &format!("health-for-ads-{user}"),
            vec![row(
                user,
                &["facebook_ads"],
                at(-60),
                vec![("interest_fitness_health", Value::Float(0.5))],
            )],
        ))
        .await
        .expect("the write is answered")
}

#[tokio::test]
async fn the_metrics_count_a_known_workload() {
    let server = TestServer::start().await;
    write_topics(&server).await;
    let refused = write_health_for_ads(&server, 1).await;
    assert_eq!(
        refused.rows[0].verdicts[0].reasons,
        [ReasonCode::SensitiveTopicForAds as i32]
    );
    // Three reads of 500 keys, 10 of them never written; and one read of 3 keys.
    let keys: Vec<(u64, &str)> = (1..=READ_USERS)
        .map(|user| (user, "facebook_feed"))
        .collect();
    for _ in 0..3 {
        let response = server
            .client
            .get_features(read(&keys, &["top_topic", "interest_hiking"]))
            .await
            .expect("the read succeeds");
        assert_eq!(response.rows.len(), READ_USERS as usize);
    }
    server
        .client
        .get_features(read(
            &[
                (1, "facebook_feed"),
                (2, "no_such_surface"),
                (3, "facebook_feed"),
            ],
            &["top_topic"],
        ))
        .await
        .expect("the small read succeeds");
    // A read refused as invalid.
    let error = server
        .client
        .get_features(read(&[(1, "facebook_feed")], &["no_such_feature"]))
        .await
        .expect_err("an unknown feature is refused");
    assert_eq!(error.code(), tonic::Code::InvalidArgument);

    let samples = parse_prometheus(&server.scrape().await);
    let get_features = |code: &str| {
        value(
            &samples,
            "featurestore_grpc_request_duration_seconds_count",
            &[
                ("grpc_service", "featurestore.v1.FeatureStore"),
                ("grpc_method", "GetFeatures"),
                ("grpc_code", code),
            ],
        )
    };
    assert_eq!(get_features("OK"), 4.0);
    assert_eq!(get_features("INVALID_ARGUMENT"), 1.0);
    assert_eq!(
        value(
            &samples,
            "featurestore_grpc_request_duration_seconds_count",
            &[
                ("grpc_service", "featurestore.v1.FeatureStore"),
                ("grpc_method", "WriteFeatures"),
                ("grpc_code", "OK"),
            ],
        ),
        3.0,
        "two writes of topics and the refused one"
    );
    assert_eq!(
        value(
            &samples,
            "featurestore_grpc_request_duration_seconds_count",
            &[
                ("grpc_service", "featurestore.v1.Privacy"),
                ("grpc_method", "SetUserState"),
                ("grpc_code", "OK"),
            ],
        ),
        READ_USERS as f64
    );
    let batch = |keys: &str| {
        value(
            &samples,
            "featurestore_read_duration_seconds_count",
            &[("batch_keys", keys)],
        )
    };
    assert_eq!(batch("101-500"), 3.0);
    assert_eq!(batch("2-10"), 1.0);
    assert_eq!(batch("1"), 0.0, "the refused read is not timed as a read");

    let keys_with = |status: &str| {
        value(
            &samples,
            "featurestore_read_keys_total",
            &[("status", status)],
        )
    };
    assert_eq!(keys_with("ok"), 3.0 * READ_USERS as f64 + 2.0);
    assert_eq!(keys_with("unknown_surface"), 1.0);
    let values_with = |status: &str| {
        value(
            &samples,
            "featurestore_read_values_total",
            &[("status", status)],
        )
    };
    let missing = (READ_USERS - WRITTEN_USERS) as f64;
    assert_eq!(values_with("present"), 3.0 * WRITTEN_USERS as f64 + 2.0);
    assert_eq!(values_with("not_found"), 3.0 * missing);
    assert_eq!(values_with("defaulted"), 3.0 * READ_USERS as f64);
    assert_eq!(values_with("expired"), 0.0);

    // Every value served is two hours old: past the 1 h bucket, within 6 h.
    let age = |bound: &str| {
        value(
            &samples,
            "featurestore_served_value_age_seconds_bucket",
            &[("surface", "facebook_feed"), ("le", bound)],
        )
    };
    let served = 3.0 * WRITTEN_USERS as f64 + 2.0;
    assert_eq!(age("3600"), 0.0);
    assert_eq!(age("21600"), served);
    assert_eq!(
        value(
            &samples,
            "featurestore_served_value_age_seconds_sum",
            &[("surface", "facebook_feed")],
        ),
        served * 7200.0
    );

    let outcome = |outcome: &str| {
        value(
            &samples,
            "featurestore_write_outcomes_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(outcome("stored"), WRITTEN_USERS as f64);
    assert_eq!(outcome("refused"), 1.0);
    assert_eq!(
        value(
            &samples,
            "featurestore_write_refusals_total",
            &[("reason", "SENSITIVE_TOPIC_FOR_ADS")],
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "featurestore_write_verdicts_total",
            &[("verdict", "deny")],
        ),
        1.0
    );

    // The figures read at the scrape.
    let policy = server.client.policy_status().await.expect("policy status");
    assert_eq!(
        value(
            &samples,
            "featurestore_policy_bundle_info",
            &[("version", &policy.version), ("hash", &policy.hash)],
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "featurestore_rocksdb_block_cache_capacity_bytes",
            &[]
        ),
        server.config.storage.block_cache_bytes as f64
    );
    assert!(
        value(&samples, "featurestore_rocksdb_memtable_bytes", &[]) > 0.0,
        "the writes are in the memtable"
    );
    // The first 500-key read found nothing in the row cache; the two after it and the small
    // read found every row there.
    let row_cache = |name: &str| {
        value(
            &samples,
            &format!("featurestore_rocksdb_row_cache_{name}"),
            &[],
        )
    };
    assert_eq!(
        (row_cache("hits_total"), row_cache("misses_total")),
        (2.0 * READ_USERS as f64 + 2.0, READ_USERS as f64)
    );
    assert_eq!(
        row_cache("capacity_bytes"),
        server.config.storage.row_cache_bytes as f64
    );
    assert!(row_cache("usage_bytes") > 0.0, "the rows read are kept");
    // No label carries a user id.
    for sample in &samples {
        for user in ["1", "490", "500"] {
            assert!(
                !sample.labels.values().any(|label| label == user)
                    || sample.name.ends_with("_bucket"),
                "{sample:?}"
            );
        }
    }
}

#[tokio::test]
async fn bulk_loads_are_counted_by_row_result_and_job_state() {
    let server = TestServer::start().await;
    server.us_adults(1..=3).await;
    let mut load = server
        .client
        .start_load("observed-job", "fingerprint")
        .await
        .expect("the job starts");
    let rows = vec![
        row(
            1,
            &["facebook_feed"],
            at(-60),
            vec![("interest_hiking", Value::Float(0.5))],
        ),
        row(
            2,
            &["facebook_feed", "facebook_ads"],
            at(-60),
            vec![("interest_fitness_health", Value::Float(0.5))],
        ),
        row(
            3,
            &["facebook_ads"],
            at(-60),
            vec![("interest_fitness_health", Value::Float(0.5))],
        ),
    ];
    let rows = rows.into_iter().map(proto::WriteRow::from).collect();
    load.send_chunk(1, rows).await.expect("send the chunk");
    let ack = load.next_ack().await.expect("the chunk is acknowledged");
    let summary = ack.summary.expect("a summary");
    load.commit().await.expect("the job commits");
    // A read and a refused write, so that every family has samples for the dashboard.
    server
        .client
        .get_features(read(&[(1, "facebook_feed")], &[]))
        .await
        .expect("the read succeeds");
    write_health_for_ads(&server, 3).await;

    let text = server.scrape().await;
    every_dashboard_metric_is_exposed(&text);
    let samples = parse_prometheus(&text);
    let rows_with = |result: &str| {
        value(
            &samples,
            "featurestore_bulk_load_rows_total",
            &[("result", result)],
        )
    };
    assert_eq!(rows_with("accepted"), summary.rows_accepted as f64);
    assert_eq!(rows_with("transformed"), summary.rows_transformed as f64);
    assert_eq!(rows_with("denied"), summary.rows_denied as f64);
    assert_eq!(
        rows_with("accepted") + rows_with("transformed") + rows_with("denied"),
        3.0
    );
    let jobs = |state: &str| value(&samples, "featurestore_bulk_load_jobs", &[("state", state)]);
    assert_eq!(jobs("committed"), 1.0);
    assert_eq!(jobs("open"), 0.0);
}

/// Every `featurestore_*` metric the Grafana dashboard queries is one the server exposes
/// (a declared family, or a histogram's `_bucket`, `_sum` or `_count`).
fn every_dashboard_metric_is_exposed(scrape: &str) {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../docs/grafana/featurestore.json"))
            .expect("the dashboard is JSON");
    let declared: Vec<&str> = scrape
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    let exposes = |name: &str| {
        declared.iter().any(|family| {
            ["", "_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| name == format!("{family}{suffix}"))
        })
    };
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expression = target["expr"].as_str().expect("an expression");
            for (start, _) in expression.match_indices("featurestore_") {
                let name: String = expression[start..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    exposes(&name),
                    "panel {:?} queries {name}, which the server does not expose",
                    panel["title"]
                );
                queried += 1;
            }
        }
    }
    assert!(queried > 20, "the dashboard queries the metrics");
}

/// `message` with the metadata `x-request-id: id`.
fn with_request_id<T>(message: T, id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-request-id", id.parse().expect("ascii"));
    request
}

/// The `x-request-id` of a response or an error.
fn request_id(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata.get("x-request-id")?.to_str().ok()
}

#[tokio::test]
async fn a_request_id_comes_back_and_a_new_one_is_made_when_none_is_sent() {
    let server = TestServer::start().await;
    let mut stub =
        proto::feature_store_client::FeatureStoreClient::connect(server.endpoint.clone())
            .await
            .expect("connect");
    let response = stub
        .list_surfaces(with_request_id(
            proto::ListSurfacesRequest {},
            "ranker-7:batch/42",
        ))
        .await
        .expect("answered");
    assert_eq!(request_id(response.metadata()), Some("ranker-7:batch/42"));
    // An error carries it too.
    let unknown_feature = proto::GetFeaturesRequest {
        features: vec!["no_such_feature".to_string()],
        ..Default::default()
    };
    let status = stub
        .get_features(with_request_id(unknown_feature, "ranker-7:batch/43"))
        .await
        .expect_err("refused");
    assert_eq!(request_id(status.metadata()), Some("ranker-7:batch/43"));
    // Without one (or with one unfit for a log line), the server makes one up.
    let mut ids = Vec::new();
    for request in [
        tonic::Request::new(proto::ListSurfacesRequest {}),
        with_request_id(proto::ListSurfacesRequest {}, "has spaces in it"),
    ] {
        let response = stub.list_surfaces(request).await.expect("answered");
        let id = request_id(response.metadata()).expect("an id").to_string();
        assert_eq!(id.len(), 16);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
}

const LOG_DIRECTORY_VARIABLE: &str = "FEATURESTORE_LOG_TEST_DIR";

/// Not a test of its own: the server process of
/// [`a_request_id_appears_in_the_servers_log_lines`], logging JSON lines as the binary
/// does with `--log-format json`.
#[test]
// Ignored so that it runs only as the child process its parent test starts (with
// `--ignored --exact`); the parent runs in every suite run.
#[ignore = "the server process of a_request_id_appears_in_the_servers_log_lines"]
fn serve_with_json_logs() {
    let Some(directory) = std::env::var_os(LOG_DIRECTORY_VARIABLE).map(PathBuf::from) else {
        return;
    };
    featurestore_server::logging::init(featurestore_server::logging::LogFormat::Json);
    featurestore_tests::serve_in_child(&directory, featurestore_tests::child_config(&directory));
}

#[tokio::test]
async fn a_request_id_appears_in_the_servers_log_lines() {
    let directory = tempfile::tempdir().expect("a directory");
    let log_path = directory.path().join("server.log");
    let log = std::fs::File::create(&log_path).expect("create the log");
    let mut server = ChildServer::start(
        "observability::serve_with_json_logs",
        LOG_DIRECTORY_VARIABLE,
        directory.path(),
        log,
        &[("RUST_LOG", "info,featurestore_server=debug")],
    );
    let endpoint = server
        .endpoint(directory.path())
        .await
        .expect("the server starts");
    let mut stub = proto::feature_store_client::FeatureStoreClient::connect(endpoint)
        .await
        .expect("connect");
    let request = with_request_id(
        proto::GetFeaturesRequest {
            keys: (1..=20)
                .map(|user_id| proto::FeatureKey {
                    user_id,
                    surface: "facebook_feed".to_string(),
                })
                .collect(),
            ..Default::default()
        },
        "trace-me-7f3a",
    );
    let response = stub.get_features(request).await.expect("the read succeeds");
    assert_eq!(request_id(response.metadata()), Some("trace-me-7f3a"));
    // The request's last line is written when its response ends; wait for it.
    let started = Instant::now();
    let mut ticks = featurestore_tests::poll_every(Duration::from_millis(10));
    let lines = loop {
        let text = std::fs::read_to_string(&log_path).expect("read the log");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .filter(|line: &serde_json::Value| {
                line["spans"].as_array().is_some_and(|spans| {
                    spans
                        .iter()
                        .any(|span| span["request_id"] == "trace-me-7f3a")
                }) || line["span"]["request_id"] == "trace-me-7f3a"
            })
            .collect();
        if lines
            .iter()
            .any(|line| line["message"] == "request finished")
        {
            break lines;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "log: {text}");
        ticks.tick().await;
    };
    server.kill();
    let finished = lines
        .iter()
        .find(|line| line["message"] == "request finished")
        .expect("the line of the request's end");
    assert_eq!(finished["code"], "OK");
    assert_eq!(finished["keys"], 20);
    assert!(finished["respond_us"].is_u64(), "{finished}");
    let decoded = lines
        .iter()
        .find(|line| line["message"] == "decoded")
        .expect("the line of the decoded request");
    assert!(decoded["decode_us"].is_u64(), "{decoded}");
    assert_eq!(
        finished["span"]["method"],
        "/featurestore.v1.FeatureStore/GetFeatures"
    );
    // At debug, the stages are logged as their spans close, inside the request's span.
    let stages: Vec<&str> = lines
        .iter()
        .filter(|line| line["message"] == "close")
        .filter_map(|line| line["span"]["name"].as_str())
        .collect();
    for stage in ["parse", "read_rows", "request"] {
        assert!(stages.contains(&stage), "no {stage} span in {lines:#?}");
    }
}

#[tokio::test]
async fn stats_count_rows_per_surface_and_mask_token_hashes() {
    let token = "stats-test-token-0123456789";
    let hash = featurestore_server::service::auth::hash_token(token);
    let server = TestServer::start_with(tempfile::tempdir().expect("a directory"), |config| {
        config.auth.mode = featurestore_server::config::AuthMode::Required;
        let mut operators = featurestore_server::config::PrincipalConfig::named("operators");
        operators.token_sha256 = vec![hash.clone()];
        operators.admin = true;
        operators.privacy = true;
        operators.write_sources = vec!["*".to_string()];
        config.auth.principals = vec![operators];
    })
    .await;
    let client = server.client_with(featurestore_client::ClientOptions {
        token: Some(featurestore_client::BearerToken(token.to_string())),
        ..Default::default()
    });
    client_writes(&client).await;
    let stats = client.stats().await.expect("stats");
    assert!(stats.exact, "a small database is counted whole");
    assert_eq!(stats.users, 30);
    let surfaces: Vec<(&str, u64)> = stats
        .surfaces
        .iter()
        .map(|surface| (surface.surface.as_str(), surface.rows))
        .collect();
    assert_eq!(surfaces, [("facebook_feed", 30), ("instagram_reels", 10)]);
    assert!(stats.surfaces.iter().all(|surface| surface.bytes > 0));
    assert_eq!(
        stats.policy_hash,
        client.policy_status().await.expect("policy").hash
    );
    assert!(stats.config.contains("(masked)"), "{}", stats.config);
    assert!(!stats.config.contains(&hash), "the token hash is shown");
    assert!(stats.config.contains("[observability]"), "{}", stats.config);

    // The operator CLI prints it as a table.
    let (code, output) = featurestore(&server, &["--token", token, "stats"])
        .await
        .expect("the CLI runs");
    assert_eq!(code, 0);
    let line = |name: &str| {
        output
            .lines()
            .find(|line| line.split_whitespace().next() == Some(name))
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("no {name} line in:\n{output}"))
    };
    assert_eq!(line("facebook_feed")[1], "30");
    assert_eq!(line("instagram_reels")[1], "10");
    assert_eq!(line("users_with_rows")[1], "30");
    // Only the admin role may see it.
    let anonymous = server.client_with(featurestore_client::ClientOptions::default());
    assert_eq!(
        anonymous.stats().await.expect_err("no token").code(),
        tonic::Code::Unauthenticated
    );
}

/// 30 users on Facebook Feed, 10 of them on Instagram Reels too.
async fn client_writes(client: &featurestore_client::Client) {
    for user in 1..=30 {
        client
            .set_user_state(featurestore_tests::us_adult(user))
            .await
            .expect("state");
    }
    let rows = (1..=30)
        .map(|user| {
            let surfaces: &[&str] = if user <= 10 {
                &["facebook_feed", "instagram_reels"]
            } else {
                &["facebook_feed"]
            };
            row(
                user,
                surfaces,
                at(-60),
                vec![("interest_hiking", Value::Float(0.5))],
            )
        })
        .collect();
    client
        .write_features(write("stats-rows", rows))
        .await
        .expect("the write succeeds");
}
