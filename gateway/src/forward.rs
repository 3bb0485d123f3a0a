//! Forward: the upstream leg. Client and server streams, TLS to the target, upstream connect and
//! authentication, and cancel requests.

pub mod cancel;
pub mod conn;
pub mod tls;
pub mod upstream;
