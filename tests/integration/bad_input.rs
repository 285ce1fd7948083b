//! Bad input gets a clear answer naming the field or the limit, never a panic and never a
//! partial write.

use featurestore::domain::Value;
use featurestore::proto::{self, RowStatus, ValueStatus};
use featurestore_server::registry::SurfaceId;
use featurestore_server::storage::RowKey;
use featurestore_server::storage::keys::encode_row_key;
use featurestore_tests::{TestServer, at, read, row, write};
use tonic::Code;

use crate::{raw_body_call, raw_call, raw_grpc_call, status};

/// Turns a valid row into a malformed one.
type Damage = Box<dyn FnOnce(&mut proto::WriteRow)>;

fn wire_row(user_id: u64) -> proto::WriteRow {
    proto::WriteRow::from(row(
        user_id,
        &["facebook_feed"],
        at(-1),
        vec![("interest_hiking", Value::Float(0.5))],
    ))
}

/// Sends a write whose first row was altered by `damage`; returns the refusal.
async fn refused_write(
    server: &TestServer,
    damage: impl FnOnce(&mut proto::WriteRow),
) -> tonic::Status {
    let mut first = wire_row(1);
    damage(&mut first);
    let request = proto::WriteFeaturesRequest {
        idempotency_key: "bad".to_string(),
        rows: vec![wire_row(2), first],
    };
    match server.client.write_features_raw(request).await {
        Ok(response) => panic!("a malformed write was accepted: {response:?}"),
        Err(featurestore_client::ClientError::Status(status)) => status,
        Err(other) => panic!("unexpected error {other}"),
    }
}

/// Rewrites the stored bytes of `user_id`'s `facebook_feed` row (empty when none) in the
/// database of a stopped server, behind its back.
fn rewrite_stored_row(
    data_dir: &tempfile::TempDir,
    user_id: u64,
    change: impl FnOnce(&mut Vec<u8>),
) {
    let db = featurestore_tests::open_database_directly(data_dir);
    let features = db.cf_handle("features").expect("features column family");
    let key = encode_row_key(RowKey {
        user_id,
        surface: SurfaceId(1),
    });
    let mut bytes = db.get_cf(features, key).expect("get").unwrap_or_default();
    change(&mut bytes);
    db.put_cf(features, key, bytes).expect("put");
}

#[tokio::test]
async fn malformed_writes_are_refused_whole_naming_the_field() {
    let server = TestServer::start().await;
    let cases: Vec<(&str, Damage)> = vec![
        (
            "rows[1].provenance: is required",
            Box::new(|row| row.provenance = None),
        ),
        (
            "rows[1].user_id: must not be 0",
            Box::new(|row| row.user_id = 0),
        ),
        (
            "rows[1].features[0].float_value: NaN is not a finite number",
            Box::new(|row| {
                row.features[0].value = Some(proto::feature_value::Value::FloatValue(f32::NAN))
            }),
        ),
        (
            "rows[1].features[0].value: is required",
            Box::new(|row| row.features[0].value = None),
        ),
        (
            "rows[1].target_surfaces: needs at least 1 entries",
            Box::new(|row| row.target_surfaces.clear()),
        ),
        (
            "rows[1].features[1]: \"interest_hiking\" appears twice",
            Box::new(|row| row.features.push(row.features[0].clone())),
        ),
        (
            "rows[1].provenance.interaction_time_unix_micros",
            Box::new(|row| {
                row.provenance
                    .as_mut()
                    .expect("set")
                    .interaction_time_unix_micros = 0
            }),
        ),
        (
            "rows[1].features[0].topic_confidence: 1.5 is outside [0, 1]",
            Box::new(|row| {
                row.features[0].topic_id = "outdoors/hiking".to_string();
                row.features[0].topic_confidence = Some(1.5);
            }),
        ),
    ];
    for (expected, damage) in cases {
        let status = refused_write(&server, damage).await;
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{expected}: {status:?}"
        );
        assert!(
            status.message().contains(expected),
            "expected {expected:?} in {:?}",
            status.message()
        );
    }
    // Nothing of the refused requests was written, not even their valid first rows.
    let response = server
        .client
        .get_features(read(&[(2, "facebook_feed")], &["interest_hiking"]))
        .await
        .expect("read");
    assert_eq!(
        status(&response, 0, "interest_hiking"),
        ValueStatus::Defaulted
    );

    let status = server
        .client
        .write_features_raw(proto::WriteFeaturesRequest {
            idempotency_key: String::new(),
            rows: vec![wire_row(3)],
        })
        .await
        .expect_err("a write needs an idempotency key");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.to_string().contains("idempotency_key"), "{status}");
}

