//! The kernel fast path: an XDP program (`turnpike.bpf.c` beside this file) that forwards ChannelData of
//! bound channels, and its loader.
//!
//! The program's maps are a cache of the route table, never a second place where relay decisions are
//! made: userspace decides a ChannelBind (authentication, permission, peer policy) and then writes the
//! entry through [`XdpTables`]; whatever the program does not find, or does not handle (STUN,
//! indications, fragments, IP options, relay-to-relay, no route yet), it passes to the userspace path
//! unchanged.
//!
//! The program is built by `build.rs` only with the cargo feature `xdp` (it needs clang); without it
//! [`FastPath::start`] reports that the build has no XDP, and [`XdpMode::Auto`] keeps the userspace path.
//!
//! Attachment is through a bpf_link owned by this process (aya uses `BPF_LINK_CREATE` on Linux ≥ 5.9):
//! when the process exits, even by SIGKILL, the kernel closes the link and detaches the program, so a
//! dead relay never keeps forwarding unbilled. Dropping [`FastPath`] detaches it too.
//!
//! Forwarding needs IP forwarding enabled on the attached interfaces (`bpf_fib_lookup` answers
//! "forwarding disabled" otherwise, and the datagrams stay on the userspace path) and Linux ≥ 5.18.
//!
//! May use: route, sys.

use core::net::SocketAddr;

/// How the XDP program is attached (`[xdp] mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XdpMode {
    /// No XDP (the default).
    #[default]
    Off,
    /// Native where the driver has it, else generic; any failure logs one line and keeps userspace.
    Auto,
    /// Native (driver) mode only; failing to attach is an error.
    Native,
    /// Generic (skb) mode only; failing to attach is an error.
    Generic,
}

/// The `[xdp]` settings (validated by `config`; `off` by default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XdpSettings {
    /// Interfaces to attach to (`[xdp] interfaces`).
    pub interfaces: Vec<String>,
    /// How (`[xdp] mode`).
    pub mode: XdpMode,
}

/// Why the fast path could not start or a map operation failed (start-up and control-plane tier).
#[derive(Debug)]
pub enum XdpError {
    /// The binary was built without the `xdp` cargo feature.
    NotBuilt,
    /// Loading the program or its maps failed (no CAP_BPF, old kernel, verifier).
    Load(String),
    /// Attaching to an interface failed (no such interface, driver without XDP in native mode).
    Attach {
        /// The interface.
        interface: String,
        /// What the kernel said.
        detail: String,
    },
    /// A map update or lookup failed (map full, or the relayed address was never added).
    Map(String),
}

impl core::fmt::Display for XdpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            XdpError::NotBuilt => {
                write!(f, "this turnpike was built without the `xdp` cargo feature")
            }
            XdpError::Load(d) => write!(f, "cannot load the XDP program: {d}"),
            XdpError::Attach { interface, detail } => {
                write!(f, "cannot attach the XDP program to {interface}: {detail}")
            }
            XdpError::Map(d) => write!(f, "XDP map: {d}"),
        }
    }
}

impl std::error::Error for XdpError {}

/// Packets per path, summed over CPUs (the program's `paths` map).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathCounters {
    /// Forwarded client → peer in XDP.
    pub xdp_to_peer: u64,
    /// Forwarded peer → client in XDP.
    pub xdp_to_client: u64,
    /// Passed: not plain UDP over IPv4/IPv6 (fragments, options, TCP, ...).
    pub pass_not_ip_udp: u64,
    /// Passed: UDP without a channel entry.
    pub pass_no_entry: u64,
    /// Passed: relay-to-relay.
    pub pass_relay_to_relay: u64,
    /// Passed: no route/neighbour, forwarding off, or over the MTU.
    pub pass_fib: u64,
    /// Dropped after a failed helper call.
    pub aborted: u64,
}

/// A client 5-tuple and channel as the kernel sees it: real addresses, not worker-local listener ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    /// The client's address.
    pub client: SocketAddr,
    /// The listener address the client sends to (and receives from).
    pub listener: SocketAddr,
    /// The channel number (0x4000–0x4FFF).
    pub channel: u16,
}

