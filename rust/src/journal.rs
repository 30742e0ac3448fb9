//! The resume journal: one JSON line per tensor written into a shard's
//! temporary file, with its CRC-32, appended once the bytes are written.
//! No fsync per line: a resumed run re-reads each journaled tensor from the
//! temporary file and keeps it only if its checksum still matches.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

pub struct Journal {
    path: PathBuf,
    file: Mutex<File>,
}

#[derive(serde::Serialize)]
struct Line<'a> {
    file: &'a str,
    tensor: &'a str,
    len: u64,
    crc32: u32,
}

impl Journal {
    /// Open `path` for appending (created if missing; earlier lines kept).
    pub fn open(path: &Path) -> Result<Journal> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, "open journal", e))?;
        Ok(Journal {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Record that `tensor` of the shard whose final path is `shard` now holds
    /// `len` bytes with checksum `crc32`. One write per line, so concurrent
    /// writers never interleave within a line.
    pub fn record(&self, shard: &Path, tensor: &str, len: u64, crc32: u32) -> Result<()> {
        let mut line = serde_json::to_vec(&Line {
            file: &shard.to_string_lossy(),
            tensor,
            len,
            crc32,
        })
        .expect("plain strings and numbers serialize");
        line.push(b'\n');
        self.file
            .lock()
            .expect("poisoned")
            .write_all(&line)
            .map_err(|e| Error::io(&self.path, "append to journal", e))
    }
}
