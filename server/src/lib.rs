//! The feature store server: configuration, the registry, the storage engine, the domain
//! core and the gRPC service, assembled by [`run`].

pub mod audit;
pub mod body;
pub mod clock;
pub mod config;
pub mod connection_info;
pub mod connections;
pub mod core;
pub mod erasure;
pub mod error;
pub mod logging;
pub mod methods;
pub mod metrics;
pub mod observe;
pub mod policy;
pub mod registry;
pub mod service;
pub mod staging;
pub mod storage;
pub mod ticker;
pub mod tls;

use std::sync::Arc;

use anyhow::Context;
use featurestore::proto::admin_server::AdminServer;
use featurestore::proto::backfill_server::BackfillServer;
use featurestore::proto::feature_store_server::FeatureStoreServer;
use featurestore::proto::privacy_server::PrivacyServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::core::{Core, CoreOptions};
use crate::policy::Policy;
use crate::registry::Registry;
use crate::service::{FeatureStoreService, auth, gate, health};
use crate::storage::{RocksStore, Store};

/// The sockets a server answers on.
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC port.
    pub grpc: TcpListener,
    /// The metrics endpoint's port; no endpoint when `None`.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses of `config`: the gRPC port, and the metrics endpoint's when
    /// metrics are on.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let grpc = TcpListener::bind(config.listen_address)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen_address))?;
        let metrics =
            if config.observability.metrics_enabled {
                let address = config.observability.metrics_listen_address;
                Some(TcpListener::bind(address).await.with_context(|| {
                    format!("cannot listen on {address} for the metrics endpoint")
                })?)
            } else {
                None
            };
        Ok(Listeners { grpc, metrics })
    }
}

impl From<TcpListener> for Listeners {
    /// The gRPC port alone, without a metrics endpoint.
    fn from(grpc: TcpListener) -> Listeners {
        Listeners {
            grpc,
            metrics: None,
        }
    }
}

/// Serves on `listeners` until `shutdown` is cancelled, with the system clock.
pub async fn run(
    listeners: impl Into<Listeners>,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_clock(listeners, config, Arc::new(SystemClock), shutdown).await
}

