//! The model stage: architecture config, weights (GGUF or Hugging Face folder), tokenizer, chat
//! template, and the decoder itself. Knows nothing about HTTP or retrieval.

mod chat_template;
mod config;
mod decoder;
pub mod fingerprint;
pub mod gguf;
mod kernels;
/// A random-weight model of real shape, for tests and the lab.
#[cfg(any(test, feature = "lab"))]
pub mod tiny;
mod tokenizer;
mod weight_grads;

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use chat_template::{question, ChatMessage, ChatTemplate, LocatedRender};
pub use config::{Arch, ModelConfig};
pub use decoder::{
    Adapter, Cache, Decoder, ForwardOpts, ForwardOutput, Gathered, Logits, LowRank, PerRow,
    RowFactors, StepGraph, Target,
};
/// The GPU's own kernels (`--features cuda`).
#[cfg(feature = "cuda")]
pub use kernels::cuda;
/// The GPU kernels' source run on the CPU, for tests (the optimiser's are checked in `adapt`).
#[cfg(test)]
pub use kernels::cuda_on_cpu;
pub use kernels::frozen_matmul::{
    frozen_input_grad, frozen_matmul, frozen_matmul_bf16, Bf16Weight,
};
/// Fused ops, decode attention and cache rows, for the lab's checks.
pub use kernels::greedy::{greedy_picks, logprob_at, Pick};
pub use kernels::quant;
pub use kernels::{cache_rows, decode_attention, fused};
pub use tokenizer::{IncrementalDecoder, TextTokenizer};
pub use weight_grads::WeightGrads;

/// Whether this CPU multiplies bf16 natively (AVX-512 BF16), which `[tta] bf16_products`
/// needs.
pub fn bf16_products_available() -> bool {
    kernels::few_rows::fits_bf16(1)
}

/// Errors of the model stage.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file not found: {0}")]
    NotFound(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("unsupported model architecture `{0}` (supported: llama, qwen2)")]
    UnsupportedArch(String),
    #[error("bad model config: {0}")]
    BadConfig(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A model ready to serve: decoder, tokenizer, template and stop ids. Immutable; share by `Arc`.
pub struct Model {
    /// The name clients use in `model`.
    pub id: String,
    pub decoder: Decoder,
    pub tokenizer: TextTokenizer,
    pub template: Option<ChatTemplate>,
    /// Generation stops when one of these is produced.
    pub eos_ids: Vec<u32>,
}

/// A chat prompt as token ids, and where each message's content lies in them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTokens {
    pub ids: Vec<u32>,
    /// Per message: the range of `ids` whose tokens hold its content's bytes (for an empty
    /// content, an empty range where it would be); `None` when the template did not write the
    /// content or it could not be told from the template's text. A content written twice has
    /// the range of its last occurrence.
    pub content: Vec<Option<Range<usize>>>,
}

/// Everything read from disk before the decoder is built (also what `export` writes).
pub struct ModelParts {
    pub config: ModelConfig,
    pub weights: HashMap<String, Tensor>,
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_tokens: Vec<String>,
}

impl Model {
    /// Loads a `.gguf` file or a Hugging Face folder (`config.json`, `tokenizer.json`,
    /// `*.safetensors`).
    pub fn load(path: &Path, id: &str, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        Self::from_parts(id, load_parts(path, device, dtype)?)
    }

    pub fn from_parts(id: &str, parts: ModelParts) -> Result<Self, ModelError> {
        let template = match &parts.chat_template {
            Some(src) => Some(ChatTemplate::new(
                src,
                parts.bos_token.as_deref().unwrap_or(""),
                parts.eos_tokens.first().map(String::as_str).unwrap_or(""),
            )?),
            None => None,
        };
        let eos_ids = parts
            .eos_tokens
            .iter()
            .filter_map(|t| parts.tokenizer.token_to_id(t))
            .collect();
        let decoder = Decoder::load(&parts.config, parts.weights)?;
        Ok(Self {
            id: id.to_string(),
            decoder,
            tokenizer: parts.tokenizer,
            template,
            eos_ids,
        })
    }

