// Map keys and values are passed by reference: the helpers take pointers, and copies of
// records would only grow the 512-byte BPF stack.
#![allow(clippy::needless_borrows_for_generic_args)]

use core::ffi::c_void;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::bindings::{BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr};
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
    },
};
use aya_ebpf::macros::{cgroup_sock, cgroup_sock_addr, map, sock_ops};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap};
use aya_ebpf::programs::{SockAddrContext, SockContext, SockOpsContext};
use portcullis_common::{
    AgentInfo, CONFIG_HAS_V6_LISTENER, Config, MAX_AGENTS, MAX_CGROUP_DEPTH, MAX_CONNECTIONS,
    MAX_TARGETS, OriginRecord, PeerKey, TARGET_PORT_BITS, TargetAction, TargetKey, is_v4_mapped,
    v4_mapped, words_to_bytes,
};

/// Return values of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;

// Names must match `portcullis_common::MAP_*`; the loader checks that every one is present.
#[map(name = "PC_TARGETS")]
static TARGETS: LpmTrie<TargetKey, u32> = LpmTrie::with_max_entries(MAX_TARGETS, 0);
#[map(name = "PC_CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map(name = "PC_BY_COOKIE")]
static BY_COOKIE: LruHashMap<u64, OriginRecord> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);
#[map(name = "PC_BY_PEER")]
static BY_PEER: LruHashMap<PeerKey, OriginRecord> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);
#[map(name = "PC_AGENTS")]
static AGENTS: HashMap<u64, AgentInfo> = HashMap::with_max_entries(MAX_AGENTS, 0);

// The verifier accepts only 4-byte accesses to the address fields of `bpf_sock_addr`, so they
// are read and written word by word, volatile so the compiler cannot merge them.
#[inline(always)]
fn read_u32(p: *const u32) -> u32 {
    // SAFETY: `p` points into the context the kernel passed to this program.
    unsafe { read_volatile(p) }
}

#[inline(always)]
fn write_u32(p: *mut u32, v: u32) {
    // SAFETY: `p` points into the writable part of the context the kernel passed.
    unsafe { write_volatile(p, v) }
}

#[inline(always)]
fn read_ip6(sa: *const bpf_sock_addr) -> [u32; 4] {
    // SAFETY: `sa` is the program's context; `addr_of` takes field addresses without reading.
    let p = unsafe { addr_of!((*sa).user_ip6) } as *const u32;
    // SAFETY: the four words lie inside `user_ip6`.
    unsafe {
        [
            read_u32(p),
            read_u32(p.add(1)),
            read_u32(p.add(2)),
            read_u32(p.add(3)),
        ]
    }
}

#[inline(always)]
fn write_ip6(sa: *mut bpf_sock_addr, a: &[u32; 4]) {
    // SAFETY: as in `read_ip6`.
    let p = unsafe { addr_of_mut!((*sa).user_ip6) } as *mut u32;
    // SAFETY: the four words lie inside `user_ip6`.
    unsafe {
        write_u32(p, a[0]);
        write_u32(p.add(1), a[1]);
        write_u32(p.add(2), a[2]);
        write_u32(p.add(3), a[3]);
    }
}

/// The destination of this connect/sendmsg (v4-mapped for IPv4) and its host-order port.
#[inline(always)]
fn destination(sa: *mut bpf_sock_addr, v6: bool) -> ([u32; 4], u16) {
    // SAFETY: `sa` is the program's context; the fields read are readable in these hooks.
    let port = u16::from_be(read_u32(unsafe { addr_of!((*sa).user_port) }) as u16);
    let addr = if v6 {
        read_ip6(sa)
    } else {
        // SAFETY: as above.
        v4_mapped(read_u32(unsafe { addr_of!((*sa).user_ip4) }))
    };
    (addr, port)
}

#[inline(always)]
fn set_port(sa: *mut bpf_sock_addr, port: u32) {
    // SAFETY: `user_port` is writable in connect hooks and getpeername hooks.
    write_u32(
        unsafe { addr_of_mut!((*sa).user_port) },
        (port as u16).to_be() as u32,
    );
}

#[inline(always)]
fn target_action(addr: &[u32; 4], port: u16) -> Option<TargetAction> {
    let key = Key::new(
        TARGET_PORT_BITS + 128,
        TargetKey {
            port_be: port.to_be_bytes(),
            addr: words_to_bytes(addr),
        },
    );
    TARGETS.get(&key).and_then(|v| TargetAction::from_u32(*v))
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// The shallowest registered agent cgroup among the caller's ancestors (0 if none).
#[inline(always)]
fn agent_cgroup() -> u64 {
    let mut level = 1;
    while level < MAX_CGROUP_DEPTH {
        // SAFETY: the helper takes a level and returns 0 past the task's own cgroup.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        if AGENTS.get_ptr(&id).is_some() {
            return id;
        }
        level += 1;
    }
    0
}

