//! Batched UDP receive and send with `recvmmsg(2)` and `sendmmsg(2)`: the epoll backend's syscalls.
//!
//! Receives land in one caller-owned slab, datagram `i` at `slab[i * stride + headroom ..][.. stride -
//! headroom]`, so that no allocation happens per call and the data plane can write headers in front of
//! a payload in place.
//!
//! A listener bound to a wildcard address receives with one preallocated control buffer per batch slot
//! ([`recv_batch_pktinfo`]) and learns each datagram's destination address from its `IP_PKTINFO` /
//! `IPV6_PKTINFO`; its replies name their source address in one control message shared by the whole
//! `sendmmsg` ([`send_batch_from`]). Every other socket passes no control buffer at all.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

use super::{
    parse_pktinfo, sockaddr_to_std, std_to_sockaddr, syscall, write_pktinfo, PktinfoBuf,
    PKTINFO_SPACE,
};

/// The most datagrams one call moves.
pub const MAX_BATCH: usize = 64;

/// What one received datagram was.
#[derive(Debug, Clone, Copy)]
pub struct RecvMeta {
    /// Its length in bytes (at most the space given; see `truncated`).
    pub len: usize,
    /// Its source.
    pub addr: SocketAddr,
    /// It did not fit and was cut (MSG_TRUNC): drop it.
    pub truncated: bool,
    /// Its destination address, from `IP_PKTINFO` / `IPV6_PKTINFO` ([`recv_batch_pktinfo`] only).
    pub local: Option<IpAddr>,
}

impl Default for RecvMeta {
    fn default() -> Self {
        RecvMeta {
            len: 0,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            truncated: false,
            local: None,
        }
    }
}

/// Receive up to `meta.len()` (at most [`MAX_BATCH`]) datagrams from non-blocking `fd` into `slab`.
/// Returns how many arrived; `Ok(0)` when none were waiting.
pub fn recv_batch(
    fd: RawFd,
    slab: &mut [u8],
    stride: usize,
    headroom: usize,
    meta: &mut [RecvMeta],
) -> io::Result<usize> {
    recv(fd, slab, stride, headroom, meta, false)
}

/// [`recv_batch`] on a socket with [`super::set_pktinfo`]: each datagram's destination address goes to
/// [`RecvMeta::local`] (`None` if the kernel attached none).
pub fn recv_batch_pktinfo(
    fd: RawFd,
    slab: &mut [u8],
    stride: usize,
    headroom: usize,
    meta: &mut [RecvMeta],
) -> io::Result<usize> {
    recv(fd, slab, stride, headroom, meta, true)
}

