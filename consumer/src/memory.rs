//! A worker keeps the memory it freed, so its next job does not pay for fresh pages.
//!
//! A worker's big allocations are operand blocks: message bodies of up to the message limit
//! (14 MiB at 4096 f64), one per block, 256 MiB for a 4096² job. glibc serves allocations that
//! large with `mmap` and gives them back with `munmap` when they are freed, so every job's blocks
//! land in fresh pages, and the kernel zeroes each 4 KiB page on its first touch. On the VMs
//! these figures come from it is worse: memory given back is reported to the hypervisor (virtio
//! free page reporting) and the next first touch is a fault in the host too. Measured here
//! (BENCHMARKS.md): first touch of 256 MiB 95 ms, or ~580 ms after it was reported; touching it
//! again 7 ms. A worker multiplying a 4096² job pays this for every job, on the job's clock.
//!
//! So the worker asks glibc to serve blocks from its heap (`M_MMAP_THRESHOLD` at its maximum,
//! 32 MiB) and to keep freed heap memory up to the operand cache's budget (`M_TRIM_THRESHOLD`)
//! instead of returning it. The next job's blocks reuse it. The cost is that a worker's resident
//! memory stays at its largest working set (bounded by `--operand-cache` and the message limit)
//! between jobs; lower `--operand-cache` to bound it further.

/// glibc's largest `M_MMAP_THRESHOLD` on 64-bit targets (`HEAP_MAX_SIZE / 2`).
const MAX_MMAP_THRESHOLD: i32 = 32 << 20;

/// Keeps up to `keep_bytes` of freed memory in the process for reuse (see the module docs).
/// Returns false where the C library offers no such control (not glibc); nothing changes then.
pub fn keep_freed_memory(keep_bytes: u64) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let keep = i32::try_from(keep_bytes).unwrap_or(i32::MAX);
        // SAFETY: mallopt only changes allocator parameters; it is called before any thread
        // other than main exists, and glibc serialises it with allocations anyway.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, keep) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = keep_bytes;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_settings() {
        assert!(keep_freed_memory(1 << 30));
        assert!(
            keep_freed_memory(u64::MAX),
            "a budget over 2 GiB is capped, not refused"
        );
    }
}
