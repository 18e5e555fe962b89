//! Peer address policy: which peer transport addresses a TURN allocation may relay to.
//!
//! RFC 8656 §10.2 and §12.2 let a server refuse any XOR-PEER-ADDRESS (403 Forbidden for
//! CreatePermission and ChannelBind; a Send indication is silently discarded, §11.2), and
//! §21.2.2 lets a server restrict the peers it relays to, as a firewall blocklist does. This
//! module is that blocklist. It exists because of CVE-2020-26262, where coturn refused `127.0.0.1` and
//! `::1` but relayed to `0.0.0.0` and `[::]`, which the kernel delivers to loopback. The rule
//! taken from it: judge canonical numeric values, and judge every encoding of an address.
//!
//! The module is pure std: no IO, no clock, no allocation in [`PeerPolicy::check`]. Checking
//! "another allocation's relayed address on this relay" is the caller's job and happens first.
//!
//! # How a peer is judged
//!
//! 1. Port 0 is never a destination: [`Denied::PortZero`].
//! 2. The address is canonicalised: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
//!    RFC 4291 §2.5.5.2) *is* the IPv4 address `a.b.c.d`. A dual-stack socket sends to it
//!    over IPv4, so it is judged as that IPv4 address everywhere: built-in table, allow and
//!    deny lists, service ports. Configured CIDRs inside `::ffff:0:0/96` are canonicalised the
//!    same way, so `::ffff:127.0.0.0/104` and `127.0.0.0/8` are the same entry.
//! 3. A NAT64 (`64:ff9b::/96`, RFC 6052 §2.1), 6to4 (`2002::/16`, RFC 3056 §2), Teredo
//!    (`2001::/32`, RFC 4380 §4: server and client) or IPv4-compatible (`::/96`) address has
//!    several forms: the IPv6 address itself and the IPv4 addresses embedded in it, which is
//!    where a translator or tunnel will deliver the packet. Each step below looks at every form.
//! 4. The relay's own service sockets: [`Denied::ServicePort`], whatever the CIDR lists say.
//! 5. Configured deny list, if any form matches: [`Denied::Configured`].
//! 6. Every form is judged against the built-in table on its own: a form in it is
//!    [`Denied::Builtin`] with the range's name, unless the allow list names *that form*. So
//!    `allow = ["64:ff9b::/96"]` opens the NAT64 prefix for public IPv4 addresses, but
//!    `64:ff9b::a00:1` stays denied until `10.0.0.0/8` itself is allowed too.
//! 7. Otherwise allowed.
//!
//! So precedence is: port 0 and service ports > deny > allow (per form) > built-in table.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// An IPv4 or IPv6 CIDR block, such as `10.0.0.0/8` or `::1/128`.
///
/// Host bits beyond the prefix are masked off on construction, as `ip route` and most
/// firewalls do: `10.1.2.3/8` is stored and displayed as `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address, host bits already zero.
    addr: IpAddr,
    prefix: u8,
}

/// A CIDR that could not be built or parsed. The message says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrError(String);

/// Why a peer is refused. `Copy` and allocation-free, for counting on the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// In the built-in table; the name of the range, e.g. `"loopback"` or `"rfc1918"`.
    Builtin(&'static str),
    /// In the operator's deny list.
    Configured,
    /// One of the relay's own service sockets (listener, HTTP API, metrics).
    ServicePort,
    /// Port 0, which is never a valid destination.
    PortZero,
    /// One of the relay's own addresses ([`OwnAddresses`]): not another allocation's live relayed
    /// address, and not opened by an explicit allow (or in the relay port range, which no allow opens).
    OwnAddress,
}

/// Decides whether a peer transport address may be relayed to.
///
/// Build it once at start-up and share it; [`check`](Self::check) takes `&self`.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    /// Canonical CIDRs (see the module doc) that skip the built-in table.
    allow: Vec<Cidr>,
    /// Canonical CIDRs that are always refused.
    deny: Vec<Cidr>,
    /// Canonical service addresses; an unspecified IP matches every address.
    services: Vec<(IpAddr, u16)>,
}

impl Cidr {
    /// Builds a CIDR block. `prefix` may be at most 32 for IPv4 and 128 for IPv6.
    /// Host bits of `addr` beyond the prefix are masked off.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, CidrError> {
        let (max, family) = match addr {
            IpAddr::V4(_) => (32, "IPv4"),
            IpAddr::V6(_) => (128, "IPv6"),
        };
        if prefix > max {
            return Err(CidrError(format!(
                "prefix length {prefix} exceeds {max} for {family}"
            )));
        }
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask_v4(prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask_v6(prefix))),
        };
        Ok(Cidr { addr, prefix })
    }

    /// The network address (host bits zero).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is inside this block. An IPv4 block never contains an IPv6 address and
    /// vice versa, including `::ffff:a.b.c.d`; [`PeerPolicy`] canonicalises before asking.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => in_v4(u32::from(ip), u32::from(net), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                in_v6(u128::from(ip), u128::from(net), self.prefix)
            }
            _ => false,
        }
    }
}

/// Parses `addr/prefix` or a bare address, which is a host route (`/32` or `/128`).
/// The prefix is plain decimal digits; no sign, no whitespace, no zone index.
impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(CidrError("empty CIDR".to_owned()));
        }
        let invalid = |why: String| CidrError(format!("invalid CIDR {s:?}: {why}"));
        let (addr_part, prefix_part) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_part
            .parse()
            .map_err(|_| invalid(format!("{addr_part:?} is not an IPv4 or IPv6 address")))?;
        let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_part {
            None => max,
            Some("") => return Err(invalid("missing prefix length after '/'".to_owned())),
            Some(p) if !p.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(invalid(format!(
                    "prefix length {p:?} is not a decimal number"
                )))
            }
            // All digits, so the only way `u8` parsing fails is overflow: report it as the
            // out-of-range value it is.
            Some(p) => p.parse::<u8>().map_err(|_| {
                let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
                invalid(format!("prefix length {p} exceeds {max} for {family}"))
            })?,
        };
        Cidr::new(addr, prefix).map_err(|e| invalid(e.0))
    }
}

/// Always `addr/prefix`, in the form [`FromStr`] reads back to the same value.
impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CidrError {}

impl Denied {
    /// A short stable name, suitable as a metrics label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Denied::Builtin(name) => name,
            Denied::Configured => "configured",
            Denied::ServicePort => "service-port",
            Denied::PortZero => "port-zero",
            Denied::OwnAddress => "own-address",
        }
    }
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for Denied {}

impl PeerPolicy {
    /// The built-in deny table only: no allow or deny entries, no service ports.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds ranges that skip the built-in table, e.g. `127.0.0.0/8` and `::1/128` for tests,
    /// or an internal media network. An explicit deny still wins over allow. Allowing
    /// `127.0.0.0/8` also allows `::ffff:127.0.0.1` and `64:ff9b::7f00:1`, since those are
    /// judged by their embedded IPv4 address.
    pub fn with_allow(mut self, cidrs: Vec<Cidr>) -> Self {
        self.allow.extend(cidrs.into_iter().map(canonical_cidr));
        self
    }

    /// Adds ranges that are always refused, whatever the allow list says.
    pub fn with_deny(mut self, cidrs: Vec<Cidr>) -> Self {
        self.deny.extend(cidrs.into_iter().map(canonical_cidr));
        self
    }

    /// Adds the relay's own service sockets (listeners, HTTP API, metrics). A peer at exactly
    /// that IP and port is refused even if a CIDR allows it. An unspecified IP (`0.0.0.0` or
    /// `::`) means that port on every address of either family, since the policy cannot know
    /// all of the host's addresses.
    pub fn with_service_ports(mut self, addrs: Vec<SocketAddr>) -> Self {
        self.services
            .extend(addrs.into_iter().map(|a| (canonical(a.ip()), a.port())));
        self
    }

