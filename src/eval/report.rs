//! Turns records into the run's summary: per-arm accuracy with bootstrap intervals, paired
//! comparisons with McNemar's test, latency percentiles and the time split per stage; then
//! writes it as Markdown, JSON (with every record) and a PNG chart.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::plot::{plot_arms, ArmBar};
use super::record::Record;
use super::spec::{DatasetSpec, ResolvedArm, RunSpec};
use super::stats::{
    bootstrap_mean_ci, mcnemar_exact, mean, paired_bootstrap_diff_ci, quantile, Interval, McNemar,
};
use crate::engine::Timings;

/// What a run was: enough to rerun it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunHeader {
    pub version: String,
    pub model: String,
    pub model_path: String,
    pub dataset: DatasetSpec,
    pub run: RunSpec,
    pub subset: super::dataset::Subset,
    pub arms: Vec<ResolvedArm>,
    pub baseline: String,
    pub questions: usize,
    /// Server settings that shape every answer besides the arms' own.
    #[serde(default)]
    pub prompt_template: String,
    #[serde(default)]
    pub decode_quant: String,
    /// The domain adapter that arms with `domain_adapter = true` answer on (its file's
    /// SHA-256): a retrained adapter is another experiment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_adapter_sha256: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdaptSummary {
    pub loss_before: f64,
    pub loss_after: f64,
    pub loss_delta: f64,
    pub pairs: f64,
    pub fallbacks: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ArmSummary {
    pub name: String,
    pub mode: String,
    pub n: usize,
    pub errors: usize,
    /// The headline metric (see `Record::correct`) with its 95% bootstrap interval.
    pub accuracy: f64,
    pub accuracy_ci: Interval,
    pub contains: f64,
    pub exact: f64,
    pub f1: f64,
    /// Likelihood-ranked choice accuracy, for sets with fixed choices.
    pub choice: Option<f64>,
    pub recall: Option<f64>,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub latency_mean_ms: f64,
    /// Mean time per stage.
    pub stages_ms: Timings,
    pub adapt: Option<AdaptSummary>,
    pub gate: Option<GateSummary>,
}

