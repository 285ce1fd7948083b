//! The server as a process: restarts on the same directory, health, reflection, shutdown.

use std::time::Duration;

use featurestore::domain::Value;
use featurestore::proto::ValueStatus;
use featurestore_tests::{TestServer, at, read, row, write};
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::{float, status};

#[tokio::test]
async fn everything_written_is_read_back_after_a_restart() {
    let server = TestServer::start().await;
    server.us_adults(1..=50).await;
    let request = write(
        "before-restart",
        (1..=50)
            .map(|user| {
                row(
                    user,
                    &["facebook_feed", "instagram_ads"],
                    at(-1),
                    vec![("interest_hiking", Value::Float(user as f32 / 100.0))],
                )
            })
            .collect(),
    );
    server
        .client
        .write_features(request.clone())
        .await
        .expect("write");
    let data_dir = server.stop().await;

    let server = TestServer::start_with(data_dir, |_| {}).await;
    let keys: Vec<(u64, &str)> = (1..=50)
        .flat_map(|user| [(user, "facebook_feed"), (user, "instagram_ads")])
        .collect();
    let response = server
        .client
        .get_features(read(&keys, &["interest_hiking"]))
        .await
        .expect("read");
    for (index, (user, _)) in keys.iter().enumerate() {
        assert_eq!(
            status(&response, index, "interest_hiking"),
            ValueStatus::Present
        );
        assert_eq!(
            float(&response, index, "interest_hiking"),
            *user as f32 / 100.0
        );
    }
    // The idempotency record survived too.
    let replay = server.client.write_features(request).await.expect("retry");
    assert!(replay.replayed);
}

#[tokio::test]
async fn health_answers_serving_and_reflection_lists_the_services() {
    let server = TestServer::start().await;
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");

    let mut health = HealthClient::new(channel.clone());
    for service in ["", "featurestore.v1.FeatureStore"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .expect("health check");
        assert_eq!(
            response.into_inner().status,
            ServingStatus::Serving as i32,
            "{service:?}"
        );
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let requests = tokio_stream::iter([
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "featurestore.v1.FeatureStore".to_string(),
            )),
        },
    ]);
    let mut responses = reflection
        .server_reflection_info(requests)
        .await
        .expect("reflection")
        .into_inner();
    let first = responses
        .next()
        .await
        .expect("an answer")
        .expect("not an error");
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("expected a service list, got {first:?}");
    };
    let names: Vec<_> = list
        .service
        .iter()
        .map(|service| service.name.as_str())
        .collect();
    for expected in [
        "featurestore.v1.FeatureStore",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let second = responses
        .next()
        .await
        .expect("an answer")
        .expect("not an error");
    let Some(MessageResponse::FileDescriptorResponse(files)) = second.message_response else {
        panic!("expected descriptors, got {second:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

#[tokio::test]
async fn a_stopped_server_refuses_new_calls() {
    let server = TestServer::start().await;
    server.us_adults([1]).await;
    let client = server.client.clone();
    client
        .write_features(write(
            "last",
            vec![row(
                1,
                &["facebook_feed"],
                at(-1),
                vec![("interest_hiking", Value::Float(0.5))],
            )],
        ))
        .await
        .expect("write");
    let _data_dir = server.stop().await;
    let error = client
        .get_features(read(&[(1, "facebook_feed")], &[]))
        .await
        .expect_err("server is gone");
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error}");
}

#[tokio::test]
async fn shutdown_turns_health_not_serving_and_ends_within_its_grace() {
    let server = TestServer::start_with(tempfile::tempdir().expect("directory"), |config| {
        config.limits.shutdown_grace = Duration::from_secs(1);
    })
    .await;
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    // A stream that never ends by itself: it would hold a graceful shutdown forever.
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: "featurestore.v1.FeatureStore".to_string(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("a status").expect("a message");
    assert_eq!(first.status(), ServingStatus::Serving);

    let stopping = tokio::spawn(server.stop());
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the watcher hears of the shutdown")
        .expect("a status")
        .expect("a message");
    assert_eq!(next.status(), ServingStatus::NotServing);
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .expect("the server stops once its one-second grace is over, open stream or not")
        .expect("the stopping task");
}
