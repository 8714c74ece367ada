//! The durable result buffer. The only module that touches sled.
//!
//! Layout (one sled tree): `r` + seq (8 bytes, big endian) -> recorded_at (8 bytes, unix
//! nanos, big endian) + payload; meta keys `m:next_seq`, `m:bytes`, `m:count`,
//! `m:dropped`, `m:acked`, always changed in the same atomic batch as the results they
//! describe.
//!
//! Invariants:
//! - One writer thread owns every mutation, so seq assignment, byte accounting and drops
//!   never race. Async callers talk to it through a channel.
//! - `append` returns only after the result is durable: sled flush followed by fsync of
//!   the data file (sled's own flush uses sync_file_range, which does not survive a power
//!   cut). Appends that arrive together share one flush and one fsync (group commit).
//! - seq is strictly increasing and never reused, even after everything is acked.
//! - The payload bytes stay within `max_bytes`: when an append would exceed it, the oldest
//!   results are dropped and counted in `m:dropped`.
//! - Acked results are deleted in bounded chunks (a huge sled batch of removes costs
//!   memory out of proportion).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};

const RESULTS_START: &[u8] = b"r";
const RESULTS_END: &[u8] = b"s";
const NEXT_SEQ: &[u8] = b"m:next_seq";
const BYTES: &[u8] = b"m:bytes";
const COUNT: &[u8] = b"m:count";
const DROPPED: &[u8] = b"m:dropped";
const ACKED: &[u8] = b"m:acked";
/// Bytes of bookkeeping per stored result counted against the cap (key + timestamp).
const OVERHEAD: u64 = 9 + 8;
/// Removes per sled batch when deleting acked results. sled applies a batch under a lock
/// that stops every reader (and appender) of the tree until it is done, so acked ranges
/// are deleted in small batches: the uplink's reads of the next results interleave
/// instead of waiting for a whole range to go.
const DELETE_CHUNK: usize = 1_000;
/// Appends folded into one group commit at most.
const GROUP_MAX: usize = 10_000;
/// Free space kept on the buffer's filesystem. Below it the buffer stops growing and drops
/// its oldest results instead: sled cannot recover from a write that hits a full disk.
const DISK_RESERVE: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error(
        "cannot open the result buffer at {path}: {source}. If the directory is corrupted, \
         stop the agent, move it aside (mv {path} {path}.corrupt) and start again; \
         results in it that were not yet delivered are then lost"
    )]
    Open { path: String, source: sled::Error },
    #[error(
        "the result buffer at {path} is in use by another process (a running edgeprobe-agent?); \
         stop it first"
    )]
    Locked { path: String },
    #[error("cannot create the state directory {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("result buffer at {path}: {source}")]
    Io { path: String, source: sled::Error },
    #[error("result buffer at {path}: fsync failed: {source}")]
    Sync {
        path: String,
        source: std::io::Error,
    },
    #[error("result buffer is closed")]
    Closed,
}

/// One stored result.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// Counters of the buffer, as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Results stored, not yet acknowledged.
    pub backlog: u64,
    /// Bytes counted against the cap.
    pub bytes: u64,
    /// Results dropped because the cap was reached, ever.
    pub dropped: u64,
    /// Highest seq acknowledged by a collector.
    pub acked: u64,
    /// The seq the next result gets.
    pub next_seq: u64,
    /// Unix seconds of the oldest stored result, 0 when empty.
    pub oldest_unix_seconds: i64,
    /// Size of the sled directory on disk.
    pub size_on_disk: u64,
}

impl Stats {
    pub fn render(&self, dir: &Path) -> String {
        let oldest = if self.oldest_unix_seconds == 0 {
            "-".to_string()
        } else {
            let now = unix_nanos(SystemTime::now()) / 1_000_000_000;
            let age = Duration::from_secs((now - self.oldest_unix_seconds).max(0) as u64);
            format!("{} ago", humantime::format_duration(age))
        };
        format!(
            "buffer        {}\n\
             backlog       {} results\n\
             oldest        {oldest}\n\
             stored bytes  {}\n\
             size on disk  {}\n\
             dropped       {}\n\
             acked seq     {}\n\
             next seq      {}\n",
            buffer_dir(dir).display(),
            self.backlog,
            self.bytes,
            self.size_on_disk,
            self.dropped,
            self.acked,
            self.next_seq
        )
    }
}

