//! The cost of observability on the read path: the same reads against the server with
//! metrics off (`observability.metrics_enabled = false`, `storage.statistics = false`),
//! with the server's metrics but without RocksDB's statistics, and with both (the
//! default), rotating the order over several rounds on the same database so that all see
//! the same machine. Request ids and log spans are on in all three (they cannot be turned
//! off).
//!
//! Run with `cargo bench -p featurestore-tests --bench metrics_cost`. Sizes through the
//! environment: `METRICS_COST_USERS` (default 50,000 users × 3 surfaces × 20 floats + a
//! 64-float embedding), `METRICS_COST_SECONDS` per measurement (5), `METRICS_COST_ROUNDS`
//! (3). Prints a table of the medians over the rounds.

use std::time::{Duration, Instant};

use featurestore_client::{Client, ClientOptions};
use featurestore_server::storage::Maintenance;
use featurestore_tests::TestServer;
use featurestore_tests::workload::{InProcessStore, Random, random_read, registry_toml};
use hdrhistogram::Histogram;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// What one closed-loop run measured.
struct Measured {
    keys_per_second: f64,
    p50_micros: f64,
    p99_micros: f64,
}

/// Reads of `keys` random keys for `duration`, `lanes` in flight over `clients`.
async fn drive(
    clients: &[Client],
    users: u64,
    keys: usize,
    lanes: usize,
    duration: Duration,
) -> Measured {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..lanes {
        let client = clients[lane % clients.len()].clone();
        tasks.spawn(async move {
            let mut random = Random(0xc057 + lane as u64);
            let mut latency = Histogram::<u64>::new(3).expect("histogram");
            let mut read = 0u64;
            while Instant::now() < deadline {
                let request = random_read(&mut random, users, keys);
                let start = Instant::now();
                client.get_features(request).await.expect("read");
                let _ = latency.record(start.elapsed().as_micros() as u64);
                read += keys as u64;
            }
            (read, latency)
        });
    }
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    let mut read = 0;
    while let Some(lane) = tasks.join_next().await {
        let (keys, lane_latency) = lane.expect("lane");
        read += keys;
        latency.add(lane_latency).expect("same precision");
    }
    Measured {
        keys_per_second: read as f64 / started.elapsed().as_secs_f64(),
        p50_micros: latency.value_at_quantile(0.5) as f64,
        p99_micros: latency.value_at_quantile(0.99) as f64,
    }
}

/// What is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Off,
    /// The server's metrics, RocksDB's statistics off.
    Metrics,
    /// The default: the server's metrics and RocksDB's statistics.
    MetricsAndStatistics,
}

const MODES: [Mode; 3] = [Mode::Off, Mode::Metrics, Mode::MetricsAndStatistics];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Off => "metrics off",
            Mode::Metrics => "metrics, no RocksDB statistics",
            Mode::MetricsAndStatistics => "metrics and RocksDB statistics",
        }
    }
}

