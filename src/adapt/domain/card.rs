//! The domain adapter's card: what it was trained on and for (model weights, collection
//! content, settings, data) beside its safetensors file. The server refuses an adapter whose
//! model or collection no longer matches, since a low-rank delta means nothing on other
//! weights, and one fitted to passages that have since changed is a silent stale answer.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

pub use crate::model::fingerprint::file_sha256;
use crate::retrieval::Fingerprint;

/// Version of the card layout.
pub const CARD_FORMAT: u32 = 1;
pub const CARD_FILE: &str = "card.json";
pub const ADAPTER_FILE: &str = "adapter.safetensors";

/// The adapter's shape, which loading needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
}

/// The training data: how many examples of each kind, and the digest of what they were.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingData {
    /// Labelled questions (prompt with retrieved passages -> gold answer); 0 = corpus only.
    pub questions: usize,
    /// The questions file, when given.
    pub questions_file: Option<String>,
    /// Question ids left out because their text also appears in a held-out part.
    pub questions_excluded: usize,
    /// Passages trained on as plain text (next-token loss).
    pub corpus_examples: usize,
    /// SHA-256 over every example's token ids: a resumed run must see the same data.
    pub examples_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainCard {
    pub format: u32,
    pub collection: String,
    pub model_id: String,
    /// [`crate::model::fingerprint::weights_sha256`] of the weights it was trained on.
    pub model_sha256: String,
    pub fingerprint: Fingerprint,
    pub shape: Shape,
    /// Every training setting, as the config's `[domain]` section gave them.
    pub settings: serde_json::Value,
    pub data: TrainingData,
    /// Mean training loss per logged span of steps: `(last step, loss)`.
    pub loss_curve: Vec<(usize, f64)>,
    pub steps: usize,
    pub train_seconds: f64,
    /// SHA-256 of the adapter file, so a card never vouches for other weights.
    pub adapter_sha256: String,
    pub adapter_bytes: u64,
}

/// Where a collection's adapter lives: `<dir>/<collection>/`.
pub fn adapter_dir(dir: &Path, collection: &str) -> PathBuf {
    dir.join(collection)
}

impl DomainCard {
    pub fn read(folder: &Path) -> Result<Self> {
        let p = folder.join(CARD_FILE);
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("cannot read domain adapter card {}", p.display()))?;
        let card: Self = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid domain adapter card", p.display()))?;
        ensure!(
            card.format == CARD_FORMAT,
            "{}: card format {} is not {CARD_FORMAT}",
            p.display(),
            card.format
        );
        Ok(card)
    }

    /// Why this card does not fit `model_sha256` and the collection's `now`, if it does not.
    pub fn mismatch(&self, model_sha256: &str, now: &Fingerprint) -> Option<String> {
        if self.model_sha256 != model_sha256 {
            return Some(format!(
                "it was trained on other model weights (sha256 {}…, serving {}…); retrain it with \
                 `ttarag index adapt`",
                short(&self.model_sha256),
                short(model_sha256)
            ));
        }
        if self.fingerprint != *now {
            return Some(format!(
                "collection `{}` changed since it was trained ({} passages, content {}… then; \
                 {} passages, content {}… now); retrain it with `ttarag index adapt`",
                self.collection,
                self.fingerprint.passages,
                short(&self.fingerprint.content_sha256),
                now.passages,
                short(&now.content_sha256)
            ));
        }
        None
    }
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

/// Saves `lora` in `folder` (f32, whatever it trained in) and then `card`, filled in with the
/// saved file's digest and size; each file replaces its old version atomically.
pub fn save_adapter(
    folder: &Path,
    lora: &crate::adapt::Lora,
    mut card: DomainCard,
) -> Result<DomainCard> {
    use candle_core::{DType, Device};
    std::fs::create_dir_all(folder)
        .with_context(|| format!("cannot create {}", folder.display()))?;
    let named = lora
        .named_tensors()
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    let file = folder.join(ADAPTER_FILE);
    let tmp = folder.join(format!("{ADAPTER_FILE}.tmp"));
    candle_core::safetensors::save(&named, &tmp)?;
    std::fs::rename(&tmp, &file).with_context(|| format!("cannot write {}", file.display()))?;
    card.adapter_sha256 = file_sha256(&file)?;
    card.adapter_bytes = std::fs::metadata(&file)?.len();
    write_atomic(
        &folder.join(CARD_FILE),
        serde_json::to_string_pretty(&card)?.as_bytes(),
    )?;
    Ok(card)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader sees the old
/// file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
