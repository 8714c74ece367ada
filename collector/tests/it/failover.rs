//! PostgreSQL failover seen from the collector (issue 16, gap 5), on two throwaway
//! clusters: the collector is given both in one multi-host URL with
//! `target_session_attrs=read-write`, and the first is demoted while results land (made
//! read-only, as a Patroni primary that lost its leader key is). Its open connections
//! still answer but refuse every write with SQLSTATE 25006: the writers must drop them and
//! reconnect, which the URL sends to the other, writable server, and `/readyz` must not
//! call a read-only server ready. The full Patroni + etcd run, with SIGKILL and the
//! exactly-once count, is `scripts/test-failover.sh` (root).

use std::time::Duration;

use crate::support::*;

fn count(url: &str) -> i64 {
    postgres::Client::connect(url, postgres::NoTls)
        .and_then(|mut c| c.query_one("SELECT count(*) FROM results", &[]))
        .map_or(0, |r| r.get(0))
}

#[test]
fn a_demoted_primary_sends_the_writers_to_the_writable_host() {
    let tmp = tempfile::tempdir().unwrap();
    let old = PgCluster::start();
    let new = PgCluster::start();
    for c in [&old, &new] {
        postgres::Client::connect(&c.url("postgres"), postgres::NoTls)
            .unwrap()
            .batch_execute("CREATE DATABASE edgeprobe")
            .unwrap();
        let (code, _, stderr) = collector_cmd(&["migrate", "--database-url", &c.url("edgeprobe")]);
        assert_eq!(code, Some(0), "migrate failed: {stderr}");
    }
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/edgeprobe?target_session_attrs=read-write",
        old.port, new.port
    );
    let collector = Collector::start_url(tmp.path(), &url, free_addr(), free_addr());
    let target = HttpTarget::start("ok");
    let mut agent = Agent::new(
        tmp.path(),
        "demoted",
        &collector.endpoint(),
        &http_test(&target.url(), "100ms"),
    );
    agent.start();
    wait_for(Duration::from_secs(30), "results on the first host", || {
        (count(&old.url("edgeprobe")) > 5).then_some(())
    });
    assert_eq!(count(&new.url("edgeprobe")), 0);

    // The demotion: every session of the first host turns read-only at its next
    // transaction.
    let mut admin = postgres::Client::connect(&old.url("postgres"), postgres::NoTls).unwrap();
    admin
        .batch_execute("ALTER SYSTEM SET default_transaction_read_only = on")
        .unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for(
        Duration::from_secs(30),
        "results on the writable host after the demotion",
        || (count(&new.url("edgeprobe")) > 5).then_some(()),
    );
    wait_for(
        Duration::from_secs(10),
        "/readyz 200 on the new host",
        || {
            http_get(collector.http, "/readyz")
                .filter(|(code, _)| *code == 200)
                .map(|_| ())
        },
    );
    agent.stop();
}
