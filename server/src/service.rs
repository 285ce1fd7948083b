//! The gRPC services: decode a request into domain types once, run the domain core on the
//! blocking pool, and encode the answer. The only place that builds a `tonic::Status`.

pub mod auth;
mod backfill;
pub mod budget;
pub(crate) mod deadline;
pub mod gate;
pub mod health;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use featurestore::domain::UserStateUpdate;
use featurestore::proto::{
    self, admin_server::Admin, feature_store_server::FeatureStore, privacy_server::Privacy,
};
use featurestore::{InvalidRequest, RequestLimits};
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::audit::AuditRecord;
use crate::core::Core;
use crate::core::read_tally::ReadTally;
use crate::erasure::Receipt;
use crate::error::{Error, ErrorKind};
use crate::metrics::Metrics;
use crate::observe::{ReadBatch, log_decoded};
use crate::policy::Reasons;
use crate::policy::bundle::reason_name;
use crate::service::auth::principal_of;
use crate::storage::{ErasureState, UserState};

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
    /// Reads of at most this many keys run on the request's task (see `Limits`).
    inline_read_keys_max: usize,
    /// Cancelled when the server stops: long-lived streams end then.
    stopping: tokio_util::sync::CancellationToken,
    /// Permits for deciding bulk-load chunks, shared by every load.
    load_permits: Arc<Semaphore>,
    /// What reads, writes and loads are counted into; `None` when metrics are off.
    metrics: Option<Arc<Metrics>>,
    /// When the server started, for the Stats call.
    started: Instant,
    /// The configuration in force, for the Stats call, with its secrets masked.
    config_shown: Arc<str>,
    /// Rows the Stats call reads to count rows and bytes per surface.
    stats_rows_sampled: usize,
}

/// What the service needs besides the core: limits, and what it reports.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub limits: RequestLimits,
    pub concurrent_requests_max: usize,
    pub inline_read_keys_max: usize,
    pub chunks_decided_at_once: usize,
    pub metrics: Option<Arc<Metrics>>,
    /// The configuration in force as shown by the Stats call (secrets masked).
    pub config_shown: String,
    pub stats_rows_sampled: usize,
}

impl FeatureStoreService {
    pub fn new(
        core: Arc<Core>,
        options: ServiceOptions,
        stopping: tokio_util::sync::CancellationToken,
    ) -> Self {
        FeatureStoreService {
            core,
            limits: options.limits,
            permits: Arc::new(Semaphore::new(options.concurrent_requests_max)),
            concurrent_requests_max: options.concurrent_requests_max,
            inline_read_keys_max: options.inline_read_keys_max,
            stopping,
            load_permits: Arc::new(Semaphore::new(options.chunks_decided_at_once.max(1))),
            metrics: options.metrics,
            started: crate::clock::monotonic_now(),
            config_shown: options.config_shown.into(),
            stats_rows_sampled: options.stats_rows_sampled,
        }
    }

    /// A permit to do work, or the refusal of an overloaded server, or of a request whose
    /// deadline has passed.
    fn permit(&self) -> Result<OwnedSemaphorePermit, Error> {
        deadline::check()?;
        Arc::clone(&self.permits)
            .try_acquire_owned()
            .map_err(|_| Error::Overloaded {
                limit: self.concurrent_requests_max,
            })
    }

