//! The two storage backends side by side in one run: the same dataset written through
//! WriteFeatures into a server on the embedded RocksDB and into a server on a local Redis
//! Cluster (six `redis-server` nodes, three masters with a replica each, every change
//! confirmed by a replica), then the same reads from each: keys/s, p50/p99, the server's
//! CPU per key and the Redis nodes' CPU per key. Also the bytes of Redis memory per stored
//! row (`INFO memory` of the masters, before and after the load), a bulk load of half as
//! many other users into each (staged and committed), and a capacity estimate for 3 billion
//! users × 4 surfaces from those figures.
//!
//! Run with `cargo bench -p featurestore-tests --bench cluster` (needs `redis-server`, which
//! `./dev test` installs). Sizes through the environment: `CLUSTER_BENCH_USERS` (100,000
//! users × 3 surfaces × 20 floats + a 64-float embedding), `CLUSTER_BENCH_SECONDS` per
//! workload (6), `SERVING_CONNECTIONS` (4), `SERVING_CONCURRENCY` (8). Prints a table and
//! writes `target/cluster-bench.json`.

use std::time::{Duration, Instant};

use featurestore::domain::WriteRequest;
use featurestore_client::generate::{GenerateOptions, generate};
use featurestore_client::load::formats::FileFormat;
use featurestore_client::load::{LoadOptions, load as bulk_load};
use featurestore_client::{Client, ClientOptions};
use featurestore_server::config::{Backend, Durability, RedisClusterConfig};
use featurestore_server::registry::Registry;
use featurestore_server::registry::SurfaceId;
use featurestore_server::storage::redis::keys::Layout;
use featurestore_tests::cluster::RedisCluster;
use featurestore_tests::workload::{SURFACES, registry_toml, user_write};
use featurestore_tests::{START_TIME, TestServer};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[allow(
    dead_code,
    reason = "the workloads of a bulk load and of writes are the serving bench's"
)]
mod common;
use common::{Measured, Workload, drive, processes_cpu, setting};

/// Users per write request while loading.
const USERS_PER_WRITE: u64 = 100;
/// Write requests in flight while loading.
const WRITERS: u64 = 8;

/// Writes users `1..=users` through `endpoint`, `WRITERS` requests in flight; returns the
/// time it took.
async fn load(endpoint: &str, options: &ClientOptions, users: u64) -> Duration {
    let started = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let client = Client::connect(endpoint, options.clone()).expect("client");
        writers.spawn(async move {
            let mut first = 1 + writer * USERS_PER_WRITE;
            while first <= users {
                let last = (first + USERS_PER_WRITE - 1).min(users);
                let request = WriteRequest {
                    idempotency_key: format!("load-{first}"),
                    rows: (first..=last)
                        .map(|user| user_write(user, "bench@v1"))
                        .collect(),
                };
                client.write_features(request).await.expect("write");
                first += WRITERS * USERS_PER_WRITE;
            }
        });
    }
    while let Some(writer) = writers.join_next().await {
        writer.expect("writer");
    }
    started.elapsed()
}

/// Bytes of Redis memory of a sample of `users`' keys (`MEMORY USAGE`): per row (the row
/// keys) and per user (its version and surfaces index), what a store keeps for good, as
/// opposed to idempotency records, which expire after the window.
async fn sampled_bytes(cluster: &RedisCluster, users: u64) -> (f64, f64) {
    let layout = Layout::new("fs", 256);
    let client = redis::cluster::ClusterClient::new(cluster.seeds()).expect("cluster client");
    let mut connection = client.get_async_connection().await.expect("connect");
    let (mut row_bytes, mut rows, mut user_bytes) = (0u64, 0u64, 0u64);
    let sampled: Vec<u64> = (0..1_000).map(|index| 1 + index * users / 1_000).collect();
    for &user in &sampled {
        let keys = layout.user(user);
        for surface in 1..=SURFACES.len() as u16 {
            let bytes: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(keys.row(SurfaceId(surface)))
                .arg("SAMPLES")
                .arg(0)
                .query_async(&mut connection)
                .await
                .expect("MEMORY USAGE");
            row_bytes += bytes.unwrap_or(0);
            rows += u64::from(bytes.is_some());
        }
        for key in [keys.version(), keys.surfaces()] {
            let bytes: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .arg("SAMPLES")
                .arg(0)
                .query_async(&mut connection)
                .await
                .expect("MEMORY USAGE");
            user_bytes += bytes.unwrap_or(0);
        }
    }
    (
        row_bytes as f64 / rows.max(1) as f64,
        user_bytes as f64 / sampled.len() as f64,
    )
}

/// One backend's figures.
struct Backed {
    name: &'static str,
    load: Duration,
    /// Users bulk-loaded, and how long the load (staging and commit) took.
    bulk: (u64, Duration),
    workloads: Vec<(Workload, Measured, f64)>,
}

