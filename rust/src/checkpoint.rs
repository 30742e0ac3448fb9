//! Open a safetensors checkpoint (one file, a directory with one file, or a
//! sharded directory with an index), memory-map its shards and list every
//! tensor with its absolute byte range. Headers are parsed and validated by
//! the `safetensors` crate; this module only adds names to its errors.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, MmapOptions};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::pagecache;

/// The safetensors crate's limit on header size.
pub const MAX_HEADER_LEN: u64 = 100_000_000;
/// Index files larger than this are refused before being read into memory.
const MAX_INDEX_LEN: u64 = 256 << 20;
pub const INDEX_NAME: &str = "model.safetensors.index.json";
pub const SINGLE_NAME: &str = "model.safetensors";

/// One memory-mapped shard.
///
/// The mapping is read-only (PROT_READ): the input can never be modified
/// through it, and, unlike a writable private mapping, it does not count
/// against a strict overcommit limit, so a 140 GB model maps anywhere.
pub struct Shard {
    pub path: PathBuf,
    /// Name relative to the checkpoint root, as an index would spell it.
    pub file_name: String,
    pub len: u64,
    /// Byte offset of the data section (8 + header length).
    pub data_start: u64,
    pub metadata: Option<HashMap<String, String>>,
    map: Mmap,
    file: File,
}

impl Shard {
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Done with `[start, end)`: drop its pages from this process's resident
    /// set and from the page cache; they are re-read from the file if needed.
    pub fn release(&self, start: u64, end: u64) {
        if let Some((s, e)) = pagecache::whole_pages(start, end) {
            // SAFETY: the range lies inside the mapping; for a read-only
            // file mapping DONTNEED only drops clean pages, re-read on demand.
            unsafe {
                let _ = self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    s as usize,
                    (e - s) as usize,
                );
            }
            // Unmapped first: the cache does not drop pages still mapped.
            pagecache::drop_cached(&self.file, s, e);
        }
    }

    /// Read `[start, start + dst.len())` into `dst` (pread: no page faults
    /// here), then release the range unless `keep_cached` (a neighbour's
    /// access may have mapped some of its pages by fault-around; mapped pages
    /// stay cached).
    pub fn read_into(&self, start: u64, dst: &mut [u8], keep_cached: bool) -> Result<()> {
        self.read_cached(start, dst)?;
        if !keep_cached {
            self.release(start, start + dst.len() as u64);
        }
        Ok(())
    }

    /// Read `[start, start + dst.len())` into `dst` (pread), leaving its
    /// pages in the page cache: for bytes read again soon (EVA's loop reads
    /// every layer at every step); `release_all` drops them at the end.
    pub fn read_cached(&self, start: u64, dst: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(dst, start)
            .map_err(|e| Error::io(&self.path, "read", e))
    }

    /// Release the whole file, header and partial pages at tensor boundaries
    /// included: for when no tensor of it will be read again.
    pub fn release_all(&self) {
        // SAFETY: as in `release`, over the whole read-only mapping.
        unsafe {
            let _ = self
                .map
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed);
        }
        pagecache::drop_all_cached(&self.file);
    }
}

impl Shard {
    /// Ask the kernel to start reading `[start, end)` now (asynchronous
    /// read-ahead), so the bytes are in memory when torch needs them.
    pub fn prefetch(&self, start: u64, end: u64) {
        let page = 4096u64;
        let s = start / page * page;
        let e = end.min(self.len);
        if e > s {
            let _ = self
                .map
                .advise_range(memmap2::Advice::WillNeed, s as usize, (e - s) as usize);
        }
    }
}

/// One tensor of a checkpoint: where its bytes are.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Index into `Checkpoint::shards`.
    pub shard: usize,
    /// Absolute byte range in the shard file.
    pub start: u64,
    pub end: u64,
}

impl TensorEntry {
    pub fn nbytes(&self) -> u64 {
        self.end - self.start
    }
}

