//! Test certificates: a certificate authority, the server's certificate, and client
//! certificates for mutual TLS, written as PEM files into a directory.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, date_time_ymd,
};

/// A certificate authority that signs the certificates of one test.
#[derive(Debug)]
pub struct TestAuthority {
    issuer: CertifiedIssuer<'static, KeyPair>,
    directory: PathBuf,
    /// Starts the names of its files.
    stem: String,
}

/// A certificate and its private key, as PEM files.
#[derive(Clone, Debug)]
pub struct CertificateFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

impl TestAuthority {
    /// A new authority named `name` writing its files into `directory`.
    pub fn new(directory: &Path, name: &str) -> TestAuthority {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("generate the CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-sign the CA");
        let authority = TestAuthority {
            issuer,
            directory: directory.to_path_buf(),
            stem: name.replace(|c: char| !c.is_ascii_alphanumeric(), "-"),
        };
        std::fs::write(authority.certificate_path(), authority.issuer.pem())
            .expect("write the CA certificate");
        authority
    }

    /// The authority's own certificate (PEM file): what clients and servers trust.
    pub fn certificate_path(&self) -> PathBuf {
        self.directory.join(format!("{}-ca.pem", self.stem))
    }

    /// The server's certificate, for `localhost` and 127.0.0.1.
    pub fn server(&self) -> CertificateFiles {
        self.issue(
            "server",
            vec!["localhost".to_string(), "127.0.0.1".to_string()],
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
            false,
        )
    }

    /// A client certificate whose subject's common name is `name`.
    pub fn client(&self, name: &str) -> CertificateFiles {
        self.issue(
            name,
            Vec::new(),
            name,
            ExtendedKeyUsagePurpose::ClientAuth,
            false,
        )
    }

    /// A client certificate named `name` that expired in 2021.
    pub fn expired_client(&self, name: &str) -> CertificateFiles {
        self.issue(
            &format!("{name}-expired"),
            Vec::new(),
            name,
            ExtendedKeyUsagePurpose::ClientAuth,
            true,
        )
    }

    fn issue(
        &self,
        file: &str,
        alternative_names: Vec<String>,
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
        expired: bool,
    ) -> CertificateFiles {
        let mut params = CertificateParams::new(alternative_names).expect("parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("generate a key");
        let certificate = params
            .signed_by(&key, &self.issuer)
            .expect("sign the certificate");
        let stem = format!("{}-{file}", self.stem);
        let files = CertificateFiles {
            certificate: self.directory.join(format!("{stem}.pem")),
            key: self.directory.join(format!("{stem}.key")),
        };
        std::fs::write(&files.certificate, certificate.pem()).expect("write the certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write the key");
        files
    }
}
