//! Fuzz the TCP/TLS stream framer: any split of the bytes frames like the whole; see `../stream_oracle.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../stream_oracle.rs"]
#[allow(dead_code)]
mod stream_oracle;

fuzz_target!(|data: &[u8]| stream_oracle::stream_framer(data));