pub struct Checkpoint {
    /// The directory holding the shards (the file's parent for a single file).
    pub root: PathBuf,
    /// The index json, for sharded checkpoints.
    pub index_path: Option<PathBuf>,
    /// The index's own "metadata" object, kept verbatim.
    pub index_metadata: Option<serde_json::Value>,
    pub shards: Vec<Arc<Shard>>,
    /// Every tensor, by shard (in file-name order) then by offset.
    pub tensors: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
}

impl Checkpoint {
    /// Open `path`: a `.safetensors` file, a `*.safetensors.index.json` file,
    /// or a directory holding either.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, "open", e))?;
        if meta.is_dir() {
            return Self::open_dir(path);
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".index.json") {
            return Self::open_index(path);
        }
        if name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth") {
            return Err(Error::NotSafetensors {
                path: path.to_path_buf(),
                found: name.to_string(),
            });
        }
        let root = parent_dir(path);
        let shard = open_shard(path, name.to_string())?;
        Self::from_shards(root, None, None, vec![shard])
    }

    fn open_dir(dir: &Path) -> Result<Checkpoint> {
        let index = dir.join(INDEX_NAME);
        if index.is_file() {
            return Self::open_index(&index);
        }
        let single = dir.join(SINGLE_NAME);
        if single.is_file() {
            let shard = open_shard(&single, SINGLE_NAME.to_string())?;
            return Self::from_shards(dir.to_path_buf(), None, None, vec![shard]);
        }
        let mut safetensors = Vec::new();
        let mut indexes = Vec::new();
        let mut pickles = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "list", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(dir, "list", e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".safetensors.index.json") {
                indexes.push(name);
            } else if name.ends_with(".safetensors") {
                safetensors.push(name);
            } else if name.ends_with(".bin") || name.ends_with(".bin.index.json") {
                pickles.push(name);
            }
        }
        if indexes.len() == 1 {
            return Self::open_index(&dir.join(&indexes[0]));
        }
        match safetensors.len() {
            1 => {
                let shard = open_shard(&dir.join(&safetensors[0]), safetensors[0].clone())?;
                Self::from_shards(dir.to_path_buf(), None, None, vec![shard])
            }
            0 if !pickles.is_empty() => {
                pickles.sort();
                Err(Error::NotSafetensors {
                    path: dir.to_path_buf(),
                    found: pickles[0].clone(),
                })
            }
            0 => Err(Error::NoCheckpoint {
                path: dir.to_path_buf(),
            }),
            count => Err(Error::AmbiguousCheckpoint {
                path: dir.to_path_buf(),
                count,
            }),
        }
    }

    fn open_index(index: &Path) -> Result<Checkpoint> {
        #[derive(Deserialize)]
        struct IndexFile {
            #[serde(default)]
            metadata: Option<serde_json::Value>,
            weight_map: BTreeMap<String, String>,
        }
        let invalid = |reason: String| Error::IndexInvalid {
            path: index.to_path_buf(),
            reason,
        };
        let file = File::open(index).map_err(|e| Error::io(index, "open", e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(index, "stat", e))?
            .len();
        if len > MAX_INDEX_LEN {
            return Err(invalid(format!(
                "{len} bytes is over the {MAX_INDEX_LEN}-byte limit for an index"
            )));
        }
        let text = std::fs::read(index).map_err(|e| Error::io(index, "read", e))?;
        let text = String::from_utf8(text).map_err(|e| invalid(format!("not UTF-8: {e}")))?;
        let parsed: IndexFile = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;

        let root = parent_dir(index);

        // Group tensor names by shard, checking each shard path on the way.
        let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (tensor, shard) in &parsed.weight_map {
            by_shard
                .entry(shard.clone())
                .or_default()
                .push(tensor.clone());
        }
        if by_shard.is_empty() {
            return Err(invalid("weight_map is empty".to_string()));
        }
        let mut shards = Vec::with_capacity(by_shard.len());
        for (shard_name, tensors) in &by_shard {
            let first = &tensors[0];
            let escapes = || Error::PathEscapes {
                index: index.to_path_buf(),
                root: root.clone(),
                shard: shard_name.clone(),
                tensor: first.clone(),
            };
            let rel = Path::new(shard_name);
            if shard_name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_)))
            {
                return Err(escapes());
            }
            // The name is what could be hostile, and it stays inside the directory. A file
            // there that is a symlink is followed wherever it points: the Hugging Face cache
            // keeps every snapshot file as a link to ../../blobs/<hash>.
            let path = root.join(rel);
            match path.try_exists() {
                Ok(true) => {}
                Ok(false) => {
                    return Err(Error::ShardMissing {
                        index: index.to_path_buf(),
                        shard: shard_name.clone(),
                        tensor: first.clone(),
                    })
                }
                Err(e) => return Err(Error::io(&path, "resolve", e)),
            }
            let shard = open_shard(&path, shard_name.clone())?;
            shards.push((shard, tensors));
        }

        // The index and the shard headers must agree exactly.
        for (shard, tensors) in &shards {
            for name in tensors.iter() {
                if shard.1.info(name).is_none() {
                    return Err(Error::TensorNotInShard {
                        index: index.to_path_buf(),
                        shard: shard.0.path.clone(),
                        tensor: name.clone(),
                    });
                }
            }
            for name in shard.1.offset_keys() {
                if parsed.weight_map.get(&name) != Some(&shard.0.file_name) {
                    return Err(Error::TensorNotInIndex {
                        index: index.to_path_buf(),
                        shard: shard.0.path.clone(),
                        tensor: name,
                    });
                }
            }
        }
        Self::from_shards(
            root,
            Some(index.to_path_buf()),
            parsed.metadata,
            shards.into_iter().map(|(s, _)| s).collect(),
        )
    }

    fn from_shards(
        root: PathBuf,
        index_path: Option<PathBuf>,
        index_metadata: Option<serde_json::Value>,
        opened: Vec<(Shard, Metadata)>,
    ) -> Result<Checkpoint> {
        let mut shards = Vec::with_capacity(opened.len());
        let mut tensors = Vec::new();
        let mut by_name = HashMap::new();
        for (i, (shard, metadata)) in opened.into_iter().enumerate() {
            for name in metadata.offset_keys() {
                let info = metadata.info(&name).expect("name from offset_keys");
                let entry = TensorEntry {
                    name: name.clone(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    shard: i,
                    start: shard.data_start + info.data_offsets.0 as u64,
                    end: shard.data_start + info.data_offsets.1 as u64,
                };
                by_name.insert(name, tensors.len());
                tensors.push(entry);
            }
            shards.push(Arc::new(shard));
        }
        Ok(Checkpoint {
            root,
            index_path,
            index_metadata,
            shards,
            tensors,
            by_name,
        })
    }

    pub fn get(&self, name: &str) -> Result<&TensorEntry> {
        self.by_name
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| Error::TensorNotFound {
                path: self.display_path(),
                tensor: name.to_string(),
            })
    }

    /// Read tensor `name` into `dst` (exactly its size) without mapping it,
    /// and drop its pages from the cache (unless `keep_cached`): the staging
    /// path of the GPU pipeline.
    pub fn read_into(&self, name: &str, dst: &mut [u8], keep_cached: bool) -> Result<()> {
        let entry = self.get(name)?;
        if dst.len() as u64 != entry.nbytes() {
            return Err(Error::io(
                &self.shards[entry.shard].path,
                "read",
                std::io::Error::other(format!(
                    "tensor '{name}' is {} bytes, the buffer {}",
                    entry.nbytes(),
                    dst.len()
                )),
            ));
        }
        self.shards[entry.shard].read_into(entry.start, dst, keep_cached)
    }

    /// Read bytes `[offset, offset + dst.len())` of tensor `name` into `dst`:
    /// one expert's matrix out of a tensor that stacks all of a layer's experts.
    /// The pages leave the cache after, unless `keep_cached`, as in `read_into`.
    pub fn read_range_into(
        &self,
        name: &str,
        offset: u64,
        dst: &mut [u8],
        keep_cached: bool,
    ) -> Result<()> {
        let entry = self.get(name)?;
        if offset + dst.len() as u64 > entry.nbytes() {
            return Err(Error::io(
                &self.shards[entry.shard].path,
                "read",
                std::io::Error::other(format!(
                    "tensor '{name}' is {} bytes; bytes {offset}..{} are not in it",
                    entry.nbytes(),
                    offset + dst.len() as u64
                )),
            ));
        }
        self.shards[entry.shard].read_into(entry.start + offset, dst, keep_cached)
    }

    /// The bytes of one tensor, straight from the mapping.
    pub fn bytes(&self, entry: &TensorEntry) -> &[u8] {
        &self.shards[entry.shard].bytes()[entry.start as usize..entry.end as usize]
    }

    /// The path to name in messages about the checkpoint as a whole.
    pub fn display_path(&self) -> PathBuf {
        match (&self.index_path, self.shards.as_slice()) {
            (Some(index), _) => index.clone(),
            (None, [one]) => one.path.clone(),
            _ => self.root.clone(),
        }
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Map one file and validate its header with the safetensors crate.
fn open_shard(path: &Path, file_name: String) -> Result<(Shard, Metadata)> {
    let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(path, "stat", e))?
        .len();
    if len < 8 {
        // Also avoids mapping an empty file, which mmap refuses.
        return Err(Error::TooShort {
            path: path.to_path_buf(),
            len,
        });
    }
    // SAFETY: a read-only mapping; see `Shard`. A file truncated by another
    // process while mapped can still fault on access; that is the one hazard
    // mmap-based readers share and is documented in the README.
    let map = unsafe { MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, "mmap", e))?;
    let (header_len, metadata) = parse_header(path, &map)?;
    let metadata_map = metadata.metadata().clone();
    Ok((
        Shard {
            path: path.to_path_buf(),
            file_name,
            len,
            data_start: 8 + header_len as u64,
            metadata: metadata_map,
            map,
            file,
        },
        metadata,
    ))
}

