-- edgeprobe schema, version 9: the link a result was taken on (issue 27, "Two links, two
-- families"; the agent options interface, source and family, docs/PROBES.md).
--
-- * results: ip_family ('ipv4' or 'ipv6': the family the run used), local_address (the
--   local IP address of the run's sockets, without port; text, not inet, because an IPv6
--   address may carry a zone) and interface (the interface the test is bound to by its
--   `interface` option). NULL where the agent sent none: a run that never got as far as
--   an address, a test not bound to an interface, and every result of agents before the
--   links release and every row stored before this version. The collector checks them
--   against edgeprobe_proto::bounds::result_link and quarantines what fails; the wire's
--   empty string is stored as NULL.
-- * A test with `family = "both"` gives two results per run, one per family: they differ
--   in seq and ip_family, so "IPv6 fails while IPv4 works" is a comparison of rows.
-- * Every per-kind view and path_hops gain the three columns at their end (CREATE OR
--   REPLACE VIEW may only append), so the dashboards split any panel by interface and
--   family.
--
-- The family check is added NOT VALID (as the kind checks of versions 5, 7 and 8): the
-- column is NULL in every stored row, and validating would scan every partition under a
-- lock that stops ingest. New columns are nullable without a default: no partition is
-- rewritten.

ALTER TABLE results
    ADD COLUMN ip_family      text,
    ADD COLUMN local_address  text,
    ADD COLUMN interface      text;

ALTER TABLE results ADD CONSTRAINT results_ip_family_check
    CHECK (ip_family IN ('ipv4', 'ipv6')) NOT VALID;

CREATE OR REPLACE VIEW speed_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, download_bits_per_second, upload_bits_per_second,
           idle_latency_seconds, jitter_seconds, download_loaded_latency_seconds,
           upload_loaded_latency_seconds, bytes_downloaded, bytes_uploaded,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at,
           on_demand, run_id, download_loaded_loss_ratio, upload_loaded_loss_ratio,
           ip_family, local_address, interface
    FROM results WHERE kind = 'speed';

CREATE OR REPLACE VIEW icmp_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, sent, received, loss_ratio, rtt_min_seconds,
           rtt_avg_seconds, rtt_max_seconds, rtt_mdev_seconds,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at,
           on_demand, run_id, ip_family, local_address, interface
    FROM results WHERE kind = 'icmp';

CREATE OR REPLACE VIEW tcp_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, connect_seconds, tls_seconds,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at,
           on_demand, run_id, ip_family, local_address, interface
    FROM results WHERE kind = 'tcp';

CREATE OR REPLACE VIEW http_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, status_code, dns_seconds, connect_seconds, tls_seconds,
           ttfb_seconds, transfer_seconds, body_bytes, tls_cert_expiry_seconds,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at,
           on_demand, run_id, ip_family, local_address, interface
    FROM results WHERE kind = 'http';

CREATE OR REPLACE VIEW dns_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, resolve_seconds, answers, rcode,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at,
           on_demand, run_id, ip_family, local_address, interface
    FROM results WHERE kind = 'dns';

CREATE OR REPLACE VIEW path_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, reached, hop_count, path_id, path_changed, path_loss_ratio,
           rtt_avg_seconds, path_protocol AS protocol,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at,
           on_demand, run_id, ip_family, local_address, interface
    FROM results WHERE kind = 'path';

CREATE OR REPLACE VIEW responsiveness_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, responsiveness_rpm, download_responsiveness_rpm,
           upload_responsiveness_rpm, download_bits_per_second, upload_bits_per_second,
           idle_latency_seconds, loaded_latency_seconds, load_connections, stable, rating,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at,
           on_demand, run_id, ip_family, local_address, interface
    FROM results WHERE kind = 'responsiveness';

CREATE OR REPLACE VIEW stamp_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, sent, received, forward_lost, reverse_lost,
           forward_loss_ratio, reverse_loss_ratio, duplicates, reordered, rtt_min_seconds,
           rtt_avg_seconds, rtt_max_seconds, rtt_mdev_seconds, forward_delay_min_seconds,
           forward_delay_avg_seconds, forward_delay_max_seconds, reverse_delay_min_seconds,
           reverse_delay_avg_seconds, reverse_delay_max_seconds, jitter_seconds, mos,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at,
           on_demand, run_id, ip_family, local_address, interface
    FROM results WHERE kind = 'stamp';

CREATE OR REPLACE VIEW path_hops AS
    SELECT r.agent_id, r.test, r.started_at, r.seq, h.ttl, h.address, h.sent, h.received,
           h.loss_ratio, h.rtt_min_seconds, h.rtt_avg_seconds, h.rtt_max_seconds,
           h.rate_limited, h.addresses, h.rtt_mdev_seconds,
           r.target, r.labels, r.path_id, r.path_changed, r.clock_unsynced,
           r.ip_family, r.local_address, r.interface
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
