//! Both kernel data paths (cgroup_skb on the cohort cgroup, and syscall tracepoints) under what
//! production does to them: packet loss and reordering on a real link, a ring-buffer flood,
//! fresh-connection load, the CPU budget, signals, and a process moved into a cohort.
//! Expectations are the same for both paths unless a test says why not.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use bakeoff_probe::event::RequestEvent;
use bakeoff_testkit::{
    cgroup::Cgroup,
    client::{Conn, Request, Response},
    netns::Netns,
    probe::{ProbeResult, ProbeRun},
    process::{Guard, bin, free_port, scratch_dir, wait_for},
};

const PATHS: [&str; 2] = ["auto", "syscall"];

/// These tests load the machine on purpose (floods, maximum rates): one at a time, so that
/// one's load is not another's noise.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn root() -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "this test loads eBPF programs: run it as root (cargo xtask test)"
    );
    Ok(())
}

fn probe_args(path: &str, cg: &Cgroup, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--data-path".to_string(),
        path.to_string(),
        "--cohort".to_string(),
        format!("canary=cgroup:{}", cg.path().display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// What one request should become.
struct Sent {
    request: Request,
    response: Response,
}

/// Every sent request has exactly one event, with its method, path, status and exact byte
/// counts; no other event carries one of their ids.
fn check_exact(sent: &[Sent], events: &[RequestEvent], what: &str) -> Result<()> {
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
                && e.error.is_none(),
            "{what}: request {id} sent {} bytes, got {} bytes with status {}; event {e:?}",
            s.request.to_bytes().len(),
            s.response.bytes,
            s.response.status
        );
    }
    Ok(())
}

/// Requests of every shape over keep-alive connections: large responses (many segments),
/// large request bodies, chunked responses.
fn mixed_load(addr: SocketAddr, tag: &str, conns: usize, per_conn: usize) -> Result<Vec<Sent>> {
    let threads: Vec<_> = (0..conns)
        .map(|c| {
            let tag = tag.to_string();
            std::thread::spawn(move || -> Result<Vec<Sent>> {
                let mut conn = Conn::connect_to(addr)?;
                let mut sent = Vec::new();
                for i in 0..per_conn {
                    let id = format!("{tag}-{c}-{i}");
                    let request = match i % 3 {
                        0 => Request::get("/bytes/30000", &id),
                        // Several GSO super-segments in flight: one lost makes the next arrive
                        // out of order.
                        1 => Request::post("/bytes/10", &id, vec![b'p'; 200_000]),
                        _ => Request::get("/chunked/5000/700", &id),
                    };
                    let response = conn.request(&request)?;
                    ensure!(
                        response.status == 200,
                        "status {} for {id}",
                        response.status
                    );
                    sent.push(Sent { request, response });
                }
                Ok(sent)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        all.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("load thread panicked"))??,
        );
    }
    Ok(all)
}

/// 5% of packets dropped in both directions on a veth link (nftables `numgen random`):
/// retransmissions, out-of-order and duplicate segments; still exactly one exact event per
/// request.
fn lossy_link(path: &str, subnet: u8) -> Result<()> {
    root()?;
    let dir = scratch_dir(&format!("lossy-{path}"))?;
    let cg = Cgroup::create(&format!("bakeoff-lossy-{path}-{}", std::process::id()))?;
    let ns = Netns::create(&format!("l{subnet}"), subnet)?;
    ns.nft(
        "table inet bakeoff_loss {\n\
           chain input { type filter hook input priority 0; numgen random mod 100 < 5 drop; }\n\
           chain output { type filter hook output priority 0; numgen random mod 100 < 5 drop; }\n\
         }\n",
    )?;
    let port = free_port();
    let _server = Guard::shell(
        "test server in the namespace",
        &format!(
            // The cgroup first: `ip netns exec` remounts /sys, hiding the cgroup tree.
            "{}{}{} --host {} --port {port}",
            cg.exec_prefix(),
            ns.exec_prefix(),
            bin("bakeoff-testserver")?.display(),
            ns.ns_ip
        ),
        &[],
    )?;
    let addr = SocketAddr::from((ns.ns_ip, port));
    wait_for("server in the namespace", Duration::from_secs(10), || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })?;
    let probe = ProbeRun::start(&dir, &probe_args(path, &cg, &[]))?;
    let sent = mixed_load(addr, &format!("loss-{path}"), 3, 30)?;
    std::thread::sleep(Duration::from_millis(500));
    let result = probe.stop()?;
    check_exact(&sent, &result.events, &format!("lossy link, {path} path"))?;
    if path == "auto" {
        // The loss reached the reassembly (else this test proves nothing about it).
        let disorder = result.counter(&["connections", "reassembly", "duplicates"])
            + result.counter(&["connections", "reassembly", "out_of_order"])
            + result.counter(&["connections", "reassembly", "overlaps_trimmed"]);
        ensure!(
            disorder > 0,
            "no duplicate or out-of-order segment seen: {}",
            result.stats
        );
        eprintln!(
            "lossy link, cgroup path: {} requests exact; {disorder} duplicate, overlapping or \
             out-of-order segments of {}",
            sent.len(),
            result.counter(&["connections", "reassembly", "segments"])
        );
        ensure!(
            result.counter(&["connections", "stream_gaps"]) == 0,
            "gaps on a link that only delays: {}",
            result.stats
        );
    }
    Ok(())
}

