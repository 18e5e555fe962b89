//! A network namespace a test creates (root only), with no route out, deleted on drop.

use std::process::Command;

/// A network namespace with no route out, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    /// Create it, or `None` (with the reason) when this process may not.
    pub fn create(name: &str) -> Option<Netns> {
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
            });
        if uid.as_deref() != Some("0") {
            eprintln!("SKIPPED: creating a network namespace needs root (effective uid {uid:?})");
            return None;
        }
        let _ = ip(&["netns", "del", name]);
        if let Err(e) = ip(&["netns", "add", name]) {
            eprintln!("SKIPPED: ip netns add failed: {e}");
            return None;
        }
        Some(Netns(name.into()))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
