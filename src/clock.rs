//! Wall-clock time as Unix seconds and milliseconds: the one place that reads `SystemTime` for them.
//! The sans-IO layers (`server`, `auth`) never call this; they get the value as an argument.
//!
//! May use: nothing else in turnpike (every module may use it).

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    unix_secs(SystemTime::now())
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    unix_ms_at(SystemTime::now())
}

/// `t` in seconds since the Unix epoch (0 before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `t` in milliseconds since the Unix epoch (0 before it).
pub fn unix_ms_at(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn epoch_and_before() {
        let t = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
        assert_eq!(
            (unix_secs(t), unix_ms_at(t)),
            (1_800_000_000, 1_800_000_000_123)
        );
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }
}
