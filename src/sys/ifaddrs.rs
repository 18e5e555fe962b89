//! The host's interface addresses (`getifaddrs(3)`), read once at start: the relay's own addresses that
//! peers must not reach, and the addresses a wildcard listener serves.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Listen addresses with every wildcard (`0.0.0.0:p`, `[::]:p`) replaced by one address per interface
/// address of its family (`ifaddrs`, as [`interface_addrs`] lists them), same port, in order and
/// without duplicates. IPv6 link-local addresses are left out (they need a scope id to bind).
///
/// These are the listeners a client can send to (one id each, the local address of its 5-tuple). TCP
/// and TLS bind one socket per address; UDP binds one socket per wildcard and tells them apart per
/// datagram with pktinfo (`dataplane::ListenerMap`). Addresses added to the host later are not served
/// until a restart (a UDP datagram to one is dropped and counted as `unknown_local`).
pub fn expand_wildcards(listen: &[SocketAddr], ifaddrs: &[IpAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::with_capacity(listen.len());
    for a in listen {
        let ips: Vec<IpAddr> = if a.ip().is_unspecified() {
            ifaddrs
                .iter()
                .copied()
                .filter(|ip| ip.is_ipv4() == a.is_ipv4() && !ip.is_unspecified())
                .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80))
                .collect()
        } else {
            vec![a.ip()]
        };
        for ip in ips {
            let addr = SocketAddr::new(ip, a.port());
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    out
}

/// Every IPv4 and IPv6 address configured on the host's interfaces (the addresses themselves, not the
/// ranges routed to them), without duplicates.
pub fn interface_addrs() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; on success getifaddrs stores a list that we free below.
    super::syscall!(getifaddrs(&mut head))?;
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, which stays valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        let sa = ifa.ifa_addr;
        if sa.is_null() {
            continue;
        }
        // SAFETY: a non-null `ifa_addr` points to a sockaddr at least as large as its family requires:
        // sockaddr_in for AF_INET and sockaddr_in6 for AF_INET6 (getifaddrs(3)); other families are
        // skipped without reading past the common header.
        let ip = unsafe {
            match i32::from((*sa).sa_family) {
                libc::AF_INET => {
                    let sin = &*sa.cast::<libc::sockaddr_in>();
                    Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                        sin.sin_addr.s_addr,
                    ))))
                }
                libc::AF_INET6 => {
                    let sin6 = &*sa.cast::<libc::sockaddr_in6>();
                    Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                }
                _ => None,
            }
        };
        if let Some(ip) = ip {
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed exactly once; no reference into the
    // list outlives this point (the addresses were copied out).
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_expand_to_the_interface_addresses_of_their_family() {
        let ifs: Vec<IpAddr> = ["127.0.0.1", "198.18.0.2", "::1", "fe80::1", "2001:db8::2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            expand_wildcards(&[sa("0.0.0.0:3478"), sa("198.18.0.2:3478")], &ifs),
            [sa("127.0.0.1:3478"), sa("198.18.0.2:3478")]
        );
        assert_eq!(
            expand_wildcards(&[sa("[::]:3479")], &ifs),
            [sa("[::1]:3479"), sa("[2001:db8::2]:3479")]
        );
        assert_eq!(
            expand_wildcards(&[sa("192.0.2.1:1"), sa("0.0.0.0:2")], &[]),
            [sa("192.0.2.1:1")]
        );
    }

    #[test]
    fn loopback_is_listed() {
        let addrs = interface_addrs().unwrap();
        assert!(
            addrs.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{addrs:?}"
        );
    }
}