    /// Renders a conversation into the prompt text, or says the model has no chat template.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, ModelError> {
        self.chat_template()?.render(messages, true)
    }

    /// The prompt of a conversation as token ids. Message contents (and so passages put into
    /// them) are encoded as plain text: a special-token string written in a message stays
    /// ordinary text, and every control token comes from the template itself. For contents
    /// without such strings the ids are those of encoding [`Model::render_chat`]'s text.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<ChatTokens, ModelError> {
        let render = self.chat_template()?.render_located(
            messages,
            true,
            self.tokenizer.special_tokens(),
        )?;
        let bytes: Vec<Range<usize>> = render.content.iter().map(|(_, r)| r.clone()).collect();
        let (ids, offsets) = self.tokenizer.encode_marked(&render.text, &bytes)?;
        let mut content = vec![None; messages.len()];
        for (msg, r) in &render.content {
            if let Some(slot) = content.get_mut(*msg) {
                *slot = Some(token_span(&offsets, r));
            }
        }
        Ok(ChatTokens { ids, content })
    }

    fn chat_template(&self) -> Result<&ChatTemplate, ModelError> {
        self.template.as_ref().ok_or_else(|| {
            ModelError::Template(format!(
                "model `{}` ships no chat template (GGUF tokenizer.chat_template or tokenizer_config.json chat_template)",
                self.id
            ))
        })
    }
}

/// The tokens (by their byte ranges, in order) that overlap `bytes`; for empty `bytes`, the
/// empty range before the first token that ends after it.
fn token_span(offsets: &[Range<usize>], bytes: &Range<usize>) -> Range<usize> {
    let start = offsets.partition_point(|o| o.end <= bytes.start);
    if bytes.is_empty() {
        return start..start;
    }
    let end = offsets.partition_point(|o| o.start < bytes.end);
    start..end.max(start)
}

/// Reads config, weights and tokenizer from a GGUF file or a Hugging Face folder.
pub fn load_parts(path: &Path, device: &Device, dtype: DType) -> Result<ModelParts, ModelError> {
    if !path.exists() {
        return Err(ModelError::NotFound(path.display().to_string()));
    }
    if path.is_dir() {
        load_hf_folder(path, device, dtype)
    } else {
        load_gguf(path, device, dtype)
    }
}

fn load_gguf(path: &Path, device: &Device, dtype: DType) -> Result<ModelParts, ModelError> {
    let (content, mut reader) = gguf::read_content(path)?;
    let meta = gguf::read_meta(&content)?;
    let weights = gguf::load_tensors(&content, &mut reader, &meta.config, device, dtype)?;
    Ok(ModelParts {
        tokenizer: TextTokenizer::from_json(&meta.tokenizer_json)?,
        config: meta.config,
        weights,
        chat_template: meta.chat_template,
        bos_token: meta.bos_token,
        eos_tokens: meta.eos_token.into_iter().collect(),
    })
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, ModelError> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| ModelError::Io(path.display().to_string(), e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::BadConfig(format!("{}: {e}", path.display())))
}

/// A token in `tokenizer_config.json` is either a string or `{"content": ...}`.
fn token_str(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

fn load_hf_folder(dir: &Path, device: &Device, dtype: DType) -> Result<ModelParts, ModelError> {
    let cfg_path = dir.join("config.json");
    let cfg_text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| ModelError::Io(cfg_path.display().to_string(), e))?;
    let config = ModelConfig::from_hf_json(&cfg_text)?;
    let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"))?;

    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::Io(dir.display().to_string(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(ModelError::NotFound(format!(
            "{}/*.safetensors",
            dir.display()
        )));
    }
    let mut weights = HashMap::new();
    for shard in &shards {
        for (name, t) in candle_core::safetensors::load(shard, device)? {
            weights.insert(name, t.to_dtype(dtype)?);
        }
    }

    let tok_cfg = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
    let mut chat_template = match tok_cfg.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        // A list of named templates: take "default".
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(String::from)),
        _ => None,
    };
    let jinja = dir.join("chat_template.jinja");
    if chat_template.is_none() && jinja.exists() {
        chat_template = Some(
            std::fs::read_to_string(&jinja)
                .map_err(|e| ModelError::Io(jinja.display().to_string(), e))?,
        );
    }
    let bos_token = token_str(tok_cfg.get("bos_token"));
    let mut eos_tokens: Vec<String> = token_str(tok_cfg.get("eos_token")).into_iter().collect();
    // generation_config.json's eos_token_id (int or list) is what HF's generate stops on.
    let gen = read_json(&dir.join("generation_config.json"))?;
    let cfg_json: serde_json::Value = serde_json::from_str(&cfg_text).unwrap_or_default();
    let eos_ids = gen
        .as_ref()
        .and_then(|g| g.get("eos_token_id"))
        .or_else(|| cfg_json.get("eos_token_id"));
    let ids: Vec<u64> = match eos_ids {
        Some(serde_json::Value::Number(n)) => n.as_u64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).collect(),
        _ => vec![],
    };
    for id in ids {
        if let Ok(tok) = tokenizer.decode_special(id as u32) {
            if !eos_tokens.contains(&tok) {
                eos_tokens.push(tok);
            }
        }
    }
    Ok(ModelParts {
        config,
        weights,
        tokenizer,
        chat_template,
        bos_token,
        eos_tokens,
    })
}