enum Command {
    Append(Vec<u8>, oneshot::Sender<Result<u64, BufferError>>),
    Ack(u64, oneshot::Sender<Result<(), BufferError>>),
    Reconcile(u64, oneshot::Sender<Result<(), BufferError>>),
}

/// The answer to `Buffer::ack`.
pub type Deletion = oneshot::Receiver<Result<(), BufferError>>;

/// Handle to the buffer; cheap to clone.
#[derive(Clone)]
pub struct Buffer {
    inner: Arc<Inner>,
}

struct Inner {
    tree: sled::Db,
    path: PathBuf,
    commands: Mutex<Option<std_mpsc::Sender<Command>>>,
    /// Highest seq appended; uplinks watch it to wake up.
    appended: watch::Sender<u64>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Results dropped because a write failed (disk full), not yet in `m:dropped`.
    unpersisted_drops: AtomicU64,
}

/// The sled directory inside the state directory.
pub fn buffer_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("buffer")
}

impl Buffer {
    /// Opens (or creates) the buffer under `state_dir`.
    pub fn open(state_dir: &Path, max_bytes: u64) -> Result<Buffer, BufferError> {
        std::fs::create_dir_all(state_dir).map_err(|source| BufferError::CreateDir {
            path: state_dir.display().to_string(),
            source,
        })?;
        let path = buffer_dir(state_dir);
        let existed = std::fs::metadata(path.join("db")).is_ok_and(|m| m.len() > 0);
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(8 * 1024 * 1024)
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(|source| match &source {
                sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    BufferError::Locked {
                        path: path.display().to_string(),
                    }
                }
                _ => BufferError::Open {
                    path: path.display().to_string(),
                    source,
                },
            })?;
        // Fail early, with the path, on a directory sled opened but cannot read, and
        // refuse one it opened as empty although it held a buffer: sled recovers some
        // corruptions by starting over, which would silently lose the backlog.
        let open_error = |reason: String| BufferError::Open {
            path: path.display().to_string(),
            source: sled::Error::Unsupported(reason),
        };
        let io_error = |source| BufferError::Open {
            path: path.display().to_string(),
            source,
        };
        match db.get(NEXT_SEQ).map_err(io_error)? {
            Some(_) => {}
            None if existed => {
                return Err(open_error(
                    "it holds no edgeprobe data although it existed (reset or corrupted)".into(),
                ))
            }
            None => {
                db.insert(NEXT_SEQ, &1u64.to_be_bytes()).map_err(io_error)?;
                db.flush().map_err(io_error)?;
            }
        }
        let data_file = File::open(path.join("db")).map_err(|source| BufferError::Sync {
            path: path.display().to_string(),
            source,
        })?;
        let last = read_u64(&db, NEXT_SEQ)
            .unwrap_or(0)
            .max(1)
            .saturating_sub(1);
        let (appended, _) = watch::channel(last);
        let (tx, rx) = std_mpsc::channel();
        let inner = Arc::new(Inner {
            tree: db,
            path,
            commands: Mutex::new(Some(tx)),
            appended,
            thread: Mutex::new(None),
            unpersisted_drops: AtomicU64::new(0),
        });
        let writer = Writer {
            inner: inner.clone(),
            data_file,
            max_bytes: max_bytes.max(1),
            burst: 0,
            failed_burst: 0,
        };
        let handle = std::thread::Builder::new()
            .name("buffer-writer".into())
            .spawn(move || writer.run(rx))
            .expect("cannot spawn the buffer writer thread");
        *inner.thread.lock().unwrap() = Some(handle);
        Ok(Buffer { inner })
    }

    fn send(&self, command: Command) -> Result<(), BufferError> {
        let guard = self.inner.commands.lock().unwrap();
        let tx = guard.as_ref().ok_or(BufferError::Closed)?;
        tx.send(command).map_err(|_| BufferError::Closed)
    }

    /// Stores a payload durably; returns its seq once it is fsynced.
    pub async fn append(&self, payload: Vec<u8>) -> Result<u64, BufferError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Append(payload, tx))?;
        rx.await.map_err(|_| BufferError::Closed)?
    }

    /// An acknowledgement from the collector: queues the deletion of every result with
    /// seq <= `upto` and returns at once; the receiver answers when it is done. Reads of
    /// later seqs need not wait for it, so the uplink keeps sending while a large
    /// acknowledged range is deleted.
    pub fn ack(&self, upto: u64) -> Result<Deletion, BufferError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Ack(upto, tx))?;
        Ok(rx)
    }

    /// Applies a collector's committed seq. Normally that is an ack. When the collector has
    /// committed seqs this buffer never assigned (the state directory was reset while the
    /// database kept the agent's rows), the pending results are renumbered after it, so
    /// they are not mistaken for duplicates.
    pub async fn reconcile(&self, committed: u64) -> Result<(), BufferError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Reconcile(committed, tx))?;
        rx.await.map_err(|_| BufferError::Closed)?
    }

    /// Up to `max_count` results with seq > `after`, stopping once `max_bytes` is passed.
    pub async fn read_after(
        &self,
        after: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, BufferError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.read_after(after, max_count, max_bytes))
            .await
            .map_err(|_| BufferError::Closed)?
    }

    /// Watches the highest appended seq.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.appended.subscribe()
    }

    pub fn stats(&self) -> Stats {
        let t = &self.inner.tree;
        let oldest_unix_seconds = t
            .range(RESULTS_START..RESULTS_END)
            .next()
            .and_then(|r| r.ok())
            .map(|(_, v)| decode_entry_time(&v) / 1_000_000_000)
            .unwrap_or(0);
        Stats {
            backlog: read_u64(t, COUNT).unwrap_or(0),
            bytes: read_u64(t, BYTES).unwrap_or(0),
            dropped: read_u64(t, DROPPED).unwrap_or(0)
                + self.inner.unpersisted_drops.load(Ordering::Relaxed),
            acked: read_u64(t, ACKED).unwrap_or(0),
            next_seq: read_u64(t, NEXT_SEQ).unwrap_or(0).max(1),
            oldest_unix_seconds,
            size_on_disk: t.size_on_disk().unwrap_or(0),
        }
    }

    /// Stops the writer after the commands already queued; flushes.
    pub fn close(&self) {
        self.inner.commands.lock().unwrap().take();
        if let Some(handle) = self.inner.thread.lock().unwrap().take() {
            let _ = handle.join();
        }
        let _ = self.inner.tree.flush();
    }
}

