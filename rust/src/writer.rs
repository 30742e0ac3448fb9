//! A safetensors shard writer that knows every tensor up front: it lays out
//! the header exactly as the safetensors crate does, then takes each tensor's
//! bytes in any order (positional writes at known offsets, safe from several
//! threads), and finalizes atomically: temporary name in the same directory,
//! fsync, rename, fsync of the directory.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use crate::checkpoint::{Checkpoint, MAX_HEADER_LEN};
use crate::error::{Error, Result};
use crate::journal::Journal;
use crate::pagecache::{self, WriteBehind};

/// What the writer must know of a tensor before any bytes arrive.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

/// Pass-through copies move this many bytes at a time.
const COPY_CHUNK: usize = 64 << 20;

/// (name, start, end): a tensor's absolute byte range in the file.
pub type ByteRange = (String, u64, u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Pending,
    Writing,
    Done,
}

#[derive(Clone, Debug)]
struct Slot {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
    state: SlotState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriterState {
    Open,
    Finalized,
    Aborted,
    /// Stopped with its temporary file kept, for a later run to resume.
    Suspended,
}

/// The header a safetensors file holding `specs` starts with, as the crate
/// would write it: the 8-byte length, then JSON padded with spaces to a
/// multiple of 8. Also returns each tensor's data offsets, in layout order.
pub fn layout_header(
    path: &Path,
    specs: &[TensorSpec],
    metadata: Option<HashMap<String, String>>,
) -> Result<(Vec<u8>, Vec<ByteRange>)> {
    let spec_err = |tensor: &str, reason: String| Error::WriterSpec {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        reason,
    };
    let mut seen = HashSet::with_capacity(specs.len());
    let mut sorted: Vec<&TensorSpec> = specs.iter().collect();
    // The crate's order: descending dtype alignment, then name.
    sorted.sort_by(|a, b| b.dtype.cmp(&a.dtype).then(a.name.cmp(&b.name)));
    let mut infos = Vec::with_capacity(sorted.len());
    let mut offset = 0usize;
    for spec in sorted {
        if !seen.insert(spec.name.as_str()) {
            return Err(spec_err(&spec.name, "listed twice".to_string()));
        }
        let nbytes = spec_nbytes(spec).map_err(|r| spec_err(&spec.name, r))?;
        let end = offset
            .checked_add(nbytes)
            .ok_or_else(|| spec_err(&spec.name, "file size overflows".to_string()))?;
        infos.push((
            spec.name.clone(),
            TensorInfo {
                dtype: spec.dtype,
                shape: spec.shape.clone(),
                data_offsets: (offset, end),
            },
        ));
        offset = end;
    }
    let ranges: Vec<ByteRange> = infos
        .iter()
        .map(|(n, i)| (n.clone(), i.data_offsets.0 as u64, i.data_offsets.1 as u64))
        .collect();
    let meta = Metadata::new(metadata, infos)
        .map_err(|e| spec_err(ranges.first().map_or("", |r| &r.0), e.to_string()))?;
    let mut json = serde_json::to_string(&meta)
        .map_err(|e| spec_err("", format!("header serialization failed: {e}")))?
        .into_bytes();
    json.resize(json.len().next_multiple_of(8), b' ');
    if json.len() as u64 > MAX_HEADER_LEN {
        return Err(spec_err(
            "",
            format!(
                "header would be {} bytes, over the 100 MB limit",
                json.len()
            ),
        ));
    }
    let mut header = (json.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(&json);
    let data_start = header.len() as u64;
    let ranges = ranges
        .into_iter()
        .map(|(n, s, e)| (n, data_start + s, data_start + e))
        .collect();
    Ok((header, ranges))
}

/// Bytes of a tensor of this dtype and shape, or why it has none.
pub fn spec_nbytes(spec: &TensorSpec) -> std::result::Result<usize, String> {
    let bits = spec
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(spec.dtype.bitsize()))
        .ok_or_else(|| format!("shape {:?} overflows", spec.shape))?;
    if bits % 8 != 0 {
        return Err(format!(
            "{} x {:?} is not a whole number of bytes",
            spec.dtype, spec.shape
        ));
    }
    Ok(bits / 8)
}

pub struct ShardWriter {
    path: PathBuf,
    tmp_path: PathBuf,
    file: File,
    total_len: u64,
    /// Tensor names in layout order, for deterministic messages.
    order: Vec<String>,
    slots: Mutex<HashMap<String, Slot>>,
    state: Mutex<WriterState>,
    journal: Option<Arc<Journal>>,
    write_behind: WriteBehind,
}

impl ShardWriter {
    /// Lay out the file, write its header under a temporary name next to
    /// `path`, and reserve its full size so a full disk shows up now.
    pub fn create(
        path: &Path,
        specs: &[TensorSpec],
        metadata: Option<HashMap<String, String>>,
    ) -> Result<ShardWriter> {
        Self::open(path, specs, metadata, None, false)
    }

