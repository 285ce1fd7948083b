//! `featurestore.v1.Backfill`: the bulk-load stream and its job calls. A stream attaches
//! to its job, then each chunk is parsed here (row by row, so one bad row is reported,
//! not fatal), decided and staged by the core on the blocking pool, and acknowledged.

use std::sync::Arc;

use featurestore::proto::{self, backfill_server::Backfill, bulk_load_request, bulk_load_response};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::{FeatureStoreService, status};
use crate::core::{ChunkOutcome, Core, LoadAttachment, PreparedChunk};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::service::auth::{Principal, principal_of};
use crate::staging::{JobRecord, JobState, Summary};

/// Malformed rows listed in one acknowledgement; all are counted.
const INVALID_ROWS_LISTED_MAX: usize = 100;
/// Answers a stream may have waiting for the client before the server stops reading.
const PENDING_ANSWERS_MAX: usize = 8;
/// Jobs ListLoadJobs returns when the caller sets no limit.
const LISTED_JOBS_DEFAULT: usize = 100;

type Answers = mpsc::Sender<Result<proto::BulkLoadResponse, Status>>;

#[tonic::async_trait]
impl Backfill for FeatureStoreService {
    type BulkLoadStream = ReceiverStream<Result<proto::BulkLoadResponse, Status>>;

    async fn bulk_load(
        &self,
        request: Request<Streaming<proto::BulkLoadRequest>>,
    ) -> Result<Response<Self::BulkLoadStream>, Status> {
        let principal = principal_of(&request).map_err(status)?;
        let mut inbound = request.into_inner();
        let start = match inbound.message().await? {
            Some(proto::BulkLoadRequest {
                message: Some(bulk_load_request::Message::Start(start)),
            }) => start,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message of a bulk load must be `start`",
                ));
            }
            None => {
                return Err(Status::invalid_argument(
                    "the stream ended before its `start` message",
                ));
            }
        };
        let core = Arc::clone(&self.core);
        let (attachment, job) = tokio::task::spawn_blocking(move || {
            core.load_attach(&start.job_id, &start.source_fingerprint)
        })
        .await
        .map_err(|error| status(Error::Task(error.to_string())))?
        .map_err(status)?;
        let (answers, receiver) = mpsc::channel(PENDING_ANSWERS_MAX);
        answers
            .send(Ok(proto::BulkLoadResponse {
                message: Some(bulk_load_response::Message::Job(job_to_proto(job))),
            }))
            .await
            .map_err(|_| Status::cancelled("the client went away"))?;
        let service = self.clone();
        tokio::spawn(
            async move {
                service
                    .drive_load(Arc::new(attachment), principal, inbound, answers)
                    .await;
            }
            .instrument(tracing::Span::current()),
        );
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn get_load_job(
        &self,
        request: Request<proto::GetLoadJobRequest>,
    ) -> Result<Response<proto::LoadJob>, Status> {
        let job_id = request.into_inner().job_id;
        let job = self
            .run_blocking(move |core| core.load_job(&job_id))
            .await
            .map_err(status)?;
        Ok(Response::new(job_to_proto(job)))
    }

    async fn abort_load_job(
        &self,
        request: Request<proto::AbortLoadJobRequest>,
    ) -> Result<Response<proto::LoadJob>, Status> {
        let job_id = request.into_inner().job_id;
        let job = self
            .run_blocking(move |core| core.load_abort(&job_id))
            .await
            .map_err(status)?;
        Ok(Response::new(job_to_proto(job)))
    }

    async fn list_load_jobs(
        &self,
        request: Request<proto::ListLoadJobsRequest>,
    ) -> Result<Response<proto::ListLoadJobsResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => LISTED_JOBS_DEFAULT,
            limit => limit as usize,
        };
        let jobs = self
            .run_blocking(move |core| core.load_jobs(limit))
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ListLoadJobsResponse {
            jobs: jobs.into_iter().map(job_to_proto).collect(),
        }))
    }
}

