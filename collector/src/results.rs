//! Results for operators (SPEC section 18): `results` on the command line and
//! `GET /api/v1/results`, filtered by agent, test and age, as a table, JSON or CSV.
//!
//! Invariants: an export of any size is streamed. Rows are read through a server-side
//! cursor (a portal in a read-only transaction, [`BATCH`] rows per fetch) and written as
//! they come, so neither the CLI nor the collector holds more than one batch; a reader
//! that stops reading (`| head`) stops the fetching. SQL takes the filters only as
//! parameters. Each row is one JSON object whose keys are the columns of `results` (the
//! kind's figures in seconds, bits per second, bytes and ratios), nulls left out; CSV has
//! every column of [`COLUMNS`] in that order, empty where null.

use std::time::Duration;

use serde_json::{Map, Value};
use tokio_postgres::types::Json;
use tokio_postgres::Client;

use crate::fleet::FleetError;

/// Rows fetched from the cursor at a time.
pub const BATCH: i32 = 500;

/// The columns of an export before the figures, in CSV order.
const BASE_COLUMNS: &[&str] = &[
    "started_at",
    "agent_id",
    "seq",
    "test",
    "kind",
    "target",
    "success",
    "duration_seconds",
    "error_class",
    "error_message",
    "on_demand",
    "run_id",
    "clock_unsynced",
    "clock_corrected",
];

/// The columns of an export, in CSV order: the result's own, then every kind's figures
/// ([`crate::domain::FIGURE_COLUMNS`]), then the link ([`crate::domain::LINK_COLUMNS`],
/// schema 9: last, so a CSV read by position before it keeps its columns).
pub static COLUMNS: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    BASE_COLUMNS
        .iter()
        .chain(crate::domain::FIGURE_COLUMNS)
        .chain(crate::domain::LINK_COLUMNS)
        .copied()
        .collect()
});

/// Which results.
#[derive(Debug, Clone)]
pub struct Filter {
    /// These agents only (empty: all).
    pub agents: Vec<String>,
    pub test: Option<String>,
    /// Started at most this long ago.
    pub since: Duration,
}

/// How an export is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns with the kind's main figures (the CLI only).
    Table,
    /// One JSON array of objects.
    Json,
    /// RFC 4180 CSV with a header line.
    Csv,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "table" => Some(Format::Table),
            "json" => Some(Format::Json),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Table => "text/plain; charset=utf-8",
        }
    }
}

/// An export in progress: a portal over the filtered results in a read-only transaction.
pub struct Cursor<'a> {
    tx: tokio_postgres::Transaction<'a>,
    portal: tokio_postgres::Portal,
    done: bool,
}

impl<'a> Cursor<'a> {
    /// Opens the cursor over the results of `filter`, oldest first.
    pub async fn open(client: &'a mut Client, filter: &Filter) -> Result<Cursor<'a>, FleetError> {
        crate::fleet::check_schema(&*client).await?;
        let tx = client.build_transaction().read_only(true).start().await?;
        // Timestamps as UTC in the JSON of each row.
        tx.batch_execute("SET LOCAL TIME ZONE 'UTC'").await?;
        let columns = COLUMNS.join(", ");
        let statement = tx
            .prepare(&format!(
                // Nulls stripped by PostgreSQL: most figure columns are another kind's and
                // NULL, and a row's JSON without them is a fraction to send and parse.
                "SELECT jsonb_strip_nulls(to_jsonb(x)) FROM (
                     SELECT {columns} FROM results
                      WHERE started_at >= now() - make_interval(secs => $1)
                        AND (cardinality($2::text[]) = 0 OR agent_id = ANY($2))
                        AND ($3::text IS NULL OR test = $3)
                      ORDER BY started_at, agent_id, seq) x"
            ))
            .await?;
        let agents: Vec<&str> = filter.agents.iter().map(String::as_str).collect();
        let portal = tx
            .bind(
                &statement,
                &[&filter.since.as_secs_f64(), &agents, &filter.test],
            )
            .await?;
        Ok(Cursor {
            tx,
            portal,
            done: false,
        })
    }

