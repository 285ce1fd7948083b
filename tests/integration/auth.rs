//! Authentication and roles, end to end: bearer tokens, TLS, mutual TLS, and the matrix of
//! which principal may make which call on which surface or source.

use std::fmt::Write as _;

use featurestore::domain::Value;
use featurestore::proto;
use featurestore_client::{BearerToken, Client, ClientOptions, ClientTls};
use featurestore_server::config::{AuthMode, PrincipalConfig, TlsConfig};
use featurestore_server::service::auth::hash_token;
use featurestore_tests::pki::{CertificateFiles, TestAuthority};
use featurestore_tests::{TestServer, at, read, row, us_adult, write};
use tonic::Code;

use crate::raw_grpc_call;

const READER: &str = "reader-token-7d1f";
const WRITER: &str = "writer-token-93ac";
const PRIVACY: &str = "privacy-token-c2e8";
const ADMIN: &str = "admin-token-5b40";
/// A second token of the reader: tokens rotate without downtime.
const READER_NEXT: &str = "reader-token-next-11e2";

fn principal(name: &str, tokens: &[&str]) -> PrincipalConfig {
    PrincipalConfig {
        token_sha256: tokens.iter().map(|token| hash_token(token)).collect(),
        ..PrincipalConfig::named(name)
    }
}

/// One principal per role: the Reels ranker, the engagement pipeline, the privacy
/// system, the operators.
fn principals() -> Vec<PrincipalConfig> {
    vec![
        PrincipalConfig {
            read_surfaces: vec!["instagram_reels".to_string()],
            ..principal("reels-ranker", &[READER, READER_NEXT])
        },
        PrincipalConfig {
            write_sources: vec!["engagement".to_string()],
            write_producers: vec!["engagement@v3".to_string()],
            ..principal("engagement-pipeline", &[WRITER])
        },
        PrincipalConfig {
            privacy: true,
            ..principal("privacy-system", &[PRIVACY])
        },
        PrincipalConfig {
            admin: true,
            ..principal("operators", &[ADMIN])
        },
    ]
}

async fn server_with_auth() -> TestServer {
    TestServer::start_with(tempfile::tempdir().expect("directory"), |config| {
        config.auth.mode = AuthMode::Required;
        config.auth.principals = principals();
    })
    .await
}

fn client(server: &TestServer, token: Option<&str>) -> Client {
    server.client_with(ClientOptions {
        token: token.map(|token| BearerToken(token.to_string())),
        ..ClientOptions::default()
    })
}

/// Every kind of call a principal might make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    ListFeatures,
    ListSurfaces,
    ReadReels,
    ReadFacebookAds,
    WriteEngagement,
    WriteEngagementAsOtherProducer,
    WriteAiChat,
    ExplainEngagement,
    BulkLoadEngagement,
    BulkLoadAiChat,
    ListLoadJobs,
    SetUserState,
    GetUserState,
    GetAuditTrail,
    EraseUser,
    GetErasureStatus,
    GetPolicyStatus,
    ReloadPolicy,
    VerifyAuditLog,
    SweepExpired,
    CreateBackup,
    GetStats,
}

const CALLS: [Call; 22] = [
    Call::ListFeatures,
    Call::ListSurfaces,
    Call::ReadReels,
    Call::ReadFacebookAds,
    Call::WriteEngagement,
    Call::WriteEngagementAsOtherProducer,
    Call::WriteAiChat,
    Call::ExplainEngagement,
    Call::BulkLoadEngagement,
    Call::BulkLoadAiChat,
    Call::ListLoadJobs,
    Call::SetUserState,
    Call::GetUserState,
    Call::GetAuditTrail,
    Call::EraseUser,
    Call::GetErasureStatus,
    Call::GetPolicyStatus,
    Call::ReloadPolicy,
    Call::VerifyAuditLog,
    Call::SweepExpired,
    Call::CreateBackup,
    Call::GetStats,
];

/// The user every call is about (a US adult, set up by the privacy system).
const USER: u64 = 7;

/// A row of `interest_hiking` for [`USER`] on Instagram Reels, from `source`: 0.75 from
/// the engagement pipeline as itself, else a later, other value that would win were it
/// stored.
fn hiking_row(source: &str, producer: &str) -> featurestore::domain::WriteRow {
    let (time, value) = if (source, producer) == ("engagement", "engagement@v3") {
        (at(-60), 0.75)
    } else {
        (at(-30), 0.25)
    };
    let mut row = row(
        USER,
        &["instagram_reels"],
        time,
        vec![("interest_hiking", Value::Float(value))],
    );
    row.provenance.source = source.to_string();
    row.provenance.producer_id = producer.to_string();
    row
}

