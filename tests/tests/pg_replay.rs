//! The database upgrade test, without a proxy: a pgbench workload on Debian's Postgres 15 is
//! recorded by the probe (`--capture-cohort`), a dump taken when the capture starts is restored
//! into three instances, one of them missing the index the workload's main query uses, and
//! `bakeoff replay` names that query slower, finds no other difference, refuses the workload's
//! UPDATE unless writes are allowed, and sees no difference between the two identical instances.
//! Then the replay's own authentication (cleartext, MD5, SCRAM-SHA-256) and a session recorded
//! mid-way, against a real server.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use bakeoff_capture::{CaptureReader, CaptureWriter, ConnInfo, Direction, Kind, Meta, Record};
use bakeoff_replay::{
    ReplayOptions, Timing,
    postgres::{PgOptions, frontend_message, replay, sessions, startup_message},
};
use bakeoff_testkit::{
    cgroup::Cgroup,
    postgres::Postgres,
    probe::ProbeRun,
    process::{bin, scratch_dir},
};
use serde_json::Value;

const BIN: &str = "/usr/lib/postgresql/15/bin";
/// pgbench transactions per client, and clients per query mode.
const TRANSACTIONS: usize = 100;
const CLIENTS: usize = 2;

fn root() -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "this test loads eBPF programs and starts Postgres: run it as root (cargo xtask test)"
    );
    Ok(())
}

/// Runs a Postgres tool to its end (what it prints goes to the test's output).
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?}: {status}");
    Ok(())
}

/// A Postgres client tool (`pg_dump`, `pg_restore`, `pgbench`) against `pg` as `postgres`.
fn tool(name: &str, pg: &Postgres) -> Command {
    let mut cmd = Command::new(format!("{BIN}/{name}"));
    cmd.args([
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
        "-p",
        &pg.port.to_string(),
    ]);
    cmd
}

fn addr(pg: &Postgres) -> String {
    format!("127.0.0.1:{}", pg.port)
}

/// Pins this thread, and so every process it starts from now on (Postgres, pgbench, the probe,
/// the replay), to one CPU of those it may use; returns it. On two virtual CPUs, a backend
/// woken from the other CPU answers a 20 µs query in 30 to 80 µs depending on where the
/// scheduler put that connection (measured): identical instances then differ by up to 3x,
/// connection by connection, which no number of queries averages out.
fn pin_to_one_cpu() -> Result<usize> {
    // SAFETY: sched_getaffinity/sched_setaffinity on this thread with a zeroed cpu_set_t.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        ensure!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0,
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        );
        let cpu = (0..libc::CPU_SETSIZE as usize)
            .find(|&c| libc::CPU_ISSET(c, &set))
            .context("no CPU allowed")?;
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        ensure!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
        Ok(cpu)
    }
}

/// User and system CPU of this process's waited-for children so far (s).
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(u.ru_utime) + s(u.ru_stime)
}

