//! Prometheus metrics: what the server counts as it works ([`Metrics`]), the figures it
//! reads at each scrape (RocksDB, the policy in force, bulk-load jobs), and the HTTP
//! endpoint that serves them in the Prometheus text format ([`serve`]).
//!
//! Every label takes its values from a small fixed set (methods, status codes, batch-size
//! buckets, surfaces, reasons, states); nothing about a user ever becomes a label.

mod engine;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use featurestore::proto;
use parking_lot::RwLock;
use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::core::read_tally::{AGE_BUCKETS_SECONDS, ReadTally, SurfaceAges};
use crate::methods::{Needs, needs};
use crate::policy::bundle::reason_name;
use crate::registry::SurfaceId;
use crate::staging::JobState;
use engine::RocksdbGauges;

/// Upper bounds of the request-duration buckets, in seconds: 100 µs to 10 s.
const DURATION_BUCKETS_SECONDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Reads are timed per batch-size bucket: the largest batch of each and its label.
const READ_BATCH_BUCKETS: [(usize, &str); 5] = [
    (1, "1"),
    (10, "2-10"),
    (100, "11-100"),
    (500, "101-500"),
    (usize::MAX, "501+"),
];

/// Scrapes rendered at once; more wait their turn.
const SCRAPES_AT_ONCE: usize = 2;

/// Jobs read at a scrape to count them by state.
const JOBS_COUNTED_MAX: usize = 10_000;

/// The label of a read's batch size.
pub fn read_batch_label(keys: usize) -> &'static str {
    READ_BATCH_BUCKETS
        .iter()
        .find(|(largest, _)| keys <= *largest)
        .map_or("501+", |(_, label)| label)
}