/// Makes `call` as `client`; its code (OK when it succeeded). `nonce` keeps idempotency
/// keys, job ids and erased users apart between callers; `receipt` is an erasure's.
async fn make(client: &Client, call: Call, nonce: usize, receipt: &str) -> Code {
    let code = |result: Result<(), featurestore_client::ClientError>| match result {
        Ok(()) => Code::Ok,
        Err(error) => error.code(),
    };
    let key = format!("{call:?}-{nonce}");
    match call {
        Call::ListFeatures => code(client.list_features().await.map(drop)),
        Call::ListSurfaces => code(client.list_surfaces().await.map(drop)),
        Call::ReadReels => code(
            client
                .get_features(read(&[(USER, "instagram_reels")], &["interest_hiking"]))
                .await
                .map(drop),
        ),
        Call::ReadFacebookAds => code(
            client
                .get_features(read(
                    &[(USER, "instagram_reels"), (USER, "facebook_ads")],
                    &["interest_hiking"],
                ))
                .await
                .map(drop),
        ),
        Call::WriteEngagement => code(
            client
                .write_features(write(&key, vec![hiking_row("engagement", "engagement@v3")]))
                .await
                .map(drop),
        ),
        Call::WriteEngagementAsOtherProducer => code(
            client
                .write_features(write(
                    &key,
                    vec![hiking_row("engagement", "chat-topics@v1")],
                ))
                .await
                .map(drop),
        ),
        Call::WriteAiChat => code(
            client
                .write_features(write(&key, vec![hiking_row("ai_chat", "engagement@v3")]))
                .await
                .map(drop),
        ),
        Call::ExplainEngagement => code(
            client
                .explain_write(write(&key, vec![hiking_row("engagement", "engagement@v3")]))
                .await
                .map(drop),
        ),
        Call::BulkLoadEngagement | Call::BulkLoadAiChat => {
            let source = if call == Call::BulkLoadEngagement {
                "engagement"
            } else {
                "ai_chat"
            };
            let load = async {
                let mut session = client.start_load(&key, "fingerprint").await?;
                session
                    .send_chunk(
                        0,
                        vec![proto::WriteRow::from(hiking_row(source, "engagement@v3"))],
                    )
                    .await?;
                session.next_ack().await?;
                session.commit().await?;
                Ok(())
            };
            code(load.await)
        }
        Call::ListLoadJobs => code(client.load_jobs(10).await.map(drop)),
        Call::SetUserState => code(
            client
                .set_user_state(us_adult(1000 + nonce as u64))
                .await
                .map(drop),
        ),
        Call::GetUserState => code(client.get_user_state(USER).await.map(drop)),
        Call::GetAuditTrail => code(client.audit_trail(USER, 10).await.map(drop)),
        Call::EraseUser => code(client.erase_user(2000 + nonce as u64).await.map(drop)),
        Call::GetErasureStatus => code(client.erasure_status(receipt).await.map(drop)),
        Call::GetPolicyStatus => code(client.policy_status().await.map(drop)),
        Call::SweepExpired => code(client.sweep_expired().await.map(drop)),
        Call::CreateBackup => code(client.create_backup().await.map(drop)),
        Call::GetStats => code(client.stats().await.map(drop)),
        Call::ReloadPolicy => code(client.reload_policy().await.map(drop)),
        Call::VerifyAuditLog => code(client.verify_audit_log().await.map(drop)),
    }
}

/// What each caller may do: the role matrix the README documents.
fn expected(caller: &str, call: Call) -> Code {
    use Call::*;
    let allowed = match caller {
        "no credentials" | "unknown token" => return Code::Unauthenticated,
        _ if matches!(call, ListFeatures | ListSurfaces) => true,
        "reader" | "reader (next token)" => call == ReadReels,
        "writer" => matches!(
            call,
            WriteEngagement | ExplainEngagement | BulkLoadEngagement | ListLoadJobs
        ),
        "privacy" => matches!(
            call,
            SetUserState | GetUserState | GetAuditTrail | EraseUser | GetErasureStatus
        ),
        "admin" => matches!(
            call,
            GetPolicyStatus
                | ReloadPolicy
                | VerifyAuditLog
                | SweepExpired
                | CreateBackup
                | GetStats
        ),
        other => panic!("unknown caller {other}"),
    };
    if allowed {
        Code::Ok
    } else {
        Code::PermissionDenied
    }
}

