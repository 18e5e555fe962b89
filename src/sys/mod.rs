//! Every syscall and every `unsafe` block of turnpike: UDP sockets, batched `recvmmsg`/`sendmmsg`,
//! eventfd wake-ups, CPU pinning, the io_uring ring, file locks and the open-file limit.
//!
//! Each `unsafe` block carries a `// SAFETY:` comment; each `unsafe fn` a `# Safety` section. Raw calls go
//! through `syscall!`, which turns a libc return value into `io::Result`.
//!
//! May use: libc, socket2, io-uring, core_affinity.

use std::io;
use std::net::SocketAddr;
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
