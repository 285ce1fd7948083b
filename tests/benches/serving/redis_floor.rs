//! The Redis floor: one `redis-server` on loopback holding the workload's rows as 80-byte
//! values (the 20 floats), read with 500-key `MGET`s, as many in flight as the server's
//! closed loop. What an in-memory key-value engine answers on the same machine, for
//! comparison with the feature store's keys per second and CPU per key.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use featurestore_tests::workload::{FLOATS, Random, SURFACES};
use hdrhistogram::Histogram;

use crate::common::{Measured, processes_cpu};

/// Bytes of one row's value: the 20 floats.
const VALUE_BYTES: usize = FLOATS * 4;
/// Keys per `MGET`, as in workload (a).
const KEYS_PER_READ: usize = 500;

/// A `redis-server` process, killed when dropped.
struct RedisServer {
    process: Child,
    port: u16,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn key(user_id: u64, surface: usize) -> String {
    format!("{user_id}:{surface}")
}

/// Starts `redis-server` without persistence on a free loopback port, or says why it
/// could not (not installed).
fn start() -> Result<RedisServer, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(|error| error.to_string())?
        .port();
    let process = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|error| format!("redis-server could not start ({error})"))?;
    Ok(RedisServer { process, port })
}

/// Measures 500-key `MGET`s of `users` × the surfaces, `lanes` in flight over `connections`
/// connections, for `duration` (after a second's warm-up); the reason instead when
/// `redis-server` is absent or fails. The CPU counted is `redis-server`'s.
pub async fn measure(
    users: u64,
    connections: usize,
    lanes: usize,
    duration: Duration,
) -> Result<Measured, String> {
    let server = start()?;
    let client = redis::Client::open(format!("redis://127.0.0.1:{}/", server.port))
        .map_err(|error| error.to_string())?;
    let started = Instant::now();
    let mut connected = Vec::new();
    while connected.len() < connections {
        match client.get_multiplexed_async_connection().await {
            Ok(connection) => connected.push(connection),
            Err(error) if started.elapsed() > Duration::from_secs(10) => {
                return Err(format!("redis-server did not answer: {error}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    // The rows, 1,000 per MSET.
    let mut random = Random(0x5eed);
    let mut connection = connected[0].clone();
    let all: Vec<(u64, usize)> = (1..=users)
        .flat_map(|user| (0..SURFACES.len()).map(move |surface| (user, surface)))
        .collect();
    for chunk in all.chunks(1000) {
        let mut command = redis::cmd("MSET");
        for &(user, surface) in chunk {
            let value: Vec<u8> = (0..VALUE_BYTES).map(|_| random.below(256) as u8).collect();
            command.arg(key(user, surface)).arg(value);
        }
        command
            .query_async::<()>(&mut connection)
            .await
            .map_err(|error| error.to_string())?;
    }
    let pid = server.process.id();
    let read = |mut connection: redis::aio::MultiplexedConnection, lane: usize, until: Instant| async move {
        let mut random = Random(0x5eed + lane as u64);
        let mut latency = Histogram::<u64>::new(3).expect("histogram");
        let (mut requests, mut keys) = (0u64, 0u64);
        while Instant::now() < until {
            let mut command = redis::cmd("MGET");
            for _ in 0..KEYS_PER_READ {
                let user = 1 + random.below(users);
                command.arg(key(user, random.below(SURFACES.len() as u64) as usize));
            }
            let start = Instant::now();
            let values: Vec<Option<Vec<u8>>> = command
                .query_async(&mut connection)
                .await
                .expect("MGET answered");
            let _ = latency.record(start.elapsed().as_micros() as u64);
            assert!(
                values
                    .iter()
                    .all(|value| value.as_ref().map(Vec::len) == Some(VALUE_BYTES)),
                "every key holds its row"
            );
            requests += 1;
            keys += values.len() as u64;
        }
        (requests, keys, latency)
    };
    // Warm-up, then the measurement.
    let mut measured = None;
    for seconds in [Duration::from_secs(1), duration] {
        let begun = Instant::now();
        let cpu_before = processes_cpu(&[pid]);
        let mut tasks = tokio::task::JoinSet::new();
        for lane in 0..lanes {
            tasks.spawn(read(
                connected[lane % connected.len()].clone(),
                lane,
                begun + seconds,
            ));
        }
        let mut total = Measured::nothing();
        while let Some(lane) = tasks.join_next().await {
            total.add_lane(lane.map_err(|error| error.to_string())?);
        }
        total.seconds = begun.elapsed().as_secs_f64();
        total.server_cpu = processes_cpu(&[pid]) - cpu_before;
        measured = Some(total);
    }
    measured.ok_or_else(|| "not measured".to_string())
}
