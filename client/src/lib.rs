//! The typed Rust client of the feature store.
//!
//! One [`Client`] holds one HTTP/2 channel, reused by every call and cheap to clone. Every
//! call has a deadline; calls that fail with a retryable code (UNAVAILABLE, ABORTED) are
//! retried with exponential backoff within that deadline, and no others are.

use std::time::{Duration, Instant};

use featurestore::domain::{ReadRequest, UserStateUpdate, WriteRequest};
use featurestore::proto;
use featurestore::proto::admin_client::AdminClient;
use featurestore::proto::backfill_client::BackfillClient;
use featurestore::proto::feature_store_client::FeatureStoreClient;
use featurestore::proto::privacy_client::PrivacyClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

pub use featurestore;

pub mod cli;
pub mod generate;
pub mod load;

/// How a [`Client`] talks to the server.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Deadline of each call, retries included.
    pub timeout: Duration,
    /// Longest wait for a connection to be established.
    pub connect_timeout: Duration,
    /// Attempts after the first for retryable failures.
    pub retries: u32,
    /// Wait before the first retry; doubled for each next one.
    pub initial_backoff: Duration,
    /// Largest response the client decodes, in bytes.
    pub decode_message_bytes_max: usize,
    /// Largest request the client encodes, in bytes.
    pub encode_message_bytes_max: usize,
    /// Bearer token sent with every call, for servers that authenticate by token.
    pub token: Option<BearerToken>,
    /// TLS settings, for `https://` endpoints.
    pub tls: Option<ClientTls>,
}

/// A bearer token; never shown in full by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(pub String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("BearerToken(<redacted>)")
    }
}

/// How a client checks the server's certificate, and its own certificate for mutual TLS.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// The certificate authority (PEM) that signed the server's certificate.
    pub ca_certificate_pem: Option<Vec<u8>>,
    /// The client's certificate chain and private key (PEM), for mutual TLS.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the server's certificate must hold; the endpoint's host when absent.
    pub domain_name: Option<String>,
}

impl ClientTls {
    /// Reads the PEM files of a TLS setup: the authority to trust, and optionally the
    /// client's certificate and key.
    pub fn from_files(
        ca_certificate: Option<&std::path::Path>,
        identity: Option<(&std::path::Path, &std::path::Path)>,
        domain_name: Option<String>,
    ) -> std::io::Result<ClientTls> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|error| {
                std::io::Error::new(error.kind(), format!("{}: {error}", path.display()))
            })
        };
        Ok(ClientTls {
            ca_certificate_pem: ca_certificate.map(read).transpose()?,
            identity_pem: identity
                .map(|(certificate, key)| Ok::<_, std::io::Error>((read(certificate)?, read(key)?)))
                .transpose()?,
            domain_name,
        })
    }

    /// The same as tonic's TLS settings, for other channels to the server.
    pub fn tonic_config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.ca_certificate_pem {
            config = config.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((certificate, key)) = &self.identity_pem {
            config = config.identity(Identity::from_pem(certificate, key));
        }
        if let Some(domain) = &self.domain_name {
            config = config.domain_name(domain.clone());
        }
        config
    }
}

/// Adds the bearer token to every call.
#[derive(Clone, Debug)]
pub struct Credentials {
    authorization: Option<MetadataValue<Ascii>>,
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(authorization) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
        }
        Ok(request)
    }
}

/// The channel every stub of a [`Client`] shares, with its credentials.
pub type Transport = InterceptedService<Channel, Credentials>;

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            retries: 2,
            initial_backoff: Duration::from_millis(50),
            decode_message_bytes_max: 64 * 1024 * 1024,
            encode_message_bytes_max: 16 * 1024 * 1024,
            token: None,
            tls: None,
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid endpoint {endpoint:?}: {source}")]
    Endpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("{0}")]
    Options(String),
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(#[from] Status),
}

/// Why the write-time policy refused a whole request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRefusal {
    /// The reason code's name, e.g. "STALE_GENERATION" or "USER_ERASED".
    pub reason: String,
    /// Index of the offending row.
    pub row: usize,
    /// The user's current state generation.
    pub current_generation: u64,
}

impl ClientError {
    /// The gRPC code of the failure (INVALID_ARGUMENT for a bad endpoint).
    pub fn code(&self) -> Code {
        match self {
            ClientError::Endpoint { .. } | ClientError::Options(_) => Code::InvalidArgument,
            ClientError::Status(status) => status.code(),
        }
    }

