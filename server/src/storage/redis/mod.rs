//! The Redis Cluster implementation of [`Store`]: the only module that talks to Redis.
//!
//! Every key of one user, and the audit chain of the user's partition, carry the same hash
//! tag, so that they live in one hash slot ([`keys`]). Every change of a user is one
//! compare-and-set script on that slot ([`step`]): the server reads the user's version
//! (which moves with every change of the user) and the chain's tail, decides and merges in
//! Rust, and the script writes only if both are still what was read; otherwise the server
//! reads again. No guarantee rests on this process's locks: two servers changing one user
//! at once give the same result as one after the other. A change is acknowledged after
//! `wait_replicas` replicas confirmed it (`WAIT`).
//!
//! Commands used (all in Redis 7 and Valkey): GET, MGET, SET (PX), DEL, HGET, HSET,
//! HSETNX, HDEL, HGETALL, HMGET, HLEN, RPUSH, LRANGE, ZADD, ZREM, ZRANGEBYLEX, EVAL, WAIT,
//! CLUSTER INFO / KEYSLOT / NODES, CONFIG GET, INFO persistence, BGREWRITEAOF, BGSAVE
//! ([`nodes`]).

mod audit;
pub mod keys;
mod nodes;
mod stats;
mod step;
mod waves;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use featurestore::domain::{Timestamp, UserStateUpdate};
use futures_util::future::join_all;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;

use super::codec::{
    self, decode_idempotency_record, decode_row, decode_user_state, encode_row, encode_user_state,
    merge_value,
};
use super::{
    AnswerBuilder, Applied, ErasureState, IdempotencyRecord, Revalidate, RowFound, RowKey,
    StorageError, Store, StoredRow, UserState, UserWrite,
};
use crate::audit::{AuditEntry, AuditRecord, AuditReport, PARTITIONS_MAX, Pseudonym};
use crate::config::RedisClusterConfig;
use crate::registry::SurfaceId;
use audit::Tail;
use keys::{Layout, UserKeys};
use step::Step;

/// Times a change is read and decided again when another change of the same user or
/// chain came first, before the write is answered as failed.
const STEP_ATTEMPTS: usize = 64;

