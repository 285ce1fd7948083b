//! Serving benchmark: loads a dataset through the bulk loader, then drives the server
//! through the Rust client over loopback with several HTTP/2 connections, next to three
//! floors measured in the same run: raw in-process RocksDB `batched_multi_get` of the same
//! keys (storage), a minimal tonic server answering each workload with a response of the
//! same bytes (transport: its CPU per call is what a request costs without the store), and
//! one `redis-server` answering 500-key `MGET`s of the rows as 80-byte values (skipped,
//! saying why, when `redis-server` is not installed). Every workload reports the server's
//! CPU per request and per key.
//!
//! Run with `cargo bench -p featurestore-tests --bench serving`. Sizes through the
//! environment: `SERVING_USERS` (default 1,000,000 users × 3 surfaces × 20 floats + a
//! 64-float embedding; workload (e) bulk-loads half as many other users), `SERVING_SECONDS`
//! per workload (10), `SERVING_CONNECTIONS` (4), `SERVING_CONCURRENCY` requests in flight
//! for closed loops (8), `SERVING_BLOCK_CACHE_BYTES` and `SERVING_ROW_CACHE_BYTES` (the
//! server's defaults). Prints a table and writes `target/serving-bench.json`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use featurestore::proto::{self, feature_store_server::FeatureStore};
use featurestore_client::generate::{GenerateOptions, generate};
use featurestore_client::load::formats::FileFormat;
use featurestore_client::load::{LoadOptions, load};
use featurestore_client::{Client, ClientOptions};
use featurestore_server::config::StorageConfig;
use featurestore_server::registry::Registry;
use featurestore_server::storage::RowKey;
use featurestore_server::storage::keys::encode_row_key;
use featurestore_tests::workload::{EMBEDDING, FLOATS, Random, SURFACES, registry_toml};
use featurestore_tests::{START_TIME, TestServer};
use tonic::{Request, Response, Status};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;
#[path = "serving/redis_floor.rs"]
mod redis_floor;
use common::{Measured, Workload, drive, setting};

/// The closed loops measured, each with many requests in flight (`true`:
/// `SERVING_CONCURRENCY`) or one.
const CLOSED_LOOPS: [(Workload, bool); 7] = [
    (Workload::Batch500, true),
    (Workload::Batch500, false),
    (Workload::User3, true),
    (Workload::Latency3, false),
    (Workload::Key1, false),
    (Workload::Key1, true),
    (Workload::Mixed, true),
];

fn closed_loop(lanes: usize) -> String {
    format!("closed, {lanes} in flight")
}

/// The transport floor: a tonic server that answers every read with the same response.
#[derive(Debug, Clone)]
struct Echo {
    response: Arc<std::sync::RwLock<proto::GetFeaturesResponse>>,
}

#[tonic::async_trait]
impl FeatureStore for Echo {
    async fn get_features(
        &self,
        _request: Request<proto::GetFeaturesRequest>,
    ) -> Result<Response<proto::GetFeaturesResponse>, Status> {
        let response = self.response.read().expect("not poisoned").clone();
        Ok(Response::new(response))
    }

    async fn write_features(
        &self,
        _request: Request<proto::WriteFeaturesRequest>,
    ) -> Result<Response<proto::WriteFeaturesResponse>, Status> {
        Ok(Response::new(proto::WriteFeaturesResponse::default()))
    }

    async fn list_features(
        &self,
        _request: Request<proto::ListFeaturesRequest>,
    ) -> Result<Response<proto::ListFeaturesResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }

    async fn list_surfaces(
        &self,
        _request: Request<proto::ListSurfacesRequest>,
    ) -> Result<Response<proto::ListSurfacesResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }

    async fn explain_write(
        &self,
        _request: Request<proto::WriteFeaturesRequest>,
    ) -> Result<Response<proto::ExplainWriteResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
}

