//! `--sweep KEY=V1,V2,...`: one load per value of `connections`, `recipients`
//! or `size`, everything else the same; the results as a CSV and as an SVG
//! chart (throughput on the left axis, p99 latency on the right), the picture
//! a capacity planner puts in a report.
//!
//! The SVG is written by hand: plain elements, no scripts, no external fonts,
//! so it renders the same in a browser, `rsvg-convert` or a document.
//!
//! Must not: run loads itself (the caller runs them and hands the reports in).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::{LoadConfig, LoadReport};

/// What a sweep varies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Connections,
    Recipients,
    Size,
}

impl Key {
    pub fn name(self) -> &'static str {
        match self {
            Key::Connections => "connections",
            Key::Recipients => "recipients",
            Key::Size => "size",
        }
    }

    /// The throughput a planner cares about for this key, and its label.
    fn throughput(self, r: &LoadReport) -> f64 {
        match self {
            Key::Connections => r.messages_per_s(),
            Key::Recipients => r.recipients_per_s(),
            Key::Size => r.mb_per_s(),
        }
    }

    fn throughput_label(self) -> &'static str {
        match self {
            Key::Connections => "messages/s",
            Key::Recipients => "recipients/s",
            Key::Size => "MB/s",
        }
    }

    fn axis_label(self) -> &'static str {
        match self {
            Key::Connections => "connections",
            Key::Recipients => "recipients per message",
            Key::Size => "message size (bytes)",
        }
    }
}

/// A parsed `--sweep` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sweep {
    pub key: Key,
    pub values: Vec<u64>,
}

/// At most this many points (each is a whole load run).
pub const POINTS_MAX: usize = 32;

impl std::str::FromStr for Sweep {
    type Err = String;
    fn from_str(s: &str) -> Result<Sweep, String> {
        let usage = "give KEY=V1,V2,... with KEY connections, recipients or size, e.g. --sweep connections=1,4,16,64,256";
        let (k, vs) = s
            .split_once('=')
            .ok_or_else(|| format!("--sweep '{s}': {usage}"))?;
        let key = match k.trim() {
            "connections" => Key::Connections,
            "recipients" => Key::Recipients,
            "size" => Key::Size,
            other => return Err(format!("--sweep: unknown key '{other}'; {usage}")),
        };
        let values = vs
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("--sweep: '{v}' is not a whole number; {usage}"))
            })
            .collect::<Result<Vec<u64>, String>>()?;
        if values.is_empty() || values.len() > POINTS_MAX {
            return Err(format!("--sweep: give 1 to {POINTS_MAX} values; {usage}"));
        }
        Ok(Sweep { key, values })
    }
}

impl Sweep {
    /// The configuration for one point (checked by the caller via `check`).
    pub fn apply(&self, base: &LoadConfig, value: u64) -> LoadConfig {
        let mut c = base.clone();
        let v = value.min(usize::MAX as u64) as usize;
        match self.key {
            Key::Connections => {
                c.connections = v;
                // An explicit --threads above a small point is capped there.
                c.threads = c.threads.map(|t| t.min(v.max(1)));
            }
            Key::Recipients => c.recipients = v,
            Key::Size => c.sizes = vec![(v, 1)],
        }
        c
    }

    /// Checks every point's configuration before any load runs.
    pub fn check(&self, base: &LoadConfig) -> Result<(), String> {
        for &v in &self.values {
            self.apply(base, v)
                .check()
                .map_err(|e| format!("--sweep {}={v}: {e}", self.key.name()))?;
        }
        Ok(())
    }

    pub fn csv_path(&self, dir: &Path) -> PathBuf {
        dir.join(format!("sweep-{}.csv", self.key.name()))
    }

    pub fn svg_path(&self, dir: &Path) -> PathBuf {
        dir.join(format!("sweep-{}.svg", self.key.name()))
    }
}

/// One row per point: value, messages/s, recipients/s, MB/s, p50 and p99 (µs).
pub fn csv(key: Key, points: &[(u64, LoadReport)]) -> String {
    let mut s = format!(
        "{},messages_per_s,recipients_per_s,mb_per_s,p50_us,p99_us\n",
        key.name()
    );
    for (v, r) in points {
        let _ = writeln!(
            s,
            "{v},{:.1},{:.1},{:.3},{},{}",
            r.messages_per_s(),
            r.recipients_per_s(),
            r.mb_per_s(),
            r.latency_us.p50,
            r.latency_us.p99
        );
    }
    s
}

/// A "nice" axis: (step, top) with top = k * step >= max and step 1, 2 or 5
/// times a power of ten, for about `ticks` ticks.
pub fn nice_axis(max: f64, ticks: usize) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let raw = max / ticks.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((step), (max / step).ceil() * step)
}