    /// Decides for a peer transport address. See the module doc for the order of the rules.
    pub fn check(&self, peer: SocketAddr) -> Result<(), Denied> {
        let port = peer.port();
        if port == 0 {
            return Err(Denied::PortZero);
        }
        let ip = canonical(peer.ip());
        let embedded = match ip {
            IpAddr::V4(_) => [None; 2],
            IpAddr::V6(v6) => classify_v6(v6).1,
        };
        let embedded = embedded.map(|e| e.map(IpAddr::V4));
        let forms = || core::iter::once(ip).chain(embedded.into_iter().flatten());

        if self
            .services
            .iter()
            .any(|&(s, p)| p == port && (s.is_unspecified() || forms().any(|f| f == s)))
        {
            return Err(Denied::ServicePort);
        }
        self.check_ip(ip)
    }

    /// Decides for a peer IP whatever its port: the `deny` and `allow` lists and the built-in table
    /// (rules 1 to 3 and 5 to 6 of the module doc; not the port rules). A permission is for an IP, so a
    /// reload re-checks existing permissions with this.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Denied> {
        let ip = canonical(ip);
        let (own, embedded) = match ip {
            IpAddr::V4(v4) => (builtin_v4(v4), [None; 2]),
            IpAddr::V6(v6) => classify_v6(v6),
        };
        let embedded = embedded.map(|e| e.map(IpAddr::V4));
        let forms = || core::iter::once(ip).chain(embedded.into_iter().flatten());
        let listed = |list: &[Cidr], form: IpAddr| list.iter().any(|c| c.contains(form));
        if forms().any(|f| listed(&self.deny, f)) {
            return Err(Denied::Configured);
        }
        // Each form is judged on its own: an allow entry opens only the form it names. Allowing
        // `64:ff9b::/96` opens the NAT64 prefix, not the private IPv4 addresses embedded in it.
        if let Some(name) = own.filter(|_| !listed(&self.allow, ip)) {
            return Err(Denied::Builtin(name));
        }
        for e in embedded.into_iter().flatten() {
            let IpAddr::V4(v4) = e else { continue };
            if let Some(name) = builtin_v4(v4).filter(|_| !listed(&self.allow, e)) {
                return Err(Denied::Builtin(name));
            }
        }
        Ok(())
    }
}

/// The relay's own addresses as peers (design §3): relay IPs, listen IPs, public addresses and the
/// addresses on the host's interfaces. Like loopback they are denied by default, because services bound
/// to `0.0.0.0` answer on them (CVE-2020-26262 class). An explicit `allow` may open such an IP, but never
/// its service ports (listeners, HTTP API, metrics) nor the relay port range. The one exception is
/// relay to relay: another allocation's *exact* live relayed transport address (IP and port) stays
/// allowed, so that two relayed clients on one server can talk.
///
/// Which relayed addresses are live is a bitmap per relay IP over the relay port range: the control
/// thread sets a bit when a relay socket is bound and clears it when the socket closes; every worker
/// reads it per packet. Lookups take no lock and allocate nothing: a scan of the (few) own IPs and one
/// relaxed atomic load.
#[derive(Debug, Default)]
pub struct OwnAddresses {
    own: Vec<OwnIp>,
    relay_ports: Option<RangeInclusive<u16>>,
    /// Canonical service addresses (from the policy); an unspecified IP matches every own address.
    services: Vec<(IpAddr, u16)>,
    /// 1:1 NAT (`relay.external`): (private relay IP the sockets bind, public IP clients see), both
    /// canonical. Empty on most hosts, so the translations below cost one length check per packet.
    external: Vec<(IpAddr, IpAddr)>,
}

#[derive(Debug)]
struct OwnIp {
    ip: IpAddr,
    /// An explicit allow (and no deny) covers it; a reload may change it ([`OwnAddresses::set_allows`]).
    allowed: AtomicBool,
    /// One bit per port of the relay range: a relay socket is bound there. Empty if no relay IP.
    live: Box<[AtomicU64]>,
}

impl OwnAddresses {
    /// The own addresses `ips` (duplicates and unspecified addresses are ignored), of which `relay_ips`
    /// hold relay sockets in `relay_ports`. Service ports and explicit allows come from `policy`.
    pub fn new(
        policy: &PeerPolicy,
        ips: impl IntoIterator<Item = IpAddr>,
        relay_ips: &[IpAddr],
        relay_ports: RangeInclusive<u16>,
    ) -> Self {
        let words = (usize::from(*relay_ports.end()) + 1)
            .saturating_sub(usize::from(*relay_ports.start()))
            .div_ceil(64);
        let mut own: Vec<OwnIp> = Vec::new();
        for ip in relay_ips.iter().copied().chain(ips).map(canonical) {
            if ip.is_unspecified() || own.iter().any(|o| o.ip == ip) {
                continue;
            }
            let relay = relay_ips.iter().any(|r| canonical(*r) == ip);
            let listed = |list: &[Cidr]| list.iter().any(|c| c.contains(ip));
            own.push(OwnIp {
                ip,
                allowed: AtomicBool::new(listed(&policy.allow) && !listed(&policy.deny)),
                live: (0..if relay { words } else { 0 })
                    .map(|_| AtomicU64::new(0))
                    .collect(),
            });
        }
        OwnAddresses {
            own,
            relay_ports: Some(relay_ports),
            services: policy.services.clone(),
            external: Vec::new(),
        }
    }

    /// Behind 1:1 NAT (`relay.external`): each `(private, public)` pair maps a relay IP that the
    /// sockets bind to the public IP that clients see. Both are own addresses; a public one is judged
    /// as its private one (live relayed ports, service ports, allows), so that a peer naming another
    /// allocation's *public* relayed address gets the relay-to-relay exemption. A pair whose private
    /// side is not a relay IP is ignored (validation refuses it). An explicit allow in `policy` that
    /// covers either IP of a pair opens both (never their service ports or relay port range).
    pub fn with_external(mut self, policy: &PeerPolicy, pairs: &[(IpAddr, IpAddr)]) -> Self {
        for &(private, public) in pairs {
            let (private, public) = (canonical(private), canonical(public));
            if !self
                .own
                .iter()
                .any(|o| o.ip == private && !o.live.is_empty())
            {
                continue;
            }
            if self
                .external
                .iter()
                .any(|e| e.0 == private || e.1 == public)
            {
                continue;
            }
            self.external.push((private, public));
            if !self.own.iter().any(|o| o.ip == public) {
                self.own.push(OwnIp {
                    ip: public,
                    allowed: AtomicBool::new(false),
                    live: Box::new([]),
                });
            }
        }
        self.set_allows(policy);
        self
    }

    /// Where a datagram to `peer` really goes: a peer on one of our public (1:1 NAT) IPs is sent to
    /// the private IP behind it, so that relay to relay stays on the host and needs no NAT hairpin.
    /// Every other address is returned as it is. Allocation-free: safe per packet.
    #[inline]
    pub fn bound(&self, peer: SocketAddr) -> SocketAddr {
        if self.external.is_empty() {
            return peer;
        }
        let ip = canonical(peer.ip());
        match self.external.iter().find(|e| e.1 == ip) {
            Some(&(private, _)) => SocketAddr::new(private, peer.port()),
            None => peer,
        }
    }

