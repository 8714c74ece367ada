//! TLS to PostgreSQL (`pgtls`): a throwaway cluster with `ssl = on` and a server
//! certificate from our own `ca init` / `cert issue --server`, client certificates checked
//! by PostgreSQL's `cert` authentication, and every `sslmode` through `migrate`, `check`
//! and `run`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;

/// The role that may log in only over TLS with a client certificate (CN = role).
const CERT_ROLE: &str = "edgeprobe_tls";

/// A cluster serving TLS with a certificate issued by `pki`'s CA for `localhost` and
/// 127.0.0.1; `CERT_ROLE` must come over TLS with a certificate of the same CA.
struct TlsPg {
    cluster: PgCluster,
    pki: Pki,
    data: PathBuf,
}

impl TlsPg {
    fn start(dir: &Path) -> TlsPg {
        let pki = Pki::new(dir);
        pki.agent(CERT_ROLE);
        let cluster = PgCluster::start();
        let mut admin = postgres::Client::connect(&cluster.url("postgres"), postgres::NoTls)
            .expect("admin connection");
        let data: String = admin.query_one("SHOW data_directory", &[]).unwrap().get(0);
        let pg = TlsPg {
            cluster,
            pki,
            data: PathBuf::from(data),
        };
        pg.serve_certificate("localhost");
        // The CA checks client certificates; the role cannot log in without one.
        let ca = pg.install("ca.pem", &pg.pki.ca_pem());
        let hba: String = admin.query_one("SHOW hba_file", &[]).unwrap().get(0);
        let rest = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(
            &hba,
            format!(
                "hostnossl all {CERT_ROLE} 127.0.0.1/32 reject\nhostssl all {CERT_ROLE} 127.0.0.1/32 cert\n{rest}"
            ),
        )
        .unwrap();
        // ALTER SYSTEM refuses to run in a transaction block: one statement per call.
        for sql in [
            format!("ALTER SYSTEM SET ssl_ca_file = '{ca}'"),
            format!("CREATE ROLE {CERT_ROLE} LOGIN"),
        ] {
            admin.batch_execute(&sql).unwrap();
        }
        pg.reload(&mut admin);
        pg
    }

    /// Copies `src` into the data directory as the server may read it (postgres, 0600).
    fn install(&self, name: &str, src: &Path) -> String {
        let dst = self.data.join(name);
        std::fs::copy(src, &dst).unwrap();
        let status = std::process::Command::new("chown")
            .arg("postgres")
            .arg(&dst)
            .status()
            .unwrap();
        assert!(status.success());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600)).unwrap();
        dst.display().to_string()
    }

    /// Serves the server certificate issued for `name` (issuing it first if needed).
    fn serve_certificate(&self, name: &str) {
        let (cert, key) = self.pki.pair(name);
        if !cert.exists() {
            self.pki.issue(&["--name", name, "--server"]);
        }
        let cert = self.install("server.pem", &cert);
        let key = self.install("server.key", &key);
        let mut admin = self.admin();
        for sql in [
            format!("ALTER SYSTEM SET ssl_cert_file = '{cert}'"),
            format!("ALTER SYSTEM SET ssl_key_file = '{key}'"),
            "ALTER SYSTEM SET ssl = on".to_string(),
        ] {
            admin.batch_execute(&sql).unwrap();
        }
        self.reload(&mut admin);
    }

    fn reload(&self, admin: &mut postgres::Client) {
        admin.batch_execute("SELECT pg_reload_conf()").unwrap();
        // The postmaster reloads asynchronously; a new backend sees the new settings.
        wait_for(Duration::from_secs(10), "ssl = on after reload", || {
            let on: String = self.admin().query_one("SHOW ssl", &[]).ok()?.get(0);
            (on == "on").then_some(())
        });
        std::thread::sleep(Duration::from_millis(200));
    }

    fn admin(&self) -> postgres::Client {
        postgres::Client::connect(&self.cluster.url("postgres"), postgres::NoTls).unwrap()
    }

    /// A fresh database owned by `CERT_ROLE`.
    fn db(&self) -> TestDb {
        let db = TestDb::on_server(&self.cluster.url("postgres"));
        self.admin()
            .batch_execute(&format!(
                "ALTER DATABASE {} OWNER TO {CERT_ROLE}",
                db_name(&db)
            ))
            .unwrap();
        db
    }

    /// The URL of `db` for `CERT_ROLE` with its client certificate, and `query`.
    fn url(&self, db: &TestDb, query: &str) -> String {
        let (cert, key) = self.pki.pair(CERT_ROLE);
        format!(
            "postgres://{CERT_ROLE}@127.0.0.1:{}/{}?{query}&sslcert={}&sslkey={}",
            self.cluster.port,
            db_name(db),
            cert.display(),
            key.display()
        )
    }

    fn ca(&self) -> String {
        self.pki.ca_pem().display().to_string()
    }
}

