//! Who is on the other end of an accepted connection: its addresses, the destination it dialled,
//! and, where the kernel told us, its agent, process and cgroup. For a target with
//! `[target.identity]`, also who the IdP says it is: the agent's token file or the token it sent
//! as its password, exchanged or validated by the target's [`IdentityService`] (never on the I/O
//! thread), and the upstream role that identity maps to.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use crate::idp::config::AgentConfig;
use crate::idp::{
    self, ConnectTokens, IdentityError, IdentityService, Token, UpstreamRole, VerifiedIdentity,
};

/// Who is on the other end of a session, as far as the gateway could tell at accept time.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq, Eq)]
pub struct Peer {
    pub agent: Option<String>,
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub exe: Option<String>,
    pub cgroup: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Identity {
    pub client_addr: SocketAddr,
    /// The address the client dialled: the listener itself, or what the eBPF redirect recorded.
    pub original_dst: SocketAddr,
    pub peer: Peer,
}

impl Identity {
    /// A connection to an explicit listener: the original destination is the listener address.
    pub fn explicit(client_addr: SocketAddr, listener: SocketAddr) -> Self {
        Identity {
            client_addr,
            original_dst: listener,
            peer: Peer::default(),
        }
    }
}

impl Identity {
    /// A connection the eBPF redirect steered here: the kernel recorded the caller at connect().
    pub fn redirected(client_addr: SocketAddr, origin: crate::redirect::Origin) -> Self {
        Identity {
            client_addr,
            original_dst: origin.original_dst,
            peer: Peer {
                agent: origin.agent,
                pid: Some(origin.pid),
                uid: Some(origin.uid),
                exe: exe_of(origin.pid).or(Some(origin.comm)),
                cgroup: origin.cgroup_path.map(|p| p.display().to_string()),
            },
        }
    }
}

/// The executable of a process, from /proc at accept time (best effort: it may be gone).
pub fn exe_of(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.display().to_string())
}

/// Whether the client leg may carry a token as its password: loopback (where the eBPF redirect
/// delivers agents' connections) or TLS. Anywhere else the gateway never asks for one.
pub fn leg_may_carry_password(client_addr: SocketAddr, tls: bool) -> bool {
    tls || client_addr.ip().to_canonical().is_loopback()
}

/// Token files set at runtime (`portcullis run --token-file`, `agents attach --token-file`),
/// beside the configuration's `[[agent]]` tables. A configured agent keeps its configured file:
/// a runtime one cannot replace it. They last until the gateway stops.
#[derive(Debug, Default)]
pub struct RuntimeTokenFiles(std::sync::RwLock<Vec<AgentConfig>>);

impl RuntimeTokenFiles {
    /// Sets (or with `None` clears) `name`'s token file. `configured`: the `[[agent]]` tables.
    pub fn set(
        &self,
        configured: &[AgentConfig],
        name: &str,
        file: Option<std::path::PathBuf>,
    ) -> Result<(), String> {
        if name.is_empty() {
            return Err("an agent's token file needs the agent's name".into());
        }
        if configured.iter().any(|a| a.name == name) {
            return Err(format!(
                "agent {name:?} has an [[agent]] token_file in the configuration; change it there"
            ));
        }
        if let Some(f) = &file
            && !f.is_absolute()
        {
            return Err(format!(
                "token file {} is not an absolute path",
                f.display()
            ));
        }
        let mut all = self.0.write().unwrap_or_else(|e| e.into_inner());
        all.retain(|a| a.name != name);
        if let Some(token_file) = file {
            all.push(AgentConfig {
                name: name.to_owned(),
                token_file,
            });
        }
        Ok(())
    }

