//! The PyO3 layer: thin wrappers over `checkpoint` and `writer`, the one place
//! Rust errors become Python exceptions, and the GIL released around I/O.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::checkpoint::{parse_dtype, Checkpoint, Shard, TensorEntry};
use crate::error::Error;
use crate::journal::Journal;
use crate::pipeline::{CopyJob, Pipeline, WriteJob};
use crate::writer::{ShardWriter, TensorSpec};

create_exception!(
    _pissa_rs,
    PissaError,
    PyException,
    "Base of every pissa_rs error."
);
create_exception!(
    _pissa_rs,
    PissaIOError,
    PissaError,
    "The OS refused an I/O operation (full disk included); `.errno` says which."
);
create_exception!(
    _pissa_rs,
    CheckpointError,
    PissaError,
    "The input checkpoint is unusable."
);
create_exception!(
    _pissa_rs,
    HeaderError,
    CheckpointError,
    "A safetensors header is truncated, too large, or not valid UTF-8 JSON."
);
create_exception!(
    _pissa_rs,
    TensorLayoutError,
    CheckpointError,
    "A tensor's offsets or byte length are inconsistent, or the data section is truncated."
);
create_exception!(
    _pissa_rs,
    CheckpointIndexError,
    CheckpointError,
    "The index json and the shards disagree, or the index is malformed."
);
create_exception!(
    _pissa_rs,
    UnsafePathError,
    CheckpointError,
    "An index entry points outside the checkpoint directory."
);
create_exception!(
    _pissa_rs,
    UnsupportedFormatError,
    CheckpointError,
    "No safetensors checkpoint here (pickle weights, nothing, or several files and no index)."
);
create_exception!(
    _pissa_rs,
    TensorNotFoundError,
    CheckpointError,
    "No tensor of that name."
);
create_exception!(pissa_rs, WriterError, PissaError, "A shard writer was misused: unknown tensor, wrong length, written twice, finalized incomplete.");

/// The single conversion from the Rust error enum to Python exceptions. The
/// exception carries `.path` and `.tensor` (None where no tensor is involved).
pub fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    let py_err = match &err {
        Error::Io { .. } => PissaIOError::new_err(msg),
        Error::TooShort { .. }
        | Error::HeaderTooLarge { .. }
        | Error::HeaderPastEnd { .. }
        | Error::HeaderNotUtf8 { .. }
        | Error::HeaderNotJson { .. } => HeaderError::new_err(msg),
        Error::TensorLayout { .. } | Error::DataLength { .. } => TensorLayoutError::new_err(msg),
        Error::IndexInvalid { .. }
        | Error::ShardMissing { .. }
        | Error::TensorNotInShard { .. }
        | Error::TensorNotInIndex { .. } => CheckpointIndexError::new_err(msg),
        Error::PathEscapes { .. } => UnsafePathError::new_err(msg),
        Error::NotSafetensors { .. }
        | Error::NoCheckpoint { .. }
        | Error::AmbiguousCheckpoint { .. } => UnsupportedFormatError::new_err(msg),
        Error::TensorNotFound { .. } => TensorNotFoundError::new_err(msg),
        Error::WriterSpec { .. }
        | Error::WriterTensor { .. }
        | Error::WriterIncomplete { .. }
        | Error::WriterClosed { .. } => WriterError::new_err(msg),
    };
    Python::attach(|py| {
        let value = py_err.value(py);
        let _ = value.setattr("path", err.path().to_string_lossy().into_owned());
        let _ = value.setattr("tensor", err.tensor());
        if let Error::Io { source, .. } = &err {
            let _ = value.setattr("errno", source.raw_os_error());
        }
    });
    py_err
}

fn path_str(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Where one tensor's bytes are.
#[pyclass(frozen, module = "pissa_rs._pissa_rs")]
pub struct TensorInfo {
    #[pyo3(get)]
    name: String,
    /// safetensors dtype name: "F32", "BF16", ...
    #[pyo3(get)]
    dtype: String,
    shape: Vec<usize>,
    /// The shard file holding it.
    #[pyo3(get)]
    file: String,
    /// Absolute byte range in `file`.
    #[pyo3(get)]
    start: u64,
    #[pyo3(get)]
    end: u64,
}

impl TensorInfo {
    fn new(ck: &Checkpoint, e: &TensorEntry) -> TensorInfo {
        TensorInfo {
            name: e.name.clone(),
            dtype: e.dtype.to_string(),
            shape: e.shape.clone(),
            file: path_str(&ck.shards[e.shard].path),
            start: e.start,
            end: e.end,
        }
    }
}

#[pymethods]
impl TensorInfo {
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.shape)
    }
    #[getter]
    fn nbytes(&self) -> u64 {
        self.end - self.start
    }
    fn __repr__(&self) -> String {
        format!(
            "TensorInfo(name={:?}, dtype={:?}, shape={:?}, file={:?}, start={}, end={})",
            self.name, self.dtype, self.shape, self.file, self.start, self.end
        )
    }
}

