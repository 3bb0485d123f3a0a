//! Portcullis: the data-path gateway between AI agents and production systems.
//!
//! `daemon` is the composition root. The data path, in the order a connection meets it, is strung
//! together in `pipeline::run`: `redirect` (eBPF steers agent sockets here) → `accept` →
//! `identify` → frame (`protocol`, the sans-IO cores, driven per protocol from `pipeline`) →
//! decide (`policy` on a `request::Request`) → `mask` → `record` → `forward` (to the target).

pub mod accept;
pub mod admin;
pub mod config;
pub mod daemon;
pub mod error;
pub mod forward;
pub mod identify;
pub mod idp;
pub mod mask;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod protocol;
pub mod record;
pub mod redirect;
pub mod request;
pub mod route;
pub mod secret;
pub mod service;
#[cfg(test)]
mod testing;