    /// Runs blocking domain work on the blocking pool, under a concurrency permit.
    async fn run_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Core) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let permit = self.permit()?;
        let core = Arc::clone(&self.core);
        let deadline = deadline::current();
        // The call's span (its request id) goes with the work to the blocking thread.
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let _permit = permit;
            // The wait for a blocking thread may have taken the rest of the time.
            if deadline.is_some_and(|deadline| crate::clock::monotonic_now() >= deadline) {
                return Err(Error::DeadlinePassed);
            }
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
        log_decoded(&request);
        let principal = principal_of(&request).map_err(status)?;
        let request = {
            let _span = tracing::debug_span!("parse").entered();
            self.limits
                .parse_read(request.into_inner())
                .map_err(|error| status(error.into()))?
        };
        principal.check_read(&request).map_err(status)?;
        let keys = request.keys.len();
        let (response, tally) = if keys <= self.inline_read_keys_max {
            // Tens of microseconds: less than handing the work to another thread and back.
            let _permit = self.permit().map_err(status)?;
            let mut tally = ReadTally::default();
            let response = self.core.read_counted(&request, &mut tally);
            (response, tally)
        } else {
            self.run_blocking(move |core| {
                let mut tally = ReadTally::default();
                Ok((core.read_counted(&request, &mut tally), tally))
            })
            .await
            .map_err(status)?
        };
        let mut response = Response::new(response.map_err(status)?);
        if let Some(metrics) = &self.metrics {
            metrics.read(&tally);
            response.extensions_mut().insert(ReadBatch(keys));
        }
        Ok(response)
    }

    async fn write_features(
        &self,
        request: Request<proto::WriteFeaturesRequest>,
    ) -> Result<Response<proto::WriteFeaturesResponse>, Status> {
        log_decoded(&request);
        let principal = principal_of(&request).map_err(status)?;
        let request = request.into_inner();
        let fingerprint = xxhash_rust::xxh3::xxh3_64(&request.encode_to_vec());
        let request = {
            let _span = tracing::debug_span!("parse").entered();
            self.limits
                .parse_write(request)
                .map_err(|error| status(error.into()))?
        };
        principal
            .check_write(request.rows.iter().enumerate())
            .map_err(status)?;
        let response = self
            .run_blocking(move |core| core.write(&request, fingerprint))
            .await
            .map_err(status)?;
        if let Some(metrics) = &self.metrics {
            metrics.write(&response);
        }
        Ok(Response::new(response))
    }

    async fn explain_write(
        &self,
        request: Request<proto::WriteFeaturesRequest>,
    ) -> Result<Response<proto::ExplainWriteResponse>, Status> {
        let principal = principal_of(&request).map_err(status)?;
        let request = self
            .limits
            .parse_write(request.into_inner())
            .map_err(|error| status(error.into()))?;
        principal
            .check_write(request.rows.iter().enumerate())
            .map_err(status)?;
        let response = self
            .run_blocking(move |core| core.explain(&request))
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

#[tonic::async_trait]
impl Privacy for FeatureStoreService {
    async fn set_user_state(
        &self,
        request: Request<proto::SetUserStateRequest>,
    ) -> Result<Response<proto::UserState>, Status> {
        let principal = principal_of(&request).map_err(status)?;
        let update = UserStateUpdate::try_from(request.into_inner())
            .map_err(|error| status(error.into()))?;
        let state = self
            .run_blocking(move |core| core.set_user_state(&update, &principal.name))
            .await
            .map_err(status)?;
        Ok(Response::new(self.user_state_to_proto(state)))
    }

    async fn get_audit_trail(
        &self,
        request: Request<proto::GetAuditTrailRequest>,
    ) -> Result<Response<proto::AuditTrail>, Status> {
        const DEFAULT_LIMIT: usize = 1000;
        let request = request.into_inner();
        let limit = match request.limit {
            0 => DEFAULT_LIMIT,
            limit => limit as usize,
        };
        let user_id = request.user_id;
        let (pseudonym, records) = self
            .run_blocking(move |core| {
                // An erased user's pseudonym can no longer be computed: nothing links to them.
                let Some(pseudonym) = core.pseudonym(user_id, false)? else {
                    return Ok((None, Vec::new()));
                };
                Ok((
                    Some(pseudonym),
                    core.audit_trail(user_id, &pseudonym, limit)?,
                ))
            })
            .await
            .map_err(status)?;
        Ok(Response::new(proto::AuditTrail {
            user_pseudonym: pseudonym.map_or_else(String::new, |pseudonym| hex(&pseudonym)),
            records: records.into_iter().map(audit_record_to_proto).collect(),
        }))
    }

    async fn erase_user(
        &self,
        request: Request<proto::EraseUserRequest>,
    ) -> Result<Response<proto::ErasureReceipt>, Status> {
        let principal = principal_of(&request).map_err(status)?;
        let user_id = request.into_inner().user_id;
        if user_id == 0 {
            return Err(status(
                InvalidRequest::new("user_id", "must not be 0").into(),
            ));
        }
        let receipt = self
            .run_blocking(move |core| core.erase_user(user_id, &principal.name))
            .await
            .map_err(status)?;
        Ok(Response::new(receipt_to_proto(receipt)))
    }

    async fn get_erasure_status(
        &self,
        request: Request<proto::GetErasureStatusRequest>,
    ) -> Result<Response<proto::ErasureReceipt>, Status> {
        let receipt = self
            .core
            .erasure_receipt(&request.into_inner().receipt_id)
            .map_err(status)?;
        Ok(Response::new(receipt_to_proto(receipt)))
    }

    async fn get_user_state(
        &self,
        request: Request<proto::GetUserStateRequest>,
    ) -> Result<Response<proto::UserState>, Status> {
        let user_id = request.into_inner().user_id;
        let state = self
            .run_blocking(move |core| core.user_state(user_id))
            .await
            .map_err(status)?;
        Ok(Response::new(self.user_state_to_proto(state)))
    }
}

fn receipt_to_proto(receipt: Receipt) -> proto::ErasureReceipt {
    proto::ErasureReceipt {
        receipt_id: receipt.id,
        user_id: receipt.user_id,
        requested_at_unix_micros: receipt.requested_at,
        fenced_at_unix_micros: receipt.fenced_at.unwrap_or(0),
        deleted_at_unix_micros: receipt.deleted_at.unwrap_or(0),
        compacted_at_unix_micros: receipt.compacted_at.unwrap_or(0),
        verified_at_unix_micros: receipt.verified_at.unwrap_or(0),
        verified: receipt.verified,
        reapplied_at_unix_micros: receipt.reapplied_at,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn audit_record_to_proto(record: AuditRecord) -> proto::AuditRecord {
    let entry = record.entry;
    proto::AuditRecord {
        partition: record.partition,
        sequence: record.sequence,
        time_unix_micros: entry.time.unix_micros(),
        action: entry.action.name().to_string(),
        caller: entry.caller,
        policy_bundle_hash: entry.bundle_hash,
        user_pseudonym: entry
            .user
            .as_ref()
            .map_or_else(String::new, |user| hex(user)),
        surfaces: entry
            .surfaces
            .split(',')
            .filter(|surface| !surface.is_empty())
            .map(str::to_string)
            .collect(),
        subject: entry.subject,
        reasons: Reasons::from_bits(entry.reasons)
            .iter()
            .map(|reason| reason as i32)
            .collect(),
        hash: hex(&record.hash),
    }
}

#[tonic::async_trait]
impl Admin for FeatureStoreService {
    async fn get_stats(
        &self,
        _request: Request<proto::GetStatsRequest>,
    ) -> Result<Response<proto::StoreStats>, Status> {
        let rows_sampled = self.stats_rows_sampled;
        let (figures, census) = self
            .run_blocking(move |core| Ok((core.engine_figures()?, core.census(rows_sampled)?)))
            .await
            .map_err(status)?;
        let in_force = self.core.policy_in_force();
        let registry = &self.core.registry;
        Ok(Response::new(proto::StoreStats {
            uptime_seconds: self.started.elapsed().as_secs(),
            policy_version: in_force.policy.version.clone(),
            policy_hash: in_force.policy.hash.clone(),
            policy_loaded_at_unix_micros: in_force.loaded_at.unix_micros(),
            exact: census.exact,
            rows_read: census.rows_read,
            users: census.users,
            surfaces: census
                .surfaces
                .iter()
                .map(|surface| proto::SurfaceStats {
                    surface: registry.surface_by_id(surface.surface).map_or_else(
                        || format!("#{}", surface.surface.0),
                        |known| known.name.clone(),
                    ),
                    rows: surface.rows,
                    bytes: surface.bytes,
                })
                .collect(),
            user_states_estimate: figures.user_states_estimate,
            table_file_bytes: figures.table_file_bytes,
            memtable_bytes: figures.memtable_bytes,
            pending_compaction_bytes: figures.pending_compaction_bytes,
            block_cache_usage_bytes: figures.block_cache_usage_bytes,
            block_cache_capacity_bytes: figures.block_cache_capacity_bytes,
            block_cache_hits: figures.block_cache_hits,
            block_cache_misses: figures.block_cache_misses,
            config: self.config_shown.to_string(),
        }))
    }

    async fn create_backup(
        &self,
        request: Request<proto::CreateBackupRequest>,
    ) -> Result<Response<proto::BackupInfo>, Status> {
        let principal = principal_of(&request).map_err(status)?;
        let core = Arc::clone(&self.core);
        let taken_at = self.core.clock.now();
        let path = tokio::task::spawn_blocking(move || core.backup(&principal.name))
            .await
            .map_err(|error| status(Error::Task(error.to_string())))?
            .map_err(status)?;
        Ok(Response::new(proto::BackupInfo {
            path: path.display().to_string(),
            taken_at_unix_micros: taken_at.unix_micros(),
        }))
    }

    async fn sweep_expired(
        &self,
        _request: Request<proto::SweepExpiredRequest>,
    ) -> Result<Response<proto::SweepReport>, Status> {
        let core = Arc::clone(&self.core);
        let (users_swept, values_removed) = tokio::task::spawn_blocking(move || core.sweep())
            .await
            .map_err(|error| status(Error::Task(error.to_string())))?
            .map_err(status)?;
        Ok(Response::new(proto::SweepReport {
            users_swept,
            values_removed,
        }))
    }

    async fn verify_audit_log(
        &self,
        _request: Request<proto::VerifyAuditLogRequest>,
    ) -> Result<Response<proto::AuditLogVerification>, Status> {
        let report = self
            .run_blocking(|core| core.verify_audit())
            .await
            .map_err(status)?;
        let chains: Vec<proto::AuditChainVerification> = report
            .chains
            .iter()
            .map(|chain| {
                let (first_broken_sequence, problem) =
                    chain.first_broken.clone().unwrap_or_default();
                proto::AuditChainVerification {
                    partition: chain.partition,
                    records_checked: chain.records_checked,
                    intact: chain.first_broken.is_none(),
                    first_broken_sequence,
                    problem,
                }
            })
            .collect();
        let first_broken = chains.iter().find(|chain| !chain.intact);
        Ok(Response::new(proto::AuditLogVerification {
            records_checked: report.records_checked(),
            intact: first_broken.is_none(),
            first_broken_sequence: first_broken.map_or(0, |chain| chain.first_broken_sequence),
            problem: first_broken.map_or_else(String::new, |chain| chain.problem.clone()),
            first_broken_partition: first_broken.map_or(0, |chain| chain.partition),
            chains,
        }))
    }

    async fn reload_policy(
        &self,
        request: Request<proto::ReloadPolicyRequest>,
    ) -> Result<Response<proto::PolicyStatus>, Status> {
        let principal = principal_of(&request).map_err(status)?;
        let core = Arc::clone(&self.core);
        tokio::task::spawn_blocking(move || core.reload_policy(&principal.name))
            .await
            .map_err(|error| status(Error::Task(error.to_string())))?
            .map_err(status)?;
        Ok(Response::new(self.policy_status()))
    }

    async fn get_policy_status(
        &self,
        _request: Request<proto::GetPolicyStatusRequest>,
    ) -> Result<Response<proto::PolicyStatus>, Status> {
        Ok(Response::new(self.policy_status()))
    }
}

impl FeatureStoreService {
    fn policy_status(&self) -> proto::PolicyStatus {
        let in_force = self.core.policy_in_force();
        let purge = self.core.purge_status();
        proto::PolicyStatus {
            version: in_force.policy.version.clone(),
            hash: in_force.policy.hash.clone(),
            loaded_at_unix_micros: in_force.loaded_at.unix_micros(),
            purge_running: purge.running,
            purge_users_done: purge.users_done,
            purge_values_removed: purge.values_removed,
            purge_finished_at_unix_micros: purge.finished_at.map_or(0, |time| time.unix_micros()),
        }
    }

    fn user_state_to_proto(&self, state: UserState) -> proto::UserState {
        let group = self.core.policy().jurisdiction_group(&state.jurisdiction);
        proto::UserState {
            user_id: state.user_id,
            jurisdiction_group: group.name().to_string(),
            jurisdiction: state.jurisdiction,
            age_band: proto::AgeBand::from(state.age_band) as i32,
            linked_apps: state.linked_apps,
            ads_objection: state.ads_objection,
            erasure_state: match state.erasure {
                ErasureState::None => proto::ErasureState::None,
                ErasureState::Pending => proto::ErasureState::Pending,
                ErasureState::Erased => proto::ErasureState::Erased,
            } as i32,
            generation: state.generation,
            updated_at_unix_micros: state.updated_at.unix_micros(),
        }
    }
}

/// Maps an error to the gRPC status the caller sees, logging the ones operators must see.
fn status(error: Error) -> Status {
    let message = error.to_string();
    match error.kind() {
        ErrorKind::InvalidRequest => Status::invalid_argument(message),
        ErrorKind::NotFound => Status::not_found(message),
        ErrorKind::DeniedByPolicy => {
            let (reason, metadata) = match &error {
                Error::Refused {
                    reason,
                    row,
                    current_generation,
                } => (
                    reason_name(*reason).to_string(),
                    HashMap::from([
                        ("row".to_string(), row.to_string()),
                        (
                            "current_generation".to_string(),
                            current_generation.to_string(),
                        ),
                    ]),
                ),
                _ => (String::new(), HashMap::new()),
            };
            Status::with_error_details(
                tonic::Code::FailedPrecondition,
                message,
                ErrorDetails::with_error_info(reason, "featurestore.v1", metadata),
            )
        }
        ErrorKind::Conflict => Status::failed_precondition(message),
        ErrorKind::PermissionDenied => Status::permission_denied(message),
        ErrorKind::Aborted => Status::aborted(message),
        ErrorKind::Unsupported => Status::unimplemented(message),
        ErrorKind::Overloaded => Status::resource_exhausted(message),
        ErrorKind::DeadlineExceeded => Status::deadline_exceeded(message),
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
