//! STUN/TURN wire format.