#[tokio::test]
async fn requests_over_a_limit_are_refused_naming_the_limit() {
    let server = TestServer::start_with(tempfile::tempdir().expect("temp dir"), |config| {
        config.limits.read_keys_max = 10;
        config.limits.write_rows_max = 2;
        config.limits.decode_message_bytes_max = 64 * 1024;
    })
    .await;
    let keys: Vec<(u64, &str)> = (1..=11).map(|user| (user, "facebook_feed")).collect();
    let error = server
        .client
        .get_features(read(&keys, &[]))
        .await
        .expect_err("11 keys refused");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error
            .to_string()
            .contains("11 entries exceed the limit read_keys_max = 10"),
        "{error}"
    );
    server
        .client
        .get_features(read(&keys[..10], &[]))
        .await
        .expect("10 keys are fine");

    let rows = (1..=3).map(|user| {
        row(
            user,
            &["facebook_feed"],
            at(-1),
            vec![("interest_hiking", Value::Float(0.1))],
        )
    });
    let error = server
        .client
        .write_features(write("too-many", rows.collect()))
        .await
        .expect_err("3 rows refused");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.to_string().contains("write_rows_max = 2"), "{error}");

    let big = "x".repeat(40 * 1024);
    let rows = (1..=2)
        .map(|user| {
            row(
                user,
                &["facebook_feed"],
                at(-1),
                vec![("top_topic", Value::String(big.clone()))],
            )
        })
        .collect();
    let error = server
        .client
        .write_features(write("too-big", rows))
        .await
        .expect_err("an oversized message is refused");
    assert_eq!(error.code(), Code::ResourceExhausted, "{error}");
    assert!(error.to_string().contains("limit"), "{error}");

    let error = server
        .client
        .get_features(read(
            &[(1, "facebook_feed")],
            &["interest_hiking", "no_such_feature"],
        ))
        .await
        .expect_err("unknown feature in the selection");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error
            .to_string()
            .contains("features[1]: unknown feature \"no_such_feature\""),
        "{error}"
    );
}

#[tokio::test]
async fn corrupt_stored_bytes_fail_only_their_row() {
    let server = TestServer::start().await;
    server.us_adults([1, 2]).await;
    server
        .write_float(
            "healthy",
            2,
            "facebook_feed",
            at(-1),
            "interest_hiking",
            0.25,
        )
        .await;
    let data_dir = server.stop().await;

    // Damage user 1's row behind the server's back.
    rewrite_stored_row(&data_dir, 1, |bytes| {
        *bytes = b"\x01garbage that is not a row".to_vec();
    });

    let server = TestServer::start_with(data_dir, |_| {}).await;
    let response = server
        .client
        .get_features(read(
            &[(1, "facebook_feed"), (2, "facebook_feed")],
            &["interest_hiking"],
        ))
        .await
        .expect("one corrupt row never fails the batch");
    assert_eq!(response.rows[0].status, RowStatus::DataLoss as i32);
    assert_eq!(
        response.rows[0].float_values,
        vec![0.0],
        "nothing from a corrupt row is served"
    );
    assert_eq!(response.rows[1].status, RowStatus::Ok as i32);
    assert_eq!(response.rows[1].float_values, vec![0.25]);

    // A write that would merge into the corrupt row is refused rather than papering over it.
    let error = server
        .client
        .write_features(write(
            "onto-corrupt",
            vec![row(
                1,
                &["facebook_feed"],
                at(0),
                vec![("interest_hiking", Value::Float(0.5))],
            )],
        ))
        .await
        .expect_err("refused");
    assert_eq!(error.code(), Code::DataLoss, "{error}");
}

