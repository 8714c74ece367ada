//! The database schema: versioned migrations embedded in the binary, and the daily
//! partitions of `results` (created ahead, dropped past retention, the default partition
//! drained into them) without ever stalling ingest: see [`maintain_partitions`] and
//! docs/SCALING.md.
//!
//! Invariants: migrations are applied in order, each in its own transaction, under an
//! advisory lock so several collectors starting together apply each exactly once; an
//! applied migration is never edited (a change is a new file).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::Client;

/// (version, name, SQL), in order.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../migrations/0001_init.sql")),
    (
        2,
        "lean_indexes",
        include_str!("../migrations/0002_lean_indexes.sql"),
    ),
    (
        3,
        "never_stall",
        include_str!("../migrations/0003_never_stall.sql"),
    ),
    (
        4,
        "fleet_controller",
        include_str!("../migrations/0004_fleet_controller.sql"),
    ),
    (5, "path", include_str!("../migrations/0005_path.sql")),
    (
        6,
        "operator",
        include_str!("../migrations/0006_operator.sql"),
    ),
    (
        7,
        "responsiveness",
        include_str!("../migrations/0007_responsiveness.sql"),
    ),
    (8, "stamp", include_str!("../migrations/0008_stamp.sql")),
    (9, "links", include_str!("../migrations/0009_links.sql")),
];

/// Arbitrary constant identifying edgeprobe's migration lock.
const MIGRATION_LOCK: i64 = 0x6564_6765_7072_6f62;

/// Days of partitions created ahead of today.
const PARTITIONS_AHEAD: i64 = 3;

/// Applies pending migrations; returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, tokio_postgres::Error> {
    // PostgreSQL's NOTICEs ("already exists, skipping") are expected on every run and
    // would otherwise reach the log at INFO; warnings and errors still come through.
    client
        .batch_execute(
            "SET client_min_messages = warning;
             CREATE TABLE IF NOT EXISTS edgeprobe_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = apply(client).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    result
}

async fn apply(client: &mut Client) -> Result<Vec<i32>, tokio_postgres::Error> {
    let applied: Vec<i32> = client
        .query("SELECT version FROM edgeprobe_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut now = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO edgeprobe_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied migration");
        now.push(*version);
    }
    Ok(now)
}

/// The latest schema version this binary knows.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// How long one upkeep statement waits for a lock before it gives up. While a DDL waits for
/// its lock, every later lock request on the same table queues behind it (PostgreSQL grants
/// locks in order), so this is also the longest stall one attempt can cause ingest: short.
pub const LOCK_TIMEOUT: Duration = Duration::from_millis(500);

/// Attempts per upkeep step within one background round (backoff 1 s, 2 s, 4 s between
/// them); a step still blocked after them is left for the next round. Start-up makes one
/// attempt per step, so a long reader never delays the collector's readiness.
pub const ATTEMPTS: u32 = 4;

/// A client session whose transaction has held a lock on a table this long is taken for a
/// long reader (a dashboard query, a report): upkeep does not queue behind it at all.
/// Autovacuum is not counted: it cancels itself when a DDL waits for its table.
const LONG_HOLDER: &str = "1 second";

/// What one round of partition upkeep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Upkeep {
    /// Daily partitions created and attached.
    pub created: usize,
    /// Partitions detached and dropped past retention.
    pub dropped: usize,
    /// Rows moved from the default partition into their day's partition.
    pub drained: u64,
    /// Rows of the default partition deleted past retention.
    pub purged_default: u64,
    /// Steps left for the next round because a lock stayed taken.
    pub deferred: usize,
}