/// `bakeoff replay FILE ARGS --json`: exit code, the JSON, and the CPU and wall time it took.
fn bakeoff_replay(file: &Path, args: &[&str]) -> Result<(i32, Value, f64, f64)> {
    let audit = file.with_file_name("audit.log");
    let (cpu, started) = (children_cpu(), Instant::now());
    let out = Command::new(bin("bakeoff")?)
        .arg("replay")
        .arg(file)
        .args(args)
        .arg("--json")
        .arg("--audit-log")
        .arg(&audit)
        .env_remove("PGPASSWORD")
        .output()?;
    let (cpu, wall) = (children_cpu() - cpu, started.elapsed().as_secs_f64());
    let json = serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow::anyhow!(
            "{args:?}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((out.status.code().unwrap_or(-1), json, cpu, wall))
}

fn endpoints(json: &Value) -> Vec<Value> {
    json["comparison"]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Captured with the probe, replayed against A, B (no primary key on pgbench_accounts) and A2:
/// the accounts query is named slower, the tellers query is not, no answer differs, the UPDATE
/// is refused, and every captured statement but it is replayed.
#[test]
fn a_captured_pgbench_workload_names_the_query_a_dropped_index_slowed() -> Result<()> {
    root()?;
    let cpu = pin_to_one_cpu()?;
    println!("pinned to CPU {cpu}");
    let pid = std::process::id();
    let dir = scratch_dir("pg-replay")?;
    let cg = |n: &str| Cgroup::create(&format!("bakeoff-pg-replay-{n}-{pid}"));
    let (src_cg, a_cg, a2_cg, b_cg, s_cg) = (cg("src")?, cg("a")?, cg("a2")?, cg("b")?, cg("s")?);
    let src = Postgres::start(&dir, "source", &src_cg)?;
    run(tool("pgbench", &src).args(["-i", "-s", "1", "-q", "postgres"]))?;
    // The snapshot the replay starts from: taken when the capture starts, before any of the
    // workload's writes.
    let dump = dir.join("snapshot.dump");
    run(tool("pg_dump", &src)
        .args(["-Fc", "-f"])
        .arg(&dump)
        .arg("postgres"))?;
    let file = dir.join("db.bkcap");
    let probe = ProbeRun::start(
        &dir,
        &[
            "--experiment".into(),
            "pg-replay".into(),
            "--cohort".into(),
            format!("db=cgroup:{}", src_cg.path().display()),
            "--capture-cohort".into(),
            "db".into(),
            "--capture-file".into(),
            file.display().to_string(),
        ],
    )?;
    let script = dir.join("read.sql");
    std::fs::write(
        &script,
        "\\set aid random(1, 100000)\n\\set tid random(1, 10)\n\
         SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n\
         SELECT tbalance FROM pgbench_tellers WHERE tid = :tid;\n",
    )?;
    // Prepared (Parse once, then Bind/Execute/Sync) and simple (Query) clients at once.
    let transactions = TRANSACTIONS.to_string();
    let benches = ["prepared", "simple"].map(|mode| {
        src.pgbench_command(&script, mode, CLIENTS as u32, &["-t", &transactions])
            .stdout(std::process::Stdio::null())
            .spawn()
    });
    for bench in benches {
        let status = bench.context("cannot start pgbench")?.wait()?;
        ensure!(status.success(), "pgbench: {status}");
    }
    src.psql("UPDATE pgbench_branches SET bbalance = bbalance + 7 WHERE bid = 1")?;
    std::thread::sleep(Duration::from_millis(500));
    let result = probe.stop()?;
    println!("probe stats: {}", result.stats);
    // What was sent: per prepared client one Parse+Sync per statement, then per transaction
    // two statements; the psql UPDATE.
    let per_query = 2 * CLIENTS * TRANSACTIONS;
    let captured = 2 * per_query + CLIENTS * 2 + 1;
    let losses = CaptureReader::new(std::fs::File::open(&file)?)?
        .filter(|r| r.as_ref().is_ok_and(|r| r.kind == Kind::Loss))
        .count();
    ensure!(losses == 0, "the capture lost {losses} pieces");

    let restore = |name: &str, cg: &Cgroup| -> Result<Postgres> {
        let pg = Postgres::start(&dir, name, cg)?;
        run(tool("pg_restore", &pg)
            .args(["--no-owner", "-d", "postgres"])
            .arg(&dump))?;
        pg.psql("ANALYZE")?;
        Ok(pg)
    };
    let a = restore("a", &a_cg)?;
    let a2 = restore("a2", &a2_cg)?;
    let b = restore("b", &b_cg)?;
    b.psql("ALTER TABLE pgbench_accounts DROP CONSTRAINT pgbench_accounts_pkey")?;

    // One session at a time: a query's latency is not its neighbours' CPU.
    let (code, json, _, _) = bakeoff_replay(
        &file,
        &[
            "--target",
            &addr(&a),
            "--against",
            &addr(&b),
            "--calibrate",
            &addr(&a2),
            "--concurrency",
            "1",
        ],
    )?;
    let eps = endpoints(&json);
    println!("A vs B: {}", serde_json::to_string_pretty(&eps)?);
    let accounts = "SQL SELECT abalance FROM pgbench_accounts WHERE aid = $?";
    let tellers = "SQL SELECT tbalance FROM pgbench_tellers WHERE tid = $?";
    let get = |name: &str| -> Result<&Value> {
        eps.iter()
            .find(|e| e["endpoint"] == name)
            .with_context(|| format!("no endpoint `{name}` in {eps:#?}"))
    };
    ensure!(code == 1, "exit {code}: {json:#}");
    ensure!(
        json["protocol"] == "postgres"
            && json["requests"] == captured - 1
            && json["skipped_writes"] == 1
            && json["errors"] == 0
            && json["unframed_bytes"] == 0
            && json["session_errors"].as_array().is_some_and(Vec::is_empty),
        "{captured} statements captured, all but the UPDATE replayed: {json:#}"
    );
    let (acc, tel) = (get(accounts)?, get(tellers)?);
    ensure!(
        acc["latency"] == "slower" && acc["requests"] == per_query,
        "{acc:#}"
    );
    ensure!(
        tel["latency"] == "no difference shown" && tel["requests"] == per_query,
        "{tel:#}"
    );
    for e in &eps {
        ensure!(
            e["status_diffs"] == 0
                && e["body_diffs"] == 0
                && e["errors"] == 0
                && (e["endpoint"] == accounts || e["latency"] == "no difference shown"),
            "{e:#}"
        );
    }
    // Writes were refused on the targets themselves too: A's branch is the snapshot's.
    let balance = |pg: &Postgres| pg.psql("SELECT bbalance FROM pgbench_branches WHERE bid = 1");
    ensure!(balance(&a)? == balance(&a2)?, "the replay wrote to A");

    // The two identical instances: no difference. (Not calibrated with A itself: interleaved,
    // A would then get two units in a row, warmer, and A2 none.)
    let (code, json, _, _) = bakeoff_replay(
        &file,
        &[
            "--target",
            &addr(&a),
            "--against",
            &addr(&a2),
            "--concurrency",
            "1",
        ],
    )?;
    println!(
        "A vs A2: {}",
        serde_json::to_string_pretty(&endpoints(&json))?
    );
    ensure!(code == 0, "A against A2: exit {code}: {json:#}");
    ensure!(
        endpoints(&json)
            .iter()
            .all(|e| e["latency"] == "no difference shown" && e["body_diffs"] == 0),
        "{json:#}"
    );

    // With --allow-writes, against a scratch instance only: the UPDATE runs.
    let scratch = restore("scratch", &s_cg)?;
    let before = balance(&scratch)?;
    let (code, json, _, _) =
        bakeoff_replay(&file, &["--target", &addr(&scratch), "--allow-writes"])?;
    ensure!(
        code == 0 && json["requests"] == captured && json["skipped_writes"] == 0,
        "{json:#}"
    );
    let update = json["outcomes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|o| {
            o["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("UPDATE pgbench_branches"))
        })
        .with_context(|| format!("no UPDATE replayed: {json:#}"))?;
    ensure!(
        update["error"].is_null()
            && update["body_excerpt"].as_str() == Some("UPDATE 1")
            && balance(&scratch)? != before,
        "{update:#}"
    );

    // Replay rate: units per CPU second of the replay process, both timing modes, against A.
    for (mode, args) in [
        ("as fast, concurrency 4", vec!["--concurrency", "4"]),
        (
            "recorded timing, speed 1",
            vec!["--recorded-timing", "1", "--concurrency", "8"],
        ),
    ] {
        let mut args = args;
        let target = addr(&a);
        args.extend(["--target", &target]);
        let (code, json, cpu, wall) = bakeoff_replay(&file, &args)?;
        let units = json["requests"].as_u64().unwrap_or(0) as f64;
        ensure!(code == 0 && units > 0.0, "{mode}: {json:#}");
        println!(
            "replay rate, {mode}: {units} units in {wall:.2} s wall, {cpu:.3} s CPU: \
             {:.0} units/s, {:.0} units per CPU second; share replayed {:.1}% \
             ({} of {captured} captured); late {} (max {} ms)",
            units / wall,
            units / cpu.max(1e-9),
            100.0 * units / captured as f64,
            units,
            json["late"],
            json["max_late_ms"],
        );
    }
    Ok(())
}

/// Two sessions as the probe records them: one from its startup (with its masked password
/// message), one recorded mid-way (startup parameters and a prepared statement in the Open
/// record's attributes), each asking something whose answer is known.
fn capture(file: &Path) -> Result<()> {
    let mut w = CaptureWriter::new(std::fs::File::create(file)?, &Meta::default())?;
    let server = ConnInfo {
        role: "server".into(),
        ..ConnInfo::default()
    };
    w.write(&Record::open(1, 1, &server))?;
    let mut bytes = startup_message(&[
        ("user", "postgres"),
        ("database", "postgres"),
        ("application_name", "captured"),
    ]);
    bytes.extend(frontend_message(b'p', b"*******\0"));
    bytes.extend(frontend_message(
        b'Q',
        b"SELECT current_setting('application_name') || 40 + 2\0",
    ));
    w.write(&Record::data(1, Direction::Ingress, 10, bytes))?;
    let mut midway = server.clone();
    midway.midstream = true;
    for (k, v) in [
        ("pg.user", "postgres"),
        ("pg.database", "postgres"),
        ("pg.statement.s1", "SELECT $1::int + 1"),
    ] {
        midway.attributes.insert(k.into(), v.into());
    }
    w.write(&Record::open(2, 2, &midway))?;
    // Bind s1 to the unnamed portal: no format codes, one text parameter "41".
    let mut bytes = frontend_message(b'B', b"\0s1\0\0\0\0\x01\0\0\0\x0241\0\0");
    bytes.extend(frontend_message(b'E', b"\0\0\0\0\0"));
    bytes.extend(frontend_message(b'S', b""));
    w.write(&Record::data(2, Direction::Ingress, 20, bytes))?;
    w.finish()?;
    Ok(())
}

/// The replay authenticates its own connections (the captured password message is masked and
/// never sent): cleartext, MD5 and SCRAM-SHA-256 with the given password; a missing or wrong
/// one is a clear per-session error. A session recorded mid-way starts from its attributes.
#[test]
fn replay_authenticates_itself_and_replays_a_session_recorded_midway() -> Result<()> {
    root()?;
    let dir = scratch_dir("pg-replay-auth")?;
    let cg = Cgroup::create(&format!("bakeoff-pg-replay-auth-{}", std::process::id()))?;
    let pg = Postgres::start(&dir, "db", &cg)?;
    let file = dir.join("two.bkcap");
    capture(&file)?;
    let s =
        sessions(CaptureReader::new(std::fs::File::open(&file)?)?.collect::<Result<Vec<_>, _>>()?);
    ensure!(s.len() == 2 && s[1].midstream, "{s:#?}");
    let target = addr(&pg).parse()?;
    // The replay's own user (postgres keeps trust, for psql here), for every session.
    pg.psql("CREATE ROLE replayer LOGIN")?;
    let options = |password: Option<&str>| PgOptions {
        replay: ReplayOptions {
            target,
            concurrency: 2,
            allow_writes: false,
            timeout: Duration::from_secs(10),
            timing: Timing::AsFast,
            noise: Default::default(),
        },
        user: Some("replayer".into()),
        database: None,
        password: password.map(str::to_string),
        lock_timeout: Duration::from_secs(1),
    };
    let hba = pg.dir.join("pg_hba.conf");
    for method in ["trust", "password", "md5", "scram-sha-256"] {
        // MD5 needs the password stored as MD5 (a SCRAM secret makes the server use SCRAM).
        let encryption = if method == "md5" {
            "md5"
        } else {
            "scram-sha-256"
        };
        pg.psql(&format!(
            "SET password_encryption = '{encryption}'; ALTER ROLE replayer PASSWORD 'pw-{method}'"
        ))?;
        std::fs::write(
            &hba,
            format!(
                "local all all trust\nhost all replayer 127.0.0.1/32 {method}\n\
                 host all all 127.0.0.1/32 trust\n"
            ),
        )?;
        pg.psql("SELECT pg_reload_conf()")?;
        std::thread::sleep(Duration::from_millis(300));
        let r = replay(&s, &options(Some(&format!("pw-{method}"))));
        let excerpts: Vec<&str> = r
            .replayed
            .outcomes
            .iter()
            .map(|o| o.body_excerpt.as_str())
            .collect();
        ensure!(
            r.session_errors.is_empty()
                && r.replayed.outcomes.iter().all(|o| o.error.is_none())
                && excerpts == ["row: (captured42); SELECT 1", "row: (42); SELECT 1"],
            "{method}: {r:#?}"
        );
        if method == "trust" {
            continue;
        }
        let missing = replay(&s, &options(None));
        ensure!(
            missing.session_errors.len() == 2
                && missing.session_errors[0]
                    .error
                    .contains("give --pg-password or PGPASSWORD")
                && missing.replayed.outcomes.iter().all(|o| o
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("session not started"))),
            "{method}, no password: {missing:#?}"
        );
        let wrong = replay(&s, &options(Some("nope")));
        ensure!(
            wrong.session_errors.len() == 2 && wrong.session_errors[0].error.contains("(28P01)"),
            "{method}, wrong password: {wrong:#?}"
        );
    }
    Ok(())
}

/// Sessions open before a capture starts replay from the state the probe kept since it
/// attached: pgbench's prepared-mode clients connect and prepare their statements, then
/// `bakeoff capture start` (through the collector) records them mid-way; their `Open` records
/// carry user, database, startup options and the prepared statements' SQL, and every captured
/// Execute replays without an error on an instance restored from the snapshot.
#[test]
fn sessions_open_before_a_capture_replay_from_the_state_the_probe_kept() -> Result<()> {
    root()?;
    let pid = std::process::id();
    let dir = scratch_dir("pg-replay-midway")?;
    let cg = |n: &str| Cgroup::create(&format!("bakeoff-pg-midway-{n}-{pid}"));
    let (src_cg, a_cg) = (cg("src")?, cg("a")?);
    let src = Postgres::start(&dir, "source", &src_cg)?;
    run(tool("pgbench", &src).args(["-i", "-s", "1", "-q", "postgres"]))?;
    let dump = dir.join("snapshot.dump");
    run(tool("pg_dump", &src)
        .args(["-Fc", "-f"])
        .arg(&dump)
        .arg("postgres"))?;
    let collector_dir = dir.join("collector");
    std::fs::create_dir_all(&collector_dir)?;
    let collector = bakeoff_testkit::collector::Collector::start(&collector_dir)?;
    let api = format!("http://127.0.0.1:{}", collector.http_port);
    let probe = ProbeRun::start(
        &dir,
        &[
            "--experiment".into(),
            "pg-midway".into(),
            "--cohort".into(),
            format!("db=cgroup:{}", src_cg.path().display()),
            "--collector".into(),
            collector.endpoint(),
            "--payload-prefix".into(),
            "4096".into(),
        ],
    )?;
    bakeoff_testkit::process::wait_for("the control channel", Duration::from_secs(20), || {
        collector
            .get("/api/v1/captures")
            .is_ok_and(|l| l["probes"].as_array().is_some_and(|p| !p.is_empty()))
    })?;
    let script = dir.join("read.sql");
    std::fs::write(
        &script,
        "\\set aid random(1, 100000)\n\
         SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n",
    )?;
    // Two prepared-mode sessions with a startup option, open well before the capture.
    let mut bench = src.pgbench_command(&script, "prepared", 2, &["-T", "6", "-R", "200"]);
    let bench = bench
        .env("PGOPTIONS", "-c work_mem=8MB")
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("cannot start pgbench")?;
    std::thread::sleep(Duration::from_millis(1500));
    let file = dir.join("midway.bkcap");
    let out = Command::new(bin("bakeoff")?)
        .args([
            "capture",
            "start",
            "--api",
            &api,
            "--experiment",
            "pg-midway",
        ])
        .args([
            "--cohort",
            "db",
            "--protocol",
            "postgres",
            "--duration",
            "2s",
            "-o",
        ])
        .arg(&file)
        .output()?;
    ensure!(
        out.status.success(),
        "capture: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let status = bakeoff_testkit::process::wait_output(bench, Duration::from_secs(30))?;
    ensure!(status.status.success(), "pgbench: {status:?}");
    drop(probe.stop()?);

    // The capture's sessions: mid-way, with the state kept since attach.
    let mut opens = Vec::new();
    for r in CaptureReader::new(std::fs::File::open(&file)?)? {
        let r = r?;
        if r.kind == Kind::Open {
            opens.push(r.conn_info()?);
        }
        ensure!(r.kind != Kind::Loss, "a loss: {:?}", r.loss_info());
    }
    ensure!(opens.len() == 2, "{opens:#?}");
    for info in &opens {
        let a = &info.attributes;
        ensure!(
            info.midstream
                && a.get("pg.user").map(String::as_str) == Some("postgres")
                && a.get("pg.database").map(String::as_str) == Some("postgres")
                && a.get("pg.param.options")
                    .is_some_and(|o| o.contains("work_mem=8MB"))
                && a.iter().any(|(k, v)| {
                    k.starts_with("pg.statement.") && v.contains("FROM pgbench_accounts")
                }),
            "{info:#?}"
        );
    }
    let a = Postgres::start(&dir, "a", &a_cg)?;
    run(tool("pg_restore", &a)
        .args(["--no-owner", "-d", "postgres"])
        .arg(&dump))?;
    let (code, json, _, _) = bakeoff_replay(&file, &["--target", &addr(&a)])?;
    let outcomes = json["outcomes"].as_array().cloned().unwrap_or_default();
    ensure!(
        code == 0
            && json["errors"] == 0
            && json["skipped_writes"] == 0
            && json["unframed_bytes"] == 0
            && json["session_errors"].as_array().is_some_and(Vec::is_empty)
            && json["requests"].as_u64().is_some_and(|n| n >= 100)
            && outcomes.len() as u64 == json["requests"].as_u64().unwrap_or(0)
            && outcomes.iter().all(|o| {
                o["path"] == "SELECT abalance FROM pgbench_accounts WHERE aid = $?"
                    && o["error"].is_null()
                    && o["body_excerpt"]
                        .as_str()
                        .is_some_and(|e| e.starts_with("row: ("))
            }),
        "exit {code}: {json:#}"
    );
    Ok(())
}
