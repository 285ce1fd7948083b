//! The server on a Redis Cluster, through the real client: reads, writes, policy, state
//! changes, erasure and the audit log work as on the embedded engine; two servers on one
//! cluster serve one store; a server refuses to start without a cluster to run on.

use featurestore::domain::Value;
use featurestore::proto::{Outcome, RowStatus, ValueStatus};
use featurestore_server::config::{Backend, Config};
use featurestore_server::policy::DEFAULT_BUNDLE_TOML;
use featurestore_server::storage::redis::keys::Layout;
use featurestore_tests::cluster::{self, RedisCluster};
use featurestore_tests::{
    TestServer, at, files_containing, files_still_containing, read, row, write,
};

use crate::{float, status};

/// A value only the users of the erasure test write: found in the cluster's files before
/// the erasure, never after it.
const CANARY: &str = "canary/redis_erasure_5d2e";

/// Puts a server's store on `cluster`, under a key prefix of its own (`prefix`, or a
/// fresh one).
fn on_cluster(config: &mut Config, cluster: &RedisCluster, prefix: Option<&str>) {
    config.storage.backend = Backend::RedisCluster;
    config.storage.redis_cluster = crate::redis_cluster::store_config(cluster);
    if let Some(prefix) = prefix {
        config.storage.redis_cluster.key_prefix = prefix.to_string();
    }
    config.storage.audit_partitions = 16;
}

pub(crate) async fn server_on_cluster(prefix: Option<&str>) -> TestServer {
    let cluster = cluster::shared();
    TestServer::start_with(tempfile::tempdir().expect("a directory"), |config| {
        on_cluster(config, cluster, prefix)
    })
    .await
}

/// Keys of the store under `prefix` that name `user_id`, on every master.
fn keys_of_user(cluster: &RedisCluster, prefix: &str, user_id: u64) -> Vec<String> {
    let mut found = Vec::new();
    for port in cluster.master_ports() {
        for pattern in [
            format!("{{{prefix}*}}:*:{user_id}"),
            format!("{{{prefix}*}}:*:{user_id}:*"),
        ] {
            let output = std::process::Command::new("redis-cli")
                .args(["-p", &port.to_string(), "--scan", "--pattern", &pattern])
                .output()
                .expect("redis-cli");
            found.extend(
                String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .map(str::to_string),
            );
        }
    }
    found
}

