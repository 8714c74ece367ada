//! The writer thread: the one owner of every mutation (appends with group commit, the
//! byte cap and disk reserve with drop-oldest, chunked deletes on ack, reconcile and
//! renumbering, rewrites one chunk at a time).

use super::*;

/// Removes per sled batch when deleting acked results. sled applies a batch under a lock
/// that stops every reader (and appender) of the tree until it is done, so acked ranges
/// are deleted in small batches: the uplink's reads of the next results interleave
/// instead of waiting for a whole range to go.
pub(super) const DELETE_CHUNK: usize = 1_000;
/// Appends folded into one group commit at most.
const GROUP_MAX: usize = 10_000;
/// Free space kept on the buffer's filesystem. Below it the buffer stops growing and drops
/// its oldest results instead: sled cannot recover from a write that hits a full disk.
const DISK_RESERVE: u64 = 16 << 20;

pub(super) struct Writer {
    pub(super) inner: Arc<Inner>,
    pub(super) data_file: File,
    pub(super) max_bytes: u64,
    /// Results dropped in the current run of full-buffer appends (logged once per burst).
    pub(super) burst: u64,
    /// Results lost in the current run of failed writes (logged once per burst).
    pub(super) failed_burst: u64,
}

impl Writer {
    pub(super) fn run(mut self, rx: std_mpsc::Receiver<Command>) {
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
