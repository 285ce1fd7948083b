//! The feature store server: configuration, the registry, the storage engine, the domain
//! core and the gRPC service, assembled by [`run`].

pub mod assembly;
pub mod audit;
pub mod background;
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
pub mod serving;
pub mod staging;
pub mod storage;
pub mod ticker;
pub mod tls;

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

pub use crate::assembly::{Listeners, restore_backup};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::service::health;

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
    let registry = assembly::load_registry(&config)?;
    let authenticator = assembly::authenticator(&config, &registry, &listener)?;
    let tls = config.tls.as_ref().map(tls::Tls::load).transpose()?;
    let connections = assembly::connections(&config)?;
    // From here until the core is ready the port answers health checks (NOT_SERVING) and
    // refuses every other call with UNAVAILABLE, rather than leaving callers hanging.
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health::set_all(&health_reporter, tonic_health::ServingStatus::NotServing).await;
    let (listener, starting) = serving::serve_while_starting(
        listener,
        tls.clone(),
        Arc::clone(&connections),
        health_service.clone(),
    )?;
    let policy = assembly::load_policy(&config, &registry)?;
    let core = assembly::start_core(&config, registry, policy, clock).await?;
    let metrics = config.observability.metrics_enabled.then(|| {
        Arc::new(metrics::Metrics::new(
            core.registry
                .surfaces()
                .iter()
                .map(|surface| (surface.id, surface.name.clone())),
        ))
    });
    let background = background::Background::start(
        &core,
        &config,
        background::BackgroundParts {
            metrics: metrics.clone(),
            metrics_listener,
            health_reporter: health_reporter.clone(),
            tls: tls.clone(),
        },
        &shutdown,
    )?;
    let handlers = serving::handlers(&core, &config, metrics.clone(), &background.token)?;
    let address = listener.local_addr()?;
    // The starting server stops accepting; the one below takes the port over.
    drop(starting);
    health::set_all(&health_reporter, tonic_health::ServingStatus::Serving).await;
    match config.storage.backend {
        config::Backend::Rocksdb => {
            tracing::info!(%address, tls = config.tls.is_some(), data_dir = %config.data_dir.display(), durability = ?config.durability, "serving");
        }
        config::Backend::RedisCluster => {
            let cluster = &config.storage.redis_cluster;
            tracing::info!(%address, tls = config.tls.is_some(), redis_cluster = %cluster.seeds.join(","), key_prefix = %cluster.key_prefix, wait_replicas = cluster.wait_replicas, "serving");
        }
    }
    let serving = serving::Serving {
        listener,
        tls,
        connections,
        authenticator,
        metrics,
        handlers,
        health_service,
        health_reporter,
    };
    let served = serving::serve(serving, &config, shutdown).await;
    background.stop().await;
    let core_to_stop = Arc::clone(&core);
    tokio::task::spawn_blocking(move || core_to_stop.stop()).await?;
    served?;
    tokio::task::spawn_blocking(move || core.flush())
        .await?
        .context("cannot flush the database at shutdown")?;
    tracing::info!("stopped; database flushed");
    Ok(())
}
