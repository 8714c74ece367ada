//! `migrate` logs what it did, not PostgreSQL's chatter: the NOTICEs of its IF [NOT]
//! EXISTS statements ("already exists, skipping") are expected on every run.

use crate::support::*;

#[test]
fn migrate_logs_no_postgres_notices_on_a_fresh_or_migrated_database() {
    let db = TestDb::new();
    for run in ["fresh", "already migrated"] {
        let (code, out, err) = collector_cmd(&["migrate", "--database-url", &db.url]);
        assert_eq!(code, Some(0), "migrate ({run}): {out}{err}");
        assert!(out.contains("schema at version"), "{run}: {out}");
        assert!(
            !err.contains("NOTICE") && !err.contains("skipping"),
            "migrate ({run}) logged PostgreSQL notices:\n{err}"
        );
    }
}