    /// The next batch of at most [`BATCH`] rows, each one JSON object with its nulls left
    /// out; `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Vec<Map<String, Value>>>, FleetError> {
        if self.done {
            return Ok(None);
        }
        let rows = self.tx.query_portal(&self.portal, BATCH).await?;
        if rows.is_empty() {
            self.done = true;
            return Ok(None);
        }
        Ok(Some(
            rows.iter()
                .filter_map(|r| match r.get::<_, Json<Value>>(0).0 {
                    Value::Object(mut object) => {
                        object.retain(|_, v| !v.is_null());
                        Some(object)
                    }
                    _ => None,
                })
                .collect(),
        ))
    }
}

/// The head of an export in `format` (the CSV header; `table` has its own in the CLI).
pub fn head(format: Format) -> String {
    match format {
        Format::Csv => csv_header(),
        _ => String::new(),
    }
}

/// One row of an export in `format` (json or csv); `n` counts rows from 0.
pub fn line(format: Format, row: &Map<String, Value>, n: u64) -> String {
    match format {
        Format::Csv => csv_line(row),
        _ => json_element(row, n == 0),
    }
}

/// The tail of an export of `rows` rows in `format`.
pub fn tail(format: Format, rows: u64) -> &'static str {
    match format {
        Format::Json => json_end(rows),
        _ => "",
    }
}

/// The CSV header line.
pub fn csv_header() -> String {
    let mut line = COLUMNS.join(",");
    line.push_str("\r\n");
    line
}

/// One CSV line: every column of [`COLUMNS`], quoted where it must be.
pub fn csv_line(row: &Map<String, Value>) -> String {
    let mut line = String::new();
    for (i, c) in COLUMNS.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        match row.get(*c) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => line.push_str(&csv_field(s)),
            Some(other) => line.push_str(&csv_field(&other.to_string())),
        }
    }
    line.push_str("\r\n");
    line
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One element of the streamed JSON array: `[` before the first, `,` before the others.
pub fn json_element(row: &Map<String, Value>, first: bool) -> String {
    let text = serde_json::to_string(row).unwrap_or_else(|_| "{}".into());
    format!("{}{text}\n", if first { "[\n" } else { "," })
}

/// The end of the streamed JSON array (the whole array when there was no row).
pub fn json_end(rows: u64) -> &'static str {
    if rows == 0 {
        "[]\n"
    } else {
        "]\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_it_must_and_keeps_the_column_order() {
        let mut row = Map::new();
        row.insert("agent_id".into(), "b1".into());
        row.insert("error_message".into(), "refused, \"no\"".into());
        row.insert("success".into(), false.into());
        row.insert("duration_seconds".into(), 0.25.into());
        let line = csv_line(&row);
        assert!(
            line.starts_with(",b1,,,,,false,0.25,,\"refused, \"\"no\"\"\","),
            "{line}"
        );
        // The separators and the comma inside the quoted message.
        assert_eq!(line.matches(',').count(), COLUMNS.len() - 1 + 1);
        assert!(csv_header().starts_with("started_at,agent_id,seq,"));
        assert!(csv_header().ends_with(",ip_family,local_address,interface\r\n"));
        let mut linked = row.clone();
        linked.insert("ip_family".into(), "ipv6".into());
        linked.insert("interface".into(), "wwan0".into());
        assert!(csv_line(&linked).ends_with(",ipv6,,wwan0\r\n"));
    }

    #[test]
    fn json_elements_make_one_array() {
        let mut row = Map::new();
        row.insert("seq".into(), 1.into());
        let text = format!(
            "{}{}{}",
            json_element(&row, true),
            json_element(&row, false),
            json_end(2)
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert_eq!(
            serde_json::from_str::<Value>(json_end(0)).unwrap(),
            Value::Array(vec![])
        );
    }
}