/// A tick label in the axis' unit: every tick of an axis whose top is at
/// least 10,000 in k, at least 1,000,000 in M, so the labels line up
/// (0, 500k, 1000k, 1500k; 0, 0.5M, 1M, 1.5M).
fn tick_label(v: f64, top: f64) -> String {
    let (div, suffix) = if top >= 1e6 {
        (1e6, "M")
    } else if top >= 1e4 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    let x = v / div;
    if v == 0.0 {
        return "0".into();
    }
    let s = if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round() as i64)
    } else {
        format!("{x:.1}")
    };
    format!("{s}{suffix}")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The chart: x evenly spaced over the values (they are usually geometric,
/// like 1,4,16,64,256), throughput line and axis on the left, p99 latency
/// line and axis on the right, a title, a subtitle with the fixed settings, a
/// legend. `subtitle` describes what stayed the same.
pub fn svg(key: Key, points: &[(u64, LoadReport)], title: &str, subtitle: &str) -> String {
    const W: f64 = 860.0;
    const H: f64 = 500.0;
    const L: f64 = 90.0; // left margin: throughput ticks and label
    const R: f64 = 90.0; // right margin: latency ticks and label
    const T: f64 = 88.0; // title, subtitle, legend
    const B: f64 = 70.0; // x ticks and label
    const TPUT: &str = "#1f77b4";
    const LAT: &str = "#d62728";
    let pw = W - L - R;
    let ph = H - T - B;
    let n = points.len().max(1);
    let x_at = |i: usize| {
        if n == 1 {
            L + pw / 2.0
        } else {
            L + pw * (0.05 + 0.9 * i as f64 / (n - 1) as f64)
        }
    };
    let tput: Vec<f64> = points.iter().map(|(_, r)| key.throughput(r)).collect();
    // Latency in milliseconds when it is large, else microseconds.
    let p99_us: Vec<f64> = points
        .iter()
        .map(|(_, r)| r.latency_us.p99 as f64)
        .collect();
    let p99_max = p99_us.iter().copied().fold(0.0, f64::max);
    let (lat_div, lat_unit) = if p99_max >= 10_000.0 {
        (1000.0, "ms")
    } else {
        (1.0, "µs")
    };
    let lat: Vec<f64> = p99_us.iter().map(|v| v / lat_div).collect();
    let (t_step, t_top) = nice_axis(tput.iter().copied().fold(0.0, f64::max), 5);
    let (l_step, l_top) = nice_axis(lat.iter().copied().fold(0.0, f64::max), 5);
    let y_t = |v: f64| T + ph - ph * v / t_top;
    let y_l = |v: f64| T + ph - ph * v / l_top;

    let mut s = String::with_capacity(8192);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="DejaVu Sans, Arial, Helvetica, sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="26" text-anchor="middle" font-size="18" font-weight="bold">{}</text>"#,
        W / 2.0,
        esc(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="45" text-anchor="middle" font-size="12" fill="#444">{}</text>"##,
        W / 2.0,
        esc(subtitle)
    );
    // Grid and left ticks.
    let mut v = 0.0;
    while v <= t_top + t_step / 2.0 {
        let y = y_t(v);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/>"##,
            L + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="{TPUT}">{}</text>"#,
            L - 8.0,
            y + 4.0,
            tick_label(v, t_top)
        );
        v += t_step;
    }
    // Right ticks.
    let mut v = 0.0;
    while v <= l_top + l_step / 2.0 {
        let y = y_l(v);
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{LAT}"/>"#,
            L + pw,
            L + pw + 5.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" fill="{LAT}">{}</text>"#,
            L + pw + 8.0,
            y + 4.0,
            tick_label(v, l_top)
        );
        v += l_step;
    }
    // Axes.
    let _ = writeln!(
        s,
        r#"<line x1="{L}" y1="{T}" x2="{L}" y2="{:.1}" stroke="{TPUT}" stroke-width="1.5"/>"#,
        T + ph
    );
    let _ = writeln!(
        s,
        r#"<line x1="{:.1}" y1="{T}" x2="{:.1}" y2="{:.1}" stroke="{LAT}" stroke-width="1.5"/>"#,
        L + pw,
        L + pw,
        T + ph
    );
    let _ = writeln!(
        s,
        r#"<line x1="{L}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black" stroke-width="1.5"/>"#,
        T + ph,
        L + pw,
        T + ph
    );
    // X ticks.
    for (i, (val, _)) in points.iter().enumerate() {
        let x = x_at(i);
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="black"/>"#,
            T + ph,
            T + ph + 5.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{val}</text>"#,
            T + ph + 20.0
        );
    }
    // Axis labels.
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        L + pw / 2.0,
        H - 22.0,
        esc(key.axis_label())
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(24,{:.1}) rotate(-90)" text-anchor="middle" fill="{TPUT}">throughput ({})</text>"#,
        T + ph / 2.0,
        key.throughput_label()
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate({:.1},{:.1}) rotate(90)" text-anchor="middle" fill="{LAT}">p99 latency, final dot to last reply ({lat_unit})</text>"#,
        W - 24.0,
        T + ph / 2.0
    );
    // Series: a polyline each, with markers.
    let series = |s: &mut String, ys: &[f64], y: &dyn Fn(f64) -> f64, color: &str, dash: &str| {
        let pts: Vec<String> = ys
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x_at(i), y(*v)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2.5"{dash} points="{}"/>"#,
            pts.join(" ")
        );
        for (i, v) in ys.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{color}"/>"#,
                x_at(i),
                y(*v)
            );
        }
    };
    series(&mut s, &tput, &y_t, TPUT, "");
    series(&mut s, &lat, &y_l, LAT, r#" stroke-dasharray="7,4""#);
    // Legend: one row in the top margin, above the plot, so it never hides
    // a point.
    let lx = L + pw / 2.0 - 250.0;
    let ly = 65.0;
    legend_item(
        &mut s,
        lx,
        ly,
        TPUT,
        "",
        &format!("throughput ({}, left axis)", key.throughput_label()),
    );
    legend_item(
        &mut s,
        lx + 270.0,
        ly,
        LAT,
        r#" stroke-dasharray="7,4""#,
        &format!("p99 latency ({lat_unit}, right axis)"),
    );
    s.push_str("</svg>\n");
    s
}

