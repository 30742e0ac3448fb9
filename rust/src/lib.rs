//! pissa_rs's Rust core: safetensors checkpoints in (memory-mapped), shards
//! out (positional writes, atomic finalize). No linear algebra lives here.

pub mod bindings;
pub mod checkpoint;
pub mod error;
pub mod journal;
pub mod pagecache;
pub mod pipeline;
pub mod writer;

use pyo3::prelude::*;

#[pymodule]
fn _pissa_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    bindings::register(m)
}
