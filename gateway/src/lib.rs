//! Portcullis: the data-path gateway between AI agents and production systems.
//!
//! The data path, in the order a connection meets it:
//! `redirect` (eBPF steers agent sockets here) → `forward::accept` → `identify` →
//! `protocol` (framing) → `policy` (decide) → `mask` → `record` → `forward` (to the target).

pub mod admin;
pub mod config;
pub mod forward;
pub mod identify;
pub mod idp;
pub mod mask;
pub mod metrics;
pub mod policy;
pub mod protocol;
pub mod record;
pub mod redirect;
pub mod route;
pub mod secret;
