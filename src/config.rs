//! Server configuration: `configs/default.toml`, then CLI flags / `TTARAG_*` variables on top.
//! Each stage receives its own section; nothing below reads the environment.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

// The `[tta]` section is the adaptation recipe's: it lives beside its overrides and resolution.
pub use crate::params::TtaSection;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerSection,
    pub model: ModelSection,
    pub generation: GenerationSection,
    pub retrieval: RetrievalSection,
    pub tta: TtaSection,
    /// Optional, so config files written before A/B testing existed still load.
    #[serde(default)]
    pub ab: AbSection,
    #[serde(default)]
    pub gate: GateSection,
    /// Optional: no section = no keys, an open server.
    #[serde(default)]
    pub auth: AuthSection,
    pub domain: DomainSection,
    /// `[collections.NAME]`: per-collection settings over the server-wide ones.
    #[serde(default)]
    pub collections: std::collections::BTreeMap<String, CollectionSettings>,
}

/// `[collections.NAME]`: how requests on one collection are served when they do not say, so
/// one server serves several domains, each tuned. A request's own `rag` fields (and its A/B
/// arm's) win over these; these win over the server-wide defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectionSettings {
    /// As `retrieval.prompt_template`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_template: Option<String>,
    /// As `retrieval.top_k`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Mode of requests that name none (as `gate.default_mode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The adaptation recipe: the keys a request may send in `rag.tta`.
    #[serde(default)]
    pub tta: crate::params::TtaOverrides,
}

/// `[domain]`: per-collection domain adapters (`src/adapt/domain/`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainSection {
    pub dir: PathBuf,
    /// Collections whose requests use their adapter unless `rag.domain_adapter` says otherwise.
    pub default_on: Vec<String>,
    pub train: crate::adapt::domain::DomainTrain,
}

