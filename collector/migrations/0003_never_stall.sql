-- edgeprobe schema, version 3: buffer incarnations, quarantined results, time flags.
--
-- * seq counts within one incarnation of an agent's buffer (a random id made when the
--   buffer is created). The committed watermark moves from agents.committed_seq to
--   agent_incarnations, one row per (agent, incarnation): a re-imaged host starts a fresh
--   sequence and nothing it records is taken for committed. Every existing watermark
--   becomes incarnation '', which agents and buffers older than incarnations send, so an
--   upgrade redelivers nothing twice.
-- * agents keeps one row per agent: its latest incarnation, and committed_seq now means
--   "committed seq of the latest incarnation" (dashboards read it as before).
-- * rejected_results holds what the collector could not store (validation or a
--   permanent database error), keyed like a result so a redelivery stays once.
-- * results: the flags of the time model and truncation, and the agent's claimed start
--   time when it was implausible (started_at is then the collector's receive time, so
--   partitioning and retention treat the row by arrival). The primary key stays as in
--   version 2.

CREATE TABLE agent_incarnations (
    agent_id       text NOT NULL,
    incarnation    text NOT NULL,
    -- Highest seq of this incarnation committed (stored or quarantined).
    committed_seq  bigint NOT NULL DEFAULT 0,
    first_seen     timestamptz NOT NULL DEFAULT now(),
    last_seen      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, incarnation)
);

INSERT INTO agent_incarnations (agent_id, incarnation, committed_seq, first_seen, last_seen)
    SELECT agent_id, '', committed_seq, first_seen, last_seen FROM agents;

ALTER TABLE agents
    ADD COLUMN incarnation         text NOT NULL DEFAULT '',
    ADD COLUMN rejected            bigint NOT NULL DEFAULT 0,
    ADD COLUMN identity_conflicts  bigint NOT NULL DEFAULT 0;

ALTER TABLE results
    ADD COLUMN incarnation          text NOT NULL DEFAULT '',
    ADD COLUMN clock_unsynced       boolean NOT NULL DEFAULT false,
    ADD COLUMN clock_corrected      boolean NOT NULL DEFAULT false,
    ADD COLUMN error_truncated      boolean NOT NULL DEFAULT false,
    ADD COLUMN reported_started_at  timestamptz;

CREATE TABLE rejected_results (
    agent_id       text NOT NULL,
    incarnation    text NOT NULL,
    seq            bigint NOT NULL,
    reason         text NOT NULL,
    -- The SQLSTATE when PostgreSQL refused the row; NULL when validation did.
    sqlstate       text,
    -- The result as received ('protobuf') or as the row PostgreSQL refused ('json'),
    -- cut to 64 KiB (raw_truncated).
    raw            bytea NOT NULL,
    raw_format     text NOT NULL CHECK (raw_format IN ('protobuf', 'json')),
    raw_truncated  boolean NOT NULL DEFAULT false,
    received_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, incarnation, seq)
);

CREATE INDEX rejected_results_received_at_idx ON rejected_results (received_at);

-- The views gain the new columns at their end (CREATE OR REPLACE VIEW may only append).
CREATE OR REPLACE VIEW speed_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, download_bits_per_second, upload_bits_per_second,
           idle_latency_seconds, jitter_seconds, download_loaded_latency_seconds,
           upload_loaded_latency_seconds, bytes_downloaded, bytes_uploaded,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at
    FROM results WHERE kind = 'speed';

CREATE OR REPLACE VIEW icmp_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, sent, received, loss_ratio, rtt_min_seconds,
           rtt_avg_seconds, rtt_max_seconds, rtt_mdev_seconds,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at
    FROM results WHERE kind = 'icmp';

CREATE OR REPLACE VIEW tcp_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, connect_seconds, tls_seconds,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at
    FROM results WHERE kind = 'tcp';

CREATE OR REPLACE VIEW http_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, status_code, dns_seconds, connect_seconds, tls_seconds,
           ttfb_seconds, transfer_seconds, body_bytes, tls_cert_expiry_seconds,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at
    FROM results WHERE kind = 'http';

CREATE OR REPLACE VIEW dns_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, resolve_seconds, answers, rcode,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at
    FROM results WHERE kind = 'dns';
