//! Latency-percentile plots: one SVG per latency workload, one line per target, percentiles on a
//! "nines" axis (p50, p90, p99, p99.9, ...) and latency on a log axis.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::report::{Report, WorkloadInfo};

/// One colour per target, the same in every plot and every run.
fn color(target: &str) -> RGBColor {
    match target {
        "direct" => RGBColor(0, 0, 0),
        "gateway" => RGBColor(214, 39, 40),
        "gateway-observe" => RGBColor(255, 127, 14),
        "gateway-policy" => RGBColor(148, 103, 189),
        "gateway-pooled" => RGBColor(23, 190, 207),
        "gateway-record" => RGBColor(227, 119, 194),
        "gateway-redirect" => RGBColor(140, 86, 75),
        "haproxy" => RGBColor(31, 119, 180),
        "pgbouncer" => RGBColor(44, 160, 44),
        "relay" => RGBColor(188, 189, 34),
        _ => RGBColor(127, 127, 127),
    }
}

/// Writes `<workload id>.svg` for each workload that has percentile curves.
pub fn write_all(report: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for w in &report.workloads {
        let series: Vec<Series> = report
            .targets
            .iter()
            .filter_map(|t| {
                let c = t.results.get(&w.id)?;
                (!c.percentiles.is_empty()).then_some(Series {
                    color: color(&t.name),
                    name: &t.name,
                    curve: &c.percentiles,
                })
            })
            .collect();
        if series.is_empty() {
            continue;
        }
        let path = dir.join(format!("{}.svg", w.id));
        draw(&path, w, &series).map_err(|e| anyhow!("plotting {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// One target's line: its colour stays the same in every plot.
struct Series<'a> {
    color: RGBColor,
    name: &'a str,
    /// (percentile, µs), the last point being the maximum.
    curve: &'a [(f64, f64)],
}

/// Percentile to the nines axis: 50 → 0.3, 90 → 1, 99 → 2, 99.9 → 3.
fn nines(percentile: f64) -> f64 {
    let rest = (1.0 - percentile / 100.0).max(1e-7);
    -rest.log10()
}

/// Up to two decimals, without trailing zeros: 100, 2.5, 0.25.
fn trimmed(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn draw(
    path: &Path,
    w: &WorkloadInfo,
    series: &[Series],
) -> Result<(), Box<dyn std::error::Error>> {
    let values = series.iter().flat_map(|s| s.curve.iter().map(|p| p.1));
    let (lo, hi) = values.fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let x_max = series
        .iter()
        .flat_map(|s| s.curve.iter().rev().nth(1).map(|p| nines(p.0)))
        .fold(1.0f64, f64::max)
        .ceil();
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&w.title, ("sans-serif", 20))
        .margin(16)
        .margin_right(40)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, ((lo * 0.8).max(0.1)..hi * 1.25).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency")
        .x_labels(x_max as usize + 1)
        .x_label_formatter(&|x| match x.round() as i64 {
            0 => "p0".into(),
            1 => "p90".into(),
            n => format!("p99.{}", "9".repeat((n - 2) as usize))
                .trim_end_matches('.')
                .to_string(),
        })
        .y_label_formatter(&|&y| {
            if y >= 1000.0 {
                format!("{} ms", trimmed(y / 1000.0))
            } else {
                format!("{} µs", trimmed(y))
            }
        })
        .draw()?;
    for s in series {
        let (color, curve) = (s.color, s.curve);
        // The final point is the maximum, drawn at the right edge.
        let points = curve.iter().enumerate().map(|(k, &(p, v))| {
            let x = if k + 1 == curve.len() {
                x_max
            } else {
                nines(p).min(x_max)
            };
            (x, v)
        });
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::nines;

    #[test]
    fn axis_labels_drop_trailing_zeros() {
        assert_eq!(super::trimmed(100.0), "100");
        assert_eq!(super::trimmed(2.5), "2.5");
        assert_eq!(super::trimmed(0.25), "0.25");
    }

    #[test]
    fn the_nines_axis_puts_p99_at_two() {
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.0) - 2.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert!(nines(0.0).abs() < 1e-9);
    }
}