/// Chunks of one stream being decided (on the blocking pool) ahead of the one being made
/// durable: deciding is CPU work and persisting mostly waits for the disk, so they overlap.
pub(super) const CHUNKS_PREPARED_AHEAD: usize = 2;

/// What the persisting task of a stream does next, in stream order.
enum Step {
    Chunk(JoinHandle<Result<PreparedChunk, Error>>),
    Commit,
    Fail(Status),
}

impl FeatureStoreService {
    /// Reads a bulk-load stream after its start: each chunk is decided as soon as it
    /// arrives, and a task of its own makes the decided chunks durable in order,
    /// acknowledges them, and commits on request. The first error ends the stream with its
    /// status; the job stays as it was after its last durable chunk.
    async fn drive_load(
        &self,
        attachment: Arc<LoadAttachment>,
        principal: Arc<Principal>,
        mut inbound: Streaming<proto::BulkLoadRequest>,
        answers: Answers,
    ) {
        let (steps, pending) = mpsc::channel(CHUNKS_PREPARED_AHEAD);
        let job_id = attachment.job_id().to_string();
        // The persisting task holds the attachment: the job is detached when it ends.
        let persisting = tokio::spawn(
            persist_in_order(
                Arc::clone(&self.core),
                self.metrics.clone(),
                attachment,
                pending,
                answers,
            )
            .in_current_span(),
        );
        loop {
            let received = tokio::select! {
                received = inbound.message() => received,
                // The persisting task ended (an error was answered), or the server stops.
                () = steps.closed() => break,
                () = self.stopping.cancelled() => break,
            };
            let message = match received {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(error) => {
                    tracing::debug!(job = %job_id, %error, "bulk-load stream broken");
                    break;
                }
            };
            let (step, last) = match message.message {
                Some(bulk_load_request::Message::Chunk(chunk)) => {
                    match self.prepare_chunk(&job_id, &principal, chunk).await {
                        Ok(prepared) => (Step::Chunk(prepared), false),
                        Err(status) => (Step::Fail(status), true),
                    }
                }
                Some(bulk_load_request::Message::Commit(_)) => (Step::Commit, true),
                Some(bulk_load_request::Message::Start(_)) => (
                    Step::Fail(Status::invalid_argument(
                        "`start` may only be the first message of a stream",
                    )),
                    true,
                ),
                None => (
                    Step::Fail(Status::invalid_argument(
                        "a bulk-load message must hold `chunk` or `commit`",
                    )),
                    true,
                ),
            };
            if steps.send(step).await.is_err() || last {
                break;
            }
        }
        drop(steps);
        // Chunks already received are made durable even if the client went away.
        let _ = persisting.await;
    }

    /// Starts deciding a chunk on the blocking pool, under a concurrency permit.
    async fn prepare_chunk(
        &self,
        job_id: &str,
        principal: &Arc<Principal>,
        chunk: proto::LoadChunk,
    ) -> Result<JoinHandle<Result<PreparedChunk, Error>>, Status> {
        // A bulk load is background work: it waits for permits rather than being refused.
        let load_permit = Arc::clone(&self.load_permits)
            .acquire_owned()
            .await
            .map_err(|_| status(Error::Stopping))?;
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| status(Error::Stopping))?;
        let core = Arc::clone(&self.core);
        let limits = self.limits;
        let job_id = job_id.to_string();
        let principal = Arc::clone(principal);
        Ok(tokio::task::spawn_blocking(move || {
            let _permits = (load_permit, permit);
            let (rows, invalid) = limits.parse_load_chunk(chunk.rows)?;
            principal.check_write(rows.iter().map(|(index, row)| (*index, row)))?;
            core.load_prepare(&job_id, chunk.sequence, rows, invalid)
        }))
    }
}

