//! The feature store's wire API: the generated gRPC types and stubs, the encoded descriptor
//! set served by reflection, and the validated domain types every request is parsed into.
//!
//! This crate has no runtime: no tokio, no RocksDB. The server and the client both depend
//! on it, so a request means the same thing on both sides.

pub mod codec;
pub mod domain;
pub mod jurisdiction;
mod parse;

pub use parse::{InvalidRequest, RequestLimits};

/// Generated protobuf messages and gRPC stubs of `featurestore.v1`.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used
)]
pub mod proto {
    tonic::include_proto!("featurestore.v1");
}

/// The encoded `FileDescriptorSet` of `proto/`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/featurestore_descriptor.bin"));