/// A [`Store`] on a Redis Cluster.
pub struct RedisStore {
    /// Drives the connections; calls from the server's threads wait on it.
    runtime: IoRuntime,
    /// One multiplexed connection per node, following the cluster's slots.
    connection: ClusterConnection,
    layout: Layout,
    /// Replicas that must confirm a change, and for how long to wait for them.
    wait: Option<(u32, Duration)>,
    /// How long an erasure waits for the nodes to rewrite their files.
    rewrite_timeout: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

fn engine(error: redis::RedisError) -> StorageError {
    StorageError::Engine(format!("redis: {error}"))
}

fn corrupt(what: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(what.to_string())
}

impl RedisStore {
    /// Connects to the cluster `config` names and reads (or, for a new store, records) its
    /// number of audit partitions, `partitions` unless the store has one already. Fails
    /// with a message naming the seeds when no seed answers or the nodes are not a cluster.
    pub fn open(config: &RedisClusterConfig, partitions: u32) -> Result<RedisStore, StorageError> {
        if !(1..=PARTITIONS_MAX).contains(&partitions) {
            return Err(StorageError::Engine(format!(
                "storage.audit_partitions must be 1 to {PARTITIONS_MAX}, not {partitions}"
            )));
        }
        if config.seeds.is_empty() {
            return Err(StorageError::Engine(
                "storage.redis_cluster.seeds names no node".to_string(),
            ));
        }
        let tls = config.seeds[0].starts_with("rediss://");
        let scheme = if tls { "rediss://" } else { "redis://" };
        if let Some(seed) = config.seeds.iter().find(|seed| !seed.starts_with(scheme)) {
            return Err(StorageError::Engine(format!(
                "storage.redis_cluster.seeds: {seed:?} is not a {scheme} address like the \
                 first seed (every seed is redis://, or every seed is rediss:// for TLS)"
            )));
        }
        let mut builder = ClusterClientBuilder::new(config.seeds.clone())
            .connection_timeout(config.connect_timeout)
            .response_timeout(config.response_timeout);
        if tls {
            builder = builder.certs(tls_certificates(config)?);
        } else if config.tls_ca_file.is_some() || config.tls_client_certificate_file.is_some() {
            return Err(StorageError::Engine(
                "storage.redis_cluster: TLS files are set but the seeds are redis://, not \
                 rediss://"
                    .to_string(),
            ));
        }
        if let Some(username) = &config.username {
            builder = builder.username(username);
        }
        if let Some(path) = &config.password_file {
            let password = std::fs::read_to_string(path).map_err(|error| {
                StorageError::Engine(format!(
                    "cannot read the Redis password from {}: {error}",
                    path.display()
                ))
            })?;
            builder = builder.password(password.trim_end_matches(['\r', '\n']));
        }
        let client = builder.build().map_err(engine)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.io_threads.max(1))
            .thread_name("redis-io")
            .enable_all()
            .build()
            .map_err(|error| StorageError::Engine(format!("cannot start Redis I/O: {error}")))?;
        let seeds = config.seeds.join(", ");
        let connection = runtime
            .block_on(async {
                let mut connection = client.get_async_connection().await?;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut connection)
                    .await?;
                Ok::<_, redis::RedisError>((connection, info))
            })
            .map_err(|error| {
                StorageError::Engine(format!(
                    "cannot reach a Redis Cluster at {seeds}: {error} (the nodes must run \
                     with cluster-enabled yes)"
                ))
            })?;
        let (connection, info) = connection;
        if !info.lines().any(|line| line.trim() == "cluster_state:ok") {
            return Err(StorageError::Engine(format!(
                "the Redis Cluster at {seeds} is not serving every slot (cluster_state is not ok)"
            )));
        }
        let mut store = RedisStore {
            runtime: IoRuntime(Some(runtime)),
            connection,
            layout: Layout::new(&config.key_prefix, partitions),
            wait: (config.wait_replicas > 0).then_some((config.wait_replicas, config.wait_timeout)),
            rewrite_timeout: config.erasure_rewrite_timeout,
        };
        store.check_no_eviction()?;
        let stored = store.stored_partitions(&config.key_prefix, partitions)?;
        if stored != partitions {
            tracing::warn!(
                stored,
                configured = partitions,
                "the audit log keeps the number of chains it was created with"
            );
        }
        store.layout = Layout::new(&config.key_prefix, stored);
        Ok(store)
    }

    /// The store's number of partitions, recorded as `configured` by the first server.
    fn stored_partitions(&self, prefix: &str, configured: u32) -> Result<u32, StorageError> {
        let key = Layout::settings(prefix);
        let mut connection = self.connection.clone();
        let stored: String = self.run(async move {
            redis::cmd("HSETNX")
                .arg(&key)
                .arg("audit_partitions")
                .arg(configured)
                .exec_async(&mut connection)
                .await?;
            redis::cmd("HGET")
                .arg(&key)
                .arg("audit_partitions")
                .query_async(&mut connection)
                .await
        })?;
        stored
            .parse()
            .ok()
            .filter(|stored| (1..=PARTITIONS_MAX).contains(stored))
            .ok_or_else(|| corrupt(format!("the number of audit chains is {stored:?}")))
    }

    /// Runs `work` on the connections' runtime and waits for it, from any thread: the
    /// server calls the store from its blocking pool.
    fn run<T: Send>(
        &self,
        work: impl Future<Output = redis::RedisResult<T>> + Send,
    ) -> Result<T, StorageError> {
        let work = async { work.await.map_err(engine) };
        match tokio::runtime::Handle::try_current() {
            Err(_) => self.runtime.block_on(work),
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.runtime.block_on(work))
            }
            // A single-threaded runtime cannot lend its thread: wait from another.
            Ok(_) => std::thread::scope(|scope| {
                scope
                    .spawn(|| self.runtime.block_on(work))
                    .join()
                    .unwrap_or_else(|_| {
                        Err(StorageError::Engine("a Redis call panicked".to_string()))
                    })
            }),
        }
    }

    /// Values of several groups of keys, each group in one slot: one `MGET` per group, all
    /// sent at once (the connection pipelines those to one node). Each group's answer on
    /// its own, so that a node that does not answer fails only its groups.
    #[allow(clippy::type_complexity)]
    fn get_groups(
        &self,
        groups: Vec<Vec<String>>,
    ) -> Result<Vec<redis::RedisResult<Vec<Option<Vec<u8>>>>>, StorageError> {
        let connection = self.connection.clone();
        self.run(async move {
            let reads = groups.iter().map(|names| {
                let connection = connection.clone();
                retried(move || {
                    let mut connection = connection.clone();
                    async move { mget(&mut connection, names).await }
                })
            });
            Ok(join_all(reads).await)
        })
    }

    /// Values of `keys`, all in one slot, in one command.
    fn get_many(&self, keys: Vec<String>) -> Result<Vec<Option<Vec<u8>>>, StorageError> {
        let mut connection = self.connection.clone();
        self.run(async move { mget(&mut connection, &keys).await })
    }

    /// Applies `step` on its slot's master and waits for the replicas; `false` when a
    /// compared key had moved (nothing was written).
    fn execute(&self, step: &Step) -> Result<bool, StorageError> {
        let Some(route) = step.route() else {
            return Ok(true);
        };
        let mut pipeline = redis::pipe();
        pipeline.add_command(step.command());
        if let Some((replicas, timeout)) = self.wait {
            pipeline
                .cmd("WAIT")
                .arg(replicas)
                .arg(timeout.as_millis().max(1) as u64);
        }
        let count = if self.wait.is_some() { 2 } else { 1 };
        let connection = self.connection.clone();
        let answers = self.run(retried(move || {
            let (mut connection, pipeline, route) =
                (connection.clone(), pipeline.clone(), route.clone());
            async move { connection.route_pipeline(pipeline, 0, count, route).await }
        }))?;
        let written = answers
            .first()
            .and_then(step::written)
            .ok_or_else(|| StorageError::Engine(format!("redis: the step answered {answers:?}")))?;
        if written {
            self.check_confirmed(answers.get(1))?;
        }
        Ok(written)
    }

    /// Refuses to acknowledge a change that fewer than `wait_replicas` replicas confirmed;
    /// `answer` is what `WAIT` answered.
    fn check_confirmed(&self, answer: Option<&redis::Value>) -> Result<(), StorageError> {
        let Some((replicas, timeout)) = self.wait else {
            return Ok(());
        };
        let confirmed = match answer {
            Some(redis::Value::Int(confirmed)) => *confirmed,
            _ => 0,
        };
        if confirmed < i64::from(replicas) {
            return Err(StorageError::Engine(format!(
                "redis: the change is on its master, but {confirmed} of the {replicas} \
                 replicas required confirmed it within {timeout:?}; retry with the same \
                 idempotency key"
            )));
        }
        Ok(())
    }

    /// Reads what one user's change depends on, decides, and applies it, again until no
    /// other change of the user or its chain came between the read and the write.
    fn change_user<T>(
        &self,
        user_id: u64,
        extra: &dyn Fn(&UserKeys) -> Vec<String>,
        decide: Decide<'_, T>,
    ) -> Result<T, StorageError> {
        let keys = self.layout.user(user_id);
        for _ in 0..STEP_ATTEMPTS {
            let snapshot = self.snapshot(&keys, extra(&keys))?;
            match decide(&keys, snapshot)? {
                Decision::Done(answer) => return Ok(answer),
                Decision::Apply(step, answer) => {
                    // Decided on what was read, not yet written: another server's change
                    // of the user may land here, and the step must then write nothing.
                    fail::fail_point!("redis-step-decided");
                    if step.is_empty() || self.execute(&step)? {
                        return Ok(answer);
                    }
                }
            }
        }
        Err(StorageError::Engine(format!(
            "user {user_id} changed {STEP_ATTEMPTS} times while a change of it was decided"
        )))
    }

    /// The user's version, state, chain tail, surfaces and pseudonym key, and `extra` keys
    /// of the same slot, read in one command.
    fn snapshot(&self, keys: &UserKeys, extra: Vec<String>) -> Result<Snapshot, StorageError> {
        let values = self.get_many(Snapshot::keys(keys, extra))?;
        Snapshot::decode(keys, values)
    }
    /// The rows of a user's `surfaces`, decoded.
    fn user_rows(
        &self,
        keys: &UserKeys,
        surfaces: &[SurfaceId],
    ) -> Result<Vec<(RowKey, StoredRow)>, StorageError> {
        if surfaces.is_empty() {
            return Ok(Vec::new());
        }
        let values = self.get_many(surfaces.iter().map(|&surface| keys.row(surface)).collect())?;
        surfaces
            .iter()
            .zip(values)
            .filter_map(|(&surface, bytes)| {
                let key = RowKey {
                    user_id: keys.user_id,
                    surface,
                };
                bytes.map(|bytes| decode_stored_row(key, &bytes).map(|row| (key, row)))
            })
            .collect()
    }

    /// Adds to `step` the re-validated rows of a user, and returns how many values were
    /// removed. The user's surfaces index and its member of the partition's users follow.
    fn revalidated(
        step: &mut Step,
        keys: &UserKeys,
        state: Option<&UserState>,
        rows: Vec<(RowKey, StoredRow)>,
        revalidate: Revalidate<'_>,
    ) -> usize {
        let mut removed = 0;
        let mut surfaces = Vec::with_capacity(rows.len());
        let had_rows = !rows.is_empty();
        for (key, row) in rows {
            let kept = revalidate(state, key, row.clone());
            if kept != row {
                removed += row.values.len().saturating_sub(kept.values.len());
                if kept.values.is_empty() {
                    step.delete(&keys.row(key.surface));
                } else {
                    step.set(&keys.row(key.surface), &encode_row(&kept));
                }
            }
            if !kept.values.is_empty() {
                surfaces.push(key.surface);
            }
        }
        if removed > 0 && had_rows {
            set_surfaces(step, keys, &surfaces);
        }
        removed
    }
}

