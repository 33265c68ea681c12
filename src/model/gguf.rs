//! Reading a llama.cpp GGUF file: metadata to [`ModelConfig`], the embedded tokenizer to a
//! Hugging Face `tokenizer.json`, and tensors (dequantized) to Hugging Face names.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::{Arch, ModelConfig, ModelError};

/// What a GGUF file holds besides the weights.
pub struct GgufMeta {
    pub config: ModelConfig,
    pub tokenizer_json: serde_json::Value,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub name: Option<String>,
}

fn md<'a>(c: &'a Content, key: &str) -> Result<&'a Value, ModelError> {
    c.metadata
        .get(key)
        .ok_or_else(|| ModelError::BadConfig(format!("GGUF metadata lacks `{key}`")))
}

fn md_usize(c: &Content, key: &str) -> Result<usize, ModelError> {
    let v = md(c, key)?;
    v.to_u64()
        .map(|x| x as usize)
        .or_else(|_| v.to_u32().map(|x| x as usize))
        .or_else(|_| v.to_i32().map(|x| x as usize))
        .map_err(|e| ModelError::BadConfig(format!("GGUF `{key}`: {e}")))
}

fn md_f64(c: &Content, key: &str) -> Option<f64> {
    c.metadata
        .get(key)
        .and_then(|v| v.to_f32().ok())
        .map(f64::from)
}

fn md_strings(c: &Content, key: &str) -> Result<Vec<String>, ModelError> {
    md(c, key)?
        .to_vec()
        .map_err(|e| ModelError::BadConfig(format!("GGUF `{key}`: {e}")))?
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| ModelError::BadConfig(format!("GGUF `{key}`: {e}")))
        })
        .collect()
}

/// Opens and parses the GGUF header.
pub fn read_content(path: &Path) -> Result<(Content, BufReader<File>), ModelError> {
    let file = File::open(path).map_err(|e| ModelError::Io(path.display().to_string(), e))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader)
        .map_err(|e| ModelError::BadConfig(format!("{}: not a GGUF file: {e}", path.display())))?;
    Ok((content, reader))
}

pub fn read_meta(c: &Content) -> Result<GgufMeta, ModelError> {
    let arch_name = md(c, "general.architecture")?
        .to_string()
        .map_err(|e| ModelError::BadConfig(e.to_string()))?
        .clone();
    let arch = Arch::parse(&arch_name)?;
    let a = arch_name.as_str();
    let tokens = md_strings(c, "tokenizer.ggml.tokens")?;
    let heads = md_usize(c, &format!("{a}.attention.head_count"))?;
    let config = ModelConfig {
        arch,
        hidden_size: md_usize(c, &format!("{a}.embedding_length"))?,
        intermediate_size: md_usize(c, &format!("{a}.feed_forward_length"))?,
        num_hidden_layers: md_usize(c, &format!("{a}.block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: md_usize(c, &format!("{a}.attention.head_count_kv")).unwrap_or(heads),
        vocab_size: tokens.len(),
        rms_norm_eps: md_f64(c, &format!("{a}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: md_f64(c, &format!("{a}.rope.freq_base")).unwrap_or(10_000.0),
        max_position_embeddings: md_usize(c, &format!("{a}.context_length")).unwrap_or(4096),
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        attention_bias: c.tensor_infos.contains_key("blk.0.attn_q.bias"),
    };
    config.validate()?;
    let token_at = |key: &str| -> Option<String> {
        let id = md_usize(c, key).ok()?;
        tokens.get(id).cloned()
    };
    let tokenizer_json = tokenizer_json(c, &tokens)?;
    Ok(GgufMeta {
        config,
        tokenizer_json,
        chat_template: c
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned()),
        bos_token: token_at("tokenizer.ggml.bos_token_id"),
        eos_token: token_at("tokenizer.ggml.eos_token_id"),
        name: c
            .metadata
            .get("general.name")
            .and_then(|v| v.to_string().ok().cloned()),
    })
}

const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Hugging Face pre-tokenizer equivalent to llama.cpp's `tokenizer.ggml.pre` name.
fn pre_tokenizer(pre: &str) -> Result<serde_json::Value, ModelError> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        // StarCoder family: each digit alone, then the GPT-2 split.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "gpt2" | "gpt-2" | "default" => byte_level(true),
        "llama3" | "llama-bpe" | "llama-v3" => json!({"type": "Sequence", "pretokenizers": [
            split(LLAMA3_PATTERN), byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(QWEN2_PATTERN), byte_level(false)]}),
        other => {
            return Err(ModelError::BadConfig(format!(
                "GGUF tokenizer pre-tokenizer `{other}` is not supported (supported: smollm, starcoder, gpt2, llama-bpe, qwen2)"
            )))
        }
    })
}

