-- edgeprobe schema, version 7: responsiveness results (SPEC section 16, issue 23 "How it
-- feels"; IETF IPPM draft-ietf-ippm-responsiveness). Version 6 is the operator's view
-- (runs.expires_at); this migration does not depend on it.
--
-- * results: the kind 'responsiveness' and its columns. Goodput and the idle round trip
--   reuse download_bits_per_second, upload_bits_per_second and idle_latency_seconds.
--   responsiveness_rpm is the run's overall round trips per minute under working
--   conditions; rating its band (poor < 300, fair < 1000, good < 6000, excellent), checked
--   against the RPM by the collector before it gets here; NULL when the agent gave none.
-- * responsiveness_results: the per-kind view Grafana reads.
--
-- The kind check is replaced by a weaker one, added NOT VALID (as in version 5): every
-- stored row passed the stronger check, and validating would scan every partition under a
-- lock that stops ingest. New columns are NULL for the rows already stored and for the
-- other kinds.

ALTER TABLE results DROP CONSTRAINT results_kind_check;
ALTER TABLE results ADD CONSTRAINT results_kind_check
    CHECK (kind IN ('speed', 'icmp', 'tcp', 'http', 'dns', 'path', 'responsiveness')) NOT VALID;

ALTER TABLE results
    -- Round trips per minute under working conditions: overall, download, upload phase.
    ADD COLUMN responsiveness_rpm           double precision,
    ADD COLUMN download_responsiveness_rpm  double precision,
    ADD COLUMN upload_responsiveness_rpm    double precision,
    -- The round trip under load, 60 / responsiveness_rpm (seconds).
    ADD COLUMN loaded_latency_seconds       double precision,
    -- Load-generating connections open at the end (the larger of the two directions).
    ADD COLUMN load_connections             integer,
    -- Both directions reached stability within their time limit.
    ADD COLUMN stable                       boolean,
    -- poor, fair, good or excellent.
    ADD COLUMN rating                       text;

CREATE VIEW responsiveness_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, responsiveness_rpm, download_responsiveness_rpm,
           upload_responsiveness_rpm, download_bits_per_second, upload_bits_per_second,
           idle_latency_seconds, loaded_latency_seconds, load_connections, stable, rating,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at,
           on_demand, run_id
    FROM results WHERE kind = 'responsiveness';