impl Inner {
    fn read_after(
        &self,
        after: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, BufferError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let start = result_key(after.saturating_add(1));
        for item in self.tree.range(start.as_slice()..RESULTS_END) {
            let (k, v) = item.map_err(|source| BufferError::Io {
                path: self.path.display().to_string(),
                source,
            })?;
            let seq = u64::from_be_bytes(k[1..9].try_into().unwrap_or_default());
            bytes += v.len();
            out.push(Entry {
                seq,
                payload: v[8.min(v.len())..].to_vec(),
            });
            if out.len() >= max_count || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }
}

struct Writer {
    inner: Arc<Inner>,
    data_file: File,
    max_bytes: u64,
    /// Results dropped in the current run of full-buffer appends (logged once per burst).
    burst: u64,
    /// Results lost in the current run of failed writes (logged once per burst).
    failed_burst: u64,
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Command>) {
        while let Ok(first) = rx.recv() {
            let mut appends = Vec::new();
            let mut acks = Vec::new();
            let mut reconciles = Vec::new();
            let mut next = Some(first);
            while let Some(c) = next.take() {
                match c {
                    Command::Append(p, tx) => appends.push((p, tx)),
                    Command::Ack(seq, tx) => acks.push((seq, tx)),
                    Command::Reconcile(seq, tx) => reconciles.push((seq, tx)),
                }
                if appends.len() < GROUP_MAX {
                    next = rx.try_recv().ok();
                }
            }
            if !appends.is_empty() {
                let payloads: Vec<&[u8]> = appends.iter().map(|(p, _)| p.as_slice()).collect();
                match self.append_group(&payloads) {
                    Ok(first_seq) => {
                        if self.failed_burst > 0 {
                            tracing::info!(
                                lost = self.failed_burst,
                                "recording results again after failed writes"
                            );
                            self.failed_burst = 0;
                        }
                        let last = first_seq + appends.len() as u64 - 1;
                        for (i, (_, tx)) in appends.into_iter().enumerate() {
                            let _ = tx.send(Ok(first_seq + i as u64));
                        }
                        self.inner.appended.send_replace(last);
                    }
                    Err(e) => {
                        // Disk full or I/O trouble: these results are lost. Count them as
                        // dropped (persisted with the next successful append) and try to
                        // free room by dropping the oldest; the agent keeps running.
                        let lost = appends.len() as u64;
                        self.inner
                            .unpersisted_drops
                            .fetch_add(lost, Ordering::Relaxed);
                        let message = e.to_string();
                        if self.failed_burst == 0 {
                            tracing::error!(
                                "cannot record results, counting them as dropped until writes succeed again: {message}"
                            );
                            self.free_room();
                        }
                        self.failed_burst += lost;
                        for (_, tx) in appends {
                            let _ = tx.send(Err(BufferError::Sync {
                                path: self.inner.path.display().to_string(),
                                source: std::io::Error::other(message.clone()),
                            }));
                        }
                    }
                }
            }
            for (committed, tx) in reconciles {
                let _ = tx.send(self.reconcile(committed));
            }
            if let Some(upto) = acks.iter().map(|(s, _)| *s).max() {
                let result = self.delete_upto(upto);
                for (_, tx) in acks {
                    let _ = tx.send(match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(BufferError::Sync {
                            path: self.inner.path.display().to_string(),
                            source: std::io::Error::other(e.to_string()),
                        }),
                    });
                }
            }
        }
    }

    fn io(&self, source: sled::Error) -> BufferError {
        BufferError::Io {
            path: self.inner.path.display().to_string(),
            source,
        }
    }

    /// Stores payloads in one atomic batch, flushes and fsyncs. Returns the first seq.
    fn append_group(&mut self, payloads: &[&[u8]]) -> Result<u64, BufferError> {
        let t = &self.inner.tree;
        let unpersisted = self.inner.unpersisted_drops.load(Ordering::Relaxed);
        let next = read_u64(t, NEXT_SEQ).map_err(|e| self.io(e))?.max(1);
        let mut bytes = read_u64(t, BYTES).map_err(|e| self.io(e))?;
        let mut count = read_u64(t, COUNT).map_err(|e| self.io(e))?;
        let mut dropped = read_u64(t, DROPPED).map_err(|e| self.io(e))?;
        let incoming: u64 = payloads.iter().map(|p| p.len() as u64 + OVERHEAD).sum();
        let cap = self.effective_cap(bytes);

        let mut batch = sled::Batch::default();
        // Make room: drop the oldest stored results until the group fits.
        let mut dropped_now = 0u64;
        if bytes + incoming > cap {
            for item in t.range(RESULTS_START..RESULTS_END) {
                if bytes + incoming <= cap {
                    break;
                }
                let (k, v) = item.map_err(|e| self.io(e))?;
                batch.remove(k);
                bytes = bytes.saturating_sub(stored_size(&v));
                count = count.saturating_sub(1);
                dropped_now += 1;
            }
        }
        let now = unix_nanos(SystemTime::now()).max(0) as u64;
        let mut seq = next;
        let mut skipped = 0u64;
        for p in payloads {
            let size = p.len() as u64 + OVERHEAD;
            if bytes + size > cap {
                // Larger than the whole cap even with everything else dropped.
                skipped += 1;
                seq += 1;
                continue;
            }
            let mut value = Vec::with_capacity(8 + p.len());
            value.extend_from_slice(&now.to_be_bytes());
            value.extend_from_slice(p);
            batch.insert(result_key(seq).as_slice(), value);
            bytes += size;
            count += 1;
            seq += 1;
        }
        dropped += dropped_now + skipped + unpersisted;
        batch.insert(NEXT_SEQ, &seq.to_be_bytes());
        batch.insert(BYTES, &bytes.to_be_bytes());
        batch.insert(COUNT, &count.to_be_bytes());
        batch.insert(DROPPED, &dropped.to_be_bytes());
        t.apply_batch(batch).map_err(|e| self.io(e))?;
        t.flush().map_err(|e| self.io(e))?;
        self.data_file
            .sync_data()
            .map_err(|source| BufferError::Sync {
                path: self.inner.path.display().to_string(),
                source,
            })?;
        self.inner
            .unpersisted_drops
            .fetch_sub(unpersisted, Ordering::Relaxed);
        let dropped_here = dropped_now + skipped;
        if dropped_here > 0 {
            if self.burst == 0 {
                tracing::warn!(
                    cap_bytes = self.max_bytes,
                    dropped_total = dropped,
                    "buffer full (byte cap or disk reserve reached): dropping the oldest results until the collector catches up"
                );
            }
            self.burst += dropped_here;
        } else if self.burst > 0 {
            tracing::info!(
                dropped = self.burst,
                dropped_total = dropped,
                "buffer no longer full; results dropped in this burst"
            );
            self.burst = 0;
        }
        Ok(next)
    }

    /// The byte cap for this append: `max_bytes`, lowered to what is stored now when the
    /// filesystem is down to its reserve, so a filling disk drops the oldest results like a
    /// full buffer does instead of failing writes.
    fn effective_cap(&self, stored: u64) -> u64 {
        match fs2::available_space(&self.inner.path) {
            Ok(free) if free < DISK_RESERVE => stored.min(self.max_bytes),
            _ => self.max_bytes,
        }
    }

    /// After a failed write: removes the oldest tenth of the stored results, counted as
    /// dropped, so that later appends have room. Best effort; errors are logged.
    fn free_room(&self) {
        let t = &self.inner.tree;
        let count = read_u64(t, COUNT).unwrap_or(0);
        let n = (count / 10).clamp(1, DELETE_CHUNK as u64) as usize;
        let result = (|| -> Result<u64, sled::Error> {
            let mut batch = sled::Batch::default();
            let mut bytes = read_u64(t, BYTES)?;
            let mut removed = 0u64;
            for item in t.range(RESULTS_START..RESULTS_END).take(n) {
                let (k, v) = item?;
                bytes = bytes.saturating_sub(stored_size(&v));
                batch.remove(k);
                removed += 1;
            }
            batch.insert(BYTES, &bytes.to_be_bytes());
            batch.insert(COUNT, &count.saturating_sub(removed).to_be_bytes());
            t.apply_batch(batch)?;
            t.flush()?;
            Ok(removed)
        })();
        match result {
            Ok(removed) => {
                self.inner
                    .unpersisted_drops
                    .fetch_add(removed, Ordering::Relaxed);
                tracing::warn!(dropped = removed, "dropped the oldest results to free room");
            }
            Err(e) => tracing::error!("cannot free room in the buffer: {e}"),
        }
    }

    fn reconcile(&self, committed: u64) -> Result<(), BufferError> {
        let t = &self.inner.tree;
        let next = read_u64(t, NEXT_SEQ).map_err(|e| self.io(e))?.max(1);
        if committed < next {
            return self.delete_upto(committed);
        }
        tracing::warn!(
            committed_seq = committed,
            local_next_seq = next,
            "the collector already holds results with seqs this buffer never assigned \
             (state directory reset?); renumbering pending results after {committed}"
        );
        let mut new_seq = committed + 1;
        let mut after = 0u64;
        loop {
            let mut chunk = self.inner.read_after(after, DELETE_CHUNK, usize::MAX)?;
            chunk.retain(|e| e.seq <= committed);
            let Some(last) = chunk.last().map(|e| e.seq) else {
                break;
            };
            let mut batch = sled::Batch::default();
            for e in &chunk {
                let value = t
                    .get(result_key(e.seq))
                    .map_err(|err| self.io(err))?
                    .unwrap_or_default();
                batch.remove(result_key(e.seq).as_slice());
                batch.insert(result_key(new_seq).as_slice(), value);
                new_seq += 1;
            }
            batch.insert(NEXT_SEQ, &new_seq.to_be_bytes());
            t.apply_batch(batch).map_err(|e| self.io(e))?;
            after = last;
        }
        let mut batch = sled::Batch::default();
        batch.insert(NEXT_SEQ, &new_seq.to_be_bytes());
        batch.insert(ACKED, &committed.to_be_bytes());
        t.apply_batch(batch).map_err(|e| self.io(e))?;
        t.flush().map_err(|e| self.io(e))?;
        self.inner.appended.send_replace(new_seq - 1);
        Ok(())
    }

    /// Deletes results with seq <= upto in bounded chunks.
    fn delete_upto(&self, upto: u64) -> Result<(), BufferError> {
        let t = &self.inner.tree;
        let end = result_key(upto.saturating_add(1));
        loop {
            let mut batch = sled::Batch::default();
            let mut bytes = read_u64(t, BYTES).map_err(|e| self.io(e))?;
            let mut count = read_u64(t, COUNT).map_err(|e| self.io(e))?;
            let mut n = 0;
            for item in t.range(RESULTS_START..end.as_slice()).take(DELETE_CHUNK) {
                let (k, v) = item.map_err(|e| self.io(e))?;
                bytes = bytes.saturating_sub(stored_size(&v));
                count = count.saturating_sub(1);
                batch.remove(k);
                n += 1;
            }
            let acked = read_u64(t, ACKED).map_err(|e| self.io(e))?;
            batch.insert(ACKED, &acked.max(upto).to_be_bytes());
            batch.insert(BYTES, &bytes.to_be_bytes());
            batch.insert(COUNT, &count.to_be_bytes());
            t.apply_batch(batch).map_err(|e| self.io(e))?;
            if n < DELETE_CHUNK {
                return Ok(());
            }
        }
    }
}

