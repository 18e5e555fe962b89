//! Throwaway PostgreSQL clusters for the fleet tests: Debian's `pg_createcluster` (as root it runs the
//! server as `postgres`), on private ports, with their data in a temporary directory.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use turnpike::fleet::{self, Password, Tls};
use turnpike::usage::IdentityUsage;

use super::free_tcp_port;

/// The newest PostgreSQL major version installed (`/usr/lib/postgresql/<version>/bin/postgres`).
pub fn pg_version() -> Option<String> {
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|v| Path::new(&format!("/usr/lib/postgresql/{v}/bin/postgres")).exists())
        .collect();
    versions.sort_unstable();
    versions.last().map(u32::to_string)
}

/// Whether PostgreSQL and Debian's cluster tools are installed; in CI their absence is a failure.
pub fn postgres_available() -> bool {
    let ok = Path::new("/usr/bin/pg_createcluster").exists() && pg_version().is_some();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "PostgreSQL is not installed (scripts/test.sh installs Debian's postgresql)"
        );
        eprintln!("skipped: PostgreSQL is not installed");
    }
    ok
}

/// A throwaway PostgreSQL cluster on 127.0.0.1:`port`, trusting local connections; dropped with it.
pub struct Cluster {
    pub version: String,
    pub name: String,
    pub port: u16,
}

impl Cluster {
    pub fn new(tag: &str) -> Cluster {
        Cluster::with_options(tag, &[])
    }

    /// A cluster with server settings (`name=value`, as `pg_createcluster -o` takes them).
    pub fn with_options(tag: &str, options: &[String]) -> Cluster {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tp{}{tag}{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let version = pg_version().expect("postgres_available() first");
        let port = free_tcp_port();
        let data = std::env::temp_dir().join(format!("turnpike-pg-{name}"));
        let _ = std::fs::remove_dir_all(&data);
        let out = Command::new("pg_createcluster")
            .args([&version, &name, "-p", &port.to_string(), "-d"])
            .arg(&data)
            .args(options.iter().flat_map(|o| ["-o", o.as_str()]))
            .args(["--", "--auth-host=trust", "--auth-local=trust", "--no-sync"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_createcluster: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let c = Cluster {
            version,
            name,
            port,
        };
        c.ctl("start");
        c
    }

    pub fn ctl(&self, action: &str) {
        let mut cmd = Command::new("pg_ctlcluster");
        cmd.args([&self.version, &self.name, action]);
        if action == "stop" {
            cmd.args(["-m", "fast"]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "pg_ctlcluster {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    pub fn config(&self) -> fleet::Config {
        fleet::Config {
            postgres: self.conninfo(),
            password: Password::None,
            tls: Tls::Disable,
            ship_interval: Duration::from_secs(1),
            batch: 1000,
            migrate: true,
            registry: Default::default(),
            pool_size: 4,
        }
    }

    /// One value from `psql`.
    pub fn psql(&self, sql: &str) -> String {
        // The server's own psql, not Debian's wrapper: the wrapper looks over every cluster on the host
        // and fails while another test's cluster is being dropped.
        let out = Command::new(format!("/usr/lib/postgresql/{}/bin/psql", self.version))
            .arg(self.conninfo())
            .args(["-tAc", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The fleet-wide bill of everything, by the production query path.
    pub fn bill(&self) -> Vec<IdentityUsage> {
        fleet::bill_blocking(&self.config(), 0, i64::MAX as u64, None).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("pg_dropcluster")
            .args(["--stop", &self.version, &self.name])
            .output();
    }
}
