//! io_uring: probing the kernel, and [`Ring`], a UDP datagram ring with a safe API for the io_uring
//! data-plane backend.
//!
//! # What the ring does
//! - **Receive**: one *multishot* `RecvMsg` per socket ([`Ring::recv`]), fed from one *provided buffer
//!   ring* shared by all sockets. A buffer is consumed only when a datagram arrives, so an idle socket
//!   costs no buffer, and one `io_uring_enter` reaps as many datagrams as have arrived on all sockets.
//! - **Send**: `SendMsg` straight out of a received buffer ([`Ring::send`]): the packet logic writes its
//!   header in front of the payload and the same bytes leave without a copy. Sends carry `MSG_DONTWAIT`,
//!   so a full socket buffer fails the send (the caller drops and counts it) instead of queueing it.
//! - **Wake-ups**: an 8-byte `Read` of an eventfd ([`Ring::read_eventfd`]).
//!
//! # Who owns a buffer
//! Every buffer is in exactly one state, recorded in the ring's slab:
//! - `Kernel`: in the provided buffer ring; the kernel may write into it at any moment. Rust code never
//!   forms a reference to it.
//! - `App`: delivered by a receive completion, as a [`Buf`] token (not `Clone`). Only now can the caller
//!   touch the bytes, through [`Ring::buf_mut`]. The token goes back with [`Ring::send`] or
//!   [`Ring::release`].
//! - `Send`: a `SendMsg` reads it; it returns to `Kernel` when that send's completion is reaped.
//!
//! # Buffer layout
//! Buffers are `slot_size`-byte slots of one page-aligned slab. In multishot mode the kernel writes an
//! `io_uring_recvmsg_out` header, the source address and room for one control message (a wildcard
//! listener's `IP_PKTINFO` / `IPV6_PKTINFO`: the address the datagram was sent to) in front of the
//! payload; the provided buffer starts `HDR` bytes before `headroom`, so that the payload lands exactly
//! at `headroom` and the header space becomes the caller's headroom once the addresses have been read
//! out. The control room is the same for every socket (one buffer ring feeds them all); a socket without
//! the option gets no control message, and its 40 bytes stay unwritten:
//!
//! ```text
//! slot:  [ 0 .. headroom-84 | recvmsg_out (16) | sockaddr (28) | control (40) | payload (≤ max_payload) ]
//!                           ^ provided buffer  ^ headroom-68   ^ headroom-40  ^ headroom
//! ```
//!
//! # user_data
//! The top byte is the operation kind; a receive carries the caller's socket tag in the low 32 bits, a
//! send the buffer index in bits 32..48 and the tag in the low 32 bits. Wake-up reads, cancellations and
//! readiness polls (a poll carries the caller's tag) have kinds of their own.
//!
//! Requires Linux 6.0 (multishot `RecvMsg`; provided buffer rings are 5.19). [`probe`] checks this by
//! trying it, so that older kernels fall back to the epoll backend.

use std::alloc::Layout;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::Range;
use std::os::fd::RawFd;
use std::ptr::{addr_of_mut, NonNull};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};

use super::{parse_pktinfo, std_to_sockaddr, write_pktinfo, PktinfoBuf, PKTINFO_SPACE};

/// Bytes the kernel writes in front of a multishot payload: `io_uring_recvmsg_out`, a `sockaddr_in6` and
/// a control buffer for one pktinfo message.
pub const HDR: usize = OUT_LEN + NAME_LEN + CTRL_LEN;
const OUT_LEN: usize = 16;
const NAME_LEN: usize = std::mem::size_of::<libc::sockaddr_in6>();
const CTRL_LEN: usize = PKTINFO_SPACE;
/// The provided buffer group (one per ring).
const BGID: u16 = 0;
/// Completions copied out of the completion queue at a time.
const BATCH: usize = 256;

const KIND: u64 = 0xFF << 56;
const RECV: u64 = 1 << 56;
const SEND: u64 = 2 << 56;
const WAKE: u64 = 3 << 56;
const CANCEL: u64 = 4 << 56;
const POLL: u64 = 5 << 56;

/// Check that io_uring works here and supports what the backend uses: the RecvMsg, SendMsg, Read and
/// AsyncCancel opcodes, provided buffer rings, and multishot `RecvMsg` (tried on a loopback socket).
/// The error says why not (seccomp, `kernel.io_uring_disabled`, an old kernel).
///
/// Runs on a short-lived thread of its own: closing a ring makes the closing thread's next blocking system
/// call fail once with `EINTR` (seen on Linux 6.x; a socket read with a timeout does not restart), and the
/// caller should not inherit that.
pub fn probe() -> Result<(), String> {
    std::thread::Builder::new()
        .name("turnpike-uring-probe".into())
        .spawn(probe_here)
        .map_err(|e| format!("cannot start the io_uring probe thread: {e}"))?
        .join()
        .unwrap_or_else(|_| Err("the io_uring probe panicked".into()))
}