#[tokio::test]
async fn a_row_damaged_past_its_checksum_is_served_not_at_all() {
    let server = TestServer::start().await;
    server.us_adults([1]).await;
    server
        .client
        .write_features(write(
            "two-values",
            vec![row(
                1,
                &["facebook_feed"],
                at(-1),
                vec![
                    ("interest_hiking", Value::Float(0.25)),
                    ("interest_cooking", Value::Float(0.75)),
                ],
            )],
        ))
        .await
        .expect("write");
    let data_dir = server.stop().await;

    // Give the row's last value (interest_cooking, a float: feature:u16 type:u8
    // provenance:u16 f32, then the checksum) an unknown type, and a checksum that matches:
    // the damage an encoder bug would leave, which only reading the value can find.
    rewrite_stored_row(&data_dir, 1, |bytes| {
        let body_len = bytes.len() - 4;
        bytes[body_len - 4 - 2 - 1] = 99;
        let checksum = crc32fast::hash(&bytes[..body_len]);
        bytes[body_len..].copy_from_slice(&checksum.to_le_bytes());
    });

    let server = TestServer::start_with(data_dir, |_| {}).await;
    let response = server
        .client
        .get_features(read(
            &[(1, "facebook_feed")],
            &["interest_hiking", "interest_cooking"],
        ))
        .await
        .expect("a damaged row fails only itself");
    assert_eq!(response.rows[0].status, RowStatus::DataLoss as i32);
    assert_eq!(
        response.rows[0].float_values,
        vec![0.0, 0.0],
        "not even the value read before the damage is served"
    );
}

#[tokio::test]
async fn a_server_at_its_request_limit_refuses_at_once_rather_than_queueing() {
    let server = TestServer::start_with(tempfile::tempdir().expect("temp dir"), |config| {
        config.limits.concurrent_requests_max = 1;
    })
    .await;
    // 64 reads of 1,000 keys at once: each holds the server's only permit for a while.
    let keys: Vec<(u64, &str)> = (1..=1000).map(|user| (user, "facebook_feed")).collect();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let client = server.client.clone();
        let request = read(&keys, &[]);
        calls.spawn(async move { client.get_features(request).await });
    }
    let (mut served, mut refused) = (0, 0);
    while let Some(answer) = calls.join_next().await {
        match answer.expect("call task") {
            Ok(_) => served += 1,
            Err(error) => {
                refused += 1;
                assert_eq!(error.code(), Code::ResourceExhausted, "{error}");
                assert!(
                    error.to_string().contains("limit of 1 concurrent requests"),
                    "{error}"
                );
            }
        }
    }
    assert!(served >= 1, "the first call is served");
    assert!(
        refused >= 1,
        "calls beyond the limit are refused, not queued"
    );
    // Once the burst is over, the server serves again.
    server
        .client
        .get_features(read(&keys[..10], &[]))
        .await
        .expect("served after the burst");
}

#[tokio::test]
async fn a_rapid_reset_flood_closes_its_connection_and_nothing_else() {
    let server = TestServer::start_with(tempfile::tempdir().expect("temp dir"), |config| {
        config.limits.pending_accept_reset_streams_max = 20;
    })
    .await;
    let address = server.endpoint.trim_start_matches("http://").to_string();
    let socket = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let (mut client, connection) = h2::client::handshake(socket).await.expect("handshake");
    let connection = tokio::spawn(connection);
    // Open streams and reset them at once, many more than the limit allows.
    let mut sent = 0;
    for _ in 0..1000 {
        let request = http::Request::post(format!(
            "http://{address}/featurestore.v1.FeatureStore/GetFeatures"
        ))
        .header("content-type", "application/grpc")
        .body(())
        .expect("request");
        let Ok((_, mut stream)) = client.send_request(request, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
    }
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), connection)
        .await
        .expect("the server closes the flooding connection")
        .expect("connection task");
    let error = closed.expect_err("closed by the server, with an error");
    // A GOAWAY saying why, or, when the client was still writing, the closed socket.
    assert!(
        error.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || error.is_io(),
        "{error} after {sent} streams"
    );
    // Other callers are served as before.
    server
        .client
        .get_features(read(&[(1, "facebook_feed")], &["interest_hiking"]))
        .await
        .expect("served");
}

