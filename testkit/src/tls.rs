//! Certificates made at test time: a CA and server certificates it signs, for PostgreSQL's TLS.

use anyhow::Result;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

use crate::ServerTls;

/// A throwaway certificate authority.
pub struct TestCa {
    cert: Certificate,
    key: KeyPair,
}

impl TestCa {
    pub fn new(name: &str) -> Result<TestCa> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(TestCa { cert, key })
    }

    /// The CA certificate, for `sslrootcert`.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for these names (IP addresses become IP SANs).
    pub fn server_cert(&self, names: &[&str]) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// PostgreSQL TLS settings with a certificate for 127.0.0.1 and localhost.
    pub fn server_tls(&self, require: bool) -> Result<ServerTls> {
        self.server_tls_for(&["localhost", "127.0.0.1"], require)
    }

    pub fn server_tls_for(&self, names: &[&str], require: bool) -> Result<ServerTls> {
        let (cert_pem, key_pem) = self.server_cert(names)?;
        Ok(ServerTls {
            cert_pem,
            key_pem,
            require,
        })
    }
}
