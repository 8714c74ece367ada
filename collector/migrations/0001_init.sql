-- edgeprobe schema, version 1: agents, results (partitioned by day), views per kind.

CREATE TABLE agents (
    agent_id            text PRIMARY KEY,
    labels              jsonb NOT NULL DEFAULT '{}'::jsonb,
    version             text NOT NULL DEFAULT '',
    first_seen          timestamptz NOT NULL DEFAULT now(),
    last_seen           timestamptz NOT NULL DEFAULT now(),
    -- Highest seq of this agent committed in results; the welcome carries it.
    committed_seq       bigint NOT NULL DEFAULT 0,
    -- From heartbeats.
    backlog             bigint NOT NULL DEFAULT 0,
    dropped             bigint NOT NULL DEFAULT 0,
    oldest_buffered_at  timestamptz
);

CREATE TABLE results (
    agent_id          text NOT NULL,
    seq               bigint NOT NULL,
    test              text NOT NULL,
    kind              text NOT NULL,
    target            text NOT NULL,
    started_at        timestamptz NOT NULL,
    duration_seconds  double precision NOT NULL,
    success           boolean NOT NULL,
    error_class       text,
    error_message     text,
    labels            jsonb NOT NULL DEFAULT '{}'::jsonb,
    received_at       timestamptz NOT NULL DEFAULT now(),
    -- speed
    download_bits_per_second        double precision,
    upload_bits_per_second          double precision,
    idle_latency_seconds            double precision,
    jitter_seconds                  double precision,
    download_loaded_latency_seconds double precision,
    upload_loaded_latency_seconds   double precision,
    bytes_downloaded                bigint,
    bytes_uploaded                  bigint,
    -- icmp
    sent              integer,
    received          integer,
    loss_ratio        double precision,
    rtt_min_seconds   double precision,
    rtt_avg_seconds   double precision,
    rtt_max_seconds   double precision,
    rtt_mdev_seconds  double precision,
    -- tcp, http
    connect_seconds   double precision,
    tls_seconds       double precision,
    -- http
    status_code       integer,
    dns_seconds       double precision,
    ttfb_seconds      double precision,
    transfer_seconds  double precision,
    body_bytes        bigint,
    tls_cert_expiry_seconds double precision,
    -- dns
    resolve_seconds   double precision,
    answers           integer,
    rcode             text,
    CONSTRAINT results_kind_check CHECK (kind IN ('speed', 'icmp', 'tcp', 'http', 'dns')),
    PRIMARY KEY (agent_id, seq, started_at)
) PARTITION BY RANGE (started_at);

-- Catches results outside the daily partitions the collector keeps ahead.
CREATE TABLE results_default PARTITION OF results DEFAULT;

CREATE INDEX results_started_at_idx ON results (started_at);
CREATE INDEX results_agent_test_time_idx ON results (agent_id, test, started_at);

CREATE VIEW speed_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, download_bits_per_second, upload_bits_per_second,
           idle_latency_seconds, jitter_seconds, download_loaded_latency_seconds,
           upload_loaded_latency_seconds, bytes_downloaded, bytes_uploaded
    FROM results WHERE kind = 'speed';

CREATE VIEW icmp_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, sent, received, loss_ratio, rtt_min_seconds,
           rtt_avg_seconds, rtt_max_seconds, rtt_mdev_seconds
    FROM results WHERE kind = 'icmp';

CREATE VIEW tcp_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, connect_seconds, tls_seconds
    FROM results WHERE kind = 'tcp';

CREATE VIEW http_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, status_code, dns_seconds, connect_seconds, tls_seconds,
           ttfb_seconds, transfer_seconds, body_bytes, tls_cert_expiry_seconds
    FROM results WHERE kind = 'http';

CREATE VIEW dns_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, resolve_seconds, answers, rcode
    FROM results WHERE kind = 'dns';
