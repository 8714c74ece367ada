-- edgeprobe schema, version 2: one btree per result instead of three.
--
-- Every index on `results` is paid on every insert, and inserts are the collector's hot
-- path (`scripts/bench-schema` compares this schema with version 1; docs/BENCHMARKS.md).
--
-- * The primary key becomes (agent_id, test, started_at, seq). It serves the dashboards'
--   per agent, test and time range queries, which needed the separate
--   results_agent_test_time_idx before, and it still refuses a result delivered twice: a
--   redelivered result repeats its agent, test, start time and seq. (The first guard is
--   the per-agent watermark under a row lock, see store.rs; this is the second.)
-- * Fleet-wide time ranges use a BRIN index: results arrive roughly in start-time order
--   within a daily partition, where a BRIN costs almost nothing to keep up to date and a
--   btree costs a descent and a WAL record per row.

ALTER TABLE results DROP CONSTRAINT results_pkey;
DROP INDEX results_agent_test_time_idx;
DROP INDEX results_started_at_idx;
ALTER TABLE results ADD PRIMARY KEY (agent_id, test, started_at, seq);
CREATE INDEX results_started_at_brin ON results USING brin (started_at);