/// Bytes a stored value counts against the cap.
fn stored_size(value: &[u8]) -> u64 {
    (value.len() as u64).saturating_sub(8) + OVERHEAD
}

fn result_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'r';
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64, sled::Error> {
    Ok(tree
        .get(key)?
        .and_then(|v| v.as_ref().try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

fn decode_entry_time(value: &[u8]) -> i64 {
    value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0) as i64
}

fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn append_read_ack_and_seq_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let b = Buffer::open(dir.path(), 1 << 20).unwrap();
        for i in 0..10u8 {
            assert_eq!(b.append(vec![i; 10]).await.unwrap(), i as u64 + 1);
        }
        let got = b.read_after(3, 100, 1 << 20).await.unwrap();
        assert_eq!(got.len(), 7);
        assert_eq!(got[0].seq, 4);
        assert_eq!(got[0].payload, vec![3u8; 10]);
        b.ack(10).unwrap().await.unwrap().unwrap();
        let s = b.stats();
        assert_eq!((s.backlog, s.bytes, s.acked, s.next_seq), (0, 0, 10, 11));
        b.close();
        drop(b);
        let b = Buffer::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(b.append(vec![1]).await.unwrap(), 11);
    }

    #[tokio::test]
    async fn drops_oldest_when_full() {
        let dir = tempfile::tempdir().unwrap();
        // Room for exactly 4 results of 100 bytes.
        let b = Buffer::open(dir.path(), 4 * (100 + OVERHEAD)).unwrap();
        for _ in 0..10 {
            b.append(vec![7; 100]).await.unwrap();
        }
        let s = b.stats();
        assert_eq!((s.backlog, s.dropped), (4, 6));
        let got = b.read_after(0, 100, 1 << 20).await.unwrap();
        let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![7, 8, 9, 10]);
    }
}
