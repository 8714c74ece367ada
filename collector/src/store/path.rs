//! `results.path_changed`, decided inside the results transaction (migration 0005).
//!
//! Invariants:
//! - A path result's `path_changed` says whether its `path_id` differs from that of the
//!   previous path result of the same agent and test, ordered by (started_at, seq); the
//!   first one is false. A result with no `path_id` (nothing answered) is false and is not
//!   what the next one is compared with: an outage is not two path changes.
//! - `path_last` holds, per agent and test, the latest (started_at, seq, path_id) stored.
//!   [`decide`] reads it `FOR UPDATE` in the transaction that stores the rows and
//!   [`remember`] raises it in the same transaction, after the COPY, from the rows that
//!   were inserted; a rolled-back transaction leaves it as it was. Only rows above the
//!   incarnation's watermark reach here, so a redelivered batch is never compared twice
//!   and never counted twice.
//! - Several results of one test in one batch (or one writer group) are compared with each
//!   other in (started_at, seq) order.
//! - A result older than the latest one stored for its test (it arrived late: a clock
//!   correction, another incarnation) is compared with the stored result just before it;
//!   the flag of the later, already stored result is not revisited.

use std::collections::HashMap;
use std::time::SystemTime;

use tokio_postgres::Transaction;

use crate::domain::{Kind, ResultRow};

type Key<'a> = (&'a str, &'a str);

/// Where a test's path stands: the (started_at, seq) of a result and its path id.
#[derive(Clone)]
struct Point {
    started_at: SystemTime,
    seq: i64,
    path_id: String,
}

impl Point {
    fn before(&self, r: &ResultRow) -> bool {
        (self.started_at, self.seq) < (r.started_at, r.seq)
    }

    fn before_point(&self, other: &Point) -> bool {
        (self.started_at, self.seq) < (other.started_at, other.seq)
    }
}

fn path_id(r: &ResultRow) -> Option<&str> {
    match r.kind {
        Kind::Path => r.measures.path_id.as_deref(),
        _ => None,
    }
}

/// `path_changed` of each row (NULL for other kinds), in the order of `rows`.
pub(super) async fn decide(
    tx: &Transaction<'_>,
    rows: &[&ResultRow],
) -> Result<Vec<Option<bool>>, tokio_postgres::Error> {
    let mut changed: Vec<Option<bool>> = rows
        .iter()
        .map(|r| (r.kind == Kind::Path).then_some(false))
        .collect();
    let mut order: Vec<usize> = (0..rows.len())
        .filter(|&i| path_id(rows[i]).is_some())
        .collect();
    if order.is_empty() {
        return Ok(changed);
    }
    order.sort_by(|&a, &b| {
        let (a, b) = (rows[a], rows[b]);
        (&a.agent_id, &a.test, a.started_at, a.seq).cmp(&(
            &b.agent_id,
            &b.test,
            b.started_at,
            b.seq,
        ))
    });
    // Sorted, as `order` is.
    let mut keys: Vec<Key> = order
        .iter()
        .map(|&i| (rows[i].agent_id.as_str(), rows[i].test.as_str()))
        .collect();
    keys.dedup();
    let (agents, tests): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
    let mut latest: HashMap<Key, Point> = HashMap::new();
    for row in tx
        .query(
            "SELECT agent_id, test, started_at, seq, path_id FROM path_last
              WHERE (agent_id, test) IN (SELECT * FROM unnest($1::text[], $2::text[]))
              ORDER BY agent_id, test FOR UPDATE",
            &[&agents, &tests],
        )
        .await?
    {
        let (agent, test): (&str, &str) = (row.get(0), row.get(1));
        let Ok(at) = keys.binary_search(&(agent, test)) else {
            continue;
        };
        latest.insert(
            keys[at],
            Point {
                started_at: row.get(2),
                seq: row.get(3),
                path_id: row.get(4),
            },
        );
    }
    // Rows older than the stored latest, compared with what came just before them.
    let mut late: HashMap<Key, Point> = HashMap::new();
    for i in order {
        let r = rows[i];
        let id = path_id(r).expect("filtered above");
        let k: Key = (&r.agent_id, &r.test);
        let point = Point {
            started_at: r.started_at,
            seq: r.seq,
            path_id: id.to_string(),
        };
        match latest.get(&k) {
            None => {
                latest.insert(k, point);
            }
            Some(last) if last.before(r) => {
                changed[i] = Some(last.path_id != id);
                latest.insert(k, point);
            }
            Some(_) => {
                let stored = stored_before(tx, r).await?;
                let previous = match (stored, late.get(&k)) {
                    (Some(s), Some(l)) => Some(if s.before_point(l) { l.clone() } else { s }),
                    (s, l) => s.or_else(|| l.cloned()),
                };
                changed[i] = Some(previous.is_some_and(|p| p.path_id != id));
                late.insert(k, point);
            }
        }
    }
    Ok(changed)
}

/// The stored path result of `r`'s agent and test just before it.
async fn stored_before(
    tx: &Transaction<'_>,
    r: &ResultRow,
) -> Result<Option<Point>, tokio_postgres::Error> {
    Ok(tx
        .query_opt(
            "SELECT started_at, seq, path_id FROM results
              WHERE agent_id = $1 AND test = $2 AND kind = 'path' AND path_id IS NOT NULL
                AND (started_at, seq) < ($3, $4)
              ORDER BY started_at DESC, seq DESC LIMIT 1",
            &[&r.agent_id, &r.test, &r.started_at, &r.seq],
        )
        .await?
        .map(|row| Point {
            started_at: row.get(0),
            seq: row.get(1),
            path_id: row.get(2),
        }))
}

/// Raises `path_last` to the latest of the `inserted` rows of each test.
pub(super) async fn remember(
    tx: &Transaction<'_>,
    inserted: &[&ResultRow],
) -> Result<(), tokio_postgres::Error> {
    let mut newest: HashMap<Key, &ResultRow> = HashMap::new();
    for r in inserted.iter().copied().filter(|r| path_id(r).is_some()) {
        let e = newest.entry((&r.agent_id, &r.test)).or_insert(r);
        if (e.started_at, e.seq) < (r.started_at, r.seq) {
            *e = r;
        }
    }
    if newest.is_empty() {
        return Ok(());
    }
    let mut rows: Vec<&ResultRow> = newest.into_values().collect();
    // Upserts in key order, as the FOR UPDATE above locks: no deadlock between writers.
    rows.sort_by(|a, b| (&a.agent_id, &a.test).cmp(&(&b.agent_id, &b.test)));
    let agents: Vec<&str> = rows.iter().map(|r| r.agent_id.as_str()).collect();
    let tests: Vec<&str> = rows.iter().map(|r| r.test.as_str()).collect();
    let starts: Vec<SystemTime> = rows.iter().map(|r| r.started_at).collect();
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    let ids: Vec<&str> = rows.iter().filter_map(|r| path_id(r)).collect();
    tx.execute(
        "INSERT INTO path_last AS l (agent_id, test, started_at, seq, path_id)
         SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int8[], $5::text[])
         ON CONFLICT (agent_id, test) DO UPDATE
            SET started_at = excluded.started_at, seq = excluded.seq, path_id = excluded.path_id
          WHERE (l.started_at, l.seq) < (excluded.started_at, excluded.seq)",
        &[&agents, &tests, &starts, &seqs, &ids],
    )
    .await?;
    Ok(())
}
