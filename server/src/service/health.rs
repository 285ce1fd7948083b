//! What the standard health service (`grpc.health.v1.Health`) says: NOT_SERVING while the
//! server starts (it answers on its port from the first moment, every other call with
//! UNAVAILABLE), while the storage engine fails its probe, and once shutdown begins;
//! SERVING otherwise.

use std::sync::Arc;
use std::time::Duration;

use featurestore::proto::admin_server::AdminServer;
use featurestore::proto::backfill_server::BackfillServer;
use featurestore::proto::feature_store_server::FeatureStoreServer;
use featurestore::proto::privacy_server::PrivacyServer;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::core::Core;
use crate::service::FeatureStoreService;
use crate::service::gate::Gate;

/// The services whose status is reported, and "" for the server as a whole.
const SERVICES: [&str; 5] = [
    "",
    <FeatureStoreServer<FeatureStoreService> as NamedService>::NAME,
    <PrivacyServer<FeatureStoreService> as NamedService>::NAME,
    <BackfillServer<FeatureStoreService> as NamedService>::NAME,
    <AdminServer<FeatureStoreService> as NamedService>::NAME,
];

/// Sets every service's status at once.
pub async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for service in SERVICES {
        reporter.set_service_status(service, status).await;
    }
}

/// Probes the storage engine every `interval` (a small write and its read-back), and
/// reports NOT_SERVING while the probe fails, SERVING again once it succeeds, until
/// `shutdown`.
pub async fn watch_storage(
    core: Arc<Core>,
    reporter: HealthReporter,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = crate::ticker::Ticker::new(interval, shutdown.clone());
    let mut healthy = true;
    while ticker.tick().await {
        let core = Arc::clone(&core);
        let probed = tokio::task::spawn_blocking(move || core.probe_storage()).await;
        let problem = match probed {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(error) => Some(error.to_string()),
        };
        if shutdown.is_cancelled() {
            return;
        }
        match problem {
            Some(problem) if healthy => {
                tracing::error!(%problem, "the storage engine fails its probe: NOT_SERVING");
                set_all(&reporter, ServingStatus::NotServing).await;
                healthy = false;
            }
            None if !healthy => {
                tracing::info!("the storage engine passes its probe again: SERVING");
                set_all(&reporter, ServingStatus::Serving).await;
                healthy = true;
            }
            _ => {}
        }
    }
}

/// Answers every call but health checks with UNAVAILABLE ("starting"): the gate of the
/// server that holds the port while the database opens.
#[derive(Clone, Copy, Debug, Default)]
pub struct Starting;

impl Gate for Starting {
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), tonic::Status> {
        if request.uri().path().starts_with("/grpc.health.v1.Health/") {
            Ok(())
        } else {
            Err(tonic::Status::unavailable(
                "the server is starting; retry shortly",
            ))
        }
    }
}