/// Validate a whole file's bytes with the safetensors crate, turning its
/// errors into ours with the file and, where it can be found, the tensor.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<(usize, Metadata)> {
    let file_len = bytes.len() as u64;
    let header_len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or(0);
    let path_buf = path.to_path_buf();
    SafeTensors::read_metadata(bytes).map_err(|err| match err {
        SafeTensorError::HeaderTooSmall => Error::TooShort {
            path: path_buf,
            len: file_len,
        },
        SafeTensorError::HeaderTooLarge => Error::HeaderTooLarge {
            path: path_buf,
            header_len,
        },
        SafeTensorError::InvalidHeaderLength => Error::HeaderPastEnd {
            path: path_buf,
            header_len,
            file_len,
        },
        SafeTensorError::InvalidHeader(e) => Error::HeaderNotUtf8 {
            path: path_buf,
            reason: e.to_string(),
        },
        SafeTensorError::InvalidHeaderDeserialization(e) | SafeTensorError::JsonError(e) => {
            Error::HeaderNotJson {
                path: path_buf,
                reason: e.to_string(),
            }
        }
        other => diagnose_layout(path, bytes, header_len as usize, other),
    })
}

/// The safetensors crate rejected a well-formed header's layout, sometimes
/// without naming the tensor. Walk the entries in offset order to find the
/// first one at fault and say what is wrong with it.
fn diagnose_layout(path: &Path, bytes: &[u8], header_len: usize, err: SafeTensorError) -> Error {
    #[derive(Deserialize)]
    struct RawHeader {
        #[serde(rename = "__metadata__")]
        #[allow(dead_code)]
        metadata: Option<HashMap<String, String>>,
        #[serde(flatten)]
        tensors: HashMap<String, TensorInfo>,
    }
    let fallback = |reason: String| Error::DataLength {
        path: path.to_path_buf(),
        reason,
    };
    let header = &bytes[8..8 + header_len];
    let Ok(raw) = serde_json::from_slice::<RawHeader>(header) else {
        return fallback(err.to_string());
    };
    let data_len = (bytes.len() - 8 - header_len) as u128;
    let mut entries: Vec<(String, TensorInfo)> = raw.tensors.into_iter().collect();
    entries.sort_by(|a, b| a.1.data_offsets.cmp(&b.1.data_offsets).then(a.0.cmp(&b.0)));
    let layout = |tensor: &str, reason: String| Error::TensorLayout {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        reason,
    };
    let mut expected_start = 0u128;
    for (name, info) in &entries {
        let (s, e) = (info.data_offsets.0 as u128, info.data_offsets.1 as u128);
        if e < s {
            return layout(
                name,
                format!("data_offsets [{s}, {e}] end before they start"),
            );
        }
        if s > expected_start {
            return layout(
                name,
                format!("data_offsets start at {s}, leaving a hole after byte {expected_start}"),
            );
        }
        if s < expected_start {
            return layout(
                name,
                format!("data_offsets [{s}, {e}] overlap the previous tensor, which ends at {expected_start}"),
            );
        }
        let bits = info
            .shape
            .iter()
            .try_fold(1u128, |acc, &d| acc.checked_mul(d as u128))
            .and_then(|n| n.checked_mul(info.dtype.bitsize() as u128));
        match bits {
            None => return layout(name, format!("shape {:?} overflows", info.shape)),
            Some(bits) if bits % 8 != 0 => {
                return layout(
                    name,
                    format!(
                        "{} x {:?} is not a whole number of bytes",
                        info.dtype, info.shape
                    ),
                )
            }
            Some(bits) if bits / 8 != e - s => {
                return layout(
                    name,
                    format!(
                        "{} x {:?} needs {} bytes but data_offsets [{s}, {e}] hold {}",
                        info.dtype,
                        info.shape,
                        bits / 8,
                        e - s
                    ),
                )
            }
            Some(_) => {}
        }
        if e > data_len {
            return layout(
                name,
                format!(
                    "data_offsets [{s}, {e}] run past the end of the data section ({data_len} bytes): the file is truncated"
                ),
            );
        }
        expected_start = e;
    }
    if expected_start != data_len {
        return fallback(format!(
            "{} trailing bytes after the last tensor (data section {data_len} bytes, tensors end at {expected_start})",
            data_len - expected_start
        ));
    }
    fallback(err.to_string())
}

