//! Forward: the upstream leg. Client and server streams, TLS to the target, upstream connect and
//! authentication, and cancel requests; and the TLS the gateway serves on the agent's leg.

pub mod cancel;
pub mod conn;
pub mod local_tls;
pub mod pool;
pub mod slots;
pub mod tls;
pub mod upstream;
