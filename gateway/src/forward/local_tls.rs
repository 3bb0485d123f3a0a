//! TLS on the local leg: the gateway as a TLS server to the agent, per target
//! (`[target.local_tls]`). Certificates come from files the operator configured, or are minted
//! from the local CA in the state dir for the names agents dial. ALPN is `postgresql`, which
//! PostgreSQL 17's direct TLS requires.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use serde::Deserialize;

use crate::idp::local_ca::{LocalCa, SniResolver};

/// The ALPN protocol PostgreSQL registered; PostgreSQL 17 requires it for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// `[target.local_tls]` as written, after defaults.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalTlsConfig {
    /// `off`, `local-ca` (minted from the gateway's CA) or `files` (`cert_file` + `key_file`).
    pub mode: LocalTlsMode,
    /// `local-ca`: the names agents dial for this target; a client's SNI picks among them. A
    /// client without SNI (an IP address in its DSN), or naming something else, gets a
    /// certificate for the address it dialled. Default: `localhost` and the upstream's host name.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// `files`: PEM certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// `files`: PEM private key, mode 0600.
    pub key_file: Option<PathBuf>,
    /// Refuse clients that do not ask for TLS (SQLSTATE 28000). Default false: a plaintext
    /// client on this target keeps working, and its driver's sslmode decides.
    #[serde(default)]
    pub require_tls: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LocalTlsMode {
    Off,
    LocalCa,
    Files,
}

impl LocalTlsConfig {
    /// Checks the combination of keys and fills in the default host names; `None` for `off`.
    pub fn resolve(mut self, upstream_host: &str) -> Result<Option<LocalTlsConfig>, String> {
        let files = self.cert_file.is_some() || self.key_file.is_some();
        match self.mode {
            LocalTlsMode::Off => return Ok(None),
            LocalTlsMode::Files => {
                if self.cert_file.is_none() || self.key_file.is_none() {
                    return Err("mode \"files\" needs both `cert_file` and `key_file`".into());
                }
                if !self.hosts.is_empty() {
                    return Err("`hosts` is for mode \"local-ca\"; with \"files\" the \
                                certificate names its hosts"
                        .into());
                }
            }
            LocalTlsMode::LocalCa => {
                if files {
                    return Err("`cert_file` and `key_file` are for mode \"files\"; \
                                mode \"local-ca\" mints its certificates"
                        .into());
                }
                if self.hosts.is_empty() {
                    self.hosts.push("localhost".into());
                    if upstream_host.parse::<IpAddr>().is_err() && upstream_host != "localhost" {
                        self.hosts.push(upstream_host.to_ascii_lowercase());
                    }
                }
                if let Some(bad) = self.hosts.iter().find(|h| h.parse::<IpAddr>().is_ok()) {
                    return Err(format!(
                        "hosts: {bad:?} is an address; addresses need no entry (a client \
                         dialling one gets a certificate for it)"
                    ));
                }
            }
        }
        Ok(Some(self))
    }
}

/// A target's local TLS, loaded: what `client_startup` hands each handshake.
pub struct LocalTls {
    pub require_tls: bool,
    certs: Certs,
}

enum Certs {
    /// Built once at load: the operator's certificate does not depend on the connection.
    Files(Arc<ServerConfig>),
    /// Built per connection: the fallback name is the address that connection dialled.
    Minted {
        ca: Arc<LocalCa>,
        hosts: Arc<[String]>,
        provider: Arc<CryptoProvider>,
    },
}

impl std::fmt::Debug for LocalTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let certs = match &self.certs {
            Certs::Files(_) => "files",
            Certs::Minted { .. } => "local-ca",
        };
        f.debug_struct("LocalTls")
            .field("certs", &certs)
            .field("require_tls", &self.require_tls)
            .finish()
    }
}

impl LocalTls {
    /// Loads certificate files, or opens the local CA under `state_dir` (once per reload, shared
    /// by every target that mints: `ca` holds it).
    pub fn load(
        cfg: &LocalTlsConfig,
        state_dir: &Path,
        ca: &mut Option<Arc<LocalCa>>,
    ) -> anyhow::Result<LocalTls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = match (&cfg.cert_file, &cfg.key_file) {
            (Some(cert), Some(key)) => Certs::Files(files_config(cert, key, provider)?),
            _ => {
                let ca = match ca {
                    Some(ca) => ca.clone(),
                    None => ca.insert(Arc::new(LocalCa::open(state_dir)?)).clone(),
                };
                Certs::Minted {
                    ca,
                    hosts: Arc::from(cfg.hosts.clone()),
                    provider,
                }
            }
        };
        Ok(LocalTls {
            require_tls: cfg.require_tls,
            certs,
        })
    }

    /// The server config for one connection that dialled `dialled`.
    pub fn server_config(&self, dialled: IpAddr) -> anyhow::Result<Arc<ServerConfig>> {
        match &self.certs {
            Certs::Files(config) => Ok(config.clone()),
            Certs::Minted {
                ca,
                hosts,
                provider,
            } => {
                let resolver = SniResolver::new(
                    ca.clone(),
                    hosts.clone(),
                    &dialled.to_canonical().to_string(),
                );
                let config = ServerConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()?
                    .with_no_client_auth()
                    .with_cert_resolver(Arc::new(resolver));
                Ok(with_alpn(config))
            }
        }
    }
}