#[tokio::test]
async fn writes_reads_policy_state_changes_and_erasure_work_on_a_cluster() {
    let prefix = cluster::unique_prefix();
    let server = server_on_cluster(Some(&prefix)).await;
    server.us_adults([42, 43, 44]).await;
    let users = [42u64, 43, 44];
    let rows = users
        .iter()
        .map(|&user_id| {
            row(
                user_id,
                &["facebook_feed", "instagram_reels"],
                at(-60),
                vec![
                    ("interest_hiking", Value::Float(user_id as f32 / 100.0)),
                    ("top_topic", Value::String(format!("{CANARY}{user_id}"))),
                ],
            )
        })
        .collect();
    let request = write("first", rows);
    let written = server
        .client
        .write_features(request.clone())
        .await
        .expect("write");
    assert!(!written.replayed);
    let again = server.client.write_features(request).await.expect("retry");
    assert!(
        again.replayed,
        "a retry is answered from the idempotency records"
    );
    assert_eq!(again.rows, written.rows);

    let keys: Vec<(u64, &str)> = users
        .iter()
        .flat_map(|&user| [(user, "facebook_feed"), (user, "instagram_reels")])
        .chain([(45, "facebook_feed")])
        .collect();
    let response = server
        .client
        .get_features(read(&keys, &["interest_hiking"]))
        .await
        .expect("read");
    for (index, (user_id, _)) in keys.iter().enumerate().take(6) {
        assert_eq!(response.rows[index].status, RowStatus::Ok as i32);
        assert_eq!(
            status(&response, index, "interest_hiking"),
            ValueStatus::Present
        );
        assert_eq!(
            float(&response, index, "interest_hiking"),
            *user_id as f32 / 100.0
        );
    }
    assert_eq!(
        status(&response, 6, "interest_hiking"),
        ValueStatus::Defaulted
    );
    // The census counts the rows in the cluster.
    let stats = server.client.stats().await.expect("stats");
    assert!(stats.exact, "{stats:?}");
    assert_eq!(stats.users, 3, "{stats:?}");
    let rows: Vec<(String, u64)> = stats
        .surfaces
        .iter()
        .map(|surface| (surface.surface.clone(), surface.rows))
        .collect();
    assert_eq!(
        rows,
        [
            ("facebook_feed".to_string(), 3),
            ("instagram_reels".to_string(), 3)
        ]
    );

    // An older event loses to the stored one, per feature.
    let older = server
        .client
        .write_features(write(
            "older",
            vec![row(
                42,
                &["facebook_feed"],
                at(-120),
                vec![("interest_hiking", Value::Float(0.99))],
            )],
        ))
        .await
        .expect("older write");
    assert_eq!(
        crate::outcomes(crate::verdict(&older, 0, 0)),
        [("facebook_feed".to_string(), Outcome::Superseded)]
    );
    let response = server
        .client
        .get_features(read(&[(42, "facebook_feed")], &["interest_hiking"]))
        .await
        .expect("read");
    assert_eq!(float(&response, 0, "interest_hiking"), 0.42);

    // A state change re-validates the user's stored values in the same step: a user who
    // moves to an excluded region keeps no AI-derived value.
    let mut moved = featurestore_tests::us_adult(43);
    moved.jurisdiction = "DE".to_string();
    let state = server.client.set_user_state(moved).await.expect("state");
    assert_eq!(state.generation, 2);
    let response = server
        .client
        .get_features(read(&[(43, "facebook_feed")], &["interest_hiking"]))
        .await
        .expect("read");
    assert_ne!(
        status(&response, 0, "interest_hiking"),
        ValueStatus::Present,
        "an interest is not served after the move"
    );

    // Erasure: nothing of the user is served, writable or left in the cluster, and the
    // nodes' append-only files no longer hold the user's values.
    assert!(!keys_of_user(cluster::shared(), &prefix, 42).is_empty());
    let canary = format!("{CANARY}42");
    let files = cluster::shared().directory();
    assert!(
        !files_containing(files, canary.as_bytes()).is_empty(),
        "the canary is in the nodes' files to begin with"
    );
    let receipt = server.client.erase_user(42).await.expect("erase");
    assert!(receipt.verified, "{receipt:?}");
    let response = server
        .client
        .get_features(read(
            &[(42, "facebook_feed"), (44, "facebook_feed")],
            &["interest_hiking"],
        ))
        .await
        .expect("read");
    assert_eq!(
        status(&response, 0, "interest_hiking"),
        ValueStatus::Defaulted
    );
    assert_eq!(
        status(&response, 1, "interest_hiking"),
        ValueStatus::Present
    );
    let refused = server
        .client
        .write_features(write(
            "after-erasure",
            vec![row(
                42,
                &["facebook_feed"],
                at(-30),
                vec![("interest_hiking", Value::Float(0.5))],
            )],
        ))
        .await;
    let refused = refused.expect_err("a write for an erased user is refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.to_string().contains("USER_ERASED"), "{refused}");
    let left: Vec<String> = keys_of_user(cluster::shared(), &prefix, 42)
        .into_iter()
        .filter(|key| !key.contains(":s:42") && !key.contains(":v:42") && !key.contains(":i:42:"))
        .collect();
    assert_eq!(
        left,
        Vec::<String>::new(),
        "only the tombstone, version and answers stay"
    );
    assert_eq!(
        files_still_containing(files, canary.as_bytes()).await,
        Vec::<std::path::PathBuf>::new(),
        "the erased user's values left the nodes' files"
    );
    assert!(
        !files_containing(files, format!("{CANARY}44").as_bytes()).is_empty(),
        "the other users' values stay"
    );

    // The audit log: every chain verifies; the erased user's trail is no longer linkable.
    let verification = server.client.verify_audit_log().await.expect("verify");
    assert!(verification.intact, "{verification:?}");
    assert!(verification.records_checked >= 5, "{verification:?}");
    let trail = server.client.audit_trail(44, 0).await.expect("trail");
    assert!(!trail.records.is_empty());

    // The sweep walks every partition's users and removes what expired.
    server.advance(std::time::Duration::from_secs(100 * 24 * 3600));
    let sweep = server.client.sweep_expired().await.expect("sweep");
    assert!(sweep.values_removed >= 2, "{sweep:?}");
    let rows_of_44: Vec<String> = keys_of_user(cluster::shared(), &prefix, 44)
        .into_iter()
        .filter(|key| key.contains(":r:"))
        .collect();
    assert_eq!(
        rows_of_44,
        Vec::<String>::new(),
        "expired rows leave the cluster"
    );
    server.stop().await;
}

#[tokio::test]
async fn two_servers_on_one_cluster_serve_one_store() {
    let prefix = cluster::unique_prefix();
    let first = server_on_cluster(Some(&prefix)).await;
    let second = server_on_cluster(Some(&prefix)).await;
    first.us_adults([7]).await;
    first
        .client
        .write_features(write(
            "through-first",
            vec![row(
                7,
                &["facebook_feed"],
                at(-60),
                vec![("interest_hiking", Value::Float(0.25))],
            )],
        ))
        .await
        .expect("write through the first server");
    let response = second
        .client
        .get_features(read(&[(7, "facebook_feed")], &["interest_hiking"]))
        .await
        .expect("read through the second server");
    assert_eq!(float(&response, 0, "interest_hiking"), 0.25);
    // The state is the cluster's: the second server sees the first's generation.
    let state = second.client.get_user_state(7).await.expect("state");
    assert_eq!(state.generation, 1);
    let receipt = second.client.erase_user(7).await.expect("erase");
    assert!(receipt.verified);
    let response = first
        .client
        .get_features(read(&[(7, "facebook_feed")], &["interest_hiking"]))
        .await
        .expect("read through the first server");
    assert_eq!(
        status(&response, 0, "interest_hiking"),
        ValueStatus::Defaulted
    );
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn a_server_refuses_clusters_it_cannot_use_and_changes_no_replica_confirmed() {
    // Nobody listens on the port: unreachable.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = closed.local_addr().expect("address").port();
    drop(closed);
    let error = start_error(vec![format!("redis://127.0.0.1:{port}")]).await;
    assert!(
        error.contains("cannot reach a Redis Cluster") && error.contains(&port.to_string()),
        "{error}"
    );

    // A Redis that is not in cluster mode.
    let standalone = Standalone::start();
    let error = start_error(vec![format!("redis://127.0.0.1:{}", standalone.port)]).await;
    assert!(
        error.contains("cannot reach a Redis Cluster") && error.contains("cluster"),
        "{error}"
    );

    // A cluster whose master would evict keys when its memory fills up.
    let mut evicting = RedisCluster::start().await;
    let master = evicting.master_ports()[1];
    // (First, an ACL user: the server authenticates as it, and not with a wrong password.)
    for port in evicting.live_ports() {
        let created = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &port.to_string(),
                "acl",
                "setuser",
                "featurestore",
                "on",
            ])
            .args([">s3cret-for-tests", "~*", "&*", "+@all"])
            .output()
            .expect("redis-cli");
        assert!(created.status.success());
    }
    let secrets = tempfile::tempdir().expect("a directory");
    let password_file = secrets.path().join("redis-password");
    std::fs::write(&password_file, "s3cret-for-tests\n").expect("write the password");
    let server = TestServer::start_with(tempfile::tempdir().expect("a directory"), |config| {
        on_cluster(config, &evicting, None);
        config.storage.redis_cluster.username = Some("featurestore".to_string());
        config.storage.redis_cluster.password_file = Some(password_file.clone());
        config.storage.redis_cluster.wait_timeout = std::time::Duration::from_millis(200);
    })
    .await;
    // Logged in: a change is acknowledged (with the short wait for replicas a loaded
    // machine may answer UNAVAILABLE once; the client's retry sets the state again).
    server
        .client
        .set_user_state(featurestore_tests::us_adult(9))
        .await
        .expect("a change through the ACL user");
    // (And a change its master's replica cannot confirm is not acknowledged.)
    let layout = Layout::new(
        &server.config.storage.redis_cluster.key_prefix,
        server.config.storage.audit_partitions,
    );
    let master_of_9 = evicting
        .master_of(&layout.user(9).state())
        .expect("a master");
    let replica = evicting.replica_of(master_of_9).expect("a replica");
    evicting.kill(replica);
    let client = server.client_with(featurestore_client::ClientOptions {
        timeout: std::time::Duration::from_secs(2),
        ..featurestore_client::ClientOptions::default()
    });
    let unconfirmed = client
        .set_user_state(featurestore_tests::us_adult(9))
        .await
        .expect_err("no replica confirms the change");
    assert_eq!(
        unconfirmed.code(),
        tonic::Code::Unavailable,
        "{unconfirmed}"
    );
    assert!(
        unconfirmed
            .to_string()
            .contains("replicas required confirmed it"),
        "{unconfirmed}"
    );
    server.stop().await;
    let wrong = secrets.path().join("wrong-password");
    std::fs::write(&wrong, "not-the-password").expect("write the password");
    let error = start_error_with(evicting.seeds(), |config| {
        config.storage.redis_cluster.username = Some("featurestore".to_string());
        config.storage.redis_cluster.password_file = Some(wrong.clone());
    })
    .await;
    assert!(
        error.contains("cannot reach a Redis Cluster") && error.to_lowercase().contains("pass"),
        "{error}"
    );
    let set = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &master.to_string(),
            "config",
            "set",
            "maxmemory-policy",
            "allkeys-lru",
        ])
        .output()
        .expect("redis-cli");
    assert!(set.status.success());
    let error = start_error(evicting.seeds()).await;
    assert!(
        error.contains("maxmemory-policy allkeys-lru") && error.contains(&master.to_string()),
        "{error}"
    );
}

