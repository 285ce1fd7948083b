//! TLS for the gRPC port (mutual TLS with a client certificate authority) with rustls.
//! Certificates are reloaded without a restart: the files are checked every
//! `tls.reload_interval`, and a changed set that loads whole replaces the one in force for
//! every later handshake (a set that does not load is logged and the old one kept). The
//! handshakes themselves run in `connections.rs`, each within
//! `tls.handshake_timeout`.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use parking_lot::RwLock;
use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;

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

    /// An acceptor with the settings in force now.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.current.read()))
    }

    /// How long a client's handshake may take.
    pub(crate) fn handshake_timeout(&self) -> std::time::Duration {
        self.config.handshake_timeout
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
pub async fn reload_periodically(
    tls: Arc<Tls>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    shutdown: CancellationToken,
) {
    let interval = tls.config.reload_interval;
    if interval.is_zero() {
        return;
    }
    let mut ticker = crate::ticker::Ticker::new(interval, shutdown);
    while ticker.tick().await {
        let reloaded = tls.reload_if_changed();
        if let (Some(metrics), Ok(true) | Err(_)) = (&metrics, &reloaded) {
            metrics.tls_reload(reloaded.is_ok());
        }
        match reloaded {
            Ok(true) => tracing::info!("TLS certificates reloaded"),
            Ok(false) => {}
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "TLS certificates changed but do not load; the previous ones stay in force")
            }
        }
    }
}
