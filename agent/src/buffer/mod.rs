//! The durable result buffer. The only module that touches sled.
//!
//! Layout (one sled tree): `r` + seq (8 bytes, big endian) -> recorded_at (8 bytes, unix
//! nanos, big endian) + payload; meta keys `m:next_seq`, `m:bytes`, `m:count`,
//! `m:dropped`, `m:acked`, `m:quarantined`, always changed in the same atomic batch as the
//! results they describe; `m:incarnation` (the buffer's identity) and `m:renumber` (the
//! journal of a renumbering in progress).
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
//! - A buffer gets a random incarnation id when it is created, in the same batch as its
//!   first meta keys, and keeps it for good; seq counts within an incarnation. A buffer
//!   created before incarnations existed has the empty one (no key), which the collector
//!   maps to the agent's older watermark.
//! - Every multi-step change is safe across a crash. Renumbering (the collector committed
//!   seqs this buffer never assigned) writes a journal (`m:renumber`: committed seq, a
//!   fixed offset, the old next seq) first, moves results chunk by chunk from seq to
//!   seq + offset (old and new ranges are disjoint, so a move is idempotent), and removes
//!   the journal and sets the next seq in its last batch; `open` finishes a journal left
//!   behind before anything reads. A rewrite of payloads (start time correction) changes
//!   one chunk per batch with the byte count in the same batch, and the caller's function
//!   is idempotent, so an interrupted rewrite loses and duplicates nothing.
//! - The buffer does not know its payloads: rewrites take a function from the caller.
//! - No sled call runs on an async worker: mutations go to the writer thread, and reads
//!   from async code take `spawn_blocking` (`read_after`, `stats_async`). The buffer
//!   keeps counters, not their presentation (`report::buffer_status`).
//!
//! Test hooks (test-only, documented for the end-to-end chaos tests):
//! `EDGEPROBE_TEST_CHUNK_PAUSE_MS` makes renumbering and rewriting sleep that long after
//! each chunk, `EDGEPROBE_TEST_CHUNK_RESULTS` sets their chunk size (default 1,000).

//!
//! Files: `layout.rs` (keys and their encoding), `open.rs` (opening: the lock, corruption
//! refusal, finishing a journal), `writer.rs` (the writer thread: group commit, cap, disk
//! reserve, chunked deletes, reconcile, rewrites), `journal.rs` (the renumbering journal).

mod journal;
mod layout;
mod open;
mod writer;

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, watch};

use journal::Renumber;
use layout::*;
use writer::{Writer, DELETE_CHUNK};

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error(
        "the result buffer at {path} is corrupted: {reason}. Stop the agent, move the \
         directory aside (mv {path} {path}.corrupt) and start again; results in it that \
         were not yet delivered are then lost"
    )]
    Corrupt { path: String, reason: String },
    #[error("cannot open the result buffer at {path}: {source}")]
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// The buffer's incarnation id; empty for a buffer created before incarnations.
    pub incarnation: String,
    /// Results stored, not yet acknowledged.
    pub backlog: u64,
    /// Bytes counted against the cap.
    pub bytes: u64,
    /// Results dropped because the cap was reached, ever.
    pub dropped: u64,
    /// Highest seq acknowledged by a collector.
    pub acked: u64,
    /// Results the collector quarantined instead of storing (acked with a reason), ever.
    pub quarantined: u64,
    /// The seq the next result gets.
    pub next_seq: u64,
    /// Unix seconds of the oldest stored result, 0 when empty.
    pub oldest_unix_seconds: i64,
    /// Size of the sled directory on disk.
    pub size_on_disk: u64,
}

/// A payload to append and where its seq goes.
type AppendRequest = (Vec<u8>, oneshot::Sender<Result<u64, BufferError>>);

