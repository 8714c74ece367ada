//! `edgeprobe-collector check` refuses what `run` would fail on (issue 25 item 6): a
//! server key that does not belong to its certificate, a missing key file, a database
//! that does not answer. `--offline` skips the database.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use crate::support::*;

fn write_config(dir: &Path, cert: &Path, key: &Path, ca: &Path, url: &str) -> PathBuf {
    let config = dir.join("check.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"\n\n[database]\nurl = \"{url}\"\n",
            cert.display(),
            key.display(),
            ca.display(),
        ),
    )
    .unwrap();
    config
}

#[test]
fn check_refuses_a_foreign_key_a_missing_key_and_an_unreachable_database() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let db = TestDb::new();
    let (cert, key) = pki.server();
    let (_, other_key) = pki.agent("berlin-1");

    let config = write_config(dir.path(), &cert, &key, &pki.ca_pem(), &db.url);
    let (code, out, err) = collector_cmd(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("reachable"), "{out}");

    // The key of another certificate: `run` fails to start on it.
    let config = write_config(dir.path(), &cert, &other_key, &pki.ca_pem(), &db.url);
    let (code, _, err) = collector_cmd(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("tls_cert/tls_key") && err.contains("does the key belong to the certificate?"),
        "{err}"
    );

    // A key file that is not there.
    let missing = dir.path().join("server.key");
    let config = write_config(dir.path(), &cert, &missing, &pki.ca_pem(), &db.url);
    let (code, _, err) = collector_cmd(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("cannot read tls_key {}", missing.display())),
        "{err}"
    );

    // A database nobody listens for: exit 1 with the reason; `--offline` passes.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let config = write_config(dir.path(), &cert, &key, &pki.ca_pem(), &url);
    let (code, _, err) = collector_cmd(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the database (url from") && err.contains("is not reachable"),
        "{err}"
    );
    assert!(!err.contains(&url), "the URL is never printed: {err}");
    let (code, out, err) =
        collector_cmd(&["check", "--offline", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("not connected (--offline)"), "{out}");
}
