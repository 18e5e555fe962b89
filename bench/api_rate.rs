//! Signed token requests per second over one keep-alive connection, on a running API.
//!
//! `cargo run --example api_rate -- <api host:port> <base64 access key> [count] [seconds]`
//!
//! Sends at most `count` requests (default 2000) for at most `seconds` (default 10), one at a time over
//! one HTTP/1.1 connection, each freshly signed, and prints the rate of 200 answers.
#![allow(missing_docs)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use turnpike::api::sign;

const PATH: &str = "/networkTraversal/:issueRelayConfiguration?api-version=2022-03-01-preview";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(key)) = (args.get(1), args.get(2)) else {
        return Err("usage: api_rate <host:port> <base64 key> [count] [seconds]".into());
    };
    let key = base64::engine::general_purpose::STANDARD.decode(key)?;
    let count: u64 = args.get(3).map_or(Ok(2000), |s| s.parse())?;
    let limit = Duration::from_secs(args.get(4).map_or(Ok(10), |s| s.parse())?);
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let body = br#"{"id":"bench"}"#;
    let start = Instant::now();
    let mut ok = 0u64;
    let mut sent = 0u64;
    while sent < count && start.elapsed() < limit {
        let (date, hash, auth) = sign::sign(&key, "POST", PATH, addr, body, SystemTime::now());
        write!(
            out,
            "POST {PATH} HTTP/1.1\r\nHost: {addr}\r\nx-ms-date: {date}\r\nx-ms-content-sha256: {hash}\r\n\
             Authorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )?;
        out.write_all(body)?;
        sent += 1;
        let mut status = String::new();
        reader.read_line(&mut status)?;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err("connection closed".into());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse()?;
                }
            }
        }
        let mut resp = vec![0; length];
        reader.read_exact(&mut resp)?;
        if status.split(' ').nth(1) == Some("200") {
            ok += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{sent} requests, {ok} answered 200, in {secs:.2} s: {:.0} signed requests/s",
        ok as f64 / secs
    );
    Ok(())
}
