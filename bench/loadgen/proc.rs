//! What the server process used, from `/proc/<pid>/stat` and `/proc/<pid>/status` (all threads together).

/// One reading of a process's counters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
}

/// `/proc` reports CPU time in USER_HZ ticks, which is 100 on Linux whatever the kernel's HZ.
const USER_HZ: f64 = 100.0;

impl ProcSample {
    /// Read process `pid`; `None` if it is gone or unreadable.
    pub fn read(pid: u32) -> Option<ProcSample> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        Some(ProcSample {
            cpu_seconds: parse_cpu_ticks(&stat)? as f64 / USER_HZ,
            rss_kib: parse_rss_kib(&status)?,
        })
    }
}

/// utime + stime (fields 14 and 15) from a `/proc/<pid>/stat` line. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted from the last ')'.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // After ')': field 3 (state) is index 0, so utime (14) is index 11 and stime (15) index 12.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS in KiB from `/proc/<pid>/status`.
pub fn parse_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let stat =
            "4242 (turn pike) (x)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 1234 567 0 0 20 0 3 0 \
                    100 1000000 500 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_rss_and_reads_ourselves() {
        assert_eq!(
            parse_rss_kib("Name:\tx\nVmRSS:\t   10240 kB\nThreads: 1\n"),
            Some(10240)
        );
        let me = ProcSample::read(std::process::id()).expect("own /proc entry");
        assert!(me.rss_kib > 0 && me.cpu_seconds >= 0.0);
    }
}
