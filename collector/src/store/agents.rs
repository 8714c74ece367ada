//! Statements on `agents` and `agent_incarnations` for hellos, heartbeats and identity
//! conflicts, batched across the agents of a group.

use super::*;

/// Registers or updates agents and their incarnations; returns each incarnation's
/// committed seq. `with_labels: false` stores '{}' for the labels.
pub(super) async fn hello_agents(
    client: &Client,
    hellos: &[&AgentHello],
    with_labels: bool,
) -> Result<HashMap<(String, String), i64>, tokio_postgres::Error> {
    // One row per agent: a statement cannot upsert the same row twice.
    let mut latest: BTreeMap<&str, &AgentHello> = BTreeMap::new();
    for h in hellos {
        latest.insert(&h.agent_id, h);
    }
    let ids: Vec<&str> = latest.keys().copied().collect();
    let incarnations: Vec<&str> = latest.values().map(|h| h.incarnation.as_str()).collect();
    let labels: Vec<serde_json::Value> = latest
        .values()
        .map(|h| match with_labels {
            true => labels_json(&h.labels),
            false => serde_json::Value::Object(Default::default()),
        })
        .collect();
    let versions: Vec<&str> = latest.values().map(|h| h.version.as_str()).collect();
    // Arrays of arrays of different lengths do not unnest: each list travels as JSON.
    let features: Vec<serde_json::Value> = latest
        .values()
        .map(|h| serde_json::json!(h.features))
        .collect();
    let local_tests: Vec<serde_json::Value> = latest
        .values()
        .map(|h| serde_json::json!(h.local_tests))
        .collect();
    // The incarnation first (its row lock orders this statement after a writer holding
    // it, so the committed seq read is the committed one), then the agent's row, which
    // follows its latest incarnation.
    let rows = client
        .query(
            "WITH v AS (
                 SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::text[],
                                      $5::jsonb[], $6::jsonb[])
                     AS v(agent_id, incarnation, labels, version, features, local_tests)
             ), inc AS (
                 INSERT INTO agent_incarnations (agent_id, incarnation)
                 SELECT agent_id, incarnation FROM v ORDER BY agent_id
                 ON CONFLICT (agent_id, incarnation) DO UPDATE SET last_seen = now()
                 RETURNING agent_id, incarnation, committed_seq
             ), agent AS (
                 INSERT INTO agents (agent_id, labels, version, incarnation, committed_seq,
                                     features, local_tests)
                 SELECT v.agent_id, v.labels, v.version, v.incarnation, inc.committed_seq,
                        ARRAY(SELECT jsonb_array_elements_text(v.features)),
                        ARRAY(SELECT jsonb_array_elements_text(v.local_tests))
                   FROM v JOIN inc USING (agent_id, incarnation)
                 ON CONFLICT (agent_id) DO UPDATE
                    SET labels = EXCLUDED.labels, version = EXCLUDED.version,
                        features = EXCLUDED.features, local_tests = EXCLUDED.local_tests,
                        incarnation = EXCLUDED.incarnation,
                        committed_seq = EXCLUDED.committed_seq, last_seen = now()
             )
             SELECT agent_id, incarnation, committed_seq FROM inc",
            &[
                &ids,
                &incarnations,
                &labels,
                &versions,
                &features,
                &local_tests,
            ],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

pub(super) async fn heartbeat_agents(
    client: &Client,
    beats: &HashMap<String, BufferState>,
) -> Result<(), tokio_postgres::Error> {
    let ids: Vec<&str> = beats.keys().map(String::as_str).collect();
    let backlog: Vec<i64> = beats.values().map(|s| s.backlog).collect();
    let dropped: Vec<i64> = beats.values().map(|s| s.dropped).collect();
    let oldest: Vec<Option<SystemTime>> = beats.values().map(|s| s.oldest).collect();
    client
        .execute(
            "UPDATE agents SET backlog = v.backlog, dropped = v.dropped,
                    oldest_buffered_at = v.oldest, last_seen = now()
               FROM unnest($1::text[], $2::int8[], $3::int8[], $4::timestamptz[])
                    AS v(agent_id, backlog, dropped, oldest)
              WHERE agents.agent_id = v.agent_id",
            &[&ids, &backlog, &dropped, &oldest],
        )
        .await?;
    Ok(())
}

pub(super) async fn count_conflicts(
    client: &Client,
    conflicts: &HashMap<String, i64>,
) -> Result<(), tokio_postgres::Error> {
    let (ids, counts): (Vec<&str>, Vec<i64>) =
        conflicts.iter().map(|(a, n)| (a.as_str(), *n)).unzip();
    client
        .execute(
            "UPDATE agents SET identity_conflicts = identity_conflicts + v.n
               FROM unnest($1::text[], $2::int8[]) AS v(agent_id, n)
              WHERE agents.agent_id = v.agent_id",
            &[&ids, &counts],
        )
        .await?;
    Ok(())
}

pub(super) fn labels_json(labels: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}
