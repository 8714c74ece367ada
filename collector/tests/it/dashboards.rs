//! grafana/: every dashboard query and every Prometheus rule, run for real.
//!
//! One PostgreSQL database filled by a real collector from real agents (http and tcp
//! probes against a local target, failures included) and, for the kinds whose probes
//! are not built yet (speed, icmp, dns, and https with a certificate), a synthetic agent
//! speaking the collector's own gRPC protocol: nothing is inserted into PostgreSQL
//! directly. A real Prometheus (the Debian package) scrapes that collector every second
//! with the shipped rule files loaded. Then every SQL panel query runs with Grafana's
//! macros and variables expanded as Grafana does, and every PromQL expression (panels,
//! variables, recording and alerting rules) runs through Prometheus' HTTP API. The same
//! Prometheus scrapes a real `prometheus-postgres-exporter` (the Debian package) pointed
//! at the test's database, as `grafana/prometheus/prometheus.yml` scrapes it (job
//! `edgeprobe-postgres`), so the dashboard's PostgreSQL row runs against real exporter
//! series.
//! promtool checks the shipped config and rules and runs the alert unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgeprobe_proto::v1 as pb;
use serde_json::Value;

use crate::support::*;

const POSTGRES_UID: &str = "edgeprobe-postgres";
const PROMETHEUS_UID: &str = "edgeprobe-prometheus";

fn grafana_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("grafana")
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = grafana_dir().join("dashboards");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), json)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        out.len(),
        5,
        "speed, fleet, probes, collector, paths dashboards"
    );
    out
}

/// Panels, with the panels nested in collapsed rows.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

fn promtool() -> PathBuf {
    let p = PathBuf::from("/usr/bin/promtool");
    assert!(
        p.exists(),
        "promtool missing: apt-get install prometheus (scripts/setup does)"
    );
    p
}

