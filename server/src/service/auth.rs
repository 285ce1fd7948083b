//! Who is calling, and what they may do.
//!
//! Every call is authenticated by the [`Gate`] of [`Authenticator`] before its body is decoded: a bearer token
//! (the `authorization: Bearer <token>` header, matched by its SHA-256 against the
//! configured principals, so the config never holds a usable token) or, over mutual TLS,
//! the client certificate's names. The layer then checks that the principal holds the
//! role the method needs ([`needs`]) and hands the [`Principal`] to the handler, which
//! checks the request's scope once it is decoded: the surfaces of a read
//! ([`Principal::check_read`]), the sources and producers of a write
//! ([`Principal::check_write`]). Anything no rule allows is refused.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use featurestore::domain::{ReadRequest, WriteRow};
use sha2::{Digest, Sha256};

use crate::config::{AuthConfig, AuthMode, PrincipalConfig};
use crate::error::Error;
pub use crate::methods::{Needs, Role, needs};
use crate::registry::Registry;
use crate::service::gate::Gate;

/// A set of names, or all of them.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Scope {
    All,
    Only(HashSet<String>),
}

impl Scope {
    fn from_names(names: &[String]) -> Scope {
        if names.iter().any(|name| name == "*") {
            Scope::All
        } else {
            Scope::Only(names.iter().cloned().collect())
        }
    }

    fn allows(&self, name: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Only(names) => names.contains(name),
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Scope::Only(names) if names.is_empty())
    }
}

/// An authenticated caller and what it may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    read_surfaces: Scope,
    write_sources: Scope,
    write_producers: Scope,
    privacy: bool,
    admin: bool,
}

impl Principal {
    /// The caller of a server without authentication: every role, every surface and source.
    pub fn unrestricted() -> Principal {
        Principal {
            name: "unauthenticated (auth disabled)".to_string(),
            read_surfaces: Scope::All,
            write_sources: Scope::All,
            write_producers: Scope::All,
            privacy: true,
            admin: true,
        }
    }

    fn from_config(config: &PrincipalConfig) -> Principal {
        Principal {
            name: config.name.clone(),
            read_surfaces: Scope::from_names(&config.read_surfaces),
            write_sources: Scope::from_names(&config.write_sources),
            write_producers: if config.write_producers.is_empty() {
                Scope::All
            } else {
                Scope::from_names(&config.write_producers)
            },
            privacy: config.privacy,
            admin: config.admin,
        }
    }

    pub fn has(&self, role: Role) -> bool {
        match role {
            Role::Reader => !self.read_surfaces.is_empty(),
            Role::Writer => !self.write_sources.is_empty(),
            Role::Privacy => self.privacy,
            Role::Admin => self.admin,
        }
    }

    /// Refuses a read of a surface this principal may not read.
    pub fn check_read(&self, request: &ReadRequest) -> Result<(), Error> {
        if self.read_surfaces == Scope::All {
            return Ok(());
        }
        match request
            .keys
            .iter()
            .position(|key| !self.read_surfaces.allows(&key.surface))
        {
            None => Ok(()),
            Some(index) => Err(Error::PermissionDenied(format!(
                "keys[{index}]: {} may not read surface {:?}",
                self.name, request.keys[index].surface
            ))),
        }
    }

    /// Refuses a write of a source, or stating a producer, this principal may not; `rows`
    /// are the rows with their index in the request.
    pub fn check_write<'a>(
        &self,
        rows: impl IntoIterator<Item = (usize, &'a WriteRow)>,
    ) -> Result<(), Error> {
        for (index, row) in rows {
            let provenance = &row.provenance;
            if !self.write_sources.allows(&provenance.source) {
                return Err(Error::PermissionDenied(format!(
                    "rows[{index}]: {} may not write values of source {:?}",
                    self.name, provenance.source
                )));
            }
            if !self.write_producers.allows(&provenance.producer_id) {
                return Err(Error::PermissionDenied(format!(
                    "rows[{index}]: {} may not write as producer {:?}",
                    self.name, provenance.producer_id
                )));
            }
        }
        Ok(())
    }
}

/// The principal a handler's request was authenticated as: set by the authenticator on every
/// call it lets through, so its absence is a server bug and refused as such.
pub fn principal_of<T>(request: &tonic::Request<T>) -> Result<Arc<Principal>, Error> {
    request
        .extensions()
        .get::<Arc<Principal>>()
        .cloned()
        .ok_or_else(|| Error::PermissionDenied("the call was not authenticated".to_string()))
}

/// The SHA-256 of a token, in lowercase hex: what the config holds.
pub fn hash_token(token: &str) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(64);
    for byte in Sha256::digest(token.as_bytes()) {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    hex
}

/// A new random bearer token: 32 bytes from the operating system, in hex.
pub fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|error| anyhow::anyhow!("cannot draw random bytes: {error}"))?;
    Ok(format!(
        "fst_{}",
        bytes
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
    ))
}