fn recv(
    fd: RawFd,
    slab: &mut [u8],
    stride: usize,
    headroom: usize,
    meta: &mut [RecvMeta],
    pktinfo: bool,
) -> io::Result<usize> {
    let n = meta.len().min(MAX_BATCH).min(slab.len() / stride.max(1));
    if n == 0 || headroom >= stride {
        return Ok(0);
    }
    // Only the first `n` entries are initialised (zeroing all 64 every call showed up in profiles).
    let mut hdrs: [MaybeUninit<libc::mmsghdr>; MAX_BATCH] =
        [const { MaybeUninit::uninit() }; MAX_BATCH];
    let mut iovs: [MaybeUninit<libc::iovec>; MAX_BATCH] = [MaybeUninit::uninit(); MAX_BATCH];
    let mut addrs: [MaybeUninit<libc::sockaddr_storage>; MAX_BATCH] =
        [const { MaybeUninit::uninit() }; MAX_BATCH];
    // Control buffers on the stack (no allocation), written by the kernel only when `pktinfo`.
    let mut controls: [MaybeUninit<PktinfoBuf>; MAX_BATCH] = [MaybeUninit::uninit(); MAX_BATCH];
    let base = slab.as_mut_ptr();
    for i in 0..n {
        // SAFETY: `i * stride + headroom < n * stride <= slab.len()`, so the pointer stays inside `slab`.
        let start = unsafe { base.add(i * stride + headroom) };
        iovs[i] = MaybeUninit::new(libc::iovec {
            iov_base: start.cast(),
            iov_len: stride - headroom,
        });
        // SAFETY: all-zero is a valid sockaddr_storage and a valid mmsghdr (null pointers, zero lengths).
        let (addr, mut h) = unsafe { (std::mem::zeroed(), std::mem::zeroed::<libc::mmsghdr>()) };
        addrs[i].write(addr);
        h.msg_hdr.msg_name = addrs[i].as_mut_ptr().cast();
        h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        h.msg_hdr.msg_iov = iovs[i].as_mut_ptr();
        h.msg_hdr.msg_iovlen = 1;
        if pktinfo {
            let c = controls[i].write(PktinfoBuf::default());
            h.msg_hdr.msg_control = c.0.as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = PKTINFO_SPACE;
        }
        hdrs[i].write(h);
    }
    // SAFETY (inside the macro): every header points at a live iovec into `slab` (borrowed mutably for the
    // call), at a live sockaddr_storage and, with `pktinfo`, at a live control buffer of the length given;
    // `n <= MAX_BATCH` headers are passed.
    let got = match syscall!(recvmmsg(
        fd,
        hdrs.as_mut_ptr().cast::<libc::mmsghdr>(),
        n as libc::c_uint,
        libc::MSG_DONTWAIT,
        std::ptr::null_mut()
    )) {
        Ok(got) => got as usize,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
        Err(e) => return Err(e),
    };
    for i in 0..got.min(n) {
        // SAFETY: entries below `n` were initialised above, and the kernel only wrote into them.
        let (h, a) = unsafe { (hdrs[i].assume_init_ref(), addrs[i].assume_init_ref()) };
        let addr = sockaddr_to_std(a, h.msg_hdr.msg_namelen);
        let local = if pktinfo {
            // SAFETY: with `pktinfo` entry `i < n` was initialised above.
            let c = unsafe { controls[i].assume_init_ref() };
            c.0.get(..h.msg_hdr.msg_controllen).and_then(parse_pktinfo)
        } else {
            None
        };
        meta[i] = RecvMeta {
            len: h.msg_len as usize,
            addr: addr.unwrap_or(RecvMeta::default().addr),
            truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || addr.is_none(),
            local,
        };
    }
    Ok(got)
}

/// Send `msgs` (destination, bytes) from non-blocking `fd` with as few `sendmmsg` calls as the kernel
/// allows, and report each datagram's outcome to `outcome(index, result)`. Returns how many were sent.
///
/// A datagram the kernel refuses (`EMSGSIZE`, `EACCES`, unreachable…) is reported and skipped; the rest
/// go on. A full socket buffer (`WouldBlock`) ends the call: every datagram from there on is reported
/// with that error, since each would meet the same full buffer.
pub fn send_batch(
    fd: RawFd,
    msgs: &[(SocketAddr, &[u8])],
    outcome: impl FnMut(usize, Result<(), &io::Error>),
) -> usize {
    send_batch_from(fd, msgs, None, outcome)
}

/// [`send_batch`], every datagram leaving from source address `src` (an `IP_PKTINFO` /
/// `IPV6_PKTINFO` control message; for a socket bound to a wildcard address). `None` sends without
/// one, as [`send_batch`] does.
pub fn send_batch_from(
    fd: RawFd,
    msgs: &[(SocketAddr, &[u8])],
    src: Option<IpAddr>,
    mut outcome: impl FnMut(usize, Result<(), &io::Error>),
) -> usize {
    let mut control = PktinfoBuf::default();
    let control_len = src.map_or(0, |ip| write_pktinfo(&mut control, ip));
    let mut at = 0;
    let mut sent = 0;
    while at < msgs.len() {
        match sendmmsg(fd, &msgs[at..], &mut control, control_len) {
            Ok(k) => {
                // k ≥ 1 here; a short count means datagram `at + k` was refused, which the next call
                // reports.
                for i in at..at + k.max(1) {
                    outcome(i, Ok(()));
                }
                sent += k.max(1);
                at += k.max(1);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                for i in at..msgs.len() {
                    outcome(i, Err(&e));
                }
                break;
            }
            Err(e) => {
                outcome(at, Err(&e));
                at += 1;
            }
        }
    }
    sent
}