fn run_promtool(args: &[&str]) -> String {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(grafana_dir().join("prometheus"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

fn rule_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(grafana_dir().join("prometheus/rules"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    files.sort();
    files
}

#[test]
fn prometheus_config_and_rules_pass_promtool() {
    let config = run_promtool(&["check", "config", "prometheus.yml"]);
    assert!(config.contains("3 rule files found"), "{config}");
    // The job the dashboard's PostgreSQL row reads (its exporter series).
    let shipped = std::fs::read_to_string(grafana_dir().join("prometheus/prometheus.yml")).unwrap();
    for job in ["edgeprobe-collector", "edgeprobe-postgres"] {
        assert!(
            shipped.contains(&format!("- job_name: {job}\n")),
            "prometheus.yml scrapes no job {job}"
        );
    }
    let files: Vec<String> = rule_files()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let mut args = vec!["check", "rules"];
    args.extend(files.iter().map(String::as_str));
    let rules = run_promtool(&args);
    assert_eq!(rules.matches("SUCCESS").count(), 3, "{rules}");
}

#[test]
fn alert_rule_unit_tests_pass_including_m_of_n_debounce_and_recovery() {
    let out = run_promtool(&["test", "rules", "tests/edgeprobe-alerts.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert has a unit test.
    let tests =
        std::fs::read_to_string(grafana_dir().join("prometheus/tests/edgeprobe-alerts.test.yml"))
            .unwrap();
    for (name, _) in rules().into_iter().filter(|(n, _)| !n.contains(':')) {
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "alert {name} has no unit test"
        );
    }
}

#[test]
fn dashboards_are_valid_and_use_only_provisioned_datasources() {
    let provisioning =
        std::fs::read_to_string(grafana_dir().join("provisioning/datasources/edgeprobe.yaml"))
            .unwrap();
    let uids: BTreeSet<&str> = provisioning
        .lines()
        .filter_map(|l| l.trim().strip_prefix("uid: "))
        .collect();
    assert_eq!(uids, BTreeSet::from([POSTGRES_UID, PROMETHEUS_UID]));
    // A place for the CA of sslmode verify-full, as Grafana's postgres datasource reads it.
    for line in [
        "tlsConfigurationMethod: file-path",
        "sslRootCertFile: ${EDGEPROBE_PG_CA_FILE}",
    ] {
        assert!(provisioning.contains(line), "datasource lacks {line:?}");
    }
    let readme = std::fs::read_to_string(grafana_dir().join("README.md")).unwrap();
    assert!(
        readme.contains("Environment=EDGEPROBE_PG_CA_FILE="),
        "grafana/README.md does not show EDGEPROBE_PG_CA_FILE"
    );
    for var in [
        "EDGEPROBE_PG_HOST",
        "EDGEPROBE_PG_USER",
        "EDGEPROBE_PG_PASSWORD",
        "EDGEPROBE_PG_DATABASE",
        "EDGEPROBE_PROMETHEUS_URL",
        "EDGEPROBE_PG_SSLMODE",
        "EDGEPROBE_PG_CA_FILE",
    ] {
        assert!(
            provisioning.contains(&format!("${{{var}}}")),
            "{var} not used"
        );
    }

    let mut dash_uids = BTreeSet::new();
    let mut panel_count = 0;
    for (file, dash) in dashboards() {
        let uid = dash["uid"].as_str().unwrap_or_default();
        assert!(
            uid.starts_with("edgeprobe-"),
            "{file}: uid {uid:?} must be stable and start with edgeprobe-"
        );
        assert!(dash_uids.insert(uid.to_string()), "{file}: duplicate uid");
        assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
        let vars: Vec<&str> = dash["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                // A custom variable is a fixed list of values, without a datasource.
                if v["type"] != "custom" {
                    let ds = v["datasource"]["uid"].as_str().unwrap_or_default();
                    assert!(uids.contains(ds), "{file}: variable datasource {ds:?}");
                }
                v["name"].as_str().unwrap()
            })
            .collect();
        let mut ids = BTreeSet::new();
        for p in panels(&dash) {
            let title = p["title"].as_str().unwrap_or_default();
            assert!(!title.is_empty(), "{file}: panel without a title");
            assert!(
                ids.insert(p["id"].as_i64().unwrap()),
                "{file}: duplicate panel id in {title}"
            );
            if p["type"] == "row" {
                continue;
            }
            panel_count += 1;
            assert!(
                p["description"].as_str().is_some_and(|d| d.len() > 10),
                "{file}: {title} has no description"
            );
            assert!(
                p["fieldConfig"]["defaults"]["unit"].is_string(),
                "{file}: {title} has no unit"
            );
            let ds = p["datasource"]["uid"].as_str().unwrap_or_default();
            assert!(uids.contains(ds), "{file}: {title}: datasource {ds:?}");
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{file}: {title} has no query");
            for t in targets {
                let tds = t["datasource"]["uid"].as_str().unwrap_or_default();
                assert!(uids.contains(tds), "{file}: {title}: target datasource");
                let query = t["rawSql"].as_str().or(t["expr"].as_str()).unwrap();
                // Variables a query uses must exist on the dashboard.
                for name in [
                    "site",
                    "agent",
                    "test",
                    "instance",
                    "interface",
                    "ip_family",
                ] {
                    if query.contains(&format!("${name}")) {
                        assert!(vars.contains(&name), "{file}: {title} uses ${name}");
                    }
                }
            }
        }
    }
    assert_eq!(
        dash_uids,
        BTreeSet::from(
            [
                "edgeprobe-collector",
                "edgeprobe-fleet",
                "edgeprobe-paths",
                "edgeprobe-probes",
                "edgeprobe-speed"
            ]
            .map(String::from)
        )
    );
    assert!(panel_count >= 40, "only {panel_count} panels");
}

// ---------------------------------------------------------------------------------------
// Grafana's query interpolation, as its frontend (variables) and its PostgreSQL backend
// (macros) do it.

/// Seconds of a Grafana interval such as `1m`, `30s`, `1h`.
fn interval_seconds(s: &str) -> u64 {
    let s = s.trim().trim_matches('\'');
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("interval {s:?}"));
    n * match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => panic!("interval unit {other:?}"),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Flavor {
    Sql,
    Prom,
}

/// A multi-value variable with "All" selected, formatted for a datasource:
/// PostgreSQL quotes each value and joins them with commas; Prometheus makes a regex
/// alternation of the escaped values (a single value stays bare).
fn format_var(values: &[String], flavor: Flavor, format: Option<&str>) -> String {
    match (flavor, format) {
        (_, Some("sqlstring")) | (Flavor::Sql, None) => values
            .iter()
            .map(|v| format!("'{}'", v.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(","),
        (_, Some("csv")) => values.join(","),
        (Flavor::Prom, None) | (_, Some("regex")) => {
            let escaped: Vec<String> = values
                .iter()
                .map(|v| {
                    let mut out = String::new();
                    for c in v.chars() {
                        if "$^*{}[]'+?.()|\\".contains(c) {
                            out.push_str("\\\\");
                        }
                        out.push(c);
                    }
                    out
                })
                .collect();
            if escaped.len() == 1 {
                escaped[0].clone()
            } else {
                format!("({})", escaped.join("|"))
            }
        }
        (_, Some(other)) => panic!("variable format {other:?} not handled by the test"),
    }
}

/// Replaces `$name`, `${name}`, `${name:format}` and `[[name]]` of known variables.
fn interpolate_vars(q: &str, vars: &BTreeMap<String, Vec<String>>, flavor: Flavor) -> String {
    let mut out = q.to_string();
    for (name, values) in vars {
        for fmt in ["sqlstring", "csv", "regex"] {
            out = out.replace(
                &format!("${{{name}:{fmt}}}"),
                &format_var(values, flavor, Some(fmt)),
            );
        }
        let value = format_var(values, flavor, None);
        out = out.replace(&format!("${{{name}}}"), &value);
        out = out.replace(&format!("[[{name}]]"), &value);
        // `$name` not followed by a word character.
        let pat = format!("${name}");
        let mut res = String::new();
        let mut rest = out.as_str();
        while let Some(i) = rest.find(&pat) {
            let after = &rest[i + pat.len()..];
            res.push_str(&rest[..i]);
            if after.starts_with(|c: char| c.is_alphanumeric() || c == '_') {
                res.push_str(&pat);
            } else {
                res.push_str(&value);
            }
            rest = after;
        }
        res.push_str(rest);
        out = res;
    }
    out
}

struct TimeRange {
    from: SystemTime,
    to: SystemTime,
    interval: &'static str,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Grafana's PostgreSQL macros (pkg/tsdb/grafana-postgresql-datasource/macros.go).
fn expand_sql_macros(q: &str, range: &TimeRange) -> String {
    let q = q
        .replace(
            "$__interval_ms",
            &(interval_seconds(range.interval) * 1000).to_string(),
        )
        .replace("$__interval", range.interval);
    let mut out = String::new();
    let mut rest = q.as_str();
    while let Some(i) = rest.find("$__") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 3..];
        let name_end = after
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..name_end];
        let tail = &after[name_end..];
        assert!(tail.starts_with('('), "macro $__{name} without arguments");
        // Arguments up to the matching parenthesis.
        let mut depth = 0;
        let mut end = 0;
        for (j, c) in tail.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = j;
                        break;
                    }
                }
                _ => {}
            }
        }
        let args: Vec<&str> = tail[1..end].split(',').map(str::trim).collect();
        let from = format!("'{}'", rfc3339(range.from));
        let to = format!("'{}'", rfc3339(range.to));
        let expanded = match name {
            "timeFilter" => format!("{} BETWEEN {from} AND {to}", args[0]),
            "timeFrom" => from,
            "timeTo" => to,
            "timeGroup" | "timeGroupAlias" => {
                let secs = interval_seconds(args[1]);
                let group = format!("floor(extract(epoch from {})/{secs})*{secs}", args[0]);
                if name == "timeGroupAlias" {
                    format!("{group} AS \"time\"")
                } else {
                    group
                }
            }
            "unixEpochFilter" => format!(
                "{c} >= {} AND {c} <= {}",
                range.from.duration_since(UNIX_EPOCH).unwrap().as_secs(),
                range.to.duration_since(UNIX_EPOCH).unwrap().as_secs(),
                c = args[0]
            ),
            other => panic!("macro $__{other} not handled by the test"),
        };
        out.push_str(&expanded);
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Prometheus' built-in Grafana variables, for a 1 s scrape interval.
fn expand_prom_builtins(q: &str) -> String {
    q.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "1h")
}

// ---------------------------------------------------------------------------------------
// prometheus-postgres-exporter

/// Debian's `prometheus-postgres-exporter` against the test's database, as the ansible
/// role runs it next to PostgreSQL.
struct PgExporter {
    _proc: Proc,
    addr: SocketAddr,
}

impl PgExporter {
    fn start(dir: &Path, db: &TestDb) -> PgExporter {
        let bin = PathBuf::from("/usr/bin/prometheus-postgres-exporter");
        assert!(
            bin.exists(),
            "prometheus-postgres-exporter missing: apt-get install prometheus-postgres-exporter (scripts/setup does)"
        );
        // lib/pq, the exporter's driver, defaults to sslmode=require; the test server has
        // no TLS.
        let sep = if db.url.contains('?') { '&' } else { '?' };
        let dsn = format!("{}{sep}sslmode=disable", db.url);
        let addr = free_addr();
        let mut cmd = Command::new(bin);
        cmd.env("DATA_SOURCE_NAME", dsn)
            .arg(format!("--web.listen-address={addr}"));
        let proc = Proc::spawn(cmd, dir.join("postgres-exporter.log"));
        let e = PgExporter { _proc: proc, addr };
        wait_for(Duration::from_secs(30), "postgres exporter pg_up 1", || {
            http10_get(addr, "/metrics")
                .filter(|(s, body)| *s == 200 && body.lines().any(|l| l == "pg_up 1"))
        });
        e
    }
}

// ---------------------------------------------------------------------------------------
// Prometheus

struct Prometheus {
    _proc: Proc,
    addr: SocketAddr,
}

impl Prometheus {
    /// Scrapes `collector` and `exporter` every second and evaluates the shipped rules
    /// every second.
    fn start(dir: &Path, collector: SocketAddr, exporter: SocketAddr) -> Prometheus {
        let bin = PathBuf::from("/usr/bin/prometheus");
        assert!(
            bin.exists(),
            "prometheus missing: apt-get install prometheus (scripts/setup does)"
        );
        let rules: Vec<String> = rule_files()
            .iter()
            .map(|p| format!("  - {}\n", p.display()))
            .collect();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}scrape_configs:\n  - job_name: edgeprobe-collector\n    static_configs:\n      - targets: [\"{collector}\"]\n  - job_name: edgeprobe-postgres\n    static_configs:\n      - targets: [\"{exporter}\"]\n",
                rules.concat()
            ),
        )
        .unwrap();
        let addr = free_addr();
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--storage.tsdb.retention.time=1h");
        let proc = Proc::spawn(cmd, dir.join("prometheus.log"));
        let p = Prometheus { _proc: proc, addr };
        wait_for(Duration::from_secs(30), "prometheus /-/ready", || {
            http10_get(addr, "/-/ready").filter(|(s, _)| *s == 200)
        });
        p
    }

    /// An instant query; the `data` of a successful answer.
    fn query(&self, expr: &str) -> Result<Value, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let (status, body) = http10_get(self.addr, &path).ok_or_else(|| "no answer".to_string())?;
        let json: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if status != 200 || json["status"] != "success" {
            return Err(format!("HTTP {status}: {body}"));
        }
        Ok(json["data"].clone())
    }

    /// The series of a query, polled until there is at least one (rules and rates need a
    /// few scrapes and evaluations).
    fn series(&self, expr: &str) -> Vec<Value> {
        let mut last = String::new();
        for _ in 0..100 {
            match self.query(expr) {
                Ok(data) => {
                    let result = data["result"].as_array().cloned().unwrap_or_default();
                    if !result.is_empty() {
                        return result;
                    }
                    last = "no series".into();
                }
                Err(e) => panic!("query failed: {expr}\n{e}"),
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!("no series after 30s: {expr} ({last})");
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// HTTP/1.0 GET, so the answer is never chunked; returns (status, body).
fn http10_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// (name, expr) of every rule in the shipped rule files: record names contain a colon,
/// alert names do not.
fn rules() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for file in rule_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut lines = text.lines().peekable();
        let mut name: Option<String> = None;
        while let Some(line) = lines.next() {
            let t = line.trim_start().trim_start_matches("- ");
            if let Some(n) = t
                .strip_prefix("record: ")
                .or_else(|| t.strip_prefix("alert: "))
            {
                name = Some(n.trim().to_string());
            } else if let Some(e) = t.strip_prefix("expr: ") {
                let indent = line.len() - line.trim_start().len();
                let expr = if e.trim() == "|" {
                    let mut block = Vec::new();
                    while let Some(next) = lines.peek() {
                        let ni = next.len() - next.trim_start().len();
                        if next.trim().is_empty() || ni <= indent {
                            break;
                        }
                        block.push(next.trim().to_string());
                        lines.next();
                    }
                    block.join("\n")
                } else {
                    e.trim().to_string()
                };
                out.push((name.take().expect("expr after a name"), expr));
            }
        }
    }
    out
}

/// Metric and recording-rule names an expression selects.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("edgeprobe") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        // Not a label value such as job="edgeprobe-collector".
        if name.starts_with("edgeprobe_") || name.starts_with("edgeprobe:") {
            names.insert(name.to_string());
        }
        rest = &tail[end.max(1)..];
    }
    names
}