/// The configured principals, found by token hash or by certificate name.
#[derive(Debug)]
pub struct Authenticator {
    mode: AuthMode,
    by_token_hash: HashMap<String, Arc<Principal>>,
    by_certificate_name: HashMap<String, Arc<Principal>>,
    unrestricted: Arc<Principal>,
}

/// Why a call is refused before its body is decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    Unauthenticated(String),
    PermissionDenied(String),
}

impl Authenticator {
    /// Checks the config whole: a mistake in it stops the server at start.
    /// `client_certificates` says whether the server asks for client certificates.
    pub fn new(
        config: &AuthConfig,
        registry: &Registry,
        client_certificates: bool,
    ) -> anyhow::Result<Authenticator> {
        if config.mode == AuthMode::Required && config.principals.is_empty() {
            anyhow::bail!(
                "authentication is required (auth.mode = \"required\", the default) but no \
                 principal is configured: add [[auth.principals]] to the config file (see \
                 config/featurestore.toml), or, on a development machine only, start with \
                 --auth-disabled"
            );
        }
        let mut names = HashSet::new();
        let mut by_token_hash = HashMap::new();
        let mut by_certificate_name = HashMap::new();
        for config in &config.principals {
            let name = &config.name;
            if name.trim().is_empty() {
                anyhow::bail!("auth.principals: a principal has an empty name");
            }
            if !names.insert(name.clone()) {
                anyhow::bail!("auth.principals: {name:?} is configured twice");
            }
            if config.token_sha256.is_empty() && config.certificate_names.is_empty() {
                anyhow::bail!(
                    "principal {name:?} has neither token_sha256 nor certificate_names: nobody could authenticate as it"
                );
            }
            if !config.certificate_names.is_empty() && !client_certificates {
                anyhow::bail!(
                    "principal {name:?} is identified by certificate_names, but the server does \
                     not ask for client certificates: set tls.client_ca_path"
                );
            }
            for surface in &config.read_surfaces {
                if surface != "*" && registry.surface(surface).is_none() {
                    anyhow::bail!("principal {name:?}: read_surfaces: unknown surface {surface:?}");
                }
            }
            for source in &config.write_sources {
                if source != "*" && registry.source(source).is_none() {
                    anyhow::bail!("principal {name:?}: write_sources: unknown source {source:?}");
                }
            }
            if !config.write_producers.is_empty() && config.write_sources.is_empty() {
                anyhow::bail!(
                    "principal {name:?}: write_producers is set but write_sources is empty"
                );
            }
            let principal = Arc::new(Principal::from_config(config));
            for hash in &config.token_sha256 {
                let hash = hash.to_ascii_lowercase();
                if hash.len() != 64 || !hash.bytes().all(|byte| byte.is_ascii_hexdigit()) {
                    anyhow::bail!(
                        "principal {name:?}: token_sha256 {hash:?} is not a SHA-256 in hex (64 characters)"
                    );
                }
                if by_token_hash
                    .insert(hash.clone(), Arc::clone(&principal))
                    .is_some()
                {
                    anyhow::bail!("principal {name:?}: token_sha256 {hash} is used twice");
                }
            }
            for certificate_name in &config.certificate_names {
                if by_certificate_name
                    .insert(certificate_name.clone(), Arc::clone(&principal))
                    .is_some()
                {
                    anyhow::bail!(
                        "principal {name:?}: certificate name {certificate_name:?} is used twice"
                    );
                }
            }
        }
        Ok(Authenticator {
            mode: config.mode,
            by_token_hash,
            by_certificate_name,
            unrestricted: Arc::new(Principal::unrestricted()),
        })
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Who is calling, from the request's headers and its connection's client certificate,
    /// and whether they may call the method at all.
    pub fn authorize<B>(
        &self,
        request: &http::Request<B>,
    ) -> Result<Option<Arc<Principal>>, Refusal> {
        let needs = needs(request.uri().path());
        if needs == Needs::Nothing {
            return Ok(None);
        }
        let principal = match self.mode {
            AuthMode::Disabled => Arc::clone(&self.unrestricted),
            AuthMode::Required => self.authenticate(request)?,
        };
        match needs {
            Needs::Nothing | Needs::AnyPrincipal => {}
            Needs::Role(role) if principal.has(role) => {}
            Needs::Role(role) => {
                return Err(Refusal::PermissionDenied(format!(
                    "{} does not hold the {} role that {} needs",
                    principal.name,
                    role_name(role),
                    request.uri().path()
                )));
            }
            Needs::Refused => {
                return Err(Refusal::PermissionDenied(format!(
                    "no rule allows {}",
                    request.uri().path()
                )));
            }
        }
        Ok(Some(principal))
    }

    fn authenticate<B>(&self, request: &http::Request<B>) -> Result<Arc<Principal>, Refusal> {
        if let Some(value) = request.headers().get(http::header::AUTHORIZATION) {
            // The scheme's name is case-insensitive (RFC 6750).
            let token = value
                .to_str()
                .ok()
                .and_then(|value| value.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token)
                .ok_or_else(|| {
                    Refusal::Unauthenticated(
                        "the authorization header must be `Bearer <token>`".to_string(),
                    )
                })?;
            return self
                .by_token_hash
                .get(&hash_token(token.trim()))
                .cloned()
                .ok_or_else(|| Refusal::Unauthenticated("unknown bearer token".to_string()));
        }
        let certificates = request
            .extensions()
            .get::<crate::connection_info::ConnectionInfo>()
            .and_then(|connection| connection.peer_certificates.clone());
        let Some(certificates) = certificates else {
            return Err(Refusal::Unauthenticated(
                "no credentials: send `authorization: Bearer <token>` or a client certificate"
                    .to_string(),
            ));
        };
        // The first certificate is the client's own; the others are its chain.
        let names = certificates
            .first()
            .map(|certificate| certificate_names(certificate.as_ref()))
            .unwrap_or_default();
        names
            .iter()
            .find_map(|name| self.by_certificate_name.get(name))
            .cloned()
            .ok_or_else(|| {
                Refusal::Unauthenticated(format!(
                    "no principal has the client certificate's names {names:?}"
                ))
            })
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Reader => "reader",
        Role::Writer => "writer",
        Role::Privacy => "privacy",
        Role::Admin => "admin",
    }
}

/// A certificate's subject common names and its DNS and URI subject alternative names.
fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, certificate)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = certificate
        .subject()
        .iter_common_name()
        .filter_map(|name| name.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(alternative)) = certificate.subject_alternative_name() {
        for name in &alternative.value.general_names {
            match name {
                GeneralName::DNSName(name) | GeneralName::URI(name) => {
                    names.push((*name).to_string())
                }
                _ => {}
            }
        }
    }
    names
}