/// The certificates of a TLS connection to the nodes: the authority to trust (else the
/// system's roots) and this server's own, when the nodes ask for one.
fn tls_certificates(config: &RedisClusterConfig) -> Result<redis::TlsCertificates, StorageError> {
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path).map_err(|error| {
            StorageError::Engine(format!("cannot read {}: {error}", path.display()))
        })
    };
    let client_tls = match (
        &config.tls_client_certificate_file,
        &config.tls_client_key_file,
    ) {
        (Some(certificate), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(certificate)?,
            client_key: read(key)?,
        }),
        (None, None) => None,
        _ => {
            return Err(StorageError::Engine(
                "storage.redis_cluster: set both tls_client_certificate_file and \
                 tls_client_key_file, or neither"
                    .to_string(),
            ));
        }
    };
    Ok(redis::TlsCertificates {
        client_tls,
        root_cert: config.tls_ca_file.as_ref().map(read).transpose()?,
    })
}

/// The runtime of the connections, shut down without waiting when the store is dropped
/// (which may happen on a task of the server's runtime, where waiting is not allowed).
struct IoRuntime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for IoRuntime {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("taken only when dropped")
    }
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl Snapshot {
    /// The keys a snapshot of the user reads, in one command: the user's version, state,
    /// chain tail, surfaces and pseudonym key, then `extra` keys of the same slot.
    fn keys(keys: &UserKeys, extra: Vec<String>) -> Vec<String> {
        let mut all = vec![
            keys.version(),
            keys.state(),
            keys.chain().tail(),
            keys.surfaces(),
            keys.pseudonym_key(),
        ];
        all.extend(extra);
        all
    }

    /// A snapshot from the values of [`Snapshot::keys`].
    fn decode(keys: &UserKeys, values: Vec<Option<Vec<u8>>>) -> Result<Snapshot, StorageError> {
        let mut values = values.into_iter();
        let mut next = || values.next().flatten();
        let version = next();
        let state = next();
        let tail = next();
        let surfaces = next();
        let pseudonym_key = next();
        Ok(Snapshot {
            version: Version::read(version)?,
            state: match state {
                Some(bytes) => Some(decode_user_state(keys.user_id, &bytes).map_err(|error| {
                    corrupt(format!("state of user {}: {error}", keys.user_id))
                })?),
                None => None,
            },
            tail: Tail::read(tail)?,
            surfaces: decode_surfaces(surfaces.as_deref())?,
            pseudonym_key,
            extra: values.collect(),
        })
    }
}