    /// `create`, recording every tensor written in `journal`; with `resume`,
    /// an existing temporary file of exactly this layout (same length, same
    /// header bytes) is reopened as it is, every slot pending until `adopt`ed.
    pub fn open(
        path: &Path,
        specs: &[TensorSpec],
        metadata: Option<HashMap<String, String>>,
        journal: Option<Arc<Journal>>,
        resume: bool,
    ) -> Result<ShardWriter> {
        let (header, ranges) = layout_header(path, specs, metadata)?;
        let file_name = path
            .file_name()
            .ok_or_else(|| Error::WriterSpec {
                path: path.to_path_buf(),
                tensor: String::new(),
                reason: "output path has no file name".to_string(),
            })?
            .to_string_lossy();
        let tmp_path = path.with_file_name(format!(".{file_name}.partial"));
        let total_len = ranges.last().map_or(header.len() as u64, |r| r.2);
        let reusable = resume && same_layout(&tmp_path, &header, total_len);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(!reusable)
            .open(&tmp_path)
            .map_err(|e| Error::io(&tmp_path, "create", e))?;
        let writer = ShardWriter {
            path: path.to_path_buf(),
            tmp_path: tmp_path.clone(),
            file,
            total_len,
            order: ranges.iter().map(|r| r.0.clone()).collect(),
            slots: Mutex::new(
                specs
                    .iter()
                    .map(|s| {
                        let r = ranges.iter().find(|r| r.0 == s.name).expect("laid out");
                        (
                            s.name.clone(),
                            Slot {
                                dtype: s.dtype,
                                shape: s.shape.clone(),
                                start: r.1,
                                end: r.2,
                                state: SlotState::Pending,
                            },
                        )
                    })
                    .collect(),
            ),
            state: Mutex::new(WriterState::Open),
            journal,
            write_behind: WriteBehind::default(),
        };
        // From here on, dropping `writer` removes the temporary file.
        if reusable {
            return Ok(writer);
        }
        writer.reserve()?;
        writer
            .file
            .write_all_at(&header, 0)
            .map_err(|e| Error::io(&tmp_path, "write header", e))?;
        Ok(writer)
    }

    fn reserve(&self) -> Result<()> {
        self.file
            .set_len(self.total_len)
            .map_err(|e| Error::io(&self.tmp_path, "resize", e))?;
        #[cfg(target_os = "linux")]
        if self.total_len > 0 {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain syscall on a file descriptor we own.
            let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, 0, self.total_len as i64) };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                // Filesystems without fallocate just get a sparse file.
                if !matches!(
                    err.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
                ) {
                    return Err(Error::io(&self.tmp_path, "reserve space", err));
                }
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn total_len(&self) -> u64 {
        self.total_len
    }

    /// Each tensor's absolute byte range, in layout order.
    pub fn ranges(&self) -> Vec<ByteRange> {
        let slots = self.slots.lock().expect("poisoned");
        self.order
            .iter()
            .map(|n| {
                let s = &slots[n];
                (n.clone(), s.start, s.end)
            })
            .collect()
    }

    pub fn is_open(&self) -> bool {
        *self.state.lock().expect("poisoned") == WriterState::Open
    }

