//! Child processes that must not outlive the one that started them.

use std::process::Command;

/// Has `cmd`'s child get SIGKILL when this process dies, even by `kill -9`
/// (Linux; elsewhere nothing changes).
pub fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the hook runs in the child between fork and exec, where
        // only async-signal-safe calls are allowed: it makes one prctl
        // system call and touches no memory of the parent's.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}
