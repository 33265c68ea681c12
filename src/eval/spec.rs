//! The experiment file of `ttarag eval`: dataset, run settings and arms. Every setting that
//! shapes a record lives here (or in the server config it names), and the report embeds the
//! resolved result, so an experiment can be rerun from its report alone.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::config::{Config, TtaSection};
use crate::engine::RagMode;
use crate::gate::policy::Policy;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    pub dataset: DatasetSpec,
    #[serde(default)]
    pub run: RunSpec,
    pub arms: Vec<ArmSpec>,
}

/// Paths are relative to the working directory, like those of the server config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    pub name: String,
    pub questions: PathBuf,
    /// Indexed into `collection` when that collection is missing or empty.
    pub corpus: Option<PathBuf>,
    pub collection: String,
    /// Fixed choices for every question (e.g. yes/no/maybe); a question's own `choices` win.
    #[serde(default)]
    pub choices: Vec<String>,
    /// System message put before each question.
    pub system: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunSpec {
    pub seed: u64,
    pub max_tokens: usize,
    /// 0 = greedy: deterministic answers.
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub bootstrap_resamples: usize,
    /// Arm the others are compared with, pairwise; default `static` when present, else the
    /// first arm.
    pub baseline: Option<String>,
}

impl Default for RunSpec {
    fn default() -> Self {
        Self {
            seed: 0,
            max_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 3,
            bootstrap_resamples: 2000,
            baseline: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmSpec {
    pub name: String,
    /// `closed_book` (or `none`), `static`, `tta`, or `gated` (the retrieval gate decides per
    /// question whether its `then` mode runs or the question is answered closed book).
    pub mode: String,
    pub top_k: Option<usize>,
    /// Keys of the server config's `[tta]` section that this arm changes.
    pub tta: Option<toml::Table>,
    /// Mode `gated`: probe card, policy and `then` mode; each defaults to the server config's
    /// `[gate]`.
    pub gate: Option<ArmGate>,
    /// Answer (and adapt) on top of the collection's domain adapter (`ttarag index adapt`);
    /// a missing or refused adapter fails the run rather than quietly scoring without it.
    #[serde(default)]
    pub domain_adapter: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ArmGate {
    pub probe: Option<PathBuf>,
    pub policy: Option<Policy>,
    pub then: Option<String>,
    /// With `then = "tta"`: the adaptation gate's policy (its card: `adapt_probe`, else the
    /// server's `[gate] adapt_probe`). Unset = every retrieved question adapts.
    pub adapt: Option<Policy>,
    pub adapt_probe: Option<PathBuf>,
}

/// A gated arm's adaptation gate, resolved.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResolvedAdaptGate {
    pub probe: PathBuf,
    pub policy: Policy,
}

/// A gated arm's settings, resolved.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResolvedGate {
    pub probe: PathBuf,
    pub policy: Policy,
    /// `static` or `tta`.
    pub then: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapt: Option<ResolvedAdaptGate>,
}

/// An arm with every setting filled in from the server config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResolvedArm {
    pub name: String,
    pub mode: String,
    pub top_k: usize,
    pub tta: Option<TtaSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<ResolvedGate>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub domain_adapter: bool,
}

impl ResolvedArm {
    /// The mode that runs when retrieval does (for a gated arm, its `then`).
    pub fn rag_mode(&self) -> RagMode {
        match &self.gate {
            Some(g) => parse_mode(&g.then).unwrap_or(RagMode::Static),
            None => parse_mode(&self.mode).unwrap_or(RagMode::None),
        }
    }
}

fn parse_mode(m: &str) -> Option<RagMode> {
    match m {
        "closed_book" | "none" => Some(RagMode::None),
        other => RagMode::parse(other),
    }
}

impl EvalSpec {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read eval config {}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            crate::config::toml_error(&text, &e).context(format!("eval config {}", path.display()))
        })
    }

    /// Checks the arms and fills in their settings from `cfg`.
    pub fn resolve(&self, cfg: &Config) -> anyhow::Result<Vec<ResolvedArm>> {
        if self.arms.is_empty() {
            bail!("the eval config has no arms");
        }
        let mut names = std::collections::HashSet::new();
        let mut out = Vec::new();
        for a in &self.arms {
            if a.name.is_empty()
                || !a
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                bail!("arm name `{}`: use letters, digits, - _ .", a.name);
            }
            if !names.insert(a.name.clone()) {
                bail!("arm `{}` is defined twice", a.name);
            }
            let gated = a.mode == "gated";
            let gate = match (gated, &a.gate) {
                (true, g) => {
                    let g = g.clone().unwrap_or_default();
                    let then = g.then.unwrap_or_else(|| cfg.gate.then.clone());
                    if then != "static" && then != "tta" {
                        bail!(
                            "arm `{}`: gate.then `{then}` is not one of static, tta",
                            a.name
                        );
                    }
                    let probe = g
                        .probe
                        .or_else(|| cfg.gate.probe.clone())
                        .with_context(|| {
                            format!(
                            "arm `{}`: a gated arm needs a probe (gate.probe in the arm or the \
                             server config)",
                            a.name
                        )
                        })?;
                    let adapt = match (g.adapt, then.as_str()) {
                        (None, _) => {
                            if g.adapt_probe.is_some() {
                                bail!("arm `{}`: gate.adapt_probe needs gate.adapt", a.name);
                            }
                            None
                        }
                        (Some(policy), "tta") => Some(ResolvedAdaptGate {
                            probe: g
                                .adapt_probe
                                .or_else(|| cfg.gate.adapt_probe.clone())
                                .with_context(|| {
                                    format!(
                                        "arm `{}`: gate.adapt needs an adaptation probe \
                                         (gate.adapt_probe in the arm or the server config)",
                                        a.name
                                    )
                                })?,
                            policy,
                        }),
                        (Some(_), _) => bail!(
                            "arm `{}`: gate.adapt decides whether to adapt, so gate.then must \
                             be \"tta\"",
                            a.name
                        ),
                    };
                    Some(ResolvedGate {
                        probe,
                        policy: g
                            .policy
                            .unwrap_or_else(|| cfg.gate.policy_for(&self.dataset.collection)),
                        then,
                        adapt,
                    })
                }
                (false, Some(_)) => bail!("arm `{}`: a gate table needs mode = \"gated\"", a.name),
                (false, None) => None,
            };
            let mode_name = gate.as_ref().map_or(a.mode.as_str(), |g| g.then.as_str());
            let mode = parse_mode(mode_name).with_context(|| {
                format!(
                    "arm `{}`: mode `{}` is not one of closed_book, static, tta, gated",
                    a.name, a.mode
                )
            })?;
            let top_k = a.top_k.unwrap_or(self.run.top_k);
            if top_k == 0 {
                bail!("arm `{}`: top_k must be at least 1", a.name);
            }
            let tta = match (mode, &a.tta) {
                (RagMode::Tta, t) => Some(
                    merge_tta(&cfg.tta, t.as_ref())
                        .with_context(|| format!("arm `{}`: tta settings", a.name))?,
                ),
                (_, Some(_)) => bail!("arm `{}`: a tta table needs mode = \"tta\"", a.name),
                (_, None) => None,
            };
            if let Some(t) = &tta {
                crate::engine::resolve_tta(t, &Default::default(), 0).map_err(|e| {
                    anyhow::anyhow!("arm `{}`: {}", a.name, e.message.replace("rag.tta.", ""))
                })?;
            }
            out.push(ResolvedArm {
                name: a.name.clone(),
                mode: match mode {
                    _ if gated => "gated".into(),
                    RagMode::None => "closed_book".into(),
                    m => m.as_str().into(),
                },
                top_k,
                tta,
                gate,
                domain_adapter: a.domain_adapter,
            });
        }
        if let Some(b) = &self.run.baseline {
            if !names.contains(b) {
                bail!("run.baseline `{b}` is not one of the arms");
            }
        }
        Ok(out)
    }

    /// The arm others are compared with.
    pub fn baseline(&self) -> String {
        self.run.baseline.clone().unwrap_or_else(|| {
            self.arms
                .iter()
                .find(|a| a.mode == "static")
                .unwrap_or(&self.arms[0])
                .name
                .clone()
        })
    }
}

