//! The session pipeline: one client connection through the stages.

pub mod gate;
pub mod mask_filter;
pub mod session;
