//! Keep a 140 GB run from filling the page cache: input pages are dropped once
//! their tensor is processed, output pages once the kernel has written them
//! back. Without this the kernel keeps every byte read or written cached and
//! pushes everything else on the machine out of memory.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

use crate::error::{Error, Result};

const PAGE: u64 = 4096;

/// Dirty output bytes allowed before the oldest are waited for and dropped.
pub const WRITE_BEHIND_BYTES: u64 = 256 << 20;

/// `[start, end)` rounded inward to whole pages: partial pages at either end
/// may hold a neighbour's bytes still in use.
pub fn whole_pages(start: u64, end: u64) -> Option<(u64, u64)> {
    let s = start.div_ceil(PAGE) * PAGE;
    let e = end / PAGE * PAGE;
    (e > s).then_some((s, e))
}

/// Drop the clean cached pages of `[start, end)` of `file` (advisory: errors,
/// and pages still dirty or mapped by someone, are left as they are).
pub fn drop_cached(file: &File, start: u64, end: u64) {
    if let Some((s, e)) = whole_pages(start, end) {
        // SAFETY: a plain advisory syscall on a descriptor we own.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                s as libc::off_t,
                (e - s) as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }
}

/// Drop every clean cached page of `file`.
pub fn drop_all_cached(file: &File) {
    // SAFETY: as above; length 0 means "to the end of the file".
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

fn sync_range(file: &File, path: &Path, start: u64, len: u64, flags: libc::c_uint) -> Result<()> {
    // SAFETY: a plain syscall on a descriptor we own.
    let rc = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            start as libc::off64_t,
            len as libc::off64_t,
            flags,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        // Filesystems without it (some network ones) just keep their pages.
        Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ESPIPE) => Ok(()),
        _ => Err(Error::io(path, "write back", err)),
    }
}

/// Output written but maybe not yet on disk, oldest first. Each write starts
/// its own writeback at once (asynchronous); past `WRITE_BEHIND_BYTES` the
/// oldest ranges are waited for and dropped from the cache, so dirty output
/// stays bounded and writeback overlaps the computation instead of piling up
/// for the final fsync.
pub struct WriteBehind {
    limit: u64,
    ranges: Mutex<(VecDeque<(u64, u64)>, u64)>,
}

impl Default for WriteBehind {
    fn default() -> Self {
        Self::new(WRITE_BEHIND_BYTES)
    }
}

impl WriteBehind {
    pub fn new(limit: u64) -> Self {
        WriteBehind {
            limit,
            ranges: Mutex::default(),
        }
    }

    pub fn written(&self, file: &File, path: &Path, start: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        sync_range(file, path, start, len, libc::SYNC_FILE_RANGE_WRITE)?;
        let mut settle = Vec::new();
        {
            let mut guard = self.ranges.lock().expect("poisoned");
            let (queue, bytes) = &mut *guard;
            queue.push_back((start, len));
            *bytes += len;
            while *bytes > self.limit {
                let (s, l) = queue.pop_front().expect("bytes > 0");
                *bytes -= l;
                settle.push((s, l));
            }
        }
        // Waited for outside the lock: other threads keep writing meanwhile.
        for (s, l) in settle {
            sync_range(
                file,
                path,
                s,
                l,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )?;
            drop_cached(file, s, s + l);
        }
        Ok(())
    }
}

/// (bytes of `path` in the page cache, file size): what the kernel holds of
/// a file, for benchmarks and tests of the release above.
pub fn cached_bytes(path: &Path) -> Result<(u64, u64)> {
    let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(path, "stat", e))?
        .len();
    if len == 0 {
        return Ok((0, 0));
    }
    // SAFETY: read-only mapping used only for mincore; never dereferenced.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, "mmap", e))?;
    let pages = len.div_ceil(PAGE) as usize;
    let mut resident = vec![0u8; pages];
    // SAFETY: the mapping covers `len` bytes; the vector has one byte per page.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            len as usize,
            resident.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(Error::io(path, "mincore", std::io::Error::last_os_error()));
    }
    let cached = resident.iter().filter(|b| *b & 1 == 1).count() as u64;
    Ok(((cached * PAGE).min(len), len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    /// A written, synced and read-back file in a directory on a real disk
    /// (tmpfs keeps every page: there the tests have nothing to check).
    fn cached_file(len: usize) -> Option<(tempfile::TempDir, std::path::PathBuf, File)> {
        let dir = tempfile::tempdir_in(std::env::current_dir().unwrap()).unwrap();
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![7u8; len]).unwrap();
        f.sync_all().unwrap();
        let f = File::open(&path).unwrap();
        drop_all_cached(&f);
        if cached_bytes(&path).unwrap().0 != 0 {
            eprintln!("skipped: this filesystem does not drop cached pages");
            return None;
        }
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, 0).unwrap(); // now clean and cached
        Some((dir, path, f))
    }

    #[test]
    fn drop_cached_releases_whole_pages_only() {
        let Some((_dir, path, f)) = cached_file(64 * 4096) else {
            return;
        };
        let (before, len) = cached_bytes(&path).unwrap();
        assert_eq!(before, len);
        // A range not on page boundaries keeps its partial first and last pages.
        drop_cached(&f, 100, 32 * 4096 + 100);
        assert_eq!(cached_bytes(&path).unwrap().0, len - 31 * 4096);
    }

    #[test]
    fn write_behind_bounds_the_dirty_cache() {
        let Some((dir, _, _)) = cached_file(4096) else {
            return;
        };
        let path = dir.path().join("out");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let limit = 8 << 20;
        let chunk = vec![1u8; 1 << 20];
        let wb = WriteBehind::new(limit);
        let total = limit * 4;
        let mut at = 0;
        while at < total {
            f.write_all_at(&chunk, at).unwrap();
            wb.written(&f, &path, at, chunk.len() as u64).unwrap();
            at += chunk.len() as u64;
        }
        let (cached, len) = cached_bytes(&path).unwrap();
        assert_eq!(len, total);
        assert!(cached <= limit, "{cached} of {len} bytes still cached");
        // Without write-behind, everything written stays cached.
        let plain = dir.path().join("plain");
        let g = File::create(&plain).unwrap();
        g.write_all_at(&vec![1u8; total as usize], 0).unwrap();
        assert_eq!(cached_bytes(&plain).unwrap().0, total);
    }
}
