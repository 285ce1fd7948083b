//! What the serving benchmarks share: the workloads, the closed- and open-loop load
//! generator, and the CPU accounting of the server's and the generator's threads.

use std::time::{Duration, Instant};

use featurestore::domain::{ReadKey, ReadRequest, WriteRequest};
use featurestore_client::Client;
use featurestore_tests::workload::{Random, SURFACES, random_read, user_write};
use hdrhistogram::Histogram;

pub fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// The workloads; each builds its next request from the random source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Workload {
    /// 500 random keys × the 20 floats.
    Batch500,
    /// One user on the 3 surfaces, every feature.
    User3,
    /// 3 keys at concurrency 1: pure latency.
    Latency3,
    /// One random key × the 20 floats: the per-request overhead.
    Key1,
    /// 90 % the 500-key read, 10 % a one-row write.
    Mixed,
    /// The 500-key read while a bulk load of other users runs.
    DuringLoad,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Batch500 => "(a) 500 keys x 20 floats",
            Workload::User3 => "(b) 1 user x 3 surfaces",
            Workload::Latency3 => "(c) 3 keys, concurrency 1",
            Workload::Key1 => "(f) 1 key x 20 floats",
            Workload::Mixed => "(d) 90% (a) reads, 10% writes",
            Workload::DuringLoad => "(e) (a) during a bulk load",
        }
    }

    pub fn read(self, random: &mut Random, users: u64) -> ReadRequest {
        match self {
            Workload::Batch500 | Workload::Mixed | Workload::DuringLoad => {
                random_read(random, users, 500)
            }
            Workload::Key1 => random_read(random, users, 1),
            Workload::User3 | Workload::Latency3 => {
                let user_id = 1 + random.below(users);
                ReadRequest {
                    keys: SURFACES
                        .iter()
                        .map(|surface| ReadKey {
                            user_id,
                            surface: surface.to_string(),
                        })
                        .collect(),
                    features: Vec::new(),
                    include_event_times: false,
                }
            }
        }
    }
}

fn write_request(random: &mut Random, users: u64, sequence: u64) -> WriteRequest {
    let user_id = 1 + random.below(users);
    WriteRequest {
        idempotency_key: format!("bench-{sequence}-{user_id}"),
        rows: vec![user_write(user_id, "bench@v1")],
    }
}

/// CPU seconds used so far by the server (its runtime, the threads reading parts of large
/// reads, RocksDB's threads, the threads of its Redis connections) and by the
/// load generator's runtime, from /proc. The server's share is the process's total minus
/// every other live thread, so that blocking-pool threads that have exited still count.
pub fn cpu_seconds() -> (f64, f64) {
    let ticks = 100.0; // USER_HZ on Linux
    // (name, user + system ticks) of a /proc stat file.
    let read = |path: std::path::PathBuf| -> Option<(String, u64)> {
        let stat = std::fs::read_to_string(path).ok()?;
        let (open, close) = (stat.find('(')?, stat.rfind(')')?);
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let used = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some((stat[open + 1..close].to_string(), used))
    };
    let Some((_, total)) = read("/proc/self/stat".into()) else {
        return (f64::NAN, f64::NAN);
    };
    let (mut client, mut others) = (0u64, 0u64);
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let Some((name, used)) = read(task.path().join("stat")) else {
                continue;
            };
            if name.starts_with("bench-client") {
                client += used;
            }
            if !(name.starts_with("server")
                || name.starts_with("fs-read")
                || name.starts_with("rocksdb")
                || name.starts_with("redis-io"))
            {
                others += used;
            }
        }
    }
    (
        total.saturating_sub(others) as f64 / ticks,
        client as f64 / ticks,
    )
}

/// CPU seconds the processes `pids` have used so far (user + system), from /proc.
pub fn processes_cpu(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum::<u64>() as f64
        / 100.0
}

