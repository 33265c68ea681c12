//! A training pair as token ids: what the loss reads.

use super::*;

/// One pair as token ids; the loss covers `ids[suffix_start..]`.
#[derive(Debug, Clone)]
pub struct Example {
    pub ids: Vec<u32>,
    pub suffix_start: usize,
}

/// Tokenizes a pair as plain text. The suffix keeps its leading space so tokens match the
/// running text.
/// Over `max_tokens`, the suffix is cut at its end and, if needed, the prefix at its start.
pub fn encode_pair(
    model: &Model,
    pair: &Pair,
    query: Option<&str>,
    max_tokens: usize,
) -> std::result::Result<Option<Example>, ModelError> {
    let prefix = match query {
        Some(q) => format!("{q}\n{}", pair.prefix),
        None => pair.prefix.clone(),
    };
    // Corpus and client text: special-token strings in it stay plain text.
    let mut p = model.tokenizer.encode_text(&prefix)?;
    let mut s = model.tokenizer.encode_text(&format!(" {}", pair.suffix))?;
    let max_tokens = max_tokens.max(2);
    if p.len() + s.len() > max_tokens {
        let keep_prefix = p.len().min(max_tokens / 2).max(1);
        if p.len() > keep_prefix && p.len() + 1 > max_tokens {
            p.drain(..p.len() - keep_prefix);
        }
        s.truncate(max_tokens.saturating_sub(p.len()));
    }
    if p.is_empty() || s.is_empty() {
        return Ok(None);
    }
    let suffix_start = p.len();
    p.extend(s);
    Ok(Some(Example {
        ids: p,
        suffix_start,
    }))
}

/// Builds the examples for `pairs`.
pub fn encode_pairs(
    model: &Model,
    pairs: &[Pair],
    query: Option<&str>,
    max_tokens: usize,
) -> std::result::Result<Vec<Example>, ModelError> {
    let mut out = Vec::new();
    for pair in pairs {
        if let Some(ex) = encode_pair(model, pair, query, max_tokens)? {
            out.push(ex);
        }
    }
    Ok(out)
}
