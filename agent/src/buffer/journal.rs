//! The renumbering journal (module doc of `buffer`: every multi-step change is safe across
//! a crash).

use super::*;

/// The journal of a renumbering: results with seq < `old_next` move to seq + `offset`,
/// which puts the lowest right after `committed`. The old and new ranges are disjoint, so
/// moving a result twice is impossible and a half-done renumbering can be finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Renumber {
    pub(super) committed: u64,
    pub(super) offset: u64,
    pub(super) old_next: u64,
}

impl Renumber {
    pub(super) fn read(t: &sled::Tree) -> Result<Option<Renumber>, sled::Error> {
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
    pub(super) fn begin(t: &sled::Tree, committed: u64) -> Result<Option<Renumber>, sled::Error> {
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
    pub(super) fn step(&self, t: &sled::Tree, chunk: usize) -> Result<bool, sled::Error> {
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

    pub(super) fn finish(&self, t: &sled::Tree, chunking: Chunking) -> Result<(), sled::Error> {
        while !self.step(t, chunking.results)? {
            chunking.after_chunk();
        }
        Ok(())
    }
}