#[derive(Debug)]
pub struct Measured {
    pub requests: u64,
    pub keys: u64,
    pub seconds: f64,
    pub latency: Histogram<u64>,
    pub server_cpu: f64,
    pub client_cpu: f64,
}

impl Measured {
    pub fn per_second(&self, count: u64) -> f64 {
        count as f64 / self.seconds
    }

    pub fn micros(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64
    }

    /// Nothing measured yet.
    pub fn nothing() -> Measured {
        Measured {
            requests: 0,
            keys: 0,
            seconds: 0.0,
            latency: Histogram::<u64>::new(3).expect("histogram"),
            server_cpu: 0.0,
            client_cpu: 0.0,
        }
    }

    /// Adds what one lane of a loop measured: its requests, keys and latencies.
    pub fn add_lane(&mut self, (requests, keys, latency): (u64, u64, Histogram<u64>)) {
        self.requests += requests;
        self.keys += keys;
        self.latency.add(latency).expect("same precision");
    }

    /// Microseconds of the server's CPU per request.
    pub fn server_cpu_per_request(&self) -> f64 {
        self.server_cpu * 1e6 / self.requests.max(1) as f64
    }

    /// Microseconds of the server's CPU per key read.
    pub fn server_cpu_per_key(&self) -> f64 {
        self.server_cpu * 1e6 / self.keys.max(1) as f64
    }
}

/// Runs `workload` for `duration`: closed loop with `concurrency` requests in flight when
/// `rate` is `None`, else open loop at `rate` requests per second, each latency measured
/// from when the request was due (no coordinated omission).
pub async fn drive(
    clients: &[Client],
    workload: Workload,
    users: u64,
    concurrency: usize,
    rate: Option<f64>,
    duration: Duration,
) -> Measured {
    let started = Instant::now();
    let cpu_before = cpu_seconds();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    let lanes = match rate {
        Some(_) => concurrency.max(64),
        None => concurrency,
    };
    let interval = rate.map(|rate| Duration::from_secs_f64(lanes as f64 / rate));
    for lane in 0..lanes {
        let client = clients[lane % clients.len()].clone();
        tasks.spawn(async move {
            let mut random = Random(0x5eed + lane as u64);
            let mut latency = Histogram::<u64>::new(3).expect("histogram");
            let (mut requests, mut keys) = (0u64, 0u64);
            // Open loop: each lane's requests are due at fixed times, spread over lanes.
            let mut due = Instant::now()
                + interval.map_or(Duration::ZERO, |interval| {
                    interval.mul_f64(lane as f64 / lanes as f64)
                });
            while Instant::now() < deadline {
                if interval.is_some() {
                    tokio::time::sleep_until(due.into()).await;
                }
                let start = if interval.is_some() {
                    due
                } else {
                    Instant::now()
                };
                if workload == Workload::Mixed && random.below(10) == 0 {
                    let request = write_request(&mut random, users, requests);
                    client.write_features(request).await.expect("write");
                } else {
                    let request = workload.read(&mut random, users);
                    keys += request.keys.len() as u64;
                    client.get_features(request).await.expect("read");
                }
                requests += 1;
                let _ = latency.record(start.elapsed().as_micros() as u64);
                if let Some(interval) = interval {
                    due += interval;
                }
            }
            (requests, keys, latency)
        });
    }
    let mut measured = Measured::nothing();
    while let Some(lane) = tasks.join_next().await {
        measured.add_lane(lane.expect("lane"));
    }
    measured.seconds = started.elapsed().as_secs_f64();
    let cpu_after = cpu_seconds();
    measured.server_cpu = cpu_after.0 - cpu_before.0;
    measured.client_cpu = cpu_after.1 - cpu_before.1;
    measured
}

/// The machine's load average (1, 5 and 15 minutes) and its cores, for a report.
pub fn machine() -> (String, usize) {
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |cores| cores.get());
    (load, cores)
}
