//! The budget of unauthenticated answers (401, 438, 400, 420, Binding success; design §3): a fixed
//! table of token buckets indexed by a keyed hash of the source's network, /32 for IPv4 and /64 for
//! IPv6 (one subscriber's prefix, which it can rotate through freely). Its memory never grows, so a
//! flood of spoofed sources costs nothing but shared buckets; the key comes from the caller's RNG so
//! that an attacker cannot aim collisions at a victim's bucket.
//!
//! Self-contained (std only, at the bottom of the layers, so that `server` and `dataplane` share it):
//! each owner (the server, and each data-plane worker, which answers Binding itself) holds its own
//! table, a shard of the budget, and takes no lock.

use core::net::IpAddr;
use std::time::Instant;

/// The most an unauthenticated answer over UDP may be, as a multiple of its request's size.
pub(crate) const MAX_AMPLIFICATION: usize = 3;

/// The largest unauthenticated answer over UDP to a request of `request_len` bytes.
pub(crate) fn answer_limit(request_len: usize) -> usize {
    MAX_AMPLIFICATION * request_len
}

/// Why an unauthenticated UDP answer is not sent ([`SourceLimiter::admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// It would have been more than [`MAX_AMPLIFICATION`]× its request.
    Amplification,
    /// Its source's network (/32, /64) was over its rate.
    RateLimited,
}

/// Buckets in the table (64 KiB of state).
const SLOTS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens × 1000 (so refill needs no floating point).
    milli_tokens: u64,
    last: Option<Instant>,
}

/// The table.
#[derive(Debug)]
pub(crate) struct SourceLimiter {
    buckets: Box<[Bucket]>,
    /// Answers per second per source; 0 = unlimited.
    rate: u64,
    /// Bucket size in answers.
    burst: u64,
    key: [u64; 2],
}

impl SourceLimiter {
    pub(crate) fn new(rate: u32, key: [u64; 2]) -> Self {
        let rate = u64::from(rate);
        SourceLimiter {
            buckets: vec![
                Bucket {
                    milli_tokens: 0,
                    last: None
                };
                SLOTS
            ]
            .into_boxed_slice(),
            rate,
            burst: rate.saturating_mul(2).max(1),
            key,
        }
    }

    /// Change the rate (a reload): every bucket starts full at the new rate, as a new table would,
    /// without allocating one. The same rate changes nothing.
    pub(crate) fn set_rate(&mut self, rate: u32) {
        if u64::from(rate) == self.rate {
            return;
        }
        self.rate = u64::from(rate);
        self.burst = self.rate.saturating_mul(2).max(1);
        for b in self.buckets.iter_mut() {
            b.last = None;
        }
    }

    /// The one check of every unauthenticated UDP answer (design §3), once its size is known: an
    /// answer of `answer_len` bytes to a request of `request_len` may go to `ip` at `now` if it is
    /// within [`answer_limit`] and the source's network has a token left. An answer too large spends
    /// no token.
    pub(crate) fn admit(
        &mut self,
        ip: IpAddr,
        now: Instant,
        request_len: usize,
        answer_len: usize,
    ) -> Result<(), Refused> {
        if answer_len > answer_limit(request_len) {
            Err(Refused::Amplification)
        } else if !self.allow(ip, now) {
            Err(Refused::RateLimited)
        } else {
            Ok(())
        }
    }

    /// Take one answer from the bucket of `ip`'s network at `now`. False: over the limit, stay silent.
    pub(crate) fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let i = (self.hash(ip) % SLOTS as u64) as usize;
        let full = self.burst * 1000;
        let (rate, b) = (self.rate, &mut self.buckets[i]);
        b.milli_tokens = match b.last {
            None => full,
            Some(last) => {
                let ms = now
                    .saturating_duration_since(last)
                    .as_millis()
                    .min(u128::from(u32::MAX)) as u64;
                (b.milli_tokens + ms * rate).min(full)
            }
        };
        b.last = Some(now);
        if b.milli_tokens >= 1000 {
            b.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }

    fn hash(&self, ip: IpAddr) -> u64 {
        // The source's network: the IPv4 address, or the IPv6 /64 (tagged so the two never meet).
        let network: u64 = match ip.to_canonical() {
            IpAddr::V4(v4) => u64::from(u32::from(v4)) | 1 << 63,
            IpAddr::V6(v6) => (u128::from(v6) >> 64) as u64,
        };
        let mut h = self.key[0];
        for word in [network, self.key[1]] {
            h ^= word;
            h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ (h >> 32);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate_per_source() {
        let mut l = SourceLimiter::new(10, [1, 2]);
        let t0 = Instant::now();
        let a: IpAddr = "198.51.100.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let b: IpAddr = "198.51.100.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert_eq!(
            (0..25).filter(|_| l.allow(a, t0)).count(),
            20,
            "burst is twice the rate"
        );
        assert!(l.allow(b, t0) || l.hash(a) % SLOTS as u64 == l.hash(b) % SLOTS as u64);
        assert!(
            !l.allow(a, t0 + Duration::from_millis(50)),
            "half a token after 50 ms at 10/s"
        );
        assert!(l.allow(a, t0 + Duration::from_millis(150)));
        assert_eq!(
            (0..100)
                .filter(|_| l.allow(a, t0 + Duration::from_secs(60)))
                .count(),
            20,
            "refill caps at the burst"
        );
        let mut off = SourceLimiter::new(0, [0, 0]);
        assert!((0..10_000).all(|_| off.allow(a, t0)));
        // The same rate: nothing changes (a spent source stays spent); a new rate: a fresh burst at
        // it, for sources that had spent theirs.
        l.set_rate(10);
        assert!(!l.allow(a, t0 + Duration::from_secs(60)));
        l.set_rate(1);
        assert_eq!((0..5).filter(|_| l.allow(a, t0)).count(), 2);
        off.set_rate(1);
        assert_eq!((0..5).filter(|_| off.allow(a, t0)).count(), 2);
    }

    #[test]
    fn keyed_on_slash_32_and_slash_64_in_a_table_that_never_grows() {
        let mut l = SourceLimiter::new(1, [3, 4]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let h = |l: &SourceLimiter, s: &str| l.hash(ip(s));
        assert_eq!(h(&l, "2001:db8:1:2::1"), h(&l, "2001:db8:1:2:ffff::9"));
        assert_ne!(h(&l, "2001:db8:1:2::1"), h(&l, "2001:db8:1:3::1"));
        assert_ne!(h(&l, "198.51.100.1"), h(&l, "198.51.100.2"));
        assert_eq!(h(&l, "198.51.100.1"), h(&l, "::ffff:198.51.100.1"));
        // An IPv4 address never shares its key with the IPv6 /64 of the same bits.
        assert_ne!(h(&l, "0.0.0.1"), h(&l, "0:0:0:1::"));
        let t0 = Instant::now();
        for i in 0..100_000u32 {
            l.allow(IpAddr::from(i.to_be_bytes()), t0);
            l.allow(
                IpAddr::from(core::net::Ipv6Addr::from(u128::from(i) << 64)),
                t0,
            );
        }
        assert_eq!(
            l.buckets.len(),
            SLOTS,
            "memory is fixed whatever the sources"
        );
    }
}
