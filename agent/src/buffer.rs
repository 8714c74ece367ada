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
//!
//! Test hooks (test-only, documented for the end-to-end chaos tests):
//! `EDGEPROBE_TEST_CHUNK_PAUSE_MS` makes renumbering and rewriting sleep that long after
//! each chunk, `EDGEPROBE_TEST_CHUNK_RESULTS` sets their chunk size (default 1,000).

use std::collections::VecDeque;
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
const QUARANTINED: &[u8] = b"m:quarantined";
const INCARNATION: &[u8] = b"m:incarnation";
const RENUMBER: &[u8] = b"m:renumber";
/// Bytes of bookkeeping per stored result counted against the cap (key + timestamp).
const OVERHEAD: u64 = 9 + 8;
/// Removes per sled batch when deleting acked results. sled applies a batch under a lock
/// that stops every reader (and appender) of the tree until it is done, so acked ranges
/// are deleted in small batches: the uplink's reads of the next results interleave
/// instead of waiting for a whole range to go.
const DELETE_CHUNK: usize = 1_000;
/// Appends folded into one group commit at most.
const GROUP_MAX: usize = 10_000;
/// How long `open` waits for a lock to go away before reporting `Locked` (longer than
/// sled's 500 ms flush interval, after which a closed buffer's file is released).
const LOCK_GRACE: Duration = Duration::from_millis(1_500);
/// Free space kept on the buffer's filesystem. Below it the buffer stops growing and drops
/// its oldest results instead: sled cannot recover from a write that hits a full disk.
const DISK_RESERVE: u64 = 16 << 20;

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

