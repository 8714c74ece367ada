-- edgeprobe schema, version 8: STAMP results and the speed test's loss under load (SPEC
-- section 17, issue 24 "Which direction, and would a call work"; RFC 8762).
--
-- * results: the kind 'stamp' and its columns. The packet counts reuse sent and received,
--   the round trip rtt_{min,avg,max,mdev}_seconds, the RFC 3550 jitter jitter_seconds
--   (icmp's and speed's columns). forward_lost + reverse_lost <= sent - received and every
--   ratio in 0..1, mos in 1..4.5 (ITU-T G.107 E-model), duplicates and reordered at most
--   sent, delays within 60 s and min <= avg <= max: checked by the collector before a row
--   gets here (what contradicts is quarantined). One-way delays are NULL unless both
--   clocks were synchronised; they may be slightly negative (two clocks, each only
--   synchronised to within its error), and are stored as measured.
-- * speed: download_loaded_loss_ratio and upload_loaded_loss_ratio, UDP loss while each
--   direction was saturated (a light STAMP stream to the target's reflector); NULL against
--   targets without one and for every row stored before.
-- * stamp_results: the per-kind view Grafana reads; speed_results gains the two columns at
--   its end (CREATE OR REPLACE VIEW may only append).
--
-- The kind check is replaced by a weaker one, added NOT VALID (as in versions 5 and 7):
-- every stored row passed the stronger check, and validating would scan every partition
-- under a lock that stops ingest. New columns are NULL for the rows already stored and for
-- the other kinds; adding a nullable column without a default rewrites no partition.

ALTER TABLE results DROP CONSTRAINT results_kind_check;
ALTER TABLE results ADD CONSTRAINT results_kind_check
    CHECK (kind IN ('speed', 'icmp', 'tcp', 'http', 'dns', 'path', 'responsiveness', 'stamp'))
    NOT VALID;

ALTER TABLE results
    -- Test packets lost on the way to the reflector (its sequence numbers show the gap)
    -- and on the way back, and their ratios.
    ADD COLUMN forward_lost                integer,
    ADD COLUMN reverse_lost                integer,
    ADD COLUMN forward_loss_ratio          double precision,
    ADD COLUMN reverse_loss_ratio          double precision,
    -- Extra copies received; packets that arrived after a later one (RFC 4737).
    ADD COLUMN duplicates                  integer,
    ADD COLUMN reordered                   integer,
    -- One-way delays (seconds), from clock-corrected timestamps.
    ADD COLUMN forward_delay_min_seconds   double precision,
    ADD COLUMN forward_delay_avg_seconds   double precision,
    ADD COLUMN forward_delay_max_seconds   double precision,
    ADD COLUMN reverse_delay_min_seconds   double precision,
    ADD COLUMN reverse_delay_avg_seconds   double precision,
    ADD COLUMN reverse_delay_max_seconds   double precision,
    -- Mean opinion score estimate for a G.711 voice call, 1 to 4.5.
    ADD COLUMN mos                         double precision,
    -- speed: UDP loss under load, per direction.
    ADD COLUMN download_loaded_loss_ratio  double precision,
    ADD COLUMN upload_loaded_loss_ratio    double precision;

CREATE VIEW stamp_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, sent, received, forward_lost, reverse_lost,
           forward_loss_ratio, reverse_loss_ratio, duplicates, reordered, rtt_min_seconds,
           rtt_avg_seconds, rtt_max_seconds, rtt_mdev_seconds, forward_delay_min_seconds,
           forward_delay_avg_seconds, forward_delay_max_seconds, reverse_delay_min_seconds,
           reverse_delay_avg_seconds, reverse_delay_max_seconds, jitter_seconds, mos,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at,
           on_demand, run_id
    FROM results WHERE kind = 'stamp';

CREATE OR REPLACE VIEW speed_results AS
    SELECT agent_id, seq, test, target, started_at, duration_seconds, success, error_class,
           error_message, labels, download_bits_per_second, upload_bits_per_second,
           idle_latency_seconds, jitter_seconds, download_loaded_latency_seconds,
           upload_loaded_latency_seconds, bytes_downloaded, bytes_uploaded,
           incarnation, clock_unsynced, clock_corrected, error_truncated, reported_started_at,
           on_demand, run_id, download_loaded_loss_ratio, upload_loaded_loss_ratio
    FROM results WHERE kind = 'speed';
