//! Wire request -> internal [`ChatJob`], rejecting anything out of range with a precise message.

use crate::config::Config;
use crate::engine::{resolve_tta, ChatJob, DomainUse, RagMode, RagParams};
use crate::generate::GenParams;
use crate::model::ChatMessage;
use crate::retrieval::Collections;

use super::error::ApiError;
use super::experiment::arms::{self, Arms};
use super::openai::{ChatCompletionRequest, StopSpec, WireContent};

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// Longest stop sequence, in bytes: the matcher holds back that much text per step.
pub const MAX_STOP_BYTES: usize = 256;

/// A seed that is a function of the conversation alone: the first 8 bytes of the SHA-256 of
/// its roles and contents, each length-prefixed so no two conversations share an encoding.
pub fn request_seed(messages: &[ChatMessage]) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for m in messages {
        for part in [m.role.as_bytes(), m.content.as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("a SHA-256 has 32 bytes"))
}

fn message_text(i: usize, role: &str, content: Option<WireContent>) -> Result<String, ApiError> {
    match content {
        // An assistant turn may carry tool calls instead of text; every other role speaks.
        None if role == "assistant" => Ok(String::new()),
        None => Err(ApiError::invalid(
            format!("messages[{i}].content is required for role `{role}`"),
            Some(&format!("messages[{i}].content")),
        )),
        Some(WireContent::Text(s)) => Ok(s),
        Some(WireContent::Parts(parts)) => {
            let mut out = String::new();
            for p in parts {
                if p.kind != "text" {
                    return Err(ApiError::invalid(
                        format!("messages[{i}]: content part of type `{}` is not supported; only `text`", p.kind),
                        Some("messages"),
                    ));
                }
                out.push_str(p.text.as_deref().unwrap_or(""));
            }
            Ok(out)
        }
    }
}

/// Fields of OpenAI's API that change what a request means and that this server does not
/// implement: refused by name rather than silently ignored.
fn refuse_unsupported(req: &ChatCompletionRequest) -> Result<(), ApiError> {
    use serde_json::Value;
    let set = |v: &Option<Value>| match v {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    };
    let unsupported = |field: &str, what: &str| {
        Err(ApiError::invalid(
            format!("`{field}` is not supported by this server: {what}"),
            Some(field),
        )
        .with_code("unsupported_parameter"))
    };
    if set(&req.tools) || set(&req.functions) {
        let field = if set(&req.tools) {
            "tools"
        } else {
            "functions"
        };
        return unsupported(field, "it answers in text only, without tool calls");
    }
    for (field, v) in [
        ("tool_choice", &req.tool_choice),
        ("function_call", &req.function_call),
    ] {
        if set(v) && v.as_ref().and_then(Value::as_str) != Some("none") {
            return unsupported(field, "it answers in text only, without tool calls");
        }
    }
    if let Some(f) = req.response_format.as_ref().filter(|v| !v.is_null()) {
        if f.get("type").and_then(Value::as_str) != Some("text") {
            return unsupported("response_format", "only {\"type\": \"text\"} is available");
        }
    }
    if matches!(req.logprobs, Some(Value::Bool(true))) || set(&req.top_logprobs) {
        let field = if set(&req.top_logprobs) {
            "top_logprobs"
        } else {
            "logprobs"
        };
        return unsupported(field, "token log-probabilities are not returned");
    }
    if !matches!(
        req.logprobs,
        None | Some(Value::Null) | Some(Value::Bool(_))
    ) {
        return Err(ApiError::invalid(
            "`logprobs` must be a boolean",
            Some("logprobs"),
        ));
    }
    if set(&req.logit_bias) {
        return unsupported("logit_bias", "logits are not biased");
    }
    Ok(())
}

