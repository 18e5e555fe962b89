//! turnpike: a STUN/TURN relay (RFC 8489, RFC 8656, RFC 6156).
//!
//! Layering (dependencies point downward):
//! - [`wire`]: bytes ↔ typed STUN/TURN/ChannelData views and writers; no IO, no allocation.
//! - [`auth`]: long-term keys, TURN REST credentials, stateless nonces; time comes in as an argument.

pub mod auth;
pub mod policy;
pub mod wire;