/// A tensor's bytes in the mapped file, exported through the buffer protocol
/// without a copy. Holding it (or any view made from it) keeps the mapping
/// alive. Read-only: the mapping is PROT_READ.
#[pyclass(frozen, module = "pissa_rs._pissa_rs")]
pub struct TensorBuffer {
    shard: Arc<Shard>,
    start: usize,
    len: usize,
    #[pyo3(get)]
    name: String,
    #[pyo3(get)]
    dtype: String,
    shape: Vec<usize>,
}

#[pymethods]
impl TensorBuffer {
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.shape)
    }
    #[getter]
    fn nbytes(&self) -> usize {
        self.len
    }
    fn __len__(&self) -> usize {
        self.len
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        let ptr = this.shard.bytes()[this.start..this.start + this.len].as_ptr();
        // SAFETY: `view` comes from the interpreter; PyBuffer_FillInfo takes a
        // reference to `slf`, which owns an Arc of the mapping, so the memory
        // outlives every consumer. readonly=1 refuses writable requests.
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                ptr as *mut c_void,
                this.len as ffi::Py_ssize_t,
                1,
                flags,
            )
        };
        if rc != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// A checkpoint opened for reading: one file, or a sharded directory.
#[pyclass(frozen, name = "Checkpoint", module = "pissa_rs._pissa_rs")]
pub struct PyCheckpoint {
    inner: Arc<Checkpoint>,
}

#[pymethods]
impl PyCheckpoint {
    #[new]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| Checkpoint::open(&path)).map_err(to_py)?;
        Ok(PyCheckpoint {
            inner: Arc::new(inner),
        })
    }

    /// The directory holding the shards.
    #[getter]
    fn root(&self) -> String {
        path_str(&self.inner.root)
    }
    /// The index json, or None for a single file.
    #[getter]
    fn index_path(&self) -> Option<String> {
        self.inner.index_path.as_deref().map(path_str)
    }
    /// The index's "metadata" object as JSON text, or None.
    #[getter]
    fn index_metadata_json(&self) -> Option<String> {
        self.inner.index_metadata.as_ref().map(|v| v.to_string())
    }
    /// Shard files, in file-name order.
    #[getter]
    fn files(&self) -> Vec<String> {
        self.inner
            .shards
            .iter()
            .map(|s| path_str(&s.path))
            .collect()
    }
    /// Each shard's `__metadata__`, keyed by file path.
    #[getter]
    fn file_metadata(&self) -> HashMap<String, Option<HashMap<String, String>>> {
        self.inner
            .shards
            .iter()
            .map(|s| (path_str(&s.path), s.metadata.clone()))
            .collect()
    }
    /// Every tensor, by shard then by offset.
    #[getter]
    fn tensors(&self) -> Vec<TensorInfo> {
        self.inner
            .tensors
            .iter()
            .map(|e| TensorInfo::new(&self.inner, e))
            .collect()
    }
    fn names(&self) -> Vec<String> {
        self.inner.tensors.iter().map(|e| e.name.clone()).collect()
    }
    fn info(&self, name: &str) -> PyResult<TensorInfo> {
        let e = self.inner.get(name).map_err(to_py)?;
        Ok(TensorInfo::new(&self.inner, e))
    }
    /// Zero-copy view of a tensor's bytes (buffer protocol).
    fn buffer(&self, name: &str) -> PyResult<TensorBuffer> {
        let e = self.inner.get(name).map_err(to_py)?;
        Ok(TensorBuffer {
            shard: self.inner.shards[e.shard].clone(),
            start: e.start as usize,
            len: e.nbytes() as usize,
            name: e.name.clone(),
            dtype: e.dtype.to_string(),
            shape: e.shape.clone(),
        })
    }
    /// Drop a tensor's pages from this process's resident memory (they are
    /// re-read from disk if used again).
    fn release(&self, name: &str) -> PyResult<()> {
        let e = self.inner.get(name).map_err(to_py)?;
        self.inner.shards[e.shard].release(e.start, e.end);
        Ok(())
    }
    /// Read a tensor's bytes into `dest` (a writable C-contiguous buffer of
    /// exactly its size, e.g. a pinned host tensor's numpy view) with the GIL
    /// released; the pages are never mapped here and leave the cache after,
    /// unless `keep_cached` (bytes read again soon; `release_all` drops them).
    #[pyo3(signature = (name, dest, keep_cached=false))]
    fn read_into(
        &self,
        py: Python<'_>,
        name: &str,
        dest: &Bound<'_, PyAny>,
        keep_cached: bool,
    ) -> PyResult<()> {
        let mut borrowed = BorrowedBytes::get_writable(dest)?;
        let slice = borrowed.as_mut_slice();
        py.detach(|| self.inner.read_into(name, slice, keep_cached))
            .map_err(to_py)
    }
    /// Read bytes `[offset, offset + len(dest))` of a tensor into `dest`, like read_into.
    #[pyo3(signature = (name, offset, dest, keep_cached=false))]
    fn read_range_into(
        &self,
        py: Python<'_>,
        name: &str,
        offset: u64,
        dest: &Bound<'_, PyAny>,
        keep_cached: bool,
    ) -> PyResult<()> {
        let mut borrowed = BorrowedBytes::get_writable(dest)?;
        let slice = borrowed.as_mut_slice();
        py.detach(|| self.inner.read_range_into(name, offset, slice, keep_cached))
            .map_err(to_py)
    }
    /// Drop every page of every shard from this process and the page cache:
    /// for when the run is done with the input.
    fn release_all(&self) {
        for shard in &self.inner.shards {
            shard.release_all();
        }
    }
    /// Start reading a tensor's pages in the background (read-ahead).
    fn prefetch(&self, name: &str) -> PyResult<()> {
        let e = self.inner.get(name).map_err(to_py)?;
        self.inner.shards[e.shard].prefetch(e.start, e.end);
        Ok(())
    }
    fn __len__(&self) -> usize {
        self.inner.tensors.len()
    }
    fn __contains__(&self, name: &str) -> bool {
        self.inner.get(name).is_ok()
    }
    fn __repr__(&self) -> String {
        format!(
            "Checkpoint({:?}, {} tensors in {} file(s))",
            path_str(&self.inner.display_path()),
            self.inner.tensors.len(),
            self.inner.shards.len()
        )
    }
}

