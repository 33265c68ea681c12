//! What the gate reads: the model's hidden state at every layer for the prompt it would answer
//! without retrieval, at two kinds of position — the last prompt token (what the model is about
//! to answer from) and the mean over the question's own tokens.

use candle_core::{DType, IndexOp, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::{ChatMessage, ForwardOpts, Logits, Model};

/// Which forward passes the features come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pass {
    /// The question alone, before retrieval: a skip saves retrieval and adaptation entirely.
    Pre,
    /// MMA-RAG's design: the question alone and the question with its retrieved passages,
    /// features concatenated. Retrieval runs first; a skip saves adaptation and the longer
    /// prompt, at the cost of a second (longer) gate pass.
    Post,
}

impl Pass {
    /// Feature width in hidden sizes.
    pub fn width(self) -> usize {
        match self {
            Pass::Pre => 1,
            Pass::Post => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Pass::Pre => "pre",
            Pass::Post => "post",
        }
    }
}

/// Where a feature vector is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Position {
    /// The last token of the rendered prompt (after the assistant header).
    Last,
    /// The mean over the tokens of the last user message.
    Mean,
}

/// Hidden states of one prompt: `last[l]` and `mean[l]` for `l` in `0..=num_layers`, where
/// 0 is the embedding output and `l` the output of block `l` (before the final norm).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerFeatures {
    pub last: Vec<Vec<f32>>,
    pub mean: Vec<Vec<f32>>,
    /// Token positions `[start, end)` of the question inside the prompt.
    pub question_span: (usize, usize),
}

impl LayerFeatures {
    pub fn layers(&self) -> usize {
        self.last.len()
    }

    pub fn get(&self, position: Position, layer: usize) -> Option<&[f32]> {
        match position {
            Position::Last => self.last.get(layer),
            Position::Mean => self.mean.get(layer),
        }
        .map(Vec::as_slice)
    }
}

/// A prompt longer than the model's context: the client's error, not the server's.
#[derive(Debug, thiserror::Error)]
#[error("prompt of {tokens} tokens exceeds the model's context of {context}")]
pub struct PromptTooLong {
    pub tokens: usize,
    pub context: usize,
}

/// The probe's input for one question: the `pre` features at (`layer`, `position`), followed
/// for [`Pass::Post`] by the same tap on the prompt with passages. `None` when a layer was not
/// read or the post features are missing.
pub fn feature_row(
    pre: &LayerFeatures,
    post: Option<&LayerFeatures>,
    pass: Pass,
    layer: usize,
    position: Position,
) -> Option<Vec<f32>> {
    let mut row = pre.get(position, layer)?.to_vec();
    if pass == Pass::Post {
        row.extend_from_slice(post?.get(position, layer)?);
    }
    Some(row)
}

/// Runs the chat prompt of `messages` through the model once (no logits) and reads the state
/// of layers `0..=depth` (every layer when `depth` is `None`; the request-time gate needs only
/// its card's layer, and the blocks above it are not run). The question is the last user
/// message (with passages, in the post pass: the whole templated turn); its tokens are those
/// [`Model::encode_chat`] places its content at.
pub fn prompt_features(
    model: &Model,
    messages: &[ChatMessage],
    depth: Option<usize>,
) -> anyhow::Result<LayerFeatures> {
    let chat = model.encode_chat(messages)?;
    let ids = chat.ids;
    anyhow::ensure!(!ids.is_empty(), "empty prompt");
    let context = model.decoder.config().max_position_embeddings;
    if ids.len() > context {
        return Err(PromptTooLong {
            tokens: ids.len(),
            context,
        }
        .into());
    }
    let question = messages
        .iter()
        .rposition(|m| m.role == "user")
        .and_then(|i| chat.content.get(i).cloned().flatten());
    let span = question_span(question, ids.len());
    let dec = &model.decoder;
    let layers = dec.config().num_hidden_layers;
    if let Some(d) = depth {
        anyhow::ensure!(
            d <= layers,
            "layer {d} asked of a model with {layers} layers"
        );
    }
    let input = Tensor::new(ids.as_slice(), dec.device())?.unsqueeze(0)?;
    let out = dec.forward(
        &input,
        None,
        &ForwardOpts {
            logits: Logits::None,
            hidden_states: true,
            stop_after: depth,
            ..Default::default()
        },
    )?;
    let mut last = Vec::with_capacity(out.hidden_states.len());
    let mut mean = Vec::with_capacity(out.hidden_states.len());
    for h in &out.hidden_states {
        let h = h.i(0)?.to_dtype(DType::F32)?;
        last.push(h.i(ids.len() - 1)?.to_vec1::<f32>()?);
        mean.push(h.i(span.0..span.1)?.mean(0)?.to_vec1::<f32>()?);
    }
    Ok(LayerFeatures {
        last,
        mean,
        question_span: span,
    })
}

