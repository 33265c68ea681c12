//! Architecture hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata.

use serde::{Deserialize, Serialize};

use super::ModelError;

/// Decoder families the project implements. Qwen2 is Llama plus biases on q/k/v.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    /// Maps an HF `model_type` / `architectures[0]` or a GGUF `general.architecture` to an arch.
    pub fn parse(name: &str) -> Result<Self, ModelError> {
        match name.to_ascii_lowercase().as_str() {
            "llama" | "llamaforcausallm" => Ok(Arch::Llama),
            "qwen2" | "qwen2forcausallm" => Ok(Arch::Qwen2),
            _ => Err(ModelError::UnsupportedArch(name.to_string())),
        }
    }
}

/// Everything the decoder needs to know about its shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (Qwen2).
    pub attention_bias: bool,
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Query heads per KV head (grouped-query attention; 1 for plain multi-head).
    pub fn kv_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Checks the invariants the decoder relies on, so a bad config fails at load, not mid-request.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::BadConfig(m));
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return bad("num_hidden_layers and vocab_size must be positive".into());
        }
        Ok(())
    }

    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self, ModelError> {
        #[derive(Deserialize)]
        struct Hf {
            model_type: Option<String>,
            architectures: Option<Vec<String>>,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            vocab_size: usize,
            #[serde(default = "default_eps")]
            rms_norm_eps: f64,
            #[serde(default = "default_theta")]
            rope_theta: f64,
            #[serde(default = "default_ctx")]
            max_position_embeddings: usize,
            #[serde(default)]
            tie_word_embeddings: bool,
            attention_bias: Option<bool>,
            head_dim: Option<usize>,
            rope_scaling: Option<serde_json::Value>,
        }
        fn default_eps() -> f64 {
            1e-6
        }
        fn default_theta() -> f64 {
            10_000.0
        }
        fn default_ctx() -> usize {
            4096
        }
        let hf: Hf = serde_json::from_str(text)
            .map_err(|e| ModelError::BadConfig(format!("config.json: {e}")))?;
        let name = hf
            .model_type
            .clone()
            .or_else(|| hf.architectures.as_ref().and_then(|a| a.first().cloned()))
            .ok_or_else(|| ModelError::BadConfig("config.json names no model_type".into()))?;
        let arch = Arch::parse(&name)?;
        if let Some(scaling) = hf.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(ModelError::BadConfig(format!(
                "rope_scaling {scaling} is not supported"
            )));
        }
        let cfg = ModelConfig {
            arch,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            attention_bias: hf.attention_bias.unwrap_or(arch == Arch::Qwen2),
        };
        if let Some(hd) = hf.head_dim {
            if hd != cfg.head_dim() {
                return Err(ModelError::BadConfig(format!(
                    "head_dim {hd} differs from hidden_size/num_attention_heads {}",
                    cfg.head_dim()
                )));
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Serialises to a Hugging Face `config.json` that [`ModelConfig::from_hf_json`] reads back.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (model_type, class) = match self.arch {
            Arch::Llama => ("llama", "LlamaForCausalLM"),
            Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        };
        serde_json::json!({
            "architectures": [class],
            "model_type": model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_json_round_trips_and_unknown_arch_is_named() {
        let cfg = ModelConfig {
            arch: Arch::Qwen2,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            vocab_size: 100,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: 256,
            tie_word_embeddings: true,
            attention_bias: true,
        };
        let back = ModelConfig::from_hf_json(&cfg.to_hf_json().to_string()).unwrap();
        assert_eq!(back, cfg);

        let mut v = cfg.to_hf_json();
        v["model_type"] = "gpt_neox".into();
        let err = ModelConfig::from_hf_json(&v.to_string()).unwrap_err();
        assert!(err.to_string().contains("gpt_neox"), "{err}");
    }

    #[test]
    fn inconsistent_heads_are_rejected() {
        let mut v = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3,
            "vocab_size": 10
        });
        assert!(ModelConfig::from_hf_json(&v.to_string()).is_err());
        v["num_key_value_heads"] = 2.into();
        assert!(ModelConfig::from_hf_json(&v.to_string()).is_ok());
    }
}
