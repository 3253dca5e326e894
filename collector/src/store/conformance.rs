//! What every backend must answer identically, run against each real backend by its tests.

use bakeoff_proto::v1::RequestEvent;

use super::Store;
use crate::query::Filter;

fn event(cohort: &str, path: &str, status: Option<u32>, ms: u64) -> RequestEvent {
    RequestEvent {
        experiment: "e".into(),
        cohort: cohort.into(),
        path: path.into(),
        status,
        // A request without a response has no duration (the probe reports 0).
        duration_ns: if status.is_some() { ms * 1_000_000 } else { 0 },
        start_unix_ns: 1_000 + ms,
        bytes_out: 10,
        peer: "10.0.0.1:80".into(),
        attributes: [("client".to_string(), "mobile".to_string())].into(),
        // As the probe reports a request that got no response.
        error: if status.is_none() {
            "connection closed before the response".into()
        } else {
            String::new()
        },
        ..RequestEvent::default()
    }
}

/// Appends, reads back, groups, deletes; `store` must be empty.
pub fn check(s: &dyn Store) {
    assert_eq!(s.last_sequence("p").unwrap(), 0);
    s.append(
        "p",
        1,
        &[
            event("baseline", "/a", Some(200), 10),
            event("canary", "/a", Some(500), 30),
            event("canary", "/a", Some(200), 40),
        ],
    )
    .unwrap();
    s.append("p", 2, &[event("canary", "/b", None, 20)])
        .unwrap();
    s.append("q", 7, &[event("baseline", "/it's", Some(404), 50)])
        .unwrap();
    assert_eq!(s.last_sequence("p").unwrap(), 2);
    assert_eq!(s.last_sequence("q").unwrap(), 7);

    let rows = s
        .events(&Filter::parse(&["cohort=canary".into()]).unwrap(), 10)
        .unwrap();
    assert_eq!(rows.len(), 3);
    // Newest first: started at 1040, 1030, 1020.
    assert_eq!(rows[0]["path"], "/a");
    assert_eq!(rows[0]["duration_ns"], 40_000_000);
    assert_eq!(rows[1]["status"], 500);
    assert_eq!(rows[2]["path"], "/b");
    assert_eq!(rows[2]["status"], serde_json::Value::Null);
    assert_eq!(rows[2]["pod"], serde_json::Value::Null);
    assert_eq!(rows[2]["probe_id"], "p");
    assert_eq!(rows[2]["peer"], "10.0.0.1:80");
    assert_eq!(rows[2]["attributes"]["client"], "mobile");
    // Values are data: a quote cannot escape its literal.
    let quoted = s
        .events(&Filter::parse(&["path=/it's".into()]).unwrap(), 10)
        .unwrap();
    assert_eq!(quoted.len(), 1);
    assert_eq!(quoted[0]["status"], 404);
    let by_status = s
        .events(&Filter::parse(&["status=500".into()]).unwrap(), 10)
        .unwrap();
    assert_eq!(by_status.len(), 1);

    let groups = s
        .group(&Filter::default(), &["cohort".into(), "path".into()])
        .unwrap();
    let canary_a = groups
        .iter()
        .find(|g| g.key == [Some("canary".into()), Some("/a".into())])
        .unwrap();
    assert_eq!((canary_a.requests, canary_a.errors), (2, 1));
    // Linear interpolation between order statistics (DuckDB's quantile_cont).
    assert!((canary_a.p50_ms - 35.0).abs() < 1e-9, "{}", canary_a.p50_ms);
    assert!((canary_a.p90_ms - 39.0).abs() < 1e-9, "{}", canary_a.p90_ms);
    assert_eq!(canary_a.bytes_out, 20);
    assert_eq!(groups[0].requests, 2, "largest group first: {groups:?}");
    let all = s.group(&Filter::default(), &[]).unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!((all[0].requests, all[0].errors), (5, 2));
    assert!((all[0].p50_ms - 30.0).abs() < 1e-9, "{}", all[0].p50_ms);
    assert!((all[0].p99_ms - 49.6).abs() < 1e-9, "{}", all[0].p99_ms);
    let since = s
        .group(
            &Filter::parse(&["since=1030".into(), "until=1045".into()]).unwrap(),
            &["cohort".into()],
        )
        .unwrap();
    assert_eq!(since.len(), 1);
    assert_eq!(since[0].requests, 2);
    assert!(s.group(&Filter::default(), &["nope".into()]).is_err());

    // Samples for the verdict: oldest first, route or path, status kept or null.
    let samples = s
        .samples(&Filter::parse(&["experiment=e".into()]).unwrap(), None)
        .unwrap();
    let order: Vec<u64> = samples.iter().map(|r| r.start_unix_ns).collect();
    assert_eq!(order, [1010, 1020, 1030, 1040, 1050]);
    assert_eq!(samples[1].path, "/b");
    assert_eq!(samples[1].status, None);
    assert_eq!(samples[2].status, Some(500));
    assert_eq!(samples[2].cohort, "canary");
    assert_eq!(samples[2].duration_ns, 30_000_000);
    assert_eq!(samples[2].peer.as_deref(), Some("10.0.0.1:80"));
    assert_eq!(samples[2].pod, None);
    let attributes: serde_json::Value =
        serde_json::from_str(samples[2].attributes.as_deref().unwrap()).unwrap();
    assert_eq!(attributes["client"], "mobile");
    // The most recent ones only, still oldest first.
    let recent = s
        .samples(&Filter::parse(&["experiment=e".into()]).unwrap(), Some(2))
        .unwrap();
    let order: Vec<u64> = recent.iter().map(|r| r.start_unix_ns).collect();
    assert_eq!(order, [1040, 1050]);

    // A connection no decoder understood (started at 1005 ns): stored, never judged.
    let connection = RequestEvent {
        protocol: "tcp".into(),
        cohort: "other".into(),
        ..event("other", "", Some(0), 5)
    };
    s.append("r", 1, &[connection]).unwrap();

    // The judge's cells, aggregated by the store: one row per latency bucket.
    // By end time (start + duration), every request within the first second.
    let cells = s.cells(0, 1_000_000_000).unwrap();
    assert!(cells.iter().all(|c| c.second == 0 && &*c.experiment == "e"));
    assert!(cells.iter().all(|c| &*c.cohort != "other"), "{cells:?}");
    let canary: Vec<_> = cells.iter().filter(|c| &*c.cohort == "canary").collect();
    assert_eq!(canary.len(), 3, "{cells:?}");
    assert_eq!(canary.iter().map(|c| c.requests).sum::<u64>(), 3);
    // A 500 and a request without a response.
    assert_eq!(canary.iter().map(|c| c.errors).sum::<u64>(), 2);
    assert_eq!(canary.iter().map(|c| c.unanswered).sum::<u64>(), 1);
    // The request without a response has no latency: a bucket of its own.
    let unanswered = canary.iter().find(|c| c.unanswered == 1).unwrap();
    assert_eq!(
        (unanswered.bucket, unanswered.requests),
        (crate::series::NO_LATENCY, 1)
    );
    let quoted = cells.iter().find(|c| &*c.endpoint == " /it's").unwrap();
    assert_eq!(quoted.bucket, crate::stats::hist::bucket_of(50_000_000));
    assert_eq!((quoted.requests, quoted.errors), (1, 0));
    assert_eq!(s.cells(45_000_000, 1_000_000_000).unwrap().len(), 1);
    // The 50 ms request started at 1050 ns.
    assert_eq!(s.latest_end(0).unwrap(), Some(50_001_050));
    assert_eq!(s.latest_end(2_000).unwrap(), None);

    assert_eq!(
        s.events(&Filter::parse(&["protocol=tcp".into()]).unwrap(), 10)
            .unwrap()
            .len(),
        1
    );
    assert_eq!(s.delete_before(1_015).unwrap(), 2);
}

/// After `check` and a reopen: what was kept is still there.
pub fn check_reopened(s: &dyn Store) {
    assert_eq!(s.last_sequence("p").unwrap(), 2);
    assert_eq!(s.last_sequence("q").unwrap(), 7);
    // ClickHouse deletes asynchronously (a mutation): wait for it, bounded.
    let mut n = 0;
    for _ in 0..100 {
        n = s.events(&Filter::default(), 10).unwrap().len();
        if n == 4 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(n, 4);
}
