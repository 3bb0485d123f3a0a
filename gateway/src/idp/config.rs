//! Identity settings as written in the gateway's TOML.
//!
//! ```toml
//! [[agent]]
//! name = "claude-prod"
//! token_file = "/run/agents/claude-prod/token"   # re-read on every connect
//!
//! [[target]]
//! name = "orders"
//! upstream = "postgres://gateway@db:5432/orders"
//!
//! [target.identity]
//! issuer = "https://login.example.com/realms/prod"   # found by OIDC discovery
//! audience = "pg-orders"
//! client_id = "portcullis"
//! client_secret_file = "/etc/portcullis/idp-secret"  # or client_auth = "private_key_jwt"
//!
//! [[target.role]]                                     # first match by group wins
//! groups = ["dba"]
//! user = "orders_admin"
//! password_file = "/etc/portcullis/orders_admin.pw"
//!
//! [[target.role]]
//! groups = ["analysts"]
//! set_role = "orders_readonly"
//! ```
//!
//! None of these settings reloads: the identity service is built at start.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// `[[agent]]`: a named agent and where its token comes from.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The agent's name, as the eBPF origin attributes it.
    pub name: String,
    /// A file holding the agent's current OIDC token (a projected service-account token, a
    /// JWT-SVID, ...). Read at every connect, never cached by the gateway.
    pub token_file: PathBuf,
}

/// How the presented token becomes the session's identity.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IdentityMode {
    /// RFC 8693: exchange the agent's token for one whose audience is the target (default).
    #[default]
    Exchange,
    /// For IdPs without token exchange: validate the presented token against `audience`.
    Validate,
}

/// How the gateway authenticates to the IdP's token endpoint.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMethod {
    /// HTTP Basic with `client_id` and the secret in `client_secret_file` (default).
    #[default]
    ClientSecretBasic,
    /// A JWT signed with `private_key_file` (PKCS#8 PEM; EC P-256 signs ES256, RSA signs RS256).
    PrivateKeyJwt,
}

/// `[target.identity]`: the IdP and the checks for one target.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TargetIdentity {
    /// The IdP's issuer identifier; discovery reads `{issuer}/.well-known/openid-configuration`
    /// and tokens' `iss` must equal it exactly.
    pub issuer: String,
    /// The audience the target's tokens must carry (sent as `audience` in the exchange).
    pub audience: String,
    /// Also sent as `resource` in the exchange, for IdPs that use resource indicators.
    pub resource: Option<String>,
    /// `scope` for the exchange, if the IdP needs one.
    pub scope: Option<String>,
    /// `exchange` (default) or `validate`.
    #[serde(default)]
    pub mode: IdentityMode,
    /// The gateway's client id at the IdP (required in exchange mode).
    pub client_id: Option<String>,
    /// `client_secret_basic` (default) or `private_key_jwt`.
    #[serde(default)]
    pub client_auth: ClientAuthMethod,
    /// File with the client secret (client_secret_basic). Held like an upstream password.
    pub client_secret_file: Option<PathBuf>,
    /// PKCS#8 PEM private key (private_key_jwt).
    pub private_key_file: Option<PathBuf>,
    /// `kid` to put in the client assertion's header (private_key_jwt), if the IdP wants one.
    pub private_key_kid: Option<String>,
    /// PEM file of CAs to trust for the IdP's HTTPS (default: the Mozilla roots).
    pub ca_file: Option<PathBuf>,
    /// `subject_token_type` (and `actor_token_type`) sent in the exchange. Default
    /// `urn:ietf:params:oauth:token-type:access_token`.
    #[serde(default = "default_token_type")]
    pub subject_token_type: String,
    /// The claim that lists the subject's groups. Default `groups`.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Refuse connections that bring no token. Default `true`: a target with an identity
    /// section fails closed. A presented token is always checked, required or not.
    #[serde(default = "yes")]
    pub require_identity: bool,
    /// Delegation on the wire: an agent with an `[[agent]] token_file` is also asked for a
    /// password (over loopback or TLS), and a token it sends there is a person's, on whose behalf
    /// it acts. The person's token is the subject and the agent's the actor (RFC 8693
    /// `actor_token`): the session's subject is the person, its actors name the agent, and rules
    /// select on both. An empty password means the agent acts for itself. Default `false`: an
    /// agent with a token file is never asked for a password, and is always its own subject.
    #[serde(default)]
    pub delegation: bool,
    /// Role for an identity that no `[[target.role]]` matches (`SET ROLE` after connect).
    /// Unset (default): such identities are refused when roles are configured.
    pub default_role: Option<String>,
    /// Clock skew allowed on `exp`, `nbf`, `iat`. Default 30s.
    #[serde(default = "default_leeway", with = "duration")]
    pub leeway: Duration,
    /// Timeout of one HTTP call to the IdP. Default 5s.
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// An unknown `kid` refreshes the JWKS at most this often. Default 10s.
    #[serde(default = "default_jwks_min_refresh", with = "duration")]
    pub jwks_min_refresh: Duration,
    /// The JWKS is refetched when older than this. Default 1h.
    #[serde(default = "default_jwks_max_age", with = "duration")]
    pub jwks_max_age: Duration,
    /// A cached identity is dropped this long before its token expires. Default 30s (at most a
    /// quarter of the token's lifetime).
    #[serde(default = "default_refresh_before", with = "duration")]
    pub refresh_before: Duration,
    /// Threads that talk to the IdP. Default 2.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Most identities cached. Default 10000.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
    /// Filled from the target's `[[target.role]]` tables.
    #[serde(skip)]
    pub roles: Vec<RoleMapping>,
}

