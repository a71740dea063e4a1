//! Line charts as standalone SVG: axes with round ticks, one polyline per series, a legend.
//! Hand-written (≈150 lines) rather than plotters: the report needs only this, and it keeps
//! the build lean on a 2-core machine.

use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 300.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 40.0;
const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

/// How the x axis maps values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum XScale {
    Linear,
    /// Percentiles 0–100, spread as HdrHistogram plots them: 90, 99, 99.9 … equally apart.
    Percentile,
}

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub x_scale: XScale,
    pub series: Vec<Series>,
}

/// `100 / (100 - p)` on a log scale, capped at 99.9999.
fn percentile_x(p: f64) -> f64 {
    (100.0 / (100.0 - p.clamp(0.0, 99.9999))).log10()
}

/// About five round steps from 0 to at least `max`.
pub fn ticks(max: f64) -> Vec<f64> {
    if !(max > 0.0 && max.is_finite()) {
        return vec![0.0, 1.0];
    }
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * magnitude).find(|s| *s >= raw).unwrap_or(10.0 * magnitude);
    let n = (max / step).ceil() as usize;
    (0..=n.max(1)).map(|i| i as f64 * step).collect()
}

/// `&`, `<`, `>` and quotes made safe for XML text and attributes.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

fn label(v: f64) -> String {
    if v == 0.0 || (v.abs() >= 0.01 && v.abs() < 1e6) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        format!("{v:.1e}")
    }
}

impl Chart<'_> {
    pub fn render(&self) -> String {
        let points = self.series.iter().flat_map(|s| s.points.iter());
        let (x_max, y_max) = points.fold((0f64, 0f64), |(x, y), p| (x.max(p.0), y.max(p.1)));
        let y_ticks = ticks(y_max);
        let y_top = *y_ticks.last().expect("at least two ticks");
        let (x_ticks, to_x): (Vec<f64>, fn(f64) -> f64) = match self.x_scale {
            XScale::Linear => (ticks(x_max), |x| x),
            XScale::Percentile => {
                let shown: Vec<f64> = [0.0, 90.0, 99.0, 99.9, 99.99, 99.999, 99.9999]
                    .into_iter()
                    .filter(|p| *p <= x_max.max(99.0))
                    .collect();
                (shown, percentile_x)
            }
        };
        let (x_lo, x_hi) = (to_x(x_ticks[0]), to_x(*x_ticks.last().expect("ticks")));
        let span = if x_hi > x_lo { x_hi - x_lo } else { 1.0 };
        let px = |x: f64| LEFT + (to_x(x) - x_lo) / span * (W - LEFT - RIGHT);
        let py = |y: f64| H - BOTTOM - y / y_top * (H - TOP - BOTTOM);

        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" font-family="sans-serif" font-size="11">"#
        );
        let _ =
            write!(svg, r#"<text x="{LEFT}" y="16" font-size="13" font-weight="bold">{}</text>"#, escape(self.title));
        for y in &y_ticks {
            let at = py(*y);
            let _ = write!(
                svg,
                r##"<line x1="{LEFT}" x2="{}" y1="{at:.1}" y2="{at:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - RIGHT,
                LEFT - 4.0,
                at + 4.0,
                label(*y)
            );
        }
        for x in &x_ticks {
            let at = px(*x);
            let _ = write!(
                svg,
                r##"<line x1="{at:.1}" x2="{at:.1}" y1="{TOP}" y2="{}" stroke="#eee"/><text x="{at:.1}" y="{}" text-anchor="middle">{}</text>"##,
                H - BOTTOM,
                H - BOTTOM + 14.0,
                label(*x)
            );
        }
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{b}" stroke="#333"/><line x1="{LEFT}" x2="{}" y1="{b}" y2="{b}" stroke="#333"/>"##,
            W - RIGHT,
            b = H - BOTTOM
        );
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text><text transform="translate(14 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
            (LEFT + W - RIGHT) / 2.0,
            H - 6.0,
            escape(self.x_label),
            (TOP + H - BOTTOM) / 2.0,
            escape(self.y_label)
        );
        for (i, s) in self.series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let path: Vec<String> = s.points.iter().map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))).collect();
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{}"><title>{}</title></polyline>"#,
                path.join(" "),
                escape(&s.name)
            );
            let ly = TOP + 4.0 + 14.0 * i as f64;
            let _ = write!(
                svg,
                r#"<rect x="{}" y="{:.1}" width="10" height="3" fill="{colour}"/><text x="{}" y="{:.1}">{}</text>"#,
                W - RIGHT - 150.0,
                ly,
                W - RIGHT - 136.0,
                ly + 4.0,
                escape(&s.name)
            );
        }
        svg.push_str("</svg>");
        svg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_ticks_cover_the_maximum() {
        let rounded = |max: f64| ticks(max).iter().map(|t| (t * 1e9).round() / 1e9).collect::<Vec<_>>();
        assert_eq!(rounded(10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(rounded(0.9), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_eq!(*ticks(12_345.0).last().unwrap(), 12_500.0);
        assert_eq!(ticks(0.0), vec![0.0, 1.0]);
        assert_eq!(ticks(f64::NAN), vec![0.0, 1.0]);
    }

    #[test]
    fn percentiles_are_spread_by_nines() {
        let step = |a: f64, b: f64| percentile_x(b) - percentile_x(a);
        assert!((step(90.0, 99.0) - 1.0).abs() < 1e-9 && (step(99.0, 99.9) - 1.0).abs() < 1e-9);
        assert!(percentile_x(100.0).is_finite());
    }

    #[test]
    fn a_chart_is_well_formed_svg_with_its_series() {
        let chart = Chart {
            title: "latency <p50> & more",
            x_label: "percentile",
            y_label: "ms",
            x_scale: XScale::Percentile,
            series: vec![
                Series { name: "run \"1\"".into(), points: vec![(0.0, 0.5), (50.0, 1.0), (99.9, 4.0), (100.0, 9.0)] },
                Series { name: "empty".into(), points: vec![] },
            ],
        };
        let svg = chart.render();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("latency &lt;p50&gt; &amp; more") && svg.contains("run &quot;1&quot;"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        // The tallest point sits on the plot's top tick (10 ms), the smallest x on the left edge.
        assert!(svg.contains(&format!("{LEFT:.1},")), "{svg}");
    }
}
