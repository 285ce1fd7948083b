//! The server's background work: the SIGHUP reload, the periodic retention sweep, the
//! storage probe, the reload of TLS files and the metrics endpoint. It stops with the
//! server and is waited for before the database is flushed and closed, so that a new
//! server can open the same directory at once.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::core::Core;
use crate::metrics::Metrics;
use crate::service::health;
use crate::ticker::Ticker;
use crate::tls::{self, Tls};

/// The tasks of the background work, cancelled together.
#[derive(Debug)]
pub struct Background {
    /// Cancelled when the server stops (or by [`Background::stop`]).
    pub token: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl Background {
    /// Starts every background task the config asks for.
    pub fn start(
        core: &Arc<Core>,
        config: &Config,
        parts: BackgroundParts,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Background> {
        let token = shutdown.child_token();
        let mut tasks = tokio::task::JoinSet::new();
        #[cfg(unix)]
        tasks.spawn(reload_on_hangup(Arc::clone(core), token.clone()));
        if !config.retention_sweep_interval.is_zero() {
            tasks.spawn(sweep_periodically(
                Arc::clone(core),
                config.retention_sweep_interval,
                token.clone(),
            ));
        }
        if let (Some(metrics), Some(listener)) = (&parts.metrics, parts.metrics_listener) {
            tracing::info!(address = %listener.local_addr()?, "metrics endpoint: GET /metrics");
            tasks.spawn(crate::metrics::serve(
                listener,
                Arc::clone(metrics),
                Arc::clone(core),
                token.clone(),
            ));
        }
        tasks.spawn(health::watch_storage(
            Arc::clone(core),
            parts.health_reporter,
            config.storage.health_probe_interval,
            token.clone(),
        ));
        if let Some(tls) = parts.tls {
            tasks.spawn(tls::reload_periodically(tls, parts.metrics, token.clone()));
        }
        Ok(Background { token, tasks })
    }

    /// Cancels every task and waits for them to end.
    pub async fn stop(mut self) {
        self.token.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// What the background work needs besides the core and the config.
#[derive(Debug)]
pub struct BackgroundParts {
    pub metrics: Option<Arc<Metrics>>,
    pub metrics_listener: Option<TcpListener>,
    pub health_reporter: tonic_health::server::HealthReporter,
    pub tls: Option<Arc<Tls>>,
}

/// Runs the retention sweep every `interval` until shutdown.
async fn sweep_periodically(
    core: Arc<Core>,
    interval: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = Ticker::new(interval, shutdown);
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
