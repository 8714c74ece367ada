//! The path commands (SPEC section 15, issue 22): `paths shared`, the hops that the agents
//! whose path got worse have in common (the SQL function `path_shared_hops`, migration
//! 0005), and `asn load`, which fills the optional `asn_ranges` table those hops are named
//! from.
//!
//! Invariants: `asn load` replaces the table's contents in one transaction (a file with a
//! bad line changes nothing and names the line), streaming the file into one COPY: memory
//! does not grow with the file. Both commands reach PostgreSQL like `tests` and `run-now`
//! (`cli::DbArgs`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Subcommand;
use futures::{pin_mut, SinkExt};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

use crate::cli::{self, DbArgs, Failure};
use crate::pg;

/// `paths ...`.
#[derive(Subcommand)]
pub enum PathsCommand {
    /// The hops that degraded agents share: agents whose path loss or destination RTT in
    /// the last SINCE is clearly worse than in the BASELINE before it (docs/OPERATIONS.md
    /// "Paths"), with every hop their recent path results went through, the AS of each
    /// (after `asn load`), how many agents go through it and how many of them are degraded.
    /// Most degraded agents first.
    Shared {
        /// The recent window.
        #[arg(long, default_value = "1h", value_parser = edgeprobe_proto::testdef::parse_duration)]
        since: Duration,
        /// The window before it that the recent one is compared with.
        #[arg(long, default_value = "24h", value_parser = edgeprobe_proto::testdef::parse_duration)]
        baseline: Duration,
        /// Print one JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
}

/// `asn ...`.
#[derive(Subcommand)]
pub enum AsnCommand {
    /// Replace the AS numbers of address ranges with FILE, in the public ip-to-ASN TSV
    /// layout (iptoasn.com's ip2asn-combined.tsv, IPv4 and IPv6: range start, range end,
    /// AS number, country, description; tab-separated). "-" reads stdin
    /// (`zcat ip2asn-combined.tsv.gz | edgeprobe-collector asn load -`). Ranges of AS 0
    /// ("Not routed") are skipped. A bad line stops the load with its line number and
    /// changes nothing.
    Load {
        /// The TSV file, or - for stdin.
        file: PathBuf,
    },
}

/// One hop of `paths shared`.
#[derive(Debug, serde::Serialize)]
struct SharedHop {
    address: String,
    asn: Option<i64>,
    as_name: Option<String>,
    agents: i64,
    degraded_agents: i64,
    loss_ratio: Option<f64>,
}

/// `paths shared`.
pub async fn paths(db: DbArgs, command: PathsCommand) -> Result<ExitCode, Failure> {
    let PathsCommand::Shared {
        since,
        baseline,
        json,
    } = command;
    database_only(&db, "paths shared")?;
    let client = cli::connect(&db).await?.client;
    let rows = client
        .query(
            "SELECT address, asn, as_name, agents, degraded_agents, loss_ratio
               FROM path_shared_hops(make_interval(secs => $1), make_interval(secs => $2))",
            &[&since.as_secs_f64(), &baseline.as_secs_f64()],
        )
        .await
        .map_err(|e| {
            Failure::Runtime(format!(
                "error: cannot read the shared hops: {}",
                pg::describe(&e)
            ))
        })?;
    let hops: Vec<SharedHop> = rows
        .iter()
        .map(|r| SharedHop {
            address: r.get(0),
            asn: r.get(1),
            as_name: r.get(2),
            agents: r.get(3),
            degraded_agents: r.get(4),
            loss_ratio: r.get(5),
        })
        .collect();
    let mut out = String::new();
    if json {
        out = serde_json::to_string_pretty(&hops).expect("plain structs serialize");
        out.push('\n');
    } else if hops.is_empty() {
        let _ = writeln!(
            out,
            "no degraded path tests: no agent's path loss or RTT in the last {} is clearly worse than in the {} before",
            humantime::format_duration(since),
            humantime::format_duration(baseline)
        );
    } else {
        let rows: Vec<[String; 6]> = hops
            .iter()
            .map(|h| {
                [
                    h.address.clone(),
                    h.asn.map_or_else(|| "-".into(), |a| format!("AS{a}")),
                    h.as_name.clone().unwrap_or_else(|| "-".into()),
                    h.agents.to_string(),
                    h.degraded_agents.to_string(),
                    h.loss_ratio
                        .map_or_else(|| "-".into(), |l| format!("{:.1} %", l * 100.0)),
                ]
            })
            .collect();
        table(
            &mut out,
            ["HOP", "ASN", "AS NAME", "AGENTS", "DEGRADED", "LOSS"],
            &rows,
        );
    }
    print(&out);
    Ok(ExitCode::SUCCESS)
}

/// Writes `text` to stdout; a closed pipe (`| head`) ends the process quietly.
fn print(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush())
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
    }
}

