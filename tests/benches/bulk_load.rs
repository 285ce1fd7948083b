//! Bulk-load throughput end to end, next to plain RocksDB loads of the same rows, and read
//! latency during a load against idle.
//!
//! Run with `cargo bench -p featurestore-tests --bench bulk_load` (`BULK_ROWS=200000` for
//! a shorter run). The server runs in this process with its default settings (sync
//! durability); the loader reads a generated Parquet file and streams it over loopback
//! gRPC, as `featurestore load` does. Prints a table.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use featurestore::domain::{ReadKey, ReadRequest, Timestamp, Value};
use featurestore_client::generate::{GenerateOptions, generate};
use featurestore_client::load::formats::FileFormat;
use featurestore_client::load::{LoadOptions, load};
use featurestore_client::{Client, ClientOptions};
use featurestore_server::registry::{FeatureId, Registry, Sensitivity, SourceId};
use featurestore_server::storage::codec::encode_row;
use featurestore_server::storage::keys::encode_row_key;
use featurestore_server::storage::{RowKey, StoredRow, StoredValue};
use featurestore_tests::{START_TIME, TestServer};

/// mimalloc rather than the system allocator: request handling allocates many small
/// short-lived objects, which glibc's allocator serves markedly slower.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const FEATURES: usize = 20;
const PRELOADED_USERS: u64 = 100_000;
const KEYS_PER_READ: usize = 100;
const CHUNK_ROWS: usize = 4096;
/// Reads per second while measuring latency: a steady ranker, not a flood that would take
/// the CPU from the load being measured.
const READS_PER_SECOND: u64 = 50;

fn registry_toml() -> String {
    let mut toml = String::from(
        "[[surfaces]]\nname = \"facebook_feed\"\nid = 1\napp = \"facebook\"\npurpose = \"content\"\n\
         [[sources]]\nname = \"ai_chat\"\nid = 1\nkind = \"ai_text\"\n\
         [[sources]]\nname = \"ai_voice\"\nid = 2\nkind = \"ai_voice\"\n\
         [[sources]]\nname = \"engagement\"\nid = 3\nkind = \"not_ai\"\n",
    );
    for index in 0..FEATURES {
        toml.push_str(&format!(
            "[[features]]\nname = \"f{index:02}\"\nid = {}\ntype = \"float\"\n\
             sources = [\"engagement\"]\nsensitivity = \"none\"\nsurfaces = [\"facebook_feed\"]\n\
             ttl = \"30days\"\n",
            index + 1
        ));
    }
    toml
}

fn generate_file(path: &Path, registry: &Registry, first_user: u64, users: u64) {
    let options = GenerateOptions {
        path: path.to_path_buf(),
        format: FileFormat::Parquet,
        users,
        first_user,
        seed: first_user,
        source: "engagement".to_string(),
        surfaces: vec!["facebook_feed".to_string()],
        features: Vec::new(),
        producer: "bench@v1".to_string(),
        origin_app: Some("facebook".to_string()),
        now_unix_micros: START_TIME.unix_micros(),
    };
    generate(&options, &registry.feature_definitions()).expect("generate");
}

/// Reads random preloaded keys at a fixed rate until `stop`; returns each request's
/// latency, measured from when it was due (so a stall counts for every read it delays).
async fn read_until(client: Client, stop: Arc<AtomicBool>, limit: usize) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / READS_PER_SECOND));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while !stop.load(Ordering::Relaxed) && latencies.len() < limit {
        let due = ticks.tick().await;
        let keys = (0..KEYS_PER_READ)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ReadKey {
                    user_id: 10_000_000 + state % PRELOADED_USERS,
                    surface: "facebook_feed".to_string(),
                }
            })
            .collect();
        let request = ReadRequest {
            keys,
            features: Vec::new(),
            include_event_times: false,
        };
        client.get_features(request).await.expect("read");
        latencies.push(due.elapsed());
    }
    latencies
}

fn percentile(latencies: &mut [Duration], fraction: f64) -> f64 {
    if latencies.is_empty() {
        return f64::NAN;
    }
    latencies.sort_unstable();
    let index = ((latencies.len() as f64 * fraction) as usize).min(latencies.len() - 1);
    latencies[index].as_secs_f64() * 1e3
}

/// The stored form of a generated row: 20 floats with provenance.
fn stored_row(user_id: u64) -> StoredRow {
    let time = Timestamp::from_unix_micros(START_TIME.unix_micros() - (user_id as i64 % 1000));
    StoredRow {
        values: (0..FEATURES)
            .map(|index| StoredValue {
                feature: FeatureId(index as u16 + 1),
                event_time: time,
                write_time: START_TIME,
                expires_at: Timestamp::from_unix_micros(
                    START_TIME.unix_micros() + 30 * 86_400_000_000,
                ),
                source: SourceId(3),
                sensitivity: Sensitivity::None,
                policy_version: 0x1234_5678_9abc_def0,
                origin_app: "facebook".to_string(),
                topic_id: String::new(),
                microphone_permission: false,
                topic_confidence: None,
                value: Value::Float((user_id % 997) as f32 / 997.0 + index as f32),
            })
            .collect(),
    }
}

fn raw_options() -> rocksdb::Options {
    let mut options = rocksdb::Options::default();
    options.create_if_missing(true);
    options.set_compression_type(rocksdb::DBCompressionType::Lz4);
    options.set_write_buffer_size(64 * 1024 * 1024);
    options
}

