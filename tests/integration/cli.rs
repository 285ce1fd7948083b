//! The operator CLI, run in-process against the real server: the README's tour.

use std::time::Duration;

use featurestore_client::cli::{EXIT_REFUSED, EXIT_SUCCESS};
use featurestore_tests::TestServer;

use super::featurestore;

/// The line of `output` that starts with `prefix` (after collapsing runs of spaces).
fn line_starting(output: &str, prefix: &str) -> String {
    output
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .find(|line| line.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{output}"))
}

#[tokio::test]
async fn the_readme_tour_works() {
    let server = TestServer::start().await;
    let (_, surfaces) = featurestore(&server, &["surfaces"])
        .await
        .expect("surfaces");
    assert_eq!(
        line_starting(&surfaces, "facebook_ads"),
        "facebook_ads facebook ads Ads ranking on Facebook"
    );
    let (_, features) = featurestore(&server, &["features"])
        .await
        .expect("features");
    assert!(
        line_starting(&features, "topic_embedding")
            .starts_with("topic_embedding float_vector[8] ai_chat,ai_voice none 30d")
    );

    let set_user = [
        "set-user",
        "42",
        "--jurisdiction",
        "US",
        "--age",
        "adult",
        "--linked",
        "facebook,instagram",
    ];
    let (_, state) = featurestore(&server, &set_user).await.expect("set-user");
    assert_eq!(
        line_starting(&state, "jurisdiction"),
        "jurisdiction US (other)"
    );
    assert_eq!(line_starting(&state, "generation"), "generation 1");

    let rows = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(rows.path(), TOUR_ROWS).expect("write the rows file");
    let path = rows.path().to_str().expect("UTF-8 path");

    let (code, explained) = featurestore(&server, &["explain", path])
        .await
        .expect("explain");
    assert_eq!(code, EXIT_REFUSED);
    assert!(
        line_starting(&explained, "42 interest_fitness_health deny")
            .ends_with("facebook_feed=refused(SENSITIVE_TOPIC_FOR_CONTENT) facebook_ads=refused(SENSITIVE_TOPIC_FOR_ADS)"),
        "{explained}"
    );
    assert!(
        line_starting(&explained, "42 interest_hiking allow")
            .ends_with("facebook_feed=admitted facebook_ads=admitted")
    );

    let (code, written) = featurestore(&server, &["write", path])
        .await
        .expect("write");
    assert_eq!(code, EXIT_REFUSED, "some values are refused:\n{written}");
    assert!(
        line_starting(&written, "42 interest_hiking allow")
            .ends_with("facebook_feed=stored facebook_ads=stored")
    );
    assert!(
        line_starting(&written, "42 topic_embedding allow_with_transform")
            .ends_with("facebook_feed=stored facebook_ads=refused(SCHEMA_VIOLATION)"),
        "{written}"
    );
    assert!(
        line_starting(&written, "42 interest_fitness_health deny")
            .contains("refused(SENSITIVE_TOPIC_FOR_CONTENT)")
    );

    let read = [
        "read",
        "--surface",
        "facebook_feed",
        "--user",
        "42,43",
        "--feature",
        "interest_hiking,top_topic,interest_fitness_health",
    ];
    let (code, table) = featurestore(&server, &read).await.expect("read");
    assert_eq!(code, EXIT_SUCCESS);
    assert_eq!(
        line_starting(&table, "42 "),
        "42 facebook_feed ok 0.83 \"outdoors/hiking\" (not_found)"
    );
    assert_eq!(
        line_starting(&table, "43 "),
        "43 facebook_feed ok 0.0 (defaulted) (not_found) (not_found)"
    );

    let (_, json) = featurestore(
        &server,
        &[
            "read",
            "--key",
            "42:facebook_feed",
            "--feature",
            "interest_hiking",
            "--format",
            "json",
        ],
    )
    .await
    .expect("read json");
    let json: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    assert_eq!(
        json[0]["features"]["interest_hiking"]["value"],
        serde_json::json!(0.83)
    );
    assert_eq!(
        json[0]["features"]["interest_hiking"]["event_time"],
        "2026-01-14T10:00:00Z"
    );

    server.advance(Duration::from_secs(31));
    let (_, table) = featurestore(&server, &read).await.expect("read");
    assert_eq!(
        line_starting(&table, "42 "),
        "42 facebook_feed ok 0.83 (expired) (not_found)"
    );

    // A change of the user's state makes writes made against the old one stale.
    featurestore(
        &server,
        &["set-user", "42", "--jurisdiction", "DE", "--age", "adult"],
    )
    .await
    .expect("set-user");
    let error = featurestore(&server, &["write", path])
        .await
        .expect_err("stale");
    assert!(
        error
            .to_string()
            .contains("refused by policy: STALE_GENERATION (the user's state is at generation 2"),
        "{error}"
    );
}

/// The rows of the README's tour, written after user 42's state was set once.
const TOUR_ROWS: &str = r#"{"rows": [{
    "user_id": 42,
    "user_state_generation": 1,
    "surfaces": ["facebook_feed", "facebook_ads"],
    "source": "ai_chat",
    "origin_app": "facebook",
    "interaction_time": "2026-01-14T10:00:00Z",
    "features": {
        "interest_hiking": 0.83,
        "interest_fitness_health": 0.4,
        "top_topic": {"value": "outdoors/hiking", "ttl_seconds": 30},
        "topic_embedding": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    }
}]}"#;