impl Stats {
    pub fn render(&self, dir: &Path) -> String {
        let oldest = if self.oldest_unix_seconds == 0 {
            "-".to_string()
        } else {
            let now = unix_nanos(SystemTime::now()) / 1_000_000_000;
            let age = Duration::from_secs((now - self.oldest_unix_seconds).max(0) as u64);
            format!("{} ago", humantime::format_duration(age))
        };
        let incarnation = if self.incarnation.is_empty() {
            "- (created before incarnations)"
        } else {
            &self.incarnation
        };
        format!(
            "buffer        {}\n\
             incarnation   {incarnation}\n\
             backlog       {} results\n\
             oldest        {oldest}\n\
             stored bytes  {}\n\
             size on disk  {}\n\
             dropped       {}\n\
             quarantined   {}\n\
             acked seq     {}\n\
             next seq      {}\n",
            buffer_dir(dir).display(),
            self.backlog,
            self.bytes,
            self.size_on_disk,
            self.dropped,
            self.quarantined,
            self.acked,
            self.next_seq
        )
    }
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
    /// Opens (or creates) the buffer under `state_dir`, finishing a renumbering a crash
    /// interrupted.
    pub fn open(state_dir: &Path, max_bytes: u64) -> Result<Buffer, BufferError> {
        std::fs::create_dir_all(state_dir).map_err(|source| BufferError::CreateDir {
            path: state_dir.display().to_string(),
            source,
        })?;
        let path = buffer_dir(state_dir);
        let shown = path.display().to_string();
        let existed = std::fs::metadata(path.join("db")).is_ok_and(|m| m.len() > 0);
        // sled reports its lock as an ErrorKind::Other error with a formatted message, so
        // a running agent is detected here, with the same lock sled takes, before sled
        // could be mistaken for a corrupt directory.
        // A lock that goes away within LOCK_GRACE is this process's own buffer, closed a
        // moment ago: sled's flusher thread holds the file until its next tick.
        let since = std::time::Instant::now();
        while locked_by_another(&path.join("db")) {
            if since.elapsed() >= LOCK_GRACE {
                return Err(BufferError::Locked { path: shown });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let db = sled_config(&path)
            .open()
            .map_err(|source| open_error(&shown, source))?;
        // Fail early, with the path, on a directory sled opened but cannot read, and
        // refuse one it opened as empty although it held a buffer: sled recovers some
        // corruptions by starting over, which would silently lose the backlog.
        let io_error = |source| open_error(&shown, source);
        let incarnation = match db.get(NEXT_SEQ).map_err(io_error)? {
            Some(_) => db
                .get(INCARNATION)
                .map_err(io_error)?
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_default(),
            None if existed => {
                return Err(BufferError::Corrupt {
                    path: shown,
                    reason: "it holds no edgeprobe data although it existed (reset or corrupted)"
                        .into(),
                })
            }
            None => {
                let incarnation = format!("{:032x}", rand::random::<u128>());
                let mut batch = sled::Batch::default();
                batch.insert(NEXT_SEQ, &1u64.to_be_bytes());
                batch.insert(INCARNATION, incarnation.as_bytes());
                db.apply_batch(batch).map_err(io_error)?;
                db.flush().map_err(io_error)?;
                incarnation
            }
        };
        let chunking = Chunking::from_env();
        if let Some(journal) = Renumber::read(&db).map_err(io_error)? {
            tracing::info!(
                committed_seq = journal.committed,
                "finishing a renumbering interrupted by a crash"
            );
            journal.finish(&db, chunking).map_err(io_error)?;
            db.flush().map_err(io_error)?;
            tracing::info!(
                next_seq = read_u64(&db, NEXT_SEQ).map_err(io_error)?,
                "renumbering finished"
            );
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
            incarnation,
            chunking,
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
        let mut rewrites: VecDeque<RewriteJob> = VecDeque::new();
        loop {
            // With a rewrite in progress, serve what is queued and go on with it one chunk
            // at a time; otherwise wait for a command.
            let first = if rewrites.is_empty() {
                match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => break,
                }
            } else {
                match rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(std_mpsc::TryRecvError::Empty) => None,
                    Err(std_mpsc::TryRecvError::Disconnected) => break,
                }
            };
            if let Some(first) = first {
                self.serve(first, &rx, &mut rewrites);
            }
            if let Some(job) = rewrites.front_mut() {
                match self.rewrite_chunk(job) {
                    Ok(false) => {}
                    Ok(true) => self.end_rewrite(rewrites.pop_front().expect("front"), Ok(())),
                    Err(e) => self.end_rewrite(rewrites.pop_front().expect("front"), Err(e)),
                }
            }
        }
    }

    /// Serves `first` and whatever else is queued already, appends as one group commit.
    fn serve(
        &mut self,
        first: Command,
        rx: &std_mpsc::Receiver<Command>,
        rewrites: &mut VecDeque<RewriteJob>,
    ) {
        let mut appends = Vec::new();
        let mut acks = Vec::new();
        let mut reconciles = Vec::new();
        let mut next = Some(first);
        while let Some(c) = next.take() {
            match c {
                Command::Append(p, tx) => appends.push((p, tx)),
                Command::Ack(seq, quarantined, tx) => acks.push((seq, quarantined, tx)),
                Command::Reconcile(seq, tx) => reconciles.push((seq, tx)),
                Command::Rewrite(job) => rewrites.push_back(job),
            }
            if appends.len() < GROUP_MAX {
                next = rx.try_recv().ok();
            }
        }
        if !appends.is_empty() {
            self.append_all(appends);
        }
        if !reconciles.is_empty() {
            // A renumbering moves seqs under a rewrite's cursor: finish rewrites first.
            while let Some(mut job) = rewrites.pop_front() {
                let result = loop {
                    match self.rewrite_chunk(&mut job) {
                        Ok(false) => {}
                        Ok(true) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                };
                self.end_rewrite(job, result);
            }
        }
        for (committed, tx) in reconciles {
            let _ = tx.send(self.reconcile(committed));
        }
        if let Some(upto) = acks.iter().map(|(s, _, _)| *s).max() {
            let quarantined = acks.iter().map(|(_, q, _)| *q).sum();
            let result = self.delete_upto(upto, quarantined);
            for (_, _, tx) in acks {
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

    fn append_all(&mut self, appends: Vec<AppendRequest>) {
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

    /// Rewrites the next chunk of a rewrite job in one atomic batch (payloads and the byte
    /// count together). True when the job has looked at every stored result.
    fn rewrite_chunk(&self, job: &mut RewriteJob) -> Result<bool, BufferError> {
        let t = &self.inner.tree;
        let chunk = self.inner.chunking.results;
        if !job.started {
            tracing::info!("{} of {} results", job.what, job.expected);
            job.started = true;
        }
        let start = result_key(job.after.saturating_add(1));
        let mut batch = sled::Batch::default();
        let mut bytes = read_u64(t, BYTES).map_err(|e| self.io(e))?;
        let (mut seen, mut changed, mut last) = (0, 0, job.after);
        for item in t.range(start.as_slice()..RESULTS_END).take(chunk) {
            let (k, v) = item.map_err(|e| self.io(e))?;
            seen += 1;
            last = key_seq(&k);
            if let Some(payload) = (job.f)(&v[8.min(v.len())..]) {
                let mut value = Vec::with_capacity(8 + payload.len());
                value.extend_from_slice(&v[..8.min(v.len())]);
                value.extend_from_slice(&payload);
                bytes = bytes.saturating_sub(stored_size(&v)) + stored_size(&value);
                batch.insert(k, value);
                changed += 1;
            }
        }
        if changed > 0 {
            batch.insert(BYTES, &bytes.to_be_bytes());
            t.apply_batch(batch).map_err(|e| self.io(e))?;
        }
        job.after = last;
        job.done += changed;
        let finished = seen < chunk;
        if !finished {
            self.inner.chunking.after_chunk();
        }
        Ok(finished)
    }

    fn end_rewrite(&self, job: RewriteJob, result: Result<(), BufferError>) {
        let result = result.and_then(|()| {
            self.inner.tree.flush().map_err(|e| self.io(e))?;
            Ok(job.done)
        });
        match &result {
            Ok(n) => tracing::info!("{}: done, {n} results rewritten", job.what),
            Err(e) => tracing::warn!("{}: stopped after {} results: {e}", job.what, job.done),
        }
        let _ = job.tx.send(result);
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
            return self.delete_upto(committed, 0);
        }
        let pending = read_u64(t, COUNT).map_err(|e| self.io(e))?;
        tracing::warn!(
            committed_seq = committed,
            local_next_seq = next,
            "the collector already holds results with seqs this buffer never assigned \
             (state directory restored from a copy?); renumbering pending results after {committed}"
        );
        tracing::info!("renumbering {pending} pending results after seq {committed}");
        if let Some(journal) = Renumber::begin(t, committed).map_err(|e| self.io(e))? {
            journal
                .finish(t, self.inner.chunking)
                .map_err(|e| self.io(e))?;
        }
        t.flush().map_err(|e| self.io(e))?;
        let next = read_u64(t, NEXT_SEQ).map_err(|e| self.io(e))?.max(1);
        self.inner.appended.send_replace(next - 1);
        tracing::info!(next_seq = next, "renumbered {pending} pending results");
        Ok(())
    }

    /// Deletes results with seq <= upto in bounded chunks; counts `quarantined` in the
    /// first batch.
    fn delete_upto(&self, upto: u64, quarantined: u64) -> Result<(), BufferError> {
        let t = &self.inner.tree;
        let end = result_key(upto.saturating_add(1));
        let mut quarantined = quarantined;
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
            if quarantined > 0 {
                let total = read_u64(t, QUARANTINED).map_err(|e| self.io(e))? + quarantined;
                batch.insert(QUARANTINED, &total.to_be_bytes());
                quarantined = 0;
            }
            t.apply_batch(batch).map_err(|e| self.io(e))?;
            if n < DELETE_CHUNK {
                return Ok(());
            }
        }
    }
}

/// The journal of a renumbering: results with seq < `old_next` move to seq + `offset`,
/// which puts the lowest right after `committed`. The old and new ranges are disjoint, so
/// moving a result twice is impossible and a half-done renumbering can be finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Renumber {
    committed: u64,
    offset: u64,
    old_next: u64,
}

impl Renumber {
    fn read(t: &sled::Tree) -> Result<Option<Renumber>, sled::Error> {
        Ok(t.get(RENUMBER)?.and_then(|v| {
            let word = |i: usize| -> Option<u64> {
                Some(u64::from_be_bytes(
                    v.get(i * 8..i * 8 + 8)?.try_into().ok()?,
                ))
            };
            Some(Renumber {
                committed: word(0)?,
                offset: word(1)?,
                old_next: word(2)?,
            })
        }))
    }

    /// Starts renumbering after `committed` (>= the next seq): writes the journal in its
    /// own batch. With nothing stored, sets the next seq at once and returns `None`.
    fn begin(t: &sled::Tree, committed: u64) -> Result<Option<Renumber>, sled::Error> {
        let old_next = read_u64(t, NEXT_SEQ)?.max(1);
        let lowest = match t.range(RESULTS_START..RESULTS_END).next() {
            Some(item) => Some(key_seq(&item?.0)),
            None => None,
        };
        let Some(lowest) = lowest else {
            let mut batch = sled::Batch::default();
            batch.insert(NEXT_SEQ, &(committed + 1).to_be_bytes());
            batch.insert(ACKED, &committed.to_be_bytes());
            t.apply_batch(batch)?;
            return Ok(None);
        };
        let journal = Renumber {
            committed,
            offset: committed + 1 - lowest,
            old_next,
        };
        let mut value = Vec::with_capacity(24);
        for word in [journal.committed, journal.offset, journal.old_next] {
            value.extend_from_slice(&word.to_be_bytes());
        }
        t.insert(RENUMBER, value)?;
        Ok(Some(journal))
    }

    /// Moves up to `chunk` results in one batch; the batch that finds fewer also removes
    /// the journal and sets the next seq. True when done.
    fn step(&self, t: &sled::Tree, chunk: usize) -> Result<bool, sled::Error> {
        let mut batch = sled::Batch::default();
        let end = result_key(self.old_next);
        let mut moved = 0;
        for item in t.range(RESULTS_START..end.as_slice()).take(chunk) {
            let (k, v) = item?;
            batch.insert(result_key(key_seq(&k) + self.offset).as_slice(), v);
            batch.remove(k);
            moved += 1;
        }
        let done = moved < chunk;
        if done {
            batch.remove(RENUMBER);
            batch.insert(NEXT_SEQ, &(self.old_next + self.offset).to_be_bytes());
            let acked = read_u64(t, ACKED)?.max(self.committed);
            batch.insert(ACKED, &acked.to_be_bytes());
        }
        t.apply_batch(batch)?;
        Ok(done)
    }

    fn finish(&self, t: &sled::Tree, chunking: Chunking) -> Result<(), sled::Error> {
        while !self.step(t, chunking.results)? {
            chunking.after_chunk();
        }
        Ok(())
    }
}

/// The sled settings of the buffer (the same on every open).
fn sled_config(path: &Path) -> sled::Config {
    sled::Config::new()
        .path(path)
        .cache_capacity(8 * 1024 * 1024)
        .mode(sled::Mode::LowSpace)
}

/// True when another process holds the lock sled takes on its data file (an exclusive
/// flock): a running agent. Taken and released at once, before sled takes it for real.
fn locked_by_another(db_file: &Path) -> bool {
    use fs2::FileExt;
    let Ok(file) = File::open(db_file) else {
        return false;
    };
    match file.try_lock_exclusive() {
        Ok(()) => {
            let _ = FileExt::unlock(&file);
            false
        }
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    }
}

/// Sorts what sled says when opening: its lock (a running agent won the race with
/// `locked_by_another`), a corrupt directory (the only case where moving it aside is the
/// advice), or any other I/O trouble (permissions, ...), which is not the data's fault.
fn open_error(path: &str, source: sled::Error) -> BufferError {
    let path = path.to_string();
    match &source {
        sled::Error::Io(io)
            if io.kind() == std::io::ErrorKind::WouldBlock
                || io.to_string().contains("could not acquire lock") =>
        {
            BufferError::Locked { path }
        }
        sled::Error::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            BufferError::Corrupt {
                path,
                reason: source.to_string(),
            }
        }
        sled::Error::Corruption { .. } | sled::Error::ReportableBug(_) => BufferError::Corrupt {
            path,
            reason: source.to_string(),
        },
        _ => BufferError::Open { path, source },
    }
}

fn key_seq(key: &[u8]) -> u64 {
    key.get(1..9)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
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
            assert!(b
                .stats()
                .render(dir.path())
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