enum Command {
    Append(Vec<u8>, oneshot::Sender<Result<u64, BufferError>>),
    /// Acked seq and the results of the acked range the collector quarantined.
    Ack(u64, u64, oneshot::Sender<Result<(), BufferError>>),
    Reconcile(u64, oneshot::Sender<Result<(), BufferError>>),
    Rewrite(RewriteJob),
}

/// The caller's payload rewrite: `Some` replaces the payload. Must be idempotent.
type RewriteFn = Arc<dyn Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync>;

/// A rewrite in progress on the writer thread, one chunk at a time between other commands.
struct RewriteJob {
    what: &'static str,
    f: RewriteFn,
    /// Results found to rewrite when it was asked for (for the log).
    expected: u64,
    /// Every result up to this seq has been looked at.
    after: u64,
    started: bool,
    done: u64,
    tx: oneshot::Sender<Result<u64, BufferError>>,
}

/// Chunk size and pause of renumbering and rewriting (see the module doc: test hooks).
#[derive(Debug, Clone, Copy)]
struct Chunking {
    results: usize,
    pause: Option<Duration>,
}

impl Chunking {
    fn from_env() -> Chunking {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        Chunking {
            results: var("EDGEPROBE_TEST_CHUNK_RESULTS")
                .map_or(DELETE_CHUNK, |n| n.max(1) as usize),
            pause: var("EDGEPROBE_TEST_CHUNK_PAUSE_MS").map(Duration::from_millis),
        }
    }

