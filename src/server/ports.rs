//! Relay port pools: one bitmap of free ports per relay IP address, chosen at random with an injected RNG.

use core::net::IpAddr;
use core::ops::RangeInclusive;

use rand::RngCore;

/// The free ports of one relay IP address within the configured range. A bitmap (8 KiB for the whole
/// 16-bit space) gives O(1) release and exact accounting; a random start then a scan picks a port.
#[derive(Debug, Clone)]
pub(crate) struct PortPool {
    ip: IpAddr,
    range: RangeInclusive<u16>,
    /// Bit set = port in use.
    used: Vec<u64>,
    free: usize,
}

impl PortPool {
    pub(crate) fn new(ip: IpAddr, range: RangeInclusive<u16>) -> Self {
        let free = usize::from(*range.end()) + 1 - usize::from(*range.start());
        PortPool {
            ip,
            range,
            used: vec![0; 1024],
            free,
        }
    }

    pub(crate) fn ip(&self) -> IpAddr {
        self.ip
    }

    pub(crate) fn free(&self) -> usize {
        self.free
    }

    pub(crate) fn is_free(&self, port: u16) -> bool {
        self.range.contains(&port) && self.used[usize::from(port / 64)] & (1 << (port % 64)) == 0
    }

    /// Take a random free port; with `even`, an even one; with `pair`, an even one whose successor is
    /// also free (RFC 8656 §7.2 EVEN-PORT with R bit), taking both.
    pub(crate) fn take<R: RngCore>(&mut self, rng: &mut R, even: bool, pair: bool) -> Option<u16> {
        if self.free == 0 || (pair && self.free < 2) {
            return None;
        }
        let lo = u32::from(*self.range.start());
        let span = u32::from(*self.range.end()) - lo + 1;
        let start = rng.next_u32() % span;
        for i in 0..span {
            let port = (lo + (start + i) % span) as u16;
            if (even || pair) && port % 2 != 0 {
                continue;
            }
            if !self.is_free(port) {
                continue;
            }
            if pair {
                let Some(next) = port.checked_add(1) else {
                    continue;
                };
                if !self.is_free(next) {
                    continue;
                }
                self.mark(next);
            }
            self.mark(port);
            return Some(port);
        }
        None
    }

    /// Give a port back. Returns false (and changes nothing) if it was not taken.
    pub(crate) fn release(&mut self, port: u16) -> bool {
        if !self.range.contains(&port) || self.is_free(port) {
            return false;
        }
        self.used[usize::from(port / 64)] &= !(1 << (port % 64));
        self.free += 1;
        true
    }

    fn mark(&mut self, port: u16) {
        self.used[usize::from(port / 64)] |= 1 << (port % 64);
        self.free -= 1;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn takes_every_port_once_then_none_and_release_restores() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut pool = PortPool::new("192.0.2.1".parse().unwrap(), 50000..=50009);
        let mut got: Vec<u16> = (0..10)
            .map(|_| pool.take(&mut rng, false, false).unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, (50000..=50009).collect::<Vec<_>>());
        assert_eq!(pool.take(&mut rng, false, false), None);
        assert!(pool.release(50003));
        assert!(!pool.release(50003), "double release is refused");
        assert!(!pool.release(40000), "out of range");
        assert_eq!(pool.take(&mut rng, false, false), Some(50003));
    }

    #[test]
    fn even_and_pairs() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let mut pool = PortPool::new("192.0.2.1".parse().unwrap(), 50001..=50004);
        let p = pool.take(&mut rng, false, true).unwrap();
        assert_eq!(p, 50002, "the only even port whose successor is in range");
        assert!(!pool.is_free(50003));
        assert_eq!(pool.take(&mut rng, false, true), None);
        assert_eq!(pool.take(&mut rng, true, false), Some(50004));
        assert_eq!(pool.free(), 1);
    }
}
