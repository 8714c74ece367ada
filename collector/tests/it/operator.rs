//! The operator's view (issue 25): what `tests list`, `agents`, `results` and `run-now`
//! tell an operator about a real fleet (real collector, real agents, real PostgreSQL, the
//! API over mTLS), and that they reach the data the documented ways.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::api::{curl, operator, site_agent, ApiCollector};
use crate::support::*;

/// A fleet test for every agent, hourly (it matters that it is pushed, not that it runs).
const FLEET: &str =
    "[[test]]\nname = \"web\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:9\"\nevery = \"1h\"\n";

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// `edgeprobe-collector ARGS... --database-url URL`.
fn cli(db: &TestDb, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = args.to_vec();
    all.extend(["--database-url", &db.url]);
    collector_cmd(&all)
}

/// `edgeprobe-agent buffer --config CONFIG`'s output.
fn agent_buffer(agent: &Agent) -> String {
    let out = Command::new(agent_bin())
        .arg("buffer")
        .arg("--config")
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Issue 25, item 1: an agent that refuses the fleet set at its restart (a local test of
/// the same name) is shown refusing, with its reason, by `tests list` and the API, and
/// its own `buffer` does not claim the refused version runs. An agent unheard of for
/// longer than the stale threshold is stale, not behind.
#[test]
fn tests_list_names_the_refusing_behind_and_stale_agents_and_the_agent_never_claims_a_refused_set()
{
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let c = ApiCollector::start(dir.path(), &db, &pki);
    let alice = operator(&pki, "alice");
    let _b1 = site_agent(dir.path(), &pki, "b1", "berlin", &c);
    let mut b2 = site_agent(dir.path(), &pki, "b2", "berlin", &c);
    wait_for(Duration::from_secs(30), "both agents known", || {
        (db.scalar("SELECT count(*) FROM agents WHERE 'fleet-tests' = ANY(features)") == 2)
            .then_some(())
    });
    let file = write(dir.path(), "fleet.toml", FLEET);
    let (code, out, err) = cli(&db, &["tests", "apply", "--file", &file]);
    assert_eq!(code, Some(0), "{out}{err}");
    wait_for(
        Duration::from_secs(20),
        "both agents to apply version 1",
        || (db.scalar("SELECT count(*) FROM agents WHERE fleet_version = 1") == 2).then_some(()),
    );
    assert!(agent_buffer(&b2).contains("fleet tests   version 1"));

    // b2 gets a local test named like the fleet test and restarts: it refuses version 1.
    b2.stop();
    let text = std::fs::read_to_string(&b2.config).unwrap();
    std::fs::write(
        &b2.config,
        format!("{text}\n{}", FLEET.replace("9\"", "7\"")),
    )
    .unwrap();
    b2.start();
    wait_for(Duration::from_secs(30), "b2 to refuse version 1", || {
        (db.scalar(
            "SELECT count(*) FROM agents WHERE agent_id = 'b2' AND fleet_refused_version = 1",
        ) == 1)
            .then_some(())
    });
    assert_eq!(
        db.scalar("SELECT count(*) FROM agents WHERE agent_id = 'b2' AND fleet_version IS NULL"),
        1,
        "b2 does not run version 1 any more"
    );

    let (code, out, err) = cli(&db, &["tests", "list"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(
            "agents: 2 known, 1 applied, 0 behind, 1 refused, 0 too old for fleet tests, 0 stale"
        ),
        "{out}"
    );
    assert!(out.contains("refused by b2: "), "{out}");
    assert!(out.contains("(it runs no fleet tests)"), "{out}");
    assert!(out.contains("own config file"), "the agent's reason: {out}");

    let l = curl(&c, Some(&alice), "GET", "/api/v1/tests", None).json();
    assert_eq!(l["applied"], 1, "{l}");
    assert_eq!(l["refused"][0]["agent_id"], "b2", "{l}");
    assert_eq!(
        l["refused"][0]["running_version"],
        serde_json::Value::Null,
        "{l}"
    );

    // The running agent's own view: no refused set claimed.
    let shown = agent_buffer(&b2);
    assert!(
        shown.contains("fleet tests   none running: version 1 refused at start"),
        "{shown}"
    );
    assert!(!shown.contains("fleet tests   version 1"), "{shown}");

    // An agent that has never answered is behind, by name; one gone for two days is stale.
    db.client()
        .batch_execute(
            "INSERT INTO agents (agent_id, labels, features, last_seen) VALUES
               ('quiet', '{\"site\":\"berlin\"}', '{fleet-tests,run-now}', now() - interval '10 seconds'),
               ('gone', '{\"site\":\"paris\"}', '{fleet-tests,run-now}', now() - interval '2 days')",
        )
        .unwrap();
    let (code, out, err) = cli(&db, &["tests", "list"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(
            "agents: 4 known, 1 applied, 1 behind, 1 refused, 0 too old for fleet tests, 1 stale"
        ),
        "{out}"
    );
    assert!(
        out.contains("behind: quiet (no version yet, seen "),
        "{out}"
    );
    assert!(
        out.contains("stale (not seen for over 1day; `agents retire ID`"),
        "{out}"
    );
    assert!(out.contains("): gone"), "{out}");
    // The threshold is the operator's: with three days, `gone` is merely behind.
    let (_, out, _) = cli(&db, &["tests", "list", "--stale-after", "3d", "--json"]);
    let l: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(l["behind"], 2, "{l}");
    assert_eq!(l["stale"], serde_json::json!([]), "{l}");
    let l = curl(&c, Some(&alice), "GET", "/api/v1/tests", None).json();
    assert_eq!(l["stale"], serde_json::json!(["gone"]), "{l}");
    assert_eq!(l["behind_agents"][0]["agent_id"], "quiet", "{l}");
    drop(c);
}

/// The peak resident memory of a running process, in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb * 1024
}

/// Issue 25, item 2: `agents` (CLI and API) lists the fleet with its state, filters by
/// label, and `agents retire` forgets an agent that is gone (its results stay; refused
/// while it is online); a retired agent that comes back is simply known again.
#[test]
fn agents_lists_the_fleet_with_its_state_and_retire_forgets_an_agent_that_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let c = ApiCollector::start(dir.path(), &db, &pki);
    let alice = operator(&pki, "alice");
    let target = HttpTarget::start("ok");
    let mut b1 = Agent::new_tls(
        dir.path(),
        "b1",
        &format!("https://localhost:{}", c.grpc.port()),
        &http_test(&target.url(), "1s"),
        &pki,
    );
    let text = std::fs::read_to_string(&b1.config).unwrap();
    std::fs::write(
        &b1.config,
        text.replace("site = \"lab\"", "site = \"berlin\""),
    )
    .unwrap();
    b1.start();
    let mut p1 = site_agent(dir.path(), &pki, "p1", "paris", &c);
    wait_for(
        Duration::from_secs(30),
        "b1's results and p1's hello",
        || {
            (results_of(&db, "b1", "web") >= 2
                && db.scalar("SELECT count(*) FROM agents WHERE agent_id = 'p1'") == 1)
                .then_some(())
        },
    );
    // An agent gone for two days, with a clone once, and a result of its own.
    db.client()
        .batch_execute(
            "INSERT INTO agents (agent_id, labels, version, features, last_seen, backlog, identity_conflicts)
               VALUES ('gone', '{\"site\":\"paris\"}', '0.0.9', '{fleet-tests,run-now}',
                       now() - interval '2 days', 17, 2);
             INSERT INTO results (agent_id, seq, test, kind, target, started_at, duration_seconds, success)
               VALUES ('gone', 1, 'web', 'http', 'http://x/', now() - interval '2 days', 0.1, true)",
        )
        .unwrap();

    let (code, out, err) = cli(&db, &["agents"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with(
            "ID    LABELS       VERSION  ONLINE  LAST SEEN  BACKLOG  FLEET  CLOCK    CONFLICTS"
        ),
        "{out}"
    );
    let row = |id: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("no {id} in {out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(row("b1")[1], "site=berlin", "{out}");
    assert_eq!(row("b1")[2], env!("CARGO_PKG_VERSION"), "{out}");
    assert_eq!(row("b1")[3], "yes", "{out}");
    assert_eq!(row("b1")[8], "synced", "{out}");
    assert_eq!(
        row("gone")[3..],
        ["no", "2d", "ago", "17", "stale", "unknown", "2"],
        "{out}"
    );
    assert!(out.ends_with("3 agents, 2 online\n"), "{out}");

    // --select, and the same document from the CLI and the API.
    let (code, out, _) = cli(&db, &["agents", "--select", "site=paris", "--json"]);
    assert_eq!(code, Some(0));
    let cli_json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<&str> = cli_json["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gone", "p1"]);
    assert_eq!(cli_json["agents"][0]["fleet"], "stale");
    assert_eq!(cli_json["agents"][0]["identity_conflicts"], 2);
    assert_eq!(cli_json["agents"][1]["online"], true);
    let api = curl(
        &c,
        Some(&alice),
        "GET",
        "/api/v1/agents?select=site%3Dparis",
        None,
    );
    assert_eq!(api.status, Some(200), "{}", api.body);
    let api_json = api.json();
    let strip = |mut v: serde_json::Value| {
        for a in v["agents"].as_array_mut().unwrap() {
            // The only fields that move between two reads.
            a["seen_seconds_ago"] = serde_json::Value::Null;
            a["last_seen"] = serde_json::Value::Null;
        }
        v
    };
    assert_eq!(strip(api_json), strip(cli_json));
    let typo = curl(
        &c,
        Some(&alice),
        "GET",
        "/api/v1/agents?selct=site%3Dparis",
        None,
    );
    assert_eq!(typo.status, Some(400), "{}", typo.body);

    // Retire: refused while online, done for the one that is gone; its results stay.
    let (code, _, err) = cli(&db, &["agents", "retire", "b1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("it is online, not gone"), "{err}");
    let (code, out, err) = cli(&db, &["agents", "retire", "gone"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "agent gone retired; its 1 result stays\n");
    assert_eq!(
        db.scalar("SELECT count(*) FROM agents WHERE agent_id = 'gone'"),
        0
    );
    assert_eq!(results_of(&db, "gone", "web"), 1);
    let (code, _, err) = cli(&db, &["agents", "retire", "gone"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no known agent `gone`"), "{err}");
    let (_, out, _) = cli(&db, &["tests", "list", "--json"]);
    assert!(!out.contains("gone"), "{out}");

    // Over the API: p1 stopped is retired with force (it was seen seconds ago) and
    // known again when it comes back.
    p1.stop();
    let a = curl(&c, Some(&alice), "DELETE", "/api/v1/agents/p1", None);
    assert_eq!(a.status, Some(422), "{}", a.body);
    let a = curl(
        &c,
        Some(&alice),
        "DELETE",
        "/api/v1/agents/p1?force=true",
        None,
    );
    assert_eq!(a.status, Some(200), "{}", a.body);
    assert_eq!(
        db.scalar("SELECT count(*) FROM agents WHERE agent_id = 'p1'"),
        0
    );
    p1.start();
    wait_for(Duration::from_secs(30), "p1 known again", || {
        (db.scalar("SELECT count(*) FROM agents WHERE agent_id = 'p1'") == 1).then_some(())
    });
    let a = curl(
        &c,
        Some(&alice),
        "DELETE",
        "/api/v1/agents/nobody?force=true",
        None,
    );
    assert_eq!(a.status, Some(404), "{}", a.body);
}

/// Issue 25, "results": filters, the three formats, the same CSV from the CLI and the
/// API, and an export much larger than the memory either side uses for it.
#[test]
fn results_filters_formats_and_streams_a_large_export() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let c = ApiCollector::start(dir.path(), &db, &pki);
    let alice = operator(&pki, "alice");
    // 300,000 results of `bulk` over the last hour, and three of `a1` to look at.
    const BULK: i64 = 300_000;
    db.client()
        .batch_execute(&format!(
            "INSERT INTO results (agent_id, seq, test, kind, target, started_at, duration_seconds,
                                  success, error_class, error_message, rtt_avg_seconds, loss_ratio,
                                  sent, received)
             SELECT 'bulk', g, 'ping', 'icmp', '192.0.2.1', now() - interval '50 minutes' + g * interval '1 ms',
                    0.5, true, NULL, NULL, 0.0123, 0.0, 5, 5
               FROM generate_series(1, {BULK}) g;
             INSERT INTO results (agent_id, seq, test, kind, target, started_at, duration_seconds,
                                  success, error_class, error_message, status_code, ttfb_seconds)
             VALUES ('a1', 1, 'web', 'http', 'http://x/', now() - interval '2 hours', 0.2, true, NULL, NULL, 200, 0.05),
                    ('a1', 2, 'web', 'http', 'http://x/', now() - interval '10 minutes', 0.2, true, NULL, NULL, 200, 0.05),
                    ('a1', 3, 'web', 'http', 'http://x/', now() - interval '5 minutes', 1.5, false, 'timeout', 'no answer, \"ever\"', NULL, NULL)"
        ))
        .unwrap();

    // Table: the last hour by default, one line per result with its figures.
    let (code, out, err) = cli(&db, &["results", "--agent", "a1"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("STARTED (UTC)         TEST              KIND   AGENT"),
        "{out}"
    );
    assert!(
        lines[1].contains(
            "web               http   a1                    ok    status 200  ttfb 50.0 ms"
        ),
        "{out}"
    );
    assert!(
        lines[2].contains("FAIL  total 1.50 s  error timeout: no answer, \"ever\""),
        "{out}"
    );
    // --since and --test; JSON keeps types and leaves nulls out.
    let (_, out, _) = cli(
        &db,
        &[
            "results", "--agent", "a1", "--since", "3h", "--test", "web", "--format", "json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3, "{out}");
    assert_eq!(v[0]["seq"], 1);
    assert_eq!(v[0]["status_code"], 200);
    assert!(v[0].get("error_class").is_none(), "{out}");
    assert!(
        v[0]["started_at"].as_str().unwrap().ends_with("+00:00"),
        "{out}"
    );
    let (_, out, _) = cli(
        &db,
        &[
            "results", "--agent", "a1", "--test", "nope", "--format", "json",
        ],
    );
    assert_eq!(out, "[]\n");

    // CSV, the same bytes from the CLI and the API.
    let (_, cli_csv, _) = cli(&db, &["results", "--agent", "a1", "--format", "csv"]);
    let api = curl(
        &c,
        Some(&alice),
        "GET",
        "/api/v1/results?agent=a1&format=csv",
        None,
    );
    assert_eq!(api.status, Some(200), "{}", api.body);
    assert_eq!(api.body, cli_csv);
    assert!(
        cli_csv.starts_with("started_at,agent_id,seq,test,kind,target,success,"),
        "{cli_csv}"
    );
    assert!(
        cli_csv.contains(",timeout,\"no answer, \"\"ever\"\"\","),
        "{cli_csv}"
    );
    let typo = curl(&c, Some(&alice), "GET", "/api/v1/results?agnet=a1", None);
    assert_eq!(typo.status, Some(400), "{}", typo.body);
    assert!(
        typo.body.contains("unknown query parameter `agnet`"),
        "{}",
        typo.body
    );

    // A large export through a pipe that is read slowly: the CLI's memory stays far below
    // the size of the export (it holds one batch), and every row arrives once. The
    // baseline is the same command on 2,000 rows (more than a pipe holds), sampled the
    // same way.
    let export = |rows: Option<u64>| {
        let mut child = Command::new(collector_bin())
            .args([
                "results",
                "--agent",
                "bulk",
                "--format",
                "csv",
                "--database-url",
                &db.url,
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        use std::io::BufRead;
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("started_at,"));
        let (mut n, mut bytes, mut peak) = (0u64, 0u64, 0u64);
        loop {
            // Sampled while the CLI is still writing (blocked on the pipe we hold).
            if n % 50_000 == 1_000 && n < BULK as u64 {
                std::thread::sleep(Duration::from_millis(300));
                peak = peak.max(peak_rss(child.id()));
            }
            if rows.is_some_and(|r| n >= r) {
                let _ = child.kill();
                break;
            }
            line.clear();
            let read = stdout.read_line(&mut line).unwrap();
            if read == 0 {
                break;
            }
            n += 1;
            bytes += read as u64;
        }
        let _ = child.wait();
        (n, bytes, peak)
    };
    let (_, _, baseline) = export(Some(2_000));
    let (rows, bytes, peak) = export(None);
    assert_eq!(rows, BULK as u64);
    println!("cli export: {rows} rows, {bytes} bytes, peak rss {peak} bytes, baseline {baseline}");
    assert!(
        peak.saturating_sub(baseline) < bytes / 4,
        "the CLI held the export: {peak} bytes at peak (baseline {baseline}) for {bytes}"
    );

    // The API streams too: the collector does not grow by the size of the export. The
    // baseline is the peak after a small export over the same path (TLS connection,
    // cursor, CSV encoder: their first use costs the collector memory of its own).
    let warm = curl(
        &c,
        Some(&alice),
        "GET",
        "/api/v1/results?agent=a1&format=csv",
        None,
    );
    assert_eq!(warm.status, Some(200), "{}", warm.body);
    let before = peak_rss(c.proc.pid());
    let out = dir.path().join("export.csv");
    let status = Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--max-time", "300"])
        .arg("--cacert")
        .arg(&c.pki_ca)
        .arg("--cert")
        .arg(&alice.0)
        .arg("--key")
        .arg(&alice.1)
        .arg("--output")
        .arg(&out)
        .arg(format!(
            "https://localhost:{}/api/v1/results?agent=bulk&format=csv",
            c.api.port()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let body = std::fs::read_to_string(&out).unwrap();
    assert_eq!(body.lines().count() as i64, BULK + 1);
    let grown = peak_rss(c.proc.pid()) - before;
    println!(
        "api export: {} bytes, collector peak rss grew {grown} bytes",
        body.len()
    );
    // Streaming, the collector grew 7-12 MB here whatever the size (allocator pages kept by
    // its worker threads; 7.4-12.1 MB in five runs, the most under CI's parallel tests); an
    // export held in memory grows by at least its 48 MB.
    assert!(
        grown < body.len() as u64 / 2,
        "the collector held the export: grew {grown} bytes for {}",
        body.len()
    );
}

/// `edgeprobe-collector ARGS...` with neither EDGEPROBE_DATABASE_URL nor DATABASE_URL in
/// its environment: what an operator's shell on a packaged host has.
fn bare_cmd(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(collector_bin())
        .args(args)
        .env_remove("EDGEPROBE_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Issue 25, item 3: every operator command and `migrate` reach the database through
/// `--config FILE` whose URL is in the `collector.env` beside it, as a packaged install
/// keeps it (the file has no [database] url).
#[test]
fn every_operator_command_reaches_the_database_through_the_config_and_its_environment_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let config = write(
        &etc,
        "collector.toml",
        "[server]\ninsecure = true\n\n[database]\nretention = \"30d\"\n\n[fleet]\nstale_after = \"1h\"\n",
    );
    write(
        &etc,
        "collector.env",
        &format!(
            "# secrets\nEDGEPROBE_DATABASE_URL=\"{}\"\nRUST_LOG=info\n",
            db.url
        ),
    );
    let file = write(dir.path(), "fleet-tests.toml", FLEET);

    let (code, out, err) = bare_cmd(&["migrate", "--config", &config]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("schema at version"), "{out}");
    assert!(db.scalar("SELECT count(*) FROM edgeprobe_migrations") >= 5);
    db.client()
        .batch_execute(
            "INSERT INTO agents (agent_id, labels, features, last_seen) VALUES
               ('b1', '{\"site\":\"berlin\"}', '{fleet-tests,run-now}', now() - interval '2 hours')",
        )
        .unwrap();

    for args in [
        vec!["tests", "diff", "--file", &file, "--config", &config],
        vec!["tests", "apply", "--file", &file, "-c", &config],
        vec!["tests", "list", "--config", &config],
        vec!["tests", "versions", "--config", &config],
        vec!["agents", "--config", &config],
        vec!["results", "--config", &config, "--format", "csv"],
    ] {
        let (code, out, err) = bare_cmd(&args);
        assert_eq!(code, Some(0), "{args:?}: {out}{err}");
    }
    // Without $USER (cron, a bare environment) the version is made by the uid's user name.
    let empty = write(dir.path(), "empty.toml", "# no tests\n");
    let out = Command::new(collector_bin())
        .args([
            "tests", "apply", "--file", &empty, "--config", &config, "--force",
        ])
        .env_remove("EDGEPROBE_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .env_remove("USER")
        .env_remove("SUDO_USER")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(db.scalar("SELECT count(*) FROM fleet_versions"), 2);
    let by: String = db
        .client()
        .query_one(
            "SELECT created_by FROM fleet_versions ORDER BY version DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!by.is_empty() && !by.starts_with("uid "), "{by}");
    // The configuration's [fleet] stale_after judges the agents (b1: 2 h unheard of).
    let (_, out, _) = bare_cmd(&["tests", "list", "--config", &config]);
    assert!(out.contains("1 stale"), "{out}");
    let (_, out, _) = bare_cmd(&["agents", "--config", &config, "--json"]);
    assert!(out.contains("\"fleet\": \"stale\""), "{out}");
    // run-now reaches the database too: it knows b1 and asks it.
    let (code, out, err) = bare_cmd(&[
        "run-now",
        "--config",
        &config,
        "--agent",
        "b1",
        "--kind",
        "tcp",
        "--target",
        "127.0.0.1:9",
        "--json",
        "--timeout",
        "1s",
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM run_agents WHERE agent_id = 'b1'"),
        1
    );
    // --database-url wins over the file.
    let (code, _, err) = bare_cmd(&[
        "agents",
        "--config",
        &config,
        "--database-url",
        "postgres://postgres@127.0.0.1:1/x",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot connect to postgres"), "{err}");

    // Without any of them: the reason names what was looked at.
    let (code, _, err) = bare_cmd(&[
        "tests",
        "list",
        "--config",
        &etc.join("none.toml").display().to_string(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("none.toml: cannot read"), "{err}");
    std::fs::remove_file(etc.join("collector.env")).unwrap();
    let (code, _, err) = bare_cmd(&["agents", "--config", &config]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("has no [database] url and"), "{err}");
    assert!(
        err.contains("collector.env no EDGEPROBE_DATABASE_URL"),
        "{err}"
    );
}

/// A new operator's walk of the docs: `check` of the packaged configuration with no
/// database URL anywhere (collector.env still commented out) passed, and `run`, as the
/// unit starts it, then refused to start ("No database URL"). `check` refuses it too, and
/// names the file to put the URL in; with the URL there it connects.
#[test]
fn check_refuses_a_configuration_without_a_database_url_as_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let config = write(
        dir.path(),
        "collector.toml",
        "[server]\ninsecure = true\n\n[database]\nretention = \"30d\"\n",
    );
    write(
        dir.path(),
        "collector.env",
        "# EDGEPROBE_DATABASE_URL=postgres://edgeprobe:PASSWORD@localhost/edgeprobe\n",
    );

    let (code, out, err) = bare_cmd(&["check", "--config", &config]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("no database URL"), "{err}");
    assert!(err.contains("collector.env"), "{err}");
    let (code, _, err) = bare_cmd(&["check", "--config", &config, "--offline"]);
    assert_eq!(code, Some(2), "{err}");
    // `run` agrees: it does not start.
    let (code, _, err) = bare_cmd(&["run", "--config", &config]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.to_lowercase().contains("no database url"), "{err}");

    write(
        dir.path(),
        "collector.env",
        &format!("EDGEPROBE_DATABASE_URL={}\n", db.url),
    );
    let (code, out, err) = bare_cmd(&["check", "--config", &config]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("EDGEPROBE_DATABASE_URL in collector.env") && out.contains("reachable"),
        "{out}"
    );
}

/// Issue 25, item 4: dangerous applies are refused unless forced (CLI and API), `diff`
/// runs every check `apply` runs and exits 2 where apply would refuse, says what changed
/// in a changed test, and an unknown API query parameter is 400 (nothing applied).
#[test]
fn dangerous_applies_are_refused_unless_forced_and_diff_tells_what_apply_would_do() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let c = ApiCollector::start(dir.path(), &db, &pki);
    let alice = operator(&pki, "alice");
    db.client()
        .batch_execute(
            "INSERT INTO agents (agent_id, labels, features, local_tests) VALUES
               ('b1', '{\"site\":\"berlin\"}', '{fleet-tests,run-now}', '{}'),
               ('p1', '{\"site\":\"paris\"}', '{fleet-tests,run-now}', '{ping}')",
        )
        .unwrap();
    let versions = || db.scalar("SELECT count(*) FROM fleet_versions");
    let two = "[[test]]\nname = \"web\"\nkind = \"tcp\"\ntarget = \"192.0.2.1:80\"\nevery = \"30s\"\n\n[[test]]\nname = \"dns\"\nkind = \"dns\"\ntarget = \"example.net\"\nevery = \"1m\"\nselect = { site = \"berlin\" }\n";
    let v1 = write(dir.path(), "v1.toml", two);
    let (code, out, err) = cli(&db, &["tests", "apply", "--file", &v1]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(versions(), 1);

    // Each danger: diff exits 2 with the reason, apply refuses it located, nothing changes.
    let cases = [
        (
            "empty.toml",
            "# nothing\n".to_string(),
            "empty.toml: the file has no tests: applying it removes all 2 fleet tests",
        ),
        (
            "typo-id.toml",
            two.replace("every = \"30s\"", "every = \"30s\"\nagents = [\"ber-3\"]"),
            "typo-id.toml:2:8: test `web` names agents no collector has seen: ber-3",
        ),
        (
            "typo-site.toml",
            two.replace("berlin", "berln"),
            "typo-site.toml:8:8: test `dns` selects none of the 2 known agents (site=berln)",
        ),
        (
            "long.toml",
            two.replace("\"1m\"", "\"100000d\""),
            "long.toml:8:8: test `dns` runs every 100000 days, more than 31 days apart",
        ),
    ];
    for (name, text, reason) in &cases {
        let file = write(dir.path(), name, text);
        let (code, out, err) = cli(&db, &["tests", "diff", "--file", &file]);
        assert_eq!(code, Some(2), "diff {name}: {out}{err}");
        assert!(err.contains(reason), "diff {name}: {err}");
        let (code, out, err) = cli(&db, &["tests", "apply", "--file", &file]);
        assert_eq!(code, Some(2), "apply {name}: {out}{err}");
        assert!(err.contains(reason), "apply {name}: {err}");
        assert!(
            err.contains("nothing applied; if this is what you mean, apply with --force"),
            "{err}"
        );
        assert_eq!(versions(), 1, "{name}");
    }
    // Forced, it is applied.
    let empty = dir.path().join("empty.toml").display().to_string();
    let (code, out, err) = cli(&db, &["tests", "apply", "--file", &empty, "--force"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("version 2 applied: +0 ~0 -2 tests"), "{out}");
    let (code, out, err) = cli(&db, &["tests", "rollback", "1"]);
    assert_eq!(code, Some(0), "{out}{err}");
    // A rollback to what is current makes no version.
    let (code, out, _) = cli(&db, &["tests", "rollback", "3"]);
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with("no change: the current version 3 already holds"),
        "{out}"
    );
    assert_eq!(versions(), 3);
    // Forced, it makes one (to push the same set again to agents that refused it).
    let (code, out, _) = cli(&db, &["tests", "rollback", "3", "--force"]);
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with("version 4 applied (the tests of version 3): +0 ~0 -0"),
        "{out}"
    );
    assert_eq!(versions(), 4);

    // diff refuses a name clash as apply does (p1 has a local test `ping`), exit 2.
    let clash = write(
        dir.path(),
        "clash.toml",
        &two.replace("\"dns\"\nkind", "\"ping\"\nkind")
            .replace("site = \"berlin\"", "site = \"paris\""),
    );
    let (code, _, err) = cli(&db, &["tests", "diff", "--file", &clash]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("has the name of a local test of agent p1"),
        "{err}"
    );

    // What changed in a changed test, field by field.
    let changed = write(
        dir.path(),
        "changed.toml",
        &two.replace(
            "every = \"30s\"",
            "every = \"45s\"\noptions = { timeout = \"2s\" }",
        )
        .replace("192.0.2.1:80", "192.0.2.2:80"),
    );
    let (code, out, err) = cli(&db, &["tests", "diff", "--file", &changed]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("~ changed  web"), "{out}");
    assert!(out.contains("  ~ web: every \"30s\" -> \"45s\""), "{out}");
    assert!(
        out.contains("  ~ web: options.timeout (unset) -> \"2s\""),
        "{out}"
    );
    assert!(
        out.contains("  ~ web: target \"192.0.2.1:80\" -> \"192.0.2.2:80\""),
        "{out}"
    );
    let (_, out, _) = cli(&db, &["tests", "diff", "--file", &changed, "--json"]);
    let d: serde_json::Value = serde_json::from_str(&out).unwrap();
    let web = d["tests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "web")
        .unwrap()
        .clone();
    assert_eq!(web["fields"].as_array().unwrap().len(), 3, "{web}");

    // The API: a typo in a parameter is 400 and applies nothing; force=true forces.
    let a = curl(
        &c,
        Some(&alice),
        "POST",
        "/api/v1/tests?dryrun=true",
        Some("# nothing\n"),
    );
    assert_eq!(a.status, Some(400), "{}", a.body);
    assert!(
        a.body.contains("unknown query parameter `dryrun`"),
        "{}",
        a.body
    );
    let a = curl(
        &c,
        Some(&alice),
        "POST",
        "/api/v1/tests",
        Some("# nothing\n"),
    );
    assert_eq!(a.status, Some(422), "{}", a.body);
    assert!(a.body.contains("removes all 2 fleet tests"), "{}", a.body);
    let a = curl(
        &c,
        Some(&alice),
        "POST",
        "/api/v1/tests/diff",
        Some(&cases[1].1),
    );
    assert_eq!(a.status, Some(200), "{}", a.body);
    assert!(
        a.json()["refusals"][0].as_str().unwrap().contains("ber-3"),
        "{}",
        a.body
    );
    for path in [
        "/api/v1/tests?x=1",
        "/api/v1/tests/versions?all",
        "/api/v1/runs/1?verbose=1",
    ] {
        let a = curl(&c, Some(&alice), "GET", path, None);
        assert_eq!(a.status, Some(400), "{path}: {}", a.body);
    }
    assert_eq!(versions(), 4);
    let a = curl(
        &c,
        Some(&alice),
        "POST",
        "/api/v1/tests?force=true",
        Some("# nothing\n"),
    );
    assert_eq!(a.status, Some(201), "{}", a.body);
    assert_eq!(versions(), 5);
}

/// Issue 25, item 5: a run-now request expires after its wait; an agent that connects
/// later never runs it and its row says `expired`; `run-now --show` shows the run; Ctrl-C
/// ends the wait, ends the line and says the run goes on until its expiry.
#[test]
fn run_now_expires_for_an_agent_that_comes_back_later_and_ctrl_c_says_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let c = Collector::start(dir.path(), &db);
    let mut a1 = Agent::new(dir.path(), "a1", &c.endpoint(), "");
    a1.start();
    wait_for(Duration::from_secs(30), "a1 known", || {
        (db.scalar("SELECT count(*) FROM agents WHERE 'run-now' = ANY(features)") == 1)
            .then_some(())
    });
    a1.stop();
    let target = HttpTarget::start("ok");
    let url = target.url();
    let run = [
        "run-now",
        "--agent",
        "a1",
        "--kind",
        "http",
        "--target",
        &url,
        "--expires",
        "3s",
        "--timeout",
        "1s",
    ];
    let (code, out, err) = cli(&db, &run);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("the request expires at 20"), "{out}");
    let run_id: i64 = out
        .strip_prefix("run ")
        .and_then(|r| r.split(':').next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));

    // a1 comes back after the expiry: it is never sent the request.
    std::thread::sleep(Duration::from_secs(4));
    a1.start();
    wait_for(Duration::from_secs(20), "the row to say expired", || {
        (db.scalar(&format!(
            "SELECT count(*) FROM run_agents WHERE run_id = {run_id} AND state = 'expired'"
        )) == 1)
            .then_some(())
    });
    // The collector's own dispatch on a1's new session (and a poll) come and go.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM results WHERE run_id = {run_id}"
        )),
        0,
        "an expired request ran"
    );
    let (code, out, err) = cli(&db, &["run-now", "--show", &run_id.to_string()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with(&format!("run {run_id}: test run-now, made ")),
        "{out}"
    );
    assert!(out.contains(", expired at 20"), "{out}");
    assert!(
        out.contains("a1     expired  no session before the request expired; not sent"),
        "{out}"
    );

    // A request within its expiry reaches the agent that is back.
    let (code, out, err) = cli(&db, &run[..run.len() - 2]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("1 of 1 agents returned a result"), "{out}");

    // Ctrl-C while waiting for an offline agent: the line ends, the run goes on.
    a1.stop();
    let child = Command::new(collector_bin())
        .args([
            "run-now", "--agent", "a1", "--kind", "http", "--target", &url,
        ])
        .args(["--timeout", "30s", "--database-url", &db.url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "Ctrl-C did not end the wait"
    );
    assert_eq!(out.status.code(), Some(130));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("interrupted: run "), "{err}");
    assert!(err.contains(" goes on; agents not reached by 20"), "{err}");
    assert!(
        err.contains("(see `edgeprobe-collector run-now --show "),
        "{err}"
    );
    drop(c);
}

/// SPEC 18: from a laptop without database access, `--api URL --cert --key --ca` gives the
/// same output as `--database-url` for `tests list`, `agents`, `results` and `run-now`.
#[test]
fn the_operator_commands_print_the_same_over_the_api_as_over_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let pki = Pki::new(dir.path());
    let c = ApiCollector::start(dir.path(), &db, &pki);
    let alice = operator(&pki, "alice");
    let target = HttpTarget::start("ok");
    let mut a1 = Agent::new_tls(
        dir.path(),
        "a1",
        &format!("https://localhost:{}", c.grpc.port()),
        &http_test(&target.url(), "1s").replace("\"web\"", "\"portal\""),
        &pki,
    );
    a1.start();
    wait_for(Duration::from_secs(30), "a1's results", || {
        (results_of(&db, "a1", "portal") >= 3).then_some(())
    });
    let file = write(dir.path(), "fleet.toml", FLEET);
    let (code, out, err) = cli(&db, &["tests", "apply", "--file", &file]);
    assert_eq!(code, Some(0), "{out}{err}");
    wait_for(Duration::from_secs(20), "a1 to apply version 1", || {
        (db.scalar("SELECT count(*) FROM agents WHERE fleet_version = 1") == 1).then_some(())
    });
    let api_url = format!("https://localhost:{}", c.api.port());
    let (cert, key) = (alice.0.display().to_string(), alice.1.display().to_string());
    let ca = c.pki_ca.display().to_string();
    // Over the API: no database URL anywhere.
    let over_api = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend([
            "--api", &api_url, "--cert", &cert, "--key", &key, "--ca", &ca,
        ]);
        bare_cmd(&all)
    };
    let both = |args: &[&str]| {
        let (code, from_db, err) = cli(&db, args);
        assert_eq!(code, Some(0), "{args:?} over the database: {err}");
        let (code, from_api, err) = over_api(args);
        assert_eq!(code, Some(0), "{args:?} over the api: {err}");
        (from_db, from_api)
    };

    let (from_db, from_api) = both(&["tests", "list"]);
    assert_eq!(from_db, from_api);
    assert!(
        from_api.contains("agents: 1 known, 1 applied"),
        "{from_api}"
    );
    let (from_db, from_api) = both(&["tests", "list", "--json"]);
    assert_eq!(from_db, from_api);
    // `tests versions --json` is the API's document.
    let (code, versions, _) = cli(&db, &["tests", "versions", "--json"]);
    assert_eq!(code, Some(0));
    let api = curl(&c, Some(&alice), "GET", "/api/v1/tests/versions", None);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&versions).unwrap(),
        api.json()
    );

    let (from_db, from_api) = both(&["agents", "--json", "--select", "site=lab"]);
    let strip = |text: &str| {
        let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
        for a in v["agents"].as_array_mut().unwrap() {
            a["seen_seconds_ago"] = serde_json::Value::Null;
            a["last_seen"] = serde_json::Value::Null;
        }
        v
    };
    assert_eq!(strip(&from_db), strip(&from_api));
    assert_eq!(strip(&from_api)["agents"][0]["agent_id"], "a1");

    // run-now both ways (ten seconds apart: the agent's run-now rate limit).
    let run = ["run-now", "--agent", "a1", "--test", "portal"];
    let (code, from_db, err) = cli(&db, &run);
    assert_eq!(code, Some(0), "{from_db}{err}");
    std::thread::sleep(Duration::from_secs(11));
    let (code, from_api, err) = over_api(&run);
    assert_eq!(code, Some(0), "{from_api}{err}");
    let shape = |text: &str| -> Vec<String> {
        text.lines()
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(
        shape(&from_db)[1..],
        shape(&from_api)[1..],
        "{from_db}\n{from_api}"
    );
    assert!(
        from_api.contains("1 of 1 agents returned a result"),
        "{from_api}"
    );
    assert!(
        from_api.contains("a1                    ok    status 200"),
        "{from_api}"
    );
    let run_id = from_api
        .strip_prefix("run ")
        .and_then(|r| r.split(':').next())
        .unwrap()
        .to_string();
    // The collector records `done` a moment after the result landed.
    wait_for(Duration::from_secs(10), "the run's row to say done", || {
        (db.scalar(&format!(
            "SELECT count(*) FROM run_agents WHERE run_id = {run_id} AND state = 'done'"
        )) == 1)
            .then_some(())
    });
    let (from_db, from_api) = both(&["run-now", "--show", &run_id, "--json"]);
    let mut a: serde_json::Value = serde_json::from_str(&from_db).unwrap();
    let mut b: serde_json::Value = serde_json::from_str(&from_api).unwrap();
    for v in [&mut a, &mut b] {
        v["age_seconds"] = serde_json::Value::Null;
        v["expires_in_seconds"] = serde_json::Value::Null;
    }
    assert_eq!(a, b);

    // Results, once the agent stopped adding to them: the same bytes in every format.
    a1.stop();
    for format in ["table", "json", "csv"] {
        let (from_db, from_api) = both(&["results", "--agent", "a1", "--format", format]);
        assert_eq!(from_db, from_api, "{format}");
        assert!(from_api.lines().count() >= 4, "{format}: {from_api}");
    }

    // Over the API, an agent's certificate is refused with the API's reason.
    let (agent_cert, agent_key) = pki.agent("a1");
    let (code, _, err) = bare_cmd(&[
        "agents",
        "--api",
        &api_url,
        "--cert",
        agent_cert.to_str().unwrap(),
        "--key",
        agent_key.to_str().unwrap(),
        "--ca",
        &ca,
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no operator role"), "{err}");
}