    fn after_chunk(&self) {
        if let Some(pause) = self.pause {
            std::thread::sleep(pause);
        }
    }
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
    incarnation: String,
    chunking: Chunking,
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
    ///
    /// `quarantined` counts the results of the range the collector stored in its
    /// quarantine instead of its results (kept in the stats).
    pub fn ack(&self, upto: u64, quarantined: u64) -> Result<Deletion, BufferError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Ack(upto, quarantined, tx))?;
        Ok(rx)
    }

    /// The buffer's incarnation id (hex), fixed when it was created; empty for a buffer
    /// created before incarnations.
    pub fn incarnation(&self) -> &str {
        &self.inner.incarnation
    }

    /// Rewrites stored payloads: `f` returns the new payload, or `None` to keep one. Runs
    /// on the writer thread one chunk per atomic batch, between appends and acks; `f` must
    /// be idempotent (a crash may make it see a rewritten payload again). `what` names the
    /// rewrite in the log ("correcting the start time"). Returns how many changed.
    pub async fn rewrite<F>(&self, what: &'static str, f: F) -> Result<u64, BufferError>
    where
        F: Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync + 'static,
    {
        let f: RewriteFn = Arc::new(f);
        // Find what needs it first, off the writer thread, so appends wait for nothing
        // when nothing needs rewriting and the log can say how many do.
        let inner = self.inner.clone();
        let scan = f.clone();
        let (expected, first) = tokio::task::spawn_blocking(move || inner.scan(&*scan))
            .await
            .map_err(|_| BufferError::Closed)??;
        let Some(first) = first else {
            return Ok(0);
        };
        let (tx, rx) = oneshot::channel();
        self.send(Command::Rewrite(RewriteJob {
            what,
            f,
            expected,
            after: first - 1,
            started: false,
            done: 0,
            tx,
        }))?;
        rx.await.map_err(|_| BufferError::Closed)?
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

    /// The counters, read from sled: a range read and a walk of the directory for its
    /// size. From async code use `stats_async`.
    pub fn stats(&self) -> Stats {
        let t = &self.inner.tree;
        let oldest_unix_seconds = t
            .range(RESULTS_START..RESULTS_END)
            .next()
            .and_then(|r| r.ok())
            .map(|(_, v)| decode_entry_time(&v) / 1_000_000_000)
            .unwrap_or(0);
        Stats {
            incarnation: self.inner.incarnation.clone(),
            quarantined: read_u64(t, QUARANTINED).unwrap_or(0),
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

    /// `stats` on a blocking thread, off the async workers.
    pub async fn stats_async(&self) -> Result<Stats, BufferError> {
        let buffer = self.clone();
        tokio::task::spawn_blocking(move || buffer.stats())
            .await
            .map_err(|_| BufferError::Closed)
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
    fn io(&self, source: sled::Error) -> BufferError {
        BufferError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// How many stored results `f` would rewrite, and the lowest seq among them.
    fn scan(
        &self,
        f: &dyn Fn(&[u8]) -> Option<Vec<u8>>,
    ) -> Result<(u64, Option<u64>), BufferError> {
        let mut count = 0;
        let mut first = None;
        for item in self.tree.range(RESULTS_START..RESULTS_END) {
            let (k, v) = item.map_err(|e| self.io(e))?;
            if f(&v[8.min(v.len())..]).is_some() {
                count += 1;
                first.get_or_insert(key_seq(&k));
            }
        }
        Ok((count, first))
    }

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
            let seq = key_seq(&k);
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

#[cfg(test)]
mod tests {
    use super::open::sled_config;
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
        b.ack(10, 0).unwrap().await.unwrap().unwrap();
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

    async fn seqs_and_payloads(b: &Buffer) -> Vec<(u64, Vec<u8>)> {
        b.read_after(0, usize::MAX, usize::MAX)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.seq, e.payload))
            .collect()
    }

    #[tokio::test]
    async fn incarnation_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let b = Buffer::open(dir.path(), 1 << 20).unwrap();
        let id = b.incarnation().to_string();
        assert_eq!(id.len(), 32);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(b.stats().incarnation, id);
        b.close();
        drop(b);
        let b = Buffer::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(b.incarnation(), id);
        b.close();
        drop(b);
        let other = tempfile::tempdir().unwrap();
        let c = Buffer::open(other.path(), 1 << 20).unwrap();
        assert_ne!(c.incarnation(), id, "every new buffer gets its own");
    }

    #[tokio::test]
    async fn a_buffer_from_before_incarnations_keeps_the_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        {
            // What an older agent left: meta keys, a result, no incarnation.
            let db = sled_config(&buffer_dir(dir.path())).open().unwrap();
            db.insert(NEXT_SEQ, &2u64.to_be_bytes()).unwrap();
            let mut value = 0u64.to_be_bytes().to_vec();
            value.extend_from_slice(b"old");
            db.insert(result_key(1).as_slice(), value).unwrap();
            db.insert(COUNT, &1u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        for _ in 0..2 {
            let b = Buffer::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(b.incarnation(), "");
            assert!(crate::report::buffer_status(&b.stats(), dir.path())
                .contains("created before incarnations"));
            assert_eq!(seqs_and_payloads(&b).await, vec![(1, b"old".to_vec())]);
            b.close();
        }
    }

    #[tokio::test]
    async fn renumbering_interrupted_after_one_chunk_finishes_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let b = Buffer::open(dir.path(), 1 << 20).unwrap();
        for i in 0..10u8 {
            b.append(vec![i; 5]).await.unwrap();
        }
        b.ack(2, 0).unwrap().await.unwrap().unwrap();
        let stats = b.stats();
        b.close();
        drop(b);
        {
            // A welcome says 100 (a state directory restored from an older copy); the
            // agent dies after the first chunk of 3.
            let db = sled_config(&buffer_dir(dir.path())).open().unwrap();
            let journal = Renumber::begin(&db, 100).unwrap().unwrap();
            assert_eq!(journal.offset, 98, "seq 3 becomes 101");
            assert!(!journal.step(&db, 3).unwrap());
            db.flush().unwrap();
            let moved: Vec<u64> = db
                .range(RESULTS_START..RESULTS_END)
                .map(|r| key_seq(&r.unwrap().0))
                .collect();
            assert_eq!(moved, vec![6, 7, 8, 9, 10, 101, 102, 103]);
        }
        let b = Buffer::open(dir.path(), 1 << 20).unwrap();
        let got = seqs_and_payloads(&b).await;
        let want: Vec<(u64, Vec<u8>)> = (2..10u8).map(|i| (99 + i as u64, vec![i; 5])).collect();
        assert_eq!(
            got, want,
            "every pending result exactly once, in order, above 100"
        );
        let after = b.stats();
        assert_eq!(after.next_seq, 109);
        assert_eq!(after.acked, 100);
        assert_eq!((after.backlog, after.bytes), (stats.backlog, stats.bytes));
        assert!(b.inner.tree.get(RENUMBER).unwrap().is_none());
        assert_eq!(b.append(vec![1]).await.unwrap(), 109);
        // A welcome of 100 now is an ordinary one: nothing pending is touched.
        b.reconcile(100).await.unwrap();
        assert_eq!(seqs_and_payloads(&b).await.len(), 9);
    }

    #[tokio::test]
    async fn reconcile_renumbers_above_a_higher_committed_seq() {
        let dir = tempfile::tempdir().unwrap();
        let b = Buffer::open(dir.path(), 1 << 20).unwrap();
        for i in 0..5u8 {
            b.append(vec![i]).await.unwrap();
        }
        b.reconcile(5).await.unwrap();
        let seqs: Vec<u64> = seqs_and_payloads(&b).await.iter().map(|e| e.0).collect();
        assert!(seqs.is_empty(), "committed 5 of 5: all delivered");
        for i in 0..3u8 {
            b.append(vec![i]).await.unwrap();
        }
        b.reconcile(50).await.unwrap();
        let seqs: Vec<u64> = seqs_and_payloads(&b).await.iter().map(|e| e.0).collect();
        assert_eq!(seqs, vec![51, 52, 53]);
        assert_eq!(b.stats().next_seq, 54);
        // Nothing pending: only the next seq moves.
        b.ack(53, 0).unwrap().await.unwrap().unwrap();
        b.reconcile(70).await.unwrap();
        assert_eq!(b.append(vec![9]).await.unwrap(), 71);
    }

    #[tokio::test]
    async fn rewrite_changes_payloads_and_keeps_bytes_exact() {
        let dir = tempfile::tempdir().unwrap();
        let b = Buffer::open(dir.path(), 1 << 20).unwrap();
        for i in 0..2500u32 {
            let tag = if i % 2 == 0 { b'x' } else { b'y' };
            b.append(vec![tag; 10]).await.unwrap();
        }
        // x payloads grow to 12 bytes; y ones stay. Idempotent: a rewritten one is 12 long.
        let grow = |p: &[u8]| (p.len() == 10 && p[0] == b'x').then(|| vec![b'x'; 12]);
        let before = b.stats().bytes;
        assert_eq!(b.rewrite("growing", grow).await.unwrap(), 1250);
        assert_eq!(b.stats().bytes, before + 1250 * 2);
        assert_eq!(b.rewrite("growing", grow).await.unwrap(), 0, "idempotent");
        let all = seqs_and_payloads(&b).await;
        assert_eq!(all.len(), 2500);
        assert!(all.iter().all(|(seq, p)| if seq % 2 == 1 {
            p == &vec![b'x'; 12]
        } else {
            p == &vec![b'y'; 10]
        }));
        b.ack(2500, 3).unwrap().await.unwrap().unwrap();
        let s = b.stats();
        assert_eq!((s.backlog, s.bytes, s.quarantined), (0, 0, 3));
    }

    #[tokio::test]
    async fn a_running_agents_lock_is_not_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let _b = Buffer::open(dir.path(), 1 << 20).unwrap();
        match Buffer::open(dir.path(), 1 << 20) {
            Err(BufferError::Locked { .. }) => {}
            Err(e) => panic!("expected Locked, got {e}"),
            Ok(_) => panic!("opened a locked buffer"),
        }
    }
}