    fn check_open(&self) -> Result<()> {
        match *self.state.lock().expect("poisoned") {
            WriterState::Open => Ok(()),
            WriterState::Finalized => Err(Error::WriterClosed {
                path: self.path.clone(),
                state: "finalized",
            }),
            WriterState::Aborted => Err(Error::WriterClosed {
                path: self.path.clone(),
                state: "aborted",
            }),
            WriterState::Suspended => Err(Error::WriterClosed {
                path: self.path.clone(),
                state: "suspended",
            }),
        }
    }

    fn tensor_err(&self, tensor: &str, reason: String) -> Error {
        Error::WriterTensor {
            path: self.path.clone(),
            tensor: tensor.to_string(),
            reason,
        }
    }

    fn unknown(&self, tensor: &str) -> Error {
        self.tensor_err(
            tensor,
            "not one of the tensors this shard was laid out for".into(),
        )
    }

    /// Claim `name`'s slot for writing `len` bytes: returns its offset.
    fn claim(&self, name: &str, len: usize) -> Result<u64> {
        self.check_open()?;
        let mut slots = self.slots.lock().expect("poisoned");
        let slot = slots.get_mut(name).ok_or_else(|| self.unknown(name))?;
        if slot.state != SlotState::Pending {
            return Err(self.tensor_err(name, "written twice".into()));
        }
        let expected = slot.end - slot.start;
        if len as u64 != expected {
            return Err(self.tensor_err(
                name,
                format!(
                    "got {len} bytes, {} x {:?} needs {expected}",
                    slot.dtype, slot.shape
                ),
            ));
        }
        slot.state = SlotState::Writing;
        Ok(slot.start)
    }

    fn settle(&self, name: &str, ok: bool) {
        let mut slots = self.slots.lock().expect("poisoned");
        if let Some(slot) = slots.get_mut(name) {
            slot.state = if ok {
                SlotState::Done
            } else {
                SlotState::Pending
            };
        }
    }

    /// Write one tensor's bytes at its place. Safe to call from several
    /// threads at once for different tensors.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let offset = self.claim(name, bytes.len())?;
        let result = self
            .file
            .write_all_at(bytes, offset)
            .map_err(|e| Error::io(&self.tmp_path, "write", e))
            .and_then(|()| {
                self.write_behind
                    .written(&self.file, &self.tmp_path, offset, bytes.len() as u64)
            })
            .and_then(|()| {
                self.journal_tensor(name, bytes.len() as u64, || crc32fast::hash(bytes))
            });
        self.settle(name, result.is_ok());
        result
    }

    fn journal_tensor(&self, name: &str, len: u64, crc: impl FnOnce() -> u32) -> Result<()> {
        match &self.journal {
            Some(journal) => journal.record(&self.path, name, len, crc()),
            None => Ok(()),
        }
    }