/// Serves on `listeners` until `shutdown` is cancelled. At shutdown the health service
/// turns NOT_SERVING, in-flight requests get `limits.shutdown_grace` to finish, and the
/// database is flushed.
pub async fn run_with_clock(
    listeners: impl Into<Listeners>,
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Listeners {
        grpc: listener,
        metrics: metrics_listener,
    } = listeners.into();
    let registry = match &config.registry_path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the feature registry {}", path.display()))?;
            Registry::from_toml(&text)
                .with_context(|| format!("feature registry {}", path.display()))?
        }
        None => Registry::embedded_default(),
    };
    tracing::info!(
        registry = %config.registry_path.as_ref().map_or("embedded default".into(), |path| path.display().to_string()),
        surfaces = registry.surfaces().len(),
        sources = registry.sources().len(),
        features = registry.features().len(),
        "feature registry loaded"
    );
    let authenticator = Arc::new(auth::Authenticator::new(
        &config.auth,
        &registry,
        config
            .tls
            .as_ref()
            .is_some_and(|tls| tls.client_ca_path.is_some()),
    )?);
    if authenticator.mode() == config::AuthMode::Disabled {
        let address = listener.local_addr()?;
        anyhow::ensure!(
            address.ip().is_loopback(),
            "authentication is disabled, so the server listens only on a loopback address, not \
             {address}: configure [auth] principals to serve other machines"
        );
        tracing::warn!(
            "authentication is DISABLED (auth.mode = \"disabled\"): every caller may read, \
             write, erase users and administer the server. Use this on a development machine only"
        );
    } else {
        tracing::info!(
            principals = config.auth.principals.len(),
            "authentication required"
        );
    }
    let tls = config.tls.as_ref().map(tls::Tls::load).transpose()?;
    let connections = connections::Connections::new(
        connections::ConnectionLimits {
            connections_max: config.limits.connections_max,
            preface_timeout: config.limits.connection_preface_timeout,
            idle_timeout: config.limits.connection_idle_timeout,
        }
        .within_descriptors(config.storage.max_open_files)?,
    );
    // From here until the core is ready the port answers health checks (NOT_SERVING) and
    // refuses every other call with UNAVAILABLE, rather than leaving callers hanging.
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health::set_all(&health_reporter, tonic_health::ServingStatus::NotServing).await;
    let (listener, starting) = serve_while_starting(
        listener,
        tls.clone(),
        Arc::clone(&connections),
        health_service.clone(),
    )?;
    let policy = match &config.policy_bundle_path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the policy bundle {}", path.display()))?;
            Policy::from_toml(&text, &registry)
                .with_context(|| format!("policy bundle {}", path.display()))?
        }
        None => Policy::embedded_default(&registry).context("the embedded policy bundle")?,
    };
    tracing::info!(
        version = %policy.version,
        hash = %policy.hash,
        rules = policy.rules.iter().filter(|rule| rule.enabled).count(),
        "policy bundle loaded"
    );
    let store = {
        let config = config.clone();
        let clock = Arc::clone(&clock);
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&config.data_dir).with_context(|| {
                format!(
                    "cannot create the data directory {}",
                    config.data_dir.display()
                )
            })?;
            RocksStore::open(
                &config.data_dir,
                &config.storage,
                config.durability,
                config.idempotency_window,
                clock,
            )
            .with_context(|| format!("cannot open the database in {}", config.data_dir.display()))
        })
        .await??
    };
    let store: Arc<dyn Store> = Arc::new(store);
    let core = {
        let options = CoreOptions {
            policy_path: config.policy_bundle_path.clone(),
            idempotency_window: config.idempotency_window,
            interaction_time_skew_allowance: config.interaction_time_skew_allowance,
            ledger_path: config.erasure_ledger_path.clone(),
            backup_dir: config.backup_dir.clone(),
            bulk_load: config.bulk_load.clone(),
        };
        tokio::task::spawn_blocking(move || {
            let core = Arc::new(Core::new(
                Arc::new(registry),
                Arc::new(policy),
                store,
                clock,
                options,
            )?);
            core.start()?;
            Ok::<_, error::Error>(core)
        })
        .await?
        .context("cannot start the feature store's core")?
    };
    // Background work stops with the server, and is waited for before the database is
    // flushed and closed, so that a new server can open the same directory at once.
    let background = shutdown.child_token();
    let mut background_tasks = tokio::task::JoinSet::new();
    #[cfg(unix)]
    background_tasks.spawn(reload_on_hangup(Arc::clone(&core), background.clone()));
    if !config.retention_sweep_interval.is_zero() {
        background_tasks.spawn(sweep_periodically(
            Arc::clone(&core),
            config.retention_sweep_interval,
            background.clone(),
        ));
    }
    let limits = &config.limits;
    let metrics = config.observability.metrics_enabled.then(|| {
        Arc::new(metrics::Metrics::new(
            core.registry
                .surfaces()
                .iter()
                .map(|surface| (surface.id, surface.name.clone())),
        ))
    });
    if let (Some(metrics), Some(listener)) = (&metrics, metrics_listener) {
        tracing::info!(address = %listener.local_addr()?, "metrics endpoint: GET /metrics");
        background_tasks.spawn(metrics::serve(
            listener,
            Arc::clone(metrics),
            Arc::clone(&core),
            background.clone(),
        ));
    }
    let memory_budget = service::budget::MemoryBudget::new(limits.request_bytes_in_flight()?);
    let core_to_stop = Arc::clone(&core);
    let handlers = FeatureStoreService::new(
        core,
        service::ServiceOptions {
            limits: limits.request_limits(),
            concurrent_requests_max: limits.concurrent_requests_max,
            inline_read_keys_max: limits.inline_read_keys_max,
            chunks_decided_at_once: config.bulk_load.chunks_decided_at_once,
            metrics: metrics.clone(),
            config_shown: config.shown()?,
            stats_rows_sampled: config.observability.stats_rows_sampled,
        },
        background.clone(),
    );
    let service = FeatureStoreServer::new(handlers.clone())
        .max_decoding_message_size(limits.decode_message_bytes_max)
        .max_encoding_message_size(limits.encode_message_bytes_max);
    let privacy = PrivacyServer::new(handlers.clone())
        .max_decoding_message_size(limits.decode_message_bytes_max)
        .max_encoding_message_size(limits.encode_message_bytes_max);
    let backfill = BackfillServer::new(handlers.clone())
        .max_decoding_message_size(limits.decode_message_bytes_max)
        .max_encoding_message_size(limits.encode_message_bytes_max);
    let admin = AdminServer::new(handlers)
        .max_decoding_message_size(limits.decode_message_bytes_max)
        .max_encoding_message_size(limits.encode_message_bytes_max);

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(featurestore::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(featurestore::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    background_tasks.spawn(health::watch_storage(
        Arc::clone(&core_to_stop),
        health_reporter.clone(),
        config.storage.health_probe_interval,
        background.clone(),
    ));
    let address = listener.local_addr()?;
    // The starting server stops accepting; the one below takes the port over.
    drop(starting);
    health::set_all(&health_reporter, tonic_health::ServingStatus::Serving).await;
    tracing::info!(%address, tls = config.tls.is_some(), data_dir = %config.data_dir.display(), durability = ?config.durability, "serving");
    if let Some(tls) = &tls {
        background_tasks.spawn(tls::reload_periodically(
            Arc::clone(tls),
            metrics.clone(),
            background.clone(),
        ));
    }
    let stop_accepting = shutdown.clone();
    let connections_at_shutdown = Arc::clone(&connections);
    let server = tonic::transport::Server::builder()
        .timeout(limits.request_timeout)
        .max_concurrent_streams(Some(limits.concurrent_streams_per_connection_max))
        // Both flood limits are set explicitly: left unset, tonic turns the second off.
        .http2_max_pending_accept_reset_streams(Some(limits.pending_accept_reset_streams_max))
        .http2_max_local_error_reset_streams(Some(limits.local_error_reset_streams_max))
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .layer(connections::calls_layer())
        .layer(observe::ObserveLayer::new(
            metrics,
            config.observability.slow_request_threshold,
        ))
        .layer(gate::GateLayer::new(gate::GrpcContentType))
        .layer(gate::GateLayer::new(authenticator))
        .layer(service::deadline::DeadlineLayer)
        .layer(memory_budget.layer())
        .layer(tower::util::MapResponseLayer::new(
            oversized_request_is_resource_exhausted,
        ))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .add_service(privacy)
        .add_service(backfill)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            connections::incoming(listener, tls, Arc::clone(&connections)),
            async move {
                stop_accepting.cancelled().await;
                tracing::info!("shutting down: refusing new requests, finishing in-flight ones");
                connections_at_shutdown.begin_shutdown();
                health::set_all(&health_reporter, tonic_health::ServingStatus::NotServing).await;
            },
        );
    let grace = limits.shutdown_grace;
    let served = tokio::select! {
        served = server => served.context("gRPC server failed"),
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace = ?grace, "in-flight requests did not finish within the shutdown grace");
            connections.close_all();
            Ok(())
        }
    };
    background.cancel();
    while background_tasks.join_next().await.is_some() {}
    let core_to_flush = Arc::clone(&core_to_stop);
    tokio::task::spawn_blocking(move || core_to_stop.stop()).await?;
    served?;
    tokio::task::spawn_blocking(move || core_to_flush.flush())
        .await?
        .context("cannot flush the database at shutdown")?;
    tracing::info!("stopped; database flushed");
    Ok(())
}