/// Makes the decided chunks of a stream durable one after the other, in stream order,
/// answering each; runs the commit when it comes.
async fn persist_in_order(
    core: Arc<Core>,
    metrics: Option<Arc<Metrics>>,
    attachment: Arc<LoadAttachment>,
    mut steps: mpsc::Receiver<Step>,
    answers: Answers,
) {
    let blocking =
        |work: Box<dyn FnOnce() -> Result<bulk_load_response::Message, Error> + Send>| async move {
            tokio::task::spawn_blocking(work)
                .await
                .map_err(|error| status(Error::Task(error.to_string())))
                .and_then(|result| result.map_err(status))
        };
    while let Some(step) = steps.recv().await {
        let (answer, last) = match step {
            Step::Chunk(prepared) => {
                let prepared = prepared
                    .await
                    .map_err(|error| status(Error::Task(error.to_string())))
                    .and_then(|result| result.map_err(status));
                let answer = match prepared {
                    Ok(prepared) => {
                        let core = Arc::clone(&core);
                        let metrics = metrics.clone();
                        let attachment = Arc::clone(&attachment);
                        blocking(Box::new(move || {
                            core.load_persist(&attachment, prepared).map(|outcome| {
                                let ack = ack_to_proto(outcome);
                                if let (Some(metrics), Some(summary)) = (&metrics, &ack.summary) {
                                    metrics.bulk_load_chunk(summary);
                                }
                                bulk_load_response::Message::Ack(ack)
                            })
                        }))
                        .await
                    }
                    Err(status) => Err(status),
                };
                (answer, false)
            }
            Step::Commit => {
                let core = Arc::clone(&core);
                let committing = Arc::clone(&attachment);
                // A commit runs to its end even if the client goes away meanwhile.
                let answer = blocking(Box::new(move || {
                    core.load_commit(&committing)
                        .map(|job| bulk_load_response::Message::Committed(job_to_proto(job)))
                }))
                .await;
                (answer, true)
            }
            Step::Fail(status) => (Err(status), true),
        };
        let last = last || answer.is_err();
        let answer = answer.map(|message| proto::BulkLoadResponse {
            message: Some(message),
        });
        if last {
            // Detached before the last answer, so the client may attach again at once.
            drop(attachment);
            drop(steps);
            let _ = answers.send(answer).await;
            return;
        }
        if answers.send(answer).await.is_err() {
            return;
        }
    }
}

fn ack_to_proto(outcome: ChunkOutcome) -> proto::ChunkAck {
    proto::ChunkAck {
        sequence: outcome.sequence,
        duplicate: outcome.duplicate,
        summary: (!outcome.duplicate).then(|| summary_to_proto(&outcome.summary)),
        invalid_rows: outcome
            .invalid
            .into_iter()
            .take(INVALID_ROWS_LISTED_MAX)
            .map(|(row, error)| proto::InvalidRow {
                row: u32::try_from(row).unwrap_or(u32::MAX),
                field: error.field,
                problem: error.problem,
            })
            .collect(),
    }
}

fn summary_to_proto(summary: &Summary) -> proto::LoadSummary {
    proto::LoadSummary {
        rows_received: summary.rows_received,
        rows_accepted: summary.rows_accepted,
        rows_transformed: summary.rows_transformed,
        rows_denied: summary.rows_denied,
        rows_invalid: summary.rows_invalid,
        values_admitted: summary.values_admitted,
        values_refused: summary.values_refused,
        reasons: summary
            .reasons
            .iter()
            .map(|(reason, (rows, values))| proto::ReasonCount {
                reason: *reason,
                rows: *rows,
                values: *values,
            })
            .collect(),
    }
}

fn job_to_proto(job: JobRecord) -> proto::LoadJob {
    proto::LoadJob {
        state: match job.state {
            JobState::Open => proto::LoadJobState::Open,
            JobState::Committing => proto::LoadJobState::Committing,
            JobState::Committed => proto::LoadJobState::Committed,
            JobState::Aborted => proto::LoadJobState::Aborted,
        } as i32,
        last_durable_chunk: job.last_durable_chunk,
        summary: Some(summary_to_proto(&job.summary)),
        created_at_unix_micros: job.created_at,
        updated_at_unix_micros: job.updated_at,
        files_ingested: job.files_ingested,
        committed_at_unix_micros: job.committed_at,
        source_fingerprint: job.source_fingerprint,
        job_id: job.job_id,
    }
}