    /// The configured agents, and the runtime ones they do not name.
    pub fn with_configured<'a>(
        &self,
        configured: &'a [AgentConfig],
    ) -> std::borrow::Cow<'a, [AgentConfig]> {
        let runtime = self.0.read().unwrap_or_else(|e| e.into_inner());
        if runtime.is_empty() {
            return std::borrow::Cow::Borrowed(configured);
        }
        let extra = runtime
            .iter()
            .filter(|r| !configured.iter().any(|c| c.name == r.name));
        std::borrow::Cow::Owned(configured.iter().chain(extra).cloned().collect())
    }

    /// Every agent's token file in force, configured first, each saying where it was set: what
    /// `portcullis agents` shows.
    pub fn listing(&self, configured: &[AgentConfig]) -> Vec<crate::admin::AgentTokenFile> {
        use crate::admin::{AgentTokenFile, TokenFileSource};
        let entry = |a: &AgentConfig, source| AgentTokenFile {
            agent: a.name.clone(),
            token_file: a.token_file.clone(),
            source,
        };
        let runtime = self.0.read().unwrap_or_else(|e| e.into_inner());
        let extra = runtime
            .iter()
            .filter(|r| !configured.iter().any(|c| c.name == r.name))
            .map(|a| entry(a, TokenFileSource::Runtime));
        configured
            .iter()
            .map(|a| entry(a, TokenFileSource::Configured))
            .chain(extra)
            .collect()
    }
}

/// The `[[agent]]` token file of the agent a connection is attributed to, if it has one.
pub fn token_file<'a>(agents: &'a [AgentConfig], agent: Option<&str>) -> Option<&'a AgentConfig> {
    agent.and_then(|name| agents.iter().find(|a| a.name == name))
}

/// A session's verified identity, the token sources it came from (re-read when it expires), and
/// the upstream login or role it maps to.
#[derive(Clone)]
pub struct SessionIdentity {
    pub verified: Arc<VerifiedIdentity>,
    pub tokens: ConnectTokens,
    pub service: IdentityService,
    pub role: UpstreamRole,
}

/// An identity being established off the I/O thread, bounded in time.
pub type PendingIdentity =
    Pin<Box<dyn Future<Output = Result<Arc<VerifiedIdentity>, IdentityError>>>>;

/// Asks the identity service (its own threads read the token file and talk to the IdP) and
/// gives up after a bound, so a hung IdP refuses the connection instead of holding it.
pub fn verify(service: &IdentityService, tokens: &ConnectTokens) -> PendingIdentity {
    // Discovery, JWKS and the exchange may each take up to the HTTP timeout.
    let limit = service.settings().timeout * 4;
    let answer = service.identify(tokens.subject.clone(), tokens.actor.clone());
    Box::pin(async move {
        match compio::time::timeout(limit, answer).await {
            Ok(r) => r,
            Err(_) => Err(IdentityError::IdpUnreachable {
                what: "identity",
                reason: format!("no answer within {}", humantime::format_duration(limit)),
            }),
        }
    })
}

/// The identity of a new connection to a target with `[target.identity]`.
///
/// `presented` is the token the client sent as its password, `None` when it was not asked for
/// one (its agent has a token file and the target takes no delegation, or its leg may not carry
/// a password: `leg_ok` is false). With a token file and `delegation`, a presented token is the
/// subject and the file the actor.
/// `Ok(None)`: no token, and the target does not require identity.
pub async fn at_connect(
    service: &IdentityService,
    agents: &[AgentConfig],
    agent: Option<&str>,
    presented: Option<Token>,
    leg_ok: bool,
) -> Result<Option<SessionIdentity>, IdentityError> {
    let cfg = service.settings();
    // An empty password is no token: what a client without one sends where identity is optional,
    // and what an agent with a token file sends when it delegates nobody's identity.
    let own_file = token_file(agents, agent).is_some();
    let presented = presented
        .filter(|t| (cfg.require_identity && !own_file) || !t.expose().is_empty())
        .filter(|_| !own_file || cfg.delegation);
    if presented.is_none() && !leg_ok && !own_file && cfg.require_identity {
        return Err(IdentityError::TokenMissing(
            "the connection's agent has no [[agent]] token_file, and the client leg is neither \
             loopback nor TLS, so it may not carry a token as its password"
                .into(),
        ));
    }
    let Some(tokens) = idp::connect_tokens(agents, agent, presented, cfg.require_identity)? else {
        return Ok(None);
    };
    let verified = verify(service, &tokens).await?;
    let role = idp::map_role(cfg, &verified)?;
    Ok(Some(SessionIdentity {
        verified,
        tokens,
        service: service.clone(),
        role,
    }))
}