/// `[[target.role]]`: which upstream privileges an identity's groups get.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RoleMapping {
    /// The mapping applies when the identity has any of these groups.
    pub groups: Vec<String>,
    /// Log in upstream as this user, with `password_file` ...
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// ... or keep the target's login and `SET ROLE` to this role after connect.
    pub set_role: Option<String>,
}

fn default_token_type() -> String {
    super::TOKEN_TYPE_ACCESS_TOKEN.into()
}
fn default_groups_claim() -> String {
    "groups".into()
}
fn yes() -> bool {
    true
}
fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_jwks_min_refresh() -> Duration {
    Duration::from_secs(10)
}
fn default_jwks_max_age() -> Duration {
    Duration::from_secs(3600)
}
fn default_refresh_before() -> Duration {
    Duration::from_secs(30)
}
fn default_threads() -> usize {
    2
}
fn default_cache_entries() -> usize {
    10_000
}

mod duration {
    use std::time::Duration;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration like \"30s\" or \"5m\": {e}"
            ))
        })
    }
}

impl TargetIdentity {
    /// Joins a target's `[target.identity]` and `[[target.role]]` tables and checks them.
    pub fn resolve(
        identity: Option<TargetIdentity>,
        roles: Vec<RoleMapping>,
    ) -> Result<Option<TargetIdentity>, String> {
        match identity {
            None if roles.is_empty() => Ok(None),
            None => Err("`[[target.role]]` needs a `[target.identity]` section".into()),
            Some(mut identity) => {
                identity.roles = roles;
                identity.check()?;
                Ok(Some(identity))
            }
        }
    }