fn probe_here() -> Result<(), String> {
    let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe failed: {e}"))?;
    for (code, name) in [
        (opcode::RecvMsg::CODE, "RecvMsg"),
        (opcode::SendMsg::CODE, "SendMsg"),
        (opcode::Read::CODE, "Read"),
        (opcode::AsyncCancel::CODE, "AsyncCancel"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("io_uring lacks the {name} opcode"));
        }
    }
    if !ring.params().is_feature_nodrop() || !ring.params().is_feature_ext_arg() {
        return Err("io_uring lacks the NODROP or EXT_ARG feature (Linux < 5.11)".into());
    }
    drop(ring);
    probe_multishot().map_err(|e| format!("multishot recvmsg with a buffer ring failed: {e}"))
}

/// Receive one datagram through a multishot `RecvMsg` on a small ring.
fn probe_multishot() -> io::Result<()> {
    let mut ring = Ring::new(RingConfig {
        entries: 8,
        buffers: 4,
        slot_size: 256,
        headroom: HDR,
        max_payload: 64,
    })?;
    let sock = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    sock.set_nonblocking(true)?;
    ring.recv(std::os::fd::AsRawFd::as_raw_fd(&sock), 7)?;
    ring.submit_and_wait_timeout(0, Duration::ZERO)?;
    sock.send_to(b"probe", sock.local_addr()?)?;
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        ring.submit_and_wait_timeout(1, Duration::from_millis(50))?;
        ring.reap();
        while let Some(c) = ring.next_completion() {
            match c {
                Completion::Recv {
                    tag: 7,
                    buf,
                    len: 5,
                    more: true,
                    ..
                } => {
                    ring.release(buf);
                    return Ok(());
                }
                Completion::Recv { buf, .. } => {
                    ring.release(buf);
                    return Err(io::Error::other("unexpected receive completion"));
                }
                Completion::RecvEnded { errno, .. } => {
                    return Err(io::Error::from_raw_os_error(errno))
                }
                _ => {}
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "no completion within 1 s",
    ))
}

/// Sizes of a [`Ring`].
#[derive(Debug, Clone, Copy)]
pub struct RingConfig {
    /// Submission queue entries (the completion queue gets room for every buffer's completion besides).
    pub entries: u32,
    /// Receive buffers: a power of two, at most 32768.
    pub buffers: u16,
    /// Bytes per buffer slot.
    pub slot_size: usize,
    /// Where in its slot a payload lands; at least [`HDR`] (the kernel's header, address and control
    /// message go in front).
    pub headroom: usize,
    /// The largest payload received whole (longer ones are cut and flagged truncated);
    /// `headroom + max_payload <= slot_size`.
    pub max_payload: usize,
}

/// A received buffer the caller holds (see the module doc). Give it back with [`Ring::send`] or
/// [`Ring::release`]; a token that is dropped instead keeps its buffer out of the kernel's ring.
#[derive(Debug)]
pub struct Buf(u16);

impl Buf {
    /// The buffer's index in the slab.
    pub fn index(&self) -> usize {
        usize::from(self.0)
    }
}

/// What a reaped completion means.
#[derive(Debug)]
pub enum Completion {
    /// A datagram arrived on the socket armed with `tag`. Its payload is
    /// `buf_mut(&buf)[headroom..headroom + len]`.
    Recv {
        /// The socket's tag.
        tag: u32,
        /// The buffer; the caller owns it now.
        buf: Buf,
        /// The sender.
        from: SocketAddr,
        /// Payload bytes.
        len: usize,
        /// It did not fit (or its address could not be read): drop it.
        truncated: bool,
        /// The address it was sent to, on a socket with [`super::set_pktinfo`].
        local: Option<IpAddr>,
        /// The socket's receive is still armed. If false, arm it again (unless the socket is going away).
        more: bool,
    },
    /// The socket's receive ended without a datagram: cancelled, out of buffers (`ENOBUFS`), or an error
    /// such as an ICMP `ECONNREFUSED`. Arm it again unless the socket is going away.
    RecvEnded {
        /// The socket's tag.
        tag: u32,
        /// The errno, 0 if none.
        errno: i32,
    },
    /// A send finished; its buffer is back in the kernel's ring.
    Sent {
        /// The tag given to [`Ring::send`].
        tag: u32,
        /// The index ([`Buf::index`]) of the buffer that was sent.
        buf: usize,
        /// Bytes sent, or `-errno`.
        result: i32,
    },
    /// The eventfd read completed: arm it again with [`Ring::read_eventfd`].
    Wake,
    /// A poll armed with [`Ring::poll_readable`] fired (or failed): serve the fd, then arm it again.
    Ready {
        /// The tag given to [`Ring::poll_readable`].
        tag: u32,
    },
}

/// A buffer's owner (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Kernel,
    App,
    Send,
}

/// A UDP datagram ring (see the module doc). Not `Send`: with `SINGLE_ISSUER` and `DEFER_TASKRUN` only
/// the thread that created it may use it.
///
/// Dropping it cancels whatever is in flight and waits (up to about a second) for those completions; it
/// then closes the ring, which makes the thread's next blocking system call fail once with `EINTR`.
#[derive(Debug)]
pub struct Ring {
    // Field order matters: the ring closes before the memory it used is freed.
    uring: Uring,
    mem: Memory,
    state: Box<[State]>,
    buffers: u16,
    slot_size: usize,
    headroom: usize,
    max_payload: usize,
    /// Our copy of the provided buffer ring's tail.
    tail: u16,
    /// Completions copied out of the queue: (user_data, result, flags).
    batch: Box<[(u64, i32, u32)]>,
    batch_pos: usize,
    batch_len: usize,
    /// Operations whose final completion has not been reaped.
    ops: usize,
    /// Buffers in `App` or `Send` state.
    held: usize,
    wake_armed: bool,
    buf_ring_registered: bool,
}

