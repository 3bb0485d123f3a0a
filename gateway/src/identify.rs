//! Who is on the other end of an accepted connection: its addresses, the destination it dialled,
//! and, where the kernel told us, its agent, process and cgroup.

use std::net::SocketAddr;

/// Who is on the other end of a session, as far as the gateway could tell at accept time.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq, Eq)]
pub struct Peer {
    pub agent: Option<String>,
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub exe: Option<String>,
    pub cgroup: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Identity {
    pub client_addr: SocketAddr,
    /// The address the client dialled: the listener itself, or what the eBPF redirect recorded.
    pub original_dst: SocketAddr,
    pub peer: Peer,
}

impl Identity {
    /// A connection to an explicit listener: the original destination is the listener address.
    pub fn explicit(client_addr: SocketAddr, listener: SocketAddr) -> Self {
        Identity {
            client_addr,
            original_dst: listener,
            peer: Peer::default(),
        }
    }
}

impl Identity {
    /// A connection the eBPF redirect steered here: the kernel recorded the caller at connect().
    pub fn redirected(client_addr: SocketAddr, origin: crate::redirect::Origin) -> Self {
        Identity {
            client_addr,
            original_dst: origin.original_dst,
            peer: Peer {
                agent: origin.agent,
                pid: Some(origin.pid),
                uid: Some(origin.uid),
                exe: exe_of(origin.pid).or(Some(origin.comm)),
                cgroup: origin.cgroup_path.map(|p| p.display().to_string()),
            },
        }
    }
}

/// The executable of a process, from /proc at accept time (best effort: it may be gone).
pub fn exe_of(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.display().to_string())
}
