//! How a process that moves large vectors asks for its memory.
//!
//! A fresh page costs a trap into the kernel on its first write, which
//! zeroes and maps it, and that trap bounds how fast fresh memory fills. A
//! large pull into fresh memory spent most of its time faulting: once for
//! the model itself, and once more for the buffers the gRPC stack allocates
//! and frees per chunk, which the allocator kept handing back to the kernel
//! and taking again. Two remedies, both advice that changes no result:
//! - [`keep_transfer_buffers`]: the allocator keeps chunk-sized buffers
//!   instead of returning them to the kernel after each chunk;
//! - [`advise_huge_pages`]: one trap maps 2 MiB instead of 4 KiB, for the
//!   large vectors a process makes again and again (the coordinator's
//!   running sum and the model a round starts from).
//!
//! What each gained is in `docs/perf-log.md`, "Memory advice and copies".

/// Asks the kernel to back the memory of `values` with transparent huge
/// pages where it is first touched: for vectors of many megabytes, written
/// soon after they are allocated. Linux enables them for every mapping or
/// (by default on many distributions) only where a program asks, which is
/// what this does. Where the kernel has none, or is not Linux, nothing
/// changes.
///
/// Vectors under [`HUGE_PAGES_FROM_BYTES`] are left alone.
///
/// Huge pages pay where a process reuses memory it freed. A process's first
/// huge pages, on a virtual machine, may come from memory the host has
/// taken back (the guest reports free 2 MiB blocks to it) and then fill far
/// slower than small pages, and unpredictably so. So a receiver's first
/// pull does not use them.
///
/// The advice covers every page the allocation touches, not just the pages
/// inside it. A large allocation is a mapping of its own, and advice for
/// part of a mapping splits it in two; `realloc` can then no longer grow it
/// in place with `mremap`, and copies it instead.
pub fn advise_huge_pages<T>(values: &mut Vec<T>) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = values.as_mut_ptr() as usize;
        let end = start + values.capacity() * std::mem::size_of::<T>();
        let (from, to) = (start / PAGE * PAGE, end.next_multiple_of(PAGE));
        if end - start >= HUGE_PAGES_FROM_BYTES {
            // SAFETY: every page in `from..to` holds part of `values`'
            // allocation, so it is mapped, and this advice changes neither
            // the contents nor the validity of any page, only the size of
            // the pages later faults map. A refusal (EINVAL without THP)
            // leaves things as they were.
            #[allow(unsafe_code)]
            unsafe {
                libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE)
            };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = values;
}

/// From this size up a vector's memory is asked for in huge pages. An
/// allocation this large is, as a rule, a mapping of its own (glibc's
/// threshold for that never rises past 32 MiB), so the advice does not split
/// a heap mapping that other allocations share, as advice for many small
/// vectors would. The exception: glibc carves a request from a heap when a
/// free chunk there fits it. The advice then also covers the partial pages
/// at the vector's ends and stays on that heap memory after it is freed,
/// which changes no contents, only the size of the pages later faults map.
pub const HUGE_PAGES_FROM_BYTES: usize = 32 << 20;

/// Allocations from this size up get a mapping of their own (glibc's
/// largest automatic value).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const OWN_MAPPING_FROM_BYTES: i32 = 32 << 20;

/// Free memory at the top of an allocator heap is returned to the kernel
/// only past this size (twice the above, as glibc sets it).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const RETURN_FREE_MEMORY_PAST_BYTES: i32 = 64 << 20;

/// Has glibc's allocator keep the buffers a transfer allocates and frees for
/// every chunk (≤ 1 MiB each, a few at a time) instead of mapping each anew.
/// Call it at the start of a process, before its threads.
///
/// By default glibc maps every allocation of 128 KiB and up on its own and
/// unmaps it when freed, raising that threshold only as it sees such frees
/// (up to 32 MiB); and it returns free memory at the top of a heap to the
/// kernel past twice that threshold. A first large pull thus faulted much
/// of its gRPC buffers in again, chunk after chunk. These are the values
/// glibc's own adjustment ends at, fixed from the start; the cost is memory
/// the allocator keeps, bounded by the few chunks in flight. Other
/// allocators: nothing changes.
pub fn keep_transfer_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` takes no pointers and only changes two thresholds
    // the allocator consults when it maps or trims memory. It is meant for
    // the start of a process, as `main` calls it; an allocation racing a
    // later call (the unit test's) sees the old value or the new.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_MAPPING_FROM_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, RETURN_FREE_MEMORY_PAST_BYTES);
    }
}

#[cfg(test)]
#[cfg(target_os = "linux")]
mod tests {
    use super::*;

    /// The memory mapping holding `address`, from `/proc/self/smaps`: its
    /// range and its `VmFlags`.
    fn mapping_of(address: usize) -> (usize, usize, String) {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut current = None;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or_default();
            if let Some((from, to)) = first.split_once('-')
                && let (Ok(from), Ok(to)) = (usize::from_str_radix(from, 16), usize::from_str_radix(to, 16))
            {
                current = Some((from, to));
            } else if let Some(flags) = line.strip_prefix("VmFlags:")
                && let Some((from, to)) = current
                && (from..to).contains(&address)
            {
                return (from, to, flags.trim().to_string());
            }
        }
        panic!("no mapping holds {address:#x}");
    }

    #[test]
    fn huge_page_advice_covers_the_whole_allocation() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            return; // A kernel without transparent huge pages refuses the advice.
        }
        // Far above any allocator's own-mapping threshold.
        let mut values: Vec<f32> = Vec::with_capacity(64 << 20);
        advise_huge_pages(&mut values);
        let start = values.as_ptr() as usize;
        let end = start + values.capacity() * 4;
        // One mapping, advised from its first page to its last: advice for
        // part of it would split it, and growing it would copy it.
        let (from, to, flags) = mapping_of(start);
        assert!(flags.split(' ').any(|f| f == "hg"), "not advised: {flags}");
        assert!(to >= end, "mapping {from:#x}-{to:#x} ends inside {start:#x}-{end:#x}");
        // Growing keeps the values (by `mremap` or by copying; the point
        // above is that nothing forces the copy).
        values.extend((0..1000).map(|i| i as f32));
        values.reserve(values.capacity() + 1);
        assert_eq!(values[999], 999.0);
    }

    /// Minor page faults of this thread so far.
    fn faults() -> libc::c_long {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `usage` is a valid, writable `rusage`.
        #[allow(unsafe_code)]
        let usage = unsafe {
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()), 0);
            usage.assume_init()
        };
        usage.ru_minflt
    }

    #[cfg(target_env = "gnu")]
    #[test]
    fn chunk_sized_buffers_are_kept_between_chunks() {
        keep_transfer_buffers();
        // What the gRPC stack does per chunk: a buffer grows to hold the
        // next message frame by frame (16 KiB frames here, HTTP/2's
        // default; Meridian's connections allow up to 256 KiB) while the
        // last message (split off the previous buffer) is still alive, and
        // is freed after it.
        let frame = [1u8; 16 << 10];
        let churn = || {
            let mut last: Vec<u8> = Vec::new();
            for _ in 0..50 {
                let mut next = Vec::with_capacity(64 << 10);
                while next.len() < (1 << 20) + 5 {
                    next.extend_from_slice(&frame);
                }
                last = std::hint::black_box(next);
            }
            drop(last);
        };
        churn();
        let before = faults();
        churn();
        let faulted = faults() - before;
        // 0 faults with these settings, 492 with glibc's defaults.
        assert!(faulted < 100, "{faulted} page faults for 50 reused buffers");
    }
}