/// Parse a dtype name as safetensors spells it ("F32", "BF16", ...).
pub fn parse_dtype(name: &str) -> Option<Dtype> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn with_header(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    /// One expert's slice of a stacked tensor: the bytes asked for, and a range past
    /// the tensor's end is an error naming it (not bytes of the next tensor).
    #[test]
    fn read_range_into_reads_a_slice_and_refuses_past_the_end() {
        let header = r#"{"a":{"dtype":"U8","shape":[2,3],"data_offsets":[0,6]},"b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[10, 11, 12, 13, 14, 15, 16, 17]);
        let f = file_with(&bytes);
        let ck = Checkpoint::open(f.path()).unwrap();
        let mut dst = [0u8; 3];
        ck.read_range_into("a", 3, &mut dst, false).unwrap();
        assert_eq!(dst, [13, 14, 15]);
        let err = ck
            .read_range_into("a", 4, &mut dst, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("'a'") && err.contains("4..7"), "{err}");
    }

    fn open_err(bytes: &[u8]) -> Error {
        let f = file_with(bytes);
        match Checkpoint::open(f.path()) {
            Err(e) => e,
            Ok(_) => panic!("expected an error"),
        }
    }

    /// A bounded mutation fuzzer (cargo fuzz needs a nightly toolchain, which CI
    /// does not have): a valid file and index, each mutated thousands of ways
    /// with a seeded xorshift (bytes flipped, inserted, truncated, numbers and
    /// names swapped for hostile ones); opening must return Ok or Err, never
    /// panic, and an Ok checkpoint's every range must lie inside its file.
    #[test]
    fn mutated_headers_and_indexes_never_panic() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let header = r#"{"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"x.y":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}"#;
        let valid = with_header(header, 16);
        let hostile: [&[u8]; 10] = [
            b"18446744073709551615",
            b"-1",
            b"1e309",
            b"\"../../etc/passwd\"",
            b"\"\\u0000\"",
            b"[]",
            b"{}",
            b"null",
            "\"\u{00e9}\u{4e2d}\"".as_bytes(),
            b"4294967296",
        ];
        let dir = tempfile::tempdir().unwrap();
        for i in 0..3000 {
            let mut bytes = valid.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % bytes.len();
                match next() % 5 {
                    0 => bytes[at] ^= 1 << (next() % 8),
                    1 => bytes.insert(at, next() as u8),
                    2 => bytes.truncate(at.max(1)),
                    3 => {
                        let h = hostile[(next() as usize) % hostile.len()];
                        let end = (at + 1 + (next() as usize) % 8).min(bytes.len());
                        bytes.splice(at..end, h.iter().copied());
                    }
                    _ => bytes[at] = next() as u8,
                }
            }
            let path = dir.path().join(format!("f{i}.safetensors"));
            std::fs::write(&path, &bytes).unwrap();
            let opened = std::panic::catch_unwind(|| Checkpoint::open(&path));
            let opened = opened.unwrap_or_else(|_| panic!("panic on mutation {i}: {bytes:?}"));
            if let Ok(ck) = opened {
                for entry in &ck.tensors {
                    assert!(entry.end <= bytes.len() as u64 && entry.start <= entry.end);
                }
            }
        }
        // Indexes: mutated weight maps naming shards inside and outside the directory.
        std::fs::write(dir.path().join("model.safetensors"), &valid).unwrap();
        let index = r#"{"metadata":{"total_size":16},"weight_map":{"w":"model.safetensors","x.y":"model.safetensors"}}"#;
        for i in 0..2000 {
            let mut text = index.as_bytes().to_vec();
            let at = 40 + (next() as usize) % (text.len() - 40);
            match next() % 3 {
                0 => text[at] ^= 1 << (next() % 8),
                1 => {
                    let h = hostile[(next() as usize) % hostile.len()];
                    let end = (at + 1 + (next() as usize) % 8).min(text.len());
                    text.splice(at..end, h.iter().copied());
                }
                _ => text.truncate(at),
            }
            let path = dir.path().join("model.safetensors.index.json");
            std::fs::write(&path, &text).unwrap();
            let opened = std::panic::catch_unwind(|| Checkpoint::open(&path));
            let opened = opened.unwrap_or_else(|_| panic!("panic on index mutation {i}"));
            if let Ok(ck) = opened {
                for shard in &ck.shards {
                    assert!(
                        shard.path.starts_with(dir.path()),
                        "{:?} escapes",
                        shard.path
                    );
                }
            }
        }
    }

    #[test]
    fn valid_file_lists_absolute_ranges() {
        let header = r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}}"#;
        let f = file_with(&with_header(header, 11));
        let ck = Checkpoint::open(f.path()).unwrap();
        let start = 8 + header.len() as u64;
        let names: Vec<_> = ck.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(
            (ck.get("b").unwrap().start, ck.get("b").unwrap().end),
            (start, start + 8)
        );
        assert_eq!(ck.get("a").unwrap().start, start + 8);
        assert!(matches!(ck.get("zz"), Err(Error::TensorNotFound { .. })));
    }

    #[test]
    fn too_short() {
        assert!(matches!(open_err(b"abc"), Error::TooShort { len: 3, .. }));
        assert!(matches!(open_err(b""), Error::TooShort { len: 0, .. }));
    }

    #[test]
    fn header_too_large() {
        let mut v = u64::MAX.to_le_bytes().to_vec();
        v.extend_from_slice(b"{}");
        assert!(matches!(open_err(&v), Error::HeaderTooLarge { .. }));
    }

    #[test]
    fn header_past_end() {
        let mut v = 1000u64.to_le_bytes().to_vec();
        v.extend_from_slice(b"{}      ");
        assert!(matches!(
            open_err(&v),
            Error::HeaderPastEnd {
                header_len: 1000,
                file_len: 16,
                ..
            }
        ));
    }

    #[test]
    fn header_not_utf8() {
        let mut v = 4u64.to_le_bytes().to_vec();
        v.extend_from_slice(&[0xff, 0xfe, 0x7b, 0x7d]);
        assert!(matches!(open_err(&v), Error::HeaderNotUtf8 { .. }));
    }

    #[test]
    fn header_not_json() {
        assert!(matches!(
            open_err(&with_header("{not json", 0)),
            Error::HeaderNotJson { .. }
        ));
    }

    fn layout_tensor(err: Error) -> (String, String) {
        match err {
            Error::TensorLayout { tensor, reason, .. } => (tensor, reason),
            other => panic!("expected TensorLayout, got {other:?}"),
        }
    }

    #[test]
    fn hole_overlap_size_and_range_name_the_tensor() {
        let hole = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#;
        let (t, r) = layout_tensor(open_err(&with_header(hole, 6)));
        assert_eq!(t, "b");
        assert!(r.contains("hole"), "{r}");

        let overlap = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#;
        let (t, r) = layout_tensor(open_err(&with_header(overlap, 4)));
        assert_eq!(t, "b");
        assert!(r.contains("overlap"), "{r}");

        let size = r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        let (t, r) = layout_tensor(open_err(&with_header(size, 8)));
        assert_eq!(t, "w");
        assert!(r.contains("needs 12 bytes"), "{r}");

        let past = r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let (t, r) = layout_tensor(open_err(&with_header(past, 9)));
        assert_eq!(t, "w");
        assert!(r.contains("truncated"), "{r}");
    }

    #[test]
    fn trailing_bytes() {
        let h = r#"{"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
        assert!(matches!(
            open_err(&with_header(h, 5)),
            Error::DataLength { .. }
        ));
    }

    #[test]
    fn dir_without_safetensors() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            Checkpoint::open(d.path()),
            Err(Error::NoCheckpoint { .. })
        ));
        std::fs::write(d.path().join("pytorch_model.bin"), b"x").unwrap();
        assert!(matches!(
            Checkpoint::open(d.path()),
            Err(Error::NotSafetensors { .. })
        ));
    }

    fn write_shard(dir: &Path, name: &str, tensor: &str) {
        let h = format!(r#"{{"{tensor}":{{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}}}"#);
        std::fs::write(dir.join(name), with_header(&h, 1)).unwrap();
    }

    fn write_index(dir: &Path, map: &[(&str, &str)]) {
        let entries: Vec<String> = map
            .iter()
            .map(|(t, f)| format!("\"{t}\": \"{f}\""))
            .collect();
        let text = format!(
            "{{\"metadata\": {{}}, \"weight_map\": {{{}}}}}",
            entries.join(",")
        );
        std::fs::write(dir.join(INDEX_NAME), text).unwrap();
    }

    #[test]
    fn index_errors() {
        let d = tempfile::tempdir().unwrap();
        write_shard(d.path(), "a.safetensors", "x");
        write_shard(d.path(), "b.safetensors", "y");

        write_index(d.path(), &[("x", "a.safetensors"), ("y", "b.safetensors")]);
        let ck = Checkpoint::open(d.path()).unwrap();
        assert_eq!(ck.tensors.len(), 2);

        write_index(
            d.path(),
            &[("x", "a.safetensors"), ("y", "missing.safetensors")],
        );
        assert!(
            matches!(Checkpoint::open(d.path()), Err(Error::ShardMissing { tensor, .. }) if tensor == "y")
        );

        write_index(
            d.path(),
            &[("x", "a.safetensors"), ("y", "../b.safetensors")],
        );
        assert!(
            matches!(Checkpoint::open(d.path()), Err(Error::PathEscapes { tensor, .. }) if tensor == "y")
        );

        write_index(d.path(), &[("x", "a.safetensors"), ("z", "b.safetensors")]);
        let err = Checkpoint::open(d.path()).err().unwrap();
        assert!(
            matches!(&err, Error::TensorNotInShard { tensor, .. } if tensor == "z"),
            "{err:?}"
        );

        write_index(d.path(), &[("x", "a.safetensors")]);
        // b.safetensors is not referenced at all: fine; a shard holding an
        // unlisted tensor is not.
        Checkpoint::open(d.path()).unwrap();
        write_shard(d.path(), "a.safetensors", "x");
        std::fs::write(d.path().join(INDEX_NAME), "{\"weight_map\": 3}").unwrap();
        assert!(matches!(
            Checkpoint::open(d.path()),
            Err(Error::IndexInvalid { .. })
        ));
    }

    #[test]
    fn shard_tensor_missing_from_the_index() {
        let d = tempfile::tempdir().unwrap();
        write_shard(d.path(), "a.safetensors", "x");
        write_shard(d.path(), "b.safetensors", "y");
        // Listed for a shard that does not hold it: absent from its shard.
        write_index(d.path(), &[("x", "a.safetensors"), ("y", "a.safetensors")]);
        let err = Checkpoint::open(d.path()).err().unwrap();
        assert!(
            matches!(&err, Error::TensorNotInShard { tensor, .. } if tensor == "y"),
            "{err:?}"
        );
        write_index(d.path(), &[("x", "b.safetensors"), ("y", "b.safetensors")]);
        let err = Checkpoint::open(d.path()).err().unwrap();
        assert!(
            matches!(&err, Error::TensorNotInShard { tensor, .. } if tensor == "x"),
            "{err:?}"
        );
        // b also holds "y", which the index assigns to a: not in the index for b.
        write_shard(d.path(), "a.safetensors", "y");
        write_index(d.path(), &[("y", "a.safetensors"), ("z", "b.safetensors")]);
        std::fs::write(
            d.path().join("b.safetensors"),
            with_header(
                r#"{"y":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"z":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                2,
            ),
        )
        .unwrap();
        let err = Checkpoint::open(d.path()).err().unwrap();
        assert!(
            matches!(&err, Error::TensorNotInIndex { tensor, .. } if tensor == "y"),
            "{err:?}"
        );
    }

    #[test]
    fn several_files_without_an_index_and_missing_paths() {
        let d = tempfile::tempdir().unwrap();
        write_shard(d.path(), "a.safetensors", "x");
        write_shard(d.path(), "b.safetensors", "y");
        assert!(matches!(
            Checkpoint::open(d.path()),
            Err(Error::AmbiguousCheckpoint { count: 2, .. })
        ));
        let missing = d.path().join("nope");
        assert!(matches!(
            Checkpoint::open(&missing),
            Err(Error::Io { ref path, .. }) if path == &missing
        ));
    }

    #[test]
    fn parse_dtype_names() {
        assert_eq!(parse_dtype("BF16"), Some(Dtype::BF16));
        assert_eq!(parse_dtype("F8_E4M3"), Some(Dtype::F8_E4M3));
        assert_eq!(parse_dtype("nope"), None);
    }
}