#[tokio::test]
async fn each_principal_may_make_its_calls_and_no_others() {
    let server = server_with_auth().await;
    let privacy = client(&server, Some(PRIVACY));
    privacy
        .set_user_state(us_adult(USER))
        .await
        .expect("the privacy system sets the user's state");
    let receipt = privacy
        .erase_user(999)
        .await
        .expect("an erasure")
        .receipt_id;
    let callers = [
        ("no credentials", None),
        ("unknown token", Some("not-a-configured-token")),
        ("reader", Some(READER)),
        ("reader (next token)", Some(READER_NEXT)),
        ("writer", Some(WRITER)),
        ("privacy", Some(PRIVACY)),
        ("admin", Some(ADMIN)),
    ];
    let mut table = String::from("| call |");
    for (caller, _) in &callers {
        write!(table, " {caller} |").expect("write to a string");
    }
    table.push('\n');
    let mut mismatches = Vec::new();
    for call in CALLS {
        write!(table, "| {call:?} |").expect("write to a string");
        for (nonce, (caller, token)) in callers.iter().enumerate() {
            let got = make(&client(&server, *token), call, nonce, &receipt).await;
            let want = expected(caller, call);
            if got != want {
                mismatches.push(format!("{caller} {call:?}: got {got:?}, expected {want:?}"));
            }
            write!(table, " {got:?} |").expect("write to a string");
        }
        table.push('\n');
    }
    println!("{table}");
    assert!(mismatches.is_empty(), "{mismatches:#?}\n{table}");

    // The refused writes left nothing behind: the stored value is the engagement
    // pipeline's, not the later one of the writes it was refused.
    let response = client(&server, Some(READER))
        .get_features(read(&[(USER, "instagram_reels")], &["interest_hiking"]))
        .await
        .expect("read");
    assert_eq!(crate::float(&response, 0, "interest_hiking"), 0.75);
    // The audit log names the principal that changed the user's state.
    let trail = privacy.audit_trail(USER, 100).await.expect("audit trail");
    let state_set = trail
        .records
        .iter()
        .find(|record| record.action == "user_state_set")
        .expect("the state change is audited");
    assert_eq!(state_set.caller, "privacy-system");
}

