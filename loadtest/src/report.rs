//! The HTML report: one self-contained page (inline SVG, no scripts, no network) with an
//! overview table of every run, then per run its figures, its latency distribution, its
//! throughput over time and, when sampled, its processes' memory over time.

use std::fmt::Write;

use crate::{
    stats::Summary,
    svg::{escape, Chart, Series, XScale},
};

/// The summaries in a JSON-lines text; blank lines are skipped, a bad line is named.
pub fn parse_lines(text: &str) -> Result<Vec<Summary>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: not a loadtest summary: {e}", i + 1)))
        .collect()
}

/// A short label of a run's parameters, e.g. `c=64 n=10000 body=100B via=longpoll`.
fn params(s: &Summary) -> String {
    let p = &s.params;
    let mut out = format!("c={} n={}", p["clients"], p["count"]);
    if let Some(b) = p["body_bytes"].as_u64() {
        out += &if b >= 1 << 20 { format!(" body={}MiB", b >> 20) } else { format!(" body={b}B") };
    }
    if let Some(via) = p["via"].as_str() {
        out += &format!(" via={via}");
    }
    match s.scenario.as_str() {
        "soak" => out += &format!(" rate={}/s", p["rate"]),
        "fanout" => out += &format!(" recipients={}", p["recipients"]),
        "expiry" => out += &format!(" ttl={}", p["ttl"].as_str().unwrap_or("?")),
        _ => {}
    }
    out
}

fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.1}")
    }
}

