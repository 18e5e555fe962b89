//! Process-level file facts: an exclusive advisory lock on a file (`flock`), and the open-file limit
//! (`RLIMIT_NOFILE`).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::syscall;

/// An exclusive `flock(2)` on a file, held until this is dropped or the process ends, however it ends
/// (the kernel drops the lock with the last descriptor). The file holds the holder's pid, for messages.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
    path: PathBuf,
}

/// Why [`FileLock::try_exclusive`] did not lock.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds the lock; its pid if it wrote one.
    Held(Option<u32>),
    /// The file could not be opened or locked.
    Io(io::Error),
}

impl FileLock {
    /// Open (creating, mode 0600) `path` and lock it exclusively without waiting.
    pub fn try_exclusive(path: &Path) -> Result<FileLock, LockError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(LockError::Io)?;
        // SAFETY: flock takes a descriptor and flags, no pointers; `file` keeps the descriptor open for the
        // whole call (and for as long as the lock is held).
        match syscall!(flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB)) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                let mut text = String::new();
                let pid = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(LockError::Held(pid));
            }
            Err(e) => return Err(LockError::Io(e)),
        }
        // Ours now: note who holds it (a stale pid from a dead holder is overwritten).
        let note = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        if let Err(e) = note {
            return Err(LockError::Io(e));
        }
        Ok(FileLock {
            _file: file,
            path: path.to_path_buf(),
        })
    }

    /// The locked file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The open-file limit (`RLIMIT_NOFILE`): (soft, hard). `RLIM_INFINITY` reads as `u64::MAX`.
pub fn open_file_limit() -> io::Result<(u64, u64)> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid, writable rlimit that outlives the call.
    syscall!(getrlimit(libc::RLIMIT_NOFILE, &mut rl))?;
    Ok((rl.rlim_cur, rl.rlim_max))
}

/// Raise the soft open-file limit to the hard one, as coturn and nginx do at start; returns the soft
/// limit in force afterwards.
pub fn raise_open_file_limit() -> io::Result<u64> {
    let (soft, hard) = open_file_limit()?;
    if soft >= hard {
        return Ok(soft);
    }
    let rl = libc::rlimit {
        rlim_cur: hard as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: `rl` is a valid rlimit that outlives the call; raising the soft limit up to the hard one
    // needs no privilege.
    match syscall!(setrlimit(libc::RLIMIT_NOFILE, &rl)) {
        Ok(_) => Ok(hard),
        Err(_) => Ok(soft),
    }
}

/// Send SIGHUP to process `pid` (`turnpike reload`): the running relay reloads its configuration.
/// Refuses pids that would address a process group or every process (`pid` ≤ 1 or beyond `i32`).
pub fn send_sighup(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|p| *p > 1)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not a relay's pid: {pid}"),
            )
        })?;
    // SAFETY: kill takes a pid and a signal number, no pointers; `pid` > 1 names one process.
    syscall!(kill(pid, libc::SIGHUP))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_second_lock_on_the_same_file_is_refused_with_the_holders_pid() {
        let path = std::env::temp_dir().join(format!("turnpike-lock-{}", std::process::id()));
        let first = FileLock::try_exclusive(&path).unwrap();
        // flock locks belong to the open file description, so a second open in this process conflicts
        // exactly as another process would.
        match FileLock::try_exclusive(&path) {
            Err(LockError::Held(pid)) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        let again = FileLock::try_exclusive(&path).unwrap();
        assert_eq!(again.path(), path);
        drop(again);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn open_file_limit_reads() {
        let (soft, hard) = open_file_limit().unwrap();
        assert!(soft >= 3 && soft <= hard);
        assert!(raise_open_file_limit().unwrap() >= soft);
    }
}
