//! The gateway's calls to the IdP: OIDC discovery, the JWKS, and the RFC 8693 token exchange.
//!
//! Blocking (ureq): this module runs only on the identity service's own threads, never on an
//! io_uring worker. Request bodies carry tokens and client credentials; nothing here puts a
//! request body, a token or the secret into an error.

use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::jwk::Jwk;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::config::{ClientAuthMethod, TargetIdentity};
use super::token::Token;
use super::{IdentityError, TOKEN_TYPE_ACCESS_TOKEN};

/// Largest IdP response read (discovery, JWKS, token response).
const MAX_RESPONSE_BYTES: u64 = 1 << 20;
const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ASSERTION_TYPE_JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Endpoints found by discovery.
#[derive(Clone, Debug, Deserialize)]
pub struct Endpoints {
    pub issuer: String,
    pub token_endpoint: Option<String>,
    pub jwks_uri: String,
}

/// How the gateway proves itself to the token endpoint. Debug never shows the secret.
pub enum ClientCredentials {
    None,
    Basic {
        client_id: String,
        secret: Zeroizing<String>,
    },
    PrivateKeyJwt {
        client_id: String,
        pem: Zeroizing<Vec<u8>>,
        alg: jsonwebtoken::Algorithm,
        kid: Option<String>,
    },
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientCredentials::None => f.write_str("None"),
            ClientCredentials::Basic { client_id, .. } => {
                write!(f, "Basic {{ client_id: {client_id:?}, secret: *** }}")
            }
            ClientCredentials::PrivateKeyJwt { client_id, alg, .. } => {
                write!(
                    f,
                    "PrivateKeyJwt {{ client_id: {client_id:?}, alg: {alg:?} }}"
                )
            }
        }
    }
}

impl ClientCredentials {
    /// Loads the secret or key the settings name. Errors name the file, never its content.
    pub fn load(cfg: &TargetIdentity) -> Result<ClientCredentials, IdentityError> {
        let Some(client_id) = cfg.client_id.clone() else {
            return Ok(ClientCredentials::None);
        };
        let read = |path: &Path| -> Result<Zeroizing<Vec<u8>>, IdentityError> {
            std::fs::read(path)
                .map(Zeroizing::new)
                .map_err(|e| IdentityError::Config(format!("reading {}: {e}", path.display())))
        };
        match cfg.client_auth {
            ClientAuthMethod::ClientSecretBasic => {
                let Some(path) = &cfg.client_secret_file else {
                    return Err(IdentityError::Config(
                        "client_secret_file is not set".into(),
                    ));
                };
                let bytes = read(path)?;
                let text = std::str::from_utf8(&bytes).map_err(|_| {
                    IdentityError::Config(format!("{} is not UTF-8", path.display()))
                })?;
                let secret = Zeroizing::new(text.trim().to_owned());
                if secret.is_empty() {
                    return Err(IdentityError::Config(format!(
                        "{} is empty",
                        path.display()
                    )));
                }
                Ok(ClientCredentials::Basic { client_id, secret })
            }
            ClientAuthMethod::PrivateKeyJwt => {
                let Some(path) = &cfg.private_key_file else {
                    return Err(IdentityError::Config("private_key_file is not set".into()));
                };
                let pem = read(path)?;
                let alg = if jsonwebtoken::EncodingKey::from_ec_pem(&pem).is_ok() {
                    jsonwebtoken::Algorithm::ES256
                } else if jsonwebtoken::EncodingKey::from_rsa_pem(&pem).is_ok() {
                    jsonwebtoken::Algorithm::RS256
                } else {
                    return Err(IdentityError::Config(format!(
                        "{} is not a PKCS#8 EC P-256 or RSA private key in PEM",
                        path.display()
                    )));
                };
                Ok(ClientCredentials::PrivateKeyJwt {
                    client_id,
                    pem,
                    alg,
                    kid: cfg.private_key_kid.clone(),
                })
            }
        }
    }
}

/// A blocking HTTP client for one IdP.
pub struct IdpHttp {
    agent: ureq::Agent,
}

