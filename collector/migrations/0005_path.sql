-- edgeprobe schema, version 5: path results (SPEC section 15, issue 22 "Where it breaks").
--
-- * results: the kind 'path' and its columns. The destination's round-trip time reuses
--   rtt_avg_seconds. The hops travel with their result in the same row (`hops`), so they
--   share the COPY, the transaction, the quarantine, exactly-once, the daily partitions
--   and the retention of their result by construction. The view `path_hops` gives one row
--   per hop; read hops through it, not from the column.
-- * hops is `json` (kept as text, only checked on input), one array per TTL, positional:
--     [ttl, address (null: nothing answered), [addresses], sent, received, loss_ratio,
--      rtt_min_seconds, rtt_avg_seconds, rtt_max_seconds, rtt_mdev_seconds, rate_limited]
--   compressed with lz4 where the server has it. Measured with 30-hop rows (binary COPY,
--   docs/BENCHMARKS.md): jsonb objects with pglz 7,000 rows/s, json arrays with lz4
--   28,000; parsing jsonb and pglz are what PostgreSQL spends a path row's insert on.
-- * path_changed: the result's path_id differs from that of the previous result of the
--   same agent and test (by started_at, seq); false for the first. The writer computes it
--   in the transaction that stores the row, from `path_last` (the latest path_id per agent
--   and test), which it updates in the same transaction: a redelivered batch is skipped by
--   the watermark before it gets there, so nothing is counted twice.
-- * asn_ranges: optional AS numbers of address ranges (`edgeprobe-collector asn load`).
-- * path_shared_hops(): the hops that agents whose path got worse have in common.
--
-- The kind check is replaced by a weaker one, added NOT VALID: every stored row passed the
-- stronger check, and validating would scan every partition under a lock that stops
-- ingest.

ALTER TABLE results DROP CONSTRAINT results_kind_check;
ALTER TABLE results ADD CONSTRAINT results_kind_check
    CHECK (kind IN ('speed', 'icmp', 'tcp', 'http', 'dns', 'path')) NOT VALID;

ALTER TABLE results
    -- The destination answered in at least one round.
    ADD COLUMN reached          boolean,
    -- TTL of the destination when reached, else of the last hop that answered (0: none).
    ADD COLUMN hop_count        integer,
    -- Stable hash of the responding addresses by TTL; NULL when nothing answered.
    ADD COLUMN path_id          text,
    ADD COLUMN path_changed     boolean,
    -- Loss that persists to the destination; NULL when not reached.
    ADD COLUMN path_loss_ratio  double precision,
    -- icmp, udp or tcp.
    ADD COLUMN path_protocol    text,
    -- One array per TTL (see above).
    ADD COLUMN hops             json;

-- lz4 on the parent (new partitions made with PARTITION OF or LIKE ... INCLUDING
-- COMPRESSION inherit it) and on every existing partition; a server built without lz4
-- keeps its default compression.
DO $$
DECLARE
    part regclass;
BEGIN
    ALTER TABLE results ALTER COLUMN hops SET COMPRESSION lz4;
    FOR part IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'results'::regclass
    LOOP
        EXECUTE format('ALTER TABLE %s ALTER COLUMN hops SET COMPRESSION lz4', part);
    END LOOP;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'this server has no lz4: path hops keep the default compression (pglz)';
END
$$;

-- The latest path of each agent and test: what the next result is compared with.
CREATE TABLE path_last (
    agent_id    text NOT NULL,
    test        text NOT NULL,
    started_at  timestamptz NOT NULL,
    seq         bigint NOT NULL,
    path_id     text NOT NULL,
    PRIMARY KEY (agent_id, test)
);

CREATE VIEW path_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, reached, hop_count, path_id, path_changed, path_loss_ratio,
           rtt_avg_seconds, path_protocol AS protocol,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at,
           on_demand, run_id
    FROM results WHERE kind = 'path';

-- One row per hop of every path result. A filter on agent_id, test and started_at reaches
-- the results' primary key.
CREATE VIEW path_hops AS
    SELECT r.agent_id, r.test, r.started_at, r.seq, h.ttl, h.address, h.sent, h.received,
           h.loss_ratio, h.rtt_min_seconds, h.rtt_avg_seconds, h.rtt_max_seconds,
           h.rate_limited, h.addresses, h.rtt_mdev_seconds,
           r.target, r.labels, r.path_id, r.path_changed, r.clock_unsynced
    FROM results r
    CROSS JOIN LATERAL (
        SELECT (e->>0)::integer AS ttl, e->>1 AS address,
               ARRAY(SELECT jsonb_array_elements_text(e->2)) AS addresses,
               (e->>3)::integer AS sent, (e->>4)::integer AS received,
               (e->>5)::double precision AS loss_ratio,
               (e->>6)::double precision AS rtt_min_seconds,
               (e->>7)::double precision AS rtt_avg_seconds,
               (e->>8)::double precision AS rtt_max_seconds,
               (e->>9)::double precision AS rtt_mdev_seconds,
               (e->>10)::boolean AS rate_limited
          FROM jsonb_array_elements(r.hops::jsonb) e) h
    WHERE r.kind = 'path' AND r.hops IS NOT NULL;

