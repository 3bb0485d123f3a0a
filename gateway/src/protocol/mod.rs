//! Sans-IO wire protocol cores: pure state machines over byte slices. Nothing here touches a socket.
#![forbid(unsafe_code)]

pub mod postgres;
