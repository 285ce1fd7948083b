//! The server reaches its cluster over TLS (`rediss://` seeds), checking the nodes'
//! certificates against the configured authority: a cluster of one TLS node holding every
//! slot serves reads and writes; without the authority, or in plain text, the server
//! refuses to start.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use featurestore::domain::Value;
use featurestore::proto::ValueStatus;
use featurestore_server::config::Backend;
use featurestore_tests::pki::TestAuthority;
use featurestore_tests::{TestServer, at, poll_every, read, row, write};

use crate::redis_server::start_error_with;
use crate::status;

/// One `redis-server` in cluster mode that speaks only TLS, holding every slot; killed
/// when dropped.
struct TlsNode {
    port: u16,
    ca: std::path::PathBuf,
    process: Child,
}

impl TlsNode {
    async fn start(directory: &std::path::Path, authority: &TestAuthority) -> TlsNode {
        let certificate = authority.server();
        let port = loop {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
            let port = listener.local_addr().expect("address").port();
            if port
                .checked_add(10_000)
                .is_some_and(|bus| std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok())
            {
                break port;
            }
        };
        let process = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--tls-cert-file")
            .arg(&certificate.certificate)
            .arg("--tls-key-file")
            .arg(&certificate.key)
            .arg("--tls-ca-cert-file")
            .arg(authority.certificate_path())
            .args(["--tls-auth-clients", "no", "--tls-cluster", "yes"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .arg("--dir")
            .arg(directory)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        let node = TlsNode {
            port,
            ca: authority.certificate_path(),
            process,
        };
        let started = Instant::now();
        let mut ticks = poll_every(Duration::from_millis(20));
        while node.cli(&["ping"]).as_deref() != Some("PONG") {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the TLS node did not answer"
            );
            ticks.tick().await;
        }
        assert_eq!(
            node.cli(&["cluster", "addslotsrange", "0", "16383"])
                .as_deref(),
            Some("OK")
        );
        while !node
            .cli(&["cluster", "info"])
            .is_some_and(|info| info.contains("cluster_state:ok"))
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the TLS node is not ok"
            );
            ticks.tick().await;
        }
        node
    }

    fn cli(&self, args: &[&str]) -> Option<String> {
        let output = Command::new("redis-cli")
            .args(["--tls", "--cacert"])
            .arg(&self.ca)
            .args(["-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
        (output.status.success() && !text.is_empty()).then_some(text)
    }
}

impl Drop for TlsNode {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

#[tokio::test]
async fn a_server_reaches_its_cluster_over_tls_and_checks_the_nodes_certificates() {
    let directory = tempfile::tempdir().expect("a directory");
    let authority = TestAuthority::new(directory.path(), "redis-tls");
    let node = TlsNode::start(directory.path(), &authority).await;
    let seeds = vec![format!("rediss://127.0.0.1:{}", node.port)];

    let server = TestServer::start_with(tempfile::tempdir().expect("a directory"), |config| {
        config.storage.backend = Backend::RedisCluster;
        config.storage.redis_cluster.seeds = seeds.clone();
        config.storage.redis_cluster.tls_ca_file = Some(authority.certificate_path());
        config.storage.redis_cluster.key_prefix = "tls".to_string();
        // One node, no replica to confirm.
        config.storage.redis_cluster.wait_replicas = 0;
    })
    .await;
    server.us_adults([5]).await;
    server
        .client
        .write_features(write(
            "over-tls",
            vec![row(
                5,
                &["facebook_feed"],
                at(-60),
                vec![("interest_hiking", Value::Float(0.75))],
            )],
        ))
        .await
        .expect("write");
    let response = server
        .client
        .get_features(read(&[(5, "facebook_feed")], &["interest_hiking"]))
        .await
        .expect("read");
    assert_eq!(
        status(&response, 0, "interest_hiking"),
        ValueStatus::Present
    );
    server.stop().await;

    // Without the authority the nodes' certificate is not trusted.
    let error = start_error_with(seeds.clone(), |_| {}).await;
    assert!(
        error.contains("cannot reach a Redis Cluster")
            && error.to_lowercase().contains("certificate"),
        "{error}"
    );
    // In plain text the TLS port answers nothing the server can use.
    let error = start_error_with(vec![format!("redis://127.0.0.1:{}", node.port)], |_| {}).await;
    assert!(error.contains("cannot reach a Redis Cluster"), "{error}");
}
