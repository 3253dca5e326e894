//! The probe with least privilege: run as uid 65534 (nobody) holding nothing but the capabilities
//! of its data path (setpriv sets the inheritable, ambient and bounding sets to exactly those),
//! against real servers run by root in a cohort cgroup. With the minimal set every request is
//! one exact event; without each capability of the set the probe stops with an error naming it,
//! or, for the one that only degrades a feature (CAP_SYS_PTRACE; CAP_SYS_ADMIN and
//! CAP_SYS_PTRACE for the TLS uprobes), keeps going and names it with what was lost.
//! Why each capability: `probe-user/src/kernel/privileges.rs`.

use std::{
    collections::HashMap,
    os::unix::fs::chown,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use bakeoff_probe::event::RequestEvent;
use bakeoff_testkit::{
    cgroup::Cgroup,
    client::{Conn, Request, Response},
    probe::ProbeRun,
    process::{Guard, bin, free_port, scratch_dir, wait_for, wait_for_port},
    tls::Pki,
};

const NOBODY: u32 = 65534;

/// The minimal sets, in setpriv's spelling.
const CGROUP_SET: &[&str] = &[
    "bpf",
    "perfmon",
    "net_admin",
    "dac_read_search",
    "sys_ptrace",
];
const SYSCALL_SET: &[&str] = &["bpf", "perfmon", "dac_read_search", "sys_ptrace"];
/// CAP_SYS_ADMIN passes every check CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN would: with the TLS
/// uprobes, which need it, those three are redundant.
const TLS_SET: &[&str] = &["sys_admin", "dac_read_search", "sys_ptrace"];

/// Capabilities whose absence only degrades (the probe runs and names it).
const DEGRADING: &[&str] = &["sys_ptrace"];

/// One probe start at a time: each loads the programs and attaches hooks host-wide.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn cap_name(cap: &str) -> String {
    format!("CAP_{}", cap.to_uppercase())
}

fn cap_number(cap: &str) -> Result<u32> {
    Ok(match cap {
        "dac_read_search" => 2,
        "net_admin" => 12,
        "sys_ptrace" => 19,
        "sys_admin" => 21,
        "perfmon" => 38,
        "bpf" => 39,
        other => anyhow::bail!("unknown capability {other}"),
    })
}

fn without<'a>(set: &[&'a str], cap: &str) -> Vec<&'a str> {
    set.iter().copied().filter(|c| *c != cap).collect()
}

/// `setpriv` arguments that run a program as nobody with exactly `caps`.
fn setpriv(caps: &[&str]) -> Vec<String> {
    let set = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    [
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--inh-caps",
        &set,
        "--ambient-caps",
        &set,
        "--bounding-set",
        &set,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn preconditions() -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "this test starts the probe as nobody with chosen capabilities: run it as root"
    );
    let out = Command::new("setpriv").arg("--version").output();
    ensure!(
        out.is_ok_and(|o| o.status.success()),
        "setpriv (util-linux) is needed"
    );
    Ok(())
}

/// A scratch directory nobody can write (events, stats, ready file).
fn scratch(name: &str) -> Result<PathBuf> {
    let dir = scratch_dir(name)?;
    chown(&dir, Some(NOBODY), Some(NOBODY))?;
    Ok(dir)
}

/// The running probe is nobody with exactly `caps` effective.
fn check_credentials(pid: u32, caps: &[&str]) -> Result<()> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    let uids: Vec<String> = field("Uid:").split_whitespace().map(String::from).collect();
    ensure!(
        uids.len() == 4 && uids.iter().all(|u| u == "65534"),
        "probe uids {uids:?}"
    );
    let mut want = 0u64;
    for c in caps {
        want |= 1 << cap_number(c)?;
    }
    let eff = u64::from_str_radix(&field("CapEff:"), 16)?;
    ensure!(
        eff == want,
        "probe CapEff {eff:#x}, expected {want:#x} ({caps:?})"
    );
    Ok(())
}

/// What one request should become.
struct Sent {
    request: Request,
    response: Response,
}

