//! The arms of the live A/B test: which arm serves a request and what the arm sets. The arm only
//! fills ordinary `rag` fields, so validation and the engine's `ChatJob` know nothing about
//! experiments.

use crate::config::ArmConfig;

use crate::server::error::ApiError;
use crate::server::openai::RagRequest;

/// The configured arms with their cumulative weights, for weighted picks.
pub struct Arms {
    arms: Vec<ArmConfig>,
    cumulative: Vec<f64>,
}

impl Arms {
    pub fn new(arms: &[ArmConfig]) -> Self {
        let cumulative = arms
            .iter()
            .scan(0.0, |sum, a| {
                *sum += a.weight;
                Some(*sum)
            })
            .collect();
        Self {
            arms: arms.to_vec(),
            cumulative,
        }
    }

    pub fn get(&self, i: usize) -> Option<&ArmConfig> {
        self.arms.get(i)
    }

    pub fn iter(&self) -> impl Iterator<Item = &ArmConfig> {
        self.arms.iter()
    }

    /// The arm whose slice of the cumulative weights holds `u` in [0, 1).
    fn pick(&self, u: f64) -> usize {
        let x = u * self.cumulative.last().copied().unwrap_or(0.0);
        self.cumulative
            .iter()
            .position(|&c| x < c)
            // Rounding can leave `x` at the very top: that belongs to the last arm.
            .unwrap_or(self.arms.len().saturating_sub(1))
    }

    /// Which arm serves a request; `None` = outside the experiment. A request that sets
    /// `rag.mode` chose its treatment itself, so counting it under an arm would bias the
    /// comparison. `key` (user or session) makes the pick sticky; without one it is random.
    pub fn assign(&self, rag: &RagRequest, key: Option<&[u8]>) -> Result<Option<usize>, ApiError> {
        if let Some(name) = rag.arm.as_deref() {
            if rag.mode.is_some() {
                return Err(ApiError::invalid(
                    "rag.arm and rag.mode cannot both be set: the arm decides the mode",
                    Some("rag.arm"),
                ));
            }
            if self.arms.is_empty() {
                return Err(ApiError::invalid(
                    format!("rag.arm `{name}` given, but this server runs no A/B test ([ab] arms is empty)"),
                    Some("rag.arm"),
                )
                .with_code("unknown_arm"));
            }
            return match self.arms.iter().position(|a| a.name == name) {
                Some(i) => Ok(Some(i)),
                None => {
                    let names: Vec<&str> = self.arms.iter().map(|a| a.name.as_str()).collect();
                    Err(ApiError::invalid(
                        format!("rag.arm `{name}` is not one of {names:?}"),
                        Some("rag.arm"),
                    )
                    .with_code("unknown_arm"))
                }
            };
        }
        if rag.mode.is_some() || self.arms.is_empty() {
            return Ok(None);
        }
        let u = match key {
            Some(k) => key_position(k),
            None => rand::random::<f64>(),
        };
        Ok(Some(self.pick(u)))
    }
}

/// Writes the arm's settings into the request. Fields the request sets itself (`top_k`, any
/// `tta` key, `collection`) win: a pinned arm plus an explicit override is a deliberate choice.
pub fn apply(arm: &ArmConfig, rag: &mut RagRequest) {
    rag.mode = Some(arm.mode.clone());
    if let Some(g) = &arm.gate {
        let r = rag.gate.get_or_insert_with(Default::default);
        r.policy = r.policy.or(g.policy);
        r.then = r.then.take().or_else(|| g.then.clone());
        r.adapt = r.adapt.or(g.adapt);
    }
    if rag.top_k.is_none() {
        rag.top_k = arm.top_k.map(|k| i64::try_from(k).unwrap_or(i64::MAX));
    }
    if let Some(a) = &arm.tta {
        rag.tta = Some(rag.tta.take().unwrap_or_default().or(a));
    }
    rag.domain_adapter = rag.domain_adapter.or(arm.domain_adapter);
}