#[tokio::test]
async fn cli_errors_are_clear() {
    let server = TestServer::start().await;
    let error = featurestore(
        &server,
        &[
            "read",
            "--surface",
            "facebook_feed",
            "--user",
            "1",
            "--feature",
            "nope",
        ],
    )
    .await
    .expect_err("unknown feature");
    assert!(
        error
            .to_string()
            .contains("InvalidArgument: features[0]: unknown feature \"nope\""),
        "{error}"
    );

    let rows = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(rows.path(), r#"[{"user_id": 1, "surfaces": ["facebook_feed"], "source": "ai_chat", "origin_app": "facebook", "features": {"interest_hiking": "high"}}]"#)
        .expect("write the rows file");
    let error = featurestore(
        &server,
        &["write", rows.path().to_str().expect("UTF-8 path")],
    )
    .await
    .expect_err("a string for a float feature");
    assert_eq!(
        format!("{error:#}"),
        "rows[0]: feature \"interest_hiking\": the value is not a float"
    );

    let error = featurestore(&server, &["read", "--user", "1"])
        .await
        .expect_err("no surface");
    assert!(
        error.to_string().contains("--user needs --surface"),
        "{error}"
    );
}

#[tokio::test]
async fn the_cli_authenticates_with_its_token() {
    use featurestore_server::config::{AuthMode, PrincipalConfig};
    let token = featurestore_server::service::auth::new_token().expect("a token");
    let server = TestServer::start_with(tempfile::tempdir().expect("directory"), |config| {
        config.auth.mode = AuthMode::Required;
        config.auth.principals = vec![PrincipalConfig {
            token_sha256: vec![featurestore_server::service::auth::hash_token(&token)],
            admin: true,
            ..PrincipalConfig::named("operators")
        }];
    })
    .await;
    let error = featurestore(&server, &["policy"])
        .await
        .expect_err("no token");
    assert!(error.to_string().contains("Unauthenticated"), "{error}");
    let (code, output) = featurestore(&server, &["--token", &token, "policy"])
        .await
        .expect("the operators' token");
    assert_eq!(code, EXIT_SUCCESS);
    assert!(output.contains("version"), "{output}");
    let error = featurestore(
        &server,
        &[
            "--token",
            &token,
            "set-user",
            "1",
            "--jurisdiction",
            "US",
            "--age",
            "adult",
        ],
    )
    .await
    .expect_err("the operators do not hold the privacy role");
    assert!(error.to_string().contains("PermissionDenied"), "{error}");
}

#[tokio::test]
async fn bench_read_sends_the_reads_it_is_asked_for_and_reports_them() {
    let server = TestServer::start().await;
    server.us_adults(1..=3).await;
    for user in 1..=3 {
        server
            .write_float(
                &format!("bench-{user}"),
                user,
                "facebook_feed",
                featurestore_tests::at(-60),
                "interest_hiking",
                0.5,
            )
            .await;
    }
    let (code, output) = featurestore(
        &server,
        &[
            "bench-read",
            "--surface",
            "facebook_feed",
            "--users",
            "3",
            "--keys",
            "7",
            "--requests",
            "9",
            "--concurrency",
            "2",
        ],
    )
    .await
    .expect("bench-read");
    assert_eq!(code, 0);
    let lines: Vec<&str> = output.lines().collect();
    assert!(lines[0].starts_with("requests  keys/request"), "{output}");
    let figures: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(&figures[..2], ["9", "7"], "{output}");
    let keys_per_second: f64 = figures[5].parse().expect("keys/s");
    assert!(keys_per_second > 0.0, "{output}");
    let error = featurestore(
        &server,
        &["bench-read", "--surface", "facebook_feed", "--users", "0"],
    )
    .await
    .expect_err("no users to read");
    assert!(error.to_string().contains("at least 1"), "{error}");
}