// Inlined so `v6` is a constant in each program: the verifier rejects context accesses
// at offsets computed at run time.
#[inline(always)]
fn connect(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    let (dst, port) = destination(sa, v6);
    let Some(action) = target_action(&dst, port) else {
        return ALLOW;
    };
    let Some(cfg) = CONFIG.get(0) else {
        return REFUSE;
    };
    let tgid = current_tgid();
    if cfg.gateway_tgid != 0 && tgid == cfg.gateway_tgid {
        return ALLOW;
    }
    // SAFETY: `protocol` is readable in connect hooks.
    let protocol = read_u32(unsafe { addr_of!((*sa).protocol) });
    if action != TargetAction::Redirect || protocol != IPPROTO_TCP || cfg.listen_v4_port == 0 {
        return REFUSE;
    }

    // SAFETY: the context pointer is valid for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut c_void) };
    let record = OriginRecord {
        dst_addr: dst,
        dst_port: port as u32,
        tgid,
        // SAFETY: helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        agent_cgroup_id: agent_cgroup(),
        uid: bpf_get_current_uid_gid() as u32,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        peer: PeerKey::default(),
    };
    if BY_COOKIE.insert(&cookie, &record, 0).is_err() {
        return REFUSE;
    }

    if !v6 {
        // SAFETY: `user_ip4` is writable in connect4.
        write_u32(unsafe { addr_of_mut!((*sa).user_ip4) }, cfg.listen_v4_addr);
        set_port(sa, cfg.listen_v4_port);
    } else if is_v4_mapped(&dst) || cfg.flags & CONFIG_HAS_V6_LISTENER == 0 {
        // v4-mapped (and, without an IPv6 listener, plain IPv6) go to the IPv4 listener through
        // its v4-mapped address; a V6ONLY socket then fails to connect, which is fail closed.
        write_ip6(sa, &v4_mapped(cfg.listen_v4_addr));
        set_port(sa, cfg.listen_v4_port);
    } else {
        write_ip6(sa, &cfg.listen_v6_addr);
        set_port(sa, cfg.listen_v6_port);
    }
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn pc_connect4(ctx: SockAddrContext) -> i32 {
    connect(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn pc_connect6(ctx: SockAddrContext) -> i32 {
    connect(&ctx, true)
}

/// UDP cannot be proxied: a datagram to a protected destination is refused.
// Inlined so `v6` is a constant in each program: the verifier rejects context accesses
// at offsets computed at run time.
#[inline(always)]
fn sendmsg(ctx: &SockAddrContext, v6: bool) -> i32 {
    let (dst, port) = destination(ctx.sock_addr, v6);
    if target_action(&dst, port).is_none() {
        return ALLOW;
    }
    match CONFIG.get(0) {
        Some(cfg) if cfg.gateway_tgid != 0 && current_tgid() == cfg.gateway_tgid => ALLOW,
        _ => REFUSE,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn pc_sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn pc_sendmsg6(ctx: SockAddrContext) -> i32 {
    sendmsg(&ctx, true)
}

/// Reports the original destination as the peer of a redirected socket. The current peer must
/// be a gateway listener: a socket that was later re-connected elsewhere keeps its real peer.
// Inlined so `v6` is a constant in each program: the verifier rejects context accesses
// at offsets computed at run time.
#[inline(always)]
fn getpeername(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut c_void) };
    // SAFETY: LRU hash values stay valid while this program runs (RCU); the record is copied.
    let Some(rec) = (unsafe { BY_COOKIE.get(&cookie) }) else {
        return ALLOW;
    };
    let rec = *rec;
    let Some(cfg) = CONFIG.get(0) else {
        return ALLOW;
    };
    let (peer, port) = destination(sa, v6);
    let port = port as u32;
    let at_v4_listener = peer == v4_mapped(cfg.listen_v4_addr) && port == cfg.listen_v4_port;
    let at_v6_listener = peer == cfg.listen_v6_addr && port == cfg.listen_v6_port;
    if !at_v4_listener && !at_v6_listener {
        return ALLOW;
    }
    if v6 {
        write_ip6(sa, &rec.dst_addr);
    } else {
        // SAFETY: `user_ip4` is writable in getpeername4.
        write_u32(unsafe { addr_of_mut!((*sa).user_ip4) }, rec.dst_addr[3]);
    }
    set_port(sa, rec.dst_port);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn pc_getpeername4(ctx: SockAddrContext) -> i32 {
    getpeername(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn pc_getpeername6(ctx: SockAddrContext) -> i32 {
    getpeername(&ctx, true)
}

/// At the TCP connect callback the source port is bound: file the record under the agent
/// socket's local address, which the gateway sees as the accepted connection's peer.
#[sock_ops]
pub fn pc_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    // SAFETY: the context pointer is valid for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    let Some(rec) = BY_COOKIE.get_ptr_mut(&cookie) else {
        return 1;
    };
    let ops = ctx.ops;
    // Both forms are read, volatile, and the value chosen afterwards: left to itself the
    // compiler selects between the two field offsets, which the verifier rejects.
    // SAFETY: `ops` is the program's context; these fields are readable in sock_ops.
    let (family, ip4, ip6, port) = unsafe {
        let ip6 = addr_of!((*ops).local_ip6) as *const u32;
        (
            read_u32(addr_of!((*ops).family)),
            read_u32(addr_of!((*ops).local_ip4)),
            [
                read_u32(ip6),
                read_u32(ip6.add(1)),
                read_u32(ip6.add(2)),
                read_u32(ip6.add(3)),
            ],
            read_u32(addr_of!((*ops).local_port)),
        )
    };
    let peer = PeerKey {
        addr: if family == AF_INET {
            v4_mapped(ip4)
        } else {
            ip6
        },
        port,
    };
    // SAFETY: `rec` points to this socket's own record; only this socket's hooks write it, and
    // they run one at a time under the socket lock.
    unsafe { (*rec).peer = peer };
    // SAFETY: as above; copied out for the insert.
    let record = unsafe { *rec };
    let _ = BY_PEER.insert(&peer, &record, 0);
    1
}

/// The agent closed the socket: drop both records (no-ops if the gateway already consumed one).
#[cgroup_sock(sock_release)]
pub fn pc_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the context pointer is valid for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock as *mut c_void) };
    let Some(rec) = BY_COOKIE.get_ptr(&cookie) else {
        return 1;
    };
    // SAFETY: the record of this socket, copied before it is deleted.
    let peer = unsafe { (*rec).peer };
    let _ = BY_COOKIE.remove(&cookie);
    if peer.port != 0 {
        let _ = BY_PEER.remove(&peer);
    }
    1
}
