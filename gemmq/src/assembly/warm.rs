//! C's pages brought into memory while the collector waits for its first results.
//!
//! C is written through a shared map of a preallocated file, and the first touch of each page
//! costs a fault in which the kernel allocates a page-cache page and zero-fills it (the extent
//! is unwritten). For a 4096² f64 C that is ~0.2 core-s (perf: `filemap_fault →
//! ext4_mpage_readpages → zero_user_segments`), on the result path, while the workers and the
//! broker are busiest. Yet a job's first results come a second or more after its announcement,
//! while the workers wait for their first blocks and the machine is half idle: a thread takes
//! the cost then, populating C's pages ahead of the results.
//!
//! Read-populated (`MADV_POPULATE_READ`), not write-populated: the pages stay clean, so
//! [`Assembly::commit`](super::Assembly::commit)'s flush does not write C's zeros to disk. A
//! tile then lands with a minor fault per page (the page is in the page cache), not a
//! zero-fill. The thread uses a map of its own, so the collector's map is never shared. Only a
//! fresh checkpoint is warmed: a resumed C holds tiles on disk that nothing needs to read.

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// The most of C warmed, from the front (where the first rows' tiles land): a larger C would
/// push other pages out of memory for tiles that come much later.
const WARM_MAX_BYTES: u64 = 1 << 30;
/// Populated at a time, so that a stop (the assembly dropped) waits for a few milliseconds at
/// most.
const STEP: u64 = 4 << 20;

/// A thread populating C's pages; stopped (and joined) when dropped.
pub(super) struct Warming {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Warming {
    /// Starts populating `range` of `file` (up to [`WARM_MAX_BYTES`] of it). Best effort: a
    /// kernel without `MADV_POPULATE_READ` (before Linux 5.14), or another OS, warms nothing
    /// and C's pages come in as tiles land, as they would anyway.
    pub(super) fn start(file: &File, range: Range<u64>) -> Warming {
        let stop = Arc::new(AtomicBool::new(false));
        let end = range.end.min(range.start.saturating_add(WARM_MAX_BYTES));
        let thread = if end > range.start && cfg!(target_os = "linux") {
            file.try_clone().ok().and_then(|file| {
                let stop = stop.clone();
                std::thread::Builder::new()
                    .name("warm-c".into())
                    .spawn(move || populate(&file, range.start..end, &stop))
                    .ok()
            })
        } else {
            None
        };
        Warming { stop, thread }
    }

    /// Waits for the thread to be done (tests).
    #[cfg(test)]
    pub(super) fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Warming {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(target_os = "linux")]
fn populate(file: &File, range: Range<u64>, stop: &AtomicBool) {
    use memmap2::{Advice, MmapOptions};
    let Ok(len) = usize::try_from(range.end) else {
        return;
    };
    let Ok(map) = MmapOptions::new().len(len).map_raw_read_only(file) else {
        return;
    };
    let mut at = range.start;
    while at < range.end && !stop.load(Ordering::Relaxed) {
        let step = STEP.min(range.end - at);
        if map
            .advise_range(Advice::PopulateRead, at as usize, step as usize)
            .is_err()
        {
            return;
        }
        at += step;
    }
}

#[cfg(not(target_os = "linux"))]
fn populate(_: &File, _: Range<u64>, _: &AtomicBool) {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;

    /// The pages of `file`'s first `len` bytes that are in memory, by `mincore` on a map.
    fn resident_pages(file: &File, len: usize) -> usize {
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_raw_read_only(file)
            .expect("mapped");
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: `map` covers `len` bytes and `vec` has a byte per page of them.
        let rc = unsafe { libc::mincore(map.as_mut_ptr().cast(), len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    fn preallocated(dir: &tempfile::TempDir, head: &[u8], len: u64) -> File {
        let path = dir.path().join("C.npy");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .expect("created");
        f.write_all(head).expect("written");
        f.set_len(len).expect("sized");
        f
    }

    #[test]
    fn warming_brings_c_into_memory_and_changes_none_of_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let len = 8 << 20;
        let f = preallocated(&dir, b"header", len);
        let probe = memmap2::MmapOptions::new()
            .len(4096)
            .map_raw_read_only(&f)
            .expect("mapped");
        if probe
            .advise_range(memmap2::Advice::PopulateRead, 0, 4096)
            .is_err()
        {
            eprintln!("skipped: this kernel has no MADV_POPULATE_READ (Linux 5.14 and later)");
            return;
        }
        assert!(
            resident_pages(&f, len as usize) < 8,
            "a sparse file starts out of memory"
        );
        Warming::start(&f, 4096..len).wait();
        let pages = resident_pages(&f, len as usize);
        assert!(
            pages >= (len as usize - 4096) / 4096,
            "{pages} of 2048 pages in memory after warming"
        );
        let bytes = std::fs::read(dir.path().join("C.npy")).expect("read");
        assert_eq!(&bytes[..6], b"header");
        assert!(bytes[6..].iter().all(|&b| b == 0), "warming wrote nothing");
    }

    #[test]
    fn an_empty_range_starts_no_thread_and_a_drop_mid_way_joins_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let f = preallocated(&dir, b"", 64 << 20);
        assert!(Warming::start(&f, 10..10).thread.is_none());
        let warming = Warming::start(&f, 0..(64 << 20));
        let stop = warming.stop.clone();
        drop(warming);
        assert_eq!(
            Arc::strong_count(&stop),
            1,
            "the thread is gone (joined) once the warming is dropped"
        );
    }
}