/// The server's metrics work for one 500-key × 21-value read, measured in process (more
/// precise than the end-to-end runs, whose noise is larger than it): counting its values
/// into the read's tally (statuses and ages, done by the read path whether metrics are on
/// or not; each key's values have one event time, as values written together do), then
/// adding the tally and the call to the shared metrics (only when on). Nanoseconds per
/// read, for each.
fn recording_nanos() -> (f64, f64) {
    use featurestore_server::core::read_tally::{ReadTally, ages_on};
    use featurestore_server::metrics::Metrics;
    use featurestore_server::registry::SurfaceId;
    const KEYS: usize = 500;
    const VALUES_PER_KEY: usize = 21;
    const REPEATS: u32 = 20_000;
    let metrics = Metrics::new((1..=3).map(|id| (SurfaceId(id), format!("surface-{id}"))));
    let method = metrics.method("/featurestore.v1.FeatureStore/GetFeatures");
    let counting = Instant::now();
    let mut tally = ReadTally::default();
    for _ in 0..REPEATS {
        tally = ReadTally::default();
        for key in 0..KEYS {
            tally.rows[1] += 1;
            let ReadTally { values, ages, .. } = &mut tally;
            let ages = ages_on(ages, SurfaceId(1 + (key % 3) as u16));
            for value in 0..VALUES_PER_KEY {
                values[1] += 1;
                ages.add(std::hint::black_box(
                    key as i64 * 1_000_000 + value as i64 / 64,
                ));
            }
        }
        std::hint::black_box(&tally);
    }
    let counting = counting.elapsed().as_nanos() as f64 / f64::from(REPEATS);
    let adding = Instant::now();
    for _ in 0..REPEATS {
        metrics.read(std::hint::black_box(&tally));
        metrics.request(&method, tonic::Code::Ok, Duration::from_micros(900));
        metrics.read_duration(KEYS, Duration::from_micros(900));
    }
    let adding = adding.elapsed().as_nanos() as f64 / f64::from(REPEATS);
    (counting, adding)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let users = setting("METRICS_COST_USERS", 50_000);
    let seconds = setting("METRICS_COST_SECONDS", 5);
    let rounds = setting("METRICS_COST_ROUNDS", 3);
    let duration = Duration::from_secs(seconds);
    let directory = tempfile::tempdir().expect("temporary directory");
    let registry_path = directory.path().join("registry.toml");
    std::fs::write(&registry_path, registry_toml()).expect("registry");
    let database = directory.path().join("db");
    {
        let building = Instant::now();
        let store = InProcessStore::with_users(users);
        store.store.checkpoint(&database).expect("checkpoint");
        eprintln!(
            "dataset: {users} users x 3 surfaces in {:.1} s",
            building.elapsed().as_secs_f64()
        );
    }
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
    // Per mode and round: (500-key reads, 3-key reads at concurrency 1).
    let mut results: Vec<(Mode, Measured, Measured)> = Vec::new();
    for round in 0..rounds {
        // Rotate which goes first, so that none always runs on a warmer machine.
        let mut order = MODES;
        order.rotate_left(round as usize % MODES.len());
        for mode in order {
            let (metrics_on, statistics_on) = match mode {
                Mode::Off => (false, false),
                Mode::Metrics => (true, false),
                Mode::MetricsAndStatistics => (true, true),
            };
            let server = server_runtime.block_on(TestServer::start_with(
                tempfile::tempdir().expect("directory"),
                |config| {
                    config.data_dir = database.clone();
                    config.registry_path = Some(registry_path.clone());
                    config.observability.metrics_enabled = metrics_on;
                    config.storage.statistics = statistics_on;
                    config.storage.block_cache_bytes = 256 << 20;
                },
            ));
            let endpoint = server.endpoint.clone();
            let (batch, single) = client_runtime.block_on(async {
                let clients: Vec<Client> = (0..4)
                    .map(|_| Client::connect(&endpoint, ClientOptions::default()).expect("client"))
                    .collect();
                // Warm the block cache and the connections.
                drive(&clients, users, 500, 8, Duration::from_secs(1)).await;
                let batch = drive(&clients, users, 500, 8, duration).await;
                let single = drive(&clients[..1], users, 3, 1, duration).await;
                (batch, single)
            });
            eprintln!(
                "round {round}, {}: {:.0} keys/s, 3-key p50 {:.0} us",
                mode.name(),
                batch.keys_per_second,
                single.p50_micros
            );
            if metrics_on {
                // The scrape works while serving.
                let scrape = server_runtime.block_on(server.scrape());
                assert!(scrape.contains("featurestore_read_values_total"));
            }
            server_runtime.block_on(server.stop());
            results.push((mode, batch, single));
        }
    }
    let column = |mode: Mode, pick: &dyn Fn(&(Mode, Measured, Measured)) -> f64| {
        median(
            results
                .iter()
                .filter(|result| result.0 == mode)
                .map(pick)
                .collect(),
        )
    };
    type Pick = Box<dyn Fn(&(Mode, Measured, Measured)) -> f64>;
    let rows: [(&str, Pick); 5] = [
        (
            "500 keys x 20 floats, 8 in flight: keys/s",
            Box::new(|result| result.1.keys_per_second),
        ),
        ("  p50 latency (us)", Box::new(|result| result.1.p50_micros)),
        ("  p99 latency (us)", Box::new(|result| result.1.p99_micros)),
        (
            "3 keys, 1 in flight: p50 latency (us)",
            Box::new(|result| result.2.p50_micros),
        ),
        ("  p99 latency (us)", Box::new(|result| result.2.p99_micros)),
    ];
    let (counting, adding) = recording_nanos();
    println!();
    println!(
        "in process, per 500-key x 21-value read: counting its values into the tally {:.1} us \
         (always), adding it and the call to the metrics {:.2} us (metrics on)",
        counting / 1000.0,
        adding / 1000.0
    );
    println!(
        "metrics cost: {users} users, {rounds} rounds of {seconds} s each way, medians; load {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "| {:<42} | {:>9} | {:>9} | {:>11} | {:>9} | {:>11} |",
        "measure", "off", "metrics", "vs off", "+ RocksDB", "vs off"
    );
    println!(
        "| {:-<42} | {:->9} | {:->9} | {:->11} | {:->9} | {:->11} |",
        "", "", "", "", "", ""
    );
    for (name, pick) in &rows {
        let off = column(Mode::Off, pick.as_ref());
        let metrics = column(Mode::Metrics, pick.as_ref());
        let both = column(Mode::MetricsAndStatistics, pick.as_ref());
        println!(
            "| {name:<42} | {off:>9.0} | {metrics:>9.0} | {:>11.3} | {both:>9.0} | {:>11.3} |",
            metrics / off,
            both / off
        );
    }
}