/// The `[start, end)` the mean is taken over: the question's tokens; the last token when the
/// question has none (an empty message), and the whole prompt when it could not be located.
/// Non-empty and inside `0..len` for any input with `len > 0`.
fn question_span(question: Option<std::ops::Range<usize>>, len: usize) -> (usize, usize) {
    match question {
        Some(r) if r.start < r.end && r.end <= len => (r.start, r.end),
        Some(_) => (len.saturating_sub(1), len),
        None => (0, len),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::tiny_model;

    #[test]
    fn taps_every_layer_at_the_documented_positions() {
        let model = tiny_model(2).unwrap();
        let q = "Why is the sky blue?";
        let messages = vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", q),
        ];
        let f = prompt_features(&model, &messages, None).unwrap();
        let cfg = model.decoder.config();
        assert_eq!(f.layers(), cfg.num_hidden_layers + 1);
        assert!(f.last.iter().all(|v| v.len() == cfg.hidden_size));

        // The tiny tokenizer is byte-level: the span is exactly the question's bytes.
        let ids = model.encode_chat(&messages).unwrap().ids;
        let (a, b) = f.question_span;
        assert_eq!(model.tokenizer.decode(&ids[a..b]).unwrap(), q);

        // Same numbers as the decoder's own hidden states at those positions.
        let input = Tensor::new(ids.as_slice(), model.decoder.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let out = model
            .decoder
            .forward(
                &input,
                None,
                &ForwardOpts {
                    logits: Logits::None,
                    hidden_states: true,
                    ..Default::default()
                },
            )
            .unwrap();
        for l in [0, 1, cfg.num_hidden_layers] {
            let h = out.hidden_states[l].i(0).unwrap();
            let last: Vec<f32> = h.i(ids.len() - 1).unwrap().to_vec1().unwrap();
            assert_eq!(f.get(Position::Last, l).unwrap(), last.as_slice());
            let rows: Vec<Vec<f32>> = h.i(a..b).unwrap().to_vec2().unwrap();
            for (d, m) in f.mean[l].iter().enumerate() {
                let want = rows.iter().map(|r| r[d]).sum::<f32>() / rows.len() as f32;
                assert!((m - want).abs() < 1e-5);
            }
        }
        // Layers differ from one another (a tap that always read one layer would not).
        assert_ne!(f.last[0], f.last[cfg.num_hidden_layers]);

        // Stopping early reads the same numbers for the layers it runs, and no others.
        let upto = prompt_features(&model, &messages, Some(1)).unwrap();
        assert_eq!(upto.layers(), 2);
        assert_eq!(upto.last[..], f.last[..2]);
        assert_eq!(upto.mean[..], f.mean[..2]);
        assert!(prompt_features(&model, &messages, Some(cfg.num_hidden_layers + 1)).is_err());
    }

    #[test]
    fn the_post_row_is_both_passes_side_by_side() {
        let f = |x: f32| LayerFeatures {
            last: vec![vec![x, x + 1.0], vec![x + 2.0, x + 3.0]],
            mean: vec![vec![-x, -x], vec![-x - 2.0, -x - 2.0]],
            question_span: (0, 1),
        };
        let (pre, post) = (f(0.0), f(10.0));
        let row = |pass, layer, pos| feature_row(&pre, Some(&post), pass, layer, pos);
        assert_eq!(row(Pass::Pre, 1, Position::Last).unwrap(), [2.0, 3.0]);
        assert_eq!(
            row(Pass::Post, 1, Position::Last).unwrap(),
            [2.0, 3.0, 12.0, 13.0]
        );
        assert_eq!(
            row(Pass::Post, 0, Position::Mean).unwrap(),
            [0.0, 0.0, -10.0, -10.0]
        );
        assert!(row(Pass::Pre, 2, Position::Last).is_none());
        assert!(feature_row(&pre, None, Pass::Post, 0, Position::Last).is_none());
    }

    /// User messages that also occur in the template's text, or are empty or tiny. The first
    /// ones are last found inside the generation prompt, where the prompt up to them encodes
    /// to as many tokens as the whole prompt.
    const AWKWARD: &[&str] = &[
        ">assistant\n",
        "|>assistant\n",
        "t\n",
        "nt\n",
        "assistant",
        "assistant\n",
        "\n",
        "",
        " ",
        "a",
        "<",
        ">",
        "<|im_start|>assistant\n",
        "<|im_end|>\n<|im_start|>assistant\n",
    ];

    #[test]
    fn the_question_span_is_the_last_user_content_for_any_message() {
        let model = tiny_model(2).unwrap();
        for &q in AWKWARD {
            for messages in [
                vec![ChatMessage::new("user", q)],
                vec![
                    ChatMessage::new("system", q),
                    ChatMessage::new("user", q),
                    ChatMessage::new("assistant", q),
                ],
            ] {
                let f = prompt_features(&model, &messages, Some(0))
                    .unwrap_or_else(|e| panic!("{q:?}: {e}"));
                let chat = model.encode_chat(&messages).unwrap();
                let (a, b) = f.question_span;
                assert!(a < b && b <= chat.ids.len(), "{q:?}: {a}..{b}");
                if q.is_empty() {
                    assert_eq!(b - a, 1);
                    assert_eq!(b, chat.ids.len(), "an empty question reads the last token");
                } else {
                    assert_eq!(model.tokenizer.decode(&chat.ids[a..b]).unwrap(), q);
                    assert!(chat.ids[a..b]
                        .iter()
                        .all(|&i| !model.tokenizer.is_special(i)));
                }
            }
        }
    }

    #[test]
    fn question_spans_are_total() {
        assert_eq!(question_span(Some(2..5), 9), (2, 5));
        assert_eq!(question_span(Some(4..4), 9), (8, 9));
        assert_eq!(
            question_span(Some(std::ops::Range { start: 7, end: 3 }), 9),
            (8, 9)
        );
        assert_eq!(question_span(Some(3..12), 9), (8, 9));
        assert_eq!(question_span(None, 9), (0, 9));
        assert_eq!(question_span(Some(0..0), 1), (0, 1));
    }

    #[test]
    fn a_prompt_over_the_context_is_an_error() {
        let model = tiny_model(2).unwrap();
        let long = "x".repeat(2000);
        let err = prompt_features(&model, &[ChatMessage::new("user", &long)], None).unwrap_err();
        assert!(err.to_string().contains("context"), "{err}");
        assert!(err.downcast_ref::<PromptTooLong>().is_some());
    }
}