    /// Checks what serde cannot: combinations of keys. The message names the key.
    pub fn check(&self) -> Result<(), String> {
        if !(self.issuer.starts_with("https://") || self.issuer.starts_with("http://")) {
            return Err(format!(
                "key `identity.issuer`: {:?} is not an http(s) URL",
                self.issuer
            ));
        }
        if self.audience.is_empty() {
            return Err("key `identity.audience`: empty".into());
        }
        if self.groups_claim.is_empty() {
            return Err("key `identity.groups_claim`: empty".into());
        }
        if self.threads == 0 || self.threads > 64 {
            return Err("key `identity.threads`: between 1 and 64".into());
        }
        if self.mode == IdentityMode::Exchange {
            if self.client_id.is_none() {
                return Err("key `identity.client_id`: exchange mode needs a client id".into());
            }
            match self.client_auth {
                ClientAuthMethod::ClientSecretBasic if self.client_secret_file.is_none() => {
                    return Err(
                        "key `identity.client_secret_file`: client_secret_basic needs \
                                a secret file"
                            .into(),
                    );
                }
                ClientAuthMethod::PrivateKeyJwt if self.private_key_file.is_none() => {
                    return Err(
                        "key `identity.private_key_file`: private_key_jwt needs a key \
                                file"
                            .into(),
                    );
                }
                _ => {}
            }
        }
        if let Some(r) = &self.default_role {
            check_role_name(r).map_err(|m| format!("key `identity.default_role`: {m}"))?;
        }
        for (i, role) in self.roles.iter().enumerate() {
            let key = format!("target.role[{i}]");
            if role.groups.is_empty() {
                return Err(format!("key `{key}.groups`: empty"));
            }
            match (&role.user, &role.password_file, &role.set_role) {
                (Some(_), Some(_), None) => {}
                (None, None, Some(r)) => {
                    check_role_name(r).map_err(|m| format!("key `{key}.set_role`: {m}"))?
                }
                _ => {
                    return Err(format!(
                        "`{key}`: give either `user` and `password_file`, or `set_role`"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Agent names are unique and token files absolute (the daemon's working directory is `/`).
pub fn check_agents(agents: &[AgentConfig]) -> Result<(), String> {
    for (i, a) in agents.iter().enumerate() {
        if a.name.is_empty() {
            return Err(format!("key `agent[{i}].name`: empty"));
        }
        if agents[..i].iter().any(|b| b.name == a.name) {
            return Err(format!(
                "key `agent[{i}].name`: duplicate agent {:?}",
                a.name
            ));
        }
        if !a.token_file.is_absolute() {
            return Err(format!(
                "key `agent[{i}].token_file`: {} is not an absolute path",
                a.token_file.display()
            ));
        }
    }
    Ok(())
}

/// Role names are SQL identifiers the gateway quotes; refuse what cannot be one.
fn check_role_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 || name.contains('\0') {
        return Err(format!(
            "{name:?} is not a role name (1 to 63 bytes, no NUL)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TargetIdentity, String> {
        let t: TargetIdentity = toml::from_str(text).map_err(|e| e.to_string())?;
        t.check()?;
        Ok(t)
    }

    #[test]
    fn defaults_are_documented_values() {
        let t = parse(
            "issuer = \"https://idp\"\naudience = \"pg\"\nclient_id = \"gw\"\n\
             client_secret_file = \"/s\"\n",
        )
        .unwrap();
        assert_eq!(t.mode, IdentityMode::Exchange);
        assert_eq!(t.client_auth, ClientAuthMethod::ClientSecretBasic);
        assert_eq!(t.groups_claim, "groups");
        assert!(t.require_identity);
        assert_eq!(t.leeway, Duration::from_secs(30));
        assert_eq!(t.jwks_min_refresh, Duration::from_secs(10));
        assert_eq!(t.threads, 2);
    }

    #[test]
    fn bad_combinations_name_the_key() {
        let e = parse("issuer = \"https://idp\"\naudience = \"pg\"\n").unwrap_err();
        assert!(e.contains("identity.client_id"), "{e}");
        let e = parse("issuer = \"https://idp\"\naudience = \"pg\"\nmode = \"validate\"\nx = 1\n")
            .unwrap_err();
        assert!(e.contains("unknown field `x`"), "{e}");
        let e = parse("issuer = \"idp\"\naudience = \"pg\"\nmode = \"validate\"\n").unwrap_err();
        assert!(e.contains("identity.issuer"), "{e}");
        let e = parse(
            "issuer = \"https://idp\"\naudience = \"pg\"\nmode = \"validate\"\nleeway = \"soon\"\n",
        )
        .unwrap_err();
        assert!(e.contains("not a duration"), "{e}");
        let mut t =
            parse("issuer = \"https://idp\"\naudience = \"pg\"\nmode = \"validate\"\n").unwrap();
        t.roles = vec![RoleMapping {
            groups: vec!["dba".into()],
            user: Some("admin".into()),
            password_file: None,
            set_role: Some("x".into()),
        }];
        assert!(t.check().unwrap_err().contains("target.role[0]"));
    }
}