fn table<const N: usize>(out: &mut String, header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// One range of the ip-to-ASN layout.
#[derive(Debug, PartialEq)]
struct AsnRange<'a> {
    start: IpAddr,
    end: IpAddr,
    asn: u32,
    country: &'a str,
    name: &'a str,
}

/// Parses one line: Ok(None) for a line to skip (empty, or AS 0 "Not routed").
fn parse_line(line: &str) -> Result<Option<AsnRange<'_>>, String> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.trim().is_empty() {
        return Ok(None);
    }
    let fields: Vec<&str> = line.split('\t').collect();
    let [start, end, asn, country, name] = fields[..] else {
        return Err(format!(
            "{} tab-separated fields, expected 5 (range start, range end, AS number, country, description)",
            fields.len()
        ));
    };
    let ip = |what: &str, s: &str| {
        s.trim()
            .parse::<IpAddr>()
            .map_err(|_| format!("{what} `{}` is not an IP address", s.escape_debug()))
    };
    let (start, end) = (ip("range start", start)?, ip("range end", end)?);
    if start.is_ipv4() != end.is_ipv4() {
        return Err(format!("range {start} - {end} mixes IPv4 and IPv6"));
    }
    if start > end {
        return Err(format!("range start {start} is after its end {end}"));
    }
    let asn: u32 = asn
        .trim()
        .parse()
        .map_err(|_| format!("AS number `{}` is not a number", asn.escape_debug()))?;
    if asn == 0 {
        return Ok(None);
    }
    for (what, s) in [("country", country), ("description", name)] {
        if s.contains('\0') {
            return Err(format!("{what} contains NUL"));
        }
    }
    Ok(Some(AsnRange {
        start,
        end,
        asn,
        country: country.trim(),
        name: name.trim(),
    }))
}

