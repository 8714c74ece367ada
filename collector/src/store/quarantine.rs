//! Rows PostgreSQL refuses (SQLSTATE class 22 or 23): COPYed range by range under
//! savepoints, failing ranges halved down to the offending rows, which go to
//! `rejected_results` with their SQLSTATE while everything else commits.

use super::results::*;
use super::*;
use crate::pg::{classify, ErrorClass};

pub(super) fn permanent(e: &tokio_postgres::Error) -> Option<(String, String)> {
    match classify(e) {
        ErrorClass::Permanent => e
            .as_db_error()
            .map(|db| (db.code().code().to_string(), db.message().to_string())),
        ErrorClass::Transient => None,
    }
}

/// COPYs `rows[i]` (with its `path_changed[i]`) for each i of `candidates` (in order),
/// each range under a savepoint;
/// a range PostgreSQL refuses for its data is rolled back and halved until the offending
/// rows are alone. Returns them as (index, SQLSTATE, message); the others are written.
pub(super) async fn copy_isolating(
    tx: &Transaction<'_>,
    rows: &[&ResultRow],
    path_changed: &[Option<bool>],
    candidates: &[usize],
) -> Result<Vec<(usize, String, String)>, tokio_postgres::Error> {
    let mut refused = Vec::new();
    let mut ranges = vec![candidates];
    while let Some(range) = ranges.pop() {
        if range.is_empty() {
            continue;
        }
        tx.batch_execute("SAVEPOINT edgeprobe_rows").await?;
        match copy_rows(tx, range.iter().map(|&i| (rows[i], path_changed[i]))).await {
            Ok(()) => tx.batch_execute("RELEASE SAVEPOINT edgeprobe_rows").await?,
            Err(e) => {
                let Some((sqlstate, message)) = permanent(&e) else {
                    return Err(e);
                };
                tx.batch_execute(
                    "ROLLBACK TO SAVEPOINT edgeprobe_rows; RELEASE SAVEPOINT edgeprobe_rows",
                )
                .await?;
                if let [i] = range {
                    refused.push((*i, sqlstate, message));
                } else {
                    // The first half is written first: rows go in in seq order.
                    let (first, second) = range.split_at(range.len() / 2);
                    ranges.push(second);
                    ranges.push(first);
                }
            }
        }
    }
    Ok(refused)
}

/// Indexes of `rows` whose primary key (agent, test, start, seq) is already stored: a
/// redelivery after the watermark row went missing. Unknown (none) when the lookup itself
/// fails for the data (e.g. a name the database's encoding cannot hold).
pub(super) async fn stored_rows(
    tx: &Transaction<'_>,
    rows: &[&ResultRow],
) -> Result<HashSet<usize>, tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(HashSet::new());
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.agent_id.as_str()).collect();
    let tests: Vec<&str> = rows.iter().map(|r| r.test.as_str()).collect();
    let starts: Vec<SystemTime> = rows.iter().map(|r| r.started_at).collect();
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    tx.batch_execute("SAVEPOINT edgeprobe_lookup").await?;
    let found = tx
        .query(
            "SELECT v.i FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int8[])
                     WITH ORDINALITY AS v(agent_id, test, started_at, seq, i)
              WHERE EXISTS (SELECT 1 FROM results r
                             WHERE r.agent_id = v.agent_id AND r.test = v.test
                               AND r.started_at = v.started_at AND r.seq = v.seq)",
            &[&ids, &tests, &starts, &seqs],
        )
        .await;
    match found {
        Ok(found) => {
            tx.batch_execute("RELEASE SAVEPOINT edgeprobe_lookup")
                .await?;
            Ok(found
                .iter()
                .map(|r| r.get::<_, i64>(0) as usize - 1)
                .collect())
        }
        Err(e) if permanent(&e).is_some() => {
            tx.batch_execute(
                "ROLLBACK TO SAVEPOINT edgeprobe_lookup; RELEASE SAVEPOINT edgeprobe_lookup",
            )
            .await?;
            Ok(HashSet::new())
        }
        Err(e) => Err(e),
    }
}