/// `IoUring` is not `Debug`.
struct Uring(IoUring);

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IoUring")
    }
}

/// The memory the kernel reads or writes, each region allocated once. Freed on drop unless `leak` is set
/// (operations may still be in flight).
#[derive(Debug)]
struct Memory {
    slab: Region,
    buf_ring: Region,
    /// One `SendHdr` per buffer.
    send_hdrs: Region,
    /// The `msghdr` every multishot receive points to (only its name and control lengths matter).
    recv_hdr: Region,
    /// Where wake-up reads land.
    wake: Region,
    leak: bool,
}

impl Drop for Memory {
    fn drop(&mut self) {
        if self.leak {
            for r in [
                &mut self.slab,
                &mut self.buf_ring,
                &mut self.send_hdrs,
                &mut self.recv_hdr,
                &mut self.wake,
            ] {
                r.leak = true;
            }
        }
    }
}

/// Per-buffer `sendmsg` arguments: they must stay put until the send completes.
#[repr(C)]
struct SendHdr {
    msg: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_storage,
    /// The source address of a send from a wildcard socket.
    control: PktinfoBuf,
}

/// One entry of a provided buffer ring (`struct io_uring_buf`). The `resv` field of entry 0 is the
/// ring's tail.
#[repr(C)]
struct BufEntry {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

/// A zeroed heap allocation with a fixed address, shared with the kernel through raw pointers only.
#[derive(Debug)]
struct Region {
    ptr: NonNull<u8>,
    layout: Layout,
    leak: bool,
}

impl Region {
    fn new(size: usize, align: usize) -> io::Result<Region> {
        let layout = Layout::from_size_align(size.max(1), align)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(Region {
            ptr,
            layout,
            leak: false,
        })
    }

    fn as_ptr<T>(&self) -> *mut T {
        self.ptr.as_ptr().cast()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if !self.leak {
            // SAFETY: allocated in `Region::new` with this layout, freed once.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
        }
    }
}

impl Ring {
    /// A ring with `cfg.buffers` receive buffers, all handed to the kernel.
    pub fn new(cfg: RingConfig) -> io::Result<Ring> {
        let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, why.to_string());
        if !cfg.buffers.is_power_of_two() || cfg.buffers > 1 << 15 {
            return Err(invalid("buffers must be a power of two up to 32768"));
        }
        if cfg.headroom < HDR || cfg.headroom + cfg.max_payload > cfg.slot_size {
            return Err(invalid(
                "need headroom >= HDR (84) and headroom + max_payload <= slot_size",
            ));
        }
        let n = usize::from(cfg.buffers);
        let cq = (u32::from(cfg.buffers) * 2).max(cfg.entries * 2);
        let uring = build_uring(cfg.entries, cq)?;
        let page = 4096;
        let mem = Memory {
            slab: Region::new(n * cfg.slot_size, page)?,
            buf_ring: Region::new(n * std::mem::size_of::<BufEntry>(), page)?,
            send_hdrs: Region::new(
                n * std::mem::size_of::<SendHdr>(),
                std::mem::align_of::<SendHdr>(),
            )?,
            recv_hdr: Region::new(
                std::mem::size_of::<libc::msghdr>(),
                std::mem::align_of::<libc::msghdr>(),
            )?,
            wake: Region::new(8, 8)?,
            leak: false,
        };
        let recv_hdr = mem.recv_hdr.as_ptr::<libc::msghdr>();
        // SAFETY: `recv_hdr` is a zeroed, aligned msghdr allocation that nothing else uses yet. In
        // multishot mode the kernel reads only the two lengths (the control bytes go into each buffer).
        unsafe {
            (*recv_hdr).msg_namelen = NAME_LEN as libc::socklen_t;
            (*recv_hdr).msg_controllen = CTRL_LEN;
        }
        // SAFETY: the buffer ring region is page aligned, `buffers` entries long, zeroed (so its tail is 0),
        // and lives until after the ring is closed (field order, and `Drop` unregisters it first).
        unsafe {
            uring
                .0
                .submitter()
                .register_buf_ring_with_flags(
                    mem.buf_ring.as_ptr::<BufEntry>() as u64,
                    cfg.buffers,
                    BGID,
                    0,
                )
                .map_err(|e| io::Error::new(e.kind(), format!("register buffer ring: {e}")))?;
        }
        let mut ring = Ring {
            uring,
            mem,
            state: vec![State::App; n].into_boxed_slice(),
            buffers: cfg.buffers,
            slot_size: cfg.slot_size,
            headroom: cfg.headroom,
            max_payload: cfg.max_payload,
            tail: 0,
            batch: vec![(0, 0, 0); BATCH].into_boxed_slice(),
            batch_pos: 0,
            batch_len: 0,
            ops: 0,
            held: n,
            wake_armed: false,
            buf_ring_registered: true,
        };
        for i in 0..cfg.buffers {
            ring.release(Buf(i));
        }
        Ok(ring)
    }

