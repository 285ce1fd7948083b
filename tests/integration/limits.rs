//! Limits on what an abusive or careless caller can take from the server: memory for
//! requests in flight, connections and file descriptors, and the time a shutdown waits.
//! Each runs the server in a child process of this test binary (see [`ChildServer`]), so
//! that its memory, descriptors and exit can be measured from outside.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use featurestore::domain::Value;
use featurestore::proto;
use featurestore_tests::{ChildServer, at, row, write};

const DIRECTORY_VARIABLE: &str = "FEATURESTORE_LIMITS_TEST_DIR";
const SCENARIO_VARIABLE: &str = "FEATURESTORE_LIMITS_SCENARIO";
/// The request budget of the memory scenario.
const BUDGET_BYTES: usize = 256 * 1024 * 1024;
/// The descriptor limit of the descriptors scenario.
const DESCRIPTORS: u64 = 256;

/// Not a test of its own: the server process of the tests below, which run it with
/// [`DIRECTORY_VARIABLE`] and [`SCENARIO_VARIABLE`] set. Without them, it returns at once.
#[test]
// Ignored so that it runs only as the child process its parent test starts (with
// `--ignored --exact`); the parents run in every suite run.
#[ignore = "the server process of the limits tests"]
fn serve_with_limits() {
    let Some(directory) = std::env::var_os(DIRECTORY_VARIABLE).map(PathBuf::from) else {
        return;
    };
    let mut config = featurestore_tests::child_config(&directory);
    match std::env::var(SCENARIO_VARIABLE).as_deref() {
        Ok("memory") => config.limits.request_bytes_in_flight_max = Some(BUDGET_BYTES),
        Ok("idle") => {
            config.limits.connection_preface_timeout = Duration::from_millis(500);
            config.limits.connection_idle_timeout = Duration::from_secs(1);
        }
        Ok("descriptors") => {
            // A service manager's common default; the idle connections below exceed it,
            // and are not closed for their silence within the test.
            rlimit::setrlimit(rlimit::Resource::NOFILE, DESCRIPTORS, DESCRIPTORS)
                .expect("lower the descriptor limit");
            config.storage.max_open_files = 64;
            config.limits.connection_preface_timeout = Duration::from_secs(60);
        }
        Ok("shutdown") => config.limits.shutdown_grace = Duration::from_secs(60),
        _ => {}
    }
    featurestore_tests::serve_in_child(&directory, config);
}

/// A server process for `scenario` on `directory`, and its endpoint once it serves.
async fn start(directory: &Path, scenario: &str) -> (ChildServer, String) {
    let log = std::fs::File::create(directory.join("server.log")).expect("create the log");
    let mut server = ChildServer::start(
        "limits::serve_with_limits",
        DIRECTORY_VARIABLE,
        directory,
        log,
        &[(SCENARIO_VARIABLE, scenario)],
    );
    let endpoint = server
        .endpoint(directory)
        .await
        .unwrap_or_else(|| panic!("the server did not start: {}", log_of(directory)));
    (server, endpoint)
}

fn log_of(directory: &Path) -> String {
    std::fs::read_to_string(directory.join("server.log")).unwrap_or_default()
}

/// A figure of `/proc/<pid>/status`, in bytes (`VmRSS`, `VmHWM`).
fn memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kilobytes| kilobytes * 1024)
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A valid write of about 16 MiB (within `decode_message_bytes_max`): 1,000 rows, each
/// with a 15,900-byte string. Its values are refused by the policy (not a canonical
/// topic), which does not matter: the memory is taken by receiving and decoding it.
fn large_write() -> Vec<u8> {
    let rows = (1..=1000)
        .map(|user_id| {
            let mut row = row(
                user_id,
                &["facebook_feed"],
                at(-60),
                vec![("top_topic", Value::String("x".repeat(15_900)))],
            );
            // The users have no state.
            row.user_state_generation = 0;
            row
        })
        .collect();
    let message =
        prost::Message::encode_to_vec(&proto::WriteFeaturesRequest::from(write("large", rows)));
    assert!(message.len() > 15 * 1024 * 1024 && message.len() < 16 * 1024 * 1024);
    message
}