/// One round of partition upkeep. Creates the daily partitions from yesterday to
/// `PARTITIONS_AHEAD` days ahead, and a partition for every kept day that has rows in the
/// default partition (the rows are moved into it); given a retention, detaches and drops
/// partitions entirely older than it, deletes default-partition rows and quarantined
/// results older than it.
///
/// Never stalls ingest: every DDL runs under `lock_timeout` ([`LOCK_TIMEOUT`]) and is
/// retried with backoff; a step that needs a lock a long reader holds is not even queued.
/// New partitions are built as standalone tables and then attached (SHARE UPDATE EXCLUSIVE
/// on `results`, not ACCESS EXCLUSIVE). Detaching takes ACCESS EXCLUSIVE on `results`:
/// `DETACH ... CONCURRENTLY` is refused by PostgreSQL while a default partition exists, so
/// the detach is a short, lock-timed statement instead, tried only when no long reader
/// holds `results`; the `DROP` then touches only the detached table.
pub async fn maintain_partitions(
    client: &Client,
    retention: Option<Duration>,
    attempts: u32,
) -> Result<Upkeep, tokio_postgres::Error> {
    // Without the expected NOTICEs ("does not exist, skipping") of the IF [NOT] EXISTS
    // statements below.
    client
        .batch_execute(&format!(
            "SET client_min_messages = warning; SET lock_timeout = '{}ms'",
            LOCK_TIMEOUT.as_millis()
        ))
        .await?;
    let today = days_since_epoch(SystemTime::now());
    let oldest_kept = retention.map(|r| today - (r.as_secs() / 86_400) as i64);
    let mut up = Upkeep::default();
    let columns: String = client
        .query_one(
            "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute
              WHERE attrelid = 'results'::regclass AND attnum > 0 AND NOT attisdropped",
            &[],
        )
        .await?
        .get(0);

    // Days that need a partition: the window around today, and every kept day with rows in
    // the default partition (they can land there only while their day has no partition).
    let mut days: Vec<i64> = ((today - 1)..=(today + PARTITIONS_AHEAD)).collect();
    for row in client
        .query(
            "SELECT DISTINCT floor(extract(epoch FROM started_at) / 86400)::int8
               FROM results_default",
            &[],
        )
        .await?
    {
        let day: i64 = row.get(0);
        if day <= today + PARTITIONS_AHEAD && oldest_kept.is_none_or(|k| day >= k) {
            days.push(day);
        }
    }
    days.sort_unstable();
    days.dedup();
    for day in days {
        let name = partition_name(day);
        if is_partition(client, &name).await? {
            continue;
        }
        let (from, to) = (day_start(day), day_start(day + 1));
        // One transaction: the day's table is created (or a leftover reused), the day's
        // rows move out of the default partition, and the table is attached; a reader
        // sees the rows in exactly one place at any moment.
        let sql = format!(
            "BEGIN;
             CREATE TABLE IF NOT EXISTS {name}
                 (LIKE results INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING COMPRESSION);
             ALTER TABLE {name} DROP CONSTRAINT IF EXISTS {name}_range;
             ALTER TABLE {name} ADD CONSTRAINT {name}_range
                 CHECK (started_at >= '{from}' AND started_at < '{to}');
             WITH moved AS (
                 DELETE FROM results_default
                  WHERE started_at >= '{from}' AND started_at < '{to}'
                 RETURNING {columns})
             INSERT INTO {name} ({columns}) SELECT {columns} FROM moved;
             ALTER TABLE results ATTACH PARTITION {name} FOR VALUES FROM ('{from}') TO ('{to}');
             COMMIT;"
        );
        match with_retry(
            client,
            attempts,
            &name,
            &["results", "results_default"],
            &sql,
        )
        .await?
        {
            true => {
                let moved = client
                    .query_one(&format!("SELECT count(*) FROM {name}"), &[])
                    .await?
                    .get::<_, i64>(0) as u64;
                if moved > 0 {
                    tracing::info!(partition = %name, rows = moved, "created partition, moved its rows out of the default partition");
                }
                up.drained += moved;
                up.created += 1;
            }
            false => up.deferred += 1,
        }
    }

    let Some(oldest_kept) = oldest_kept else {
        return Ok(up);
    };
    let retention = retention.unwrap_or_default();
    // Partitions past retention, and tables a previous round detached but did not drop.
    let rows = client
        .query(
            "SELECT c.relname, c.relispartition FROM pg_class c
              WHERE c.relkind = 'r' AND c.relname ~ '^results_p[0-9]{8}$'
                AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'results'::regclass)",
            &[],
        )
        .await?;
    for row in rows {
        let name: String = row.get(0);
        let attached: bool = row.get(1);
        let Some(day) = parse_partition_day(&name) else {
            continue;
        };
        if day >= oldest_kept {
            continue;
        }
        if attached {
            let sql = format!("ALTER TABLE results DETACH PARTITION {name}");
            if !with_retry(client, attempts, &name, &["results", &name], &sql).await? {
                up.deferred += 1;
                continue;
            }
        }
        let sql = format!("DROP TABLE IF EXISTS {name}");
        if with_retry(client, attempts, &name, &[&name], &sql).await? {
            tracing::info!(partition = %name, "dropped partition past retention");
            up.dropped += 1;
        } else {
            up.deferred += 1;
        }
    }
    // The default partition and the quarantine follow the same retention.
    let purged = client
        .execute(
            "DELETE FROM results_default WHERE started_at < to_timestamp($1::float8)",
            &[&((oldest_kept * 86_400) as f64)],
        )
        .await?;
    if purged > 0 {
        tracing::info!(purged, "deleted default-partition results past retention");
    }
    up.purged_default = purged;
    let purged = client
        .execute(
            "DELETE FROM rejected_results WHERE received_at < now() - make_interval(secs => $1)",
            &[&(retention.as_secs() as f64)],
        )
        .await?;
    if purged > 0 {
        tracing::info!(purged, "deleted quarantined results past retention");
    }
    if up.deferred > 0 {
        tracing::warn!(
            deferred = up.deferred,
            "partition upkeep deferred steps: a long transaction holds results; retrying next round"
        );
    }
    Ok(up)
}

