//! The background half of a decomposition: pass-through tensors copied on
//! one thread with no Python in the loop, results written on another from a
//! bounded queue (backpressure keeps at most `queue_depth` results in memory),
//! input pages released as each tensor is done.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::writer::ShardWriter;

/// One pass-through tensor: `source` of the checkpoint into `name` of `writer`.
pub struct CopyJob {
    pub checkpoint: Arc<Checkpoint>,
    pub source: String,
    pub writer: Arc<ShardWriter>,
    pub name: String,
}

/// One computed tensor to write; `release` names an input tensor whose pages
/// can be dropped once this is written.
pub struct WriteJob {
    pub writer: Arc<ShardWriter>,
    pub name: String,
    pub bytes: Vec<u8>,
    pub release: Option<(Arc<Checkpoint>, String)>,
}

#[derive(Default)]
struct Shared {
    error: Mutex<Option<Error>>,
    cancelled: AtomicBool,
    bytes_written: AtomicU64,
    tensors_written: AtomicU64,
}

impl Shared {
    fn fail(&self, err: Error) {
        let mut slot = self.error.lock().expect("poisoned");
        if slot.is_none() {
            *slot = Some(err);
        }
        self.cancelled.store(true, Ordering::SeqCst);
    }

    fn take_error(&self) -> Option<Error> {
        self.error.lock().expect("poisoned").take()
    }

    fn check(&self) -> Result<()> {
        match self.error.lock().expect("poisoned").as_ref() {
            // Errors are reported once, by `finish`; later calls just stop.
            Some(e) => Err(Error::Io {
                path: e.path().to_path_buf(),
                op: "background write (see the first error)",
                source: std::io::Error::other(e.to_string()),
            }),
            None => Ok(()),
        }
    }
}

pub struct Pipeline {
    shared: Arc<Shared>,
    sender: Mutex<Option<SyncSender<WriteJob>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pipeline {
    pub fn start(copies: Vec<CopyJob>, queue_depth: usize) -> Pipeline {
        let shared = Arc::new(Shared::default());
        let (sender, receiver) = sync_channel::<WriteJob>(queue_depth.max(1));
        let copier = {
            let shared = shared.clone();
            std::thread::spawn(move || run_copies(&shared, copies))
        };
        let writer = {
            let shared = shared.clone();
            std::thread::spawn(move || run_writes(&shared, receiver))
        };
        Pipeline {
            shared,
            sender: Mutex::new(Some(sender)),
            threads: Mutex::new(vec![copier, writer]),
        }
    }

    /// Queue a result for writing; blocks while the queue is full.
    pub fn submit(&self, job: WriteJob) -> Result<()> {
        self.shared.check()?;
        let sender = self.sender.lock().expect("poisoned").clone();
        let Some(sender) = sender else {
            return Err(Error::WriterClosed {
                path: job.writer.path().to_path_buf(),
                state: "finished",
            });
        };
        if sender.send(job).is_err() {
            // The writer thread stopped on an error; report that one.
            self.shared.check()?;
        }
        Ok(())
    }

    /// No more submits: the writer thread ends once its queue is drained.
    pub fn close(&self) {
        self.sender.lock().expect("poisoned").take();
    }

    /// Whether every copy and queued write has ended (after `close`).
    pub fn is_done(&self) -> bool {
        self.threads
            .lock()
            .expect("poisoned")
            .iter()
            .all(|t| t.is_finished())
    }

    /// Stop the pass-through copies early (on an error or Ctrl-C upstream).
    pub fn cancel(&self) {
        self.shared.cancelled.store(true, Ordering::SeqCst);
    }

    /// Wait for every queued write and copy; the first error, if any.
    pub fn finish(&self) -> Result<()> {
        self.close();
        let threads = std::mem::take(&mut *self.threads.lock().expect("poisoned"));
        for t in threads {
            let _ = t.join();
        }
        match self.shared.take_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub fn bytes_written(&self) -> u64 {
        self.shared.bytes_written.load(Ordering::Relaxed)
    }

    pub fn tensors_written(&self) -> u64 {
        self.shared.tensors_written.load(Ordering::Relaxed)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.cancel();
        let _ = self.finish();
    }
}

fn run_copies(shared: &Shared, copies: Vec<CopyJob>) {
    for job in copies {
        if shared.cancelled.load(Ordering::SeqCst) {
            return;
        }
        let n = match job.checkpoint.get(&job.source) {
            Ok(e) => e.nbytes(),
            Err(e) => return shared.fail(e),
        };
        if let Err(e) = job
            .writer
            .copy_from(&job.checkpoint, &job.source, &job.name)
        {
            return shared.fail(e);
        }
        shared.bytes_written.fetch_add(n, Ordering::Relaxed);
        shared.tensors_written.fetch_add(1, Ordering::Relaxed);
    }
}

fn run_writes(shared: &Shared, receiver: Receiver<WriteJob>) {
    for job in receiver {
        if let Err(e) = job.writer.write(&job.name, &job.bytes) {
            // Dropping the receiver makes further submits fail fast.
            return shared.fail(e);
        }
        if let Some((checkpoint, name)) = &job.release {
            if let Ok(entry) = checkpoint.get(name) {
                checkpoint.shards[entry.shard].release(entry.start, entry.end);
            }
        }
        shared
            .bytes_written
            .fetch_add(job.bytes.len() as u64, Ordering::Relaxed);
        shared.tensors_written.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::TensorSpec;
    use safetensors::Dtype;

    #[test]
    fn writes_and_copies_land_and_errors_surface() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("in.safetensors");
        let header = r#"{"p":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(b"xyz");
        std::fs::write(&src, bytes).unwrap();
        let ck = Arc::new(Checkpoint::open(&src).unwrap());
        let specs = [
            TensorSpec {
                name: "p".into(),
                dtype: Dtype::U8,
                shape: vec![3],
            },
            TensorSpec {
                name: "t".into(),
                dtype: Dtype::U8,
                shape: vec![2],
            },
        ];
        let out = dir.path().join("out.safetensors");
        let w = Arc::new(ShardWriter::create(&out, &specs, None).unwrap());
        let p = Pipeline::start(
            vec![CopyJob {
                checkpoint: ck.clone(),
                source: "p".into(),
                writer: w.clone(),
                name: "p".into(),
            }],
            1,
        );
        p.submit(WriteJob {
            writer: w.clone(),
            name: "t".into(),
            bytes: b"ab".to_vec(),
            release: None,
        })
        .unwrap();
        p.finish().unwrap();
        assert_eq!(p.tensors_written(), 2);
        assert_eq!(p.bytes_written(), 5);
        w.finalize().unwrap();

        // A bad write is reported by finish, naming the tensor.
        let w2 = Arc::new(ShardWriter::create(&dir.path().join("o2"), &specs[1..], None).unwrap());
        let p2 = Pipeline::start(vec![], 1);
        p2.submit(WriteJob {
            writer: w2,
            name: "t".into(),
            bytes: b"abc".to_vec(),
            release: None,
        })
        .unwrap();
        assert!(matches!(p2.finish(), Err(Error::WriterTensor { tensor, .. }) if tensor == "t"));
    }
}
