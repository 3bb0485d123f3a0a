//! Tokens as the gateway holds them, and where they come from.
//!
//! A [`Token`] zeroizes its bytes on drop and shows only a hash prefix in Debug, so an identity
//! error, a log line or a panic message never carries the token itself.

use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::IdentityError;
use super::config::AgentConfig;

/// Largest token accepted from a file or a password message; real JWTs are a few KiB.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;

/// A bearer token (JWT). Debug shows `Token(sha256:…)`, never the token.
#[derive(Clone)]
pub struct Token(Zeroizing<String>);

impl Token {
    /// Wraps a token, trimming surrounding whitespace (token files usually end in a newline).
    pub fn new(text: String) -> Token {
        let text = Zeroizing::new(text);
        Token(Zeroizing::new(text.trim().to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the token: the cache key and what logs may show.
    pub fn sha256(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }

    /// The first 8 bytes of the SHA-256 in hex, for logs.
    pub fn short_hash(&self) -> String {
        hex8(&self.sha256())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(sha256:{})", self.short_hash())
    }
}

pub(crate) fn hex8(digest: &[u8]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a connection's token comes from.
#[derive(Clone, Debug)]
pub enum TokenSource {
    /// The agent's token file (`[[agent]] token_file`), read afresh on every use.
    File(PathBuf),
    /// A token the client presented (as its password).
    Presented(Token),
}

impl TokenSource {
    /// The token now. Reads the file on every call: a workload-identity helper may have rotated
    /// it. This blocks on the file system: call it off the io_uring threads (the identity
    /// service does).
    pub fn load(&self) -> Result<Token, IdentityError> {
        match self {
            TokenSource::Presented(t) if t.expose().is_empty() => Err(IdentityError::TokenMissing(
                "the presented token is empty".into(),
            )),
            TokenSource::Presented(t) => Ok(t.clone()),
            TokenSource::File(path) => read_token_file(path),
        }
    }
}

/// The tokens of one connection: whose session it is, and who acts for them.
#[derive(Clone, Debug)]
pub struct ConnectTokens {
    pub subject: TokenSource,
    pub actor: Option<TokenSource>,
}

/// Where a new connection's identity comes from, per the three sources:
/// - the client presented a token as its password and the agent has a token file: delegation,
///   the presented token is the subject (the person) and the agent's token the actor;
/// - only a presented token: it is the subject;
/// - only the agent's `[[agent]] token_file`: the agent is the subject.
///
/// `Ok(None)`: no token at all and the target does not require identity.
pub fn connect_tokens(
    agents: &[AgentConfig],
    agent: Option<&str>,
    presented: Option<Token>,
    require_identity: bool,
) -> Result<Option<ConnectTokens>, IdentityError> {
    let file = agent
        .and_then(|name| agents.iter().find(|a| a.name == name))
        .map(|a| TokenSource::File(a.token_file.clone()));
    Ok(match (presented, file) {
        (Some(p), Some(f)) => Some(ConnectTokens {
            subject: TokenSource::Presented(p),
            actor: Some(f),
        }),
        (Some(p), None) => Some(ConnectTokens {
            subject: TokenSource::Presented(p),
            actor: None,
        }),
        (None, Some(f)) => Some(ConnectTokens {
            subject: f,
            actor: None,
        }),
        (None, None) if require_identity => {
            return Err(IdentityError::TokenMissing(match agent {
                Some(name) => format!(
                    "agent {name:?} has no [[agent]] token_file and the client sent no token"
                ),
                None => "the connection is not attributed to an agent and sent no token".into(),
            }));
        }
        (None, None) => None,
    })
}

/// Reads an agent's token file: at most [`MAX_TOKEN_BYTES`], surrounding whitespace trimmed.
/// Errors name the file, never its content.
pub fn read_token_file(path: &Path) -> Result<Token, IdentityError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            IdentityError::TokenMissing(format!("token file {shown} does not exist"))
        }
        _ => IdentityError::TokenUnreadable {
            path: shown.clone(),
            reason: e.to_string(),
        },
    })?;
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(MAX_TOKEN_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| IdentityError::TokenUnreadable {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
    if bytes.len() > MAX_TOKEN_BYTES {
        return Err(IdentityError::TokenUnreadable {
            path: shown,
            reason: format!("larger than {MAX_TOKEN_BYTES} bytes"),
        });
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| IdentityError::TokenUnreadable {
        path: shown.clone(),
        reason: "not UTF-8".into(),
    })?;
    let token = Token::new(text.to_owned());
    if token.expose().is_empty() {
        return Err(IdentityError::TokenMissing(format!(
            "token file {shown} is empty"
        )));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_a_hash_not_the_token() {
        let t = Token::new("eyJhbGciOi.canary-secret.sig\n".into());
        let shown = format!("{t:?}");
        assert!(!shown.contains("canary"), "{shown}");
        assert!(shown.starts_with("Token(sha256:"), "{shown}");
        assert_eq!(t.expose(), "eyJhbGciOi.canary-secret.sig");
    }

    #[test]
    fn connect_tokens_pick_presented_file_or_both() {
        let agents = vec![AgentConfig {
            name: "claude".into(),
            token_file: "/run/claude.jwt".into(),
        }];
        let p = || Some(Token::new("person.token.x".into()));
        let t = connect_tokens(&agents, Some("claude"), p(), true)
            .unwrap()
            .unwrap();
        assert!(matches!(t.subject, TokenSource::Presented(_)));
        assert!(matches!(t.actor, Some(TokenSource::File(f)) if f.ends_with("claude.jwt")));
        let t = connect_tokens(&agents, Some("other"), p(), true)
            .unwrap()
            .unwrap();
        assert!(t.actor.is_none());
        let t = connect_tokens(&agents, Some("claude"), None, true)
            .unwrap()
            .unwrap();
        assert!(matches!(t.subject, TokenSource::File(_)));
        let e = connect_tokens(&agents, Some("other"), None, true).unwrap_err();
        assert_eq!(e.sqlstate(), "28000");
        assert!(e.to_string().contains("\"other\""), "{e}");
        assert!(
            connect_tokens(&agents, None, None, false)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn token_file_errors_name_the_file_not_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.jwt");
        let e = read_token_file(&path).unwrap_err();
        assert_eq!(e.check(), "token_missing");
        assert!(e.to_string().contains("agent.jwt"), "{e}");

        std::fs::write(&path, "  \n").unwrap();
        assert_eq!(read_token_file(&path).unwrap_err().check(), "token_missing");

        std::fs::write(&path, vec![b'a'; MAX_TOKEN_BYTES + 1]).unwrap();
        let e = read_token_file(&path).unwrap_err();
        assert_eq!(e.check(), "token_unreadable");

        std::fs::write(&path, "first.token.value\n").unwrap();
        assert_eq!(
            read_token_file(&path).unwrap().expose(),
            "first.token.value"
        );
        std::fs::write(&path, "second.token.value").unwrap();
        let source = TokenSource::File(path);
        assert_eq!(source.load().unwrap().expose(), "second.token.value");
    }
}
