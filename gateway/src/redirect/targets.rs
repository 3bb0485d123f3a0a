//! Protected targets → LPM trie entries.
//!
//! Why an LPM trie keyed by (port, address): one lookup in the programs answers exact
//! addresses and CIDRs alike, for IPv4, IPv6 and v4-mapped (IPv4 is stored v4-mapped), where a
//! hash map would need one probe per configured prefix length. The port comes first in the key
//! so every entry pins an exact port.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use aya::maps::MapData;
use aya::maps::lpm_trie::{Key, LpmTrie};
use portcullis_common::{TARGET_PORT_BITS, TargetAction, TargetKey, V4_MAPPED_PREFIX_BITS};

use super::ProtectedTarget;

/// Replaces the trie's content with `targets`, touching only entries that change.
pub(super) fn write(
    map: &mut LpmTrie<MapData, TargetKey, u32>,
    targets: &[ProtectedTarget],
) -> Result<()> {
    let wanted = entries(targets, &local_addresses());
    let existing: Vec<Key<TargetKey>> = map.keys().filter_map(|k| k.ok()).collect();
    for key in existing {
        let current = (key.prefix_len(), key.data());
        if !wanted.contains_key(&current) {
            map.remove(&key)
                .context("cannot remove a protected target")?;
        }
    }
    for ((prefix_len, data), action) in wanted {
        map.insert(&Key::new(prefix_len, data), action as u32, 0)
            .context("cannot write a protected target (more than the map holds?)")?;
    }
    Ok(())
}

type Entry = (u32, TargetKey);

/// Every trie entry for `targets`: `Redirect` for the targets themselves, and `Deny` for the
/// other local addresses on the port of a target that is itself local (127.0.0.2 and
/// 127.0.0.3, or the host's own interface address, all reach the same server).
fn entries(targets: &[ProtectedTarget], local: &[IpAddr]) -> HashMap<Entry, TargetAction> {
    let mut out = HashMap::new();
    for t in targets {
        if !is_local(t.net, local) {
            continue;
        }
        let aliases = [
            (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8),
            (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 32),
            (IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
            (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 128),
        ];
        let host_addrs = local.iter().map(|ip| (*ip, full_prefix(*ip)));
        for (ip, prefix) in aliases.into_iter().chain(host_addrs) {
            out.insert(entry(ip, prefix, t.port), TargetAction::Deny);
        }
    }
    // Inserted last so a target wins over an alias with the same key.
    for t in targets {
        out.insert(entry(t.net, t.prefix_len, t.port), TargetAction::Redirect);
    }
    out
}

fn full_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn is_local(ip: IpAddr, local: &[IpAddr]) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback() || ip.is_unspecified() || local.contains(&ip)
}

fn entry(net: IpAddr, prefix_len: u8, port: u16) -> Entry {
    let (addr, prefix) = match net.to_canonical() {
        IpAddr::V4(v4) => (
            v4.to_ipv6_mapped().octets(),
            V4_MAPPED_PREFIX_BITS + u32::from(prefix_len.min(32)),
        ),
        IpAddr::V6(v6) => (v6.octets(), u32::from(prefix_len.min(128))),
    };
    (
        TARGET_PORT_BITS + prefix,
        TargetKey {
            port_be: port.to_be_bytes(),
            addr: mask(addr, prefix),
        },
    )
}

/// Clears the bits past `prefix` so equal networks make equal keys.
fn mask(mut addr: [u8; 16], prefix: u32) -> [u8; 16] {
    for (i, byte) in addr.iter_mut().enumerate() {
        let start = i as u32 * 8;
        if start >= prefix {
            *byte = 0;
        } else if prefix - start < 8 {
            *byte &= 0xffu8 << (8 - (prefix - start));
        }
    }
    addr
}

/// This host's interface addresses (getifaddrs), IPv4 and IPv6.
fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: `ifa_addr` points to a sockaddr whose family says which struct it is.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    // SAFETY: family AF_INET means a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.push(IpAddr::V4(Ipv4Addr::from(
                        sin.sin_addr.s_addr.to_ne_bytes(),
                    )));
                }
                libc::AF_INET6 => {
                    // SAFETY: family AF_INET6 means a sockaddr_in6.
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(s: &str, prefix_len: u8, port: u16) -> ProtectedTarget {
        ProtectedTarget {
            net: s.parse().unwrap(),
            prefix_len,
            port,
        }
    }

    #[test]
    fn ipv4_targets_are_keyed_v4_mapped_after_the_port() {
        let (prefix, key) = entry("10.1.2.3".parse().unwrap(), 16, 5432);
        assert_eq!(prefix, 16 + 96 + 16);
        assert_eq!(key.port_be, 5432u16.to_be_bytes());
        assert_eq!(
            key.addr,
            "::ffff:10.1.0.0".parse::<Ipv6Addr>().unwrap().octets()
        );
        // A v4-mapped IPv6 target is the same entry as its IPv4 form.
        assert_eq!(
            entry("::ffff:10.1.2.3".parse().unwrap(), 16, 5432),
            entry("10.1.2.3".parse().unwrap(), 16, 5432)
        );
    }

    #[test]
    fn masks_partial_bytes() {
        let a = "2001:db8:ffff::1".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(
            mask(a, 36),
            "2001:db8:f000::".parse::<Ipv6Addr>().unwrap().octets()
        );
    }

    #[test]
    fn a_remote_target_gets_only_its_own_entry() {
        let e = entries(&[target("10.0.0.5", 32, 5432)], &[]);
        assert_eq!(e.len(), 1);
        assert_eq!(
            e.get(&entry("10.0.0.5".parse().unwrap(), 32, 5432)),
            Some(&TargetAction::Redirect)
        );
    }

    #[test]
    fn a_local_target_denies_the_other_local_addresses_on_its_port() {
        let host: IpAddr = "192.0.2.10".parse().unwrap();
        let e = entries(&[target("127.0.0.2", 32, 5432)], &[host]);
        let deny = |ip: &str, p: u8| e.get(&entry(ip.parse().unwrap(), p, 5432)).copied();
        assert_eq!(deny("127.0.0.2", 32), Some(TargetAction::Redirect));
        assert_eq!(deny("127.0.0.0", 8), Some(TargetAction::Deny));
        assert_eq!(deny("::1", 128), Some(TargetAction::Deny));
        assert_eq!(deny("0.0.0.0", 32), Some(TargetAction::Deny));
        assert_eq!(deny("192.0.2.10", 32), Some(TargetAction::Deny));
        // Other ports are untouched.
        assert_eq!(e.get(&entry("127.0.0.0".parse().unwrap(), 8, 5433)), None);
        // The host's own address counts as local too.
        let e = entries(&[target("192.0.2.10", 32, 5432)], &[host]);
        assert_eq!(
            e.get(&entry("127.0.0.0".parse().unwrap(), 8, 5432)),
            Some(&TargetAction::Deny)
        );
    }

    #[test]
    fn a_target_wins_over_an_alias_with_the_same_key() {
        let e = entries(&[target("127.0.0.0", 8, 5432)], &[]);
        assert_eq!(
            e.get(&entry("127.0.0.0".parse().unwrap(), 8, 5432)),
            Some(&TargetAction::Redirect)
        );
    }
}