/// Sends `message` on `streams` streams of one HTTP/2 connection at once; returns each
/// answer's gRPC status code.
async fn burst(endpoint: &str, message: &[u8], streams: usize) -> Vec<tonic::Code> {
    let address = endpoint.trim_start_matches("http://").to_string();
    let socket = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .handshake::<_, bytes::Bytes>(socket)
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(message);
    let frame = bytes::Bytes::from(frame);
    let mut answers = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let mut client = client.clone().ready().await.expect("ready");
        let request = http::Request::post(format!(
            "http://{address}/featurestore.v1.FeatureStore/WriteFeatures"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
        let (response, mut body) = client.send_request(request, false).expect("send");
        let frame = frame.clone();
        answers.spawn(async move {
            // The whole message is offered at once; HTTP/2 flow control paces it.
            let sending = async {
                body.reserve_capacity(frame.len());
                let _ = body.send_data(frame, true);
            };
            sending.await;
            let response = response.await.expect("response");
            let headers = response.headers().clone();
            let mut body = response.into_body();
            while let Some(data) = body.data().await {
                let _ = data;
            }
            let trailers = body.trailers().await.ok().flatten().unwrap_or_default();
            tonic::Status::from_header_map(&headers)
                .or_else(|| tonic::Status::from_header_map(&trailers))
                .map_or(tonic::Code::Unknown, |status| status.code())
        });
    }
    let mut codes = Vec::new();
    while let Some(code) = answers.join_next().await {
        codes.push(code.expect("a stream's task"));
    }
    codes
}

#[tokio::test]
async fn a_burst_of_large_requests_stays_within_the_memory_budget() {
    let directory = tempfile::tempdir().expect("directory");
    let (server, endpoint) = start(directory.path(), "memory").await;
    let message = large_write();
    let before = memory(server.pid(), "VmRSS");
    let started = Instant::now();
    let codes = burst(&endpoint, &message, 64).await;
    let peak = memory(server.pid(), "VmHWM");
    let grown = peak.saturating_sub(before);
    let refused = codes
        .iter()
        .filter(|code| **code == tonic::Code::ResourceExhausted)
        .count();
    eprintln!(
        "64 requests of {} MiB at once: {} answered, {refused} refused over the budget, in {:.1} s; resident memory {} MiB before, peak {} MiB (+{} MiB, budget {} MiB)",
        message.len() >> 20,
        codes.len(),
        started.elapsed().as_secs_f64(),
        before >> 20,
        peak >> 20,
        grown >> 20,
        BUDGET_BYTES >> 20,
    );
    assert_eq!(codes.len(), 64);
    assert!(
        codes
            .iter()
            .all(|code| matches!(code, tonic::Code::Ok | tonic::Code::ResourceExhausted)),
        "{codes:?}"
    );
    // The budget, plus what the server holds besides the messages themselves while it
    // answers them (the write path's work, allocator slack): see the README's limits.
    const OVERHEAD_BYTES: u64 = 128 * 1024 * 1024;
    assert!(
        grown <= BUDGET_BYTES as u64 + OVERHEAD_BYTES,
        "the burst took {} MiB, more than the budget of {} MiB and {} MiB of overhead",
        grown >> 20,
        BUDGET_BYTES >> 20,
        OVERHEAD_BYTES >> 20
    );
    server.kill();
}

/// Opens `count` TCP connections to `endpoint` that say nothing.
async fn silent_connections(endpoint: &str, count: usize) -> Vec<tokio::net::TcpStream> {
    let address = endpoint.trim_start_matches("http://");
    let mut connections = Vec::with_capacity(count);
    for _ in 0..count {
        let connected = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(address),
        )
        .await
        .expect("the server accepts connections")
        .expect("connect");
        connections.push(connected);
    }
    connections
}

