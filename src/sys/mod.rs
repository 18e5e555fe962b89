//! Every syscall and every `unsafe` block of turnpike: UDP sockets, batched `recvmmsg`/`sendmmsg`,
//! eventfd wake-ups, CPU pinning, the io_uring ring, file locks and the open-file limit.
//!
//! Each `unsafe` block carries a `// SAFETY:` comment; each `unsafe fn` a `# Safety` section. Raw calls go
//! through `syscall!`, which turns a libc return value into `io::Result`.
//!
//! May use: libc, socket2, io-uring, core_affinity.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

pub mod alloc;
pub mod file;
mod ifaddrs;
pub mod mmsg;
pub mod uring;
#[cfg(feature = "xdp")]
pub mod xdp;

pub use ifaddrs::{expand_wildcards, interface_addrs};

/// Call a libc function and turn `-1` into the thread's `errno` as an `io::Error`.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: the caller of the macro upholds the function's contract; see each use site.
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}
pub(crate) use syscall;

/// Socket options for UDP sockets the relay binds.
#[derive(Debug, Clone, Copy, Default)]
pub struct UdpOptions {
    /// SO_REUSEPORT (listeners: one socket per worker on the same address).
    pub reuse_port: bool,
    /// SO_RCVBUF in bytes.
    pub recv_buffer: Option<usize>,
    /// SO_SNDBUF in bytes.
    pub send_buffer: Option<usize>,
    /// Set DF on outgoing datagrams (IP_PMTUDISC_DO / IPV6_DONTFRAG).
    pub dont_fragment: bool,
}

/// Bind a non-blocking UDP socket on `addr`.
pub fn bind_udp(addr: SocketAddr, opts: UdpOptions) -> io::Result<std::net::UdpSocket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    // Non-blocking from socket(2) on (SOCK_NONBLOCK; socket2 adds SOCK_CLOEXEC): two fcntl calls fewer
    // per relay socket, which allocation churn opens and closes once per allocation.
    let sock = Socket::new(domain, Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    if opts.reuse_port {
        sock.set_reuse_port(true)?;
    }
    if let Some(n) = opts.recv_buffer {
        sock.set_recv_buffer_size(n)?;
    }
    if let Some(n) = opts.send_buffer {
        sock.set_send_buffer_size(n)?;
    }
    if opts.dont_fragment {
        set_dont_fragment(&sock, addr.is_ipv4())?;
    }
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// Bind a non-blocking SO_REUSEPORT TCP listener on `addr` (one per worker; the kernel spreads new
/// connections over them). An IPv6 address listens on IPv6 only.
pub fn bind_tcp(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    Ok(sock.into())
}

/// Ask for each datagram's destination address (`IP_PKTINFO` on IPv4, `IPV6_RECVPKTINFO` on IPv6) on
/// `sock`, a listener bound to a wildcard address, so that the receive batch can tell which of the
/// host's addresses the client sent to ([`parse_pktinfo`]) and the reply can leave from it
/// ([`write_pktinfo`]).
pub fn set_pktinfo(sock: &std::net::UdpSocket, v4: bool) -> io::Result<()> {
    let (level, name) = if v4 {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    };
    let one: libc::c_int = 1;
    syscall!(setsockopt(
        sock.as_raw_fd(),
        level,
        name,
        // SAFETY (inside the macro): `one` lives across the call and its size is passed.
        (&one as *const libc::c_int).cast(),
        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
    ))?;
    Ok(())
}

/// `CMSG_ALIGN`: control message parts are aligned to the size of `size_t`.
const fn cmsg_align(len: usize) -> usize {
    let a = std::mem::size_of::<usize>();
    (len + a - 1) & !(a - 1)
}
/// `sizeof(struct cmsghdr)` rounded up, where a control message's data starts.
const CMSG_HDR: usize = cmsg_align(std::mem::size_of::<libc::cmsghdr>());
/// The control buffer one destination/source address needs: `CMSG_SPACE(sizeof(struct in6_pktinfo))`,
/// which also holds an `in_pktinfo`.
pub const PKTINFO_SPACE: usize = CMSG_HDR + cmsg_align(std::mem::size_of::<libc::in6_pktinfo>());

/// A control-message buffer of [`PKTINFO_SPACE`] bytes, aligned as a `cmsghdr` must be.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(8))]
pub struct PktinfoBuf(pub [u8; PKTINFO_SPACE]);

impl Default for PktinfoBuf {
    fn default() -> Self {
        PktinfoBuf([0; PKTINFO_SPACE])
    }
}

/// The destination address of a received datagram: the `IP_PKTINFO` (`ipi_addr`) or `IPV6_PKTINFO`
/// (`ipi6_addr`) control message in `control` (the `controllen` bytes the kernel wrote). `None` if
/// there is none or it is cut short. Reads bytes only, with every length checked.
pub fn parse_pktinfo(control: &[u8]) -> Option<IpAddr> {
    let word = std::mem::size_of::<usize>();
    let mut at = 0;
    while at + CMSG_HDR <= control.len() {
        let h = &control[at..];
        let len = usize::from_ne_bytes(h.get(..word)?.try_into().ok()?);
        let level = i32::from_ne_bytes(h.get(word..word + 4)?.try_into().ok()?);
        let kind = i32::from_ne_bytes(h.get(word + 4..word + 8)?.try_into().ok()?);
        if len < CMSG_HDR || len > h.len() {
            return None;
        }
        let data = &h[CMSG_HDR..len];
        match (level, kind) {
            // struct in_pktinfo { int ipi_ifindex; struct in_addr ipi_spec_dst, ipi_addr; }
            (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                let ip: [u8; 4] = data.get(8..12)?.try_into().ok()?;
                return Some(IpAddr::V4(Ipv4Addr::from(ip)));
            }
            // struct in6_pktinfo { struct in6_addr ipi6_addr; unsigned int ipi6_ifindex; }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                let ip: [u8; 16] = data.get(..16)?.try_into().ok()?;
                return Some(IpAddr::V6(Ipv6Addr::from(ip)));
            }
            _ => {}
        }
        at += cmsg_align(len);
    }
    None
}