/// What a gated arm's gate did.
#[derive(Debug, Clone, Serialize)]
pub struct GateSummary {
    pub policy: String,
    /// Fraction of questions answered without retrieval.
    pub skipped: f64,
    /// Mean time of the gate itself.
    pub gate_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PairedSummary {
    pub arm: String,
    pub baseline: String,
    pub n: usize,
    /// Accuracy of `arm` minus accuracy of `baseline`, with its paired 95% bootstrap interval.
    pub diff: f64,
    pub diff_ci: Interval,
    pub mcnemar: McNemar,
    /// Questions whose answer text differs from the baseline's.
    pub changed_answers: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub arms: Vec<ArmSummary>,
    pub paired: Vec<PairedSummary>,
}

fn mean_of(xs: impl Iterator<Item = f64>) -> f64 {
    mean(&xs.collect::<Vec<_>>())
}

fn arm_summary(arm: &ResolvedArm, recs: &[&Record], run: &RunSpec) -> ArmSummary {
    let correct: Vec<f64> = recs
        .iter()
        .map(|r| f64::from(u8::from(r.correct)))
        .collect();
    let lat: Vec<f64> = recs.iter().map(|r| r.latency_ms).collect();
    let recall: Vec<f64> = recs.iter().filter_map(|r| r.recall).collect();
    let choice: Vec<f64> = recs
        .iter()
        .filter_map(|r| r.choice.as_ref().map(|c| f64::from(u8::from(c.correct))))
        .collect();
    let stage = |f: fn(&Timings) -> f64| mean_of(recs.iter().map(|r| f(&r.timings_ms)));
    let adapt = (arm.tta.is_some()).then(|| {
        let with_losses: Vec<(f64, f64)> = recs
            .iter()
            .filter_map(|r| {
                let t = r.tta.as_ref()?;
                Some((
                    t.get("loss_before")?.as_f64()?,
                    t.get("loss_after")?.as_f64()?,
                ))
            })
            .collect();
        AdaptSummary {
            loss_before: mean_of(with_losses.iter().map(|p| p.0)),
            loss_after: mean_of(with_losses.iter().map(|p| p.1)),
            loss_delta: mean_of(with_losses.iter().map(|p| p.1 - p.0)),
            pairs: mean_of(
                recs.iter()
                    .filter_map(|r| r.tta.as_ref()?.get("pairs")?.as_f64()),
            ),
            fallbacks: recs.iter().filter(|r| r.fallback().is_some()).count(),
        }
    });
    let gate = arm.gate.as_ref().map(|g| GateSummary {
        policy: g.policy.to_string(),
        skipped: mean_of(recs.iter().map(|r| {
            let skip = r
                .gate
                .as_ref()
                .and_then(|v| v.get("decision")?.as_str().map(|d| d == "skip"));
            f64::from(u8::from(skip.unwrap_or(false)))
        })),
        gate_ms: stage(|t| t.gate),
    });
    ArmSummary {
        name: arm.name.clone(),
        mode: arm.mode.clone(),
        n: recs.len(),
        errors: recs.iter().filter(|r| r.error.is_some()).count(),
        accuracy: mean(&correct),
        accuracy_ci: bootstrap_mean_ci(&correct, run.bootstrap_resamples, 0.95, run.seed),
        contains: mean_of(recs.iter().map(|r| r.contains as u8 as f64)),
        exact: mean_of(recs.iter().map(|r| r.exact as u8 as f64)),
        f1: mean_of(recs.iter().map(|r| r.f1)),
        choice: (!choice.is_empty()).then(|| mean(&choice)),
        recall: (!recall.is_empty()).then(|| mean(&recall)),
        latency_p50_ms: quantile(&lat, 0.5),
        latency_p95_ms: quantile(&lat, 0.95),
        latency_mean_ms: mean(&lat),
        stages_ms: Timings {
            queue: stage(|t| t.queue),
            gate: stage(|t| t.gate),
            retrieve: stage(|t| t.retrieve),
            adapt: stage(|t| t.adapt),
            prefill: stage(|t| t.prefill),
            decode: stage(|t| t.decode),
        },
        adapt,
        gate,
    }
}

/// Summarises `records` (any order) for `arms`. Paired comparisons use the questions both arms
/// answered.
pub fn summarise(
    records: &[Record],
    arms: &[ResolvedArm],
    baseline: &str,
    run: &RunSpec,
) -> Summary {
    let by_arm =
        |name: &str| -> Vec<&Record> { records.iter().filter(|r| r.arm == name).collect() };
    let summaries = arms
        .iter()
        .map(|a| arm_summary(a, &by_arm(&a.name), run))
        .collect();
    let base: std::collections::HashMap<&str, &Record> = by_arm(baseline)
        .into_iter()
        .map(|r| (r.id.as_str(), r))
        .collect();
    let paired = arms
        .iter()
        .filter(|a| a.name != baseline)
        .map(|a| {
            let pairs: Vec<(&Record, &Record)> = by_arm(&a.name)
                .into_iter()
                .filter_map(|r| base.get(r.id.as_str()).map(|b| (*b, r)))
                .collect();
            let b: Vec<bool> = pairs.iter().map(|p| p.0.correct).collect();
            let o: Vec<bool> = pairs.iter().map(|p| p.1.correct).collect();
            let bf: Vec<f64> = b.iter().map(|&x| x as u8 as f64).collect();
            let of: Vec<f64> = o.iter().map(|&x| x as u8 as f64).collect();
            PairedSummary {
                arm: a.name.clone(),
                baseline: baseline.to_string(),
                n: pairs.len(),
                diff: mean(&of) - mean(&bf),
                diff_ci: paired_bootstrap_diff_ci(
                    &bf,
                    &of,
                    run.bootstrap_resamples,
                    0.95,
                    run.seed,
                ),
                mcnemar: mcnemar_exact(&b, &o),
                changed_answers: pairs.iter().filter(|p| p.0.output != p.1.output).count(),
            }
        })
        .collect();
    Summary {
        arms: summaries,
        paired,
    }
}

/// A share as a percentage with one decimal; `–` when undefined.
pub(crate) fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1}", 100.0 * x)
    } else {
        "–".into()
    }
}

