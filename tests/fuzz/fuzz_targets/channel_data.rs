//! Fuzz ChannelData framing (`parse`, `stream_frame_len`, `write_header`); see `../oracles.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../oracles.rs"]
#[allow(dead_code)]
mod oracles;

fuzz_target!(|data: &[u8]| oracles::channel_data(data));