/// Authenticates every call and checks its role before anything else runs (see the
/// module's documentation); the principal goes into the request's extensions.
impl Gate for Arc<Authenticator> {
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), tonic::Status> {
        match self.authorize(request) {
            Ok(principal) => {
                if let Some(principal) = principal {
                    request.extensions_mut().insert(principal);
                }
                Ok(())
            }
            Err(Refusal::Unauthenticated(message)) => {
                tracing::debug!(path = request.uri().path(), %message, "unauthenticated call refused");
                Err(tonic::Status::unauthenticated(message))
            }
            Err(Refusal::PermissionDenied(message)) => {
                tracing::debug!(path = request.uri().path(), %message, "call refused");
                Err(tonic::Status::permission_denied(message))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method of every service the server offers has a rule: a new method is refused
    /// until it is given one, and this test says so.
    #[test]
    fn every_method_the_server_offers_has_a_rule() {
        use prost::Message;
        let mut methods = 0;
        for descriptors in [
            featurestore::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            let set = prost_types::FileDescriptorSet::decode(descriptors)
                .expect("the descriptor set decodes");
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        let path =
                            format!("/{}.{}/{}", file.package(), service.name(), method.name());
                        assert_ne!(needs(&path), Needs::Refused, "{path} has no rule");
                        methods += 1;
                    }
                }
            }
        }
        assert!(methods >= 20, "only {methods} methods found");
        assert_eq!(
            needs("/featurestore.v1.Admin/DropEverything"),
            Needs::Refused
        );
        assert_eq!(needs("garbage"), Needs::Refused);
    }

    #[test]
    fn token_hashes_are_sha256_hex() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let token = new_token().expect("random bytes");
        assert_eq!(token.len(), 4 + 64);
        assert_ne!(token, new_token().expect("random bytes"));
    }

    fn principal(configure: impl FnOnce(&mut PrincipalConfig)) -> PrincipalConfig {
        let mut config = PrincipalConfig {
            token_sha256: vec![hash_token("t")],
            ..PrincipalConfig::named("p")
        };
        configure(&mut config);
        config
    }

    fn refusal(principals: Vec<PrincipalConfig>) -> String {
        let config = AuthConfig {
            mode: AuthMode::Required,
            principals,
        };
        Authenticator::new(&config, &Registry::embedded_default(), false)
            .expect_err("the config is refused")
            .to_string()
    }

    #[test]
    fn mistakes_in_the_config_stop_the_server() {
        assert!(refusal(Vec::new()).contains("no principal is configured"));
        assert!(
            refusal(vec![principal(|p| p.read_surfaces = vec!["tiktok".into()])])
                .contains("unknown surface \"tiktok\"")
        );
        assert!(
            refusal(vec![principal(|p| p.write_sources = vec!["gossip".into()])])
                .contains("unknown source \"gossip\"")
        );
        assert!(refusal(vec![principal(|p| p.token_sha256 = vec!["t".into()])]).contains("64"));
        assert!(refusal(vec![principal(|p| p.token_sha256.clear())]).contains("neither"));
        assert!(refusal(vec![principal(|_| {}), principal(|_| {})]).contains("twice"));
        assert!(
            refusal(vec![principal(|p| p.certificate_names = vec!["c".into()])])
                .contains("client_ca_path")
        );
    }
}
