-- edgeprobe schema, version 6: the operator's view (issue 25).
--
-- * runs.expires_at: a run-now request is sent only until it expires (by default 30 s
--   after it was made, `run-now --expires`), so an agent that comes back later never
--   runs it; run_agents rows still pending then become 'expired'. Runs made before this
--   version expire a minute after they were made, as the collector used to send them.

ALTER TABLE runs ADD COLUMN expires_at timestamptz;
UPDATE runs SET expires_at = created_at + interval '60 seconds';
ALTER TABLE runs
    ALTER COLUMN expires_at SET DEFAULT now() + interval '30 seconds',
    ALTER COLUMN expires_at SET NOT NULL;