#[cfg(feature = "xdp")]
mod imp;
#[cfg(feature = "xdp")]
pub use imp::{attach_pass_program, FastPath, PassProgram, XdpTables};

#[cfg(not(feature = "xdp"))]
mod imp {
    //! Without the `xdp` feature no [`FastPath`] can exist (it holds an uninhabited value), so the
    //! mirror's kernel calls below are never reached; they keep one code path for both builds.
    use super::*;
    use crate::route::Counters;
    use core::convert::Infallible;

    /// The loaded program (this build has none: see the `xdp` feature).
    #[derive(Debug)]
    pub struct FastPath {
        never: Infallible,
    }

    /// The program's maps (this build has none).
    #[derive(Debug)]
    pub struct XdpTables {
        never: Infallible,
    }

    impl FastPath {
        /// Without the `xdp` feature: `Ok(None)` for `off` and `auto` (one log line for `auto`),
        /// [`XdpError::NotBuilt`] for `native` and `generic`.
        pub fn start(settings: &XdpSettings) -> Result<Option<FastPath>, XdpError> {
            match settings.mode {
                XdpMode::Off => Ok(None),
                XdpMode::Auto => {
                    tracing::warn!("xdp: {}; relaying in userspace", XdpError::NotBuilt);
                    Ok(None)
                }
                XdpMode::Native | XdpMode::Generic => Err(XdpError::NotBuilt),
            }
        }

        /// Never called: no value exists.
        pub fn tables(&mut self) -> &mut XdpTables {
            match self.never {}
        }

        /// Never called: no value exists.
        pub fn tables_ref(&self) -> &XdpTables {
            match self.never {}
        }

        /// Never called: no value exists.
        pub fn detach_links(&mut self) -> Result<(), XdpError> {
            match self.never {}
        }
    }

    impl XdpTables {
        /// Never called: no value exists.
        pub fn add_relay(&mut self, _: SocketAddr) -> Result<(), XdpError> {
            match self.never {}
        }
        /// Never called: no value exists.
        pub fn add_channel(
            &mut self,
            _: ChannelKey,
            _: SocketAddr,
            _: SocketAddr,
        ) -> Result<bool, XdpError> {
            match self.never {}
        }
        /// Never called: no value exists.
        pub fn remove_channel(
            &mut self,
            _: ChannelKey,
            _: SocketAddr,
            _: SocketAddr,
        ) -> Result<(), XdpError> {
            match self.never {}
        }
        /// Never called: no value exists.
        pub fn remove_relay(
            &mut self,
            _: SocketAddr,
        ) -> Option<(RetiredMeter, Result<(), XdpError>)> {
            match self.never {}
        }
        /// Never called: no value exists.
        pub fn settle(
            &mut self,
            _: &[RetiredMeter],
            _: bool,
        ) -> Vec<Option<Result<Counters, XdpError>>> {
            match self.never {}
        }
        /// Never called: no value exists.
        #[doc(hidden)]
        pub fn fail_next_deletions(&mut self, _: u32) {
            match self.never {}
        }
        /// Never called: no value exists.
        pub fn counters(&self, _: SocketAddr) -> Result<Counters, XdpError> {
            match self.never {}
        }
        /// Never called: no value exists.
        pub fn paths(&self) -> Result<PathCounters, XdpError> {
            match self.never {}
        }
    }
}
#[cfg(not(feature = "xdp"))]
pub use imp::{FastPath, XdpTables};

mod mirror;
pub use mirror::{Mirror, SETTLE_AFTER};

/// The meter slot of a removed relay ([`XdpTables::remove_relay`]): no new program run can reach it,
/// but one that looked its channel up just before the removal may still be adding to it on another
/// CPU. [`XdpTables::settle`] reads it once that can no longer happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetiredMeter(#[cfg_attr(not(feature = "xdp"), allow(dead_code))] u32);