impl DomainSection {
    pub fn default_for(&self, collection: &str) -> bool {
        self.default_on.iter().any(|c| c == collection)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub host: String,
    pub port: u16,
    pub workers: usize,
    pub queue_capacity: usize,
    pub max_body_bytes: usize,
    /// Deadline of a request from its arrival, queue wait included (504 past it).
    pub request_timeout_ms: u64,
    /// Longest prompt, passages included, in tokens; 0 = the model's context.
    pub max_prompt_tokens: usize,
    /// After SIGTERM: how long in-flight requests may take before the process exits anyway.
    pub drain_timeout_ms: u64,
    /// SSE comment keep-alives while a streamed request produces no text (e.g. adapting).
    pub sse_keepalive_ms: u64,
    /// Requests generating at once in the decode scheduler's batch.
    pub max_running: usize,
    /// Tokens one scheduler iteration may run (decode rows plus prefill chunks).
    pub max_batch_tokens: usize,
    /// KV-cache memory all running requests may reserve together, in MiB.
    pub kv_cache_mb: usize,
    /// Memory adaptations in flight may reserve together, in MiB: each one's estimated working
    /// set while it trains, its adapter while its answer runs.
    pub adapt_memory_mb: usize,
    /// Prompt tokens per prefill pass.
    pub prefill_chunk: usize,
    /// This process's name among replicas; `None` = `<hostname>:<port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_id: Option<String>,
}

/// Upper bound of `server.request_timeout_ms`: an hour.
pub const MAX_REQUEST_TIMEOUT_MS: u64 = 3_600_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub path: PathBuf,
    pub id: String,
    pub device: String,
    pub dtype: String,
    pub decode_quant: String,
    /// bf16/f16 models: inference passes convert to f32 for norms and attention.
    #[serde(default)]
    pub f32_norms_attention: bool,
    /// CUDA builds: the project's own kernels (optimiser, training ops, decode attention);
    /// false runs candle's composed ops instead.
    #[serde(default = "crate::params::yes")]
    pub cuda_kernels: bool,
    /// CUDA builds: decode steps captured once as a CUDA graph per batch and replayed per
    /// token; false launches every op of every step.
    #[serde(default = "crate::params::yes")]
    pub cuda_graphs: bool,
    /// CUDA builds, f32 and bf16 models: adaptation's blocks take the fused path (attention,
    /// norms and activation one op each, `cuda::training_attention`); off until measured.
    #[serde(default)]
    pub cuda_fused_training: bool,
    /// CUDA builds: cudarc's per-buffer events, which order a buffer's uses across streams.
    /// Every buffer then makes two events and destroys them when freed; candle's device runs
    /// each thread on its own default stream, where cudarc never records or waits on them, so
    /// false (the default) saves those four driver calls per op and orders nothing less.
    #[serde(default)]
    pub cuda_event_tracking: bool,
    pub threads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSection {
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens_cap: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrievalSection {
    pub index_dir: PathBuf,
    pub collection: String,
    pub sample_corpus: Option<PathBuf>,
    pub top_k: usize,
    pub max_top_k: usize,
    pub passage_max_chars: usize,
    pub prompt_template: String,
    /// Most documents one `POST /v1/collections/{name}/documents` may carry.
    pub max_ingest_documents: usize,
    /// Largest body of that request, in bytes (other requests: `server.max_body_bytes`).
    pub max_ingest_bytes: usize,
}

/// A TOML error on one line (`line L, column C: message`): the parser's own rendering spans
/// several lines with a source excerpt, which breaks one-line CLI errors.
pub fn toml_error(text: &str, e: &toml::de::Error) -> anyhow::Error {
    let msg = e.message().trim().replace('\n', "; ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            anyhow::anyhow!("line {line}, column {col}: {msg}")
        }
        None => anyhow::anyhow!("{msg}"),
    }
}

/// `[gate]`: the retrieval gate behind request mode `auto` (`src/gate/`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateSection {
    /// The probe's JSON card (`ttarag gate train`); its weights lie beside it. `None` = no
    /// gate: mode `auto` is refused.
    pub probe: Option<PathBuf>,
    /// Policy for requests that name none.
    pub policy: crate::gate::policy::Policy,
    /// Per-collection policies, over `policy`.
    pub collection_policies: std::collections::BTreeMap<String, crate::gate::policy::Policy>,
    /// What mode `auto` runs when the gate retrieves: `static` or `tta`.
    pub then: String,
    /// The mode of requests that name none: `static`, `tta`, `none` or `auto`.
    pub default_mode: String,
    /// The adaptation gate's card (`ttarag gate train --without static --with tta`): when
    /// mode `auto` retrieves and `then` is `tta`, it decides whether to adapt or answer
    /// static. `None` = every such request adapts.
    pub adapt_probe: Option<PathBuf>,
    /// The adaptation gate's policy for requests that name none (`rag.gate.adapt`).
    pub adapt_policy: crate::gate::policy::Policy,
    /// Why the configured probe was not loaded (set at start, never read from a file).
    #[serde(skip)]
    pub refused: Option<String>,
    /// Why the configured adaptation probe was not loaded (set at start).
    #[serde(skip)]
    pub adapt_refused: Option<String>,
}

impl Default for GateSection {
    fn default() -> Self {
        Self {
            probe: None,
            policy: crate::gate::policy::Policy::Optimistic,
            collection_policies: Default::default(),
            then: "static".into(),
            default_mode: "static".into(),
            adapt_probe: None,
            adapt_policy: crate::gate::policy::Policy::Always,
            refused: None,
            adapt_refused: None,
        }
    }
}

impl GateSection {
    /// The policy for a request to `collection` that names none.
    pub fn policy_for(&self, collection: &str) -> crate::gate::policy::Policy {
        self.collection_policies
            .get(collection)
            .copied()
            .unwrap_or(self.policy)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.then == "static" || self.then == "tta",
            "gate.then `{}` is not one of: static, tta",
            self.then
        );
        anyhow::ensure!(
            ["static", "tta", "none", "auto"].contains(&self.default_mode.as_str()),
            "gate.default_mode `{}` is not one of: static, tta, none, auto",
            self.default_mode
        );
        anyhow::ensure!(
            self.default_mode != "auto" || self.probe.is_some(),
            "gate.default_mode is `auto` but gate.probe names no probe"
        );
        Ok(())
    }
}

/// `[ab]`: live traffic split between RAG arms (`src/server/experiment/`). No arms = no
/// experiment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AbSection {
    pub arms: Vec<ArmConfig>,
    /// How many most recent in-experiment responses accept feedback; bounds that memory
    /// (store `memory` only: PostgreSQL keeps every response).
    pub feedback_window: usize,
    /// Where responses, arms and feedback live: `memory` (this process) or `postgres` (shared
    /// by every replica that names the same database and experiment).
    pub store: String,
    /// The PostgreSQL URL (`postgres://user:pass@host:port/db`) for store `postgres`; the
    /// environment variable `TTARAG_AB_POSTGRES_URL` overrides it, to keep passwords out of files.
    pub postgres_url: Option<String>,
    /// The experiment's name in the shared store: replicas with the same name share one
    /// experiment and must have the same arms.
    pub experiment: String,
    /// Connections each replica keeps to PostgreSQL.
    pub postgres_pool: usize,
    /// How long an answer waits for its record to be stored before it goes out anyway, so
    /// feedback sent at once to another replica finds it.
    pub write_wait_ms: u64,
}