/// A C-contiguous buffer borrowed from any Python object that exports one
/// (bytes, numpy arrays, memoryview, TensorBuffer). Released on drop, which
/// must happen with the interpreter attached.
struct BorrowedBytes {
    view: Box<ffi::Py_buffer>,
}

impl BorrowedBytes {
    fn get(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        Self::get_with(obj, ffi::PyBUF_C_CONTIGUOUS)
    }

    /// A buffer to write into: the exporter refuses read-only ones.
    fn get_writable(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        Self::get_with(obj, ffi::PyBUF_C_CONTIGUOUS | ffi::PyBUF_WRITABLE)
    }

    fn get_with(obj: &Bound<'_, PyAny>, flags: std::os::raw::c_int) -> PyResult<Self> {
        let mut view: Box<MaybeUninit<ffi::Py_buffer>> = Box::new(MaybeUninit::zeroed());
        // SAFETY: `view` is a valid, writable Py_buffer slot.
        let rc = unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), view.as_mut_ptr(), flags) };
        if rc != 0 {
            return Err(PyErr::fetch(obj.py()));
        }
        // SAFETY: PyObject_GetBuffer succeeded and initialised it.
        let view = unsafe { Box::from_raw(Box::into_raw(view) as *mut ffi::Py_buffer) };
        Ok(BorrowedBytes { view })
    }

    fn as_slice(&self) -> &[u8] {
        if self.view.len == 0 {
            return &[];
        }
        // SAFETY: the exporter guarantees `len` readable bytes at `buf`
        // until the buffer is released, which happens in Drop.
        unsafe { std::slice::from_raw_parts(self.view.buf as *const u8, self.view.len as usize) }
    }

    /// Only for buffers from `get_writable`.
    fn as_mut_slice(&mut self) -> &mut [u8] {
        debug_assert_eq!(self.view.readonly, 0);
        if self.view.len == 0 {
            return &mut [];
        }
        // SAFETY: as above, and the exporter granted write access
        // (PyBUF_WRITABLE); `&mut self` makes this the only slice.
        unsafe { std::slice::from_raw_parts_mut(self.view.buf as *mut u8, self.view.len as usize) }
    }
}

