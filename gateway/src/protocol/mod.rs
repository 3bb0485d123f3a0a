//! Sans-IO wire protocol cores: pure state machines over byte slices. Nothing here touches a socket.
#![forbid(unsafe_code)]

pub mod core;
pub mod postgres;

/// The wire protocol a target speaks (config key `protocol`). Each has a sans-IO core here and a
/// driver in `pipeline/`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    Postgres,
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "postgres" => Ok(Protocol::Postgres),
            other => Err(format!(
                "unknown protocol {other:?}; the gateway speaks \"postgres\""
            )),
        }
    }
}