/// Opens `count` HTTP/2 connections to `endpoint` that complete the handshake and open no
/// stream; they are kept open until dropped.
async fn idle_http2_connections(endpoint: &str, count: usize) -> Vec<tokio::task::JoinHandle<()>> {
    let address = endpoint.trim_start_matches("http://").to_string();
    let mut connections = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = tokio::net::TcpStream::connect(&address)
            .await
            .expect("connect");
        let (client, connection) = h2::client::handshake(socket).await.expect("handshake");
        connections.push(tokio::spawn(async move {
            let _client = client;
            let _ = connection.await;
        }));
    }
    connections
}

/// Whether the server closed `connection` (end of stream or reset) within `within`.
async fn closed_within(connection: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, connection.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed_after_their_deadlines() {
    let directory = tempfile::tempdir().expect("directory");
    let (server, endpoint) = start(directory.path(), "idle").await;
    let mut silent = silent_connections(&endpoint, 50).await;
    let idle = idle_http2_connections(&endpoint, 10).await;
    let started = Instant::now();
    // The preface deadline is half a second: a few seconds is plenty.
    for connection in &mut silent {
        assert!(
            closed_within(connection, Duration::from_secs(10)).await,
            "a connection that never sent the HTTP/2 preface is still open after {:?}",
            started.elapsed()
        );
    }
    // The idle deadline is a second: the HTTP/2 connections without a call end too.
    for connection in idle {
        tokio::time::timeout(Duration::from_secs(10), connection)
            .await
            .expect("an idle HTTP/2 connection is closed")
            .expect("its task");
    }
    eprintln!(
        "50 silent and 10 idle HTTP/2 connections closed within {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // A connection that makes calls is served as before.
    let client =
        featurestore_client::Client::connect(&endpoint, Default::default()).expect("client");
    client.list_surfaces().await.expect("a call");
    server.kill();
}

#[tokio::test]
async fn a_client_is_served_while_idle_connections_exceed_the_descriptor_limit() {
    let directory = tempfile::tempdir().expect("directory");
    let (server, endpoint) = start(directory.path(), "descriptors").await;
    // More silent connections than the server has descriptors.
    let _silent = silent_connections(&endpoint, 2 * DESCRIPTORS as usize).await;
    let client = featurestore_client::Client::connect(
        &endpoint,
        featurestore_client::ClientOptions {
            timeout: Duration::from_secs(5),
            retries: 0,
            ..Default::default()
        },
    )
    .expect("client");
    let started = Instant::now();
    let answered = client.list_surfaces().await;
    eprintln!(
        "with {} silent connections on a server limited to {DESCRIPTORS} descriptors, a call answered {:?} in {:.2} s",
        2 * DESCRIPTORS,
        answered.as_ref().map(Vec::len),
        started.elapsed().as_secs_f64()
    );
    answered.unwrap_or_else(|error| {
        panic!(
            "the client was locked out: {error}\n{}",
            log_of(directory.path())
        )
    });
    server.kill();
}

#[tokio::test]
async fn shutdown_does_not_wait_for_idle_connections() {
    let directory = tempfile::tempdir().expect("directory");
    let (server, endpoint) = start(directory.path(), "shutdown").await;
    let _silent = silent_connections(&endpoint, 50).await;
    let _idle = idle_http2_connections(&endpoint, 50).await;
    let (took, clean) = server.terminate();
    eprintln!(
        "SIGTERM with 50 silent and 50 idle HTTP/2 connections: exited in {:.2} s",
        took.as_secs_f64()
    );
    assert!(
        clean,
        "the server exited cleanly: {}",
        log_of(directory.path())
    );
    // The shutdown grace is a minute: a server that waited for these would take it all.
    assert!(
        took < Duration::from_secs(30),
        "SIGTERM took {took:?} with idle connections open"
    );
}
