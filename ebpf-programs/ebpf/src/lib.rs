//! Empty on purpose: cargo only tracks a build-dependency through a library target, and
//! gateway/build.rs depends on this crate so that editing the programs rebuilds the gateway.
#![no_std]