impl Drop for BorrowedBytes {
    fn drop(&mut self) {
        // SAFETY: obtained from PyObject_GetBuffer, released once.
        unsafe { ffi::PyBuffer_Release(&mut *self.view) };
    }
}

/// Writes one safetensors shard whose tensors are all known up front.
/// An append-only record of the tensors written into temporary shard files,
/// one JSON line each ({"file", "tensor", "len", "crc32"}), for resuming.
#[pyclass(frozen, name = "Journal", module = "pissa_rs._pissa_rs")]
pub struct PyJournal {
    inner: Arc<Journal>,
}

#[pymethods]
impl PyJournal {
    #[new]
    fn new(path: PathBuf) -> PyResult<Self> {
        Ok(PyJournal {
            inner: Arc::new(Journal::open(&path).map_err(to_py)?),
        })
    }

    #[getter]
    fn path(&self) -> String {
        path_str(self.inner.path())
    }
}

#[pyclass(frozen, name = "ShardWriter", module = "pissa_rs._pissa_rs")]
pub struct PyShardWriter {
    inner: Arc<ShardWriter>,
}

#[pymethods]
impl PyShardWriter {
    /// `tensors`: (name, dtype, shape) for every tensor the file will hold.
    /// `journal`: record every tensor written (with its CRC-32) there;
    /// `resume`: reopen an interrupted run's temporary file of this exact
    /// layout instead of starting over (tensors in it count once `adopt`ed).
    #[new]
    #[pyo3(signature = (path, tensors, metadata=None, journal=None, resume=false))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        tensors: Vec<(String, String, Vec<usize>)>,
        metadata: Option<HashMap<String, String>>,
        journal: Option<PyRef<'_, PyJournal>>,
        resume: bool,
    ) -> PyResult<Self> {
        let mut specs = Vec::with_capacity(tensors.len());
        for (name, dtype, shape) in tensors {
            let Some(dtype) = parse_dtype(&dtype) else {
                return Err(to_py(Error::WriterSpec {
                    path: path.clone(),
                    tensor: name,
                    reason: format!("unknown dtype '{dtype}'"),
                }));
            };
            specs.push(TensorSpec { name, dtype, shape });
        }
        let journal = journal.map(|j| j.inner.clone());
        let inner = py
            .detach(|| ShardWriter::open(&path, &specs, metadata, journal, resume))
            .map_err(to_py)?;
        Ok(PyShardWriter {
            inner: Arc::new(inner),
        })
    }

    /// The final path (the file appears there only on finalize).
    #[getter]
    fn path(&self) -> String {
        path_str(self.inner.path())
    }
    #[getter]
    fn total_len(&self) -> u64 {
        self.inner.total_len()
    }
    /// (name, start, end) of every tensor, in layout order.
    fn ranges(&self) -> Vec<(String, u64, u64)> {
        self.inner.ranges()
    }
    /// Tensors not yet written.
    fn missing(&self) -> Vec<String> {
        self.inner.missing()
    }

    /// Write a tensor's bytes from any C-contiguous buffer.
    fn write(&self, py: Python<'_>, name: &str, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let bytes = BorrowedBytes::get(data)?;
        let slice = bytes.as_slice();
        py.detach(|| self.inner.write(name, slice)).map_err(to_py)
    }

    /// Copy tensor `source` of `checkpoint` byte for byte into slot `name`
    /// (default: the same name), with no Python in the loop.
    #[pyo3(signature = (checkpoint, source, name=None))]
    fn copy_from(
        &self,
        py: Python<'_>,
        checkpoint: &PyCheckpoint,
        source: &str,
        name: Option<&str>,
    ) -> PyResult<()> {
        let ck = checkpoint.inner.clone();
        let name = name.unwrap_or(source);
        py.detach(|| self.inner.copy_from(&ck, source, name))
            .map_err(to_py)
    }

    /// fsync, rename into place, fsync the directory; returns the path.
    fn finalize(&self, py: Python<'_>) -> PyResult<String> {
        py.detach(|| self.inner.finalize())
            .map(|p| path_str(&p))
            .map_err(to_py)
    }

    /// Remove the temporary file; the final name is never touched.
    fn abort(&self) {
        self.inner.abort()
    }

    /// Stop but keep the temporary file for a later run to resume.
    fn suspend(&self) {
        self.inner.suspend()
    }

    /// Count tensor `name` as written if the temporary file's bytes for it
    /// have checksum `crc32` (from the journal of an interrupted run).
    fn adopt(&self, py: Python<'_>, name: &str, crc32: u32) -> PyResult<bool> {
        py.detach(|| self.inner.adopt(name, crc32)).map_err(to_py)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// On a clean exit, finalize (an error if a tensor is missing); on an
    /// exception, abort.
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<&Bound<'_, PyAny>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        if exc_type.is_some() {
            self.inner.abort();
        } else if self.inner.is_open() {
            self.finalize(py)?;
        }
        Ok(false)
    }
}

