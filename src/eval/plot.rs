//! PNG charts for the evaluation report and the layer-wise probe analysis.
//!
//! Charts are drawn with `plotters` into an RGB buffer and encoded with `png`, so nothing
//! here needs a system library or a system font: text is rasterised by `ab_glyph` from
//! DejaVu Sans as embedded by the `dejavu` crate (Bitstream Vera licence, see NOTICE).
//! The file name's extension does not matter; the output is always PNG.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, KeyPointWeight};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Image size of every chart, in pixels.
pub const WIDTH: u32 = 1000;
/// Image size of every chart, in pixels.
pub const HEIGHT: u32 = 500;

/// The family name plotters uses by default for captions, labels and legends; the
/// embedded font is registered under it so every text element finds it.
const FONT: &str = "sans-serif";

/// Okabe–Ito colours (distinguishable with the common colour-vision deficiencies),
/// ordered for contrast on white; the yellow comes last. Cycles past eight.
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),   // blue
    RGBColor(213, 94, 0),    // vermillion
    RGBColor(0, 158, 115),   // bluish green
    RGBColor(204, 121, 167), // reddish purple
    RGBColor(230, 159, 0),   // orange
    RGBColor(86, 180, 233),  // sky blue
    RGBColor(90, 90, 90),    // dark grey
    RGBColor(240, 228, 66),  // yellow
];

const INK: RGBColor = RGBColor(30, 30, 30);
const BASELINE: RGBColor = RGBColor(120, 120, 120);

fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// One arm's figures for the comparison chart.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmBar {
    pub name: String,
    /// Fraction in [0, 1].
    pub accuracy: f64,
    /// Lower end of the 95% interval, fraction in [0, 1].
    pub lo: f64,
    /// Upper end of the 95% interval, fraction in [0, 1].
    pub hi: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
}

/// One curve of a by-layer chart (e.g. held-out accuracy of a probe per layer).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(usize, f64)>,
}

/// Accuracy (with 95% interval error bars) and latency (p50 bar, p95 marker) per arm,
/// side by side in one PNG.
///
/// Accuracies are fractions and shown as percent. NaN figures are skipped (an arm
/// whose accuracy is NaN is labelled "n/a"); long names are shortened to fit.
pub fn plot_arms(path: &Path, title: &str, arms: &[ArmBar]) -> Result<()> {
    if arms.is_empty() {
        bail!("cannot draw chart {}: no arms given", path.display());
    }
    render(path, |root| {
        let body = titled(root, title)?;
        let panels = body.split_evenly((1, 2));
        draw_accuracy(&panels[0], arms)?;
        draw_latency(&panels[1], arms)
    })
    .with_context(|| format!("writing chart {}", path.display()))
}

/// Lines of a metric by layer, plus an optional horizontal baseline (e.g. majority class).
///
/// Values are plotted as given; when every value (baseline included) lies in [0, 1]
/// the y axis spans exactly [0, 1]. NaN points are skipped and break the line there.
/// It is an error when no series has a single finite point.
pub fn plot_by_layer(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[Series],
    baseline: Option<(&str, f64)>,
) -> Result<()> {
    plot_lines(path, title, "layer", y_label, series, baseline)
}

/// Lines of `series` against an integer x (layers, client counts), with an optional
/// horizontal baseline.
pub fn plot_lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    baseline: Option<(&str, f64)>,
) -> Result<()> {
    if series.is_empty() {
        bail!("cannot draw chart {}: no series given", path.display());
    }
    let finite = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(_, y)| y.is_finite())
    };
    if finite().next().is_none() {
        bail!(
            "cannot draw chart {}: no series has a finite value",
            path.display()
        );
    }
    let x_min = finite().map(|&(x, _)| x).min().unwrap_or(0);
    let x_max = finite().map(|&(x, _)| x).max().unwrap_or(0);
    let baseline = baseline.filter(|(_, y)| y.is_finite());
    let ys = finite().map(|&(_, y)| y).chain(baseline.map(|(_, y)| y));
    let (y_lo, y_hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
        (lo.min(y), hi.max(y))
    });
    let y_range = if y_lo >= 0.0 && y_hi <= 1.0 {
        (0.0, 1.0)
    } else {
        let pad = if y_hi > y_lo {
            (y_hi - y_lo) * 0.08
        } else {
            (y_hi.abs() * 0.1).max(1.0)
        };
        (y_lo - pad, y_hi + pad)
    };
    render(path, |root| {
        let body = titled(root, title)?;
        draw_lines(
            &body,
            x_label,
            y_label,
            series,
            baseline,
            (x_min, x_max),
            y_range,
        )
    })
    .with_context(|| format!("writing chart {}", path.display()))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Registers the embedded font with plotters once per process.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the embedded chart font could not be parsed"))
    }
}