/// The storage floor: raw `batched_multi_get` of the workload's keys, sorted, in process,
/// with the server's block cache size and table options, after as long a warm-up as the
/// measurement; nanoseconds per key.
fn storage_floor(
    path: &std::path::Path,
    storage: &StorageConfig,
    workload: Workload,
    users: u64,
    seconds: f64,
) -> f64 {
    let db = featurestore_server::storage::RocksStore::open_engine_read_only(path, storage)
        .expect("open the database read-only");
    let features = db.cf_handle("features").expect("features");
    let registry = Registry::from_toml(&registry_toml()).expect("registry");
    let surface_id = |name: &str| registry.surface(name).expect("surface").id;
    let mut random = Random(0x5eed);
    let mut read_for = |seconds: f64| {
        let (mut keys, mut found) = (0u64, 0u64);
        let started = Instant::now();
        while started.elapsed().as_secs_f64() < seconds {
            let request = workload.read(&mut random, users);
            let mut encoded: Vec<[u8; 10]> = request
                .keys
                .iter()
                .map(|key| {
                    encode_row_key(RowKey {
                        user_id: key.user_id,
                        surface: surface_id(&key.surface),
                    })
                })
                .collect();
            encoded.sort_unstable();
            for value in db.batched_multi_get_cf(features, encoded.iter(), true) {
                if matches!(value, Ok(Some(_))) {
                    found += 1;
                }
            }
            keys += encoded.len() as u64;
        }
        assert!(found * 10 > keys * 9, "the floor reads stored rows");
        started.elapsed().as_nanos() as f64 / keys as f64
    };
    // The server's cache was warmed by the workloads before it; this one by the same reads.
    read_for(seconds);
    read_for(seconds)
}

