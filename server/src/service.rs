//! The gRPC service: decode a request into domain types once, run the domain core on the
//! blocking pool, and encode the answer. The only place that builds a `tonic::Status`.

use std::sync::Arc;

use featurestore::RequestLimits;
use featurestore::proto::{self, feature_store_server::FeatureStore};
use prost::Message;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::domain::Core;
use crate::error::{Error, ErrorKind};

/// Implements `featurestore.v1.FeatureStore`.
#[derive(Debug, Clone)]
pub struct FeatureStoreService {
    /// The read and write paths.
    core: Arc<Core>,
    /// Limits every request is parsed against.
    limits: RequestLimits,
    /// Permits for requests doing work; when none is left a request is refused at once.
    permits: Arc<Semaphore>,
    /// Size of `permits`, for the error message.
    concurrent_requests_max: usize,
}

impl FeatureStoreService {
    pub fn new(core: Arc<Core>, limits: RequestLimits, concurrent_requests_max: usize) -> Self {
        FeatureStoreService {
            core,
            limits,
            permits: Arc::new(Semaphore::new(concurrent_requests_max)),
            concurrent_requests_max,
        }
    }

    /// Runs blocking domain work on the blocking pool, under a concurrency permit.
    async fn run_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Core) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let permit =
            Arc::clone(&self.permits)
                .try_acquire_owned()
                .map_err(|_| Error::Overloaded {
                    limit: self.concurrent_requests_max,
                })?;
        let core = Arc::clone(&self.core);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(&core)
        })
        .await
        .map_err(|error| Error::Task(error.to_string()))?
    }
}

#[tonic::async_trait]
impl FeatureStore for FeatureStoreService {
    async fn get_features(
        &self,
        request: Request<proto::GetFeaturesRequest>,
    ) -> Result<Response<proto::GetFeaturesResponse>, Status> {
        let request = self
            .limits
            .parse_read(request.into_inner())
            .map_err(|error| status(error.into()))?;
        let response = self
            .run_blocking(move |core| core.read(&request))
            .await
            .map_err(status)?;
        Ok(Response::new(response))
    }

    async fn write_features(
        &self,
        request: Request<proto::WriteFeaturesRequest>,
    ) -> Result<Response<proto::WriteFeaturesResponse>, Status> {
        let request = request.into_inner();
        let fingerprint = xxhash_rust::xxh3::xxh3_64(&request.encode_to_vec());
        let request = self
            .limits
            .parse_write(request)
            .map_err(|error| status(error.into()))?;
        let response = self
            .run_blocking(move |core| core.write(&request, fingerprint))
            .await
            .map_err(status)?;
        Ok(Response::new(response))
    }

    async fn list_features(
        &self,
        _request: Request<proto::ListFeaturesRequest>,
    ) -> Result<Response<proto::ListFeaturesResponse>, Status> {
        Ok(Response::new(proto::ListFeaturesResponse {
            features: self.core.registry.feature_definitions(),
        }))
    }

    async fn list_surfaces(
        &self,
        _request: Request<proto::ListSurfacesRequest>,
    ) -> Result<Response<proto::ListSurfacesResponse>, Status> {
        Ok(Response::new(proto::ListSurfacesResponse {
            surfaces: self.core.registry.surface_definitions(),
        }))
    }
}

/// Maps an error to the gRPC status the caller sees, logging the ones operators must see.
fn status(error: Error) -> Status {
    let message = error.to_string();
    match error.kind() {
        ErrorKind::InvalidRequest => Status::invalid_argument(message),
        ErrorKind::Conflict => Status::failed_precondition(message),
        ErrorKind::Overloaded => Status::resource_exhausted(message),
        ErrorKind::Unavailable => {
            tracing::error!(error = %message, "storage unavailable");
            Status::unavailable(message)
        }
        ErrorKind::DataLoss => {
            tracing::error!(error = %message, "stored data is damaged");
            Status::data_loss(message)
        }
        ErrorKind::Internal => {
            tracing::error!(error = %message, "internal error");
            Status::internal(message)
        }
    }
}
