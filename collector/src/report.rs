//! The HTML report: one self-contained file (inline CSS and SVG, no script, no fetch) with the
//! verdict, every judged metric, the canary's traffic share, the tail quantiles' bounds over
//! time, the drill-down of failing metrics, per-endpoint latency CDFs of both cohorts, and error
//! rate and p99 over time. Numbers carry `data-*` attributes so tests (and scripts) can read them
//! back and compare them with the API's.
//!
//! Written with `maud`: markup is checked at compile time and every spliced value is escaped, so
//! traffic text (paths, user agents, cohort names) is data, never markup. Only the constant
//! style sheet is spliced unescaped.

use std::collections::BTreeMap;

use maud::{DOCTYPE, Markup, PreEscaped, html};

use crate::{
    live::VerdictResponse,
    store::SampleRow,
    verdict::{Bounds, Decision, MetricVerdict, TimePoint},
};

/// Latencies in ms of (canary, baseline).
type Latencies = (Vec<f64>, Vec<f64>);

const BASELINE_COLOR: &str = "#3b6ea5";
const CANARY_COLOR: &str = "#d9534f";
const LIMIT_COLOR: &str = "#444";

const STYLE: &str = "\
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1150px}\
h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.15em}\
.badge{display:inline-block;padding:.2em .7em;border-radius:4px;color:#fff;font-weight:bold}\
.badge.pass{background:#3c9a4f}.badge.fail{background:#d9534f}.badge.inconclusive{background:#888}\
td.pass{color:#2d7a3d;font-weight:bold}td.fail{color:#c9302c;font-weight:bold}td.inconclusive{color:#666}\
table{border-collapse:collapse;margin:1em 0;font-size:13px}\
td,th{border:1px solid #ccc;padding:.2em .4em;text-align:right;vertical-align:top}\
td{white-space:nowrap}th{background:#f4f4f4}td.l,th.l{text-align:left}td.l{white-space:normal}\
td.b{text-align:left}figure,.tail{display:inline-block;margin:.5em;vertical-align:top}\
figcaption{font-weight:bold;font-size:14px;max-width:520px}\
.legend{font-size:12px;max-width:520px}.legend span{margin-right:1em;white-space:nowrap}\
.note{color:#555;font-size:13px;max-width:950px}";

fn decision_name(d: Decision) -> &'static str {
    match d {
        Decision::Pass => "pass",
        Decision::Fail => "fail",
        Decision::Inconclusive => "inconclusive",
    }
}

fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let h = (sorted.len() - 1) as f64 * q;
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    Some(sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo]))
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

/// Time of day (UTC) of a Unix time in seconds.
fn clock(unix_s: f64) -> String {
    let s = unix_s.max(0.0) as u64 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// E-values grow geometrically: beyond a million, the exponent is what matters.
fn e_value(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 1e6 => format!("{v:.2e}"),
        Some(v) => format!("{v:.1}"),
    }
}

/// How a metric's values read: ms (latency, pNN) or a share in percent (errors, volume).
#[derive(Clone, Copy)]
enum Unit {
    Ms,
    Percent,
}

impl Unit {
    fn of(metric: &str) -> Self {
        if metric == "errors" || metric == "volume" {
            Self::Percent
        } else {
            Self::Ms
        }
    }

    /// The number alone: ms to about four significant digits, shares in percent.
    fn number(self, v: f64) -> String {
        match self {
            Self::Ms if v >= 100.0 => format!("{v:.1}"),
            Self::Ms if v >= 10.0 => format!("{v:.2}"),
            Self::Ms => format!("{v:.3}"),
            Self::Percent => format!("{:.2}", 100.0 * v),
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Self::Ms => " ms",
            Self::Percent => "%",
        }
    }

    fn text(self, v: Option<f64>) -> String {
        v.map_or("-".into(), |v| {
            format!("{}{}", self.number(v), self.suffix())
        })
    }
}

fn is_tail(metric: &str) -> bool {
    metric
        .strip_prefix('p')
        .is_some_and(|q| !q.is_empty() && q.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

/// `[lower, upper]` of `b` as text, `?` for a side not bounded yet.
fn interval(b: Bounds, f: impl Fn(f64) -> String) -> String {
    let side = |v: Option<f64>| v.map_or("?".into(), &f);
    format!("[{}, {}]", side(b.lower), side(b.upper))
}

// ---------------------------------------------------------------------------------------------
// Charts: inline SVG, generated with maud like the rest of the page.

/// Splits a series into the runs of consecutive known points.
fn runs<T>(points: impl Iterator<Item = Option<T>>) -> Vec<Vec<T>> {
    let (mut out, mut run) = (Vec::new(), Vec::new());
    for p in points {
        match p {
            Some(p) => run.push(p),
            None if !run.is_empty() => out.push(std::mem::take(&mut run)),
            None => {}
        }
    }
    if !run.is_empty() {
        out.push(run);
    }
    out
}

/// A line of a chart, split into runs where its value is known.
struct Line<'a> {
    name: String,
    color: &'a str,
    /// `stroke-dasharray`, for limits.
    dash: Option<&'a str>,
    width: f64,
    runs: Vec<Vec<(f64, f64)>>,
}

impl<'a> Line<'a> {
    fn new(name: impl Into<String>, color: &'a str, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            color,
            dash: None,
            width: 2.0,
            runs: vec![points],
        }
    }

    /// A line through the points whose value is known, broken where it is not.
    fn gappy(name: impl Into<String>, color: &'a str, points: &[(f64, Option<f64>)]) -> Self {
        let known = points
            .iter()
            .map(|&(x, y)| y.filter(|y| y.is_finite()).map(|y| (x, y)));
        Self {
            runs: runs(known),
            width: 1.5,
            ..Self::new(name, color, Vec::new())
        }
    }

    fn dashed(mut self, dash: &'a str) -> Self {
        self.dash = Some(dash);
        self.width = 1.5;
        self
    }
}

