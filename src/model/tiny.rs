//! A tiny randomly initialised model with a byte-level tokenizer and a ChatML template, so that
//! tests and examples exercise every code path in milliseconds without a model download.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::{Arch, Model, ModelConfig, ModelError, ModelParts, TextTokenizer};

pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A small config: 2 layers, hidden 32, 4 heads / 2 KV heads, vocab 259 (256 bytes + 3 specials).
pub fn tiny_config(arch: Arch) -> ModelConfig {
    ModelConfig {
        arch,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size: 259,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 512,
        tie_word_embeddings: arch == Arch::Llama,
        attention_bias: arch == Arch::Qwen2,
    }
}

/// GPT-2's reversible byte -> printable character map used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut out = vec!['\0'; 256];
    for &b in &printable {
        out[b as usize] = char::from_u32(b).unwrap_or('?');
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            out[b as usize] = char::from_u32(256 + n).unwrap_or('?');
            printable.push(b);
            n += 1;
        }
    }
    out
}

/// A byte-level BPE tokenizer without merges: one token per byte, plus ChatML specials.
pub fn tiny_tokenizer() -> Result<TextTokenizer, ModelError> {
    let mut vocab = serde_json::Map::new();
    for (i, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(i));
    }
    let specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"];
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            vocab.insert(s.to_string(), json!(256 + i));
            json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    TextTokenizer::from_json(&json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []},
    }))
}

/// Random weights for `cfg`, deterministic in `seed`, under Hugging Face names.
pub fn random_weights(
    cfg: &ModelConfig,
    seed: u64,
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut mk = |shape: &[usize], scale: f32, offset: f32| -> Result<Tensor, ModelError> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
            .collect();
        Ok(Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?)
    };
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let kv = cfg.num_key_value_heads * cfg.head_dim();
    let mut w = HashMap::new();
    w.insert("model.embed_tokens.weight".into(), mk(&[v, h], 0.5, 0.0)?);
    w.insert("model.norm.weight".into(), mk(&[h], 0.1, 1.0)?);
    if !cfg.tie_word_embeddings {
        w.insert("lm_head.weight".into(), mk(&[v, h], 0.2, 0.0)?);
    }
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj", [h, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, h]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            w.insert(format!("{p}.{name}.weight"), mk(&shape, 0.2, 0.0)?);
        }
        if cfg.attention_bias {
            w.insert(format!("{p}.self_attn.q_proj.bias"), mk(&[h], 0.1, 0.0)?);
            w.insert(format!("{p}.self_attn.k_proj.bias"), mk(&[kv], 0.1, 0.0)?);
            w.insert(format!("{p}.self_attn.v_proj.bias"), mk(&[kv], 0.1, 0.0)?);
        }
        w.insert(format!("{p}.input_layernorm.weight"), mk(&[h], 0.1, 1.0)?);
        w.insert(
            format!("{p}.post_attention_layernorm.weight"),
            mk(&[h], 0.1, 1.0)?,
        );
    }
    Ok(w)
}

/// All parts of a tiny model.
pub fn tiny_parts(
    arch: Arch,
    seed: u64,
    device: &Device,
    dtype: DType,
) -> Result<ModelParts, ModelError> {
    let config = tiny_config(arch);
    Ok(ModelParts {
        weights: random_weights(&config, seed, device, dtype)?,
        config,
        tokenizer: tiny_tokenizer()?,
        chat_template: Some(CHATML_TEMPLATE.into()),
        bos_token: None,
        eos_tokens: vec!["<|im_end|>".into()],
    })
}

/// A ready tiny model on the CPU in f32.
pub fn tiny_model(seed: u64) -> Result<Model, ModelError> {
    Model::from_parts(
        "tiny-random",
        tiny_parts(Arch::Llama, seed, &Device::Cpu, DType::F32)?,
    )
}
