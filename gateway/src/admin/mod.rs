//! Admin API on a Unix socket, and the CLI side that talks to it.

pub mod client;
