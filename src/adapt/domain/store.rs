//! The serving side of domain adapters: each collection's adapter, loaded once, checked
//! against the serving model and the collection's current content, and shared (frozen) by
//! every request on that collection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use super::card::{adapter_dir, file_sha256, DomainCard, ADAPTER_FILE, CARD_FILE};
use crate::adapt::{parse_target, Lora, LoraConfig};
use crate::file_stamp::FileStamp;
use crate::model::fingerprint::WeightsDigest;
use crate::model::ModelConfig;
use crate::retrieval::Fingerprint;

/// A loaded adapter and what it was checked against.
pub struct DomainAdapter {
    pub lora: Lora,
    pub card: DomainCard,
}

enum Entry {
    Ready(Arc<DomainAdapter>),
    /// Kept so a broken adapter costs one check per change, not one per request.
    Refused(String),
}

struct Cached {
    /// The card file it was loaded from (a retrained adapter replaces the card).
    stamp: FileStamp,
    fingerprint: Fingerprint,
    entry: Entry,
}

impl std::fmt::Debug for DomainAdapters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainAdapters")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

pub struct DomainAdapters {
    dir: PathBuf,
    weights: WeightsDigest,
    model: ModelConfig,
    device: Device,
    dtype: DType,
    cache: Mutex<HashMap<String, Cached>>,
}

impl DomainAdapters {
    pub fn new(
        dir: impl Into<PathBuf>,
        weights: WeightsDigest,
        model: ModelConfig,
        device: Device,
        dtype: DType,
    ) -> Self {
        Self {
            dir: dir.into(),
            weights,
            model,
            device,
            dtype,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The store in `dir` (`[domain] dir`), for `model`, whose weights are `weights`.
    pub fn for_model(
        dir: impl Into<PathBuf>,
        model: &crate::model::Model,
        weights: &WeightsDigest,
    ) -> Arc<Self> {
        let d = &model.decoder;
        Arc::new(Self::new(
            dir,
            weights.clone(),
            d.config().clone(),
            d.device().clone(),
            d.dtype(),
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn model_sha(&self) -> Result<&str, String> {
        self.weights.sha256().map_err(|e| format!("{e:#}"))
    }

    /// The adapter of `collection`, whose content is now `now`: `Ok(None)` when it has none,
    /// `Err(why)` when it has one that may not be used (other weights, changed collection,
    /// damaged files).
    pub fn get(
        &self,
        collection: &str,
        now: &Fingerprint,
    ) -> Result<Option<Arc<DomainAdapter>>, String> {
        let folder = adapter_dir(&self.dir, collection);
        let Some(st) = FileStamp::of(&folder.join(CARD_FILE)) else {
            return Ok(None);
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = cache
            .get(collection)
            .is_some_and(|c| c.stamp == st && c.fingerprint == *now);
        if !fresh {
            let entry = match self.load(&folder, now) {
                Ok(a) => Entry::Ready(Arc::new(a)),
                Err(e) => {
                    let why = format!("{e:#}");
                    tracing::warn!(collection, "domain adapter refused: {why}");
                    Entry::Refused(why)
                }
            };
            cache.insert(
                collection.to_string(),
                Cached {
                    stamp: st,
                    fingerprint: now.clone(),
                    entry,
                },
            );
        }
        match &cache[collection].entry {
            Entry::Ready(a) => Ok(Some(a.clone())),
            Entry::Refused(why) => Err(why.clone()),
        }
    }

    fn load(&self, folder: &Path, now: &Fingerprint) -> Result<DomainAdapter> {
        let card = DomainCard::read(folder)?;
        let sha = self.model_sha().map_err(anyhow::Error::msg)?;
        if let Some(why) = card.mismatch(sha, now) {
            anyhow::bail!("{why}");
        }
        let file = folder.join(ADAPTER_FILE);
        let got = file_sha256(&file)?;
        anyhow::ensure!(
            got == card.adapter_sha256,
            "{} does not match its card (sha256 {got}, card says {})",
            file.display(),
            card.adapter_sha256
        );
        let lora = load_lora(&file, &card, &self.model, &self.device, self.dtype)?;
        Ok(DomainAdapter { lora, card })
    }
}

/// Reads an adapter file of `card`'s shape as a frozen [`Lora`].
pub fn load_lora(
    file: &Path,
    card: &DomainCard,
    model: &ModelConfig,
    device: &Device,
    dtype: DType,
) -> Result<Lora> {
    let targets = card
        .shape
        .targets
        .iter()
        .map(|t| parse_target(t).with_context(|| format!("unknown target `{t}` in the card")))
        .collect::<Result<Vec<_>>>()?;
    let cfg = LoraConfig {
        rank: card.shape.rank,
        alpha: card.shape.alpha,
        targets,
        dropout: 0.0,
    };
    let named = candle_core::safetensors::load(file, &Device::Cpu)
        .with_context(|| format!("cannot read {}", file.display()))?;
    Lora::frozen_from(model, &cfg, named, device, dtype)
        .with_context(|| format!("{}", file.display()))
}
