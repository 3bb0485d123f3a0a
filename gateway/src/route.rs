//! Routes: a connection arrives with an original destination, and the route gives its target and
//! credential. An explicit listener's original destination is its own address; a connection the
//! eBPF redirect steered here carries the address the agent dialled.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use crate::config::{Config, TargetConfig};
use crate::metrics::{Registry, TargetCounters};
use crate::secret::Secret;

/// A target with its credential loaded.
#[derive(Debug)]
pub struct Target {
    pub config: TargetConfig,
    pub password: Option<Secret>,
    pub counters: Arc<TargetCounters>,
}

/// An immutable routing table; a reload builds a new one and swaps it in.
#[derive(Debug, Default)]
pub struct Routes {
    by_destination: HashMap<SocketAddr, Arc<Target>>,
    targets: Vec<Arc<Target>>,
}

impl Routes {
    /// Loads every target's credential now, so a missing or unsafe password file stops startup
    /// (or a reload) instead of failing a client later.
    pub fn build(cfg: &Config, registry: &Registry) -> anyhow::Result<Routes> {
        let mut targets = HashMap::new();
        for t in &cfg.targets {
            let password = t
                .password
                .load()
                .with_context(|| format!("target {:?}", t.name))?;
            let target = Arc::new(Target {
                config: t.clone(),
                password,
                counters: registry.target(&t.name),
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
        Ok(Routes {
            by_destination,
            targets,
        })
    }

    /// The target for a connection's original destination.
    pub fn route(&self, original_dst: SocketAddr) -> Option<Arc<Target>> {
        self.by_destination.get(&original_dst).cloned()
    }

    pub fn targets(&self) -> &[Arc<Target>] {
        &self.targets
    }
}