/// Builds a `tokenizer.json` from `tokenizer.ggml.*` (gpt2-style byte-level BPE only).
fn tokenizer_json(c: &Content, tokens: &[String]) -> Result<serde_json::Value, ModelError> {
    let model = md(c, "tokenizer.ggml.model")?
        .to_string()
        .map_err(|e| ModelError::BadConfig(e.to_string()))?;
    if model != "gpt2" {
        return Err(ModelError::BadConfig(format!(
            "GGUF tokenizer model `{model}` is not supported (only byte-level BPE `gpt2`); use a Hugging Face folder with tokenizer.json"
        )));
    }
    let pre = c
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_else(|| "default".into());
    let merges = md_strings(c, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| ModelError::BadConfig(e.to_string()))?
            .iter()
            .map(|t| t.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    // llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| !matches!(types.get(*i).copied().unwrap_or(1), 1 | 6))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] != 4})
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(&pre)?,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    }))
}

/// HF name for a GGUF tensor name, or `None` for tensors the decoder does not use.
fn hf_name(gguf: &str) -> Option<String> {
    let direct = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = direct {
        return Some(n.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, name) = rest.split_once('.')?;
    let (stem, kind) = name.rsplit_once('.')?;
    let hf = match stem {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// llama.cpp's converter permutes the rows of Q and K for arch `llama` so that its interleaved
/// RoPE matches HF's rotate-half RoPE. Undo it so one decoder (HF layout) serves both formats:
/// GGUF row `h*d + 2i + j` holds HF row `h*d + j*d/2 + i`.
pub fn unpermute_qk(w: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let d = out / n_heads;
    w.reshape((n_heads, d / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

/// Dequantizes every tensor the decoder uses to `dtype` on `device`, under HF names and layout.
pub fn load_tensors(
    content: &Content,
    reader: &mut BufReader<File>,
    cfg: &ModelConfig,
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut out = HashMap::new();
    for name in content.tensor_infos.keys() {
        let Some(hf) = hf_name(name) else { continue };
        let q = content.tensor(reader, name, device)?;
        // Dequantize on the CPU side of candle to f32, then cast: exact for every GGUF type.
        let mut t = q.dequantize(device)?;
        if cfg.arch == Arch::Llama {
            if hf.ends_with("q_proj.weight") {
                t = unpermute_qk(&t, cfg.num_attention_heads)?;
            } else if hf.ends_with("k_proj.weight") {
                t = unpermute_qk(&t, cfg.num_key_value_heads)?;
            }
        }
        out.insert(hf, t.to_dtype(dtype)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() -> candle_core::Result<()> {
        // llama.cpp: w.reshape(n_head, 2, d/2, in).swapaxes(1, 2).reshape(out, in)
        let (heads, d, inp) = (3, 4, 2);
        let hf = Tensor::arange(0f32, (heads * d * inp) as f32, &Device::Cpu)?
            .reshape((heads * d, inp))?;
        let gguf = hf
            .reshape((heads, 2, d / 2, inp))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((heads * d, inp))?;
        let back = unpermute_qk(&gguf, heads)?;
        assert_eq!(back.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        Ok(())
    }
}