/// Appends `s` in COPY's text format (backslash escapes).
fn copy_text(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// What `asn load` loaded.
#[derive(Debug, Default, PartialEq)]
struct Loaded {
    v4: u64,
    v6: u64,
    not_routed: u64,
}

/// Bytes handed to the COPY at a time.
const CHUNK: usize = 256 * 1024;

/// `asn load FILE`.
pub async fn asn(db: DbArgs, command: AsnCommand) -> Result<ExitCode, Failure> {
    let AsnCommand::Load { file } = command;
    let shown = file.display().to_string();
    // The file is opened before the database: a typo in the path costs no connection.
    let path = if file == Path::new("-") {
        Path::new("/dev/stdin")
    } else {
        file.as_path()
    };
    let f = tokio::fs::File::open(path)
        .await
        .map_err(|e| Failure::Usage(format!("{shown}: cannot read: {e}")))?;
    let input: Box<dyn AsyncBufRead + Unpin> = Box::new(BufReader::with_capacity(CHUNK, f));
    database_only(&db, "asn load")?;
    let mut client = cli::connect(&db).await?.client;
    let db_error = |what: &str, e: tokio_postgres::Error| {
        Failure::Runtime(format!("error: {what}: {}", pg::describe(&e)))
    };
    let tx = client
        .transaction()
        .await
        .map_err(|e| db_error("cannot start the load", e))?;
    // The index is built once after the rows: far cheaper than kept up row by row.
    tx.batch_execute("TRUNCATE asn_ranges; DROP INDEX IF EXISTS asn_ranges_range_idx")
        .await
        .map_err(|e| db_error("cannot empty asn_ranges", e))?;
    let sink = tx
        .copy_in::<_, Bytes>("COPY asn_ranges (range, asn, country, as_name) FROM STDIN")
        .await
        .map_err(|e| db_error("cannot start the COPY into asn_ranges", e))?;
    pin_mut!(sink);
    let loaded = stream_ranges(input, &shown, sink.as_mut()).await?;
    sink.finish()
        .await
        .map_err(|e| db_error("the COPY into asn_ranges failed", e))?;
    tx.batch_execute(
        "CREATE INDEX asn_ranges_range_idx ON asn_ranges USING gist (range); ANALYZE asn_ranges",
    )
    .await
    .map_err(|e| db_error("cannot index asn_ranges", e))?;
    tx.commit()
        .await
        .map_err(|e| db_error("cannot commit the load", e))?;
    print(&format!(
        "loaded {} ranges from {shown} ({} IPv4, {} IPv6); skipped {} not routed (AS 0)\n",
        loaded.v4 + loaded.v6,
        loaded.v4,
        loaded.v6,
        loaded.not_routed
    ));
    Ok(ExitCode::SUCCESS)
}

/// Reads the lines of `input` and sends them to `sink` as COPY text rows, in chunks.
/// A bad line is an error naming `shown` and its line number; the caller's transaction
/// then rolls back (the unfinished COPY is abandoned with it).
async fn stream_ranges(
    mut input: Box<dyn AsyncBufRead + Unpin>,
    shown: &str,
    mut sink: std::pin::Pin<&mut tokio_postgres::CopyInSink<Bytes>>,
) -> Result<Loaded, Failure> {
    let mut loaded = Loaded::default();
    let mut chunk = String::with_capacity(CHUNK + 1024);
    let mut raw = Vec::new();
    let mut number = 0u64;
    loop {
        raw.clear();
        let n = input
            .read_until(b'\n', &mut raw)
            .await
            .map_err(|e| Failure::Usage(format!("{shown}: cannot read: {e}")))?;
        if n == 0 {
            break;
        }
        number += 1;
        let at = |reason: String| Failure::Usage(format!("{shown}:{number}: {reason}"));
        let line = std::str::from_utf8(&raw).map_err(|_| at("not UTF-8".into()))?;
        let line = line.strip_suffix('\n').unwrap_or(line);
        match parse_line(line).map_err(at)? {
            None => {
                if !line.trim().is_empty() {
                    loaded.not_routed += 1;
                }
            }
            Some(r) => {
                let _ = write!(chunk, "[{},{}]\t{}\t", r.start, r.end, r.asn);
                copy_text(&mut chunk, r.country);
                chunk.push('\t');
                copy_text(&mut chunk, r.name);
                chunk.push('\n');
                match r.start {
                    IpAddr::V4(_) => loaded.v4 += 1,
                    IpAddr::V6(_) => loaded.v6 += 1,
                }
            }
        }
        if chunk.len() >= CHUNK {
            let full = std::mem::replace(&mut chunk, String::with_capacity(CHUNK + 1024));
            sink.send(Bytes::from(full)).await.map_err(|e| {
                Failure::Runtime(format!(
                    "error: the COPY into asn_ranges failed at {shown}:{number}: {}",
                    pg::describe(&e)
                ))
            })?;
        }
    }
    if !chunk.is_empty() {
        sink.send(Bytes::from(chunk)).await.map_err(|e| {
            Failure::Runtime(format!(
                "error: the COPY into asn_ranges failed: {}",
                pg::describe(&e)
            ))
        })?;
    }
    Ok(loaded)
}

/// `paths` and `asn` read and write the database directly; the API does not serve them.
fn database_only(db: &DbArgs, command: &str) -> Result<(), Failure> {
    match db.api {
        Some(_) => Err(Failure::Usage(format!(
            "{command} works on the database (--database-url or --config), not over --api"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip2asn_lines_parse_and_bad_ones_say_why() {
        let r = parse_line("1.0.0.0\t1.0.0.255\t13335\tUS\tCLOUDFLARENET").unwrap();
        assert_eq!(
            r,
            Some(AsnRange {
                start: "1.0.0.0".parse().unwrap(),
                end: "1.0.0.255".parse().unwrap(),
                asn: 13335,
                country: "US",
                name: "CLOUDFLARENET",
            })
        );
        let v6 = parse_line(
            "2001:db8::\t2001:db8:ffff:ffff:ffff:ffff:ffff:ffff\t64500\tDE\tEXAMPLE-NET Ünïcode\r",
        )
        .unwrap()
        .unwrap();
        assert_eq!(v6.name, "EXAMPLE-NET Ünïcode");
        assert_eq!(
            parse_line("0.0.0.0\t0.255.255.255\t0\tNone\tNot routed"),
            Ok(None)
        );
        assert_eq!(parse_line(""), Ok(None));
        for (line, reason) in [
            ("1.0.0.0\t1.0.0.255\t13335\tUS", "4 tab-separated fields"),
            ("1.0.0.x\t1.0.0.255\t1\tUS\tX", "range start `1.0.0.x`"),
            ("1.0.0.0\t::1\t1\tUS\tX", "mixes IPv4 and IPv6"),
            ("1.0.0.9\t1.0.0.1\t1\tUS\tX", "is after its end"),
            ("1.0.0.0\t1.0.0.1\tAS13335\tUS\tX", "AS number `AS13335`"),
            ("1.0.0.0\t1.0.0.1\t99999999999\tUS\tX", "is not a number"),
        ] {
            let e = parse_line(line).unwrap_err();
            assert!(e.contains(reason), "{line:?}: {e}");
        }
    }

    #[test]
    fn copy_text_escapes() {
        let mut out = String::new();
        copy_text(&mut out, "a\\b\tc\rd");
        assert_eq!(out, "a\\\\b\\tc\\rd");
    }
}