/// Write one `IP_PKTINFO` (`ipi_spec_dst`) or `IPV6_PKTINFO` (`ipi6_addr`) control message naming `src`
/// as the source address of a datagram sent from a wildcard socket, into `buf`. Returns its length
/// (the `msg_controllen` to pass). The interface index is 0: the routing table picks it.
pub fn write_pktinfo(buf: &mut PktinfoBuf, src: IpAddr) -> usize {
    let word = std::mem::size_of::<usize>();
    let (level, kind, data_len) = match src {
        IpAddr::V4(_) => (
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            std::mem::size_of::<libc::in_pktinfo>(),
        ),
        IpAddr::V6(_) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            std::mem::size_of::<libc::in6_pktinfo>(),
        ),
    };
    let b = &mut buf.0;
    b.fill(0);
    b[..word].copy_from_slice(&(CMSG_HDR + data_len).to_ne_bytes());
    b[word..word + 4].copy_from_slice(&level.to_ne_bytes());
    b[word + 4..word + 8].copy_from_slice(&kind.to_ne_bytes());
    let data = &mut b[CMSG_HDR..];
    match src {
        IpAddr::V4(ip) => data[4..8].copy_from_slice(&ip.octets()),
        IpAddr::V6(ip) => data[..16].copy_from_slice(&ip.octets()),
    }
    CMSG_HDR + cmsg_align(data_len)
}

fn set_dont_fragment(sock: &Socket, v4: bool) -> io::Result<()> {
    let (level, name, value) = if v4 {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1)
    };
    let value: libc::c_int = value;
    syscall!(setsockopt(
        sock.as_raw_fd(),
        level,
        name,
        // SAFETY (inside the macro): `value` lives across the call and its size is passed.
        (&value as *const libc::c_int).cast(),
        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
    ))?;
    Ok(())
}

/// A Linux eventfd used to wake a worker's event loop from another thread.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        let fd = syscall!(eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))?;
        // SAFETY: `fd` was just returned by eventfd(2) and is owned by nobody else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Wake the waiter (adds 1 to the counter).
    pub fn notify(&self) -> io::Result<()> {
        let one: u64 = 1;
        match syscall!(write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8)) {
            Ok(_) => Ok(()),
            // The counter is saturated: the waiter has wake-ups pending anyway.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reset the counter after waking.
    pub fn drain(&self) {
        let mut buf: u64 = 0;
        let _ = syscall!(read(self.0.as_raw_fd(), (&mut buf as *mut u64).cast(), 8));
    }

    /// The raw descriptor, to register with a poller.
    pub fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Move the calling thread into the network namespace `name`, as `ip netns add` made it
/// (`/run/netns/NAME`). Threads it spawns afterwards inherit it; other threads are not affected. Needs
/// CAP_SYS_ADMIN. For tests that build their own network.
pub fn enter_netns(name: &str) -> io::Result<()> {
    let ns = std::fs::File::open(format!("/run/netns/{name}"))?;
    // SAFETY: `ns` is an open namespace file descriptor for the duration of the call; setns only reads
    // it and changes the calling thread's namespace, touching no memory of ours.
    syscall!(setns(ns.as_raw_fd(), libc::CLONE_NEWNET))?;
    Ok(())
}

/// Pin the calling thread to core `index` (modulo the available cores). False if pinning failed.
pub fn pin_to_core(index: usize) -> bool {
    match core_affinity::get_core_ids() {
        Some(ids) if !ids.is_empty() => core_affinity::set_for_current(ids[index % ids.len()]),
        _ => false,
    }
}

/// Convert a `sockaddr_storage` filled in by the kernel into a `SocketAddr`.
pub(crate) fn sockaddr_to_std(
    storage: &libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    // SAFETY: `storage` is a valid, initialised sockaddr_storage of at least `len` meaningful bytes;
    // SockAddr::new copies it and reads the family to interpret it.
    let addr = unsafe { socket2::SockAddr::new(*storage, len) };
    addr.as_socket()
}

/// Convert a `SocketAddr` into a `sockaddr_storage` and its length, for sendmsg.
pub(crate) fn std_to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let sa = socket2::SockAddr::from(addr);
    // SAFETY: sockaddr_storage is plain old data; every bit pattern is valid, and we overwrite the prefix.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = sa.len();
    // SAFETY: `sa.as_ptr()` points to `len` valid bytes, `len <= size_of::<sockaddr_storage>()`, and the two
    // regions do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(
            sa.as_ptr().cast::<u8>(),
            (&mut storage as *mut libc::sockaddr_storage).cast::<u8>(),
            len as usize,
        );
    }
    (storage, len)
}
