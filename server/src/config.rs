//! Server configuration: a TOML file, overridden by environment variables and flags (see
//! `main.rs`), with an embedded default for every setting. Every limit is explicit here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use featurestore::RequestLimits;
use serde::{Deserialize, Serialize};

/// Everything the server needs to run.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen_address: SocketAddr,
    /// Directory holding the RocksDB database; created when missing.
    pub data_dir: PathBuf,
    /// Feature registry file; the embedded default registry when absent.
    pub registry_path: Option<PathBuf>,
    /// Policy bundle file; the embedded default bundle when absent.
    pub policy_bundle_path: Option<PathBuf>,
    /// Whether each write is synced to disk before it is acknowledged.
    pub durability: Durability,
    /// The erasure ledger: receipts of every erasure, kept outside the database so that
    /// restoring a backup never brings an erased user back. On a Redis Cluster the ledger
    /// lives in the cluster, where every server sees it, and this path is not used.
    pub erasure_ledger_path: PathBuf,
    /// Where `Admin.CreateBackup` writes backups.
    pub backup_dir: PathBuf,
    /// How often the retention sweep removes expired values from disk; zero disables it.
    #[serde(with = "humantime_serde")]
    pub retention_sweep_interval: Duration,
    /// How long a write's idempotency key is remembered.
    #[serde(with = "humantime_serde")]
    pub idempotency_window: Duration,
    /// How far past the server's clock a row's interaction time may be (producers' clocks
    /// run a little ahead); values of later interactions are refused with
    /// INTERACTION_TIME_IN_FUTURE, so that no value can win event-time order in advance.
    #[serde(with = "humantime_serde")]
    pub interaction_time_skew_allowance: Duration,
    /// Who may call, and with which roles.
    pub auth: AuthConfig,
    /// TLS, and mutual TLS when `client_ca_path` is set; plaintext when absent.
    pub tls: Option<TlsConfig>,
    pub limits: Limits,
    pub storage: StorageConfig,
    pub bulk_load: BulkLoadConfig,
    pub observability: ObservabilityConfig,
}

/// The default of [`Config::interaction_time_skew_allowance`]: five minutes.
pub const DEFAULT_INTERACTION_TIME_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

impl Default for Config {
    fn default() -> Self {
        Config {
            listen_address: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from("featurestore-data"),
            registry_path: None,
            policy_bundle_path: None,
            durability: Durability::Sync,
            erasure_ledger_path: PathBuf::from("featurestore-erasures.jsonl"),
            backup_dir: PathBuf::from("featurestore-backups"),
            retention_sweep_interval: Duration::from_secs(24 * 60 * 60),
            idempotency_window: Duration::from_secs(24 * 60 * 60),
            interaction_time_skew_allowance: DEFAULT_INTERACTION_TIME_SKEW_ALLOWANCE,
            auth: AuthConfig::default(),
            tls: None,
            limits: Limits::default(),
            storage: StorageConfig::default(),
            bulk_load: BulkLoadConfig::default(),
            observability: ObservabilityConfig::default(),
        }
    }
}

impl Config {
    /// Reads a TOML configuration file; unset settings keep their defaults.
    pub fn from_toml_file(path: &std::path::Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            anyhow::anyhow!("cannot read config file {}: {error}", path.display())
        })?;
        Self::from_toml(&text)
            .map_err(|error| anyhow::anyhow!("config file {}: {error}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// The configuration as TOML, for operators to read (`Admin.GetStats`): token hashes
    /// are masked.
    pub fn shown(&self) -> anyhow::Result<String> {
        let mut shown = self.clone();
        for principal in &mut shown.auth.principals {
            for hash in &mut principal.token_sha256 {
                *hash = "(masked)".to_string();
            }
        }
        Ok(toml::to_string(&shown)?)
    }
}

/// When a write is acknowledged relative to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// The write-ahead log is synced before the answer: an acknowledged write survives a
    /// power loss. The default.
    Sync,
    /// The write-ahead log is written but not synced: an acknowledged write survives a
    /// process crash but may be lost with the machine.
    Buffered,
}