impl IdpHttp {
    pub fn new(cfg: &TargetIdentity) -> Result<IdpHttp, IdentityError> {
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(cfg.timeout)
            .timeout(cfg.timeout)
            .redirects(0)
            .user_agent(concat!("portcullis/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &cfg.ca_file {
            builder = builder.tls_config(tls_with_ca(path)?);
        }
        Ok(IdpHttp {
            agent: builder.build(),
        })
    }

    /// OIDC discovery. The document's `issuer` must equal the configured one exactly.
    pub fn discover(&self, issuer: &str) -> Result<Endpoints, IdentityError> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let body = self.get(&url, "discovery")?;
        let doc: Endpoints =
            serde_json::from_slice(&body).map_err(|e| IdentityError::IdpProtocol {
                what: "discovery",
                reason: format!("not a discovery document: {e}"),
            })?;
        if doc.issuer != issuer {
            return Err(IdentityError::IdpProtocol {
                what: "discovery",
                reason: format!("the document names issuer {:?}, not {issuer:?}", doc.issuer),
            });
        }
        Ok(doc)
    }

    pub fn jwks(&self, jwks_uri: &str) -> Result<Vec<Jwk>, IdentityError> {
        let body = self.get(jwks_uri, "JWKS")?;
        super::validate::parse_jwks(&body).map_err(|reason| IdentityError::IdpProtocol {
            what: "JWKS",
            reason,
        })
    }

    /// The RFC 8693 exchange: returns the issued access token and its `expires_in`.
    pub fn exchange(
        &self,
        cfg: &TargetIdentity,
        endpoints: &Endpoints,
        creds: &ClientCredentials,
        subject: &Token,
        actor: Option<&Token>,
    ) -> Result<Token, IdentityError> {
        let Some(url) = &endpoints.token_endpoint else {
            return Err(IdentityError::IdpProtocol {
                what: "discovery",
                reason: "no token_endpoint".into(),
            });
        };
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token", subject.expose()),
            ("subject_token_type", cfg.subject_token_type.as_str()),
            ("audience", cfg.audience.as_str()),
            ("requested_token_type", TOKEN_TYPE_ACCESS_TOKEN),
        ];
        if let Some(actor) = actor {
            form.push(("actor_token", actor.expose()));
            form.push(("actor_token_type", cfg.subject_token_type.as_str()));
        }
        if let Some(r) = &cfg.resource {
            form.push(("resource", r.as_str()));
        }
        if let Some(s) = &cfg.scope {
            form.push(("scope", s.as_str()));
        }
        let mut request = self.agent.post(url);
        let assertion;
        match creds {
            ClientCredentials::None => {}
            ClientCredentials::Basic { client_id, secret } => {
                // RFC 6749 §2.3.1: both parts form-urlencoded before Basic encoding.
                let pair = Zeroizing::new(format!(
                    "{}:{}",
                    form_encode(client_id),
                    form_encode(secret)
                ));
                let header = Zeroizing::new(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
                ));
                request = request.set("Authorization", &header);
            }
            ClientCredentials::PrivateKeyJwt {
                client_id,
                pem,
                alg,
                kid,
            } => {
                assertion = Zeroizing::new(client_assertion(
                    client_id,
                    &endpoints.issuer,
                    pem,
                    *alg,
                    kid.clone(),
                )?);
                form.push(("client_id", client_id.as_str()));
                form.push(("client_assertion_type", ASSERTION_TYPE_JWT_BEARER));
                form.push(("client_assertion", assertion.as_str()));
            }
        }
        let response = request.send_form(&form);
        let scrub = |text: &str| scrub(text, &[subject, actor.unwrap_or(subject)]);
        let body = match response {
            Ok(r) => Zeroizing::new(read_body(r, "token endpoint")?),
            Err(ureq::Error::Status(code, r)) => {
                let body = read_body(r, "token endpoint").unwrap_or_default();
                let (error, description) = match serde_json::from_slice::<OAuthError>(&body) {
                    Ok(e) => (e.error, e.error_description.unwrap_or_default()),
                    Err(_) => (format!("HTTP {code}"), String::new()),
                };
                return Err(IdentityError::ExchangeRefused {
                    error: scrub(&error),
                    description: scrub(&description),
                });
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(IdentityError::IdpUnreachable {
                    what: "token endpoint",
                    reason: t.to_string(),
                });
            }
        };
        let answer: ExchangeResponse =
            serde_json::from_slice(&body).map_err(|e| IdentityError::IdpProtocol {
                what: "token endpoint",
                reason: format!("not a token response: {e}"),
            })?;
        if let Some(t) = &answer.issued_token_type
            && t != TOKEN_TYPE_ACCESS_TOKEN
            && t != "urn:ietf:params:oauth:token-type:jwt"
        {
            return Err(IdentityError::IdpProtocol {
                what: "token endpoint",
                reason: format!("issued_token_type {t:?} is not an access token"),
            });
        }
        Ok(Token::new(answer.access_token))
    }

    fn get(&self, url: &str, what: &'static str) -> Result<Vec<u8>, IdentityError> {
        match self.agent.get(url).call() {
            Ok(r) => read_body(r, what),
            Err(ureq::Error::Status(code, _)) => Err(IdentityError::IdpProtocol {
                what,
                reason: format!("HTTP {code} from {url}"),
            }),
            Err(ureq::Error::Transport(t)) => Err(IdentityError::IdpUnreachable {
                what,
                reason: t.to_string(),
            }),
        }
    }
}

