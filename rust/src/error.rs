//! One error enum for the whole crate. Every variant names the file and, where
//! one is involved, the tensor; `bindings.rs` maps each variant to one Python
//! exception class, in one place.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused an operation on `path` (open, read, write,
    /// fsync, rename; ENOSPC and EFBIG land here).
    #[error("{path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// The file is shorter than the 8-byte header-length prefix.
    #[error("{path}: file is truncated: {len} bytes, a safetensors file needs at least 8")]
    TooShort { path: PathBuf, len: u64 },

    /// The header-length prefix is larger than the safetensors limit (100 MB).
    #[error("{path}: header length {header_len} bytes is over the 100 MB limit: not a safetensors file, or a hostile one")]
    HeaderTooLarge { path: PathBuf, header_len: u64 },

    /// The header-length prefix points past the end of the file.
    #[error("{path}: header length {header_len} bytes runs past the end of the file ({file_len} bytes): the file is truncated or not safetensors")]
    HeaderPastEnd {
        path: PathBuf,
        header_len: u64,
        file_len: u64,
    },

    /// The header bytes are not UTF-8.
    #[error("{path}: header is not valid UTF-8 ({reason})")]
    HeaderNotUtf8 { path: PathBuf, reason: String },

    /// The header is UTF-8 but not the JSON a safetensors header must be.
    #[error("{path}: header is not valid safetensors JSON: {reason}")]
    HeaderNotJson { path: PathBuf, reason: String },

    /// A tensor's entry is inconsistent: offsets out of range, overlapping or
    /// leaving holes, or a byte length that is not dtype x shape.
    #[error("{path}: tensor '{tensor}': {reason}")]
    TensorLayout {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    /// The data section is shorter (truncated file) or longer (trailing bytes)
    /// than the header describes.
    #[error("{path}: {reason}")]
    DataLength { path: PathBuf, reason: String },

    /// The index json is unreadable or malformed.
    #[error("{path}: invalid checkpoint index: {reason}")]
    IndexInvalid { path: PathBuf, reason: String },

    /// The index names a shard that does not exist.
    #[error("{index}: shard '{shard}' (holding tensor '{tensor}') does not exist")]
    ShardMissing {
        index: PathBuf,
        shard: String,
        tensor: String,
    },

    /// The index says a tensor lives in a shard that does not hold it.
    #[error("{shard}: tensor '{tensor}' is listed in {index} but absent from this shard")]
    TensorNotInShard {
        index: PathBuf,
        shard: PathBuf,
        tensor: String,
    },

    /// A shard holds a tensor the index does not assign to it.
    #[error("{shard}: tensor '{tensor}' is not assigned to this shard by {index}")]
    TensorNotInIndex {
        index: PathBuf,
        shard: PathBuf,
        tensor: String,
    },

    /// An index entry names a path outside the checkpoint directory (`..`, an
    /// absolute path, an empty name). A file inside it that is a symlink is followed.
    #[error("{index}: shard path '{shard}' for tensor '{tensor}' escapes the checkpoint directory {root}")]
    PathEscapes {
        index: PathBuf,
        root: PathBuf,
        shard: String,
        tensor: String,
    },

    /// The path holds weights in a format other than safetensors.
    #[error("{path}: {found} holds PyTorch pickle weights, not safetensors; convert them first, e.g. `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir, safe_serialization=True)`")]
    NotSafetensors { path: PathBuf, found: String },

    /// The path holds no checkpoint at all.
    #[error("{path}: no checkpoint found (expected model.safetensors.index.json, model.safetensors or one *.safetensors file)")]
    NoCheckpoint { path: PathBuf },

    /// A directory holds several .safetensors files and no index to say which
    /// form the model.
    #[error("{path}: {count} .safetensors files and no *.safetensors.index.json: pass one file, or add the index")]
    AmbiguousCheckpoint { path: PathBuf, count: usize },

    /// A lookup by name found nothing.
    #[error("{path}: no tensor named '{tensor}'")]
    TensorNotFound { path: PathBuf, tensor: String },

    /// A writer was given a tensor spec it cannot lay out (unknown dtype,
    /// size overflow, duplicate name, header over the limit).
    #[error("{path}: tensor '{tensor}': {reason}")]
    WriterSpec {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    /// Writing a tensor the writer was not told about, twice, or with the
    /// wrong number of bytes.
    #[error("{path}: tensor '{tensor}': {reason}")]
    WriterTensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    /// Finalizing before every tensor was written.
    #[error("{path}: cannot finalize, {count} tensor(s) never written, first '{tensor}'")]
    WriterIncomplete {
        path: PathBuf,
        tensor: String,
        count: usize,
    },

    /// Using a writer after finalize or abort.
    #[error("{path}: writer is already {state}")]
    WriterClosed { path: PathBuf, state: &'static str },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }

    /// The file the error is about.
    pub fn path(&self) -> &std::path::Path {
        use Error::*;
        match self {
            Io { path, .. }
            | TooShort { path, .. }
            | HeaderTooLarge { path, .. }
            | HeaderPastEnd { path, .. }
            | HeaderNotUtf8 { path, .. }
            | HeaderNotJson { path, .. }
            | TensorLayout { path, .. }
            | DataLength { path, .. }
            | IndexInvalid { path, .. }
            | NotSafetensors { path, .. }
            | NoCheckpoint { path }
            | AmbiguousCheckpoint { path, .. }
            | TensorNotFound { path, .. }
            | WriterSpec { path, .. }
            | WriterTensor { path, .. }
            | WriterIncomplete { path, .. }
            | WriterClosed { path, .. } => path,
            ShardMissing { index, .. } | PathEscapes { index, .. } => index,
            TensorNotInShard { shard, .. } | TensorNotInIndex { shard, .. } => shard,
        }
    }

    /// The tensor the error is about, where there is one.
    pub fn tensor(&self) -> Option<&str> {
        use Error::*;
        match self {
            TensorLayout { tensor, .. }
            | ShardMissing { tensor, .. }
            | TensorNotInShard { tensor, .. }
            | TensorNotInIndex { tensor, .. }
            | PathEscapes { tensor, .. }
            | TensorNotFound { tensor, .. }
            | WriterSpec { tensor, .. }
            | WriterTensor { tensor, .. }
            | WriterIncomplete { tensor, .. } => Some(tensor),
            _ => None,
        }
    }
}