/// What a user's change is decided on.
struct Snapshot {
    version: Version,
    state: Option<UserState>,
    tail: Tail,
    surfaces: Vec<SurfaceId>,
    pseudonym_key: Option<Vec<u8>>,
    /// The extra keys asked for, in order.
    extra: Vec<Option<Vec<u8>>>,
}

impl Snapshot {
    /// A step that applies only if nothing of the user, and (when it appends records)
    /// nothing of its chain, changed since this snapshot; it moves the user's version.
    fn step(&self, keys: &UserKeys, appends_audit: bool) -> Step {
        let mut step = Step::default();
        step.compare(&keys.version(), self.version.bytes.as_deref());
        if appends_audit {
            step.compare(&keys.chain().tail(), self.tail.bytes.as_deref());
        }
        step.set(
            &keys.version(),
            (self.version.number + 1).to_string().as_bytes(),
        );
        step
    }

    fn generation(&self) -> u64 {
        self.state.as_ref().map_or(0, |state| state.generation)
    }

    fn erasing(&self) -> bool {
        self.state
            .as_ref()
            .is_some_and(|state| state.erasure != ErasureState::None)
    }
}

/// Decides a user's change on what was read of the user.
type Decide<'a, T> = &'a mut dyn FnMut(&UserKeys, Snapshot) -> Result<Decision<T>, StorageError>;