/// Plain RocksDB: the same rows in WriteBatches of one chunk, synced like the server.
fn raw_write_batches(directory: &Path, rows: u64) -> Duration {
    let db = rocksdb::DB::open(&raw_options(), directory).expect("open");
    let mut write_options = rocksdb::WriteOptions::default();
    write_options.set_sync(true);
    let started = Instant::now();
    let mut batch = rocksdb::WriteBatch::default();
    for user_id in 1..=rows {
        let key = encode_row_key(RowKey {
            user_id,
            surface: featurestore_server::registry::SurfaceId(1),
        });
        batch.put(key, encode_row(&stored_row(user_id)));
        if batch.len() == CHUNK_ROWS {
            db.write_opt(std::mem::take(&mut batch), &write_options)
                .expect("write");
        }
    }
    db.write_opt(batch, &write_options).expect("write");
    started.elapsed()
}

/// Plain RocksDB: the same rows, sorted, through one SstFileWriter and ingested.
fn raw_table_file(directory: &Path, rows: u64) -> Duration {
    std::fs::create_dir_all(directory).expect("directory");
    let options = raw_options();
    let db = rocksdb::DB::open(&options, directory.join("db")).expect("open");
    let started = Instant::now();
    let path = directory.join("rows.sst");
    let writer = rocksdb::SstFileWriter::create(&options);
    let mut writer = writer;
    writer.open(&path).expect("open the table file");
    for user_id in 1..=rows {
        let key = encode_row_key(RowKey {
            user_id,
            surface: featurestore_server::registry::SurfaceId(1),
        });
        writer
            .put(key, encode_row(&stored_row(user_id)))
            .expect("add");
    }
    writer.finish().expect("finish");
    let mut ingest = rocksdb::IngestExternalFileOptions::default();
    ingest.set_move_files(true);
    db.ingest_external_file_opts(&ingest, vec![path])
        .expect("ingest");
    started.elapsed()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".to_string())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let rows: u64 = std::env::var("BULK_ROWS")
        .ok()
        .and_then(|rows| rows.parse().ok())
        .unwrap_or(1_000_000);
    let directory = tempfile::tempdir().expect("temporary directory");
    let registry_path = directory.path().join("registry.toml");
    std::fs::write(&registry_path, registry_toml()).expect("registry");
    let registry = Registry::from_toml(&registry_toml()).expect("registry parses");
    let preload = directory.path().join("preload.parquet");
    let backfill = directory.path().join("backfill.parquet");
    generate_file(&preload, &registry, 10_000_000, PRELOADED_USERS);
    let generating = Instant::now();
    generate_file(&backfill, &registry, 1, rows);
    eprintln!(
        "generated {rows} rows in {:.1} s ({} MiB of Parquet)",
        generating.elapsed().as_secs_f64(),
        std::fs::metadata(&backfill).map_or(0, |meta| meta.len() >> 20)
    );
    let load_before = load_average();

    let server = TestServer::start_with(tempfile::tempdir().expect("directory"), |config| {
        config.registry_path = Some(registry_path.clone());
        config.durability = featurestore_server::config::Durability::Sync;
        config.storage = featurestore_server::config::StorageConfig::default();
    })
    .await;
    let mut options = LoadOptions::new(&preload, "preload");
    options.chunk_rows = CHUNK_ROWS;
    load(&server.client, &options).await.expect("preload");

    let reader = server.client_with(ClientOptions::default());
    let mut idle = read_until(reader.clone(), Arc::new(AtomicBool::new(false)), 500).await;

    let stop = Arc::new(AtomicBool::new(false));
    let during = tokio::spawn(read_until(reader, Arc::clone(&stop), usize::MAX));
    let mut options = LoadOptions::new(&backfill, "backfill");
    options.chunk_rows = CHUNK_ROWS;
    let report = load(&server.client, &options).await.expect("load");
    stop.store(true, Ordering::Relaxed);
    let mut during = during.await.expect("reader");
    let summary = report.job.summary.clone().unwrap_or_default();
    assert_eq!(summary.rows_accepted, rows, "every row admitted");
    server.stop().await;

    let write_batches = raw_write_batches(&directory.path().join("raw-batches"), rows);
    let table_file = raw_table_file(&directory.path().join("raw-sst"), rows);

    let rate = |elapsed: Duration| rows as f64 / elapsed.as_secs_f64();
    let streaming = report.elapsed - report.commit_elapsed;
    let baseline = rate(write_batches);
    let cores = std::thread::available_parallelism().map_or(0, |cores| cores.get());
    println!(
        "\nbulk load of {rows} rows x {FEATURES} float features, {CHUNK_ROWS} rows per chunk; \
         {cores} cores, load average {load_before} before, {} after\n",
        load_average()
    );
    println!(
        "{:<52} {:>12} {:>9} {:>14}",
        "path", "rows/s", "seconds", "vs WriteBatch"
    );
    let line = |name: &str, elapsed: Duration| {
        println!(
            "{:<52} {:>12.0} {:>9.2} {:>13.2}x",
            name,
            rate(elapsed),
            elapsed.as_secs_f64(),
            rate(elapsed) / baseline
        );
    };
    line(
        "gRPC bulk load, end to end (Parquet file -> served)",
        report.elapsed,
    );
    line("  streaming: read, send, decide, stage durably", streaming);
    line(
        &format!(
            "  commit: merge chunks -> {} table file(s) -> ingest",
            report.job.files_ingested
        ),
        report.commit_elapsed,
    );
    line("plain RocksDB WriteBatch, synced per chunk", write_batches);
    line("plain RocksDB SstFileWriter + ingest", table_file);
    println!(
        "\nreads of {KEYS_PER_READ} keys x {FEATURES} features: idle p50 {:.2} ms p99 {:.2} ms \
         ({} requests); during the load p50 {:.2} ms p99 {:.2} ms ({} requests)",
        percentile(&mut idle, 0.5),
        percentile(&mut idle, 0.99),
        idle.len(),
        percentile(&mut during, 0.5),
        percentile(&mut during, 0.99),
        during.len()
    );
}
