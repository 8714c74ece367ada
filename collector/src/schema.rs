//! The database schema: versioned migrations embedded in the binary, and the daily
//! partitions of `results` (created ahead, dropped past retention).
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
];

/// Arbitrary constant identifying edgeprobe's migration lock.
const MIGRATION_LOCK: i64 = 0x6564_6765_7072_6f62;

/// Days of partitions created ahead of today.
const PARTITIONS_AHEAD: i64 = 3;

/// Applies pending migrations; returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, tokio_postgres::Error> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS edgeprobe_migrations (
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

/// Creates the daily partitions from yesterday to `PARTITIONS_AHEAD` days ahead and, given
/// a retention, drops those entirely older than it and deletes quarantined results
/// received before it. Returns (created, dropped) counts.
pub async fn maintain_partitions(
    client: &Client,
    retention: Option<Duration>,
) -> Result<(usize, usize), tokio_postgres::Error> {
    let today = days_since_epoch(SystemTime::now());
    let mut created = 0;
    for day in (today - 1)..=(today + PARTITIONS_AHEAD) {
        let name = partition_name(day);
        let exists = client
            .query_opt("SELECT 1 FROM pg_class WHERE relname = $1", &[&name])
            .await?
            .is_some();
        if exists {
            continue;
        }
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {name} PARTITION OF results \
             FOR VALUES FROM ('{}') TO ('{}')",
            day_start(day),
            day_start(day + 1)
        );
        match client.batch_execute(&sql).await {
            Ok(()) => created += 1,
            // Rows for that day already sit in the default partition: leave them there.
            Err(e) => tracing::warn!(partition = %name, "cannot create partition: {e}"),
        }
    }
    let Some(retention) = retention else {
        return Ok((created, 0));
    };
    let oldest_kept = today - (retention.as_secs() / 86_400) as i64;
    let rows = client
        .query(
            "SELECT c.relname FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_class p ON p.oid = i.inhparent
              WHERE p.relname = 'results' AND c.relname LIKE 'results_p%'",
            &[],
        )
        .await?;
    let mut dropped = 0;
    for row in rows {
        let name: String = row.get(0);
        let Some(day) = parse_partition_day(&name) else {
            continue;
        };
        if day < oldest_kept {
            client
                .batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                .await?;
            tracing::info!(partition = %name, "dropped partition past retention");
            dropped += 1;
        }
    }
    // The quarantine follows the same retention, by arrival.
    let purged = client
        .execute(
            "DELETE FROM rejected_results WHERE received_at < now() - make_interval(secs => $1)",
            &[&(retention.as_secs() as f64)],
        )
        .await?;
    if purged > 0 {
        tracing::info!(purged, "deleted quarantined results past retention");
    }
    Ok((created, dropped))
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