fn db_name(db: &TestDb) -> String {
    db.url.rsplit('/').next().unwrap().to_string()
}

/// A CA that issued nothing the server holds.
fn other_ca(dir: &Path) -> String {
    let ca = dir.join("other-ca");
    let (code, _, err) = collector_cmd(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    assert_eq!(code, Some(0), "ca init: {err}");
    ca.join("ca.pem").display().to_string()
}

#[test]
fn verify_full_with_a_client_certificate_encrypts_every_collector_connection() {
    let dir = tempfile::tempdir().unwrap();
    let pg = TlsPg::start(dir.path());
    let mut db = pg.db();
    let url = pg.url(&db, &format!("sslmode=verify-full&sslrootcert={}", pg.ca()));

    // `migrate` connects over verified TLS as the certificate's role.
    let (code, out, err) = collector_cmd(&["migrate", "--database-url", &url]);
    assert_eq!(code, Some(0), "migrate: {out}{err}");
    assert!(db.scalar("SELECT count(*) FROM edgeprobe_migrations") >= 1);

    // `check` reads the same settings and files.
    let config = dir.path().join("check.toml");
    std::fs::write(
        &config,
        format!("[server]\ninsecure = true\n\n[database]\nurl = \"{url}\"\n"),
    )
    .unwrap();
    let (code, out, err) = collector_cmd(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(0), "check: {out}{err}");
    assert!(out.contains("sslmode=verify-full"), "{out}");

    // `run`: results land, and every connection of the collector is TLS 1.3 with the
    // client certificate.
    let plain = std::mem::replace(&mut db.url, url);
    let collector = Collector::start(dir.path(), &db);
    db.url = plain;
    let target = HttpTarget::start("over tls");
    let mut agent = Agent::new(
        dir.path(),
        "tls-1",
        &collector.endpoint(),
        &http_test(&target.url(), "200ms"),
    );
    agent.start();
    wait_for(Duration::from_secs(30), "5 rows", || {
        (db.scalar("SELECT count(*) FROM results") >= 5).then_some(())
    });
    assert_eq!(agent.stop(), Some(0));
    let last = drain(&mut agent, &db, "tls-1");
    assert_exactly_once(&db, "tls-1", last);

    let row = pg
        .admin()
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl),
                    min(s.version), min(s.client_dn), max(s.client_dn)
               FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
              WHERE a.datname = $1 AND a.usename = $2",
            &[&db_name(&db), &CERT_ROLE],
        )
        .unwrap();
    let (tls, plain): (i64, i64) = (row.get(0), row.get(1));
    // Two writers and the health check, at least.
    assert!(tls >= 3, "encrypted collector connections: {tls}");
    assert_eq!(plain, 0, "plaintext collector connections");
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("TLSv1.3"));
    let dn = format!("/CN={CERT_ROLE}");
    assert_eq!(
        row.get::<_, Option<String>>(3).as_deref(),
        Some(dn.as_str())
    );
    assert_eq!(
        row.get::<_, Option<String>>(4).as_deref(),
        Some(dn.as_str())
    );
}

