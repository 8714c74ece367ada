-- edgeprobe schema, version 4: the controller (fleet tests and run-now, SPEC section 13).
--
-- * fleet_versions: every `tests apply` (or API apply, or rollback) makes a new version,
--   kept with who made it and when. The current set is the highest version. A rollback
--   copies an old version's tests into a new version (rolled_back_to names it).
-- * fleet_tests: the tests of each version. spec_toml is one `[[test]]` block in the
--   agent config's syntax without `select` / `agents`: what is pushed to an agent.
--   select_labels {} and agents NULL select every agent.
-- * agents: the controller features the agent speaks, its local test names (for the
--   name-clash check at apply time), and the fleet version it applied or refused.
-- * runs / run_agents: run-now requests and each selected agent's state.
-- * results.run_id: set for results taken on demand; on_demand is derived from it.

CREATE TABLE fleet_versions (
    version         bigint PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- The operator: the API client certificate's name, or the Unix user of the CLI.
    created_by      text NOT NULL,
    -- Where the set came from: a file path, 'api', or 'rollback'.
    origin          text NOT NULL,
    -- The file as applied (empty for a rollback).
    source          text NOT NULL DEFAULT '',
    rolled_back_to  bigint REFERENCES fleet_versions (version)
);

CREATE TABLE fleet_tests (
    version        bigint NOT NULL REFERENCES fleet_versions (version) ON DELETE CASCADE,
    name           text NOT NULL,
    kind           text NOT NULL,
    target         text NOT NULL,
    select_labels  jsonb NOT NULL DEFAULT '{}'::jsonb,
    agents         text[],
    spec_toml      text NOT NULL,
    PRIMARY KEY (version, name)
);

ALTER TABLE agents
    ADD COLUMN features           text[] NOT NULL DEFAULT '{}',
    ADD COLUMN local_tests        text[] NOT NULL DEFAULT '{}',
    -- Last fleet version the agent applied (NULL: none yet).
    ADD COLUMN fleet_version      bigint,
    ADD COLUMN fleet_applied_at   timestamptz,
    -- Last fleet version the agent refused, and why (NULL once a later one applies).
    ADD COLUMN fleet_refused_version  bigint,
    ADD COLUMN fleet_error        text;

CREATE TABLE runs (
    run_id         bigserial PRIMARY KEY,
    created_at     timestamptz NOT NULL DEFAULT now(),
    created_by     text NOT NULL,
    -- A test by name, or an ad-hoc test (spec_toml, its name 'run-now' unless given).
    test           text NOT NULL,
    kind           text,
    target         text,
    spec_toml      text NOT NULL DEFAULT '',
    select_labels  jsonb NOT NULL DEFAULT '{}'::jsonb,
    agents         text[]
);

CREATE TABLE run_agents (
    run_id      bigint NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    agent_id    text NOT NULL,
    -- pending (not yet sent), sent, started, waiting, refused, rate_limited, done
    state       text NOT NULL DEFAULT 'pending',
    reason      text,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, agent_id)
);

ALTER TABLE results
    ADD COLUMN on_demand  boolean NOT NULL DEFAULT false,
    ADD COLUMN run_id     bigint;

CREATE INDEX results_run_id_idx ON results (run_id) WHERE run_id IS NOT NULL;

-- The views gain on_demand and run_id at their end.
CREATE OR REPLACE VIEW speed_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, download_bits_per_second, upload_bits_per_second,
           idle_latency_seconds, jitter_seconds, download_loaded_latency_seconds,
           upload_loaded_latency_seconds, bytes_downloaded, bytes_uploaded,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at,
           on_demand, run_id
    FROM results WHERE kind = 'speed';

CREATE OR REPLACE VIEW icmp_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, sent, received, loss_ratio, rtt_min_seconds,
           rtt_avg_seconds, rtt_max_seconds, rtt_mdev_seconds,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at,
           on_demand, run_id
    FROM results WHERE kind = 'icmp';

CREATE OR REPLACE VIEW tcp_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, connect_seconds, tls_seconds,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at,
           on_demand, run_id
    FROM results WHERE kind = 'tcp';

CREATE OR REPLACE VIEW http_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, status_code, dns_seconds, connect_seconds, tls_seconds,
           ttfb_seconds, transfer_seconds, body_bytes, tls_cert_expiry_seconds,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at,
           on_demand, run_id
    FROM results WHERE kind = 'http';

CREATE OR REPLACE VIEW dns_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, resolve_seconds, answers, rcode,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at,
           on_demand, run_id
    FROM results WHERE kind = 'dns';