    /// Arm a multishot receive on `fd`; its completions carry `tag`. Arm at most one per socket at a time
    /// (again after `more: false` or [`Completion::RecvEnded`]).
    pub fn recv(&mut self, fd: RawFd, tag: u32) -> io::Result<()> {
        let sqe = opcode::RecvMsgMulti::new(Fd(fd), self.mem.recv_hdr.as_ptr(), BGID)
            .build()
            .user_data(RECV | u64::from(tag));
        // SAFETY: the msghdr is ring-owned, never written after `new`, and outlives every operation; the
        // data goes into provided buffers, which are in `Kernel` state.
        unsafe { self.push(&sqe)? };
        self.ops += 1;
        Ok(())
    }

    /// Cancel the receive armed with `tag`; its [`Completion::RecvEnded`] (or a last `more: false`
    /// datagram) follows.
    pub fn cancel_recv(&mut self, tag: u32) -> io::Result<()> {
        let sqe = opcode::AsyncCancel::new(RECV | u64::from(tag))
            .build()
            .user_data(CANCEL | u64::from(tag));
        // SAFETY: a cancellation refers to no memory.
        unsafe { self.push(&sqe)? };
        self.ops += 1;
        Ok(())
    }

    /// Arm an 8-byte read of eventfd `fd` (a no-op if one is armed); it completes as [`Completion::Wake`].
    pub fn read_eventfd(&mut self, fd: RawFd) -> io::Result<()> {
        if self.wake_armed {
            return Ok(());
        }
        let sqe = opcode::Read::new(Fd(fd), self.mem.wake.as_ptr(), 8)
            .build()
            .user_data(WAKE);
        // SAFETY: the 8-byte target is ring-owned, outlives the operation, and is never read by Rust code;
        // at most one read is armed at a time.
        unsafe { self.push(&sqe)? };
        self.ops += 1;
        self.wake_armed = true;
        Ok(())
    }

    /// Arm a one-shot readiness poll of `fd` for reading; it completes as [`Completion::Ready`] with `tag`.
    /// Used for fds served with plain non-blocking syscalls (an epoll set of TCP connections).
    pub fn poll_readable(&mut self, fd: RawFd, tag: u32) -> io::Result<()> {
        let sqe = opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(POLL | u64::from(tag));
        // SAFETY: a poll refers to no memory.
        unsafe { self.push(&sqe)? };
        self.ops += 1;
        Ok(())
    }

