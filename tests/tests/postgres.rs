//! Postgres 15 (Debian's server, `psql`, `pgbench`) watched from the kernel: every executed
//! statement becomes one event, named by its normalized statement, with errors (SQLSTATE) and
//! row counts; and a canary whose index was dropped fails the verdict on that query, named.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use bakeoff_probe::{event::RequestEvent, protocol::sql::normalize};
use bakeoff_testkit::{
    cgroup::Cgroup,
    collector::Collector,
    postgres::Postgres,
    probe::ProbeRun,
    process::{Guard, bin, scratch_dir, wait_for},
};
use serde_json::Value;

fn root() -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "this test loads eBPF programs and starts Postgres: run it as root (cargo xtask test)"
    );
    Ok(())
}

const SCHEMA: &str = "CREATE TABLE items (id int PRIMARY KEY, category int, payload text); \
     INSERT INTO items SELECT g, g % 1000, md5(g::text) FROM generate_series(1, 100000) g; \
     ANALYZE items;";

fn by_path(events: &[RequestEvent]) -> BTreeMap<String, Vec<&RequestEvent>> {
    let mut out: BTreeMap<String, Vec<&RequestEvent>> = BTreeMap::new();
    for e in events {
        out.entry(e.path.clone()).or_default().push(e);
    }
    out
}

/// Simple (psql) and extended (pgbench prepared and simple) protocol, an error, on both data
/// paths: exact counts per normalized statement, fields, row counts.
#[test]
fn every_statement_becomes_one_exact_event() -> Result<()> {
    root()?;
    for path in ["auto", "syscall"] {
        let dir = scratch_dir(&format!("pg-exact-{path}"))?;
        let cg = Cgroup::create(&format!("bakeoff-pg-exact-{path}-{}", std::process::id()))?;
        let pg = Postgres::start(&dir, "db", &cg)?;
        pg.psql(SCHEMA)?;
        pg.psql("CREATE INDEX ON items (category)")?;
        let probe = ProbeRun::start(
            &dir,
            &[
                "--data-path".into(),
                path.into(),
                "--cohort".into(),
                format!("canary=cgroup:{}", cg.path().display()),
            ],
        )?;
        // One simple-query message with two statements: two events.
        pg.psql("SELECT count(*) FROM items WHERE category = 7; SELECT payload FROM items WHERE id = 42")?;
        let err = pg.psql_error("SELECT 1/0")?;
        ensure!(err.contains("division by zero"), "{err}");
        let script = dir.join("by-id.sql");
        std::fs::write(
            &script,
            "\\set id random(1, 100000)\nSELECT payload FROM items WHERE id = :id;\n",
        )?;
        pg.pgbench(&script, "prepared", 2, &["-t", "25"])?;
        pg.pgbench(&script, "simple", 1, &["-t", "10"])?;
        std::thread::sleep(Duration::from_millis(500));
        let result = probe.stop()?;
        let what = format!("postgres, {path} path");
        let paths = by_path(&result.events);
        let count = |sql: &str| paths.get(&normalize(sql)).map_or(0, Vec::len);
        let summary: Vec<String> = paths
            .iter()
            .map(|(p, v)| format!("{} x {p}", v.len()))
            .collect();
        ensure!(
            count("SELECT count(*) FROM items WHERE category = 7") == 1
                && count("SELECT payload FROM items WHERE id = 42") == 11
                && count("SELECT payload FROM items WHERE id = $1") == 50
                && count("SELECT 1/0") == 1,
            "{what}: events per statement: {summary:#?}"
        );
        for e in &result.events {
            ensure!(
                e.protocol == "postgres"
                    && e.method == "SQL"
                    && e.cohort == "canary"
                    && e.role == "server"
                    && e.peer
                        .as_deref()
                        .is_some_and(|p| p.starts_with("127.0.0.1:"))
                    // A multi-statement query's bytes go to its first statement.
                    && e.bytes_out > 0
                    && !e.exe.is_empty(),
                "{what}: {e:?}"
            );
        }
        let error = &paths[&normalize("SELECT 1/0")][0];
        ensure!(
            error.attributes.get("db.sqlstate").map(String::as_str) == Some("22012")
                && error.error.as_deref().is_some_and(|m| m.contains("22012"))
                && error.duration_ns > 0,
            "{what}: the failing statement: {error:?}"
        );
        let count_event = &paths[&normalize("SELECT count(*) FROM items WHERE category = 7")][0];
        ensure!(
            count_event.error.is_none()
                && count_event.attributes.get("db.rows").map(String::as_str) == Some("1"),
            "{what}: {count_event:?}"
        );
        ensure!(
            paths[&normalize("SELECT payload FROM items WHERE id = $1")]
                .iter()
                .all(|e| e.attributes.get("db.rows").map(String::as_str) == Some("1")),
            "{what}: row counts of the prepared statement"
        );
    }
    Ok(())
}

