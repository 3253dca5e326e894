//! TLS plaintext end to end on the real kernel: Debian's nginx (libssl, `SSL_read`/`SSL_write`)
//! and Python's `ssl` module (the `_ex` forms, a handshake in one thread and I/O in others),
//! each an HTTPS server in its own cohort cgroup, driven by curl. Every request must become
//! exactly one event with its method, path, status and the exact plaintext byte counts curl
//! reports; no event may come from ciphertext.

use std::{collections::HashMap, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, ensure};
use bakeoff_testkit::{
    cgroup::Cgroup,
    probe::ProbeRun,
    process::{Guard, free_port, scratch_dir, wait_for, wait_for_port},
    tls::Pki,
};

/// One request as curl saw it.
#[derive(Debug)]
struct Sent {
    cohort: &'static str,
    path: String,
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
}

fn nginx_conf(dir: &Path, port: u16, pki: &Pki) -> String {
    format!(
        r#"daemon off;
master_process on;
worker_processes 2;
user root;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {dir}/www;
        location /r/ {{ return 200 "nginx ok\n"; }}
        location = /missing {{ return 404; }}
    }}
}}
"#,
        dir = dir.display(),
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
    )
}

/// An HTTPS server on Python's `ssl` module: the listening socket is wrapped, so handshakes
/// run in the accepting thread and requests in handler threads.
const PYTHON_SERVER: &str = r#"
import http.server, ssl, sys

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/missing":
            code, body = 404, b"not here\n"
        elif self.path == "/big":
            code, body = 200, b"b" * 30000
        else:
            code, body = 200, b"python " + self.path.encode() + b"\n"
        self.send_response(code)
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

/// Runs curl over `paths` on one keep-alive connection; returns what it measured per request.
fn curl(port: u16, cohort: &'static str, paths: &[String], ca: &Path) -> Result<Vec<Sent>> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http1.1", "--cacert"]).arg(ca).args([
        "-w",
        "%{http_code} %{size_request} %{size_header} %{size_download}\n",
    ]);
    for p in paths {
        cmd.arg(format!("https://localhost:{port}{p}"))
            .args(["-o", "/dev/null"]);
    }
    let out = cmd.output().context("cannot run curl")?;
    ensure!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let lines: Vec<&str> = text.lines().collect();
    ensure!(lines.len() == paths.len(), "curl printed {text}");
    paths
        .iter()
        .zip(lines)
        .map(|(path, line)| {
            let f: Vec<u64> = line
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .with_context(|| format!("curl line {line}"))?;
            ensure!(f.len() == 4, "curl line {line}");
            Ok(Sent {
                cohort,
                path: path.clone(),
                status: f[0] as u16,
                bytes_in: f[1],
                bytes_out: f[2] + f[3],
            })
        })
        .collect()
}

#[test]
fn tls_plaintext_becomes_exact_events_cgroup_path() -> Result<()> {
    tls_plaintext_becomes_exact_events("auto")
}

#[test]
fn tls_plaintext_becomes_exact_events_syscall_path() -> Result<()> {
    tls_plaintext_becomes_exact_events("syscall")
}