#[test]
fn a_server_certificate_from_another_ca_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let pg = TlsPg::start(dir.path());
    let mut db = pg.db();
    let wrong = other_ca(dir.path());
    let url = pg.url(&db, &format!("sslmode=verify-full&sslrootcert={wrong}"));

    let (code, _, err) = collector_cmd(&["migrate", "--database-url", &url]);
    assert_eq!(code, Some(1), "{err}");
    let clear = format!("the server's certificate is not issued by a CA in sslrootcert={wrong}");
    assert!(err.contains(&clear), "{err}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'results'"),
        0
    );

    // `run` says the same and never becomes ready.
    let http = free_addr();
    let plain = std::mem::replace(&mut db.url, url.clone());
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ninsecure = true\ngrpc_listen = \"{}\"\nhttp_listen = \"{http}\"\n\n[database]\nurl = \"{url}\"\n",
            free_addr()
        ),
    )
    .unwrap();
    db.url = plain;
    let mut cmd = std::process::Command::new(collector_bin());
    cmd.arg("run").arg("--config").arg(&config);
    let collector = Proc::spawn(cmd, dir.path().join("collector.log"));
    wait_for(Duration::from_secs(20), "the refusal in the log", || {
        collector.log_text().contains(&clear).then_some(())
    });
    assert_ne!(http_get(http, "/readyz").map(|r| r.0), Some(200));
    assert!(
        !collector.log_text().contains(CERT_ROLE),
        "the URL is never logged"
    );

    // A file that is not there is a configuration error (exit 2) for `check` and `migrate`.
    let missing = dir.path().join("nope.pem");
    let url = pg.url(
        &db,
        &format!("sslmode=verify-full&sslrootcert={}", missing.display()),
    );
    std::fs::write(
        &config,
        format!("[server]\ninsecure = true\n\n[database]\nurl = \"{url}\"\n"),
    )
    .unwrap();
    let (code, _, err) = collector_cmd(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("sslrootcert={}: cannot read", missing.display())),
        "{err}"
    );
    let (code, _, err) = collector_cmd(&["migrate", "--database-url", &url]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot read"), "{err}");
    // `check` reads the URL from the environment too, as the systemd unit passes it.
    std::fs::write(&config, "[server]\ninsecure = true\n").unwrap();
    let out = std::process::Command::new(collector_bin())
        .args(["check", "--config", config.to_str().unwrap()])
        .env("EDGEPROBE_DATABASE_URL", &url)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot read") && err.contains("url from $EDGEPROBE_DATABASE_URL"),
        "{err}"
    );
}

#[test]
fn each_sslmode_checks_what_libpq_checks() {
    let dir = tempfile::tempdir().unwrap();
    let pg = TlsPg::start(dir.path());
    // A certificate of our CA that names another host than 127.0.0.1.
    pg.serve_certificate("db.example.net");
    let migrate = |query: String| {
        let db = pg.db();
        let url = pg.url(&db, &query);
        let (code, _, err) = collector_cmd(&["migrate", "--database-url", &url]);
        (code, err)
    };
    let ca = pg.ca();
    let wrong = other_ca(dir.path());

    // require, without a client certificate: before pgtls every such connection failed
    // ("no TLS implementation configured").
    let db = pg.db();
    let url = format!("{}?sslmode=require", db.url);
    let (code, _, err) = collector_cmd(&["migrate", "--database-url", &url]);
    assert_eq!(code, Some(0), "plain require: {err}");
    // require: encrypted, the certificate unchecked.
    let (code, err) = migrate("sslmode=require".into());
    assert_eq!(code, Some(0), "require: {err}");
    // verify-ca: our CA issued it, the name does not matter.
    let (code, err) = migrate(format!("sslmode=verify-ca&sslrootcert={ca}"));
    assert_eq!(code, Some(0), "verify-ca: {err}");
    // require with a CA is verify-ca, as in libpq.
    let (code, err) = migrate(format!("sslmode=require&sslrootcert={wrong}"));
    assert_eq!(code, Some(1), "require with a wrong CA: {err}");
    assert!(err.contains("not issued by a CA in sslrootcert"), "{err}");
    // verify-full: the certificate must name the host of the URL.
    let (code, err) = migrate(format!("sslmode=verify-full&sslrootcert={ca}"));
    assert_eq!(code, Some(1), "verify-full with another name: {err}");
    assert!(
        err.contains("certificate not valid for name \"127.0.0.1\""),
        "{err}"
    );
    // disable: plaintext, which the certificate role may not use.
    let (code, err) = migrate("sslmode=disable".into());
    assert_eq!(code, Some(1), "disable: {err}");
    assert!(err.contains("pg_hba.conf rejects connection"), "{err}");
}
