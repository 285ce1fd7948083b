//! Test support: starts the real server on a loopback port with a temporary RocksDB
//! directory and a manual clock, and hands out a real client connected to it.

pub mod cluster;
pub mod pki;
pub mod workload;

use std::sync::Arc;
use std::time::Duration;

use featurestore::domain::{
    AgeBand, FeatureWrite, Provenance, ReadKey, ReadRequest, Timestamp, UserStateUpdate, Value,
    WriteRequest, WriteRow,
};
use featurestore_client::{Client, ClientOptions};
use featurestore_server::clock::ManualClock;
use featurestore_server::config::{Config, Durability};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The config of a server run in a child process on `directory` (see [`ChildServer`]).
pub fn child_config(directory: &std::path::Path) -> Config {
    let mut config = Config {
        data_dir: directory.join("db"),
        erasure_ledger_path: directory.join("erasures.jsonl"),
        backup_dir: directory.join("backups"),
        ..Config::default()
    };
    config.auth.mode = featurestore_server::config::AuthMode::Disabled;
    config.bulk_load.staging_dir = directory.join("staging");
    config.storage.block_cache_bytes = 8 * 1024 * 1024;
    config
}

/// Runs the server in this process until it is killed, or until SIGTERM shuts it down as
/// the server binary does, with `config`, publishing its address in `directory/address`
/// once it listens: the body of a [`ChildServer`].
pub fn serve_in_child(directory: &std::path::Path, config: Config) {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let terminate = shutdown.clone();
        let mut terminated =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("listen for SIGTERM");
        tokio::spawn(async move {
            terminated.recv().await;
            terminate.cancel();
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        // Published once the listener exists, by a rename so that the test never reads half.
        let published = directory.join("address.tmp");
        std::fs::write(&published, address.to_string()).expect("write the address");
        std::fs::rename(&published, directory.join("address")).expect("publish the address");
        featurestore_server::run(listener, config, shutdown)
            .await
            .expect("the server runs until it is killed or terminated");
    });
}

/// A server in a child process: this test binary again, running the ignored test `test`
/// (which calls [`serve_in_child`]) with `directory` in the environment variable
/// `variable`, its output going to `log`.
#[derive(Debug)]
pub struct ChildServer {
    child: std::process::Child,
}

