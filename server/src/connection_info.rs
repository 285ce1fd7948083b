//! What the request handlers may learn about a call's connection: where it comes from and
//! the client's certificate chain. Put into every request's extensions by tonic (see
//! `connections.rs`).

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;

/// What a request knows of its connection.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub remote: Option<SocketAddr>,
    /// The client's certificate chain, its own certificate first, over mutual TLS.
    pub peer_certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The connection's count of calls in progress, which its idle timeout reads.
    pub(crate) calls: Arc<dyn CallCount>,
}

/// Counts the calls in progress on one connection.
pub(crate) trait CallCount: Send + Sync + Debug {
    fn call_started(&self);
    fn call_ended(&self);
}