/// Counts the results that were in the quarantine already (a redelivery after the
/// watermark went missing) as duplicates.
pub(super) fn already_quarantined(
    outcomes: &mut [Outcome],
    items: &[(usize, Cow<'_, Rejected>)],
    inserted: &HashSet<(usize, i64)>,
) {
    for (b, q) in items {
        if !inserted.contains(&(*b, q.seq)) {
            outcomes[*b].quarantined -= 1;
            outcomes[*b].duplicates += 1;
        }
    }
}

/// Quarantines results of `batches` (by index); one already there (a redelivery) stays as
/// it was. Returns the (batch index, seq) inserted. `ascii` escapes non-ASCII in the
/// reasons, for a database whose encoding cannot hold them.
pub(super) async fn insert_quarantine(
    tx: &Transaction<'_>,
    batches: &[&Batch],
    items: &[(usize, Cow<'_, Rejected>)],
    ascii: bool,
) -> Result<HashSet<(usize, i64)>, tokio_postgres::Error> {
    let ids: Vec<&str> = items
        .iter()
        .map(|(b, _)| batches[*b].agent_id.as_str())
        .collect();
    let incarnations: Vec<&str> = items
        .iter()
        .map(|(b, _)| &*batches[*b].incarnation)
        .collect();
    let seqs: Vec<i64> = items.iter().map(|(_, q)| q.seq).collect();
    let reasons: Vec<Cow<str>> = items
        .iter()
        .map(|(_, q)| match ascii {
            true => Cow::Owned(escape_non_ascii(&q.reason)),
            false => Cow::Borrowed(q.reason.as_str()),
        })
        .collect();
    let reasons: Vec<&str> = reasons.iter().map(|r| r.as_ref()).collect();
    let sqlstates: Vec<Option<&str>> = items.iter().map(|(_, q)| q.sqlstate.as_deref()).collect();
    let raws: Vec<&[u8]> = items.iter().map(|(_, q)| q.raw.as_slice()).collect();
    let formats: Vec<&str> = items.iter().map(|(_, q)| q.raw_format.name()).collect();
    let truncated: Vec<bool> = items.iter().map(|(_, q)| q.raw_truncated).collect();
    let inserted = tx
        .query(
            "INSERT INTO rejected_results
                 (agent_id, incarnation, seq, reason, sqlstate, raw, raw_format, raw_truncated)
             SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[],
                                  $6::bytea[], $7::text[], $8::bool[])
             ON CONFLICT DO NOTHING
             RETURNING agent_id, incarnation, seq",
            &[
                &ids,
                &incarnations,
                &seqs,
                &reasons,
                &sqlstates,
                &raws,
                &formats,
                &truncated,
            ],
        )
        .await?;
    let inserted: HashSet<(String, String, i64)> = inserted
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    Ok(items
        .iter()
        .map(|(b, q)| (*b, q.seq))
        .filter(|(b, seq)| {
            let b = batches[*b];
            inserted.contains(&(b.agent_id.clone(), b.incarnation.to_string(), *seq))
        })
        .collect())
}

/// `insert_quarantine` that survives reasons the database cannot encode: they are
/// stored again with non-ASCII escaped.
pub(super) async fn quarantine_guarded(
    tx: &Transaction<'_>,
    batches: &[&Batch],
    items: &[(usize, Cow<'_, Rejected>)],
) -> Result<HashSet<(usize, i64)>, tokio_postgres::Error> {
    if items.is_empty() {
        return Ok(HashSet::new());
    }
    tx.batch_execute("SAVEPOINT edgeprobe_quarantine").await?;
    match insert_quarantine(tx, batches, items, false).await {
        Ok(inserted) => {
            tx.batch_execute("RELEASE SAVEPOINT edgeprobe_quarantine")
                .await?;
            Ok(inserted)
        }
        Err(e) if permanent(&e).is_some() => {
            tx.batch_execute(
                "ROLLBACK TO SAVEPOINT edgeprobe_quarantine; RELEASE SAVEPOINT edgeprobe_quarantine",
            )
            .await?;
            insert_quarantine(tx, batches, items, true).await
        }
        Err(e) => Err(e),
    }
}

pub(super) fn escape_non_ascii(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            out.extend(c.escape_unicode());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_escape_to_ascii() {
        assert_eq!(
            escape_non_ascii("label `東京` ok"),
            "label `\\u{6771}\\u{4eac}` ok"
        );
        assert_eq!(escape_non_ascii("plain"), "plain");
    }
}