/// A shaded area between a lower and an upper line, drawn where both are known.
struct Band<'a> {
    color: &'a str,
    runs: Vec<Vec<(f64, f64, f64)>>,
}

impl<'a> Band<'a> {
    fn new(color: &'a str, points: &[(f64, Bounds)]) -> Self {
        let known = points.iter().map(|&(x, b)| {
            b.lower
                .zip(b.upper)
                .filter(|(lo, hi)| lo.is_finite() && hi.is_finite())
                .map(|(lo, hi)| (x, lo, hi))
        });
        let mut runs = runs(known);
        runs.retain(|r| r.len() > 1);
        Self { color, runs }
    }
}

#[derive(Clone, Copy)]
enum XAxis {
    /// Plain numbers.
    Number,
    /// Unix seconds, labelled as UTC time of day.
    Clock,
}

/// A line chart: x and y in data units; y from `y_min` to the largest value, or to `y_max`,
/// beyond which values are drawn at the edge (early confidence bounds can be huge).
struct Chart<'a> {
    /// `data-chart` of the figure: what the chart shows, for tests and scripts.
    kind: &'a str,
    title: String,
    x_label: &'a str,
    y_label: &'a str,
    x_axis: XAxis,
    y_min: f64,
    y_max: Option<f64>,
    bands: Vec<Band<'a>>,
    lines: Vec<Line<'a>>,
    /// Vertical markers: x and label.
    marks: Vec<(f64, String)>,
}

const W: f64 = 520.0;
const H: f64 = 250.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 14.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 36.0;

impl<'a> Chart<'a> {
    fn new(kind: &'a str, title: String, x_label: &'a str, y_label: &'a str) -> Self {
        Self {
            kind,
            title,
            x_label,
            y_label,
            x_axis: XAxis::Number,
            y_min: 0.0,
            y_max: None,
            bands: Vec::new(),
            lines: Vec::new(),
            marks: Vec::new(),
        }
    }