/// Maps a key to [0, 1), identically on every build and platform, so a user keeps their arm
/// across restarts and upgrades (std's `DefaultHasher` promises neither). FNV-1a hashes the
/// bytes; because FNV's high bits mix poorly for keys that differ only at the end ("user-1",
/// "user-2"), MurmurHash3's 64-bit finaliser then spreads every input bit over the whole word.
/// The top 53 bits become the fraction.
pub fn key_position(key: &[u8]) -> f64 {
    let mut h = crate::stable_hash::fnv1a(key);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn arm(name: &str, weight: f64, mode: &str) -> ArmConfig {
        ArmConfig {
            name: name.into(),
            weight,
            mode: mode.into(),
            top_k: None,
            tta: None,
            gate: None,
            domain_adapter: None,
        }
    }

    fn keyed(arms: &Arms, key: &str) -> usize {
        arms.assign(&RagRequest::default(), Some(key.as_bytes()))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn weighted_assignment_follows_the_configured_ratio() {
        let arms = Arms::new(&[arm("a", 3.0, "static"), arm("b", 7.0, "none")]);
        let n = 20_000;
        let a = (0..n)
            .filter(|i| keyed(&arms, &format!("user-{i}")) == 0)
            .count();
        let share = a as f64 / n as f64;
        assert!((share - 0.3).abs() < 0.02, "arm a got {share}");
        // Without keys the draw is random but follows the same weights.
        let a = (0..n)
            .filter(|_| arms.assign(&RagRequest::default(), None).unwrap() == Some(0))
            .count();
        let share = a as f64 / n as f64;
        assert!((share - 0.3).abs() < 0.02, "random: arm a got {share}");
    }

    #[test]
    fn the_same_key_always_gets_the_same_arm() {
        let arms = Arms::new(&[
            arm("a", 1.0, "static"),
            arm("b", 1.0, "none"),
            arm("c", 2.0, "tta"),
        ]);
        for i in 0..500 {
            let key = format!("session-{i}");
            let first = keyed(&arms, &key);
            assert!((0..20).all(|_| keyed(&arms, &key) == first));
        }
        // Pinned values (computed independently): changing the hash would move live users.
        let frac = |top53: u64| top53 as f64 / (1u64 << 53) as f64;
        assert_eq!(key_position(b""), frac(0x1d_fa03_ec17_5325));
        assert_eq!(key_position(b"alice"), frac(0x6_a0fa_08f4_cf81));
        assert_eq!(key_position(b"user-1"), frac(0x8_345f_94b8_d080));
    }

    #[test]
    fn pins_explicit_modes_and_unknown_arms() {
        let arms = Arms::new(&[arm("static", 1.0, "static"), arm("tta", 1.0, "tta")]);
        let pin = |name: &str| RagRequest {
            arm: Some(name.into()),
            ..Default::default()
        };
        assert_eq!(arms.assign(&pin("tta"), Some(b"k")).unwrap(), Some(1));
        let e = arms.assign(&pin("nope"), None).unwrap_err();
        assert_eq!(
            (e.param.as_deref(), e.code),
            (Some("rag.arm"), Some("unknown_arm"))
        );
        let explicit = RagRequest {
            mode: Some("none".into()),
            ..Default::default()
        };
        assert_eq!(arms.assign(&explicit, Some(b"k")).unwrap(), None);
        let both = RagRequest {
            mode: Some("none".into()),
            arm: Some("tta".into()),
            ..Default::default()
        };
        assert!(arms.assign(&both, None).is_err());
        let off = Arms::new(&[]);
        assert_eq!(off.assign(&RagRequest::default(), None).unwrap(), None);
        assert_eq!(off.assign(&pin("tta"), None).unwrap_err().status, 400);
    }

    #[test]
    fn request_fields_win_over_the_arms() {
        let mut a = arm("t", 1.0, "tta");
        a.top_k = Some(5);
        a.tta = Some(crate::engine::TtaOverrides {
            lr: Some(1e-3),
            steps: Some(4),
            ..Default::default()
        });
        let mut rag = RagRequest {
            top_k: Some(2),
            tta: Some(crate::engine::TtaOverrides {
                steps: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        };
        apply(&a, &mut rag);
        let t = rag.tta.as_ref().unwrap();
        assert_eq!(rag.mode.as_deref(), Some("tta"));
        assert_eq!((rag.top_k, t.steps, t.lr), (Some(2), Some(1), Some(1e-3)));
    }

    #[test]
    fn an_auto_arm_gives_its_gate_settings_unless_the_request_has_its_own() {
        use crate::gate::policy::{GateChoice, Policy};
        let mut a = arm("g", 1.0, "auto");
        a.gate = Some(GateChoice {
            policy: Some(Policy::Pessimistic),
            then: Some("tta".into()),
            adapt: Some(Policy::Optimistic),
        });
        let mut rag = RagRequest::default();
        apply(&a, &mut rag);
        assert_eq!(rag.mode.as_deref(), Some("auto"));
        assert_eq!(rag.gate.as_ref(), a.gate.as_ref());
        let mut own = RagRequest {
            gate: Some(GateChoice {
                policy: Some(Policy::Always),
                then: None,
                adapt: None,
            }),
            ..Default::default()
        };
        apply(&a, &mut own);
        let g = own.gate.unwrap();
        assert_eq!(
            (g.policy, g.then.as_deref(), g.adapt),
            (Some(Policy::Always), Some("tta"), Some(Policy::Optimistic))
        );
    }

    fn ab(toml: &str) -> String {
        match Config::from_toml(toml) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn config_validation_rejects_bad_arms() {
        let ok = "[ab]\narms = [{name = \"s\", weight = 1.0, mode = \"static\"}, \
                  {name = \"t\", weight = 2.5, mode = \"tta\", top_k = 4, tta = {scope = \"full\", lr = 1e-3}}]\n";
        assert_eq!(ab(ok), "");
        assert!(Config::default().ab.arms.is_empty());
        let arms = |a: &str| ab(&format!("[ab]\narms = [{a}]\n"));
        let cases = [
            (
                "{name = \"x\", weight = 1.0, mode = \"static\"}, {name = \"x\", weight = 1.0, mode = \"none\"}",
                "more than one arm",
            ),
            ("{name = \"x\", weight = 0.0, mode = \"static\"}", "weight"),
            ("{name = \"x\", weight = -1.0, mode = \"static\"}", "weight"),
            ("{name = \"x\", weight = nan, mode = \"static\"}", "weight"),
            ("{name = \"x\", weight = inf, mode = \"static\"}", "weight"),
            ("{name = \"x\", weight = 1.0, mode = \"magic\"}", "mode `magic`"),
            ("{name = \"x y\", weight = 1.0, mode = \"static\"}", "name"),
            ("{name = \"\", weight = 1.0, mode = \"static\"}", "name"),
            (
                "{name = \"x\", weight = 1.0, mode = \"tta\", tta = {scope = \"everything\"}}",
                "tta.scope",
            ),
            (
                "{name = \"x\", weight = 1.0, mode = \"tta\", tta = {steps = 100000}}",
                "tta.steps",
            ),
            (
                "{name = \"x\", weight = 1.0, mode = \"static\", tta = {lr = 0.1}}",
                "need mode",
            ),
            (
                "{name = \"x\", weight = 1.0, mode = \"static\", top_k = 0}",
                "top_k",
            ),
            (
                "{name = \"x\", weight = 1.0, mode = \"tta\", tta = {lr_typo = 0.1}}",
                "lr_typo",
            ),
        ];
        for (a, want) in cases {
            let err = arms(a);
            assert!(err.contains(want), "{a}: `{err}` lacks `{want}`");
        }

        // Mode `auto`: the gate decides, then the arm's (or [gate]'s) `then` runs.
        let auto = "{name = \"g\", weight = 1.0, mode = \"auto\", \
                    gate = {policy = \"pessimistic\", then = \"tta\"}, tta = {steps = 2}}";
        assert_eq!(arms(auto), "");
        assert_eq!(arms("{name = \"g\", weight = 1.0, mode = \"auto\"}"), "");
        // The adaptation gate needs `[gate] adapt_probe` (the default config names one).
        let adapt = "{name = \"g\", weight = 1.0, mode = \"auto\", \
                     gate = {then = \"tta\", adapt = \"optimistic\"}}";
        assert_eq!(arms(adapt), "");
        let mut c = Config::from_toml(&format!("[ab]\narms = [{adapt}]\n")).unwrap();
        c.gate.adapt_probe = None;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("gate.adapt_probe is not set"), "{e}");
        for (a, want) in [
            (
                "{name = \"g\", weight = 1.0, mode = \"auto\", gate = {then = \"none\"}}",
                "gate.then `none`",
            ),
            (
                "{name = \"g\", weight = 1.0, mode = \"auto\", \
                 gate = {then = \"static\", adapt = \"optimistic\"}}",
                "gate.then must be",
            ),
            (
                "{name = \"g\", weight = 1.0, mode = \"static\", gate = {policy = \"always\"}}",
                "gate settings need mode",
            ),
            (
                "{name = \"g\", weight = 1.0, mode = \"auto\", gate = {policy = \"sometimes\"}}",
                "sometimes",
            ),
            (
                "{name = \"g\", weight = 1.0, mode = \"auto\", gate = {then = \"static\"}, \
                 tta = {steps = 2}}",
                "need mode",
            ),
        ] {
            let err = arms(a);
            assert!(err.contains(want), "{a}: `{err}` lacks `{want}`");
        }
        let mut no_gate = Config::default();
        no_gate.gate.probe = None;
        no_gate.ab.arms = vec![arm("g", 1.0, "auto")];
        let e = no_gate.validate().unwrap_err().to_string();
        assert!(e.contains("gate.probe"), "{e}");
        assert!(ab("[ab]\nfeedback_window = 0\n").contains("feedback_window"));
    }

    #[test]
    fn config_validation_checks_the_store() {
        let pg = "[ab]\nstore = \"postgres\"\npostgres_url = \"postgres://u@127.0.0.1:5432/db\"\n";
        assert_eq!(ab(pg), "");
        for (toml, want) in [
            ("[ab]\nstore = \"redis\"\n", "ab.store `redis`"),
            ("[ab]\nstore = \"postgres\"\n", "ab.postgres_url is not set"),
            (
                "[ab]\nstore = \"postgres\"\npostgres_url = \"postgres://h:notaport/db\"\n",
                "ab.postgres_url does not parse",
            ),
            ("[ab]\nexperiment = \"a b\"\n", "ab.experiment"),
            ("[ab]\npostgres_pool = 0\n", "ab.postgres_pool"),
            ("[ab]\nwrite_wait_ms = 600000\n", "ab.write_wait_ms"),
            ("[server]\nreplica_id = \"\"\n", "server.replica_id"),
            ("[server]\nreplica_id = \"a b\"\n", "server.replica_id"),
        ] {
            let err = ab(toml);
            assert!(err.contains(want), "{toml}: `{err}` lacks `{want}`");
        }
    }
}
