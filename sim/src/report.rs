//! Results of an experiment: per-configuration JSON lines, a summary CSV (one row per
//! configuration), plots as PNG and SVG (accuracy per round; accuracy against epsilon),
//! and a short table for the terminal.

use crate::experiment::Configuration;
use crate::run::RunResult;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::io::Write;
use std::path::Path;

/// A finished configuration.
pub struct Finished {
    /// The configuration.
    pub config: Configuration,
    /// Its result.
    pub result: RunResult,
    /// Peak resident memory of the process so far, MiB.
    pub peak_rss_mib: Option<f64>,
}

/// Peak resident set size of this process (VmHWM), MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or(String::new(), |x| format!("{x:.digits$}"))
}

/// Writes `<id>.jsonl` for one configuration.
pub fn write_rounds(dir: &Path, f: &Finished) -> std::io::Result<()> {
    let mut out = std::fs::File::create(dir.join(format!("{}.jsonl", f.config.id)))?;
    for r in &f.result.rows {
        let mut v = serde_json::to_value(r).map_err(std::io::Error::other)?;
        v["config"] = f.config.id.clone().into();
        v["label"] = f.config.label.clone().into();
        writeln!(out, "{v}")?;
    }
    Ok(())
}

/// Header of `summary.csv`.
pub const CSV_HEADER: &str = "config,label,transport,clients,dp_mode,noise_multiplier,sampling_rate,rounds,final_accuracy,best_accuracy,epsilon,epsilon_max_client,epsilon_server,delta,epsilon_empirical,epsilon_lower_bound,audit_flagged,seconds,peak_rss_mib,finish";

/// Writes `summary.csv`.
pub fn write_summary(dir: &Path, all: &[Finished]) -> std::io::Result<()> {
    let mut out = std::fs::File::create(dir.join("summary.csv"))?;
    writeln!(out, "{CSV_HEADER}")?;
    for f in all {
        let c = &f.config.config;
        let r = &f.result;
        writeln!(
            out,
            "{},\"{}\",{:?},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.1},{},\"{}\"",
            f.config.id,
            f.config.label.replace('"', "'"),
            c.transport,
            r.clients,
            c.dp.mode,
            if c.dp.mode.is_private() {
                c.dp.noise_multiplier.to_string()
            } else {
                String::new()
            },
            if c.dp.mode.is_private() {
                c.dp.sampling_rate.to_string()
            } else {
                String::new()
            },
            r.rounds,
            opt(r.final_accuracy(), 4),
            opt(r.best_accuracy(), 4),
            opt(r.epsilon, 4),
            opt(r.epsilon_max_client, 4),
            opt(r.epsilon_server, 4),
            r.delta.map_or(String::new(), |d| format!("{d:e}")),
            opt(r.audit.and_then(|a| a.epsilon_estimate), 4),
            opt(r.audit.map(|a| a.epsilon_lower_bound), 4),
            r.audit.map_or(String::new(), |a| a.flagged.to_string()),
            r.seconds,
            opt(f.peak_rss_mib, 0),
            r.finish.replace('"', "'"),
        )?;
    }
    Ok(())
}

