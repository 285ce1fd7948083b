//! The gRPC port's connections: plaintext, or TLS (mutual TLS with a client certificate
//! authority) with rustls. Certificates are reloaded without a restart: the files are
//! checked every `tls.reload_interval`, and a changed set that loads whole replaces the
//! one in force for every later handshake (a set that does not load is logged and the old
//! one kept). Handshakes run concurrently, each within `tls.handshake_timeout`, so a slow
//! or silent client never holds up the others.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use anyhow::Context as _;
use parking_lot::RwLock;
use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;

/// What the request handlers may learn about a call's connection: put into every
/// request's extensions by tonic.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub remote: Option<SocketAddr>,
    /// The client's certificate chain, its own certificate first, over mutual TLS.
    pub peer_certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// One accepted connection.
#[derive(Debug)]
pub enum Connection {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        match self {
            Connection::Plain(stream) => ConnectionInfo {
                remote: stream.peer_addr().ok(),
                peer_certificates: None,
            },
            Connection::Tls(stream) => {
                let (tcp, session) = stream.get_ref();
                ConnectionInfo {
                    remote: tcp.peer_addr().ok(),
                    peer_certificates: session.peer_certificates().map(|chain| {
                        Arc::new(chain.iter().map(|c| c.clone().into_owned()).collect())
                    }),
                }
            }
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(stream) => Pin::new(stream).poll_read(context, buffer),
            Connection::Tls(stream) => Pin::new(stream.as_mut()).poll_read(context, buffer),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(stream) => Pin::new(stream).poll_write(context, bytes),
            Connection::Tls(stream) => Pin::new(stream.as_mut()).poll_write(context, bytes),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(stream) => Pin::new(stream).poll_flush(context),
            Connection::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(context),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(stream) => Pin::new(stream).poll_shutdown(context),
            Connection::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(context),
        }
    }
}

/// The TLS settings in force, and where they come from.
#[derive(Debug)]
pub struct Tls {
    config: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    /// The files' modification times when `current` was loaded.
    loaded_from: RwLock<Vec<Option<SystemTime>>>,
}

impl Tls {
    /// Loads the certificate, key and client authority the config names.
    pub fn load(config: &TlsConfig) -> anyhow::Result<Arc<Tls>> {
        let loaded_from = modification_times(config);
        let server_config = server_config(config)?;
        Ok(Arc::new(Tls {
            config: config.clone(),
            current: RwLock::new(Arc::new(server_config)),
            loaded_from: RwLock::new(loaded_from),
        }))
    }

    /// Loads the files again if any changed since they were last loaded; keeps the
    /// settings in force when the new ones do not load. Returns whether they changed.
    pub fn reload_if_changed(&self) -> anyhow::Result<bool> {
        let times = modification_times(&self.config);
        if *self.loaded_from.read() == times {
            return Ok(false);
        }
        // Whatever the outcome, these files are not tried again until they change again.
        *self.loaded_from.write() = times;
        let server_config = server_config(&self.config)?;
        *self.current.write() = Arc::new(server_config);
        Ok(true)
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.current.read()))
    }
}

fn modification_times(config: &TlsConfig) -> Vec<Option<SystemTime>> {
    [
        Some(config.certificate_path.as_path()),
        Some(config.key_path.as_path()),
        config.client_ca_path.as_deref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        std::fs::metadata(path)
            .and_then(|meta| meta.modified())
            .ok()
    })
    .collect()
}

/// rustls settings from the config's files: HTTP/2 only, and client certificates verified
/// against `client_ca_path` when it is set.
fn server_config(config: &TlsConfig) -> anyhow::Result<ServerConfig> {
    let read_chain = |path: &Path, what: &str| -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let chain = CertificateDer::pem_file_iter(path)
            .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
            .map_err(|error| {
                anyhow::anyhow!("cannot read the TLS {what} {}: {error}", path.display())
            })?;
        anyhow::ensure!(
            !chain.is_empty(),
            "the TLS {what} {} holds no certificate",
            path.display()
        );
        Ok(chain)
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &config.client_ca_path {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for certificate in read_chain(path, "client certificate authority")? {
                roots
                    .add(certificate)
                    .with_context(|| format!("client certificate authority {}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if config.client_certificate_optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .context("client certificate verification")?,
            )
        }
    };
    let chain = read_chain(&config.certificate_path, "certificate")?;
    let key = PrivateKeyDer::from_pem_file(&config.key_path).map_err(|error| {
        anyhow::anyhow!(
            "cannot read the TLS key {}: {error}",
            config.key_path.display()
        )
    })?;
    let mut server_config = builder
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not go together")?;
    server_config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(server_config)
}

/// Checks the TLS files every `tls.reload_interval` until `shutdown`, and puts a changed
/// set in force.
pub async fn reload_periodically(tls: Arc<Tls>, shutdown: CancellationToken) {
    let interval = tls.config.reload_interval;
    if interval.is_zero() {
        return;
    }
    let mut ticker = crate::Ticker::new(interval, shutdown);
    while ticker.tick().await {
        match tls.reload_if_changed() {
            Ok(true) => tracing::info!("TLS certificates reloaded"),
            Ok(false) => {}
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "TLS certificates changed but do not load; the previous ones stay in force")
            }
        }
    }
}

/// Handshakes in progress at once; more connections wait in the listen backlog.
const HANDSHAKES_AT_ONCE: usize = 256;

/// The connections accepted on `listener` until the stream is dropped: TCP with Nagle's
/// algorithm off (with it, a small response waits for the client's delayed
/// acknowledgement), then the TLS handshake when `tls` is set. A failed handshake is
/// logged and dropped; it never ends the stream.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
) -> ReceiverStream<io::Result<Connection>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_AT_ONCE));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                // The server stopped taking connections.
                () = sender.closed() => return,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, %remote, "cannot turn Nagle's algorithm off");
            }
            let Some(tls) = &tls else {
                if sender.send(Ok(Connection::Plain(stream))).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
                return;
            };
            let acceptor = tls.acceptor();
            let timeout = tls.config.handshake_timeout;
            let sender = sender.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = sender.send(Ok(Connection::Tls(Box::new(stream)))).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%error, %remote, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}