fn tls_plaintext_becomes_exact_events(data_path: &str) -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "this test loads eBPF programs: run it as root (cargo xtask test)"
    );
    let dir = scratch_dir(&format!("tls-{data_path}"))?;
    std::fs::create_dir_all(dir.join("www"))?;
    let pki = Pki::create(&dir)?;
    let tag = format!("bakeoff-it-tls-{data_path}-{}", std::process::id());
    let nginx_cg = Cgroup::create(&format!("{tag}-nginx"))?;
    let python_cg = Cgroup::create(&format!("{tag}-python"))?;

    // nginx, started before the probe (its processes are found in the cgroup at start).
    let nginx_port = free_port();
    std::fs::write(dir.join("nginx.conf"), nginx_conf(&dir, nginx_port, &pki))?;
    let _nginx = Guard::shell(
        "nginx",
        &format!(
            "{}/usr/sbin/nginx -c {}/nginx.conf -p {}",
            nginx_cg.exec_prefix(),
            dir.display(),
            dir.display()
        ),
        &[],
    )?;
    wait_for_port(nginx_port, Duration::from_secs(10))?;

    let probe = ProbeRun::start(
        &dir,
        &[
            "--experiment".into(),
            "tls".into(),
            "--data-path".into(),
            data_path.into(),
            "--cohort".into(),
            format!("nginx=cgroup:{}", nginx_cg.path().display()),
            "--cohort".into(),
            format!("python=cgroup:{}", python_cg.path().display()),
            "--payload-prefix".into(),
            "1024".into(),
            "--tls-plaintext".into(),
        ],
    )?;

    // Python, started after the probe: it maps libssl only when it imports `ssl`.
    let python_port = free_port();
    std::fs::write(dir.join("server.py"), PYTHON_SERVER)?;
    let _python = Guard::shell(
        "python https server",
        &format!(
            "{}/usr/bin/python3 {}/server.py {python_port} {} {}",
            python_cg.exec_prefix(),
            dir.display(),
            pki.server_cert.display(),
            pki.server_key.display()
        ),
        &[],
    )?;
    wait_for_port(python_port, Duration::from_secs(10))?;
    // The probe attaches when it sees the library mapped: wait until its log says so.
    wait_for("TLS uprobes on python", Duration::from_secs(15), || {
        std::fs::read_to_string(&probe.log)
            .map(|l| l.matches("TLS uprobes attached").count() >= 4)
            .unwrap_or(false)
    })?;

    let mut sent = Vec::new();
    for (cohort, port) in [("nginx", nginx_port), ("python", python_port)] {
        // Keep-alive: ten requests and a 404 on one connection.
        let mut paths: Vec<String> = (0..10).map(|i| format!("/r/{cohort}-ka-{i}")).collect();
        paths.push("/missing".into());
        sent.extend(curl(port, cohort, &paths, &pki.ca)?);
        // Fresh connections.
        for i in 0..3 {
            sent.extend(curl(
                port,
                cohort,
                &[format!("/r/{cohort}-new-{i}")],
                &pki.ca,
            )?);
        }
    }
    // A response far larger than the payload prefix (several TLS records and SSL_write calls).
    sent.extend(curl(python_port, "python", &["/big".into()], &pki.ca)?);

    std::thread::sleep(Duration::from_millis(500));
    let result = probe.stop()?;
    let log = std::fs::read_to_string(dir.join("probe.log")).unwrap_or_default();

    // Exactly one event per request, matched by cohort and path (paths are unique but for
    // /missing, which each cohort answers once).
    let mut events: HashMap<(String, String), Vec<_>> = HashMap::new();
    for e in &result.events {
        events
            .entry((e.cohort.clone(), e.path.clone()))
            .or_default()
            .push(e);
    }
    ensure!(
        result.events.len() == sent.len(),
        "{} events for {} requests: {:#?}\nlog: {log}",
        result.events.len(),
        sent.len(),
        result.events
    );
    for s in &sent {
        let found = events
            .get(&(s.cohort.to_string(), s.path.clone()))
            .with_context(|| format!("no event for {s:?}; log: {log}"))?;
        ensure!(found.len() == 1, "{} events for {s:?}", found.len());
        let e = found[0];
        ensure!(e.protocol == "http1", "{e:?}");
        ensure!(e.method == "GET", "{e:?}");
        ensure!(e.status == Some(s.status), "status of {s:?}: {e:?}");
        ensure!(e.role == "server", "{e:?}");
        ensure!(
            e.bytes_in == s.bytes_in && e.bytes_out == s.bytes_out,
            "plaintext bytes of {s:?}: event in {} out {}",
            e.bytes_in,
            e.bytes_out
        );
        let exe = &e.exe;
        ensure!(
            exe.contains(if s.cohort == "nginx" {
                "nginx"
            } else {
                "python"
            }),
            "exe {exe} for {s:?}"
        );
        ensure!(e.duration_ns > 0, "{e:?}");
    }
    // Every connection was decoded from plaintext (nginx: one keep-alive and three fresh;
    // python: the same and /big); none was left as ciphertext.
    let connections = (1 + 3) + (1 + 3 + 1);
    ensure!(
        result.counter(&["connections", "tls_connections"]) == connections,
        "tls_connections: {}",
        result.stats["connections"]
    );
    ensure!(result.counter(&["connections", "tls_undecoded"]) == 0);
    ensure!(result.counter(&["connections", "non_http_connections"]) == 0);
    ensure!(result.counter(&["tls", "dropped_unbound"]) == 0);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
