//! OpenAI chat-completions wire types (serde only). Unknown request fields are ignored, as
//! OpenAI clients send many optional ones; those that would change the meaning of a request
//! and are not implemented are read here so validation can refuse them by name.

use serde::{Deserialize, Serialize};

use crate::engine::RagReport;

#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<WireMessage>>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<i64>,
    pub stop: Option<StopSpec>,
    pub seed: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// OpenAI's end-user id; here it also keeps a user on one A/B arm.
    pub user: Option<String>,
    /// Retrieval steering extension.
    pub rag: Option<RagRequest>,
    // Read only to be refused when set (see `validate::refuse_unsupported`).
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
    pub functions: Option<serde_json::Value>,
    pub function_call: Option<serde_json::Value>,
    pub response_format: Option<serde_json::Value>,
    pub logprobs: Option<serde_json::Value>,
    pub top_logprobs: Option<serde_json::Value>,
    pub logit_bias: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<WireContent>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum WireContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// `"rag": {"mode", "arm", "collection", "top_k", "domain_adapter", "tta", "gate", "cite"}`.
#[derive(Debug, Deserialize, Default)]
pub struct RagRequest {
    pub mode: Option<String>,
    /// Pins an A/B arm (`[ab]` in the config) instead of a weighted pick.
    pub arm: Option<String>,
    pub collection: Option<String>,
    pub top_k: Option<i64>,
    /// Answer (and adapt) on top of the collection's domain adapter; default `[domain]
    /// default_on`.
    pub domain_adapter: Option<bool>,
    /// Adaptation settings for mode `tta`.
    pub tta: Option<crate::engine::TtaOverrides>,
    /// Settings for mode `auto`.
    pub gate: Option<crate::gate::policy::GateChoice>,
    /// Number the passages in the prompt and ask the answer to cite them as `[n]`.
    pub cite: Option<bool>,
}

/// The response's `rag` object: the engine's report plus the A/B arm that served it, which only
/// the server knows.
#[derive(Debug, Serialize)]
pub struct RagOut {
    #[serde(flatten)]
    pub report: RagReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arm: Option<String>,
    /// With `rag.cite`: the passages the answer's `[n]` markers cite.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub citations: Option<Vec<super::citations::Citation>>,
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Serialize)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub finish_reason: String,
    pub logprobs: Option<()>,
}

#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
    pub rag: RagOut,
}

#[derive(Debug, Serialize, Default)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub finish_reason: Option<String>,
    pub logprobs: Option<()>,
}

#[derive(Debug, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rag: Option<RagOut>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}