fn main() {
    let users = setting("CLUSTER_BENCH_USERS", 100_000);
    let seconds = setting("CLUSTER_BENCH_SECONDS", 6);
    let connections = setting("SERVING_CONNECTIONS", 4) as usize;
    let concurrency = setting("SERVING_CONCURRENCY", 8) as usize;
    let duration = Duration::from_secs(seconds);
    let directory = tempfile::tempdir().expect("temporary directory");
    let registry_path = directory.path().join("registry.toml");
    std::fs::write(&registry_path, registry_toml()).expect("registry");
    // Other users, bulk-loaded after the reads.
    let registry = Registry::from_toml(&registry_toml()).expect("registry parses");
    let backfill = directory.path().join("backfill.parquet");
    let backfill_users = (users / 2).max(1);
    generate(
        &GenerateOptions {
            path: backfill.clone(),
            format: FileFormat::Parquet,
            users: backfill_users,
            first_user: users + 1,
            seed: users + 1,
            source: "engagement".to_string(),
            surfaces: SURFACES.iter().map(|surface| surface.to_string()).collect(),
            features: Vec::new(),
            producer: "bench@v1".to_string(),
            origin_app: Some("facebook".to_string()),
            now_unix_micros: START_TIME.unix_micros(),
        },
        &registry.feature_definitions(),
    )
    .expect("generate the backfill");

    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("server")
        .enable_all()
        .build()
        .expect("server runtime");
    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("bench-client")
        .enable_all()
        .build()
        .expect("client runtime");
    let cluster = server_runtime.block_on(RedisCluster::start());
    let node_pids: Vec<u32> = cluster
        .live_ports()
        .into_iter()
        .filter_map(|port| cluster.info_figure(port, "process_id"))
        .map(|pid| pid as u32)
        .collect();
    let masters_memory = || -> u64 {
        cluster
            .master_ports()
            .into_iter()
            .filter_map(|port| cluster.info_figure(port, "used_memory"))
            .sum()
    };

    let options = ClientOptions {
        timeout: Duration::from_secs(3600),
        ..ClientOptions::default()
    };
    let mut backends = Vec::new();
    let mut bytes_per_row = 0.0;
    let mut sampled = (0.0, 0.0);
    for backend in [Backend::Rocksdb, Backend::RedisCluster] {
        let server = server_runtime.block_on(TestServer::start_with(
            tempfile::tempdir().expect("directory"),
            |config| {
                config.registry_path = Some(registry_path.clone());
                config.durability = Durability::Sync;
                config.storage.backend = backend;
                config.storage.audit_partitions = 256;
                config.storage.redis_cluster = RedisClusterConfig {
                    seeds: cluster.seeds(),
                    ..RedisClusterConfig::default()
                };
            },
        ));
        let name = match backend {
            Backend::Rocksdb => "embedded RocksDB",
            Backend::RedisCluster => "Redis Cluster (3 masters + 3 replicas, WAIT 1)",
        };
        let memory_before = masters_memory();
        let took = client_runtime.block_on(load(&server.endpoint, &options, users));
        if backend == Backend::RedisCluster {
            bytes_per_row = masters_memory().saturating_sub(memory_before) as f64
                / (users * SURFACES.len() as u64) as f64;
            sampled = client_runtime.block_on(sampled_bytes(&cluster, users));
        }
        eprintln!(
            "{name}: {users} users written in {:.1} s",
            took.as_secs_f64()
        );
        let clients: Vec<Client> = client_runtime.block_on(async {
            (0..connections)
                .map(|_| Client::connect(&server.endpoint, options.clone()).expect("client"))
                .collect()
        });
        let mut workloads = Vec::new();
        for (workload, lanes) in [
            (Workload::Batch500, concurrency),
            (Workload::User3, concurrency),
            (Workload::Latency3, 1),
        ] {
            client_runtime.block_on(drive(
                &clients,
                workload,
                users,
                lanes,
                None,
                Duration::from_secs(1),
            ));
            let redis_before = processes_cpu(&node_pids);
            let measured =
                client_runtime.block_on(drive(&clients, workload, users, lanes, None, duration));
            let redis_cpu = processes_cpu(&node_pids) - redis_before;
            workloads.push((workload, measured, redis_cpu));
        }
        drop(clients);
        let bulk = client_runtime.block_on(async {
            let loader = Client::connect(&server.endpoint, options.clone()).expect("client");
            let mut load_options = LoadOptions::new(&backfill, "backfill");
            load_options.chunk_rows = 4096;
            let started = Instant::now();
            let report = bulk_load(&loader, &load_options).await.expect("bulk load");
            let stored = report.job.summary.unwrap_or_default().rows_accepted;
            assert_eq!(stored, backfill_users, "every backfilled row stored");
            (stored, started.elapsed())
        });
        eprintln!(
            "{name}: {} users bulk-loaded in {:.1} s",
            bulk.0,
            bulk.1.as_secs_f64()
        );
        server_runtime.block_on(server.stop());
        backends.push(Backed {
            name,
            load: took,
            bulk,
            workloads,
        });
    }
    drop(client_runtime);

    let (load, cores) = common::machine();
    println!(
        "\ncluster: {users} users x {} surfaces, written through WriteFeatures ({WRITERS} \
         requests of {USERS_PER_WRITE} users in flight); {connections} connections, \
         {concurrency} in flight; {cores} cores, load average {load}\n",
        SURFACES.len()
    );
    println!(
        "| backend | workload | keys/s | p50 µs | p99 µs | server CPU µs/key | Redis CPU µs/key |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    let mut json = Vec::new();
    for backend in &backends {
        for (workload, measured, redis_cpu) in &backend.workloads {
            let keys = measured.keys.max(1) as f64;
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
                backend.name,
                workload.name(),
                measured.per_second(measured.keys),
                measured.micros(0.5),
                measured.micros(0.99),
                measured.server_cpu * 1e6 / keys,
                redis_cpu * 1e6 / keys,
            );
            json.push(serde_json::json!({
                "backend": backend.name,
                "workload": workload.name(),
                "keys_per_second": measured.per_second(measured.keys),
                "p50_us": measured.micros(0.5),
                "p99_us": measured.micros(0.99),
                "server_cpu_us_per_key": measured.server_cpu * 1e6 / keys,
                "redis_cpu_us_per_key": redis_cpu * 1e6 / keys,
            }));
        }
    }
    println!();
    for backend in &backends {
        println!(
            "{}: written at {:.0} rows/s ({:.0} users/s)",
            backend.name,
            (users * SURFACES.len() as u64) as f64 / backend.load.as_secs_f64(),
            users as f64 / backend.load.as_secs_f64()
        );
        println!(
            "{}: bulk-loaded (staged and committed) at {:.0} rows/s ({:.0} users/s)",
            backend.name,
            (backend.bulk.0 * SURFACES.len() as u64) as f64 / backend.bulk.1.as_secs_f64(),
            backend.bulk.0 as f64 / backend.bulk.1.as_secs_f64()
        );
    }
    let (row_bytes, user_bytes) = sampled;
    println!(
        "Redis memory: {bytes_per_row:.0} bytes per stored row right after the load (the \
         masters' used_memory before and after, over the rows: with the write's idempotency \
         records, kept for the idempotency window, and audit records); kept for good: \
         {row_bytes:.0} bytes per row key and {user_bytes:.0} per user (version and surfaces \
         index), sampled with MEMORY USAGE"
    );
    // Capacity on paper: 3 billion users x 4 surfaces, one replica per master, from the
    // sampled bytes kept for good and the 500-key reads' Redis CPU per key.
    let rows = 3e9 * 4.0;
    let kept_per_row = row_bytes + user_bytes / 4.0;
    let memory_tib = rows * kept_per_row * 2.0 / (1u64 << 40) as f64;
    let redis_us_per_key = backends
        .last()
        .and_then(|backend| backend.workloads.first())
        .map_or(f64::NAN, |(_, measured, redis_cpu)| {
            redis_cpu * 1e6 / measured.keys.max(1) as f64
        });
    let keys_per_core = 1e6 / redis_us_per_key;
    let masters_by_memory = (rows * kept_per_row / (100.0 * (1u64 << 30) as f64)).ceil();
    println!(
        "capacity for 3e9 users x 4 surfaces: {memory_tib:.1} TiB of Redis memory with one \
         replica; {masters_by_memory:.0} masters of 100 GiB (as many replicas); one Redis core \
         serves about {keys_per_core:.0} keys/s of 500-key reads, so 10 M keys/s need about \
         {:.0} master cores",
        (1e7 / keys_per_core).ceil()
    );
    let report = serde_json::json!({
        "users": users,
        "cores": cores,
        "load_average": load,
        "workloads": json,
        "redis_bytes_per_row_after_load": bytes_per_row,
        "redis_bytes_per_row_key": row_bytes,
        "redis_bytes_per_user": user_bytes,
        "load_seconds": backends.iter().map(|backend| (backend.name, backend.load.as_secs_f64())).collect::<Vec<_>>(),
        "bulk_load_seconds": backends.iter().map(|backend| (backend.name, backend.bulk.1.as_secs_f64())).collect::<Vec<_>>(),
    });
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cluster-bench.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report).expect("JSON")).expect("write JSON");
    eprintln!("wrote {}", path.display());
}