impl SessionIdentity {
    /// Takes a renewed identity, unless it is someone else or maps to another upstream role: a
    /// session cannot change hands or privileges in the middle.
    pub fn renewed(&mut self, fresh: Arc<VerifiedIdentity>) -> Result<(), IdentityError> {
        if fresh.subject != self.verified.subject {
            return Err(IdentityError::Changed(format!(
                "the renewed token is for subject {:?}, not the session's {:?}",
                fresh.subject, self.verified.subject
            )));
        }
        if idp::map_role(self.service.settings(), &fresh)? != self.role {
            return Err(IdentityError::Changed(format!(
                "the renewed identity of {:?} maps to another upstream role (groups {:?})",
                fresh.subject, fresh.groups
            )));
        }
        self.verified = fresh;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_may_come_as_a_password_only_over_loopback_or_tls() {
        let addr = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert!(leg_may_carry_password(addr("127.0.0.1:5000"), false));
        assert!(leg_may_carry_password(addr("[::1]:5000"), false));
        assert!(leg_may_carry_password(
            addr("[::ffff:127.0.0.1]:5000"),
            false
        ));
        assert!(!leg_may_carry_password(addr("192.0.2.7:5000"), false));
        assert!(leg_may_carry_password(addr("192.0.2.7:5000"), true));
    }

    #[test]
    fn no_token_file_and_a_leg_that_may_not_carry_one_is_refused_without_asking() {
        let cfg = toml::from_str(
            "issuer = \"http://127.0.0.1:9\"\naudience = \"pg\"\nmode = \"validate\"\n",
        )
        .unwrap();
        let service = IdentityService::start(cfg).unwrap();
        let agents = [AgentConfig {
            name: "claude".into(),
            token_file: "/run/claude.jwt".into(),
        }];
        let refused = at_connect(&service, &agents, Some("codex"), None, false);
        let e = poll_once(refused).err().unwrap();
        assert_eq!(e.sqlstate(), "28000");
        assert!(e.to_string().contains("neither loopback nor TLS"), "{e}");
    }

    #[test]
    fn the_listing_says_which_token_files_are_configured_and_which_runtime() {
        use crate::admin::TokenFileSource::{Configured, Runtime};
        let agent = |name: &str, file: &str| AgentConfig {
            name: name.into(),
            token_file: file.into(),
        };
        let configured = [agent("claude", "/run/claude.jwt")];
        let runtime = RuntimeTokenFiles::default();
        runtime
            .set(&configured, "gemini", Some("/run/gemini.jwt".into()))
            .unwrap();
        let shown = |configured: &[AgentConfig]| {
            runtime
                .listing(configured)
                .into_iter()
                .map(|f| (f.agent, f.token_file.display().to_string(), f.source))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            shown(&configured),
            [
                ("claude".into(), "/run/claude.jwt".into(), Configured),
                ("gemini".into(), "/run/gemini.jwt".into(), Runtime),
            ]
        );
        // A reload that configures gemini: its configured file is the one in force.
        let reloaded = [agent("gemini", "/etc/gemini.jwt")];
        assert_eq!(
            shown(&reloaded),
            [("gemini".into(), "/etc/gemini.jwt".into(), Configured)]
        );
        runtime.set(&configured, "gemini", None).unwrap();
        assert_eq!(shown(&[]), []);
    }

    /// Polls once: the refusal comes before anything that would need a runtime.
    fn poll_once<F: Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        let waker = std::task::Waker::noop();
        match f.as_mut().poll(&mut std::task::Context::from_waker(waker)) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("at_connect waited instead of refusing"),
        }
    }
}
