//! io_uring support: probing the kernel for what the io_uring backend needs.

/// Check that io_uring works here and supports the opcodes the backend uses (RecvMsg, SendMsg, Read).
/// The error says why not (seccomp, `kernel.io_uring_disabled`, an old kernel).
pub fn probe() -> Result<(), String> {
    let ring = io_uring::IoUring::new(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe failed: {e}"))?;
    for (code, name) in [
        (io_uring::opcode::RecvMsg::CODE, "RecvMsg"),
        (io_uring::opcode::SendMsg::CODE, "SendMsg"),
        (io_uring::opcode::Read::CODE, "Read"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("io_uring lacks the {name} opcode"));
        }
    }
    Ok(())
}