/// The server's TLS certificate, and the authority its clients' certificates must be
/// signed by for mutual TLS.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM).
    pub certificate_path: PathBuf,
    /// The server's private key (PEM).
    pub key_path: PathBuf,
    /// Certificate authority (PEM) of client certificates. When set, clients must present
    /// a certificate it signed (mutual TLS), which can also identify their principal.
    #[serde(default)]
    pub client_ca_path: Option<PathBuf>,
    /// With `client_ca_path`: let clients without a certificate connect too (they then
    /// authenticate with a bearer token).
    #[serde(default)]
    pub client_certificate_optional: bool,
    /// Longest a TLS handshake may take.
    #[serde(with = "humantime_serde", default = "default_handshake_timeout")]
    pub handshake_timeout: Duration,
    /// How often the certificate, key and client authority files are checked for a change;
    /// a changed set that loads is used for every later connection, without a restart.
    /// Zero turns the check off.
    #[serde(with = "humantime_serde", default = "default_reload_interval")]
    pub reload_interval: Duration,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(60)
}

/// Limits on requests and on the server's work. Every one has a default.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most keys in one read.
    pub read_keys_max: usize,
    /// Most feature names in one read's selection.
    pub read_features_max: usize,
    /// Most rows in one write.
    pub write_rows_max: usize,
    /// Most feature values in one write row.
    pub features_per_row_max: usize,
    /// Most rows in one chunk of a bulk load.
    pub load_chunk_rows_max: usize,
    /// Largest request message the server decodes, in bytes.
    pub decode_message_bytes_max: usize,
    /// Largest response message the server encodes, in bytes.
    pub encode_message_bytes_max: usize,
    /// Bytes of request messages the server holds at once, server-wide, from before a
    /// message is buffered until its call's response is sent; each message is charged
    /// twice its size (its bytes and what they decode into). A message that does not fit
    /// is refused at once with RESOURCE_EXHAUSTED. Unset: a quarter of the machine's
    /// memory. Must hold at least one message of `decode_message_bytes_max`.
    pub request_bytes_in_flight_max: Option<usize>,
    /// Requests doing work at once, server-wide; more are refused with RESOURCE_EXHAUSTED
    /// rather than queued.
    pub concurrent_requests_max: usize,
    /// Reads of at most this many keys run on the request's own task rather than on the
    /// blocking pool: from the block cache they take tens of microseconds, less than the
    /// hop to another thread and back. 0 sends every read to the pool; on a Redis Cluster
    /// every read goes to the pool.
    pub inline_read_keys_max: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub concurrent_streams_per_connection_max: u32,
    /// Connections open at once. At the limit a new connection closes the one idle for
    /// longest, or is closed itself when none is idle. Lowered at start to what the
    /// process's descriptor limit (raised to its hard limit) leaves once
    /// `storage.max_open_files` and a reserve of 128 are set aside.
    pub connections_max: usize,
    /// How long a new connection may take to send the HTTP/2 preface (after its TLS
    /// handshake); a silent one is closed.
    #[serde(with = "humantime_serde")]
    pub connection_preface_timeout: Duration,
    /// How long a connection may stay without a call before it is closed.
    #[serde(with = "humantime_serde")]
    pub connection_idle_timeout: Duration,
    /// Streams a client may open and reset before the server accepts them, per
    /// connection; more close the connection (the "rapid reset" flood).
    pub pending_accept_reset_streams_max: usize,
    /// Streams the server may have to reset because of a client's protocol errors, per
    /// connection; more close the connection.
    pub local_error_reset_streams_max: usize,
    /// Longest a request may run; a caller's shorter gRPC deadline wins.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings to idle connections.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Time in-flight requests get to finish at shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        let request = RequestLimits::default();
        Limits {
            read_keys_max: request.read_keys_max,
            read_features_max: request.read_features_max,
            write_rows_max: request.write_rows_max,
            features_per_row_max: request.features_per_row_max,
            load_chunk_rows_max: request.load_chunk_rows_max,
            decode_message_bytes_max: 16 * 1024 * 1024,
            encode_message_bytes_max: 64 * 1024 * 1024,
            request_bytes_in_flight_max: None,
            concurrent_requests_max: 256,
            inline_read_keys_max: 8,
            concurrent_streams_per_connection_max: 256,
            connections_max: 10_000,
            connection_preface_timeout: Duration::from_secs(10),
            connection_idle_timeout: Duration::from_secs(5 * 60),
            pending_accept_reset_streams_max: 20,
            local_error_reset_streams_max: 1024,
            request_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// The memory budget of requests in flight, in bytes: `request_bytes_in_flight_max`,
    /// or a quarter of the machine's memory (1 GiB when it cannot be read). Refused when it
    /// cannot hold one message of the largest size.
    pub fn request_bytes_in_flight(&self) -> anyhow::Result<usize> {
        let budget = match self.request_bytes_in_flight_max {
            Some(budget) => budget,
            None => physical_memory_bytes().map_or(1 << 30, |memory| memory / 4),
        };
        let largest = 2 * (self.decode_message_bytes_max + 5);
        anyhow::ensure!(
            budget >= largest,
            "limits.request_bytes_in_flight_max = {budget} cannot hold one message of \
             decode_message_bytes_max = {} (it needs {largest}: a message is charged twice \
             its size)",
            self.decode_message_bytes_max
        );
        Ok(budget)
    }

    /// The limits that request parsing enforces.
    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            read_keys_max: self.read_keys_max,
            read_features_max: self.read_features_max,
            write_rows_max: self.write_rows_max,
            features_per_row_max: self.features_per_row_max,
            load_chunk_rows_max: self.load_chunk_rows_max,
        }
    }
}