/// `portcullis local-ca`: prints where the local CA's certificate is (or, with `pem`, the
/// certificate itself), for the agents' `sslrootcert`. Reads only: the gateway creates the CA,
/// as its own user, when it starts with a `local-ca` target.
pub fn ca_command(args: &crate::config::ServeArgs, pem: bool) -> anyhow::Result<()> {
    let cfg = crate::config::Config::from_args(args)?;
    let path = LocalCa::ca_cert_path_in(&cfg.state_dir);
    if !path.exists() {
        bail!(
            "no local CA at {} yet: the gateway creates it when it starts with a target whose \
             [target.local_tls] mode is \"local-ca\"",
            path.display()
        );
    }
    if pem {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        print!("{text}");
    } else {
        println!("{}", path.display());
    }
    Ok(())
}

fn with_alpn(mut config: ServerConfig) -> Arc<ServerConfig> {
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Arc::new(config)
}

fn files_config(
    cert: &Path,
    key: &Path,
    provider: Arc<CryptoProvider>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let pem =
        std::fs::read(cert).with_context(|| format!("reading cert_file {}", cert.display()))?;
    let chain = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing cert_file {}", cert.display()))?;
    if chain.is_empty() {
        bail!("cert_file {} holds no PEM certificate", cert.display());
    }
    let mode = std::fs::metadata(key)
        .with_context(|| format!("key_file {}", key.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "key_file {} is readable by group or others (mode {:o}); run `chmod 600 {}`",
            key.display(),
            mode & 0o777,
            key.display()
        );
    }
    let key_pem = zeroize::Zeroizing::new(
        std::fs::read(key).with_context(|| format!("reading key_file {}", key.display()))?,
    );
    // The parser's message never quotes the key; keep it that way by not adding the source.
    let key_der = rustls_pemfile::private_key(&mut &key_pem[..])
        .ok()
        .flatten()
        .with_context(|| format!("key_file {} holds no PEM private key", key.display()))?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .with_context(|| {
            format!(
                "cert_file {} and key_file {} do not make a usable pair",
                cert.display(),
                key.display()
            )
        })?;
    Ok(with_alpn(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml_text: &str) -> LocalTlsConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn modes_check_their_keys_and_default_the_host_names() {
        let c = cfg("mode = \"local-ca\"")
            .resolve("db.example.com")
            .unwrap();
        assert_eq!(c.unwrap().hosts, ["localhost", "db.example.com"]);
        let c = cfg("mode = \"local-ca\"").resolve("10.0.0.5").unwrap();
        assert_eq!(c.unwrap().hosts, ["localhost"]);
        assert_eq!(cfg("mode = \"off\"").resolve("h").unwrap(), None);
        assert!(
            cfg("mode = \"files\"\ncert_file = \"/c\"")
                .resolve("h")
                .is_err()
        );
        assert!(
            cfg("mode = \"local-ca\"\nkey_file = \"/k\"")
                .resolve("h")
                .is_err()
        );
        assert!(
            cfg("mode = \"local-ca\"\nhosts = [\"127.0.0.1\"]")
                .resolve("h")
                .is_err()
        );
        assert!(toml::from_str::<LocalTlsConfig>("mode = \"sometimes\"").is_err());
        assert!(toml::from_str::<LocalTlsConfig>("mode = \"off\"\nrequire = true").is_err());
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.internal".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let config = LocalTlsConfig {
            mode: LocalTlsMode::Files,
            hosts: vec![],
            cert_file: Some(cert_path),
            key_file: Some(key_path.clone()),
            require_tls: false,
        };
        let e = LocalTls::load(&config, dir.path(), &mut None).unwrap_err();
        assert!(format!("{e:#}").contains("chmod 600"), "{e:#}");
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let tls = LocalTls::load(&config, dir.path(), &mut None).unwrap();
        let sc = tls.server_config("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(sc.alpn_protocols, [ALPN_POSTGRESQL.to_vec()]);
    }
}
