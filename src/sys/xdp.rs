//! The BPF map layouts of the XDP program (src/xdp/turnpike.bpf.c), byte for byte, and the `unsafe`
//! that declaring them plain data needs; and entering a network namespace (tests, and the loader's
//! caller when it attaches in one).
//!
//! Every struct is `#[repr(C)]` with explicit padding fields and no implicit padding, so that every byte
//! of a key is initialised: the kernel hashes keys as raw bytes. IPv4 addresses use the first 4 of the
//! 16 address bytes; ports and channel numbers are in network byte order, as in the packet.

use std::io;
use std::os::fd::AsRawFd;

/// Family byte of an IPv4 entry.
pub const FAMILY_V4: u8 = 4;
/// Family byte of an IPv6 entry.
pub const FAMILY_V6: u8 = 6;

/// Index of the per-path counters (`paths` map), as the C `enum path_index`.
pub const PATH_XDP_TO_PEER: u32 = 0;
/// Datagrams forwarded peer → client in XDP.
pub const PATH_XDP_TO_CLIENT: u32 = 1;
/// Not UDP over IPv4/IPv6, a fragment, IP options or IPv6 extension headers: passed.
pub const PATH_PASS_NOT_IP_UDP: u32 = 2;
/// UDP without a channel entry (STUN, indications, unbound channels, unknown peers): passed.
pub const PATH_PASS_NO_ENTRY: u32 = 3;
/// Relay-to-relay (the peer is a relayed address of this host): passed.
pub const PATH_PASS_RELAY_TO_RELAY: u32 = 4;
/// No route or neighbour, forwarding disabled on the interface, or over the MTU: passed.
pub const PATH_PASS_FIB: u32 = 5;
/// A helper failed after the packet was changed: dropped.
pub const PATH_ABORTED: u32 = 6;
/// Number of per-path counters.
pub const PATH_COUNT: u32 = 7;

/// Key of `to_peer`: a client 5-tuple and channel.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ToPeerKey {
    /// Client IP.
    pub client_ip: [u8; 16],
    /// Listener IP the client sends to.
    pub listener_ip: [u8; 16],
    /// Client port (network order).
    pub client_port: [u8; 2],
    /// Listener port (network order).
    pub listener_port: [u8; 2],
    /// Channel number (network order).
    pub channel: [u8; 2],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Zero.
    pub pad: u8,
}

/// Value of `to_peer`: where the payload goes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ToPeerValue {
    /// The allocation's relayed IP.
    pub relayed_ip: [u8; 16],
    /// The peer IP.
    pub peer_ip: [u8; 16],
    /// Relayed port (network order).
    pub relayed_port: [u8; 2],
    /// Peer port (network order).
    pub peer_port: [u8; 2],
    /// The allocation's slot in `meters`.
    pub slot: u32,
}

/// Key of `to_client`: a relayed address and a peer with a channel bound.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ToClientKey {
    /// Relayed IP.
    pub relayed_ip: [u8; 16],
    /// Peer IP.
    pub peer_ip: [u8; 16],
    /// Relayed port (network order).
    pub relayed_port: [u8; 2],
    /// Peer port (network order).
    pub peer_port: [u8; 2],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Zero.
    pub pad: [u8; 3],
}

/// Value of `to_client`: the client 5-tuple and channel.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ToClientValue {
    /// Listener IP the client talks to.
    pub listener_ip: [u8; 16],
    /// Client IP.
    pub client_ip: [u8; 16],
    /// Listener port (network order).
    pub listener_port: [u8; 2],
    /// Client port (network order).
    pub client_port: [u8; 2],
    /// Channel number (network order).
    pub channel: [u8; 2],
    /// Zero.
    pub pad: u16,
    /// The allocation's slot in `meters`.
    pub slot: u32,
}

/// Key of `relayed`: a live relayed transport address of this host.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RelayedKey {
    /// IP.
    pub ip: [u8; 16],
    /// Port (network order).
    pub port: [u8; 2],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Zero.
    pub pad: u8,
}

/// One CPU's slot of `meters`: what XDP forwarded for one allocation (payload bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meter {
    /// Payload bytes client → peer.
    pub to_peer_bytes: u64,
    /// Datagrams client → peer.
    pub to_peer_packets: u64,
    /// Payload bytes peer → client.
    pub to_client_bytes: u64,
    /// Datagrams peer → client.
    pub to_client_packets: u64,
}

// Each of the six types below is `#[repr(C)]`, `Copy`, made only of integers and byte arrays, has no
// implicit padding (field sizes add up to the C struct's size: 40, 40, 40, 44, 20, 32 bytes, checked by
// the test below), and every bit pattern is a valid value: what `aya::Pod` requires for copying to and
// from the kernel.
// SAFETY: see above.
unsafe impl aya::Pod for ToPeerKey {}
// SAFETY: see above.
unsafe impl aya::Pod for ToPeerValue {}
// SAFETY: see above.
unsafe impl aya::Pod for ToClientKey {}
// SAFETY: see above.
unsafe impl aya::Pod for ToClientValue {}
// SAFETY: see above.
unsafe impl aya::Pod for RelayedKey {}
// SAFETY: see above.
unsafe impl aya::Pod for Meter {}

/// Moves the calling thread into the network namespace `/run/netns/{name}` (as `ip netns` names them).
/// Sockets the thread opens afterwards, and XDP programs it attaches by interface name, live there.
pub fn enter_netns(name: &str) -> io::Result<()> {
    let file = std::fs::File::open(format!("/run/netns/{name}"))?;
    super::syscall!(setns(file.as_raw_fd(), libc::CLONE_NEWNET))?;
    Ok(())
}

/// `MEMBARRIER_CMD_GLOBAL` (linux/membarrier.h; `MEMBARRIER_CMD_SHARED` before Linux 4.16).
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;

/// Waits until every XDP program run that started before the call has returned.
///
/// XDP programs run inside RCU read-side critical sections (the driver's NAPI poll with bottom halves
/// off, or `rcu_read_lock` for generic XDP), so one RCU grace period is enough; `membarrier(2)` with
/// `MEMBARRIER_CMD_GLOBAL` is `synchronize_rcu()` on a machine with more than one CPU (and nothing is
/// left to wait for on one). The grace period also orders the programs' map writes before what the
/// caller reads next. Blocks for the grace period: a few milliseconds, control thread only. Fails
/// where the command is refused (`nohz_full` kernels: `EINVAL`; seccomp).
pub fn wait_for_running_programs() -> io::Result<()> {
    // SAFETY: membarrier(2) takes no pointers: a command, flags and a CPU id, all plain integers.
    super::syscall!(syscall(
        libc::SYS_membarrier,
        MEMBARRIER_CMD_GLOBAL,
        0 as libc::c_uint,
        0 as libc::c_int
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grace_period_can_be_waited_for() {
        assert!(wait_for_running_programs().is_ok());
    }

    #[test]
    fn layouts_match_the_c_structs() {
        assert_eq!(std::mem::size_of::<ToPeerKey>(), 40);
        assert_eq!(std::mem::size_of::<ToPeerValue>(), 40);
        assert_eq!(std::mem::size_of::<ToClientKey>(), 40);
        assert_eq!(std::mem::size_of::<ToClientValue>(), 44);
        assert_eq!(std::mem::size_of::<RelayedKey>(), 20);
        assert_eq!(std::mem::size_of::<Meter>(), 32);
    }
}
