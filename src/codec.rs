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

use std::marker::PhantomData;

use tonic::codec::{DecodeBuf, Decoder};
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
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Decoded + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = MessageDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder(PhantomData)
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
        U::decode(buf).map(Some).map_err(|error| {
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