#[test]
fn lossy_link_cgroup_path() -> Result<()> {
    let _serial = serial();
    lossy_link("auto", 91)
}

#[test]
fn lossy_link_syscall_path() -> Result<()> {
    let _serial = serial();
    lossy_link("syscall", 92)
}

/// Keep-alive load at the maximum rate from `conns` threads until `stop`; returns the requests
/// each connection completed (all answered 200, else an error).
fn flood(
    port: u16,
    conns: usize,
    stop: Arc<AtomicBool>,
    tag: &str,
) -> Vec<std::thread::JoinHandle<Result<u64>>> {
    (0..conns)
        .map(|c| {
            let (stop, tag) = (stop.clone(), tag.to_string());
            std::thread::spawn(move || -> Result<u64> {
                let mut conn = Conn::connect(port)?;
                let mut n = 0u64;
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let r = conn.request(&Request::get("/bytes/100", &format!("{tag}-{c}-{n}")))?;
                    ensure!(r.status == 200, "status {}", r.status);
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect()
}

fn join_all(threads: Vec<std::thread::JoinHandle<Result<u64>>>) -> Result<u64> {
    let mut total = 0;
    for t in threads {
        total += t
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    }
    Ok(total)
}

/// A ring buffer of 8 KiB under maximum load: records are lost (counted by reason), the service
/// never waits for the probe, every event that is produced is right, and the connections are
/// not lost: once the flood stops, every request on the same keep-alive connections is seen.
fn ring_flood(path: &str) -> Result<()> {
    root()?;
    let dir = scratch_dir(&format!("flood-{path}"))?;
    let cg = Cgroup::create(&format!("bakeoff-flood-{path}-{}", std::process::id()))?;
    let (_server, port) = cg.spawn_test_server("")?;
    let probe = ProbeRun::start(
        &dir,
        &probe_args(
            path,
            &cg,
            &["--ring-buffer-bytes", "8192", "--max-cpu", "2"],
        ),
    )?;
    // The flood, then a calm tail on the same connections.
    let mut conns: Vec<Conn> = (0..6).map(|_| Conn::connect(port)).collect::<Result<_>>()?;
    let started = Instant::now();
    let mut flooded = 0u64;
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = conns
            .iter_mut()
            .enumerate()
            .map(|(c, conn)| {
                s.spawn(move || -> Result<u64> {
                    for i in 0..3000 {
                        let r = conn.request(&Request::get("/bytes/100", &format!("f-{c}-{i}")))?;
                        ensure!(r.status == 200, "status {}", r.status);
                    }
                    Ok(3000)
                })
            })
            .collect();
        for h in handles {
            flooded += h.join().map_err(|_| anyhow::anyhow!("panicked"))??;
        }
        Ok(())
    })?;
    let flood_time = started.elapsed();
    // Calm: each connection sends requests slowly enough for the probe to keep up.
    let mut calm = Vec::new();
    for round in 0..5 {
        std::thread::sleep(Duration::from_millis(300));
        for (c, conn) in conns.iter_mut().enumerate() {
            // Calm: spaced so that the 8 KiB ring buffer never fills.
            std::thread::sleep(Duration::from_millis(20));
            let request = Request::get("/bytes/300", &format!("calm-{c}-{round}"));
            let response = conn.request(&request)?;
            calm.push(Sent { request, response });
        }
    }
    // Holes of the cgroup path are given up after 3 s.
    std::thread::sleep(Duration::from_millis(3500));
    let result = probe.stop()?;
    let what = format!("flood, {path} path");
    let lost = result.counter(&["kernel_drops", "ringbuf_full"]);
    ensure!(
        lost > 0,
        "{what}: no record lost, the flood proves nothing: {}",
        result.stats
    );
    let flood_events: Vec<&RequestEvent> = result
        .events
        .iter()
        .filter(|e| {
            e.request_id
                .as_deref()
                .is_some_and(|id| id.starts_with("f-"))
        })
        .collect();
    ensure!(
        (flood_events.len() as u64) < flooded,
        "{what}: {} events for {flooded} requests although {lost} records were lost",
        flood_events.len()
    );
    // Whatever became an event is right.
    for e in &flood_events {
        ensure!(
            e.method == "GET"
                && e.path == "/bytes/100"
                && e.status == Some(200)
                && e.error.is_none(),
            "{what}: wrong event {e:?}"
        );
    }
    ensure!(
        result.counter(&["connections", "requests_lost_estimate"]) > 0,
        "{what}: requests lost but not estimated: {}",
        result.stats
    );
    check_exact(&calm, &result.events, &format!("{what}, after the flood"))?;
    eprintln!(
        "{what}: {flooded} requests in {flood_time:?}, {} events, {lost} records lost, \
         requests lost (estimate) {}",
        flood_events.len(),
        result.counter(&["connections", "requests_lost_estimate"])
    );
    Ok(())
}

#[test]
fn ring_flood_cgroup_path() -> Result<()> {
    let _serial = serial();
    ring_flood("auto")
}

#[test]
fn ring_flood_syscall_path() -> Result<()> {
    let _serial = serial();
    ring_flood("syscall")
}

/// A new connection per request at the maximum rate for 60 s: at least 99% of the requests
/// become events (the per-connection work is O(1)).
fn fresh_connections(path: &str) -> Result<()> {
    root()?;
    let dir = scratch_dir(&format!("fresh-{path}"))?;
    let cg = Cgroup::create(&format!("bakeoff-fresh-{path}-{}", std::process::id()))?;
    let (_server, port) = cg.spawn_test_server("")?;
    let probe = ProbeRun::start(&dir, &probe_args(path, &cg, &["--max-cpu", "2"]))?;
    let ok = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..8)
        .map(|c| {
            let ok = ok.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut i = 0u64;
                while Instant::now() < deadline {
                    i += 1;
                    // A refused or failed connection (ports in TIME_WAIT) is not a request.
                    let Ok(mut conn) = Conn::connect(port) else {
                        continue;
                    };
                    if let Ok(r) = conn.request(&Request::get("/bytes/100", &format!("n-{c}-{i}")))
                        && r.status == 200
                    {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?;
    }
    std::thread::sleep(Duration::from_millis(1000));
    let result = probe.stop()?;
    let requests = ok.load(Ordering::Relaxed);
    let events = result
        .events
        .iter()
        .filter(|e| {
            e.request_id
                .as_deref()
                .is_some_and(|id| id.starts_with("n-"))
        })
        .count() as u64;
    eprintln!("fresh connections, {path} path: {requests} requests, {events} events");
    ensure!(requests > 1000, "too few requests to judge: {requests}");
    ensure!(
        events * 100 >= requests * 99 && events <= requests,
        "fresh connections, {path} path: {events} events for {requests} requests; {}",
        result.stats
    );
    Ok(())
}

#[test]
fn fresh_connections_cgroup_path() -> Result<()> {
    let _serial = serial();
    fresh_connections("auto")
}

#[test]
fn fresh_connections_syscall_path() -> Result<()> {
    let _serial = serial();
    fresh_connections("syscall")
}

/// SIGINT and SIGTERM each stop a probe under a flood within 5 s, cleanly (stats written).
#[test]
fn signals_stop_a_loaded_probe() -> Result<()> {
    let _serial = serial();
    root()?;
    for path in PATHS {
        let dir = scratch_dir(&format!("signal-{path}"))?;
        let cg = Cgroup::create(&format!("bakeoff-signal-{path}-{}", std::process::id()))?;
        let (_server, port) = cg.spawn_test_server("")?;
        for (name, signal) in [("SIGINT", libc::SIGINT), ("SIGTERM", libc::SIGTERM)] {
            let probe = ProbeRun::start(
                &dir,
                &probe_args(path, &cg, &["--ring-buffer-bytes", "16384"]),
            )?;
            let stop = Arc::new(AtomicBool::new(false));
            let load = flood(port, 6, stop.clone(), "s");
            std::thread::sleep(Duration::from_secs(2));
            let result = probe.stop_with(signal, Duration::from_secs(5));
            stop.store(true, Ordering::Relaxed);
            let served = join_all(load)?;
            let result = result.with_context(|| format!("{name} on the {path} path"))?;
            ensure!(
                result.stop_time < Duration::from_secs(5) && served > 0,
                "{name}, {path} path: stopped in {:?} ({served} requests)",
                result.stop_time
            );
            eprintln!(
                "{name}, {path} path: stopped in {:?} under load",
                result.stop_time
            );
        }
    }
    Ok(())
}

/// Over its CPU budget the probe samples whole connections: the ratio is reported, the
/// connections left out give no events (and no false errors), the ones kept give exact ones.
#[test]
fn cpu_budget_samples_whole_connections() -> Result<()> {
    let _serial = serial();
    root()?;
    for path in PATHS {
        let dir = scratch_dir(&format!("budget-{path}"))?;
        let cg = Cgroup::create(&format!("bakeoff-budget-{path}-{}", std::process::id()))?;
        let (_server, port) = cg.spawn_test_server("")?;
        let probe = ProbeRun::start(&dir, &probe_args(path, &cg, &["--max-cpu", "0.01"]))?;
        // Load for long enough that the budget acts (it measures once a second), with new
        // connections arriving all along (sampling decides per connection).
        let mut sent = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut c = 0;
        while Instant::now() < deadline {
            let mut conn = Conn::connect(port)?;
            for i in 0..20 {
                let request = Request::get("/bytes/100", &format!("b-{c}-{i}"));
                let response = conn.request(&request)?;
                sent.push(Sent { request, response });
            }
            c += 1;
        }
        std::thread::sleep(Duration::from_millis(500));
        let result: ProbeResult = probe.stop()?;
        let what = format!("budget, {path} path");
        let sample = result.counter(&["sample_per_1024"]);
        ensure!(sample < 1024, "{what}: never sampled: {}", result.stats);
        ensure!(
            result.events.iter().all(|e| e.error.is_none()),
            "{what}: sampling produced error events"
        );
        let got: std::collections::HashSet<&str> = result
            .events
            .iter()
            .filter_map(|e| e.request_id.as_deref())
            .collect();
        // Per connection: all its requests or none (except the connections whose sampling
        // changed while they were open).
        let mut partial = 0;
        for conn in 0..c {
            let seen = (0..20)
                .filter(|i| got.contains(format!("b-{conn}-{i}").as_str()))
                .count();
            if seen != 0 && seen != 20 {
                partial += 1;
            }
        }
        ensure!(
            got.len() < sent.len() && partial * 10 <= c,
            "{what}: {} of {} requests seen, {partial} of {c} connections partly",
            got.len(),
            sent.len()
        );
        let kept: Vec<Sent> = sent
            .into_iter()
            .filter(|s| got.contains(s.request.request_id.as_str()))
            .collect();
        check_exact(&kept, &result.events, &what)?;
        eprintln!(
            "{what}: sampled {sample}/1024 at the end, {} of {c} connections partly seen",
            partial
        );
    }
    Ok(())
}

/// A process moved into the cohort cgroup after it opened its listening socket. On the cgroup
/// path its sockets stay in the cgroup they were created in (accepted sockets inherit the
/// listener's), so it is not watched until restarted inside the cgroup; the syscall path
/// follows the process's current cgroup, so it is watched at once. A server started inside
/// the cgroup is watched on both.
#[test]
fn process_moved_into_the_cohort() -> Result<()> {
    let _serial = serial();
    root()?;
    for path in PATHS {
        let dir = scratch_dir(&format!("moved-{path}"))?;
        let cg = Cgroup::create(&format!("bakeoff-moved-{path}-{}", std::process::id()))?;
        let outside = Cgroup::create(&format!("bakeoff-moved-out-{path}-{}", std::process::id()))?;
        let (moved, moved_port) = outside.spawn_test_server("")?;
        let probe = ProbeRun::start(&dir, &probe_args(path, &cg, &[]))?;
        std::fs::write(cg.path().join("cgroup.procs"), moved.pid().to_string())?;
        let (_inside, inside_port) = cg.spawn_test_server("")?;
        // Let the syscall path adopt the moved process (its cgroup is checked per syscall).
        std::thread::sleep(Duration::from_millis(300));
        let mut sent_moved = Vec::new();
        let mut sent_inside = Vec::new();
        for i in 0..5 {
            let request = Request::get("/bytes/100", &format!("moved-{i}"));
            let response = Conn::connect(moved_port)?.request(&request)?;
            sent_moved.push(Sent { request, response });
            let request = Request::get("/bytes/100", &format!("inside-{i}"));
            let response = Conn::connect(inside_port)?.request(&request)?;
            sent_inside.push(Sent { request, response });
        }
        std::thread::sleep(Duration::from_millis(300));
        let result = probe.stop()?;
        let what = format!("moved process, {path} path");
        check_exact(&sent_inside, &result.events, &what)?;
        let moved_events = result
            .events
            .iter()
            .filter(|e| {
                e.request_id
                    .as_deref()
                    .is_some_and(|id| id.starts_with("moved-"))
            })
            .count();
        if path == "auto" {
            ensure!(
                moved_events == 0,
                "{what}: {moved_events} events from old sockets"
            );
        } else {
            check_exact(&sent_moved, &result.events, &what)?;
        }
    }
    Ok(())
}