/// Draws on a white WIDTH x HEIGHT canvas and writes it to `path` as PNG.
fn render(path: &Path, draw: impl FnOnce(&Area<'_>) -> Result<()>) -> Result<()> {
    ensure_font()?;
    let mut rgb = vec![0u8; WIDTH as usize * HEIGHT as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
    }
    write_png(path, &rgb)
}

fn write_png(path: &Path, rgb: &[u8]) -> Result<()> {
    let mut out = BufWriter::new(File::create(path).context("creating the file")?);
    let mut encoder = png::Encoder::new(&mut out, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    out.flush()?;
    Ok(())
}

fn text_style(size: u32) -> TextStyle<'static> {
    TextStyle::from((FONT, size).into_font()).color(&INK)
}

/// Writes the (shortened) title at the top and returns the area below it.
fn titled<'a>(root: &Area<'a>, title: &str) -> Result<Area<'a>> {
    let style = text_style(22);
    let title = fit(root, title, &style, WIDTH - 20)?;
    if title.is_empty() {
        return Ok(root.margin(10, 0, 0, 0));
    }
    Ok(root.titled(&title, style)?)
}

/// `text`, shortened with an ellipsis until it is at most `max_px` wide.
fn fit(area: &Area<'_>, text: &str, style: &TextStyle<'_>, max_px: u32) -> Result<String> {
    let width = |s: &str| -> Result<u32> { Ok(area.estimate_text_size(s, style)?.0) };
    let text = text.trim();
    if text.is_empty() || width(text)? <= max_px {
        return Ok(text.to_string());
    }
    // Binary search for the longest prefix that fits with the ellipsis (widths grow
    // with the prefix), so very long names cost a few measurements, not one per char.
    let chars: Vec<char> = text.chars().collect();
    let shortened = |k: usize| format!("{}…", chars[..k].iter().collect::<String>().trim_end());
    let (mut lo, mut hi) = (0, chars.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if width(&shortened(mid))? <= max_px {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    if lo == 0 {
        return Ok(String::new());
    }
    Ok(shortened(lo))
}

/// How the arm names go under the x axis.
struct ArmAxis {
    labels: Vec<String>,
    rotated: bool,
    /// Height of the x label area, in pixels.
    area: u32,
}

/// Longest rotated arm label, in pixels.
const MAX_ROTATED_LABEL: u32 = 120;

/// Lays out arm names: horizontal and shortened to their slot where a slot is at least
/// as wide as a rotated label may be long, or every name fits; else rotated (reading
/// upwards) and shortened to [`MAX_ROTATED_LABEL`].
fn arm_axis(area: &Area<'_>, arms: &[ArmBar], y_label_area: u32) -> Result<ArmAxis> {
    let style = text_style(13);
    let plot_width = area
        .dim_in_pixel()
        .0
        .saturating_sub(y_label_area + 2 * PANEL_MARGIN);
    let slot = (plot_width / arms.len() as u32).saturating_sub(8);
    let mut fits = true;
    for a in arms {
        fits &= area.estimate_text_size(a.name.trim(), &style)?.0 <= slot;
    }
    if fits || slot >= MAX_ROTATED_LABEL {
        let labels = arms
            .iter()
            .map(|a| fit(area, &a.name, &style, slot))
            .collect::<Result<Vec<_>>>()?;
        return Ok(ArmAxis {
            labels,
            rotated: false,
            area: 30,
        });
    }
    let labels = arms
        .iter()
        .map(|a| fit(area, &a.name, &style, MAX_ROTATED_LABEL))
        .collect::<Result<Vec<_>>>()?;
    let mut longest = 0;
    for l in &labels {
        longest = longest.max(area.estimate_text_size(l, &style)?.0);
    }
    Ok(ArmAxis {
        labels,
        rotated: true,
        area: longest + 16,
    })
}

const PANEL_MARGIN: u32 = 10;
/// Fraction of a slot left empty on each side of a bar.
const BAR_GAP: f64 = 0.18;

type ArmChart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<TickedAxis, RangedCoordf64>>;

/// A linear f64 axis whose only ticks (and labels) are the given positions: the arm
/// centres, or whole layers.
#[derive(Clone)]
struct TickedAxis {
    range: std::ops::Range<f64>,
    ticks: Vec<f64>,
}

impl Ranged for TickedAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let span = self.range.end - self.range.start;
        let frac = if span > 0.0 {
            (v - self.range.start) / span
        } else {
            0.5
        };
        limit.0 + (frac * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        match hint.weight() {
            KeyPointWeight::Bold => self.ticks.clone(),
            KeyPointWeight::Any => Vec::new(),
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.range.clone()
    }
}

/// One panel of the arms chart: arm `i` occupies x in [i, i + 1], with its name
/// under the centre; the y axis spans `0..y_max`, labelled by `y_fmt`.
fn arm_panel<'a, 'b>(
    area: &'a Area<'b>,
    arms: &[ArmBar],
    caption: &str,
    y_max: f64,
    y_fmt: &dyn Fn(&f64) -> String,
) -> Result<ArmChart<'a, 'b>> {
    let n = arms.len();
    let y_label_area = 60;
    let axis = arm_axis(area, arms, y_label_area)?;
    let centres: Vec<f64> = (0..n).map(|i| i as f64 + 0.5).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(caption, text_style(16))
        .margin(PANEL_MARGIN)
        .x_label_area_size(axis.area)
        .y_label_area_size(y_label_area)
        .build_cartesian_2d(
            TickedAxis {
                range: 0.0..n as f64,
                ticks: centres,
            },
            0.0..y_max,
        )?;
    // Rotated labels are drawn below rather than by the mesh, which anchors rotated
    // text at its middle and so would run it up into the plot.
    let x_fmt = |v: &f64| {
        let i = (v - 0.5).round();
        if axis.rotated || i < 0.0 || (v - 0.5 - i).abs() > 1e-6 {
            String::new()
        } else {
            axis.labels.get(i as usize).cloned().unwrap_or_default()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&x_fmt)
        .x_label_style(text_style(13))
        .y_labels(10)
        .y_label_formatter(y_fmt)
        .y_label_style(text_style(13))
        .axis_style(INK)
        .light_line_style(WHITE)
        .bold_line_style(INK.mix(0.12))
        .draw()?;
    if axis.rotated {
        // Reading upwards, ending just under the tick: anchored at the text's right end.
        let style = text_style(13)
            .transform(FontTransform::Rotate270)
            .pos(Pos::new(HPos::Right, VPos::Center));
        let (base_x, base_y) = area.get_base_pixel();
        for (i, label) in axis.labels.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
            area.draw(&Text::new(
                label.as_str(),
                (x - base_x, y - base_y + 8),
                style.clone(),
            ))?;
        }
    }
    Ok(chart)
}

/// Solid bar of arm `i` from 0 to `y`.
fn bar(i: usize, y: f64) -> Rectangle<(f64, f64)> {
    let x = i as f64;
    Rectangle::new(
        [(x + BAR_GAP, 0.0), (x + 1.0 - BAR_GAP, y)],
        colour(i).filled(),
    )
}

/// A value label centred just above `(i + 0.5, y)`, drawn only where it fits the slot.
fn value_label(
    chart: &mut ArmChart<'_, '_>,
    n: usize,
    i: usize,
    y: f64,
    text: String,
) -> Result<()> {
    let style = text_style(12).pos(Pos::new(HPos::Center, VPos::Bottom));
    let slot = chart.plotting_area().dim_in_pixel().0 / n as u32;
    if chart.plotting_area().estimate_text_size(&text, &style)?.0 + 4 > slot {
        return Ok(());
    }
    chart.draw_series(std::iter::once(
        EmptyElement::at((i as f64 + 0.5, y)) + Text::new(text, (0, -5), style),
    ))?;
    Ok(())
}

fn draw_accuracy(area: &Area<'_>, arms: &[ArmBar]) -> Result<()> {
    let n = arms.len();
    let y_fmt = |v: &f64| {
        if *v <= 100.0 + 1e-9 {
            format!("{v:.0}%")
        } else {
            String::new()
        }
    };
    // Headroom above 100% for the value labels; no tick is labelled there.
    let mut chart = arm_panel(area, arms, "Accuracy (95% interval)", 110.0, &y_fmt)?;
    let slot_px = chart.plotting_area().dim_in_pixel().0 / n as u32;
    let cap = ((slot_px as f64 * (0.5 - BAR_GAP) * 0.5) as i32).clamp(2, 10);
    let whisker = INK.stroke_width(2);
    for (i, arm) in arms.iter().enumerate() {
        let x = i as f64 + 0.5;
        let mut top = 0.0f64;
        if arm.accuracy.is_finite() {
            let acc = arm.accuracy.clamp(0.0, 1.0) * 100.0;
            chart.draw_series(std::iter::once(bar(i, acc)))?;
            top = acc;
        }
        if arm.lo.is_finite() && arm.hi.is_finite() {
            let lo = arm.lo.min(arm.hi).clamp(0.0, 1.0) * 100.0;
            let hi = arm.hi.max(arm.lo).clamp(0.0, 1.0) * 100.0;
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(x, lo), (x, hi)],
                whisker,
            )))?;
            chart.draw_series([lo, hi].into_iter().map(|y| {
                EmptyElement::at((x, y)) + PathElement::new(vec![(-cap, 0), (cap, 0)], whisker)
            }))?;
            top = top.max(hi);
        }
        let text = if arm.accuracy.is_finite() {
            format!("{:.1}%", arm.accuracy * 100.0)
        } else {
            "n/a".to_string()
        };
        value_label(&mut chart, n, i, top, text)?;
    }
    Ok(())
}