    /// How clients see the relay address `addr`: a private (1:1 NAT) relay IP becomes its public IP.
    /// Used for XOR-RELAYED-ADDRESS, and for the source of a datagram that another of our relay
    /// sockets sent (see [`Self::bound`]), so that it matches the permission its receiver installed
    /// for our public relayed address. Every other address is returned as it is. Allocation-free.
    #[inline]
    pub fn advertised(&self, addr: SocketAddr) -> SocketAddr {
        if self.external.is_empty() {
            return addr;
        }
        let ip = canonical(addr.ip());
        match self.external.iter().find(|e| e.0 == ip) {
            Some(&(_, public)) => SocketAddr::new(public, addr.port()),
            None => addr,
        }
    }

    /// Take over the explicit allows of `policy` (a reload): an own IP is open where an `allow` and no
    /// `deny` covers it. The IPs, service ports and live flags stay as they are. Workers see the change
    /// at their next packet.
    pub fn set_allows(&self, policy: &PeerPolicy) {
        for o in &self.own {
            let listed = |list: &[Cidr]| list.iter().any(|c| c.contains(o.ip));
            o.allowed.store(
                listed(&policy.allow) && !listed(&policy.deny),
                Ordering::Release,
            );
        }
    }

    /// How many relayed transport addresses are marked live ([`Self::set_live`]).
    pub fn live_count(&self) -> usize {
        self.own
            .iter()
            .flat_map(|o| o.live.iter())
            .map(|w| w.load(Ordering::Acquire).count_ones() as usize)
            .sum()
    }

    /// Whether `ip` is one of the relay's own addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.own.iter().any(|o| o.ip == ip)
    }

    /// Mark the relayed transport address `addr` live (a relay socket is bound there) or not. Called by
    /// the control thread only; an address outside the relay IPs and ports is ignored.
    pub fn set_live(&self, addr: SocketAddr, live: bool) {
        let Some((word, bit)) = self.bit(addr) else {
            return;
        };
        if live {
            word.fetch_or(bit, Ordering::Release);
        } else {
            word.fetch_and(!bit, Ordering::Release);
        }
    }

    /// The verdict for a peer on one of the relay's own IPs, `None` if `peer` is not on one (then the
    /// [`PeerPolicy`] decides). Allocation-free and lock-free: safe per packet.
    #[inline]
    pub fn check(&self, peer: SocketAddr) -> Option<Result<(), Denied>> {
        // A public (1:1 NAT) IP is judged as the private one behind it.
        let (named, peer) = (peer, self.bound(peer));
        let ip = canonical(peer.ip());
        let Some(own) = self.own.iter().find(|o| o.ip == ip) else {
            // A NAT64, 6to4, Teredo or IPv4-compatible encoding of an own IPv4 address reaches it through a translator: refused,
            // whatever the port (the relay-to-relay exemption is for exact addresses only).
            let embedded = match ip {
                IpAddr::V6(v6) => classify_v6(v6).1,
                IpAddr::V4(_) => [None; 2],
            };
            let own = embedded
                .iter()
                .flatten()
                .any(|v4| self.own.iter().any(|o| o.ip == IpAddr::V4(*v4)));
            return own.then_some(Err(Denied::OwnAddress));
        };
        let port = peer.port();
        if self.relay_ports.as_ref().is_some_and(|r| r.contains(&port)) {
            let live = self
                .bit(SocketAddr::new(ip, port))
                .is_some_and(|(word, bit)| word.load(Ordering::Acquire) & bit != 0);
            return Some(if live {
                Ok(())
            } else {
                Err(Denied::OwnAddress)
            });
        }
        if port == 0 {
            return Some(Err(Denied::PortZero));
        }
        if self
            .services
            .iter()
            .any(|&(s, p)| p == port && (s.is_unspecified() || s == ip))
        {
            return Some(Err(Denied::ServicePort));
        }
        let allowed =
            own.allowed.load(Ordering::Acquire) || (named != peer && self.public_allowed(ip));
        Some(if allowed {
            Ok(())
        } else {
            Err(Denied::OwnAddress)
        })
    }

    /// Whether an explicit allow covers the public IP paired with the private relay IP `private`.
    fn public_allowed(&self, private: IpAddr) -> bool {
        self.external.iter().filter(|e| e.0 == private).any(|e| {
            self.own
                .iter()
                .any(|o| o.ip == e.1 && o.allowed.load(Ordering::Acquire))
        })
    }

    /// The word and bit of a relayed address's live flag.
    fn bit(&self, addr: SocketAddr) -> Option<(&AtomicU64, u64)> {
        let ip = canonical(addr.ip());
        let range = self.relay_ports.as_ref()?;
        if !range.contains(&addr.port()) {
            return None;
        }
        let i = usize::from(addr.port() - range.start());
        let own = self.own.iter().find(|o| o.ip == ip)?;
        Some((own.live.get(i / 64)?, 1u64 << (i % 64)))
    }
}

/// Built-in IPv4 deny table: (network, prefix, name). First match names the range, so the
/// broadcast host comes before the reserved block that contains it.
const V4_DENY: &[(u32, u8, &str)] = &[
    // RFC 1122 §3.2.1.3, RFC 6890: "this host on this network"; 0.0.0.0 is the
    // CVE-2020-26262 bypass, since the kernel delivers it to loopback.
    (v4(0, 0, 0, 0), 8, "this-network"),
    (v4(10, 0, 0, 0), 8, "rfc1918"),            // RFC 1918 §3
    (v4(100, 64, 0, 0), 10, "cgnat"),           // RFC 6598
    (v4(127, 0, 0, 0), 8, "loopback"),          // RFC 1122 §3.2.1.3
    (v4(169, 254, 0, 0), 16, "link-local"),     // RFC 3927; includes 169.254.169.254 metadata
    (v4(172, 16, 0, 0), 12, "rfc1918"),         // RFC 1918 §3
    (v4(192, 0, 0, 0), 24, "ietf-protocol"),    // RFC 6890 §2.2.2
    (v4(192, 0, 2, 0), 24, "documentation"),    // RFC 5737 §3 TEST-NET-1
    (v4(192, 88, 99, 0), 24, "6to4-relay"),     // RFC 7526, deprecated anycast
    (v4(192, 168, 0, 0), 16, "rfc1918"),        // RFC 1918 §3
    (v4(198, 18, 0, 0), 15, "benchmarking"),    // RFC 2544, RFC 6890
    (v4(198, 51, 100, 0), 24, "documentation"), // RFC 5737 §3 TEST-NET-2
    (v4(203, 0, 113, 0), 24, "documentation"),  // RFC 5737 §3 TEST-NET-3
    (v4(224, 0, 0, 0), 4, "multicast"),         // RFC 5771
    (v4(255, 255, 255, 255), 32, "broadcast"),  // RFC 919, limited broadcast
    (v4(240, 0, 0, 0), 4, "reserved"),          // RFC 1112 §4
];