-- An inclusive range of addresses of one family (inet orders IPv4 before IPv6).
CREATE TYPE inetrange AS RANGE (subtype = inet);

-- From the public ip-to-ASN TSV layout (iptoasn.com's ip2asn-combined.tsv): replaced as a
-- whole by `edgeprobe-collector asn load FILE`; AS 0 ("Not routed") is not kept.
CREATE TABLE asn_ranges (
    range    inetrange NOT NULL,
    asn      bigint NOT NULL,
    country  text NOT NULL,
    as_name  text NOT NULL
);
CREATE INDEX asn_ranges_range_idx ON asn_ranges USING gist (range);

-- The AS of an address (a zone, `%eth0`, is ignored); no row when unknown.
CREATE FUNCTION asn_of(address text) RETURNS TABLE (asn bigint, as_name text)
LANGUAGE sql STABLE AS $$
    SELECT a.asn, a.as_name FROM asn_ranges a
     WHERE a.range @> split_part(address, '%', 1)::inet
     LIMIT 1
$$;

-- "The agents whose path loss or latency went up in the last hour: which hops do they have
-- in common?" An agent's path test is *degraded* when, over the recent window
-- (now - since .. now) against its baseline window (the `baseline` before that):
--   the mean path loss rose by at least `loss_points` (0.05: 5 percentage points; a
--   result that did not reach the destination counts as loss 1), or
--   the median destination RTT is at least `rtt_factor` (1.5) times the baseline's and at
--   least `rtt_floor_seconds` (10 ms) more.
-- A test without results in either window is not degraded (nothing to compare). Results
-- flagged clock_unsynced are left out. An agent is degraded through a hop when one of its
-- degraded tests' recent results went through it (any address that answered at a TTL).
-- Returns the hops at least one degraded agent went through: agents = every agent whose
-- recent path results went through it, loss_ratio = the hop's mean loss in the degraded
-- agents' recent results (rate-limited hops left out). Most degraded agents first; of
-- equals, the hop fewer healthy agents share (the more specific) first.
CREATE FUNCTION path_shared_hops(
    since interval DEFAULT '1 hour',
    baseline interval DEFAULT '24 hours',
    loss_points double precision DEFAULT 0.05,
    rtt_factor double precision DEFAULT 1.5,
    rtt_floor_seconds double precision DEFAULT 0.010)
RETURNS TABLE (address text, asn bigint, as_name text, agents bigint,
               degraded_agents bigint, loss_ratio double precision)
LANGUAGE sql STABLE AS $$
    WITH measured AS (
        SELECT agent_id, test, started_at, hops,
               started_at >= now() - since AS recent,
               coalesce(path_loss_ratio, CASE WHEN NOT reached THEN 1 END) AS loss,
               rtt_avg_seconds AS rtt
          FROM results
         WHERE kind = 'path' AND NOT clock_unsynced
           AND started_at >= now() - since - baseline AND started_at <= now()
    ), windows AS (
        SELECT agent_id, test,
               avg(loss) FILTER (WHERE recent) AS loss_now,
               avg(loss) FILTER (WHERE NOT recent) AS loss_before,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY rtt) FILTER (WHERE recent) AS rtt_now,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY rtt) FILTER (WHERE NOT recent) AS rtt_before,
               count(*) FILTER (WHERE NOT recent) AS before_count
          FROM measured
         GROUP BY agent_id, test
    ), degraded AS (
        SELECT agent_id, test FROM windows
         WHERE before_count > 0
           AND (loss_now >= loss_before + loss_points
                OR (rtt_now >= rtt_before * rtt_factor
                    AND rtt_now >= rtt_before + rtt_floor_seconds))
    ), through AS (
        SELECT m.agent_id, m.test, a.addr,
               CASE WHEN NOT coalesce((h->>10)::boolean, false)
                    THEN (h->>5)::double precision END AS hop_loss
          FROM measured m
         CROSS JOIN LATERAL jsonb_array_elements(m.hops::jsonb) h
         CROSS JOIN LATERAL (
             SELECT jsonb_array_elements_text(h->2)
             UNION
             SELECT h->>1) a(addr)
         WHERE m.recent AND m.hops IS NOT NULL AND a.addr IS NOT NULL AND a.addr <> ''
    )
    SELECT t.addr, x.asn, x.as_name,
           count(DISTINCT t.agent_id),
           count(DISTINCT t.agent_id) FILTER (WHERE d.agent_id IS NOT NULL),
           avg(t.hop_loss) FILTER (WHERE d.agent_id IS NOT NULL)
      FROM through t
      LEFT JOIN degraded d ON d.agent_id = t.agent_id AND d.test = t.test
      LEFT JOIN LATERAL asn_of(t.addr) x ON true
     GROUP BY t.addr, x.asn, x.as_name
    HAVING count(*) FILTER (WHERE d.agent_id IS NOT NULL) > 0
     ORDER BY 5 DESC, 4 ASC, 1
$$;