/// Requests on a connection opened before the probe started (`early`), then on fresh ones.
///
/// On the syscall path the first request on `early` may go unseen with any privileges (as root
/// too): the server was already blocked in `read` when the hooks attached, so that read's exit
/// has no entry. The later ones are seen through the connection seeded from /proc.
fn traffic(port: u16, mut early: Conn, tag: &str) -> Result<(Vec<Sent>, Vec<Sent>)> {
    let mut on_early = Vec::new();
    for i in 0..5 {
        let request = Request::get("/bytes/2000", &format!("{tag}-early-{i}"));
        let response = early.request(&request)?;
        on_early.push(Sent { request, response });
    }
    let mut sent = Vec::new();
    for i in 0..5 {
        let mut conn = Conn::connect(port)?;
        for j in 0..3 {
            let request = if j == 1 {
                Request::post("/bytes/10", &format!("{tag}-{i}-{j}"), vec![b'p'; 5000])
            } else {
                Request::get("/bytes/30000", &format!("{tag}-{i}-{j}"))
            };
            let response = conn.request(&request)?;
            sent.push(Sent { request, response });
        }
    }
    for s in on_early.iter().chain(&sent) {
        ensure!(s.response.status == 200, "status {}", s.response.status);
    }
    Ok((on_early, sent))
}

/// Events carrying a request's id.
fn events_of<'a>(events: &'a [RequestEvent], s: &Sent) -> Vec<&'a RequestEvent> {
    events
        .iter()
        .filter(|e| e.request_id.as_deref() == Some(s.request.request_id.as_str()))
        .collect()
}

/// Every request is exactly one event of the server process with exact byte counts and the
/// expected `exe`.
fn check_exact<'a>(
    sent: impl IntoIterator<Item = &'a Sent>,
    events: &[RequestEvent],
    server_pid: u32,
    exe: &str,
    what: &str,
) -> Result<()> {
    let mut by_id: HashMap<&str, Vec<&RequestEvent>> = HashMap::new();
    for e in events {
        by_id
            .entry(e.request_id.as_deref().unwrap_or(""))
            .or_default()
            .push(e);
    }
    for s in sent {
        let id = s.request.request_id.as_str();
        let got = by_id.get(id).map(Vec::as_slice).unwrap_or_default();
        ensure!(
            got.len() == 1,
            "{what}: request {id} gave {} events: {got:?}",
            got.len()
        );
        let e = got[0];
        ensure!(
            e.method == s.request.method
                && e.path == s.request.path
                && e.status == Some(s.response.status)
                && e.bytes_in == s.request.to_bytes().len() as u64
                && e.bytes_out == s.response.bytes
                && e.cohort == "canary"
                && e.role == "server"
                && e.pid == server_pid
                && e.exe == exe
                && e.error.is_none(),
            "{what}: request {id} ({} bytes in, {} out, exe {exe:?}, pid {server_pid}): {e:?}",
            s.request.to_bytes().len(),
            s.response.bytes,
        );
    }
    Ok(())
}