fn opt_pct(x: Option<f64>) -> String {
    x.map(pct).unwrap_or_else(|| "–".into())
}

fn ms(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.0}")
    } else {
        "–".into()
    }
}

/// The Markdown report.
pub fn markdown(h: &RunHeader, s: &Summary) -> String {
    let mut m = String::new();
    let _ = writeln!(
        m,
        "# Evaluation: {} ({} questions)\n",
        h.dataset.name, h.questions
    );
    let _ = writeln!(
        m,
        "Model `{}` ({}), ttarag {}. Headline accuracy: {}. Intervals: 95% percentile bootstrap, {} resamples, seed {}.\n",
        h.model,
        h.model_path,
        h.version,
        if h.dataset.choices.is_empty() {
            "gold answer contained in the output (normalised)"
        } else {
            "likelihood-ranked choice"
        },
        h.run.bootstrap_resamples,
        h.run.seed
    );
    m.push_str("| arm | n | accuracy % (95% CI) | contains % | EM % | F1 % | choice % | recall@k % | p50 ms | p95 ms | retrieve | adapt | prefill | decode | errors |\n");
    m.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for a in &s.arms {
        let _ = writeln!(
            m,
            "| {} | {} | {} ({}–{}) | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            a.name,
            a.n,
            pct(a.accuracy),
            pct(a.accuracy_ci.lo),
            pct(a.accuracy_ci.hi),
            pct(a.contains),
            pct(a.exact),
            pct(a.f1),
            opt_pct(a.choice),
            opt_pct(a.recall),
            ms(a.latency_p50_ms),
            ms(a.latency_p95_ms),
            ms(a.stages_ms.retrieve),
            ms(a.stages_ms.adapt),
            ms(a.stages_ms.prefill),
            ms(a.stages_ms.decode),
            a.errors
        );
    }
    if !s.paired.is_empty() {
        let _ = writeln!(m, "\n## Paired with `{}`\n", h.baseline);
        m.push_str("| arm | n | Δ accuracy pts (95% CI) | right→wrong | wrong→right | McNemar exact p | answers changed |\n");
        m.push_str("|---|---|---|---|---|---|---|\n");
        for p in &s.paired {
            let _ = writeln!(
                m,
                "| {} | {} | {:+.1} ({:+.1}–{:+.1}) | {} | {} | {:.3} | {} |",
                p.arm,
                p.n,
                100.0 * p.diff,
                100.0 * p.diff_ci.lo,
                100.0 * p.diff_ci.hi,
                p.mcnemar.right_to_wrong,
                p.mcnemar.wrong_to_right,
                p.mcnemar.p_value,
                p.changed_answers
            );
        }
    }
    let gated: Vec<&ArmSummary> = s.arms.iter().filter(|a| a.gate.is_some()).collect();
    if !gated.is_empty() {
        let base = s.arms.iter().find(|a| a.name == h.baseline);
        let _ = writeln!(
            m,
            "\n## Gate\n\n| arm | policy | skipped retrieval % | gate ms | mean latency ms | \
             saved vs `{}` ms |\n|---|---|---|---|---|---|",
            h.baseline
        );
        for a in gated {
            let g = a.gate.as_ref().expect("filtered");
            let saved = base.map_or(f64::NAN, |b| b.latency_mean_ms - a.latency_mean_ms);
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} |",
                a.name,
                g.policy,
                pct(g.skipped),
                ms(g.gate_ms),
                ms(a.latency_mean_ms),
                ms(saved)
            );
        }
    }
    let adapted: Vec<&ArmSummary> = s.arms.iter().filter(|a| a.adapt.is_some()).collect();
    if !adapted.is_empty() {
        m.push_str("\n## Adaptation\n\n| arm | pairs | suffix loss before | after | Δ | fallbacks |\n|---|---|---|---|---|---|\n");
        for a in adapted {
            let t = a.adapt.as_ref().expect("filtered");
            let _ = writeln!(
                m,
                "| {} | {:.2} | {:.3} | {:.3} | {:+.3} | {} |",
                a.name, t.pairs, t.loss_before, t.loss_after, t.loss_delta, t.fallbacks
            );
        }
    }
    m.push_str("\n## Settings\n\n```json\n");
    m.push_str(&serde_json::to_string_pretty(h).unwrap_or_default());
    m.push_str("\n```\n");
    m
}