impl Default for AbSection {
    fn default() -> Self {
        Self {
            arms: Vec::new(),
            feedback_window: 100_000,
            store: "memory".into(),
            postgres_url: None,
            experiment: "default".into(),
            postgres_pool: 8,
            write_wait_ms: 2000,
        }
    }
}

/// One arm: a name, its share of traffic, and the `rag` settings it gives a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmConfig {
    pub name: String,
    pub weight: f64,
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_adapter: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Any key a request may send in `rag.tta`.
    pub tta: Option<crate::params::TtaOverrides>,
    /// For mode `auto`: the gate's policy and what runs when it retrieves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<crate::gate::policy::GateChoice>,
}

/// An arm's or experiment's name: 1 to 64 characters of A-Z a-z 0-9 _ . -, safe in a metric
/// label, a URL and a log line.
fn is_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Larger windows would let feedback bookkeeping take hundreds of MB.
pub const MAX_FEEDBACK_WINDOW: usize = 10_000_000;

impl AbSection {
    /// Arm settings are checked here, at startup, so a request never meets a broken arm.
    pub fn validate(
        &self,
        retrieval: &RetrievalSection,
        tta: &TtaSection,
        gate: &GateSection,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=MAX_FEEDBACK_WINDOW).contains(&self.feedback_window),
            "ab.feedback_window {} is outside 1..={MAX_FEEDBACK_WINDOW}",
            self.feedback_window
        );
        match self.store.as_str() {
            "memory" => {}
            "postgres" => {
                let url = self.postgres_url.as_deref().ok_or_else(|| {
                    anyhow::anyhow!(
                        "ab.store is `postgres` but ab.postgres_url is not set \
                         (nor TTARAG_AB_POSTGRES_URL)"
                    )
                })?;
                url.parse::<tokio_postgres::Config>()
                    .map_err(|e| anyhow::anyhow!("ab.postgres_url does not parse: {e}"))?;
            }
            other => anyhow::bail!("ab.store `{other}` is not one of: memory, postgres"),
        }
        anyhow::ensure!(
            is_name(&self.experiment),
            "ab.experiment `{}` must be 1 to 64 characters of A-Z a-z 0-9 _ . -",
            self.experiment
        );
        anyhow::ensure!(
            (1..=256).contains(&self.postgres_pool),
            "ab.postgres_pool {} is outside 1..=256",
            self.postgres_pool
        );
        anyhow::ensure!(
            self.write_wait_ms <= 60_000,
            "ab.write_wait_ms {} is over 60000",
            self.write_wait_ms
        );
        for (i, a) in self.arms.iter().enumerate() {
            let name = &a.name;
            anyhow::ensure!(
                is_name(name),
                "ab.arms[{i}].name `{name}` must be 1 to 64 characters of A-Z a-z 0-9 _ . -"
            );
            anyhow::ensure!(
                !self.arms[..i].iter().any(|b| &b.name == name),
                "ab arm `{name}`: name is used by more than one arm"
            );
            anyhow::ensure!(
                a.weight.is_finite() && a.weight > 0.0,
                "ab arm `{name}`: weight {} must be a finite number above 0",
                a.weight
            );
            // Mode `auto` runs the gate, then `then` (the arm's, else `[gate]`'s).
            let auto = a.mode == "auto";
            let then = a.gate.as_ref().and_then(|g| g.then.as_deref());
            let mode_name = if auto {
                then.unwrap_or(&gate.then)
            } else {
                &a.mode
            };
            let mode = crate::params::RagMode::parse(mode_name)
                .filter(|m| !auto || *m != crate::params::RagMode::None)
                .ok_or_else(|| match auto {
                    true => anyhow::anyhow!(
                        "ab arm `{name}`: gate.then `{mode_name}` is not one of static, tta"
                    ),
                    false => anyhow::anyhow!(
                        "ab arm `{name}`: mode `{}` is not one of static, tta, none, auto",
                        a.mode
                    ),
                })?;
            anyhow::ensure!(
                auto || a.gate.is_none(),
                "ab arm `{name}`: gate settings need mode \"auto\", not \"{}\"",
                a.mode
            );
            anyhow::ensure!(
                !auto || gate.probe.is_some(),
                "ab arm `{name}`: mode \"auto\" needs the retrieval gate, and gate.probe is not set"
            );
            if a.gate.as_ref().is_some_and(|g| g.adapt.is_some()) {
                anyhow::ensure!(
                    mode == crate::params::RagMode::Tta,
                    "ab arm `{name}`: gate.adapt decides whether to adapt, so gate.then must be \
                     \"tta\""
                );
                anyhow::ensure!(
                    gate.adapt_probe.is_some(),
                    "ab arm `{name}`: gate.adapt needs the adaptation gate, and gate.adapt_probe \
                     is not set"
                );
            }
            if let Some(k) = a.top_k {
                anyhow::ensure!(
                    (1..=retrieval.max_top_k).contains(&k),
                    "ab arm `{name}`: top_k {k} is outside 1..={}",
                    retrieval.max_top_k
                );
            }
            match (&a.tta, mode) {
                (Some(_), m) if m != crate::params::RagMode::Tta => anyhow::bail!(
                    "ab arm `{name}`: tta settings need mode \"tta\", not \"{}\"",
                    a.mode
                ),
                (t, crate::params::RagMode::Tta) => {
                    let o = t.clone().unwrap_or_default();
                    crate::params::resolve_tta(tta, &o, 0).map_err(|e| {
                        anyhow::anyhow!(
                            "ab arm `{name}`: {}",
                            e.message.replace("rag.tta.", "tta.")
                        )
                    })?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// A key from the config or the environment. Its text never leaves through `Debug` or
/// `Serialize` (both give `***`, which is too short to be accepted back as a key); surrounding
/// whitespace is dropped.
#[derive(Clone, Deserialize)]
#[serde(from = "String")]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s.trim().to_string())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// Who may ask for `rag.tta.scope = "full"` in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FullScope {
    /// Callers holding the admin key (none when no admin key is configured).
    Admin,
    /// Every caller the server accepts.
    Any,
}

/// `[auth]`: API keys, the admin key and per-key concurrency (`src/server/auth.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// Keys accepted as `Authorization: Bearer KEY`. None (and no admin key) = open server.
    pub api_keys: Vec<Secret>,
    /// Also accepted everywhere, and the only key allowed what holds the server for everyone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_key: Option<Secret>,
    pub full_scope: FullScope,
    /// Requests one key may have in flight on the model routes; 0 = unlimited.
    pub max_concurrent_per_key: usize,
}

impl Default for AuthSection {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            admin_key: None,
            full_scope: FullScope::Admin,
            max_concurrent_per_key: 8,
        }
    }
}