// ---------------------------------------------------------------------------------------
// The synthetic agent: speed, icmp, dns and https results over the collector's gRPC.

fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64
}

/// A path result of `agent` at `at` through `middle` to 203.0.113.10, with `loss` at the
/// middle hop that carries on to the destination.
fn synthetic_path(
    agent: &str,
    labels: &std::collections::HashMap<String, String>,
    at: SystemTime,
    middle: &str,
    loss: f64,
) -> pb::Result {
    let destination = "203.0.113.10";
    let mut r = path_result(
        agent,
        0,
        unix_nanos(at),
        &["192.168.1.1", "100.64.0.1", middle, destination],
    );
    r.test = "path-upstream".into();
    r.labels = labels.clone();
    let p = path_fields(&mut r);
    p.hops[2] = path_hop(3, middle, loss);
    p.hops[3] = path_hop(4, destination, loss);
    p.path_loss_ratio = p.hops[3].loss_ratio;
    r
}

/// Realistic results of an agent at `site` over the last 48 minutes, oldest first:
/// a speed run every 4 minutes (3 of them below 50 Mbit/s, one failed), icmp with some
/// loss, dns, an https check with a certificate expiring in 40 days, and a path test
/// whose route changes halfway and whose loss rose against its clean baseline of 1.5 to
/// 3 hours ago (so the Paths dashboard has a degraded agent and a path change).
fn synthetic_results(agent: &str, site: &str) -> Vec<pb::Result> {
    let now = SystemTime::now();
    let labels = BTreeMap::from([("site".to_string(), site.to_string())])
        .into_iter()
        .collect::<std::collections::HashMap<_, _>>();
    let mut out = Vec::new();
    for minutes in (90..=180).rev().step_by(15) {
        let at = now - Duration::from_secs(minutes * 60);
        out.push(synthetic_path(agent, &labels, at, "198.51.100.1", 0.0));
    }
    for k in (0..12u32).rev() {
        let at = now - Duration::from_secs(u64::from(k) * 240 + 30);
        let base = |test: &str, kind: pb::Kind, target: &str, secs: f64| pb::Result {
            agent_id: agent.into(),
            seq: 0,
            test: test.into(),
            kind: kind as i32,
            target: target.into(),
            started_at_unix_nanos: unix_nanos(at),
            duration_seconds: secs,
            success: true,
            error_class: String::new(),
            error_message: String::new(),
            labels: labels.clone(),
            fields: None,
            ..Default::default()
        };
        // Not in the first batch: a histogram series is born with its first observations,
        // which increase() cannot see (see grafana/README.md).
        let slow = matches!(k, 1 | 3 | 6);
        let mut speed = base("speed", pb::Kind::Speed, "https://speed.example.net", 10.4);
        if k == 9 {
            speed.success = false;
            speed.error_class = "timeout".into();
            speed.error_message = "no response from https://speed.example.net within 30s".into();
            speed.fields = Some(pb::result::Fields::Speed(pb::SpeedFields::default()));
        } else {
            let down = if slow {
                31.5e6
            } else {
                93.0e6 + f64::from(k) * 1.1e6
            };
            let up = if slow {
                8.2e6
            } else {
                38.0e6 + f64::from(k) * 0.4e6
            };
            speed.fields = Some(pb::result::Fields::Speed(pb::SpeedFields {
                download_bits_per_second: Some(down),
                upload_bits_per_second: Some(up),
                idle_latency_seconds: Some(0.0118 + f64::from(k) * 0.0002),
                jitter_seconds: Some(0.0014),
                download_loaded_latency_seconds: Some(if slow { 0.180 } else { 0.046 }),
                upload_loaded_latency_seconds: Some(if slow { 0.240 } else { 0.061 }),
                bytes_downloaded: (down * 5.0 / 8.0) as u64,
                bytes_uploaded: (up * 5.0 / 8.0) as u64,
                // Loss under load: the slow runs' saturated queue drops 3 % downstream.
                download_loaded_loss_ratio: Some(if slow { 0.03 } else { 0.001 }),
                upload_loaded_loss_ratio: Some(0.0),
            }));
        }
        out.push(speed);
        let received = if k % 3 == 0 { 8 } else { 10 };
        let mut icmp = base("ping-gateway", pb::Kind::Icmp, "192.0.2.1", 9.2);
        icmp.fields = Some(pb::result::Fields::Icmp(pb::IcmpFields {
            sent: 10,
            received,
            loss_ratio: Some(1.0 - f64::from(received) / 10.0),
            rtt_min_seconds: Some(0.0081),
            rtt_avg_seconds: Some(0.0094),
            rtt_max_seconds: Some(0.0142),
            rtt_mdev_seconds: Some(0.0011),
        }));
        out.push(icmp);
        let mut dns = base("dns-example", pb::Kind::Dns, "example.net", 0.012);
        dns.fields = Some(pb::result::Fields::Dns(pb::DnsFields {
            resolve_seconds: Some(0.0117),
            answers: 2,
            rcode: "NOERROR".into(),
        }));
        out.push(dns);
        let mut https = base(
            "https-portal",
            pb::Kind::Http,
            "https://portal.example.net/",
            0.21,
        );
        https.fields = Some(pb::result::Fields::Http(pb::HttpFields {
            status_code: Some(if k == 2 { 503 } else { 200 }),
            dns_seconds: Some(0.004),
            connect_seconds: Some(0.021),
            tls_seconds: Some(0.043),
            ttfb_seconds: Some(0.118),
            transfer_seconds: Some(0.012),
            body_bytes: 18_342,
            tls_cert_expiry_seconds: Some(40.0 * 86_400.0 - f64::from(k) * 240.0),
        }));
        out.push(https);
        let middle = if k >= 6 {
            "198.51.100.1"
        } else {
            "198.51.100.9"
        };
        out.push(synthetic_path(agent, &labels, at, middle, 0.2));
        // Responsiveness: fair to good, poor in the slow speed runs' minutes (bufferbloat).
        let rpm = if slow {
            180.0
        } else {
            650.0 + f64::from(k) * 210.0
        };
        let mut nq = responsiveness_result(agent, 0, unix_nanos(at), site, rpm);
        nq.labels = labels.clone();
        out.push(nq);
        // STAMP to the site's router: clean, but 2 % lost on the way out in the slow
        // minutes (the uplink is the bottleneck), a little back now and then.
        let (forward_lost, reverse_lost) = if slow { (20, 1) } else { (0, k % 2) };
        let mut stamp = base("voice-router", pb::Kind::Stamp, "192.0.2.1:862", 20.1);
        stamp.fields = Some(pb::result::Fields::Stamp(pb::StampFields {
            sent: 1000,
            received: 1000 - forward_lost - reverse_lost,
            forward_lost,
            reverse_lost,
            forward_loss_ratio: Some(f64::from(forward_lost) / 1000.0),
            reverse_loss_ratio: Some(f64::from(reverse_lost) / f64::from(1000 - forward_lost)),
            duplicates: 0,
            reordered: u32::from(slow) * 4,
            rtt_min_seconds: Some(0.0102),
            rtt_avg_seconds: Some(if slow { 0.0481 } else { 0.0118 }),
            rtt_max_seconds: Some(if slow { 0.112 } else { 0.0203 }),
            rtt_mdev_seconds: Some(0.0009),
            forward_delay_min_seconds: Some(0.0061),
            forward_delay_avg_seconds: Some(if slow { 0.0412 } else { 0.0068 }),
            forward_delay_max_seconds: Some(if slow { 0.101 } else { 0.0141 }),
            reverse_delay_min_seconds: Some(0.0041),
            reverse_delay_avg_seconds: Some(0.0049),
            reverse_delay_max_seconds: Some(0.0071),
            jitter_seconds: Some(if slow { 0.0062 } else { 0.0007 }),
            mos: Some(if slow { 3.71 } else { 4.39 }),
        }));
        out.push(stamp);
        // Two links, two families: `web-dual` (family = "both" on wwan0) works over IPv4
        // and fails over IPv6 (no IPv6 route on that uplink); `dns-dual` (on eth0) works
        // over both. The "IPv6 fails while IPv4 works" panel lists the first only.
        let link = |mut r: pb::Result, family: &str, local: &str, interface: &str| {
            r.ip_family = family.into();
            r.local_address = local.into();
            r.interface = interface.into();
            r
        };
        let mut web = base(
            "web-dual",
            pb::Kind::Http,
            "https://portal.example.net/",
            0.2,
        );
        web.fields = Some(pb::result::Fields::Http(pb::HttpFields {
            status_code: Some(200),
            ttfb_seconds: Some(0.09),
            body_bytes: 18_342,
            ..Default::default()
        }));
        out.push(link(web.clone(), "ipv4", "100.64.7.2", "wwan0"));
        let mut web6 = web;
        web6.success = false;
        web6.error_class = "unreachable".into();
        web6.error_message = "connect to [2001:db8::80]:443: network unreachable".into();
        web6.fields = Some(pb::result::Fields::Http(pb::HttpFields::default()));
        out.push(link(web6, "ipv6", "", "wwan0"));
        let mut dns = base("dns-dual", pb::Kind::Dns, "example.net", 0.01);
        dns.fields = Some(pb::result::Fields::Dns(pb::DnsFields {
            resolve_seconds: Some(0.0101),
            answers: 1,
            rcode: "NOERROR".into(),
        }));
        out.push(link(dns.clone(), "ipv4", "192.168.1.20", "eth0"));
        out.push(link(dns, "ipv6", "2001:db8:1::20", "eth0"));
    }
    for (i, r) in out.iter_mut().enumerate() {
        r.seq = i as u64 + 1;
    }
    out
}

