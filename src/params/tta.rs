//! Resolves a request's adaptation settings: config defaults, request overrides, server caps.

use serde::{Deserialize, Serialize};

use crate::adapt::{parse_target, LoraConfig, PairOptions, TrainParams};

use super::{Select, TtaParams, TtaScope};

/// `[tta]`: the adaptation recipe's defaults and the caps on what a request may change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtaSection {
    pub scope: String,
    /// Learning rate of scope `lora`.
    pub lr: f64,
    /// Learning rate of scope `full`.
    pub full_lr: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub grad_accum: usize,
    pub clip_norm: f64,
    pub min_words: usize,
    pub max_pairs: usize,
    pub steps: usize,
    pub max_tokens_per_pair: usize,
    pub condition_on_query: bool,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_targets: Vec<String>,
    pub time_budget_ms: f64,
    /// Rebuild each block's activations during the backward pass instead of keeping them all
    /// (LoRA scope on the CPU: `TrainParams::rebuilds_on`).
    pub recompute_activations: bool,
    /// Rebuild them on a GPU too, which keeps them otherwise: a switch for measuring the two.
    #[serde(default)]
    pub recompute_on_gpu: bool,
    /// Off the CPU, the first step's forward pass also scores the other pairs for the loss
    /// before adaptation (`TrainParams::scores_in_first_step`): one pass fewer.
    #[serde(default = "super::yes")]
    pub score_in_first_step: bool,
    /// Multiply by the frozen weights in bf16 (f32 sums) on CPUs with AVX-512 BF16.
    pub bf16_products: bool,
    pub max_pairs_cap: usize,
    pub max_steps_cap: usize,
    pub max_tokens_per_pair_cap: usize,
    pub max_lora_rank: usize,
    /// Passages adaptation learns from (the prompt's top_k and the next ones); 0 = top_k.
    pub adapt_top_k: usize,
    pub max_adapt_top_k: usize,
    /// `adapted`, or `confident`: the static or the adapted answer, whichever its model is
    /// more confident in.
    pub select: String,
}

/// What a request (`rag.tta`) or an A/B arm (`tta = {...}`) may override; `None` keeps the
/// configured default. Unknown keys are refused, so a misspelt setting is an error, not a
/// silent default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtaOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pairs: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_words: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_accum: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition_on_query: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_rank: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_targets: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapt_top_k: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<String>,
}

impl TtaOverrides {
    /// These settings, with `other`'s where these have none.
    pub fn or(self, other: &Self) -> Self {
        Self {
            scope: self.scope.or_else(|| other.scope.clone()),
            lr: self.lr.or(other.lr),
            max_pairs: self.max_pairs.or(other.max_pairs),
            min_words: self.min_words.or(other.min_words),
            steps: self.steps.or(other.steps),
            grad_accum: self.grad_accum.or(other.grad_accum),
            condition_on_query: self.condition_on_query.or(other.condition_on_query),
            lora_rank: self.lora_rank.or(other.lora_rank),
            lora_alpha: self.lora_alpha.or(other.lora_alpha),
            lora_dropout: self.lora_dropout.or(other.lora_dropout),
            lora_targets: self.lora_targets.or_else(|| other.lora_targets.clone()),
            adapt_top_k: self.adapt_top_k.or(other.adapt_top_k),
            select: self.select.or_else(|| other.select.clone()),
        }
    }
}

/// A setting out of range: which one and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamError {
    pub param: &'static str,
    pub message: String,
}

fn bounded(
    v: Option<i64>,
    default: usize,
    min: i64,
    max: usize,
    param: &'static str,
) -> Result<usize, ParamError> {
    match v {
        None => Ok(default),
        Some(x) if x >= min && x as usize <= max => Ok(x as usize),
        Some(x) => Err(ParamError {
            param,
            message: format!("{param} {x} is outside {min}..={max}"),
        }),
    }
}