fn main() {
    let users = setting("SERVING_USERS", 1_000_000);
    let seconds = setting("SERVING_SECONDS", 10);
    let connections = setting("SERVING_CONNECTIONS", 4) as usize;
    let concurrency = setting("SERVING_CONCURRENCY", 8) as usize;
    let storage = StorageConfig {
        block_cache_bytes: setting(
            "SERVING_BLOCK_CACHE_BYTES",
            StorageConfig::default().block_cache_bytes as u64,
        ) as usize,
        row_cache_bytes: setting(
            "SERVING_ROW_CACHE_BYTES",
            StorageConfig::default().row_cache_bytes,
        ),
        ..StorageConfig::default()
    };
    let duration = Duration::from_secs(seconds);
    let directory = tempfile::tempdir().expect("temporary directory");
    let registry_path = directory.path().join("registry.toml");
    std::fs::write(&registry_path, registry_toml()).expect("registry");
    let registry = Registry::from_toml(&registry_toml()).expect("registry parses");
    let generate_users = |path: &std::path::Path, first_user: u64, users: u64| {
        generate(
            &GenerateOptions {
                path: path.to_path_buf(),
                format: FileFormat::Parquet,
                users,
                first_user,
                seed: first_user,
                source: "engagement".to_string(),
                surfaces: SURFACES.iter().map(|surface| surface.to_string()).collect(),
                features: Vec::new(),
                producer: "bench@v1".to_string(),
                origin_app: Some("facebook".to_string()),
                now_unix_micros: START_TIME.unix_micros(),
            },
            &registry.feature_definitions(),
        )
        .expect("generate a dataset");
    };
    let dataset = directory.path().join("dataset.parquet");
    generate_users(&dataset, 1, users);
    // Loaded while (e) reads: other users, so that (e) reads what (a) reads.
    let backfill = directory.path().join("backfill.parquet");
    let backfill_users = (users / 2).max(1);
    generate_users(&backfill, users + 1, backfill_users);

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
    let server = server_runtime.block_on(TestServer::start_with(
        tempfile::tempdir().expect("directory"),
        |config| {
            config.registry_path = Some(registry_path.clone());
            config.durability = featurestore_server::config::Durability::Sync;
            config.storage = storage.clone();
            // The sweep that compacts the loaded dataset runs longer than a request may.
            config.limits.request_timeout = Duration::from_secs(3600);
        },
    ));
    let endpoint = server.endpoint.clone();
    let data_dir = server.config.data_dir.clone();
    let options = ClientOptions {
        timeout: Duration::from_secs(3600),
        ..ClientOptions::default()
    };

    // The transport floor: answers each workload's real response, captured below.
    let echo = Echo {
        response: Arc::new(std::sync::RwLock::new(proto::GetFeaturesResponse::default())),
    };
    let echo_stop = tokio_util::sync::CancellationToken::new();
    let echo_endpoint = {
        let listener = server_runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("address"));
        let service = proto::feature_store_server::FeatureStoreServer::new(echo.clone())
            .max_encoding_message_size(64 << 20);
        // Nagle off on accepted sockets, as the feature store does.
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            |accepted| {
                let stream = accepted?;
                stream.set_nodelay(true)?;
                Ok::<_, std::io::Error>(stream)
            },
        );
        let stop = echo_stop.clone();
        server_runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned()),
        );
        endpoint
    };

    let mut rows = BTreeMap::new();
    let mut floors = BTreeMap::new();
    let mut redis = Err("not measured".to_string());
    let mut load_note = String::new();
    let mut backfill_note = String::new();
    client_runtime.block_on(async {
        let loader = Client::connect(&endpoint, options.clone()).expect("client");
        let loading = Instant::now();
        let mut load_options = LoadOptions::new(&dataset, "dataset");
        load_options.chunk_rows = 4096;
        let report = load(&loader, &load_options)
            .await
            .expect("load the dataset");
        assert_eq!(
            report.job.summary.unwrap_or_default().rows_accepted,
            users,
            "every row stored"
        );
        // Compacted, as a store in steady state is.
        loader.sweep_expired().await.expect("compact");
        load_note = format!(
            "dataset: {users} users x {} surfaces bulk-loaded and compacted in {:.1} s",
            SURFACES.len(),
            loading.elapsed().as_secs_f64()
        );
        eprintln!("{load_note}");
        let clients: Vec<Client> = (0..connections)
            .map(|_| Client::connect(&endpoint, options.clone()).expect("client"))
            .collect();
        for (workload, lanes) in CLOSED_LOOPS
            .iter()
            .map(|&(workload, many)| (workload, if many { concurrency } else { 1 }))
        {
            // Warm-up, not measured.
            drive(
                &clients,
                workload,
                users,
                lanes,
                None,
                Duration::from_secs(1),
            )
            .await;
            let measured = drive(&clients, workload, users, lanes, None, duration).await;
            rows.insert((workload, closed_loop(lanes)), measured);
        }
        let closed = &rows[&(Workload::Batch500, closed_loop(concurrency))];
        let half = closed.per_second(closed.requests) / 2.0;
        let measured = drive(
            &clients,
            Workload::Batch500,
            users,
            concurrency,
            Some(half),
            duration,
        )
        .await;
        rows.insert((Workload::Batch500, format!("open {half:.0}/s")), measured);

        // (e): the same reads while a bulk load streams, decides, stages and commits.
        let backfill_client = Client::connect(&endpoint, options.clone()).expect("client");
        let mut backfill_options = LoadOptions::new(&backfill, "backfill");
        backfill_options.chunk_rows = 4096;
        let backfilling = tokio::spawn(async move {
            let started = Instant::now();
            let report = load(&backfill_client, &backfill_options)
                .await
                .expect("load during reads");
            (report, started.elapsed())
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let measured = drive(
            &clients,
            Workload::DuringLoad,
            users,
            concurrency,
            None,
            duration,
        )
        .await;
        let overlapped = !backfilling.is_finished();
        rows.insert((Workload::DuringLoad, closed_loop(concurrency)), measured);
        let (report, took) = backfilling.await.expect("bulk load task");
        let stored = report.job.summary.unwrap_or_default().rows_accepted;
        assert_eq!(stored, backfill_users, "every backfilled row stored");
        backfill_note = format!(
            "(e)'s bulk load: {stored} users x {} surfaces in {:.1} s ({:.0} users/s){}",
            SURFACES.len(),
            took.as_secs_f64(),
            stored as f64 / took.as_secs_f64(),
            if overlapped {
                ", running during the whole measurement"
            } else {
                "; it ended before the measurement did: raise SERVING_USERS"
            }
        );

        let echo_clients: Vec<Client> = (0..connections)
            .map(|_| Client::connect(&echo_endpoint, options.clone()).expect("client"))
            .collect();
        for (workload, lanes) in CLOSED_LOOPS
            .iter()
            .filter(|(workload, _)| *workload != Workload::Mixed)
            .map(|&(workload, many)| (workload, if many { concurrency } else { 1 }))
        {
            let sample = workload.read(&mut Random(1), users);
            *echo.response.write().expect("not poisoned") =
                clients[0].get_features(sample).await.expect("sample");
            drive(
                &echo_clients,
                workload,
                users,
                lanes,
                None,
                Duration::from_secs(1),
            )
            .await;
            floors.insert(
                (workload, closed_loop(lanes)),
                drive(&echo_clients, workload, users, lanes, None, duration).await,
            );
        }
        redis = redis_floor::measure(users, connections, concurrency, duration).await;
    });
    // Closing the load generator's connections lets the servers stop at once.
    drop(client_runtime);
    echo_stop.cancel();
    let kept = server_runtime.block_on(server.stop());
    let floor = storage_floor(
        &data_dir,
        &storage,
        Workload::Batch500,
        users,
        seconds as f64,
    );
    drop(kept);

    let (load, cores) = common::machine();
    println!(
        "\nserving: {users} users x {} surfaces x ({FLOATS} floats + {EMBEDDING}-float embedding); \
         {connections} connections, {concurrency} in flight; block cache {} MiB, row cache {} MiB; \
         {cores} cores, load average {load}\n",
        SURFACES.len(),
        storage.block_cache_bytes >> 20,
        storage.row_cache_bytes >> 20
    );
    println!(
        "| workload | loop | req/s | keys/s | p50 µs | p99 µs | p99.9 µs | server CPU µs/req | server CPU µs/key | server CPU ÷ echo's | client CPU µs/req | req/s ÷ echo | p50 ÷ echo |"
    );
    println!(
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let ratio = |value: Option<f64>| value.map_or("-".to_string(), |value| format!("{value:.2}"));
    let mut json = Vec::new();
    let mut print_row = |name: String,
                         mode: &str,
                         measured: &Measured,
                         floor: Option<&Measured>| {
        println!(
            "| {name} | {mode} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.2} | {} | {:.0} | {} | {} |",
            measured.per_second(measured.requests),
            measured.per_second(measured.keys),
            measured.micros(0.5),
            measured.micros(0.99),
            measured.micros(0.999),
            measured.server_cpu_per_request(),
            measured.server_cpu_per_key(),
            ratio(floor.map(|floor| measured.server_cpu_per_request()
                / floor.server_cpu_per_request())),
            measured.client_cpu * 1e6 / measured.requests.max(1) as f64,
            ratio(floor.map(|floor| measured.per_second(measured.requests)
                / floor.per_second(floor.requests))),
            ratio(floor.map(|floor| measured.micros(0.5) / floor.micros(0.5))),
        );
        json.push(serde_json::json!({
            "workload": name,
            "loop": mode,
            "requests_per_second": measured.per_second(measured.requests),
            "keys_per_second": measured.per_second(measured.keys),
            "p50_us": measured.micros(0.5),
            "p99_us": measured.micros(0.99),
            "p999_us": measured.micros(0.999),
            "server_cpu_us_per_request": measured.server_cpu_per_request(),
            "server_cpu_us_per_key": measured.server_cpu_per_key(),
            "client_cpu_seconds": measured.client_cpu,
            "requests": measured.requests,
        }));
    };
    for ((workload, mode), measured) in &rows {
        print_row(
            workload.name().to_string(),
            mode,
            measured,
            floors.get(&(*workload, mode.clone())),
        );
    }
    for ((workload, mode), floor) in &floors {
        print_row(
            format!("echo floor: {}", workload.name()),
            mode,
            floor,
            Some(floor),
        );
    }
    match &redis {
        Ok(measured) => print_row(
            "Redis floor: 500-key MGET of 80-byte values".to_string(),
            &closed_loop(concurrency),
            measured,
            None,
        ),
        Err(reason) => println!("\nRedis floor skipped: {reason}"),
    }
    let served = rows
        .get(&(Workload::Batch500, closed_loop(concurrency)))
        .map_or(f64::NAN, |measured| measured.server_cpu_per_key() * 1e3);
    println!(
        "\nstorage floor: raw batched_multi_get of (a)'s keys in process: {floor:.0} ns/key; \
         the server's CPU per key in (a): {served:.0} ns ({:.2}x the floor)",
        served / floor
    );
    println!("{load_note}; {backfill_note}");
    let report = serde_json::json!({
        "users": users,
        "cores": cores,
        "load_average": load,
        "workloads": json,
        "storage_floor_ns_per_key": floor,
        "block_cache_bytes": storage.block_cache_bytes,
        "row_cache_bytes": storage.row_cache_bytes,
        "server_cpu_ns_per_key_a": served,
        "redis_floor": redis.as_ref().ok().map(|measured| serde_json::json!({
            "keys_per_second": measured.per_second(measured.keys),
            "p50_us": measured.micros(0.5),
            "p99_us": measured.micros(0.99),
            "redis_cpu_us_per_key": measured.server_cpu_per_key(),
        })),
        "dataset": load_note,
        "bulk_load_during_e": backfill_note,
    });
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/serving-bench.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report).expect("JSON")).expect("write JSON");
    eprintln!("wrote {}", path.display());
}
