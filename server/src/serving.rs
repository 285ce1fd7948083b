//! Serving the gRPC port: the server that answers health checks while the rest starts,
//! the services with their message limits, and the tonic server with its layers (outermost
//! first: calls counted per connection, request ids and metrics, the content-type and
//! authentication gates, the caller's deadline, the memory budget), run until shutdown and
//! its grace.

use std::sync::Arc;

use anyhow::Context;
use featurestore::proto::admin_server::AdminServer;
use featurestore::proto::backfill_server::BackfillServer;
use featurestore::proto::feature_store_server::FeatureStoreServer;
use featurestore::proto::privacy_server::PrivacyServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Backend, Config};
use crate::connections::{self, Connections};
use crate::metrics::Metrics;
use crate::observe;
use crate::service::auth::Authenticator;
use crate::service::{self, FeatureStoreService, gate, health};
use crate::tls;

/// What the gRPC server is made of.
pub struct Serving<H> {
    pub listener: TcpListener,
    pub tls: Option<Arc<tls::Tls>>,
    pub connections: Arc<Connections>,
    pub authenticator: Arc<Authenticator>,
    pub metrics: Option<Arc<Metrics>>,
    pub handlers: FeatureStoreService,
    pub health_service: tonic_health::pb::health_server::HealthServer<H>,
    pub health_reporter: tonic_health::server::HealthReporter,
}

impl<H> std::fmt::Debug for Serving<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// Serves until `shutdown`, then lets in-flight calls finish for `shutdown_grace` and
/// closes what is left.
pub async fn serve<H: tonic_health::pb::health_server::Health>(
    parts: Serving<H>,
    config: &Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let limits = &config.limits;
    let memory_budget = service::budget::MemoryBudget::new(limits.request_bytes_in_flight()?);
    let handlers = parts.handlers;
    let decode_max = limits.decode_message_bytes_max;
    let encode_max = limits.encode_message_bytes_max;
    let (reflection, reflection_v1alpha) = reflection()?;
    let stop_accepting = shutdown.clone();
    let connections_at_shutdown = Arc::clone(&parts.connections);
    let health_reporter = parts.health_reporter;
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
            parts.metrics,
            config.observability.slow_request_threshold,
        ))
        .layer(gate::GateLayer::new(gate::GrpcContentType))
        .layer(gate::GateLayer::new(parts.authenticator))
        .layer(service::deadline::DeadlineLayer)
        .layer(memory_budget.layer())
        .layer(tower::util::MapResponseLayer::new(
            oversized_request_is_resource_exhausted,
        ))
        .add_service(parts.health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            FeatureStoreServer::new(handlers.clone())
                .max_decoding_message_size(decode_max)
                .max_encoding_message_size(encode_max),
        )
        .add_service(
            PrivacyServer::new(handlers.clone())
                .max_decoding_message_size(decode_max)
                .max_encoding_message_size(encode_max),
        )
        .add_service(
            BackfillServer::new(handlers.clone())
                .max_decoding_message_size(decode_max)
                .max_encoding_message_size(encode_max),
        )
        .add_service(
            AdminServer::new(handlers)
                .max_decoding_message_size(decode_max)
                .max_encoding_message_size(encode_max),
        )
        .serve_with_incoming_shutdown(
            connections::incoming(
                parts.listener,
                parts.tls,
                Arc::clone(&parts.connections),
                shutdown.clone(),
            ),
            async move {
                stop_accepting.cancelled().await;
                tracing::info!("shutting down: refusing new requests, finishing in-flight ones");
                connections_at_shutdown.begin_shutdown();
                health::set_all(&health_reporter, tonic_health::ServingStatus::NotServing).await;
            },
        );
    let grace = limits.shutdown_grace;
    tokio::select! {
        served = server => served.context("gRPC server failed"),
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace = ?grace, "in-flight requests did not finish within the shutdown grace");
            parts.connections.close_all();
            Ok(())
        }
    }
}

/// The handlers of the feature store's services, with the config's limits.
pub fn handlers(
    core: &Arc<crate::core::Core>,
    config: &Config,
    metrics: Option<Arc<Metrics>>,
    background: &CancellationToken,
) -> anyhow::Result<FeatureStoreService> {
    let limits = &config.limits;
    Ok(FeatureStoreService::new(
        Arc::clone(core),
        service::ServiceOptions {
            limits: limits.request_limits(),
            concurrent_requests_max: limits.concurrent_requests_max,
            // A read from a Redis Cluster waits on the network: never on the request's task.
            inline_read_keys_max: match config.storage.backend {
                Backend::Rocksdb => limits.inline_read_keys_max,
                Backend::RedisCluster => 0,
            },
            chunks_decided_at_once: config.bulk_load.chunks_decided_at_once,
            metrics,
            config_shown: config.shown()?,
            stats_rows_sampled: config.observability.stats_rows_sampled,
        },
        background.clone(),
    ))
}

/// gRPC reflection, in both versions clients use.
#[allow(clippy::type_complexity)]
fn reflection() -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(featurestore::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(featurestore::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok((v1, v1alpha))
}

/// Serves health checks (and UNAVAILABLE to every other call) on a second handle of
/// `listener` until the returned guard is dropped; returns the handle the real server
/// serves on once it is ready.
pub fn serve_while_starting(
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
            connections::incoming(starting_listener, tls, connections, ready.clone()),
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
