//! The gRPC codec of the generated services: prost's, except for what a message that does
//! not decode is answered with. prost's codec answers INTERNAL whichever side failed; a
//! request body the server cannot decode (truncated, malformed, a string that is not
//! UTF-8) is the caller's fault, and answers INVALID_ARGUMENT naming the message and what
//! failed, so that neither the caller nor an alert rule mistakes it for a server fault. A
//! response a client cannot decode stays INTERNAL.
//!
//! Which side decodes a message is a property of its type: every message an RPC takes is
//! [`Decoded::BY_THE_SERVER`], every one it returns is not; the compiler refuses a service
//! whose messages are not listed below.
//!
//! Encoding is prost's too, except for the read's answer, [`proto::GetFeaturesResponse`]:
//! the hot path's largest message, written row by row with its packed arrays copied whole
//! ([`encode_get_features_response`]), to the same bytes prost writes.

use std::marker::PhantomData;

use bytes::{Buf, BufMut};
use prost::encoding::{self, WireType};
use tonic::codec::{DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

use crate::proto;

/// Where a message is decoded, which decides who is to blame when it does not decode.
pub trait Decoded {
    /// The server decodes it: it is a request.
    const BY_THE_SERVER: bool;
}

macro_rules! decoded {
    ($by_the_server:literal: $($message:ident),* $(,)?) => {
        $(impl Decoded for proto::$message {
            const BY_THE_SERVER: bool = $by_the_server;
        })*
    };
}

decoded!(true:
    GetFeaturesRequest, WriteFeaturesRequest, ListFeaturesRequest, ListSurfacesRequest,
    BulkLoadRequest, GetLoadJobRequest, AbortLoadJobRequest, ListLoadJobsRequest,
    ReloadPolicyRequest, GetPolicyStatusRequest, VerifyAuditLogRequest, SweepExpiredRequest,
    CreateBackupRequest, GetStatsRequest, SetUserStateRequest, GetUserStateRequest,
    GetAuditTrailRequest, EraseUserRequest, GetErasureStatusRequest,
);
decoded!(false:
    GetFeaturesResponse, WriteFeaturesResponse, ListFeaturesResponse, ListSurfacesResponse,
    ExplainWriteResponse, BulkLoadResponse, LoadJob, ListLoadJobsResponse, PolicyStatus,
    AuditLogVerification, SweepReport, BackupInfo, StoreStats, UserState, AuditTrail,
    ErasureReceipt,
);

/// How a message is written on the wire.
pub trait Encoded: prost::Message + Sized {
    /// Writes the message, as [`prost::Message::encode`] does.
    fn encode_wire(&self, buf: &mut impl BufMut) {
        self.encode_raw(buf);
    }

    /// About how many bytes the message takes, to size the buffer once (0: unknown).
    fn wire_bytes_hint(&self) -> usize {
        0
    }
}

macro_rules! encoded_by_prost {
    ($($message:ident),* $(,)?) => {
        $(impl Encoded for proto::$message {})*
    };
}

encoded_by_prost!(
    GetFeaturesRequest,
    WriteFeaturesRequest,
    ListFeaturesRequest,
    ListSurfacesRequest,
    BulkLoadRequest,
    GetLoadJobRequest,
    AbortLoadJobRequest,
    ListLoadJobsRequest,
    ReloadPolicyRequest,
    GetPolicyStatusRequest,
    VerifyAuditLogRequest,
    SweepExpiredRequest,
    CreateBackupRequest,
    GetStatsRequest,
    SetUserStateRequest,
    GetUserStateRequest,
    GetAuditTrailRequest,
    EraseUserRequest,
    GetErasureStatusRequest,
    WriteFeaturesResponse,
    ListFeaturesResponse,
    ListSurfacesResponse,
    ExplainWriteResponse,
    BulkLoadResponse,
    LoadJob,
    ListLoadJobsResponse,
    PolicyStatus,
    AuditLogVerification,
    SweepReport,
    BackupInfo,
    StoreStats,
    UserState,
    AuditTrail,
    ErasureReceipt,
);

impl Encoded for proto::GetFeaturesResponse {
    fn encode_wire(&self, buf: &mut impl BufMut) {
        encode_get_features_response(self, buf);
    }

    fn wire_bytes_hint(&self) -> usize {
        // The packed arrays and a few bytes of keys and lengths per row: a 500-row answer
        // is hundreds of kilobytes, which the buffer would otherwise reach by doubling.
        self.rows
            .iter()
            .map(|row| 16 + row.statuses.len() + row.float_values.len() * 4)
            .sum()
    }
}

/// Writes `response` as prost would, without its per-element calls: each row is laid out
/// in a scratch buffer (its statuses as single bytes when they fit, its floats copied as
/// one run) and handed to `buf` in one piece.
pub fn encode_get_features_response(response: &proto::GetFeaturesResponse, buf: &mut impl BufMut) {
    encoding::message::encode_repeated(1, &response.columns, buf);
    let mut row_bytes = Vec::new();
    for row in &response.rows {
        row_bytes.clear();
        encode_row(row, &mut row_bytes);
        buf.put_u8(key(2, WireType::LengthDelimited));
        put_length(row_bytes.len(), buf);
        buf.put_slice(&row_bytes);
    }
}

/// The key byte of field `tag` (below 16) with `wire_type`.
const fn key(tag: u8, wire_type: WireType) -> u8 {
    (tag << 3) | wire_type as u8
}

/// A length as a varint: one byte below 0x80.
fn put_length(length: usize, out: &mut impl BufMut) {
    match u8::try_from(length) {
        Ok(byte) if byte < 0x80 => out.put_u8(byte),
        _ => encoding::encode_varint(length as u64, out),
    }
}

fn encode_row(row: &proto::FeatureRow, out: &mut Vec<u8>) {
    if let Ok(status) = u8::try_from(row.status)
        && status < 0x80
    {
        if status != 0 {
            out.extend_from_slice(&[key(1, WireType::Varint), status]);
        }
    } else {
        encoding::int32::encode(1, &row.status, out);
    }
    if row.statuses.iter().all(|status| (0..0x80).contains(status)) {
        if !row.statuses.is_empty() {
            // A varint below 0x80 is its own single byte.
            out.push(key(2, WireType::LengthDelimited));
            put_length(row.statuses.len(), out);
            out.extend(row.statuses.iter().map(|&status| status as u8));
        }
    } else {
        encoding::int32::encode_packed(2, &row.statuses, out);
    }
    if !row.float_values.is_empty() {
        out.push(key(3, WireType::LengthDelimited));
        put_length(row.float_values.len() * 4, out);
        out.reserve(row.float_values.len() * 4);
        for value in &row.float_values {
            out.extend_from_slice(&value.to_le_bytes());
        }
    }
    encoding::int64::encode_packed(4, &row.int64_values, out);
    encoding::string::encode_repeated(5, &row.string_values, out);
    encoding::message::encode_repeated(6, &row.sparse_values, out);
    encoding::int64::encode_packed(7, &row.event_times_unix_micros, out);
}

/// prost's encoding and decoding, with the status above for a message that does not
/// decode. Named by `build.rs` as the codec of every generated service and client.
#[derive(Debug)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Encoded + Send + 'static,
    U: prost::Message + Default + Decoded + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = MessageEncoder<T>;
    type Decoder = MessageDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        MessageEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder(PhantomData)
    }
}