#[tokio::test]
async fn a_call_whose_deadline_has_passed_changes_nothing() {
    let server = TestServer::start().await;
    server.us_adults([1]).await;
    let late = || {
        write(
            "late",
            vec![row(
                1,
                &["facebook_feed"],
                at(-1),
                vec![("interest_hiking", Value::Float(0.5))],
            )],
        )
    };
    // A raw HTTP/2 call (the tonic client would enforce the deadline itself and cancel
    // first) whose deadline, 1 ns, passes before the server can start the work.
    let message = prost::Message::encode_to_vec(&proto::WriteFeaturesRequest::from(late()));
    let code = raw_grpc_call(
        &server,
        "/featurestore.v1.FeatureStore/WriteFeatures",
        &[("grpc-timeout", "1n")],
        &message,
    )
    .await;
    assert!(
        matches!(code, Code::DeadlineExceeded | Code::Cancelled),
        "{code:?}"
    );

    let hiking = || read(&[(1, "facebook_feed")], &["interest_hiking"]);
    let response = server.client.get_features(hiking()).await.expect("read");
    assert_eq!(
        status(&response, 0, "interest_hiking"),
        ValueStatus::Defaulted,
        "a write its caller was told had failed was not applied behind its back"
    );
    // The same write with time to spare is applied.
    server.client.write_features(late()).await.expect("write");
    let response = server.client.get_features(hiking()).await.expect("read");
    assert_eq!(
        status(&response, 0, "interest_hiking"),
        ValueStatus::Present
    );
}

/// An HTTP/2 frame: length, type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len())
        .expect("a small frame")
        .to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test]
async fn a_flood_of_malformed_streams_closes_its_connection_and_nothing_else() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const HEADERS: u8 = 0x1;
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    let server = TestServer::start_with(tempfile::tempdir().expect("temp dir"), |config| {
        config.limits.local_error_reset_streams_max = 10;
    })
    .await;
    let address = server.endpoint.trim_start_matches("http://").to_string();
    let mut socket = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let mut flood = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    flood.extend(frame(SETTINGS, 0, 0, &[]));
    // Requests an HTTP/2 server must refuse stream by stream: each carries a
    // connection-specific header, which HTTP/2 forbids (HPACK: :method POST, :scheme http,
    // :path /, then the literal `connection: close`).
    let mut block = vec![0x83, 0x86, 0x84, 0x00, 10];
    block.extend_from_slice(b"connection");
    block.push(5);
    block.extend_from_slice(b"close");
    for stream in 0..100u32 {
        flood.extend(frame(HEADERS, 0x4 | 0x1, 2 * stream + 1, &block));
    }
    // The server may close the connection before it has read everything.
    let _ = socket.write_all(&flood).await;
    let mut received = Vec::new();
    let ended = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        socket.read_to_end(&mut received),
    )
    .await
    .expect("the server closes the connection");
    // A reset connection is an answer too; otherwise the GOAWAY must say why.
    if ended.is_ok() {
        let mut goaway = None;
        let mut rest = received.as_slice();
        while rest.len() >= 9 {
            let length =
                usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let Some(payload) = rest.get(9..9 + length) else {
                break;
            };
            if rest[3] == GOAWAY && payload.len() >= 8 {
                goaway = Some(u32::from_be_bytes(
                    payload[4..8].try_into().expect("4 bytes"),
                ));
            }
            rest = &rest[9 + length..];
        }
        assert_eq!(goaway, Some(ENHANCE_YOUR_CALM), "{received:?}");
    }
    server
        .client
        .get_features(read(&[(1, "facebook_feed")], &["interest_hiking"]))
        .await
        .expect("other callers are served");
}

