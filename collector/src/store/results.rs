//! The results transaction: lock the incarnations in a fixed order, keep only rows above
//! each watermark, COPY them, raise the watermarks and commit (module doc of `store`:
//! exactly-once per agent and incarnation).

use super::path;
use super::quarantine::*;
use super::*;
use crate::pg::copy as pgcopy;

/// What one batch of a committed transaction did.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    pub(super) committed_seq: i64,
    /// Index of the first row of the batch above the old watermark.
    pub(super) fresh_from: usize,
    pub(super) inserted: u64,
    pub(super) duplicates: u64,
    pub(super) quarantined: u64,
    pub(super) refused: Vec<(i64, String)>,
    /// Seqs above the old watermark that were not inserted (refused or already stored).
    pub(super) skipped: HashSet<i64>,
    /// Seqs of the inserted path results whose path changed (`results.path_changed`).
    pub(super) path_changes: Vec<i64>,
}

pub(super) type Key = (String, String);

pub(super) fn key(b: &Batch) -> Key {
    (b.agent_id.clone(), b.incarnation.to_string())
}

/// One transaction for several batches (of one or more agents). Returns one `Outcome`
/// per batch, in order. With `isolate`, rows PostgreSQL refuses are found and quarantined
/// instead of failing the transaction (slower: savepoints and one COPY per row range).
pub(super) async fn write_group(
    client: &mut Client,
    batches: &[&Batch],
    isolate: bool,
) -> Result<Vec<Outcome>, tokio_postgres::Error> {
    let mut keys: Vec<Key> = batches.iter().map(|b| key(b)).collect();
    keys.sort_unstable();
    keys.dedup();

    let tx = client.transaction().await?;
    let mut committed = lock_incarnations(&tx, &keys).await?;
    if committed.len() < keys.len() {
        // Watermark rows removed by an operator since hello: recreate them at 0.
        recreate_incarnations(&tx, &keys).await?;
        committed = lock_incarnations(&tx, &keys).await?;
    }
    let before = committed.clone();

    let mut outcomes = Vec::with_capacity(batches.len());
    let mut fresh: Vec<(usize, &ResultRow)> = Vec::new();
    // (index of the batch, result) to quarantine.
    let mut quarantine: Vec<(usize, Cow<Rejected>)> = Vec::new();
    for (i, b) in batches.iter().enumerate() {
        let watermark = committed.get_mut(&key(b)).expect("locked above");
        let fresh_from = b.rows.partition_point(|r| r.seq <= *watermark);
        fresh.extend(b.rows[fresh_from..].iter().map(|r| (i, r)));
        let before_quarantine = quarantine.len();
        quarantine.extend(
            b.rejected
                .iter()
                .filter(|q| q.seq > *watermark)
                .map(|q| (i, Cow::Borrowed(q))),
        );
        let quarantined = quarantine.len() - before_quarantine;
        *watermark = (*watermark).max(b.last_seq);
        outcomes.push(Outcome {
            committed_seq: *watermark,
            fresh_from,
            inserted: (b.rows.len() - fresh_from) as u64,
            duplicates: (fresh_from + b.rejected.len() - quarantined) as u64,
            quarantined: quarantined as u64,
            ..Default::default()
        });
    }

    if isolate {
        let rows: Vec<&ResultRow> = fresh.iter().map(|(_, r)| *r).collect();
        let stored = stored_rows(&tx, &rows).await?;
        let candidates: Vec<usize> = (0..rows.len()).filter(|i| !stored.contains(i)).collect();
        let chosen: Vec<&ResultRow> = candidates.iter().map(|&i| rows[i]).collect();
        let mut changed = vec![None; rows.len()];
        for (&i, c) in candidates.iter().zip(path::decide(&tx, &chosen).await?) {
            changed[i] = c;
        }
        let refused = copy_isolating(&tx, &rows, &changed, &candidates).await?;
        let refused_at: HashSet<usize> = refused.iter().map(|(i, _, _)| *i).collect();
        let inserted: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|i| !refused_at.contains(i))
            .collect();
        let kept: Vec<&ResultRow> = inserted.iter().map(|&i| rows[i]).collect();
        path::remember(&tx, &kept).await?;
        for i in inserted {
            if changed[i] == Some(true) {
                let (b, r) = fresh[i];
                outcomes[b].path_changes.push(r.seq);
            }
        }
        for i in stored {
            let (b, r) = fresh[i];
            let o = &mut outcomes[b];
            o.inserted -= 1;
            o.duplicates += 1;
            o.skipped.insert(r.seq);
        }
        for (i, sqlstate, message) in refused {
            let (b, r) = fresh[i];
            let o = &mut outcomes[b];
            o.inserted -= 1;
            o.skipped.insert(r.seq);
            if sqlstate == SqlState::UNIQUE_VIOLATION.code() {
                o.duplicates += 1;
                continue;
            }
            let q = Rejected::of_row(r, &sqlstate, &message);
            o.quarantined += 1;
            o.refused.push((r.seq, q.reason.clone()));
            quarantine.push((b, Cow::Owned(q)));
        }
        let inserted = quarantine_guarded(&tx, batches, &quarantine).await?;
        already_quarantined(&mut outcomes, &quarantine, &inserted);
    } else {
        if !quarantine.is_empty() {
            let inserted = insert_quarantine(&tx, batches, &quarantine, false).await?;
            already_quarantined(&mut outcomes, &quarantine, &inserted);
        }
        if !fresh.is_empty() {
            let rows: Vec<&ResultRow> = fresh.iter().map(|(_, r)| *r).collect();
            let changed = path::decide(&tx, &rows).await?;
            copy_rows(&tx, rows.iter().copied().zip(changed.iter().copied())).await?;
            path::remember(&tx, &rows).await?;
            for ((b, r), c) in fresh.iter().zip(changed) {
                if c == Some(true) {
                    outcomes[*b].path_changes.push(r.seq);
                }
            }
        }
    }

    let mut quarantined: HashMap<Key, i64> = HashMap::new();
    for (b, o) in batches.iter().zip(&outcomes) {
        *quarantined.entry(key(b)).or_default() += o.quarantined as i64;
    }
    let moved: Vec<(&Key, i64, i64)> = committed
        .iter()
        .map(|(k, seq)| (k, *seq, quarantined.get(k).copied().unwrap_or(0)))
        .filter(|(k, seq, q)| *q > 0 || before.get(*k).is_some_and(|b| b < seq))
        .collect();
    if !moved.is_empty() {
        raise_watermarks(&tx, &moved).await?;
    }
    // COMMIT runs without the writers' statement_timeout: a cancelled wait for the
    // synchronous standby still commits (with a warning) and would be acknowledged.
    tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
    tx.commit().await?;
    Ok(outcomes)
}