    /// The whole slot of a buffer the caller holds.
    pub fn buf_mut(&mut self, buf: &Buf) -> &mut [u8] {
        let i = buf.index();
        if self.state.get(i) != Some(&State::App) {
            // A token of another ring: never hand out memory the kernel may be using.
            return &mut [];
        }
        // SAFETY: the slot is inside the slab, and in `App` state no operation uses it; the returned borrow
        // holds `self` mutably, so no other reference to the slot can be formed meanwhile.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.mem.slab.as_ptr::<u8>().add(i * self.slot_size),
                self.slot_size,
            )
        }
    }

    /// Send `range` of `buf`'s slot to `dst` from `fd`, without copying; with `src`, from that source
    /// address (`IP_PKTINFO` / `IPV6_PKTINFO`, for a socket bound to a wildcard address). The buffer
    /// returns to the kernel's ring when the send completes ([`Completion::Sent`] with `tag`), or at once
    /// if this fails.
    pub fn send(
        &mut self,
        buf: Buf,
        fd: RawFd,
        tag: u32,
        range: Range<usize>,
        dst: SocketAddr,
        src: Option<IpAddr>,
    ) -> io::Result<()> {
        let i = buf.index();
        if self.state.get(i) != Some(&State::App)
            || range.start > range.end
            || range.end > self.slot_size
        {
            self.release(buf);
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let (addr, addr_len) = std_to_sockaddr(dst);
        // SAFETY: `i < buffers`, so the header is inside the region; in `App` state no operation uses
        // this buffer's header, and `range` lies inside its slot (checked above).
        let hdr = unsafe {
            let hdr = self.mem.send_hdrs.as_ptr::<SendHdr>().add(i);
            addr_of_mut!((*hdr).addr).write(addr);
            addr_of_mut!((*hdr).iov).write(libc::iovec {
                iov_base: self
                    .mem
                    .slab
                    .as_ptr::<u8>()
                    .add(i * self.slot_size + range.start)
                    .cast(),
                iov_len: range.len(),
            });
            let msg = addr_of_mut!((*hdr).msg);
            msg.write(std::mem::zeroed());
            (*msg).msg_name = addr_of_mut!((*hdr).addr).cast();
            (*msg).msg_namelen = addr_len;
            (*msg).msg_iov = addr_of_mut!((*hdr).iov);
            (*msg).msg_iovlen = 1;
            if let Some(src) = src {
                let control = &mut *addr_of_mut!((*hdr).control);
                (*msg).msg_controllen = write_pktinfo(control, src);
                (*msg).msg_control = control.0.as_mut_ptr().cast();
            }
            msg
        };
        let sqe = opcode::SendMsg::new(Fd(fd), hdr)
            .flags(libc::MSG_DONTWAIT as u32)
            .build()
            .user_data(SEND | (i as u64) << 32 | u64::from(tag));
        self.state[i] = State::Send;
        // SAFETY: the msghdr, iovec, address and bytes are ring-owned and untouched while the buffer is in
        // `Send` state, which lasts until this operation's completion is reaped.
        match unsafe { self.push(&sqe) } {
            Ok(()) => {
                self.ops += 1;
                Ok(())
            }
            Err(e) => {
                self.state[i] = State::App;
                self.release(buf);
                Err(e)
            }
        }
    }

    /// Give a buffer back to the kernel's ring.
    pub fn release(&mut self, buf: Buf) {
        if self.state.get(buf.index()) == Some(&State::App) {
            self.give_back(buf.0);
        }
    }

    /// Submit what was queued and wait for `want` completions (0: do not wait). An interrupted wait
    /// (`EINTR`) or a completion queue that must be reaped first (`EBUSY`) returns `Ok`.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        match self.uring.0.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) if is_transient(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Like [`submit_and_wait`](Self::submit_and_wait), but wait at most `timeout`.
    pub fn submit_and_wait_timeout(&mut self, want: usize, timeout: Duration) -> io::Result<()> {
        let ts = Timespec::new()
            .sec(timeout.as_secs())
            .nsec(timeout.subsec_nanos());
        let args = SubmitArgs::new().timespec(&ts);
        match self.uring.0.submitter().submit_with_args(want, &args) {
            Ok(_) => Ok(()),
            Err(e) if is_transient(&e) || e.raw_os_error() == Some(libc::ETIME) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Take the completions that have arrived into the ring's batch, if the batch is used up; returns how
    /// many wait there. No system call. Everything in a batch was posted before `reap` returned, so state
    /// changed before those events happened can be applied first (the worker drains its mailbox here).
    pub fn reap(&mut self) -> usize {
        if self.batch_pos == self.batch_len {
            self.batch_pos = 0;
            self.batch_len = 0;
            let mut cq = self.uring.0.completion();
            while self.batch_len < BATCH {
                let Some(e) = cq.next() else { break };
                self.batch[self.batch_len] = (e.user_data(), e.result(), e.flags());
                self.batch_len += 1;
            }
        }
        self.batch_len - self.batch_pos
    }

    /// The next completion of the batch taken by [`reap`](Self::reap).
    pub fn next_completion(&mut self) -> Option<Completion> {
        while self.batch_pos < self.batch_len {
            let (user_data, res, flags) = self.batch[self.batch_pos];
            self.batch_pos += 1;
            if let Some(c) = self.decode(user_data, res, flags) {
                return Some(c);
            }
        }
        None
    }

    /// Buffers the caller holds or that are being sent (0 when all are back in the kernel's ring).
    pub fn buffers_held(&self) -> usize {
        self.held
    }

    /// Operations whose final completion has not been reaped.
    pub fn ops_in_flight(&self) -> usize {
        self.ops
    }

    /// Queue an SQE, submitting once to make room if the queue is full.
    ///
    /// # Safety
    /// Every pointer in `sqe` must refer to memory that stays valid, and that Rust code neither writes nor
    /// (if the kernel writes it) reads, until the operation's final completion has been reaped.
    unsafe fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        for attempt in 0..2 {
            // SAFETY: forwarded from the caller.
            if unsafe { self.uring.0.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            if attempt == 0 {
                match self.uring.0.submit() {
                    Ok(_) => {}
                    Err(e) if is_transient(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "io_uring submission queue full",
        ))
    }

    fn decode(&mut self, user_data: u64, res: i32, flags: u32) -> Option<Completion> {
        let tag = user_data as u32;
        match user_data & KIND {
            RECV => {
                let more = cqueue::more(flags);
                if !more {
                    self.ops = self.ops.saturating_sub(1);
                }
                let buf = cqueue::buffer_select(flags)
                    .filter(|&b| self.state.get(usize::from(b)) == Some(&State::Kernel));
                match buf {
                    Some(b) if res >= 0 => {
                        self.state[usize::from(b)] = State::App;
                        self.held += 1;
                        let buf = Buf(b);
                        let (from, local, len, truncated) = self.parse_recv(&buf, res as usize);
                        Some(Completion::Recv {
                            tag,
                            buf,
                            from,
                            len,
                            truncated,
                            local,
                            more,
                        })
                    }
                    _ => {
                        if let Some(b) = buf {
                            self.held += 1;
                            self.give_back(b);
                        }
                        (!more).then_some(Completion::RecvEnded {
                            tag,
                            errno: if res < 0 { -res } else { 0 },
                        })
                    }
                }
            }
            SEND => {
                self.ops = self.ops.saturating_sub(1);
                let i = ((user_data >> 32) & 0xFFFF) as u16;
                if self.state.get(usize::from(i)) == Some(&State::Send) {
                    self.give_back(i);
                }
                Some(Completion::Sent {
                    tag,
                    buf: usize::from(i),
                    result: res,
                })
            }
            WAKE => {
                self.ops = self.ops.saturating_sub(1);
                self.wake_armed = false;
                Some(Completion::Wake)
            }
            POLL => {
                self.ops = self.ops.saturating_sub(1);
                Some(Completion::Ready { tag })
            }
            _ => {
                // CANCEL, or anything unknown: nothing to report.
                self.ops = self.ops.saturating_sub(1);
                None
            }
        }
    }

    /// Put buffer `b` (held by us or a finished send) at the tail of the kernel's ring.
    fn give_back(&mut self, b: u16) {
        let i = usize::from(b);
        self.state[i] = State::Kernel;
        self.held -= 1;
        let mask = self.buffers - 1;
        let ring = self.mem.buf_ring.as_ptr::<BufEntry>();
        // SAFETY: `tail & mask < buffers` indexes the ring region. The kernel only reads entries between
        // its head and the published tail, and this entry is past the tail. Only `addr`, `len` and `bid`
        // are written: entry 0's `resv` is the tail, which the kernel may be reading.
        unsafe {
            let e = ring.add(usize::from(self.tail & mask));
            addr_of_mut!((*e).addr).write(
                self.mem
                    .slab
                    .as_ptr::<u8>()
                    .add(i * self.slot_size + self.headroom - HDR) as u64,
            );
            addr_of_mut!((*e).len).write((HDR + self.max_payload) as u32);
            addr_of_mut!((*e).bid).write(b);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: entry 0's `resv` field is a u16 at a 2-aligned address inside the region, which lives as
        // long as `self`; the kernel reads it concurrently, so it is only accessed atomically.
        let tail = unsafe { &*addr_of_mut!((*ring).resv).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }

    /// Read the kernel's `io_uring_recvmsg_out`, the source address and a pktinfo control message (the
    /// destination address) in front of the payload.
    fn parse_recv(&mut self, buf: &Buf, res: usize) -> (SocketAddr, Option<IpAddr>, usize, bool) {
        let base = self.headroom - HDR;
        let slot = self.buf_mut(buf);
        let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        let Some(hdr) = slot.get(base..base + HDR) else {
            return (unspecified, None, 0, true);
        };
        let word = |k: usize| u32::from_ne_bytes([hdr[k], hdr[k + 1], hdr[k + 2], hdr[k + 3]]);
        let (namelen, controllen) = (word(0) as usize, word(4) as usize);
        let (payloadlen, flags) = (word(8) as usize, word(12));
        let len = payloadlen.min(res.saturating_sub(HDR));
        let from = parse_sockaddr(&hdr[OUT_LEN..], namelen);
        let control = &hdr[OUT_LEN + NAME_LEN..];
        let local = control
            .get(..controllen.min(CTRL_LEN))
            .and_then(parse_pktinfo);
        let truncated = flags & libc::MSG_TRUNC as u32 != 0 || res < HDR || from.is_none();
        (from.unwrap_or(unspecified), local, len, truncated)
    }

    /// Cancel everything and reap until nothing is in flight (at most about a second). True if drained.
    fn shutdown(&mut self) -> bool {
        if self.ops > 0 {
            let sqe = opcode::AsyncCancel2::new(CancelBuilder::any())
                .build()
                .user_data(CANCEL);
            // SAFETY: a cancellation refers to no memory.
            if unsafe { self.push(&sqe) }.is_ok() {
                self.ops += 1;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.ops > 0 && Instant::now() < deadline {
            if self
                .submit_and_wait_timeout(1, Duration::from_millis(10))
                .is_err()
            {
                break;
            }
            while self.reap() > 0 {
                while let Some(c) = self.next_completion() {
                    if let Completion::Recv { buf, .. } = c {
                        self.release(buf);
                    }
                }
            }
        }
        if self.ops == 0 && self.buf_ring_registered {
            self.buf_ring_registered = self.uring.0.submitter().unregister_buf_ring(BGID).is_err();
        }
        self.ops == 0 && !self.buf_ring_registered
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // If something may still be in flight, leak the memory rather than let the kernel write to freed
        // memory. Closing the ring (the first field) happens before `mem` is dropped.
        self.mem.leak = !self.shutdown();
    }
}

/// Try the fastest setup flags first (single issuer, deferred task work: completions are posted only
/// when this thread waits for them), then older ones.
fn build_uring(entries: u32, cq: u32) -> io::Result<Uring> {
    let mut first_err = None;
    for variant in 0..3 {
        let mut b = IoUring::builder();
        b.setup_cqsize(cq);
        match variant {
            0 => {
                b.setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_submit_all();
            }
            1 => {
                b.setup_coop_taskrun().setup_submit_all();
            }
            _ => {}
        }
        match b.build(entries) {
            Ok(r) => return Ok(Uring(r)),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.unwrap_or_else(|| io::Error::other("io_uring_setup failed")))
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
    )
}

/// A `sockaddr_in` / `sockaddr_in6` as the kernel wrote it (native-endian family, network-order port).
fn parse_sockaddr(name: &[u8], len: usize) -> Option<SocketAddr> {
    let family = i32::from(u16::from_ne_bytes([*name.first()?, *name.get(1)?]));
    let port = u16::from_be_bytes([*name.get(2)?, *name.get(3)?]);
    match family {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            let ip: [u8; 4] = name.get(4..8)?.try_into().ok()?;
            Some(SocketAddrV4::new(Ipv4Addr::from(ip), port).into())
        }
        libc::AF_INET6 if len >= NAME_LEN => {
            let flow = u32::from_be_bytes(name.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = name.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(name.get(24..28)?.try_into().ok()?);
            Some(SocketAddrV6::new(Ipv6Addr::from(ip), port, flow, scope).into())
        }
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    const SLOT: usize = 512;
    const HEAD: usize = 96;

    fn ring(buffers: u16) -> Ring {
        Ring::new(RingConfig {
            entries: 32,
            buffers,
            slot_size: SLOT,
            headroom: HEAD,
            max_payload: SLOT - HEAD - 4,
        })
        .unwrap()
    }

    /// Wait (up to 2 s) and collect completions until `done` says so.
    fn reap(ring: &mut Ring, mut done: impl FnMut(&mut Ring, Completion) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            ring.submit_and_wait_timeout(1, Duration::from_millis(20))
                .unwrap();
            while ring.reap() > 0 {
                while let Some(c) = ring.next_completion() {
                    if done(ring, c) {
                        return;
                    }
                }
            }
        }
        panic!("timed out waiting for completions");
    }

    /// Reap (up to 2 s) until nothing is in flight, releasing whatever arrives.
    fn settle(ring: &mut Ring) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while ring.ops_in_flight() > 0 && Instant::now() < deadline {
            ring.submit_and_wait_timeout(1, Duration::from_millis(20))
                .unwrap();
            while ring.reap() > 0 {
                while let Some(c) = ring.next_completion() {
                    if let Completion::Recv { buf, .. } = c {
                        ring.release(buf);
                    }
                }
            }
        }
    }

    #[test]
    fn probe_succeeds_here_and_leaves_the_caller_uninterrupted() {
        probe().unwrap();
        // Closing a ring interrupts the closing thread's next blocking call; the probe closes its rings
        // on a thread of its own.
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let err = s.recv_from(&mut [0u8; 8]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn round_trip_over_loopback_and_all_buffers_come_back() {
        let mut ring = ring(8);
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_nonblocking(true).unwrap();
        ring.recv(b.as_raw_fd(), 42).unwrap();
        ring.submit_and_wait(0).unwrap();
        let payloads: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
        for p in &payloads {
            a.send_to(p, b.local_addr().unwrap()).unwrap();
        }
        let mut got = 0;
        reap(&mut ring, |ring, c| {
            let Completion::Recv {
                tag,
                buf,
                from,
                len,
                truncated,
                local,
                more,
            } = c
            else {
                panic!("unexpected {c:?}");
            };
            assert_eq!(
                (tag, from, truncated, local, more),
                (42, a.local_addr().unwrap(), false, None, true)
            );
            let slot = ring.buf_mut(&buf);
            assert_eq!(&slot[HEAD..HEAD + len], &payloads[got][..]);
            // Write a 2-byte marker into the headroom and send marker + payload back, from the same slot.
            slot[HEAD - 2..HEAD].copy_from_slice(b"ok");
            ring.send(buf, b.as_raw_fd(), 42, HEAD - 2..HEAD + len, from, None)
                .unwrap();
            got += 1;
            got == payloads.len()
        });
        let mut sent = 0;
        if ring.buffers_held() > 0 {
            reap(&mut ring, |ring, c| {
                let Completion::Sent {
                    tag: 42, result, ..
                } = c
                else {
                    panic!("unexpected {c:?}");
                };
                assert!(result > 0);
                sent += 1;
                ring.buffers_held() == 0
            });
        }
        let mut buf = [0u8; 600];
        for p in &payloads {
            let (n, from) = a.recv_from(&mut buf).unwrap();
            assert_eq!(from, b.local_addr().unwrap());
            assert_eq!(&buf[..2], b"ok");
            assert_eq!(&buf[2..n], &p[..]);
        }
        assert_eq!(ring.buffers_held(), 0);
        assert_eq!(ring.ops_in_flight(), 1, "only the multishot receive");
        ring.cancel_recv(42).unwrap();
        reap(
            &mut ring,
            |_, c| matches!(c, Completion::RecvEnded { tag: 42, errno } if errno == libc::ECANCELED),
        );
        // The cancellation's own completion may come with the receive's or after it.
        settle(&mut ring);
        assert_eq!(ring.ops_in_flight(), 0);
    }

    #[test]
    fn eventfd_read_wakes_the_ring() {
        let mut ring = ring(2);
        let efd = crate::sys::EventFd::new().unwrap();
        ring.read_eventfd(efd.as_raw_fd()).unwrap();
        ring.read_eventfd(efd.as_raw_fd()).unwrap();
        ring.submit_and_wait_timeout(1, Duration::from_millis(20))
            .unwrap();
        assert_eq!(ring.reap(), 0, "nothing to read yet");
        efd.notify().unwrap();
        reap(&mut ring, |_, c| matches!(c, Completion::Wake));
        assert_eq!(ring.ops_in_flight(), 0);
    }

    #[test]
    fn out_of_buffers_ends_the_receive_and_rearming_resumes_it() {
        let mut ring = ring(2);
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_nonblocking(true).unwrap();
        ring.recv(b.as_raw_fd(), 1).unwrap();
        ring.submit_and_wait(0).unwrap();
        for i in 0..5u8 {
            a.send_to(&[i], b.local_addr().unwrap()).unwrap();
        }
        let mut held = Vec::new();
        let mut seen = Vec::new();
        let mut ended = false;
        // Hold every buffer: after two datagrams the receive must end with ENOBUFS.
        reap(&mut ring, |ring, c| {
            match c {
                Completion::Recv { buf, len, .. } => {
                    seen.push(ring.buf_mut(&buf)[HEAD..HEAD + len].to_vec());
                    held.push(buf);
                }
                Completion::RecvEnded { errno, .. } => {
                    assert_eq!(errno, libc::ENOBUFS);
                    ended = true;
                }
                c => panic!("unexpected {c:?}"),
            }
            ended && held.len() == 2
        });
        for buf in held.drain(..) {
            ring.release(buf);
        }
        assert_eq!(ring.buffers_held(), 0);
        // Re-arm whenever it ends (it may run dry again before the buffers it filled are reaped).
        ring.recv(b.as_raw_fd(), 1).unwrap();
        reap(&mut ring, |ring, c| {
            match c {
                Completion::Recv { buf, len, .. } => {
                    seen.push(ring.buf_mut(&buf)[HEAD..HEAD + len].to_vec());
                    ring.release(buf);
                }
                Completion::RecvEnded { .. } => ring.recv(b.as_raw_fd(), 1).unwrap(),
                c => panic!("unexpected {c:?}"),
            }
            seen.len() == 5
        });
        assert_eq!(seen, (0..5u8).map(|i| vec![i]).collect::<Vec<_>>());
    }

    #[test]
    fn oversized_datagrams_are_flagged_truncated() {
        let mut ring = ring(2);
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("[::1]:0")
            .or_else(|_| UdpSocket::bind("127.0.0.1:0"))
            .unwrap();
        let a = if b.local_addr().unwrap().is_ipv6() {
            UdpSocket::bind("[::1]:0").unwrap()
        } else {
            a
        };
        ring.recv(b.as_raw_fd(), 3).unwrap();
        ring.submit_and_wait(0).unwrap();
        a.send_to(&[9u8; SLOT], b.local_addr().unwrap()).unwrap();
        a.send_to(&[8u8; 20], b.local_addr().unwrap()).unwrap();
        let mut n = 0;
        reap(&mut ring, |ring, c| {
            let Completion::Recv {
                buf,
                from,
                truncated,
                len,
                ..
            } = c
            else {
                panic!("unexpected {c:?}");
            };
            assert_eq!(from, a.local_addr().unwrap());
            assert_eq!(
                (truncated, len),
                if n == 0 {
                    (true, SLOT - HEAD - 4)
                } else {
                    (false, 20)
                }
            );
            ring.release(buf);
            n += 1;
            n == 2
        });
    }

    #[test]
    fn dropping_a_ring_with_operations_in_flight_returns() {
        let mut ring = ring(4);
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let efd = crate::sys::EventFd::new().unwrap();
        ring.recv(b.as_raw_fd(), 1).unwrap();
        ring.read_eventfd(efd.as_raw_fd()).unwrap();
        ring.submit_and_wait(0).unwrap();
        let start = Instant::now();
        assert!(ring.shutdown(), "everything cancelled and reaped");
        drop(ring);
        assert!(start.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn foreign_tokens_get_no_memory() {
        let mut ring = ring(2);
        assert!(ring.buf_mut(&Buf(0)).is_empty(), "buffer 0 is the kernel's");
        assert!(ring.buf_mut(&Buf(99)).is_empty());
        ring.release(Buf(99));
        assert_eq!(ring.buffers_held(), 0);
    }

    /// A wildcard socket's datagrams carry the address they were sent to, and a send with that source
    /// leaves from it.
    #[test]
    fn a_wildcard_socket_reads_the_destination_and_replies_from_it() {
        let mut ring = ring(8);
        let w = UdpSocket::bind("0.0.0.0:0").unwrap();
        w.set_nonblocking(true).unwrap();
        crate::sys::set_pktinfo(&w, true).unwrap();
        let port = w.local_addr().unwrap().port();
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        ring.recv(w.as_raw_fd(), 7).unwrap();
        ring.submit_and_wait(0).unwrap();
        let targets: [IpAddr; 2] = ["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()];
        for ip in targets {
            c.send_to(b"hi", SocketAddr::new(ip, port)).unwrap();
        }
        let mut got = 0;
        reap(&mut ring, |ring, comp| {
            let Completion::Recv {
                buf,
                from,
                len,
                local,
                ..
            } = comp
            else {
                return false;
            };
            assert_eq!(local, Some(targets[got]));
            assert_eq!(&ring.buf_mut(&buf)[HEAD..HEAD + len], b"hi");
            ring.send(buf, w.as_raw_fd(), 7, HEAD..HEAD + len, from, local)
                .unwrap();
            got += 1;
            got == targets.len()
        });
        ring.submit_and_wait(0).unwrap();
        for ip in targets {
            let mut b = [0u8; 8];
            let (n, from) = c.recv_from(&mut b).unwrap();
            assert_eq!((&b[..n], from), (&b"hi"[..], SocketAddr::new(ip, port)));
        }
        ring.cancel_recv(7).unwrap();
        settle(&mut ring);
    }
}