/// What a decision on a snapshot came to.
enum Decision<T> {
    /// Nothing to write: the answer.
    Done(T),
    /// Write this step; the answer once it is written.
    Apply(Step, T),
}

/// A user's version as read: its number (0 when missing) and the bytes to compare.
struct Version {
    number: u64,
    bytes: Option<Vec<u8>>,
}

impl Version {
    fn read(bytes: Option<Vec<u8>>) -> Result<Version, StorageError> {
        let number = match &bytes {
            Some(bytes) => std::str::from_utf8(bytes)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or_else(|| corrupt("a user's version is not a number"))?,
            None => 0,
        };
        Ok(Version { number, bytes })
    }
}

/// The surfaces index of a user: two bytes per surface id, ascending.
fn decode_surfaces(bytes: Option<&[u8]>) -> Result<Vec<SurfaceId>, StorageError> {
    let Some(bytes) = bytes else {
        return Ok(Vec::new());
    };
    if bytes.len() % 2 != 0 {
        return Err(corrupt("a user's surfaces index is not a list of ids"));
    }
    Ok(bytes
        .chunks_exact(2)
        .map(|id| SurfaceId(u16::from_le_bytes(id.try_into().expect("two bytes"))))
        .collect())
}

/// Writes a user's surfaces index (`surfaces` ascending) and its member of the partition's
/// users with rows; both go when the user has no row left.
fn set_surfaces(step: &mut Step, keys: &UserKeys, surfaces: &[SurfaceId]) {
    let chain = keys.chain();
    if surfaces.is_empty() {
        step.delete(&keys.surfaces());
        step.set_remove(&chain.users(), keys.member().as_bytes());
    } else {
        let bytes: Vec<u8> = surfaces
            .iter()
            .flat_map(|surface| surface.0.to_le_bytes())
            .collect();
        step.set(&keys.surfaces(), &bytes);
        step.set_add(&chain.users(), keys.member().as_bytes());
    }
}

fn decode_stored_row(key: RowKey, bytes: &[u8]) -> Result<StoredRow, StorageError> {
    decode_row(bytes).map_err(|error| {
        corrupt(format!(
            "row of user {} surface {}: {error}",
            key.user_id, key.surface.0
        ))
    })
}

/// Times a command that failed on the cluster's own account is sent again, and the pause
/// before each time: a slot moving to another master answers `TRYAGAIN` to a command whose
/// keys are split between the two for a moment (the command was not run).
const CLUSTER_RETRIES: usize = 8;
const CLUSTER_RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Runs `attempt`, again while it fails with a cluster error (`TRYAGAIN`, `MOVED`, `ASK`,
/// `CLUSTERDOWN`), up to [`CLUSTER_RETRIES`] times.
async fn retried<T, Attempt, Sent>(mut attempt: Attempt) -> redis::RedisResult<T>
where
    Attempt: FnMut() -> Sent,
    Sent: Future<Output = redis::RedisResult<T>>,
{
    let mut result = attempt().await;
    for _ in 0..CLUSTER_RETRIES {
        match &result {
            Err(error) if error.is_cluster_error() => {
                tokio::time::sleep(CLUSTER_RETRY_PAUSE).await;
                result = attempt().await;
            }
            _ => break,
        }
    }
    result
}

async fn mget(
    connection: &mut ClusterConnection,
    keys: &[String],
) -> redis::RedisResult<Vec<Option<Vec<u8>>>> {
    redis::cmd("MGET").arg(keys).query_async(connection).await
}

/// Indices of `items` grouped by partition, in partition order.
fn by_partition(layout: &Layout, users: impl Iterator<Item = u64>) -> BTreeMap<u32, Vec<usize>> {
    let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (index, user_id) in users.enumerate() {
        groups
            .entry(layout.user(user_id).partition)
            .or_default()
            .push(index);
    }
    groups
}

mod store;
