//! Portcullis's cgroup programs. Attached to the agent cgroup root (and to cgroups placed under
//! interception with `portcullis agents attach`), so they run for agent sockets only:
//!
//! - `connect4`/`connect6`: a TCP connect to a protected destination is rewritten to the
//!   gateway's loopback listener, after the original destination and the caller (tgid, uid,
//!   comm, cgroup, agent) are recorded under the socket cookie. Any other protocol to a
//!   protected destination, and any connect to a `Deny` entry, is refused (EPERM).
//! - `sendmsg4`/`sendmsg6`: unconnected UDP sends to a protected destination are refused.
//! - `sock_ops` (TCP connect callback, source port now bound): copies the record to the key the
//!   gateway can compute from the accepted socket, the agent socket's local address and port.
//! - `getpeername4`/`getpeername6`: the agent sees its original peer, not the gateway.
//! - `sock_release`: deletes both records when the agent closes the socket, so maps do not
//!   grow with connections the gateway never looked up.
//!
//! The records live in LRU maps as a backstop: an evicted record makes the gateway refuse the
//! connection, never let it through unidentified.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "portcullis-ebpf is an eBPF object: build it for bpfel-unknown-none (cargo xtask build-ebpf)"
    );
}
