//! The checkpoint's files: C's reserved disk space and data offset, the lock, and writes that
//! are synced before anything depends on them.

use std::fs::{self, File, OpenOptions};
use std::path::Path;

use super::{AssemblyError, LOCK, io};
use std::io::Write;

use ndarray::ArrayViewMut2;
use ndarray_npy::ViewMutNpyExt;

use crate::Plan;
use crate::matrix::Element;
use crate::message::DType;

/// Gives C's file its disk blocks now. C is written through a memory map, and a mapped write
/// that finds the disk full is a SIGBUS, not an error: better to learn it here, before any
/// result is taken. Filesystems without `fallocate` keep the sparse file.
#[cfg(target_os = "linux")]
pub(super) fn reserve(f: &File, path: &Path) -> Result<(), AssemblyError> {
    use std::os::fd::AsRawFd;
    let len = f.metadata().map_err(io(path))?.len();
    let Ok(signed) = libc::off_t::try_from(len) else {
        return Err(AssemblyError::NoSpace {
            path: path.to_path_buf(),
            bytes: len,
        });
    };
    // SAFETY: a plain syscall on an open file descriptor we own.
    match unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, signed) } {
        0 => Ok(()),
        libc::ENOSPC | libc::EFBIG => Err(AssemblyError::NoSpace {
            path: path.to_path_buf(),
            bytes: len,
        }),
        libc::EOPNOTSUPP | libc::EINVAL => Ok(()),
        code => Err(AssemblyError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::from_raw_os_error(code),
        }),
    }
}

/// Checks the mapped .npy holds an m×n C-order matrix of the plan's type in this machine's byte
/// order, and returns where its numbers start.
pub(super) fn c_data_offset(map: &mut [u8], plan: &Plan) -> Result<usize, String> {
    fn check<T: Element>(map: &mut [u8], shape: (usize, usize)) -> Result<usize, String> {
        let view = ArrayViewMut2::<T>::view_mut_npy(map).map_err(|e| e.to_string())?;
        if view.dim() != shape || !view.is_standard_layout() {
            return Err(format!(
                "C is {:?} in the checkpoint, the plan says {shape:?}",
                view.dim()
            ));
        }
        Ok(map.len() - shape.0 * shape.1 * size_of::<T>())
    }
    let shape = (plan.m as usize, plan.n as usize);
    match plan.dtype {
        DType::F32 => check::<f32>(map, shape),
        DType::F64 => check::<f64>(map, shape),
    }
}

/// Elsewhere C stays sparse (macOS has no `posix_fallocate`); gemmq's images run Linux.
#[cfg(not(target_os = "linux"))]
pub(super) fn reserve(_: &File, _: &Path) -> Result<(), AssemblyError> {
    Ok(())
}

/// The checkpoint's lock: one collector at a time (a second one stands by).
pub(super) fn lock(dir: &Path) -> Result<File, AssemblyError> {
    let lock_path = dir.join(LOCK);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    lock.try_lock().map_err(|e| match e {
        fs::TryLockError::WouldBlock => AssemblyError::Io {
            path: lock_path.clone(),
            source: std::io::ErrorKind::WouldBlock.into(),
        },
        fs::TryLockError::Error(e) => AssemblyError::Io {
            path: lock_path.clone(),
            source: e,
        },
    })?;
    Ok(lock)
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), AssemblyError> {
    let parent = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io(parent))
}

/// Cuts a journal back to its last complete line: a crash mid-write leaves a torn one, which
/// was never synced (so never acked) and must not glue itself to the next record.
pub(super) fn truncate_torn_tail(path: &Path) -> Result<(), AssemblyError> {
    let Ok(bytes) = fs::read(path) else {
        return Ok(());
    };
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if keep < bytes.len() {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io(path))?;
        f.set_len(keep as u64).map_err(io(path))?;
        f.sync_all().map_err(io(path))?;
    }
    Ok(())
}

pub(super) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), AssemblyError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}