/// A label value shared by many label sets without copying it: a gRPC service or method
/// name, a surface.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    grpc_service: Name,
    grpc_method: Name,
    grpc_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BatchLabels {
    batch_keys: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SurfaceLabels {
    surface: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BundleLabels {
    version: String,
    hash: String,
}

/// A histogram of served-value ages that takes a whole read at once: the read path counts
/// its values into an [`AgeTally`] and adds it here once, rather than touching shared
/// counters per value.
#[derive(Clone, Debug, Default)]
struct AgeHistogram(Arc<AgeCounts>);

#[derive(Debug, Default)]
struct AgeCounts {
    /// One counter per bucket of [`AGE_BUCKETS_SECONDS`], then one for older values.
    buckets: [AtomicU64; AGE_BUCKETS_SECONDS.len() + 1],
    count: AtomicU64,
    /// The sum of the ages in seconds, an `f64` in its bits (whole seconds would overflow
    /// no sooner, and lose every request's fractions).
    sum_seconds: AtomicU64,
}

impl AgeHistogram {
    fn add(&self, tally: &SurfaceAges) {
        let counts = &self.0;
        for (bucket, &count) in counts.buckets.iter().zip(&tally.buckets) {
            if count > 0 {
                bucket.fetch_add(count, Ordering::Relaxed);
            }
        }
        counts.count.fetch_add(tally.count, Ordering::Relaxed);
        let seconds = tally.sum_micros as f64 / 1e6;
        let _ = counts
            .sum_seconds
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |sum| {
                Some((f64::from_bits(sum) + seconds).to_bits())
            });
    }
}

impl TypedMetric for AgeHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AgeHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        let counts = &self.0;
        let buckets: Vec<(f64, u64)> = AGE_BUCKETS_SECONDS
            .iter()
            .map(|&bound| bound as f64)
            .chain(std::iter::once(f64::INFINITY))
            .zip(&counts.buckets)
            .map(|(bound, count)| (bound, count.load(Ordering::Relaxed)))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(
            f64::from_bits(counts.sum_seconds.load(Ordering::Relaxed)),
            counts.count.load(Ordering::Relaxed),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The gRPC service and method of a request path, as labels.
#[derive(Clone, Debug)]
pub struct Method {
    service: Name,
    method: Name,
}

/// Every metric of one server. Each server has its own registry (no global state), so
/// several servers in one process (as in the tests) count separately.
pub struct Metrics {
    registry: Registry,
    /// Label values of the methods seen so far; only paths with an access rule get their
    /// own, so that a caller cannot grow the set with made-up paths.
    methods: RwLock<HashMap<String, Method>>,
    unknown_method: Method,
    requests: Family<RequestLabels, Histogram>,
    reads: Family<BatchLabels, Histogram>,
    read_keys: Family<StatusLabels, Counter>,
    read_values: Family<StatusLabels, Counter>,
    /// Per registered surface, by surface id.
    value_ages: HashMap<SurfaceId, AgeHistogram>,
    write_verdicts: Family<VerdictLabels, Counter>,
    write_outcomes: Family<OutcomeLabels, Counter>,
    write_refusals: Family<ReasonLabels, Counter>,
    bulk_load_rows: Family<ResultLabels, Counter>,
    /// Changed TLS files found by the periodic check: put in force, or refused.
    tls_reloads: Family<ResultLabels, Counter>,
    bulk_load_jobs: Family<StateLabels, Gauge>,
    policy_bundle: Family<BundleLabels, Gauge>,
    policy_loaded_at: Gauge<f64, AtomicU64>,
    uptime: Gauge<f64, AtomicU64>,
    started: Instant,
    rocksdb: RocksdbGauges,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

const ROW_STATUSES: [proto::RowStatus; 4] = [
    proto::RowStatus::Ok,
    proto::RowStatus::UnknownSurface,
    proto::RowStatus::DataLoss,
    proto::RowStatus::Unavailable,
];

const VALUE_STATUSES: [proto::ValueStatus; 6] = [
    proto::ValueStatus::Present,
    proto::ValueStatus::NotFound,
    proto::ValueStatus::Expired,
    proto::ValueStatus::Defaulted,
    proto::ValueStatus::NotRegisteredForSurface,
    proto::ValueStatus::WithheldByPolicy,
];

fn row_status_label(status: proto::RowStatus) -> &'static str {
    match status {
        proto::RowStatus::Unspecified => "unspecified",
        proto::RowStatus::Ok => "ok",
        proto::RowStatus::UnknownSurface => "unknown_surface",
        proto::RowStatus::DataLoss => "data_loss",
        proto::RowStatus::Unavailable => "unavailable",
    }
}

fn value_status_label(status: proto::ValueStatus) -> &'static str {
    match status {
        proto::ValueStatus::Unspecified => "unspecified",
        proto::ValueStatus::Present => "present",
        proto::ValueStatus::NotFound => "not_found",
        proto::ValueStatus::Expired => "expired",
        proto::ValueStatus::Defaulted => "defaulted",
        proto::ValueStatus::NotRegisteredForSurface => "not_registered_for_surface",
        proto::ValueStatus::WithheldByPolicy => "withheld_by_policy",
    }
}

/// The conventional name of a gRPC status code, from its number.
pub fn code_label(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl Metrics {
    /// The metrics of a server whose registry has these surfaces.
    pub fn new(surfaces: impl IntoIterator<Item = (SurfaceId, String)>) -> Metrics {
        let mut registry = Registry::with_prefix("featurestore");
        let rocksdb = RocksdbGauges::default();
        rocksdb.register(registry.sub_registry_with_prefix("rocksdb"));
        let (read_keys, read_values) = read_statuses(&mut registry);
        Metrics {
            methods: RwLock::new(HashMap::new()),
            unknown_method: Method {
                service: Name("unknown".into()),
                method: Name("unknown".into()),
            },
            requests: registered(
                &mut registry,
                "grpc_request_duration_seconds",
                "Time from a call's headers to its last response byte, by method and status code",
                durations(),
            ),
            reads: registered(
                &mut registry,
                "read_duration_seconds",
                "Time of successful GetFeatures calls by batch size (keys per request)",
                durations(),
            ),
            read_keys,
            read_values,
            value_ages: value_ages(&mut registry, surfaces),
            write_verdicts: registered(
                &mut registry,
                "write_verdicts",
                "Feature values of WriteFeatures calls, by verdict over their target surfaces",
                Family::default(),
            ),
            write_outcomes: registered(
                &mut registry,
                "write_outcomes",
                "(value, target surface) pairs of WriteFeatures calls, by outcome",
                Family::default(),
            ),
            write_refusals: registered(
                &mut registry,
                "write_refusals",
                "(value, target surface) pairs refused by WriteFeatures, by reason (a pair refused for two reasons counts under both)",
                Family::default(),
            ),
            tls_reloads: registered(
                &mut registry,
                "tls_reloads",
                "changed TLS certificate files found by the periodic check, by result (loaded: put in force; refused: they do not load, the previous ones stay)",
                Family::default(),
            ),
            bulk_load_rows: registered(
                &mut registry,
                "bulk_load_rows",
                "Rows of bulk-load chunks made durable, by what they became",
                Family::default(),
            ),
            bulk_load_jobs: registered(
                &mut registry,
                "bulk_load_jobs",
                "Bulk-load jobs on record, by state",
                Family::default(),
            ),
            policy_bundle: registered(
                &mut registry,
                "policy_bundle_info",
                "The policy bundle in force: its version and content hash (value 1)",
                Family::default(),
            ),
            policy_loaded_at: registered(
                &mut registry,
                "policy_bundle_loaded_timestamp_seconds",
                "When the policy bundle in force was loaded (Unix time)",
                Gauge::default(),
            ),
            uptime: registered(
                &mut registry,
                "uptime_seconds",
                "Time since the server started",
                Gauge::default(),
            ),
            started: crate::clock::monotonic_now(),
            rocksdb,
            registry,
        }
    }

    /// The labels of the method at `path` (`/package.Service/Method`).
    pub fn method(&self, path: &str) -> Method {
        if let Some(method) = self.methods.read().get(path) {
            return method.clone();
        }
        let split = path.strip_prefix('/').and_then(|path| path.split_once('/'));
        let (Some((service, method)), false) = (split, needs(path) == Needs::Refused) else {
            return self.unknown_method.clone();
        };
        let labels = Method {
            service: Name(service.into()),
            method: Name(method.into()),
        };
        self.methods
            .write()
            .entry(path.to_string())
            .or_insert(labels)
            .clone()
    }

    /// Counts a finished call.
    pub fn request(&self, method: &Method, code: tonic::Code, duration: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                grpc_service: method.service.clone(),
                grpc_method: method.method.clone(),
                grpc_code: code_label(code),
            })
            .observe(duration.as_secs_f64());
    }

    /// Times a successful read of `keys` keys.
    pub fn read_duration(&self, keys: usize, duration: Duration) {
        self.reads
            .get_or_create(&BatchLabels {
                batch_keys: read_batch_label(keys),
            })
            .observe(duration.as_secs_f64());
    }

    /// Counts what a read served.
    pub fn read(&self, tally: &ReadTally) {
        for status in ROW_STATUSES {
            let count = tally.rows[status as usize];
            if count > 0 {
                self.read_keys
                    .get_or_create(&StatusLabels {
                        status: row_status_label(status),
                    })
                    .inc_by(count);
            }
        }
        for status in VALUE_STATUSES {
            let count = tally.values[status as usize];
            if count > 0 {
                self.read_values
                    .get_or_create(&StatusLabels {
                        status: value_status_label(status),
                    })
                    .inc_by(count);
            }
        }
        for (surface, ages) in &tally.ages {
            if ages.count == 0 {
                continue;
            }
            if let Some(histogram) = self.value_ages.get(surface) {
                histogram.add(ages);
            }
        }
    }

    /// Counts the verdicts and outcomes of a write (a replayed answer counts nothing: it
    /// wrote nothing).
    pub fn write(&self, response: &proto::WriteFeaturesResponse) {
        if response.replayed {
            return;
        }
        let mut verdicts = [0u64; 4];
        let mut outcomes = [0u64; 5];
        let mut reasons: Vec<(i32, u64)> = Vec::new();
        for verdict in response.rows.iter().flat_map(|row| &row.verdicts) {
            if let Some(count) = usize::try_from(verdict.verdict)
                .ok()
                .and_then(|index| verdicts.get_mut(index))
            {
                *count += 1;
            }
            for surface in &verdict.surfaces {
                if let Some(count) = usize::try_from(surface.outcome)
                    .ok()
                    .and_then(|index| outcomes.get_mut(index))
                {
                    *count += 1;
                }
                for &reason in &surface.reasons {
                    match reasons.iter_mut().find(|(code, _)| *code == reason) {
                        Some((_, count)) => *count += 1,
                        None => reasons.push((reason, 1)),
                    }
                }
            }
        }
        for (index, count) in verdicts.into_iter().enumerate() {
            let Ok(verdict) = proto::Verdict::try_from(index as i32) else {
                continue;
            };
            if count > 0 {
                self.write_verdicts
                    .get_or_create(&VerdictLabels {
                        verdict: verdict_label(verdict),
                    })
                    .inc_by(count);
            }
        }
        for (index, count) in outcomes.into_iter().enumerate() {
            let Ok(outcome) = proto::Outcome::try_from(index as i32) else {
                continue;
            };
            if count > 0 {
                self.write_outcomes
                    .get_or_create(&OutcomeLabels {
                        outcome: outcome_label(outcome),
                    })
                    .inc_by(count);
            }
        }
        for (reason, count) in reasons {
            let reason =
                proto::ReasonCode::try_from(reason).map_or("unknown", |reason| reason_name(reason));
            self.write_refusals
                .get_or_create(&ReasonLabels { reason })
                .inc_by(count);
        }
    }

    /// Counts the rows of a bulk-load chunk made durable.
    pub fn bulk_load_chunk(&self, summary: &proto::LoadSummary) {
        for (result, count) in [
            ("accepted", summary.rows_accepted),
            ("transformed", summary.rows_transformed),
            ("denied", summary.rows_denied),
            ("invalid", summary.rows_invalid),
        ] {
            if count > 0 {
                self.bulk_load_rows
                    .get_or_create(&ResultLabels { result })
                    .inc_by(count);
            }
        }
    }

    /// Counts a check of the TLS files that found them changed: `loaded` when the new ones
    /// were put in force.
    pub fn tls_reload(&self, loaded: bool) {
        let result = if loaded { "loaded" } else { "refused" };
        self.tls_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Reads the figures kept elsewhere (RocksDB, the policy in force, job records) and
    /// renders every metric in the Prometheus text format. Blocking: reads the database.
    pub fn render(&self, core: &Core) -> Result<String, crate::error::Error> {
        let figures = core.engine_figures()?;
        self.rocksdb.set(&figures);
        let in_force = core.policy_in_force();
        self.policy_bundle.clear();
        self.policy_bundle
            .get_or_create(&BundleLabels {
                version: in_force.policy.version.clone(),
                hash: in_force.policy.hash.clone(),
            })
            .set(1);
        self.policy_loaded_at
            .set(in_force.loaded_at.unix_micros() as f64 / 1e6);
        self.uptime.set(self.started.elapsed().as_secs_f64());
        let jobs = core.load_jobs(JOBS_COUNTED_MAX)?;
        for (state, label) in [
            (JobState::Open, "open"),
            (JobState::Committing, "committing"),
            (JobState::Committed, "committed"),
            (JobState::Aborted, "aborted"),
        ] {
            let count = jobs.iter().filter(|job| job.state == state).count();
            self.bulk_load_jobs
                .get_or_create(&StateLabels { state: label })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .map_err(|_| crate::error::Error::Task("cannot render the metrics".to_string()))?;
        Ok(text)
    }
}

/// A family of request-duration histograms.
fn durations<L: Clone + std::hash::Hash + Eq>() -> Family<L, Histogram> {
    fn histogram() -> Histogram {
        Histogram::new(DURATION_BUCKETS_SECONDS.iter().copied())
    }
    Family::new_with_constructor(histogram as fn() -> Histogram)
}

/// Registers `metric` under `name` and returns it, to be kept and counted into.
fn registered<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// The keys and cells a read answered, by status; every status shown from the start, at
/// zero, so that rates work at once.
fn read_statuses(
    registry: &mut Registry,
) -> (Family<StatusLabels, Counter>, Family<StatusLabels, Counter>) {
    let read_keys = registered(
        registry,
        "read_keys",
        "Keys answered by GetFeatures, by row status",
        Family::<StatusLabels, Counter>::default(),
    );
    let read_values = registered(
        registry,
        "read_values",
        "Cells answered by GetFeatures (key x feature), by value status",
        Family::<StatusLabels, Counter>::default(),
    );
    for status in ROW_STATUSES {
        drop(read_keys.get_or_create(&StatusLabels {
            status: row_status_label(status),
        }));
    }
    for status in VALUE_STATUSES {
        drop(read_values.get_or_create(&StatusLabels {
            status: value_status_label(status),
        }));
    }
    (read_keys, read_values)
}

/// The age histogram of the values served on each surface, by surface id.
fn value_ages(
    registry: &mut Registry,
    surfaces: impl IntoIterator<Item = (SurfaceId, String)>,
) -> HashMap<SurfaceId, AgeHistogram> {
    let ages = Family::<SurfaceLabels, AgeHistogram>::default();
    let value_ages = surfaces
        .into_iter()
        .map(|(id, name)| {
            let histogram = ages
                .get_or_create(&SurfaceLabels {
                    surface: Name(name.into()),
                })
                .clone();
            (id, histogram)
        })
        .collect();
    registry.register(
        "served_value_age_seconds",
        "Age of each value served (now minus the event time it was derived from), by surface",
        ages,
    );
    value_ages
}

fn verdict_label(verdict: proto::Verdict) -> &'static str {
    match verdict {
        proto::Verdict::Unspecified => "unspecified",
        proto::Verdict::Allow => "allow",
        proto::Verdict::AllowWithTransform => "allow_with_transform",
        proto::Verdict::Deny => "deny",
    }
}

fn outcome_label(outcome: proto::Outcome) -> &'static str {
    match outcome {
        proto::Outcome::Unspecified => "unspecified",
        proto::Outcome::Admitted => "admitted",
        proto::Outcome::Stored => "stored",
        proto::Outcome::Superseded => "superseded",
        proto::Outcome::Refused => "refused",
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    core: Arc<Core>,
    shutdown: CancellationToken,
) {
    use axum::http::{StatusCode, header};
    let scrape = move || {
        let metrics = Arc::clone(&metrics);
        let core = Arc::clone(&core);
        async move {
            match tokio::task::spawn_blocking(move || metrics.render(&core)).await {
                Ok(Ok(text)) => (
                    StatusCode::OK,
                    [(
                        header::CONTENT_TYPE,
                        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    )],
                    text,
                ),
                Ok(Err(error)) => {
                    tracing::error!(%error, "cannot collect the metrics");
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                        format!("cannot collect the metrics: {error}\n"),
                    )
                }
                Err(error) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    format!("cannot collect the metrics: {error}\n"),
                ),
            }
        }
    };
    // Each scrape reads the database; a few at once is plenty for any number of scrapers.
    let router = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .layer(tower::limit::ConcurrencyLimitLayer::new(SCRAPES_AT_ONCE));
    if let Err(error) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(%error, "the metrics endpoint failed");
    }
}

#[cfg(test)]
mod tests;