/// Built-in IPv6 deny table, checked after canonicalisation, so `::ffff:0:0/96` never gets
/// here. More specific entries come before the blocks that contain them.
const V6_DENY: &[(u128, u8, &str)] = &[
    (v6([0, 0, 0, 0, 0, 0, 0, 0]), 128, "unspecified"), // RFC 4291 §2.5.2
    // RFC 4291 §2.5.3. Named here, before the IPv4-compatible block, so that `::1` is
    // loopback and never read as the IPv4 address 0.0.0.1.
    (v6([0, 0, 0, 0, 0, 0, 0, 1]), 128, "loopback"),
    // RFC 4291 §2.5.5.1, deprecated; no stack should send to it, so deny it outright.
    (v6([0, 0, 0, 0, 0, 0, 0, 0]), 96, "ipv4-compatible"),
    // RFC 8215: the IPv4 address sits at a position that depends on the operator's NAT64
    // prefix length (RFC 6052 §2.2: /48 to /96), which we cannot know. Reading it as /96
    // would misjudge e.g. 10.1.2.3 under a /64 prefix as 3.0.0.0, so deny the whole block;
    // operators with a local NAT64 can allow their prefix explicitly.
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0]), 48, "nat64-local"),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0]), 64, "discard"), // RFC 6666
    // RFC 4380 §4: Teredo tunnels to an arbitrary (obfuscated) IPv4 address; RFC 8656 §21.4
    // describes the amplification loop a tunnel endpoint enables. Deny it outright.
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0]), 32, "teredo"),
    (v6([0x2001, 2, 0, 0, 0, 0, 0, 0]), 48, "benchmarking"), // RFC 5180
    (v6([0x2001, 0x10, 0, 0, 0, 0, 0, 0]), 28, "orchid"),    // RFC 4843, deprecated
    (v6([0x2001, 0x20, 0, 0, 0, 0, 0, 0]), 28, "orchid"),    // RFC 7343 ORCHIDv2
    (v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0]), 32, "documentation"), // RFC 3849
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0]), 20, "documentation"), // RFC 9637
    (v6([0x5f00, 0, 0, 0, 0, 0, 0, 0]), 16, "srv6-sid"),     // RFC 9602
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0]), 7, "unique-local"),  // RFC 4193
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0]), 10, "link-local"),   // RFC 4291 §2.5.6
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0]), 10, "site-local"),   // RFC 3879, deprecated
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0]), 8, "multicast"),     // RFC 4291 §2.7
];

/// NAT64 well-known prefix, RFC 6052 §2.1: IPv4 address in the last 32 bits.
const NAT64_WKP: u128 = v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0]);
/// 6to4, RFC 3056 §2: `2002:V4ADDR::/48`, IPv4 address in bits 16..48.
const SIX_TO_FOUR: u128 = v6([0x2002, 0, 0, 0, 0, 0, 0, 0]);
/// Teredo, RFC 4380 §4: `2001:0::/32`.
const TEREDO: u128 = v6([0x2001, 0, 0, 0, 0, 0, 0, 0]);
/// Global unicast, RFC 4291 §2.4 and the IANA IPv6 address space registry. Everything
/// outside it that the tables above do not name is IETF-reserved and unroutable.
const GLOBAL_UNICAST: u128 = v6([0x2000, 0, 0, 0, 0, 0, 0, 0]);

/// IPv4 addresses a canonical IPv6 address carries (NAT64, 6to4, Teredo, IPv4-compatible): where a
/// translator or tunnel would deliver the packet. At most two (Teredo's server and client).
type Embedded = [Option<Ipv4Addr>; 2];

const fn v4(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_be_bytes([a, b, c, d])
}

const fn v6(segments: [u16; 8]) -> u128 {
    let mut bits = 0u128;
    let mut i = 0;
    while i < segments.len() {
        bits = (bits << 16) | segments[i] as u128;
        i += 1;
    }
    bits
}

fn mask_v4(prefix: u8) -> u32 {
    // Shifting by the full width is `None`, which is the /0 mask.
    u32::MAX
        .checked_shl(32u32.saturating_sub(u32::from(prefix)))
        .unwrap_or(0)
}

fn mask_v6(prefix: u8) -> u128 {
    u128::MAX
        .checked_shl(128u32.saturating_sub(u32::from(prefix)))
        .unwrap_or(0)
}

fn in_v4(ip: u32, net: u32, prefix: u8) -> bool {
    ip & mask_v4(prefix) == net
}

fn in_v6(ip: u128, net: u128, prefix: u8) -> bool {
    ip & mask_v6(prefix) == net
}

/// `::ffff:a.b.c.d` becomes `a.b.c.d`; everything else is unchanged. Deliberately not
/// `Ipv6Addr::to_ipv4`, which also turns `::1` into `0.0.0.1`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// A block inside `::ffff:0:0/96` becomes the IPv4 block it maps, so that it matches the
/// canonicalised peers. Wider IPv6 blocks (`::/0`) stay IPv6 and do not match IPv4 peers.
fn canonical_cidr(cidr: Cidr) -> Cidr {
    match cidr.addr {
        IpAddr::V6(v6) if cidr.prefix >= 96 => match v6.to_ipv4_mapped() {
            Some(v4) => Cidr {
                addr: IpAddr::V4(v4),
                prefix: cidr.prefix - 96,
            },
            None => cidr,
        },
        _ => cidr,
    }
}

fn builtin_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let bits = u32::from(ip);
    V4_DENY
        .iter()
        .find(|&&(net, prefix, _)| in_v4(bits, net, prefix))
        .map(|&(_, _, name)| name)
}