/// Runs the probe as nobody with `caps` expecting it to refuse to start: its exit code (bounded
/// by `--duration`) and its stderr.
fn run_refused(dir: &Path, caps: &[&str], args: &[String]) -> Result<(i32, String)> {
    let out = Command::new("setpriv")
        .args(&setpriv(caps)[1..])
        .arg(bin("bakeoff-probe")?)
        .args(args)
        .args(["--output", "none", "--duration", "15"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .context("cannot run setpriv")?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(!stderr.contains("panicked"), "the probe panicked: {stderr}");
    Ok((out.status.code().unwrap_or(-1), stderr))
}

fn data_path_with_least_privilege(path: &str, set: &[&str]) -> Result<()> {
    preconditions()?;
    let _serial = serial();
    let dir = scratch(&format!("privilege-{path}"))?;
    let cg = Cgroup::create(&format!("bakeoff-it-priv-{path}-{}", std::process::id()))?;
    let (server, port) = cg.spawn_test_server("")?;
    let server_pid = server.pid();
    let exe = std::fs::canonicalize(bin("bakeoff-testserver")?)?
        .display()
        .to_string();
    let args = vec![
        "--data-path".to_string(),
        path.to_string(),
        "--cohort".to_string(),
        format!("canary=cgroup:{}", cg.path().display()),
    ];

    // The minimal set: every request exact, the server's exe known, nothing reported missing.
    let early = Conn::connect(port)?;
    let probe = ProbeRun::start_wrapped(&dir, &setpriv(set), &args)?;
    check_credentials(probe.pid(), set)?;
    let (on_early, fresh) = traffic(port, early, &format!("{path}-min"))?;
    std::thread::sleep(Duration::from_millis(300));
    let log_path = probe.log.clone();
    let result = probe.stop()?;
    let log = std::fs::read_to_string(&log_path)?;
    // On the syscall path the first request on the early connection may be unseen (see
    // `traffic`), whatever the privileges.
    let skip = usize::from(path == "syscall");
    check_exact(
        on_early[skip..].iter().chain(&fresh),
        &result.events,
        server_pid,
        &exe,
        "minimal set",
    )?;
    ensure!(
        events_of(&result.events, &on_early[0]).len() <= 1,
        "minimal set: the first early request gave several events"
    );
    ensure!(
        !log.contains("missing privileges"),
        "minimal set, something reported missing:\n{log}"
    );
    if path == "syscall" {
        // The connection open at start was found through /proc/<pid>/fd (CAP_DAC_READ_SEARCH
        // to list it, CAP_SYS_PTRACE to read its links).
        ensure!(
            result.counter(&["pipeline", "connections_seeded"]) >= 1,
            "the early connection was not seeded: {}",
            result.stats
        );
    }
    eprintln!(
        "{path} path as nobody with {set:?}: {} requests, {} events",
        on_early.len() + fresh.len(),
        result.events.len()
    );

    for cap in set {
        let less = without(set, cap);
        let name = cap_name(cap);
        if DEGRADING.contains(cap) {
            // Runs; the server's events have no exe; the log names the capability and the loss.
            let early = Conn::connect(port)?;
            let probe = ProbeRun::start_wrapped(&dir, &setpriv(&less), &args)?;
            check_credentials(probe.pid(), &less)?;
            let (on_early, fresh) = traffic(port, early, &format!("{path}-no-{cap}"))?;
            std::thread::sleep(Duration::from_millis(300));
            let log_path = probe.log.clone();
            let result = probe.stop()?;
            let log = std::fs::read_to_string(&log_path)?;
            if path == "syscall" {
                // The early connection was not found through /proc/<pid>/fd: none of its
                // requests is seen, as the warning below says.
                check_exact(&fresh, &result.events, server_pid, "", "without it")?;
                for s in &on_early {
                    let got = events_of(&result.events, s);
                    ensure!(
                        got.is_empty(),
                        "without {name}: early request seen: {got:?}"
                    );
                }
            } else {
                check_exact(
                    on_early.iter().chain(&fresh),
                    &result.events,
                    server_pid,
                    "",
                    &format!("without {name}"),
                )?;
            }
            let exe_warning = format!(
                "missing privileges: reading /proc/<pid>/exe of pid {server_pid} needs {name}"
            );
            ensure!(
                log.contains(&exe_warning) && log.contains("carry no exe"),
                "without {name}: expected `{exe_warning}` in the log:\n{log}"
            );
            if path == "syscall" {
                ensure!(
                    log.contains(&format!(
                        "reading /proc/<pid>/fd links of pid {server_pid} needs {name}"
                    )) && log.contains("opened before the probe started are not seen"),
                    "without {name}: the unseen early connection is not reported:\n{log}"
                );
                ensure!(
                    result.counter(&["pipeline", "connections_seeded"]) == 0,
                    "seeded without {name}: {}",
                    result.stats
                );
            }
            eprintln!("{path} path without {name}: runs, exe lost and reported");
        } else {
            let (code, stderr) = run_refused(&dir, &less, &args)?;
            ensure!(
                code == 1 && stderr.contains("missing privileges") && stderr.contains(&name),
                "without {name}: expected exit 1 naming it, got {code}: {stderr}"
            );
            eprintln!(
                "{path} path without {name}: {}",
                stderr.lines().last().unwrap_or_default()
            );
        }
    }
    drop(server);
    Ok(())
}

#[test]
fn cgroup_path_runs_as_nobody_with_its_minimal_capabilities() -> Result<()> {
    data_path_with_least_privilege("auto", CGROUP_SET)
}

#[test]
fn syscall_path_runs_as_nobody_with_its_minimal_capabilities() -> Result<()> {
    data_path_with_least_privilege("syscall", SYSCALL_SET)
}

/// Kubernetes gives a non-root container no ambient capabilities: `capabilities.add` only
/// leaves them in its bounding set, and the kernel clears the effective set at `exec`. The
/// image's binary then carries file capabilities: `+p` (permitted, no effective bit) for the
/// largest set (TLS's CAP_SYS_ADMIN included), which each pod's bounding set trims, and the
/// probe makes them effective itself (with `+ep` the `exec` fails with EPERM when the bounding
/// set lacks one). Here setpriv leaves only a bounding set, as a container runtime does.
#[test]
fn file_capabilities_start_the_probe_with_only_a_bounding_set() -> Result<()> {
    preconditions()?;
    let _serial = serial();
    let dir = scratch("privilege-filecaps")?;
    let probe = dir.join("bakeoff-probe");
    std::fs::copy(bin("bakeoff-probe")?, &probe)?;
    let out = Command::new("setcap")
        .arg("cap_bpf,cap_perfmon,cap_net_admin,cap_dac_read_search,cap_sys_ptrace,cap_sys_admin+p")
        .arg(&probe)
        .output()
        .context("setcap (libcap2-bin) is needed")?;
    ensure!(
        out.status.success(),
        "setcap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cg = Cgroup::create(&format!("bakeoff-it-priv-fcaps-{}", std::process::id()))?;
    let (server, port) = cg.spawn_test_server("")?;
    let bounding = std::iter::once("-all".to_string())
        .chain(CGROUP_SET.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    // setpriv execs sh (no capabilities at all), which execs the copy with file capabilities;
    // the path ProbeRun appends is dropped by `shift`.
    let wrapper: Vec<String> = [
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--inh-caps",
        "-all",
        "--bounding-set",
        &bounding,
        "sh",
        "-c",
        &format!("shift; exec {} \"$@\"", probe.display()),
        "sh",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let args = vec![
        "--cohort".to_string(),
        format!("canary=cgroup:{}", cg.path().display()),
    ];
    let run = ProbeRun::start_wrapped(&dir, &wrapper, &args)?;
    check_credentials(run.pid(), CGROUP_SET)?;
    let (on_early, fresh) = traffic(port, Conn::connect(port)?, "fcaps")?;
    std::thread::sleep(Duration::from_millis(300));
    let result = run.stop()?;
    let exe = std::fs::canonicalize(bin("bakeoff-testserver")?)?
        .display()
        .to_string();
    check_exact(
        on_early.iter().chain(&fresh),
        &result.events,
        server.pid(),
        &exe,
        "file capabilities",
    )?;
    Ok(())
}

/// `bakeoff-probe check` as nobody says which capabilities each data path needs and which are
/// missing: with the syscall path's set, the cgroup path fails for CAP_NET_ADMIN; with the
/// cgroup path's set all is well.
#[test]
fn check_names_the_missing_capability_of_each_path() -> Result<()> {
    preconditions()?;
    let _serial = serial();
    let dir = scratch("privilege-check")?;
    let cg = Cgroup::create(&format!("bakeoff-it-priv-check-{}", std::process::id()))?;
    let (server, _port) = cg.spawn_test_server("")?;
    let check = |caps: &[&str], path: &str| -> Result<(i32, String)> {
        let out = Command::new("setpriv")
            .args(&setpriv(caps)[1..])
            .arg(bin("bakeoff-probe")?)
            .args(["check", "--data-path", path, "--cohort"])
            .arg(format!("canary=cgroup:{}", cg.path().display()))
            .current_dir(&dir)
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    };
    let line = |text: &str, what: &str| {
        text.lines()
            .find(|l| l.get(6..).is_some_and(|r| r.starts_with(what)))
            .unwrap_or_default()
            .to_string()
    };
    let (code, text) = check(SYSCALL_SET, "auto")?;
    let cgroup = line(&text, "caps cgroup");
    ensure!(
        code == 1 && cgroup.starts_with("FAIL") && cgroup.contains("missing CAP_NET_ADMIN"),
        "syscall set, cgroup path: exit {code}\n{text}"
    );
    ensure!(
        line(&text, "caps syscall").starts_with("ok"),
        "the syscall path has what it needs:\n{text}"
    );
    let (code, text) = check(CGROUP_SET, "auto")?;
    ensure!(
        code == 0 && line(&text, "caps cgroup").contains("all present"),
        "cgroup set: exit {code}\n{text}"
    );
    let (code, text) = check(SYSCALL_SET, "syscall")?;
    ensure!(code == 0, "syscall set, syscall path: exit {code}\n{text}");
    eprintln!("{text}");
    drop(server);
    Ok(())
}

/// An HTTPS server on Python's `ssl` module (libssl: `SSL_read_ex`/`SSL_write_ex`).
const PYTHON_SERVER: &str = r#"
import http.server, ssl, sys

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"python " + self.path.encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[2], sys.argv[3])
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// `n` HTTPS requests with curl on one connection; the paths sent.
fn curl(port: u16, ca: &Path, tag: &str, n: usize) -> Result<Vec<String>> {
    let paths: Vec<String> = (0..n).map(|i| format!("/{tag}/{i}")).collect();
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http1.1", "--cacert"]).arg(ca);
    for p in &paths {
        cmd.arg(format!("https://localhost:{port}{p}"))
            .args(["-o", "/dev/null"]);
    }
    let out = cmd.output().context("cannot run curl")?;
    ensure!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(paths)
}

/// The TLS uprobes as nobody: with CAP_SYS_ADMIN, CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH the
/// plaintext of every request is decoded; without CAP_SYS_ADMIN (even with all of the cgroup
/// path's set) or without CAP_SYS_PTRACE the probe runs, names the capability and decodes
/// nothing; without CAP_DAC_READ_SEARCH it stops naming it.
#[test]
fn tls_uprobes_run_as_nobody_with_their_minimal_capabilities() -> Result<()> {
    preconditions()?;
    let _serial = serial();
    let dir = scratch("privilege-tls")?;
    let pki = Pki::create(&dir)?;
    let cg = Cgroup::create(&format!("bakeoff-it-priv-tls-{}", std::process::id()))?;
    let port = free_port();
    std::fs::write(dir.join("server.py"), PYTHON_SERVER)?;
    let _server = Guard::shell(
        "python https server",
        &format!(
            "{}/usr/bin/python3 {}/server.py {port} {} {}",
            cg.exec_prefix(),
            dir.display(),
            pki.server_cert.display(),
            pki.server_key.display()
        ),
        &[],
    )?;
    wait_for_port(port, Duration::from_secs(10))?;
    let args = vec![
        "--tls-plaintext".to_string(),
        "--cohort".to_string(),
        format!("canary=cgroup:{}", cg.path().display()),
    ];
    let decoded = |events: &[RequestEvent], tag: &str| {
        events
            .iter()
            .filter(|e| e.protocol == "http1" && e.path.starts_with(&format!("/{tag}/")))
            .count()
    };
    let cgroup_and_ptrace: Vec<&str> = CGROUP_SET.to_vec();
    let runs: [(&str, Vec<&str>, Option<&str>); 3] = [
        ("min", TLS_SET.to_vec(), None),
        (
            "no-sys-admin",
            cgroup_and_ptrace,
            Some("attaching a uprobe to SSL_read in"),
        ),
        (
            "no-sys-ptrace",
            without(TLS_SET, "sys_ptrace"),
            Some("opening the TLS library"),
        ),
    ];
    for (tag, caps, refusal) in runs {
        let probe = ProbeRun::start_wrapped(&dir, &setpriv(&caps), &args)?;
        check_credentials(probe.pid(), &caps)?;
        let log_path = probe.log.clone();
        let expect = match refusal {
            None => "TLS uprobes attached",
            Some(_) => "TLS plaintext of this process will not be seen",
        };
        wait_for(
            &format!("`{expect}` in the log"),
            Duration::from_secs(10),
            || std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains(expect)),
        )?;
        let paths = curl(port, &pki.ca, tag, 8)?;
        std::thread::sleep(Duration::from_millis(300));
        let result = probe.stop()?;
        let log = std::fs::read_to_string(&log_path)?;
        let n = decoded(&result.events, tag);
        match refusal {
            None => {
                ensure!(
                    n == paths.len() && !log.contains("missing privileges"),
                    "TLS with {caps:?}: {n} of {} requests decoded:\n{log}",
                    paths.len()
                );
                for p in &paths {
                    ensure!(
                        result
                            .events
                            .iter()
                            .filter(|e| &e.path == p && e.status == Some(200))
                            .count()
                            == 1,
                        "TLS with {caps:?}: no single event for {p}"
                    );
                }
            }
            Some(what) => {
                let missing: Vec<&&str> = TLS_SET.iter().filter(|c| !caps.contains(c)).collect();
                let name = cap_name(missing.first().copied().copied().unwrap_or_default());
                ensure!(
                    n == 0
                        && log.contains(&format!("missing privileges: {what}"))
                        && log.contains(&format!("needs {name}")),
                    "TLS with {caps:?}: {n} decoded, expected none and `{what}` naming {name}:\n{log}"
                );
            }
        }
        eprintln!(
            "TLS as nobody with {caps:?}: {n} of {} decoded",
            paths.len()
        );
    }
    let (code, stderr) = run_refused(&dir, &without(TLS_SET, "dac_read_search"), &args)?;
    ensure!(
        code == 1 && stderr.contains("needs CAP_DAC_READ_SEARCH"),
        "TLS set without CAP_DAC_READ_SEARCH: exit {code}: {stderr}"
    );
    Ok(())
}