/// Writes `parts` as a Hugging Face folder that [`Model::load`] reads back.
pub fn export_hf_folder(parts: &ModelParts, dir: &Path) -> Result<(), ModelError> {
    let io = |p: &Path, e| ModelError::Io(p.display().to_string(), e);
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let write = |name: &str, v: serde_json::Value| -> Result<(), ModelError> {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap_or_default())
            .map_err(|e| io(&p, e))
    };
    write("config.json", parts.config.to_hf_json())?;
    write(
        "tokenizer_config.json",
        serde_json::json!({
            "chat_template": parts.chat_template,
            "bos_token": parts.bos_token,
            "eos_token": parts.eos_tokens.first(),
        }),
    )?;
    parts.tokenizer.save(&dir.join("tokenizer.json"))?;
    let f32: HashMap<String, Tensor> = parts
        .weights
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F32)?)))
        .collect::<Result<_, candle_core::Error>>()?;
    candle_core::safetensors::save(&f32, dir.join("model.safetensors"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::{tiny_model, tiny_parts, CHATML_TEMPLATE};

    #[test]
    fn ordinary_prompts_keep_the_whole_string_ids() {
        let model = tiny_model(1).unwrap();
        for messages in [
            vec![ChatMessage::new("user", "hi")],
            vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", " Why is the sky blue?\n\n"),
                ChatMessage::new("assistant", "Rayleigh scattering."),
                ChatMessage::new("user", "héllo 🤖 <im_start> |>"),
            ],
        ] {
            let chat = model.encode_chat(&messages).unwrap();
            let whole = model.render_chat(&messages).unwrap();
            assert_eq!(chat.ids, model.tokenizer.encode(&whole).unwrap());
            assert_eq!(chat.content.len(), messages.len());
        }
    }

    #[test]
    fn content_spans_follow_a_trimming_template_and_empty_contents() {
        let mut parts = tiny_parts(Arch::Llama, 1, &Device::Cpu, DType::F32).unwrap();
        parts.chat_template =
            Some(CHATML_TEMPLATE.replace("message['content']", "message['content'] | trim"));
        let model = Model::from_parts("trim", parts).unwrap();
        let messages = [
            ChatMessage::new("system", ""),
            ChatMessage::new("user", "  Hi there \n"),
        ];
        let chat = model.encode_chat(&messages).unwrap();
        // "<|im_start|>system\n" is 8 ids: the empty content sits right after them.
        assert_eq!(chat.content[0], Some(8..8));
        let span = chat.content[1].clone().unwrap();
        assert_eq!(model.tokenizer.decode(&chat.ids[span]).unwrap(), "Hi there");
        // No template: the same clear error as rendering.
        let mut bare = tiny_parts(Arch::Llama, 1, &Device::Cpu, DType::F32).unwrap();
        bare.chat_template = None;
        let bare = Model::from_parts("bare", bare).unwrap();
        let err = bare.encode_chat(&messages).unwrap_err();
        assert!(err.to_string().contains("no chat template"), "{err}");
    }

    #[test]
    fn token_spans_cover_the_overlapping_tokens() {
        let offsets = [0..3, 3..5, 5..5, 5..9];
        assert_eq!(token_span(&offsets, &(3..5)), 1..2);
        assert_eq!(token_span(&offsets, &(4..6)), 1..4);
        assert_eq!(token_span(&offsets, &(3..3)), 1..1);
        assert_eq!(token_span(&offsets, &(9..9)), 4..4);
        assert_eq!(token_span(&[], &(0..4)), 0..0);
    }
}