/// The machine's memory, from `/proc/meminfo` (Linux); `None` elsewhere.
fn physical_memory_bytes() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kilobytes: usize = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kilobytes.checked_mul(1024)
}

/// The storage engine and the settings operators tune.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Where the features live: `rocksdb` (embedded, in `data_dir`) or `redis_cluster`
    /// (a Redis Cluster shared by any number of servers; `[storage.redis_cluster]`).
    pub backend: Backend,
    /// The Redis Cluster, when `backend = "redis_cluster"`.
    pub redis_cluster: RedisClusterConfig,
    /// Size of the shared block cache, in bytes.
    pub block_cache_bytes: usize,
    /// Size of the row cache in front of RocksDB, in bytes (0 turns it off): rows read
    /// recently, served without a lookup in the engine. Every change of a user drops its
    /// rows; what a read serves is decided on cached rows exactly as on stored ones.
    pub row_cache_bytes: u64,
    /// Size of one memtable, in bytes.
    pub write_buffer_bytes: usize,
    /// Most files RocksDB keeps open (-1 for no limit).
    pub max_open_files: i32,
    /// Background flush and compaction threads.
    pub background_jobs: i32,
    /// How often the health service probes the storage engine (a small write and its
    /// read-back); while the probe fails the server reports NOT_SERVING.
    #[serde(with = "humantime_serde")]
    pub health_probe_interval: Duration,
    /// Whether RocksDB keeps statistics (block cache hits and misses, write stalls) for the
    /// metrics: counters only, a small cost per lookup.
    pub statistics: bool,
    /// Hash chains of the audit log, each holding the records of the users hashed to it
    /// (records about no single user go to chain 0): appends to different chains never
    /// wait for each other. Fixed when the database is created; a database keeps its own.
    pub audit_partitions: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: Backend::Rocksdb,
            redis_cluster: RedisClusterConfig::default(),
            block_cache_bytes: 512 * 1024 * 1024,
            row_cache_bytes: 256 * 1024 * 1024,
            write_buffer_bytes: 64 * 1024 * 1024,
            max_open_files: 4096,
            background_jobs: 2,
            health_probe_interval: Duration::from_secs(5),
            statistics: true,
            audit_partitions: 64,
        }
    }
}