/// Merges `o` over the configured defaults, refusing values beyond the caps.
pub fn resolve_tta(c: &TtaSection, o: &TtaOverrides, seed: u64) -> Result<TtaParams, ParamError> {
    let scope_name = o.scope.clone().unwrap_or_else(|| c.scope.clone());
    let scope = TtaScope::parse(&scope_name).ok_or_else(|| ParamError {
        param: "rag.tta.scope",
        message: format!("rag.tta.scope `{scope_name}` is not one of \"lora\", \"full\""),
    })?;
    // Every weight moving tolerates a far smaller step than a zero-initialised adapter.
    let default_lr = match scope {
        TtaScope::Lora => c.lr,
        TtaScope::Full => c.full_lr,
    };
    let lr = o.lr.unwrap_or(default_lr);
    if !(lr > 0.0 && lr <= 1.0) {
        return Err(ParamError {
            param: "rag.tta.lr",
            message: format!("rag.tta.lr {lr} is outside (0, 1]"),
        });
    }
    let alpha = o.lora_alpha.unwrap_or(c.lora_alpha);
    if !(alpha > 0.0 && alpha <= 1024.0) {
        return Err(ParamError {
            param: "rag.tta.lora_alpha",
            message: format!("rag.tta.lora_alpha {alpha} is outside (0, 1024]"),
        });
    }
    let dropout = o.lora_dropout.unwrap_or(c.lora_dropout);
    if !(0.0..1.0).contains(&dropout) {
        return Err(ParamError {
            param: "rag.tta.lora_dropout",
            message: format!("rag.tta.lora_dropout {dropout} is outside [0, 1)"),
        });
    }
    let names = o
        .lora_targets
        .clone()
        .unwrap_or_else(|| c.lora_targets.clone());
    let mut targets = Vec::new();
    for n in &names {
        let t = parse_target(n).ok_or_else(|| ParamError {
            param: "rag.tta.lora_targets",
            message: format!(
                "rag.tta.lora_targets: `{n}` is not one of q, k, v, o, gate, up, down"
            ),
        })?;
        if !targets.contains(&t) {
            targets.push(t);
        }
    }
    if targets.is_empty() {
        return Err(ParamError {
            param: "rag.tta.lora_targets",
            message: "rag.tta.lora_targets must name at least one projection".into(),
        });
    }
    let steps = bounded(o.steps, c.steps, 0, c.max_steps_cap, "rag.tta.steps")?;
    let select_name = o.select.clone().unwrap_or_else(|| c.select.clone());
    let select = Select::parse(&select_name).ok_or_else(|| ParamError {
        param: "rag.tta.select",
        message: format!("rag.tta.select `{select_name}` is not one of \"adapted\", \"confident\""),
    })?;
    Ok(TtaParams {
        select,
        adapt_top_k: bounded(
            o.adapt_top_k,
            c.adapt_top_k,
            0,
            c.max_adapt_top_k,
            "rag.tta.adapt_top_k",
        )?,
        scope,
        pairs: PairOptions {
            min_words: bounded(o.min_words, c.min_words, 1, 1000, "rag.tta.min_words")?,
            max_pairs: bounded(
                o.max_pairs,
                c.max_pairs,
                1,
                c.max_pairs_cap,
                "rag.tta.max_pairs",
            )?,
        },
        train: TrainParams {
            lr,
            weight_decay: c.weight_decay,
            eps: c.eps,
            grad_accum: bounded(o.grad_accum, c.grad_accum, 1, 64, "rag.tta.grad_accum")?,
            clip_norm: c.clip_norm,
            steps: (steps > 0).then_some(steps),
            max_tokens_per_pair: c.max_tokens_per_pair.min(c.max_tokens_per_pair_cap),
            condition_on_query: o.condition_on_query.unwrap_or(c.condition_on_query),
            lora: LoraConfig {
                rank: bounded(
                    o.lora_rank,
                    c.lora_rank,
                    1,
                    c.max_lora_rank,
                    "rag.tta.lora_rank",
                )?,
                alpha,
                targets,
                dropout,
            },
            seed,
            time_budget_ms: (c.time_budget_ms > 0.0).then_some(c.time_budget_ms),
            // Full scope holds a weight copy, its gradients and two moments (~2 GB for the
            // default model): its activations are a rounding error, and rebuilding them would
            // cost a forward pass for nothing.
            recompute: c.recompute_activations && scope == TtaScope::Lora,
            recompute_on_gpu: c.recompute_on_gpu,
            score_in_first_step: c.score_in_first_step,
            bf16: c.bf16_products,
            cancel: Default::default(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::Target;

    #[test]
    fn defaults_then_overrides_then_caps() {
        let c = Config::default().tta;
        let p = resolve_tta(&c, &TtaOverrides::default(), 1).unwrap();
        assert_eq!(p.pairs.max_pairs, 3);
        assert_eq!(p.train.steps, None);
        assert_eq!(p.train.lora.targets, vec![Target::Q, Target::V]);
        let o = TtaOverrides {
            lr: Some(1e-3),
            max_pairs: Some(5),
            steps: Some(4),
            lora_targets: Some(vec!["k".into(), "down".into()]),
            ..Default::default()
        };
        let p = resolve_tta(&c, &o, 1).unwrap();
        assert_eq!(
            (p.train.lr, p.pairs.max_pairs, p.train.steps),
            (1e-3, 5, Some(4))
        );
        assert_eq!(p.train.lora.targets, vec![Target::K, Target::Down]);
        assert_eq!(p.scope, TtaScope::Lora);
        let full = TtaOverrides {
            scope: Some("full".into()),
            ..Default::default()
        };
        let p = resolve_tta(&c, &full, 1).unwrap();
        assert_eq!(p.scope, TtaScope::Full);
        assert_eq!(p.train.lr, c.full_lr, "each scope has its own default step");
        assert_ne!(c.full_lr, c.lr);
        let full_lr = TtaOverrides {
            lr: Some(2e-5),
            ..full.clone()
        };
        assert_eq!(resolve_tta(&c, &full_lr, 1).unwrap().train.lr, 2e-5);

        let bad = |o: TtaOverrides| resolve_tta(&c, &o, 1).unwrap_err().param;
        assert_eq!(
            bad(TtaOverrides {
                max_pairs: Some(1000),
                ..Default::default()
            }),
            "rag.tta.max_pairs"
        );
        assert_eq!(
            bad(TtaOverrides {
                steps: Some(10_000),
                ..Default::default()
            }),
            "rag.tta.steps"
        );
        assert_eq!(
            bad(TtaOverrides {
                lr: Some(0.0),
                ..Default::default()
            }),
            "rag.tta.lr"
        );
        assert_eq!(
            bad(TtaOverrides {
                lora_rank: Some(4096),
                ..Default::default()
            }),
            "rag.tta.lora_rank"
        );
        assert_eq!(
            bad(TtaOverrides {
                lora_targets: Some(vec!["x".into()]),
                ..Default::default()
            }),
            "rag.tta.lora_targets"
        );
        assert_eq!(
            bad(TtaOverrides {
                scope: Some("magic".into()),
                ..Default::default()
            }),
            "rag.tta.scope"
        );
        for p in [1.0, -0.1, f64::NAN] {
            assert_eq!(
                bad(TtaOverrides {
                    lora_dropout: Some(p),
                    ..Default::default()
                }),
                "rag.tta.lora_dropout"
            );
        }
        let o = TtaOverrides {
            lora_dropout: Some(0.1),
            ..Default::default()
        };
        assert_eq!(resolve_tta(&c, &o, 1).unwrap().train.lora.dropout, 0.1);
        // `p` is full scope's: it keeps its activations whatever the setting.
        assert!(c.recompute_activations && !p.train.recompute);
        let lora = resolve_tta(&c, &TtaOverrides::default(), 1).unwrap();
        assert!(lora.train.recompute, "LoRA rebuilds activations by default");
        // On the CPU, that is; full scope never does.
        let cpu = candle_core::Device::Cpu;
        assert!(lora.train.rebuilds_on(&cpu) && !p.train.rebuilds_on(&cpu));
        assert!(
            !c.recompute_on_gpu && !lora.train.recompute_on_gpu,
            "a GPU keeps them"
        );
    }
}