impl ChildServer {
    pub fn start(
        test: &str,
        variable: &str,
        directory: &std::path::Path,
        log: std::fs::File,
        environment: &[(&str, &str)],
    ) -> ChildServer {
        let _ = std::fs::remove_file(directory.join("address"));
        let child = std::process::Command::new(std::env::current_exe().expect("this test binary"))
            .args(["--exact", test, "--ignored", "--nocapture"])
            .env(variable, directory)
            .envs(environment.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the server process");
        ChildServer { child }
    }

    /// The server's endpoint once it serves, or None if it exited first.
    pub async fn endpoint(&mut self, directory: &std::path::Path) -> Option<String> {
        let started = std::time::Instant::now();
        let mut ticks = poll_every(Duration::from_millis(10));
        loop {
            if let Ok(address) = std::fs::read_to_string(directory.join("address")) {
                let endpoint = format!("http://{address}");
                until_serving(&endpoint, || self.child.try_wait().ok().flatten().is_some()).await;
                return Some(endpoint);
            }
            if self.child.try_wait().expect("poll the server").is_some() {
                return None;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the server did not start within two minutes"
            );
            ticks.tick().await;
        }
    }

    /// The process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, as a service manager stops the server; returns how long it took to exit
    /// and whether it exited successfully.
    pub fn terminate(mut self) -> (Duration, bool) {
        let started = std::time::Instant::now();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let status = self.child.wait().expect("wait for the server");
        (started.elapsed(), status.success())
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(mut self) {
        self.child.kill().expect("kill the server");
        self.child.wait().expect("reap the server");
    }
}

/// A listener on a free loopback port.
fn loopback_listener() -> tokio::net::TcpListener {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    tokio::net::TcpListener::from_std(listener).expect("a tokio listener")
}

/// The user-state generation after a user's state was set once: what [`row`] states.
pub const FIRST_GENERATION: u64 = 1;

/// 2026-01-15T00:00:00Z: after the policy's effective date, so AI signals are usable.
pub const START_TIME: Timestamp = Timestamp::from_unix_micros(1_768_435_200_000_000);

/// A running server and a client of it.
#[derive(Debug)]
pub struct TestServer {
    pub endpoint: String,
    /// The metrics endpoint's URL (`http://127.0.0.1:<port>/metrics`).
    pub metrics_url: String,
    pub client: Client,
    /// The server's clock; move it to make values expire.
    pub clock: Arc<ManualClock>,
    pub config: Config,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    data_dir: TempDir,
}

impl TestServer {
    /// Starts a server with default settings on a fresh directory.
    pub async fn start() -> TestServer {
        Self::start_with(
            tempfile::tempdir().expect("create a temporary directory"),
            |_| {},
        )
        .await
    }

    /// Starts a server on `data_dir` after `configure` adjusts the default test config, and
    /// waits until it serves.
    pub async fn start_with(data_dir: TempDir, configure: impl FnOnce(&mut Config)) -> TestServer {
        let server = Self::launch(data_dir, configure);
        until_serving(&server.endpoint, || server.task.is_finished()).await;
        if server.task.is_finished() {
            let ended = server.task.await;
            panic!("the server did not start: {ended:?}");
        }
        server
    }

    /// Starts a server with default settings and returns at once, while it starts.
    pub fn launch_default() -> TestServer {
        Self::launch(
            tempfile::tempdir().expect("create a temporary directory"),
            |_| {},
        )
    }

    fn launch(data_dir: TempDir, configure: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config {
            data_dir: data_dir.path().join("db"),
            erasure_ledger_path: data_dir.path().join("erasures.jsonl"),
            backup_dir: data_dir.path().join("backups"),
            durability: Durability::Buffered,
            ..Config::default()
        };
        // Most tests are about other things than authentication; `auth.rs` turns it on.
        config.auth.mode = featurestore_server::config::AuthMode::Disabled;
        config.storage.block_cache_bytes = 8 * 1024 * 1024;
        config.bulk_load.staging_dir = data_dir.path().join("staging");
        configure(&mut config);
        let listener = loopback_listener();
        let endpoint = format!("http://{}", listener.local_addr().expect("bound address"));
        let metrics = loopback_listener();
        let metrics_url = format!(
            "http://{}/metrics",
            metrics.local_addr().expect("bound address")
        );
        let clock = Arc::new(ManualClock::new(START_TIME));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(featurestore_server::run_with_clock(
            featurestore_server::Listeners {
                grpc: listener,
                metrics: Some(metrics),
            },
            config.clone(),
            Arc::clone(&clock) as Arc<dyn featurestore_server::clock::Clock>,
            shutdown.clone(),
        ));
        let client = Client::connect(&endpoint, ClientOptions::default()).expect("valid endpoint");
        TestServer {
            endpoint,
            metrics_url,
            client,
            clock,
            config,
            shutdown,
            task,
            data_dir,
        }
    }

    /// Scrapes the metrics endpoint as Prometheus does (HTTP/1.1 GET) and returns the
    /// Prometheus text, after checking the status and content type.
    pub async fn scrape(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = self
            .metrics_url
            .trim_start_matches("http://")
            .trim_end_matches("/metrics");
        let mut connection = tokio::net::TcpStream::connect(address)
            .await
            .expect("the metrics endpoint accepts connections");
        connection
            .write_all(
                format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("send the scrape");
        let mut response = String::new();
        connection
            .read_to_string(&mut response)
            .await
            .expect("read the scrape");
        let (head, body) = response
            .split_once("\r\n\r\n")
            .expect("an HTTP response with a body");
        let mut lines = head.lines();
        assert_eq!(
            lines.next(),
            Some("HTTP/1.1 200 OK"),
            "scrape answer: {head}"
        );
        let header = |name: &str| {
            head.lines()
                .filter_map(|line| line.split_once(':'))
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.trim().to_string())
        };
        assert_eq!(
            header("content-type").as_deref(),
            Some("text/plain; version=0.0.4; charset=utf-8"),
            "the Prometheus text format"
        );
        assert_eq!(
            header("content-length").and_then(|length| length.parse().ok()),
            Some(body.len()),
            "the whole body (not chunked)"
        );
        body.to_string()
    }

    /// Stops the server gracefully, checks that it shut down cleanly, and returns its
    /// directory so a new server can start on it.
    pub async fn stop(self) -> TempDir {
        self.shutdown.cancel();
        self.task
            .await
            .expect("server task did not panic")
            .expect("server shut down cleanly");
        self.data_dir
    }

    /// A client with other options.
    pub fn client_with(&self, options: ClientOptions) -> Client {
        Client::connect(&self.endpoint, options).expect("valid endpoint")
    }

    /// Writes one float feature of one user on one surface, expecting success.
    pub async fn write_float(
        &self,
        idempotency_key: &str,
        user_id: u64,
        surface: &str,
        interaction_time: Timestamp,
        feature: &str,
        value: f32,
    ) -> featurestore::proto::WriteFeaturesResponse {
        let rows = vec![row(
            user_id,
            &[surface],
            interaction_time,
            vec![(feature, Value::Float(value))],
        )];
        self.client
            .write_features(write(idempotency_key, rows))
            .await
            .expect("the write succeeds")
    }

    /// Makes `users` adults in the US (outside every excluded region) whose Facebook and
    /// Instagram accounts are linked: people the policy lets every signal through for.
    /// Their state generation becomes [`FIRST_GENERATION`].
    pub async fn us_adults(&self, users: impl IntoIterator<Item = u64>) {
        for user_id in users {
            let state = self
                .client
                .set_user_state(us_adult(user_id))
                .await
                .expect("set the user state");
            assert_eq!(
                state.generation, FIRST_GENERATION,
                "user {user_id} had no state before"
            );
        }
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// Waits until no purge re-validates stored values (at most 30 s); returns the
    /// policy's status then.
    pub async fn wait_for_purge(&self) -> featurestore::proto::PolicyStatus {
        let started = std::time::Instant::now();
        let mut ticks = poll_every(Duration::from_millis(10));
        loop {
            let status = self
                .client
                .policy_status()
                .await
                .expect("the policy's status");
            if !status.purge_running {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the purge did not finish within 30 s"
            );
            ticks.tick().await;
        }
    }
}

/// Waits until the server at `endpoint` says SERVING in its health check (the port
/// answers from the start, NOT_SERVING while the database opens), or `ended` says the
/// server is gone (the test sees why when it stops it), or a minute passed. Over TLS a
/// plaintext check learns nothing, and returns at once.
pub async fn until_serving(endpoint: &str, mut ended: impl FnMut() -> bool) {
    use tonic_health::pb::health_check_response::ServingStatus;
    let started = std::time::Instant::now();
    let mut ticks = poll_every(Duration::from_millis(10));
    while !ended() && started.elapsed() < Duration::from_secs(60) {
        let Ok(endpoint) = tonic::transport::Endpoint::from_shared(endpoint.to_string()) else {
            return;
        };
        let answer = match endpoint.connect().await {
            Ok(channel) => tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|answer| answer.into_inner().status()),
            Err(_) => return,
        };
        match answer {
            Ok(ServingStatus::Serving) => return,
            // Plaintext to a TLS server: nothing to learn here.
            Err(status) if status.code() == tonic::Code::Unknown => return,
            _ => {
                ticks.tick().await;
            }
        }
    }
}

/// An adult in the US (outside every excluded region) whose Facebook and Instagram
/// accounts are linked: a person the policy lets every signal through for.
pub fn us_adult(user_id: u64) -> UserStateUpdate {
    UserStateUpdate {
        user_id,
        jurisdiction: "US".to_string(),
        age_band: AgeBand::Adult,
        linked_apps: vec!["facebook".to_string(), "instagram".to_string()],
        ads_objection: false,
        expected_generation: None,
    }
}

/// A row of `features` for `user_id` on `surfaces`, from AI chat on Facebook, with the given
/// interaction time, made after seeing the user's [`FIRST_GENERATION`] state.
pub fn row(
    user_id: u64,
    surfaces: &[&str],
    interaction_time: Timestamp,
    features: Vec<(&str, Value)>,
) -> WriteRow {
    WriteRow {
        user_id,
        target_surfaces: surfaces.iter().map(|surface| surface.to_string()).collect(),
        provenance: Provenance {
            source: "ai_chat".to_string(),
            origin_app: "facebook".to_string(),
            interaction_time,
            producer_id: "tests@v1".to_string(),
            microphone_permission_granted: false,
        },
        features: features
            .into_iter()
            .map(|(name, value)| FeatureWrite {
                name: name.to_string(),
                value,
                topic: None,
                ttl: None,
            })
            .collect(),
        user_state_generation: FIRST_GENERATION,
    }
}

pub fn write(idempotency_key: &str, rows: Vec<WriteRow>) -> WriteRequest {
    WriteRequest {
        idempotency_key: idempotency_key.to_string(),
        rows,
    }
}

pub fn read(keys: &[(u64, &str)], features: &[&str]) -> ReadRequest {
    ReadRequest {
        keys: keys
            .iter()
            .map(|&(user_id, surface)| ReadKey {
                user_id,
                surface: surface.to_string(),
            })
            .collect(),
        features: features.iter().map(|name| name.to_string()).collect(),
        include_event_times: true,
    }
}

/// `START_TIME` plus `seconds`.
pub fn at(seconds: i64) -> Timestamp {
    Timestamp::from_unix_micros(START_TIME.unix_micros() + seconds * 1_000_000)
}

/// Opens a stopped server's RocksDB directly, to change it behind the server's back.
pub fn open_database_directly(data_dir: &TempDir) -> rocksdb::DB {
    rocksdb::DB::open_cf(
        &rocksdb::Options::default(),
        data_dir.path().join("db"),
        featurestore_server::storage::COLUMN_FAMILIES,
    )
    .expect("open the server's database")
}

/// The files under `directory` (recursively) whose bytes contain `needle`.
pub fn files_containing(directory: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![directory.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|window| window == needle)
            {
                found.push(path);
            }
        }
    }
    found
}

/// The files under `directory` that still contain `needle` after up to two seconds:
/// RocksDB deletes obsolete files right after a flush or compaction, not always before the
/// call that caused it returns.
pub async fn files_still_containing(
    directory: &std::path::Path,
    needle: &[u8],
) -> Vec<std::path::PathBuf> {
    let mut left = files_containing(directory, needle);
    let mut ticks = poll_every(Duration::from_millis(20));
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        ticks.tick().await;
        left = files_containing(directory, needle);
    }
    left
}

/// Paces a loop that waits for an effect the test cannot be told of (a server starting, a
/// purge finishing, a file leaving the disk): the loop checks, and awaits the next tick
/// before it checks again. Every such loop also has a deadline that fails the test.
pub fn poll_every(period: Duration) -> tokio::time::Interval {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

/// A deliberate delay between the actions of a stress or crash test, to vary how they
/// interleave; never a wait for an effect (see [`poll_every`]). The only sleep of the
/// test suite.
pub async fn pause(duration: Duration) {
    tokio::time::sleep(duration).await;
}
