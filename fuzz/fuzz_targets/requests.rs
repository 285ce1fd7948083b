//! Request decoding and validation: any bytes, decoded as each request message the server
//! receives and parsed against the default limits, never panic; what parses converts back
//! to the wire form and parses again to the same request.
#![no_main]

use featurestore::RequestLimits;
use featurestore::proto;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let limits = RequestLimits::default();
    if let Ok(request) = proto::GetFeaturesRequest::decode(data)
        && let Ok(read) = limits.parse_read(request)
    {
        let again = limits
            .parse_read(proto::GetFeaturesRequest::from(read.clone()))
            .expect("a parsed read parses again");
        assert_eq!(again, read);
    }
    if let Ok(request) = proto::WriteFeaturesRequest::decode(data)
        && let Ok(write) = limits.parse_write(request)
    {
        let again = limits
            .parse_write(proto::WriteFeaturesRequest::from(write.clone()))
            .expect("a parsed write parses again");
        assert_eq!(again, write);
    }
    if let Ok(proto::BulkLoadRequest {
        message: Some(proto::bulk_load_request::Message::Chunk(chunk)),
    }) = proto::BulkLoadRequest::decode(data)
    {
        let _ = limits.parse_load_chunk(chunk.rows);
    }
    if let Ok(request) = proto::SetUserStateRequest::decode(data) {
        let _ = featurestore::domain::UserStateUpdate::try_from(request);
    }
});