/// The storage engines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// RocksDB embedded in the server, in `data_dir`.
    #[default]
    Rocksdb,
    /// A Redis Cluster (Redis 7, Valkey, Kvrocks) shared by every server.
    RedisCluster,
}

/// How the server reaches its Redis Cluster.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisClusterConfig {
    /// Nodes to learn the cluster from (`redis://host:port`, or `rediss://host:port` for
    /// TLS); any reachable one is enough.
    pub seeds: Vec<String>,
    /// With `rediss://` seeds: the certificate authority (PEM) the nodes' certificates are
    /// checked against; unset, the system's trusted roots.
    pub tls_ca_file: Option<PathBuf>,
    /// With `rediss://` seeds, when the nodes require client certificates: this server's
    /// certificate and key (PEM).
    pub tls_client_certificate_file: Option<PathBuf>,
    pub tls_client_key_file: Option<PathBuf>,
    /// The ACL user, when the cluster has ACLs.
    pub username: Option<String>,
    /// A file holding the password of the user (or of `default`), without a newline
    /// at the end; kept out of the configuration file.
    pub password_file: Option<PathBuf>,
    /// Prefix of every key the store writes, so that several stores can share a cluster.
    pub key_prefix: String,
    /// How long to wait for a connection to a node.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long to wait for a node's answer to one command.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Replicas that must confirm a change (`WAIT`) before it is acknowledged: 0 to
    /// acknowledge once the master has it.
    pub wait_replicas: u32,
    /// How long to wait for the replicas' confirmation; a change they do not confirm in
    /// time is answered UNAVAILABLE (a retry with the same idempotency key completes it).
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// Threads driving the connections to the nodes.
    pub io_threads: usize,
    /// How long an erasure waits for the nodes holding the user to rewrite their
    /// persistence files (append-only file or snapshot) without the user; past it the
    /// erasure fails, stays pending and is applied again.
    #[serde(with = "humantime_serde")]
    pub erasure_rewrite_timeout: Duration,
}

impl Default for RedisClusterConfig {
    fn default() -> Self {
        RedisClusterConfig {
            seeds: vec!["redis://127.0.0.1:7000".to_string()],
            tls_ca_file: None,
            tls_client_certificate_file: None,
            tls_client_key_file: None,
            username: None,
            password_file: None,
            key_prefix: "fs".to_string(),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            wait_replicas: 1,
            wait_timeout: Duration::from_secs(1),
            io_threads: 2,
            erasure_rewrite_timeout: Duration::from_secs(60),
        }
    }
}

/// Metrics, request logs and the Stats call.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObservabilityConfig {
    /// Whether the server counts requests, reads, writes and loads and serves them to
    /// Prometheus at `http://<metrics_listen_address>/metrics`.
    pub metrics_enabled: bool,
    /// Address of the metrics endpoint (plain HTTP, no authentication: it holds no user
    /// data, and its labels are bounded sets such as methods, codes, surfaces and reasons).
    pub metrics_listen_address: SocketAddr,
    /// A request that takes longer than this is logged at WARN with its id, method, code
    /// and time.
    #[serde(with = "humantime_serde")]
    pub slow_request_threshold: Duration,
    /// Rows `Admin.GetStats` reads to count rows and bytes per surface: all of them when
    /// there are no more, else a sample of this many spread over the users, scaled.
    pub stats_rows_sampled: usize,
}

impl Default for ObservabilityConfig {
    fn default() -> Self {
        ObservabilityConfig {
            metrics_enabled: true,
            metrics_listen_address: SocketAddr::from(([127, 0, 0, 1], 9464)),
            slow_request_threshold: Duration::from_secs(1),
            stats_rows_sampled: 100_000,
        }
    }
}

