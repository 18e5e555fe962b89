//! The io_uring backend (not built yet: `auto` falls back to epoll).

use std::io;

use super::WorkerSetup;

/// Whether this backend is implemented.
pub const IMPLEMENTED: bool = false;

pub(super) fn run(setup: WorkerSetup) -> io::Result<()> {
    super::epoll::run(setup)
}