    /// The id the server gave the call (`x-request-id`), which its log lines carry.
    pub fn request_id(&self) -> Option<&str> {
        let ClientError::Status(status) = self else {
            return None;
        };
        status.metadata().get("x-request-id")?.to_str().ok()
    }

    /// The policy's reason when the write-time policy refused the whole request.
    pub fn policy_refusal(&self) -> Option<PolicyRefusal> {
        use tonic_types::StatusExt;
        let ClientError::Status(status) = self else {
            return None;
        };
        let info = status.get_details_error_info()?;
        Some(PolicyRefusal {
            reason: info.reason.clone(),
            row: info.metadata.get("row")?.parse().ok()?,
            current_generation: info.metadata.get("current_generation")?.parse().ok()?,
        })
    }
}

/// Chunks a [`LoadSession`] queues before sending waits for the stream.
const LOAD_CHUNKS_QUEUED_MAX: usize = 4;

/// One bulk-load stream, attached to its job.
#[derive(Debug)]
pub struct LoadSession {
    sender: tokio::sync::mpsc::Sender<proto::BulkLoadRequest>,
    responses: tonic::Streaming<proto::BulkLoadResponse>,
    /// Where the job stood when the stream attached.
    pub job: proto::LoadJob,
}

impl LoadSession {
    /// Queues chunk `sequence`; its acknowledgement comes from [`LoadSession::next_ack`].
    pub async fn send_chunk(
        &mut self,
        sequence: u64,
        rows: Vec<proto::WriteRow>,
    ) -> Result<(), ClientError> {
        let chunk = proto::BulkLoadRequest {
            message: Some(proto::bulk_load_request::Message::Chunk(proto::LoadChunk {
                sequence,
                rows,
            })),
        };
        if self.sender.send(chunk).await.is_err() {
            // The stream ended: its status says why.
            return Err(self.ended().await);
        }
        Ok(())
    }

    /// The next chunk acknowledgement, in sequence order.
    pub async fn next_ack(&mut self) -> Result<proto::ChunkAck, ClientError> {
        match self.responses.message().await? {
            Some(proto::BulkLoadResponse {
                message: Some(proto::bulk_load_response::Message::Ack(ack)),
            }) => Ok(ack),
            Some(_) => Err(Status::internal("expected a chunk acknowledgement").into()),
            None => Err(Status::unavailable("the server ended the bulk-load stream").into()),
        }
    }

    /// Commits the job once every sent chunk was acknowledged, and waits for the commit.
    pub async fn commit(mut self) -> Result<proto::LoadJob, ClientError> {
        let commit = proto::BulkLoadRequest {
            message: Some(proto::bulk_load_request::Message::Commit(
                proto::LoadCommit {},
            )),
        };
        if self.sender.send(commit).await.is_err() {
            return Err(self.ended().await);
        }
        match self.responses.message().await? {
            Some(proto::BulkLoadResponse {
                message: Some(proto::bulk_load_response::Message::Committed(job)),
            }) => Ok(job),
            Some(_) => Err(Status::internal("expected the committed job").into()),
            None => {
                Err(Status::unavailable("the server ended the stream during the commit").into())
            }
        }
    }

    async fn ended(&mut self) -> ClientError {
        loop {
            match self.responses.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Status::unavailable("the server ended the bulk-load stream").into();
                }
                Err(status) => return status.into(),
            }
        }
    }
}

/// A connection to a feature store server.
#[derive(Clone, Debug)]
pub struct Client {
    /// The generated stub over the shared channel.
    stub: FeatureStoreClient<Transport>,
    /// The privacy service's stub over the same channel.
    privacy: PrivacyClient<Transport>,
    /// The admin service's stub over the same channel.
    admin: AdminClient<Transport>,
    /// The backfill service's stub over the same channel.
    backfill: BackfillClient<Transport>,
    options: ClientOptions,
}