/// Bulk loads (the Backfill service).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BulkLoadConfig {
    /// Where the chunks of open jobs are staged until their commit; one directory per job.
    pub staging_dir: PathBuf,
    /// Jobs with at least this many staged storage rows are applied by ingesting sorted
    /// table files; smaller ones by one ordinary atomic write (ingesting many tiny files
    /// would slow reads down until compaction).
    pub ingest_rows_min: u64,
    /// Largest table file a commit writes before starting another, in bytes.
    pub table_file_bytes_max: u64,
    /// Chunks decided at once, server-wide, over every bulk load: the rest wait, so that
    /// loads leave CPU to the reads they run beside.
    pub chunks_decided_at_once: usize,
    /// Open jobs that receive no chunk for this long are aborted by the retention sweep,
    /// so that staged rows of abandoned jobs do not stay on disk.
    #[serde(with = "humantime_serde")]
    pub abandoned_after: Duration,
    /// Records of committed and aborted jobs are kept this long (a re-run of a committed
    /// job within it sends nothing), then forgotten by the retention sweep.
    #[serde(with = "humantime_serde")]
    pub finished_jobs_kept: Duration,
}

impl Default for BulkLoadConfig {
    fn default() -> Self {
        BulkLoadConfig {
            staging_dir: PathBuf::from("featurestore-staging"),
            ingest_rows_min: 10_000,
            table_file_bytes_max: 256 * 1024 * 1024,
            chunks_decided_at_once: 1,
            abandoned_after: Duration::from_secs(7 * 24 * 60 * 60),
            finished_jobs_kept: Duration::from_secs(30 * 24 * 60 * 60),
        }
    }
}

/// How callers are authenticated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Every call but health checks needs a configured principal. The default.
    #[default]
    Required,
    /// No authentication: every caller may do everything. For a development machine only;
    /// the server logs a warning at start.
    Disabled,
}

/// The `[auth]` section of the config.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    pub principals: Vec<PrincipalConfig>,
}

/// One caller and its roles, as configured.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalConfig {
    /// Shown in logs and errors.
    pub name: String,
    /// SHA-256 (hex) of each bearer token this principal may present; several allow a
    /// rotation without downtime. `featurestore-server new-token` makes a token and its hash.
    #[serde(default)]
    pub token_sha256: Vec<String>,
    /// Names of its client certificate, over mutual TLS: the subject's common name, or a
    /// DNS or URI subject alternative name.
    #[serde(default)]
    pub certificate_names: Vec<String>,
    /// Reader role: the surfaces it may read ("*" for all).
    #[serde(default)]
    pub read_surfaces: Vec<String>,
    /// Writer role: the sources it may write values of ("*" for all); writes, explains and
    /// bulk loads.
    #[serde(default)]
    pub write_sources: Vec<String>,
    /// The producer ids its writes may state; empty for any.
    #[serde(default)]
    pub write_producers: Vec<String>,
    /// Privacy role: user states, audit trails, erasure.
    #[serde(default)]
    pub privacy: bool,
    /// Admin role: policy reload, audit-log verification, sweep, backup.
    #[serde(default)]
    pub admin: bool,
}

impl PrincipalConfig {
    /// A principal with no credential and no role yet.
    pub fn named(name: &str) -> PrincipalConfig {
        PrincipalConfig {
            name: name.to_string(),
            token_sha256: Vec::new(),
            certificate_names: Vec::new(),
            read_surfaces: Vec::new(),
            write_sources: Vec::new(),
            write_producers: Vec::new(),
            privacy: false,
            admin: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_reference_file_states_the_defaults() {
        let reference = include_str!("../../config/featurestore.toml");
        let parsed = Config::from_toml(reference).expect("the reference file parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn the_redis_cluster_example_runs_on_the_local_cluster() {
        let example = include_str!("../../config/redis-cluster.toml");
        let parsed = Config::from_toml(example).expect("the example parses");
        assert_eq!(parsed.storage.backend, Backend::RedisCluster);
        assert_eq!(
            parsed.storage.redis_cluster.seeds[0], "redis://127.0.0.1:7000",
            "the first node ./dev cluster starts"
        );
        assert_eq!(parsed.auth.mode, AuthMode::Disabled);
    }

    #[test]
    fn unknown_settings_are_refused_by_name() {
        let error =
            Config::from_toml("[limits]\nread_keys_maximum = 5\n").expect_err("a typo is refused");
        assert!(error.to_string().contains("read_keys_maximum"), "{error}");
    }
}
