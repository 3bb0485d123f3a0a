//! PostgreSQL wire protocol, sans-IO.

pub mod auth;
pub mod error;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod hello;
pub mod housekeeping;
pub mod messages;
pub mod session;
pub mod side_query;
pub mod startup;

pub use error::ProtocolError;