/// A terminal table.
pub fn table(all: &[Finished]) -> String {
    let mut s = format!(
        "{:<5} {:<40} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8}\n",
        "cfg",
        "label",
        "clients",
        "rounds",
        "final",
        "epsilon",
        "eps_srv",
        "empirical",
        "seconds",
        "rss_mib"
    );
    for f in all {
        let r = &f.result;
        let label: String = if f.config.label.is_empty() {
            f.config.config.name.clone()
        } else {
            f.config.label.clone()
        };
        let label: String = label.chars().take(40).collect();
        s.push_str(&format!(
            "{:<5} {:<40} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8.1} {:>8}\n",
            f.config.id,
            label,
            r.clients,
            r.rounds,
            opt(r.final_accuracy(), 4),
            opt(r.epsilon, 3),
            opt(r.epsilon_server, 3),
            opt(r.audit.and_then(|a| a.epsilon_estimate), 3),
            r.seconds,
            opt(f.peak_rss_mib, 0),
        ));
    }
    s
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

fn label_of(f: &Finished) -> String {
    if f.config.label.is_empty() {
        f.config.id.clone()
    } else {
        format!("{} {}", f.config.id, f.config.label)
    }
}

fn accuracy_chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    all: &[Finished],
) -> PlotResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let max_round = all
        .iter()
        .map(|f| f.result.rounds)
        .max()
        .unwrap_or(1)
        .max(1);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0u64..max_round, 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("test accuracy")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, f) in all.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(u64, f64)> = f
            .result
            .rows
            .iter()
            .filter_map(|r| r.test_accuracy.map(|a| (r.round, a)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(label_of(f))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn frontier_chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    all: &[Finished],
) -> PlotResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let mut pts: Vec<(f64, f64, String)> = all
        .iter()
        .filter_map(|f| {
            Some((
                f.result.epsilon?,
                f.result.final_accuracy()?,
                f.config.id.clone(),
            ))
        })
        .filter(|(e, _, _)| e.is_finite())
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let max_eps = pts.iter().map(|p| p.0).fold(1.0f64, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..max_eps, 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("epsilon (delta as configured)")
        .y_desc("final test accuracy")
        .label_style(("sans-serif", 14))
        .draw()?;
    chart.draw_series(LineSeries::new(
        pts.iter().map(|p| (p.0, p.1)),
        BLUE.stroke_width(2),
    ))?;
    chart.draw_series(
        pts.iter()
            .map(|p| Circle::new((p.0, p.1), 5, BLUE.filled())),
    )?;
    chart.draw_series(pts.iter().map(|p| {
        Text::new(
            p.2.clone(),
            (p.0, p.1 + 0.03),
            ("sans-serif", 13).into_font(),
        )
    }))?;
    // Empirical estimates of audited runs, next to the theoretical points (red crosses).
    let emp: Vec<(f64, f64)> = all
        .iter()
        .filter_map(|f| {
            Some((
                f.result.audit?.epsilon_estimate?,
                f.result.final_accuracy()?,
            ))
        })
        .filter(|(e, _)| e.is_finite() && *e <= max_eps)
        .collect();
    if !emp.is_empty() {
        chart
            .draw_series(emp.iter().map(|p| Cross::new(*p, 6, RED.stroke_width(2))))?
            .label("empirical estimate (canaries)")
            .legend(|(x, y)| Cross::new((x, y), 5, RED.stroke_width(2)));
        chart
            .draw_series(std::iter::once(Circle::new((-1.0, -1.0), 0, BLUE.filled())))?
            .label("theoretical (accountant)")
            .legend(|(x, y)| Circle::new((x, y), 5, BLUE.filled()));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Distributed DP: final accuracy against the ring width, one line per mechanism, with
/// every central-DP configuration of the same experiment as a dashed reference line.
fn bits_chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    all: &[Finished],
) -> PlotResult
where
    DB::ErrorType: 'static,
{
    use dpfl_common::DpMode;
    root.fill(&WHITE)?;
    let mut series: std::collections::BTreeMap<String, Vec<(u32, f64)>> = Default::default();
    for f in all {
        let c = &f.config.config;
        if c.dp.mode != DpMode::Distributed {
            continue;
        }
        if let Some(a) = f.result.final_accuracy() {
            series
                .entry(c.secagg.mechanism.to_string())
                .or_default()
                .push((u32::from(c.secagg.bits), a));
        }
    }
    let bits: Vec<u32> = series.values().flatten().map(|p| p.0).collect();
    let (lo, hi) = (
        bits.iter().min().copied().unwrap_or(8).saturating_sub(1),
        bits.iter().max().copied().unwrap_or(32) + 1,
    );
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(lo..hi, 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("bits per coordinate (secure-aggregation ring)")
        .y_desc("final test accuracy")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, (mechanism, mut pts)) in series.into_iter().enumerate() {
        pts.sort_by_key(|p| p.0);
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(format!("distributed DP, {mechanism}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    for f in all {
        if f.config.config.dp.mode != DpMode::Central {
            continue;
        }
        let Some(a) = f.result.final_accuracy() else {
            continue;
        };
        let dashes: Vec<(u32, f64)> = (lo..=hi).map(|b| (b, a)).collect();
        chart
            .draw_series(
                dashes
                    .chunks(2)
                    .filter(|c| c.len() == 2)
                    .map(|c| PathElement::new(vec![c[0], c[1]], BLACK.stroke_width(1))),
            )?
            .label(format!("central DP ({})", label_of(f)))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes `accuracy.{png,svg}`; when any configuration is private, `frontier.{png,svg}`;
/// when any uses distributed DP, `bits.{png,svg}` (accuracy against the ring width).
pub fn write_plots(dir: &Path, name: &str, all: &[Finished]) -> PlotResult {
    register_font();
    let title = format!("{name}: test accuracy per round");
    accuracy_chart(
        &BitMapBackend::new(&dir.join("accuracy.png"), (960, 600)).into_drawing_area(),
        &title,
        all,
    )?;
    accuracy_chart(
        &SVGBackend::new(&dir.join("accuracy.svg"), (960, 600)).into_drawing_area(),
        &title,
        all,
    )?;
    if all.iter().any(|f| f.result.epsilon.is_some()) {
        let title = format!("{name}: accuracy vs epsilon");
        frontier_chart(
            &BitMapBackend::new(&dir.join("frontier.png"), (960, 600)).into_drawing_area(),
            &title,
            all,
        )?;
        frontier_chart(
            &SVGBackend::new(&dir.join("frontier.svg"), (960, 600)).into_drawing_area(),
            &title,
            all,
        )?;
    }
    if all
        .iter()
        .any(|f| f.config.config.dp.mode == dpfl_common::DpMode::Distributed)
    {
        let title = format!("{name}: accuracy vs bits per coordinate");
        bits_chart(
            &BitMapBackend::new(&dir.join("bits.png"), (960, 600)).into_drawing_area(),
            &title,
            all,
        )?;
        bits_chart(
            &SVGBackend::new(&dir.join("bits.svg"), (960, 600)).into_drawing_area(),
            &title,
            all,
        )?;
    }
    Ok(())
}