/// Why a server on `seeds` did not start.
async fn start_error(seeds: Vec<String>) -> String {
    start_error_with(seeds, |_| {}).await
}

/// Why a server on `seeds`, configured by `configure`, did not start.
pub(crate) async fn start_error_with(
    seeds: Vec<String>,
    configure: impl FnOnce(&mut Config),
) -> String {
    let directory = tempfile::tempdir().expect("a directory");
    let mut config = Config {
        data_dir: directory.path().join("db"),
        erasure_ledger_path: directory.path().join("erasures.jsonl"),
        ..Config::default()
    };
    config.auth.mode = featurestore_server::config::AuthMode::Disabled;
    config.storage.backend = Backend::RedisCluster;
    config.storage.redis_cluster.seeds = seeds;
    config.storage.redis_cluster.connect_timeout = std::time::Duration::from_millis(500);
    config.observability.metrics_enabled = false;
    configure(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let result = featurestore_server::run_with_clock(
        featurestore_server::Listeners {
            grpc: listener,
            metrics: None,
        },
        config,
        std::sync::Arc::new(featurestore_server::clock::SystemClock),
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    format!("{:#}", result.expect_err("the server does not start"))
}

/// A `redis-server` without cluster mode, killed when dropped.
struct Standalone {
    port: u16,
    process: std::process::Child,
}

impl Standalone {
    fn start() -> Standalone {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a port")
            .local_addr()
            .expect("address")
            .port();
        let process = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server");
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < std::time::Duration::from_secs(10));
            std::thread::yield_now();
        }
        Standalone { port, process }
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

#[tokio::test]
async fn a_tighter_bundle_purges_what_it_forbids_across_the_cluster() {
    let bundle = tempfile::tempdir().expect("a directory");
    let bundle_path = bundle.path().join("bundle.toml");
    std::fs::write(&bundle_path, DEFAULT_BUNDLE_TOML).expect("write the bundle");
    let cluster = cluster::shared();
    let server = TestServer::start_with(tempfile::tempdir().expect("a directory"), |config| {
        on_cluster(config, cluster, None);
        config.policy_bundle_path = Some(bundle_path.clone());
    })
    .await;
    let users: Vec<u64> = (1..=12).collect();
    server.us_adults(users.iter().copied()).await;
    let rows = users
        .iter()
        .map(|&user| {
            row(
                user,
                &["facebook_feed"],
                at(-60),
                vec![("interest_hiking", Value::Float(0.5))],
            )
        })
        .collect();
    server
        .client
        .write_features(write("before", rows))
        .await
        .expect("write");
    let keys: Vec<(u64, &str)> = users.iter().map(|&user| (user, "facebook_feed")).collect();
    let present = |response: &featurestore::proto::GetFeaturesResponse| {
        (0..keys.len())
            .filter(|&index| status(response, index, "interest_hiking") == ValueStatus::Present)
            .count()
    };
    let response = server
        .client
        .get_features(read(&keys, &["interest_hiking"]))
        .await
        .expect("read");
    assert_eq!(present(&response), users.len());

    // The US joins the regions where AI-derived signals are excluded.
    std::fs::write(
        &bundle_path,
        DEFAULT_BUNDLE_TOML.replace("uk = [\"GB\"]", "uk = [\"GB\", \"US\"]"),
    )
    .expect("write the bundle");
    server.client.reload_policy().await.expect("reload");
    let finished = server.wait_for_purge().await;
    assert_eq!(
        finished.purge_users_done,
        users.len() as u64,
        "{finished:?}"
    );
    assert_eq!(
        finished.purge_values_removed,
        users.len() as u64,
        "{finished:?}"
    );
    let response = server
        .client
        .get_features(read(&keys, &["interest_hiking"]))
        .await
        .expect("read");
    assert_eq!(
        present(&response),
        0,
        "every user's AI-derived value is purged"
    );
    server.stop().await;
}
