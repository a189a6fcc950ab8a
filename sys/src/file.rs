//! File system calls a large write or read needs and `std` has no safe
//! form of: direct I/O, early write-back, and dropping written pages from
//! the page cache.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// Whether `e` is `EINVAL`: what a direct write of a misaligned block, or
/// an open with `O_DIRECT` on a file system without it, fails with.
pub fn invalid_argument(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// Opens `path` with `options` and `O_DIRECT`; `None` where the file
/// system or the platform has no direct I/O.
#[cfg(target_os = "linux")]
pub fn open_direct(path: &Path, options: &OpenOptions) -> io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    match options.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(file) => Ok(Some(file)),
        // The file system has no direct I/O (tmpfs before Linux 6.6, some FUSE file systems).
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
pub fn open_direct(_path: &Path, _options: &OpenOptions) -> io::Result<Option<File>> {
    Ok(None)
}

/// Whether `e` says the file system cannot do what was asked (as opposed
/// to a failed read or write).
pub fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL | libc::ESPIPE | libc::EOPNOTSUPP))
}

/// Starts writing `file`'s bytes `from..to` to the disk, without waiting.
/// A failure only loses the overlap: the fsync writes them anyway.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn start_writeback(file: &File, from: u64, to: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: an open descriptor and plain integers; the call reads no memory of ours.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            from as libc::off64_t,
            (to - from) as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Waits until `file`'s bytes `from..to` are on the disk, then drops them
/// from the page cache. A write error the kernel reports here is returned:
/// the file is then not committed.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn wait_and_drop(file: &File, from: u64, to: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let (offset, len) = (from as libc::off64_t, (to - from) as libc::off64_t);
    // SAFETY: an open descriptor and plain integers; the calls read no memory of ours.
    let synced = unsafe {
        libc::sync_file_range(
            fd,
            offset,
            len,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    };
    if synced != 0 {
        return Err(io::Error::last_os_error());
    }
    // Advice only: a failure leaves the pages cached.
    let _ = rustix::fs::fadvise(file, from, std::num::NonZeroU64::new(to - from), rustix::fs::Advice::DontNeed);
    Ok(())
}

/// Drops a whole file, already fsynced, from the page cache.
#[cfg(target_os = "linux")]
pub fn drop_cached(file: &File) {
    // Advice only: a failure leaves the pages cached.
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed);
}

#[cfg(not(target_os = "linux"))]
pub fn start_writeback(_file: &File, _from: u64, _to: u64) {}

#[cfg(not(target_os = "linux"))]
pub fn wait_and_drop(_file: &File, _from: u64, _to: u64) -> io::Result<()> {
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn drop_cached(_file: &File) {}