/// The built-in verdict on a canonical IPv6 address itself (the name of the deny range it is in), and the
/// IPv4 addresses embedded in it, each of which is judged as well.
fn classify_v6(ip: Ipv6Addr) -> (Option<&'static str>, Embedded) {
    let bits = u128::from(ip);
    // Truncating casts pick the embedded 32 bits out of the 128.
    let low = Ipv4Addr::from(bits as u32);
    let embedded: Embedded = if in_v6(bits, NAT64_WKP, 96) {
        [Some(low), None]
    } else if in_v6(bits, SIX_TO_FOUR, 16) {
        [Some(Ipv4Addr::from((bits >> 80) as u32)), None]
    } else if in_v6(bits, TEREDO, 32) {
        // RFC 4380 §4: the server's IPv4 in bits 32..64, the client's in the last 32, inverted.
        [
            Some(Ipv4Addr::from((bits >> 64) as u32)),
            Some(Ipv4Addr::from(!(bits as u32))),
        ]
    } else if in_v6(bits, 0, 96) && bits > 1 {
        // RFC 4291 §2.5.5.1 IPv4-compatible (`::` and `::1` are not: they are named below).
        [Some(low), None]
    } else {
        [None; 2]
    };
    let own = V6_DENY
        .iter()
        .find(|&&(net, prefix, _)| in_v6(bits, net, prefix))
        .map(|&(_, _, name)| name);
    let own = match own {
        Some(name) => Some(name),
        None if embedded[0].is_none() && !in_v6(bits, GLOBAL_UNICAST, 3) => Some("reserved"),
        None => None,
    };
    (own, embedded)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_reload_changes_own_allows_in_place_and_check_ip_ignores_ports() {
        let public: IpAddr = "198.51.100.9".parse().unwrap();
        let relay: IpAddr = "192.0.2.1".parse().unwrap();
        let open = PeerPolicy::new().with_allow(vec!["198.51.100.0/24".parse().unwrap()]);
        let own = OwnAddresses::new(&open, [public], &[relay], 50000..=50099);
        let at = SocketAddr::new(public, 8000);
        assert_eq!(own.check(at), Some(Ok(())));
        own.set_allows(&PeerPolicy::new());
        assert_eq!(own.check(at), Some(Err(Denied::OwnAddress)));
        own.set_allows(&open);
        assert_eq!(own.check(at), Some(Ok(())));
        // check_ip: the lists and the table, not the port rules.
        let p = PeerPolicy::new()
            .with_deny(vec!["8.8.4.0/24".parse().unwrap()])
            .with_service_ports(vec!["9.9.9.9:3478".parse().unwrap()]);
        assert_eq!(
            p.check_ip("8.8.4.4".parse().unwrap()),
            Err(Denied::Configured)
        );
        assert_eq!(p.check_ip("9.9.9.9".parse().unwrap()), Ok(()));
        assert_eq!(
            p.check("9.9.9.9:3478".parse().unwrap()),
            Err(Denied::ServicePort)
        );
        assert!(p.check_ip("127.0.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn own_addresses_live_bits_service_ports_and_encodings() {
        let relay: IpAddr = "203.0.114.10".parse().unwrap();
        let public: IpAddr = "203.0.114.20".parse().unwrap();
        let policy = PeerPolicy::new()
            .with_allow(vec![Cidr::new(public, 32).unwrap()])
            .with_service_ports(vec!["0.0.0.0:3478".parse().unwrap()]);
        let own = OwnAddresses::new(&policy, [public], &[relay], 50000..=50099);
        let at = |ip: IpAddr, port| own.check(SocketAddr::new(ip, port));
        assert_eq!(
            at("8.8.8.8".parse().unwrap(), 53),
            None,
            "not own: the policy decides"
        );
        assert_eq!(at(relay, 53), Some(Err(Denied::OwnAddress)));
        assert_eq!(at(relay, 50007), Some(Err(Denied::OwnAddress)));
        own.set_live(SocketAddr::new(relay, 50007), true);
        assert_eq!(at(relay, 50007), Some(Ok(())));
        assert_eq!(
            at(relay, 50008),
            Some(Err(Denied::OwnAddress)),
            "exact port only"
        );
        own.set_live(SocketAddr::new(relay, 50007), false);
        assert_eq!(at(relay, 50007), Some(Err(Denied::OwnAddress)));
        // Explicitly allowed: open except service ports and the relay range.
        assert_eq!(at(public, 53), Some(Ok(())));
        assert_eq!(at(public, 3478), Some(Err(Denied::ServicePort)));
        assert_eq!(at(public, 50050), Some(Err(Denied::OwnAddress)));
        // Every encoding of an own IPv4 address.
        for v6 in [
            "::ffff:203.0.114.10",
            "64:ff9b::cb00:720a",
            "2002:cb00:720a::1",
        ] {
            assert_eq!(
                at(v6.parse().unwrap(), 53),
                Some(Err(Denied::OwnAddress)),
                "{v6}"
            );
        }
    }

    /// 1:1 NAT: the public IP is own and judged as the private one behind it, so a peer naming
    /// another allocation's public relayed address is relayed to (at the private address), and no
    /// other port of either IP is.
    #[test]
    fn external_public_ips_are_own_and_judged_as_their_private_ip() {
        let (private, public) = (ip("10.0.0.5"), ip("198.51.99.7"));
        let other = ip("10.0.0.6");
        let policy = PeerPolicy::new().with_service_ports(vec![sa("10.0.0.5:3478")]);
        let own = OwnAddresses::new(&policy, [], &[private, other], 50000..=50099)
            .with_external(&policy, &[(private, public)]);
        assert!(own.contains(public));
        let at = |a: &str| own.check(sa(a));
        assert_eq!(at("198.51.99.7:50007"), Some(Err(Denied::OwnAddress)));
        own.set_live(sa("10.0.0.5:50007"), true);
        assert_eq!(at("198.51.99.7:50007"), Some(Ok(())), "relay to relay");
        assert_eq!(at("198.51.99.7:50008"), Some(Err(Denied::OwnAddress)));
        assert_eq!(at("198.51.99.7:3478"), Some(Err(Denied::ServicePort)));
        assert_eq!(at("198.51.99.7:53"), Some(Err(Denied::OwnAddress)));
        assert_eq!(at("[::ffff:198.51.99.7]:53"), Some(Err(Denied::OwnAddress)));
        assert_eq!(at("[64:ff9b::c633:6307]:53"), Some(Err(Denied::OwnAddress)));
        // The translations, both ways; other addresses pass unchanged.
        assert_eq!(own.bound(sa("198.51.99.7:50007")), sa("10.0.0.5:50007"));
        assert_eq!(own.bound(sa("[::ffff:198.51.99.7]:9")), sa("10.0.0.5:9"));
        assert_eq!(
            own.advertised(sa("10.0.0.5:50007")),
            sa("198.51.99.7:50007")
        );
        for a in ["10.0.0.6:50007", "8.8.8.8:53"] {
            assert_eq!(own.bound(sa(a)), sa(a));
            assert_eq!(own.advertised(sa(a)), sa(a));
        }
        // An allow on the public IP opens both IPs, but not the relay range or the service ports.
        own.set_allows(&PeerPolicy::new().with_allow(vec![cidr("198.51.99.7/32")]));
        assert_eq!(at("198.51.99.7:53"), Some(Ok(())));
        assert_eq!(at("198.51.99.7:3478"), Some(Err(Denied::ServicePort)));
        assert_eq!(at("198.51.99.7:50008"), Some(Err(Denied::OwnAddress)));
        // A pair whose private side is not a relay IP is ignored.
        let none = OwnAddresses::new(&policy, [], &[other], 50000..=50099)
            .with_external(&policy, &[(private, public)]);
        assert!(!none.contains(public));
        assert_eq!(none.bound(sa("198.51.99.7:1")), sa("198.51.99.7:1"));
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    /// Default policy on port 3478.
    fn judge(addr: &str) -> Result<(), Denied> {
        PeerPolicy::new().check(SocketAddr::new(ip(addr), 3478))
    }

    #[track_caller]
    fn assert_denied(addr: &str, name: &'static str) {
        assert_eq!(
            judge(addr),
            Err(Denied::Builtin(name)),
            "{addr} should be {name}"
        );
    }

    #[track_caller]
    fn assert_allowed(addr: &str) {
        assert_eq!(judge(addr), Ok(()), "{addr} should be allowed");
    }

    #[test]
    fn every_v4_range_denied_at_both_ends() {
        // (first, last, name), written out by hand rather than derived from the table.
        let ranges = [
            ("0.0.0.0", "0.255.255.255", "this-network"),
            ("10.0.0.0", "10.255.255.255", "rfc1918"),
            ("100.64.0.0", "100.127.255.255", "cgnat"),
            ("127.0.0.0", "127.255.255.255", "loopback"),
            ("169.254.0.0", "169.254.255.255", "link-local"),
            ("172.16.0.0", "172.31.255.255", "rfc1918"),
            ("192.0.0.0", "192.0.0.255", "ietf-protocol"),
            ("192.0.2.0", "192.0.2.255", "documentation"),
            ("192.88.99.0", "192.88.99.255", "6to4-relay"),
            ("192.168.0.0", "192.168.255.255", "rfc1918"),
            ("198.18.0.0", "198.19.255.255", "benchmarking"),
            ("198.51.100.0", "198.51.100.255", "documentation"),
            ("203.0.113.0", "203.0.113.255", "documentation"),
            ("224.0.0.0", "239.255.255.255", "multicast"),
            ("240.0.0.0", "255.255.255.254", "reserved"),
        ];
        for (first, last, name) in ranges {
            assert_denied(first, name);
            assert_denied(last, name);
        }
        assert_denied("255.255.255.255", "broadcast");
        assert_denied("169.254.169.254", "link-local");
        assert_denied("127.0.0.1", "loopback");
    }

    #[test]
    fn public_v4_neighbours_of_each_range_allowed() {
        for addr in [
            "1.0.0.0",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "191.255.255.255",
            "192.0.1.0",
            "192.0.1.255",
            "192.0.3.0",
            "192.88.98.255",
            "192.88.100.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "198.51.99.255",
            "198.51.101.0",
            "203.0.112.255",
            "203.0.114.0",
            "223.255.255.255",
            "8.8.8.8",
        ] {
            assert_allowed(addr);
        }
    }

    #[test]
    fn every_v6_range_denied_at_both_ends() {
        let ranges = [
            ("::", "::", "unspecified"),
            ("::1", "::1", "loopback"),
            ("::2", "::ffff", "ipv4-compatible"),
            ("::1:0", "::ffff:ffff", "ipv4-compatible"),
            (
                "64:ff9b:1::",
                "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",
                "nat64-local",
            ),
            ("100::", "100::ffff:ffff:ffff:ffff", "discard"),
            ("2001::", "2001:0:ffff:ffff:ffff:ffff:ffff:ffff", "teredo"),
            (
                "2001:2::",
                "2001:2:0:ffff:ffff:ffff:ffff:ffff",
                "benchmarking",
            ),
            (
                "2001:10::",
                "2001:1f:ffff:ffff:ffff:ffff:ffff:ffff",
                "orchid",
            ),
            (
                "2001:20::",
                "2001:2f:ffff:ffff:ffff:ffff:ffff:ffff",
                "orchid",
            ),
            (
                "2001:db8::",
                "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
                "documentation",
            ),
            (
                "3fff::",
                "3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff",
                "documentation",
            ),
            (
                "5f00::",
                "5f00:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "srv6-sid",
            ),
            (
                "fc00::",
                "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "unique-local",
            ),
            (
                "fe80::",
                "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "link-local",
            ),
            (
                "fec0::",
                "feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "site-local",
            ),
            (
                "ff00::",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "multicast",
            ),
            // Outside 2000::/3 and not otherwise named.
            (
                "4000::",
                "5eff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "reserved",
            ),
            (
                "::1:0:0:0",
                "1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "reserved",
            ),
            ("100:0:0:1::", "100:0:0:1::", "reserved"),
        ];
        for (first, last, name) in ranges {
            assert_denied(first, name);
            assert_denied(last, name);
        }
        // Mapped and NAT64 ends are judged by the embedded IPv4 address.
        assert_denied("::ffff:0.0.0.0", "this-network");
        assert_denied("::ffff:255.255.255.255", "broadcast");
        assert_denied("64:ff9b::", "this-network");
        assert_denied("64:ff9b::ffff:ffff", "broadcast");
        assert_denied("2002::", "this-network");
        assert_denied("2002:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "broadcast");
    }

    #[test]
    fn public_v6_neighbours_of_each_range_allowed() {
        for addr in [
            "2000::",
            "2000:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "2001:1::2", // TURN anycast, RFC 8155, just past Teredo
            "2001:1:ffff:ffff:ffff:ffff:ffff:ffff",
            "2001:2:1::",
            "2001:f:ffff:ffff:ffff:ffff:ffff:ffff",
            "2001:30::",
            "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff",
            "2001:db9::",
            "2003::",
            "3ffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "3fff:1000::",
            "3fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "2606:4700::1111",
            "2a00:1450:4001::200e",
        ] {
            assert_allowed(addr);
        }
    }

    #[test]
    fn every_ipv4_in_ipv6_encoding_of_internal_addresses_denied() {
        // (mapped, compatible, NAT64, 6to4, Teredo, local NAT64 /96 and /64) for each target.
        let cases = [
            (
                "127.0.0.1",
                [
                    "::ffff:127.0.0.1",
                    "::127.0.0.1",
                    "64:ff9b::7f00:1",
                    "2002:7f00:1::1",
                    "2001:0:7f00:1::1",
                    "2001:0:4136:e378:8000:63bf:80ff:fffe", // Teredo client 127.0.0.1
                    "64:ff9b:1::7f00:1",
                    "64:ff9b:1:0:7f:0:100::",
                ],
            ),
            (
                "10.1.2.3",
                [
                    "::ffff:10.1.2.3",
                    "::10.1.2.3",
                    "64:ff9b::a01:203",
                    "2002:a01:203::1",
                    "2001:0:a01:203::1",
                    "2001:0:4136:e378:8000:63bf:f5fe:fdfc", // Teredo client 10.1.2.3
                    "64:ff9b:1::a01:203",
                    "64:ff9b:1:0:a:102:300::",
                ],
            ),
            (
                "169.254.169.254",
                [
                    "::ffff:169.254.169.254",
                    "::169.254.169.254",
                    "64:ff9b::a9fe:a9fe",
                    "2002:a9fe:a9fe::1",
                    "2001:0:a9fe:a9fe::1",
                    "2001:0:4136:e378:8000:63bf:5601:5601", // Teredo client 169.254.169.254
                    "64:ff9b:1::a9fe:a9fe",
                    "64:ff9b:1:0:a9:fea9:fe00::",
                ],
            ),
        ];
        for (v4, encodings) in cases {
            assert!(judge(v4).is_err(), "{v4} itself must be denied");
            for e in encodings {
                assert!(judge(e).is_err(), "{e} embeds {v4} and must be denied");
            }
        }
        // The forms judged by their embedded address carry its range name.
        assert_denied("::ffff:127.0.0.1", "loopback");
        assert_denied("64:ff9b::a9fe:a9fe", "link-local");
        assert_denied("2002:a01:203::1", "rfc1918");
        assert_denied("::127.0.0.1", "ipv4-compatible");
        assert_denied("2001:0:7f00:1::1", "teredo");
    }

    #[test]
    fn public_ipv4_in_ipv6_allowed_where_the_encoding_is_judged_by_it() {
        assert_allowed("::ffff:8.8.8.8");
        assert_allowed("64:ff9b::808:808");
        assert_allowed("2002:808:808::1");
        // Encodings denied outright stay denied even for a public address.
        assert_denied("::8.8.8.8", "ipv4-compatible");
        assert_denied("2001:0:808:808::1", "teredo");
        assert_denied("64:ff9b:1::808:808", "nat64-local");
    }

    #[test]
    fn v6_loopback_is_not_v4_0_0_0_1() {
        assert_denied("::1", "loopback");
        assert_denied("0.0.0.1", "this-network");
        // Opening 0.0.0.0/8 must not open ::1, and opening ::1 must not open 0.0.0.1.
        let p = PeerPolicy::new().with_allow(vec![cidr("0.0.0.0/8")]);
        assert_eq!(p.check(sa("0.0.0.1:5000")), Ok(()));
        assert_eq!(p.check(sa("[::1]:5000")), Err(Denied::Builtin("loopback")));
        let p = PeerPolicy::new().with_allow(vec![cidr("::1/128")]);
        assert_eq!(p.check(sa("[::1]:5000")), Ok(()));
        assert_eq!(
            p.check(sa("0.0.0.1:5000")),
            Err(Denied::Builtin("this-network"))
        );
    }

    #[test]
    fn unspecified_addresses_denied_cve_2020_26262() {
        assert_eq!(
            PeerPolicy::new().check(sa("0.0.0.0:8080")),
            Err(Denied::Builtin("this-network"))
        );
        assert_eq!(
            PeerPolicy::new().check(sa("[::]:8080")),
            Err(Denied::Builtin("unspecified"))
        );
        assert_eq!(
            PeerPolicy::new().check(sa("[::ffff:0.0.0.0]:8080")),
            Err(Denied::Builtin("this-network"))
        );
    }

    #[test]
    fn allow_list_opens_loopback_in_every_form_judged_by_it() {
        let p = PeerPolicy::new().with_allow(vec![cidr("127.0.0.0/8"), cidr("::1")]);
        assert_eq!(p.check(sa("127.0.0.1:5000")), Ok(()));
        assert_eq!(p.check(sa("127.255.255.254:5000")), Ok(()));
        assert_eq!(p.check(sa("[::1]:5000")), Ok(()));
        assert_eq!(p.check(sa("[::ffff:127.0.0.1]:5000")), Ok(()));
        assert_eq!(p.check(sa("[64:ff9b::7f00:1]:5000")), Ok(()));
        // Only loopback was opened.
        assert_eq!(
            p.check(sa("10.0.0.1:5000")),
            Err(Denied::Builtin("rfc1918"))
        );
        assert_eq!(
            p.check(sa("[::127.0.0.1]:5000")),
            Err(Denied::Builtin("ipv4-compatible"))
        );
    }

    #[test]
    fn mapped_cidr_entries_are_the_ipv4_block() {
        let p = PeerPolicy::new().with_allow(vec![cidr("::ffff:127.0.0.0/104")]);
        assert_eq!(p.check(sa("127.0.0.1:5000")), Ok(()));
        assert_eq!(p.check(sa("[::ffff:127.0.0.1]:5000")), Ok(()));
        let p = PeerPolicy::new().with_deny(vec![cidr("::ffff:8.8.8.8")]);
        assert_eq!(p.check(sa("8.8.8.8:53")), Err(Denied::Configured));
    }

    #[test]
    fn deny_list_closes_public_range_in_every_form_and_beats_allow() {
        let p = PeerPolicy::new().with_deny(vec![cidr("8.8.8.0/24"), cidr("2606:4700::/32")]);
        assert_eq!(p.check(sa("8.8.8.8:53")), Err(Denied::Configured));
        assert_eq!(p.check(sa("[::ffff:8.8.8.8]:53")), Err(Denied::Configured));
        assert_eq!(
            p.check(sa("[64:ff9b::808:808]:53")),
            Err(Denied::Configured)
        );
        assert_eq!(p.check(sa("[2002:808:808::1]:53")), Err(Denied::Configured));
        assert_eq!(p.check(sa("[2606:4700::1111]:53")), Err(Denied::Configured));
        assert_eq!(p.check(sa("8.8.4.4:53")), Ok(()));

        let p = PeerPolicy::new()
            .with_allow(vec![cidr("10.0.0.0/8")])
            .with_deny(vec![cidr("10.9.0.0/16")]);
        assert_eq!(p.check(sa("10.1.0.1:5000")), Ok(()));
        assert_eq!(p.check(sa("10.9.0.1:5000")), Err(Denied::Configured));
    }

    #[test]
    fn service_ports_denied_even_when_allowed() {
        let p = PeerPolicy::new()
            .with_allow(vec![cidr("127.0.0.0/8"), cidr("::1/128")])
            .with_service_ports(vec![
                sa("127.0.0.1:9090"),
                sa("203.0.113.7:3478"),
                sa("0.0.0.0:8080"),
                sa("[::]:5349"),
            ]);
        // Exact address, in every form judged as that address.
        assert_eq!(p.check(sa("127.0.0.1:9090")), Err(Denied::ServicePort));
        assert_eq!(
            p.check(sa("[::ffff:127.0.0.1]:9090")),
            Err(Denied::ServicePort)
        );
        assert_eq!(p.check(sa("203.0.113.7:3478")), Err(Denied::ServicePort));
        // Same ip, other port; same port, other ip.
        assert_eq!(p.check(sa("127.0.0.1:9091")), Ok(()));
        assert_eq!(p.check(sa("127.0.0.2:9090")), Ok(()));
        // Unspecified service ip: that port on any address, either family.
        assert_eq!(p.check(sa("127.0.0.1:8080")), Err(Denied::ServicePort));
        assert_eq!(p.check(sa("8.8.8.8:8080")), Err(Denied::ServicePort));
        assert_eq!(p.check(sa("[::1]:8080")), Err(Denied::ServicePort));
        assert_eq!(
            p.check(sa("[2606:4700::1111]:5349")),
            Err(Denied::ServicePort)
        );
        assert_eq!(p.check(sa("8.8.8.8:5349")), Err(Denied::ServicePort));
        assert_eq!(p.check(sa("8.8.8.8:8081")), Ok(()));
        // A service port does not open anything the built-in table denies.
        assert_eq!(
            PeerPolicy::new()
                .with_service_ports(vec![sa("0.0.0.0:8080")])
                .check(sa("10.0.0.1:8081")),
            Err(Denied::Builtin("rfc1918"))
        );
    }

    #[test]
    fn port_zero_denied_for_every_peer() {
        let p = PeerPolicy::new().with_allow(vec![cidr("0.0.0.0/0"), cidr("::/0")]);
        assert_eq!(p.check(sa("8.8.8.8:0")), Err(Denied::PortZero));
        assert_eq!(p.check(sa("[2606:4700::1111]:0")), Err(Denied::PortZero));
        assert_eq!(p.check(sa("127.0.0.1:0")), Err(Denied::PortZero));
        assert_eq!(p.check(sa("127.0.0.1:1")), Ok(()));
    }

    #[test]
    fn public_peers_allowed() {
        assert_eq!(PeerPolicy::new().check(sa("8.8.8.8:3478")), Ok(()));
        assert_eq!(PeerPolicy::new().check(sa("[2606:4700::1111]:443")), Ok(()));
    }

    #[test]
    fn denied_names_are_stable() {
        assert_eq!(Denied::Builtin("cgnat").as_str(), "cgnat");
        assert_eq!(Denied::Configured.as_str(), "configured");
        assert_eq!(Denied::ServicePort.to_string(), "service-port");
        assert_eq!(Denied::PortZero.as_str(), "port-zero");
    }

    #[test]
    fn cidr_parse_errors_say_what_is_wrong() {
        let err = |s: &str| s.parse::<Cidr>().unwrap_err().to_string();
        assert_eq!(err(""), "empty CIDR");
        assert!(err("garbage").contains("not an IPv4 or IPv6 address"));
        assert!(err("10.0.0/8").contains("not an IPv4 or IPv6 address"));
        assert!(err("fe80::1%eth0/64").contains("not an IPv4 or IPv6 address"));
        assert!(err("1.2.3.4/").contains("missing prefix length"));
        assert!(err("1.2.3.4/-1").contains("\"-1\" is not a decimal number"));
        assert!(err("1.2.3.4/+8").contains("not a decimal number"));
        assert!(err("1.2.3.4/8/9").contains("not a decimal number"));
        assert!(err("1.2.3.4/ 8").contains("not a decimal number"));
        assert!(err("1.2.3.4/33").contains("prefix length 33 exceeds 32 for IPv4"));
        assert!(err("1.2.3.4/256").contains("prefix length 256 exceeds 32 for IPv4"));
        assert!(err("::/129").contains("prefix length 129 exceeds 128 for IPv6"));
        assert!(err("::/99999999999999999999")
            .contains("prefix length 99999999999999999999 exceeds 128 for IPv6"));
        assert_eq!(
            Cidr::new(ip("1.2.3.4"), 33).unwrap_err().to_string(),
            "prefix length 33 exceeds 32 for IPv4"
        );
        assert_eq!(
            Cidr::new(ip("::"), 129).unwrap_err().to_string(),
            "prefix length 129 exceeds 128 for IPv6"
        );
    }

    #[test]
    fn cidr_parse_masks_host_bits_and_round_trips() {
        assert_eq!(cidr("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("127.0.0.1").to_string(), "127.0.0.1/32");
        assert_eq!(cidr("::1").to_string(), "::1/128");
        assert_eq!(cidr("2001:db8::1/32").to_string(), "2001:db8::/32");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(cidr("1.2.3.4/0"), cidr("0.0.0.0/0"));
        for s in [
            "10.0.0.0/8",
            "100.64.0.0/10",
            "255.255.255.255/32",
            "::/0",
            "::ffff:127.0.0.0/104",
            "fe80::/10",
            "2606:4700::1111/128",
        ] {
            assert_eq!(cidr(s).to_string(), s);
            assert_eq!(cidr(&cidr(s).to_string()), cidr(s));
        }
    }

    #[test]
    fn cidr_contains_respects_prefix_and_family() {
        let c = cidr("172.16.0.0/12");
        assert!(c.contains(ip("172.16.0.0")));
        assert!(c.contains(ip("172.31.255.255")));
        assert!(!c.contains(ip("172.32.0.0")));
        assert!(!c.contains(ip("172.15.255.255")));
        assert!(!c.contains(ip("::ffff:172.16.0.1")));
        assert!(!cidr("::/0").contains(ip("1.2.3.4")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::1")));
        assert!(cidr("0.0.0.0/0").contains(ip("255.255.255.255")));
        assert!(cidr("::/0").contains(ip("ffff::1")));
        assert!(cidr("::1/128").contains(ip("::1")));
        assert!(!cidr("::1/128").contains(ip("::2")));
    }

    /// Addresses biased towards the interesting encodings, plus uniform noise.
    fn any_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
            any::<u32>().prop_map(|a| IpAddr::V6(Ipv4Addr::from(a).to_ipv6_mapped())),
            any::<u32>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(u128::from(a)))),
            any::<u32>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(NAT64_WKP | u128::from(a)))),
            (any::<u32>(), any::<u128>()).prop_map(|(a, low)| IpAddr::V6(Ipv6Addr::from(
                SIX_TO_FOUR | (u128::from(a) << 80) | (low & !mask_v6(48))
            ))),
        ]
    }

    fn configured() -> PeerPolicy {
        PeerPolicy::new()
            .with_allow(vec![cidr("127.0.0.0/8"), cidr("::1"), cidr("10.0.0.0/9")])
            .with_deny(vec![cidr("10.1.0.0/16"), cidr("8.8.0.0/16")])
            .with_service_ports(vec![sa("127.0.0.1:9090"), sa("0.0.0.0:8080")])
    }

    /// Issue #10 finding 3: an allow entry on the IPv6 form of an embedding prefix must not open the
    /// internal IPv4 addresses embedded in it.
    #[test]
    fn allowing_an_ipv6_prefix_does_not_open_embedded_internal_ipv4() {
        let p = PeerPolicy::new().with_allow(vec![cidr("64:ff9b::/96")]);
        assert_eq!(
            p.check(sa("[64:ff9b::a01:203]:5000")),
            Err(Denied::Builtin("rfc1918"))
        );
        assert_eq!(
            p.check(sa("[64:ff9b::a9fe:a9fe]:80")),
            Err(Denied::Builtin("link-local"))
        );
        assert_eq!(p.check(sa("[64:ff9b::808:808]:53")), Ok(()));
        // Naming the IPv4 range itself opens it in every form judged by it.
        let p = p.with_allow(vec![cidr("10.0.0.0/8")]);
        assert_eq!(p.check(sa("[64:ff9b::a01:203]:5000")), Ok(()));
        assert_eq!(
            p.check(sa("[64:ff9b::a9fe:a9fe]:80")),
            Err(Denied::Builtin("link-local"))
        );

        let wide = PeerPolicy::new().with_allow(vec![
            cidr("::/0"),
            cidr("2002::/16"),
            cidr("2001::/32"),
            cidr("::/96"),
        ]);
        for (encoding, name) in [
            ("2002:a01:203::1", "rfc1918"),
            ("2002:a9fe:a9fe::1", "link-local"),
            ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"), // Teredo client 127.0.0.1
            ("2001:0:7f00:1::1", "loopback"),                     // Teredo server 127.0.0.1
            ("::10.1.2.3", "rfc1918"),
            ("::ffff:10.1.2.3", "rfc1918"),
            ("64:ff9b::7f00:1", "loopback"),
        ] {
            assert_eq!(
                wide.check(SocketAddr::new(ip(encoding), 5000)),
                Err(Denied::Builtin(name)),
                "{encoding}"
            );
        }
        // The IPv6 forms themselves were opened: public embedded addresses pass.
        assert_eq!(
            wide.check(sa("[2001:0:4136:e378:8000:63bf:f7f7:f7f7]:5000")),
            Ok(())
        );
        assert_eq!(wide.check(sa("[2002:808:808::1]:5000")), Ok(()));
        assert_eq!(wide.check(sa("[::8.8.8.8]:5000")), Ok(()));
        // `::1` and `::` are not IPv4-compatible forms of 0.0.0.1 and 0.0.0.0.
        assert_eq!(wide.check(sa("[::1]:5000")), Ok(()));
    }

    fn ipv6_allowing() -> PeerPolicy {
        PeerPolicy::new().with_allow(vec![
            cidr("::/0"),
            cidr("64:ff9b::/96"),
            cidr("2002::/16"),
            cidr("2001::/32"),
        ])
    }

    proptest! {
        /// Whatever IPv6 ranges are allowed, no encoding is more permissive than its IPv4 address.
        #[test]
        fn ipv6_allows_never_open_a_denied_embedded_ipv4(a in any::<u32>(), port in 1u16..) {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port);
            let p = ipv6_allowing();
            if p.check(v4).is_err() {
                let mut encodings = vec![
                    NAT64_WKP | u128::from(a),
                    SIX_TO_FOUR | (u128::from(a) << 80) | 1,
                    TEREDO | u128::from(!a),                           // client a
                    TEREDO | (u128::from(a) << 64) | 0xf7f7_f7f7,      // server a, client 8.8.8.8
                ];
                if a >= 2 {
                    encodings.push(u128::from(a)); // IPv4-compatible
                }
                for bits in encodings {
                    let e = SocketAddr::new(IpAddr::V6(Ipv6Addr::from(bits)), port);
                    prop_assert!(p.check(e).is_err(), "{} embeds {} and must be denied", e, v4);
                }
            }
        }

        #[test]
        fn check_never_panics(addr in any_ip(), port in any::<u16>()) {
            let peer = SocketAddr::new(addr, port);
            let _ = PeerPolicy::new().check(peer);
            let _ = configured().check(peer);
        }

        #[test]
        fn mapped_form_is_judged_as_its_ipv4(a in any::<u32>(), port in any::<u16>()) {
            let v4 = Ipv4Addr::from(a);
            let plain = SocketAddr::new(IpAddr::V4(v4), port);
            let mapped = SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), port);
            prop_assert_eq!(PeerPolicy::new().check(plain), PeerPolicy::new().check(mapped));
            let p = configured();
            prop_assert_eq!(p.check(plain), p.check(mapped));
        }

        #[test]
        fn nat64_form_is_never_more_permissive_than_its_ipv4(a in any::<u32>(), port in any::<u16>()) {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port);
            let nat64 = SocketAddr::new(IpAddr::V6(Ipv6Addr::from(NAT64_WKP | u128::from(a))), port);
            let p = configured();
            if p.check(v4).is_err() {
                prop_assert!(p.check(nat64).is_err());
            }
        }

        #[test]
        fn cidr_display_round_trips(v6 in any::<bool>(), bits in any::<u128>(), prefix in 0u8..=128) {
            let (addr, prefix) = if v6 {
                (IpAddr::V6(Ipv6Addr::from(bits)), prefix)
            } else {
                (IpAddr::V4(Ipv4Addr::from(bits as u32)), prefix % 33)
            };
            let c = Cidr::new(addr, prefix).unwrap();
            prop_assert_eq!(c.to_string().parse::<Cidr>().unwrap(), c);
            prop_assert!(c.contains(addr));
        }

        #[test]
        fn cidr_parse_never_panics(s in "\\PC{0,48}") {
            let _ = s.parse::<Cidr>();
        }
    }
}