/// Serves health checks (and UNAVAILABLE to every other call) on a second handle of
/// `listener` until the returned guard is dropped; returns the handle the real server
/// serves on once it is ready.
fn serve_while_starting(
    listener: TcpListener,
    tls: Option<Arc<tls::Tls>>,
    connections: Arc<connections::Connections>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> anyhow::Result<(TcpListener, tokio_util::sync::DropGuard)> {
    let listener = listener.into_std()?;
    let starting_listener = TcpListener::from_std(listener.try_clone()?)?;
    let listener = TcpListener::from_std(listener)?;
    let ready = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        .layer(connections::calls_layer())
        .layer(gate::GateLayer::new(gate::GrpcContentType))
        .layer(gate::GateLayer::new(health::Starting))
        .add_service(health)
        .serve_with_incoming_shutdown(
            connections::incoming(starting_listener, tls, connections),
            ready.clone().cancelled_owned(),
        );
    // Connections made while starting are told to go away once it ends (HTTP/2 GOAWAY) and
    // reconnect to the real server; the task ends when the last of them closes.
    tokio::spawn(async move {
        if let Err(error) = server.await {
            tracing::warn!(%error, "the server answering while starting failed");
        }
    });
    Ok((listener, ready.drop_guard()))
}

/// Runs the retention sweep every `interval` until shutdown.
async fn sweep_periodically(
    core: Arc<Core>,
    interval: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = ticker::Ticker::new(interval, shutdown);
    while ticker.tick().await {
        let core = Arc::clone(&core);
        match tokio::task::spawn_blocking(move || core.sweep()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::error!(%error, "retention sweep failed"),
            Err(error) => tracing::error!(%error, "retention sweep task failed"),
        }
    }
}

/// Reloads the policy bundle on every SIGHUP until shutdown.
#[cfg(unix)]
async fn reload_on_hangup(core: Arc<Core>, shutdown: CancellationToken) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; reload the policy with the Admin service");
            return;
        }
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            received = hangups.recv() => if received.is_none() { return },
        }
        let core = Arc::clone(&core);
        match tokio::task::spawn_blocking(move || core.reload_policy("SIGHUP")).await {
            Ok(Ok(in_force)) => {
                tracing::info!(hash = %in_force.policy.hash, "SIGHUP: policy bundle in force")
            }
            Ok(Err(error)) => tracing::error!(%error, "SIGHUP: policy bundle refused"),
            Err(error) => tracing::error!(%error, "SIGHUP: reload task failed"),
        }
    }
}