/// Shorter keys could be guessed, however they are compared.
pub const MIN_KEY_CHARS: usize = 16;

/// The keys in `TTARAG_API_KEYS`'s comma-separated form, trimmed, empty entries left out.
pub fn parse_key_list(list: &str) -> Vec<Secret> {
    list.split(',')
        .map(|k| Secret::from(k.to_string()))
        .filter(|k| !k.expose().is_empty())
        .collect()
}

impl AuthSection {
    /// Whether any key is configured, i.e. whether requests need one.
    pub fn has_keys(&self) -> bool {
        !self.api_keys.is_empty() || self.admin_key.is_some()
    }

    /// Applies `TTARAG_API_KEYS` and `TTARAG_ADMIN_KEY` (as read by the CLI). Each replaces
    /// its config key rather than adding to it, so that a deployment can revoke a key baked
    /// into a config file. A variable that is set but holds no key is an error, not an open
    /// server.
    pub fn apply_env(
        &mut self,
        api_keys: Option<&str>,
        admin_key: Option<&str>,
    ) -> anyhow::Result<()> {
        if let Some(list) = api_keys {
            let keys = parse_key_list(list);
            anyhow::ensure!(
                !keys.is_empty(),
                "TTARAG_API_KEYS is set but holds no key; unset it to keep auth.api_keys"
            );
            self.api_keys = keys;
        }
        if let Some(k) = admin_key {
            let k = Secret::from(k.to_string());
            anyhow::ensure!(
                !k.expose().is_empty(),
                "TTARAG_ADMIN_KEY is set but empty; unset it to keep auth.admin_key"
            );
            self.admin_key = Some(k);
        }
        Ok(())
    }