/// One legend entry: a line sample with a point on it, then its label.
fn legend_item(s: &mut String, x: f64, y: f64, color: &str, dash: &str, label: &str) {
    let _ = writeln!(
        s,
        r#"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="2.5"{dash}/>"#,
        x + 30.0
    );
    let _ = writeln!(
        s,
        r#"<circle cx="{:.1}" cy="{y:.1}" r="4" fill="{color}"/>"#,
        x + 15.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}">{label}</text>"#,
        x + 38.0,
        y + 4.0
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::tally::Tally;

    fn report(msgs: u64, p99: u64) -> LoadReport {
        let cfg = LoadConfig::new("127.0.0.1:1".parse().unwrap());
        let mut t = Tally {
            messages: msgs,
            recipients: msgs,
            bytes: msgs * 4096,
            ..Default::default()
        };
        t.latency.record_us(p99);
        LoadReport::new(&cfg, 1, &t, 1.0, 0, Vec::new())
    }

    #[test]
    fn sweep_argument_parses_and_refuses() {
        let s: Sweep = "connections=1,4,16".parse().unwrap();
        assert_eq!((s.key, s.values), (Key::Connections, vec![1, 4, 16]));
        assert!("size=100,x".parse::<Sweep>().unwrap_err().contains("'x'"));
        assert!(
            "threads=1"
                .parse::<Sweep>()
                .unwrap_err()
                .contains("unknown key")
        );
        assert!("connections".parse::<Sweep>().is_err());
        let base = LoadConfig::new("127.0.0.1:1".parse().unwrap());
        let e = "recipients=1,5000"
            .parse::<Sweep>()
            .unwrap()
            .check(&base)
            .unwrap_err();
        assert!(
            e.contains("--sweep recipients=5000") && e.contains("--recipients 5000"),
            "{e}"
        );
    }

    #[test]
    fn nice_axes() {
        assert_eq!(nice_axis(87_000.0, 5), (20_000.0, 100_000.0));
        assert_eq!(nice_axis(9.0, 5), (2.0, 10.0));
        assert_eq!(nice_axis(0.0, 5), (0.2, 1.0));
        assert_eq!(tick_label(20_000.0, 100_000.0), "20k");
        assert_eq!(tick_label(1500.0, 2000.0), "1500");
        assert_eq!(tick_label(500_000.0, 1_500_000.0), "0.5M");
        assert_eq!(tick_label(0.0, 1_500_000.0), "0");
        assert_eq!(tick_label(0.4, 1.0), "0.4");
    }

    #[test]
    fn csv_and_svg() {
        let points = vec![
            (1, report(1000, 100)),
            (4, report(4000, 300)),
            (16, report(9000, 2000)),
        ];
        let c = csv(Key::Connections, &points);
        let lines: Vec<&str> = c.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[0],
            "connections,messages_per_s,recipients_per_s,mb_per_s,p50_us,p99_us"
        );
        assert!(
            lines[2].starts_with("4,4000.0,4000.0,16.384,"),
            "{}",
            lines[2]
        );
        let svg = svg(Key::Connections, &points, "title <x>", "sub");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("title &lt;x&gt;"));
        assert!(svg.contains("p99 latency"));
        // Three points per series, plus one marker per legend entry.
        assert_eq!(svg.matches("<circle").count(), 8);
    }
}