pub(super) async fn lock_incarnations(
    tx: &Transaction<'_>,
    keys: &[Key],
) -> Result<HashMap<Key, i64>, tokio_postgres::Error> {
    let (ids, incarnations): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(a, i)| (a.as_str(), i.as_str())).unzip();
    Ok(tx
        .query(
            "SELECT agent_id, incarnation, committed_seq FROM agent_incarnations
              WHERE (agent_id, incarnation) IN (SELECT * FROM unnest($1::text[], $2::text[]))
              ORDER BY agent_id, incarnation FOR UPDATE",
            &[&ids, &incarnations],
        )
        .await?
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

pub(super) async fn recreate_incarnations(
    tx: &Transaction<'_>,
    keys: &[Key],
) -> Result<(), tokio_postgres::Error> {
    let (ids, incarnations): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(a, i)| (a.as_str(), i.as_str())).unzip();
    tx.execute(
        "WITH v AS (SELECT * FROM unnest($1::text[], $2::text[]) AS v(agent_id, incarnation)),
         agent AS (
             INSERT INTO agents (agent_id, incarnation)
             SELECT DISTINCT ON (agent_id) agent_id, incarnation FROM v
             ON CONFLICT DO NOTHING
         )
         INSERT INTO agent_incarnations (agent_id, incarnation)
         SELECT agent_id, incarnation FROM v ON CONFLICT DO NOTHING",
        &[&ids, &incarnations],
    )
    .await?;
    Ok(())
}

/// Raises the watermarks of (key, seq, quarantined): the incarnation's, and the agent's
/// when it is the agent's latest incarnation; adds the quarantined to `agents.rejected`.
pub(super) async fn raise_watermarks(
    tx: &Transaction<'_>,
    moved: &[(&Key, i64, i64)],
) -> Result<(), tokio_postgres::Error> {
    let ids: Vec<&str> = moved.iter().map(|(k, _, _)| k.0.as_str()).collect();
    let incarnations: Vec<&str> = moved.iter().map(|(k, _, _)| k.1.as_str()).collect();
    let seqs: Vec<i64> = moved.iter().map(|m| m.1).collect();
    let rejected: Vec<i64> = moved.iter().map(|m| m.2).collect();
    tx.execute(
        "WITH v AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[])
                 AS v(agent_id, incarnation, seq, rejected)
         ), inc AS (
             UPDATE agent_incarnations i SET committed_seq = v.seq, last_seen = now()
               FROM v
              WHERE i.agent_id = v.agent_id AND i.incarnation = v.incarnation
                AND i.committed_seq < v.seq
         ), per_agent AS (
             SELECT agent_id, array_agg(incarnation) AS incarnations, array_agg(seq) AS seqs,
                    sum(rejected)::int8 AS rejected
               FROM v GROUP BY agent_id
         )
         UPDATE agents a
            SET committed_seq = greatest(a.committed_seq, coalesce(
                    (SELECT max(u.seq) FROM unnest(p.incarnations, p.seqs) AS u(incarnation, seq)
                      WHERE u.incarnation = a.incarnation),
                    a.committed_seq)),
                rejected = a.rejected + p.rejected,
                last_seen = now()
           FROM per_agent p
          WHERE a.agent_id = p.agent_id",
        &[&ids, &incarnations, &seqs, &rejected],
    )
    .await?;
    Ok(())
}

/// COPYs rows, each with its `path_changed`, in one stream.
pub(super) async fn copy_rows<'a>(
    tx: &Transaction<'_>,
    rows: impl Iterator<Item = (&'a ResultRow, Option<bool>)>,
) -> Result<(), tokio_postgres::Error> {
    let sink = tx.copy_in::<_, Bytes>(pgcopy::COPY_SQL).await?;
    pin_mut!(sink);
    let mut encoder = pgcopy::Encoder::new();
    for (r, path_changed) in rows {
        if let Some(chunk) = encoder.row(r, path_changed) {
            sink.send(chunk).await?;
        }
    }
    sink.send(encoder.finish()).await?;
    sink.finish().await?;
    Ok(())
}