/// Sends `results` in `rounds` batches `pause` apart (so Prometheus scrapes between
/// them and rates are not zero), waits for each ack, then re-sends the first batch (a
/// lost-ack retry: duplicates) and reports a buffer with backlog and drops. Also opens
/// one stream with an invalid hello, as a broken agent would.
fn run_synthetic_agent(endpoint: String, agent: String, results: Vec<pb::Result>, pause: Duration) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut client = pb::ingest_client::IngestClient::connect(endpoint.clone())
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(agent_msg(pb::agent_message::Msg::Hello(pb::Hello {
            agent_id: agent.clone(),
            version: "0.1.0-synthetic".into(),
            labels: results[0].labels.clone(),
            ..Default::default()
        })))
        .await
        .unwrap();
        let mut inbound = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let welcome = inbound.message().await.unwrap().unwrap();
        assert!(matches!(
            welcome.msg,
            Some(pb::collector_message::Msg::Welcome(_))
        ));
        let chunks: Vec<Vec<pb::Result>> = results.chunks(16).map(<[_]>::to_vec).collect();
        for chunk in chunks.iter().chain(chunks.first()) {
            let last = chunk.last().unwrap().seq;
            tx.send(agent_msg(pb::agent_message::Msg::Batch(pb::ResultBatch {
                results: chunk.clone(),
            })))
            .await
            .unwrap();
            loop {
                match inbound.message().await.unwrap().and_then(|m| m.msg) {
                    Some(pb::collector_message::Msg::Ack(a)) if a.seq >= last => break,
                    Some(_) => {}
                    None => panic!("stream closed before the ack of {last}"),
                }
            }
            tokio::time::sleep(pause).await;
        }
        let oldest = SystemTime::now() - Duration::from_secs(95);
        tx.send(agent_msg(pb::agent_message::Msg::Heartbeat(
            pb::Heartbeat {
                backlog: 42,
                dropped: 3,
                oldest_unix_seconds: oldest.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64,
            },
        )))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(tx);

        // A broken agent: an empty id is refused and counted as a validate error.
        let mut bad = pb::ingest_client::IngestClient::connect(endpoint)
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(agent_msg(pb::agent_message::Msg::Hello(pb::Hello {
            agent_id: String::new(),
            version: "0.1.0".into(),
            labels: Default::default(),
            ..Default::default()
        })))
        .await
        .unwrap();
        let refused = bad
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        assert!(refused.is_err(), "an empty agent id must be refused");
    });
}

