//! A local CA for the agent-facing TLS leg: created once in the state dir, it mints a
//! certificate per host name the agent dials (by SNI, among the target's names), so
//! `sslmode=verify-full` works when the operator adds `local-ca/ca.pem` to the agent's trust
//! (`sslrootcert`).
//!
//! Files: `<state_dir>/local-ca/ca.pem` (the certificate to distribute) and `ca.key` (mode 0600,
//! never readable by group or others). Minted leaf certificates live in memory only.

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration as StdDuration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::{Duration, OffsetDateTime};

const CA_NAME: &str = "Portcullis local CA";
/// Host names kept minted; SNI comes from the agent, so the map is capped.
const MAX_MINTED: usize = 1024;
/// Minted certificates are valid 30 days and re-minted after 7.
const LEAF_LIFETIME_DAYS: i64 = 30;
const REMINT_AFTER: StdDuration = StdDuration::from_secs(7 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("local CA {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("local CA: {0}")]
    Mint(String),
}

/// The CA: its key, the certificate agents trust, and the certificates minted so far.
pub struct LocalCa {
    dir: PathBuf,
    key: KeyPair,
    /// Re-created from the stored key on load: signing needs only its name and key.
    issuer: rcgen::Certificate,
    ca_der: CertificateDer<'static>,
    minted: Mutex<HashMap<String, (Instant, Arc<CertifiedKey>)>>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").field("dir", &self.dir).finish()
    }
}

impl LocalCa {
    /// Opens the CA under `state_dir/local-ca`, creating it on first use.
    pub fn open(state_dir: &Path) -> Result<LocalCa, CaError> {
        let dir = state_dir.join("local-ca");
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        let file_err = |path: &Path, reason: String| CaError::File {
            path: path.to_owned(),
            reason,
        };
        if !key_path.exists() {
            create(&dir, &cert_path, &key_path)?;
        }
        let mode = fs::metadata(&key_path)
            .map_err(|e| file_err(&key_path, e.to_string()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(file_err(
                &key_path,
                format!(
                    "readable by group or others (mode {:o}); run `chmod 600 {}`",
                    mode & 0o777,
                    key_path.display()
                ),
            ));
        }
        let key_pem = zeroize::Zeroizing::new(
            fs::read_to_string(&key_path).map_err(|e| file_err(&key_path, e.to_string()))?,
        );
        let key = KeyPair::from_pem(&key_pem).map_err(|e| file_err(&key_path, e.to_string()))?;
        let cert_pem = fs::read(&cert_path).map_err(|e| file_err(&cert_path, e.to_string()))?;
        let ca_der = rustls_pemfile::certs(&mut &cert_pem[..])
            .next()
            .ok_or_else(|| file_err(&cert_path, "no certificate".into()))?
            .map_err(|e| file_err(&cert_path, e.to_string()))?;
        let issuer = ca_params()
            .self_signed(&key)
            .map_err(|e| CaError::Mint(e.to_string()))?;
        Ok(LocalCa {
            dir,
            key,
            issuer,
            ca_der,
            minted: Mutex::new(HashMap::new()),
        })
    }

    /// The file operators add to the agent's trust.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Where `open(state_dir)` keeps the CA certificate, without opening (or creating) it.
    pub fn ca_cert_path_in(state_dir: &Path) -> PathBuf {
        state_dir.join("local-ca").join("ca.pem")
    }

    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// The certificate for `host` (a DNS name or an IP address), minted on first request.
    pub fn certified_key(&self, host: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if !plausible_host(&host) {
            return Err(CaError::Mint(format!("{host:?} is not a host name")));
        }
        let mut minted = self.minted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, ck)) = minted.get(&host)
            && at.elapsed() < REMINT_AFTER
        {
            return Ok(ck.clone());
        }
        let ck = Arc::new(self.mint(&host)?);
        if minted.len() >= MAX_MINTED {
            minted.clear();
        }
        minted.insert(host, (Instant::now(), ck.clone()));
        Ok(ck)
    }

    fn mint(&self, host: &str) -> Result<CertifiedKey, CaError> {
        let err = |e: rcgen::Error| CaError::Mint(format!("{host}: {e}"));
        let mut params = CertificateParams::new(vec![host.to_owned()]).map_err(err)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(LEAF_LIFETIME_DAYS);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate().map_err(err)?;
        let leaf = params
            .signed_by(&leaf_key, &self.issuer, &self.key)
            .map_err(err)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let signer = rustls::crypto::ring::sign::any_supported_type(&key_der)
            .map_err(|e| CaError::Mint(e.to_string()))?;
        Ok(CertifiedKey::new(
            vec![leaf.der().clone(), self.ca_der.clone()],
            signer,
        ))
    }
}

/// Picks the minted certificate for the SNI name when it is one of `hosts` (the names agents dial
/// for this target), else for `fallback_host`: the address the agent dialled. A DSN with an IP
/// address sends no SNI, and a name the target does not answer to gets the address's certificate,
/// which `verify-full` then refuses, as it should: the CA never vouches for arbitrary names.
#[derive(Debug)]
pub struct SniResolver {
    ca: Arc<LocalCa>,
    hosts: Arc<[String]>,
    fallback_host: String,
}