    /// Messages name a key by its position only.
    pub fn validate(&self) -> anyhow::Result<()> {
        let named = self
            .api_keys
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("auth.api_keys[{i}]"), k))
            .chain(
                self.admin_key
                    .iter()
                    .map(|k| ("auth.admin_key".to_string(), k)),
            );
        let mut seen: Vec<(String, &str)> = Vec::new();
        for (name, key) in named {
            let k = key.expose();
            anyhow::ensure!(
                k.len() >= MIN_KEY_CHARS && k.bytes().all(|b| b.is_ascii_graphic()),
                "{name} must be at least {MIN_KEY_CHARS} printable ASCII characters without spaces"
            );
            anyhow::ensure!(!k.contains(','), "{name} must not contain a comma");
            if let Some((other, _)) = seen.iter().find(|(_, s)| *s == k) {
                anyhow::bail!("{name} is the same key as {other}");
            }
            seen.push((name, k));
        }
        Ok(())
    }
}

impl ModelSection {
    /// `decode_quant` as a quantization type; `None` for "none".
    pub fn decode_quant(&self) -> anyhow::Result<Option<candle_core::quantized::GgmlDType>> {
        use candle_core::quantized::GgmlDType;
        Ok(match self.decode_quant.as_str() {
            "none" => None,
            "q8_0" => Some(GgmlDType::Q8_0),
            "q4_1" => Some(GgmlDType::Q4_1),
            "q4_0" => Some(GgmlDType::Q4_0),
            q => anyhow::bail!("model.decode_quant `{q}` is not one of q8_0, q4_1, q4_0, none"),
        })
    }
}

/// The shipped defaults, compiled in so the binary works from any directory.
pub const DEFAULT_TOML: &str = include_str!("../configs/default.toml");

impl Default for Config {
    fn default() -> Self {
        toml::from_str(DEFAULT_TOML).expect("configs/default.toml parses")
    }
}