/// Encodes `T` as [`Encoded`] says.
#[derive(Debug)]
pub struct MessageEncoder<T>(PhantomData<T>);

impl<T: Encoded> Encoder for MessageEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // The buffer grows as it is written: encoding a message cannot fail.
        buf.reserve(item.wire_bytes_hint());
        item.encode_wire(buf);
        Ok(())
    }
}

/// Decodes `U`, blaming the request or the response as [`Decoded`] says.
#[derive(Debug)]
pub struct MessageDecoder<U>(PhantomData<U>);

impl<U> Decoder for MessageDecoder<U>
where
    U: prost::Message + Default + Decoded,
{
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // A message arrives in one contiguous buffer: decoding from a slice steps over its
        // bytes without the buffer's bookkeeping for every field.
        let length = buf.remaining();
        let decoded = if buf.chunk().len() == length {
            let decoded = U::decode(&buf.chunk()[..length]);
            buf.advance(length);
            decoded
        } else {
            U::decode(buf)
        };
        decoded.map(Some).map_err(|error| {
            let code = if U::BY_THE_SERVER {
                Code::InvalidArgument
            } else {
                Code::Internal
            };
            let name = std::any::type_name::<U>();
            let name = name.rsplit("::").next().unwrap_or(name);
            Status::new(code, format!("the {name} message does not decode: {error}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost::Message;

    use super::*;

    fn sparse() -> impl Strategy<Value = proto::SparseVector> {
        (
            prop::collection::vec(".{0,6}", 0..3),
            prop::collection::vec(any::<f32>(), 0..3),
        )
            .prop_map(|(topics, weights)| proto::SparseVector { topics, weights })
    }

    fn row() -> impl Strategy<Value = proto::FeatureRow> {
        // Statuses mostly in the enum's range, sometimes anything (negative ones take ten
        // bytes as varints).
        let status = prop_oneof![4 => 0..8i32, 1 => any::<i32>()];
        (
            status.clone(),
            prop::collection::vec(status, 0..24),
            prop::collection::vec(any::<f32>(), 0..90),
            prop::collection::vec(any::<i64>(), 0..3),
            prop::collection::vec(".{0,8}", 0..3),
            prop::collection::vec(sparse(), 0..2),
            prop::collection::vec(any::<i64>(), 0..3),
        )
            .prop_map(
                |(
                    status,
                    statuses,
                    float_values,
                    int64_values,
                    string_values,
                    sparse_values,
                    event_times,
                )| {
                    proto::FeatureRow {
                        status,
                        statuses,
                        float_values,
                        int64_values,
                        string_values,
                        sparse_values,
                        event_times_unix_micros: event_times,
                    }
                },
            )
    }

    fn column() -> impl Strategy<Value = proto::FeatureColumn> {
        (".{0,12}", any::<i32>(), any::<u32>(), any::<u32>()).prop_map(
            |(name, value_type, dimension, offset)| proto::FeatureColumn {
                name,
                value_type,
                dimension,
                offset,
            },
        )
    }

    proptest! {
        #[test]
        fn the_reads_answer_is_written_to_the_bytes_prost_writes(
            columns in prop::collection::vec(column(), 0..4),
            rows in prop::collection::vec(row(), 0..6),
        ) {
            let response = proto::GetFeaturesResponse { columns, rows };
            let mut written = Vec::new();
            response.encode_wire(&mut written);
            prop_assert_eq!(&written, &response.encode_to_vec());
            prop_assert_eq!(proto::GetFeaturesResponse::decode(written.as_slice()).ok(), Some(response));
        }
    }
}
