//! The HTML report: one self-contained file (inline CSS and SVG, no script, no fetch) with the
//! verdict, per-endpoint latency CDFs of both cohorts, error rate and p99 over time, and the
//! drill-down of failing metrics. Numbers carry `data-*` attributes so tests (and scripts) can
//! read them back and compare them with the API's.

use std::{collections::BTreeMap, fmt::Write as _};

use crate::{live::VerdictResponse, store::SampleRow, verdict::Decision};

/// HTML-escapes text taken from traffic (paths, user agents): it is data, never markup.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One line of a chart: name, color, points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);
/// Latencies in ms of (canary, baseline).
type Latencies = (Vec<f64>, Vec<f64>);

const BASELINE_COLOR: &str = "#3b6ea5";
const CANARY_COLOR: &str = "#d9534f";

fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let h = (sorted.len() - 1) as f64 * q;
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    Some(sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo]))
}

/// A line chart of several series as inline SVG. Points are (x, y) in data units.
fn svg_chart(title: &str, x_label: &str, y_label: &str, series: &[Series<'_>]) -> String {
    let (w, h, left, bottom, top, right) = (520.0, 240.0, 56.0, 36.0, 24.0, 12.0);
    let points = series.iter().flat_map(|s| s.2.iter());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if !x0.is_finite() || !x1.is_finite() {
        return format!(
            "<figure><figcaption>{}</figcaption><p>no data</p></figure>",
            esc(title)
        );
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= 0.0 {
        y1 = 1.0;
    }
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| h - bottom - y / y1 * (h - top - bottom);
    let mut svg = format!(
        "<figure><figcaption>{}</figcaption><svg viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\">",
        esc(title)
    );
    let _ = write!(
        svg,
        "<line x1=\"{left}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#999\"/><line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{b}\" stroke=\"#999\"/>",
        b = h - bottom,
        r = w - right
    );
    for i in 0..=4 {
        let fx = x0 + (x1 - x0) * f64::from(i) / 4.0;
        let fy = y1 * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{}</text>",
            px(fx),
            h - bottom + 14.0,
            short(fx),
            left - 4.0,
            py(fy) + 3.0,
            short(fy)
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{}</text><text x=\"12\" y=\"{:.1}\" font-size=\"11\" transform=\"rotate(-90 12 {:.1})\" text-anchor=\"middle\">{}</text>",
        (w + left) / 2.0,
        h - 4.0,
        esc(x_label),
        h / 2.0,
        h / 2.0,
        esc(y_label)
    );
    for (k, (name, color, pts)) in series.iter().enumerate() {
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" fill=\"{color}\">{}</text>",
            path.join(" "),
            w - right - 90.0,
            top + 12.0 * (k as f64 + 1.0),
            esc(name)
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

fn short(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// E-values grow geometrically: beyond a million, the exponent is what matters.
fn e_value(v: f64) -> String {
    if v >= 1e6 {
        format!("{v:.2e}")
    } else {
        format!("{v:.1}")
    }
}

fn cdf(sorted_ms: &[f64], upto: f64) -> Vec<(f64, f64)> {
    let n = sorted_ms.len();
    (0..=100)
        .filter_map(|i| {
            let q = f64::from(i) / 100.0;
            quantile(sorted_ms, q).map(|x| (x.min(upto), q))
        })
        .filter(|_| n > 0)
        .collect()
}

/// The whole report page.
pub fn render(answer: &VerdictResponse, rows: &[SampleRow]) -> String {
    let (experiment, baseline, canary, verdict) = (
        answer.experiment.as_str(),
        answer.baseline.as_str(),
        answer.canary.as_str(),
        &answer.verdict,
    );
    let decision = match verdict.decision {
        Decision::Pass => "pass",
        Decision::Fail => "fail",
        Decision::Inconclusive => "inconclusive",
    };
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>bakeoff: {e}</title><style>\
body{{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}}\
.badge{{display:inline-block;padding:.2em .7em;border-radius:4px;color:#fff;font-weight:bold}}\
.pass{{background:#3c9a4f}}.fail{{background:{CANARY_COLOR}}}.inconclusive{{background:#888}}\
table{{border-collapse:collapse;margin:1em 0;font-size:13px}}td,th{{border:1px solid #ccc;padding:.2em .45em;text-align:right}}\
td.l,th.l{{text-align:left}}figure{{display:inline-block;margin:.5em}}figcaption{{font-weight:bold}}\
</style></head><body>",
        e = esc(experiment)
    );
    let _ = write!(
        html,
        "<h1>{e}: canary <code>{c}</code> vs baseline <code>{b}</code></h1>\
<p><span class=\"badge {decision}\" id=\"decision\" data-decision=\"{decision}\">{upper}</span> \
score <span id=\"score\" data-score=\"{score:.1}\">{score:.0}</span>, \
<span id=\"seconds\" data-seconds=\"{seconds}\">{seconds}</span> seconds of traffic from \
<span data-canary-requests=\"{cr}\">{cr}</span> canary and <span data-baseline-requests=\"{br}\">{br}</span> baseline requests, \
alpha {alpha} (valid however often this is read).</p><ul>",
        e = esc(experiment),
        c = esc(canary),
        b = esc(baseline),
        upper = decision.to_uppercase(),
        score = verdict.score,
        seconds = verdict.seconds,
        cr = verdict.requests.canary,
        br = verdict.requests.baseline,
        alpha = verdict.alpha,
    );
    for r in &verdict.reasons {
        let _ = write!(html, "<li>{}</li>", esc(r));
    }
    html.push_str("</ul><h2>Metrics</h2><table id=\"metrics\"><tr><th class=\"l\">metric</th><th class=\"l\">endpoint</th><th class=\"l\">decision</th><th>canary requests</th><th>canary</th><th>baseline</th><th>limit</th><th>lower bound</th><th>upper bound</th><th>e-value (harm)</th><th>e-value (no harm)</th></tr>");
    let opt =
        |v: Option<f64>, scale: f64| v.map_or("-".to_string(), |v| format!("{:.3}", v * scale));
    for m in &verdict.metrics {
        let scale = if m.metric == "errors" { 100.0 } else { 1.0 };
        let _ = write!(
            html,
            "<tr class=\"metric\" data-metric=\"{metric}\" data-endpoint=\"{ep}\" data-decision=\"{d}\" data-canary-requests=\"{g}\">\
<td class=\"l\">{metric}</td><td class=\"l\">{ep}</td><td class=\"l\">{d}</td><td>{g}</td><td>{c}</td><td>{b}</td><td>{limit:.3}</td><td>{lo}</td><td>{hi}</td><td>{eh}</td><td>{es}</td></tr>",
            metric = esc(&m.metric),
            ep = esc(&m.endpoint),
            d = serde_json::to_value(m.decision)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            g = m.canary_requests,
            c = opt(m.canary, scale),
            b = opt(m.baseline, scale),
            limit = m.limit,
            lo = opt(m.ratio_bounds.and_then(|b| b.lower), 1.0),
            hi = opt(m.ratio_bounds.and_then(|b| b.upper), 1.0),
            eh = m.e_value_harm.map_or("-".into(), e_value),
            es = m.e_value_safe.map_or("-".into(), e_value),
        );
    }
    html.push_str("</table><p>Latency: canary/baseline are the p50 (ms) of compared requests, effect the share of comparisons where the canary is slower beyond tolerance (%). Errors: rates (%), effect the difference in points. The Kayenta column is the fixed-horizon classification of the same data, for reference: it is not valid under repeated looks.</p>");

    if !verdict.throughput.is_empty() {
        html.push_str("<h2>Throughput share</h2><table id=\"throughput\"><tr><th class=\"l\">endpoint</th><th>canary requests</th><th>baseline requests</th><th>canary share</th><th>overall share</th></tr>");
        for t in &verdict.throughput {
            let _ = write!(
                html,
                "<tr data-endpoint=\"{e}\"><td class=\"l\">{e}</td><td>{}</td><td>{}</td><td>{:.1}%</td><td>{:.1}%</td></tr>",
                t.canary_requests,
                t.baseline_requests,
                100.0 * t.canary_share,
                100.0 * t.overall_share,
                e = esc(&t.endpoint)
            );
        }
        html.push_str("</table>");
    }
    let failing: Vec<_> = verdict
        .metrics
        .iter()
        .filter(|m| !m.drilldown.is_empty())
        .collect();
    if !failing.is_empty() {
        html.push_str("<h2>Where and for whom</h2>");
        for m in failing {
            let _ = write!(
                html,
                "<h3>{} {}</h3><table class=\"drilldown\" data-metric=\"{}\" data-endpoint=\"{}\"><tr><th class=\"l\">dimension</th><th class=\"l\">value</th><th>bad canary requests</th><th>share of bad</th><th>share of baseline</th><th>score</th></tr>",
                esc(&m.metric),
                esc(&m.endpoint),
                esc(&m.metric),
                esc(&m.endpoint)
            );
            for r in &m.drilldown {
                let _ = write!(
                    html,
                    "<tr class=\"drill\" data-dimension=\"{d}\" data-value=\"{v}\" data-bad=\"{bad}\"><td class=\"l\">{d}</td><td class=\"l\">{v}</td><td>{bad}</td><td>{:.1}%</td><td>{:.1}%</td><td>{:.2}</td></tr>",
                    100.0 * r.bad_share,
                    100.0 * r.baseline_share,
                    r.score,
                    d = esc(&r.dimension),
                    v = esc(&r.value),
                    bad = r.canary_bad,
                );
            }
            html.push_str("</table>");
        }
    }

    // Latency CDFs per endpoint (the busiest 8).
    let mut by_endpoint: BTreeMap<String, Latencies> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| r.cohort == baseline || r.cohort == canary)
    {
        let e = by_endpoint.entry(r.endpoint()).or_default();
        let ms = r.duration_ns as f64 / 1e6;
        if r.cohort == canary {
            e.0.push(ms)
        } else {
            e.1.push(ms)
        }
    }
    let mut endpoints: Vec<(String, Latencies)> = by_endpoint.into_iter().collect();
    endpoints.sort_by_key(|(_, (c, b))| std::cmp::Reverse(c.len() + b.len()));
    endpoints.truncate(8);
    html.push_str("<h2>Latency distribution per endpoint</h2>");
    for (endpoint, (mut c, mut b)) in endpoints {
        c.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        // Up to the larger p99.5, so one outlier does not flatten the chart.
        let upto = quantile(&c, 0.995)
            .unwrap_or(0.0)
            .max(quantile(&b, 0.995).unwrap_or(0.0));
        html.push_str(&svg_chart(
            &format!("{endpoint}: CDF"),
            "latency (ms)",
            "share of requests",
            &[
                (baseline, BASELINE_COLOR, cdf(&b, upto)),
                (canary, CANARY_COLOR, cdf(&c, upto)),
            ],
        ));
    }

    // Error rate and p99 over time, 30 buckets over the observed window.
    let (t0, t1) = rows.iter().fold((u64::MAX, 0u64), |(a, b), r| {
        (a.min(r.start_unix_ns), b.max(r.start_unix_ns))
    });
    if t1 > t0 {
        let buckets = 30usize;
        let width = ((t1 - t0) / buckets as u64).max(1);
        let mut cells: Vec<[(Vec<f64>, u64); 2]> =
            (0..buckets).map(|_| Default::default()).collect();
        for r in rows
            .iter()
            .filter(|r| r.cohort == baseline || r.cohort == canary)
        {
            let i = (((r.start_unix_ns - t0) / width) as usize).min(buckets - 1);
            let side = usize::from(r.cohort == canary);
            cells[i][side].0.push(r.duration_ns as f64 / 1e6);
            cells[i][side].1 += u64::from(r.status.is_none_or(|s| s >= 500));
        }
        for cell in &mut cells {
            for (v, _) in cell.iter_mut() {
                v.sort_by(f64::total_cmp);
            }
        }
        let series = |side: usize, f: &dyn Fn(&[f64], u64) -> Option<f64>| -> Vec<(f64, f64)> {
            cells
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let (v, e) = &c[side];
                    let secs = (i as u64 * width) as f64 / 1e9;
                    f(v, *e).map(|y| (secs, y))
                })
                .collect()
        };
        let p99 = |v: &[f64], _e: u64| quantile(v, 0.99);
        let err = |v: &[f64], e: u64| (!v.is_empty()).then(|| 100.0 * e as f64 / v.len() as f64);
        html.push_str("<h2>Over time</h2>");
        html.push_str(&svg_chart(
            "p99 latency",
            "seconds since the first request",
            "ms",
            &[
                (baseline, BASELINE_COLOR, series(0, &p99)),
                (canary, CANARY_COLOR, series(1, &p99)),
            ],
        ));
        html.push_str(&svg_chart(
            "error rate",
            "seconds since the first request",
            "% of requests",
            &[
                (baseline, BASELINE_COLOR, series(0, &err)),
                (canary, CANARY_COLOR, series(1, &err)),
            ],
        ));
    }
    html.push_str("<p>Generated by bakeoff. Statistics: comparison groups of time neighbours, betting e-processes (anytime-valid); see the project's README.</p></body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::JudgeConfig;

    #[test]
    fn traffic_text_is_escaped_and_numbers_are_tagged() {
        let rows: Vec<SampleRow> = (0..50u64)
            .flat_map(|i| {
                ["base", "can"].map(|cohort| SampleRow {
                    cohort: cohort.into(),
                    method: "GET".into(),
                    path: "/<script>alert(1)</script>".into(),
                    start_unix_ns: i * 1_000_000,
                    duration_ns: 1_000_000 + i,
                    status: Some(200),
                    peer: None,
                    node: None,
                    pod: None,
                    exe: None,
                    attributes: None,
                })
            })
            .collect();
        let v = crate::verdict::judge_rows(&rows, "base", "can", &JudgeConfig::default());
        let answer = VerdictResponse {
            experiment: "exp\"".into(),
            baseline: "base".into(),
            canary: "can".into(),
            verdict: v,
        };
        let html = render(&answer, &rows);
        assert!(!html.contains("<script>"), "unescaped traffic text");
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("data-decision=\"inconclusive\""));
        assert!(html.contains("exp&quot;"));
        assert!(html.contains("<svg"));
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no fetches"
        );
    }
}