async fn is_partition(client: &Client, name: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_class WHERE relname = $1 AND relispartition",
            &[&name],
        )
        .await?
        .is_some())
}

/// Runs one upkeep step (`sql`, one statement or a whole transaction) until it gets its
/// locks: not while a long transaction holds any of `tables`, and each attempt bounded by
/// `lock_timeout`. Ok(false): still blocked after `attempts`; other errors are returned.
async fn with_retry(
    client: &Client,
    attempts: u32,
    what: &str,
    tables: &[&str],
    sql: &str,
) -> Result<bool, tokio_postgres::Error> {
    let tables: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
    let mut delay = Duration::from_secs(1);
    for attempt in 1..=attempts.max(1) {
        let busy = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                      WHERE l.granted AND l.pid <> pg_backend_pid()
                        AND a.backend_type = 'client backend'
                        AND l.relation IN (SELECT oid FROM pg_class WHERE relname = ANY($1))
                        AND a.xact_start < clock_timestamp() - interval '{LONG_HOLDER}'"
                ),
                &[&tables],
            )
            .await?
            .get::<_, i64>(0)
            > 0;
        if !busy {
            match client.batch_execute(sql).await {
                Ok(()) => return Ok(true),
                Err(e) if lock_contention(&e) => {
                    // A failed statement leaves the transaction aborted.
                    client.batch_execute("ROLLBACK").await?;
                    tracing::debug!(step = what, attempt, "upkeep lock timed out: {e}");
                }
                Err(e) => {
                    let _ = client.batch_execute("ROLLBACK").await;
                    return Err(e);
                }
            }
        } else {
            tracing::debug!(
                step = what,
                attempt,
                "a long transaction holds the table; upkeep waits"
            );
        }
        if attempt < attempts {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    Ok(false)
}

/// lock_not_available (lock_timeout) or deadlock_detected: try again later.
fn lock_contention(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code().is_some_and(|c| {
        *c == SqlState::LOCK_NOT_AVAILABLE || *c == SqlState::T_R_DEADLOCK_DETECTED
    })
}

fn days_since_epoch(t: SystemTime) -> i64 {
    (t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 86_400) as i64
}

/// `results_pYYYYMMDD`.
fn partition_name(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("results_p{y:04}{m:02}{d:02}")
}

fn parse_partition_day(name: &str) -> Option<i64> {
    let digits = name.strip_prefix("results_p")?;
    if digits.len() != 8 {
        return None;
    }
    let y: i64 = digits[0..4].parse().ok()?;
    let m: u32 = digits[4..6].parse().ok()?;
    let d: u32 = digits[6..8].parse().ok()?;
    Some(days_from_civil(y, m, d))
}

fn day_start(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02} 00:00:00+00")
}

/// Howard Hinnant's civil-from-days: days since 1970-01-01 to (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_round_trip() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(partition_name(20_784), "results_p20261127");
        for day in [-1000, 0, 59, 60, 11_016, 20_784, 30_000] {
            assert_eq!(parse_partition_day(&partition_name(day)), Some(day));
        }
        assert_eq!(days_from_civil(2026, 11, 27), 20_784);
        assert_eq!(day_start(20_784), "2026-11-27 00:00:00+00");
    }
}