// ---------------------------------------------------------------------------------------
// The end-to-end test

fn real_agent(dir: &Path, id: &str, site: &str, endpoint: &str, target: SocketAddr) -> Agent {
    let closed = free_addr();
    let tests = format!(
        "[[test]]\nname = \"web\"\nkind = \"http\"\ntarget = \"http://{target}/\"\nevery = \"500ms\"\n\n\
         [[test]]\nname = \"web-port\"\nkind = \"tcp\"\ntarget = \"{target}\"\nevery = \"1s\"\n\n\
         [[test]]\nname = \"closed-port\"\nkind = \"http\"\ntarget = \"http://{closed}/\"\nevery = \"2s\"\n"
    );
    let agent = Agent::new(dir, id, endpoint, &tests);
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        text.replace("site = \"lab\"", &format!("site = \"{site}\"")),
    )
    .unwrap();
    agent
}

/// Columns of a query: (name, PostgreSQL type name).
fn columns(client: &mut postgres::Client, sql: &str) -> Vec<(String, String)> {
    let stmt = client
        .prepare(sql)
        .unwrap_or_else(|e| panic!("query does not prepare: {e}\n{sql}"));
    stmt.columns()
        .iter()
        .map(|c| (c.name().to_string(), c.type_().name().to_string()))
        .collect()
}

/// The rows of a query as JSON objects (any column type).
fn json_rows(client: &mut postgres::Client, sql: &str) -> Vec<serde_json::Map<String, Value>> {
    let wrapped = format!("SELECT to_jsonb(q)::text FROM ({sql}) q");
    client
        .query(&wrapped, &[])
        .unwrap_or_else(|e| panic!("query fails: {e}\n{sql}"))
        .iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .collect()
}

const NUMERIC: [&str; 6] = ["float8", "float4", "numeric", "int8", "int4", "int2"];

fn variable_query(v: &Value) -> String {
    v["query"]
        .as_str()
        .or(v["query"]["query"].as_str())
        .unwrap()
        .to_string()
}

/// `label_values(metric, label)` as PromQL returning one series per value.
fn label_values_expr(q: &str) -> (String, String) {
    let inner = q
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or_else(|| panic!("variable query {q:?}: only label_values(metric, label)"));
    let (metric, label) = inner.rsplit_once(',').unwrap();
    let label = label.trim().to_string();
    (format!("group by ({label}) ({})", metric.trim()), label)
}

/// The `sql` block of grafana/README.md's "A read-only role for Grafana", run verbatim but
/// for the role and database names (the role is cluster-wide: parallel tests need their
/// own). Dropped with its grants at the end of the test.
struct GrafanaRole {
    name: String,
    admin_url: String,
}

impl GrafanaRole {
    fn readme_sql() -> String {
        let readme = std::fs::read_to_string(grafana_dir().join("README.md")).unwrap();
        let start = readme
            .find("```sql\n")
            .expect("grafana/README.md has no ```sql block (the read-only role)");
        let body = &readme[start + "```sql\n".len()..];
        let end = body.find("```").expect("unterminated ```sql block");
        body[..end]
            .lines()
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn create(db: &TestDb) -> GrafanaRole {
        let dbname = db.url.rsplit('/').next().unwrap().to_string();
        let name = format!("grafana_ro_{dbname}");
        let documented = Self::readme_sql();
        for needle in ["CREATE ROLE grafana_ro LOGIN", "ON DATABASE edgeprobe TO"] {
            assert!(
                documented.contains(needle),
                "grafana/README.md's role SQL lacks {needle:?}:\n{documented}"
            );
        }
        let sql = documented
            .replace(
                "ON DATABASE edgeprobe TO",
                &format!("ON DATABASE {dbname} TO"),
            )
            .replace("grafana_ro", &name);
        let mut admin = db.client();
        admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {name}"))
            .unwrap();
        admin
            .batch_execute(&sql)
            .unwrap_or_else(|e| panic!("grafana/README.md's role SQL fails: {e}\n{sql}"));
        let role = GrafanaRole {
            name,
            admin_url: db.url.clone(),
        };
        // Read-only for real: it may not write, nor read what the dashboards do not need.
        let mut c = role.connect();
        for (what, sql) in [
            (
                "write",
                "INSERT INTO asn_ranges SELECT * FROM asn_ranges LIMIT 0",
            ),
            (
                "read the migrations",
                "SELECT count(*) FROM edgeprobe_migrations",
            ),
        ] {
            let err = c
                .batch_execute(sql)
                .expect_err(&format!("the Grafana role may {what}"));
            assert_eq!(
                err.code(),
                Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
                "{what}: {err:?}"
            );
        }
        role
    }

    fn connect(&self) -> postgres::Client {
        let mut config: postgres::Config = self.admin_url.parse().unwrap();
        config.user(&self.name).password("change-me");
        config
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot connect as {}: {e}", self.name))
    }
}

impl Drop for GrafanaRole {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&self.admin_url, postgres::NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP OWNED BY {0}; DROP ROLE IF EXISTS {0}",
                self.name
            ));
        }
    }
}