/// `metric endpoint` of every failing metric.
fn failing(v: &Value) -> Vec<String> {
    v["metrics"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["decision"] == "fail")
        .map(|m| {
            format!(
                "{} {}",
                m["metric"].as_str().unwrap_or(""),
                m["endpoint"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// Baseline and canary Postgres with the same data; the canary lacks the index on `category`.
/// pgbench drives both with the same two queries (extended protocol). The verdict must FAIL and
/// name the query by category; the query by id, unchanged, must not be what fails alone.
#[test]
fn a_query_slowed_by_a_dropped_index_fails_the_verdict_named() -> Result<()> {
    root()?;
    const EXPERIMENT: &str = "pg-it";
    let pid = std::process::id();
    let dir: PathBuf = scratch_dir("pg-verdict")?;
    let cgs = ["baseline", "canary"].map(|n| Cgroup::create(&format!("bakeoff-pg-{n}-{pid}")));
    let [base_cg, canary_cg] = cgs;
    let (base_cg, canary_cg) = (base_cg?, canary_cg?);
    let base = Postgres::start(&dir, "baseline", &base_cg)?;
    let canary = Postgres::start(&dir, "canary", &canary_cg)?;
    for pg in [&base, &canary] {
        pg.psql(SCHEMA)?;
    }
    base.psql("CREATE INDEX ON items (category)")?;

    let collector = Collector::start(&dir)?;
    let ready = dir.join("ready");
    let _probe = Guard::spawn(
        "bakeoff-probe",
        std::process::Command::new(bin("bakeoff-probe")?)
            .args(["--experiment", EXPERIMENT, "--output", "none"])
            .arg("--cohort")
            .arg(format!("baseline=cgroup:{}", base_cg.path().display()))
            .arg("--cohort")
            .arg(format!("canary=cgroup:{}", canary_cg.path().display()))
            .arg("--collector")
            .arg(format!("http://127.0.0.1:{}", collector.grpc_port))
            .arg("--ready-file")
            .arg(&ready)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("probe.log"))?),
    )?;
    wait_for("probe ready", Duration::from_secs(60), || ready.exists())?;

    let script = dir.join("mix.sql");
    std::fs::write(
        &script,
        "\\set id random(1, 100000)\n\\set c random(0, 999)\n\
         SELECT payload FROM items WHERE id = :id;\n\
         SELECT count(*) FROM items WHERE category = :c;\n",
    )?;
    std::thread::scope(|s| -> Result<()> {
        let runs: Vec<_> = [&base, &canary]
            .into_iter()
            .map(|pg| {
                let script = script.clone();
                s.spawn(move || pg.pgbench(&script, "extended", 2, &["-T", "12"]))
            })
            .collect();
        for r in runs {
            r.join()
                .map_err(|_| anyhow::anyhow!("pgbench thread panicked"))??;
        }
        Ok(())
    })?;

    // Once the judge covers every stored statement of both cohorts.
    let stored = || -> Result<u64> {
        let groups = collector.get(&format!("/api/v1/groups?experiment={EXPERIMENT}&by=cohort"))?;
        Ok(groups
            .as_array()
            .context("groups")?
            .iter()
            .filter_map(|g| g["requests"].as_u64())
            .sum())
    };
    let url = format!("/api/v1/verdict?experiment={EXPERIMENT}&baseline=baseline&canary=canary");
    let deadline = Instant::now() + Duration::from_secs(40);
    let verdict = loop {
        let want = stored()?;
        let v = collector.get(&url)?;
        let judged = v["requests"]["canary"].as_u64().unwrap_or(0)
            + v["requests"]["baseline"].as_u64().unwrap_or(0);
        if want > 0 && judged == want {
            break v;
        }
        if Instant::now() > deadline {
            bail!("the verdict covers {judged} of {want} statements after 40 s: {v:#}");
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let slow = format!(
        "SQL {}",
        normalize("SELECT count(*) FROM items WHERE category = $1")
    );
    let fails = failing(&verdict);
    println!(
        "verdict: {} {:?}\nreasons: {}",
        verdict["decision"], fails, verdict["reasons"]
    );
    ensure!(
        verdict["decision"] == "fail",
        "a canary without its index passed: {verdict:#}"
    );
    ensure!(
        fails.iter().any(|f| f.ends_with(&slow)),
        "no failing metric names `{slow}`: {fails:?}"
    );
    ensure!(
        verdict["reasons"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r.as_str().is_some_and(|r| r.contains(&slow))),
        "the reasons do not name `{slow}`: {}",
        verdict["reasons"]
    );
    Ok(())
}

/// The probe attached while pgbench's connections are busy in prepared mode (named statements
/// parsed when each connection started, before the probe): every statement executed after the
/// attach is an event; a statement prepared before it is named `EXECUTE <name> /* prepared
/// before attach */`, never guessed; rows and errors are right.
#[test]
fn attached_to_open_postgres_connections_no_field_is_wrong() -> Result<()> {
    root()?;
    for path in ["auto", "syscall"] {
        let what = format!("postgres attach mid-connection, {path} path");
        let dir = scratch_dir(&format!("pg-attach-{path}"))?;
        let cg = Cgroup::create(&format!("bakeoff-pg-attach-{path}-{}", std::process::id()))?;
        let pg = Postgres::start(&dir, "db", &cg)?;
        pg.psql(SCHEMA)?;
        let script = dir.join("two.sql");
        std::fs::write(
            &script,
            "\\set id random(1, 100000)\n\
             SELECT payload FROM items WHERE id = :id;\n\
             SELECT id FROM items WHERE id = :id + 1;\n",
        )?;
        let log_prefix = dir.join("pgbench-log");
        let mut bench = pg
            .pgbench_command(&script, "prepared", 2, &["-T", "5", "-R", "150"])
            .arg("--log")
            .arg(format!("--log-prefix={}", log_prefix.display()))
            .current_dir(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("cannot start pgbench")?;
        std::thread::sleep(Duration::from_millis(1500));
        let probe = ProbeRun::start(
            &dir,
            &[
                "--data-path".into(),
                path.into(),
                "--cohort".into(),
                format!("canary=cgroup:{}", cg.path().display()),
            ],
        )?;
        let attached = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = bench.try_wait()? {
                break status;
            }
            ensure!(Instant::now() < deadline, "{what}: pgbench did not end");
            std::thread::sleep(Duration::from_millis(100));
        };
        ensure!(status.success(), "{what}: pgbench failed");
        std::thread::sleep(Duration::from_millis(500));
        let result = probe.stop()?;
        // Transactions from pgbench's own log: end time (epoch s, us) in columns 5 and 6.
        let (mut total, mut after) = (0usize, 0usize);
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if !entry
                .file_name()
                .to_string_lossy()
                .starts_with("pgbench-log")
            {
                continue;
            }
            for line in std::fs::read_to_string(entry.path())?.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                let (Some(s), Some(us)) = (f.get(4), f.get(5)) else {
                    bail!("{what}: pgbench log line {line}");
                };
                let end = s.parse::<f64>()? + us.parse::<f64>()? / 1e6;
                total += 1;
                // Ended well after the attach: begun after it too (rate-limited, ~1 ms each).
                if end > attached + 0.3 {
                    after += 1;
                }
            }
        }
        ensure!(
            after > 100,
            "{what}: only {after} transactions after the attach"
        );
        let known = [
            normalize("SELECT payload FROM items WHERE id = $1"),
            normalize("SELECT id FROM items WHERE id = $1 + 1"),
        ];
        let mut unnamed = 0;
        for e in &result.events {
            let prepared_before =
                e.path.starts_with("EXECUTE ") && e.path.ends_with("/* prepared before attach */");
            unnamed += usize::from(prepared_before);
            ensure!(
                e.protocol == "postgres"
                    && e.method == "SQL"
                    && e.cohort == "canary"
                    && e.error.is_none()
                    && (known.contains(&e.path) || prepared_before)
                    && e.attributes.get("db.rows").is_none_or(|r| r == "1"),
                "{what}: {e:?}"
            );
        }
        let events = result.events.len();
        ensure!(
            events >= 2 * after && events <= 2 * total,
            "{what}: {events} events for {after}..{total} transactions of two statements"
        );
        ensure!(
            unnamed > 0,
            "{what}: no statement was named as prepared before the attach: {:?}",
            by_path(&result.events).keys().collect::<Vec<_>>()
        );
    }
    Ok(())
}
