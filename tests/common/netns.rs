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

    /// Create it with loopback up and one veth pair inside, `tpv0` with `addrs0` and `tpv1` with
    /// `addrs1` (CIDR strings), both up; or `None` as [`Netns::create`].
    pub fn with_veth_pair(name: &str, addrs0: &[&str], addrs1: &[&str]) -> Option<Netns> {
        let ns = Netns::create(name)?;
        let n = ns.0.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"]).unwrap();
        ip(&[
            "-n", n, "link", "add", "tpv0", "type", "veth", "peer", "name", "tpv1",
        ])
        .unwrap();
        for (dev, addrs) in [("tpv0", addrs0), ("tpv1", addrs1)] {
            for a in addrs {
                ip(&["-n", n, "addr", "add", a, "dev", dev]).unwrap();
            }
        }
        for dev in ["tpv0", "tpv1"] {
            ip(&["-n", n, "link", "set", dev, "up"]).unwrap();
        }
        Some(ns)
    }
}

impl Netns {
    /// Add IPv6 addresses (CIDR strings) to `dev` without duplicate address detection (`nodad`), so
    /// they are usable at once rather than tentative for a second or two.
    pub fn add_v6_nodad(&self, dev: &str, addrs: &[&str]) {
        for a in addrs {
            ip(&["-n", &self.0, "addr", "add", a, "dev", dev, "nodad"]).unwrap();
        }
    }
}

impl Netns {
    /// A veth pair from `dev` in this namespace to `peer_dev` in `other`, with an address (CIDR) on
    /// each end, both up.
    pub fn link(&self, dev: &str, addr: &str, other: &Netns, peer_dev: &str, peer_addr: &str) {
        let (a, b) = (self.0.as_str(), other.0.as_str());
        ip(&[
            "-n", a, "link", "add", dev, "type", "veth", "peer", "name", peer_dev, "netns", b,
        ])
        .unwrap();
        for (ns, d, cidr) in [(a, dev, addr), (b, peer_dev, peer_addr)] {
            ip(&["-n", ns, "addr", "add", cidr, "dev", d]).unwrap();
            ip(&["-n", ns, "link", "set", d, "up"]).unwrap();
            ip(&["-n", ns, "link", "set", "lo", "up"]).unwrap();
        }
    }

    /// Run `program` with `args` inside this namespace (`ip netns exec`), feeding it `stdin`; an error
    /// with its output if it fails.
    pub fn exec(&self, program: &str, args: &[&str], stdin: &str) -> Result<(), String> {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("{program}: {e}"))?;
        if let Some(mut i) = child.stdin.take() {
            i.write_all(stdin.as_bytes()).map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program} {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
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