impl SniResolver {
    /// `hosts` are matched case-insensitively, without a trailing dot.
    pub fn new(ca: Arc<LocalCa>, hosts: Arc<[String]>, fallback_host: &str) -> SniResolver {
        SniResolver {
            ca,
            hosts,
            fallback_host: fallback_host.to_owned(),
        }
    }

    fn pick<'a>(&'a self, sni: Option<&'a str>) -> &'a str {
        sni.filter(|name| {
            let name = name.trim_end_matches('.');
            self.hosts.iter().any(|h| h.eq_ignore_ascii_case(name))
        })
        .unwrap_or(&self.fallback_host)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let host = self.pick(hello.server_name());
        match self.ca.certified_key(host) {
            Ok(ck) => Some(ck),
            Err(e) => {
                tracing::warn!(error = %e, "no certificate for the local TLS leg");
                None
            }
        }
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(3650);
    params
}

fn create(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<(), CaError> {
    let err = |path: &Path, e: std::io::Error| CaError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| err(dir, e))?;
    let key = KeyPair::generate().map_err(|e| CaError::Mint(e.to_string()))?;
    let cert = ca_params()
        .self_signed(&key)
        .map_err(|e| CaError::Mint(e.to_string()))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key_path)
        .map_err(|e| err(key_path, e))?;
    f.write_all(zeroize::Zeroizing::new(key.serialize_pem()).as_bytes())
        .map_err(|e| err(key_path, e))?;
    fs::write(cert_path, cert.pem()).map_err(|e| err(cert_path, e))?;
    fs::set_permissions(cert_path, fs::Permissions::from_mode(0o644))
        .map_err(|e| err(cert_path, e))?;
    Ok(())
}

/// DNS labels or an IP address; anything else in SNI is not worth a certificate.
fn plausible_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::ServerName;

    /// A full in-memory handshake: client verifying against the CA, server resolving by SNI.
    fn handshake(
        ca: Arc<LocalCa>,
        trust: &CertificateDer<'static>,
        name: &str,
    ) -> Result<(), String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let hosts: Arc<[String]> = Arc::from(vec![name.to_owned()]);
        let server_cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SniResolver::new(ca, hosts, name)));
        let server_cfg = Arc::new(server_cfg);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trust.clone()).unwrap();
        let client_cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = ServerName::try_from(name.to_owned()).unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(client_cfg), server_name).unwrap();
        let mut server = rustls::ServerConnection::new(server_cfg).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut &buf[..]).unwrap();
            server
                .process_new_packets()
                .map_err(|e| format!("server: {e}"))?;
            let mut buf = Vec::new();
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut &buf[..]).unwrap();
            client
                .process_new_packets()
                .map_err(|e| format!("client: {e}"))?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        Err("handshake did not finish".into())
    }

    #[test]
    fn a_client_trusting_the_ca_verifies_minted_certificates_by_host_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::open(dir.path()).unwrap());
        let mode = fs::metadata(dir.path().join("local-ca/ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let trust = ca.ca_der().clone();
        handshake(ca.clone(), &trust, "db.internal").unwrap();
        handshake(ca.clone(), &trust, "orders.db.example.com").unwrap();
        handshake(ca.clone(), &trust, "10.1.2.3").unwrap();

        // Reopened from disk, the same CA still signs certificates the old trust accepts.
        let reopened = Arc::new(LocalCa::open(dir.path()).unwrap());
        assert_eq!(reopened.ca_der(), &trust);
        handshake(reopened, &trust, "db.internal").unwrap();

        // A client trusting another CA refuses.
        let other_dir = tempfile::tempdir().unwrap();
        let other = LocalCa::open(other_dir.path()).unwrap();
        let e = handshake(ca, other.ca_der(), "db.internal").unwrap_err();
        assert!(e.contains("client"), "{e}");
    }

    #[test]
    fn a_certificate_for_one_host_does_not_verify_for_another() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::open(dir.path()).unwrap();
        let ck = ca.certified_key("db.internal").unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.ca_der().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        let verify = |name: &str| {
            verifier.verify_server_cert(
                &ck.cert[0],
                &ck.cert[1..],
                &ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                now,
            )
        };
        assert!(verify("db.internal").is_ok());
        assert!(verify("evil.internal").is_err());
        assert!(ca.certified_key("bad host!").is_err());
    }

    #[test]
    fn sni_picks_only_the_targets_names_and_falls_back_to_the_dialled_address() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::open(dir.path()).unwrap());
        let hosts: Arc<[String]> = Arc::from(vec!["db.internal".to_owned()]);
        let r = SniResolver::new(ca, hosts, "10.0.0.7");
        assert_eq!(r.pick(Some("db.internal")), "db.internal");
        assert_eq!(r.pick(Some("DB.Internal.")), "DB.Internal.");
        assert_eq!(r.pick(Some("evil.example")), "10.0.0.7");
        assert_eq!(r.pick(None), "10.0.0.7");
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        LocalCa::open(dir.path()).unwrap();
        let key = dir.path().join("local-ca/ca.key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let e = LocalCa::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }
}