/// One `sendmmsg` of up to [`MAX_BATCH`] of `msgs` (at least one): how many the kernel took (≥ 1), or the
/// error of the first. Each carries the first `control_len` bytes of `control` (none if 0).
fn sendmmsg(
    fd: RawFd,
    msgs: &[(SocketAddr, &[u8])],
    control: &mut PktinfoBuf,
    control_len: usize,
) -> io::Result<usize> {
    let n = msgs.len().min(MAX_BATCH);
    // Only the first `n` entries are initialised.
    let mut hdrs: [MaybeUninit<libc::mmsghdr>; MAX_BATCH] =
        [const { MaybeUninit::uninit() }; MAX_BATCH];
    let mut iovs: [MaybeUninit<libc::iovec>; MAX_BATCH] = [MaybeUninit::uninit(); MAX_BATCH];
    let mut addrs: [MaybeUninit<libc::sockaddr_storage>; MAX_BATCH] =
        [const { MaybeUninit::uninit() }; MAX_BATCH];
    for (i, (dst, data)) in msgs[..n].iter().enumerate() {
        let (storage, len) = std_to_sockaddr(*dst);
        addrs[i].write(storage);
        iovs[i] = MaybeUninit::new(libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        });
        // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths).
        let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
        h.msg_hdr.msg_name = addrs[i].as_mut_ptr().cast();
        h.msg_hdr.msg_namelen = len;
        h.msg_hdr.msg_iov = iovs[i].as_mut_ptr();
        h.msg_hdr.msg_iovlen = 1;
        if control_len > 0 {
            h.msg_hdr.msg_control = control.0.as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = control_len.min(PKTINFO_SPACE);
        }
        hdrs[i].write(h);
    }
    loop {
        // SAFETY (inside the macro): each header points at a live iovec over a borrowed `&[u8]` the
        // kernel only reads, at a live sockaddr of the given length and, if any, at the borrowed control
        // buffer of at most its size, which the kernel only reads; `n <= MAX_BATCH`.
        match syscall!(sendmmsg(
            fd,
            hdrs.as_mut_ptr().cast::<libc::mmsghdr>(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT
        )) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(k) => return Ok(k as usize),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    type Recv = fn(RawFd, &mut [u8], usize, usize, &mut [RecvMeta]) -> io::Result<usize>;

    /// Receives with `recv` from `sock` until `want` datagrams arrived (polling, at most 1 s); how many did.
    fn receive(
        recv: Recv,
        sock: &std::net::UdpSocket,
        slab: &mut [u8],
        stride: usize,
        headroom: usize,
        meta: &mut [RecvMeta],
        want: usize,
    ) -> usize {
        let mut got = 0;
        for _ in 0..200 {
            got += recv(
                sock.as_raw_fd(),
                &mut slab[got * stride..],
                stride,
                headroom,
                &mut meta[got..],
            )
            .unwrap();
            if got >= want {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        got
    }

    #[test]
    fn batch_round_trip_over_loopback() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_nonblocking(true).unwrap();
        let dst = b.local_addr().unwrap();
        let payloads: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        let msgs: Vec<(SocketAddr, &[u8])> = payloads.iter().map(|p| (dst, &p[..])).collect();
        assert_eq!(send_batch(a.as_raw_fd(), &msgs, |_, r| r.unwrap()), 10);
        assert_eq!(
            send_batch(a.as_raw_fd(), &[], |_, _| panic!("nothing to send")),
            0
        );
        let mut slab = vec![0u8; 16 * 512];
        let mut meta = [RecvMeta::default(); 16];
        assert_eq!(
            receive(recv_batch, &b, &mut slab, 512, 8, &mut meta, 10),
            10
        );
        for i in 0..10 {
            assert_eq!(meta[i].addr, a.local_addr().unwrap());
            assert_eq!(
                &slab[i * 512 + 8..i * 512 + 8 + meta[i].len],
                &payloads[i][..]
            );
        }
        assert_eq!(
            recv_batch(b.as_raw_fd(), &mut slab, 512, 8, &mut meta).unwrap(),
            0
        );
    }

    #[test]
    fn a_refused_datagram_is_reported_and_the_rest_are_sent() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let good = b.local_addr().unwrap();
        // Without SO_BROADCAST the kernel refuses the limited broadcast address (or has no route to it).
        let refused: SocketAddr = "255.255.255.255:9".parse().unwrap();
        let msgs: [(SocketAddr, &[u8]); 4] =
            [(good, b"1"), (refused, b"2"), (good, b"3"), (good, b"4")];
        let mut outcomes = Vec::new();
        let sent = send_batch(a.as_raw_fd(), &msgs, |i, r| outcomes.push((i, r.is_ok())));
        assert_eq!(sent, 3);
        assert_eq!(outcomes, [(0, true), (1, false), (2, true), (3, true)]);
        let mut buf = [0u8; 8];
        for want in [b"1", b"3", b"4"] {
            let n = b.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], want);
        }
    }

    #[test]
    fn oversized_datagrams_are_flagged_truncated() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        a.send_to(&[7u8; 300], b.local_addr().unwrap()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut slab = vec![0u8; 256];
        let mut meta = [RecvMeta::default(); 1];
        assert_eq!(
            recv_batch(b.as_raw_fd(), &mut slab, 256, 4, &mut meta).unwrap(),
            1
        );
        assert!(meta[0].truncated);
    }

    /// A wildcard socket learns which address each datagram was sent to, and its reply leaves from it.
    #[test]
    fn a_wildcard_socket_reads_the_destination_and_replies_from_it() {
        let w = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        w.set_nonblocking(true).unwrap();
        crate::sys::set_pktinfo(&w, true).unwrap();
        let port = w.local_addr().unwrap().port();
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let targets: [IpAddr; 2] = ["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()];
        for ip in targets {
            c.send_to(ip.to_string().as_bytes(), SocketAddr::new(ip, port))
                .unwrap();
        }
        let mut slab = vec![0u8; 4 * 256];
        let mut meta = [RecvMeta::default(); 4];
        assert_eq!(
            receive(recv_batch_pktinfo, &w, &mut slab, 256, 0, &mut meta, 2),
            2
        );
        for (i, ip) in targets.iter().enumerate() {
            assert_eq!(meta[i].local, Some(*ip));
            let text = &slab[i * 256..i * 256 + meta[i].len];
            assert_eq!(text, ip.to_string().as_bytes());
            let sent = send_batch_from(
                w.as_raw_fd(),
                &[(meta[i].addr, b"re")],
                Some(*ip),
                |_, r| r.unwrap(),
            );
            assert_eq!(sent, 1);
            let mut buf = [0u8; 8];
            let (n, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&b"re"[..], SocketAddr::new(*ip, port)));
        }
        // Without the option no control buffer is passed and nothing is read.
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        c.send_to(b"x", plain.local_addr().unwrap()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        plain.set_nonblocking(true).unwrap();
        assert_eq!(
            recv_batch(plain.as_raw_fd(), &mut slab, 256, 0, &mut meta).unwrap(),
            1
        );
        assert_eq!(meta[0].local, None);
    }
}
