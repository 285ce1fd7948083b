//! `bench-read`: the same shape of read again and again against a server, for sizing it
//! and for profiling it (`./dev profile` drives a server under callgrind with it).

use super::*;

#[derive(Debug, clap::Args)]
pub(super) struct BenchReadArgs {
    /// The surface of every key.
    #[arg(long)]
    pub(super) surface: String,
    /// Users are drawn at random from 1 to this.
    #[arg(long)]
    pub(super) users: u64,
    /// Keys per request.
    #[arg(long, default_value_t = 500)]
    pub(super) keys: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 1000)]
    pub(super) requests: u64,
    /// Requests in flight at once, on one connection.
    #[arg(long, default_value_t = 1)]
    pub(super) concurrency: usize,
    /// Features to read (comma separated); every feature of the surface when absent.
    #[arg(long, value_delimiter = ',')]
    pub(super) feature: Vec<String>,
}

/// Sends the reads and prints what they took.
pub(super) async fn bench_read(
    args: BenchReadArgs,
    client: &Client,
    call: &dyn Fn(crate::ClientError) -> anyhow::Error,
    out: &mut dyn Write,
) -> anyhow::Result<u8> {
    if args.users == 0 || args.keys == 0 || args.concurrency == 0 {
        bail!("--users, --keys and --concurrency must be at least 1");
    }
    let started = std::time::Instant::now();
    let mut lanes = tokio::task::JoinSet::new();
    for lane in 0..args.concurrency as u64 {
        let client = client.clone();
        let requests = args.requests / args.concurrency as u64
            + u64::from(lane < args.requests % args.concurrency as u64);
        let (surface, features, users, keys) = (
            args.surface.clone(),
            args.feature.clone(),
            args.users,
            args.keys,
        );
        lanes.spawn(async move {
            // xorshift: reproducible users, no dependency.
            let mut state = 0x9e37_79b9_7f4a_7c15 ^ (lane + 1);
            let mut latencies = Vec::with_capacity(requests as usize);
            for _ in 0..requests {
                let request = ReadRequest {
                    keys: (0..keys)
                        .map(|_| {
                            state ^= state << 13;
                            state ^= state >> 7;
                            state ^= state << 17;
                            ReadKey {
                                user_id: 1 + state % users,
                                surface: surface.clone(),
                            }
                        })
                        .collect(),
                    features: features.clone(),
                    include_event_times: false,
                };
                let sent = std::time::Instant::now();
                client.get_features(request).await?;
                latencies.push(sent.elapsed());
            }
            Ok::<_, crate::ClientError>(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(args.requests as usize);
    while let Some(lane) = lanes.join_next().await {
        latencies.extend(lane.context("a reading task")?.map_err(call)?);
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let quantile = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0, |latency| latency.as_micros())
    };
    let requests = latencies.len() as f64;
    writeln!(
        out,
        "requests  keys/request  seconds  requests/s  keys/s  p50 µs  p99 µs  max µs"
    )?;
    writeln!(
        out,
        "{:<9} {:<13} {:<8.2} {:<11.0} {:<7.0} {:<7} {:<7} {}",
        latencies.len(),
        args.keys,
        seconds,
        requests / seconds,
        requests * args.keys as f64 / seconds,
        quantile(0.5),
        quantile(0.99),
        quantile(1.0),
    )?;
    Ok(EXIT_SUCCESS)
}