    fn xs(&self) -> impl Iterator<Item = f64> + '_ {
        let lines = self.lines.iter().flat_map(|l| l.runs.iter().flatten());
        let bands = self.bands.iter().flat_map(|b| b.runs.iter().flatten());
        lines.map(|p| p.0).chain(bands.map(|p| p.0))
    }

    fn ys(&self) -> impl Iterator<Item = f64> + '_ {
        let lines = self.lines.iter().flat_map(|l| l.runs.iter().flatten());
        let bands = self.bands.iter().flat_map(|b| b.runs.iter().flatten());
        lines.map(|p| p.1).chain(bands.flat_map(|p| [p.1, p.2]))
    }

    /// The figure; `notes` are shown after the legend as `name: value`.
    fn render(&self, notes: &[(&str, String)]) -> Markup {
        let (mut x0, mut x1) = (f64::INFINITY, f64::NEG_INFINITY);
        for x in self.xs() {
            x0 = x0.min(x);
            x1 = x1.max(x);
        }
        let data_max = self.ys().fold(f64::NEG_INFINITY, f64::max);
        let (y0, mut y1) = (self.y_min, self.y_max.unwrap_or(data_max));
        let clipped = data_max > y1;
        if !x0.is_finite() {
            return html! {
                figure data-chart=(self.kind) {
                    figcaption { (self.title) }
                    p { "no data" }
                }
            };
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        if y1.is_nan() || y1 <= y0 {
            y1 = y0 + 1.0;
        }
        let px = |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
        let py = |y: f64| H - BOTTOM - (y.clamp(y0, y1) - y0) / (y1 - y0) * (H - TOP - BOTTOM);
        let xtick = |x: f64| match self.x_axis {
            XAxis::Number => short(x),
            XAxis::Clock => clock(x),
        };
        let polyline = |pts: &mut dyn Iterator<Item = (f64, f64)>| -> String {
            pts.map(|(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let base = H - BOTTOM;
        html! {
            figure data-chart=(self.kind) data-title=(self.title) {
                figcaption { (self.title) }
                svg viewBox={ "0 0 " (W) " " (H) } width=(W) height=(H) role="img" {
                    @for i in 0..=4 {
                        @let fy = y0 + (y1 - y0) * f64::from(i) / 4.0;
                        line x1=(LEFT) y1=(format!("{:.1}", py(fy))) x2=(W - RIGHT)
                            y2=(format!("{:.1}", py(fy))) stroke="#eee" {}
                        text x=(LEFT - 4.0) y=(format!("{:.1}", py(fy) + 3.0)) font-size="10"
                            text-anchor="end" { (short(fy)) }
                        @let fx = x0 + (x1 - x0) * f64::from(i) / 4.0;
                        text x=(format!("{:.1}", px(fx))) y=(base + 14.0) font-size="10"
                            text-anchor=(if i == 4 { "end" } else { "middle" }) { (xtick(fx)) }
                    }
                    line x1=(LEFT) y1=(base) x2=(W - RIGHT) y2=(base) stroke="#999" {}
                    line x1=(LEFT) y1=(TOP) x2=(LEFT) y2=(base) stroke="#999" {}
                    text x=((W + LEFT) / 2.0) y=(H - 4.0) font-size="11" text-anchor="middle" {
                        (self.x_label)
                    }
                    text x="12" y=(H / 2.0) font-size="11" text-anchor="middle"
                        transform={ "rotate(-90 12 " (H / 2.0) ")" } {
                        (self.y_label)
                        @if clipped { " (clipped)" }
                    }
                    @for band in &self.bands {
                        @for run in &band.runs {
                            @let upper = polyline(&mut run.iter().map(|p| (p.0, p.2)));
                            @let lower = polyline(&mut run.iter().rev().map(|p| (p.0, p.1)));
                            polygon fill=(band.color) fill-opacity="0.15" stroke="none"
                                points={ (upper) " " (lower) } {}
                        }
                    }
                    @for line in &self.lines {
                        @for run in &line.runs {
                            @if run.len() == 1 {
                                circle cx=(format!("{:.1}", px(run[0].0)))
                                    cy=(format!("{:.1}", py(run[0].1))) r="2.5"
                                    fill=(line.color) {}
                            } @else {
                                polyline fill="none" stroke=(line.color)
                                    stroke-width=(line.width) stroke-dasharray=[line.dash]
                                    points=(polyline(&mut run.iter().copied())) {}
                            }
                        }
                    }
                    @for (x, label) in &self.marks {
                        @let (x, right) = (px(*x), px(*x) > W / 2.0);
                        line x1=(format!("{x:.1}")) y1=(TOP) x2=(format!("{x:.1}")) y2=(base)
                            stroke=(CANARY_COLOR) stroke-dasharray="2 2" {}
                        // Beside the marker, on the side with room.
                        text x=(format!("{:.1}", if right { x - 3.0 } else { x + 3.0 }))
                            y=(TOP + 8.0) font-size="10" fill=(CANARY_COLOR)
                            text-anchor=(if right { "end" } else { "start" }) { (label) }
                    }
                }
                div.legend {
                    @for line in self.lines.iter().filter(|l| !l.name.is_empty()) {
                        span {
                            svg width="22" height="8" {
                                line x1="0" y1="4" x2="22" y2="4" stroke=(line.color)
                                    stroke-width="2" stroke-dasharray=[line.dash] {}
                            }
                            " " (line.name)
                        }
                        " "
                    }
                    @for (name, value) in notes {
                        span { (name) ": " (value) }
                        " "
                    }
                }
            }
        }
    }
}

fn cdf(sorted_ms: &[f64], upto: f64) -> Vec<(f64, f64)> {
    if sorted_ms.is_empty() {
        return Vec::new();
    }
    (0..=100)
        .filter_map(|i| {
            let q = f64::from(i) / 100.0;
            quantile(sorted_ms, q).map(|x| (x.min(upto), q))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Sections.

fn metrics_table(metrics: &[MetricVerdict]) -> Markup {
    html! {
        table #metrics {
            tr {
                th.l { "metric" } th.l { "endpoint" } th.l { "decision" } th.l { "required" }
                th { "canary requests" } th { "baseline requests" } th { "canary" }
                th { "baseline" } th { "limit" } th.l { "bounds" } th { "e-value harm" }
                th { "e-value no harm" } th { "failed at (UTC)" }
            }
            @for m in metrics {
                @let unit = Unit::of(&m.metric);
                @let decision = decision_name(m.decision);
                tr.metric data-metric=(m.metric) data-endpoint=(m.endpoint)
                    data-decision=(decision) data-canary-requests=(m.canary_requests)
                    data-baseline-requests=(m.baseline_requests) data-canary=[m.canary]
                    data-baseline=[m.baseline] data-limit=(m.limit)
                    data-failed-at=[m.failed_at] title=(m.summary) {
                    td.l { (m.metric) }
                    td.l { (m.endpoint) }
                    td.l.(decision) { (decision) }
                    td.l { @if m.required { "yes" } @else { "no" } }
                    td { (m.canary_requests) }
                    td { (m.baseline_requests) }
                    td { (unit.text(m.canary)) }
                    td { (unit.text(m.baseline)) }
                    td {
                        @if m.metric == "volume" { "≥ " (unit.text(Some(m.limit))) }
                        @else { "×" (format!("{:.2}", m.limit)) }
                    }
                    td.b {
                        @if let Some(b) = m.canary_bounds {
                            div {
                                "canary " (interval(b, |v| unit.number(v))) (unit.suffix())
                            }
                        }
                        @if let Some(b) = m.baseline_bounds {
                            div {
                                "baseline " (interval(b, |v| unit.number(v))) (unit.suffix())
                            }
                        }
                        @if let Some(b) = m.ratio_bounds {
                            div { "ratio " (interval(b, |v| format!("×{v:.3}"))) }
                        }
                        @if m.canary_bounds.is_none() && m.baseline_bounds.is_none()
                            && m.ratio_bounds.is_none() { "-" }
                    }
                    td { (e_value(m.e_value_harm)) }
                    td { (e_value(m.e_value_safe)) }
                    td {
                        @match m.failed_at {
                            Some(t) => (clock(t as f64)),
                            None => "-",
                        }
                    }
                }
            }
        }
        p.note {
            "latency: canary and baseline are the p50 of the judged requests, harm is most "
            "(canary, baseline) pairs of the same second slower than limit × baseline. pNN: the "
            "quantile, with time-uniform bounds; fail when the canary's lower bound exceeds "
            "limit × the baseline's upper bound, pass when its upper bound is at most limit × "
            "the baseline's lower bound. errors: error rates (no response, 5xx, gRPC status). "
            "volume: the canary's share of the requests against the expected share. E-values "
            "are the largest so far of the harm and no-harm tests (a test decides at 1/alpha "
            "of its metric). Hover a row for its summary."
        }
    }
}

/// The canary's share of the traffic: observed against expected, and over time.
fn volume_section(answer: &VerdictResponse) -> Markup {
    let v = &answer.verdict.volume;
    let volume = answer
        .verdict
        .metrics
        .iter()
        .find(|m| m.metric == "volume" && m.endpoint == "*");
    let pct = |s: f64| format!("{:.2}%", 100.0 * s);
    let mut chart = Chart::new(
        "volume",
        "canary share of requests, per minute".into(),
        "time (UTC)",
        "% of requests",
    );
    chart.x_axis = XAxis::Clock;
    let observed: Vec<(f64, f64)> = v
        .timeline
        .iter()
        .map(|&(t, s)| (t as f64, 100.0 * s))
        .collect();
    let span = observed
        .first()
        .zip(observed.last())
        .map(|(a, b)| (a.0, b.0));
    chart.lines.push(Line::new(
        answer.canary.as_str(),
        CANARY_COLOR,
        observed.clone(),
    ));
    if let Some((a, b)) = span {
        if let Some(e) = v.expected {
            chart.lines.push(
                Line::new(
                    "expected",
                    BASELINE_COLOR,
                    vec![(a, 100.0 * e), (b, 100.0 * e)],
                )
                .dashed("6 3"),
            );
        }
        if let Some(m) = volume.filter(|m| m.limit > 0.0) {
            chart.lines.push(
                Line::new(
                    "lowest tolerated",
                    LIMIT_COLOR,
                    vec![(a, 100.0 * m.limit), (b, 100.0 * m.limit)],
                )
                .dashed("2 3"),
            );
        }
    }
    // Zoomed on the shares shown: a drop of a few points must be visible.
    let (lo, hi) = chart
        .ys()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
            (a.min(y), b.max(y))
        });
    if lo <= hi {
        let pad = (0.3 * (hi - lo)).max(1.0);
        chart.y_min = (lo - pad).max(0.0);
        chart.y_max = Some((hi + pad).min(100.0));
    }
    if let Some(t) = volume.and_then(|m| m.failed_at) {
        chart.marks.push((t as f64, "failed".into()));
    }
    html! {
        h2 { "Traffic share" }
        p #volume data-observed=(v.observed) data-expected=[v.expected] data-source=(v.source) {
            "The canary served " strong { (pct(v.observed)) } " of canary + baseline requests; "
            @match v.expected {
                Some(e) => { "expected " strong { (pct(e)) } }
                None => "no expected share yet",
            }
            " (" (v.source) ")"
            @if let Some(m) = volume.filter(|m| m.limit > 0.0) {
                ", lowest tolerated " (pct(m.limit))
                ": " span.(decision_name(m.decision)) { (decision_name(m.decision)) }
            }
            "."
        }
        @if !v.timeline.is_empty() { (chart.render(&[])) }
    }
}

/// A tail quantile's bounds over time: both cohorts' bands and the limits derived from the
/// baseline's bounds that decide the metric.
fn tail_chart(m: &MetricVerdict, baseline: &str, canary: &str) -> Markup {
    let t = &m.timeline;
    let xs = |f: &dyn Fn(&TimePoint) -> Option<f64>| -> Vec<(f64, Option<f64>)> {
        t.iter().map(|p| (p.unix_s as f64, f(p))).collect()
    };
    let mut chart = Chart::new(
        "tail",
        format!(
            "{} {}: bounds over time, {}",
            m.metric,
            m.endpoint,
            decision_name(m.decision).to_uppercase()
        ),
        "time (UTC)",
        "ms",
    );
    chart.x_axis = XAxis::Clock;
    // Early bounds are wide: scale to the later half of the timeline, where they have settled.
    let settled = t[t.len() / 2..].iter().flat_map(|p| {
        [
            p.canary.upper,
            p.baseline.upper.map(|b| b * m.limit),
            p.canary.lower,
        ]
    });
    chart.y_max = settled.flatten().reduce(f64::max).map(|v| v * 1.25);
    let band = |f: &dyn Fn(&TimePoint) -> Bounds| -> Vec<(f64, Bounds)> {
        t.iter().map(|p| (p.unix_s as f64, f(p))).collect()
    };
    chart
        .bands
        .push(Band::new(BASELINE_COLOR, &band(&|p| p.baseline)));
    chart
        .bands
        .push(Band::new(CANARY_COLOR, &band(&|p| p.canary)));
    chart.lines.extend([
        Line::gappy(
            format!("{baseline} bounds"),
            BASELINE_COLOR,
            &xs(&|p| p.baseline.upper),
        ),
        Line::gappy("", BASELINE_COLOR, &xs(&|p| p.baseline.lower)),
        Line::gappy(
            format!("{canary} bounds"),
            CANARY_COLOR,
            &xs(&|p| p.canary.upper),
        ),
        Line::gappy("", CANARY_COLOR, &xs(&|p| p.canary.lower)),
        Line::gappy(
            format!("fail line: {:.2} × baseline upper", m.limit),
            LIMIT_COLOR,
            &xs(&|p| p.baseline.upper.map(|b| b * m.limit)),
        )
        .dashed("6 3"),
        Line::gappy(
            format!("pass line: {:.2} × baseline lower", m.limit),
            LIMIT_COLOR,
            &xs(&|p| p.baseline.lower.map(|b| b * m.limit)),
        )
        .dashed("2 3"),
    ]);
    if let Some(at) = m.failed_at {
        chart.marks.push((at as f64, "failed".into()));
    }
    html! {
        div.tail data-metric=(m.metric) data-endpoint=(m.endpoint) data-points=(t.len()) {
            (chart.render(&[]))
        }
    }
}

fn drilldown_tables(metrics: &[MetricVerdict]) -> Markup {
    html! {
        @let failing: Vec<&MetricVerdict> =
            metrics.iter().filter(|m| !m.drilldown.is_empty()).collect();
        @if !failing.is_empty() {
            h2 { "Where and for whom" }
            p.note {
                "For each failing metric, the dimension values that best explain its bad canary "
                "requests, highest score first."
            }
            @for m in failing {
                h3 { (m.metric) " " (m.endpoint) }
                table.drilldown data-metric=(m.metric) data-endpoint=(m.endpoint) {
                    tr {
                        th.l { "dimension" } th.l { "value" } th { "bad canary requests" }
                        th { "share of bad" } th { "share of all canary" }
                        th { "share of baseline" } th { "score" }
                        th { "bad rate of value" }
                    }
                    @for r in &m.drilldown {
                        tr.drill data-dimension=(r.dimension) data-value=(r.value)
                            data-bad=(r.canary_bad) {
                            td.l { (r.dimension) }
                            td.l { (r.value) }
                            td { (r.canary_bad) }
                            td { (format!("{:.1}%", 100.0 * r.bad_share)) }
                            td { (format!("{:.1}%", 100.0 * r.canary_share)) }
                            td { (format!("{:.1}%", 100.0 * r.baseline_share)) }
                            td { (format!("{:.2}", r.score)) }
                            td { (format!("{:.1}%", 100.0 * r.canary_bad_rate)) }
                        }
                    }
                }
            }
        }
    }
}

/// Latency CDFs of the busiest 8 endpoints in `rows`.
fn cdf_charts(rows: &[&SampleRow], baseline: &str, canary: &str) -> Markup {
    let mut by_endpoint: BTreeMap<String, Latencies> = BTreeMap::new();
    for r in rows {
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
    html! {
        h2 { "Latency distribution per endpoint" }
        p.note { "The most recent requests stored, busiest endpoints first." }
        @for (endpoint, (mut c, mut b)) in endpoints {
            @let chart = {
                c.sort_by(f64::total_cmp);
                b.sort_by(f64::total_cmp);
                // Up to the larger p99.5, so one outlier does not flatten the chart.
                let upto = quantile(&c, 0.995)
                    .unwrap_or(0.0)
                    .max(quantile(&b, 0.995).unwrap_or(0.0));
                let mut chart = Chart::new(
                    "cdf",
                    format!("{endpoint}: CDF"),
                    "latency (ms)",
                    "share of requests",
                );
                chart.lines = vec![
                    Line::new(baseline, BASELINE_COLOR, cdf(&b, upto)),
                    Line::new(canary, CANARY_COLOR, cdf(&c, upto)),
                ];
                chart
            };
            (chart.render(&[
                ("requests", format!("{} / {}", c.len(), b.len())),
            ]))
        }
    }
}

/// Error rate and p99 over time from `rows`, 30 buckets over the window they span.
fn over_time_charts(rows: &[&SampleRow], baseline: &str, canary: &str) -> Markup {
    let (t0, t1) = rows.iter().fold((u64::MAX, 0u64), |(a, b), r| {
        (a.min(r.start_unix_ns), b.max(r.start_unix_ns))
    });
    if t1 <= t0 {
        return html! {};
    }
    let buckets = 30usize;
    let width = ((t1 - t0) / buckets as u64).max(1);
    let mut cells: Vec<[(Vec<f64>, u64); 2]> = (0..buckets).map(|_| Default::default()).collect();
    for r in rows {
        let i = (((r.start_unix_ns - t0) / width) as usize).min(buckets - 1);
        let side = usize::from(r.cohort == canary);
        cells[i][side].0.push(r.duration_ns as f64 / 1e6);
        cells[i][side].1 += u64::from(r.outcome() != crate::series::Outcome::Ok);
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
                // The bucket's middle, in Unix seconds.
                let t = (t0 + i as u64 * width + width / 2) as f64 / 1e9;
                f(v, *e).map(|y| (t, y))
            })
            .collect()
    };
    let p99 = |v: &[f64], _e: u64| quantile(v, 0.99);
    let err = |v: &[f64], e: u64| (!v.is_empty()).then(|| 100.0 * e as f64 / v.len() as f64);
    let chart = |kind, title: &str, y_label, f: &dyn Fn(&[f64], u64) -> Option<f64>| {
        let mut c = Chart::new(kind, title.into(), "time (UTC)", y_label);
        c.x_axis = XAxis::Clock;
        c.lines = vec![
            Line::new(baseline, BASELINE_COLOR, series(0, f)),
            Line::new(canary, CANARY_COLOR, series(1, f)),
        ];
        c.render(&[])
    };
    html! {
        h2 { "Over time" }
        p.note { "From the most recent requests stored, in 30 buckets." }
        (chart("errors", "error rate (no response or 5xx)", "% of requests", &err))
        (chart("p99", "p99 latency", "ms", &p99))
    }
}

/// The whole report page.
pub fn render(answer: &VerdictResponse, rows: &[SampleRow]) -> String {
    let (experiment, baseline, canary, verdict) = (
        answer.experiment.as_str(),
        answer.baseline.as_str(),
        answer.canary.as_str(),
        &answer.verdict,
    );
    let decision = decision_name(verdict.decision);
    let rows: Vec<&SampleRow> = rows
        .iter()
        .filter(|r| r.cohort == baseline || r.cohort == canary)
        .collect();
    // Tail charts, failing first (stable: the verdict's order otherwise).
    let mut tails: Vec<&MetricVerdict> = verdict
        .metrics
        .iter()
        .filter(|m| is_tail(&m.metric) && !m.timeline.is_empty())
        .collect();
    tails.sort_by_key(|m| match m.decision {
        Decision::Fail => 0,
        Decision::Inconclusive => 1,
        Decision::Pass => 2,
    });
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "bakeoff: " (experiment) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 {
                    (experiment) ": canary " code { (canary) } " vs baseline " code { (baseline) }
                }
                p {
                    span.badge.(decision) #decision data-decision=(decision) {
                        (decision.to_uppercase())
                    }
                    " score "
                    span #score data-score=(format!("{:.1}", verdict.score)) {
                        (format!("{:.0}", verdict.score))
                    }
                    ", "
                    span #seconds data-seconds=(verdict.seconds) { (verdict.seconds) }
                    " seconds of traffic from "
                    span data-canary-requests=(verdict.requests.canary) {
                        (verdict.requests.canary)
                    }
                    " canary and "
                    span data-baseline-requests=(verdict.requests.baseline) {
                        (verdict.requests.baseline)
                    }
                    " baseline requests; alpha " (verdict.alpha) " over "
                    (verdict.metrics_judged) " metrics (valid however often this is read)."
                }
                ul #reasons {
                    @for r in &verdict.reasons { li { (r) } }
                }
                h2 { "Metrics" }
                (metrics_table(&verdict.metrics))
                (volume_section(answer))
                @if !verdict.throughput.is_empty() {
                    table #throughput {
                        tr {
                            th.l { "endpoint" } th { "canary requests" }
                            th { "baseline requests" } th { "canary share" }
                            th { "overall share" }
                        }
                        @for t in &verdict.throughput {
                            tr data-endpoint=(t.endpoint) {
                                td.l { (t.endpoint) }
                                td { (t.canary_requests) }
                                td { (t.baseline_requests) }
                                td { (format!("{:.1}%", 100.0 * t.canary_share)) }
                                td { (format!("{:.1}%", 100.0 * t.overall_share)) }
                            }
                        }
                    }
                }
                @if !tails.is_empty() {
                    h2 { "Tail latency bounds over time" }
                    p.note {
                        "Time-uniform confidence bounds of each cohort's quantile (shaded between "
                        "lower and upper; a side not bounded yet is left out). The metric fails "
                        "once the canary's lower bound is above the dashed fail line, and passes "
                        "once its upper bound is below the dotted pass line."
                    }
                    @for m in &tails { (tail_chart(m, baseline, canary)) }
                }
                (drilldown_tables(&verdict.metrics))
                (cdf_charts(&rows, baseline, canary))
                (over_time_charts(&rows, baseline, canary))
                p.note {
                    "Generated by bakeoff. Statistics: comparison groups of time neighbours, "
                    "betting e-processes and confidence sequences (anytime-valid); see the "
                    "project's README and STATISTICS.md."
                }
            }
        }
    };
    let mut html = page.into_string();
    html.push('\n');
    html
}