fn draw_latency(area: &Area<'_>, arms: &[ArmBar]) -> Result<()> {
    let n = arms.len();
    let y_max = arms
        .iter()
        .flat_map(|a| [a.p50_ms, a.p95_ms])
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold(0.0f64, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.15 } else { 1.0 };
    let mut chart = arm_panel(
        area,
        arms,
        "Latency, ms (bar: p50, black tick: p95)",
        y_max,
        &|v| format_axis(*v),
    )?;
    let slot_px = chart.plotting_area().dim_in_pixel().0 / n as u32;
    let half = ((slot_px as f64 * (0.5 - BAR_GAP * 0.5)) as i32).max(3);
    for (i, arm) in arms.iter().enumerate() {
        let mut top = 0.0f64;
        if arm.p50_ms.is_finite() {
            let p50 = arm.p50_ms.max(0.0);
            chart.draw_series(std::iter::once(bar(i, p50)))?;
            top = p50;
        }
        if arm.p95_ms.is_finite() {
            let p95 = arm.p95_ms.max(0.0);
            chart.draw_series(std::iter::once(
                EmptyElement::at((i as f64 + 0.5, p95))
                    + PathElement::new(vec![(-half, 0), (half, 0)], INK.stroke_width(3)),
            ))?;
            top = top.max(p95);
        }
        let text = match (arm.p50_ms.is_finite(), arm.p95_ms.is_finite()) {
            (true, true) => format!("{} / {}", format_ms(arm.p50_ms), format_ms(arm.p95_ms)),
            (true, false) => format_ms(arm.p50_ms),
            (false, true) => format!("p95 {}", format_ms(arm.p95_ms)),
            (false, false) => "n/a".to_string(),
        };
        value_label(&mut chart, n, i, top, text)?;
    }
    Ok(())
}