/// Validates `req` against the server's limits and fills defaults from `cfg`. When an A/B arm is
/// assigned (by `arms`, sticky on the `user` field, else on `session`), its settings fill the
/// request's `rag` fields first; the arm's index comes back with the job.
pub fn to_job(
    req: ChatCompletionRequest,
    cfg: &Config,
    collections: &Collections,
    arms: &Arms,
    session: Option<&[u8]>,
) -> Result<(ChatJob, Option<usize>), ApiError> {
    let g = &cfg.generation;
    refuse_unsupported(&req)?;
    let wire = req.messages.unwrap_or_default();
    if wire.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must be a non-empty array",
            Some("messages"),
        ));
    }
    let mut messages = Vec::with_capacity(wire.len());
    for (i, m) in wire.into_iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::invalid(
                format!("messages[{i}].role `{}` is not one of {ROLES:?}", m.role),
                Some("messages"),
            ));
        }
        // "developer" is the newer name of "system"; templates know only the latter.
        let role = if m.role == "developer" {
            "system"
        } else {
            m.role.as_str()
        };
        messages.push(ChatMessage::new(role, &message_text(i, role, m.content)?));
    }

    if let Some(n) = req.n {
        if n != 1 {
            return Err(ApiError::invalid("only `n` = 1 is supported", Some("n")));
        }
    }
    let max_tokens = match req.max_completion_tokens.or(req.max_tokens) {
        None => g.max_tokens,
        Some(m) if m >= 1 && m as usize <= g.max_tokens_cap => m as usize,
        Some(m) => {
            return Err(ApiError::invalid(
                format!("max_tokens {m} is outside 1..={}", g.max_tokens_cap),
                Some("max_tokens"),
            ))
        }
    };
    let temperature = req.temperature.unwrap_or(g.temperature);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            format!("temperature {temperature} is outside [0, 2]"),
            Some("temperature"),
        ));
    }
    let top_p = req.top_p.unwrap_or(g.top_p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("top_p {top_p} is outside (0, 1]"),
            Some("top_p"),
        ));
    }
    let stop = match req.stop {
        None => vec![],
        Some(StopSpec::One(s)) => vec![s],
        Some(StopSpec::Many(v)) => v,
    };
    if stop.len() > 4 {
        return Err(ApiError::invalid("at most 4 stop sequences", Some("stop")));
    }
    if let Some(bad) = stop
        .iter()
        .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::invalid(
            format!(
                "stop sequences must be 1 to {MAX_STOP_BYTES} bytes; got one of {}",
                bad.len()
            ),
            Some("stop"),
        ));
    }
    // Sampling without a seed is random, as OpenAI's; adaptation without one is seeded by the
    // request itself, so the same request adapts, and at temperature 0 answers, the same way.
    let seed = match req.seed {
        Some(s) => s as u64,
        None => rand::random(),
    };
    let adapt_seed = match req.seed {
        Some(s) => s as u64,
        None => request_seed(&messages),
    };

    let r = &cfg.retrieval;
    let mut rag = req.rag.unwrap_or_default();
    let key = req
        .user
        .as_deref()
        .filter(|u| !u.is_empty())
        .map(str::as_bytes)
        .or(session);
    let arm = arms.assign(&rag, key)?;
    if let Some(a) = arm.and_then(|i| arms.get(i)) {
        arms::apply(a, &mut rag);
    }
    let collection = rag
        .collection
        .clone()
        .unwrap_or_else(|| r.collection.clone());
    // The collection's own settings fill in what the request and its arm leave unsaid.
    let own = cfg.collections.get(&collection);
    let gc = &cfg.gate;
    let asked = rag
        .mode
        .as_deref()
        .or(own.and_then(|c| c.mode.as_deref()))
        .unwrap_or(&gc.default_mode);
    let auto = asked == "auto";
    if auto && gc.probe.is_none() {
        let why = match &gc.refused {
            Some(r) => format!("its probe was refused at start: {r}"),
            None => "none is configured (gate.probe)".into(),
        };
        return Err(ApiError::invalid(
            format!("rag.mode `auto` needs the retrieval gate, and this server has none: {why}"),
            Some("rag.mode"),
        ));
    }
    let wire_gate = rag.gate.take().unwrap_or_default();
    if !auto
        && (wire_gate.policy.is_some() || wire_gate.then.is_some() || wire_gate.adapt.is_some())
    {
        return Err(ApiError::invalid(
            format!("rag.gate applies to mode `auto`, not `{asked}`"),
            Some("rag.gate"),
        ));
    }
    let (mode_name, param) = match &wire_gate.then {
        Some(t) if auto => (t.as_str(), "rag.gate.then"),
        _ if auto => (gc.then.as_str(), "rag.gate.then"),
        _ => (asked, "rag.mode"),
    };
    let mode = match RagMode::parse(mode_name) {
        Some(RagMode::None) if auto => None,
        m => m,
    }
    .ok_or_else(|| {
        let allowed = if auto {
            "\"static\", \"tta\""
        } else {
            "\"static\", \"tta\", \"none\", \"auto\""
        };
        ApiError::invalid(
            format!("{param} `{mode_name}` is not one of {allowed}"),
            Some(param),
        )
    })?;
    let top_k = match rag.top_k {
        None => own.and_then(|c| c.top_k).unwrap_or(r.top_k),
        Some(k) if k >= 1 && k as usize <= r.max_top_k => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                format!("rag.top_k {k} is outside 1..={}", r.max_top_k),
                Some("rag.top_k"),
            ))
        }
    };
    let gate = auto.then(|| {
        wire_gate
            .policy
            .unwrap_or_else(|| gc.policy_for(&collection))
    });
    // The adaptation gate runs where `auto` would adapt: asked for by name, or configured.
    let adapt_gate = match (auto && mode == RagMode::Tta, wire_gate.adapt) {
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "rag.gate.adapt decides whether to adapt, so rag.gate.then must be `tta`",
                Some("rag.gate.adapt"),
            ))
        }
        (false, None) => None,
        (true, asked) if gc.adapt_probe.is_some() => Some(asked.unwrap_or(gc.adapt_policy)),
        (true, None) => None,
        (true, Some(_)) => {
            let why = match &gc.adapt_refused {
                Some(r) => format!("its probe was refused at start: {r}"),
                None => "none is configured (gate.adapt_probe)".into(),
            };
            return Err(ApiError::invalid(
                format!(
                    "rag.gate.adapt needs the adaptation gate, and this server has none: {why}"
                ),
                Some("rag.gate.adapt"),
            ));
        }
    };
    let tta = match mode {
        RagMode::Tta => {
            let mut o = rag.tta.unwrap_or_default();
            if let Some(c) = own {
                o = o.or(&c.tta);
            }
            Some(
                resolve_tta(&cfg.tta, &o, adapt_seed)
                    .map_err(|e| ApiError::invalid(e.message, Some(e.param)))?,
            )
        }
        _ => None,
    };
    if mode != RagMode::None && !collections.exists(&collection) {
        return Err(ApiError::invalid(
            format!("unknown collection `{collection}`"),
            Some("rag.collection"),
        )
        .with_code("collection_not_found"));
    }
    let job = ChatJob {
        messages,
        gen: GenParams {
            max_tokens,
            temperature,
            top_p,
            seed,
            stop,
        },
        rag: RagParams {
            mode,
            domain: match rag.domain_adapter {
                Some(true) => DomainUse::Require,
                Some(false) => DomainUse::Off,
                None if cfg.domain.default_for(&collection) => DomainUse::Prefer,
                None => DomainUse::Off,
            },
            collection,
            top_k,
            gate,
            adapt_gate,
            cite: rag.cite.unwrap_or(false),
        },
        tta,
    };
    Ok((job, arm))
}