pub fn render(title: &str, runs: &[Summary]) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{t}</title><style>
body{{font-family:sans-serif;margin:2em;max-width:1400px;color:#222}}
table{{border-collapse:collapse;margin:.5em 0 1em}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f4f4f4}}td:first-child,th:first-child{{text-align:left}}.bad{{color:#b00;font-weight:bold}}
.charts{{display:flex;flex-wrap:wrap;gap:12px}}section{{border-top:2px solid #eee;margin-top:1.5em}}
</style></head><body><h1>{t}</h1>"#,
        t = escape(title)
    );
    let _ = write!(
        html,
        "<table><tr><th>#</th><th>scenario</th><th>parameters</th><th>ok</th><th>errors</th><th>per second</th>\
         <th>p50 ms</th><th>p99 ms</th><th>max ms</th></tr>"
    );
    for (i, s) in runs.iter().enumerate() {
        let errors: u64 = s.errors.values().sum();
        let l = s.latency_ms.as_ref();
        let _ = write!(
            html,
            r##"<tr><td><a href="#run{i}">{n}</a></td><td>{sc}</td><td>{p}</td><td>{ok}</td><td{bad}>{errors}</td><td>{ps:.0}</td><td>{p50}</td><td>{p99}</td><td>{max}</td></tr>"##,
            n = i + 1,
            sc = escape(&s.scenario),
            p = escape(&params(s)),
            ok = s.ok,
            bad = if errors > 0 { r#" class="bad""# } else { "" },
            ps = s.per_s,
            p50 = l.map_or("–".into(), |l| ms(l.p50)),
            p99 = l.map_or("–".into(), |l| ms(l.p99)),
            max = l.map_or("–".into(), |l| ms(l.max)),
        );
    }
    html.push_str("</table>");
    for (i, s) in runs.iter().enumerate() {
        run_section(&mut html, i, s);
    }
    html.push_str("</body></html>\n");
    html
}

fn run_section(html: &mut String, i: usize, s: &Summary) {
    let _ = write!(
        html,
        r#"<section id="run{i}"><h2>{n}. {sc} <small>{p}</small></h2>"#,
        n = i + 1,
        sc = escape(&s.scenario),
        p = escape(&params(s))
    );
    let _ = write!(html, "<table><tr><th>measure</th><th>value</th></tr>");
    let mut row = |k: &str, v: String| {
        let _ = write!(html, "<tr><td>{}</td><td>{}</td></tr>", escape(k), escape(&v));
    };
    row("succeeded", s.ok.to_string());
    row("elapsed", format!("{:.2} s", s.elapsed_s));
    row("per second", format!("{:.0}", s.per_s));
    for (status, n) in &s.errors {
        row(&format!("errors: {status}"), n.to_string());
    }
    if let Some(l) = &s.latency_ms {
        for (k, v) in
            [("p50", l.p50), ("p90", l.p90), ("p99", l.p99), ("p99.9", l.p999), ("max", l.max), ("mean", l.mean)]
        {
            row(&format!("latency {k}"), format!("{} ms", ms(v)));
        }
    }
    for (k, v) in &s.figures {
        row(k, v.to_string());
    }
    for (name, m) in &s.memory {
        row(
            &format!("memory: {name}"),
            format!("{} → {} KiB, peak {} KiB (high-water {} KiB)", m.start_kib, m.end_kib, m.peak_kib, m.hwm_kib),
        );
    }
    html.push_str("</table><div class=\"charts\">");
    if !s.distribution.is_empty() {
        let chart = Chart {
            title: "Latency by percentile",
            x_label: "percentile",
            y_label: "ms",
            x_scale: XScale::Percentile,
            series: vec![Series { name: s.scenario.clone(), points: s.distribution.clone() }],
        };
        html.push_str(&chart.render());
    }
    if !s.per_second.is_empty() {
        let points = s.per_second.iter().enumerate().map(|(t, n)| (t as f64 + 0.5, *n as f64)).collect();
        let chart = Chart {
            title: "Throughput over time",
            x_label: "second of the run",
            y_label: "per second",
            x_scale: XScale::Linear,
            series: vec![Series { name: "succeeded".into(), points }],
        };
        html.push_str(&chart.render());
    }
    if s.memory.values().any(|m| !m.series.is_empty()) {
        let series = s
            .memory
            .iter()
            .map(|(name, m)| Series {
                name: name.clone(),
                points: m.series.iter().map(|(t, kib)| (*t, *kib as f64 / 1024.0)).collect(),
            })
            .collect();
        let chart =
            Chart { title: "Resident memory", x_label: "seconds", y_label: "MiB", x_scale: XScale::Linear, series };
        html.push_str(&chart.render());
    }
    html.push_str("</div></section>");
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;
    use crate::{memory::Memory, stats::Recorder};

    fn a_run(scenario: &str) -> Summary {
        let rec = Arc::new(Recorder::new());
        for ms in 1..=200u64 {
            rec.ok(Duration::from_micros(ms * 37));
        }
        rec.error("503");
        rec.figure("events_lost", 0);
        let mut s = rec
            .summary(scenario, serde_json::json!({"clients": 64, "count": 200, "body_bytes": 1 << 20, "via": "sse"}));
        s.memory.insert(
            "broker".into(),
            Memory {
                pid: 1,
                start_kib: 9000,
                end_kib: 9500,
                peak_kib: 12000,
                hwm_kib: 13000,
                series: vec![(0.0, 9000), (0.1, 12000)],
            },
        );
        s
    }

    #[test]
    fn summaries_survive_the_json_lines_round_trip() {
        let lines =
            [a_run("sse"), a_run("large")].iter().map(|s| serde_json::to_string(s).unwrap()).collect::<Vec<_>>();
        let parsed = parse_lines(&format!("{}\n\n{}\n", lines[0], lines[1])).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!((parsed[1].scenario.as_str(), parsed[1].ok), ("large", 200));
        assert_eq!(parsed[0].memory["broker"].peak_kib, 12000);
        assert_eq!(parsed[0].distribution.len(), a_run("x").distribution.len());
        let err = parse_lines(&format!("{}\nnot json\n", lines[0])).unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
    }

    #[test]
    fn the_report_has_a_table_and_charts_per_run() {
        let html = render("Photon <nightly>", &[a_run("sse"), a_run("roundtrip")]);
        assert!(html.starts_with("<!doctype html>") && html.trim_end().ends_with("</html>"));
        assert!(html.contains("Photon &lt;nightly&gt;") && !html.contains("<nightly>"));
        assert!(html.contains(r##"<a href="#run1">2</a>"##) && html.contains(r#"id="run1""#));
        assert!(html.contains("c=64 n=200 body=1MiB via=sse"), "parameters shown");
        // Three charts per run: latency distribution, throughput, memory.
        assert_eq!(html.matches("<svg").count(), 6);
        assert!(html.contains("Latency by percentile") && html.contains("Resident memory"));
        assert!(html.contains(r#"class="bad">1<"#), "errors stand out");
        assert!(!html.contains("<script"), "a static page");
    }

    #[test]
    fn an_empty_run_renders_without_charts() {
        let s = Recorder::new().summary("create", serde_json::json!({"clients": 1, "count": 1}));
        let html = render("t", &[s]);
        assert_eq!(html.matches("<svg").count(), 0);
        assert!(html.contains("<td>–</td>"));
    }
}