/// What a replay page says above its table.
pub struct ReplayHeader<'a> {
    pub file: &'a str,
    pub experiment: &'a str,
    pub cohort: &'a str,
    pub protocol: &'a str,
    pub a: String,
    pub b: String,
    pub a2: Option<String>,
    pub sessions: usize,
    pub requests: usize,
    pub skipped_writes: u64,
    pub errors: usize,
    pub late: usize,
    pub noise: &'a [String],
}

/// A's and B's median bounds on one shared log scale: where B sits against A, at a glance.
fn median_bars(e: &crate::replay::EndpointComparison, lo_ms: f64, hi_ms: f64) -> Markup {
    const BAR_W: f64 = 260.0;
    let (lo, hi) = (lo_ms.max(1e-3).ln(), hi_ms.max(lo_ms * 1.01).ln());
    let x = |ns: f64| ((ns / 1e6).max(1e-3).ln() - lo) / (hi - lo).max(1e-9) * BAR_W;
    let bar = |b: (Option<f64>, Option<f64>), y: f64, color: &str| match b {
        (Some(l), Some(h)) => {
            let (x0, x1) = (x(l), x(h));
            html! {
                rect x=(format!("{x0:.1}")) y=(y) width=(format!("{:.1}", (x1 - x0).max(2.0)))
                    height="6" fill=(color) {}
            }
        }
        _ => html! {},
    };
    html! {
        svg width=(BAR_W) height="16" role="img" {
            (bar(e.a_p50, 1.0, BASELINE_COLOR))
            (bar(e.b_p50, 9.0, CANARY_COLOR))
        }
    }
}

