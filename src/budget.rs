//! The budget of unauthenticated answers (401, 438, 400, 420, Binding success; design §3): a fixed
//! table of token buckets indexed by a keyed hash of the source's network, /32 for IPv4 and /64 for
//! IPv6 (one subscriber's prefix, which it can rotate through freely). Its memory never grows, so a
//! flood of spoofed sources costs nothing but shared buckets; the key comes from the caller's RNG so
//! that an attacker cannot aim collisions at a victim's bucket.
//!
//! Self-contained (std only, at the bottom of the layers, so that `server` and `dataplane` share it):
//! each owner (the server, and each data-plane worker, which answers Binding itself) holds its own
//! table, a shard of the budget, and takes no lock. A shard holds `1/shards` of the rate and of the
//! burst, so that the owners together give a source no more than the configured budget, however its
//! datagrams spread over the workers (SO_REUSEPORT hashes the whole 4-tuple: a spoofer that rotates
//! its source port reaches every worker).

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
    /// Credit in units of `1 / (shards × 10⁹)` answers: a nanosecond at `rate` answers per second
    /// earns `rate` units, exactly, so refill loses nothing to rounding at any call rate.
    credit: u64,
    last: Option<Instant>,
}

/// The table.
#[derive(Debug)]
pub(crate) struct SourceLimiter {
    buckets: Box<[Bucket]>,
    /// Answers per second per source, all shards together; 0 = unlimited.
    rate: u64,
    /// How many owners share the budget (this table is one of them).
    shards: u64,
    key: [u64; 2],
}

/// Nanoseconds per second.
const NS: u64 = 1_000_000_000;

impl SourceLimiter {
    /// One of `shards` tables that share `rate` answers per second per source (burst twice that):
    /// this one allows `rate / shards` per second and a burst of `2 × rate / shards`, at least one
    /// answer. `shards` of 0 counts as 1.
    pub(crate) fn new(rate: u32, shards: u32, key: [u64; 2]) -> Self {
        SourceLimiter {
            buckets: vec![
                Bucket {
                    credit: 0,
                    last: None
                };
                SLOTS
            ]
            .into_boxed_slice(),
            rate: u64::from(rate),
            shards: u64::from(shards.max(1)),
            key,
        }
    }

    /// Change the rate (a reload): every bucket starts full at the new rate, as a new table would,
    /// without allocating one. The same rate changes nothing. The shards stay.
    pub(crate) fn set_rate(&mut self, rate: u32) {
        if u64::from(rate) == self.rate {
            return;
        }
        self.rate = u64::from(rate);
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
        // One answer, and the bucket's size: 2 × rate / shards answers, at least one. With rate below
        // 2^32 and shards below 2^32, neither overflows (≤ 2^33 · 10⁹ < 2^64).
        let one = self.shards * NS;
        let full = (2 * self.rate * NS).max(one);
        let (rate, b) = (self.rate, &mut self.buckets[i]);
        b.credit = match b.last {
            None => full,
            Some(last) => {
                let ns = now.saturating_duration_since(last).as_nanos();
                let earned = u64::try_from(ns).unwrap_or(u64::MAX).saturating_mul(rate);
                b.credit.saturating_add(earned).min(full)
            }
        };
        b.last = Some(now);
        if b.credit >= one {
            b.credit -= one;
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
        let mut l = SourceLimiter::new(10, 1, [1, 2]);
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
        let mut off = SourceLimiter::new(0, 1, [0, 0]);
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
        let mut l = SourceLimiter::new(1, 1, [3, 4]);
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

    #[test]
    fn shards_split_the_rate_and_the_burst_and_refill_exactly() {
        let a = IpAddr::from([198, 51, 100, 1]);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // 10/s over two shards: each allows a burst of 10, then 5/s.
        let mut shard = SourceLimiter::new(10, 2, [1, 2]);
        assert_eq!((0..25).filter(|_| shard.allow(a, t0)).count(), 10);
        assert!(
            !shard.allow(a, at(199)),
            "0.995 of an answer after 199 ms at 5/s"
        );
        assert!(shard.allow(a, at(200)));
        // Three shards of 10/s: a burst of 6⅔, so 6 answers, and the ⅔ is kept, not rounded away.
        let mut third = SourceLimiter::new(10, 3, [1, 2]);
        assert_eq!((0..25).filter(|_| third.allow(a, t0)).count(), 6);
        assert!(third.allow(a, at(100)), "⅔ + 100 ms at 3⅓/s = 1");
        // Asked every 10 µs, a shard still earns what the elapsed time pays (no rounding per call).
        let mut busy = SourceLimiter::new(10, 2, [1, 2]);
        let spent = (0..25).filter(|_| busy.allow(a, t0)).count();
        let step = Duration::from_micros(10);
        let later = (1..=100_000u32)
            .filter(|i| busy.allow(a, t0 + step * *i))
            .count();
        assert_eq!((spent, later), (10, 5), "1 s at 5/s, asked 100,000 times");
        // A rate too small to split still gives each shard one answer.
        let mut tiny = SourceLimiter::new(1, 4, [1, 2]);
        assert_eq!((0..5).filter(|_| tiny.allow(a, t0)).count(), 1);
        assert!(!tiny.allow(a, at(3_999)));
        assert!(
            tiny.allow(a, at(4_000)),
            "1/s over 4 shards: one answer per 4 s"
        );
    }
}