#[test]
fn every_dashboard_query_and_rule_returns_data_from_a_real_collector() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let collector = Collector::start(dir.path(), &db);
    let exporter = PgExporter::start(dir.path(), &db);
    let prometheus = Prometheus::start(dir.path(), collector.http, exporter.addr);
    for job in ["edgeprobe-collector", "edgeprobe-postgres"] {
        wait_for(Duration::from_secs(30), "a first scrape", || {
            prometheus
                .query(&format!("up{{job=\"{job}\"}} == 1"))
                .ok()
                .filter(|d| d["result"].as_array().is_some_and(|r| !r.is_empty()))
        });
    }

    let target = HttpTarget::start("edgeprobe dashboards");
    let mut agents = [
        real_agent(
            dir.path(),
            "edge-berlin-2",
            "berlin",
            &collector.endpoint(),
            target.addr,
        ),
        real_agent(
            dir.path(),
            "edge-hamburg-1",
            "hamburg",
            &collector.endpoint(),
            target.addr,
        ),
    ];
    for a in &mut agents {
        a.start();
    }
    let synthetic = synthetic_results("synthetic-berlin-1", "berlin");
    let synthetic_of = |kinds: &[pb::Kind]| {
        synthetic
            .iter()
            .filter(|r| kinds.iter().any(|k| *k as i32 == r.kind))
            .count() as i64
    };
    let synthetic_others = synthetic_of(&[pb::Kind::Speed, pb::Kind::Icmp, pb::Kind::Dns]);
    let synthetic_paths = synthetic_of(&[pb::Kind::Path]);
    let synthetic_responsiveness = synthetic_of(&[pb::Kind::Responsiveness]);
    let synthetic_stamp = synthetic_of(&[pb::Kind::Stamp]);
    run_synthetic_agent(
        collector.endpoint(),
        "synthetic-berlin-1".into(),
        synthetic,
        Duration::from_millis(1200),
    );
    wait_for(Duration::from_secs(60), "rows of every kind", || {
        let per_kind = |kind: &str| {
            db.scalar(&format!(
                "SELECT count(*) FROM results WHERE kind = '{kind}'"
            ))
        };
        let real = |agent: &str, kind: &str| {
            db.scalar(&format!(
                "SELECT count(*) FROM results WHERE agent_id = '{agent}' AND kind = '{kind}'"
            ))
        };
        let ready = ["edge-berlin-2", "edge-hamburg-1"]
            .iter()
            .all(|a| real(a, "http") >= 8 && real(a, "tcp") >= 3)
            && db.scalar("SELECT count(*) FROM results WHERE NOT success AND kind = 'http'") >= 2
            && per_kind("speed") + per_kind("icmp") + per_kind("dns") == synthetic_others
            && per_kind("path") == synthetic_paths
            && per_kind("responsiveness") == synthetic_responsiveness
            && per_kind("stamp") == synthetic_stamp;
        ready.then_some(())
    });
    // The speed dashboard's annotations: a fleet tests version and an on-demand run.
    let fleet = dir.path().join("fleet-tests.toml");
    std::fs::write(
        &fleet,
        format!("[[test]]\nname = \"fleet-tcp\"\nkind = \"tcp\"\ntarget = \"{}\"\nevery = \"1h\"\nselect = {{ site = \"berlin\" }}\n", target.addr),
    )
    .unwrap();
    let (code, out, err) = collector_cmd(&[
        "tests",
        "apply",
        "--file",
        fleet.to_str().unwrap(),
        "--database-url",
        &db.url,
    ]);
    assert_eq!(code, Some(0), "tests apply: {out}{err}");
    let addr = target.addr.to_string();
    let (code, out, err) = collector_cmd(&[
        "run-now",
        "--agent",
        "edge-berlin-2",
        "--kind",
        "tcp",
        "--target",
        &addr,
        "--json",
        "--database-url",
        &db.url,
    ]);
    assert_eq!(code, Some(0), "run-now: {out}{err}");

    let now = SystemTime::now();
    let range = TimeRange {
        from: now - Duration::from_secs(3600),
        to: now + Duration::from_secs(60),
        interval: "1m",
    };
    // Every SQL query runs as the read-only role grafana/README.md documents.
    let grafana_role = GrafanaRole::create(&db);
    let mut client = grafana_role.connect();
    let mut sql_checked = 0;
    let mut prom_checked = 0;
    let mut targets = 0;
    let mut report = Vec::new();
    let mut ran: BTreeSet<(String, String)> = BTreeSet::new();
    let mut rows_of: BTreeMap<(String, String), Vec<serde_json::Map<String, Value>>> =
        BTreeMap::new();
    let mut vars_seen: Vec<String> = Vec::new();
    for (file, dash) in dashboards() {
        // Variables first, as Grafana does, each with "All" selected; later variables
        // may use earlier ones.
        let mut vars: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for v in dash["templating"]["list"].as_array().unwrap() {
            let name = v["name"].as_str().unwrap().to_string();
            let query = variable_query(v);
            let values: Vec<String> = if v["type"] == "custom" {
                // Its default, as a dashboard opens.
                vec![v["current"]["value"].as_str().unwrap().to_string()]
            } else if v["datasource"]["uid"] == POSTGRES_UID {
                let sql = expand_sql_macros(&interpolate_vars(&query, &vars, Flavor::Sql), &range);
                client
                    .query(&sql, &[])
                    .unwrap_or_else(|e| panic!("{file}: variable {name}: {e}\n{sql}"))
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect()
            } else {
                let (expr, label) = label_values_expr(&query);
                prometheus
                    .series(&interpolate_vars(&expr, &vars, Flavor::Prom))
                    .iter()
                    .map(|s| s["metric"][&label].as_str().unwrap().to_string())
                    .collect()
            };
            assert!(!values.is_empty(), "{file}: variable {name} has no values");
            report.push(format!("{file}: ${name} = {values:?}"));
            if file == "collector.json" && name == "database" {
                vars_seen.clone_from(&values);
            }
            vars.insert(name, values);
        }
        for a in dash["annotations"]["list"].as_array().unwrap() {
            let name = a["name"].as_str().unwrap();
            assert_eq!(
                a["datasource"]["uid"], POSTGRES_UID,
                "{file}: annotation {name}"
            );
            let raw = a["target"]["rawSql"].as_str().unwrap();
            let sql = expand_sql_macros(&interpolate_vars(raw, &vars, Flavor::Sql), &range);
            assert!(
                !sql.contains('$'),
                "{file}: annotation {name}: unexpanded: {sql}"
            );
            let cols = columns(&mut client, &sql);
            let rows = json_rows(&mut client, &sql);
            assert!(
                !rows.is_empty(),
                "{file}: annotation {name}: no rows\n{sql}"
            );
            let names: Vec<&str> = cols.iter().map(|c| c.0.as_str()).collect();
            assert!(
                names.contains(&"time") && names.contains(&"text"),
                "{file}: annotation {name}: columns {names:?}"
            );
            report.push(format!("{file}: annotation {name}: {:?}", rows[0]["text"]));
        }
        for p in panels(&dash) {
            if p["type"] == "row" {
                continue;
            }
            let title = p["title"].as_str().unwrap();
            ran.insert((file.clone(), title.to_string()));
            for t in p["targets"].as_array().unwrap() {
                targets += 1;
                if let Some(raw) = t["rawSql"].as_str() {
                    let sql = expand_sql_macros(&interpolate_vars(raw, &vars, Flavor::Sql), &range);
                    assert!(!sql.contains('$'), "{file}: {title}: unexpanded: {sql}");
                    let cols = columns(&mut client, &sql);
                    let rows = json_rows(&mut client, &sql);
                    assert!(!rows.is_empty(), "{file}: {title}: no rows\n{sql}");
                    let names: Vec<&str> = cols.iter().map(|c| c.0.as_str()).collect();
                    let numeric: Vec<&str> = cols
                        .iter()
                        .filter(|c| NUMERIC.contains(&c.1.as_str()) && c.0 != "time")
                        .map(|c| c.0.as_str())
                        .collect();
                    if t["format"] == "time_series" {
                        let time = cols.iter().find(|c| c.0 == "time").unwrap_or_else(|| {
                            panic!("{file}: {title}: time series without a time column\n{sql}")
                        });
                        assert!(
                            time.1 == "timestamptz" || NUMERIC.contains(&time.1.as_str()),
                            "{file}: {title}: time column of type {}",
                            time.1
                        );
                        if let Some(m) = cols.iter().find(|c| c.0 == "metric") {
                            assert_eq!(m.1, "text", "{file}: {title}: metric column");
                        }
                        assert!(!numeric.is_empty(), "{file}: {title}: no value column");
                    }
                    if matches!(p["type"].as_str(), Some("stat" | "timeseries" | "bargauge")) {
                        // Some value is a number (not every bucket is NULL).
                        assert!(
                            rows.iter()
                                .any(|r| numeric.iter().any(|c| r[*c].is_number())),
                            "{file}: {title}: only NULL values\n{sql}"
                        );
                    }
                    // Columns the panel configures must exist.
                    for o in p["fieldConfig"]["overrides"].as_array().unwrap() {
                        if o["matcher"]["id"] == "byName" {
                            let col = o["matcher"]["options"].as_str().unwrap();
                            assert!(
                                names.contains(&col),
                                "{file}: {title}: override for missing column {col}"
                            );
                        }
                    }
                    for tr in p["transformations"].as_array().into_iter().flatten() {
                        for f in tr["options"]["fields"].as_array().into_iter().flatten() {
                            assert!(names.contains(&f.as_str().unwrap()), "{file}: {title}");
                        }
                    }
                    report.push(format!("{file}: {title}: {} rows {names:?}", rows.len()));
                    rows_of.insert((file.clone(), title.to_string()), rows);
                    sql_checked += 1;
                } else {
                    let expr = t["expr"].as_str().unwrap();
                    let q = expand_prom_builtins(&interpolate_vars(expr, &vars, Flavor::Prom));
                    assert!(!q.contains('$'), "{file}: {title}: unexpanded: {q}");
                    let series = prometheus.series(&q);
                    report.push(format!("{file}: {title}: {} series", series.len()));
                    prom_checked += 1;
                }
            }
        }
    }

    // Every recording rule yields series; every alert expression evaluates, and every
    // metric it reads exists.
    let mut rules_checked = 0;
    for (name, expr) in rules() {
        if name.contains(':') {
            prometheus.series(&name);
        } else {
            prometheus
                .query(&expr)
                .unwrap_or_else(|e| panic!("alert {name}: {e}"));
            for metric in metric_names(&expr) {
                prometheus.series(&metric);
            }
        }
        rules_checked += 1;
    }
    let health = prometheus.query("up").unwrap();
    assert!(!health["result"].as_array().unwrap().is_empty());
    let (_, body) = http10_get(prometheus.addr, "/api/v1/rules").unwrap();
    let rules_api: Value = serde_json::from_str(&body).unwrap();
    for g in rules_api["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            assert_eq!(
                r["health"], "ok",
                "rule {} unhealthy: {}",
                r["name"], r["lastError"]
            );
        }
    }
    // The M-of-N count sees the synthetic agent's three slow download runs.
    let below = prometheus.series(
        "edgeprobe:speed_runs_below_floor:1h{test=\"speed\",site=\"berlin\",direction=\"download\"}",
    );
    assert_eq!(below[0]["value"][1], "3", "{below:?}");

    eprintln!("{}", report.join("\n"));
    // The database watched as the collector is: the PostgreSQL row ran against the
    // exporter's series and the catalog.
    // The exporter watches the test's own database, where the collector's writers are
    // connected.
    let datname = db.url.rsplit_once('/').unwrap().1;
    assert!(
        vars_seen.contains(&datname.to_string()),
        "$database lacks {datname}: {vars_seen:?}"
    );
    let backends = prometheus.series(&format!(
        "pg_stat_database_numbackends{{job=\"edgeprobe-postgres\",datname=\"{datname}\"}}"
    ));
    let backends: f64 = backends[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(backends >= 1.0, "{backends} backends on {datname}");
    for title in [
        "PostgreSQL connections",
        "PostgreSQL transactions",
        "PostgreSQL database size",
        "Partitions of results",
        "Default partition size",
        "Quarantine size (rejected_results)",
    ] {
        assert!(
            ran.contains(&("collector.json".to_string(), title.to_string())),
            "collector.json: no panel {title:?} ran"
        );
    }
    for title in [
        "Hops of the latest result",
        "Loss per hop",
        "Path loss to the destination",
        "Destination RTT",
        "Path changes (Prometheus)",
        "Hops that degraded agents share",
    ] {
        assert!(
            ran.contains(&("paths.json".to_string(), title.to_string())),
            "paths.json: no panel {title:?} ran"
        );
    }
    for title in [
        "Responsiveness (RPM)",
        "Median RPM per site, last hour (Prometheus)",
        "Latest responsiveness per agent and test",
    ] {
        assert!(
            ran.contains(&("speed.json".to_string(), title.to_string())),
            "speed.json: no panel {title:?} ran"
        );
    }
    // The responsiveness panel's query sees the synthetic agent's runs, rating bands
    // included; its thresholds are the bands.
    let poor = db.scalar(
        "SELECT count(*) FROM responsiveness_results WHERE rating = 'poor' AND responsiveness_rpm < 300",
    );
    assert_eq!(poor, 3, "the three slow minutes' runs are rated poor");
    let speed = dashboards()
        .into_iter()
        .find(|(f, _)| f == "speed.json")
        .unwrap()
        .1;
    let rpm_panel = panels(&speed)
        .into_iter()
        .find(|p| p["title"] == "Responsiveness (RPM)")
        .unwrap()
        .clone();
    let steps: Vec<Value> = rpm_panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["value"].clone())
        .collect();
    assert_eq!(
        steps,
        [Value::Null, 300.into(), 1000.into(), 6000.into()],
        "rating bands"
    );
    // The histogram's series are born with their first observations, which rate() cannot
    // see: the median is NaN until a later batch's runs were scraped.
    let median = wait_for(Duration::from_secs(30), "a median RPM", || {
        let s =
            prometheus.series("edgeprobe:responsiveness_rpm:p50_1h{test=\"rpm\",site=\"berlin\"}");
        let v: f64 = s[0]["value"][1].as_str()?.parse().ok()?;
        (!v.is_nan()).then_some(v)
    });
    assert!(
        (300.0..=3000.0).contains(&median),
        "median RPM {median} of fair-to-good runs"
    );
    // The "Voice and loss" row and the speed test's loss under load ran, and their
    // Prometheus aggregates see the synthetic agent's runs.
    for (file, title) in [
        ("probes.json", "One-way loss by site (Prometheus)"),
        ("probes.json", "One-way loss per agent"),
        ("probes.json", "One-way delay"),
        (
            "probes.json",
            "One-way delay by site, median of the last hour (Prometheus)",
        ),
        ("probes.json", "Voice jitter"),
        ("probes.json", "MOS by site"),
        ("speed.json", "Loss under load"),
        (
            "speed.json",
            "Loss under load per site, last hour (Prometheus)",
        ),
    ] {
        assert!(
            ran.contains(&(file.to_string(), title.to_string())),
            "{file}: no panel {title:?} ran"
        );
    }
    let value = |expr: &str| -> Option<f64> {
        let s = prometheus.series(expr);
        let v: f64 = s[0]["value"][1].as_str()?.parse().ok()?;
        (!v.is_nan()).then_some(v)
    };
    // Forward: 3 of the 12 runs lost 2 %; the series are born with the first batch's runs,
    // which rate() cannot see, so the mean is of the later runs: between 0 and 2 %.
    let forward = wait_for(Duration::from_secs(30), "a mean forward loss", || {
        value("edgeprobe:stamp_loss_ratio:mean10m{test=\"voice-router\",site=\"berlin\",direction=\"forward\"}")
    });
    assert!((0.001..0.02).contains(&forward), "forward loss {forward}");
    let reverse = value(
        "edgeprobe:stamp_loss_ratio:mean10m{test=\"voice-router\",site=\"berlin\",direction=\"reverse\"}",
    )
    .unwrap();
    assert!(
        reverse < forward,
        "reverse loss {reverse}, forward {forward}"
    );
    let delay = wait_for(Duration::from_secs(30), "a median forward delay", || {
        value("edgeprobe:stamp_one_way_delay_seconds:p50_1h{test=\"voice-router\",site=\"berlin\",direction=\"forward\"}")
    });
    assert!(
        (0.005..=0.01).contains(&delay),
        "median forward delay {delay}"
    );
    let mos = wait_for(Duration::from_secs(30), "a mean MOS", || {
        value("edgeprobe:stamp_mos:mean1h{test=\"voice-router\",site=\"berlin\"}")
    });
    assert!((3.71..=4.39).contains(&mos), "mean MOS {mos}");
    let loaded = wait_for(Duration::from_secs(30), "a mean loss under load", || {
        value("edgeprobe:speed_loaded_loss_ratio:mean1h{test=\"speed\",site=\"berlin\",direction=\"download\"}")
    });
    assert!((0.001..=0.03).contains(&loaded), "loss under load {loaded}");
    eprintln!(
        "stamp: forward loss {forward}, reverse loss {reverse}, median forward delay {delay} s, \
         mean MOS {mos}; speed loss under load (download) {loaded}"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM stamp_results WHERE forward_lost = 20 AND mos < 4"),
        3,
        "the three slow minutes' stamp runs"
    );
    assert_eq!(sql_checked + prom_checked, targets, "every query ran");
    assert!(
        sql_checked >= 25 && prom_checked >= 20,
        "{sql_checked} SQL, {prom_checked} PromQL"
    );
    assert_eq!(rules_checked, 38);
    // Two links, two families: the variables list the synthetic agent's interfaces and
    // families (and what older rows lack), and the panel lists the site and test whose
    // IPv6 runs fail while its IPv4 runs work, not the test that works over both.
    for var in [
        "probes.json: $interface = [\"eth0\", \"not bound\", \"wwan0\"]",
        "probes.json: $ip_family = [\"ipv4\", \"ipv6\", \"unknown\"]",
    ] {
        assert!(
            report.iter().any(|l| l == var),
            "{var} not in:\n{}",
            report.join("\n")
        );
    }
    let key = |t: &str| ("probes.json".to_string(), t.to_string());
    let gap = &rows_of[&key("IPv6 fails while IPv4 works")];
    let summary: Vec<(String, String, i64, f64, i64, f64, String)> = gap
        .iter()
        .map(|r| {
            (
                r["site"].as_str().unwrap().to_string(),
                r["test"].as_str().unwrap().to_string(),
                r["ipv4_runs"].as_i64().unwrap(),
                r["ipv4_success"].as_f64().unwrap(),
                r["ipv6_runs"].as_i64().unwrap(),
                r["ipv6_success"].as_f64().unwrap(),
                r["ipv6_error"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [(
            "berlin".to_string(),
            "web-dual".to_string(),
            12,
            1.0,
            12,
            0.0,
            "unreachable".to_string()
        )]
    );
    assert!(ran.contains(&key("Failure ratio by site and IP family (Prometheus)")));
    // Every result panel splits by family: the per-agent series name it.
    let success = &rows_of[&key("Success ratio per agent")];
    for series in [
        "synthetic-berlin-1 / web-dual / wwan0 / ipv6",
        "synthetic-berlin-1 / dns-dual / eth0 / ipv4",
    ] {
        assert!(
            success.iter().any(|r| r["metric"] == series),
            "no series {series}"
        );
    }
    let by_family = wait_for(
        Duration::from_secs(30),
        "berlin's IPv6 failure ratio",
        || {
            value("edgeprobe:results_failure_ratio_by_family:rate15m{site=\"berlin\",ip_family=\"ipv6\"}")
        },
    );
    assert!(by_family > 0.0, "berlin IPv6 failure ratio {by_family}");
    for a in &mut agents {
        a.stop();
    }
}