/// Writes `report.md`, `report.json` and `report.png` into `dir`.
pub fn write_all(dir: &Path, h: &RunHeader, s: &Summary, records: &[Record]) -> anyhow::Result<()> {
    let md = dir.join("report.md");
    std::fs::write(&md, markdown(h, s))
        .with_context(|| format!("cannot write {}", md.display()))?;
    let json = dir.join("report.json");
    let body = serde_json::json!({ "settings": h, "summary": s, "records": records });
    std::fs::write(&json, serde_json::to_vec_pretty(&body)?)
        .with_context(|| format!("cannot write {}", json.display()))?;
    let bars: Vec<ArmBar> = s
        .arms
        .iter()
        .map(|a| ArmBar {
            name: a.name.clone(),
            accuracy: a.accuracy,
            lo: a.accuracy_ci.lo,
            hi: a.accuracy_ci.hi,
            p50_ms: a.latency_p50_ms,
            p95_ms: a.latency_p95_ms,
        })
        .collect();
    plot_arms(
        &dir.join("report.png"),
        &format!("{} — {} questions", h.dataset.name, h.questions),
        &bars,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::record::sample_record;

    fn arm(name: &str) -> ResolvedArm {
        ResolvedArm {
            name: name.into(),
            mode: "static".into(),
            top_k: 3,
            tta: None,
            gate: None,
            domain_adapter: false,
        }
    }

    #[test]
    fn paired_counts_and_accuracy_follow_the_records() {
        // static right on q0..q5, tta right on q2..q7 (of q0..q9): 6/10 each; 2 flips each way.
        let mut recs = Vec::new();
        for i in 0..10 {
            recs.push(sample_record("static", &format!("q{i}"), i < 6));
            recs.push(sample_record("tta", &format!("q{i}"), (2..8).contains(&i)));
        }
        let run = RunSpec::default();
        let s = summarise(&recs, &[arm("static"), arm("tta")], "static", &run);
        assert_eq!(s.arms[0].n, 10);
        assert!((s.arms[0].accuracy - 0.6).abs() < 1e-12);
        assert!(s.arms[0].accuracy_ci.lo < 0.6 && s.arms[0].accuracy_ci.hi > 0.6);
        let p = &s.paired[0];
        assert_eq!((p.mcnemar.right_to_wrong, p.mcnemar.wrong_to_right), (2, 2));
        assert_eq!(p.mcnemar.both_right, 4);
        assert!((p.mcnemar.p_value - 1.0).abs() < 1e-12);
        assert_eq!(p.diff, 0.0);
        assert_eq!(p.changed_answers, 4);
        let md = markdown(
            &RunHeader {
                version: "0".into(),
                model: "m".into(),
                model_path: "p".into(),
                dataset: toml::from_str("name = \"d\"\nquestions = \"q\"\ncollection = \"c\"")
                    .unwrap(),
                run,
                subset: Default::default(),
                arms: vec![arm("static"), arm("tta")],
                baseline: "static".into(),
                questions: 10,
                prompt_template: String::new(),
                decode_quant: "q8_0".into(),
                domain_adapter_sha256: None,
            },
            &s,
        );
        assert!(md.contains("| static | 10 | 60.0 ("), "{md}");
        assert!(md.contains("| tta | 10 | +0.0 ("), "{md}");
    }
}