#[derive(Deserialize)]
struct OAuthError {
    error: String,
    error_description: Option<String>,
}

#[derive(Deserialize)]
struct ExchangeResponse {
    access_token: String,
    issued_token_type: Option<String>,
}

fn read_body(r: ureq::Response, what: &'static str) -> Result<Vec<u8>, IdentityError> {
    let mut body = Vec::new();
    r.into_reader()
        .take(MAX_RESPONSE_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|e| IdentityError::IdpUnreachable {
            what,
            reason: e.to_string(),
        })?;
    if body.len() as u64 > MAX_RESPONSE_BYTES {
        return Err(IdentityError::IdpProtocol {
            what,
            reason: format!("response larger than {MAX_RESPONSE_BYTES} bytes"),
        });
    }
    Ok(body)
}

/// An IdP's error text for our messages: printable, short, and without the tokens we sent.
fn scrub(text: &str, tokens: &[&Token]) -> String {
    let mut out = text.to_owned();
    for t in tokens {
        if !t.expose().is_empty() {
            out = out.replace(t.expose(), "[token]");
        }
    }
    out.chars().filter(|c| !c.is_control()).take(200).collect()
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// RFC 7523 client assertion: `iss` = `sub` = client id, `aud` = the issuer identifier.
fn client_assertion(
    client_id: &str,
    issuer: &str,
    pem: &[u8],
    alg: jsonwebtoken::Algorithm,
    kid: Option<String>,
) -> Result<String, IdentityError> {
    let key = match alg {
        jsonwebtoken::Algorithm::ES256 => jsonwebtoken::EncodingKey::from_ec_pem(pem),
        _ => jsonwebtoken::EncodingKey::from_rsa_pem(pem),
    }
    .map_err(|e| IdentityError::Config(format!("client key: {e}")))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let jti: String = rand::random::<[u8; 16]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let claims = serde_json::json!({
        "iss": client_id, "sub": client_id, "aud": issuer,
        "jti": jti, "iat": now, "exp": now + 60,
    });
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = kid;
    jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| IdentityError::Config(format!("signing the client assertion: {e}")))
}

fn tls_with_ca(path: &Path) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
    let pem = std::fs::read(path)
        .map_err(|e| IdentityError::Config(format!("reading {}: {e}", path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| IdentityError::Config(format!("{}: {e}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| IdentityError::Config(format!("{}: {e}", path.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| IdentityError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_and_scrubbing() {
        assert_eq!(form_encode("a b:c/é"), "a+b%3Ac%2F%C3%A9");
        let t = Token::new("aaa.bbb.ccc".into());
        assert_eq!(
            scrub("invalid_grant: token aaa.bbb.ccc\nexpired", &[&t]),
            "invalid_grant: token [token]expired"
        );
    }

    #[test]
    fn credentials_debug_hides_the_secret() {
        let c = ClientCredentials::Basic {
            client_id: "gw".into(),
            secret: Zeroizing::new("canary-secret".into()),
        };
        assert!(!format!("{c:?}").contains("canary"));
    }
}
