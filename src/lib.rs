//! turnpike: a STUN/TURN relay (RFC 8489, RFC 8656, RFC 6156).
//!
//! Layering (dependencies point downward; `scripts/check-layers.sh` enforces it):
//! - [`wire`]: bytes ↔ typed STUN/TURN/ChannelData views and writers; no IO, no allocation.
//! - [`auth`]: long-term keys, TURN REST credentials, stateless nonces; time comes in as an argument.
//! - [`policy`]: which peer addresses may be relayed to (deny by default).
//! - [`route`]: the per-worker fast-path lookup tables and their updates.
//! - [`sys`]: every syscall, and the only place allowed `unsafe_code`.
//! - [`server`]: the sans-IO TURN core: every decision, no sockets, clocks or randomness of its own.
//! - [`dataplane`]: the workers' packet logic and event loops (epoll, io_uring).
//! - [`control`]: the control thread: drives the server, programs the workers.
//! - [`metrics`]: snapshots of the relay's counters and their Prometheus text rendering.
//! - [`usage`]: metering: durable per-allocation usage records (SQLite) and revocations.
//! - [`api`]: the HTTP API: relay tokens, revocation, usage, `/metrics`, health.
//! - [`service`]: a whole relay process wired together: relay, metering writer, HTTP API.
//! - [`xdp`]: the kernel fast path: an XDP program forwarding bound channels, its loader and maps.
//! - [`config`]: the TOML configuration file: defaults, validation, and errors that name the key.

pub mod api;
pub mod auth;
pub(crate) mod budget;
pub mod clock;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod fleet;
pub mod metrics;
pub mod policy;
pub mod reload;
pub mod route;
pub mod server;
pub mod service;
#[doc(hidden)]
pub mod sim;
#[allow(unsafe_code)]
pub mod sys;
pub mod usage;
pub mod wire;
pub mod xdp;
