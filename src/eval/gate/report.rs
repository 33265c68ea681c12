//! The layer-wise analysis as people read it: a Markdown table, a JSON file with every cell, and
//! accuracy / macro-F1 by layer as PNG charts.

use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::sweep::{Cell, Sweep};
use crate::eval::plot::{plot_by_layer, Series};
use crate::gate::card::Decides;
use crate::gate::features::Position;
use crate::gate::policy::CLASSES;
use crate::gate::probe::ProbeKind;

/// Where the labels came from.
#[derive(Debug, Clone, Serialize)]
pub struct Source {
    pub path: String,
    pub questions: usize,
    /// Questions left out: either arm missing or failed.
    pub skipped: usize,
}

/// The run's inputs, printed above the results.
#[derive(Debug, Clone, Serialize)]
pub struct Header {
    pub model_id: String,
    pub model_sha256: String,
    pub without_arm: String,
    pub with_arm: String,
    /// What the classes compare: retrieval, or adaptation (both arms retrieve).
    pub decides: Decides,
    pub sources: Vec<Source>,
    pub seed: u64,
    pub command: String,
}

fn kind_name(k: ProbeKind) -> String {
    match k {
        ProbeKind::Logistic => "logistic".into(),
        ProbeKind::Mlp { hidden } => format!("mlp-{hidden}"),
    }
}

fn pos_name(p: Position) -> &'static str {
    match p {
        Position::Last => "last",
        Position::Mean => "mean",
    }
}

use crate::eval::report::pct;

/// Name of a series: pass, position and probe kind.
pub fn cell_series(c: &Cell) -> String {
    format!(
        "{}/{}/{}",
        c.pass.name(),
        pos_name(c.position),
        kind_name(c.probe)
    )
}

pub fn markdown(s: &Sweep, h: &Header) -> String {
    let mut md = String::new();
    let best = &s.cells[s.best];
    let (title, what) = match h.decides {
        Decides::Retrieval => ("Retrieval", "retrieval"),
        Decides::Adaptation => ("Adaptation", "adaptation"),
    };
    let _ = writeln!(md, "# {title} gate: layer-wise probes\n");
    let _ = writeln!(
        md,
        "Model `{}` (weights sha256 `{}`). Labels: `{}` (without {what}) against `{}` (with), \
         S1 wrong both ways, S2 right only with {what}, S3 right only without, S4 right both.\n",
        h.model_id, h.model_sha256, h.without_arm, h.with_arm
    );
    let _ = writeln!(md, "Produced by: `{}`\n", h.command);
    let _ = writeln!(md, "| source | questions | left out |\n|---|---|---|");
    for src in &h.sources {
        let _ = writeln!(md, "| {} | {} | {} |", src.path, src.questions, src.skipped);
    }
    let counts: Vec<String> = CLASSES
        .iter()
        .zip(s.label_counts)
        .map(|(c, n)| format!("{c} {n}"))
        .collect();
    let _ = writeln!(
        md,
        "\nClasses: {}. Splits (stratified, seed {}): {} train, {} validation (early stopping and \
         the choice), {} held out (scores only).\n",
        counts.join(", "),
        h.seed,
        s.n_train,
        s.n_val,
        s.n_test
    );
    let _ = writeln!(
        md,
        "**Chosen on validation macro-F1:** layer {}, pass `{}`, position `{}`, probe `{}`: \
         validation \
         accuracy {} %, macro-F1 {} %; held out accuracy {} %, macro-F1 {} %. Majority class {} \
         (from the training split): {} % validation, {} % held out.\n",
        best.layer,
        best.pass.name(),
        pos_name(best.position),
        kind_name(best.probe),
        pct(best.val.accuracy),
        pct(best.val.macro_f1),
        pct(best.test.accuracy),
        pct(best.test.macro_f1),
        CLASSES[s.majority_class],
        pct(s.majority_val_accuracy),
        pct(s.majority_test_accuracy)
    );
    let _ = writeln!(
        md,
        "## What the chosen probe would do on the held-out questions\n\nRead off their classes: \
         {what} is right for S2 and S4, no {what} for S3 and S4. Always: {} %, never: {} %.\n",
        pct(s.always_accuracy),
        pct(s.never_accuracy)
    );
    let _ = writeln!(md, "| policy | skipped % | accuracy % |\n|---|---|---|");
    for p in &s.policies {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            p.policy,
            pct(p.skipped),
            pct(p.accuracy)
        );
    }
    let _ = writeln!(
        md,
        "\n## Every probe\n\n| layer | pass | position | probe | val acc % | val macro-F1 % | \
         held-out acc % | held-out macro-F1 % | best epoch |\n|---|---|---|---|---|---|---|---|---|"
    );
    for (i, c) in s.cells.iter().enumerate() {
        let mark = if i == s.best { " **(chosen)**" } else { "" };
        let _ = writeln!(
            md,
            "| {}{} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.layer,
            mark,
            c.pass.name(),
            pos_name(c.position),
            kind_name(c.probe),
            pct(c.val.accuracy),
            pct(c.val.macro_f1),
            pct(c.test.accuracy),
            pct(c.test.macro_f1),
            c.best_epoch
        );
    }
    md
}

fn series(s: &Sweep, metric: fn(&Cell) -> f64) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for c in &s.cells {
        let name = cell_series(c);
        match out.iter_mut().find(|x| x.name == name) {
            Some(x) => x.points.push((c.layer, metric(c))),
            None => out.push(Series {
                name,
                points: vec![(c.layer, metric(c))],
            }),
        }
    }
    out
}

/// Writes `report.md`, `report.json`, `accuracy_by_layer.png` and `macro_f1_by_layer.png` into
/// `dir`.
pub fn write_all(dir: &Path, s: &Sweep, h: &Header) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("report.md"), markdown(s, h))?;
    let json = serde_json::json!({"header": h, "sweep": s});
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    plot_by_layer(
        &dir.join("accuracy_by_layer.png"),
        "Gate probe: held-out accuracy by layer",
        "accuracy",
        &series(s, |c| c.test.accuracy),
        Some(("majority class", s.majority_test_accuracy)),
    )?;
    plot_by_layer(
        &dir.join("macro_f1_by_layer.png"),
        "Gate probe: held-out macro-F1 by layer",
        "macro-F1",
        &series(s, |c| c.test.macro_f1),
        None,
    )
}