/// tonic refuses a request over `decode_message_bytes_max` with OUT_OF_RANGE before any
/// handler runs; the gRPC convention for a message over a size limit is
/// RESOURCE_EXHAUSTED, which is what clients of other gRPC stacks expect. Nothing else in
/// the server answers OUT_OF_RANGE, so the code is rewritten wherever it appears in the
/// response headers (where an error answered before the handler lives).
fn oversized_request_is_resource_exhausted(
    mut response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    const OUT_OF_RANGE: &[u8] = b"11";
    if response
        .headers()
        .get("grpc-status")
        .map(|code| code.as_bytes())
        == Some(OUT_OF_RANGE)
    {
        let code = (tonic::Code::ResourceExhausted as i32).to_string();
        response.headers_mut().insert(
            "grpc-status",
            http::HeaderValue::from_str(&code).expect("a decimal code is a valid header value"),
        );
    }
    response
}

/// Restores a backup: copies its files into `data_dir`, which must not exist yet. Start
/// the server on `data_dir` afterwards; before it serves, it erases again every user of
/// the erasure ledger that the backup still holds.
pub fn restore_backup(backup: &std::path::Path, data_dir: &std::path::Path) -> anyhow::Result<()> {
    if data_dir.exists() {
        anyhow::bail!(
            "{} already exists; restore into a new directory (move the old one aside first)",
            data_dir.display()
        );
    }
    if !backup.join("CURRENT").is_file() {
        anyhow::bail!(
            "{} is not a backup: it has no CURRENT file",
            backup.display()
        );
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    for entry in
        std::fs::read_dir(backup).with_context(|| format!("cannot read {}", backup.display()))?
    {
        let entry = entry?;
        std::fs::copy(entry.path(), data_dir.join(entry.file_name()))
            .with_context(|| format!("cannot copy {}", entry.path().display()))?;
    }
    Ok(())
}
