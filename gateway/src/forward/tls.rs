//! rustls client settings for the upstream leg, one per sslmode, with libpq's meanings:
//! `prefer` and `require` encrypt without checking the certificate (unless a root certificate is
//! configured, which makes `require` behave as `verify-ca`), `verify-ca` checks the chain, and
//! `verify-full` also checks the host name.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore, SignatureScheme,
};

use crate::config::SslMode;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// True when `client_config(mode, rootcert)` checks the server's certificate chain, so that
/// whoever completes the handshake is the server the operator named (or one its CA vouches for).
pub fn verifies_server(mode: SslMode, rootcert: Option<&Path>) -> bool {
    match mode {
        SslMode::Disable => false,
        SslMode::Prefer | SslMode::Require => rootcert.is_some(),
        SslMode::VerifyCa | SslMode::VerifyFull => true,
    }
}

/// The client config for `mode`, or `None` for `disable`. It reads the CA file or the system
/// store: build it when a target is loaded, not per connection.
pub fn client_config(
    mode: SslMode,
    rootcert: Option<&Path>,
) -> anyhow::Result<Option<Arc<ClientConfig>>> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, rootcert) {
        (SslMode::Disable, _) => return Ok(None),
        (SslMode::Prefer | SslMode::Require, None) => Arc::new(EncryptOnly(provider())),
        (SslMode::Prefer | SslMode::Require | SslMode::VerifyCa, root) => Arc::new(ChainOnly(
            WebPkiServerVerifier::builder_with_provider(roots(root)?, provider()).build()?,
        )),
        (SslMode::VerifyFull, root) => {
            WebPkiServerVerifier::builder_with_provider(roots(root)?, provider()).build()?
        }
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

fn roots(file: Option<&Path>) -> anyhow::Result<Arc<RootCertStore>> {
    let mut store = RootCertStore::empty();
    match file {
        Some(path) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading sslrootcert {}", path.display()))?;
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                let cert =
                    cert.with_context(|| format!("parsing sslrootcert {}", path.display()))?;
                store
                    .add(cert)
                    .with_context(|| format!("adding a certificate from {}", path.display()))?;
            }
            if store.is_empty() {
                bail!("sslrootcert {} holds no PEM certificate", path.display());
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = store.add(cert);
            }
            if store.is_empty() {
                bail!(
                    "no system root certificates found; set sslrootcert in the target's upstream URL"
                );
            }
        }
    }
    Ok(Arc::new(store))
}

pub fn server_name(host: &str) -> anyhow::Result<ServerName<'static>> {
    ServerName::try_from(host.to_owned())
        .with_context(|| format!("{host:?} is not a valid TLS server name"))
}

/// `verify-ca`: the chain must lead to a trusted root; the name may differ.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(Error::InvalidCertificate(CertificateError::NotValidForName))
            | Err(Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`/`require` without a root certificate: encrypted, but the certificate is not checked,
/// exactly as libpq does. Signatures are still verified so the handshake itself is sound.
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
