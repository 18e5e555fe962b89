//! Fuzz `Message::parse` and everything reachable from a parsed message; see `../oracles.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../oracles.rs"]
#[allow(dead_code)]
mod oracles;

fuzz_target!(|data: &[u8]| oracles::stun_message(data));