impl Client {
    /// A client of the server at `endpoint` (e.g. `http://127.0.0.1:50051`). The connection
    /// is made on the first call, so this succeeds while the server is still starting.
    pub fn connect(endpoint: &str, options: ClientOptions) -> Result<Client, ClientError> {
        let invalid = |source| ClientError::Endpoint {
            endpoint: endpoint.to_string(),
            source,
        };
        let mut channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(invalid)?
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true);
        if let Some(tls) = &options.tls {
            channel = channel.tls_config(tls.tonic_config()).map_err(invalid)?;
        } else if endpoint.starts_with("https:") {
            return Err(ClientError::Options(format!(
                "{endpoint} is a TLS endpoint: give the certificate authority that signed the server's certificate"
            )));
        }
        let authorization = match &options.token {
            None => None,
            Some(BearerToken(token)) => {
                let mut value: MetadataValue<Ascii> =
                    format!("Bearer {token}").parse().map_err(|_| {
                        ClientError::Options("the bearer token must be printable ASCII".to_string())
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let channel =
            InterceptedService::new(channel.connect_lazy(), Credentials { authorization });
        let stub = FeatureStoreClient::new(channel.clone())
            .max_decoding_message_size(options.decode_message_bytes_max)
            .max_encoding_message_size(options.encode_message_bytes_max);
        let privacy = PrivacyClient::new(channel.clone())
            .max_decoding_message_size(options.decode_message_bytes_max)
            .max_encoding_message_size(options.encode_message_bytes_max);
        let admin = AdminClient::new(channel.clone())
            .max_decoding_message_size(options.decode_message_bytes_max)
            .max_encoding_message_size(options.encode_message_bytes_max);
        let backfill = BackfillClient::new(channel)
            .max_decoding_message_size(options.decode_message_bytes_max)
            .max_encoding_message_size(options.encode_message_bytes_max);
        Ok(Client {
            stub,
            privacy,
            admin,
            backfill,
            options,
        })
    }

    /// Reads features for a batch of (user, surface) keys.
    pub async fn get_features(
        &self,
        request: ReadRequest,
    ) -> Result<proto::GetFeaturesResponse, ClientError> {
        let request = proto::GetFeaturesRequest::from(request);
        self.call(request, |mut stub, request| async move {
            stub.get_features(request).await
        })
        .await
    }

    /// Writes a batch of rows. A retry inside this call reuses the request's idempotency
    /// key, so the write is applied at most once.
    pub async fn write_features(
        &self,
        request: WriteRequest,
    ) -> Result<proto::WriteFeaturesResponse, ClientError> {
        self.write_features_raw(proto::WriteFeaturesRequest::from(request))
            .await
    }

    /// Sends a wire-form write request as it is, without client-side checks.
    pub async fn write_features_raw(
        &self,
        request: proto::WriteFeaturesRequest,
    ) -> Result<proto::WriteFeaturesResponse, ClientError> {
        self.call(request, |mut stub, request| async move {
            stub.write_features(request).await
        })
        .await
    }

    /// Sends a wire-form read request as it is, without client-side checks.
    pub async fn get_features_raw(
        &self,
        request: proto::GetFeaturesRequest,
    ) -> Result<proto::GetFeaturesResponse, ClientError> {
        self.call(request, |mut stub, request| async move {
            stub.get_features(request).await
        })
        .await
    }

    /// Decides a write as `write_features` would, without storing anything.
    pub async fn explain_write(
        &self,
        request: WriteRequest,
    ) -> Result<proto::ExplainWriteResponse, ClientError> {
        self.explain_write_raw(proto::WriteFeaturesRequest::from(request))
            .await
    }

    /// Sends a wire-form explain request as it is.
    pub async fn explain_write_raw(
        &self,
        request: proto::WriteFeaturesRequest,
    ) -> Result<proto::ExplainWriteResponse, ClientError> {
        self.call(request, |mut stub, request| async move {
            stub.explain_write(request).await
        })
        .await
    }

    /// Opens a bulk-load stream attached to `job_id` (created when new). The returned
    /// session says where the job stands: resume after `job.last_durable_chunk`. The
    /// stream has no deadline; a broken one fails the session's next call.
    /// Attaching is retried like a call when the job is still attached to a stream that
    /// just ended (ABORTED) or the server is unreachable (UNAVAILABLE).
    pub async fn start_load(
        &self,
        job_id: &str,
        source_fingerprint: &str,
    ) -> Result<LoadSession, ClientError> {
        self.retrying(|_| self.attach(job_id, source_fingerprint))
            .await
    }

    async fn attach(&self, job_id: &str, source_fingerprint: &str) -> Result<LoadSession, Status> {
        let (sender, receiver) = tokio::sync::mpsc::channel(LOAD_CHUNKS_QUEUED_MAX);
        sender
            .send(proto::BulkLoadRequest {
                message: Some(proto::bulk_load_request::Message::Start(proto::LoadStart {
                    job_id: job_id.to_string(),
                    source_fingerprint: source_fingerprint.to_string(),
                })),
            })
            .await
            .map_err(|_| Status::internal("the request stream closed before it started"))?;
        let mut responses = self
            .backfill
            .clone()
            .bulk_load(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await?
            .into_inner();
        let job = match responses.message().await? {
            Some(proto::BulkLoadResponse {
                message: Some(proto::bulk_load_response::Message::Job(job)),
            }) => job,
            _ => {
                return Err(Status::internal(
                    "the server did not say where the job stands",
                ));
            }
        };
        Ok(LoadSession {
            sender,
            responses,
            job,
        })
    }

    /// Where a bulk-load job stands.
    pub async fn load_job(&self, job_id: &str) -> Result<proto::LoadJob, ClientError> {
        let request = proto::GetLoadJobRequest {
            job_id: job_id.to_string(),
        };
        let backfill = self.backfill.clone();
        self.call(request, move |_, request| {
            let mut backfill = backfill.clone();
            async move { backfill.get_load_job(request).await }
        })
        .await
    }

    /// Aborts an open bulk-load job: nothing of it is applied.
    pub async fn abort_load(&self, job_id: &str) -> Result<proto::LoadJob, ClientError> {
        let request = proto::AbortLoadJobRequest {
            job_id: job_id.to_string(),
        };
        let backfill = self.backfill.clone();
        self.call(request, move |_, request| {
            let mut backfill = backfill.clone();
            async move { backfill.abort_load_job(request).await }
        })
        .await
    }

    /// Recent bulk-load jobs, newest first.
    pub async fn load_jobs(&self, limit: u32) -> Result<Vec<proto::LoadJob>, ClientError> {
        let backfill = self.backfill.clone();
        self.call(proto::ListLoadJobsRequest { limit }, move |_, request| {
            let mut backfill = backfill.clone();
            async move { backfill.list_load_jobs(request).await }
        })
        .await
        .map(|response| response.jobs)
    }

    /// Creates or replaces a user's state (privacy role).
    pub async fn set_user_state(
        &self,
        update: UserStateUpdate,
    ) -> Result<proto::UserState, ClientError> {
        let request = proto::SetUserStateRequest::from(update);
        let privacy = self.privacy.clone();
        self.call(request, move |_, request| {
            let mut privacy = privacy.clone();
            async move { privacy.set_user_state(request).await }
        })
        .await
    }

    /// A user's state (privacy role); NOT_FOUND when the user has none.
    pub async fn get_user_state(&self, user_id: u64) -> Result<proto::UserState, ClientError> {
        let privacy = self.privacy.clone();
        self.call(proto::GetUserStateRequest { user_id }, move |_, request| {
            let mut privacy = privacy.clone();
            async move { privacy.get_user_state(request).await }
        })
        .await
    }

    /// Loads the server's policy bundle again (admin role).
    pub async fn reload_policy(&self) -> Result<proto::PolicyStatus, ClientError> {
        let admin = self.admin.clone();
        self.call(proto::ReloadPolicyRequest {}, move |_, request| {
            let mut admin = admin.clone();
            async move { admin.reload_policy(request).await }
        })
        .await
    }

    /// A user's audit trail, oldest first (privacy role).
    pub async fn audit_trail(
        &self,
        user_id: u64,
        limit: u32,
    ) -> Result<proto::AuditTrail, ClientError> {
        let privacy = self.privacy.clone();
        self.call(
            proto::GetAuditTrailRequest { user_id, limit },
            move |_, request| {
                let mut privacy = privacy.clone();
                async move { privacy.get_audit_trail(request).await }
            },
        )
        .await
    }

    /// Erases a user (privacy role); returns when every step is done.
    pub async fn erase_user(&self, user_id: u64) -> Result<proto::ErasureReceipt, ClientError> {
        let privacy = self.privacy.clone();
        self.call(proto::EraseUserRequest { user_id }, move |_, request| {
            let mut privacy = privacy.clone();
            async move { privacy.erase_user(request).await }
        })
        .await
    }

    /// The receipt of an erasure (privacy role).
    pub async fn erasure_status(
        &self,
        receipt_id: &str,
    ) -> Result<proto::ErasureReceipt, ClientError> {
        let privacy = self.privacy.clone();
        let request = proto::GetErasureStatusRequest {
            receipt_id: receipt_id.to_string(),
        };
        self.call(request, move |_, request| {
            let mut privacy = privacy.clone();
            async move { privacy.get_erasure_status(request).await }
        })
        .await
    }

    /// Writes a backup on the server (admin role).
    pub async fn create_backup(&self) -> Result<proto::BackupInfo, ClientError> {
        let admin = self.admin.clone();
        self.call(proto::CreateBackupRequest {}, move |_, request| {
            let mut admin = admin.clone();
            async move { admin.create_backup(request).await }
        })
        .await
    }

    /// Runs the retention sweep now (admin role).
    pub async fn sweep_expired(&self) -> Result<proto::SweepReport, ClientError> {
        let admin = self.admin.clone();
        self.call(proto::SweepExpiredRequest {}, move |_, request| {
            let mut admin = admin.clone();
            async move { admin.sweep_expired(request).await }
        })
        .await
    }

    /// Checks the audit log's hash chain (admin role).
    pub async fn verify_audit_log(&self) -> Result<proto::AuditLogVerification, ClientError> {
        let admin = self.admin.clone();
        self.call(proto::VerifyAuditLogRequest {}, move |_, request| {
            let mut admin = admin.clone();
            async move { admin.verify_audit_log(request).await }
        })
        .await
    }

    /// The bundle in force and the progress of the latest purge (admin role).
    pub async fn policy_status(&self) -> Result<proto::PolicyStatus, ClientError> {
        let admin = self.admin.clone();
        self.call(proto::GetPolicyStatusRequest {}, move |_, request| {
            let mut admin = admin.clone();
            async move { admin.get_policy_status(request).await }
        })
        .await
    }

    /// What the server holds and runs with (admin role): rows and bytes per surface,
    /// storage figures, the bundle in force, uptime, the configuration in force.
    pub async fn stats(&self) -> Result<proto::StoreStats, ClientError> {
        let admin = self.admin.clone();
        self.call(proto::GetStatsRequest {}, move |_, request| {
            let mut admin = admin.clone();
            async move { admin.get_stats(request).await }
        })
        .await
    }

    /// The registered features.
    pub async fn list_features(&self) -> Result<Vec<proto::FeatureDefinition>, ClientError> {
        let response = self
            .call(
                proto::ListFeaturesRequest {},
                |mut stub, request| async move { stub.list_features(request).await },
            )
            .await?;
        Ok(response.features)
    }

    /// The registered surfaces.
    pub async fn list_surfaces(&self) -> Result<Vec<proto::SurfaceDefinition>, ClientError> {
        let response = self
            .call(
                proto::ListSurfacesRequest {},
                |mut stub, request| async move { stub.list_surfaces(request).await },
            )
            .await?;
        Ok(response.surfaces)
    }

    /// Sends `message` with the call's deadline, retrying retryable failures while the
    /// deadline allows.
    async fn call<M, R, F, Fut>(&self, message: M, send: F) -> Result<R, ClientError>
    where
        M: Clone,
        F: Fn(FeatureStoreClient<Transport>, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    {
        self.retrying(|remaining| {
            let mut request = tonic::Request::new(message.clone());
            request.set_timeout(remaining);
            let sent = send(self.stub.clone(), request);
            async move {
                tokio::time::timeout(remaining, sent)
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded("client deadline exceeded")))
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }

    /// Runs `attempt` (given the time left) until it succeeds, fails with a code that is
    /// not retryable, runs out of retries, or the deadline passes; exponential backoff
    /// between attempts, never sleeping past the deadline.
    async fn retrying<T, Fut>(
        &self,
        mut attempt: impl FnMut(Duration) -> Fut,
    ) -> Result<T, ClientError>
    where
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let deadline = Instant::now() + self.options.timeout;
        let mut backoff = self.options.initial_backoff;
        let mut retries = 0;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match attempt(remaining).await {
                Ok(done) => return Ok(done),
                Err(status) if is_retryable(status.code()) && retries < self.options.retries => {
                    // The last attempt gets what is left.
                    let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
                    if pause.is_zero() {
                        return Err(status.into());
                    }
                    tokio::time::sleep(pause).await;
                    backoff = backoff.saturating_mul(2);
                    retries += 1;
                }
                Err(status) => return Err(status.into()),
            }
        }
    }
}

/// Codes that mean "the same request may succeed later".
pub fn is_retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Aborted)
}