#[tokio::test]
async fn bodies_that_do_not_decode_are_invalid_arguments_naming_the_message() {
    let server = TestServer::start().await;
    server.us_adults([1]).await;
    let valid = prost::Message::encode_to_vec(&proto::WriteFeaturesRequest::from(write(
        "whole",
        vec![row(
            1,
            &["facebook_feed"],
            at(-1),
            vec![("interest_hiking", Value::Float(0.5))],
        )],
    )));
    // Truncations, a string that is not UTF-8 (the idempotency key, field 1), a field of
    // wire type 7 (there is none), and the valid request with one byte flipped at each
    // of many places: each body that prost cannot decode must be the caller's fault.
    let mut bodies: Vec<Vec<u8>> = vec![
        valid[..valid.len() - 1].to_vec(),
        valid[..valid.len() / 2].to_vec(),
        vec![0x0a, 0x02, 0xff, 0xfe],
        vec![0x0f],
        vec![0xff; 64],
    ];
    for place in (0..valid.len()).step_by(3) {
        let mut flipped = valid.clone();
        flipped[place] ^= 0xa5;
        bodies.push(flipped);
    }
    let mut malformed = 0;
    for body in &bodies {
        if <proto::WriteFeaturesRequest as prost::Message>::decode(body.as_slice()).is_ok() {
            continue;
        }
        malformed += 1;
        let answer = raw_call(
            &server,
            "/featurestore.v1.FeatureStore/WriteFeatures",
            &[],
            body,
        )
        .await;
        assert_eq!(
            answer.code,
            Some(Code::InvalidArgument),
            "{body:?}: {answer:?}"
        );
        assert!(
            answer
                .message
                .starts_with("the WriteFeaturesRequest message does not decode"),
            "{answer:?}"
        );
    }
    assert!(
        malformed >= 20,
        "only {malformed} of the bodies were malformed"
    );
    // Frames that are not whole: a body ending in the middle of a message, or of a frame
    // header, and a compression flag that does not exist.
    let mut cut = vec![0u8];
    cut.extend_from_slice(&u32::try_from(valid.len()).expect("small").to_be_bytes());
    cut.extend_from_slice(&valid[..10]);
    let mut flag = vec![7u8];
    flag.extend_from_slice(&u32::try_from(valid.len()).expect("small").to_be_bytes());
    flag.extend_from_slice(&valid);
    for (body, expected) in [
        (cut, "ends in the middle of a message"),
        (vec![0, 0, 0], "ends in the middle of a message"),
        (flag, "compression flag is 7"),
    ] {
        let answer = raw_body_call(
            &server,
            "/featurestore.v1.FeatureStore/WriteFeatures",
            &[],
            body,
        )
        .await;
        assert_eq!(answer.code, Some(Code::InvalidArgument), "{answer:?}");
        assert!(answer.message.contains(expected), "{answer:?}");
    }
    // In a stream too: the bulk load's first message.
    let answer = raw_call(
        &server,
        "/featurestore.v1.Backfill/BulkLoad",
        &[],
        &[0xff; 16],
    )
    .await;
    assert_eq!(answer.code, Some(Code::InvalidArgument), "{answer:?}");
    assert!(
        answer
            .message
            .contains("BulkLoadRequest message does not decode"),
        "{answer:?}"
    );
    // Nothing of any of them was stored.
    assert_eq!(
        crate::statuses(&server, &[(1, "facebook_feed")], "interest_hiking").await,
        [ValueStatus::Defaulted]
    );
}

#[tokio::test]
async fn content_types_other_than_grpc_are_answered_415() {
    let server = TestServer::start().await;
    let request = prost::Message::encode_to_vec(&proto::ListSurfacesRequest {});
    let path = "/featurestore.v1.FeatureStore/ListSurfaces";
    for content_type in [
        "application/json",
        "text/plain",
        "application/grpc+json",
        "",
    ] {
        let answer = raw_call(&server, path, &[("content-type", content_type)], &request).await;
        assert_eq!(
            answer.http_status,
            http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}: {answer:?}"
        );
        assert_eq!(answer.code, Some(Code::InvalidArgument), "{answer:?}");
        assert!(answer.message.contains("is not supported"), "{answer:?}");
    }
    for content_type in [
        "application/grpc",
        "application/grpc+proto",
        "application/grpc; charset=utf-8",
    ] {
        let answer = raw_call(&server, path, &[("content-type", content_type)], &request).await;
        assert_eq!(
            (answer.http_status, answer.code),
            (http::StatusCode::OK, Some(Code::Ok)),
            "{content_type:?}"
        );
    }
}