/// Background I/O for one decomposition: pass-through copies on one thread,
/// computed results written from a bounded queue on another.
#[pyclass(frozen, name = "Pipeline", module = "pissa_rs._pissa_rs")]
pub struct PyPipeline {
    checkpoint: Arc<Checkpoint>,
    inner: Pipeline,
}

#[pymethods]
impl PyPipeline {
    /// `copies`: (source tensor, writer, name in that writer) for every
    /// pass-through tensor; they start copying at once.
    #[new]
    #[pyo3(signature = (checkpoint, copies, queue_depth=2))]
    fn new(
        checkpoint: &PyCheckpoint,
        copies: Vec<(String, PyRef<'_, PyShardWriter>, String)>,
        queue_depth: usize,
    ) -> Self {
        let jobs = copies
            .into_iter()
            .map(|(source, writer, name)| CopyJob {
                checkpoint: checkpoint.inner.clone(),
                source,
                writer: writer.inner.clone(),
                name,
            })
            .collect();
        PyPipeline {
            checkpoint: checkpoint.inner.clone(),
            inner: Pipeline::start(jobs, queue_depth),
        }
    }

    /// Queue `data` (any C-contiguous buffer, copied now) for writing as
    /// `name`; then drop the pages of input tensor `release`. Blocks, with
    /// the GIL released, while the queue is full.
    #[pyo3(signature = (writer, name, data, release=None))]
    fn submit(
        &self,
        py: Python<'_>,
        writer: &PyShardWriter,
        name: String,
        data: &Bound<'_, PyAny>,
        release: Option<String>,
    ) -> PyResult<()> {
        let borrowed = BorrowedBytes::get(data)?;
        let slice = borrowed.as_slice();
        let job_writer = writer.inner.clone();
        let release = release.map(|r| (self.checkpoint.clone(), r));
        py.detach(|| {
            self.inner.submit(WriteJob {
                writer: job_writer,
                name,
                bytes: slice.to_vec(),
                release,
            })
        })
        .map_err(to_py)
    }

    /// Wait for every write and copy; raises the first error.
    fn finish(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.finish()).map_err(to_py)
    }

    /// No more submits; `done` turns true once everything queued is written.
    fn close(&self) {
        self.inner.close()
    }

    #[getter]
    fn done(&self) -> bool {
        self.inner.is_done()
    }

    /// Stop pass-through copies early.
    fn cancel(&self) {
        self.inner.cancel()
    }

    #[getter]
    fn bytes_written(&self) -> u64 {
        self.inner.bytes_written()
    }

    #[getter]
    fn tensors_written(&self) -> u64 {
        self.inner.tensors_written()
    }
}

/// (bytes of the file at `path` now in the page cache, its size).
#[pyfunction]
fn cached_bytes(py: Python<'_>, path: PathBuf) -> PyResult<(u64, u64)> {
    py.detach(|| crate::pagecache::cached_bytes(&path))
        .map_err(to_py)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_function(wrap_pyfunction!(cached_bytes, m)?)?;
    m.add("PissaError", py.get_type::<PissaError>())?;
    m.add("PissaIOError", py.get_type::<PissaIOError>())?;
    m.add("CheckpointError", py.get_type::<CheckpointError>())?;
    m.add("HeaderError", py.get_type::<HeaderError>())?;
    m.add("TensorLayoutError", py.get_type::<TensorLayoutError>())?;
    m.add(
        "CheckpointIndexError",
        py.get_type::<CheckpointIndexError>(),
    )?;
    m.add("UnsafePathError", py.get_type::<UnsafePathError>())?;
    m.add(
        "UnsupportedFormatError",
        py.get_type::<UnsupportedFormatError>(),
    )?;
    m.add("TensorNotFoundError", py.get_type::<TensorNotFoundError>())?;
    m.add("WriterError", py.get_type::<WriterError>())?;
    m.add_class::<PyCheckpoint>()?;
    m.add_class::<TensorInfo>()?;
    m.add_class::<TensorBuffer>()?;
    m.add_class::<PyShardWriter>()?;
    m.add_class::<PyJournal>()?;
    m.add_class::<PyPipeline>()?;
    Ok(())
}