    /// Take tensor `name` as already written (by an interrupted run) if the
    /// temporary file's bytes for it have checksum `crc32`; false otherwise,
    /// and the slot stays pending.
    pub fn adopt(&self, name: &str, crc32: u32) -> Result<bool> {
        self.check_open()?;
        let (start, end) = {
            let slots = self.slots.lock().expect("poisoned");
            let slot = slots.get(name).ok_or_else(|| self.unknown(name))?;
            if slot.state != SlotState::Pending {
                return Ok(slot.state == SlotState::Done);
            }
            (slot.start, slot.end)
        };
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = vec![0u8; COPY_CHUNK.min((end - start) as usize)];
        let mut at = start;
        while at < end {
            let n = buf.len().min((end - at) as usize);
            self.file
                .read_exact_at(&mut buf[..n], at)
                .map_err(|e| Error::io(&self.tmp_path, "read back", e))?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        pagecache::drop_cached(&self.file, start, end);
        let ok = hasher.finalize() == crc32;
        if ok {
            self.settle(name, true);
        }
        Ok(ok)
    }

    /// Copy tensor `source` of `checkpoint` into slot `name`, byte for byte.
    /// Its dtype and shape must be the ones the slot was laid out with. The
    /// copy goes in chunks, each chunk's input pages released once written,
    /// so a 2 GB embedding never makes 2 GB resident.
    pub fn copy_from(&self, checkpoint: &Checkpoint, source: &str, name: &str) -> Result<()> {
        let entry = checkpoint.get(source)?;
        {
            let slots = self.slots.lock().expect("poisoned");
            if let Some(slot) = slots.get(name) {
                if slot.dtype != entry.dtype || slot.shape != entry.shape {
                    return Err(self.tensor_err(
                        name,
                        format!(
                            "laid out as {} x {:?} but source '{source}' is {} x {:?}",
                            slot.dtype, slot.shape, entry.dtype, entry.shape
                        ),
                    ));
                }
            }
        }
        let bytes = checkpoint.bytes(entry);
        let offset = self.claim(name, bytes.len())?;
        let shard = &checkpoint.shards[entry.shard];
        let mut result = Ok(());
        let mut hasher = crc32fast::Hasher::new();
        for (i, chunk) in bytes.chunks(COPY_CHUNK).enumerate() {
            let at = (i * COPY_CHUNK) as u64;
            result = self
                .file
                .write_all_at(chunk, offset + at)
                .map_err(|e| Error::io(&self.tmp_path, "write", e))
                .and_then(|()| {
                    self.write_behind.written(
                        &self.file,
                        &self.tmp_path,
                        offset + at,
                        chunk.len() as u64,
                    )
                });
            if self.journal.is_some() {
                hasher.update(chunk);
            }
            shard.release(entry.start + at, entry.start + at + chunk.len() as u64);
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            result = self.journal_tensor(name, bytes.len() as u64, || hasher.finalize());
        }
        self.settle(name, result.is_ok());
        result
    }

    /// Names of the tensors not yet written, in layout order.
    pub fn missing(&self) -> Vec<String> {
        let slots = self.slots.lock().expect("poisoned");
        self.order
            .iter()
            .filter(|n| slots[*n].state != SlotState::Done)
            .cloned()
            .collect()
    }

    /// Make the file durable and give it its final name. Fails, leaving the
    /// final name untouched, if any tensor is missing.
    pub fn finalize(&self) -> Result<PathBuf> {
        self.check_open()?;
        let missing = self.missing();
        if let Some(first) = missing.first() {
            return Err(Error::WriterIncomplete {
                path: self.path.clone(),
                tensor: first.clone(),
                count: missing.len(),
            });
        }
        self.file
            .sync_all()
            .map_err(|e| Error::io(&self.tmp_path, "fsync", e))?;
        // On disk now: its cached pages only push other data out of memory.
        pagecache::drop_all_cached(&self.file);
        std::fs::rename(&self.tmp_path, &self.path)
            .map_err(|e| Error::io(&self.path, "rename into place", e))?;
        *self.state.lock().expect("poisoned") = WriterState::Finalized;
        sync_dir(&self.path)?;
        Ok(self.path.clone())
    }

    /// Stop, keeping the temporary file (and what the journal says of it) for
    /// a later run to resume. The final name is never touched.
    pub fn suspend(&self) {
        let mut state = self.state.lock().expect("poisoned");
        if *state == WriterState::Open {
            *state = WriterState::Suspended;
        }
    }

    /// Give up: remove the temporary file. The final name is never touched.
    pub fn abort(&self) {
        let mut state = self.state.lock().expect("poisoned");
        if *state == WriterState::Open {
            let _ = std::fs::remove_file(&self.tmp_path);
            *state = WriterState::Aborted;
        }
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Whether `tmp_path` is a file of `total_len` bytes starting with `header`.
fn same_layout(tmp_path: &Path, header: &[u8], total_len: u64) -> bool {
    let Ok(file) = File::open(tmp_path) else {
        return false;
    };
    if file.metadata().map(|m| m.len()).ok() != Some(total_len) {
        return false;
    }
    let mut existing = vec![0u8; header.len()];
    file.read_exact_at(&mut existing, 0).is_ok() && existing == header
}

/// fsync the directory holding `path`, so a rename into it survives a crash.
pub fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, "fsync directory", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn spec(name: &str, dtype: Dtype, shape: &[usize]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    fn fill(spec: &TensorSpec, seed: u8) -> Vec<u8> {
        let n = spec_nbytes(spec).unwrap();
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn sample_specs() -> Vec<TensorSpec> {
        vec![
            spec("b.weight", Dtype::BF16, &[3, 5]),
            spec("a.weight", Dtype::F32, &[2, 2]),
            spec("z", Dtype::U8, &[7]),
            spec("scalar", Dtype::F64, &[]),
            spec("empty", Dtype::F16, &[0, 4]),
            spec("a.bias", Dtype::F32, &[2]),
        ]
    }

    #[test]
    fn layout_matches_the_safetensors_crate_byte_for_byte() {
        let specs = sample_specs();
        let data: Vec<Vec<u8>> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| fill(s, i as u8))
            .collect();
        let views: Vec<(String, TensorView)> = specs
            .iter()
            .zip(&data)
            .map(|(s, d)| {
                (
                    s.name.clone(),
                    TensorView::new(s.dtype, s.shape.clone(), d).unwrap(),
                )
            })
            .collect();
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let expected = safetensors::serialize(views, Some(meta.clone())).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.safetensors");
        let w = ShardWriter::create(&path, &specs, Some(meta)).unwrap();
        // Reverse order: positional writes make the order irrelevant.
        for (s, d) in specs.iter().zip(&data).rev() {
            w.write(&s.name, d).unwrap();
        }
        w.finalize().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    #[test]
    fn offsets_are_contiguous_and_header_is_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let (header, ranges) = layout_header(&dir.path().join("x"), &sample_specs(), None).unwrap();
        assert_eq!(header.len() % 8, 0);
        assert_eq!(ranges[0].1, header.len() as u64);
        for pair in ranges.windows(2) {
            assert_eq!(pair[0].2, pair[1].1);
        }
        // Alignment order: 8-byte dtypes first, then 4, 2, 1.
        let names: Vec<_> = ranges.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(
            names,
            ["scalar", "a.bias", "a.weight", "b.weight", "empty", "z"]
        );
    }

    #[test]
    fn duplicate_and_overflowing_specs_are_refused() {
        let p = Path::new("x.safetensors");
        let dup = [spec("a", Dtype::U8, &[1]), spec("a", Dtype::U8, &[1])];
        assert!(matches!(
            layout_header(p, &dup, None),
            Err(Error::WriterSpec { .. })
        ));
        let huge = [spec("h", Dtype::F64, &[usize::MAX, 2])];
        assert!(
            matches!(layout_header(p, &huge, None), Err(Error::WriterSpec { tensor, .. }) if tensor == "h")
        );
    }

    #[test]
    fn misuse_is_an_error_and_nothing_is_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let specs = [spec("a", Dtype::F32, &[2]), spec("b", Dtype::U8, &[3])];
        let w = ShardWriter::create(&path, &specs, None).unwrap();
        assert!(matches!(
            w.write("nope", &[0; 8]),
            Err(Error::WriterTensor { .. })
        ));
        assert!(matches!(
            w.write("a", &[0; 7]),
            Err(Error::WriterTensor { .. })
        ));
        w.write("a", &[0; 8]).unwrap();
        assert!(matches!(
            w.write("a", &[0; 8]),
            Err(Error::WriterTensor { .. })
        ));
        assert!(matches!(
            w.finalize(),
            Err(Error::WriterIncomplete { ref tensor, count: 1, .. }) if tensor == "b"
        ));
        assert!(!path.exists());
        drop(w);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(leftovers.is_empty(), "temporary file left behind");
    }

    #[test]
    fn finalized_writer_refuses_more_work() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.safetensors");
        let w = ShardWriter::create(&path, &[spec("a", Dtype::U8, &[1])], None).unwrap();
        w.write("a", &[9]).unwrap();
        w.finalize().unwrap();
        assert!(matches!(w.finalize(), Err(Error::WriterClosed { .. })));
        drop(w);
        assert!(path.exists(), "drop after finalize must keep the file");
    }
}
