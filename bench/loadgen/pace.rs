//! Open-loop pacing and the probe payload that every relayed packet carries.
//!
//! The generator never waits for replies before sending: a [`Pacer`] says how many packets are due at a
//! given instant so that the offered rate holds whatever the server does (a closed loop would slow down
//! with the server and hide its overload). Each packet carries a [`Probe`]:
//!
//! ```text
//! payload: [ flow u16 | epoch u16 | seq u64 | sent_ns u64 | zero fill up to --size ]
//!            0          2           4         12            20
//! ```
//!
//! `epoch` changes between the steps of a sweep, so a straggler from the previous step is counted as late
//! rather than as delivered in the wrong step.

/// Bytes of the probe at the start of each payload.
pub const PROBE_LEN: usize = 20;

/// How many packets are due, for an offered rate that started at time 0.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: f64,
    sent: u64,
    max_burst: u64,
}

impl Pacer {
    /// `rate` packets per second, at most `max_burst` packets at once (a stalled generator catches up over
    /// several iterations instead of in one burst).
    pub fn new(rate: f64, max_burst: u64) -> Self {
        Pacer {
            rate: rate.max(0.0),
            sent: 0,
            max_burst: max_burst.max(1),
        }
    }

    /// Packets to send now, `now_ns` after the start; counts them as sent.
    pub fn due(&mut self, now_ns: u64) -> u64 {
        let owed = (self.rate * now_ns as f64 / 1e9) as u64;
        let n = owed.saturating_sub(self.sent).min(self.max_burst);
        self.sent += n;
        n
    }
}

/// The probe at the start of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Which flow (client) sent it.
    pub flow: u16,
    /// Which step of a sweep.
    pub epoch: u16,
    /// Per-flow sequence number from 0.
    pub seq: u64,
    /// When it was sent, in ns since the generator started.
    pub sent_ns: u64,
}

impl Probe {
    /// Write the probe into the first [`PROBE_LEN`] bytes of `buf` (which must be that long).
    pub fn write(&self, buf: &mut [u8]) {
        buf[0..2].copy_from_slice(&self.flow.to_be_bytes());
        buf[2..4].copy_from_slice(&self.epoch.to_be_bytes());
        buf[4..12].copy_from_slice(&self.seq.to_be_bytes());
        buf[12..20].copy_from_slice(&self.sent_ns.to_be_bytes());
    }

    /// Read a probe; `None` if `buf` is too short.
    pub fn read(buf: &[u8]) -> Option<Probe> {
        let b: &[u8; PROBE_LEN] = buf.get(..PROBE_LEN)?.try_into().ok()?;
        let u64_at = |i: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(v)
        };
        Some(Probe {
            flow: u16::from_be_bytes([b[0], b[1]]),
            epoch: u16::from_be_bytes([b[2], b[3]]),
            seq: u64_at(4),
            sent_ns: u64_at(12),
        })
    }
}

/// What one flow received: count, and how many arrived after a later sequence number (reordered).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowRx {
    /// Highest sequence number seen plus one (0: none yet).
    pub next: u64,
    /// Packets received.
    pub received: u64,
    /// Packets that arrived after one with a higher sequence number.
    pub reordered: u64,
}

impl FlowRx {
    /// Account for the arrival of `seq`.
    pub fn on_seq(&mut self, seq: u64) {
        self.received += 1;
        if seq < self.next {
            self.reordered += 1;
        } else {
            self.next = seq + 1;
        }
    }
}

/// The offered rates of a sweep: geometric steps from `start` by `factor` until the first failure, then
/// bisection between the last pass and the first failure. Feed it results with [`Sweep::record`].
#[derive(Debug, Clone)]
pub struct Sweep {
    next: Option<f64>,
    factor: f64,
    max: f64,
    best: Option<f64>,
    fail: Option<f64>,
    bisections_left: u32,
}

impl Sweep {
    /// A sweep from `start` up to `max` packets/s, `bisections` refinements after the first failure.
    pub fn new(start: f64, factor: f64, max: f64, bisections: u32) -> Self {
        Sweep {
            next: Some(start),
            factor: factor.max(1.01),
            max,
            best: None,
            fail: None,
            bisections_left: bisections,
        }
    }

    /// The next rate to try, or `None` when done.
    pub fn next_rate(&self) -> Option<f64> {
        self.next
    }

    /// Record whether `rate` passed; picks the next rate.
    pub fn record(&mut self, rate: f64, pass: bool) {
        if pass {
            self.best = Some(self.best.map_or(rate, |b: f64| b.max(rate)));
        } else {
            self.fail = Some(self.fail.map_or(rate, |f: f64| f.min(rate)));
        }
        self.next = match (self.best, self.fail) {
            (_, None) => {
                // Step up, trying `max` itself last.
                (rate < self.max).then_some((rate * self.factor).min(self.max))
            }
            (best, Some(fail)) => {
                if self.bisections_left == 0 {
                    None
                } else {
                    self.bisections_left -= 1;
                    let lo = best.unwrap_or(fail / 4.0);
                    Some((lo + fail) / 2.0)
                }
            }
        };
        if let Some(r) = self.next {
            if self.best.is_some_and(|b| r <= b) {
                self.next = None;
            }
        }
    }

    /// The highest rate that passed.
    pub fn best(&self) -> Option<f64> {
        self.best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_spreads_sends_over_time_and_caps_bursts() {
        let mut p = Pacer::new(1000.0, 1_000_000);
        assert_eq!(p.due(0), 0);
        assert_eq!(p.due(500_000), 0); // 0.5 ms: half a packet
        assert_eq!(p.due(1_000_000), 1);
        assert_eq!(p.due(1_000_000), 0);
        assert_eq!(p.due(1_000_000_000), 999);
        let mut p = Pacer::new(1_000_000.0, 64);
        // One second behind: catches up 64 at a time, never losing what is owed.
        let mut total = 0;
        for _ in 0..100_000 {
            total += p.due(1_000_000_000);
        }
        assert_eq!(total, 1_000_000);
    }

    #[test]
    fn probe_round_trips_and_rejects_short_buffers() {
        let p = Probe {
            flow: 7,
            epoch: 3,
            seq: 0x0102_0304_0506_0708,
            sent_ns: 42,
        };
        let mut buf = [0xEEu8; 100];
        p.write(&mut buf);
        assert_eq!(Probe::read(&buf), Some(p));
        assert_eq!(Probe::read(&buf[..19]), None);
    }

    #[test]
    fn flow_rx_counts_reordering() {
        let mut f = FlowRx::default();
        for s in [0, 1, 3, 2, 4] {
            f.on_seq(s);
        }
        assert_eq!((f.received, f.reordered, f.next), (5, 1, 5));
    }

    #[test]
    fn sweep_steps_up_then_bisects() {
        let mut s = Sweep::new(1000.0, 2.0, 1e9, 2);
        let limit = 5000.0;
        let mut tried = vec![];
        while let Some(r) = s.next_rate() {
            tried.push(r);
            s.record(r, r <= limit);
        }
        // 1000, 2000, 4000 pass; 8000 fails; then 6000 (fail), 5000 (pass).
        assert_eq!(tried, vec![1000.0, 2000.0, 4000.0, 8000.0, 6000.0, 5000.0]);
        assert_eq!(s.best(), Some(5000.0));
        let mut s = Sweep::new(1000.0, 2.0, 3000.0, 0);
        while let Some(r) = s.next_rate() {
            s.record(r, true);
        }
        assert_eq!(s.best(), Some(3000.0));
    }
}
