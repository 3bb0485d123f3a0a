//! The contract between the Portcullis eBPF programs and the gateway: map names, program names,
//! and the `#[repr(C)]` layouts of every map key and value. Both sides compile this one file, so
//! a layout change cannot reach only one of them.
//!
//! Addresses are kept as the kernel hands them to BPF programs: IPv4 in one `u32` and IPv6 in
//! four `u32` words, each word holding its bytes in network order. IPv4 is stored in its
//! v4-mapped IPv6 form (`::ffff:a.b.c.d`) everywhere, so one key type and one lookup serve IPv4,
//! IPv6 and v4-mapped sockets alike. Ports are host order unless a name says otherwise.
#![no_std]

/// Protected targets: LPM trie keyed by [`TargetKey`] (port, then v4-mapped-or-v6 address),
/// value [`TargetAction`] as `u32`.
pub const MAP_TARGETS: &str = "PC_TARGETS";
/// One [`Config`] at index 0.
pub const MAP_CONFIG: &str = "PC_CONFIG";
/// Socket cookie (`u64`) → [`OriginRecord`], written at connect, read by getpeername,
/// deleted at socket release.
pub const MAP_BY_COOKIE: &str = "PC_BY_COOKIE";
/// [`PeerKey`] (the agent socket's local address as the gateway sees its peer) →
/// [`OriginRecord`]; deleted by the gateway's lookup, or at socket release.
pub const MAP_BY_PEER: &str = "PC_BY_PEER";
/// Agent cgroup id (`u64`) → [`AgentInfo`]: cgroups whose processes are named agents.
pub const MAP_AGENTS: &str = "PC_AGENTS";

/// Every map, for pinning and removal.
pub const MAPS: [&str; 5] = [
    MAP_TARGETS,
    MAP_CONFIG,
    MAP_BY_COOKIE,
    MAP_BY_PEER,
    MAP_AGENTS,
];

pub const PROG_CONNECT4: &str = "pc_connect4";
pub const PROG_CONNECT6: &str = "pc_connect6";
pub const PROG_SENDMSG4: &str = "pc_sendmsg4";
pub const PROG_SENDMSG6: &str = "pc_sendmsg6";
pub const PROG_GETPEERNAME4: &str = "pc_getpeername4";
pub const PROG_GETPEERNAME6: &str = "pc_getpeername6";
pub const PROG_SOCK_OPS: &str = "pc_sock_ops";
pub const PROG_SOCK_RELEASE: &str = "pc_sock_release";

/// Capacity of the two connection maps: the most redirected connections in flight at once.
/// They are LRU maps, so an overflow evicts the oldest record and the gateway refuses that
/// connection (fail closed) instead of the kernel refusing new ones.
pub const MAX_CONNECTIONS: u32 = 65_536;
pub const MAX_TARGETS: u32 = 4_096;
pub const MAX_AGENTS: u32 = 1_024;
/// How deep the programs look up the cgroup tree for a registered agent cgroup.
pub const MAX_CGROUP_DEPTH: i32 = 32;

/// Bits of [`TargetKey`] taken by the port; an address prefix of `n` bits is a key prefix of
/// `TARGET_PORT_BITS + n` (IPv4 prefixes also add the 96 bits of `::ffff:0:0/96`).
pub const TARGET_PORT_BITS: u32 = 16;
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

/// Data part of an LPM trie key: matched bit by bit from the first byte, so the port comes
/// first and every entry names an exact port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TargetKey {
    /// Port, network order.
    pub port_be: [u8; 2],
    /// IPv6 address, or IPv4 in v4-mapped form, network order.
    pub addr: [u8; 16],
}

/// What a connect to a protected destination does.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetAction {
    /// TCP is steered to the gateway; everything else (UDP, ...) is refused.
    Redirect = 1,
    /// Refused outright: another local address reaching a protected local server.
    Deny = 2,
}

impl TargetAction {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Redirect),
            2 => Some(Self::Deny),
            _ => None,
        }
    }
}

/// Set in [`Config::flags`] when the gateway listens on IPv6 loopback too.
pub const CONFIG_HAS_V6_LISTENER: u32 = 1;

/// Written by the gateway at start. All zero (never written) means no gateway has ever
/// configured the maps: the programs then refuse every protected connect.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// The gateway's tgid: its sockets are never redirected even if it lands in an agent cgroup.
    pub gateway_tgid: u32,
    pub flags: u32,
    /// IPv4 listener address (network-order word) and port (host order).
    pub listen_v4_addr: u32,
    pub listen_v4_port: u32,
    /// IPv6 listener address (network-order words) and port (host order).
    pub listen_v6_addr: [u32; 4],
    pub listen_v6_port: u32,
}

/// Where the gateway finds a redirected connection: the agent socket's local address and port,
/// which is the peer address of the connection the gateway accepts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PeerKey {
    pub addr: [u32; 4],
    pub port: u32,
}

pub const COMM_LEN: usize = 16;

/// The original destination of a redirected connection and who made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OriginRecord {
    /// Original destination: IPv6, or IPv4 v4-mapped (network-order words).
    pub dst_addr: [u32; 4],
    /// Original destination port, host order.
    pub dst_port: u32,
    pub tgid: u32,
    pub cgroup_id: u64,
    /// The registered agent cgroup (in [`MAP_AGENTS`]) that contains `cgroup_id`, 0 if none.
    pub agent_cgroup_id: u64,
    pub uid: u32,
    pub _pad: u32,
    pub comm: [u8; COMM_LEN],
    /// Set by sock_ops: the [`PeerKey`] this record was also filed under, so socket release
    /// can delete that copy too (release hooks cannot read the socket's addresses).
    pub peer: PeerKey,
}

pub const AGENT_NAME_LEN: usize = 64;
pub const AGENT_PATH_LEN: usize = 192;

/// A registered agent cgroup: NUL-padded name and path relative to the cgroup2 mount.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentInfo {
    pub name: [u8; AGENT_NAME_LEN],
    pub path: [u8; AGENT_PATH_LEN],
}

/// `::ffff:0:0` as the first three network-order words of a v4-mapped address.
pub const V4_MAPPED_WORDS: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

/// An IPv4 address word (network order) in v4-mapped form.
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> [u32; 4] {
    [
        V4_MAPPED_WORDS[0],
        V4_MAPPED_WORDS[1],
        V4_MAPPED_WORDS[2],
        ip4,
    ]
}

#[inline(always)]
pub const fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == V4_MAPPED_WORDS[0] && addr[1] == V4_MAPPED_WORDS[1] && addr[2] == V4_MAPPED_WORDS[2]
}

/// Network-order words as the 16 address bytes.
#[inline(always)]
pub const fn words_to_bytes(w: &[u32; 4]) -> [u8; 16] {
    let a = w[0].to_ne_bytes();
    let b = w[1].to_ne_bytes();
    let c = w[2].to_ne_bytes();
    let d = w[3].to_ne_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// The 16 address bytes as network-order words.
#[inline(always)]
pub const fn bytes_to_words(b: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type here is `#[repr(C)]`, `Copy`, made only of integers and integer
    // arrays, with explicit padding fields, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::TargetKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PeerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OriginRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AgentInfo {}
}