/// The self-contained HTML page of a replay's comparison (`bakeoff replay --html FILE`).
pub fn replay_page(c: &crate::replay::Comparison, h: &ReplayHeader<'_>) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |x| short(x / 1e6));
    let bounds = |b: (Option<f64>, Option<f64>)| format!("{}..{} ms", ms(b.0), ms(b.1));
    let all: Vec<f64> = c
        .endpoints
        .iter()
        .flat_map(|e| [e.a_p50.0, e.a_p50.1, e.b_p50.0, e.b_p50.1])
        .flatten()
        .map(|ns| ns / 1e6)
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = all.iter().copied().fold(0.0, f64::max);
    let verdict = if c.regressed() { "fail" } else { "pass" };
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "bakeoff replay: " (h.experiment) " " (h.cohort) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { "Replay of " code { (h.file) } }
                p {
                    span.badge.(verdict) #decision data-decision=(verdict) {
                        @if c.regressed() { "B IS WORSE" } @else { "NO REGRESSION SHOWN" }
                    }
                    " " (h.protocol) " capture of experiment " code { (h.experiment) }
                    ", cohort " code { (h.cohort) } ": "
                    span #requests data-requests=(h.requests) { (h.requests) }
                    " requests in " (h.sessions) " sessions replayed against A "
                    code { (h.a) } " and B " code { (h.b) }
                    @if let Some(a2) = &h.a2 { ", calibrated with A2 " code { (a2) } }
                    " (interleaved); " (h.skipped_writes) " writes refused, " (h.errors)
                    " failed, " (h.late) " sent late."
                }
                h2 { "Per endpoint" }
                table #endpoints {
                    tr {
                        th.l { "endpoint" } th { "requests" } th { "A median" } th { "B median" }
                        th.l { "A " span style=(format!("color:{BASELINE_COLOR}")) { "■" }
                               " B " span style=(format!("color:{CANARY_COLOR}")) { "■" }
                               " (log scale)" }
                        th { "latency" } th { "status" } th { "headers" } th { "body" }
                        th { "noise" } th { "errors" }
                    }
                    @for e in &c.endpoints {
                        @let bad = e.latency == "slower" || e.status_diffs + e.header_diffs + e.body_diffs > 0;
                        tr data-endpoint=(e.endpoint) data-latency=(e.latency) {
                            td.l { code { (e.endpoint) } }
                            td { (e.requests) }
                            td { (bounds(e.a_p50)) }
                            td { (bounds(e.b_p50)) }
                            td.b { (median_bars(e, lo, hi)) }
                            td class=(if bad { "fail" } else { "pass" }) { (e.latency) }
                            td { (e.status_diffs) } td { (e.header_diffs) } td { (e.body_diffs) }
                            td { (e.noisy) } td { (e.errors) }
                        }
                    }
                }
                @let examples: Vec<_> = c.endpoints.iter().filter_map(|e| e.example.as_ref().map(|x| (e, x))).collect();
                @if !examples.is_empty() {
                    h2 { "Answered differently" }
                    @for (e, x) in examples {
                        p {
                            code { (e.endpoint) } ": " (x.kind)
                            @if !x.fields.is_empty() { " (" (x.fields.join(", ")) ")" }
                            " differs, e.g. " code { (x.path) }
                        }
                        table { tr { th.l { "A" } td.l { code { (x.a) } } } tr { th.l { "B" } td.l { code { (x.b) } } } }
                    }
                }
                p.note {
                    "Median bounds: the judge's confidence sequences at level " (c.alpha)
                    " over all endpoints; latency is reported when B's median is beyond A's by more than "
                    (format!("{:.0}%", c.tolerance * 100.0))
                    ". Responses are compared after normalization; noise left out: "
                    (h.noise.join(", "))
                    @if h.a2.is_some() { ", and what also differs between A and A2" }
                    "."
                }
            }
        }
    };
    page.into_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::{JudgeConfig, judge_rows};

    fn rows(path: &str, n: u64) -> Vec<SampleRow> {
        (0..n)
            .flat_map(|i| {
                ["base", "can"].map(|cohort| SampleRow {
                    cohort: cohort.into(),
                    method: "GET".into(),
                    path: path.into(),
                    start_unix_ns: 1_700_000_000_000_000_000 + i * 1_000_000,
                    duration_ns: 1_000_000 + i,
                    status: Some(200),
                    grpc_status: None,
                    error: None,
                    peer: None,
                    node: None,
                    pod: None,
                    exe: None,
                    attributes: None,
                })
            })
            .collect()
    }

    fn answer(rows: &[SampleRow]) -> VerdictResponse {
        VerdictResponse {
            experiment: "exp\"<b>".into(),
            baseline: "base".into(),
            canary: "can".into(),
            verdict: judge_rows(rows, "base", "can", &JudgeConfig::default()),
        }
    }

    /// Every element the parser would treat as open is closed, in order (void elements aside),
    /// so SVG children do not end up nested in the previous shape.
    fn balanced(html: &str) -> bool {
        const VOID: [&str; 2] = ["meta", "!doctype"];
        let mut open: Vec<&str> = Vec::new();
        for tag in html.split('<').skip(1) {
            let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
            let name = tag
                .trim_start_matches('/')
                .split([' ', '/'])
                .next()
                .unwrap_or("");
            if tag.starts_with('/') {
                if open.pop() != Some(name) {
                    return false;
                }
            } else if !VOID.contains(&name.to_ascii_lowercase().as_str()) {
                open.push(name);
            }
        }
        open.is_empty()
    }

    #[test]
    fn traffic_text_is_escaped_and_numbers_are_tagged() {
        let rows = rows("/<script>alert(1)</script>", 50);
        let answer = answer(&rows);
        let html = render(&answer, &rows);
        assert!(!html.contains("<script"), "unescaped traffic text");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("exp&quot;&lt;b&gt;"));
        assert!(!html.contains("<b>"));
        let v = &answer.verdict;
        assert!(html.contains("id=\"decision\" data-decision=\"inconclusive\""));
        assert!(html.contains(&format!("id=\"seconds\" data-seconds=\"{}\"", v.seconds)));
        assert!(html.contains(&format!("data-canary-requests=\"{}\"", v.requests.canary)));
        assert!(!v.metrics.is_empty());
        // The four attributes the integration test looks for, first and in this order, the
        // decision spelt as the API's JSON spells it.
        for m in &v.metrics {
            let row = format!(
                "<tr class=\"metric\" data-metric=\"{}\" data-endpoint=\"{}\" data-decision={} data-canary-requests=\"{}\"",
                m.metric,
                m.endpoint.replace('<', "&lt;").replace('>', "&gt;"),
                serde_json::to_string(&m.decision).expect("a decision"),
                m.canary_requests
            );
            assert!(html.contains(&row), "no row {row}");
        }
        assert!(html.contains("<svg"));
        assert!(balanced(&html), "unbalanced markup");
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no fetches"
        );
    }

    #[test]
    fn tail_timeline_renders_as_svg_chart() {
        let rows = rows("/checkout", 50);
        let mut answer = answer(&rows);
        let m = answer
            .verdict
            .metrics
            .iter_mut()
            .find(|m| m.metric == "p99" && m.endpoint == "*")
            .expect("an overall p99");
        // Bounds that tighten over time, unbounded above at first, and a failure.
        m.timeline = (0..20u64)
            .map(|i| {
                let w = 40.0 / (i as f64 + 1.0);
                TimePoint {
                    unix_s: 1_700_000_000 + 10 * i,
                    canary_requests: 100 * i,
                    baseline_requests: 100 * i,
                    canary: Bounds {
                        lower: Some(30.0 - w / 4.0),
                        upper: (i > 2).then_some(30.0 + w),
                    },
                    baseline: Bounds {
                        lower: Some(10.0 - w / 4.0),
                        upper: (i > 1).then_some(10.0 + w),
                    },
                }
            })
            .collect();
        m.limit = 1.2;
        m.decision = Decision::Fail;
        m.failed_at = Some(1_700_000_150);
        let html = render(&answer, &rows);
        let start = html
            .find("<div class=\"tail\" data-metric=\"p99\" data-endpoint=\"*\" data-points=\"20\">")
            .expect("a p99 chart");
        let end = start + html[start..].find("</figure>").expect("a figure");
        let chart = &html[start..end];
        assert!(chart.contains("<svg"), "{chart}");
        // Both cohorts' bands and bound lines, and both limits, dashed.
        for color in [CANARY_COLOR, BASELINE_COLOR] {
            assert!(
                chart.contains(&format!("<polygon fill=\"{color}\"")),
                "{chart}"
            );
            assert!(
                chart
                    .matches(&format!("<polyline fill=\"none\" stroke=\"{color}\""))
                    .count()
                    >= 2,
                "{chart}"
            );
        }
        assert_eq!(
            chart
                .matches(&format!(
                    "stroke=\"{LIMIT_COLOR}\" stroke-width=\"1.5\" stroke-dasharray"
                ))
                .count(),
            // The two limits (legend samples are wider).
            2,
            "{chart}"
        );
        assert!(
            chart.contains("fail line: 1.20 × baseline upper"),
            "{chart}"
        );
        assert!(chart.contains(">failed</text>"), "{chart}");
        assert!(chart.contains(">22:13:20</text>"), "clock ticks: {chart}");
        assert!(balanced(&html), "unbalanced markup");
    }
}
