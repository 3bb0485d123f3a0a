//! Routes: a connection arrives with an original destination, and the route gives its target and
//! credential. An explicit listener's original destination is its own address; a connection the
//! eBPF redirect steered here carries the address the agent dialled.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use crate::config::{Config, TargetConfig};
use crate::forward::local_tls::LocalTls;
use crate::metrics::{Registry, TargetCounters};
use crate::redirect::ProtectedTarget;
use crate::secret::Secret;

/// A target with its credential and TLS settings loaded.
pub struct Target {
    pub config: TargetConfig,
    pub password: Option<Secret>,
    /// Built once at load and reload, never per connection or cancel; `None` for
    /// `sslmode=disable`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The agent's leg; `None`: SSLRequest is answered 'N'.
    pub local_tls: Option<LocalTls>,
    pub counters: Arc<TargetCounters>,
    /// `[target.identity]`: the IdP this target checks sessions against; `None`: no identity.
    pub identity: Option<TargetIdp>,
}

/// A target's identity service and the passwords of its `[[target.role]]` logins, loaded with
/// the target's own credential (never read on the data path).
pub struct TargetIdp {
    pub service: crate::idp::IdentityService,
    pub role_passwords: HashMap<String, Secret>,
}

impl TargetIdp {
    fn start(t: &TargetConfig) -> anyhow::Result<Option<TargetIdp>> {
        let Some(cfg) = &t.identity else {
            return Ok(None);
        };
        let mut role_passwords = HashMap::new();
        for role in &cfg.roles {
            if let (Some(user), Some(file)) = (&role.user, &role.password_file) {
                let secret = crate::secret::SecretSource::File(file.clone())
                    .load()?
                    .context("a role login needs a password")?;
                role_passwords.insert(user.clone(), secret);
            }
        }
        let service = crate::idp::IdentityService::start(cfg.clone())?;
        Ok(Some(TargetIdp {
            service,
            role_passwords,
        }))
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("config", &self.config)
            .field("password", &self.password)
            .field("identity", &self.identity.is_some())
            .field("tls", &self.tls.is_some())
            .field("local_tls", &self.local_tls)
            .finish_non_exhaustive()
    }
}

/// An immutable routing table; a reload builds a new one and swaps it in.
#[derive(Debug, Default)]
pub struct Routes {
    by_destination: HashMap<SocketAddr, Arc<Target>>,
    /// Redirect mode: protected destinations, most specific prefix first.
    protected: Vec<(ProtectedTarget, Arc<Target>)>,
    targets: Vec<Arc<Target>>,
}

impl Routes {
    /// Loads every target's credential and TLS roots now, so a missing or unsafe password file or
    /// CA bundle stops startup (or a reload) instead of failing a client later.
    pub fn build(cfg: &Config, registry: &Registry) -> anyhow::Result<Routes> {
        let mut targets = HashMap::new();
        let mut local_ca = None;
        for t in &cfg.targets {
            let password = t
                .password
                .load()
                .with_context(|| format!("target {:?}", t.name))?;
            let up = &t.upstream;
            let tls = crate::forward::tls::client_config(up.sslmode, up.sslrootcert.as_deref())
                .with_context(|| format!("target {:?}: TLS", t.name))?;
            let local_tls = t
                .local_tls
                .as_ref()
                .map(|l| LocalTls::load(l, &cfg.state_dir, &mut local_ca))
                .transpose()
                .with_context(|| format!("target {:?}: local_tls", t.name))?;
            if t.danger_password_over_unverified_channel {
                tracing::warn!(
                    target = %t.name,
                    "DANGER: danger_password_over_unverified_channel is set: a cleartext or md5 \
                     password goes to {up} even when the server cannot be verified; anyone on \
                     the path can collect it"
                );
            }
            let identity =
                TargetIdp::start(t).with_context(|| format!("target {:?}: identity", t.name))?;
            let target = Arc::new(Target {
                config: t.clone(),
                password,
                tls,
                local_tls,
                counters: registry.target(&t.name),
                identity,
            });
            targets.insert(t.name.clone(), target);
        }
        let mut by_destination = HashMap::new();
        for l in &cfg.listeners {
            let t = targets
                .get(&l.target)
                .context("listener names an unknown target")?;
            by_destination.insert(l.listen, t.clone());
        }
        let mut targets: Vec<_> = targets.into_values().collect();
        targets.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        let mut protected: Vec<_> = targets
            .iter()
            .flat_map(|t| t.config.protect.iter().map(move |p| (*p, t.clone())))
            .collect();
        protected.sort_by_key(|(p, _)| std::cmp::Reverse(p.prefix_len));
        Ok(Routes {
            by_destination,
            protected,
            targets,
        })
    }

    /// The target for a connection's original destination: an explicit listener's own address,
    /// or a protected destination the redirect steered here.
    pub fn route(&self, original_dst: SocketAddr) -> Option<Arc<Target>> {
        if let Some(t) = self.by_destination.get(&original_dst) {
            return Some(t.clone());
        }
        let ip = original_dst.ip().to_canonical();
        self.protected
            .iter()
            .find(|(p, _)| p.port == original_dst.port() && contains(p, ip))
            .map(|(_, t)| t.clone())
    }

    /// Every protected destination, for the eBPF programs.
    pub fn protected(&self) -> Vec<ProtectedTarget> {
        self.protected.iter().map(|(p, _)| *p).collect()
    }

    pub fn targets(&self) -> &[Arc<Target>] {
        &self.targets
    }

    /// The target configured now under `name`.
    pub fn target(&self, name: &str) -> Option<&Arc<Target>> {
        self.targets.iter().find(|t| t.config.name == name)
    }
}

fn contains(p: &ProtectedTarget, ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match (p.net.to_canonical(), ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let bits = p.prefix_len.min(32) as u32;
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let bits = p.prefix_len.min(128) as u32;
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_protect;

    #[test]
    fn cidr_and_v4_mapped_destinations_match() {
        let p = parse_protect("10.0.0.0/24:5432").unwrap();
        assert!(contains(&p, "10.0.0.77".parse().unwrap()));
        assert!(!contains(&p, "10.0.1.1".parse().unwrap()));
        let mapped: std::net::IpAddr = "::ffff:10.0.0.9"
            .parse::<std::net::IpAddr>()
            .unwrap()
            .to_canonical();
        assert!(contains(&p, mapped));
        let v6 = parse_protect("[fd00::/64]:5432").unwrap();
        assert!(contains(&v6, "fd00::1".parse().unwrap()));
        assert!(parse_protect("10.0.0.0/33:5432").is_err());
        assert!(parse_protect("nonsense").is_err());
    }
}
