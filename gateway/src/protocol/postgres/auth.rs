//! TEMPORARY shim until the auth branch lands.
use super::messages::{self, AuthRequest};
use postgres_protocol::authentication::sasl;

pub enum ChannelBinding {
    None,
    TlsServerEndPoint(Vec<u8>),
}
pub enum AuthStep {
    Continue,
    Authenticated,
    Negotiated { minor: u16 },
}
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{message}")]
    Server { code: String, message: String },
    #[error("{0}")]
    Other(String),
}
pub struct UpstreamAuth {
    user: String,
    password: Option<Vec<u8>>,
    scram: Option<sasl::ScramSha256>,
}
pub fn tls_server_end_point(der: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(der).to_vec()
}
impl UpstreamAuth {
    pub fn new(user: &str, password: Option<&[u8]>, _cb: ChannelBinding) -> Self {
        Self {
            user: user.into(),
            password: password.map(|p| p.to_vec()),
            scram: None,
        }
    }
    pub fn on_message(
        &mut self,
        tag: u8,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<AuthStep, AuthError> {
        let pw = || {
            self.password
                .clone()
                .ok_or_else(|| AuthError::Other("no password".into()))
        };
        match tag {
            b'E' => {
                let e = messages::parse_error_fields(body)
                    .map_err(|e| AuthError::Other(e.to_string()))?;
                Err(AuthError::Server {
                    code: e.code.into(),
                    message: e.message.into(),
                })
            }
            b'v' => Ok(AuthStep::Negotiated { minor: 0 }),
            b'R' => match messages::parse_auth_request(body)
                .map_err(|e| AuthError::Other(e.to_string()))?
            {
                AuthRequest::Ok => Ok(AuthStep::Authenticated),
                AuthRequest::CleartextPassword => {
                    messages::encode_password(&pw()?, out);
                    Ok(AuthStep::Continue)
                }
                AuthRequest::Md5Password { salt } => {
                    let h = postgres_protocol::authentication::md5_hash(
                        self.user.as_bytes(),
                        &pw()?,
                        salt,
                    );
                    messages::encode_password(h.as_bytes(), out);
                    Ok(AuthStep::Continue)
                }
                AuthRequest::Sasl(_) => {
                    let s = sasl::ScramSha256::new(&pw()?, sasl::ChannelBinding::unsupported());
                    messages::encode_sasl_initial_response("SCRAM-SHA-256", s.message(), out);
                    self.scram = Some(s);
                    Ok(AuthStep::Continue)
                }
                AuthRequest::SaslContinue(d) => {
                    let s = self.scram.as_mut().unwrap();
                    s.update(d).map_err(|e| AuthError::Other(e.to_string()))?;
                    messages::encode_sasl_response(s.message(), out);
                    Ok(AuthStep::Continue)
                }
                AuthRequest::SaslFinal(d) => {
                    self.scram
                        .as_mut()
                        .unwrap()
                        .finish(d)
                        .map_err(|e| AuthError::Other(e.to_string()))?;
                    Ok(AuthStep::Continue)
                }
                _ => Err(AuthError::Other("unsupported".into())),
            },
            _ => Err(AuthError::Other("unexpected".into())),
        }
    }
}