/// Axis tick value with at most two decimals and no trailing zeros.
fn format_axis(v: f64) -> String {
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

fn format_ms(v: f64) -> String {
    if v.abs() >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Tick positions for layers `x_min..=x_max`: every layer, or every 2nd, 5th, 10th, …
/// so that there are at most 25.
fn layer_ticks(x_min: usize, x_max: usize) -> Vec<f64> {
    let span = x_max - x_min;
    let mut step = 1;
    for s in [1, 2, 5].iter().cycle().scan(1, |scale, &m| {
        let s = m * *scale;
        if m == 5 {
            *scale *= 10;
        }
        Some(s)
    }) {
        step = s;
        if span / s < 25 {
            break;
        }
    }
    let first = x_min.div_ceil(step) * step;
    (first..=x_max).step_by(step).map(|x| x as f64).collect()
}

/// Splits a series into runs of finite points, sorted by layer; NaN ends a run.
fn runs(points: &[(usize, f64)]) -> Vec<Vec<(f64, f64)>> {
    let mut sorted = points.to_vec();
    sorted.sort_by_key(|&(x, _)| x);
    let mut out = Vec::new();
    let mut run = Vec::new();
    for (x, y) in sorted {
        if y.is_finite() {
            run.push((x as f64, y));
        } else if !run.is_empty() {
            out.push(std::mem::take(&mut run));
        }
    }
    if !run.is_empty() {
        out.push(run);
    }
    out
}

fn draw_lines(
    area: &Area<'_>,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    baseline: Option<(&str, f64)>,
    (x_min, x_max): (usize, usize),
    (y_lo, y_hi): (f64, f64),
) -> Result<()> {
    let x_range = (x_min as f64 - 0.5)..(x_max as f64 + 0.5);
    let ticks = layer_ticks(x_min, x_max);
    let n_ticks = ticks.len();
    let mut chart = ChartBuilder::on(area)
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            TickedAxis {
                range: x_range.clone(),
                ticks,
            },
            y_lo..y_hi,
        )?;
    let y_desc = fit(area, y_label, &text_style(14), HEIGHT - 120)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_desc)
        .x_labels(n_ticks)
        .x_label_formatter(&|v| format!("{}", v.round() as i64))
        .y_labels(11)
        .y_label_formatter(&|v| format_axis(*v))
        .label_style(text_style(13))
        .axis_desc_style(text_style(14))
        .axis_style(INK)
        .light_line_style(WHITE)
        .bold_line_style(INK.mix(0.12))
        .draw()?;

    if let Some((name, y)) = baseline {
        let label = fit(area, &format!("{name} ({y:.3})"), &text_style(13), 320)?;
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x_range.start, y), (x_range.end, y)],
                8,
                6,
                BASELINE.stroke_width(2),
            ))?
            .label(label)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BASELINE.stroke_width(2)));
    }
    for (i, s) in series.iter().enumerate() {
        let c = colour(i);
        let runs = runs(&s.points);
        for run in &runs {
            chart.draw_series(LineSeries::new(run.iter().copied(), c.stroke_width(2)))?;
        }
        let label = fit(area, &s.name, &text_style(13), 320)?;
        chart
            .draw_series(
                runs.iter()
                    .flatten()
                    .map(|&p| Circle::new(p, 3, c.filled())),
            )?
            .label(label)
            .legend(move |(x, y)| {
                EmptyElement::at((x + 10, y))
                    + PathElement::new(vec![(-10, 0), (10, 0)], c.stroke_width(2))
                    + Circle::new((0, 0), 3, c.filled())
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(text_style(13))
        .background_style(WHITE.mix(0.85))
        .border_style(INK.mix(0.4))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

    /// Decoded RGB picture of a chart file, checked to be a PNG of the chart size.
    struct Picture {
        rgb: Vec<u8>,
    }

    impl Picture {
        fn load(path: &Path) -> Picture {
            let bytes = std::fs::read(path).unwrap();
            assert!(bytes.starts_with(&PNG_SIGNATURE), "not a PNG: {path:?}");
            let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
                .read_info()
                .unwrap();
            let mut buf = vec![0; reader.output_buffer_size().unwrap()];
            let info = reader.next_frame(&mut buf).unwrap();
            assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
            assert_eq!(info.color_type, png::ColorType::Rgb);
            buf.truncate(info.buffer_size());
            Picture { rgb: buf }
        }

        fn pixels(&self) -> impl Iterator<Item = [u8; 3]> + '_ {
            self.rgb.chunks_exact(3).map(|p| [p[0], p[1], p[2]])
        }

        fn distinct_colours(&self) -> usize {
            self.pixels().collect::<HashSet<_>>().len()
        }

        fn count(&self, c: RGBColor) -> usize {
            self.pixels().filter(|p| *p == [c.0, c.1, c.2]).count()
        }

        /// Non-white pixels in rows `rows`.
        fn inked_in_rows(&self, rows: std::ops::Range<u32>) -> usize {
            let row = WIDTH as usize * 3;
            self.rgb[rows.start as usize * row..rows.end as usize * row]
                .chunks_exact(3)
                .filter(|p| *p != [255, 255, 255])
                .count()
        }

        /// Asserts a real chart: many colours (antialiased text and lines), not one fill.
        fn assert_drawn(&self) {
            let n = self.distinct_colours();
            assert!(n > 40, "only {n} distinct colours: chart looks blank");
            assert!(self.inked_in_rows(0..30) > 100, "no title drawn");
        }
    }

    fn arm(name: &str, accuracy: f64, p50: f64) -> ArmBar {
        ArmBar {
            name: name.to_string(),
            accuracy,
            lo: accuracy - 0.05,
            hi: accuracy + 0.04,
            p50_ms: p50,
            p95_ms: p50 * 1.7,
        }
    }

    #[test]
    fn arms_chart_is_a_png_with_every_bar() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arms.png");
        let arms = vec![
            arm("base", 0.41, 120.0),
            arm("rag", 0.63, 180.0),
            arm("rag+tta", 0.71, 950.0),
        ];
        plot_arms(&path, "QASC, 300 questions", &arms).unwrap();
        let pic = Picture::load(&path);
        pic.assert_drawn();
        for i in 0..arms.len() {
            // Each arm has two solid bars (accuracy and p50) in its own colour.
            assert!(pic.count(colour(i)) > 1000, "arm {i} bars missing");
        }
    }

    #[test]
    fn arms_chart_handles_one_arm_long_names_and_nan() {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("one.png");
        let long = "retrieval-augmented with test-time adaptation ".repeat(8);
        plot_arms(&one, &long, &[arm(&long, 0.5, 40.0)]).unwrap();
        let pic = Picture::load(&one);
        pic.assert_drawn();
        assert!(pic.count(colour(0)) > 1000);

        let nan = dir.path().join("nan.png");
        let arms = vec![
            ArmBar {
                name: "broken".into(),
                accuracy: f64::NAN,
                lo: f64::NAN,
                hi: f64::NAN,
                p50_ms: f64::NAN,
                p95_ms: f64::NAN,
            },
            ArmBar {
                name: "partial".into(),
                accuracy: 0.8,
                lo: f64::NAN,
                hi: 0.9,
                p50_ms: 12.0,
                p95_ms: f64::INFINITY,
            },
            arm(&long, 1.0, 0.0),
        ];
        plot_arms(&nan, "with NaN", &arms).unwrap();
        let pic = Picture::load(&nan);
        pic.assert_drawn();
        assert_eq!(pic.count(colour(0)), 0, "an all-NaN arm draws no bar");
        assert!(pic.count(colour(1)) > 1000);
    }

    #[test]
    fn arms_chart_with_many_arms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("many.png");
        let arms: Vec<_> = (0..20)
            .map(|i| arm(&format!("arm number {i}"), i as f64 / 20.0, 10.0 * i as f64))
            .collect();
        plot_arms(&path, "twenty arms", &arms).unwrap();
        Picture::load(&path).assert_drawn();
    }

    #[test]
    fn empty_input_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.png");
        let err = plot_arms(&path, "t", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("empty.png"), "{err:#}");
        let err = plot_by_layer(&path, "t", "acc", &[], None).unwrap_err();
        assert!(format!("{err:#}").contains("empty.png"), "{err:#}");
        let all_nan = [Series {
            name: "probe".into(),
            points: vec![(0, f64::NAN), (1, f64::NAN)],
        }];
        let err = plot_by_layer(&path, "t", "acc", &all_nan, Some(("majority", 0.5))).unwrap_err();
        assert!(format!("{err:#}").contains("finite"), "{err:#}");
        assert!(!path.exists());
    }

    #[test]
    fn unwritable_path_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("arms.png");
        let err = plot_arms(&path, "t", &[arm("a", 0.5, 1.0)]).unwrap_err();
        assert!(format!("{err:#}").contains("missing-dir"), "{err:#}");
    }

    #[test]
    fn layer_chart_draws_every_series_and_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layers.png");
        let curve = |f: fn(f64) -> f64| (0..30).map(|l| (l, f(l as f64))).collect::<Vec<_>>();
        let series = vec![
            Series {
                name: "retrieved-is-relevant probe".into(),
                points: curve(|l| 0.5 + 0.4 * (l / 30.0)),
            },
            Series {
                name: "answer-is-correct probe".into(),
                points: curve(|l| 0.55 + 0.2 * (l / 15.0).sin()),
            },
        ];
        plot_by_layer(
            &path,
            "Probe accuracy by layer",
            "held-out accuracy",
            &series,
            Some(("majority class", 0.52)),
        )
        .unwrap();
        let pic = Picture::load(&path);
        pic.assert_drawn();
        assert!(pic.count(colour(0)) > 200, "first series missing");
        assert!(pic.count(colour(1)) > 200, "second series missing");
        assert!(pic.count(BASELINE) > 100, "baseline missing");
    }

    #[test]
    fn layer_chart_tolerates_nan_single_points_and_odd_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nan.png");
        let series = vec![
            Series {
                name: "gappy".into(),
                points: vec![(3, 0.7), (1, 0.6), (2, f64::NAN), (4, 0.8), (0, f64::NAN)],
            },
            Series {
                name: "one point".into(),
                points: vec![(2, 0.4)],
            },
            Series {
                name: "empty".into(),
                points: vec![],
            },
        ];
        plot_by_layer(&path, "gaps", "accuracy", &series, Some(("nan", f64::NAN))).unwrap();
        let pic = Picture::load(&path);
        pic.assert_drawn();
        assert!(pic.count(colour(1)) > 20, "single point not drawn");

        // One layer, values outside [0, 1], equal values.
        let path = dir.path().join("flat.png");
        let series = [Series {
            name: "loss".into(),
            points: vec![(7, 3.5)],
        }];
        plot_by_layer(&path, "flat", "loss", &series, Some(("ref", 3.5))).unwrap();
        Picture::load(&path).assert_drawn();
    }

    #[test]
    fn fit_shortens_with_an_ellipsis() {
        ensure_font().unwrap();
        let mut rgb = vec![0u8; WIDTH as usize * HEIGHT as usize * 3];
        let area = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        let style = text_style(13);
        assert_eq!(fit(&area, "  base ", &style, 200).unwrap(), "base");
        let long = "x".repeat(100_000);
        let short = fit(&area, &long, &style, 100).unwrap();
        assert!(short.ends_with('…'), "{short}");
        assert!(area.estimate_text_size(&short, &style).unwrap().0 <= 100);
        let one_more = format!("x{short}");
        assert!(area.estimate_text_size(&one_more, &style).unwrap().0 > 100);
        assert_eq!(fit(&area, "abc", &style, 1).unwrap(), "");
    }

    #[test]
    fn runs_break_at_nan_and_sort_by_layer() {
        let r = runs(&[(3, 0.3), (1, 0.1), (2, f64::NAN), (0, 0.0), (4, 0.4)]);
        assert_eq!(
            r,
            vec![vec![(0.0, 0.0), (1.0, 0.1)], vec![(3.0, 0.3), (4.0, 0.4)]]
        );
    }
}
