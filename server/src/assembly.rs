//! Builds the server's parts from its configuration, before it serves: the listeners, the
//! registry, authentication, the connection limits, the policy bundle, and the core over
//! the opened store.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::clock::Clock;
use crate::config::{AuthMode, Backend, Config};
use crate::connections::{ConnectionLimits, Connections};
use crate::core::{Core, CoreOptions};
use crate::policy::Policy;
use crate::registry::Registry;
use crate::service::auth::Authenticator;
use crate::storage::{RedisStore, RocksStore, Store};

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

/// The registry of the config's file, or the embedded default.
pub fn load_registry(config: &Config) -> anyhow::Result<Registry> {
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
    Ok(registry)
}

/// The authenticator of the config's principals. Without authentication the server
/// serves only on a loopback address, and says so loudly.
pub fn authenticator(
    config: &Config,
    registry: &Registry,
    listener: &TcpListener,
) -> anyhow::Result<Arc<Authenticator>> {
    let authenticator = Arc::new(Authenticator::new(
        &config.auth,
        registry,
        config
            .tls
            .as_ref()
            .is_some_and(|tls| tls.client_ca_path.is_some()),
    )?);
    if authenticator.mode() == AuthMode::Disabled {
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
    Ok(authenticator)
}

/// The port's connections, limited within the process's descriptor limit.
pub fn connections(config: &Config) -> anyhow::Result<Arc<Connections>> {
    Ok(Connections::new(
        ConnectionLimits {
            connections_max: config.limits.connections_max,
            preface_timeout: config.limits.connection_preface_timeout,
            idle_timeout: config.limits.connection_idle_timeout,
        }
        .within_descriptors(config.storage.max_open_files)?,
    ))
}

/// The policy bundle of the config's file, or the embedded default.
pub fn load_policy(config: &Config, registry: &Registry) -> anyhow::Result<Policy> {
    let policy = match &config.policy_bundle_path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the policy bundle {}", path.display()))?;
            Policy::from_toml(&text, registry)
                .with_context(|| format!("policy bundle {}", path.display()))?
        }
        None => Policy::embedded_default(registry).context("the embedded policy bundle")?,
    };
    tracing::info!(
        version = %policy.version,
        hash = %policy.hash,
        rules = policy.rules.iter().filter(|rule| rule.enabled).count(),
        "policy bundle loaded"
    );
    Ok(policy)
}

/// Opens the database and starts the core on it (re-applying the erasure ledger, and a
/// purge when the stored values were validated under another bundle), on the blocking
/// pool.
pub async fn start_core(
    config: &Config,
    registry: Registry,
    policy: Policy,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Arc<Core>> {
    let config = config.clone();
    // The threads that read the parts of a large read at once, one per core, named
    // `fs-read-N` (thread names hold 15 bytes). Built once per process: a second server
    // in the same process shares them.
    let _ = rayon::ThreadPoolBuilder::new()
        .thread_name(|index| format!("fs-read-{index}"))
        .build_global();
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!(
                "cannot create the data directory {}",
                config.data_dir.display()
            )
        })?;
        let store: Arc<dyn Store> = match config.storage.backend {
            Backend::Rocksdb => Arc::new(
                RocksStore::open(
                    &config.data_dir,
                    &config.storage,
                    config.durability,
                    config.idempotency_window,
                    Arc::clone(&clock),
                )
                .with_context(|| {
                    format!("cannot open the database in {}", config.data_dir.display())
                })?,
            ),
            Backend::RedisCluster => Arc::new(
                RedisStore::open(
                    &config.storage.redis_cluster,
                    config.storage.audit_partitions,
                )
                .context("cannot open the store on the Redis Cluster")?,
            ),
        };
        let options = CoreOptions {
            policy_path: config.policy_bundle_path.clone(),
            idempotency_window: config.idempotency_window,
            interaction_time_skew_allowance: config.interaction_time_skew_allowance,
            // A shared engine keeps the ledger, replicated, where every server sees it.
            ledger_path: match config.storage.backend {
                Backend::Rocksdb => Some(config.erasure_ledger_path.clone()),
                Backend::RedisCluster => None,
            },
            backup_dir: config.backup_dir.clone(),
            bulk_load: config.bulk_load.clone(),
        };
        let core = Arc::new(Core::new(
            Arc::new(registry),
            Arc::new(policy),
            store,
            clock,
            options,
        )?);
        core.start()
            .context("cannot start the feature store's core")?;
        Ok(core)
    })
    .await?
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