/// The server's `[tta]` section with `over`'s keys replaced; unknown keys are refused.
fn merge_tta(base: &TtaSection, over: Option<&toml::Table>) -> anyhow::Result<TtaSection> {
    let mut table = toml::Table::try_from(base)?;
    if let Some(o) = over {
        for (k, v) in o {
            if !table.contains_key(k) {
                bail!("unknown key `{k}`");
            }
            table.insert(k.clone(), v.clone());
        }
    }
    Ok(TtaSection::deserialize(toml::Value::Table(table))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
[dataset]
name = "qasc"
questions = "q.jsonl"
collection = "qasc"

[run]
max_tokens = 16

[[arms]]
name = "closed_book"
mode = "closed_book"

[[arms]]
name = "static"
mode = "static"
top_k = 1

[[arms]]
name = "tta-full"
mode = "tta"
tta = { scope = "full", full_lr = 1e-5, steps = 3 }
"#;

    #[test]
    fn arms_resolve_against_the_server_config() {
        let spec: EvalSpec = toml::from_str(SPEC).unwrap();
        let cfg = Config::default();
        let arms = spec.resolve(&cfg).unwrap();
        assert_eq!(arms.len(), 3);
        assert_eq!(arms[0].rag_mode(), RagMode::None);
        assert_eq!(arms[0].top_k, 3);
        assert_eq!(arms[1].top_k, 1);
        let t = arms[2].tta.as_ref().unwrap();
        assert_eq!(t.scope, "full");
        assert_eq!(t.full_lr, 1e-5);
        assert_eq!(t.steps, 3);
        assert_eq!(
            t.weight_decay, cfg.tta.weight_decay,
            "unchanged keys keep the config"
        );
        assert_eq!(spec.baseline(), "static");
        assert_eq!(spec.run.seed, 0);
    }

    #[test]
    fn bad_arms_are_refused_with_the_reason() {
        let cfg = Config::default();
        let err = |extra: &str| {
            let spec: EvalSpec = toml::from_str(&format!("{SPEC}\n{extra}")).unwrap();
            format!("{:#}", spec.resolve(&cfg).unwrap_err())
        };
        assert!(err("[[arms]]\nname = \"static\"\nmode = \"static\"").contains("twice"));
        assert!(err("[[arms]]\nname = \"x\"\nmode = \"rerank\"").contains("mode `rerank`"));
        assert!(
            err("[[arms]]\nname = \"x\"\nmode = \"tta\"\ntta = { lrr = 1 }")
                .contains("unknown key `lrr`")
        );
        assert!(
            err("[[arms]]\nname = \"x\"\nmode = \"tta\"\ntta = { scope = \"half\" }")
                .contains("half")
        );
        assert!(
            err("[[arms]]\nname = \"x\"\nmode = \"static\"\ntta = { lr = 1 }")
                .contains("needs mode")
        );
        assert!(err("[[arms]]\nname = \"a b\"\nmode = \"static\"").contains("arm name"));
        // An adaptation gate needs `then = "tta"` and a card.
        let gated = |g: &str| format!("[[arms]]\nname = \"g\"\nmode = \"gated\"\ngate = {{ {g} }}");
        assert!(err(&gated(
            "probe = \"p.json\", then = \"static\", adapt = \"optimistic\""
        ))
        .contains("gate.then must be \"tta\""));
        let mut bare = cfg.clone();
        bare.gate.adapt_probe = None;
        let spec: EvalSpec = toml::from_str(&format!(
            "{SPEC}\n{}",
            gated("probe = \"p.json\", then = \"tta\", adapt = \"optimistic\"")
        ))
        .unwrap();
        assert!(format!("{:#}", spec.resolve(&bare).unwrap_err()).contains("adaptation probe"));
        assert!(err(&gated(
            "probe = \"p.json\", then = \"tta\", adapt_probe = \"a.json\""
        ))
        .contains("needs gate.adapt"));
        let spec: EvalSpec = toml::from_str(&format!(
            "{SPEC}\n{}",
            gated("probe = \"p.json\", then = \"tta\", adapt = \"pessimistic\", adapt_probe = \"a.json\"")
        ))
        .unwrap();
        let arms = spec.resolve(&cfg).unwrap();
        let g = arms
            .iter()
            .find(|a| a.name == "g")
            .unwrap()
            .gate
            .clone()
            .unwrap();
        assert_eq!(
            g.adapt,
            Some(ResolvedAdaptGate {
                probe: "a.json".into(),
                policy: Policy::Pessimistic
            })
        );
        let spec: EvalSpec =
            toml::from_str(&SPEC.replace("max_tokens = 16", "baseline = \"nope\"")).unwrap();
        assert!(format!("{:#}", spec.resolve(&cfg).unwrap_err()).contains("baseline"));
    }
}