#[tokio::test]
async fn credentials_are_checked_before_the_request_is_decoded() {
    let server = server_with_auth().await;
    // Bytes that are no protobuf at all: a server that decoded them first would answer
    // INVALID_ARGUMENT or INTERNAL.
    let garbage = [0xff_u8; 64];
    let path = "/featurestore.v1.FeatureStore/WriteFeatures";
    assert_eq!(
        raw_grpc_call(&server, path, &[], &garbage).await,
        Code::Unauthenticated
    );
    let reader = format!("Bearer {READER}");
    assert_eq!(
        raw_grpc_call(&server, path, &[("authorization", &reader)], &garbage).await,
        Code::PermissionDenied,
        "a reader's write is refused for its role, before its body is read"
    );
    let lowercase = format!("bearer {READER}");
    assert_eq!(
        raw_grpc_call(&server, path, &[("authorization", &lowercase)], &garbage).await,
        Code::PermissionDenied,
        "the scheme's name is case-insensitive: the reader is recognised, and refused a write"
    );
    let basic = "Basic cmVhZGVyOnNlY3JldA==";
    assert_eq!(
        raw_grpc_call(&server, path, &[("authorization", basic)], &garbage).await,
        Code::Unauthenticated
    );
    // Methods nobody was given a rule for are refused, even to the operators.
    let admin = format!("Bearer {ADMIN}");
    assert_eq!(
        raw_grpc_call(
            &server,
            "/featurestore.v1.Admin/DropEverything",
            &[("authorization", &admin)],
            &[],
        )
        .await,
        Code::PermissionDenied
    );
    // Health checks need no credentials: load balancers make them.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Endpoint::from_shared(server.endpoint.clone())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect"),
    );
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check without credentials")
        .into_inner();
    assert_eq!(
        answer.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

/// Why a server with authentication in `mode`, listening on `address`, refuses to start.
async fn refusal_to_start(
    mode: AuthMode,
    address: &str,
    directory: &std::path::Path,
) -> anyhow::Error {
    let mut config = featurestore_server::config::Config {
        data_dir: directory.join("db"),
        ..featurestore_server::config::Config::default()
    };
    config.auth.mode = mode;
    let listener = tokio::net::TcpListener::bind(address).await.expect("bind");
    featurestore_server::run(listener, config, tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("the server refuses to start")
}

#[tokio::test]
async fn a_server_requiring_authentication_without_principals_does_not_start() {
    let directory = tempfile::tempdir().expect("directory");
    let error = refusal_to_start(AuthMode::Required, "127.0.0.1:0", directory.path()).await;
    assert!(
        error.to_string().contains("no principal is configured"),
        "{error:#}"
    );
    assert!(
        !directory.path().join("db").exists(),
        "it stopped before opening the database"
    );
}

#[tokio::test]
async fn without_authentication_the_server_listens_on_loopback_only() {
    let directory = tempfile::tempdir().expect("directory");
    let error = refusal_to_start(AuthMode::Disabled, "0.0.0.0:0", directory.path()).await;
    assert!(error.to_string().contains("loopback"), "{error:#}");
}

/// A server over TLS with `server_certificate`; with `client_ca`, clients need a
/// certificate it signed.
async fn server_with_tls(
    server_certificate: &CertificateFiles,
    client_ca: Option<std::path::PathBuf>,
    principals: Vec<PrincipalConfig>,
) -> TestServer {
    let tls = TlsConfig {
        certificate_path: server_certificate.certificate.clone(),
        key_path: server_certificate.key.clone(),
        client_ca_path: client_ca,
        client_certificate_optional: false,
        handshake_timeout: std::time::Duration::from_secs(5),
        reload_interval: std::time::Duration::from_millis(50),
    };
    TestServer::start_with(tempfile::tempdir().expect("directory"), |config| {
        config.auth.mode = AuthMode::Required;
        config.auth.principals = principals;
        config.tls = Some(tls);
    })
    .await
}

/// Waits until the TLS server's health check says SERVING.
async fn wait_until_serving(server: &TestServer, authority: &TestAuthority) {
    let checker = authority.client("health-checker");
    let tls = ClientTls::from_files(
        Some(&authority.certificate_path()),
        Some((checker.certificate.as_path(), checker.key.as_path())),
        Some("localhost".to_string()),
    )
    .expect("read the certificates");
    let endpoint =
        tonic::transport::Endpoint::from_shared(server.endpoint.replace("http://", "https://"))
            .expect("endpoint")
            .tls_config(tls.tonic_config())
            .expect("TLS settings");
    let mut ticks = featurestore_tests::poll_every(std::time::Duration::from_millis(10));
    for _ in 0..3000 {
        if let Ok(channel) = endpoint.connect().await {
            let answer = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if answer.is_ok_and(|answer| {
                answer.into_inner().status()
                    == tonic_health::pb::health_check_response::ServingStatus::Serving
            }) {
                return;
            }
        }
        ticks.tick().await;
    }
    panic!("the TLS server did not start serving");
}

fn tls_client(
    server: &TestServer,
    authority: &TestAuthority,
    identity: Option<&CertificateFiles>,
    token: Option<&str>,
) -> Client {
    let tls = ClientTls::from_files(
        Some(&authority.certificate_path()),
        identity.map(|files| (files.certificate.as_path(), files.key.as_path())),
        Some("localhost".to_string()),
    )
    .expect("read the certificates");
    Client::connect(
        &server.endpoint.replace("http://", "https://"),
        ClientOptions {
            token: token.map(|token| BearerToken(token.to_string())),
            tls: Some(tls),
            retries: 0,
            ..ClientOptions::default()
        },
    )
    .expect("valid endpoint")
}

/// A call that failed because the connection could not be made: the TLS handshake was
/// refused, or the two ends do not speak the same protocol.
fn assert_not_connected(error: &featurestore_client::ClientError) {
    assert!(
        matches!(error.code(), Code::Unavailable | Code::Unknown),
        "{error}"
    );
}

fn reels(user: u64) -> featurestore::domain::ReadRequest {
    read(&[(user, "instagram_reels")], &["interest_hiking"])
}

#[tokio::test]
async fn over_tls_tokens_work_and_plaintext_or_untrusted_clients_do_not() {
    let directory = tempfile::tempdir().expect("directory");
    let authority = TestAuthority::new(directory.path(), "tls-ca");
    let server = server_with_tls(&authority.server(), None, principals()).await;
    wait_until_serving(&server, &authority).await;
    let response = tls_client(&server, &authority, None, Some(READER))
        .get_features(reels(1))
        .await
        .expect("a reader over TLS reads");
    assert_eq!(response.rows.len(), 1);
    let plaintext = client(&server, Some(READER));
    let error = plaintext
        .get_features(reels(1))
        .await
        .expect_err("the server speaks only TLS");
    assert_not_connected(&error);
    let stranger = TestAuthority::new(directory.path(), "other-ca");
    let error = tls_client(&server, &stranger, None, Some(READER))
        .get_features(reels(1))
        .await
        .expect_err("the server's certificate is not trusted by this client");
    assert_not_connected(&error);
    let error = Client::connect(
        &server.endpoint.replace("http://", "https://"),
        ClientOptions::default(),
    )
    .expect_err("an https endpoint without a certificate authority is refused");
    assert_eq!(error.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn over_mutual_tls_the_client_certificate_is_the_principal() {
    let directory = tempfile::tempdir().expect("directory");
    let authority = TestAuthority::new(directory.path(), "mtls-ca");
    let ranker = PrincipalConfig {
        certificate_names: vec!["reels-ranker.ranking.internal".to_string()],
        token_sha256: Vec::new(),
        read_surfaces: vec!["instagram_reels".to_string()],
        ..principal("reels-ranker", &[])
    };
    let server = server_with_tls(
        &authority.server(),
        Some(authority.certificate_path()),
        vec![ranker],
    )
    .await;
    wait_until_serving(&server, &authority).await;
    let certificate = authority.client("reels-ranker.ranking.internal");
    let ranker = tls_client(&server, &authority, Some(&certificate), None);
    ranker
        .get_features(reels(1))
        .await
        .expect("the ranker reads Reels with its certificate alone");
    let error = ranker
        .get_features(read(&[(1, "facebook_ads")], &["interest_hiking"]))
        .await
        .expect_err("but not Facebook ads");
    assert_eq!(error.code(), Code::PermissionDenied, "{error}");
    assert!(error.to_string().contains("facebook_ads"), "{error}");

    let unknown = authority.client("batch-job.ranking.internal");
    let error = tls_client(&server, &authority, Some(&unknown), None)
        .get_features(reels(1))
        .await
        .expect_err("a trusted certificate no principal names");
    assert_eq!(error.code(), Code::Unauthenticated, "{error}");

    let expired = authority.expired_client("reels-ranker.ranking.internal");
    let error = tls_client(&server, &authority, Some(&expired), None)
        .get_features(reels(1))
        .await
        .expect_err("an expired certificate fails the handshake");
    assert_not_connected(&error);

    let error = tls_client(&server, &authority, None, None)
        .get_features(reels(1))
        .await
        .expect_err("no client certificate fails the handshake");
    assert_not_connected(&error);

    let stranger = TestAuthority::new(directory.path(), "stranger-ca");
    let forged = stranger.client("reels-ranker.ranking.internal");
    let error = tls_client(&server, &authority, Some(&forged), None)
        .get_features(reels(1))
        .await
        .expect_err("a certificate another authority signed fails the handshake");
    assert_not_connected(&error);

    // The server keeps serving the good client after all of that.
    ranker.get_features(reels(1)).await.expect("still served");
}

#[tokio::test]
async fn renewed_certificates_are_put_in_force_without_a_restart() {
    let directory = tempfile::tempdir().expect("directory");
    let old = TestAuthority::new(directory.path(), "old-ca");
    let files = old.server();
    let server = server_with_tls(&files, None, principals()).await;
    wait_until_serving(&server, &old).await;
    tls_client(&server, &old, None, Some(READER))
        .get_features(reels(1))
        .await
        .expect("served with the first certificate");

    // The renewal: another authority's certificate and key written over the files in
    // force, one after the other, as a renewal job would.
    let new = TestAuthority::new(directory.path(), "new-ca");
    let renewed = new.server();
    std::fs::copy(&renewed.certificate, &files.certificate).expect("renew the certificate");
    std::fs::copy(&renewed.key, &files.key).expect("renew the key");
    let started = std::time::Instant::now();
    let mut ticks = featurestore_tests::poll_every(std::time::Duration::from_millis(20));
    while let Err(error) = tls_client(&server, &new, None, Some(READER))
        .get_features(reels(1))
        .await
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the renewed certificate was never put in force: {error}"
        );
        ticks.tick().await;
    }
    let error = tls_client(&server, &old, None, Some(READER))
        .get_features(reels(1))
        .await
        .expect_err("new connections see the new certificate");
    assert_not_connected(&error);

    // A broken renewal (a key that is not the certificate's) is refused, and the
    // certificate in force stays.
    let stranger = old.client("stranger");
    std::fs::copy(&stranger.key, &files.key).expect("write a mismatched key");
    // Once the server has found the changed files and refused them, the check is done.
    let started = std::time::Instant::now();
    while !server
        .scrape()
        .await
        .contains("featurestore_tls_reloads_total{result=\"refused\"}")
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the server never looked at the broken renewal"
        );
        ticks.tick().await;
    }
    tls_client(&server, &new, None, Some(READER))
        .get_features(reels(1))
        .await
        .expect("still served with the renewed certificate");
}