impl Config {
    /// Reads a TOML file; keys it omits keep their defaults.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    /// Parses TOML layered over the defaults.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let mut base: toml::Value = toml::from_str(DEFAULT_TOML)?;
        let over: toml::Value = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        merge(&mut base, over);
        let cfg: Config = base.try_into().map_err(|e| toml_error(text, &e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The prompt templates of collections that set their own.
    pub fn collection_templates(&self) -> Vec<(String, String)> {
        self.collections
            .iter()
            .filter_map(|(n, c)| Some((n.clone(), c.prompt_template.clone()?)))
            .collect()
    }

    fn validate_collections(&self) -> anyhow::Result<()> {
        for (name, c) in &self.collections {
            let at = format!("collections.{name}");
            crate::retrieval::validate_name(name).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
            if let Some(k) = c.top_k {
                anyhow::ensure!(
                    (1..=self.retrieval.max_top_k).contains(&k),
                    "{at}.top_k {k} is outside 1..={}",
                    self.retrieval.max_top_k
                );
            }
            if let Some(m) = &c.mode {
                anyhow::ensure!(
                    ["static", "tta", "none", "auto"].contains(&m.as_str()),
                    "{at}.mode `{m}` is not one of: static, tta, none, auto"
                );
            }
            crate::params::resolve_tta(&self.tta, &c.tta, 0)
                .map_err(|e| anyhow::anyhow!("{at}.tta: {}", e.message))?;
            if let Some(t) = &c.prompt_template {
                crate::prompt::RagPrompt::new(t)
                    .map_err(|e| anyhow::anyhow!("{at}.prompt_template: {e}"))?;
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.validate_collections()?;
        anyhow::ensure!(
            self.server.workers >= 1,
            "server.workers must be at least 1"
        );
        anyhow::ensure!(
            self.server.queue_capacity >= 1,
            "server.queue_capacity must be at least 1"
        );
        for (name, v) in [
            ("max_running", self.server.max_running),
            ("max_batch_tokens", self.server.max_batch_tokens),
            ("kv_cache_mb", self.server.kv_cache_mb),
            ("adapt_memory_mb", self.server.adapt_memory_mb),
            ("prefill_chunk", self.server.prefill_chunk),
        ] {
            anyhow::ensure!(v >= 1, "server.{name} must be at least 1");
        }
        anyhow::ensure!(
            (1..=MAX_REQUEST_TIMEOUT_MS).contains(&self.server.request_timeout_ms),
            "server.request_timeout_ms {} is outside 1..={MAX_REQUEST_TIMEOUT_MS}",
            self.server.request_timeout_ms
        );
        anyhow::ensure!(
            self.server.drain_timeout_ms <= MAX_REQUEST_TIMEOUT_MS,
            "server.drain_timeout_ms {} exceeds {MAX_REQUEST_TIMEOUT_MS}",
            self.server.drain_timeout_ms
        );
        anyhow::ensure!(
            self.server.sse_keepalive_ms >= 10,
            "server.sse_keepalive_ms must be at least 10"
        );
        anyhow::ensure!(
            self.retrieval.top_k <= self.retrieval.max_top_k,
            "retrieval.top_k exceeds retrieval.max_top_k"
        );
        anyhow::ensure!(
            self.generation.max_tokens <= self.generation.max_tokens_cap,
            "generation.max_tokens exceeds generation.max_tokens_cap"
        );
        if let Some(r) = &self.server.replica_id {
            anyhow::ensure!(
                (1..=128).contains(&r.len()) && r.bytes().all(|b| b.is_ascii_graphic()),
                "server.replica_id `{r}` must be 1 to 128 visible ASCII characters"
            );
        }
        self.model.decode_quant()?;
        let t = &self.tta;
        anyhow::ensure!(
            crate::params::Select::parse(&t.select).is_some(),
            "tta.select `{}` is not one of: adapted, confident",
            t.select
        );
        anyhow::ensure!(
            t.scope == "lora" || t.scope == "full",
            "tta.scope `{}` is not one of: lora, full",
            t.scope
        );
        anyhow::ensure!(
            t.max_pairs <= t.max_pairs_cap
                && t.steps <= t.max_steps_cap
                && t.max_tokens_per_pair <= t.max_tokens_per_pair_cap
                && t.lora_rank <= t.max_lora_rank
                && t.adapt_top_k <= t.max_adapt_top_k,
            "tta defaults exceed their caps"
        );
        for (key, lr) in [("tta.lr", t.lr), ("tta.full_lr", t.full_lr)] {
            anyhow::ensure!(lr > 0.0 && lr <= 1.0, "{key} {lr} is outside (0, 1]");
        }
        anyhow::ensure!(
            t.lora_rank >= 1 && t.grad_accum >= 1,
            "tta.lora_rank and tta.grad_accum must be at least 1"
        );
        for name in &t.lora_targets {
            anyhow::ensure!(
                crate::adapt::parse_target(name).is_some(),
                "tta.lora_targets: `{name}` is not one of q, k, v, o, gate, up, down"
            );
        }
        self.gate.validate()?;
        self.auth.validate()?;
        self.domain.train.validate()?;
        self.ab.validate(&self.retrieval, &self.tta, &self.gate)
    }
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn collection_settings_are_checked_at_load_by_name() {
        let bad = |toml: &str, want: &str| {
            let err = Config::from_toml(toml)
                .and_then(|c| c.validate())
                .unwrap_err();
            assert!(format!("{err:#}").contains(want), "{err:#}");
        };
        bad(
            "[collections.geo]\nmode = \"fast\"\n",
            "collections.geo.mode `fast`",
        );
        bad("[collections.geo]\ntop_k = 0\n", "collections.geo.top_k 0");
        bad(
            "[collections.geo]\nprompt_template = \"{% for %}\"\n",
            "collections.geo.prompt_template",
        );
        bad(
            "[collections.geo.tta]\nscope = \"huge\"\n",
            "collections.geo.tta",
        );
        bad("[collections.\"a b\"]\ntop_k = 1\n", "collections.a b");
        let ok = Config::from_toml("[collections.geo]\ntop_k = 2\nmode = \"tta\"\n").unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.collections["geo"].top_k, Some(2));
    }

    use super::*;

    #[test]
    fn toml_errors_fit_on_one_line_and_say_where() {
        let e = Config::from_toml("[server]\nport = \n")
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.starts_with("line 2, column"), "{e}");
    }

    #[test]
    fn defaults_parse_and_partial_files_layer_over_them() {
        let d = Config::default();
        assert_eq!(d.server.host, "127.0.0.1");
        let c = Config::from_toml("[server]\nport = 9999\n").unwrap();
        assert_eq!(c.server.port, 9999);
        assert_eq!(c.server.host, d.server.host);
        assert_eq!(c.retrieval.top_k, d.retrieval.top_k);
    }

    #[test]
    fn gpu_switches_default_to_the_measured_choice_and_parse() {
        let m = Config::default().model;
        assert!(m.cuda_kernels && m.cuda_graphs);
        assert!(!m.cuda_fused_training && !m.cuda_event_tracking);
        let c = Config::from_toml("[model]\ncuda_event_tracking = true\n").unwrap();
        assert!(c.model.cuda_event_tracking);
        assert!(c.model.cuda_graphs, "other switches keep their defaults");
        let err = Config::from_toml("[model]\ncuda_event_tracking = \"yes\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("boolean"), "{err}");
    }

    #[test]
    fn typos_and_bad_values_are_rejected() {
        let err = Config::from_toml("[server]\nprot = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("prot"), "{err}");
        assert!(Config::from_toml("[server]\nworkers = 0\n").is_err());
    }

    const KEY_A: &str = "sk-alpha-0123456789abcdef";
    const KEY_B: &str = "sk-bravo-0123456789abcdef";

    #[test]
    fn auth_keys_load_trimmed_and_never_show_in_debug_serialisation_or_errors() {
        let d = Config::default().auth;
        assert!(!d.has_keys());
        assert_eq!(
            (d.full_scope, d.max_concurrent_per_key),
            (FullScope::Admin, 8)
        );
        let c = Config::from_toml(&format!(
            "[auth]\napi_keys = [\"  {KEY_A} \"]\nadmin_key = \"{KEY_B}\"\nfull_scope = \"any\"\n"
        ))
        .unwrap();
        assert_eq!(c.auth.api_keys[0].expose(), KEY_A);
        assert_eq!(c.auth.full_scope, FullScope::Any);
        let shown = format!("{c:?} {:#?} {}", c.auth, toml::to_string(&c).unwrap());
        assert!(shown.contains("***"), "{shown}");
        assert!(!shown.contains(KEY_A) && !shown.contains(KEY_B), "{shown}");
        // What was serialised does not load back as keys.
        let back = Config::from_toml(&toml::to_string(&c).unwrap()).unwrap_err();
        assert!(back.to_string().contains("auth.api_keys[0]"), "{back}");

        for (toml, want) in [
            (
                "api_keys = [\"short-key\"]",
                "auth.api_keys[0] must be at least 16",
            ),
            ("api_keys = [\"\"]", "auth.api_keys[0]"),
            ("api_keys = [\"with a space inside it\"]", "without spaces"),
            (
                &format!("api_keys = [\"{KEY_A}\", \"{KEY_A}\"]"),
                "auth.api_keys[1] is the same key as auth.api_keys[0]",
            ),
            (
                &format!("api_keys = [\"{KEY_A}\"]\nadmin_key = \"{KEY_A}\""),
                "auth.admin_key is the same key",
            ),
            ("full_scope = \"everyone\"", "everyone"),
            ("api_key = []", "api_key"),
        ] {
            let e = Config::from_toml(&format!("[auth]\n{toml}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{toml}: {e}");
            assert!(!e.contains(KEY_A) && !e.contains("short-key"), "{e}");
        }
    }

    #[test]
    fn auth_environment_replaces_the_configured_keys() {
        let mut a = Config::from_toml(&format!("[auth]\napi_keys = [\"{KEY_A}\"]\n"))
            .unwrap()
            .auth;
        a.apply_env(None, None).unwrap();
        assert_eq!(a.api_keys.len(), 1);
        a.apply_env(
            Some(&format!(" {KEY_B} ,, ,{KEY_A}x ")),
            Some(" admin-0123456789abcdef "),
        )
        .unwrap();
        let keys: Vec<&str> = a.api_keys.iter().map(Secret::expose).collect();
        assert_eq!(keys, [KEY_B, &format!("{KEY_A}x")]);
        assert_eq!(
            a.admin_key.as_ref().unwrap().expose(),
            "admin-0123456789abcdef"
        );
        a.validate().unwrap();
        // Set but empty would silently open the server: refused.
        for list in ["", " , ,"] {
            let e = a.apply_env(Some(list), None).unwrap_err().to_string();
            assert!(e.contains("TTARAG_API_KEYS"), "{e}");
        }
        assert!(a.apply_env(None, Some("  ")).is_err());
        assert_eq!(a.api_keys.len(), 2, "a refused variable changes nothing");
    }
}
