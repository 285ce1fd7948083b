//! End-to-end tests: every test starts the real server on a loopback port and talks to it
//! through the real client.

mod audit;
mod auth;
mod bad_input;
mod bulk_load;
mod bulk_load_jobs;
mod cli;
mod crash;
mod erasure;
mod fail_closed;
mod faults;
mod lifecycle;
mod limits;
mod observability;
mod policy;
mod policy_changes;
mod races;
mod read_instructions;
mod read_write;
mod redis_backends;
mod redis_bulk_load;
mod redis_cluster;
mod redis_failover;
mod redis_races;
mod redis_server;
mod redis_tls;
mod retention;
mod stress;
mod tidy;

use clap::Parser;
use featurestore::proto::{self, GetFeaturesResponse, ValueStatus};
use featurestore_client::cli::Args;
use featurestore_tests::TestServer;

/// The environment variable naming the scenario a child process of this test binary runs.
const CHILD_VARIABLE: &str = "FEATURESTORE_CHILD_SCENARIO";

/// Runs the ignored test `test` (its path, e.g. `faults::disk_full`) in a child process of
/// this test binary, where failpoints, which are global to a process, touch no other test;
/// fails with the child's output when it fails, or when it did not run. Returns what the
/// child wrote to its standard error.
fn run_in_child(test: &str) -> String {
    let output = std::process::Command::new(std::env::current_exe().expect("this test binary"))
        .args([
            "--exact",
            test,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_VARIABLE, test)
        .output()
        .expect("run the scenario's process");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "scenario {test} failed:\n{stdout}\n{stderr}"
    );
    stderr.into_owned()
}

/// Whether this process is the child that runs `test` (see [`run_in_child`]).
fn is_child_for(test: &str) -> bool {
    std::env::var(CHILD_VARIABLE).as_deref() == Ok(test)
}

/// Runs `featurestore <arguments>` in-process against `server`; returns the exit status and
/// output.
async fn featurestore(server: &TestServer, arguments: &[&str]) -> anyhow::Result<(u8, String)> {
    let mut command = vec!["featurestore", "--endpoint", server.endpoint.as_str()];
    command.extend_from_slice(arguments);
    let args = Args::try_parse_from(command)?;
    let mut out = Vec::new();
    let code = featurestore_client::cli::run(args, &mut out).await?;
    Ok((code, String::from_utf8(out)?))
}

/// The status of `feature` in row `row` of a read response.
fn status(response: &GetFeaturesResponse, row: usize, feature: &str) -> ValueStatus {
    let column = column_index(response, feature);
    ValueStatus::try_from(response.rows[row].statuses[column]).expect("a known value status")
}

/// The status of `feature` for each (user, surface), read now.
async fn statuses(server: &TestServer, keys: &[(u64, &str)], feature: &str) -> Vec<ValueStatus> {
    let response = server
        .client
        .get_features(featurestore_tests::read(keys, &[feature]))
        .await
        .expect("read");
    (0..keys.len())
        .map(|index| status(&response, index, feature))
        .collect()
}

/// The float value of `feature` in row `row`.
fn float(response: &GetFeaturesResponse, row: usize, feature: &str) -> f32 {
    let column = &response.columns[column_index(response, feature)];
    response.rows[row].float_values[column.offset as usize]
}

fn column_index(response: &GetFeaturesResponse, feature: &str) -> usize {
    response
        .columns
        .iter()
        .position(|column| column.name == feature)
        .unwrap_or_else(|| panic!("no column {feature} in {:?}", response.columns))
}

/// Verdict of the feature at `feature` of row `row` of a write response.
fn verdict(
    response: &proto::WriteFeaturesResponse,
    row: usize,
    feature: usize,
) -> &proto::FeatureVerdict {
    &response.rows[row].verdicts[feature]
}

fn outcomes(verdict: &proto::FeatureVerdict) -> Vec<(String, proto::Outcome)> {
    verdict
        .surfaces
        .iter()
        .map(|surface| {
            (
                surface.surface.clone(),
                proto::Outcome::try_from(surface.outcome).expect("a known outcome"),
            )
        })
        .collect()
}

/// What a raw HTTP/2 call was answered with.
#[derive(Debug)]
struct RawAnswer {
    http_status: http::StatusCode,
    /// The gRPC status, from the headers or the trailers; none when neither has one.
    code: Option<tonic::Code>,
    message: String,
}

/// Sends one gRPC message (`message`, already encoded) to `path` over a raw HTTP/2
/// connection, with `headers` (a `content-type` among them replaces `application/grpc`),
/// and returns the answer: for calls the tonic client would not send as they are.
async fn raw_call(
    server: &TestServer,
    path: &str,
    headers: &[(&str, &str)],
    message: &[u8],
) -> RawAnswer {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(message);
    raw_body_call(server, path, headers, frame).await
}

/// [`raw_call`] with the request body as it is sent: gRPC frames, or anything.
async fn raw_body_call(
    server: &TestServer,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> RawAnswer {
    let address = server.endpoint.trim_start_matches("http://").to_string();
    let socket = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let (client, connection) = h2::client::handshake(socket).await.expect("handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let mut request =
        http::Request::post(format!("http://{address}{path}")).header("te", "trailers");
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
    {
        request = request.header("content-type", "application/grpc");
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(()).expect("request");
    let (response, mut sending) = client.send_request(request, false).expect("send");
    sending
        .send_data(body.into(), true)
        .expect("send the message");
    let response = response.await.expect("response");
    let http_status = response.status();
    let headers = response.headers().clone();
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        data.expect("data");
    }
    let trailers = body.trailers().await.expect("trailers").unwrap_or_default();
    let status = tonic::Status::from_header_map(&headers)
        .or_else(|| tonic::Status::from_header_map(&trailers));
    RawAnswer {
        http_status,
        code: status.as_ref().map(tonic::Status::code),
        message: status
            .map(|status| status.message().to_string())
            .unwrap_or_default(),
    }
}

/// The status code of [`raw_call`] with these arguments.
async fn raw_grpc_call(
    server: &TestServer,
    path: &str,
    headers: &[(&str, &str)],
    message: &[u8],
) -> tonic::Code {
    raw_call(server, path, headers, message)
        .await
        .code
        .expect("a grpc-status")
}
